//! The application server's store: every accepted message exactly once
//! (the message ID is the primary key, kept for the retention window), and
//! each component's latest status tree, last-seen time and route.
//!
//! The SQL is portable (SQLite here; the PostgreSQL backend of the farm
//! issue runs the same statements).

use std::time::Duration;

use rs_protocol::codec::api::{GroupDef, Job, JobTarget};
use rs_protocol::codec::{RawMessage, encode_header};
use rs_protocol::model::{ContentKind, Severity};
use rs_protocol::{ComponentKind, CustomerId, MessageId, RsId, Timestamp};
use rs_store::db::{Db, DbError, Plain};
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS components (
    id         TEXT    PRIMARY KEY,
    kind       TEXT    NOT NULL,
    customer   TEXT    NOT NULL,
    version    TEXT,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    via        TEXT    NOT NULL,
    state      TEXT,
    status     BLOB,
    status_at  INTEGER
);
CREATE TABLE IF NOT EXISTS outbox (
    id           TEXT    NOT NULL,
    hop          TEXT    NOT NULL,
    created      INTEGER NOT NULL,
    expiry       INTEGER,
    offered      INTEGER,
    kind         TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content      BLOB    NOT NULL,
    PRIMARY KEY (id, hop)
);
CREATE INDEX IF NOT EXISTS outbox_hop ON outbox (hop, created);
CREATE TABLE IF NOT EXISTS jobs (
    id       TEXT    PRIMARY KEY,
    created  INTEGER NOT NULL,
    action   TEXT    NOT NULL,
    message  TEXT    NOT NULL UNIQUE,
    expiry   INTEGER,
    version  INTEGER NOT NULL DEFAULT 0,
    notify   TEXT,
    notified INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expiry);
CREATE TABLE IF NOT EXISTS groups (
    name     TEXT    PRIMARY KEY,
    customer TEXT,
    kind     TEXT,
    tag      TEXT,
    updated  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    grp       TEXT NOT NULL,
    component TEXT NOT NULL,
    PRIMARY KEY (grp, component)
);
CREATE TABLE IF NOT EXISTS component_tags (
    component TEXT NOT NULL,
    tag       TEXT NOT NULL,
    PRIMARY KEY (component, tag)
);
CREATE INDEX IF NOT EXISTS component_tags_tag ON component_tags (tag);
CREATE TABLE IF NOT EXISTS job_targets (
    job     TEXT    NOT NULL,
    dest    TEXT    NOT NULL,
    state   TEXT    NOT NULL,
    updated INTEGER NOT NULL,
    code    TEXT,
    text    TEXT,
    result  TEXT,
    PRIMARY KEY (job, dest)
);
CREATE TABLE IF NOT EXISTS subscriptions (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    class        TEXT,
    subclass     TEXT,
    customer     TEXT,
    source       TEXT,
    type         TEXT,
    min_severity INTEGER,
    delivery     TEXT    NOT NULL,
    url          TEXT,
    created      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id         INTEGER PRIMARY KEY,
    sub        INTEGER NOT NULL,
    message    TEXT    NOT NULL,
    state      TEXT    NOT NULL DEFAULT 'ready',
    attempts   INTEGER NOT NULL DEFAULT 0,
    visible_at INTEGER NOT NULL,
    taken_by   TEXT,
    last_error TEXT,
    created    INTEGER NOT NULL,
    done_at    INTEGER,
    UNIQUE (sub, message)
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (state, visible_at);
CREATE INDEX IF NOT EXISTS tasks_sub   ON tasks (sub, state, id);
-- Each subscription's unfinished tasks in order: its head (the only one a
-- processor may claim) is one index probe away, however long the backlog.
CREATE INDEX IF NOT EXISTS tasks_open  ON tasks (sub, id) WHERE state IN ('ready', 'taken');
CREATE TABLE IF NOT EXISTS health (
    component TEXT    PRIMARY KEY,
    state     TEXT    NOT NULL,
    since     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    digest    TEXT    PRIMARY KEY,
    request   TEXT    NOT NULL UNIQUE,
    component TEXT    NOT NULL,
    customer  TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    size      INTEGER NOT NULL,
    sha256    TEXT    NOT NULL,
    class     TEXT    NOT NULL,
    subclass  TEXT    NOT NULL,
    granted   INTEGER NOT NULL,
    expires   INTEGER NOT NULL,
    state     TEXT    NOT NULL DEFAULT 'open',
    done_at   INTEGER,
    reason    TEXT
);
CREATE INDEX IF NOT EXISTS uploads_open ON uploads (state, expires);
CREATE TABLE IF NOT EXISTS files (
    sha256  TEXT    PRIMARY KEY,
    name    TEXT    NOT NULL,
    size    INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS offers (
    digest         TEXT    PRIMARY KEY,
    sha256         TEXT    NOT NULL,
    job            TEXT    NOT NULL,
    message        TEXT    NOT NULL,
    expires        INTEGER NOT NULL,
    state          TEXT    NOT NULL DEFAULT 'open',
    created        INTEGER NOT NULL,
    unpublished_at INTEGER
);
CREATE INDEX IF NOT EXISTS offers_open ON offers (state);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT    PRIMARY KEY,
    seq  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// The stored messages: `seq` is the storage order (the collector's log
/// and the export cursor), `id` the duplicate check.
const MESSAGES: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    received     INTEGER NOT NULL,
    created      INTEGER NOT NULL,
    component    TEXT    NOT NULL,
    customer     TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    class        TEXT    NOT NULL,
    subclass     TEXT    NOT NULL,
    severity     INTEGER,
    via          TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content_type TEXT    NOT NULL,
    content      BLOB    NOT NULL,
    seal         TEXT
);
";

const MESSAGE_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS messages_received  ON messages (received);
CREATE INDEX IF NOT EXISTS messages_component ON messages (component, received);
CREATE INDEX IF NOT EXISTS messages_class     ON messages (class, subclass, received);
";

/// The columns of `messages` after `seq`, as both layouts have them.
const MESSAGE_COLUMNS: &str = "id, received, created, component, customer, kind, class, \
     subclass, severity, via, header, content_type, content, seal";

/// Databases written before `messages.seq` existed ordered messages by
/// their rowid, which SQLite reuses once the newest rows are deleted (a
/// retention purge of an idle system): new messages then sorted below
/// the expander's and the export clients' cursors and were skipped. The
/// table is rebuilt with `seq INTEGER PRIMARY KEY AUTOINCREMENT` (never
/// reused: SQLite keeps the highest ever given in `sqlite_sequence`), each
/// message keeping its old rowid as its `seq`, so every cursor handed out
/// stays valid; the sequence starts above every cursor the database
/// itself holds. One transaction: a crash leaves the old table whole.
fn migrate_message_seq(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'seq'")?
        .exists([])?;
    if has {
        return Ok(());
    }
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))?;
    tracing::info!("appserver.db: giving {n} stored messages a sequence that is never reused");
    let create = MESSAGES.replace("IF NOT EXISTS messages", "messages_seq");
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         {create}
         INSERT INTO messages_seq (seq, {MESSAGE_COLUMNS})
             SELECT rowid, {MESSAGE_COLUMNS} FROM messages ORDER BY rowid;
         DROP TABLE messages;
         ALTER TABLE messages_seq RENAME TO messages;
         INSERT INTO sqlite_sequence (name, seq)
             SELECT 'messages', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'messages');
         UPDATE sqlite_sequence SET seq = MAX(seq,
                 (SELECT COALESCE(MAX(seq), 0) FROM cursors),
                 (SELECT COALESCE(MAX(from_seq), 0) FROM subscriptions))
             WHERE name = 'messages';
         COMMIT;"
    ))
}

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
    pub(crate) db: Db<Plain>,
}

pub(crate) fn severity_rank(s: Severity) -> i64 {
    // critical = 0 ... info = 4, as the enum orders them.
    Severity::ALL.iter().position(|x| *x == s).unwrap_or(4) as i64
}

/// Runs a statement through the connection's statement cache.
pub(crate) fn exec(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(p)
}

fn bump(conn: &Connection, name: &str, by: u64) -> rusqlite::Result<()> {
    if by > 0 {
        exec(
            conn,
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = value + ?2",
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

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Self, DbError> {
        let conn = rs_store::db::open(path)?;
        conn.execute_batch(MESSAGES)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(SECURITY_SCHEMA)?;
        // Subscriptions take messages stored after they were made
        // (`from_seq`); databases from before the column get it.
        let has: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('subscriptions') WHERE name = 'from_seq'")?
            .exists([])?;
        if !has {
            conn.execute_batch(
                "ALTER TABLE subscriptions ADD COLUMN from_seq INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        // How a message came sealed; databases from before seals get it.
        let has: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'seal'")?
            .exists([])?;
        if !has {
            conn.execute_batch("ALTER TABLE messages ADD COLUMN seal TEXT")?;
        }
        migrate_message_seq(&conn)?;
        conn.execute_batch(MESSAGE_INDEXES)?;
        // The collector's expander starts after what is stored already (a
        // database from before it had its tasks made at ingest).
        conn.execute(
            "INSERT INTO cursors (name, seq) SELECT 'expander', COALESCE(MAX(seq), 0) FROM messages
             WHERE true ON CONFLICT (name) DO NOTHING",
            [],
        )?;
        Ok(Store {
            db: Db::start("rs-appserver-store", Plain(conn))?,
        })
    }

    /// Stores a batch in one transaction: each message once (a known ID is
    /// a duplicate), and the sources' last-seen times, routes and status.
    pub async fn ingest(
        &self,
        batch: Vec<Incoming>,
        now: Timestamp,
    ) -> Result<Vec<Stored>, DbError> {
        self.db.write(move |s| ingest_in(&s.0, &batch, now)).await
    }

    /// Stored messages matching `q`, newest first.
    pub async fn query(&self, q: Query) -> Result<Vec<Row>, DbError> {
        self.db
            .read(move |s| {
                let mut sql = String::from(
                    "SELECT seq, id, received, created, component, kind, class, subclass, severity, via,
                            content_type, content, seal FROM messages WHERE 1 = 1",
                );
                let mut args: Vec<rusqlite::types::Value> = Vec::new();
                let mut add = |cond: &str, v: rusqlite::types::Value| {
                    args.push(v);
                    sql.push_str(&format!(" AND {cond} ?{}", args.len()));
                };
                if let Some(c) = q.id {
                    add("id =", c.into());
                }
                if let Some(c) = q.component {
                    add("component =", c.into());
                }
                if let Some(c) = q.customer {
                    add("customer =", c.into());
                }
                if let Some(c) = q.class {
                    add("class =", c.into());
                }
                if let Some(c) = q.subclass {
                    add("subclass =", c.into());
                }
                if let Some(sev) = q.severity {
                    add("severity <=", severity_rank(sev).into());
                }
                if let Some(t) = q.since {
                    add("received >=", t.into());
                }
                if let Some(t) = q.until {
                    add("received <", t.into());
                }
                if let Some(k) = q.kind {
                    add("kind =", k.as_str().to_owned().into());
                }
                // `seq` is the storage order: each new message gets one
                // above every other ever given (AUTOINCREMENT, never
                // reused, even after a purge), so a cursor never skips a
                // later message.
                if let Some(a) = q.after {
                    add("seq >", a.into());
                    sql.push_str(" ORDER BY seq");
                } else {
                    sql.push_str(" ORDER BY received DESC, id");
                }
                sql.push_str(&format!(" LIMIT {}", q.limit.min(10_000)));
                let mut st = s.0.prepare(&sql)?;
                let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
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
                            .get::<_, Option<i64>>(8)?
                            .and_then(|i| Severity::ALL.get(usize::try_from(i).ok()?).copied()),
                        via: r.get(9)?,
                        content_type: r.get(10)?,
                        content: r.get(11)?,
                        seal: r.get(12)?,
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// How many stored messages have this ID (0 or 1), for tests and tools.
    pub async fn count_id(&self, id: MessageId) -> Result<u64, DbError> {
        self.db
            .read(move |s| {
                let n: i64 = s.0.query_row(
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
                let mut st =
                    s.0.prepare("SELECT component, tag FROM component_tags ORDER BY tag")?;
                for r in
                    st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                {
                    let (c, t) = r?;
                    tags.entry(c).or_default().push(t);
                }
                let mut st = s.0.prepare(
                    "SELECT id, kind, version, first_seen, last_seen, via, state, status
                     FROM components ORDER BY id",
                )?;
                let rows = st.query_map([], |r| {
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
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    pub async fn stats(&self) -> Result<StoreStats, DbError> {
        self.db
            .read(|s| {
                let counter = |name: &str| -> rusqlite::Result<u64> {
                    let v: Option<i64> =
                        s.0.query_row(
                            "SELECT value FROM counters WHERE name = ?1",
                            params![name],
                            |r| r.get(0),
                        )
                        .optional()?;
                    Ok(u64::try_from(v.unwrap_or(0)).unwrap_or(0))
                };
                let (messages, components): (i64, i64) = s.0.query_row(
                    "SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM components)",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok(StoreStats {
                    messages: u64::try_from(messages).unwrap_or(0),
                    components: u64::try_from(components).unwrap_or(0),
                    stored_total: counter("stored")?,
                    duplicates_total: counter("duplicates")?,
                })
            })
            .await
    }

    /// Forgets messages received before `now - retention` (and with them
    /// their IDs: the retention window is also the duplicate window).
    pub async fn purge(&self, now: Timestamp, retention: Duration) -> Result<u64, DbError> {
        let horizon = now.as_millis() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        self.db
            .write(move |s| {
                let n = exec(
                    &s.0,
                    "DELETE FROM messages WHERE received < ?1",
                    params![horizon],
                )?;
                // The audit log and spent or expired enrollment tokens
                // are kept as long as the messages.
                exec(&s.0, "DELETE FROM audit WHERE at < ?1", params![horizon])?;
                exec(
                    &s.0,
                    "DELETE FROM enrollments WHERE expires < ?1",
                    params![horizon],
                )?;
                Ok(n as u64)
            })
            .await
    }
}

/// Stores a batch inside the caller's transaction (see [`Store::ingest`]).
pub(crate) fn ingest_in(
    conn: &Connection,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Vec<Stored>, DbError> {
    let mut out = Vec::with_capacity(batch.len());
    let (mut new, mut dup) = (0, 0);
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
        let n = exec(
            conn,
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
        // One update per component per batch is enough.
        if touched.insert(src.component.as_str().to_owned()) {
            upsert_component(conn, &src.component, &src.version, &via, now)?;
        }
        if let Some((xml, state)) = &inc.status {
            exec(
                conn,
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
    Ok(out)
}

fn upsert_component(
    conn: &Connection,
    id: &RsId,
    version: &str,
    via: &str,
    now: Timestamp,
) -> rusqlite::Result<()> {
    exec(
        conn,
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

fn touch(conn: &Connection, id: &RsId, via: &str, now: Timestamp) -> rusqlite::Result<()> {
    exec(
        conn,
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
                let via: Option<String> =
                    s.0.query_row(
                        "SELECT via FROM components WHERE id = ?1",
                        params![dest.as_str()],
                        |r| r.get(0),
                    )
                    .optional()?;
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
                exec(
                    &s.0,
                    "INSERT INTO jobs (id, created, action, message, expiry, notify)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![job.id, now.as_millis(), job.action, job.message.as_str(), expiry, job.notify],
                )?;
                for d in &job.unreachable {
                    exec(
                        &s.0,
                        "INSERT INTO job_targets (job, dest, state, updated, code, text)
                         VALUES (?1, ?2, 'failed', ?3, 'unknown-destination', 'never seen by this server')
                         ON CONFLICT (job, dest) DO NOTHING",
                        params![job.id, d.as_str(), now.as_millis()],
                    )?;
                }
                for (hop, m) in &job.copies {
                    for d in m.header.destinations() {
                        exec(
                            &s.0,
                            "INSERT INTO job_targets (job, dest, state, updated) VALUES (?1, ?2, 'pending', ?3)
                             ON CONFLICT (job, dest) DO NOTHING",
                            params![job.id, d.as_str(), now.as_millis()],
                        )?;
                    }
                    let header = encode_header(&m.header, m.kind, m.data.as_ref());
                    exec(
                        &s.0,
                        "INSERT INTO outbox (id, hop, created, expiry, kind, content_type, header, content)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![
                            m.header.id.as_str(),
                            hop,
                            now.as_millis(),
                            expiry,
                            m.kind.as_str(),
                            m.content_type,
                            header,
                            &m.content[..]
                        ],
                    )?;
                }
                if let Some((digest, sha256)) = &job.offer {
                    exec(
                        &s.0,
                        "INSERT INTO offers (digest, sha256, job, message, expires, created)
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
        let limits = rs_protocol::codec::Limits::default();
        self.db
            .write(move |s| {
                let before = now.as_millis() - i64::try_from(again.as_millis()).unwrap_or(i64::MAX);
                let mut out = Vec::new();
                let rows: Vec<(String, String, Vec<u8>, Vec<u8>)> = {
                    let mut st = s.0.prepare_cached(
                        "SELECT id, content_type, header, content FROM outbox
                         WHERE hop = ?1 AND (offered IS NULL OR offered < ?2)
                           AND (expiry IS NULL OR expiry > ?3)
                         ORDER BY created LIMIT ?4",
                    )?;
                    st.query_map(params![hop, before, now.as_millis(), limit as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect::<Result<_, _>>()?
                };
                for (id, content_type, header, content) in rows {
                    let Ok((header, kind, data)) =
                        rs_protocol::codec::decode_header_part(&header, &limits)
                    else {
                        continue;
                    };
                    exec(
                        &s.0,
                        "UPDATE outbox SET offered = ?3 WHERE id = ?1 AND hop = ?2",
                        params![id, hop, now.as_millis()],
                    )?;
                    out.push(RawMessage {
                        header,
                        kind,
                        data,
                        content_type: content_type.into(),
                        content: bytes::Bytes::from(content),
                    });
                }
                Ok(out)
            })
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
                    exec(&s.0, "DELETE FROM outbox WHERE id = ?1 AND hop = ?2", params![id.as_str(), hop])?;
                    let n = exec(
                        &s.0,
                        "UPDATE job_targets SET state = 'delivered', updated = ?3
                         WHERE job = (SELECT id FROM jobs WHERE message = ?1) AND dest = ?2 AND state = 'pending'",
                        params![id.as_str(), hop, now.as_millis()],
                    )?;
                    if n > 0 {
                        bump_job(&s.0, id)?;
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
                    let via: Option<String> = s
                        .0
                        .prepare_cached("SELECT via FROM components WHERE id = ?1")?
                        .query_row(params![dest.as_str()], |r| r.get(0))
                        .optional()?;
                    if !via.is_some_and(|v| v.split_whitespace().any(|h| h == from.as_str())) {
                        tracing::warn!("{from} reported delivering {id} to {dest}, which it does not reach; ignored");
                        continue;
                    }
                    let n = exec(
                        &s.0,
                        "UPDATE job_targets SET state = 'delivered', updated = ?3
                         WHERE job = (SELECT id FROM jobs WHERE message = ?1) AND dest = ?2 AND state = 'pending'",
                        params![id.as_str(), dest.as_str(), now.as_millis()],
                    )?;
                    if n > 0 {
                        bump_job(&s.0, id)?;
                        changed = true;
                    }
                }
                Ok(changed)
            })
            .await
    }

    /// A response from `source` to message `reference` completes that
    /// destination of its job (once: a final state stays).
    pub async fn complete(
        &self,
        reference: MessageId,
        source: RsId,
        c: Completion,
        now: Timestamp,
    ) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                let n = exec(
                    &s.0,
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
                    bump_job(&s.0, &reference)?;
                }
                Ok(n > 0)
            })
            .await
    }

    pub async fn job(&self, id: String) -> Result<Option<Job>, DbError> {
        self.db.read(move |s| Ok(read_job(&s.0, &id)?)).await
    }

    /// Jobs with a subscriber that has not seen their latest version:
    /// (job, URL, the job now).
    pub async fn unnotified(&self, limit: usize) -> Result<Vec<(String, Job)>, DbError> {
        self.db
            .read(move |s| {
                let heads: Vec<(String, String)> = {
                    let mut st = s.0.prepare_cached(
                        "SELECT id, notify FROM jobs WHERE notify IS NOT NULL AND notified < version
                         ORDER BY created LIMIT ?1",
                    )?;
                    st.query_map(params![limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?
                };
                let mut out = Vec::new();
                for (id, url) in heads {
                    if let Some(j) = read_job(&s.0, &id)? {
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
                exec(
                    &s.0,
                    "UPDATE jobs SET notified = MAX(notified, ?2) WHERE id = ?1",
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
                let n = exec(
                    &s.0,
                    "UPDATE jobs SET version = version + 1
                     WHERE expiry IS NOT NULL AND expiry <= ?1 AND id IN (
                        SELECT job FROM job_targets WHERE state IN ('pending', 'delivered'))",
                    params![now.as_millis()],
                )?;
                exec(
                    &s.0,
                    "UPDATE job_targets SET state = 'expired', updated = ?1
                     WHERE state IN ('pending', 'delivered') AND job IN (
                        SELECT id FROM jobs WHERE expiry IS NOT NULL AND expiry <= ?1)",
                    params![now.as_millis()],
                )?;
                exec(
                    &s.0,
                    "DELETE FROM outbox WHERE expiry IS NOT NULL AND expiry <= ?1",
                    params![now.as_millis()],
                )?;
                Ok(n > 0)
            })
            .await
    }

    /// Proxies and MLMs: (ID, last seen, health as last recorded).
    pub async fn health_scan(&self) -> Result<Vec<(String, i64, Health)>, DbError> {
        self.db
            .read(|s| {
                let mut st = s.0.prepare_cached(
                    "SELECT c.id, c.last_seen, COALESCE(h.state, 'ok') FROM components c
                     LEFT JOIN health h ON h.component = c.id
                     WHERE c.kind IN ('proxy', 'mlm')",
                )?;
                let rows = st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        Health::parse(&r.get::<_, String>(2)?),
                    ))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
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
                exec(
                    &s.0,
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
                Ok(s.0
                    .query_row(
                        "SELECT value FROM settings WHERE name = ?1",
                        params![name],
                        |r| r.get(0),
                    )
                    .optional()?)
            })
            .await
    }

    pub async fn set_setting(&self, name: &'static str, value: Vec<u8>) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                exec(
                    &s.0,
                    "INSERT INTO settings (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = ?2",
                    params![name, value],
                )?;
                Ok(())
            })
            .await
    }

    /// Creates or replaces a group.
    pub async fn put_group(&self, g: GroupDef, now: Timestamp) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                exec(
                    &s.0,
                    "INSERT INTO groups (name, customer, kind, tag, updated) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (name) DO UPDATE SET customer = ?2, kind = ?3, tag = ?4, updated = ?5",
                    params![
                        g.name,
                        g.customer.as_ref().map(|c| c.as_str().to_owned()),
                        g.kind.map(|k| k.as_str()),
                        g.tag,
                        now.as_millis()
                    ],
                )?;
                exec(&s.0, "DELETE FROM group_members WHERE grp = ?1", params![g.name])?;
                for m in &g.members {
                    exec(
                        &s.0,
                        "INSERT INTO group_members (grp, component) VALUES (?1, ?2)
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
                exec(
                    &s.0,
                    "DELETE FROM group_members WHERE grp = ?1",
                    params![name],
                )?;
                Ok(exec(&s.0, "DELETE FROM groups WHERE name = ?1", params![name])? > 0)
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
                let defs: Vec<GroupRow> = {
                    let mut st = s.0.prepare_cached(
                        "SELECT name, customer, kind, tag FROM groups
                         WHERE ?1 IS NULL OR name = ?1 ORDER BY name",
                    )?;
                    st.query_map(params![only], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                        .collect::<Result<_, _>>()?
                };
                let mut out = Vec::new();
                for (name, customer, kind, tag) in defs {
                    let mut g = GroupDef {
                        name,
                        customer: customer.and_then(|c| CustomerId::new(c).ok()),
                        kind: kind.as_deref().and_then(ComponentKind::parse),
                        tag,
                        members: Vec::new(),
                    };
                    let mut st = s.0.prepare_cached(
                        "SELECT component FROM group_members WHERE grp = ?1 ORDER BY component",
                    )?;
                    g.members = st
                        .query_map(params![g.name], |r| r.get::<_, String>(0))?
                        .filter_map(|r| r.ok().and_then(|c| RsId::new(c).ok()))
                        .collect();
                    let mut all: std::collections::BTreeSet<RsId> = g.members.iter().cloned().collect();
                    if g.has_selector() {
                        let mut st = s.0.prepare_cached(
                            "SELECT id FROM components
                             WHERE (?1 IS NULL OR customer = ?1) AND (?2 IS NULL OR kind = ?2)
                               AND (?3 IS NULL OR id IN (SELECT component FROM component_tags WHERE tag = ?3))",
                        )?;
                        let rows = st.query_map(
                            params![
                                g.customer.as_ref().map(|c| c.as_str().to_owned()),
                                g.kind.map(|k| k.as_str()),
                                g.tag
                            ],
                            |r| r.get::<_, String>(0),
                        )?;
                        for r in rows {
                            if let Ok(id) = RsId::new(r?) {
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
                let known =
                    s.0.query_row(
                        "SELECT 1 FROM components WHERE id = ?1",
                        params![component.as_str()],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if !known {
                    return Ok(false);
                }
                exec(
                    &s.0,
                    "DELETE FROM component_tags WHERE component = ?1",
                    params![component.as_str()],
                )?;
                for t in &tags {
                    exec(
                        &s.0,
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

fn bump_job(conn: &Connection, message: &MessageId) -> rusqlite::Result<()> {
    exec(
        conn,
        "UPDATE jobs SET version = version + 1 WHERE message = ?1",
        params![message.as_str()],
    )?;
    Ok(())
}

fn read_job(conn: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let head: Option<(String, i64, String, String, Option<i64>, i64)> = conn
        .query_row(
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
        )
        .optional()?;
    let Some((id, created, action, message, expiry, version)) = head else {
        return Ok(None);
    };
    let mut st = conn.prepare_cached(
        "SELECT dest, state, updated, code, text, result FROM job_targets WHERE job = ?1 ORDER BY dest",
    )?;
    let targets = st
        .query_map(params![id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .filter_map(Result::ok)
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

/// The tables of enrollments, admins and the audit log (`security.rs`).
const SECURITY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS enrollments (
    token_hash TEXT    PRIMARY KEY,
    customer   TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    component  TEXT,
    dns        TEXT    NOT NULL DEFAULT '',
    ips        TEXT    NOT NULL DEFAULT '',
    created    INTEGER NOT NULL,
    created_by TEXT    NOT NULL,
    expires    INTEGER NOT NULL,
    used_at    INTEGER,
    issued     TEXT,
    serial     TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq    INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,
    admin  TEXT    NOT NULL,
    peer   TEXT    NOT NULL,
    method TEXT    NOT NULL,
    path   TEXT    NOT NULL,
    status INTEGER NOT NULL,
    millis INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_admin ON audit (admin, seq);
";

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
    conn: &rusqlite::Connection,
    d: &Decided,
    now: Timestamp,
) -> Result<(), rs_store::db::DbError> {
    use rusqlite::params;
    if let Some(g) = &d.grant {
        exec(
            conn,
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
    let header = rs_protocol::codec::encode_header(&m.header, m.kind, m.data.as_ref());
    exec(
        conn,
        "INSERT INTO outbox (id, hop, created, expiry, kind, content_type, header, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            m.header.id.as_str(),
            d.hop,
            now.as_millis(),
            m.header.expiry().map(Timestamp::as_millis),
            m.kind.as_str(),
            m.content_type,
            header,
            &m.content[..]
        ],
    )?;
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
