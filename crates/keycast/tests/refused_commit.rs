//! A COMMIT the disk refuses leaves keycast's SQLite pool sound, on a real full tmpfs.
//!
//! SQLite rolls a transaction back by itself when its COMMIT fails with `SQLITE_FULL`; sqlx's
//! ROLLBACK after it then fails, and sqlx went on counting that pooled connection as inside a
//! transaction. Its next transaction was a SAVEPOINT, which an error rolled back *to* without
//! ending SQLite's transaction: the write lock stayed held for good (every other write waited
//! out the busy timeout and failed with "database is locked"), and a later transaction on it
//! was answered as committed but never was. Found by `disk_full.rs` against the binary.

mod harness;

use std::path::Path;

use harness::tmpfs::Tmpfs;
use keycast_db::{Db, DbOptions};
use sqlx::Connection as _;

/// Whether another connection (outside the pool) can take the write lock at once.
async fn write_lock_free(path: &Path) -> bool {
    let url = format!("sqlite://{}", path.display());
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("PRAGMA busy_timeout = 0")
        .execute(&mut other)
        .await
        .unwrap();
    let free = sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.is_ok();
    if free {
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    }
    free
}

/// The ids a fresh connection (outside the pool) sees committed.
async fn committed(path: &Path) -> Vec<i64> {
    let url = format!("sqlite://{}", path.display());
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_scalar("SELECT id FROM t WHERE id >= 10000 ORDER BY id")
        .fetch_all(&mut other)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_commit_the_disk_refuses_leaves_no_transaction_behind() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "8m") else {
        return;
    };
    let path = disk.point.join("t.db");
    // As `serve` under a replicator opens it: no automatic checkpoint, so the WAL only grows.
    let options = DbOptions {
        keep_wal_on_close: true,
        ..DbOptions::new(&path)
    };
    let db = Db::open_sqlite(&options).await.unwrap();
    let pool = db.as_sqlite().unwrap().clone();
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        .execute(&pool)
        .await
        .unwrap();
    for i in 0..600 {
        sqlx::query("INSERT INTO t (id, v) VALUES ($1, randomblob(1000))")
            .bind(i)
            .execute(&pool)
            .await
            .unwrap();
    }
    // A checkpointed WAL is reused from its start: the first transactions fit, later ones
    // need the file to grow and their COMMIT is refused.
    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .execute(&pool)
        .await
        .unwrap();
    disk.fill();

    let (mut acknowledged, mut refused_commits) = (Vec::new(), 0);
    for i in 0..400_i64 {
        let attempt = async {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO t (id, v) VALUES ($1, randomblob(1000))")
                .bind(10_000 + i)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM t WHERE id = $1")
                .bind(i % 600)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await;
        match attempt {
            Ok(()) => acknowledged.push(10_000 + i),
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.contains("(code: 13)"),
                    "transaction {i}: only the disk refuses: {message}"
                );
                refused_commits += 1;
            }
        }
        assert!(write_lock_free(&path).await, "transaction {i} left the write lock held");
        if refused_commits >= 30 {
            break;
        }
    }
    assert!(refused_commits >= 30, "the disk refused {refused_commits} transactions");
    assert_eq!(
        committed(&path).await,
        acknowledged,
        "every acknowledged transaction, and only those"
    );

    // Space is back: the pool writes again, and what it acknowledges is committed.
    disk.free();
    for id in [20_000_i64, 20_001] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO t (id) VALUES ($1)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        acknowledged.push(id);
    }
    assert_eq!(committed(&path).await, acknowledged);
    drop(pool);
    drop(db);
}
