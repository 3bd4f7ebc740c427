//! Data-driven examples: every content type and control payload survives
//! encode -> decode, whole, header-only and streamed.

use bytes::Bytes;
use rs_protocol::codec::{
    Limits, StreamDecoder, decode_control, decode_status, encode_control, encode_status,
};
use rs_protocol::control::StatusNode;
use rs_protocol::samples;
use rs_protocol::*;

fn one(m: &Message) -> Envelope {
    Envelope {
        meta: samples::request_meta("acme.p1"),
        messages: vec![m.clone()],
    }
}

#[test]
fn every_kind_round_trips_alone() {
    let limits = Limits::default();
    for m in samples::every_kind() {
        let env = one(&m);
        let enc = encode_envelope(&env);
        let back = decode_envelope(&enc.content_type, enc.body.clone(), &limits)
            .unwrap_or_else(|e| panic!("{}: {e}", m.header.id));
        assert_eq!(back, env, "{}", m.header.id);

        let raw = decode_headers(&enc.content_type, enc.body, &limits).unwrap();
        assert_eq!(raw.messages[0].header, m.header);
        assert_eq!(raw.messages[0].kind, m.content.kind());
    }
}

#[test]
fn every_kind_together_streamed_byte_by_byte() {
    let env = Envelope {
        meta: samples::reply_meta("acme.m1", &samples::every_kind()),
        messages: samples::every_kind(),
    };
    let enc = encode_envelope(&env);
    let mut dec = StreamDecoder::new(&enc.content_type, Limits::default()).unwrap();
    let mut popped = Vec::new();
    for b in enc.body.iter() {
        dec.push(std::slice::from_ref(b)).unwrap();
        while let Some(m) = dec.pop() {
            popped.push(m);
        }
    }
    let rest = dec.finish().unwrap();
    assert_eq!(rest.meta, env.meta);
    assert!(
        rest.messages.is_empty(),
        "every message was popped as it completed"
    );
    let decoded: Vec<Message> = popped
        .into_iter()
        .map(|r| r.decode(&Limits::default()).unwrap())
        .collect();
    assert_eq!(decoded, env.messages);
}

#[test]
fn control_payloads_and_status_tree() {
    let limits = Limits::default();
    for a in samples::control_actions() {
        assert_eq!(decode_control(&encode_control(&a), &limits).unwrap(), a);
    }
    let tree = samples::status_tree();
    let back = decode_status(&encode_status(&tree), &limits).unwrap();
    assert_eq!(back, tree);
    let mut kinds = Vec::new();
    back.walk(&mut |n: &StatusNode| kinds.push(n.kind.clone()));
    assert_eq!(kinds, ["proxy", "integrator", "platform", "instance"]);
}

#[test]
fn forwarder_passes_contents_through_untouched() {
    let limits = Limits::default();
    let env = Envelope {
        meta: samples::request_meta("acme.p1"),
        messages: samples::every_kind(),
    };
    let enc = encode_envelope(&env);
    let raw = decode_headers(&enc.content_type, enc.body, &limits).unwrap();
    let hop = Hop {
        component: RsId::new("acme.m2").unwrap(),
        received: samples::t0(),
        sent: None,
    };
    let mut w = EnvelopeWriter::new(&samples::request_meta("acme.m2"));
    for mut m in raw.messages.clone() {
        m.header.routing.push(hop.clone());
        w.push_raw(&m);
    }
    let fwd = w.finish();
    let again = decode_envelope(&fwd.content_type, fwd.body, &limits).unwrap();
    for (orig, got) in env.messages.iter().zip(&again.messages) {
        assert_eq!(got.content, orig.content);
        assert_eq!(got.header.routing.last(), Some(&hop));
        assert_eq!(got.header.routing.len(), orig.header.routing.len() + 1);
    }
}

#[test]
fn binary_payload_containing_the_boundary_is_base64_encoded() {
    let meta = samples::request_meta("acme.p1");
    let boundary = "rs-fixed";
    let mut m = samples::every_kind()
        .into_iter()
        .find(|m| m.header.id.as_str() == "m-binary")
        .unwrap();
    let evil = format!("x\r\n--{boundary}\r\nContent-ID: <evil@header>\r\n\r\n");
    if let Content::Data(d) = &mut m.content {
        d.bytes = Bytes::from(evil.clone().into_bytes());
    }
    let mut w = EnvelopeWriter::with_boundary(&meta, boundary);
    w.push(&m);
    let enc = w.finish();
    let back = decode_envelope(&enc.content_type, enc.body, &Limits::default()).unwrap();
    match &back.messages[0].content {
        Content::Data(d) => {
            assert_eq!(d.bytes, evil.as_bytes());
            assert_eq!(d.encoding, TransferEncoding::Base64);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn empty_envelope_is_a_long_poll() {
    let mut meta = EnvelopeMeta::new(RsId::new("acme.p1").unwrap(), samples::t0());
    meta.poll = Some(std::time::Duration::from_secs(25));
    let env = Envelope {
        meta,
        messages: vec![],
    };
    let enc = encode_envelope(&env);
    let back = decode_envelope(&enc.content_type, enc.body, &Limits::default()).unwrap();
    assert_eq!(back, env);
}
