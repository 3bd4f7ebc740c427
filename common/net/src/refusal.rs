//! A refusal: the HTTP status, the reason, and when to come back.

use std::time::Duration;

use warp::reject::Reject;

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
