//! The embedded spool: one SQLite file in WAL mode, owned by a dedicated
//! thread with group commit ([`crate::db`]).
//!
//! Durability: `synchronous=FULL`, so every commit fsyncs the WAL before
//! the caller hears "stored". A SIGKILL at any instant loses nothing
//! committed (the WAL is replayed on open), and neither does a power loss,
//! because the WAL reached the disk before the acknowledgement. The cost of
//! the fsync is shared: the thread commits every request waiting in its
//! queue in one transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Notify;

use super::{
    DEPTHS, DeadLetter, Depth, DropRecord, Enqueued, Fate, Settle, Spool, SpoolConfig, SpoolError,
    SpoolStats, Spooled,
};
use crate::db::{Db, DbError, DbState};
use rs_protocol::codec::{RawMessage, encode_header};
use rs_protocol::ids::MessageId;
use rs_protocol::outcome::{Code, Reason};
use rs_protocol::time::Timestamp;

/// Handle to the spool; cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteSpool {
    db: Db<Worker>,
    notify: Arc<Notify>,
}

fn db(e: rusqlite::Error) -> SpoolError {
    SpoolError::Db(e.to_string())
}

impl From<DbError> for SpoolError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Sql(s) => SpoolError::Db(s),
            DbError::Closed => SpoolError::Closed,
        }
    }
}

impl From<SpoolError> for DbError {
    fn from(e: SpoolError) -> Self {
        match e {
            SpoolError::Db(s) => DbError::Sql(s),
            SpoolError::Closed => DbError::Closed,
        }
    }
}

/// The spool's schema changes, in order (append only). Version 1 is the
/// schema of the releases before versions (`CREATE ... IF NOT EXISTS`), so
/// their files are adopted as they are, with what they hold.
pub const MIGRATIONS: &[crate::sql::Migration] = &[crate::sql::Migration {
    version: 1,
    name: "baseline",
    apply: |c| c.batch(SCHEMA),
}];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spool (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    precedence   INTEGER NOT NULL,
    persistent   INTEGER NOT NULL,
    expiry       INTEGER,
    created      INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    class        TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content      BLOB    NOT NULL
);
DROP INDEX IF EXISTS spool_order;
CREATE INDEX IF NOT EXISTS spool_due ON spool (precedence DESC, seq, next_attempt, expiry, bytes);
CREATE INDEX IF NOT EXISTS spool_evict ON spool (persistent, precedence, seq);
CREATE INDEX IF NOT EXISTS spool_expiry ON spool (expiry) WHERE expiry IS NOT NULL;
CREATE INDEX IF NOT EXISTS spool_created ON spool (created);
CREATE TABLE IF NOT EXISTS dead_letters (
    id           TEXT    PRIMARY KEY,
    at           INTEGER NOT NULL,
    code         TEXT    NOT NULL,
    reason       TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content      BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS drops (
    id         TEXT    NOT NULL,
    at         INTEGER NOT NULL,
    why        TEXT    NOT NULL,
    precedence INTEGER NOT NULL,
    persistent INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS drops_at ON drops (at);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    id TEXT    PRIMARY KEY,
    at INTEGER NOT NULL
);
";

/// A message as the database thread reads it for sending; its header is
/// parsed by the caller.
#[derive(Debug)]
struct Row {
    id: String,
    header: Vec<u8>,
    content_type: String,
    content: Bytes,
    attempts: u32,
    spooled_at: Timestamp,
}

/// How long drop records are kept.
const DROPS_KEPT: Duration = Duration::from_secs(30 * 86_400);

/// The state owned by the spool's database thread.
#[derive(Debug)]
struct Worker {
    conn: Connection,
    cfg: SpoolConfig,
    total_bytes: u64,
    /// Messages handed to the sender and not yet settled: ID to row.
    inflight: HashMap<String, i64>,
    /// The same rows, for skipping them while choosing the next batch.
    inflight_rows: HashSet<i64>,
}

impl DbState for Worker {
    // Only the byte count is restored after a failed job. The in-flight set
    // is not (copying it for every job was the spool's largest cost): a
    // message a failed settle took out of it is merely offered again, and
    // receivers drop duplicates.
    type Saved = u64;
    fn txn(&mut self) -> &mut dyn crate::db::Txn {
        &mut self.conn
    }
    fn save(&self) -> Self::Saved {
        self.total_bytes
    }
    fn restore(&mut self, saved: Self::Saved) {
        self.total_bytes = saved;
    }
}

impl SqliteSpool {
    /// Opens (creating if needed) the spool at `cfg.path`.
    pub fn open(cfg: SpoolConfig) -> Result<Self, SpoolError> {
        let conn =
            crate::sql::Conn::open(&crate::sql::Location::Sqlite(cfg.path.clone()), MIGRATIONS)?
                .into_sqlite()
                .ok_or_else(|| SpoolError::Db("the spool is an SQLite file".into()))?;
        let total_bytes: i64 = conn
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM spool", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let worker = Worker {
            conn,
            cfg,
            total_bytes: u64::try_from(total_bytes).unwrap_or(0),
            inflight: HashMap::new(),
            inflight_rows: HashSet::new(),
        };
        Ok(SqliteSpool {
            db: Db::start("rs-spool", worker)?,
            notify: Arc::new(Notify::new()),
        })
    }

    /// Gives back the page cache SQLite keeps (up to `cache_size`, see
    /// [`crate::db::open`]): a burst fills it and an idle spool needs none
    /// of it.
    pub async fn release_memory(&self) -> Result<(), SpoolError> {
        Ok(self.db.read(|w| Ok(w.conn.release_memory()?)).await?)
    }

    /// Woken whenever messages are stored (for the sender loop).
    pub fn notified(&self) -> Arc<Notify> {
        self.notify.clone()
    }
}

impl Spool for SqliteSpool {
    async fn replay_dead(
        &self,
        only: Option<MessageId>,
        now: Timestamp,
    ) -> Result<(u64, u64), SpoolError> {
        let r = self
            .db
            .write(move |w| Ok(w.replay_dead(only.as_ref().map(MessageId::as_str), now)?))
            .await?;
        if r.0 > 0 {
            self.notify.notify_one();
        }
        Ok(r)
    }

    async fn discard_dead(
        &self,
        only: Option<MessageId>,
        now: Timestamp,
    ) -> Result<u64, SpoolError> {
        Ok(self
            .db
            .write(move |w| {
                let id = only.as_ref().map(MessageId::as_str);
                exec(
                    &w.conn,
                    "INSERT INTO drops (id, at, why, precedence, persistent)
                     SELECT id, ?2, 'discarded', 0, 1 FROM dead_letters WHERE ?1 IS NULL OR id = ?1",
                    params![id, ms(now)],
                )
                .map_err(db)?;
                let n = exec(
                    &w.conn,
                    "DELETE FROM dead_letters WHERE ?1 IS NULL OR id = ?1",
                    params![id],
                )
                .map_err(db)?;
                Ok(n as u64)
            })
            .await?)
    }

    async fn enqueue(
        &self,
        msgs: Vec<RawMessage>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, SpoolError> {
        // The headers are written here, not on the database thread, which
        // every caller shares.
        let msgs: Vec<(RawMessage, Vec<u8>)> = msgs
            .into_iter()
            .map(|m| {
                let header = encode_header(&m.header, m.kind, m.data.as_ref());
                (m, header)
            })
            .collect();
        let r = self.db.write(move |w| Ok(w.enqueue(msgs, now)?)).await?;
        if r.contains(&Enqueued::Stored) {
            self.notify.notify_one();
        }
        Ok(r)
    }

    async fn dequeue(
        &self,
        max_messages: usize,
        max_bytes: usize,
        now: Timestamp,
        infrastructure_only: bool,
    ) -> Result<Vec<Spooled>, SpoolError> {
        let rows = self
            .db
            .read(move |w| Ok(w.dequeue(max_messages, max_bytes, now, infrastructure_only)?))
            .await?;
        // Headers are parsed here rather than on the database thread.
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            match super::stored_message(&r.header, r.content_type, r.content) {
                Ok(msg) => out.push(Spooled {
                    msg,
                    attempts: r.attempts,
                    spooled_at: r.spooled_at,
                }),
                // Cannot happen for what we wrote. It stays taken, so it is
                // not offered again until the next start.
                Err(e) => {
                    tracing::error!(message_id = %r.id, "spooled message has an unreadable header: {e}")
                }
            }
        }
        Ok(out)
    }

    async fn settle(
        &self,
        results: Vec<(MessageId, Settle)>,
        now: Timestamp,
    ) -> Result<(), SpoolError> {
        Ok(self
            .db
            .write_relaxed(move |w| Ok(w.settle(results, now)?))
            .await?)
    }

    async fn sweep(&self, now: Timestamp) -> Result<u64, SpoolError> {
        Ok(self.db.write_relaxed(move |w| Ok(w.sweep(now)?)).await?)
    }

    async fn next_due(&self) -> Result<Option<Timestamp>, SpoolError> {
        Ok(self.db.read(|w| Ok(w.next_due()?)).await?)
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        Ok(self.db.read(|w| Ok(w.stats()?)).await?)
    }

    async fn depths(&self) -> Result<Vec<Depth>, SpoolError> {
        Ok(self
            .db
            .read(|w| {
                let mut st = w.conn.prepare_cached(DEPTHS).map_err(db)?;
                let rows = st
                    .query_map([], |r| {
                        Ok(Depth {
                            precedence: r.get(0)?,
                            messages: r.get::<_, i64>(1)?.max(0) as u64,
                            bytes: r.get::<_, i64>(2)?.max(0) as u64,
                            oldest: r.get::<_, Option<i64>>(3)?.and_then(Timestamp::from_millis),
                        })
                    })
                    .map_err(db)?;
                Ok(rows.collect::<Result<Vec<_>, _>>().map_err(db)?)
            })
            .await?)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        Ok(self.db.read(move |w| Ok(w.dead(limit)?)).await?)
    }

    async fn drops(&self, limit: usize) -> Result<Vec<DropRecord>, SpoolError> {
        Ok(self.db.read(move |w| Ok(w.drop_records(limit)?)).await?)
    }

    async fn rebase(&self, by_ms: i64, now: Timestamp) -> Result<u64, SpoolError> {
        Ok(self
            .db
            .write_relaxed(move |w| {
                let n = exec(
                    &w.conn,
                    "UPDATE spool SET next_attempt = MAX(?2, next_attempt - ?1) WHERE next_attempt > ?2",
                    params![by_ms, now.as_millis()],
                )?;
                Ok(n as u64)
            })
            .await?)
    }

    async fn fate(&self, id: MessageId) -> Result<Fate, SpoolError> {
        Ok(self
            .db
            .read(move |w| {
                let c = &w.conn;
                let id = id.as_str();
                if c.query_row("SELECT 1 FROM spool WHERE id = ?1", [id], |_| Ok(()))
                    .optional()?
                    .is_some()
                {
                    return Ok(Fate::Waiting);
                }
                let dead: Option<(String, String)> = c
                    .query_row(
                        "SELECT code, reason FROM dead_letters WHERE id = ?1",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if let Some((code, text)) = dead {
                    return Ok(Fate::Dead(Reason {
                        code: Code::new(code).unwrap_or_else(|| Code::known("invalid")),
                        text,
                    }));
                }
                let why: Option<String> = c
                    .query_row("SELECT why FROM drops WHERE id = ?1", [id], |r| r.get(0))
                    .optional()?;
                Ok(why.map_or(Fate::Gone, Fate::Dropped))
            })
            .await?)
    }
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis()
}

/// Runs a statement through the connection's statement cache (the same few
/// statements run for every message).
fn exec(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
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

impl Worker {
    fn enqueue(
        &mut self,
        msgs: Vec<(RawMessage, Vec<u8>)>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, SpoolError> {
        let mut out = Vec::with_capacity(msgs.len());
        for (m, header) in msgs {
            out.push(self.enqueue_one(m, header, now).map_err(db)?);
        }
        Ok(out)
    }

    fn enqueue_one(
        &mut self,
        m: RawMessage,
        header: Vec<u8>,
        now: Timestamp,
    ) -> rusqlite::Result<Enqueued> {
        let id = m.header.id.as_str();
        if self.cfg.dedupe_window.is_some() {
            let fresh = exec(
                &self.conn,
                "INSERT INTO seen (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                params![id, ms(now)],
            )?;
            if fresh == 0 {
                bump(&self.conn, "duplicates", 1)?;
                return Ok(Enqueued::Duplicate);
            }
        }
        self.insert(m, header, now)
    }

    /// Dead letters back into the spool, as [`Spool::replay_dead`] says.
    /// They were received here once already, so the duplicate check of
    /// custody does not apply; room is made as for a new message.
    fn replay_dead(
        &mut self,
        only: Option<&str>,
        now: Timestamp,
    ) -> Result<(u64, u64), SpoolError> {
        let rows: Vec<(String, String, Vec<u8>, Vec<u8>)> = {
            let mut st = self
                .conn
                .prepare(
                    "SELECT id, content_type, header, content FROM dead_letters
                     WHERE ?1 IS NULL OR id = ?1 ORDER BY at, id",
                )
                .map_err(db)?;
            st.query_map(params![only], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?
        };
        let (mut back, mut stay) = (0, 0);
        for (id, content_type, header, content) in rows {
            let Ok(m) = super::stored_message(&header, content_type, Bytes::from(content)) else {
                tracing::warn!(message_id = %id, "dead letter: its stored header does not decode; kept");
                stay += 1;
                continue;
            };
            match self.insert(m, header, now).map_err(db)? {
                Enqueued::Refused(_) => stay += 1,
                // Stored, or (still) in the spool under the same ID.
                Enqueued::Stored | Enqueued::Duplicate => {
                    exec(
                        &self.conn,
                        "DELETE FROM dead_letters WHERE id = ?1",
                        params![id],
                    )
                    .map_err(db)?;
                    back += 1;
                }
            }
        }
        if back > 0 {
            tracing::info!("{back} dead letter(s) put back in the spool");
        }
        Ok((back, stay))
    }

    /// Stores one message in the spool (room made if it can be).
    fn insert(
        &mut self,
        m: RawMessage,
        header: Vec<u8>,
        now: Timestamp,
    ) -> rusqlite::Result<Enqueued> {
        let id = m.header.id.as_str();
        let qos = m.header.source().map(|s| s.qos).unwrap_or_default();
        let bytes = (header.len() + m.content.len()) as u64;
        if !self.cfg.fits(self.total_bytes, bytes, &m)
            && !self.make_room(bytes, qos.persistent, qos.precedence, now)?
        {
            bump(&self.conn, "refused", 1)?;
            return Ok(Enqueued::Refused(Reason {
                code: Code::known("disk-full"),
                text: format!(
                    "the spool is full ({} of {} bytes) of messages at least as important",
                    self.total_bytes, self.cfg.max_bytes
                ),
            }));
        }
        let n = exec(
            &self.conn,
            "INSERT INTO spool (id, precedence, persistent, expiry, created, bytes, next_attempt,
                                kind, content_type, header, content, class)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO NOTHING",
            params![
                id,
                qos.precedence,
                qos.persistent,
                qos.expiry.map(ms),
                ms(now),
                i64::try_from(bytes).unwrap_or(i64::MAX),
                m.kind.as_str(),
                m.content_type,
                header,
                &m.content[..],
                m.header.class.class.as_str(),
            ],
        )?;
        if n == 0 {
            bump(&self.conn, "duplicates", 1)?;
            return Ok(Enqueued::Duplicate);
        }
        self.total_bytes += bytes;
        Ok(Enqueued::Stored)
    }

    /// Evicts messages less important than (persistent, precedence) — not
    /// persistent before persistent, lower precedence first, oldest first —
    /// until `need` bytes fit. Returns false (evicting nothing) if they
    /// cannot be made to fit.
    fn make_room(
        &mut self,
        need: u64,
        persistent: bool,
        precedence: u8,
        now: Timestamp,
    ) -> rusqlite::Result<bool> {
        let mut victims = Vec::new();
        let mut freed = 0u64;
        {
            let mut st = self.conn.prepare(
                "SELECT seq, id, bytes, precedence, persistent FROM spool
                 WHERE persistent < ?1 OR (persistent = ?1 AND precedence <= ?2)
                 ORDER BY persistent, precedence, seq",
            )?;
            let mut rows = st.query(params![persistent, precedence])?;
            // In-flight messages may go too: if the attempt in flight
            // succeeds, its settlement finds the row gone and changes nothing.
            while self.total_bytes - freed + need > self.cfg.max_bytes {
                let Some(r) = rows.next()? else { break };
                let id: String = r.get(1)?;
                let b: i64 = r.get(2)?;
                freed += u64::try_from(b).unwrap_or(0);
                victims.push((
                    r.get::<_, i64>(0)?,
                    id,
                    r.get::<_, u8>(3)?,
                    r.get::<_, bool>(4)?,
                ));
            }
        }
        if self.total_bytes - freed + need > self.cfg.max_bytes {
            return Ok(false);
        }
        for (seq, id, prec, pers) in &victims {
            exec(&self.conn, "DELETE FROM spool WHERE seq = ?1", params![seq])?;
            exec(
                &self.conn,
                "INSERT INTO drops (id, at, why, precedence, persistent) VALUES (?1, ?2, 'evicted', ?3, ?4)",
                params![id, ms(now), prec, pers],
            )?;
        }
        tracing::warn!(
            "spool full: evicted {} messages ({freed} bytes)",
            victims.len()
        );
        bump(&self.conn, "evicted", victims.len() as u64)?;
        self.total_bytes -= freed;
        Ok(true)
    }

    fn dequeue(
        &mut self,
        max_messages: usize,
        max_bytes: usize,
        now: Timestamp,
        infrastructure_only: bool,
    ) -> Result<Vec<Row>, SpoolError> {
        // First the rows, from the index alone (spool_due holds every
        // column this reads): the messages in flight, skipped here, are at
        // the front of the order, and a backlog drained with several
        // envelopes in flight would otherwise read each of those rows
        // from the table on every call.
        let mut picked = Vec::new();
        let mut bytes = 0usize;
        {
            let mut st = self
                .conn
                .prepare_cached(if infrastructure_only {
                    "SELECT seq, bytes FROM spool
                     WHERE next_attempt <= ?1 AND (expiry IS NULL OR expiry > ?1)
                       AND class IN ('control', 'infrastructure')
                     ORDER BY precedence DESC, seq LIMIT ?2"
                } else {
                    "SELECT seq, bytes FROM spool
                     WHERE next_attempt <= ?1 AND (expiry IS NULL OR expiry > ?1)
                     ORDER BY precedence DESC, seq LIMIT ?2"
                })
                .map_err(db)?;
            let limit = i64::try_from(max_messages + self.inflight.len()).unwrap_or(i64::MAX);
            let mut rows = st.query(params![ms(now), limit]).map_err(db)?;
            while let Some(r) = rows.next().map_err(db)? {
                let seq: i64 = r.get(0).map_err(db)?;
                if self.inflight_rows.contains(&seq) {
                    continue;
                }
                let size = usize::try_from(r.get::<_, i64>(1).map_err(db)?).unwrap_or(usize::MAX);
                if !picked.is_empty() && (bytes + size > max_bytes || picked.len() >= max_messages)
                {
                    break;
                }
                bytes += size;
                picked.push(seq);
            }
        }
        // Then each chosen message.
        let mut out = Vec::with_capacity(picked.len());
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, attempts, created, content_type, header, content FROM spool
                 WHERE seq = ?1",
            )
            .map_err(db)?;
        for seq in picked {
            let row = st
                .query_row(params![seq], |r| {
                    let content: Vec<u8> = r.get(5)?;
                    Ok(Row {
                        id: r.get(0)?,
                        attempts: r.get(1)?,
                        spooled_at: Timestamp::from_millis(r.get(2)?).unwrap_or(now),
                        content_type: r.get(3)?,
                        header: r.get(4)?,
                        content: Bytes::from(content),
                    })
                })
                .map_err(db)?;
            self.inflight.insert(row.id.clone(), seq);
            self.inflight_rows.insert(seq);
            out.push(row);
        }
        Ok(out)
    }

    fn settle(
        &mut self,
        results: Vec<(MessageId, Settle)>,
        now: Timestamp,
    ) -> Result<(), SpoolError> {
        let mut delivered = 0u64;
        let mut expired = 0u64;
        for (id, s) in results {
            if let Some(seq) = self.inflight.remove(id.as_str()) {
                self.inflight_rows.remove(&seq);
            }
            if s == Settle::Delivered {
                // The common case in one statement.
                let size: Option<i64> = self
                    .conn
                    .prepare_cached("DELETE FROM spool WHERE id = ?1 RETURNING bytes")
                    .and_then(|mut st| st.query_row(params![id.as_str()], |r| r.get(0)).optional())
                    .map_err(db)?;
                if let Some(size) = size {
                    self.total_bytes -= u64::try_from(size).unwrap_or(0);
                    delivered += 1;
                }
                continue;
            }
            let size: Option<i64> = self
                .conn
                .query_row(
                    "SELECT bytes FROM spool WHERE id = ?1",
                    params![id.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            let Some(size) = size else { continue };
            let size = u64::try_from(size).unwrap_or(0);
            match s {
                Settle::Release | Settle::Delivered => {}
                Settle::Defer { at } => {
                    exec(
                        &self.conn,
                        "UPDATE spool SET next_attempt = ?2 WHERE id = ?1",
                        params![id.as_str(), ms(at)],
                    )
                    .map_err(db)?;
                }
                Settle::Retry { at } => {
                    exec(
                        &self.conn,
                        "UPDATE spool SET attempts = attempts + 1, next_attempt = ?2 WHERE id = ?1",
                        params![id.as_str(), ms(at)],
                    )
                    .map_err(db)?;
                }
                Settle::Expired => {
                    exec(&self.conn,
                            "INSERT INTO drops (id, at, why, precedence, persistent)
                             SELECT id, ?2, 'expired', precedence, persistent FROM spool WHERE id = ?1",
                            params![id.as_str(), ms(now)],
                        )
                        .map_err(db)?;
                    exec(
                        &self.conn,
                        "DELETE FROM spool WHERE id = ?1",
                        params![id.as_str()],
                    )
                    .map_err(db)?;
                    self.total_bytes -= size;
                    expired += 1;
                }
                Settle::Dead(reason) => {
                    exec(&self.conn,
                            "INSERT INTO dead_letters (id, at, code, reason, kind, content_type, header, content)
                             SELECT id, ?2, ?3, ?4, kind, content_type, header, content FROM spool WHERE id = ?1
                             ON CONFLICT (id) DO NOTHING",
                            params![id.as_str(), ms(now), reason.code.as_str(), reason.text],
                        )
                        .map_err(db)?;
                    exec(
                        &self.conn,
                        "DELETE FROM spool WHERE id = ?1",
                        params![id.as_str()],
                    )
                    .map_err(db)?;
                    self.total_bytes -= size;
                    tracing::warn!(message_id = %id, "dead-lettered: {reason}");
                }
            }
        }
        bump(&self.conn, "delivered", delivered).map_err(db)?;
        bump(&self.conn, "expired", expired).map_err(db)?;
        Ok(())
    }

    fn sweep(&mut self, now: Timestamp) -> Result<u64, SpoolError> {
        let oldest = ms(now) - i64::try_from(self.cfg.max_age.as_millis()).unwrap_or(i64::MAX);
        let mut dropped = 0;
        for (why, cond, bound) in [
            ("expired", "expiry IS NOT NULL AND expiry <= ?1", ms(now)),
            ("aged-out", "created < ?1", oldest),
        ] {
            let ids: Vec<(String, i64)> = {
                let mut st = self
                    .conn
                    .prepare(&format!("SELECT id, bytes FROM spool WHERE {cond}"))
                    .map_err(db)?;
                st.query_map(params![bound], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db)?
                    .collect::<Result<_, _>>()
                    .map_err(db)?
            };
            let ids: Vec<(String, i64)> = ids
                .into_iter()
                .filter(|(id, _)| !self.inflight.contains_key(id))
                .collect();
            for (id, size) in &ids {
                exec(
                    &self.conn,
                    "INSERT INTO drops (id, at, why, precedence, persistent)
                         SELECT id, ?2, ?3, precedence, persistent FROM spool WHERE id = ?1",
                    params![id, ms(now), why],
                )
                .map_err(db)?;
                exec(&self.conn, "DELETE FROM spool WHERE id = ?1", params![id]).map_err(db)?;
                self.total_bytes -= u64::try_from(*size).unwrap_or(0);
            }
            if !ids.is_empty() {
                tracing::info!("spool sweep: {} messages {why}", ids.len());
            }
            bump(
                &self.conn,
                if why == "expired" {
                    "expired"
                } else {
                    "aged-out"
                },
                ids.len() as u64,
            )
            .map_err(db)?;
            dropped += ids.len() as u64;
        }
        let kept = ms(now) - i64::try_from(DROPS_KEPT.as_millis()).unwrap_or(i64::MAX);
        exec(&self.conn, "DELETE FROM drops WHERE at < ?1", params![kept]).map_err(db)?;
        if let Some(w) = self.cfg.dedupe_window {
            let horizon = ms(now) - i64::try_from(w.as_millis()).unwrap_or(i64::MAX);
            exec(
                &self.conn,
                "DELETE FROM seen WHERE at < ?1",
                params![horizon],
            )
            .map_err(db)?;
        }
        Ok(dropped)
    }

    fn next_due(&self) -> Result<Option<Timestamp>, SpoolError> {
        // In-flight messages are few; skip them in Rust.
        let mut st = self
            .conn
            .prepare_cached("SELECT id, next_attempt FROM spool ORDER BY next_attempt LIMIT ?1")
            .map_err(db)?;
        let limit = i64::try_from(self.inflight.len() + 1).unwrap_or(i64::MAX);
        let mut rows = st.query(params![limit]).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            let id: String = r.get(0).map_err(db)?;
            if !self.inflight.contains_key(&id) {
                return Ok(Timestamp::from_millis(r.get(1).map_err(db)?));
            }
        }
        Ok(None)
    }

    fn counter(&self, name: &str) -> Result<u64, SpoolError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM counters WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        Ok(u64::try_from(v.unwrap_or(0)).unwrap_or(0))
    }

    fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let (messages, dead, oldest): (i64, i64, Option<i64>) = self
            .conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM spool), (SELECT COUNT(*) FROM dead_letters),
                        (SELECT MIN(created) FROM spool)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(db)?;
        Ok(SpoolStats {
            messages: u64::try_from(messages).unwrap_or(0),
            bytes: self.total_bytes,
            dead_letters: u64::try_from(dead).unwrap_or(0),
            delivered_total: self.counter("delivered")?,
            expired_total: self.counter("expired")?,
            evicted_total: self.counter("evicted")?,
            aged_out_total: self.counter("aged-out")?,
            refused_total: self.counter("refused")?,
            duplicates_total: self.counter("duplicates")?,
            oldest: oldest.and_then(Timestamp::from_millis),
        })
    }

    fn dead(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        let mut st = self
            .conn
            .prepare("SELECT id, at, code, reason FROM dead_letters ORDER BY at DESC LIMIT ?1")
            .map_err(db)?;
        let rows = st
            .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, code, text) = row.map_err(db)?;
            out.push(DeadLetter {
                id: MessageId::new(id).map_err(|e| SpoolError::Db(e.to_string()))?,
                at: Timestamp::from_millis(at).unwrap_or_else(Timestamp::now),
                reason: Reason {
                    code: Code::new(code).unwrap_or_else(|| Code::known("invalid")),
                    text,
                },
            });
        }
        Ok(out)
    }

    fn drop_records(&self, limit: usize) -> Result<Vec<DropRecord>, SpoolError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, at, why, precedence, persistent FROM drops ORDER BY at DESC LIMIT ?1",
            )
            .map_err(db)?;
        let rows = st
            .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u8>(3)?,
                    r.get::<_, bool>(4)?,
                ))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, why, precedence, persistent) = row.map_err(db)?;
            out.push(DropRecord {
                id: MessageId::new(id).map_err(|e| SpoolError::Db(e.to_string()))?,
                at: Timestamp::from_millis(at).unwrap_or_else(Timestamp::now),
                why,
                precedence,
                persistent,
            });
        }
        Ok(out)
    }
}

/// What a check of a spool file found (`rs-proxy spool verify`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// `ok`, or what SQLite's integrity check reported.
    pub integrity: String,
    /// The schema version recorded (0: none, a file from before versions).
    pub version: i64,
    /// Waiting messages by precedence (highest first): (precedence,
    /// messages, bytes).
    pub by_precedence: Vec<(u8, u64, u64)>,
    /// Of the waiting, those held back until later (backoff, throttle).
    pub later: u64,
    /// Of the waiting, those whose expiry has passed (the next sweep drops
    /// them).
    pub expired: u64,
    pub dead_letters: u64,
    /// Drop records kept, by why.
    pub drops: Vec<(String, u64)>,
}

impl Verified {
    pub fn is_ok(&self) -> bool {
        self.integrity == "ok"
    }
}

/// Checks the spool file at `path` without changing it: SQLite's full
/// integrity check, the schema version, and what the spool holds by state
/// and precedence (counts only where the file can be read).
pub fn verify(path: &std::path::Path, now: Timestamp) -> Result<Verified, SpoolError> {
    if !path.exists() {
        return Err(SpoolError::Db(format!("{}: no such file", path.display())));
    }
    let c = crate::db::open_read_only(path).map_err(db)?;
    let mut problems: Vec<String> = Vec::new();
    let checked = c.prepare("PRAGMA integrity_check").and_then(|mut st| {
        st.query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()
    });
    match checked {
        Ok(lines) => problems.extend(lines.into_iter().filter(|l| l != "ok")),
        Err(e) => problems.push(e.to_string()),
    }
    let mut v = Verified {
        integrity: if problems.is_empty() {
            "ok".into()
        } else {
            problems.join("; ")
        },
        ..Verified::default()
    };
    // The counts are best effort on a damaged file.
    v.version = c
        .query_row("SELECT COALESCE(MAX(version), 0) FROM rs_schema", [], |r| {
            r.get(0)
        })
        .unwrap_or(0);
    if let Ok(mut st) = c.prepare(
        "SELECT precedence, COUNT(*), COALESCE(SUM(bytes), 0) FROM spool
         GROUP BY precedence ORDER BY precedence DESC",
    ) && let Ok(rows) = st.query_map([], |r| {
        Ok((r.get::<_, u8>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        for (p, n, b) in rows.flatten() {
            v.by_precedence.push((p, n as u64, b as u64));
        }
    }
    let count = |sql: &str| -> u64 {
        c.query_row(sql, params![ms(now)], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .unwrap_or(0)
    };
    v.later = count("SELECT COUNT(*) FROM spool WHERE next_attempt > ?1");
    v.expired = count("SELECT COUNT(*) FROM spool WHERE expiry IS NOT NULL AND expiry <= ?1");
    v.dead_letters = c
        .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
        .unwrap_or(0);
    if let Ok(mut st) = c.prepare("SELECT why, COUNT(*) FROM drops GROUP BY why ORDER BY why")
        && let Ok(rows) = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
    {
        v.drops = rows.flatten().map(|(w, n)| (w, n as u64)).collect();
    }
    Ok(v)
}

/// A spool file that failed its check at start, moved aside and replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the damaged file is now (with its `-wal` and `-shm`).
    pub moved_to: std::path::PathBuf,
    /// What the check found.
    pub problem: String,
    /// Messages read from it and spooled again.
    pub salvaged: u64,
    /// When.
    pub at: Timestamp,
}

/// Whether an error opening a spool means its file is damaged (rather
/// than, say, unreadable for want of rights or disk).
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// The problem that makes the spool file at `path` unusable, if any: it
/// is not a database, or SQLite's quick check finds damage. `Err`: the
/// file could not be checked at all (not damage: rights, disk).
fn damage(path: &std::path::Path) -> Result<Option<String>, SpoolError> {
    if !path.exists() {
        return Ok(None);
    }
    let c = match crate::db::open_read_only(path) {
        Ok(c) => c,
        Err(e) if is_damage(&e) => return Ok(Some(e.to_string())),
        Err(e) => return Err(db(e)),
    };
    let lines: Result<Vec<String>, rusqlite::Error> = c
        .prepare("PRAGMA quick_check")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect());
    match lines {
        Ok(l) if l.iter().all(|x| x == "ok") => Ok(None),
        Ok(l) => Ok(Some(l.join("; "))),
        Err(e) if is_damage(&e) => Ok(Some(e.to_string())),
        Err(e) => Err(db(e)),
    }
}

/// Reads what can still be read from a damaged spool file: every waiting
/// message whose row and header are intact, in the spool's order.
fn salvage(path: &std::path::Path) -> Vec<RawMessage> {
    let Ok(c) = crate::db::open_read_only(path) else {
        return Vec::new();
    };
    // The table alone, in its own order (no index, which may be what is
    // damaged); sorted into the spool's order here.
    let Ok(mut st) = c.prepare("SELECT seq, precedence, header, content_type, content FROM spool")
    else {
        return Vec::new();
    };
    let Ok(mut rows) = st.query([]) else {
        return Vec::new();
    };
    /// One stored message as read: seq, precedence, header, content
    /// type, content.
    type Found = (i64, u8, Vec<u8>, String, Vec<u8>);
    let mut found = Vec::new();
    // A damaged page ends the scan with an error: what came before it is
    // kept.
    while let Ok(Some(r)) = rows.next() {
        let row: rusqlite::Result<Found> =
            (|| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))();
        if let Ok((seq, precedence, header, content_type, content)) = row
            && let Ok(m) = super::stored_message(&header, content_type, Bytes::from(content))
        {
            found.push((std::cmp::Reverse(precedence), seq, m));
        }
    }
    found.sort_by_key(|(p, seq, _)| (*p, *seq));
    found.into_iter().map(|(_, _, m)| m).collect()
}

impl SqliteSpool {
    /// Opens the spool at `cfg.path`; if its file fails its check (damaged,
    /// or not a database at all), moves it aside (`spool.db.damaged-<ms>`,
    /// with its `-wal` and `-shm`) and starts a new spool in its place,
    /// instead of failing to start: the caller then spools again what can
    /// be read from the old file ([`SqliteSpool::salvage_from`]) and
    /// reports the [`Recovery`]. A file that cannot be checked for another
    /// reason (rights, disk) is an error, and nothing is moved.
    pub fn open_or_recover(
        cfg: SpoolConfig,
        now: Timestamp,
    ) -> Result<(Self, Option<Recovery>), SpoolError> {
        let path = cfg.path.clone();
        let Some(problem) = damage(&path)? else {
            return Ok((SqliteSpool::open(cfg)?, None));
        };
        let mut moved_to = path.clone().into_os_string();
        moved_to.push(format!(".damaged-{}", ms(now)));
        let moved_to = std::path::PathBuf::from(moved_to);
        for suffix in ["", "-wal", "-shm"] {
            let mut from = path.clone().into_os_string();
            from.push(suffix);
            let mut to = moved_to.clone().into_os_string();
            to.push(suffix);
            if std::path::Path::new(&from).exists() {
                std::fs::rename(&from, &to).map_err(|e| {
                    SpoolError::Db(format!("moving the damaged spool {}: {e}", path.display()))
                })?;
            }
        }
        tracing::error!(
            "the spool {} is damaged ({problem}); moved to {} and started anew",
            path.display(),
            moved_to.display()
        );
        Ok((
            SqliteSpool::open(cfg)?,
            Some(Recovery {
                moved_to,
                problem,
                salvaged: 0,
                at: now,
            }),
        ))
    }

    /// Spools again every message that can still be read from the damaged
    /// spool file at `path` (duplicates of what is here already are
    /// recognised by ID); returns how many were stored.
    pub async fn salvage_from(
        &self,
        path: &std::path::Path,
        now: Timestamp,
    ) -> Result<u64, SpoolError> {
        let path = path.to_owned();
        let found = tokio::task::spawn_blocking(move || salvage(&path))
            .await
            .map_err(|e| SpoolError::Db(e.to_string()))?;
        let mut salvaged = 0;
        for chunk in found.chunks(256) {
            let r = self.enqueue(chunk.to_vec(), now).await?;
            salvaged += r.iter().filter(|e| **e == Enqueued::Stored).count() as u64;
        }
        tracing::warn!("{salvaged} message(s) read from the damaged spool and spooled again");
        Ok(salvaged)
    }
}
