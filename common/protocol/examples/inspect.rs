//! Decodes an envelope file (`Content-Type: …` line, blank line, body, as
//! in `tests/fixtures/`) and prints what it carries: the envelope header,
//! then one line per message, with control actions and status trees
//! decoded too. Exits non-zero, naming the part and the reason, if the
//! envelope is malformed.
//!
//! `cargo run -p rs-common --example inspect -- tests/fixtures/every-kind.http`

#![allow(clippy::print_stdout)]

use bytes::Bytes;
use rs_protocol::codec::{Limits, decode_control, decode_status};
use rs_protocol::control::{CLASS_CONTROL, CLASS_INFRASTRUCTURE};
use rs_protocol::*;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: inspect FILE (a Content-Type line, a blank line, the envelope body)");
        std::process::exit(2);
    };
    let file = match std::fs::read(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(2);
        }
    };
    let (ct, body) = match file
        .strip_prefix(b"Content-Type: ".as_slice())
        .and_then(|rest| {
            let i = rest.windows(4).position(|w| w == b"\r\n\r\n")?;
            Some((
                String::from_utf8_lossy(&rest[..i]).into_owned(),
                &rest[i + 4..],
            ))
        }) {
        Some(x) => x,
        None => {
            eprintln!("{path}: expected a 'Content-Type: …' line, a blank line, then the body");
            std::process::exit(2);
        }
    };
    let limits = Limits::default();
    let env = match decode_envelope(&ct, Bytes::copy_from_slice(body), &limits) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{path}: refused: {e}");
            std::process::exit(1);
        }
    };
    let m = &env.meta;
    println!(
        "envelope from {} at {}: {} messages, {} acks, {} outcomes, poll {:?}",
        m.sender,
        m.created,
        env.messages.len(),
        m.acks.len(),
        m.outcomes.len(),
        m.poll
    );
    for (id, o) in &m.outcomes {
        println!("  outcome {id}: {o}");
    }
    for msg in &env.messages {
        let h = &msg.header;
        let route = match &h.route {
            Route::Source(s) => format!(
                "from {} (precedence {}, {})",
                s.component,
                s.qos.precedence,
                if s.qos.persistent {
                    "persistent"
                } else {
                    "volatile"
                }
            ),
            Route::Destination(d) => format!(
                "to {}",
                d.to.iter().map(RsId::as_str).collect::<Vec<_>>().join(", ")
            ),
        };
        let what = match &msg.content {
            Content::Alarm(a) => format!(
                "alarm {} {}: {}",
                a.severity.as_str(),
                a.state.as_str(),
                a.text
            ),
            Content::Event(e) => format!("event {}: {}", e.severity.as_str(), e.text),
            Content::Response(r) => format!("response to {}: {}", r.reference, r.outcome),
            Content::BulkRequest(b) => format!(
                "bulk {} of {} ({} bytes)",
                b.direction.as_str(),
                b.name,
                b.size
            ),
            Content::BulkResponse(b) => format!("bulk response to {}: {:?}", b.request, b.grant),
            Content::Data(d) if h.class.class == CLASS_CONTROL => {
                match decode_control(&d.bytes, &limits) {
                    Ok(a) => format!("control action {a:?}"),
                    Err(e) => format!("control action, malformed: {e}"),
                }
            }
            Content::Data(d) if h.class.class == CLASS_INFRASTRUCTURE => {
                match decode_status(&d.bytes, &limits) {
                    Ok(s) => {
                        let mut n = 0;
                        s.walk(&mut |_| n += 1);
                        format!(
                            "{} status tree: {} {} ({n} nodes)",
                            h.class.subclass,
                            s.kind,
                            s.state.as_str()
                        )
                    }
                    Err(e) => format!("status tree, malformed: {e}"),
                }
            }
            Content::Data(d) => format!(
                "data {} ({} bytes, {})",
                d.mime,
                d.bytes.len(),
                d.encoding.as_str()
            ),
        };
        println!(
            "  {} [{}/{}] {route}, {} hops: {what}",
            h.id,
            h.class.class,
            h.class.subclass,
            h.routing.len()
        );
    }
}
