//! The local integrator API: HTTP/1.1 with JSON bodies on the proxy's
//! Unix-domain socket, so an integrator in any language (or `curl
//! --unix-socket`) can use it. Every send answers with the message ID only
//! once the message is durably spooled. See docs/integrators.md.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use http::StatusCode;
use rs_protocol::RsId;
use rs_protocol::model::*;
use rs_store::spool::Spool as _;
use serde::{Deserialize, Serialize};
use warp::Filter;

use crate::{Proxy, SubmitError};

/// Largest request body accepted.
const MAX_BODY: u64 = 1 << 20;

/// Longest alarm key (an attribute on the wire: escaped, it stays within
/// the codec's attribute limit).
const MAX_KEY: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterIntegrator {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub platform: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterInstance {
    /// The integrator's RS ID or name.
    pub integrator: String,
    /// The systems-management ID (host name, address, agent ID).
    pub sm_id: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// One alarm, event or data message.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// The integrator's RS ID or name.
    pub integrator: String,
    /// The support instance's systems-management ID (registered on first use).
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default)]
    pub severity: Option<String>,
    /// Alarms: raised (default), updated or cleared.
    #[serde(default)]
    pub state: Option<String>,
    /// Alarms: the integrator's key correlating raise, update and clear.
    #[serde(default)]
    pub key: Option<String>,
    /// Events: what kind (a token).
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub details: BTreeMap<String, String>,
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub subclass: Option<String>,
    /// 0-9; defaults by type and severity.
    #[serde(default)]
    pub precedence: Option<u8>,
    /// Seconds until the message is worthless.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub persistent: Option<bool>,
    /// Data: MIME type.
    #[serde(default)]
    pub mime: Option<String>,
    /// Data: the bytes as text.
    #[serde(default)]
    pub data: Option<String>,
    /// Data: the bytes in base64.
    #[serde(default)]
    pub data_base64: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Sent {
    pub message_id: String,
}

/// Most messages in one batch.
pub const MAX_BATCH: usize = 1000;

/// Largest batch request body accepted.
const MAX_BATCH_BODY: u64 = 8 << 20;

/// One message of a batch, tagged with its type: `{"alarm": {...}}`,
/// `{"event": {...}}` or `{"data": {...}}`, each holding what
/// `POST /v1/alarm` (`event`, `data`) takes.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchItem {
    Alarm(SendRequest),
    Event(SendRequest),
    Data(SendRequest),
}

impl BatchItem {
    fn split(self) -> (ContentKind, SendRequest) {
        match self {
            BatchItem::Alarm(r) => (ContentKind::Alarm, r),
            BatchItem::Event(r) => (ContentKind::Event, r),
            BatchItem::Data(r) => (ContentKind::Data, r),
        }
    }
}

/// `POST /v1/batch`: many messages in one call, spooled in one
/// transaction.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub messages: Vec<BatchItem>,
}

/// What became of one message of a batch: its ID once durably spooled, or
/// why not, with the status `POST /v1/alarm` would have answered.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BatchResult {
    Sent { message_id: String },
    Failed { status: u16, error: String },
}

/// The answer to a batch: one result per message, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchReply {
    pub results: Vec<BatchResult>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Registered {
    pub id: String,
}

#[derive(Debug, Serialize)]
struct ApiError {
    error: String,
}

type Reply = warp::reply::Response;

fn json<T: Serialize>(status: StatusCode, v: &T) -> Reply {
    let mut r = warp::reply::Response::new(serde_json::to_vec(v).unwrap_or_default().into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, text: impl Into<String>) -> Reply {
    json(status, &ApiError { error: text.into() })
}

fn body<T: serde::de::DeserializeOwned + Send>()
-> impl Filter<Extract = (T,), Error = warp::Rejection> + Clone {
    warp::body::content_length_limit(MAX_BODY).and(warp::body::json())
}

/// The API's routes, finished for serving.
/// The API on the Unix socket.
pub fn routes(
    proxy: Arc<Proxy>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
+ Clone
+ Send
+ Sync
+ 'static {
    rs_net::server::finish(api(proxy))
}

/// The API on the loopback TCP listener bound to `bound`: only for requests
/// addressed to it. A web page the user visits can make the browser send
/// requests to 127.0.0.1 under a name the page's site controls (DNS
/// rebinding); such a request carries that name as its `Host`, and is
/// refused here before it can register, send or read anything.
pub fn tcp_routes(
    proxy: Arc<Proxy>,
    bound: std::net::SocketAddr,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
+ Clone
+ Send
+ Sync
+ 'static {
    rs_net::server::finish(local_host(bound).and(api(proxy)))
}

fn local_host(
    bound: std::net::SocketAddr,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::header::optional::<String>("host")
        .and_then(move |h: Option<String>| async move {
            match h {
                Some(h) if !is_local_host(&h, bound) => {
                    Err(warp::reject::custom(rs_net::server::Refusal::new(
                        StatusCode::FORBIDDEN,
                        format!(
                            "Host {h:?} is not this proxy's integrator API: address it as \
                             localhost:{port} or {bound}",
                            port = bound.port()
                        ),
                    )))
                }
                _ => Ok(()),
            }
        })
        .untuple_one()
}

/// True for `localhost`, or a loopback address, with `bound`'s port or
/// none.
fn is_local_host(host: &str, bound: std::net::SocketAddr) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((name, "")) => (name, None),
            Some((name, p)) => match p.strip_prefix(':') {
                Some(p) => (name, Some(p)),
                None => return false,
            },
            None => return false,
        },
        None => match host.split_once(':') {
            Some((name, p)) => (name, Some(p)),
            None => (host, None),
        },
    };
    let name_ok = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    name_ok && port.is_none_or(|p| p.parse::<u16>() == Ok(bound.port()))
}

/// Gives the integrator socket its configured permissions and group.
pub fn secure_socket(cfg: &crate::Config) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = &cfg.socket;
    let mode = cfg.socket_mode().map_err(anyhow::Error::msg)?;
    if let Some(g) = &cfg.socket_group {
        let group = nix::unistd::Group::from_name(g)
            .map_err(|e| anyhow::anyhow!("socket_group {g:?}: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("socket_group {g:?}: no such group"))?;
        nix::unistd::chown(path.as_path(), None, Some(group.gid))
            .map_err(|e| anyhow::anyhow!("socket_group {g:?} on {}: {e}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("socket_mode on {}: {e}", path.display()))?;
    Ok(())
}

fn api(
    proxy: Arc<Proxy>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
+ Clone
+ Send
+ Sync
+ 'static {
    let p = warp::any().map(move || proxy.clone());
    let register = warp::path!("v1" / "integrators")
        .and(warp::post())
        .and(p.clone())
        .and(body::<RegisterIntegrator>())
        .then(|proxy: Arc<Proxy>, req: RegisterIntegrator| async move {
            if !rs_protocol::codec::is_token(&req.name) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "name must be 1-64 characters of [A-Za-z0-9._-]",
                );
            }
            match proxy
                .registry
                .register_integrator(
                    req.name,
                    req.version.unwrap_or_else(|| "0".into()),
                    req.platform.unwrap_or_else(|| std::env::consts::OS.into()),
                )
                .await
            {
                Ok(i) => json(
                    StatusCode::OK,
                    &Registered {
                        id: i.id.to_string(),
                    },
                ),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        });
    let deregister = warp::path!("v1" / "integrators" / String)
        .and(warp::delete())
        .and(p.clone())
        .then(|id: String, proxy: Arc<Proxy>| async move {
            let Ok(id) = RsId::new(&id) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{id:?} is not an integrator ID"),
                );
            };
            match proxy.registry.deregister_integrator(id).await {
                Ok(true) => json(StatusCode::OK, &serde_json::json!({"deregistered": true})),
                Ok(false) => error(StatusCode::NOT_FOUND, "no such integrator"),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        });
    let instance = warp::path!("v1" / "instances")
        .and(warp::post())
        .and(p.clone())
        .and(body::<RegisterInstance>())
        .then(|proxy: Arc<Proxy>, req: RegisterInstance| async move {
            let integ = match proxy.registry.integrator(req.integrator.clone()).await {
                Ok(Some(i)) => i,
                Ok(None) => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("no integrator {:?}; register it first", req.integrator),
                    );
                }
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            };
            if req.sm_id.is_empty() || req.sm_id.len() > 255 {
                return error(StatusCode::BAD_REQUEST, "sm_id must be 1 to 255 bytes");
            }
            match proxy.registry.instance(integ.id, req.sm_id, req.name).await {
                Ok(i) => json(
                    StatusCode::OK,
                    &Registered {
                        id: i.id.to_string(),
                    },
                ),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        });
    let send = warp::path!("v1" / String)
        .and(warp::post())
        .and(p.clone())
        .and(body::<SendRequest>())
        .then(
            |what: String, proxy: Arc<Proxy>, req: SendRequest| async move {
                let kind = match what.as_str() {
                    "alarm" => ContentKind::Alarm,
                    "event" => ContentKind::Event,
                    "data" => ContentKind::Data,
                    other => {
                        return error(StatusCode::NOT_FOUND, format!("no endpoint /v1/{other}"));
                    }
                };
                match send(&proxy, kind, req).await {
                    Ok(id) => json(StatusCode::OK, &Sent { message_id: id }),
                    Err(e) => {
                        let (status, text) = refusal(e);
                        error(status, text)
                    }
                }
            },
        );
    let batch = warp::path!("v1" / "batch")
        .and(warp::post())
        .and(p.clone())
        .and(warp::body::content_length_limit(MAX_BATCH_BODY).and(warp::body::json()))
        .then(|proxy: Arc<Proxy>, req: BatchRequest| async move {
            if req.messages.len() > MAX_BATCH {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("at most {MAX_BATCH} messages in a batch"),
                );
            }
            json(
                StatusCode::OK,
                &BatchReply {
                    results: send_batch(&proxy, req.messages).await,
                },
            )
        });
    let status = warp::path!("v1" / "status").and(warp::get()).and(p.clone()).then(|proxy: Arc<Proxy>| async move {
        let spool = proxy.spool.stats().await.unwrap_or_default();
        // A damaged spool this start moved aside, while the file is there.
        let recovery = proxy
            .spool_recovery
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .filter(|r| r.moved_to.exists())
            .map(|r| serde_json::json!({
                "at": r.at.to_string(),
                "moved_to": r.moved_to.display().to_string(),
                "problem": r.problem,
                "salvaged": r.salvaged,
            }));
        let st = &proxy.sender_stats;
        let last_error = st.last_error.lock().ok().and_then(|l| l.clone());
        json(
            StatusCode::OK,
            &serde_json::json!({
                "id": proxy.id.to_string(),
                // `spool` counts persist across restarts; the sections
                // after it count since this process started.
                "started": proxy.started.to_string(),
                "spool": {
                    "messages": spool.messages, "bytes": spool.bytes,
                    "dead_letters": spool.dead_letters, "delivered_total": spool.delivered_total,
                    "expired_total": spool.expired_total, "evicted_total": spool.evicted_total,
                    "aged_out_total": spool.aged_out_total, "refused_total": spool.refused_total,
                },
                "spool_recovery": recovery,
                "upstream": {
                    "connected": st.connected.load(Ordering::Relaxed),
                    "posts_ok": st.posts_ok.get(),
                    "posts_failed": st.posts_failed.get(),
                    "accepted": st.accepted.get(),
                    "retried": st.retried.get(),
                    "rejected": st.rejected.get(),
                    "last_error": last_error,
                    "multi_sent": st.multi_sent.get(),
                    "route_moves": st.routes.moves(),
                    "hedged": st.routes.hedged(),
                    // Each route as the route choice sees it.
                    "routes": st.routes.snapshot().into_iter().map(|r| serde_json::json!({
                        "url": r.url, "messages": r.messages, "bulk": r.bulk, "up": r.up,
                        "delay_ms": r.delay.map(|d| (d * 1000.0).round() as u64),
                        "throughput_bytes_per_s": r.throughput.map(|t| t.round() as u64),
                        "posts": r.posts, "failed": r.failed, "last_error": r.last_error,
                    })).collect::<Vec<_>>(),
                },
                "throttle": {
                    "held": st.throttled.get(),
                },
                "backchannel": {
                    "applied": proxy.stats.actions_applied.get(),
                    "duplicates": proxy.stats.actions_duplicate.get(),
                },
                "seal": proxy.sealer.as_ref().map(|s| serde_json::json!({
                    "sealed": s.stats.sealed.get(),
                    "failed": s.stats.seal_failed.get(),
                })),
                "forwarding": !proxy.paused.load(Ordering::Relaxed),
                "uploads": proxy.uploads.counts().await.unwrap_or_default().into_iter().collect::<BTreeMap<_, _>>(),
            }),
        )
    });
    let dead = warp::path!("v1" / "dead-letters").and(warp::get()).and(p.clone()).then(|proxy: Arc<Proxy>| async move {
        match proxy.spool.dead_letters(1000).await {
            Ok(list) => json(
                StatusCode::OK,
                &list
                    .iter()
                    .map(|d| serde_json::json!({"id": d.id.to_string(), "at": d.at.to_string(), "code": d.reason.code.as_str(), "reason": d.reason.text}))
                    .collect::<Vec<_>>(),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    });
    let drops = warp::path!("v1" / "drops").and(warp::get()).and(p.clone()).then(|proxy: Arc<Proxy>| async move {
        match proxy.spool.drops(1000).await {
            Ok(list) => json(
                StatusCode::OK,
                &list
                    .iter()
                    .map(|d| serde_json::json!({"id": d.id.to_string(), "at": d.at.to_string(), "why": d.why, "precedence": d.precedence, "persistent": d.persistent}))
                    .collect::<Vec<_>>(),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    });
    // Where one message is (`rs-proxy trace`): still here (and why it
    // waits: the next hop's state), dead-lettered, dropped, or gone (sent
    // on: the centre's `rsctl trace` has its hops from there).
    let trace = warp::path!("v1" / "messages" / String)
        .and(warp::get())
        .and(p.clone())
        .then(|id: String, proxy: Arc<Proxy>| async move {
            let id = match rs_protocol::MessageId::new(id) {
                Ok(id) => id,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("message ID: {e}")),
            };
            let fate = match proxy.spool.fate(id.clone()).await {
                Ok(f) => f,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            };
            let st = &proxy.sender_stats;
            let (state, reason) = match fate {
                rs_store::spool::Fate::Waiting => ("waiting", None),
                rs_store::spool::Fate::Dead(r) => (
                    "dead-letter",
                    Some(format!("{}: {}", r.code.as_str(), r.text)),
                ),
                rs_store::spool::Fate::Dropped(why) => ("dropped", Some(why)),
                rs_store::spool::Fate::Gone => ("gone", None),
            };
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "id": id.as_str(),
                    "state": state,
                    "reason": reason,
                    "upstream": {
                        "urls": proxy.cfg.upstream.urls,
                        "connected": st.connected.load(Ordering::Relaxed),
                        "last_error": st.last_error.lock().ok().and_then(|l| l.clone()),
                    },
                    "forwarding": !proxy.paused.load(Ordering::Relaxed),
                }),
            )
        });
    let upload = warp::path!("v1" / "uploads")
        .and(warp::post())
        .and(p.clone())
        .and(body::<crate::bulk::UploadRequest>())
        .then(
            |proxy: Arc<Proxy>, req: crate::bulk::UploadRequest| async move {
                match crate::bulk::start(&proxy, req).await {
                    Ok(u) => json(StatusCode::OK, &u),
                    Err(SubmitError::Invalid(t)) => error(StatusCode::BAD_REQUEST, t),
                    Err(SubmitError::Refused(r)) => {
                        error(StatusCode::INSUFFICIENT_STORAGE, r.to_string())
                    }
                    Err(SubmitError::Storage(t)) => error(StatusCode::SERVICE_UNAVAILABLE, t),
                }
            },
        );
    let uploads = warp::path!("v1" / "uploads")
        .and(warp::get())
        .and(p.clone())
        .then(|proxy: Arc<Proxy>| async move {
            match proxy.uploads.list(1000).await {
                Ok(list) => json(StatusCode::OK, &list),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        });
    let upload_get = warp::path!("v1" / "uploads" / String)
        .and(warp::get())
        .and(p.clone())
        .then(|id: String, proxy: Arc<Proxy>| async move {
            match proxy.uploads.get(id.clone()).await {
                Ok(Some(u)) => json(StatusCode::OK, &u),
                Ok(None) => error(StatusCode::NOT_FOUND, format!("no upload {id:?}")),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        });
    let downloads = warp::path!("v1" / "downloads")
        .and(warp::get())
        .and(p)
        .then(|proxy: Arc<Proxy>| async move {
            match crate::download::list(&proxy, 1000).await {
                Ok(list) => json(StatusCode::OK, &list),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        });
    upload
        .or(downloads)
        .unify()
        .or(uploads)
        .unify()
        .or(upload_get)
        .unify()
        .or(register)
        .unify()
        .or(deregister)
        .unify()
        .or(instance)
        .unify()
        .or(status)
        .unify()
        .or(dead)
        .unify()
        .or(drops)
        .unify()
        .or(trace)
        .unify()
        .or(batch)
        .unify()
        .or(send)
        .unify()
}

fn default_precedence(kind: ContentKind, severity: Severity) -> u8 {
    match (kind, severity) {
        (ContentKind::Alarm, Severity::Critical) => 9,
        (ContentKind::Alarm, Severity::Major) => 8,
        (ContentKind::Alarm, Severity::Minor) => 7,
        (ContentKind::Alarm, _) => 6,
        (ContentKind::Event, _) => 4,
        _ => 3,
    }
}

/// Builds and spools one message from an API request.
pub async fn send(
    proxy: &Proxy,
    kind: ContentKind,
    req: SendRequest,
) -> Result<String, SubmitError> {
    let raw = build(proxy, kind, req).await?;
    proxy.submit_raw(raw).await.map(|id| id.to_string())
}

/// The status and text a refused send answers with.
fn refusal(e: SubmitError) -> (StatusCode, String) {
    match e {
        SubmitError::Invalid(t) => (StatusCode::BAD_REQUEST, t),
        SubmitError::Refused(r) => (StatusCode::INSUFFICIENT_STORAGE, r.to_string()),
        SubmitError::Storage(t) => (StatusCode::SERVICE_UNAVAILABLE, t),
    }
}

/// Builds every message of a batch and spools those that are valid in one
/// transaction (one fsync for all); a bad one is refused alone.
pub async fn send_batch(proxy: &Proxy, items: Vec<BatchItem>) -> Vec<BatchResult> {
    let failed = |e: SubmitError| {
        let (status, error) = refusal(e);
        BatchResult::Failed {
            status: status.as_u16(),
            error,
        }
    };
    let mut results = Vec::with_capacity(items.len());
    let mut raws = Vec::with_capacity(items.len());
    for item in items {
        let (kind, req) = item.split();
        match build(proxy, kind, req).await {
            Ok(raw) => {
                results.push(None);
                raws.push(raw);
            }
            Err(e) => results.push(Some(failed(e))),
        }
    }
    let mut spooled = proxy.submit_many(raws).await.into_iter();
    results
        .into_iter()
        .map(|r| match r {
            Some(f) => f,
            None => match spooled.next() {
                Some(Ok(id)) => BatchResult::Sent {
                    message_id: id.to_string(),
                },
                Some(Err(e)) => failed(e),
                None => failed(SubmitError::Storage("the spool gave no answer".into())),
            },
        })
        .collect()
}

/// Builds one message from an API request, checking everything in it.
async fn build(
    proxy: &Proxy,
    kind: ContentKind,
    req: SendRequest,
) -> Result<rs_protocol::codec::RawMessage, SubmitError> {
    let bad = |t: String| SubmitError::Invalid(t);
    let (integ, instance) = proxy
        .registry
        .resolve(&req.integrator, req.instance.as_deref())
        .await?;
    let severity = match &req.severity {
        Some(s) => Severity::parse(s).ok_or_else(|| {
            bad(format!(
                "severity {s:?}: one of critical, major, minor, warning, info"
            ))
        })?,
        None if kind == ContentKind::Alarm => return Err(bad("an alarm needs a severity".into())),
        None => Severity::Info,
    };
    let (def_class, def_sub) = match kind {
        ContentKind::Alarm => ("monitoring", "alarm"),
        ContentKind::Event => ("monitoring", "event"),
        _ => ("data", "generic"),
    };
    let class = Classification::new(
        req.class.clone().unwrap_or_else(|| def_class.into()),
        req.subclass.clone().unwrap_or_else(|| def_sub.into()),
    );
    for t in [&class.class, &class.subclass] {
        if !rs_protocol::codec::is_token(t) {
            return Err(bad(format!(
                "class/subclass {t:?}: 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
    }
    let precedence = req
        .precedence
        .unwrap_or_else(|| default_precedence(kind, severity));
    if precedence > MAX_PRECEDENCE {
        return Err(bad("precedence must be 0 to 9".into()));
    }
    let ttl = Duration::from_secs(req.ttl_secs.unwrap_or(match kind {
        ContentKind::Alarm => 7 * 86_400,
        _ => 86_400,
    }));
    let now = proxy.clock.now();
    let qos = Qos {
        expiry: Some(now.saturating_add(ttl)),
        precedence,
        persistent: req.persistent.unwrap_or(true),
    };
    // Everything that goes into the message is checked here, so what is
    // spooled always encodes to what every tier's decoder takes (the
    // codec's default limits) without parsing it back.
    let limits = rs_protocol::codec::Limits::default();
    if req.details.len() + 2 > limits.max_elements {
        return Err(bad(format!("at most {} details", limits.max_elements - 2)));
    }
    if let Some(k) = &req.key {
        if k.len() > MAX_KEY {
            return Err(bad(format!("key longer than {MAX_KEY} bytes")));
        }
        check_text(k)?;
    }
    let mut details = Vec::new();
    for (k, v) in &req.details {
        if !rs_protocol::codec::is_token(k) {
            return Err(bad(format!(
                "detail name {k:?}: 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        check_text(v)?;
        details.push(Detail::new(k.clone(), v.clone()));
    }
    let text = req.text.clone().unwrap_or_default();
    check_text(&text)?;
    let content = match kind {
        ContentKind::Alarm => Content::Alarm(Alarm {
            severity,
            state: match req.state.as_deref() {
                None => AlarmState::Raised,
                Some(s) => AlarmState::parse(s)
                    .ok_or_else(|| bad(format!("state {s:?}: raised, updated or cleared")))?,
            },
            instance: instance.clone(),
            key: req.key.clone(),
            text,
            details,
        }),
        ContentKind::Event => {
            if let Some(k) = &req.kind
                && !rs_protocol::codec::is_token(k)
            {
                return Err(bad(format!(
                    "kind {k:?}: 1-64 characters of [A-Za-z0-9._-]"
                )));
            }
            Content::Event(Event {
                severity,
                instance: instance.clone(),
                kind: req.kind.clone(),
                text,
                details,
            })
        }
        _ => {
            let bytes = match (&req.data, &req.data_base64) {
                (Some(t), None) => t.clone().into_bytes(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| bad(format!("data_base64: {e}")))?,
                _ => return Err(bad("data needs exactly one of data or data_base64".into())),
            };
            let mime = req
                .mime
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into());
            if !rs_protocol::codec::is_mime_type(&mime) {
                return Err(bad(format!(
                    "mime {mime:?}: type/subtype[; parameters], printable ASCII, at most 255 bytes"
                )));
            }
            Content::Data(Data {
                mime,
                encoding: TransferEncoding::Binary,
                bytes: bytes.into(),
            })
        }
    };
    let source = instance.unwrap_or_else(|| integ.id.clone());
    let header = proxy.header(source, integ.version.clone(), class, qos);
    let raw = Message { header, content }.to_raw();
    if raw.content.len() > limits.max_part_bytes {
        return Err(bad(format!(
            "the message encodes to {} bytes, more than {}",
            raw.content.len(),
            limits.max_part_bytes
        )));
    }
    Ok(raw)
}

/// Text XML 1.0 can carry, at most 256 KiB.
fn check_text(t: &str) -> Result<(), SubmitError> {
    if t.len() > 256 << 10 {
        return Err(SubmitError::Invalid("text longer than 256 KiB".into()));
    }
    if let Some((_, c)) = rs_protocol::codec::first_illegal_char(t) {
        return Err(SubmitError::Invalid(format!(
            "character U+{:04X} cannot be sent (XML 1.0 does not allow it)",
            c as u32
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_local_host;

    #[test]
    fn only_this_listener_is_a_local_host() {
        let bound: std::net::SocketAddr = "127.0.0.1:8449".parse().unwrap();
        for ok in [
            "localhost",
            "LOCALHOST:8449",
            "127.0.0.1:8449",
            "127.0.0.1",
            "[::1]:8449",
            "[::1]",
        ] {
            assert!(is_local_host(ok, bound), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8449",
            "localhost:8450",
            "127.0.0.1:80",
            "10.0.0.1:8449",
            "localhost.evil.example:8449",
            "[::1]x",
            "[::1",
            "localhost:",
            "",
        ] {
            assert!(!is_local_host(bad, bound), "{bad}");
        }
    }
}
