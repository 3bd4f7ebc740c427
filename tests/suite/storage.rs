//! The storage layer on both engines: the same scenarios against an SQLite
//! file and a throwaway PostgreSQL server.

use std::time::Duration;

use rs_store::db::{Db, DbError, DbState, Txn};
use rs_store::params;
use rs_store::sql::{Conn, Location, Migration};
use rs_tests::postgres::Postgres;

/// Both engines, each a fresh, empty store.
fn engines(name: &str) -> Vec<(&'static str, Location)> {
    let dir = std::env::temp_dir().join(format!("rs-storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    vec![
        ("sqlite", Location::Sqlite(dir.join("t.db"))),
        (
            "postgres",
            Location::Postgres {
                url: Postgres::shared().database(name),
                schema: "t".into(),
            },
        ),
    ]
}

const V1: Migration = Migration {
    version: 1,
    name: "items",
    apply: |c| {
        c.batch(
            "CREATE TABLE items (
                 id    TEXT   PRIMARY KEY,
                 n     BIGINT NOT NULL,
                 body  BYTEA,
                 note  TEXT
             )"
            .replace(
                "BYTEA",
                match c.engine() {
                    rs_store::sql::Engine::Sqlite => "BLOB",
                    rs_store::sql::Engine::Postgres => "BYTEA",
                },
            )
            .as_str(),
        )
    },
};

const V2: Migration = Migration {
    version: 2,
    name: "items.tag",
    apply: |c| c.batch("ALTER TABLE items ADD COLUMN tag TEXT NOT NULL DEFAULT 'none'"),
};

#[test]
fn values_round_trip_and_conflicts_count_the_same_on_both_engines() {
    for (engine, at) in engines("roundtrip") {
        let mut c = Conn::open(&at, &[V1]).unwrap();
        let body: Vec<u8> = (0..=255u8).chain([0, 0, 1]).collect();
        let n = c
            .exec(
                "INSERT INTO items (id, n, body, note) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO NOTHING",
                params!["é ünïcode ✓", i64::MIN, body, None::<String>],
            )
            .unwrap();
        assert_eq!(n, 1, "{engine}");
        let again = c
            .exec(
                "INSERT INTO items (id, n) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                params!["é ünïcode ✓", 5i64],
            )
            .unwrap();
        assert_eq!(again, 0, "{engine}: a conflict changes nothing");
        let (n, b, note): (i64, Vec<u8>, Option<String>) = c
            .one(
                "SELECT n, body, note FROM items WHERE id = ?1",
                params!["é ünïcode ✓"],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((n, b, note), (i64::MIN, body.clone(), None), "{engine}");
        // RETURNING and upserts, as the stores use them.
        let id: String = c
            .one(
                "INSERT INTO items (id, n) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET n = items.n + ?2 RETURNING id",
                params!["é ünïcode ✓", 7i64],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(id, "é ünïcode ✓");
        let n: i64 = c
            .one("SELECT n FROM items", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(n, i64::MIN + 7, "{engine}");
        assert!(
            c.row("SELECT n FROM items WHERE id = ?1", params!["nope"], |r| {
                r.get::<i64>(0)
            })
            .unwrap()
            .is_none()
        );
        // A bad statement is an error that names the engine's reason.
        let e = c
            .exec("INSERT INTO nowhere VALUES (?1)", params![1i64])
            .unwrap_err();
        assert!(e.to_string().contains("nowhere"), "{engine}: {e}");
    }
}

#[test]
fn migrations_run_once_in_order_and_a_newer_schema_is_refused() {
    for (engine, at) in engines("migrations") {
        let mut c = Conn::open(&at, &[V1]).unwrap();
        c.exec("INSERT INTO items (id, n) VALUES ('a', 1)", params![])
            .unwrap();
        drop(c);
        // The next release adds a column: the row is kept and gets it.
        let mut c = Conn::open(&at, &[V1, V2]).unwrap();
        assert_eq!(c.schema_version().unwrap(), 2, "{engine}");
        let tag: String = c
            .one("SELECT tag FROM items WHERE id = 'a'", params![], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(tag, "none", "{engine}");
        drop(c);
        // Opening again applies nothing twice.
        Conn::open(&at, &[V1, V2]).unwrap();
        // The older release refuses the newer database and leaves it be.
        let e = Conn::open(&at, &[V1]).unwrap_err().to_string();
        assert!(e.contains("newer release"), "{engine}: {e}");
        let mut c = Conn::open(&at, &[V1, V2]).unwrap();
        let n: i64 = c
            .one("SELECT COUNT(*) FROM items", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "{engine}");
    }
}

/// Farm members started together on a new database: every one opens it
/// (the schema, its version table and the migrations made once, under one
/// lock), none fails on another's concurrent creation.
#[test]
fn members_opening_a_new_database_at_once_all_succeed() {
    for round in 0..6 {
        let at = Location::Postgres {
            url: Postgres::shared().database("together"),
            schema: format!("s{round}"),
        };
        let start = std::sync::Barrier::new(4);
        let results: Vec<Result<i64, String>> = std::thread::scope(|s| {
            let opened: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        Conn::open(&at, &[V1, V2])
                            .and_then(|mut c| c.schema_version())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            opened.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(r, Ok(2), "round {round}");
        }
    }
}

/// The members of an MLM farm starting together on a new database: each
/// opens the farm's queue (one records the owner, the others find it).
#[test]
fn mlm_farm_members_opening_a_new_queue_at_once_all_succeed() {
    for round in 0..4 {
        let at = Location::Postgres {
            url: Postgres::shared().database("queuetogether"),
            schema: format!("mlm_acme_m{round}"),
        };
        let owner = rs_protocol::RsId::new(format!("acme.m{round}")).unwrap();
        let start = std::sync::Barrier::new(3);
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let opened: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        rs_store::outbox::Outbox::open(&at, &owner)
                            .map(drop)
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            opened.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(r, Ok(()), "round {round}");
        }
    }
}

struct State(Conn);
impl DbState for State {
    type Saved = ();
    fn txn(&mut self) -> &mut dyn Txn {
        &mut self.0
    }
    fn save(&self) {}
    fn restore(&mut self, (): ()) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_undoes_only_the_failing_job_on_both_engines() {
    for (engine, at) in engines("groupcommit") {
        let db = Db::start("rs-test", State(Conn::open(&at, &[V1]).unwrap())).unwrap();
        let mut jobs = tokio::task::JoinSet::new();
        for i in 0..100i64 {
            let db = db.clone();
            jobs.spawn(async move {
                db.write(move |s| {
                    s.0.exec(
                        "INSERT INTO items (id, n) VALUES (?1, ?2)",
                        params![format!("k{i}"), i],
                    )?;
                    if i % 10 == 3 {
                        return Err(DbError::Sql("this job fails".into()));
                    }
                    Ok(())
                })
                .await
                .is_ok()
            });
        }
        let mut ok = 0;
        while let Some(r) = jobs.join_next().await {
            ok += usize::from(r.unwrap());
        }
        assert_eq!(ok, 90, "{engine}");
        let (n, sum): (i64, i64) = db
            .read(|s| {
                s.0.one(
                    "SELECT COUNT(*), CAST(SUM(n) AS BIGINT) FROM items",
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await
            .unwrap();
        let want: i64 = (0..100).filter(|i| i % 10 != 3).sum();
        assert_eq!(
            (n, sum),
            (90, want),
            "{engine}: the failed jobs left nothing"
        );
    }
}

/// The collector's task queue, model-based: random sequences of what the
/// server does with it (store messages, expand them into tasks, claim the
/// next task, complete or fail a claim, replay the failed) run against the
/// real store on each engine and against a plain in-memory model of the
/// rules (one task per message and matching subscription; only a
/// subscription's oldest unfinished task may be claimed; a claim that
/// fails `MAX_ATTEMPTS` times is failed; a replay makes the failed ready).
/// Runs a model-based test's cases on `engine`: each case a sequence of
/// `ops` against a fresh store (an SQLite file `name`-<pid>-<case>, or a
/// new PostgreSQL database `name` with the store's `schema`).
fn model_cases<O: std::fmt::Debug, F>(
    engine: &str,
    name: &str,
    schema: &str,
    op: impl proptest::strategy::Strategy<Value = O>,
    len: std::ops::Range<usize>,
    run: impl Fn(Location, Vec<O>) -> F,
) where
    F: std::future::Future<Output = Result<(), proptest::test_runner::TestCaseError>>,
{
    let rt = tokio::runtime::Runtime::new().unwrap();
    let case = std::sync::atomic::AtomicU32::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: std::env::var("RS_MODEL_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(24),
        ..proptest::test_runner::Config::default()
    });
    runner
        .run(&proptest::collection::vec(op, len), |ops| {
            let i = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let at = match engine {
                "sqlite" => {
                    let dir =
                        std::env::temp_dir().join(format!("rs-{name}-{}-{i}", std::process::id()));
                    let _ = std::fs::remove_dir_all(&dir);
                    Location::Sqlite(dir.join("store.db"))
                }
                _ => Location::Postgres {
                    url: Postgres::shared().database(name),
                    schema: schema.into(),
                },
            };
            rt.block_on(run(at, ops))
        })
        .unwrap();
}

mod task_queue {
    use std::collections::HashMap;
    use std::time::Duration;

    use proptest::prelude::*;
    use rs_appserver::collector::Claimed;
    use rs_appserver::store::{Incoming, Store};
    use rs_appserver::subscription::{Delivery, Subscription};
    use rs_protocol::Timestamp;
    use rs_protocol::samples::alarm_of_size;
    use rs_store::sql::Location;

    const MAX_ATTEMPTS: u32 = 2;
    /// Two subscriptions: one takes class `monitoring` only, one takes all.
    const SUBS: [(&str, Option<&str>); 2] = [("disk", Some("monitoring")), ("all", None)];

    /// A webhook subscription to `class` (all classes: `None`), to a
    /// port nobody listens on.
    fn webhook_sub(name: &str, class: Option<&str>) -> Subscription {
        Subscription {
            id: 0,
            name: name.into(),
            class: class.map(Into::into),
            subclass: None,
            customer: None,
            source: None,
            kind: None,
            min_severity: None,
            delivery: Delivery::Webhook("http://127.0.0.1:9/".into()),
            from_seq: 0,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Store `n` alarms, of class `monitoring` or `inventory`.
        Store(usize, bool),
        Expand,
        Claim,
        /// Complete (true) or fail the `i`-th outstanding claim.
        Finish(usize, bool),
        Replay,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (1usize..4, any::<bool>()).prop_map(|(n, m)| Op::Store(n, m)),
            2 => Just(Op::Expand),
            3 => Just(Op::Claim),
            3 => (0usize..4, any::<bool>()).prop_map(|(i, ok)| Op::Finish(i, ok)),
            1 => Just(Op::Replay),
        ]
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Task {
        sub: &'static str,
        message: String,
        state: &'static str,
        attempts: u32,
    }

    #[derive(Debug, Default)]
    struct Model {
        unexpanded: Vec<(String, bool)>,
        tasks: Vec<Task>,
    }

    impl Model {
        fn expand(&mut self) {
            for (id, monitoring) in std::mem::take(&mut self.unexpanded) {
                for (sub, class) in SUBS {
                    if class.is_none() || monitoring {
                        self.tasks.push(Task {
                            sub,
                            message: id.clone(),
                            state: "ready",
                            attempts: 0,
                        });
                    }
                }
            }
        }

        /// The claim the rules allow: of each subscription's oldest
        /// unfinished task, the oldest that is ready.
        fn claim(&mut self) -> Option<Task> {
            let mut heads: Vec<usize> = SUBS
                .iter()
                .filter_map(|(s, _)| {
                    self.tasks
                        .iter()
                        .position(|t| t.sub == *s && (t.state == "ready" || t.state == "taken"))
                })
                .filter(|&i| self.tasks[i].state == "ready")
                .collect();
            heads.sort_unstable();
            let i = *heads.first()?;
            let t = &mut self.tasks[i];
            t.state = "taken";
            t.attempts += 1;
            Some(t.clone())
        }

        fn finish(&mut self, message: &str, sub: &str, ok: bool) {
            if let Some(t) = self
                .tasks
                .iter_mut()
                .find(|t| t.message == message && t.sub == sub && t.state == "taken")
            {
                t.state = if ok {
                    "done"
                } else if t.attempts >= MAX_ATTEMPTS {
                    "failed"
                } else {
                    "ready"
                };
            }
        }

        fn replay(&mut self) {
            for t in self.tasks.iter_mut().filter(|t| t.state == "failed") {
                t.state = "ready";
                t.attempts = 0;
            }
        }
    }

    fn alarm(monitoring: bool, n: usize) -> Incoming {
        let mut m = alarm_of_size(n, 600);
        if !monitoring {
            m.header.class = rs_protocol::model::Classification::new("inventory", "hw");
        }
        Incoming::new(m.to_raw())
    }

    async fn run(at: Location, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let store = Store::open(&at).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let now = Timestamp::now();
        for (name, class) in SUBS {
            store
                .subscribe(webhook_sub(name, class), now)
                .await
                .unwrap();
        }
        let mut model = Model::default();
        let mut claims: Vec<Claimed> = Vec::new();
        let mut n = 0;
        for op in ops {
            match op {
                Op::Store(k, monitoring) => {
                    let batch: Vec<Incoming> = (0..k)
                        .map(|_| {
                            n += 1;
                            alarm(monitoring, n)
                        })
                        .collect();
                    for b in &batch {
                        model
                            .unexpanded
                            .push((b.msg.header.id.as_str().to_owned(), monitoring));
                    }
                    store.ingest(batch, now).await.unwrap();
                }
                Op::Expand => {
                    store.expand(1000, now).await.unwrap();
                    model.expand();
                }
                Op::Claim => {
                    let real = store
                        .claim("test".into(), now, Duration::from_secs(3600))
                        .await
                        .unwrap();
                    let want = model.claim();
                    let got = real
                        .as_ref()
                        .map(|c| (c.sub.name.clone(), c.message.clone(), c.attempts));
                    let want_t = want
                        .as_ref()
                        .map(|t| (t.sub.to_owned(), t.message.clone(), t.attempts));
                    prop_assert_eq!(got, want_t, "claim");
                    claims.extend(real);
                }
                Op::Finish(i, ok) => {
                    if claims.is_empty() {
                        continue;
                    }
                    let c = claims.remove(i % claims.len());
                    if ok {
                        store.complete_task(&c, "test".into(), now).await.unwrap();
                    } else {
                        store
                            .fail_task(
                                &c,
                                "test".into(),
                                "no".into(),
                                now,
                                Duration::ZERO,
                                MAX_ATTEMPTS,
                            )
                            .await
                            .unwrap();
                    }
                    model.finish(&c.message, &c.sub.name, ok);
                }
                Op::Replay => {
                    store.replay(None, now).await.unwrap();
                    model.replay();
                }
            }
        }
        // Every task, in every state, as the model has it.
        let mut real: HashMap<(String, String), (String, u32)> = HashMap::new();
        for state in ["ready", "taken", "done", "failed"] {
            for t in store.tasks(state.into(), 10_000).await.unwrap() {
                real.insert((t.sub, t.message), (t.state, t.attempts));
            }
        }
        let want: HashMap<(String, String), (String, u32)> = model
            .tasks
            .iter()
            .map(|t| {
                (
                    (t.sub.to_owned(), t.message.clone()),
                    (t.state.to_owned(), t.attempts),
                )
            })
            .collect();
        prop_assert_eq!(real, want);
        Ok(())
    }

    fn check(engine: &str) {
        super::model_cases(engine, "taskq", "appserver", op(), 1..40, run);
    }

    #[test]
    fn the_task_queue_follows_its_model_on_sqlite() {
        check("sqlite");
    }

    #[test]
    fn the_task_queue_follows_its_model_on_postgresql() {
        check("postgres");
    }

    /// With no subscription the expander moves past what is stored
    /// without making tasks; a subscription made later gets the messages
    /// stored after it, and only those, on both engines.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscription_gets_what_is_stored_after_it_even_after_expansions_without_any() {
        for (engine, at) in super::engines("expandnone") {
            let store = Store::open(&at).unwrap();
            let now = Timestamp::now();
            store
                .ingest((1..=3).map(|n| alarm(true, n)).collect(), now)
                .await
                .unwrap();
            let (passed, tasks) = store.expand(1000, now).await.unwrap();
            assert_eq!((passed, tasks), (3, 0), "{engine}");
            assert_eq!(store.expand(1000, now).await.unwrap(), (0, 0), "{engine}");
            store
                .subscribe(webhook_sub("later", None), now)
                .await
                .unwrap();
            let after: Vec<Incoming> = (4..=5).map(|n| alarm(true, n)).collect();
            let want: Vec<String> = after
                .iter()
                .map(|i| i.msg.header.id.as_str().to_owned())
                .collect();
            store.ingest(after, now).await.unwrap();
            assert_eq!(store.expand(1000, now).await.unwrap(), (2, 2), "{engine}");
            let mut got = Vec::new();
            while let Some(c) = store
                .claim("test".into(), now, Duration::from_secs(3600))
                .await
                .unwrap()
            {
                store.complete_task(&c, "test".into(), now).await.unwrap();
                got.push(c.message);
            }
            assert_eq!(got, want, "{engine}");
        }
    }
}

/// A new server store has 16 KiB pages (a 2 KB message shares its page
/// with others instead of taking one to itself, written whole to the WAL
/// and again by the checkpoint); a store file made with 4 KiB pages keeps
/// them and works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_store_has_large_pages_and_an_old_one_keeps_its_own() {
    use rs_appserver::store::{Incoming, Store};
    let dir = std::env::temp_dir().join(format!("rs-storage-pages-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let page_size = |file: &std::path::Path| -> i64 {
        #[allow(clippy::disallowed_methods)]
        let c = rusqlite::Connection::open(file).unwrap();
        c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap()
    };
    let now = rs_protocol::Timestamp::now();
    for (file, made_before, want) in [("new.db", false, 16384), ("old.db", true, 4096)] {
        let file = dir.join(file);
        if made_before {
            let c = rs_store::db::open(&file).unwrap();
            c.execute_batch("CREATE TABLE before (x INTEGER)").unwrap();
        }
        let store = Store::open(&Location::Sqlite(file.clone())).unwrap();
        let m = rs_protocol::samples::alarm_of_size(1, 2048).to_raw();
        let id = m.header.id.as_str().to_owned();
        store.ingest(vec![Incoming::new(m)], now).await.unwrap();
        drop(store);
        assert_eq!(page_size(&file), want, "{}", file.display());
        let mut c = rs_store::sql::Conn::connect(&Location::Sqlite(file.clone())).unwrap();
        let ids: Vec<String> = c
            .rows("SELECT id FROM messages", rs_store::params![], |r| r.get(0))
            .unwrap();
        assert_eq!(ids, vec![id], "{}", file.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An MLM's `outbox.db` from the releases before schema versions (and
/// before the columns later ones added at start) is adopted in place: its queued message is handed out, its routes and
/// received IDs hold, and it is at the current version, its owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_of_the_release_before_versions_is_migrated_with_its_messages() {
    use rs_protocol::codec::encode_header;
    use rs_protocol::{RsId, Timestamp};
    let dir = std::env::temp_dir().join(format!("rs-outbox-legacy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outbox.db");
    let mut m = rs_protocol::samples::alarm_of_size(1, 600);
    m.header.route = rs_protocol::Route::Destination(rs_protocol::model::Destination::new(
        vec![RsId::new("acme.p1").unwrap()],
        None,
    ));
    let raw = m.to_raw();
    let now = Timestamp::now().as_millis();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        // The tables as releases before download offers and claimed actions
        // made them (common/store/src/outbox.rs until 5fa08a5 added, at
        // every start, the columns bulk, held and state): the migration
        // adds them.
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox (
                 id TEXT NOT NULL, hop TEXT NOT NULL, created INTEGER NOT NULL,
                 expiry INTEGER, offered INTEGER, kind TEXT NOT NULL,
                 content_type TEXT NOT NULL, header BLOB NOT NULL, content BLOB NOT NULL,
                 PRIMARY KEY (id, hop));
             CREATE INDEX IF NOT EXISTS outbox_hop ON outbox (hop, created);
             CREATE TABLE IF NOT EXISTS routes (
                 component TEXT PRIMARY KEY, hop TEXT NOT NULL, updated INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS received (id TEXT PRIMARY KEY, at INTEGER NOT NULL);",
        )
        .unwrap();
        c.execute(
            "INSERT INTO outbox (id, hop, created, kind, content_type, header, content)
             VALUES (?1, 'acme.p1', ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                raw.header.id.as_str(),
                now,
                raw.kind.as_str(),
                raw.content_type.to_string(),
                encode_header(&raw.header, raw.kind, raw.data.as_ref()),
                &raw.content[..]
            ],
        )
        .unwrap();
        c.execute(
            "INSERT INTO routes VALUES ('acme.p1', 'acme.p1', ?1)",
            rusqlite::params![now],
        )
        .unwrap();
        c.execute(
            "INSERT INTO received (id, at) VALUES (?1, ?2)",
            rusqlite::params![raw.header.id.as_str(), now],
        )
        .unwrap();
    }
    let m1 = RsId::new("acme.m1").unwrap();
    let q = rs_store::outbox::Outbox::open(&Location::Sqlite(path.clone()), &m1).unwrap();
    let p1 = RsId::new("acme.p1").unwrap();
    assert_eq!(
        q.route(RsId::new("acme.p1").unwrap()).await.unwrap(),
        Some(p1.clone())
    );
    // Received before: offered again from upstream, it is not queued twice.
    let ids = q
        .accept(vec![(p1.clone(), raw.clone())], Timestamp::now())
        .await
        .unwrap();
    assert_eq!(ids, vec![raw.header.id.clone()]);
    let offered = q
        .offer(p1.clone(), Timestamp::now(), Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(offered.len(), 1);
    assert_eq!(offered[0].header.id, raw.header.id);
    assert_eq!(offered[0].content, raw.content);
    let delivered = q
        .acknowledge(p1.clone(), vec![raw.header.id.clone()])
        .await
        .unwrap();
    assert_eq!(delivered, vec![(raw.header.id.clone(), p1)]);
    assert_eq!(q.pending().await.unwrap(), 0);
    drop(q);
    let mut c = Conn::connect(&Location::Sqlite(path.clone())).unwrap();
    assert_eq!(
        c.schema_version().unwrap(),
        rs_store::outbox::MIGRATIONS.len() as i64
    );
    drop(c);
    // It is acme.m1's now: another MLM is refused it, and says why.
    let e = rs_store::outbox::Outbox::open(
        &Location::Sqlite(path.clone()),
        &RsId::new("acme.m2").unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("the back-channel queue of acme.m1, not of acme.m2"),
        "{e}"
    );
    assert!(rs_store::outbox::Outbox::open(&Location::Sqlite(path), &m1).is_ok());
}

/// The back-channel queue (rs_store::outbox, the MLM's; a farm's on
/// PostgreSQL) against a plain model: what an offer hands out, in what
/// order and how often, what an acknowledgement removes and reports as
/// delivered, that a message received again is not queued again, that
/// held download offers wait for their file, and what a sweep drops.
mod back_channel_queue {
    use std::collections::{BTreeSet, HashMap};
    use std::time::Duration;

    use proptest::prelude::*;
    use rs_protocol::codec::RawMessage;
    use rs_protocol::model::Destination;
    use rs_protocol::samples::alarm_of_size;
    use rs_protocol::{Route, RsId, Timestamp};
    use rs_store::outbox::Outbox;
    use rs_store::sql::Location;

    const HOPS: [&str; 3] = ["acme.p1", "acme.p2", "acme.m9"];
    /// Offered again after this long without an acknowledgement.
    const AGAIN: Duration = Duration::from_secs(10);
    /// Received IDs are remembered this long.
    const REMEMBER: Duration = Duration::from_secs(60);
    const LIMIT: usize = 3;
    const T0: i64 = 1_800_000_000_000;

    #[derive(Debug, Clone)]
    enum Op {
        /// A message from upstream (a new one, or again the `i`-th one
        /// seen), with copies for the hops in the mask, each copy final
        /// for its hop or not, expiring after so many seconds, held for
        /// the download offer `bulk`.
        Accept {
            again: Option<usize>,
            hops: u8,
            direct: bool,
            expires: Option<u64>,
            bulk: Option<u8>,
        },
        Offer(usize),
        /// The hop acknowledges the `i`-th, `j`-th... of what it was last
        /// handed.
        Ack(usize, Vec<usize>),
        Release(u8),
        Sweep,
        /// The clock moves on.
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (
                prop::option::weighted(0.2, 0usize..8),
                1u8..8,
                any::<bool>(),
                prop::option::weighted(0.3, 1u64..40),
                prop::option::weighted(0.2, 0u8..2)
            )
                .prop_map(|(again, hops, direct, expires, bulk)| Op::Accept {
                    again,
                    hops,
                    direct,
                    expires,
                    bulk
                }),
            4 => (0usize..3).prop_map(Op::Offer),
            3 => (0usize..3, prop::collection::vec(0usize..4, 0..3)).prop_map(|(h, i)| Op::Ack(h, i)),
            1 => (0u8..2).prop_map(Op::Release),
            1 => Just(Op::Sweep),
            2 => (1u64..25).prop_map(Op::Tick),
        ]
    }

    #[derive(Debug, Clone)]
    struct Copy {
        id: String,
        hop: &'static str,
        expiry: Option<i64>,
        offered: Option<i64>,
        held: bool,
        bulk: Option<String>,
        direct: bool,
    }

    #[derive(Debug, Default)]
    struct Model {
        copies: Vec<Copy>,
        received: HashMap<String, i64>,
    }

    impl Model {
        fn offer(&mut self, hop: &str, now: i64) -> Vec<String> {
            let before = now - AGAIN.as_millis() as i64;
            let mut out = Vec::new();
            for c in self.copies.iter_mut() {
                if out.len() == LIMIT {
                    break;
                }
                if c.hop == hop
                    && c.offered.is_none_or(|o| o < before)
                    && c.expiry.is_none_or(|e| e > now)
                    && !c.held
                {
                    c.offered = Some(now);
                    out.push(c.id.clone());
                }
            }
            out
        }
    }

    fn message(hop: &str, direct: bool, expiry: Option<i64>, n: usize) -> RawMessage {
        let mut m = alarm_of_size(n, 600);
        let to = if direct { hop } else { "acme.p7" };
        m.header.route = Route::Destination(Destination::new(
            vec![RsId::new(to).unwrap()],
            expiry.and_then(Timestamp::from_millis),
        ));
        m.to_raw()
    }

    async fn run(at: Location, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let q = Outbox::open(&at, &RsId::new("acme.m1").unwrap())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut model = Model::default();
        let mut now = T0;
        let mut seen: Vec<(rs_protocol::MessageId, u8, bool, Option<i64>)> = Vec::new();
        let mut handed: HashMap<&str, Vec<String>> = HashMap::new();
        let ts = |ms: i64| Timestamp::from_millis(ms).unwrap();
        for (n, op) in ops.into_iter().enumerate() {
            // Each step a millisecond on: copies are ordered by creation.
            now += 1;
            match op {
                Op::Accept {
                    again,
                    hops,
                    direct,
                    expires,
                    bulk,
                } => {
                    let (id, hops, direct, expiry) = match again.and_then(|i| seen.get(i)) {
                        Some(s) => s.clone(),
                        None => {
                            let expiry = expires.map(|s| now + s as i64 * 1000);
                            let id = rs_protocol::MessageId::generate();
                            seen.push((id.clone(), hops, direct, expiry));
                            (id, hops, direct, expiry)
                        }
                    };
                    let mut copies = Vec::new();
                    for (i, hop) in HOPS.iter().enumerate() {
                        if hops & (1 << i) != 0 {
                            let mut m = message(hop, direct, expiry, n);
                            m.header.id = id.clone();
                            copies.push((RsId::new(*hop).unwrap(), m));
                        }
                    }
                    let bulk = bulk.map(|b| (format!("sha{b}"), true));
                    let got = q
                        .accept_bulk(copies.clone(), bulk.clone(), ts(now))
                        .await
                        .unwrap();
                    prop_assert_eq!(got, vec![id.clone()], "accept acknowledges the message");
                    if !model.received.contains_key(id.as_str()) {
                        model.received.insert(id.as_str().to_owned(), now);
                        for (hop, _) in &copies {
                            let hop = HOPS.iter().find(|h| **h == hop.as_str()).unwrap();
                            // Forgotten as received but still queued: the
                            // copy there stays as it is.
                            if model
                                .copies
                                .iter()
                                .any(|c| c.id == id.as_str() && c.hop == *hop)
                            {
                                continue;
                            }
                            model.copies.push(Copy {
                                id: id.as_str().to_owned(),
                                hop,
                                expiry,
                                offered: None,
                                held: bulk.is_some(),
                                bulk: bulk.as_ref().map(|b| b.0.clone()),
                                direct,
                            });
                        }
                    }
                }
                Op::Offer(h) => {
                    let hop = HOPS[h];
                    let got: Vec<String> = q
                        .offer(RsId::new(hop).unwrap(), ts(now), AGAIN, LIMIT)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|m| m.header.id.as_str().to_owned())
                        .collect();
                    let want = model.offer(hop, now);
                    prop_assert_eq!(&got, &want, "offer to {} at {}", hop, now - T0);
                    handed.insert(hop, got);
                }
                Op::Ack(h, picks) => {
                    let hop = HOPS[h];
                    let last = handed.get(hop).cloned().unwrap_or_default();
                    let ids: BTreeSet<String> =
                        picks.iter().filter_map(|i| last.get(*i).cloned()).collect();
                    let got: BTreeSet<String> = q
                        .acknowledge(
                            RsId::new(hop).unwrap(),
                            ids.iter()
                                .map(|i| rs_protocol::MessageId::new(i.clone()).unwrap())
                                .collect(),
                        )
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|(id, _)| id.as_str().to_owned())
                        .collect();
                    let mut want = BTreeSet::new();
                    model.copies.retain(|c| {
                        let acked = c.hop == hop && ids.contains(&c.id);
                        if acked && c.direct {
                            want.insert(c.id.clone());
                        }
                        !acked
                    });
                    prop_assert_eq!(got, want, "delivered, acknowledged by {}", hop);
                }
                Op::Release(b) => {
                    let bulk = format!("sha{b}");
                    let got = q.release(bulk.clone()).await.unwrap();
                    let mut want = 0;
                    for c in model.copies.iter_mut() {
                        if c.held && c.bulk.as_deref() == Some(bulk.as_str()) {
                            c.held = false;
                            want += 1;
                        }
                    }
                    prop_assert_eq!(got, want, "released");
                }
                Op::Sweep => {
                    let got = q.sweep(ts(now), REMEMBER).await.unwrap();
                    let before = model.copies.len();
                    model.copies.retain(|c| c.expiry.is_none_or(|e| e > now));
                    let horizon = now - REMEMBER.as_millis() as i64;
                    model.received.retain(|_, at| *at >= horizon);
                    prop_assert_eq!(got, (before - model.copies.len()) as u64, "swept");
                }
                Op::Tick(s) => now += s as i64 * 1000,
            }
        }
        prop_assert_eq!(
            q.pending().await.unwrap(),
            model.copies.len() as u64,
            "pending"
        );
        for b in 0..2u8 {
            let bulk = format!("sha{b}");
            let want = model
                .copies
                .iter()
                .filter(|c| c.bulk.as_deref() == Some(bulk.as_str()))
                .count() as u64;
            prop_assert_eq!(q.bulk_pending(bulk).await.unwrap(), want, "bulk pending");
        }
        Ok(())
    }

    fn check(engine: &str) {
        super::model_cases(engine, "outboxq", "mlm_acme_m1", op(), 1..60, run);
    }

    #[test]
    fn the_back_channel_queue_follows_its_model_on_sqlite() {
        check("sqlite");
    }

    #[test]
    fn the_back_channel_queue_follows_its_model_on_postgresql() {
        check("postgres");
    }
}

/// The spool, against a plain in-memory model of its rules, on both
/// engines (the proxy's and a single MLM's SQLite spool; an MLM farm's
/// shared spool on PostgreSQL): what is taken for sending and in which
/// order (precedence, then age; due; not expired; not in flight), what
/// each settlement does, the sweep (expired, aged out), the dedupe window,
/// eviction when full (less important first, oldest first) and refusal,
/// dead letters replayed and discarded, and every count and fate.
mod spool_model {
    use std::collections::HashMap;
    use std::time::Duration;

    use proptest::prelude::*;
    use rs_protocol::codec::{RawMessage, encode_header};
    use rs_protocol::model::Qos;
    use rs_protocol::outcome::{Code, Reason};
    use rs_protocol::samples::alarm_of_size;
    use rs_protocol::{MessageId, Route, Timestamp};
    use rs_store::spool::postgres::PgSpool;
    use rs_store::spool::sqlite::SqliteSpool;
    use rs_store::spool::{AnySpool, Enqueued, Fate, Settle, Spool, SpoolConfig};
    use rs_store::sql::Location;

    /// Messages older than this age out.
    const MAX_AGE: Duration = Duration::from_secs(120);
    /// About twelve messages fit.
    const MAX_BYTES: u64 = 12_000;
    /// In the past of the wall clock: a shared spool's renewed claims
    /// (wall clock plus the lease) then never lapse within a case, as the
    /// SQLite spool's in-flight messages never do.
    const T0: i64 = 1_700_000_000_000;

    #[derive(Debug, Clone)]
    enum Op {
        /// Messages: each new, or again the `i`-th one made; precedence,
        /// persistent, expiring after so many seconds.
        Enqueue(Vec<(Option<usize>, u8, bool, Option<u64>)>),
        Dequeue(usize),
        /// Settle the `i`-th of what the last dequeue handed out (how: 0
        /// delivered, 1 retry in `s` seconds, 2 release, 3 defer `s`
        /// seconds, 4 dead, 5 expired).
        Settle(Vec<(usize, u8, u64)>),
        Sweep,
        Replay,
        Discard,
        Tick(u64),
        /// Close the spool and open it again (SQLite: what is in flight is
        /// offered again; PostgreSQL: nothing, the claims held by lease).
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let msg = (
            prop::option::weighted(0.15, 0usize..10),
            0u8..3,
            any::<bool>(),
            prop::option::weighted(0.3, 1u64..60),
        );
        prop_oneof![
            4 => prop::collection::vec(msg, 1..4).prop_map(Op::Enqueue),
            4 => (1usize..5).prop_map(Op::Dequeue),
            4 => prop::collection::vec((0usize..5, 0u8..6, 0u64..30), 1..4).prop_map(Op::Settle),
            1 => Just(Op::Sweep),
            1 => Just(Op::Replay),
            1 => Just(Op::Discard),
            2 => (1u64..40).prop_map(Op::Tick),
            1 => Just(Op::Reopen),
        ]
    }

    #[derive(Debug, Clone)]
    struct M {
        id: String,
        precedence: u8,
        persistent: bool,
        expiry: Option<i64>,
        created: i64,
        bytes: u64,
        attempts: u32,
        next_attempt: i64,
        inflight: bool,
    }

    #[derive(Debug, Default)]
    struct Model {
        /// In the order stored (the spool's sequence).
        spool: Vec<M>,
        /// ID -> (when, the message as it was).
        dead: HashMap<String, (i64, M)>,
        /// ID -> why, for each drop (more than one: fate not checked).
        drops: HashMap<String, Vec<String>>,
        seen: HashMap<String, i64>,
        delivered: u64,
        expired: u64,
        aged_out: u64,
        evicted: u64,
        refused: u64,
        duplicates: u64,
    }

    impl Model {
        fn total(&self) -> u64 {
            self.spool.iter().map(|m| m.bytes).sum()
        }

        fn drop_rec(&mut self, id: &str, why: &str) {
            self.drops.entry(id.into()).or_default().push(why.into());
        }

        /// `insert` of the spool: room made, or refused.
        fn insert(&mut self, mut m: M, now: i64) -> Enqueued {
            let total = self.total();
            if total + m.bytes > MAX_BYTES {
                let mut order: Vec<usize> = (0..self.spool.len())
                    .filter(|&i| {
                        let v = &self.spool[i];
                        !v.persistent & m.persistent
                            || (v.persistent == m.persistent && v.precedence <= m.precedence)
                    })
                    .collect();
                order.sort_by_key(|&i| (self.spool[i].persistent, self.spool[i].precedence, i));
                let mut freed = 0;
                let mut victims = Vec::new();
                for i in order {
                    if total - freed + m.bytes <= MAX_BYTES {
                        break;
                    }
                    freed += self.spool[i].bytes;
                    victims.push(i);
                }
                if total - freed + m.bytes > MAX_BYTES {
                    self.refused += 1;
                    return Enqueued::Refused(Reason {
                        code: Code::known("disk-full"),
                        text: String::new(),
                    });
                }
                victims.sort_unstable();
                for i in victims.into_iter().rev() {
                    let v = self.spool.remove(i);
                    self.drop_rec(&v.id, "evicted");
                    self.evicted += 1;
                }
            }
            if self.spool.iter().any(|s| s.id == m.id) {
                self.duplicates += 1;
                return Enqueued::Duplicate;
            }
            m.created = now;
            m.attempts = 0;
            m.next_attempt = 0;
            m.inflight = false;
            self.spool.push(m);
            Enqueued::Stored
        }

        fn dequeue(&mut self, max: usize, now: i64) -> Vec<String> {
            let mut due: Vec<usize> = (0..self.spool.len())
                .filter(|&i| {
                    let m = &self.spool[i];
                    !m.inflight && m.next_attempt <= now && m.expiry.is_none_or(|e| e > now)
                })
                .collect();
            due.sort_by_key(|&i| (std::cmp::Reverse(self.spool[i].precedence), i));
            due.truncate(max);
            due.into_iter()
                .map(|i| {
                    self.spool[i].inflight = true;
                    self.spool[i].id.clone()
                })
                .collect()
        }
    }

    fn kinds(how: u8, s: u64, now: i64) -> Settle {
        let at = Timestamp::from_millis(now + s as i64 * 1000).unwrap();
        match how {
            0 => Settle::Delivered,
            1 => Settle::Retry { at },
            2 => Settle::Release,
            3 => Settle::Defer { at },
            4 => Settle::Dead(Reason {
                code: Code::known("invalid"),
                text: "refused".into(),
            }),
            _ => Settle::Expired,
        }
    }

    fn open(at: &Location, case: &str) -> AnySpool {
        let file = match at {
            Location::Sqlite(p) => p.clone(),
            Location::Postgres { .. } => std::path::PathBuf::from(case),
        };
        let mut cfg = SpoolConfig::new(file);
        cfg.max_bytes = MAX_BYTES;
        cfg.max_age = MAX_AGE;
        cfg.dedupe_window = Some(MAX_AGE);
        cfg.lease = Duration::from_secs(86_400);
        // Segments of a few messages: the log rotates, compacts and
        // deletes what it no longer needs all through a case.
        cfg.segment_bytes = 4096;
        match at {
            Location::Sqlite(_) => AnySpool::Sqlite(SqliteSpool::open(cfg).unwrap()),
            Location::Postgres { .. } => AnySpool::Postgres(PgSpool::open(cfg, at, "m1").unwrap()),
        }
    }

    async fn run(at: Location, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut q = open(&at, "spool");
        let mut model = Model::default();
        let mut now = T0;
        let ts = |ms: i64| Timestamp::from_millis(ms).unwrap();
        // Every message made: (its raw form, its model entry).
        let mut made: Vec<(RawMessage, M)> = Vec::new();
        let mut handed: Vec<String> = Vec::new();
        for (n, op) in ops.into_iter().enumerate() {
            now += 1;
            match op {
                Op::Enqueue(msgs) => {
                    let mut raws = Vec::new();
                    let mut entries = Vec::new();
                    for (k, (again, precedence, persistent, expires)) in
                        msgs.into_iter().enumerate()
                    {
                        let (raw, m) = match again.and_then(|i| made.get(i)) {
                            Some(x) => x.clone(),
                            None => {
                                let mut msg = alarm_of_size(n * 8 + k, 600 + 50 * (k % 3));
                                let expiry = expires.map(|s| now + s as i64 * 1000);
                                if let Route::Source(s) = &mut msg.header.route {
                                    s.qos = Qos {
                                        expiry: expiry.and_then(Timestamp::from_millis),
                                        precedence,
                                        persistent,
                                    };
                                }
                                let raw = msg.to_raw();
                                let header =
                                    encode_header(&raw.header, raw.kind, raw.data.as_ref());
                                let m = M {
                                    id: raw.header.id.as_str().to_owned(),
                                    precedence,
                                    persistent,
                                    expiry,
                                    created: 0,
                                    bytes: (header.len() + raw.content.len()) as u64,
                                    attempts: 0,
                                    next_attempt: 0,
                                    inflight: false,
                                };
                                made.push((raw.clone(), m.clone()));
                                (raw, m)
                            }
                        };
                        raws.push(raw);
                        entries.push(m);
                    }
                    let got = q.enqueue(raws, ts(now)).await.unwrap();
                    let mut want = Vec::new();
                    for m in entries {
                        if model.seen.contains_key(&m.id) {
                            model.duplicates += 1;
                            want.push(Enqueued::Duplicate);
                            continue;
                        }
                        model.seen.insert(m.id.clone(), now);
                        want.push(model.insert(m, now));
                    }
                    let strip = |v: Vec<Enqueued>| -> Vec<String> {
                        v.into_iter()
                            .map(|e| match e {
                                Enqueued::Refused(r) => format!("refused {}", r.code.as_str()),
                                other => format!("{other:?}"),
                            })
                            .collect()
                    };
                    prop_assert_eq!(strip(got), strip(want), "enqueue at step {}", n);
                }
                Op::Dequeue(max) => {
                    let got: Vec<String> = q
                        .dequeue(max, 1 << 30, ts(now), false)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|s| s.msg.header.id.as_str().to_owned())
                        .collect();
                    let want = model.dequeue(max, now);
                    prop_assert_eq!(&got, &want, "dequeue at step {}", n);
                    handed = got;
                }
                Op::Settle(picks) => {
                    let mut results = Vec::new();
                    let mut done = std::collections::HashSet::new();
                    for (i, how, s) in picks {
                        let Some(id) = handed.get(i) else { continue };
                        if !done.insert(id.clone()) {
                            continue;
                        }
                        // Only what is in flight (handed out, not settled).
                        let Some(k) = model.spool.iter().position(|m| m.id == *id && m.inflight)
                        else {
                            continue;
                        };
                        let settle = kinds(how, s, now);
                        match &settle {
                            Settle::Delivered => {
                                model.spool.remove(k);
                                model.delivered += 1;
                            }
                            Settle::Retry { at } => {
                                let m = &mut model.spool[k];
                                m.attempts += 1;
                                m.next_attempt = at.as_millis();
                                m.inflight = false;
                            }
                            Settle::Release => model.spool[k].inflight = false,
                            Settle::Defer { at } => {
                                let m = &mut model.spool[k];
                                m.next_attempt = at.as_millis();
                                m.inflight = false;
                            }
                            Settle::Dead(_) => {
                                let m = model.spool.remove(k);
                                model.dead.entry(m.id.clone()).or_insert((now, m));
                            }
                            Settle::Expired => {
                                let m = model.spool.remove(k);
                                model.drop_rec(&m.id, "expired");
                                model.expired += 1;
                            }
                        }
                        results.push((MessageId::new(id.clone()).unwrap(), settle));
                    }
                    q.settle(results, ts(now)).await.unwrap();
                }
                Op::Sweep => {
                    let got = q.sweep(ts(now)).await.unwrap();
                    let mut want = 0;
                    let oldest = now - MAX_AGE.as_millis() as i64;
                    for (why, gone) in [
                        (
                            "expired",
                            &(|m: &M| m.expiry.is_some_and(|e| e <= now)) as &dyn Fn(&M) -> bool,
                        ),
                        ("aged-out", &|m: &M| m.created < oldest),
                    ] {
                        let (out, keep): (Vec<M>, Vec<M>) = std::mem::take(&mut model.spool)
                            .into_iter()
                            .partition(|m| !m.inflight && gone(m));
                        model.spool = keep;
                        for m in &out {
                            model.drop_rec(&m.id, why);
                        }
                        if why == "expired" {
                            model.expired += out.len() as u64;
                        } else {
                            model.aged_out += out.len() as u64;
                        }
                        want += out.len() as u64;
                    }
                    model.seen.retain(|_, at| *at >= oldest);
                    prop_assert_eq!(got, want, "swept at step {}", n);
                }
                Op::Replay => {
                    let got = q.replay_dead(None, ts(now)).await.unwrap();
                    let mut dead: Vec<(i64, M)> = model.dead.drain().map(|(_, v)| v).collect();
                    dead.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
                    let (mut back, mut stay) = (0, 0);
                    for (at, m) in dead {
                        match model.insert(m.clone(), now) {
                            Enqueued::Refused(_) => {
                                stay += 1;
                                model.dead.insert(m.id.clone(), (at, m));
                            }
                            _ => back += 1,
                        }
                    }
                    prop_assert_eq!(got, (back, stay), "replayed at step {}", n);
                }
                Op::Discard => {
                    let got = q.discard_dead(None, ts(now)).await.unwrap();
                    let ids: Vec<String> = model.dead.drain().map(|(id, _)| id).collect();
                    for id in &ids {
                        model.drop_rec(id, "discarded");
                    }
                    prop_assert_eq!(got, ids.len() as u64, "discarded at step {}", n);
                }
                Op::Tick(s) => now += s as i64 * 1000,
                Op::Reopen => {
                    if matches!(at, Location::Sqlite(_)) {
                        drop(q);
                        q = open(&at, "spool");
                        for m in &mut model.spool {
                            m.inflight = false;
                        }
                    }
                }
            }
            let st = q.stats().await.unwrap();
            prop_assert_eq!(
                st.messages,
                model.spool.len() as u64,
                "messages at step {}",
                n
            );
            prop_assert_eq!(st.bytes, model.total(), "bytes at step {}", n);
            prop_assert_eq!(
                st.oldest.map(|t| t.as_millis()),
                model.spool.iter().map(|m| m.created).min(),
                "oldest at step {}",
                n
            );
            prop_assert_eq!(
                st.dead_letters,
                model.dead.len() as u64,
                "dead at step {}",
                n
            );
        }
        let st = q.stats().await.unwrap();
        prop_assert_eq!(
            (
                st.delivered_total,
                st.expired_total,
                st.aged_out_total,
                st.evicted_total,
                st.refused_total,
                st.duplicates_total
            ),
            (
                model.delivered,
                model.expired,
                model.aged_out,
                model.evicted,
                model.refused,
                model.duplicates
            ),
            "counts: delivered, expired, aged out, evicted, refused, duplicates"
        );
        let want_due = model
            .spool
            .iter()
            .filter(|m| !m.inflight)
            .map(|m| m.next_attempt)
            .min();
        prop_assert_eq!(
            q.next_due().await.unwrap().map(Timestamp::as_millis),
            want_due,
            "next due"
        );
        for (raw, _) in &made {
            let id = raw.header.id.as_str();
            let want = if model.spool.iter().any(|m| m.id == id) {
                Fate::Waiting
            } else if model.dead.contains_key(id) {
                Fate::Dead(Reason {
                    code: Code::known("invalid"),
                    text: "refused".into(),
                })
            } else {
                match model.drops.get(id).map(Vec::as_slice) {
                    Some([why]) => Fate::Dropped(why.clone()),
                    Some(_) => continue,
                    None => Fate::Gone,
                }
            };
            prop_assert_eq!(
                q.fate(raw.header.id.clone()).await.unwrap(),
                want,
                "fate of {}",
                id
            );
        }
        Ok(())
    }

    fn check(engine: &str) {
        super::model_cases(engine, "spoolmodel", "mlm_acme_m1_spool", op(), 1..60, run);
    }

    #[test]
    fn the_spool_follows_its_model_on_sqlite() {
        check("sqlite");
    }

    #[test]
    fn the_shared_spool_follows_its_model_on_postgresql() {
        check("postgres");
    }

    /// A full spool still takes its tier's status messages (a heartbeat)
    /// in the headroom above `max_bytes`, and only those: the centre keeps
    /// seeing a site whose spool is full (`rsctl components --at-risk`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_still_takes_its_status_messages_on_both_engines() {
        use rs_protocol::control::SUB_HEARTBEAT;
        use rs_protocol::control_messages::status_message;
        for (engine, at) in super::engines("headroom") {
            let q = open(&at, "headroom");
            let now = Timestamp::now();
            // Full of persistent alarms as important as a heartbeat (a
            // heartbeat cannot evict them; the next one evicts the first).
            let alarm = |i: usize, persistent: bool| {
                let mut m = alarm_of_size(i, 600);
                if let Route::Source(s) = &mut m.header.route {
                    s.qos = Qos {
                        expiry: None,
                        precedence: 2,
                        persistent,
                    };
                }
                m.to_raw()
            };
            let mut i = 0;
            while q.stats().await.unwrap().evicted_total == 0 {
                q.enqueue(vec![alarm(i, true)], now).await.unwrap();
                i += 1;
            }
            assert!(i >= 10, "{engine}: {i} fitted");
            let beat = status_message(
                rs_protocol::RsId::new("acme.p1").unwrap(),
                SUB_HEARTBEAT,
                &rs_protocol::samples::status_tree(),
                now,
                Duration::from_secs(120),
                2,
            );
            assert_eq!(
                q.enqueue(vec![beat.to_raw()], now).await.unwrap(),
                [Enqueued::Stored],
                "{engine}: the heartbeat is taken"
            );
            assert!(
                matches!(
                    q.enqueue(vec![alarm(i + 1, false)], now).await.unwrap()[0],
                    Enqueued::Refused(_)
                ),
                "{engine}: an alarm is not"
            );
            let st = q.stats().await.unwrap();
            assert_eq!(
                st.messages, i as u64,
                "{engine}: the alarms left and the heartbeat"
            );
            assert!(st.bytes > MAX_BYTES, "{engine}: {}", st.bytes);
        }
    }
}

/// Two members of a farm on one shared spool: taking messages at the same
/// time they never take the same one, and between them take all; a
/// member's claims hold while it lives (renewed), lapse when it dies (the
/// other takes its messages when its `next_due` says), and are released
/// when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_shared_spool_never_take_the_same_message_and_a_dead_ones_claims_lapse() {
    use rs_protocol::samples::alarm_of_size;
    use rs_protocol::{MessageId, Timestamp};
    use rs_store::spool::postgres::PgSpool;
    use rs_store::spool::{Settle, Spool, SpoolConfig};
    use std::collections::HashSet;

    let at = Location::Postgres {
        url: Postgres::shared().database("sharedspool"),
        schema: "mlm_acme_m1_spool".into(),
    };
    let open = |member: &str| {
        let mut cfg = SpoolConfig::new("unused");
        cfg.lease = Duration::from_secs(2);
        PgSpool::open(cfg, &at, member).unwrap()
    };
    let (m1, m2) = (open("m1"), open("m2"));
    // Not expiring (the samples' expiry is in the past of the wall clock).
    let msgs = |n: usize| -> Vec<_> {
        (0..n)
            .map(|i| {
                let mut m = alarm_of_size(i, 700);
                if let rs_protocol::Route::Source(s) = &mut m.header.route {
                    s.qos.expiry = None;
                }
                m.to_raw()
            })
            .collect()
    };
    let all: HashSet<String> = {
        let batch = msgs(400);
        let ids = batch
            .iter()
            .map(|m| m.header.id.as_str().to_owned())
            .collect();
        m1.enqueue(batch, Timestamp::now()).await.unwrap();
        ids
    };
    let drain = |s: PgSpool| {
        tokio::spawn(async move {
            let mut took = Vec::new();
            loop {
                let b = s
                    .dequeue(7, 1 << 20, Timestamp::now(), false)
                    .await
                    .unwrap();
                if b.is_empty() {
                    return took;
                }
                let ids: Vec<MessageId> = b.iter().map(|x| x.msg.header.id.clone()).collect();
                took.extend(ids.iter().map(|i| i.as_str().to_owned()));
                let done = ids.into_iter().map(|i| (i, Settle::Delivered)).collect();
                s.settle(done, Timestamp::now()).await.unwrap();
                // As a sender's POST would: the other member goes on.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let (a, b) = (drain(m1.clone()), drain(m2.clone()));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both members took messages: {} and {}",
        a.len(),
        b.len()
    );
    let (sa, sb): (HashSet<_>, HashSet<_>) =
        (a.iter().cloned().collect(), b.iter().cloned().collect());
    assert_eq!(
        sa.len() + sb.len(),
        a.len() + b.len(),
        "a member took one twice"
    );
    assert!(sa.is_disjoint(&sb), "both members took the same message");
    assert_eq!(&sa | &sb, all, "between them they took every message");

    // Claims held by a live member are renewed past the lease.
    m1.enqueue(msgs(5), Timestamp::now()).await.unwrap();
    let held = m1
        .dequeue(10, 1 << 20, Timestamp::now(), false)
        .await
        .unwrap();
    assert_eq!(held.len(), 5);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        m2.dequeue(10, 1 << 20, Timestamp::now(), false)
            .await
            .unwrap()
            .is_empty(),
        "a live member's claims lapsed"
    );
    // Its process ends: the claims lapse within the lease, and the other
    // member's next_due says when.
    drop(m1);
    let due = m2
        .next_due()
        .await
        .unwrap()
        .expect("the held messages are due some time");
    assert!(
        due.as_millis() <= Timestamp::now().as_millis() + 2_000,
        "next_due does not name the lease's end"
    );
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let taken = m2
        .dequeue(10, 1 << 20, Timestamp::now(), false)
        .await
        .unwrap();
    assert_eq!(
        taken.len(),
        5,
        "the dead member's messages were not taken over"
    );

    // A member that starts again releases what its name held.
    let m2b = open("m2");
    let m3 = open("m3");
    let again = m3
        .dequeue(10, 1 << 20, Timestamp::now(), false)
        .await
        .unwrap();
    assert_eq!(
        again.len(),
        5,
        "a restarted member's old claims were not released"
    );
    drop(m2b);
}

/// The CA's records on both engines: a certificate recorded is listed
/// (by name too), revoked once (again: `Already`; an unknown serial:
/// `Unknown`), its revocation counted; revocation lists are numbered
/// upwards; a `ca.db` written by the release before versions (no
/// `rs_schema`, its certificates in it) is adopted with them, and copied
/// into PostgreSQL records that hold nothing yet.
#[test]
fn the_cas_records_behave_the_same_on_both_engines_and_an_old_ca_db_is_kept() {
    use rs_store::certs::{Cert, CertRecords, Revoked};
    let dir = std::env::temp_dir().join(format!("rs-storage-cadb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // What the release before wrote (pki.rs's DDL then) and one record.
    let old = dir.join("ca.db");
    {
        #[allow(clippy::disallowed_methods)]
        let c = rusqlite::Connection::open(&old).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS certs (
                 serial TEXT PRIMARY KEY, name TEXT NOT NULL, customer TEXT NOT NULL,
                 role TEXT NOT NULL, issued_at INTEGER NOT NULL, not_after INTEGER NOT NULL,
                 revoked_at INTEGER, reason TEXT);
             CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             INSERT INTO certs VALUES ('0A1B', 'acme.p1', 'acme', 'component', 100, 200, NULL, NULL);
             INSERT INTO meta VALUES ('crl_number', 41);",
        )
        .unwrap();
    }
    let kept = CertRecords::open(Location::Sqlite(old.clone()));
    assert_eq!(kept.list(None).unwrap()[0].serial, "0A1B");
    let (_, n) = kept.for_crl().unwrap();
    assert_eq!(n, 42, "the old file's CRL number goes on");

    let cert = |serial: &str, name: &str, at: i64| Cert {
        serial: serial.into(),
        name: name.into(),
        customer: "acme".into(),
        role: "component".into(),
        not_after: at + 1000,
        issued_at: at,
        revoked_at: None,
        reason: None,
    };
    for (engine, at) in engines("carecords") {
        let r = CertRecords::open(at.clone());
        r.check_writable().unwrap();
        if engine == "postgres" {
            assert_eq!(
                r.take_in(&kept).unwrap(),
                1,
                "{engine}: the old records copied"
            );
            assert_eq!(r.take_in(&kept).unwrap(), 0, "{engine}: copied once");
            let (_, n) = r.for_crl().unwrap();
            assert_eq!(n, 43, "{engine}: the CRL number goes on after adoption");
        } else {
            r.record(&cert("0A1B", "acme.p1", 100)).unwrap();
        }
        r.record(&cert("0C2D", "acme.p2", 300)).unwrap();
        r.record(&cert("0E3F", "acme.p2", 400)).unwrap();
        assert!(
            r.record(&cert("0E3F", "acme.p2", 400)).is_err(),
            "{engine}: a serial twice"
        );
        let all: Vec<String> = r
            .list(None)
            .unwrap()
            .into_iter()
            .map(|c| c.serial)
            .collect();
        assert_eq!(all, ["0E3F", "0C2D", "0A1B"], "{engine}: newest first");
        assert_eq!(r.list(Some("acme.p2")).unwrap().len(), 2, "{engine}");
        assert_eq!(r.revocations().unwrap(), (0, 0), "{engine}");
        assert_eq!(
            r.revoke("0C2D", 500, "test").unwrap(),
            Revoked::Now,
            "{engine}"
        );
        assert_eq!(
            r.revoke("0C2D", 600, "test").unwrap(),
            Revoked::Already,
            "{engine}"
        );
        assert_eq!(
            r.revoke("FFFF", 600, "test").unwrap(),
            Revoked::Unknown,
            "{engine}"
        );
        assert_eq!(r.revocations().unwrap(), (1, 500), "{engine}");
        let (revoked, a) = r.for_crl().unwrap();
        let (_, b) = r.for_crl().unwrap();
        assert_eq!(revoked, [("0C2D".to_owned(), 500)], "{engine}");
        assert!(b > a, "{engine}: CRL numbers grow");
        let c = &r.list(Some("acme.p2")).unwrap()[1];
        assert_eq!(
            (c.revoked_at, c.reason.as_deref()),
            (Some(500), Some("test")),
            "{engine}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Files written by the releases before schema versions (the same tables,
/// no `rs_schema`), with what they hold: the proxy's spool, registry and
/// bulk store, the MLM's aggregation queue and a throttle's usage counters
/// are each adopted in place at version 1, nothing lost. (Each file is written by the store
/// itself and its version record removed: exactly what the code before
/// versions left.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_the_release_before_versions_are_adopted_with_what_they_hold() {
    use rs_node::throttle::{SqlUsage, UsageRow, UsageStore as _};
    use rs_protocol::Timestamp;
    use rs_store::spool::sqlite::SqliteSpool;
    use rs_store::spool::{Spool as _, SpoolConfig};
    let dir = std::env::temp_dir().join(format!("rs-storage-unversioned-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let unversion = |file: &std::path::Path| {
        #[allow(clippy::disallowed_methods)]
        let c = rusqlite::Connection::open(file).unwrap();
        c.execute_batch("DROP TABLE rs_schema").unwrap();
    };
    let version = |file: &std::path::Path| -> i64 {
        let mut c = Conn::connect(&Location::Sqlite(file.to_owned())).unwrap();
        c.schema_version().unwrap()
    };

    // The spool, with three messages waiting.
    let file = dir.join("spool.db");
    let now = Timestamp::now();
    let msgs: Vec<_> = (0..3)
        .map(|i| {
            let mut m = rs_protocol::samples::alarm_of_size(i, 800);
            if let rs_protocol::Route::Source(s) = &mut m.header.route {
                s.qos.expiry = None;
            }
            m.to_raw()
        })
        .collect();
    let ids: Vec<String> = msgs
        .iter()
        .map(|m| m.header.id.as_str().to_owned())
        .collect();
    {
        let s = SqliteSpool::open(SpoolConfig::new(&file)).unwrap();
        s.enqueue(msgs, now).await.unwrap();
    }
    unversion(&file);
    assert_eq!(version(&file), 0);
    let s = SqliteSpool::open(SpoolConfig::new(&file)).unwrap();
    let got: Vec<String> = s
        .dequeue(10, 1 << 20, now, false)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.msg.header.id.as_str().to_owned())
        .collect();
    assert_eq!(got, ids, "the old spool's messages");
    drop(s);
    assert_eq!(version(&file), 1);

    // The aggregation queue, with an alarm in a window.
    let file = dir.join("mlm.db");
    let at = Location::Sqlite(file.clone());
    let member = rs_mlm::aggregate::Member {
        id: "01a0000000000000000000000000aggr".into(),
        received: now.as_millis(),
        severity: rs_protocol::Severity::Major,
        precedence: 3,
        persistent: true,
        expiry: None,
        source: "acme.p1".into(),
        class: "monitoring".into(),
        subclass: "disk".into(),
        text: "disk full".into(),
    };
    {
        let q = rs_mlm::aggregate::AggregationQueue::open(&at).unwrap();
        q.add(vec![(0, "g".into(), member)]).await.unwrap();
    }
    unversion(&file);
    let q = rs_mlm::aggregate::AggregationQueue::open(&at).unwrap();
    assert_eq!(q.pending().await.unwrap(), 1, "the old window's alarm");
    drop(q);
    assert_eq!(version(&file), 1);

    // A throttle's usage counters.
    let file = dir.join("throttle.db");
    let at = Location::Sqlite(file.clone());
    let row = UsageRow {
        rule: "daily".into(),
        key: String::new(),
        period_start: now.as_millis(),
        bytes: 123_456,
        messages: 7,
    };
    SqlUsage::open(&at)
        .unwrap()
        .add(std::slice::from_ref(&row))
        .unwrap();
    unversion(&file);
    let usage = SqlUsage::open(&at).unwrap();
    let rows = usage.load(0).unwrap();
    assert!(
        rows.iter()
            .any(|r| r.rule == "daily" && r.bytes == 123_456 && r.messages == 7),
        "the old counters: {rows:?}"
    );
    drop(usage);
    assert_eq!(version(&file), 1);

    // The proxy's registry, with an integrator and its allocated ID.
    let file = dir.join("registry.db");
    let me = rs_protocol::RsId::new("acme.p1").unwrap();
    let first = {
        let r = rs_proxy::registry::Registry::open(&file, me.clone()).unwrap();
        r.register_integrator("nagios".into(), "4.5".into(), "linux".into())
            .await
            .unwrap()
    };
    unversion(&file);
    let r = rs_proxy::registry::Registry::open(&file, me.clone()).unwrap();
    let again: Vec<_> = r.integrators().await.unwrap();
    assert_eq!(again, vec![first], "the old registry's integrator");
    drop(r);
    assert_eq!(version(&file), 1);

    // The proxy's bulk store (uploads and downloads in one file).
    let file = dir.join("bulk.db");
    drop(rs_proxy::bulk::Uploads::open(&file, None).unwrap());
    unversion(&file);
    drop(rs_proxy::bulk::Uploads::open(&file, None).unwrap());
    assert_eq!(version(&file), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
