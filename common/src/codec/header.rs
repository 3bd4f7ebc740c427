//! The message header document (`dtd/header.dtd`).

use super::xml::{Tag, XmlIn, XmlOut, parse_u64};
use super::{DataInfo, Limits, XmlError};
use crate::ids::{MessageId, RsId};
use crate::model::{
    Classification, ContentKind, Destination, Header, Hop, MAX_PRECEDENCE, Qos, Route, Source,
    TransferEncoding,
};

/// A token: 1 to 64 bytes of `[A-Za-z0-9._-]` (class, subclass, names).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

pub(crate) fn token(s: &str) -> Result<String, &'static str> {
    if is_token(s) {
        Ok(s.to_owned())
    } else {
        Err("not a token of 1-64 characters [A-Za-z0-9._-]")
    }
}

/// A MIME type as carried in attributes: printable ASCII, `type/subtype`
/// with optional parameters, at most 255 bytes.
pub fn is_mime_type(s: &str) -> bool {
    s.len() <= 255
        && s.bytes().all(|c| (0x20..0x7f).contains(&c))
        && s.split(';')
            .next()
            .and_then(|t| t.trim().split_once('/'))
            .is_some_and(|(a, b)| is_token(a) && is_token(b.trim()))
}

pub(crate) fn mime_type(s: &str) -> Result<String, &'static str> {
    if is_mime_type(s) {
        Ok(s.to_owned())
    } else {
        Err("not a MIME type (type/subtype[; params], printable ASCII, at most 255 bytes)")
    }
}

pub(crate) fn encode(h: &Header, kind: ContentKind, data: Option<&DataInfo>, buf: &mut Vec<u8>) {
    let mut x = XmlOut::document(buf);
    let locator = match h.route {
        Route::Source(_) => "source",
        Route::Destination(_) => "destination",
    };
    x.open("header")
        .attr("id", h.id.as_str())
        .attr("type", kind.as_str())
        .attr_ts("created", h.created)
        .attr("locator", locator)
        .gt()
        .newline();
    x.open("class")
        .attr("name", &h.class.class)
        .attr("sub", &h.class.subclass)
        .empty()
        .newline();
    match &h.route {
        Route::Source(s) => {
            x.open("source")
                .attr("component", s.component.as_str())
                .attr("version", &s.version)
                .gt();
            x.open("qos")
                .attr_ts_opt("expiry", s.qos.expiry)
                .attr_num("precedence", u64::from(s.qos.precedence))
                .attr("persistent", if s.qos.persistent { "yes" } else { "no" })
                .empty();
            x.close("source").newline();
        }
        Route::Destination(ds) => {
            x.open("destination").attr_ts_opt("expiry", ds.expiry).gt();
            for d in &ds.to {
                x.open("to").attr("id", d.as_str()).empty();
            }
            x.close("destination").newline();
        }
    }
    if let Some(d) = data {
        x.open("data")
            .attr("mime", &d.mime)
            .attr_num("size", d.size)
            .attr("encoding", d.encoding.as_str())
            .empty()
            .newline();
    }
    for hop in &h.routing {
        x.open("routing")
            .attr("component", hop.component.as_str())
            .attr_ts("received", hop.received)
            .attr_ts_opt("sent", hop.sent)
            .empty()
            .newline();
    }
    x.close("header").newline();
}

pub(crate) fn decode(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(Header, ContentKind, Option<DataInfo>), XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("header")?;
    let id = root.req_with("id", |s| MessageId::new(s))?;
    let kind_s = root.req("type")?;
    let kind = ContentKind::parse(kind_s)
        .ok_or_else(|| XmlError::UnknownContentType(kind_s.to_owned()))?;
    let created = root.req_ts("created")?;
    let locator = root.req("locator")?;
    let want_source = match locator {
        "source" => true,
        "destination" => false,
        other => return Err(root.bad("locator", format!("{other:?} is not source or destination"))),
    };

    let mut class = None;
    let mut route = None;
    let mut data = None;
    let mut routing = Vec::new();
    while let Some(tag) = x.child(&root)? {
        match tag.name {
            "class" if class.is_none() && route.is_none() => {
                class = Some(Classification {
                    class: tag.req_with("name", token)?,
                    subclass: tag.req_with("sub", token)?,
                });
                x.end(&tag)?;
            }
            "source" if want_source && route.is_none() && class.is_some() => {
                route = Some(Route::Source(source(&mut x, &tag)?));
            }
            "destination" if !want_source && route.is_none() && class.is_some() => {
                let expiry = tag.opt_ts("expiry")?;
                let mut ds = Vec::new();
                while let Some(to) = x.child(&tag)? {
                    if to.name != "to" {
                        return Err(tag.unexpected_child(&to));
                    }
                    ds.push(to.req_with("id", |s| RsId::new(s))?);
                    x.end(&to)?;
                }
                if ds.is_empty() {
                    return Err(XmlError::MissingElement {
                        element: "destination".into(),
                        child: "to",
                    });
                }
                route = Some(Route::Destination(Destination::new(ds, expiry)));
            }
            "data" if data.is_none() && route.is_some() && routing.is_empty() => {
                data = Some(DataInfo {
                    mime: tag.req_with("mime", mime_type)?,
                    size: tag.req_with("size", parse_u64)?,
                    encoding: tag.req_with("encoding", |s| {
                        TransferEncoding::parse(s)
                            .filter(|e| e.as_str() == s)
                            .ok_or("not binary or base64")
                    })?,
                });
                x.end(&tag)?;
            }
            "routing" if route.is_some() => {
                routing.push(Hop {
                    component: tag.req_with("component", |s| RsId::new(s))?,
                    received: tag.req_ts("received")?,
                    sent: tag.opt_ts("sent")?,
                });
                x.end(&tag)?;
            }
            _ => return Err(root.unexpected_child(&tag)),
        }
    }
    x.finish()?;
    let class = class.ok_or_else(|| missing("class"))?;
    let route = route.ok_or_else(|| missing(if want_source { "source" } else { "destination" }))?;
    match (kind, &data) {
        (ContentKind::Data, None) => return Err(missing("data")),
        (k, Some(_)) if k != ContentKind::Data => {
            return Err(XmlError::Invalid(format!(
                "<data> is only allowed in headers of type data, not {}",
                k.as_str()
            )));
        }
        _ => {}
    }
    Ok((
        Header {
            id,
            created,
            class,
            route,
            routing,
        },
        kind,
        data,
    ))
}

fn missing(child: &'static str) -> XmlError {
    XmlError::MissingElement {
        element: "header".into(),
        child,
    }
}

fn source(x: &mut XmlIn<'_>, tag: &Tag<'_>) -> Result<Source, XmlError> {
    let component = tag.req_with("component", |s| RsId::new(s))?;
    let version = tag.req("version")?;
    if version.is_empty() || version.len() > 64 {
        return Err(tag.bad("version", "must be 1 to 64 bytes"));
    }
    let mut qos = None;
    while let Some(q) = x.child(tag)? {
        if q.name != "qos" || qos.is_some() {
            return Err(tag.unexpected_child(&q));
        }
        let precedence = q.req_with("precedence", |s| {
            parse_u64(s).and_then(|p| {
                u8::try_from(p)
                    .ok()
                    .filter(|&p| p <= MAX_PRECEDENCE)
                    .ok_or("precedence must be 0 to 9")
            })
        })?;
        let persistent = q.req_with("persistent", |s| match s {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => Err("must be yes or no"),
        })?;
        qos = Some(Qos {
            expiry: q.opt_ts("expiry")?,
            precedence,
            persistent,
        });
        x.end(&q)?;
    }
    Ok(Source {
        component,
        version: version.to_owned(),
        qos: qos.ok_or(XmlError::MissingElement {
            element: "source".into(),
            child: "qos",
        })?,
    })
}
