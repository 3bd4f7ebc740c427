//! What arrives over HTTP: the envelope body, streamed into the decoder
//! under its limits and a deadline, and the reply envelope going back.

use std::time::Duration;

use futures_util::StreamExt as _;
use http::StatusCode;
use warp::Filter;

use rs_net::server::Refusal;
use rs_protocol::codec::{
    DecodeError, Encoded, EnvelopeWriter, Limits, RawEnvelope, RawMessage, StreamDecoder,
};

/// The HTTP status for a decode error.
pub fn status_for(e: &DecodeError) -> StatusCode {
    match e {
        DecodeError::ContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        DecodeError::EnvelopeTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// Extracts a decoded envelope (headers parsed, contents raw) from a POST,
/// refusing with 415, 413, 400 or 408 and a text naming the part and the
/// reason. Nothing is read beyond the limits, and a body whose
/// `Content-Length` already says it is over the envelope limit is refused
/// before any of it is read.
pub fn envelope(
    limits: Limits,
    body_timeout: Duration,
) -> impl Filter<Extract = (RawEnvelope,), Error = warp::Rejection> + Clone {
    let max = limits.max_envelope_bytes;
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<u64>("content-length"))
        .and_then(move |ct: Option<String>, len: Option<u64>| async move {
            match len {
                Some(n) if n > max as u64 => Err(warp::reject::custom(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    DecodeError::EnvelopeTooLarge { limit: max }.to_string(),
                ))),
                _ => Ok(ct),
            }
        })
        .and(warp::body::stream())
        .and_then(move |ct: Option<String>, body| {
            read_envelope(ct.unwrap_or_default(), body, limits.clone(), body_timeout)
        })
}

async fn read_envelope<S, B>(
    ct: String,
    body: S,
    limits: Limits,
    body_timeout: Duration,
) -> Result<RawEnvelope, warp::Rejection>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    let read = async {
        let mut dec = StreamDecoder::new(&ct, limits)?;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let mut chunk =
                chunk.map_err(|e| DecodeError::ContentType(format!("body read failed: {e}")))?;
            while chunk.has_remaining() {
                let piece = chunk.chunk();
                let n = piece.len();
                dec.push(piece)?;
                chunk.advance(n);
            }
        }
        dec.finish()
    };
    match tokio::time::timeout(body_timeout, read).await {
        Ok(Ok(env)) => Ok(env),
        Ok(Err(e)) => Err(warp::reject::custom(Refusal::new(
            status_for(&e),
            e.to_string(),
        ))),
        Err(_) => Err(warp::reject::custom(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the envelope body did not arrive within {} s",
                body_timeout.as_secs()
            ),
        ))),
    }
}

/// A `200 OK` carrying an encoded envelope.
pub fn envelope_response(enc: Encoded) -> warp::reply::Response {
    let mut r = warp::reply::Response::new(enc.body.into());
    if let Ok(v) = http::HeaderValue::from_str(&enc.content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

/// A `200 OK` carrying an XML document.
pub fn xml_response(doc: Vec<u8>) -> warp::reply::Response {
    let mut r = warp::reply::Response::new(doc.into());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    r
}

/// What wakes a tier's held long polls: messages queued for the back-channel
/// (`notify_waiters`, by whoever queued them), and messages handed out but
/// not acknowledged becoming due to be offered again. For the latter it
/// keeps when each offer falls due (`offer_again` after it went out,
/// rounded up to [`REOFFER_RESOLUTION`]) and [`reoffer_ticker`] wakes the
/// polls then, so a message whose reply was lost goes out again
/// `offer_again` after it was offered, not up to twice that (a fixed-phase
/// ticker woke them at the first tick after they were due).
#[derive(Debug)]
pub struct BackChannelReady {
    ready: tokio::sync::Notify,
    again: Duration,
    born: tokio::time::Instant,
    /// Due times (ms after `born`), one entry per resolution step.
    due: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Told when an earlier due time than the ticker's is recorded.
    replan: tokio::sync::Notify,
    /// Long polls held now, waiting for a message.
    holders: std::sync::atomic::AtomicUsize,
}

/// Counts a held long poll while it waits.
struct Holding<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How finely re-offer wake-ups are kept: one wake-up of every held poll
/// per step at most, whatever the number of messages.
pub const REOFFER_RESOLUTION: Duration = Duration::from_millis(50);

impl BackChannelReady {
    pub fn new(again: Duration) -> Self {
        BackChannelReady {
            ready: tokio::sync::Notify::new(),
            again,
            born: tokio::time::Instant::now(),
            due: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            replan: tokio::sync::Notify::new(),
            holders: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Long polls held now, waiting for a message.
    pub fn holders(&self) -> usize {
        self.holders.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wakes every held long poll (messages were queued).
    pub fn notify_waiters(&self) {
        self.ready.notify_waiters();
    }

    /// How long an offered message waits for its acknowledgement.
    pub fn offer_again(&self) -> Duration {
        self.again
    }

    /// Messages were handed out now: wake the polls when they fall due.
    fn offered(&self) {
        let step = REOFFER_RESOLUTION.as_millis() as u64;
        let at = (self.born.elapsed() + self.again).as_millis() as u64;
        let at = at.div_ceil(step) * step;
        let Ok(mut due) = self.due.lock() else { return };
        let earliest = due.first().is_none_or(|first| at < *first);
        due.insert(at);
        drop(due);
        if earliest {
            self.replan.notify_one();
        }
    }

    /// The earliest due time, if any.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        let due = self.due.lock().ok()?;
        due.first().map(|ms| self.born + Duration::from_millis(*ms))
    }

    /// Forgets the due times that have passed.
    fn passed(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        if let Ok(mut due) = self.due.lock() {
            *due = due.split_off(&(now + 1));
        }
    }
}

/// Wakes a tier's held long polls when offered messages fall due again
/// (see [`BackChannelReady`]), and in any case every `offer_again` (a wall
/// clock moved back makes a message due later than its wake-up said).
pub async fn reoffer_ticker(
    ready: std::sync::Arc<BackChannelReady>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::Instant::now() + ready.again;
    loop {
        let next = ready.next_due().map_or(every, |d| d.min(every));
        tokio::select! {
            () = stop.cancelled() => return,
            () = ready.replan.notified() => continue,
            () = tokio::time::sleep_until(next) => {
                ready.passed();
                let now = tokio::time::Instant::now();
                if now >= every {
                    every = now + ready.again;
                }
                ready.notify_waiters();
            }
        }
    }
}

/// Most back-channel messages in one reply.
pub const MAX_OFFER: usize = 200;
/// Longest long-poll hold any tier grants.
pub const MAX_HOLD: Duration = Duration::from_secs(25);

/// Puts on a reply what waits on the back-channel for the caller, through
/// `offer` (which marks what it returns as offered). When nothing waits
/// and `hold` is given (a long poll with nothing else in it), waits up to
/// `hold` (at most [`MAX_HOLD`]) for `ready` to be notified, or `stop`,
/// and looks again. Every tier's reply side uses this one loop.
pub async fn offer_back_channel<F, Fut>(
    w: &mut EnvelopeWriter,
    ready: &BackChannelReady,
    hold: Option<Duration>,
    stop: &tokio_util::sync::CancellationToken,
    mut offer: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<RawMessage>, String>>,
{
    let deadline = tokio::time::Instant::now() + hold.unwrap_or_default().min(MAX_HOLD);
    let mut holding = None;
    loop {
        // Registered before looking, so a message queued while we look
        // still wakes us.
        let notified = ready.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match offer().await {
            Ok(msgs) if !msgs.is_empty() => {
                for m in &msgs {
                    w.push_raw(m);
                }
                ready.offered();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!("back-channel: {e}");
                return;
            }
        }
        if hold.is_none() || tokio::time::Instant::now() >= deadline {
            return;
        }
        if holding.is_none() {
            ready
                .holders
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            holding = Some(Holding(&ready.holders));
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// How busy a tier is: envelopes being handled now. Above `busy_at`, each
/// reply advises the caller to wait before its next POST with messages
/// (`resume-after-ms`), longer the busier, with jitter so that callers
/// that came together do not come back together. The envelope in hand is
/// still processed: backpressure slows callers down, it never refuses
/// work there is room for.
#[derive(Debug)]
pub struct Load {
    inflight: std::sync::atomic::AtomicUsize,
    busy_at: usize,
    /// When the last envelope was done (ms after `born`).
    last_done: std::sync::atomic::AtomicU64,
    born: std::time::Instant,
    /// Replies that carried a resume-after advice.
    pub advised: std::sync::atomic::AtomicU64,
}

/// Held while an envelope is handled.
#[derive(Debug)]
pub struct LoadGuard<'a>(&'a Load);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0
            .last_done
            .store(ms, std::sync::atomic::Ordering::Relaxed);
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Load {
    pub fn new(busy_at: usize) -> Self {
        Load {
            inflight: std::sync::atomic::AtomicUsize::new(0),
            busy_at: busy_at.max(1),
            last_done: std::sync::atomic::AtomicU64::new(0),
            born: std::time::Instant::now(),
            advised: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn enter(&self) -> LoadGuard<'_> {
        self.inflight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LoadGuard(self)
    }

    /// Envelopes being handled now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether envelopes are being handled now or were within `d`: the
    /// tier is answering senders, and background work should give way.
    pub fn busy_within(&self, d: Duration) -> bool {
        if self.inflight() > 0 {
            return true;
        }
        let last = self.last_done.load(std::sync::atomic::Ordering::Relaxed);
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        last > 0 && now.saturating_sub(last) < u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// The wait to advise now, if the tier is busy: 250 ms per multiple of
    /// `busy_at` in flight, at most 10 s, randomly 50-150% of that.
    pub fn advice(&self) -> Option<Duration> {
        let n = self.inflight();
        if n <= self.busy_at {
            return None;
        }
        self.advised
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = (250 * (n / self.busy_at) as u64).min(10_000);
        Some(Duration::from_millis(base / 2 + fastrand::u64(0..=base)))
    }
}

/// `[limits]` of the tiers that receive envelopes (the application server
/// and the MLM): the decoder limits of docs/protocol.md section 11, each
/// left out keeping its default.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_envelope_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_part_bytes: Option<usize>,
}

impl LimitsSection {
    /// The limits in force: the defaults with what is configured.
    pub fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            max_envelope_bytes: self.max_envelope_bytes.unwrap_or(d.max_envelope_bytes),
            max_messages: self.max_messages.unwrap_or(d.max_messages),
            max_part_bytes: self.max_part_bytes.unwrap_or(d.max_part_bytes),
            ..d
        }
    }
}
