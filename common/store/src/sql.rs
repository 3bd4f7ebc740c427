//! One SQL interface over the two engines the stores run on: SQLite (an
//! embedded file, the default) and PostgreSQL (shared by the members of a
//! farm). A store's code is written once against [`Conn`]: statements use
//! `?N` placeholders and SQL both engines accept (`ON CONFLICT`,
//! `RETURNING`, `COALESCE`, integers for booleans); what differs (the
//! schema's types, sequences, locking) is in each store's migrations and
//! in the few places that ask [`Conn::engine`].
//!
//! PostgreSQL is reached with the blocking client of the rust-postgres
//! project (`postgres`, a thin wrapper over tokio-postgres): a store's
//! transactions are closures run on its database thread (`db.rs`, group
//! commit), and the blocking client runs them unchanged there. A lost
//! connection fails the batch in hand (callers answer `retry`, senders
//! keep custody) and the next batch connects again.
//!
//! Integers are 64-bit on both engines (`BIGINT` in PostgreSQL's schemas),
//! text is text, bytes are `BLOB`/`BYTEA`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::db::DbError;

/// Where a store's tables live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (a `postgres://` URL) and the schema in it
    /// that holds this store's tables (several stores share a database).
    Postgres { url: String, schema: String },
}

impl Location {
    /// The store at `database` if it is a `postgres://` (or
    /// `postgresql://`) URL, else the SQLite file `file`.
    pub fn choose(database: Option<&str>, file: PathBuf, schema: &str) -> Location {
        match database {
            Some(url) if is_postgres_url(url) => Location::Postgres {
                url: url.to_owned(),
                schema: schema.to_owned(),
            },
            _ => Location::Sqlite(file),
        }
    }

    /// For logs: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres { url, schema } => format!("{} (schema {schema})", redact(url)),
        }
    }
}

/// Whether a configured `database` names a PostgreSQL server.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `postgres://user:secret@host/db` without the secret.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A value bound to a statement or read from a row, borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// What may be bound to a `?N` placeholder.
pub trait ToParam: Sync {
    fn param(&self) -> Value<'_>;
}

macro_rules! int_param {
    ($($t:ty),*) => {$(
        impl ToParam for $t {
            fn param(&self) -> Value<'_> {
                Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
            }
        }
    )*};
}
int_param!(i64, i32, u32, u16, u8, u64, usize);

impl ToParam for bool {
    fn param(&self) -> Value<'_> {
        Value::Int(i64::from(*self))
    }
}
impl ToParam for f64 {
    fn param(&self) -> Value<'_> {
        Value::Real(*self)
    }
}
impl ToParam for str {
    fn param(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToParam for String {
    fn param(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToParam for std::borrow::Cow<'_, str> {
    fn param(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToParam for [u8] {
    fn param(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl ToParam for Vec<u8> {
    fn param(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl<T: ToParam + ?Sized> ToParam for &T {
    fn param(&self) -> Value<'_> {
        (**self).param()
    }
}
impl<T: ToParam> ToParam for Option<T> {
    fn param(&self) -> Value<'_> {
        match self {
            Some(v) => v.param(),
            None => Value::Null,
        }
    }
}
impl ToParam for Value<'_> {
    fn param(&self) -> Value<'_> {
        *self
    }
}

/// An owned parameter, for statements put together at run time.
#[derive(Debug, Clone, PartialEq)]
pub enum Owned {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl ToParam for Owned {
    fn param(&self) -> Value<'_> {
        match self {
            Owned::Null => Value::Null,
            Owned::Int(i) => Value::Int(*i),
            Owned::Text(s) => Value::Text(s),
            Owned::Blob(b) => Value::Blob(b),
        }
    }
}
impl From<i64> for Owned {
    fn from(v: i64) -> Self {
        Owned::Int(v)
    }
}
impl From<String> for Owned {
    fn from(v: String) -> Self {
        Owned::Text(v)
    }
}

/// The parameters of one statement: `params![a, b]`.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::sql::ToParam] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::sql::ToParam),+] as &[&dyn $crate::sql::ToParam] };
}
pub use params;

/// What a column may be read as.
pub trait FromValue: Sized {
    fn from_value(v: Value<'_>) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: Value<'_>) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(i),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}
macro_rules! int_from {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: Value<'_>) -> Result<Self, String> {
                let i = i64::from_value(v)?;
                <$t>::try_from(i).map_err(|_| format!("{i} is out of range"))
            }
        }
    )*};
}
int_from!(i32, u32, u64, usize, u16, u8);

impl FromValue for bool {
    fn from_value(v: Value<'_>) -> Result<Self, String> {
        Ok(i64::from_value(v)? != 0)
    }
}
impl FromValue for f64 {
    fn from_value(v: Value<'_>) -> Result<Self, String> {
        match v {
            Value::Real(f) => Ok(f),
            Value::Int(i) => Ok(i as f64),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}
impl FromValue for String {
    fn from_value(v: Value<'_>) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.to_owned()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: Value<'_>) -> Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.to_vec()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(format!("expected bytes, found {other:?}")),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: Value<'_>) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One row of a result.
#[derive(Debug)]
pub enum Row<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Postgres(&'a postgres::Row),
}

impl Row<'_> {
    /// Column `i` (from 0).
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, DbError> {
        let r = match self {
            Row::Sqlite(r) => {
                let v = r.get_ref(i)?;
                T::from_value(match v {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                    rusqlite::types::ValueRef::Real(f) => Value::Real(f),
                    rusqlite::types::ValueRef::Text(t) => Value::Text(
                        std::str::from_utf8(t).map_err(|e| DbError::Sql(e.to_string()))?,
                    ),
                    rusqlite::types::ValueRef::Blob(b) => Value::Blob(b),
                })
            }
            Row::Postgres(r) => {
                let v: PgValue<'_> = r.try_get(i).map_err(pg_error)?;
                T::from_value(v.0)
            }
        };
        r.map_err(|e| DbError::Sql(format!("column {i}: {e}")))
    }
}

/// A PostgreSQL value of whatever type the column has.
struct PgValue<'a>(Value<'a>);

impl<'a> postgres::types::FromSql<'a> for PgValue<'a> {
    fn from_sql(
        ty: &postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        Ok(PgValue(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(raw),
            _ => Value::Text(<&str>::from_sql(ty, raw)?),
        }))
    }

    fn from_sql_null(
        _: &postgres::types::Type,
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgValue(Value::Null))
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

impl postgres::types::ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match (*self, ty) {
            (Value::Null, _) => Ok(postgres::types::IsNull::Yes),
            (Value::Int(i), &Type::INT8) => i.to_sql(ty, out),
            (Value::Int(i), &Type::INT4) => i32::try_from(i)?.to_sql(ty, out),
            (Value::Int(i), &Type::INT2) => i16::try_from(i)?.to_sql(ty, out),
            (Value::Int(i), &Type::BOOL) => (i != 0).to_sql(ty, out),
            (Value::Int(i), &Type::FLOAT8) => (i as f64).to_sql(ty, out),
            (Value::Int(i), _) => i.to_string().as_str().to_sql(ty, out),
            (Value::Real(f), &Type::FLOAT8) => f.to_sql(ty, out),
            (Value::Real(f), _) => f.to_string().as_str().to_sql(ty, out),
            (Value::Text(s), &Type::BYTEA) => s.as_bytes().to_sql(ty, out),
            (Value::Text(s), _) => s.to_sql(ty, out),
            (Value::Blob(b), &Type::BYTEA) => b.to_sql(ty, out),
            (Value::Blob(b), _) => std::str::from_utf8(b)?.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(i),
            Value::Real(f) => ValueRef::Real(f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn pg_error(e: postgres::Error) -> DbError {
    match e.as_db_error() {
        Some(d) => DbError::Sql(format!(
            "{} ({}){}",
            d.message(),
            d.code().code(),
            d.detail().map(|x| format!(": {x}")).unwrap_or_default()
        )),
        None if e.is_closed() => DbError::Sql("the PostgreSQL connection is closed".into()),
        None => DbError::Sql(chain(&e)),
    }
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        pg_error(e)
    }
}

/// `?N` placeholders as PostgreSQL spells them (`$N`); text in quotes is
/// left alone.
pub fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                out.push(c);
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    out.push(c);
                }
                '?' => out.push('$'),
                _ => out.push(c),
            },
        }
    }
    out
}

/// A PostgreSQL session: the client while connected, and what connecting
/// again needs.
struct Pg {
    config: postgres::Config,
    schema: String,
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
    /// Inside a transaction a lost connection is not replaced: the work
    /// of the batch so far died with it, and statements on a new session
    /// would run outside any transaction.
    in_txn: bool,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("schema", &self.schema)
            .field("connected", &self.client.is_some())
            .finish()
    }
}

/// How long a statement may run before PostgreSQL cancels it: a database
/// that hangs fails the batch (callers answer `retry`) instead of holding
/// the store's thread.
const STATEMENT_TIMEOUT: &str = "30s";

/// The advisory lock migrations (and the creation of a store's schema)
/// run under on PostgreSQL.
const MIGRATION_LOCK: i64 = 7273636865;

/// The columns of `rs_schema`, the record of applied migrations.
const RS_SCHEMA: &str = "version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied BIGINT NOT NULL";

impl Pg {
    fn client(&mut self) -> Result<&mut postgres::Client, DbError> {
        if self
            .client
            .as_ref()
            .is_some_and(postgres::Client::is_closed)
        {
            self.client = None;
        }
        if self.client.is_none() && self.in_txn {
            return Err(DbError::Sql(
                "the PostgreSQL connection was lost in the middle of a transaction".into(),
            ));
        }
        if self.client.is_none() {
            self.statements.clear();
            let mut c = self.config.connect(postgres::NoTls)?;
            // The schema and its version table are made under the
            // migrations' lock: farm members starting together on a new
            // database would otherwise race in CREATE ... IF NOT EXISTS,
            // which is not safe against a concurrent creation (a unique
            // violation in the catalog). Once they exist this takes the
            // lock for a moment and changes nothing.
            c.batch_execute(&format!(
                "SET statement_timeout = '{STATEMENT_TIMEOUT}';
                 BEGIN;
                 SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
                 CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.rs_schema ({RS_SCHEMA});
                 COMMIT;
                 SET search_path TO {s};",
                s = self.schema
            ))?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn statement(
        &mut self,
        sql: &str,
    ) -> Result<(postgres::Statement, &mut postgres::Client), DbError> {
        if let Some(st) = self.statements.get(sql) {
            let st = st.clone();
            return Ok((st, self.client()?));
        }
        let client = self.client()?;
        let st = client.prepare(&to_postgres(sql))?;
        self.statements.insert(sql.to_owned(), st.clone());
        Ok((st, self.client.as_mut().expect("connected above")))
    }

    fn forget_if_closed(&mut self) {
        if self
            .client
            .as_ref()
            .is_some_and(postgres::Client::is_closed)
        {
            self.client = None;
        }
    }
}

enum Inner {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

/// A connection to one store's tables, on either engine.
pub struct Conn {
    inner: Inner,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Sqlite(_) => f.write_str("Conn(SQLite)"),
            Inner::Postgres(p) => write!(f, "Conn({p:?})"),
        }
    }
}

/// A schema change, applied once, in order, in its own transaction.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// From 1, without gaps.
    pub version: i64,
    pub name: &'static str,
    /// Runs the change; asks [`Conn::engine`] where the engines differ.
    pub apply: fn(&mut Conn) -> Result<(), DbError>,
}

/// A schema name must be an SQL identifier of ours: it is put into
/// statements as is.
fn check_schema(s: &str) -> Result<(), DbError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(DbError::Sql(format!(
            "{s:?} is not a schema name (a-z, 0-9, _)"
        )))
    }
}

impl Conn {
    /// Opens the store at `at` and brings its schema up to date with
    /// `migrations`. A database from a newer release (a version this code
    /// does not know) is refused, never changed.
    pub fn open(at: &Location, migrations: &[Migration]) -> Result<Conn, DbError> {
        Conn::open_with(at, Some(migrations), None)
    }

    /// [`Conn::open`] for a store whose rows are a few KiB (the server's
    /// messages): a new SQLite file gets pages of `page_size` bytes. With
    /// SQLite's 4 KiB pages a 2 KiB row takes a page of its own, written
    /// whole to the WAL and again by the checkpoint: about 10 KB written
    /// per 2 KB message.
    pub fn open_paged(
        at: &Location,
        migrations: &[Migration],
        page_size: u32,
    ) -> Result<Conn, DbError> {
        Conn::open_with(at, Some(migrations), Some(page_size))
    }

    /// Connects to a store without touching its schema (for tools and
    /// tests that read what a daemon wrote).
    pub fn connect(at: &Location) -> Result<Conn, DbError> {
        Conn::open_with(at, None, None)
    }

    fn open_with(
        at: &Location,
        migrations: Option<&[Migration]>,
        page_size: Option<u32>,
    ) -> Result<Conn, DbError> {
        match at {
            Location::Sqlite(_) => Conn::open_here(at, migrations, page_size),
            // The blocking client runs a runtime of its own, which cannot
            // start on a thread that drives async tasks (a daemon opens its
            // stores from its async main): connect on a thread of its own.
            Location::Postgres { .. } => std::thread::scope(|s| {
                s.spawn(|| Conn::open_here(at, migrations, None))
                    .join()
                    .unwrap_or_else(|_| Err(DbError::Sql("opening the database panicked".into())))
            }),
        }
    }

    fn open_here(
        at: &Location,
        migrations: Option<&[Migration]>,
        page_size: Option<u32>,
    ) -> Result<Conn, DbError> {
        let mut conn = match at {
            Location::Sqlite(path) => Conn {
                inner: Inner::Sqlite(crate::db::open_with(path, page_size)?),
            },
            Location::Postgres { url, schema } => {
                check_schema(schema)?;
                let mut config: postgres::Config = url
                    .parse()
                    .map_err(|e| DbError::Sql(format!("{}: {e}", redact(url))))?;
                if config.get_connect_timeout().is_none() {
                    config.connect_timeout(Duration::from_secs(5));
                }
                config.keepalives(true);
                config.keepalives_idle(Duration::from_secs(30));
                if config.get_application_name().is_none() {
                    config.application_name("remote-services");
                }
                let mut pg = Pg {
                    config,
                    schema: schema.clone(),
                    client: None,
                    statements: HashMap::new(),
                    in_txn: false,
                };
                pg.client()
                    .map_err(|e| DbError::Sql(format!("{}: {e}", redact(url))))?;
                Conn {
                    inner: Inner::Postgres(Box::new(pg)),
                }
            }
        };
        if let Some(m) = migrations {
            conn.migrate(m)?;
        }
        Ok(conn)
    }

    /// An open SQLite connection (for stores that bring their own).
    pub fn sqlite(c: rusqlite::Connection) -> Conn {
        Conn {
            inner: Inner::Sqlite(c),
        }
    }

    pub fn engine(&self) -> Engine {
        match self.inner {
            Inner::Sqlite(_) => Engine::Sqlite,
            Inner::Postgres(_) => Engine::Postgres,
        }
    }

    /// The SQLite connection itself, for a store that works on it directly
    /// once its migrations have run (the spool).
    pub fn into_sqlite(self) -> Option<rusqlite::Connection> {
        match self.inner {
            Inner::Sqlite(c) => Some(c),
            Inner::Postgres(_) => None,
        }
    }

    /// The SQLite connection, where one store needs SQLite's own features.
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.inner {
            Inner::Sqlite(c) => Some(c),
            Inner::Postgres(_) => None,
        }
    }

    /// The schema version the database is at (0: none yet).
    pub fn schema_version(&mut self) -> Result<i64, DbError> {
        self.batch(&format!(
            "CREATE TABLE IF NOT EXISTS rs_schema ({RS_SCHEMA})"
        ))?;
        self.one(
            "SELECT COALESCE(MAX(version), 0) FROM rs_schema",
            params![],
            |r| r.get(0),
        )
    }

    fn migrate(&mut self, migrations: &[Migration]) -> Result<(), DbError> {
        let known = migrations.last().map_or(0, |m| m.version);
        for (i, m) in migrations.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "migrations are numbered from 1");
        }
        loop {
            let at = self.schema_version()?;
            if at > known {
                return Err(DbError::Sql(format!(
                    "the database is at schema version {at}, written by a newer release \
                     (this one knows up to {known}); refusing to change it"
                )));
            }
            let Some(m) = migrations.get(usize::try_from(at).unwrap_or(0)) else {
                return Ok(());
            };
            // One migrator at a time: farm members starting together wait
            // here, and the second finds the work done.
            self.begin()?;
            if self.engine() == Engine::Postgres {
                self.one(
                    "SELECT pg_advisory_xact_lock(?1)",
                    params![MIGRATION_LOCK],
                    |_| Ok(()),
                )?;
            }
            let r = (|| -> Result<(), DbError> {
                let now: i64 = self.one(
                    "SELECT COALESCE(MAX(version), 0) FROM rs_schema",
                    params![],
                    |r| r.get(0),
                )?;
                if now != at {
                    return Ok(());
                }
                (m.apply)(self)?;
                let applied = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                self.exec(
                    "INSERT INTO rs_schema (version, name, applied) VALUES (?1, ?2, ?3)",
                    params![m.version, m.name, applied],
                )?;
                Ok(())
            })();
            match r {
                Ok(()) => {
                    self.commit()?;
                    if at < m.version {
                        tracing::info!("schema migrated to version {} ({})", m.version, m.name);
                    }
                }
                Err(e) => {
                    let _ = self.rollback();
                    return Err(DbError::Sql(format!(
                        "migration {} ({}): {e}",
                        m.version, m.name
                    )));
                }
            }
        }
    }

    /// Begins a transaction (SQLite: `BEGIN IMMEDIATE`, taking the write
    /// lock at once). On PostgreSQL a lost connection is replaced here,
    /// and only here.
    pub fn begin(&mut self) -> Result<(), DbError> {
        match &mut self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            Inner::Postgres(p) => {
                p.in_txn = false;
                let r = p.client()?.batch_execute("BEGIN");
                if r.is_err() {
                    p.forget_if_closed();
                }
                r?;
                p.in_txn = true;
                Ok(())
            }
        }
    }

    /// Commits the transaction. An error may leave its fate unknown (the
    /// connection died after sending it): callers answer `retry`, and what
    /// they send again is recognised by its ID.
    pub fn commit(&mut self) -> Result<(), DbError> {
        self.end("COMMIT")
    }

    pub fn rollback(&mut self) -> Result<(), DbError> {
        self.end("ROLLBACK")
    }

    fn end(&mut self, sql: &str) -> Result<(), DbError> {
        let r = self.batch(sql);
        if let Inner::Postgres(p) = &mut self.inner {
            p.in_txn = false;
        }
        r
    }

    /// Runs statements without parameters (schema changes).
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match &mut self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres(p) => {
                let r = p.client()?.batch_execute(sql);
                if r.is_err() {
                    p.forget_if_closed();
                }
                Ok(r?)
            }
        }
    }

    /// Runs one statement; returns how many rows it changed.
    pub fn exec(&mut self, sql: &str, params: &[&dyn ToParam]) -> Result<u64, DbError> {
        match &mut self.inner {
            Inner::Sqlite(c) => {
                let n = c
                    .prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(params.iter().map(|p| p.param())))?;
                Ok(n as u64)
            }
            Inner::Postgres(p) => {
                let values: Vec<Value<'_>> = params.iter().map(|p| p.param()).collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    values.iter().map(|v| v as _).collect();
                let (st, client) = p.statement(sql)?;
                let r = client.execute(&st, &refs);
                if r.is_err() {
                    p.forget_if_closed();
                }
                Ok(r?)
            }
        }
    }

    /// Every row of a query, each through `f`.
    pub fn rows<T>(
        &mut self,
        sql: &str,
        params: &[&dyn ToParam],
        mut f: impl FnMut(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        match &mut self.inner {
            Inner::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let mut rows =
                    st.query(rusqlite::params_from_iter(params.iter().map(|p| p.param())))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
                Ok(out)
            }
            Inner::Postgres(p) => {
                let values: Vec<Value<'_>> = params.iter().map(|p| p.param()).collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    values.iter().map(|v| v as _).collect();
                let (st, client) = p.statement(sql)?;
                let r = client.query(&st, &refs);
                if r.is_err() {
                    p.forget_if_closed();
                }
                r?.iter().map(|r| f(&Row::Postgres(r))).collect()
            }
        }
    }

    /// The first row of a query, if any.
    pub fn row<T>(
        &mut self,
        sql: &str,
        params: &[&dyn ToParam],
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Option<T>, DbError> {
        let mut f = Some(f);
        let mut out = None;
        self.rows(sql, params, |r| {
            if let Some(f) = f.take() {
                out = Some(f(r)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The first row of a query that always returns one.
    pub fn one<T>(
        &mut self,
        sql: &str,
        params: &[&dyn ToParam],
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.row(sql, params, f)?
            .ok_or_else(|| DbError::Sql(format!("no row from: {}", sql.trim())))
    }

    /// Tells every member of a farm listening on `channel` (a [`Presence`])
    /// once this transaction commits; nothing on SQLite, where the one
    /// process that writes is the one that waits.
    pub fn notify(&mut self, channel: &str) -> Result<(), DbError> {
        if self.engine() == Engine::Postgres {
            self.one("SELECT pg_notify(?1, '')", params![channel], |_| Ok(()))?;
        }
        Ok(())
    }

    /// Makes the transactions that call this with the same `key` commit
    /// one after another (PostgreSQL: a transaction-scoped advisory lock;
    /// SQLite has one writer already). A sequence drawn after it is in
    /// commit order: a reader that follows it never passes a row that
    /// commits later with a smaller number.
    pub fn serialize(&mut self, key: i64) -> Result<(), DbError> {
        if self.engine() == Engine::Postgres {
            self.one("SELECT pg_advisory_xact_lock(?1)", params![key], |_| Ok(()))?;
        }
        Ok(())
    }

    /// Whether a query returns any row.
    pub fn exists(&mut self, sql: &str, params: &[&dyn ToParam]) -> Result<bool, DbError> {
        Ok(self.row(sql, params, |_| Ok(()))?.is_some())
    }
}

/// A store that keeps nothing beside its connection runs on `Db<Conn>`.
impl crate::db::DbState for Conn {
    type Saved = ();
    fn txn(&mut self) -> &mut dyn crate::db::Txn {
        self
    }
    fn save(&self) {}
    fn restore(&mut self, (): ()) {}
}

impl crate::db::Txn for Conn {
    fn begin(&mut self) -> Result<(), DbError> {
        Conn::begin(self)
    }

    fn durability(&mut self, relaxed: bool) -> Result<(), DbError> {
        match (self.engine(), relaxed) {
            (Engine::Sqlite, true) => self.batch("PRAGMA synchronous=NORMAL"),
            (Engine::Sqlite, false) => self.batch("PRAGMA synchronous=FULL"),
            (Engine::Postgres, true) => self.batch("SET synchronous_commit = off"),
            (Engine::Postgres, false) => self.batch("SET synchronous_commit = on"),
        }
    }

    fn run(&mut self, sql: &str) -> Result<(), DbError> {
        if sql == "COMMIT" || sql == "ROLLBACK" {
            return self.end(sql);
        }
        match &mut self.inner {
            Inner::Sqlite(c) => {
                c.prepare_cached(sql)?.execute([])?;
                Ok(())
            }
            Inner::Postgres(_) => self.batch(sql),
        }
    }
}

/// An advisory lock key of 64 bits named by `name` (FNV-1a), for locks
/// that belong to one of several farms sharing a database.
pub fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// A farm member's standing session on the shared database: it hears the
/// notifications other members' commits send ([`Conn::notify`]) and holds
/// the farm's leadership (an advisory lock) while it is the leader. Work
/// that must run once per farm runs where [`Presence::is_leader`] holds;
/// when the leader dies its session ends, the lock is free, and another
/// member takes it within a second or two. On SQLite the one server is
/// always the leader and nothing is heard.
#[derive(Debug, Clone)]
pub struct Presence {
    leader: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Presence {
    /// The presence of the only server (SQLite).
    pub fn alone() -> Presence {
        Presence {
            leader: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// Starts the session at `at` (PostgreSQL; SQLite: [`Presence::alone`]):
    /// listens on `channels`, calls `heard` with each notification's
    /// channel, and contends for leadership under `lock`. Reconnects by
    /// itself; while disconnected it is not the leader.
    pub fn start(
        at: &Location,
        channels: Vec<String>,
        lock: i64,
        heard: impl Fn(&str) + Send + 'static,
    ) -> Result<Presence, DbError> {
        let Location::Postgres { url, .. } = at else {
            return Ok(Presence::alone());
        };
        let config: postgres::Config = url
            .parse()
            .map_err(|e| DbError::Sql(format!("{}: {e}", redact(url))))?;
        let p = Presence {
            leader: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let leader = p.leader.clone();
        std::thread::Builder::new()
            .name("rs-presence".into())
            .spawn(move || {
                loop {
                    if let Err(e) = presence_session(&config, &channels, lock, &leader, &heard) {
                        tracing::warn!("farm presence: {e}; connecting again");
                    }
                    if leader.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        tracing::warn!("no longer the farm's leader (lost the database session)");
                    }
                    // Whatever was missed while away: wake everything.
                    for c in &channels {
                        heard(c);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .map_err(|e| DbError::Sql(format!("cannot start the presence thread: {e}")))?;
        Ok(p)
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One session of a [`Presence`], until its connection fails.
fn presence_session(
    config: &postgres::Config,
    channels: &[String],
    lock: i64,
    leader: &std::sync::atomic::AtomicBool,
    heard: &dyn Fn(&str),
) -> Result<(), DbError> {
    let mut config = config.clone();
    config.connect_timeout(Duration::from_secs(5));
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(5));
    config.application_name("remote-services presence");
    let mut client = config.connect(postgres::NoTls)?;
    for c in channels {
        client.batch_execute(&format!("LISTEN {c}"))?;
    }
    loop {
        if !leader.load(std::sync::atomic::Ordering::SeqCst) {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&lock])?
                .get(0);
            if got {
                leader.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("this server is now the farm's leader");
                // Its once-per-farm work starts now, not at its next tick.
                for c in channels {
                    heard(c);
                }
            }
        } else {
            // A dead connection shows here within the keepalive's reach.
            client.batch_execute("SELECT 1")?;
        }
        {
            use postgres::fallible_iterator::FallibleIterator as _;
            let mut n = client.notifications();
            let mut it = n.timeout_iter(Duration::from_millis(500));
            while let Some(note) = it.next()? {
                heard(note.channel());
            }
        }
        if client.is_closed() {
            return Err(DbError::Sql("the connection closed".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            to_postgres("SELECT '?1', \"a?\" FROM t WHERE x = ?1 AND y = ?12"),
            "SELECT '?1', \"a?\" FROM t WHERE x = $1 AND y = $12"
        );
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("postgres://rs:secret@db.example:5432/rs"),
            "postgres://rs:***@db.example:5432/rs"
        );
        assert_eq!(redact("postgres://rs@db/rs"), "postgres://rs@db/rs");
        assert!(check_schema("appserver").is_ok());
        assert!(check_schema("a; DROP").is_err());
    }
}
