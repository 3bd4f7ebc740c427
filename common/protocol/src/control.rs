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

use crate::ids::{MessageId, RsId};
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

/// Defines the control actions once: each action's variant, its payload
/// and its name on the wire (the `action` attribute and the message
/// subclass). From this one list come [`ControlAction`], its fieldless
/// twin [`ActionKind`] (every kind, names both ways), and
/// [`ControlAction::kind`]. Everything else that must know every action (the
/// codec, rsctl's parsing, the samples, the handlers at the proxy and the
/// MLM) matches on one of the two enums without a catch-all arm, so adding
/// an action here makes the compiler list each place that must handle it.
/// Written as a macro because no crate derives a fieldless twin together
/// with the names (strum's `EnumDiscriminants` and `EnumString` would, at
/// the price of a proc-macro dependency in the one crate that has none).
macro_rules! control_actions {
    ($(
        $(#[$doc:meta])*
        $variant:ident $( ( $($tuple:ty),* ) )? $( { $($(#[$fdoc:meta])* $field:ident : $fty:ty),* $(,)? } )? = $name:literal
    ),* $(,)?) => {
        /// An action the provider asks a component to carry out.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum ControlAction {
            $(
                $(#[$doc])*
                $variant $( ( $($tuple),* ) )? $( { $($(#[$fdoc])* $field : $fty),* } )?,
            )*
        }

        /// Which action, without its payload.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ActionKind {
            $( $variant, )*
        }

        impl ActionKind {
            /// Every kind, in the order of the definition (and the DTD).
            pub const ALL: &'static [ActionKind] = &[$(ActionKind::$variant),*];

            /// The action name: the `action` attribute and the message
            /// subclass.
            pub fn name(self) -> &'static str {
                match self {
                    $( ActionKind::$variant => $name, )*
                }
            }

            /// The kind named `name`, if any.
            pub fn parse(name: &str) -> Option<Self> {
                match name {
                    $( $name => Some(ActionKind::$variant), )*
                    _ => None,
                }
            }
        }

        impl ControlAction {
            /// Which action this is.
            pub fn kind(&self) -> ActionKind {
                match self {
                    $( ControlAction::$variant { .. } => ActionKind::$variant, )*
                }
            }
        }
    };
}

control_actions! {
    /// Answer with the component's status tree.
    GetStatus = "getStatus",
    /// Answer at once; a very basic heartbeat.
    Ping = "ping",
    /// Stop the component cleanly (it sends its shutdown message first).
    Shutdown = "shutdown",
    /// Install a package fetched through the bulk download path.
    SoftwareUpdate {
        package: String,
        version: String,
        /// Where the bulk offer for the package bytes is (if already known).
        url: Option<String>,
    } = "softwareUpdate",
    /// Replace the component's configuration with this TOML document. A bad
    /// one is refused with the reason and the old one kept.
    ConfigChange { config: String } = "configChange",
    /// Answer with the component's configuration (TOML).
    GetConfig = "getConfig",
    /// Let this support instance's messages through again.
    EnableInstance(RsId) = "enableInstance",
    /// Refuse this support instance's messages at the proxy.
    DisableInstance(RsId) = "disableInstance",
    /// Resume forwarding messages from integrators.
    EnableForwarding = "enableForwarding",
    /// Keep spooling but stop forwarding.
    DisableForwarding = "disableForwarding",
    /// Forget this integrator (its registration and its instances).
    DeregisterIntegrator(RsId) = "deregisterIntegrator",
    /// Put dead letters (messages refused for good upstream) back in the
    /// spool to be sent again: this one, or every one.
    ReplayDeadLetters(Option<MessageId>) = "replayDeadLetters",
    /// Delete dead letters (recorded as dropped): this one, or every one.
    DiscardDeadLetters(Option<MessageId>) = "discardDeadLetters",
}

impl ControlAction {
    /// The action name: the `action` attribute and the message subclass.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
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

/// Queue health a tier reports in every status tree it sends up (and so in
/// every heartbeat): metric names, and the rule the centre applies to them
/// (`rsctl components --at-risk`).
pub mod queue_health {
    use super::StatusNode;

    /// Bytes the spool may hold (`[spool] max_bytes`).
    pub const MAX_BYTES: &str = "spool.max_bytes";
    /// How full the spool is, in percent of `max_bytes`.
    pub const FILL_PCT: &str = "spool.fill_pct";
    /// Seconds the oldest waiting message has waited in this spool.
    pub const OLDEST_AGE_SECS: &str = "spool.oldest_age_secs";
    /// Seconds until the spool is full at the rate it grew since the last
    /// heartbeat (left out while it does not grow).
    pub const FULL_IN_SECS: &str = "spool.full_in_secs";
    /// Messages dropped since the last heartbeat: evicted for room, aged
    /// out, or refused because the spool was full.
    pub const DROPPED: &str = "spool.dropped_since_beat";
    /// Messages dead-lettered since the last heartbeat.
    pub const DEAD_LETTERED: &str = "spool.dead_lettered_since_beat";
    /// A spool this full (percent) puts its site at risk.
    pub const AT_RISK_PCT: u64 = 80;

    /// Why a tier whose latest status is `status` is at risk of losing
    /// what it holds: its spool at least [`AT_RISK_PCT`] full, dropping,
    /// or dead-lettering (both since its previous heartbeat); `None` when
    /// it is not (or does not report queue health).
    pub fn at_risk(status: &StatusNode) -> Option<String> {
        let get = |name: &str| {
            status
                .metrics
                .iter()
                .find(|d| d.name == name)
                .and_then(|d| d.value.parse::<u64>().ok())
        };
        let mut why = Vec::new();
        if let Some(p) = get(FILL_PCT).filter(|p| *p >= AT_RISK_PCT) {
            let full_in = get(FULL_IN_SECS)
                .map(|s| format!(", full in {s} s"))
                .unwrap_or_default();
            why.push(format!("spool {p}% full{full_in}"));
        }
        if let Some(n) = get(DROPPED).filter(|n| *n > 0) {
            why.push(format!("{n} dropped since the last heartbeat"));
        }
        if let Some(n) = get(DEAD_LETTERED).filter(|n| *n > 0) {
            why.push(format!("{n} dead-lettered since the last heartbeat"));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::control::NodeState;
        use crate::model::Detail;

        fn node(metrics: &[(&str, &str)]) -> StatusNode {
            StatusNode {
                kind: "proxy".into(),
                id: None,
                name: None,
                state: NodeState::Ok,
                version: None,
                since: None,
                metrics: metrics.iter().map(|(k, v)| Detail::new(*k, *v)).collect(),
                children: Vec::new(),
            }
        }

        #[test]
        fn a_full_dropping_or_dead_lettering_spool_is_at_risk() {
            assert_eq!(at_risk(&node(&[(FILL_PCT, "79"), (DROPPED, "0")])), None);
            assert_eq!(at_risk(&node(&[])), None);
            assert_eq!(
                at_risk(&node(&[(FILL_PCT, "80"), (FULL_IN_SECS, "95")])).as_deref(),
                Some("spool 80% full, full in 95 s")
            );
            assert_eq!(
                at_risk(&node(&[
                    (FILL_PCT, "3"),
                    (DROPPED, "4"),
                    (DEAD_LETTERED, "1")
                ]))
                .as_deref(),
                Some(
                    "4 dropped since the last heartbeat; 1 dead-lettered since the last heartbeat"
                )
            );
        }
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
