//! Fuzzes every XML document parser (envelope header, message header, the
//! five XML contents, control actions, status trees).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rs_protocol::fuzzing::xml(data));
