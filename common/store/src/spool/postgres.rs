//! The spool on PostgreSQL: the custody spool of an MLM farm, one queue
//! that every member stores into and sends from.
//!
//! What the members share and how they keep out of each other's way:
//! - A member takes messages for sending by claiming them: `FOR UPDATE
//!   SKIP LOCKED` picks rows no other member is claiming at that moment,
//!   and the claim (`claimed_by`, `claim_until`) keeps them its own until
//!   it settles them. Members polling at once never take the same row.
//! - A claim is a lease ([`SpoolConfig::lease`], 20 s by default), renewed
//!   every quarter of it while the member lives. A member killed with messages in flight holds them
//!   no longer than the lease: then any member takes them (its
//!   [`Spool::next_due`] names the time, so its sender wakes for them).
//!   If the dead member's POST had in fact reached the next hop, the
//!   message goes twice and the next hop keeps one (IDs are unique).
//! - A member that starts again releases the claims its name still holds
//!   (they died with its previous process).
//! - Sizes and counters are rows of `counters`, changed in the same
//!   transaction as the messages, so the spool's limit holds for the farm.
//! - The dedupe window (`seen`) is the farm's: a message accepted by one
//!   member is a duplicate at every other.
//!
//! Durability: PostgreSQL's (`synchronous_commit = on` for what is stored;
//! claims and settlements commit without waiting for the WAL flush, as the
//! SQLite spool's are relaxed: losing one sends a message again).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    DeadLetter, Depth, DropRecord, Enqueued, Fate, Settle, Spool, SpoolConfig, SpoolError,
    SpoolStats, Spooled,
};
use crate::db::{Db, DbError};
use crate::params;
use crate::sql::{Conn, Location, Migration};
use rs_protocol::codec::{RawMessage, encode_header};
use rs_protocol::ids::MessageId;
use rs_protocol::outcome::{Code, Reason};
use rs_protocol::time::Timestamp;

/// How long drop records are kept (as the SQLite spool).
const DROPS_KEPT: Duration = Duration::from_secs(30 * 86_400);
/// At most this many messages are evicted to make room for one.
const MAX_VICTIMS: i64 = 10_000;

/// The spool's schema changes, in order (append only).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "baseline",
    apply: |c| {
        c.batch(
            "CREATE TABLE spool (
                 seq          BIGSERIAL PRIMARY KEY,
                 id           TEXT   NOT NULL UNIQUE,
                 precedence   BIGINT NOT NULL,
                 persistent   BIGINT NOT NULL,
                 expiry       BIGINT,
                 created      BIGINT NOT NULL,
                 bytes        BIGINT NOT NULL,
                 attempts     BIGINT NOT NULL DEFAULT 0,
                 next_attempt BIGINT NOT NULL DEFAULT 0,
                 class        TEXT   NOT NULL,
                 kind         TEXT   NOT NULL,
                 content_type TEXT   NOT NULL,
                 header       BYTEA  NOT NULL,
                 content      BYTEA  NOT NULL,
                 claimed_by   TEXT,
                 claim_until  BIGINT
             );
             CREATE INDEX spool_due ON spool (precedence DESC, seq);
             CREATE INDEX spool_evict ON spool (persistent, precedence, seq);
             CREATE INDEX spool_expiry ON spool (expiry) WHERE expiry IS NOT NULL;
             CREATE INDEX spool_created ON spool (created);
             CREATE INDEX spool_claims ON spool (claimed_by) WHERE claimed_by IS NOT NULL;
             CREATE TABLE dead_letters (
                 id           TEXT   PRIMARY KEY,
                 at           BIGINT NOT NULL,
                 code         TEXT   NOT NULL,
                 reason       TEXT   NOT NULL,
                 kind         TEXT   NOT NULL,
                 content_type TEXT   NOT NULL,
                 header       BYTEA  NOT NULL,
                 content      BYTEA  NOT NULL
             );
             CREATE TABLE drops (
                 id         TEXT   NOT NULL,
                 at         BIGINT NOT NULL,
                 why        TEXT   NOT NULL,
                 precedence BIGINT NOT NULL,
                 persistent BIGINT NOT NULL
             );
             CREATE INDEX drops_at ON drops (at);
             CREATE INDEX drops_id ON drops (id);
             CREATE TABLE counters (
                 name  TEXT   PRIMARY KEY,
                 value BIGINT NOT NULL
             );
             CREATE TABLE seen (
                 id TEXT   PRIMARY KEY,
                 at BIGINT NOT NULL
             );",
        )
    },
}];

/// Handle to a farm's shared spool; cheap to clone.
#[derive(Debug, Clone)]
pub struct PgSpool {
    db: Db<Conn>,
    notify: Arc<Notify>,
    cfg: Arc<SpoolConfig>,
    /// This member's name: what its claims carry.
    member: Arc<str>,
    /// The renewal task runs while a handle lives.
    _alive: Arc<()>,
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis()
}

fn lease_end(now: Timestamp, lease: Duration) -> i64 {
    ms(now).saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
}

fn sql(e: DbError) -> SpoolError {
    match e {
        DbError::Sql(s) => SpoolError::Db(s),
        DbError::Closed => SpoolError::Closed,
    }
}

fn bump(c: &mut Conn, name: &str, by: i64) -> Result<(), DbError> {
    if by != 0 {
        c.exec(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = counters.value + EXCLUDED.value",
            params![name, by],
        )?;
    }
    Ok(())
}

fn counter(c: &mut Conn, name: &str) -> Result<i64, DbError> {
    Ok(c.row(
        "SELECT value FROM counters WHERE name = ?1",
        params![name],
        |r| r.get::<i64>(0),
    )?
    .unwrap_or(0))
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgSpool {
    /// Opens (creating if needed) the spool in `at`'s schema for the farm
    /// member `member`, releasing the claims an earlier process of that
    /// member left. `at` must be a PostgreSQL location (the SQLite spool
    /// is [`super::sqlite::SqliteSpool`]).
    pub fn open(cfg: SpoolConfig, at: &Location, member: &str) -> Result<Self, SpoolError> {
        if !matches!(at, Location::Postgres { .. }) {
            return Err(SpoolError::Db(format!(
                "the shared spool needs a PostgreSQL database, not {}",
                at.describe()
            )));
        }
        // The blocking client runs a runtime of its own: it cannot work on
        // (or be dropped from) a thread that drives async tasks.
        let conn = std::thread::scope(|s| {
            s.spawn(|| -> Result<Conn, DbError> {
                let mut c = Conn::open(at, MIGRATIONS)?;
                let n = c.exec(
                    "UPDATE spool SET claimed_by = NULL, claim_until = NULL WHERE claimed_by = ?1",
                    params![member],
                )?;
                if n > 0 {
                    tracing::info!(
                        "shared spool: released {n} message(s) this member had in flight when it stopped"
                    );
                }
                Ok(c)
            })
            .join()
            .unwrap_or_else(|_| Err(DbError::Sql("opening the spool panicked".into())))
        })
        .map_err(sql)?;
        let alive = Arc::new(());
        let spool = PgSpool {
            db: Db::start("rs-spool", conn).map_err(sql)?,
            notify: Arc::new(Notify::new()),
            cfg: Arc::new(cfg),
            member: member.into(),
            _alive: alive.clone(),
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(renew(
                spool.db.clone(),
                spool.member.clone(),
                spool.cfg.lease,
                Arc::downgrade(&alive),
            ));
        }
        Ok(spool)
    }

    /// Woken whenever messages are stored here (for this member's sender;
    /// the others find them on their next look).
    pub fn notified(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    /// The member whose claims this handle makes.
    pub fn member(&self) -> &str {
        &self.member
    }
}

/// Renews this member's claims every quarter of the lease while its
/// spool handle lives.
async fn renew(db: Db<Conn>, member: Arc<str>, lease: Duration, alive: Weak<()>) {
    loop {
        tokio::time::sleep(lease / 4).await;
        if alive.upgrade().is_none() {
            return;
        }
        let m = member.clone();
        let r = db
            .write_relaxed(move |c| {
                c.exec(
                    "UPDATE spool SET claim_until = ?2
                     WHERE claimed_by = ?1 AND claim_until IS NOT NULL",
                    params![&*m, lease_end(Timestamp::now(), lease)],
                )
            })
            .await;
        match r {
            Err(DbError::Closed) => return,
            Err(e) => tracing::warn!("shared spool: renewing this member's claims: {e}"),
            Ok(_) => {}
        }
    }
}

/// The spool's byte total, read for a transaction that stores messages:
/// its row stays locked until the commit, so members storing at once take
/// turns and each sees what the others stored. The transaction works on
/// the value and writes it back once ([`write_total`]).
fn total_for_update(c: &mut Conn) -> Result<u64, DbError> {
    c.exec(
        "INSERT INTO counters (name, value) VALUES ('bytes', 0) ON CONFLICT (name) DO NOTHING",
        params![],
    )?;
    let v: i64 = c.one(
        "SELECT value FROM counters WHERE name = 'bytes' FOR UPDATE",
        params![],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn write_total(c: &mut Conn, total: u64) -> Result<(), DbError> {
    c.exec(
        "UPDATE counters SET value = ?1 WHERE name = 'bytes'",
        params![total],
    )?;
    Ok(())
}

/// Stores one message (room made if it can be), as the SQLite spool does;
/// `total` is the spool's byte total ([`total_for_update`]), kept up to
/// date here.
fn insert(
    c: &mut Conn,
    cfg: &SpoolConfig,
    total: &mut u64,
    m: &RawMessage,
    header: &[u8],
    now: Timestamp,
) -> Result<Enqueued, DbError> {
    let qos = m.header.source().map(|s| s.qos).unwrap_or_default();
    let bytes = (header.len() + m.content.len()) as u64;
    if !cfg.fits(*total, bytes, m)
        && !make_room(c, cfg, total, bytes, qos.persistent, qos.precedence, now)?
    {
        let total = *total;
        bump(c, "refused", 1)?;
        return Ok(Enqueued::Refused(Reason {
            code: Code::known("disk-full"),
            text: format!(
                "the spool is full ({total} of {} bytes) of messages at least as important",
                cfg.max_bytes
            ),
        }));
    }
    let n = c.exec(
        "INSERT INTO spool (id, precedence, persistent, expiry, created, bytes, next_attempt,
                            kind, content_type, header, content, class)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (id) DO NOTHING",
        params![
            m.header.id.as_str(),
            qos.precedence,
            qos.persistent,
            qos.expiry.map(ms),
            ms(now),
            bytes,
            m.kind.as_str(),
            &*m.content_type,
            header,
            &m.content[..],
            m.header.class.class.as_str(),
        ],
    )?;
    if n == 0 {
        bump(c, "duplicates", 1)?;
        return Ok(Enqueued::Duplicate);
    }
    *total += bytes;
    Ok(Enqueued::Stored)
}

/// Evicts messages less important than (persistent, precedence), as the
/// SQLite spool does, until `need` more bytes fit; false (evicting
/// nothing) if they cannot.
fn make_room(
    c: &mut Conn,
    cfg: &SpoolConfig,
    total: &mut u64,
    need: u64,
    persistent: bool,
    precedence: u8,
    now: Timestamp,
) -> Result<bool, DbError> {
    let candidates: Vec<(i64, u64)> = c.rows(
        "SELECT seq, bytes FROM spool
         WHERE persistent < ?1 OR (persistent = ?1 AND precedence <= ?2)
         ORDER BY persistent, precedence, seq LIMIT ?3",
        params![persistent, precedence, MAX_VICTIMS],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut victims = Vec::new();
    let mut freed = 0u64;
    for (seq, b) in candidates {
        if *total - freed + need <= cfg.max_bytes {
            break;
        }
        freed += b;
        victims.push(seq);
    }
    if *total - freed + need > cfg.max_bytes {
        return Ok(false);
    }
    let mut gone = 0u64;
    let mut evicted = 0;
    for seq in &victims {
        // Another member may have settled it meanwhile: count what goes.
        let row: Option<(String, u64, u8, bool)> = c.row(
            "DELETE FROM spool WHERE seq = ?1 RETURNING id, bytes, precedence, persistent",
            params![seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        if let Some((id, b, prec, pers)) = row {
            c.exec(
                "INSERT INTO drops (id, at, why, precedence, persistent)
                 VALUES (?1, ?2, 'evicted', ?3, ?4)",
                params![id, ms(now), prec, pers],
            )?;
            gone += b;
            evicted += 1;
        }
    }
    tracing::warn!("spool full: evicted {evicted} messages ({gone} bytes)");
    bump(c, "evicted", evicted)?;
    *total -= gone;
    Ok(true)
}

/// Dead letters back into the spool, as [`Spool::replay_dead`] says.
fn replay_dead(
    c: &mut Conn,
    cfg: &SpoolConfig,
    only: Option<&str>,
    now: Timestamp,
) -> Result<(u64, u64), DbError> {
    type Dead = (String, String, Vec<u8>, Vec<u8>);
    let rows: Vec<Dead> = c.rows(
        "SELECT id, content_type, header, content FROM dead_letters
         WHERE ?1::text IS NULL OR id = ?1 ORDER BY at, id FOR UPDATE",
        params![only],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    let (mut back, mut stay) = (0, 0);
    let mut total = total_for_update(c)?;
    for (id, content_type, header, content) in rows {
        let Ok(m) = super::stored_message(&header, content_type, Bytes::from(content)) else {
            tracing::warn!(message_id = %id, "dead letter: its stored header does not decode; kept");
            stay += 1;
            continue;
        };
        match insert(c, cfg, &mut total, &m, &header, now)? {
            Enqueued::Refused(_) => stay += 1,
            Enqueued::Stored | Enqueued::Duplicate => {
                c.exec("DELETE FROM dead_letters WHERE id = ?1", params![id])?;
                back += 1;
            }
        }
    }
    write_total(c, total)?;
    if back > 0 {
        tracing::info!("{back} dead letter(s) put back in the spool");
    }
    Ok((back, stay))
}

fn settle(
    c: &mut Conn,
    member: &str,
    results: Vec<(MessageId, Settle)>,
    now: Timestamp,
) -> Result<(), DbError> {
    let (mut delivered, mut expired, mut freed) = (0i64, 0i64, 0u64);
    for (id, s) in results {
        let id = id.as_str();
        match s {
            // Delivered is delivered, whoever holds the claim now.
            Settle::Delivered => {
                if let Some(b) = c.row(
                    "DELETE FROM spool WHERE id = ?1 RETURNING bytes",
                    params![id],
                    |r| r.get::<u64>(0),
                )? {
                    freed += b;
                    delivered += 1;
                }
            }
            // The rest only while the claim is still this member's: a
            // lapsed one may be another member's now.
            Settle::Release => {
                c.exec(
                    "UPDATE spool SET claimed_by = NULL, claim_until = NULL
                     WHERE id = ?1 AND claimed_by = ?2",
                    params![id, member],
                )?;
            }
            Settle::Defer { at } => {
                c.exec(
                    "UPDATE spool SET next_attempt = ?3, claimed_by = NULL, claim_until = NULL
                     WHERE id = ?1 AND claimed_by = ?2",
                    params![id, member, ms(at)],
                )?;
            }
            Settle::Retry { at } => {
                c.exec(
                    "UPDATE spool SET attempts = attempts + 1, next_attempt = ?3,
                                      claimed_by = NULL, claim_until = NULL
                     WHERE id = ?1 AND claimed_by = ?2",
                    params![id, member, ms(at)],
                )?;
            }
            Settle::Expired => {
                if let Some((b, prec, pers)) = c.row(
                    "DELETE FROM spool WHERE id = ?1 AND claimed_by = ?2
                     RETURNING bytes, precedence, persistent",
                    params![id, member],
                    |r| Ok((r.get::<u64>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?)),
                )? {
                    c.exec(
                        "INSERT INTO drops (id, at, why, precedence, persistent)
                         VALUES (?1, ?2, 'expired', ?3, ?4)",
                        params![id, ms(now), prec, pers],
                    )?;
                    freed += b;
                    expired += 1;
                }
            }
            Settle::Dead(reason) => {
                type Gone = (u64, String, String, Vec<u8>, Vec<u8>);
                let gone: Option<Gone> = c.row(
                    "DELETE FROM spool WHERE id = ?1 AND claimed_by = ?2
                     RETURNING bytes, kind, content_type, header, content",
                    params![id, member],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )?;
                if let Some((b, kind, content_type, header, content)) = gone {
                    c.exec(
                        "INSERT INTO dead_letters
                             (id, at, code, reason, kind, content_type, header, content)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (id) DO NOTHING",
                        params![
                            id,
                            ms(now),
                            reason.code.as_str(),
                            reason.text,
                            kind,
                            content_type,
                            header,
                            content
                        ],
                    )?;
                    freed += b;
                    tracing::warn!(message_id = %id, "dead-lettered: {reason}");
                }
            }
        }
    }
    bump(c, "delivered", delivered)?;
    bump(c, "expired", expired)?;
    bump(c, "bytes", -count(freed))
}

fn sweep(c: &mut Conn, cfg: &SpoolConfig, now: Timestamp) -> Result<u64, DbError> {
    let oldest = ms(now) - i64::try_from(cfg.max_age.as_millis()).unwrap_or(i64::MAX);
    let mut dropped = 0u64;
    let mut freed = 0u64;
    for (why, cond, bound) in [
        ("expired", "expiry IS NOT NULL AND expiry <= ?1", ms(now)),
        ("aged-out", "created < ?1", oldest),
    ] {
        // Not what a live member has in flight: its settlement records it.
        let gone: Vec<(String, u64, i64, i64)> = c.rows(
            &format!(
                "DELETE FROM spool WHERE {cond} AND (claim_until IS NULL OR claim_until <= ?2)
                 RETURNING id, bytes, precedence, persistent"
            ),
            params![bound, ms(now)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        for (id, b, prec, pers) in &gone {
            c.exec(
                "INSERT INTO drops (id, at, why, precedence, persistent)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, ms(now), why, prec, pers],
            )?;
            freed += b;
        }
        if !gone.is_empty() {
            tracing::info!("spool sweep: {} messages {why}", gone.len());
        }
        bump(c, why, gone.len() as i64)?;
        dropped += gone.len() as u64;
    }
    bump(c, "bytes", -count(freed))?;
    let kept = ms(now) - i64::try_from(DROPS_KEPT.as_millis()).unwrap_or(i64::MAX);
    c.exec("DELETE FROM drops WHERE at < ?1", params![kept])?;
    if let Some(w) = cfg.dedupe_window {
        let horizon = ms(now) - i64::try_from(w.as_millis()).unwrap_or(i64::MAX);
        c.exec("DELETE FROM seen WHERE at < ?1", params![horizon])?;
    }
    Ok(dropped)
}

/// A message as claimed, its header not yet parsed.
struct Claimed {
    id: String,
    attempts: u32,
    created: i64,
    content_type: String,
    header: Vec<u8>,
    content: Vec<u8>,
}

fn dequeue(
    c: &mut Conn,
    member: &str,
    lease: Duration,
    max_messages: usize,
    max_bytes: usize,
    now: Timestamp,
    infrastructure_only: bool,
) -> Result<Vec<Claimed>, DbError> {
    // Rows no one holds: not claimed (or the claim lapsed), and not being
    // claimed by another member this instant (SKIP LOCKED).
    let candidates: Vec<(i64, u64)> = c.rows(
        if infrastructure_only {
            "SELECT seq, bytes FROM spool
             WHERE next_attempt <= ?1 AND (expiry IS NULL OR expiry > ?1)
               AND (claim_until IS NULL OR claim_until <= ?1)
               AND class IN ('control', 'infrastructure')
             ORDER BY precedence DESC, seq LIMIT ?2 FOR UPDATE SKIP LOCKED"
        } else {
            "SELECT seq, bytes FROM spool
             WHERE next_attempt <= ?1 AND (expiry IS NULL OR expiry > ?1)
               AND (claim_until IS NULL OR claim_until <= ?1)
             ORDER BY precedence DESC, seq LIMIT ?2 FOR UPDATE SKIP LOCKED"
        },
        params![ms(now), max_messages],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut out = Vec::with_capacity(candidates.len());
    let mut bytes = 0u64;
    for (seq, size) in candidates {
        if !out.is_empty() && bytes + size > max_bytes as u64 {
            break;
        }
        bytes += size;
        let row = c.one(
            "UPDATE spool SET claimed_by = ?2, claim_until = ?3 WHERE seq = ?1
             RETURNING id, attempts, created, content_type, header, content",
            params![seq, member, lease_end(now, lease)],
            |r| {
                Ok(Claimed {
                    id: r.get(0)?,
                    attempts: r.get(1)?,
                    created: r.get(2)?,
                    content_type: r.get(3)?,
                    header: r.get(4)?,
                    content: r.get(5)?,
                })
            },
        )?;
        out.push(row);
    }
    Ok(out)
}

impl Spool for PgSpool {
    async fn enqueue(
        &self,
        msgs: Vec<RawMessage>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, SpoolError> {
        let msgs: Vec<(RawMessage, Vec<u8>)> = msgs
            .into_iter()
            .map(|m| {
                let header = encode_header(&m.header, m.kind, m.data.as_ref());
                (m, header)
            })
            .collect();
        let cfg = self.cfg.clone();
        let r = self
            .db
            .write(move |c| {
                let mut out = Vec::with_capacity(msgs.len());
                let mut total = total_for_update(c)?;
                for (m, header) in &msgs {
                    if cfg.dedupe_window.is_some() {
                        let fresh = c.exec(
                            "INSERT INTO seen (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                            params![m.header.id.as_str(), ms(now)],
                        )?;
                        if fresh == 0 {
                            bump(c, "duplicates", 1)?;
                            out.push(Enqueued::Duplicate);
                            continue;
                        }
                    }
                    out.push(insert(c, &cfg, &mut total, m, header, now)?);
                }
                write_total(c, total)?;
                Ok(out)
            })
            .await
            .map_err(sql)?;
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
        let member = self.member.clone();
        let lease = self.cfg.lease;
        let rows = self
            .db
            .write_relaxed(move |c| {
                dequeue(
                    c,
                    &member,
                    lease,
                    max_messages,
                    max_bytes,
                    now,
                    infrastructure_only,
                )
            })
            .await
            .map_err(sql)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            match super::stored_message(&r.header, r.content_type, Bytes::from(r.content)) {
                Ok(msg) => out.push(Spooled {
                    msg,
                    attempts: r.attempts,
                    spooled_at: Timestamp::from_millis(r.created).unwrap_or(now),
                }),
                // Cannot happen for what we wrote. It stays claimed (and is
                // offered again when the claim lapses).
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
        let member = self.member.clone();
        self.db
            .write_relaxed(move |c| settle(c, &member, results, now))
            .await
            .map_err(sql)
    }

    async fn sweep(&self, now: Timestamp) -> Result<u64, SpoolError> {
        let cfg = self.cfg.clone();
        self.db
            .write_relaxed(move |c| sweep(c, &cfg, now))
            .await
            .map_err(sql)
    }

    async fn next_due(&self) -> Result<Option<Timestamp>, SpoolError> {
        let member = self.member.clone();
        // What this member has in flight is not due; what another holds is
        // due when its claim lapses (unless renewed before).
        let at: Option<i64> = self
            .db
            .read(move |c| {
                c.one(
                    "SELECT MIN(CASE WHEN claim_until IS NOT NULL AND claim_until > next_attempt
                                     THEN claim_until ELSE next_attempt END)
                     FROM spool WHERE claimed_by IS DISTINCT FROM ?1",
                    params![&*member],
                    |r| r.get(0),
                )
            })
            .await
            .map_err(sql)?;
        Ok(at.and_then(Timestamp::from_millis))
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.db
            .read(|c| {
                let (messages, dead, oldest): (u64, u64, Option<i64>) = c.one(
                    "SELECT (SELECT COUNT(*) FROM spool), (SELECT COUNT(*) FROM dead_letters),
                            (SELECT MIN(created) FROM spool)",
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                let mut n = |name: &str| counter(c, name).map(|v| u64::try_from(v).unwrap_or(0));
                Ok(SpoolStats {
                    messages,
                    bytes: n("bytes")?,
                    dead_letters: dead,
                    delivered_total: n("delivered")?,
                    expired_total: n("expired")?,
                    evicted_total: n("evicted")?,
                    aged_out_total: n("aged-out")?,
                    refused_total: n("refused")?,
                    duplicates_total: n("duplicates")?,
                    oldest: oldest.and_then(Timestamp::from_millis),
                })
            })
            .await
            .map_err(sql)
    }

    async fn depths(&self) -> Result<Vec<Depth>, SpoolError> {
        let rows: Vec<(i64, i64, i64, Option<i64>)> = self
            .db
            .read(|c| {
                c.rows(super::DEPTHS, params![], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
            })
            .await
            .map_err(sql)?;
        Ok(rows
            .into_iter()
            .map(|(p, n, b, oldest)| Depth {
                precedence: u8::try_from(p).unwrap_or(u8::MAX),
                messages: n.max(0) as u64,
                bytes: b.max(0) as u64,
                oldest: oldest.and_then(Timestamp::from_millis),
            })
            .collect())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        let rows: Vec<(String, i64, String, String)> = self
            .db
            .read(move |c| {
                c.rows(
                    "SELECT id, at, code, reason FROM dead_letters ORDER BY at DESC LIMIT ?1",
                    params![limit],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
            })
            .await
            .map_err(sql)?;
        rows.into_iter()
            .map(|(id, at, code, text)| {
                Ok(DeadLetter {
                    id: MessageId::new(id).map_err(|e| SpoolError::Db(e.to_string()))?,
                    at: Timestamp::from_millis(at).unwrap_or_else(Timestamp::now),
                    reason: Reason {
                        code: Code::new(code).unwrap_or_else(|| Code::known("invalid")),
                        text,
                    },
                })
            })
            .collect()
    }

    async fn drops(&self, limit: usize) -> Result<Vec<DropRecord>, SpoolError> {
        let rows: Vec<(String, i64, String, u8, bool)> = self
            .db
            .read(move |c| {
                c.rows(
                    "SELECT id, at, why, precedence, persistent FROM drops
                     ORDER BY at DESC LIMIT ?1",
                    params![limit],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
            })
            .await
            .map_err(sql)?;
        rows.into_iter()
            .map(|(id, at, why, precedence, persistent)| {
                Ok(DropRecord {
                    id: MessageId::new(id).map_err(|e| SpoolError::Db(e.to_string()))?,
                    at: Timestamp::from_millis(at).unwrap_or_else(Timestamp::now),
                    why,
                    precedence,
                    persistent,
                })
            })
            .collect()
    }

    async fn rebase(&self, by_ms: i64, now: Timestamp) -> Result<u64, SpoolError> {
        self.db
            .write_relaxed(move |c| {
                c.exec(
                    "UPDATE spool SET next_attempt = GREATEST(?2, next_attempt - ?1)
                     WHERE next_attempt > ?2",
                    params![by_ms, ms(now)],
                )
            })
            .await
            .map_err(sql)
    }

    async fn fate(&self, id: MessageId) -> Result<Fate, SpoolError> {
        self.db
            .read(move |c| {
                let id = id.as_str();
                if c.exists("SELECT 1 FROM spool WHERE id = ?1", params![id])? {
                    return Ok(Fate::Waiting);
                }
                if let Some((code, text)) = c.row(
                    "SELECT code, reason FROM dead_letters WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
                )? {
                    return Ok(Fate::Dead(Reason {
                        code: Code::new(code).unwrap_or_else(|| Code::known("invalid")),
                        text,
                    }));
                }
                let why: Option<String> = c.row(
                    "SELECT why FROM drops WHERE id = ?1 ORDER BY at DESC",
                    params![id],
                    |r| r.get(0),
                )?;
                Ok(why.map_or(Fate::Gone, Fate::Dropped))
            })
            .await
            .map_err(sql)
    }

    async fn replay_dead(
        &self,
        only: Option<MessageId>,
        now: Timestamp,
    ) -> Result<(u64, u64), SpoolError> {
        let cfg = self.cfg.clone();
        let r = self
            .db
            .write(move |c| replay_dead(c, &cfg, only.as_ref().map(MessageId::as_str), now))
            .await
            .map_err(sql)?;
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
        self.db
            .write(move |c| {
                let id = only.as_ref().map(MessageId::as_str);
                c.exec(
                    "INSERT INTO drops (id, at, why, precedence, persistent)
                     SELECT id, ?2, 'discarded', 0, 1 FROM dead_letters
                     WHERE ?1::text IS NULL OR id = ?1",
                    params![id, ms(now)],
                )?;
                c.exec(
                    "DELETE FROM dead_letters WHERE ?1::text IS NULL OR id = ?1",
                    params![id],
                )
            })
            .await
            .map_err(sql)
    }
}
