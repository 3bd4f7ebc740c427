//! Route choice (`cargo run --release -p rs-bench -- routes`): how long a
//! proxy with two routes takes to leave one that degrades, and the
//! latency of its alarms meanwhile, against a proxy with one route that
//! degrades the same way at the same moment, in one run.
//!
//! One host: a server, two MLMs (`acme.m1`, `acme.m2`, each its own
//! SQLite spool and queue, WAL, synchronous=FULL), and the test relay in
//! front of each route. Proxy `acme.p1` has two routes (relay 1 to m1,
//! relay 2 to m2; the product's default route settings: probes every 5 s,
//! a 10 s dwell, hedging after 500 ms); proxy `acme.p2` has one (relay 3
//! to m1). Each integrator sends one major alarm every 20 ms. After a
//! warm-up, relays 1 and 3 delay every chunk by 300 ms (a congested or
//! lossy line) for 20 s: the figure is each proxy's p99 of alarm latency
//! (the alarm's creation at the proxy until the server stored it, one
//! clock) over the alarms created during the fault, and the time until
//! p1's status says its messages take route 2. Then relay 1 goes silent
//! (a blackhole): the time until p1 leaves it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rs_proxy::api::SendRequest;
use rs_proxy::client::Client;
use rs_tests::deploy::{Deployment, Extra, proxy_route as in_use, with_appserver_db};
use rs_tests::relay::{Fault, Link};

use crate::{Figure, percentile, spread};

const FAULT: Duration = Duration::from_secs(20);
const DELAY: Duration = Duration::from_millis(300);
const EVERY: Duration = Duration::from_millis(20);

/// Sends a major alarm every [`EVERY`] through `socket` until `stop`.
fn integrator(
    socket: &Path,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let socket = socket.to_path_buf();
    tokio::spawn(async move {
        let c = Client::new(&socket);
        let _ = c.register_integrator(name, "1.0", "linux").await;
        let mut i = 0u64;
        let mut next = tokio::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let req = SendRequest {
                integrator: name.into(),
                severity: Some("major".into()),
                key: Some(format!("k{}", i % 50)),
                text: Some(format!("{name} {i}")),
                ..SendRequest::default()
            };
            let _ = c.send("alarm", &req).await;
            i += 1;
            next += EVERY;
            tokio::time::sleep_until(next).await;
        }
    })
}

/// Milliseconds from creation to storage of the alarms `component`'s
/// integrator created in `[from, to)` (ms since the epoch).
fn latencies(server: &Path, component: &str, from: i64, to: i64) -> anyhow::Result<Vec<f64>> {
    let component = component.to_owned();
    with_appserver_db(server, move |c| {
        c.rows(
            "SELECT received - created FROM messages
             WHERE component LIKE ?1 AND kind = 'alarm' AND created >= ?2 AND created < ?3",
            rs_store::params![format!("{component}%"), from, to],
            |r| r.get::<i64>(0),
        )
    })
    .map(|v| v.into_iter().map(|ms| ms as f64).collect())
}

/// Waits until `socket`'s messages take `url`; the time it took.
async fn until_on(socket: &Path, url: &str, limit: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while in_use(socket).await.as_deref() != Some(url) {
        anyhow::ensure!(
            t.elapsed() < limit,
            "the messages did not move to {url} in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(t.elapsed())
}

struct Run {
    leave_degraded_ms: f64,
    leave_silent_ms: f64,
    two_p99: f64,
    one_p99: f64,
    alarms: usize,
}

async fn once(exe: &Path, dir: &Path) -> anyhow::Result<Run> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe)?;
    let a = d.appserver("127.0.0.1:0", "")?;
    let m1 = d.mlm("m1", "acme.m1", std::slice::from_ref(&a), &Extra::default())?;
    let m2 = d.mlm("m2", "acme.m2", std::slice::from_ref(&a), &Extra::default())?;
    let (r1, l1) = rs_tests::relay::start(m1.clone()).await?;
    let (r2, _l2) = rs_tests::relay::start(m2.clone()).await?;
    let (r3, l3) = rs_tests::relay::start(m1.clone()).await?;
    let two = d.proxy(
        "p1",
        "acme.p1",
        &[r1.clone(), r2.clone()],
        &Extra::default(),
    )?;
    let one = d.proxy(
        "p2",
        "acme.p2",
        std::slice::from_ref(&r3),
        &Extra::default(),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        integrator(&two, "two", stop.clone()),
        integrator(&one, "one", stop.clone()),
    ];
    let result = async {
        // Warm-up: both routes measured by probes.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let (u1, u2) = (format!("http://{r1}"), format!("http://{r2}"));
        anyhow::ensure!(in_use(&two).await.as_deref() == Some(u1.as_str()));
        let faulted = |l: &Link, f: Fault| l.set_fault(f);
        let from = rs_protocol::Timestamp::now().as_millis();
        faulted(&l1, Fault::Delay(DELAY));
        faulted(&l3, Fault::Delay(DELAY));
        let leave_degraded = until_on(&two, &u2, FAULT).await?;
        tokio::time::sleep(FAULT.saturating_sub(leave_degraded)).await;
        let to = rs_protocol::Timestamp::now().as_millis();
        faulted(&l1, Fault::None);
        faulted(&l3, Fault::None);
        // Back on route 1 once it has answered well again, then silence.
        until_on(&two, &u1, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        faulted(&l1, Fault::Blackhole);
        let leave_silent = until_on(&two, &u2, Duration::from_secs(60)).await?;
        faulted(&l1, Fault::None);
        // Every alarm of the fault window stored.
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.store(true, Ordering::Relaxed);
        let server = dir.join("appserver");
        let mut lat_two = latencies(&server, "acme.p1", from, to)?;
        let mut lat_one = latencies(&server, "acme.p2", from, to)?;
        let expected = (to - from) as usize / EVERY.as_millis() as usize;
        anyhow::ensure!(
            lat_two.len() + 10 >= expected && lat_one.len() + 10 >= expected,
            "alarms of the fault window missing: {} and {} of about {expected}",
            lat_two.len(),
            lat_one.len()
        );
        Ok(Run {
            leave_degraded_ms: leave_degraded.as_secs_f64() * 1000.0,
            leave_silent_ms: leave_silent.as_secs_f64() * 1000.0,
            two_p99: percentile(&mut lat_two, 0.99),
            one_p99: percentile(&mut lat_one, 0.99),
            alarms: lat_two.len(),
        })
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    d.stop_all();
    result
}

pub(crate) fn run(runs: usize) -> anyhow::Result<Vec<Figure>> {
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-routes-{}", std::process::id()));
    let (mut leave, mut silent, mut two, mut one) = (vec![], vec![], vec![], vec![]);
    let mut alarms = 0;
    for i in 0..runs {
        eprintln!("rs-bench routes: run {} of {runs}", i + 1);
        let r = rt.block_on(once(&exe, &tmp))?;
        eprintln!(
            "  left the degraded route after {:.0} ms, the silent one after {:.0} ms; alarm p99 {:.0} ms with two routes, {:.0} ms with one",
            r.leave_degraded_ms, r.leave_silent_ms, r.two_p99, r.one_p99
        );
        leave.push(r.leave_degraded_ms);
        silent.push(r.leave_silent_ms);
        two.push(r.two_p99);
        one.push(r.one_p99);
        alarms += r.alarms;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let command = format!("cargo run --release -p rs-bench -- routes --runs {runs}");
    let med = |v: &[f64]| crate::forward::median(&mut v.to_vec());
    let setup = format!(
        "a proxy with two routes (test relays in front of two MLMs, default route settings: probes every 5 s, 10 s dwell, hedging after 500 ms), one major alarm every {} ms",
        EVERY.as_millis()
    );
    let leave_fig = Figure::measured(
        "route_leave_degraded_ms",
        format!(
            "{setup}: time from the first route starting to delay every chunk by {} ms until the proxy's status says its messages take the second; the median of the runs",
            DELAY.as_millis()
        ),
        med(&leave),
        "ms",
        "lower",
        runs,
        spread(&leave),
        &command,
    );
    let silent_fig = Figure::measured(
        "route_leave_silent_ms",
        format!(
            "{setup}: time from the first route going silent (a blackhole: connections stay open, nothing passes) until the messages take the second; the median of the runs"
        ),
        med(&silent),
        "ms",
        "lower",
        runs,
        spread(&silent),
        &command,
    );
    let mut p99 = Figure::measured(
        "route_alarm_p99_degraded_ms",
        format!(
            "{setup}: p99 of alarm latency (created at the proxy until stored by the server, one clock) over the alarms created during {} s of the first route delaying every chunk by {} ms ({alarms} alarms over the runs); the median of the runs' p99",
            FAULT.as_secs(),
            DELAY.as_millis()
        ),
        med(&two),
        "ms",
        "lower",
        runs,
        spread(&two),
        &command,
    );
    p99.peer = Some(
        "a proxy with one route (a test relay to the first MLM), delayed the same way at the same moment, same alarm rate, same run".into(),
    );
    p99.peer_value = Some(med(&one));
    p99.ratio = p99.peer_value.map(|p| p99.value / p);
    p99.target =
        Some("a proxy with two routes keeps its alarms fast when one degrades (issue 28)".into());
    Ok(vec![leave_fig, silent_fig, p99])
}
