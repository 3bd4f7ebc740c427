//! Uploads at the application server (seed 004, Figs. 20-21): it grants
//! or refuses each bulk request (in the ingest transaction, with the
//! answer queued on the back-channel to the requester), receives the file
//! at the single-use URL it granted (resumable, constant memory), verifies
//! size and SHA-256, stores it, and announces it to subscribed service
//! modules as a `bulk-request` message whose `url` says where to fetch it.
//!
//! Files live under `data_dir/bulk/`: `partial/DIGEST` while arriving
//! (DIGEST = SHA-256 of the token, as the database keeps it), then
//! `files/REQUEST-ID` once verified.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;
use rs_net::bulk::{self, ContentRange, UPLOAD_COMPLETE, UPLOAD_LENGTH, UPLOAD_OFFSET};
use rs_node::throttle::Held;
use rs_protocol::codec::RawMessage;
use rs_protocol::model::*;
use rs_protocol::{MessageId, Reason, Timestamp};
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use warp::Filter;

use crate::AppServer;

/// `[bulk]` in appserver.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkConfig {
    /// Largest upload granted.
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    /// How long a granted URL works.
    #[serde(default = "default_grant_secs")]
    pub grant_secs: u64,
    /// Free space that must remain on the data disk after an upload for
    /// it to be granted.
    #[serde(default = "default_min_free")]
    pub min_free_disk_mb: u64,
    /// A transfer that sends nothing for this long is cut (what arrived
    /// is kept for the resume).
    #[serde(default = "default_idle")]
    pub idle_secs: u64,
    /// Where uploads (arriving and stored) and published files are kept;
    /// default `data_dir/bulk`. The members of a farm name one shared
    /// directory (NFS or a cluster file system), so an upload resumes and
    /// a published file is served through any member.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

impl Default for BulkConfig {
    fn default() -> Self {
        BulkConfig {
            max_upload_bytes: default_max_upload(),
            grant_secs: default_grant_secs(),
            min_free_disk_mb: default_min_free(),
            idle_secs: default_idle(),
            dir: None,
        }
    }
}

fn default_max_upload() -> u64 {
    16 << 30
}
fn default_grant_secs() -> u64 {
    3600
}
fn default_min_free() -> u64 {
    1024
}
fn default_idle() -> u64 {
    60
}

rs_net::counters! {
    /// Upload counters (status and metrics).
    pub struct Stats {
        granted: "uploads_total" {result = "granted"}, "Upload requests and transfers, by result.";
        refused: "uploads_total" {result = "refused"}, "Upload requests and transfers, by result.";
        completed: "uploads_total" {result = "completed"}, "Upload requests and transfers, by result.";
        mismatched: "uploads_total" {result = "mismatched"}, "Upload requests and transfers, by result.";
        /// Transfers that continued a partial file.
        resumed: "uploads_total" {result = "resumed"}, "Upload requests and transfers, by result.";
        /// Bytes written by transfers (a resumed file counts only its rest).
        bytes_received: "bulk_bytes_total" {direction = "received"}, "Bulk bytes moved, by direction.";
        /// Requests to transfer refused (unknown, used, expired URL; busy).
        transfers_refused: "bulk_refused_total" {reason = "transfer"},
            "Bulk transfers and requests refused, by reason.";
    }
}

/// The upload side of the server.
#[derive(Debug)]
pub struct Uploads {
    pub dir: PathBuf,
    pub cfg: BulkConfig,
    pub stats: Stats,
    /// Tokens (digests) with a transfer in progress: one at a time each.
    active: Mutex<HashSet<String>>,
}

pub use crate::store::{Decided, NewUpload};

impl Uploads {
    pub fn open(data_dir: &Path, cfg: BulkConfig) -> std::io::Result<Self> {
        let dir = cfg.dir.clone().unwrap_or_else(|| data_dir.join("bulk"));
        std::fs::create_dir_all(dir.join("partial"))?;
        std::fs::create_dir_all(dir.join("files"))?;
        Ok(Uploads {
            dir,
            cfg,
            stats: Stats::default(),
            active: Mutex::new(HashSet::new()),
        })
    }

    fn partial(&self, digest: &str) -> PathBuf {
        self.dir.join("partial").join(digest)
    }

    /// Where a verified upload is kept.
    pub fn file(&self, request: &str) -> PathBuf {
        self.dir.join("files").join(request)
    }

    /// Counts a decision once it is stored with its request (a repeat of
    /// a request is decided again but not stored).
    pub fn count(&self, d: &Decided) {
        let c = if d.grant.is_some() {
            &self.stats.granted
        } else {
            &self.stats.refused
        };
        c.inc();
    }

    /// Grants or refuses an upload request. `m` is the request as it
    /// arrived (its source and routing say where the answer goes).
    pub fn decide(&self, m: &RawMessage, b: &BulkRequest, now: Timestamp) -> Option<Decided> {
        let src = m.header.source()?;
        // The answer goes to the tier the request came through: the last
        // hop, or (sent directly) the proxy that polls for the source.
        let hop = m.header.routing.last().map_or_else(
            || src.component.tier().to_string(),
            |h| h.component.to_string(),
        );
        let refuse = |code: &'static str, text: String, retry: Option<Duration>| {
            tracing::info!(message_id = %m.header.id, "upload ({}) refused: {text}", b.name);
            Grant::Refused {
                reason: Reason::new(code, text),
                retry_after: retry,
            }
        };
        let mut grant = None;
        let answer = if b.size > self.cfg.max_upload_bytes {
            refuse(
                "too-large",
                format!(
                    "{} bytes exceed the upload limit of {} bytes",
                    b.size, self.cfg.max_upload_bytes
                ),
                None,
            )
        } else if let Some(free) = rs_node::throttle::free_bytes(&self.dir)
            && free < b.size.saturating_add(self.cfg.min_free_disk_mb << 20)
        {
            refuse(
                "disk-full",
                format!(
                    "{} bytes would leave less than {} MB free",
                    b.size, self.cfg.min_free_disk_mb
                ),
                Some(Duration::from_secs(600)),
            )
        } else {
            match bulk::new_token() {
                Ok(token) => {
                    let expires = now.saturating_add(Duration::from_secs(self.cfg.grant_secs));
                    grant = Some(NewUpload {
                        digest: bulk::token_digest(&token),
                        request: m.header.id.clone(),
                        component: src.component.to_string(),
                        customer: src.component.customer().to_string(),
                        name: b.name.clone(),
                        size: b.size,
                        sha256: rs_protocol::codec::sha256_hex(&b.sha256),
                        class: b.class.class.to_string(),
                        subclass: b.class.subclass.to_string(),
                        expires,
                    });
                    Grant::Granted {
                        url: format!("{}{token}", bulk::PATH),
                        expires,
                    }
                }
                Err(e) => refuse("unavailable", e, Some(Duration::from_secs(60))),
            }
        };
        let reply = Message {
            header: Header {
                id: MessageId::generate(),
                created: now,
                class: m.header.class.clone(),
                route: Route::Destination(Destination::new(
                    vec![src.component.clone()],
                    Some(now.saturating_add(Duration::from_secs(self.cfg.grant_secs))),
                )),
                routing: Default::default(),
            },
            content: Content::BulkResponse(BulkResponse {
                request: m.header.id.clone(),
                grant: answer,
            }),
        };
        Some(Decided {
            grant,
            hop,
            reply: reply.to_raw(),
        })
    }
}

pub use crate::store::uploads::UploadRow;

fn reply(status: StatusCode, text: impl Into<String>) -> warp::reply::Response {
    let mut r = warp::reply::Response::new(format!("{}\n", text.into()).into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn with(
    mut r: warp::reply::Response,
    name: &'static str,
    v: impl ToString,
) -> warp::reply::Response {
    if let Ok(v) = http::HeaderValue::from_str(&v.to_string()) {
        r.headers_mut().insert(name, v);
    }
    r
}

/// `HEAD` and `PUT /rs/v1/bulk/{token}`.
pub fn routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let head = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "bulk" / String)
            .and(warp::head())
            .then(move |token: String| {
                let app = app.clone();
                async move { probe(&app, &token).await }
            })
    };
    let put = warp::path!("rs" / "v1" / "bulk" / String)
        .and(warp::put())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(move |token: String, headers: http::HeaderMap, body| {
            let app = app.clone();
            async move { receive(&app, &token, &headers, Box::pin(body)).await }
        });
    head.boxed().or(put.boxed()).unify().boxed()
}

/// The upload a token names, if it may still be used; otherwise the answer.
async fn usable(app: &AppServer, token: &str) -> Result<UploadRow, warp::reply::Response> {
    let refused = |status: StatusCode, t: String| {
        app.uploads.stats.transfers_refused.inc();
        reply(status, t)
    };
    if !bulk::is_token(token) {
        return Err(refused(StatusCode::NOT_FOUND, "no such upload URL".into()));
    }
    let row = match app.store.upload_by_digest(bulk::token_digest(token)).await {
        Ok(Some(r)) => r,
        Ok(None) => return Err(refused(StatusCode::NOT_FOUND, "no such upload URL".into())),
        Err(e) => return Err(reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    };
    match row.state.as_str() {
        "complete" => {
            let r = refused(StatusCode::GONE, "this upload URL was used already".into());
            Err(with(with(r, UPLOAD_COMPLETE, 1), UPLOAD_OFFSET, row.size))
        }
        "failed" => Err(refused(
            StatusCode::GONE,
            format!("this upload failed: {}", row.reason.unwrap_or_default()),
        )),
        _ if row.state != "open" || row.expires <= app.clock.now().as_millis() => Err(refused(
            StatusCode::GONE,
            "this upload URL has expired".into(),
        )),
        _ => Ok(row),
    }
}

async fn probe(app: &AppServer, token: &str) -> warp::reply::Response {
    let row = match usable(app, token).await {
        Ok(r) => r,
        // A used URL still tells its sender that the file arrived.
        Err(r) if r.headers().contains_key(UPLOAD_COMPLETE) => {
            let mut r = r;
            *r.status_mut() = StatusCode::OK;
            return r;
        }
        Err(r) => return r,
    };
    let have = tokio::fs::metadata(app.uploads.partial(&row.digest))
        .await
        .map_or(0, |m| m.len());
    with(
        with(reply(StatusCode::OK, ""), UPLOAD_OFFSET, have),
        UPLOAD_LENGTH,
        row.size,
    )
}

/// Frees a token's transfer slot when the transfer ends, however it ends.
struct Active<'a>(&'a Mutex<HashSet<String>>, String);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.0.lock() {
            a.remove(&self.1);
        }
    }
}

async fn receive<S, B>(
    app: &AppServer,
    token: &str,
    headers: &http::HeaderMap,
    mut body: std::pin::Pin<Box<S>>,
) -> warp::reply::Response
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + ?Sized,
    B: bytes::Buf,
{
    let up = &app.uploads;
    let row = match usable(app, token).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let range = match headers
        .get(http::header::CONTENT_RANGE)
        .map(|v| v.to_str().ok().and_then(ContentRange::parse))
    {
        None if row.size > 0 => ContentRange {
            start: 0,
            end: row.size - 1,
            total: row.size,
        },
        Some(Some(r)) => r,
        _ => {
            return reply(
                StatusCode::BAD_REQUEST,
                "Content-Range must be bytes START-END/SIZE",
            );
        }
    };
    if range.total != row.size || range.end + 1 != row.size {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the grant is for {} bytes, sent to the end; this range is {}",
                row.size,
                range.header()
            ),
        );
    }
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared != Some(range.len()) {
        return reply(
            StatusCode::LENGTH_REQUIRED,
            "Content-Length must be given and match Content-Range",
        );
    }
    let _slot = {
        let Ok(mut a) = up.active.lock() else {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "internal lock poisoned");
        };
        if !a.insert(row.digest.clone()) {
            return reply(
                StatusCode::CONFLICT,
                "another transfer to this URL is in progress",
            );
        }
        Active(&up.active, row.digest.clone())
    };
    let Ok(component) = rs_protocol::RsId::new(&row.component) else {
        return reply(StatusCode::INTERNAL_SERVER_ERROR, "bad component in store");
    };
    let throttle = app.current_throttle();
    let _permit = match throttle.bulk_permit(&component, range.len(), 3) {
        Ok(p) => p,
        Err(Held { after, why }) => {
            up.stats.transfers_refused.inc();
            return with(
                reply(StatusCode::SERVICE_UNAVAILABLE, why),
                "retry-after",
                after.as_secs().max(1),
            );
        }
    };
    let path = up.partial(&row.digest);
    let have = tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
    if range.start != have {
        return with(
            reply(
                StatusCode::CONFLICT,
                format!("this server holds {have} bytes; send from there"),
            ),
            UPLOAD_OFFSET,
            have,
        );
    }
    // The hash covers the whole file: take up what arrived before.
    let mut hasher = if have > 0 {
        up.stats.resumed.inc();
        let p = path.clone();
        match tokio::task::spawn_blocking(move || bulk::hash_file(&p, Some(have))).await {
            Ok(Ok((n, h))) if n == have => h,
            _ => {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot read back the part received",
                );
            }
        }
    } else {
        bulk::Sha256::default()
    };
    let mut file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
    {
        Ok(f) => f,
        Err(e) => return reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let idle = Duration::from_secs(up.cfg.idle_secs.max(1));
    let mut got = 0u64;
    let cut = loop {
        match bulk::next_chunk(&mut body, idle).await {
            Ok(Some(chunk)) => {
                if got + chunk.len() as u64 > range.len() {
                    break Some("more bytes than Content-Length".to_owned());
                }
                if let Err(e) = file.write_all(&chunk).await {
                    // Keep what is whole on disk (a short write may have
                    // left part of this chunk: cut back to what the hash
                    // saw); the sender resumes from there.
                    let _ = file.flush().await;
                    let _ = file.set_len(have + got).await;
                    tracing::warn!("upload {}: {e}", row.request);
                    return with(
                        with(
                            reply(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
                            "retry-after",
                            60,
                        ),
                        UPLOAD_OFFSET,
                        have + got,
                    );
                }
                hasher.update(&chunk);
                got += chunk.len() as u64;
                up.stats.bytes_received.inc_by(chunk.len() as u64);
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    if let Err(e) = file.flush().await {
        return reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    if let Some(why) = cut {
        tracing::info!(
            "upload {}: cut after {} of {} bytes ({why}); kept for the resume",
            row.request,
            have + got,
            row.size
        );
        return with(
            reply(StatusCode::BAD_REQUEST, format!("transfer cut: {why}")),
            UPLOAD_OFFSET,
            have + got,
        );
    }
    if have + got < row.size {
        return with(reply(StatusCode::OK, "partial"), UPLOAD_OFFSET, have + got);
    }
    if let Err(e) = file.sync_all().await {
        return reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    drop(file);
    let sha = rs_protocol::codec::sha256_hex(&hasher.finish());
    if sha != row.sha256 {
        up.stats.mismatched.inc();
        let why = format!("SHA-256 {sha} differs from the {} granted", row.sha256);
        let _ = tokio::fs::remove_file(&path).await;
        if let Err(e) = app
            .store
            .fail_upload(row.digest.clone(), why.clone(), app.clock.now())
            .await
        {
            tracing::error!("upload {}: {e}", row.request);
        }
        tracing::warn!("upload {} refused: {why}", row.request);
        return reply(StatusCode::UNPROCESSABLE_ENTITY, why);
    }
    let dest = up.file(&row.request);
    if let Err(e) = tokio::fs::rename(&path, &dest).await {
        return reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    if let Some(dir) = dest.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    match app
        .store
        .complete_upload(row.digest.clone(), app.clock.now())
        .await
    {
        Ok(()) => {
            up.stats.completed.inc();
            app.stored_new();
            tracing::info!(
                "upload {} ({}, {} bytes from {}) stored",
                row.request,
                row.name,
                row.size,
                row.component
            );
            with(reply(StatusCode::CREATED, "stored"), UPLOAD_COMPLETE, 1)
        }
        Err(e) => {
            // Put it back where a retry finds it whole.
            let _ = tokio::fs::rename(&dest, &path).await;
            reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Drops partial files of grants that expired unused (every minute).
pub async fn sweep(app: Arc<AppServer>, stop: tokio_util::sync::CancellationToken) {
    loop {
        match app.store.expire_uploads(app.clock.now()).await {
            Ok(gone) => {
                for d in gone {
                    let _ = tokio::fs::remove_file(app.uploads.partial(&d)).await;
                }
            }
            Err(e) => tracing::error!("upload sweep: {e}"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// `GET /rs/v1/control/uploads` as XML (dtd/control-api.dtd, `uploads`).
pub fn encode_uploads(list: &[UploadRow]) -> Vec<u8> {
    use rs_protocol::codec::XmlOut;
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("uploads")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for u in list {
        x.open("upload")
            .attr("request", &u.request)
            .attr("component", &u.component)
            .attr("name", &u.name)
            .attr_num("size", u.size)
            .attr("sha256", &u.sha256)
            .attr("class", &u.class)
            .attr("sub", &u.subclass)
            .attr("state", &u.state)
            .attr_num("received", u.received)
            .attr_ts("granted", ts(u.granted))
            .attr_ts("expires", ts(u.expires))
            .attr_ts_opt("done", u.done_at.map(ts))
            .attr_opt("reason", u.reason.as_deref())
            .empty()
            .newline();
    }
    x.close("uploads").newline();
    buf
}

/// The control API's side of uploads: list them, fetch a stored file.
pub fn control_routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let list = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "uploads")
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and(warp::query::<std::collections::HashMap<String, String>>())
            .then(
                move |admin: crate::security::Admin,
                      q: std::collections::HashMap<String, String>| {
                    let app = app.clone();
                    async move {
                        let limit = q
                            .get("limit")
                            .and_then(|l| l.parse().ok())
                            .unwrap_or(100usize)
                            .clamp(1, 10_000);
                        match app
                            .store
                            .uploads(
                                q.get("request").cloned(),
                                q.get("component").cloned(),
                                admin.grants.customers(),
                                limit,
                            )
                            .await
                        {
                            Ok(mut rows) => {
                                for r in &mut rows {
                                    r.received = match r.state.as_str() {
                                        "complete" => r.size,
                                        _ => tokio::fs::metadata(app.uploads.partial(&r.digest))
                                            .await
                                            .map_or(0, |m| m.len()),
                                    };
                                }
                                rs_node::ingress::xml_response(encode_uploads(&rows))
                            }
                            Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                        }
                    }
                },
            )
    };
    let file = warp::path!("rs" / "v1" / "control" / "uploads" / String / "file")
        .and(warp::get())
        .and(crate::security::admin(&app))
        .then(move |request: String, admin: crate::security::Admin| {
            let app = app.clone();
            async move { fetch(&app, request, &admin.grants).await }
        });
    list.boxed().or(file.boxed()).unify().boxed()
}

/// Streams a stored upload (of a customer in `grants`: another's is as
/// unknown as one that does not exist).
async fn fetch(
    app: &AppServer,
    request: String,
    grants: &crate::security::Grants,
) -> warp::reply::Response {
    let row = match app
        .store
        .uploads(Some(request.clone()), None, grants.customers(), 1)
        .await
    {
        Ok(r) => r.into_iter().next(),
        Err(e) => return reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let Some(row) = row.filter(|r| r.state == "complete") else {
        return reply(
            StatusCode::NOT_FOUND,
            format!("no stored upload for request {request:?}"),
        );
    };
    let f = match tokio::fs::File::open(app.uploads.file(&row.request)).await {
        Ok(f) => f,
        Err(e) => return reply(StatusCode::NOT_FOUND, format!("the file is gone: {e}")),
    };
    let body = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10);
    let mut r = warp::reply::Reply::into_response(warp::reply::stream(body));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    for (k, v) in [
        (http::header::CONTENT_LENGTH.as_str(), row.size.to_string()),
        ("x-rs-sha256", row.sha256.clone()),
        (
            http::header::CONTENT_DISPOSITION.as_str(),
            format!(
                "attachment; filename=\"{}\"",
                row.name.replace(['"', '\\'], "_")
            ),
        ),
    ] {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(&v),
        ) {
            h.insert(k, v);
        }
    }
    r
}
