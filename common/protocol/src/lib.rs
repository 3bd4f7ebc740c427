//! The Remote Services protocol, shared by every tier: IDs, the domain model
//! of messages and envelopes, the delivery outcome, the control actions and
//! the status tree, and the wire codec (XML documents in a
//! `multipart/related` envelope).
//!
//! This crate does no I/O: no sockets, no files, no database. The storage
//! (`rs-store`), the network layer (`rs-net`) and the node (`rs-node`) are
//! built on it; the fuzz targets link it alone.
//!
//! The codec never does IO and never panics on input; see `docs/protocol.md`
//! for the wire format it implements and `dtd/` for the documents.

pub mod codec;
pub mod control;
pub mod control_messages;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod model;
pub mod outcome;
pub mod samples;
pub mod throttle;
pub mod time;

pub use codec::{
    DecodeError, Encoded, EnvelopeWriter, Limits, RawEnvelope, RawMessage, Seal, StreamDecoder,
    decode_envelope, decode_headers, encode_envelope,
};
pub use ids::{ComponentKind, CustomerId, MessageId, RsId};
pub use model::*;
pub use outcome::{Code, Outcome, Reason};
pub use time::{Clock, SystemClock, Timestamp};
