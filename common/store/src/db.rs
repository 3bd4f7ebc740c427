//! A SQLite connection owned by a dedicated thread (SQLite calls never run
//! on async workers), with group commit: the thread takes every job waiting
//! in its queue and runs the writes in one transaction, each in its own
//! savepoint, so one fsync serves many callers and a failing job undoes
//! only itself. A write's caller hears its result only after the commit.
//!
//! A write whose loss in a power failure only makes work be done again
//! (a spool forgetting that a message was delivered sends it again, and
//! the receiver drops the duplicate) may be *relaxed*: a batch of only
//! such writes commits without an fsync (`synchronous=NORMAL`: still
//! atomic, and safe against a crash of the process, but on disk only with
//! the next fsynced commit or checkpoint). A batch with any other write is
//! fsynced whole.

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// Why a database job failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(String),
    #[error("the database thread has stopped")]
    Closed,
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sql(e.to_string())
    }
}

/// Transaction control, as the database thread needs it from either
/// engine (SQLite's own connection, or [`crate::sql::Conn`]).
pub trait Txn {
    /// Begins the batch's transaction (SQLite: `BEGIN IMMEDIATE`).
    fn begin(&mut self) -> Result<(), DbError>;
    /// Whether the next commits may skip their fsync (module docs).
    fn durability(&mut self, relaxed: bool) -> Result<(), DbError>;
    /// Runs one parameterless statement (`SAVEPOINT job`, `COMMIT`, ...).
    fn run(&mut self, sql: &str) -> Result<(), DbError>;
}

impl Txn for Connection {
    fn begin(&mut self) -> Result<(), DbError> {
        Ok(self.execute_batch("BEGIN IMMEDIATE")?)
    }
    fn durability(&mut self, relaxed: bool) -> Result<(), DbError> {
        Ok(self.execute_batch(if relaxed {
            "PRAGMA synchronous=NORMAL"
        } else {
            "PRAGMA synchronous=FULL"
        })?)
    }
    fn run(&mut self, sql: &str) -> Result<(), DbError> {
        self.prepare_cached(sql)?.execute([])?;
        Ok(())
    }
}

/// State owned by the database thread: the connection and whatever the
/// owner caches beside it, which a failed write must restore.
pub trait DbState: Send + 'static {
    /// What `restore` needs to undo in-memory changes of one job.
    type Saved;
    fn txn(&mut self) -> &mut dyn Txn;
    fn save(&self) -> Self::Saved;
    fn restore(&mut self, saved: Self::Saved);
    /// Called before a batch with writes commits: what else must reach
    /// the disk first (the spool's log). An error fails the batch.
    fn before_commit(&mut self) -> Result<(), DbError> {
        Ok(())
    }
    /// Called once a batch with writes has committed (`true`) or failed
    /// and been undone (`false`).
    fn after_commit(&mut self, _committed: bool) {}
}

/// The state of a store that caches nothing beside its connection.
#[derive(Debug)]
pub struct Plain(pub Connection);

impl DbState for Plain {
    type Saved = ();
    fn txn(&mut self) -> &mut dyn Txn {
        &mut self.0
    }
    fn save(&self) {}
    fn restore(&mut self, (): ()) {}
}

type Deliver = Box<dyn FnOnce(Result<(), DbError>) + Send>;
type WriteJob<S> = Box<dyn FnOnce(Option<&mut S>) -> Deliver + Send>;

enum Job<S> {
    Read(Box<dyn FnOnce(&mut S) + Send>),
    /// Called with the state inside the batch's transaction, or with `None`
    /// if the transaction could not begin; returns what to tell the caller
    /// once the commit's fate is known. `relaxed`: the commit need not be
    /// fsynced for this one.
    Write {
        job: WriteJob<S>,
        relaxed: bool,
    },
}

/// Handle to the database thread; cheap to clone.
#[derive(Debug)]
pub struct Db<S> {
    tx: mpsc::Sender<Job<S>>,
}

impl<S> Clone for Db<S> {
    fn clone(&self) -> Self {
        Db {
            tx: self.tx.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Job<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("db job")
    }
}

/// Opens a connection with the durability every store here uses: WAL,
/// `synchronous=FULL` (a commit is on disk before anyone hears of it).
pub fn open(path: &std::path::Path) -> Result<Connection, DbError> {
    open_with(path, None)
}

/// [`open`], and for a new file, pages of `page_size` bytes (SQLite's
/// default is 4 KiB; a store of rows of a few KiB wants larger ones, see
/// [`crate::sql::Conn::open_paged`]). An existing file keeps its own.
pub fn open_with(path: &std::path::Path, page_size: Option<u32>) -> Result<Connection, DbError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| DbError::Sql(format!("{}: {e}", dir.display())))?;
    }
    // The one place a product database is opened (clippy.toml).
    #[allow(clippy::disallowed_methods)]
    let conn = Connection::open(path)?;
    // A page cache of up to 16 MB (allocated as used; SqliteSpool gives it
    // back when idle) and reads through a memory map: with SQLite's 2 MB a
    // spool draining a backlog read its pages back with a pread each, and
    // the server its index pages.
    // Checkpoints stay at SQLite's default (every 1,000 pages, a WAL of
    // about 4 MB): larger ones write a spool's short-lived pages fewer
    // times, but a WAL of tens of MB per database fills a small site's
    // disk (the fault suite's 24 MB one) before it is ever checkpointed.
    if let Some(size) = page_size {
        // Takes effect only before the file's first table (and before WAL).
        conn.execute_batch(&format!("PRAGMA page_size={size}"))?;
    }
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;
         PRAGMA cache_size=-16384; PRAGMA mmap_size=268435456;",
    )?;
    Ok(conn)
}

/// Opens a database to read it only (a spool being checked, or salvaged
/// after its check failed): nothing in the file is changed, and a file
/// that is not a database is not made one.
pub fn open_read_only(path: &std::path::Path) -> Result<Connection, rusqlite::Error> {
    // The one place a product database is opened to read only (clippy.toml).
    #[allow(clippy::disallowed_methods)]
    Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

impl<S: DbState> Db<S> {
    /// Starts the thread that owns `state`.
    pub fn start(name: &str, mut state: S) -> Result<Self, DbError> {
        let (tx, mut rx) = mpsc::channel::<Job<S>>(1024);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // What `synchronous` is set to (open() sets FULL).
                let mut relaxed = false;
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    run_batch(&mut state, batch, &mut relaxed);
                }
            })
            .map_err(|e| DbError::Sql(format!("cannot start the database thread: {e}")))?;
        Ok(Db { tx })
    }

    /// Answers once the thread has come to this request: whether storage
    /// is alive and keeping up (a service manager's watchdog).
    pub async fn ping(&self) -> Result<(), DbError> {
        self.read(|_| Ok(())).await
    }

    /// Runs `f` in the next transaction; returns once it has committed, on
    /// disk.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        self.write_as(f, false).await
    }

    /// [`Db::write`] for a write that may be lost in a power failure (see
    /// the module's documentation): returns once it has committed, maybe
    /// not yet on disk.
    pub async fn write_relaxed<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        self.write_as(f, true).await
    }

    async fn write_as<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> Result<T, DbError> + Send + 'static,
        relaxed: bool,
    ) -> Result<T, DbError> {
        let (tx, rx) = oneshot::channel();
        let job = Job::Write {
            job: Box::new(move |s: Option<&mut S>| {
                let r = match s {
                    Some(s) => in_savepoint(s, f),
                    None => Err(DbError::Sql("the transaction could not begin".into())),
                };
                Box::new(move |committed: Result<(), DbError>| {
                    let _ = tx.send(committed.and(r));
                }) as Deliver
            }),
            relaxed,
        };
        self.tx.send(job).await.map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// Runs `f` on the thread (it sees committed data and the current
    /// batch's writes).
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let (tx, rx) = oneshot::channel();
        let job = Job::Read(Box::new(move |s: &mut S| {
            let _ = tx.send(f(s));
        }));
        self.tx.send(job).await.map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }
}

fn in_savepoint<S: DbState, T>(
    s: &mut S,
    f: impl FnOnce(&mut S) -> Result<T, DbError>,
) -> Result<T, DbError> {
    s.txn().run("SAVEPOINT job")?;
    let saved = s.save();
    match f(s) {
        Ok(v) => {
            s.txn().run("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            let _ = s.txn().run("ROLLBACK TO job");
            let _ = s.txn().run("RELEASE job");
            s.restore(saved);
            Err(e)
        }
    }
}

/// `relaxed`: what `synchronous` is set to; set here to what the batch
/// needs.
fn run_batch<S: DbState>(state: &mut S, batch: Vec<Job<S>>, relaxed: &mut bool) {
    let writes = batch.iter().any(|j| matches!(j, Job::Write { .. }));
    let lax = batch
        .iter()
        .all(|j| !matches!(j, Job::Write { relaxed: false, .. }));
    let mut began: Result<(), DbError> = Ok(());
    if writes && lax != *relaxed {
        began = state.txn().durability(lax);
        if began.is_ok() {
            *relaxed = lax;
        }
    }
    if writes && began.is_ok() {
        began = state.txn().begin();
    }
    let before = state.save();
    let mut deliveries = Vec::new();
    for job in batch {
        match job {
            Job::Read(f) => f(state),
            Job::Write { job: f, .. } => {
                let deliver = if began.is_ok() {
                    f(Some(&mut *state))
                } else {
                    f(None)
                };
                deliveries.push(deliver);
            }
        }
    }
    let committed = match (&began, writes) {
        (Ok(()), true) => state
            .before_commit()
            .and_then(|()| state.txn().run("COMMIT")),
        (Ok(()), false) => Ok(()),
        (Err(e), _) => Err(e.clone()),
    };
    if let Err(e) = &committed {
        let _ = state.txn().run("ROLLBACK");
        state.restore(before);
        tracing::error!("commit failed: {e}");
    }
    if writes {
        state.after_commit(committed.is_ok());
    }
    for d in deliveries {
        d(committed.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PRAGMA synchronous` as a job sees it: 1 NORMAL, 2 FULL.
    fn sync_mode(s: &mut Plain) -> Result<i64, DbError> {
        Ok(s.0.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_write_always_commits_fsynced_and_a_relaxed_batch_need_not() {
        let dir = std::env::temp_dir().join(format!("rs-db-relaxed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Db::start("rs-test-db", Plain(open(&dir.join("t.db")).unwrap())).unwrap();
        assert_eq!(db.write_relaxed(sync_mode).await.unwrap(), 1);
        assert_eq!(db.write(sync_mode).await.unwrap(), 2);
        assert_eq!(db.write_relaxed(sync_mode).await.unwrap(), 1);
        // Mixed in whatever batches they fall into: a durable write never
        // commits unfsynced.
        let mut jobs = tokio::task::JoinSet::new();
        for i in 0..200 {
            let db = db.clone();
            jobs.spawn(async move {
                if i % 2 == 0 {
                    (true, db.write(sync_mode).await.unwrap())
                } else {
                    (false, db.write_relaxed(sync_mode).await.unwrap())
                }
            });
        }
        while let Some(r) = jobs.join_next().await {
            let (durable, mode) = r.unwrap();
            if durable {
                assert_eq!(mode, 2);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
