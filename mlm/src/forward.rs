//! The intermediate receiver (seed 004, Figs. 15-16): for each forward
//! message, the service modules, then the throttle, then forwarding — at
//! once to the upstream (the reply says what the upstream said), or into
//! the MLM's own spool in custody mode. Every tier appends its routing hop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rs_net::auth::Caller;
use rs_node::ingress::{MAX_OFFER, envelope, envelope_response, offer_back_channel};
use rs_node::upstream::PostError;
use rs_protocol::codec::{EnvelopeWriter, RawEnvelope, RawMessage};
use rs_protocol::model::{Advice, Content, EnvelopeMeta, Hop};
use rs_protocol::{MessageId, Outcome, Timestamp};
use rs_store::spool::{Enqueued, Spool as _};
use warp::Filter;

use crate::Mlm;
use crate::aggregate::Member;
use crate::modules::{Verdict, View};

rs_net::counters! {
    /// Live counters (status and metrics).
    pub struct Stats {
        envelopes: "envelopes_received_total", "Envelopes received from below.";
        received: "messages_received_total", "Messages received from below.";
        /// Of the received, those the next hop accepted from this MLM.
        forwarded: "messages_forwarded_total", "Messages the next hop accepted from this tier.";
        /// Answered accepted (forwarded, taken into custody, filtered,
        /// aggregated).
        accepted: "messages_accepted_total", "Messages answered accepted.";
        filtered: "messages_filtered_total", "Messages a module dropped (answered accepted).";
        aggregated: "messages_aggregated_total",
            "Messages held for an aggregation window (answered accepted).";
        /// The next hop answered retry.
        retried: "messages_retry_total", "Messages answered retry.";
        rejected: "messages_refused_total" {reason = "rejected"},
            "Messages this tier refused, by reason.";
        expired: "messages_refused_total" {reason = "expired"},
            "Messages this tier refused, by reason.";
        throttled: "messages_throttled_total", "Messages the throttle answered retry.";
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

pub fn route(
    mlm: Arc<Mlm>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let limits = mlm.cfg.limits();
    let timeout = Duration::from_secs(mlm.cfg.body_timeout_secs);
    warp::path!("rs" / "v1" / "envelope")
        .and(warp::post())
        .and(rs_net::auth::caller_filter())
        .and(envelope(limits, timeout))
        .then(move |caller: Caller, env: RawEnvelope| {
            let mlm = mlm.clone();
            async move {
                match rs_net::auth::screen(&caller, &mlm.id, &env, &mlm.auth) {
                    Ok(refused) => handle(&mlm, &caller, env, refused).await,
                    Err(r) => r.response(),
                }
            }
        })
}

fn bump(c: &rs_net::metrics::IntCounter) {
    c.inc();
}

pub(crate) fn unavailable(text: impl Into<String>) -> Outcome {
    Outcome::retry(Duration::from_secs(5), "unavailable", text)
}

/// `refused[i]`: message `i` is not the caller's to send (anti-spoofing).
async fn handle(
    mlm: &Mlm,
    caller: &Caller,
    env: RawEnvelope,
    refused: Vec<Option<Outcome>>,
) -> warp::reply::Response {
    let _busy = mlm.load.enter();
    let now = mlm.clock.now();
    let st = &mlm.stats;
    bump(&st.envelopes);
    st.received.inc_by(env.messages.len() as u64);
    let ids: Vec<MessageId> = env.messages.iter().map(|m| m.header.id.clone()).collect();
    let mut outcomes: Vec<Option<Outcome>> = refused;
    // Refused messages go no further (nor teach routes).
    st.rejected
        .inc_by(outcomes.iter().filter(|o| o.is_some()).count() as u64);
    let sender = env.meta.sender.clone();
    let poll = env.meta.poll;
    let ids_empty = ids.is_empty();
    // Who is behind the caller: the sources of what it sends.
    let mut sources: Vec<rs_protocol::RsId> = env
        .messages
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| o.is_none())
        .filter_map(|(m, _)| m.header.source().map(|s| s.component.clone()))
        .collect();
    sources.sort_unstable();
    sources.dedup();
    if let Err(e) = mlm.outbox.learn(sender.clone(), sources, now).await {
        tracing::error!("routes: {e}");
    }
    let delivered = match mlm
        .outbox
        .acknowledge(sender.clone(), env.meta.acks.clone())
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("acknowledgements from {sender}: {e}");
            Vec::new()
        }
    };
    // Deliveries here and further down go up with the next POST (kept in
    // the queue's database too until a POST carried them: a farm's other
    // members send those of a member that died first).
    let mut notices = delivered;
    // Deliveries reported from below count only for the caller's own
    // subtree (a site cannot complete another's job).
    notices.extend(
        env.meta
            .delivered
            .iter()
            .filter(|(_, dest)| match caller {
                Caller::Open => true,
                Caller::Component(p) => rs_net::auth::may_speak_for(p, &mlm.id, dest),
            })
            .cloned(),
    );
    if !notices.is_empty() {
        if let Err(e) = mlm.outbox.note_delivered(notices.clone(), now).await {
            tracing::warn!("delivery notices: {e}");
        }
        if let Ok(mut up) = mlm.delivered_up.lock() {
            up.extend(notices);
        }
    }
    let mut forward: Vec<(usize, RawMessage)> = Vec::new();
    let mut aggregate: Vec<(usize, usize, String, Member)> = Vec::new();

    for (i, m) in env.messages.into_iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        if m.header.source().is_none() {
            bump(&st.rejected);
            outcomes[i] = Some(Outcome::rejected(
                "invalid",
                "a back-channel message (locator=destination) cannot be sent upward",
            ));
            continue;
        }
        if m.header.is_expired(now) {
            bump(&st.expired);
            outcomes[i] = Some(Outcome::Expired);
            continue;
        }
        let mut view = View::new(m);
        let mut verdict = Verdict::Pass;
        for module in &mlm.modules {
            verdict = module.inspect(&mut view, now);
            if verdict != Verdict::Pass {
                break;
            }
        }
        match verdict {
            Verdict::Discard(why) => {
                tracing::debug!(message_id = %ids[i], "discarded ({why})");
                bump(&st.filtered);
                outcomes[i] = Some(Outcome::Accepted);
            }
            Verdict::Aggregate {
                rule,
                group,
                severity,
                text,
            } => {
                let src = view
                    .raw
                    .header
                    .source()
                    .map(|s| (s.component.to_string(), s.qos));
                let Some((source, qos)) = src else { continue };
                let h = &view.raw.header;
                aggregate.push((
                    i,
                    rule,
                    group,
                    Member {
                        id: h.id.to_string(),
                        received: now.as_millis(),
                        severity,
                        precedence: qos.precedence,
                        persistent: qos.persistent,
                        expiry: qos.expiry.map(Timestamp::as_millis),
                        source,
                        class: h.class.class.to_string(),
                        subclass: h.class.subclass.to_string(),
                        text,
                    },
                ));
            }
            Verdict::Pass => {
                let mut raw = view.into_raw();
                if let Some(o) = crate::bulk::check_request(mlm, &raw) {
                    bump(&st.rejected);
                    outcomes[i] = Some(o);
                    continue;
                }
                if let rs_node::throttle::Decision::Wait { after, why } =
                    mlm.throttle.check_raw(&raw)
                {
                    // The sender keeps custody and comes back then.
                    bump(&st.throttled);
                    outcomes[i] = Some(Outcome::retry(after, "throttled", why));
                    continue;
                }
                raw.header.routing.push(Hop {
                    component: mlm.id.clone(),
                    received: now,
                    sent: None,
                });
                forward.push((i, raw));
            }
        }
    }

    if !aggregate.is_empty() {
        let slots: Vec<usize> = aggregate.iter().map(|a| a.0).collect();
        let items = aggregate
            .into_iter()
            .map(|(_, r, g, m)| (r, g, m))
            .collect();
        let o = match mlm.aggregation.add(items).await {
            Ok(()) => {
                st.aggregated.inc_by(slots.len() as u64);
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
        let results = if mlm.cfg.custody {
            custody(mlm, &forward, now).await
        } else {
            mlm.coalescer
                .relay(forward.iter().map(|(_, m)| m.clone()).collect())
                .await
        };
        for ((slot, _), o) in forward.iter().zip(results) {
            match &o {
                Outcome::Accepted => bump(&st.forwarded),
                Outcome::Retry { .. } => bump(&st.retried),
                Outcome::Rejected(_) => bump(&st.rejected),
                Outcome::Expired => bump(&st.expired),
            }
            outcomes[*slot] = Some(o);
        }
    }

    let mut meta = EnvelopeMeta::new(mlm.id.clone(), mlm.clock.now());
    meta.outcomes = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, o)| {
            let o = o.unwrap_or_else(|| unavailable(""));
            if o == Outcome::Accepted {
                bump(&st.accepted);
            }
            (id, o)
        })
        .collect();
    // Pass on the interval the upstream asks for, so settings cannot drift.
    meta.advice = Some(Advice {
        heartbeat: Some(mlm.sender_stats.heartbeat(mlm.cfg.heartbeat())),
        poll_hold: Some(rs_node::ingress::MAX_HOLD),
        resume_after: if ids_empty {
            None
        } else {
            let upstream =
                mlm.upstream_busy_until.load(Ordering::Relaxed) - mlm.clock.now().as_millis();
            let passed_on = (upstream > 0).then(|| Duration::from_millis(upstream as u64));
            mlm.load.advice().max(passed_on)
        },
        ..Advice::default()
    });
    let mut w = EnvelopeWriter::new(&meta);
    // What waits for the caller's subtree rides on the reply; a long poll
    // with nothing in it is held until something does (or the hold runs out).
    let hold = poll.filter(|_| ids_empty);
    offer_back_channel(&mut w, &mlm.outbox_ready, hold, &mlm.stopping, || {
        let outbox = mlm.outbox.clone();
        let (hop, now) = (sender.clone(), mlm.clock.now());
        let again = mlm.cfg.offer_again();
        async move {
            outbox
                .offer(hop, now, again, MAX_OFFER)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    envelope_response(w.finish())
}

/// Copies of a back-channel message, by the next hop each goes to.
type Copies = Vec<(rs_protocol::RsId, RawMessage)>;

/// Takes back-channel messages from upstream into this MLM's queue: one
/// copy per next hop, listing the destinations behind it (the MLM nearest
/// the destinations thus makes one copy per destination). Returns the IDs
/// now safe, to acknowledge upstream.
pub async fn take_down(mlm: &Mlm, msgs: Vec<RawMessage>) -> Vec<MessageId> {
    mlm.stats.back_taken.inc_by(msgs.len() as u64);
    let mut copies = Vec::new();
    // Download offers: the file is fetched once into the cache, and the
    // copies handed down name this MLM's URL for it (held until it is here).
    let mut offers: Vec<(String, bool, Copies)> = Vec::new();
    let mut for_me = Vec::new();
    let mut failed = Vec::new();
    for m in msgs {
        let mut by_hop: std::collections::BTreeMap<rs_protocol::RsId, Vec<rs_protocol::RsId>> =
            Default::default();
        for d in m.header.destinations() {
            if *d == mlm.id {
                match crate::actions::apply_own(mlm, &m).await {
                    Ok(()) => for_me.push(m.header.id.clone()),
                    // Not acknowledged: offered again.
                    Err(e) => {
                        tracing::error!(message_id = %m.header.id, "control for this MLM: {e}")
                    }
                }
                continue;
            }
            let hop = match mlm.outbox.route(d.clone()).await {
                Ok(Some(h)) => h,
                // Not seen yet: it will call in itself.
                _ => d.clone(),
            };
            by_hop.entry(hop).or_default().push(d.clone());
        }
        let offer = match download_offer(mlm, &m).await {
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
            c.header.route = rs_protocol::Route::Destination(rs_protocol::model::Destination::new(
                dests,
                m.header.expiry(),
            ));
            let now = mlm.clock.now();
            c.header.routing.push(Hop {
                component: mlm.id.clone(),
                received: now,
                sent: Some(now),
            });
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
    let Some(source) = b.url.clone() else {
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

/// Acknowledgements of messages taken down from relayed replies, and
/// deliveries in the subtree, for the next POST upstream (relayed or the
/// MLM's own).
fn take_notices(mlm: &Mlm) -> (Vec<MessageId>, Vec<(MessageId, rs_protocol::RsId)>) {
    let acks = mlm
        .upstream_acks
        .lock()
        .map(|mut a| std::mem::take(&mut *a))
        .unwrap_or_default();
    let delivered = mlm
        .delivered_up
        .lock()
        .map(|mut d| std::mem::take(&mut *d))
        .unwrap_or_default();
    (acks, delivered)
}

/// The MLM's own sender hands the back-channel it long-polls for here.
#[derive(Debug)]
pub struct Downstream(pub std::sync::Arc<Mlm>);

impl rs_node::upstream::BackChannel for Downstream {
    fn receive(
        &self,
        msgs: Vec<RawMessage>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<MessageId>> + Send + '_>> {
        Box::pin(take_down(&self.0, msgs))
    }

    fn take_notices(&self) -> (Vec<MessageId>, Vec<(MessageId, rs_protocol::RsId)>) {
        take_notices(&self.0)
    }

    fn notices_done(&self, notices: Vec<(MessageId, rs_protocol::RsId)>, sent: bool) {
        notices_done(&self.0, notices, sent);
    }
}

/// A POST that carried delivery notices ended: forget them once sent,
/// keep them for the next POST otherwise.
fn notices_done(mlm: &Mlm, notices: Vec<(MessageId, rs_protocol::RsId)>, sent: bool) {
    if notices.is_empty() {
        return;
    }
    if sent {
        let outbox = mlm.outbox.clone();
        tokio::spawn(async move {
            if let Err(e) = outbox.notices_sent(notices).await {
                tracing::warn!("delivery notices sent: {e}");
            }
        });
    } else if let Ok(mut d) = mlm.delivered_up.lock() {
        d.extend(notices);
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
            if let Ok(mut d) = mlm.delivered_up.lock() {
                let held: std::collections::HashSet<_> = d.iter().cloned().collect();
                let new: Vec<_> = stale.into_iter().filter(|n| !held.contains(n)).collect();
                if !new.is_empty() {
                    tracing::info!("{} delivery notice(s) left unsent: sending them", new.len());
                }
                d.extend(new);
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

/// Synchronous relay: one envelope upstream, its outcomes back down.
async fn post(
    mlm: &Mlm,
    batch: &[&RawMessage],
) -> Result<rs_protocol::codec::RawEnvelope, PostError> {
    let sent = mlm.clock.now();
    let mut meta = EnvelopeMeta::new(mlm.id.clone(), sent);
    let (acks, delivered) = take_notices(mlm);
    meta.acks = acks;
    meta.delivered = delivered;
    let mut w = EnvelopeWriter::new(&meta);
    for m in batch {
        let mut m = (*m).clone();
        if let Some(h) = m.header.routing.last_mut() {
            h.sent = Some(sent);
        }
        w.push_raw(&m);
    }
    let reply = match mlm.upstream.post(&w.finish(), None).await {
        Ok(r) => {
            notices_done(mlm, meta.delivered, true);
            r
        }
        Err(e) => {
            // Not sent: keep them for the next POST.
            if let Ok(mut a) = mlm.upstream_acks.lock() {
                a.extend(meta.acks);
            }
            notices_done(mlm, meta.delivered, false);
            return Err(e);
        }
    };
    if let Some(wait) = reply.meta.advice.and_then(|a| a.resume_after) {
        let until = mlm.clock.now().as_millis() + i64::try_from(wait.as_millis()).unwrap_or(0);
        mlm.upstream_busy_until.fetch_max(until, Ordering::Relaxed);
    }
    // Back-channel messages for the subtree may ride on any reply.
    if !reply.messages.is_empty() {
        let ids = take_down(mlm, reply.messages.clone()).await;
        if let Ok(mut acks) = mlm.upstream_acks.lock() {
            acks.extend(ids);
        }
    }
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
                    Err(e) => outcome_of_error(&e),
                });
            }
            out
        }
        Err(e) => {
            tracing::warn!("upstream: {e}");
            let o = outcome_of_error(&e);
            all.iter().map(|_| o.clone()).collect()
        }
    }
}

fn outcome_of_error(e: &PostError) -> Outcome {
    match e {
        PostError::Refused { text, .. } => {
            Outcome::rejected("invalid", format!("refused upstream: {text}"))
        }
        PostError::TooLarge { text, .. } => {
            Outcome::rejected("too-large", format!("refused upstream: {text}"))
        }
        PostError::Busy { retry_after, .. } => Outcome::retry(
            retry_after.unwrap_or(Duration::from_secs(5)),
            "overloaded",
            "the upstream is busy",
        ),
        other => unavailable(format!("upstream unavailable: {other}")),
    }
}

fn map_outcomes(sent: &[&RawMessage], meta: &EnvelopeMeta) -> Vec<Outcome> {
    sent.iter()
        .map(|m| {
            meta.outcomes
                .iter()
                .find(|(id, _)| *id == m.header.id)
                .map(|(_, o)| o.clone())
                .unwrap_or_else(|| unavailable("no outcome from upstream"))
        })
        .collect()
}
