//! Realistic sample messages: one of every content type and control payload,
//! deterministic (fixed IDs and times) so they serve as golden examples, DTD
//! validation inputs, fuzz seeds and benchmark inputs.

#![allow(clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;

use crate::codec::{encode_control, encode_status};
use crate::control::{
    ActionKind, CLASS_CONTROL, CLASS_INFRASTRUCTURE, ControlAction, NodeState, SUB_HEARTBEAT,
    StatusNode,
};
use crate::ids::{MessageId, RsId};
use crate::model::*;
use crate::outcome::{Outcome, Reason};
use crate::time::Timestamp;

// Samples are built from literals known to be valid.
fn id(s: &str) -> MessageId {
    MessageId::new(s).expect("sample message IDs are valid")
}

fn rs(s: &str) -> RsId {
    RsId::new(s).expect("sample remote services IDs are valid")
}

/// A fixed instant: 2026-11-24T22:56:37.123Z.
pub fn t0() -> Timestamp {
    Timestamp::from_millis(1_795_560_997_123).expect("in range")
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(t0().as_millis() + ms).expect("in range")
}

/// A forward header from `component` with default QoS.
pub fn forward_header(msg: &str, component: &str, class: &str, sub: &str) -> Header {
    Header {
        id: id(msg),
        created: t0(),
        class: Classification::new(class, sub),
        route: Route::Source(Source {
            component: rs(component),
            version: "0.1.0".into(),
            qos: Qos {
                expiry: Some(at(86_400_000)),
                precedence: 7,
                persistent: true,
            },
        }),
        routing: smallvec::smallvec![Hop {
            component: rs("acme.m1"),
            received: at(5),
            sent: Some(at(7)),
        }],
    }
}

/// A back-channel header to `to`.
pub fn back_header(msg: &str, to: &[&str], class: &str, sub: &str) -> Header {
    Header {
        id: id(msg),
        created: t0(),
        class: Classification::new(class, sub),
        route: Route::Destination(Destination::new(
            to.iter().map(|d| rs(d)).collect(),
            Some(at(3_600_000)),
        )),
        routing: smallvec::smallvec![Hop {
            component: rs("rs.a1"),
            received: t0(),
            sent: Some(at(1)),
        }],
    }
}

/// The status tree of a proxy with one integrator, platform and instance.
pub fn status_tree() -> StatusNode {
    let instance = StatusNode {
        id: Some(rs("acme.p1.s1")),
        name: Some("db01.acme.example".into()),
        ..StatusNode::new("instance", NodeState::Ok)
    };
    let platform = StatusNode {
        name: Some("linux".into()),
        children: vec![instance],
        ..StatusNode::new("platform", NodeState::Ok)
    };
    let integrator = StatusNode {
        id: Some(rs("acme.p1.i1")),
        name: Some("diskwatch".into()),
        version: Some("1.4".into()),
        children: vec![platform],
        ..StatusNode::new("integrator", NodeState::Degraded)
    };
    StatusNode {
        id: Some(rs("acme.p1")),
        version: Some("0.1.0".into()),
        since: Some(at(-3_600_000)),
        metrics: vec![
            Detail::new("spool.messages", "12"),
            Detail::new("spool.bytes", "24576"),
        ],
        children: vec![integrator],
        ..StatusNode::new("proxy", NodeState::Ok)
    }
}

fn data(mime: &str, encoding: TransferEncoding, bytes: impl Into<Bytes>) -> Content {
    Content::Data(Data {
        mime: mime.into(),
        encoding,
        bytes: bytes.into(),
    })
}

/// One message of every content type, and every control payload, with
/// fixed IDs and times.
pub fn every_kind() -> Vec<Message> {
    let mut v = vec![
        Message {
            header: forward_header("m-alarm", "acme.p1", "monitoring", "disk"),
            content: Content::Alarm(Alarm {
                severity: Severity::Major,
                state: AlarmState::Raised,
                instance: Some(rs("acme.p1.s1")),
                key: Some("disk:/var".into()),
                text: "File system /var is 91% full (threshold 90%)".into(),
                details: vec![
                    Detail::new("mount", "/var"),
                    Detail::new("used.pct", "91"),
                    Detail::new("note", "quotes \" & <angles> \t tab\r\nand CRLF"),
                ],
            }),
        },
        Message {
            header: forward_header("m-event", "acme.p1.s1", "monitoring", "service"),
            content: Content::Event(Event {
                severity: Severity::Info,
                instance: Some(rs("acme.p1.s1")),
                kind: Some("service.restart".into()),
                text: "sshd.service restarted".into(),
                details: vec![Detail::new("unit", "sshd.service")],
            }),
        },
        Message {
            header: forward_header("m-response", "acme.p1", CLASS_CONTROL, "getStatus"),
            content: Content::Response(Response {
                reference: id("b-getstatus"),
                outcome: Outcome::Accepted,
                details: vec![],
                result: Some(ResultPayload {
                    mime: "text/xml".into(),
                    text: String::from_utf8_lossy(&encode_status(&status_tree())).into_owned(),
                }),
            }),
        },
        Message {
            header: forward_header(
                "m-response-rejected",
                "acme.p1",
                CLASS_CONTROL,
                "configChange",
            ),
            content: Content::Response(Response {
                reference: id("b-config"),
                outcome: Outcome::Rejected(Reason::new(
                    "bad-config",
                    "upstream.urls: at least one URL is required; kept the old configuration",
                )),
                details: vec![Detail::new("line", "3")],
                result: None,
            }),
        },
        Message {
            header: forward_header(
                "m-response-retry",
                "acme.m1",
                CLASS_CONTROL,
                "softwareUpdate",
            ),
            content: Content::Response(Response {
                reference: id("b-update"),
                outcome: Outcome::retry(
                    Duration::from_secs(3600),
                    "throttled",
                    "bulk window opens at 22:00 site time",
                ),
                details: vec![],
                result: None,
            }),
        },
        Message {
            header: forward_header("m-response-expired", "acme.p2", CLASS_CONTROL, "ping"),
            content: Content::Response(Response {
                reference: id("b-ping"),
                outcome: Outcome::Expired,
                details: vec![],
                result: None,
            }),
        },
        Message {
            header: forward_header("m-bulk-up", "acme.p1", "diagnostics", "core"),
            content: Content::BulkRequest(BulkRequest {
                direction: Direction::Upload,
                name: "core.sshd.4711".into(),
                size: 2_147_483_648,
                sha256: [0xab; 32],
                class: Classification::new("diagnostics", "core"),
                url: None,
                expires: None,
            }),
        },
        Message {
            header: back_header(
                "b-bulk-offer",
                &["acme.p1", "acme.p2"],
                "software",
                "package",
            ),
            content: Content::BulkRequest(BulkRequest {
                direction: Direction::Download,
                name: "rs-proxy-0.2.0.tar.gz".into(),
                size: 7_340_032,
                sha256: [0x3c; 32],
                class: Classification::new("software", "package"),
                url: Some("https://rs.example.net/rs/v1/bulk/9Qd3kLx0bV7nE2".into()),
                expires: Some(at(86_400_000)),
            }),
        },
        Message {
            header: back_header("b-bulk-granted", &["acme.p1"], "diagnostics", "core"),
            content: Content::BulkResponse(BulkResponse {
                request: id("m-bulk-up"),
                grant: Grant::Granted {
                    url: "https://rs.example.net/rs/v1/bulk/Zr4V8yq1mC6tP0wH".into(),
                    expires: at(3_600_000),
                },
            }),
        },
        Message {
            header: back_header("b-bulk-refused", &["acme.p2"], "diagnostics", "core"),
            content: Content::BulkResponse(BulkResponse {
                request: id("m-bulk-up2"),
                grant: Grant::Refused {
                    reason: Reason::new("too-large", "2 GiB exceeds the 1 GiB upload limit"),
                    retry_after: None,
                },
            }),
        },
        Message {
            header: forward_header(
                "m-heartbeat",
                "acme.p1",
                CLASS_INFRASTRUCTURE,
                SUB_HEARTBEAT,
            ),
            content: data(
                "text/xml",
                TransferEncoding::Binary,
                encode_status(&status_tree()),
            ),
        },
        Message {
            header: forward_header("m-binary", "acme.p1.s1", "inventory", "packages"),
            content: data(
                "application/octet-stream",
                TransferEncoding::Binary,
                (0u8..=255).collect::<Vec<u8>>(),
            ),
        },
        Message {
            header: forward_header("m-base64", "acme.p1.s1", "inventory", "firmware"),
            content: data(
                "application/octet-stream",
                TransferEncoding::Base64,
                b"\x00\x01\xfe\xff firmware blob".to_vec(),
            ),
        },
    ];
    for (i, action) in control_actions().into_iter().enumerate() {
        v.push(control_message(
            &format!("b-control-{i}"),
            &["acme.p1"],
            &action,
        ));
    }
    v
}

/// A back-channel message carrying a control action.
pub fn control_message(msg: &str, to: &[&str], action: &ControlAction) -> Message {
    Message {
        header: back_header(msg, to, CLASS_CONTROL, action.name()),
        content: data("text/xml", TransferEncoding::Binary, encode_control(action)),
    }
}

/// One of every control action, in the order of [`ActionKind::ALL`].
pub fn control_actions() -> Vec<ControlAction> {
    ActionKind::ALL.iter().map(|k| control_action(*k)).collect()
}

/// A sample of the action `kind`.
pub fn control_action(kind: ActionKind) -> ControlAction {
    match kind {
        ActionKind::GetStatus => ControlAction::GetStatus,
        ActionKind::Ping => ControlAction::Ping,
        ActionKind::Shutdown => ControlAction::Shutdown,
        ActionKind::SoftwareUpdate => ControlAction::SoftwareUpdate {
            package: "rs-proxy".into(),
            version: "0.2.0".into(),
            url: Some("https://rs.example.net/rs/v1/bulk/9Qd3kLx0bV7nE2".into()),
        },
        ActionKind::ConfigChange => ControlAction::ConfigChange {
            config: "[upstream]\nurls = [\"https://mlm1.acme.example:8443\"]\n".into(),
        },
        ActionKind::GetConfig => ControlAction::GetConfig,
        ActionKind::EnableInstance => ControlAction::EnableInstance(rs("acme.p1.s1")),
        ActionKind::DisableInstance => ControlAction::DisableInstance(rs("acme.p1.s1")),
        ActionKind::EnableForwarding => ControlAction::EnableForwarding,
        ActionKind::DisableForwarding => ControlAction::DisableForwarding,
        ActionKind::DeregisterIntegrator => ControlAction::DeregisterIntegrator(rs("acme.p1.i1")),
        ActionKind::ReplayDeadLetters => ControlAction::ReplayDeadLetters(None),
        ActionKind::DiscardDeadLetters => {
            ControlAction::DiscardDeadLetters(Some(id("a-disk-full")))
        }
    }
}

/// An envelope header for a POST from `sender`.
pub fn request_meta(sender: &str) -> EnvelopeMeta {
    EnvelopeMeta {
        poll: Some(Duration::from_secs(25)),
        acks: vec![id("b-getstatus"), id("b-config")],
        ..EnvelopeMeta::new(rs(sender), t0())
    }
}

/// An envelope header for the reply to a POST.
pub fn reply_meta(sender: &str, answered: &[Message]) -> EnvelopeMeta {
    let mut outcomes: Vec<(MessageId, Outcome)> = answered
        .iter()
        .map(|m| (m.header.id.clone(), Outcome::Accepted))
        .collect();
    if let Some(first) = outcomes.first_mut() {
        first.1 = Outcome::retry(Duration::from_millis(2500), "throttled", "site rate 1 MB/s");
    }
    if let Some(last) = outcomes.last_mut() {
        last.1 = Outcome::rejected("unknown-source", "acme.p9 is not registered behind acme.m1");
    }
    EnvelopeMeta {
        outcomes,
        advice: Some(Advice {
            heartbeat: Some(Duration::from_secs(60)),
            poll_hold: Some(Duration::from_secs(25)),
            max_messages: Some(500),
            max_bytes: Some(1 << 20),
            resume_after: None,
        }),
        ..EnvelopeMeta::new(rs(sender), at(20))
    }
}

/// A forward alarm of about `size` bytes on the wire (header and content),
/// as an integrator at a busy site would send; `n` varies the IDs.
pub fn alarm_of_size(n: usize, size: usize) -> Message {
    let mut header = forward_header("x", "acme.p1", "monitoring", "disk");
    header.id = MessageId::generate();
    header.created = at(n as i64);
    let base = 900; // header part, content markup and part headers
    let text_len = size.saturating_sub(base).max(16);
    let mut text = String::with_capacity(text_len);
    let words = [
        "filesystem ",
        "/var/log ",
        "usage ",
        "exceeded ",
        "threshold ",
        "on ",
        "db01 ",
        "inode ",
        "pressure ",
        "rising; ",
    ];
    let mut i = n;
    while text.len() < text_len {
        text.push_str(words[i % words.len()]);
        i += 7;
    }
    text.truncate(text_len);
    Message {
        header,
        content: Content::Alarm(Alarm {
            severity: Severity::Major,
            state: AlarmState::Raised,
            instance: Some(rs("acme.p1.s1")),
            key: Some(format!("disk:/var/{}", n % 17)),
            text,
            details: vec![
                Detail::new("mount", "/var"),
                Detail::new("used.pct", "91"),
                Detail::new("threshold.pct", "90"),
            ],
        }),
    }
}

/// The codec benchmark's input: an envelope of 100 alarms of about 2 KB.
pub fn bench_envelope() -> Envelope {
    Envelope {
        meta: request_meta("acme.p1"),
        messages: (0..100).map(|i| alarm_of_size(i, 2048)).collect(),
    }
}
