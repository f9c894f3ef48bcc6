//! keycast's storage layer: opening the database, the schema and its migrations, and
//! (as the domain lands) one repository module per table group.
//!
//! # Layout
//! - [`pool`]: opens SQLite with the pragmas the replicator relies on.
//! - [`migrate`]: embedded migrations, and the refusal to run on a schema newer than the binary.
//! - [`meta`]: facts about the database itself (its replication lineage).
//!
//! This crate knows nothing of HTTP, Nostr or object storage. Who checkpoints the WAL is
//! decided here once: **never the application** (`wal_autocheckpoint=0`); the replicator
//! does, after the frames are safe in the object store.

pub mod meta;
pub mod migrate;
pub mod pool;

pub use migrate::MigrateError;
pub use pool::{Db, DbOptions, OpenError};

/// The current time as unix seconds, the one timestamp format stored in every table.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
