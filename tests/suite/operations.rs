//! Running the daemons as an operator does, on real processes: one daemon
//! per data directory, signals a service manager sends, configurations
//! refused at start rather than failing forever, counters that survive
//! restarts.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rs_tests::deploy::{Deployment, Extra, Notifications, proxy_metrics, wait_for};

use crate::backchannel::{exe, tmp};
use crate::forward::{alarm, all_stored, assert_exactly_once, register};

/// Runs a daemon role to its end (or kills it after `secs`); its exit
/// code (-1 if it had to be killed) and everything it printed.
pub(crate) fn run_role(role: &str, args: &[&str], secs: u64) -> (i32, String) {
    let out = std::env::temp_dir().join(format!(
        "rs-role-{}-{}.log",
        std::process::id(),
        fastrand::u64(..)
    ));
    let log = std::fs::File::create(&out).unwrap();
    let mut child = std::process::Command::new(exe())
        .arg(role)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let code = rs_tests::wait_or_kill(&mut child, Duration::from_secs(secs));
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    (code, text)
}

/// A copy of a server's configuration listening on a port of its own
/// (so only the data directory is shared).
fn on_another_port(config: &Path, to: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("listen = ") {
                "listen = \"127.0.0.1:0\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(to, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_copy_on_a_data_directory_is_refused_and_sighup_does_not_kill() {
    let dir = tmp("ops-lock");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (_a, m) = d.server_and_mlm().unwrap();
    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let mut ids = HashSet::new();
    ids.insert(c.send("alarm", &alarm("before", None)).await.unwrap());

    // A second copy of each daemon, on the same data directory.
    let proxy_cfg = dir.join("p1.toml");
    let (code, out) = run_role("proxy", &["--config", proxy_cfg.to_str().unwrap()], 30);
    assert_ne!(code, 0, "a second proxy started: {out}");
    assert!(
        out.contains("is in use by rs-proxy (pid") && out.contains("stop it first"),
        "{out}"
    );
    for (role, name, daemon) in [
        ("mlm", "mlm", "rs-mlm"),
        ("appserver", "appserver", "rs-appserver"),
    ] {
        let cfg = dir.join(format!("{name}-second.toml"));
        on_another_port(&dir.join(format!("{name}.toml")), &cfg);
        let (code, out) = run_role(role, &["--config", cfg.to_str().unwrap()], 30);
        assert_ne!(code, 0, "a second {role} started: {out}");
        assert!(
            out.contains(&format!("is in use by {daemon} (pid")),
            "{out}"
        );
    }
    // The first copies were not disturbed: the proxy still owns its socket.
    assert!(sock.exists());
    ids.insert(c.send("alarm", &alarm("after", None)).await.unwrap());

    // SIGHUP (a service manager's "reload") leaves every daemon serving.
    for n in ["p1", "mlm", "appserver"] {
        d.node(n).signal("HUP");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in ["p1", "mlm", "appserver"] {
        assert!(d.node(n).is_running(), "{n} died of SIGHUP");
        let log = std::fs::read_to_string(dir.join("logs").join(format!("{n}.log"))).unwrap();
        assert!(log.contains("SIGHUP"), "{n}: {log}");
    }
    ids.insert(c.send("alarm", &alarm("after hup", None)).await.unwrap());
    assert!(all_stored(&dir, &ids, Duration::from_secs(30)));
    assert_exactly_once(&dir, &ids);
    let pm = proxy_metrics(&sock).await.unwrap();
    assert_eq!(pm.get("spool.dead_letters"), Some(&0));
    // A killed daemon's lock goes with it: it starts again at once.
    d.restart("p1").unwrap();
    assert!(wait_for(Duration::from_secs(10), || sock.exists()));
    d.stop_all();
}

/// One HTTP/1.1 request on a fresh connection to `addr` with this `Host`;
/// the status code.
fn status_with_host(addr: &str, host: &str, method: &str, path: &str, body: &str) -> u16 {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// curl on the integrator socket as another user (uid `nobody`, group
/// `gid`, no other groups): its exit status and output.
fn curl_as(gid: u32, socket: &Path, path: &str) -> (i32, String) {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
        .args(["curl", "-sS", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://proxy{path}"))
        .output()
        .expect("setpriv and curl (scripts/packages installs curl)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The integrator API is for this host's integrators: on loopback TCP a
/// request naming another host (a web page's DNS rebinding) is refused,
/// and the Unix socket lets in the group the operator names, nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_integrator_api_refuses_foreign_hosts_and_its_socket_admits_its_group() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tmp("ops-api-access");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (_a, m) = d.server_and_mlm().unwrap();
    let port = crate::forward::free_port();
    // `daemon` (gid 1) is in every Debian base system.
    let sock = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&m),
            &Extra {
                top: format!(
                    "api_listen = \"{port}\"\nsocket_mode = \"0660\"\nsocket_group = \"daemon\"\n"
                ),
                ..Extra::default()
            },
        )
        .unwrap();
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "{:o}", meta.mode());
    assert_eq!(meta.gid(), 1);
    // A user in the group connects; one outside it is refused.
    let (code, out) = curl_as(1, &sock, "/v1/status");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"spool\""), "{out}");
    let (code, out) = curl_as(65534, &sock, "/v1/status");
    assert_ne!(code, 0, "{out}");

    // Loopback TCP: addressed as localhost or its address, served; under
    // any other name, refused and nothing done.
    let p = port.rsplit(':').next().unwrap().to_owned();
    for host in [format!("localhost:{p}"), port.clone(), format!("[::1]:{p}")] {
        assert_eq!(
            status_with_host(&port, &host, "GET", "/v1/status", ""),
            200,
            "{host}"
        );
    }
    let register = r#"{"name":"rebound","version":"1.0"}"#;
    for host in [
        format!("evil.example:{p}"),
        "evil.example".to_owned(),
        format!("localhost:{}", p.parse::<u16>().unwrap() + 1),
    ] {
        assert_eq!(
            status_with_host(&port, &host, "GET", "/v1/status", ""),
            403,
            "{host}"
        );
        assert_eq!(
            status_with_host(&port, &host, "POST", "/v1/integrators", register),
            403,
            "{host}"
        );
    }
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("p1").join("proxy.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM integrators WHERE name = 'rebound'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0, "a refused request registered an integrator");
    // The same request addressed properly does register it.
    assert_eq!(
        status_with_host(
            &port,
            &format!("localhost:{p}"),
            "POST",
            "/v1/integrators",
            register
        ),
        200
    );
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM integrators WHERE name = 'rebound'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    d.stop_all();
}

/// A unit file's values of `key` (every line, space-separated values).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// The shipped units pass `systemd-analyze verify`, and every path the
/// daemon writes with the shipped example configuration (its data
/// directory, the CA's, the proxy's socket, the configuration file that
/// configChange rewrites) is writable under the unit's ProtectSystem=strict
/// (a state, runtime or ReadWritePaths= directory). The CA directory
/// missing from the server's unit made every enrollment fail.
#[test]
fn the_systemd_units_verify_and_let_each_daemon_write_what_it_writes() {
    use std::path::PathBuf;
    let root = rs_tests::repo_root().join("packaging");
    let scratch = tmp("units");
    std::fs::create_dir_all(&scratch).unwrap();
    for (name, example) in [
        ("rs-appserver", "appserver.toml"),
        ("rs-mlm", "mlm.toml"),
        ("rs-proxy", "proxy.toml"),
    ] {
        let unit =
            std::fs::read_to_string(root.join("systemd").join(format!("{name}.service"))).unwrap();
        let text = std::fs::read_to_string(root.join("etc").join(example)).unwrap();
        assert_eq!(unit_values(&unit, "ProtectSystem"), ["strict"], "{name}");
        let exec = unit_values(&unit, "ExecStart");
        let config = PathBuf::from(&exec[exec.iter().position(|a| a == "--config").unwrap() + 1]);
        assert!(config.ends_with(example), "{name}: {config:?}");
        // The configuration is checked before every start.
        let pre = unit_values(&unit, "ExecStartPre");
        assert!(
            pre.iter()
                .any(|a| a == "check-config" || a == "--check-config")
                && pre.iter().any(|a| config == Path::new(a)),
            "{name}: ExecStartPre {pre:?}"
        );
        // It tells systemd when it serves, reloads and stops; a reload runs
        // the same check first, then SIGHUP.
        assert_eq!(unit_values(&unit, "Type"), ["notify"], "{name}");
        let reload = unit_values(&unit, "ExecReload");
        assert!(
            reload.starts_with(&pre) && reload.ends_with(&["-HUP".into(), "$MAINPID".into()]),
            "{name}: ExecReload {reload:?}"
        );
        // Longer than the drain it allows (shutdown_grace_secs).
        let stop: u64 = unit_values(&unit, "TimeoutStopSec")[0].parse().unwrap();
        assert!(stop > rs_node::daemon::default_grace_secs(), "{name}");
        let mut writable: Vec<PathBuf> = unit_values(&unit, "ReadWritePaths")
            .iter()
            .map(PathBuf::from)
            .collect();
        writable.extend(
            unit_values(&unit, "StateDirectory")
                .iter()
                .map(|d| PathBuf::from("/var/lib").join(d)),
        );
        writable.extend(
            unit_values(&unit, "RuntimeDirectory")
                .iter()
                .map(|d| PathBuf::from("/run").join(d)),
        );
        let writes: Vec<PathBuf> = match name {
            "rs-appserver" => {
                let c = rs_appserver::Config::parse(&text).unwrap();
                vec![c.data_dir.clone(), c.ca.unwrap().dir]
            }
            "rs-mlm" => {
                let c = rs_mlm::Config::parse(&text).unwrap();
                let t = c.tls.clone().unwrap();
                vec![
                    c.data_dir.clone(),
                    config.clone(),
                    t.cert,
                    t.key,
                    t.crl.unwrap(),
                ]
            }
            _ => {
                let c = rs_proxy::Config::parse(&text).unwrap();
                let t = c.tls.clone().unwrap();
                vec![
                    c.data_dir.clone(),
                    c.socket.clone(),
                    config.clone(),
                    t.cert,
                    t.key,
                ]
            }
        };
        for w in &writes {
            assert!(
                writable.iter().any(|d| w.starts_with(d)),
                "{name} writes {} but its unit lets it write only {writable:?}",
                w.display()
            );
        }
        // systemd-analyze verify, with a binary that exists here.
        let checked = scratch.join(format!("{name}.service"));
        std::fs::write(
            &checked,
            unit.replace(&format!("/usr/bin/{name}"), "/bin/true"),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&checked)
            .output()
            .expect("systemd-analyze (scripts/packages installs systemd)");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{name}: {said}"
        );
    }
}

/// The head of a POST whose `Content-Length` says `len`, on a TLS
/// connection as component `id`, and nothing more: the status of the
/// answer that comes within `wait` (0: none came).
fn head_only(addr: &str, id: &str, len: u64, wait: Duration) -> u16 {
    use std::io::{Read as _, Write as _};
    let t = rs_tests::deploy::component_tls(addr, id).unwrap().unwrap();
    let mut s = crate::security::raw_tls(addr, &t.ca, Some(&t), |_| {}).unwrap();
    s.get_ref().set_read_timeout(Some(wait)).unwrap();
    write!(
        s,
        "POST /rs/v1/envelope HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/related; boundary=b; type=\"text/xml\"\r\ncontent-length: {len}\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Configurations that cannot work are refused at start, and the MLM
/// takes `[limits]` like the server: an envelope whose Content-Length is
/// over a tier's limit is refused from its head, before a byte of the
/// body is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_upstreams_are_refused_at_start_and_oversized_envelopes_from_their_head() {
    let dir = tmp("ops-limits");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&a),
            &Extra {
                tables: "[limits]\nmax_envelope_bytes = 65536\n".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    // An MLM and a proxy with an upstream they cannot POST to, and a
    // proxy whose bulk route is none of its routes.
    for (role, name, text, key) in [
        (
            "mlm",
            "bad-mlm",
            format!(
                "id = \"acme.m9\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[upstream]\nurls = [\"ftp://{a}\"]\n",
                dir.join("bad-mlm").display()
            ),
            "upstream.urls",
        ),
        (
            "proxy",
            "bad-proxy",
            format!(
                "id = \"acme.p9\"\ndata_dir = \"{}\"\nsocket = \"{}\"\n[upstream]\nurls = [\"https://\"]\n",
                dir.join("bad-proxy").display(),
                dir.join("bad-proxy.sock").display()
            ),
            "upstream.urls",
        ),
        (
            "proxy",
            "bad-bulk-proxy",
            format!(
                "id = \"acme.p8\"\ndata_dir = \"{}\"\nsocket = \"{}\"\n[upstream]\nurls = [\"http://{a}\"]\nbulk_urls = [\"http://elsewhere.example:8441\"]\n",
                dir.join("bad-bulk-proxy").display(),
                dir.join("bad-bulk-proxy.sock").display()
            ),
            "upstream.bulk_urls",
        ),
    ] {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let (code, out) = run_role(role, &["--config", cfg.to_str().unwrap()], 30);
        assert_eq!(code, 1, "{role}: {out}");
        assert!(out.contains(key) && out.contains("is not"), "{role}: {out}");
    }

    // Over the MLM's configured limit, and over the server's default one.
    let (m2, a2) = (m.clone(), a.clone());
    let (mlm_status, server_status, mlm_within) = tokio::task::spawn_blocking(move || {
        (
            head_only(&m2, "acme.p1", 100_000, Duration::from_secs(10)),
            head_only(&a2, "acme.p1", 1 << 30, Duration::from_secs(10)),
            head_only(&m2, "acme.p1", 1000, Duration::from_secs(2)),
        )
    })
    .await
    .unwrap();
    assert_eq!(mlm_status, 413);
    assert_eq!(server_status, 413);
    // Within the limit, the tier waits for the body (no answer yet).
    assert_eq!(mlm_within, 0);
    d.stop_all();
}

/// `check-config` (each daemon's, through this executable's roles): the
/// shipped example configurations are good (exit 0, `ok`); a problem is
/// named with its file, line and key and exits 1, whether TOML's (an
/// unknown key) or a check after parsing (an ID of the wrong kind), and
/// nothing is started.
#[test]
fn check_config_names_the_file_line_and_key_of_a_problem() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (role, file) in [
        ("appserver", "appserver.toml"),
        ("mlm", "mlm.toml"),
        ("proxy", "proxy.toml"),
    ] {
        let good = root.join("packaging/etc").join(file);
        let (code, out) = run_role(
            role,
            &["--config", good.to_str().unwrap(), "--check-config"],
            30,
        );
        assert_eq!(code, 0, "{role}: {out}");
        assert!(out.contains(": ok"), "{role}: {out}");
    }
    let dir = std::env::temp_dir().join(format!("rs-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "mlm",
            "id = \"acme.m1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/nonexistent\"\nbogus = 1\n[upstream]\nurls = [\"http://127.0.0.1:1\"]\n",
            ":4: unknown field `bogus`",
        ),
        (
            "proxy",
            "id = \"acme.m7\"\ndata_dir = \"/nonexistent\"\nsocket = \"/nonexistent/s\"\n[upstream]\nurls = [\"http://127.0.0.1:1\"]\n",
            ":1: id: ",
        ),
    ];
    // Every problem found after parsing is named, each on its own line.
    let f = dir.join("several.toml");
    std::fs::write(
        &f,
        "id = \"acme.m7\"\ndata_dir = \"/nonexistent\"\nsocket = \"/nonexistent/s\"\napi_listen = \"10.0.0.1:8449\"\nheartbeat_secs = 0\n[upstream]\nurls = [\"ftp://127.0.0.1:1\"]\n",
    )
    .unwrap();
    let (code, out) = run_role(
        "proxy",
        &["--config", f.to_str().unwrap(), "--check-config"],
        30,
    );
    assert_eq!(code, 1, "{out}");
    for want in [
        ":1: id: ",
        ":4: api_listen: ",
        ":5: heartbeat_secs: ",
        ":7: upstream.urls: ",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{}{want}", f.display()))),
            "wanted a line {want:?} in {out}"
        );
    }
    for (role, text, want) in cases {
        let f = dir.join(format!("{role}.toml"));
        std::fs::write(&f, text).unwrap();
        let (code, out) = run_role(
            role,
            &["--config", f.to_str().unwrap(), "--check-config"],
            30,
        );
        assert_eq!(code, 1, "{role}: {out}");
        assert!(
            out.contains(&format!("{}{want}", f.display())),
            "{role}: wanted {want:?} in {out}"
        );
        assert!(!Path::new("/nonexistent").exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload as a service manager does it (`systemctl reload`: the unit's
/// `ExecReload` checks the file, then SIGHUP; `Type=notify`): a bad file is
/// refused with its file, line and key in the service's status and the
/// daemon goes on with the configuration in force; a good one is taken up
/// through the start-up code (`RELOADING=1`, then `READY=1`) while
/// integrators keep sending and clients keep connecting: nobody is
/// refused, nothing is lost or stored twice. SIGTERM says `STOPPING=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_up_a_good_configuration_without_refusing_anyone_and_keeps_a_bad_ones_daemon_serving()
 {
    let dir = tmp("ops-reload");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let na = Notifications::bind(dir.join("appserver.notify")).unwrap();
    d.env = vec![na.env()];
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let nm = Notifications::bind(dir.join("mlm.notify")).unwrap();
    d.env = vec![nm.env(), ("WATCHDOG_USEC".into(), "1000000".into())];
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&a),
            &Extra {
                tables: "[limits]\nmax_envelope_bytes = 65536\n".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    let np = Notifications::bind(dir.join("p1.notify")).unwrap();
    d.env = vec![np.env()];
    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    d.env.clear();
    let wait = Duration::from_secs(30);
    for (n, what) in [(&na, "appserver"), (&nm, "mlm"), (&np, "p1")] {
        assert!(
            n.wait(0, "READY=1", wait).is_some(),
            "{what}: {:?}",
            n.all()
        );
    }
    // The watchdog is pinged while the MLM's storage answers.
    assert!(nm.wait(0, "WATCHDOG=1", wait).is_some(), "{:?}", nm.all());
    let limit_of_mlm = |len| {
        let m = m.clone();
        tokio::task::spawn_blocking(move || head_only(&m, "acme.p1", len, Duration::from_secs(2)))
    };
    assert_eq!(limit_of_mlm(100_000).await.unwrap(), 413);

    // Load beside every reload: an integrator sending, and clients opening
    // a fresh connection to the MLM for each request.
    let stop = tokio_util::sync::CancellationToken::new();
    let c = register(&sock).await;
    let sending = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ids, mut failed) = (HashSet::new(), Vec::new());
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                match c
                    .send("alarm", &alarm(&format!("through reloads {i}"), None))
                    .await
                {
                    Ok(id) => {
                        ids.insert(id);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ids, failed)
        })
    };
    let asking = {
        let stop = stop.clone();
        let t = rs_tests::deploy::component_tls(&m, "acme.p1").unwrap();
        let client = rs_net::tls::client(t.as_ref())
            .unwrap()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let url = format!("{}/rs/v1/health", rs_tests::deploy::base(&m));
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.is_cancelled() {
                match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(rs_net::http::error_chain(&e)),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A bad file: refused, with its file, line and key; the old one holds.
    let cfg = dir.join("mlm.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("bogus = 1\n{good}")).unwrap();
    let from = nm.all().len();
    d.node("mlm").signal("HUP");
    let why = format!(
        "STATUS=serving; reload refused: {}:1: unknown field `bogus`",
        cfg.display()
    );
    assert!(
        wait_for(wait, || nm.since(from).iter().any(|m| m.contains(&why))),
        "{:?}",
        nm.since(from)
    );
    assert!(!nm.since(from).iter().any(|m| m.contains("RELOADING=1")));
    assert_eq!(limit_of_mlm(100_000).await.unwrap(), 413);
    let log = std::fs::read_to_string(dir.join("logs/mlm.log")).unwrap();
    assert!(
        log.contains("the configuration is refused, going on with the one in force"),
        "{log}"
    );

    // A good one: taken up, each daemon in turn, under the load.
    std::fs::write(
        &cfg,
        good.replace("max_envelope_bytes = 65536", "max_envelope_bytes = 1048576"),
    )
    .unwrap();
    for (name, n) in [("mlm", &nm), ("p1", &np), ("appserver", &na)] {
        let from = n.all().len();
        d.node(name).signal("HUP");
        let r = n.wait(from, "RELOADING=1", wait);
        assert!(r.is_some(), "{name}: {:?}", n.since(from));
        assert!(
            n.wait(r.unwrap() + 1, "READY=1", wait).is_some(),
            "{name}: {:?}",
            n.since(from)
        );
        assert!(d.node(name).is_running(), "{name}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Over 65536 bytes is now within the MLM's limit: it waits for the body.
    assert_eq!(limit_of_mlm(100_000).await.unwrap(), 0);

    stop.cancel();
    let (ids, send_failed) = sending.await.unwrap();
    let (asked, ask_failed) = asking.await.unwrap();
    assert!(
        send_failed.is_empty(),
        "sends failed during reloads: {send_failed:?}"
    );
    assert!(
        ask_failed.is_empty(),
        "requests failed during reloads: {ask_failed:?}"
    );
    assert!(
        ids.len() > 100 && asked > 100,
        "{} sent, {asked} asked",
        ids.len()
    );
    assert!(all_stored(&dir, &ids, Duration::from_secs(60)));
    assert_exactly_once(&dir, &ids);

    // SIGTERM: the service manager hears the daemon is stopping.
    let from = nm.all().len();
    d.node("mlm").stop(Duration::from_secs(20));
    assert!(
        nm.wait(from, "STOPPING=1", wait).is_some(),
        "{:?}",
        nm.since(from)
    );
    d.stop_all();
}

/// SIGTERM while integrators send: what the proxy accepted is delivered
/// within its grace before it exits (its spool is empty once it is
/// gone), an MLM stopped and started again under the load loses nothing,
/// and every accepted message is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_within_the_grace_and_loses_nothing() {
    let dir = tmp("ops-sigterm");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (_a, m) = d.server_and_mlm().unwrap();
    let sock = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&m),
            &Extra {
                top: "shutdown_grace_secs = 15\n".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    let send_for = |sock: std::path::PathBuf, ms: u64| async move {
        let c = register(&sock).await;
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        let mut ids = HashSet::new();
        let mut i = 0;
        while tokio::time::Instant::now() < until {
            i += 1;
            // Refused while the proxy stops: not accepted, not counted.
            if let Ok(id) = c
                .send("alarm", &alarm(&format!("under load {i}"), None))
                .await
            {
                ids.insert(id);
            }
        }
        ids
    };
    let mut ids = HashSet::new();
    // The MLM stopped (SIGTERM) and started again while the proxy sends.
    let load = tokio::spawn(send_for(sock.clone(), 4000));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.node("mlm").stop(Duration::from_secs(20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.restart("mlm").unwrap();
    ids.extend(load.await.unwrap());
    // The proxy stopped under load: it drains before it exits.
    let load = tokio::spawn(send_for(sock.clone(), 3000));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.node("p1").stop(Duration::from_secs(30));
    ids.extend(load.await.unwrap());
    let (ok, text) = rs_proxy::verify_spool(&dir.join("p1").join("spool.db")).unwrap();
    assert!(ok && text.contains("waiting: 0"), "{text}");
    let log = std::fs::read_to_string(dir.join("logs/p1.log")).unwrap();
    assert!(!log.contains("grace over"), "{log}");
    d.restart("p1").unwrap();
    assert!(ids.len() > 100, "{}", ids.len());
    assert!(all_stored(&dir, &ids, Duration::from_secs(60)));
    assert_exactly_once(&dir, &ids);
    d.stop_all();
}

/// A site in one step: on a machine with the package's default
/// configuration, `rs-proxy enroll --server URL --token T` obtains the
/// certificate and the ID, writes a configuration the proxy starts with
/// (keeping what the file had), and the proxy sends with it. A spent or
/// bad token changes nothing; an enrolled site is not enrolled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_enrolls_in_one_step_and_its_proxy_sends() {
    let dir = tmp("ops-enroll");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (_a, m) = d.server_and_mlm().unwrap();
    let pki = d.pki.clone().unwrap();
    let site = dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    // What the package installs: the commented default configuration.
    let config = site.join("proxy.toml");
    let packaged = rs_tests::repo_root().join("packaging/etc/proxy.toml");
    std::fs::copy(&packaged, &config).unwrap();
    let packaged_text = std::fs::read_to_string(&config).unwrap();
    let (data, socket) = (site.join("state"), site.join("rs-proxy.sock"));
    let me = rs_tests::whoami();
    let enroll = |token: &str| {
        run_role(
            "rs-proxy",
            &[
                "enroll",
                "--server",
                &format!("https://{m}"),
                "--token",
                token,
                "--ca",
                pki.admin.ca.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
                "--user",
                &me,
                "--no-start",
            ],
            60,
        )
    };
    // A bad token: refused, and the file is as the package left it.
    let (code, out) = enroll("rse_not-a-token");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("enrollment"), "{out}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), packaged_text);

    let token = d.enrollment_token("acme.p7").unwrap();
    let (code, out) = enroll(&token);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("enrolled as acme.p7"), "{out}");
    let written = std::fs::read_to_string(&config).unwrap();
    let c = rs_proxy::Config::parse(&written).unwrap();
    assert_eq!(c.id.as_deref(), Some("acme.p7"));
    assert_eq!(c.upstream.urls, [format!("https://{m}")]);
    assert!(c.enroll_token.is_none(), "the spent token is not kept");
    // What the operator had in the file is kept (the package's socket mode).
    let packaged_cfg: toml::Table = packaged_text.parse().unwrap();
    assert_eq!(
        Some(c.socket_mode.as_str()),
        packaged_cfg
            .get("socket_mode")
            .and_then(|v| v.as_str())
            .or(Some("0660"))
    );
    let key = c.tls.as_ref().unwrap().key.clone();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o077,
        0
    );
    let (code, out) = run_role(
        "proxy",
        &["--config", config.to_str().unwrap(), "--check-config"],
        30,
    );
    assert_eq!(code, 0, "{out}");

    // Enrolled: not again (its certificate is not replaced).
    let cert = std::fs::read(&c.tls.as_ref().unwrap().cert).unwrap();
    let (code, out) = enroll(&d.enrollment_token("acme.p8").unwrap());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("enrolled already"), "{out}");
    assert_eq!(std::fs::read(&c.tls.as_ref().unwrap().cert).unwrap(), cert);

    // The proxy starts with what was written, and sends.
    d.start_proxy_with("site", &config, &socket).unwrap();
    let client = register(&socket).await;
    let mut ids = HashSet::new();
    ids.insert(
        client
            .send("alarm", &alarm("from a site enrolled in one step", None))
            .await
            .unwrap(),
    );
    assert!(all_stored(&dir, &ids, Duration::from_secs(30)));
    d.stop_all();
}

/// Queue health at the centre: a site whose spool fills (its messages held
/// back by a closed throttle window, its heartbeats still going up) is
/// listed by `rsctl components --at-risk` with how full it is within a
/// heartbeat or two, and with what it drops once it overflows; a healthy
/// site is not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_spool_fills_or_drops_is_listed_at_risk() {
    use crate::backchannel_faults::rsctl;
    let dir = tmp("ops-at-risk");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm_with("heartbeat_secs = 2").unwrap();
    // A window that is closed now: six hours from now, for a minute.
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
        % 1440;
    let (at, until) = ((minute + 360) % 1440, (minute + 361) % 1440);
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        at / 60,
        at % 60,
        until / 60,
        until % 60
    );
    let s1 = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&m),
            &Extra {
                tables: format!(
                    "[spool]\nmax_bytes = 200000\n[[throttle.rule]]\nname = \"later\"\nclass = \"held\"\nwindow = \"{window}\"\n"
                ),
                ..Extra::default()
            },
        )
        .unwrap();
    let s2 = d
        .proxy("p2", "acme.p2", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let held = |i: usize| rs_proxy::api::SendRequest {
        integrator: "suite".into(),
        class: Some("held".into()),
        mime: Some("text/plain".into()),
        data: Some(format!("{i:05} {}", "x".repeat(10_000))),
        precedence: Some(2),
        ..Default::default()
    };
    let c1 = register(&s1).await;
    let c2 = register(&s2).await;
    c2.send("alarm", &alarm("a healthy site", None))
        .await
        .unwrap();
    // 17 messages of 10 kB: about 85% of the 200 kB spool.
    for i in 0..17 {
        c1.send("data", &held(i)).await.unwrap();
    }
    let listed = |want: &'static str| {
        let a = a.clone();
        wait_for(Duration::from_secs(60), move || {
            let (_, out, _) = rsctl(&a, &["components", "--at-risk"]);
            out.lines()
                .any(|l| l.starts_with("acme.p1 ") && l.contains(want))
        })
    };
    assert!(
        listed("% full"),
        "{:?}",
        rsctl(&a, &["components", "--at-risk"])
    );
    let (_, out, _) = rsctl(&a, &["components", "--at-risk"]);
    assert!(
        !out.lines()
            .any(|l| l.starts_with("acme.p2 ") || l.starts_with("acme.m1 ")),
        "{out}"
    );
    let (_, all, _) = rsctl(&a, &["components"]);
    assert!(all.contains("acme.p2"), "{all}");
    // Overflowing: older held messages are evicted for the new ones (the
    // next heartbeat says so, then the one after says nothing more was).
    for i in 17..40 {
        c1.send("data", &held(i)).await.unwrap();
    }
    let pm = proxy_metrics(&s1).await.unwrap();
    assert!(
        pm.get("spool.evicted_total").is_some_and(|n| *n > 0),
        "{pm:?}"
    );
    assert!(
        listed("dropped since the last heartbeat"),
        "{}",
        rsctl(&a, &["components", "--at-risk"]).1
    );
    // The control API says the same, and refuses what it does not know.
    let body = rs_tests::deploy::admin(&a)
        .get(format!(
            "{}/rs/v1/control/components?at_risk=1",
            rs_tests::deploy::base(&a)
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("id=\"acme.p1\"") && body.contains("at-risk=\""),
        "{body}"
    );
    assert!(!body.contains("id=\"acme.p2\""), "{body}");
    let bad = rs_tests::deploy::admin(&a)
        .get(format!(
            "{}/rs/v1/control/components?at_risk=maybe",
            rs_tests::deploy::base(&a)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    d.stop_all();
}

/// Logs a journal or a log shipper can read: plain text without terminal
/// escapes when not on a terminal, and with `RS_LOG_FORMAT=json` one JSON
/// object per line with the time, level, target and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_plain_off_a_terminal_and_json_lines_when_asked() {
    let dir = tmp("ops-logs");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    d.env = vec![("RS_LOG_FORMAT".into(), "json".into())];
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    d.env.clear();
    let _m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&a),
            &Extra::default(),
        )
        .unwrap();
    d.stop_all();
    let json = std::fs::read_to_string(dir.join("logs/appserver.log")).unwrap();
    let mut lines = 0;
    for l in json.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["timestamp"].is_string()
                && v["level"].is_string()
                && v["target"].is_string()
                && v["fields"]["message"].is_string(),
            "{l}"
        );
        lines += 1;
    }
    assert!(
        json.contains("\"level\":\"INFO\"") && json.contains("listening on") && lines >= 3,
        "{json}"
    );
    let text = std::fs::read_to_string(dir.join("logs/mlm.log")).unwrap();
    assert!(
        text.contains(" INFO ") && !text.contains('\u{1b}'),
        "{text}"
    );
}

/// Issue 25, tracing: `rsctl trace` shows the hops and times a stored
/// message took through the tiers, and for one still on its way where it
/// waits: a job's copy queued for an MLM that is down, then its
/// destination's answer once the MLM is back; `rs-proxy trace` at the
/// site says a message is spooled and why (the next hop's error), or sent
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsctl_trace_shows_a_messages_hops_and_where_it_waits() {
    use crate::backchannel::attr;
    use crate::backchannel_faults::rsctl;
    let dir = tmp("ops-trace");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let id = c.send("alarm", &alarm("traced", None)).await.unwrap();
    let ids: HashSet<String> = [id.clone()].into();
    assert!(all_stored(&dir, &ids, Duration::from_secs(30)));

    // Stored: created at the source, through the MLM, stored here; in
    // time order, each line with its time since the one before.
    let (code, out, err) = rsctl(&a, &["trace", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stored at the server"), "{out}");
    let at = |what: &str, who: &str| {
        out.lines()
            .position(|l| l.contains(who) && l.split_whitespace().any(|w| w == what))
            .unwrap_or_else(|| panic!("no {who} {what}: {out}"))
    };
    let steps = [
        at("created", "acme.p1"),
        at("received", "acme.m1"),
        at("sent", "acme.m1"),
        at("stored", "rs.a1"),
    ];
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert!(out.contains(" ms"), "{out}");
    // The site: sent on.
    let socket = sock.to_str().unwrap();
    let (code, out) = run_role("rs-proxy", &["trace", &id, "--socket", socket], 30);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sent on"), "{out}");

    // With the MLM down, a new alarm waits at the site, and says why; the
    // server has never seen it.
    d.node("mlm").kill();
    let waiting = c.send("alarm", &alarm("stuck", None)).await.unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || {
            let (_, out) = run_role("rs-proxy", &["trace", &waiting, "--socket", socket], 30);
            out.contains("waiting in this proxy's spool") && out.contains("does not answer")
        }),
        "{}",
        run_role("rs-proxy", &["trace", &waiting, "--socket", socket], 30).1
    );
    let (code, out, err) = rsctl(&a, &["trace", &waiting]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("not at this server"), "{out}");

    // A job sent down while the MLM is down waits here for it.
    let r = rs_tests::deploy::admin(&a)
        .post(format!("{}/rs/v1/control/send", rs_tests::deploy::base(&a)))
        .body(r#"<send><to id="acme.p1"/><control action="ping"/></send>"#)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    let job_message = attr(&body, "message").to_owned();
    let (code, out, err) = rsctl(&a, &["trace", &job_message]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("on its way down"), "{out}");
    // The documents as the API gives them are what control-api.dtd says.
    for (name, m) in [("stored", &id), ("waiting", &job_message)] {
        let doc = rs_tests::deploy::admin(&a)
            .get(format!(
                "{}/rs/v1/control/messages/{m}/trace",
                rs_tests::deploy::base(&a)
            ))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        rs_tests::assert_control_api_valid(&doc, &dir.join(format!("trace-{name}.xml")));
    }
    assert!(out.contains("queued") && out.contains("ping"), "{out}");
    assert!(out.contains("waits at rs.a1 for acme.m1"), "{out}");

    // Back: the alarm arrives, the ping is answered, and the traces say so.
    d.restart("mlm").unwrap();
    let ids: HashSet<String> = [waiting.clone()].into();
    assert!(all_stored(&dir, &ids, Duration::from_secs(60)));
    assert!(
        wait_for(Duration::from_secs(60), || {
            let (_, out, _) = rsctl(&a, &["trace", &job_message]);
            out.contains("every destination is final") && out.contains("succeeded")
        }),
        "{}",
        rsctl(&a, &["trace", &job_message]).1
    );
    let (_, out, _) = rsctl(&a, &["trace", &waiting]);
    assert!(out.contains("stored at the server"), "{out}");
    // A malformed ID is the client's mistake.
    let (code, _, err) = rsctl(&a, &["trace", "not an id"]);
    assert_ne!(code, 0);
    assert!(err.contains("400") || err.contains("message ID"), "{err}");
}

/// Issue 24, a member's memory bound: above `memory_limit_mb` an MLM
/// accepts no new connection (a request waits in the accept queue rather
/// than being served, and /metrics, on its own listener, says so); a
/// reload with a bound it is under serves the connection that waited,
/// refusing no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlm_over_its_memory_bound_accepts_nothing_new_until_it_is_under() {
    let dir = tmp("ops-membound");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&a),
            &Extra {
                top: "memory_limit_mb = 1".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    let health = format!("http://{m}/rs/v1/health");
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let e = quick.get(&health).send().await;
    assert!(
        e.as_ref().is_err_and(reqwest::Error::is_timeout),
        "served over its bound: {e:?}"
    );
    let mx = d.metrics_addr("mlm");
    let s = crate::metrics::scrape(&mx).await;
    assert_eq!(
        crate::metrics::get(&s, "rs_memory_over_bound"),
        1.0,
        "{s:?}"
    );
    assert!(
        crate::metrics::get(&s, "rs_memory_bound_closed_total") >= 1.0,
        "{s:?}"
    );
    assert!(
        crate::metrics::get(&s, "rs_memory_resident_bytes")
            > crate::metrics::get(&s, "rs_memory_bound_bytes"),
        "{s:?}"
    );

    // A request that waits meanwhile is served once the bound is raised.
    let waiting = tokio::spawn(async move {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .get(&health)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cfg = dir.join("mlm.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("memory_limit_mb = 1\n", "memory_limit_mb = 65536\n"),
    )
    .unwrap();
    d.node("mlm").signal("HUP");
    assert_eq!(waiting.await.unwrap().unwrap(), 200);
    let e = quick.get(format!("http://{m}/rs/v1/health")).send().await;
    assert_eq!(e.unwrap().status(), 200);
    assert!(
        wait_for(Duration::from_secs(10), || {
            let s = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(crate::metrics::scrape(&mx))
            });
            crate::metrics::get(&s, "rs_memory_over_bound") == 0.0
        }),
        "still over"
    );
}

/// The endpoint and /metrics both on port 0: a reload hands each listener
/// back to its own purpose (they were once kept under one key, and the
/// endpoint came back on the metrics socket while clients were refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_gives_two_listeners_on_port_zero_back_their_own_sockets() {
    let dir = tmp("ops-port0");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d
        .appserver("127.0.0.1:0", "metrics_listen = \"127.0.0.1:0\"\n")
        .unwrap();
    // Unpinned again: both listeners as configured, on port 0.
    let cfg = dir.join("appserver.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(&format!("listen = \"{a}\""), "listen = \"127.0.0.1:0\""),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("listen = \"127.0.0.1:0\"\n")
    );
    let health = format!("http://{a}/rs/v1/health");
    assert_eq!(reqwest::get(&health).await.unwrap().status(), 200);
    let mx = d.metrics_addr("appserver");
    crate::metrics::scrape(&mx).await;
    d.node("appserver").signal("HUP");
    let log = dir.join("logs").join("appserver.log");
    assert!(
        wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.matches("listening on").count() >= 2)
        }),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for _ in 0..20 {
        let r = reqwest::get(&health).await;
        assert_eq!(
            r.map(|r| r.status().as_u16()).ok(),
            Some(200),
            "after the reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("appserver.addr"))
            .unwrap()
            .trim(),
        a,
        "the endpoint moved"
    );
    // /metrics too stays where it was: its listener is taken before the
    // reload closes what nobody took (it was once bound by a task that
    // ran after that, and came back on another port, or not at all).
    let r = reqwest::get(format!("http://{mx}/metrics")).await;
    assert_eq!(
        r.map(|r| r.status().as_u16()).ok(),
        Some(200),
        "/metrics after the reload"
    );
    assert_eq!(d.metrics_addr("appserver"), mx, "/metrics moved");
}

/// Issue 27, rsctl: the queries a script needs (messages, export paged by
/// cursor, subscriptions and their feed, tasks, certificates, audit) as
/// commands, each printed as a table for people, or as the control API's
/// document in JSON or XML (`--output`), the same for every command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsctl_answers_queries_as_tables_json_and_xml_and_pages_an_export() {
    use crate::backchannel_faults::rsctl;
    let json = |a: &str, args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let (code, out, err) = rsctl(a, &all);
        assert_eq!(code, 0, "rsctl {args:?}: {out}{err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let ids_in = |v: &serde_json::Value, path: &[&str]| -> Vec<String> {
        let mut at = v;
        for p in path {
            at = &at[*p];
        }
        at.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let dir = tmp("ops-rsctl-out");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let mut sent = HashSet::new();
    for i in 0..5 {
        sent.insert(
            c.send("alarm", &alarm(&format!("out{i}"), None))
                .await
                .unwrap(),
        );
    }
    assert!(all_stored(&dir, &sent, Duration::from_secs(30)));

    // messages: the same five, as JSON, as the server's XML, as a table.
    let v = json(&a, &["messages", "--type", "alarm", "--customer", "acme"]);
    let got: HashSet<String> = ids_in(&v, &["messages", "message"]).into_iter().collect();
    assert_eq!(got, sent, "{v}");
    assert_eq!(v["messages"]["message"][0]["alarm"][0]["severity"], "major");
    let (code, out, err) = rsctl(&a, &["-o", "xml", "messages", "--type", "alarm"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("<?xml") && out.contains("<messages count=\"5\""),
        "{out}"
    );
    let (code, out, err) = rsctl(&a, &["messages", "--type", "alarm"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("RECEIVED"), "{out}");
    assert!(sent.iter().all(|id| out.contains(id.as_str())), "{out}");

    // export, paged: 3, then from the cursor the other 2; none twice.
    let page = |after: &str, limit: Option<&str>| {
        let mut args = vec![
            "-o",
            "json",
            "export",
            "--customer",
            "acme",
            "--type",
            "alarm",
        ];
        args.extend(["--after", after]);
        if let Some(l) = limit {
            args.extend(["--limit", l]);
        }
        let (code, out, err) = rsctl(&a, &args);
        assert_eq!(code, 0, "{out}{err}");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let (end, msgs) = lines.split_last().expect("an end line");
        let ids: Vec<String> = msgs
            .iter()
            .map(|m| m["message"]["id"].as_str().unwrap().to_owned())
            .collect();
        (ids, end["end"].clone())
    };
    let (first, end) = page("0", Some("3"));
    assert_eq!(first.len(), 3, "{end}");
    assert_eq!(end["complete"], "no", "{end}");
    let next = end["next"].as_str().unwrap().to_owned();
    let (rest, end) = page(&next, None);
    assert_eq!(end["complete"], "yes", "{end}");
    let all: Vec<String> = first.iter().chain(&rest).cloned().collect();
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(all.iter().cloned().collect::<HashSet<_>>(), sent);

    // A feed subscription gets what is stored from then on, once each;
    // acknowledged by cursor, it is not handed out again.
    let v = json(
        &a,
        &[
            "subscriptions",
            "set",
            "noc",
            "--delivery",
            "feed",
            "--type",
            "alarm",
        ],
    );
    assert_eq!(
        v["subscriptions"]["subscription"][0]["delivery"], "feed",
        "{v}"
    );
    let later: Vec<String> = vec![
        c.send("alarm", &alarm("later0", None)).await.unwrap(),
        c.send("alarm", &alarm("later1", None)).await.unwrap(),
    ];
    assert!(all_stored(
        &dir,
        &later.iter().cloned().collect(),
        Duration::from_secs(30)
    ));
    let mut fed = Vec::new();
    let mut cursor = "0".to_owned();
    for _ in 0..10 {
        let v = json(
            &a,
            &[
                "subscriptions",
                "feed",
                "noc",
                "--after",
                &cursor,
                "--wait",
                "5",
            ],
        );
        fed.extend(ids_in(&v, &["messages", "message"]));
        cursor = v["messages"]["cursor"]
            .as_str()
            .unwrap_or(&cursor)
            .to_owned();
        if fed.len() >= 2 {
            break;
        }
    }
    // (In storage order, which the proxy's parallel envelopes may make
    // other than the order they were sent in.)
    let (mut fed_sorted, mut later_sorted) = (fed.clone(), later.clone());
    fed_sorted.sort();
    later_sorted.sort();
    assert_eq!(
        fed_sorted, later_sorted,
        "the feed: what came after, once each"
    );
    let v = json(&a, &["subscriptions", "feed", "noc", "--after", &cursor]);
    assert!(ids_in(&v, &["messages", "message"]).is_empty(), "{v}");
    let v = json(&a, &["subscriptions", "list"]);
    let subs = v["subscriptions"]["subscription"].as_array().unwrap();
    assert!(subs.iter().any(|s| s["name"] == "noc"), "{v}");

    // Tasks: none failed; components, certificates and the audit log.
    let v = json(&a, &["tasks", "list", "--state", "failed"]);
    assert_eq!(v["tasks"]["count"], "0", "{v}");
    let v = json(&a, &["tasks", "replay"]);
    assert_eq!(v["replayed"]["count"], "0", "{v}");
    let v = json(&a, &["components"]);
    assert!(
        ids_in(&v, &["components", "component"]).contains(&"acme.p1".to_owned()),
        "{v}"
    );
    let v = json(&a, &["certificates", "--name", "acme.p1"]);
    let certs = v["certificates"]["certificate"].as_array().unwrap();
    assert!(
        !certs.is_empty() && certs.iter().all(|c| c["name"] == "acme.p1"),
        "{v}"
    );
    let v = json(&a, &["audit", "--limit", "5"]);
    let entries = v["audit"]["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 5, "{v}");
    assert!(
        entries
            .iter()
            .any(|e| e["path"].as_str().unwrap().contains("/subscriptions")),
        "{v}"
    );

    // A job, watched: progress on stderr, the final job as JSON; then in
    // the list of jobs with its counts.
    let (code, out, err) = rsctl(
        &a,
        &["-o", "json", "send", "ping", "--to", "acme.p1", "--watch"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let job: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(job["job"]["state"], "done", "{job}");
    assert!(err.contains("acme.p1"), "progress on stderr: {err}");
    let id = job["job"]["id"].as_str().unwrap().to_owned();
    let v = json(&a, &["jobs", "list", "--state", "done"]);
    let listed = v["jobs"]["job"]
        .as_array()
        .and_then(|l| l.iter().find(|j| j["id"] == id.as_str()).cloned())
        .unwrap_or_else(|| panic!("job {id} not listed: {v}"));
    assert_eq!(listed["succeeded"], "1", "{listed}");
    assert_eq!(listed["targets"], "1", "{listed}");
    let v = json(&a, &["jobs", "list", "--state", "running"]);
    assert!(
        !v.to_string().contains(id.as_str()),
        "a done job listed as running: {v}"
    );

    // Results with no document: fields, as JSON or as one element.
    let v = json(&a, &["subscriptions", "delete", "noc"]);
    assert_eq!(v, serde_json::json!({"deleted": "noc"}));
    let (code, out, _) = rsctl(&a, &["-o", "xml", "groups", "delete", "nothing-here"]);
    assert_ne!(code, 0, "{out}");

    // Mistakes: a format that is not one, a webhook without its URL.
    let (code, _, err) = rsctl(&a, &["-o", "yaml", "components"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = rsctl(&a, &["subscriptions", "set", "x", "--delivery", "webhook"]);
    assert_eq!(code, 1);
    assert!(err.contains("needs --url"), "{err}");
    let v = json(&a, &["subscriptions", "list"]);
    assert!(
        v["subscriptions"]["subscription"].is_null(),
        "nothing made: {v}"
    );
}
