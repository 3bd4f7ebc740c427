//! A daemon's `/metrics` endpoint (Prometheus text format, plain HTTP on
//! `metrics_listen`, loopback by default), and the gauges every tier with
//! a spool or a throttle shares. The registry and the counters are
//! `rs_net::metrics`; gauges that read storage are set just before each
//! scrape by the daemon's `refresh`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rs_net::metrics::{IntCounter, IntGauge, IntGaugeVec, Maybe, Registry, set};
use rs_protocol::time::Timestamp;
use rs_store::spool::{Depth, SpoolStats};
use tokio_util::sync::CancellationToken;
use warp::Filter as _;

use crate::health::QueueHealth;

/// Reads `metrics_listen`: an address, or `off` for no endpoint.
pub fn listen_or_off<'de, D>(d: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize as _;
    let s = String::deserialize(d)?;
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.trim().parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!("{s:?}: an address such as 127.0.0.1:9471, or off"))
    })
}

/// Writes `metrics_listen` back as it is read.
pub fn serialize_listen<S>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error>
where
    S: serde::Serializer,
{
    match v {
        Some(a) => s.serialize_str(&a.to_string()),
        None => s.serialize_str("off"),
    }
}

/// The default `metrics_listen` of a daemon: loopback, `port`.
pub fn loopback(port: u16) -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Binds `metrics_listen` (or takes the listener kept for it across a
/// start in place): called before the daemon says it is ready, which
/// closes inherited listeners nobody took. A port that cannot be bound is
/// logged and the daemon goes on without metrics: a site's forwarding
/// matters more than its scrape.
pub async fn listen(listen: SocketAddr) -> Option<tokio::net::TcpListener> {
    match crate::daemon::bind("metrics", listen, None).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!("metrics: {e:#}; serving no /metrics");
            None
        }
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`: `refresh` sets
/// the storage-read gauges, then the registry is written out.
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    registry: Registry,
    refresh: F,
    shutdown: CancellationToken,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(bound) = listener.local_addr() else {
        return;
    };
    tracing::info!("metrics on http://{bound}/metrics");
    if !bound.ip().is_loopback() {
        tracing::warn!(
            "metrics_listen {bound}: /metrics is plain HTTP without authentication; keep it on loopback or behind a firewall"
        );
    }
    let route = warp::path!("metrics")
        .and(warp::get())
        .then(move || {
            let (registry, refresh) = (registry.clone(), refresh.clone());
            async move {
                refresh().await;
                let mut r = warp::reply::Response::new(registry.text().into());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(rs_net::metrics::CONTENT_TYPE),
                );
                r
            }
        })
        .or(warp::any().map(|| {
            let mut r = warp::reply::Response::new("only GET /metrics here\n".into());
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            r
        }))
        .unify();
    rs_net::server::serve_tcp(
        listener,
        None,
        route,
        rs_net::server::ServeConfig {
            max_connections: 16,
            grace: Duration::from_secs(1),
            ..rs_net::server::ServeConfig::default()
        },
        shutdown,
    )
    .await;
}

/// Counters kept elsewhere as running totals (in the spool's database, in
/// the throttle), brought up to date at each scrape: a counter only goes
/// up, so a total that went down (a spool replaced) is taken as is from
/// then on.
#[derive(Clone)]
pub struct Totals(rs_net::metrics::IntCounterVec);

impl std::fmt::Debug for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Totals").finish_non_exhaustive()
    }
}

impl Totals {
    /// # Panics
    /// On an invalid name: a mistake in the code.
    pub fn new(name: &str, help: &str, label: &str) -> Self {
        Totals(
            rs_net::metrics::IntCounterVec::new(prometheus_opts(name, help), &[label])
                .expect("a valid counter name"),
        )
    }

    pub fn set(&self, label: &str, total: u64) {
        let c = self.0.with_label_values(&[label]);
        let have = c.get();
        if total >= have {
            c.inc_by(total - have);
        } else {
            c.reset();
            c.inc_by(total);
        }
    }

    pub fn collector(&self) -> &rs_net::metrics::IntCounterVec {
        &self.0
    }
}

fn prometheus_opts(name: &str, help: &str) -> rs_net::metrics::Opts {
    rs_net::metrics::Opts::new(name, help)
}

/// A spool's gauges: depth and oldest age by precedence, bytes against
/// the bound, time until full at the current rate, dead letters, and what
/// left it by fate.
#[derive(Clone)]
pub struct SpoolGauges {
    pub messages: IntGaugeVec,
    pub oldest_age: IntGaugeVec,
    pub bytes: IntGauge,
    pub max_bytes: IntGauge,
    pub full_in: Maybe,
    pub dead_letters: IntGauge,
    pub fates: Totals,
    /// Scrapes whose read of the spool failed.
    pub read_failures: IntCounter,
}

impl Default for SpoolGauges {
    fn default() -> Self {
        use rs_net::metrics::{counter, gauge, gauge_by};
        SpoolGauges {
            messages: gauge_by(
                "spool_messages",
                "Messages waiting in the spool, by precedence.",
                "precedence",
            ),
            oldest_age: gauge_by(
                "spool_oldest_age_seconds",
                "Age of the oldest message waiting in the spool, by precedence.",
                "precedence",
            ),
            bytes: gauge(
                "spool_bytes",
                "Bytes of the messages waiting in the spool.",
                &[],
            ),
            max_bytes: gauge(
                "spool_max_bytes",
                "The spool's bound in bytes (spool.max_bytes).",
                &[],
            ),
            full_in: Maybe::new(
                "spool_full_in_seconds",
                "Seconds until the spool is full at the rate it grew since the last heartbeat (absent while it is not growing).",
            ),
            dead_letters: gauge(
                "spool_dead_letters",
                "Messages refused for good, waiting for replayDeadLetters or discardDeadLetters.",
                &[],
            ),
            fates: Totals::new(
                "spool_messages_total",
                "Messages that left the spool or were refused at its door, by fate, over the spool's life.",
                "fate",
            ),
            read_failures: counter(
                "spool_read_failures_total",
                "Scrapes that could not read the spool.",
                &[],
            ),
        }
    }
}

impl std::fmt::Debug for SpoolGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolGauges").finish_non_exhaustive()
    }
}

impl SpoolGauges {
    pub fn register(&self, r: &Registry) {
        r.add(&self.messages);
        r.add(&self.oldest_age);
        r.add(&self.bytes);
        r.add(&self.max_bytes);
        r.add(&self.full_in);
        r.add(&self.dead_letters);
        r.add(self.fates.collector());
        r.add(&self.read_failures);
    }

    /// Reads `spool` and sets every gauge ([`Self::update`]); a read that
    /// fails is counted.
    pub async fn refresh<S: rs_store::spool::Spool>(
        &self,
        spool: &S,
        max_bytes: u64,
        health: &QueueHealth,
        now: Timestamp,
    ) {
        match tokio::join!(spool.stats(), spool.depths()) {
            (Ok(s), Ok(d)) => self.update(&s, &d, max_bytes, health, now),
            _ => self.read_failures.inc(),
        }
    }

    /// Sets every gauge from one reading of the spool. `health` gives the
    /// time until full as the status tree computes it (without taking a
    /// heartbeat's sample).
    pub fn update(
        &self,
        s: &SpoolStats,
        depths: &[Depth],
        max_bytes: u64,
        health: &QueueHealth,
        now: Timestamp,
    ) {
        self.messages.reset();
        self.oldest_age.reset();
        for d in depths {
            let p = d.precedence.to_string();
            set(&self.messages.with_label_values(&[p.as_str()]), d.messages);
            let age = d
                .oldest
                .map_or(0, |o| (now.as_millis() - o.as_millis()).max(0) / 1000);
            self.oldest_age.with_label_values(&[p.as_str()]).set(age);
        }
        set(&self.bytes, s.bytes);
        set(&self.max_bytes, max_bytes);
        self.full_in.set(health.full_in_secs(s, max_bytes));
        set(&self.dead_letters, s.dead_letters);
        for (fate, n) in [
            ("delivered", s.delivered_total),
            ("expired", s.expired_total),
            ("evicted", s.evicted_total),
            ("aged_out", s.aged_out_total),
            ("refused", s.refused_total),
            ("duplicate", s.duplicates_total),
        ] {
            self.fates.set(fate, n);
        }
    }
}

/// A throttle's gauges: messages held back by rule, and the usage of the
/// current quota periods by rule and key.
#[derive(Clone)]
pub struct ThrottleGauges {
    pub held: Totals,
    pub usage_bytes: IntGaugeVec,
    pub usage_messages: IntGaugeVec,
}

impl Default for ThrottleGauges {
    fn default() -> Self {
        let usage = |name: &str, help: &str| {
            IntGaugeVec::new(prometheus_opts(name, help), &["rule", "key"])
                .expect("a valid gauge name")
        };
        ThrottleGauges {
            held: Totals::new(
                "throttle_held_total",
                "Messages the throttle held back, by rule.",
                "rule",
            ),
            usage_bytes: usage(
                "throttle_usage_bytes",
                "Bytes counted against a quota in its current period, by rule and key (a farm's usage is the farm's).",
            ),
            usage_messages: usage(
                "throttle_usage_messages",
                "Messages counted against a quota in its current period, by rule and key.",
            ),
        }
    }
}

impl std::fmt::Debug for ThrottleGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleGauges").finish_non_exhaustive()
    }
}

impl ThrottleGauges {
    pub fn register(&self, r: &Registry) {
        r.add(self.held.collector());
        r.add(&self.usage_bytes);
        r.add(&self.usage_messages);
    }

    pub fn update(&self, t: &crate::throttle::Throttle) {
        let (held, usage) = t.report();
        for (rule, n) in held {
            self.held.set(&rule, n);
        }
        self.usage_bytes.reset();
        self.usage_messages.reset();
        for u in usage {
            let l = [u.rule.as_str(), u.key.as_str()];
            set(&self.usage_bytes.with_label_values(&l), u.bytes);
            set(&self.usage_messages.with_label_values(&l), u.messages);
        }
    }
}

/// Gauges read from an `Arc` at each scrape, without holding it alive.
pub fn pulling<T: Send + Sync + 'static>(
    r: &Registry,
    of: &Arc<T>,
    name: &str,
    help: &str,
    f: impl Fn(&T) -> f64 + Send + Sync + 'static,
) {
    let me = Arc::downgrade(of);
    r.add(&rs_net::metrics::pulling(name, help, move || {
        me.upgrade().map_or(0.0, |t| f(&t))
    }));
}

/// The upstream routes' metrics, read from the uplink at each scrape:
/// `upstream_route_up`, `upstream_route_delay_seconds`,
/// `upstream_route_in_use` (by URL and class), and the totals of moves
/// and hedged POSTs. Empty until a sender [`RouteGauges::attach`]es its
/// uplink.
#[derive(Clone)]
pub struct RouteGauges(Arc<RouteGaugesInner>);

struct RouteGaugesInner {
    uplink: std::sync::Mutex<std::sync::Weak<crate::uplink::Uplink>>,
    up: IntGaugeVec,
    delay: rs_net::metrics::GaugeVec,
    in_use: IntGaugeVec,
    moves: IntCounter,
    hedged: IntCounter,
}

impl std::fmt::Debug for RouteGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteGauges").finish_non_exhaustive()
    }
}

impl Default for RouteGauges {
    fn default() -> Self {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(prometheus_opts(name, help), labels).expect("a valid gauge name")
        };
        RouteGauges(Arc::new(RouteGaugesInner {
            uplink: std::sync::Mutex::new(std::sync::Weak::new()),
            up: vec(
                "upstream_route_up",
                "1 while an upstream route answers (its last POST did not fail), else 0.",
                &["url"],
            ),
            delay: rs_net::metrics::GaugeVec::new(
                prometheus_opts(
                    "upstream_route_delay_seconds",
                    "An upstream route's delay as the route choice sees it (median round trip plus spread, or a stalled POST's wait).",
                ),
                &["url"],
            )
            .expect("a valid gauge name"),
            in_use: vec(
                "upstream_route_in_use",
                "1 for the route each class of transfer (messages, bulk) takes now.",
                &["url", "class"],
            ),
            moves: rs_net::metrics::counter(
                "upstream_route_moves_total",
                "Moves of the messages' upstream route.",
                &[],
            ),
            hedged: rs_net::metrics::counter(
                "upstream_route_hedged_total",
                "POSTs of messages sent on a second route because the first did not answer in time.",
                &[],
            ),
        }))
    }
}

impl RouteGauges {
    /// Reads `uplink`'s routes from now on.
    pub fn attach(&self, uplink: &Arc<crate::uplink::Uplink>) {
        if let Ok(mut u) = self.0.uplink.lock() {
            *u = Arc::downgrade(uplink);
        }
    }

    /// Moves of the messages' route so far.
    pub fn moves(&self) -> u64 {
        self.uplink().map_or(0, |u| {
            u.upstream()
                .routes()
                .moves
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// POSTs hedged onto a second route so far.
    pub fn hedged(&self) -> u64 {
        self.uplink().map_or(0, |u| {
            u.upstream()
                .routes()
                .hedged
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// The routes as they stand (empty before [`RouteGauges::attach`]).
    pub fn snapshot(&self) -> Vec<crate::routes::RouteStatus> {
        self.uplink()
            .map(|u| u.upstream().routes().status())
            .unwrap_or_default()
    }

    fn uplink(&self) -> Option<Arc<crate::uplink::Uplink>> {
        self.0.uplink.lock().ok().and_then(|u| u.upgrade())
    }

    fn refresh(&self) {
        let i = &self.0;
        i.up.reset();
        i.delay.reset();
        i.in_use.reset();
        let Some(uplink) = self.uplink() else {
            return;
        };
        let routes = uplink.upstream().routes();
        for r in routes.status() {
            i.up.with_label_values(&[r.url.as_str()])
                .set(i64::from(r.up));
            if let Some(d) = r.delay {
                i.delay.with_label_values(&[r.url.as_str()]).set(d);
            }
            for (class, on) in [("messages", r.messages), ("bulk", r.bulk)] {
                i.in_use
                    .with_label_values(&[r.url.as_str(), class])
                    .set(i64::from(on));
            }
        }
        let catch_up = |c: &IntCounter, total: u64| {
            let now = c.get();
            if total > now {
                c.inc_by(total - now);
            }
        };
        catch_up(
            &i.moves,
            routes.moves.load(std::sync::atomic::Ordering::Relaxed),
        );
        catch_up(
            &i.hedged,
            routes.hedged.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
}

impl rs_net::metrics::Collector for RouteGauges {
    fn desc(&self) -> Vec<&rs_net::metrics::Desc> {
        let i = &self.0;
        let mut d = i.up.desc();
        d.extend(i.delay.desc());
        d.extend(i.in_use.desc());
        d.extend(i.moves.desc());
        d.extend(i.hedged.desc());
        d
    }

    fn collect(&self) -> Vec<rs_net::metrics::MetricFamily> {
        self.refresh();
        let i = &self.0;
        let mut m = i.up.collect();
        m.extend(i.delay.collect());
        m.extend(i.in_use.collect());
        m.extend(i.moves.collect());
        m.extend(i.hedged.collect());
        m
    }
}
