//! proptest strategies for arbitrary, valid protocol values.

use std::time::Duration;

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use rs_protocol::control::{ActionKind, ControlAction};
use rs_protocol::*;

/// Characters XML 1.0 can carry, weighted towards the ones that need
/// escaping.
fn xml_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::char::range(' ', '~'),
        2 => prop::sample::select(vec!['<', '>', '&', '"', '\'', '\t', '\n', '\r', ']']),
        1 => prop::char::range('\u{a0}', '\u{d7ff}'),
        1 => prop::char::range('\u{e000}', '\u{fffd}'),
        1 => prop::char::range('\u{10000}', '\u{10ffff}'),
    ]
}

pub fn xml_text(max: usize) -> impl Strategy<Value = String> {
    vec(xml_char(), 0..max).prop_map(|v| v.into_iter().collect())
}

pub fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,24}"
}

pub fn rs_id() -> impl Strategy<Value = RsId> {
    (
        "[a-z][a-z0-9-]{0,10}",
        vec(
            (
                prop::sample::select(vec!['a', 'm', 'p', 'i', 's']),
                0u32..100_000,
            ),
            0..3,
        ),
    )
        .prop_map(|(c, segs)| {
            let mut s = c;
            for (k, n) in segs {
                s.push('.');
                s.push(k);
                s.push_str(&n.to_string());
            }
            RsId::new(s).expect("generated IDs are valid")
        })
}

pub fn message_id() -> impl Strategy<Value = MessageId> {
    "[A-Za-z0-9._-]{1,40}".prop_map(|s| MessageId::new(s).expect("valid"))
}

pub fn timestamp() -> impl Strategy<Value = Timestamp> {
    (-62_167_219_200_000i64..=253_402_300_799_999)
        .prop_map(|ms| Timestamp::from_millis(ms).expect("in range"))
}

fn code() -> impl Strategy<Value = Code> {
    "[a-z0-9-]{1,32}".prop_map(|s| Code::new(s).expect("valid"))
}

fn reason() -> impl Strategy<Value = Reason> {
    (code(), xml_text(40)).prop_map(|(code, text)| Reason { code, text })
}

pub fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Accepted),
        Just(Outcome::Expired),
        (0u64..10_000_000, reason()).prop_map(|(ms, reason)| Outcome::Retry {
            after: Duration::from_millis(ms),
            reason
        }),
        reason().prop_map(Outcome::Rejected),
    ]
}

fn details() -> impl Strategy<Value = Vec<Detail>> {
    vec(
        (token(), xml_text(30)).prop_map(|(name, value)| Detail { name, value }),
        0..4,
    )
}

fn severity() -> impl Strategy<Value = Severity> {
    prop::sample::select(Severity::ALL.to_vec())
}

fn url() -> impl Strategy<Value = String> {
    "https://[a-z]{1,10}\\.example/[A-Za-z0-9/_.-]{0,30}"
}

fn mime() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "text/xml".to_owned(),
        "application/octet-stream".to_owned(),
        "text/plain; charset=utf-8".to_owned(),
        "application/json".to_owned(),
    ])
}

fn classification() -> impl Strategy<Value = Classification> {
    (token(), token()).prop_map(|(class, subclass)| Classification::new(class, subclass))
}

/// Any control action: a kind drawn from every kind, then its payload (the
/// match has no catch-all, so a new action must be given one here).
fn control_action() -> impl Strategy<Value = ControlAction> {
    prop::sample::select(ActionKind::ALL.to_vec()).prop_flat_map(|kind| match kind {
        ActionKind::GetStatus => Just(ControlAction::GetStatus).boxed(),
        ActionKind::Ping => Just(ControlAction::Ping).boxed(),
        ActionKind::Shutdown => Just(ControlAction::Shutdown).boxed(),
        ActionKind::GetConfig => Just(ControlAction::GetConfig).boxed(),
        ActionKind::EnableForwarding => Just(ControlAction::EnableForwarding).boxed(),
        ActionKind::DisableForwarding => Just(ControlAction::DisableForwarding).boxed(),
        ActionKind::EnableInstance => rs_id().prop_map(ControlAction::EnableInstance).boxed(),
        ActionKind::DisableInstance => rs_id().prop_map(ControlAction::DisableInstance).boxed(),
        ActionKind::DeregisterIntegrator => rs_id()
            .prop_map(ControlAction::DeregisterIntegrator)
            .boxed(),
        ActionKind::ReplayDeadLetters => option::of(message_id())
            .prop_map(ControlAction::ReplayDeadLetters)
            .boxed(),
        ActionKind::DiscardDeadLetters => option::of(message_id())
            .prop_map(ControlAction::DiscardDeadLetters)
            .boxed(),
        ActionKind::SoftwareUpdate => (token(), token(), option::of(url()))
            .prop_map(|(package, version, url)| ControlAction::SoftwareUpdate {
                package,
                version,
                url,
            })
            .boxed(),
        ActionKind::ConfigChange => xml_text(200)
            .prop_map(|config| ControlAction::ConfigChange { config })
            .boxed(),
    })
}

pub fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        (
            severity(),
            prop::sample::select(AlarmState::ALL.to_vec()),
            option::of(rs_id()),
            option::of(xml_text(20)),
            xml_text(200),
            details()
        )
            .prop_map(|(severity, state, instance, key, text, details)| {
                Content::Alarm(Alarm {
                    severity,
                    state,
                    instance,
                    key,
                    text,
                    details,
                })
            }),
        (
            severity(),
            option::of(rs_id()),
            option::of(token()),
            xml_text(200),
            details()
        )
            .prop_map(|(severity, instance, kind, text, details)| {
                Content::Event(Event {
                    severity,
                    instance,
                    kind,
                    text,
                    details,
                })
            }),
        (
            message_id(),
            outcome(),
            details(),
            option::of((mime(), xml_text(100)))
        )
            .prop_map(|(reference, outcome, details, result)| {
                Content::Response(Response {
                    reference,
                    outcome,
                    details,
                    result: result.map(|(mime, text)| ResultPayload { mime, text }),
                })
            }),
        (
            prop::bool::ANY,
            "f[A-Za-z0-9._ -]{0,40}",
            any::<u64>(),
            any::<[u8; 32]>(),
            classification(),
            option::of(url()),
            option::of(timestamp())
        )
            .prop_map(|(up, name, size, sha256, class, url, expires)| {
                Content::BulkRequest(BulkRequest {
                    direction: if up {
                        Direction::Upload
                    } else {
                        Direction::Download
                    },
                    name,
                    size,
                    sha256,
                    class,
                    url,
                    expires,
                })
            }),
        (
            message_id(),
            prop_oneof![
                (url(), timestamp()).prop_map(|(url, expires)| Grant::Granted { url, expires }),
                (reason(), option::of(0u64..1_000_000)).prop_map(|(reason, ms)| {
                    Grant::Refused {
                        reason,
                        retry_after: ms.map(Duration::from_millis),
                    }
                }),
            ]
        )
            .prop_map(|(request, grant)| Content::BulkResponse(BulkResponse { request, grant })),
        (mime(), prop::bool::ANY, vec(any::<u8>(), 0..300)).prop_map(|(mime, b64, bytes)| {
            Content::Data(Data {
                mime,
                encoding: if b64 {
                    TransferEncoding::Base64
                } else {
                    TransferEncoding::Binary
                },
                bytes: bytes.into(),
            })
        }),
        control_action().prop_map(|a| Content::Data(Data {
            mime: "text/xml".into(),
            encoding: TransferEncoding::Binary,
            bytes: rs_protocol::codec::encode_control(&a).into(),
        })),
    ]
}

fn hop() -> impl Strategy<Value = Hop> {
    (rs_id(), timestamp(), option::of(timestamp())).prop_map(|(component, received, sent)| Hop {
        component,
        received,
        sent,
    })
}

fn route() -> impl Strategy<Value = Route> {
    prop_oneof![
        (
            rs_id(),
            "[A-Za-z0-9._+-]{1,20}",
            option::of(timestamp()),
            0u8..=9,
            prop::bool::ANY
        )
            .prop_map(|(component, version, expiry, precedence, persistent)| {
                Route::Source(Source {
                    component,
                    version: version.into(),
                    qos: Qos {
                        expiry,
                        precedence,
                        persistent,
                    },
                })
            }),
        (vec(rs_id(), 1..5), proptest::option::of(timestamp()))
            .prop_map(|(to, expiry)| Route::Destination(Destination::new(to, expiry))),
    ]
}

pub fn message() -> impl Strategy<Value = Message> {
    (
        message_id(),
        timestamp(),
        classification(),
        route(),
        vec(hop(), 0..4),
        content(),
    )
        .prop_map(|(id, created, class, route, routing, content)| Message {
            header: Header {
                id,
                created,
                class,
                route,
                routing: routing.into(),
            },
            content,
        })
}

pub fn meta() -> impl Strategy<Value = EnvelopeMeta> {
    (
        rs_id(),
        timestamp(),
        option::of(0u64..120_000),
        vec(message_id(), 0..5),
        vec((message_id(), rs_id()), 0..3),
        vec((message_id(), outcome()), 0..5),
        option::of((
            option::of(0u64..1_000_000),
            option::of(0u64..1_000_000),
            option::of(any::<u32>()),
            option::of(any::<u64>()),
            option::of(0u64..1_000_000),
        )),
    )
        .prop_map(
            |(sender, created, poll, acks, delivered, outcomes, advice)| EnvelopeMeta {
                sender,
                created,
                poll: poll.map(Duration::from_millis),
                acks,
                delivered,
                outcomes,
                advice: advice.map(|(h, p, mm, mb, r)| Advice {
                    heartbeat: h.map(Duration::from_millis),
                    poll_hold: p.map(Duration::from_millis),
                    max_messages: mm,
                    max_bytes: mb,
                    resume_after: r.map(Duration::from_millis),
                }),
            },
        )
}

/// An envelope of up to `max` messages with distinct IDs.
pub fn envelope(max: usize) -> impl Strategy<Value = Envelope> {
    (meta(), vec(message(), 0..=max)).prop_map(|(meta, mut messages)| {
        for (i, m) in messages.iter_mut().enumerate() {
            let id = format!("{}.{i}", m.header.id);
            m.header.id = MessageId::new(id).expect("valid");
        }
        Envelope { meta, messages }
    })
}
