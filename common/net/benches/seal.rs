//! Payload seal benchmark: sealing one 2 KB alarm (signed; signed and
//! encrypted to the server) and opening it at the server, on one core.
//!
//! `cargo bench -p rs-common --bench seal`; `cargo run -p rs-bench -- codec`
//! runs it too and writes the figures. Sealing signs once and, encrypting,
//! makes an ephemeral key and derives once; opening parses the signer's
//! certificate carried in the seal, derives once and verifies once (the
//! certificate's chain is checked once per certificate and remembered).

#![allow(clippy::unwrap_used)] // a benchmark: set-up failures should stop it loudly

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rs_net::pki::{Ca, CertSpec, generate_key, write_private};
use rs_net::seal::{Opener, SealConfig, Sealer};
use rs_net::tls::{Revocations, TlsConfig};
use rs_protocol::{RsId, samples};

fn issue(ca: &Ca, id: &str, out: &Path) -> TlsConfig {
    std::fs::create_dir_all(out).unwrap();
    let key = generate_key().unwrap();
    let spec = CertSpec::component(&RsId::new(id).unwrap(), 30);
    let cert = ca.issue(&spec, &key).unwrap();
    let t = TlsConfig {
        cert: out.join("cert.pem"),
        key: out.join("key.pem"),
        ca: out.join("ca.pem"),
        crl: None,
        crl_refresh_secs: 60,
        renew_before_days: 30,
    };
    write_private(&t.key, &key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    std::fs::write(&t.cert, cert.to_pem().unwrap()).unwrap();
    std::fs::write(&t.ca, ca.cert().to_pem().unwrap()).unwrap();
    t
}

fn seal(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("rs-bench-seal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Ca::init(&dir.join("ca"), "bench CA", 30).unwrap();
    let site = issue(&ca, "acme.p1", &dir.join("site"));
    let server = issue(&ca, "rs.a1", &dir.join("server"));
    let signer = Sealer::new(&site, &SealConfig::default()).unwrap();
    let encrypter = Sealer::new(
        &site,
        &SealConfig {
            encrypt_to: Some(server.cert.clone()),
        },
    )
    .unwrap();
    let revocations = Arc::new(Revocations::new(ca.cert().to_owned(), None).unwrap());
    let opener = Opener::new(&server, revocations).unwrap();
    let raw = samples::alarm_of_size(1, 2048).to_raw();
    let signed = signer.seal(&raw).unwrap();
    let encrypted = encrypter.seal(&raw).unwrap();

    let mut g = c.benchmark_group("seal");
    g.bench_function("sign", |b| b.iter(|| signer.seal(black_box(&raw))));
    g.bench_function("sign_encrypt", |b| {
        b.iter(|| encrypter.seal(black_box(&raw)))
    });
    g.bench_function("open_signed", |b| {
        b.iter(|| opener.open(black_box(signed.clone())))
    });
    g.bench_function("open_encrypted", |b| {
        b.iter(|| opener.open(black_box(encrypted.clone())))
    });
    // What OpenSSL 3.0 spends on the certificate each seal carries (its
    // EC public key goes through the provider decoders).
    let der = openssl::x509::X509::from_pem(&std::fs::read(&site.cert).unwrap())
        .unwrap()
        .to_der()
        .unwrap();
    g.bench_function("parse_certificate", |b| {
        b.iter(|| openssl::x509::X509::from_der(black_box(&der)))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, seal);
criterion_main!(benches);
