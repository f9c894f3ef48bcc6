//! Property: whatever sequence of transactions, checkpoints (ours and foreign ones), VACUUMs
//! and pauses the application produces, restoring the replica yields exactly the live
//! database — same rows, same database checksum.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use keycast_replica::compactor;
use keycast_replica::restore::{restore, Target};
use keycast_replica::{ReplicaOptions, Replicator, Store};
use proptest::prelude::*;
use sqlx::SqlitePool;

#[derive(Debug, Clone)]
enum Op {
    /// Insert rows with payloads of the given sizes, in one transaction.
    Insert(Vec<usize>),
    /// Update every row whose id is ≡ k (mod 7).
    Update(u8),
    /// Delete every row whose id is ≡ k (mod 5).
    Delete(u8),
    /// A checkpoint by someone other than the replicator, which restarts the WAL.
    ForeignCheckpoint,
    /// Rebuild the file (shrinks it: pages past the new size must disappear).
    Vacuum,
    /// Wait until the replica has everything.
    Durable,
    /// Merge level 0 into level 1 and write a snapshot, as the timers would.
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0usize..6000, 1..20).prop_map(Op::Insert),
        1 => (0u8..7).prop_map(Op::Update),
        1 => (0u8..5).prop_map(Op::Delete),
        1 => Just(Op::ForeignCheckpoint),
        1 => Just(Op::Vacuum),
        1 => Just(Op::Durable),
        1 => Just(Op::Compact),
    ]
}

async fn apply(pool: &SqlitePool, db: &Path, store: &Store, replicator: &Replicator, op: &Op) {
    match op {
        Op::Insert(sizes) => {
            let mut tx = pool.begin().await.unwrap();
            for size in sizes {
                sqlx::query("INSERT INTO t (v) VALUES ($1)")
                    .bind("x".repeat(*size))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
        Op::Update(k) => {
            sqlx::query("UPDATE t SET v = v || 'u' WHERE id % 7 = $1")
                .bind(i64::from(*k))
                .execute(pool)
                .await
                .unwrap();
        }
        Op::Delete(k) => {
            sqlx::query("DELETE FROM t WHERE id % 5 = $1")
                .bind(i64::from(*k))
                .execute(pool)
                .await
                .unwrap();
        }
        Op::ForeignCheckpoint => common::foreign_checkpoint(db).await,
        Op::Vacuum => {
            sqlx::query("VACUUM").execute(pool).await.unwrap();
        }
        Op::Durable => {
            replicator.wait_durable(Duration::from_secs(10)).await.unwrap();
        }
        Op::Compact => {
            replicator.wait_durable(Duration::from_secs(10)).await.unwrap();
            compactor::compact_level(store, 1, u64::MAX, &std::env::temp_dir())
                .await
                .unwrap();
            compactor::snapshot(store, u64::MAX, &std::env::temp_dir())
                .await
                .unwrap();
        }
    }
}

/// Rows as (id, payload length): enough to tell histories apart without printing megabytes.
fn digest(rows: Vec<(i64, String)>) -> Vec<(i64, usize)> {
    rows.into_iter().map(|(id, v)| (id, v.len())).collect()
}

async fn run(ops: Vec<Op>) {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let options = ReplicaOptions {
        checkpoint_pages: 16,
        checkpoint_interval: Duration::from_millis(20),
        ..ReplicaOptions::default()
    };
    let replicator = Replicator::start(&db, store.clone(), signal, "prop", options)
        .await
        .unwrap();
    for op in &ops {
        apply(&pool, &db, &store, &replicator, op).await;
    }
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();

    let out = dir.path().join("restored.db");
    restore(&store, &out, Target::Latest, None).await.unwrap();
    let (restored, live) = (digest(common::rows(&out).await), digest(common::rows(&db).await));
    assert_eq!(restored, live, "rows (id, length) differ after {ops:?}");
    assert_eq!(
        common::checksum(&out).await,
        common::checksum(&db).await,
        "checksums differ after {ops:?}"
    );
}

/// Found by the property below: a foreign TRUNCATE checkpoint racing unshipped commits while
/// the replicator waited for the write lock wiped frames before they were shipped. Fixed by
/// never releasing the read snapshot (see `snapshot.rs`).
#[test]
fn foreign_truncate_while_commits_are_unshipped_loses_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("keycast_replica=debug")
        .with_test_writer()
        .try_init();
    use Op::*;
    let ops = vec![
        Insert(vec![
            352, 454, 1997, 4048, 3650, 5863, 1400, 89, 1390, 4171, 2612, 3936, 5908, 3547, 1582, 5115, 5753,
        ]),
        Insert(vec![
            1958, 5547, 849, 987, 522, 1739, 3578, 163, 5055, 5844, 4029, 3359, 3579, 1676, 5625, 3370, 1319,
        ]),
        Compact,
        Compact,
        Insert(vec![1407, 6, 2839, 782, 4433, 4313, 4608, 5019, 4673, 1955]),
        Delete(2),
        Insert(vec![5071]),
        Insert(vec![2845, 105, 1515, 2602, 1981, 261, 4226, 4369, 1604, 1586]),
        Insert(vec![
            1287, 5569, 5749, 4847, 5217, 1948, 4552, 4185, 5689, 2499, 5201, 817, 2823, 1070, 25, 5320,
        ]),
        ForeignCheckpoint,
    ];
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(ops));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn restore_equals_live_after_any_history(ops in prop::collection::vec(op(), 1..25)) {
        let _ = tracing_subscriber::fmt().with_env_filter("keycast_replica=debug").with_test_writer().try_init();
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(run(ops));
    }
}
