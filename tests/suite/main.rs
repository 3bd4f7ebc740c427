//! The one integration-test binary: every suite module is compiled in here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]
// The tests open the daemons' databases read-only to check what they hold.
#![allow(clippy::disallowed_methods)]

mod architecture;
mod backchannel;
pub(crate) mod backchannel_faults;
mod bulk;
mod codec_errors;
mod codec_examples;
mod codec_props;
mod demo;
mod documents;
mod dtd_valid;
mod farm;
mod faults;
pub(crate) mod forward;
mod fuzz_replay;
mod golden;
pub(crate) mod metrics;
mod operations;
mod packaging;
pub(crate) mod portal;
mod rollouts;
mod routes;
mod security;
mod storage;
mod subscriptions;
mod throttle;
