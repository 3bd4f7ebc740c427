//! The throttle benchmark (`cargo run --release -p rs-bench -- throttle`):
//!
//! - the cost of one throttle check, with five rules of every kind (a
//!   window, a per-customer byte rate, a message rate, a daily quota per
//!   component, an exemption), against the per-message time of the durable
//!   forward path measured in the same run (as the `forward` group
//!   measures it, 20,000 messages): the check must not show in that figure;
//! - the accuracy of a rate limit under twice the load: a real proxy with
//!   a 200 messages/s rule, fed 400 alarms/s by integrator clients for
//!   20 s; the rate at which the application server stores them, over the
//!   steady part (after the first burst), against 200/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rs_node::throttle::{Per, Period, Rule, Subject, Throttle, ThrottleConfig};
use rs_protocol::RsId;
use rs_protocol::model::ContentKind;
use rs_protocol::time::SystemClock;
use rs_tests::deploy::{Deployment, Extra};

use crate::Figure;

fn rules() -> ThrottleConfig {
    ThrottleConfig {
        rule: vec![
            Rule {
                name: "night-bulk".into(),
                class: Some("bulk".into()),
                window: Some("22:00-06:00".into()),
                time_zone: Some("Europe/Berlin".into()),
                ..Rule::default()
            },
            Rule {
                name: "site".into(),
                per: Per::Customer,
                bytes_per_sec: Some(1_000_000_000),
                ..Rule::default()
            },
            Rule {
                name: "msgs".into(),
                per: Per::Component,
                messages_per_sec: Some(1e9),
                ..Rule::default()
            },
            Rule {
                name: "daily".into(),
                per: Per::Component,
                quota_bytes: Some(u64::MAX / 2),
                quota_period: Some(Period::Day),
                time_zone: Some("America/New_York".into()),
                ..Rule::default()
            },
            Rule {
                name: "quiet".into(),
                class: Some("chatty".into()),
                messages_per_sec: Some(10.0),
                exempt_precedence: Some(8),
                ..Rule::default()
            },
        ],
        ..ThrottleConfig::default()
    }
}

/// Nanoseconds per check (median of 5 rounds of 200,000).
fn check_cost() -> anyhow::Result<(f64, f64, f64)> {
    let t =
        Throttle::new(&rules(), Arc::new(SystemClock), None, None).map_err(anyhow::Error::msg)?;
    let ids: Vec<RsId> = (0..100)
        .map(|i| RsId::new(format!("acme.p{i}")))
        .collect::<Result<_, _>>()?;
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let n = 200_000;
        let start = Instant::now();
        for i in 0..n {
            let s = Subject {
                component: &ids[i % ids.len()],
                class: "monitoring",
                kind: ContentKind::Alarm,
                bytes: 2048,
                precedence: 5,
                severity: None,
            };
            std::hint::black_box(t.check(&s));
        }
        rounds.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok((rounds[2], rounds[0], rounds[4]))
}

/// Stored messages/s over the steady part of a 2x overload.
async fn accuracy(exe: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let a = d.appserver("127.0.0.1:0", "")?;
    let s = d.proxy(
        "p1",
        "acme.p1",
        std::slice::from_ref(&a),
        &Extra {
            tables: "[[throttle.rule]]\nname = \"rate\"\nclass = \"monitoring\"\nmessages_per_sec = 200.0\n"
                .into(),
            ..Extra::default()
        },
    )?;
    let c = rs_proxy::client::Client::new(&s);
    c.register_integrator("bench", "1.0", "linux").await?;
    // 400 alarms a second for 20 s.
    let start = Instant::now();
    // Eight clients, each 50 a second (one client alone cannot keep 400/s:
    // every call waits for its message to be durable).
    let feeders: Vec<_> = (0..8u64)
        .map(|f| {
            let s = s.clone();
            tokio::spawn(async move {
                let c = rs_proxy::client::Client::new(&s);
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut i = 0u64;
                while start.elapsed() < Duration::from_secs(20) {
                    tick.tick().await;
                    c.send("alarm", &crate::forward::alarm(f * 1_000_000 + i))
                        .await?;
                    i += 1;
                }
                anyhow::Ok(i)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (t0, n0) = (Instant::now(), crate::forward::stored(&a).await);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (t1, n1) = (Instant::now(), crate::forward::stored(&a).await);
    let mut fed = 0;
    for f in feeders {
        fed += f.await??;
    }
    anyhow::ensure!(
        fed as f64 > 20.0 * 300.0,
        "the feeder fell behind ({fed} sent)"
    );
    d.stop_all();
    Ok((n1 - n0) as f64 / (t1 - t0).as_secs_f64())
}

pub(crate) fn run() -> anyhow::Result<Vec<Figure>> {
    let (ns, min, max) = check_cost()?;
    eprintln!("  throttle check: {ns:.0} ns");
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-throttle-{}", std::process::id()));
    // The forward path's time per message, measured here so that the ratio
    // compares figures of one run.
    let forward = crate::forward::Settings {
        messages: 20_000,
        backlog: 0,
        clients: 8,
        batch: 20,
        runs: 1,
        payload: None,
    };
    let mut rates = Vec::new();
    for i in 0..3 {
        crate::forward::quiet_disk(&tmp);
        let o = rt.block_on(crate::forward::ours(
            &exe,
            &forward,
            &tmp.join(format!("forward{i}")),
            false,
            false,
        ))?;
        eprintln!("  forward path: {:.0} messages/s", o.rate);
        rates.push(o.rate);
    }
    let per_message_ns = 1e9 / crate::forward::median(&mut rates);
    let mut rates = Vec::new();
    for i in 0..3 {
        let r = rt.block_on(accuracy(&exe, &tmp.join(format!("run{i}"))))?;
        eprintln!("  rate under 2x load: {r:.1}/s against 200/s");
        rates.push(r);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let errors: Vec<f64> = rates
        .iter()
        .map(|r| (r - 200.0).abs() / 200.0 * 100.0)
        .collect();
    let mut sorted = errors.clone();
    sorted.sort_by(f64::total_cmp);
    let at = crate::now();
    let machine = crate::machine();
    Ok(vec![
        Figure {
            id: "throttle_check_ns".into(),
            what: "one throttle check against five rules (window in a time zone, per-customer byte rate, per-component message rate, daily quota, an exemption), 100 components".into(),
            value: ns,
            unit: "ns".into(),
            runs: 5,
            min,
            max,
            peer: Some("time per message of the durable forward path in the same run (20,000 2 KB alarms, 8 clients, batches of 20, as forward_msgs_per_s)".into()),
            peer_value: Some(per_message_ns),
            ratio: Some(ns / per_message_ns),
            better: "lower".into(),
            command: "cargo run --release -p rs-bench -- throttle".into(),
            measured_at: at.clone(),
            target: Some("ratio < 0.01 (does not show in the forward figure)".into()),
            machine: Some(machine.clone()),
        },
        Figure {
            id: "throttle_rate_error_pct".into(),
            what: "error of a 200 messages/s proxy rule under 400/s offered, as stored per second at the server over the steady 12 s".into(),
            value: sorted[sorted.len() / 2],
            unit: "%".into(),
            runs: errors.len() as u32,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            peer: None,
            peer_value: None,
            ratio: None,
            better: "lower".into(),
            command: "cargo run --release -p rs-bench -- throttle".into(),
            measured_at: at,
            target: Some("< 5 %".into()),
            machine: Some(machine),
        },
    ])
}
