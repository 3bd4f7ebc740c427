//! Bulk uploads as the store keeps them (bulk.rs serves them): grants,
//! their states, and the announcement stored when a file arrives whole.

use rs_protocol::codec::RawMessage;
use rs_protocol::model::*;
use rs_protocol::{MessageId, Timestamp};
use rs_store::db::DbError;
use rs_store::params;

/// A stored upload, as the store returns it.
#[derive(Debug, Clone)]
pub struct UploadRow {
    pub digest: String,
    pub request: String,
    pub component: String,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub class: String,
    pub subclass: String,
    pub granted: i64,
    pub expires: i64,
    /// `open`, `complete`, `failed` or `expired`.
    pub state: String,
    pub received: u64,
    pub done_at: Option<i64>,
    pub reason: Option<String>,
}

const UPLOAD_COLUMNS: &str = "digest, request, component, name, size, sha256, class, subclass,
     granted, expires, state, done_at, reason";

fn upload_row(r: &rs_store::sql::Row<'_>) -> Result<UploadRow, DbError> {
    Ok(UploadRow {
        digest: r.get(0)?,
        request: r.get(1)?,
        component: r.get(2)?,
        name: r.get(3)?,
        size: u64::try_from(r.get::<i64>(4)?).unwrap_or(0),
        sha256: r.get(5)?,
        class: r.get(6)?,
        subclass: r.get(7)?,
        granted: r.get(8)?,
        expires: r.get(9)?,
        state: r.get(10)?,
        received: 0,
        done_at: r.get(11)?,
        reason: r.get(12)?,
    })
}

impl super::Store {
    pub async fn upload_by_digest(
        &self,
        digest: String,
    ) -> Result<Option<UploadRow>, rs_store::db::DbError> {
        self.db
            .read(move |s| {
                s.row(
                    &format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE digest = ?1"),
                    params![digest],
                    upload_row,
                )
            })
            .await
    }

    /// Uploads, newest first (`request` selects one), of the customers
    /// listed (`None`: of every customer).
    pub async fn uploads(
        &self,
        request: Option<String>,
        component: Option<String>,
        customers: Option<Vec<String>>,
        limit: usize,
    ) -> Result<Vec<UploadRow>, rs_store::db::DbError> {
        // The customers, one placeholder each from ?4 (all: no condition;
        // none: no rows).
        self.db
            .read(move |s| {
                let only = match &customers {
                    None => String::new(),
                    Some(v) if v.is_empty() => " AND 1 = 0".into(),
                    Some(v) => format!(
                        " AND customer IN ({})",
                        (0..v.len())
                            .map(|i| format!("?{}", i + 4))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let limit = limit as i64;
                let mut args: Vec<&dyn rs_store::sql::ToParam> = vec![&request, &component, &limit];
                for c in customers.iter().flatten() {
                    args.push(c);
                }
                s.rows(
                    &format!(
                        "SELECT {UPLOAD_COLUMNS} FROM uploads
                         WHERE (CAST(?1 AS TEXT) IS NULL OR request = ?1)
                           AND (CAST(?2 AS TEXT) IS NULL OR component = ?2){only}
                         ORDER BY granted DESC LIMIT ?3"
                    ),
                    &args,
                    upload_row,
                )
            })
            .await
    }

    /// The upload failed verification: its URL is spent.
    pub async fn fail_upload(
        &self,
        digest: String,
        why: String,
        now: Timestamp,
    ) -> Result<(), rs_store::db::DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "UPDATE uploads SET state = 'failed', reason = ?2, done_at = ?3
                     WHERE digest = ?1 AND state = 'open'",
                    params![digest, why, now.as_millis()],
                )?;
                Ok(())
            })
            .await
    }

    /// Grants that expired unused become `expired`; returns their digests
    /// (their partial files can go).
    pub async fn expire_uploads(
        &self,
        now: Timestamp,
    ) -> Result<Vec<String>, rs_store::db::DbError> {
        self.db
            .write(move |s| {
                let gone: Vec<String> = s.rows(
                    "UPDATE uploads SET state = 'expired', done_at = ?1
                     WHERE state = 'open' AND expires <= ?1 RETURNING digest",
                    params![now.as_millis()],
                    |r| r.get(0),
                )?;
                Ok(gone)
            })
            .await
    }

    /// The file arrived whole and verified: the upload is complete, and
    /// its announcement (the request again, now with the URL to fetch the
    /// file) is stored with its peripheral tasks, in one transaction.
    pub async fn complete_upload(
        &self,
        digest: String,
        now: Timestamp,
    ) -> Result<(), rs_store::db::DbError> {
        use rs_store::db::DbError;
        self.db
            .write(move |s| {
                let n = s.exec(
                    "UPDATE uploads SET state = 'complete', done_at = ?2
                     WHERE digest = ?1 AND state = 'open'",
                    params![digest, now.as_millis()],
                )?;
                if n == 0 {
                    return Ok(());
                }
                let request: String = s.one(
                    "SELECT request FROM uploads WHERE digest = ?1",
                    params![digest],
                    |r| r.get(0),
                )?;
                let stored: Option<(Vec<u8>, String, Vec<u8>)> = s.row(
                    "SELECT header, content_type, content FROM messages WHERE id = ?1",
                    params![request],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                let Some((header, content_type, content)) = stored else {
                    return Err(DbError::Sql(format!("the request {request} is not stored")));
                };
                let limits = rs_protocol::codec::Limits::default();
                let (header, kind, data) = rs_protocol::codec::decode_header_part(&header, &limits)
                    .map_err(|e| DbError::Sql(format!("request {request}: {e}")))?;
                let raw = RawMessage {
                    header,
                    kind,
                    data,
                    content_type: content_type.into(),
                    content: bytes::Bytes::from(content),
                };
                let full = raw
                    .decode(&limits)
                    .map_err(|e| DbError::Sql(format!("request {request}: {e}")))?;
                let Content::BulkRequest(mut b) = full.content else {
                    return Err(DbError::Sql(format!("{request} is not a bulk request")));
                };
                b.url = Some(format!("/rs/v1/control/uploads/{request}/file"));
                let mut header = full.header;
                header.id = MessageId::generate();
                header.created = now;
                let announcement = Message {
                    header,
                    content: Content::BulkRequest(b),
                };
                let inc = crate::store::Incoming::new(announcement.to_raw());
                crate::store::ingest_in(s, std::slice::from_ref(&inc), now)?;
                Ok(())
            })
            .await
    }
}
