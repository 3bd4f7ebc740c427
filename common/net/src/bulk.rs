//! Bulk transfers out of band (seed 004, Figs. 20-23): what every tier
//! shares. A transfer is authorised by short messages (a `bulk-request`
//! answered by a `bulk-response`); the bytes then travel over plain HTTP on
//! the same connections as envelopes, to `/rs/v1/bulk/{token}` on the next
//! hop, which relays them (an MLM) or keeps them (the application server).
//!
//! The upload protocol is resumable, in the manner of the tus protocol but
//! smaller (docs/protocol.md, "Bulk transfers"):
//!
//! - `HEAD /rs/v1/bulk/{token}` answers `Upload-Offset` (bytes the receiver
//!   holds) and `Upload-Length` (the granted size), and `Upload-Complete: 1`
//!   once the file is stored;
//! - `PUT /rs/v1/bulk/{token}` with `Content-Range: bytes A-B/SIZE` sends
//!   the rest from `A` (which must equal the offset) to the end.
//!
//! SHA-256 comes from OpenSSL (`openssl::sha`), which uses the CPU's SHA
//! instructions where it has them.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use http::StatusCode;

/// `HEAD`/`PUT` headers of the upload protocol.
pub const UPLOAD_OFFSET: &str = "upload-offset";
pub const UPLOAD_LENGTH: &str = "upload-length";
pub const UPLOAD_COMPLETE: &str = "upload-complete";
/// Why a transfer was refused, on any non-2xx answer (a reason code).
pub const REASON_CODE: &str = "rs-reason";

/// Where transfers go on every tier.
pub const PATH: &str = "/rs/v1/bulk/";

/// A running SHA-256.
pub struct Sha256(openssl::sha::Sha256);

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(openssl::sha::Sha256::new())
    }
}

impl Sha256 {
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub fn finish(self) -> [u8; 32] {
        self.0.finish()
    }
}

/// SHA-256 of the first `limit` bytes of `path` (all of it with `None`),
/// and how many bytes that was. Blocking: run it off the async threads.
pub fn hash_file(path: &Path, limit: Option<u64>) -> std::io::Result<(u64, Sha256)> {
    let f = std::fs::File::open(path)?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f).take(limit.unwrap_or(u64::MAX));
    let mut h = Sha256::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h))
}

/// A fresh unguessable token: 24 random bytes from OpenSSL's CSPRNG,
/// base64url (32 characters).
pub fn new_token() -> Result<String, String> {
    use base64::Engine as _;
    let mut b = [0u8; 24];
    openssl::rand::rand_bytes(&mut b).map_err(|e| format!("random bytes: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// What the receiver stores instead of a token (so a copy of its database
/// does not hold usable URLs): hex SHA-256 of the token.
pub fn token_digest(token: &str) -> String {
    rs_protocol::codec::sha256_hex(&openssl::sha::sha256(token.as_bytes()))
}

/// Whether `s` looks like a token this suite issues (checked before any
/// lookup, so junk never reaches the database).
pub fn is_token(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The token at the end of a grant's URL (absolute or a path).
pub fn token_of(url: &str) -> Option<&str> {
    let t = url.rsplit('/').next()?;
    is_token(t).then_some(t)
}

/// The URL to use for a bulk URL received from the next hop: an absolute
/// URL as it is, a path on the next hop (`/rs/v1/bulk/...`) joined to
/// `base`, the next hop's base URL in use.
pub fn resolve(base: &str, url: &str) -> String {
    if url.starts_with("http://") || url.starts_with("https://") {
        url.to_owned()
    } else {
        format!("{}{url}", base.trim_end_matches('/'))
    }
}

/// `Content-Range: bytes START-END/TOTAL` (END inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    pub end: u64,
    pub total: u64,
}

impl ContentRange {
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.trim().strip_prefix("bytes ")?;
        let (range, total) = rest.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        let (start, end, total) = (a.parse().ok()?, b.parse().ok()?, total.parse().ok()?);
        (start <= end && end < total).then_some(ContentRange { start, end, total })
    }

    pub fn header(&self) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, self.total)
    }

    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What the receiver said about a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It holds `offset` bytes of the file (`HEAD`, or a `PUT` that ended
    /// early).
    Partial { offset: u64 },
    /// The file is stored and verified.
    Complete,
    /// Not now (throttle, transfers at once, disk): come back after this.
    Busy { after: Duration, why: String },
    /// The URL is used, expired, unknown, or failed: ask again for a new one.
    Gone { why: String },
    /// What arrived does not match the granted size or SHA-256: nothing
    /// was kept; ask again.
    Mismatch { why: String },
    /// Another transfer to this URL is in progress, or the range did not
    /// start at the offset: look again (`HEAD`) later.
    Conflict { why: String },
    /// Nothing usable came back (connection refused or cut, 5xx).
    Unavailable { why: String },
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Partial { offset } => write!(f, "holds {offset} bytes"),
            Answer::Complete => f.write_str("complete"),
            Answer::Busy { after, why } => write!(f, "busy for {after:?}: {why}"),
            Answer::Gone { why } => write!(f, "gone: {why}"),
            Answer::Mismatch { why } => write!(f, "mismatch: {why}"),
            Answer::Conflict { why } => write!(f, "conflict: {why}"),
            Answer::Unavailable { why } => write!(f, "unavailable: {why}"),
        }
    }
}

/// Reads a receiver's answer from its status and headers.
pub fn answer_of(status: StatusCode, headers: &http::HeaderMap, text: String) -> Answer {
    let num = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let why = if text.is_empty() {
        status.to_string()
    } else {
        text
    };
    match status.as_u16() {
        200 | 201 | 204 if num(UPLOAD_COMPLETE) == Some(1) || status == StatusCode::CREATED => {
            Answer::Complete
        }
        200 | 204 => Answer::Partial {
            offset: num(UPLOAD_OFFSET).unwrap_or(0),
        },
        404 | 410 => Answer::Gone { why },
        409 => Answer::Conflict { why },
        413 | 422 => Answer::Mismatch { why },
        429 | 503 | 507 => Answer::Busy {
            after: Duration::from_secs(num("retry-after").unwrap_or(30)),
            why,
        },
        _ => Answer::Unavailable {
            why: format!("HTTP {}: {why}", status.as_u16()),
        },
    }
}

/// The sending side of an upload: probes and streams a file to a URL.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
}

impl Client {
    pub fn new(tls: Option<&crate::tls::TlsConfig>) -> Result<Self, String> {
        let http = crate::tls::client(tls)?
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Client { http })
    }

    /// The HTTP client itself (an MLM relays with it).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn answer(r: Result<reqwest::Response, reqwest::Error>) -> Answer {
        match r {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                answer_of(status, &headers, crate::http::short_text(resp, 500).await)
            }
            Err(e) => Answer::Unavailable {
                why: crate::http::error_chain(&e),
            },
        }
    }

    /// How much of the file the receiver at `url` holds.
    pub async fn probe(&self, url: &str) -> Answer {
        Self::answer(
            self.http
                .head(url)
                .timeout(Duration::from_secs(30))
                .send()
                .await,
        )
        .await
    }

    /// Sends `path` from byte `from` to its end (`size` bytes in all).
    pub async fn put_file(&self, url: &str, path: &Path, from: u64, size: u64) -> Answer {
        use tokio::io::AsyncSeekExt as _;
        if from >= size {
            return self.probe(url).await;
        }
        let mut f = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) => {
                return Answer::Mismatch {
                    why: format!("{}: {e}", path.display()),
                };
            }
        };
        if let Err(e) = f.seek(std::io::SeekFrom::Start(from)).await {
            return Answer::Mismatch {
                why: format!("{}: {e}", path.display()),
            };
        }
        let range = ContentRange {
            start: from,
            end: size - 1,
            total: size,
        };
        let body = tokio_util::io::ReaderStream::with_capacity(
            tokio::io::AsyncReadExt::take(f, range.len()),
            256 << 10,
        );
        Self::answer(
            self.http
                .put(url)
                .header(http::header::CONTENT_RANGE, range.header())
                .header(http::header::CONTENT_LENGTH, range.len())
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await,
        )
        .await
    }
}

impl Client {
    /// Fetches a published file from `url` into `part` (appending to what
    /// an earlier, cut fetch left there, with `Range`), then verifies the
    /// whole of it against `size` and `sha256` (hex). `Complete` means
    /// `part` now holds exactly the file; a mismatch deletes it.
    pub async fn fetch(&self, url: &str, part: &Path, size: u64, sha256: &str) -> Answer {
        use tokio::io::AsyncWriteExt as _;
        let mut have = tokio::fs::metadata(part).await.map_or(0, |m| m.len());
        if have > size {
            let _ = tokio::fs::remove_file(part).await;
            have = 0;
        }
        if have < size {
            let mut req = self.http.get(url);
            if have > 0 {
                req = req.header(http::header::RANGE, format!("bytes={have}-"));
            }
            let mut resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    return Answer::Unavailable {
                        why: crate::http::error_chain(&e),
                    };
                }
            };
            let status = resp.status();
            if status == StatusCode::OK && have > 0 {
                // The server sent it all again: start over.
                have = 0;
            } else if status != StatusCode::PARTIAL_CONTENT && status != StatusCode::OK {
                let headers = resp.headers().clone();
                return answer_of(status, &headers, crate::http::short_text(resp, 500).await);
            }
            let file = if have == 0 {
                tokio::fs::File::create(part).await
            } else {
                tokio::fs::OpenOptions::new().append(true).open(part).await
            };
            let mut file = match file {
                Ok(f) => f,
                Err(e) => {
                    return Answer::Busy {
                        after: Duration::from_secs(60),
                        why: format!("{}: {e}", part.display()),
                    };
                }
            };
            let mut got = have;
            loop {
                match resp.chunk().await {
                    Ok(Some(b)) => {
                        if got + b.len() as u64 > size {
                            let _ = tokio::fs::remove_file(part).await;
                            return Answer::Mismatch {
                                why: format!("more than the {size} bytes offered"),
                            };
                        }
                        if let Err(e) = file.write_all(&b).await {
                            let _ = file.flush().await;
                            let _ = file.set_len(got).await;
                            return Answer::Busy {
                                after: Duration::from_secs(60),
                                why: format!("{}: {e}", part.display()),
                            };
                        }
                        got += b.len() as u64;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = file.flush().await;
                        return Answer::Unavailable {
                            why: format!(
                                "cut after {got} of {size} bytes: {}",
                                crate::http::error_chain(&e)
                            ),
                        };
                    }
                }
            }
            if let Err(e) = file.sync_all().await {
                return Answer::Busy {
                    after: Duration::from_secs(60),
                    why: e.to_string(),
                };
            }
            if got < size {
                return Answer::Partial { offset: got };
            }
        }
        let p = part.to_path_buf();
        let hashed = tokio::task::spawn_blocking(move || {
            hash_file(&p, None).map(|(n, h)| (n, rs_protocol::codec::sha256_hex(&h.finish())))
        })
        .await;
        match hashed {
            Ok(Ok((n, h))) if n == size && h == sha256 => Answer::Complete,
            Ok(Ok(_)) => {
                let _ = tokio::fs::remove_file(part).await;
                Answer::Mismatch {
                    why: format!("the file fetched does not have SHA-256 {sha256}"),
                }
            }
            Ok(Err(e)) => Answer::Unavailable {
                why: format!("{}: {e}", part.display()),
            },
            Err(e) => Answer::Unavailable { why: e.to_string() },
        }
    }
}

/// Serves a stored file for `GET`, honouring a single `Range: bytes=S-` or
/// `bytes=S-E` (206 and `Content-Range`; 416 when it starts past the end).
/// Every byte sent is added to `served`.
pub async fn serve_file(
    path: &Path,
    size: u64,
    range: Option<&http::HeaderValue>,
    served: crate::metrics::IntCounter,
) -> warp::reply::Response {
    use tokio::io::AsyncSeekExt as _;
    let text = |status: StatusCode, t: String| {
        let mut r = warp::reply::Response::new(format!("{t}\n").into());
        *r.status_mut() = status;
        r
    };
    let wanted = match range.map(|v| v.to_str().ok().and_then(parse_range)) {
        None => None,
        Some(Some((s, e))) if s < size => Some((s, e.unwrap_or(size - 1).min(size - 1))),
        Some(_) => {
            let mut r = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range not satisfiable".into(),
            );
            if let Ok(v) = http::HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(http::header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let (start, end) = wanted.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => return text(StatusCode::GONE, format!("the file is gone: {e}")),
    };
    if let Err(e) = f.seek(std::io::SeekFrom::Start(start)).await {
        return text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let body = tokio_util::io::ReaderStream::with_capacity(
        tokio::io::AsyncReadExt::take(f, len),
        256 << 10,
    )
    .map(move |c| {
        if let Ok(b) = &c {
            served.inc_by(b.len() as u64);
        }
        c
    });
    let mut r = warp::reply::Reply::into_response(warp::reply::stream(body));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    h.insert(
        http::header::ACCEPT_RANGES,
        http::HeaderValue::from_static("bytes"),
    );
    if wanted.is_some() {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = http::HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            r.headers_mut().insert(http::header::CONTENT_RANGE, v);
        }
    }
    r
}

/// `bytes=S-` or `bytes=S-E` (one range only).
fn parse_range(s: &str) -> Option<(u64, Option<u64>)> {
    let (a, b) = s.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => None,
        e => Some(e.parse().ok()?),
    };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    Some((start, end))
}

/// Reads a request body of known length chunk by chunk, giving up when no
/// byte arrives for `idle` (a stalled or half-open sender).
pub async fn next_chunk<S, B>(body: &mut S, idle: Duration) -> Result<Option<bytes::Bytes>, String>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Unpin,
    B: bytes::Buf,
{
    match tokio::time::timeout(idle, body.next()).await {
        Err(_) => Err(format!("no data for {} s", idle.as_secs())),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(format!("body: {e}")),
        Ok(Some(Ok(mut b))) => Ok(Some(b.copy_to_bytes(b.remaining()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_round_trips_and_refuses_nonsense() {
        let r = ContentRange::parse("bytes 100-199/200").unwrap();
        assert_eq!((r.start, r.end, r.total, r.len()), (100, 199, 200, 100));
        assert_eq!(ContentRange::parse(&r.header()), Some(r));
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "bits 0-1/2",
            "bytes 0-1",
        ] {
            assert_eq!(ContentRange::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("bytes=10-"), Some((10, None)));
        assert_eq!(parse_range("bytes=10-19"), Some((10, Some(19))));
        for bad in ["bytes=5-4", "bytes=-5", "bytes=1-2,4-5", "items=1-2"] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_are_fresh_and_recognised() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(is_token(&a), "{a}");
        assert_eq!(
            token_of(&format!("https://x.example/rs/v1/bulk/{a}")),
            Some(&*a)
        );
        assert_eq!(token_of("/rs/v1/bulk/../../etc/passwd"), None);
        assert_eq!(token_digest(&a).len(), 64);
    }

    #[test]
    fn hashes_a_file_and_a_prefix() {
        let dir = std::env::temp_dir().join(format!("rs-bulk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"abc").unwrap();
        let (n, h) = hash_file(&p, None).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            rs_protocol::codec::sha256_hex(&h.finish()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (n, _) = hash_file(&p, Some(2)).unwrap();
        assert_eq!(n, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
