//! The certificate authority's records: every certificate it issued (to
//! whom, until when, whether and why revoked) and the number of its last
//! revocation list. On SQLite they are `ca.db` in the CA's directory (the
//! file earlier releases wrote, adopted as it is); the servers of a farm
//! keep them in their PostgreSQL database (schema `appserver_ca`), so a
//! certificate any member issued can be revoked through any other, and
//! every member's revocation list says the same.
//!
//! The CA signs with its key (rs-net's `pki`); only what it records is
//! here. Its callers are synchronous (rsctl, the server at start and
//! inside `spawn_blocking`). Each operation opens its connection and
//! closes it; on PostgreSQL it does so on a thread of its own, so the
//! blocking client never runs on (or is dropped from) a thread that
//! drives async tasks, whoever calls.

use crate::db::DbError;
use crate::params;
use crate::sql::{Conn, Engine, Location, Migration};

/// The records' schema changes, in order (append only). Version 1 adopts
/// a `ca.db` of earlier releases as it is.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "baseline",
    apply: |c| {
        let ddl = "CREATE TABLE IF NOT EXISTS certs (
                 serial     TEXT PRIMARY KEY,
                 name       TEXT NOT NULL,
                 customer   TEXT NOT NULL,
                 role       TEXT NOT NULL,
                 issued_at  BIGINT NOT NULL,
                 not_after  BIGINT NOT NULL,
                 revoked_at BIGINT,
                 reason     TEXT
             );
             CREATE INDEX IF NOT EXISTS certs_name ON certs (name);
             CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BIGINT NOT NULL);";
        match c.engine() {
            // Earlier files made these with INTEGER columns: the same
            // thing to SQLite.
            Engine::Sqlite => c.batch(&ddl.replace("BIGINT", "INTEGER")),
            Engine::Postgres => c.batch(ddl),
        }
    },
}];

/// A certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cert {
    /// Upper-case hex.
    pub serial: String,
    pub name: String,
    pub customer: String,
    /// `component` or `admin`.
    pub role: String,
    /// Unix seconds.
    pub not_after: i64,
    pub issued_at: i64,
    pub revoked_at: Option<i64>,
    pub reason: Option<String>,
}

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The CA issued no certificate with that serial.
    Unknown,
    /// It was revoked before.
    Already,
    /// Revoked now.
    Now,
}

/// Where a CA's records are.
#[derive(Debug, Clone)]
pub struct CertRecords {
    at: Location,
}

impl CertRecords {
    /// The records at `at`. Nothing is opened yet: each operation opens
    /// them (creating them or bringing their schema up to date), and
    /// [`CertRecords::check_writable`] says at once whether that works.
    pub fn open(at: Location) -> CertRecords {
        CertRecords { at }
    }

    /// Where they are, for messages.
    pub fn describe(&self) -> String {
        self.at.describe()
    }

    /// Runs `f` on a connection to the records (see the module's
    /// documentation for the thread).
    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, DbError> + Send,
    ) -> Result<T, DbError> {
        // Errors name where the records are (a read-only `ca.db`, a
        // database that refuses).
        let run = || {
            Conn::open(&self.at, MIGRATIONS)
                .and_then(|mut c| f(&mut c))
                .map_err(|e| match e {
                    DbError::Sql(s) => DbError::Sql(format!("{}: {s}", self.at.describe())),
                    other => other,
                })
        };
        match self.at {
            Location::Sqlite(_) => run(),
            Location::Postgres { .. } => std::thread::scope(|s| {
                s.spawn(run).join().unwrap_or_else(|_| {
                    Err(DbError::Sql(
                        "the CA's records: the operation panicked".into(),
                    ))
                })
            }),
        }
    }

    /// Checks that the records can be written (a read-only directory, a
    /// database user without rights), so a server says so at start.
    pub fn check_writable(&self) -> Result<(), DbError> {
        self.with(|c| {
            c.begin()?;
            c.exec(
                "INSERT INTO meta (k, v) VALUES ('write_check', 0)
                 ON CONFLICT (k) DO UPDATE SET v = meta.v",
                params![],
            )?;
            c.commit()
        })
    }

    /// Records a certificate just issued.
    pub fn record(&self, cert: &Cert) -> Result<(), DbError> {
        self.with(|c| insert(c, cert, "")).map(|_| ())
    }

    /// Marks the certificate `serial` (upper-case hex) revoked at `at`
    /// (Unix seconds), unless it was already.
    pub fn revoke(&self, serial: &str, at: i64, reason: &str) -> Result<Revoked, DbError> {
        self.with(|c| {
            if c.exec(
                "UPDATE certs SET revoked_at = ?2, reason = ?3
                 WHERE serial = ?1 AND revoked_at IS NULL",
                params![serial, at, reason],
            )? > 0
            {
                return Ok(Revoked::Now);
            }
            Ok(
                if c.exists("SELECT 1 FROM certs WHERE serial = ?1", params![serial])? {
                    Revoked::Already
                } else {
                    Revoked::Unknown
                },
            )
        })
    }

    /// Every certificate issued (newest first), or only `name`'s.
    pub fn list(&self, name: Option<&str>) -> Result<Vec<Cert>, DbError> {
        self.with(|c| {
            c.rows(
                "SELECT serial, name, customer, role, not_after, issued_at, revoked_at, reason
             FROM certs WHERE CAST(?1 AS TEXT) IS NULL OR name = ?1
             ORDER BY issued_at DESC, serial",
                params![name],
                |r| {
                    Ok(Cert {
                        serial: r.get(0)?,
                        name: r.get(1)?,
                        customer: r.get(2)?,
                        role: r.get(3)?,
                        not_after: r.get(4)?,
                        issued_at: r.get(5)?,
                        revoked_at: r.get(6)?,
                        reason: r.get(7)?,
                    })
                },
            )
        })
    }

    /// The revoked certificates (serial, when), and the next revocation
    /// list's number (each call takes one; numbers only grow).
    pub fn for_crl(&self) -> Result<(Vec<(String, i64)>, i64), DbError> {
        self.with(|c| {
            c.begin()?;
            let number: i64 = c.one(
                "INSERT INTO meta (k, v) VALUES ('crl_number', 1)
             ON CONFLICT (k) DO UPDATE SET v = meta.v + 1 RETURNING v",
                params![],
                |r| r.get(0),
            )?;
            let revoked = c.rows(
                "SELECT serial, revoked_at FROM certs WHERE revoked_at IS NOT NULL ORDER BY serial",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            c.commit()?;
            Ok((revoked, number))
        })
    }

    /// How many certificates are revoked, and the latest revocation: what
    /// a server compares to know whether another one (a farm's member, or
    /// rsctl) revoked something since its revocation list was written.
    pub fn revocations(&self) -> Result<(i64, i64), DbError> {
        self.with(|c| {
            c.one(
                "SELECT COUNT(*), COALESCE(MAX(revoked_at), 0) FROM certs
                 WHERE revoked_at IS NOT NULL",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
    }

    /// Takes in what `from` records and these do not: certificates not
    /// recorded here, and revocations of certificates recorded here
    /// unrevoked (a server's `ca.db` from before it joined a farm, or one
    /// written by `rsctl ca` on the CA's directory without `--database`):
    /// nothing a CA issued is forgotten, so every certificate can still be
    /// revoked. Returns how many records that added or revoked.
    pub fn take_in(&self, from: &CertRecords) -> Result<u64, DbError> {
        let certs = from.list(None)?;
        let number: Option<i64> = from.with(|c| {
            c.row(
                "SELECT v FROM meta WHERE k = 'crl_number'",
                params![],
                |r| r.get(0),
            )
        })?;
        self.with(|c| {
            c.begin()?;
            let mut changed = 0;
            for cert in &certs {
                changed += insert(
                    c,
                    cert,
                    "ON CONFLICT (serial) DO UPDATE SET revoked_at = EXCLUDED.revoked_at,
                         reason = EXCLUDED.reason
                     WHERE certs.revoked_at IS NULL AND EXCLUDED.revoked_at IS NOT NULL",
                )?;
            }
            if let Some(n) = number {
                c.exec(
                    "INSERT INTO meta (k, v) VALUES ('crl_number', ?1)
                     ON CONFLICT (k) DO UPDATE SET v = CASE WHEN meta.v > ?1 THEN meta.v ELSE ?1 END",
                    params![n],
                )?;
            }
            c.commit()?;
            Ok(changed)
        })
    }
}

/// Inserts one certificate's record (`then`: what to do with a serial
/// recorded already; nothing: refuse it); how many rows it changed.
fn insert(c: &mut Conn, cert: &Cert, then: &str) -> Result<u64, DbError> {
    c.exec(
        &format!(
            "INSERT INTO certs (serial, name, customer, role, issued_at, not_after, revoked_at, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) {then}"
        ),
        params![
            cert.serial,
            cert.name,
            cert.customer,
            cert.role,
            cert.issued_at,
            cert.not_after,
            cert.revoked_at,
            cert.reason
        ],
    )
}
