//! Opening the SQLite database with the settings keycast depends on.
//!
//! Every pooled connection runs with:
//! - `journal_mode=WAL`: readers never block the writer, and committed pages land in the
//!   `-wal` file where the replicator reads them;
//! - `wal_autocheckpoint=0`: the application never checkpoints; only the replicator does,
//!   and only over frames already in the object store (otherwise frames could be folded
//!   into the database file before they were shipped);
//! - `synchronous=NORMAL`: in WAL mode a crash or power loss can drop the last commits
//!   from the local disk but never corrupts the database. keycast's durability boundary is
//!   the replica, not the local disk (on Cloud Run that disk is memory and is wiped on every
//!   deploy), so an fsync per commit would cost throughput and buy nothing;
//! - `busy_timeout` and `foreign_keys=ON`. With replication on, the busy timeout is kept by
//!   keycast's own busy handler (`capture::install_busy_handler`), which retries a locked
//!   database within a millisecond instead of backing off to 100 ms.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keycast_replica::CommitSignal;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

/// How long a connection waits on a locked database before failing (milliseconds).
pub const DEFAULT_BUSY_TIMEOUT_MS: u64 = 5_000;
/// Upper bound on pooled connections. SQLite has one writer at a time; a few readers suffice.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// How long a request waits for a free pooled connection (milliseconds).
pub const DEFAULT_ACQUIRE_TIMEOUT_MS: u64 = 5_000;

/// Options for [`Db::open_sqlite`].
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// Path of the SQLite database file; created if missing.
    pub path: PathBuf,
    /// Maximum pooled connections. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: u32,
    /// Busy timeout per connection. Default [`DEFAULT_BUSY_TIMEOUT_MS`].
    pub busy_timeout: Duration,
    /// Wait for a pooled connection. Default [`DEFAULT_ACQUIRE_TIMEOUT_MS`].
    pub acquire_timeout: Duration,
    /// When set, every connection gets a WAL commit hook that reports to this signal, which
    /// the replicator waits on. Default none (no replication).
    pub commit_signal: Option<Arc<CommitSignal>>,
}

impl DbOptions {
    /// Defaults for a database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            busy_timeout: Duration::from_millis(DEFAULT_BUSY_TIMEOUT_MS),
            acquire_timeout: Duration::from_millis(DEFAULT_ACQUIRE_TIMEOUT_MS),
            commit_signal: None,
        }
    }
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}

/// A handle on keycast's database: a connection pool, cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: SqlitePool,
    path: PathBuf,
}

impl Db {
    /// Opens (creating if missing) the SQLite database and applies pending migrations.
    ///
    /// # Errors
    /// [`OpenError::Open`] if the file cannot be opened as a database;
    /// [`OpenError::Migrate`] if migrations fail or the schema is newer than this binary.
    pub async fn open_sqlite(options: &DbOptions) -> Result<Db, OpenError> {
        let pool = connect(options).await.map_err(|source| OpenError::Open {
            path: options.path.clone(),
            source,
        })?;
        crate::migrate::run(&pool).await?;
        Ok(Db {
            pool,
            path: options.path.clone(),
        })
    }

    /// The connection pool, for repositories.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a trivial query: the readiness probe's proof that the database answers.
    ///
    /// # Errors
    /// Whatever the pool or SQLite returned.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// Pool statistics for metrics: (open connections, idle connections).
    pub fn pool_stats(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    /// Waits for in-use connections to return, then closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn connect(options: &DbOptions) -> Result<SqlitePool, sqlx::Error> {
    let connect = SqliteConnectOptions::new()
        .filename(&options.path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(options.busy_timeout)
        .foreign_keys(true)
        .pragma("wal_autocheckpoint", "0");
    let mut pool = SqlitePoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout);
    if let Some(signal) = options.commit_signal.clone() {
        let busy_timeout = options.busy_timeout;
        pool = pool.after_connect(move |conn, _meta| {
            let signal = signal.clone();
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                // SAFETY: the handle is a live connection owned by the pool; the hook and
                // the busy handler live as long as the connection does.
                unsafe {
                    keycast_replica::capture::install_wal_hook(handle.as_raw_handle(), &signal);
                    // The replicator's checkpoints take the write lock for milliseconds:
                    // retry promptly instead of SQLite's back-off (same timeout).
                    keycast_replica::capture::install_busy_handler(handle.as_raw_handle(), busy_timeout);
                }
                Ok(())
            })
        });
    }
    pool.connect_with(connect).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_run_in_wal_mode_without_autocheckpoint() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(db.pool())
            .await
            .unwrap();
        let auto: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(db.pool())
            .await
            .unwrap();
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(db.pool())
            .await
            .unwrap();
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!((mode.as_str(), auto, fk, sync), ("wal", 0, 1, 1));
    }

    #[tokio::test]
    async fn every_commit_reaches_the_commit_signal() {
        let dir = tempfile::tempdir().unwrap();
        let signal = CommitSignal::new();
        let options = DbOptions {
            commit_signal: Some(signal.clone()),
            ..DbOptions::new(dir.path().join("k.db"))
        };
        let db = Db::open_sqlite(&options).await.unwrap();
        let before = signal.commits();
        for i in 0..3 {
            sqlx::query("INSERT INTO keycast_meta (key, value) VALUES ($1, 'v')")
                .bind(format!("k{i}"))
                .execute(db.pool())
                .await
                .unwrap();
        }
        sqlx::query("SELECT COUNT(*) FROM keycast_meta")
            .execute(db.pool())
            .await
            .unwrap();
        assert_eq!(
            signal.commits() - before,
            3,
            "one signal per write transaction, none for reads"
        );
    }
}
