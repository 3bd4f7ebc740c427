//! Content documents (`dtd/alarm.dtd`, `event.dtd`, `response.dtd`,
//! `bulk-request.dtd`, `bulk-response.dtd`) and raw data contents.

use std::borrow::Cow;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;

use super::header::{mime_type, token};
use super::xml::{Tag, XmlIn, XmlOut, parse_u64};
use super::{DataInfo, DecodeError, Limits, PartRef, RawMessage, XmlError};
use crate::ids::{MessageId, RsId};
use crate::model::{
    Alarm, AlarmState, BulkRequest, BulkResponse, Classification, Content, ContentKind, Data,
    Detail, Direction, Event, Grant, Message, Response, ResultPayload, Severity, TransferEncoding,
};
use crate::outcome::{Code, Outcome, Reason};

/// `Content-Type` of every XML part.
pub(crate) const XML_PART_TYPE: &str = "text/xml; charset=utf-8";

pub(crate) fn encode_raw(m: &Message) -> RawMessage {
    let (data, content_type, content) = match &m.content {
        Content::Data(d) => {
            let content = match d.encoding {
                TransferEncoding::Binary => d.bytes.clone(),
                TransferEncoding::Base64 => {
                    Bytes::from(base64::engine::general_purpose::STANDARD.encode(&d.bytes))
                }
            };
            let info = DataInfo {
                mime: d.mime.clone(),
                size: d.bytes.len() as u64,
                encoding: d.encoding,
            };
            (Some(info), Cow::Owned(d.mime.clone()), content)
        }
        other => {
            let mut v = Vec::with_capacity(256);
            encode_xml(other, &mut v);
            (None, Cow::Borrowed(XML_PART_TYPE), Bytes::from(v))
        }
    };
    RawMessage {
        header: m.header.clone(),
        kind: m.content.kind(),
        data,
        content_type,
        content,
    }
}

fn details(x: &mut XmlOut<'_>, ds: &[Detail]) {
    for d in ds {
        x.open("detail").attr("name", &d.name);
        if d.value.is_empty() {
            x.empty();
        } else {
            x.gt().text(&d.value).close("detail");
        }
        x.newline();
    }
}

fn reason_attrs(x: &mut XmlOut<'_>, reason: &Reason, retry: Option<Duration>) {
    x.attr("code", reason.code.as_str());
    x.attr_num_opt(
        "retry-after-ms",
        retry.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    );
}

fn encode_xml(c: &Content, buf: &mut Vec<u8>) {
    let mut x = XmlOut::document(buf);
    match c {
        Content::Alarm(a) => {
            x.open("alarm")
                .attr("severity", a.severity.as_str())
                .attr("state", a.state.as_str())
                .attr_opt("instance", a.instance.as_ref().map(RsId::as_str))
                .attr_opt("key", a.key.as_deref())
                .gt()
                .newline();
            x.text_element("text", &a.text).newline();
            details(&mut x, &a.details);
            x.close("alarm");
        }
        Content::Event(e) => {
            x.open("event")
                .attr("severity", e.severity.as_str())
                .attr_opt("kind", e.kind.as_deref())
                .attr_opt("instance", e.instance.as_ref().map(RsId::as_str))
                .gt()
                .newline();
            x.text_element("text", &e.text).newline();
            details(&mut x, &e.details);
            x.close("event");
        }
        Content::Response(r) => {
            x.open("response")
                .attr("ref", r.reference.as_str())
                .attr("status", r.outcome.status());
            let text = match &r.outcome {
                Outcome::Retry { after, reason } => {
                    reason_attrs(&mut x, reason, Some(*after));
                    reason.text.as_str()
                }
                Outcome::Rejected(reason) => {
                    reason_attrs(&mut x, reason, None);
                    reason.text.as_str()
                }
                Outcome::Accepted | Outcome::Expired => "",
            };
            x.gt().newline();
            if !text.is_empty() {
                x.text_element("text", text).newline();
            }
            details(&mut x, &r.details);
            if let Some(res) = &r.result {
                x.open("result").attr("mime", &res.mime);
                if res.text.is_empty() {
                    x.empty();
                } else {
                    x.gt().text(&res.text).close("result");
                }
                x.newline();
            }
            x.close("response");
        }
        Content::BulkRequest(b) => {
            x.open("bulk-request")
                .attr("direction", b.direction.as_str())
                .attr("name", &b.name)
                .attr_num("size", b.size)
                .attr("sha256", &sha256_hex(&b.sha256))
                .attr("class", &b.class.class)
                .attr("sub", &b.class.subclass)
                .attr_opt("url", b.url.as_deref())
                .attr_ts_opt("expires", b.expires)
                .empty();
        }
        Content::BulkResponse(b) => {
            x.open("bulk-response").attr("request", b.request.as_str());
            match &b.grant {
                Grant::Granted { url, expires } => {
                    x.attr("status", "granted")
                        .attr("url", url)
                        .attr_ts("expires", *expires)
                        .empty();
                }
                Grant::Refused {
                    reason,
                    retry_after,
                } => {
                    x.attr("status", "refused");
                    reason_attrs(&mut x, reason, *retry_after);
                    if reason.text.is_empty() {
                        x.empty();
                    } else {
                        x.gt().newline();
                        x.text_element("text", &reason.text).newline();
                        x.close("bulk-response");
                    }
                }
            }
        }
        // Data contents are not XML; encode_raw never calls this for them.
        Content::Data(_) => {}
    }
    x.newline();
}

/// Lower-case hex of a SHA-256 digest.
pub fn sha256_hex(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Parses 64 lower-case hex digits.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], &'static str> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return Err("must be 64 lower-case hex digits");
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err("must be 64 lower-case hex digits"),
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(b[2 * i])? << 4 | nib(b[2 * i + 1])?;
    }
    Ok(out)
}

/// A file name: 1 to 255 bytes, no path separators or NUL, not `.` or `..`.
pub(crate) fn file_name(s: &str) -> Result<String, &'static str> {
    let ok =
        !s.is_empty() && s.len() <= 255 && s != "." && s != ".." && !s.contains(['/', '\\', '\0']);
    if ok {
        Ok(s.to_owned())
    } else {
        Err("not a plain file name")
    }
}

/// An absolute `http(s)` URL or an absolute path, printable ASCII, at most
/// 2048 bytes.
pub(crate) fn url(s: &str) -> Result<String, &'static str> {
    let ok = s.len() <= 2048
        && s.bytes().all(|c| (0x21..0x7f).contains(&c))
        && (s.starts_with("https://") || s.starts_with("http://") || s.starts_with('/'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("not an http(s) URL or absolute path")
    }
}

fn retry_ms(tag: &Tag<'_>) -> Result<Option<Duration>, XmlError> {
    Ok(tag.opt_u64("retry-after-ms")?.map(Duration::from_millis))
}

fn code(tag: &Tag<'_>) -> Result<Code, XmlError> {
    tag.req_with("code", |s| {
        Code::new(s).ok_or("not a code of 1-32 characters [a-z0-9-]")
    })
}

/// Reads the children `text?, detail*` (and, for responses, `result?`).
struct Body {
    text: Option<String>,
    details: Vec<Detail>,
    result: Option<ResultPayload>,
}

fn body(x: &mut XmlIn<'_>, root: &Tag<'_>, allow_result: bool) -> Result<Body, XmlError> {
    let mut b = Body {
        text: None,
        details: Vec::new(),
        result: None,
    };
    while let Some(tag) = x.child(root)? {
        match tag.name {
            "text" if b.text.is_none() && b.details.is_empty() && b.result.is_none() => {
                b.text = Some(x.text(&tag)?);
            }
            "detail" if b.result.is_none() => {
                let name = tag.req_with("name", token)?;
                let value = x.text(&tag)?;
                b.details.push(Detail { name, value });
            }
            "result" if allow_result && b.result.is_none() => {
                let mime = tag.req_with("mime", mime_type)?;
                let text = x.text(&tag)?;
                b.result = Some(ResultPayload { mime, text });
            }
            _ => return Err(root.unexpected_child(&tag)),
        }
    }
    Ok(b)
}

fn severity(tag: &Tag<'_>) -> Result<Severity, XmlError> {
    tag.req_with("severity", |s| Severity::parse(s).ok_or("unknown severity"))
}

pub(crate) fn parse_xml(
    kind: ContentKind,
    bytes: &[u8],
    limits: &Limits,
) -> Result<Content, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root(kind.as_str())?;
    let content = match kind {
        ContentKind::Alarm => {
            let severity = severity(&root)?;
            let state = root.req_with("state", |s| AlarmState::parse(s).ok_or("unknown state"))?;
            let instance = root.opt_with("instance", |s| RsId::new(s))?;
            let key = root.opt("key").map(str::to_owned);
            let b = body(&mut x, &root, false)?;
            Content::Alarm(Alarm {
                severity,
                state,
                instance,
                key,
                text: b.text.ok_or_else(|| missing("alarm", "text"))?,
                details: b.details,
            })
        }
        ContentKind::Event => {
            let severity = severity(&root)?;
            let kind = root.opt_with("kind", token)?;
            let instance = root.opt_with("instance", |s| RsId::new(s))?;
            let b = body(&mut x, &root, false)?;
            Content::Event(Event {
                severity,
                instance,
                kind,
                text: b.text.ok_or_else(|| missing("event", "text"))?,
                details: b.details,
            })
        }
        ContentKind::Response => {
            let reference = root.req_with("ref", |s| MessageId::new(s))?;
            let status = root.req("status")?.to_owned();
            let retry = retry_ms(&root)?;
            let b = body(&mut x, &root, true)?;
            let text = b.text.unwrap_or_default();
            let outcome = match status.as_str() {
                "accepted" => Outcome::Accepted,
                "expired" => Outcome::Expired,
                "retry" => Outcome::Retry {
                    after: retry.ok_or(XmlError::MissingAttr {
                        element: "response".into(),
                        attr: "retry-after-ms",
                    })?,
                    reason: Reason {
                        code: code(&root)?,
                        text,
                    },
                },
                "rejected" => Outcome::Rejected(Reason {
                    code: code(&root)?,
                    text,
                }),
                other => return Err(root.bad("status", format!("unknown status {other:?}"))),
            };
            Content::Response(Response {
                reference,
                outcome,
                details: b.details,
                result: b.result,
            })
        }
        ContentKind::BulkRequest => {
            let b = BulkRequest {
                direction: root.req_with("direction", |s| {
                    Direction::parse(s).ok_or("not upload or download")
                })?,
                name: root.req_with("name", file_name)?,
                size: root.req_with("size", parse_u64)?,
                sha256: root.req_with("sha256", parse_sha256)?,
                class: Classification {
                    class: root.req_with("class", token)?,
                    subclass: root.req_with("sub", token)?,
                },
                url: root.opt_with("url", url)?,
                expires: root.opt_ts("expires")?,
            };
            x.end(&root)?;
            Content::BulkRequest(b)
        }
        ContentKind::BulkResponse => {
            let request = root.req_with("request", |s| MessageId::new(s))?;
            let grant = match root.req("status")? {
                "granted" => {
                    let g = Grant::Granted {
                        url: root.req_with("url", url)?,
                        expires: root.req_ts("expires")?,
                    };
                    x.end(&root)?;
                    g
                }
                "refused" => {
                    let code = code(&root)?;
                    let retry_after = retry_ms(&root)?;
                    let b = body(&mut x, &root, false)?;
                    if !b.details.is_empty() {
                        return Err(XmlError::UnexpectedElement {
                            element: "detail".into(),
                            parent: "bulk-response".into(),
                        });
                    }
                    Grant::Refused {
                        reason: Reason {
                            code,
                            text: b.text.unwrap_or_default(),
                        },
                        retry_after,
                    }
                }
                other => {
                    return Err(root.bad("status", format!("{other:?} is not granted or refused")));
                }
            };
            Content::BulkResponse(BulkResponse { request, grant })
        }
        ContentKind::Data => {
            return Err(XmlError::Invalid(
                "data contents are not XML documents".into(),
            ));
        }
    };
    x.finish()?;
    Ok(content)
}

fn missing(element: &str, child: &'static str) -> XmlError {
    XmlError::MissingElement {
        element: element.into(),
        child,
    }
}

/// Decodes base64 that may be wrapped in lines (RFC 2045) or not.
pub(crate) fn decode_base64(wire: &[u8]) -> Result<Vec<u8>, String> {
    let engine = &base64::engine::general_purpose::STANDARD;
    if wire.iter().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = wire
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        engine.decode(compact).map_err(|e| e.to_string())
    } else {
        engine.decode(wire).map_err(|e| e.to_string())
    }
}

pub(crate) fn decode(raw: RawMessage, limits: &Limits) -> Result<Message, DecodeError> {
    let id = raw.header.id.clone();
    let content = match (&raw.kind, raw.data) {
        (ContentKind::Data, Some(info)) => {
            let bytes = match info.encoding {
                TransferEncoding::Binary => raw.content,
                TransferEncoding::Base64 => {
                    Bytes::from(decode_base64(&raw.content).map_err(|reason| {
                        DecodeError::Base64 {
                            part: PartRef::Content(id.clone()),
                            reason,
                        }
                    })?)
                }
            };
            if bytes.len() as u64 != info.size {
                return Err(DecodeError::ContentMismatch {
                    id,
                    reason: format!(
                        "header declares {} bytes of data, content part holds {}",
                        info.size,
                        bytes.len()
                    ),
                });
            }
            Content::Data(Data {
                mime: info.mime,
                encoding: info.encoding,
                bytes,
            })
        }
        (kind, _) => parse_xml(*kind, &raw.content, limits).map_err(|error| DecodeError::Xml {
            part: PartRef::Content(id),
            error,
        })?,
    };
    Ok(Message {
        header: raw.header,
        content,
    })
}
