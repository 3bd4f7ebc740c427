//! The back-channel queue's operations (seed 004, Fig. 18): copies of
//! messages waiting for a next hop, handed out on the replies to that
//! hop's POSTs, kept until the hop acknowledges them and offered again if
//! it does not. Written once and run inside the transactions of the two
//! stores that hold such a queue: the MLM's [`crate::outbox::Outbox`], and
//! the application server's store, which queues a job's copies in the
//! transaction that records the job and marks its targets delivered in
//! the one that takes the acknowledgement.
//!
//! Both keep the table `outbox (id, hop, created, expiry, offered, kind,
//! content_type, header, content, bulk, held)`, primary key `(id, hop)`,
//! indexed by `(hop, created)`.

use std::time::Duration;

use bytes::Bytes;

use crate::db::DbError;
use crate::params;
use crate::sql::{Conn, Engine};
use rs_protocol::codec::{Limits, RawMessage, decode_header_part, encode_header};
use rs_protocol::time::Timestamp;

/// Queues a copy of `m` for `hop`, unless one is queued already; returns
/// how many were queued (0 or 1). `expiry` (ms): it is dropped then;
/// `bulk`: the download offer it belongs to, and with `held` it is not
/// handed out until [`release`].
pub fn put(
    c: &mut Conn,
    hop: &str,
    m: &RawMessage,
    expiry: Option<i64>,
    bulk: Option<&str>,
    held: bool,
    now: Timestamp,
) -> Result<u64, DbError> {
    let header = encode_header(&m.header, m.kind, m.data.as_ref());
    c.exec(
        "INSERT INTO outbox (id, hop, created, expiry, kind, content_type, header, content,
                             bulk, held)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (id, hop) DO NOTHING",
        params![
            m.header.id.as_str(),
            hop,
            now.as_millis(),
            expiry,
            m.kind.as_str(),
            m.content_type,
            header,
            &m.content[..],
            bulk,
            held
        ],
    )
}

const OFFER: &str = "SELECT id, content_type, header, content FROM outbox
     WHERE hop = ?1 AND (offered IS NULL OR offered < ?2)
       AND (expiry IS NULL OR expiry > ?4) AND held = 0
     ORDER BY created LIMIT ?3";

/// On PostgreSQL: rows another member of a farm is offering right now
/// are left to it, so two members polled at once by one hop do not both
/// hand out a message.
const OFFER_LOCKED: &str = "SELECT id, content_type, header, content FROM outbox
     WHERE hop = ?1 AND (offered IS NULL OR offered < ?2)
       AND (expiry IS NULL OR expiry > ?4) AND held = 0
     ORDER BY created LIMIT ?3 FOR UPDATE SKIP LOCKED";

/// Up to `limit` copies for `hop` not offered within `again` (or never),
/// not expired and not held, oldest first; marks them offered now.
pub fn offer(
    c: &mut Conn,
    hop: &str,
    now: Timestamp,
    again: Duration,
    limit: usize,
) -> Result<Vec<RawMessage>, DbError> {
    let sql = match c.engine() {
        Engine::Sqlite => OFFER,
        Engine::Postgres => OFFER_LOCKED,
    };
    let before = now.as_millis() - i64::try_from(again.as_millis()).unwrap_or(i64::MAX);
    let rows: Vec<(String, String, Vec<u8>, Vec<u8>)> =
        c.rows(sql, params![hop, before, limit, now.as_millis()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    let limits = Limits::default();
    let mut out = Vec::with_capacity(rows.len());
    for (id, content_type, header, content) in rows {
        // Cannot happen for what put() wrote; such a row is left alone.
        let Ok((header, kind, data)) = decode_header_part(&header, &limits) else {
            continue;
        };
        c.exec(
            "UPDATE outbox SET offered = ?3 WHERE id = ?1 AND hop = ?2",
            params![id, hop, now.as_millis()],
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
}

/// `hop` acknowledged the message `id`: forgets its copy. Returns the
/// copy's header part (for the caller to see whom it was for), or `None`
/// if none was queued.
pub fn acknowledged(c: &mut Conn, hop: &str, id: &str) -> Result<Option<Vec<u8>>, DbError> {
    c.row(
        "DELETE FROM outbox WHERE id = ?1 AND hop = ?2 RETURNING header",
        params![id, hop],
        |r| r.get(0),
    )
}

/// Drops the copies whose expiry passed; returns how many.
pub fn drop_expired(c: &mut Conn, now: Timestamp) -> Result<u64, DbError> {
    c.exec(
        "DELETE FROM outbox WHERE expiry IS NOT NULL AND expiry <= ?1",
        params![now.as_millis()],
    )
}

/// Lets the held copies of the download offer `bulk` be handed out;
/// returns how many.
pub fn release(c: &mut Conn, bulk: &str) -> Result<u64, DbError> {
    c.exec(
        "UPDATE outbox SET held = 0 WHERE bulk = ?1 AND held <> 0",
        params![bulk],
    )
}
