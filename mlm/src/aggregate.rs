//! The aggregation queue (seed 004: "accept the message, store it in a
//! processing queue, process this queue when the control triggers are
//! reached, create a new message aggregating the queued messages, delete
//! the queue and send the new message").
//!
//! Members are stored durably before the MLM answers `accepted`. When a
//! group's window has passed, its summary alarm goes into the MLM's spool
//! and the members are deleted. The summary's ID is derived from the first
//! member's, so a crash between the two steps makes the second attempt a
//! duplicate rather than a second summary.

use std::time::Duration;

use rs_protocol::model::*;
use rs_protocol::{MessageId, RsId, Timestamp};
use rs_store::db::{Db, DbError};
use rs_store::params;
use rs_store::sql::{Conn, Engine, Location, Migration};

/// The queue's schema changes, in order (append only). On SQLite version
/// 1 adopts the `mlm.db` of releases before versions as it is; on
/// PostgreSQL (a farm's) it creates the table.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "baseline",
    apply: |c| match c.engine() {
        Engine::Sqlite => c.batch(SQLITE),
        Engine::Postgres => c.batch(POSTGRES),
    },
}];

const SQLITE: &str = "
CREATE TABLE IF NOT EXISTS aggregation (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    rule       INTEGER NOT NULL,
    grp        TEXT    NOT NULL,
    id         TEXT    NOT NULL UNIQUE,
    received   INTEGER NOT NULL,
    severity   INTEGER NOT NULL,
    precedence INTEGER NOT NULL,
    persistent INTEGER NOT NULL,
    expiry     INTEGER,
    source     TEXT    NOT NULL,
    class      TEXT    NOT NULL,
    subclass   TEXT    NOT NULL,
    text       TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS aggregation_group ON aggregation (rule, grp, seq);
";

const POSTGRES: &str = "
CREATE TABLE aggregation (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule       BIGINT NOT NULL,
    grp        TEXT   NOT NULL,
    id         TEXT   NOT NULL UNIQUE,
    received   BIGINT NOT NULL,
    severity   BIGINT NOT NULL,
    precedence BIGINT NOT NULL,
    persistent BIGINT NOT NULL,
    expiry     BIGINT,
    source     TEXT   NOT NULL,
    class      TEXT   NOT NULL,
    subclass   TEXT   NOT NULL,
    text       TEXT   NOT NULL
);
CREATE INDEX aggregation_group ON aggregation (rule, grp, seq);
";

/// One aggregated alarm, as kept.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub received: i64,
    pub severity: Severity,
    pub precedence: u8,
    pub persistent: bool,
    pub expiry: Option<i64>,
    pub source: String,
    pub class: String,
    pub subclass: String,
    pub text: String,
}

/// A group whose window has passed.
#[derive(Debug, Clone)]
pub struct Group {
    pub rule: usize,
    pub group: String,
    pub members: Vec<Member>,
}

/// Handle to the queue; cheap to clone. On PostgreSQL it is a farm's:
/// every member adds what passes through it, and the farm's leader alone
/// turns due groups into summaries (`Mlm::flush_aggregates`).
#[derive(Debug, Clone)]
pub struct AggregationQueue {
    db: Db<Conn>,
}

fn rank(s: Severity) -> i64 {
    Severity::ALL.iter().position(|x| *x == s).unwrap_or(4) as i64
}

impl AggregationQueue {
    /// Opens the queue at `at` (`mlm.db`, or a farm's schema), migrating
    /// its schema in place.
    pub fn open(at: &Location) -> Result<Self, DbError> {
        // Off the async workers, as every PostgreSQL open (rs_store::sql).
        let conn = std::thread::scope(|s| {
            s.spawn(|| Conn::open(at, MIGRATIONS))
                .join()
                .unwrap_or_else(|_| Err(DbError::Sql("opening the queue panicked".into())))
        })?;
        Ok(AggregationQueue {
            db: Db::start("rs-mlm-aggregation", conn)?,
        })
    }

    /// Adds messages to their groups (rule index, group key), durably.
    pub async fn add(&self, items: Vec<(usize, String, Member)>) -> Result<(), DbError> {
        self.db
            .write(move |c| {
                for (rule, grp, m) in items {
                    c.exec(
                        "INSERT INTO aggregation (rule, grp, id, received, severity, precedence, persistent,
                                                  expiry, source, class, subclass, text)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                         ON CONFLICT (id) DO NOTHING",
                        params![
                            rule, grp, m.id, m.received, rank(m.severity), m.precedence,
                            m.persistent, m.expiry, m.source, m.class, m.subclass, m.text
                        ],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// Groups whose window (per rule) has passed since their first member.
    pub async fn due(&self, now: Timestamp, windows: Vec<Duration>) -> Result<Vec<Group>, DbError> {
        self.db
            .read(move |c| {
                let rows = c.rows(
                    "SELECT rule, grp, id, received, severity, precedence, persistent, expiry, source,
                            class, subclass, text
                     FROM aggregation ORDER BY rule, grp, seq",
                    params![],
                    |r| {
                        Ok((
                            r.get::<usize>(0)?,
                            r.get::<String>(1)?,
                            Member {
                                id: r.get(2)?,
                                received: r.get(3)?,
                                severity: Severity::ALL
                                    .get(r.get::<usize>(4)?)
                                    .copied()
                                    .unwrap_or(Severity::Info),
                                precedence: r.get(5)?,
                                persistent: r.get(6)?,
                                expiry: r.get(7)?,
                                source: r.get(8)?,
                                class: r.get(9)?,
                                subclass: r.get(10)?,
                                text: r.get(11)?,
                            },
                        ))
                    },
                )?;
                let mut groups: Vec<Group> = Vec::new();
                for (rule, grp, m) in rows {
                    match groups.last_mut() {
                        Some(g) if g.rule == rule && g.group == grp => g.members.push(m),
                        _ => groups.push(Group {
                            rule,
                            group: grp,
                            members: vec![m],
                        }),
                    }
                }
                groups.retain(|g| {
                    let window = windows.get(g.rule).copied().unwrap_or_default();
                    let first = g.members.first().map_or(i64::MAX, |m| m.received);
                    now.as_millis() - first >= i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
                });
                Ok(groups)
            })
            .await
    }

    /// Removes members whose summary is spooled.
    pub async fn remove(&self, ids: Vec<String>) -> Result<(), DbError> {
        self.db
            .write(move |c| {
                for id in ids {
                    c.exec("DELETE FROM aggregation WHERE id = ?1", params![id])?;
                }
                Ok(())
            })
            .await
    }

    /// Members waiting.
    pub async fn pending(&self) -> Result<u64, DbError> {
        self.db
            .read(|c| {
                let n: i64 = c.one("SELECT COUNT(*) FROM aggregation", params![], |r| r.get(0))?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }
}

pub fn summary(me: &RsId, g: &Group, window: Duration, now: Timestamp) -> Option<Message> {
    let first = g.members.first()?;
    let last = g.members.last()?;
    let severity = g
        .members
        .iter()
        .map(|m| m.severity)
        .min()
        .unwrap_or(Severity::Info);
    let precedence = g.members.iter().map(|m| m.precedence).max().unwrap_or(5);
    let persistent = g.members.iter().any(|m| m.persistent);
    let expiry = g
        .members
        .iter()
        .map(|m| m.expiry)
        .try_fold(0i64, |acc, e| e.map(|e| acc.max(e)))
        .and_then(Timestamp::from_millis);
    let mut sources: Vec<&str> = g.members.iter().map(|m| m.source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or(now).to_string();
    // Deterministic: the same group always gives the same summary ID.
    let id = MessageId::new(format!("agg-{}", &first.id[..first.id.len().min(60)])).ok()?;
    let text = format!(
        "{} similar alarms from {} source(s) within {} s; first: {}",
        g.members.len(),
        sources.len(),
        window.as_secs(),
        first.text
    );
    let mut details = vec![
        Detail::new("aggregated.count", g.members.len().to_string()),
        Detail::new("aggregated.group", g.group.clone()),
        Detail::new("aggregated.first", ts(first.received)),
        Detail::new("aggregated.last", ts(last.received)),
    ];
    details.push(Detail::new(
        "aggregated.sources",
        sources
            .iter()
            .take(50)
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
    ));
    Some(Message {
        header: Header {
            id,
            created: now,
            class: Classification::new(first.class.clone(), first.subclass.clone()),
            route: Route::Source(Source {
                component: me.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                qos: Qos {
                    expiry,
                    precedence,
                    persistent,
                },
            }),
            routing: Default::default(),
        },
        content: Content::Alarm(Alarm {
            severity,
            state: AlarmState::Raised,
            instance: None,
            key: Some(g.group.clone()),
            text,
            details,
        }),
    })
}
