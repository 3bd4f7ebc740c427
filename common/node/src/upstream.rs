//! The next hop over HTTP (seed 004, Fig. 14): POSTing envelopes on the
//! route chosen among several URLs ([`crate::routes`]), failing over and
//! hedging, and why a POST did not produce a reply.

use std::time::Duration;

use rs_net::http::{error_chain, short_text};
use rs_protocol::codec::{DecodeError, Encoded, Limits, RawEnvelope, StreamDecoder};

use crate::routes::{Class, RouteChoice, Routes};

/// Why a long poll ended early: the messages moved to another route
/// (the poll goes on there; [`Upstream::post`] never returns it).
const MOVED: &str = "the messages moved to another route";
/// How often one long poll follows the messages to another route.
const MAX_FOLLOWS: u32 = 8;

/// Where and how to POST.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URLs (`http://host:port`): the routes, in the order of
    /// preference ([`crate::routes`]).
    pub urls: Vec<String>,
    /// How the route is chosen among them.
    pub routes: RouteChoice,
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
            routes: RouteChoice::default(),
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

/// An HTTP client for the next hop, choosing among its routes
/// ([`crate::routes`]).
#[derive(Debug)]
pub struct Upstream {
    client: reqwest::Client,
    cfg: UpstreamConfig,
    routes: Routes,
}

/// A reply envelope and the route (index into the URLs) that answered.
#[derive(Debug)]
pub struct Reply {
    pub envelope: RawEnvelope,
    pub route: usize,
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
        let routes = Routes::new(cfg.urls.clone(), cfg.routes.clone());
        Ok(Upstream {
            client,
            cfg,
            routes,
        })
    }

    /// The HTTP client (TLS set up as configured).
    pub fn http(&self) -> &reqwest::Client {
        &self.client
    }

    /// Every upstream URL, in the configured order.
    pub fn urls(&self) -> &[String] {
        &self.cfg.urls
    }

    /// The routes, their health and the choice among them.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The URL `class` goes to now.
    pub fn url_for(&self, class: Class) -> &str {
        &self.cfg.urls[self.routes.pick(class)]
    }

    /// POSTs an envelope on route `first`, then (while a route is
    /// unavailable) on the route messages go on then, then on the others.
    /// A POST of messages that stalls is sent on a second route too
    /// ([`Routes::hedge`]). `hold` is the long-poll hold asked for, added
    /// to the timeout; a long poll ends when the messages move to another
    /// route, and goes on there.
    pub async fn post(
        &self,
        enc: &Encoded,
        hold: Option<Duration>,
        first: usize,
    ) -> Result<Reply, PostError> {
        let n = self.cfg.urls.len();
        let mut tried = vec![false; n];
        let mut next = Some(first.min(n - 1));
        let mut last = None;
        let mut follows = 0;
        while let Some(i) = next {
            tried[i] = true;
            let r = match (hold, self.routes.hedge(i, &tried)) {
                (None, Some((j, after))) => self.hedged(enc, (i, j), after, &mut tried).await,
                _ => self
                    .attempt(i, enc, hold, false)
                    .await
                    .map(|envelope| Reply { envelope, route: i }),
            };
            match r {
                // A long poll left behind by the messages: not the route's
                // fault; it goes on where they went.
                Err(PostError::Unavailable { reason, .. })
                    if reason == MOVED && follows < MAX_FOLLOWS =>
                {
                    follows += 1;
                    tried[i] = false;
                    next = Some(self.routes.current());
                    continue;
                }
                Err(e @ PostError::Unavailable { .. }) => {
                    tracing::debug!("upstream {e}");
                    last = Some(e);
                }
                other => {
                    if let Ok(r) = &other
                        && r.route != first
                    {
                        tracing::debug!("sent on upstream route {}", self.cfg.urls[r.route]);
                    }
                    return other;
                }
            }
            let now = self.routes.pick(Class::Messages);
            next = std::iter::once(now)
                .chain(self.routes.fallbacks(now))
                .find(|&k| !tried[k]);
        }
        Err(last.unwrap_or(PostError::Unavailable {
            url: String::new(),
            reason: "no upstream".into(),
        }))
    }

    /// POSTs on route `i` alone (a copy for multiple send).
    pub async fn post_on(&self, i: usize, enc: &Encoded) -> Result<RawEnvelope, PostError> {
        self.attempt(i.min(self.cfg.urls.len() - 1), enc, None, false)
            .await
    }

    /// Probes route `i` with `enc` (an envelope without messages): its
    /// round trip goes into the route's window.
    pub async fn probe(&self, i: usize, enc: &Encoded) -> Result<RawEnvelope, PostError> {
        self.attempt(i.min(self.cfg.urls.len() - 1), enc, None, true)
            .await
    }

    /// POSTs on `routes.0`; if no answer has come `after` (or the
    /// messages have moved to another route meanwhile), on `routes.1` (or
    /// where they went) too. The first answer wins; the other POST is
    /// abandoned (its wait counts against its route).
    async fn hedged(
        &self,
        enc: &Encoded,
        (i, j): (usize, usize),
        after: Duration,
        tried: &mut [bool],
    ) -> Result<Reply, PostError> {
        let first = self.attempt(i, enc, None, false);
        tokio::pin!(first);
        // The messages leaving this route (it stalled) is as good a reason
        // as the wait: the POST goes on where they went at once.
        let j = tokio::select! {
            r = &mut first => return r.map(|envelope| Reply { envelope, route: i }),
            () = tokio::time::sleep(after) => j,
            () = self.routes.moved_from(i) => match self.routes.current() {
                k if k != i && !tried[k] => k,
                _ => j,
            },
        };
        tried[j] = true;
        self.routes
            .hedged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(
            "no answer from {} yet: sending on {} too",
            self.cfg.urls[i],
            self.cfg.urls[j]
        );
        let second = self.attempt(j, enc, None, false);
        tokio::pin!(second);
        let (mut a, mut b) = (None, None);
        loop {
            tokio::select! {
                r = &mut first, if a.is_none() => match r {
                    Err(e @ PostError::Unavailable { .. }) => a = Some(e),
                    other => return other.map(|envelope| Reply { envelope, route: i }),
                },
                r = &mut second, if b.is_none() => match r {
                    Err(e @ PostError::Unavailable { .. }) => b = Some(e),
                    other => return other.map(|envelope| Reply { envelope, route: j }),
                },
            }
            if let (Some(_), Some(e)) = (&a, &b) {
                return Err(e.clone());
            }
        }
    }

    /// One POST on route `i`, measured for the route choice (`probe`: an
    /// empty envelope whose round trip goes into the window).
    async fn attempt(
        &self,
        i: usize,
        enc: &Encoded,
        hold: Option<Duration>,
        probe: bool,
    ) -> Result<RawEnvelope, PostError> {
        let url = &self.cfg.urls[i];
        if hold.is_some() {
            // A long poll is held by design: not timed, and given up when
            // the messages move elsewhere (the next POST goes there).
            self.routes.used(i);
            let started = std::time::Instant::now();
            let r = tokio::select! {
                r = self.post_to(url, enc, hold) => r,
                () = self.routes.moved_from(i) => {
                    return Err(PostError::Unavailable {
                        url: url.clone(),
                        reason: MOVED.into(),
                    });
                }
            };
            match &r {
                Err(
                    e @ (PostError::Unavailable { .. }
                    | PostError::BadReply { .. }
                    | PostError::Unauthorised { .. }),
                ) => self.routes.failed(i, None, &e.to_string()),
                Ok(reply) => {
                    // Held for the whole hold and answered empty: what it
                    // took beyond the hold is the refresh's round trip.
                    let over = hold.and_then(|h| started.elapsed().checked_sub(h));
                    match over {
                        Some(over) if reply.messages.is_empty() => {
                            self.routes.refreshed(i, over.as_secs_f64());
                        }
                        _ => self.routes.up(i),
                    }
                }
                _ => self.routes.up(i),
            }
            return r;
        }
        let timing = self.routes.start(i, probe);
        let r = self.post_to(url, enc, hold).await;
        match &r {
            Err(
                e @ (PostError::Unavailable { .. }
                | PostError::BadReply { .. }
                | PostError::Unauthorised { .. }),
            ) => timing.failed(&e.to_string()),
            _ => timing.ok(enc.body.len()),
        }
        r
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
