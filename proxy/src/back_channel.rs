//! Control actions arriving on the back-channel (seed 004, Fig. 18): each
//! is applied at most once (its ID is remembered) and answered with one
//! message response that travels back up to the application server.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rs_common::codec::{Limits, RawMessage, decode_control, encode_status};
use rs_common::control::{CLASS_CONTROL, ControlAction};
use rs_common::model::*;
use rs_common::upstream::BackChannel;
use rs_common::{MessageId, Outcome};

use crate::Proxy;

/// Applies control actions addressed to this proxy.
#[derive(Debug)]
pub struct Actions(pub Arc<Proxy>);

impl BackChannel for Actions {
    fn receive(
        &self,
        msgs: Vec<RawMessage>,
    ) -> Pin<Box<dyn Future<Output = Vec<MessageId>> + Send + '_>> {
        Box::pin(async move {
            let mut acked = Vec::new();
            for m in msgs {
                match self.handle(&m).await {
                    Ok(()) => acked.push(m.header.id),
                    // Not acknowledged: it will be offered again.
                    Err(e) => tracing::warn!("back-channel message {}: {e}", m.header.id),
                }
            }
            acked
        })
    }
}

impl Actions {
    async fn handle(&self, m: &RawMessage) -> Result<(), String> {
        let p = &self.0;
        let id = m.header.id.to_string();
        if p.registry
            .seen(id.clone())
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        if !m.header.destinations().iter().any(|d| d.is_within(&p.id)) {
            tracing::warn!("back-channel message {id} is not for {}; ignored", p.id);
            return p.registry.mark_seen(id).await.map_err(|e| e.to_string());
        }
        let (outcome, details, result) = self.apply(m).await;
        tracing::info!("control {} ({}): {outcome}", m.header.class.subclass, id);
        // The response's ID follows from the action's, so a second attempt
        // after a crash is a duplicate rather than a second response.
        let rid =
            MessageId::new(format!("re-{}", &id[..id.len().min(60)])).map_err(|e| e.to_string())?;
        let now = p.clock.now();
        let response = Message {
            header: Header {
                id: rid,
                created: now,
                class: Classification::new(CLASS_CONTROL, m.header.class.subclass.clone()),
                route: Route::Source(Source {
                    component: p.id.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    qos: Qos {
                        expiry: Some(now.saturating_add(Duration::from_secs(86_400))),
                        precedence: 7,
                        persistent: true,
                    },
                }),
                routing: Vec::new(),
            },
            content: Content::Response(Response {
                reference: m.header.id.clone(),
                outcome,
                details,
                result,
            }),
        };
        p.submit(response).await.map_err(|e| e.to_string())?;
        p.registry.mark_seen(id).await.map_err(|e| e.to_string())
    }

    async fn apply(&self, m: &RawMessage) -> (Outcome, Vec<Detail>, Option<ResultPayload>) {
        let p = &self.0;
        let action = match (&m.header.class.class, m.clone().decode(&Limits::default())) {
            (
                class,
                Ok(Message {
                    content: Content::Data(d),
                    ..
                }),
            ) if class == CLASS_CONTROL => match decode_control(&d.bytes, &Limits::default()) {
                Ok(a) => a,
                Err(e) => {
                    return (
                        Outcome::rejected("invalid", format!("control payload: {e}")),
                        vec![],
                        None,
                    );
                }
            },
            _ => {
                return (
                    Outcome::rejected("unsupported", "this proxy handles control actions only"),
                    vec![],
                    None,
                );
            }
        };
        let ok = (Outcome::Accepted, vec![], None);
        match &action {
            ControlAction::Ping => ok,
            ControlAction::GetStatus => (
                Outcome::Accepted,
                vec![],
                Some(ResultPayload {
                    mime: "text/xml".into(),
                    text: String::from_utf8_lossy(&encode_status(&p.status_tree().await))
                        .into_owned(),
                }),
            ),
            ControlAction::GetConfig => match toml::to_string(&p.cfg) {
                Ok(text) => (
                    Outcome::Accepted,
                    vec![],
                    Some(ResultPayload {
                        mime: "application/toml".into(),
                        text,
                    }),
                ),
                Err(e) => (Outcome::rejected("failed", e.to_string()), vec![], None),
            },
            ControlAction::EnableForwarding | ControlAction::DisableForwarding => {
                let off = matches!(action, ControlAction::DisableForwarding);
                p.paused.store(off, Ordering::Relaxed);
                ok
            }
            ControlAction::EnableInstance(t) | ControlAction::DisableInstance(t) => {
                let on = matches!(action, ControlAction::EnableInstance(_));
                match p.registry.set_enabled(t.clone(), on).await {
                    Ok(true) => ok,
                    Ok(false) => (
                        Outcome::rejected(
                            "unknown-destination",
                            format!("no support instance {t}"),
                        ),
                        vec![],
                        None,
                    ),
                    Err(e) => (Outcome::rejected("failed", e.to_string()), vec![], None),
                }
            }
            ControlAction::DeregisterIntegrator(t) => {
                match p.registry.deregister_integrator(t.clone()).await {
                    Ok(true) => ok,
                    Ok(false) => (
                        Outcome::rejected("unknown-destination", format!("no integrator {t}")),
                        vec![],
                        None,
                    ),
                    Err(e) => (Outcome::rejected("failed", e.to_string()), vec![], None),
                }
            }
            ControlAction::ConfigChange { .. }
            | ControlAction::Shutdown
            | ControlAction::SoftwareUpdate { .. } => (
                Outcome::rejected(
                    "unsupported",
                    format!(
                        "{} is not supported by this version of rs-proxy yet",
                        action.name()
                    ),
                ),
                vec![],
                None,
            ),
        }
    }
}
