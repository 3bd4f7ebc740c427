//! Codec benchmark: encode, full decode and header-only decode of an
//! envelope of 100 messages of about 2 KB, on one core.
//!
//! `cargo bench -p rs-common --bench codec`; `cargo run -p rs-bench` runs it
//! and writes the figures into docs/benchmarks.md and docs/benchmarks.json.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rs_protocol::codec::Limits;
use rs_protocol::{decode_envelope, decode_headers, encode_envelope, samples};

const MESSAGES: usize = 100;
const MESSAGE_BYTES: usize = 2048;

fn codec(c: &mut Criterion) {
    let env = samples::bench_envelope();
    let enc = encode_envelope(&env);
    let limits = Limits::default();
    let per_msg = enc.body.len() / MESSAGES;
    assert!(
        (MESSAGE_BYTES * 9 / 10..=MESSAGE_BYTES * 11 / 10).contains(&per_msg),
        "messages are {per_msg} bytes on the wire, not about {MESSAGE_BYTES}"
    );

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(enc.body.len() as u64));
    g.bench_function("encode", |b| b.iter(|| encode_envelope(black_box(&env))));
    g.bench_function("decode_full", |b| {
        b.iter(|| decode_envelope(&enc.content_type, black_box(enc.body.clone()), &limits))
    });
    g.bench_function("decode_headers", |b| {
        b.iter(|| decode_headers(&enc.content_type, black_box(enc.body.clone()), &limits))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
