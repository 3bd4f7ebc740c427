//! The envelope header document (`dtd/envelope.dtd`), the root part.

use std::time::Duration;

use super::xml::{Tag, XmlIn, XmlOut, parse_u64};
use super::{Limits, XmlError};
use crate::ids::{MessageId, RsId};
use crate::model::{Advice, EnvelopeMeta};
use crate::outcome::{Code, Outcome, Reason};

/// The protocol version this codec writes and reads.
pub(crate) const VERSION: &str = "1";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn encode(m: &EnvelopeMeta, buf: &mut Vec<u8>) {
    let mut x = XmlOut::document(buf);
    x.open("envelope")
        .attr("version", VERSION)
        .attr("sender", m.sender.as_str())
        .attr_ts("created", m.created)
        .gt()
        .newline();
    if let Some(hold) = m.poll {
        x.open("poll")
            .attr_num("hold-ms", ms(hold))
            .empty()
            .newline();
    }
    for a in &m.acks {
        x.open("ack").attr("ref", a.as_str()).empty().newline();
    }
    for (id, to) in &m.delivered {
        x.open("delivered")
            .attr("ref", id.as_str())
            .attr("to", to.as_str())
            .empty()
            .newline();
    }
    for (id, o) in &m.outcomes {
        x.open("outcome")
            .attr("ref", id.as_str())
            .attr("status", o.status());
        let reason = match o {
            Outcome::Retry { after, reason } => {
                x.attr("code", reason.code.as_str())
                    .attr_num("retry-after-ms", ms(*after));
                Some(reason)
            }
            Outcome::Rejected(reason) => {
                x.attr("code", reason.code.as_str());
                Some(reason)
            }
            Outcome::Accepted | Outcome::Expired => None,
        };
        match reason {
            Some(r) if !r.text.is_empty() => {
                x.gt().text(&r.text).close("outcome");
            }
            _ => {
                x.empty();
            }
        }
        x.newline();
    }
    if let Some(a) = &m.advice {
        x.open("advice")
            .attr_num_opt("heartbeat-ms", a.heartbeat.map(ms))
            .attr_num_opt("poll-hold-ms", a.poll_hold.map(ms))
            .attr_num_opt("max-messages", a.max_messages.map(u64::from))
            .attr_num_opt("max-bytes", a.max_bytes)
            .attr_num_opt("resume-after-ms", a.resume_after.map(ms))
            .empty()
            .newline();
    }
    x.close("envelope").newline();
}

fn opt_ms(tag: &Tag<'_>, attr: &'static str) -> Result<Option<Duration>, XmlError> {
    Ok(tag.opt_u64(attr)?.map(Duration::from_millis))
}

pub(crate) fn decode(bytes: &[u8], limits: &Limits) -> Result<EnvelopeMeta, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("envelope")?;
    let version = root.req("version")?;
    if version != VERSION {
        return Err(root.bad(
            "version",
            format!("protocol version {version:?} is not supported (this end speaks {VERSION})"),
        ));
    }
    let mut meta = EnvelopeMeta::new(
        root.req_with("sender", |s| RsId::new(s))?,
        root.req_ts("created")?,
    );
    // Elements must come in DTD order: poll?, ack*, delivered*, outcome*, advice?.
    let mut stage = 0;
    while let Some(tag) = x.child(&root)? {
        let (this_stage, repeatable) = match tag.name {
            "poll" => (1, false),
            "ack" => (2, true),
            "delivered" => (3, true),
            "outcome" => (4, true),
            "advice" => (5, false),
            _ => return Err(root.unexpected_child(&tag)),
        };
        if this_stage < stage || (this_stage == stage && !repeatable) {
            return Err(XmlError::Invalid(format!(
                "<{}> out of order or repeated in <envelope> (order: poll?, ack*, delivered*, outcome*, advice?)",
                tag.name
            )));
        }
        stage = this_stage;
        match this_stage {
            1 => {
                meta.poll = Some(Duration::from_millis(tag.req_with("hold-ms", parse_u64)?));
                x.end(&tag)?;
            }
            2 => {
                meta.acks.push(tag.req_with("ref", |s| MessageId::new(s))?);
                x.end(&tag)?;
            }
            3 => {
                meta.delivered.push((
                    tag.req_with("ref", |s| MessageId::new(s))?,
                    tag.req_with("to", |s| RsId::new(s))?,
                ));
                x.end(&tag)?;
            }
            4 => {
                let id = tag.req_with("ref", |s| MessageId::new(s))?;
                let outcome = outcome(&mut x, &tag)?;
                meta.outcomes.push((id, outcome));
            }
            _ => {
                meta.advice = Some(Advice {
                    heartbeat: opt_ms(&tag, "heartbeat-ms")?,
                    poll_hold: opt_ms(&tag, "poll-hold-ms")?,
                    max_messages: tag.opt_with("max-messages", |s| {
                        parse_u64(s).and_then(|n| u32::try_from(n).map_err(|_| "too large"))
                    })?,
                    max_bytes: tag.opt_u64("max-bytes")?,
                    resume_after: opt_ms(&tag, "resume-after-ms")?,
                });
                x.end(&tag)?;
            }
        }
    }
    x.finish()?;
    Ok(meta)
}

fn outcome(x: &mut XmlIn<'_>, tag: &Tag<'_>) -> Result<Outcome, XmlError> {
    let code = || {
        tag.req_with("code", |s| {
            Code::new(s).ok_or("not a code of 1-32 characters [a-z0-9-]")
        })
    };
    let o = match tag.req("status")? {
        "accepted" => Outcome::Accepted,
        "expired" => Outcome::Expired,
        "retry" => Outcome::Retry {
            after: Duration::from_millis(tag.req_with("retry-after-ms", parse_u64)?),
            reason: Reason {
                code: code()?,
                text: String::new(),
            },
        },
        "rejected" => Outcome::Rejected(Reason {
            code: code()?,
            text: String::new(),
        }),
        other => return Err(tag.bad("status", format!("unknown status {other:?}"))),
    };
    let text = x.text(tag)?;
    Ok(match o {
        Outcome::Retry { after, reason } => Outcome::Retry {
            after,
            reason: Reason { text, ..reason },
        },
        Outcome::Rejected(reason) => Outcome::Rejected(Reason { text, ..reason }),
        other => other,
    })
}
