//! `POST /rs/v1/envelope` at the server (Fig. 17), its stages of the
//! common envelope pipeline ([`rs_node::pipeline`]): validate,
//! deduplicate, persist, answer. The reply leaves only after the batch has
//! committed.

use std::sync::Arc;
use std::time::Duration;

use rs_protocol::codec::{RawMessage, decode_status};
use rs_protocol::control::{CLASS_INFRASTRUCTURE, SUB_COLD_START, SUB_HEARTBEAT, SUB_SHUTDOWN};
use rs_protocol::model::{Advice, Content, EnvelopeMeta};
use rs_protocol::{Outcome, Timestamp};

use crate::AppServer;
use crate::store::{Incoming, Stored};

rs_net::counters! {
    /// Live counters (status and metrics) beside the pipeline's
    /// ([`rs_node::pipeline::Counts`]).
    pub struct Stats {
        duplicates: "messages_duplicate_total", "Messages received again (answered accepted, stored once).";
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

/// Checks one message; `Err` is its outcome when it cannot be stored.
/// (The pipeline checked its source and expiry before.)
fn examine(app: &AppServer, m: RawMessage, now: Timestamp) -> Result<Incoming, Outcome> {
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

/// The receiver that stores (seed 004, Fig. 17) as stages of the common
/// envelope pipeline: seals opened and contents checked, the throttle,
/// then the batch stored in one transaction before the reply leaves.
impl rs_node::pipeline::Tier for AppServer {
    type Kept = Incoming;

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

    /// The caller has these back-channel messages now; deliveries further
    /// down, reported by a forwarder.
    async fn took(
        &self,
        _caller: &rs_net::auth::Caller,
        meta: &EnvelopeMeta,
        _sources: Vec<rs_protocol::RsId>,
        now: Timestamp,
    ) {
        let sender = &meta.sender;
        let mut jobs_changed = false;
        match self
            .store
            .acknowledge(sender.to_string(), meta.acks.clone(), now)
            .await
        {
            Ok(changed) => jobs_changed |= changed,
            Err(e) => tracing::error!("acknowledgements from {sender}: {e}"),
        }
        match self
            .store
            .delivered(sender.clone(), meta.delivered.clone(), now)
            .await
        {
            Ok(changed) => jobs_changed |= changed,
            Err(e) => tracing::error!("delivery notices from {sender}: {e}"),
        }
        if jobs_changed {
            self.jobs_changed.send_modify(|v| *v += 1);
        }
    }

    fn examine(&self, m: RawMessage, now: Timestamp) -> Result<Incoming, Outcome> {
        // Opening a seal is a few hundred microseconds of public-key work:
        // done off the async workers' turn, so a burst of sealed messages
        // does not stall the other connections they serve.
        if m.seal().is_some()
            && tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| examine(self, m, now))
        } else {
            examine(self, m, now)
        }
    }

    fn throttle(&self) -> Arc<rs_node::throttle::Throttle> {
        self.current_throttle()
    }

    fn subject<'a>(
        &self,
        inc: &'a Incoming,
        _throttle: &rs_node::throttle::Throttle,
    ) -> Option<rs_node::throttle::Subject<'a>> {
        let src = inc.msg.header.source()?;
        Some(rs_node::throttle::Subject {
            component: &src.component,
            class: &inc.msg.header.class.class,
            kind: inc.msg.kind,
            bytes: inc.msg.content.len() as u64 + 512,
            precedence: src.qos.precedence,
            severity: inc.severity,
        })
    }

    /// Stores the batch in one transaction: every message accepted once
    /// it is committed (a duplicate too, stored once), every one retried
    /// if the commit fails (the senders keep custody).
    async fn dispose(&self, batch: Vec<Incoming>, now: Timestamp) -> Vec<Outcome> {
        let responses = batch.iter().any(|i| i.response.is_some());
        let decided: Vec<Option<crate::bulk::Decided>> =
            batch.iter().map(|i| i.bulk.clone()).collect();
        // Hop times: how long each tier held each message (duplicates too:
        // they were held as long); the transit of those stored new below.
        let created: Vec<Timestamp> = batch
            .iter()
            .map(|i| {
                self.gauges.observe_hops(&i.msg.header);
                i.msg.header.created
            })
            .collect();
        let n = batch.len();
        match self.store.ingest(batch, now).await {
            Ok(results) => {
                let mut answered = false;
                for (d, r) in decided.iter().zip(&results) {
                    if let (Some(d), Stored::New) = (d, r) {
                        self.uploads.count(d);
                        answered = true;
                    }
                }
                if answered {
                    // Bulk answers wait on the back-channel.
                    self.outbox_ready.notify_waiters();
                }
                if results.contains(&Stored::New) {
                    // Peripheral work waits for the processors.
                    self.stored_new();
                }
                // Responses to control actions completed their jobs as
                // they were stored (store::ingest_in).
                if responses {
                    self.jobs_changed.send_modify(|v| *v += 1);
                }
                results
                    .into_iter()
                    .zip(created)
                    .map(|(r, created)| {
                        if r == Stored::Duplicate {
                            self.stats.duplicates.inc();
                        } else {
                            self.gauges.observe_transit(created, now);
                        }
                        Outcome::Accepted
                    })
                    .collect()
            }
            Err(e) => {
                // Nothing of the batch was stored: the senders keep custody.
                tracing::error!("store: {e}");
                vec![
                    Outcome::retry(
                        Duration::from_secs(5),
                        "unavailable",
                        "the application server could not store the message; try again",
                    );
                    n
                ]
            }
        }
    }

    fn advice(&self, pure_poll: bool) -> Advice {
        Advice {
            heartbeat: Some(Duration::from_secs(self.cfg.heartbeat_secs)),
            poll_hold: Some(rs_node::ingress::MAX_HOLD),
            resume_after: if pure_poll { None } else { self.load.advice() },
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
        self.store
            .offer(
                hop.to_string(),
                self.clock.now(),
                self.cfg.offer_again(),
                limit,
            )
            .await
            .map_err(|e| e.to_string())
    }
}
