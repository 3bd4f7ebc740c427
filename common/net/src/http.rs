//! Reading replies without trusting their size, and naming errors whole.

/// The first `max` characters of a reply's text, trimmed (what an error
/// answer says, bounded; empty if it cannot be read).
pub async fn short_text(resp: reqwest::Response, max: usize) -> String {
    let text: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(max)
        .collect();
    text.trim().to_owned()
}

/// A reply's body, refused when longer than `max` bytes.
pub async fn bounded_body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let url = resp.url().to_string();
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > max {
                    return Err(format!("{url}: the reply is longer than {max} bytes"));
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(format!("{url}: {}", error_chain(&e))),
        }
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
