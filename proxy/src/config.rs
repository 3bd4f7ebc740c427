//! The proxy's configuration (TOML).

use std::path::PathBuf;
use std::time::Duration;

use rs_protocol::RsId;
use serde::{Deserialize, Serialize};

/// `proxy.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This proxy's remote services ID, e.g. `acme.p1`. May be left out
    /// when it enrolls: the ID then comes with its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Where state lives: `spool.db` (outgoing messages) and `proxy.db`
    /// (integrators, support instances and their IDs).
    pub data_dir: PathBuf,
    /// The integrator API's Unix-domain socket.
    pub socket: PathBuf,
    /// The socket's permissions (octal): who may connect. Connecting needs
    /// write permission, so `0660` lets the owner and `socket_group` in.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// The socket's group (a name): integrators running as other users
    /// connect when they are in it. Left out: the daemon's own group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Also serve the integrator API on this loopback TCP address (for
    /// integrators that cannot use a Unix socket). Loopback only.
    #[serde(default)]
    pub api_listen: Option<std::net::SocketAddr>,
    /// Where Prometheus scrapes `/metrics` (plain HTTP), or `off`.
    #[serde(
        default = "default_metrics_listen",
        deserialize_with = "rs_node::metrics::listen_or_off",
        serialize_with = "rs_node::metrics::serialize_listen"
    )]
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub upstream: UpstreamSection,
    #[serde(default)]
    pub spool: SpoolSection,
    /// Seconds a stopping (or reloading) daemon gives what is in flight:
    /// requests being answered finish, and the sender delivers what it
    /// holds while the next hop takes it. The unit's `TimeoutStopSec`
    /// must be longer.
    #[serde(default = "rs_node::daemon::default_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Heartbeat interval until the upstream advises one.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// What may be sent when (docs/configuration.md, Throttle).
    #[serde(default)]
    pub throttle: rs_node::throttle::ThrottleConfig,
    /// Uploads (docs/configuration.md, Bulk transfers).
    #[serde(default)]
    pub bulk: crate::bulk::BulkSection,
    /// TLS with mutual authentication towards the upstream
    /// (docs/security.md). Without it: plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<rs_net::tls::TlsConfig>,
    /// A one-time enrollment token: when `tls.cert` does not exist yet the
    /// proxy creates its key and obtains its certificate and ID with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_token: Option<String>,
    /// Seal every message this proxy makes: sign it with its certificate,
    /// and with `encrypt_to`, encrypt it to the application server
    /// (docs/security.md, Payload seals). Needs `[tls]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<rs_net::seal::SealConfig>,
}

pub use rs_node::sections::UpstreamSection;
/// The proxy's `[spool]`: 256 MiB by default.
pub type SpoolSection = rs_node::sections::SpoolSection<256>;

/// The proxy's `/metrics` port by default (the MLM's is 9472, the
/// server's 9473).
fn default_metrics_listen() -> Option<std::net::SocketAddr> {
    rs_node::metrics::loopback(9471)
}

fn default_socket_mode() -> String {
    "0660".into()
}

fn default_heartbeat() -> u64 {
    60
}

impl Config {
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut p = rs_node::daemon::Problems::default();
        match (&c.id, &c.tls) {
            (Some(id), _) => {
                if let Some(rs) = p.check(RsId::new(id).map_err(|e| format!("id {id:?}: {e}")))
                    && rs.kind() != rs_protocol::ComponentKind::Proxy
                {
                    p.add(format!("id {id:?} is not a proxy ID (like acme.p1)"));
                }
            }
            // The ID comes with the certificate (enrolled, or to enroll).
            (None, Some(t)) if t.cert.exists() || c.enroll_token.is_some() => {}
            (None, _) => p.add(
                "id is required (or [tls] with an enroll_token: the ID then comes with the certificate)",
            ),
        }
        if c.seal.is_some() && c.tls.is_none() {
            p.add("[seal] needs [tls]: messages are sealed with this proxy's certificate");
        }
        p.check(c.upstream.check());
        p.check(c.socket_mode());
        if let Some(a) = c.api_listen
            && !a.ip().is_loopback()
        {
            p.add(format!(
                "api_listen {a}: the integrator API is served on loopback addresses only"
            ));
        }
        // Compiling checks every rule (zones, windows, rates).
        p.check(rs_node::throttle::Throttle::new(
            &c.throttle,
            std::sync::Arc::new(rs_protocol::time::SystemClock),
            None,
            None,
        ));
        if c.upstream.max_messages == 0 {
            p.add("upstream.max_messages must be at least 1");
        }
        if c.heartbeat_secs == 0 {
            p.add("heartbeat_secs must be at least 1");
        }
        p.into_result(c)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The configured ID, or the one in the certificate.
    pub fn rs_id(&self) -> Result<RsId, String> {
        match (&self.id, &self.tls) {
            (Some(id), _) => RsId::new(id).map_err(|e| format!("id {id:?}: {e}")),
            (None, Some(t)) if t.cert.exists() => t
                .identity()?
                .component()
                .ok_or_else(|| format!("{} is not a component certificate", t.cert.display())),
            (None, _) => Err("no id configured and no certificate to take it from".into()),
        }
    }

    /// `socket_mode` as permission bits.
    pub fn socket_mode(&self) -> Result<u32, String> {
        let m =
            u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).map_err(|_| {
                format!(
                    "socket_mode {:?}: octal permissions like \"0660\"",
                    self.socket_mode
                )
            })?;
        if m > 0o777 || m & 0o600 != 0o600 {
            return Err(format!(
                "socket_mode {:?}: the owner needs read and write (0600 to 0777)",
                self.socket_mode
            ));
        }
        Ok(m)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    /// [`Config::shutdown_grace_secs`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
