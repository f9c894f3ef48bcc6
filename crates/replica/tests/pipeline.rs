//! Several uploads in flight at once (the shipping pipeline) against the replica's ordering
//! guarantee: a commit is acknowledged only once every TXID up to its own is stored, and an
//! object stored ahead of one that never landed (a failed upload, a lost answer, a crash in
//! between) is never restored over the gap it leaves, nor does it stop the next writer.

mod common;

use std::time::{Duration, Instant};

use keycast_replica::bootstrap::{self, Bootstrap};
use keycast_replica::faults::{Action, Faults, Gate, Op, Rule};
use keycast_replica::restore::{restore, Target};
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};

/// Four uploads in flight (the default ships one at a time).
fn pipelined() -> ReplicaOptions {
    ReplicaOptions {
        uploads_in_flight: 4,
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

async fn restored(store: &Store, dir: &std::path::Path, name: &str) -> (u64, Vec<String>) {
    let out = dir.join(name);
    let done = restore(store, &out, Target::Latest, None).await.unwrap();
    let values = common::rows(&out).await.into_iter().map(|(_, v)| v).collect();
    (done.txid, values)
}

/// The upload of TXID n hangs (a stuck request) while later commits keep coming: the uploads
/// of n+1… go out and land beside it. None of those commits may be acknowledged. Then the
/// instance dies with n never stored. A restore must stop at n−1 — every acknowledged write
/// there, nothing from past the gap — and the next writer must continue from n−1 (the objects
/// past the gap were never acknowledged) instead of refusing the replica or colliding with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_upload_inside_a_pipelined_batch_loses_nothing_acknowledged_and_is_never_restored_over() {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let faults = Faults::new();
    let replicator = Replicator::start(&db, store.reopen().with_faults(&faults), signal, "l", pipelined())
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let v = format!("a{i}");
        insert(&pool, &v).await;
        replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
        acknowledged.push(v);
    }

    let stuck = replicator.status().replicated_txid + 1;
    let gate = Gate::new();
    let name = store.ltx_key(0, stuck, stuck).filename().unwrap().to_owned();
    faults.add(Rule::new(Op::Put, Action::Hold(gate.clone())).key(&name));
    insert(&pool, "b0").await;
    tokio::time::timeout(Duration::from_secs(5), gate.reached())
        .await
        .expect("the upload of the next TXID goes out");
    // Later commits, each waited for as durable: with the first one stuck none may succeed,
    // although their own uploads land (checked below).
    let monitor = replicator.monitor();
    let mut past_the_gap = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 1.. {
        insert(&pool, &format!("b{i}")).await;
        let waited = monitor.wait_durable(Duration::from_millis(20)).await;
        assert!(
            waited.is_err(),
            "a commit after a stuck upload was acknowledged: {waited:?}"
        );
        past_the_gap = store
            .list_level(0)
            .await
            .unwrap()
            .iter()
            .filter(|f| f.min_txid > stuck)
            .count();
        if past_the_gap >= 2 || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        past_the_gap >= 2,
        "uploads after the stuck one went out and landed (the pipeline): {past_the_gap}"
    );

    // The instance dies with TXID `stuck` never stored.
    drop(replicator);
    let crashed = common::crash_copy(&db, &dir.path().join("crashed"));
    pool.close().await;
    gate.open();
    faults.clear();

    let (txid, values) = restored(&store, dir.path(), "after-crash.db").await;
    assert_eq!(txid, stuck - 1, "the restore stops before the gap");
    assert_eq!(
        values, acknowledged,
        "every acknowledged write, nothing from past the gap"
    );

    // The next writer: the crashed instance's own disk is behind the replica's objects past
    // the gap but level with its tip; it resumes from there (or restores) and ships on.
    let prepared = bootstrap::prepare(&crashed, &store, None).await.unwrap();
    assert!(
        matches!(prepared, Bootstrap::Resume { .. } | Bootstrap::Restored { .. }),
        "{prepared:?}"
    );
    let next_db = crashed;
    let signal = CommitSignal::new();
    let pool = common::app_pool(&next_db, &signal).await;
    let replicator = Replicator::start(&next_db, store.clone(), signal, "l", pipelined())
        .await
        .unwrap();
    for i in 0..3 {
        let v = format!("c{i}");
        insert(&pool, &v).await;
        replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
        acknowledged.push(v);
    }
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    let (_, values) = restored(&store, dir.path(), "after-restart.db").await;
    for v in &acknowledged {
        assert!(values.contains(v), "{v} was acknowledged and is missing: {values:?}");
    }
}

/// The answer to TXID n's upload is lost (the object landed) while n+1… are in flight: the
/// retry recognises its own object, every commit is acknowledged in order, and the replica
/// restores to the newest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_inside_a_pipelined_batch_is_retried_and_everything_is_acknowledged_in_order() {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let faults = Faults::new();
    let replicator = Replicator::start(&db, store.reopen().with_faults(&faults), signal, "l", pipelined())
        .await
        .unwrap();
    insert(&pool, "first").await;
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    let next = replicator.status().replicated_txid + 1;
    let name = store.ltx_key(0, next, next).filename().unwrap().to_owned();
    faults.add(Rule::new(Op::Put, Action::LoseResponse).key(&name).times(1));
    let mut expected = vec!["first".to_owned()];
    // Unpaced writes, so that several segments are in flight around the lost answer.
    let writes = (0..50).map(|i| format!("w{i}"));
    for v in writes {
        insert(&pool, &v).await;
        expected.push(v);
    }
    replicator.wait_durable(Duration::from_secs(10)).await.unwrap();
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    let (_, values) = restored(&store, dir.path(), "restored.db").await;
    assert_eq!(values, expected);
}
