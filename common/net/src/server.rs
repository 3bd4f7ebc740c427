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

use crate::pki::Identity;
use crate::tls::{Revocations, TlsServer};

pub use crate::refusal::Refusal;

/// Passes requests from any verified certificate (component or admin), or
/// from anyone on a plain listener; refuses anonymous TLS callers.
pub fn authenticated()
-> impl Filter<Extract = (), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    peer()
        .and_then(|p: Peer| async move {
            match p {
                Peer::Tls(_, None) => Err(warp::reject::custom(Refusal::new(
                    http::StatusCode::UNAUTHORIZED,
                    "a client certificate is required",
                ))),
                _ => Ok(()),
            }
        })
        .untuple_one()
}

/// Bounds of one listener.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// The request head must arrive within this (slowloris).
    pub header_timeout: Duration,
    /// How long in-flight requests may finish after shutdown begins.
    pub grace: Duration,
    /// Told of every response (the appserver's audit log).
    pub observer: Option<Arc<dyn Observer>>,
    /// Whether a new connection may be accepted now (a memory bound);
    /// while it says no, the loop accepts nothing and the connections wait
    /// in the kernel's accept queue.
    pub admit: Option<Admission>,
}

/// A gate on accepting connections ([`ServeConfig::admit`]).
#[derive(Clone)]
pub struct Admission(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission")
    }
}

/// How often a closed gate is looked at again.
const ADMIT_AGAIN: Duration = Duration::from_millis(50);

/// Sees the outcome of the requests it asks about once their response
/// head is ready.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Whether to see this request (its head is kept for [`responded`]
    /// only if so: the envelopes on the forward path pay nothing).
    ///
    /// [`responded`]: Observer::responded
    fn wants(&self, method: &http::Method, uri: &http::Uri) -> bool;

    /// `head`: the request's method, URI and headers.
    fn responded(&self, peer: &Peer, head: &RequestHead, status: http::StatusCode, took: Duration);
}

/// What an [`Observer`] sees of a request.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            observer: None,
            admit: None,
        }
    }
}

/// Who is on the other end of a connection, inserted into every request's
/// extensions (read it with `warp::ext::optional::<Peer>()`).
#[derive(Debug, Clone)]
pub enum Peer {
    /// Plain HTTP over TCP (TLS off: loopback, benchmarks).
    Tcp(SocketAddr),
    /// TLS over TCP, with the identity of the verified client certificate
    /// (`None`: the client presented none).
    Tls(SocketAddr, Option<Arc<Identity>>),
    /// A Unix-domain socket client (the proxy's local integrator API).
    Local,
}

impl Peer {
    /// The verified identity, when the peer presented a certificate.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Peer::Tls(_, Some(i)) => Some(i),
            _ => None,
        }
    }

    /// True when the connection is plain TCP (no TLS configured).
    pub fn is_plain(&self) -> bool {
        matches!(self, Peer::Tcp(_))
    }
}

/// Who is calling, as a filter (requests served by something other than
/// our accept loop count as plain).
pub fn peer() -> impl Filter<Extract = (Peer,), Error = Infallible> + Clone + Send + Sync + 'static
{
    warp::ext::optional::<Peer>()
        .map(|p: Option<Peer>| p.unwrap_or(Peer::Tcp(SocketAddr::from(([0, 0, 0, 0], 0)))))
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

/// Serves `filter` on a TCP listener until `shutdown`, then drains; over
/// TLS when `tls` is given.
pub async fn serve_tcp<F>(
    listener: TcpListener,
    tls: Option<Arc<TlsServer>>,
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
    serve(listener, tls, filter, cfg, shutdown).await;
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
    serve(listener, None, filter, cfg, shutdown).await;
}

/// The accept loop: one task per connection, at most `max_connections`;
/// with `tls`, each connection's handshake runs in its own task, bounded by
/// the header timeout.
pub async fn serve<L, F>(
    listener: L,
    tls: Option<Arc<TlsServer>>,
    filter: F,
    cfg: ServeConfig,
    shutdown: CancellationToken,
) where
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
        if let Some(admit) = &cfg.admit
            && !admit.0()
        {
            // Over the bound: nothing new until it is back under (what is
            // served goes on, and frees what it holds as it ends).
            let mut closed = true;
            while closed {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ADMIT_AGAIN) => closed = !admit.0(),
                }
            }
            if closed {
                break;
            }
        }
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((io, peer)) => match (&tls, peer) {
                (Some(tls), Peer::Tcp(addr)) => {
                    tracker.spawn(handshake(
                        tls.clone(),
                        io,
                        addr,
                        filter.clone(),
                        cfg.clone(),
                        shutdown.clone(),
                        permit,
                    ));
                }
                (_, peer) => {
                    tracker.spawn(serve_conn(
                        io,
                        peer,
                        filter.clone(),
                        cfg.clone(),
                        shutdown.clone(),
                        permit,
                        None,
                    ));
                }
            },
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

/// The TLS handshake of one connection (within the header timeout, so a
/// client that never finishes it cannot hold a slot), then its requests.
async fn handshake<IO, F>(
    tls: Arc<TlsServer>,
    io: IO,
    addr: SocketAddr,
    filter: F,
    cfg: ServeConfig,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let ssl = match openssl::ssl::Ssl::new(tls.acceptor.context()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("TLS: {e}");
            return;
        }
    };
    let Ok(mut stream) = tokio_openssl::SslStream::new(ssl, io) else {
        return;
    };
    // Not cut short by a shutdown: a connection accepted just before one
    // (or before a reload) is served its first request, within the grace.
    let done =
        tokio::time::timeout(cfg.header_timeout, std::pin::Pin::new(&mut stream).accept()).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tls.stats.failed(stream.ssl());
            tracing::info!("TLS handshake with {addr} failed: {e}");
            return;
        }
        Err(_) => {
            tls.stats.timeout.inc();
            tracing::info!("TLS handshake with {addr} timed out");
            return;
        }
    }
    tls.stats.handshakes.inc();
    let identity = match stream.ssl().peer_certificate() {
        Some(c) => match Identity::from_cert(&c) {
            Ok(i) => Some(Arc::new(i)),
            Err(e) => {
                // Signed by our CA but not one of ours in form: refuse.
                tls.stats.identity.inc();
                tracing::warn!("{addr}: {e}");
                return;
            }
        },
        None => None,
    };
    if let Some(i) = &identity
        && tls.revocations.is_revoked(&i.serial)
    {
        // A resumed session skips the handshake's revocation check.
        tls.stats.revoked.inc();
        tracing::info!(
            "{addr}: resumed a session of revoked certificate {}",
            i.serial
        );
        return;
    }
    serve_conn(
        stream,
        Peer::Tls(addr, identity),
        filter,
        cfg,
        shutdown,
        permit,
        Some(tls.revocations.clone()),
    )
    .await;
}

/// The certificate a TLS connection was opened with (`serial (name)`), if
/// it is revoked now; counted in `tls.revoked_cut`.
fn revoked_now(rev: Option<&Revocations>, peer: &Peer) -> Option<String> {
    let (r, i) = (rev?, peer.identity()?);
    r.is_revoked(&i.serial).then(|| {
        r.cut.inc();
        format!("{} ({})", i.serial, i.name)
    })
}

/// Serves one connection's requests. With `revocations` (TLS), a request
/// on a connection whose certificate has been revoked since it was opened
/// is refused, and the connection is closed as soon as a list revoking it
/// is put in force, even mid-request (a held long poll): a revoked site is
/// cut off within the same bound as new connections, not when it next
/// reconnects.
async fn serve_conn<IO, F>(
    io: IO,
    peer: Peer,
    filter: F,
    cfg: ServeConfig,
    shutdown: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
    revocations: Option<Arc<Revocations>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let svc = warp::service(filter);
    let observer = cfg.observer.clone();
    let mut revised = revocations.as_ref().map(|r| r.watch());
    let conn_peer = peer.clone();
    let conn_rev = revocations.clone();
    // Requests begun on this connection, told to a shutdown waiting for
    // the next one (below).
    let begun = Arc::new((
        std::sync::atomic::AtomicU64::new(0),
        tokio::sync::Notify::new(),
    ));
    let seen_begin = begun.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        seen_begin
            .0
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        seen_begin.1.notify_waiters();
        let mut req = req.map(|b| Lingering(Some(b)));
        req.extensions_mut().insert(peer.clone());
        let mut svc = svc.clone();
        let seen = observer
            .clone()
            .filter(|o| o.wants(req.method(), req.uri()))
            .map(|o| {
                let head = RequestHead {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    headers: req.headers().clone(),
                };
                (o, peer.clone(), head)
            });
        let revoked = revoked_now(revocations.as_deref(), &peer);
        async move {
            let started = std::time::Instant::now();
            if let Some(who) = revoked {
                let mut r = Refusal::new(
                    http::StatusCode::UNAUTHORIZED,
                    format!("the client certificate {who} has been revoked"),
                )
                .response();
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                if let Some((o, p, head)) = seen {
                    o.responded(&p, &head, r.status(), started.elapsed());
                }
                return Ok(r);
            }
            // Ambiguous lengths (request smuggling) are hyper's to refuse:
            // differing Content-Lengths get 400; with Transfer-Encoding the
            // length is ignored and the connection closed after the reply,
            // so nothing after the chunked body is read as a request.
            let r = svc.call(req).await.map_err(|e: Infallible| match e {});
            if let (Some((o, p, head)), Ok(resp)) = (seen, &r) {
                o.responded(&p, &head, resp.status(), started.elapsed());
            }
            r
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = shutdown.cancelled() => {
                // hyper closes a connection between requests at once: a
                // client that has just sent its next request on it (or its
                // first, on a connection accepted just before a stop or a
                // reload) would see it closed unanswered, and could not
                // tell whether it was taken. So a connection between
                // requests is given a moment for its next one, which is
                // answered with `Connection: close`; one in a request
                // finishes it and closes.
                let wait = if begun.0.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                    cfg.header_timeout
                } else {
                    IDLE_AT_SHUTDOWN
                }
                .min(cfg.grace);
                let before = begun.0.load(std::sync::atomic::Ordering::Relaxed);
                let next = async {
                    loop {
                        let n = begun.1.notified();
                        if begun.0.load(std::sync::atomic::Ordering::Relaxed) > before {
                            return;
                        }
                        n.await;
                    }
                };
                // A request in progress now is answered in any case.
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!("connection ended: {e}");
                        }
                        return;
                    }
                    () = next => {}
                    () = tokio::time::sleep(wait) => {}
                }
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(cfg.grace, conn).await;
                return;
            }
            Ok(()) = async {
                match revised.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(who) = revoked_now(conn_rev.as_deref(), &conn_peer) {
                    tracing::info!("certificate {who} revoked: its connection is closed");
                    // Dropping the connection closes it, with whatever it
                    // was serving (a held long poll's reply never goes out;
                    // what it would have carried stays queued).
                    return;
                }
            }
        }
    }
}

/// How long a stopping server keeps a connection that is between requests
/// open for its next one ([`serve_conn`]).
const IDLE_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// Most of a request body read and dropped after a handler answered
/// without reading it all (see [`Lingering`]).
pub const LINGER_BYTES: usize = 1 << 20;
/// Longest that reading goes on.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// A request body that, dropped before its end (a handler answered without
/// reading it: a refused upload, a throttled or oversized envelope), is read
/// on and dropped in the background, up to [`LINGER_BYTES`] and for at most
/// [`LINGER_TIME`], while the answer goes out. hyper would otherwise close
/// the connection with the body unread, which resets it under a client
/// still writing, and most clients then report a broken pipe instead of
/// the answer; nginx reads on for the same reason ("lingering close").
/// Past the bound the connection is closed anyway.
#[derive(Debug)]
struct Lingering(Option<hyper::body::Incoming>);

impl hyper::body::Body for Lingering {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match self.get_mut().0.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.as_ref().map_or_else(
            || hyper::body::SizeHint::with_exact(0),
            hyper::body::Body::size_hint,
        )
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        use hyper::body::Body as _;
        let Some(mut body) = self.0.take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            use http_body_util::BodyExt as _;
            let deadline = tokio::time::Instant::now() + LINGER_TIME;
            let mut n = 0;
            while n < LINGER_BYTES {
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(Some(Ok(f))) => n += f.data_ref().map_or(0, bytes::Bytes::len),
                    _ => return,
                }
            }
        });
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
