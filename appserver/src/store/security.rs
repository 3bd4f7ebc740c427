//! Enrollments and the audit log, as the store keeps them (security.rs
//! decides who may do what and signs certificates).

use rs_protocol::ComponentKind;
use rs_store::db::DbError;
use rs_store::params;
use rs_store::sql::Conn;

/// One line of the audit log.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub seq: i64,
    pub at: i64,
    pub admin: String,
    pub peer: String,
    pub method: String,
    pub path: String,
    pub status: i64,
    pub millis: i64,
}

/// An enrollment token being redeemed: what it was made for, and the ID
/// the certificate is issued to (the one it names, or the next free one
/// of its customer and kind).
#[derive(Debug, Clone)]
pub struct Redeeming {
    pub id: String,
    /// Comma-separated DNS names and IP addresses for the certificate.
    pub dns: String,
    pub ips: String,
}

/// An enrollment token to record (its hash; the token itself is never
/// stored).
#[derive(Debug, Clone)]
pub struct NewEnrollment {
    pub token_hash: String,
    pub customer: String,
    pub kind: String,
    pub component: Option<String>,
    pub dns: String,
    pub ips: String,
    pub created: i64,
    pub created_by: String,
    pub expires: i64,
}

impl super::Store {
    /// Appends a line to the audit log.
    #[allow(clippy::too_many_arguments)]
    pub async fn audit_record(
        &self,
        at: i64,
        admin: String,
        peer: String,
        method: String,
        path: String,
        status: i64,
        millis: i64,
    ) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "INSERT INTO audit (at, admin, peer, method, path, status, millis)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![at, admin, peer, method, path, status, millis],
                )?;
                Ok(())
            })
            .await
    }

    /// The audit log, newest first (of one admin; before a line).
    pub async fn audit_log(
        &self,
        admin: Option<String>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, DbError> {
        self.db
            .read(move |s| {
                s.rows(
                    "SELECT seq, at, admin, peer, method, path, status, millis FROM audit
                     WHERE (CAST(?1 AS TEXT) IS NULL OR admin = ?1)
                       AND (CAST(?2 AS BIGINT) IS NULL OR seq < ?2)
                     ORDER BY seq DESC LIMIT ?3",
                    params![admin, before, limit],
                    |r| {
                        Ok(AuditRow {
                            seq: r.get(0)?,
                            at: r.get(1)?,
                            admin: r.get(2)?,
                            peer: r.get(3)?,
                            method: r.get(4)?,
                            path: r.get(5)?,
                            status: r.get(6)?,
                            millis: r.get(7)?,
                        })
                    },
                )
            })
            .await
    }

    /// Records a new enrollment token.
    pub async fn add_enrollment(&self, e: NewEnrollment) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "INSERT INTO enrollments (token_hash, customer, kind, component, dns, ips, created, created_by, expires)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        e.token_hash,
                        e.customer,
                        e.kind,
                        e.component,
                        e.dns,
                        e.ips,
                        e.created,
                        e.created_by,
                        e.expires
                    ],
                )?;
                Ok(())
            })
            .await
    }

    /// Whether a token (by hash) is unspent and unexpired at `now` (a read:
    /// a flood of guesses does not queue behind the writes).
    pub async fn enrollment_live(&self, token_hash: String, now: i64) -> Result<bool, DbError> {
        self.db
            .read(move |s| {
                s.exists(
                    "SELECT 1 FROM enrollments
                     WHERE token_hash = ?1 AND used_at IS NULL AND expires > ?2",
                    params![token_hash, now],
                )
            })
            .await
    }

    /// Spends a token, in one transaction with `issue` (which signs the
    /// certificate and returns it with its serial): the token is spent only
    /// with a certificate issued for it. `None`: no live token; `Some(Err)`:
    /// `issue` refused, and the token stays unspent.
    pub async fn redeem_enrollment<T: Send + 'static, E: Send + 'static>(
        &self,
        token_hash: String,
        now: i64,
        issue: impl FnOnce(&Redeeming) -> Result<(T, String), E> + Send + 'static,
    ) -> Result<Option<Result<T, E>>, DbError> {
        self.db
            .write(move |s| {
                let row: Option<(String, String, Option<String>, String, String)> = s.row(
                    "SELECT customer, kind, component, dns, ips FROM enrollments
                     WHERE token_hash = ?1 AND used_at IS NULL AND expires > ?2",
                    params![token_hash, now],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )?;
                let Some((customer, kind, component, dns, ips)) = row else {
                    return Ok(None);
                };
                let id = match component {
                    Some(c) => c,
                    None => next_id(s, &customer, &kind)?,
                };
                let (out, serial) = match issue(&Redeeming { id: id.clone(), dns, ips }) {
                    Ok(v) => v,
                    Err(e) => return Ok(Some(Err(e))),
                };
                s.exec(
                    "UPDATE enrollments SET used_at = ?2, issued = ?3, serial = ?4 WHERE token_hash = ?1",
                    params![token_hash, now, id, serial],
                )?;
                Ok(Some(Ok(out)))
            })
            .await
    }
}

/// The next free `customer.<letter>N`: above every ID issued or seen.
/// Two farm members choosing one at once: the second's commit fails on
/// the unique allocated ID (schema version 2), and its caller tries again.
fn next_id(conn: &mut Conn, customer: &str, kind: &str) -> Result<String, DbError> {
    let letter = ComponentKind::parse(kind)
        .and_then(ComponentKind::letter)
        .unwrap_or('p');
    let prefix = format!("{customer}.{letter}");
    let mut max = 0u32;
    let ids = conn.rows(
        "SELECT issued FROM enrollments WHERE customer = ?1 AND issued IS NOT NULL
         UNION ALL SELECT component FROM enrollments WHERE customer = ?1 AND component IS NOT NULL
         UNION ALL SELECT id FROM components WHERE customer = ?1",
        params![customer],
        |r| r.get::<String>(0),
    )?;
    for id in ids {
        if let Some(n) = id.strip_prefix(&prefix).and_then(|n| n.parse::<u32>().ok()) {
            max = max.max(n);
        }
    }
    Ok(format!("{prefix}{}", max + 1))
}
