//! The application server's store: every accepted message exactly once
//! (the message ID is the primary key, kept for the retention window), and
//! each component's latest status tree, last-seen time and route.
//!
//! Every SQL statement of the server is in this module and its children
//! (and the schema in schema.rs); the rest of the server calls their
//! operations. The statements run on both engines (rs_store::sql): an
//! SQLite file, or a farm's PostgreSQL.
//!
//! - this file: messages, components and routes, jobs and the
//!   back-channel queue, groups and tags, health, settings;
//! - [`tasks`]: subscriptions and the collector's task queue;
//! - [`uploads`]: upload grants and their states;
//! - `files`: published files and download offers;
//! - [`security`]: enrollments and the audit log;
//! - [`admins`]: API tokens and the portal's sessions.

pub mod admins;
mod files;
pub mod rollouts;
pub mod security;
pub(crate) mod tasks;
pub mod uploads;

use std::time::Duration;

use rs_protocol::codec::api::{GroupDef, Job, JobTarget};
use rs_protocol::codec::{RawMessage, encode_header};
use rs_protocol::model::{ContentKind, Severity};
use rs_protocol::{ComponentKind, CustomerId, MessageId, RsId, Timestamp};
use rs_store::db::{Db, DbError};
use rs_store::params;
use rs_store::sql::Conn;

/// A message ready to store, with what the store indexes.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub msg: RawMessage,
    /// The header part as stored, written before the message reaches the
    /// database thread (which every envelope shares).
    pub header: Vec<u8>,
    pub severity: Option<Severity>,
    /// For heartbeats, cold starts and shutdowns: the status tree (XML)
    /// and its root state.
    pub status: Option<(Vec<u8>, String)>,
    /// For responses: what they answer, from whom, the outcome and result.
    pub response: Option<(MessageId, RsId, rs_protocol::Outcome, Option<String>)>,
    /// For upload requests: the server's answer, recorded with the request
    /// (and then no peripheral tasks: the file's announcement gets them).
    pub bulk: Option<Decided>,
    /// How it came sealed (stored opened).
    pub seal: Option<rs_protocol::Seal>,
}

impl Incoming {
    /// A message to store, with nothing more to record beside it.
    pub fn new(msg: RawMessage) -> Self {
        Incoming {
            header: encode_header(&msg.header, msg.kind, msg.data.as_ref()),
            msg,
            severity: None,
            status: None,
            response: None,
            bulk: None,
            seal: None,
        }
    }
}

/// What the store did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New,
    Duplicate,
}

/// One stored message, as queries return it.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its place in storage order (the export cursor).
    pub seq: i64,
    pub id: String,
    pub received: i64,
    pub created: i64,
    pub component: String,
    pub kind: String,
    pub class: String,
    pub subclass: String,
    pub severity: Option<Severity>,
    pub via: String,
    pub content_type: String,
    pub content: Vec<u8>,
    /// `signed` or `encrypted` when it came sealed.
    pub seal: Option<String>,
}

/// What the server knows of one message ID (`rsctl trace`): the stored
/// message (its header part, when it arrived, its customer), the job that
/// sent it down, and its copies still queued for next hops.
#[derive(Debug, Clone, Default)]
pub struct TraceRows {
    pub stored: Option<(Vec<u8>, i64, String)>,
    pub job: Option<String>,
    /// (next hop, queued at, last offered at).
    pub queued: Vec<(String, i64, Option<i64>)>,
}

/// A component as the server knows it.
#[derive(Debug, Clone)]
pub struct ComponentRow {
    pub tags: Vec<String>,
    pub id: String,
    pub kind: String,
    pub version: Option<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub via: String,
    pub state: Option<String>,
    pub status: Option<Vec<u8>>,
}

/// Selects stored messages.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// One message by ID.
    pub id: Option<String>,
    pub component: Option<String>,
    /// A component and those it allocated (a proxy's integrators and
    /// support instances).
    pub within: Option<String>,
    pub customer: Option<String>,
    pub class: Option<String>,
    pub subclass: Option<String>,
    /// At least this severe (alarms and events).
    pub severity: Option<Severity>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub kind: Option<ContentKind>,
    /// Export: only messages stored after this cursor, in storage order
    /// (without it: newest first).
    pub after: Option<i64>,
    /// Newest first in storage order, stored before this cursor (the
    /// portal's pages; ignored with `after`).
    pub before: Option<i64>,
    pub limit: usize,
}

/// Counts for status.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub messages: u64,
    pub components: u64,
    pub stored_total: u64,
    pub duplicates_total: u64,
}

/// Handle to the store.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) db: Db<Conn>,
}

pub(crate) fn severity_rank(s: Severity) -> i64 {
    // critical = 0 ... info = 4, as the enum orders them.
    Severity::ALL.iter().position(|x| *x == s).unwrap_or(4) as i64
}

fn bump(conn: &mut Conn, name: &str, by: u64) -> Result<(), DbError> {
    if by > 0 {
        conn.exec(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = counters.value + ?2",
            params![name, i64::try_from(by).unwrap_or(i64::MAX)],
        )?;
    }
    Ok(())
}

fn via_of(m: &RawMessage) -> String {
    m.header
        .routing
        .iter()
        .map(|h| h.component.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Pages of a new store file: a 2 KB message and its neighbours share
/// one, where with 4 KiB pages each took a page to itself (measured: the
/// server wrote about 10 KB per 2 KB message, WAL and checkpoint, and its
/// disk was the drain's bound).
const PAGE_SIZE: u32 = 16 << 10;

impl Store {
    /// Opens the store at `at` (an SQLite file, or a schema in a
    /// PostgreSQL database shared by a farm) and migrates its schema.
    pub fn open(at: &rs_store::sql::Location) -> Result<Self, DbError> {
        let conn = Conn::open_paged(at, crate::schema::MIGRATIONS, PAGE_SIZE)?;
        Ok(Store {
            db: Db::start("rs-appserver-store", conn)?,
        })
    }

    /// Answers once the store's thread has come to this request.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.db.ping().await
    }

    /// Stores a batch in one transaction: each message once (a known ID is
    /// a duplicate), and the sources' last-seen times, routes and status.
    pub async fn ingest(
        &self,
        batch: Vec<Incoming>,
        now: Timestamp,
    ) -> Result<Vec<Stored>, DbError> {
        self.db.write(move |s| ingest_in(s, &batch, now)).await
    }

    /// Stored messages matching `q`, newest first.
    pub async fn query(&self, q: Query) -> Result<Vec<Row>, DbError> {
        self.db
            .read(move |s| {
                let mut sql = String::from(
                    "SELECT seq, id, received, created, component, kind, class, subclass, severity, via,
                            content_type, content, seal FROM messages WHERE 1 = 1",
                );
                let mut args: Vec<rs_store::sql::Owned> = Vec::new();
                fn add(
                    sql: &mut String,
                    args: &mut Vec<rs_store::sql::Owned>,
                    cond: &str,
                    v: rs_store::sql::Owned,
                ) {
                    args.push(v);
                    sql.push_str(&format!(" AND {cond} ?{}", args.len()));
                }
                if let Some(c) = q.id {
                    add(&mut sql, &mut args, "id =", c.into());
                }
                if let Some(c) = q.component {
                    add(&mut sql, &mut args, "component =", c.into());
                }
                if let Some(c) = q.within {
                    // `ID` itself, or `ID.` followed by anything: every
                    // such ID sorts between `ID.` and `ID/` ('/' follows
                    // '.'), so the component index serves it.
                    let n = args.len();
                    args.push(c.clone().into());
                    args.push(format!("{c}.").into());
                    args.push(format!("{c}/").into());
                    sql.push_str(&format!(
                        " AND (component = ?{} OR (component > ?{} AND component < ?{}))",
                        n + 1,
                        n + 2,
                        n + 3
                    ));
                }
                if let Some(c) = q.customer {
                    add(&mut sql, &mut args, "customer =", c.into());
                }
                if let Some(c) = q.class {
                    add(&mut sql, &mut args, "class =", c.into());
                }
                if let Some(c) = q.subclass {
                    add(&mut sql, &mut args, "subclass =", c.into());
                }
                if let Some(sev) = q.severity {
                    add(&mut sql, &mut args, "severity <=", severity_rank(sev).into());
                }
                if let Some(t) = q.since {
                    add(&mut sql, &mut args, "received >=", t.into());
                }
                if let Some(t) = q.until {
                    add(&mut sql, &mut args, "received <", t.into());
                }
                if let Some(k) = q.kind {
                    add(&mut sql, &mut args, "kind =", k.as_str().to_owned().into());
                }
                // `seq` is the storage order: each new message gets one
                // above every other ever given (AUTOINCREMENT, never
                // reused, even after a purge), so a cursor never skips a
                // later message.
                if let Some(a) = q.after {
                    add(&mut sql, &mut args, "seq >", a.into());
                    sql.push_str(" ORDER BY seq");
                } else if let Some(b) = q.before {
                    add(&mut sql, &mut args, "seq <", b.into());
                    sql.push_str(" ORDER BY seq DESC");
                } else {
                    sql.push_str(" ORDER BY received DESC, id");
                }
                sql.push_str(&format!(" LIMIT {}", q.limit.min(10_000)));
                let args: Vec<&dyn rs_store::sql::ToParam> =
                    args.iter().map(|a| a as &dyn rs_store::sql::ToParam).collect();
                s.rows(&sql, &args, |r| {
                    Ok(Row {
                        seq: r.get(0)?,
                        id: r.get(1)?,
                        received: r.get(2)?,
                        created: r.get(3)?,
                        component: r.get(4)?,
                        kind: r.get(5)?,
                        class: r.get(6)?,
                        subclass: r.get(7)?,
                        severity: r
                            .get::<Option<i64>>(8)?
                            .and_then(|i| Severity::ALL.get(usize::try_from(i).ok()?).copied()),
                        via: r.get(9)?,
                        content_type: r.get(10)?,
                        content: r.get(11)?,
                        seal: r.get(12)?,
                    })
                })
            })
            .await
    }

    /// How many stored messages have this ID (0 or 1), for tests and tools.
    pub async fn count_id(&self, id: MessageId) -> Result<u64, DbError> {
        self.db
            .read(move |s| {
                let n: i64 = s.one(
                    "SELECT COUNT(*) FROM messages WHERE id = ?1",
                    params![id.as_str()],
                    |r| r.get(0),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    pub async fn components(&self) -> Result<Vec<ComponentRow>, DbError> {
        self.db
            .read(|s| {
                let mut tags: std::collections::HashMap<String, Vec<String>> =
                    std::collections::HashMap::new();
                let pairs = s.rows(
                    "SELECT component, tag FROM component_tags ORDER BY tag",
                    params![],
                    |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
                )?;
                for (c, t) in pairs {
                    tags.entry(c).or_default().push(t);
                }
                s.rows(
                    "SELECT id, kind, version, first_seen, last_seen, via, state, status
                     FROM components ORDER BY id",
                    params![],
                    |r| {
                        let id: String = r.get(0)?;
                        Ok(ComponentRow {
                            tags: tags.remove(&id).unwrap_or_default(),
                            id,
                            kind: r.get(1)?,
                            version: r.get(2)?,
                            first_seen: r.get(3)?,
                            last_seen: r.get(4)?,
                            via: r.get(5)?,
                            state: r.get(6)?,
                            status: r.get(7)?,
                        })
                    },
                )
            })
            .await
    }

    /// Records this member's beat in the farm's table of members.
    pub async fn beat(&self, m: rs_store::members::Member) -> Result<(), DbError> {
        self.db
            .write_relaxed(move |s| rs_store::members::beat(s, &m))
            .await
    }

    /// The farm's members as their last beats recorded them (those silent
    /// since before `forget` are forgotten).
    pub async fn members(
        &self,
        forget: Timestamp,
    ) -> Result<Vec<rs_store::members::Member>, DbError> {
        self.db
            .write_relaxed(move |s| rs_store::members::list(s, forget))
            .await
    }

    pub async fn stats(&self) -> Result<StoreStats, DbError> {
        self.db
            .read(|s| {
                let mut counter = |name: &str| -> Result<u64, DbError> {
                    let v: Option<i64> = s.row(
                        "SELECT value FROM counters WHERE name = ?1",
                        params![name],
                        |r| r.get(0),
                    )?;
                    Ok(u64::try_from(v.unwrap_or(0)).unwrap_or(0))
                };
                let stored_total = counter("stored")?;
                let duplicates_total = counter("duplicates")?;
                let (messages, components): (i64, i64) = s.one(
                    "SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM components)",
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok(StoreStats {
                    messages: u64::try_from(messages).unwrap_or(0),
                    components: u64::try_from(components).unwrap_or(0),
                    stored_total,
                    duplicates_total,
                })
            })
            .await
    }

    /// Back-channel copies not yet acknowledged, and peripheral tasks not
    /// done by state (metrics).
    pub async fn depths(&self) -> Result<(u64, Vec<(String, u64)>), DbError> {
        self.db
            .read(|s| {
                let pending: i64 = s.one("SELECT COUNT(*) FROM outbox", params![], |r| r.get(0))?;
                let tasks: Vec<(String, i64)> = s.rows(
                    "SELECT state, COUNT(*) FROM tasks WHERE state <> 'done' GROUP BY state",
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok((
                    u64::try_from(pending).unwrap_or(0),
                    tasks
                        .into_iter()
                        .map(|(st, n)| (st, u64::try_from(n).unwrap_or(0)))
                        .collect(),
                ))
            })
            .await
    }

    /// Forgets messages received before `now - retention` (and with them
    /// their IDs: the retention window is also the duplicate window).
    pub async fn purge(&self, now: Timestamp, retention: Duration) -> Result<u64, DbError> {
        let horizon = now.as_millis() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        self.db
            .write(move |s| {
                let n = s.exec("DELETE FROM messages WHERE received < ?1", params![horizon])?;
                // The audit log and spent or expired enrollment tokens
                // are kept as long as the messages.
                s.exec("DELETE FROM audit WHERE at < ?1", params![horizon])?;
                s.exec(
                    "DELETE FROM enrollments WHERE expires < ?1",
                    params![horizon],
                )?;
                admins::purge(s, now.as_millis(), horizon)?;
                Ok(n)
            })
            .await
    }
}

/// Stores a batch inside the caller's transaction (see [`Store::ingest`]).
pub(crate) fn ingest_in(
    conn: &mut Conn,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Stored>, DbError> {
    let mut out = Vec::with_capacity(batch.len());
    let (mut new, mut dup) = (0, 0);
    // `seq` is drawn in commit order (farm members' ingests commit one
    // after another), so a reader following it never passes a message
    // committed later with a smaller number.
    if !batch.is_empty() {
        conn.serialize(crate::farm::MESSAGE_ORDER)?;
    }
    let mut touched = std::collections::HashSet::new();
    // Peripheral work is not queued here: the messages table is the
    // collector's log, and the expander (collector.rs) makes each stored
    // message's tasks after the reply, from its own durable cursor.
    for inc in batch {
        let m = &inc.msg;
        let Some(src) = m.header.source() else {
            return Err(DbError::Sql(
                "back-channel message offered for storage".into(),
            ));
        };
        let via = via_of(m);
        let n = conn.exec(
            "INSERT INTO messages (id, received, created, component, customer, kind, class,
                                   subclass, severity, via, header, content_type, content, seal)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (id) DO NOTHING",
            params![
                m.header.id.as_str(),
                now.as_millis(),
                m.header.created.as_millis(),
                src.component.as_str(),
                src.component.customer().as_str(),
                m.kind.as_str(),
                m.header.class.class.as_str(),
                m.header.class.subclass.as_str(),
                inc.severity.map(severity_rank),
                via,
                inc.header,
                m.content_type,
                &m.content[..],
                inc.seal.map(rs_protocol::Seal::as_str),
            ],
        )?;
        if n == 0 {
            dup += 1;
            out.push(Stored::Duplicate);
            continue;
        }
        new += 1;
        out.push(Stored::New);
        if let Some(d) = &inc.bulk {
            record_decision(conn, d, now)?;
        }
        // A response completes its job in the transaction that stores it:
        // accepted means recorded, whatever happens next.
        if let Some((reference, source, outcome, result)) = &inc.response {
            complete_in(
                conn,
                reference,
                source,
                &completion_of(outcome, result.clone()),
                now,
            )?;
        }
        // One update per component per batch is enough.
        if touched.insert(src.component.as_str().to_owned()) {
            upsert_component(conn, &src.component, &src.version, &via, now)?;
        }
        if let Some((xml, state)) = &inc.status {
            conn.exec(
                "UPDATE components SET state = ?2, status = ?3, status_at = ?4 WHERE id = ?1",
                params![
                    src.component.as_str(),
                    state,
                    xml,
                    m.header.created.as_millis()
                ],
            )?;
        }
        // Every tier a message passed through is alive too.
        for (i, hop) in m.header.routing.iter().enumerate() {
            if touched.insert(hop.component.as_str().to_owned()) {
                let route: Vec<&str> = m.header.routing[..i]
                    .iter()
                    .map(|h| h.component.as_str())
                    .collect();
                touch(conn, &hop.component, &route.join(" "), now)?;
            }
        }
    }
    bump(conn, "stored", new)?;
    bump(conn, "duplicates", dup)?;
    if new > 0 {
        conn.notify(crate::farm::MESSAGES)?;
    }
    Ok(out)
}

fn upsert_component(
    conn: &mut Conn,
    id: &RsId,
    version: &str,
    via: &str,
    now: Timestamp,
) -> Result<(), DbError> {
    conn.exec(
        "INSERT INTO components (id, kind, customer, version, first_seen, last_seen, via)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET version = ?4, last_seen = ?5, via = ?6",
        params![
            id.as_str(),
            id.kind().as_str(),
            id.customer().as_str(),
            version,
            now.as_millis(),
            via
        ],
    )?;
    Ok(())
}

fn touch(conn: &mut Conn, id: &RsId, via: &str, now: Timestamp) -> Result<(), DbError> {
    conn.exec(
        "INSERT INTO components (id, kind, customer, first_seen, last_seen, via)
         VALUES (?1, ?2, ?3, ?4, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET last_seen = ?4, via = ?5",
        params![
            id.as_str(),
            id.kind().as_str(),
            id.customer().as_str(),
            now.as_millis(),
            via
        ],
    )?;
    Ok(())
}

/// How one destination answered a control action.
#[derive(Debug, Clone)]
pub struct Completion {
    pub succeeded: bool,
    pub code: Option<String>,
    pub text: Option<String>,
    pub result: Option<String>,
}

impl Store {
    /// The tier through which `dest` is reached from here: the last hop of
    /// its latest route, or (when it talks to us directly) the tier that
    /// polls for it: itself, or the proxy that allocated an integrator or
    /// support instance. `None` for a component never seen.
    pub async fn next_hop(&self, dest: RsId) -> Result<Option<String>, DbError> {
        self.db
            .read(move |s| {
                let via: Option<String> = s.row(
                    "SELECT via FROM components WHERE id = ?1",
                    params![dest.as_str()],
                    |r| r.get(0),
                )?;
                Ok(via.map(|v| {
                    v.split_whitespace()
                        .last()
                        .map_or_else(|| dest.tier().to_string(), str::to_owned)
                }))
            })
            .await
    }

    /// Records a job and queues one copy of its message per next hop (each
    /// listing the destinations behind that hop), in one transaction.
    /// `unreachable` destinations (group members never seen) start failed.
    pub async fn create_job(&self, job: NewJob, now: Timestamp) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                let expiry = job.expiry.map(Timestamp::as_millis);
                s.exec("INSERT INTO jobs (id, created, action, message, expiry, notify)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![job.id, now.as_millis(), job.action, job.message.as_str(), expiry, job.notify],
                )?;
                for d in &job.unreachable {
                    s.exec("INSERT INTO job_targets (job, dest, state, updated, code, text)
                         VALUES (?1, ?2, 'failed', ?3, 'unknown-destination', 'never seen by this server')
                         ON CONFLICT (job, dest) DO NOTHING",
                        params![job.id, d.as_str(), now.as_millis()],
                    )?;
                }
                for (hop, m) in &job.copies {
                    for d in m.header.destinations() {
                        s.exec("INSERT INTO job_targets (job, dest, state, updated) VALUES (?1, ?2, 'pending', ?3)
                             ON CONFLICT (job, dest) DO NOTHING",
                            params![job.id, d.as_str(), now.as_millis()],
                        )?;
                    }
                    rs_store::queue::put(s, hop, m, expiry, None, false, now)?;
                }
                s.notify(crate::farm::OUTBOX)?;
                s.notify(crate::farm::JOBS)?;
                if let Some((digest, sha256)) = &job.offer {
                    s.exec("INSERT INTO offers (digest, sha256, job, message, expires, created)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![
                            digest,
                            sha256,
                            job.id,
                            job.message.as_str(),
                            expiry.unwrap_or(i64::MAX),
                            now.as_millis()
                        ],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// Back-channel messages for `hop` not offered within `again` (or
    /// never), oldest first; marks them offered now. A message stays
    /// queued until `hop` acknowledges it.
    pub async fn offer(
        &self,
        hop: String,
        now: Timestamp,
        again: Duration,
        limit: usize,
    ) -> Result<Vec<RawMessage>, DbError> {
        self.db
            .write(move |s| rs_store::queue::offer(s, &hop, now, again, limit))
            .await
    }

    /// `hop` has the messages `ids`: forget them; a destination that
    /// acknowledged its own message has had it delivered. True when a
    /// job changed.
    pub async fn acknowledge(
        &self,
        hop: String,
        ids: Vec<MessageId>,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        if ids.is_empty() {
            return Ok(false);
        }
        self.db
            .write(move |s| {
                let mut changed = false;
                for id in &ids {
                    rs_store::queue::acknowledged(s, &hop, id.as_str())?;
                    let n = s.exec("UPDATE job_targets SET state = 'delivered', updated = ?3
                         WHERE job = (SELECT id FROM jobs WHERE message = ?1) AND dest = ?2 AND state = 'pending'",
                        params![id.as_str(), hop, now.as_millis()],
                    )?;
                    if n > 0 {
                        bump_job(s, id)?;
                        changed = true;
                    }
                }
                Ok(changed)
            })
            .await
    }

    /// Forwarder `from` reports that `(message, destination)` pairs were
    /// delivered (the destination acknowledged the message): those still
    /// pending become `delivered`. A notice about a destination not reached
    /// through `from` is ignored. True when a job changed.
    pub async fn delivered(
        &self,
        from: RsId,
        list: Vec<(MessageId, RsId)>,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        if list.is_empty() {
            return Ok(false);
        }
        self.db
            .write(move |s| {
                let mut changed = false;
                for (id, dest) in &list {
                    let via: Option<String> = s.row(
                        "SELECT via FROM components WHERE id = ?1",
                        params![dest.as_str()],
                        |r| r.get(0),
                    )?;
                    if !via.is_some_and(|v| v.split_whitespace().any(|h| h == from.as_str())) {
                        tracing::warn!("{from} reported delivering {id} to {dest}, which it does not reach; ignored");
                        continue;
                    }
                    let n = s.exec("UPDATE job_targets SET state = 'delivered', updated = ?3
                         WHERE job = (SELECT id FROM jobs WHERE message = ?1) AND dest = ?2 AND state = 'pending'",
                        params![id.as_str(), dest.as_str(), now.as_millis()],
                    )?;
                    if n > 0 {
                        bump_job(s, id)?;
                        changed = true;
                    }
                }
                Ok(changed)
            })
            .await
    }

    /// [`TraceRows`] of `id`.
    pub async fn trace(&self, id: String) -> Result<TraceRows, DbError> {
        self.db
            .read(move |s| {
                let stored = s.row(
                    "SELECT header, received, customer FROM messages WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                let job = s.row("SELECT id FROM jobs WHERE message = ?1", params![id], |r| {
                    r.get(0)
                })?;
                let queued = s.rows(
                    "SELECT hop, created, offered FROM outbox WHERE id = ?1 ORDER BY hop",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                Ok(TraceRows {
                    stored,
                    job,
                    queued,
                })
            })
            .await
    }

    pub async fn job(&self, id: String) -> Result<Option<Job>, DbError> {
        self.db.read(move |s| read_job(s, &id)).await
    }

    /// Up to `limit` jobs, newest first, from before the job `before` (a
    /// page's last), each with its destinations.
    pub async fn jobs(&self, limit: usize, before: Option<String>) -> Result<Vec<Job>, DbError> {
        self.db
            .read(move |s| {
                let ids: Vec<String> = match &before {
                    Some(b) => s.rows(
                        "SELECT id FROM jobs
                         WHERE (created, id) < (SELECT created, id FROM jobs WHERE id = ?1)
                         ORDER BY created DESC, id DESC LIMIT ?2",
                        params![b, limit as i64],
                        |r| r.get(0),
                    )?,
                    None => s.rows(
                        "SELECT id FROM jobs ORDER BY created DESC, id DESC LIMIT ?1",
                        params![limit as i64],
                        |r| r.get(0),
                    )?,
                };
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(j) = read_job(s, &id)? {
                        out.push(j);
                    }
                }
                Ok(out)
            })
            .await
    }

    /// Jobs with a subscriber that has not seen their latest version:
    /// (job, URL, the job now).
    pub async fn unnotified(&self, limit: usize) -> Result<Vec<(String, Job)>, DbError> {
        self.db
            .read(move |s| {
                let heads: Vec<(String, String)> = s.rows(
                    "SELECT id, notify FROM jobs WHERE notify IS NOT NULL AND notified < version
                     ORDER BY created LIMIT ?1",
                    params![limit as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let mut out = Vec::new();
                for (id, url) in heads {
                    if let Some(j) = read_job(s, &id)? {
                        out.push((url, j));
                    }
                }
                Ok(out)
            })
            .await
    }

    /// The subscriber of `job` has seen `version`.
    pub async fn notified(&self, job: String, version: u64) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "UPDATE jobs SET notified = CASE WHEN notified < ?2 THEN ?2 ELSE notified END
                     WHERE id = ?1",
                    params![job, i64::try_from(version).unwrap_or(i64::MAX)],
                )?;
                Ok(())
            })
            .await
    }

    /// Drops back-channel messages whose expiry passed; destinations of
    /// expired jobs not yet answered become `expired` (wherever the message
    /// is: here, or queued at an MLM, which drops it on its own clock).
    /// True when a job changed.
    pub async fn expire(&self, now: Timestamp) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                let n = s.exec(
                    "UPDATE jobs SET version = version + 1
                     WHERE expiry IS NOT NULL AND expiry <= ?1 AND id IN (
                        SELECT job FROM job_targets WHERE state IN ('pending', 'delivered'))",
                    params![now.as_millis()],
                )?;
                s.exec(
                    "UPDATE job_targets SET state = 'expired', updated = ?1
                     WHERE state IN ('pending', 'delivered') AND job IN (
                        SELECT id FROM jobs WHERE expiry IS NOT NULL AND expiry <= ?1)",
                    params![now.as_millis()],
                )?;
                rs_store::queue::drop_expired(s, now)?;
                if n > 0 {
                    s.notify(crate::farm::JOBS)?;
                }
                Ok(n > 0)
            })
            .await
    }

    /// Proxies and MLMs: (ID, last seen, health as last recorded).
    pub async fn health_scan(&self) -> Result<Vec<(String, i64, Health)>, DbError> {
        self.db
            .read(|s| {
                s.rows(
                    "SELECT c.id, c.last_seen, COALESCE(h.state, 'ok') FROM components c
                     LEFT JOIN health h ON h.component = c.id
                     WHERE c.kind IN ('proxy', 'mlm')",
                    params![],
                    |r| {
                        Ok((
                            r.get::<String>(0)?,
                            r.get::<i64>(1)?,
                            Health::parse(&r.get::<String>(2)?),
                        ))
                    },
                )
            })
            .await
    }

    pub async fn set_health(
        &self,
        component: String,
        h: Health,
        now: Timestamp,
    ) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "INSERT INTO health (component, state, since) VALUES (?1, ?2, ?3)
                     ON CONFLICT (component) DO UPDATE SET state = ?2, since = ?3",
                    params![component, h.as_str(), now.as_millis()],
                )?;
                Ok(())
            })
            .await
    }

    /// A setting changed at run time (the throttle document), if any.
    pub async fn setting(&self, name: &'static str) -> Result<Option<Vec<u8>>, DbError> {
        self.db
            .read(move |s| {
                s.row(
                    "SELECT value FROM settings WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
            })
            .await
    }

    pub async fn set_setting(&self, name: &'static str, value: Vec<u8>) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "INSERT INTO settings (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = ?2",
                    params![name, value],
                )?;
                s.notify(crate::farm::SETTINGS)?;
                Ok(())
            })
            .await
    }

    /// Creates or replaces a group.
    pub async fn put_group(&self, g: GroupDef, now: Timestamp) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec("INSERT INTO groups (name, customer, kind, tag, updated) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (name) DO UPDATE SET customer = ?2, kind = ?3, tag = ?4, updated = ?5",
                    params![
                        g.name,
                        g.customer.as_ref().map(|c| c.as_str().to_owned()),
                        g.kind.map(|k| k.as_str()),
                        g.tag,
                        now.as_millis()
                    ],
                )?;
                s.exec("DELETE FROM group_members WHERE grp = ?1", params![g.name])?;
                for m in &g.members {
                    s.exec("INSERT INTO group_members (grp, component) VALUES (?1, ?2)
                         ON CONFLICT (grp, component) DO NOTHING",
                        params![g.name, m.as_str()],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// Deletes a group; false if there was none.
    pub async fn delete_group(&self, name: String) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                s.exec("DELETE FROM group_members WHERE grp = ?1", params![name])?;
                Ok(s.exec("DELETE FROM groups WHERE name = ?1", params![name])? > 0)
            })
            .await
    }

    /// Groups (all, or the one named), each with its members resolved now:
    /// the static list plus every known component the selector matches.
    pub async fn groups(
        &self,
        only: Option<String>,
    ) -> Result<Vec<(GroupDef, Vec<RsId>)>, DbError> {
        self.db
            .read(move |s| {
                let defs: Vec<GroupRow> = s.rows(
                    "SELECT name, customer, kind, tag FROM groups
                     WHERE CAST(?1 AS TEXT) IS NULL OR name = ?1 ORDER BY name",
                    params![only],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )?;
                let mut out = Vec::new();
                for (name, customer, kind, tag) in defs {
                    let mut g = GroupDef {
                        name,
                        customer: customer.and_then(|c| CustomerId::new(c).ok()),
                        kind: kind.as_deref().and_then(ComponentKind::parse),
                        tag,
                        members: Vec::new(),
                    };
                    g.members = s
                        .rows(
                            "SELECT component FROM group_members WHERE grp = ?1 ORDER BY component",
                            params![g.name],
                            |r| r.get::<String>(0),
                        )?
                        .into_iter()
                        .filter_map(|c| RsId::new(c).ok())
                        .collect();
                    let mut all: std::collections::BTreeSet<RsId> = g.members.iter().cloned().collect();
                    if g.has_selector() {
                        let rows = s.rows(
                            "SELECT id FROM components
                             WHERE (CAST(?1 AS TEXT) IS NULL OR customer = ?1)
                               AND (CAST(?2 AS TEXT) IS NULL OR kind = ?2)
                               AND (CAST(?3 AS TEXT) IS NULL
                                    OR id IN (SELECT component FROM component_tags WHERE tag = ?3))",
                            params![
                                g.customer.as_ref().map(|c| c.as_str().to_owned()),
                                g.kind.map(|k| k.as_str()),
                                g.tag
                            ],
                            |r| r.get::<String>(0),
                        )?;
                        for r in rows {
                            if let Ok(id) = RsId::new(r) {
                                all.insert(id);
                            }
                        }
                    }
                    out.push((g, all.into_iter().collect()));
                }
                Ok(out)
            })
            .await
    }

    /// Replaces a known component's tags; false if the component is unknown.
    pub async fn set_tags(&self, component: RsId, tags: Vec<String>) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                let known = s.exists(
                    "SELECT 1 FROM components WHERE id = ?1",
                    params![component.as_str()],
                )?;
                if !known {
                    return Ok(false);
                }
                s.exec(
                    "DELETE FROM component_tags WHERE component = ?1",
                    params![component.as_str()],
                )?;
                for t in &tags {
                    s.exec(
                        "INSERT INTO component_tags (component, tag) VALUES (?1, ?2)
                         ON CONFLICT (component, tag) DO NOTHING",
                        params![component.as_str(), t],
                    )?;
                }
                Ok(true)
            })
            .await
    }
}

/// A group's row: name, customer, kind, tag.
type GroupRow = (String, Option<String>, Option<String>, Option<String>);

/// A job to record.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub action: String,
    pub message: MessageId,
    /// One copy per next hop.
    pub copies: Vec<(String, RawMessage)>,
    /// Destinations that cannot be reached (never seen): they start failed.
    pub unreachable: Vec<RsId>,
    pub expiry: Option<Timestamp>,
    pub notify: Option<String>,
    /// A download offer's URL (its token's digest) and file (SHA-256),
    /// recorded with the job: its copies may be fetched as soon as they
    /// leave, so the URL must exist by then.
    pub offer: Option<(String, String)>,
}

/// A response from `source` to message `reference` completes that
/// destination of its job (once: a final state stays), inside the
/// caller's transaction. True when the job changed.
fn complete_in(
    conn: &mut Conn,
    reference: &MessageId,
    source: &RsId,
    c: &Completion,
    now: Timestamp,
) -> Result<bool, DbError> {
    let n = conn.exec(
        "UPDATE job_targets SET state = ?3, code = ?4, text = ?5, result = ?6, updated = ?7
         WHERE job = (SELECT id FROM jobs WHERE message = ?1) AND dest = ?2
           AND state IN ('pending', 'delivered')",
        params![
            reference.as_str(),
            source.as_str(),
            if c.succeeded { "succeeded" } else { "failed" },
            c.code,
            c.text,
            c.result,
            now.as_millis()
        ],
    )?;
    if n > 0 {
        bump_job(conn, reference)?;
    }
    Ok(n > 0)
}

/// How a response's outcome completes its destination.
fn completion_of(outcome: &rs_protocol::Outcome, result: Option<String>) -> Completion {
    use rs_protocol::Outcome;
    let (succeeded, code, text) = match outcome {
        Outcome::Accepted => (true, None, None),
        Outcome::Rejected(r) | Outcome::Retry { reason: r, .. } => {
            (false, Some(r.code.to_string()), Some(r.text.clone()))
        }
        Outcome::Expired => (false, Some("expired".to_owned()), None),
    };
    Completion {
        succeeded,
        code,
        text,
        result,
    }
}

fn bump_job(conn: &mut Conn, message: &MessageId) -> Result<(), DbError> {
    conn.exec(
        "UPDATE jobs SET version = version + 1 WHERE message = ?1",
        params![message.as_str()],
    )?;
    conn.notify(crate::farm::JOBS)
}

fn read_job(conn: &mut Conn, id: &str) -> Result<Option<Job>, DbError> {
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let head: Option<(String, i64, String, String, Option<i64>, i64)> = conn.row(
        "SELECT id, created, action, message, expiry, version FROM jobs WHERE id = ?1",
        params![id],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )?;
    let Some((id, created, action, message, expiry, version)) = head else {
        return Ok(None);
    };
    let targets = conn
        .rows(
            "SELECT dest, state, updated, code, text, result FROM job_targets WHERE job = ?1 ORDER BY dest",
            params![id],
            |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<i64>(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )?
        .into_iter()
        .filter_map(|(dest, state, updated, code, text, result)| {
            Some(JobTarget {
                id: RsId::new(dest).ok()?,
                state,
                updated: ts(updated),
                code,
                text,
                result,
            })
        })
        .collect();
    Ok(Some(Job {
        id,
        message,
        action,
        created: ts(created),
        expiry: expiry.map(ts),
        version: u64::try_from(version).unwrap_or(0),
        targets,
    }))
}

/// A grant to record with its request.
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub digest: String,
    pub request: MessageId,
    pub component: String,
    pub customer: String,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub class: String,
    pub subclass: String,
    pub expires: Timestamp,
}

/// The server's answer to one bulk request: the grant (if any) and the
/// `bulk-response` for the back-channel, queued for `hop`.
#[derive(Debug, Clone)]
pub struct Decided {
    pub grant: Option<NewUpload>,
    pub hop: String,
    pub reply: RawMessage,
}

/// Records an upload decision with its request (inside the ingest
/// transaction): the grant, and the answer queued for the hop it goes
/// down through.
pub(crate) fn record_decision(
    conn: &mut Conn,
    d: &Decided,
    now: Timestamp,
) -> Result<(), rs_store::db::DbError> {
    if let Some(g) = &d.grant {
        conn.exec(
            "INSERT INTO uploads (digest, request, component, customer, name, size, sha256,
                                  class, subclass, granted, expires)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                g.digest,
                g.request.as_str(),
                g.component,
                g.customer,
                g.name,
                i64::try_from(g.size).unwrap_or(i64::MAX),
                g.sha256,
                g.class,
                g.subclass,
                now.as_millis(),
                g.expires.as_millis()
            ],
        )?;
    }
    let m = &d.reply;
    rs_store::queue::put(
        conn,
        &d.hop,
        m,
        m.header.expiry().map(Timestamp::as_millis),
        None,
        false,
        now,
    )?;
    conn.notify(crate::farm::OUTBOX)?;
    Ok(())
}

/// A component's health as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Late,
    Failed,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Late => "late",
            Health::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Health {
        match s {
            "late" => Health::Late,
            "failed" => Health::Failed,
            _ => Health::Ok,
        }
    }
}
