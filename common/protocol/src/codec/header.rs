//! The message header document (`dtd/header.dtd`).

use compact_str::CompactString;

use super::xml::{Tag, XmlIn, XmlOut, parse_u64};
use super::{DataInfo, Limits, XmlError};
use crate::ids::{MessageId, RsId};
use crate::model::{
    Classification, ContentKind, Destination, Header, Hop, Hops, MAX_PRECEDENCE, Qos, Route,
    Source, TransferEncoding,
};
use crate::time::Timestamp;

/// A token: 1 to 64 bytes of `[A-Za-z0-9._-]` (class, subclass, names).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && crate::ids::all_token_bytes(s.as_bytes())
}

/// A token as whichever string type the model holds it in.
pub(crate) fn token<T: for<'a> From<&'a str>>(s: &str) -> Result<T, &'static str> {
    if is_token(s) {
        Ok(T::from(s))
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

/// A decoded header part: the header, the content type it names, and for
/// data messages the data description.
pub(crate) type Decoded = (Header, ContentKind, Option<DataInfo>);

/// Decodes a header part. Headers are decoded at every tier a message
/// passes, so a header exactly as [`encode`] writes it is read by
/// [`canonical`], a parser of that one layout; anything else (other
/// attribute order, quoting, spacing, comments, references, or any value
/// the fast path is unsure of) goes through [`general`], which also
/// produces every error.
pub(crate) fn decode(bytes: &[u8], limits: &Limits) -> Result<Decoded, XmlError> {
    match canonical(bytes, limits) {
        Some(d) => Ok(d),
        None => general(bytes, limits),
    }
}

/// The general parser: any well-formed header document the DTD allows.
pub(crate) fn general(bytes: &[u8], limits: &Limits) -> Result<Decoded, XmlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("header")?;
    let id = root.req_with("id", |s| MessageId::new(s))?;
    let kind_s = root.req("type")?;
    let kind = ContentKind::parse(kind_s)
        .ok_or_else(|| XmlError::UnknownContentType(kind_s.to_owned()))?;
    let created = root.req_ts("created")?;
    let locator = root.req("locator")?;
    let Some(want_source) = is_source_locator(locator) else {
        return Err(root.bad(
            "locator",
            format!("{locator:?} is not source or destination"),
        ));
    };

    let mut class = None;
    let mut route = None;
    let mut data = None;
    let mut routing = Hops::new();
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
                    encoding: tag.req_with("encoding", data_encoding)?,
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
    if !is_version(version) {
        return Err(tag.bad("version", "must be 1 to 64 bytes"));
    }
    let mut qos = None;
    while let Some(q) = x.child(tag)? {
        if q.name != "qos" || qos.is_some() {
            return Err(tag.unexpected_child(&q));
        }
        let precedence = q.req_with("precedence", precedence)?;
        let persistent = q.req_with("persistent", persistent)?;
        qos = Some(Qos {
            expiry: q.opt_ts("expiry")?,
            precedence,
            persistent,
        });
        x.end(&q)?;
    }
    Ok(Source {
        component,
        version: version.into(),
        qos: qos.ok_or(XmlError::MissingElement {
            element: "source".into(),
            child: "qos",
        })?,
    })
}

// The checks of single attribute values, shared by both readers so that
// they cannot drift apart.

/// `locator`: true for `source`, false for `destination`.
fn is_source_locator(s: &str) -> Option<bool> {
    match s {
        "source" => Some(true),
        "destination" => Some(false),
        _ => None,
    }
}

/// `source version`: 1 to 64 bytes.
fn is_version(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64
}

/// `qos precedence`: a decimal 0 to 9.
fn precedence(s: &str) -> Result<u8, &'static str> {
    parse_u64(s).and_then(|p| {
        u8::try_from(p)
            .ok()
            .filter(|&p| p <= MAX_PRECEDENCE)
            .ok_or("precedence must be 0 to 9")
    })
}

/// `qos persistent`: `yes` or `no`.
fn persistent(s: &str) -> Result<bool, &'static str> {
    match s {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err("must be yes or no"),
    }
}

/// `data encoding`: `binary` or `base64`, exactly.
fn data_encoding(s: &str) -> Result<TransferEncoding, &'static str> {
    TransferEncoding::parse(s)
        .filter(|e| e.as_str() == s)
        .ok_or("not binary or base64")
}

/// Reads a header in exactly the layout [`encode`] writes, or returns
/// `None` without judging the document. It accepts only documents
/// [`general`] decodes to the same value (the fuzz target `xml` and the
/// suite check this on every input they try): every byte is matched by a
/// literal or by an attribute value that is printable ASCII without `&`,
/// `<` or `"` (so no references, normalisation or character checks are
/// left to do), the same validators run on each value, and the limits are
/// honoured the same way.
///
/// Written by hand because a general XML parser spends most of its time on
/// what this layout never has (any attribute order, entity and character
/// references, whitespace normalisation, duplicate-attribute checks).
pub(crate) fn canonical(bytes: &[u8], limits: &Limits) -> Option<Decoded> {
    if limits.max_xml_depth < 3 {
        return None;
    }
    let mut c = Canon {
        // SIMD validation (the std check takes a byte per instruction or so,
        // on every header at every tier).
        s: simdutf8::basic::from_utf8(bytes).ok()?,
        at: 0,
        max_attr: limits.max_attr_bytes,
    };
    c.lit(super::xml::DECL)?;
    c.lit(b"<header id=\"")?;
    let id = MessageId::new(c.value()?).ok()?;
    c.lit(b" type=\"")?;
    let kind = ContentKind::parse(c.value()?)?;
    c.lit(b" created=\"")?;
    let created = c.ts()?;
    c.lit(b" locator=\"")?;
    let want_source = is_source_locator(c.value()?)?;
    c.lit(b">\n<class name=\"")?;
    let class = c.token()?;
    c.lit(b" sub=\"")?;
    let subclass = c.token()?;
    c.lit(b"/>\n")?;
    let mut elements = 1;
    let route = if want_source {
        c.lit(b"<source component=\"")?;
        let component = RsId::new(c.value()?).ok()?;
        c.lit(b" version=\"")?;
        let version = c.value()?;
        if !is_version(version) {
            return None;
        }
        c.lit(b"><qos")?;
        let expiry = c.opt_ts(b" expiry=\"")?;
        c.lit(b" precedence=\"")?;
        let precedence = precedence(c.value()?).ok()?;
        c.lit(b" persistent=\"")?;
        let persistent = persistent(c.value()?).ok()?;
        c.lit(b"/></source>\n")?;
        elements += 2;
        Route::Source(Source {
            component,
            version: version.into(),
            qos: Qos {
                expiry,
                precedence,
                persistent,
            },
        })
    } else {
        c.lit(b"<destination")?;
        let expiry = c.opt_ts(b" expiry=\"")?;
        c.lit(b">")?;
        let mut to = Vec::new();
        while c.lit(b"<to id=\"").is_some() {
            to.push(RsId::new(c.value()?).ok()?);
            c.lit(b"/>")?;
        }
        c.lit(b"</destination>\n")?;
        if to.is_empty() {
            return None;
        }
        elements += 1 + to.len();
        Route::Destination(Destination::new(to, expiry))
    };
    let data = if c.lit(b"<data mime=\"").is_some() {
        let mime = c.value()?;
        if !is_mime_type(mime) {
            return None;
        }
        c.lit(b" size=\"")?;
        let size = parse_u64(c.value()?).ok()?;
        c.lit(b" encoding=\"")?;
        let encoding = data_encoding(c.value()?).ok()?;
        c.lit(b"/>\n")?;
        elements += 1;
        Some(DataInfo {
            mime: mime.to_owned(),
            size,
            encoding,
        })
    } else {
        None
    };
    if (kind == ContentKind::Data) != data.is_some() {
        return None;
    }
    let mut routing = Hops::new();
    while c.lit(b"<routing component=\"").is_some() {
        let component = RsId::new(c.value()?).ok()?;
        c.lit(b" received=\"")?;
        let received = c.ts()?;
        let sent = c.opt_ts(b" sent=\"")?;
        c.lit(b"/>\n")?;
        routing.push(Hop {
            component,
            received,
            sent,
        });
        elements += 1;
    }
    c.lit(b"</header>\n")?;
    if c.at != bytes.len() || elements > limits.max_elements {
        return None;
    }
    Some((
        Header {
            id,
            created,
            class: Classification { class, subclass },
            route,
            routing,
        },
        kind,
        data,
    ))
}

/// A cursor over a header in canonical layout (see [`canonical`]).
struct Canon<'a> {
    s: &'a str,
    at: usize,
    max_attr: usize,
}

impl<'a> Canon<'a> {
    /// Steps over `lit` if the input continues with it.
    #[inline]
    fn lit(&mut self, lit: &[u8]) -> Option<()> {
        let rest = self.s.as_bytes().get(self.at..)?;
        if rest.starts_with(lit) {
            self.at += lit.len();
            Some(())
        } else {
            None
        }
    }

    /// An attribute value up to its closing quote (the cursor is just after
    /// the opening one), if it is printable ASCII with nothing to resolve
    /// and within the attribute limit.
    #[inline]
    fn value(&mut self) -> Option<&'a str> {
        let rest = self.s.as_bytes().get(self.at..)?;
        // One pass that finds the quote and checks each byte (values here
        // are short: a memchr and a second pass cost more).
        let end = rest
            .iter()
            .position(|&c| c == b'"' || PLAIN[usize::from(c)])?;
        if rest[end] != b'"' || end > self.max_attr {
            return None;
        }
        let v = self.s.get(self.at..self.at + end)?;
        self.at += end + 1;
        Some(v)
    }

    #[inline]
    fn token(&mut self) -> Option<CompactString> {
        token(self.value()?).ok()
    }

    #[inline]
    fn ts(&mut self) -> Option<Timestamp> {
        // A timestamp as written is 24 bytes and its closing quote: parsed
        // in place (whatever parses is digits and separators, so plain)
        // rather than scanned byte by byte first.
        if self.max_attr >= 24
            && self.s.as_bytes().get(self.at + 24) == Some(&b'"')
            && let Ok(t) = Timestamp::parse_bytes(&self.s.as_bytes()[self.at..self.at + 24])
        {
            self.at += 25;
            return Some(t);
        }
        Timestamp::parse(self.value()?).ok()
    }

    /// An optional timestamp attribute that starts with `lit`.
    #[inline]
    fn opt_ts(&mut self, lit: &[u8]) -> Option<Option<Timestamp>> {
        if self.lit(lit).is_some() {
            self.ts().map(Some)
        } else {
            Some(None)
        }
    }
}

/// Bytes an attribute value read by [`Canon::value`] may not contain:
/// anything but printable ASCII, and `&` and `<`.
const PLAIN: [bool; 256] = {
    let mut t = [true; 256];
    let mut c = 0x20;
    while c < 0x7f {
        t[c] = c == b'&' as usize || c == b'<' as usize;
        c += 1;
    }
    t
};
