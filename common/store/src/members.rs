//! The members of a farm (MLMs sharing one queue, or application servers
//! sharing one store): each records a beat every few seconds with its
//! load, and every member reads the others' from the same table, to show
//! the farm and to divide the farm's throttle rates among those alive.
//! The operations run inside the transactions of the store that holds the
//! table (the MLM's [`crate::outbox::Outbox`], the server's store).

use crate::db::DbError;
use crate::params;
use crate::sql::Conn;
use rs_protocol::time::Timestamp;

/// The table, as each store's migration creates it.
pub const TABLE: &str = "CREATE TABLE members (
    name      TEXT   PRIMARY KEY,
    started   BIGINT NOT NULL,
    seen      BIGINT NOT NULL,
    in_hand   BIGINT NOT NULL,
    envelopes BIGINT NOT NULL,
    forwarded BIGINT NOT NULL
)";

/// A member of a farm, as its last beat recorded it ([`beat`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Unique in the farm (by default the host's name and the port).
    pub name: String,
    pub started: Timestamp,
    /// Its last beat.
    pub seen: Timestamp,
    /// Envelopes it was handling then.
    pub in_hand: u64,
    /// Envelopes received since it started.
    pub envelopes: u64,
    /// Messages it forwarded upstream (an MLM), or stored (a server),
    /// since it started.
    pub forwarded: u64,
}

/// How often a member records its beat.
pub const BEAT: std::time::Duration = std::time::Duration::from_secs(2);
/// A member silent for this long is shown failed (and no longer shares
/// the farm's rates).
pub const LATE: std::time::Duration = std::time::Duration::from_secs(6);
/// A member silent for this long is forgotten.
pub const FORGET: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether `m`'s last beat is less than [`LATE`] before `now`.
pub fn alive(m: &Member, now: Timestamp) -> bool {
    m.seen >= before(now, LATE)
}

/// The instant `d` before `now`.
pub fn before(now: Timestamp, d: std::time::Duration) -> Timestamp {
    Timestamp::from_millis(now.as_millis() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(now)
}

/// A member's name when its configuration gives none: the host's name
/// and the port it listens on.
pub fn default_name(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{port}")
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Records `m`'s beat: that it is alive now, and its load.
pub fn beat(c: &mut Conn, m: &Member) -> Result<(), DbError> {
    c.exec(
        "INSERT INTO members (name, started, seen, in_hand, envelopes, forwarded)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (name) DO UPDATE SET started = ?2, seen = ?3, in_hand = ?4,
             envelopes = ?5, forwarded = ?6",
        params![
            m.name,
            m.started.as_millis(),
            m.seen.as_millis(),
            count(m.in_hand),
            count(m.envelopes),
            count(m.forwarded)
        ],
    )?;
    Ok(())
}

/// The members by name, as their last beats recorded them; members silent
/// since before `forget` are forgotten.
pub fn list(c: &mut Conn, forget: Timestamp) -> Result<Vec<Member>, DbError> {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or(Timestamp::from_millis(0).expect("0"));
    c.exec(
        "DELETE FROM members WHERE seen < ?1",
        params![forget.as_millis()],
    )?;
    c.rows(
        "SELECT name, started, seen, in_hand, envelopes, forwarded FROM members ORDER BY name",
        params![],
        |r| {
            Ok(Member {
                name: r.get(0)?,
                started: ts(r.get(1)?),
                seen: ts(r.get(2)?),
                in_hand: n(r.get(3)?),
                envelopes: n(r.get(4)?),
                forwarded: n(r.get(5)?),
            })
        },
    )
}
