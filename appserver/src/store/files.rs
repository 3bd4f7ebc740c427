//! Published files and their download offers, as the store keeps them
//! (publish.rs serves them; the files themselves are in the bulk
//! directory, by SHA-256).

use rs_protocol::Timestamp;
use rs_store::db::DbError;
use rs_store::params;

impl super::Store {
    /// Records a published file (a file published again under another
    /// name keeps the new name).
    pub async fn publish_file(
        &self,
        sha256: String,
        name: String,
        size: u64,
        now: Timestamp,
    ) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "INSERT INTO files (sha256, name, size, created) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (sha256) DO UPDATE SET name = ?2",
                    params![
                        sha256,
                        name,
                        i64::try_from(size).unwrap_or(i64::MAX),
                        now.as_millis()
                    ],
                )?;
                Ok(())
            })
            .await
    }

    /// The published files, newest first: SHA-256 (hex), name, size,
    /// when published.
    pub async fn published_files(
        &self,
        limit: u32,
    ) -> Result<Vec<(String, String, i64, i64)>, DbError> {
        self.db
            .read(move |s| {
                s.rows(
                    "SELECT sha256, name, size, created FROM files ORDER BY created DESC LIMIT ?1",
                    params![i64::from(limit)],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
            })
            .await
    }

    /// A published file's name and size, by SHA-256 (hex).
    pub async fn published_file(&self, sha256: String) -> Result<Option<(String, i64)>, DbError> {
        self.db
            .read(move |s| {
                s.row(
                    "SELECT name, size FROM files WHERE sha256 = ?1",
                    params![sha256],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await
    }

    /// The offer behind a download URL (its token's digest): the file's
    /// SHA-256, the offer's state and expiry, the file's size.
    pub async fn offer_by_digest(
        &self,
        digest: String,
    ) -> Result<Option<(String, String, i64, i64)>, DbError> {
        self.db
            .read(move |s| {
                s.row(
                    "SELECT o.sha256, o.state, o.expires, f.size FROM offers o
                     JOIN files f ON f.sha256 = o.sha256 WHERE o.digest = ?1",
                    params![digest],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
            })
            .await
    }

    /// Closes the URLs of offers whose jobs are done (every destination
    /// answered or expired) or that expired; how many.
    pub async fn unpublish(&self, now: Timestamp) -> Result<u64, DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "UPDATE offers SET state = 'unpublished', unpublished_at = ?1
                     WHERE state = 'open' AND (expires <= ?1 OR NOT EXISTS (
                         SELECT 1 FROM job_targets t WHERE t.job = offers.job
                           AND t.state IN ('pending', 'delivered')))",
                    params![now.as_millis()],
                )
            })
            .await
    }
}
