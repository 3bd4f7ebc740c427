//! The forward path end to end on real daemon processes: integrator ->
//! proxy spool -> MLM -> application server, across outages, crashes
//! (SIGKILL) and pressure. Nothing acknowledged to an integrator is lost,
//! and nothing is stored twice.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rs_proxy::api::SendRequest;
use rs_proxy::client::{Client, ClientError};
use rs_tests::deploy::{
    Deployment, Extra, admin, base, integrity, proxy_metrics, server_metrics, stored_ids, wait_for,
};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rs-demo"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rs-suite-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub(crate) fn alarm(text: &str, precedence: Option<u8>) -> SendRequest {
    SendRequest {
        integrator: "suite".into(),
        instance: Some("db01".into()),
        severity: Some("major".into()),
        key: Some(format!("k:{}", text.chars().take(20).collect::<String>())),
        text: Some(text.into()),
        precedence,
        ..SendRequest::default()
    }
}

pub(crate) async fn register(socket: &Path) -> Client {
    let c = Client::new(socket);
    c.register_integrator("suite", "1.0", "linux")
        .await
        .expect("register");
    c
}

/// Waits until every ID is stored, reading the server's database.
pub(crate) fn all_stored(dir: &Path, ids: &HashSet<String>, timeout: Duration) -> bool {
    wait_for(timeout, || {
        stored_ids(&dir.join("appserver")).is_ok_and(|s| {
            let s: HashSet<String> = s.into_iter().collect();
            ids.is_subset(&s)
        })
    })
}

pub(crate) fn assert_exactly_once(dir: &Path, ids: &HashSet<String>) {
    let stored = stored_ids(&dir.join("appserver")).unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &stored {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for id in ids {
        assert_eq!(
            counts.get(id.as_str()).copied(),
            Some(1),
            "message {id} stored {:?} times",
            counts.get(id.as_str())
        );
    }
}

pub(crate) fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_end_to_end_and_are_stored_once() {
    let dir = tmp("e2e");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    let s1 = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let s2 = d
        .proxy("p2", "acme.p2", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let mut ids = HashSet::new();
    for s in [&s1, &s2] {
        let c = register(s).await;
        for i in 0..25 {
            ids.insert(
                c.send("alarm", &alarm(&format!("alarm {i}"), None))
                    .await
                    .unwrap(),
            );
            let ev = SendRequest {
                severity: Some("info".into()),
                text: Some(format!("event {i}")),
                ..alarm("", None)
            };
            ids.insert(c.send("event", &ev).await.unwrap());
        }
    }
    assert!(
        all_stored(&dir, &ids, Duration::from_secs(30)),
        "not everything arrived"
    );
    assert_exactly_once(&dir, &ids);

    // Each went through the MLM, which appended its routing hop, and the
    // server knows both proxies and how they are reached.
    let body =
        crate::backchannel::control_get(&a, "messages?component=acme.p1.s1&limit=1000").await;
    assert!(body.contains("via=\"acme.m1\""), "{body}");
    let comps = admin(&a)
        .get(format!("{}/rs/v1/control/components", base(&a)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for c in ["acme.p1", "acme.p2", "acme.m1"] {
        assert!(
            comps.contains(&format!("id=\"{c}\"")),
            "{c} missing: {comps}"
        );
    }
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlm_filters_aggregates_and_drops_repeats_as_configured() {
    let dir = tmp("modules");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let modules = Extra {
        tables: "[[filter]]\nclass = \"performance\"\n\n\
                 [[filter]]\ntype = \"event\"\nseverity_at_most = \"info\"\n\n\
                 [[drop_repeats]]\ntype = \"event\"\nwindow_secs = 600\n\n\
                 [[aggregate]]\ntype = \"alarm\"\nsubclass = \"disk\"\nwindow_secs = 1\ngroup_by = \"class\"\n"
            .into(),
        ..Extra::default()
    };
    let m = d
        .mlm("mlm", "acme.m1", std::slice::from_ref(&a), &modules)
        .unwrap();
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let c = register(&s).await;

    let mut filtered = Vec::new();
    for i in 0..3 {
        let perf = SendRequest {
            class: Some("performance".into()),
            subclass: Some("host".into()),
            data: Some(format!("{{\"load1\":{i}}}")),
            ..SendRequest {
                integrator: "suite".into(),
                ..SendRequest::default()
            }
        };
        filtered.push(c.send("data", &perf).await.unwrap());
        let info = SendRequest {
            severity: Some("info".into()),
            text: Some(format!("fyi {i}")),
            ..alarm("", None)
        };
        filtered.push(c.send("event", &info).await.unwrap());
    }
    let mut disk = Vec::new();
    for i in 0..4 {
        let a = SendRequest {
            subclass: Some("disk".into()),
            ..alarm(&format!("/var{i} full"), None)
        };
        disk.push(c.send("alarm", &a).await.unwrap());
    }
    let warn = SendRequest {
        severity: Some("warning".into()),
        text: Some("fan speed low".into()),
        ..alarm("", None)
    };
    let first = c.send("event", &warn).await.unwrap();
    let repeat = c.send("event", &warn).await.unwrap();

    // One of the two identical warnings passes (envelopes in flight at
    // once may arrive in either order), the other is dropped as a repeat;
    // the info events, the performance data and the four disk alarms do
    // not reach the server; one summary of the four does.
    let either = wait_for(Duration::from_secs(30), || {
        stored_ids(&dir.join("appserver")).is_ok_and(|s| s.contains(&first) || s.contains(&repeat))
    });
    assert!(either, "the warning did not arrive");
    let summary_arrived = wait_for(Duration::from_secs(30), || {
        stored_ids(&dir.join("appserver")).is_ok_and(|s| s.iter().any(|id| id.starts_with("agg-")))
    });
    assert!(summary_arrived, "no aggregated summary");
    let stored: HashSet<String> = stored_ids(&dir.join("appserver"))
        .unwrap()
        .into_iter()
        .collect();
    for id in filtered.iter().chain(&disk) {
        assert!(!stored.contains(id), "{id} should not have been forwarded");
    }
    assert!(
        stored.contains(&first) != stored.contains(&repeat),
        "exactly one of two repeats is kept"
    );
    let body = admin(&a)
        .get(format!(
            "{}/rs/v1/control/messages?component=acme.m1&type=alarm",
            base(&a)
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("<detail name=\"aggregated.count\">4</detail>"),
        "{body}"
    );
    let mm = server_metrics(&m).await.unwrap();
    assert_eq!(mm.get("messages.aggregated"), Some(&4));
    assert_eq!(mm.get("messages.filtered"), Some(&7), "{mm:?}");
    // The proxy was told all of them were accepted: nothing is left to resend.
    let pm = proxy_metrics(&s).await.unwrap();
    assert_eq!(pm.get("spool.dead_letters"), Some(&0));
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spools_and_drains_in_precedence_order() {
    let dir = tmp("outage");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // The proxy's upstream is not there yet.
    let port = rs_tests::deploy::held_port();
    let one_at_a_time = Extra {
        upstream: "max_messages = 1\nmax_backoff_secs = 1\nparallel = 1".into(),
        ..Extra::default()
    };
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&port), &one_at_a_time)
        .unwrap();
    let c = register(&s).await;
    let mut sent = Vec::new();
    for i in 0..30u8 {
        let p = i % 10;
        let id = c
            .send("alarm", &alarm(&format!("p{p} #{i}"), Some(p)))
            .await
            .unwrap();
        sent.push((id, p));
    }
    let pm = proxy_metrics(&s).await.unwrap();
    assert!(
        pm.get("spool.messages").copied().unwrap_or(0) >= 30,
        "{pm:?}"
    );
    assert!(pm.get("upstream.posts_failed").copied().unwrap_or(0) > 0);

    // The server comes up on the port the proxy has been trying.
    d.appserver(&port, "").unwrap();
    let ids: HashSet<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert!(
        all_stored(&dir, &ids, Duration::from_secs(60)),
        "backlog did not drain"
    );
    assert_exactly_once(&dir, &ids);
    let prec: BTreeMap<&str, u8> = sent.iter().map(|(id, p)| (id.as_str(), *p)).collect();
    let order: Vec<u8> = stored_ids(&dir.join("appserver"))
        .unwrap()
        .iter()
        .filter_map(|id| prec.get(id.as_str()).copied())
        .collect();
    let mut sorted = order.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(
        order, sorted,
        "the backlog must drain highest precedence first"
    );
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_delivered() {
    let dir = tmp("expiry");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let port = rs_tests::deploy::held_port();
    let s = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&port),
            &Extra {
                upstream: "max_backoff_secs = 1".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    let c = register(&s).await;
    let mut short = HashSet::new();
    for i in 0..5 {
        let req = SendRequest {
            ttl_secs: Some(1),
            ..alarm(&format!("short-lived {i}"), None)
        };
        short.insert(c.send("alarm", &req).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let lasting: HashSet<String> = [c.send("alarm", &alarm("lasting", None)).await.unwrap()].into();
    d.appserver(&port, "").unwrap();
    assert!(all_stored(&dir, &lasting, Duration::from_secs(60)));
    let stored: HashSet<String> = stored_ids(&dir.join("appserver"))
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        short.is_disjoint(&stored),
        "an expired message was delivered"
    );
    // The proxy records why each was dropped.
    assert!(
        wait_for(Duration::from_secs(30), || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(proxy_metrics(&s))
                    .is_ok_and(|m| m.get("spool.expired_total").copied().unwrap_or(0) >= 5)
            })
        }),
        "expired messages were not recorded"
    );
    let drops = Client::new(&s)
        .call::<()>(http::Method::GET, "/v1/drops", None)
        .await
        .unwrap();
    let expired: HashSet<String> = drops
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["why"] == "expired")
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(short.is_subset(&expired), "{drops}");
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_evicts_by_policy_and_counts() {
    let dir = tmp("evict");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let port = rs_tests::deploy::held_port();
    let small = Extra {
        tables: "[spool]\nmax_bytes = 40000\n".into(),
        ..Extra::default()
    };
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&port), &small)
        .unwrap();
    let c = register(&s).await;
    let pad = "x".repeat(1500);
    // Low-precedence, non-persistent data first...
    let mut low = Vec::new();
    for i in 0..20 {
        let req = SendRequest {
            data: Some(format!("{i} {pad}")),
            precedence: Some(1),
            persistent: Some(false),
            ..SendRequest {
                integrator: "suite".into(),
                ..SendRequest::default()
            }
        };
        low.push(c.send("data", &req).await.unwrap());
    }
    // ...then important alarms, which push them out.
    let mut high = HashSet::new();
    for i in 0..15 {
        let req = alarm(&format!("{i} {pad}"), Some(9));
        high.insert(c.send("alarm", &req).await.unwrap());
    }
    let pm = proxy_metrics(&s).await.unwrap();
    let evicted = pm.get("spool.evicted_total").copied().unwrap_or(0);
    assert!(evicted > 0, "nothing evicted: {pm:?}");
    // When only more important messages remain, a new unimportant one is
    // refused (the integrator hears it), not silently dropped.
    let req = SendRequest {
        data: Some("y".repeat(12_000)),
        precedence: Some(0),
        persistent: Some(false),
        ..SendRequest {
            integrator: "suite".into(),
            ..SendRequest::default()
        }
    };
    match c.send("data", &req).await {
        Err(ClientError::Refused { status: 507, .. }) => {}
        other => panic!("expected 507 Insufficient Storage, got {other:?}"),
    }
    let drops = Client::new(&s)
        .call::<()>(http::Method::GET, "/v1/drops", None)
        .await
        .unwrap();
    let dropped: Vec<&str> = drops
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["why"] == "evicted")
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(dropped.len() as u64, evicted);
    assert!(
        dropped.iter().all(|id| !high.contains(*id)),
        "an important alarm was evicted"
    );
    assert!(
        dropped.iter().any(|id| low.iter().any(|l| l == id)),
        "low-precedence data goes first"
    );

    // Every important alarm is delivered once the upstream is back.
    d.appserver(&port, "").unwrap();
    assert!(all_stored(&dir, &high, Duration::from_secs(60)));
    assert_exactly_once(&dir, &high);
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_each_tier_loses_nothing_acknowledged_and_stores_nothing_twice() {
    let dir = tmp("kill");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (_, m) = d.server_and_mlm().unwrap();
    let fast = Extra {
        upstream: "max_backoff_secs = 1".into(),
        ..Extra::default()
    };
    let s1 = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &fast)
        .unwrap();
    let s2 = d
        .proxy("p2", "acme.p2", std::slice::from_ref(&m), &fast)
        .unwrap();
    register(&s1).await;
    register(&s2).await;

    // Integrators keep sending; what the proxy acknowledged is recorded.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    for s in [s1.clone(), s2.clone()] {
        let (tx, stop) = (tx.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let c = Client::new(&s);
            let mut i = 0;
            while !stop.is_cancelled() {
                // While its proxy is down the call fails: nothing was acknowledged.
                if let Ok(id) = c.send("alarm", &alarm(&format!("load {i}"), None)).await {
                    let _ = tx.send(id);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    drop(tx);
    let pause = || tokio::time::sleep(Duration::from_millis(700));
    pause().await;
    for victim in ["p1", "mlm", "appserver", "p2", "mlm", "p1"] {
        d.node(victim).signal("KILL");
        let _ = d.node(victim).child.take().map(|mut c| c.wait());
        pause().await;
        tokio::task::block_in_place(|| d.restart(victim)).unwrap();
        pause().await;
    }
    stop.cancel();
    for t in senders {
        t.await.unwrap();
    }
    let mut acked = HashSet::new();
    while let Some(id) = rx.recv().await {
        acked.insert(id);
    }
    assert!(
        acked.len() > 100,
        "too little traffic to mean anything: {}",
        acked.len()
    );
    assert!(
        all_stored(&dir, &acked, Duration::from_secs(90)),
        "acknowledged messages were lost"
    );
    assert_exactly_once(&dir, &acked);
    d.stop_all();
    for db in [
        "appserver/appserver.db",
        "mlm/spool.db",
        "mlm/mlm.db",
        "p1/spool.db",
        "p1/proxy.db",
        "p2/spool.db",
    ] {
        // On PostgreSQL the server's store is not a file of its own.
        if db.starts_with("appserver/")
            && rs_tests::deploy::store_engine() == rs_tests::deploy::StoreEngine::Postgres
        {
            continue;
        }
        assert_eq!(integrity(&dir.join(db)).unwrap(), "ok", "{db}");
    }
    // The server's store was made with its large pages (nothing opened
    // the file first with SQLite's default).
    if rs_tests::deploy::store_engine() == rs_tests::deploy::StoreEngine::Sqlite {
        #[allow(clippy::disallowed_methods)]
        let c = rusqlite::Connection::open(dir.join("appserver/appserver.db")).unwrap();
        let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(size, 16384);
    }
}

/// Waits (30 s at most) until the proxy at `socket` has handed over at
/// least `n` messages and keeps none.
pub(crate) fn handed_over(socket: &std::path::Path, n: u64) -> bool {
    wait_for(Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(proxy_metrics(socket))
                .is_ok_and(|m| {
                    m.get("spool.messages") == Some(&0)
                        && m.get("upstream.accepted").copied().unwrap_or(0) >= n
                })
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custody_mlm_accepts_while_its_upstream_is_down_and_delivers_later() {
    let dir = tmp("custody");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let port = rs_tests::deploy::held_port();
    let custody = Extra {
        top: "custody = true".into(),
        ..Extra::default()
    };
    let m = d
        .mlm("mlm", "acme.m1", std::slice::from_ref(&port), &custody)
        .unwrap();
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let c = register(&s).await;
    let mut ids = HashSet::new();
    for i in 0..20 {
        ids.insert(
            c.send("alarm", &alarm(&format!("custody {i}"), None))
                .await
                .unwrap(),
        );
    }
    // The MLM took custody: the proxy's spool empties with no server up.
    assert!(handed_over(&s, 20), "the MLM did not take custody");
    // Custody survives a crash of the MLM.
    d.node("mlm").signal("KILL");
    let _ = d.node("mlm").child.take().map(|mut c| c.wait());
    tokio::task::block_in_place(|| d.restart("mlm")).unwrap();
    d.appserver(&port, "").unwrap();
    assert!(
        all_stored(&dir, &ids, Duration::from_secs(60)),
        "custody messages were not delivered"
    );
    assert_exactly_once(&dir, &ids);
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlms_chain_and_each_appends_its_hop() {
    let dir = tmp("chain");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let farm = d
        .mlm("farm", "rs.m1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let site = d
        .mlm(
            "site",
            "acme.m1",
            std::slice::from_ref(&farm),
            &Extra::default(),
        )
        .unwrap();
    let s = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&site),
            &Extra::default(),
        )
        .unwrap();
    let c = register(&s).await;
    let id = c
        .send("alarm", &alarm("through two MLMs", None))
        .await
        .unwrap();
    assert!(all_stored(
        &dir,
        &[id.clone()].into(),
        Duration::from_secs(30)
    ));
    let body = admin(&a)
        .get(format!(
            "{}/rs/v1/control/messages?component=acme.p1.s1",
            base(&a)
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains(&format!("id=\"{id}\"")) && body.contains("via=\"acme.m1 rs.m1\""),
        "{body}"
    );
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_integrator_api_also_answers_on_loopback_tcp() {
    let dir = tmp("tcpapi");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let api = free_port();
    let extra = Extra {
        top: format!("api_listen = \"{api}\""),
        ..Extra::default()
    };
    d.proxy("p1", "acme.p1", std::slice::from_ref(&a), &extra)
        .unwrap();
    let http = reqwest::Client::new();
    let reg = http
        .post(format!("http://{api}/v1/integrators"))
        .body(r#"{"name":"tcp-script","version":"2.0"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reg.status(), 200);
    let sent = http
        .post(format!("http://{api}/v1/alarm"))
        .body(r#"{"integrator":"tcp-script","severity":"minor","text":"over TCP"}"#)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sent: serde_json::Value = serde_json::from_str(&sent).unwrap();
    let id = sent["message_id"].as_str().unwrap().to_owned();
    assert!(all_stored(&dir, &[id].into(), Duration::from_secs(30)));
    // A bad request gets a clear error and changes nothing.
    let bad = http
        .post(format!("http://{api}/v1/alarm"))
        .body(r#"{"integrator":"tcp-script","text":"no severity"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(
        bad.text()
            .await
            .unwrap()
            .contains("an alarm needs a severity")
    );
    // What could not travel is refused here, before it is spooled.
    let long_key = "k".repeat(1025);
    for (what, body, says) in [
        (
            "alarm",
            format!(r#"{{"integrator":"tcp-script","severity":"minor","key":"{long_key}"}}"#),
            "key longer than 1024 bytes",
        ),
        (
            "alarm",
            r#"{"integrator":"tcp-script","severity":"minor","key":"a\u0001b"}"#.to_owned(),
            "U+0001",
        ),
        (
            "data",
            r#"{"integrator":"tcp-script","mime":"text/plain\r\nX: y","data":"z"}"#.to_owned(),
            "mime",
        ),
    ] {
        let r = http
            .post(format!("http://{api}/v1/{what}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{says}");
        let text = r.text().await.unwrap();
        assert!(text.contains(says), "{text}");
    }
    d.stop_all();
}

#[test]
fn the_integrator_api_refuses_non_loopback_addresses() {
    let cfg = "id = \"acme.p1\"\ndata_dir = \"/tmp/x\"\nsocket = \"/tmp/x/s\"\napi_listen = \"0.0.0.0:8449\"\n[upstream]\nurls = [\"http://127.0.0.1:1\"]\n";
    let err = rs_proxy::Config::parse(cfg).unwrap_err();
    assert!(err.contains("loopback"), "{err}");
    assert!(rs_proxy::Config::parse(&cfg.replace("0.0.0.0", "127.0.0.1")).is_ok());
}

#[test]
fn the_packaged_example_configurations_load() {
    let dir = rs_tests::repo_root().join("packaging/etc");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    rs_appserver::Config::parse(&read("appserver.toml")).unwrap();
    rs_mlm::Config::parse(&read("mlm.toml")).unwrap();
    rs_proxy::Config::parse(&read("proxy.toml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_message_and_what_it_acknowledged_survives_sigkill() {
    use rs_proxy::api::{BatchItem, BatchResult};
    let dir = tmp("batch");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (_, m) = d.server_and_mlm().unwrap();
    let fast = Extra {
        upstream: "max_backoff_secs = 1".into(),
        ..Extra::default()
    };
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &fast)
        .unwrap();
    let c = register(&s).await;

    // The MLM is away: what the batch acknowledges is only in the proxy's
    // spool when the proxy is killed.
    d.node("mlm").signal("KILL");
    let _ = d.node("mlm").child.take().map(|mut c| c.wait());
    let mut items = Vec::new();
    for i in 0..60 {
        items.push(match i % 20 {
            7 => BatchItem::Alarm(SendRequest {
                severity: None,
                ..alarm("no severity", None)
            }),
            13 => BatchItem::Event(SendRequest {
                class: Some("not a token".into()),
                ..alarm("bad class", None)
            }),
            17 => BatchItem::Data(SendRequest {
                mime: Some("text/plain".into()),
                ..alarm("no data", None)
            }),
            _ if i % 3 == 0 => BatchItem::Event(SendRequest {
                severity: Some("info".into()),
                ..alarm(&format!("batch event {i}"), None)
            }),
            _ if i % 3 == 1 => BatchItem::Data(SendRequest {
                severity: None,
                mime: Some("text/plain".into()),
                data: Some(format!("batch data {i}")),
                ..alarm("", None)
            }),
            _ => BatchItem::Alarm(alarm(&format!("batch alarm {i}"), None)),
        });
    }
    let spooled = || async { proxy_metrics(&s).await.unwrap()["spool.messages"] };
    let before = spooled().await;
    let results = c.send_batch(items).await.unwrap();
    assert_eq!(results.len(), 60);
    let mut ids = HashSet::new();
    for (i, r) in results.iter().enumerate() {
        match (i % 20, r) {
            (7 | 13 | 17, BatchResult::Failed { status, error }) => {
                assert_eq!(*status, 400, "item {i}: {error}");
                let says = match i % 20 {
                    7 => "an alarm needs a severity",
                    13 => "class/subclass",
                    _ => "data needs exactly one of data or data_base64",
                };
                assert!(error.contains(says), "item {i}: {error}");
            }
            (_, BatchResult::Sent { message_id }) if !matches!(i % 20, 7 | 13 | 17) => {
                ids.insert(message_id.clone());
            }
            _ => panic!("item {i}: {r:?}"),
        }
    }
    assert_eq!(ids.len(), 51, "each valid message has its own ID");
    // The refused ones were not spooled (a heartbeat may have been).
    let added = spooled().await - before;
    assert!((51..=52).contains(&added), "{added} spooled");

    // Killed right after the answer, the proxy still has every message.
    d.node("p1").signal("KILL");
    let _ = d.node("p1").child.take().map(|mut c| c.wait());
    tokio::task::block_in_place(|| d.restart("p1")).unwrap();
    tokio::task::block_in_place(|| d.restart("mlm")).unwrap();
    assert!(
        all_stored(&dir, &ids, Duration::from_secs(60)),
        "acknowledged messages were lost"
    );
    assert_exactly_once(&dir, &ids);

    // A batch over the limit, or one that is not JSON, is refused whole.
    let too_many: Vec<BatchItem> = (0..=rs_proxy::api::MAX_BATCH)
        .map(|i| BatchItem::Alarm(alarm(&format!("x{i}"), None)))
        .collect();
    match c.send_batch(too_many).await {
        Err(ClientError::Refused { status, text }) => {
            assert_eq!(status, 413);
            assert!(text.contains("at most 1000 messages"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    d.stop_all();
}

/// A message refused for good upstream is a dead letter at its proxy: the
/// centre sees it (the site is degraded and `rsctl components` counts its
/// dead letters, from the heartbeat), and an admin replays or discards it
/// through the back-channel once the cause is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_show_at_the_centre_and_are_replayed_or_discarded_by_an_admin() {
    use crate::backchannel_faults::{rsctl, until};
    let dir = tmp("dead-letters");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // The server refuses any part over 4000 bytes (for now); heartbeats
    // every 2 s.
    let (a, m) = d
        .server_and_mlm_with("heartbeat_secs = 2\n[limits]\nmax_part_bytes = 4000\n")
        .unwrap();
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let c = register(&s).await;
    let big = |n: u32| alarm(&format!("core dump {n}: {}", "x".repeat(6000)), None);
    let (big1, big2) = (
        c.send("alarm", &big(1)).await.unwrap(),
        c.send("alarm", &big(2)).await.unwrap(),
    );
    let small = c.send("alarm", &alarm("small", None)).await.unwrap();
    let appdir = dir.join("appserver");
    assert!(
        wait_for(Duration::from_secs(30), || stored_ids(&appdir)
            .is_ok_and(|ids| ids.contains(&small))),
        "the small alarm did not arrive"
    );
    assert!(
        until(30, || async {
            proxy_metrics(&s)
                .await
                .is_ok_and(|m| m.get("spool.dead_letters") == Some(&2))
        })
        .await,
        "{:?}",
        proxy_metrics(&s).await
    );
    // The centre sees it with the site's next heartbeat.
    let row = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("acme.p1 "))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert!(
        until(30, || async {
            let (_, out, _) = rsctl(&a, &["components"]);
            row(&out).get(2..4) == Some(&["degraded".to_owned(), "2".to_owned()][..])
        })
        .await,
        "{}",
        rsctl(&a, &["components"]).1
    );

    // The cause is fixed: the server takes big parts again.
    d.node("appserver").stop(Duration::from_secs(10));
    let cfg = dir.join("appserver.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[limits]\nmax_part_bytes = 4000\n", "")).unwrap();
    d.restart("appserver").unwrap();
    // One is not wanted any more; an unknown one is refused with the reason.
    let (code, out, err) = rsctl(
        &a,
        &[
            "send",
            "discardDeadLetters",
            "--to",
            "acme.p1",
            "--message",
            &big1,
            "--watch",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 dead letter(s) discarded"), "{out}");
    let (code, out, _) = rsctl(
        &a,
        &[
            "send",
            "replayDeadLetters",
            "--to",
            "acme.p1",
            "--message",
            "no-such-message",
            "--watch",
        ],
    );
    assert_ne!(code, 0);
    assert!(out.contains("no dead letter no-such-message here"), "{out}");
    // The other goes again, and is stored once.
    let (code, out, err) = rsctl(
        &a,
        &["send", "replayDeadLetters", "--to", "acme.p1", "--watch"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 dead letter(s) put back in the spool"),
        "{out}"
    );
    let want: HashSet<String> = [big2.clone(), small.clone()].into_iter().collect();
    assert!(
        all_stored(&dir, &want, Duration::from_secs(30)),
        "not replayed"
    );
    assert_exactly_once(&dir, &want);
    assert!(!stored_ids(&appdir).unwrap().contains(&big1));
    let drops = Client::new(&s)
        .call::<()>(http::Method::GET, "/v1/drops", None)
        .await
        .unwrap();
    assert!(
        drops.to_string().contains(&big1) && drops.to_string().contains("discarded"),
        "{drops}"
    );
    // And the site is well again at the centre.
    assert!(
        until(30, || async {
            let (_, out, _) = rsctl(&a, &["components"]);
            row(&out).get(2..4) == Some(&["ok".to_owned(), "0".to_owned()][..])
        })
        .await,
        "{}",
        rsctl(&a, &["components"]).1
    );
    d.stop_all();
}

/// A damaged spool does not keep a site down (Vector's disk buffer wedges
/// until someone deletes it by hand): `rs-proxy spool verify` reports the
/// damage; at its next start the proxy moves a damaged spool file aside and
/// starts a new one, copies a damaged log segment aside and writes again
/// every message it can read from it, and reports the recovery in its
/// status (degraded until what was moved aside is removed). Here both are
/// damaged while 40 undelivered alarms wait: an index page of `spool.db`
/// is overwritten, and so are a few bytes of one alarm's record in the
/// log. The other 39 reach the server, each once; the one overwritten is
/// beyond reading, and the recovery says where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_is_moved_aside_reported_and_what_it_held_is_sent() {
    let dir = tmp("damaged-spool");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // No server yet: the alarms wait in the proxy's spool.
    let port = rs_tests::deploy::held_port();
    let s = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&port),
            &Extra::default(),
        )
        .unwrap();
    let c = register(&s).await;
    let mut sent = Vec::new();
    for i in 0..40 {
        sent.push(
            c.send("alarm", &alarm(&format!("kept through damage {i}"), None))
                .await
                .unwrap(),
        );
    }
    d.node("p1").stop(Duration::from_secs(10));
    let spool = dir.join("p1").join("spool.db");
    let (ok, text) = rs_proxy::verify_spool(&spool).unwrap();
    assert!(ok && text.contains("waiting: 4"), "{text}");

    // Damage in the log: a few bytes inside the record of alarm 20, with
    // records after it intact (not the torn end of a crash).
    let log = dir.join("p1").join("spool.log");
    let mut hit = None;
    for e in std::fs::read_dir(&log).unwrap().flatten() {
        let data = std::fs::read(e.path()).unwrap();
        let needle = b"kept through damage 20";
        if let Some(at) = data
            .windows(needle.len() + 1)
            .position(|w| &w[..needle.len()] == needle && !w[needle.len()].is_ascii_digit())
        {
            hit = Some((e.path(), at));
        }
    }
    let (segment, at) = hit.expect("alarm 20 is in the log");
    {
        use std::io::{Seek as _, Write as _};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        f.seek(std::io::SeekFrom::Start(at as u64)).unwrap();
        f.write_all(&[0xA5; 8]).unwrap();
        f.sync_all().unwrap();
    }
    let lost: String = {
        let (_, text) = rs_proxy::verify_spool(&spool).unwrap();
        assert!(text.contains("unreadable"), "{text}");
        text
    };

    // Damage: the spool's index page overwritten (the table intact).
    {
        #[allow(clippy::disallowed_methods)]
        let c = rusqlite::Connection::open(&spool).unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        let root: i64 = c
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = 'spool_due'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        drop(c);
        use std::io::{Seek as _, Write as _};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&spool)
            .unwrap();
        f.seek(std::io::SeekFrom::Start(((root - 1) * page) as u64))
            .unwrap();
        f.write_all(&vec![0xA5; page as usize]).unwrap();
        f.sync_all().unwrap();
    }
    let (ok, text) = rs_proxy::verify_spool(&spool).unwrap();
    assert!(!ok, "the damage is not found: {text}");

    // The proxy starts anyway, with the damaged file moved aside.
    tokio::task::block_in_place(|| d.restart("p1")).unwrap();
    let moved: Vec<_> = std::fs::read_dir(dir.join("p1"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.db.damaged-")
        })
        .collect();
    assert!(!moved.is_empty(), "the damaged spool was not moved aside");
    let copies = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".seg.damaged-"))
        .count();
    assert_eq!(copies, 1, "the damaged segment was not copied aside");
    let status = rs_proxy::client::Client::new(&s).status().await.unwrap();
    // 39 alarms and the proxy's own messages (cold start, heartbeat).
    assert!(
        status["spool_recovery"]["salvaged"].as_u64() >= Some(39),
        "the recovery is not reported: {status}"
    );
    assert!(
        status["spool_recovery"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("unreadable")),
        "the log's damage is not reported: {status} ({lost})"
    );
    let a = d.appserver(&port, "").unwrap();
    let overwritten = sent[20].clone();
    let readable: HashSet<String> = sent.into_iter().filter(|i| *i != overwritten).collect();
    assert!(
        all_stored(&dir, &readable, Duration::from_secs(60)),
        "the alarms of the damaged spool were not delivered"
    );
    assert_exactly_once(&dir, &readable);
    assert!(
        !stored_ids(&dir.join("appserver"))
            .unwrap()
            .contains(&overwritten),
        "an overwritten record was delivered"
    );
    // The centre sees it in the site's status (its cold start's tree).
    let seen = wait_for(Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                rs_tests::deploy::admin(&a)
                    .get(format!(
                        "{}/rs/v1/control/components",
                        rs_tests::deploy::base(&a)
                    ))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()
            })
        })
        .is_some_and(|t| t.contains("spool.recovered_from"))
    });
    assert!(seen, "the server was not told of the recovery");
    // And the next check finds nothing wrong: the segment was rewritten
    // without the damage.
    d.node("p1").stop(Duration::from_secs(10));
    let (ok, text) = rs_proxy::verify_spool(&spool).unwrap();
    assert!(ok, "{text}");
    d.stop_all();
}
