//! A local deployment of real daemon processes on loopback: what the demo
//! runs and what the end-to-end and fault tests drive. Every daemon is the
//! `rs-demo` executable started in one of its roles, so one build gives all
//! three tiers and the example integrator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rs_common::codec::{Limits, decode_status};
use rs_proxy::client::Client;

/// The role of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    AppServer,
    Mlm,
    Proxy,
    Integrator,
}

impl Role {
    fn arg(self) -> &'static str {
        match self {
            Role::AppServer => "appserver",
            Role::Mlm => "mlm",
            Role::Proxy => "proxy",
            Role::Integrator => "hostwatch",
        }
    }
}

/// One daemon process.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub role: Role,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// `host:port` for servers, once known.
    pub addr: Option<String>,
    /// The integrator socket, for proxies.
    pub socket: Option<PathBuf>,
    pub config: Option<PathBuf>,
    /// More environment for the process (e.g. `LD_PRELOAD` of libfaketime).
    pub env: Vec<(String, String)>,
}

impl Node {
    /// Starts (or restarts) the process.
    pub fn start(&mut self, exe: &Path) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let err = log.try_clone()?;
        // Its own process group: a Ctrl-C at the terminal reaches the demo
        // (or test) only, which then stops the tiers in order, instead of
        // every daemon at once.
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(exe)
            .process_group(0)
            .arg(self.role.arg())
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("RUST_BACKTRACE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Sends a signal (`KILL`, `TERM`).
    pub fn signal(&mut self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `grace` before SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        self.signal("TERM");
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for `cond` up to `timeout`, polling.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

fn urls(addrs: &[String]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"http://{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// More configuration for a daemon: top-level keys, keys of its
/// `[upstream]` table, and further tables (modules, `[spool]`).
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub top: String,
    pub upstream: String,
    pub tables: String,
}

/// A deployment under one directory.
#[derive(Debug)]
pub struct Deployment {
    pub dir: PathBuf,
    pub exe: PathBuf,
    pub nodes: BTreeMap<String, Node>,
    /// Environment given to the daemons started from now on.
    pub env: Vec<(String, String)>,
}

impl Deployment {
    pub fn new(dir: impl Into<PathBuf>, exe: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("logs"))?;
        Ok(Deployment {
            dir,
            exe: exe.into(),
            nodes: BTreeMap::new(),
            env: Vec::new(),
        })
    }

    fn server(&mut self, name: &str, role: Role, config: String) -> anyhow::Result<String> {
        let cfg_path = self.dir.join(format!("{name}.toml"));
        let addr_file = self.dir.join(format!("{name}.addr"));
        let _ = std::fs::remove_file(&addr_file);
        write(&cfg_path, &config)?;
        let mut node = Node {
            name: name.into(),
            role,
            args: vec![
                "--config".into(),
                cfg_path.display().to_string(),
                "--addr-file".into(),
                addr_file.display().to_string(),
            ],
            log: self.dir.join("logs").join(format!("{name}.log")),
            child: None,
            addr: None,
            socket: None,
            config: Some(cfg_path.clone()),
            env: self.env.clone(),
        };
        node.start(&self.exe)?;
        if !wait_for(Duration::from_secs(30), || {
            addr_file.exists() && std::fs::read_to_string(&addr_file).is_ok_and(|s| !s.is_empty())
        }) {
            anyhow::bail!("{name} did not start; see {}", node.log.display());
        }
        let addr = std::fs::read_to_string(&addr_file)?.trim().to_owned();
        // Pin the port, so a restart listens where the others connect.
        let pinned = config.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{addr}\""),
            1,
        );
        write(&cfg_path, &pinned)?;
        node.addr = Some(addr.clone());
        self.nodes.insert(name.into(), node);
        Ok(addr)
    }

    /// Starts the application server (`extra`: more TOML); returns its address.
    pub fn appserver(&mut self, listen: &str, extra: &str) -> anyhow::Result<String> {
        let dir = self.dir.join("appserver");
        let cfg = format!(
            "id = \"rs.a1\"\nlisten = \"{listen}\"\ndata_dir = \"{}\"\n{extra}\n",
            dir.display()
        );
        self.server("appserver", Role::AppServer, cfg)
    }

    /// Starts an MLM; returns its address.
    pub fn mlm(
        &mut self,
        name: &str,
        id: &str,
        upstream: &[String],
        extra: &Extra,
    ) -> anyhow::Result<String> {
        let cfg = format!(
            "id = \"{id}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nheartbeat_secs = 5\n{}\n[upstream]\nurls = [{}]\n{}\n{}\n",
            self.dir.join(name).display(),
            extra.top,
            urls(upstream),
            extra.upstream,
            extra.tables
        );
        self.server(name, Role::Mlm, cfg)
    }

    /// Starts a proxy; returns its integrator socket.
    pub fn proxy(
        &mut self,
        name: &str,
        id: &str,
        upstream: &[String],
        extra: &Extra,
    ) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("rs-proxy.sock");
        let cfg_path = self.dir.join(format!("{name}.toml"));
        write(
            &cfg_path,
            &format!(
                "id = \"{id}\"\ndata_dir = \"{}\"\nsocket = \"{}\"\nheartbeat_secs = 5\n{}\n[upstream]\nurls = [{}]\n{}\n{}\n",
                dir.display(),
                socket.display(),
                extra.top,
                urls(upstream),
                extra.upstream,
                extra.tables
            ),
        )?;
        let mut node = Node {
            name: name.into(),
            role: Role::Proxy,
            args: vec!["--config".into(), cfg_path.display().to_string()],
            log: self.dir.join("logs").join(format!("{name}.log")),
            child: None,
            addr: None,
            socket: Some(socket.clone()),
            config: Some(cfg_path),
            env: self.env.clone(),
        };
        let _ = std::fs::remove_file(&socket);
        node.start(&self.exe)?;
        if !wait_for(Duration::from_secs(30), || socket.exists()) {
            anyhow::bail!("{name} did not start; see {}", node.log.display());
        }
        self.nodes.insert(name.into(), node);
        Ok(socket)
    }

    /// Starts the example integrator against a proxy.
    pub fn integrator(&mut self, name: &str, socket: &Path, args: &[String]) -> anyhow::Result<()> {
        let mut node = Node {
            name: name.into(),
            role: Role::Integrator,
            args: [
                vec!["--socket".into(), socket.display().to_string()],
                args.to_vec(),
            ]
            .concat(),
            log: self.dir.join("logs").join(format!("{name}.log")),
            child: None,
            addr: None,
            socket: None,
            config: None,
            env: self.env.clone(),
        };
        node.start(&self.exe)?;
        self.nodes.insert(name.into(), node);
        Ok(())
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Restarts a node (after a kill), waiting until it serves again.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let exe = self.exe.clone();
        let node = self.node(name);
        node.kill();
        if let Some(s) = &node.socket {
            let _ = std::fs::remove_file(s);
        }
        node.start(&exe)?;
        let (addr, socket) = (node.addr.clone(), node.socket.clone());
        let ok = match (addr, socket) {
            (Some(a), _) => wait_for(Duration::from_secs(30), || {
                std::net::TcpStream::connect(&a).is_ok()
            }),
            (None, Some(s)) => wait_for(Duration::from_secs(30), || s.exists()),
            _ => true,
        };
        anyhow::ensure!(ok, "{name} did not come back");
        Ok(())
    }

    /// Stops everything: integrators, proxies, MLMs, then the server.
    pub fn stop_all(&mut self) {
        for role in [Role::Integrator, Role::Proxy, Role::Mlm, Role::AppServer] {
            for n in self.nodes.values_mut().filter(|n| n.role == role) {
                n.stop(Duration::from_secs(8));
            }
        }
    }
}

/// The metrics of a server's `/rs/v1/status` tree.
pub async fn server_metrics(addr: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let body = reqwest::get(format!("http://{addr}/rs/v1/status"))
        .await?
        .bytes()
        .await?;
    let tree = decode_status(&body, &Limits::default())?;
    Ok(tree
        .metrics
        .into_iter()
        .filter_map(|d| Some((d.name, d.value.parse().ok()?)))
        .collect())
}

/// A proxy's status (JSON), flattened to `spool.messages`, `upstream.accepted`, ...
pub async fn proxy_metrics(socket: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let v = Client::new(socket).status().await?;
    let mut out = BTreeMap::new();
    for section in ["spool", "upstream", "backchannel", "throttle"] {
        if let Some(obj) = v.get(section).and_then(|s| s.as_object()) {
            for (k, val) in obj {
                if let Some(n) = val.as_u64() {
                    out.insert(format!("{section}.{k}"), n);
                }
            }
        }
    }
    Ok(out)
}

/// Every message ID stored by the application server, in storage order,
/// read from its database file (read-only).
pub fn stored_ids(appserver_dir: &Path) -> anyhow::Result<Vec<String>> {
    let conn = rusqlite::Connection::open_with_flags(
        appserver_dir.join("appserver.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let mut st = conn.prepare("SELECT id FROM messages ORDER BY rowid")?;
    let ids = st
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(ids)
}

/// `PRAGMA integrity_check` of a SQLite file: "ok" when sound.
pub fn integrity(path: &Path) -> anyhow::Result<String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
}
