//! The replicator end to end against a real SQLite database and a real store: commits are
//! shipped, checkpoints and WAL restarts lose nothing, and a restore equals the live data.

mod common;

use std::time::{Duration, Instant};

use keycast_replica::restore::{restore, Target};
use keycast_replica::{ReplicaOptions, Replicator, Store};

fn fast_checkpoints() -> ReplicaOptions {
    ReplicaOptions {
        checkpoint_pages: 8,
        checkpoint_interval: Duration::from_millis(50),
        ..ReplicaOptions::default()
    }
}

async fn insert(pool: &sqlx::SqlitePool, v: &str) {
    sqlx::query("INSERT INTO t (v) VALUES ($1)")
        .bind(v)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn durable_commits_restore_with_identical_content_and_checksum() {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::from_url(&format!("file://{}", dir.path().join("replica").display()), &|_| None)
        .unwrap()
        .unwrap();
    let replicator = Replicator::start(&db, store.clone(), signal.clone(), "lineage-a", fast_checkpoints())
        .await
        .unwrap();
    for i in 0..200 {
        insert(&pool, &format!("row-{i}-{}", "x".repeat(i % 300))).await;
        if i % 50 == 0 {
            replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
        }
    }
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    assert!(
        replicator.status().checkpoints > 0,
        "the small threshold forced checkpoints"
    );
    pool.close().await;
    let txid = replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();

    let out = dir.path().join("restored.db");
    let restored = restore(&store, &out, Target::Latest, None).await.unwrap();
    assert_eq!(restored.txid, txid);
    assert_eq!(common::rows(&out).await, common::rows(&db).await);
    assert_eq!(common::rows(&out).await.len(), 200);
    assert_eq!(common::checksum(&out).await, common::checksum(&db).await);
}

#[tokio::test]
async fn commits_are_grouped_and_idle_costs_no_requests() {
    let (_dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let replicator = Replicator::start(&db, store.clone(), signal.clone(), "l", ReplicaOptions::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move { insert(&pool, &format!("{i}")).await }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    let segments = replicator.status().segments;
    assert!(segments < 100, "100 concurrent commits went into {segments} segments");

    let before = store.request_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.request_count(), before, "no object-store request while idle");
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_foreign_checkpoint_loses_nothing() {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let replicator = Replicator::start(&db, store.clone(), signal.clone(), "l", ReplicaOptions::default())
        .await
        .unwrap();
    insert(&pool, "a").await;
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    // Someone else checkpoints and the next write restarts the WAL behind the replicator's back.
    insert(&pool, "b").await;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&pool)
        .await
        .unwrap();
    insert(&pool, "c").await;
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    let out = dir.path().join("restored.db");
    restore(&store, &out, Target::Latest, None).await.unwrap();
    let values: Vec<String> = common::rows(&out).await.into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, ["a", "b", "c"]);
}
