//! The wire codec: envelopes as `multipart/related` bodies of XML (and raw
//! data) parts. Pure: no IO, no panics on input, every size bounded.
//!
//! Three ways in:
//! - [`decode_envelope`]: a whole body, fully decoded into the model;
//! - [`decode_headers`]: a whole body, headers decoded, contents left as
//!   raw bytes, so a forwarder routes without parsing contents;
//! - [`StreamDecoder`]: the same, fed chunk by chunk as a body arrives,
//!   holding at most one part in memory.
//!
//! And out: [`EnvelopeWriter`] (or [`encode_envelope`]) writes the root part
//! and then messages, decoded ([`Message`]) or raw ([`RawMessage`]).

pub mod api;
mod content;
mod control;
mod header;
mod meta;
mod mime;
pub(crate) mod xml;

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

pub use self::api::{SendRequest as ControlSendRequest, decode_send_request};
pub use self::content::{parse_sha256, sha256_hex};
pub use self::control::{
    ControlError, decode_control, decode_status, encode_control, encode_status,
};
pub use self::header::{is_mime_type, is_token};
pub use self::mime::{EnvelopeWriter, StreamDecoder};
pub use self::xml::{XmlOut, first_illegal_char};
use crate::ids::MessageId;
use crate::model::{ContentKind, Envelope, EnvelopeMeta, Header, Message, TransferEncoding};

/// The media type of every envelope.
pub const ENVELOPE_MEDIA_TYPE: &str = "multipart/related";
/// Content-ID of the envelope's root part.
pub const ROOT_CONTENT_ID: &str = "<envelope@rs>";

/// Bounds on everything a decoder accepts. Every field has a safe default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Whole body, bytes.
    pub max_envelope_bytes: usize,
    /// Messages per envelope.
    pub max_messages: usize,
    /// One part's body, bytes (short messages only; bulk travels out of band).
    pub max_part_bytes: usize,
    /// One part's MIME headers, bytes.
    pub max_part_header_bytes: usize,
    /// Preamble and epilogue, bytes each.
    pub max_preamble_bytes: usize,
    /// XML element nesting.
    pub max_xml_depth: usize,
    /// Elements in one XML document.
    pub max_elements: usize,
    /// One attribute value, bytes.
    pub max_attr_bytes: usize,
    /// One element's text, bytes.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_envelope_bytes: 32 << 20,
            max_messages: 5_000,
            max_part_bytes: 4 << 20,
            max_part_header_bytes: 2048,
            max_preamble_bytes: 4096,
            max_xml_depth: 32,
            max_elements: 20_000,
            max_attr_bytes: 8192,
            max_text_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// Parts an envelope may have: the root and two per message.
    pub fn max_parts(&self) -> usize {
        self.max_messages.saturating_mul(2).saturating_add(1)
    }
}

/// Names a part in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartRef {
    /// The n-th part (from 1), before its Content-ID is known.
    Index(usize),
    /// The envelope header (root part).
    Root,
    /// A message's header part.
    Header(MessageId),
    /// A message's content part.
    Content(MessageId),
}

impl fmt::Display for PartRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartRef::Index(n) => write!(f, "part {n}"),
            PartRef::Root => f.write_str("envelope header"),
            PartRef::Header(id) => write!(f, "header of message {id}"),
            PartRef::Content(id) => write!(f, "content of message {id}"),
        }
    }
}

/// Why an XML document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("invalid UTF-8 at byte {offset}")]
    InvalidUtf8 { offset: usize },
    #[error("character not allowed in XML at byte {offset}")]
    IllegalChar { offset: usize },
    #[error("DOCTYPE is not allowed (no DTD, entity or external reference is ever processed)")]
    Doctype,
    #[error("malformed XML: {0}")]
    Syntax(String),
    #[error("unknown entity &{0}; (only the five predefined entities are allowed)")]
    UnknownEntity(String),
    #[error("invalid character reference &{0};")]
    BadCharRef(String),
    #[error("nesting deeper than {limit}")]
    TooDeep { limit: usize },
    #[error("more than {limit} elements")]
    TooManyElements { limit: usize },
    #[error("attribute {attr} of <{element}> longer than {limit} bytes")]
    AttrTooLong {
        element: String,
        attr: String,
        limit: usize,
    },
    #[error("text of <{element}> longer than {limit} bytes")]
    TextTooLong { element: String, limit: usize },
    #[error("root element <{found}>, expected <{expected}>")]
    UnexpectedRoot {
        found: String,
        expected: &'static str,
    },
    #[error("element <{element}> not allowed in <{parent}>")]
    UnexpectedElement { element: String, parent: String },
    #[error("<{element}> lacks required attribute {attr}")]
    MissingAttr { element: String, attr: &'static str },
    #[error("attribute {attr} of <{element}>: {reason}")]
    BadAttr {
        element: String,
        attr: &'static str,
        reason: String,
    },
    #[error("<{element}> is missing required child <{child}>")]
    MissingElement {
        element: String,
        child: &'static str,
    },
    #[error("<{element}> may appear only once")]
    Repeated { element: String },
    #[error("unknown content type {0:?}")]
    UnknownContentType(String),
    #[error("{0}")]
    Invalid(String),
}

/// Why an envelope was refused. Each names the part and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("content type {0:?} is not multipart/related with a valid boundary")]
    ContentType(String),
    #[error("envelope larger than {limit} bytes")]
    EnvelopeTooLarge { limit: usize },
    #[error("{part}: larger than {limit} bytes")]
    PartTooLarge { part: PartRef, limit: usize },
    #[error("more than {limit} messages in one envelope")]
    TooManyMessages { limit: usize },
    #[error("preamble or epilogue longer than {limit} bytes")]
    PreambleTooLarge { limit: usize },
    #[error("the body ended before the closing boundary")]
    Unterminated,
    #[error("no boundary found where the first part should start")]
    NoFirstBoundary,
    #[error("{part}: malformed part headers: {reason}")]
    PartHeaders { part: PartRef, reason: String },
    #[error("{part}: missing Content-ID")]
    MissingContentId { part: PartRef },
    #[error(
        "{part}: Content-ID {value:?} names neither the envelope header nor a message header or content"
    )]
    BadContentId { part: PartRef, value: String },
    #[error("the first part must be the envelope header ({ROOT_CONTENT_ID})")]
    MissingRoot,
    #[error("{part}: appears more than once")]
    DuplicatePart { part: PartRef },
    #[error("message {0} has a header part but no content part after it")]
    HeaderWithoutContent(MessageId),
    #[error("message {0} has a content part with no header part before it")]
    ContentWithoutHeader(MessageId),
    #[error("{part}: unsupported Content-Transfer-Encoding {value:?} (binary, 8bit, 7bit, base64)")]
    TransferEncoding { part: PartRef, value: String },
    #[error("{part}: invalid base64: {reason}")]
    Base64 { part: PartRef, reason: String },
    #[error("{part}: {error}")]
    Xml { part: PartRef, error: XmlError },
    #[error("header of message {id}: unknown content type {value:?}")]
    UnknownContentType { id: MessageId, value: String },
    #[error("content of message {id}: {reason}")]
    ContentMismatch { id: MessageId, reason: String },
    #[error("content of message {id} is sealed ({seal}); the application server opens it")]
    Sealed { id: MessageId, seal: &'static str },
}

/// How a message's content is sealed (`docs/protocol.md` §7.7): signed by
/// the component that made it, or signed and then encrypted to the
/// application server. Tiers in between pass sealed contents on untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seal {
    Signed,
    Encrypted,
}

impl Seal {
    /// The content part's `Content-Type` for this seal.
    pub fn content_type(self) -> &'static str {
        match self {
            Seal::Signed => "application/pkcs7-mime; smime-type=signed-data",
            Seal::Encrypted => "application/pkcs7-mime; smime-type=enveloped-data",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Seal::Signed => "signed",
            Seal::Encrypted => "encrypted",
        }
    }

    pub fn parse(s: &str) -> Option<Seal> {
        match s {
            "signed" => Some(Seal::Signed),
            "encrypted" => Some(Seal::Encrypted),
            _ => None,
        }
    }

    /// The seal a content part's `Content-Type` names: `Ok(None)` for any
    /// other media type, `Err` for `application/pkcs7-mime` without a
    /// `smime-type` this protocol knows.
    pub fn of_content_type(ct: &str) -> Result<Option<Seal>, String> {
        let base = ct.split(';').next().unwrap_or("").trim();
        if !base.eq_ignore_ascii_case("application/pkcs7-mime") {
            return Ok(None);
        }
        let smime = ct.split(';').skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("smime-type")
                .then(|| v.trim().trim_matches('"').to_ascii_lowercase())
        });
        match smime.as_deref() {
            Some("signed-data") => Ok(Some(Seal::Signed)),
            Some("enveloped-data") => Ok(Some(Seal::Encrypted)),
            Some(other) => Err(format!(
                "smime-type {other:?} is neither signed-data nor enveloped-data"
            )),
            None => Err("application/pkcs7-mime without smime-type".into()),
        }
    }
}

/// A message whose content has not been parsed: what a forwarder handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub header: Header,
    /// The content type named by the header.
    pub kind: ContentKind,
    /// For data messages: the MIME type, declared size and encoding.
    pub data: Option<DataInfo>,
    /// The content part's `Content-Type` (borrowed when it is the XML part
    /// type this codec writes, which nearly every message has).
    pub content_type: Cow<'static, str>,
    /// The content part's body: for data messages exactly as on the wire
    /// (see [`DataInfo::encoding`]); for the others the XML document; for a
    /// sealed message (see [`RawMessage::seal`]) the DER of the seal.
    pub content: Bytes,
}

/// The `data` element of a data message's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataInfo {
    pub mime: String,
    /// Size of the data after transfer decoding.
    pub size: u64,
    /// How the content part is encoded on the wire.
    pub encoding: TransferEncoding,
}

impl RawMessage {
    /// Parses the content, completing the message. A sealed content is
    /// refused ([`DecodeError::Sealed`]): only the application server can
    /// open it.
    pub fn decode(self, limits: &Limits) -> Result<Message, DecodeError> {
        if let Some(seal) = self.seal() {
            return Err(DecodeError::Sealed {
                id: self.header.id,
                seal: seal.as_str(),
            });
        }
        content::decode(self, limits)
    }

    /// The content's seal, if it is sealed (the decoder accepts only the
    /// two `smime-type`s, so anything else here is unsealed).
    pub fn seal(&self) -> Option<Seal> {
        Seal::of_content_type(&self.content_type).ok().flatten()
    }

    /// Bytes this message takes in an envelope, roughly (for batching).
    pub fn wire_len(&self) -> usize {
        self.content.len() + 512 + 96 * self.header.routing.len()
    }
}

impl Message {
    /// Encodes the content, so the message can be forwarded as raw.
    pub fn to_raw(&self) -> RawMessage {
        content::encode_raw(self)
    }
}

/// An envelope whose message contents are still raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEnvelope {
    pub meta: EnvelopeMeta,
    pub messages: Vec<RawMessage>,
}

/// An encoded envelope: the `Content-Type` header value and the body.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub content_type: String,
    pub body: Bytes,
}

/// Decodes a whole body into the model.
pub fn decode_envelope(
    content_type: &str,
    body: Bytes,
    limits: &Limits,
) -> Result<Envelope, DecodeError> {
    let raw = decode_headers(content_type, body, limits)?;
    let messages = raw
        .messages
        .into_iter()
        .map(|m| m.decode(limits))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Envelope {
        meta: raw.meta,
        messages,
    })
}

/// Decodes a whole body's envelope header and message headers, leaving
/// contents raw and unparsed.
pub fn decode_headers(
    content_type: &str,
    body: Bytes,
    limits: &Limits,
) -> Result<RawEnvelope, DecodeError> {
    if body.len() > limits.max_envelope_bytes {
        return Err(DecodeError::EnvelopeTooLarge {
            limit: limits.max_envelope_bytes,
        });
    }
    let mut dec = StreamDecoder::new(content_type, limits.clone())?;
    dec.push_bytes(body)?;
    dec.finish()
}

/// Encodes a whole envelope.
pub fn encode_envelope(env: &Envelope) -> Encoded {
    let mut w = EnvelopeWriter::new(&env.meta);
    for m in &env.messages {
        w.push(m);
    }
    w.finish()
}

/// Encodes the envelope header alone, as the root part's body.
pub fn encode_meta(meta: &EnvelopeMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    meta::encode(meta, &mut v);
    v
}

/// Encodes a message header alone, as a header part's body.
pub fn encode_header(header: &Header, kind: ContentKind, data: Option<&DataInfo>) -> Vec<u8> {
    let mut v = Vec::with_capacity(512);
    header::encode(header, kind, data, &mut v);
    v
}

/// Decodes a header part's body (for tools and tests; envelopes use the
/// decoders above).
pub fn decode_header_part(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(Header, ContentKind, Option<DataInfo>), XmlError> {
    header::decode(bytes, limits)
}

/// A header part's body read by both header parsers: the fast path for
/// the layout this codec writes (`None` when it declines) and the general
/// parser (for `fuzzing`, which checks they agree).
pub(crate) fn decode_header_both(
    bytes: &[u8],
    limits: &Limits,
) -> (Option<header::Decoded>, Result<header::Decoded, XmlError>) {
    (
        header::canonical(bytes, limits),
        header::general(bytes, limits),
    )
}

/// Decodes an envelope-header part's body (for tools, tests and fuzzing).
pub fn decode_meta_part(bytes: &[u8], limits: &Limits) -> Result<EnvelopeMeta, XmlError> {
    meta::decode(bytes, limits)
}

/// Decodes an XML content part's body of the given kind (for tools, tests
/// and fuzzing). Data contents are not XML and are refused.
pub fn decode_content_part(
    kind: ContentKind,
    bytes: &[u8],
    limits: &Limits,
) -> Result<crate::model::Content, XmlError> {
    content::parse_xml(kind, bytes, limits)
}
