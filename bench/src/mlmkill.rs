//! An MLM farm losing a member under load (`cargo run --release -p
//! rs-bench -- mlmkill`): three `rs-mlm` members on one PostgreSQL
//! database behind haproxy (packaging/haproxy/rs-farm.cfg), six proxies
//! connected through it, integrators handing the proxies `--rate` alarms
//! a second between them (batches every 100 ms, each call waiting for the
//! proxy's durable acknowledgement). After a warm-up the member carrying
//! the most envelopes is killed with SIGKILL. Measured:
//!
//! - `mlm_farm_failover_s`: the longest any proxy went without a delivery
//!   upstream after the kill (its `spool.delivered_total`, sampled every
//!   100 ms): the time the dead member's proxies take to be served by the
//!   others;
//! - the rate the server stored at before the kill, and whether every
//!   alarm the proxies accepted was stored, each once (checked against the
//!   server's database).
//!
//! Durability: the proxies' spools and the server on SQLite (WAL,
//! synchronous=FULL); the farm's queue on PostgreSQL (fsync,
//! synchronous_commit on); the members relay synchronously (`custody =
//! false`: a member answers `accepted` once the server stored the message).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rs_proxy::api::{BatchItem, BatchResult};
use rs_proxy::client::Client;
use rs_tests::deploy::{Deployment, Extra, proxy_metrics, server_metrics, stored_ids};
use rs_tests::postgres::Postgres;

use crate::Figure;
use crate::forward::{exe, median};

const MEMBERS: usize = 3;
const PROXIES: usize = 6;
const WARM_UP: Duration = Duration::from_secs(10);
const AFTER_KILL: Duration = Duration::from_secs(20);

/// One proxy's deliveries upstream over time: (when, `delivered_total`).
type Deliveries = Vec<(Instant, u64)>;

/// What one run measured.
struct Run {
    failover_s: f64,
    /// Stored per second at the server in the 5 s before the kill.
    rate_before: f64,
    accepted: usize,
    lost: usize,
    duplicates: usize,
}

/// A 500-byte alarm.
fn alarm(i: u64) -> BatchItem {
    let mut req = crate::forward::alarm(i);
    if let Some(t) = &mut req.text {
        t.truncate(400);
    }
    BatchItem::Alarm(req)
}

/// Hands `proxy` `per_sec` alarms a second in batches every 100 ms until
/// `stop`; the IDs it accepted.
async fn feed(socket: PathBuf, per_sec: u64, base: u64, stop: Arc<AtomicBool>) -> Vec<String> {
    let c = Client::new(&socket).with_timeout(Duration::from_secs(30));
    let _ = c.register_integrator("bench", "1.0", "linux").await;
    let mut ids = Vec::new();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = started.elapsed().as_millis() as u64 * per_sec / 1000;
        if due <= sent {
            continue;
        }
        let items = (sent..due).map(|i| alarm(base + i)).collect();
        sent = due;
        match c.send_batch(items).await {
            Ok(rs) => ids.extend(rs.into_iter().filter_map(|r| match r {
                BatchResult::Sent { message_id } => Some(message_id),
                BatchResult::Failed { .. } => None,
            })),
            Err(e) => eprintln!("  feeding {}: {e}", socket.display()),
        }
    }
    ids
}

async fn one(exe: &Path, dir: &Path, pg: &Postgres, rate: u64) -> anyhow::Result<Run> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let a = d.appserver("127.0.0.1:0", "")?;
    let url = pg.database("bench_mlmkill");
    let members: Vec<(String, String)> = d
        .mlm_farm(MEMBERS, "acme.m1", std::slice::from_ref(&a), &url, |_| {
            Extra::default()
        })?
        .into_iter()
        .enumerate()
        .map(|(i, a)| (format!("m{}", i + 1), a))
        .collect();
    let addrs: Vec<&str> = members.iter().map(|(_, a)| a.as_str()).collect();
    let lb = d.balancer_at("127.0.0.1:0", &addrs)?;
    let mut sockets = Vec::new();
    for i in 1..=PROXIES {
        sockets.push(d.proxy(
            &format!("p{i}"),
            &format!("acme.p{i}"),
            std::slice::from_ref(&lb.addr),
            &Extra::default(),
        )?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let per_proxy = rate / PROXIES as u64;
    let feeders: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(k, s)| {
            tokio::spawn(feed(
                s.clone(),
                per_proxy,
                k as u64 * 1_000_000_000,
                stop.clone(),
            ))
        })
        .collect();
    // Deliveries per proxy, sampled every 100 ms: (when, delivered_total).
    let samples: Arc<Mutex<Vec<Deliveries>>> = Arc::new(Mutex::new(vec![Vec::new(); PROXIES]));
    let sampler = {
        let (samples, sockets, stop) = (samples.clone(), sockets.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (k, s) in sockets.iter().enumerate() {
                    if let Ok(m) = proxy_metrics(s).await {
                        let n = m.get("spool.delivered_total").copied().unwrap_or(0);
                        if let Ok(mut v) = samples.lock() {
                            v[k].push((Instant::now(), n));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let stored_total = |a: String| async move {
        server_metrics(&a)
            .await
            .ok()
            .and_then(|m| m.get("store.stored_total").copied())
            .unwrap_or(0)
    };
    tokio::time::sleep(WARM_UP - Duration::from_secs(5)).await;
    let (t0, n0) = (Instant::now(), stored_total(a.clone()).await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rate_before = (stored_total(a.clone()).await - n0) as f64 / t0.elapsed().as_secs_f64();
    // The busiest member goes.
    let addrs: Vec<String> = members.iter().map(|(_, a)| a.clone()).collect();
    let busiest = rs_tests::deploy::busiest(&addrs).await;
    let killed_at = Instant::now();
    d.node(&members[busiest.0].0).kill();
    tokio::time::sleep(AFTER_KILL).await;
    stop.store(true, Ordering::Relaxed);
    let mut accepted = Vec::new();
    for f in feeders {
        accepted.extend(f.await?);
    }
    let _ = sampler.await;
    // The longest stretch after the kill in which a proxy delivered nothing.
    let mut failover = 0f64;
    for v in samples
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        let mut last_rise = killed_at;
        let mut prev = v
            .iter()
            .rev()
            .find(|(t, _)| *t <= killed_at)
            .map_or(0, |s| s.1);
        for (t, n) in v.iter().filter(|(t, _)| *t > killed_at) {
            if *n > prev {
                prev = *n;
                last_rise = *t;
            }
            failover = failover.max(t.duration_since(last_rise).as_secs_f64());
        }
    }
    // Everything accepted reaches the server, each once.
    let want: HashSet<&String> = accepted.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let server = dir.join("appserver");
    let (lost, duplicates) = loop {
        let ids = tokio::task::block_in_place(|| stored_ids(&server))?;
        let unique: HashSet<&String> = ids.iter().collect();
        let lost = want.iter().filter(|id| !unique.contains(**id)).count();
        if lost == 0 || Instant::now() > deadline {
            break (lost, ids.len() - unique.len());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    d.stop_all();
    drop(lb);
    let _ = std::fs::remove_dir_all(dir);
    eprintln!(
        "  {rate_before:.0} stored/s before the kill; proxies served again within {failover:.1} s; {} accepted, {lost} lost, {duplicates} stored twice",
        accepted.len()
    );
    Ok(Run {
        failover_s: failover,
        rate_before,
        accepted: accepted.len(),
        lost,
        duplicates,
    })
}

pub(crate) fn run(runs: usize, rate: u64) -> anyhow::Result<Vec<Figure>> {
    let exe = exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pg = Postgres::start().map_err(anyhow::Error::msg)?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-mlmkill-{}", std::process::id()));
    let mut results = Vec::new();
    for i in 0..runs {
        eprintln!(
            "rs-bench mlmkill: run {} of {runs}, {rate} alarms/s offered",
            i + 1
        );
        results.push(rt.block_on(one(&exe, &tmp, &pg, rate))?);
    }
    let lost: usize = results.iter().map(|r| r.lost).sum();
    let dup: usize = results.iter().map(|r| r.duplicates).sum();
    anyhow::ensure!(
        lost == 0 && dup == 0,
        "{lost} accepted alarms lost and {dup} stored twice over {runs} runs"
    );
    let secs: Vec<f64> = results.iter().map(|r| r.failover_s).collect();
    let mut rates: Vec<f64> = results.iter().map(|r| r.rate_before).collect();
    let accepted: usize = results.iter().map(|r| r.accepted).sum();
    let command = format!("cargo run --release -p rs-bench -- mlmkill --runs {runs} --rate {rate}");
    let mut f = Figure::measured(
        "mlm_farm_failover_s",
        format!(
            "the longest any of {PROXIES} proxies went without a delivery upstream after the busiest of {MEMBERS} MLM farm members (one PostgreSQL, behind haproxy) was killed with SIGKILL under {rate} alarms/s offered (500 B, batches every 100 ms; the server stored {:.0}/s before the kill, median); proxy delivery counters sampled every 100 ms; {accepted} alarms accepted over the runs, none lost, none stored twice",
            median(&mut rates.clone())
        ),
        median(&mut secs.clone()),
        "s",
        "lower",
        runs,
        crate::spread(&secs),
        &command,
    );
    f.target = Some(
        "the dead member's proxies served by the others within 10 s (issue 24; Zabbix proxy groups fail over in 60 s by default)"
            .into(),
    );
    let mut r = Figure::measured(
        "mlm_farm_kill_rate_per_s",
        format!(
            "alarms stored per second at the server in the 5 s before the kill, in the run of mlm_farm_failover_s ({rate}/s offered through {PROXIES} proxies and {MEMBERS} members behind haproxy)"
        ),
        median(&mut rates),
        "msg/s",
        "higher",
        runs,
        crate::spread(&rates),
        &command,
    );
    r.target = Some("5,000 messages/s while a member is killed (issue 24)".into());
    Ok(vec![f, r])
}
