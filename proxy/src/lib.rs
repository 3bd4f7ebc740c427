//! rs-proxy: the customer-site tier. Integrators (separate processes) hand
//! it alarms, events and data through a local API; it allocates remote
//! services IDs for them and their support instances, spools every message
//! durably before answering, and a sender drains the spool upstream (seed
//! 004, Fig. 14). It heartbeats its status tree and announces cold starts
//! and shutdowns.

pub mod api;
pub mod back_channel;
pub mod bulk;
pub mod cli;
pub mod client;
pub mod config;
pub mod download;
pub mod enroll;
pub mod hostwatch;
pub mod registry;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use rs_node::sender::{Sender, SenderStats};
use rs_node::upstream::Upstream;
use rs_protocol::control::{NodeState, SUB_COLD_START, SUB_HEARTBEAT, SUB_SHUTDOWN, StatusNode};
use rs_protocol::control_messages::status_message;
use rs_protocol::model::*;
use rs_protocol::time::{Clock, SystemClock};
use rs_protocol::{MessageId, RsId};
use rs_store::spool::sqlite::SqliteSpool;
use rs_store::spool::{Enqueued, Spool, SpoolConfig};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The running proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    pub cfg: Config,
    pub id: RsId,
    pub spool: SqliteSpool,
    /// The damaged spool file this start moved aside and replaced, if any
    /// (shown in the status tree, so at the centre, until removed).
    pub spool_recovery: std::sync::Mutex<Option<rs_store::spool::sqlite::Recovery>>,
    /// The last heartbeat's sample of the spool (queue health).
    pub queue_health: rs_node::health::QueueHealth,
    pub registry: registry::Registry,
    pub sender_stats: Arc<SenderStats>,
    pub paused: Arc<AtomicBool>,
    pub clock: Arc<dyn Clock>,
    pub started: rs_protocol::Timestamp,
    /// The file the configuration came from: `configChange` replaces it.
    pub config_path: Option<std::path::PathBuf>,
    /// Cancelled to stop the daemon (a signal, or the `shutdown` and
    /// `configChange` control actions).
    pub stop: CancellationToken,
    /// Set when the daemon should start again once stopped (to take up a
    /// configuration that `configChange` wrote).
    pub restart: AtomicBool,
    /// Messages in, and control actions applied, since start.
    pub stats: Stats,
    /// This proxy's metrics (`/metrics`); the counters in it are the ones
    /// the status tree shows.
    pub metrics: rs_net::metrics::Registry,
    pub spool_gauges: rs_node::metrics::SpoolGauges,
    pub throttle_gauges: rs_node::metrics::ThrottleGauges,
    pub throttle: Arc<rs_node::throttle::Throttle>,
    /// Files handed over for upload, and downloads offered (`bulk.db`).
    pub uploads: bulk::Uploads,
    /// Seals this proxy's messages as they are sent (`[seal]`; none until
    /// the proxy holds its certificate).
    pub sealer: Option<Arc<rs_net::seal::Sealer>>,
}

pub use rs_node::daemon::Exit;

rs_net::counters! {
    /// A proxy's own counters (the sender's are [`SenderStats`]).
    pub struct Stats {
        /// Messages integrators handed in that the spool took.
        spooled: "messages_received_total", "Messages integrators handed in that the spool took.";
        duplicates: "messages_duplicate_total",
            "Messages handed in again under an ID the spool holds (taken once).";
        /// Refused at the spool's door (full of more important messages).
        refused: "messages_refused_total" {reason = "spool"}, "Messages this tier refused, by reason.";
        /// Not spooled because the spool's database failed.
        storage: "messages_refused_total" {reason = "storage"}, "Messages this tier refused, by reason.";
        /// Control actions applied, and back-channel messages received
        /// again after they were applied (dropped as duplicates).
        actions_applied: "backchannel_actions_total" {result = "applied"},
            "Control actions addressed to this tier, by result.";
        actions_duplicate: "backchannel_actions_total" {result = "duplicate"},
            "Control actions addressed to this tier, by result.";
    }
}

/// Why a message was not spooled.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("not spooled: {0}")]
    Refused(rs_protocol::Reason),
    #[error("{0}")]
    Storage(String),
}

impl Proxy {
    pub fn open(
        cfg: Config,
        config_path: Option<std::path::PathBuf>,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let id = cfg.rs_id().map_err(anyhow::Error::msg)?;
        let mut spool_cfg = SpoolConfig::new(cfg.data_dir.join("spool.db"));
        spool_cfg.max_bytes = cfg.spool.max_bytes;
        spool_cfg.max_age = Duration::from_secs(cfg.spool.max_age_days * 86_400);
        // A damaged spool must not keep the site down: it is moved aside
        // and replaced, what it holds is spooled again once running, and
        // the status says so.
        let (spool, spool_recovery) =
            SqliteSpool::open_or_recover(spool_cfg, rs_protocol::Timestamp::now())
                .context("opening the spool")?;
        let registry = registry::Registry::open(&cfg.data_dir.join("proxy.db"), id.clone())
            .context("opening the registry")?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let throttle = Arc::new(
            rs_node::throttle::open(&cfg.throttle, clock.clone(), &cfg.data_dir)
                .map_err(anyhow::Error::msg)?,
        );
        let uploads = bulk::Uploads::open(&cfg.data_dir.join("bulk.db"), cfg.tls.as_ref())
            .context("opening bulk.db")?;
        let sealer = match (&cfg.seal, &cfg.tls) {
            (Some(seal), Some(tls)) if tls.cert.exists() => Some(Arc::new(
                rs_net::seal::Sealer::new(tls, seal).map_err(|e| anyhow::anyhow!("[seal]: {e}"))?,
            )),
            _ => None,
        };
        Ok(Arc::new(Proxy {
            id,
            sealer,
            uploads,
            spool_recovery: std::sync::Mutex::new(spool_recovery),
            queue_health: rs_node::health::QueueHealth::default(),
            spool,
            registry,
            sender_stats: Arc::new(SenderStats::default()),
            paused: Arc::new(AtomicBool::new(false)),
            clock,
            throttle,
            started: rs_protocol::Timestamp::now(),
            config_path,
            stop,
            restart: AtomicBool::new(false),
            stats: Stats::default(),
            metrics: rs_net::metrics::Registry::new(),
            spool_gauges: Default::default(),
            throttle_gauges: Default::default(),
            cfg,
        })
        .registered())
    }

    /// Registers every counter and gauge of this proxy in its registry.
    fn registered(self: Arc<Self>) -> Arc<Self> {
        let r = &self.metrics;
        self.stats.register(r);
        self.sender_stats.register(r);
        self.spool_gauges.register(r);
        self.throttle_gauges.register(r);
        rs_node::mem::register_resident(r);
        if let Some(s) = &self.sealer {
            s.stats.register(r);
        }
        rs_node::metrics::pulling(
            r,
            &self,
            "forwarding_enabled",
            "0 while forwarding of integrator data is switched off (disableForwarding), else 1.",
            |p| f64::from(u8::from(!p.paused.load(Ordering::Relaxed))),
        );
        self
    }

    /// Sets the gauges read from storage, before a scrape.
    pub async fn refresh_metrics(&self) {
        self.spool_gauges
            .refresh(
                &self.spool,
                self.cfg.spool.max_bytes,
                &self.queue_health,
                self.clock.now(),
            )
            .await;
        self.throttle_gauges.update(&self.throttle);
    }

    /// Spools a message durably; returns once it would survive a crash.
    pub async fn submit(&self, m: Message) -> Result<MessageId, SubmitError> {
        self.submit_raw(m.to_raw()).await
    }

    /// Spools an encoded message durably (a duplicate ID is already there).
    pub async fn submit_raw(
        &self,
        raw: rs_protocol::codec::RawMessage,
    ) -> Result<MessageId, SubmitError> {
        self.submit_many(vec![raw])
            .await
            .pop()
            .unwrap_or_else(|| Err(SubmitError::Storage("the spool gave no answer".into())))
    }

    /// Spools many messages in one transaction (one fsync for all); one
    /// result per message, in order.
    pub async fn submit_many(
        &self,
        raws: Vec<rs_protocol::codec::RawMessage>,
    ) -> Vec<Result<MessageId, SubmitError>> {
        if raws.is_empty() {
            return Vec::new();
        }
        let ids: Vec<MessageId> = raws.iter().map(|r| r.header.id.clone()).collect();
        match self.spool.enqueue(raws, self.clock.now()).await {
            Ok(r) => ids
                .into_iter()
                .zip(
                    r.into_iter()
                        .map(Some)
                        .chain(std::iter::repeat_with(|| None)),
                )
                .map(|(id, e)| match e {
                    Some(Enqueued::Stored) => {
                        self.stats.spooled.inc();
                        Ok(id)
                    }
                    Some(Enqueued::Duplicate) => {
                        self.stats.duplicates.inc();
                        Ok(id)
                    }
                    Some(Enqueued::Refused(reason)) => {
                        self.stats.refused.inc();
                        Err(SubmitError::Refused(reason))
                    }
                    None => {
                        self.stats.storage.inc();
                        Err(SubmitError::Storage("the spool gave no answer".into()))
                    }
                })
                .collect(),
            Err(e) => ids
                .iter()
                .map(|_| {
                    self.stats.storage.inc();
                    Err(SubmitError::Storage(e.to_string()))
                })
                .collect(),
        }
    }

    /// `configChange`: lays the TOML document given over the configuration
    /// file (so one change can go to a whole group of proxies, each keeping
    /// its own identity and paths), validates the result, refuses what
    /// would orphan this proxy's identity or state, writes it in place of
    /// the old one (atomically: a crash leaves one or the other whole) and
    /// marks the proxy to restart to take it up once stopped. A refusal
    /// keeps the old one.
    pub fn change_config(&self, patch: &str) -> Result<String, rs_protocol::Outcome> {
        let Some(path) = &self.config_path else {
            return Err(rs_protocol::Outcome::rejected(
                "unsupported",
                "this proxy was not started from a configuration file",
            ));
        };
        let identity = vec![self.id.to_string(), self.cfg.data_dir.display().to_string()];
        let done = rs_node::config_file::change(path, patch, &identity, |text| {
            let c = Config::parse(text)?;
            let id = c.rs_id().unwrap_or_else(|_| self.id.clone());
            Ok(vec![id.to_string(), c.data_dir.display().to_string()])
        })?;
        self.restart.store(true, Ordering::Relaxed);
        Ok(done)
    }

    /// A forward header from `component` created now.
    pub fn header(
        &self,
        component: RsId,
        version: String,
        class: Classification,
        qos: Qos,
    ) -> Header {
        Header {
            id: MessageId::generate(),
            created: self.clock.now(),
            class,
            route: Route::Source(Source {
                component,
                version: version.into(),
                qos,
            }),
            routing: Default::default(),
        }
    }

    /// The status tree: this proxy, its integrators, their platforms and
    /// support instances.
    pub async fn status_tree(&self) -> StatusNode {
        self.tree(false).await
    }

    /// The status tree; for a heartbeat (`beat`), its queue health becomes
    /// what the next heartbeat's is measured against.
    async fn tree(&self, beat: bool) -> StatusNode {
        let mut metrics = Vec::new();
        let mut state = NodeState::Ok;
        match self.spool.stats().await {
            Ok(s) => {
                metrics.extend(self.queue_health.details(
                    &s,
                    self.cfg.spool.max_bytes,
                    self.clock.now(),
                    beat,
                ));
                for (k, v) in [
                    ("spool.messages", s.messages),
                    ("spool.bytes", s.bytes),
                    ("spool.dead_letters", s.dead_letters),
                    ("spool.delivered_total", s.delivered_total),
                    ("spool.expired_total", s.expired_total),
                    ("spool.evicted_total", s.evicted_total),
                    ("spool.aged_out_total", s.aged_out_total),
                    ("spool.refused_total", s.refused_total),
                ] {
                    metrics.push(Detail::new(k, v.to_string()));
                }
                // Messages refused for good need someone to look at them
                // (replayDeadLetters, discardDeadLetters): the site shows
                // degraded at the centre until they are dealt with.
                if s.dead_letters > 0 {
                    state = NodeState::Degraded;
                }
            }
            Err(_) => state = NodeState::Degraded,
        }
        // A spool this start found damaged and replaced: reported (and the
        // site degraded) until an operator removes the file moved aside.
        let recovery = self.spool_recovery.lock().ok().and_then(|r| r.clone());
        if let Some(r) = recovery.filter(|r| r.moved_to.exists()) {
            state = NodeState::Degraded;
            metrics.push(Detail::new("spool.recovered_at", r.at.to_string()));
            metrics.push(Detail::new(
                "spool.recovered_from",
                r.moved_to.display().to_string(),
            ));
            metrics.push(Detail::new("spool.recovered_problem", r.problem));
            metrics.push(Detail::new("spool.salvaged", r.salvaged.to_string()));
        }
        let st = &self.sender_stats;
        metrics.push(Detail::new(
            "upstream.accepted",
            st.accepted.get().to_string(),
        ));
        metrics.push(Detail::new(
            "upstream.posts_failed",
            st.posts_failed.get().to_string(),
        ));
        metrics.push(Detail::new(
            "upstream.connected",
            if st.connected.load(Ordering::Relaxed) {
                "yes"
            } else {
                "no"
            },
        ));
        for (k, v) in st.route_details() {
            metrics.push(Detail::new(k, v));
        }
        metrics.push(Detail::new(
            "backchannel.applied",
            self.stats.actions_applied.get().to_string(),
        ));
        metrics.push(Detail::new(
            "backchannel.duplicates",
            self.stats.actions_duplicate.get().to_string(),
        ));
        metrics.push(Detail::new(
            "throttle.held",
            self.sender_stats.throttled.get().to_string(),
        ));
        for (k, v) in self.throttle.metrics() {
            metrics.push(Detail::new(k, v.to_string()));
        }
        if self.paused.load(Ordering::Relaxed) {
            metrics.push(Detail::new("forwarding", "disabled"));
        }
        let integrators = self.registry.integrators().await.unwrap_or_default();
        let instances = self.registry.instances().await.unwrap_or_default();
        let children = integrators
            .into_iter()
            .filter(|i| i.active)
            .map(|i| {
                let inst: Vec<StatusNode> = instances
                    .iter()
                    .filter(|s| s.integrator == i.id)
                    .map(|s| StatusNode {
                        id: Some(s.id.clone()),
                        name: Some(s.name.clone()),
                        ..StatusNode::new(
                            "instance",
                            if s.enabled {
                                NodeState::Ok
                            } else {
                                NodeState::Disabled
                            },
                        )
                    })
                    .collect();
                StatusNode {
                    id: Some(i.id.clone()),
                    name: Some(i.name.clone()),
                    version: Some(i.version.clone()),
                    children: vec![StatusNode {
                        name: Some(i.platform.clone()),
                        children: inst,
                        ..StatusNode::new("platform", NodeState::Ok)
                    }],
                    ..StatusNode::new("integrator", NodeState::Ok)
                }
            })
            .collect();
        StatusNode {
            id: Some(self.id.clone()),
            version: Some(env!("CARGO_PKG_VERSION").into()),
            since: Some(self.started),
            metrics,
            children,
            ..StatusNode::new("proxy", state)
        }
    }

    /// Spools an infrastructure message carrying the status tree.
    async fn infrastructure(
        &self,
        sub: &str,
        ttl: Duration,
        precedence: u8,
    ) -> Result<MessageId, SubmitError> {
        let tree = self.tree(sub == SUB_HEARTBEAT).await;
        self.submit(status_message(
            self.id.clone(),
            sub,
            &tree,
            self.clock.now(),
            ttl,
            precedence,
        ))
        .await
    }

    fn heartbeat_interval(&self) -> Duration {
        self.sender_stats.heartbeat(self.cfg.heartbeat())
    }
}

/// The proxy ID a certificate names (refusing one issued to anything else).
fn proxy_id(me: rs_net::pki::Identity) -> anyhow::Result<String> {
    match me.component() {
        Some(id) if id.kind() == rs_protocol::ComponentKind::Proxy => Ok(me.name),
        _ => anyhow::bail!("the certificate names {}, which is not a proxy", me.name),
    }
}

/// Runs the proxy until `shutdown`: the integrator API on its socket, the
/// sender, heartbeats. On shutdown it spools a shutdown message and gives
/// the sender a moment to deliver it (and the acknowledgements of what it
/// applied). `config_path` is where `configChange` writes a new
/// configuration; without it that action is refused.
/// `rs-proxy spool verify`: checks the spool file at `path` without
/// changing it (the daemon may be running) and describes it: integrity,
/// schema version, waiting messages by precedence, those held back or
/// expired, dead letters, drop records. `Ok((false, _))`: it is damaged
/// (the daemon moves such a file aside at its next start).
pub fn verify_spool(path: &std::path::Path) -> Result<(bool, String), String> {
    use std::fmt::Write as _;
    let v = rs_store::spool::sqlite::verify(path, rs_protocol::Timestamp::now())
        .map_err(|e| e.to_string())?;
    let mut t = format!(
        "spool {}: integrity {}, schema version {}\n",
        path.display(),
        v.integrity,
        v.version
    );
    let (n, b) = v
        .by_precedence
        .iter()
        .fold((0, 0), |(n, b), (_, m, x)| (n + m, b + x));
    let _ = writeln!(t, "waiting: {n} message(s), {b} bytes");
    for (p, m, x) in &v.by_precedence {
        let _ = writeln!(t, "  precedence {p}: {m} message(s), {x} bytes");
    }
    let _ = writeln!(
        t,
        "held back until later: {}; expired (dropped at the next sweep): {}",
        v.later, v.expired
    );
    let _ = writeln!(t, "dead letters: {}", v.dead_letters);
    let drops: Vec<String> = v.drops.iter().map(|(w, n)| format!("{w} {n}")).collect();
    let _ = writeln!(
        t,
        "drop records: {}",
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(", ")
        }
    );
    Ok((v.is_ok(), t))
}

/// Spools again what can be read from a damaged spool this start moved
/// aside ([`SqliteSpool::open_or_recover`]), before the sender starts.
async fn salvage_spool(proxy: &Proxy) {
    let moved = proxy
        .spool_recovery
        .lock()
        .ok()
        .and_then(|r| r.as_ref().map(|r| r.moved_to.clone()));
    let Some(moved) = moved else { return };
    match proxy
        .spool
        .salvage_from(&moved, rs_protocol::Timestamp::now())
        .await
    {
        Ok(n) => {
            if let Ok(mut r) = proxy.spool_recovery.lock()
                && let Some(r) = r.as_mut()
            {
                r.salvaged += n;
            }
        }
        Err(e) => tracing::error!("salvaging the damaged spool {}: {e}", moved.display()),
    }
}

/// The daemon as `rs-proxy run --config FILE` runs it: signals (SIGHUP
/// reloads the file, [`rs_node::daemon::lifecycle`]), the configuration,
/// [`run`], and a start in place after a reload, a `configChange`, an
/// enrollment or a renewed certificate (the integrator socket kept open).
pub async fn daemon(config: std::path::PathBuf) -> anyhow::Result<()> {
    let shutdown = rs_node::daemon::signals(Some(config.clone()), Config::parse);
    let cfg = Config::load(&config).map_err(anyhow::Error::msg)?;
    rs_node::daemon::finish(run(cfg, Some(config), shutdown).await?)
}

pub async fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<Exit> {
    let mut cfg = cfg;
    // Before anything touches the directory, its socket or its key.
    let _lock = rs_store::datadir::DataDirLock::acquire(&cfg.data_dir, "rs-proxy")
        .map_err(anyhow::Error::msg)?;
    let mut enroll_later = None;
    if let Some(t) = &cfg.tls {
        // First start: create the key and obtain the certificate (and the
        // ID with it) through the upstream. With its ID configured the
        // proxy need not wait: it takes and spools its integrators'
        // messages at once, enrolls in the background and starts again
        // once it holds its certificate.
        let want = match &cfg.id {
            Some(id) => Some(RsId::new(id.clone()).map_err(|e| anyhow::anyhow!("id {id:?}: {e}"))?),
            None => None,
        };
        if want.is_some() && !t.cert.exists() {
            // One attempt now (the usual case: the upstream answers).
            match rs_net::enroll::ensure(
                t,
                cfg.enroll_token.as_deref(),
                &cfg.upstream.urls,
                want.as_ref(),
            )
            .await
            {
                Ok(me) => cfg.id = Some(proxy_id(me)?),
                Err(rs_net::enroll::Failed::Refused(e)) => anyhow::bail!(e),
                Err(rs_net::enroll::Failed::Unreachable(e)) => {
                    tracing::warn!("{e}; taking messages meanwhile, enrolling in the background");
                    enroll_later = Some((t.clone(), want));
                }
            }
        } else {
            // Enrolled already (the certificate is checked against the
            // ID), or no ID to start with: wait for the certificate.
            let me = rs_net::enroll::ensure_retrying(
                t,
                cfg.enroll_token.as_deref(),
                &cfg.upstream.urls,
                want.as_ref(),
                &shutdown,
            )
            .await
            .map_err(anyhow::Error::msg)?;
            cfg.id = Some(proxy_id(me)?);
        }
    }
    let proxy = Proxy::open(cfg, config_path, shutdown.clone())?;
    if let Some((t, want)) = enroll_later {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let p = &proxy;
            match rs_net::enroll::ensure_retrying(
                &t,
                p.cfg.enroll_token.as_deref(),
                &p.cfg.upstream.urls,
                want.as_ref(),
                &p.stop,
            )
            .await
            {
                Ok(_) => {
                    tracing::info!("enrolled: starting again with the certificate");
                    p.restart.store(true, Ordering::Relaxed);
                    p.stop.cancel();
                }
                Err(e) => tracing::error!("enrollment: {e}; sending is refused until it is fixed"),
            }
        });
    }
    if let Some(t) = &proxy.cfg.tls
        && t.cert.exists()
    {
        // Renewed before it expires; started again with the new pair.
        let p = proxy.clone();
        tokio::spawn(rs_net::enroll::renew_loop(
            t.clone(),
            proxy.cfg.upstream.urls.clone(),
            proxy.stop.clone(),
            move || {
                p.restart.store(true, Ordering::Relaxed);
                p.stop.cancel();
            },
        ));
    }
    let upstream = Arc::new(
        Upstream::new(proxy.cfg.upstream.client(proxy.cfg.tls.clone()))
            .map_err(anyhow::Error::msg)?,
    );
    salvage_spool(&proxy).await;
    let sender_stop = CancellationToken::new();
    let uplink = Arc::new(rs_node::uplink::Uplink::new(
        proxy.id.clone(),
        upstream,
        Some(Arc::new(back_channel::Actions::new(proxy.clone()))),
    ));
    let uploads = tokio::spawn(bulk::run(proxy.clone(), uplink.clone(), shutdown.clone()));
    // With several upstream routes, those messages do not take are probed.
    tokio::spawn(uplink.clone().probe_routes(sender_stop.clone()));
    let sender = Sender {
        me: proxy.id.clone(),
        spool: proxy.spool.clone(),
        uplink,
        cfg: proxy.cfg.upstream.sender(),
        clock: proxy.clock.clone(),
        wake: proxy.spool.notified(),
        stats: proxy.sender_stats.clone(),
        paused: proxy.paused.clone(),
        throttle: Some(proxy.throttle.clone()),
        poll: proxy.cfg.upstream.poll(),
        seal: proxy.sealer.clone(),
    };
    let sender_task = tokio::spawn(sender.run(sender_stop.clone()));
    let flush = {
        let t = proxy.throttle.clone();
        tokio::spawn(rs_node::throttle::flush_loop(
            move || t.clone(),
            sender_stop.clone(),
        ))
    };

    let listener = rs_node::daemon::bind_unix(&proxy.cfg.socket)?;
    api::secure_socket(&proxy.cfg)?;
    tracing::info!(
        "rs-proxy {} serving integrators on {}, upstream {:?}",
        proxy.id,
        proxy.cfg.socket.display(),
        proxy.cfg.upstream.urls
    );
    if let Err(e) = proxy
        .infrastructure(SUB_COLD_START, Duration::from_secs(86_400), 6)
        .await
    {
        tracing::warn!("cold start message: {e}");
    }

    let beats = {
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // The interval can change with the upstream's advice (the first
            // reply usually brings it): look again every quarter second.
            let mut last = tokio::time::Instant::now();
            // Start-up's garbage (the clients' TLS set-up) goes back once
            // the sender and the bulk task have built theirs.
            let mut trimmed = false;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                if !trimmed && last.elapsed() >= Duration::from_secs(1) {
                    trimmed = true;
                    rs_node::mem::trim();
                }
                if last.elapsed() < proxy.heartbeat_interval() {
                    continue;
                }
                last = tokio::time::Instant::now();
                if let Err(e) = proxy
                    .registry
                    .forget_seen(Duration::from_secs(30 * 86_400))
                    .await
                {
                    tracing::warn!("forgetting old back-channel IDs: {e}");
                }
                let ttl = proxy.heartbeat_interval() * 2;
                if let Err(e) = proxy.infrastructure(SUB_HEARTBEAT, ttl, 2).await {
                    tracing::warn!("heartbeat: {e}");
                }

                let _ = proxy.spool.release_memory().await;
                rs_node::mem::trim();
            }
        })
    };

    let tcp_api = match proxy.cfg.api_listen {
        Some(addr) => {
            let l = rs_node::daemon::bind("api", addr, None).await?;
            let bound = l.local_addr()?;
            tracing::info!("integrator API also on {bound}");
            Some(tokio::spawn(rs_net::server::serve_tcp(
                l,
                None,
                api::tcp_routes(proxy.clone(), bound),
                rs_net::server::ServeConfig::default(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let metrics = match proxy.cfg.metrics_listen {
        Some(addr) => rs_node::metrics::listen(addr).await,
        None => None,
    };
    let metrics = metrics.map(|l| {
        let p = proxy.clone();
        tokio::spawn(rs_node::metrics::serve(
            l,
            proxy.metrics.clone(),
            move || {
                let p = p.clone();
                async move { p.refresh_metrics().await }
            },
            shutdown.clone(),
        ))
    });
    let grace = proxy.cfg.shutdown_grace();
    {
        let p = proxy.clone();
        rs_node::daemon::watchdog(shutdown.clone(), move || {
            let p = p.clone();
            async move { p.spool.stats().await.map(|_| ()).map_err(|e| e.to_string()) }
        });
    }
    rs_node::daemon::ready(&format!(
        "serving integrators on {}",
        proxy.cfg.socket.display()
    ));
    rs_net::server::serve_unix(
        listener,
        api::routes(proxy.clone()),
        rs_net::server::ServeConfig {
            grace,
            ..rs_net::server::ServeConfig::default()
        },
        shutdown.clone(),
    )
    .await;
    // The drain: what is in flight above had `grace`; the sender gets what
    // is left of it to deliver what the spool holds.
    let drain_until = tokio::time::Instant::now() + grace;
    if let Some(t) = tcp_api {
        let _ = t.await;
    }
    if let Some(t) = metrics {
        let _ = t.await;
    }
    let _ = beats.await;
    let _ = uploads.await;
    let restarting = proxy.restart.load(Ordering::Relaxed) || rs_node::daemon::reloading();
    if !restarting {
        // Starting again in place keeps the socket (and its listener).
        let _ = std::fs::remove_file(&proxy.cfg.socket);
    }

    // Say goodbye, and let the sender try to deliver it (and anything else).
    if let Err(e) = proxy
        .infrastructure(SUB_SHUTDOWN, Duration::from_secs(86_400), 6)
        .await
    {
        tracing::warn!("shutdown message: {e}");
    }
    rs_node::sender::drain(&proxy.spool, &proxy.sender_stats, drain_until).await;
    sender_stop.cancel();
    let _ = sender_task.await;
    let _ = flush.await;
    if restarting {
        tracing::info!("rs-proxy stopped; starting again with the new configuration");
        Ok(Exit::Restart)
    } else {
        tracing::info!("rs-proxy stopped");
        Ok(Exit::Stopped)
    }
}
