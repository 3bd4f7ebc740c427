//! Control actions and the status tree: payloads carried as `text/xml` data
//! messages, identified by their classification.
//!
//! | class            | subclass                         | payload                  |
//! |------------------|----------------------------------|--------------------------|
//! | `infrastructure` | `heartbeat`, `coldStart`, `shutdown` | `<status>` tree (`dtd/status.dtd`) |
//! | `control`        | the action name (see [`ControlAction`]) | `<control>` (`dtd/control.dtd`) |
//!
//! The result of a control action travels back up as a message response
//! whose `ref` is the control message's ID; `getStatus` and `getConfig` put
//! their answer in the response's `result` element.

use crate::ids::RsId;
use crate::model::Detail;
use crate::time::Timestamp;

/// Class of infrastructure messages (heartbeats, cold start, shutdown).
pub const CLASS_INFRASTRUCTURE: &str = "infrastructure";
/// Subclass of periodic heartbeats.
pub const SUB_HEARTBEAT: &str = "heartbeat";
/// Subclass sent once when a component starts.
pub const SUB_COLD_START: &str = "coldStart";
/// Subclass sent once when a component stops cleanly.
pub const SUB_SHUTDOWN: &str = "shutdown";
/// Class of control actions; the subclass is the action name.
pub const CLASS_CONTROL: &str = "control";

/// An action the provider asks a component to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAction {
    /// Answer with the component's status tree.
    GetStatus,
    /// Answer at once; a very basic heartbeat.
    Ping,
    /// Stop the component cleanly (it sends its shutdown message first).
    Shutdown,
    /// Install a package fetched through the bulk download path.
    SoftwareUpdate {
        package: String,
        version: String,
        /// Where the bulk offer for the package bytes is (if already known).
        url: Option<String>,
    },
    /// Replace the component's configuration with this TOML document. A bad
    /// one is refused with the reason and the old one kept.
    ConfigChange {
        config: String,
    },
    /// Answer with the component's configuration (TOML).
    GetConfig,
    EnableInstance(RsId),
    DisableInstance(RsId),
    /// Resume forwarding messages from integrators.
    EnableForwarding,
    /// Keep spooling but stop forwarding.
    DisableForwarding,
    DeregisterIntegrator(RsId),
    /// Put dead letters (messages refused for good upstream) back in the
    /// spool to be sent again: this one, or every one.
    ReplayDeadLetters(Option<crate::ids::MessageId>),
    /// Delete dead letters (recorded as dropped): this one, or every one.
    DiscardDeadLetters(Option<crate::ids::MessageId>),
}

impl ControlAction {
    /// The action name: the `action` attribute and the message subclass.
    pub fn name(&self) -> &'static str {
        match self {
            ControlAction::GetStatus => "getStatus",
            ControlAction::Ping => "ping",
            ControlAction::Shutdown => "shutdown",
            ControlAction::SoftwareUpdate { .. } => "softwareUpdate",
            ControlAction::ConfigChange { .. } => "configChange",
            ControlAction::GetConfig => "getConfig",
            ControlAction::EnableInstance(_) => "enableInstance",
            ControlAction::DisableInstance(_) => "disableInstance",
            ControlAction::EnableForwarding => "enableForwarding",
            ControlAction::DisableForwarding => "disableForwarding",
            ControlAction::DeregisterIntegrator(_) => "deregisterIntegrator",
            ControlAction::ReplayDeadLetters(_) => "replayDeadLetters",
            ControlAction::DiscardDeadLetters(_) => "discardDeadLetters",
        }
    }

    /// Every action name, in DTD order.
    pub const NAMES: [&'static str; 13] = [
        "getStatus",
        "ping",
        "shutdown",
        "softwareUpdate",
        "configChange",
        "getConfig",
        "enableInstance",
        "disableInstance",
        "enableForwarding",
        "disableForwarding",
        "deregisterIntegrator",
        "replayDeadLetters",
        "discardDeadLetters",
    ];
}

/// Health of one node of a status tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    Ok,
    Degraded,
    Failed,
    Disabled,
    Unknown,
}

impl NodeState {
    pub const ALL: [NodeState; 5] = [
        NodeState::Ok,
        NodeState::Degraded,
        NodeState::Failed,
        NodeState::Disabled,
        NodeState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ok => "ok",
            NodeState::Degraded => "degraded",
            NodeState::Failed => "failed",
            NodeState::Disabled => "disabled",
            NodeState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        NodeState::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One node of the hierarchical status tree: a proxy contains its
/// integrators, an integrator its platforms, a platform its support
/// instances; an MLM reports its own state and queue depths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusNode {
    /// `proxy`, `mlm`, `appserver`, `integrator`, `platform`, `instance`, ...
    /// (a token).
    pub kind: String,
    pub id: Option<RsId>,
    pub name: Option<String>,
    pub state: NodeState,
    pub version: Option<String>,
    /// When the node entered its current state.
    pub since: Option<Timestamp>,
    /// Named figures (queue depths, counters), name a token.
    pub metrics: Vec<Detail>,
    pub children: Vec<StatusNode>,
}

impl StatusNode {
    pub fn new(kind: impl Into<String>, state: NodeState) -> Self {
        StatusNode {
            kind: kind.into(),
            id: None,
            name: None,
            state,
            version: None,
            since: None,
            metrics: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Visits this node and all below it, depth first.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a StatusNode)) {
        f(self);
        for c in &self.children {
            c.walk(f);
        }
    }
}

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
/// its ID derives from `id`, so answering twice sends the same message,
/// which the receivers drop as a duplicate.
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
    let id = id.as_str();
    let (outcome, details, result) = response;
    Ok(Message {
        header: Header {
            id: crate::ids::MessageId::new(format!("re-{}", &id[..id.len().min(60)]))?,
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
