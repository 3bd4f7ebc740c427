//! Control actions arriving on the back-channel (seed 004, Fig. 18): each
//! is applied at most once (its ID is remembered) and answered with one
//! message response that travels back up to the application server.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rs_node::uplink::{BackChannel, Via};
use rs_protocol::codec::RawMessage;
use rs_protocol::control::ControlAction;
use rs_protocol::control_messages::{
    Answer, action_of, answer_config, answer_ok, answer_refused, answer_status, response_message,
};
use rs_protocol::model::*;
use rs_protocol::{MessageId, Outcome};
use rs_store::spool::{DeadLetterAction, apply_dead_letters};

use crate::Proxy;
use crate::registry::Claim;

/// Applies control actions addressed to this proxy.
#[derive(Debug)]
pub struct Actions {
    proxy: Arc<Proxy>,
    /// An action (`shutdown`, `configChange`) stops the daemon once the
    /// batch it came in is answered and marked applied.
    stop_after_batch: AtomicBool,
    /// Answers of applied actions that could not be recorded in proxy.db
    /// (a full disk), until they are spooled.
    unrecorded: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

impl Actions {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Actions {
            proxy,
            stop_after_batch: AtomicBool::new(false),
            unrecorded: Default::default(),
        }
    }
}

impl BackChannel for Actions {
    fn receive(
        &self,
        msgs: Vec<RawMessage>,
        via: Via,
    ) -> Pin<Box<dyn Future<Output = Vec<MessageId>> + Send + '_>> {
        Box::pin(async move {
            let mut acked = Vec::new();
            for m in msgs {
                match self.handle(&m, &via).await {
                    Ok(true) => acked.push(m.header.id),
                    // Held: acknowledged later (a download not here yet).
                    Ok(false) => {}
                    // Not acknowledged: it will be offered again.
                    Err(e) => {
                        tracing::warn!(message_id = %m.header.id, "back-channel message: {e}")
                    }
                }
            }
            if self.stop_after_batch.swap(false, Ordering::Relaxed) {
                // The responses are spooled and the actions marked applied;
                // the graceful stop sends both (and these acknowledgements)
                // before the process ends or starts again.
                self.proxy.stop.cancel();
            }
            acked
        })
    }
}

impl Actions {
    /// Deals with one back-channel message; `Ok(true)` acknowledges it.
    async fn handle(&self, m: &RawMessage, via: &Via) -> Result<bool, String> {
        if m.kind == ContentKind::BulkRequest
            && m.header
                .destinations()
                .iter()
                .any(|d| d.is_within(&self.proxy.id))
        {
            let limits = rs_protocol::codec::Limits::default();
            match m.clone().decode(&limits).map(|f| f.content) {
                Ok(Content::BulkRequest(b)) if b.direction == Direction::Download => {
                    return crate::download::offered(&self.proxy, m, &b, via).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(message_id = %m.header.id, "download offer does not decode: {e}");
                    return Ok(true);
                }
            }
        }
        self.handle_once(m).await.map(|()| true)
    }

    async fn handle_once(&self, m: &RawMessage) -> Result<(), String> {
        let p = &self.proxy;
        let id = m.header.id.to_string();
        // Recorded before it is applied: applied at most once, even if the
        // proxy dies or its disk fills up on the way.
        let claim = p
            .registry
            .claim(id.clone())
            .await
            .map_err(|e| e.to_string())?;
        let answer = match claim {
            Claim::Done => {
                p.stats.actions_duplicate.inc();
                return Ok(());
            }
            // Applied, its answer not known to be spooled: spool it again.
            Claim::Answered(saved) => return self.send_answer(id, saved).await,
            Claim::Interrupted => {
                let kept = self.unrecorded.lock().ok().and_then(|mut u| u.remove(&id));
                if let Some(saved) = kept {
                    // Its answer could not be recorded (a full disk), but
                    // this process still has it.
                    return self.send_answer(id, saved).await;
                }
                p.stats.actions_duplicate.inc();
                tracing::warn!(
                    "action {id} ({}) was being applied when its answer was lost; not applied again",
                    m.header.class.subclass
                );
                answer_refused(
                    "failed",
                    "rs-proxy stopped (or could not record the answer) while applying this \
                     action; it is not applied a second time",
                )
            }
            Claim::New => {
                if !m.header.destinations().iter().any(|d| d.is_within(&p.id)) {
                    tracing::warn!(message_id = %id, "back-channel message not for {}; ignored", p.id);
                    return p.registry.mark_seen(id).await.map_err(|e| e.to_string());
                }
                if m.kind == ContentKind::BulkResponse {
                    // The answer to an upload request: no response goes back.
                    let limits = rs_protocol::codec::Limits::default();
                    match m.clone().decode(&limits).map(|f| f.content) {
                        Ok(Content::BulkResponse(b)) => crate::bulk::answered(p, &b).await?,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(message_id = %id, "bulk response does not decode: {e}")
                        }
                    }
                    return p.registry.mark_seen(id).await.map_err(|e| e.to_string());
                }
                if m.header.is_expired(p.clock.now()) {
                    // Too late to act on; the application server marks it expired.
                    tracing::info!(
                        "control {} ({id}) arrived expired; not applied",
                        m.header.class.subclass
                    );
                    return p.registry.mark_seen(id).await.map_err(|e| e.to_string());
                }
                let answer = self.apply(m).await;
                p.stats.actions_applied.inc();
                tracing::info!("control {} ({}): {}", m.header.class.subclass, id, answer.0);
                answer
            }
        };
        let response = response_message(
            m,
            p.id.clone(),
            env!("CARGO_PKG_VERSION"),
            answer,
            p.clock.now(),
        )
        .map_err(|e| e.to_string())?;
        let saved = save(&response.to_raw());
        if let Err(e) = p.registry.answered(id.clone(), saved.clone()).await {
            // Spooled below; if that fails too, kept here for the next offer.
            tracing::warn!(message_id = %id, "action: its answer could not be recorded: {e}");
            if let Ok(mut u) = self.unrecorded.lock() {
                u.insert(id.clone(), saved.clone());
            }
        }
        self.send_answer(id, saved).await
    }

    /// Spools a recorded answer; then the action is done.
    async fn send_answer(&self, id: String, saved: Vec<u8>) -> Result<(), String> {
        let p = &self.proxy;
        let raw = load(&saved).ok_or("a recorded answer does not decode")?;
        p.submit_raw(raw).await.map_err(|e| e.to_string())?;
        p.registry.mark_seen(id).await.map_err(|e| e.to_string())
    }

    async fn apply(&self, m: &RawMessage) -> Answer {
        let p = &self.proxy;
        let action = match action_of(m) {
            Ok(a) => a,
            Err(refused) => return (refused, Vec::new(), None),
        };
        let ok = answer_ok();
        match &action {
            ControlAction::Ping => ok,
            ControlAction::GetStatus => answer_status(&p.status_tree().await),
            ControlAction::GetConfig => answer_config(toml::to_string(&p.cfg)),
            ControlAction::EnableForwarding | ControlAction::DisableForwarding => {
                let off = matches!(action, ControlAction::DisableForwarding);
                p.paused.store(off, Ordering::Relaxed);
                ok
            }
            ControlAction::EnableInstance(t) | ControlAction::DisableInstance(t) => {
                let on = matches!(action, ControlAction::EnableInstance(_));
                match p.registry.set_enabled(t.clone(), on).await {
                    Ok(true) => ok,
                    Ok(false) => {
                        answer_refused("unknown-destination", format!("no support instance {t}"))
                    }
                    Err(e) => answer_refused("failed", e.to_string()),
                }
            }
            ControlAction::DeregisterIntegrator(t) => {
                match p.registry.deregister_integrator(t.clone()).await {
                    Ok(true) => ok,
                    Ok(false) => {
                        answer_refused("unknown-destination", format!("no integrator {t}"))
                    }
                    Err(e) => answer_refused("failed", e.to_string()),
                }
            }
            ControlAction::ConfigChange { config } => match self.change_config(config) {
                Ok(text) => (
                    Outcome::Accepted,
                    vec![],
                    Some(ResultPayload {
                        mime: "text/plain".into(),
                        text,
                    }),
                ),
                Err(o) => (o, vec![], None),
            },
            ControlAction::Shutdown => {
                p.restart.store(false, Ordering::Relaxed);
                self.stop_after_batch.store(true, Ordering::Relaxed);
                ok
            }
            ControlAction::SoftwareUpdate { .. } => answer_refused(
                "unsupported",
                "software reaches rs-proxy as a download offer of class software/package \
                 (rsctl publish); the softwareUpdate action carries no bytes",
            ),
            ControlAction::ReplayDeadLetters(m) => {
                apply_dead_letters(&p.spool, DeadLetterAction::Replay, m.clone(), p.clock.now())
                    .await
            }
            ControlAction::DiscardDeadLetters(m) => {
                apply_dead_letters(
                    &p.spool,
                    DeadLetterAction::Discard,
                    m.clone(),
                    p.clock.now(),
                )
                .await
            }
        }
    }
}

/// A response message as `received.response` keeps it: its content type,
/// a newline, its header part's length, a newline, the header part and the
/// content.
fn save(m: &RawMessage) -> Vec<u8> {
    let header = rs_protocol::codec::encode_header(&m.header, m.kind, m.data.as_ref());
    let mut out = format!("{}\n{}\n", m.content_type, header.len()).into_bytes();
    out.extend_from_slice(&header);
    out.extend_from_slice(&m.content);
    out
}

fn load(b: &[u8]) -> Option<RawMessage> {
    let mut parts = b.splitn(3, |c| *c == b'\n');
    let content_type = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let len: usize = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let rest = parts.next()?;
    let (header, content) = (rest.get(..len)?, rest.get(len..)?);
    let (header, kind, data) =
        rs_protocol::codec::decode_header_part(header, &rs_protocol::codec::Limits::default())
            .ok()?;
    Some(RawMessage {
        header,
        kind,
        data,
        content_type: content_type.into(),
        content: bytes::Bytes::copy_from_slice(content),
    })
}

impl Actions {
    /// `configChange` ([`Proxy::change_config`]), then a stop once the
    /// batch is answered, to start again with the new configuration.
    fn change_config(&self, patch: &str) -> Result<String, Outcome> {
        let done = self.proxy.change_config(patch)?;
        self.stop_after_batch.store(true, Ordering::Relaxed);
        Ok(done)
    }
}
