//! Rollouts as the store keeps them (rollouts.rs runs them): the request,
//! the state and the current wave, and each wave's destinations and job.

use rs_store::db::DbError;
use rs_store::params;

/// A rollout's row.
#[derive(Debug, Clone)]
pub struct RolloutRow {
    pub id: String,
    pub name: String,
    pub action: String,
    /// The `<rollout>` request it was made from.
    pub request: String,
    pub created_by: String,
    pub state: String,
    /// The current wave, from 0.
    pub wave: i64,
    pub reason: Option<String>,
    pub created: i64,
}

/// A wave's row.
#[derive(Debug, Clone)]
pub struct WaveRow {
    pub n: i64,
    /// Space-separated IDs.
    pub members: String,
    pub job: Option<String>,
    pub started: Option<i64>,
}

fn rollout_row(r: &rs_store::sql::Row<'_>) -> Result<RolloutRow, DbError> {
    Ok(RolloutRow {
        id: r.get(0)?,
        name: r.get(1)?,
        action: r.get(2)?,
        request: r.get(3)?,
        created_by: r.get(4)?,
        state: r.get(5)?,
        wave: r.get(6)?,
        reason: r.get(7)?,
        created: r.get(8)?,
    })
}

const COLUMNS: &str = "id, name, action, request, created_by, state, wave, reason, created";

impl super::Store {
    /// Records a new rollout (state `running`, at its first wave) with its
    /// waves' destinations.
    pub async fn create_rollout(&self, r: RolloutRow, waves: Vec<String>) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.exec(
                    "INSERT INTO rollouts (id, name, action, request, created_by, state, wave, reason, created, updated)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
                    params![r.id, r.name, r.action, r.request, r.created_by, r.state, r.wave, r.reason, r.created],
                )?;
                for (n, members) in waves.into_iter().enumerate() {
                    s.exec(
                        "INSERT INTO rollout_waves (rollout, n, members) VALUES (?1, ?2, ?3)",
                        params![r.id, n as i64, members],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// One rollout and its waves.
    pub async fn rollout(&self, id: String) -> Result<Option<(RolloutRow, Vec<WaveRow>)>, DbError> {
        self.db
            .read(move |s| {
                let Some(r) = s.row(
                    &format!("SELECT {COLUMNS} FROM rollouts WHERE id = ?1"),
                    params![id],
                    rollout_row,
                )?
                else {
                    return Ok(None);
                };
                let waves = s.rows(
                    "SELECT n, members, job, started FROM rollout_waves WHERE rollout = ?1 ORDER BY n",
                    params![id],
                    |w| {
                        Ok(WaveRow {
                            n: w.get(0)?,
                            members: w.get(1)?,
                            job: w.get(2)?,
                            started: w.get(3)?,
                        })
                    },
                )?;
                Ok(Some((r, waves)))
            })
            .await
    }

    /// Every rollout, newest first (`state`: only those in it).
    pub async fn rollouts(&self, state: Option<String>) -> Result<Vec<RolloutRow>, DbError> {
        self.db
            .read(move |s| {
                s.rows(
                    &format!(
                        "SELECT {COLUMNS} FROM rollouts
                         WHERE (CAST(?1 AS TEXT) IS NULL OR state = ?1)
                         ORDER BY created DESC, id DESC LIMIT 1000"
                    ),
                    params![state],
                    rollout_row,
                )
            })
            .await
    }

    /// Moves a rollout from `from` (its state and wave now) to `to`; false
    /// when it is no longer as `from` says (another change came first).
    pub async fn move_rollout(
        &self,
        id: String,
        from: (String, i64),
        to: (String, i64),
        reason: Option<String>,
        now: i64,
    ) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                let n = s.exec(
                    "UPDATE rollouts SET state = ?4, wave = ?5, reason = ?6, updated = ?7
                     WHERE id = ?1 AND state = ?2 AND wave = ?3",
                    params![id, from.0, from.1, to.0, to.1, reason, now],
                )?;
                Ok(n == 1)
            })
            .await
    }

    /// Names the job a wave is sent as (before the job is started); false
    /// if it has one already.
    pub async fn wave_started(
        &self,
        id: String,
        n: i64,
        job: String,
        now: i64,
    ) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                let n = s.exec(
                    "UPDATE rollout_waves SET job = ?3, started = ?4
                     WHERE rollout = ?1 AND n = ?2 AND job IS NULL",
                    params![id, n, job, now],
                )?;
                Ok(n == 1)
            })
            .await
    }
}
