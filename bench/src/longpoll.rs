//! An MLM holding the long polls of many proxies: the resident memory of
//! rs-mlm while `n` simulated proxies (a load generator in this process,
//! one connection each, each sender a distinct proxy ID) keep a long poll
//! open on it, as every idle proxy of a site or a farm does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rs_protocol::codec::EnvelopeWriter;
use rs_protocol::model::EnvelopeMeta;
use rs_protocol::{RsId, Timestamp};
use rs_tests::deploy::{Deployment, Extra};

use crate::Figure;
use crate::forward::{exe, median, rss_mb};

/// Counters of the load generator.
#[derive(Default)]
struct Gen {
    /// Polls sent and not answered yet (held by the MLM).
    held: AtomicU64,
    answered: AtomicU64,
    failed: AtomicU64,
}

/// One simulated proxy: long-polls `mlm` as `sender` until `stop`.
async fn proxy(
    http: reqwest::Client,
    url: String,
    sender: RsId,
    g: Arc<Gen>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut meta = EnvelopeMeta::new(sender.clone(), Timestamp::now());
        meta.poll = Some(Duration::from_secs(25));
        let enc = EnvelopeWriter::new(&meta).finish();
        g.held.fetch_add(1, Ordering::Relaxed);
        let r = http
            .post(&url)
            .header("content-type", enc.content_type)
            .body(enc.body)
            .send()
            .await;
        g.held.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(r) if r.status() == 200 => {
                let _ = r.bytes().await;
                g.answered.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                g.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

struct Sample {
    idle: f64,
    held: f64,
    polls: u64,
}

async fn one(n: usize, dir: &std::path::Path) -> anyhow::Result<Sample> {
    let _ = std::fs::remove_dir_all(dir);
    let exe = exe()?;
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let a = d.appserver("127.0.0.1:0", "heartbeat_secs = 3600")?;
    let m = d.mlm(
        "mlm",
        "acme.m1",
        std::slice::from_ref(&a),
        &Extra {
            top: format!(
                "max_connections = {}\nbusy_envelopes = {}\n",
                n + 512,
                n + 512
            ),
            ..Extra::default()
        },
    )?;
    let pid = d
        .node("mlm")
        .child
        .as_ref()
        .map(std::process::Child::id)
        .ok_or_else(|| anyhow::anyhow!("no MLM process"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_mb(pid).ok_or_else(|| anyhow::anyhow!("no RSS"))?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(n)
        .timeout(Duration::from_secs(60))
        .build()?;
    let (g, stop) = (Arc::new(Gen::default()), Arc::new(AtomicBool::new(false)));
    let url = format!("http://{m}/rs/v1/envelope");
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let sender = RsId::new(format!("acme.p{}", i + 1))?;
        tasks.push(tokio::spawn(proxy(
            http.clone(),
            url.clone(),
            sender,
            g.clone(),
            stop.clone(),
        )));
        if i % 500 == 499 {
            // A ramp, as sites come up: the accept queue is not a flood test.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // All held (each poll waits up to 25 s), then sample while they stay.
    let t0 = Instant::now();
    while g.held.load(Ordering::Relaxed) < n as u64 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = g.held.load(Ordering::Relaxed);
    anyhow::ensure!(
        held >= n as u64 * 99 / 100,
        "only {held} of {n} polls are held ({} failed)",
        g.failed.load(Ordering::Relaxed)
    );
    let mut v = Vec::new();
    for _ in 0..5 {
        v.push(rss_mb(pid).ok_or_else(|| anyhow::anyhow!("no RSS"))?);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rss = v.iter().copied().fold(0.0, f64::max);
    let polls = g.held.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    d.stop_all();
    for t in tasks {
        t.abort();
    }
    let _ = std::fs::remove_dir_all(dir);
    eprintln!(
        "  idle {idle:.1} MB, {polls} polls held: {rss:.1} MB ({} answered, {} failed)",
        g.answered.load(Ordering::Relaxed),
        g.failed.load(Ordering::Relaxed)
    );
    Ok(Sample {
        idle,
        held: rss,
        polls,
    })
}

pub(crate) fn run(runs: usize, n: usize) -> anyhow::Result<Vec<Figure>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("rs-bench-longpoll-{}", std::process::id()));
    let (mut held, mut idle, mut polls) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("rs-bench longpoll: run {} of {runs}, {n} proxies", i + 1);
        let s = rt.block_on(one(n, &dir))?;
        held.push(s.held);
        idle.push(s.idle);
        polls.push(s.polls);
    }
    let command =
        format!("cargo run --release -p rs-bench -- longpoll --proxies {n} --runs {runs}");
    let value = median(&mut held.clone());
    let idle_mb = median(&mut idle);
    Ok(vec![Figure::measured(
        "rss_mlm_10k_longpoll_mb",
        format!(
            "resident memory of rs-mlm (max of 5 samples) while {n} simulated proxies (a load generator, one connection and one sender ID each) hold a 25 s long poll on it; at least {} polls held in every run; {idle_mb:.1} MB idle before",
            polls.iter().min().copied().unwrap_or(0)
        ),
        value,
        "MB",
        "lower",
        held.len(),
        crate::spread(&held),
        &command,
    )])
}
