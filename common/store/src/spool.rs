//! The durable spool every sender keeps its messages in until the next hop
//! has answered for them: the proxy's outgoing queue, the MLM's custody and
//! aggregation queue.
//!
//! Order: highest precedence first, then oldest. A message leaves the spool
//! only when its delivery is settled: delivered (the next hop accepted it),
//! dead (rejected for good, kept in the dead letters with the reason),
//! expired, or evicted under pressure; every removal other than delivery is
//! recorded with its reason and counted. Two engines implement it:
//! [`sqlite::SqliteSpool`], embedded (the proxy's, and a single MLM's),
//! and [`postgres::PgSpool`], one spool shared by the members of an MLM
//! farm. [`AnySpool`] is whichever the configuration chose.

pub mod log;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use rs_protocol::codec::RawMessage;
use rs_protocol::ids::MessageId;
use rs_protocol::outcome::Reason;
use rs_protocol::time::Timestamp;

/// Limits and options of a spool.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The database file.
    pub path: PathBuf,
    /// Total bytes of spooled messages; beyond it, less important messages
    /// are evicted (and counted) or the new one is refused.
    pub max_bytes: u64,
    /// Messages older than this are dropped (and counted) by the sweep.
    pub max_age: Duration,
    /// Remember accepted message IDs this long and refuse them as
    /// duplicates (forwarders keeping custody); `None` for originators.
    pub dedupe_window: Option<Duration>,
    /// A shared spool ([`postgres::PgSpool`]): how long a member's claim
    /// on the messages it is sending holds without renewal (renewed every
    /// quarter of it while the member lives). A member that dies holds its
    /// messages no longer.
    pub lease: Duration,
    /// The embedded spool's log: a segment is closed and a new one begun
    /// at this size (tests make it small to exercise rotation and
    /// compaction).
    pub segment_bytes: u64,
}

impl SpoolConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            path: path.into(),
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 86_400),
            dedupe_window: None,
            lease: Duration::from_secs(20),
            segment_bytes: log::SEGMENT_BYTES,
        }
    }
}

impl SpoolConfig {
    /// Room kept above `max_bytes` for a tier's own status messages
    /// (class `infrastructure`: heartbeats, cold start, shutdown; small and
    /// short-lived), so that a full spool still reports itself to the
    /// centre (`rsctl components --at-risk`): 1% of `max_bytes`, at least
    /// 64 KiB.
    pub fn status_headroom(&self) -> u64 {
        (self.max_bytes / 100).max(64 << 10)
    }

    /// Whether `bytes` more of message `m` fit beside the `total` held:
    /// within `max_bytes`, or, for a status message, within the headroom
    /// above it.
    pub fn fits(&self, total: u64, bytes: u64, m: &RawMessage) -> bool {
        total + bytes <= self.max_bytes
            || (m.header.class.class == rs_protocol::control::CLASS_INFRASTRUCTURE
                && total + bytes <= self.max_bytes + self.status_headroom())
    }
}

/// What happened to a message offered to the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Durable: it will survive a crash or power loss.
    Stored,
    /// Already spooled (or, with a dedupe window, already accepted once).
    Duplicate,
    /// Not stored: the spool is full of messages at least as important.
    Refused(Reason),
}

/// A message taken from the spool for sending.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub msg: RawMessage,
    /// Sends attempted before this one.
    pub attempts: u32,
    /// When it was spooled.
    pub spooled_at: Timestamp,
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The next hop accepted it: remove.
    Delivered,
    /// Keep it and try again no earlier than `at`.
    Retry { at: Timestamp },
    /// Rejected for good: move to the dead letters with the reason.
    Dead(Reason),
    /// Its expiry passed: drop and record.
    Expired,
    /// Put back unchanged (the attempt never reached the next hop).
    Release,
    /// Held back by the throttle: keep it, unchanged but for the time of
    /// the next attempt (not counted as an attempt).
    Defer { at: Timestamp },
}

/// A message removed without delivery, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropRecord {
    pub id: MessageId,
    pub at: Timestamp,
    /// `expired`, `evicted` or `aged-out`.
    pub why: String,
    pub precedence: u8,
    pub persistent: bool,
}

/// What became of a spooled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Still spooled (waiting or in flight).
    Waiting,
    /// Rejected for good by the next hop.
    Dead(Reason),
    /// Removed undelivered (`expired`, `evicted`, `aged-out`).
    Dropped(String),
    /// Not here: delivered, or never spooled.
    Gone,
}

/// A message rejected for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: MessageId,
    pub at: Timestamp,
    pub reason: Reason,
}

/// Counts for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Messages waiting.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    pub dead_letters: u64,
    pub delivered_total: u64,
    pub expired_total: u64,
    pub evicted_total: u64,
    pub aged_out_total: u64,
    pub refused_total: u64,
    pub duplicates_total: u64,
    /// When the oldest message waiting was spooled.
    pub oldest: Option<Timestamp>,
}

/// The waiting messages of one precedence (metrics: depth and oldest age
/// by precedence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Depth {
    pub precedence: u8,
    pub messages: u64,
    pub bytes: u64,
    /// When the oldest of them was spooled.
    pub oldest: Option<Timestamp>,
}

/// The query behind [`Spool::depths`] on PostgreSQL.
const DEPTHS: &str =
    "SELECT precedence, COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT), MIN(created)
     FROM spool
     GROUP BY precedence ORDER BY precedence DESC";

/// Why a spool operation failed (the database, not the message).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool database: {0}")]
    Db(String),
    #[error("the spool is closed")]
    Closed,
}

/// The storage interface of a spool.
pub trait Spool: Send + Sync + 'static {
    /// Stores messages durably (one transaction), in order.
    fn enqueue(
        &self,
        msgs: Vec<RawMessage>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<Enqueued>, SpoolError>> + Send;

    /// Takes up to `max_messages` / about `max_bytes` of the messages due
    /// at `now`, in order, and holds them until settled. Messages whose
    /// expiry has passed are not returned (the sweep records them). With
    /// `infrastructure_only`, only `control` and `infrastructure` messages
    /// are taken (forwarding of integrator data is switched off).
    fn dequeue(
        &self,
        max_messages: usize,
        max_bytes: usize,
        now: Timestamp,
        infrastructure_only: bool,
    ) -> impl Future<Output = Result<Vec<Spooled>, SpoolError>> + Send;

    /// Settles messages taken by `dequeue` (one transaction).
    fn settle(
        &self,
        results: Vec<(MessageId, Settle)>,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send;

    /// Drops expired and aged-out messages, recording each; prunes old
    /// records and dedupe IDs. Returns how many messages were dropped.
    fn sweep(&self, now: Timestamp) -> impl Future<Output = Result<u64, SpoolError>> + Send;

    /// The earliest `next attempt` time of any waiting message not in
    /// flight, if any.
    fn next_due(&self) -> impl Future<Output = Result<Option<Timestamp>, SpoolError>> + Send;

    fn stats(&self) -> impl Future<Output = Result<SpoolStats, SpoolError>> + Send;

    /// The waiting messages by precedence, highest first (one scan of the
    /// spool: for scrapes, not for every heartbeat).
    fn depths(&self) -> impl Future<Output = Result<Vec<Depth>, SpoolError>> + Send;

    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, SpoolError>> + Send;

    fn drops(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DropRecord>, SpoolError>> + Send;

    /// The wall clock went back `by_ms`: moves the next-attempt times
    /// still ahead of `now` back by as much (they were set on the clock as
    /// it was). Returns how many.
    fn rebase(
        &self,
        by_ms: i64,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, SpoolError>> + Send;

    /// What became of a message enqueued here (as far as the records that
    /// are kept still say).
    fn fate(&self, id: MessageId) -> impl Future<Output = Result<Fate, SpoolError>> + Send;

    /// Puts dead letters (`only` this one, or every one) back in the spool
    /// to be sent again from the start, in one transaction. Returns how
    /// many went back and how many stay dead because the spool has no room
    /// for them.
    fn replay_dead(
        &self,
        only: Option<MessageId>,
        now: Timestamp,
    ) -> impl Future<Output = Result<(u64, u64), SpoolError>> + Send;

    /// Deletes dead letters (`only` this one, or every one), recording each
    /// as dropped (`discarded`). Returns how many.
    fn discard_dead(
        &self,
        only: Option<MessageId>,
        now: Timestamp,
    ) -> impl Future<Output = Result<u64, SpoolError>> + Send;
}

/// A spooled message as read back from its stored parts (the header part
/// as the spool wrote it with `encode_header`): one reading for both
/// engines and for dead letters.
pub(crate) fn stored_message(
    header: &[u8],
    content_type: String,
    content: bytes::Bytes,
) -> Result<RawMessage, rs_protocol::codec::XmlError> {
    let (header, kind, data) =
        rs_protocol::codec::decode_header_part(header, &rs_protocol::codec::Limits::default())?;
    Ok(RawMessage {
        header,
        kind,
        data,
        content_type: content_type.into(),
        content,
    })
}

/// The spool a tier's configuration chose: its own SQLite file, or its
/// farm's on PostgreSQL.
#[derive(Debug, Clone)]
pub enum AnySpool {
    Sqlite(sqlite::SqliteSpool),
    Postgres(postgres::PgSpool),
}

impl AnySpool {
    /// Woken whenever messages are stored through this handle.
    pub fn notified(&self) -> std::sync::Arc<tokio::sync::Notify> {
        match self {
            AnySpool::Sqlite(s) => s.notified(),
            AnySpool::Postgres(s) => s.notified(),
        }
    }

    /// Gives back memory an idle spool does not need (SQLite's page
    /// cache; nothing to give on PostgreSQL).
    pub async fn release_memory(&self) -> Result<(), SpoolError> {
        match self {
            AnySpool::Sqlite(s) => s.release_memory().await,
            AnySpool::Postgres(_) => Ok(()),
        }
    }
}

/// Calls the same method on whichever engine.
macro_rules! either {
    ($self:ident.$m:ident($($a:expr),*)) => {
        match $self {
            AnySpool::Sqlite(s) => s.$m($($a),*).await,
            AnySpool::Postgres(s) => s.$m($($a),*).await,
        }
    };
}

impl Spool for AnySpool {
    async fn enqueue(
        &self,
        msgs: Vec<RawMessage>,
        now: Timestamp,
    ) -> Result<Vec<Enqueued>, SpoolError> {
        either!(self.enqueue(msgs, now))
    }
    async fn dequeue(
        &self,
        max_messages: usize,
        max_bytes: usize,
        now: Timestamp,
        infrastructure_only: bool,
    ) -> Result<Vec<Spooled>, SpoolError> {
        either!(self.dequeue(max_messages, max_bytes, now, infrastructure_only))
    }
    async fn settle(
        &self,
        results: Vec<(MessageId, Settle)>,
        now: Timestamp,
    ) -> Result<(), SpoolError> {
        either!(self.settle(results, now))
    }
    async fn sweep(&self, now: Timestamp) -> Result<u64, SpoolError> {
        either!(self.sweep(now))
    }
    async fn next_due(&self) -> Result<Option<Timestamp>, SpoolError> {
        either!(self.next_due())
    }
    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        either!(self.stats())
    }
    async fn depths(&self) -> Result<Vec<Depth>, SpoolError> {
        either!(self.depths())
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        either!(self.dead_letters(limit))
    }
    async fn drops(&self, limit: usize) -> Result<Vec<DropRecord>, SpoolError> {
        either!(self.drops(limit))
    }
    async fn rebase(&self, by_ms: i64, now: Timestamp) -> Result<u64, SpoolError> {
        either!(self.rebase(by_ms, now))
    }
    async fn fate(&self, id: MessageId) -> Result<Fate, SpoolError> {
        either!(self.fate(id))
    }
    async fn replay_dead(
        &self,
        only: Option<MessageId>,
        now: Timestamp,
    ) -> Result<(u64, u64), SpoolError> {
        either!(self.replay_dead(only, now))
    }
    async fn discard_dead(
        &self,
        only: Option<MessageId>,
        now: Timestamp,
    ) -> Result<u64, SpoolError> {
        either!(self.discard_dead(only, now))
    }
}

/// Moves what waits in `from` (a tier's SQLite spool from before it
/// joined a farm) into `into`, oldest first within precedence, so nothing
/// accepted before the move is stranded in a file no sender reads. Each
/// message leaves `from` only once `into` has stored it (or already had
/// it). Returns how many moved; dead letters stay where they are.
pub async fn move_waiting<A: Spool, B: Spool>(
    from: &A,
    into: &B,
    now: Timestamp,
) -> Result<u64, SpoolError> {
    // Messages waiting out a backoff go too (it was the old sender's).
    from.rebase(i64::MAX / 4, now).await?;
    let mut moved = 0;
    loop {
        let batch = from.dequeue(500, 16 << 20, now, false).await?;
        if batch.is_empty() {
            return Ok(moved);
        }
        let ids: Vec<MessageId> = batch.iter().map(|s| s.msg.header.id.clone()).collect();
        let got = into
            .enqueue(batch.into_iter().map(|s| s.msg).collect(), now)
            .await;
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                let back = ids.into_iter().map(|id| (id, Settle::Release)).collect();
                from.settle(back, now).await?;
                return Err(e);
            }
        };
        let mut settles = Vec::with_capacity(ids.len());
        for (id, r) in ids.into_iter().zip(got) {
            match r {
                Enqueued::Stored | Enqueued::Duplicate => {
                    moved += 1;
                    settles.push((id, Settle::Delivered));
                }
                Enqueued::Refused(reason) => {
                    tracing::warn!(message_id = %id, "stays in the old spool: {reason}");
                    settles.push((id, Settle::Dead(reason)));
                }
            }
        }
        from.settle(settles, now).await?;
    }
}

/// What an admin does with dead letters (`replayDeadLetters`,
/// `discardDeadLetters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    Replay,
    Discard,
}

/// Carries out a dead-letter action on a tier's spool (`only` this
/// message, or every one) and says how it went: one definition for every
/// tier that keeps dead letters (proxy, MLM).
pub async fn apply_dead_letters<S: Spool>(
    spool: &S,
    what: DeadLetterAction,
    only: Option<MessageId>,
    now: Timestamp,
) -> rs_protocol::control_messages::Answer {
    use rs_protocol::control_messages::{answer_refused, answer_with};
    let named = only.as_ref().map(|m| m.to_string());
    let result = match what {
        DeadLetterAction::Replay => spool.replay_dead(only, now).await.map(|(back, stay)| {
            let mut t = format!("{back} dead letter(s) put back in the spool");
            if stay > 0 {
                t.push_str(&format!(
                    "; {stay} stay dead letters: the spool has no room for them"
                ));
            }
            (back + stay, t)
        }),
        DeadLetterAction::Discard => spool
            .discard_dead(only, now)
            .await
            .map(|n| (n, format!("{n} dead letter(s) discarded"))),
    };
    match (result, named) {
        (Err(e), _) => answer_refused("failed", e.to_string()),
        (Ok((0, _)), Some(id)) => answer_refused("invalid", format!("no dead letter {id} here")),
        (Ok((_, text)), _) => answer_with("text/plain", text),
    }
}
