//! Minimal, bounded XML reading and writing over quick-xml, shared by every
//! document type of the protocol.
//!
//! Reading is a pull parser that walks one element at a time and enforces
//! the limits; a DOCTYPE anywhere is refused, so no entity is ever declared,
//! expanded or fetched. Writing escapes everything a round trip needs
//! (including `\r`, `\t` and `\n` in attributes, which XML would otherwise
//! normalise away) and replaces characters XML 1.0 cannot carry by U+FFFD.

use std::borrow::Cow;

use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;

use super::{Limits, XmlError};
use crate::time::Timestamp;

/// The XML declaration every document starts with.
pub(crate) const DECL: &[u8] = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// Checks that `bytes` is UTF-8 made only of characters XML 1.0 allows.
pub(crate) fn check_chars(bytes: &[u8]) -> Result<&str, XmlError> {
    // SIMD validation; the `compat` flavour reports where invalid input
    // starts, as the std check does.
    let s = simdutf8::compat::from_utf8(bytes).map_err(|e| XmlError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let bad = |b: u8| b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r';
    // A branch-free pass vectorises; find the offset only when needed.
    if bytes.iter().fold(false, |acc, &b| acc | bad(b)) {
        let at = bytes.iter().position(|&b| bad(b)).unwrap_or(0);
        return Err(XmlError::IllegalChar { offset: at });
    }
    // U+FFFE and U+FFFF are EF BF BE / EF BF BF in UTF-8.
    for at in memchr::memchr_iter(0xEF, bytes) {
        if bytes.get(at + 1) == Some(&0xBF) && matches!(bytes.get(at + 2), Some(0xBE | 0xBF)) {
            return Err(XmlError::IllegalChar { offset: at });
        }
    }
    Ok(s)
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// A start tag with its attributes parsed and normalised. Everything
/// borrows from the input document; nothing is allocated unless an
/// attribute value needs unescaping.
pub(crate) struct Tag<'a> {
    pub(crate) name: &'a str,
    pub(crate) empty: bool,
    attrs: smallvec::SmallVec<[(&'a str, Cow<'a, str>); 6]>,
}

/// `s`, which quick-xml borrowed from `input`, with `input`'s lifetime.
fn reborrow<'a>(input: &'a str, s: &str) -> Result<&'a str, XmlError> {
    let start = (s.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
    input
        .get(start..start.wrapping_add(s.len()))
        .filter(|r| r.as_ptr() == s.as_ptr())
        .ok_or_else(|| XmlError::Syntax("tag not borrowed from the input".into()))
}

impl<'a> Tag<'a> {
    fn new(
        input: &'a str,
        e: &BytesStart<'_>,
        empty: bool,
        limits: &Limits,
    ) -> Result<Self, XmlError> {
        let content = reborrow(input, e)?;
        let name_len = e.name().as_ref().len();
        let name = &content[..name_len];
        let mut attrs = smallvec::SmallVec::new();
        for a in quick_xml::events::attributes::Attributes::new(content, name_len) {
            let a = a.map_err(|err| XmlError::Syntax(format!("in <{name}>: {err}")))?;
            let key = a.key.into_inner();
            if a.value.len() > limits.max_attr_bytes {
                return Err(XmlError::AttrTooLong {
                    element: name.to_owned(),
                    attr: key.to_owned(),
                    limit: limits.max_attr_bytes,
                });
            }
            let value = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| XmlError::Syntax(format!("in <{name} {key}>: {err}")))?;
            if let Cow::Owned(v) = &value {
                // Raw characters were checked with the whole document;
                // character references are checked here.
                check_value_chars(v)?;
            }
            attrs.push((key, value));
        }
        Ok(Tag { name, empty, attrs })
    }

    /// An optional attribute.
    pub(crate) fn opt(&self, attr: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| *k == attr)
            .map(|(_, v)| v.as_ref())
    }

    /// A required attribute.
    pub(crate) fn req(&self, attr: &'static str) -> Result<&str, XmlError> {
        self.opt(attr).ok_or_else(|| XmlError::MissingAttr {
            element: self.name.to_owned(),
            attr,
        })
    }

    /// An attribute error naming this element.
    pub(crate) fn bad(&self, attr: &'static str, reason: impl Into<String>) -> XmlError {
        XmlError::BadAttr {
            element: self.name.to_owned(),
            attr,
            reason: reason.into(),
        }
    }

    /// A required attribute parsed by `f`, which says why a value is bad.
    pub(crate) fn req_with<T, E: std::fmt::Display>(
        &self,
        attr: &'static str,
        f: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, XmlError> {
        let v = self.req(attr)?;
        f(v).map_err(|e| self.bad(attr, format!("{v:?}: {e}")))
    }

    /// An optional attribute parsed by `f`.
    pub(crate) fn opt_with<T, E: std::fmt::Display>(
        &self,
        attr: &'static str,
        f: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, XmlError> {
        match self.opt(attr) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .map_err(|e| self.bad(attr, format!("{v:?}: {e}"))),
        }
    }

    pub(crate) fn req_ts(&self, attr: &'static str) -> Result<Timestamp, XmlError> {
        self.req_with(attr, Timestamp::parse)
    }

    pub(crate) fn opt_ts(&self, attr: &'static str) -> Result<Option<Timestamp>, XmlError> {
        self.opt_with(attr, Timestamp::parse)
    }

    pub(crate) fn opt_u64(&self, attr: &'static str) -> Result<Option<u64>, XmlError> {
        self.opt_with(attr, parse_u64)
    }

    /// An error for a child element that may not appear here.
    pub(crate) fn unexpected_child(&self, child: &Tag<'_>) -> XmlError {
        XmlError::UnexpectedElement {
            element: child.name.to_owned(),
            parent: self.name.to_owned(),
        }
    }
}

fn check_value_chars(v: &str) -> Result<(), XmlError> {
    match first_illegal_char(v) {
        Some((offset, _)) => Err(XmlError::IllegalChar { offset }),
        None => Ok(()),
    }
}

/// Byte classes for the scans below, one table per use so each scan is a
/// single lookup per byte (texts are mostly plain; these run on every
/// message at every tier). `SUSPECT`: bytes that may begin a character XML
/// 1.0 does not allow (C0 controls other than tab, LF and CR; 0xEF may
/// begin U+FFFE or U+FFFF). `TEXT` and `ATTR`: what escaping must look at
/// in character data and in a double-quoted attribute value.
const SUSPECT: [bool; 256] = byte_class(b"");
const TEXT: [bool; 256] = byte_class(b"&<>\r");
const ATTR: [bool; 256] = byte_class(b"&<>\r\"\t\n");

const fn byte_class(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = !matches!(b as u8, b'\t' | b'\n' | b'\r');
        b += 1;
    }
    t[0xEF] = true;
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// The first character of `s` that XML 1.0 does not allow, with its byte
/// offset.
pub fn first_illegal_char(s: &str) -> Option<(usize, char)> {
    let bytes = s.as_bytes();
    let mut at = 0;
    while let Some(off) = bytes[at..].iter().position(|&b| SUSPECT[usize::from(b)]) {
        at += off;
        let c = s[at..].chars().next()?;
        if !is_xml_char(c) {
            return Some((at, c));
        }
        at += c.len_utf8();
    }
    None
}

/// Decimal without sign or leading `+`, as the DTDs' numeric attributes.
pub(crate) fn parse_u64(s: &str) -> Result<u64, &'static str> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a decimal number");
    }
    s.parse().map_err(|_| "number too large")
}

/// Pull parser over one XML document.
pub(crate) struct XmlIn<'a> {
    input: &'a str,
    reader: Reader<&'a [u8]>,
    limits: &'a Limits,
    depth: usize,
    items: usize,
}

impl<'a> XmlIn<'a> {
    /// Starts on `bytes`, checking encoding and characters first.
    pub(crate) fn new(bytes: &'a [u8], limits: &'a Limits) -> Result<Self, XmlError> {
        let s = check_chars(bytes)?;
        let mut reader = Reader::from_str(s);
        let cfg = reader.config_mut();
        cfg.check_comments = true;
        // End tags are matched against their start tag by this parser
        // itself (see `end_tag`), which needs no allocation per document.
        cfg.check_end_names = false;
        cfg.trim_text(false);
        Ok(XmlIn {
            input: s,
            reader,
            limits,
            depth: 0,
            items: 0,
        })
    }

    fn event(&mut self) -> Result<Event<'a>, XmlError> {
        match self.reader.read_event() {
            Ok(Event::DocType(_)) => Err(XmlError::Doctype),
            Ok(e) => Ok(e),
            Err(e) => Err(XmlError::Syntax(e.to_string())),
        }
    }

    /// Reads up to the root element, which must be `expected`.
    pub(crate) fn root(&mut self, expected: &'static str) -> Result<Tag<'a>, XmlError> {
        let mut first = true;
        loop {
            match self.event()? {
                Event::Decl(d) if first => {
                    let version = d.version().map_err(|e| XmlError::Syntax(e.to_string()))?;
                    if version.as_ref() != "1.0" {
                        return Err(XmlError::Syntax(format!(
                            "XML version {version} (only 1.0 is used)"
                        )));
                    }
                    if let Some(enc) = d.encoding() {
                        let enc = enc.map_err(|e| XmlError::Syntax(e.to_string()))?;
                        if !enc.eq_ignore_ascii_case("utf-8") {
                            return Err(XmlError::Syntax(format!(
                                "encoding {enc} (only UTF-8 is used)"
                            )));
                        }
                    }
                }
                Event::Text(t) if is_blank(&t) => {}
                Event::Comment(_) | Event::PI(_) => {}
                Event::Start(e) | Event::Empty(e) if e.name().as_ref() != expected => {
                    return Err(XmlError::UnexpectedRoot {
                        found: e.name().as_ref().to_owned(),
                        expected,
                    });
                }
                Event::Start(e) => {
                    self.depth = 1;
                    return Tag::new(self.input, &e, false, self.limits);
                }
                Event::Empty(e) => return Tag::new(self.input, &e, true, self.limits),
                Event::Eof => return Err(XmlError::Syntax("no root element".into())),
                other => {
                    return Err(XmlError::Syntax(format!(
                        "unexpected {} before the root element",
                        describe(&other)
                    )));
                }
            }
            first = false;
        }
    }

    /// The next child element of the element opened by `parent`, or `None`
    /// at its end tag. Text other than whitespace is refused.
    pub(crate) fn child(&mut self, parent: &Tag<'_>) -> Result<Option<Tag<'a>>, XmlError> {
        if parent.empty {
            return Ok(None);
        }
        loop {
            match self.event()? {
                Event::Start(e) => {
                    self.count_item()?;
                    self.depth += 1;
                    if self.depth > self.limits.max_xml_depth {
                        return Err(XmlError::TooDeep {
                            limit: self.limits.max_xml_depth,
                        });
                    }
                    return Tag::new(self.input, &e, false, self.limits).map(Some);
                }
                Event::Empty(e) => {
                    self.count_item()?;
                    if self.depth + 1 > self.limits.max_xml_depth {
                        return Err(XmlError::TooDeep {
                            limit: self.limits.max_xml_depth,
                        });
                    }
                    return Tag::new(self.input, &e, true, self.limits).map(Some);
                }
                Event::End(e) => {
                    end_tag(parent, e.name().as_ref())?;
                    self.depth -= 1;
                    return Ok(None);
                }
                Event::Text(t) if is_blank(&t) => {}
                Event::Comment(_) | Event::PI(_) => {}
                Event::Eof => return Err(XmlError::Syntax("unexpected end of document".into())),
                other => {
                    return Err(XmlError::Syntax(format!(
                        "unexpected {} in <{}>",
                        describe(&other),
                        parent.name
                    )));
                }
            }
        }
    }

    fn count_item(&mut self) -> Result<(), XmlError> {
        self.items += 1;
        if self.items > self.limits.max_elements {
            return Err(XmlError::TooManyElements {
                limit: self.limits.max_elements,
            });
        }
        Ok(())
    }

    /// Skips to the end of `tag`, which must have no children (whitespace
    /// and comments allowed).
    pub(crate) fn end(&mut self, tag: &Tag<'_>) -> Result<(), XmlError> {
        match self.child(tag)? {
            None => Ok(()),
            Some(c) => Err(tag.unexpected_child(&c)),
        }
    }

    /// The text content of `tag`, which may not contain elements.
    pub(crate) fn text(&mut self, tag: &Tag<'_>) -> Result<String, XmlError> {
        let mut out = String::new();
        if tag.empty {
            return Ok(out);
        }
        loop {
            let piece: Cow<'_, str> = match self.event()? {
                Event::Text(t) => t.xml10_content(),
                Event::CData(c) => c.xml10_content(),
                Event::GeneralRef(r) => Cow::Owned(resolve_ref(&r)?.to_string()),
                Event::Comment(_) | Event::PI(_) => continue,
                Event::End(e) => {
                    end_tag(tag, e.name().as_ref())?;
                    self.depth -= 1;
                    return Ok(out);
                }
                Event::Start(e) | Event::Empty(e) => {
                    return Err(XmlError::UnexpectedElement {
                        element: e.name().as_ref().to_owned(),
                        parent: tag.name.to_owned(),
                    });
                }
                Event::Eof => return Err(XmlError::Syntax("unexpected end of document".into())),
                other => {
                    return Err(XmlError::Syntax(format!(
                        "unexpected {} in <{}>",
                        describe(&other),
                        tag.name
                    )));
                }
            };
            if out.len() + piece.len() > self.limits.max_text_bytes {
                return Err(XmlError::TextTooLong {
                    element: tag.name.to_owned(),
                    limit: self.limits.max_text_bytes,
                });
            }
            out.push_str(&piece);
        }
    }

    /// Checks that nothing but whitespace, comments and PIs follow the root.
    pub(crate) fn finish(mut self) -> Result<(), XmlError> {
        loop {
            match self.event()? {
                Event::Eof => return Ok(()),
                Event::Text(t) if is_blank(&t) => {}
                Event::Comment(_) | Event::PI(_) => {}
                other => {
                    return Err(XmlError::Syntax(format!(
                        "unexpected {} after the root element",
                        describe(&other)
                    )));
                }
            }
        }
    }
}

fn end_tag(open: &Tag<'_>, name: &str) -> Result<(), XmlError> {
    if open.name == name {
        Ok(())
    } else {
        Err(XmlError::Syntax(format!(
            "end tag </{name}> does not match <{}>",
            open.name
        )))
    }
}

fn is_blank(t: &quick_xml::events::BytesText<'_>) -> bool {
    t.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

fn resolve_ref(r: &quick_xml::events::BytesRef<'_>) -> Result<char, XmlError> {
    let name: &str = r;
    if r.is_char_ref() {
        match r.resolve_char_ref() {
            Ok(Some(c)) if is_xml_char(c) => Ok(c),
            _ => Err(XmlError::BadCharRef(name.to_owned())),
        }
    } else {
        match name {
            "lt" => Ok('<'),
            "gt" => Ok('>'),
            "amp" => Ok('&'),
            "apos" => Ok('\''),
            "quot" => Ok('"'),
            _ => Err(XmlError::UnknownEntity(name.to_owned())),
        }
    }
}

fn describe(e: &Event<'_>) -> &'static str {
    match e {
        Event::Start(_) | Event::Empty(_) => "element",
        Event::End(_) => "end tag",
        Event::Text(_) | Event::GeneralRef(_) => "text",
        Event::CData(_) => "CDATA section",
        Event::Comment(_) => "comment",
        Event::Decl(_) => "XML declaration",
        Event::PI(_) => "processing instruction",
        Event::DocType(_) => "DOCTYPE",
        Event::Eof => "end of document",
    }
}

/// Appends XML to a buffer, escaping attribute values and text so they
/// read back exactly (for the daemons' control and status documents too).
#[derive(Debug)]
pub struct XmlOut<'a> {
    pub buf: &'a mut Vec<u8>,
}

impl<'a> XmlOut<'a> {
    /// Starts a document: the declaration and nothing else.
    pub fn document(buf: &'a mut Vec<u8>) -> Self {
        buf.extend_from_slice(DECL);
        XmlOut { buf }
    }

    /// Continues XML already begun in `buf` (no declaration).
    pub fn fragment(buf: &'a mut Vec<u8>) -> Self {
        XmlOut { buf }
    }

    pub fn open(&mut self, name: &str) -> &mut Self {
        self.buf.push(b'<');
        self.buf.extend_from_slice(name.as_bytes());
        self
    }

    pub fn attr(&mut self, name: &str, value: &str) -> &mut Self {
        self.buf.push(b' ');
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"=\"");
        escape_into(self.buf, value, true);
        self.buf.push(b'"');
        self
    }

    pub fn attr_opt(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        if let Some(v) = value {
            self.attr(name, v);
        }
        self
    }

    pub fn attr_ts(&mut self, name: &str, t: Timestamp) -> &mut Self {
        self.buf.push(b' ');
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"=\"");
        t.write_to(self.buf);
        self.buf.push(b'"');
        self
    }

    pub fn attr_ts_opt(&mut self, name: &str, t: Option<Timestamp>) -> &mut Self {
        if let Some(t) = t {
            self.attr_ts(name, t);
        }
        self
    }

    pub fn attr_num(&mut self, name: &str, n: u64) -> &mut Self {
        use std::io::Write as _;
        self.buf.push(b' ');
        self.buf.extend_from_slice(name.as_bytes());
        // Writing to a Vec cannot fail.
        let _ = write!(self.buf, "=\"{n}\"");
        self
    }

    pub fn attr_num_opt(&mut self, name: &str, n: Option<u64>) -> &mut Self {
        if let Some(n) = n {
            self.attr_num(name, n);
        }
        self
    }

    /// Ends the start tag of an element that will have content.
    pub fn gt(&mut self) -> &mut Self {
        self.buf.push(b'>');
        self
    }

    /// Ends an element with no content.
    pub fn empty(&mut self) -> &mut Self {
        self.buf.extend_from_slice(b"/>");
        self
    }

    pub fn text(&mut self, s: &str) -> &mut Self {
        escape_into(self.buf, s, false);
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        self.buf.extend_from_slice(b"</");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b'>');
        self
    }

    /// `<name>text</name>`, or `<name/>` when `text` is empty.
    pub fn text_element(&mut self, name: &str, text: &str) -> &mut Self {
        self.open(name);
        if text.is_empty() {
            self.empty()
        } else {
            self.gt().text(text).close(name)
        }
    }

    pub fn newline(&mut self) -> &mut Self {
        self.buf.push(b'\n');
        self
    }
}

fn escape_into(out: &mut Vec<u8>, s: &str, attr: bool) {
    let class = if attr { &ATTR } else { &TEXT };
    let bytes = s.as_bytes();
    let (mut done, mut at) = (0, 0);
    while let Some(off) = bytes[at..].iter().position(|&b| class[usize::from(b)]) {
        at += off;
        let Some(c) = s[at..].chars().next() else {
            break;
        };
        let rep: &[u8] = match c {
            '&' => b"&amp;",
            '<' => b"&lt;",
            '>' => b"&gt;",
            '\r' => b"&#13;",
            '"' => b"&quot;",
            '\t' => b"&#9;",
            '\n' => b"&#10;",
            c if !is_xml_char(c) => "\u{FFFD}".as_bytes(),
            // A character beginning with 0xEF that XML allows: kept.
            c => {
                at += c.len_utf8();
                continue;
            }
        };
        out.extend_from_slice(&bytes[done..at]);
        out.extend_from_slice(rep);
        at += c.len_utf8();
        done = at;
    }
    out.extend_from_slice(&bytes[done..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str, attr: bool) -> String {
        let mut v = Vec::new();
        escape_into(&mut v, s, attr);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn escaping() {
        assert_eq!(esc("a<b>&\"c\"", false), "a&lt;b&gt;&amp;\"c\"");
        assert_eq!(esc("a\tb\nc\rd\"", true), "a&#9;b&#10;c&#13;d&quot;");
        assert_eq!(esc("x\u{1}y\u{FFFE}z€", false), "x\u{FFFD}y\u{FFFD}z€");
        // Tab and LF stay as they are in text; U+FFFD and U+EFFF (0xEF...)
        // are allowed and kept.
        assert_eq!(
            esc("a\tb\nc\u{FFFD}\u{EFFF}\u{FFFF}", false),
            "a\tb\nc\u{FFFD}\u{EFFF}\u{FFFD}"
        );
        assert_eq!(esc("plain", true), "plain");
        assert_eq!(first_illegal_char("ok\t\n\r€\u{FFFD}"), None);
        assert_eq!(first_illegal_char("ab\u{FFFE}"), Some((2, '\u{FFFE}')));
        assert_eq!(first_illegal_char("\u{EFFF}x\u{B}"), Some((4, '\u{B}')));
    }

    #[test]
    fn doctype_refused() {
        let limits = Limits::default();
        let doc = b"<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>";
        let mut p = XmlIn::new(doc, &limits).unwrap();
        assert!(matches!(p.root("a"), Err(XmlError::Doctype)));
    }

    #[test]
    fn text_with_refs() {
        let limits = Limits::default();
        let doc = b"<a>x &lt;&#65;&#x42;<![CDATA[<c>]]>\r\ny</a>";
        let mut p = XmlIn::new(doc, &limits).unwrap();
        let root = p.root("a").unwrap();
        assert_eq!(p.text(&root).unwrap(), "x <AB<c>\ny");
        p.finish().unwrap();
        for bad in [&b"<a>&foo;</a>"[..], b"<a>&#0;</a>", b"<a>&#xD800;</a>"] {
            let mut p = XmlIn::new(bad, &limits).unwrap();
            let root = p.root("a").unwrap();
            assert!(p.text(&root).is_err());
        }
    }
}
