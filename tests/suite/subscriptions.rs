//! Peripheral work at the application server, on real daemons: webhook
//! subscriptions receive every matching message once, in order, across
//! the receiver's outage and the server being SIGKILLed mid-delivery;
//! failed tasks are listed and replayed; feeds are pulled with a cursor.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rs_tests::deploy::{Deployment, Extra, admin, base, server_metrics, wait_for};

use crate::backchannel::{attr, exe, tmp};
use crate::forward::{alarm, register};

/// A webhook receiver: records (message ID, X-RS-Task) of each delivery
/// it accepts; while `down`, answers 503; while `hang`, never answers.
#[derive(Debug, Default)]
struct Receiver {
    got: Mutex<Vec<String>>,
    down: std::sync::atomic::AtomicBool,
    hang: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicU64,
}

async fn receiver() -> (String, Arc<Receiver>) {
    use warp::Filter as _;
    let r = Arc::new(Receiver::default());
    let rr = r.clone();
    let route = warp::path!("hook")
        .and(warp::post())
        .and(warp::header::<String>("x-rs-message-id"))
        .and(warp::body::content_length_limit(1 << 20))
        .and({
            #[allow(clippy::disallowed_methods)]
            warp::body::bytes()
        })
        .then(move |id: String, body: bytes::Bytes| {
            let r = rr.clone();
            async move {
                use std::sync::atomic::Ordering;
                r.calls.fetch_add(1, Ordering::SeqCst);
                if r.hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if r.down.load(Ordering::SeqCst) {
                    return warp::reply::with_status("down", http::StatusCode::SERVICE_UNAVAILABLE);
                }
                assert!(
                    String::from_utf8_lossy(&body).contains(&format!("id=\"{id}\"")),
                    "the body is the message"
                );
                r.got.lock().unwrap().push(id);
                warp::reply::with_status("ok", http::StatusCode::OK)
            }
        });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(rs_net::server::serve_tcp(
        l,
        None,
        rs_net::server::finish(route),
        rs_net::server::ServeConfig::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    (addr, r)
}

async fn post(a: &str, path: &str, body: String) -> (u16, String) {
    let r = admin(a)
        .post(format!("{}/rs/v1/control/{path}", base(a)))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn get(a: &str, path: &str) -> String {
    admin(a)
        .get(format!("{}/rs/v1/control/{path}", base(a)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// GETs `path` until `done` holds of the answer (or 60 s pass); returns
/// the last answer, for the caller's assertions.
async fn get_until(a: &str, path: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let t = get(a, path).await;
        if done(&t) || std::time::Instant::now() > deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    wait_for(Duration::from_secs(secs), &mut f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_every_alarm_once_in_order_across_its_outage_and_a_server_kill() {
    let dir = tmp("webhook");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d
        .appserver(
            "127.0.0.1:0",
            "task_visibility_secs = 2\ntask_max_attempts = 1000\nwebhook_timeout_secs = 30",
        )
        .unwrap();
    let (hook, rx) = receiver().await;
    let (s, body) = post(
        &a,
        "subscriptions",
        format!(
            r#"<subscription name="noc" class="monitoring" type="alarm" delivery="webhook" url="http://{hook}/hook"/>"#
        ),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let mut sent = Vec::new();
    // The receiver is down for the first ten.
    rx.down.store(true, std::sync::atomic::Ordering::SeqCst);
    for i in 0..10 {
        sent.push(
            c.send("alarm", &alarm(&format!("hook {i}"), None))
                .await
                .unwrap(),
        );
    }
    assert!(until(30, || rx
        .calls
        .load(std::sync::atomic::Ordering::SeqCst)
        >= 2));
    rx.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(
        until(60, || rx.got.lock().unwrap().len() >= 10),
        "delivered after the outage"
    );

    // The server is killed while a delivery hangs; the task is taken up
    // again after it restarts and completed once.
    rx.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let calls = rx.calls.load(std::sync::atomic::Ordering::SeqCst);
    for i in 10..20 {
        sent.push(
            c.send("alarm", &alarm(&format!("hook {i}"), None))
                .await
                .unwrap(),
        );
    }
    assert!(until(30, || rx
        .calls
        .load(std::sync::atomic::Ordering::SeqCst)
        > calls));
    d.node("appserver").kill();
    rx.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    d.restart("appserver").unwrap();
    assert!(
        until(60, || rx.got.lock().unwrap().len() >= 20),
        "delivered after the kill"
    );

    // Other traffic (heartbeats, cold start) is not theirs: exactly the
    // alarms, each once, in the order the server stored them (the proxy
    // sends several envelopes at once, so that can differ from the order
    // they were sent in).
    let got = rx.got.lock().unwrap().clone();
    let sent: HashSet<String> = sent.into_iter().collect();
    let stored: Vec<String> = rs_tests::deploy::stored_ids(&dir.join("appserver"))
        .unwrap()
        .into_iter()
        .filter(|id| sent.contains(id))
        .collect();
    assert_eq!(stored.len(), 20);
    assert_eq!(got, stored);
    let subs = get(&a, "subscriptions").await;
    assert!(
        subs.contains("done=\"20\"") && subs.contains("failed=\"0\""),
        "{subs}"
    );
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tasks_are_listed_and_replayed_and_feeds_are_pulled_with_a_cursor() {
    let dir = tmp("tasks");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d
        .appserver(
            "127.0.0.1:0",
            "task_max_attempts = 2\nwebhook_timeout_secs = 2",
        )
        .unwrap();
    let (hook, rx) = receiver().await;
    rx.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (s, _) = post(
        &a,
        "subscriptions",
        format!(r#"<subscription name="fragile" type="alarm" delivery="webhook" url="http://{hook}/hook"/>"#),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &a,
        "subscriptions",
        r#"<subscription name="pull" type="alarm" min-severity="major" delivery="feed"/>"#.into(),
    )
    .await;
    assert_eq!(s, 200);
    // Bad definitions are refused.
    let (s, body) = post(
        &a,
        "subscriptions",
        r#"<subscription name="x" delivery="webhook"/>"#.into(),
    )
    .await;
    assert_eq!(s, 400, "{body}");

    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            c.send("alarm", &alarm(&format!("fragile {i}"), None))
                .await
                .unwrap(),
        );
    }
    // Two attempts each, then the failed-task queue.
    let failed = get_until(&a, "tasks?state=failed", |t| t.contains("count=\"3\"")).await;
    assert!(
        failed.contains("count=\"3\"") && failed.contains("503"),
        "{failed}"
    );
    // The documents validate against the control API's DTD.
    for (i, doc) in [failed.clone(), get(&a, "subscriptions").await]
        .iter()
        .enumerate()
    {
        rs_tests::assert_control_api_valid(doc.as_bytes(), &dir.join(format!("doc-{i}.xml")));
    }
    rx.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let (s, body) = post(&a, "tasks/replay", String::new()).await;
    assert_eq!(s, 200);
    assert!(body.contains("count=\"3\""), "{body}");
    assert!(until(30, || rx.got.lock().unwrap().len() == 3));
    let mut got = rx.got.lock().unwrap().clone();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want);
    let am = server_metrics(&a).await.unwrap();
    assert_eq!(am.get("tasks.done"), Some(&3));

    // The feed: the three (major) alarms, in order; after acknowledging
    // the cursor, nothing more until another arrives.
    let f = get(&a, "subscriptions/pull/feed?wait=0").await;
    assert!(f.contains("count=\"3\""), "{f}");
    let stored: Vec<String> = rs_tests::deploy::stored_ids(&dir.join("appserver"))
        .unwrap()
        .into_iter()
        .filter(|id| ids.contains(id))
        .collect();
    let pos: Vec<usize> = stored
        .iter()
        .map(|id| f.find(id.as_str()).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "in storage order");
    let cursor = {
        let i = f.find("cursor=\"").unwrap() + 8;
        f[i..i + f[i..].find('"').unwrap()].to_owned()
    };
    let f = get(
        &a,
        &format!("subscriptions/pull/feed?after={cursor}&wait=0"),
    )
    .await;
    assert!(f.contains("count=\"0\""), "{f}");
    // A held pull returns when the next one is stored.
    let a2 = a.clone();
    let pull = tokio::spawn(async move {
        get(
            &a2,
            &format!("subscriptions/pull/feed?after={cursor}&wait=30"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = c.send("alarm", &alarm("one more", None)).await.unwrap();
    let f = pull.await.unwrap();
    assert!(f.contains(&next) && f.contains("count=\"1\""), "{f}");
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 3);
    d.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_loss_and_recovery_each_raise_exactly_one_notification() {
    let dir = tmp("heartbeat-monitor");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d
        .appserver(
            "127.0.0.1:0",
            "heartbeat_secs = 1\nheartbeat_late_after = 3\nheartbeat_failed_after = 6",
        )
        .unwrap();
    let (s, _) = post(
        &a,
        "subscriptions",
        r#"<subscription name="ops" class="infrastructure" type="alarm" delivery="feed"/>"#.into(),
    )
    .await;
    assert_eq!(s, 200);
    d.proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    // Healthy for a while: nothing raised.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let f = get(&a, "subscriptions/ops/feed?wait=0").await;
    assert!(f.contains("count=\"0\""), "{f}");

    d.node("p1").kill();
    let count = |f: &str, sub: &str| f.matches(&format!("sub=\"{sub}\"")).count();
    let f = get_until(&a, "subscriptions/ops/feed?wait=0&limit=1000", |f| {
        count(f, "componentFailed") > 0
    })
    .await;
    assert_eq!(count(&f, "componentLate"), 1, "{f}");
    assert_eq!(count(&f, "componentFailed"), 1, "{f}");
    assert!(f.contains("instance=\"acme.p1\""), "{f}");

    d.restart("p1").unwrap();
    let f = get_until(&a, "subscriptions/ops/feed?wait=0&limit=1000", |f| {
        count(f, "componentRecovered") > 0
    })
    .await;
    // A few more seconds: still exactly one of each.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let f2 = get(&a, "subscriptions/ops/feed?wait=0&limit=1000").await;
    assert_eq!(f, f2, "nothing more was raised");
    assert_eq!(
        (
            count(&f, "componentLate"),
            count(&f, "componentFailed"),
            count(&f, "componentRecovered")
        ),
        (1, 1, 1),
        "{f}"
    );
    d.stop_all();
}

/// The `seq` attributes of an export document, in order.
fn seqs(doc: &str) -> Vec<u64> {
    doc.match_indices(" seq=\"")
        .map(|(i, m)| {
            let v = &doc[i + m.len()..];
            v[..v.find('"').unwrap()].parse().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_modules_notify_and_export_once_and_queries_export_streamed_in_pages() {
    let dir = tmp("modules");
    let log = dir.join("notified.log");
    let fail_once = dir.join("fail-once");
    let export = dir.join("export");
    std::fs::create_dir_all(&dir).unwrap();
    // The notifier fails its first call (the task is retried, the
    // message still notified once), then logs what it was told.
    std::fs::write(&fail_once, "").unwrap();
    let script = format!(
        r#"if [ -e {f} ]; then rm {f}; echo not now >&2; exit 3; fi; xml=$(cat); case "$xml" in *"$RS_MESSAGE_ID"*) ;; *) exit 4;; esac; echo "$RS_MESSAGE_ID $RS_SEVERITY $RS_COMPONENT $RS_TEXT" >> {l}"#,
        f = fail_once.display(),
        l = log.display()
    );
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d
        .appserver(
            "127.0.0.1:0",
            &format!(
                "task_max_attempts = 5\n\
                 [[modules]]\nname = \"oncall\"\nkind = \"alarm-notifier\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n\
                 [modules.subscribe]\ntype = \"alarm\"\nmin_severity = \"major\"\n\
                 [[modules]]\nname = \"archive\"\nkind = \"xml-export\"\ndir = {:?}\n",
                export.display().to_string()
            ),
        )
        .unwrap();
    // The archive is subscribed through the API; an unknown module is not.
    let (s, body) = post(
        &a,
        "subscriptions",
        r#"<subscription name="archive" type="alarm" delivery="module" module="archive"/>"#.into(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    rs_tests::assert_control_api_valid(body.as_bytes(), &dir.join("subs.xml"));
    assert!(body.contains("name=\"oncall\"") && body.contains("module=\"oncall\""));
    let (s, body) = post(
        &a,
        "subscriptions",
        r#"<subscription name="x" delivery="module" module="nosuch"/>"#.into(),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("nosuch"), "{body}");
    // Nor the heartbeat monitor, which takes no messages.
    let (s, body) = post(
        &a,
        "subscriptions",
        r#"<subscription name="x" delivery="module" module="heartbeat"/>"#.into(),
    )
    .await;
    assert_eq!(s, 400, "{body}");

    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let mut major = Vec::new();
    let mut all = Vec::new();
    for i in 0..10 {
        let mut r = alarm(&format!("disk {i} full"), None);
        if i % 2 == 1 {
            r.severity = Some("minor".into());
        } else {
            major.push(String::new());
        }
        let id = c.send("alarm", &r).await.unwrap();
        if i % 2 == 0 {
            *major.last_mut().unwrap() = id.clone();
        }
        all.push(id);
    }
    let all_set: HashSet<String> = all.iter().cloned().collect();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        until(60, || read_log().lines().count() >= 5),
        "{}",
        read_log()
    );
    let exported = |export: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v = Vec::new();
        for day in std::fs::read_dir(export).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(day.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                v.push(f.path());
            }
        }
        v
    };
    assert!(until(60, || exported(&export).len() >= 10));
    let tasks = get(&a, "subscriptions").await;
    assert!(
        tasks.contains("name=\"oncall\"") && tasks.contains("done=\"5\""),
        "{tasks}"
    );

    // Every major alarm notified once, in storage order, with its facts.
    let stored: Vec<String> = rs_tests::deploy::stored_ids(&dir.join("appserver"))
        .unwrap()
        .into_iter()
        .filter(|id| all_set.contains(id))
        .collect();
    let lines: Vec<String> = read_log().lines().map(str::to_owned).collect();
    let notified: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    let want: Vec<&str> = stored
        .iter()
        .filter(|id| major.contains(id))
        .map(String::as_str)
        .collect();
    assert_eq!(notified, want, "{lines:?}");
    assert!(lines[0].contains(" major acme.p1.s1 disk "), "{lines:?}");
    assert!(!fail_once.exists(), "the first call failed and was retried");

    // One file per alarm, each holding that message.
    let files = exported(&export);
    assert_eq!(files.len(), 10);
    for f in &files {
        let id = f.file_stem().unwrap().to_string_lossy().to_string();
        assert!(all_set.contains(&id), "{id}");
        assert!(std::fs::read_to_string(f).unwrap().contains(&id));
    }

    // Export by query: all ten alarms in storage order in one stream...
    let whole = get(&a, "export?type=alarm&customer=acme").await;
    assert!(whole.trim_end().ends_with("</export>"), "{whole}");
    assert_eq!(attr(&whole, "count"), "10");
    assert_eq!(attr(&whole, "complete"), "yes");
    let ids_in = |doc: &str| -> Vec<String> {
        stored
            .iter()
            .filter(|id| doc.contains(id.as_str()))
            .cloned()
            .collect()
    };
    let order: Vec<usize> = stored
        .iter()
        .map(|id| whole.find(id.as_str()).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "storage order");
    let whole_seqs = seqs(&whole);
    assert!(whole_seqs.windows(2).all(|w| w[0] < w[1]));
    // ...and in pages of four, continuing from each page's cursor: the
    // same ten, none twice.
    let mut after = "0".to_owned();
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let p = get(
            &a,
            &format!("export?type=alarm&customer=acme&limit=4&after={after}"),
        )
        .await;
        pages += 1;
        paged.extend(seqs(&p));
        after = attr(&p, "next").to_owned();
        if attr(&p, "complete") == "yes" {
            break;
        }
        assert!(pages < 10, "{p}");
    }
    assert_eq!(paged, whole_seqs);
    assert_eq!(pages, 3);
    assert_eq!(ids_in(&whole).len(), 10);
    // Bad parameters are refused.
    let r = admin(&a)
        .get(format!("{}/rs/v1/control/export?after=x", base(&a)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // After a restart nothing is notified or exported again.
    d.node("appserver").kill();
    d.restart("appserver").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(read_log().lines().count(), 5);
    assert_eq!(exported(&export).len(), 10);
    d.stop_all();
}

/// The cursor of a feed answer (`<messages ... cursor="C">`).
fn cursor_of(feed: &str) -> String {
    let i = feed.find("cursor=\"").unwrap() + 8;
    feed[i..i + feed[i..].find('"').unwrap()].to_owned()
}

/// The `next` cursor of an export's `<end>`.
fn next_of(export: &str) -> u64 {
    let i = export.find("next=\"").unwrap() + 6;
    export[i..i + export[i..].find('"').unwrap()]
        .parse()
        .unwrap()
}

/// An idle system whose messages all age out: the retention purge deletes
/// the newest rows too. Messages stored after it must still come after
/// every cursor handed out (SQLite gave their rowids from below them, so
/// subscriptions and exports skipped them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_never_go_back_when_retention_purges_the_newest_messages() {
    let dir = tmp("purge-cursors");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let clock = dir.join("faketime");
    std::fs::write(&clock, "+0s\n").unwrap();
    d.env = crate::backchannel_faults::faketime(&clock);
    let a = d.appserver("127.0.0.1:0", "retention_days = 1").unwrap();
    d.env.clear();
    let (s, _) = post(
        &a,
        "subscriptions",
        r#"<subscription name="all" type="alarm" delivery="feed"/>"#.into(),
    )
    .await;
    assert_eq!(s, 200);
    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    for i in 0..3 {
        c.send("alarm", &alarm(&format!("old {i}"), None))
            .await
            .unwrap();
    }
    let f = get_until(&a, "subscriptions/all/feed?wait=0", |t| {
        t.contains("count=\"3\"")
    })
    .await;
    assert!(f.contains("count=\"3\""), "{f}");
    let cursor = cursor_of(&f);
    let next = next_of(&get(&a, "export?type=alarm").await);
    assert!(next > 0);
    let f = get(&a, &format!("subscriptions/all/feed?after={cursor}&wait=0")).await;
    assert!(f.contains("count=\"0\""), "{f}");

    // Two days later everything has aged out (the purge runs at start).
    d.node("p1").stop(Duration::from_secs(10));
    d.node("appserver").stop(Duration::from_secs(10));
    std::fs::write(&clock, "+172800s\n").unwrap();
    d.restart("appserver").unwrap();
    assert!(
        until(30, || rs_tests::deploy::stored_ids(&dir.join("appserver"))
            .is_ok_and(|ids| ids.is_empty())),
        "the purge did not run"
    );
    d.restart("p1").unwrap();
    let c = register(&sock).await;
    let mut new = Vec::new();
    for i in 0..2 {
        new.push(
            c.send("alarm", &alarm(&format!("new {i}"), None))
                .await
                .unwrap(),
        );
    }
    // The subscription gets both, after the cursor it acknowledged ...
    let f = get_until(
        &a,
        &format!("subscriptions/all/feed?after={cursor}&wait=1"),
        |t| new.iter().all(|id| t.contains(id.as_str())),
    )
    .await;
    assert!(new.iter().all(|id| f.contains(id.as_str())), "{f}");
    // ... and an export continuing from where it stopped shows them.
    let e = get(&a, &format!("export?type=alarm&after={next}")).await;
    assert!(new.iter().all(|id| e.contains(id.as_str())), "{e}");
    assert!(seqs(&e).iter().all(|s| *s > next), "{e}");
    d.stop_all();
}

/// A database written before messages had their own sequence (ordered by
/// rowid; tests/fixtures/appserver-rowid-order.db, made by that code: four
/// alarms and a feed subscription that has not taken them yet) is
/// migrated in place: every message kept with its old place as its
/// cursor, the subscription's backlog intact, new messages after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_ordered_by_rowid_is_migrated_with_its_messages_and_cursors() {
    let dir = tmp("seq-migration");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("appserver-rowid-order.db");
    let before: Vec<(u64, String)> = {
        let conn = rusqlite::Connection::open_with_flags(
            &fixture,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut st = conn
            .prepare("SELECT rowid, id FROM messages ORDER BY rowid")
            .unwrap();
        st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert!(before.len() >= 6, "{before:?}");
    std::fs::create_dir_all(dir.join("appserver")).unwrap();
    std::fs::copy(&fixture, dir.join("appserver").join("appserver.db")).unwrap();
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // An SQLite file's upgrade, whatever engine the other tests run on.
    d.store = rs_tests::deploy::StoreEngine::Sqlite;
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let e = get(&a, "export").await;
    let after: Vec<(u64, String)> = e
        .match_indices("<message seq=\"")
        .map(|(i, m)| {
            let v = &e[i + m.len()..];
            let seq = v[..v.find('"').unwrap()].parse().unwrap();
            let j = v.find(" id=\"").unwrap() + 5;
            (seq, v[j..j + v[j..].find('"').unwrap()].to_owned())
        })
        .collect();
    assert_eq!(after, before, "{e}");
    // The feed's backlog from before the upgrade is still there.
    let f = get(&a, "subscriptions/all/feed?wait=0").await;
    assert!(f.contains("count=\"4\""), "{f}");
    let sock = d
        .proxy("p2", "acme.p2", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let id = c
        .send("alarm", &alarm("after the upgrade", None))
        .await
        .unwrap();
    let f = get_until(&a, "subscriptions/all/feed?wait=0", |t| {
        t.contains(id.as_str())
    })
    .await;
    assert!(f.contains("count=\"5\""), "{f}");
    let last = before.last().unwrap().0;
    let e = get(&a, &format!("export?after={last}&type=alarm")).await;
    assert!(
        e.contains(id.as_str()) && seqs(&e).iter().all(|s| *s > last),
        "{e}"
    );
    d.stop_all();
}

/// A database written by the last release before schema versions
/// (tests/fixtures/appserver-release-5fa08a5.db: made by that commit's own
/// demo, `rs-demo --duration 8 --proxies 1`, with its messages, jobs, an
/// upload and the demo's enrollments in it) is migrated in place when this
/// release opens it: every message kept at its place in storage order, the
/// jobs kept, the schema versioned, and new messages stored after the old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_release_before_schema_versions_is_migrated_in_place() {
    let dir = tmp("release-migration");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("appserver-release-5fa08a5.db");
    std::fs::create_dir_all(dir.join("appserver")).unwrap();
    std::fs::copy(&fixture, dir.join("appserver").join("appserver.db")).unwrap();
    let read = |dir: &std::path::Path| {
        rs_tests::deploy::with_appserver_db(&dir.join("appserver"), |c| {
            let msgs: Vec<(i64, String)> = c.rows(
                "SELECT seq, id FROM messages ORDER BY seq",
                rs_store::params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let jobs: i64 = c.one("SELECT COUNT(*) FROM jobs", rs_store::params![], |r| {
                r.get(0)
            })?;
            Ok((msgs, jobs))
        })
        .unwrap()
    };
    let (before, jobs_before) = read(&dir);
    assert!(
        before.len() >= 20 && jobs_before >= 2,
        "{} messages, {jobs_before} jobs",
        before.len()
    );
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // An SQLite file's upgrade, whatever engine the other tests run on.
    d.store = rs_tests::deploy::StoreEngine::Sqlite;
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let sock = d
        .proxy("p2", "acme.p2", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let c = register(&sock).await;
    let id = c
        .send("alarm", &alarm("after the upgrade", None))
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || {
            rs_tests::deploy::stored_ids(&dir.join("appserver")).is_ok_and(|s| s.contains(&id))
        }),
        "the new alarm was not stored"
    );
    d.stop_all();
    let (after, jobs_after) = read(&dir);
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "old messages moved or went"
    );
    assert!(
        after[before.len()..].iter().any(|(_, i)| *i == id),
        "the new alarm is not after the old messages"
    );
    assert_eq!(jobs_after, jobs_before);
    let version: i64 = rs_tests::deploy::with_appserver_db(&dir.join("appserver"), |c| {
        c.one(
            "SELECT MAX(version) FROM rs_schema",
            rs_store::params![],
            |r| r.get(0),
        )
    })
    .unwrap();
    assert_eq!(version, 6, "not migrated to the current schema");
}
