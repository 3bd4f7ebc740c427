//! Downloads offered to the proxy (seed 004, Figs. 22-23). An offer (a
//! back-channel `bulk-request` with `direction="download"`) is recorded in
//! `bulk.db` and left unacknowledged until the file is here. The worker
//! waits for the throttle (windows and quotas on class `bulk`, transfers at
//! once), fetches the file from the next hop's URL (resuming with `Range`
//! after a cut), verifies size and SHA-256, acknowledges the offer on the
//! next POST, and processes the file by its class:
//!
//! - `software`: runs `[bulk] install_command` with the file and reports
//!   its exit status (and the tail of its output);
//! - `configuration`: applies it as a configuration change (TOML laid over
//!   the configuration file) and restarts to take it up;
//! - anything else: keeps it under `data_dir/downloads/`.
//!
//! The answer is one `response` to the offer (ID `re-` + the offer's), so
//! the job at the application server shows each destination's outcome.
//! A download interrupted while being processed (the proxy died) is
//! answered `failed` rather than processed twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rs_net::bulk::Answer;
use rs_node::throttle::Held;
use rs_protocol::codec::RawMessage;
use rs_protocol::control_messages::{Answer as Reply, answer_refused};
use rs_protocol::model::*;
use rs_protocol::{MessageId, Outcome, Timestamp};
use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use crate::Proxy;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS downloads (
    offer    TEXT    PRIMARY KEY,
    sha256   TEXT    NOT NULL,
    name     TEXT    NOT NULL,
    size     INTEGER NOT NULL,
    class    TEXT    NOT NULL,
    subclass TEXT    NOT NULL,
    url      TEXT    NOT NULL,
    expires  INTEGER,
    state    TEXT    NOT NULL DEFAULT 'offered',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at  INTEGER NOT NULL,
    reason   TEXT,
    result   TEXT,
    created  INTEGER NOT NULL,
    updated  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS downloads_due ON downloads (state, next_at);
";

/// A download as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Download {
    /// The offer's message ID.
    pub offer: String,
    pub sha256: String,
    pub name: String,
    pub size: u64,
    pub class: String,
    pub subclass: String,
    /// `offered` (waiting or fetching), `fetched`, `processing`, `done` or
    /// `failed`.
    pub state: String,
    pub reason: Option<String>,
    /// What processing said (the install command's output, the path kept).
    pub result: Option<String>,
    pub updated: String,
}

const COLUMNS: &str = "offer, sha256, name, size, class, subclass, state, reason, result,
     updated, url, expires, attempts";

#[derive(Debug, Clone)]
struct Row {
    d: Download,
    url: String,
    expires: Option<i64>,
    attempts: u32,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        d: Download {
            offer: r.get(0)?,
            sha256: r.get(1)?,
            name: r.get(2)?,
            size: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
            class: r.get(4)?,
            subclass: r.get(5)?,
            state: r.get(6)?,
            reason: r.get(7)?,
            result: r.get(8)?,
            updated: Timestamp::from_millis(r.get(9)?)
                .map(|t| t.to_string())
                .unwrap_or_default(),
        },
        url: r.get(10)?,
        expires: r.get(11)?,
        attempts: r.get(12)?,
    })
}

/// Where downloads are kept.
fn dir(proxy: &Proxy) -> PathBuf {
    proxy.cfg.data_dir.join("downloads")
}

async fn set(
    proxy: &Proxy,
    offer: &str,
    state: &'static str,
    next_at: Timestamp,
    attempts: u32,
    reason: Option<String>,
    result: Option<String>,
) -> Result<(), String> {
    let offer = offer.to_owned();
    let now = proxy.clock.now();
    proxy
        .uploads
        .db
        .write(move |s| {
            s.0.prepare_cached(
                "UPDATE downloads SET state = ?2, next_at = ?3, attempts = ?4, reason = ?5,
                        result = COALESCE(?6, result), updated = ?7
                 WHERE offer = ?1",
            )?
            .execute(params![
                offer,
                state,
                next_at.as_millis(),
                attempts,
                reason,
                result,
                now.as_millis()
            ])?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
}

/// Downloads, newest first.
pub async fn list(proxy: &Proxy, limit: usize) -> Result<Vec<Download>, String> {
    proxy
        .uploads
        .db
        .read(move |s| {
            let mut st = s.0.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM downloads ORDER BY created DESC LIMIT ?1"
            ))?;
            let rows = st
                .query_map([limit as i64], row)?
                .map(|r| r.map(|r| r.d))
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
        .map_err(|e| e.to_string())
}

/// An offer arrived on the back-channel. Returns whether to acknowledge
/// it now: only once the file is here (verified), so the tier above keeps
/// offering it, and keeps the file, until then.
pub async fn offered(
    proxy: &Proxy,
    m: &RawMessage,
    b: &BulkRequest,
    via: &rs_node::uplink::Via,
) -> Result<bool, String> {
    let offer = m.header.id.to_string();
    let o = offer.clone();
    let state: Option<String> = proxy
        .uploads
        .db
        .read(move |s| {
            Ok(s.0
                .query_row("SELECT state FROM downloads WHERE offer = ?1", [o], |r| {
                    r.get(0)
                })
                .optional()?)
        })
        .await
        .map_err(|e| e.to_string())?;
    if let Some(state) = state {
        return Ok(state != "offered");
    }
    let Some(url) = b.url.as_deref() else {
        tracing::warn!("download offer {offer} has no URL; ignored");
        return Ok(true);
    };
    let url = via.offered_url(url);
    if b.name.contains(['/', '\\']) || b.name == ".." || b.name == "." || b.name.is_empty() {
        tracing::warn!("download offer {offer}: file name {:?} refused", b.name);
        return Ok(true);
    }
    let now = proxy.clock.now();
    let (sha, name, size, class, sub, expires) = (
        rs_protocol::codec::sha256_hex(&b.sha256),
        b.name.clone(),
        i64::try_from(b.size).unwrap_or(i64::MAX),
        b.class.class.to_string(),
        b.class.subclass.to_string(),
        b.expires.or(m.header.expiry()).map(Timestamp::as_millis),
    );
    proxy
        .uploads
        .db
        .write(move |s| {
            s.0.prepare_cached(
                "INSERT INTO downloads (offer, sha256, name, size, class, subclass, url, expires,
                                        next_at, created, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9)
                 ON CONFLICT (offer) DO NOTHING",
            )?
            .execute(params![
                offer,
                sha,
                name,
                size,
                class,
                sub,
                url,
                expires,
                now.as_millis()
            ])?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("download {} ({} bytes) offered", b.name, b.size);
    proxy.uploads.wake.notify_one();
    Ok(false)
}

/// Offers due for a look (the worker calls this each round).
pub(crate) async fn due(proxy: &Proxy, now: Timestamp) -> Result<Vec<String>, String> {
    proxy
        .uploads
        .db
        .read(move |s| {
            let mut st = s.0.prepare_cached(
                "SELECT offer FROM downloads
                 WHERE state IN ('offered', 'fetched', 'processing') AND next_at <= ?1
                 ORDER BY created LIMIT 100",
            )?;
            let rows = st
                .query_map([now.as_millis()], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
        .map_err(|e| e.to_string())
}

async fn get(proxy: &Proxy, offer: String) -> Result<Option<Row>, String> {
    proxy
        .uploads
        .db
        .read(move |s| {
            Ok(s.0
                .prepare_cached(&format!("SELECT {COLUMNS} FROM downloads WHERE offer = ?1"))?
                .query_row([offer], row)
                .optional()?)
        })
        .await
        .map_err(|e| e.to_string())
}

/// One step of one download: fetch it, or process it once fetched.
pub(crate) async fn step(
    proxy: &Arc<Proxy>,
    uplink: &rs_node::uplink::Uplink,
    offer: String,
) -> Result<(), String> {
    let Some(r) = get(proxy, offer).await? else {
        return Ok(());
    };
    match r.d.state.as_str() {
        "offered" => fetch(proxy, uplink, &r).await,
        "fetched" => process(proxy, &r).await,
        // Died while processing: say so rather than do it twice.
        "processing" => {
            finish(
                proxy,
                &r,
                answer_refused(
                    "failed",
                    "rs-proxy stopped while processing this download; not run again",
                ),
            )
            .await
        }
        _ => Ok(()),
    }
}

async fn fetch(
    proxy: &Arc<Proxy>,
    uplink: &rs_node::uplink::Uplink,
    r: &Row,
) -> Result<(), String> {
    let d = &r.d;
    let now = proxy.clock.now();
    if r.expires.is_some_and(|e| e <= now.as_millis()) {
        // The tier above drops it too; the server marks it expired.
        return set(
            proxy,
            &d.offer,
            "failed",
            now,
            r.attempts,
            Some("the offer expired".into()),
            None,
        )
        .await;
    }
    let dir = dir(proxy);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| e.to_string())?;
    let part = dir.join(format!("{}.part", d.sha256));
    let have = tokio::fs::metadata(&part).await.map_or(0, |m| m.len());
    let _permit = match proxy
        .throttle
        .bulk_permit(&proxy.id, d.size.saturating_sub(have), 3)
    {
        Ok(p) => p,
        Err(Held { after, why }) => {
            return set(
                proxy,
                &d.offer,
                "offered",
                now.saturating_add(after),
                r.attempts,
                Some(why),
                None,
            )
            .await;
        }
    };
    let url = uplink.bulk_url(&r.url);
    let answer = proxy
        .uploads
        .client
        .fetch(&url, &part, d.size, &d.sha256)
        .await;
    let now = proxy.clock.now();
    match answer {
        Answer::Complete => {
            tokio::fs::rename(&part, dir.join(&d.sha256))
                .await
                .map_err(|e| e.to_string())?;
            set(proxy, &d.offer, "fetched", now, 0, None, None).await?;
            tracing::info!("download {} fetched and verified", d.name);
            // Acknowledged on the next POST: the tier above may let go.
            if let Ok(id) = MessageId::new(d.offer.clone()) {
                uplink.notices().ack([id]);
            }
            process(proxy, r).await
        }
        Answer::Partial { .. } => {
            set(proxy, &d.offer, "offered", now, r.attempts, None, None).await
        }
        Answer::Busy { after, why } => {
            set(
                proxy,
                &d.offer,
                "offered",
                now.saturating_add(after),
                r.attempts,
                Some(why),
                None,
            )
            .await
        }
        Answer::Gone { why }
        | Answer::Mismatch { why }
        | Answer::Conflict { why }
        | Answer::Unavailable { why } => {
            tracing::info!("download {}: {why}; trying again", d.name);
            set(
                proxy,
                &d.offer,
                "offered",
                now.saturating_add(rs_net::retry::backoff(r.attempts, Duration::from_secs(300))),
                r.attempts + 1,
                Some(why),
                None,
            )
            .await
        }
    }
}

/// Runs the install command on `file`; the answer says how it went.
async fn install(proxy: &Proxy, d: &Download, file: &std::path::Path) -> Reply {
    let Some((cmd, args)) = proxy.cfg.bulk.install_command.split_first() else {
        return answer_refused(
            "unsupported",
            "this proxy has no [bulk] install_command for software",
        );
    };
    let mut c = tokio::process::Command::new(cmd);
    c.args(args)
        .env("RS_FILE", file)
        .env("RS_NAME", &d.name)
        .env("RS_SHA256", &d.sha256)
        .env("RS_SIZE", d.size.to_string())
        .env("RS_CLASS", &d.class)
        .env("RS_SUBCLASS", &d.subclass)
        .env("RS_OFFER", &d.offer)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let limit = Duration::from_secs(proxy.cfg.bulk.install_timeout_secs.max(1));
    let out = match tokio::time::timeout(limit, c.output()).await {
        Err(_) => return answer_refused("failed", format!("{cmd} ran longer than {limit:?}")),
        Ok(Err(e)) => return answer_refused("failed", format!("{cmd}: {e}")),
        Ok(Ok(o)) => o,
    };
    let tail = |b: &[u8]| {
        let t = String::from_utf8_lossy(b);
        let t = t.trim();
        t[t.len().saturating_sub(2000)..].to_owned()
    };
    let text = format!(
        "exit {}\n{}{}",
        out.status.code().map_or("signal".into(), |c| c.to_string()),
        tail(&out.stdout),
        tail(&out.stderr)
    );
    if out.status.success() {
        (
            Outcome::Accepted,
            Vec::new(),
            Some(ResultPayload {
                mime: "text/plain".into(),
                text,
            }),
        )
    } else {
        answer_refused("failed", text)
    }
}

/// Processes a fetched file by its class, once.
async fn process(proxy: &Arc<Proxy>, r: &Row) -> Result<(), String> {
    let d = &r.d;
    let now = proxy.clock.now();
    set(proxy, &d.offer, "processing", now, 0, None, None).await?;
    let file = dir(proxy).join(&d.sha256);
    let mut restart = false;
    let answer = match d.class.as_str() {
        "software" => install(proxy, d, &file).await,
        "configuration" => match tokio::fs::read_to_string(&file).await {
            Err(e) => answer_refused("invalid", format!("not a text configuration: {e}")),
            Ok(text) => match proxy.change_config(&text) {
                Ok(done) => {
                    restart = true;
                    (
                        Outcome::Accepted,
                        Vec::new(),
                        Some(ResultPayload {
                            mime: "text/plain".into(),
                            text: done,
                        }),
                    )
                }
                Err(o) => (o, Vec::new(), None),
            },
        },
        _ => {
            let keep = dir(proxy).join(&d.name);
            match tokio::fs::copy(&file, &keep).await {
                Ok(_) => (
                    Outcome::Accepted,
                    Vec::new(),
                    Some(ResultPayload {
                        mime: "text/plain".into(),
                        text: format!("kept at {}", keep.display()),
                    }),
                ),
                Err(e) => answer_refused("failed", format!("{}: {e}", keep.display())),
            }
        }
    };
    finish(proxy, r, answer).await?;
    if restart {
        // The answer is spooled; the graceful stop sends it first.
        proxy.stop.cancel();
    }
    Ok(())
}

/// Spools the one answer to the offer and marks the download done (or
/// failed).
async fn finish(proxy: &Proxy, r: &Row, answer: Reply) -> Result<(), String> {
    let d = &r.d;
    let ok = matches!(answer.0, Outcome::Accepted);
    let summary = match &answer.0 {
        Outcome::Accepted => answer.2.as_ref().map(|p| p.text.clone()),
        other => Some(other.to_string()),
    };
    let offer = MessageId::new(d.offer.clone()).map_err(|e| e.to_string())?;
    let msg = rs_protocol::control_messages::response_to(
        &offer,
        &d.subclass,
        proxy.id.clone(),
        env!("CARGO_PKG_VERSION"),
        answer,
        proxy.clock.now(),
    )
    .map_err(|e| e.to_string())?;
    proxy.submit(msg).await.map_err(|e| e.to_string())?;
    let now = proxy.clock.now();
    tracing::info!(
        "download {}: {}",
        d.name,
        if ok { "processed" } else { "failed" }
    );
    set(
        proxy,
        &d.offer,
        if ok { "done" } else { "failed" },
        now,
        0,
        (!ok).then(|| summary.clone().unwrap_or_default()),
        summary,
    )
    .await
}
