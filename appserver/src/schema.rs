//! The application server's schema on both engines, as numbered
//! migrations ([`MIGRATIONS`]): a database written by any release is
//! brought up to date in place when the server opens it, never discarded.
//!
//! Version 1 is the schema of the first release with versions. On SQLite
//! it also upgrades the databases of earlier releases (which had no
//! version), with the fixes they used to get at every start; on
//! PostgreSQL it creates the tables. Types: integers are `BIGINT` (the
//! code binds 64-bit values), bytes `BYTEA`, and the IDs SQLite assigns
//! to an `INTEGER PRIMARY KEY` come from identity columns.

use rs_store::db::DbError;
use rs_store::params;
use rs_store::sql::{Conn, Engine, Migration};

/// Every schema change, in order (append only).
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "baseline",
        apply: baseline,
    },
    Migration {
        version: 2,
        name: "one enrollment per allocated ID",
        // Two farm members enrolling for one customer at once may both
        // allocate the same next ID: the second's commit fails here (its
        // token stays unspent, the caller tries again) instead of two
        // certificates naming one component. Tokens that name their
        // component (a redeployed site enrolls its ID again) are not
        // constrained.
        apply: |c| {
            c.batch(
                "CREATE UNIQUE INDEX enrollments_allocated ON enrollments (issued)
                 WHERE component IS NULL",
            )
        },
    },
    Migration {
        version: 3,
        name: "one back-channel queue",
        // The queue's operations are rs_store::queue's, shared with the
        // MLM: its table has the MLM's columns for download offers (the
        // server's copies never are held).
        apply: |c| {
            c.batch("ALTER TABLE outbox ADD COLUMN bulk TEXT")?;
            c.batch("ALTER TABLE outbox ADD COLUMN held BIGINT NOT NULL DEFAULT 0")
        },
    },
    Migration {
        version: 4,
        name: "farm members",
        // Each member's beat: the farm's view, and its rates shared among
        // the live members.
        apply: |c| c.batch(rs_store::members::TABLE),
    },
    Migration {
        version: 5,
        name: "API tokens and portal sessions",
        // Admins without a client certificate: API tokens (only their
        // SHA-256 is kept) and the web portal's sessions (the same: the
        // cookie's hash). A session made with a token lives no longer
        // than the token (store/admins.rs joins them at every request).
        apply: |c| c.batch(ADMINS),
    },
    Migration {
        version: 6,
        name: "rollouts",
        // A control action sent wave by wave (rollouts.rs): the request,
        // its state and current wave, each wave's destinations and job.
        apply: |c| c.batch(ROLLOUTS),
    },
];

/// Version 5: API tokens and portal sessions (store/admins.rs), the same
/// on both engines.
const ADMINS: &str = "
CREATE TABLE admin_tokens (
    name       TEXT   PRIMARY KEY,
    hash       TEXT   NOT NULL UNIQUE,
    customers  TEXT   NOT NULL,
    created    BIGINT NOT NULL,
    created_by TEXT   NOT NULL,
    expires    BIGINT NOT NULL,
    revoked    BIGINT
);
CREATE TABLE portal_sessions (
    hash      TEXT   PRIMARY KEY,
    admin     TEXT   NOT NULL,
    customers TEXT   NOT NULL,
    token     TEXT,
    csrf      TEXT   NOT NULL,
    created   BIGINT NOT NULL,
    expires   BIGINT NOT NULL
);
";

/// Version 6: rollouts and their waves (store/rollouts.rs), the same on
/// both engines.
const ROLLOUTS: &str = "
CREATE TABLE rollouts (
    id           TEXT   PRIMARY KEY,
    name         TEXT   NOT NULL,
    action       TEXT   NOT NULL,
    request      TEXT   NOT NULL,
    created_by   TEXT   NOT NULL,
    state        TEXT   NOT NULL,
    wave         BIGINT NOT NULL,
    reason       TEXT,
    created      BIGINT NOT NULL,
    updated      BIGINT NOT NULL
);
CREATE INDEX rollouts_state ON rollouts (state);
CREATE TABLE rollout_waves (
    rollout TEXT   NOT NULL,
    n       BIGINT NOT NULL,
    members TEXT   NOT NULL,
    job     TEXT,
    started BIGINT,
    PRIMARY KEY (rollout, n)
);
";

fn baseline(c: &mut Conn) -> Result<(), DbError> {
    match c.engine() {
        Engine::Sqlite => sqlite_baseline(c),
        Engine::Postgres => c.batch(POSTGRES),
    }?;
    // The collector's expander starts after what is stored already (a
    // database from before it had its tasks made at ingest).
    c.exec(
        "INSERT INTO cursors (name, seq) SELECT 'expander', COALESCE(MAX(seq), 0) FROM messages
         WHERE true ON CONFLICT (name) DO NOTHING",
        params![],
    )?;
    Ok(())
}

/// The current schema, and what databases of releases before versions
/// lack of it.
fn sqlite_baseline(c: &mut Conn) -> Result<(), DbError> {
    c.batch(SQLITE_MESSAGES)?;
    c.batch(SQLITE_TABLES)?;
    c.batch(SQLITE_SECURITY)?;
    // Subscriptions take messages stored after they were made
    // (`from_seq`); databases from before the column get it.
    if !c.exists(
        "SELECT 1 FROM pragma_table_info('subscriptions') WHERE name = 'from_seq'",
        params![],
    )? {
        c.batch("ALTER TABLE subscriptions ADD COLUMN from_seq INTEGER NOT NULL DEFAULT 0")?;
    }
    // How a message came sealed; databases from before seals get it.
    if !c.exists(
        "SELECT 1 FROM pragma_table_info('messages') WHERE name = 'seal'",
        params![],
    )? {
        c.batch("ALTER TABLE messages ADD COLUMN seal TEXT")?;
    }
    migrate_message_seq(c)?;
    c.batch(SQLITE_MESSAGE_INDEXES)
}

/// SQLite: the tables beside the messages.
const SQLITE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS components (
    id         TEXT    PRIMARY KEY,
    kind       TEXT    NOT NULL,
    customer   TEXT    NOT NULL,
    version    TEXT,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    via        TEXT    NOT NULL,
    state      TEXT,
    status     BLOB,
    status_at  INTEGER
);
CREATE TABLE IF NOT EXISTS outbox (
    id           TEXT    NOT NULL,
    hop          TEXT    NOT NULL,
    created      INTEGER NOT NULL,
    expiry       INTEGER,
    offered      INTEGER,
    kind         TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content      BLOB    NOT NULL,
    PRIMARY KEY (id, hop)
);
CREATE INDEX IF NOT EXISTS outbox_hop ON outbox (hop, created);
CREATE TABLE IF NOT EXISTS jobs (
    id       TEXT    PRIMARY KEY,
    created  INTEGER NOT NULL,
    action   TEXT    NOT NULL,
    message  TEXT    NOT NULL UNIQUE,
    expiry   INTEGER,
    version  INTEGER NOT NULL DEFAULT 0,
    notify   TEXT,
    notified INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expiry);
CREATE TABLE IF NOT EXISTS groups (
    name     TEXT    PRIMARY KEY,
    customer TEXT,
    kind     TEXT,
    tag      TEXT,
    updated  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    grp       TEXT NOT NULL,
    component TEXT NOT NULL,
    PRIMARY KEY (grp, component)
);
CREATE TABLE IF NOT EXISTS component_tags (
    component TEXT NOT NULL,
    tag       TEXT NOT NULL,
    PRIMARY KEY (component, tag)
);
CREATE INDEX IF NOT EXISTS component_tags_tag ON component_tags (tag);
CREATE TABLE IF NOT EXISTS job_targets (
    job     TEXT    NOT NULL,
    dest    TEXT    NOT NULL,
    state   TEXT    NOT NULL,
    updated INTEGER NOT NULL,
    code    TEXT,
    text    TEXT,
    result  TEXT,
    PRIMARY KEY (job, dest)
);
CREATE TABLE IF NOT EXISTS subscriptions (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    class        TEXT,
    subclass     TEXT,
    customer     TEXT,
    source       TEXT,
    type         TEXT,
    min_severity INTEGER,
    delivery     TEXT    NOT NULL,
    url          TEXT,
    created      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id         INTEGER PRIMARY KEY,
    sub        INTEGER NOT NULL,
    message    TEXT    NOT NULL,
    state      TEXT    NOT NULL DEFAULT 'ready',
    attempts   INTEGER NOT NULL DEFAULT 0,
    visible_at INTEGER NOT NULL,
    taken_by   TEXT,
    last_error TEXT,
    created    INTEGER NOT NULL,
    done_at    INTEGER,
    UNIQUE (sub, message)
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (state, visible_at);
CREATE INDEX IF NOT EXISTS tasks_sub   ON tasks (sub, state, id);
-- Each subscription's unfinished tasks in order: its head (the only one a
-- processor may claim) is one index probe away, however long the backlog.
CREATE INDEX IF NOT EXISTS tasks_open  ON tasks (sub, id) WHERE state IN ('ready', 'taken');
CREATE TABLE IF NOT EXISTS health (
    component TEXT    PRIMARY KEY,
    state     TEXT    NOT NULL,
    since     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    digest    TEXT    PRIMARY KEY,
    request   TEXT    NOT NULL UNIQUE,
    component TEXT    NOT NULL,
    customer  TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    size      INTEGER NOT NULL,
    sha256    TEXT    NOT NULL,
    class     TEXT    NOT NULL,
    subclass  TEXT    NOT NULL,
    granted   INTEGER NOT NULL,
    expires   INTEGER NOT NULL,
    state     TEXT    NOT NULL DEFAULT 'open',
    done_at   INTEGER,
    reason    TEXT
);
CREATE INDEX IF NOT EXISTS uploads_open ON uploads (state, expires);
CREATE TABLE IF NOT EXISTS files (
    sha256  TEXT    PRIMARY KEY,
    name    TEXT    NOT NULL,
    size    INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS offers (
    digest         TEXT    PRIMARY KEY,
    sha256         TEXT    NOT NULL,
    job            TEXT    NOT NULL,
    message        TEXT    NOT NULL,
    expires        INTEGER NOT NULL,
    state          TEXT    NOT NULL DEFAULT 'open',
    created        INTEGER NOT NULL,
    unpublished_at INTEGER
);
CREATE INDEX IF NOT EXISTS offers_open ON offers (state);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT    PRIMARY KEY,
    seq  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// SQLite: the stored messages. `seq` is the storage order (the collector's log
/// and the export cursor), `id` the duplicate check.
const SQLITE_MESSAGES: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    received     INTEGER NOT NULL,
    created      INTEGER NOT NULL,
    component    TEXT    NOT NULL,
    customer     TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    class        TEXT    NOT NULL,
    subclass     TEXT    NOT NULL,
    severity     INTEGER,
    via          TEXT    NOT NULL,
    header       BLOB    NOT NULL,
    content_type TEXT    NOT NULL,
    content      BLOB    NOT NULL,
    seal         TEXT
);
";

const SQLITE_MESSAGE_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS messages_received  ON messages (received);
CREATE INDEX IF NOT EXISTS messages_component ON messages (component, received);
CREATE INDEX IF NOT EXISTS messages_class     ON messages (class, subclass, received);
";

/// The columns of `messages` after `seq`, as both layouts have them.
const MESSAGE_COLUMNS: &str = "id, received, created, component, customer, kind, class, \
     subclass, severity, via, header, content_type, content, seal";

/// Databases written before `messages.seq` existed ordered messages by
/// their rowid, which SQLite reuses once the newest rows are deleted (a
/// retention purge of an idle system): new messages then sorted below
/// the expander's and the export clients' cursors and were skipped. The
/// table is rebuilt with `seq INTEGER PRIMARY KEY AUTOINCREMENT` (never
/// reused: SQLite keeps the highest ever given in `sqlite_sequence`), each
/// message keeping its old rowid as its `seq`, so every cursor handed out
/// stays valid; the sequence starts above every cursor the database
/// itself holds. Inside the migration's transaction: a crash leaves the
/// old table whole.
fn migrate_message_seq(conn: &mut Conn) -> Result<(), DbError> {
    let has = conn.exists(
        "SELECT 1 FROM pragma_table_info('messages') WHERE name = 'seq'",
        params![],
    )?;
    if has {
        return Ok(());
    }
    let n: i64 = conn.one("SELECT COUNT(*) FROM messages", params![], |r| r.get(0))?;
    tracing::info!("appserver.db: giving {n} stored messages a sequence that is never reused");
    let create = SQLITE_MESSAGES.replace("IF NOT EXISTS messages", "messages_seq");
    conn.batch(&format!(
        "{create}
         INSERT INTO messages_seq (seq, {MESSAGE_COLUMNS})
             SELECT rowid, {MESSAGE_COLUMNS} FROM messages ORDER BY rowid;
         DROP TABLE messages;
         ALTER TABLE messages_seq RENAME TO messages;
         INSERT INTO sqlite_sequence (name, seq)
             SELECT 'messages', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'messages');
         UPDATE sqlite_sequence SET seq = MAX(seq,
                 (SELECT COALESCE(MAX(seq), 0) FROM cursors),
                 (SELECT COALESCE(MAX(from_seq), 0) FROM subscriptions))
             WHERE name = 'messages';"
    ))
}

/// The tables of enrollments, admins and the audit log (`security.rs`).
const SQLITE_SECURITY: &str = "
CREATE TABLE IF NOT EXISTS enrollments (
    token_hash TEXT    PRIMARY KEY,
    customer   TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    component  TEXT,
    dns        TEXT    NOT NULL DEFAULT '',
    ips        TEXT    NOT NULL DEFAULT '',
    created    INTEGER NOT NULL,
    created_by TEXT    NOT NULL,
    expires    INTEGER NOT NULL,
    used_at    INTEGER,
    issued     TEXT,
    serial     TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq    INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,
    admin  TEXT    NOT NULL,
    peer   TEXT    NOT NULL,
    method TEXT    NOT NULL,
    path   TEXT    NOT NULL,
    status INTEGER NOT NULL,
    millis INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_admin ON audit (admin, seq);
";

/// PostgreSQL: the same tables. `messages.seq` and the other generated IDs
/// are identity columns (a sequence each: never reused, even after a
/// purge).
const POSTGRES: &str = "
CREATE TABLE messages (
    seq          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id           TEXT   NOT NULL UNIQUE,
    received     BIGINT NOT NULL,
    created      BIGINT NOT NULL,
    component    TEXT   NOT NULL,
    customer     TEXT   NOT NULL,
    kind         TEXT   NOT NULL,
    class        TEXT   NOT NULL,
    subclass     TEXT   NOT NULL,
    severity     BIGINT,
    via          TEXT   NOT NULL,
    header       BYTEA  NOT NULL,
    content_type TEXT   NOT NULL,
    content      BYTEA  NOT NULL,
    seal         TEXT
);
CREATE INDEX messages_received  ON messages (received);
CREATE INDEX messages_component ON messages (component, received);
CREATE INDEX messages_class     ON messages (class, subclass, received);
CREATE TABLE components (
    id         TEXT   PRIMARY KEY,
    kind       TEXT   NOT NULL,
    customer   TEXT   NOT NULL,
    version    TEXT,
    first_seen BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    via        TEXT   NOT NULL,
    state      TEXT,
    status     BYTEA,
    status_at  BIGINT
);
CREATE TABLE outbox (
    id           TEXT   NOT NULL,
    hop          TEXT   NOT NULL,
    created      BIGINT NOT NULL,
    expiry       BIGINT,
    offered      BIGINT,
    kind         TEXT   NOT NULL,
    content_type TEXT   NOT NULL,
    header       BYTEA  NOT NULL,
    content      BYTEA  NOT NULL,
    PRIMARY KEY (id, hop)
);
CREATE INDEX outbox_hop ON outbox (hop, created);
CREATE TABLE jobs (
    id       TEXT   PRIMARY KEY,
    created  BIGINT NOT NULL,
    action   TEXT   NOT NULL,
    message  TEXT   NOT NULL UNIQUE,
    expiry   BIGINT,
    version  BIGINT NOT NULL DEFAULT 0,
    notify   TEXT,
    notified BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_expiry ON jobs (expiry);
CREATE TABLE groups (
    name     TEXT   PRIMARY KEY,
    customer TEXT,
    kind     TEXT,
    tag      TEXT,
    updated  BIGINT NOT NULL
);
CREATE TABLE group_members (
    grp       TEXT NOT NULL,
    component TEXT NOT NULL,
    PRIMARY KEY (grp, component)
);
CREATE TABLE component_tags (
    component TEXT NOT NULL,
    tag       TEXT NOT NULL,
    PRIMARY KEY (component, tag)
);
CREATE INDEX component_tags_tag ON component_tags (tag);
CREATE TABLE job_targets (
    job     TEXT   NOT NULL,
    dest    TEXT   NOT NULL,
    state   TEXT   NOT NULL,
    updated BIGINT NOT NULL,
    code    TEXT,
    text    TEXT,
    result  TEXT,
    PRIMARY KEY (job, dest)
);
CREATE TABLE subscriptions (
    id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name         TEXT   NOT NULL UNIQUE,
    class        TEXT,
    subclass     TEXT,
    customer     TEXT,
    source       TEXT,
    type         TEXT,
    min_severity BIGINT,
    delivery     TEXT   NOT NULL,
    url          TEXT,
    created      BIGINT NOT NULL,
    from_seq     BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE tasks (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    sub        BIGINT NOT NULL,
    message    TEXT   NOT NULL,
    state      TEXT   NOT NULL DEFAULT 'ready',
    attempts   BIGINT NOT NULL DEFAULT 0,
    visible_at BIGINT NOT NULL,
    taken_by   TEXT,
    last_error TEXT,
    created    BIGINT NOT NULL,
    done_at    BIGINT,
    UNIQUE (sub, message)
);
CREATE INDEX tasks_ready ON tasks (state, visible_at);
CREATE INDEX tasks_sub   ON tasks (sub, state, id);
CREATE INDEX tasks_open  ON tasks (sub, id) WHERE state IN ('ready', 'taken');
CREATE TABLE health (
    component TEXT   PRIMARY KEY,
    state     TEXT   NOT NULL,
    since     BIGINT NOT NULL
);
CREATE TABLE settings (
    name  TEXT  PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE uploads (
    digest    TEXT   PRIMARY KEY,
    request   TEXT   NOT NULL UNIQUE,
    component TEXT   NOT NULL,
    customer  TEXT   NOT NULL,
    name      TEXT   NOT NULL,
    size      BIGINT NOT NULL,
    sha256    TEXT   NOT NULL,
    class     TEXT   NOT NULL,
    subclass  TEXT   NOT NULL,
    granted   BIGINT NOT NULL,
    expires   BIGINT NOT NULL,
    state     TEXT   NOT NULL DEFAULT 'open',
    done_at   BIGINT,
    reason    TEXT
);
CREATE INDEX uploads_open ON uploads (state, expires);
CREATE TABLE files (
    sha256  TEXT   PRIMARY KEY,
    name    TEXT   NOT NULL,
    size    BIGINT NOT NULL,
    created BIGINT NOT NULL
);
CREATE TABLE offers (
    digest         TEXT   PRIMARY KEY,
    sha256         TEXT   NOT NULL,
    job            TEXT   NOT NULL,
    message        TEXT   NOT NULL,
    expires        BIGINT NOT NULL,
    state          TEXT   NOT NULL DEFAULT 'open',
    created        BIGINT NOT NULL,
    unpublished_at BIGINT
);
CREATE INDEX offers_open ON offers (state);
CREATE TABLE cursors (
    name TEXT   PRIMARY KEY,
    seq  BIGINT NOT NULL
);
CREATE TABLE counters (
    name  TEXT   PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE enrollments (
    token_hash TEXT   PRIMARY KEY,
    customer   TEXT   NOT NULL,
    kind       TEXT   NOT NULL,
    component  TEXT,
    dns        TEXT   NOT NULL DEFAULT '',
    ips        TEXT   NOT NULL DEFAULT '',
    created    BIGINT NOT NULL,
    created_by TEXT   NOT NULL,
    expires    BIGINT NOT NULL,
    used_at    BIGINT,
    issued     TEXT,
    serial     TEXT
);
CREATE TABLE audit (
    seq    BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at     BIGINT NOT NULL,
    admin  TEXT   NOT NULL,
    peer   TEXT   NOT NULL,
    method TEXT   NOT NULL,
    path   TEXT   NOT NULL,
    status BIGINT NOT NULL,
    millis BIGINT NOT NULL
);
CREATE INDEX audit_admin ON audit (admin, seq);
";
