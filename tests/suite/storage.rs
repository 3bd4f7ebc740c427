//! The storage layer on both engines: the same scenarios against an SQLite
//! file and a throwaway PostgreSQL server.

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
    use rs_tests::postgres::Postgres;

    const MAX_ATTEMPTS: u32 = 2;
    /// Two subscriptions: one takes class `monitoring` only, one takes all.
    const SUBS: [(&str, Option<&str>); 2] = [("disk", Some("monitoring")), ("all", None)];

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
            let s = Subscription {
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
            };
            store.subscribe(s, now).await.unwrap();
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
        let rt = tokio::runtime::Runtime::new().unwrap();
        let case = std::sync::atomic::AtomicU32::new(0);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 24,
            ..ProptestConfig::default()
        });
        runner
            .run(&proptest::collection::vec(op(), 1..40), |ops| {
                let i = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let at = match engine {
                    "sqlite" => {
                        let dir = std::env::temp_dir()
                            .join(format!("rs-taskq-{}-{i}", std::process::id()));
                        let _ = std::fs::remove_dir_all(&dir);
                        Location::Sqlite(dir.join("appserver.db"))
                    }
                    _ => Location::Postgres {
                        url: Postgres::shared().database("taskq"),
                        schema: "appserver".into(),
                    },
                };
                rt.block_on(run(at, ops))
            })
            .unwrap();
    }

    #[test]
    fn the_task_queue_follows_its_model_on_sqlite() {
        check("sqlite");
    }

    #[test]
    fn the_task_queue_follows_its_model_on_postgresql() {
        check("postgres");
    }
}
