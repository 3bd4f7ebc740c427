//! Enrollment (docs/security.md): a new proxy or MLM, given a one-time
//! token and the CA certificate, creates its own key, sends a signing
//! request with the token, and receives its certificate (and with it its
//! component ID). No private key is ever copied onto a site.
//!
//! Wire: `POST /rs/v1/enroll`, `Authorization: Bearer <token>`,
//! `Content-Type: application/pkcs10`, body the PEM request; `200` with the
//! PEM certificate, `401` for an unknown, used or expired token, `400` for a
//! bad request. `GET /rs/v1/crl` serves the CA's current revocation list.

use std::time::Duration;

use openssl::pkey::PKey;
use openssl::x509::X509;

use crate::RsId;
use crate::pki::{self, Identity};
use crate::tls::{Revocations, TlsConfig};

/// Most bytes of a certificate or revocation list accepted in a reply.
const MAX_PEM: usize = 1 << 20;

/// [`ensure`], trying again (1 s doubling to a minute) while the upstream
/// is unreachable, until `stop`. A refusal (a bad or spent token) is final.
pub async fn ensure_retrying(
    tls: &TlsConfig,
    token: Option<&str>,
    urls: &[String],
    want: Option<&RsId>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Identity, String> {
    let mut attempt = 0u32;
    loop {
        match ensure(tls, token, urls, want).await {
            Ok(id) => return Ok(id),
            Err(Failed::Refused(e)) => return Err(e),
            Err(Failed::Unreachable(e)) => {
                let wait = crate::upstream::backoff(attempt, Duration::from_secs(60));
                attempt += 1;
                tracing::warn!(
                    "enrollment: {e}; trying again in {} s",
                    wait.as_secs().max(1)
                );
                tokio::select! {
                    () = stop.cancelled() => return Err("stopped before enrolling".into()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Why enrollment did not happen.
#[derive(Debug, Clone)]
pub enum Failed {
    /// Refused (bad, spent or expired token; a bad certificate back) or
    /// misconfigured: trying again will not help.
    Refused(String),
    /// Nothing answered: try again later.
    Unreachable(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Refused(e) | Failed::Unreachable(e) => f.write_str(e),
        }
    }
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Failed::Refused(e)
    }
}

/// Returns this component's identity, enrolling first when it has no
/// certificate yet. `want`: the ID configured, which the certificate must
/// name.
pub async fn ensure(
    tls: &TlsConfig,
    token: Option<&str>,
    urls: &[String],
    want: Option<&RsId>,
) -> Result<Identity, Failed> {
    if !tls.cert.exists() {
        let Some(token) = token else {
            return Err(Failed::Refused(format!(
                "no certificate at {} and no enroll_token to obtain one with",
                tls.cert.display()
            )));
        };
        enroll(tls, token, urls).await?;
    }
    let id = tls.identity()?;
    if let Some(w) = want
        && id.name != w.as_str()
    {
        return Err(Failed::Refused(format!(
            "the certificate {} names {}, but this component is configured as {w}",
            tls.cert.display(),
            id.name
        )));
    }
    Ok(id)
}

async fn enroll(tls: &TlsConfig, token: &str, urls: &[String]) -> Result<(), Failed> {
    // A key from an earlier attempt is reused: the request can be repeated.
    let key = if tls.key.exists() {
        let pem = std::fs::read(&tls.key).map_err(|e| format!("{}: {e}", tls.key.display()))?;
        PKey::private_key_from_pem(&pem).map_err(|e| format!("{}: {e}", tls.key.display()))?
    } else {
        if let Some(d) = tls.key.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let k = pki::generate_key()?;
        pki::write_private(
            &tls.key,
            &k.private_key_to_pem_pkcs8()
                .map_err(|e| format!("openssl: {e}"))?,
        )?;
        k
    };
    let csr = pki::csr(&key)?
        .to_pem()
        .map_err(|e| format!("openssl: {e}"))?;
    let ca_pem = std::fs::read(&tls.ca).map_err(|e| format!("{}: {e}", tls.ca.display()))?;
    let ca = X509::from_pem(&ca_pem).map_err(|e| format!("{}: {e}", tls.ca.display()))?;
    let http = crate::tls::client_trusting(&tls.ca)?
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let mut last = String::from("no upstream URL configured");
    for url in urls {
        let base = url.trim_end_matches('/');
        let r = http
            .post(format!("{base}/rs/v1/enroll"))
            .bearer_auth(token)
            .header("content-type", "application/pkcs10")
            .body(csr.clone())
            .send()
            .await;
        let resp = match r {
            Ok(r) => r,
            Err(e) => {
                last = format!("{base}: {e}");
                continue;
            }
        };
        let status = resp.status();
        let body = crate::upstream::bounded_body(resp, MAX_PEM).await?;
        if !status.is_success() {
            let e = format!(
                "{base} refused the enrollment ({status}): {}",
                String::from_utf8_lossy(&body).trim()
            );
            // A tier between us and the server that cannot reach it, or a
            // server busy: later. Anything else is the token's fault.
            if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
                last = e;
                continue;
            }
            return Err(Failed::Refused(e));
        }
        let cert = X509::from_pem(&body).map_err(|e| format!("the certificate returned: {e}"))?;
        let ca_key = ca.public_key().map_err(|e| format!("CA key: {e}"))?;
        if !cert.verify(&ca_key).unwrap_or(false) {
            return Err(Failed::Refused(
                "the certificate returned is not signed by our CA".into(),
            ));
        }
        let ours = cert
            .public_key()
            .map_err(|e| format!("certificate key: {e}"))?;
        if !ours.public_eq(&key) {
            return Err(Failed::Refused(
                "the certificate returned is not for our key".into(),
            ));
        }
        let id = Identity::from_cert(&cert)?;
        pki::write_file(&tls.cert, &body)?;
        tracing::info!("enrolled as {} (certificate {})", id.name, id.serial);
        if tls.crl.is_some()
            && let Err(e) = fetch_crl(&http, base, &ca, tls).await
        {
            tracing::warn!("revocation list: {e}");
        }
        return Ok(());
    }
    Err(Failed::Unreachable(format!("enrollment failed: {last}")))
}

async fn fetch_crl(
    http: &reqwest::Client,
    base: &str,
    ca: &X509,
    tls: &TlsConfig,
) -> Result<(), String> {
    let pem = get_crl(http, base).await?;
    Revocations::new(ca.clone(), tls.crl.clone())?.install(&pem)?;
    Ok(())
}

/// Fetches the revocation list from a tier (`GET /rs/v1/crl`).
/// `POST /rs/v1/enroll` as a tier receives it: the `Authorization` header
/// (the token) and the body (a CSR, at most 16 KiB). The server answers it;
/// an MLM passes it on upstream.
pub fn request()
-> impl warp::Filter<Extract = (Option<String>, bytes::Bytes), Error = warp::Rejection> + Clone {
    use warp::Filter as _;
    warp::path!("rs" / "v1" / "enroll")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::content_length_limit(16 * 1024))
        .and({
            // Bounded by the content length limit above.
            #[allow(clippy::disallowed_methods)]
            warp::body::bytes()
        })
}

pub async fn get_crl(http: &reqwest::Client, base: &str) -> Result<Vec<u8>, String> {
    let base = base.trim_end_matches('/');
    let resp = http
        .get(format!("{base}/rs/v1/crl"))
        .send()
        .await
        .map_err(|e| format!("{base}: {e}"))?;
    let status = resp.status();
    let body = crate::upstream::bounded_body(resp, MAX_PEM).await?;
    if !status.is_success() {
        return Err(format!("{base}/rs/v1/crl: {status}"));
    }
    Ok(body)
}

/// Keeps `rev` current from the upstream: every `every`, fetch the list
/// and put it in force when it is newer (signed by our CA). Runs until
/// `stop`.
pub async fn refresh_crl(
    http: reqwest::Client,
    urls: Vec<String>,
    rev: std::sync::Arc<Revocations>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        for url in &urls {
            match get_crl(&http, url).await {
                Ok(pem) => {
                    if let Err(e) = rev.install(&pem) {
                        tracing::warn!("revocation list from {url}: {e}");
                    }
                    break;
                }
                Err(e) => tracing::debug!("revocation list: {e}"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
