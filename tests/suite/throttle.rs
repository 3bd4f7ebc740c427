//! Throttle control: the rules on a simulated clock (no sleeping), and on
//! real daemons: a throttled sender loses nothing, a throttled forwarder's
//! refusals lead to later delivery, a throttle set at run time holds and
//! outlives a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rs_node::throttle::{Decision, Per, Period, Rule, SqlUsage, Subject, Throttle, ThrottleConfig};
use rs_protocol::model::{ContentKind, Severity};
use rs_protocol::time::Clock;
use rs_protocol::{RsId, Timestamp};

/// A clock the test moves.
#[derive(Debug, Default)]
struct FakeClock(AtomicI64);

impl FakeClock {
    fn at(t: &str) -> Arc<Self> {
        let c = Arc::new(FakeClock::default());
        c.set(t);
        c
    }
    fn set(&self, t: &str) {
        self.0
            .store(Timestamp::parse(t).unwrap().as_millis(), Ordering::SeqCst);
    }
    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst)).unwrap()
    }
}

fn throttle(clock: &Arc<FakeClock>, rules: Vec<Rule>) -> Throttle {
    let cfg = ThrottleConfig {
        rule: rules,
        ..ThrottleConfig::default()
    };
    Throttle::new(&cfg, clock.clone(), None, None).unwrap()
}

struct Msg {
    component: RsId,
    class: &'static str,
    kind: ContentKind,
    bytes: u64,
    precedence: u8,
    severity: Option<Severity>,
}

impl Msg {
    fn new(component: &str, class: &'static str, bytes: u64) -> Self {
        Msg {
            component: RsId::new(component).unwrap(),
            class,
            kind: ContentKind::Data,
            bytes,
            precedence: 5,
            severity: None,
        }
    }
    fn subject(&self) -> Subject<'_> {
        Subject {
            component: &self.component,
            class: self.class,
            kind: self.kind,
            bytes: self.bytes,
            precedence: self.precedence,
            severity: self.severity,
        }
    }
}

fn wait_of(d: Decision) -> Option<Duration> {
    match d {
        Decision::Admit => None,
        Decision::Wait { after, .. } => Some(after),
    }
}

fn night_bulk() -> Rule {
    Rule {
        name: "night-bulk".into(),
        class: Some("bulk".into()),
        window: Some("22:00-06:00".into()),
        time_zone: Some("Europe/Berlin".into()),
        ..Rule::default()
    }
}

#[test]
fn a_window_opens_and_closes_at_local_times_across_midnight() {
    // 2026-11-24 is winter time in Berlin: UTC+1.
    let c = FakeClock::at("2026-11-24T20:59:00Z");
    let t = throttle(&c, vec![night_bulk()]);
    let bulk = Msg::new("acme.p1", "bulk", 1000);
    let other = Msg::new("acme.p1", "inventory", 1000);
    // 21:59 local: closed for one more minute; other classes pass.
    assert_eq!(
        wait_of(t.check(&bulk.subject())),
        Some(Duration::from_secs(60))
    );
    assert_eq!(t.check(&other.subject()), Decision::Admit);
    c.set("2026-11-24T21:00:00Z"); // 22:00
    assert_eq!(t.check(&bulk.subject()), Decision::Admit);
    c.set("2026-11-24T23:30:00Z"); // 00:30, past midnight
    assert_eq!(t.check(&bulk.subject()), Decision::Admit);
    c.set("2026-11-25T04:59:00Z"); // 05:59
    assert_eq!(t.check(&bulk.subject()), Decision::Admit);
    c.set("2026-11-25T05:00:00Z"); // 06:00: closed until 22:00
    assert_eq!(
        wait_of(t.check(&bulk.subject())),
        Some(Duration::from_secs(16 * 3600))
    );
    // The reason names the rule and the window.
    match t.check(&bulk.subject()) {
        Decision::Wait { why, .. } => {
            assert!(
                why.contains("night-bulk") && why.contains("22:00-06:00"),
                "{why}"
            )
        }
        Decision::Admit => panic!("admitted outside its window"),
    }
}

#[test]
fn windows_and_quota_days_follow_daylight_saving_changes() {
    // Berlin springs forward on 2026-03-29: 02:00 CET -> 03:00 CEST. A
    // window from 02:30 (a time that day never shows) opens when the clock
    // jumps into it, at 01:00Z.
    let c = FakeClock::at("2026-03-29T00:30:00Z");
    let early = Rule {
        name: "early".into(),
        window: Some("02:30-04:00".into()),
        time_zone: Some("Europe/Berlin".into()),
        ..Rule::default()
    };
    let t = throttle(&c, vec![early.clone()]);
    let m = Msg::new("acme.p1", "bulk", 10);
    assert_eq!(
        wait_of(t.check(&m.subject())),
        Some(Duration::from_secs(1800))
    );
    c.set("2026-03-29T01:00:00Z"); // 03:00 CEST
    assert_eq!(t.check(&m.subject()), Decision::Admit);
    c.set("2026-03-29T02:00:00Z"); // 04:00 CEST: closed until 02:30 CEST tomorrow
    assert_eq!(
        wait_of(t.check(&m.subject())),
        Some(Duration::from_secs(22 * 3600 + 1800))
    );
    // The night the clocks go back (2026-10-25, 03:00 CEST -> 02:00 CET),
    // the window still opens at the first 02:30.
    c.set("2026-10-24T23:00:00Z"); // 01:00 CEST
    assert_eq!(
        wait_of(t.check(&m.subject())),
        Some(Duration::from_secs(5400))
    );

    // A daily quota's day is a local day: 23 hours on the spring day.
    let quota = Rule {
        name: "daily".into(),
        quota_bytes: Some(1000),
        quota_period: Some(Period::Day),
        time_zone: Some("Europe/Berlin".into()),
        ..Rule::default()
    };
    c.set("2026-03-29T12:00:00Z");
    let t = throttle(&c, vec![quota]);
    let big = Msg::new("acme.p1", "bulk", 600);
    assert_eq!(t.check(&big.subject()), Decision::Admit);
    // Next local midnight is 2026-03-29T22:00Z (CEST).
    assert_eq!(
        wait_of(t.check(&big.subject())),
        Some(Duration::from_secs(10 * 3600))
    );
}

/// Offers `m` every `every` for `total` of simulated time; returns how many
/// went through.
fn offer(c: &FakeClock, t: &Throttle, m: &Msg, every: Duration, total: Duration) -> u64 {
    let n = total.as_micros() / every.as_micros();
    let mut admitted = 0;
    for _ in 0..n {
        if t.check(&m.subject()) == Decision::Admit {
            admitted += 1;
        }
        c.advance(every);
    }
    admitted
}

#[test]
fn rates_hold_within_five_percent_under_twice_the_load() {
    let c = FakeClock::at("2026-11-24T00:00:00Z");
    let t = throttle(
        &c,
        vec![Rule {
            name: "msgs".into(),
            messages_per_sec: Some(100.0),
            ..Rule::default()
        }],
    );
    let m = Msg::new("acme.p1", "events", 100);
    // 200 offers a second for 20 simulated minutes.
    let total = Duration::from_secs(1200);
    let got = offer(&c, &t, &m, Duration::from_millis(5), total) as f64;
    let want = 100.0 * total.as_secs_f64();
    assert!(
        (got - want).abs() / want < 0.05,
        "{got} messages, want {want}"
    );

    let t = throttle(
        &c,
        vec![Rule {
            name: "site-x".into(),
            customer: Some("acme".into()),
            bytes_per_sec: Some(1_000_000),
            ..Rule::default()
        }],
    );
    // 10 KB messages, 200 a second: 2 MB/s offered against 1 MB/s.
    let m = Msg::new("acme.p1", "data", 10_000);
    let got = offer(&c, &t, &m, Duration::from_millis(5), total) as f64 * 10_000.0;
    let want = 1_000_000.0 * total.as_secs_f64();
    assert!((got - want).abs() / want < 0.05, "{got} bytes, want {want}");
    // Another customer is not limited by site X's rule.
    let other = Msg::new("globex.p1", "data", 10_000);
    assert_eq!(
        offer(
            &c,
            &t,
            &other,
            Duration::from_millis(5),
            Duration::from_secs(10)
        ),
        2000
    );
}

/// A farm's rates: with the share set to the live members, each member's
/// throttle admits its part of a message rate and of a byte rate (three
/// members: a third each, within 5%), and all of it again when it is
/// alone.
#[test]
fn a_share_of_a_farms_rates_holds_per_member() {
    let c = FakeClock::at("2026-11-24T00:00:00Z");
    let t = throttle(
        &c,
        vec![
            Rule {
                name: "msgs".into(),
                class: Some("events".into()),
                messages_per_sec: Some(90.0),
                burst_secs: Some(1.0),
                ..Rule::default()
            },
            Rule {
                name: "bytes".into(),
                class: Some("data".into()),
                bytes_per_sec: Some(900_000),
                ..Rule::default()
            },
        ],
    );
    t.set_share(3);
    let total = Duration::from_secs(600);
    let every = Duration::from_millis(5);
    let m = Msg::new("acme.p1", "events", 100);
    let got = offer(&c, &t, &m, every, total) as f64;
    let want = 30.0 * total.as_secs_f64();
    assert!(
        (got - want).abs() / want < 0.05,
        "{got} messages, want {want}"
    );
    let m = Msg::new("acme.p1", "data", 10_000);
    let got = offer(&c, &t, &m, every, total) as f64 * 10_000.0;
    let want = 300_000.0 * total.as_secs_f64();
    assert!((got - want).abs() / want < 0.05, "{got} bytes, want {want}");
    // Alone again: the whole rate.
    t.set_share(0);
    assert_eq!(t.share(), 1);
    let m = Msg::new("acme.p1", "events", 100);
    let got = offer(&c, &t, &m, every, total) as f64;
    let want = 90.0 * total.as_secs_f64();
    assert!(
        (got - want).abs() / want < 0.05,
        "{got} messages, want {want}"
    );
}

#[test]
fn quotas_are_per_key_hold_within_five_percent_and_survive_a_restart() {
    let dir = crate::backchannel::tmp("throttle-quota");
    std::fs::create_dir_all(&dir).unwrap();
    let c = FakeClock::at("2026-11-24T00:00:00Z");
    let cfg = ThrottleConfig {
        rule: vec![Rule {
            name: "daily".into(),
            per: Per::Customer,
            quota_bytes: Some(50_000_000),
            quota_period: Some(Period::Day),
            ..Rule::default()
        }],
        ..ThrottleConfig::default()
    };
    let usage = || {
        Some(Arc::new(
            SqlUsage::open(&rs_store::sql::Location::Sqlite(dir.join("throttle.db"))).unwrap(),
        ) as _)
    };
    let t = Throttle::new(&cfg, c.clone(), usage(), None).unwrap();
    let m = Msg::new("acme.p1", "data", 100_000);
    // One 100 KB message a second for 12 simulated hours: 4.3 GB offered.
    let got = offer(
        &c,
        &t,
        &m,
        Duration::from_secs(1),
        Duration::from_secs(12 * 3600),
    ) as f64
        * 100_000.0;
    assert!((50_000_000.0 * 0.95..=50_000_000.0).contains(&got), "{got}");
    // Another customer has its own allowance.
    let g = Msg::new("globex.p1", "data", 100_000);
    assert_eq!(t.check(&g.subject()), Decision::Admit);
    // A restart remembers what was used today.
    t.flush().unwrap();
    drop(t);
    let t = Throttle::new(&cfg, c.clone(), usage(), None).unwrap();
    assert!(wait_of(t.check(&m.subject())).is_some());
    let (_, used) = t.report();
    assert!(
        used.iter()
            .any(|u| u.key == "acme" && u.bytes >= 49_900_000),
        "{used:?}"
    );
    // A new day, a new allowance.
    c.set("2026-11-25T00:00:00Z");
    assert_eq!(t.check(&m.subject()), Decision::Admit);
}

#[test]
fn a_component_rule_holds_that_component_and_those_below_it_only() {
    let c = FakeClock::at("2026-11-24T12:00:00Z");
    let rule = |component: &str| Rule {
        name: "site-quota".into(),
        component: Some(component.into()),
        per: Per::Component,
        quota_bytes: Some(1500),
        ..Rule::default()
    };
    let t = throttle(&c, vec![rule("acme.p1")]);
    let (p1, below, sibling) = (
        Msg::new("acme.p1", "data", 1000),
        Msg::new("acme.p1.s1", "data", 1000),
        Msg::new("acme.p10", "data", 1000),
    );
    // Each key has its own quota: a second message of either is held.
    for m in [&p1, &below] {
        assert_eq!(t.check(&m.subject()), Decision::Admit);
        assert!(wait_of(t.check(&m.subject())).is_some());
    }
    // acme.p10 is not below acme.p1: never held.
    for _ in 0..3 {
        assert_eq!(t.check(&sibling.subject()), Decision::Admit);
    }
    // A component that is not an ID is refused when the rules are read.
    let cfg = ThrottleConfig {
        rule: vec![rule("acme..p1")],
        ..ThrottleConfig::default()
    };
    let e = Throttle::new(&cfg, c.clone(), None, None).unwrap_err();
    assert!(e.contains("component \"acme..p1\""), "{e}");
}

#[test]
fn severe_alarms_and_high_precedence_pass_a_closed_throttle() {
    let c = FakeClock::at("2026-11-24T12:00:00Z");
    let t = throttle(
        &c,
        vec![Rule {
            name: "quiet-hours".into(),
            window: Some("22:00-06:00".into()),
            exempt_severity: Some("major".into()),
            exempt_precedence: Some(9),
            ..Rule::default()
        }],
    );
    let mut alarm = Msg::new("acme.p1.s1", "disk", 500);
    alarm.kind = ContentKind::Alarm;
    alarm.severity = Some(Severity::Critical);
    assert_eq!(t.check(&alarm.subject()), Decision::Admit);
    alarm.severity = Some(Severity::Minor);
    assert!(wait_of(t.check(&alarm.subject())).is_some());
    let mut urgent = Msg::new("acme.p1", "inventory", 500);
    urgent.precedence = 9;
    assert_eq!(t.check(&urgent.subject()), Decision::Admit);
}

#[test]
fn the_throttle_document_round_trips_and_validates_against_its_dtd() {
    let cfg = ThrottleConfig {
        rule: vec![
            night_bulk(),
            Rule {
                name: "site-x".into(),
                customer: Some("acme".into()),
                per: Per::Customer,
                bytes_per_sec: Some(1_000_000),
                burst_secs: Some(2.5),
                quota_bytes: Some(10_000_000_000),
                quota_period: Some(Period::Day),
                exempt_severity: Some("major".into()),
                exempt_precedence: Some(8),
                messages_per_sec: Some(0.5),
                kind: Some("data".into()),
                component: Some("acme.p1".into()),
                ..Rule::default()
            },
        ],
        min_free_disk_mb: Some(512),
        max_bulk_transfers: Some(4),
    };
    let doc = rs_node::throttle::encode_throttle(&cfg);
    let back =
        rs_node::throttle::decode_throttle(&doc, &rs_protocol::codec::Limits::default()).unwrap();
    assert_eq!(back, cfg);
    rs_tests::assert_control_api_valid(
        &doc,
        &std::env::temp_dir().join(format!("rs-throttle-{}.xml", std::process::id())),
    );
}

#[test]
fn bulk_transfers_are_capped_and_ask_the_same_rules() {
    let c = FakeClock::at("2026-11-24T12:00:00Z"); // 13:00 in Berlin: outside night-bulk
    let cfg = ThrottleConfig {
        rule: vec![night_bulk()],
        max_bulk_transfers: Some(2),
        ..ThrottleConfig::default()
    };
    let t = Throttle::new(&cfg, c.clone(), None, None).unwrap();
    let upload = Msg::new("acme.p1", "bulk", 2_000_000_000);
    // By day the window refuses, and the refused transfer holds no place.
    let permit = || t.bulk_permit(&upload.component, upload.bytes, upload.precedence);
    assert!(permit().is_err());
    assert_eq!(t.bulk_transfers(), 0);
    c.set("2026-11-24T22:00:00Z"); // 23:00 in Berlin
    let p1 = permit().unwrap();
    let _p2 = permit().unwrap();
    match permit() {
        Err(rs_node::throttle::Held { why, .. }) => {
            assert!(why.contains("2 bulk transfers"), "{why}")
        }
        other => panic!("a third transfer at once: {other:?}"),
    }
    drop(p1);
    assert!(permit().is_ok());
}

#[test]
fn below_the_free_disk_floor_everything_waits() {
    let c = FakeClock::at("2026-11-24T12:00:00Z");
    let dir = std::env::temp_dir();
    // A floor above any disk's size: the data disk is always "too full".
    let cfg = ThrottleConfig {
        min_free_disk_mb: Some(u64::MAX / (2 << 20)),
        ..ThrottleConfig::default()
    };
    let t = Throttle::new(&cfg, c.clone(), None, Some(&dir)).unwrap();
    match t.check(&Msg::new("acme.p1", "inventory", 10).subject()) {
        Decision::Wait { why, .. } => assert!(why.contains("free on the data disk"), "{why}"),
        Decision::Admit => panic!("admitted below the disk floor"),
    }
    let cfg = ThrottleConfig {
        min_free_disk_mb: Some(1),
        ..ThrottleConfig::default()
    };
    let t = Throttle::new(&cfg, c.clone(), None, Some(&dir)).unwrap();
    assert_eq!(
        t.check(&Msg::new("acme.p1", "inventory", 10).subject()),
        Decision::Admit
    );
}

#[test]
fn bad_rules_are_refused_with_the_reason() {
    let c = FakeClock::at("2026-11-24T12:00:00Z");
    let bad = |r: Rule| {
        Throttle::new(
            &ThrottleConfig {
                rule: vec![r],
                ..ThrottleConfig::default()
            },
            c.clone(),
            None,
            None,
        )
        .unwrap_err()
    };
    let base = || Rule {
        name: "r".into(),
        messages_per_sec: Some(1.0),
        ..Rule::default()
    };
    assert!(
        bad(Rule {
            time_zone: Some("Mars/Olympus".into()),
            ..base()
        })
        .contains("Mars/Olympus")
    );
    assert!(
        bad(Rule {
            window: Some("25:00-06:00".into()),
            ..base()
        })
        .contains("window")
    );
    assert!(
        bad(Rule {
            messages_per_sec: Some(0.0),
            ..base()
        })
        .contains("above 0")
    );
    assert!(
        bad(Rule {
            name: "nothing".into(),
            ..Rule::default()
        })
        .contains("limits nothing")
    );
}

mod on_daemons {
    use std::collections::HashSet;
    use std::time::Duration;

    use rs_tests::deploy::{Deployment, Extra, proxy_metrics, server_metrics, wait_for};

    use crate::backchannel::{exe, tmp};
    use crate::backchannel_faults::rsctl;
    use crate::forward::{alarm, all_stored, assert_exactly_once, register};

    async fn send_alarms(socket: &std::path::Path, n: usize) -> HashSet<String> {
        let c = register(socket).await;
        let mut ids = HashSet::new();
        for i in 0..n {
            ids.insert(
                c.send("alarm", &alarm(&format!("throttled {i}"), None))
                    .await
                    .unwrap(),
            );
        }
        ids
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_throttled_sender_keeps_everything_and_delivers_it_later() {
        let dir = tmp("throttle-sender");
        let mut d = Deployment::new(&dir, exe()).unwrap();
        let a = d.appserver("127.0.0.1:0", "").unwrap();
        let s = d
            .proxy(
                "p1",
                "acme.p1",
                std::slice::from_ref(&a),
                &Extra {
                    tables: "[[throttle.rule]]\nname = \"slow\"\nmessages_per_sec = 25.0\n".into(),
                    ..Extra::default()
                },
            )
            .unwrap();
        let ids = send_alarms(&s, 150).await;
        assert!(
            all_stored(&dir, &ids, Duration::from_secs(60)),
            "not everything arrived"
        );
        assert_exactly_once(&dir, &ids);
        let pm = proxy_metrics(&s).await.unwrap();
        assert!(pm.get("throttle.held") > Some(&0), "{pm:?}");
        assert_eq!(pm.get("spool.dead_letters"), Some(&0));
        d.stop_all();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_throttled_higher_precedence_goes_first() {
        let dir = tmp("throttle-precedence");
        let mut d = Deployment::new(&dir, exe()).unwrap();
        let a = d.appserver("127.0.0.1:0", "").unwrap();
        let s = d
            .proxy(
                "p1",
                "acme.p1",
                std::slice::from_ref(&a),
                &Extra {
                    tables: "[[throttle.rule]]\nname = \"slow\"\nclass = \"monitoring\"\nmessages_per_sec = 10.0\n"
                        .into(),
                    ..Extra::default()
                },
            )
            .unwrap();
        let c = register(&s).await;
        let mut low = HashSet::new();
        for i in 0..40 {
            low.insert(
                c.send("alarm", &alarm(&format!("low {i}"), Some(2)))
                    .await
                    .unwrap(),
            );
        }
        let mut high = HashSet::new();
        for i in 0..5 {
            high.insert(
                c.send("alarm", &alarm(&format!("high {i}"), Some(9)))
                    .await
                    .unwrap(),
            );
        }
        let all: HashSet<String> = low.union(&high).cloned().collect();
        assert!(all_stored(&dir, &all, Duration::from_secs(60)));
        // In storage order, the urgent ones overtook most of the backlog.
        let order = rs_tests::deploy::stored_ids(&dir.join("appserver")).unwrap();
        let pos = |id: &String| order.iter().position(|x| x == id).unwrap();
        let last_high = high.iter().map(pos).max().unwrap();
        let low_after = low.iter().filter(|id| pos(id) > last_high).count();
        assert!(
            low_after >= 20,
            "only {low_after} of 40 low-precedence messages came after the urgent ones"
        );
        let pm = proxy_metrics(&s).await.unwrap();
        assert!(pm.get("throttle.held") > Some(&0));
        d.stop_all();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_throttled_forwarder_refuses_for_now_and_everything_arrives_later() {
        let dir = tmp("throttle-forwarder");
        let mut d = Deployment::new(&dir, exe()).unwrap();
        let (a, m) = d.server_and_mlm().unwrap();
        let s = d
            .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
            .unwrap();
        // Wait until both are known, then push a rule to the MLM through
        // the control API: "no more than 20 messages a second from acme".
        assert!(wait_for(Duration::from_secs(30), || {
            let (_, out, _) = rsctl(&a, &["components"]);
            out.contains("acme.m1") && out.contains("acme.p1")
        }));
        let (code, out, err) = rsctl(
            &a,
            &[
                "throttle",
                "set",
                "site-acme",
                "--customer",
                "acme",
                "--per",
                "customer",
                "--messages-per-sec",
                "20",
                "--to",
                "acme.m1",
                "--watch",
            ],
        );
        assert_eq!(code, 0, "{out}\n{err}");
        // The MLM restarted with the rule in its file.
        let cfg = rs_mlm::Config::load(&dir.join("mlm.toml")).unwrap();
        assert_eq!(cfg.throttle.rule[0].name, "site-acme");
        assert!(wait_for(Duration::from_secs(30), || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(async { server_metrics(&m).await.is_ok() })
            })
        }));

        let ids = send_alarms(&s, 150).await;
        assert!(
            all_stored(&dir, &ids, Duration::from_secs(90)),
            "not everything arrived"
        );
        assert_exactly_once(&dir, &ids);
        let mm = server_metrics(&m).await.unwrap();
        assert!(mm.get("messages.throttled") > Some(&0), "{mm:?}");
        assert!(mm.get("throttle.site-acme.held") > Some(&0), "{mm:?}");
        let pm = proxy_metrics(&s).await.unwrap();
        assert!(pm.get("upstream.retried") > Some(&0), "{pm:?}");
        assert_eq!(pm.get("spool.dead_letters"), Some(&0));
        d.stop_all();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_servers_throttle_is_set_at_run_time_holds_and_outlives_a_restart() {
        let dir = tmp("throttle-server");
        let mut d = Deployment::new(&dir, exe()).unwrap();
        let a = d.appserver("127.0.0.1:0", "").unwrap();
        let s = d
            .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
            .unwrap();
        let (code, out, err) = rsctl(
            &a,
            &[
                "throttle",
                "set",
                "trickle",
                "--class",
                "monitoring",
                "--messages-per-sec",
                "10",
            ],
        );
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("name=\"trickle\""), "{out}");
        // A bad rule is refused and changes nothing.
        let (code, _, err) = rsctl(
            &a,
            &[
                "throttle",
                "set",
                "bad",
                "--window",
                "22:00-06:00",
                "--time-zone",
                "Mars/Base",
            ],
        );
        assert_eq!(code, 1);
        assert!(err.contains("Mars/Base"), "{err}");

        let ids = send_alarms(&s, 80).await;
        assert!(
            all_stored(&dir, &ids, Duration::from_secs(60)),
            "not everything arrived"
        );
        assert_exactly_once(&dir, &ids);
        let am = server_metrics(&a).await.unwrap();
        assert!(am.get("messages.throttled") > Some(&0), "{am:?}");

        d.restart("appserver").unwrap();
        assert!(wait_for(Duration::from_secs(30), || rsctl(
            &a,
            &["throttle", "show"]
        )
        .0 == 0));
        let (_, out, _) = rsctl(&a, &["throttle", "show"]);
        assert!(
            out.contains("name=\"trickle\"") && !out.contains("bad"),
            "{out}"
        );
        let (code, out, _) = rsctl(&a, &["throttle", "remove", "trickle"]);
        assert_eq!(code, 0);
        assert!(out.contains("no throttle rules"), "{out}");
        d.stop_all();
    }

    /// One simulated proxy back after an outage: posts its backlog in
    /// envelopes of `batch`, obeying each reply's advice to wait, and
    /// re-sending what was not accepted. Returns (HTTP failures, messages
    /// answered retry, replies that advised a wait).
    async fn reconnecting_proxy(
        http: reqwest::Client,
        a: String,
        i: usize,
        backlog: usize,
        batch: usize,
    ) -> (u64, u64, u64) {
        use rs_protocol::model::*;
        let me = rs_protocol::RsId::new(format!("storm.p{i}")).unwrap();
        let mut pending: Vec<Message> = (0..backlog)
            .map(|k| {
                let mut m = rs_protocol::samples::alarm_of_size(i * backlog + k, 1024);
                if let Route::Source(src) = &mut m.header.route {
                    src.component = me.clone();
                    src.qos.expiry = None;
                }
                m.header.created = rs_protocol::Timestamp::now();
                m
            })
            .collect();
        let (mut failures, mut retried, mut advised) = (0, 0, 0);
        while !pending.is_empty() {
            let take: Vec<Message> = pending.iter().take(batch).cloned().collect();
            let mut w = rs_protocol::codec::EnvelopeWriter::new(&EnvelopeMeta::new(
                me.clone(),
                rs_protocol::Timestamp::now(),
            ));
            for m in &take {
                w.push(m);
            }
            let enc = w.finish();
            let r = http
                .post(format!("{}/rs/v1/envelope", rs_tests::deploy::base(&a)))
                .header("content-type", enc.content_type)
                .body(enc.body)
                .send()
                .await;
            let Ok(r) = r
                .map_err(|_| ())
                .and_then(|r| if r.status() == 200 { Ok(r) } else { Err(()) })
            else {
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            };
            let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
            let reply = rs_protocol::codec::decode_headers(
                &ct,
                r.bytes().await.unwrap(),
                &rs_protocol::codec::Limits::default(),
            )
            .unwrap();
            let accepted: std::collections::HashSet<_> = reply
                .meta
                .outcomes
                .iter()
                .filter(|(_, o)| *o == rs_protocol::Outcome::Accepted)
                .map(|(id, _)| id.clone())
                .collect();
            retried += (take.len() - accepted.len()) as u64;
            pending.retain(|m| !accepted.contains(&m.header.id));
            if let Some(wait) = reply.meta.advice.and_then(|a| a.resume_after) {
                advised += 1;
                tokio::time::sleep(wait).await;
            }
        }
        (failures, retried, advised)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_proxies_reconnecting_at_once_drain_without_refusals() {
        let dir = tmp("storm");
        let mut d = Deployment::plain(&dir, exe()).unwrap();
        let a = d.appserver("127.0.0.1:0", "busy_envelopes = 16").unwrap();
        const PROXIES: usize = 1000;
        const BACKLOG: usize = 20;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(PROXIES)
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..PROXIES)
            .map(|i| tokio::spawn(reconnecting_proxy(http.clone(), a.clone(), i, BACKLOG, 10)))
            .collect();
        let (mut failures, mut retried, mut advised) = (0, 0, 0);
        for t in tasks {
            let (f, r, ad) = t.await.unwrap();
            failures += f;
            retried += r;
            advised += ad;
        }
        let ids = rs_tests::deploy::stored_ids(&dir.join("appserver")).unwrap();
        let storm = ids.len();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), storm, "nothing stored twice");
        assert!(storm >= PROXIES * BACKLOG, "{storm} stored");
        // The server had room: it refused nothing and no POST failed; it
        // slowed the callers down instead.
        assert_eq!((failures, retried), (0, 0));
        assert!(advised > 0, "the server advised waits under load");
        let am = server_metrics(&a).await.unwrap();
        assert_eq!(am.get("messages.retried"), Some(&0));
        assert!(am.get("replies.advised_wait") > Some(&0));
        d.stop_all();
    }
}
