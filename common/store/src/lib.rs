//! Storage: the stores the tiers keep on disk, each behind the operations
//! it offers, and the files under them.
//!
//! - [`spool`]: the custody spool of a sender (proxy and MLM), a trait with
//!   its SQLite engine;
//! - [`certs`]: the CA's records of what it issued and revoked;
//! - [`members`]: a farm's members and their beats;
//! - [`queue`]: the back-channel queue's operations, inside the
//!   transactions of the stores that hold one (the MLM's and the server's);
//! - [`outbox`]: the durable back-channel queue of a node, split by next
//!   hop;
//! - [`sql`]: one SQL interface over SQLite and PostgreSQL, with
//!   versioned migrations;
//! - [`db`]: opening a SQLite database with the product's durability
//!   settings, and running its work on a thread of its own;
//! - [`datadir`]: the lock that keeps two daemons off one data directory;
//! - [`files`]: replacing a file atomically.
//!
//! Depends only on `rs-protocol`.

pub mod certs;
pub mod datadir;
pub mod db;
pub mod files;
pub mod members;
pub mod outbox;
pub mod queue;
pub mod spool;
pub mod sql;
