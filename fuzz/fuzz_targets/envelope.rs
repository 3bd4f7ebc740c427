//! Fuzzes the multipart/related envelope decoder (one-shot, header-only and
//! streamed) and the encode/decode round trip.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rs_protocol::fuzzing::envelope(data));
