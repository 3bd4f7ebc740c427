//! The fault-injection suite: real daemons under load, and random faults
//! of every kind while integrators send and the server sends control
//! actions down:
//!
//! - SIGKILL of any tier (the application server, the MLM, any proxy),
//!   restarted after a moment;
//! - link faults between the tiers, through TCP relays: every chunk
//!   delayed, a blackhole (connections open, nothing passes), every
//!   connection reset, a reply cut after the server wrote it;
//! - a proxy's disk filling up while its link is down (its data directory
//!   on a small tmpfs, filled to the last byte while its integrator sends
//!   large alarms that must go to the spool, then freed; skipped where
//!   tmpfs cannot be mounted);
//! - a proxy's wall clock jumping an hour ahead and minutes back
//!   (libfaketime).
//!
//! Afterwards every fault is healed and the invariants are checked: every
//! message a proxy acknowledged to an integrator is stored at the server
//! exactly once; every control action was applied at most once by its
//! destination and answered; no message was rejected for good; every
//! SQLite database passes `PRAGMA integrity_check`; and every refusal was
//! reported to its sender (a send either returned a message ID or an
//! error).
//!
//! The farm mode does the same against two application servers on one
//! PostgreSQL behind haproxy, with kills of either member and PostgreSQL
//! restarts among the faults.
//!
//! `RS_FAULTS=long` runs the long mode (at least 100 kills; minutes);
//! the default short mode runs in CI. `RS_FAULTS_SEED` replays a run.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rs_tests::deploy::{Deployment, Extra, integrity, proxy_metrics};
use rs_tests::relay::{Fault, Link};

use crate::backchannel::{exe, tmp};
use crate::forward::{alarm, all_stored, assert_exactly_once};

/// How hard a run is.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// Fault steps; every other one is a kill.
    steps: usize,
    /// How long each fault stands.
    hold: Duration,
}

fn mode() -> Mode {
    match std::env::var("RS_FAULTS").as_deref() {
        Ok("long") => Mode {
            steps: 220,
            hold: Duration::from_millis(1200),
        },
        _ => Mode {
            steps: 18,
            hold: Duration::from_millis(1000),
        },
    }
}

/// The data directory of a proxy on a small tmpfs (for the disk-full
/// fault); unmounted when dropped. `None` where mounting is not allowed.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, mb: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(at.to_path_buf()))
    }

    /// Fills the disk to the last byte.
    fn fill(&self) {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::File::create(self.0.join("filler")) {
            let block = vec![0u8; 64 << 10];
            while f.write_all(&block).is_ok() {}
            while f.write_all(&[0u8]).is_ok() {}
        }
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_under_kills_link_faults_a_full_disk_and_clock_jumps() {
    let mode = mode();
    let seed = std::env::var("RS_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    eprintln!(
        "fault suite: {} steps, seed {seed} (RS_FAULTS_SEED replays it)",
        mode.steps
    );

    let dir = tmp("faults");
    // Plain HTTP: one of the link faults cuts the connection right after the
    // server wrote a reply, which the relay finds by reading it. TLS between
    // the tiers is exercised by every other end-to-end test.
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "heartbeat_secs = 5").unwrap();
    let (ra, up_link) = rs_tests::relay::start(a.clone()).await.unwrap();
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&ra),
            &Extra::default(),
        )
        .unwrap();
    let (rm, down_link) = rs_tests::relay::start(m.clone()).await.unwrap();
    // Short backoff, so the run spends its time on faults, not waiting.
    let extra = Extra {
        upstream: "max_backoff_secs = 2\n".into(),
        ..Extra::default()
    };
    let mut sockets = Vec::new();
    for i in 1..=2 {
        sockets.push(
            d.proxy(
                &format!("p{i}"),
                &format!("acme.p{i}"),
                std::slice::from_ref(&rm),
                &extra,
            )
            .unwrap(),
        );
    }
    let disk = SmallDisk::mount(&dir.join("p3"), 24);
    if disk.is_none() {
        eprintln!("fault suite: cannot mount a tmpfs here; the disk-full fault is skipped");
    }
    // p3 on a link of its own, so its disk can fill while its WAN is down.
    let (rm3, p3_link) = rs_tests::relay::start(m.clone()).await.unwrap();
    sockets.push(
        d.proxy("p3", "acme.p3", std::slice::from_ref(&rm3), &extra)
            .unwrap(),
    );
    let clock = dir.join("p4-clock");
    std::fs::write(&clock, "+0s\n").unwrap();
    d.env = crate::backchannel_faults::faketime(&clock);
    sockets.push(
        d.proxy("p4", "acme.p4", std::slice::from_ref(&rm), &extra)
            .unwrap(),
    );
    d.env.clear();

    // Integrators: each sends alarms as fast as its proxy acknowledges
    // them; an acknowledged ID must end up stored, an error is a refusal
    // reported to the sender.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let refused: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    // While set, p3's integrator sends alarms of 256 KB: with its link down
    // they pile up in its spool, so SQLite needs new blocks on the full
    // disk (small ones could live in the WAL and free pages it already has).
    let big = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (k, s) in sockets.iter().enumerate() {
        writers.push(writer(
            s.clone(),
            k,
            Shared {
                acked: acked.clone(),
                refused: refused.clone(),
                stop: stop.clone(),
                big: big.clone(),
            },
        ));
    }

    // Faults, half of them kills.
    let nodes = ["appserver", "mlm", "p1", "p2", "p3", "p4"];
    let (mut kills, mut others) = (0usize, Vec::new());
    let mut disk_refusals = 0;
    let mut jobs = Vec::new();
    let started = Instant::now();
    for step in 0..mode.steps {
        // A control action now and then, to a proxy whose clock is right.
        let to = format!("acme.p{}", rng.usize(1..=3));
        let (status, body) = tokio::time::timeout(
            Duration::from_secs(5),
            crate::backchannel::post(
                &a,
                &format!(r#"<send ttl-secs="3600"><to id="{to}"/><control action="ping"/></send>"#),
            ),
        )
        .await
        .unwrap_or_default();
        if status == 200 {
            jobs.push((
                crate::backchannel::attr(&body, "id").to_owned(),
                crate::backchannel::attr(&body, "message").to_owned(),
            ));
        }
        if step % 2 == 0 {
            let name = nodes[rng.usize(..nodes.len())];
            d.node(name).kill();
            tokio::time::sleep(Duration::from_millis(rng.u64(100..800))).await;
            d.restart(name).unwrap();
            kills += 1;
            continue;
        }
        let link: &Link = [&up_link, &down_link, &p3_link][rng.usize(..3)];
        let what = match (step / 2) % 5 {
            0 => {
                link.set_fault(Fault::Delay(Duration::from_millis(rng.u64(50..400))));
                tokio::time::sleep(mode.hold).await;
                link.set_fault(Fault::None);
                "delay"
            }
            1 => {
                link.set_fault(Fault::Blackhole);
                tokio::time::sleep(mode.hold * 2).await;
                link.set_fault(Fault::None);
                "blackhole"
            }
            2 => {
                link.reset();
                link.cut_reply_with("status=\"accepted\"");
                tokio::time::sleep(mode.hold).await;
                "reset, reply cut"
            }
            3 => match &disk {
                Some(disk) => {
                    let before = refused[2].load(Ordering::Relaxed);
                    p3_link.set_fault(Fault::Blackhole);
                    big.store(true, Ordering::Relaxed);
                    disk.fill();
                    tokio::time::sleep(mode.hold * 2).await;
                    big.store(false, Ordering::Relaxed);
                    disk.free();
                    p3_link.set_fault(Fault::None);
                    // p3's integrator was told: its sends were refused.
                    disk_refusals += refused[2].load(Ordering::Relaxed) - before;
                    "disk full"
                }
                None => "disk full (skipped)",
            },
            _ => {
                let jump = if rng.bool() { "+3600s" } else { "-300s" };
                std::fs::write(&clock, format!("{jump}\n")).unwrap();
                tokio::time::sleep(mode.hold * 2).await;
                std::fs::write(&clock, "+0s\n").unwrap();
                "clock jump"
            }
        };
        others.push(what);
    }
    for link in [&up_link, &down_link, &p3_link] {
        link.set_fault(Fault::None);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    for name in nodes {
        if !d.node(name).is_running() {
            d.restart(name).unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for o in &others {
        *kinds.entry(o).or_default() += 1;
    }
    eprintln!(
        "fault suite: {} s, {kills} kills, {} other faults ({kinds:?}); {} messages acknowledged, {} sends refused",
        started.elapsed().as_secs(),
        others.len(),
        acked.len(),
        refused
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum::<u64>()
    );
    assert!(!acked.is_empty());
    if disk.is_some() && others.contains(&"disk full") {
        // The full disk must have bitten: p3 refused sends (and said so)
        // rather than acknowledging what it could not keep.
        eprintln!("fault suite: {disk_refusals} sends refused while p3's disk was full");
        assert!(
            disk_refusals > 0,
            "the full disk refused nothing (seed {seed})"
        );
    }

    // Every acknowledged message is stored, once.
    assert!(
        all_stored(&dir, &acked, Duration::from_secs(240)),
        "not every acknowledged message was stored (seed {seed}); see {}",
        dir.display()
    );
    assert_exactly_once(&dir, &acked);
    // Every control action was answered, and applied at most once.
    let mut interrupted = 0;
    for (job, message) in &jobs {
        let j = crate::backchannel::until_done(&a, job).await;
        // Succeeded; or, killed between recording it and recording its
        // answer, answered failed without being applied a second time.
        if !j.contains("state=\"succeeded\"") {
            assert!(
                j.contains("not applied a second time"),
                "job {job} (seed {seed}): {j}"
            );
            interrupted += 1;
        }
        let mut applied = 0;
        for p in 1..=4 {
            let log =
                std::fs::read_to_string(dir.join(format!("logs/p{p}.log"))).unwrap_or_default();
            applied += log.matches(&format!("control ping ({message})")).count();
        }
        assert_eq!(
            applied, 1,
            "ping {message} applied {applied} times (seed {seed})"
        );
    }
    eprintln!(
        "fault suite: {} control actions, each applied once; {interrupted} answered as interrupted",
        jobs.len()
    );
    // Nothing was rejected for good.
    for s in &sockets {
        let pm = proxy_metrics(s).await.unwrap();
        assert_eq!(pm.get("spool.dead_letters"), Some(&0), "{pm:?}");
    }
    d.stop_all();
    // Every database is sound.
    let mut dbs = 0;
    for e in walk(&dir) {
        if e.extension().is_some_and(|x| x == "db") {
            assert_eq!(integrity(&e).unwrap(), "ok", "{}", e.display());
            dbs += 1;
        }
    }
    assert!(dbs >= 10, "only {dbs} databases checked");
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the integrators of a run share with it.
struct Shared {
    /// IDs the proxies acknowledged (each must end up stored, once).
    acked: Arc<Mutex<HashSet<String>>>,
    /// Sends refused, per integrator (each a refusal its sender heard).
    refused: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
    /// While set, integrator 2 sends alarms of 256 KB.
    big: Arc<AtomicBool>,
}

/// Integrator `k`: sends alarms through the proxy at `socket` as fast as
/// it acknowledges them, registering again after a refusal, until `stop`.
fn writer(socket: std::path::PathBuf, k: usize, sh: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = None;
        let mut i = 0u64;
        while !sh.stop.load(Ordering::Relaxed) {
            if c.is_none() {
                let client = rs_proxy::client::Client::new(&socket);
                c = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.register_integrator("suite", "1.0", "linux"),
                )
                .await
                .is_ok_and(|r| r.is_ok())
                .then_some(client);
                if c.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            let Some(client) = &c else { continue };
            i += 1;
            let mut text = format!("p{k} alarm {i}");
            if k == 2 && sh.big.load(Ordering::Relaxed) {
                text.push_str(&" padding".repeat(32 << 10));
            }
            match client.send("alarm", &alarm(&text, None)).await {
                Ok(id) => {
                    sh.acked.lock().unwrap().insert(id);
                }
                Err(_) => {
                    sh.refused[k].fetch_add(1, Ordering::Relaxed);
                    c = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    })
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The farm mode: two application servers on one PostgreSQL (a server of
/// the test's own) behind haproxy, an MLM and two proxies in front, while
/// integrators send and control actions go down through the balancer; the
/// faults are SIGKILLs of either member, of the MLM or of a proxy, and
/// PostgreSQL stopped at once (`pg_ctl -m immediate`) and started again.
/// Afterwards every message a proxy acknowledged is stored exactly once,
/// every control action was answered and applied at most once, and
/// nothing was rejected for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farm_mode_loses_nothing_when_members_the_mlm_and_postgresql_die() {
    let mode = mode();
    let seed = std::env::var("RS_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let steps = mode.steps / 2;
    eprintln!("fault suite, farm mode: {steps} steps, seed {seed} (RS_FAULTS_SEED replays it)");
    let pg = rs_tests::postgres::Postgres::start().unwrap();
    let url = pg.database("faults");
    let dir = tmp("faults-farm");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let (_, _, lb) = d.farm(&url, "heartbeat_secs = 5").unwrap();
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&lb.addr),
            &Extra::default(),
        )
        .unwrap();
    let extra = Extra {
        upstream: "max_backoff_secs = 2\n".into(),
        ..Extra::default()
    };
    let mut sockets = Vec::new();
    for i in 1..=2 {
        sockets.push(
            d.proxy(
                &format!("p{i}"),
                &format!("acme.p{i}"),
                std::slice::from_ref(&m),
                &extra,
            )
            .unwrap(),
        );
    }
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let refused: Arc<Vec<AtomicU64>> = Arc::new((0..2).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (k, s) in sockets.iter().enumerate() {
        writers.push(writer(
            s.clone(),
            k,
            Shared {
                acked: acked.clone(),
                refused: refused.clone(),
                stop: stop.clone(),
                big: Arc::new(AtomicBool::new(false)),
            },
        ));
    }

    let mut done: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut jobs = Vec::new();
    let started = Instant::now();
    for _ in 0..steps {
        let to = format!("acme.p{}", rng.usize(1..=2));
        let (status, body) = tokio::time::timeout(
            Duration::from_secs(5),
            crate::backchannel::post(
                &lb.addr,
                &format!(r#"<send ttl-secs="3600"><to id="{to}"/><control action="ping"/></send>"#),
            ),
        )
        .await
        .unwrap_or_default();
        if status == 200 {
            jobs.push((
                crate::backchannel::attr(&body, "id").to_owned(),
                crate::backchannel::attr(&body, "message").to_owned(),
            ));
        }
        let what = match rng.usize(..4) {
            0 | 1 => {
                let name = ["a1", "a2"][rng.usize(..2)];
                d.node(name).kill();
                tokio::time::sleep(Duration::from_millis(rng.u64(100..1500))).await;
                d.restart(name).unwrap();
                "member killed"
            }
            2 => {
                let name = ["mlm", "p1", "p2"][rng.usize(..3)];
                d.node(name).kill();
                tokio::time::sleep(Duration::from_millis(rng.u64(100..800))).await;
                d.restart(name).unwrap();
                "tier killed"
            }
            _ => {
                pg.kill().unwrap();
                tokio::time::sleep(mode.hold).await;
                pg.restart().unwrap();
                "PostgreSQL restarted"
            }
        };
        *done.entry(what).or_default() += 1;
        tokio::time::sleep(mode.hold).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    for name in ["a1", "a2", "mlm", "p1", "p2"] {
        if !d.node(name).is_running() {
            d.restart(name).unwrap();
        }
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "fault suite, farm mode: {} s, {done:?}; {} messages acknowledged, {} sends refused",
        started.elapsed().as_secs(),
        acked.len(),
        refused
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum::<u64>()
    );
    assert!(!acked.is_empty());
    let stored_all = rs_tests::deploy::wait_for(Duration::from_secs(240), || {
        rs_tests::deploy::stored_ids(&dir.join("a1")).is_ok_and(|s| {
            let s: HashSet<String> = s.into_iter().collect();
            acked.is_subset(&s)
        })
    });
    assert!(
        stored_all,
        "not every acknowledged message was stored (seed {seed}); see {}",
        dir.display()
    );
    let stored = rs_tests::deploy::stored_ids(&dir.join("a1")).unwrap();
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(
        unique.len(),
        stored.len(),
        "a message was stored twice (seed {seed})"
    );
    for (job, message) in &jobs {
        let j = crate::backchannel::until_done(&lb.addr, job).await;
        if !j.contains("state=\"succeeded\"") {
            assert!(
                j.contains("not applied a second time"),
                "job {job} (seed {seed}): {j}"
            );
        }
        let mut applied = 0;
        for p in 1..=2 {
            let log =
                std::fs::read_to_string(dir.join(format!("logs/p{p}.log"))).unwrap_or_default();
            applied += log.matches(&format!("control ping ({message})")).count();
        }
        assert_eq!(
            applied, 1,
            "ping {message} applied {applied} times (seed {seed})"
        );
    }
    for s in &sockets {
        let pm = proxy_metrics(s).await.unwrap();
        assert_eq!(pm.get("spool.dead_letters"), Some(&0), "{pm:?}");
    }
    d.stop_all();
    drop(lb);
    let _ = std::fs::remove_dir_all(&dir);
}
