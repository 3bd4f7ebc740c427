//! Route choice on real daemons (issue 28, seed 003): a proxy with two
//! routes, each through its own MLM and a relay that can delay or
//! blackhole it, keeps its alarms moving when one route degrades, comes
//! back when it recovers without flapping, sends bulk transfers on the
//! bulk route and critical alarms on both; nothing is lost or stored
//! twice.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rs_proxy::client::Client;
use rs_tests::deploy::{Deployment, Extra, proxy_route as in_use};
use rs_tests::relay::Fault;

use crate::backchannel::{attr, exe, post, tmp};
use crate::backchannel_faults::{finish, until};
use crate::forward::{alarm, all_stored, assert_exactly_once, register};

async fn upstream_count(socket: &Path, key: &str) -> u64 {
    Client::new(socket)
        .status()
        .await
        .ok()
        .and_then(|v| v["upstream"][key].as_u64())
        .unwrap_or(0)
}

/// An integrator sending a major alarm every 50 ms through a proxy until
/// stopped; the IDs the proxy accepted.
struct Writer {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(socket: &Path, label: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<Mutex<Vec<String>>> = Arc::default();
        let task = {
            let (stop, sent, s) = (stop.clone(), sent.clone(), socket.to_path_buf());
            tokio::spawn(async move {
                let c = Client::new(&s);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(id) = c.send("alarm", &alarm(&format!("{label} {i}"), None)).await {
                        sent.lock().unwrap().push(id);
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        Writer { stop, sent, task }
    }

    async fn stop(self) -> HashSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.sent.lock().unwrap().iter().cloned().collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_two_routes_keeps_its_alarms_moving_when_one_degrades() {
    let dir = tmp("routes");
    // Plain HTTP: each relay reads what crosses its route.
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "heartbeat_secs = 5").unwrap();
    // Two MLMs, each with its own queue and spool: two routes that meet
    // only at the server.
    let m1 = d
        .mlm("m1", "acme.m1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let m2 = d
        .mlm("m2", "acme.m2", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let (r1, l1) = rs_tests::relay::start(m1.clone()).await.unwrap();
    let (r2, l2) = rs_tests::relay::start(m2.clone()).await.unwrap();
    let (u1, u2) = (format!("http://{r1}"), format!("http://{r2}"));
    let extra = Extra {
        upstream: format!(
            "probe_secs = 1\nroute_dwell_secs = 3\nhedge_after_ms = 1000\nmax_backoff_secs = 2\n\
             multi_send_precedence = 9\nbulk_urls = [\"{u2}\"]\n"
        ),
        ..Extra::default()
    };
    let s = d
        .proxy("p1", "acme.p1", &[r1.clone(), r2.clone()], &extra)
        .unwrap();
    let c = register(&s).await;

    // Healthy: messages take the first route; the second is probed.
    let mut acked = HashSet::new();
    for i in 0..20 {
        acked.insert(
            c.send("alarm", &alarm(&format!("calm {i}"), None))
                .await
                .unwrap(),
        );
    }
    assert!(all_stored(&dir, &acked, Duration::from_secs(30)));
    assert_eq!(in_use(&s).await.as_deref(), Some(u1.as_str()));
    let probed = l2.up_bytes.load(Ordering::Relaxed);
    assert!(
        until(10, || async {
            l2.up_bytes.load(Ordering::Relaxed) > probed
        })
        .await,
        "the idle route is probed"
    );

    // Multiple send: a critical alarm crosses both routes and is stored
    // once; a major one is not copied. (A POST that stalls on a loaded
    // machine may be hedged, so the relays' counts alone cannot tell.)
    l1.count_up("crit-0001");
    l2.count_up("crit-0001");
    let copies = upstream_count(&s, "multi_sent").await;
    let mut crit = alarm("crit-0001", None);
    crit.severity = Some("critical".into());
    let crit_id = c.send("alarm", &crit).await.unwrap();
    let major_id = c.send("alarm", &alarm("major-0001", None)).await.unwrap();
    let both: HashSet<String> = [crit_id, major_id].into();
    assert!(all_stored(&dir, &both, Duration::from_secs(30)));
    assert!(l1.seen_up("crit-0001") >= 1 && l2.seen_up("crit-0001") >= 1);
    assert_eq!(
        upstream_count(&s, "multi_sent").await - copies,
        1,
        "one envelope of copies: the critical alarm's, not the major's"
    );
    acked.extend(both);

    // Bulk transfers take the bulk route.
    let (up1, up2) = (
        l1.up_bytes.load(Ordering::Relaxed),
        l2.up_bytes.load(Ordering::Relaxed),
    );
    let (bc, upload, _) = crate::bulk::upload_core(&s, &dir.join("routes.core"), 3 << 20).await;
    crate::bulk::until_uploaded(&bc, &upload.id).await;
    let (up1, up2) = (
        l1.up_bytes.load(Ordering::Relaxed) - up1,
        l2.up_bytes.load(Ordering::Relaxed) - up2,
    );
    assert!(
        up2 >= 3 << 20,
        "the upload went on the bulk route: {up2} bytes"
    );
    assert!(up1 < 1 << 20, "not on the messages' route: {up1} bytes");

    // An integrator sending an alarm every 50 ms from now on.
    let writer = Writer::start(&s, "steady");

    // The first route degrades: the messages leave it within seconds.
    // (On a loaded machine a stalled POST may have moved them off the
    // healthy first route meanwhile; they come back to it, as below.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        until(90, || async {
            in_use(&s).await.as_deref() == Some(u1.as_str())
        })
        .await,
        "the messages are not on the first route before the fault"
    );
    let moves_before = upstream_count(&s, "route_moves").await;
    l1.set_fault(Fault::Delay(Duration::from_millis(400)));
    let t = Instant::now();
    assert!(
        until(20, || async {
            in_use(&s).await.as_deref() == Some(u2.as_str())
        })
        .await,
        "the messages did not leave the degraded route"
    );
    eprintln!("left the degraded route after {:?}", t.elapsed());
    // Probed while degraded, it gets no traffic back.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        in_use(&s).await.as_deref(),
        Some(u2.as_str()),
        "went back too soon"
    );
    // While they take the second route, a control action reaches the
    // proxy through it (its long poll moved too).
    let (st, body) = post(
        &a,
        r#"<send ttl-secs="600"><to id="acme.p1"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let j = finish(&a, attr(&body, "id"), 60).await;
    assert_eq!(j.count("succeeded"), 1, "{j:?}");

    // It recovers: the messages come back once a window of round trips
    // is good, and do not flap.
    l1.set_fault(Fault::None);
    let t = Instant::now();
    assert!(
        until(90, || async {
            in_use(&s).await.as_deref() == Some(u1.as_str())
        })
        .await,
        "the messages did not come back to the recovered route"
    );
    eprintln!("came back after {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(in_use(&s).await.as_deref(), Some(u1.as_str()), "flapped");
    // One move away and one back; a stall on a loaded machine may add a
    // pair, flapping would add many.
    let moves = upstream_count(&s, "route_moves").await - moves_before;
    assert!((2..=4).contains(&moves), "{moves} moves");

    // The route in use goes silent: the messages move (on a stalled probe
    // or POST, whichever comes first; a stalled POST also goes again on
    // the other route, which the MLM test below checks).
    l1.set_fault(Fault::Blackhole);
    let t = Instant::now();
    assert!(
        until(20, || async {
            in_use(&s).await.as_deref() == Some(u2.as_str())
        })
        .await,
        "the messages did not leave the silent route"
    );
    eprintln!(
        "left the silent route after {:?} ({} POSTs hedged)",
        t.elapsed(),
        upstream_count(&s, "hedged").await
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady = writer.stop().await;
    assert!(steady.len() > 100, "{} alarms sent", steady.len());
    acked.extend(steady);
    assert!(
        all_stored(&dir, &acked, Duration::from_secs(60)),
        "an accepted alarm was lost"
    );
    l1.set_fault(Fault::None);
    assert_exactly_once(&dir, &acked);
    d.stop_all();
}

/// The series of `rs_upstream_route_in_use` that is 1 for messages: its URL.
fn messages_route(s: &crate::metrics::Scrape) -> Option<String> {
    s.iter()
        .find(|(k, v)| {
            k.starts_with("rs_upstream_route_in_use{")
                && k.contains("class=\"messages\"")
                && **v == 1.0
        })
        .and_then(|(k, _)| k.split("url=\"").nth(1)?.split('"').next())
        .map(str::to_owned)
}

/// An MLM relaying (its proxies wait for the server's answer) with two
/// routes to the server: when the one in use goes silent, the messages
/// move, the relay stalled on it goes again on the other (hedged), and
/// what it relays is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlm_with_two_routes_relays_on_the_other_when_one_goes_silent() {
    let dir = tmp("routes-mlm");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "heartbeat_secs = 5").unwrap();
    let (r1, l1) = rs_tests::relay::start(a.clone()).await.unwrap();
    let (r2, _l2) = rs_tests::relay::start(a.clone()).await.unwrap();
    let (u1, u2) = (format!("http://{r1}"), format!("http://{r2}"));
    let m = d
        .mlm(
            "m1",
            "acme.m1",
            &[r1.clone(), r2.clone()],
            &Extra {
                // Probes seldom: the relays, not a probe, find the route
                // gone silent, so a relay stalls on it and is hedged.
                upstream: "probe_secs = 30\nroute_dwell_secs = 3\nhedge_after_ms = 1000\n".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    let s = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&m),
            &Extra {
                upstream: "max_backoff_secs = 2\n".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    let c = register(&s).await;
    let metrics = d.metrics_addr("m1");
    let mut acked = HashSet::new();
    for i in 0..10 {
        acked.insert(
            c.send("alarm", &alarm(&format!("relayed {i}"), None))
                .await
                .unwrap(),
        );
    }
    assert!(all_stored(&dir, &acked, Duration::from_secs(30)));
    let scrape = crate::metrics::scrape(&metrics).await;
    assert_eq!(
        messages_route(&scrape).as_deref(),
        Some(u1.as_str()),
        "{scrape:?}"
    );

    let writer = Writer::start(&s, "through");
    tokio::time::sleep(Duration::from_secs(2)).await;
    l1.set_fault(Fault::Blackhole);
    assert!(
        until(20, || async {
            messages_route(&crate::metrics::scrape(&metrics).await).as_deref() == Some(u2.as_str())
        })
        .await,
        "the MLM did not leave the silent route"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let through = writer.stop().await;
    let scrape = crate::metrics::scrape(&metrics).await;
    assert!(
        crate::metrics::get(&scrape, "rs_upstream_route_hedged_total") >= 1.0,
        "{scrape:?}"
    );
    assert!(through.len() > 50, "{} alarms sent", through.len());
    acked.extend(through);
    assert!(
        all_stored(&dir, &acked, Duration::from_secs(60)),
        "an accepted alarm was lost"
    );
    l1.set_fault(Fault::None);
    assert_exactly_once(&dir, &acked);
    d.stop_all();
}
