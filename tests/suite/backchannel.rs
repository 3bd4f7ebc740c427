//! The back-channel, first steps: a control action sent through the
//! control API reaches a proxy on the reply to its long poll, is applied
//! once, and its response completes the job.

use std::path::PathBuf;
use std::time::Duration;

use rs_tests::deploy::{Deployment, Extra, admin, base, proxy_metrics, wait_for};

pub(crate) fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rs-demo"))
}

pub(crate) fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rs-suite-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub(crate) async fn post(a: &str, body: &str) -> (u16, String) {
    let r = admin(a)
        .post(format!("{}/rs/v1/control/send", base(a)))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

pub(crate) fn attr<'a>(doc: &'a str, name: &str) -> &'a str {
    let start = doc.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
    &doc[start..start + doc[start..].find('"').unwrap()]
}

/// The text of `GET /rs/v1/control/{path}` as the admin.
pub(crate) async fn control_get(a: &str, path: &str) -> String {
    admin(a)
        .get(format!("{}/rs/v1/control/{path}", base(a)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub(crate) async fn job(a: &str, id: &str) -> String {
    control_get(a, &format!("jobs/{id}")).await
}

pub(crate) async fn until_done(a: &str, id: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let j = job(a, id).await;
        if j.contains("state=\"done\"") || std::time::Instant::now() > deadline {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_actions_reach_a_proxy_and_complete_their_jobs() {
    let dir = tmp("backchannel");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    // The server learns of the proxy from its cold start message.
    assert!(wait_for(Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                admin(&a)
                    .get(format!("{}/rs/v1/control/components", base(&a)))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
                    .contains("id=\"acme.p1\"")
            })
        })
    }));

    let (status, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="getStatus"/></send>"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(
        j.contains("<target id=\"acme.p1\" state=\"succeeded\""),
        "{j}"
    );
    assert!(
        j.contains("&lt;status kind=\"proxy\" id=\"acme.p1\""),
        "the status tree comes back: {j}"
    );

    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="disableForwarding"/></send>"#,
    )
    .await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(j.contains("state=\"succeeded\""), "{j}");
    let st = rs_proxy::client::Client::new(&s).status().await.unwrap();
    assert_eq!(st["forwarding"], false);

    // What a proxy does not support is refused with the reason.
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="softwareUpdate" package="rs-proxy" version="9.9"/></send>"#,
    )
    .await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(
        j.contains("state=\"failed\" ") && j.contains("code=\"unsupported\""),
        "{j}"
    );

    // Unknown destinations are refused at the API, with nothing queued.
    let (status, body) = post(
        &a,
        r#"<send><to id="acme.p99"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("unknown destination acme.p99"), "{body}");
    let (status, body) = post(&a, r#"<send><control action="ping"/></send>"#).await;
    assert_eq!(status, 400, "{body}");

    let pm = proxy_metrics(&s).await.unwrap();
    assert_eq!(pm.get("spool.dead_letters"), Some(&0));

    // The documents of the control API validate against their DTD.
    let (_, created) = post(
        &a,
        r#"<send ttl-secs="60"><to id="acme.p1"/><control action="ping"/></send>"#,
    )
    .await;
    let done = until_done(&a, attr(&created, "id")).await;
    let docs = [
        r#"<send ttl-secs="60"><to id="acme.p1"/><control action="ping"/></send>"#.to_owned(),
        created,
        done,
        j,
    ];
    for (i, doc) in docs.iter().enumerate() {
        rs_tests::assert_control_api_valid(
            doc.as_bytes(),
            &dir.join(format!("control-api-{i}.xml")),
        );
    }

    // configChange: a bad configuration is refused with the reason and
    // the old one kept.
    let cfg_path = dir.join("p1.toml");
    let before = std::fs::read_to_string(&cfg_path).unwrap();
    let change = |cfg: &str| {
        format!(
            r#"<send><to id="acme.p1"/><control action="configChange"><config>{}</config></control></send>"#,
            cfg.replace('&', "&amp;").replace('<', "&lt;")
        )
    };
    let (_, body) = post(&a, &change("bogus = 1\n")).await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(
        j.contains("state=\"failed\" ") && j.contains("code=\"invalid\""),
        "{j}"
    );
    assert!(j.contains("bogus"), "the reason names the fault: {j}");
    assert_eq!(std::fs::read_to_string(&cfg_path).unwrap(), before);
    // Nor may it move the proxy's state elsewhere.
    let (_, body) = post(&a, &change("data_dir = \"/elsewhere\"\n")).await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(
        j.contains("code=\"invalid\"") && j.contains("data_dir"),
        "{j}"
    );

    // A good one is laid over the file, which is replaced, and the proxy
    // restarts with it (in place, so its process lives on); the restarted
    // proxy reports the new value and kept everything else.
    let (_, body) = post(
        &a,
        &change("heartbeat_secs = 7\n[upstream]\npoll_hold_secs = 20\n"),
    )
    .await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(j.contains("state=\"succeeded\""), "{j}");
    let after = rs_proxy::Config::load(&cfg_path).unwrap();
    assert_eq!(after.heartbeat_secs, 7);
    assert_eq!(after.upstream.poll_hold_secs, 20);
    assert_eq!(after.id.as_deref(), Some("acme.p1"));
    assert_eq!(
        after.upstream.urls,
        rs_proxy::Config::parse(&before).unwrap().upstream.urls
    );
    // Until it has restarted, the old process (still draining) answers
    // with the configuration it runs: wait for the new one, whose
    // counters start from zero.
    assert!(
        wait_for(Duration::from_secs(30), || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    proxy_metrics(&s)
                        .await
                        .is_ok_and(|m| m.get("backchannel.applied") == Some(&0))
                })
            })
        }),
        "the proxy restarts"
    );
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="getConfig"/></send>"#,
    )
    .await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(j.contains("heartbeat_secs = 7"), "{j}");
    assert!(d.node("p1").is_running());

    // shutdown: answered, then the proxy stops cleanly.
    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="shutdown"/></send>"#,
    )
    .await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(j.contains("state=\"succeeded\""), "{j}");
    assert!(wait_for(Duration::from_secs(30), || !d
        .node("p1")
        .is_running()));
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_actions_travel_through_an_mlm_to_each_proxy() {
    let dir = tmp("backchannel-mlm");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    let s1 = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let s2 = d
        .proxy("p2", "acme.p2", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    // The server learns of both proxies (and that they are behind the MLM).
    assert!(wait_for(Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let c = control_get(&a, "components").await;
                c.contains("id=\"acme.p1\"") && c.contains("id=\"acme.p2\"")
            })
        })
    }));
    let (status, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><to id="acme.p2"/><control action="getStatus"/></send>"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(
        j.contains("<target id=\"acme.p1\" state=\"succeeded\""),
        "{j}"
    );
    assert!(
        j.contains("<target id=\"acme.p2\" state=\"succeeded\""),
        "{j}"
    );
    assert!(
        j.contains("id=\"acme.p2\"") && j.contains("&lt;status kind=\"proxy\" id=\"acme.p2\""),
        "{j}"
    );

    let (_, body) = post(
        &a,
        r#"<send><to id="acme.p2"/><control action="disableForwarding"/></send>"#,
    )
    .await;
    let j = until_done(&a, attr(&body, "id")).await;
    assert!(j.contains("state=\"succeeded\""), "{j}");
    let st = rs_proxy::client::Client::new(&s2).status().await.unwrap();
    assert_eq!(st["forwarding"], false);
    let st = rs_proxy::client::Client::new(&s1).status().await.unwrap();
    assert_eq!(st["forwarding"], true, "only acme.p2 was addressed");
    d.stop_all();
}
