//! A tier's durable back-channel queue (seed 004, Fig. 18): messages
//! waiting for a next hop, handed out on the replies to that hop's POSTs,
//! kept until the hop acknowledges them and offered again if it does not.
//! Also the tier's knowledge of which next hop reaches which component.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{OptionalExtension, params};

use crate::db::{Db, DbError, Plain};
use rs_protocol::codec::{Limits, RawMessage, decode_header_part, encode_header};
use rs_protocol::ids::{MessageId, RsId};
use rs_protocol::time::Timestamp;

const SCHEMA: &str = "
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

fn exec(
    conn: &rusqlite::Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(p)
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
#[derive(Debug, Clone)]
pub struct Outbox {
    db: Db<Plain>,
    /// The routes as stored (component -> hop), so that an envelope from a
    /// hop whose components are already known writes nothing: every POST
    /// names its sources, and a route changes rarely. Cleared when it grows
    /// past [`KNOWN_ROUTES`] (it then fills again from what arrives).
    known: Arc<Mutex<HashMap<String, String>>>,
}

/// Routes remembered in memory at most.
const KNOWN_ROUTES: usize = 100_000;

impl Outbox {
    pub fn open(path: &std::path::Path) -> Result<Self, DbError> {
        let conn = crate::db::open(path)?;
        conn.execute_batch(SCHEMA)?;
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
            let has: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
                .exists([table, col])?;
            if !has {
                conn.execute_batch(ddl)?;
            }
        }
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS outbox_bulk ON outbox (bulk) WHERE bulk IS NOT NULL",
        )?;
        Ok(Outbox {
            db: Db::start("rs-outbox", Plain(conn))?,
            known: Arc::default(),
        })
    }

    /// Records that `components` are reached through `hop`.
    pub async fn learn(
        &self,
        hop: RsId,
        components: Vec<RsId>,
        now: Timestamp,
    ) -> Result<(), DbError> {
        let new: Vec<RsId> = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            components
                .into_iter()
                .chain(std::iter::once(hop.clone()))
                .filter(|c| known.get(c.as_str()).is_none_or(|h| h != hop.as_str()))
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let written = new.clone();
        let hop_s = hop.as_str().to_owned();
        self.db
            .write(move |s| {
                for c in &new {
                    exec(
                        &s.0,
                        "INSERT INTO routes (component, hop, updated) VALUES (?1, ?2, ?3)
                         ON CONFLICT (component) DO UPDATE SET hop = ?2, updated = ?3",
                        params![c.as_str(), hop.as_str(), now.as_millis()],
                    )?;
                }
                Ok(())
            })
            .await?;
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() + written.len() > KNOWN_ROUTES {
            known.clear();
        }
        for c in written {
            known.insert(c.as_str().to_owned(), hop_s.clone());
        }
        Ok(())
    }

    /// The next hop towards `dest`: the hop of `dest` or of the nearest
    /// component it was allocated under; `None` if unknown.
    pub async fn route(&self, dest: RsId) -> Result<Option<RsId>, DbError> {
        self.db
            .read(move |s| {
                let mut at = Some(dest);
                while let Some(d) = at {
                    let hop: Option<String> =
                        s.0.query_row(
                            "SELECT hop FROM routes WHERE component = ?1",
                            params![d.as_str()],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(h) = hop {
                        return Ok(RsId::new(h).ok());
                    }
                    at = d.parent();
                }
                Ok(None)
            })
            .await
    }

    /// Queues messages (received from upstream, so each at most once: an
    /// ID already received is skipped). Returns the IDs now safe, to
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
        self.db
            .write(move |s| {
                let mut ids = Vec::new();
                let (file, held) = match &bulk {
                    Some((sha, held)) => (Some(sha.as_str()), i64::from(*held)),
                    None => (None, 0),
                };
                for (hop, m) in &copies {
                    let header = encode_header(&m.header, m.kind, m.data.as_ref());
                    exec(
                        &s.0,
                        "INSERT INTO outbox (id, hop, created, expiry, kind, content_type, header, content,
                                             bulk, held)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (id, hop) DO NOTHING",
                        params![
                            m.header.id.as_str(),
                            hop.as_str(),
                            now.as_millis(),
                            m.header.expiry().map(Timestamp::as_millis),
                            m.kind.as_str(),
                            m.content_type,
                            header,
                            &m.content[..],
                            file,
                            held
                        ],
                    )?;
                    exec(
                        &s.0,
                        "INSERT INTO received (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
                        params![m.header.id.as_str(), now.as_millis()],
                    )?;
                    if !ids.contains(&m.header.id) {
                        ids.push(m.header.id.clone());
                    }
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
            .write(move |s| {
                let n = exec(
                    &s.0,
                    "DELETE FROM outbox WHERE expiry IS NOT NULL AND expiry <= ?1",
                    params![now.as_millis()],
                )?;
                let horizon =
                    now.as_millis() - i64::try_from(remember.as_millis()).unwrap_or(i64::MAX);
                exec(&s.0, "DELETE FROM received WHERE at < ?1", params![horizon])?;
                Ok(n as u64)
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
        let limits = Limits::default();
        self.db
            .write(move |s| {
                let before = now.as_millis() - i64::try_from(again.as_millis()).unwrap_or(i64::MAX);
                let rows: Vec<(String, String, Vec<u8>, Vec<u8>)> = {
                    let mut st = s.0.prepare_cached(
                        "SELECT id, content_type, header, content FROM outbox
                         WHERE hop = ?1 AND (offered IS NULL OR offered < ?2)
                           AND (expiry IS NULL OR expiry > ?4) AND held = 0
                         ORDER BY created LIMIT ?3",
                    )?;
                    st.query_map(
                        params![hop.as_str(), before, limit as i64, now.as_millis()],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )?
                    .collect::<Result<_, _>>()?
                };
                let mut out = Vec::new();
                for (id, content_type, header, content) in rows {
                    let Ok((header, kind, data)) = decode_header_part(&header, &limits) else {
                        continue;
                    };
                    exec(
                        &s.0,
                        "UPDATE outbox SET offered = ?3 WHERE id = ?1 AND hop = ?2",
                        params![id, hop.as_str(), now.as_millis()],
                    )?;
                    out.push(RawMessage {
                        header,
                        kind,
                        data,
                        content_type: content_type.into(),
                        content: Bytes::from(content),
                    });
                }
                Ok(out)
            })
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
            .write(move |s| {
                let mut delivered = Vec::new();
                for id in &ids {
                    let header: Option<Vec<u8>> =
                        s.0.prepare_cached("SELECT header FROM outbox WHERE id = ?1 AND hop = ?2")?
                            .query_row(params![id.as_str(), hop.as_str()], |r| r.get(0))
                            .optional()?;
                    let Some(header) = header else { continue };
                    if decode_header_part(&header, &limits)
                        .is_ok_and(|(h, _, _)| h.destinations().contains(&hop))
                    {
                        delivered.push((id.clone(), hop.clone()));
                    }
                    exec(
                        &s.0,
                        "DELETE FROM outbox WHERE id = ?1 AND hop = ?2",
                        params![id.as_str(), hop.as_str()],
                    )?;
                }
                Ok(delivered)
            })
            .await
    }

    /// Records that the action `id` (addressed to this tier) is about to
    /// be applied, unless it was before: then says how far it got.
    /// Applying only after this commits is what makes an action applied at
    /// most once, whatever instant the process dies at.
    pub async fn claim(&self, id: MessageId, now: Timestamp) -> Result<Claim, DbError> {
        self.db
            .write(move |s| {
                let state: Option<String> =
                    s.0.query_row(
                        "SELECT state FROM received WHERE id = ?1",
                        params![id.as_str()],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok(match state.as_deref() {
                    None => {
                        exec(
                            &s.0,
                            "INSERT INTO received (id, at, state) VALUES (?1, ?2, 'applying')",
                            params![id.as_str(), now.as_millis()],
                        )?;
                        Claim::New
                    }
                    Some("applying") => Claim::Interrupted,
                    Some(_) => Claim::Done,
                })
            })
            .await
    }

    /// Remembers that a message with this ID was received and dealt with
    /// (an action claimed is then done).
    pub async fn mark_seen(&self, id: MessageId, now: Timestamp) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                exec(
                    &s.0,
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
        self.db
            .write(move |s| {
                let n = exec(
                    &s.0,
                    "UPDATE outbox SET held = 0 WHERE bulk = ?1 AND held = 1",
                    params![bulk],
                )?;
                Ok(n as u64)
            })
            .await
    }

    /// The file `bulk` cannot be had: its copies are dropped. Returns the
    /// number dropped.
    pub async fn drop_bulk(&self, bulk: String) -> Result<u64, DbError> {
        self.db
            .write(move |s| {
                let n = exec(&s.0, "DELETE FROM outbox WHERE bulk = ?1", params![bulk])?;
                Ok(n as u64)
            })
            .await
    }

    /// Copies of offers of the file `bulk` not yet acknowledged (while any
    /// remain, the file must stay).
    pub async fn bulk_pending(&self, bulk: String) -> Result<u64, DbError> {
        self.db
            .read(move |s| {
                let n: i64 = s.0.query_row(
                    "SELECT COUNT(*) FROM outbox WHERE bulk = ?1",
                    params![bulk],
                    |r| r.get(0),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    /// Messages waiting.
    pub async fn pending(&self) -> Result<u64, DbError> {
        self.db
            .read(|s| {
                let n: i64 =
                    s.0.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }
}
