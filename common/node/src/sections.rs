//! Configuration sections the proxy and the MLM share, defined once: how
//! a tier sends upward (`[upstream]`) and what its spool may hold
//! (`[spool]`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sender::SenderConfig;
use crate::upstream::UpstreamConfig;

/// `[upstream]`: where and how a proxy or an MLM sends.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Base URLs of the MLM(s) or application server, tried in order.
    pub urls: Vec<String>,
    /// Whole-request timeout of a POST (a long poll's hold comes on top).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Most messages per envelope.
    #[serde(default = "default_batch")]
    pub max_messages: usize,
    /// Most bytes per envelope.
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: usize,
    /// Longest wait between attempts, seconds.
    #[serde(default = "default_backoff")]
    pub max_backoff_secs: u64,
    /// Envelopes in flight at once (1 keeps strict precedence order across
    /// envelopes; more drains a backlog faster).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// When idle, keep a long poll open for the back-channel, asking the
    /// upstream to hold it this many seconds (0: do not poll).
    #[serde(default = "default_poll_hold")]
    pub poll_hold_secs: u64,
}

impl UpstreamSection {
    /// The HTTP side, with `tls` towards the next hop.
    pub fn client(&self, tls: Option<rs_net::tls::TlsConfig>) -> UpstreamConfig {
        UpstreamConfig {
            urls: self.urls.clone(),
            timeout: Duration::from_secs(self.timeout_secs),
            tls,
            ..UpstreamConfig::default()
        }
    }

    /// How the sender batches and paces.
    pub fn sender(&self) -> SenderConfig {
        SenderConfig {
            max_messages: self.max_messages.max(1),
            max_bytes: self.max_bytes,
            max_backoff: Duration::from_secs(self.max_backoff_secs),
            parallel: self.parallel.max(1),
            ..SenderConfig::default()
        }
    }

    /// The long poll's hold, if the tier long-polls.
    pub fn poll(&self) -> Option<Duration> {
        (self.poll_hold_secs > 0).then(|| Duration::from_secs(self.poll_hold_secs))
    }
}

fn default_timeout() -> u64 {
    30
}
fn default_batch() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    4 << 20
}
fn default_backoff() -> u64 {
    300
}
fn default_poll_hold() -> u64 {
    25
}
fn default_parallel() -> usize {
    4
}

/// `[spool]`: what the spool may hold. `MIB` is the tier's default bound
/// in MiB (a proxy's spool is smaller than an MLM's custody spool).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSection<const MIB: u64> {
    /// Bytes the spool may hold; beyond, less important messages are
    /// evicted.
    #[serde(default = "default_spool_bytes::<MIB>")]
    pub max_bytes: u64,
    /// Days a message may wait before it is dropped as aged out.
    #[serde(default = "default_spool_days")]
    pub max_age_days: u64,
}

impl<const MIB: u64> Default for SpoolSection<MIB> {
    fn default() -> Self {
        SpoolSection {
            max_bytes: default_spool_bytes::<MIB>(),
            max_age_days: default_spool_days(),
        }
    }
}

fn default_spool_bytes<const MIB: u64>() -> u64 {
    MIB << 20
}
fn default_spool_days() -> u64 {
    7
}
