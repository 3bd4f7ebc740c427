//! Integrators and support instances registered with this proxy, and the
//! durable mapping between systems-management IDs and the remote services
//! IDs the proxy allocates from its own (`acme.p1` -> `acme.p1.i3`,
//! `acme.p1.s12`). Numbers are never reused.

use crate::SubmitError;
use rs_protocol::{ComponentKind, RsId, Timestamp};
use rs_store::db::{Db, DbError, DbState};
use rusqlite::{Connection, OptionalExtension, params};

/// The registry's schema changes, in order (append only). Version 1
/// adopts the files of releases before versions, with the columns they
/// gained at every start.
pub const MIGRATIONS: &[rs_store::sql::Migration] = &[rs_store::sql::Migration {
    version: 1,
    name: "baseline",
    apply: |c| {
        c.batch(SCHEMA)?;
        // What became of each control action (files from before have every
        // action they saw done).
        for (col, ddl) in [
            (
                "state",
                "ALTER TABLE received ADD COLUMN state TEXT NOT NULL DEFAULT 'done'",
            ),
            ("response", "ALTER TABLE received ADD COLUMN response BLOB"),
        ] {
            if !c.exists(
                "SELECT 1 FROM pragma_table_info('received') WHERE name = ?1",
                rs_store::params![col],
            )? {
                c.batch(ddl)?;
            }
        }
        Ok(())
    },
}];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS integrators (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    version    TEXT    NOT NULL,
    platform   TEXT    NOT NULL,
    registered INTEGER NOT NULL,
    active     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id         TEXT    PRIMARY KEY,
    sm_id      TEXT    NOT NULL UNIQUE,
    integrator TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    registered INTEGER NOT NULL,
    enabled    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS received (
    id TEXT    PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS allocations (
    kind TEXT    PRIMARY KEY,
    next INTEGER NOT NULL
);
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Integrator {
    pub id: RsId,
    pub name: String,
    pub version: String,
    pub platform: String,
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: RsId,
    pub sm_id: String,
    pub integrator: RsId,
    pub name: String,
    pub enabled: bool,
}

#[derive(Debug)]
pub struct State {
    conn: Connection,
    me: RsId,
}

impl DbState for State {
    type Saved = ();
    fn txn(&mut self) -> &mut dyn rs_store::db::Txn {
        &mut self.conn
    }
    fn save(&self) {}
    fn restore(&mut self, (): ()) {}
}

/// Handle to the registry. Lookups are served from memory (every send
/// looks up its integrator and instance); the database is written only
/// when something is registered or changed.
#[derive(Debug, Clone)]
pub struct Registry {
    db: Db<State>,
    cache: std::sync::Arc<std::sync::Mutex<Cache>>,
}

#[derive(Debug, Default)]
struct Cache {
    /// Active integrators by ID and by name.
    integrators: std::collections::HashMap<String, Integrator>,
    /// Instances by systems-management ID.
    instances: std::collections::HashMap<String, Instance>,
}

impl Cache {
    fn put_integrator(&mut self, i: &Integrator) {
        self.integrators.insert(i.id.to_string(), i.clone());
        self.integrators.insert(i.name.clone(), i.clone());
    }
}

fn rs(s: String) -> rusqlite::Result<RsId> {
    RsId::new(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn allocate(conn: &Connection, me: &RsId, kind: ComponentKind) -> Result<RsId, DbError> {
    let key = kind.as_str();
    conn.execute(
        "INSERT INTO allocations (kind, next) VALUES (?1, 1) ON CONFLICT (kind) DO NOTHING",
        params![key],
    )?;
    let n: i64 = conn.query_row(
        "SELECT next FROM allocations WHERE kind = ?1",
        params![key],
        |r| r.get(0),
    )?;
    conn.execute(
        "UPDATE allocations SET next = next + 1 WHERE kind = ?1",
        params![key],
    )?;
    let n = u32::try_from(n).map_err(|_| DbError::Sql("ID space exhausted".into()))?;
    me.child(kind, n).map_err(|e| DbError::Sql(e.to_string()))
}

fn integrator_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Integrator> {
    Ok(Integrator {
        id: rs(r.get(0)?)?,
        name: r.get(1)?,
        version: r.get(2)?,
        platform: r.get(3)?,
        active: r.get(4)?,
    })
}

fn instance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Instance> {
    Ok(Instance {
        id: rs(r.get(0)?)?,
        sm_id: r.get(1)?,
        integrator: rs(r.get(2)?)?,
        name: r.get(3)?,
        enabled: r.get(4)?,
    })
}

impl Registry {
    pub fn open(path: &std::path::Path, me: RsId) -> Result<Self, DbError> {
        let conn = rs_store::sql::Conn::open(
            &rs_store::sql::Location::Sqlite(path.to_owned()),
            MIGRATIONS,
        )?
        .into_sqlite()
        .ok_or_else(|| DbError::Sql("the registry is an SQLite file".into()))?;
        Ok(Registry {
            db: Db::start("rs-proxy-registry", State { conn, me })?,
            cache: Default::default(),
        })
    }

    fn cached<T>(&self, f: impl FnOnce(&mut Cache) -> T) -> T {
        match self.cache.lock() {
            Ok(mut c) => f(&mut c),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Registers an integrator by name (again: same ID, version updated,
    /// reactivated).
    pub async fn register_integrator(
        &self,
        name: String,
        version: String,
        platform: String,
    ) -> Result<Integrator, DbError> {
        if let Some(i) = self.cached(|c| c.integrators.get(&name).cloned())
            && i.version == version
            && i.platform == platform
        {
            return Ok(i);
        }
        let i = self
            .db
            .write(move |s| {
                let existing: Option<String> = s
                    .conn
                    .query_row("SELECT id FROM integrators WHERE name = ?1", params![name], |r| r.get(0))
                    .optional()?;
                let id = match existing {
                    Some(id) => {
                        s.conn.execute(
                            "UPDATE integrators SET version = ?2, platform = ?3, active = 1 WHERE id = ?1",
                            params![id, version, platform],
                        )?;
                        RsId::new(id).map_err(|e| DbError::Sql(e.to_string()))?
                    }
                    None => {
                        let id = allocate(&s.conn, &s.me, ComponentKind::Integrator)?;
                        s.conn.execute(
                            "INSERT INTO integrators (id, name, version, platform, registered, active)
                             VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                            params![id.as_str(), name, version, platform, Timestamp::now().as_millis()],
                        )?;
                        id
                    }
                };
                Ok(Integrator {
                    id,
                    name,
                    version,
                    platform,
                    active: true,
                })
            })
            .await?;
        self.cached(|c| c.put_integrator(&i));
        Ok(i)
    }

    /// Marks an integrator inactive; its instances' IDs are kept.
    pub async fn deregister_integrator(&self, id: RsId) -> Result<bool, DbError> {
        self.db
            .write(move |s| {
                Ok(s.conn.execute(
                    "UPDATE integrators SET active = 0 WHERE id = ?1",
                    params![id.as_str()],
                )? > 0)
            })
            .await
    }

    /// Finds an active integrator by its RS ID or its name.
    pub async fn integrator(&self, key: String) -> Result<Option<Integrator>, DbError> {
        if let Some(i) = self.cached(|c| c.integrators.get(&key).cloned()) {
            return Ok(Some(i));
        }
        let found = self
            .db
            .read(move |s| {
                Ok(s.conn
                    .query_row(
                        "SELECT id, name, version, platform, active FROM integrators
                         WHERE (id = ?1 OR name = ?1) AND active = 1",
                        params![key],
                        integrator_row,
                    )
                    .optional()?)
            })
            .await?;
        if let Some(i) = &found {
            self.cached(|c| c.put_integrator(i));
        }
        Ok(found)
    }

    /// The instance with this systems-management ID, registering it under
    /// `integrator` if it is new.
    pub async fn instance(
        &self,
        integrator: RsId,
        sm_id: String,
        name: Option<String>,
    ) -> Result<Instance, DbError> {
        if let Some(i) = self.cached(|c| c.instances.get(&sm_id).cloned()) {
            return Ok(i);
        }
        let inst = self
            .db
            .write(move |s| {
                let found = s
                    .conn
                    .query_row(
                        "SELECT id, sm_id, integrator, name, enabled FROM instances WHERE sm_id = ?1",
                        params![sm_id],
                        instance_row,
                    )
                    .optional()?;
                if let Some(i) = found {
                    return Ok(i);
                }
                let id = allocate(&s.conn, &s.me, ComponentKind::SupportInstance)?;
                let name = name.unwrap_or_else(|| sm_id.clone());
                s.conn.execute(
                    "INSERT INTO instances (id, sm_id, integrator, name, registered, enabled)
                     VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                    params![id.as_str(), sm_id, integrator.as_str(), name, Timestamp::now().as_millis()],
                )?;
                Ok(Instance {
                    id,
                    sm_id,
                    integrator,
                    name,
                    enabled: true,
                })
            })
            .await?;
        self.cached(|c| c.instances.insert(inst.sm_id.clone(), inst.clone()));
        Ok(inst)
    }

    /// Enables or disables an instance; false if unknown.
    pub async fn set_enabled(&self, id: RsId, enabled: bool) -> Result<bool, DbError> {
        let key = id.clone();
        let r = self
            .db
            .write(move |s| {
                Ok(s.conn.execute(
                    "UPDATE instances SET enabled = ?2 WHERE id = ?1",
                    params![id.as_str(), enabled],
                )? > 0)
            })
            .await?;
        self.cached(|c| {
            for i in c.instances.values_mut().filter(|i| i.id == key) {
                i.enabled = enabled;
            }
        });
        Ok(r)
    }

    pub async fn integrators(&self) -> Result<Vec<Integrator>, DbError> {
        self.db
            .read(|s| {
                let mut st = s.conn.prepare(
                    "SELECT id, name, version, platform, active FROM integrators ORDER BY id",
                )?;
                let rows = st.query_map([], integrator_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    pub async fn instances(&self) -> Result<Vec<Instance>, DbError> {
        self.db
            .read(|s| {
                let mut st = s.conn.prepare(
                    "SELECT id, sm_id, integrator, name, enabled FROM instances ORDER BY id",
                )?;
                let rows = st.query_map([], instance_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }
}

/// What a proxy did with a back-channel message before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Never seen: it is now recorded as being applied.
    New,
    /// Being applied when the proxy stopped (or its answer could not be
    /// recorded): it must not be applied again.
    Interrupted,
    /// Applied; its answer (an encoded response message) is not known to
    /// be spooled yet.
    Answered(Vec<u8>),
    /// Done: applied (or dropped) and answered.
    Done,
}

impl Registry {
    /// The integrator named (by RS ID or name) and, if given, its support
    /// instance by systems-management ID (registered on first use).
    pub(crate) async fn resolve(
        &self,
        integrator: &str,
        instance: Option<&str>,
    ) -> Result<(Integrator, Option<RsId>), SubmitError> {
        let bad = |t: String| SubmitError::Invalid(t);
        let integ = self
            .integrator(integrator.to_owned())
            .await
            .map_err(|e| SubmitError::Storage(e.to_string()))?
            .ok_or_else(|| {
                bad(format!(
                    "no integrator {:?}; register it first (POST /v1/integrators)",
                    integrator
                ))
            })?;
        let instance = match instance {
            Some(sm) => {
                if sm.is_empty() || sm.len() > 255 {
                    return Err(bad("instance must be 1 to 255 bytes".into()));
                }
                let i = self
                    .instance(integ.id.clone(), sm.to_owned(), None)
                    .await
                    .map_err(|e| SubmitError::Storage(e.to_string()))?;
                if !i.enabled {
                    return Err(bad(format!("support instance {} ({sm}) is disabled", i.id)));
                }
                Some(i.id)
            }
            None => None,
        };
        Ok((integ, instance))
    }

    /// Records that control action `id` is about to be applied, unless it
    /// was before: then says how far it got. Applying only after this
    /// commits is what makes an action applied at most once.
    pub async fn claim(&self, id: String) -> Result<Claim, DbError> {
        self.db
            .write(move |s| {
                let row: Option<(String, Option<Vec<u8>>)> = s
                    .conn
                    .query_row(
                        "SELECT state, response FROM received WHERE id = ?1",
                        params![id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                Ok(match row {
                    None => {
                        s.conn.execute(
                            "INSERT INTO received (id, at, state) VALUES (?1, ?2, 'applying')",
                            params![id, Timestamp::now().as_millis()],
                        )?;
                        Claim::New
                    }
                    Some((state, _)) if state == "applying" => Claim::Interrupted,
                    Some((state, Some(r))) if state == "answered" => Claim::Answered(r),
                    Some(_) => Claim::Done,
                })
            })
            .await
    }

    /// Records an applied action's answer (until it is spooled).
    pub async fn answered(&self, id: String, response: Vec<u8>) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.conn.execute(
                    "UPDATE received SET state = 'answered', response = ?2 WHERE id = ?1",
                    params![id, response],
                )?;
                Ok(())
            })
            .await
    }

    /// Whether back-channel message `id` was already handled.
    pub async fn seen(&self, id: String) -> Result<bool, DbError> {
        self.db
            .read(move |s| {
                Ok(s.conn
                    .query_row("SELECT 1 FROM received WHERE id = ?1", params![id], |_| {
                        Ok(())
                    })
                    .optional()?
                    .is_some())
            })
            .await
    }

    /// Records that back-channel message `id` was handled.
    pub async fn mark_seen(&self, id: String) -> Result<(), DbError> {
        self.db
            .write(move |s| {
                s.conn.execute(
                    "INSERT INTO received (id, at, state) VALUES (?1, ?2, 'done')
                     ON CONFLICT (id) DO UPDATE SET state = 'done', response = NULL",
                    params![id, Timestamp::now().as_millis()],
                )?;
                Ok(())
            })
            .await
    }

    /// Forgets handled back-channel message IDs older than `keep` (longer
    /// than any expiry the application server gives, so a repeat of a
    /// forgotten one has expired and is not applied). Returns how many.
    pub async fn forget_seen(&self, keep: std::time::Duration) -> Result<u64, DbError> {
        let horizon =
            Timestamp::now().as_millis() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        self.db
            .write(move |s| {
                let n = s
                    .conn
                    .execute("DELETE FROM received WHERE at < ?1", params![horizon])?;
                Ok(n as u64)
            })
            .await
    }
}
