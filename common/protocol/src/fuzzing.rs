//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the test
//! suite's deterministic replay of their corpus. Each must return normally
//! for any input; a panic is a bug.

use bytes::Bytes;

use crate::codec::{
    self, Limits, StreamDecoder, decode_control, decode_envelope, decode_header_part,
    decode_headers, decode_status,
};
use crate::model::ContentKind;

/// Small limits, so the fuzzer reaches the limit checks too.
fn limits() -> Limits {
    Limits {
        max_envelope_bytes: 1 << 20,
        max_messages: 64,
        max_part_bytes: 64 << 10,
        max_part_header_bytes: 512,
        max_preamble_bytes: 256,
        max_xml_depth: 8,
        max_elements: 512,
        max_attr_bytes: 512,
        max_text_bytes: 4096,
    }
}

/// Splits `Content-Type: <value>\r\n\r\n<body>`; otherwise uses a fixed
/// content type.
fn split(data: &[u8]) -> (String, &[u8]) {
    if let Some(rest) = data.strip_prefix(b"Content-Type: ".as_slice())
        && let Some(i) = memchr::memmem::find(rest, b"\r\n\r\n")
    {
        return (
            String::from_utf8_lossy(&rest[..i]).into_owned(),
            &rest[i + 4..],
        );
    }
    ("multipart/related; boundary=\"b\"".to_owned(), data)
}

/// The MIME envelope decoder: one-shot, header-only and streamed must
/// agree, and whatever decodes must survive a re-encode unchanged.
pub fn envelope(data: &[u8]) {
    let (ct, body) = split(data);
    let limits = limits();
    let body = Bytes::copy_from_slice(body);
    let full = decode_envelope(&ct, body.clone(), &limits);
    let headers = decode_headers(&ct, body.clone(), &limits);
    if full.is_ok() {
        assert!(
            headers.is_ok(),
            "full decode succeeded where header-only failed"
        );
    }

    // Streamed in uneven chunks, the header-only result must be identical.
    if let Ok(mut dec) = StreamDecoder::new(&ct, limits.clone()) {
        let mut res = Ok(());
        let mut off = 0;
        let mut step = 1 + body.len() % 13;
        while off < body.len() && res.is_ok() {
            let end = (off + step).min(body.len());
            res = dec.push(&body[off..end]);
            off = end;
            step = step * 3 % 29 + 1;
        }
        let streamed = res.and_then(|()| dec.finish());
        assert_eq!(streamed, headers, "streamed decode differs from one-shot");
    }

    if let Ok(env) = full {
        let enc = codec::encode_envelope(&env);
        let again = decode_envelope(&enc.content_type, enc.body, &Limits::default())
            .unwrap_or_else(|e| panic!("re-encoded envelope does not decode: {e}"));
        assert_eq!(again, env, "round trip changed the envelope");
    }
}

/// Decodes a header part with both header parsers and panics unless they
/// agree: whatever the canonical-layout fast path accepts, the general
/// parser decodes to the same header (and `decode_header_part`, which
/// tries the fast path first, gives that too). Returns whether the fast
/// path took the document.
pub fn header_paths(doc: &[u8], limits: &Limits) -> bool {
    let (fast, general) = codec::decode_header_both(doc, limits);
    let Some(fast) = fast else {
        assert_eq!(decode_header_part(doc, limits), general);
        return false;
    };
    assert_eq!(
        general.as_ref(),
        Ok(&fast),
        "the fast path accepted a header the general parser reads differently"
    );
    true
}

/// The XML document parsers; the first byte picks the document type.
pub fn xml(data: &[u8]) {
    let Some((&which, doc)) = data.split_first() else {
        return;
    };
    let limits = limits();
    match which % 9 {
        0 => {
            header_paths(doc, &limits);
        }
        1 => {
            let _ = codec::decode_meta_part(doc, &limits);
        }
        2 => {
            let _ = decode_control(doc, &limits);
        }
        3 => {
            let _ = decode_status(doc, &limits);
        }
        n => {
            let kind = ContentKind::ALL[usize::from(n - 4)];
            let _ = codec::decode_content_part(kind, doc, &limits);
        }
    }
}
