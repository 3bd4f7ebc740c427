//! The back-channel at scale and under faults, on real daemons: a group
//! message crosses each link once; a reply lost on the way is offered
//! again and applied once; a proxy away for an hour gets what has not
//! expired; a job completes across the reconnect its own action causes.

use std::time::Duration;

use rs_protocol::codec::Limits;
use rs_protocol::codec::api::{decode_components, decode_job};
use rs_tests::deploy::{Deployment, Extra, admin, base, proxy_metrics, server_metrics};

use crate::backchannel::{attr, exe, post, tmp};

/// Waits (async) until `cond` holds or `secs` pass; returns whether it held.
pub(crate) async fn until<F, Fut>(secs: u64, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if cond().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The components the server knows, with the tiers they are reached through.
pub(crate) async fn routes(a: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let Ok(r) = admin(a)
        .get(format!("{}/rs/v1/control/components", base(a)))
        .send()
        .await
    else {
        return Default::default();
    };
    let b = r.bytes().await.unwrap_or_default();
    decode_components(&b, &Limits::default())
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            (
                c.id.to_string(),
                c.via.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

/// The job's target states, once it is done (or after `secs`).
pub(crate) async fn finish(a: &str, id: &str, secs: u64) -> rs_protocol::codec::api::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let b = admin(a)
            .get(format!(
                "{}/rs/v1/control/jobs/{id}?after=0&wait=5",
                base(a)
            ))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let j = decode_job(&b, &Limits::default()).unwrap();
        if j.is_done() || std::time::Instant::now() > deadline {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn put(a: &str, path: &str, body: &str) -> (u16, String) {
    let r = admin(a)
        .put(format!("{}/rs/v1/control/{path}", base(a)))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_crosses_each_link_once_and_reaches_all_fifty_proxies() {
    let dir = tmp("group50");
    // Plain HTTP: the relay between the tiers reads (or cuts) what crosses it.
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    // Every byte between the appserver and the MLM goes through the relay.
    let (relay, link) = rs_tests::relay::start(a.clone()).await.unwrap();
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&relay),
            &Extra::default(),
        )
        .unwrap();
    const N: usize = 50;
    for i in 1..=N {
        d.proxy(
            &format!("p{i}"),
            &format!("acme.p{i}"),
            std::slice::from_ref(&m),
            &Extra::default(),
        )
        .unwrap();
    }
    assert!(
        until(60, || async {
            routes(&a)
                .await
                .iter()
                .filter(|(id, via)| {
                    id.starts_with("acme.p") && !id.contains(".s") && via.as_slice() == ["acme.m1"]
                })
                .count()
                == N
        })
        .await,
        "all {N} proxies report through the MLM"
    );
    // A selector group (every proxy of customer acme) and a static one.
    let (s, body) = put(
        &a,
        "groups/stores",
        r#"<group name="stores" customer="acme" kind="proxy"/>"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains(&format!("size=\"{N}\"")), "{body}");
    let (s, body) = put(
        &a,
        "groups/pilot",
        r#"<group name="pilot"><member id="acme.p1"/><member id="acme.p2"/><member id="acme.p404"/></group>"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");

    link.count(r#"<control action="getConfig""#);
    link.count(r#"<to id="acme.p"#);
    link.count_up(r#"<delivered ref=""#);
    let (s, body) = post(
        &a,
        r#"<send><to group="stores"/><control action="getConfig"/></send>"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let j = finish(&a, attr(&body, "id"), 90).await;
    assert_eq!(j.targets.len(), N);
    assert_eq!(j.count("succeeded"), N, "{j:?}");
    for t in &j.targets {
        let r = t.result.as_deref().unwrap_or("");
        assert!(
            r.contains(&format!("id = \"{}\"", t.id)),
            "each proxy answers with its own configuration: {r}"
        );
    }
    // One copy crossed the appserver -> MLM link, listing the 50.
    assert_eq!(link.seen(r#"<control action="getConfig""#), 1);
    assert_eq!(link.seen(r#"<to id="acme.p"#), N as u64);
    // The MLM reported each delivery up (each proxy acknowledged its copy).
    assert!(link.seen_up(r#"<delivered ref=""#) >= N as u64);

    // A static member never seen fails in the job; the others succeed.
    let (s, body) = post(
        &a,
        r#"<send><to group="pilot"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let j = finish(&a, attr(&body, "id"), 30).await;
    assert_eq!(j.count("succeeded"), 2, "{j:?}");
    let lost = j
        .targets
        .iter()
        .find(|t| t.id.as_str() == "acme.p404")
        .unwrap();
    assert_eq!(
        (lost.state.as_str(), lost.code.as_deref()),
        ("failed", Some("unknown-destination"))
    );
    // Unknown groups and empty definitions are refused.
    let (s, body) = post(
        &a,
        r#"<send><to group="nosuch"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(s, 404, "{body}");
    let (s, _) = put(&a, "groups/empty", r#"<group name="empty"/>"#).await;
    assert_eq!(s, 400);
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_is_offered_again_and_the_action_applied_once() {
    let dir = tmp("cut-reply");
    // Plain HTTP: the relay between the tiers reads (or cuts) what crosses it.
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "offer_again_secs = 2").unwrap();
    let (relay, link) = rs_tests::relay::start(a.clone()).await.unwrap();
    let s = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&relay),
            &Extra::default(),
        )
        .unwrap();
    assert!(until(30, || async { routes(&a).await.contains_key("acme.p1") }).await);

    // The reply carrying the action is cut after the server wrote it.
    link.cut_reply_with(r#"<control action="disableForwarding""#);
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="disableForwarding"/></send>"#,
    )
    .await;
    let j = finish(&a, attr(&body, "id"), 30).await;
    assert_eq!(j.count("succeeded"), 1, "{j:?}");
    assert_eq!(link.cuts.load(std::sync::atomic::Ordering::Relaxed), 1);
    let pm = proxy_metrics(&s).await.unwrap();
    assert_eq!(pm.get("backchannel.applied"), Some(&1));

    // The request carrying the answer and the acknowledgement is cut: the
    // answer is sent again from the spool, the action offered again, and
    // the proxy drops the repeat without applying it a second time.
    link.cut_request_with(r#"sub="enableForwarding""#);
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="enableForwarding"/></send>"#,
    )
    .await;
    let j = finish(&a, attr(&body, "id"), 30).await;
    assert_eq!(j.count("succeeded"), 1, "{j:?}");
    assert_eq!(link.cuts.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert!(
        until(30, || async {
            proxy_metrics(&s)
                .await
                .is_ok_and(|m| m.get("backchannel.duplicates") >= Some(&1))
        })
        .await,
        "the unacknowledged action is offered again"
    );
    let pm = proxy_metrics(&s).await.unwrap();
    assert_eq!(pm.get("backchannel.applied"), Some(&2), "{pm:?}");
    let st = rs_proxy::client::Client::new(&s).status().await.unwrap();
    assert_eq!(st["forwarding"], true);
    // Once acknowledged, nothing waits any more.
    let am = server_metrics(&a).await.unwrap();
    assert_eq!(am.get("messages.duplicates"), Some(&0), "{am:?}");
    d.stop_all();
}

/// libfaketime, which shifts a process's wall clock (not its monotonic
/// one) by what a file says; installed by scripts/test (`faketime`).
fn libfaketime() -> std::path::PathBuf {
    let p = std::path::PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
    assert!(
        p.exists(),
        "{} is missing: apt-get install faketime (scripts/test does)",
        p.display()
    );
    p
}

/// The environment that puts a daemon on a wall clock the test moves by
/// writing an offset (`+3600s`) into `clock` (its monotonic clock runs on).
pub(crate) fn faketime(clock: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), libfaketime().display().to_string()),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            clock.display().to_string(),
        ),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_away_for_an_hour_gets_what_has_not_expired() {
    let dir = tmp("away-an-hour");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // The appserver and the MLM run on a clock the test moves.
    let clock = dir.join("faketime");
    std::fs::write(&clock, "+0s\n").unwrap();
    d.env = faketime(&clock);
    let (a, m) = d.server_and_mlm().unwrap();
    d.env.clear();
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    assert!(until(30, || async { routes(&a).await.contains_key("acme.p1") }).await);
    d.node("p1").stop(Duration::from_secs(10));

    // While it is away: one action worth 30 minutes, one worth two hours.
    let (_, short) = post(
        &a,
        r#"<send ttl-secs="1800"><to id="acme.p1"/><control action="disableForwarding"/></send>"#,
    )
    .await;
    let (_, long) = post(
        &a,
        r#"<send ttl-secs="7200"><to id="acme.p1"/><control action="getStatus"/></send>"#,
    )
    .await;
    // Both wait at the MLM, nearest the proxy.
    assert!(
        until(30, || async {
            server_metrics(&m)
                .await
                .is_ok_and(|x| x.get("backchannel.pending") == Some(&2))
        })
        .await
    );

    // An hour passes.
    std::fs::write(&clock, "+3600s\n").unwrap();
    let j = finish(&a, attr(&short, "id"), 30).await;
    assert_eq!(j.count("expired"), 1, "{j:?}");
    assert!(
        until(30, || async {
            server_metrics(&m).await.is_ok_and(|x| {
                x.get("backchannel.pending") == Some(&1) && x.get("backchannel.expired") == Some(&1)
            })
        })
        .await,
        "the MLM drops the expired copy on its own clock"
    );

    // Back again: the live action arrives and is applied; the expired one
    // never is.
    d.restart("p1").unwrap();
    let j = finish(&a, attr(&long, "id"), 30).await;
    assert_eq!(j.count("succeeded"), 1, "{j:?}");
    let st = rs_proxy::client::Client::new(&s).status().await.unwrap();
    assert_eq!(
        st["forwarding"], true,
        "the expired disableForwarding was not applied"
    );
    assert_eq!(st["backchannel"]["applied"], 1);
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_completes_across_the_reconnect_it_causes_and_routes_follow_the_proxy() {
    let dir = tmp("move");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let m1 = d
        .mlm("m1", "acme.m1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let m2 = d
        .mlm("m2", "acme.m2", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    d.proxy(
        "p1",
        "acme.p1",
        std::slice::from_ref(&m1),
        &Extra::default(),
    )
    .unwrap();
    assert!(
        until(30, || async {
            routes(&a).await.get("acme.p1").map(Vec::as_slice) == Some(&["acme.m1".to_owned()][..])
        })
        .await
    );

    // Move the proxy to the other MLM: the action resets its connection,
    // and its job still completes.
    let m2u = base(&m2);
    let (_, body) = post(
        &a,
        &format!(
            r#"<send><to id="acme.p1"/><control action="configChange"><config>[upstream]
urls = ["{m2u}"]
</config></control></send>"#
        ),
    )
    .await;
    let j = finish(&a, attr(&body, "id"), 30).await;
    assert_eq!(j.count("succeeded"), 1, "{j:?}");
    // The server learns the new route from what the proxy sends next...
    assert!(
        until(30, || async {
            routes(&a).await.get("acme.p1").map(Vec::as_slice) == Some(&["acme.m2".to_owned()][..])
        })
        .await,
        "{:?}",
        routes(&a).await
    );
    // ...and the next action goes the new way.
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="getStatus"/></send>"#,
    )
    .await;
    let j = finish(&a, attr(&body, "id"), 30).await;
    assert_eq!(j.count("succeeded"), 1, "{j:?}");
    let m2_metrics = server_metrics(&m2).await.unwrap();
    assert!(m2_metrics.get("messages.forwarded") > Some(&0));

    // An action addressed to an MLM is carried out by the MLM itself.
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.m1"/><to id="acme.m2"/><control action="getStatus"/></send>"#,
    )
    .await;
    let j = finish(&a, attr(&body, "id"), 30).await;
    assert_eq!(j.count("succeeded"), 2, "{j:?}");
    for t in &j.targets {
        let r = t.result.as_deref().unwrap_or("");
        assert!(
            r.contains(&format!("<status kind=\"mlm\" id=\"{}\"", t.id)),
            "{r}"
        );
    }
    // What an MLM does not do is refused with the reason.
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.m1"/><control action="shutdown"/></send>"#,
    )
    .await;
    let j = finish(&a, attr(&body, "id"), 30).await;
    assert_eq!(j.targets[0].code.as_deref(), Some("unsupported"), "{j:?}");
    d.stop_all();
}

/// A job subscriber: records each pushed document; answers 503 to the
/// first push, so the server has to push again.
async fn subscriber() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(u16, bytes::Bytes)>>>,
    tokio_util::sync::CancellationToken,
) {
    use warp::Filter as _;
    let got: std::sync::Arc<std::sync::Mutex<Vec<(u16, bytes::Bytes)>>> = Default::default();
    let g = got.clone();
    let route = warp::path!("hook")
        .and(warp::post())
        .and(warp::body::content_length_limit(1 << 20))
        .and({
            #[allow(clippy::disallowed_methods)]
            warp::body::bytes()
        })
        .map(move |b: bytes::Bytes| {
            let mut g = g.lock().unwrap();
            let status = if g.is_empty() { 503 } else { 200 };
            g.push((status, b));
            warp::reply::with_status("", http::StatusCode::from_u16(status).unwrap())
        });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(rs_net::server::serve_tcp(
        l,
        None,
        rs_net::server::finish(route),
        rs_net::server::ServeConfig::default(),
        stop.clone(),
    ));
    (addr, got, stop)
}

/// Runs `rsctl` (the multi-call executable's role) against `a`.
pub(crate) fn rsctl(a: &str, args: &[&str]) -> (i32, String, String) {
    use std::io::Read as _;
    let mut child = std::process::Command::new(exe())
        .arg("rsctl")
        .args(rs_tests::deploy::rsctl_args(a))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    // A watch that never ends fails its test (exit -1) instead of holding
    // the whole suite.
    let code = rs_tests::wait_or_kill(&mut child, Duration::from_secs(180));
    (code, out.join().unwrap(), err.join().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsctl_changes_a_groups_configuration_and_subscribers_get_the_job_pushed() {
    let dir = tmp("rsctl");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    for i in 1..=3 {
        d.proxy(
            &format!("p{i}"),
            &format!("acme.p{i}"),
            std::slice::from_ref(&m),
            &Extra::default(),
        )
        .unwrap();
    }
    assert!(
        until(30, || async {
            let r = routes(&a).await;
            (1..=3).all(|i| r.contains_key(&format!("acme.p{i}")))
        })
        .await
    );
    let a2 = a.clone();
    let run = move |args: Vec<String>| {
        let a = a2.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rsctl(&a, &args)
        })
    };
    let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();

    let (code, out, err) = run(v(&["components"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("acme.p2") && out.contains("acme.m1"), "{out}");
    let (code, _, err) = run(v(&["tag", "acme.p1", "pilot"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(v(&[
        "groups",
        "set",
        "stores",
        "--customer",
        "acme",
        "--kind",
        "proxy",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 members"), "{out}");

    // Change every proxy of the group and watch the job finish; a
    // subscriber gets the job pushed as it changes.
    let (hook, pushed, stop) = subscriber().await;
    let (code, out, err) = run(v(&[
        "send",
        "configChange",
        "--group",
        "stores",
        "--set",
        "heartbeat_secs = 9",
        "--notify",
        &format!("http://{hook}/hook"),
        "--watch",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("3/3 final: 3 succeeded"), "{out}");
    for i in 1..=3 {
        let cfg = rs_proxy::Config::load(&dir.join(format!("p{i}.toml"))).unwrap();
        assert_eq!(cfg.heartbeat_secs, 9);
        assert_eq!(cfg.id, Some(format!("acme.p{i}")));
    }
    let job_id = out.split_whitespace().nth(1).unwrap().to_owned();
    // The subscriber is pushed the job until it accepts; the last push it
    // accepted shows the job done.
    assert!(
        until(30, || async {
            pushed.lock().unwrap().iter().any(|(s, b)| {
                *s == 200
                    && decode_job(b, &Limits::default())
                        .is_ok_and(|j| j.id == job_id && j.is_done() && j.count("succeeded") == 3)
            })
        })
        .await,
        "{:?}",
        pushed.lock().unwrap().len()
    );
    assert_eq!(
        pushed.lock().unwrap()[0].0,
        503,
        "the first push was refused"
    );
    stop.cancel();

    // A tag selects, too.
    let (code, out, err) = run(v(&["groups", "set", "pilot", "--tag", "pilot"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 members"), "{out}");
    let (code, out, _) = run(v(&["send", "ping", "--group", "pilot", "--watch"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acme.p1") && !out.contains("acme.p2"), "{out}");

    // Refusals come back as errors with the reason, and exit status 1.
    let (code, _, err) = run(v(&["send", "ping", "--to", "acme.p9"])).await.unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("unknown destination acme.p9"), "{err}");
    let (code, _, err) = run(v(&[
        "send",
        "configChange",
        "--to",
        "acme.p1",
        "--set",
        "nonsense = 1",
        "--watch",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 1, "a failed destination fails the watch");
    let _ = err;
    d.stop_all();
}

/// POSTs `msgs` to `a` as an envelope from `sender`, with these notices.
pub(crate) async fn post_envelope(
    a: &str,
    sender: &str,
    msgs: &[rs_protocol::Message],
    delivered: Vec<(rs_protocol::MessageId, rs_protocol::RsId)>,
) -> rs_protocol::codec::RawEnvelope {
    let mut meta = rs_protocol::EnvelopeMeta::new(
        rs_protocol::RsId::new(sender).unwrap(),
        rs_protocol::Timestamp::now(),
    );
    meta.delivered = delivered;
    let mut w = rs_protocol::codec::EnvelopeWriter::new(&meta);
    for m in msgs {
        w.push(m);
    }
    let enc = w.finish();
    let r = rs_tests::deploy::component_client(a, sender)
        .unwrap()
        .post(format!("{}/rs/v1/envelope", base(a)))
        .header("content-type", enc.content_type)
        .body(enc.body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    rs_protocol::codec::decode_headers(&ct, r.bytes().await.unwrap(), &Limits::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_reports_deliveries_only_for_its_own_subtree() {
    use rs_protocol::control::{NodeState, StatusNode};
    use rs_protocol::control_messages::status_message;
    let dir = tmp("delivered");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    // A hand-written MLM acme.m7 relays acme.p7's cold start: the server
    // learns that acme.p7 is reached through acme.m7.
    let now = rs_protocol::Timestamp::now();
    let p7 = rs_protocol::RsId::new("acme.p7").unwrap();
    let tree = StatusNode {
        id: Some(p7.clone()),
        ..StatusNode::new("proxy", NodeState::Ok)
    };
    let mut m = status_message(
        p7.clone(),
        rs_protocol::control::SUB_COLD_START,
        &tree,
        now,
        Duration::from_secs(600),
        5,
    );
    m.header.routing.push(rs_protocol::Hop {
        component: rs_protocol::RsId::new("acme.m7").unwrap(),
        received: now,
        sent: Some(now),
    });
    let reply = post_envelope(&a, "acme.m7", &[m], Vec::new()).await;
    assert_eq!(reply.meta.outcomes[0].1, rs_protocol::Outcome::Accepted);
    assert_eq!(routes(&a).await["acme.p7"], ["acme.m7"]);

    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p7"/><control action="ping"/></send>"#,
    )
    .await;
    let msg = rs_protocol::MessageId::new(attr(&body, "message")).unwrap();
    // Another component cannot claim the delivery...
    post_envelope(&a, "acme.m8", &[], vec![(msg.clone(), p7.clone())]).await;
    let j = finish(&a, attr(&body, "id"), 0).await;
    assert_eq!(j.targets[0].state, "pending");
    // ...the MLM it is reached through can, and the copy for it rides on
    // the reply to its POST.
    let reply = post_envelope(&a, "acme.m7", &[], vec![(msg.clone(), p7.clone())]).await;
    assert!(reply.messages.iter().any(|m| m.header.id == msg));
    let j = finish(&a, attr(&body, "id"), 0).await;
    assert_eq!(j.targets[0].state, "delivered", "{j:?}");
    assert!(j.version >= 1);
    d.stop_all();
}

/// An MLM that dies right after applying an action addressed to itself,
/// before its answer is spooled, must not apply it again when the action
/// is offered again after its restart (it recorded the action only after
/// answering, so it did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlm_killed_while_applying_its_own_action_does_not_apply_it_again() {
    let dir = tmp("mlm-crash-apply");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "offer_again_secs = 2").unwrap();
    d.env = vec![("RS_CRASH_AT".into(), "mlm-action-applied".into())];
    d.mlm(
        "mlm",
        "acme.m1",
        std::slice::from_ref(&a),
        &Extra::default(),
    )
    .unwrap();
    d.env.clear();
    // Started again without the crash.
    d.node("mlm").env.clear();
    assert!(until(30, || async { routes(&a).await.contains_key("acme.m1") }).await);
    let (st, body) = post(
        &a,
        r#"<send><to id="acme.m1"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let job_id = attr(&body, "id").to_owned();
    assert!(
        wait_for_exit(&mut d, "mlm", 30),
        "the MLM did not reach the crash point"
    );
    d.restart("mlm").unwrap();
    let j = finish(&a, &job_id, 60).await;
    let t = &j.targets[0];
    assert_eq!(t.state.as_str(), "failed", "{j:?}");
    assert!(
        t.text
            .as_deref()
            .unwrap_or("")
            .contains("not applied a second time"),
        "{j:?}"
    );
    let log = std::fs::read_to_string(dir.join("logs").join("mlm.log")).unwrap();
    assert_eq!(
        log.matches("for this MLM:").count(),
        1,
        "applied more than once: {log}"
    );
    assert!(
        log.contains("was being applied when rs-mlm stopped"),
        "{log}"
    );
    d.stop_all();
}

/// Waits until a node's process has ended by itself.
fn wait_for_exit(d: &mut Deployment, name: &str, secs: u64) -> bool {
    let node = d.node(name);
    rs_tests::deploy::wait_for(Duration::from_secs(secs), || !node.is_running())
}

/// Long-polls the server as `id` (acknowledging nothing) until a reply
/// carries back-channel message `want`; when it came.
async fn poll_until(a: &str, id: &str, want: &str) -> std::time::Instant {
    use crate::security::{client_of, empty_envelope, send_env};
    let http = client_of(&rs_tests::deploy::component_tls(a, id).unwrap().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{want} never came to {id}"
        );
        let (ct, body) = empty_envelope(id, Some(Duration::from_secs(25)));
        let (st, reply) = send_env(&http, a, &ct, body).await.unwrap();
        assert_eq!(st, 200);
        if reply
            .unwrap()
            .messages
            .iter()
            .any(|m| m.header.id.as_str() == want)
        {
            return std::time::Instant::now();
        }
    }
}

/// A back-channel message handed out and not acknowledged (its reply was
/// lost) is offered again `offer_again_secs` after it went out, on a long
/// poll already held: not at the next tick of a fixed ticker, which made
/// the first re-offer come after up to twice the interval. Two messages
/// offered half an interval apart show it: a fixed ticker is late by at
/// least half an interval for one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_message_is_offered_again_after_offer_again_secs() {
    const AGAIN: u64 = 4;
    let dir = tmp("reoffer-timing");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d
        .appserver("127.0.0.1:0", &format!("offer_again_secs = {AGAIN}"))
        .unwrap();
    // Two sites the server has heard from.
    for id in ["acme.p1", "acme.p2"] {
        let http =
            crate::security::client_of(&rs_tests::deploy::component_tls(&a, id).unwrap().unwrap());
        let (_, ct, body) = crate::security::envelope(id, &[id]);
        let (st, _) = crate::security::send_env(&http, &a, &ct, body)
            .await
            .unwrap();
        assert_eq!(st, 200);
    }
    let send = |to: &'static str| {
        let a = a.clone();
        async move {
            let (st, body) = post(
                &a,
                &format!(r#"<send><to id="{to}"/><control action="ping"/></send>"#),
            )
            .await;
            assert_eq!(st, 200, "{body}");
            let job = crate::backchannel::job(&a, attr(&body, "id")).await;
            attr(&job, "message").to_owned()
        }
    };
    let mut lateness = Vec::new();
    let m1 = send("acme.p1").await;
    let first1 = poll_until(&a, "acme.p1", &m1).await;
    let again1 = tokio::spawn({
        let (a, m1) = (a.clone(), m1.clone());
        async move { poll_until(&a, "acme.p1", &m1).await }
    });
    tokio::time::sleep(Duration::from_millis(AGAIN * 1000 / 2)).await;
    let m2 = send("acme.p2").await;
    let first2 = poll_until(&a, "acme.p2", &m2).await;
    let again2 = poll_until(&a, "acme.p2", &m2).await;
    let again1 = again1.await.unwrap();
    // The second re-offer of the first, a whole interval after its first.
    let third1 = poll_until(&a, "acme.p1", &m1).await;
    for (name, from, to) in [
        ("first re-offer of m1", first1, again1),
        ("first re-offer of m2", first2, again2),
        ("second re-offer of m1", again1, third1),
    ] {
        let waited = to - from;
        let late = waited.as_secs_f64() - AGAIN as f64;
        assert!(late > -0.05, "{name} came early: {waited:?}");
        lateness.push((name, late));
    }
    assert!(
        lateness
            .iter()
            .all(|(_, late)| *late < AGAIN as f64 / 2.0 - 0.5),
        "re-offers later than offer_again_secs = {AGAIN}: {lateness:?}"
    );
    d.stop_all();
}
