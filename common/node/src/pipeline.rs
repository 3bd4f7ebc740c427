//! The envelope pipeline every receiving tier runs (seed 004, Figs. 15-17),
//! written once for the MLM and the application server. An envelope goes
//! through these stages, in this order:
//!
//! 1. **screen**: the caller may send as the envelope's sender, and each
//!    message's source is within what it may speak for (anti-spoofing);
//! 2. **back-channel bookkeeping**: the caller's acknowledgements and
//!    delivery notices, and the routes its messages teach
//!    ([`Tier::took`]);
//! 3. **examine**, per message: one sent upward (it has a source), not
//!    expired, then the tier's own checks ([`Tier::examine`]: an MLM's
//!    service modules, a server's seals and content);
//! 4. **throttle**, per message kept ([`Tier::subject`]);
//! 5. **dispose** of what passed, in one batch ([`Tier::dispose`]: store
//!    it, relay it, take it into custody, aggregate it);
//! 6. **reply**: an outcome per message, in order, the tier's advice, and
//!    the back-channel messages waiting for the caller's subtree (held a
//!    while for a long poll).
//!
//! Every message gets exactly one outcome, and the counters every tier
//! shows ([`Counts`]) are counted here from those outcomes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use warp::Filter;

use rs_net::auth::Caller;
use rs_protocol::codec::{EnvelopeWriter, Limits, RawEnvelope, RawMessage};
use rs_protocol::ids::{MessageId, RsId};
use rs_protocol::model::{Advice, EnvelopeMeta};
use rs_protocol::outcome::Outcome;
use rs_protocol::time::Timestamp;

use crate::ingress::{BackChannelReady, Load, MAX_OFFER, envelope, envelope_response};
use crate::throttle::{Decision, Subject, Throttle};

rs_net::counters! {
    /// What every receiving tier counts of the envelopes it is sent.
    pub struct Counts {
        envelopes: "envelopes_received_total", "Envelopes received from below.";
        received: "messages_received_total", "Messages received from below.";
        /// Answered accepted (stored, forwarded, taken into custody,
        /// filtered, aggregated; duplicates too).
        accepted: "messages_accepted_total", "Messages answered accepted.";
        retried: "messages_retry_total", "Messages answered retry.";
        rejected: "messages_refused_total" {reason = "rejected"},
            "Messages this tier refused, by reason.";
        expired: "messages_refused_total" {reason = "expired"},
            "Messages this tier refused, by reason.";
        /// Of the retried: held back by the throttle.
        throttled: "messages_throttled_total", "Messages the throttle answered retry.";
    }
}

impl Counts {
    /// The counts as the status tree shows them.
    pub fn status(&self) -> [(&'static str, u64); 7] {
        [
            ("envelopes.received", self.envelopes.get()),
            ("messages.received", self.received.get()),
            ("messages.accepted", self.accepted.get()),
            ("messages.retried", self.retried.get()),
            ("messages.rejected", self.rejected.get()),
            ("messages.expired", self.expired.get()),
            ("messages.throttled", self.throttled.get()),
        ]
    }

    fn answered(&self, o: &Outcome) {
        match o {
            Outcome::Accepted => self.accepted.inc(),
            Outcome::Retry { .. } => self.retried.inc(),
            Outcome::Rejected(_) => self.rejected.inc(),
            Outcome::Expired => self.expired.inc(),
        }
    }
}

/// The answer for a message that was kept and got none (cannot happen:
/// every stage answers what it takes).
fn unanswered() -> Outcome {
    Outcome::retry(Duration::from_secs(5), "unavailable", "no outcome")
}

/// A tier that receives envelopes: what differs between the MLM and the
/// application server at each stage.
pub trait Tier: Send + Sync + 'static {
    /// A message examined and kept for disposal.
    type Kept: Send;

    /// This tier's component ID (the envelopes' recipient).
    fn id(&self) -> &RsId;
    fn now(&self) -> Timestamp;
    fn counts(&self) -> &Counts;
    /// Envelopes in hand (backpressure advice).
    fn load(&self) -> &Load;
    /// Refusals of callers and of messages they may not send.
    fn auth(&self) -> &rs_net::auth::Stats;
    /// Limits on what an envelope may hold, and the time its body may take.
    fn limits(&self) -> (Limits, Duration);

    /// Stage 2: `meta` came from `caller`; `sources`, the components its
    /// messages that passed screening come from.
    fn took(
        &self,
        caller: &Caller,
        meta: &EnvelopeMeta,
        sources: Vec<RsId>,
        now: Timestamp,
    ) -> impl Future<Output = ()> + Send;

    /// Stage 3, after the common checks: the message kept, or its outcome
    /// now (a refusal; a module's discard is answered accepted).
    fn examine(&self, m: RawMessage, now: Timestamp) -> Result<Self::Kept, Outcome>;

    /// Stage 4: the throttle now (one for the whole envelope), and what
    /// it looks at in a kept message (`None`: it does not apply, as to a
    /// message held for aggregation).
    fn throttle(&self) -> Arc<Throttle>;
    fn subject<'a>(&self, kept: &'a Self::Kept, throttle: &Throttle) -> Option<Subject<'a>>;

    /// Stage 5: the outcome of each, in order.
    fn dispose(
        &self,
        kept: Vec<Self::Kept>,
        now: Timestamp,
    ) -> impl Future<Output = Vec<Outcome>> + Send;

    /// The advice on the reply; `pure_poll`: the envelope held no message.
    fn advice(&self, pure_poll: bool) -> Advice;

    /// What wakes held long polls, and what ends them.
    fn ready(&self) -> &BackChannelReady;
    fn stopping(&self) -> &tokio_util::sync::CancellationToken;

    /// Up to `limit` back-channel messages for `hop` to hand out now.
    fn offer(
        &self,
        hop: RsId,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RawMessage>, String>> + Send;
}

/// `POST /rs/v1/envelope` for `tier`.
pub fn route<T: Tier>(
    tier: Arc<T>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let (limits, timeout) = tier.limits();
    warp::path!("rs" / "v1" / "envelope")
        .and(warp::post())
        .and(rs_net::auth::caller_filter())
        .and(envelope(limits, timeout))
        .then(move |caller: Caller, env: RawEnvelope| {
            let tier = tier.clone();
            async move {
                match rs_net::auth::screen(&caller, tier.id(), &env, tier.auth()) {
                    Ok(refused) => handle(&*tier, &caller, env, refused).await,
                    Err(r) => r.response(),
                }
            }
        })
}

/// Stages 2 to 6 for an envelope that passed screening; `refused[i]`:
/// message `i` is not the caller's to send.
pub async fn handle<T: Tier>(
    tier: &T,
    caller: &Caller,
    env: RawEnvelope,
    refused: Vec<Option<Outcome>>,
) -> warp::reply::Response {
    let _busy = tier.load().enter();
    let now = tier.now();
    let counts = tier.counts();
    counts.envelopes.inc();
    counts.received.inc_by(env.messages.len() as u64);
    let RawEnvelope { meta, messages } = env;
    let ids: Vec<MessageId> = messages.iter().map(|m| m.header.id.clone()).collect();
    let pure_poll = messages.is_empty();
    let mut outcomes = refused;

    // Who is behind the caller: the sources of what it may send.
    let mut sources: Vec<RsId> = messages
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| o.is_none())
        .filter_map(|(m, _)| m.header.source().map(|s| s.component.clone()))
        .collect();
    sources.sort_unstable();
    sources.dedup();
    tier.took(caller, &meta, sources, now).await;

    let throttle = tier.throttle();
    let mut kept = Vec::new();
    let mut slots = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        let examined = if m.header.source().is_none() {
            Err(Outcome::rejected(
                "invalid",
                "a back-channel message (locator=destination) cannot be sent upward",
            ))
        } else if m.header.is_expired(now) {
            Err(Outcome::Expired)
        } else {
            tier.examine(m, now)
        };
        let k = match examined {
            Ok(k) => k,
            Err(o) => {
                if o != Outcome::Accepted {
                    tracing::debug!(message_id = %ids[i], "refused: {o}");
                }
                outcomes[i] = Some(o);
                continue;
            }
        };
        if !throttle.is_empty()
            && let Some(subject) = tier.subject(&k, &throttle)
            && let Decision::Wait { after, why } = throttle.check(&subject)
        {
            // The sender keeps custody and comes back then.
            counts.throttled.inc();
            outcomes[i] = Some(Outcome::retry(after, "throttled", why));
            continue;
        }
        kept.push(k);
        slots.push(i);
    }
    if !kept.is_empty() {
        let results = tier.dispose(kept, now).await;
        for (slot, o) in slots.into_iter().zip(results) {
            outcomes[slot] = Some(o);
        }
    }

    let mut reply = EnvelopeMeta::new(tier.id().clone(), tier.now());
    reply.outcomes = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, o)| {
            let o = o.unwrap_or_else(unanswered);
            counts.answered(&o);
            (id, o)
        })
        .collect();
    reply.advice = Some(tier.advice(pure_poll));
    let mut w = EnvelopeWriter::new(&reply);
    // What waits for the caller's subtree rides on the reply; a long poll
    // with nothing in it is held until something does (or the hold runs
    // out).
    let hold = meta.poll.filter(|_| pure_poll);
    let hop = meta.sender;
    crate::ingress::offer_back_channel(&mut w, tier.ready(), hold, tier.stopping(), || {
        tier.offer(hop.clone(), MAX_OFFER)
    })
    .await;
    envelope_response(w.finish())
}
