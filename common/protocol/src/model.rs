//! The domain model of the protocol: messages, their headers and contents,
//! envelopes. This is what the rest of the code sees; the XML and MIME forms
//! live privately in [`crate::codec`].

use std::time::Duration;

use bytes::Bytes;
use compact_str::CompactString;
use smallvec::SmallVec;

use crate::ids::{MessageId, RsId};
use crate::outcome::{Outcome, Reason};
use crate::time::Timestamp;

/// Highest precedence; 0 is the lowest and 5 the default.
pub const MAX_PRECEDENCE: u8 = 9;
/// Precedence of a message whose sender did not choose one.
pub const DEFAULT_PRECEDENCE: u8 = 5;

/// Data classification: routes a message to interested service modules.
///
/// Both parts are tokens of 1 to 64 bytes of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Classification {
    pub class: CompactString,
    pub subclass: CompactString,
}

impl Classification {
    pub fn new(class: impl AsRef<str>, subclass: impl AsRef<str>) -> Self {
        Classification {
            class: CompactString::new(class),
            subclass: CompactString::new(subclass),
        }
    }
}

/// Quality of service of a forward message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos {
    /// After this instant the message is worthless and is dropped, with a
    /// record of why, wherever it is.
    pub expiry: Option<Timestamp>,
    /// 0 (lowest) to 9 (highest); higher goes first.
    pub precedence: u8,
    /// A persistent message is kept at the expense of non-persistent ones of
    /// equal precedence when a spool is under pressure.
    pub persistent: bool,
}

impl Default for Qos {
    fn default() -> Self {
        Qos {
            expiry: None,
            precedence: DEFAULT_PRECEDENCE,
            persistent: true,
        }
    }
}

/// Where a forward message originated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The component that created the message (a proxy, support instance,
    /// integrator or MLM).
    pub component: RsId,
    /// Software version of the originating component.
    pub version: CompactString,
    pub qos: Qos,
}

/// The locator of a message: a source route (forward, up the tiers) or a
/// destination route (back-channel, down the tiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Source(Source),
    /// Final destinations, already expanded from any group; at least one.
    Destination(Destination),
}

/// Where a back-channel message goes, and until when it is worth
/// delivering: every tier drops it (and says so) once `expiry` passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Final destinations, already expanded from any group; at least one.
    pub to: Vec<RsId>,
    pub expiry: Option<Timestamp>,
}

impl Destination {
    pub fn new(to: Vec<RsId>, expiry: Option<Timestamp>) -> Self {
        Destination { to, expiry }
    }
}

/// One routing element, appended by every tier that routes the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub component: RsId,
    pub received: Timestamp,
    /// When the tier sent it on; absent while the tier still holds it.
    pub sent: Option<Timestamp>,
}

/// The routing elements of a header, oldest first. Two are held inline (a
/// message from a proxy reaches the application server through one MLM),
/// so reading a header allocates nothing for them.
pub type Hops = SmallVec<[Hop; 2]>;

/// The header of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub id: MessageId,
    pub created: Timestamp,
    pub class: Classification,
    pub route: Route,
    pub routing: Hops,
}

impl Header {
    /// The source, for forward messages.
    pub fn source(&self) -> Option<&Source> {
        match &self.route {
            Route::Source(s) => Some(s),
            Route::Destination(_) => None,
        }
    }

    /// The destinations, for back-channel messages.
    pub fn destinations(&self) -> &[RsId] {
        match &self.route {
            Route::Source(_) => &[],
            Route::Destination(d) => &d.to,
        }
    }

    /// The expiry: the QoS expiry going up, the destination's going down.
    pub fn expiry(&self) -> Option<Timestamp> {
        match &self.route {
            Route::Source(s) => s.qos.expiry,
            Route::Destination(d) => d.expiry,
        }
    }

    /// True when the expiry (if any) is at or before `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expiry().is_some_and(|e| e <= now)
    }

    /// The copy of this back-channel header that goes to one next hop: it
    /// lists `dests`, the destinations behind that hop (the expiry kept),
    /// and carries the hop of `me`, which received and sends it `now`.
    /// How the server and every MLM on the way split a message by next hop.
    pub fn copy_for_hop(&self, dests: Vec<RsId>, me: &RsId, now: Timestamp) -> Header {
        let mut h = self.clone();
        h.route = Route::Destination(Destination::new(dests, self.expiry()));
        h.routing.push(Hop {
            component: me.clone(),
            received: now,
            sent: Some(now),
        });
        h
    }
}

/// The six content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentKind {
    Alarm,
    Event,
    Response,
    BulkRequest,
    BulkResponse,
    Data,
}

impl ContentKind {
    pub const ALL: [ContentKind; 6] = [
        ContentKind::Alarm,
        ContentKind::Event,
        ContentKind::Response,
        ContentKind::BulkRequest,
        ContentKind::BulkResponse,
        ContentKind::Data,
    ];

    /// The wire name (header `type` attribute and content root element).
    pub fn as_str(self) -> &'static str {
        match self {
            ContentKind::Alarm => "alarm",
            ContentKind::Event => "event",
            ContentKind::Response => "response",
            ContentKind::BulkRequest => "bulk-request",
            ContentKind::BulkResponse => "bulk-response",
            ContentKind::Data => "data",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ContentKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Alarm and event severity, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    Critical,
    Major,
    Minor,
    Warning,
    Info,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Critical,
        Severity::Major,
        Severity::Minor,
        Severity::Warning,
        Severity::Info,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Severity::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// True when `self` is at least as severe as `other`.
    pub fn at_least(self, other: Severity) -> bool {
        self <= other
    }
}

/// The state of an alarm; events have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlarmState {
    Raised,
    Updated,
    Cleared,
}

impl AlarmState {
    pub const ALL: [AlarmState; 3] = [AlarmState::Raised, AlarmState::Updated, AlarmState::Cleared];

    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Raised => "raised",
            AlarmState::Updated => "updated",
            AlarmState::Cleared => "cleared",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        AlarmState::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Integrator-specific data: a named value (name is a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detail {
    pub name: String,
    pub value: String,
}

impl Detail {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Detail {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// A systems-management alarm from a support instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    pub severity: Severity,
    pub state: AlarmState,
    /// The support instance the alarm is about.
    pub instance: Option<RsId>,
    /// The integrator's key for this alarm, so updates and clears correlate.
    pub key: Option<String>,
    pub text: String,
    pub details: Vec<Detail>,
}

/// A systems-management event: a notification of a change, with no state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub severity: Severity,
    pub instance: Option<RsId>,
    /// What kind of event (a token, e.g. `service.restart`).
    pub kind: Option<String>,
    pub text: String,
    pub details: Vec<Detail>,
}

/// A result payload carried by a message response (e.g. a status tree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultPayload {
    pub mime: String,
    pub text: String,
}

/// The response to a message: the outcome of processing it at its final
/// destination (e.g. a control action applied at a proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The message this responds to.
    pub reference: MessageId,
    pub outcome: Outcome,
    pub details: Vec<Detail>,
    pub result: Option<ResultPayload>,
}

/// Direction of a bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a customer site up to the application server.
    Upload,
    /// From the application server down to components.
    Download,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "upload" => Some(Direction::Upload),
            "download" => Some(Direction::Download),
            _ => None,
        }
    }
}

/// A request for (upload) or an offer of (download) an out-of-band transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkRequest {
    pub direction: Direction,
    /// File name (no path separators).
    pub name: String,
    pub size: u64,
    pub sha256: [u8; 32],
    /// Classification of the bulk data itself.
    pub class: Classification,
    /// Download offers: where to fetch it.
    pub url: Option<String>,
    /// Download offers: when the URL stops working.
    pub expires: Option<Timestamp>,
}

/// The answer to a bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkResponse {
    /// The message ID of the bulk request.
    pub request: MessageId,
    pub grant: Grant,
}

/// Whether a bulk transfer was authorised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Upload here, once, before `expires`.
    Granted { url: String, expires: Timestamp },
    /// Not authorised; `retry_after` says when asking again may succeed.
    Refused {
        reason: Reason,
        retry_after: Option<Duration>,
    },
}

/// How a content part's bytes are written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TransferEncoding {
    /// Raw bytes (`Content-Transfer-Encoding: binary`).
    #[default]
    Binary,
    /// Base64 without line breaks.
    Base64,
}

impl TransferEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferEncoding::Binary => "binary",
            TransferEncoding::Base64 => "base64",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("binary")
            || s.eq_ignore_ascii_case("8bit")
            || s.eq_ignore_ascii_case("7bit")
        {
            Some(TransferEncoding::Binary)
        } else if s.eq_ignore_ascii_case("base64") {
            Some(TransferEncoding::Base64)
        } else {
            None
        }
    }
}

/// Generic data, described by class/subclass in the header; binary allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// MIME type of the bytes, e.g. `text/xml` or `application/octet-stream`.
    pub mime: String,
    /// How the sender asked for the bytes to travel.
    pub encoding: TransferEncoding,
    pub bytes: Bytes,
}

/// The content of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Alarm(Alarm),
    Event(Event),
    Response(Response),
    BulkRequest(BulkRequest),
    BulkResponse(BulkResponse),
    Data(Data),
}

impl Content {
    pub fn kind(&self) -> ContentKind {
        match self {
            Content::Alarm(_) => ContentKind::Alarm,
            Content::Event(_) => ContentKind::Event,
            Content::Response(_) => ContentKind::Response,
            Content::BulkRequest(_) => ContentKind::BulkRequest,
            Content::BulkResponse(_) => ContentKind::BulkResponse,
            Content::Data(_) => ContentKind::Data,
        }
    }
}

/// A message: one header and one content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub content: Content,
}

/// Advice a tier gives the tier below in its reply, so settings cannot drift
/// apart and a saturated tier can pace its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Advice {
    /// How often the caller should send a heartbeat.
    pub heartbeat: Option<Duration>,
    /// The longest the tier will hold a long-poll reply.
    pub poll_hold: Option<Duration>,
    /// The most messages the caller should put in its next envelope.
    pub max_messages: Option<u32>,
    /// The most bytes the caller should put in its next envelope.
    pub max_bytes: Option<u64>,
    /// The caller should not POST again (except to collect its
    /// back-channel) before this much time has passed.
    pub resume_after: Option<Duration>,
}

/// The envelope header: what concerns a whole POST or reply rather than
/// one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeMeta {
    /// The component that wrote the envelope.
    pub sender: RsId,
    pub created: Timestamp,
    /// Request only: hold the reply up to this long if there is nothing to
    /// send back (long poll).
    pub poll: Option<Duration>,
    /// Back-channel message IDs the sender has received (and may forget).
    pub acks: Vec<MessageId>,
    /// Request only: back-channel messages the sender's subtree delivered
    /// to a final destination (it acknowledged the message), as (message,
    /// destination). Informational: it moves the job to `delivered`.
    pub delivered: Vec<(MessageId, RsId)>,
    /// Reply only: the outcome of each message of the request.
    pub outcomes: Vec<(MessageId, Outcome)>,
    /// Reply only.
    pub advice: Option<Advice>,
}

impl EnvelopeMeta {
    pub fn new(sender: RsId, created: Timestamp) -> Self {
        EnvelopeMeta {
            sender,
            created,
            poll: None,
            acks: Vec::new(),
            delivered: Vec::new(),
            outcomes: Vec::new(),
            advice: None,
        }
    }
}

/// One POST body or one reply body: the envelope header and any number of
/// messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub meta: EnvelopeMeta,
    pub messages: Vec<Message>,
}
