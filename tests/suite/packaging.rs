//! The Debian packages as an operator gets them: built by `scripts/package`
//! (here `--dev`: the debug binaries `scripts/test` builds, with the same
//! metadata, units and scripts as a release), their contents checked with
//! `dpkg-deb`, their units with `systemd-analyze`; then installed with
//! `dpkg -i` (as root, when `scripts/test` says so with `RS_TEST_INSTALL=1`:
//! it changes the machine), each daemon started as its packaged user with
//! its packaged configuration, a site enrolled in one step, and every
//! package upgraded while the proxy's spool is full.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rs_tests::deploy::{stored_ids, wait_for};

use crate::backchannel::tmp;
use crate::forward::alarm;

const PACKAGES: [&str; 4] = ["rs-proxy", "rs-mlm", "rs-appserver", "rsctl"];

/// One `scripts/package` at a time: cargo-deb works on the programs in
/// `target/` (stripping a copy, in a work directory of its own there), and
/// two runs at once handed an installation a half-written program.
static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The packages of the debug binaries, at Debian version `version`, in
/// `out`.
fn build(out: &Path, version: &str) -> Vec<PathBuf> {
    let _one = BUILDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = rs_tests::repo_root();
    for b in [
        "rs-proxy",
        "rs-hostwatch",
        "rs-mlm",
        "rs-appserver",
        "rsctl",
    ] {
        assert!(
            root.join("target/debug").join(b).exists(),
            "target/debug/{b} is missing: build the programs first (cargo build --workspace \
             --bins; scripts/test does)"
        );
    }
    let o = Command::new(root.join("scripts/package"))
        .args(["--dev", "--version", version])
        .arg(out)
        .env("RS_DEB_FAST", "1")
        .output()
        .expect("scripts/package");
    assert!(
        o.status.success(),
        "scripts/package: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    PACKAGES
        .iter()
        .map(|p| out.join(format!("{p}_{version}_amd64.deb")))
        .collect()
}

fn output(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Each package holds its programs, its commented configuration as a
/// conffile, its unit (the one in packaging/systemd, which `systemd-analyze
/// security` rates OK or better), its system user (sysusers.d, created by
/// its postinst) and its documentation.
#[test]
fn the_packages_hold_what_an_installation_needs() {
    let dir = tmp("packages");
    std::fs::create_dir_all(&dir).unwrap();
    let debs = build(&dir, "0.1.0-1");
    let root = rs_tests::repo_root();
    let mut scores = Vec::new();
    for (name, deb) in PACKAGES.iter().zip(&debs) {
        let field = |f: &str| output(Command::new("dpkg-deb").arg("--field").arg(deb).arg(f));
        assert_eq!(field("Package").trim(), *name);
        assert_eq!(field("Version").trim(), "0.1.0-1");
        let contents = output(Command::new("dpkg-deb").arg("--contents").arg(deb));
        let has = |path: &str| contents.lines().any(|l| l.ends_with(&format!(" .{path}")));
        let (programs, config): (&[&str], Option<&str>) = match *name {
            "rs-proxy" => (
                &["rs-proxy", "rs-hostwatch"],
                Some("/etc/rs-proxy/proxy.toml"),
            ),
            "rs-mlm" => (&["rs-mlm"], Some("/etc/rs-mlm/mlm.toml")),
            "rs-appserver" => (&["rs-appserver"], Some("/etc/rs/appserver.toml")),
            _ => (&["rsctl"], None),
        };
        for p in programs {
            assert!(
                has(&format!("/usr/bin/{p}")),
                "{name}: no {p} in\n{contents}"
            );
        }
        assert!(
            has(&format!("/usr/share/doc/{name}/operations.md")),
            "{name}"
        );
        if *name == "rsctl" {
            assert!(
                has("/usr/share/doc/rsctl/examples/rs-alerts.yml"),
                "the alerting rules: {contents}"
            );
        }
        let x = dir.join(format!("x-{name}"));
        output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x));
        let ctl = dir.join(format!("c-{name}"));
        output(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&ctl));
        let Some(config) = config else {
            continue;
        };
        // The daemons: configuration (a conffile), unit, user.
        assert!(has(config), "{name}: no {config}");
        let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
        assert!(
            conffiles.lines().any(|l| l == config),
            "{name}: {conffiles}"
        );
        assert!(
            field("Depends").contains("systemd"),
            "{name}: {}",
            field("Depends")
        );
        let unit_path = format!("/usr/lib/systemd/system/{name}.service");
        assert_eq!(
            std::fs::read_to_string(x.join(&unit_path[1..])).unwrap(),
            std::fs::read_to_string(root.join(format!("packaging/systemd/{name}.service")))
                .unwrap(),
            "{name}: the packaged unit is packaging/systemd's"
        );
        let sysusers =
            std::fs::read_to_string(x.join(format!("usr/lib/sysusers.d/{name}.conf"))).unwrap();
        assert!(sysusers.contains(&format!("u {name} ")), "{sysusers}");
        let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
        let user_at = postinst
            .find("systemd-sysusers")
            .expect("postinst creates the user");
        let chown_at = postinst
            .find(&format!("chown {name}:"))
            .or(postinst.find("chown root:"));
        assert!(
            chown_at.is_some_and(|c| c > user_at),
            "{name}: the user is made before it is given its files:\n{postinst}"
        );
        // The sandbox's exposure, as systemd rates it (the figure the
        // operations guide states).
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(x.join(&unit_path[1..]))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {text}"));
        assert!(score <= 2.0, "{name}: exposure {score}\n{text}");
        scores.push(format!("{name} {score}"));
    }
    eprintln!("systemd-analyze security: {}", scores.join(", "));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon started as its packaged user, as its unit starts it (the
/// check first, then the daemon); its output goes to `log`.
fn start_as(user: &str, args: &[&str], log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--init-groups",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap()
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = rs_tests::wait_or_kill(child, Duration::from_secs(30));
}

/// Everything the packages and this test put on the machine, removed.
fn clean_machine() {
    let _ = Command::new("pkill").args(["-f", "^/usr/bin/rs-"]).status();
    let _ = Command::new("dpkg").arg("--purge").args(PACKAGES).output();
    for d in [
        "/var/lib/rs-proxy",
        "/var/lib/rs-mlm",
        "/var/lib/rs-appserver",
        "/etc/rs-proxy",
        "/etc/rs-mlm",
        "/etc/rs",
        "/run/rs-proxy",
    ] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Install, configure and serve the way docs/operations.md says: a
/// provider's server and MLM and a site's proxy from the packages, each
/// as its own user; the site enrolled in one step; then every package
/// upgraded while the proxy holds messages it could not send (its MLM
/// down): the configuration, the spool and its messages come through, and
/// each message is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_packages_serve_enroll_a_site_and_upgrade_without_losing_a_spooled_message() {
    if std::env::var("RS_TEST_INSTALL").as_deref() != Ok("1") {
        eprintln!(
            "skipped: installs packages on this machine; scripts/test runs it as root \
             (RS_TEST_INSTALL=1)"
        );
        return;
    }
    assert_eq!(
        output(Command::new("id").arg("-u")).trim(),
        "0",
        "RS_TEST_INSTALL=1 needs root"
    );
    let dir = tmp("install");
    std::fs::create_dir_all(&dir).unwrap();
    let old = build(&dir.join("old"), "0.1.0-1");
    let new = build(&dir.join("new"), "0.1.1-1");
    clean_machine();
    output(Command::new("dpkg").arg("-i").args(&old));
    for user in ["rs-proxy", "rs-mlm", "rs-appserver"] {
        output(Command::new("id").arg(user));
    }
    let sh = |script: &str| output(Command::new("sh").arg("-ec").arg(script));

    // The provider: its CA, the server's certificate, the server.
    sh("rsctl ca init --dir /etc/rs/ca
        rsctl ca issue --dir /etc/rs/ca rs.a1 --dns localhost --ip 127.0.0.1 --out /etc/rs/tls
        chown -R rs-appserver: /etc/rs/ca /etc/rs/tls
        cp /etc/rs/ca/ca.pem /etc/rs/ca.pem");
    let admin = dir.join("admin");
    output(
        Command::new("rsctl")
            .args([
                "ca",
                "issue",
                "--dir",
                "/etc/rs/ca",
                "ops",
                "--role",
                "admin",
            ])
            .args(["--customers", "*", "--out"])
            .arg(&admin),
    );
    let rsctl = |args: &[&str]| {
        output(
            Command::new("rsctl")
                .args([
                    "--server",
                    "https://127.0.0.1:8440",
                    "--ca",
                    "/etc/rs/ca.pem",
                ])
                .arg("--cert")
                .arg(admin.join("ops.pem"))
                .arg("--key")
                .arg(admin.join("ops.key"))
                .args(args),
        )
        .trim()
        .to_owned()
    };
    let appserver = [
        "/usr/bin/rs-appserver",
        "--config",
        "/etc/rs/appserver.toml",
    ];
    let check = |user: &str, args: &[&str]| {
        output(
            Command::new("setpriv")
                .args([
                    &format!("--reuid={user}"),
                    &format!("--regid={user}"),
                    "--init-groups",
                ])
                .args(args),
        )
    };
    check(
        "rs-appserver",
        &[appserver[0], appserver[1], appserver[2], "--check-config"],
    );
    let mut server = start_as("rs-appserver", &appserver, &dir.join("appserver.log"));
    let up = |addr: &str| {
        let addr = addr.to_owned();
        wait_for(Duration::from_secs(30), move || {
            std::net::TcpStream::connect(&addr).is_ok()
        })
    };
    assert!(
        up("127.0.0.1:8440"),
        "{}",
        std::fs::read_to_string(dir.join("appserver.log")).unwrap()
    );

    // The provider's MLM: its packaged configuration pointed at the server,
    // its certificate issued by the CA ("or installed", as the file says;
    // `rsctl ca` run as root hands the CA directory back to the server).
    let cfg = std::fs::read_to_string("/etc/rs-mlm/mlm.toml").unwrap();
    std::fs::write(
        "/etc/rs-mlm/mlm.toml",
        cfg.replace("https://rs.example.net:8440", "https://127.0.0.1:8440"),
    )
    .unwrap();
    sh("rsctl ca issue --dir /etc/rs/ca acme.m1 --dns localhost --ip 127.0.0.1 --out /var/lib/rs-mlm/tls
        mv /var/lib/rs-mlm/tls/acme.m1.pem /var/lib/rs-mlm/tls/cert.pem
        mv /var/lib/rs-mlm/tls/acme.m1.key /var/lib/rs-mlm/tls/key.pem
        chown -R rs-mlm: /var/lib/rs-mlm
        chown -R rs-appserver: /etc/rs/ca");
    let mlm = ["/usr/bin/rs-mlm", "--config", "/etc/rs-mlm/mlm.toml"];
    check("rs-mlm", &[mlm[0], mlm[1], mlm[2], "--check-config"]);
    let mut m = start_as("rs-mlm", &mlm, &dir.join("mlm.log"));
    assert!(
        up("127.0.0.1:8441"),
        "{}",
        std::fs::read_to_string(dir.join("mlm.log")).unwrap()
    );

    // The site, in two commands: the package (above), then enroll.
    let token = rsctl(&["enroll", "--component", "acme.p1"]);
    let out = output(Command::new("rs-proxy").args([
        "enroll",
        "--server",
        "https://127.0.0.1:8441",
        "--token",
        &token,
        "--no-start",
    ]));
    assert!(out.contains("enrolled as acme.p1"), "{out}");
    // What systemd makes for the unit (RuntimeDirectory=).
    sh("install -d -o rs-proxy -g rs-proxy -m 0755 /run/rs-proxy");
    let proxy = [
        "/usr/bin/rs-proxy",
        "run",
        "--config",
        "/etc/rs-proxy/proxy.toml",
    ];
    check(
        "rs-proxy",
        &[
            "/usr/bin/rs-proxy",
            "check-config",
            "--config",
            "/etc/rs-proxy/proxy.toml",
        ],
    );
    let mut p = start_as("rs-proxy", &proxy, &dir.join("proxy.log"));
    let socket = Path::new("/run/rs-proxy/rs-proxy.sock");
    assert!(
        wait_for(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        }),
        "{}",
        std::fs::read_to_string(dir.join("proxy.log")).unwrap()
    );
    let store = Path::new("/var/lib/rs-appserver");
    let stored = |ids: &HashSet<String>| {
        wait_for(Duration::from_secs(60), || {
            stored_ids(store).is_ok_and(|s| ids.is_subset(&s.into_iter().collect()))
        })
    };
    let client = crate::forward::register(socket).await;
    let mut ids = HashSet::new();
    ids.insert(
        client
            .send("alarm", &alarm("installed from packages", None))
            .await
            .unwrap(),
    );
    assert!(
        stored(&ids),
        "{}",
        std::fs::read_to_string(dir.join("proxy.log")).unwrap()
    );
    // Each daemon serves /metrics where its packaged configuration says,
    // counting the alarm that went through.
    for (port, counter) in [
        (9471, "rs_messages_received_total"),
        (9472, "rs_messages_forwarded_total"),
        (9473, "rs_messages_accepted_total"),
    ] {
        let s = crate::metrics::scrape(&format!("127.0.0.1:{port}")).await;
        assert!(crate::metrics::get(&s, counter) >= 1.0, "{port}: {s:?}");
    }

    // The upgrade, with the MLM down: the proxy holds what it takes.
    stop(&mut m);
    for i in 0..100 {
        ids.insert(
            client
                .send(
                    "alarm",
                    &alarm(&format!("held through the upgrade {i}"), None),
                )
                .await
                .unwrap(),
        );
    }
    let config_before = std::fs::read("/etc/rs-proxy/proxy.toml").unwrap();
    stop(&mut p);
    output(
        Command::new("dpkg")
            .args(["-i", "--force-confold"])
            .args(&new),
    );
    for name in PACKAGES {
        let v = output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", name]));
        assert_eq!(v, "0.1.1-1", "{name}");
    }
    assert_eq!(
        std::fs::read("/etc/rs-proxy/proxy.toml").unwrap(),
        config_before
    );
    let verify = Command::new("rs-proxy")
        .args(["spool", "verify", "--config", "/etc/rs-proxy/proxy.toml"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    let waiting: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("waiting: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(verify.status.success() && waiting >= 100, "{report}");
    // As the units restart them after an upgrade: the new programs.
    let mut p = start_as("rs-proxy", &proxy, &dir.join("proxy-new.log"));
    let mut m = start_as("rs-mlm", &mlm, &dir.join("mlm-new.log"));
    assert!(
        stored(&ids),
        "{}",
        std::fs::read_to_string(dir.join("proxy-new.log")).unwrap()
    );
    let all = stored_ids(store).unwrap();
    let mine: Vec<&String> = all.iter().filter(|i| ids.contains(*i)).collect();
    assert_eq!(mine.len(), ids.len(), "each message stored once");

    stop(&mut p);
    stop(&mut m);
    stop(&mut server);
    clean_machine();
    let _ = std::fs::remove_dir_all(&dir);
}
