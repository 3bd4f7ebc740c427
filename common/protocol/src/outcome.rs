//! The delivery outcome of one message at one hop, shared by every tier so
//! each hop makes the same decision the same way.

use std::fmt;
use std::time::Duration;

/// A machine-readable reason code: 1 to 32 bytes of `[a-z0-9-]`.
///
/// The codes this suite emits are listed in `docs/protocol.md`; receivers
/// must treat an unknown code like the generic one for its status.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(String);

impl Code {
    pub fn new(s: impl Into<String>) -> Option<Self> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        ok.then_some(Code(s))
    }

    /// A code known at compile time to be valid.
    ///
    /// # Panics
    /// If `s` is not a valid code; only call it with literals.
    pub fn known(s: &'static str) -> Self {
        #[allow(clippy::expect_used)]
        Self::new(s).expect("literal reason codes are valid")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({})", self.0)
    }
}

/// Why a message was not accepted: a code for programs and a text for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub code: Code,
    pub text: String,
}

impl Reason {
    pub fn new(code: &'static str, text: impl Into<String>) -> Self {
        Reason {
            code: Code::known(code),
            text: text.into(),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.text)
        }
    }
}

/// What happened to one message at one hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver has the message safe (stored, forwarded, in its durable
    /// custody, or deliberately discarded by a filter); the sender deletes it.
    Accepted,
    /// Not now: the sender keeps the message and tries again no earlier than
    /// `after` (throttle, upstream down, temporary overload).
    Retry { after: Duration, reason: Reason },
    /// Never: the sender moves the message to its dead letters with the reason.
    Rejected(Reason),
    /// The message's QoS expiry passed before it could be delivered; the
    /// sender drops it and records why.
    Expired,
}

impl Outcome {
    pub fn retry(after: Duration, code: &'static str, text: impl Into<String>) -> Self {
        Outcome::Retry {
            after,
            reason: Reason::new(code, text),
        }
    }

    pub fn rejected(code: &'static str, text: impl Into<String>) -> Self {
        Outcome::Rejected(Reason::new(code, text))
    }

    /// The wire status word.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Retry { .. } => "retry",
            Outcome::Rejected(_) => "rejected",
            Outcome::Expired => "expired",
        }
    }

    /// True when the sender must keep the message.
    pub fn keeps_custody(&self) -> bool {
        matches!(self, Outcome::Retry { .. })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted => f.write_str("accepted"),
            Outcome::Retry { after, reason } => {
                write!(f, "retry after {} ms ({reason})", after.as_millis())
            }
            Outcome::Rejected(reason) => write!(f, "rejected ({reason})"),
            Outcome::Expired => f.write_str("expired"),
        }
    }
}
