//! Control actions addressed to the MLM itself (seed 004: "a message
//! addressed to an MLM is processed there"). Each is applied at most once
//! (its ID is remembered in the back-channel queue's `received` table) and
//! answered with a message response that the MLM's own sender carries up.

use std::sync::atomic::Ordering;

use rs_common::Outcome;
use rs_common::codec::{Limits, RawMessage, decode_control, encode_status};
use rs_common::control::{CLASS_CONTROL, ControlAction, response_message};
use rs_common::model::{Content, Detail, Message, ResultPayload};
use rs_common::spool::Spool as _;

use crate::Mlm;

/// Applies `m` (addressed to this MLM) once and spools the response.
/// `Ok` means it is safe to acknowledge upstream.
pub async fn apply_own(mlm: &Mlm, m: &RawMessage) -> Result<(), String> {
    let id = m.header.id.clone();
    if mlm
        .outbox
        .seen(id.clone())
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(());
    }
    let now = mlm.clock.now();
    if m.header.is_expired(now) {
        tracing::info!(
            "control {} ({id}) arrived expired; not applied",
            m.header.class.subclass
        );
    } else {
        let answer = answer(mlm, m).await;
        tracing::info!(
            "control {} ({id}) for this MLM: {}",
            m.header.class.subclass,
            answer.0
        );
        let response = response_message(m, mlm.id.clone(), env!("CARGO_PKG_VERSION"), answer, now)
            .map_err(|e| e.to_string())?;
        // The spool refuses a response ID it already holds, so a crash
        // between here and `mark_seen` answers once.
        mlm.spool
            .enqueue(vec![response.to_raw()], now)
            .await
            .map_err(|e| e.to_string())?;
    }
    mlm.outbox
        .mark_seen(id, now)
        .await
        .map_err(|e| e.to_string())
}

type Answer = (Outcome, Vec<Detail>, Option<ResultPayload>);

async fn answer(mlm: &Mlm, m: &RawMessage) -> Answer {
    let limits = Limits::default();
    let action = match m.clone().decode(&limits) {
        Ok(Message {
            content: Content::Data(d),
            ..
        }) if m.header.class.class == CLASS_CONTROL => match decode_control(&d.bytes, &limits) {
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
                Outcome::rejected("unsupported", "an MLM handles control actions only"),
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
                text: String::from_utf8_lossy(&encode_status(&mlm.status_tree().await))
                    .into_owned(),
            }),
        ),
        ControlAction::GetConfig => match toml::to_string(&mlm.cfg) {
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
            // Its own sender only: what it relays synchronously is the
            // sending proxies' business.
            let off = matches!(action, ControlAction::DisableForwarding);
            mlm.paused.store(off, Ordering::Relaxed);
            ok
        }
        other => (
            Outcome::rejected(
                "unsupported",
                format!("{} is not an action an MLM carries out", other.name()),
            ),
            vec![],
            None,
        ),
    }
}
