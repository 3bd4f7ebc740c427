//! Peripheral work (seeds 000/001): the durable collector queue, its
//! processors, and the subscriptions that create the work.
//!
//! Core work (validate, deduplicate, persist) happens before the reply.
//! The stored messages, in storage order, are the collector's durable
//! queue: after the reply, the *expander* reads the messages past its
//! cursor and makes one *task* per matching subscription (`tasks` table),
//! moving its cursor (`cursors`) past them in the same transaction, so
//! each stored message gets its tasks exactly once, crash or not, and no
//! task exists without its message. It gives way to the core work while
//! envelopes are in hand. A pool of processors takes the tasks up:
//!
//! - a processor *claims* a task (state `taken`, `attempts` + 1, invisible
//!   until `visible_at` = now + the visibility timeout, `taken_by` = the
//!   processor); only the oldest unfinished task of a subscription can be
//!   claimed, so each subscription's deliveries happen in order;
//! - it completes the task only if its claim still stands (same `taken_by`
//!   and `attempts`): a processor whose claim timed out and was taken over
//!   cannot complete it too;
//! - a failure (or a processor that died: its claim times out) makes the
//!   task `ready` again after a backoff; after `max_attempts` it is
//!   `failed`, listed and replayed through the control API.
//!
//! The task's context (the documented schema, docs/control-api.md): the
//! subscription, the message ID, and through it the stored message with
//! its source, class, type, severity, times and route.

use std::sync::Arc;
use std::time::Duration;

use crate::AppServer;

pub use crate::subscription::{Delivery, Subscription};

pub use crate::store::tasks::{Claimed, TaskCounts, TaskRow};

/// Settings of the processor pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub processors: usize,
    pub visibility: Duration,
    pub max_attempts: u32,
    pub timeout: Duration,
}

/// Runs the processors until `stop`.
/// Background work gives way while envelopes were answered this recently...
const GIVE_WAY: Duration = Duration::from_millis(50);
/// ...but for no longer than this at a time.
const MAX_DEFER: Duration = Duration::from_secs(1);

/// The expander: makes the tasks of stored messages after the replies,
/// in storage order. It gives way to the core work: while envelopes are
/// in hand it expands in small steps with a pause between, so a burst is
/// answered at full speed and its peripheral work follows.
pub async fn run_expander(app: Arc<AppServer>, stop: tokio_util::sync::CancellationToken) {
    let mut last_step = tokio::time::Instant::now();
    loop {
        // Once per farm: on its leader (woken when it becomes one).
        while app.is_leader() {
            // While replies are being made, wait (but never more than
            // MAX_DEFER between steps, so the work keeps up under any load).
            if app.load.busy_within(GIVE_WAY) && last_step.elapsed() < MAX_DEFER {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            last_step = tokio::time::Instant::now();
            let limit = 1000;
            match app.store.expand(limit, app.clock.now()).await {
                Ok((n, tasks)) => {
                    if tasks > 0 {
                        app.tasks_ready.notify_one();
                        app.feed_ready.send_modify(|v| *v += 1);
                    }
                    if n < limit {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!("collector expander: {e}");
                    break;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = app.expand_ready.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

pub async fn run_pool(
    app: Arc<AppServer>,
    cfg: PoolConfig,
    stop: tokio_util::sync::CancellationToken,
) {
    let client = match reqwest::Client::builder().timeout(cfg.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("processors not started: {e}");
            return;
        }
    };
    let mut workers = Vec::new();
    for n in 0..cfg.processors.max(1) {
        let (app, stop, client) = (app.clone(), stop.clone(), client.clone());
        workers.push(tokio::spawn(async move {
            let me = format!(
                "{}-{n}-{}",
                std::process::id(),
                rs_protocol::MessageId::generate()
            );
            let mut last_work = tokio::time::Instant::now();
            loop {
                if stop.is_cancelled() {
                    return;
                }
                // Give way to the replies while envelopes are being
                // answered, for at most MAX_DEFER between deliveries.
                if app.load.busy_within(GIVE_WAY) && last_work.elapsed() < MAX_DEFER {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                last_work = tokio::time::Instant::now();
                let now = app.clock.now();
                let task = match app.store.claim(me.clone(), now, cfg.visibility).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!("collector: {e}");
                        None
                    }
                };
                let Some(task) = task else {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = app.tasks_ready.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                };
                // There may be more: let another processor look.
                app.tasks_ready.notify_one();
                let result = process(&app, &client, &task).await;
                let now = app.clock.now();
                match result {
                    Ok(()) => match app.store.complete_task(&task, me.clone(), now).await {
                        Ok(true) => {
                            app.stats.tasks_done.inc();
                        }
                        Ok(false) => {
                            tracing::warn!("task {} was taken over; not completed here", task.id)
                        }
                        Err(e) => tracing::error!("task {}: {e}", task.id),
                    },
                    Err(why) => {
                        app.stats.tasks_failed.inc();
                        let backoff =
                            rs_net::retry::backoff(task.attempts, Duration::from_secs(300));
                        tracing::warn!("task {} ({}): {why}", task.id, task.sub.name);
                        if let Err(e) = app
                            .store
                            .fail_task(&task, me.clone(), why, now, backoff, cfg.max_attempts)
                            .await
                        {
                            tracing::error!("task {}: {e}", task.id);
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// One delivery.
async fn process(app: &AppServer, client: &reqwest::Client, t: &Claimed) -> Result<(), String> {
    if t.sub.delivery == Delivery::Feed {
        // Pulled, never claimed (claims take webhook and module tasks).
        return Ok(());
    }
    let rows = app
        .store
        .query(crate::store::Query {
            id: Some(t.message.clone()),
            limit: 1,
            ..crate::store::Query::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let row = rows
        .first()
        .ok_or_else(|| format!("message {} is no longer stored", t.message))?;
    let doc = crate::documents::messages_doc(std::slice::from_ref(row));
    match &t.sub.delivery {
        Delivery::Feed => Ok(()),
        Delivery::Module(name) => {
            let m = app
                .module(name)
                .ok_or_else(|| format!("no service module named {name:?} is configured"))?;
            let d = crate::modules::Delivered {
                task: t.id,
                attempt: t.attempts,
                subscription: &t.sub.name,
                message: row,
                xml: &doc,
            };
            m.deliver(app, &d).await
        }
        Delivery::Webhook(url) => {
            let r = client
                .post(url)
                .header(http::header::CONTENT_TYPE, "text/xml; charset=utf-8")
                .header("X-RS-Message-Id", &t.message)
                .header("X-RS-Subscription", &t.sub.name)
                .header("X-RS-Task", t.id.to_string())
                .body(doc)
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(format!("{url} answered {}", r.status()))
            }
        }
    }
}
