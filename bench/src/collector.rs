//! The collector benchmark (`cargo run --release -p rs-bench --
//! collector`): what subscriptions cost the path that answers the tiers
//! below. A real application server; 0, 1 and 5 webhook subscriptions that
//! each take every alarm, delivered to a local receiver that answers at
//! once; several simulated proxies POSTing envelopes of 20 alarms straight
//! to the server, each waiting for its reply before the next. Measured per
//! subscription count: the ingest rate (alarms acknowledged per second)
//! and the reply latency of each POST (p50, p99), and the deliveries per
//! second until the last is made. The point of the core/peripheral split
//! is that the first two stay where they are with no subscriptions: the
//! peripheral work waits while replies are being made (at most a second at
//! a time) and drains after.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rs_protocol::model::*;
use rs_protocol::{MessageId, RsId, Timestamp};
use rs_tests::deploy::Deployment;

use crate::{Figure, percentile, spread};

/// Envelopes each simulated proxy posts in a run, and alarms per envelope.
const ENVELOPES: usize = 150;
const PER_ENVELOPE: usize = 20;
const PROXIES: usize = 4;

/// A webhook receiver that accepts everything; returns its address and
/// the count of deliveries.
async fn receiver() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let got = Arc::new(AtomicU64::new(0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let g = g.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
                let mut s = tokio::io::BufReader::new(s);
                loop {
                    // A minimal HTTP/1.1 server: headers, a Content-Length
                    // body, "200" (keep-alive). Enough for the processors'
                    // client and cheaper than the server under test.
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    g.fetch_add(1, Ordering::Relaxed);
                    if s.get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, got))
}

fn alarm(proxy: &RsId, i: usize) -> Message {
    let now = Timestamp::now();
    Message {
        header: Header {
            id: MessageId::generate(),
            created: now,
            class: Classification::new("monitoring", "disk"),
            route: Route::Source(Source {
                component: proxy.clone(),
                version: "bench".into(),
                qos: Qos {
                    expiry: None,
                    precedence: 5,
                    persistent: true,
                },
            }),
            routing: Default::default(),
        },
        content: Content::Alarm(Alarm {
            severity: Severity::Major,
            state: AlarmState::Raised,
            instance: None,
            key: Some(format!("disk:{i}")),
            text: format!("filesystem /var/lib/db{i} is 97% full; 1.2 GB left of 40 GB"),
            details: vec![],
        }),
    }
}

/// One run: (alarms acknowledged per second, reply latencies in ms,
/// deliveries made while it ran).
async fn one(
    exe: &std::path::Path,
    dir: &std::path::Path,
    subs: usize,
) -> anyhow::Result<(f64, Vec<f64>, u64, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let a = d.appserver("127.0.0.1:0", "task_max_attempts = 1000")?;
    let (hook, got) = receiver().await?;
    let http = reqwest::Client::new();
    for s in 0..subs {
        let r = http
            .post(format!("http://{a}/rs/v1/control/subscriptions"))
            .body(format!(
                r#"<subscription name="s{s}" type="alarm" delivery="webhook" url="http://{hook}/hook/{s}"/>"#
            ))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "subscribe: {}", r.status());
    }
    let start = Instant::now();
    let posters: Vec<_> = (0..PROXIES)
        .map(|p| {
            let (http, a) = (http.clone(), a.clone());
            tokio::spawn(async move {
                let id = RsId::new(format!("acme.p{p}"))?;
                let mut lat = Vec::with_capacity(ENVELOPES);
                for e in 0..ENVELOPES {
                    let meta = EnvelopeMeta::new(id.clone(), Timestamp::now());
                    let mut w = rs_protocol::codec::EnvelopeWriter::new(&meta);
                    for i in 0..PER_ENVELOPE {
                        w.push(&alarm(&id, e * PER_ENVELOPE + i));
                    }
                    let enc = w.finish();
                    let t = Instant::now();
                    let r = http
                        .post(format!("http://{a}/rs/v1/envelope"))
                        .header("content-type", enc.content_type)
                        .body(enc.body)
                        .send()
                        .await?;
                    let ok = r.status().is_success();
                    let body = r.text().await?;
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    anyhow::ensure!(ok, "envelope refused: {body}");
                    anyhow::ensure!(
                        body.matches("status=\"accepted\"").count() == PER_ENVELOPE,
                        "not every alarm was accepted: {body}"
                    );
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for p in posters {
        lat.extend(p.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    let delivered = got.load(Ordering::Relaxed);
    // Every delivery is made in the end (a sanity check of the setup).
    let want = (subs * PROXIES * ENVELOPES * PER_ENVELOPE) as u64;
    let loaded = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    while got.load(Ordering::Relaxed) < want {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {want} deliveries made",
            got.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Deliveries per second from the start of the load until the last.
    let deliveries = want as f64 / (secs + loaded.elapsed().as_secs_f64());
    d.stop_all();
    Ok((
        (PROXIES * ENVELOPES * PER_ENVELOPE) as f64 / secs,
        lat,
        delivered,
        deliveries,
    ))
}

pub(crate) fn run(runs: usize) -> anyhow::Result<Vec<Figure>> {
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-collector-{}", std::process::id()));
    // Runs interleave the subscription counts so drift on a shared machine
    // hits each alike.
    let counts = [0usize, 1, 5];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
    let mut lats: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
    let mut drains: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
    for run in 0..runs {
        for (k, &subs) in counts.iter().enumerate() {
            let (rate, mut lat, during, deliveries) =
                rt.block_on(one(&exe, &tmp.join(format!("r{run}-s{subs}")), subs))?;
            eprintln!(
                "  {subs} subscriptions: {rate:.0} alarms/s, reply p50 {:.1} ms p99 {:.1} ms, {during} deliveries during the load, all delivered at {deliveries:.0}/s",
                percentile(&mut lat, 0.5),
                percentile(&mut lat, 0.99)
            );
            drains[k].push(deliveries);
            p99s[k].push(percentile(&mut lat, 0.99));
            rates[k].push(rate);
            lats[k].extend(lat);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let command = format!("cargo run --release -p rs-bench -- collector --runs {runs}");
    let base = |id: &str, what: String, value: f64, unit: &str, better: &str, mm: (f64, f64)| {
        Figure::measured(id, what, value, unit, better, runs, mm, &command)
    };
    let mut figs = Vec::new();
    let rate0 = crate::forward::median(&mut rates[0].clone());
    // A run's p99 can be one hiccup of the shared machine: the figure is
    // the median over runs of each run's p99 (min and max: the runs').
    let p99_0 = crate::forward::median(&mut p99s[0].clone());
    for (k, &subs) in counts.iter().enumerate() {
        let rate = crate::forward::median(&mut rates[k].clone());
        let p50 = percentile(&mut lats[k], 0.5);
        let p99 = crate::forward::median(&mut p99s[k].clone());
        let with = |f: Figure, peer: f64, target: &str| Figure {
            peer: (subs > 0).then(|| "the same with no subscriptions".into()),
            peer_value: (subs > 0).then_some(peer),
            ratio: (subs > 0).then_some(f.value / peer),
            target: (subs > 0).then(|| target.into()),
            ..f
        };
        let what = |s: &str| {
            format!(
                "{s}, {PROXIES} simulated proxies posting envelopes of {PER_ENVELOPE} alarms straight to the appserver, {subs} webhook subscription(s) taking every alarm"
            )
        };
        figs.push(with(
            base(
                &format!("ingest_msgs_per_s_{subs}_subs"),
                what("alarms acknowledged per second"),
                rate,
                "msgs/s",
                "higher",
                spread(&rates[k]),
            ),
            rate0,
            ">= 0.8 (within 20% of none)",
        ));
        figs.push(base(
            &format!("reply_p50_ms_{subs}_subs"),
            what("reply latency of one envelope POST, median of all runs"),
            p50,
            "ms",
            "lower",
            spread(&[p50]),
        ));
        figs.push(with(
            base(
                &format!("reply_p99_ms_{subs}_subs"),
                what(
                    "reply latency of one envelope POST, 99th percentile (median of the runs' p99)",
                ),
                p99,
                "ms",
                "lower",
                spread(&p99s[k]),
            ),
            p99_0,
            "does not grow with subscriptions (ratio about 1)",
        ));
        if subs > 0 {
            figs.push(base(
                &format!("deliveries_per_s_{subs}_subs"),
                what("webhook deliveries per second from the start of the load until the last was made (the peripheral work the burst caused: it waits while replies are being made, at most 1 s at a time, then drains)"),
                crate::forward::median(&mut drains[k].clone()),
                "deliveries/s",
                "higher",
                spread(&drains[k]),
            ));
        }
    }
    Ok(figs)
}
