//! The application server's configuration (TOML).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rs_protocol::RsId;
use rs_protocol::codec::Limits;
use serde::Deserialize;

/// `appserver.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This server's remote services ID (customer `rs`), e.g. `rs.a1`.
    pub id: String,
    /// Where to listen for envelopes and control requests.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where Prometheus scrapes `/metrics` (plain HTTP), or `off`.
    #[serde(
        default = "default_metrics_listen",
        deserialize_with = "rs_node::metrics::listen_or_off"
    )]
    pub metrics_listen: Option<SocketAddr>,
    /// Resident memory (MB) above which no new connection is accepted
    /// until it is back under (they wait in the kernel's accept queue).
    /// Absent: no bound.
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    /// Where local files live: the SQLite database `appserver.db` (unless
    /// `database` names a PostgreSQL server), uploads in progress,
    /// published files, the throttle's usage counters.
    pub data_dir: PathBuf,
    /// The shared database of a farm of servers: a `postgres://` URL
    /// (tokio-postgres's forms: `postgres://user:password@host:port/db`,
    /// `?sslmode=...` and other parameters as libpq spells them). Every
    /// member of the farm names the same database; the server's tables
    /// are in the schema `appserver` there. Absent: SQLite in `data_dir`.
    #[serde(default)]
    pub database: Option<String>,
    /// This member's name in a farm (with `database`): how the farm's view
    /// lists it. Default: the host's name and the listen port.
    #[serde(default)]
    pub member: Option<String>,
    /// Days stored messages (and the duplicate-detection IDs) are kept.
    #[serde(default = "default_retention")]
    pub retention_days: u32,
    /// Seconds a stopping (or reloading) daemon gives what is in flight:
    /// requests being answered finish, and the sender delivers what it
    /// holds while the next hop takes it. The unit's `TimeoutStopSec`
    /// must be longer.
    #[serde(default = "rs_node::daemon::default_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Heartbeat interval every component is told to use.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// Seconds an envelope body may take to arrive.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_secs: u64,
    #[serde(default)]
    pub limits: rs_node::ingress::LimitsSection,
    /// What may come in when (docs/configuration.md, Throttle). Replaced at
    /// run time through the control API (kept in appserver.db).
    #[serde(default)]
    pub throttle: rs_node::throttle::ThrottleConfig,
    /// Seconds after which a back-channel message handed to a next hop
    /// that has not acknowledged it is offered again (its reply may have
    /// been lost).
    #[serde(default = "default_offer_again")]
    pub offer_again_secs: u64,
    /// Seconds between the samples the portal's charts draw (they keep
    /// two hours' worth at 15 s: 480 samples).
    #[serde(default = "default_chart_sample")]
    pub chart_sample_secs: u64,
    /// A proxy or MLM silent for this many heartbeat intervals is late...
    #[serde(default = "default_late_after")]
    pub heartbeat_late_after: u32,
    /// ...and after this many, failed (each change raises a notification).
    #[serde(default = "default_failed_after")]
    pub heartbeat_failed_after: u32,
    /// Processors taking up peripheral tasks (webhook deliveries).
    #[serde(default = "default_processors")]
    pub processors: usize,
    /// A task taken by a processor that neither completes nor fails it
    /// within this many seconds (it died) is taken up again.
    #[serde(default = "default_visibility")]
    pub task_visibility_secs: u64,
    /// Attempts before a task goes to the failed-task queue.
    #[serde(default = "default_max_attempts")]
    pub task_max_attempts: u32,
    /// How long a webhook may take to answer one delivery.
    #[serde(default = "default_webhook_timeout")]
    pub webhook_timeout_secs: u64,
    /// Envelopes handled at once above which replies advise callers to
    /// wait before their next POST (backpressure).
    #[serde(default = "default_busy_envelopes")]
    pub busy_envelopes: usize,
    /// Built-in service modules (alarm notifiers, XML exports).
    #[serde(default)]
    pub modules: Vec<crate::modules::ModuleConfig>,
    /// Bulk uploads: limits and how long grants last.
    #[serde(default)]
    pub bulk: crate::bulk::BulkConfig,
    /// TLS with mutual authentication (docs/security.md). Without it the
    /// server speaks plain HTTP and checks no identities (loopback
    /// benchmarks only).
    #[serde(default)]
    pub tls: Option<rs_net::tls::TlsConfig>,
    /// The provider's CA, for enrollment and revocation through the
    /// control API (docs/security.md).
    #[serde(default)]
    pub ca: Option<CaSection>,
    /// Payload seals (docs/security.md, Payload seals): sealed messages
    /// are always opened and checked; `require` refuses unsealed ones.
    #[serde(default)]
    pub seal: SealSection,
}

/// `[seal]` of the application server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealSection {
    /// `none` (the default), `signed` or `encrypted`.
    #[serde(default)]
    pub require: rs_net::seal::Require,
}

/// `[ca]`: where the CA lives and what it issues.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSection {
    /// The directory `rsctl ca init` created.
    pub dir: PathBuf,
    /// Days a certificate issued at enrollment is valid.
    #[serde(default = "default_cert_days")]
    pub cert_days: u32,
}

fn default_cert_days() -> u32 {
    365
}

/// The server's `/metrics` port by default (the proxy's is 9471, the
/// MLM's 9472).
fn default_metrics_listen() -> Option<SocketAddr> {
    rs_node::metrics::loopback(9473)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8440))
}
fn default_retention() -> u32 {
    30
}
fn default_heartbeat() -> u64 {
    60
}
fn default_body_timeout() -> u64 {
    60
}

impl Config {
    /// Parses and checks a configuration document.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut p = rs_node::daemon::Problems::default();
        p.check(c.rs_id());
        if c.retention_days == 0 {
            p.add("retention_days must be at least 1");
        }
        if c.heartbeat_secs == 0 {
            p.add("heartbeat_secs must be at least 1");
        }
        if let Some(d) = &c.database
            && !rs_store::sql::is_postgres_url(d)
        {
            p.add(format!(
                "database = {:?}: expected a postgres:// URL (without it the server uses \
                 SQLite in data_dir)",
                rs_store::sql::redact(d)
            ));
        }
        let mut names = std::collections::HashSet::new();
        for m in &c.modules {
            p.check(m.check());
            if !names.insert(m.name.as_str()) {
                p.add(format!("two modules are named {:?}", m.name));
            }
        }
        p.into_result(c)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Where the store's tables are: the farm's PostgreSQL database, or
    /// `appserver.db` in `data_dir`.
    pub fn store_location(&self) -> rs_store::sql::Location {
        rs_store::sql::Location::choose(
            self.database.as_deref(),
            self.data_dir.join("appserver.db"),
            "appserver",
        )
    }

    /// Where the throttle's usage counters are: the farm's schema
    /// `appserver_throttle` (its members' counts add up), or `throttle.db`
    /// in `data_dir`.
    pub fn throttle_location(&self) -> rs_store::sql::Location {
        rs_store::sql::Location::choose(
            self.database.as_deref(),
            self.data_dir.join("throttle.db"),
            "appserver_throttle",
        )
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

    /// [`Config::shutdown_grace_secs`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.retention_days) * 86_400)
    }
}

fn default_offer_again() -> u64 {
    30
}

fn default_busy_envelopes() -> usize {
    256
}

fn default_processors() -> usize {
    4
}
fn default_visibility() -> u64 {
    60
}
fn default_max_attempts() -> u32 {
    8
}
fn default_webhook_timeout() -> u64 {
    10
}
fn default_chart_sample() -> u64 {
    15
}

fn default_late_after() -> u32 {
    2
}
fn default_failed_after() -> u32 {
    5
}
