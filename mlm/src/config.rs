//! The MLM's configuration (TOML), including its service modules.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rs_protocol::codec::Limits;
use rs_protocol::{ComponentKind, RsId};
use serde::{Deserialize, Serialize};

pub use crate::modules::{AggregateRule, FilterRule, Match, ModifyRule, RepeatRule};

/// `mlm.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This MLM's remote services ID, e.g. `acme.m1` (customer MLM) or
    /// `rs.m1` (farm member).
    pub id: String,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where Prometheus scrapes `/metrics` (plain HTTP), or `off`.
    #[serde(
        default = "default_metrics_listen",
        deserialize_with = "rs_node::metrics::listen_or_off"
    )]
    pub metrics_listen: Option<SocketAddr>,
    /// Where `spool.db` (custody, summaries, heartbeats) and `mlm.db`
    /// (aggregation queue) live.
    pub data_dir: PathBuf,
    /// The shared database of a farm of MLMs: a `postgres://` URL (the
    /// forms are the application server's `database`). Every member names
    /// the same database and the same `id`; the farm's back-channel queue,
    /// its routes and the IDs it has received are in the schema `mlm_<id>`
    /// there, so any member hands any component its messages and a held
    /// long poll on one member wakes when another queues for it. So are
    /// its spool, aggregation windows, download cache records, throttle
    /// counters and delivery notices (docs/configuration.md). Absent: files
    /// in `data_dir`.
    #[serde(default)]
    pub database: Option<String>,
    /// This member's name in a farm (with `database`): how the farm's
    /// status lists it. Default: the host's name and the listen port.
    #[serde(default)]
    pub member: Option<String>,
    pub upstream: UpstreamSection,
    /// Accept messages into this MLM's own durable spool and forward them
    /// later (for sites whose WAN is often down), instead of answering
    /// only once the upstream has accepted them.
    #[serde(default)]
    pub custody: bool,
    /// Seconds a stopping (or reloading) daemon gives what is in flight:
    /// requests being answered finish, and the sender delivers what it
    /// holds while the next hop takes it. The unit's `TimeoutStopSec`
    /// must be longer.
    #[serde(default = "rs_node::daemon::default_grace_secs")]
    pub shutdown_grace_secs: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    #[serde(default = "default_body_timeout")]
    pub body_timeout_secs: u64,
    /// Seconds after which a back-channel message handed to a next hop
    /// that has not acknowledged it is offered again (its reply may have
    /// been lost).
    #[serde(default = "default_offer_again")]
    pub offer_again_secs: u64,
    /// Envelopes handled at once above which replies advise callers to
    /// wait before their next POST (backpressure).
    #[serde(default = "default_busy_envelopes")]
    pub busy_envelopes: usize,
    /// Connections served at once (each proxy holds one for its long
    /// poll); more wait in the accept queue. Needs as many file
    /// descriptors (`LimitNOFILE` in the systemd unit).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Resident memory (MB) above which no new connection is accepted
    /// until it is back under (connections wait in the kernel's accept
    /// queue; proxies with a failover list move to another member).
    /// Absent: no bound but `max_connections`.
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    #[serde(default)]
    pub spool: SpoolSection,
    /// Decoder limits for what arrives (docs/protocol.md, Limits).
    #[serde(default)]
    pub limits: rs_node::ingress::LimitsSection,
    /// Discard messages that match.
    #[serde(default)]
    pub filter: Vec<FilterRule>,
    /// Change attributes of messages that match.
    #[serde(default)]
    pub modify: Vec<ModifyRule>,
    /// Replace similar alarms within a window by one summary.
    #[serde(default)]
    pub aggregate: Vec<AggregateRule>,
    /// Drop a message that repeats one seen within a window.
    #[serde(default)]
    pub drop_repeats: Vec<RepeatRule>,
    /// What may come in when (docs/configuration.md, Throttle).
    #[serde(default)]
    pub throttle: rs_node::throttle::ThrottleConfig,
    /// Uploads relayed through this MLM.
    #[serde(default)]
    pub bulk: crate::bulk::BulkSection,
    /// TLS with mutual authentication (docs/security.md), for the listener
    /// and the upstream client. Without it: plain HTTP, no identities.
    #[serde(default)]
    pub tls: Option<rs_net::tls::TlsConfig>,
    /// A one-time enrollment token: when `tls.cert` does not exist yet the
    /// MLM creates its key and obtains its certificate with it on start.
    #[serde(default)]
    pub enroll_token: Option<String>,
    /// Seal the messages this MLM makes itself (heartbeats, aggregated
    /// summaries, answers): docs/security.md, Payload seals. Needs `[tls]`.
    /// Messages relayed from below keep whatever seal they came with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<rs_net::seal::SealConfig>,
}

pub use rs_node::sections::UpstreamSection;
/// The MLM's `[spool]`: 1 GiB by default.
pub type SpoolSection = rs_node::sections::SpoolSection<1024>;

/// The MLM's `/metrics` port by default (the proxy's is 9471, the
/// server's 9473).
fn default_metrics_listen() -> Option<SocketAddr> {
    rs_node::metrics::loopback(9472)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8441))
}
fn default_heartbeat() -> u64 {
    60
}
fn default_body_timeout() -> u64 {
    60
}

impl Config {
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut p = rs_node::daemon::Problems::default();
        if let Some(id) = p.check(c.rs_id())
            && id.kind() != ComponentKind::Mlm
        {
            p.add(format!("id {:?} is not an MLM ID (like acme.m1)", c.id));
        }
        p.check(c.upstream.check());
        if let Some(d) = &c.database
            && !rs_store::sql::is_postgres_url(d)
        {
            p.add(format!(
                "database = {:?}: expected a postgres:// URL (without it the MLM keeps its \
                 back-channel queue in data_dir)",
                rs_store::sql::redact(d)
            ));
        }
        if c.seal.is_some() && c.tls.is_none() {
            p.add("[seal] needs [tls]: messages are sealed with this MLM's certificate");
        }
        // Build the modules once to report rule errors at load time.
        p.check(crate::modules::build(
            &c.filter,
            &c.modify,
            &c.drop_repeats,
            &c.aggregate,
        ));
        p.check(rs_node::throttle::Throttle::new(
            &c.throttle,
            std::sync::Arc::new(rs_protocol::time::SystemClock),
            None,
            None,
        ));
        p.into_result(c)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Where the back-channel queue is: the farm's schema in its PostgreSQL
    /// database (`mlm_` and the ID, `.` and `-` as `_`: several farms may
    /// share one database), or `outbox.db` in `data_dir`.
    pub fn queue_location(&self) -> rs_store::sql::Location {
        rs_store::sql::Location::choose(
            self.database.as_deref(),
            self.data_dir.join("outbox.db"),
            &self.farm_schema(""),
        )
    }

    /// Where the aggregation queue is: the farm's schema `mlm_<id>_agg`, or
    /// `mlm.db` in `data_dir`.
    pub fn aggregation_location(&self) -> rs_store::sql::Location {
        rs_store::sql::Location::choose(
            self.database.as_deref(),
            self.data_dir.join("mlm.db"),
            &self.farm_schema("_agg"),
        )
    }

    /// Where the bulk cache's records are: the farm's schema
    /// `mlm_<id>_cache`, or `cache.db` in `data_dir`.
    pub fn cache_location(&self) -> rs_store::sql::Location {
        rs_store::sql::Location::choose(
            self.database.as_deref(),
            self.data_dir.join("cache.db"),
            &self.farm_schema("_cache"),
        )
    }

    /// Where the bulk cache's files are: `[bulk] cache_dir`, or `cache` in
    /// `data_dir`.
    pub fn cache_dir(&self) -> std::path::PathBuf {
        self.bulk
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("cache"))
    }

    /// Where the spool is (custody, summaries, this MLM's own messages):
    /// the farm's schema `mlm_<id>_spool`, shared by its members, or
    /// `spool.db` in `data_dir`.
    pub fn spool_location(&self) -> rs_store::sql::Location {
        rs_store::sql::Location::choose(
            self.database.as_deref(),
            self.data_dir.join("spool.db"),
            &self.farm_schema("_spool"),
        )
    }

    /// Where the throttle's usage counters are: the farm's schema
    /// `mlm_<id>_throttle` (its members' counts add up), or `throttle.db` in
    /// `data_dir`.
    pub fn throttle_location(&self) -> rs_store::sql::Location {
        rs_store::sql::Location::choose(
            self.database.as_deref(),
            self.data_dir.join("throttle.db"),
            &self.farm_schema("_throttle"),
        )
    }

    /// `mlm_` and the ID (`.` and `-` as `_`), then `suffix`.
    fn farm_schema(&self, suffix: &str) -> String {
        format!("mlm_{}{suffix}", self.id.to_ascii_lowercase())
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    }

    /// This member's name in a farm (`member`, or the host's name and the
    /// listen port).
    pub fn member_name(&self) -> String {
        self.member
            .clone()
            .unwrap_or_else(|| rs_store::members::default_name(self.listen.port()))
    }

    /// How long an unacknowledged back-channel message waits before it is
    /// offered again.
    pub fn offer_again(&self) -> Duration {
        Duration::from_secs(self.offer_again_secs.max(1))
    }

    pub fn rs_id(&self) -> Result<RsId, String> {
        RsId::new(&self.id).map_err(|e| format!("id {:?}: {e}", self.id))
    }

    pub fn limits(&self) -> Limits {
        self.limits.limits()
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }

    /// [`Config::shutdown_grace_secs`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

fn default_offer_again() -> u64 {
    30
}

fn default_busy_envelopes() -> usize {
    256
}
fn default_max_connections() -> usize {
    4096
}
