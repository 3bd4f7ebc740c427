//! Every XML document the suite emits validates against `dtd/`: one of
//! every message type and control payload, plus a deterministic sample of
//! arbitrary messages, each checked with `xmllint --dtdvalid`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use rs_protocol::codec::{encode_control, encode_header, encode_meta, encode_status};
use rs_protocol::control::{CLASS_CONTROL, CLASS_INFRASTRUCTURE};
use rs_protocol::samples;
use rs_protocol::*;
use rs_tests::{arb, repo_root};

/// Documents to validate, grouped by DTD file name.
#[derive(Default)]
struct Docs(BTreeMap<&'static str, Vec<(String, Vec<u8>)>>);

impl Docs {
    fn add(&mut self, dtd: &'static str, name: String, doc: Vec<u8>) {
        self.0.entry(dtd).or_default().push((name, doc));
    }

    fn message(&mut self, m: &Message) {
        let raw = m.to_raw();
        let id = m.header.id.as_str().to_owned();
        self.add(
            "header.dtd",
            format!("{id}.header"),
            encode_header(&m.header, raw.kind, raw.data.as_ref()),
        );
        let dtd = match raw.kind {
            ContentKind::Alarm => Some("alarm.dtd"),
            ContentKind::Event => Some("event.dtd"),
            ContentKind::Response => Some("response.dtd"),
            ContentKind::BulkRequest => Some("bulk-request.dtd"),
            ContentKind::BulkResponse => Some("bulk-response.dtd"),
            ContentKind::Data if m.header.class.class == CLASS_CONTROL => Some("control.dtd"),
            ContentKind::Data if m.header.class.class == CLASS_INFRASTRUCTURE => Some("status.dtd"),
            ContentKind::Data => None,
        };
        if let Some(dtd) = dtd {
            self.add(dtd, format!("{id}.content"), raw.content.to_vec());
        }
        if let Content::Response(Response {
            result: Some(r), ..
        }) = &m.content
            && r.text.starts_with("<?xml")
            && r.text.contains("<status")
        {
            self.add(
                "status.dtd",
                format!("{id}.result"),
                r.text.clone().into_bytes(),
            );
        }
    }
}

fn xmllint(dtd: &Path, files: &[PathBuf]) {
    let out = Command::new("xmllint")
        .args(["--noout", "--nonet", "--dtdvalid"])
        .arg(dtd)
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run xmllint ({e}): install libxml2-utils (.ci/run does)")
        });
    assert!(
        out.status.success(),
        "{} rejected documents:\n{}",
        dtd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_emitted_document_is_valid() {
    let mut docs = Docs::default();
    for m in samples::every_kind() {
        docs.message(&m);
    }
    docs.add(
        "envelope.dtd",
        "request".into(),
        encode_meta(&samples::request_meta("acme.p1")),
    );
    docs.add(
        "envelope.dtd",
        "reply".into(),
        encode_meta(&samples::reply_meta("acme.m1", &samples::every_kind())),
    );
    for (i, a) in samples::control_actions().iter().enumerate() {
        docs.add("control.dtd", format!("control-{i}"), encode_control(a));
    }
    docs.add(
        "status.dtd",
        "status".into(),
        encode_status(&samples::status_tree()),
    );

    // A deterministic sample of arbitrary messages and envelope headers.
    let mut runner = TestRunner::deterministic();
    for _ in 0..150 {
        let m = arb::message().new_tree(&mut runner).unwrap().current();
        docs.message(&m);
    }
    for i in 0..30 {
        let meta = arb::meta().new_tree(&mut runner).unwrap().current();
        docs.add("envelope.dtd", format!("meta-{i}"), encode_meta(&meta));
    }

    let dir = std::env::temp_dir().join(format!("rs-dtd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dtd_dir = repo_root().join("dtd");
    let mut total = 0;
    for (dtd, list) in &docs.0 {
        let mut files = Vec::new();
        for (i, (name, doc)) in list.iter().enumerate() {
            let path = dir.join(format!("{i}-{}.xml", name.replace(['/', '\\'], "_")));
            std::fs::write(&path, doc).unwrap();
            files.push(path);
        }
        total += files.len();
        xmllint(&dtd_dir.join(dtd), &files);
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        docs.0.len() == 9,
        "every DTD was exercised: {:?}",
        docs.0.keys().collect::<Vec<_>>()
    );
    assert!(total > 300);
}

#[test]
fn xmllint_rejects_an_invalid_document() {
    // Guards the test above against an xmllint that accepts anything.
    let dir = std::env::temp_dir().join(format!("rs-dtd-neg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.xml");
    std::fs::write(
        &path,
        b"<alarm severity=\"apocalyptic\" state=\"raised\"><text>x</text></alarm>",
    )
    .unwrap();
    let ok = Command::new("xmllint")
        .args(["--noout", "--nonet", "--dtdvalid"])
        .arg(repo_root().join("dtd/alarm.dtd"))
        .arg(&path)
        .output()
        .unwrap()
        .status
        .success();
    std::fs::remove_dir_all(&dir).ok();
    assert!(!ok);
}
