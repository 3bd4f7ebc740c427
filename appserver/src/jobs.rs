//! Jobs over time: expiry on the server's clock, and pushing each job's
//! progress to its subscriber (the `notify` URL of the send request).
//!
//! A push is the whole job document (`dtd/control-api.dtd`, `<job>`) with
//! its `version`; the subscriber keeps the highest version it saw. Pushes
//! are retried until the subscriber answers 2xx, so it sees every final
//! state at least once, across restarts of either side (the last version
//! pushed is kept in the store).

use std::sync::Arc;
use std::time::Duration;

use rs_protocol::codec::api::encode_job;
use tokio_util::sync::CancellationToken;

use crate::AppServer;

/// How long a subscriber may take to answer one push.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait before pushing again to a subscriber that failed.
const RETRY: Duration = Duration::from_secs(5);

/// Marks destinations of expired jobs, once a second.
pub async fn expire(app: Arc<AppServer>, shutdown: CancellationToken) {
    loop {
        if app.is_leader() {
            match app.store.expire(app.clock.now()).await {
                Ok(true) => app.jobs_changed.send_modify(|v| *v += 1),
                Ok(false) => {}
                Err(e) => tracing::error!("job expiry: {e}"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Pushes changed jobs to their subscribers.
pub async fn push(app: Arc<AppServer>, shutdown: CancellationToken) {
    let client = match reqwest::Client::builder().timeout(PUSH_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("job notifications disabled: {e}");
            return;
        }
    };
    let mut changes = app.jobs_changed.subscribe();
    loop {
        changes.borrow_and_update();
        let mut failed = false;
        // Once per farm: on its leader (woken when it becomes one).
        let due = if app.is_leader() {
            app.store.unnotified(100).await
        } else {
            Ok(Vec::new())
        };
        match due {
            Ok(jobs) => {
                for (url, job) in jobs {
                    let r = client
                        .post(&url)
                        .header(http::header::CONTENT_TYPE, "text/xml; charset=utf-8")
                        .body(encode_job(&job))
                        .send()
                        .await;
                    match r {
                        Ok(resp) if resp.status().is_success() => {
                            if let Err(e) = app.store.notified(job.id.clone(), job.version).await {
                                tracing::error!("job {}: {e}", job.id);
                            }
                        }
                        Ok(resp) => {
                            tracing::warn!(
                                "subscriber {url} answered {} for job {}",
                                resp.status(),
                                job.id
                            );
                            failed = true;
                        }
                        Err(e) => {
                            tracing::warn!("subscriber {url} for job {}: {e}", job.id);
                            failed = true;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!("job notifications: {e}");
                failed = true;
            }
        }
        if failed {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        } else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
        }
    }
}
