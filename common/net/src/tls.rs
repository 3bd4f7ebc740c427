//! TLS (OpenSSL) for every listener and client between tiers: TLS 1.2 or
//! newer with Mozilla's "intermediate" ciphers, mutual authentication with
//! certificates from the provider's CA ([`crate::pki`]), and the CA's
//! revocation list enforced at every handshake a tier accepts.
//!
//! Servers ask for a client certificate but do not require one at the
//! handshake: a proxy that has not enrolled yet must still reach the
//! enrollment endpoint. Each endpoint then decides what it needs from the
//! [`crate::server::Caller`] (the tiers' endpoints require a component
//! certificate).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::{X509, X509Crl, X509Name};
use serde::{Deserialize, Serialize};

use crate::pki::{Identity, serial_hex};

/// `[tls]` in every daemon's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This component's certificate (PEM; may be followed by its chain).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The provider's CA certificate: the only root trusted.
    pub ca: PathBuf,
    /// The CA's revocation list (PEM). Reloaded when the file changes; an
    /// MLM also refreshes it from its upstream (`crl_refresh_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    /// How often an MLM or proxy fetches the revocation list from its
    /// upstream (and a server re-reads `crl`).
    #[serde(default = "default_crl_refresh")]
    pub crl_refresh_secs: u64,
    /// A proxy or MLM renews its certificate when less than this many days
    /// (or a third of its lifetime, whichever is less) remain.
    #[serde(default = "default_renew_before")]
    pub renew_before_days: u32,
}

fn default_crl_refresh() -> u64 {
    60
}

fn default_renew_before() -> u32 {
    30
}

impl TlsConfig {
    /// The files under `dir` that enrollment writes (`cert.pem`, `key.pem`,
    /// `ca.pem`, `crl.pem`).
    pub fn in_dir(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            crl: Some(dir.join("crl.pem")),
            crl_refresh_secs: default_crl_refresh(),
            renew_before_days: default_renew_before(),
        }
    }

    /// This component's identity, read from its certificate.
    pub fn identity(&self) -> Result<Identity, String> {
        let cert = crate::pki::read_cert(&self.cert)?;
        Identity::from_cert(&cert)
    }

    fn ca_cert(&self) -> Result<X509, String> {
        crate::pki::read_cert(&self.ca)
    }
}

/// The revoked serials in force, from the CA's signed CRL.
#[derive(Debug)]
pub struct Revocations {
    ca: X509,
    path: Option<PathBuf>,
    serials: RwLock<HashSet<String>>,
    /// The loaded list's thisUpdate (Unix seconds) and its file's mtime.
    loaded: Mutex<(i64, Option<SystemTime>)>,
    /// Connections closed, or requests refused, because the certificate
    /// they were opened with was revoked since (or came with a resumed
    /// session, which skips the handshake's check).
    pub cut: crate::metrics::IntCounter,
    /// Bumped each time a new list is put in force: open connections
    /// look again at the certificate they were opened with.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Revocations {
    /// Loads `path` if it exists.
    pub fn new(ca: X509, path: Option<PathBuf>) -> Result<Revocations, String> {
        let r = Revocations {
            ca,
            path,
            serials: RwLock::new(HashSet::new()),
            loaded: Mutex::new((i64::MIN, None)),
            cut: crate::metrics::counter(
                "tls_revoked_cut_total",
                "Connections closed, or requests refused, because their certificate was revoked since they opened.",
                &[],
            ),
            changed: tokio::sync::watch::Sender::new(0),
        };
        r.reload()?;
        Ok(r)
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.serials
            .read()
            .map(|s| s.contains(serial))
            .unwrap_or(true)
    }

    /// Woken each time a new list is put in force.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.serials.read().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a CRL (signed by our CA, not older than the one in force) and
    /// puts it in force; with a file configured, also writes it there.
    /// `Ok(false)` when it is the one already in force or older.
    pub fn install(&self, pem: &[u8]) -> Result<bool, String> {
        let changed = self.apply(pem)?;
        if changed && let Some(p) = &self.path {
            crate::pki::write_file(p, pem)?;
            if let Ok(mut l) = self.loaded.lock() {
                l.1 = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            }
        }
        Ok(changed)
    }

    /// Re-reads the file when it changed.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(p) = &self.path else {
            return Ok(false);
        };
        let Ok(mtime) = std::fs::metadata(p).and_then(|m| m.modified()) else {
            return Ok(false);
        };
        if self
            .loaded
            .lock()
            .map(|l| l.1 == Some(mtime))
            .unwrap_or(false)
        {
            return Ok(false);
        }
        let pem = crate::pki::read_file(p)?;
        let changed = self.apply(&pem)?;
        if let Ok(mut l) = self.loaded.lock() {
            l.1 = Some(mtime);
        }
        Ok(changed)
    }

    fn apply(&self, pem: &[u8]) -> Result<bool, String> {
        let crl = X509Crl::from_pem(pem).map_err(|e| format!("revocation list: {e}"))?;
        let key = self.ca.public_key().map_err(|e| format!("CA key: {e}"))?;
        if crl
            .issuer_name()
            .try_cmp(self.ca.subject_name())
            .map_err(|e| format!("revocation list: {e}"))?
            != std::cmp::Ordering::Equal
            || !crate::pki::SignedBy::signed_by(&*crl, &key)
        {
            return Err("the revocation list is not signed by our CA".into());
        }
        let this_update = asn1_unix(crl.last_update())?;
        let mut loaded = self.loaded.lock().map_err(|_| "revocations poisoned")?;
        if this_update < loaded.0 {
            return Ok(false);
        }
        let serials: HashSet<String> = crl
            .get_revoked()
            .map(|st| {
                st.iter()
                    .filter_map(|r| {
                        r.serial_number()
                            .to_bn()
                            .ok()
                            .and_then(|b| b.to_hex_str().ok().map(|s| s.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let n = serials.len();
        let mut current = self.serials.write().map_err(|_| "revocations poisoned")?;
        // Lists are dated to the second: one signed in the same second as
        // the list in force is taken only if it revokes more (revocations
        // are never undone, so an older list cannot pass for a newer one).
        if this_update == loaded.0
            && (serials.len() <= current.len() || !serials.is_superset(&current))
        {
            return Ok(false);
        }
        *current = serials;
        drop(current);
        loaded.0 = this_update;
        self.changed.send_modify(|v| *v += 1);
        tracing::info!("revocation list in force: {n} revoked");
        Ok(true)
    }
}

pub(crate) fn asn1_unix(t: &openssl::asn1::Asn1TimeRef) -> Result<i64, String> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).map_err(|e| e.to_string())?;
    let d = epoch.diff(t).map_err(|e| e.to_string())?;
    Ok(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

crate::counters! {
    /// Counters of a TLS listener.
    pub struct TlsStats {
        handshakes: "tls_handshakes_total", "TLS handshakes completed.";
        /// The handshake did not finish within the header timeout.
        timeout: "tls_handshake_failures_total" {reason = "timeout"},
            "TLS handshakes that failed, by reason.";
        /// No common version or cipher, not TLS at all, no certificate
        /// where one is required.
        protocol: "tls_handshake_failures_total" {reason = "protocol"},
            "TLS handshakes that failed, by reason.";
        /// A certificate not signed by the CA (or not verifiable).
        untrusted: "tls_handshake_failures_total" {reason = "untrusted"},
            "TLS handshakes that failed, by reason.";
        /// A certificate out of its validity period.
        expired: "tls_handshake_failures_total" {reason = "expired"},
            "TLS handshakes that failed, by reason.";
        /// A revoked certificate (in the handshake, or on a resumed
        /// session, which skips the handshake's check).
        revoked: "tls_handshake_failures_total" {reason = "revoked"},
            "TLS handshakes that failed, by reason.";
        /// Signed by the CA but not one of ours in form.
        identity: "tls_handshake_failures_total" {reason = "identity"},
            "TLS handshakes that failed, by reason.";
    }
}

impl TlsStats {
    /// Handshakes that failed, for any reason.
    pub fn handshakes_failed(&self) -> u64 {
        [
            &self.timeout,
            &self.protocol,
            &self.untrusted,
            &self.expired,
            &self.revoked,
            &self.identity,
        ]
        .iter()
        .map(|c| c.get())
        .sum()
    }

    /// Counts a handshake that failed, by `ssl`'s verification result
    /// (one the verify callback refused as revoked is counted there).
    pub fn failed(&self, ssl: &openssl::ssl::SslRef) {
        if REFUSED_AS_REVOKED.replace(false) {
            return;
        }
        // OpenSSL's X509_V_ERR_* codes (x509_vfy.h), a stable ABI.
        const NOT_YET_VALID: i32 = 9;
        const EXPIRED: i32 = 10;
        const REVOKED: i32 = 23;
        let c = match ssl.verify_result().as_raw() {
            0 => &self.protocol,
            NOT_YET_VALID | EXPIRED => &self.expired,
            REVOKED => &self.revoked,
            _ => &self.untrusted,
        };
        c.inc();
    }
}

thread_local! {
    /// Set by the verify callback when it refuses a revoked certificate
    /// (and counts it), taken by [`TlsStats::failed`] for the same
    /// handshake: the callback runs inside the poll of `accept` that then
    /// returns the failure, on the same thread, with no other task between.
    /// (OpenSSL's verify result cannot say "revoked" for us: setting it
    /// from the callback needs an unsafe constructor.)
    static REFUSED_AS_REVOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A TLS listener's context.
pub struct TlsServer {
    pub(crate) acceptor: SslAcceptor,
    pub revocations: Arc<Revocations>,
    pub stats: TlsStats,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("revoked", &self.revocations.len())
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    pub fn new(cfg: &TlsConfig) -> Result<Arc<TlsServer>, String> {
        let ca = cfg.ca_cert()?;
        let revocations = Arc::new(Revocations::new(ca, cfg.crl.clone())?);
        let e = |e: openssl::error::ErrorStack| format!("TLS: {e}");
        // TLS 1.2 and 1.3 only, ECDHE with AES-GCM or ChaCha20-Poly1305.
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(e)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(e)?;
        b.set_private_key_file(&cfg.key, SslFiletype::PEM)
            .map_err(|x| format!("{}: {x}", cfg.key.display()))?;
        b.set_certificate_chain_file(&cfg.cert)
            .map_err(|x| format!("{}: {x}", cfg.cert.display()))?;
        b.check_private_key().map_err(|x| {
            format!(
                "{} does not match {}: {x}",
                cfg.key.display(),
                cfg.cert.display()
            )
        })?;
        b.set_ca_file(&cfg.ca)
            .map_err(|x| format!("{}: {x}", cfg.ca.display()))?;
        b.set_client_ca_list(X509Name::load_client_ca_file(&cfg.ca).map_err(e)?);
        // Sessions may be resumed (TLS 1.2 session IDs, TLS 1.3 tickets;
        // Java and curl resume by default): without a session ID context
        // OpenSSL answers a resumption attempt with an internal-error
        // alert when client certificates are asked for. A resumed session
        // skips the verify callback below, so the accept loop checks the
        // certificate against the revocation list on every connection and
        // request as well (`server::serve_conn`).
        b.set_session_id_context(b"remote-services").map_err(e)?;
        let rev = revocations.clone();
        let stats = TlsStats::default();
        let revoked = stats.revoked.clone();
        b.set_verify_callback(SslVerifyMode::PEER, move |ok, ctx| {
            if !ok {
                return false;
            }
            if ctx.error_depth() == 0
                && let Some(c) = ctx.current_cert()
                && rev.is_revoked(&serial_hex(c))
            {
                revoked.inc();
                REFUSED_AS_REVOKED.set(true);
                return false;
            }
            true
        });
        Ok(Arc::new(TlsServer {
            acceptor: b.build(),
            revocations,
            stats,
        }))
    }
}

/// How long a client keeps an idle connection for reuse: well under the
/// servers' header timeout (`server::ServeConfig`, 10 s), which also closes
/// a keep-alive connection left idle that long. A client holding it longer
/// races that close: a request written just as the server closes is lost
/// mid-flight (`IncompleteMessage`), and a POST is not retried for it.
pub const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// A client for the tiers: trusts only the CA, presents this component's
/// certificate, TLS 1.2 or newer. `None` gives a plain-HTTP client.
pub fn client(cfg: Option<&TlsConfig>) -> Result<reqwest::ClientBuilder, String> {
    let Some(cfg) = cfg else {
        // Plain HTTP: no roots at all. (Left to itself, native-tls loads
        // the system's whole root store into every client: several MB of
        // resident memory in an idle proxy, for certificates it must never
        // trust anyway.)
        return Ok(reqwest::Client::builder()
            .tls_certs_only([])
            .pool_idle_timeout(POOL_IDLE));
    };
    let b = client_trusting(&cfg.ca)?;
    if !cfg.cert.exists() {
        // Not enrolled yet: the tiers will refuse what it sends (401) until
        // it is, and it keeps everything meanwhile.
        return Ok(b);
    }
    let cert = crate::pki::read_file(&cfg.cert)?;
    let key = crate::pki::read_file(&cfg.key)?;
    let id = reqwest::Identity::from_pkcs8_pem(&cert, &key)
        .map_err(|e| format!("{}: {e}", cfg.cert.display()))?;
    Ok(b.identity(id))
}

/// A client that trusts only the CA in `ca` and presents no certificate
/// (enrollment, before there is one).
pub fn client_trusting(ca: &Path) -> Result<reqwest::ClientBuilder, String> {
    let pem = crate::pki::read_file(ca)?;
    let root =
        reqwest::Certificate::from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([root])
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .pool_idle_timeout(POOL_IDLE))
}

/// `GET /rs/v1/crl`: the revocation list in force here (from `path`),
/// served to anyone: it is public and signed by the CA.
pub fn crl_route(
    path: Option<PathBuf>,
) -> impl warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    use warp::Filter as _;
    warp::path!("rs" / "v1" / "crl")
        .and(warp::get())
        .then(move || {
            let path = path.clone();
            async move {
                let Some(p) = path else {
                    return crate::refusal::Refusal::new(
                        http::StatusCode::NOT_FOUND,
                        "no revocation list here",
                    )
                    .response();
                };
                match tokio::fs::read(&p).await {
                    Ok(b) => {
                        let mut r = warp::reply::Response::new(b.into());
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/x-pem-file"),
                        );
                        r
                    }
                    Err(e) => crate::refusal::Refusal::new(
                        http::StatusCode::NOT_FOUND,
                        format!("no revocation list here: {e}"),
                    )
                    .response(),
                }
            }
        })
}
