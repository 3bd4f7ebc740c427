//! The network layer: who may speak and how the bytes are protected.
//!
//! - [`pki`]: the provider's CA, keys and certificates;
//! - [`tls`]: OpenSSL contexts for servers and clients, revocation;
//! - [`server`]: the accept loop serving warp filters over TLS or plain
//!   TCP, and the caller's identity;
//! - [`refusal`]: an HTTP refusal with its reason;
//! - [`auth`]: what each route lets a caller do;
//! - [`seal`]: end-to-end seals on message content;
//! - [`enroll`]: getting and renewing a component's certificate;
//! - [`bulk`]: the HTTP client and answers of bulk transfers;
//! - [`http`]: reading bounded replies and naming errors;
//! - [`retry`]: the one backoff every retry loop uses.
//!
//! Depends on `rs-protocol` and `rs-store` (files).

pub mod auth;
pub mod bulk;
pub mod enroll;
pub mod http;
pub mod metrics;
pub mod pki;
pub mod refusal;
pub mod retry;
pub mod seal;
pub mod server;
pub mod tls;
