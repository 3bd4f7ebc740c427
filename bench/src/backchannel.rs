//! The back-channel benchmark (`cargo run --release -p rs-bench --
//! backchannel`), on real processes over loopback:
//!
//! - latency: a control action from the API call until the proxy applies
//!   it (the `created` time of its response, written when it applied the
//!   action; one host, one clock), through appserver -> MLM -> proxy with
//!   long polls held; and the round trip until the job is seen done.
//!   Actions are sent one at a time, a random 20-120 ms apart, as an admin
//!   or a script would.
//! - group fan-out: bytes crossing the appserver -> MLM link (counted by a
//!   TCP relay on that link) for one configChange to a group of 10, 100
//!   and 1,000 proxies, against the same sent as one unicast per proxy.
//!   The proxies are simulated at the MLM (each posts one heartbeat, so
//!   every tier learns its route): the link, not the proxies, is measured.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rs_protocol::codec::Limits;
use rs_protocol::codec::api::{GroupDef, decode_job, encode_group};
use rs_protocol::control::{NodeState, StatusNode};
use rs_protocol::control_messages::status_message;
use rs_protocol::model::EnvelopeMeta;
use rs_protocol::{ComponentKind, CustomerId, RsId, Timestamp};
use rs_tests::deploy::{Deployment, Extra, server_metrics};

use crate::{Figure, percentile, spread};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) actions: usize,
}

async fn post(http: &reqwest::Client, a: &str, body: String) -> anyhow::Result<String> {
    let r = http
        .post(format!("http://{a}/rs/v1/control/send"))
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "send: {}", r.status());
    Ok(r.text().await?)
}

async fn until_done(http: &reqwest::Client, a: &str, doc: &str) -> anyhow::Result<()> {
    let mut job = decode_job(doc.as_bytes(), &Limits::default())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job.is_done() {
        anyhow::ensure!(Instant::now() < deadline, "job {} did not finish", job.id);
        let b = http
            .get(format!(
                "http://{a}/rs/v1/control/jobs/{}?after={}&wait=25",
                job.id, job.version
            ))
            .send()
            .await?
            .bytes()
            .await?;
        job = decode_job(&b, &Limits::default())?;
    }
    anyhow::ensure!(
        job.count("succeeded") == job.targets.len(),
        "job {} ended with failures",
        job.id
    );
    Ok(())
}

/// (one-way ms, round-trip ms) per action, to `proxies` proxies behind the
/// MLM (each action to one of them, at random).
pub(crate) async fn latency(
    exe: &Path,
    dir: &Path,
    n: usize,
    proxies: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let (a, m) = d.server_and_mlm()?;
    for i in 1..=proxies.max(1) {
        d.proxy(
            &format!("p{i}"),
            &format!("acme.p{i}"),
            std::slice::from_ref(&m),
            &Extra::default(),
        )?;
    }
    let r = timed_actions(&a, n, proxies).await;
    d.stop_all();
    r
}

/// Sends `n` ping actions through the server at `a`, one at a time, each
/// to one of the proxies `acme.p1`..`acme.p{proxies}` at random, after a
/// first action to each (routes known, connections open): (one-way ms,
/// round-trip ms) per timed action.
pub(crate) async fn timed_actions(
    a: &str,
    n: usize,
    proxies: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (one_way, round, _) = timed_actions_taken(a, n, proxies, &[]).await?;
    Ok((one_way, round))
}

/// What an MLM at `m` reports as taken from upstream
/// (`backchannel.taken`).
async fn taken(m: &str) -> u64 {
    rs_tests::deploy::server_metrics(m)
        .await
        .ok()
        .and_then(|x| x.get("backchannel.taken").copied())
        .unwrap_or(0)
}

/// [`timed_actions`], also telling for each timed action its destination
/// and which of the farm `members` (MLM addresses) took it from the
/// server (the one whose `backchannel.taken` grew; none when it cannot be
/// told).
pub(crate) async fn timed_actions_taken(
    a: &str,
    n: usize,
    proxies: usize,
    members: &[String],
) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<(String, Option<usize>)>)> {
    let a = a.to_owned();
    let http = reqwest::Client::new();
    // Warm up: every proxy reachable (its route known, a first action
    // through) before timing starts.
    for i in 1..=proxies.max(1) {
        let wait = if i == 1 { 30 } else { 60 };
        let deadline = Instant::now() + Duration::from_secs(wait);
        loop {
            match post(
                &http,
                &a,
                format!(r#"<send><to id="acme.p{i}"/><control action="ping"/></send>"#),
            )
            .await
            {
                Ok(doc) => {
                    until_done(&http, &a, &doc).await?;
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut sent: Vec<(String, String, i64, Duration)> = Vec::with_capacity(n);
    let mut takers = Vec::with_capacity(n);
    for _ in 0..n {
        tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..100))).await;
        let to = format!("acme.p{}", 1 + fastrand::usize(0..proxies.max(1)));
        let mut before = Vec::with_capacity(members.len());
        for m in members {
            before.push(taken(m).await);
        }
        let t0 = Timestamp::now().as_millis();
        let start = Instant::now();
        let doc = post(
            &http,
            &a,
            format!(r#"<send><to id="{to}"/><control action="ping"/></send>"#),
        )
        .await?;
        until_done(&http, &a, &doc).await?;
        let rt = start.elapsed();
        let mut grew = Vec::new();
        for (k, m) in members.iter().enumerate() {
            if taken(m).await > before[k] {
                grew.push(k);
            }
        }
        takers.push((to.clone(), (grew.len() == 1).then(|| grew[0])));
        let job = decode_job(doc.as_bytes(), &Limits::default())?;
        sent.push((job.message, to, t0, rt));
    }
    // When each action was applied: its response's creation time.
    let mut applied = std::collections::HashMap::new();
    let mut asked: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    asked.sort_unstable();
    asked.dedup();
    let mut body = String::new();
    for to in asked {
        body.push_str(
            &http
                .get(format!(
                    "http://{a}/rs/v1/control/messages?type=response&component={to}&limit=10000"
                ))
                .send()
                .await?
                .text()
                .await?,
        );
    }
    for m in body.split("<message ").skip(1) {
        let attr = |name: &str| -> Option<String> {
            let k = format!("{name}=\"");
            let i = m.find(&k)? + k.len();
            Some(m[i..i + m[i..].find('"')?].to_owned())
        };
        if let (Some(created), Some(reference)) = (attr("created"), attr("ref")) {
            applied.insert(reference, Timestamp::parse(&created)?.as_millis());
        }
    }
    let mut one_way = Vec::new();
    let mut round = Vec::new();
    for (msg, _, t0, rt) in sent {
        let at = applied
            .get(&msg)
            .ok_or_else(|| anyhow::anyhow!("no response stored for {msg}"))?;
        one_way.push((at - t0).max(0) as f64);
        round.push(rt.as_secs_f64() * 1000.0);
    }
    Ok((one_way, round, takers))
}

/// Posts one heartbeat from each of `ids` to the MLM at `m`, as if each
/// were a proxy calling in.
pub(crate) async fn simulate(http: &reqwest::Client, m: &str, ids: &[RsId]) -> anyhow::Result<()> {
    for id in ids {
        let now = Timestamp::now();
        let meta = EnvelopeMeta::new(id.clone(), now);
        let tree = StatusNode {
            id: Some(id.clone()),
            version: Some("bench".into()),
            ..StatusNode::new("proxy", NodeState::Ok)
        };
        let msg = status_message(
            id.clone(),
            rs_protocol::control::SUB_COLD_START,
            &tree,
            now,
            Duration::from_secs(3600),
            5,
        );
        let mut w = rs_protocol::codec::EnvelopeWriter::new(&meta);
        w.push(&msg);
        let enc = w.finish();
        let r = http
            .post(format!("http://{m}/rs/v1/envelope"))
            .header("content-type", enc.content_type)
            .body(enc.body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "simulated {id}: {}", r.status());
    }
    Ok(())
}

/// Waits until the MLM holds `n` back-channel messages.
async fn pending_at(m: &str, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = server_metrics(m)
            .await?
            .get("backchannel.pending")
            .copied()
            .unwrap_or(0);
        if got >= n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "MLM holds {got} of {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A ~1 KB configuration change, escaped for the send document.
fn config_payload() -> String {
    let mut s = String::from("heartbeat_secs = 300\n[upstream]\npoll_hold_secs = 20\n");
    while s.len() < 1024 {
        s.push_str("# provider note: rolled out by the weekly maintenance window\n");
    }
    s
}

/// For each group size: (group bytes, unicast bytes, payload crossings).
async fn fanout(
    exe: &Path,
    dir: &Path,
    sizes: &[usize],
) -> anyhow::Result<Vec<(usize, u64, u64, u64)>> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let a = d.appserver("127.0.0.1:0", "")?;
    let (relay, link) = rs_tests::relay::start(a.clone()).await?;
    let m = d.mlm(
        "mlm",
        "rs.m1",
        std::slice::from_ref(&relay),
        &Extra::default(),
    )?;
    let http = reqwest::Client::new();
    let payload = config_payload();
    let control = format!(r#"<control action="configChange"><config>{payload}</config></control>"#);
    let mut out = Vec::new();
    let mut pending = 0u64;
    for &k in sizes {
        let customer = format!("g{k}");
        let ids: Vec<RsId> = (1..=k)
            .map(|i| RsId::new(format!("{customer}.p{i}")))
            .collect::<Result<_, _>>()?;
        simulate(&http, &m, &ids).await?;
        // The server knows them all, through the MLM.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let g = GroupDef {
                name: customer.clone(),
                customer: Some(CustomerId::new(&customer)?),
                kind: Some(ComponentKind::Proxy),
                ..GroupDef::default()
            };
            let r = http
                .put(format!("http://{a}/rs/v1/control/groups/{customer}"))
                .body(encode_group(&g))
                .send()
                .await?
                .text()
                .await?;
            if r.contains(&format!("size=\"{k}\"")) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "group {customer}: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        link.count(&payload[..40]);
        let before_seen = link.seen(&payload[..40]);
        let b0 = link.down_bytes.load(Ordering::Relaxed);
        post(
            &http,
            &a,
            format!(r#"<send><to group="{customer}"/>{control}</send>"#),
        )
        .await?;
        pending += k as u64;
        pending_at(&m, pending).await?;
        let group_bytes = link.down_bytes.load(Ordering::Relaxed) - b0;
        let crossings = link.seen(&payload[..40]) - before_seen;

        let b0 = link.down_bytes.load(Ordering::Relaxed);
        for id in &ids {
            post(
                &http,
                &a,
                format!(r#"<send><to id="{id}"/>{control}</send>"#),
            )
            .await?;
        }
        pending += k as u64;
        pending_at(&m, pending).await?;
        let unicast_bytes = link.down_bytes.load(Ordering::Relaxed) - b0;
        eprintln!(
            "  {k} proxies: group {group_bytes} B (payload crossed {crossings}x), unicast {unicast_bytes} B"
        );
        out.push((k, group_bytes, unicast_bytes, crossings));
    }
    d.stop_all();
    Ok(out)
}

pub(crate) fn run(s: &Settings) -> anyhow::Result<Vec<Figure>> {
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-back-{}", std::process::id()));
    eprintln!("rs-bench backchannel: latency, {} actions", s.actions);
    let (mut one_way, mut round) =
        rt.block_on(latency(&exe, &tmp.join("latency"), s.actions, 1))?;
    eprintln!("rs-bench backchannel: group fan-out");
    let fan = rt.block_on(fanout(&exe, &tmp.join("fanout"), &[10, 100, 1000]))?;
    let _ = std::fs::remove_dir_all(&tmp);
    let command = format!(
        "cargo run --release -p rs-bench -- backchannel --actions {}",
        s.actions
    );
    let (n, mm) = (one_way.len(), spread(&one_way));
    let base = |id: &str, what: String, value: f64, unit: &str, better: &str| {
        Figure::measured(id, what, value, unit, better, n, mm, &command)
    };
    let mut figs = vec![
        base(
            "backchannel_p50_ms",
            "control action from the API call until the proxy applies it, appserver -> MLM -> proxy with long polls held, median".into(),
            percentile(&mut one_way, 0.5),
            "ms",
            "lower",
        ),
        Figure {
            target: Some("< 100 ms".into()),
            ..base(
                "backchannel_p99_ms",
                "the same, 99th percentile".into(),
                percentile(&mut one_way, 0.99),
                "ms",
                "lower",
            )
        },
        {
            let (rmin, rmax) = (
                round.iter().copied().fold(f64::INFINITY, f64::min),
                round.iter().copied().fold(0.0, f64::max),
            );
            Figure {
                min: rmin,
                max: rmax,
                ..base(
                    "backchannel_roundtrip_p99_ms",
                    "control action from the API call until its job is seen done (the response back up through the MLM), 99th percentile".into(),
                    percentile(&mut round, 0.99),
                    "ms",
                    "lower",
                )
            }
        },
    ];
    for (k, group, unicast, crossings) in fan {
        figs.push(Figure {
            runs: 1,
            min: group as f64,
            max: group as f64,
            peer: Some(format!("{k} unicasts of the same action")),
            peer_value: Some(unicast as f64),
            ratio: Some(group as f64 / unicast as f64),
            target: Some(format!(
                "payload crosses once (crossed {crossings}x)"
            )),
            ..base(
                &format!("group_link_bytes_n{k}"),
                format!(
                    "bytes on the appserver -> MLM link for one ~1 KB configChange to a group of {k} proxies behind the MLM"
                ),
                group as f64,
                "bytes",
                "lower",
            )
        });
    }
    Ok(figs)
}
