//! The Remote Services protocol, shared by every tier: IDs, the domain model
//! of messages and envelopes, the delivery outcome, and the wire codec
//! (XML documents in a `multipart/related` envelope).
//!
//! The codec never does IO and never panics on input; see `docs/protocol.md`
//! for the wire format it implements and `dtd/` for the documents.

pub mod codec;
pub mod control;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod model;
pub mod outcome;
pub mod samples;
pub mod time;

pub use codec::{
    DecodeError, Encoded, EnvelopeWriter, Limits, RawEnvelope, RawMessage, Seal, StreamDecoder,
    decode_envelope, decode_headers, encode_envelope,
};
pub use ids::{ComponentKind, CustomerId, MessageId, RsId};
pub use model::*;
pub use outcome::{Code, Outcome, Reason};
pub use time::Timestamp;

#[cfg(feature = "runtime")]
pub mod auth;
#[cfg(feature = "runtime")]
pub mod bulk;
#[cfg(feature = "runtime")]
pub mod config_file;
#[cfg(feature = "runtime")]
pub mod datadir;
#[cfg(feature = "runtime")]
pub mod db;
#[cfg(feature = "runtime")]
pub mod enroll;
#[cfg(feature = "runtime")]
pub mod ingress;
#[cfg(feature = "runtime")]
pub mod mem;
#[cfg(feature = "runtime")]
pub mod outbox;
#[cfg(feature = "runtime")]
pub mod pki;
#[cfg(feature = "runtime")]
pub mod seal;
#[cfg(feature = "runtime")]
pub mod server;
#[cfg(feature = "runtime")]
pub mod spool;
#[cfg(feature = "runtime")]
pub mod throttle;
#[cfg(feature = "runtime")]
pub mod tls;
#[cfg(feature = "runtime")]
pub mod upstream;

/// Fault injection for the test suite: with `RS_CRASH_AT=<point>` in its
/// environment a daemon aborts when it reaches that point, as a SIGKILL at
/// that instant would stop it (nothing flushed, nothing cleaned up), so a
/// test can place a crash exactly between two steps that must not be
/// separated by one. Written here rather than with the `fail` crate, whose
/// actions cannot end the process (a panic inside a tokio task is caught).
/// Without the variable this is one load of a cached `Option`.
#[cfg(feature = "runtime")]
pub fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("RS_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        tracing::error!("RS_CRASH_AT={name}: aborting here");
        std::process::abort();
    }
}

/// Cancels `token` on SIGTERM or SIGINT (Ctrl-C). SIGHUP, which would
/// otherwise kill the daemon without a shutdown (and which service
/// managers send as "reload"), is caught and logged: the daemon goes on
/// with the configuration it started with.
#[cfg(feature = "runtime")]
pub async fn shutdown_on_signal(token: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = hup.recv() => {
                tracing::warn!(
                    "SIGHUP: reloading is not supported; going on with the configuration \
                     in force (restart the service to apply a changed file)"
                );
                continue;
            }
        }
        break;
    }
    token.cancel();
}
