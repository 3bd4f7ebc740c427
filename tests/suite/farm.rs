//! Application servers as a farm: two members on one PostgreSQL database
//! behind haproxy (packaging/haproxy/rs-farm.cfg), with an MLM
//! and a proxy in front. Any member stores any envelope exactly once, the
//! back-channel reaches the proxy whichever member it polls, jobs and
//! subscriptions belong to the farm, and a member killed under load loses
//! nothing: the MLM carries on through the other.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rs_protocol::control::NodeState;
use rs_tests::deploy::{Deployment, Extra, admin, base, server_metrics, stored_ids, wait_for};
use rs_tests::postgres::Postgres;

use crate::backchannel::{attr, exe, tmp, until_done};
use crate::forward::{alarm, register};

async fn control(a: &str, method: http::Method, path: &str, body: &str) -> (u16, String) {
    let r = admin(a)
        .request(method, format!("{}/rs/v1/control/{path}", base(a)))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits until every message in `sent` is stored by the server whose data
/// directory is `dir`, and checks none is stored twice.
fn assert_stored_once(dir: &std::path::Path, sent: &HashSet<String>) {
    let stored_all = wait_for(Duration::from_secs(90), || {
        stored_ids(dir).is_ok_and(|s| {
            let s: HashSet<String> = s.into_iter().collect();
            sent.is_subset(&s)
        })
    });
    assert!(stored_all, "messages the proxies accepted were lost");
    let stored = stored_ids(dir).unwrap();
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "a message was stored twice");
}

/// Sends `n` alarms through `clients` in turn, killing `pg` after the
/// first third (pausing 300 ms after each of the next ten: long enough for
/// the senders to try and be told to retry) and restarting it after two
/// thirds: the IDs the proxies accepted.
async fn send_across_a_restart(
    pg: &Postgres,
    clients: &[rs_proxy::client::Client],
    n: usize,
    label: &str,
) -> HashSet<String> {
    let mut sent = HashSet::new();
    for i in 0..n {
        if i == n / 3 {
            pg.kill().unwrap();
        }
        if (n / 3..n / 3 + 10).contains(&i) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if i == 2 * n / 3 {
            pg.restart().unwrap();
        }
        sent.insert(
            clients[i % clients.len()]
                .send("alarm", &alarm(&format!("{label} alarm {i}"), None))
                .await
                .unwrap(),
        );
    }
    sent
}

/// Sends getStatus to `acme.p1` through `via`; the job as `check` (another
/// member) sees it once done.
async fn get_status(via: &str, check: &str) -> String {
    let (status, body) = control(
        via,
        http::Method::POST,
        "send",
        r#"<send><to id="acme.p1"/><control action="getStatus"/></send>"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    until_done(check, attr(&body, "id")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_of_two_servers_shares_everything_and_loses_nothing_when_one_is_killed() {
    let dir = tmp("farm");
    let url = Postgres::shared().database("farm");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a1, a2, lb) = d.farm(&url, "").unwrap();
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&lb.addr),
            &Extra::default(),
        )
        .unwrap();
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    // A subscription made through one member is the farm's.
    let (st, body) = control(
        &a1,
        http::Method::POST,
        "subscriptions",
        r#"<subscription name="all" type="alarm" delivery="feed"/>"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // Throttle rules set through one member are in force on the other.
    let (st, body) = control(
        &a1,
        http::Method::PUT,
        "throttle",
        r#"<throttle><rule name="farm-rate" customer="acme" per="customer" messages-per-sec="5000"/></throttle>"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let shared = wait_for(Duration::from_secs(10), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                control(&a2, http::Method::GET, "throttle", "")
                    .await
                    .1
                    .contains("farm-rate")
            })
        })
    });
    assert!(shared, "a2 does not apply the throttle set through a1");
    // An API token made through one member opens a portal session on the
    // other, which the first serves; revoked through either, it ends on
    // both.
    let (st, body) = control(
        &a1,
        http::Method::POST,
        "tokens",
        r#"<token name="farm-web" customers="*"/>"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let secret = crate::backchannel::attr(&body, "secret").to_owned();
    let browser = rs_net::tls::client_trusting(&d.pki.clone().unwrap().admin.ca)
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let portal = |a: &str| format!("{}/portal/", rs_tests::deploy::base(a));
    let r = crate::portal::post_login(&browser, &portal(&a2), &format!("token={secret}")).await;
    assert_eq!(r.status(), 303);
    let cookie = crate::portal::session_of(&r);
    let jobs_page = |a: String| {
        let browser = browser.clone();
        let cookie = cookie.clone();
        async move {
            browser
                .get(format!("{a}jobs"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(jobs_page(portal(&a1)).await, 200);
    let (st, _) = control(&a2, http::Method::DELETE, "tokens/farm-web", "").await;
    assert_eq!(st, 204);
    assert_eq!(jobs_page(portal(&a1)).await, 303);
    // Both members know the proxy from its cold start, whichever stored it.
    for a in [&a1, &a2] {
        let known = wait_for(Duration::from_secs(30), || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    control(a, http::Method::GET, "components", "")
                        .await
                        .1
                        .contains("id=\"acme.p1\"")
                })
            })
        });
        assert!(known, "{a} does not know acme.p1");
    }

    // The back-channel: a job made on either member reaches the proxy
    // (whichever member its MLM's long poll is held on) and completes,
    // as the other member sees it.
    for (via, check) in [(&a1, &a2), (&a2, &a1)] {
        let j = get_status(via, check).await;
        assert!(
            j.contains("<target id=\"acme.p1\" state=\"succeeded\""),
            "job made on {via}, read on {check}: {j}"
        );
    }

    // Under load, the member carrying the MLM's envelopes is killed:
    // every message the proxy accepted is stored once, through the other.
    let c = register(&s).await;
    let mut sent = HashSet::new();
    let envelopes = |m: BTreeMap<String, u64>| m.get("envelopes.received").copied().unwrap_or(0);
    let mut survivor = String::new();
    for i in 0..300 {
        if i == 100 {
            let n1 = envelopes(server_metrics(&a1).await.unwrap());
            let n2 = envelopes(server_metrics(&a2).await.unwrap());
            let (victim, other) = if n1 >= n2 { ("a1", "a2") } else { ("a2", "a1") };
            d.node(victim).kill();
            survivor = other.to_owned();
        }
        sent.insert(
            c.send("alarm", &alarm(&format!("farm alarm {i}"), None))
                .await
                .unwrap(),
        );
    }
    let live = if survivor == "a1" {
        a1.clone()
    } else {
        a2.clone()
    };
    assert_stored_once(&dir.join(&survivor), &sent);

    // The survivor is the leader now: its expander gave the farm's feed
    // every alarm, in storage order.
    let feed = wait_for(Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let f = control(
                    &live,
                    http::Method::GET,
                    "subscriptions/all/feed?wait=0&limit=1000",
                    "",
                )
                .await
                .1;
                sent.iter().all(|id| f.contains(id.as_str()))
            })
        })
    });
    assert!(feed, "the feed lacks alarms stored after the kill");

    // And the back-channel goes on through the balancer.
    let j = get_status(&lb.addr, &lb.addr).await;
    assert!(j.contains("state=\"succeeded\""), "{j}");
    d.stop_all();
    drop(lb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// PostgreSQL goes away under load and comes back: meanwhile the server
/// answers `retry` (the proxy keeps custody of what it accepted), then it
/// reconnects by itself; nothing accepted is lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_under_load_loses_nothing_and_the_server_reconnects() {
    // A server of its own: the other tests share theirs.
    let pg = Postgres::start().unwrap();
    let url = pg.database("restart");
    let dir = tmp("pg-restart");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.farm_member("a1", &url, "").unwrap();
    d.appserver_addr = Some(a.clone());
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    let c = register(&s).await;
    let sent = send_across_a_restart(&pg, std::slice::from_ref(&c), 300, "restart").await;
    assert_stored_once(&dir.join("a1"), &sent);
    assert!(
        d.node("a1").is_running(),
        "the server died with its database"
    );
    // While the database was away the server said so (a logged fault),
    // and it answered the proxy to try again rather than failing it.
    let log = std::fs::read_to_string(dir.join("logs").join("a1.log")).unwrap();
    assert!(log.contains("ERROR"), "the outage was not logged");
    let pm = rs_tests::deploy::proxy_metrics(&s).await.unwrap();
    assert!(
        pm.get("upstream.retried") > Some(&0),
        "the proxy was never told to retry: {pm:?}"
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server (SQLite) with a farm of two MLMs, `m1` and `m2` (their member
/// names too), both `acme.m1`, on `database`: (the deployment, the
/// server's address, m1's, m2's).
fn mlm_farm(dir: &std::path::Path, database: &str) -> (Deployment, String, String, String) {
    mlm_farm_with(dir, database, "")
}

/// [`mlm_farm`] with more configuration tables for both members.
fn mlm_farm_with(
    dir: &std::path::Path,
    database: &str,
    tables: &str,
) -> (Deployment, String, String, String) {
    let (d, a, mut m) = mlm_farm_of(dir, database, 2, |_| tables.to_owned());
    let m2 = m.pop().unwrap();
    let m1 = m.pop().unwrap();
    (d, a, m1, m2)
}

/// A server (SQLite) with a farm of `n` MLMs, `m1`...`mN` (their member
/// names too), all `acme.m1`, on `database`, each with `tables(name)` too,
/// started in order (so `m1` leads): (the deployment, the server's
/// address, the members' addresses in order).
fn mlm_farm_of(
    dir: &std::path::Path,
    database: &str,
    n: usize,
    tables: impl Fn(&str) -> String,
) -> (Deployment, String, Vec<String>) {
    let mut d = Deployment::new(dir, exe()).unwrap();
    // Heartbeats every 2 s: the server sees the farm's members soon.
    let a = d.appserver("127.0.0.1:0", "heartbeat_secs = 2").unwrap();
    // Alarms of subclass farmagg are aggregated, by class, for 2 s.
    let members = d
        .mlm_farm(n, "acme.m1", std::slice::from_ref(&a), database, |name| Extra {
            tables: format!(
                "[[aggregate]]\ntype = \"alarm\"\nsubclass = \"farmagg\"\nwindow_secs = 2\ngroup_by = \"class\"\n{}",
                tables(name)
            ),
            ..Extra::default()
        })
        .unwrap();
    (d, a, members)
}

/// A proxy on each member (`acme.p1` on the first, `acme.p2` on the
/// second), registered: their integrator clients.
async fn proxy_on_each(d: &mut Deployment, members: [&String; 2]) -> Vec<rs_proxy::client::Client> {
    let mut clients = Vec::new();
    for (i, m) in members.into_iter().enumerate() {
        let s = d
            .proxy(
                &format!("p{}", i + 1),
                &format!("acme.p{}", i + 1),
                std::slice::from_ref(m),
                &Extra::default(),
            )
            .unwrap();
        clients.push(register(&s).await);
    }
    clients
}

/// The members an MLM's status lists, by name, with their states.
async fn members(m: &str) -> BTreeMap<String, NodeState> {
    let Ok(r) = admin(m)
        .get(format!("{}/rs/v1/status", base(m)))
        .send()
        .await
    else {
        return BTreeMap::new();
    };
    let body = r.bytes().await.unwrap_or_default();
    let Ok(tree) = rs_protocol::codec::decode_status(&body, &rs_protocol::codec::Limits::default())
    else {
        return BTreeMap::new();
    };
    tree.children
        .into_iter()
        .filter(|c| c.kind == "member")
        .filter_map(|c| Some((c.name?, c.state)))
        .collect()
}

/// Whether `m` comes to list exactly `want` within 30 s.
async fn until_members(m: &str, want: &BTreeMap<String, NodeState>) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if members(m).await == *want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Two MLMs with one ID on one PostgreSQL database are one MLM to the
/// server: whichever member takes an action from the server, the proxy
/// that long-polls the other member receives its copy at once (the
/// member's commit wakes the other's held poll; without that the copy
/// would wait out the poll's 25 s hold), and each action completes once.
/// Alarms aggregated through both members make one summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlms_on_one_database_hand_out_each_others_back_channel_at_once() {
    let dir = tmp("mlmfarm");
    let url = Postgres::shared().database("mlmfarm");
    let (mut d, a, m1, m2) = mlm_farm(&dir, &url);
    let s1 = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&m1),
            &Extra::default(),
        )
        .unwrap();
    let s2 = d
        .proxy(
            "p2",
            "acme.p2",
            std::slice::from_ref(&m2),
            &Extra::default(),
        )
        .unwrap();
    let c1 = register(&s1).await;
    let c2 = register(&s2).await;
    assert!(
        wait_for(Duration::from_secs(30), || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let c = crate::bulk::components(&a).await;
                    c.contains("id=\"acme.p1\"") && c.contains("id=\"acme.p2\"")
                })
            })
        }),
        "the server did not learn of both proxies"
    );
    for round in 0..3 {
        let started = std::time::Instant::now();
        let (status, body) = control(
            &a,
            http::Method::POST,
            "send",
            r#"<send><to id="acme.p1"/><to id="acme.p2"/><control action="getStatus"/></send>"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let j = until_done(&a, attr(&body, "id")).await;
        let took = started.elapsed();
        for p in ["acme.p1", "acme.p2"] {
            assert!(
                j.contains(&format!("<target id=\"{p}\" state=\"succeeded\"")),
                "round {round}: {j}"
            );
        }
        assert!(
            took < Duration::from_secs(5),
            "round {round}: took {took:?}; a proxy polling the member that did not take \
             the action waited for its poll to run out"
        );
    }
    // Aggregation windows are the farm's: alarms through either member
    // make one summary, made by the leader alone.
    let mut aggregated = Vec::new();
    for i in 0..3 {
        for c in [&c1, &c2] {
            let a = rs_proxy::api::SendRequest {
                subclass: Some("farmagg".into()),
                ..alarm(&format!("farm disk {i}"), None)
            };
            aggregated.push(c.send("alarm", &a).await.unwrap());
        }
    }
    let summaries = |dir: &std::path::Path| -> Vec<String> {
        stored_ids(&dir.join("appserver"))
            .unwrap_or_default()
            .into_iter()
            .filter(|id| id.starts_with("agg-"))
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(30), || !summaries(&dir).is_empty()),
        "no summary of the farm's aggregated alarms"
    );
    // Later flushes would have made a second one by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(summaries(&dir).len(), 1, "{:?}", summaries(&dir));
    let (_, body) = control(
        &a,
        http::Method::GET,
        "messages?component=acme.m1&type=alarm",
        "",
    )
    .await;
    assert!(
        body.contains("<detail name=\"aggregated.count\">6</detail>"),
        "{body}"
    );
    let stored = stored_ids(&dir.join("appserver")).unwrap();
    assert!(aggregated.iter().all(|id| !stored.contains(id)));

    // Every copy was acknowledged: the farm's queue is empty.
    let url2 = url.clone();
    let left: i64 = tokio::task::spawn_blocking(move || {
        let mut c = rs_store::sql::Conn::connect(&rs_store::sql::Location::Postgres {
            url: url2,
            schema: "mlm_acme_m1".into(),
        })
        .unwrap();
        c.one("SELECT COUNT(*) FROM outbox", rs_store::params![], |r| {
            r.get(0)
        })
        .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(left, 0);
    d.stop_all();
}

/// A farm of three MLMs behind haproxy (packaging/haproxy/rs-farm.cfg),
/// the proxies given the balancer's address. The member carrying most of
/// the envelopes is killed (SIGKILL) under load: every alarm the proxies
/// accepted is stored once, through the others, and the back-channel
/// reaches every proxy through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlm_farm_behind_haproxy_loses_nothing_when_a_member_is_killed() {
    a_member_killed(true).await;
}

/// The same with no balancer and two members: the proxies list both
/// members' URLs (their failover list), so they all start on the first,
/// which is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_listing_an_mlm_farms_members_fail_over_and_lose_nothing() {
    a_member_killed(false).await;
}

/// Three proxies on a farm of MLMs, three through haproxy or two listed
/// by the proxies; the busiest member is killed under load.
async fn a_member_killed(balanced: bool) {
    const PROXIES: usize = 3;
    let name = if balanced {
        "mlmfarm-kill"
    } else {
        "mlmfarm-urls"
    };
    let dir = tmp(name);
    let url = Postgres::shared().database(&name.replace('-', ""));
    let (mut d, a, ms) = mlm_farm_of(&dir, &url, if balanced { 3 } else { 2 }, |_| String::new());
    let (lb, upstream) = if balanced {
        let addrs: Vec<&str> = ms.iter().map(String::as_str).collect();
        let lb = d.balancer_at("127.0.0.1:0", &addrs).unwrap();
        let up = vec![lb.addr.clone()];
        (Some(lb), up)
    } else {
        (None, ms.clone())
    };
    let mut clients = Vec::new();
    for i in 1..=PROXIES {
        let s = d
            .proxy(
                &format!("p{i}"),
                &format!("acme.p{i}"),
                &upstream,
                &Extra::default(),
            )
            .unwrap();
        clients.push(register(&s).await);
    }
    // Each member lists them all, alive, in its status.
    let names: Vec<String> = (1..=ms.len()).map(|i| format!("m{i}")).collect();
    let all_ok: BTreeMap<String, NodeState> =
        names.iter().map(|n| (n.clone(), NodeState::Ok)).collect();
    for m in &ms {
        assert!(
            until_members(m, &all_ok).await,
            "{m} does not list every member alive: {:?}",
            members(m).await
        );
    }
    let mut sent = HashSet::new();
    let mut victim = 0;
    for i in 0..240 {
        if i == 80 {
            victim = rs_tests::deploy::busiest(&ms).await.0;
            d.node(&names[victim]).kill();
        }
        let c = &clients[i % PROXIES];
        sent.insert(
            c.send("alarm", &alarm(&format!("mlm farm alarm {i}"), None))
                .await
                .unwrap(),
        );
    }
    assert_stored_once(&dir.join("appserver"), &sent);

    // The survivors show the dead member failed, and the server sees the
    // farm (one MLM) with its members in the status the survivors report.
    let mut after = all_ok.clone();
    after.insert(names[victim].clone(), NodeState::Failed);
    let survivor = &ms[(victim + 1) % ms.len()];
    assert!(
        until_members(survivor, &after).await,
        "the survivor does not show the dead member failed: {:?}",
        members(survivor).await
    );
    // The server addresses the farm, one MLM; its control API and rsctl
    // show the farm's members as its heartbeats report them.
    let want: BTreeMap<String, String> = names
        .iter()
        .enumerate()
        .map(|(k, n)| (n.clone(), if k == victim { "failed" } else { "ok" }.into()))
        .collect();
    let mut farms = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        farms = control(&a, http::Method::GET, "farms", "").await.1;
        let seen: BTreeMap<String, String> =
            rs_protocol::codec::api::decode_farms(farms.as_bytes(), &Default::default())
                .unwrap()
                .into_iter()
                .filter(|f| f.id.as_str() == "acme.m1")
                .flat_map(|f| f.members)
                .map(|m| (m.name, m.state))
                .collect();
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        farms.contains(&format!("members=\"{}\" ok=\"{}\"", ms.len(), ms.len() - 1)),
        "the server's view of the farm acme.m1: {farms}"
    );
    rs_tests::assert_control_api_valid(farms.as_bytes(), &dir.join("farms.xml"));
    let (code, out, err) = crate::backchannel_faults::rsctl(&a, &["farms"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines().any(|l| l.starts_with("acme.m1")
            && l.contains(&names[victim])
            && l.contains("failed")),
        "{out}"
    );
    assert!(
        out.contains(&format!("farms: 1, members: {}", ms.len())),
        "{out}"
    );

    // The back-channel reaches every proxy through the survivors.
    let to: String = (1..=PROXIES)
        .map(|i| format!("<to id=\"acme.p{i}\"/>"))
        .collect();
    let (status, body) = control(
        &a,
        http::Method::POST,
        "send",
        &format!("<send>{to}<control action=\"getStatus\"/></send>"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let j = until_done(&a, attr(&body, "id")).await;
    for i in 1..=PROXIES {
        assert!(
            j.contains(&format!("<target id=\"acme.p{i}\" state=\"succeeded\"")),
            "{j}"
        );
    }
    d.stop_all();
    drop(lb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A quota on an MLM farm is the farm's: two members each carrying half
/// the traffic admit about the quota between them (each flush adds a
/// member's counts to the farm's and reads the total back), not the
/// quota each. Offered: about 1.6 times the quota, paced at 5 alarms/s
/// per proxy (what a member admits before the other's counts reach it,
/// up to two flushes, stays under 10% of the quota); admitted: within 10%
/// of the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_on_an_mlm_farm_holds_for_the_farm_as_a_whole() {
    const QUOTA: u64 = 300_000;
    let dir = tmp("mlmfarm-quota");
    let url = Postgres::shared().database("mlmfarmquota");
    let (mut d, _a, m1, m2) = mlm_farm_with(
        &dir,
        &url,
        &format!(
            "[[throttle.rule]]\nname = \"farm-cap\"\nclass = \"quota\"\nquota_bytes = {QUOTA}\nquota_period = \"day\"\n"
        ),
    );
    let clients = proxy_on_each(&mut d, [&m1, &m2]).await;
    let text = "q".repeat(2000);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for i in 0..120 {
        tick.tick().await;
        for c in &clients {
            let a = rs_proxy::api::SendRequest {
                class: Some("quota".into()),
                subclass: Some("cap".into()),
                ..alarm(&format!("{i} {text}"), None)
            };
            c.send("alarm", &a).await.unwrap();
        }
    }
    // Both members flush and read back (every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = |m: &str| {
        let m = m.to_owned();
        async move {
            server_metrics(&m)
                .await
                .unwrap()
                .get("throttle.farm-cap.bytes")
                .copied()
                .unwrap_or(0)
        }
    };
    let (u1, u2) = (used(&m1).await, used(&m2).await);
    // The farm's total as the database has it.
    let url2 = url.clone();
    let total: i64 = tokio::task::spawn_blocking(move || {
        let mut c = rs_store::sql::Conn::connect(&rs_store::sql::Location::Postgres {
            url: url2,
            schema: "mlm_acme_m1_throttle".into(),
        })
        .unwrap();
        c.one(
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM usage WHERE rule = 'farm-cap'",
            rs_store::params![],
            |r| r.get(0),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let total = total as u64;
    assert!(
        total <= QUOTA + QUOTA / 10,
        "the farm admitted {total} bytes against a quota of {QUOTA}"
    );
    assert!(
        total >= QUOTA * 8 / 10,
        "the quota was not reached ({total} of {QUOTA}): the test offered too little"
    );
    // Each member reports the farm's usage, not its own share.
    for u in [u1, u2] {
        assert!(
            u >= total * 9 / 10 && u <= total,
            "member reports {u}, farm {total}"
        );
    }
    d.stop_all();
}

/// The farm's PostgreSQL goes away under load and comes back: the MLM
/// members keep relaying (the forward path does not wait on the farm's
/// database; what needs it logs the fault), reconnect by themselves, and
/// the back-channel works again; nothing a proxy accepted is lost or
/// stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlm_farm_carries_on_through_a_postgresql_restart() {
    // A server of its own: the other tests share theirs.
    let pg = Postgres::start().unwrap();
    let url = pg.database("mlmrestart");
    let dir = tmp("mlmfarm-pg-restart");
    let (mut d, a, m1, m2) = mlm_farm(&dir, &url);
    let clients = proxy_on_each(&mut d, [&m1, &m2]).await;
    let sent = send_across_a_restart(&pg, &clients, 210, "mlm restart").await;
    assert_stored_once(&dir.join("appserver"), &sent);
    for m in ["m1", "m2"] {
        assert!(d.node(m).is_running(), "{m} died with its database");
    }
    let log = std::fs::read_to_string(dir.join("logs").join("m1.log")).unwrap()
        + &std::fs::read_to_string(dir.join("logs").join("m2.log")).unwrap();
    assert!(log.contains("ERROR"), "the outage was not logged");
    // Once the database is back, actions reach both proxies again.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = control(
            &a,
            http::Method::POST,
            "send",
            r#"<send><to id="acme.p1"/><to id="acme.p2"/><control action="getStatus"/></send>"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let j = until_done(&a, attr(&body, "id")).await;
        if ["acme.p1", "acme.p2"]
            .iter()
            .all(|p| j.contains(&format!("<target id=\"{p}\" state=\"succeeded\"")))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the back-channel did not recover: {j}"
        );
    }
    d.stop_all();
}

/// A download leaves the server once for the members of an MLM farm that
/// share a cache directory, and any member serves it. Three members, two
/// proxies on each: `m1` and `m2` share a directory, `m3` has its own.
/// The leader fetches for the farm; a member whose directory lacks the
/// file answers its proxies "try again" while it fetches a copy, one per
/// directory (an `flock` in it): so the package crosses the server's link
/// twice (once per directory), not six times, one of `m1` and `m2` serves
/// without fetching, and every proxy installs exactly its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_is_fetched_once_per_shared_cache_directory_of_an_mlm_farm() {
    let dir = tmp("mlmfarm-bulk");
    let url = Postgres::shared().database("mlmfarmbulk");
    let shared = dir.join("shared-cache");
    let (mut d, a, ms) = mlm_farm_of(&dir, &url, 3, |name| {
        if name == "m3" {
            String::new()
        } else {
            format!("[bulk]\ncache_dir = \"{}\"\n", shared.display())
        }
    });
    let mut ids = Vec::new();
    for i in 0..6 {
        let name = format!("p{}", i + 1);
        let id = format!("acme.p{}", i + 1);
        let extra = Extra {
            tables: crate::bulk::installer(&dir.join(&name)),
            ..Extra::default()
        };
        d.proxy(&name, &id, std::slice::from_ref(&ms[i / 2]), &extra)
            .unwrap();
        ids.push(id);
    }
    let bytes = crate::bulk::publish_to_group(
        &a,
        &dir,
        &ids,
        "farm-proxies",
        "agent-3.0.tar.gz",
        2_000_000,
    );
    let size = bytes.len() as u64;
    let metric = crate::bulk::metric;
    assert_eq!(
        metric(&a, "bulk.bytes_served").await,
        2 * size,
        "the package left the server other than once per cache directory"
    );
    // One of m1 and m2 fetched for their shared directory (the leader, or
    // the first to lock it when m3 leads), the other served from it
    // without fetching; m3 fetched its own copy. Each served its proxies.
    let (f1, f2) = (
        metric(&ms[0], "bulk.fetched_bytes").await,
        metric(&ms[1], "bulk.fetched_bytes").await,
    );
    assert!((f1, f2) == (size, 0) || (f1, f2) == (0, size), "{f1} {f2}");
    assert_eq!(metric(&ms[2], "bulk.fetched_bytes").await, size);
    for m in &ms {
        assert_eq!(metric(m, "bulk.served_bytes").await, 2 * size);
    }
    // One file in the shared directory (no partial left), one in m3's
    // (besides the fetch's lock file).
    let files = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(p)
            .map(|r| {
                r.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(files(&shared).len(), 1, "{:?}", files(&shared));
    assert_eq!(files(&dir.join("m3/cache")).len(), 1);
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rate on an MLM farm is the farm's: each live member admits an equal
/// share of it (every admitted message spends as many cells of the rate as
/// there are live members), so two members each offered more than the
/// rate admit about the rate between them, not twice it. 20 alarms/s for
/// the farm; each member offered about 25/s for 16 s; what the server
/// stores in the last 12 s (the bursts spent) stays within 10% of the
/// rate, while one member alone would admit 20/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_on_an_mlm_farm_holds_for_the_farm_as_a_whole() {
    const RATE: u64 = 20;
    let dir = tmp("mlmfarm-rate");
    let url = Postgres::shared().database("mlmfarmrate");
    let (mut d, _a, m1, m2) = mlm_farm_with(
        &dir,
        &url,
        &format!(
            "[[throttle.rule]]\nname = \"farm-rate\"\nclass = \"rated\"\nmessages_per_sec = {RATE}\nburst_secs = 1\n"
        ),
    );
    let clients = proxy_on_each(&mut d, [&m1, &m2]).await;
    // Both members see each other: each admits half the rate.
    let both = BTreeMap::from([("m1".into(), NodeState::Ok), ("m2".into(), NodeState::Ok)]);
    assert!(until_members(&m1, &both).await && until_members(&m2, &both).await);
    assert!(
        wait_for(Duration::from_secs(10), || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let s1 = server_metrics(&m1).await.unwrap_or_default();
                    let s2 = server_metrics(&m2).await.unwrap_or_default();
                    s1.get("farm.rate_share") == Some(&2) && s2.get("farm.rate_share") == Some(&2)
                })
            })
        }),
        "the members do not share the rate"
    );
    assert_rate_holds(&clients, &dir.join("appserver"), RATE).await;
    d.stop_all();
}

/// Sends alarms of class `rated` through each of `clients` every 40 ms
/// for 16 s and checks that the server (its store read from `store`)
/// admitted `rate` a second (within 10%, and at least 60% of it: enough
/// was offered) from the fourth second on.
async fn assert_rate_holds(
    clients: &[rs_proxy::client::Client],
    store: &std::path::Path,
    rate: u64,
) {
    let mut sent = HashSet::new();
    let stored = |sent: &HashSet<String>| {
        stored_ids(store)
            .unwrap()
            .into_iter()
            .filter(|id| sent.contains(id))
            .count() as u64
    };
    let start = std::time::Instant::now();
    let mut window: Option<(std::time::Instant, u64)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(40));
    while start.elapsed() < Duration::from_secs(16) {
        tick.tick().await;
        for c in clients {
            let a = rs_proxy::api::SendRequest {
                class: Some("rated".into()),
                subclass: Some("r".into()),
                ..alarm("rated alarm", None)
            };
            sent.insert(c.send("alarm", &a).await.unwrap());
        }
        if window.is_none() && start.elapsed() >= Duration::from_secs(4) {
            window = Some((std::time::Instant::now(), stored(&sent)));
        }
    }
    let (from, before) = window.unwrap();
    let admitted = stored(&sent) - before;
    let secs = from.elapsed().as_secs_f64();
    let got = admitted as f64 / secs;
    assert!(
        got <= rate as f64 * 1.1,
        "the farm admitted {admitted} alarms in {secs:.1} s ({got:.1}/s) against a rate of {rate}/s"
    );
    assert!(
        got >= rate as f64 * 0.6,
        "only {got:.1}/s went through: the test offered too little"
    );
}

/// A rate at a farm of application servers holds for the farm: each
/// member records its beat in the farm's database and admits its share
/// of the rate among the live members (with the rate per member, two
/// members admit twice it). The farm and its members show in `/farms`
/// and `rsctl farms`; a member killed is shown failed, and the survivor
/// takes the whole rate again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_on_a_farm_of_servers_holds_for_the_farm_as_a_whole() {
    const RATE: u64 = 20;
    let dir = tmp("farm-rate");
    let url = Postgres::shared().database("farmrate");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let rule = format!(
        "member = \"{{}}\"\n[[throttle.rule]]\nname = \"farm-rate\"\nclass = \"rated\"\nmessages_per_sec = {RATE}\nburst_secs = 1\n"
    );
    let a1 = d
        .farm_member("a1", &url, &rule.replace("{}", "a1"))
        .unwrap();
    let a2 = d
        .farm_member("a2", &url, &rule.replace("{}", "a2"))
        .unwrap();
    d.appserver_addr = Some(a1.clone());
    let share = |a: &String, want: u64| {
        let a = a.clone();
        move || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    server_metrics(&a)
                        .await
                        .unwrap_or_default()
                        .get("farm.rate_share")
                        == Some(&want)
                })
            })
        }
    };
    assert!(
        wait_for(Duration::from_secs(15), share(&a1, 2))
            && wait_for(Duration::from_secs(15), share(&a2, 2)),
        "the members do not share the rate"
    );
    let clients = proxy_on_each(&mut d, [&a1, &a2]).await;
    assert_rate_holds(&clients, &dir.join("a1"), RATE).await;

    // The farm, seen through either member.
    let (status, farms) = control(&a2, http::Method::GET, "farms", "").await;
    assert_eq!(status, 200, "{farms}");
    assert!(
        farms.contains("id=\"rs.a1\"") && farms.contains("members=\"2\" ok=\"2\""),
        "{farms}"
    );
    rs_tests::assert_control_api_valid(farms.as_bytes(), &dir.join("farms.xml"));
    // One dies: shown failed, and the other admits the whole rate.
    d.node("a2").kill();
    assert!(
        wait_for(Duration::from_secs(20), share(&a1, 1)),
        "the survivor still admits half the rate"
    );
    let (code, out, err) = crate::backchannel_faults::rsctl(&a1, &["farms"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("rs.a1") && l.contains("a2") && l.contains("failed")),
        "{out}"
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upload relayed through one member of an MLM farm (behind haproxy)
/// resumes through another when that member dies: the relay keeps no
/// state of its own (the server holds what arrived), so the proxy's next
/// `HEAD`/`PUT` from where the server stopped goes to a live member. Every
/// byte reaches the server once and the file is stored once, verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_through_an_mlm_farm_resumes_through_another_member_after_a_cut() {
    const SIZE: u64 = 512 << 20;
    let dir = tmp("mlmfarm-upload");
    let url = Postgres::shared().database("mlmfarmupload");
    let (mut d, a, ms) = mlm_farm_of(&dir, &url, 2, |_| String::new());
    let addrs: Vec<&str> = ms.iter().map(String::as_str).collect();
    let lb = d.balancer_at("127.0.0.1:0", &addrs).unwrap();
    let s = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&lb.addr),
            &Extra::default(),
        )
        .unwrap();
    let (client, up, want) = crate::bulk::upload_core(&s, &dir.join("core.farm"), SIZE).await;
    let metric = crate::bulk::metric;
    use crate::bulk::block;
    // Cut it in the middle: kill the member relaying it.
    let mut relaying = None;
    assert!(
        wait_for(Duration::from_secs(120), || block(async {
            for (k, m) in ms.iter().enumerate() {
                if metric(m, "bulk.bytes_relayed").await > SIZE / 4 {
                    relaying = Some(k);
                    return true;
                }
            }
            false
        })),
        "the transfer did not get going"
    );
    let victim = relaying.unwrap();
    d.node(&format!("m{}", victim + 1)).kill();
    let survivor = &ms[1 - victim];
    crate::bulk::until_uploaded(&client, &up.id).await;
    // Resumed through the survivor, not started over.
    let relayed = metric(survivor, "bulk.bytes_relayed").await;
    assert!(relayed > 0 && relayed < SIZE * 3 / 4, "{relayed}");
    assert!(metric(&a, "bulk.resumed").await >= 1);
    assert_eq!(metric(&a, "bulk.bytes_received").await, SIZE);
    assert_eq!(metric(&a, "bulk.completed").await, 1);
    let stored = dir.join("appserver/bulk/files").join(&up.request);
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), SIZE);
    assert_eq!(crate::bulk::sha256_file(&stored), want);
    d.stop_all();
    drop(lb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the count query `sql` answers in the database `db` (0 when it
/// cannot be asked).
fn count_of(pg: &Postgres, db: &str, sql: &str) -> u64 {
    pg.psql(db, sql)
        .map(|s| s.trim().parse::<u64>().unwrap_or(0))
        .unwrap_or(0)
}

/// A server and a farm of two MLMs (`acme.m1`) on a database of their own:
/// the first member reaches the server through a relay the test can break
/// (its link), the second directly. `top` is added to both members'
/// configuration. Returns the deployment, the database's name, the
/// server's and the members' addresses, and the first member's link.
struct OneLinkBroken {
    d: Deployment,
    db: String,
    a: String,
    m1: String,
    m2: String,
    link: std::sync::Arc<rs_tests::relay::Link>,
}

async fn farm_with_one_breakable_link(
    dir: &std::path::Path,
    name: &str,
    top: &str,
) -> OneLinkBroken {
    let url = Postgres::shared().database(name);
    let db = url.rsplit('/').next().unwrap().to_owned();
    let mut d = Deployment::new(dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let (via, link) = rs_tests::relay::start(a.clone()).await.unwrap();
    let member = |m: &str| Extra {
        top: format!("database = \"{url}\"\nmember = \"{m}\"\n{top}"),
        ..Extra::default()
    };
    let m1 = d.mlm("m1", "acme.m1", &[via], &member("m1")).unwrap();
    let m2 = d
        .mlm("m2", "acme.m1", std::slice::from_ref(&a), &member("m2"))
        .unwrap();
    OneLinkBroken {
        d,
        db,
        a,
        m1,
        m2,
        link,
    }
}

/// An MLM farm keeping custody shares one spool on its database: what a
/// member accepted is sent by whichever member is alive. Here the first
/// member's upstream swallows its POSTs (a blackholed relay), so the
/// messages it took for sending stay claimed by it; it is killed with
/// them in flight, and the second member, whose upstream works, takes
/// them when the dead member's claims lapse. Every alarm the proxy handed
/// over is stored, once, and the shared spool ends empty. (With a spool
/// per member they would wait in the dead member's file; with claims that
/// never lapse, in the shared table.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custody_farm_shares_its_spool_and_a_dead_members_messages_go_on_through_another() {
    let dir = tmp("mlmfarm-custody");
    let pg = Postgres::shared();
    let OneLinkBroken {
        mut d,
        db,
        m1,
        link,
        ..
    } = farm_with_one_breakable_link(&dir, "mlmfarmcustody", "custody = true").await;
    let s = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&m1),
            &Extra::default(),
        )
        .unwrap();
    let c = register(&s).await;
    link.set_fault(rs_tests::relay::Fault::Blackhole);
    let mut sent = HashSet::new();
    for i in 0..40 {
        sent.insert(
            c.send("alarm", &alarm(&format!("custody farm alarm {i}"), None))
                .await
                .unwrap(),
        );
    }
    let claimed_by_m1 = || {
        count_of(
            pg,
            &db,
            "SELECT count(*) FROM mlm_acme_m1_spool.spool WHERE claimed_by = 'm1'",
        )
    };
    assert!(
        wait_for(Duration::from_secs(30), || claimed_by_m1() > 0),
        "the first member never held messages in flight"
    );
    d.node("m1").kill();
    let held = claimed_by_m1();
    assert!(held > 0, "the killed member held nothing");
    assert_stored_once(&dir.join("appserver"), &sent);
    assert!(
        wait_for(Duration::from_secs(30), || count_of(
            pg,
            &db,
            "SELECT count(*) FROM mlm_acme_m1_spool.spool"
        ) == 0),
        "the shared spool did not empty"
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An MLM that kept custody alone and joins a farm (its configuration
/// gains `database`) brings what its own spool file still holds: the
/// messages move into the farm's spool when it starts, and are delivered
/// once the server is up, each once. (Left in `spool.db`, no sender would
/// read them again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlm_joining_a_farm_brings_the_messages_its_own_spool_holds() {
    let dir = tmp("mlmfarm-join");
    let url = Postgres::shared().database("mlmfarmjoin");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // No server yet: the MLM keeps what it accepts.
    let port = rs_tests::deploy::held_port();
    let custody = Extra {
        top: "custody = true".into(),
        ..Extra::default()
    };
    let m = d
        .mlm("m1", "acme.m1", std::slice::from_ref(&port), &custody)
        .unwrap();
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let c = register(&s).await;
    let mut sent = HashSet::new();
    for i in 0..20 {
        sent.insert(
            c.send("alarm", &alarm(&format!("joining {i}"), None))
                .await
                .unwrap(),
        );
    }
    assert!(
        crate::forward::handed_over(&s, 20),
        "the MLM did not take custody"
    );
    d.node("m1").kill();
    let cfg = dir.join("m1.toml");
    let before = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("database = \"{url}\"\nmember = \"m1\"\n{before}"),
    )
    .unwrap();
    tokio::task::block_in_place(|| d.restart("m1")).unwrap();
    d.appserver(&port, "").unwrap();
    assert_stored_once(&dir.join("appserver"), &sent);
    let log = std::fs::read_to_string(dir.join("logs").join("m1.log")).unwrap();
    assert!(
        log.contains("into the farm's spool"),
        "the move is not logged"
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Delivery notices on their way up are the farm's: a member that
/// recorded one and died before its POST carried it (its upstream
/// swallows its POSTs: a blackholed relay) leaves it in the farm's
/// database, and another member sends it, so the job's target at the
/// server shows `delivered`. (Kept in the dead member's memory only, it
/// would stay `pending`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_delivery_notices_reach_the_server_through_another() {
    use crate::backchannel_faults::{finish, post_envelope, routes};
    use rs_protocol::control::{NodeState, StatusNode};
    let dir = tmp("mlmfarm-notices");
    let pg = Postgres::shared();
    let OneLinkBroken {
        mut d,
        db,
        a,
        m1,
        m2,
        link,
        ..
    } = farm_with_one_breakable_link(&dir, "mlmfarmnotices", "").await;
    // A site acme.p7 (hand-written envelopes) makes itself known through
    // the second member: the server reaches it through the farm.
    let now = rs_protocol::Timestamp::now();
    let p7 = rs_protocol::RsId::new("acme.p7").unwrap();
    let tree = StatusNode {
        id: Some(p7.clone()),
        ..StatusNode::new("proxy", NodeState::Ok)
    };
    let cold = rs_protocol::control_messages::status_message(
        p7.clone(),
        rs_protocol::control::SUB_COLD_START,
        &tree,
        now,
        Duration::from_secs(600),
        5,
    );
    post_envelope(&m2, "acme.p7", &[cold], Vec::new()).await;
    assert!(
        wait_for(Duration::from_secs(30), || tokio::task::block_in_place(
            || {
                tokio::runtime::Handle::current()
                    .block_on(routes(&a))
                    .get("acme.p7")
                    .is_some_and(|v| v == &["acme.m1"])
            }
        )),
        "the server does not reach acme.p7 through the farm"
    );
    let (status, body) = control(
        &a,
        http::Method::POST,
        "send",
        r#"<send><to id="acme.p7"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let msg = rs_protocol::MessageId::new(attr(&body, "message")).unwrap();
    // The first member hears of the delivery, and cannot pass it on.
    link.set_fault(rs_tests::relay::Fault::Blackhole);
    post_envelope(&m1, "acme.p7", &[], vec![(msg.clone(), p7.clone())]).await;
    let notices = || count_of(pg, &db, "SELECT count(*) FROM mlm_acme_m1.notices");
    let recorded = || notices() == 1;
    assert!(
        wait_for(Duration::from_secs(10), recorded),
        "the notice is not in the farm's database"
    );
    d.node("m1").kill();
    let j = finish(&a, attr(&body, "id"), 0).await;
    assert_eq!(j.targets[0].state, "pending", "{j:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut j = j;
    while j.targets[0].state != "delivered" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        j = finish(&a, attr(&body, "id"), 0).await;
    }
    assert_eq!(
        j.targets[0].state, "delivered",
        "the dead member's notice never reached the server: {j:?}"
    );
    // Sent, it is forgotten: once the POST that carried it has its answer
    // (a long poll's, up to its 25 s hold).
    assert!(
        wait_for(Duration::from_secs(60), || notices() == 0),
        "a sent notice is still recorded"
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CA's records are the farm's: members on separate hosts (each with
/// its own copy of the CA's directory: its certificate, key and list) see
/// the certificates any member issued, revoke them through any member,
/// and every member's revocation list follows within its refresh. Also
/// `rsctl ca list --database` reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farms_members_share_the_cas_records_and_revocations() {
    use crate::security::{client_of, empty_envelope, send_env};
    let dir = tmp("farm-ca");
    let url = Postgres::shared().database("farmca");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let pki = d.pki.clone().unwrap();
    let mut addrs = Vec::new();
    for name in ["a1", "a2"] {
        let own = dir.join(format!("ca-{name}"));
        std::fs::create_dir_all(&own).unwrap();
        for f in ["ca.pem", "ca.key", "crl.pem"] {
            std::fs::copy(pki.dir.join(f), own.join(f)).unwrap();
        }
        let extra = format!("[ca]\ndir = \"{}\"\n", own.display());
        addrs.push(d.farm_member(name, &url, &extra).unwrap());
    }
    let (a1, a2) = (addrs[0].clone(), addrs[1].clone());
    // acme.p7 enrolls through the first member.
    d.appserver_addr = Some(a1.clone());
    let token = d.enrollment_token("acme.p7").unwrap();
    let mut tls = rs_net::tls::TlsConfig::in_dir(&dir.join("p7"));
    tls.crl = None;
    std::fs::create_dir_all(dir.join("p7")).unwrap();
    std::fs::copy(&pki.admin.ca, &tls.ca).unwrap();
    let me = rs_net::enroll::ensure(&tls, Some(&token), &[base(&a1)], None)
        .await
        .unwrap();
    // The second member knows the certificate.
    let (status, list) = control(&a2, http::Method::GET, "certificates?name=acme.p7", "").await;
    assert_eq!(status, 200, "{list}");
    assert!(list.contains(&me.serial), "a2 does not know it: {list}");
    // Both serve it...
    let http = client_of(&tls);
    for a in [&a1, &a2] {
        let (ct, body) = empty_envelope("acme.p7", None);
        let r = send_env(&http, a, &ct, body).await;
        assert!(matches!(r, Ok((200, _))), "{a}: {r:?}");
    }
    // ...until it is revoked through the second member; then neither.
    let (code, out, err) =
        crate::backchannel_faults::rsctl(&a2, &["revoke", "--serial", &me.serial]);
    assert_eq!(code, 0, "{out}{err}");
    for a in [&a2, &a1] {
        let refused = wait_for(Duration::from_secs(15), || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let http = client_of(&tls);
                    let (ct, body) = empty_envelope("acme.p7", None);
                    !matches!(send_env(&http, a, &ct, body).await, Ok((200, _)))
                })
            })
        });
        assert!(refused, "{a} still serves a certificate revoked through a2");
    }
    // rsctl reads the farm's records.
    let out = std::process::Command::new(exe())
        .args(["rsctl", "ca", "list", "--dir"])
        .arg(dir.join("ca-a1"))
        .args(["--database", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(&me.serial))
        .unwrap_or("");
    assert!(
        line.contains("acme.p7") && !line.trim_end().ends_with('-'),
        "rsctl ca list --database: {text}"
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}
