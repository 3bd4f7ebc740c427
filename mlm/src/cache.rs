//! The MLM's bulk cache (seed 004, Figs. 22-23): a download offered from
//! above is fetched once (whatever the number of destinations behind this
//! MLM), verified by size and SHA-256, kept content-addressed under
//! `data_dir/cache/SHA256`, and published here at a fresh unguessable URL
//! that the copies of the offer handed down carry instead of the upstream's.
//! Those copies wait in the outbox (held) until the file is here.
//!
//! A watchdog (the fetcher) retries fetches that fail or that the throttle
//! holds back, resuming with `Range` from what a cut left. The cache is
//! bounded (`[bulk] cache_max_bytes`): files no copy waits for any more
//! (every destination behind has fetched it and acknowledged) are evicted,
//! least recently used first. Everything survives restarts (`cache.db`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rs_net::bulk::{self, Answer};
use rs_node::throttle::Held;
use rs_protocol::Timestamp;
use rs_store::db::{Db, DbError, Plain};
use rusqlite::{OptionalExtension as _, params};

use crate::Mlm;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    sha256    TEXT    PRIMARY KEY,
    name      TEXT    NOT NULL,
    size      INTEGER NOT NULL,
    source    TEXT    NOT NULL,
    state     TEXT    NOT NULL DEFAULT 'fetching',
    attempts  INTEGER NOT NULL DEFAULT 0,
    next_at   INTEGER NOT NULL,
    reason    TEXT,
    created   INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    digest  TEXT    PRIMARY KEY,
    sha256  TEXT    NOT NULL,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_sha ON tokens (sha256);
";

/// Cache counters (status metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub fetches: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub served_bytes: Arc<AtomicU64>,
    pub evicted: AtomicU64,
    pub failed: AtomicU64,
}

/// The cache.
#[derive(Debug)]
pub struct Cache {
    db: Db<Plain>,
    pub dir: PathBuf,
    pub stats: Stats,
    /// Woken when a new file is wanted.
    pub wake: tokio::sync::Notify,
    client: bulk::Client,
}

#[derive(Debug, Clone)]
struct Entry {
    sha: String,
    size: u64,
    source: String,
    attempts: u32,
}

impl Cache {
    pub fn open(
        data_dir: &std::path::Path,
        tls: Option<&rs_net::tls::TlsConfig>,
    ) -> anyhow::Result<Self> {
        let dir = data_dir.join("cache");
        std::fs::create_dir_all(&dir)?;
        let conn = rs_store::db::open(&data_dir.join("cache.db"))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Cache {
            db: Db::start("rs-mlm-cache", Plain(conn))?,
            dir,
            stats: Stats::default(),
            wake: tokio::sync::Notify::new(),
            client: bulk::Client::new(tls).map_err(anyhow::Error::msg)?,
        })
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(sha)
    }

    fn part(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.part"))
    }

    /// A download of `sha` (from `source`, a path on the upstream) is
    /// offered: records it (fetching unless it is here already) and issues
    /// a URL on this MLM for the destinations behind. Returns the URL and
    /// whether the file is here.
    pub async fn want(
        &self,
        sha: String,
        name: String,
        size: u64,
        source: String,
        now: Timestamp,
    ) -> Result<(String, bool), DbError> {
        let token = bulk::new_token().map_err(DbError::Sql)?;
        let digest = bulk::token_digest(&token);
        let cached = self
            .db
            .write(move |s| {
                s.0.prepare_cached(
                    "INSERT INTO files (sha256, name, size, source, next_at, created, last_used)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)
                     ON CONFLICT (sha256) DO UPDATE SET
                        source = ?4, last_used = ?5,
                        state = CASE WHEN state = 'failed' THEN 'fetching' ELSE state END,
                        attempts = CASE WHEN state = 'failed' THEN 0 ELSE attempts END,
                        next_at = CASE WHEN state = 'failed' THEN ?5 ELSE next_at END",
                )?
                .execute(params![
                    sha,
                    name,
                    i64::try_from(size).unwrap_or(i64::MAX),
                    source,
                    now.as_millis()
                ])?;
                s.0.prepare_cached(
                    "INSERT INTO tokens (digest, sha256, created) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![digest, sha, now.as_millis()])?;
                let state: String =
                    s.0.query_row("SELECT state FROM files WHERE sha256 = ?1", [&sha], |r| {
                        r.get(0)
                    })?;
                Ok(state == "cached")
            })
            .await?;
        if !cached {
            self.wake.notify_one();
        }
        Ok((format!("{}{token}", bulk::PATH), cached))
    }

    async fn due(&self, now: Timestamp) -> Result<Vec<Entry>, DbError> {
        self.db
            .read(move |s| {
                let mut st = s.0.prepare_cached(
                    "SELECT sha256, size, source, attempts FROM files
                     WHERE state = 'fetching' AND next_at <= ?1 ORDER BY created LIMIT 16",
                )?;
                let rows = st
                    .query_map([now.as_millis()], |r| {
                        Ok(Entry {
                            sha: r.get(0)?,
                            size: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                            source: r.get(2)?,
                            attempts: r.get(3)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn set(
        &self,
        sha: &str,
        state: &'static str,
        attempts: u32,
        next_at: Timestamp,
        reason: Option<String>,
    ) -> Result<(), DbError> {
        let sha = sha.to_owned();
        self.db
            .write(move |s| {
                s.0.prepare_cached(
                    "UPDATE files SET state = ?2, attempts = ?3, next_at = ?4, reason = ?5
                     WHERE sha256 = ?1",
                )?
                .execute(params![
                    sha,
                    state,
                    attempts,
                    next_at.as_millis(),
                    reason
                ])?;
                Ok(())
            })
            .await
    }

    /// The cached file a URL token names: its path and size.
    pub async fn lookup(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<Option<(PathBuf, u64)>, DbError> {
        let digest = bulk::token_digest(token);
        let row: Option<(String, i64)> = self
            .db
            .write(move |s| {
                let row: Option<(String, i64)> =
                    s.0.query_row(
                        "SELECT f.sha256, f.size FROM tokens t JOIN files f ON f.sha256 = t.sha256
                         WHERE t.digest = ?1 AND f.state = 'cached'",
                        [&digest],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if let Some((sha, _)) = &row {
                    s.0.prepare_cached("UPDATE files SET last_used = ?2 WHERE sha256 = ?1")?
                        .execute(params![sha, now.as_millis()])?;
                }
                Ok(row)
            })
            .await?;
        Ok(row.map(|(sha, size)| (self.path(&sha), u64::try_from(size).unwrap_or(0))))
    }

    /// Whether `sha` is cached here.
    pub async fn is_cached(&self, sha: String) -> Result<bool, DbError> {
        self.db
            .read(move |s| {
                Ok(s.0
                    .query_row(
                        "SELECT 1 FROM files WHERE sha256 = ?1 AND state = 'cached'",
                        [&sha],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some())
            })
            .await
    }

    /// Bytes of cached files, and the files, least recently used first.
    async fn cached(&self) -> Result<Vec<(String, u64)>, DbError> {
        self.db
            .read(|s| {
                let mut st = s.0.prepare_cached(
                    "SELECT sha256, size FROM files WHERE state = 'cached' ORDER BY last_used",
                )?;
                let rows = st
                    .query_map([], |r| {
                        Ok((r.get(0)?, u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0)))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn forget(&self, sha: String) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.0.execute("DELETE FROM tokens WHERE sha256 = ?1", [&sha])?;
                s.0.execute("DELETE FROM files WHERE sha256 = ?1", [&sha])?;
                Ok(())
            })
            .await
    }

    /// Files cached, and their bytes (status).
    pub async fn usage(&self) -> Result<(u64, u64), DbError> {
        self.db
            .read(|s| {
                let (n, b): (i64, i64) = s.0.query_row(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE state = 'cached'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok((u64::try_from(n).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
            })
            .await
    }
}

/// The fetcher and evictor: runs until `stop`.
pub async fn run(mlm: Arc<Mlm>, stop: tokio_util::sync::CancellationToken) {
    // A stop between marking a file cached and releasing its held copies
    // left them held: release what waits for a file that is here.
    match mlm.cache.cached().await {
        Ok(files) => {
            for (sha, _) in files {
                match mlm.outbox.release(sha.clone()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("bulk cache: {sha} is here; {n} offer(s) released"),
                    Err(e) => tracing::error!("bulk cache {sha}: {e}"),
                }
            }
            mlm.outbox_ready.notify_waiters();
        }
        Err(e) => tracing::error!("bulk cache: {e}"),
    }
    loop {
        let now = mlm.clock.now();
        match mlm.cache.due(now).await {
            Ok(list) => {
                for e in list {
                    if let Err(err) = fetch_one(&mlm, &e).await {
                        tracing::error!("bulk cache {}: {err}", e.sha);
                    }
                }
            }
            Err(e) => tracing::error!("bulk cache: {e}"),
        }
        if let Err(e) = evict(&mlm).await {
            tracing::error!("bulk cache eviction: {e}");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = mlm.cache.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn fetch_one(mlm: &Mlm, e: &Entry) -> Result<(), String> {
    let cache = &mlm.cache;
    let now = mlm.clock.now();
    let have = tokio::fs::metadata(cache.part(&e.sha))
        .await
        .map_or(0, |m| m.len());
    let _permit = match mlm
        .throttle
        .bulk_permit(&mlm.id, e.size.saturating_sub(have), 3)
    {
        Ok(p) => p,
        Err(Held { after, why }) => {
            return cache
                .set(
                    &e.sha,
                    "fetching",
                    e.attempts,
                    now.saturating_add(after),
                    Some(why),
                )
                .await
                .map_err(|e| e.to_string());
        }
    };
    let url = bulk::resolve(mlm.upstream.current_url(), &e.source);
    cache.stats.fetches.fetch_add(1, Ordering::Relaxed);
    let answer = cache
        .client
        .fetch(&url, &cache.part(&e.sha), e.size, &e.sha)
        .await;
    let after = tokio::fs::metadata(cache.part(&e.sha))
        .await
        .map_or(0, |m| m.len());
    cache
        .stats
        .fetched_bytes
        .fetch_add(after.saturating_sub(have), Ordering::Relaxed);
    let now = mlm.clock.now();
    match answer {
        Answer::Complete => {
            tokio::fs::rename(cache.part(&e.sha), cache.path(&e.sha))
                .await
                .map_err(|err| err.to_string())?;
            cache
                .set(&e.sha, "cached", 0, now, None)
                .await
                .map_err(|e| e.to_string())?;
            let n = mlm
                .outbox
                .release(e.sha.clone())
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                "bulk cache: {} ({} bytes) fetched and verified; {n} offer(s) released",
                e.sha,
                e.size
            );
            mlm.outbox_ready.notify_waiters();
            Ok(())
        }
        Answer::Gone { why } => {
            cache.stats.failed.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::fs::remove_file(cache.part(&e.sha)).await;
            let n = mlm
                .outbox
                .drop_bulk(e.sha.clone())
                .await
                .map_err(|e| e.to_string())?;
            tracing::warn!(
                "bulk cache: {} cannot be fetched ({why}); {n} offer(s) dropped",
                e.sha
            );
            cache
                .set(&e.sha, "failed", e.attempts, now, Some(why))
                .await
                .map_err(|e| e.to_string())
        }
        Answer::Busy { after, why } => cache
            .set(
                &e.sha,
                "fetching",
                e.attempts,
                now.saturating_add(after),
                Some(why),
            )
            .await
            .map_err(|e| e.to_string()),
        Answer::Partial { .. } => cache
            .set(&e.sha, "fetching", e.attempts, now, None)
            .await
            .map_err(|e| e.to_string()),
        Answer::Mismatch { why } | Answer::Conflict { why } | Answer::Unavailable { why } => {
            tracing::info!("bulk cache: fetching {}: {why}; trying again", e.sha);
            cache
                .set(
                    &e.sha,
                    "fetching",
                    e.attempts + 1,
                    now.saturating_add(rs_net::retry::backoff(
                        e.attempts,
                        Duration::from_secs(300),
                    )),
                    Some(why),
                )
                .await
                .map_err(|e| e.to_string())
        }
    }
}

/// Keeps the cache within its bound: evicts files no copy waits for any
/// more (delivered everywhere), least recently used first.
async fn evict(mlm: &Mlm) -> Result<(), String> {
    let cache = &mlm.cache;
    let files = cache.cached().await.map_err(|e| e.to_string())?;
    let mut total: u64 = files.iter().map(|(_, n)| n).sum();
    let max = mlm.cfg.bulk.cache_max_bytes;
    for (sha, size) in files {
        let pending = mlm
            .outbox
            .bulk_pending(sha.clone())
            .await
            .map_err(|e| e.to_string())?;
        if pending > 0 || total <= max {
            continue;
        }
        let _ = tokio::fs::remove_file(cache.path(&sha)).await;
        let _ = tokio::fs::remove_file(cache.part(&sha)).await;
        cache.forget(sha.clone()).await.map_err(|e| e.to_string())?;
        cache.stats.evicted.fetch_add(1, Ordering::Relaxed);
        total = total.saturating_sub(size);
        tracing::info!("bulk cache: evicted {sha} ({size} bytes)");
    }
    Ok(())
}
