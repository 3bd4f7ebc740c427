//! Bad input: each malformed envelope gets its own typed error naming the
//! part and the reason, and never a panic.

use bytes::Bytes;
use rs_protocol::codec::{DecodeError, Limits, PartRef, XmlError};
use rs_protocol::*;

pub(crate) const CT: &str =
    "multipart/related; boundary=\"B\"; type=\"text/xml\"; start=\"<envelope@rs>\"";
pub(crate) const ROOT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<envelope version="1" sender="acme.p1" created="2026-11-24T22:56:37.123Z"/>"#;

pub(crate) fn header(id: &str, ty: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<header id="{id}" type="{ty}" created="2026-11-24T22:56:37.123Z" locator="source">
<class name="monitoring" sub="disk"/>
<source component="acme.p1" version="0.1.0"><qos precedence="5" persistent="yes"/></source>
</header>"#
    )
}

pub(crate) const ALARM: &str =
    r#"<alarm severity="major" state="raised"><text>disk full</text></alarm>"#;

/// A body from `(Content-ID, extra headers, body)` parts, properly closed.
pub(crate) fn body(parts: &[(&str, &str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, (cid, extra, b)) in parts.iter().enumerate() {
        if i > 0 {
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(
            format!("--B\r\nContent-Type: text/xml\r\nContent-ID: {cid}\r\n{extra}\r\n").as_bytes(),
        );
        v.extend_from_slice(b.as_bytes());
    }
    v.extend_from_slice(b"\r\n--B--\r\n");
    v
}

fn decode(ct: &str, b: Vec<u8>) -> Result<Envelope, DecodeError> {
    decode_envelope(ct, Bytes::from(b), &Limits::default())
}

fn id(s: &str) -> MessageId {
    MessageId::new(s).unwrap()
}

#[test]
fn a_valid_hand_written_envelope_decodes() {
    let h = header("m1", "alarm");
    let env = decode(
        CT,
        body(&[
            ("<envelope@rs>", "", ROOT),
            ("<m1@header>", "", &h),
            ("<m1@content>", "", ALARM),
        ]),
    )
    .unwrap();
    assert_eq!(env.messages.len(), 1);
}

#[test]
fn each_bad_input_has_its_own_error() {
    let h1 = header("m1", "alarm");
    let h2 = header("m2", "alarm");
    let root = ("<envelope@rs>", "", ROOT);
    let cases: Vec<(&str, String, Vec<u8>, fn(&DecodeError) -> bool)> = vec![
        ("not multipart", "text/xml".into(), body(&[root]), |e| {
            matches!(e, DecodeError::ContentType(_))
        }),
        (
            "form-data",
            "multipart/form-data; boundary=B".into(),
            body(&[root]),
            |e| matches!(e, DecodeError::ContentType(_)),
        ),
        (
            "no boundary",
            "multipart/related".into(),
            body(&[root]),
            |e| matches!(e, DecodeError::ContentType(_)),
        ),
        (
            "boundary too long",
            format!("multipart/related; boundary={}", "x".repeat(71)),
            body(&[root]),
            |e| matches!(e, DecodeError::ContentType(_)),
        ),
        (
            "boundary never closes",
            CT.into(),
            {
                let mut b = body(&[root, ("<m1@header>", "", &h1), ("<m1@content>", "", ALARM)]);
                b.truncate(b.len() - 9);
                b
            },
            |e| matches!(e, DecodeError::Unterminated),
        ),
        (
            "no boundary at all",
            CT.into(),
            b"just some text".to_vec(),
            |e| matches!(e, DecodeError::NoFirstBoundary),
        ),
        (
            "header without content",
            CT.into(),
            body(&[root, ("<m1@header>", "", &h1)]),
            |e| matches!(e, DecodeError::HeaderWithoutContent(i) if i.as_str() == "m1"),
        ),
        (
            "header then another header",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                ("<m2@header>", "", &h2),
                ("<m2@content>", "", ALARM),
            ]),
            |e| matches!(e, DecodeError::HeaderWithoutContent(i) if i.as_str() == "m1"),
        ),
        (
            // The content of the header just read is recognised by its ID;
            // any other ID in a content part is checked as ever.
            "content part with a bad ID after a header",
            CT.into(),
            body(&[root, ("<m1@header>", "", &h1), ("<m/1@content>", "", ALARM)]),
            |e| matches!(e, DecodeError::BadContentId { .. }),
        ),
        (
            "content without header",
            CT.into(),
            body(&[root, ("<m1@content>", "", ALARM)]),
            |e| matches!(e, DecodeError::ContentWithoutHeader(i) if i.as_str() == "m1"),
        ),
        (
            "duplicate message",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                ("<m1@content>", "", ALARM),
                ("<m1@header>", "", &h1),
                ("<m1@content>", "", ALARM),
            ]),
            |e| matches!(e, DecodeError::DuplicatePart { part: PartRef::Header(i) } if i.as_str() == "m1"),
        ),
        (
            "duplicate content",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                ("<m1@content>", "", ALARM),
                ("<m1@content>", "", ALARM),
            ]),
            |e| matches!(e, DecodeError::DuplicatePart { part: PartRef::Content(i) } if i.as_str() == "m1"),
        ),
        ("duplicate root", CT.into(), body(&[root, root]), |e| {
            matches!(
                e,
                DecodeError::DuplicatePart {
                    part: PartRef::Root
                }
            )
        }),
        (
            "root missing",
            CT.into(),
            body(&[("<m1@header>", "", &h1), ("<m1@content>", "", ALARM)]),
            |e| matches!(e, DecodeError::MissingRoot),
        ),
        (
            "no Content-ID",
            CT.into(),
            b"--B\r\nContent-Type: text/xml\r\n\r\n<x/>\r\n--B--".to_vec(),
            |e| matches!(e, DecodeError::MissingContentId { .. }),
        ),
        (
            "odd Content-ID",
            CT.into(),
            body(&[("<foo>", "", ROOT)]),
            |e| matches!(e, DecodeError::BadContentId { .. }),
        ),
        (
            "folded part header",
            CT.into(),
            body(&[("<envelope@rs>", "X-A: 1\r\n b\r\n", ROOT)]),
            |e| matches!(e, DecodeError::PartHeaders { .. }),
        ),
        (
            "unknown transfer encoding",
            CT.into(),
            body(&[(
                "<envelope@rs>",
                "Content-Transfer-Encoding: quoted-printable\r\n",
                ROOT,
            )]),
            |e| matches!(e, DecodeError::TransferEncoding { .. }),
        ),
        (
            "bad base64",
            CT.into(),
            body(&[(
                "<envelope@rs>",
                "Content-Transfer-Encoding: base64\r\n",
                "!!!!",
            )]),
            |e| {
                matches!(
                    e,
                    DecodeError::Base64 {
                        part: PartRef::Root,
                        ..
                    }
                )
            },
        ),
        (
            "unknown content type",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &header("m1", "telegram")),
                ("<m1@content>", "", ALARM),
            ]),
            |e| matches!(e, DecodeError::UnknownContentType { id, value } if id.as_str() == "m1" && value == "telegram"),
        ),
        (
            "header id differs from Content-ID",
            CT.into(),
            body(&[root, ("<m9@header>", "", &h1), ("<m9@content>", "", ALARM)]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        part: PartRef::Header(_),
                        error: XmlError::Invalid(_)
                    }
                )
            },
        ),
        (
            "invalid UTF-8 in a header",
            CT.into(),
            {
                let mut h = h1.clone().into_bytes();
                let at = h.len() - 20;
                h[at] = 0xff;
                let mut b = body(&[root]);
                b.truncate(b.len() - 9);
                b.extend_from_slice(b"\r\n--B\r\nContent-ID: <m1@header>\r\n\r\n");
                b.extend_from_slice(&h);
                b.extend_from_slice(b"\r\n--B--\r\n");
                b
            },
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        part: PartRef::Header(_),
                        error: XmlError::InvalidUtf8 { .. }
                    }
                )
            },
        ),
        (
            "DOCTYPE in content",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    r#"<!DOCTYPE alarm [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><alarm severity="major" state="raised"><text>&b;</text></alarm>"#,
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        part: PartRef::Content(_),
                        error: XmlError::Doctype
                    }
                )
            },
        ),
        (
            "external entity",
            CT.into(),
            body(&[(
                "<envelope@rs>",
                "",
                r#"<!DOCTYPE envelope SYSTEM "http://evil.example/x.dtd"><envelope version="1" sender="acme.p1" created="2026-11-24T22:56:37Z"/>"#,
            )]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        part: PartRef::Root,
                        error: XmlError::Doctype
                    }
                )
            },
        ),
        (
            "undeclared entity",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    r#"<alarm severity="major" state="raised"><text>&xxe;</text></alarm>"#,
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::UnknownEntity(_),
                        ..
                    }
                )
            },
        ),
        (
            "wrong root element",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    r#"<event severity="info"><text>x</text></event>"#,
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::UnexpectedRoot { .. },
                        ..
                    }
                )
            },
        ),
        (
            "unknown element",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    r#"<alarm severity="major" state="raised"><text>x</text><script/></alarm>"#,
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::UnexpectedElement { .. },
                        ..
                    }
                )
            },
        ),
        (
            "missing attribute",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    r#"<alarm state="raised"><text>x</text></alarm>"#,
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::MissingAttr {
                            attr: "severity",
                            ..
                        },
                        ..
                    }
                )
            },
        ),
        (
            "bad severity",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    r#"<alarm severity="apocalyptic" state="raised"><text>x</text></alarm>"#,
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::BadAttr {
                            attr: "severity",
                            ..
                        },
                        ..
                    }
                )
            },
        ),
        (
            "control character",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    "<alarm severity=\"major\" state=\"raised\"><text>a\u{1}b</text></alarm>",
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::IllegalChar { .. },
                        ..
                    }
                )
            },
        ),
        (
            "mismatched tags",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                (
                    "<m1@content>",
                    "",
                    r#"<alarm severity="major" state="raised"><text>x</txt></alarm>"#,
                ),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::Syntax(_),
                        ..
                    }
                )
            },
        ),
        (
            "trailing garbage",
            CT.into(),
            body(&[
                root,
                ("<m1@header>", "", &h1),
                ("<m1@content>", "", &format!("{ALARM}<alarm/>")),
            ]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        error: XmlError::Syntax(_),
                        ..
                    }
                )
            },
        ),
        (
            "unsupported version",
            CT.into(),
            body(&[(
                "<envelope@rs>",
                "",
                r#"<envelope version="2" sender="acme.p1" created="2026-11-24T22:56:37Z"/>"#,
            )]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        part: PartRef::Root,
                        error: XmlError::BadAttr {
                            attr: "version",
                            ..
                        }
                    }
                )
            },
        ),
        (
            "spoofed-looking sender ID",
            CT.into(),
            body(&[(
                "<envelope@rs>",
                "",
                r#"<envelope version="1" sender="ACME.p1" created="2026-11-24T22:56:37Z"/>"#,
            )]),
            |e| {
                matches!(
                    e,
                    DecodeError::Xml {
                        part: PartRef::Root,
                        error: XmlError::BadAttr { attr: "sender", .. }
                    }
                )
            },
        ),
        (
            "data size lies",
            CT.into(),
            body(&[
                root,
                (
                    "<m1@header>",
                    "",
                    &h1.replace("type=\"alarm\"", "type=\"data\"").replace(
                        "</source>",
                        "</source><data mime=\"text/plain\" size=\"99\" encoding=\"binary\"/>",
                    ),
                ),
                (
                    "<m1@content>",
                    "Content-Transfer-Encoding: binary\r\n",
                    "short",
                ),
            ]),
            |e| matches!(e, DecodeError::ContentMismatch { .. }),
        ),
        (
            "XML content declared as something else",
            CT.into(),
            {
                let mut b = body(&[root, ("<m1@header>", "", &h1)]);
                b.truncate(b.len() - 9);
                b.extend_from_slice(format!("\r\n--B\r\nContent-Type: image/png\r\nContent-ID: <m1@content>\r\n\r\n{ALARM}\r\n--B--\r\n").as_bytes());
                b
            },
            |e| matches!(e, DecodeError::ContentMismatch { .. }),
        ),
    ];
    for (name, ct, b, check) in cases {
        match decode(&ct, b) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => {
                assert!(check(&e), "{name}: unexpected error {e:?}");
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

/// An envelope as the codec writes it (each part read by the fast paths)
/// with hundreds of messages, one ID repeated far from its first use: the
/// second header is refused by ID, whichever message repeats.
#[test]
fn a_repeated_message_id_is_found_among_many() {
    let messages: Vec<Message> = (0..300)
        .map(|i| rs_protocol::samples::alarm_of_size(i, 600))
        .collect();
    for (first, again) in [(0, 299), (150, 151), (17, 260)] {
        let mut env = Envelope {
            meta: rs_protocol::samples::request_meta("acme.p1"),
            messages: messages.clone(),
        };
        env.messages[again].header.id = env.messages[first].header.id.clone();
        let enc = encode_envelope(&env);
        let want = env.messages[first].header.id.clone();
        assert_eq!(
            decode_headers(&enc.content_type, enc.body, &Limits::default()),
            Err(DecodeError::DuplicatePart {
                part: PartRef::Header(want)
            }),
            "message {again} repeats message {first}'s ID"
        );
    }
    let env = Envelope {
        meta: rs_protocol::samples::request_meta("acme.p1"),
        messages,
    };
    let enc = encode_envelope(&env);
    assert_eq!(
        decode_envelope(&enc.content_type, enc.body, &Limits::default()),
        Ok(env)
    );
}

#[test]
fn limits_are_enforced() {
    let h1 = header("m1", "alarm");
    let root = ("<envelope@rs>", "", ROOT);
    let ok = body(&[root, ("<m1@header>", "", &h1), ("<m1@content>", "", ALARM)]);
    let try_with =
        |limits: Limits, b: &[u8]| decode_envelope(CT, Bytes::copy_from_slice(b), &limits);

    let small = Limits {
        max_envelope_bytes: 100,
        ..Limits::default()
    };
    assert!(matches!(
        try_with(small, &ok),
        Err(DecodeError::EnvelopeTooLarge { limit: 100 })
    ));

    let small = Limits {
        max_part_bytes: 200,
        ..Limits::default()
    };
    assert!(matches!(
        try_with(small, &ok),
        Err(DecodeError::PartTooLarge {
            part: PartRef::Index(2),
            limit: 200
        })
    ));

    let small = Limits {
        max_messages: 0,
        ..Limits::default()
    };
    assert!(matches!(
        try_with(small, &ok),
        Err(DecodeError::TooManyMessages { limit: 0 })
    ));

    let small = Limits {
        max_xml_depth: 1,
        ..Limits::default()
    };
    assert!(matches!(
        try_with(small, &ok),
        Err(DecodeError::Xml {
            error: XmlError::TooDeep { limit: 1 },
            ..
        })
    ));

    let small = Limits {
        max_attr_bytes: 5,
        ..Limits::default()
    };
    assert!(matches!(
        try_with(small, &ok),
        Err(DecodeError::Xml {
            error: XmlError::AttrTooLong { .. },
            ..
        })
    ));

    let small = Limits {
        max_text_bytes: 4,
        ..Limits::default()
    };
    assert!(matches!(
        try_with(small, &ok),
        Err(DecodeError::Xml {
            error: XmlError::TextTooLong { .. },
            ..
        })
    ));

    let small = Limits {
        max_part_header_bytes: 10,
        ..Limits::default()
    };
    assert!(matches!(
        try_with(small, &ok),
        Err(DecodeError::PartHeaders { .. })
    ));

    let mut pre = vec![b'x'; 5000];
    pre.extend_from_slice(b"\r\n");
    pre.extend_from_slice(&ok);
    assert!(matches!(
        try_with(Limits::default(), &pre),
        Err(DecodeError::PreambleTooLarge { .. })
    ));

    let mut post = ok.clone();
    post.extend(std::iter::repeat_n(b'y', 5000));
    assert!(matches!(
        try_with(Limits::default(), &post),
        Err(DecodeError::PreambleTooLarge { .. })
    ));

    // A billion-laughs body nested deep instead of wide.
    let deep = format!(
        "{}{}",
        "<detail name=\"a\">".repeat(100),
        "</detail>".repeat(100)
    );
    let doc = format!(r#"<alarm severity="major" state="raised"><text>x</text>{deep}</alarm>"#);
    let b = body(&[root, ("<m1@header>", "", &h1), ("<m1@content>", "", &doc)]);
    assert!(try_with(Limits::default(), &b).is_err());

    // Streamed, an oversized part is refused before it is all in memory.
    let mut dec = StreamDecoder::new(
        CT,
        Limits {
            max_part_bytes: 1024,
            ..Limits::default()
        },
    )
    .unwrap();
    dec.push(b"--B\r\nContent-ID: <envelope@rs>\r\n\r\n")
        .unwrap();
    let chunk = [b'z'; 256];
    let mut refused = false;
    for _ in 0..100 {
        if let Err(e) = dec.push(&chunk) {
            assert!(matches!(e, DecodeError::PartTooLarge { .. }), "{e:?}");
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "an endless part must be refused once it exceeds the limit"
    );
}

#[test]
fn message_ids_in_errors() {
    let e = DecodeError::HeaderWithoutContent(id("m7"));
    assert_eq!(
        e.to_string(),
        "message m7 has a header part but no content part after it"
    );
}

/// A message whose content part is `ctype`, base64 of `der`.
fn sealed_body(ty: &str, ctype: &str, der: &[u8]) -> Vec<u8> {
    let mut h = header("m1", ty);
    if ty == "data" {
        h = h.replace(
            "</source>",
            r#"</source><data mime="text/plain" size="3" encoding="binary"/>"#,
        );
    }
    format!(
        "--B\r\nContent-Type: text/xml\r\nContent-ID: <envelope@rs>\r\n\r\n{ROOT}\
         \r\n--B\r\nContent-Type: text/xml\r\nContent-ID: <m1@header>\r\n\r\n{h}\
         \r\n--B\r\nContent-Type: {ctype}\r\nContent-ID: <m1@content>\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--B--\r\n",
        openssl::base64::encode_block(der)
    )
    .into_bytes()
}

#[test]
fn sealed_contents_pass_forwarders_untouched_and_are_never_parsed_on_the_way() {
    // Arbitrary bytes (a seal is DER), including the boundary itself.
    let der: Vec<u8> = [&[0x30, 0x82, 0, 0xff][..], b"\r\n--B\r\n", &[0u8; 40]].concat();
    for (ty, seal) in [
        ("alarm", "signed-data"),
        ("data", "enveloped-data"),
        ("response", "signed-data"),
    ] {
        let ctype = format!("application/pkcs7-mime; smime-type={seal}");
        let raw = decode_headers(
            CT,
            Bytes::from(sealed_body(ty, &ctype, &der)),
            &Limits::default(),
        )
        .unwrap();
        let m = &raw.messages[0];
        // Transfer-decoded, otherwise as sent; the data size in the
        // header describes the sealed data, not the seal.
        assert_eq!(&m.content[..], &der[..]);
        assert_eq!(
            m.seal(),
            Some(if seal == "signed-data" {
                Seal::Signed
            } else {
                Seal::Encrypted
            })
        );
        // Only the server opens it: decoding the content is refused.
        assert!(matches!(
            m.clone().decode(&Limits::default()),
            Err(DecodeError::Sealed { .. })
        ));
        // A forwarder writes it on byte for byte (base64 again, the seal
        // holding the boundary).
        let mut w = EnvelopeWriter::new(&raw.meta);
        w.push_raw(m);
        let enc = w.finish();
        let again = decode_headers(&enc.content_type, enc.body, &Limits::default()).unwrap();
        assert_eq!(again.messages[0], *m);
    }
    // pkcs7-mime that is not one of the two seals is refused, naming it.
    let e = decode(
        CT,
        sealed_body(
            "alarm",
            "application/pkcs7-mime; smime-type=compressed-data",
            &der,
        ),
    )
    .unwrap_err();
    assert!(
        matches!(&e, DecodeError::ContentMismatch { reason, .. } if reason.contains("compressed-data")),
        "{e}"
    );
    let e = decode(CT, sealed_body("alarm", "application/pkcs7-mime", &der)).unwrap_err();
    assert!(matches!(e, DecodeError::ContentMismatch { .. }), "{e}");
}
