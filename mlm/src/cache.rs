//! The MLM's bulk cache (seed 004, Figs. 22-23): a download offered from
//! above is fetched once (whatever the number of destinations behind this
//! MLM), verified by size and SHA-256, kept content-addressed under the
//! cache directory (`[bulk] cache_dir`, by default `data_dir/cache`) as
//! `SHA256`, and published here at a fresh unguessable URL that the copies
//! of the offer handed down carry instead of the upstream's. Those copies
//! wait in the back-channel queue (held) until the file is here.
//!
//! A watchdog (the fetcher) retries fetches that fail or that the throttle
//! holds back, resuming with `Range` from what a cut left. The cache is
//! bounded (`[bulk] cache_max_bytes`): files no copy waits for any more
//! (every destination behind has fetched it and acknowledged) are evicted,
//! least recently used first. Everything survives restarts (`cache.db`).
//!
//! In a farm the cache's records are the farm's (schema `mlm_<id>_cache`)
//! and the farm's leader alone fetches and evicts, so a download leaves
//! the server once per farm; a new leader resumes a cut fetch from the
//! `.part` file. Members that share the cache directory (one host, or a
//! shared filesystem) serve every file from it. A member whose directory
//! lacks a file the farm has cached answers `503` with `Retry-After` and
//! fetches that file into its own directory (docs/operations.md).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rs_net::bulk::{self, Answer};
use rs_node::throttle::Held;
use rs_protocol::Timestamp;
use rs_store::db::{Db, DbError};
use rs_store::params;
use rs_store::sql::{Conn, Engine, Location, Migration};

use crate::Mlm;

/// The cache's schema changes, in order (append only). On SQLite version 1
/// adopts the `cache.db` of releases before versions as it is; on
/// PostgreSQL (a farm's) it creates the tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "baseline",
    apply: |c| match c.engine() {
        Engine::Sqlite => c.batch(SQLITE),
        Engine::Postgres => c.batch(POSTGRES),
    },
}];

const SQLITE: &str = "
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

const POSTGRES: &str = "
CREATE TABLE files (
    sha256    TEXT   PRIMARY KEY,
    name      TEXT   NOT NULL,
    size      BIGINT NOT NULL,
    source    TEXT   NOT NULL,
    state     TEXT   NOT NULL DEFAULT 'fetching',
    attempts  BIGINT NOT NULL DEFAULT 0,
    next_at   BIGINT NOT NULL,
    reason    TEXT,
    created   BIGINT NOT NULL,
    last_used BIGINT NOT NULL
);
CREATE TABLE tokens (
    digest  TEXT   PRIMARY KEY,
    sha256  TEXT   NOT NULL,
    created BIGINT NOT NULL
);
CREATE INDEX tokens_sha ON tokens (sha256);
";

rs_net::counters! {
    /// Cache counters (status and metrics).
    pub struct Stats {
        fetches: "download_cache_fetches_total", "Files fetched from upstream into the download cache.";
        fetched_bytes: "bulk_bytes_total" {direction = "fetched"}, "Bulk bytes moved, by direction.";
        served_bytes: "bulk_bytes_total" {direction = "served"}, "Bulk bytes moved, by direction.";
        evicted: "download_cache_evicted_total", "Files evicted from the download cache.";
        failed: "download_cache_failures_total", "Fetches into the download cache that failed.";
    }
}

/// The cache.
#[derive(Debug)]
pub struct Cache {
    db: Db<Conn>,
    pub dir: PathBuf,
    pub stats: Stats,
    /// Woken when a new file is wanted.
    pub wake: tokio::sync::Notify,
    client: bulk::Client,
    /// Files the farm has cached that this member's directory lacks (it
    /// does not share the leader's): fetched into it, for itself.
    missing: Mutex<HashSet<String>>,
}

#[derive(Debug, Clone)]
struct Entry {
    sha: String,
    size: u64,
    source: String,
    attempts: u32,
}

/// What a download URL's token names.
#[derive(Debug)]
pub enum Lookup {
    /// The file, here: its path and size.
    Here(PathBuf, u64),
    /// Cached by the farm, not (yet) in this member's directory.
    Elsewhere,
    /// No such URL, or its file not fetched yet.
    Unknown,
}

fn entry(r: &rs_store::sql::Row<'_>) -> Result<Entry, DbError> {
    Ok(Entry {
        sha: r.get(0)?,
        size: u64::try_from(r.get::<i64>(1)?).unwrap_or(0),
        source: r.get(2)?,
        attempts: u32::try_from(r.get::<i64>(3)?).unwrap_or(u32::MAX),
    })
}

impl Cache {
    /// Opens the cache's records at `at` (`cache.db`, or a farm's schema),
    /// migrating them in place, with its files in `dir`.
    pub fn open(
        at: &Location,
        dir: PathBuf,
        tls: Option<&rs_net::tls::TlsConfig>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Off the async workers, as every PostgreSQL open (rs_store::sql).
        let conn = std::thread::scope(|s| {
            s.spawn(|| Conn::open(at, MIGRATIONS))
                .join()
                .unwrap_or_else(|_| Err(DbError::Sql("opening the cache panicked".into())))
        })?;
        Ok(Cache {
            db: Db::start("rs-mlm-cache", conn)?,
            dir,
            stats: Stats::default(),
            wake: tokio::sync::Notify::new(),
            client: bulk::Client::new(tls).map_err(anyhow::Error::msg)?,
            missing: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(sha)
    }

    /// The partial file of a fetch under way (a fetch after a cut, by this
    /// member or another sharing the directory, resumes it).
    fn part(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.part"))
    }

    /// The right to fetch `sha` into this directory, if no other process
    /// sharing it holds it now: an exclusive `flock` on `SHA.lock`, which
    /// the kernel drops when its holder dies (so a dead member strands no
    /// fetch). `None`: another member is fetching it.
    fn fetch_lock(&self, sha: &str) -> Result<Option<std::fs::File>, String> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!("{sha}.lock")))
            .map_err(|e| e.to_string())?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(format!("locking {sha}.lock: {e}")),
        }
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
            .write(move |c| {
                c.exec(
                    "INSERT INTO files (sha256, name, size, source, next_at, created, last_used)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)
                     ON CONFLICT (sha256) DO UPDATE SET
                        source = ?4, last_used = ?5,
                        state = CASE WHEN files.state = 'failed' THEN 'fetching' ELSE files.state END,
                        attempts = CASE WHEN files.state = 'failed' THEN 0 ELSE files.attempts END,
                        next_at = CASE WHEN files.state = 'failed' THEN ?5 ELSE files.next_at END",
                    params![
                        sha,
                        name,
                        i64::try_from(size).unwrap_or(i64::MAX),
                        source,
                        now.as_millis()
                    ],
                )?;
                c.exec(
                    "INSERT INTO tokens (digest, sha256, created) VALUES (?1, ?2, ?3)",
                    params![digest, sha, now.as_millis()],
                )?;
                let state: String = c.one(
                    "SELECT state FROM files WHERE sha256 = ?1",
                    params![sha],
                    |r| r.get(0),
                )?;
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
            .read(move |c| {
                c.rows(
                    "SELECT sha256, size, source, attempts FROM files
                     WHERE state = 'fetching' AND next_at <= ?1 ORDER BY created LIMIT 16",
                    params![now.as_millis()],
                    entry,
                )
            })
            .await
    }

    /// A file the farm has cached, to fetch into this member's directory.
    async fn cached_entry(&self, sha: String) -> Result<Option<Entry>, DbError> {
        self.db
            .read(move |c| {
                c.row(
                    "SELECT sha256, size, source, attempts FROM files
                     WHERE sha256 = ?1 AND state = 'cached'",
                    params![sha],
                    entry,
                )
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
            .write(move |c| {
                c.exec(
                    "UPDATE files SET state = ?2, attempts = ?3, next_at = ?4, reason = ?5
                     WHERE sha256 = ?1",
                    params![sha, state, i64::from(attempts), next_at.as_millis(), reason],
                )?;
                Ok(())
            })
            .await
    }

    /// What a URL token names. A file the farm has cached but this
    /// member's directory lacks is wanted here from now on (the fetcher
    /// brings it).
    pub async fn lookup(&self, token: &str, now: Timestamp) -> Result<Lookup, DbError> {
        let digest = bulk::token_digest(token);
        let row: Option<(String, i64)> = self
            .db
            .write(move |c| {
                let row: Option<(String, i64)> = c.row(
                    "SELECT f.sha256, f.size FROM tokens t JOIN files f ON f.sha256 = t.sha256
                     WHERE t.digest = ?1 AND f.state = 'cached'",
                    params![digest],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                if let Some((sha, _)) = &row {
                    c.exec(
                        "UPDATE files SET last_used = ?2 WHERE sha256 = ?1",
                        params![sha, now.as_millis()],
                    )?;
                }
                Ok(row)
            })
            .await?;
        let Some((sha, size)) = row else {
            return Ok(Lookup::Unknown);
        };
        let path = self.path(&sha);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(Lookup::Here(path, u64::try_from(size).unwrap_or(0)));
        }
        if let Ok(mut m) = self.missing.lock()
            && m.insert(sha)
        {
            self.wake.notify_one();
        }
        Ok(Lookup::Elsewhere)
    }

    /// Whether `sha` is cached here.
    pub async fn is_cached(&self, sha: String) -> Result<bool, DbError> {
        self.db
            .read(move |c| {
                c.exists(
                    "SELECT 1 FROM files WHERE sha256 = ?1 AND state = 'cached'",
                    params![sha],
                )
            })
            .await
    }

    /// Bytes of cached files, and the files, least recently used first.
    async fn cached(&self) -> Result<Vec<(String, u64)>, DbError> {
        self.db
            .read(|c| {
                c.rows(
                    "SELECT sha256, size FROM files WHERE state = 'cached' ORDER BY last_used",
                    params![],
                    |r| Ok((r.get(0)?, u64::try_from(r.get::<i64>(1)?).unwrap_or(0))),
                )
            })
            .await
    }

    /// Every file the cache has a record of, in any state.
    async fn known(&self) -> Result<HashSet<String>, DbError> {
        let rows = self
            .db
            .read(|c| c.rows("SELECT sha256 FROM files", params![], |r| r.get(0)))
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn forget(&self, sha: String) -> Result<(), DbError> {
        self.db
            .write(move |c| {
                c.exec("DELETE FROM tokens WHERE sha256 = ?1", params![sha])?;
                c.exec("DELETE FROM files WHERE sha256 = ?1", params![sha])?;
                Ok(())
            })
            .await
    }

    /// Files cached, and their bytes (status).
    pub async fn usage(&self) -> Result<(u64, u64), DbError> {
        self.db
            .read(|c| {
                let (n, b): (i64, i64) = c.one(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM files
                     WHERE state = 'cached'",
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok((u64::try_from(n).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
            })
            .await
    }
}

/// How often a member looks for copies the farm no longer keeps.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The fetcher and evictor: runs until `stop`. In a farm the leader
/// fetches and evicts for the farm; every member fetches what its own
/// directory lacks and removes what the farm forgot.
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
    // Copies the farm forgot are rare (evictions): looked for every minute.
    let mut pruned: Option<std::time::Instant> = None;
    loop {
        let now = mlm.clock.now();
        if mlm.presence.is_leader() {
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
        }
        let missing: Vec<String> = mlm
            .cache
            .missing
            .lock()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        for sha in missing {
            if let Err(err) = fetch_missing(&mlm, sha.clone()).await {
                tracing::warn!("bulk cache {sha}: fetching it into this member's directory: {err}");
            }
        }
        if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            if let Err(e) = prune(&mlm.cache).await {
                tracing::warn!("bulk cache: {e}");
            }
            pruned = Some(std::time::Instant::now());
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = mlm.cache.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Fetches a file the farm has cached into this member's directory, which
/// lacks it (the leader's directory is not shared with this member).
async fn fetch_missing(mlm: &Mlm, sha: String) -> Result<(), String> {
    let cache = &mlm.cache;
    let done = |sha: &str| {
        if let Ok(mut m) = cache.missing.lock() {
            m.remove(sha);
        }
    };
    let Some(e) = cache
        .cached_entry(sha.clone())
        .await
        .map_err(|e| e.to_string())?
    else {
        // Evicted by the farm meanwhile: nothing to serve any more.
        done(&sha);
        return Ok(());
    };
    // One fetch per directory: a member sharing it may be fetching it.
    let Some(_lock) = cache.fetch_lock(&sha)? else {
        return Ok(());
    };
    if tokio::fs::try_exists(cache.path(&sha))
        .await
        .unwrap_or(false)
    {
        done(&sha);
        return Ok(());
    }
    let have = tokio::fs::metadata(cache.part(&sha))
        .await
        .map_or(0, |m| m.len());
    let Ok(_permit) = mlm
        .throttle
        .bulk_permit(&mlm.id, e.size.saturating_sub(have), 3)
    else {
        // Held back by the throttle: the next round asks again.
        return Ok(());
    };
    let url = mlm.uplink.bulk_url(&e.source);
    cache.stats.fetches.inc();
    let answer = cache
        .client
        .fetch(&url, &cache.part(&sha), e.size, &sha)
        .await;
    let after = tokio::fs::metadata(cache.part(&sha))
        .await
        .map_or(0, |m| m.len());
    cache.stats.fetched_bytes.inc_by(after.saturating_sub(have));
    match answer {
        Answer::Complete => {
            tokio::fs::rename(cache.part(&sha), cache.path(&sha))
                .await
                .map_err(|err| err.to_string())?;
            done(&sha);
            tracing::info!(
                "bulk cache: {sha} ({} bytes) fetched and verified into this member's directory",
                e.size
            );
            Ok(())
        }
        Answer::Gone { why } => {
            let _ = tokio::fs::remove_file(cache.part(&sha)).await;
            done(&sha);
            Err(why)
        }
        Answer::Partial { .. } => Ok(()),
        Answer::Busy { why, .. }
        | Answer::Mismatch { why }
        | Answer::Conflict { why }
        | Answer::Unavailable { why } => Err(why),
    }
}

/// Removes files (and partial files) from this member's directory that the
/// cache no longer has a record of: evicted or forgotten by the farm's
/// leader, which removed its own copy.
async fn prune(cache: &Cache) -> Result<(), String> {
    let known = cache.known().await.map_err(|e| e.to_string())?;
    let mut dir = tokio::fs::read_dir(&cache.dir)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(f) = dir.next_entry().await.map_err(|e| e.to_string())? {
        let name = f.file_name().to_string_lossy().into_owned();
        // SHA, SHA.part or SHA.lock.
        let sha = name.split('.').next().unwrap_or_default();
        // Only the cache's own names (a SHA-256 in hex).
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        if !known.contains(sha) {
            let _ = tokio::fs::remove_file(f.path()).await;
            tracing::info!("bulk cache: removed {name}, which the farm no longer keeps");
        }
    }
    Ok(())
}

async fn fetch_one(mlm: &Mlm, e: &Entry) -> Result<(), String> {
    let cache = &mlm.cache;
    // A member sharing the directory may be fetching it for itself: the
    // next round finds the file here.
    let Some(_lock) = cache.fetch_lock(&e.sha)? else {
        return Ok(());
    };
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
    let url = mlm.uplink.bulk_url(&e.source);
    cache.stats.fetches.inc();
    let answer = cache
        .client
        .fetch(&url, &cache.part(&e.sha), e.size, &e.sha)
        .await;
    let after = tokio::fs::metadata(cache.part(&e.sha))
        .await
        .map_or(0, |m| m.len());
    cache.stats.fetched_bytes.inc_by(after.saturating_sub(have));
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
            cache.stats.failed.inc();
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
        cache.stats.evicted.inc();
        total = total.saturating_sub(size);
        tracing::info!("bulk cache: evicted {sha} ({size} bytes)");
    }
    Ok(())
}
