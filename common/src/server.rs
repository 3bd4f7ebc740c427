//! Serving a warp filter on our own accept loop (warp 0.4 has no TLS and no
//! connection bounds of its own): hyper's HTTP/1 connection driver with its
//! timer set so header read timeouts work, a semaphore bounding
//! connections, the peer address in each request's extensions, and a
//! graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;
use warp::Filter;
use warp::reject::Reject;

/// Bounds of one listener.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// The request head must arrive within this (slowloris).
    pub header_timeout: Duration,
    /// How long in-flight requests may finish after shutdown begins.
    pub grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
        }
    }
}

/// Who is on the other end of a connection, inserted into every request's
/// extensions (read it with `warp::ext::optional::<Peer>()`).
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A Unix-domain socket client (the proxy's local integrator API).
    Local,
}

/// A listener the accept loop can serve: TCP, or a Unix-domain socket.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self)
    -> impl std::future::Future<Output = std::io::Result<(Self::Io, Peer)>> + Send;
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Peer)> {
        let (s, addr) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, Peer::Tcp(addr)))
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Peer)> {
        let (s, _) = UnixListener::accept(self).await?;
        Ok((s, Peer::Local))
    }
}

/// Serves `filter` on a TCP listener until `shutdown`, then drains.
pub async fn serve_tcp<F>(
    listener: TcpListener,
    filter: F,
    cfg: ServeConfig,
    shutdown: CancellationToken,
) where
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    serve(listener, filter, cfg, shutdown).await;
}

/// Serves `filter` on a Unix-domain socket until `shutdown`, then drains.
pub async fn serve_unix<F>(
    listener: UnixListener,
    filter: F,
    cfg: ServeConfig,
    shutdown: CancellationToken,
) where
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    serve(listener, filter, cfg, shutdown).await;
}

/// The accept loop: one task per connection, at most `max_connections`.
pub async fn serve<L, F>(listener: L, filter: F, cfg: ServeConfig, shutdown: CancellationToken)
where
    L: Listener,
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let sem = Arc::new(Semaphore::new(cfg.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((io, peer)) => {
                tracker.spawn(serve_conn(
                    io,
                    peer,
                    filter.clone(),
                    cfg.clone(),
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracker.close();
    if tokio::time::timeout(cfg.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

async fn serve_conn<IO, F>(
    io: IO,
    peer: Peer,
    filter: F,
    cfg: ServeConfig,
    shutdown: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let svc = warp::service(filter);
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let mut svc = svc.clone();
        async move { svc.call(req).await.map_err(|e: Infallible| match e {}) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(cfg.grace, conn).await;
        }
    }
}

/// A warp rejection carrying a ready response (status and text), so every
/// refusal reaches the client with a clear reason.
#[derive(Debug)]
pub struct Refusal {
    pub status: http::StatusCode,
    pub text: String,
    pub retry_after: Option<Duration>,
}

impl Reject for Refusal {}

impl Refusal {
    pub fn new(status: http::StatusCode, text: impl Into<String>) -> Self {
        Refusal {
            status,
            text: text.into(),
            retry_after: None,
        }
    }

    /// The response for this refusal.
    pub fn response(&self) -> warp::reply::Response {
        let mut r = warp::reply::Response::new(format!("{}\n", self.text).into());
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(after) = self.retry_after
            && let Ok(v) = http::HeaderValue::from_str(&after.as_secs().max(1).to_string())
        {
            h.insert(http::header::RETRY_AFTER, v);
        }
        r
    }
}

/// Finishes a set of routes for serving: every reply becomes a response and
/// every rejection a plain-text refusal (see [`recover`]).
pub fn finish<F, R>(
    routes: F,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone + Send + Sync + 'static
where
    F: Filter<Extract = (R,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
    R: warp::Reply,
{
    routes
        .map(|r: R| r.into_response())
        .recover(recover)
        .unify()
}

/// Turns rejections into plain-text responses: our [`Refusal`]s as they are,
/// warp's own (unknown path, wrong method) with their status.
pub async fn recover(rej: warp::Rejection) -> Result<warp::reply::Response, Infallible> {
    if let Some(r) = rej.find::<Refusal>() {
        return Ok(r.response());
    }
    let (status, text) = if rej.is_not_found() {
        (http::StatusCode::NOT_FOUND, "no such endpoint".to_owned())
    } else if rej.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        )
    } else {
        (
            http::StatusCode::BAD_REQUEST,
            format!("bad request: {rej:?}"),
        )
    };
    Ok(Refusal::new(status, text).response())
}
