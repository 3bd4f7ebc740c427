//! The collector's durable task queue (collector.rs serves it): the
//! subscriptions, the expander that makes one task per stored message and
//! matching subscription, claims, completions, failures, replays and feeds.

use std::time::Duration;

use rs_protocol::model::Severity;
use rs_protocol::{RsId, Timestamp};
use rs_store::db::DbError;
use rs_store::params;
use rs_store::sql::Conn;

use crate::subscription::{Delivery, Subscription};

fn rank(s: Severity) -> i64 {
    Severity::ALL.iter().position(|x| *x == s).unwrap_or(4) as i64
}

fn row_sub(r: &rs_store::sql::Row<'_>) -> Result<Subscription, DbError> {
    let delivery: String = r.get(8)?;
    let url: Option<String> = r.get(9)?;
    Ok(Subscription {
        id: r.get(0)?,
        name: r.get(1)?,
        class: r.get(2)?,
        subclass: r.get(3)?,
        customer: r.get(4)?,
        source: r.get(5)?,
        kind: r.get(6)?,
        min_severity: r
            .get::<Option<i64>>(7)?
            .and_then(|i| Severity::ALL.get(usize::try_from(i).ok()?).copied()),
        delivery: match (delivery.as_str(), url) {
            ("webhook", Some(u)) => Delivery::Webhook(u),
            ("module", Some(m)) => Delivery::Module(m),
            _ => Delivery::Feed,
        },
        from_seq: r.get(10)?,
    })
}

const SUB_COLUMNS: &str =
    "id, name, class, subclass, customer, source, type, min_severity, delivery, url, from_seq";

/// Every subscription (inside a transaction).
pub(crate) fn subscriptions_in(conn: &mut Conn) -> Result<Vec<Subscription>, DbError> {
    conn.rows(
        &format!("SELECT {SUB_COLUMNS} FROM subscriptions ORDER BY id"),
        params![],
        row_sub,
    )
}

/// What the expander reads of a stored message to match subscriptions.
struct Stored {
    seq: i64,
    id: String,
    class: String,
    subclass: String,
    customer: String,
    component: String,
    kind: String,
    severity: Option<i64>,
    /// An upload request (a `bulk-request` without a URL): its file is
    /// announced once stored, and only the announcement is delivered.
    upload_request: bool,
}

fn matches(s: &Subscription, m: &Stored) -> bool {
    m.seq > s.from_seq
        && !m.upload_request
        && s.class.as_deref().is_none_or(|c| m.class == c)
        && s.subclass.as_deref().is_none_or(|c| m.subclass == c)
        && s.customer.as_deref().is_none_or(|c| m.customer == c)
        && s.source.as_deref().is_none_or(|c| {
            let (Ok(m), Ok(c)) = (RsId::new(&m.component), RsId::new(c)) else {
                return false;
            };
            m.is_within(&c)
        })
        && s.kind.as_deref().is_none_or(|k| m.kind == k)
        && s.min_severity
            .is_none_or(|min| m.severity.is_some_and(|sev| sev <= rank(min)))
}

/// Makes the tasks of up to `limit` stored messages past the expander's
/// cursor (one per matching subscription) and moves the cursor past them,
/// in one transaction: each message is expanded exactly once, crash or
/// not. Returns how many messages and tasks.
pub(crate) fn expand_in(
    conn: &mut Conn,
    limit: usize,
    now: Timestamp,
) -> Result<(usize, usize), DbError> {
    // One expander at a time across a farm (PostgreSQL: the row stays
    // locked to the commit; SQLite has one writer).
    let lock = match conn.engine() {
        rs_store::sql::Engine::Sqlite => "",
        rs_store::sql::Engine::Postgres => " FOR UPDATE",
    };
    let cursor: i64 = conn.one(
        &format!("SELECT seq FROM cursors WHERE name = 'expander'{lock}"),
        params![],
        |r| r.get(0),
    )?;
    let subs = subscriptions_in(conn)?;
    if subs.is_empty() {
        // Nothing to match: the cursor moves past every message stored so
        // far without reading them back (each read was a page of the
        // store's file per message, on the writer's thread).
        let last: i64 = conn.one(
            "SELECT COALESCE(MAX(seq), 0) FROM messages",
            params![],
            |r| r.get(0),
        )?;
        if last <= cursor {
            return Ok((0, 0));
        }
        conn.exec(
            "UPDATE cursors SET seq = ?1 WHERE name = 'expander'",
            params![last],
        )?;
        return Ok((usize::try_from(last - cursor).unwrap_or(usize::MAX), 0));
    }
    // Whether the content of a `bulk-request` has a URL (a request for
    // an upload has none).
    let has_url = match conn.engine() {
        rs_store::sql::Engine::Sqlite => "instr(CAST(content AS TEXT), ' url=') > 0",
        rs_store::sql::Engine::Postgres => "position(' url='::bytea IN content) > 0",
    };
    let rows: Vec<Stored> = conn.rows(
        &format!(
            "SELECT seq, id, class, subclass, customer, component, kind, severity,
                    CASE WHEN kind = 'bulk-request' AND NOT {has_url} THEN 1 ELSE 0 END
             FROM messages WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ),
        params![cursor, limit as i64],
        |r| {
            Ok(Stored {
                seq: r.get(0)?,
                id: r.get(1)?,
                class: r.get(2)?,
                subclass: r.get(3)?,
                customer: r.get(4)?,
                component: r.get(5)?,
                kind: r.get(6)?,
                severity: r.get(7)?,
                upload_request: r.get(8)?,
            })
        },
    )?;
    let Some(last) = rows.last().map(|m| m.seq) else {
        return Ok((0, 0));
    };
    let mut tasks = 0;
    for m in &rows {
        for s in subs.iter().filter(|s| matches(s, m)) {
            tasks += conn.exec(
                "INSERT INTO tasks (sub, message, visible_at, created) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (sub, message) DO NOTHING",
                params![s.id, m.id, now.as_millis()],
            )? as usize;
        }
    }
    conn.exec(
        "UPDATE cursors SET seq = ?1 WHERE name = 'expander'",
        params![last],
    )?;
    if tasks > 0 {
        conn.notify(crate::farm::TASKS)?;
    }
    Ok((rows.len(), tasks))
}

/// A task claimed by a processor.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub sub: Subscription,
    pub message: String,
    pub attempts: u32,
}

/// A task, as the control API lists it.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub id: i64,
    pub sub: String,
    pub message: String,
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created: i64,
}

impl super::Store {
    /// Expands up to `limit` stored messages into tasks ([`expand_in`]).
    pub async fn expand(&self, limit: usize, now: Timestamp) -> Result<(usize, usize), DbError> {
        self.db.write(move |w| expand_in(w, limit, now)).await
    }

    /// Creates (or replaces, by name) a subscription. Only messages stored
    /// from now on are delivered to it; returns its ID.
    pub async fn subscribe(&self, s: Subscription, now: Timestamp) -> Result<i64, DbError> {
        self.db
            .write(move |w| {
                // `url` holds the webhook's URL or the module's name.
                let delivery = s.delivery.as_str();
                let url = match &s.delivery {
                    Delivery::Webhook(u) | Delivery::Module(u) => Some(u.clone()),
                    Delivery::Feed => None,
                };
                w.exec(
                    "INSERT INTO subscriptions (name, class, subclass, customer, source, type, min_severity, delivery, url, created,
                                                from_seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, (SELECT COALESCE(MAX(seq), 0) FROM messages))
                     ON CONFLICT (name) DO UPDATE SET class = ?2, subclass = ?3, customer = ?4, source = ?5,
                        type = ?6, min_severity = ?7, delivery = ?8, url = ?9",
                    params![
                        s.name,
                        s.class,
                        s.subclass,
                        s.customer,
                        s.source,
                        s.kind,
                        s.min_severity.map(rank),
                        delivery,
                        url,
                        now.as_millis()
                    ],
                )?;
                w.one(
                    "SELECT id FROM subscriptions WHERE name = ?1",
                    params![s.name],
                    |r| r.get(0),
                )
            })
            .await
    }

    /// Deletes a subscription and its pending tasks; false if none.
    pub async fn unsubscribe(&self, name: String) -> Result<bool, DbError> {
        self.db
            .write(move |w| {
                let id: Option<i64> = w.row(
                    "SELECT id FROM subscriptions WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )?;
                let Some(id) = id else { return Ok(false) };
                w.exec("DELETE FROM tasks WHERE sub = ?1", params![id])?;
                w.exec("DELETE FROM subscriptions WHERE id = ?1", params![id])?;
                Ok(true)
            })
            .await
    }

    pub async fn subscriptions(&self) -> Result<Vec<(Subscription, TaskCounts)>, DbError> {
        self.db
            .read(|r| {
                let subs = subscriptions_in(r)?;
                let mut out = Vec::new();
                for s in subs {
                    let mut c = TaskCounts::default();
                    let rows = r.rows(
                        "SELECT state, COUNT(*) FROM tasks WHERE sub = ?1 GROUP BY state",
                        params![s.id],
                        |x| Ok((x.get::<String>(0)?, x.get::<i64>(1)?)),
                    )?;
                    for (state, n) in rows {
                        let n = u64::try_from(n).unwrap_or(0);
                        match state.as_str() {
                            "ready" | "taken" => c.pending += n,
                            "done" => c.done += n,
                            _ => c.failed += n,
                        }
                    }
                    out.push((s, c));
                }
                Ok(out)
            })
            .await
    }

    /// Claims the next task a processor may work on, if any.
    pub async fn claim(
        &self,
        by: String,
        now: Timestamp,
        visibility: Duration,
    ) -> Result<Option<Claimed>, DbError> {
        self.db
            .write(move |w| {
                let now_ms = now.as_millis();
                let until = now_ms + i64::try_from(visibility.as_millis()).unwrap_or(i64::MAX / 2);
                // The last line is checked again on the row itself: of two
                // farm members choosing the same head, the second finds it
                // taken (invisible) once the first commits, and claims
                // nothing.
                let row: Option<(i64, i64, String, i64)> = w.row(
                        "UPDATE tasks SET state = 'taken', attempts = attempts + 1, visible_at = ?2, taken_by = ?3
                         WHERE id = (
                           SELECT h.id FROM (
                             SELECT (SELECT o.id FROM tasks o WHERE o.sub = s.id
                                       AND o.state IN ('ready', 'taken') ORDER BY o.id LIMIT 1) AS head
                             FROM subscriptions s WHERE s.delivery IN ('webhook', 'module')
                           ) heads JOIN tasks h ON h.id = heads.head
                           WHERE h.visible_at <= ?1
                           ORDER BY h.visible_at, h.id LIMIT 1)
                         AND state IN ('ready', 'taken') AND visible_at <= ?1
                         RETURNING id, sub, message, attempts",
                        params![now_ms, until, by],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )?;
                let Some((id, sub, message, attempts)) = row else {
                    return Ok(None);
                };
                let sub = w.one(
                    &format!("SELECT {SUB_COLUMNS} FROM subscriptions WHERE id = ?1"),
                    params![sub],
                    row_sub,
                )?;
                Ok(Some(Claimed {
                    id,
                    sub,
                    message,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                }))
            })
            .await
    }

    /// Completes a claimed task, if the claim still stands. True if it did.
    pub async fn complete_task(
        &self,
        t: &Claimed,
        by: String,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        let (id, attempts) = (t.id, t.attempts);
        self.db
            .write(move |w| {
                let n = w.exec(
                    "UPDATE tasks SET state = 'done', done_at = ?4, last_error = NULL
                     WHERE id = ?1 AND state = 'taken' AND taken_by = ?2 AND attempts = ?3",
                    params![id, by, attempts, now.as_millis()],
                )?;
                Ok(n == 1)
            })
            .await
    }

    /// A claimed task failed: ready again after `backoff`, or `failed`
    /// after `max_attempts`.
    pub async fn fail_task(
        &self,
        t: &Claimed,
        by: String,
        error: String,
        now: Timestamp,
        backoff: Duration,
        max_attempts: u32,
    ) -> Result<(), DbError> {
        let (id, attempts) = (t.id, t.attempts);
        self.db
            .write(move |w| {
                w.exec(
                    "UPDATE tasks SET state = CASE WHEN attempts >= ?4 THEN 'failed' ELSE 'ready' END,
                                      visible_at = ?5, last_error = ?6
                     WHERE id = ?1 AND state = 'taken' AND taken_by = ?2 AND attempts = ?3",
                    params![
                        id,
                        by,
                        attempts,
                        max_attempts,
                        now.as_millis() + i64::try_from(backoff.as_millis()).unwrap_or(0),
                        error
                    ],
                )?;
                Ok(())
            })
            .await
    }

    /// Tasks in `state` (`failed`, ...), oldest first.
    pub async fn tasks(&self, state: String, limit: usize) -> Result<Vec<TaskRow>, DbError> {
        self.db
            .read(move |r| {
                r.rows(
                    "SELECT t.id, s.name, t.message, t.state, t.attempts, t.last_error, t.created
                     FROM tasks t JOIN subscriptions s ON s.id = t.sub
                     WHERE t.state = ?1 ORDER BY t.id LIMIT ?2",
                    params![state, limit as i64],
                    |x| {
                        Ok(TaskRow {
                            id: x.get(0)?,
                            sub: x.get(1)?,
                            message: x.get(2)?,
                            state: x.get(3)?,
                            attempts: u32::try_from(x.get::<i64>(4)?).unwrap_or(0),
                            last_error: x.get(5)?,
                            created: x.get(6)?,
                        })
                    },
                )
            })
            .await
    }

    /// Makes failed tasks ready again (all, or one): returns how many.
    pub async fn replay(&self, id: Option<i64>, now: Timestamp) -> Result<u64, DbError> {
        self.db
            .write(move |w| {
                let n = w.exec(
                    "UPDATE tasks SET state = 'ready', attempts = 0, visible_at = ?2
                     WHERE state = 'failed' AND (CAST(?1 AS BIGINT) IS NULL OR id = ?1)",
                    params![id, now.as_millis()],
                )?;
                if n > 0 {
                    w.notify(crate::farm::TASKS)?;
                }
                Ok(n)
            })
            .await
    }

    /// A feed subscription's deliveries after `cursor` (a task ID), in
    /// order, at most `limit`; acknowledging `cursor` marks everything up
    /// to it done. Returns (task ID, message ID) pairs.
    pub async fn feed(
        &self,
        name: String,
        ack: Option<i64>,
        limit: usize,
        now: Timestamp,
    ) -> Result<Option<Vec<(i64, String)>>, DbError> {
        self.db
            .write(move |w| {
                let id: Option<i64> = w.row(
                    "SELECT id FROM subscriptions WHERE name = ?1 AND delivery = 'feed'",
                    params![name],
                    |r| r.get(0),
                )?;
                let Some(id) = id else { return Ok(None) };
                if let Some(a) = ack {
                    w.exec(
                        "UPDATE tasks SET state = 'done', done_at = ?3 WHERE sub = ?1 AND id <= ?2 AND state = 'ready'",
                        params![id, a, now.as_millis()],
                    )?;
                }
                let rows = w.rows(
                    "SELECT id, message FROM tasks WHERE sub = ?1 AND state = 'ready' ORDER BY id LIMIT ?2",
                    params![id, limit as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok(Some(rows))
            })
            .await
    }
}

/// Task counts of a subscription.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskCounts {
    pub pending: u64,
    pub done: u64,
    pub failed: u64,
}
