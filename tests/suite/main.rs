//! The one integration-test binary: every suite module is compiled in here.

mod codec_errors;
mod codec_examples;
mod codec_props;
mod dtd_valid;
mod fuzz_replay;
mod golden;
