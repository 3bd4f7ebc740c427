//! Uploads from the proxy (seed 004, Figs. 20-21). An integrator hands
//! over a file (its path); the proxy hashes it, spools a `bulk-request`,
//! and answers with the upload's ID. When the grant arrives on the
//! back-channel, the proxy streams the file to its next hop at the granted
//! path, resuming from what the receiver holds after any cut, and marks it
//! `done` when the application server has stored and verified it.
//!
//! A watchdog (the same worker) keeps every upload moving: a request the
//! next hop rejected for good marks the upload `refused`; one that was
//! dropped from the spool, or left it without an answer within
//! `grant_timeout_secs`, is asked again (a new request); a grant refused
//! for now is asked again when the refusal says; an expired or spent URL is
//! asked for again. States are kept in `bulk.db` and survive restarts.
//!
//! The file stays where the integrator put it and must not change until
//! the upload is `done`: its size is checked before each transfer, and a
//! mismatch at the server is checked against a fresh hash of the file.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rs_net::bulk::Answer;
use rs_node::throttle::Held;
use rs_protocol::model::*;
use rs_protocol::{MessageId, RsId, Timestamp};
use rs_store::db::{Db, DbError, Plain};
use rs_store::spool::{Fate, Spool as _};
use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use crate::{Proxy, SubmitError};

/// The bulk store's schema changes (uploads, and downloads in the same
/// file), in order (append only). Version 1 adopts the files of releases
/// before versions as they are.
pub const MIGRATIONS: &[rs_store::sql::Migration] = &[rs_store::sql::Migration {
    version: 1,
    name: "baseline",
    apply: |c| {
        c.batch(SCHEMA)?;
        c.batch(crate::download::SCHEMA)
    },
}];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS uploads (
    id         TEXT    PRIMARY KEY,
    request    TEXT    NOT NULL UNIQUE,
    source     TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    path       TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT    NOT NULL,
    class      TEXT    NOT NULL,
    subclass   TEXT    NOT NULL,
    precedence INTEGER NOT NULL,
    state      TEXT    NOT NULL,
    url        TEXT,
    expires    INTEGER,
    sent       INTEGER NOT NULL DEFAULT 0,
    attempts   INTEGER NOT NULL DEFAULT 0,
    requests   INTEGER NOT NULL DEFAULT 1,
    next_at    INTEGER NOT NULL,
    left_spool INTEGER,
    reason     TEXT,
    created    INTEGER NOT NULL,
    updated    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_due ON uploads (state, next_at);
";

/// `[bulk]` in proxy.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BulkSection {
    /// A request that left the spool and got no answer within this long
    /// is asked again.
    #[serde(default = "default_grant_timeout")]
    pub grant_timeout_secs: u64,
    /// Verification failures (the server's hash differs while the file's
    /// has not changed) before the upload is given up as `failed`.
    #[serde(default = "default_max_mismatches")]
    pub max_mismatches: u32,
    /// Downloads of class `software` are handed to this command (program
    /// and arguments; the file in `RS_FILE`, see docs/configuration.md);
    /// its exit status is the answer. Empty: software is refused.
    #[serde(default)]
    pub install_command: Vec<String>,
    /// How long the install command may run.
    #[serde(default = "default_install_timeout")]
    pub install_timeout_secs: u64,
}

impl Default for BulkSection {
    fn default() -> Self {
        BulkSection {
            grant_timeout_secs: default_grant_timeout(),
            max_mismatches: default_max_mismatches(),
            install_command: Vec::new(),
            install_timeout_secs: default_install_timeout(),
        }
    }
}

fn default_grant_timeout() -> u64 {
    600
}
fn default_max_mismatches() -> u32 {
    3
}
fn default_install_timeout() -> u64 {
    600
}

/// `POST /v1/uploads`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    /// The integrator's RS ID or name.
    pub integrator: String,
    /// The support instance's systems-management ID.
    #[serde(default)]
    pub instance: Option<String>,
    /// Absolute path of the file; it must stay unchanged until `done`.
    pub path: String,
    /// Name announced (default: the file's name).
    #[serde(default)]
    pub name: Option<String>,
    /// Classification of the data (default `diagnostics` / `file`).
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub subclass: Option<String>,
    /// 0-9 (default 3).
    #[serde(default)]
    pub precedence: Option<u8>,
}

/// An upload as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Upload {
    pub id: String,
    /// The bulk request in force (a new one replaces it when asked again).
    pub request: String,
    pub source: String,
    pub path: String,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub class: String,
    pub subclass: String,
    /// `requested`, `waiting` (refused for now), `granted`, `done`,
    /// `refused` or `failed`.
    pub state: String,
    /// Bytes the receiver held at the last look.
    pub sent: u64,
    pub requests: u32,
    pub reason: Option<String>,
    pub created: String,
    pub updated: String,
}

#[derive(Debug, Clone)]
struct Row {
    up: Upload,
    version: String,
    precedence: u8,
    url: Option<String>,
    expires: Option<i64>,
    attempts: u32,
    left_spool: Option<i64>,
}

const COLUMNS: &str = "id, request, source, path, name, size, sha256, class, subclass, state,
     sent, requests, reason, created, updated, version, precedence, url, expires, attempts,
     left_spool";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let ts = |ms: i64| {
        Timestamp::from_millis(ms)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    Ok(Row {
        up: Upload {
            id: r.get(0)?,
            request: r.get(1)?,
            source: r.get(2)?,
            path: r.get(3)?,
            name: r.get(4)?,
            size: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
            sha256: r.get(6)?,
            class: r.get(7)?,
            subclass: r.get(8)?,
            state: r.get(9)?,
            sent: u64::try_from(r.get::<_, i64>(10)?).unwrap_or(0),
            requests: r.get(11)?,
            reason: r.get(12)?,
            created: ts(r.get(13)?),
            updated: ts(r.get(14)?),
        },
        version: r.get(15)?,
        precedence: r.get(16)?,
        url: r.get(17)?,
        expires: r.get(18)?,
        attempts: r.get(19)?,
        left_spool: r.get(20)?,
    })
}

/// The proxy's uploads: their durable states and the transfers under way.
#[derive(Debug)]
pub struct Uploads {
    pub(crate) db: Db<Plain>,
    /// Woken when a grant arrives or an upload is handed over.
    pub wake: tokio::sync::Notify,
    pub(crate) client: rs_net::bulk::Client,
    /// Uploads (and downloads, `d:` + offer) with a task running.
    active: Mutex<HashSet<String>>,
}

impl Uploads {
    pub fn open(
        path: &std::path::Path,
        tls: Option<&rs_net::tls::TlsConfig>,
    ) -> anyhow::Result<Self> {
        let conn = rs_store::sql::Conn::open(
            &rs_store::sql::Location::Sqlite(path.to_owned()),
            MIGRATIONS,
        )?
        .into_sqlite()
        .ok_or_else(|| anyhow::anyhow!("the bulk store is an SQLite file"))?;
        Ok(Uploads {
            db: Db::start("rs-proxy-bulk", Plain(conn))?,
            wake: tokio::sync::Notify::new(),
            client: rs_net::bulk::Client::new(tls).map_err(anyhow::Error::msg)?,
            active: Mutex::new(HashSet::new()),
        })
    }

    async fn get_row(&self, id: String) -> Result<Option<Row>, DbError> {
        self.db
            .read(move |s| {
                Ok(s.0
                    .prepare_cached(&format!("SELECT {COLUMNS} FROM uploads WHERE id = ?1"))?
                    .query_row([id], row)
                    .optional()?)
            })
            .await
    }

    /// One upload by ID.
    pub async fn get(&self, id: String) -> Result<Option<Upload>, DbError> {
        Ok(self.get_row(id).await?.map(|r| r.up))
    }

    /// Uploads, newest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<Upload>, DbError> {
        self.db
            .read(move |s| {
                let mut st = s.0.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM uploads ORDER BY created DESC LIMIT ?1"
                ))?;
                let rows = st
                    .query_map([limit as i64], row)?
                    .map(|r| r.map(|r| r.up))
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await
    }

    /// Counts by state (status).
    pub async fn counts(&self) -> Result<Vec<(String, u64)>, DbError> {
        self.db
            .read(|s| {
                let mut st =
                    s.0.prepare_cached("SELECT state, COUNT(*) FROM uploads GROUP BY state")?;
                let rows = st
                    .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn due(&self, now: Timestamp) -> Result<Vec<Row>, DbError> {
        self.db
            .read(move |s| {
                let mut st = s.0.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM uploads
                     WHERE state IN ('requested', 'waiting', 'granted') AND next_at <= ?1
                     ORDER BY precedence DESC, created LIMIT 100"
                ))?;
                let rows = st
                    .query_map([now.as_millis()], row)?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await
    }

    /// Sets the fields given (`None` leaves one as it is) and the time of
    /// the next look.
    async fn update(&self, id: &str, u: Change, now: Timestamp) -> Result<(), DbError> {
        let id = id.to_owned();
        self.db
            .write(move |s| {
                s.0.prepare_cached(
                    "UPDATE uploads SET
                        state      = COALESCE(?2, state),
                        next_at    = ?3,
                        reason     = CASE WHEN ?4 IS NULL THEN reason ELSE NULLIF(?4, '') END,
                        sent       = COALESCE(?5, sent),
                        attempts   = COALESCE(?6, attempts),
                        left_spool = CASE WHEN ?7 = 1 THEN ?3 WHEN ?7 = 2 THEN NULL ELSE left_spool END,
                        updated    = ?8
                     WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    u.state,
                    u.next_at.as_millis(),
                    u.reason,
                    u.sent.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
                    u.attempts,
                    u.left_spool,
                    now.as_millis()
                ])?;
                Ok(())
            })
            .await
    }
}

/// A change of an upload's row.
#[derive(Debug)]
struct Change {
    state: Option<&'static str>,
    next_at: Timestamp,
    /// `Some("")` clears it.
    reason: Option<String>,
    sent: Option<u64>,
    attempts: Option<u32>,
    /// 1: it left the spool now; 2: forget that.
    left_spool: u8,
}

/// No change but the time of the next look, `d` from now.
fn at(now: Timestamp, d: Duration) -> Change {
    Change {
        state: None,
        next_at: now.saturating_add(d),
        reason: None,
        sent: None,
        attempts: None,
        left_spool: 0,
    }
}

fn bad(t: impl Into<String>) -> SubmitError {
    SubmitError::Invalid(t.into())
}

/// Hands a file over for upload: hashes it, records the upload, spools
/// the bulk request. Returns the upload once it is durable.
pub async fn start(proxy: &Proxy, req: UploadRequest) -> Result<Upload, SubmitError> {
    let (integ, instance) = proxy
        .registry
        .resolve(&req.integrator, req.instance.as_deref())
        .await?;
    let path = PathBuf::from(&req.path);
    if !path.is_absolute() {
        return Err(bad(format!("path {:?} must be absolute", req.path)));
    }
    let meta = std::fs::metadata(&path).map_err(|e| bad(format!("{}: {e}", req.path)))?;
    if !meta.is_file() {
        return Err(bad(format!("{} is not a regular file", req.path)));
    }
    let name = match &req.name {
        Some(n) => n.clone(),
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(bad(format!(
            "name {name:?}: 1-255 characters, no path separators or control characters"
        )));
    }
    let class = Classification::new(
        req.class.clone().unwrap_or_else(|| "diagnostics".into()),
        req.subclass.clone().unwrap_or_else(|| "file".into()),
    );
    for t in [&class.class, &class.subclass] {
        if !rs_protocol::codec::is_token(t) {
            return Err(bad(format!(
                "class/subclass {t:?}: 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
    }
    let precedence = req.precedence.unwrap_or(3);
    if precedence > MAX_PRECEDENCE {
        return Err(bad("precedence must be 0 to 9"));
    }
    let p = path.clone();
    let (size, hash) = tokio::task::spawn_blocking(move || rs_net::bulk::hash_file(&p, None))
        .await
        .map_err(|e| SubmitError::Storage(e.to_string()))?
        .map_err(|e| bad(format!("{}: {e}", req.path)))?;
    let sha256 = hash.finish();
    let source = instance.unwrap_or_else(|| integ.id.clone());
    let msg = request_message(
        proxy,
        &source,
        &integ.version,
        &class,
        precedence,
        &name,
        size,
        sha256,
    );
    let id = msg.header.id.to_string();
    let now = proxy.clock.now();
    let up = &proxy.uploads;
    {
        let (id, source, version, path, name) = (
            id.clone(),
            source.to_string(),
            integ.version.clone(),
            req.path.clone(),
            name.clone(),
        );
        let (sha, c, sc) = (
            rs_protocol::codec::sha256_hex(&sha256),
            class.class.to_string(),
            class.subclass.to_string(),
        );
        up.db
            .write(move |s| {
                s.0.prepare_cached(
                    "INSERT INTO uploads (id, request, source, version, path, name, size, sha256,
                                          class, subclass, precedence, state, next_at, created, updated)
                     VALUES (?1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'requested', ?11, ?11, ?11)",
                )?
                .execute(params![
                    id,
                    source,
                    version,
                    path,
                    name,
                    i64::try_from(size).unwrap_or(i64::MAX),
                    sha,
                    c,
                    sc,
                    precedence,
                    now.as_millis()
                ])?;
                Ok(())
            })
            .await
            .map_err(|e| SubmitError::Storage(e.to_string()))?;
    }
    // Recorded first: if the process dies before the request is spooled,
    // the watchdog finds it missing and asks again.
    proxy.submit(msg).await?;
    tracing::info!("upload {id}: {name} ({size} bytes) requested");
    up.get(id)
        .await
        .map_err(|e| SubmitError::Storage(e.to_string()))?
        .ok_or_else(|| SubmitError::Storage("the upload vanished".into()))
}

#[allow(clippy::too_many_arguments)]
fn request_message(
    proxy: &Proxy,
    source: &RsId,
    version: &str,
    class: &Classification,
    precedence: u8,
    name: &str,
    size: u64,
    sha256: [u8; 32],
) -> Message {
    let now = proxy.clock.now();
    let header = proxy.header(
        source.clone(),
        version.to_owned(),
        class.clone(),
        Qos {
            expiry: Some(now.saturating_add(Duration::from_secs(86_400))),
            precedence,
            persistent: true,
        },
    );
    Message {
        header,
        content: Content::BulkRequest(BulkRequest {
            direction: Direction::Upload,
            name: name.to_owned(),
            size,
            sha256,
            class: class.clone(),
            url: None,
            expires: None,
        }),
    }
}

/// Asks again: a new bulk request (a new ID, so a new grant) replaces the
/// one in force.
async fn ask_again(proxy: &Proxy, r: &Row, why: &str) -> Result<(), String> {
    let up = &r.up;
    let source = RsId::new(&up.source).map_err(|e| e.to_string())?;
    let sha = rs_protocol::codec::parse_sha256(&up.sha256).map_err(str::to_owned)?;
    let msg = request_message(
        proxy,
        &source,
        &r.version,
        &Classification::new(up.class.clone(), up.subclass.clone()),
        r.precedence,
        &up.name,
        up.size,
        sha,
    );
    let new = msg.header.id.to_string();
    let now = proxy.clock.now();
    let (id, n, w) = (up.id.clone(), new.clone(), why.to_owned());
    proxy
        .uploads
        .db
        .write(move |s| {
            s.0.prepare_cached(
                "UPDATE uploads SET request = ?2, state = 'requested', url = NULL, expires = NULL,
                        left_spool = NULL, requests = requests + 1, next_at = ?3, reason = ?4,
                        updated = ?3
                 WHERE id = ?1",
            )?
            .execute(params![id, n, now.as_millis(), w])?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?;
    proxy.submit(msg).await.map_err(|e| e.to_string())?;
    tracing::info!("upload {}: asked again ({why}), request {new}", up.id);
    Ok(())
}

/// A `bulk-response` arrived on the back-channel.
pub async fn answered(proxy: &Proxy, b: &BulkResponse) -> Result<(), String> {
    let up = &proxy.uploads;
    let req = b.request.to_string();
    let found: Option<String> = up
        .db
        .read(move |s| {
            Ok(s.0
                .query_row(
                    "SELECT id FROM uploads WHERE request = ?1 AND state = 'requested'",
                    [req],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
        .map_err(|e| e.to_string())?;
    let Some(id) = found else {
        // An answer to a request replaced since (or to an upload that
        // finished): nothing to do.
        tracing::debug!("bulk response to {} matches no waiting upload", b.request);
        return Ok(());
    };
    let now = proxy.clock.now();
    match &b.grant {
        Grant::Granted { url, expires } => {
            let (u, e, i) = (url.clone(), expires.as_millis(), id.clone());
            up.db
                .write(move |s| {
                    s.0.prepare_cached(
                        "UPDATE uploads SET state = 'granted', url = ?2, expires = ?3,
                                attempts = 0, next_at = ?4, reason = NULL, updated = ?4
                         WHERE id = ?1",
                    )?
                    .execute(params![i, u, e, now.as_millis()])?;
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!("upload {id}: granted");
            up.wake.notify_one();
        }
        Grant::Refused {
            reason,
            retry_after: Some(after),
        } => {
            let mut c = at(now, *after);
            c.state = Some("waiting");
            c.reason = Some(reason.to_string());
            up.update(&id, c, now).await.map_err(|e| e.to_string())?;
            tracing::info!("upload {id}: refused for now ({reason}); asking again in {after:?}");
        }
        Grant::Refused {
            reason,
            retry_after: None,
        } => {
            let mut c = at(now, Duration::ZERO);
            c.state = Some("refused");
            c.reason = Some(reason.to_string());
            up.update(&id, c, now).await.map_err(|e| e.to_string())?;
            tracing::warn!("upload {id}: refused ({reason})");
        }
    }
    Ok(())
}

/// The watchdog and transfer starter: runs until `stop`.
pub async fn run(
    proxy: Arc<Proxy>,
    uplink: Arc<rs_node::uplink::Uplink>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let now = proxy.clock.now();
        match proxy.uploads.due(now).await {
            Ok(rows) => {
                for r in rows {
                    if let Err(e) = step(&proxy, &uplink, r, now).await {
                        tracing::error!("uploads: {e}");
                    }
                }
            }
            Err(e) => tracing::error!("uploads: {e}"),
        }
        match crate::download::due(&proxy, now).await {
            Ok(offers) => {
                for offer in offers {
                    let key = format!("d:{offer}");
                    let fresh = proxy
                        .uploads
                        .active
                        .lock()
                        .is_ok_and(|mut a| a.insert(key.clone()));
                    if !fresh {
                        continue;
                    }
                    let (proxy, uplink) = (proxy.clone(), uplink.clone());
                    tokio::spawn(async move {
                        if let Err(e) = crate::download::step(&proxy, &uplink, offer).await {
                            tracing::error!("download: {e}");
                        }
                        if let Ok(mut a) = proxy.uploads.active.lock() {
                            a.remove(&key);
                        }
                        proxy.uploads.wake.notify_one();
                    });
                }
            }
            Err(e) => tracing::error!("downloads: {e}"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = proxy.uploads.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn step(
    proxy: &Arc<Proxy>,
    uplink: &Arc<rs_node::uplink::Uplink>,
    r: Row,
    now: Timestamp,
) -> Result<(), String> {
    let up = &proxy.uploads;
    let id = r.up.id.clone();
    match r.up.state.as_str() {
        "waiting" => ask_again(proxy, &r, "the refusal said to ask again").await,
        "requested" => {
            let req = MessageId::new(r.up.request.clone()).map_err(|e| e.to_string())?;
            let fate = proxy.spool.fate(req).await.map_err(|e| e.to_string())?;
            let grant_timeout = Duration::from_secs(proxy.cfg.bulk.grant_timeout_secs.max(1));
            match fate {
                Fate::Waiting => up
                    .update(&id, at(now, Duration::from_secs(5)), now)
                    .await
                    .map_err(|e| e.to_string()),
                Fate::Dead(reason) => {
                    let mut c = at(now, Duration::ZERO);
                    c.state = Some("refused");
                    c.reason = Some(reason.to_string());
                    tracing::warn!("upload {id}: request rejected ({reason})");
                    up.update(&id, c, now).await.map_err(|e| e.to_string())
                }
                Fate::Dropped(why) => ask_again(proxy, &r, &format!("the request was {why}")).await,
                Fate::Gone => match r.left_spool {
                    None => {
                        let mut c = at(now, grant_timeout);
                        c.left_spool = 1;
                        up.update(&id, c, now).await.map_err(|e| e.to_string())
                    }
                    Some(_) => ask_again(proxy, &r, "no answer to the request").await,
                },
            }
        }
        "granted" => {
            let Ok(mut a) = up.active.lock() else {
                return Err("lock poisoned".into());
            };
            if a.insert(id.clone()) {
                let (proxy, uplink) = (proxy.clone(), uplink.clone());
                tokio::spawn(async move {
                    if let Err(e) = transfer(&proxy, uplink.upstream(), &r).await {
                        tracing::error!("upload {}: {e}", r.up.id);
                    }
                    if let Ok(mut a) = proxy.uploads.active.lock() {
                        a.remove(&r.up.id);
                    }
                    proxy.uploads.wake.notify_one();
                });
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// One transfer attempt (a probe, then the rest of the file), and what it
/// means for the upload.
async fn transfer(
    proxy: &Proxy,
    upstream: &rs_node::upstream::Upstream,
    r: &Row,
) -> Result<(), String> {
    let up = &proxy.uploads;
    let id = &r.up.id;
    let now = proxy.clock.now();
    let fail = |why: String| {
        let mut c = at(now, Duration::ZERO);
        c.state = Some("failed");
        c.reason = Some(why);
        c
    };
    let path = PathBuf::from(&r.up.path);
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == r.up.size => {}
        Ok(m) => {
            tracing::warn!("upload {id}: the file changed size");
            return up
                .update(
                    id,
                    fail(format!(
                        "the file changed after it was handed over ({} bytes, was {})",
                        m.len(),
                        r.up.size
                    )),
                    now,
                )
                .await
                .map_err(|e| e.to_string());
        }
        Err(e) => {
            return up
                .update(id, fail(format!("{}: {e}", r.up.path)), now)
                .await
                .map_err(|e| e.to_string());
        }
    }
    let Some(token) = r.url.as_deref().and_then(rs_net::bulk::token_of) else {
        return ask_again(proxy, r, "the grant's URL is not usable").await;
    };
    if r.expires.is_some_and(|e| e <= now.as_millis()) {
        return ask_again(proxy, r, "the grant expired").await;
    }
    let Ok(source) = RsId::new(&r.up.source) else {
        return Err(format!("bad source {:?}", r.up.source));
    };
    // Hold a place for the transfer (and pass the throttle's windows and
    // quotas for class `bulk`) for as long as it runs.
    let _permit =
        match proxy
            .throttle
            .bulk_permit(&source, r.up.size.saturating_sub(r.up.sent), r.precedence)
        {
            Ok(p) => p,
            Err(Held { after, why }) => {
                let mut c = at(now, after);
                c.reason = Some(why);
                return up.update(id, c, now).await.map_err(|e| e.to_string());
            }
        };
    let url = format!(
        "{}{}{token}",
        upstream
            .url_for(rs_node::routes::Class::Bulk)
            .trim_end_matches('/'),
        rs_net::bulk::PATH
    );
    let answer = match up.client.probe(&url).await {
        Answer::Partial { offset } => {
            tracing::info!("upload {id}: sending from byte {offset} of {}", r.up.size);
            up.update(
                id,
                Change {
                    sent: Some(offset),
                    ..at(now, Duration::from_secs(1))
                },
                now,
            )
            .await
            .map_err(|e| e.to_string())?;
            up.client.put_file(&url, &path, offset, r.up.size).await
        }
        other => other,
    };
    let now = proxy.clock.now();
    let change = match answer {
        Answer::Complete => {
            tracing::info!("upload {id}: stored upstream");
            Change {
                state: Some("done"),
                sent: Some(r.up.size),
                reason: Some(String::new()),
                ..at(now, Duration::ZERO)
            }
        }
        Answer::Partial { offset } => Change {
            sent: Some(offset),
            ..at(now, Duration::ZERO)
        },
        Answer::Conflict { why } => Change {
            reason: Some(why),
            ..at(now, Duration::from_secs(2))
        },
        Answer::Busy { after, why } => Change {
            reason: Some(why),
            ..at(now, after)
        },
        Answer::Gone { why } => return ask_again(proxy, r, &why).await,
        Answer::Mismatch { why } => {
            // The file, or the bytes on the way? Look at the file again.
            let p = path.clone();
            let now_hash = tokio::task::spawn_blocking(move || {
                rs_net::bulk::hash_file(&p, None)
                    .map(|(_, h)| rs_protocol::codec::sha256_hex(&h.finish()))
            })
            .await
            .map_err(|e| e.to_string())?;
            match now_hash {
                Ok(h) if h == r.up.sha256 => {
                    if r.attempts + 1 >= proxy.cfg.bulk.max_mismatches.max(1) {
                        fail(format!("verification failed repeatedly: {why}"))
                    } else {
                        let mut c = Change {
                            attempts: Some(r.attempts + 1),
                            ..at(now, Duration::ZERO)
                        };
                        c.reason = Some(why.clone());
                        up.update(id, c, now).await.map_err(|e| e.to_string())?;
                        return ask_again(proxy, r, &why).await;
                    }
                }
                Ok(_) => fail("the file changed after it was handed over".into()),
                Err(e) => fail(format!("{}: {e}", r.up.path)),
            }
        }
        Answer::Unavailable { why } => {
            let sent = match up.client.probe(&url).await {
                Answer::Partial { offset } => Some(offset),
                _ => None,
            };
            Change {
                reason: Some(why),
                sent,
                attempts: Some(r.attempts + 1),
                ..at(
                    now,
                    rs_net::retry::backoff(r.attempts, Duration::from_secs(60)),
                )
            }
        }
    };
    up.update(id, change, now).await.map_err(|e| e.to_string())
}
