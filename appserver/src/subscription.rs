//! What a subscription is: which stored messages, delivered how. Kept apart
//! from the collector that serves subscriptions so the modules that declare
//! them and the control API that manages them need not reach into it.

use rs_protocol::model::Severity;

pub use rs_protocol::codec::api::Delivery;

/// A subscription: which stored messages, and how they are delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: i64,
    pub name: String,
    pub class: Option<String>,
    pub subclass: Option<String>,
    pub customer: Option<String>,
    /// The source component, or anything allocated under it.
    pub source: Option<String>,
    pub kind: Option<String>,
    /// Alarms and events at least this severe.
    pub min_severity: Option<Severity>,
    pub delivery: Delivery,
    /// It takes messages stored after this one (storage order): those
    /// stored after it was made.
    pub from_seq: i64,
}
