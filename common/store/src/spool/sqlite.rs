//! The embedded spool: the waiting messages in an append-only segment log
//! ([`super::log`]) with their index in memory, and what is kept beside
//! them (dead letters, drop records, counters, the IDs a custody spool
//! has seen) in one SQLite file in WAL mode; both owned by a dedicated
//! thread with group commit ([`crate::db`]).
//!
//! Durability: the thread takes every request waiting in its queue and
//! writes the batch's messages to the log with one `fdatasync`, then
//! commits the SQLite transaction (`synchronous=FULL` when it changed
//! anything that must last), and only then does any caller hear "stored".
//! A SIGKILL at any instant loses nothing acknowledged (the log is read
//! back at start, a torn last record ignored), and neither does a power
//! loss. Each message is written once: the log's record is what is sent,
//! and its removal is a small record written after the commit.
//!
//! Memory: the index holds about 200 bytes per waiting message (a million
//! waiting messages, about 200 MB).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Notify;

use super::log::{self, Loc, Log, Meta};
use super::{
    DeadLetter, Depth, DropRecord, Enqueued, Fate, Settle, Spool, SpoolConfig, SpoolError,
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
    header: Bytes,
    content_type: String,
    content: Bytes,
    attempts: u32,
    spooled_at: Timestamp,
}

/// How long drop records are kept.
const DROPS_KEPT: Duration = Duration::from_secs(30 * 86_400);

/// A spool whose live records are under this size is started afresh in a
/// new segment once empty (the old one is then deleted).
const EMPTY_ROTATE_BYTES: u64 = 1 << 20;

/// At most this much is copied forward by one compaction step.
const COMPACT_STEP_BYTES: u64 = 16 << 20;

/// A waiting message: where its put record is, and its state.
#[derive(Debug, Clone)]
struct Entry {
    id: Arc<str>,
    meta: Meta,
    loc: Loc,
}

/// The index of the waiting messages, in memory (rebuilt from the log at
/// start): by seq, by ID, in sending order, in eviction order, by expiry,
/// and the totals by precedence.
#[derive(Debug, Default)]
struct Waiting {
    entries: BTreeMap<u64, Entry>,
    by_id: HashMap<Arc<str>, u64>,
    /// Sending order: highest precedence first, then oldest.
    order: BTreeSet<(Reverse<u8>, u64)>,
    /// Eviction order: not persistent first, lowest precedence, oldest.
    evict: BTreeSet<(bool, u8, u64)>,
    expiring: BTreeSet<(i64, u64)>,
    /// Messages and bytes by precedence.
    prec: BTreeMap<u8, (u64, u64)>,
    total_bytes: u64,
}

impl Waiting {
    /// Puts `new` (or nothing) in the place of seq; returns what was there.
    fn set(&mut self, seq: u64, new: Option<Entry>) -> Option<Entry> {
        let old = self.entries.remove(&seq);
        if let Some(o) = &old {
            let m = &o.meta;
            self.by_id.remove(&o.id);
            self.order.remove(&(Reverse(m.precedence), seq));
            self.evict.remove(&(m.persistent, m.precedence, seq));
            if let Some(x) = m.expiry {
                self.expiring.remove(&(x, seq));
            }
            if let Some(p) = self.prec.get_mut(&m.precedence) {
                p.0 -= 1;
                p.1 -= m.bytes;
                if p.0 == 0 {
                    self.prec.remove(&m.precedence);
                }
            }
            self.total_bytes -= m.bytes;
        }
        if let Some(n) = new {
            let m = &n.meta;
            self.by_id.insert(n.id.clone(), seq);
            self.order.insert((Reverse(m.precedence), seq));
            self.evict.insert((m.persistent, m.precedence, seq));
            if let Some(x) = m.expiry {
                self.expiring.insert((x, seq));
            }
            let p = self.prec.entry(m.precedence).or_default();
            p.0 += 1;
            p.1 += m.bytes;
            self.total_bytes += m.bytes;
            self.entries.insert(seq, n);
        }
        old
    }

    /// When the longest-waiting message of precedence `p` was spooled.
    fn oldest_of(&self, p: u8) -> Option<i64> {
        let (_, seq) = self
            .order
            .range((Reverse(p), 0)..=(Reverse(p), u64::MAX))
            .next()?;
        self.entries.get(seq).map(|e| e.meta.created)
    }

    fn oldest(&self) -> Option<i64> {
        self.prec.keys().filter_map(|p| self.oldest_of(*p)).min()
    }
}

/// The state owned by the spool's database thread.
#[derive(Debug)]
struct Worker {
    conn: Connection,
    cfg: SpoolConfig,
    log: Log,
    waiting: Waiting,
    next_seq: u64,
    /// Messages handed to the sender and not yet settled.
    inflight: HashSet<u64>,
    /// What the current batch changed in the index, to undo it if a job
    /// or the batch fails: seq and what was there before.
    journal: Vec<(u64, Option<Entry>)>,
}

impl DbState for Worker {
    // The index's changes are undone from the journal; the in-flight set
    // is not restored (a message a failed settle took out of it is merely
    // offered again, and receivers drop duplicates).
    type Saved = (usize, log::Mark);
    fn txn(&mut self) -> &mut dyn crate::db::Txn {
        &mut self.conn
    }
    fn save(&self) -> Self::Saved {
        (self.journal.len(), self.log.mark())
    }
    fn restore(&mut self, (to, mark): Self::Saved) {
        while self.journal.len() > to {
            let Some((seq, old)) = self.journal.pop() else {
                break;
            };
            let undone = self.waiting.set(seq, old);
            let back = self.waiting.entries.get(&seq).map(|e| e.loc);
            self.count_live(undone.map(|e| e.loc), back);
        }
        self.log.cut_back(mark);
    }
    fn before_commit(&mut self) -> Result<(), DbError> {
        self.log.write_puts().map_err(DbError::Sql)
    }
    fn after_commit(&mut self, committed: bool) {
        self.journal.clear();
        self.log.after_commit(committed);
        if committed
            && self.waiting.entries.is_empty()
            && self
                .log
                .active_segment()
                .and_then(|n| self.log.segs.get(&n))
                .is_some_and(|s| s.size >= EMPTY_ROTATE_BYTES.min(self.log.segment_bytes()))
            && let Err(e) = self.log.rotate()
        {
            tracing::warn!("spool log: {e}");
        }
        self.log.reclaim();
    }
}

impl SqliteSpool {
    /// Opens (creating if needed) the spool at `cfg.path`, with its log
    /// beside it ([`log::dir_of`]).
    pub fn open(cfg: SpoolConfig) -> Result<Self, SpoolError> {
        let scan = log::scan(&log::dir_of(&cfg.path)).map_err(SpoolError::Db)?;
        for d in &scan.damage {
            tracing::error!("spool log: {d}");
        }
        Self::open_scanned(cfg, scan, &[])
    }

    /// Opens the spool with what a scan of its log found; the messages in
    /// the `damaged` segments are written again at the head and those
    /// segments deleted.
    fn open_scanned(
        cfg: SpoolConfig,
        scan: log::Scan,
        damaged: &[u64],
    ) -> Result<Self, SpoolError> {
        let conn =
            crate::sql::Conn::open(&crate::sql::Location::Sqlite(cfg.path.clone()), MIGRATIONS)?
                .into_sqlite()
                .ok_or_else(|| SpoolError::Db("the spool is an SQLite file".into()))?;
        let log = Log::open(&log::dir_of(&cfg.path), &scan.segments, cfg.segment_bytes)
            .map_err(SpoolError::Db)?;
        let mut w = Worker {
            conn,
            cfg,
            log,
            waiting: Waiting::default(),
            next_seq: scan.max_seq + 1,
            inflight: HashSet::new(),
            journal: Vec::new(),
        };
        for (seq, f) in scan.waiting {
            if w.waiting.by_id.contains_key(f.id.as_str()) {
                // Spooled twice (a move from an older file repeated after a
                // crash): the first is kept.
                w.log.remove(seq);
                continue;
            }
            w.replace(
                seq,
                Some(Entry {
                    id: Arc::from(f.id),
                    meta: f.meta,
                    loc: f.loc,
                }),
            );
        }
        w.adopt_rows()?;
        w.evacuate(damaged)?;
        w.journal.clear();
        Ok(SqliteSpool {
            db: Db::start("rs-spool", w)?,
            notify: Arc::new(Notify::new()),
        })
    }

    /// Gives back the page cache SQLite keeps (up to `cache_size`, see
    /// [`crate::db::open`]) and the index's spare room: a burst fills them
    /// and an idle spool needs none of it.
    pub async fn release_memory(&self) -> Result<(), SpoolError> {
        Ok(self
            .db
            .read(|w| {
                // The index's tables keep the capacity of the largest
                // backlog they held.
                w.waiting.by_id.shrink_to_fit();
                w.inflight.shrink_to_fit();
                Ok(w.conn.release_memory()?)
            })
            .await?)
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
        Ok(self.db.read(|w| Ok(w.next_due())).await?)
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        Ok(self.db.read(|w| Ok(w.stats()?)).await?)
    }

    async fn depths(&self) -> Result<Vec<Depth>, SpoolError> {
        Ok(self.db.read(|w| Ok(w.depths())).await?)
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
            .write_relaxed(move |w| Ok(w.rebase(by_ms, now)))
            .await?)
    }

    async fn fate(&self, id: MessageId) -> Result<Fate, SpoolError> {
        Ok(self
            .db
            .read(move |w| {
                let c = &w.conn;
                let id = id.as_str();
                if w.waiting.by_id.contains_key(id) {
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

/// Whether a class is sent while forwarding is off.
fn is_infra(class: &str) -> bool {
    matches!(class, "control" | "infrastructure")
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
    /// Keeps the segments' counts of waiting puts right as an entry moves
    /// from `old` to `new` (either may be none).
    fn count_live(&mut self, old: Option<Loc>, new: Option<Loc>) {
        if let Some(l) = old
            && let Some(s) = self.log.segs.get_mut(&l.seg)
        {
            s.live = s.live.saturating_sub(1);
            s.live_bytes = s.live_bytes.saturating_sub(u64::from(l.len));
        }
        if let Some(l) = new {
            let s = self.log.segs.entry(l.seg).or_default();
            s.live += 1;
            s.live_bytes += u64::from(l.len);
        }
    }

    /// Changes the index (journaled, see [`DbState::restore`]).
    fn replace(&mut self, seq: u64, new: Option<Entry>) -> Option<Entry> {
        let new_loc = new.as_ref().map(|e| e.loc);
        let old = self.waiting.set(seq, new);
        self.count_live(old.as_ref().map(|e| e.loc), new_loc);
        if new_loc.is_none() {
            self.inflight.remove(&seq);
        }
        self.journal.push((seq, old.clone()));
        old
    }

    /// Appends a new message to the log and the index.
    fn put(
        &mut self,
        meta: Meta,
        id: &str,
        content_type: &str,
        header: &[u8],
        content: &[u8],
    ) -> Result<(), SpoolError> {
        let loc = self
            .log
            .put(&meta, id, content_type, header, content)
            .map_err(SpoolError::Db)?;
        self.replace(
            meta.seq,
            Some(Entry {
                id: Arc::from(id),
                meta,
                loc,
            }),
        );
        Ok(())
    }

    /// Takes a message out of the spool (its remove written after the
    /// commit).
    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let old = self.replace(seq, None)?;
        self.log.remove(seq);
        Some(old)
    }

    /// Sets a waiting message's attempts and next attempt.
    fn set_attempt(&mut self, seq: u64, attempts: u32, next_attempt: i64) {
        let Some(mut e) = self.waiting.entries.get(&seq).cloned() else {
            return;
        };
        e.meta.attempts = attempts;
        e.meta.next_attempt = next_attempt;
        self.replace(seq, Some(e));
        self.log.update(seq, attempts, next_attempt);
    }

    /// Moves the messages of a spool file written before the log (rows of
    /// its `spool` table) into the log, in their order, and empties the
    /// table: the log is fsynced before the rows are deleted, so a crash
    /// between leaves them in both, and the next start keeps one of each.
    fn adopt_rows(&mut self) -> Result<(), SpoolError> {
        type OldRow = (
            String,
            u8,
            bool,
            Option<i64>,
            i64,
            u32,
            i64,
            String,
            String,
            Vec<u8>,
            Vec<u8>,
        );
        let rows: Vec<OldRow> = {
            let mut st = self
                .conn
                .prepare(
                    "SELECT id, precedence, persistent, expiry, created, attempts, next_attempt,
                            class, content_type, header, content
                     FROM spool ORDER BY precedence DESC, seq",
                )
                .map_err(db)?;
            st.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?
        };
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len();
        for (
            id,
            precedence,
            persistent,
            expiry,
            created,
            attempts,
            next_attempt,
            class,
            ct,
            header,
            content,
        ) in rows
        {
            if self.waiting.by_id.contains_key(id.as_str()) {
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let meta = Meta {
                seq,
                precedence,
                persistent,
                infra: is_infra(&class),
                expiry,
                created,
                attempts,
                next_attempt,
                bytes: (header.len() + content.len()) as u64,
            };
            self.put(meta, &id, &ct, &header, &content)?;
        }
        self.log.write_puts().map_err(SpoolError::Db)?;
        exec(&self.conn, "DELETE FROM spool", []).map_err(db)?;
        self.log.after_commit(true);
        tracing::info!("{n} spooled message(s) moved from the spool's table into its log");
        Ok(())
    }

    /// Writes the waiting messages of segments `segs` again at the head
    /// of the log (fsynced), then deletes those segments.
    fn evacuate(&mut self, segs: &[u64]) -> Result<(), SpoolError> {
        if segs.is_empty() {
            return Ok(());
        }
        let moving: Vec<(u64, Loc)> = self
            .waiting
            .entries
            .iter()
            .filter(|(_, e)| segs.contains(&e.loc.seg))
            .map(|(s, e)| (*s, e.loc))
            .collect();
        self.move_forward(moving)?;
        self.log.write_puts().map_err(SpoolError::Db)?;
        self.log.after_commit(true);
        for &n in segs {
            self.log.delete_segment(n);
        }
        Ok(())
    }

    /// Puts the given messages again at the head of the log (their old
    /// records then hold nothing waiting).
    fn move_forward(&mut self, moving: Vec<(u64, Loc)>) -> Result<usize, SpoolError> {
        let locs: Vec<Loc> = moving.iter().map(|m| m.1).collect();
        let read = self.log.read(&locs);
        let mut moved = 0;
        for ((seq, _), r) in moving.into_iter().zip(read) {
            let stored = r.map_err(SpoolError::Db)?;
            let Some(mut e) = self.waiting.entries.get(&seq).cloned() else {
                continue;
            };
            e.loc = self
                .log
                .put(
                    &e.meta,
                    &e.id,
                    &stored.content_type,
                    &stored.header,
                    &stored.content,
                )
                .map_err(SpoolError::Db)?;
            self.replace(seq, Some(e));
            moved += 1;
        }
        Ok(moved)
    }

    fn enqueue(
        &mut self,
        msgs: Vec<(RawMessage, Vec<u8>)>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, SpoolError> {
        let mut out = Vec::with_capacity(msgs.len());
        for (m, header) in msgs {
            out.push(self.enqueue_one(m, header, now)?);
        }
        Ok(out)
    }

    fn enqueue_one(
        &mut self,
        m: RawMessage,
        header: Vec<u8>,
        now: Timestamp,
    ) -> Result<Enqueued, SpoolError> {
        let id = m.header.id.as_str();
        if self.cfg.dedupe_window.is_some() {
            let fresh = exec(
                &self.conn,
                "INSERT INTO seen (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                params![id, ms(now)],
            )
            .map_err(db)?;
            if fresh == 0 {
                bump(&self.conn, "duplicates", 1).map_err(db)?;
                return Ok(Enqueued::Duplicate);
            }
        }
        self.insert(m, &header, now)
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
            match self.insert(m, &header, now)? {
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
        header: &[u8],
        now: Timestamp,
    ) -> Result<Enqueued, SpoolError> {
        let id = m.header.id.as_str();
        let qos = m.header.source().map(|s| s.qos).unwrap_or_default();
        let bytes = (header.len() + m.content.len()) as u64;
        if !self.cfg.fits(self.waiting.total_bytes, bytes, &m)
            && !self.make_room(bytes, qos.persistent, qos.precedence, now)?
        {
            bump(&self.conn, "refused", 1).map_err(db)?;
            return Ok(Enqueued::Refused(Reason {
                code: Code::known("disk-full"),
                text: format!(
                    "the spool is full ({} of {} bytes) of messages at least as important",
                    self.waiting.total_bytes, self.cfg.max_bytes
                ),
            }));
        }
        // After making room, as on PostgreSQL (the one spooled under this
        // ID may have been what was evicted).
        if self.waiting.by_id.contains_key(id) {
            bump(&self.conn, "duplicates", 1).map_err(db)?;
            return Ok(Enqueued::Duplicate);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let meta = Meta {
            seq,
            precedence: qos.precedence,
            persistent: qos.persistent,
            infra: is_infra(m.header.class.class.as_str()),
            expiry: qos.expiry.map(ms),
            created: ms(now),
            attempts: 0,
            next_attempt: 0,
            bytes,
        };
        self.put(meta, id, &m.content_type, header, &m.content)?;
        Ok(Enqueued::Stored)
    }

    /// Records a message removed undelivered.
    fn record_drop(&self, e: &Entry, why: &str, now: Timestamp) -> Result<(), SpoolError> {
        exec(
            &self.conn,
            "INSERT INTO drops (id, at, why, precedence, persistent) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![&*e.id, ms(now), why, e.meta.precedence, e.meta.persistent],
        )
        .map_err(db)?;
        Ok(())
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
    ) -> Result<bool, SpoolError> {
        let total = self.waiting.total_bytes;
        let mut victims = Vec::new();
        let mut freed = 0u64;
        // In-flight messages may go too: if the attempt in flight
        // succeeds, its settlement finds the message gone and changes
        // nothing.
        for &(pers, prec, seq) in &self.waiting.evict {
            if total - freed + need <= self.cfg.max_bytes {
                break;
            }
            if (pers && !persistent) || (pers == persistent && prec > precedence) {
                break;
            }
            freed += self.waiting.entries.get(&seq).map_or(0, |e| e.meta.bytes);
            victims.push(seq);
        }
        if total - freed + need > self.cfg.max_bytes {
            return Ok(false);
        }
        for seq in &victims {
            if let Some(e) = self.remove(*seq) {
                self.record_drop(&e, "evicted", now)?;
            }
        }
        tracing::warn!(
            "spool full: evicted {} messages ({freed} bytes)",
            victims.len()
        );
        bump(&self.conn, "evicted", victims.len() as u64).map_err(db)?;
        Ok(true)
    }

    fn dequeue(
        &mut self,
        max_messages: usize,
        max_bytes: usize,
        now: Timestamp,
        infrastructure_only: bool,
    ) -> Result<Vec<Row>, SpoolError> {
        let now_ms = ms(now);
        let mut picked = Vec::new();
        let mut bytes = 0usize;
        for &(_, seq) in &self.waiting.order {
            if self.inflight.contains(&seq) {
                continue;
            }
            let Some(e) = self.waiting.entries.get(&seq) else {
                continue;
            };
            let m = &e.meta;
            if m.next_attempt > now_ms
                || m.expiry.is_some_and(|x| x <= now_ms)
                || (infrastructure_only && !m.infra)
                // Stored by a batch still under way.
                || !self.log.written(e.loc)
            {
                continue;
            }
            let size = usize::try_from(m.bytes).unwrap_or(usize::MAX);
            if !picked.is_empty() && (bytes + size > max_bytes || picked.len() >= max_messages) {
                break;
            }
            bytes += size;
            picked.push(seq);
        }
        let locs: Vec<Loc> = picked
            .iter()
            .filter_map(|s| self.waiting.entries.get(s).map(|e| e.loc))
            .collect();
        let read = self.log.read(&locs);
        let mut out = Vec::with_capacity(picked.len());
        for (seq, r) in picked.into_iter().zip(read) {
            // Taken even if it cannot be read, so that it is not offered
            // again until the next start.
            self.inflight.insert(seq);
            let Some(e) = self.waiting.entries.get(&seq) else {
                continue;
            };
            match r {
                Ok(s) => out.push(Row {
                    id: s.id,
                    header: s.header,
                    content_type: s.content_type,
                    content: s.content,
                    attempts: e.meta.attempts,
                    spooled_at: Timestamp::from_millis(e.meta.created).unwrap_or(now),
                }),
                Err(err) => {
                    tracing::error!(message_id = %e.id, "spooled message unreadable: {err}")
                }
            }
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
            let Some(&seq) = self.waiting.by_id.get(id.as_str()) else {
                continue;
            };
            self.inflight.remove(&seq);
            match s {
                Settle::Release => {}
                Settle::Delivered => {
                    self.remove(seq);
                    delivered += 1;
                }
                Settle::Defer { at } => {
                    let a = self
                        .waiting
                        .entries
                        .get(&seq)
                        .map_or(0, |e| e.meta.attempts);
                    self.set_attempt(seq, a, ms(at));
                }
                Settle::Retry { at } => {
                    let a = self
                        .waiting
                        .entries
                        .get(&seq)
                        .map_or(0, |e| e.meta.attempts);
                    self.set_attempt(seq, a.saturating_add(1), ms(at));
                }
                Settle::Expired => {
                    if let Some(e) = self.remove(seq) {
                        self.record_drop(&e, "expired", now)?;
                        expired += 1;
                    }
                }
                Settle::Dead(reason) => {
                    let Some(loc) = self.waiting.entries.get(&seq).map(|e| e.loc) else {
                        continue;
                    };
                    let stored = self
                        .log
                        .read(&[loc])
                        .pop()
                        .unwrap_or_else(|| Err("not read".into()))
                        .map_err(SpoolError::Db)?;
                    let kind = super::stored_message(
                        &stored.header,
                        stored.content_type.clone(),
                        stored.content.clone(),
                    )
                    .map(|m| m.kind.as_str().to_owned())
                    .unwrap_or_default();
                    exec(
                        &self.conn,
                        "INSERT INTO dead_letters (id, at, code, reason, kind, content_type, header, content)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (id) DO NOTHING",
                        params![
                            id.as_str(),
                            ms(now),
                            reason.code.as_str(),
                            reason.text,
                            kind,
                            stored.content_type,
                            &stored.header[..],
                            &stored.content[..]
                        ],
                    )
                    .map_err(db)?;
                    self.remove(seq);
                    tracing::warn!(message_id = %id, "dead-lettered: {reason}");
                }
            }
        }
        bump(&self.conn, "delivered", delivered).map_err(db)?;
        bump(&self.conn, "expired", expired).map_err(db)?;
        Ok(())
    }

    fn sweep(&mut self, now: Timestamp) -> Result<u64, SpoolError> {
        let now_ms = ms(now);
        let oldest = now_ms - i64::try_from(self.cfg.max_age.as_millis()).unwrap_or(i64::MAX);
        let expired: Vec<u64> = self
            .waiting
            .expiring
            .range(..=(now_ms, u64::MAX))
            .map(|&(_, seq)| seq)
            .filter(|s| !self.inflight.contains(s))
            .collect();
        // In the order spooled, up to the first message young enough.
        let aged: Vec<u64> = self
            .waiting
            .entries
            .iter()
            .take_while(|(_, e)| e.meta.created < oldest)
            .map(|(s, _)| *s)
            .filter(|s| !self.inflight.contains(s))
            .collect();
        let mut dropped = 0;
        for (why, seqs) in [("expired", expired), ("aged-out", aged)] {
            let mut n = 0u64;
            for seq in seqs {
                if let Some(e) = self.remove(seq) {
                    self.record_drop(&e, why, now)?;
                    n += 1;
                }
            }
            if n > 0 {
                tracing::info!("spool sweep: {n} messages {why}");
            }
            bump(&self.conn, why, n).map_err(db)?;
            dropped += n;
        }
        let kept = now_ms - i64::try_from(DROPS_KEPT.as_millis()).unwrap_or(i64::MAX);
        exec(&self.conn, "DELETE FROM drops WHERE at < ?1", params![kept]).map_err(db)?;
        if let Some(w) = self.cfg.dedupe_window {
            let horizon = now_ms - i64::try_from(w.as_millis()).unwrap_or(i64::MAX);
            exec(
                &self.conn,
                "DELETE FROM seen WHERE at < ?1",
                params![horizon],
            )
            .map_err(db)?;
        }
        self.compact()?;
        Ok(dropped)
    }

    /// One step of compaction: when under half of the oldest segment is
    /// still waiting, up to [`COMPACT_STEP_BYTES`] of what is are put
    /// again at the head of the log (fsynced with this batch), so that the
    /// segment can go once the rest of it has.
    fn compact(&mut self) -> Result<(), SpoolError> {
        let Some((&oldest, s)) = self.log.segs.first_key_value() else {
            return Ok(());
        };
        if Some(oldest) == self.log.active_segment() || s.live == 0 || s.live_bytes * 2 > s.size {
            return Ok(());
        }
        let mut moving = Vec::new();
        let mut bytes = 0u64;
        for (seq, e) in &self.waiting.entries {
            if e.loc.seg == oldest {
                moving.push((*seq, e.loc));
                bytes += u64::from(e.loc.len);
                if bytes >= COMPACT_STEP_BYTES {
                    break;
                }
            }
        }
        let moved = self.move_forward(moving)?;
        tracing::info!("spool log: {moved} message(s) moved forward from segment {oldest}");
        Ok(())
    }

    fn next_due(&self) -> Option<Timestamp> {
        let mut due: Option<i64> = None;
        for &(_, seq) in &self.waiting.order {
            if self.inflight.contains(&seq) {
                continue;
            }
            if let Some(e) = self.waiting.entries.get(&seq) {
                let t = e.meta.next_attempt;
                due = Some(due.map_or(t, |d| d.min(t)));
                if t <= 0 {
                    break;
                }
            }
        }
        due.and_then(Timestamp::from_millis)
    }

    fn rebase(&mut self, by_ms: i64, now: Timestamp) -> u64 {
        let now_ms = ms(now);
        let later: Vec<(u64, u32, i64)> = self
            .waiting
            .entries
            .iter()
            .filter(|(_, e)| e.meta.next_attempt > now_ms)
            .map(|(s, e)| (*s, e.meta.attempts, e.meta.next_attempt))
            .collect();
        for (seq, a, next) in &later {
            self.set_attempt(*seq, *a, now_ms.max(next - by_ms));
        }
        later.len() as u64
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
        let dead: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
            .map_err(db)?;
        Ok(SpoolStats {
            messages: self.waiting.entries.len() as u64,
            bytes: self.waiting.total_bytes,
            dead_letters: u64::try_from(dead).unwrap_or(0),
            delivered_total: self.counter("delivered")?,
            expired_total: self.counter("expired")?,
            evicted_total: self.counter("evicted")?,
            aged_out_total: self.counter("aged-out")?,
            refused_total: self.counter("refused")?,
            duplicates_total: self.counter("duplicates")?,
            oldest: self.waiting.oldest().and_then(Timestamp::from_millis),
        })
    }

    fn depths(&self) -> Vec<Depth> {
        self.waiting
            .prec
            .iter()
            .rev()
            .map(|(&p, &(messages, bytes))| Depth {
                precedence: p,
                messages,
                bytes,
                oldest: self.waiting.oldest_of(p).and_then(Timestamp::from_millis),
            })
            .collect()
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
    // What waits: the log's messages, and any rows of a file from before
    // the log (moved into it at the daemon's next start).
    let mut by_prec: BTreeMap<u8, (u64, u64)> = BTreeMap::new();
    let now_ms = ms(now);
    match log::scan(&log::dir_of(path)) {
        Ok(scan) => {
            for d in &scan.damage {
                problems.push(format!("log: {d}"));
            }
            for f in scan.waiting.values() {
                let m = &f.meta;
                let p = by_prec.entry(m.precedence).or_default();
                p.0 += 1;
                p.1 += m.bytes;
                v.later += u64::from(m.next_attempt > now_ms);
                v.expired += u64::from(m.expiry.is_some_and(|x| x <= now_ms));
            }
        }
        Err(e) => problems.push(format!("log: {e}")),
    }
    if let Ok(mut st) = c.prepare(
        "SELECT precedence, COUNT(*), COALESCE(SUM(bytes), 0) FROM spool GROUP BY precedence",
    ) && let Ok(rows) = st.query_map([], |r| {
        Ok((r.get::<_, u8>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        for (p, n, b) in rows.flatten() {
            let e = by_prec.entry(p).or_default();
            e.0 += n as u64;
            e.1 += b as u64;
        }
    }
    v.by_precedence = by_prec
        .into_iter()
        .rev()
        .map(|(p, (n, b))| (p, n, b))
        .collect();
    let count = |sql: &str| -> u64 {
        c.query_row(sql, params![now_ms], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .unwrap_or(0)
    };
    v.later += count("SELECT COUNT(*) FROM spool WHERE next_attempt > ?1");
    v.expired += count("SELECT COUNT(*) FROM spool WHERE expiry IS NOT NULL AND expiry <= ?1");
    if !problems.is_empty() {
        v.integrity = problems.join("; ");
    }
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

/// A spool file that failed its check at start, moved aside and replaced,
/// or a log segment found damaged, copied aside and rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the damaged file is now (with its `-wal` and `-shm`).
    pub moved_to: std::path::PathBuf,
    /// What the check found.
    pub problem: String,
    /// Messages read from it and spooled again (from a damaged log
    /// segment: those still readable, written again at the log's head).
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
    /// with its `-wal` and `-shm`) and starts a new one in its place,
    /// instead of failing to start: the caller then spools again what can
    /// be read from the old file ([`SqliteSpool::salvage_from`]) and
    /// reports the [`Recovery`]. Damage inside the log's segments is
    /// reported the same way: each damaged segment is copied aside
    /// (`<segment>.damaged-<ms>`), the messages that can be read from it
    /// are written again at the head of the log, and the segment goes. A
    /// file that cannot be checked for another reason (rights, disk) is an
    /// error, and nothing is moved.
    pub fn open_or_recover(
        cfg: SpoolConfig,
        now: Timestamp,
    ) -> Result<(Self, Option<Recovery>), SpoolError> {
        let path = cfg.path.clone();
        let dir = log::dir_of(&path);
        let scan = log::scan(&dir).map_err(SpoolError::Db)?;
        let mut problems = Vec::new();
        let mut moved: Option<std::path::PathBuf> = None;
        if let Some(problem) = damage(&path)? {
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
            problems.push(problem);
            moved = Some(moved_to);
        }
        let mut damaged: Vec<u64> = scan
            .damage
            .iter()
            .filter_map(|d| log::damaged_segment(d))
            .collect();
        damaged.dedup();
        let mut kept = 0;
        for &n in &damaged {
            let copy = log::keep_copy(&dir, n, &ms(now).to_string()).map_err(SpoolError::Db)?;
            tracing::error!("spool log damaged; segment copied to {}", copy.display());
            moved.get_or_insert(copy);
        }
        for d in &scan.damage {
            tracing::error!("spool log: {d}");
            problems.push(d.clone());
        }
        if !damaged.is_empty() {
            kept = scan
                .waiting
                .values()
                .filter(|f| damaged.contains(&f.loc.seg))
                .count() as u64;
        }
        let spool = Self::open_scanned(cfg, scan, &damaged)?;
        let recovery = moved.map(|moved_to| Recovery {
            moved_to,
            problem: problems.join("; "),
            salvaged: kept,
            at: now,
        });
        Ok((spool, recovery))
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
