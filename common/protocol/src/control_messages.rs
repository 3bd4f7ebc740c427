//! The messages that carry the control plane: status trees (heartbeats,
//! cold start, shutdown), control actions going down, and the responses a
//! component answers them with. The vocabulary is [`crate::control`]; the
//! documents are written and read by [`crate::codec`].

use crate::control::{CLASS_CONTROL, CLASS_INFRASTRUCTURE, ControlAction, StatusNode};
use crate::ids::RsId;
use crate::model::Detail;
use crate::time::Timestamp;

/// An infrastructure message (`heartbeat`, `coldStart`, `shutdown`) from
/// `component` carrying its status tree: not persistent, expiring after
/// `ttl` (a stale heartbeat is worth nothing).
pub fn status_message(
    component: RsId,
    sub: &str,
    tree: &StatusNode,
    now: Timestamp,
    ttl: std::time::Duration,
    precedence: u8,
) -> crate::model::Message {
    use crate::model::*;
    Message {
        header: Header {
            id: crate::ids::MessageId::generate(),
            created: now,
            class: Classification::new(CLASS_INFRASTRUCTURE, sub),
            route: Route::Source(Source {
                component,
                version: tree.version.as_deref().unwrap_or("0").into(),
                qos: Qos {
                    expiry: Some(now.saturating_add(ttl)),
                    precedence,
                    persistent: false,
                },
            }),
            routing: Default::default(),
        },
        content: Content::Data(Data {
            mime: "text/xml".into(),
            encoding: TransferEncoding::Binary,
            bytes: crate::codec::encode_status(tree).into(),
        }),
    }
}

/// A back-channel message carrying `action` to `to`, worth delivering
/// until `expiry`.
pub fn control_message(
    id: crate::ids::MessageId,
    to: Vec<RsId>,
    expiry: Option<Timestamp>,
    action: &ControlAction,
    now: Timestamp,
) -> crate::model::Message {
    use crate::model::*;
    Message {
        header: Header {
            id,
            created: now,
            class: Classification::new(CLASS_CONTROL, action.name()),
            route: Route::Destination(Destination::new(to, expiry)),
            routing: Default::default(),
        },
        content: Content::Data(Data {
            mime: "text/xml".into(),
            encoding: TransferEncoding::Binary,
            bytes: crate::codec::encode_control(action).into(),
        }),
    }
}

/// The message response a component sends for the back-channel message
/// `to`. Its ID follows from the action's (`re-` and the action's ID), so
/// a second attempt after a crash is refused upstream as a duplicate
/// rather than stored as a second response.
pub fn response_message(
    to: &crate::codec::RawMessage,
    from: RsId,
    version: &str,
    response: Answer,
    now: Timestamp,
) -> Result<crate::model::Message, crate::ids::IdError> {
    response_to(
        &to.header.id,
        &to.header.class.subclass,
        from,
        version,
        response,
        now,
    )
}

/// The response to the back-channel message `id` (of subclass `subclass`):
/// its ID derives from `id` and the responder, so answering twice sends
/// the same message, which the receivers drop as a duplicate, while the
/// responses of the several destinations of one fanned-out message stay
/// distinct messages.
pub fn response_to(
    id: &crate::ids::MessageId,
    subclass: &str,
    from: RsId,
    version: &str,
    response: Answer,
    now: Timestamp,
) -> Result<crate::model::Message, crate::ids::IdError> {
    use crate::model::*;
    let reference = id.clone();
    let derived = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("{}\n{}", id.as_str(), from.as_str()).as_bytes(),
    );
    let (outcome, details, result) = response;
    Ok(Message {
        header: Header {
            id: crate::ids::MessageId::new(format!("re-{}", derived.simple()))?,
            created: now,
            class: Classification::new(CLASS_CONTROL, subclass),
            route: Route::Source(Source {
                component: from,
                version: version.into(),
                qos: Qos {
                    expiry: Some(now.saturating_add(std::time::Duration::from_secs(86_400))),
                    precedence: 7,
                    persistent: true,
                },
            }),
            routing: Default::default(),
        },
        content: Content::Response(Response {
            reference,
            outcome,
            details,
            result,
        }),
    })
}

/// How a destination answers a control action: the outcome, details, and
/// an optional result.
pub type Answer = (
    crate::outcome::Outcome,
    Vec<Detail>,
    Option<crate::model::ResultPayload>,
);

/// Done, nothing to say.
pub fn answer_ok() -> Answer {
    (crate::outcome::Outcome::Accepted, Vec::new(), None)
}

/// Refused with `code` and the reason.
pub fn answer_refused(code: &'static str, text: impl Into<String>) -> Answer {
    (
        crate::outcome::Outcome::rejected(code, text),
        Vec::new(),
        None,
    )
}

/// Done, with a result document.
pub fn answer_with(mime: &str, text: String) -> Answer {
    (
        crate::outcome::Outcome::Accepted,
        Vec::new(),
        Some(crate::model::ResultPayload {
            mime: mime.into(),
            text,
        }),
    )
}

/// `getStatus`: the status tree as the result.
pub fn answer_status(tree: &StatusNode) -> Answer {
    answer_with(
        "text/xml",
        String::from_utf8_lossy(&crate::codec::encode_status(tree)).into_owned(),
    )
}

/// `getConfig`: the configuration (TOML) as the result.
pub fn answer_config<E: std::fmt::Display>(toml: Result<String, E>) -> Answer {
    match toml {
        Ok(text) => answer_with("application/toml", text),
        Err(e) => answer_refused("failed", e.to_string()),
    }
}

/// The control action a back-channel message carries, or the outcome that
/// refuses it (not a control message, or a payload that does not decode).
pub fn action_of(m: &crate::codec::RawMessage) -> Result<ControlAction, crate::outcome::Outcome> {
    use crate::model::{Content, Message};
    let limits = crate::codec::Limits::default();
    match m.clone().decode(&limits) {
        Ok(Message {
            content: Content::Data(d),
            ..
        }) if m.header.class.class == CLASS_CONTROL => {
            crate::codec::decode_control(&d.bytes, &limits).map_err(|e| {
                crate::outcome::Outcome::rejected("invalid", format!("control payload: {e}"))
            })
        }
        _ => Err(crate::outcome::Outcome::rejected(
            "unsupported",
            "only control actions are carried out here",
        )),
    }
}
