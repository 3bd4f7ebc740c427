//! rs-mlm: the intermediate MLM (seed 004, Figs. 15-16): receives envelopes
//! from proxies (or MLMs below), runs its service modules, and forwards to
//! its upstream (an MLM or the application server), synchronously or in
//! custody. It is also a sender of its own: aggregated summaries, custody
//! messages and its heartbeats go through its spool.

pub mod actions;
pub mod aggregate;
pub mod bulk;
pub mod cache;
pub mod coalesce;
pub mod config;
pub mod forward;
pub mod modules;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use rs_net::server::{ServeConfig, finish, serve_tcp};
use rs_node::ingress::xml_response;
use rs_node::sender::{Sender, SenderStats};
use rs_node::upstream::Upstream;
use rs_protocol::RsId;
use rs_protocol::codec::encode_status;
use rs_protocol::control::{NodeState, SUB_COLD_START, SUB_HEARTBEAT, SUB_SHUTDOWN, StatusNode};
use rs_protocol::control_messages::status_message;
use rs_protocol::model::*;
use rs_protocol::time::{Clock, SystemClock};
use rs_store::spool::postgres::PgSpool;
use rs_store::spool::sqlite::SqliteSpool;
use rs_store::spool::{AnySpool, Spool, SpoolConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;

pub use config::Config;

/// The running MLM's shared state.
#[derive(Debug)]
pub struct Mlm {
    pub cfg: Config,
    pub id: RsId,
    pub modules: Vec<Box<dyn modules::ServiceModule>>,
    pub aggregation: aggregate::AggregationQueue,
    /// Its own SQLite file, or shared by the members of a farm.
    pub spool: AnySpool,
    /// Every POST upstream (the sender's, and relays while the caller
    /// waits), with the acknowledgements and delivery notices due.
    pub uplink: Arc<rs_node::uplink::Uplink>,
    /// What may come in now (forwarding and custody alike).
    pub throttle: Arc<rs_node::throttle::Throttle>,
    /// What the envelope pipeline counts, and the MLM's own counters.
    pub counts: rs_node::pipeline::Counts,
    pub stats: forward::Stats,
    pub sender_stats: Arc<SenderStats>,
    /// The last heartbeat's sample of the spool (queue health).
    pub queue_health: rs_node::health::QueueHealth,
    pub clock: Arc<dyn Clock>,
    pub started: rs_protocol::Timestamp,
    /// Cancelled when the MLM begins to stop (ends held long polls).
    pub stopping: CancellationToken,
    /// The back-channel queue for the subtree, and its routes.
    pub outbox: rs_store::outbox::Outbox,
    /// Woken when back-channel messages are queued (here, or by another
    /// member of a farm).
    pub outbox_ready: Arc<rs_node::ingress::BackChannelReady>,
    /// This member's session on a farm's database (alone on SQLite).
    pub presence: rs_store::sql::Presence,
    /// Envelopes being handled (backpressure advice).
    pub load: rs_node::ingress::Load,
    /// The TLS listener's context (`None`: plain HTTP).
    pub tls: Option<Arc<rs_net::tls::TlsServer>>,
    /// Seals the messages this MLM makes (`[seal]`).
    pub sealer: Option<Arc<rs_net::seal::Sealer>>,
    /// Refusals of callers and of messages they may not send.
    pub auth: rs_net::auth::Stats,
    /// Until when (ms) the upstream asked this MLM to hold back; passed on
    /// to the callers so a storm does not just move up a tier.
    pub upstream_busy_until: std::sync::atomic::AtomicI64,
    /// Its own sender's forwarding switched off (`disableForwarding`).
    pub paused: Arc<AtomicBool>,
    /// The file the configuration came from: `configChange` replaces it.
    pub config_path: Option<std::path::PathBuf>,
    /// Set when the MLM should start again once stopped.
    pub restart: AtomicBool,
    /// Cancelled to stop the MLM (a signal, or `configChange`).
    pub stop: CancellationToken,
    /// Relays uploads upstream.
    pub bulk_client: rs_net::bulk::Client,
    pub bulk_stats: bulk::Stats,
    /// Downloads fetched once and published for the subtree.
    pub cache: cache::Cache,
    /// Synchronous relays, several envelopes per upstream POST under load.
    pub coalescer: coalesce::Coalescer,
    /// This MLM's metrics (`/metrics`); the counters in it are the ones the
    /// status tree shows.
    pub metrics: rs_net::metrics::Registry,
    pub gauges: Gauges,
    /// `memory_limit_mb`, enforced where connections are accepted.
    pub memory: Option<Arc<rs_node::mem::MemoryBound>>,
}

/// The MLM's gauges read from storage at each scrape.
#[derive(Debug, Clone)]
pub struct Gauges {
    pub spool: rs_node::metrics::SpoolGauges,
    pub throttle: rs_node::metrics::ThrottleGauges,
    pub backchannel_pending: rs_net::metrics::IntGauge,
    pub aggregation_pending: rs_net::metrics::IntGauge,
    pub cache_files: rs_net::metrics::IntGauge,
    pub cache_bytes: rs_net::metrics::IntGauge,
}

impl Default for Gauges {
    fn default() -> Self {
        use rs_net::metrics::gauge;
        Gauges {
            spool: Default::default(),
            throttle: Default::default(),
            backchannel_pending: gauge(
                "backchannel_pending",
                "Back-channel messages queued for the tiers below (a farm's: the farm's queue).",
                &[],
            ),
            aggregation_pending: gauge(
                "aggregation_pending",
                "Messages held in aggregation windows.",
                &[],
            ),
            cache_files: gauge("download_cache_files", "Files in the download cache.", &[]),
            cache_bytes: gauge("download_cache_bytes", "Bytes in the download cache.", &[]),
        }
    }
}

pub use rs_node::daemon::Exit;

/// An MLM that joins a farm may still hold messages in the spool it kept
/// alone (`spool.db` and its log in its data directory): they move into
/// the farm's spool before its sender starts, so none is stranded in a
/// file no sender reads any more.
async fn adopt_local_spool(mlm: &Mlm) -> anyhow::Result<()> {
    let file = mlm.cfg.data_dir.join("spool.db");
    if !matches!(mlm.spool, AnySpool::Postgres(_)) || !file.exists() {
        return Ok(());
    }
    let old = SqliteSpool::open(SpoolConfig::new(&file))
        .with_context(|| format!("opening {} to move what it holds", file.display()))?;
    let moved = rs_store::spool::move_waiting(&old, &mlm.spool, mlm.clock.now())
        .await
        .with_context(|| format!("moving what {} holds into the farm's spool", file.display()))?;
    if moved > 0 {
        tracing::info!(
            "moved {moved} message(s) from {} into the farm's spool",
            file.display()
        );
    }
    Ok(())
}

impl Mlm {
    pub fn open(
        cfg: Config,
        config_path: Option<std::path::PathBuf>,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let id = cfg.rs_id().map_err(anyhow::Error::msg)?;
        let modules = modules::build(&cfg.filter, &cfg.modify, &cfg.drop_repeats, &cfg.aggregate)
            .map_err(anyhow::Error::msg)?;
        let mut spool_cfg = SpoolConfig::new(cfg.data_dir.join("spool.db"));
        spool_cfg.max_bytes = cfg.spool.max_bytes;
        spool_cfg.max_age = Duration::from_secs(cfg.spool.max_age_days * 86_400);
        // Custody means receiving other components' messages: refuse a
        // message ID already accepted within the spool's age window.
        spool_cfg.dedupe_window = Some(spool_cfg.max_age);
        let spool_at = cfg.spool_location();
        let spool = match &spool_at {
            rs_store::sql::Location::Sqlite(_) => {
                AnySpool::Sqlite(SqliteSpool::open(spool_cfg).context("opening the spool")?)
            }
            rs_store::sql::Location::Postgres { .. } => AnySpool::Postgres(
                PgSpool::open(spool_cfg, &spool_at, &cfg.member_name())
                    .with_context(|| format!("opening the spool at {}", spool_at.describe()))?,
            ),
        };
        let throttle = Arc::new(
            rs_node::throttle::open_at(
                &cfg.throttle,
                Arc::new(SystemClock),
                &cfg.data_dir,
                &cfg.throttle_location(),
            )
            .map_err(anyhow::Error::msg)?,
        );
        let aggregation_at = cfg.aggregation_location();
        let aggregation =
            aggregate::AggregationQueue::open(&aggregation_at).with_context(|| {
                format!(
                    "opening the aggregation queue at {}",
                    aggregation_at.describe()
                )
            })?;
        let upstream = Arc::new(
            Upstream::new(cfg.upstream.client(cfg.tls.clone())).map_err(anyhow::Error::msg)?,
        );
        let queue_at = cfg.queue_location();
        let outbox = rs_store::outbox::Outbox::open(&queue_at, &id).with_context(|| {
            format!("opening the back-channel queue at {}", queue_at.describe())
        })?;
        let outbox_ready = Arc::new(rs_node::ingress::BackChannelReady::new(cfg.offer_again()));
        // In a farm, another member's commit to the queue wakes the long
        // polls held here.
        let presence = {
            let ready = outbox_ready.clone();
            rs_store::sql::Presence::start(
                &queue_at,
                vec![rs_store::outbox::ready_channel(&queue_at)],
                rs_store::sql::lock_key(&format!("rs-mlm leader {}", cfg.id)),
                move |_| ready.notify_waiters(),
            )
            .context("joining the farm")?
        };
        let tls = match &cfg.tls {
            Some(t) => Some(rs_net::tls::TlsServer::new(t).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let sealer = match (&cfg.seal, &cfg.tls) {
            (Some(seal), Some(tls)) => Some(Arc::new(
                rs_net::seal::Sealer::new(tls, seal).map_err(|e| anyhow::anyhow!("[seal]: {e}"))?,
            )),
            _ => None,
        };
        let bulk_client =
            rs_net::bulk::Client::new(cfg.tls.as_ref()).map_err(anyhow::Error::msg)?;
        let cache = cache::Cache::open(&cfg.cache_location(), cfg.cache_dir(), cfg.tls.as_ref())
            .context("opening the bulk cache")?;
        // The uplink hands the back-channel its replies bring to this MLM
        // (weakly: the MLM owns its uplink).
        Ok(Arc::new_cyclic(|me| Mlm {
            uplink: Arc::new(rs_node::uplink::Uplink::new(
                id.clone(),
                upstream,
                Some(Arc::new(forward::Downstream(me.clone()))),
            )),
            id,
            modules,
            aggregation,
            spool,
            throttle,
            counts: rs_node::pipeline::Counts::default(),
            stats: forward::Stats::default(),
            sender_stats: Arc::new(SenderStats::default()),
            queue_health: rs_node::health::QueueHealth::default(),
            clock: Arc::new(SystemClock),
            started: rs_protocol::Timestamp::now(),
            stopping: CancellationToken::new(),
            outbox,
            outbox_ready,
            presence,
            paused: Arc::new(AtomicBool::new(false)),
            load: rs_node::ingress::Load::new(cfg.busy_envelopes),
            tls,
            sealer,
            auth: rs_net::auth::Stats::default(),
            upstream_busy_until: std::sync::atomic::AtomicI64::new(0),
            config_path,
            restart: AtomicBool::new(false),
            stop,
            bulk_client,
            bulk_stats: bulk::Stats::default(),
            cache,
            coalescer: coalesce::Coalescer::default(),
            metrics: rs_net::metrics::Registry::new(),
            gauges: Gauges::default(),
            memory: cfg
                .memory_limit_mb
                .map(|mb| rs_node::mem::MemoryBound::new(mb << 20)),
            cfg,
        })
        .registered())
    }

    /// Registers every counter and gauge of this MLM in its registry.
    fn registered(self: Arc<Self>) -> Arc<Self> {
        let r = &self.metrics;
        self.counts.register(r);
        self.stats.register(r);
        self.sender_stats.register(r);
        self.auth.register(r);
        self.bulk_stats.register(r);
        self.cache.stats.register(r);
        if let Some(t) = &self.tls {
            t.stats.register(r);
            r.add(&t.revocations.cut);
        }
        if let Some(s) = &self.sealer {
            s.stats.register(r);
        }
        rs_node::mem::register_resident(r);
        if let Some(m) = &self.memory {
            m.register(r);
        }
        let g = &self.gauges;
        g.spool.register(r);
        g.throttle.register(r);
        r.add(&g.backchannel_pending);
        r.add(&g.aggregation_pending);
        r.add(&g.cache_files);
        r.add(&g.cache_bytes);
        rs_node::metrics::pulling(
            r,
            &self,
            "envelopes_in_hand",
            "Envelopes being handled now, held long polls among them.",
            |m| m.load.inflight() as f64,
        );
        rs_node::metrics::pulling(
            r,
            &self,
            "longpolls_held",
            "Long polls held now, waiting for a back-channel message.",
            |m| m.outbox_ready.holders() as f64,
        );
        self
    }

    /// Sets the gauges read from storage, before a scrape.
    pub async fn refresh_metrics(&self) {
        let g = &self.gauges;
        g.spool
            .refresh(
                &self.spool,
                self.cfg.spool.max_bytes,
                &self.queue_health,
                self.clock.now(),
            )
            .await;
        g.throttle.update(&self.throttle);
        let gauge = rs_net::metrics::set;
        if let Ok(n) = self.outbox.pending().await {
            gauge(&g.backchannel_pending, n);
        }
        if let Ok(n) = self.aggregation.pending().await {
            gauge(&g.aggregation_pending, n);
        }
        if let Ok((n, b)) = self.cache.usage().await {
            gauge(&g.cache_files, n);
            gauge(&g.cache_bytes, b);
        }
    }

    /// The MLM's status: its own state, queue depths and counters.
    pub async fn status_tree(&self) -> StatusNode {
        self.tree(false).await
    }

    /// The status tree; for a heartbeat (`beat`), its queue health becomes
    /// what the next heartbeat's is measured against.
    async fn tree(&self, beat: bool) -> StatusNode {
        let s = &self.stats;
        let mut metrics: Vec<(&str, u64)> = rs_net::auth::metrics(self.tls.as_deref(), &self.auth);
        if let Some(seal) = &self.sealer {
            metrics.extend([
                ("seal.sealed", seal.stats.sealed.get()),
                ("seal.failed", seal.stats.seal_failed.get()),
            ]);
        }
        metrics.extend(self.counts.status());
        metrics.extend([
            // Held long polls among them.
            ("envelopes.in_hand", self.load.inflight() as u64),
            ("messages.forwarded", s.forwarded.get()),
            ("messages.filtered", s.filtered.get()),
            ("messages.aggregated", s.aggregated.get()),
            (
                "replies.advised_wait",
                self.load.advised.load(Ordering::Relaxed),
            ),
            ("backchannel.expired", s.back_expired.get()),
            ("backchannel.taken", s.back_taken.get()),
            ("actions.applied", s.actions_applied.get()),
            ("upstream.accepted", self.sender_stats.accepted.get()),
            ("bulk.transfers", self.bulk_stats.transfers.get()),
            ("bulk.bytes_relayed", self.bulk_stats.bytes_relayed.get()),
            ("bulk.refused", self.bulk_stats.refused.get()),
            (
                "bulk.requests_refused",
                self.bulk_stats.requests_refused.get(),
            ),
            ("bulk.fetches", self.cache.stats.fetches.get()),
            ("bulk.fetched_bytes", self.cache.stats.fetched_bytes.get()),
            ("bulk.served_bytes", self.cache.stats.served_bytes.get()),
            ("bulk.evicted", self.cache.stats.evicted.get()),
            ("bulk.fetch_failed", self.cache.stats.failed.get()),
        ]);
        let mut state = NodeState::Ok;
        let mut health = Vec::new();
        match self.spool.stats().await {
            Ok(sp) => {
                health = self.queue_health.details(
                    &sp,
                    self.cfg.spool.max_bytes,
                    self.clock.now(),
                    beat,
                );
                metrics.push(("spool.messages", sp.messages));
                metrics.push(("spool.bytes", sp.bytes));
                metrics.push(("spool.dead_letters", sp.dead_letters));
                // As for a proxy: dead letters need an admin's decision.
                if sp.dead_letters > 0 {
                    state = NodeState::Degraded;
                }
                metrics.push(("spool.evicted_total", sp.evicted_total));
            }
            Err(_) => state = NodeState::Degraded,
        }
        if let Ok(n) = self.aggregation.pending().await {
            metrics.push(("aggregation.pending", n));
        }
        let throttle = self.throttle.metrics();
        let throttle: Vec<(&str, u64)> = throttle.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        metrics.extend(throttle);
        if let Ok(n) = self.outbox.pending().await {
            metrics.push(("backchannel.pending", n));
        }
        if let Ok((n, b)) = self.cache.usage().await {
            metrics.push(("bulk.cache_files", n));
            metrics.push(("bulk.cache_bytes", b));
        }
        let mut children = Vec::new();
        if self.cfg.database.is_some() {
            match self.farm_members().await {
                Ok(members) => {
                    let live = members.iter().filter(|m| m.state == NodeState::Ok).count();
                    metrics.push(("farm.members", live as u64));
                    // The members this one shares throttle rates with.
                    metrics.push(("farm.rate_share", u64::from(self.throttle.share())));
                    children = members;
                }
                Err(e) => {
                    tracing::error!("farm members: {e}");
                    state = NodeState::Degraded;
                }
            }
        }
        StatusNode {
            children,
            id: Some(self.id.clone()),
            version: Some(env!("CARGO_PKG_VERSION").into()),
            since: Some(self.started),
            metrics: metrics
                .into_iter()
                .map(|(k, v)| Detail::new(k, v.to_string()))
                .chain(
                    self.sender_stats
                        .route_details()
                        .into_iter()
                        .map(|(k, v)| Detail::new(k, v)),
                )
                .chain(health)
                .collect(),
            ..StatusNode::new("mlm", state)
        }
    }

    /// The farm's members as status nodes: failed when silent for
    /// `rs_store::members::LATE`, with the load each last recorded.
    async fn farm_members(&self) -> Result<Vec<StatusNode>, rs_store::db::DbError> {
        use rs_store::members::{FORGET, alive, before};
        let now = self.clock.now();
        Ok(self
            .outbox
            .members(before(now, FORGET))
            .await?
            .into_iter()
            .map(|m| {
                let state = if alive(&m, now) {
                    NodeState::Ok
                } else {
                    NodeState::Failed
                };
                StatusNode {
                    name: Some(m.name),
                    since: Some(m.started),
                    metrics: vec![
                        Detail::new("seen", m.seen.to_string()),
                        Detail::new("envelopes.in_hand", m.in_hand.to_string()),
                        Detail::new("envelopes.received", m.envelopes.to_string()),
                        Detail::new("messages.forwarded", m.forwarded.to_string()),
                    ],
                    ..StatusNode::new("member", state)
                }
            })
            .collect())
    }

    /// Records this member's beat in the farm's database, every
    /// `rs_store::members::BEAT` until `stop`.
    async fn beat(self: Arc<Self>, stop: CancellationToken) {
        let name = self.cfg.member_name();
        loop {
            let m = rs_store::outbox::Member {
                name: name.clone(),
                started: self.started,
                seen: self.clock.now(),
                in_hand: self.load.inflight() as u64,
                envelopes: self.counts.envelopes.get(),
                forwarded: self.stats.forwarded.get(),
            };
            if let Err(e) = self.outbox.beat(m).await {
                tracing::warn!("farm membership: {e}");
            }
            // Rates are the farm's: each live member admits its share.
            // (Unchanged while the database is away: the last count holds.)
            if let Ok(members) = self.farm_members().await {
                let live = members.iter().filter(|m| m.state == NodeState::Ok).count();
                let live = u32::try_from(live).unwrap_or(u32::MAX).max(1);
                if live != self.throttle.share() {
                    tracing::info!(
                        "farm: {live} live member(s); each admits 1/{live} of every throttle rate"
                    );
                    self.throttle.set_share(live);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(rs_store::members::BEAT) => {}
            }
        }
    }

    /// Spools one of the MLM's own infrastructure messages.
    async fn infrastructure(&self, sub: &str, ttl: Duration, precedence: u8) -> anyhow::Result<()> {
        let now = self.clock.now();
        let tree = self.tree(sub == SUB_HEARTBEAT).await;
        let msg = status_message(self.id.clone(), sub, &tree, now, ttl, precedence);
        self.spool.enqueue(vec![msg.to_raw()], now).await?;
        Ok(())
    }

    /// Turns due aggregation groups into summaries in the spool; in a farm
    /// on the leader only (the queue is the farm's: one summary per group,
    /// whichever members its alarms passed through).
    pub async fn flush_aggregates(&self) -> anyhow::Result<usize> {
        if !self.presence.is_leader() {
            return Ok(0);
        }
        let windows: Vec<Duration> = self
            .cfg
            .aggregate
            .iter()
            .map(|a| Duration::from_secs(a.window_secs))
            .collect();
        let now = self.clock.now();
        let groups = self.aggregation.due(now, windows.clone()).await?;
        for g in &groups {
            let window = windows.get(g.rule).copied().unwrap_or_default();
            if let Some(summary) = aggregate::summary(&self.id, g, window, now) {
                self.spool.enqueue(vec![summary.to_raw()], now).await?;
            }
            self.aggregation
                .remove(g.members.iter().map(|m| m.id.clone()).collect())
                .await?;
        }
        Ok(groups.len())
    }

    fn heartbeat_interval(&self) -> Duration {
        self.sender_stats.heartbeat(self.cfg.heartbeat())
    }

    pub fn routes(
        self: &Arc<Self>,
    ) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
    + Clone
    + Send
    + Sync
    + 'static {
        let me = self.clone();
        let status = warp::path!("rs" / "v1" / "status")
            .and(warp::get())
            .then(move || {
                let me = me.clone();
                async move { xml_response(encode_status(&me.status_tree().await)) }
            });
        let health = warp::path!("rs" / "v1" / "health")
            .and(warp::get())
            .map(|| warp::reply::Reply::into_response("ok\n"));
        let crl = rs_net::tls::crl_route(self.cfg.tls.as_ref().and_then(|t| t.crl.clone()));
        finish(
            rs_node::pipeline::route(self.clone())
                .or(bulk::routes(self.clone()))
                .unify()
                .or(rs_net::server::authenticated().and(status))
                .unify()
                .or(crl)
                .unify()
                .or(enroll_relay(self.clone()))
                .unify()
                .or(health)
                .unify(),
        )
    }
}

/// `POST /rs/v1/enroll` passed on to the upstream as it is: a component
/// below enrolls through the tiers it will talk through (it has no
/// certificate yet, so this is the one tier endpoint that needs none).
fn enroll_relay(
    mlm: Arc<Mlm>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    rs_net::enroll::request().then(move |auth: Option<String>, body: bytes::Bytes| {
        let mlm = mlm.clone();
        async move {
            let mut last = "no upstream".to_owned();
            for url in mlm.uplink.upstream().urls() {
                let mut req = mlm
                    .uplink
                    .upstream()
                    .http()
                    .post(format!("{}/rs/v1/enroll", url.trim_end_matches('/')))
                    .header("content-type", "application/pkcs10")
                    .timeout(Duration::from_secs(30))
                    .body(body.clone());
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                match req.send().await {
                    Ok(r) => {
                        let status = r.status();
                        return match rs_net::http::bounded_body(r, 1 << 20).await {
                            Ok(b) => {
                                let mut resp = warp::reply::Response::new(b.into());
                                *resp.status_mut() = status;
                                resp
                            }
                            Err(e) => {
                                rs_net::server::Refusal::new(http::StatusCode::BAD_GATEWAY, e)
                                    .response()
                            }
                        };
                    }
                    Err(e) => last = rs_net::http::error_chain(&e),
                }
            }
            let mut r = rs_net::server::Refusal::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                format!("the upstream is unreachable: {last}"),
            );
            r.retry_after = Some(Duration::from_secs(10));
            r.response()
        }
    })
}

/// The daemon as `rs-mlm --config FILE` runs it: signals (SIGHUP reloads
/// the file, [`rs_node::daemon::lifecycle`]), the configuration, the
/// listener (kept across a reload), [`run`], and a start in place after a
/// reload, a `configChange` or a renewed certificate.
pub async fn daemon(
    config: std::path::PathBuf,
    addr_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let shutdown = rs_node::daemon::signals(Some(config.clone()), Config::parse);
    let cfg = Config::load(&config).map_err(anyhow::Error::msg)?;
    let listener = rs_node::daemon::bind("main", cfg.listen, addr_file.as_deref()).await?;
    rs_node::daemon::finish(run(cfg, Some(config), listener, shutdown).await?)
}

/// Serves until `shutdown`; runs the sender, heartbeats and the
/// aggregation flush beside it.
pub async fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Exit> {
    let _lock = rs_store::datadir::DataDirLock::acquire(&cfg.data_dir, "rs-mlm")
        .map_err(anyhow::Error::msg)?;
    if let Some(t) = &cfg.tls {
        let want = cfg.rs_id().map_err(anyhow::Error::msg)?;
        // It cannot serve TLS without a certificate: wait for enrollment.
        rs_net::enroll::ensure_retrying(
            t,
            cfg.enroll_token.as_deref(),
            &cfg.upstream.urls,
            Some(&want),
            &shutdown,
        )
        .await
        .map_err(anyhow::Error::msg)?;
    }
    let mlm = Mlm::open(cfg, config_path, shutdown.clone())?;
    if let (Some(tls), Some(t)) = (&mlm.tls, &mlm.cfg.tls) {
        // Revocations reach this tier from upstream within the refresh.
        tokio::spawn(rs_net::enroll::refresh_crl(
            mlm.uplink.upstream().http().clone(),
            mlm.cfg.upstream.urls.clone(),
            tls.revocations.clone(),
            Duration::from_secs(t.crl_refresh_secs.max(1)),
            shutdown.clone(),
        ));
    }
    if let Some(t) = &mlm.cfg.tls {
        // Renewed before it expires; started again with the new pair.
        let m = mlm.clone();
        tokio::spawn(rs_net::enroll::renew_loop(
            t.clone(),
            mlm.cfg.upstream.urls.clone(),
            mlm.stop.clone(),
            move || {
                tracing::info!("certificate renewed: starting again with it");
                m.restart.store(true, Ordering::Relaxed);
                m.stop.cancel();
            },
        ));
    }
    tracing::info!(
        "rs-mlm {} listening on {}, upstream {:?}{}",
        mlm.id,
        listener.local_addr()?,
        mlm.cfg.upstream.urls,
        if mlm.cfg.custody {
            ", custody mode"
        } else {
            ""
        }
    );
    adopt_local_spool(&mlm).await?;
    let sender_stop = CancellationToken::new();
    let sender = Sender {
        me: mlm.id.clone(),
        spool: mlm.spool.clone(),
        uplink: mlm.uplink.clone(),
        cfg: mlm.cfg.upstream.sender(),
        clock: mlm.clock.clone(),
        wake: mlm.spool.notified(),
        stats: mlm.sender_stats.clone(),
        paused: mlm.paused.clone(),
        // What it sends was admitted when it came in.
        throttle: None,
        // Long-poll upstream on behalf of the whole subtree.
        poll: mlm.cfg.upstream.poll(),
        seal: mlm.sealer.clone(),
    };
    let sender_task = tokio::spawn(sender.run(sender_stop.clone()));
    // With several upstream routes, those messages do not take are probed.
    tokio::spawn(mlm.uplink.clone().probe_routes(sender_stop.clone()));
    let flush = {
        let t = mlm.throttle.clone();
        tokio::spawn(rs_node::throttle::flush_loop(
            move || t.clone(),
            sender_stop.clone(),
        ))
    };
    if mlm.cfg.database.is_some() {
        tokio::spawn(mlm.clone().beat(shutdown.clone()));
    }
    let fetcher = tokio::spawn(cache::run(mlm.clone(), shutdown.clone()));
    tokio::spawn(coalesce::run(mlm.clone()));
    tokio::spawn(rs_node::ingress::reoffer_ticker(
        mlm.outbox_ready.clone(),
        shutdown.clone(),
    ));
    if let Err(e) = mlm
        .infrastructure(SUB_COLD_START, Duration::from_secs(86_400), 6)
        .await
    {
        tracing::warn!("cold start message: {e}");
    }
    let background = {
        let mlm = mlm.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // The interval can change with the upstream's advice.
            let mut last_beat = tokio::time::Instant::now();
            let mut next_sweep = tokio::time::Instant::now();
            // Start-up's garbage (the clients' TLS set-up) goes back once
            // everything is built; later, after each heartbeat.
            let mut trimmed = false;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let now = mlm.clock.now();
                for m in &mlm.modules {
                    m.tick(now);
                }
                if let Err(e) = mlm.flush_aggregates().await {
                    tracing::error!("aggregation flush: {e:#}");
                }
                if tokio::time::Instant::now() >= next_sweep {
                    next_sweep = tokio::time::Instant::now() + Duration::from_secs(10);
                    // Received IDs are kept well past any expiry upstream gives.
                    match mlm
                        .outbox
                        .sweep(now, Duration::from_secs(30 * 86_400))
                        .await
                    {
                        Ok(n) => {
                            mlm.stats.back_expired.inc_by(n);
                        }
                        Err(e) => tracing::error!("back-channel sweep: {e}"),
                    }
                    forward::pick_up_notices(&mlm, now).await;
                }
                let every = mlm.heartbeat_interval();
                if last_beat.elapsed() >= every {
                    last_beat = tokio::time::Instant::now();
                    if let Err(e) = mlm.infrastructure(SUB_HEARTBEAT, every * 2, 2).await {
                        tracing::warn!("heartbeat: {e}");
                    }

                    let _ = mlm.spool.release_memory().await;
                    rs_node::mem::trim();
                } else if !trimmed && last_beat.elapsed() >= Duration::from_secs(1) {
                    trimmed = true;
                    rs_node::mem::trim();
                }
            }
        })
    };
    {
        let (mlm, shutdown) = (mlm.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            mlm.stopping.cancel();
        });
    }
    let metrics = match mlm.cfg.metrics_listen {
        Some(addr) => rs_node::metrics::listen(addr).await,
        None => None,
    };
    if let Some(l) = metrics {
        let m = mlm.clone();
        tokio::spawn(rs_node::metrics::serve(
            l,
            mlm.metrics.clone(),
            move || {
                let m = m.clone();
                async move { m.refresh_metrics().await }
            },
            shutdown.clone(),
        ));
    }
    let grace = mlm.cfg.shutdown_grace();
    let serve_cfg = ServeConfig {
        max_connections: mlm.cfg.max_connections.max(1),
        admit: mlm.memory.as_ref().map(|m| m.admission()),
        grace,
        ..ServeConfig::default()
    };
    {
        let m = mlm.clone();
        rs_node::daemon::watchdog(shutdown.clone(), move || {
            let m = m.clone();
            async move { m.spool.stats().await.map(|_| ()).map_err(|e| e.to_string()) }
        });
    }
    rs_node::daemon::ready(&format!("serving on {}", listener.local_addr()?));
    serve_tcp(listener, mlm.tls.clone(), mlm.routes(), serve_cfg, shutdown).await;
    let drain_until = tokio::time::Instant::now() + grace;
    let _ = background.await;
    let _ = fetcher.await;
    if let Err(e) = mlm
        .infrastructure(SUB_SHUTDOWN, Duration::from_secs(86_400), 6)
        .await
    {
        tracing::warn!("shutdown message: {e}");
    }
    if mlm.cfg.database.is_none() {
        // A farm's spool is the farm's: the other members deliver it (this
        // member's claims are released when it starts again, or lapse).
        rs_node::sender::drain(&mlm.spool, &mlm.sender_stats, drain_until).await;
    }
    sender_stop.cancel();
    let _ = sender_task.await;
    let _ = flush.await;
    if mlm.restart.load(Ordering::Relaxed) {
        tracing::info!("rs-mlm stopped; starting again with the new configuration");
        Ok(Exit::Restart)
    } else {
        tracing::info!("rs-mlm stopped");
        Ok(Exit::Stopped)
    }
}
