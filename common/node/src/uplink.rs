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

use rs_protocol::codec::{Encoded, EnvelopeWriter, RawMessage};
use rs_protocol::ids::{MessageId, RsId};
use rs_protocol::model::EnvelopeMeta;
use rs_protocol::outcome::Outcome;
use rs_protocol::time::Timestamp;

use crate::routes::Class;
use crate::upstream::{PostError, Reply, Upstream};

/// A delivery notice: message `0` was delivered to destination `1`.
pub type Delivered = (MessageId, RsId);

/// Takes the back-channel messages a reply carried; returns the IDs it has
/// made durable or applied, which go up as acknowledgements with the next
/// POST.
pub trait BackChannel: Send + Sync + 'static {
    /// `via`: where the messages came from, for the bulk URLs they name
    /// ([`Uplink::bulk_url`]).
    fn receive(
        &self,
        msgs: Vec<RawMessage>,
        via: Via,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<MessageId>> + Send + '_>>;

    /// A POST carried these delivery notices to the upstream (which has
    /// them now): a tier that also records them durably forgets them.
    fn delivered_sent(&self, _notices: Vec<Delivered>) {}
}

/// Where back-channel messages came from: the route (index into the
/// upstream URLs) whose reply brought them, and what a bulk URL they name
/// is relative to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub route: usize,
    /// The route's URL, unless `bulk_urls` names routes (then they lead
    /// to the same MLM or farm, and a path stays a path, joined to the
    /// bulk route when fetched: [`Uplink::bulk_url`]).
    base: Option<String>,
}

impl Via {
    /// The URL to keep for a bulk URL in a download offer: a path on the
    /// next hop joined to the route it came down (the MLM that published
    /// the file there), or kept as a path (see [`Via::base`]).
    pub fn offered_url(&self, url: &str) -> String {
        match &self.base {
            Some(base) => rs_net::bulk::resolve(base, url),
            None => url.to_owned(),
        }
    }
}

/// What the next POST upstream carries besides messages.
///
/// An acknowledgement goes back on the route its message came down
/// (an MLM of a route that is not a farm's knows only its own queue);
/// one whose route is unknown, and every delivery notice, on any route.
#[derive(Debug, Default)]
pub struct Notices {
    acks: Mutex<Vec<(Option<usize>, MessageId)>>,
    delivered: Mutex<Vec<Delivered>>,
}

impl Notices {
    /// Back-channel messages to acknowledge upstream, on any route.
    pub fn ack(&self, ids: impl IntoIterator<Item = MessageId>) {
        self.ack_on(None, ids);
    }

    /// Back-channel messages that came down route `route` (`None`: any)
    /// to acknowledge on it.
    pub fn ack_on(&self, route: Option<usize>, ids: impl IntoIterator<Item = MessageId>) {
        if let Ok(mut a) = self.acks.lock() {
            a.extend(ids.into_iter().map(|id| (route, id)));
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

    /// What a POST on `route` carries.
    fn take(&self, route: usize) -> (Vec<(Option<usize>, MessageId)>, Vec<Delivered>) {
        let acks = self
            .acks
            .lock()
            .map(|mut a| {
                let (mine, others) = std::mem::take(&mut *a)
                    .into_iter()
                    .partition(|(r, _)| r.is_none_or(|r| r == route));
                *a = others;
                mine
            })
            .unwrap_or_default();
        let delivered = self
            .delivered
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        (acks, delivered)
    }

    fn give_back(&self, acks: Vec<(Option<usize>, MessageId)>, delivered: Vec<Delivered>) {
        if let Ok(mut a) = self.acks.lock() {
            a.extend(acks);
        }
        self.deliver(delivered);
    }
}

/// An envelope built for the next hop, with the notices it carries (handed
/// back if it is not sent) and the route it goes on first.
#[derive(Debug)]
pub struct Outgoing {
    pub enc: Encoded,
    acks: Vec<(Option<usize>, MessageId)>,
    delivered: Vec<Delivered>,
    route: usize,
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

    /// Where to fetch or send a bulk URL now: an absolute URL as it is, a
    /// path on the next hop on the route bulk transfers take.
    pub fn bulk_url(&self, url: &str) -> String {
        rs_net::bulk::resolve(self.upstream.url_for(Class::Bulk), url)
    }

    /// What the next POST carries besides messages.
    pub fn notices(&self) -> &Notices {
        &self.notices
    }

    /// Builds an envelope sent `now` on the route messages take now: the
    /// notices due there go into its header, `write` puts the messages
    /// in. `poll`: a long poll, asking the upstream to hold the reply this
    /// long.
    pub fn envelope<T>(
        &self,
        now: Timestamp,
        poll: Option<Duration>,
        write: impl FnOnce(&mut EnvelopeWriter) -> T,
    ) -> (Outgoing, T) {
        let route = self.upstream.routes().pick(Class::Messages);
        self.envelope_on(route, true, now, poll, write)
    }

    fn envelope_on<T>(
        &self,
        route: usize,
        notices: bool,
        now: Timestamp,
        poll: Option<Duration>,
        write: impl FnOnce(&mut EnvelopeWriter) -> T,
    ) -> (Outgoing, T) {
        let mut meta = EnvelopeMeta::new(self.me.clone(), now);
        let (acks, delivered) = if notices {
            self.notices.take(route)
        } else {
            Default::default()
        };
        meta.acks = acks.iter().map(|(_, id)| id.clone()).collect();
        meta.delivered = delivered;
        meta.poll = poll;
        let mut w = EnvelopeWriter::new(&meta);
        let t = write(&mut w);
        let out = Outgoing {
            enc: w.finish(),
            acks,
            delivered: meta.delivered,
            route,
        };
        (out, t)
    }

    /// POSTs an envelope built by [`Uplink::envelope`] (`hold`: its long
    /// poll's hold). Its notices are forgotten once the upstream has them
    /// and kept for the next POST otherwise. The reply's back-channel
    /// messages are the caller's to pass to [`Uplink::receive`] with the
    /// route that answered.
    pub async fn send(&self, out: Outgoing, hold: Option<Duration>) -> Result<Reply, PostError> {
        let r = self.upstream.post(&out.enc, hold, out.route).await;
        self.sent(out, r.is_ok());
        r
    }

    fn sent(&self, out: Outgoing, ok: bool) {
        if ok {
            if let Some(b) = &self.back
                && !out.delivered.is_empty()
            {
                b.delivered_sent(out.delivered);
            }
        } else {
            self.notices.give_back(out.acks, out.delivered);
        }
    }

    /// For multiple send: an envelope of copies of messages already in an
    /// envelope for the route messages take, for the best other route
    /// that is up (`None`: there is none). It carries no notices.
    pub fn copy_envelope<T>(
        &self,
        now: Timestamp,
        write: impl FnOnce(&mut EnvelopeWriter) -> T,
    ) -> Option<(Outgoing, T)> {
        let routes = self.upstream.routes();
        let cur = routes.current();
        let (other, _) = routes.hedge(cur, &{
            let mut t = vec![false; routes.urls().len()];
            t[cur] = true;
            t
        })?;
        Some(self.envelope_on(other, false, now, None, write))
    }

    /// POSTs a copy built by [`Uplink::copy_envelope`] on its route alone.
    pub async fn send_copy(&self, out: Outgoing) -> Result<Reply, PostError> {
        let route = out.route;
        let envelope = self.upstream.post_on(route, &out.enc).await?;
        Ok(Reply { envelope, route })
    }

    /// Takes the back-channel messages a reply brought down `route`; what
    /// the back channel made safe is acknowledged on that route with its
    /// next POST.
    pub async fn receive(&self, msgs: Vec<RawMessage>, route: usize) {
        if let Some(b) = &self.back
            && !msgs.is_empty()
        {
            let up = &self.upstream;
            let via = Via {
                route,
                base: up
                    .routes()
                    .config()
                    .bulk
                    .is_empty()
                    .then(|| up.urls().get(route).cloned())
                    .flatten(),
            };
            let ids = b.receive(msgs, via).await;
            self.notices.ack_on(Some(route), ids);
        }
    }

    /// Probes the routes (none with a single URL) until `shutdown`: each
    /// not measured for [`RouteChoice::probe_every`] gets an empty
    /// envelope, which measures it, brings it back up after a failure,
    /// carries the acknowledgements due on it and brings down any
    /// back-channel messages its MLM holds for this tier.
    ///
    /// [`RouteChoice::probe_every`]: crate::routes::RouteChoice::probe_every
    pub async fn probe_routes(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let routes = self.upstream.routes();
        if routes.urls().len() < 2 {
            return;
        }
        let tick = (routes.config().probe_every / 5)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        // One probe per route at a time, each on its own task: a probe
        // stalled on a silent route holds up no other.
        let probing: Arc<Mutex<std::collections::HashSet<usize>>> = Arc::default();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            for i in routes.due_for_probe() {
                if !probing.lock().is_ok_and(|mut p| p.insert(i)) {
                    continue;
                }
                let (me, probing, shutdown) = (self.clone(), probing.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let (out, ()) = me.envelope_on(i, true, Timestamp::now(), None, |_| ());
                    tokio::select! {
                        () = shutdown.cancelled() => me.sent(out, false),
                        r = me.upstream.probe(i, &out.enc) => {
                            me.sent(out, r.is_ok());
                            match r {
                                Ok(reply) => me.receive(reply.messages, i).await,
                                Err(e) => tracing::debug!("probe: {e}"),
                            }
                        }
                    }
                    if let Ok(mut p) = probing.lock() {
                        p.remove(&i);
                    }
                });
            }
            // Moves back to a recovered route happen here too when idle.
            routes.pick(Class::Messages);
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
