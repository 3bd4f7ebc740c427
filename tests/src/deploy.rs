//! A local deployment of real daemon processes on loopback: what the demo
//! runs and what the end-to-end and fault tests drive. Every daemon is the
//! `rs-demo` executable started in one of its roles, so one build gives all
//! three tiers and the example integrator.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rs_net::pki::{Ca, CertSpec, Role as CertRole};
use rs_net::tls::TlsConfig;

use rs_protocol::codec::{Limits, decode_status};
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
    /// The log's length when the process was last started: what it logs
    /// about this run comes after.
    pub log_start: u64,
    /// More environment for the process (e.g. `LD_PRELOAD` of libfaketime).
    pub env: Vec<(String, String)>,
    /// While a server is down: its port, held ([`PortHold`]).
    pub held: Option<PortHold>,
}

/// A server's port held while the server is down, so that it restarts
/// where the other tiers connect: tests run in parallel, and a daemon of
/// another test binding port 0 could otherwise be given the port in
/// between (a killed MLM then "came back" as another test's server). The
/// socket is bound and not listening: the kernel picks no port held so
/// for a bind to port 0, and a connection to it is refused, as to a
/// server that is down. (tokio's `TcpSocket`: std's sockets cannot be
/// bound without listening.)
#[derive(Debug)]
pub struct PortHold(#[allow(dead_code)] tokio::net::TcpSocket);

impl PortHold {
    /// Holds the port of `addr` (`127.0.0.1:port`); `None` if it cannot.
    pub fn new(addr: &str) -> Option<PortHold> {
        let a: std::net::SocketAddr = addr.parse().ok()?;
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        // Bound despite the stopped server's connections in TIME_WAIT.
        s.set_reuseaddr(true).ok()?;
        s.bind(a).ok()?;
        Some(PortHold(s))
    }

    /// A free port of 127.0.0.1, chosen by the kernel and held from the
    /// start (without `SO_REUSEADDR`: another socket asking for it too
    /// could then be bound to the same port).
    fn any() -> Option<(PortHold, String)> {
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        s.bind("127.0.0.1:0".parse().ok()?).ok()?;
        let addr = s.local_addr().ok()?.to_string();
        Some((PortHold(s), addr))
    }
}

/// Ports handed out by [`held_port`], held until a server of a deployment
/// starts on one.
fn held_ports() -> &'static std::sync::Mutex<HashMap<String, PortHold>> {
    static HELD: std::sync::OnceLock<std::sync::Mutex<HashMap<String, PortHold>>> =
        std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// An address for a server a test starts later while other tiers already
/// dial it (an upstream that is down at first): its port is held until
/// [`Deployment`] starts a server there. A port merely found free could
/// meanwhile be taken, by another test's bind to port 0 or by one of the
/// many connections dialling it (the kernel may give a connection to a
/// local port that nothing listens on that very port as its own, and the
/// connection then reaches itself).
pub fn held_port() -> String {
    let (hold, addr) = PortHold::any().expect("a port of 127.0.0.1");
    if let Ok(mut h) = held_ports().lock() {
        h.insert(addr.clone(), hold);
    }
    addr
}

/// Gives a configuration that does not say where `/metrics` is served a
/// port of its own, chosen by the kernel when the daemon binds: the
/// daemons' fixed defaults would collide between the many a test run
/// starts at once, and a port picked here and bound later can be taken by
/// another test meanwhile. [`Deployment::metrics_addr`] reads the bound
/// address from the daemon's log.
pub fn metrics_on_any_port(config: &Path) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if text.contains("metrics_listen") {
        return Ok(());
    }
    // A top-level key goes before the first table.
    std::fs::write(config, format!("metrics_listen = \"127.0.0.1:0\"\n{text}"))
}

impl Node {
    /// Starts (or restarts) the process.
    pub fn start(&mut self, exe: &Path) -> std::io::Result<()> {
        if let Some(c) = &self.config {
            metrics_on_any_port(c)?;
        }
        // Its port is its own again.
        self.held = None;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.log_start = log.metadata()?.len();
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
            self.hold_port();
        }
    }

    /// Holds a stopped server's port until it starts again.
    fn hold_port(&mut self) {
        if let Some(a) = &self.addr {
            self.held = PortHold::new(a);
        }
    }

    /// SIGTERM, then wait up to `grace` before SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        self.signal("TERM");
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + grace;
            let mut exited = false;
            while !exited && Instant::now() < deadline {
                exited = matches!(c.try_wait(), Ok(Some(_)));
                if !exited {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
            self.hold_port();
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

/// A deployment's certificate authority and its admin's certificate (what
/// a provider sets up once with `rsctl ca init` and `rsctl ca issue`).
#[derive(Debug)]
pub struct Pki {
    /// The CA's directory.
    pub dir: PathBuf,
    /// The admin's certificate, key and the CA certificate.
    pub admin: TlsConfig,
}

impl Pki {
    /// A new CA in `dir`, and an admin `ops` granted every customer.
    pub fn create(dir: &Path) -> anyhow::Result<Pki> {
        let ca = Ca::init(dir, "Remote Services test CA", 30).map_err(anyhow::Error::msg)?;
        let spec = CertSpec {
            name: "ops".into(),
            customer: "*".into(),
            role: CertRole::Admin,
            dns: Vec::new(),
            ips: Vec::new(),
            days: 30,
        };
        let admin = issue_into(&ca, &spec, &dir.join("admin"))?;
        Ok(Pki {
            dir: dir.to_owned(),
            admin,
        })
    }

    /// The CA of this (test) process, shared by its deployments.
    pub fn shared() -> Arc<Pki> {
        static P: OnceLock<Arc<Pki>> = OnceLock::new();
        P.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!("rs-pki-{}-{nanos}", std::process::id()));
            Arc::new(Pki::create(&dir).expect("creating the test CA"))
        })
        .clone()
    }

    pub fn ca(&self) -> anyhow::Result<Ca> {
        Ca::open(&self.dir).map_err(anyhow::Error::msg)
    }

    /// Issues a component certificate (serving on 127.0.0.1 / localhost)
    /// with a fresh key into `out`.
    pub fn issue(&self, id: &str, out: &Path) -> anyhow::Result<TlsConfig> {
        let rs = rs_protocol::RsId::new(id).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
        let mut spec = CertSpec::component(&rs, 30);
        spec.dns = vec!["localhost".into()];
        spec.ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
        issue_into(&self.ca()?, &spec, out)
    }

    /// An HTTP client presenting the admin's certificate.
    pub fn admin_client(&self) -> reqwest::Client {
        rs_net::tls::client(Some(&self.admin))
            .and_then(|b| b.build().map_err(|e| e.to_string()))
            .expect("admin client")
    }
}

/// Writes a fresh key and a certificate for `spec` into `out`.
fn issue_into(ca: &Ca, spec: &CertSpec, out: &Path) -> anyhow::Result<TlsConfig> {
    std::fs::create_dir_all(out)?;
    let key = rs_net::pki::generate_key().map_err(anyhow::Error::msg)?;
    let cert = ca.issue(spec, &key).map_err(anyhow::Error::msg)?;
    let t = TlsConfig {
        cert: out.join("cert.pem"),
        key: out.join("key.pem"),
        ca: out.join("ca.pem"),
        crl: None,
        crl_refresh_secs: 1,
        renew_before_days: 30,
    };
    rs_net::pki::write_private(&t.key, &key.private_key_to_pem_pkcs8()?)
        .map_err(anyhow::Error::msg)?;
    std::fs::write(&t.cert, cert.to_pem()?)?;
    std::fs::write(&t.ca, ca.cert().to_pem()?)?;
    Ok(t)
}

/// `[tls]` of a daemon's configuration.
pub fn tls_toml(t: &TlsConfig) -> String {
    let mut s = format!(
        "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\ncrl_refresh_secs = {}\n",
        t.cert.display(),
        t.key.display(),
        t.ca.display(),
        t.crl_refresh_secs
    );
    if let Some(c) = &t.crl {
        s.push_str(&format!("crl = \"{}\"\n", c.display()));
    }
    s
}

/// Servers started with TLS, by address, and the CA they trust.
fn tls_servers() -> &'static Mutex<HashMap<String, Arc<Pki>>> {
    static S: OnceLock<Mutex<HashMap<String, Arc<Pki>>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The base URL of a server of a deployment (`https://` when it runs TLS).
pub fn base(addr: &str) -> String {
    let tls = tls_servers()
        .lock()
        .map(|m| m.contains_key(addr))
        .unwrap_or(false);
    if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// An HTTP client for a server of a deployment: with the admin's
/// certificate when it runs TLS. A fresh client each time (a client keeps
/// connections bound to the runtime that made them).
pub fn admin(addr: &str) -> reqwest::Client {
    let pki = tls_servers().lock().ok().and_then(|m| m.get(addr).cloned());
    match pki {
        Some(p) => p.admin_client(),
        None => reqwest::Client::new(),
    }
}

/// A component's TLS material (its certificate issued on the spot) for
/// talking to a server of a deployment; `None` for a plain server.
pub fn component_tls(addr: &str, id: &str) -> anyhow::Result<Option<TlsConfig>> {
    let pki = tls_servers().lock().ok().and_then(|m| m.get(addr).cloned());
    let Some(p) = pki else { return Ok(None) };
    let out = p.dir.join("clients").join(id);
    Ok(Some(if out.join("cert.pem").exists() {
        let mut t = TlsConfig::in_dir(&out);
        t.crl = None;
        t
    } else {
        p.issue(id, &out)?
    }))
}

/// A client presenting a component's certificate to a server of a
/// deployment: what a proxy or MLM would send with.
pub fn component_client(addr: &str, id: &str) -> anyhow::Result<reqwest::Client> {
    Ok(rs_net::tls::client(component_tls(addr, id)?.as_ref())
        .map_err(anyhow::Error::msg)?
        .build()?)
}

/// [`admin`] for the server a URL names.
pub fn admin_for_url(url: &str) -> reqwest::Client {
    let rest = url.split("://").nth(1).unwrap_or(url);
    admin(rest.split('/').next().unwrap_or(rest))
}

/// `rsctl` arguments that reach a server of a deployment: its URL and, for
/// TLS, the CA and the admin's certificate.
pub fn rsctl_args(addr: &str) -> Vec<String> {
    let mut v = vec!["--server".to_owned(), base(addr)];
    let pki = tls_servers().lock().ok().and_then(|m| m.get(addr).cloned());
    if let Some(p) = pki {
        for (k, f) in [
            ("--ca", &p.admin.ca),
            ("--cert", &p.admin.cert),
            ("--key", &p.admin.key),
        ] {
            v.push(k.into());
            v.push(f.display().to_string());
        }
    }
    v
}

/// More configuration for a daemon: top-level keys, keys of its
/// `[upstream]` table, and further tables (modules, `[spool]`).
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub top: String,
    pub upstream: String,
    pub tables: String,
}

/// haproxy in front of a farm; stopped when dropped.
#[derive(Debug)]
pub struct Haproxy {
    child: Child,
    pub addr: String,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The engine the application servers of this test run store on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEngine {
    Sqlite,
    Postgres,
}

/// `RS_TEST_STORE=postgres` runs the application servers on PostgreSQL
/// (scripts/test runs the end-to-end modules a second time so); anything
/// else, SQLite.
pub fn store_engine() -> StoreEngine {
    match std::env::var("RS_TEST_STORE").as_deref() {
        Ok("postgres") => StoreEngine::Postgres,
        _ => StoreEngine::Sqlite,
    }
}

/// A deployment under one directory.
#[derive(Debug)]
pub struct Deployment {
    pub dir: PathBuf,
    pub exe: PathBuf,
    pub nodes: BTreeMap<String, Node>,
    /// Environment given to the daemons started from now on.
    pub env: Vec<(String, String)>,
    /// The CA of the deployment: TLS with mutual authentication between
    /// the tiers, proxies enrolled with tokens. `None`: plain HTTP.
    pub pki: Option<Arc<Pki>>,
    /// The application server's address, once started (proxies enroll
    /// through it).
    pub appserver_addr: Option<String>,
    /// The engine its application server stores on ([`store_engine`]
    /// unless a test needs one).
    pub store: StoreEngine,
}

impl Deployment {
    /// A deployment with TLS, on the test process's CA.
    pub fn new(dir: impl Into<PathBuf>, exe: impl Into<PathBuf>) -> std::io::Result<Self> {
        Self::with_pki(dir, exe, Some(Pki::shared()))
    }

    /// A deployment on plain HTTP (the benchmarks compare against peers
    /// that run without TLS).
    pub fn plain(dir: impl Into<PathBuf>, exe: impl Into<PathBuf>) -> std::io::Result<Self> {
        Self::with_pki(dir, exe, None)
    }

    pub fn with_pki(
        dir: impl Into<PathBuf>,
        exe: impl Into<PathBuf>,
        pki: Option<Arc<Pki>>,
    ) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("logs"))?;
        Ok(Deployment {
            dir,
            exe: exe.into(),
            nodes: BTreeMap::new(),
            env: Vec::new(),
            pki,
            appserver_addr: None,
            store: store_engine(),
        })
    }

    /// The upstream URLs of a daemon (through relays too: with TLS every
    /// server of the deployment speaks it).
    fn urls(&self, addrs: &[String]) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        addrs
            .iter()
            .map(|a| format!("\"{scheme}://{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `[tls]` for a server component, with a certificate issued now (or
    /// the one issued before, on a restart).
    fn server_tls(&self, name: &str, id: &str, crl: bool) -> anyhow::Result<String> {
        let Some(p) = &self.pki else {
            return Ok(String::new());
        };
        let out = self.dir.join(name).join("tls");
        let mut t = if out.join("cert.pem").exists() {
            TlsConfig::in_dir(&out)
        } else {
            p.issue(id, &out)?
        };
        t.crl = crl.then(|| out.join("crl.pem"));
        t.crl_refresh_secs = 1;
        Ok(tls_toml(&t))
    }

    /// An enrollment token for `id`, made through the control API with
    /// `rsctl` as an admin would.
    pub fn enrollment_token(&self, id: &str) -> anyhow::Result<String> {
        let (Some(p), Some(a)) = (&self.pki, &self.appserver_addr) else {
            anyhow::bail!("no TLS or no application server to enroll with");
        };
        let out = Command::new(&self.exe)
            .arg("rsctl")
            .arg("--server")
            .arg(base(a))
            .arg("--ca")
            .arg(&p.admin.ca)
            .arg("--cert")
            .arg(&p.admin.cert)
            .arg("--key")
            .arg(&p.admin.key)
            .args(["enroll", "--component", id])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "rsctl enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    fn server(&mut self, name: &str, role: Role, config: String) -> anyhow::Result<String> {
        if let Some(l) = config.lines().find_map(|l| l.strip_prefix("listen = \"")) {
            // A fixed address is TLS (or plain) before it answers (tests
            // that wait for it to come up use base()).
            let a = l.trim_end_matches('"');
            if !a.ends_with(":0") {
                self.register_addr(a);
            }
            // A port held for this server is its own now.
            if let Ok(mut h) = held_ports().lock() {
                h.remove(a);
            }
        }
        let cfg_path = self.dir.join(format!("{name}.toml"));
        let addr_file = self.dir.join(format!("{name}.addr"));
        let _ = std::fs::remove_file(&addr_file);
        // Its metrics port too is kept through the rewrite below.
        write(&cfg_path, &config)?;
        metrics_on_any_port(&cfg_path)?;
        let config = std::fs::read_to_string(&cfg_path)?;
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
            log_start: 0,
            env: self.env.clone(),
            held: None,
        };
        node.start(&self.exe)?;
        if !wait_for(Duration::from_secs(30), || {
            addr_file.exists() && std::fs::read_to_string(&addr_file).is_ok_and(|s| !s.is_empty())
        }) {
            anyhow::bail!("{name} did not start; see {}", node.log.display());
        }
        let addr = std::fs::read_to_string(&addr_file)?.trim().to_owned();
        // Pin the port, so a restart listens where the others connect
        // (the line that starts with `listen`, not `metrics_listen`).
        let pinned = config
            .split_inclusive('\n')
            .map(|l| match l.strip_prefix("listen = \"127.0.0.1:0\"") {
                Some(rest) => format!("listen = \"{addr}\"{rest}"),
                None => l.to_owned(),
            })
            .collect::<String>();
        write(&cfg_path, &pinned)?;
        node.addr = Some(addr.clone());
        self.nodes.insert(name.into(), node);
        self.register_addr(&addr);
        Ok(addr)
    }

    /// Records whether `addr` now speaks TLS (this deployment's PKI) or
    /// plain HTTP: tests run in parallel and ports are reused, so an
    /// address a finished test served over TLS may be plain now.
    fn register_addr(&self, addr: &str) {
        if let Ok(mut m) = tls_servers().lock() {
            match &self.pki {
                Some(p) => m.insert(addr.to_owned(), p.clone()),
                None => m.remove(addr),
            };
        }
    }

    /// This deployment's copy of the run's CA (its key, certificate and
    /// revocation list; its `ca.db` a link to the run's), made at the first
    /// call: for servers whose CA records are in a PostgreSQL database of
    /// this deployment's own. The CA directory holds the revocation list
    /// the server writes from its records, so servers with different
    /// records must not share one (the last to write undid the others'
    /// revocations, and a site revoked in one test got in again). On
    /// SQLite the records are the directory's `ca.db`, shared like the
    /// directory.
    fn own_ca_dir(&self) -> anyhow::Result<PathBuf> {
        let p = self
            .pki
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("a deployment without a CA"))?;
        let own = self.dir.join("ca");
        if !own.join("ca.key").exists() {
            std::fs::create_dir_all(&own)?;
            for f in ["ca.pem", "ca.key", "crl.pem"] {
                if p.dir.join(f).exists() {
                    std::fs::copy(p.dir.join(f), own.join(f))?;
                }
            }
            // The certificates the suite issues go into the run's `ca.db`;
            // the server takes them in from there (as a farm's server takes
            // in those issued with `rsctl ca` on its directory), so they
            // stay known and revocable through it.
            std::os::unix::fs::symlink(p.dir.join("ca.db"), own.join("ca.db"))?;
        }
        Ok(own)
    }

    /// Starts the application server (`extra`: more TOML); returns its address.
    /// Its store is on the engine [`store_engine`] names: a database of its
    /// own on the test process's PostgreSQL (its URL kept in
    /// `appserver/database.url`, where [`stored_ids`] finds it), or SQLite.
    pub fn appserver(&mut self, listen: &str, extra: &str) -> anyhow::Result<String> {
        let dir = self.dir.join("appserver");
        std::fs::create_dir_all(&dir)?;
        let url_file = dir.join("database.url");
        let database = match (self.store, std::fs::read_to_string(&url_file)) {
            (StoreEngine::Postgres, Ok(url)) => format!("database = \"{}\"\n", url.trim()),
            (StoreEngine::Postgres, Err(_)) => {
                let url = crate::postgres::Postgres::shared().database("appserver");
                write(&url_file, &url)?;
                format!("database = \"{url}\"\n")
            }
            (StoreEngine::Sqlite, _) => String::new(),
        };
        let mut cfg = format!(
            "id = \"rs.a1\"\nlisten = \"{listen}\"\ndata_dir = \"{}\"\n{database}{extra}\n",
            dir.display()
        );
        if self.pki.is_some() {
            cfg.push_str(&self.server_tls("appserver", "rs.a1", false)?);
            let ca = match self.store {
                StoreEngine::Postgres => self.own_ca_dir()?,
                StoreEngine::Sqlite => self.pki.as_ref().map(|p| p.dir.clone()).unwrap_or_default(),
            };
            cfg.push_str(&format!("\n[ca]\ndir = \"{}\"\n", ca.display()));
        }
        let a = self.server("appserver", Role::AppServer, cfg)?;
        self.appserver_addr = Some(a.clone());
        Ok(a)
    }

    /// Starts a member `name` of an application-server farm on the
    /// PostgreSQL database `database` (every member the same ID, `rs.a1`,
    /// the same certificate and key, in `farm/tls`: the farm is one
    /// server to those who talk to it or seal to it; and the same CA, its
    /// directory the deployment's unless `extra` has a `[ca]` of its own);
    /// returns its address. `stored_ids(dir/name)` reads the farm's store.
    pub fn farm_member(
        &mut self,
        name: &str,
        database: &str,
        extra: &str,
    ) -> anyhow::Result<String> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        write(&dir.join("database.url"), database)?;
        let mut cfg = format!(
            "id = \"rs.a1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ndatabase = \"{database}\"\n{extra}\n",
            dir.display()
        );
        // Bulk files in one directory for the farm (docs/operations.md).
        if !extra.contains("[bulk]") {
            cfg.push_str(&format!(
                "\n[bulk]\ndir = \"{}\"\n",
                self.dir.join("farm").join("bulk").display()
            ));
        }
        if self.pki.is_some() {
            cfg.push_str(&self.server_tls("farm", "rs.a1", false)?);
            // The deployment's CA directory, unless `extra` names another
            // (a copy of it on the member's own host).
            if !extra.contains("[ca]") {
                let ca = self.own_ca_dir()?;
                cfg.push_str(&format!("\n[ca]\ndir = \"{}\"\n", ca.display()));
            }
        }
        self.server(name, Role::AppServer, cfg)
    }

    /// A farm of two members, `a1` and `a2`, on `database`, with haproxy in
    /// front: (a1's address, a2's, the balancer).
    pub fn farm(
        &mut self,
        database: &str,
        extra: &str,
    ) -> anyhow::Result<(String, String, Haproxy)> {
        let a1 = self.farm_member("a1", database, extra)?;
        let a2 = self.farm_member("a2", database, extra)?;
        let lb = self.farm_balancer([&a1, &a2])?;
        Ok((a1, a2, lb))
    }

    /// Puts haproxy with packaging/haproxy/rs-farm.cfg in front
    /// of two farm members, on a free port; its address becomes the
    /// deployment's application server (what MLMs and enrollments use).
    pub fn farm_balancer(&mut self, members: [&str; 2]) -> anyhow::Result<Haproxy> {
        self.farm_balancer_at("127.0.0.1:0", members)
    }

    /// [`Deployment::farm_balancer`] listening on `bind` (port 0: a free one).
    pub fn farm_balancer_at(&mut self, bind: &str, members: [&str; 2]) -> anyhow::Result<Haproxy> {
        let h = self.balancer_at(bind, &members)?;
        self.appserver_addr = Some(h.addr.clone());
        Ok(h)
    }

    /// haproxy with packaging/haproxy/rs-farm.cfg (TCP
    /// passthrough) in front of two to four members of any tier's farm, on
    /// `bind`.
    pub fn balancer_at(&mut self, bind: &str, members: &[&str]) -> anyhow::Result<Haproxy> {
        anyhow::ensure!(
            (2..=4).contains(&members.len()),
            "packaging/haproxy/rs-farm.cfg takes two to four members, not {}",
            members.len()
        );
        let addr = if bind.ends_with(":0") {
            let l = std::net::TcpListener::bind(bind)?;
            l.local_addr()?.to_string()
        } else {
            bind.to_owned()
        };
        let log = std::fs::File::create(
            self.dir
                .join("logs")
                .join(format!("haproxy-{}.log", addr.replace([':', '.'], "-"))),
        )?;
        let mut haproxy = Command::new("haproxy");
        haproxy
            .arg("-db")
            .arg("-f")
            .arg(crate::repo_root().join("packaging/haproxy/rs-farm.cfg"))
            .env("RS_FARM_BIND", &addr);
        for i in 0..4 {
            let var = format!("RS_MEMBER{}", i + 1);
            match members.get(i) {
                Some(m) => haproxy.env(var, m),
                None => haproxy.env_remove(var),
            };
        }
        let child = haproxy
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("haproxy (Debian's haproxy package): {e}"))?;
        let h = Haproxy {
            child,
            addr: addr.clone(),
        };
        anyhow::ensure!(
            wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(
                &addr
            )
            .is_ok()),
            "haproxy did not start listening on {addr}"
        );
        self.register_addr(&addr);
        Ok(h)
    }

    /// The usual upper tiers: the application server and one MLM
    /// (`mlm`, `acme.m1`) under it, both as configured by default; returns
    /// their addresses.
    pub fn server_and_mlm(&mut self) -> anyhow::Result<(String, String)> {
        self.server_and_mlm_with("")
    }

    /// [`Self::server_and_mlm`], with `extra` in the server's
    /// configuration (`heartbeat_secs = 2`, say).
    pub fn server_and_mlm_with(&mut self, extra: &str) -> anyhow::Result<(String, String)> {
        let a = self.appserver("127.0.0.1:0", extra)?;
        let m = self.mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&a),
            &Extra::default(),
        )?;
        Ok((a, m))
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
            "id = \"{id}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nheartbeat_secs = 5\n{}\n[upstream]\nurls = [{}]\n{}\n{}\n{}",
            self.dir.join(name).display(),
            extra.top,
            self.urls(upstream),
            extra.upstream,
            extra.tables,
            self.server_tls(name, id, true)?
        );
        self.server(name, Role::Mlm, cfg)
    }

    /// Starts `n` MLMs `m1`...`mN` (their member names too), all with ID
    /// `id` under `upstream`: one farm on `database`. `extra(name)` adds to
    /// each member's configuration. Started in order (so `m1` is usually
    /// the first leader); returns their addresses in order.
    pub fn mlm_farm(
        &mut self,
        n: usize,
        id: &str,
        upstream: &[String],
        database: &str,
        extra: impl Fn(&str) -> Extra,
    ) -> anyhow::Result<Vec<String>> {
        (1..=n)
            .map(|i| {
                let name = format!("m{i}");
                let mut e = extra(&name);
                e.top = format!("database = \"{database}\"\nmember = \"{name}\"\n{}", e.top);
                self.mlm(&name, id, upstream, &e)
            })
            .collect()
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
        // With TLS the proxy enrolls on its first start: it makes its own
        // key and obtains its certificate with a one-time token (without an
        // application server to make tokens, the CA issues one directly).
        let (token, tls) = match &self.pki {
            None => (String::new(), String::new()),
            Some(p) => {
                let out = dir.join("tls");
                let mut t = TlsConfig::in_dir(&out);
                t.crl = None;
                let token = if out.join("cert.pem").exists() {
                    String::new()
                } else if self.appserver_addr.is_some() {
                    std::fs::create_dir_all(&out)?;
                    std::fs::copy(&p.admin.ca, &t.ca)?;
                    format!("enroll_token = \"{}\"\n", self.enrollment_token(id)?)
                } else {
                    t = p.issue(id, &out)?;
                    String::new()
                };
                (token, tls_toml(&t))
            }
        };
        write(
            &cfg_path,
            &format!(
                "id = \"{id}\"\ndata_dir = \"{}\"\nsocket = \"{}\"\nheartbeat_secs = 5\n{token}{}\n[upstream]\nurls = [{}]\n{}\n{}\n{tls}",
                dir.display(),
                socket.display(),
                extra.top,
                self.urls(upstream),
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
            log_start: 0,
            env: self.env.clone(),
            held: None,
        };
        let _ = std::fs::remove_file(&socket);
        node.start(&self.exe)?;
        if !wait_for(Duration::from_secs(30), || accepts(&socket)) {
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
            log_start: 0,
            env: self.env.clone(),
            held: None,
        };
        node.start(&self.exe)?;
        self.nodes.insert(name.into(), node);
        Ok(())
    }

    /// Where node `name` serves `/metrics`: its configuration's
    /// `metrics_listen`, or, for port 0, the address its log says it bound
    /// in this run (waiting up to 30 s for the line).
    pub fn metrics_addr(&mut self, name: &str) -> String {
        let node = self.node(name);
        let config = node.config.clone().expect("a node with a configuration");
        let text = std::fs::read_to_string(&config).unwrap_or_default();
        let configured = text
            .lines()
            .find_map(|l| l.strip_prefix("metrics_listen = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{}: no metrics_listen", config.display()))
            .to_owned();
        if !configured.ends_with(":0") {
            return configured;
        }
        let (log, start) = (node.log.clone(), node.log_start);
        let bound = || {
            let bytes = std::fs::read(&log).ok()?;
            let run = String::from_utf8_lossy(bytes.get(start as usize..)?).into_owned();
            let (_, rest) = run.rsplit_once("metrics on http://")?;
            Some(rest.split_once("/metrics")?.0.to_owned())
        };
        let mut found = None;
        wait_for(Duration::from_secs(30), || {
            found = bound();
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("{name}: no \"metrics on\" line in {}", log.display()))
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Starts a proxy with a configuration written elsewhere (by `rs-proxy
    /// enroll`, say), waiting until its socket accepts.
    pub fn start_proxy_with(
        &mut self,
        name: &str,
        config: &Path,
        socket: &Path,
    ) -> anyhow::Result<()> {
        let mut node = Node {
            name: name.into(),
            role: Role::Proxy,
            args: vec!["--config".into(), config.display().to_string()],
            log: self.dir.join("logs").join(format!("{name}.log")),
            child: None,
            addr: None,
            socket: Some(socket.to_owned()),
            config: Some(config.to_owned()),
            log_start: 0,
            env: self.env.clone(),
            held: None,
        };
        node.start(&self.exe)?;
        if !wait_for(Duration::from_secs(30), || accepts(socket)) {
            anyhow::bail!("{name} did not start; see {}", node.log.display());
        }
        self.nodes.insert(name.into(), node);
        Ok(())
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
            (None, Some(s)) => wait_for(Duration::from_secs(30), || accepts(&s)),
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

/// Which of `members` (an MLM farm's addresses) has received the most
/// envelopes (its `envelopes.received`): its index, and that count.
pub async fn busiest(members: &[String]) -> (usize, u64) {
    let mut top = (0, 0);
    for (k, m) in members.iter().enumerate() {
        let n = server_metrics(m)
            .await
            .ok()
            .and_then(|x| x.get("envelopes.received").copied())
            .unwrap_or(0);
        if n >= top.1 {
            top = (k, n);
        }
    }
    top
}

/// The metrics of a server's `/rs/v1/status` tree.
pub async fn server_metrics(addr: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let body = admin(addr)
        .get(format!("{}/rs/v1/status", base(addr)))
        .send()
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
    for section in ["spool", "upstream", "backchannel", "throttle", "seal"] {
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

/// The upstream URL a proxy's messages take now, as its status says
/// (`upstream.routes`); `None` if it does not answer.
pub async fn proxy_route(socket: &Path) -> Option<String> {
    let v = Client::new(socket).status().await.ok()?;
    v["upstream"]["routes"]
        .as_array()?
        .iter()
        .find(|r| r["messages"] == true)
        .and_then(|r| r["url"].as_str())
        .map(str::to_owned)
}

/// Every message ID stored by the application server, in storage order,
/// read from its database file (read-only).
pub fn stored_ids(appserver_dir: &Path) -> anyhow::Result<Vec<String>> {
    with_appserver_db(appserver_dir, |c| {
        c.rows(
            "SELECT id FROM messages ORDER BY seq",
            rs_store::params![],
            |r| r.get(0),
        )
    })
}

/// Runs `f` on a connection to what an application server stored, on
/// whichever engine it runs: its PostgreSQL database when `database.url`
/// names one (see [`Deployment::appserver`]), else its SQLite file (read
/// only). On a thread of its own: PostgreSQL's blocking client must not
/// run on a thread that drives async tasks.
pub fn with_appserver_db<T: Send>(
    appserver_dir: &Path,
    f: impl FnOnce(&mut rs_store::sql::Conn) -> Result<T, rs_store::db::DbError> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut conn = match std::fs::read_to_string(appserver_dir.join("database.url")) {
                Ok(url) => rs_store::sql::Conn::connect(&rs_store::sql::Location::Postgres {
                    url: url.trim().to_owned(),
                    schema: "appserver".into(),
                })?,
                Err(_) => rs_store::sql::Conn::sqlite(rusqlite::Connection::open_with_flags(
                    appserver_dir.join("appserver.db"),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?),
            };
            Ok(f(&mut conn)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("reading the server's store panicked"))?
    })
}

/// `PRAGMA integrity_check` of a SQLite file: "ok" when sound.
pub fn integrity(path: &Path) -> anyhow::Result<String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
}

/// True once a proxy's socket takes connections. The file appears at
/// `bind`, a moment before `listen`: a connection in between is refused.
fn accepts(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// The service manager's end of `NOTIFY_SOCKET` (what systemd reads a
/// `Type=notify` daemon's `READY=1`, `RELOADING=1`, `STOPPING=1`,
/// `STATUS=` and `WATCHDOG=1` from): a datagram socket whose messages are
/// collected in order. Give [`Notifications::env`] to one daemon.
#[derive(Debug)]
pub struct Notifications {
    path: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Notifications {
    pub fn bind(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Until the Notifications is dropped.
            while Arc::strong_count(&s) > 1 {
                if let Ok(n) = sock.recv(&mut buf)
                    && let Ok(mut v) = s.lock()
                {
                    v.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        Ok(Notifications { path, seen })
    }

    /// `NOTIFY_SOCKET` for the daemon.
    pub fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".into(), self.path.display().to_string())
    }

    /// Every message so far, in order.
    pub fn all(&self) -> Vec<String> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Messages received from `from` on (an index into [`Self::all`]).
    pub fn since(&self, from: usize) -> Vec<String> {
        self.all().into_iter().skip(from).collect()
    }

    /// Waits up to `timeout` for a message from `from` on with a line equal
    /// to `line` (`READY=1`); its index.
    pub fn wait(&self, from: usize, line: &str, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.all();
            if let Some(i) = (from..all.len()).find(|&i| all[i].lines().any(|l| l == line)) {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
