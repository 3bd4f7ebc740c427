//! Staged rollouts (docs/control-api.md, Rollouts) on real daemons: a
//! wave that fails halts the rollout and no later wave is sent; resume
//! carries on with the next wave; approval between waves; silence halts;
//! a server killed mid-rollout carries on when it is back.

use std::path::PathBuf;
use std::time::Duration;

use rs_protocol::codec::Limits;
use rs_protocol::codec::api::{Rollout, decode_rollout};
use rs_tests::deploy::{Deployment, Extra, admin, base, proxy_metrics};

use crate::backchannel::{control_get, exe, tmp};
use crate::backchannel_faults::{rsctl, until};

/// A server with proxies acme.p1..pN straight to it, all reported, in
/// the group `acme-proxies`; their sockets.
async fn fleet(d: &mut Deployment, n: usize) -> (String, Vec<PathBuf>) {
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let mut sockets = Vec::new();
    for i in 1..=n {
        sockets.push(
            d.proxy(
                &format!("p{i}"),
                &format!("acme.p{i}"),
                std::slice::from_ref(&a),
                &Extra::default(),
            )
            .unwrap(),
        );
    }
    assert!(
        until(30, || async {
            let c = control_get(&a, "components").await;
            (1..=n).all(|i| c.contains(&format!("id=\"acme.p{i}\"")))
        })
        .await
    );
    let r = admin(&a)
        .put(format!("{}/rs/v1/control/groups/acme-proxies", base(&a)))
        .body(r#"<group name="acme-proxies" customer="acme" kind="proxy"/>"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    (a, sockets)
}

async fn start(a: &str, body: &str) -> Rollout {
    let r = admin(a)
        .post(format!("{}/rs/v1/control/rollouts", base(a)))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let st = r.status();
    let text = r.bytes().await.unwrap();
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&text));
    // A file of its own: the tests run at once.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("rs-rollout-{}-{n}.xml", std::process::id()));
    rs_tests::assert_control_api_valid(&text, &file);
    decode_rollout(&text, &Limits::default()).unwrap()
}

async fn get(a: &str, id: &str) -> Rollout {
    let text = control_get(a, &format!("rollouts/{id}")).await;
    decode_rollout(text.as_bytes(), &Limits::default()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn step(a: &str, id: &str, op: &str) -> (u16, String) {
    let r = admin(a)
        .post(format!("{}/rs/v1/control/rollouts/{id}/{op}", base(a)))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits until the rollout is in `state`; the rollout as it then is.
async fn until_state(a: &str, id: &str, state: &str, secs: u64) -> Rollout {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let r = get(a, id).await;
        if r.state == state || std::time::Instant::now() > deadline {
            assert_eq!(r.state, state, "{r:#?}");
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn states(r: &Rollout) -> Vec<Vec<(String, String)>> {
    r.waves
        .iter()
        .map(|w| {
            w.members
                .iter()
                .map(|(id, s)| (id.as_str().to_owned(), s.clone()))
                .collect()
        })
        .collect()
}

fn pair(id: &str, s: &str) -> (String, String) {
    (id.to_owned(), s.to_owned())
}

/// A configuration the proxies refuse fails wave 1: the rollout halts
/// with the reason, and waves 2 and 3 are never sent (their proxies have
/// applied nothing). Resumed, it carries on with wave 2, which fails too
/// and halts it again; aborted, wave 3 is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_wave_halts_the_rollout_and_no_later_wave_is_sent() {
    let dir = tmp("rollout-halt");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, sockets) = fleet(&mut d, 3).await;
    let r = start(
        &a,
        r#"<rollout name="bad-config" waves="1,1,100%"><to group="acme-proxies"/><control action="configChange"><config>heartbeat_secs = "oops"
</config></control></rollout>"#,
    )
    .await;
    assert_eq!(r.waves.len(), 3, "{r:#?}");
    // rsctl follows it wave by wave and fails when it halts.
    let (code, out, err) = rsctl(&a, &["rollouts", "show", &r.id, "--watch"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("wave 1/3 done: 1 failed"), "{out}");
    assert!(out.contains("halted: wave 1: 1 of 1 failed"), "{out}");
    let r = until_state(&a, &r.id, "halted", 60).await;
    assert_eq!(r.wave, 1);
    assert!(
        r.reason
            .as_deref()
            .unwrap_or("")
            .contains("wave 1: 1 of 1 failed"),
        "{r:#?}"
    );
    assert_eq!(
        states(&r),
        vec![
            vec![pair("acme.p1", "failed")],
            vec![pair("acme.p2", "not-sent")],
            vec![pair("acme.p3", "not-sent")],
        ]
    );
    // Nothing reached the later waves' proxies, and nothing will.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for s in &sockets[1..] {
        let m = proxy_metrics(s).await.unwrap();
        assert_eq!(m.get("backchannel.applied"), Some(&0), "{m:?}");
    }
    assert_eq!(get(&a, &r.id).await.waves[1].job, None);
    // A step the state does not allow.
    assert_eq!(step(&a, &r.id, "approve").await.0, 409);
    // The portal shows it halted, wave by wave; globex's admin does not
    // see it at all.
    use crate::portal::{browser, csrf, form_body, login, page, token};
    let c = browser(&d.pki.clone().unwrap().admin.ca);
    let (cookie, _) = login(&c, &a, &token(&a, "ops-roll", "*").await).await;
    let path = format!("/portal/rollout?id={}", r.id);
    let (st, _, ops_html) = page(&c, &a, &cookie, &path).await;
    assert!(
        st == 200
            && ops_html.contains(r#"id="rollout-state">halted"#)
            && ops_html.contains(r#"data-id="acme.p3""#)
            && ops_html.contains(">not-sent<")
            && ops_html.contains(r#"id="op-resume""#),
        "{ops_html}"
    );
    let (globex, _) = login(&c, &a, &token(&a, "globex-roll", "globex").await).await;
    let (st, _, html) = page(&c, &a, &globex, &path).await;
    assert!(st == 404 && !html.contains("acme"), "{html}");
    let (_, _, list) = page(&c, &a, &globex, "/portal/rollouts").await;
    assert!(!list.contains(&r.id), "{list}");
    // Resumed from the page: wave 2 goes, fails, halts it again.
    let resp = c
        .post(format!("{}/portal/rollout/step", base(&a)))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("csrf", csrf(&ops_html).as_str()),
            ("id", r.id.as_str()),
            ("op", "resume"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let r = until_state(&a, &r.id, "halted", 60).await;
    assert_eq!(r.wave, 2, "{r:#?}");
    assert_eq!(
        r.waves[1].members,
        vec![(
            rs_protocol::RsId::new("acme.p2").unwrap(),
            "failed".to_owned()
        )]
    );
    let (st, body) = step(&a, &r.id, "abort").await;
    assert_eq!(st, 200, "{body}");
    let r = get(&a, &r.id).await;
    assert_eq!(r.state, "aborted");
    assert!(
        r.reason.as_deref().unwrap_or("").contains("aborted by ops"),
        "{r:#?}"
    );
    assert_eq!(states(&r)[2], vec![pair("acme.p3", "not-sent")]);
    let m = proxy_metrics(&sockets[2]).await.unwrap();
    assert_eq!(m.get("backchannel.applied"), Some(&0), "{m:?}");
    // Listed, newest first, without the destinations.
    let list = control_get(&a, "rollouts").await;
    assert!(list.contains(&r.id) && !list.contains("acme.p3"), "{list}");
    d.stop_all();
}

/// With approval between waves, a rollout waits after wave 1, survives a
/// SIGKILL of the server while it waits, and succeeds once approved; a
/// wave with a proxy that does not answer halts on silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_waits_for_approval_survives_a_restart_and_halts_on_silence() {
    let dir = tmp("rollout-approve");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, _) = fleet(&mut d, 3).await;
    let (code, out, err) = rsctl(
        &a,
        &[
            "-o",
            "json",
            "rollouts",
            "create",
            "ping-all",
            "ping",
            "--group",
            "acme-proxies",
            "--waves",
            "1,100%",
            "--approve",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["rollout"]["id"].as_str().unwrap().to_owned();
    let r = until_state(&a, &id, "waiting", 60).await;
    assert_eq!(r.wave, 1);
    assert_eq!(states(&r)[0], vec![pair("acme.p1", "succeeded")]);
    assert_eq!(r.waves[1].state, "not-sent");
    // Killed while it waits, it waits still when it is back.
    d.restart("appserver").unwrap();
    let r = until_state(&a, &r.id, "waiting", 30).await;
    let (code, out, err) = rsctl(&a, &["rollouts", "approve", &r.id]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = rsctl(&a, &["rollouts", "show", &r.id, "--watch"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("wave 2/2 succeeded: 2 succeeded"), "{out}");
    let r = until_state(&a, &r.id, "succeeded", 60).await;
    assert_eq!(
        states(&r)[1],
        vec![pair("acme.p2", "succeeded"), pair("acme.p3", "succeeded")]
    );

    // acme.p1 stopped (SIGSTOP): its wave halts once it has been silent
    // for silence-secs (its neighbour in the wave succeeded), and the
    // next wave is not sent.
    d.node("p1").signal("STOP");
    let r = start(
        &a,
        r#"<rollout name="ping-quiet" waves="2,100%" silence-secs="3"><to group="acme-proxies"/><control action="ping"/></rollout>"#,
    )
    .await;
    let started = std::time::Instant::now();
    let r = until_state(&a, &r.id, "halted", 30).await;
    let took = started.elapsed();
    d.node("p1").signal("CONT");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap_or("")
            .contains("1 silent for 3 s"),
        "{r:#?}"
    );
    assert_eq!(
        states(&r),
        vec![
            vec![pair("acme.p1", "pending"), pair("acme.p2", "succeeded")],
            vec![pair("acme.p3", "not-sent")],
        ]
    );
    d.stop_all();
}

/// `by="mlm"`: one wave per MLM the destinations are reached through,
/// those reached directly last; `by="customer"`: one per customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_by_mlm_and_by_customer_follow_the_tiers_and_the_customers() {
    let dir = tmp("rollout-by");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let m1 = d
        .mlm("m1", "acme.m1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let m2 = d
        .mlm("m2", "acme.m2", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    for (name, id, up) in [
        ("p1", "acme.p1", &m1),
        ("p2", "acme.p2", &m2),
        ("p3", "acme.p3", &m2),
        ("p4", "acme.p4", &a),
        ("g1", "globex.p1", &a),
    ] {
        d.proxy(name, id, std::slice::from_ref(up), &Extra::default())
            .unwrap();
    }
    assert!(
        until(60, || async {
            let c = control_get(&a, "components").await;
            ["acme.p1", "acme.p2", "acme.p3", "acme.p4", "globex.p1"]
                .iter()
                .all(|id| c.contains(&format!("id=\"{id}\"")))
        })
        .await
    );
    let ids = |r: &Rollout| -> Vec<Vec<String>> {
        r.waves
            .iter()
            .map(|w| {
                w.members
                    .iter()
                    .map(|(id, _)| id.as_str().to_owned())
                    .collect()
            })
            .collect()
    };
    let r = start(
        &a,
        r#"<rollout name="by-mlm" by="mlm"><to id="acme.p4"/><to id="acme.p3"/><to id="acme.p2"/><to id="acme.p1"/><control action="ping"/></rollout>"#,
    )
    .await;
    assert_eq!(
        ids(&r),
        vec![
            vec!["acme.p1".to_owned()],
            vec!["acme.p2".to_owned(), "acme.p3".to_owned()],
            vec!["acme.p4".to_owned()],
        ]
    );
    let r = until_state(&a, &r.id, "succeeded", 60).await;
    assert!(r.waves.iter().all(|w| w.state == "succeeded"), "{r:#?}");
    let r = start(
        &a,
        r#"<rollout name="by-customer" by="customer"><to id="globex.p1"/><to id="acme.p4"/><to id="acme.p1"/><control action="ping"/></rollout>"#,
    )
    .await;
    assert_eq!(
        ids(&r),
        vec![
            vec!["acme.p1".to_owned(), "acme.p4".to_owned()],
            vec!["globex.p1".to_owned()],
        ]
    );
    until_state(&a, &r.id, "succeeded", 60).await;
    // A published file, MLM by MLM, with rsctl following it.
    let put = admin(&a)
        .put(format!("{}/rs/v1/control/files/notes.txt", base(&a)))
        .body(b"release notes, wave by wave".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let sha = crate::backchannel::attr(&put.text().await.unwrap(), "sha256").to_owned();
    let (code, out, err) = rsctl(
        &a,
        &[
            "rollouts",
            "create",
            "notes",
            "offer",
            "--file",
            &sha,
            "--class",
            "data",
            "--subclass",
            "notes",
            "--to",
            "acme.p1",
            "--to",
            "acme.p2",
            "--to",
            "acme.p3",
            "--by",
            "mlm",
            "--watch",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("wave 2/2 succeeded: 2 succeeded"), "{out}");
    assert!(out.contains(" succeeded"), "{out}");
    // An unknown file is refused before anything is sent.
    let (code, _, err) = rsctl(
        &a,
        &[
            "rollouts",
            "create",
            "nothing",
            "offer",
            "--file",
            &"0".repeat(64),
            "--to",
            "acme.p1",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no published file"), "{err}");
    d.stop_all();
}

/// Issue 28 at its scale: a rollout to a group of 100 proxies behind two
/// MLMs halts by itself on errors (a package that fails to install on
/// some proxies of the first wave) and on silence (two stopped proxies),
/// and the later wave is not touched: its MLM's link never carries the
/// payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_to_a_hundred_proxies_halts_on_errors_and_on_silence_touching_no_later_wave() {
    const N: usize = 100;
    let dir = tmp("rollout-100");
    // Plain HTTP: each MLM's link to the server goes through a relay that
    // counts what crosses it.
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let (r1, l1) = rs_tests::relay::start(a.clone()).await.unwrap();
    let (r2, l2) = rs_tests::relay::start(a.clone()).await.unwrap();
    let m1 = d
        .mlm(
            "m1",
            "acme.m1",
            std::slice::from_ref(&r1),
            &Extra::default(),
        )
        .unwrap();
    let m2 = d
        .mlm(
            "m2",
            "acme.m2",
            std::slice::from_ref(&r2),
            &Extra::default(),
        )
        .unwrap();
    let mut sockets = Vec::new();
    for i in 1..=N {
        // p1..p50 behind m1 (the first wave), the rest behind m2. Four of
        // the first wave cannot install the package.
        let install = if i <= 4 { "false" } else { "true" };
        let extra = Extra {
            tables: format!("[bulk]\ninstall_command = [\"{install}\"]\n"),
            ..Extra::default()
        };
        let up = if i <= N / 2 { &m1 } else { &m2 };
        sockets.push(
            d.proxy(
                &format!("p{i}"),
                &format!("acme.p{i}"),
                std::slice::from_ref(up),
                &extra,
            )
            .unwrap(),
        );
    }
    assert!(
        until(120, || async {
            let c = control_get(&a, "components").await;
            (1..=N).all(|i| c.contains(&format!("id=\"acme.p{i}\"")))
        })
        .await,
        "not every proxy reported"
    );
    let r = admin(&a)
        .put(format!("{}/rs/v1/control/groups/acme-proxies", base(&a)))
        .body(r#"<group name="acme-proxies" customer="acme" kind="proxy"/>"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let wave_ids = |r: &Rollout, w: usize| -> Vec<String> {
        r.waves[w]
            .members
            .iter()
            .map(|(id, _)| id.as_str().to_owned())
            .collect()
    };

    // Errors: a package that four proxies of the first wave fail to
    // install; more than two failures halt the rollout.
    let put = admin(&a)
        .put(format!("{}/rs/v1/control/files/rollout100.pkg", base(&a)))
        .body(vec![7u8; 64 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let sha = crate::backchannel::attr(&put.text().await.unwrap(), "sha256").to_owned();
    l1.count("rollout100.pkg");
    l2.count("rollout100.pkg");
    let r = start(
        &a,
        &format!(
            r#"<rollout name="pkg" by="mlm" max-failed="2" success-pct="90" silence-secs="120"><to group="acme-proxies"/><publish file="{sha}" class="software" sub="package"/></rollout>"#
        ),
    )
    .await;
    assert_eq!(r.waves.len(), 2, "{r:#?}");
    let first = wave_ids(&r, 0);
    assert_eq!(first.len(), N / 2);
    assert!(first.iter().all(|id| {
        id.strip_prefix("acme.p")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n <= N / 2)
    }));
    let r = until_state(&a, &r.id, "halted", 120).await;
    assert_eq!(r.wave, 1, "{r:#?}");
    assert!(
        r.reason.as_deref().unwrap_or("").contains("failed"),
        "{r:#?}"
    );
    let failed: Vec<&str> = r.waves[0]
        .members
        .iter()
        .filter(|(_, s)| s == "failed")
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(
        failed.len() > 2
            && failed
                .iter()
                .all(|id| ["acme.p1", "acme.p2", "acme.p3", "acme.p4"].contains(id)),
        "{failed:?}"
    );
    assert!(
        r.waves[1].members.iter().all(|(_, s)| s == "not-sent"),
        "{r:#?}"
    );
    assert_eq!(r.waves[1].job, None);
    assert!(
        l1.seen("rollout100.pkg") >= 1,
        "the first wave's MLM got it"
    );

    // Silence: two proxies of the first wave stopped; a ping rollout
    // halts once they have been silent for silence-secs.
    for p in ["p5", "p6"] {
        d.node(p).signal("STOP");
    }
    l1.count("action=\"ping\"");
    l2.count("action=\"ping\"");
    let r = start(
        &a,
        r#"<rollout name="ping-100" by="mlm" max-failed="1" silence-secs="5"><to group="acme-proxies"/><control action="ping"/></rollout>"#,
    )
    .await;
    let r = until_state(&a, &r.id, "halted", 60).await;
    for p in ["p5", "p6"] {
        d.node(p).signal("CONT");
    }
    assert_eq!(r.wave, 1, "{r:#?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap_or("")
            .contains("2 silent for 5 s"),
        "{r:#?}"
    );
    let ok = r.waves[0]
        .members
        .iter()
        .filter(|(_, s)| s == "succeeded")
        .count();
    assert_eq!(ok, N / 2 - 2, "{r:#?}");
    assert!(
        r.waves[1].members.iter().all(|(_, s)| s == "not-sent"),
        "{r:#?}"
    );
    assert!(l1.seen("action=\"ping\"") >= 1);

    // The later wave was never touched: its MLM's link carried neither
    // payload, and none of its proxies applied anything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(l2.seen("rollout100.pkg"), 0);
    assert_eq!(l2.seen("action=\"ping\""), 0);
    for s in &sockets[N / 2..] {
        let m = proxy_metrics(s).await.unwrap();
        assert_eq!(m.get("backchannel.applied"), Some(&0), "{m:?}");
    }
    d.stop_all();
}
