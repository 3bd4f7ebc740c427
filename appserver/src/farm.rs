//! What makes several application servers on one PostgreSQL database one
//! farm (docs/operations.md, "Scaling out"): the channels on which a
//! member's commits wake the others, the farm's leader, and the locks
//! that order what a single writer used to.
//!
//! - A held long poll on one member wakes when another queues a message
//!   for its hop ([`OUTBOX`]); the expander when any member stores
//!   messages ([`MESSAGES`]); idle processors and feed pulls when tasks are
//!   made ([`TASKS`]); job watchers and pushes when a job changes
//!   ([`JOBS`]); and every member puts a throttle document set through
//!   any of them in force ([`SETTINGS`]). Each member also wakes its own
//!   waiters directly.
//! - Work that runs once per farm (retention, job expiry and pushes,
//!   upload sweeps, closing offers, module timers such as the heartbeat
//!   monitor, the collector's expander) runs on the leader only.
//!
//! On SQLite there is one server: it is always the leader.

use std::sync::{Arc, OnceLock, Weak};

use rs_store::db::DbError;
use rs_store::sql::{Location, Presence};

use crate::AppServer;

pub(crate) const OUTBOX: &str = "rs_outbox";
pub(crate) const MESSAGES: &str = "rs_messages";
pub(crate) const TASKS: &str = "rs_tasks";
pub(crate) const JOBS: &str = "rs_jobs";
pub(crate) const SETTINGS: &str = "rs_settings";
const CHANNELS: &[&str] = &[OUTBOX, MESSAGES, TASKS, JOBS, SETTINGS];

/// The farm's members as their beats recorded them, each `ok` or `failed`
/// (silent for `rs_store::members::LATE`).
pub(crate) async fn members(
    app: &AppServer,
) -> Result<Vec<(rs_store::members::Member, rs_protocol::control::NodeState)>, DbError> {
    use rs_store::members::{FORGET, alive, before};
    let now = app.clock.now();
    Ok(app
        .store
        .members(before(now, FORGET))
        .await?
        .into_iter()
        .map(|m| {
            let state = if alive(&m, now) {
                rs_protocol::control::NodeState::Ok
            } else {
                rs_protocol::control::NodeState::Failed
            };
            (m, state)
        })
        .collect())
}

/// Records this member's beat every `rs_store::members::BEAT` until `stop`, and shares the
/// farm's throttle rates among the live members (each admits its share,
/// so the farm admits the rate; quotas are counted in the farm's database
/// already).
pub(crate) async fn beat(app: Arc<AppServer>, stop: tokio_util::sync::CancellationToken) {
    let name = app.cfg.member_name();
    loop {
        let m = rs_store::members::Member {
            name: name.clone(),
            started: app.started,
            seen: app.clock.now(),
            in_hand: app.load.inflight() as u64,
            envelopes: app.counts.envelopes.get(),
            forwarded: app.counts.accepted.get(),
        };
        if let Err(e) = app.store.beat(m).await {
            tracing::warn!("farm membership: {e}");
        }
        // While the database is away the last count holds.
        if let Ok(all) = members(&app).await {
            let live = all
                .iter()
                .filter(|(_, s)| *s == rs_protocol::control::NodeState::Ok)
                .count();
            let live = u32::try_from(live).unwrap_or(u32::MAX).max(1);
            let t = app.current_throttle();
            if live != t.share() {
                tracing::info!(
                    "farm: {live} live member(s); each admits 1/{live} of every throttle rate"
                );
                t.set_share(live);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(rs_store::members::BEAT) => {}
        }
    }
}

/// The advisory lock the leader holds.
const LEADER: i64 = 0x7273_6c65_6164;
/// The lock that puts message sequence numbers in commit order.
pub(crate) const MESSAGE_ORDER: i64 = 0x7273_6d73_6771;

/// Joins the farm at `at`; `app` is filled in once the server exists.
pub(crate) fn join(
    at: &Location,
    app: Arc<OnceLock<Weak<AppServer>>>,
) -> Result<Presence, DbError> {
    // Notifications arrive on the presence thread; async work they start
    // runs on the server's runtime.
    let rt = tokio::runtime::Handle::try_current().ok();
    let channels = CHANNELS.iter().map(|c| (*c).to_owned()).collect();
    Presence::start(at, channels, LEADER, move |channel| {
        let Some(app) = app.get().and_then(Weak::upgrade) else {
            return;
        };
        wake(&app, channel, rt.as_ref());
    })
}

/// What another member's commit on `channel` means here.
fn wake(app: &Arc<AppServer>, channel: &str, rt: Option<&tokio::runtime::Handle>) {
    match channel {
        OUTBOX => app.outbox_ready.notify_waiters(),
        MESSAGES => app.stored_new(),
        TASKS => {
            app.tasks_ready.notify_waiters();
            app.feed_ready.send_modify(|v| *v += 1);
        }
        JOBS => app.jobs_changed.send_modify(|v| *v += 1),
        // The throttle document, set through any member, is the farm's.
        SETTINGS => {
            if let Some(rt) = rt {
                let app = app.clone();
                rt.spawn(async move {
                    if let Err(e) = app.load_stored_throttle().await {
                        tracing::error!("throttle set by another member: {e}");
                    }
                });
            }
        }
        _ => {}
    }
}
