//! The node: what a running tier is made of beyond the protocol, storage and
//! network layers.
//!
//! - [`upstream`]: POSTing envelopes to the next hop on the route chosen
//!   among its URLs, failing over and hedging, and why a POST failed;
//! - [`routes`]: each route's measured health and the choice among them
//!   (by delay, by class of service);
//! - [`uplink`]: every POST's envelope with the acknowledgements and
//!   delivery notices due, and the back-channel its reply brings;
//! - [`sender`]: draining a spool through the uplink, acting on each
//!   outcome;
//! - [`throttle`]: the throttle control of seed 004 (token buckets,
//!   windows, shared usage);
//! - [`ingress`]: receiving envelopes (the warp filter, limits, load,
//!   back-channel readiness);
//! - [`next_hop`]: splitting a back-channel message's destinations by the
//!   next hop each is reached through;
//! - [`pipeline`]: the stages every receiving tier runs an envelope
//!   through (screen, back-channel bookkeeping, examine, throttle,
//!   dispose, reply), written once for the MLM and the server;
//! - [`config_file`]: `configChange` applied to a daemon's file;
//! - [`sections`]: configuration sections the proxy and the MLM share;
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
pub mod next_hop;
pub mod pipeline;
pub mod routes;
pub mod sections;
pub mod sender;
pub mod throttle;
pub mod uplink;
pub mod upstream;
