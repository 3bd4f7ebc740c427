//! What docs/protocol.md and docs/control-api.md tell a client writer,
//! checked against real daemons: how a bad content is answered, that the
//! documents the control API answers with are the ones its DTD declares,
//! and that the protocol's examples are what a tier accepts.

use std::path::Path;

use rs_protocol::codec::{EnvelopeWriter, Limits, decode_headers};
use rs_protocol::model::EnvelopeMeta;
use rs_protocol::{Outcome, RsId, Timestamp};
use rs_tests::deploy::{Deployment, admin, base, stored_ids};

use crate::backchannel::{exe, tmp};
use crate::codec_errors::{ALARM, CT, ROOT, body, header};

/// POSTs `body` (Content-Type `ct`) to `a` with `http`; the status and,
/// for 200, each message's outcome.
async fn post(
    http: &reqwest::Client,
    a: &str,
    ct: &str,
    body: Vec<u8>,
) -> (u16, Vec<(String, Outcome)>, String) {
    let r = http
        .post(format!("{}/rs/v1/envelope", base(a)))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let rct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = r.bytes().await.unwrap();
    if status != 200 {
        return (
            status,
            Vec::new(),
            String::from_utf8_lossy(&bytes).into_owned(),
        );
    }
    let env = decode_headers(&rct, bytes, &Limits::default()).unwrap();
    let outcomes = env
        .meta
        .outcomes
        .into_iter()
        .map(|(id, o)| (id.to_string(), o))
        .collect();
    (status, outcomes, String::new())
}

fn rejected_invalid(o: &Outcome) -> bool {
    matches!(o, Outcome::Rejected(r) if r.code.as_str() == "invalid")
}

/// protocol.md §3.1 and §4.4: an error inside a message's content (a
/// DOCTYPE, an alarm without its severity) refuses that message alone,
/// `rejected`/`invalid` with the reason, and the others are stored; an
/// error in the envelope header or a message's header part refuses the
/// whole envelope with 400, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_content_refuses_its_message_and_a_bad_header_the_envelope() {
    let dir = tmp("doc-errors");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let http = admin(&a);
    let doctype = "<?xml version=\"1.0\"?><!DOCTYPE alarm [<!ENTITY x \"y\">]>\
                   <alarm severity=\"major\" state=\"raised\"><text>&x;</text></alarm>";
    let no_severity = "<alarm state=\"raised\"><text>disk full</text></alarm>";
    let (h1, h2, h3) = (
        header("doc-good", "alarm"),
        header("doc-doctype", "alarm"),
        header("doc-nosev", "alarm"),
    );
    let (st, outcomes, text) = post(
        &http,
        &a,
        CT,
        body(&[
            ("<envelope@rs>", "", ROOT),
            ("<doc-good@header>", "", &h1),
            ("<doc-good@content>", "", ALARM),
            ("<doc-doctype@header>", "", &h2),
            ("<doc-doctype@content>", "", doctype),
            ("<doc-nosev@header>", "", &h3),
            ("<doc-nosev@content>", "", no_severity),
        ]),
    )
    .await;
    assert_eq!(st, 200, "{text}");
    let of = |id: &str| &outcomes.iter().find(|(i, _)| i == id).unwrap().1;
    assert_eq!(*of("doc-good"), Outcome::Accepted);
    assert!(rejected_invalid(of("doc-doctype")), "{outcomes:?}");
    assert!(rejected_invalid(of("doc-nosev")), "{outcomes:?}");
    if let Outcome::Rejected(r) = of("doc-nosev") {
        assert!(r.text.contains("severity"), "{r:?}");
    }
    let ids = stored_ids(&dir.join("appserver")).unwrap();
    assert!(ids.contains(&"doc-good".to_owned()));
    assert!(!ids.iter().any(|i| i == "doc-doctype" || i == "doc-nosev"));

    // A DOCTYPE in a header part, and a header without `created`.
    let bad_header = header("doc-h1", "alarm")
        .replace("<header ", "<!DOCTYPE header [<!ENTITY x \"y\">]><header ");
    let no_created = header("doc-h2", "alarm").replace(" created=\"2026-11-24T22:56:37.123Z\"", "");
    for h in [&bad_header, &no_created] {
        let id = if h.contains("doc-h1") {
            "doc-h1"
        } else {
            "doc-h2"
        };
        let (st, _, text) = post(
            &http,
            &a,
            CT,
            body(&[
                ("<envelope@rs>", "", ROOT),
                ("<doc-ok@header>", "", &header("doc-ok", "alarm")),
                ("<doc-ok@content>", "", ALARM),
                (&format!("<{id}@header>"), "", h),
                (&format!("<{id}@content>"), "", ALARM),
            ]),
        )
        .await;
        assert_eq!(st, 400, "{text}");
        assert!(text.contains(&format!("header of message {id}")), "{text}");
    }
    let ids = stored_ids(&dir.join("appserver")).unwrap();
    assert!(
        !ids.iter().any(|i| i == "doc-ok"),
        "a refused envelope stored something"
    );
    d.stop_all();
}

/// control-api.md: every document is declared in dtd/control-api.dtd, the
/// answers of `GET /messages`, `GET /export` and a feed among them, with
/// every kind of stored message embedded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_messages_come_back_in_documents_the_control_dtd_declares() {
    let dir = tmp("doc-dtd");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let http = admin(&a);
    let r = http
        .post(format!("{}/rs/v1/control/subscriptions", base(&a)))
        .body(r#"<subscription name="all" delivery="feed"/>"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // One message of every kind that travels up (the back-channel's stay
    // out: the server refuses them upward).
    let msgs: Vec<_> = rs_protocol::samples::every_kind()
        .into_iter()
        .filter(|m| m.header.source().is_some())
        .map(|mut m| {
            if let rs_protocol::Route::Source(s) = &mut m.header.route {
                s.qos.expiry = None;
            }
            m
        })
        .collect();
    let kinds: std::collections::BTreeSet<&str> =
        msgs.iter().map(|m| m.to_raw().kind.as_str()).collect();
    assert!(kinds.len() >= 5, "{kinds:?}");
    let mut w = EnvelopeWriter::new(&EnvelopeMeta::new(
        RsId::new("acme.m1").unwrap(),
        Timestamp::now(),
    ));
    for m in &msgs {
        w.push(m);
    }
    let enc = w.finish();
    let (st, outcomes, text) = post(&http, &a, &enc.content_type, enc.body.to_vec()).await;
    assert_eq!(st, 200, "{text}");
    let stored = outcomes
        .iter()
        .filter(|(_, o)| *o == Outcome::Accepted)
        .count();
    assert!(stored >= 5, "{outcomes:?}");
    let get = |p: &'static str| {
        let http = http.clone();
        let a = a.clone();
        async move {
            http.get(format!("{}/rs/v1/control/{p}", base(&a)))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    };
    for (name, doc) in [
        ("messages", get("messages?limit=1000").await),
        ("export", get("export").await),
        ("feed", get("subscriptions/all/feed?wait=2").await),
    ] {
        let text = String::from_utf8_lossy(&doc);
        for k in &kinds {
            // An upload request has no peripheral tasks (its stored file's
            // announcement has), so feeds do not carry it.
            if name == "feed" && *k == "bulk-request" {
                continue;
            }
            assert!(
                text.contains(&format!("type=\"{k}\"")),
                "{name} lacks {k}: {text}"
            );
        }
        rs_tests::assert_control_api_valid(&doc, &dir.join(format!("{name}.xml")));
    }
    d.stop_all();
}

/// protocol.md §13.1, "a proxy's POST", is one a tier takes from that
/// proxy: its messages carry no routing hop the proxy may not speak for
/// (the example once showed the MLM's hop, which anti-spoofing refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_example_of_a_proxys_post_is_taken_from_that_proxy() {
    let dir = tmp("doc-example");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (_a, m) = d.server_and_mlm().unwrap();
    let file = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join("forward-request.http"),
    )
    .unwrap();
    let text = file.strip_prefix(b"Content-Type: ".as_slice()).unwrap();
    let at = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let ct = String::from_utf8(text[..at].to_vec()).unwrap();
    let http = rs_tests::deploy::component_client(&m, "acme.p1").unwrap();
    let (st, outcomes, text) = post(&http, &m, &ct, text[at + 4..].to_vec()).await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    for (id, o) in &outcomes {
        assert!(
            !matches!(o, Outcome::Rejected(r) if r.code.as_str() == "spoofed-source"),
            "{id}: {o:?}"
        );
    }
    d.stop_all();
}
