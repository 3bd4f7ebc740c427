//! The heartbeat monitor (a built-in service module): a proxy or MLM that
//! misses `heartbeat_late_after` heartbeat intervals is marked late, after
//! `heartbeat_failed_after` failed; hearing from it again recovers it.
//! Each change of state is stored as an alarm from this server (class
//! `infrastructure`, subclass `componentLate`, `componentFailed` or
//! `componentRecovered`, the component as the alarm's instance, its key
//! `heartbeat:ID`), so it shows in queries and reaches every subscription
//! that matches, like any other message. The alarm's ID derives from the
//! component, the new state and the last time it was heard from, so a
//! restart between storing it and recording the state cannot raise it
//! twice.

use std::sync::Arc;
use std::time::Duration;

use rs_protocol::model::*;
use rs_protocol::{MessageId, RsId, Timestamp};

use crate::AppServer;
use crate::store::Incoming;

pub use crate::store::Health;

fn notification(
    app: &AppServer,
    component: &RsId,
    health: Health,
    last_seen: i64,
    now: Timestamp,
) -> Option<Incoming> {
    let (sub, severity, state, text) = match health {
        Health::Late => (
            "componentLate",
            Severity::Major,
            AlarmState::Raised,
            format!("{component} missed its heartbeats"),
        ),
        Health::Failed => (
            "componentFailed",
            Severity::Critical,
            AlarmState::Updated,
            format!("{component} has not been heard from; considered failed"),
        ),
        Health::Ok => (
            "componentRecovered",
            Severity::Info,
            AlarmState::Cleared,
            format!("{component} is heard from again"),
        ),
    };
    let id = MessageId::new(format!(
        "hb-{}-{}-{last_seen}",
        component.as_str().replace('.', "_"),
        health.as_str()
    ))
    .ok()?;
    let m = Message {
        header: Header {
            id,
            created: now,
            class: Classification::new(rs_protocol::control::CLASS_INFRASTRUCTURE, sub),
            route: Route::Source(Source {
                component: app.id.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                qos: Qos {
                    expiry: None,
                    precedence: 8,
                    persistent: true,
                },
            }),
            routing: Default::default(),
        },
        content: Content::Alarm(Alarm {
            severity,
            state,
            instance: Some(component.clone()),
            key: Some(format!("heartbeat:{component}")),
            text,
            details: vec![Detail::new(
                "last-seen",
                Timestamp::from_millis(last_seen)
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            )],
        }),
    };
    Some(Incoming {
        severity: Some(severity),
        ..Incoming::new(m.to_raw())
    })
}

/// The heartbeat monitor as a timer service module (checks every second).
#[derive(Debug, Default)]
pub struct HeartbeatMonitor;

impl crate::modules::ServiceModule for HeartbeatMonitor {
    fn name(&self) -> &str {
        "heartbeat"
    }

    fn deliver<'a>(
        &'a self,
        _app: &'a AppServer,
        _d: &'a crate::modules::Delivered<'a>,
    ) -> crate::modules::BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("the heartbeat monitor takes no messages".to_owned()) })
    }

    fn takes_messages(&self) -> bool {
        false
    }

    fn period(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }

    fn tick<'a>(&'a self, app: &'a Arc<AppServer>) -> crate::modules::BoxFuture<'a, ()> {
        Box::pin(check(app))
    }
}

/// One round: every component's health against its last heartbeat.
async fn check(app: &AppServer) {
    let interval = Duration::from_secs(app.cfg.heartbeat_secs.max(1));
    let late = interval * app.cfg.heartbeat_late_after.max(1);
    let failed = interval
        * app
            .cfg
            .heartbeat_failed_after
            .max(app.cfg.heartbeat_late_after + 1);
    let now = app.clock.now();
    // Just started (perhaps after being down itself): give every
    // component the time to call in before judging it.
    if now.since(app.started) < late {
        return;
    }
    let rows = match app.store.health_scan().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("heartbeat monitor: {e}");
            return;
        }
    };
    for (id, last_seen, was) in rows {
        let age = Duration::from_millis(u64::try_from(now.as_millis() - last_seen).unwrap_or(0));
        let health = if age > failed {
            Health::Failed
        } else if age > late {
            Health::Late
        } else {
            Health::Ok
        };
        if health == was {
            continue;
        }
        let Ok(component) = RsId::new(&id) else {
            continue;
        };
        let Some(inc) = notification(app, &component, health, last_seen, now) else {
            continue;
        };
        tracing::info!("{component}: {} -> {}", was.as_str(), health.as_str());
        match app.store.ingest(vec![inc], now).await {
            Ok(_) => {
                app.stored_new();
                if let Err(e) = app.store.set_health(id, health, now).await {
                    tracing::error!("heartbeat monitor: {e}");
                }
            }
            Err(e) => tracing::error!("heartbeat monitor: {e}"),
        }
    }
}
