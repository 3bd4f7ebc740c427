//! A tier's durable back-channel queue (seed 004, Fig. 18): messages
//! waiting for a next hop, handed out on the replies to that hop's POSTs,
//! kept until the hop acknowledges them and offered again if it does not.
//! Also the tier's knowledge of which next hop reaches which component.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::{Db, DbError};
use crate::params;
use crate::sql::{Conn, Engine, Location, Migration};
use rs_protocol::codec::{Limits, RawMessage, decode_header_part};
use rs_protocol::ids::{MessageId, RsId};
use rs_protocol::time::Timestamp;

/// The queue's schema changes, in order (append only). On SQLite version
/// 1 also adopts the files of releases before versions, with the columns
/// they gained at every start; on PostgreSQL it creates the tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "baseline",
        apply: baseline,
    },
    Migration {
        version: 2,
        name: "the queue's owner",
        // The component whose queue this is (all members of a farm share
        // one ID): another component's queue is refused at open.
        apply: |c| c.batch("CREATE TABLE owner (id TEXT PRIMARY KEY)"),
    },
    Migration {
        version: 3,
        name: "farm members",
        apply: |c| c.batch(crate::members::TABLE),
    },
    Migration {
        version: 4,
        name: "delivery notices",
        // Deliveries in the subtree on their way up (a farm's: any member
        // sends what a dead member had not).
        apply: |c| {
            c.batch(
                "CREATE TABLE notices (
                     id   TEXT   NOT NULL,
                     dest TEXT   NOT NULL,
                     at   BIGINT NOT NULL,
                     PRIMARY KEY (id, dest)
                 )",
            )
        },
    },
];

pub use crate::members::Member;

const SQLITE: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    id           TEXT    NOT NULL,
    hop          TEXT    NOT NULL,
    created      INTEGER NOT NULL,
    expiry       INTEGER,
    offered      INTEGER,
    kind         TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content      BLOB    NOT NULL,
    PRIMARY KEY (id, hop)
);
CREATE INDEX IF NOT EXISTS outbox_hop ON outbox (hop, created);
CREATE TABLE IF NOT EXISTS routes (
    component TEXT    PRIMARY KEY,
    hop       TEXT    NOT NULL,
    updated   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS received (
    id    TEXT    PRIMARY KEY,
    at    INTEGER NOT NULL,
    state TEXT    NOT NULL DEFAULT 'done'
);
";

const POSTGRES: &str = "
CREATE TABLE outbox (
    id           TEXT   NOT NULL,
    hop          TEXT   NOT NULL,
    created      BIGINT NOT NULL,
    expiry       BIGINT,
    offered      BIGINT,
    kind         TEXT   NOT NULL,
    content_type TEXT   NOT NULL,
    header       BYTEA  NOT NULL,
    content      BYTEA  NOT NULL,
    bulk         TEXT,
    held         BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (id, hop)
);
CREATE INDEX outbox_hop ON outbox (hop, created);
CREATE INDEX outbox_bulk ON outbox (bulk) WHERE bulk IS NOT NULL;
CREATE TABLE routes (
    component TEXT   PRIMARY KEY,
    hop       TEXT   NOT NULL,
    updated   BIGINT NOT NULL
);
CREATE TABLE received (
    id    TEXT   PRIMARY KEY,
    at    BIGINT NOT NULL,
    state TEXT   NOT NULL DEFAULT 'done'
);
";

fn baseline(c: &mut Conn) -> Result<(), DbError> {
    if c.engine() == Engine::Postgres {
        return c.batch(POSTGRES);
    }
    c.batch(SQLITE)?;
    // Columns added for download offers and for actions being applied
    // (files from before get them).
    for (table, col, ddl) in [
        ("outbox", "bulk", "ALTER TABLE outbox ADD COLUMN bulk TEXT"),
        (
            "outbox",
            "held",
            "ALTER TABLE outbox ADD COLUMN held INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "received",
            "state",
            "ALTER TABLE received ADD COLUMN state TEXT NOT NULL DEFAULT 'done'",
        ),
    ] {
        if !c.exists(
            "SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, col],
        )? {
            c.batch(ddl)?;
        }
    }
    c.batch("CREATE INDEX IF NOT EXISTS outbox_bulk ON outbox (bulk) WHERE bulk IS NOT NULL")
}

/// The PostgreSQL channel on which a farm member's commit to the queue at
/// `at` wakes the others' held long polls: `rs_` and the queue's schema
/// (each farm its own; at most 63 bytes, PostgreSQL's limit).
pub fn ready_channel(at: &Location) -> String {
    let schema = match at {
        Location::Postgres { schema, .. } => schema.as_str(),
        Location::Sqlite(_) => "outbox",
    };
    let mut c = format!("rs_{schema}");
    c.truncate(63);
    c
}

/// What a tier did with an action addressed to it before ([`Outbox::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Never seen: now recorded as being applied.
    New,
    /// Being applied when the process stopped: not applied again.
    Interrupted,
    /// Applied and answered (or dropped) before.
    Done,
}

/// Handle to the queue; cheap to clone.
///
/// On PostgreSQL the queue, the routes and the received IDs are a farm's:
/// every member hands out any hop's messages and takes its
/// acknowledgements. Offers lock what they hand out (`SKIP LOCKED`), so two
/// members polled at once by one hop do not both hand out a message, and
/// every commit that makes messages ready notifies [`ready_channel`].
#[derive(Debug, Clone)]
pub struct Outbox {
    db: Db<Conn>,
    /// The routes as stored (component -> hop, and when this process last
    /// saw them stored), so that an envelope from a hop whose components
    /// are already known writes nothing: every POST names its sources, and
    /// a route changes rarely. Cleared when it grows past
    /// [`KNOWN_ROUTES`] (it then fills again from what arrives). In a farm
    /// another member may change a route, so an entry is trusted for
    /// [`KNOWN_FOR`] only.
    known: Arc<Mutex<HashMap<String, (String, Instant)>>>,
    engine: Engine,
    /// [`ready_channel`].
    ready: Arc<str>,
}

/// The advisory lock under which a queue's owner is recorded.
const OWNER_LOCK: i64 = 0x7273_6f77_6e72;

/// Routes remembered in memory at most.
const KNOWN_ROUTES: usize = 100_000;

/// How long a remembered route is trusted on a shared database.
const KNOWN_FOR: Duration = Duration::from_secs(60);

impl Outbox {
    /// Opens the queue of `owner` at `at` (an SQLite file of this tier's,
    /// or a farm's PostgreSQL schema), migrating its schema in place. A
    /// queue another component owns is refused: two MLMs that are not one
    /// farm must never hand out each other's messages.
    pub fn open(at: &Location, owner: &RsId) -> Result<Self, DbError> {
        // PostgreSQL's blocking client may not run on a thread that drives
        // async tasks (a daemon opens its stores from its async main): the
        // first statements run on a thread of their own, like the connect.
        let conn = std::thread::scope(|s| {
            s.spawn(|| -> Result<Conn, DbError> {
                let mut conn = Conn::open(at, MIGRATIONS)?;
                // Members of a farm starting together: one records the
                // owner, the others find it.
                conn.begin()?;
                let owners = conn.serialize(OWNER_LOCK).and_then(|()| {
                    conn.exec(
                        "INSERT INTO owner (id) SELECT ?1 WHERE NOT EXISTS (SELECT 1 FROM owner)",
                        params![owner.as_str()],
                    )?;
                    conn.rows("SELECT id FROM owner", params![], |r| r.get::<String>(0))
                });
                let owners = match owners {
                    Ok(o) => {
                        conn.commit()?;
                        o
                    }
                    Err(e) => {
                        let _ = conn.rollback();
                        return Err(e);
                    }
                };
                if owners.iter().any(|o| o != owner.as_str()) {
                    return Err(DbError::Sql(format!(
                        "{} is the back-channel queue of {}, not of {owner}",
                        at.describe(),
                        owners.join(", ")
                    )));
                }
                Ok(conn)
            })
            .join()
            .unwrap_or_else(|_| Err(DbError::Sql("opening the queue panicked".into())))
        })?;
        let engine = conn.engine();
        Ok(Outbox {
            db: Db::start("rs-outbox", conn)?,
            known: Arc::default(),
            engine,
            ready: ready_channel(at).into(),
        })
    }

    /// Records that `components` are reached through `hop`.
    pub async fn learn(
        &self,
        hop: RsId,
        components: Vec<RsId>,
        now: Timestamp,
    ) -> Result<(), DbError> {
        let trusted = |at: &Instant| self.engine == Engine::Sqlite || at.elapsed() < KNOWN_FOR;
        let new: Vec<RsId> = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            components
                .into_iter()
                .chain(std::iter::once(hop.clone()))
                .filter(|c| {
                    known
                        .get(c.as_str())
                        .is_none_or(|(h, at)| h != hop.as_str() || !trusted(at))
                })
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let written = new.clone();
        let hop_s = hop.as_str().to_owned();
        self.db
            .write(move |c| {
                for d in &new {
                    c.exec(
                        "INSERT INTO routes (component, hop, updated) VALUES (?1, ?2, ?3)
                         ON CONFLICT (component) DO UPDATE SET hop = ?2, updated = ?3",
                        params![d.as_str(), hop.as_str(), now.as_millis()],
                    )?;
                }
                Ok(())
            })
            .await?;
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() + written.len() > KNOWN_ROUTES {
            known.clear();
        }
        let at = Instant::now();
        for d in written {
            known.insert(d.as_str().to_owned(), (hop_s.clone(), at));
        }
        Ok(())
    }

    /// The next hop towards `dest`: the hop of `dest` or of the nearest
    /// component it was allocated under; `None` if unknown.
    pub async fn route(&self, dest: RsId) -> Result<Option<RsId>, DbError> {
        self.db
            .read(move |c| {
                let mut at = Some(dest);
                while let Some(d) = at {
                    let hop: Option<String> = c.row(
                        "SELECT hop FROM routes WHERE component = ?1",
                        params![d.as_str()],
                        |r| r.get(0),
                    )?;
                    if let Some(h) = hop {
                        return Ok(RsId::new(h).ok());
                    }
                    at = d.parent();
                }
                Ok(None)
            })
            .await
    }

    /// Queues messages received from upstream, each at most once: a
    /// message whose ID was received before (upstream offering it again
    /// because the acknowledgement was lost, possibly to another member of
    /// a farm) is not queued again. Returns the IDs now safe, to
    /// acknowledge upstream.
    pub async fn accept(
        &self,
        copies: Vec<(RsId, RawMessage)>,
        now: Timestamp,
    ) -> Result<Vec<MessageId>, DbError> {
        self.accept_bulk(copies, None, now).await
    }

    /// Like [`Outbox::accept`], for copies of a download offer: they name
    /// the cached file `bulk` (its SHA-256), and with `held` they are not
    /// handed out until [`Outbox::release`] (the file is not here yet).
    pub async fn accept_bulk(
        &self,
        copies: Vec<(RsId, RawMessage)>,
        bulk: Option<(String, bool)>,
        now: Timestamp,
    ) -> Result<Vec<MessageId>, DbError> {
        let ready = self.ready.clone();
        self.db
            .write(move |c| {
                let (file, held) = match &bulk {
                    Some((sha, held)) => (Some(sha.as_str()), *held),
                    None => (None, false),
                };
                // What was received before this batch (its own copies of
                // one message each go in).
                let mut ids: Vec<MessageId> = Vec::new();
                let mut before = Vec::new();
                for (_, m) in &copies {
                    let id = &m.header.id;
                    if !ids.contains(id) {
                        if c.exists("SELECT 1 FROM received WHERE id = ?1", params![id.as_str()])? {
                            before.push(id.clone());
                        }
                        ids.push(id.clone());
                    }
                }
                let mut queued = 0;
                for (hop, m) in &copies {
                    if before.contains(&m.header.id) {
                        continue;
                    }
                    queued += crate::queue::put(
                        c,
                        hop.as_str(),
                        m,
                        m.header.expiry().map(Timestamp::as_millis),
                        file,
                        held,
                        now,
                    )?;
                    c.exec(
                        "INSERT INTO received (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                        params![m.header.id.as_str(), now.as_millis()],
                    )?;
                }
                if queued > 0 && !held {
                    c.notify(&ready)?;
                }
                Ok(ids)
            })
            .await
    }

    /// Drops messages whose expiry passed (they are not worth delivering
    /// any more; the application server marks their jobs expired on its
    /// own clock) and forgets received IDs older than `remember`, which
    /// must exceed the longest expiry upstream gives. Returns how many
    /// messages were dropped.
    pub async fn sweep(&self, now: Timestamp, remember: Duration) -> Result<u64, DbError> {
        self.db
            .write(move |c| {
                let n = crate::queue::drop_expired(c, now)?;
                let horizon =
                    now.as_millis() - i64::try_from(remember.as_millis()).unwrap_or(i64::MAX);
                c.exec("DELETE FROM received WHERE at < ?1", params![horizon])?;
                Ok(n)
            })
            .await
    }

    /// Messages for `hop` not offered within `again` (or never) and not
    /// expired, oldest first; marks them offered now.
    pub async fn offer(
        &self,
        hop: RsId,
        now: Timestamp,
        again: Duration,
        limit: usize,
    ) -> Result<Vec<RawMessage>, DbError> {
        self.db
            .write(move |c| crate::queue::offer(c, hop.as_str(), now, again, limit))
            .await
    }

    /// `hop` acknowledged `ids`: forget them. Returns those that `hop`
    /// was itself a final destination of (delivered, to report upstream).
    pub async fn acknowledge(
        &self,
        hop: RsId,
        ids: Vec<MessageId>,
    ) -> Result<Vec<(MessageId, RsId)>, DbError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let limits = Limits::default();
        self.db
            .write(move |c| {
                let mut delivered = Vec::new();
                for id in &ids {
                    let header = crate::queue::acknowledged(c, hop.as_str(), id.as_str())?;
                    let Some(header) = header else { continue };
                    if decode_header_part(&header, &limits)
                        .is_ok_and(|(h, _, _)| h.destinations().contains(&hop))
                    {
                        delivered.push((id.clone(), hop.clone()));
                    }
                }
                Ok(delivered)
            })
            .await
    }

    /// Records that the action `id` (addressed to this tier) is about to
    /// be applied, unless it was before: then says how far it got.
    /// Applying only after this commits is what makes an action applied at
    /// most once, whatever instant the process dies at (and, in a farm,
    /// whichever member it reaches).
    pub async fn claim(&self, id: MessageId, now: Timestamp) -> Result<Claim, DbError> {
        self.db
            .write(move |c| {
                if c.exec(
                    "INSERT INTO received (id, at, state) VALUES (?1, ?2, 'applying')
                     ON CONFLICT (id) DO NOTHING",
                    params![id.as_str(), now.as_millis()],
                )? == 1
                {
                    return Ok(Claim::New);
                }
                let state: Option<String> = c.row(
                    "SELECT state FROM received WHERE id = ?1",
                    params![id.as_str()],
                    |r| r.get(0),
                )?;
                Ok(match state.as_deref() {
                    Some("applying") => Claim::Interrupted,
                    _ => Claim::Done,
                })
            })
            .await
    }

    /// Remembers that a message with this ID was received and dealt with
    /// (an action claimed is then done).
    pub async fn mark_seen(&self, id: MessageId, now: Timestamp) -> Result<(), DbError> {
        self.db
            .write(move |c| {
                c.exec(
                    "INSERT INTO received (id, at, state) VALUES (?1, ?2, 'done')
                     ON CONFLICT (id) DO UPDATE SET state = 'done'",
                    params![id.as_str(), now.as_millis()],
                )?;
                Ok(())
            })
            .await
    }

    /// The file `bulk` is here: its held copies may go. Returns how many.
    pub async fn release(&self, bulk: String) -> Result<u64, DbError> {
        let ready = self.ready.clone();
        self.db
            .write(move |c| {
                let n = crate::queue::release(c, &bulk)?;
                if n > 0 {
                    c.notify(&ready)?;
                }
                Ok(n)
            })
            .await
    }

    /// The file `bulk` cannot be had: its copies are dropped. Returns the
    /// number dropped.
    pub async fn drop_bulk(&self, bulk: String) -> Result<u64, DbError> {
        self.db
            .write(move |c| c.exec("DELETE FROM outbox WHERE bulk = ?1", params![bulk]))
            .await
    }

    /// Copies of offers of the file `bulk` not yet acknowledged (while any
    /// remain, the file must stay).
    pub async fn bulk_pending(&self, bulk: String) -> Result<u64, DbError> {
        self.db
            .read(move |c| {
                let n: i64 = c.one(
                    "SELECT COUNT(*) FROM outbox WHERE bulk = ?1",
                    params![bulk],
                    |r| r.get(0),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    /// Records this member's beat: that it is alive now and its load. A
    /// farm's members beat every few seconds; the others read the table
    /// ([`Outbox::members`]).
    pub async fn beat(&self, m: Member) -> Result<(), DbError> {
        self.db
            .write_relaxed(move |c| crate::members::beat(c, &m))
            .await
    }

    /// The farm's members by name, as their last beats recorded them;
    /// members silent since before `forget` are forgotten.
    pub async fn members(&self, forget: Timestamp) -> Result<Vec<Member>, DbError> {
        self.db
            .write_relaxed(move |c| crate::members::list(c, forget))
            .await
    }

    /// Records deliveries in the subtree (message, final destination) to
    /// report upstream, until [`Outbox::notices_sent`] says they were.
    pub async fn note_delivered(
        &self,
        notices: Vec<(MessageId, RsId)>,
        now: Timestamp,
    ) -> Result<(), DbError> {
        if notices.is_empty() {
            return Ok(());
        }
        // Informational: one lost in a power failure only goes unreported.
        self.db
            .write_relaxed(move |c| {
                for (id, dest) in &notices {
                    c.exec(
                        "INSERT INTO notices (id, dest, at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (id, dest) DO NOTHING",
                        params![id.as_str(), dest.as_str(), now.as_millis()],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// The upstream has these notices: forget them.
    pub async fn notices_sent(&self, notices: Vec<(MessageId, RsId)>) -> Result<(), DbError> {
        self.db
            .write_relaxed(move |c| {
                for (id, dest) in &notices {
                    c.exec(
                        "DELETE FROM notices WHERE id = ?1 AND dest = ?2",
                        params![id.as_str(), dest.as_str()],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// Up to `limit` notices recorded before `before` and still not sent
    /// (their member died, or the process stopped, before its POST went
    /// through), stamped `now` so that the next look leaves them alone for
    /// as long again. In a farm two members never take the same ones at
    /// once (`SKIP LOCKED`).
    pub async fn stale_notices(
        &self,
        before: Timestamp,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<(MessageId, RsId)>, DbError> {
        let sql = match self.engine {
            Engine::Postgres => {
                "UPDATE notices SET at = ?2 WHERE (id, dest) IN
                     (SELECT id, dest FROM notices WHERE at < ?1 LIMIT ?3 FOR UPDATE SKIP LOCKED)
                 RETURNING id, dest"
            }
            Engine::Sqlite => {
                "UPDATE notices SET at = ?2 WHERE (id, dest) IN
                     (SELECT id, dest FROM notices WHERE at < ?1 LIMIT ?3)
                 RETURNING id, dest"
            }
        };
        let rows: Vec<(String, String)> = self
            .db
            .write_relaxed(move |c| {
                c.rows(
                    sql,
                    params![before.as_millis(), now.as_millis(), limit],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, dest)| Some((MessageId::new(id).ok()?, RsId::new(dest).ok()?)))
            .collect())
    }

    /// Messages waiting.
    pub async fn pending(&self) -> Result<u64, DbError> {
        self.db
            .read(|c| {
                let n: i64 = c.one("SELECT COUNT(*) FROM outbox", params![], |r| r.get(0))?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }
}
