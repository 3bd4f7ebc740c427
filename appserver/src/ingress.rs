//! `POST /rs/v1/envelope`: validate, deduplicate, persist, answer (Fig. 17).
//! The reply leaves only after the batch has committed.

use std::sync::Arc;
use std::time::Duration;

use rs_node::ingress::{MAX_OFFER, envelope, envelope_response, offer_back_channel};
use rs_protocol::codec::{EnvelopeWriter, RawEnvelope, RawMessage, decode_status};
use rs_protocol::control::{CLASS_INFRASTRUCTURE, SUB_COLD_START, SUB_HEARTBEAT, SUB_SHUTDOWN};
use rs_protocol::model::{Advice, Content, EnvelopeMeta};
use rs_protocol::{MessageId, Outcome, Timestamp};
use warp::Filter;

use crate::AppServer;
use crate::store::{Incoming, Stored};

rs_net::counters! {
    /// Live counters (status and metrics).
    pub struct Stats {
        envelopes: "envelopes_received_total", "Envelopes received from below.";
        received: "messages_received_total", "Messages received from below.";
        accepted: "messages_accepted_total", "Messages answered accepted.";
        duplicates: "messages_duplicate_total", "Messages received again (answered accepted, stored once).";
        rejected: "messages_refused_total" {reason = "rejected"},
            "Messages this tier refused, by reason.";
        expired: "messages_refused_total" {reason = "expired"},
            "Messages this tier refused, by reason.";
        retried: "messages_retry_total", "Messages answered retry.";
        /// Of the retried: held back by the throttle.
        throttled: "messages_throttled_total", "Messages the throttle answered retry.";
        /// Peripheral tasks completed, and attempts that failed.
        tasks_done: "tasks_total" {result = "done"}, "Peripheral task attempts, by result.";
        tasks_failed: "tasks_total" {result = "failed"}, "Peripheral task attempts, by result.";
        /// Certificates issued at enrollment, enrollments refused, and
        /// certificates revoked through the control API.
        enrolled: "enrollments_total" {result = "issued"}, "Enrollments, by result.";
        enroll_refused: "enrollments_total" {result = "refused"}, "Enrollments, by result.";
        /// Certificates renewed (`POST /rs/v1/enroll` with a signed request).
        renewed: "enrollments_total" {result = "renewed"}, "Enrollments, by result.";
        revoked: "certificates_revoked_total", "Certificates revoked through the control API.";
    }
}

pub fn route(
    app: Arc<AppServer>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let limits = app.cfg.limits();
    let timeout = Duration::from_secs(app.cfg.body_timeout_secs);
    warp::path!("rs" / "v1" / "envelope")
        .and(warp::post())
        .and(rs_net::auth::caller_filter())
        .and(envelope(limits, timeout))
        .then(move |caller: rs_net::auth::Caller, env: RawEnvelope| {
            let app = app.clone();
            async move {
                match rs_net::auth::screen(&caller, &app.id, &env, &app.auth) {
                    Ok(refused) => handle(&app, env, refused).await,
                    Err(r) => r.response(),
                }
            }
        })
}

/// Checks one message; `Err` is its outcome when it cannot be stored.
fn examine(app: &AppServer, m: RawMessage, now: Timestamp) -> Result<Incoming, Outcome> {
    if m.header.source().is_none() {
        return Err(Outcome::rejected(
            "invalid",
            "a back-channel message (locator=destination) cannot be sent upward",
        ));
    }
    if m.header.is_expired(now) {
        return Err(Outcome::Expired);
    }
    // A seal is opened (and checked) before anything reads the content.
    let (m, seal) = match (m.seal(), &app.opener) {
        (None, _) => (m, None),
        (Some(_), Some(opener)) => {
            let (opened, seal, _signer) = opener.open(m)?;
            (opened, Some(seal))
        }
        (Some(_), None) => {
            return Err(Outcome::rejected(
                "seal-invalid",
                "this server has no certificate to open seals with (no [tls])",
            ));
        }
    };
    if let Some(refusal) = app.cfg.seal.require.refuses(seal) {
        if let Some(o) = &app.opener {
            o.stats.unsealed_refused.inc();
        }
        return Err(refusal);
    }
    let limits = app.cfg.limits();
    let full = m
        .clone()
        .decode(&limits)
        .map_err(|e| Outcome::rejected("invalid", e.to_string()))?;
    let mut inc = Incoming {
        seal,
        ..Incoming::new(m)
    };
    match &full.content {
        Content::Alarm(a) => inc.severity = Some(a.severity),
        Content::BulkRequest(b) => {
            if b.direction != rs_protocol::model::Direction::Upload {
                return Err(Outcome::rejected(
                    "invalid",
                    "only uploads are requested from below; downloads are offered from above",
                ));
            }
            inc.bulk = app.uploads.decide(&inc.msg, b, now);
        }
        Content::Event(e) => inc.severity = Some(e.severity),
        Content::Response(r) => {
            if let Some(src) = full.header.source() {
                inc.response = Some((
                    r.reference.clone(),
                    src.component.clone(),
                    r.outcome.clone(),
                    r.result.as_ref().map(|p| p.text.clone()),
                ));
            }
        }
        Content::Data(d)
            if full.header.class.class == CLASS_INFRASTRUCTURE
                && [SUB_HEARTBEAT, SUB_COLD_START, SUB_SHUTDOWN]
                    .contains(&full.header.class.subclass.as_str()) =>
        {
            let tree = decode_status(&d.bytes, &limits).map_err(|e| {
                Outcome::rejected(
                    "invalid",
                    format!("status tree of {}: {e}", full.header.class.subclass),
                )
            })?;
            inc.status = Some((d.bytes.to_vec(), tree.state.as_str().to_owned()));
        }
        _ => {}
    }
    Ok(inc)
}

/// `refused[i]`: message `i` is not the caller's to send (anti-spoofing).
async fn handle(
    app: &AppServer,
    env: RawEnvelope,
    refused: Vec<Option<Outcome>>,
) -> warp::reply::Response {
    let _busy = app.load.enter();
    let now = app.clock.now();
    let sender = env.meta.sender.clone();
    let acks = env.meta.acks.clone();
    let delivered = env.meta.delivered.clone();
    let env_poll = env.meta.poll;
    let pure_poll = env.messages.is_empty();
    let mut responses = false;
    app.stats.envelopes.inc();
    app.stats.received.inc_by(env.messages.len() as u64);
    let ids: Vec<MessageId> = env.messages.iter().map(|m| m.header.id.clone()).collect();
    app.stats
        .rejected
        .inc_by(refused.iter().filter(|o| o.is_some()).count() as u64);
    let mut outcomes: Vec<Option<Outcome>> = refused;
    let mut batch = Vec::new();
    let mut slots = Vec::new();
    let throttle = app.current_throttle();
    for (i, m) in env.messages.into_iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        // Opening a seal is a few hundred microseconds of public-key work:
        // done off the async workers' turn, so a burst of sealed messages
        // does not stall the other connections they serve.
        let examined = if m.seal().is_some()
            && tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| examine(app, m, now))
        } else {
            examine(app, m, now)
        };
        match examined {
            Ok(inc) => {
                if !throttle.is_empty()
                    && let Some(src) = inc.msg.header.source()
                {
                    let subject = rs_node::throttle::Subject {
                        component: &src.component,
                        class: &inc.msg.header.class.class,
                        kind: inc.msg.kind,
                        bytes: inc.msg.content.len() as u64 + 512,
                        precedence: src.qos.precedence,
                        severity: inc.severity,
                    };
                    if let rs_node::throttle::Decision::Wait { after, why } =
                        throttle.check(&subject)
                    {
                        // The sender keeps it and comes back then.
                        app.stats.retried.inc();
                        app.stats.throttled.inc();
                        outcomes[i] = Some(Outcome::retry(after, "throttled", why));
                        continue;
                    }
                }
                responses |= inc.response.is_some();
                batch.push(inc);
                slots.push(i);
            }
            Err(o) => {
                match &o {
                    Outcome::Expired => app.stats.expired.inc(),
                    _ => app.stats.rejected.inc(),
                };
                tracing::debug!(message_id = %ids[i], "refused: {o}");
                outcomes[i] = Some(o);
            }
        }
    }
    if !batch.is_empty() {
        let decided: Vec<Option<crate::bulk::Decided>> =
            batch.iter().map(|i| i.bulk.clone()).collect();
        // Hop times: how long each tier held each message (duplicates too:
        // they were held as long); the transit of those stored new below.
        let created: Vec<rs_protocol::Timestamp> = batch
            .iter()
            .map(|i| {
                app.gauges.observe_hops(&i.msg.header);
                i.msg.header.created
            })
            .collect();
        match app.store.ingest(batch, now).await {
            Ok(results) => {
                let mut answered = false;
                for (d, r) in decided.iter().zip(&results) {
                    if let (Some(d), Stored::New) = (d, r) {
                        app.uploads.count(d);
                        answered = true;
                    }
                }
                if answered {
                    // Bulk answers wait on the back-channel.
                    app.outbox_ready.notify_waiters();
                }
                if results.contains(&crate::store::Stored::New) {
                    // Peripheral work waits for the processors.
                    app.stored_new();
                }
                for ((slot, r), created) in slots.iter().zip(results).zip(created) {
                    if r == Stored::Duplicate {
                        app.stats.duplicates.inc();
                    } else {
                        app.gauges.observe_transit(created, now);
                    }
                    app.stats.accepted.inc();
                    outcomes[*slot] = Some(Outcome::Accepted);
                }
            }
            Err(e) => {
                // Nothing of the batch was stored: the senders keep custody.
                tracing::error!("store: {e}");
                for slot in &slots {
                    app.stats.retried.inc();
                    outcomes[*slot] = Some(Outcome::retry(
                        Duration::from_secs(5),
                        "unavailable",
                        "the application server could not store the message; try again",
                    ));
                }
            }
        }
    }
    // The caller has these back-channel messages now.
    let mut jobs_changed = false;
    match app.store.acknowledge(sender.to_string(), acks, now).await {
        Ok(changed) => jobs_changed |= changed,
        Err(e) => tracing::error!("acknowledgements from {sender}: {e}"),
    }
    // Deliveries further down, reported by a forwarder.
    match app.store.delivered(sender.clone(), delivered, now).await {
        Ok(changed) => jobs_changed |= changed,
        Err(e) => tracing::error!("delivery notices from {sender}: {e}"),
    }
    // Responses to control actions completed their jobs as they were
    // stored (store::ingest_in).
    jobs_changed |= responses;
    if jobs_changed {
        app.jobs_changed.send_modify(|v| *v += 1);
    }
    let mut meta = EnvelopeMeta::new(app.id.clone(), app.clock.now());
    meta.outcomes = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, o)| {
            (
                id,
                o.unwrap_or(Outcome::retry(Duration::from_secs(1), "unavailable", "")),
            )
        })
        .collect();
    meta.advice = Some(Advice {
        heartbeat: Some(Duration::from_secs(app.cfg.heartbeat_secs)),
        poll_hold: Some(rs_node::ingress::MAX_HOLD),
        resume_after: if pure_poll { None } else { app.load.advice() },
        ..Advice::default()
    });
    let mut w = EnvelopeWriter::new(&meta);
    // Piggyback what waits for the caller's subtree; hold the reply a
    // while if the caller only long-polls and nothing waits yet.
    let hold = env_poll.filter(|_| pure_poll);
    let hop = sender.to_string();
    offer_back_channel(&mut w, &app.outbox_ready, hold, &app.stopping, || {
        let store = app.store.clone();
        let hop = hop.clone();
        let now = app.clock.now();
        let again = app.cfg.offer_again();
        async move {
            store
                .offer(hop, now, again, MAX_OFFER)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    envelope_response(w.finish())
}
