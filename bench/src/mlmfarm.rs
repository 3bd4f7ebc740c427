//! An MLM farm's back-channel (`cargo run --release -p rs-bench --
//! mlmfarm`): the one-way latency of control actions (from the API call
//! until the proxy applied the action: its response's creation time, one
//! host, one clock) to four proxies split across two MLM members on one
//! PostgreSQL database, against the same four proxies behind one MLM on
//! its SQLite queue, alternating in one run, the same actions (pings, one
//! at a time, 20-120 ms apart, each to a proxy at random).
//!
//! In the farm both members hold a long poll on the server; whichever the
//! server answers takes the action and commits the proxy's copy to the
//! farm's queue. When the proxy long-polls the other member, that member
//! hands the copy out when the commit's notification wakes it (`NOTIFY
//! rs_mlm_<id>`); with the proxies split two and two, the farm's p99
//! includes that cross-member path.
//! Durability: the server on SQLite (WAL, synchronous=FULL) in both; the
//! farm's queue on PostgreSQL with fsync and synchronous_commit on, the
//! single MLM's on SQLite (WAL, synchronous=FULL).

use std::path::Path;

use rs_tests::deploy::{Deployment, Extra};
use rs_tests::postgres::Postgres;

use crate::backchannel::timed_actions_taken;
use crate::{Figure, percentile, spread};

const PROXIES: usize = 4;

/// One-way ms of `n` actions to proxies split across a farm of two on
/// `pg`: all of them, and those a member took from the server for a proxy
/// polling the other member (the copy reached the proxy through the
/// farm's database and the notification that woke the other's poll).
async fn farm(
    exe: &Path,
    dir: &Path,
    pg: &Postgres,
    n: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let a = d.appserver("127.0.0.1:0", "")?;
    let farm = Extra {
        top: format!("database = \"{}\"\n", pg.database("bench_mlmfarm")),
        ..Extra::default()
    };
    let members = vec![
        d.mlm("m1", "acme.m1", std::slice::from_ref(&a), &farm)?,
        d.mlm("m2", "acme.m1", std::slice::from_ref(&a), &farm)?,
    ];
    // acme.pI long-polls member I % 2.
    for i in 1..=PROXIES {
        d.proxy(
            &format!("p{i}"),
            &format!("acme.p{i}"),
            std::slice::from_ref(&members[i % 2]),
            &Extra::default(),
        )?;
    }
    let r = timed_actions_taken(&a, n, PROXIES, &members).await;
    d.stop_all();
    let (one_way, _, takers) = r?;
    let cross = one_way
        .iter()
        .zip(&takers)
        .filter(|(_, (to, taker))| {
            let polls = to
                .strip_prefix("acme.p")
                .and_then(|i| i.parse::<usize>().ok())
                .map(|i| i % 2);
            matches!((taker, polls), (Some(t), Some(p)) if *t != p)
        })
        .map(|(ms, _)| *ms)
        .collect();
    Ok((one_way, cross))
}

/// The same with one MLM.
async fn single(exe: &Path, dir: &Path, n: usize) -> anyhow::Result<Vec<f64>> {
    Ok(crate::backchannel::latency(exe, dir, n, PROXIES).await?.0)
}

pub(crate) fn run(runs: usize, actions: usize) -> anyhow::Result<Vec<Figure>> {
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pg = Postgres::start().map_err(anyhow::Error::msg)?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-mlmfarm-{}", std::process::id()));
    let (mut f99, mut f50, mut s99, mut s50) = (vec![], vec![], vec![], vec![]);
    let (mut x99, mut crossed) = (vec![], 0);
    for i in 0..runs {
        eprintln!("rs-bench mlmfarm: run {} of {}: one MLM", i + 1, runs);
        let mut one = rt.block_on(single(&exe, &tmp.join("single"), actions))?;
        eprintln!("rs-bench mlmfarm: run {} of {}: a farm of two", i + 1, runs);
        let (mut two, mut cross) = rt.block_on(farm(&exe, &tmp.join("farm"), &pg, actions))?;
        anyhow::ensure!(
            cross.len() >= actions / 10,
            "only {} of {actions} actions crossed members",
            cross.len()
        );
        crossed += cross.len();
        x99.push(percentile(&mut cross, 0.99));
        s99.push(percentile(&mut one, 0.99));
        s50.push(percentile(&mut one, 0.5));
        f99.push(percentile(&mut two, 0.99));
        f50.push(percentile(&mut two, 0.5));
        eprintln!(
            "  one MLM p50 {:.0} ms p99 {:.0} ms; farm p50 {:.0} ms p99 {:.0} ms; across members p99 {:.0} ms",
            s50[i], s99[i], f50[i], f99[i], x99[i]
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let command =
        format!("cargo run --release -p rs-bench -- mlmfarm --runs {runs} --actions {actions}");
    let what = |q: &str| {
        format!(
            "one-way latency {q} of control actions (API call until the proxy applied it) to {PROXIES} proxies split across a farm of two MLMs on one PostgreSQL (queue fsync and synchronous_commit on), two proxies long-polling each member, each action taken from the server by whichever member it answers, so a proxy on the other member gets its copy when that member's commit wakes its poll; {actions} actions per run, one at a time, 20-120 ms apart; the median of the runs' {q}"
        )
    };
    let mut p99 = Figure::measured(
        "mlm_farm_backchannel_p99_ms",
        what("p99"),
        crate::forward::median(&mut f99.clone()),
        "ms",
        "lower",
        runs,
        spread(&f99),
        &command,
    );
    p99.peer = Some(format!(
        "the same actions to the same {PROXIES} proxies behind one MLM (its queue on SQLite, WAL, synchronous=FULL), same run"
    ));
    p99.peer_value = Some(crate::forward::median(&mut s99.clone()));
    p99.ratio = p99.peer_value.map(|p| p99.value / p);
    p99.target = Some("cross-member delivery under 100 ms at p99 (issue 24)".into());
    let mut p50 = Figure::measured(
        "mlm_farm_backchannel_p50_ms",
        what("p50"),
        crate::forward::median(&mut f50.clone()),
        "ms",
        "lower",
        runs,
        spread(&f50),
        &command,
    );
    p50.peer = p99.peer.clone();
    p50.peer_value = Some(crate::forward::median(&mut s50.clone()));
    p50.ratio = p50.peer_value.map(|p| p50.value / p);
    let mut wake = Figure::measured(
        "mlm_farm_longpoll_wake_p99_ms",
        format!(
            "one-way latency p99 (API call until the proxy applied it) of the control actions of mlm_farm_backchannel_p99_ms that crossed members: taken from the server by one member (its backchannel.taken grew) for a proxy long-polling the other, which handed the copy out when the first member's commit on PostgreSQL notified it; {crossed} such actions over the runs; the median of the runs' p99"
        ),
        crate::forward::median(&mut x99.clone()),
        "ms",
        "lower",
        runs,
        spread(&x99),
        &command,
    );
    wake.peer = p99.peer.clone();
    wake.peer_value = p99.peer_value;
    wake.ratio = wake.peer_value.map(|p| wake.value / p);
    wake.target = Some(
        "a proxy polling member A receives a message that arrived through member B within 100 ms at p99 (issue 24)"
            .into(),
    );
    Ok(vec![p99, p50, wake])
}
