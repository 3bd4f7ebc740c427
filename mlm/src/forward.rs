//! The intermediate receiver (seed 004, Figs. 15-16), the MLM's stages of
//! the common envelope pipeline ([`rs_node::pipeline`]): for each forward
//! message, the service modules, then the throttle, then forwarding — at
//! once to the upstream (the reply says what the upstream said), or into
//! the MLM's own spool in custody mode. Every tier appends its routing
//! hop. Also what comes down: back-channel messages taken into the
//! subtree's queue, and the relay through the MLM's uplink.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rs_net::auth::Caller;
use rs_node::upstream::PostError;
use rs_protocol::codec::RawMessage;
use rs_protocol::model::{Advice, Content, EnvelopeMeta, Hop};
use rs_protocol::{MessageId, Outcome, Timestamp};
use rs_store::spool::{Enqueued, Spool as _};

use crate::Mlm;
use crate::aggregate::Member;
use crate::modules::{Verdict, View};

rs_net::counters! {
    /// Live counters (status and metrics) beside the pipeline's
    /// ([`rs_node::pipeline::Counts`]).
    pub struct Stats {
        /// Of the received, those the next hop accepted from this MLM.
        forwarded: "messages_forwarded_total", "Messages the next hop accepted from this tier.";
        filtered: "messages_filtered_total", "Messages a module dropped (answered accepted).";
        aggregated: "messages_aggregated_total",
            "Messages held for an aggregation window (answered accepted).";
        /// Back-channel messages dropped because their expiry passed.
        back_expired: "backchannel_expired_total",
            "Back-channel messages dropped because their expiry passed.";
        /// Back-channel messages taken from upstream (on replies to this
        /// member's POSTs; in a farm, the member that took each).
        back_taken: "backchannel_taken_total", "Back-channel messages taken from upstream.";
        /// Control actions addressed to this MLM that it applied.
        actions_applied: "backchannel_actions_total" {result = "applied"},
            "Control actions addressed to this tier, by result.";
    }
}

pub(crate) fn unavailable(text: impl Into<String>) -> Outcome {
    Outcome::retry(Duration::from_secs(5), "unavailable", text)
}

/// A message the MLM keeps: to forward (relay or custody), or to hold for
/// an aggregation window.
#[derive(Debug)]
pub enum Kept {
    Forward(RawMessage),
    Aggregate {
        rule: usize,
        group: String,
        member: Member,
    },
}

/// The intermediate receiver (seed 004, Figs. 15-16) as a stage of the
/// common pipeline: the service modules, the bulk-request check, the
/// throttle, then forwarding (at once upstream, or into custody).
impl rs_node::pipeline::Tier for Mlm {
    type Kept = Kept;

    fn id(&self) -> &rs_protocol::RsId {
        &self.id
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn counts(&self) -> &rs_node::pipeline::Counts {
        &self.counts
    }

    fn load(&self) -> &rs_node::ingress::Load {
        &self.load
    }

    fn auth(&self) -> &rs_net::auth::Stats {
        &self.auth
    }

    fn limits(&self) -> (rs_protocol::codec::Limits, Duration) {
        (
            self.cfg.limits(),
            Duration::from_secs(self.cfg.body_timeout_secs),
        )
    }

    /// Learns the routes to the caller's sources, takes its
    /// acknowledgements, and sends deliveries (here and reported from
    /// below) up with the next POST; they are kept in the queue's
    /// database too until a POST carried them, so a farm's other members
    /// send those of a member that died first.
    async fn took(
        &self,
        caller: &Caller,
        meta: &EnvelopeMeta,
        sources: Vec<rs_protocol::RsId>,
        now: Timestamp,
    ) {
        let sender = &meta.sender;
        if let Err(e) = self.outbox.learn(sender.clone(), sources, now).await {
            tracing::error!("routes: {e}");
        }
        let mut notices = match self
            .outbox
            .acknowledge(sender.clone(), meta.acks.clone())
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("acknowledgements from {sender}: {e}");
                Vec::new()
            }
        };
        // Deliveries reported from below count only for the caller's own
        // subtree (a site cannot complete another's job).
        notices.extend(
            meta.delivered
                .iter()
                .filter(|(_, dest)| match caller {
                    Caller::Open => true,
                    Caller::Component(p) => rs_net::auth::may_speak_for(p, &self.id, dest),
                })
                .cloned(),
        );
        if !notices.is_empty() {
            if let Err(e) = self.outbox.note_delivered(notices.clone(), now).await {
                tracing::warn!("delivery notices: {e}");
            }
            self.uplink.notices().deliver(notices);
        }
    }

    fn examine(&self, m: RawMessage, now: Timestamp) -> Result<Kept, Outcome> {
        let mut view = View::new(m);
        let mut verdict = Verdict::Pass;
        for module in &self.modules {
            verdict = module.inspect(&mut view, now);
            if verdict != Verdict::Pass {
                break;
            }
        }
        match verdict {
            Verdict::Discard(why) => {
                tracing::debug!(message_id = %view.raw.header.id, "discarded ({why})");
                self.stats.filtered.inc();
                Err(Outcome::Accepted)
            }
            Verdict::Aggregate {
                rule,
                group,
                severity,
                text,
            } => {
                let h = &view.raw.header;
                let Some(src) = h.source() else {
                    return Err(unavailable("no source"));
                };
                Ok(Kept::Aggregate {
                    rule,
                    group,
                    member: Member {
                        id: h.id.to_string(),
                        received: now.as_millis(),
                        severity,
                        precedence: src.qos.precedence,
                        persistent: src.qos.persistent,
                        expiry: src.qos.expiry.map(Timestamp::as_millis),
                        source: src.component.to_string(),
                        class: h.class.class.to_string(),
                        subclass: h.class.subclass.to_string(),
                        text,
                    },
                })
            }
            Verdict::Pass => {
                let raw = view.into_raw();
                match crate::bulk::check_request(self, &raw) {
                    Some(refused) => Err(refused),
                    None => Ok(Kept::Forward(raw)),
                }
            }
        }
    }

    fn throttle(&self) -> Arc<rs_node::throttle::Throttle> {
        self.throttle.clone()
    }

    /// What is held for aggregation is not throttled (its summary is).
    fn subject<'a>(
        &self,
        kept: &'a Kept,
        throttle: &rs_node::throttle::Throttle,
    ) -> Option<rs_node::throttle::Subject<'a>> {
        match kept {
            Kept::Forward(raw) => rs_node::throttle::Subject::of(raw, throttle.needs_severity()),
            Kept::Aggregate { .. } => None,
        }
    }

    async fn dispose(&self, kept: Vec<Kept>, now: Timestamp) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; kept.len()];
        let mut forward: Vec<(usize, RawMessage)> = Vec::new();
        let mut aggregate = Vec::new();
        for (i, k) in kept.into_iter().enumerate() {
            match k {
                Kept::Forward(mut raw) => {
                    raw.header.routing.push(Hop {
                        component: self.id.clone(),
                        received: now,
                        sent: None,
                    });
                    forward.push((i, raw));
                }
                Kept::Aggregate {
                    rule,
                    group,
                    member,
                } => aggregate.push((i, (rule, group, member))),
            }
        }
        if !aggregate.is_empty() {
            let (slots, items): (Vec<usize>, Vec<_>) = aggregate.into_iter().unzip();
            let o = match self.aggregation.add(items).await {
                Ok(()) => {
                    self.stats.aggregated.inc_by(slots.len() as u64);
                    Outcome::Accepted
                }
                Err(e) => {
                    tracing::error!("aggregation queue: {e}");
                    unavailable("the MLM could not store the message for aggregation")
                }
            };
            for s in slots {
                outcomes[s] = Some(o.clone());
            }
        }
        if !forward.is_empty() {
            let results = if self.cfg.custody {
                custody(self, &forward, now).await
            } else {
                self.coalescer
                    .relay(forward.iter().map(|(_, m)| m.clone()).collect())
                    .await
            };
            for ((slot, _), o) in forward.iter().zip(results) {
                if o == Outcome::Accepted {
                    self.stats.forwarded.inc();
                }
                outcomes[*slot] = Some(o);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| unavailable("")))
            .collect()
    }

    /// Passes on the interval the upstream asks for, so settings cannot
    /// drift, and the upstream's request to hold back, so a storm does
    /// not just move up a tier.
    fn advice(&self, pure_poll: bool) -> Advice {
        Advice {
            heartbeat: Some(self.sender_stats.heartbeat(self.cfg.heartbeat())),
            poll_hold: Some(rs_node::ingress::MAX_HOLD),
            resume_after: if pure_poll {
                None
            } else {
                let upstream =
                    self.upstream_busy_until.load(Ordering::Relaxed) - self.clock.now().as_millis();
                let passed_on = (upstream > 0).then(|| Duration::from_millis(upstream as u64));
                self.load.advice().max(passed_on)
            },
            ..Advice::default()
        }
    }

    fn ready(&self) -> &rs_node::ingress::BackChannelReady {
        &self.outbox_ready
    }

    fn stopping(&self) -> &tokio_util::sync::CancellationToken {
        &self.stopping
    }

    async fn offer(&self, hop: rs_protocol::RsId, limit: usize) -> Result<Vec<RawMessage>, String> {
        self.outbox
            .offer(hop, self.clock.now(), self.cfg.offer_again(), limit)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Copies of a back-channel message, by the next hop each goes to.
type Copies = Vec<(rs_protocol::RsId, RawMessage)>;

/// Takes back-channel messages from upstream into this MLM's queue: one
/// copy per next hop, listing the destinations behind it (the MLM nearest
/// the destinations thus makes one copy per destination). Returns the IDs
/// now safe, to acknowledge upstream.
pub async fn take_down(
    mlm: &Mlm,
    msgs: Vec<RawMessage>,
    via: &rs_node::uplink::Via,
) -> Vec<MessageId> {
    mlm.stats.back_taken.inc_by(msgs.len() as u64);
    let mut copies = Vec::new();
    // Download offers: the file is fetched once into the cache, and the
    // copies handed down name this MLM's URL for it (held until it is here).
    let mut offers: Vec<(String, bool, Copies)> = Vec::new();
    let mut for_me = Vec::new();
    let mut failed = Vec::new();
    for m in msgs {
        let (mine, others): (Vec<_>, Vec<_>) = m
            .header
            .destinations()
            .iter()
            .cloned()
            .partition(|d| *d == mlm.id);
        if !mine.is_empty() {
            match crate::actions::apply_own(mlm, &m).await {
                Ok(()) => for_me.push(m.header.id.clone()),
                // Not acknowledged: offered again.
                Err(e) => {
                    tracing::error!(message_id = %m.header.id, "control for this MLM: {e}")
                }
            }
        }
        let (mut by_hop, unknown) = rs_node::next_hop::split(others, |d| async {
            // A lookup that fails counts as no route.
            Ok::<_, std::convert::Infallible>(mlm.outbox.route(d).await.ok().flatten())
        })
        .await
        .unwrap_or_else(|never| match never {});
        // Not seen yet: it will call in itself.
        for d in unknown {
            by_hop.entry(d.clone()).or_default().push(d);
        }
        let offer = match download_offer(mlm, &m, via).await {
            Ok(o) => o,
            Err(e) => {
                // Not acknowledged: offered again, and tried again then.
                tracing::error!(message_id = %m.header.id, "download offer: {e}");
                failed.push(m.header.id.clone());
                continue;
            }
        };
        let mut these = Vec::new();
        for (hop, dests) in by_hop {
            let mut c = m.clone();
            c.header = m.header.copy_for_hop(dests, &mlm.id, mlm.clock.now());
            if let Some((_, _, b)) = &offer {
                c = rs_protocol::model::Message {
                    header: c.header,
                    content: Content::BulkRequest(b.clone()),
                }
                .to_raw();
            }
            these.push((hop, c));
        }
        match offer {
            Some((sha, cached, _)) => offers.push((sha, cached, these)),
            None => copies.extend(these),
        }
    }
    let all_ids: Vec<MessageId> = copies.iter().map(|(_, m)| m.header.id.clone()).collect();
    let mut ids = match mlm.outbox.accept(copies, mlm.clock.now()).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!(
                "back-channel queue: {e}; {} messages not acknowledged",
                all_ids.len()
            );
            Vec::new()
        }
    };
    for (sha, cached, these) in offers {
        match mlm
            .outbox
            .accept_bulk(these, Some((sha.clone(), !cached)), mlm.clock.now())
            .await
        {
            Ok(more) => ids.extend(more),
            Err(e) => {
                tracing::error!("back-channel queue: {e}; a download offer not acknowledged");
                continue;
            }
        }
        if !cached {
            release_if_cached(mlm, sha).await;
        }
    }
    mlm.outbox_ready.notify_waiters();
    ids.extend(for_me);
    ids.retain(|i| !failed.contains(i));
    ids
}

/// Held copies of an offer were just queued: if the fetcher finished the
/// file meanwhile, its release ran before they were there, so they go now.
/// (The fetcher marks a file cached before it releases; copies committed
/// before that mark are released by the fetcher, the others here.)
async fn release_if_cached(mlm: &Mlm, sha: String) {
    match mlm.cache.is_cached(sha.clone()).await {
        Ok(false) => {}
        Ok(true) => match mlm.outbox.release(sha.clone()).await {
            Ok(n) if n > 0 => {
                tracing::info!("bulk cache: {sha} already here; {n} offer(s) released")
            }
            Ok(_) => {}
            Err(e) => tracing::error!("bulk cache {sha}: {e}; offers released at the next start"),
        },
        Err(e) => tracing::error!("bulk cache {sha}: {e}; offers released at the next start"),
    }
}

/// For a download offer: records it in the cache and returns the file's
/// SHA-256, whether it is here already, and the offer as this MLM hands it
/// down (with its own URL). `None` for any other message.
async fn download_offer(
    mlm: &Mlm,
    m: &RawMessage,
    via: &rs_node::uplink::Via,
) -> Result<Option<(String, bool, rs_protocol::model::BulkRequest)>, String> {
    if m.kind != rs_protocol::model::ContentKind::BulkRequest {
        return Ok(None);
    }
    let full = m
        .clone()
        .decode(&mlm.cfg.limits())
        .map_err(|e| e.to_string())?;
    let Content::BulkRequest(mut b) = full.content else {
        return Ok(None);
    };
    if b.direction != rs_protocol::model::Direction::Download {
        return Ok(None);
    }
    let Some(source) = b.url.as_deref().map(|u| via.offered_url(u)) else {
        return Err("a download offer without a URL".into());
    };
    let sha = rs_protocol::codec::sha256_hex(&b.sha256);
    let (url, cached) = mlm
        .cache
        .want(sha.clone(), b.name.clone(), b.size, source, mlm.clock.now())
        .await
        .map_err(|e| e.to_string())?;
    b.url = Some(url);
    Ok(Some((sha, cached, b)))
}

/// The MLM's uplink hands the back-channel its replies bring here (those
/// of its own sender's long poll and of relayed envelopes alike).
#[derive(Debug)]
pub struct Downstream(pub std::sync::Weak<Mlm>);

impl rs_node::uplink::BackChannel for Downstream {
    fn receive(
        &self,
        msgs: Vec<RawMessage>,
        via: rs_node::uplink::Via,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<MessageId>> + Send + '_>> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(mlm) => take_down(&mlm, msgs, &via).await,
                // Stopping: not acknowledged, so offered again.
                None => Vec::new(),
            }
        })
    }

    /// Sent up: forgotten from the queue's database too (where a farm's
    /// other members would otherwise send them again).
    fn delivered_sent(&self, notices: Vec<(MessageId, rs_protocol::RsId)>) {
        let Some(mlm) = self.0.upgrade() else { return };
        let outbox = mlm.outbox.clone();
        tokio::spawn(async move {
            if let Err(e) = outbox.notices_sent(notices).await {
                tracing::warn!("delivery notices sent: {e}");
            }
        });
    }
}

/// Delivery notices recorded long enough ago that whoever recorded them
/// should have sent them (a farm member that died first, or this MLM's
/// previous process): taken into this member's next POSTs, unless it
/// holds them already.
pub(crate) async fn pick_up_notices(mlm: &Mlm, now: Timestamp) {
    let before =
        Timestamp::from_millis(now.as_millis() - NOTICES_STALE.as_millis() as i64).unwrap_or(now);
    match mlm.outbox.stale_notices(before, now, 1000).await {
        Ok(stale) if !stale.is_empty() => {
            let new = mlm.uplink.notices().deliver_unheld(stale);
            if new > 0 {
                tracing::info!("{new} delivery notice(s) left unsent: sending them");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("delivery notices left unsent: {e}"),
    }
}

/// A delivery notice still recorded this long after it was (or was last
/// picked up) was not sent by whoever holds it.
const NOTICES_STALE: Duration = Duration::from_secs(15);

/// Custody: accepted once in this MLM's durable spool; its sender forwards.
async fn custody(mlm: &Mlm, forward: &[(usize, RawMessage)], now: Timestamp) -> Vec<Outcome> {
    let msgs = forward.iter().map(|(_, m)| m.clone()).collect();
    match mlm.spool.enqueue(msgs, now).await {
        Ok(r) => r
            .into_iter()
            .map(|e| match e {
                Enqueued::Stored | Enqueued::Duplicate => Outcome::Accepted,
                Enqueued::Refused(reason) => Outcome::Retry {
                    after: Duration::from_secs(30),
                    reason,
                },
            })
            .collect(),
        Err(e) => {
            tracing::error!("custody spool: {e}");
            forward
                .iter()
                .map(|_| unavailable("the MLM could not store the message"))
                .collect()
        }
    }
}

/// Synchronous relay: one envelope upstream through the MLM's uplink,
/// its outcomes back down.
async fn post(
    mlm: &Mlm,
    batch: &[&RawMessage],
) -> Result<rs_protocol::codec::RawEnvelope, PostError> {
    let sent = mlm.clock.now();
    let (out, ()) = mlm.uplink.envelope(sent, None, |w| {
        for m in batch {
            let mut m = (*m).clone();
            if let Some(h) = m.header.routing.last_mut() {
                h.sent = Some(sent);
            }
            w.push_raw(&m);
        }
    });
    let rs_node::upstream::Reply {
        envelope: mut reply,
        route,
    } = mlm.uplink.send(out, None).await?;
    if let Some(wait) = reply.meta.advice.and_then(|a| a.resume_after) {
        let until = mlm.clock.now().as_millis() + i64::try_from(wait.as_millis()).unwrap_or(0);
        mlm.upstream_busy_until.fetch_max(until, Ordering::Relaxed);
    }
    // Back-channel messages for the subtree may ride on any reply.
    mlm.uplink
        .receive(std::mem::take(&mut reply.messages), route)
        .await;
    Ok(reply)
}

/// Relays `forward` upstream in one envelope (one by one if the upstream
/// refuses it as a whole); their outcomes, in order.
pub(crate) async fn relay(mlm: &Mlm, forward: &[(usize, RawMessage)]) -> Vec<Outcome> {
    let all: Vec<&RawMessage> = forward.iter().map(|(_, m)| m).collect();
    match post(mlm, &all).await {
        Ok(reply) => map_outcomes(&all, &reply.meta),
        // One message spoils the envelope: find it by sending one by one.
        Err(PostError::Refused { .. }) if all.len() > 1 => {
            let mut out = Vec::with_capacity(all.len());
            for m in &all {
                out.push(match post(mlm, &[*m]).await {
                    Ok(reply) => map_outcomes(&[*m], &reply.meta).remove(0),
                    Err(e) => e.outcome(),
                });
            }
            out
        }
        Err(e) => {
            tracing::warn!("upstream: {e}");
            let o = e.outcome();
            all.iter().map(|_| o.clone()).collect()
        }
    }
}

fn map_outcomes(sent: &[&RawMessage], meta: &EnvelopeMeta) -> Vec<Outcome> {
    // By ID once: a linear search per message was quadratic in the
    // envelope (5,000 messages: 12.5 million comparisons).
    // The first outcome of an ID, as the search found it.
    let mut by_id: std::collections::HashMap<&MessageId, &Outcome> =
        std::collections::HashMap::with_capacity(meta.outcomes.len());
    for (id, o) in &meta.outcomes {
        by_id.entry(id).or_insert(o);
    }
    sent.iter()
        .map(|m| {
            by_id
                .get(&m.header.id)
                .map(|o| (*o).clone())
                .unwrap_or_else(|| unavailable("no outcome from upstream"))
        })
        .collect()
}
