//! API tokens and the web portal's sessions, as the store keeps them
//! (security.rs decides what they grant). Neither secret is stored: a
//! token and a session cookie are kept as their SHA-256.

use rs_store::db::DbError;
use rs_store::params;
use rs_store::sql::Conn;

/// An API token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub name: String,
    /// `*`, or customer IDs separated by commas (as an admin
    /// certificate's O field).
    pub customers: String,
    pub created: i64,
    pub created_by: String,
    pub expires: i64,
    pub revoked: Option<i64>,
}

/// A portal session that is still good: its admin and grants (a token's
/// as the token has them now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub admin: String,
    pub customers: String,
    /// The token it was opened with (`None`: a client certificate, or a
    /// plain loopback listener).
    pub token: Option<String>,
    pub csrf: String,
    pub expires: i64,
}

/// A session to open.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub hash: String,
    pub admin: String,
    pub customers: String,
    pub token: Option<String>,
    pub csrf: String,
    pub created: i64,
    pub expires: i64,
}

fn token_row(r: &rs_store::sql::Row<'_>) -> Result<TokenRow, DbError> {
    Ok(TokenRow {
        name: r.get(0)?,
        customers: r.get(1)?,
        created: r.get(2)?,
        created_by: r.get(3)?,
        expires: r.get(4)?,
        revoked: r.get(5)?,
    })
}

/// Ended sessions go at once; tokens revoked or expired stay listed for
/// the retention window (`horizon`), as the audit lines that name them.
pub(crate) fn purge(s: &mut Conn, now: i64, horizon: i64) -> Result<(), DbError> {
    s.exec(
        "DELETE FROM portal_sessions WHERE expires < ?1",
        params![now],
    )?;
    s.exec(
        "DELETE FROM admin_tokens WHERE expires < ?1 OR revoked < ?1",
        params![horizon],
    )?;
    Ok(())
}

impl super::Store {
    /// Records a new token; `false` if one of that name exists (revoked
    /// or not: a name is never reused while it is listed).
    pub async fn add_token(&self, t: TokenRow, hash: String) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                let n = s.exec(
                    "INSERT INTO admin_tokens (name, hash, customers, created, created_by, expires)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
                    params![
                        t.name,
                        hash,
                        t.customers,
                        t.created,
                        t.created_by,
                        t.expires
                    ],
                )?;
                Ok(n == 1)
            })
            .await
    }

    /// The token with this hash, if it is neither revoked nor expired.
    pub async fn token_by_hash(&self, hash: String, now: i64) -> Result<Option<TokenRow>, DbError> {
        self.db
            .read(move |s| {
                s.row(
                    "SELECT name, customers, created, created_by, expires, revoked
                     FROM admin_tokens WHERE hash = ?1 AND revoked IS NULL AND expires > ?2",
                    params![hash, now],
                    token_row,
                )
            })
            .await
    }

    /// The name of the token with this hash, whatever its state (the
    /// audit log names who tried).
    pub async fn token_name(&self, hash: String) -> Result<Option<String>, DbError> {
        self.db
            .read(move |s| {
                s.row(
                    "SELECT name FROM admin_tokens WHERE hash = ?1",
                    params![hash],
                    |r| r.get(0),
                )
            })
            .await
    }

    /// Every token, by name.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>, DbError> {
        self.db
            .read(move |s| {
                s.rows(
                    "SELECT name, customers, created, created_by, expires, revoked
                     FROM admin_tokens ORDER BY name",
                    params![],
                    token_row,
                )
            })
            .await
    }

    /// Revokes a token and ends its sessions; `false` if there is no such
    /// token (or it was revoked already).
    pub async fn revoke_token(&self, name: String, now: i64) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                let n = s.exec(
                    "UPDATE admin_tokens SET revoked = ?2 WHERE name = ?1 AND revoked IS NULL",
                    params![name, now],
                )?;
                s.exec(
                    "DELETE FROM portal_sessions WHERE token = ?1",
                    params![name],
                )?;
                Ok(n == 1)
            })
            .await
    }

    pub async fn open_session(&self, n: NewSession) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "INSERT INTO portal_sessions (hash, admin, customers, token, csrf, created, expires)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![n.hash, n.admin, n.customers, n.token, n.csrf, n.created, n.expires],
                )?;
                Ok(())
            })
            .await
    }

    /// The session with this cookie hash, if it has not expired and the
    /// token it was opened with (if any) is still good; a token's grants
    /// are read from the token, so narrowing it narrows its sessions.
    pub async fn session(&self, hash: String, now: i64) -> Result<Option<SessionRow>, DbError> {
        self.db
            .read(move |s| {
                s.row(
                    "SELECT s.admin, COALESCE(t.customers, s.customers), s.token, s.csrf, s.expires
                     FROM portal_sessions s LEFT JOIN admin_tokens t ON t.name = s.token
                     WHERE s.hash = ?1 AND s.expires > ?2
                       AND (s.token IS NULL
                            OR (t.name IS NOT NULL AND t.revoked IS NULL AND t.expires > ?2))",
                    params![hash, now],
                    |r| {
                        Ok(SessionRow {
                            admin: r.get(0)?,
                            customers: r.get(1)?,
                            token: r.get(2)?,
                            csrf: r.get(3)?,
                            expires: r.get(4)?,
                        })
                    },
                )
            })
            .await
    }

    pub async fn end_session(&self, hash: String) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec("DELETE FROM portal_sessions WHERE hash = ?1", params![hash])?;
                Ok(())
            })
            .await
    }
}

impl super::Store {
    /// Messages stored in `[from, to)` by customer (the portal's rate
    /// chart; the `received` index serves it).
    pub async fn stored_by_customer(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64)>, DbError> {
        self.db
            .read(move |s| {
                s.rows(
                    "SELECT customer, COUNT(*) FROM messages
                     WHERE received >= ?1 AND received < ?2 GROUP BY customer",
                    params![from, to],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await
    }

    /// Alarms stored since `since` by customer and severity (its rank:
    /// 0 critical … 4 info).
    pub async fn alarms_by_severity(&self, since: i64) -> Result<Vec<(String, i64, i64)>, DbError> {
        self.db
            .read(move |s| {
                s.rows(
                    "SELECT customer, severity, COUNT(*) FROM messages
                     WHERE received >= ?1 AND kind = 'alarm' AND severity IS NOT NULL
                     GROUP BY customer, severity",
                    params![since],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
            })
            .await
    }
}
