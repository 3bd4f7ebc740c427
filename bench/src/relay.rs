//! The MLM as a relay of small envelopes, against nginx (issue 9): the
//! same POSTs of one-alarm envelopes (about 1.5 KB, each a new message)
//! from 16 concurrent simulated proxies, through rs-mlm (synchronous relay:
//! headers decoded, modules and throttle, routing hop appended, forwarded,
//! each message answered with the server's outcome) and through nginx
//! `proxy_pass` (bench/nginx/relay.conf) to the same application server,
//! which stores every message either way. Envelopes per second, median of
//! the runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rs_protocol::codec::EnvelopeWriter;
use rs_protocol::model::*;
use rs_protocol::{MessageId, RsId, Timestamp};
use rs_tests::deploy::Deployment;

use crate::{Figure, spread};

const POSTERS: usize = 16;
/// Envelopes each poster sends per run: 32,000 a side, long enough that
/// connection set-up and warm-up do not weigh.
const PER_POSTER: usize = 2000;

fn alarm(from: &RsId, i: usize) -> Message {
    Message {
        header: Header {
            id: MessageId::generate(),
            created: Timestamp::now(),
            class: Classification::new("monitoring", "alarm"),
            route: Route::Source(Source {
                component: from.clone(),
                version: "bench".into(),
                qos: Qos {
                    expiry: None,
                    precedence: 6,
                    persistent: true,
                },
            }),
            routing: Default::default(),
        },
        content: Content::Alarm(Alarm {
            severity: Severity::Major,
            state: AlarmState::Raised,
            instance: None,
            key: Some(format!("bench:{i}")),
            text: format!(
                "filesystem /var is 91% full on host {i}; {}",
                "x".repeat(900)
            ),
            details: vec![Detail::new("mount", "/var")],
        }),
    }
}

/// Envelopes per second through `at` (host:port).
async fn load(at: &str, run: usize) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..POSTERS)
        .map(|p| {
            let (http, at, done) = (http.clone(), at.to_owned(), done.clone());
            tokio::spawn(async move {
                let me = RsId::new(format!("r{run}.p{}", p + 1))?;
                for i in 0..PER_POSTER {
                    let mut w =
                        EnvelopeWriter::new(&EnvelopeMeta::new(me.clone(), Timestamp::now()));
                    w.push(&alarm(&me, i));
                    let enc = w.finish();
                    let r = http
                        .post(format!("http://{at}/rs/v1/envelope"))
                        .header("content-type", enc.content_type)
                        .body(enc.body)
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "POST: {}", r.status());
                    let body = r.text().await?;
                    anyhow::ensure!(body.contains("status=\"accepted\""), "not accepted: {body}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

pub(crate) fn run(runs: usize) -> anyhow::Result<Vec<Figure>> {
    crate::bulk::ensure_nginx()?;
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("rs-bench-relay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let r = rt.block_on(async {
        let mut d = Deployment::plain(&dir, &exe)?; // plain HTTP, as the peers run
        let (a, m) = d.server_and_mlm()?;
        let nginx = crate::bulk::start_nginx(&dir.join("nginx"), &a)?;
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        for i in 0..runs {
            eprintln!("rs-bench relay: run {} of {runs}", i + 1);
            // Each side goes first in turn, so neither always meets a
            // server the other has warmed (or filled).
            if i % 2 == 0 {
                ours.push(load(&m, 2 * i).await?);
                peer.push(load(&nginx.addr, 2 * i + 1).await?);
            } else {
                peer.push(load(&nginx.addr, 2 * i + 1).await?);
                ours.push(load(&m, 2 * i).await?);
            }
            eprintln!("  envelopes/s: rs-mlm {:.0}, nginx {:.0}", ours[i], peer[i]);
        }
        drop(nginx);
        d.stop_all();
        anyhow::Ok((ours, peer))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let (ours, peer) = r?;
    let command = format!("cargo run --release -p rs-bench -- relay --runs {runs}");
    let (v, pv) = (
        crate::forward::median(&mut ours.clone()),
        crate::forward::median(&mut peer.clone()),
    );
    Ok(vec![Figure {
        peer: Some(
            "nginx proxy_pass of the same POSTs (bench/nginx/relay.conf: a worker per core, 64 KiB buffers, 32 idle upstream connections kept per worker, more than the 16 posters), each side first in turn, same run".into(),
        ),
        peer_value: Some(pv),
        ratio: Some(v / pv),
        target: Some(">= 1.0x nginx".into()),
        ..Figure::measured(
            "relay_small_envelopes_per_s",
            format!(
                "one-alarm envelopes (about 1.5 KB, each a new message) relayed by rs-mlm to the application server and answered with its outcomes, {POSTERS} concurrent simulated proxies, {} envelopes a side per run, stored at the server (SQLite, WAL, synchronous=FULL, either way)",
                POSTERS * PER_POSTER
            ),
            v,
            "envelopes/s",
            "higher",
            ours.len(),
            spread(&ours),
            &command,
        )
    }])
}
