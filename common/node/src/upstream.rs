//! The next hop over HTTP (seed 004, Fig. 14): POSTing envelopes with
//! failover among several URLs, and why a POST did not produce a reply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rs_net::http::{error_chain, short_text};
use rs_protocol::codec::{DecodeError, Encoded, Limits, RawEnvelope, StreamDecoder};

/// Where and how to POST.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URLs (`http://host:port`), tried in order; the first that works
    /// is used until it fails.
    pub urls: Vec<String>,
    /// Whole-request timeout (excluding any long-poll hold).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Limits on the replies we accept.
    pub limits: Limits,
    /// TLS towards the upstream (`None`: plain HTTP).
    pub tls: Option<rs_net::tls::TlsConfig>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            urls: Vec::new(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            tls: None,
        }
    }
}

/// Why a POST did not produce a reply envelope.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PostError {
    /// Nothing (or nothing usable) came back: connection refused, reset,
    /// timed out, or a 5xx. The request may or may not have been processed.
    #[error("{url}: {reason}")]
    Unavailable { url: String, reason: String },
    /// The tier cannot take work now (429/503).
    #[error("{url}: busy ({status}), retry after {retry_after:?}")]
    Busy {
        url: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The envelope was refused as malformed (400/415): nothing processed.
    #[error("{url}: envelope refused ({status}): {text}")]
    Refused {
        url: String,
        status: u16,
        text: String,
    },
    /// 413: the envelope is larger than the next hop takes.
    #[error("{url}: envelope too large: {text}")]
    TooLarge { url: String, text: String },
    /// 401/403: our credentials are not accepted.
    #[error("{url}: not authorised ({status}): {text}")]
    Unauthorised {
        url: String,
        status: u16,
        text: String,
    },
    /// The reply could not be decoded.
    #[error("{url}: malformed reply: {error}")]
    BadReply { url: String, error: DecodeError },
}

/// Checks a daemon's `upstream.urls` when its configuration is loaded: at
/// least one, each an absolute `http` or `https` URL with a host (what
/// the client can POST to). A daemon refuses to start otherwise rather
/// than failing every POST for ever.
pub fn check_urls(urls: &[String]) -> Result<(), String> {
    if urls.is_empty() {
        return Err("upstream.urls: at least one URL is required".into());
    }
    for u in urls {
        let parsed = reqwest::Url::parse(u)
            .map_err(|e| format!("upstream.urls: {u:?} is not a URL ({e})"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "upstream.urls: {u:?} is not an http(s) URL (like https://mlm1.example:8441)"
            ));
        }
    }
    Ok(())
}

/// An HTTP client for the next hop.
#[derive(Debug)]
pub struct Upstream {
    client: reqwest::Client,
    cfg: UpstreamConfig,
    current: AtomicUsize,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Result<Self, String> {
        if cfg.urls.is_empty() {
            return Err("no upstream URL configured".into());
        }
        let client = rs_net::tls::client(cfg.tls.as_ref())?
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Upstream {
            client,
            cfg,
            current: AtomicUsize::new(0),
        })
    }

    /// The HTTP client (TLS set up as configured).
    pub fn http(&self) -> &reqwest::Client {
        &self.client
    }

    /// Every upstream URL, in order.
    pub fn urls(&self) -> &[String] {
        &self.cfg.urls
    }

    /// The URL in use.
    pub fn current_url(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.cfg.urls.len();
        &self.cfg.urls[i]
    }

    /// POSTs an envelope, failing over through the URLs in order when one
    /// is unavailable. `hold` is the long-poll hold asked for, added to the
    /// timeout.
    pub async fn post(
        &self,
        enc: &Encoded,
        hold: Option<Duration>,
    ) -> Result<RawEnvelope, PostError> {
        let n = self.cfg.urls.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match self.post_to(&self.cfg.urls[i], enc, hold).await {
                Err(e @ PostError::Unavailable { .. }) => {
                    tracing::debug!("upstream {e}");
                    last = Some(e);
                }
                other => {
                    if k > 0 {
                        tracing::info!("failed over to upstream {}", self.cfg.urls[i]);
                    }
                    self.current.store(i, Ordering::Relaxed);
                    return other;
                }
            }
        }
        Err(last.unwrap_or(PostError::Unavailable {
            url: String::new(),
            reason: "no upstream".into(),
        }))
    }

    async fn post_to(
        &self,
        base: &str,
        enc: &Encoded,
        hold: Option<Duration>,
    ) -> Result<RawEnvelope, PostError> {
        let url = format!("{}/rs/v1/envelope", base.trim_end_matches('/'));
        let unavailable = |reason: String| PostError::Unavailable {
            url: url.clone(),
            reason,
        };
        let resp = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, &enc.content_type)
            .timeout(self.cfg.timeout + hold.unwrap_or_default())
            .body(enc.body.clone())
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = short_text(resp, 500).await;
            return Err(match status {
                400 | 415 => PostError::Refused { url, status, text },
                413 => PostError::TooLarge { url, text },
                401 | 403 => PostError::Unauthorised { url, status, text },
                429 | 503 => PostError::Busy {
                    url,
                    status,
                    retry_after,
                },
                _ => unavailable(format!("HTTP {status}: {text}")),
            });
        }
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut dec = StreamDecoder::new(&ct, self.cfg.limits.clone()).map_err(|error| {
            PostError::BadReply {
                url: url.clone(),
                error,
            }
        })?;
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => dec.push_bytes(chunk).map_err(|error| PostError::BadReply {
                    url: url.clone(),
                    error,
                })?,
                Ok(None) => break,
                Err(e) => return Err(unavailable(format!("reply cut: {}", error_chain(&e)))),
            }
        }
        dec.finish()
            .map_err(|error| PostError::BadReply { url, error })
    }
}
