//! The server's side of security (docs/security.md): enrollment of new
//! components with one-time tokens, the revocation list, who may use the
//! control API and for which customers, and the audit log of everything
//! done through it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openssl::x509::X509Req;
use rs_net::pki::{CaError, CertSpec, Identity, Role};
use rs_net::server::{Peer, Refusal};
use rs_node::ingress::xml_response;
use rs_protocol::codec::XmlOut;
use rs_protocol::{ComponentKind, CustomerId, RsId, Timestamp};
use rs_store::db::DbError;
use warp::Filter;

use crate::AppServer;

/// The customers an admin may see and command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grants {
    /// Every customer, and the provider-wide settings.
    All,
    Some(Vec<String>),
}

impl Grants {
    /// The customers granted (`None`: every customer), as the store
    /// selects by them.
    pub fn customers(&self) -> Option<Vec<String>> {
        match self {
            Grants::All => None,
            Grants::Some(v) => Some(v.clone()),
        }
    }

    /// From an admin certificate's O field: `*`, or customer IDs separated
    /// by commas.
    pub fn parse(o: &str) -> Grants {
        if o.trim() == "*" {
            return Grants::All;
        }
        Grants::Some(
            o.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }

    pub fn customer(&self, c: &str) -> bool {
        match self {
            Grants::All => true,
            Grants::Some(v) => v.iter().any(|x| x == c),
        }
    }

    pub fn component(&self, id: &RsId) -> bool {
        self.customer(id.customer().as_str())
    }

    pub fn is_all(&self) -> bool {
        *self == Grants::All
    }

    /// The refusal of an action on `what` (a customer or component).
    pub fn refuse(what: &str) -> warp::Rejection {
        warp::reject::custom(Refusal::new(
            http::StatusCode::FORBIDDEN,
            format!("not granted: {what}"),
        ))
    }
}

/// Who is using the control API.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The certificate's CN, or `local` on a plain listener.
    pub name: String,
    pub grants: Grants,
}

fn admin_of(peer: &Peer) -> Result<Admin, Refusal> {
    match peer {
        // Plain HTTP (no TLS configured): nobody is authenticated, so the
        // API is as open as the listener; docs/security.md says to keep
        // such a server on loopback.
        Peer::Tcp(_) | Peer::Local => Ok(Admin {
            name: "local".into(),
            grants: Grants::All,
        }),
        Peer::Tls(_, None) => Err(Refusal::new(
            http::StatusCode::UNAUTHORIZED,
            "the control API needs an admin certificate",
        )),
        Peer::Tls(_, Some(id)) if id.role == Role::Admin => Ok(Admin {
            name: id.name.clone(),
            grants: Grants::parse(&id.customer),
        }),
        Peer::Tls(_, Some(id)) => Err(Refusal::new(
            http::StatusCode::FORBIDDEN,
            format!("{} is a component, not an admin", id.name),
        )),
    }
}

/// The admin calling (for handlers that scope what they show or do by the
/// admin's grants). Every control route takes this or [`provider`]: the
/// access rule lives on the route, so it applies to exactly the paths the
/// router matches (a path-prefix test beside the router let
/// `/rs/v1/status/` through while `/rs/v1/status` was checked).
pub fn admin(
    app: &Arc<AppServer>,
) -> impl Filter<Extract = (Admin,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let app = app.clone();
    rs_net::server::peer()
        .and(warp::header::optional::<String>("authorization"))
        .and_then(move |p: Peer, auth: Option<String>| {
            let app = app.clone();
            async move {
                caller(&app, &p, auth.as_deref())
                    .await
                    .map_err(warp::reject::custom)
            }
        })
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer(authorization: &str) -> Option<&str> {
    authorization
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Who is calling: the admin certificate presented, else the API token
/// (`Authorization: Bearer`, [`crate::tokens`]), else on a plain listener
/// `local`. A component's certificate is never an admin, token or not.
pub async fn caller(
    app: &AppServer,
    peer: &Peer,
    authorization: Option<&str>,
) -> Result<Admin, Refusal> {
    match (peer, authorization.and_then(bearer)) {
        (Peer::Tls(_, Some(_)), _) | (_, None) => admin_of(peer),
        (_, Some(token)) => token_admin(app, token).await,
    }
}

/// An admin granted every customer: for what applies to all customers
/// (throttle rules, subscriptions and their tasks, changes to groups,
/// published files, exports across customers, the CA's certificates, API
/// tokens).
pub fn provider(
    app: &Arc<AppServer>,
) -> impl Filter<Extract = (Admin,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    admin(app).and_then(|a: Admin| async move {
        if a.grants.is_all() {
            Ok(a)
        } else {
            Err(Grants::refuse("this needs an admin of every customer"))
        }
    })
}

/// Stands before every route: anything under the control API needs an
/// admin (defence in depth: each control route also names whom it serves,
/// [`admin`] or [`provider`], and scopes what it shows by the grants).
pub fn gate(
    app: &Arc<AppServer>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let app = app.clone();
    rs_net::server::peer()
        .and(warp::path::full())
        .and(warp::header::optional::<String>("authorization"))
        .and_then(
            move |p: Peer, path: warp::path::FullPath, auth: Option<String>| {
                let app = app.clone();
                async move {
                    if path.as_str().starts_with("/rs/v1/control/") {
                        caller(&app, &p, auth.as_deref())
                            .await
                            .map_err(warp::reject::custom)?;
                    }
                    Ok::<(), warp::Rejection>(())
                }
            },
        )
        .untuple_one()
}

/// The admin a token's requests are audited as.
pub fn token_admin_name(token: &str) -> String {
    format!("token:{token}")
}

/// The admin whose API token ([`crate::tokens`]) this is, if it is good
/// now.
pub async fn token_admin(app: &AppServer, secret: &str) -> Result<Admin, Refusal> {
    let now = app.clock.now().as_millis();
    match app.store.token_by_hash(sha256_hex(secret), now).await {
        Ok(Some(t)) => Ok(Admin {
            name: token_admin_name(&t.name),
            grants: Grants::parse(&t.customers),
        }),
        Ok(None) => Err(Refusal::new(
            http::StatusCode::UNAUTHORIZED,
            "unknown, revoked or expired API token",
        )),
        Err(e) => Err(Refusal::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!("the token could not be looked up: {e}"),
        )),
    }
}

pub use crate::store::security::AuditRow;

pub(crate) fn sha256_hex(s: &str) -> String {
    openssl::sha::sha256(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn new_token() -> Result<String, String> {
    random_secret("rse_", 24)
}

/// `prefix` and `n` random bytes (OpenSSL's generator), base64url: the
/// enrollment tokens, API tokens, portal session cookies and their CSRF
/// tokens.
pub(crate) fn random_secret(prefix: &str, n: usize) -> Result<String, String> {
    use base64::Engine as _;
    let mut b = vec![0u8; n];
    openssl::rand::rand_bytes(&mut b).map_err(|e| format!("openssl: {e}"))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    ))
}

/// An enrollment token being made.
#[derive(Debug, Clone)]
pub struct NewEnrollment {
    pub customer: CustomerId,
    pub kind: ComponentKind,
    /// The ID the component gets (re-enrollment, or an MLM); `None`: the
    /// next free ID of its kind under the customer.
    pub component: Option<RsId>,
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub ttl: Duration,
}

/// Why an enrollment failed.
#[derive(Debug)]
pub enum EnrollError {
    /// Unknown, used or expired token.
    Token,
    Bad(String),
    Db(DbError),
    /// The CA could not sign or record (its files, its database): a
    /// server fault.
    Ca(String),
}

impl From<CaError> for EnrollError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::Refused(t) => EnrollError::Bad(t),
            CaError::Fault(t) => EnrollError::Ca(t),
        }
    }
}

impl AppServer {
    /// Makes a one-time enrollment token; returns it with its expiry.
    pub async fn create_enrollment(
        &self,
        e: NewEnrollment,
        by: &str,
    ) -> Result<(String, Timestamp), EnrollError> {
        if self.ca.is_none() {
            return Err(EnrollError::Bad(
                "this server has no [ca] configured".into(),
            ));
        }
        if !matches!(e.kind, ComponentKind::Proxy | ComponentKind::Mlm) {
            return Err(EnrollError::Bad("only proxies and MLMs enroll".into()));
        }
        if let Some(c) = &e.component
            && (c.customer() != e.customer || c.kind() != e.kind)
        {
            return Err(EnrollError::Bad(format!(
                "{c} is not a {} of customer {}",
                e.kind.as_str(),
                e.customer.as_str()
            )));
        }
        if e.kind == ComponentKind::Mlm && e.component.is_none() {
            return Err(EnrollError::Bad(
                "an MLM's enrollment names its ID (component=...)".into(),
            ));
        }
        let token = new_token().map_err(EnrollError::Ca)?;
        let now = self.clock.now();
        let expires = now.as_millis() + e.ttl.as_millis() as i64;
        self.store
            .add_enrollment(crate::store::security::NewEnrollment {
                token_hash: sha256_hex(&token),
                customer: e.customer.as_str().to_owned(),
                kind: e.kind.as_str().to_owned(),
                component: e.component.as_ref().map(|c| c.to_string()),
                dns: e.dns.join(","),
                ips: e
                    .ips
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                created: now.as_millis(),
                created_by: by.to_owned(),
                expires,
            })
            .await
            .map_err(EnrollError::Db)?;
        Ok((
            token,
            Timestamp::from_millis(expires).unwrap_or_else(Timestamp::now),
        ))
    }

    /// Redeems a token for a certificate of the key in `csr`.
    pub async fn enroll(&self, token: &str, csr: &[u8]) -> Result<Vec<u8>, EnrollError> {
        let Some(ca) = self.ca.clone() else {
            return Err(EnrollError::Bad(
                "this server enrolls nobody: no [ca]".into(),
            ));
        };
        let req = X509Req::from_pem(csr)
            .map_err(|e| EnrollError::Bad(format!("not a PEM signing request: {e}")))?;
        let key = req
            .public_key()
            .map_err(|e| EnrollError::Bad(format!("signing request key: {e}")))?;
        if !rs_net::pki::SignedBy::signed_by(&*req, &key) {
            return Err(EnrollError::Bad(
                "the signing request's signature does not match its key".into(),
            ));
        }
        let hash = sha256_hex(token);
        let now = self.clock.now().as_millis();
        let days = self.cfg.ca.as_ref().map_or(365, |c| c.cert_days);
        // A token that cannot be good costs a read, never a write (a flood
        // of guesses does not queue behind the ingest transactions).
        let live = self
            .store
            .enrollment_live(hash.clone(), now)
            .await
            .map_err(EnrollError::Db)?;
        if !live {
            return Err(EnrollError::Token);
        }
        let pem = self
            .store
            .redeem_enrollment(hash, now, move |r| {
                let mut spec = match RsId::new(r.id.clone()) {
                    Ok(rs) => CertSpec::component(&rs, days),
                    Err(e) => return Err(EnrollError::Bad(format!("{}: {e}", r.id))),
                };
                spec.dns = r
                    .dns
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                spec.ips = r.ips.split(',').filter_map(|s| s.parse().ok()).collect();
                // Signed inside the transaction: the token is spent only
                // with a certificate issued for it.
                let cert = ca.sign_request(&spec, &req)?;
                let serial = rs_net::pki::serial_hex(&cert);
                let pem = cert
                    .to_pem()
                    .map_err(|e| EnrollError::Bad(format!("openssl: {e}")))?;
                Ok((pem, serial))
            })
            .await
            .map_err(EnrollError::Db)?
            .ok_or(EnrollError::Token)??;
        Ok(pem)
    }

    /// Renews a component's certificate (`rs_net::enroll` module docs):
    /// `body` is a PEM PKCS #7 SignedData over a signing request for the
    /// new key, signed with the component's current certificate, which
    /// must be this CA's, a component's, valid now and not revoked. The new
    /// certificate names the same ID, customer and addresses.
    pub async fn renew(&self, body: &[u8]) -> Result<Vec<u8>, EnrollError> {
        use openssl::pkcs7::Pkcs7;
        let Some(ca) = self.ca.clone() else {
            return Err(EnrollError::Bad(
                "this server renews nothing: no [ca]".into(),
            ));
        };
        let bad = |t: &str| EnrollError::Bad(t.to_owned());
        let p7 = Pkcs7::from_pem(body).map_err(|_| bad("not a PEM PKCS #7 SignedData"))?;
        let old = rs_net::pki::sole_signer(&p7, "renewal").map_err(EnrollError::Bad)?;
        let ca_key = ca
            .cert()
            .public_key()
            .map_err(|e| EnrollError::Bad(e.to_string()))?;
        if !rs_net::pki::SignedBy::signed_by(&*old, &ca_key) {
            return Err(bad("the signer's certificate is not issued by this CA"));
        }
        let who = Identity::from_cert(&old).map_err(EnrollError::Bad)?;
        let Some(id) = who.component() else {
            return Err(bad("only a component's certificate is renewed this way"));
        };
        let now = openssl::asn1::Asn1Time::days_from_now(0)
            .map_err(|e| EnrollError::Bad(e.to_string()))?;
        if old.not_before() > now || old.not_after() < now {
            return Err(bad("the signer's certificate is not valid now"));
        }
        if self
            .tls
            .as_ref()
            .is_some_and(|t| t.revocations.is_revoked(&who.serial))
        {
            return Err(bad("the signer's certificate is revoked"));
        }
        // The signature (the chain was checked above).
        let csr = rs_net::pki::signed_content(&p7)
            .map_err(EnrollError::Bad)?
            .ok_or_else(|| bad("the signature does not verify"))?;
        let req = X509Req::from_pem(&csr)
            .map_err(|e| EnrollError::Bad(format!("not a PEM signing request: {e}")))?;
        let mut spec = CertSpec::component(&id, self.cfg.ca.as_ref().map_or(365, |c| c.cert_days));
        if let Some(names) = old.subject_alt_names() {
            for n in &names {
                if let Some(d) = n.dnsname() {
                    spec.dns.push(d.to_owned());
                }
                match n.ipaddress() {
                    Some(&[a, b, c, d]) => {
                        spec.ips.push(std::net::Ipv4Addr::new(a, b, c, d).into())
                    }
                    Some(v6) => {
                        if let Ok(o) = <[u8; 16]>::try_from(v6) {
                            spec.ips.push(std::net::Ipv6Addr::from(o).into());
                        }
                    }
                    None => {}
                }
            }
        }
        let old_serial = who.serial;
        let cert = tokio::task::spawn_blocking(move || ca.sign_request(&spec, &req))
            .await
            .map_err(|e| EnrollError::Ca(e.to_string()))??;
        tracing::info!(
            "renewed the certificate of {id}: {old_serial} -> {}",
            rs_net::pki::serial_hex(&cert)
        );
        cert.to_pem()
            .map_err(|e| EnrollError::Bad(format!("openssl: {e}")))
    }

    /// Revokes certificates (by serial, or every live one of a component)
    /// and puts the new list in force here at once. Returns the serials
    /// revoked with their holders.
    pub fn revoke(
        &self,
        serial: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<(String, String)>, CaError> {
        let Some(ca) = &self.ca else {
            return Err(CaError::Refused(
                "this server has no [ca] configured".into(),
            ));
        };
        let targets: Vec<(String, String)> = match (serial, name) {
            (Some(s), _) => {
                let s = s.trim().to_ascii_uppercase();
                let all = ca.list(None)?;
                let Some(c) = all.into_iter().find(|c| c.serial == s) else {
                    return Err(CaError::Refused(format!("no certificate with serial {s}")));
                };
                vec![(c.serial, c.name)]
            }
            (None, Some(n)) => ca
                .list(Some(n))?
                .into_iter()
                .filter(|c| c.revoked_at.is_none())
                .map(|c| (c.serial, c.name))
                .collect(),
            (None, None) => {
                return Err(CaError::Refused(
                    "say which: serial=... or component=...".into(),
                ));
            }
        };
        let mut done = Vec::new();
        for (s, n) in targets {
            if ca.revoke(&s, "revoked through the control API")? {
                done.push((s, n));
            }
        }
        self.reload_crl();
        Ok(done)
    }

    /// Re-reads the revocation list (the configured file, or the CA's:
    /// [`AppServer::open`] makes that the configured one).
    pub fn reload_crl(&self) {
        if let Some(t) = &self.tls
            && let Err(e) = t.revocations.reload()
        {
            tracing::warn!("revocation list: {e}");
        }
    }

    /// The audit log, newest first.
    pub async fn audit(
        &self,
        admin: Option<String>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, DbError> {
        self.store.audit_log(admin, before, limit).await
    }
}

/// `POST /rs/v1/enroll` and `GET /rs/v1/crl`: open to components without
/// a certificate (yet).
pub fn public_routes(
    app: Arc<AppServer>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let enroll = {
        let app = app.clone();
        rs_net::enroll::request().then(move |auth: Option<String>, body: bytes::Bytes| {
            let app = app.clone();
            async move {
                let token = auth
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(str::trim)
                    .unwrap_or("");
                let refuse = |s, t: String| Refusal::new(s, t).response();
                // A renewal is signed by the certificate it renews; an
                // enrollment carries its token.
                let renewal = token.is_empty() && body.starts_with(b"-----BEGIN PKCS7-----");
                if token.is_empty() && !renewal {
                    return refuse(
                        http::StatusCode::UNAUTHORIZED,
                        "an enrollment token is required (Authorization: Bearer ...)".into(),
                    );
                }
                let (outcome, done, refused_as) = if renewal {
                    (
                        app.renew(&body).await,
                        &app.stats.renewed,
                        http::StatusCode::FORBIDDEN,
                    )
                } else {
                    (
                        app.enroll(token, &body).await,
                        &app.stats.enrolled,
                        http::StatusCode::BAD_REQUEST,
                    )
                };
                match outcome {
                    Ok(pem) => {
                        done.inc();
                        let mut r = warp::reply::Response::new(pem.into());
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/x-pem-file"),
                        );
                        r
                    }
                    Err(EnrollError::Token) => {
                        app.stats.enroll_refused.inc();
                        refuse(
                            http::StatusCode::UNAUTHORIZED,
                            "unknown, used or expired enrollment token".into(),
                        )
                    }
                    Err(EnrollError::Bad(e)) => {
                        app.stats.enroll_refused.inc();
                        refuse(refused_as, e)
                    }
                    Err(EnrollError::Db(e)) => {
                        tracing::error!("enrollment: {e}");
                        refuse(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                    }
                    Err(EnrollError::Ca(e)) => {
                        tracing::error!("enrollment: the CA failed: {e}");
                        refuse(
                            http::StatusCode::INTERNAL_SERVER_ERROR,
                            format!("the CA failed: {e}"),
                        )
                    }
                }
            }
        })
    };
    let path = app
        .cfg
        .tls
        .as_ref()
        .and_then(|t| t.crl.clone())
        .or_else(|| app.cfg.ca.as_ref().map(|c| c.dir.join("crl.pem")));
    enroll.or(rs_net::tls::crl_route(path)).unify()
}

fn bad(text: impl Into<String>) -> warp::reply::Response {
    Refusal::new(http::StatusCode::BAD_REQUEST, text).response()
}

/// A CA error as an answer: the caller's mistake is `400`; the CA's own
/// failure is a server fault, `500`, and logged.
fn ca_failed(what: &str, e: CaError) -> warp::reply::Response {
    match e {
        CaError::Refused(t) => bad(t),
        CaError::Fault(t) => {
            tracing::error!("{what}: the CA failed: {t}");
            Refusal::new(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("the CA failed: {t}"),
            )
            .response()
        }
    }
}

/// `/rs/v1/control/enrollments`, `/revoke`, `/certificates`, `/audit`.
pub fn control_routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let enroll = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "enrollments")
            .and(warp::post())
            .and(admin(&app))
            .and(warp::query::<HashMap<String, String>>())
            .then(move |a: Admin, q: HashMap<String, String>| {
                let app = app.clone();
                async move { create_enrollment(&app, &a, &q).await }
            })
    };
    let revoke = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "revoke")
            .and(warp::post())
            .and(admin(&app))
            .and(warp::query::<HashMap<String, String>>())
            .then(move |a: Admin, q: HashMap<String, String>| {
                let app = app.clone();
                on_blocking_thread(move || revoke(&app, &a, &q))
            })
    };
    let certs = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "certificates")
            .and(warp::get())
            .and(provider(&app))
            .and(warp::query::<HashMap<String, String>>())
            .then(move |_: Admin, q: HashMap<String, String>| {
                let app = app.clone();
                on_blocking_thread(move || certificates(&app, &q))
            })
    };
    let audit = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "audit")
            .and(warp::get())
            .and(admin(&app))
            .and(warp::query::<HashMap<String, String>>())
            .then(move |a: Admin, q: HashMap<String, String>| {
                let app = app.clone();
                async move { audit(&app, &a, &q).await }
            })
    };
    enroll
        .or(revoke)
        .unify()
        .or(certs)
        .unify()
        .or(audit)
        .unify()
        .boxed()
}

async fn create_enrollment(
    app: &AppServer,
    a: &Admin,
    q: &HashMap<String, String>,
) -> warp::reply::Response {
    let component = match q.get("component").map(|c| RsId::new(c.clone())) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => return bad(format!("component: {e}")),
        None => None,
    };
    let customer = match (q.get("customer"), &component) {
        (Some(c), _) => match CustomerId::new(c.clone()) {
            Ok(c) => c,
            Err(e) => return bad(format!("customer: {e}")),
        },
        (None, Some(c)) => c.customer(),
        (None, None) => return bad("say for whom: customer=... or component=..."),
    };
    if !a.grants.customer(customer.as_str()) {
        return Refusal::new(
            http::StatusCode::FORBIDDEN,
            format!("not granted: customer {}", customer.as_str()),
        )
        .response();
    }
    let kind = match q.get("kind").map(String::as_str) {
        None => component.as_ref().map_or(ComponentKind::Proxy, RsId::kind),
        Some(k) => match ComponentKind::parse(k) {
            Some(k) => k,
            None => return bad(format!("kind {k:?}: proxy or mlm")),
        },
    };
    let ttl = match q.get("ttl-secs").map(|t| t.parse::<u64>()) {
        None => Duration::from_secs(7 * 86_400),
        Some(Ok(t)) if t > 0 => Duration::from_secs(t),
        _ => return bad("ttl-secs: a positive number"),
    };
    let split = |k: &str| -> Vec<String> {
        q.get(k)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut ips = Vec::new();
    for ip in split("ip") {
        match ip.parse() {
            Ok(i) => ips.push(i),
            Err(e) => return bad(format!("ip {ip:?}: {e}")),
        }
    }
    let e = NewEnrollment {
        customer: customer.clone(),
        kind,
        component: component.clone(),
        dns: split("dns"),
        ips,
        ttl,
    };
    match app.create_enrollment(e, &a.name).await {
        Ok((token, expires)) => {
            let mut buf = Vec::new();
            let mut x = XmlOut::document(&mut buf);
            x.open("enrollment")
                .attr("token", &token)
                .attr("customer", customer.as_str())
                .attr("kind", kind.as_str())
                .attr_opt("component", component.as_ref().map(RsId::as_str))
                .attr_ts("expires", expires)
                .empty()
                .newline();
            xml_response(buf)
        }
        Err(EnrollError::Db(e)) => {
            tracing::error!("enrollment token: {e}");
            Refusal::new(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).response()
        }
        Err(EnrollError::Ca(e)) => ca_failed("enrollment token", CaError::Fault(e)),
        Err(EnrollError::Bad(e)) => bad(e),
        Err(EnrollError::Token) => bad("no token"),
    }
}

/// Runs a request that reads or writes the CA's records: on a blocking
/// thread, since on PostgreSQL they go through its blocking client, which
/// must not run on a thread that drives async tasks.
async fn on_blocking_thread(
    f: impl FnOnce() -> warp::reply::Response + Send + 'static,
) -> warp::reply::Response {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!("the CA's records: {e}");
        Refusal::new(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "the CA's records could not be reached",
        )
        .response()
    })
}

fn revoke(app: &AppServer, a: &Admin, q: &HashMap<String, String>) -> warp::reply::Response {
    let serial = q.get("serial").map(String::as_str);
    let name = q.get("component").map(String::as_str);
    if let Some(n) = name {
        match RsId::new(n) {
            Ok(id) if a.grants.component(&id) => {}
            Ok(id) => {
                return Refusal::new(http::StatusCode::FORBIDDEN, format!("not granted: {id}"))
                    .response();
            }
            Err(e) => return bad(format!("component: {e}")),
        }
    } else if !a.grants.is_all() {
        return Refusal::new(
            http::StatusCode::FORBIDDEN,
            "revoking by serial needs an admin of every customer; name the component",
        )
        .response();
    }
    match app.revoke(serial, name) {
        Ok(done) => {
            app.stats.revoked.inc_by(done.len() as u64);
            let mut buf = Vec::new();
            let mut x = XmlOut::document(&mut buf);
            x.open("revoked")
                .attr_num("count", done.len() as u64)
                .gt()
                .newline();
            for (s, n) in &done {
                x.open("certificate")
                    .attr("serial", s)
                    .attr("name", n)
                    .empty()
                    .newline();
            }
            x.close("revoked").newline();
            xml_response(buf)
        }
        Err(e) => ca_failed("revocation", e),
    }
}

fn certificates(app: &AppServer, q: &HashMap<String, String>) -> warp::reply::Response {
    let Some(ca) = &app.ca else {
        return bad("this server has no [ca] configured");
    };
    let list = match ca.list(q.get("name").map(String::as_str)) {
        Ok(l) => l,
        Err(e) => return ca_failed("certificate list", e),
    };
    let ts = |s: i64| Timestamp::from_millis(s * 1000).unwrap_or_else(Timestamp::now);
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("certificates")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for c in &list {
        x.open("certificate")
            .attr("serial", &c.serial)
            .attr("name", &c.name)
            .attr("customer", &c.customer)
            .attr("role", &c.role)
            .attr_ts("issued", ts(c.issued_at))
            .attr_ts("not-after", ts(c.not_after))
            .attr_ts_opt("revoked", c.revoked_at.map(ts))
            .empty()
            .newline();
    }
    x.close("certificates").newline();
    xml_response(buf)
}

async fn audit(app: &AppServer, a: &Admin, q: &HashMap<String, String>) -> warp::reply::Response {
    // An admin of some customers sees their own entries only.
    let who = if a.grants.is_all() {
        q.get("admin").cloned()
    } else {
        Some(a.name.clone())
    };
    let before = q.get("before").and_then(|b| b.parse().ok());
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100u32)
        .clamp(1, 1000);
    let rows = match app.audit(who, before, limit).await {
        Ok(r) => r,
        Err(e) => {
            return Refusal::new(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).response();
        }
    };
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("audit")
        .attr_num("count", rows.len() as u64)
        .gt()
        .newline();
    for r in &rows {
        x.open("entry")
            .attr_num("seq", r.seq as u64)
            .attr_ts("at", ts(r.at))
            .attr("admin", &r.admin)
            .attr("peer", &r.peer)
            .attr("method", &r.method)
            .attr("path", &r.path)
            .attr_num("status", r.status as u64)
            .attr_num("millis", r.millis as u64)
            .empty()
            .newline();
    }
    x.close("audit").newline();
    xml_response(buf)
}

/// Rewrites the CA's `crl.pem` here if its records say that revocations
/// changed since `seen` (what the last look found; `None`: never looked),
/// so a revocation made through another member of a farm, or with `rsctl
/// ca revoke --database`, is in this member's list too. Returns what it
/// found.
pub async fn rewrite_crl_if_revoked(
    ca: std::sync::Arc<rs_net::pki::Ca>,
    seen: Option<(i64, i64)>,
) -> Option<(i64, i64)> {
    let r = tokio::task::spawn_blocking(move || {
        let now = ca.revocations()?;
        if seen != Some(now) {
            ca.write_crl()?;
        }
        Ok::<_, rs_net::pki::CaError>(now)
    })
    .await;
    match r {
        Ok(Ok(now)) => Some(now),
        Ok(Err(e)) => {
            tracing::warn!("the CA's revocations: {e}");
            seen
        }
        Err(e) => {
            tracing::warn!("the CA's revocations: {e}");
            seen
        }
    }
}
