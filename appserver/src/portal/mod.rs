//! The web portal (`/portal/`): server-rendered pages (askama templates,
//! no JavaScript, nothing loaded from elsewhere) for provider staff and
//! customers, beside the control API and behind the same rules: an admin
//! certificate or an API token opens a session, the session's grants
//! scope every page and action exactly as the API scopes its answers (the
//! pages call the API's own functions), and every action is audited.
//!
//! Sessions: a random cookie (`rs_session`: HttpOnly, SameSite=Strict,
//! Secure over TLS, path `/portal/`), kept as its SHA-256 in the store (so
//! any member of a farm serves it), 12 hours at most, ended by logging out
//! or by revoking the token it was opened with. Forms carry the session's
//! CSRF token, and a POST whose `Origin` is not this server is refused.
//! Every answer carries a Content-Security-Policy that allows nothing but
//! this server's stylesheet, and forbids framing.

pub mod charts;
mod pages;

use std::collections::HashMap;
use std::sync::Arc;

use rs_net::server::{Peer, Refusal};
use warp::Filter;

use crate::AppServer;
use crate::security::{Admin, Grants, random_secret, sha256_hex};
use crate::store::admins::NewSession;

/// Where the portal lives.
pub const ROOT: &str = "/portal/";
/// Its login page (the login audits itself: it knows the token).
pub const LOGIN: &str = "/portal/login";
/// The session cookie's name.
const COOKIE: &str = "rs_session";
/// How long a session lasts.
const SESSION_HOURS: u64 = 12;
/// Form bodies are small.
const MAX_FORM: u64 = 64 * 1024;

/// The headers every portal answer carries.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The session cookie in a request's headers.
pub fn session_cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

/// The admin of a session (for the audit log), if it is open.
pub async fn session_admin(app: &AppServer, cookie: &str) -> Option<String> {
    let now = app.clock.now().as_millis();
    app.store
        .session(sha256_hex(cookie), now)
        .await
        .ok()
        .flatten()
        .map(|s| s.admin)
}

/// The admin looking at a page: the session's, with the CSRF token its
/// forms carry.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    pub admin: Admin,
    pub csrf: String,
}

impl Grants {
    /// As an admin certificate's O field and a token's `customers`.
    pub fn as_field(&self) -> String {
        match self {
            Grants::All => "*".into(),
            Grants::Some(v) => v.join(","),
        }
    }
}

/// The session of this request, if it is open and still belongs to this
/// caller: a token's while the token is good; a certificate's while the
/// same admin certificate is presented; `local`'s on a plain listener only.
async fn viewer(app: &AppServer, peer: &Peer, headers: &http::HeaderMap) -> Option<Viewer> {
    let cookie = session_cookie(headers)?;
    let now = app.clock.now().as_millis();
    let s = app.store.session(sha256_hex(&cookie), now).await.ok()??;
    if s.token.is_none() {
        let same = match peer {
            Peer::Tls(_, Some(id)) => id.role == rs_net::pki::Role::Admin && id.name == s.admin,
            Peer::Tcp(_) | Peer::Local => s.admin == "local",
            Peer::Tls(_, None) => false,
        };
        if !same {
            return None;
        }
    }
    Some(Viewer {
        admin: Admin {
            name: s.admin,
            grants: Grants::parse(&s.customers),
        },
        csrf: s.csrf,
    })
}

/// Adds the security headers every portal answer carries.
fn secured(mut r: warp::reply::Response, tls: bool) -> warp::reply::Response {
    let h = r.headers_mut();
    let set = |h: &mut http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, http::HeaderValue::from_static(v));
    };
    set(h, "content-security-policy", CSP);
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    // Not `no-referrer`: with it a browser sends `Origin: null` on its
    // own forms, which [`same_origin`] refuses.
    set(h, "referrer-policy", "same-origin");
    set(h, "cross-origin-opener-policy", "same-origin");
    set(h, "cross-origin-resource-policy", "same-origin");
    set(
        h,
        "permissions-policy",
        "camera=(), microphone=(), geolocation=()",
    );
    if !h.contains_key(http::header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    if tls {
        set(h, "strict-transport-security", "max-age=31536000");
    }
    r
}

fn html(status: http::StatusCode, body: String) -> warp::reply::Response {
    let mut r = warp::reply::Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn see_other(to: &str) -> warp::reply::Response {
    let mut r = warp::reply::Response::new(Vec::new().into());
    *r.status_mut() = http::StatusCode::SEE_OTHER;
    if let Ok(v) = http::HeaderValue::from_str(to) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

fn cookie(value: &str, max_age: u64, tls: bool) -> http::HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    http::HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path={ROOT}; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| http::HeaderValue::from_static("rs_session=; Max-Age=0"))
}

/// A POST from a page of this server: a browser's `Origin`, when sent,
/// names this host (a form posted from elsewhere is refused even before
/// its CSRF token is looked at; the login has no session to hold one).
/// The scheme is not compared: behind a proxy that ends TLS the server
/// sees plain HTTP while the browser's origin is `https`.
fn same_origin(headers: &http::HeaderMap) -> bool {
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("https://")
            .or_else(|| o.strip_prefix("http://"))
    });
    !host.is_empty() && origin_host == Some(host)
}

/// `/portal/…` (and `/portal`, the same as `/portal/`: every link is
/// absolute).
pub fn routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let get = {
        let app = app.clone();
        warp::path("portal")
            .and(warp::path::tail())
            .and(warp::get())
            .and(warp::query::<HashMap<String, String>>())
            .and(rs_net::server::peer())
            .and(warp::header::headers_cloned())
            .then(
                move |tail: warp::path::Tail, q, peer: Peer, headers: http::HeaderMap| {
                    let app = app.clone();
                    async move {
                        let tls = matches!(peer, Peer::Tls(..));
                        secured(get(&app, tail.as_str(), q, &peer, &headers).await, tls)
                    }
                },
            )
    };
    // A browser's file upload (multipart/form-data): streamed, not
    // read whole as the other forms are.
    let upload = {
        let app = app.clone();
        warp::path!("portal" / "files" / "upload")
            .and(warp::post())
            .and(rs_net::server::peer())
            .and(warp::header::headers_cloned())
            .and(warp::multipart::form().max_length(Some(crate::publish::MAX_PUBLISH + MAX_FORM)))
            .then(
                move |peer: Peer, headers: http::HeaderMap, form: warp::multipart::FormData| {
                    let app = app.clone();
                    async move {
                        let tls = matches!(peer, Peer::Tls(..));
                        secured(upload(&app, &peer, &headers, form).await, tls)
                    }
                },
            )
    };
    let post = warp::path("portal")
        .and(warp::path::tail())
        .and(warp::post())
        .and(rs_net::server::peer())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(MAX_FORM))
        .and({
            // Bounded: content_length_limit refuses a body over MAX_FORM
            // or without a Content-Length.
            #[allow(clippy::disallowed_methods)]
            warp::body::bytes()
        })
        .then(
            move |tail: warp::path::Tail,
                  peer: Peer,
                  headers: http::HeaderMap,
                  body: bytes::Bytes| {
                let app = app.clone();
                async move {
                    let tls = matches!(peer, Peer::Tls(..));
                    secured(post(&app, tail.as_str(), &peer, &headers, &body).await, tls)
                }
            },
        );
    get.or(upload).unify().or(post).unify().boxed()
}

async fn get(
    app: &Arc<AppServer>,
    tail: &str,
    q: HashMap<String, String>,
    peer: &Peer,
    headers: &http::HeaderMap,
) -> warp::reply::Response {
    match tail {
        "style.css" => {
            let mut r = warp::reply::Response::new(include_str!("style.css").into());
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/css; charset=utf-8"),
            );
            h.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("max-age=3600"),
            );
            return r;
        }
        "login" => return pages::login(app, peer, None, http::StatusCode::OK),
        _ => {}
    }
    let Some(v) = viewer(app, peer, headers).await else {
        return see_other(LOGIN);
    };
    pages::get(app, &v, tail, &q).await
}

async fn post(
    app: &Arc<AppServer>,
    tail: &str,
    peer: &Peer,
    headers: &http::HeaderMap,
    body: &[u8],
) -> warp::reply::Response {
    let tls = matches!(peer, Peer::Tls(..));
    if !same_origin(headers) {
        return Refusal::new(
            http::StatusCode::FORBIDDEN,
            "a form from another site (Origin is not this server)",
        )
        .response();
    }
    let form: HashMap<String, String> = match form_fields(body) {
        Ok(f) => f,
        Err(e) => {
            return Refusal::new(http::StatusCode::BAD_REQUEST, format!("form: {e}")).response();
        }
    };
    if tail == "login" {
        return login(app, peer, &form).await;
    }
    let Some(v) = viewer(app, peer, headers).await else {
        return Refusal::new(
            http::StatusCode::FORBIDDEN,
            "no session: log in at /portal/login",
        )
        .response();
    };
    // The form must carry this session's CSRF token.
    if !csrf_ok(form.get("csrf").map(String::as_bytes).unwrap_or(b""), &v) {
        return Refusal::new(
            http::StatusCode::FORBIDDEN,
            "the form's CSRF token is not this session's: reload the page",
        )
        .response();
    }
    match tail {
        "logout" => {
            if let Some(c) = session_cookie(headers)
                && let Err(e) = app.store.end_session(sha256_hex(&c)).await
            {
                return Refusal::new(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                    .response();
            }
            let mut r = see_other(LOGIN);
            r.headers_mut()
                .insert(http::header::SET_COOKIE, cookie("", 0, tls));
            r
        }
        _ => pages::post(app, &v, tail, &form).await,
    }
}

/// `POST /portal/files/upload`: the session's CSRF token, then the file
/// (the form puts them in this order); published as `PUT /files/{name}`
/// publishes, under the file's own name.
async fn upload(
    app: &Arc<AppServer>,
    peer: &Peer,
    headers: &http::HeaderMap,
    form: warp::multipart::FormData,
) -> warp::reply::Response {
    use futures_util::StreamExt as _;
    let refuse = |status, text: String| Refusal::new(status, text).response();
    if !same_origin(headers) {
        return refuse(
            http::StatusCode::FORBIDDEN,
            "a form from another site (Origin is not this server)".into(),
        );
    }
    let Some(v) = viewer(app, peer, headers).await else {
        return refuse(
            http::StatusCode::FORBIDDEN,
            "no session: log in at /portal/login".into(),
        );
    };
    if !v.admin.grants.is_all() {
        return refuse(
            http::StatusCode::FORBIDDEN,
            "this needs an admin of every customer".into(),
        );
    }
    // The whole request bounds the file in it.
    let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    else {
        return refuse(
            http::StatusCode::LENGTH_REQUIRED,
            "Content-Length must be given".into(),
        );
    };
    let mut form = Box::pin(form);
    let mut good = false;
    while let Some(part) = form.next().await {
        let part = match part {
            Ok(p) => p,
            Err(e) => return refuse(http::StatusCode::BAD_REQUEST, format!("upload: {e}")),
        };
        match part.name() {
            "csrf" => {
                let mut sent = Vec::new();
                let mut s = Box::pin(part.stream());
                while let Some(chunk) = s.next().await {
                    match chunk {
                        Ok(mut c) => {
                            while bytes::Buf::has_remaining(&c) {
                                let b = bytes::Buf::chunk(&c);
                                sent.extend_from_slice(b);
                                let n = b.len();
                                bytes::Buf::advance(&mut c, n);
                            }
                        }
                        Err(e) => {
                            return refuse(http::StatusCode::BAD_REQUEST, format!("upload: {e}"));
                        }
                    }
                    if sent.len() > 256 {
                        break;
                    }
                }
                good = csrf_ok(&sent, &v);
            }
            "file" if good => {
                let name = part.filename().unwrap_or("").to_owned();
                return match crate::publish::store_file(
                    app,
                    name,
                    crate::publish::Size::AtMost(len),
                    Box::pin(part.stream()),
                )
                .await
                {
                    Ok(f) => {
                        tracing::info!(
                            "portal: {} published {} ({} bytes)",
                            v.admin.name,
                            f.name,
                            f.size
                        );
                        see_other(&format!("{ROOT}files"))
                    }
                    Err((status, why)) => refuse(status, why),
                };
            }
            _ => break,
        }
    }
    refuse(
        http::StatusCode::FORBIDDEN,
        "the form's CSRF token is not this session's (it must come before the file): reload the page".into(),
    )
}

/// `application/x-www-form-urlencoded`, each name once.
fn form_fields(body: &[u8]) -> Result<HashMap<String, String>, String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|e| e.to_string())?;
    let mut out = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if out.contains_key(&k) {
            return Err(format!("{k:?} given twice"));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// Whether a form's `csrf` field is this session's token (compared in
/// constant time).
fn csrf_ok(sent: &[u8], v: &Viewer) -> bool {
    sent.len() == v.csrf.len() && openssl::memcmp::eq(sent, v.csrf.as_bytes())
}

/// `POST /portal/login`: with `token`, an API token; with `certificate`,
/// the admin certificate presented (or `local` on a plain listener).
async fn login(
    app: &Arc<AppServer>,
    peer: &Peer,
    form: &HashMap<String, String>,
) -> warp::reply::Response {
    let started = std::time::Instant::now();
    let tls = matches!(peer, Peer::Tls(..));
    let token = form
        .get("token")
        .map(|t| t.trim())
        .filter(|t| !t.is_empty());
    let who = match token {
        Some(t) => crate::security::token_admin(app, t).await,
        None if form.contains_key("certificate") => crate::security::caller(app, peer, None).await,
        None => Err(Refusal::new(
            http::StatusCode::BAD_REQUEST,
            "type an API token, or use your certificate",
        )),
    };
    let (response, audited_as) = match who {
        Ok(admin) => match open_session(app, &admin, token.is_some(), tls).await {
            Ok(r) => (r, admin.name),
            Err(e) => {
                tracing::error!("portal session: {e}");
                (
                    Refusal::new(http::StatusCode::SERVICE_UNAVAILABLE, e).response(),
                    admin.name,
                )
            }
        },
        Err(refusal) => {
            let status = refusal.status;
            let name = match token {
                Some(_) => "(unknown token)".into(),
                None => "(no certificate)".into(),
            };
            (pages::login(app, peer, Some(&refusal.text), status), name)
        }
    };
    let from = match peer {
        Peer::Tls(a, _) | Peer::Tcp(a) => a.to_string(),
        Peer::Local => "local".into(),
    };
    let now = app.clock.now().as_millis();
    let r = app
        .store
        .audit_record(
            now,
            audited_as,
            from,
            "POST".into(),
            LOGIN.into(),
            i64::from(response.status().as_u16()),
            started.elapsed().as_millis() as i64,
        )
        .await;
    if let Err(e) = r {
        tracing::error!("audit log: {e}");
    }
    response
}

async fn open_session(
    app: &AppServer,
    admin: &Admin,
    by_token: bool,
    tls: bool,
) -> Result<warp::reply::Response, String> {
    let secret = random_secret("", 32)?;
    let csrf = random_secret("", 24)?;
    let now = app.clock.now();
    let life = std::time::Duration::from_secs(SESSION_HOURS * 3600);
    app.store
        .open_session(NewSession {
            hash: sha256_hex(&secret),
            admin: admin.name.clone(),
            customers: admin.grants.as_field(),
            token: by_token.then(|| {
                admin
                    .name
                    .strip_prefix("token:")
                    .unwrap_or(&admin.name)
                    .to_owned()
            }),
            csrf,
            created: now.as_millis(),
            expires: now.saturating_add(life).as_millis(),
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut r = see_other(ROOT);
    r.headers_mut().insert(
        http::header::SET_COOKIE,
        cookie(&secret, life.as_secs(), tls),
    );
    Ok(r)
}
