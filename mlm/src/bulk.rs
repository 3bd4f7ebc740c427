//! The MLM as an HTTP proxy for uploads (seed 004, Fig. 21): `HEAD` and
//! `PUT /rs/v1/bulk/{token}` are relayed to the same path on the upstream
//! in use, streaming: the body goes up chunk by chunk as it arrives (hyper's
//! flow control holds the sender back while the upstream is slower), so the
//! MLM's memory stays flat for any file size. It never sees the content as
//! anything but bytes.
//!
//! The MLM may refuse: a bulk request larger than its `[bulk]
//! max_upload_bytes` is rejected when it passes (`too-large`), and a
//! transfer is refused with 503 and `Retry-After` while its throttle says
//! no (windows or quotas on class `bulk`, or `max_bulk_transfers` under
//! way).

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use rs_net::bulk::{ContentRange, UPLOAD_COMPLETE, UPLOAD_LENGTH, UPLOAD_OFFSET};
use rs_node::throttle::Held;
use rs_protocol::model::{ContentKind, Direction};
use serde::{Deserialize, Serialize};
use warp::Filter;

use crate::Mlm;

/// `[bulk]` in mlm.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BulkSection {
    /// Refuse upload requests larger than this (none: no limit here).
    #[serde(default)]
    pub max_upload_bytes: Option<u64>,
    /// A relayed transfer that sends nothing for this long is cut.
    #[serde(default = "default_idle")]
    pub idle_secs: u64,
    /// Bound of the download cache: beyond it, files every destination
    /// has fetched are evicted, least recently used first.
    #[serde(default = "default_cache_max")]
    pub cache_max_bytes: u64,
    /// Where cached files are (default: `data_dir/cache`). Members of a
    /// farm that share it (one host, or a shared filesystem) fetch each
    /// download once for the farm.
    #[serde(default)]
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for BulkSection {
    fn default() -> Self {
        BulkSection {
            max_upload_bytes: None,
            idle_secs: default_idle(),
            cache_max_bytes: default_cache_max(),
            cache_dir: None,
        }
    }
}

fn default_cache_max() -> u64 {
    20 << 30
}

fn default_idle() -> u64 {
    60
}

rs_net::counters! {
    /// Relay counters (status and metrics).
    pub struct Stats {
        transfers: "bulk_transfers_total", "Bulk transfers relayed.";
        bytes_relayed: "bulk_bytes_total" {direction = "relayed"}, "Bulk bytes moved, by direction.";
        refused: "bulk_refused_total" {reason = "transfer"}, "Bulk transfers and requests refused, by reason.";
        requests_refused: "bulk_refused_total" {reason = "request"},
            "Bulk transfers and requests refused, by reason.";
    }
}

/// Whether an upload request may pass this MLM; the outcome to answer if
/// not.
pub fn check_request(
    mlm: &Mlm,
    raw: &rs_protocol::codec::RawMessage,
) -> Option<rs_protocol::Outcome> {
    if raw.kind != ContentKind::BulkRequest {
        return None;
    }
    let max = mlm.cfg.bulk.max_upload_bytes?;
    let full = match raw.clone().decode(&mlm.cfg.limits()) {
        Ok(m) => m,
        Err(e) => return Some(rs_protocol::Outcome::rejected("invalid", e.to_string())),
    };
    match full.content {
        rs_protocol::model::Content::BulkRequest(b)
            if b.direction == Direction::Upload && b.size > max =>
        {
            mlm.bulk_stats.requests_refused.inc();
            Some(rs_protocol::Outcome::rejected(
                "too-large",
                format!(
                    "{} bytes exceed the upload limit of {max} bytes at {}",
                    b.size, mlm.id
                ),
            ))
        }
        _ => None,
    }
}

fn text(status: StatusCode, t: impl Into<String>) -> warp::reply::Response {
    let mut r = warp::reply::Response::new(format!("{}\n", t.into()).into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The upstream's answer, passed down: status, the upload headers, and
/// its (short) text.
async fn pass_down(r: Result<reqwest::Response, reqwest::Error>) -> warp::reply::Response {
    let resp = match r {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("upstream: {}", rs_net::http::error_chain(&e)),
            );
        }
    };
    let status = resp.status();
    let keep: Vec<(http::HeaderName, http::HeaderValue)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| {
            [
                UPLOAD_OFFSET,
                UPLOAD_LENGTH,
                UPLOAD_COMPLETE,
                "retry-after",
                "content-type",
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let body = rs_net::http::short_text(resp, 4096).await;
    let mut out = warp::reply::Response::new(format!("{body}\n").into());
    *out.status_mut() = status;
    for (k, v) in keep {
        out.headers_mut().insert(k, v);
    }
    out
}

fn upstream_url(mlm: &Mlm, token: &str) -> String {
    format!(
        "{}{}{token}",
        mlm.uplink
            .upstream()
            .url_for(rs_node::routes::Class::Bulk)
            .trim_end_matches('/'),
        rs_net::bulk::PATH
    )
}

/// `HEAD` and `PUT /rs/v1/bulk/{token}`, relayed.
pub fn routes(mlm: Arc<Mlm>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let mlm_get = mlm.clone();
    let head = {
        let mlm = mlm.clone();
        warp::path!("rs" / "v1" / "bulk" / String)
            .and(warp::head())
            .then(move |token: String| {
                let mlm = mlm.clone();
                async move {
                    if !rs_net::bulk::is_token(&token) {
                        return text(StatusCode::NOT_FOUND, "no such upload URL");
                    }
                    pass_down(
                        mlm.bulk_client
                            .http()
                            .head(upstream_url(&mlm, &token))
                            .timeout(Duration::from_secs(30))
                            .send()
                            .await,
                    )
                    .await
                }
            })
    };
    let put = warp::path!("rs" / "v1" / "bulk" / String)
        .and(warp::put())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(move |token: String, headers: http::HeaderMap, body| {
            let mlm = mlm.clone();
            async move { relay(&mlm, token, headers, Box::pin(body)).await }
        });
    let get = {
        let mlm = mlm_get;
        warp::path!("rs" / "v1" / "bulk" / String)
            .and(warp::get())
            .and(warp::header::optional::<String>("range"))
            .then(move |token: String, range: Option<String>| {
                let mlm = mlm.clone();
                async move { serve(&mlm, &token, range).await }
            })
    };
    head.boxed()
        .or(put.boxed())
        .unify()
        .or(get.boxed())
        .unify()
        .boxed()
}

/// `GET /rs/v1/bulk/{token}`: a cached download, for the destinations
/// behind this MLM.
async fn serve(mlm: &Mlm, token: &str, range: Option<String>) -> warp::reply::Response {
    if !rs_net::bulk::is_token(token) {
        return text(StatusCode::NOT_FOUND, "no such file URL");
    }
    match mlm.cache.lookup(token, mlm.clock.now()).await {
        Ok(crate::cache::Lookup::Here(path, size)) => {
            let range = range.and_then(|r| http::HeaderValue::from_str(&r).ok());
            rs_net::bulk::serve_file(
                &path,
                size,
                range.as_ref(),
                mlm.cache.stats.served_bytes.clone(),
            )
            .await
        }
        Ok(crate::cache::Lookup::Elsewhere) => {
            // The farm has it; this member's directory does not, yet.
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "being fetched into this member's cache; try again",
            );
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("5"),
            );
            r
        }
        Ok(crate::cache::Lookup::Unknown) => {
            text(StatusCode::NOT_FOUND, "no such file URL (or not here yet)")
        }
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn relay<S, B>(
    mlm: &Mlm,
    token: String,
    headers: http::HeaderMap,
    body: std::pin::Pin<Box<S>>,
) -> warp::reply::Response
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + 'static + ?Sized,
    B: bytes::Buf + Send + 'static,
{
    if !rs_net::bulk::is_token(&token) {
        return text(StatusCode::NOT_FOUND, "no such upload URL");
    }
    let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return text(StatusCode::LENGTH_REQUIRED, "Content-Length must be given");
    };
    let range = headers
        .get(http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(r) = &range
        && ContentRange::parse(r).is_none_or(|r| r.len() != len)
    {
        return text(
            StatusCode::BAD_REQUEST,
            "Content-Range must be bytes START-END/SIZE and match Content-Length",
        );
    }
    let _permit = match mlm.throttle.bulk_permit(&mlm.id, len, 3) {
        Ok(p) => p,
        Err(Held { after, why }) => {
            mlm.bulk_stats.refused.inc();
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, why);
            if let Ok(v) = http::HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            return r;
        }
    };
    mlm.bulk_stats.transfers.inc();
    let idle = Duration::from_secs(mlm.cfg.bulk.idle_secs.max(1));
    let counter = mlm.bulk_stats.bytes_relayed.clone();
    // Chunks go up as they come; a sender silent for `idle` ends the
    // stream with an error, which aborts the upstream request (the
    // receiver keeps what arrived, for the resume).
    let stream = futures_util::stream::unfold(Some(body), move |state| {
        let counter = counter.clone();
        async move {
            let mut body = state?;
            match rs_net::bulk::next_chunk(&mut body, idle).await {
                Ok(Some(b)) => {
                    counter.inc_by(b.len() as u64);
                    Some((Ok(b), Some(body)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        }
    });
    let mut req = mlm
        .bulk_client
        .http()
        .put(upstream_url(mlm, &token))
        .header(http::header::CONTENT_LENGTH, len)
        .header(http::header::CONTENT_TYPE, "application/octet-stream");
    if let Some(r) = range {
        req = req.header(http::header::CONTENT_RANGE, r);
    }
    pass_down(req.body(reqwest::Body::wrap_stream(stream)).send().await).await
}
