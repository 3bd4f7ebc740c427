//! The README's main job, run as a user runs it: the demo deployment does
//! real work end to end, its counters add up across the proxies'
//! restarts, and the admin commands the README shows (which the demo
//! prints with its own address and certificates) work exactly as written
//! while it runs.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::backchannel::{exe, tmp};

/// Runs `line` (commands as printed, after `export`) in a shell.
fn shell(export: &str, line: &str) -> (i32, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{export}\n{line}"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The commands in the README's code block that follows `after`.
fn readme_block(after: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(rs_tests::repo_root().join("README.md")).unwrap();
    let rest = &readme[readme.find(after).expect("the README's admin steps")..];
    let block = &rest[rest.find("```sh\n").unwrap() + 6..];
    block[..block.find("```").unwrap()]
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_and_the_readme_admin_commands_work_as_written() {
    let dir = tmp("demo");
    let listen = crate::forward::free_port();
    let mut child = Command::new(exe())
        .args([
            "--duration",
            "40",
            "--proxies",
            "2",
            "--listen",
            &listen,
            "--data",
        ])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(180)).ok();
    let mut head = Vec::new();
    while let Some(l) = next() {
        let done = l.starts_with("running for");
        head.push(l);
        if done {
            break;
        }
    }
    let text = head.join("\n");
    assert!(text.contains("getStatus answered by 2/2"), "{text}");
    assert!(text.contains("installed by 2/2"), "{text}");
    let printed: Vec<String> = head
        .iter()
        .skip_while(|l| !l.starts_with("administer it with rsctl"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().to_owned())
        .collect();
    assert_eq!(printed.len(), 4, "{text}");

    // The README shows the same commands, for the default run from the
    // repository: the release build, target/rs-demo, 127.0.0.1:8440.
    let exe_path = exe().display().to_string();
    let as_in_readme: Vec<String> = printed
        .iter()
        .map(|l| {
            l.replace(&exe_path, "target/release/rs-demo")
                .replace(&dir.display().to_string(), "target/rs-demo")
                .replace(&listen, "127.0.0.1:8440")
        })
        .collect();
    assert_eq!(
        readme_block("administer the deployment"),
        as_in_readme,
        "the README's admin steps are not what the demo prints"
    );

    // The web portal it prints: log in with the printed token and see
    // the sites.
    let portal = head
        .iter()
        .find_map(|l| l.strip_prefix("web portal: "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    assert_eq!(portal, format!("https://{listen}/portal/"));
    let token = head
        .iter()
        .find_map(|l| l.trim().strip_prefix("log in with the API token "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    let ca = dir.join("ca/admin/ca.pem");
    let browser = rs_net::tls::client_trusting(&ca)
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = crate::portal::post_login(&browser, &portal, &format!("token={token}")).await;
    assert_eq!(r.status(), 303);
    let cookie = crate::portal::session_of(&r);
    let fleet = browser
        .get(&portal)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        fleet.contains(r#"data-id="acme.p1""#) && fleet.contains(r#"data-id="acme.m1""#),
        "{fleet}"
    );

    // Run them as printed, while the demo runs.
    let export = &printed[0];
    let (code, out) = shell(export, &printed[1]);
    assert_eq!(code, 0, "{}: {out}", printed[1]);
    assert!(out.contains("acme.p1") && out.contains("acme.m1"), "{out}");
    // A configuration change restarts every proxy in place.
    let (code, out) = shell(export, &printed[2]);
    assert_eq!(code, 0, "{}: {out}", printed[2]);
    assert!(out.contains("2/2 final: 2 succeeded"), "{out}");
    let (code, out) = shell(export, &printed[3]);
    assert_eq!(code, 0, "{}: {out}", printed[3]);
    assert!(out.contains("<messages"), "{out}");

    let mut tail = Vec::new();
    while let Some(l) = next() {
        tail.push(l);
    }
    let status = child.wait().unwrap();
    let tail = tail.join("\n");
    assert!(status.success(), "{tail}");
    assert!(tail.contains("each exactly once"), "{tail}");
    assert!(tail.contains("proxy spools drained"), "{tail}");
    assert!(!tail.contains("DEAD LETTERS"), "{tail}");
    // The proxies restarted (after enrolling, and for the configuration
    // change), yet what they report adds up: spooled = delivered + queued
    // + dead + dropped, all from counters kept in their spools.
    let line = tail
        .lines()
        .find(|l| l.starts_with("proxies: "))
        .unwrap_or_else(|| panic!("{tail}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(n.len(), 5, "{line}");
    assert!(n[0] > 0 && n[0] == n[1] + n[2] + n[3] + n[4], "{line}");
    assert_eq!((n[2], n[3]), (0, 0), "{line}");
}

/// `rs-demo --farm` (documented in the README and docs/operations.md):
/// two application servers and three MLMs on a PostgreSQL the demo sets up
/// itself, each farm behind haproxy, do the demo's whole work: the
/// back-channel, an upload, software published and installed. Under the
/// demo's load one MLM member is killed and started again, and still every
/// alarm the proxies accepted is stored, every message once, the proxies'
/// spools drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_as_a_farm_on_postgresql() {
    let dir = tmp("demo-farm");
    let listen = crate::forward::free_port();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(exe())
            .args([
                "--farm",
                "--duration",
                "20",
                "--proxies",
                "2",
                "--listen",
                &listen,
                "--data",
            ])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut text = String::new();
        if let Some(out) = child.stdout.take() {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                text.push_str(&l);
                text.push('\n');
            }
        }
        let code = rs_tests::wait_or_kill(&mut child, Duration::from_secs(240));
        let _ = std::fs::remove_dir_all(&dir);
        (code, text)
    })
    .await
    .unwrap();
    let (code, text) = out;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("farm: application servers a1"), "{text}");
    assert!(text.contains("farm: MLMs m1"), "{text}");
    assert!(text.contains("getStatus answered by 2/2"), "{text}");
    assert!(text.contains("stored and SHA-256 verified"), "{text}");
    assert!(text.contains("installed by 2/2"), "{text}");
    // The three MLMs share one cache directory: the package left the
    // server once.
    assert!(text.contains("; 8000000 bytes left the server"), "{text}");
    assert!(text.contains("farm: killed MLM member m"), "{text}");
    assert!(text.contains("started again"), "{text}");
    // Under load: hundreds of alarms accepted, every one stored.
    let load = text
        .lines()
        .find(|l| l.starts_with("load: the proxies accepted "))
        .unwrap_or_else(|| panic!("{text}"));
    let accepted: u64 = load
        .split_whitespace()
        .nth(4)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{load}"));
    assert!(accepted > 1000, "{load}");
    assert!(load.ends_with("every one stored"), "{load}");
    assert!(text.contains("each exactly once"), "{text}");
    assert!(text.contains("proxy spools drained"), "{text}");
}
