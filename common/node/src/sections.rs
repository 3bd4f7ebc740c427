//! Configuration sections the proxy and the MLM share, defined once: how
//! a tier sends upward (`[upstream]`) and what its spool may hold
//! (`[spool]`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::routes::RouteChoice;
use crate::sender::SenderConfig;
use crate::upstream::UpstreamConfig;

/// `[upstream]`: where and how a proxy or an MLM sends.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Base URLs of the MLM(s) or application server: the routes, in the
    /// order of preference (see [`crate::routes`]).
    pub urls: Vec<String>,
    /// Routes (among `urls`) bulk transfers take first, in order.
    #[serde(default)]
    pub bulk_urls: Vec<String>,
    /// With several routes: how often one that messages do not take is
    /// probed, seconds.
    #[serde(default = "default_probe")]
    pub probe_secs: u64,
    /// With several routes: a POST of messages unanswered this long (or
    /// four times its route's delay, if longer) goes on another route too.
    #[serde(default = "default_hedge")]
    pub hedge_after_ms: u64,
    /// With several routes: the least time between two moves of the
    /// messages' route (unless the one in use fails), seconds.
    #[serde(default = "default_dwell")]
    pub route_dwell_secs: u64,
    /// With several routes: alarms of this precedence or higher (9:
    /// critical) also go on a second route at once. Unset: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_send_precedence: Option<u8>,
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
    /// Checks the URLs and the route settings when the configuration is
    /// loaded.
    pub fn check(&self) -> Result<(), String> {
        crate::upstream::check_urls(&self.urls)?;
        if let Some(u) = self.bulk_urls.iter().find(|u| !self.urls.contains(u)) {
            return Err(format!(
                "upstream.bulk_urls: {u:?} is not one of upstream.urls"
            ));
        }
        if self.probe_secs == 0 {
            return Err("upstream.probe_secs: at least 1".into());
        }
        if self.hedge_after_ms < 50 {
            return Err(
                "upstream.hedge_after_ms: at least 50 (less would send most envelopes twice)"
                    .into(),
            );
        }
        if let Some(p) = self.multi_send_precedence
            && p > rs_protocol::model::MAX_PRECEDENCE
        {
            return Err(format!(
                "upstream.multi_send_precedence: {p} is not a precedence (0 to 9)"
            ));
        }
        Ok(())
    }

    /// The HTTP side, with `tls` towards the next hop.
    pub fn client(&self, tls: Option<rs_net::tls::TlsConfig>) -> UpstreamConfig {
        UpstreamConfig {
            urls: self.urls.clone(),
            routes: RouteChoice {
                probe_every: Duration::from_secs(self.probe_secs.max(1)),
                bulk: self
                    .bulk_urls
                    .iter()
                    .filter_map(|b| self.urls.iter().position(|u| u == b))
                    .collect(),
                dwell: Duration::from_secs(self.route_dwell_secs),
                hedge_after: Duration::from_millis(self.hedge_after_ms),
            },
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
            multi_send: self.multi_send_precedence,
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
fn default_probe() -> u64 {
    5
}
fn default_hedge() -> u64 {
    500
}
fn default_dwell() -> u64 {
    10
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
