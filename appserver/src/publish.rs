//! Downloads from the application server (seed 004, Figs. 22-23). An
//! admin publishes a file (`PUT /rs/v1/control/files/{name}`: streamed,
//! hashed, stored once by SHA-256) and offers it to components and groups
//! (`POST /rs/v1/control/offer`): the offer is a `bulk-request`
//! (`direction="download"`) sent as a job, one copy per next hop, carrying
//! a fresh unguessable URL `/rs/v1/bulk/{token}` from which each hop
//! fetches the file once (with `Range` to resume). The URL closes
//! (un-published) once the job is done: every destination has answered or
//! expired.

use std::path::PathBuf;
use std::sync::Arc;

use http::StatusCode;
use rs_net::bulk;
use rs_protocol::codec::api::{PublishedFile, decode_offer_request, encode_file};
use rs_protocol::model::*;
use tokio::io::AsyncWriteExt as _;
use warp::Filter;

use crate::AppServer;
use crate::control::refuse;

/// Largest file that may be published.
pub(crate) const MAX_PUBLISH: u64 = 64 << 30;

rs_net::counters! {
    /// Download counters (status and metrics).
    pub struct Stats {
        published: "files_published_total", "Files published for download.";
        offers: "download_offers_total", "Download offers queued to destinations.";
        unpublished: "files_unpublished_total", "Files withdrawn.";
        /// Bytes of published files sent to fetchers.
        bytes_served: "bulk_bytes_total" {direction = "served"}, "Bulk bytes moved, by direction.";
        fetches_refused: "bulk_refused_total" {reason = "fetch"},
            "Bulk transfers and requests refused, by reason.";
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

fn published_dir(app: &AppServer) -> PathBuf {
    app.uploads.dir.join("published")
}

/// Where a published file is kept (by its SHA-256).
pub fn published_path(app: &AppServer, sha: &str) -> PathBuf {
    published_dir(app).join(sha)
}

/// The routes: publish, offer, and `GET /rs/v1/bulk/{token}`.
pub fn routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let put = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "files" / String)
            .and(warp::put())
            .and(crate::security::provider(&app))
            .and(warp::header::headers_cloned())
            .and(warp::body::stream())
            .then(
                move |name: String, _: crate::security::Admin, headers: http::HeaderMap, body| {
                    let app = app.clone();
                    async move { publish(&app, name, &headers, Box::pin(body)).await }
                },
            )
    };
    let offer = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "offer")
            .and(warp::post())
            .and(crate::control::small_body())
            .and(crate::security::admin(&app))
            .and_then(move |body: bytes::Bytes, admin: crate::security::Admin| {
                let app = app.clone();
                async move { offer(&app, &body, &admin.grants).await }
            })
    };
    let get = warp::path!("rs" / "v1" / "bulk" / String)
        .and(warp::get())
        .and(warp::header::optional::<String>("range"))
        .then(move |token: String, range: Option<String>| {
            let app = app.clone();
            async move { fetch(&app, &token, range).await }
        });
    put.boxed()
        .or(offer.boxed())
        .unify()
        .or(get.boxed())
        .unify()
        .boxed()
}

async fn publish<S, B>(
    app: &AppServer,
    name: String,
    headers: &http::HeaderMap,
    body: std::pin::Pin<Box<S>>,
) -> warp::reply::Response
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + ?Sized,
    B: bytes::Buf,
{
    // Path segments arrive percent-encoded (names with spaces and such).
    let name = percent_encoding::percent_decode_str(&name)
        .decode_utf8_lossy()
        .into_owned();
    let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    else {
        return text(StatusCode::LENGTH_REQUIRED, "Content-Length must be given");
    };
    match store_file(app, name, Size::Exact(len), body).await {
        Ok(f) => rs_node::ingress::xml_response(encode_file(&f)),
        Err((status, why)) => text(status, why),
    }
}

/// How big a file being published is: exactly (the API's Content-Length)
/// or at most (a browser's upload: the request's length bounds the file
/// inside it).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Size {
    Exact(u64),
    AtMost(u64),
}

/// Publishes `body` under `name`: streamed to the bulk directory, hashed on
/// the way, synced, renamed to its SHA-256 and recorded; nothing is left
/// of a failed one.
pub(crate) async fn store_file<S, B>(
    app: &AppServer,
    name: String,
    size: Size,
    mut body: std::pin::Pin<Box<S>>,
) -> Result<PublishedFile, (StatusCode, String)>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + ?Sized,
    B: bytes::Buf,
{
    if name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\\'])
        || name == "."
        || name == ".."
        || name.chars().any(char::is_control)
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "the file name must be 1-255 characters without path separators".into(),
        ));
    }
    let (Size::Exact(len) | Size::AtMost(len)) = size;
    if len > MAX_PUBLISH {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_PUBLISH} bytes"),
        ));
    }
    if let Some(free) = rs_node::throttle::free_bytes(&app.uploads.dir)
        && free < len.saturating_add(app.cfg.bulk.min_free_disk_mb << 20)
    {
        return Err((
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "{len} bytes would leave less than {} MB free",
                app.cfg.bulk.min_free_disk_mb
            ),
        ));
    }
    let dir = published_dir(app);
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
    }
    let tmp = dir.join(format!(
        ".incoming-{}",
        bulk::new_token().unwrap_or_default()
    ));
    let mut file = match tokio::fs::File::create(&tmp).await {
        Ok(f) => f,
        Err(e) => return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    };
    let mut hasher = bulk::Sha256::default();
    let mut got = 0u64;
    let idle = std::time::Duration::from_secs(app.cfg.bulk.idle_secs.max(1));
    let failed = loop {
        match bulk::next_chunk(&mut body, idle).await {
            Ok(Some(c)) => {
                got += c.len() as u64;
                if got > len {
                    break Some((StatusCode::BAD_REQUEST, format!("more than {len} bytes")));
                }
                if let Err(e) = file.write_all(&c).await {
                    break Some((StatusCode::INSUFFICIENT_STORAGE, e.to_string()));
                }
                hasher.update(&c);
            }
            Ok(None) => break None,
            Err(e) => break Some((StatusCode::BAD_REQUEST, e)),
        }
    };
    let synced = file.sync_all().await;
    drop(file);
    if let Some((status, why)) = failed.or_else(|| {
        matches!(size, Size::Exact(_))
            .then_some(())
            .filter(|()| got != len)
            .map(|()| (StatusCode::BAD_REQUEST, format!("{got} of {len} bytes")))
    }) {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err((status, format!("not published: {why}")));
    }
    if let Err(e) = synced {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
    }
    let sha = hasher.finish();
    let hex = rs_protocol::codec::sha256_hex(&sha);
    if let Err(e) = tokio::fs::rename(&tmp, published_path(app, &hex)).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
    }
    let now = app.clock.now();
    let r = app
        .store
        .publish_file(hex.clone(), name.clone(), got, now)
        .await;
    if let Err(e) = r {
        return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
    }
    app.downloads.published.inc();
    tracing::info!("published {name} ({got} bytes, SHA-256 {hex})");
    Ok(PublishedFile {
        name,
        size: got,
        sha256: sha,
    })
}

async fn offer(
    app: &AppServer,
    body: &[u8],
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    let req = decode_offer_request(body, &rs_protocol::codec::Limits::default())
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("offer: {e}")))?;
    let job = start_offer(app, grants, req, None).await?;
    Ok(rs_node::ingress::xml_response(
        rs_protocol::codec::api::encode_job(&job),
    ))
}

/// Offers a published file to components and groups: a job (under
/// `job_id`, if given) whose message carries a download URL for it.
pub(crate) async fn start_offer(
    app: &AppServer,
    grants: &crate::security::Grants,
    req: rs_protocol::codec::api::OfferRequest,
    job_id: Option<String>,
) -> Result<rs_protocol::codec::api::Job, warp::Rejection> {
    let hex = rs_protocol::codec::sha256_hex(&req.sha256);
    let file: Option<(String, i64)> = app
        .store
        .published_file(hex.clone())
        .await
        .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let Some((name, size)) = file else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no published file {hex}; PUT it to /rs/v1/control/files/NAME first"),
        ));
    };
    if !published_path(app, &hex).exists() {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("the published file {hex} is gone from disk"),
        ));
    }
    let token = bulk::new_token().map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let url = format!("{}{token}", bulk::PATH);
    let class = Classification::new(req.class.clone(), req.sub.clone());
    let size = u64::try_from(size).unwrap_or(0);
    let job = crate::control::start_job(
        app,
        grants,
        &req.to,
        &req.groups,
        req.ttl_secs,
        req.notify.clone(),
        "offer",
        // The URL is recorded with the job: a copy may be fetched as soon
        // as it leaves, before this handler runs on.
        Some((bulk::token_digest(&token), hex.clone())),
        |id, dests, expiry, now| Message {
            header: Header {
                id,
                created: now,
                class: class.clone(),
                route: Route::Destination(Destination::new(dests, Some(expiry))),
                routing: Default::default(),
            },
            content: Content::BulkRequest(BulkRequest {
                direction: Direction::Download,
                name: name.clone(),
                size,
                sha256: req.sha256,
                class: class.clone(),
                url: Some(url.clone()),
                expires: Some(expiry),
            }),
        },
        job_id,
    )
    .await?;
    app.downloads.offers.inc();
    Ok(job)
}

async fn fetch(app: &AppServer, token: &str, range: Option<String>) -> warp::reply::Response {
    let refused = |status, t: &str| {
        app.downloads.fetches_refused.inc();
        text(status, t)
    };
    if !bulk::is_token(token) {
        return refused(StatusCode::NOT_FOUND, "no such file URL");
    }
    let digest = bulk::token_digest(token);
    let row: Option<(String, String, i64, i64)> = match app.store.offer_by_digest(digest).await {
        Ok(r) => r,
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let Some((sha, state, expires, size)) = row else {
        return refused(StatusCode::NOT_FOUND, "no such file URL");
    };
    if state != "open" || expires <= app.clock.now().as_millis() {
        return refused(StatusCode::GONE, "this file is not published any more");
    }
    let range = range.and_then(|r| http::HeaderValue::from_str(&r).ok());
    bulk::serve_file(
        &published_path(app, &sha),
        u64::try_from(size).unwrap_or(0),
        range.as_ref(),
        app.downloads.bytes_served.clone(),
    )
    .await
}

/// Closes the URLs of offers whose jobs are done (every destination
/// answered or expired) or that expired. Returns how many.
pub async fn unpublish(app: &AppServer) -> Result<u64, rs_store::db::DbError> {
    let n = app.store.unpublish(app.clock.now()).await?;
    if n > 0 {
        app.downloads.unpublished.inc_by(n);
        tracing::info!("{n} offered file URL(s) closed: their jobs are done");
    }
    Ok(n)
}

/// Runs [`unpublish`] whenever a job changes (and every minute).
pub async fn unpublisher(app: Arc<AppServer>, stop: tokio_util::sync::CancellationToken) {
    let mut changed = app.jobs_changed.subscribe();
    loop {
        if let Err(e) = unpublish(&app).await {
            tracing::error!("unpublish: {e}");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            _ = changed.changed() => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
    }
}
