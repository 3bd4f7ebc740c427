//! Enrollment (docs/security.md): a new proxy or MLM, given a one-time
//! token and the CA certificate, creates its own key, sends a signing
//! request with the token, and receives its certificate (and with it its
//! component ID). No private key is ever copied onto a site.
//!
//! Wire: `POST /rs/v1/enroll`, `Authorization: Bearer <token>`,
//! `Content-Type: application/pkcs10`, body the PEM request; `200` with the
//! PEM certificate, `401` for an unknown, used or expired token, `400` for a
//! bad request. `GET /rs/v1/crl` serves the CA's current revocation list.
//!
//! Renewal: a component whose certificate nears its end posts, to the same
//! endpoint and without a token, a PEM PKCS #7 SignedData made with its
//! current key and certificate whose content is a signing request for a
//! new key; the server answers the certificate for the new key under the
//! same ID. The new key and certificate replace the old pair so that a
//! crash at any moment leaves one whole pair ([`finish_renewal`]).

use std::time::Duration;

use openssl::pkey::PKey;
use openssl::x509::X509;

use crate::pki::{self, Identity};
use crate::tls::{Revocations, TlsConfig};
use rs_protocol::RsId;

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
                let wait = crate::retry::backoff(attempt, Duration::from_secs(60));
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
    finish_renewal(tls)?;
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
        pki::read_key(&tls.key)?
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
    let ca = pki::read_cert(&tls.ca)?;
    let http = crate::tls::client_trusting(&tls.ca)?
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let (base, pem, cert) = obtain(
        &http,
        urls,
        Some(token),
        "application/pkcs10",
        csr,
        (&ca, &key),
        "enrollment",
    )
    .await?;
    let id = Identity::from_cert(&cert)?;
    pki::write_file(&tls.cert, &pem)?;
    tracing::info!("enrolled as {} (certificate {})", id.name, id.serial);
    if tls.crl.is_some()
        && let Err(e) = fetch_crl(&http, &base, &ca, tls).await
    {
        tracing::warn!("revocation list: {e}");
    }
    Ok(())
}

/// POSTs `body` to `/rs/v1/enroll` at each upstream in turn until one
/// answers; returns its base URL and the certificate it issued (PEM and
/// parsed), checked to be signed by the CA and for the key (`for_key`). A
/// tier that cannot reach the server or is busy (5xx, 429) passes the turn
/// to the next; any other refusal is final (`what` names the request).
async fn obtain(
    http: &reqwest::Client,
    urls: &[String],
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
    (ca, for_key): (&X509, &PKey<openssl::pkey::Private>),
    what: &str,
) -> Result<(String, Vec<u8>, X509), Failed> {
    let mut last = String::from("no upstream URL configured");
    for url in urls {
        let base = url.trim_end_matches('/');
        let mut req = http
            .post(format!("{base}/rs/v1/enroll"))
            .header("content-type", content_type)
            .body(body.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                last = format!("{base}: {e}");
                continue;
            }
        };
        let status = resp.status();
        let pem = crate::http::bounded_body(resp, MAX_PEM).await?;
        if !status.is_success() {
            let e = format!(
                "{base} refused the {what} ({status}): {}",
                String::from_utf8_lossy(&pem).trim()
            );
            if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
                last = e;
                continue;
            }
            return Err(Failed::Refused(e));
        }
        let cert = X509::from_pem(&pem).map_err(|e| format!("the certificate returned: {e}"))?;
        let ca_key = ca.public_key().map_err(|e| format!("CA key: {e}"))?;
        if !crate::pki::SignedBy::signed_by(&*cert, &ca_key) {
            return Err(Failed::Refused(
                "the certificate returned is not signed by our CA".into(),
            ));
        }
        if !cert.public_key().is_ok_and(|k| k.public_eq(for_key)) {
            return Err(Failed::Refused(
                "the certificate returned is not for our key".into(),
            ));
        }
        return Ok((base.to_owned(), pem, cert));
    }
    Err(Failed::Unreachable(format!("{what} failed: {last}")))
}

/// Where a renewal writes the new key and certificate before they
/// replace the old ones.
fn next_paths(tls: &TlsConfig) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        tls.key.with_extension("next"),
        tls.cert.with_extension("next"),
    )
}

/// Completes or undoes a renewal a crash interrupted. A renewal writes the
/// new key and certificate beside the old (`key.next`, then `cert.next`),
/// then renames the key into place, then the certificate: with both new
/// files still there the old pair is whole (the new files go); with only
/// `cert.next` left the key was replaced, so the certificate follows it.
pub fn finish_renewal(tls: &TlsConfig) -> Result<(), String> {
    let (key_next, cert_next) = next_paths(tls);
    if key_next.exists() {
        let _ = std::fs::remove_file(&cert_next);
        return std::fs::remove_file(&key_next).map_err(|e| format!("{}: {e}", key_next.display()));
    }
    if !cert_next.exists() {
        return Ok(());
    }
    let key = pki::read_key(&tls.key)?;
    let matches = X509::from_pem(&pki::read_file(&cert_next)?)
        .ok()
        .and_then(|c| c.public_key().ok())
        .is_some_and(|k| k.public_eq(&key));
    if matches {
        tracing::info!("completing the certificate renewal a stop interrupted");
        pki::rename(&cert_next, &tls.cert)
    } else {
        std::fs::remove_file(&cert_next).map_err(|e| format!("{}: {e}", cert_next.display()))
    }
}

/// Whether the certificate `cert` is due for renewal at `now` (UNIX
/// seconds): less than `before_days`, or a third of its lifetime, remains.
pub fn renewal_due(cert: &X509, before_days: u32, now: i64) -> Result<bool, String> {
    let from = crate::tls::asn1_unix(cert.not_before())?;
    let until = crate::tls::asn1_unix(cert.not_after())?;
    let margin = (i64::from(before_days) * 86_400).min((until - from) / 3);
    Ok(until - now < margin)
}

/// Renews this component's certificate through `urls` when it is due
/// ([`renewal_due`]); `Ok(true)` when a new key and certificate are in
/// place (the caller starts again to use them). The old certificate stays
/// valid until it expires: were it revoked here and the answer lost, the
/// component would hold no usable certificate.
pub async fn renew_if_due(tls: &TlsConfig, urls: &[String]) -> Result<bool, Failed> {
    finish_renewal(tls)?;
    let cert = pki::read_cert(&tls.cert)?;
    let now = rs_protocol::Timestamp::now().as_millis() / 1000;
    if !renewal_due(&cert, tls.renew_before_days, now)? {
        return Ok(false);
    }
    let old = Identity::from_cert(&cert)?;
    let key = pki::read_key(&tls.key)?;
    let new_key = pki::generate_key()?;
    let csr = pki::csr(&new_key)?
        .to_pem()
        .map_err(|e| format!("openssl: {e}"))?;
    let certs = openssl::stack::Stack::new().map_err(|e| format!("openssl: {e}"))?;
    let body = openssl::pkcs7::Pkcs7::sign(
        &cert,
        &key,
        &certs,
        &csr,
        openssl::pkcs7::Pkcs7Flags::BINARY | openssl::pkcs7::Pkcs7Flags::NOSMIMECAP,
    )
    .and_then(|p7| p7.to_pem())
    .map_err(|e| format!("signing the renewal: {e}"))?;
    let ca = pki::read_cert(&tls.ca)?;
    let http = crate::tls::client(Some(tls))?
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let (_, pem, new) = obtain(
        &http,
        urls,
        None,
        "application/pkcs7-mime",
        body,
        (&ca, &new_key),
        "renewal",
    )
    .await?;
    let id = Identity::from_cert(&new)?;
    if id.name != old.name {
        return Err(Failed::Refused(format!(
            "the certificate returned names {}, not {}",
            id.name, old.name
        )));
    }
    let (key_next, cert_next) = next_paths(tls);
    pki::write_private(
        &key_next,
        &new_key
            .private_key_to_pem_pkcs8()
            .map_err(|e| format!("openssl: {e}"))?,
    )?;
    pki::write_private(&cert_next, &pem)?;
    // The key is in place, durably, before the certificate follows it: a
    // power loss in between leaves what finish_renewal completes.
    pki::rename(&key_next, &tls.key)?;
    pki::rename(&cert_next, &tls.cert)?;
    tracing::info!(
        "renewed the certificate of {}: {} -> {}",
        id.name,
        old.serial,
        id.serial
    );
    Ok(true)
}

/// Checks at start and then hourly whether this component's certificate
/// is due for renewal, renews it and calls `renewed` (which restarts the
/// daemon with the new pair). Runs until `stop`.
pub async fn renew_loop(
    tls: TlsConfig,
    urls: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
    renewed: impl FnOnce(),
) {
    let mut attempt = 0u32;
    loop {
        let wait = match renew_if_due(&tls, &urls).await {
            Ok(true) => {
                renewed();
                return;
            }
            Ok(false) => {
                attempt = 0;
                Duration::from_secs(3600)
            }
            Err(e) => {
                attempt += 1;
                tracing::warn!("certificate renewal: {e}");
                crate::retry::backoff(attempt, Duration::from_secs(3600))
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
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
    let body = crate::http::bounded_body(resp, MAX_PEM).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertSpec};

    /// A component's key and certificate from `ca`, as PEM.
    fn pair(ca: &Ca, id: &str) -> (Vec<u8>, Vec<u8>) {
        let key = pki::generate_key().unwrap();
        let spec = CertSpec::component(&RsId::new(id).unwrap(), 30);
        let cert = ca.issue(&spec, &key).unwrap();
        (
            key.private_key_to_pem_pkcs8().unwrap(),
            cert.to_pem().unwrap(),
        )
    }

    #[test]
    fn a_renewal_cut_short_leaves_one_whole_pair() {
        let dir = std::env::temp_dir().join(format!("rs-renewal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::init(&dir.join("ca"), "test CA", 30).unwrap();
        let tls = TlsConfig::in_dir(&dir);
        let (key_next, cert_next) = next_paths(&tls);
        let (old_key, old_cert) = pair(&ca, "acme.p1");
        let (new_key, new_cert) = pair(&ca, "acme.p1");
        let set = |files: &[(&std::path::Path, &[u8])]| {
            for p in [&tls.key, &tls.cert, &key_next, &cert_next] {
                let _ = std::fs::remove_file(p);
            }
            for (p, b) in files {
                std::fs::write(p, b).unwrap();
            }
        };
        let read = |p: &std::path::Path| std::fs::read(p).unwrap();
        let left = || key_next.exists() || cert_next.exists();

        // Cut before the key was replaced: the old pair stays.
        set(&[
            (&tls.key, &old_key),
            (&tls.cert, &old_cert),
            (&key_next, &new_key),
            (&cert_next, &new_cert),
        ]);
        finish_renewal(&tls).unwrap();
        assert_eq!(
            (read(&tls.key), read(&tls.cert)),
            (old_key.clone(), old_cert.clone())
        );
        assert!(!left());
        // Cut between the two renames: the certificate follows the key.
        set(&[
            (&tls.key, &new_key),
            (&tls.cert, &old_cert),
            (&cert_next, &new_cert),
        ]);
        finish_renewal(&tls).unwrap();
        assert_eq!(
            (read(&tls.key), read(&tls.cert)),
            (new_key.clone(), new_cert.clone())
        );
        assert!(!left());
        // A stray certificate for another key is dropped.
        set(&[
            (&tls.key, &old_key),
            (&tls.cert, &old_cert),
            (&cert_next, &new_cert),
        ]);
        finish_renewal(&tls).unwrap();
        assert_eq!((read(&tls.key), read(&tls.cert)), (old_key, old_cert));
        assert!(!left());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn renewal_is_due_in_the_last_third_or_the_last_days() {
        let dir = std::env::temp_dir().join(format!("rs-renewal-due-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::init(&dir, "test CA", 30).unwrap();
        let key = pki::generate_key().unwrap();
        let id = RsId::new("acme.p1").unwrap();
        let now = rs_protocol::Timestamp::now().as_millis() / 1000;
        // 365 days: due in the last 30 days.
        let year = ca.issue(&CertSpec::component(&id, 365), &key).unwrap();
        assert!(!renewal_due(&year, 30, now).unwrap());
        assert!(!renewal_due(&year, 30, now + 334 * 86_400).unwrap());
        assert!(renewal_due(&year, 30, now + 336 * 86_400).unwrap());
        // 30 days: due in the last third (10 days), not the last 30.
        let month = ca.issue(&CertSpec::component(&id, 30), &key).unwrap();
        assert!(!renewal_due(&month, 30, now + 19 * 86_400).unwrap());
        assert!(renewal_due(&month, 30, now + 21 * 86_400).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
