//! The node: what a running tier is made of beyond the protocol, storage and
//! network layers.
//!
//! - [`upstream`]: the sender, POSTing envelopes to the next hop with
//!   failover, draining a spool and acting on each outcome;
//! - [`throttle`]: the throttle control of seed 004 (token buckets,
//!   windows, shared usage);
//! - [`ingress`]: receiving envelopes (the warp filter, limits, load,
//!   back-channel readiness);
//! - [`config_file`]: `configChange` applied to a daemon's file;
//! - [`daemon`]: the skeleton the three daemons share (logging,
//!   configuration loading, signals, reload, the service manager's
//!   notifications, shutdown);
//! - [`inherit`]: listening sockets kept open across a start in place;
//! - [`health`]: queue health in a tier's status tree (and heartbeats);
//! - [`mem`]: giving freed memory back to the kernel.
//!
//! Depends on `rs-protocol`, `rs-store` and `rs-net`.

pub mod config_file;
pub mod daemon;
pub mod health;
pub mod ingress;
pub mod inherit;
pub mod mem;
pub mod metrics;
pub mod throttle;
pub mod upstream;
