//! `multipart/related` framing (RFC 2046, RFC 2387): the envelope writer and
//! the streaming decoder.
//!
//! Written by hand, not with multer: the decoder must be sans-IO (fed byte
//! slices, so it can be fuzzed and driven from any body stream), must hand
//! back a message's content part as a zero-copy slice without looking inside
//! it, and must enforce this protocol's pairing rules per part as it goes.
//! The media type itself is parsed with the `mime` crate.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::LazyLock;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;

use super::content::{XML_PART_TYPE, decode_base64};
use super::{
    DataInfo, DecodeError, Encoded, Limits, PartRef, ROOT_CONTENT_ID, RawEnvelope, RawMessage,
    XmlError, header, meta,
};
use crate::ids::MessageId;
use crate::model::{Content, ContentKind, EnvelopeMeta, Header, Message, TransferEncoding};

/// Writes an envelope: the root part first, then each message's header and
/// content parts.
#[derive(Debug)]
pub struct EnvelopeWriter {
    boundary: String,
    delim: Vec<u8>,
    /// Searches payloads for the delimiter: built once per envelope, not
    /// once per message (building it is most of the cost of a short
    /// search).
    finder: Finder<'static>,
    buf: Vec<u8>,
    messages: usize,
}

impl EnvelopeWriter {
    /// Starts an envelope with its envelope header.
    pub fn new(meta: &EnvelopeMeta) -> Self {
        Self::with_boundary(meta, &format!("rs-{}", uuid::Uuid::now_v7().simple()))
    }

    /// Starts an envelope with a chosen boundary (for reproducible golden
    /// files). The boundary must be 1 to 70 RFC 2046 `bchars`; payloads that
    /// contain it are base64-encoded as usual.
    pub fn with_boundary(meta: &EnvelopeMeta, boundary: &str) -> Self {
        let boundary = boundary.to_owned();
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(boundary.as_bytes());
        let mut w = EnvelopeWriter {
            boundary,
            finder: Finder::new(&delim).into_owned(),
            delim,
            // Room for the envelope header; grows by doubling (an MLM keeps one
            // per held long poll, so it starts small).
            buf: Vec::with_capacity(1024),
            messages: 0,
        };
        // The first delimiter has no leading CRLF.
        w.buf.extend_from_slice(&w.delim[2..]);
        w.part_headers(XML_PART_TYPE, ROOT_CONTENT_ID.as_bytes(), None);
        meta::encode(meta, &mut w.buf);
        w
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no message has been added.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Messages added so far.
    pub fn message_count(&self) -> usize {
        self.messages
    }

    fn part_headers(&mut self, ctype: &str, cid: &[u8], cte: Option<TransferEncoding>) {
        let b = &mut self.buf;
        b.extend_from_slice(b"\r\nContent-Type: ");
        b.extend_from_slice(ctype.as_bytes());
        b.extend_from_slice(b"\r\nContent-ID: ");
        b.extend_from_slice(cid);
        if let Some(e) = cte {
            b.extend_from_slice(b"\r\nContent-Transfer-Encoding: ");
            b.extend_from_slice(e.as_str().as_bytes());
        }
        b.extend_from_slice(b"\r\n\r\n");
    }

    fn start_part(&mut self) {
        self.buf.extend_from_slice(&self.delim);
    }

    fn cid(id: &MessageId, which: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(id.as_str().len() + 10);
        v.push(b'<');
        v.extend_from_slice(id.as_str().as_bytes());
        v.push(b'@');
        v.extend_from_slice(which.as_bytes());
        v.push(b'>');
        v
    }

    fn header_part(&mut self, h: &Header, kind: ContentKind, data: Option<&DataInfo>) {
        self.start_part();
        self.part_headers(XML_PART_TYPE, &Self::cid(&h.id, "header"), None);
        // Our XML never contains a raw CR, so it cannot contain the delimiter.
        header::encode(h, kind, data, &mut self.buf);
    }

    /// True when `bytes` would end a part early.
    fn collides(&self, bytes: &[u8]) -> bool {
        self.finder.find(bytes).is_some()
    }

    /// Adds a decoded message.
    pub fn push(&mut self, m: &Message) {
        match &m.content {
            Content::Data(d) => {
                let mut encoding = d.encoding;
                if encoding == TransferEncoding::Binary && self.collides(&d.bytes) {
                    encoding = TransferEncoding::Base64;
                }
                let info = DataInfo {
                    mime: d.mime.clone(),
                    size: d.bytes.len() as u64,
                    encoding,
                };
                self.header_part(&m.header, ContentKind::Data, Some(&info));
                self.start_part();
                self.part_headers(&d.mime, &Self::cid(&m.header.id, "content"), Some(encoding));
                match encoding {
                    TransferEncoding::Binary => self.buf.extend_from_slice(&d.bytes),
                    TransferEncoding::Base64 => {
                        append_base64(&mut self.buf, &d.bytes);
                    }
                }
            }
            _ => {
                self.header_part(&m.header, m.content.kind(), None);
                self.start_part();
                self.part_headers(XML_PART_TYPE, &Self::cid(&m.header.id, "content"), None);
                let raw = m.to_raw();
                self.buf.extend_from_slice(&raw.content);
            }
        }
        self.messages += 1;
    }

    /// Adds a message whose content is passed through unparsed (a forwarder
    /// after appending its routing hop).
    pub fn push_raw(&mut self, m: &RawMessage) {
        if let Some(seal) = m.seal() {
            // A seal is DER: always base64, whatever the kind.
            self.header_part(&m.header, m.kind, m.data.as_ref());
            self.start_part();
            self.part_headers(
                seal.content_type(),
                &Self::cid(&m.header.id, "content"),
                Some(TransferEncoding::Base64),
            );
            append_base64(&mut self.buf, &m.content);
            self.messages += 1;
            return;
        }
        let collides = self.collides(&m.content);
        match &m.data {
            Some(info) if collides && info.encoding == TransferEncoding::Binary => {
                // Re-encode rather than let the payload end the part early.
                let info = DataInfo {
                    encoding: TransferEncoding::Base64,
                    ..info.clone()
                };
                self.header_part(&m.header, m.kind, Some(&info));
                self.start_part();
                self.part_headers(
                    &m.content_type,
                    &Self::cid(&m.header.id, "content"),
                    Some(TransferEncoding::Base64),
                );
                append_base64(&mut self.buf, &m.content);
            }
            Some(info) => {
                self.header_part(&m.header, m.kind, Some(info));
                self.start_part();
                self.part_headers(
                    &m.content_type,
                    &Self::cid(&m.header.id, "content"),
                    Some(info.encoding),
                );
                self.buf.extend_from_slice(&m.content);
            }
            None => {
                self.header_part(&m.header, m.kind, None);
                self.start_part();
                let cid = Self::cid(&m.header.id, "content");
                if collides {
                    self.part_headers(&m.content_type, &cid, Some(TransferEncoding::Base64));
                    append_base64(&mut self.buf, &m.content);
                } else {
                    self.part_headers(&m.content_type, &cid, None);
                    self.buf.extend_from_slice(&m.content);
                }
            }
        }
        self.messages += 1;
    }

    /// Closes the envelope.
    pub fn finish(mut self) -> Encoded {
        self.buf.extend_from_slice(&self.delim);
        self.buf.extend_from_slice(b"--\r\n");
        Encoded {
            content_type: format!(
                "multipart/related; boundary=\"{}\"; type=\"text/xml\"; start=\"{ROOT_CONTENT_ID}\"",
                self.boundary
            ),
            body: Bytes::from(self.buf),
        }
    }
}

/// Appends `bytes` base64-encoded (no line breaks) to `buf`.
fn append_base64(buf: &mut Vec<u8>, bytes: &[u8]) {
    let start = buf.len();
    let n = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    buf.resize(start + n, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut buf[start..])
        .unwrap_or(0);
    buf.truncate(start + written);
}

/// Extracts and checks the boundary of a `multipart/related` content type.
fn boundary_of(content_type: &str) -> Result<String, DecodeError> {
    let bad = || DecodeError::ContentType(content_type.chars().take(200).collect());
    let m: mime::Mime = content_type.parse().map_err(|_| bad())?;
    if m.type_() != mime::MULTIPART || m.subtype().as_str() != "related" {
        return Err(bad());
    }
    let b = m.get_param(mime::BOUNDARY).ok_or_else(bad)?.as_str();
    // RFC 2046 bchars, 1 to 70 of them, not ending in a space.
    let ok = !b.is_empty()
        && b.len() <= 70
        && !b.ends_with(' ')
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c));
    if ok { Ok(b.to_owned()) } else { Err(bad()) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Just after a delimiter line's boundary.
    Part,
    /// After the close delimiter.
    Epilogue,
}

/// What the scanner found at the front of the buffer.
enum Step {
    NeedMore,
    /// Consume this many bytes; nothing else to do.
    Skip(usize),
    /// A whole part: its header block, its body, and the bytes it spans
    /// (through the next delimiter).
    Part {
        headers: std::ops::Range<usize>,
        body: std::ops::Range<usize>,
        consumed: usize,
    },
}

/// Finds part boundaries at the front of a buffer.
#[derive(Debug)]
struct Scanner {
    limits: Limits,
    delim: Vec<u8>,
    finder: Finder<'static>,
    state: State,
    /// Where to resume the delimiter search (already scanned up to here).
    scan_from: usize,
    epilogue: usize,
}

impl Scanner {
    /// The first delimiter in `hay`. It starts with CR, which the XML
    /// parts this codec writes never contain (CR is written as `&#13;`),
    /// so looking for CRs and comparing at each is cheaper than a general
    /// substring search; a part with many CRs (binary data) goes to the
    /// general search after a few misses.
    fn find_delim(&self, hay: &[u8]) -> Option<usize> {
        for (misses, i) in memchr::memchr_iter(b'\r', hay).enumerate() {
            if hay[i..].starts_with(&self.delim) {
                return Some(i);
            }
            if misses == 8 {
                return self.finder.find(&hay[i..]).map(|j| i + j);
            }
        }
        None
    }

    /// Looks at the front of `buf` in the current state.
    fn step(&mut self, buf: &[u8], part_no: usize) -> Result<Step, DecodeError> {
        match self.state {
            State::Preamble => {
                // The body may open with the delimiter (no CRLF before it)...
                let dashes = &self.delim[2..];
                if buf.len() < dashes.len() && dashes.starts_with(buf) {
                    return Ok(Step::NeedMore);
                }
                if buf.starts_with(dashes) {
                    self.state = State::Part;
                    return Ok(Step::Skip(dashes.len()));
                }
                // ...or after a preamble.
                if let Some(i) = self.finder.find(buf) {
                    if i > self.limits.max_preamble_bytes {
                        return Err(DecodeError::PreambleTooLarge {
                            limit: self.limits.max_preamble_bytes,
                        });
                    }
                    self.state = State::Part;
                    return Ok(Step::Skip(i + self.delim.len()));
                }
                if buf.len() > self.limits.max_preamble_bytes + self.delim.len() {
                    return Err(DecodeError::PreambleTooLarge {
                        limit: self.limits.max_preamble_bytes,
                    });
                }
                Ok(Step::NeedMore)
            }
            State::Epilogue => {
                self.epilogue += buf.len();
                if self.epilogue > self.limits.max_preamble_bytes {
                    return Err(DecodeError::PreambleTooLarge {
                        limit: self.limits.max_preamble_bytes,
                    });
                }
                Ok(if buf.is_empty() {
                    Step::NeedMore
                } else {
                    Step::Skip(buf.len())
                })
            }
            State::Part => {
                let part = PartRef::Index(part_no);
                if buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if buf.starts_with(b"--") {
                    self.state = State::Epilogue;
                    return Ok(Step::Skip(2));
                }
                // Transport padding, then the CRLF that ends the delimiter line.
                let pad = buf.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
                if pad > 64 {
                    return Err(DecodeError::PartHeaders {
                        part,
                        reason: "junk after the boundary".into(),
                    });
                }
                let Some(rest) = buf.get(pad..) else {
                    return Ok(Step::NeedMore);
                };
                if rest.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &rest[..2] != b"\r\n" {
                    return Err(DecodeError::PartHeaders {
                        part,
                        reason: "boundary line not ended by CRLF".into(),
                    });
                }
                // Headers run from the CRLF to the first blank line; an empty
                // block is CRLF CRLF straight away.
                let hstart = pad;
                let hlimit = self.limits.max_part_header_bytes + 4;
                let window = &buf[hstart..buf.len().min(hstart + hlimit)];
                let Some(hend) = BLANK_LINE.find(window) else {
                    if window.len() >= hlimit {
                        return Err(DecodeError::PartHeaders {
                            part,
                            reason: format!(
                                "headers longer than {} bytes",
                                self.limits.max_part_header_bytes
                            ),
                        });
                    }
                    return Ok(Step::NeedMore);
                };
                let headers = hstart + 2..hstart + hend + 2;
                let body_start = hstart + hend + 4;
                let from = self.scan_from.max(body_start);
                match self.find_delim(&buf[from.min(buf.len())..]) {
                    Some(i) => {
                        let body_end = from + i;
                        if body_end - body_start > self.limits.max_part_bytes {
                            return Err(DecodeError::PartTooLarge {
                                part,
                                limit: self.limits.max_part_bytes,
                            });
                        }
                        Ok(Step::Part {
                            headers,
                            body: body_start..body_end,
                            consumed: body_end + self.delim.len(),
                        })
                    }
                    None => {
                        if buf.len().saturating_sub(body_start)
                            > self.limits.max_part_bytes + self.delim.len()
                        {
                            return Err(DecodeError::PartTooLarge {
                                part,
                                limit: self.limits.max_part_bytes,
                            });
                        }
                        // Resume where a delimiter could still begin.
                        self.scan_from = buf.len().saturating_sub(self.delim.len() - 1);
                        Ok(Step::NeedMore)
                    }
                }
            }
        }
    }
}

/// The blank line that ends a part's headers, searched for in every part at
/// every tier: built once (`memmem::find` builds its searcher on each call).
static BLANK_LINE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));

/// Decodes an envelope as its body arrives, holding at most one part (plus
/// the last chunk) in memory. Feed it with [`push`](Self::push) or
/// [`push_bytes`](Self::push_bytes), take messages with
/// [`pop`](Self::pop) as they complete, and call [`finish`](Self::finish)
/// at the end of the body.
#[derive(Debug)]
pub struct StreamDecoder {
    limits: Limits,
    scanner: Scanner,
    buf: BytesMut,
    total: usize,
    parts: usize,
    meta: Option<EnvelopeMeta>,
    pending: Option<header::Decoded>,
    seen: SeenIds,
    ready: VecDeque<RawMessage>,
    messages: usize,
    /// Body bytes up to the end of the root part (where messages start).
    root_end: usize,
}

struct PartHeaders<'a> {
    content_type: Option<&'a str>,
    content_id: Option<&'a str>,
    /// The Content-ID already parsed (when the block was read whole).
    cid: Option<Cid<'a>>,
    cte: Option<&'a str>,
}

/// `pending` is the ID of the message whose header came last, if its
/// content has not (see [`parse_cid`]).
fn parse_part_headers<'a>(
    block: &'a [u8],
    index: usize,
    pending: Option<&str>,
) -> Result<PartHeaders<'a>, DecodeError> {
    // The block this codec writes for an XML part, read without splitting
    // lines when its Content-ID is one `parse_cid` takes (those are
    // printable ASCII without spaces, so the general reading below makes
    // the same of the block).
    if let Some(value) = block
        .strip_prefix(XML_PART_HEADERS)
        .and_then(|rest| rest.strip_suffix(b"\r\n"))
        .and_then(|cid| std::str::from_utf8(cid).ok())
        && let Some(cid) = parse_cid(value, pending)
    {
        return Ok(PartHeaders {
            content_type: Some(XML_PART_TYPE),
            content_id: Some(value),
            cid: Some(cid),
            cte: None,
        });
    }
    let err = |reason: String| DecodeError::PartHeaders {
        part: PartRef::Index(index),
        reason,
    };
    let text = std::str::from_utf8(block).map_err(|_| err("not ASCII".into()))?;
    let mut h = PartHeaders {
        content_type: None,
        content_id: None,
        cid: None,
        cte: None,
    };
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            return Err(err("folded header lines are not allowed".into()));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| err(format!("line {:?} has no colon", trunc(line))))?;
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return Err(err(format!("bad header name {:?}", trunc(name))));
        }
        if !value
            .bytes()
            .all(|c| c == b'\t' || (0x20..0x7f).contains(&c))
        {
            return Err(err(format!("header {name} has a non-ASCII value")));
        }
        let value = value.trim_matches([' ', '\t']);
        let slot = if name.eq_ignore_ascii_case("content-type") {
            &mut h.content_type
        } else if name.eq_ignore_ascii_case("content-id") {
            &mut h.content_id
        } else if name.eq_ignore_ascii_case("content-transfer-encoding") {
            &mut h.cte
        } else {
            continue;
        };
        if slot.replace(value).is_some() {
            return Err(err(format!("header {name} appears twice")));
        }
    }
    Ok(h)
}

fn trunc(s: &str) -> String {
    s.chars().take(60).collect()
}

/// The start of the header block of an XML part as this codec writes it,
/// up to the Content-ID's value.
const XML_PART_HEADERS: &[u8] = b"Content-Type: text/xml; charset=utf-8\r\nContent-ID: ";

/// The message IDs an envelope has named so far, for refusing a second
/// part with the same Content-ID. The IDs are kept end to end in one
/// string and the table holds where each is, so noting an ID allocates
/// nothing (only the string and table grow, by doubling).
#[derive(Debug, Default)]
struct SeenIds {
    ids: String,
    /// Where each ID is in `ids`.
    table: hashbrown::HashTable<Range<usize>>,
    /// foldhash, seeded at random per process. An envelope holds at most
    /// `max_messages` IDs, so even IDs chosen to collide cost a bounded
    /// number of comparisons.
    hasher: hashbrown::DefaultHashBuilder,
}

impl SeenIds {
    /// Notes `id`; false if it was already noted.
    fn insert(&mut self, id: &str) -> bool {
        let hash = self.hasher.hash_one(id);
        let ids = &self.ids;
        let at = |r: &Range<usize>| &ids[r.clone()];
        match self
            .table
            .entry(hash, |r| at(r) == id, |r| self.hasher.hash_one(at(r)))
        {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                let start = ids.len();
                self.ids.push_str(id);
                slot.insert(start..self.ids.len());
                true
            }
        }
    }

    /// True when the next new ID needs the table to grow.
    fn is_full(&self) -> bool {
        self.table.len() == self.table.capacity()
    }

    /// Makes room for `n` more IDs of about `len` bytes.
    fn reserve(&mut self, n: usize, len: usize) {
        let (ids, hasher) = (&self.ids, &self.hasher);
        self.table.reserve(n, |r| hasher.hash_one(&ids[r.clone()]));
        self.ids.reserve(n.saturating_mul(len));
    }

    fn contains(&self, id: &str) -> bool {
        let at = |r: &Range<usize>| &self.ids[r.clone()];
        self.table
            .find(self.hasher.hash_one(id), |r| at(r) == id)
            .is_some()
    }
}

/// What a Content-ID names; a message ID here is valid.
#[derive(Debug, Clone, Copy)]
enum Cid<'a> {
    Root,
    Header(&'a str),
    Content(&'a str),
}

impl Cid<'_> {
    /// This part, for an error.
    fn part_ref(&self) -> PartRef {
        match self {
            Cid::Root => PartRef::Root,
            Cid::Header(id) => PartRef::Header(MessageId::from_validated(id)),
            Cid::Content(id) => PartRef::Content(MessageId::from_validated(id)),
        }
    }
}

/// Reads a Content-ID. A content part naming `pending`, the ID of the
/// header just read (already checked), needs no second check: every tier
/// reads two Content-IDs and a header ID per message.
fn parse_cid<'a>(v: &'a str, pending: Option<&str>) -> Option<Cid<'a>> {
    if v == ROOT_CONTENT_ID {
        return Some(Cid::Root);
    }
    let inner = v.strip_prefix('<')?;
    // An ID has no `@`, so this reads `<id@header>` and `<id@content>` as
    // splitting at the first `@` would.
    let cid = match inner.strip_suffix("@header>") {
        Some(id) => Cid::Header(id),
        None => Cid::Content(inner.strip_suffix("@content>")?),
    };
    match cid {
        Cid::Content(id) if Some(id) == pending => {}
        Cid::Header(id) | Cid::Content(id) => MessageId::validate(id).ok()?,
        Cid::Root => return None,
    }
    Some(cid)
}

impl StreamDecoder {
    /// A decoder for a body of this `Content-Type`.
    pub fn new(content_type: &str, limits: Limits) -> Result<Self, DecodeError> {
        let boundary = boundary_of(content_type)?;
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(boundary.as_bytes());
        let finder = Finder::new(&delim).into_owned();
        Ok(StreamDecoder {
            scanner: Scanner {
                limits: limits.clone(),
                delim,
                finder,
                state: State::Preamble,
                scan_from: 0,
                epilogue: 0,
            },
            limits,
            buf: BytesMut::new(),
            total: 0,
            parts: 0,
            meta: None,
            pending: None,
            seen: SeenIds::default(),
            ready: VecDeque::new(),
            messages: 0,
            root_end: 0,
        })
    }

    fn count(&mut self, n: usize) -> Result<(), DecodeError> {
        self.total += n;
        if self.total > self.limits.max_envelope_bytes {
            return Err(DecodeError::EnvelopeTooLarge {
                limit: self.limits.max_envelope_bytes,
            });
        }
        Ok(())
    }

    /// Feeds the next chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        self.count(chunk.len())?;
        self.buf.extend_from_slice(chunk);
        self.drain_buf()
    }

    /// Feeds the next chunk of the body without copying whatever of it
    /// completes parts.
    pub fn push_bytes(&mut self, chunk: Bytes) -> Result<(), DecodeError> {
        self.count(chunk.len())?;
        if !self.buf.is_empty() {
            self.buf.extend_from_slice(&chunk);
            return self.drain_buf();
        }
        let mut off = 0;
        loop {
            match self.scanner.step(&chunk[off..], self.parts + 1)? {
                Step::NeedMore => break,
                Step::Skip(n) => off += n,
                Step::Part {
                    headers,
                    body,
                    consumed,
                } => {
                    let base = off;
                    off += consumed;
                    self.scanner.scan_from = 0;
                    self.handle_part(
                        &chunk,
                        base + headers.start..base + headers.end,
                        base + body.start..base + body.end,
                        chunk.len() - off,
                    )?;
                }
            }
        }
        self.buf.extend_from_slice(&chunk[off..]);
        Ok(())
    }

    fn drain_buf(&mut self) -> Result<(), DecodeError> {
        loop {
            match self.scanner.step(&self.buf[..], self.parts + 1)? {
                Step::NeedMore => return Ok(()),
                Step::Skip(n) => {
                    let _ = self.buf.split_to(n);
                }
                Step::Part {
                    headers,
                    body,
                    consumed,
                } => {
                    let part = self.buf.split_to(consumed).freeze();
                    self.scanner.scan_from = 0;
                    let ahead = self.buf.len();
                    self.handle_part(&part, headers, body, ahead)?;
                }
            }
        }
    }

    /// How many more messages the `ahead` bytes already in hand after the
    /// current part hold at the average size so far (at least one), within
    /// the message limit. When full, the queue of messages and the set of
    /// IDs grow by the current message and this many, rather than doubling
    /// and being copied again and again while a whole body is read; with a
    /// body fed in small chunks they stay small. At worst (a small first
    /// message, then large ones) it overestimates up to the message limit.
    fn expected_more(&self, ahead: usize) -> usize {
        let per = self.total.saturating_sub(ahead + self.root_end) / self.messages.max(1);
        (ahead / per.max(1))
            .min(self.limits.max_messages.saturating_sub(self.messages))
            .max(1)
    }

    /// Handles one part: `src[headers]` is its header block, `src[body]`
    /// its body, and `ahead` bytes of the body follow it already in hand.
    /// Only a content part's body is kept, as a slice of `src`.
    fn handle_part(
        &mut self,
        src: &Bytes,
        headers: Range<usize>,
        body: Range<usize>,
        ahead: usize,
    ) -> Result<(), DecodeError> {
        self.parts += 1;
        let index = self.parts;
        let pending = self.pending.as_ref().map(|(h, _, _)| h.id.as_str());
        let h = parse_part_headers(&src[headers], index, pending)?;
        let cid_value = h.content_id.ok_or(DecodeError::MissingContentId {
            part: PartRef::Index(index),
        })?;
        let cid = h
            .cid
            .or_else(|| parse_cid(cid_value, pending))
            .ok_or_else(|| DecodeError::BadContentId {
                part: PartRef::Index(index),
                value: trunc(cid_value),
            })?;
        let part_ref = || cid.part_ref();
        let encoding = match h.cte {
            None => TransferEncoding::Binary,
            Some(v) => TransferEncoding::parse(v).ok_or_else(|| DecodeError::TransferEncoding {
                part: part_ref(),
                value: trunc(v),
            })?,
        };
        if self.meta.is_none() && !matches!(cid, Cid::Root) {
            return Err(DecodeError::MissingRoot);
        }
        // The body after transfer decoding, borrowed where it is not encoded.
        let wire = &src[body.clone()];
        let decoded = || -> Result<Cow<'_, [u8]>, DecodeError> {
            match encoding {
                TransferEncoding::Binary => Ok(Cow::Borrowed(wire)),
                TransferEncoding::Base64 => {
                    decode_base64(wire)
                        .map(Cow::Owned)
                        .map_err(|reason| DecodeError::Base64 {
                            part: part_ref(),
                            reason,
                        })
                }
            }
        };
        // The same, kept: a slice of `src`, or the decoded bytes.
        let kept = || -> Result<Bytes, DecodeError> {
            match decoded()? {
                Cow::Borrowed(_) => Ok(src.slice(body.clone())),
                Cow::Owned(v) => Ok(Bytes::from(v)),
            }
        };
        let xml_err = |error: XmlError| DecodeError::Xml {
            part: part_ref(),
            error,
        };
        match cid {
            Cid::Root => {
                if self.meta.is_some() {
                    return Err(DecodeError::DuplicatePart {
                        part: PartRef::Root,
                    });
                }
                self.meta = Some(meta::decode(&decoded()?, &self.limits).map_err(xml_err)?);
                self.root_end = self.total - ahead;
            }
            Cid::Header(id) => {
                if let Some((pending, _, _)) = self.pending.take() {
                    return Err(DecodeError::HeaderWithoutContent(pending.id));
                }
                if self.seen.is_full() {
                    self.seen.reserve(1 + self.expected_more(ahead), id.len());
                }
                if !self.seen.insert(id) {
                    return Err(DecodeError::DuplicatePart { part: part_ref() });
                }
                self.messages += 1;
                if self.messages > self.limits.max_messages {
                    return Err(DecodeError::TooManyMessages {
                        limit: self.limits.max_messages,
                    });
                }
                let (header, kind, data) =
                    header::decode(&decoded()?, &self.limits).map_err(|e| match e {
                        XmlError::UnknownContentType(value) => DecodeError::UnknownContentType {
                            id: MessageId::from_validated(id),
                            value,
                        },
                        error => xml_err(error),
                    })?;
                if header.id.as_str() != id {
                    return Err(xml_err(XmlError::Invalid(format!(
                        "header id {} differs from its Content-ID",
                        header.id
                    ))));
                }
                self.pending = Some((header, kind, data));
            }
            Cid::Content(id) => {
                let Some((header, kind, data)) = self.pending.take() else {
                    return Err(if self.seen.contains(id) {
                        DecodeError::DuplicatePart { part: part_ref() }
                    } else {
                        DecodeError::ContentWithoutHeader(MessageId::from_validated(id))
                    });
                };
                if header.id.as_str() != id {
                    return Err(DecodeError::HeaderWithoutContent(header.id));
                }
                let content_type = h.content_type.unwrap_or("application/octet-stream");
                // Nearly every content is an XML part as this codec writes it.
                let xml_part = content_type == XML_PART_TYPE;
                let sealed = if xml_part {
                    None
                } else {
                    super::Seal::of_content_type(content_type).map_err(|reason| {
                        DecodeError::ContentMismatch {
                            id: header.id.clone(),
                            reason,
                        }
                    })?
                };
                let content = match &data {
                    // A seal's DER, whatever the kind; opened at the server.
                    _ if sealed.is_some() => kept()?,
                    Some(info) => {
                        if info.encoding != encoding {
                            return Err(DecodeError::ContentMismatch {
                                id: header.id,
                                reason: format!(
                                    "header says {} encoding, part says {}",
                                    info.encoding.as_str(),
                                    encoding.as_str()
                                ),
                            });
                        }
                        src.slice(body)
                    }
                    None if xml_part => kept()?,
                    None => {
                        let base = content_type.split(';').next().unwrap_or("").trim();
                        if !base.eq_ignore_ascii_case("text/xml")
                            && !base.eq_ignore_ascii_case("application/xml")
                        {
                            return Err(DecodeError::ContentMismatch {
                                id: header.id,
                                reason: format!(
                                    "a {} content must be text/xml, not {}",
                                    kind.as_str(),
                                    trunc(content_type)
                                ),
                            });
                        }
                        kept()?
                    }
                };
                if self.ready.len() == self.ready.capacity() {
                    self.ready.reserve(1 + self.expected_more(ahead));
                }
                self.ready.push_back(RawMessage {
                    header,
                    kind,
                    data,
                    content_type: if xml_part {
                        Cow::Borrowed(XML_PART_TYPE)
                    } else {
                        Cow::Owned(content_type.to_owned())
                    },
                    content,
                });
            }
        }
        Ok(())
    }

    /// The envelope header, once its part has arrived.
    pub fn meta(&self) -> Option<&EnvelopeMeta> {
        self.meta.as_ref()
    }

    /// The next complete message, if any.
    pub fn pop(&mut self) -> Option<RawMessage> {
        self.ready.pop_front()
    }

    /// Ends the body: checks it was complete and returns the envelope
    /// header and every message not yet popped.
    pub fn finish(self) -> Result<RawEnvelope, DecodeError> {
        match self.scanner.state {
            State::Epilogue => {}
            State::Preamble => return Err(DecodeError::NoFirstBoundary),
            _ => return Err(DecodeError::Unterminated),
        }
        if let Some((h, _, _)) = self.pending {
            return Err(DecodeError::HeaderWithoutContent(h.id));
        }
        let meta = self.meta.ok_or(DecodeError::MissingRoot)?;
        Ok(RawEnvelope {
            meta,
            messages: self.ready.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_envelope;
    use crate::model::Envelope;
    use crate::samples;

    fn decoder(enc: &super::super::Encoded, limits: Limits) -> StreamDecoder {
        StreamDecoder::new(&enc.content_type, limits).unwrap()
    }

    /// The queue of decoded messages grows by what the bytes in hand hold:
    /// about once, to about the number of messages, for a whole body; little
    /// for a body fed in chunks and read as it comes; never past the message
    /// limit, even when a small first message makes the rest look many.
    #[test]
    fn the_message_queue_grows_by_the_bytes_in_hand_within_the_limit() {
        let enc = encode_envelope(&samples::bench_envelope());
        let mut d = decoder(&enc, Limits::default());
        d.push_bytes(enc.body.clone()).unwrap();
        assert_eq!(d.ready.len(), 100);
        assert!(d.ready.capacity() < 125, "{}", d.ready.capacity());

        let mut d = decoder(&enc, Limits::default());
        let mut n = 0;
        for chunk in enc.body.chunks(4096) {
            d.push(chunk).unwrap();
            while d.pop().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 100);
        assert!(d.ready.capacity() <= 8, "{}", d.ready.capacity());

        let mut messages = vec![samples::alarm_of_size(0, 600)];
        messages.extend((1..10).map(|i| samples::alarm_of_size(i, 64 * 1024)));
        let enc = encode_envelope(&Envelope {
            meta: samples::request_meta("acme.p1"),
            messages,
        });
        let limits = Limits {
            max_messages: 10,
            ..Limits::default()
        };
        let mut d = decoder(&enc, limits);
        d.push_bytes(enc.body.clone()).unwrap();
        assert_eq!(d.ready.len(), 10);
        assert!(d.ready.capacity() <= 10, "{}", d.ready.capacity());
    }
}
