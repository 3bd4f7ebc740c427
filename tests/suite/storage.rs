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
