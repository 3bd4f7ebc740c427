//! A tier's one way up: every POST to the next hop (the sender draining
//! the spool, its long poll, an MLM relaying an envelope while the caller
//! waits) goes through one [`Uplink`], which puts into each envelope the
//! acknowledgements and delivery notices that are due and takes the
//! back-channel messages the replies bring.
//!
//! Acknowledgements (back-channel messages this tier has made durable or
//! applied) and delivery notices (copies its subtree acknowledged) are
//! kept in one [`Notices`] per daemon, so whichever POST goes next carries
//! them, and a POST that fails hands them back for the one after.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rs_protocol::codec::{Encoded, EnvelopeWriter, RawEnvelope, RawMessage};
use rs_protocol::ids::{MessageId, RsId};
use rs_protocol::model::EnvelopeMeta;
use rs_protocol::outcome::Outcome;
use rs_protocol::time::Timestamp;

use crate::upstream::{PostError, Upstream};

/// A delivery notice: message `0` was delivered to destination `1`.
pub type Delivered = (MessageId, RsId);

/// Takes the back-channel messages a reply carried; returns the IDs it has
/// made durable or applied, which go up as acknowledgements with the next
/// POST.
pub trait BackChannel: Send + Sync + 'static {
    fn receive(
        &self,
        msgs: Vec<RawMessage>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<MessageId>> + Send + '_>>;

    /// A POST carried these delivery notices to the upstream (which has
    /// them now): a tier that also records them durably forgets them.
    fn delivered_sent(&self, _notices: Vec<Delivered>) {}
}

/// What the next POST upstream carries besides messages.
#[derive(Debug, Default)]
pub struct Notices {
    acks: Mutex<Vec<MessageId>>,
    delivered: Mutex<Vec<Delivered>>,
}

impl Notices {
    /// Back-channel messages to acknowledge upstream.
    pub fn ack(&self, ids: impl IntoIterator<Item = MessageId>) {
        if let Ok(mut a) = self.acks.lock() {
            a.extend(ids);
        }
    }

    /// Deliveries in the subtree to report upstream.
    pub fn deliver(&self, notices: impl IntoIterator<Item = Delivered>) {
        if let Ok(mut d) = self.delivered.lock() {
            d.extend(notices);
        }
    }

    /// Like [`Notices::deliver`], leaving out those already waiting;
    /// returns how many were new.
    pub fn deliver_unheld(&self, notices: Vec<Delivered>) -> usize {
        let Ok(mut d) = self.delivered.lock() else {
            return 0;
        };
        let held: std::collections::HashSet<&Delivered> = d.iter().collect();
        let new: Vec<Delivered> = notices.into_iter().filter(|n| !held.contains(n)).collect();
        let n = new.len();
        d.extend(new);
        n
    }

    fn take(&self) -> (Vec<MessageId>, Vec<Delivered>) {
        let acks = self
            .acks
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default();
        let delivered = self
            .delivered
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        (acks, delivered)
    }
}

/// An envelope built for the next hop, with the notices it carries (handed
/// back if it is not sent).
#[derive(Debug)]
pub struct Outgoing {
    pub enc: Encoded,
    acks: Vec<MessageId>,
    delivered: Vec<Delivered>,
}

/// The next hop, and what goes up and comes down with every POST to it.
pub struct Uplink {
    me: RsId,
    upstream: Arc<Upstream>,
    back: Option<Arc<dyn BackChannel>>,
    notices: Notices,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("me", &self.me)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Uplink {
    /// `back`: where back-channel messages from the replies go (`None`
    /// ignores them).
    pub fn new(me: RsId, upstream: Arc<Upstream>, back: Option<Arc<dyn BackChannel>>) -> Self {
        Uplink {
            me,
            upstream,
            back,
            notices: Notices::default(),
        }
    }

    pub fn me(&self) -> &RsId {
        &self.me
    }

    /// The HTTP side (URLs, failover, the client).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// What the next POST carries besides messages.
    pub fn notices(&self) -> &Notices {
        &self.notices
    }

    /// Builds an envelope sent `now`: the notices due go into its header,
    /// `write` puts the messages in. `poll`: a long poll, asking the
    /// upstream to hold the reply this long.
    pub fn envelope<T>(
        &self,
        now: Timestamp,
        poll: Option<Duration>,
        write: impl FnOnce(&mut EnvelopeWriter) -> T,
    ) -> (Outgoing, T) {
        let mut meta = EnvelopeMeta::new(self.me.clone(), now);
        (meta.acks, meta.delivered) = self.notices.take();
        meta.poll = poll;
        let mut w = EnvelopeWriter::new(&meta);
        let t = write(&mut w);
        let out = Outgoing {
            enc: w.finish(),
            acks: meta.acks,
            delivered: meta.delivered,
        };
        (out, t)
    }

    /// POSTs an envelope built by [`Uplink::envelope`] (`hold`: its long
    /// poll's hold). Its notices are forgotten once the upstream has them
    /// and kept for the next POST otherwise. The reply's back-channel
    /// messages are the caller's to pass to [`Uplink::receive`].
    pub async fn send(
        &self,
        out: Outgoing,
        hold: Option<Duration>,
    ) -> Result<RawEnvelope, PostError> {
        let r = self.upstream.post(&out.enc, hold).await;
        match &r {
            Ok(_) => {
                if let Some(b) = &self.back
                    && !out.delivered.is_empty()
                {
                    b.delivered_sent(out.delivered);
                }
            }
            Err(_) => {
                self.notices.ack(out.acks);
                self.notices.deliver(out.delivered);
            }
        }
        r
    }

    /// Takes the back-channel messages a reply brought; what the back
    /// channel made safe is acknowledged with the next POST.
    pub async fn receive(&self, msgs: Vec<RawMessage>) {
        if let Some(b) = &self.back
            && !msgs.is_empty()
        {
            let ids = b.receive(msgs).await;
            self.notices.ack(ids);
        }
    }
}

impl PostError {
    /// What a message that went in a failed POST is answered, relayed
    /// while its sender waits: refused where the upstream refused the
    /// envelope as it was, retry otherwise.
    pub fn outcome(&self) -> Outcome {
        match self {
            PostError::Refused { text, .. } => {
                Outcome::rejected("invalid", format!("refused by the next hop: {text}"))
            }
            PostError::TooLarge { text, .. } => {
                Outcome::rejected("too-large", format!("refused by the next hop: {text}"))
            }
            PostError::Busy { retry_after, .. } => Outcome::retry(
                retry_after.unwrap_or(Duration::from_secs(5)),
                "overloaded",
                "the next hop is busy",
            ),
            other => Outcome::retry(
                Duration::from_secs(5),
                "unavailable",
                format!("the next hop is unavailable: {other}"),
            ),
        }
    }
}
