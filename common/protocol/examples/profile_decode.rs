//! Decodes the benchmark envelope in a loop, for profilers:
//! `cargo build --release -p rs-common --example profile_decode` then
//! `valgrind --tool=callgrind target/release/examples/profile_decode headers`.

use rs_protocol::codec::Limits;
use rs_protocol::{decode_envelope, decode_headers, encode_envelope, samples};

fn main() {
    let full = std::env::args().nth(1).as_deref() == Some("full");
    let enc = encode_envelope(&samples::bench_envelope());
    let limits = Limits::default();
    let mut n = 0;
    for _ in 0..200 {
        if full {
            n += decode_envelope(&enc.content_type, enc.body.clone(), &limits)
                .map_or(0, |e| e.messages.len());
        } else {
            n += decode_headers(&enc.content_type, enc.body.clone(), &limits)
                .map_or(0, |e| e.messages.len());
        }
    }
    std::process::exit(i32::from(n != 20_000));
}
