//! rs-proxy
