//! rs-appserver: the final receiver (seed 004, Fig. 17). Core work happens
//! before the reply: validate, deduplicate, persist, answer.
//!
//! `run` serves `POST /rs/v1/envelope` (the protocol), `GET /rs/v1/health`,
//! `GET /rs/v1/status` and the read side of the control API
//! (`/rs/v1/control/messages`, `/rs/v1/control/components`).

pub mod audit;
pub mod bulk;
pub mod collector;
pub mod config;
pub mod control;
mod documents;
mod farm;
pub mod ingress;
pub mod jobs;
pub mod modules;
pub mod monitor;
pub mod portal;
pub mod publish;
pub mod rollouts;
mod schema;
pub mod security;
pub mod store;
pub mod subscription;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use rs_net::server::{ServeConfig, finish, serve_tcp};
pub use rs_node::daemon::Exit;
use rs_protocol::time::{Clock, SystemClock};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;

pub use config::Config;

/// Everything the request handlers share.
#[derive(Debug)]
pub struct AppServer {
    pub cfg: Config,
    pub id: rs_protocol::RsId,
    pub store: store::Store,
    pub clock: Arc<dyn Clock>,
    /// What the envelope pipeline counts, and the server's own counters.
    pub counts: rs_node::pipeline::Counts,
    pub stats: ingress::Stats,
    pub started: rs_protocol::Timestamp,
    /// Woken when back-channel messages are queued (long polls wait on it).
    pub outbox_ready: Arc<rs_node::ingress::BackChannelReady>,
    /// Cancelled when the server begins to stop (ends held long polls).
    pub stopping: CancellationToken,
    /// Bumped whenever a job changes (watchers of jobs wait on it).
    pub jobs_changed: tokio::sync::watch::Sender<u64>,
    /// What may come in now; replaced whole through the control API.
    pub throttle: std::sync::RwLock<Arc<rs_node::throttle::Throttle>>,
    /// Envelopes being handled (backpressure advice).
    pub load: rs_node::ingress::Load,
    /// Woken when messages are stored (the collector's expander waits on it).
    pub expand_ready: tokio::sync::Notify,
    /// Woken when peripheral tasks are queued (idle processors wait on it).
    pub tasks_ready: tokio::sync::Notify,
    /// Woken when a feed subscription may have something new.
    pub feed_ready: tokio::sync::watch::Sender<u64>,
    /// Its configuration, as the API shows it.
    pub throttle_cfg: std::sync::RwLock<rs_node::throttle::ThrottleConfig>,
    /// The built-in service modules: the heartbeat monitor, then those
    /// configured.
    pub modules: Vec<Arc<dyn modules::ServiceModule>>,
    /// Bulk uploads: grants, transfers, stored files.
    pub uploads: bulk::Uploads,
    /// Published files offered for download.
    pub downloads: publish::Stats,
    /// What the portal's charts draw.
    pub history: portal::charts::History,
    /// The TLS listener's context (`None`: plain HTTP).
    pub tls: Option<Arc<rs_net::tls::TlsServer>>,
    /// The provider's CA, when this server enrolls components.
    pub ca: Option<Arc<rs_net::pki::Ca>>,
    /// Refused callers and spoofed messages.
    pub auth: rs_net::auth::Stats,
    /// Opens sealed messages (with TLS: this server's key, the CA).
    pub opener: Option<rs_net::seal::Opener>,
    /// Its place in a farm: wake-ups from the other members, leadership.
    pub presence: rs_store::sql::Presence,
    /// This server's metrics (`/metrics`); the counters in it are the ones
    /// the status tree shows.
    pub metrics: rs_net::metrics::Registry,
    pub gauges: Gauges,
    /// `memory_limit_mb`, enforced where connections are accepted.
    pub memory: Option<Arc<rs_node::mem::MemoryBound>>,
}

/// The server's gauges read from storage at each scrape, and the
/// latencies it sees in the hops of what it stores.
#[derive(Debug, Clone)]
pub struct Gauges {
    pub throttle: rs_node::metrics::ThrottleGauges,
    pub stored: rs_node::metrics::Totals,
    pub store_messages: rs_net::metrics::IntGauge,
    pub components: rs_net::metrics::IntGauge,
    pub backchannel_pending: rs_net::metrics::IntGauge,
    pub tasks: rs_net::metrics::IntGaugeVec,
    /// From a message's creation to its storage here.
    pub transit: rs_net::metrics::Histogram,
    /// How long each MLM on the way held a message (a proxy is the
    /// source, not a hop: its spool wait is its own `spool_wait_seconds`).
    pub held_at_mlm: rs_net::metrics::Histogram,
}

impl Default for Gauges {
    fn default() -> Self {
        use rs_net::metrics::{gauge, gauge_by, latency};
        Gauges {
            throttle: Default::default(),
            stored: rs_node::metrics::Totals::new(
                "messages_stored_total",
                "Messages stored, by outcome, over the store's life (a farm's: the farm's).",
                "outcome",
            ),
            store_messages: gauge(
                "store_messages",
                "Messages held in the store (within the retention window).",
                &[],
            ),
            components: gauge("components", "Components the server knows.", &[]),
            backchannel_pending: gauge(
                "backchannel_pending",
                "Back-channel copies queued for next hops, not yet acknowledged.",
                &[],
            ),
            tasks: gauge_by(
                "tasks",
                "Peripheral tasks not done, by state (ready, taken, failed).",
                "state",
            ),
            transit: latency(
                "message_transit_seconds",
                "From a message's creation at its source to its storage here (across clocks: skew shows).",
                &[],
            ),
            held_at_mlm: latency(
                "message_held_seconds",
                "How long a tier on the way held a message (its hop's sent minus received, on its own clock), by kind of tier (mlm).",
                &[("tier", "mlm")],
            ),
        }
    }
}

/// Milliseconds as seconds, negative (clock skew) as zero.
fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

impl Gauges {
    /// Observes the transit of a message created at `created`, stored now.
    pub fn observe_transit(&self, created: rs_protocol::Timestamp, now: rs_protocol::Timestamp) {
        self.transit
            .observe(seconds(now.as_millis() - created.as_millis()));
    }

    /// Observes how long each tier on the way held a message.
    pub fn observe_hops(&self, h: &rs_protocol::model::Header) {
        use rs_protocol::ids::ComponentKind;
        for hop in &h.routing {
            let Some(sent) = hop.sent else { continue };
            let held = seconds(sent.as_millis() - hop.received.as_millis());
            if hop.component.kind() == ComponentKind::Mlm {
                self.held_at_mlm.observe(held);
            }
        }
    }
}

impl AppServer {
    /// New messages were stored: wake the collector's expander (which
    /// wakes the processors and held feed pulls once it made their tasks).
    pub fn stored_new(&self) {
        self.expand_ready.notify_one();
    }

    /// Whether this server runs the work done once per farm (always, on
    /// SQLite): farm.rs.
    pub fn is_leader(&self) -> bool {
        self.presence.is_leader()
    }

    /// Whether this server is a member of a farm (its store on
    /// PostgreSQL).
    pub fn in_farm(&self) -> bool {
        self.cfg
            .database
            .as_deref()
            .is_some_and(rs_store::sql::is_postgres_url)
    }

    /// Puts the throttle stored through the control API (by this server
    /// or, in a farm, any member) in force, if there is one.
    pub async fn load_stored_throttle(&self) -> Result<(), rs_store::db::DbError> {
        let Some(doc) = self.store.setting("throttle").await? else {
            return Ok(());
        };
        match rs_node::throttle::decode_throttle(&doc, &rs_protocol::codec::Limits::default()) {
            Ok(t) => {
                if let Err(e) = self.set_throttle(t) {
                    tracing::error!(
                        "the stored throttle is not valid any more ({e}); using the configured one"
                    );
                }
            }
            Err(e) => tracing::error!("the stored throttle does not decode: {e}"),
        }
        Ok(())
    }

    /// The service module of this name.
    pub fn module(&self, name: &str) -> Option<&Arc<dyn modules::ServiceModule>> {
        self.modules.iter().find(|m| m.name() == name)
    }

    /// The names of the service modules subscriptions may deliver to.
    pub fn module_names(&self) -> Vec<&str> {
        self.modules
            .iter()
            .filter(|m| m.takes_messages())
            .map(|m| m.name())
            .collect()
    }

    /// The throttle in force.
    pub fn current_throttle(&self) -> Arc<rs_node::throttle::Throttle> {
        self.throttle
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Replaces the throttle (usage counters carry over: they live in
    /// throttle.db, or the farm's database, by rule name and key).
    pub fn set_throttle(&self, cfg: rs_node::throttle::ThrottleConfig) -> Result<(), String> {
        let old = self.current_throttle();
        old.flush()?;
        let t = rs_node::throttle::open_at(
            &cfg,
            self.clock.clone(),
            &self.cfg.data_dir,
            &self.cfg.throttle_location(),
        )?;
        // A farm's rates stay shared among its live members.
        t.set_share(old.share());
        // A farm's usage totals are read in before the new throttle is in
        // force: until its first flush a second later, its quota usage
        // (the portal's, the status tree's) would read empty.
        if let Err(e) = t.flush() {
            tracing::warn!("throttle usage: {e}");
        }
        if let Ok(mut w) = self.throttle.write() {
            *w = Arc::new(t);
        }
        if let Ok(mut w) = self.throttle_cfg.write() {
            *w = cfg;
        }
        Ok(())
    }

    /// Opens the store.
    pub fn open(mut cfg: Config) -> anyhow::Result<Arc<Self>> {
        // Without a list of its own, the server keeps the CA's in force.
        if let (Some(t), Some(ca)) = (cfg.tls.as_mut(), &cfg.ca)
            && t.crl.is_none()
        {
            t.crl = Some(ca.dir.join("crl.pem"));
        }
        let id = cfg.rs_id().map_err(anyhow::Error::msg)?;
        let at = cfg.store_location();
        let store = store::Store::open(&at)
            .map_err(|e| anyhow::anyhow!("opening the store at {}: {e}", at.describe()))?;
        let slot = Arc::new(std::sync::OnceLock::new());
        let presence = farm::join(&at, slot.clone())
            .map_err(|e| anyhow::anyhow!("joining the farm at {}: {e}", at.describe()))?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let throttle = rs_node::throttle::open_at(
            &cfg.throttle,
            clock.clone(),
            &cfg.data_dir,
            &cfg.throttle_location(),
        )
        .map_err(anyhow::Error::msg)?;
        let timeout = Duration::from_secs(cfg.webhook_timeout_secs.max(1));
        let mut modules: Vec<Arc<dyn modules::ServiceModule>> =
            vec![Arc::new(monitor::HeartbeatMonitor)];
        modules.extend(cfg.modules.iter().map(|m| m.build(timeout)));
        let uploads = bulk::Uploads::open(&cfg.data_dir, cfg.bulk.clone())?;
        let tls = match &cfg.tls {
            Some(t) => Some(rs_net::tls::TlsServer::new(t).map_err(anyhow::Error::msg)?),
            None => None,
        };
        // Seals are checked against the same revocation list as handshakes.
        let opener = match (&cfg.tls, &tls) {
            (Some(t), Some(server)) => Some(
                rs_net::seal::Opener::new(t, server.revocations.clone())
                    .map_err(anyhow::Error::msg)?,
            ),
            _ => None,
        };
        if opener.is_none() && cfg.seal.require != rs_net::seal::Require::None {
            anyhow::bail!("[seal] require needs [tls]: seals are checked against the CA");
        }
        let app = Arc::new(AppServer {
            presence,
            id,
            uploads,
            downloads: publish::Stats::default(),
            history: portal::charts::History::default(),
            tls,
            opener,
            ca: match &cfg.ca {
                Some(c) => {
                    let records = rs_net::pki::records_at(&c.dir, cfg.database.as_deref());
                    let ca = rs_net::pki::Ca::open_with(&c.dir, records)
                        .map_err(|e| anyhow::anyhow!("[ca] dir {}: {e}", c.dir.display()))?;
                    ca.check_writable().map_err(|e| {
                        anyhow::anyhow!(
                            "[ca] dir {} is not writable ({e}): enrollment, renewal and revocation \
                             write ca.db and crl.pem there; run the server as a user who may \
                             write it, and under systemd with ProtectSystem=strict list it in \
                             ReadWritePaths=",
                            c.dir.display()
                        )
                    })?;
                    Some(Arc::new(ca))
                }
                None => None,
            },
            auth: rs_net::auth::Stats::default(),
            modules,
            store,
            clock,
            throttle: std::sync::RwLock::new(Arc::new(throttle)),
            throttle_cfg: std::sync::RwLock::new(cfg.throttle.clone()),
            load: rs_node::ingress::Load::new(cfg.busy_envelopes),
            expand_ready: tokio::sync::Notify::new(),
            tasks_ready: tokio::sync::Notify::new(),
            feed_ready: tokio::sync::watch::Sender::new(0),
            counts: rs_node::pipeline::Counts::default(),
            stats: ingress::Stats::default(),
            started: rs_protocol::Timestamp::now(),
            outbox_ready: Arc::new(rs_node::ingress::BackChannelReady::new(cfg.offer_again())),
            stopping: CancellationToken::new(),
            jobs_changed: tokio::sync::watch::Sender::new(0),
            metrics: rs_net::metrics::Registry::new(),
            gauges: Gauges::default(),
            memory: cfg
                .memory_limit_mb
                .map(|mb| rs_node::mem::MemoryBound::new(mb << 20)),
            cfg,
        });
        let _ = slot.set(Arc::downgrade(&app));
        app.register_metrics();
        Ok(app)
    }

    /// Registers every counter and gauge of this server in its registry.
    fn register_metrics(self: &Arc<Self>) {
        let r = &self.metrics;
        self.counts.register(r);
        self.stats.register(r);
        self.auth.register(r);
        self.uploads.stats.register(r);
        self.downloads.register(r);
        if let Some(t) = &self.tls {
            t.stats.register(r);
            r.add(&t.revocations.cut);
        }
        if let Some(o) = &self.opener {
            o.stats.register(r);
        }
        rs_node::mem::register_resident(r);
        if let Some(m) = &self.memory {
            m.register(r);
        }
        let g = &self.gauges;
        g.throttle.register(r);
        r.add(g.stored.collector());
        r.add(&g.store_messages);
        r.add(&g.components);
        r.add(&g.backchannel_pending);
        r.add(&g.tasks);
        r.add(&g.transit);
        r.add(&g.held_at_mlm);
        rs_node::metrics::pulling(
            r,
            self,
            "envelopes_in_hand",
            "Envelopes being handled now, held long polls among them.",
            |a| a.load.inflight() as f64,
        );
        rs_node::metrics::pulling(
            r,
            self,
            "longpolls_held",
            "Long polls held now, waiting for a back-channel message.",
            |a| a.outbox_ready.holders() as f64,
        );
    }

    /// Sets the gauges read from storage, before a scrape.
    pub async fn refresh_metrics(&self) {
        let g = &self.gauges;
        g.throttle.update(&self.current_throttle());
        let gauge = rs_net::metrics::set;
        match self.store.stats().await {
            Ok(st) => {
                gauge(&g.store_messages, st.messages);
                gauge(&g.components, st.components);
                g.stored.set("new", st.stored_total);
                g.stored.set("duplicate", st.duplicates_total);
            }
            Err(e) => tracing::error!("metrics: store stats: {e}"),
        }
        match self.store.depths().await {
            Ok((pending, tasks)) => {
                gauge(&g.backchannel_pending, pending);
                g.tasks.reset();
                for (state, n) in tasks {
                    gauge(&g.tasks.with_label_values(&[state.as_str()]), n);
                }
            }
            Err(e) => tracing::error!("metrics: store depths: {e}"),
        }
    }

    /// All routes, finished for serving.
    pub fn routes(
        self: &Arc<Self>,
    ) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
    + Clone
    + Send
    + Sync
    + 'static {
        let health = warp::path!("rs" / "v1" / "health")
            .and(warp::get())
            .map(|| "ok\n");
        finish(
            security::gate(self).and(
                rs_node::pipeline::route(self.clone())
                    .or(bulk::routes(self.clone()))
                    .unify()
                    .or(security::public_routes(self.clone()))
                    .unify()
                    .or(bulk::control_routes(self.clone()))
                    .unify()
                    .or(publish::routes(self.clone()))
                    .unify()
                    .or(control::routes(self.clone()))
                    .unify()
                    .or(security::control_routes(self.clone()))
                    .unify()
                    .or(tokens::routes(self.clone()))
                    .unify()
                    .or(rollouts::routes(self.clone()))
                    .unify()
                    .or(portal::routes(self.clone()))
                    .unify()
                    .or(health.map(warp::Reply::into_response))
                    .unify(),
            ),
        )
    }
}

/// The daemon as `rs-appserver --config FILE` runs it: signals (SIGHUP
/// reloads the file, [`rs_node::daemon::lifecycle`]), the configuration,
/// the listener (kept across a reload), [`run`], and a start in place
/// after a reload.
pub async fn daemon(
    config: std::path::PathBuf,
    addr_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let shutdown = rs_node::daemon::signals(Some(config.clone()), Config::parse);
    let cfg = Config::load(&config).map_err(anyhow::Error::msg)?;
    let listener = rs_node::daemon::bind("main", cfg.listen, addr_file.as_deref()).await?;
    rs_node::daemon::finish(run(cfg, listener, shutdown).await?)
}

/// Serves until `shutdown`, purging expired messages hourly.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Exit> {
    let _lock = rs_store::datadir::DataDirLock::acquire(&cfg.data_dir, "rs-appserver")
        .map_err(anyhow::Error::msg)?;
    let app = AppServer::open(cfg)?;
    // A throttle set at run time outlives restarts.
    app.load_stored_throttle().await?;
    tracing::info!(
        "rs-appserver {} listening on {}",
        app.id,
        listener.local_addr()?
    );
    // The portal's charts: a sample now, then every chart_sample_secs.
    let sampler = {
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(portal::charts::every(&app));
            loop {
                tokio::select! {
                    _ = tick.tick() => app.history.sample(&app).await,
                    () = shutdown.cancelled() => return,
                }
            }
        })
    };
    let rollouts = tokio::spawn(rollouts::controller(app.clone(), shutdown.clone()));
    let purge = {
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                // Once per farm, on its leader; a member that is not (or
                // not yet: it takes a moment at start) looks again soon.
                let next = if app.is_leader() {
                    match app.store.purge(app.clock.now(), app.cfg.retention()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!("purged {n} messages past the retention window"),
                        Err(e) => tracing::error!("purge: {e}"),
                    }
                    Duration::from_secs(3600)
                } else {
                    Duration::from_secs(1)
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(next) => {}
                }
            }
        })
    };
    {
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            app.stopping.cancel();
        });
    }
    if app.in_farm() {
        tokio::spawn(farm::beat(app.clone(), shutdown.clone()));
    }
    let expire = tokio::spawn(jobs::expire(app.clone(), shutdown.clone()));
    let uploads = tokio::spawn(bulk::sweep(app.clone(), shutdown.clone()));
    let unpublisher = tokio::spawn(publish::unpublisher(app.clone(), shutdown.clone()));
    // Configured modules' own subscriptions (created or updated).
    for m in &app.cfg.modules {
        if let Some(s) = &m.subscribe {
            let sub = s.to_subscription(&m.name).map_err(anyhow::Error::msg)?;
            app.store.subscribe(sub, app.clock.now()).await?;
        }
    }
    let timers = tokio::spawn(modules::run_timers(app.clone(), shutdown.clone()));
    let expander = tokio::spawn(collector::run_expander(app.clone(), shutdown.clone()));
    let pool = tokio::spawn(collector::run_pool(
        app.clone(),
        collector::PoolConfig {
            processors: app.cfg.processors,
            visibility: Duration::from_secs(app.cfg.task_visibility_secs.max(1)),
            max_attempts: app.cfg.task_max_attempts.max(1),
            timeout: Duration::from_secs(app.cfg.webhook_timeout_secs.max(1)),
        },
        shutdown.clone(),
    ));
    let flush = {
        let app = app.clone();
        tokio::spawn(rs_node::throttle::flush_loop(
            move || app.current_throttle(),
            shutdown.clone(),
        ))
    };
    let push = tokio::spawn(jobs::push(app.clone(), shutdown.clone()));
    tokio::spawn(rs_node::ingress::reoffer_ticker(
        app.outbox_ready.clone(),
        shutdown.clone(),
    ));
    if let (Some(_), Some(t)) = (&app.tls, &app.cfg.tls) {
        // Revocations made by `rsctl ca revoke` on the CA directory (or a
        // list dropped in place), or through another member of a farm
        // (the CA's records are the farm's), are in force within the
        // refresh.
        let (app, shutdown) = (app.clone(), shutdown.clone());
        let every = Duration::from_secs(t.crl_refresh_secs.max(1));
        tokio::spawn(async move {
            let mut seen = None;
            loop {
                if let Some(ca) = app.ca.clone() {
                    seen = security::rewrite_crl_if_revoked(ca, seen).await;
                }
                app.reload_crl();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
    }
    let metrics = match app.cfg.metrics_listen {
        Some(addr) => rs_node::metrics::listen(addr).await,
        None => None,
    };
    if let Some(l) = metrics {
        let a = app.clone();
        tokio::spawn(rs_node::metrics::serve(
            l,
            app.metrics.clone(),
            move || {
                let a = a.clone();
                async move { a.refresh_metrics().await }
            },
            shutdown.clone(),
        ));
    }
    let serve_cfg = ServeConfig {
        observer: Some(Arc::new(audit::Auditor(Arc::downgrade(&app)))),
        grace: app.cfg.shutdown_grace(),
        admit: app.memory.as_ref().map(|m| m.admission()),
        ..ServeConfig::default()
    };
    {
        let a = app.clone();
        rs_node::daemon::watchdog(shutdown.clone(), move || {
            let a = a.clone();
            async move { a.store.ping().await.map_err(|e| e.to_string()) }
        });
    }
    rs_node::daemon::ready(&format!("serving on {}", listener.local_addr()?));
    serve_tcp(listener, app.tls.clone(), app.routes(), serve_cfg, shutdown).await;
    let _ = purge.await;
    let _ = sampler.await;
    let _ = rollouts.await;
    let _ = expire.await;
    let _ = uploads.await;
    let _ = unpublisher.await;
    let _ = timers.await;
    let _ = pool.await;
    let _ = expander.await;
    let _ = flush.await;
    let _ = push.await;
    tracing::info!("rs-appserver stopped");
    Ok(Exit::Stopped)
}
