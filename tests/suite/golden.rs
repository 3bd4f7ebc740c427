//! Golden envelopes under `tests/fixtures/`: reproducible bytes that are also
//! the examples in `docs/protocol.md`. Run with `RS_BLESS=1` to rewrite
//! them (and the fuzz seed corpus) after a deliberate format change.

use std::fs;
use std::time::Duration;

use rs_protocol::codec::{Limits, encode_control, encode_header, encode_meta, encode_status};
use rs_protocol::samples;
use rs_protocol::*;
use rs_tests::repo_root;

fn pick(ids: &[&str]) -> Vec<Message> {
    let all = samples::every_kind();
    ids.iter()
        .map(|id| {
            all.iter()
                .find(|m| m.header.id.as_str() == *id)
                .unwrap()
                .clone()
        })
        .collect()
}

/// (file name, envelope, boundary)
fn goldens() -> Vec<(&'static str, Envelope, &'static str)> {
    let forward = pick(&["m-alarm", "m-event", "m-heartbeat"]);
    // As a proxy sends them: its own messages carry no routing hop (each
    // tier that forwards a message appends its own, and a tier refuses a
    // hop the sender may not speak for).
    let sent: Vec<Message> = forward
        .iter()
        .cloned()
        .map(|mut m| {
            m.header.routing.clear();
            m
        })
        .collect();
    let mut poll = EnvelopeMeta::new(RsId::new("acme.p2").unwrap(), samples::t0());
    poll.poll = Some(Duration::from_secs(25));
    poll.acks = vec![MessageId::new("b-control-4").unwrap()];
    vec![
        (
            "forward-request.http",
            Envelope {
                meta: samples::request_meta("acme.p1"),
                messages: sent,
            },
            "rs-example-1",
        ),
        (
            "reply.http",
            Envelope {
                meta: samples::reply_meta("acme.m1", &forward),
                messages: pick(&["b-control-4", "b-bulk-offer"]),
            },
            "rs-example-2",
        ),
        (
            "long-poll.http",
            Envelope {
                meta: poll,
                messages: vec![],
            },
            "rs-example-3",
        ),
        (
            "every-kind.http",
            Envelope {
                meta: samples::request_meta("acme.p1"),
                messages: samples::every_kind(),
            },
            "rs-example-4",
        ),
    ]
}

fn render(env: &Envelope, boundary: &str) -> Vec<u8> {
    let mut w = EnvelopeWriter::with_boundary(&env.meta, boundary);
    for m in &env.messages {
        w.push(m);
    }
    let enc = w.finish();
    let mut out = format!("Content-Type: {}\r\n\r\n", enc.content_type).into_bytes();
    out.extend_from_slice(&enc.body);
    out
}

fn split(file: &[u8]) -> (String, bytes::Bytes) {
    let text = file.strip_prefix(b"Content-Type: ".as_slice()).unwrap();
    let i = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8(text[..i].to_vec()).unwrap(),
        bytes::Bytes::copy_from_slice(&text[i + 4..]),
    )
}

fn bless() -> bool {
    std::env::var_os("RS_BLESS").is_some()
}

#[test]
fn golden_envelopes_are_stable_and_decode() {
    let dir = repo_root().join("tests/fixtures");
    for (name, env, boundary) in goldens() {
        let path = dir.join(name);
        let bytes = render(&env, boundary);
        if bless() {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&path, &bytes).unwrap();
        }
        let on_disk = fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with RS_BLESS=1)", path.display()));
        assert!(
            on_disk == bytes,
            "{name} differs from what the encoder writes now; if intended, RS_BLESS=1"
        );
        let (ct, body) = split(&on_disk);
        let back = decode_envelope(&ct, body, &Limits::default()).unwrap();
        assert_eq!(back, env, "{name}");
    }
}

#[test]
fn protocol_document_shows_the_goldens() {
    let doc = fs::read_to_string(repo_root().join("docs/protocol.md"))
        .unwrap()
        .replace("\r\n", "\n");
    for name in ["forward-request.http", "reply.http", "long-poll.http"] {
        let fixture = fs::read_to_string(repo_root().join("tests/fixtures").join(name)).unwrap();
        let fixture = fixture.replace("\r\n", "\n");
        assert!(
            doc.contains(fixture.trim_end()),
            "docs/protocol.md must show tests/fixtures/{name} verbatim"
        );
    }
}

/// Writes the fuzz seed corpus from the goldens and every XML document.
#[test]
fn fuzz_seed_corpus_is_current() {
    let root = repo_root().join("fuzz/corpus");
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, env, boundary) in goldens() {
        seeds.push((format!("envelope/seed-{name}"), render(&env, boundary)));
    }
    let mut xml = |tag: u8, name: String, doc: Vec<u8>| {
        let mut v = vec![tag];
        v.extend_from_slice(&doc);
        seeds.push((format!("xml/seed-{name}"), v));
    };
    for m in samples::every_kind() {
        let raw = m.to_raw();
        xml(
            0,
            format!("header-{}", m.header.id),
            encode_header(&m.header, raw.kind, raw.data.as_ref()),
        );
        if raw.data.is_none() {
            let tag = 4 + ContentKind::ALL
                .iter()
                .position(|k| *k == raw.kind)
                .unwrap() as u8;
            xml(
                tag,
                format!("content-{}", m.header.id),
                raw.content.to_vec(),
            );
        }
    }
    xml(
        1,
        "meta-request".into(),
        encode_meta(&samples::request_meta("acme.p1")),
    );
    xml(
        1,
        "meta-reply".into(),
        encode_meta(&samples::reply_meta("acme.m1", &samples::every_kind())),
    );
    for (i, a) in samples::control_actions().iter().enumerate() {
        xml(2, format!("control-{i}"), encode_control(a));
    }
    xml(3, "status".into(), encode_status(&samples::status_tree()));

    for (name, bytes) in seeds {
        let path = root.join(&name);
        if bless() {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
        }
        let on_disk = fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with RS_BLESS=1)", path.display()));
        assert!(on_disk == bytes, "fuzz seed {name} is stale; RS_BLESS=1");
    }
}
