//! Round-trip properties: model -> wire -> model for arbitrary messages and
//! envelopes of up to 1,000 messages, whole, header-only and streamed.

use proptest::prelude::*;
use rs_protocol::codec::Limits;
use rs_protocol::*;
use rs_tests::arb;

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn envelope_round_trip(env in arb::envelope(12)) {
        let enc = encode_envelope(&env);
        let back = decode_envelope(&enc.content_type, enc.body, &Limits::default());
        prop_assert_eq!(back, Ok(env));
    }

    #[test]
    fn streamed_equals_one_shot(env in arb::envelope(8), chunks in proptest::collection::vec(1usize..200, 1..50)) {
        let enc = encode_envelope(&env);
        let one_shot = decode_headers(&enc.content_type, enc.body.clone(), &Limits::default()).unwrap();
        let mut dec = StreamDecoder::new(&enc.content_type, Limits::default()).unwrap();
        let mut off = 0;
        let mut i = 0;
        while off < enc.body.len() {
            let end = (off + chunks[i % chunks.len()]).min(enc.body.len());
            dec.push(&enc.body[off..end]).unwrap();
            off = end;
            i += 1;
        }
        prop_assert_eq!(dec.finish().unwrap(), one_shot);
    }

    #[test]
    fn header_only_then_raw_forward_round_trip(env in arb::envelope(8)) {
        let limits = Limits::default();
        let enc = encode_envelope(&env);
        let raw = decode_headers(&enc.content_type, enc.body, &limits).unwrap();
        let mut w = EnvelopeWriter::new(&raw.meta);
        for m in &raw.messages {
            w.push_raw(m);
        }
        let fwd = w.finish();
        prop_assert_eq!(decode_envelope(&fwd.content_type, fwd.body, &limits), Ok(env));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]

    #[test]
    fn large_envelopes_round_trip(env in arb::envelope(1000)) {
        let enc = encode_envelope(&env);
        let back = decode_envelope(&enc.content_type, enc.body, &Limits::default());
        prop_assert_eq!(back, Ok(env));
    }
}

#[test]
fn thousand_message_envelope_round_trips() {
    let messages: Vec<Message> = (0..1000)
        .map(|i| rs_protocol::samples::alarm_of_size(i, 2048))
        .collect();
    let env = Envelope {
        meta: rs_protocol::samples::request_meta("acme.p1"),
        messages,
    };
    let enc = encode_envelope(&env);
    let back = decode_envelope(&enc.content_type, enc.body, &Limits::default()).unwrap();
    assert_eq!(back, env);
}

/// Bytes a mutation writes into a header: the ones that matter to XML and
/// to the fast path's literals, and some that are merely different.
const EDIT_BYTES: &[u8] = b"\"'&<>=/ \t\r\n#;x0159.-Z_:\x00\x7f\x80\xc3\xef";

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every header this codec writes takes the canonical-layout fast path
    /// and reads back the same through it and through the general parser.
    #[test]
    fn written_headers_take_the_fast_path(m in arb::message()) {
        let raw = m.to_raw();
        let doc = codec::encode_header(&m.header, raw.kind, raw.data.as_ref());
        prop_assert!(rs_protocol::fuzzing::header_paths(&doc, &Limits::default()));
        let back = codec::decode_header_part(&doc, &Limits::default()).unwrap();
        prop_assert_eq!(back, (m.header, raw.kind, raw.data));
    }

    /// Whatever an edited header becomes, the fast path either declines it
    /// or reads exactly what the general parser reads (`header_paths`
    /// panics otherwise); tight limits reach the limit checks too, unedited
    /// headers included.
    #[test]
    fn edited_headers_read_the_same_by_both_paths(
        m in arb::message(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0..EDIT_BYTES.len(), 0u8..3), 0..4),
        tight in proptest::option::of(prop::sample::select(vec![8usize, 23, 24, 32])),
    ) {
        let raw = m.to_raw();
        let mut doc = codec::encode_header(&m.header, raw.kind, raw.data.as_ref());
        for (at, b, op) in edits {
            let i = at.index(doc.len());
            match op {
                0 => doc[i] = EDIT_BYTES[b],
                1 => doc.insert(i, EDIT_BYTES[b]),
                _ => { doc.remove(i); }
            }
        }
        // Tight limits around the sizes of IDs and timestamps (24 bytes).
        let limits = match tight {
            Some(attr) => Limits { max_attr_bytes: attr, max_elements: 4, max_xml_depth: 3, ..Limits::default() },
            None => Limits::default(),
        };
        rs_protocol::fuzzing::header_paths(&doc, &limits);
    }
}

/// The sample headers of every kind under every attribute limit and
/// element limit around their sizes: both header parsers read the same
/// (an attribute just over the limit is refused, whichever path sees it).
#[test]
fn sample_headers_read_the_same_under_every_small_limit() {
    for m in rs_protocol::samples::every_kind() {
        let raw = m.to_raw();
        let doc = codec::encode_header(&m.header, raw.kind, raw.data.as_ref());
        assert!(rs_protocol::fuzzing::header_paths(&doc, &Limits::default()));
        for attr in 0..=40 {
            for elements in 0..=8 {
                for depth in 1..=4 {
                    let limits = Limits {
                        max_attr_bytes: attr,
                        max_elements: elements,
                        max_xml_depth: depth,
                        ..Limits::default()
                    };
                    rs_protocol::fuzzing::header_paths(&doc, &limits);
                }
            }
        }
    }
}
