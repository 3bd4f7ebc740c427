//! A SQLite connection owned by a dedicated thread (SQLite calls never run
//! on async workers), with group commit: the thread takes every job waiting
//! in its queue and runs the writes in one transaction, each in its own
//! savepoint, so one fsync serves many callers and a failing job undoes
//! only itself. A write's caller hears its result only after the commit.

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

/// State owned by the database thread: the connection and whatever the
/// owner caches beside it, which a failed write must restore.
pub trait DbState: Send + 'static {
    /// What `restore` needs to undo in-memory changes of one job.
    type Saved;
    fn conn(&self) -> &Connection;
    fn save(&self) -> Self::Saved;
    fn restore(&mut self, saved: Self::Saved);
}

/// The state of a store that caches nothing beside its connection.
#[derive(Debug)]
pub struct Plain(pub Connection);

impl DbState for Plain {
    type Saved = ();
    fn conn(&self) -> &Connection {
        &self.0
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
    /// once the commit's fate is known.
    Write(WriteJob<S>),
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
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| DbError::Sql(format!("{}: {e}", dir.display())))?;
    }
    let conn = Connection::open(path)?;
    // Checkpoints stay at SQLite's default (every 1,000 pages, a WAL of
    // about 4 MB): larger ones write a spool's short-lived pages fewer
    // times, but a WAL of tens of MB per database fills a small site's
    // disk (the fault suite's 24 MB one) before it is ever checkpointed.
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
    )?;
    Ok(conn)
}

impl<S: DbState> Db<S> {
    /// Starts the thread that owns `state`.
    pub fn start(name: &str, mut state: S) -> Result<Self, DbError> {
        let (tx, mut rx) = mpsc::channel::<Job<S>>(1024);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    run_batch(&mut state, batch);
                }
            })
            .map_err(|e| DbError::Sql(format!("cannot start the database thread: {e}")))?;
        Ok(Db { tx })
    }

    /// Runs `f` in the next transaction; returns once it has committed.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let (tx, rx) = oneshot::channel();
        let job = Job::Write(Box::new(move |s: Option<&mut S>| {
            let r = match s {
                Some(s) => in_savepoint(s, f),
                None => Err(DbError::Sql("the transaction could not begin".into())),
            };
            Box::new(move |committed: Result<(), DbError>| {
                let _ = tx.send(committed.and(r));
            }) as Deliver
        }));
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
    s.conn().prepare_cached("SAVEPOINT job")?.execute([])?;
    let saved = s.save();
    match f(s) {
        Ok(v) => {
            s.conn().prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = s.conn().execute_batch("ROLLBACK TO job; RELEASE job");
            s.restore(saved);
            Err(e)
        }
    }
}

fn run_batch<S: DbState>(state: &mut S, batch: Vec<Job<S>>) {
    let writes = batch.iter().any(|j| matches!(j, Job::Write(_)));
    let began: Result<(), DbError> = if writes {
        state
            .conn()
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(DbError::from)
    } else {
        Ok(())
    };
    let before = state.save();
    let mut deliveries = Vec::new();
    for job in batch {
        match job {
            Job::Read(f) => f(state),
            Job::Write(f) => {
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
        (Ok(()), true) => state.conn().execute_batch("COMMIT").map_err(DbError::from),
        (Ok(()), false) => Ok(()),
        (Err(e), _) => Err(e.clone()),
    };
    if let Err(e) = &committed {
        let _ = state.conn().execute_batch("ROLLBACK");
        state.restore(before);
        tracing::error!("commit failed: {e}");
    }
    for d in deliveries {
        d(committed.clone());
    }
}
