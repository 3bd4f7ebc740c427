//! The embedded spool: one SQLite file in WAL mode, owned by a dedicated
//! thread (SQLite calls never run on async workers), with group commit.
//!
//! Durability: `synchronous=FULL`, so every commit fsyncs the WAL before
//! the caller hears "stored". A SIGKILL at any instant loses nothing
//! committed (the WAL is replayed on open), and neither does a power loss,
//! because the WAL reached the disk before the acknowledgement. The cost of
//! the fsync is shared: the thread takes every request waiting in its queue
//! and commits them in one transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{
    DeadLetter, DropRecord, Enqueued, Settle, Spool, SpoolConfig, SpoolError, SpoolStats, Spooled,
};
use crate::codec::{Limits, RawMessage, decode_header_part, encode_header};
use crate::ids::MessageId;
use crate::model::ContentKind;
use crate::outcome::{Code, Reason};
use crate::time::Timestamp;

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Cmd {
    Enqueue(Vec<RawMessage>, Timestamp, Reply<Vec<Enqueued>>),
    Dequeue(usize, usize, Timestamp, Reply<Vec<Spooled>>),
    Settle(Vec<(MessageId, Settle)>, Timestamp, Reply<()>),
    Sweep(Timestamp, Reply<u64>),
    NextDue(Reply<Option<Timestamp>>),
    Stats(Reply<SpoolStats>),
    Dead(usize, Reply<Vec<DeadLetter>>),
    Drops(usize, Reply<Vec<DropRecord>>),
}

/// Handle to the spool thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteSpool {
    tx: mpsc::Sender<Cmd>,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("spool command")
    }
}

fn db(e: rusqlite::Error) -> SpoolError {
    SpoolError::Db(e.to_string())
}

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
    kind         TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content      BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_order ON spool (precedence DESC, seq);
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

/// How long drop records are kept.
const DROPS_KEPT: Duration = Duration::from_secs(30 * 86_400);

struct Worker {
    conn: Connection,
    cfg: SpoolConfig,
    total_bytes: u64,
    inflight: HashSet<String>,
    limits: Limits,
}

impl SqliteSpool {
    /// Opens (creating if needed) the spool at `cfg.path`.
    pub fn open(cfg: SpoolConfig) -> Result<Self, SpoolError> {
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| SpoolError::Db(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(&cfg.path).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
        )
        .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let total_bytes: i64 = conn
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM spool", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let mut worker = Worker {
            conn,
            cfg,
            total_bytes: u64::try_from(total_bytes).unwrap_or(0),
            inflight: HashSet::new(),
            limits: Limits::default(),
        };
        let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
        std::thread::Builder::new()
            .name("rs-spool".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    worker.run_batch(batch);
                }
            })
            .map_err(|e| SpoolError::Db(format!("cannot start the spool thread: {e}")))?;
        Ok(SqliteSpool {
            tx,
            notify: Arc::new(Notify::new()),
        })
    }

    /// Woken whenever messages are stored (for the sender loop).
    pub fn notified(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    async fn call<T>(&self, f: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(f(tx)).await.map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }
}

impl Spool for SqliteSpool {
    async fn enqueue(
        &self,
        msgs: Vec<RawMessage>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, SpoolError> {
        let r = self.call(|tx| Cmd::Enqueue(msgs, now, tx)).await?;
        if r.iter().any(|e| *e == Enqueued::Stored) {
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
        Ok(r)
    }

    async fn dequeue(
        &self,
        max_messages: usize,
        max_bytes: usize,
        now: Timestamp,
    ) -> Result<Vec<Spooled>, SpoolError> {
        self.call(|tx| Cmd::Dequeue(max_messages, max_bytes, now, tx))
            .await
    }

    async fn settle(
        &self,
        results: Vec<(MessageId, Settle)>,
        now: Timestamp,
    ) -> Result<(), SpoolError> {
        self.call(|tx| Cmd::Settle(results, now, tx)).await
    }

    async fn sweep(&self, now: Timestamp) -> Result<u64, SpoolError> {
        self.call(|tx| Cmd::Sweep(now, tx)).await
    }

    async fn next_due(&self) -> Result<Option<Timestamp>, SpoolError> {
        self.call(Cmd::NextDue).await
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.call(Cmd::Stats).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        self.call(|tx| Cmd::Dead(limit, tx)).await
    }

    async fn drops(&self, limit: usize) -> Result<Vec<DropRecord>, SpoolError> {
        self.call(|tx| Cmd::Drops(limit, tx)).await
    }
}

/// Replies waiting for the batch's commit.
enum Pending {
    Enqueue(Reply<Vec<Enqueued>>, Result<Vec<Enqueued>, SpoolError>),
    Settle(Reply<()>, Result<(), SpoolError>),
    Sweep(Reply<u64>, Result<u64, SpoolError>),
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis()
}

fn bump(conn: &Connection, name: &str, by: u64) -> rusqlite::Result<()> {
    if by > 0 {
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = value + ?2",
            params![name, i64::try_from(by).unwrap_or(i64::MAX)],
        )?;
    }
    Ok(())
}

impl Worker {
    fn run_batch(&mut self, batch: Vec<Cmd>) {
        // Writes share one transaction and hear back only after it commits.
        let mut pending = Vec::new();
        let began = self.conn.execute_batch("BEGIN IMMEDIATE").map_err(db);
        let saved_bytes = self.total_bytes;
        for cmd in batch {
            match cmd {
                Cmd::Enqueue(msgs, now, tx) => {
                    let r = self.in_savepoint(&began, |w| w.enqueue(msgs, now));
                    pending.push(Pending::Enqueue(tx, r));
                }
                Cmd::Settle(results, now, tx) => {
                    let r = self.in_savepoint(&began, |w| w.settle(results, now));
                    pending.push(Pending::Settle(tx, r));
                }
                Cmd::Sweep(now, tx) => {
                    let r = self.in_savepoint(&began, |w| w.sweep(now));
                    pending.push(Pending::Sweep(tx, r));
                }
                // Reads answer at once; they see this transaction's writes.
                Cmd::Dequeue(n, b, now, tx) => {
                    let _ = tx.send(self.dequeue(n, b, now));
                }
                Cmd::NextDue(tx) => {
                    let _ = tx.send(self.next_due());
                }
                Cmd::Stats(tx) => {
                    let _ = tx.send(self.stats());
                }
                Cmd::Dead(limit, tx) => {
                    let _ = tx.send(self.dead(limit));
                }
                Cmd::Drops(limit, tx) => {
                    let _ = tx.send(self.drop_records(limit));
                }
            }
        }
        let committed = match began {
            Ok(()) => self.conn.execute_batch("COMMIT").map_err(db),
            Err(e) => Err(e),
        };
        if let Err(e) = &committed {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.total_bytes = saved_bytes;
            tracing::error!("spool commit failed: {e}");
        }
        for p in pending {
            match p {
                Pending::Enqueue(tx, r) => {
                    let _ = tx.send(after_commit(&committed, r));
                }
                Pending::Settle(tx, r) => {
                    let _ = tx.send(after_commit(&committed, r));
                }
                Pending::Sweep(tx, r) => {
                    let _ = tx.send(after_commit(&committed, r));
                }
            }
        }
    }

    /// Runs one write command so that its failure undoes all of it and
    /// nothing of the other commands in the batch.
    fn in_savepoint<T>(
        &mut self,
        began: &Result<(), SpoolError>,
        f: impl FnOnce(&mut Self) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        began.as_ref().map_err(clone_err)?;
        self.conn.execute_batch("SAVEPOINT cmd").map_err(db)?;
        let saved = (self.total_bytes, self.inflight.clone());
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("RELEASE cmd").map_err(db)?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK TO cmd; RELEASE cmd");
                (self.total_bytes, self.inflight) = saved;
                Err(e)
            }
        }
    }

    fn enqueue(
        &mut self,
        msgs: Vec<RawMessage>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, SpoolError> {
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            out.push(self.enqueue_one(m, now).map_err(db)?);
        }
        Ok(out)
    }

    fn enqueue_one(&mut self, m: RawMessage, now: Timestamp) -> rusqlite::Result<Enqueued> {
        let id = m.header.id.as_str().to_owned();
        if self.cfg.dedupe_window.is_some() {
            let fresh = self.conn.execute(
                "INSERT INTO seen (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                params![id, ms(now)],
            )?;
            if fresh == 0 {
                bump(&self.conn, "duplicates", 1)?;
                return Ok(Enqueued::Duplicate);
            }
        }
        let qos = m.header.source().map(|s| s.qos).unwrap_or_default();
        let header = encode_header(&m.header, m.kind, m.data.as_ref());
        let bytes = (header.len() + m.content.len()) as u64;
        if self.total_bytes + bytes > self.cfg.max_bytes
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
        let n = self.conn.execute(
            "INSERT INTO spool (id, precedence, persistent, expiry, created, bytes, next_attempt,
                                kind, content_type, header, content)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10)
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
            while self.total_bytes - freed + need > self.cfg.max_bytes {
                let Some(r) = rows.next()? else { break };
                let id: String = r.get(1)?;
                if self.inflight.contains(&id) {
                    continue;
                }
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
            self.conn
                .execute("DELETE FROM spool WHERE seq = ?1", params![seq])?;
            self.conn.execute(
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
    ) -> Result<Vec<Spooled>, SpoolError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, attempts, created, kind, content_type, header, content, bytes FROM spool
                 WHERE next_attempt <= ?1 AND (expiry IS NULL OR expiry > ?1)
                 ORDER BY precedence DESC, seq LIMIT ?2",
            )
            .map_err(db)?;
        let limit = i64::try_from(max_messages + self.inflight.len()).unwrap_or(i64::MAX);
        let mut rows = st.query(params![ms(now), limit]).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            let id: String = r.get(0).map_err(db)?;
            if self.inflight.contains(&id) {
                continue;
            }
            let size = usize::try_from(r.get::<_, i64>(7).map_err(db)?).unwrap_or(usize::MAX);
            if !out.is_empty() && (bytes + size > max_bytes || out.len() >= max_messages) {
                break;
            }
            let header: Vec<u8> = r.get(5).map_err(db)?;
            let (header, kind, data) = match decode_header_part(&header, &self.limits) {
                Ok(h) => h,
                Err(e) => {
                    // Cannot happen for what we wrote; keep it out of the way.
                    tracing::error!("spooled message {id} has an unreadable header: {e}");
                    continue;
                }
            };
            let kind_s: String = r.get(3).map_err(db)?;
            debug_assert_eq!(ContentKind::parse(&kind_s), Some(kind));
            let content: Vec<u8> = r.get(6).map_err(db)?;
            out.push(Spooled {
                msg: RawMessage {
                    header,
                    kind,
                    data,
                    content_type: r.get(4).map_err(db)?,
                    content: Bytes::from(content),
                },
                attempts: r.get(1).map_err(db)?,
                spooled_at: Timestamp::from_millis(r.get(2).map_err(db)?).unwrap_or(now),
            });
            bytes += size;
            self.inflight.insert(id);
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
            self.inflight.remove(id.as_str());
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
                Settle::Release => {}
                Settle::Retry { at } => {
                    self.conn
                        .execute(
                            "UPDATE spool SET attempts = attempts + 1, next_attempt = ?2 WHERE id = ?1",
                            params![id.as_str(), ms(at)],
                        )
                        .map_err(db)?;
                }
                Settle::Delivered => {
                    self.conn
                        .execute("DELETE FROM spool WHERE id = ?1", params![id.as_str()])
                        .map_err(db)?;
                    self.total_bytes -= size;
                    delivered += 1;
                }
                Settle::Expired => {
                    self.conn
                        .execute(
                            "INSERT INTO drops (id, at, why, precedence, persistent)
                             SELECT id, ?2, 'expired', precedence, persistent FROM spool WHERE id = ?1",
                            params![id.as_str(), ms(now)],
                        )
                        .map_err(db)?;
                    self.conn
                        .execute("DELETE FROM spool WHERE id = ?1", params![id.as_str()])
                        .map_err(db)?;
                    self.total_bytes -= size;
                    expired += 1;
                }
                Settle::Dead(reason) => {
                    self.conn
                        .execute(
                            "INSERT INTO dead_letters (id, at, code, reason, kind, content_type, header, content)
                             SELECT id, ?2, ?3, ?4, kind, content_type, header, content FROM spool WHERE id = ?1
                             ON CONFLICT (id) DO NOTHING",
                            params![id.as_str(), ms(now), reason.code.as_str(), reason.text],
                        )
                        .map_err(db)?;
                    self.conn
                        .execute("DELETE FROM spool WHERE id = ?1", params![id.as_str()])
                        .map_err(db)?;
                    self.total_bytes -= size;
                    tracing::warn!("message {id} dead-lettered: {reason}");
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
        for (why, cond) in [
            ("expired", "expiry IS NOT NULL AND expiry <= ?1"),
            ("aged-out", "created < ?2"),
        ] {
            let ids: Vec<(String, i64)> = {
                let mut st = self
                    .conn
                    .prepare(&format!("SELECT id, bytes FROM spool WHERE {cond}"))
                    .map_err(db)?;
                st.query_map(params![ms(now), oldest], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db)?
                    .collect::<Result<_, _>>()
                    .map_err(db)?
            };
            let ids: Vec<(String, i64)> = ids
                .into_iter()
                .filter(|(id, _)| !self.inflight.contains(id))
                .collect();
            for (id, size) in &ids {
                self.conn
                    .execute(
                        "INSERT INTO drops (id, at, why, precedence, persistent)
                         SELECT id, ?2, ?3, precedence, persistent FROM spool WHERE id = ?1",
                        params![id, ms(now), why],
                    )
                    .map_err(db)?;
                self.conn
                    .execute("DELETE FROM spool WHERE id = ?1", params![id])
                    .map_err(db)?;
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
        self.conn
            .execute("DELETE FROM drops WHERE at < ?1", params![kept])
            .map_err(db)?;
        if let Some(w) = self.cfg.dedupe_window {
            let horizon = ms(now) - i64::try_from(w.as_millis()).unwrap_or(i64::MAX);
            self.conn
                .execute("DELETE FROM seen WHERE at < ?1", params![horizon])
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
            if !self.inflight.contains(&id) {
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
        let (messages, dead): (i64, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM spool), (SELECT COUNT(*) FROM dead_letters)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
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

/// A command's result as its caller may hear it: an error if the batch did
/// not commit.
fn after_commit<T>(
    committed: &Result<(), SpoolError>,
    r: Result<T, SpoolError>,
) -> Result<T, SpoolError> {
    match committed {
        Ok(()) => r,
        Err(e) => Err(clone_err(e)),
    }
}

fn clone_err(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Db(s) => SpoolError::Db(s.clone()),
        SpoolError::Closed => SpoolError::Closed,
    }
}
