//! The sender (seed 004, Fig. 14): drains a tier's spool upstream through
//! its [`Uplink`], several envelopes in flight, acting on each message's
//! outcome; keeps a long poll open for the back-channel while idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use rs_net::retry::backoff;
use rs_protocol::ids::{MessageId, RsId};
use rs_protocol::model::{Advice, ContentKind, EnvelopeMeta};
use rs_protocol::outcome::Outcome;
use rs_protocol::time::{Clock, Timestamp};
use rs_store::spool::{Settle, Spool, Spooled};

use crate::uplink::{Outgoing, Uplink};
use crate::upstream::{PostError, Reply};

/// How the sender batches and paces.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub max_messages: usize,
    pub max_bytes: usize,
    /// Longest backoff between attempts.
    pub max_backoff: Duration,
    /// How often expired and aged-out messages are swept.
    pub sweep_every: Duration,
    /// Envelopes in flight at once.
    pub parallel: usize,
    /// Alarms of this precedence or higher also go, at once, on a second
    /// route that is up (`None`: never): whichever route accepts first
    /// delivers them, and the server stores them once.
    pub multi_send: Option<u8>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            max_messages: 500,
            max_bytes: 4 << 20,
            max_backoff: Duration::from_secs(300),
            sweep_every: Duration::from_secs(5),
            parallel: 4,
            multi_send: None,
        }
    }
}

rs_net::counters! {
    /// A sender's message counters (status and metrics).
    pub struct SenderCounters {
        posts_ok: "upstream_posts_total" {result = "ok"}, "POSTs to the next hop, by result.";
        posts_failed: "upstream_posts_total" {result = "failed"}, "POSTs to the next hop, by result.";
        /// Messages sent up (each attempt).
        sent: "upstream_messages_sent_total", "Messages sent to the next hop (each attempt).";
        accepted: "upstream_messages_total" {outcome = "accepted"},
            "Messages sent to the next hop, by the outcome it answered.";
        retried: "upstream_messages_total" {outcome = "retry"},
            "Messages sent to the next hop, by the outcome it answered.";
        rejected: "upstream_messages_total" {outcome = "rejected"},
            "Messages sent to the next hop, by the outcome it answered.";
        expired: "upstream_messages_total" {outcome = "expired"},
            "Messages sent to the next hop, by the outcome it answered.";
        /// Messages the throttle held back in the spool (each time).
        throttled: "upstream_messages_throttled_total",
            "Messages the throttle held back in the spool (each time).";
        /// Envelopes of critical alarms also sent on a second route.
        multi_sent: "upstream_multi_send_total",
            "Envelopes of critical alarms also sent on a second route (multiple send).";
    }
}

/// Live counters of a sender, for status and metrics.
#[derive(Debug)]
pub struct SenderStats {
    pub counters: SenderCounters,
    pub connected: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// Heartbeat interval advised by the next hop, in ms (0: none yet).
    pub advised_heartbeat_ms: AtomicU64,
    /// Round trips of POSTs that carried messages (long polls, held by
    /// design, are not timed).
    pub post_seconds: rs_net::metrics::Histogram,
    /// From spooling to the next hop's acceptance, of each message
    /// delivered.
    pub spool_wait_seconds: rs_net::metrics::Histogram,
    /// The upstream routes (attached by the sender when it starts).
    pub routes: crate::metrics::RouteGauges,
}

impl Default for SenderStats {
    fn default() -> Self {
        SenderStats {
            counters: SenderCounters::default(),
            connected: AtomicBool::new(false),
            last_error: Mutex::new(None),
            advised_heartbeat_ms: AtomicU64::new(0),
            post_seconds: rs_net::metrics::latency(
                "upstream_post_duration_seconds",
                "Round trips of POSTs carrying messages to the next hop (long polls excluded).",
                &[],
            ),
            spool_wait_seconds: rs_net::metrics::latency(
                "spool_wait_seconds",
                "From spooling to the next hop's acceptance, of each message delivered.",
                &[],
            ),
            routes: crate::metrics::RouteGauges::default(),
        }
    }
}

impl std::ops::Deref for SenderStats {
    type Target = SenderCounters;
    fn deref(&self) -> &SenderCounters {
        &self.counters
    }
}

impl SenderStats {
    /// Adds the counters, the round-trip histogram and whether the next
    /// hop answers (`upstream_connected`) to `r`.
    pub fn register(self: &Arc<Self>, r: &rs_net::metrics::Registry) {
        self.counters.register(r);
        r.add(&self.post_seconds);
        r.add(&self.spool_wait_seconds);
        r.add(&self.routes);
        crate::metrics::pulling(
            r,
            self,
            "upstream_connected",
            "1 while the last POST to the next hop succeeded, else 0.",
            |s| f64::from(u8::from(s.connected.load(Ordering::Relaxed))),
        );
    }

    /// The status tree's lines on the upstream routes: the URL messages
    /// take, and with several routes each one's state.
    pub fn route_details(&self) -> Vec<(String, String)> {
        let routes = self.routes.snapshot();
        let mut out = Vec::new();
        if let Some(r) = routes.iter().find(|r| r.messages) {
            out.push(("upstream.route".to_owned(), r.url.clone()));
        }
        if routes.len() > 1 {
            for (i, r) in routes.iter().enumerate() {
                let delay = r.delay.map_or_else(
                    || "not measured".to_owned(),
                    |d| format!("{:.1} ms", d * 1000.0),
                );
                let mut v = format!(
                    "{} {} delay {delay}",
                    r.url,
                    if r.up { "up" } else { "down" }
                );
                if r.bulk {
                    v.push_str(", bulk");
                }
                out.push((format!("upstream.routes.{i}"), v));
            }
        }
        out
    }

    /// The heartbeat interval the next hop advised, or `default` until it
    /// has advised one.
    pub fn heartbeat(&self, default: Duration) -> Duration {
        match self.advised_heartbeat_ms.load(Ordering::Relaxed) {
            0 => default,
            ms => Duration::from_millis(ms),
        }
    }

    fn fail(&self, e: &PostError) {
        self.posts_failed.inc();
        self.connected.store(false, Ordering::Relaxed);
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(e.to_string());
        }
    }
}

/// A stopping tier's last delivery: waits while the sender (still
/// running) empties `spool`, until it is empty, `until` passes, or the next
/// hop fails a POST (it is not there to take the rest: waiting longer
/// would only delay the stop). What is left stays spooled, durably, for
/// the next start.
pub async fn drain<S: Spool>(spool: &S, stats: &SenderStats, until: tokio::time::Instant) {
    let failed_before = stats.posts_failed.get();
    loop {
        match spool.stats().await {
            Ok(s) if s.messages == 0 => return,
            Ok(s) => {
                if tokio::time::Instant::now() >= until {
                    tracing::info!("stopping with {} messages spooled (grace over)", s.messages);
                    return;
                }
                if stats.posts_failed.get() > failed_before {
                    tracing::info!(
                        "stopping with {} messages spooled (the next hop is not taking them)",
                        s.messages
                    );
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("drain: {e}");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A backward step of the wall clock larger than this (against the
/// monotonic clock) moves the spool's retry times back with it.
const CLOCK_JUMP: Duration = Duration::from_secs(2);

/// Drains a spool upstream until cancelled.
pub struct Sender<S: Spool> {
    pub me: RsId,
    pub spool: S,
    /// The next hop, and the notices and back-channel that go with it.
    pub uplink: Arc<Uplink>,
    pub cfg: SenderConfig,
    pub clock: Arc<dyn Clock>,
    pub wake: Arc<Notify>,
    pub stats: Arc<SenderStats>,
    /// Forwarding switched off (`disableForwarding`): keep spooling.
    pub paused: Arc<AtomicBool>,
    /// What may go now; what it holds back waits in the spool.
    pub throttle: Option<Arc<crate::throttle::Throttle>>,
    /// When idle, keep a long poll open, asking the upstream to hold the
    /// reply this long.
    pub poll: Option<Duration>,
    /// Seals this component's own messages as they go into an envelope
    /// (the spool keeps them as made, so one spooled before the component
    /// had its certificate is sealed too).
    pub seal: Option<Arc<rs_net::seal::Sealer>>,
}

/// The shortest time between two long polls, whatever the upstream does.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What an envelope in flight yields: its messages, their IDs, the byte
/// budget it was cut to, how the POST went, and the messages a copy sent
/// on a second route had accepted there (multiple send).
type InFlight = (
    Vec<Spooled>,
    Vec<MessageId>,
    usize,
    Result<Reply, PostError>,
    Vec<MessageId>,
);

impl<S: Spool> std::fmt::Debug for Sender<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl<S: Spool> Sender<S> {
    pub async fn run(self, shutdown: CancellationToken) {
        use futures_util::StreamExt as _;
        self.stats.routes.attach(&self.uplink);
        let mut failures: u32 = 0;
        let mut advice = Advice::default();
        // After a 400 on a batch, send these one by one to find the bad one.
        let mut isolate: usize = 0;
        let mut last_sweep = None::<tokio::time::Instant>;
        // No new POST before this (backoff, or the upstream's advice).
        let mut resume_at = tokio::time::Instant::now();
        // Several envelopes may be in flight at once, so one round trip's
        // latency does not bound the throughput; the spool keeps a message
        // from being taken twice.
        let mut inflight = futures_util::stream::FuturesUnordered::<
            std::pin::Pin<Box<dyn std::future::Future<Output = InFlight> + Send>>,
        >::new();
        let mut polling = false;
        // A poll answered at once with nothing is not repeated before this.
        let mut next_poll = tokio::time::Instant::now();
        // The wall clock against the monotonic one, to notice jumps.
        let mut wall_seen = (self.clock.now(), tokio::time::Instant::now());
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let now = self.clock.now();
            // The wall clock went back: retry times set before were set on
            // the clock as it was, and would now wait the jump on top of
            // their backoff. Move them back by the jump.
            let expected = wall_seen.0.saturating_add(wall_seen.1.elapsed());
            let back = expected.as_millis() - now.as_millis();
            if back > CLOCK_JUMP.as_millis() as i64 {
                tracing::warn!("the wall clock went back {back} ms; rescheduling retries");
                if let Err(e) = self.spool.rebase(back, now).await {
                    tracing::error!("spool rebase: {e}");
                }
            }
            wall_seen = (now, tokio::time::Instant::now());
            if last_sweep.is_none_or(|t| t.elapsed() >= self.cfg.sweep_every) {
                if let Err(e) = self.spool.sweep(now).await {
                    tracing::error!("spool sweep: {e}");
                }
                last_sweep = Some(tokio::time::Instant::now());
            }
            let parallel = if isolate > 0 {
                1
            } else {
                self.cfg.parallel.max(1)
            };
            let mut next_due = None;
            // With forwarding switched off, integrators' messages wait in the
            // spool; control responses, heartbeats and the long poll go on.
            let paused = self.paused.load(Ordering::Relaxed);
            while inflight.len() < parallel && tokio::time::Instant::now() >= resume_at {
                let max_messages = if isolate > 0 {
                    1
                } else {
                    advice.max_messages.map_or(self.cfg.max_messages, |m| {
                        (m as usize).clamp(1, self.cfg.max_messages)
                    })
                };
                let max_bytes = advice.max_bytes.map_or(self.cfg.max_bytes, |b| {
                    (b as usize).clamp(4096, self.cfg.max_bytes)
                });
                let batch = match self
                    .spool
                    .dequeue(max_messages, max_bytes, now, paused)
                    .await
                {
                    Ok(b) => self.throttled(b, now).await,
                    Err(e) => {
                        tracing::error!("spool dequeue: {e}");
                        resume_at = tokio::time::Instant::now() + Duration::from_secs(1);
                        break;
                    }
                };
                if batch.is_empty() {
                    next_due = self.spool.next_due().await.ok().flatten();
                    // Nothing to send: keep one long poll open for the
                    // back-channel (it also carries our acknowledgements).
                    if let Some(hold) = self.poll
                        && !polling
                        && tokio::time::Instant::now() >= next_poll
                    {
                        polling = true;
                        next_poll = tokio::time::Instant::now() + MIN_POLL_INTERVAL;
                        // Never ask for more than the upstream grants.
                        let hold = advice.poll_hold.map_or(hold, |granted| {
                            hold.min(granted.max(Duration::from_secs(1)))
                        });
                        let (out, _) = self.envelope(&[], now, Some(hold));
                        let uplink = self.uplink.clone();
                        inflight.push(Box::pin(async move {
                            let r = uplink.send(out, Some(hold)).await;
                            (Vec::new(), Vec::new(), max_bytes, r, Vec::new())
                        }));
                    }
                    break;
                }
                let batch = self.seal_batch(batch).await;
                let (out, ids) = self.envelope(&batch, now, None);
                let copy = self.copy(&batch, &ids, now);
                let uplink = self.uplink.clone();
                let timer = self.stats.post_seconds.clone();
                inflight.push(Box::pin(async move {
                    let started = std::time::Instant::now();
                    let main = uplink.send(out, None);
                    let (r, also) = match copy {
                        Some(copy) => {
                            let (r, c) = tokio::join!(main, uplink.send_copy(copy));
                            (r, accepted(c))
                        }
                        None => (main.await, Vec::new()),
                    };
                    timer.observe(started.elapsed().as_secs_f64());
                    (batch, ids, max_bytes, r, also)
                }));
            }
            if inflight.is_empty() {
                let wait = if tokio::time::Instant::now() < resume_at {
                    resume_at - tokio::time::Instant::now()
                } else {
                    match next_due {
                        Some(t) => t
                            .since(now)
                            .clamp(Duration::from_millis(10), self.cfg.sweep_every),
                        None => self.cfg.sweep_every,
                    }
                };
                // Come back in time for the next long poll.
                let wait = match self.poll {
                    Some(_) if !polling => {
                        wait.min(next_poll.saturating_duration_since(tokio::time::Instant::now()))
                    }
                    _ => wait,
                };
                self.idle(&shutdown, wait.max(Duration::from_millis(10)))
                    .await;
                continue;
            }
            // Messages waiting for a time (backoff, throttle) become due
            // while a long poll is held: go and send them then.
            let due_at = next_due.map(|t| {
                tokio::time::Instant::now()
                    + t.since(now)
                        .clamp(Duration::from_millis(50), self.cfg.sweep_every)
            });
            let (batch, ids, max_bytes, result, also) = tokio::select! {
                () = shutdown.cancelled() => return,
                Some(done) = inflight.next() => done,
                // New messages while only a long poll is out: go and send.
                () = self.wake.notified(), if inflight.len() < parallel => continue,
                () = sleep_until_opt(due_at), if inflight.len() < parallel && due_at.is_some() => continue,
            };
            if batch.is_empty() {
                polling = false;
            }
            match result {
                Ok(Reply {
                    envelope: mut reply,
                    route,
                }) => {
                    failures = 0;
                    isolate = isolate.saturating_sub(1);
                    self.stats.posts_ok.inc();
                    self.stats.connected.store(true, Ordering::Relaxed);
                    self.stats.sent.inc_by(ids.len() as u64);
                    if let Some(a) = reply.meta.advice {
                        advice = a;
                        if let Some(h) = a.heartbeat {
                            self.stats
                                .advised_heartbeat_ms
                                .store(h.as_millis() as u64, Ordering::Relaxed);
                        }
                        if let Some(pause) = a.resume_after.filter(|d| !d.is_zero()) {
                            resume_at = resume_at.max(tokio::time::Instant::now() + pause);
                        }
                    }
                    // A copy accepted on the other route delivered it.
                    for (id, o) in &mut reply.meta.outcomes {
                        if also.contains(id) {
                            *o = Outcome::Accepted;
                        }
                    }
                    self.settle(&batch, &reply.meta, self.clock.now()).await;
                    if batch.is_empty() && !reply.messages.is_empty() {
                        // A poll that brought something: more may follow
                        // at once, so poll again without the pause.
                        next_poll = tokio::time::Instant::now();
                    }
                    self.uplink.receive(reply.messages, route).await;
                }
                Err(e) => {
                    self.stats.fail(&e);
                    let now = self.clock.now();
                    // Those a copy on the other route delivered are done.
                    let release = |s: Settle| {
                        ids.iter()
                            .map(|id| {
                                if also.contains(id) {
                                    (id.clone(), Settle::Delivered)
                                } else {
                                    (id.clone(), s.clone())
                                }
                            })
                            .collect::<Vec<_>>()
                    };
                    // The envelope as it was is refused: one message alone
                    // is the bad one (dead-lettered with the reason).
                    let dead = || match e.outcome() {
                        Outcome::Rejected(reason) => release(Settle::Dead(reason)),
                        _ => release(Settle::Release),
                    };
                    let (settles, wait) = match &e {
                        PostError::Refused { .. } if batch.len() == 1 => (dead(), Duration::ZERO),
                        PostError::Refused { .. } => {
                            tracing::warn!(
                                "{e}; sending these {} messages one by one",
                                batch.len()
                            );
                            isolate = isolate.max(batch.len());
                            (release(Settle::Release), Duration::ZERO)
                        }
                        PostError::TooLarge { .. } if batch.len() == 1 => (dead(), Duration::ZERO),
                        PostError::TooLarge { .. } => {
                            advice.max_bytes = Some((max_bytes / 2) as u64);
                            (release(Settle::Release), Duration::ZERO)
                        }
                        PostError::Busy { retry_after, .. } => {
                            failures += 1;
                            let w = backoff(failures, self.cfg.max_backoff);
                            (
                                release(Settle::Release),
                                retry_after.map_or(w, |r| r.max(w / 4)),
                            )
                        }
                        _ => {
                            failures += 1;
                            tracing::warn!("upstream: {e}");
                            (
                                release(Settle::Release),
                                backoff(failures, self.cfg.max_backoff),
                            )
                        }
                    };
                    if let Err(e) = self.spool.settle(settles, now).await {
                        tracing::error!("spool settle: {e}");
                    }
                    if !wait.is_zero() {
                        resume_at = resume_at.max(tokio::time::Instant::now() + wait);
                    }
                }
            }
        }
    }

    /// Waits up to `d`, or until new messages are spooled or shutdown.
    async fn idle(&self, shutdown: &CancellationToken, d: Duration) {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = self.wake.notified() => {}
            () = tokio::time::sleep(d) => {}
        }
    }

    /// Keeps what the throttle admits (in the spool's order: precedence,
    /// then age, so higher precedence takes the capacity first); defers
    /// the rest in the spool until the throttle says.
    async fn throttled(&self, batch: Vec<Spooled>, now: Timestamp) -> Vec<Spooled> {
        let Some(t) = self.throttle.as_ref().filter(|t| !t.is_empty()) else {
            return batch;
        };
        let mut keep = Vec::with_capacity(batch.len());
        let mut defer = Vec::new();
        for s in batch {
            match t.check_raw(&s.msg) {
                crate::throttle::Decision::Admit => keep.push(s),
                crate::throttle::Decision::Wait { after, .. } => {
                    self.stats.throttled.inc();
                    defer.push((
                        s.msg.header.id.clone(),
                        Settle::Defer {
                            at: now.saturating_add(after),
                        },
                    ));
                }
            }
        }
        if !defer.is_empty()
            && let Err(e) = self.spool.settle(defer, now).await
        {
            tracing::error!("spool settle: {e}");
        }
        keep
    }

    /// Seals what this component made (`[seal]`), on the blocking pool:
    /// it is public-key work per message, and a proxy's runtime has a
    /// single thread that also answers its integrators.
    async fn seal_batch(&self, batch: Vec<Spooled>) -> Vec<Spooled> {
        let Some(sealer) = self.seal.clone() else {
            return batch;
        };
        if !batch.iter().any(|s| sealer.wants(&s.msg)) {
            return batch;
        }
        let mut copy = batch.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            for s in &mut copy {
                if sealer.wants(&s.msg) {
                    match sealer.seal(&s.msg) {
                        Ok(m) => s.msg = m,
                        Err(e) => {
                            tracing::error!(message_id = %s.msg.header.id, "cannot seal: {e}")
                        }
                    }
                }
            }
            copy
        })
        .await;
        // A failed task leaves them unsealed: envelope() holds them back.
        sealed.unwrap_or(batch)
    }

    /// The envelope of `batch` (and the notices due), and the IDs of the
    /// messages in it.
    fn envelope(
        &self,
        batch: &[Spooled],
        now: Timestamp,
        poll: Option<Duration>,
    ) -> (Outgoing, Vec<MessageId>) {
        self.uplink.envelope(now, poll, |w| {
            let mut ids = Vec::with_capacity(batch.len());
            for s in batch {
                let mut m = s.msg.clone();
                // A hop we appended on receipt (custody) gets its sent time now.
                if let Some(h) = m.header.routing.last_mut()
                    && h.component == self.me
                    && h.sent.is_none()
                {
                    h.sent = Some(now);
                }
                if let Some(sealer) = &self.seal
                    && sealer.wants(&m)
                {
                    // Its seal failed (seal_batch): never sent unsealed. It
                    // stays in the spool and, without an outcome, is retried
                    // with backoff.
                    continue;
                }
                w.push_raw(&m);
                ids.push(m.header.id);
            }
            ids
        })
    }

    /// Multiple send: the envelope of copies of the alarms in `batch` of
    /// [`SenderConfig::multi_send`]'s precedence or higher (among `ids`,
    /// those that went), for a second route that is up.
    fn copy(&self, batch: &[Spooled], ids: &[MessageId], now: Timestamp) -> Option<Outgoing> {
        let min = self.cfg.multi_send?;
        let critical: Vec<&Spooled> = batch
            .iter()
            .filter(|s| {
                s.msg.kind == ContentKind::Alarm
                    && s.msg
                        .header
                        .source()
                        .is_some_and(|src| src.qos.precedence >= min)
                    && ids.contains(&s.msg.header.id)
            })
            .collect();
        if critical.is_empty() {
            return None;
        }
        let (out, ()) = self.uplink.copy_envelope(now, |w| {
            for s in critical {
                let mut m = s.msg.clone();
                if let Some(h) = m.header.routing.last_mut()
                    && h.component == self.me
                    && h.sent.is_none()
                {
                    h.sent = Some(now);
                }
                w.push_raw(&m);
            }
        })?;
        self.stats.multi_sent.inc();
        Some(out)
    }

    async fn settle(&self, batch: &[Spooled], meta: &EnvelopeMeta, now: Timestamp) {
        let outcomes: HashMap<&MessageId, &Outcome> =
            meta.outcomes.iter().map(|(id, o)| (id, o)).collect();
        let mut settles = Vec::with_capacity(batch.len());
        for s in batch {
            let id = &s.msg.header.id;
            // Never sooner than the hint; a little jitter so a throttled
            // crowd does not come back in step.
            let retry_at = |after: Duration| {
                let after = after.max(Duration::from_millis(100));
                let jitter =
                    Duration::from_millis(fastrand::u64(0..=after.as_millis() as u64 / 10));
                now.saturating_add(after + jitter)
            };
            let settle = match outcomes.get(id) {
                Some(Outcome::Accepted) => {
                    self.stats.accepted.inc();
                    self.stats.spool_wait_seconds.observe(
                        (now.as_millis() - s.spooled_at.as_millis()).max(0) as f64 / 1000.0,
                    );
                    Settle::Delivered
                }
                Some(Outcome::Retry { after, reason }) => {
                    tracing::debug!(message_id = %id, "retry after {after:?} ({reason})");
                    self.stats.retried.inc();
                    Settle::Retry {
                        at: retry_at(*after),
                    }
                }
                Some(Outcome::Rejected(reason)) => {
                    self.stats.rejected.inc();
                    Settle::Dead(reason.clone())
                }
                Some(Outcome::Expired) => {
                    self.stats.expired.inc();
                    Settle::Expired
                }
                None => {
                    self.stats.retried.inc();
                    Settle::Retry {
                        at: now.saturating_add(backoff(s.attempts + 1, self.cfg.max_backoff)),
                    }
                }
            };
            settles.push((id.clone(), settle));
        }
        if let Err(e) = self.spool.settle(settles, now).await {
            tracing::error!("spool settle: {e}");
        }
    }
}

/// The messages a copy's reply says were accepted.
fn accepted(r: Result<Reply, PostError>) -> Vec<MessageId> {
    match r {
        Ok(r) => r
            .envelope
            .meta
            .outcomes
            .into_iter()
            .filter(|(_, o)| matches!(o, Outcome::Accepted))
            .map(|(id, _)| id)
            .collect(),
        Err(e) => {
            tracing::debug!("copy on the second route: {e}");
            Vec::new()
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
