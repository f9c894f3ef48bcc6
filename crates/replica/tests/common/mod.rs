//! Shared by the replica crate's integration tests: an application pool wired the way
//! keycast wires it (WAL, no autocheckpoint, commit hook), and content comparison helpers.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keycast_replica::{capture, CommitSignal};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, SqlitePool};

/// An application pool on `path` reporting commits to `signal`.
pub async fn app_pool(path: &Path, signal: &Arc<CommitSignal>) -> SqlitePool {
    let signal = signal.clone();
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .pragma("wal_autocheckpoint", "0");
    SqlitePoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            let signal = signal.clone();
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                unsafe {
                    capture::install_wal_hook(handle.as_raw_handle(), &signal);
                    capture::install_busy_handler(handle.as_raw_handle(), Duration::from_secs(5));
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .unwrap()
}

/// Every row of table `t`, in order, read through a fresh read-only connection.
pub async fn rows(path: &Path) -> Vec<(i64, String)> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    sqlx::query_as("SELECT id, v FROM t ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

/// `PRAGMA integrity_check` of the database at `path`.
pub async fn integrity(path: &Path) -> String {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Requires a peer's environment variable: fails under scripts/test.sh (which provides
/// it), skips loudly elsewhere.
pub fn peer(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("KEYCAST_REQUIRE_PEERS").as_deref() == Ok("1") => {
            panic!("{var} is not set: run the suite through scripts/test.sh, which starts the peer")
        }
        _ => {
            eprintln!("SKIPPED: {var} is not set (run scripts/test.sh to start the peer)");
            None
        }
    }
}

/// A `wal_checkpoint(TRUNCATE)` from another connection, as an operator's `sqlite3` would
/// run it: short busy timeout, result ignored (it may legitimately give up busy).
pub async fn foreign_checkpoint(path: &Path) {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_millis(200));
    let mut conn = options.connect().await.unwrap();
    let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut conn).await;
}

/// An application database `live.db` in a fresh temporary directory, with table `t` created
/// through a pool that reports commits to the returned signal.
pub async fn live_db() -> (tempfile::TempDir, std::path::PathBuf, SqlitePool, Arc<CommitSignal>) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("live.db");
    let signal = CommitSignal::new();
    let pool = app_pool(&db, &signal).await;
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    (dir, db, pool, signal)
}

/// The database checksum of `path` after folding its WAL in, through a fresh connection.
pub async fn checksum(path: &Path) -> u64 {
    let mut conn = SqliteConnectOptions::new().filename(path).connect().await.unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    drop(conn);
    keycast_replica::database_checksum(std::fs::File::open(path).unwrap(), page_size as u32).unwrap()
}

/// What a crash leaves on disk: copies `db`, its WAL and its replication record into `dir`
/// while the process still has the database open (closing the last connection would fold
/// the WAL into the file, which a killed process never does). Returns the copy's path.
pub fn crash_copy(db: &Path, dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let copy = dir.join(db.file_name().unwrap());
    for suffix in ["", "-wal", "-replica.json"] {
        let mut from = db.as_os_str().to_owned();
        from.push(suffix);
        let mut to = copy.as_os_str().to_owned();
        to.push(suffix);
        if Path::new(&from).exists() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    copy
}
