//! The durable spool every sender keeps its messages in until the next hop
//! has answered for them: the proxy's outgoing queue, the MLM's custody and
//! aggregation queue.
//!
//! Order: highest precedence first, then oldest. A message leaves the spool
//! only when its delivery is settled: delivered (the next hop accepted it),
//! dead (rejected for good, kept in the dead letters with the reason),
//! expired, or evicted under pressure; every removal other than delivery is
//! recorded with its reason and counted. The interface is async so a
//! PostgreSQL backend can implement it; [`sqlite::SqliteSpool`] is the
//! embedded one.

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
}

impl SpoolConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            path: path.into(),
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 86_400),
            dedupe_window: None,
        }
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
}

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
