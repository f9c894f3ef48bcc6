//! keycast's storage layer: opening the database, the schema and its migrations, and
//! (as the domain lands) one repository module per table group.
//!
//! # Layout
//! - [`pool`]: [`Db`], the seam between the engines: SQLite (with the pragmas the
//!   replicator relies on) or PostgreSQL.
//! - [`migrate`]: embedded migrations, and the refusal to run on a schema newer than the binary.
//! - [`meta`]: facts about the database itself (its replication lineage).
//! - [`ids`]: typed ids (`UserId`, `KeyId`, `AuthorizationId`, …) and [`TokenHash`].
//! - [`notify`] and [`cluster`]: PostgreSQL only — change notices between instances
//!   (`LISTEN/NOTIFY`), instance membership by heartbeat, NIP-46 request claims.
//! - [`copy`]: `keycast migrate --to`, SQLite to PostgreSQL in one verified transaction.
//! - [`limits`]: rate limits every instance shares (used on PostgreSQL).
//! - [`grant_usage`]: a limited grant's signatures, counted once for every instance (used on
//!   PostgreSQL).
//! - Repositories, one per table group, plain functions over `&Db` (either engine):
//!   [`users`], [`sessions`] (+ single-use mailed tokens), [`keys`] (ciphertext only),
//!   [`policies`], [`authz`] (authorizations), [`oauth`] (codes + access tokens),
//!   [`activity`] (batched), [`account_events`] (exports, resets, take-overs),
//!   [`sealed`] (every ciphertext under the master key, for rotation),
//!   [`refresh`] (rotating refresh tokens), [`clients`] (registered apps),
//!   [`approvals`] (pending approvals, kinds allowed from now on).
//!
//! Repository SQL is portable to PostgreSQL: `$n` placeholders, `RETURNING`, ids and unix
//! timestamps made in Rust, no engine-specific functions. Single-use things (OAuth codes,
//! mailed tokens) are consumed by one conditional `UPDATE … RETURNING`, never a
//! read-then-write. Every repository error is a [`RepoError`].
//!
//! This crate knows nothing of HTTP, Nostr or object storage. Who checkpoints the WAL is
//! decided here once: under a replicator **never the application** (`wal_autocheckpoint=0`);
//! the replicator does, after the frames are safe in the object store. Without one, SQLite's
//! automatic checkpoint (see `pool.rs`).

pub mod account_events;
pub mod activity;
pub mod approvals;
pub mod authz;
pub mod clients;
pub mod cluster;
pub mod copy;
mod error;
pub mod grant_usage;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod meta;
pub mod migrate;
pub mod nip46_seen;
pub mod notify;
pub mod oauth;
pub mod policies;
pub mod pool;
pub mod refresh;
mod returning;
#[cfg(test)]
mod schema_parity;
#[cfg(any(test, feature = "testing"))]
pub mod scratch;
pub mod sealed;
pub mod sessions;
#[cfg(test)]
mod testing;
pub mod users;

pub use error::{RepoError, DISK_FULL_METRIC};
pub use ids::{ActivityId, AuthorizationId, KeyId, PolicyId, TokenHash, UserId};
pub use migrate::MigrateError;
pub use pool::{Db, DbOptions, EngineKind, OpenError, PgOptions};

/// `statement`, failed as [`RepoError::Busy`] (a timed-out I/O error) if it has no answer
/// within `within`: on a connection the network dropped without a word (sqlx sets no TCP
/// keepalive) a statement never answers and never fails, and work that must go on (a
/// heartbeat, a flush) has to give up on it and try again on another.
///
/// # Errors
/// `statement`'s own, or the timeout.
pub async fn within<T>(
    within: std::time::Duration,
    statement: impl std::future::Future<Output = Result<T, RepoError>>,
) -> Result<T, RepoError> {
    tokio::time::timeout(within, statement).await.unwrap_or_else(|_| {
        Err(RepoError::Busy(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} ms", within.as_millis()),
        ))))
    })
}

/// The current time as unix seconds, the one timestamp format stored in every table.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
