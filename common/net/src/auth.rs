//! Who may say what (docs/security.md, Anti-spoofing). A tier that accepts
//! an envelope over mutual TLS knows the component at the other end from its
//! certificate; it then refuses:
//!
//! - the whole envelope when the caller presented no component certificate,
//!   or when the envelope's `sender` is not the authenticated component
//!   (the back-channel is handed to the sender, so this is also what keeps
//!   one site from reading another's);
//! - each message whose claimed source, or any routing hop it carries, is
//!   outside what the caller may speak for: a proxy speaks only for itself
//!   and what it allocated (integrators, support instances); an MLM only
//!   for its customer's components, unless it belongs to the same
//!   organisation as this tier (a provider farm member behind which any
//!   customer may sit).
//!
//! On a plain-HTTP listener (TLS not configured: loopback benchmarks) there
//! is no identity and nothing is checked.

use crate::pki::Role;
use crate::server::{Peer, Refusal};
use rs_protocol::codec::RawEnvelope;
use rs_protocol::{ComponentKind, Outcome, RsId};

/// The component a tier's endpoint is talking to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No TLS on this listener: not authenticated, not checked.
    Open,
    /// Mutual TLS: this component's certificate was verified.
    Component(RsId),
}

crate::counters! {
    /// Counters of refusals (shown in each tier's status and metrics).
    pub struct Stats {
        /// Envelopes refused: no certificate, an admin's, or a sender that
        /// is not the caller.
        envelopes_refused: "envelopes_refused_total" {reason = "caller"},
            "Envelopes refused before their messages were read, by reason.";
        /// Messages refused because their source or a hop is not the
        /// caller's to speak for.
        spoofed: "messages_spoofed_total",
            "Messages refused (as rejected) for a source or hop not the caller's to speak for.";
    }
}

/// The calling component, or the refusal for a caller that is none.
pub fn component(peer: &Peer) -> Result<Caller, Refusal> {
    match peer {
        Peer::Tcp(_) | Peer::Local => Ok(Caller::Open),
        Peer::Tls(_, None) => Err(Refusal::new(
            http::StatusCode::UNAUTHORIZED,
            "a client certificate issued to a component is required",
        )),
        Peer::Tls(_, Some(id)) => match (id.role, id.component()) {
            (Role::Component, Some(c)) => Ok(Caller::Component(c)),
            _ => Err(Refusal::new(
                http::StatusCode::FORBIDDEN,
                format!("{} is not a component certificate", id.name),
            )),
        },
    }
}

/// True when `peer` may send messages claiming `claimed` (as source or hop)
/// to the tier `own`.
pub fn may_speak_for(peer: &RsId, own: &RsId, claimed: &RsId) -> bool {
    match peer.kind() {
        ComponentKind::Proxy => claimed.is_within(peer),
        ComponentKind::Mlm | ComponentKind::AppServer => {
            peer.customer() == own.customer() || claimed.customer() == peer.customer()
        }
        _ => false,
    }
}

/// Screens an envelope from `caller` arriving at `own`. `Err`: the whole
/// envelope is refused. `Ok(v)`: `v[i]` is the refusal of message `i`, if
/// any (the caller learns it from that message's outcome).
pub fn screen(
    caller: &Caller,
    own: &RsId,
    env: &RawEnvelope,
    stats: &Stats,
) -> Result<Vec<Option<Outcome>>, Refusal> {
    let n = env.messages.len();
    let Caller::Component(peer) = caller else {
        return Ok(vec![None; n]);
    };
    if env.meta.sender != *peer {
        stats.envelopes_refused.inc();
        return Err(Refusal::new(
            http::StatusCode::FORBIDDEN,
            format!(
                "the envelope's sender {} is not the authenticated component {peer}",
                env.meta.sender
            ),
        ));
    }
    let mut out = vec![None; n];
    for (i, m) in env.messages.iter().enumerate() {
        let bad = m
            .header
            .source()
            .map(|s| &s.component)
            .into_iter()
            .chain(m.header.routing.iter().map(|h| &h.component))
            .find(|c| !may_speak_for(peer, own, c));
        if let Some(c) = bad {
            stats.spoofed.inc();
            tracing::warn!(
                "{peer} sent message {} naming {c}, which it may not speak for: refused",
                m.header.id
            );
            out[i] = Some(Outcome::rejected(
                "spoofed-source",
                format!("{peer} may not speak for {c}"),
            ));
        }
    }
    Ok(out)
}

/// Refusals by caller: the caller must be a component (any, when open).
pub fn caller_filter()
-> impl warp::Filter<Extract = (Caller,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    use warp::Filter as _;
    crate::server::peer()
        .and_then(|p: Peer| async move { component(&p).map_err(warp::reject::custom) })
}

/// The security counters a tier shows in its status: handshakes, refused
/// handshakes (bad, expired, unknown-CA or revoked certificates, old
/// protocol versions, weak ciphers, timeouts), refused callers and
/// messages.
pub fn metrics(tls: Option<&crate::tls::TlsServer>, auth: &Stats) -> Vec<(&'static str, u64)> {
    let mut v = vec![
        ("auth.envelopes_refused", auth.envelopes_refused.get()),
        ("auth.spoofed", auth.spoofed.get()),
    ];
    if let Some(t) = tls {
        v.extend([
            ("tls.handshakes", t.stats.handshakes.get()),
            ("tls.handshakes_failed", t.stats.handshakes_failed()),
            ("tls.revoked_refused", t.stats.revoked.get()),
            ("tls.revoked_cut", t.revocations.cut.get()),
            ("tls.revoked", t.revocations.len() as u64),
        ]);
    }
    v
}
