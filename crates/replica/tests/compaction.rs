//! Compaction runs beside shipping (issue 11): a slow or stuck compaction never holds up
//! uploads nor the durable commits waiting on them, and since compaction deletes objects it
//! never deletes anything once another instance may write — not after a hand-over released
//! the lease, not after a paused process resumes into a lease that ran out meanwhile.

mod common;

use std::time::{Duration, Instant};

use keycast_replica::compactor::CompactionPolicy;
use keycast_replica::crypt::ObjectCipher;
use keycast_replica::faults::{Action, Faults, Gate, Op, Rule};
use keycast_replica::lease::{Lease, LeaseOptions};
use keycast_replica::restore::{restore, Target};
use keycast_replica::{ReplicaOptions, Replicator, Store};

async fn insert(pool: &sqlx::SqlitePool, v: &str) {
    sqlx::query("INSERT INTO t (v) VALUES ($1)")
        .bind(v)
        .execute(pool)
        .await
        .unwrap();
}

/// Level 1 every 100 ms, and level-0 files deletable as soon as level 1 covers them, so that
/// every compaction run reaches retention's deletions.
fn eager_compaction() -> ReplicaOptions {
    ReplicaOptions {
        compaction: CompactionPolicy {
            levels: vec![Duration::from_millis(100)],
            l0_retention: Duration::ZERO,
            ..CompactionPolicy::default()
        },
        ..ReplicaOptions::default()
    }
}

/// An in-memory replica seen two ways: `base` as it is, and the returned store through the
/// returned faults (as the replicator sees it).
fn faulty_memory_store() -> (Store, Faults, Store) {
    let base = Store::in_memory();
    let faults = Faults::new();
    let store = base.reopen().with_faults(&faults);
    (base, faults, store)
}

async fn level0(store: &Store) -> Vec<u64> {
    store.list_level(0).await.unwrap().iter().map(|f| f.max_txid).collect()
}

/// A store that never answers compaction's upload: durable commits still complete
/// within their usual time, because compaction is not in the shipping path. (With
/// compaction inline in the shipping round, every commit after it waited for it.)
#[tokio::test]
async fn a_stuck_compaction_never_holds_up_durable_commits() {
    let (_dir, db, pool, signal) = common::live_db().await;
    let (_base, faults, store) = faulty_memory_store();
    let replicator = Replicator::start(&db, store.clone(), signal, "l", eager_compaction())
        .await
        .unwrap();
    // Compaction's upload of its level-1 file sticks.
    let stuck = Gate::new();
    faults.add(Rule::new(Op::Put, Action::Hold(stuck.clone())).key("ltx/1/"));
    insert(&pool, "first").await;
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stuck.reached())
        .await
        .expect("compaction started and is stuck on the store");
    for i in 0..5 {
        insert(&pool, &format!("v{i}")).await;
        // Within 2 s, or the wait fails: a stuck compaction would hold it for good.
        replicator
            .wait_durable(Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("durable commit {i} while compaction is stuck: {e}"));
    }
    stuck.open();
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
}

/// A hand-over while compaction is about to delete: the compaction is stopped (aborted and
/// awaited) before the lease is released, so the newcomer — which restores right after —
/// finds every object the old writer's listing said was there, even once the old writer's
/// held deletion would have gone through.
#[tokio::test]
async fn a_hand_over_stops_compaction_before_the_lease_is_released() {
    let (dir, db, pool, signal) = common::live_db().await;
    let (base, faults, store) = faulty_memory_store();
    let deleting = Gate::new();
    faults.add(Rule::new(Op::Delete, Action::Hold(deleting.clone())).key("ltx/0"));
    let options = LeaseOptions {
        ttl: Duration::from_secs(10),
        wait: Duration::from_secs(20),
        ..LeaseOptions::default()
    };
    let lease = Lease::acquire(&store, "a", options).await.unwrap();
    let replicator = Replicator::start_with_lease(&db, store.clone(), signal, "l", eager_compaction(), Some(lease))
        .await
        .unwrap();
    for i in 0..4 {
        insert(&pool, &format!("v{i}")).await;
        replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), deleting.reached())
        .await
        .expect("retention reached its deletion");
    let before = level0(&base).await;
    assert!(before.len() >= 2, "level 0 holds files to delete: {before:?}");

    // A newcomer asks for the replica and gets it.
    let newcomer = tokio::time::timeout(Duration::from_secs(15), Lease::acquire(&base, "b", options))
        .await
        .expect("the holder hands over although its compaction is stuck")
        .unwrap();
    // The old writer's deletion, had it still been waiting, goes through now.
    deleting.open();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        level0(&base).await,
        before,
        "nothing was deleted after the lease was released"
    );
    let restored = restore(&base, &dir.path().join("b.db"), Target::Latest, None)
        .await
        .unwrap();
    assert_eq!(restored.txid, *before.last().unwrap());
    drop(newcomer);
    pool.close().await;
    let _ = replicator.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// A paused process: its compaction had chosen its inputs when the process stopped, its
/// lease ran out meanwhile and another instance took it. Resumed, the compaction deletes
/// nothing: retention asks whether the lease still holds right before deleting.
#[tokio::test]
async fn a_compaction_resumed_after_its_lease_ran_out_deletes_nothing() {
    let (_dir, db, pool, signal) = common::live_db().await;
    let (base, faults, store) = faulty_memory_store();
    let options = LeaseOptions {
        ttl: Duration::from_secs(2),
        wait: Duration::from_secs(20),
        ..LeaseOptions::default()
    };
    let lease = Lease::acquire(&store, "a", options).await.unwrap();
    let replicator = Replicator::start_with_lease(&db, store.clone(), signal, "l", eager_compaction(), Some(lease))
        .await
        .unwrap();
    // The compaction's upload of its level-1 file, after it chose what to merge and before
    // retention deletes what that file covers, is where the process "pauses"; then so does
    // everything it does with the lease.
    let paused = Gate::new();
    faults.add(Rule::new(Op::Put, Action::Hold(paused.clone())).key("ltx/1/"));
    for i in 0..4 {
        insert(&pool, &format!("v{i}")).await;
        replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), paused.reached())
        .await
        .expect("the process paused");
    faults.add(Rule::new(Op::Get, Action::Hold(paused.clone())).key("lease"));
    faults.add(Rule::new(Op::Put, Action::Hold(paused.clone())).key("lease"));
    let before = level0(&base).await;
    assert!(before.len() >= 2, "level 0 holds files to delete: {before:?}");

    // The lease runs out; another instance takes it.
    let _newcomer = tokio::time::timeout(Duration::from_secs(15), Lease::acquire(&base, "b", options))
        .await
        .expect("the lapsed lease is taken")
        .unwrap();
    paused.open();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(level0(&base).await, before, "the resumed compaction deleted nothing");
    drop(replicator);
    pool.close().await;
}

/// Listings are class-A requests, the bulk of the object-store bill. Once compaction has
/// listed the replica, it works from what this instance stored and deleted: with every
/// listing failing, levels still get compacted and covered level-0 files deleted.
#[tokio::test]
async fn compaction_and_retention_need_no_listing_once_the_replica_is_known() {
    let (_dir, db, pool, signal) = common::live_db().await;
    let (base, faults, store) = faulty_memory_store();
    let first = Replicator::start(&db, store.clone(), signal.clone(), "l", eager_compaction())
        .await
        .unwrap();
    insert(&pool, "first").await;
    first.wait_durable(Duration::from_secs(5)).await.unwrap();
    wait_for_level_one(&base, first.status().replicated_txid).await;
    first.shutdown(Instant::now() + Duration::from_secs(5)).await.unwrap();
    // Restarted on a replica with a level-1 file, whose start-up listing skips what level 1
    // covers: the first compaction lists the replica, once.
    let replicator = Replicator::start(&db, store.clone(), signal, "l", eager_compaction())
        .await
        .unwrap();
    insert(&pool, "second").await;
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    wait_for_level_one(&base, replicator.status().replicated_txid).await;
    faults.add(Rule::new(Op::List, Action::Fail));
    compacts_and_deletes_without_listing(&pool, replicator, &base).await;
}

/// A replica this instance started (or found with nothing above level 0) was listed whole at
/// start-up: compaction and retention never list its levels again. On a store that serves
/// one request at a time, the first compaction's listing of the level-0 files of its interval
/// held the writer's PUTs for 150 ms (replication lag p99 on moto, BENCHMARKS.md).
#[tokio::test]
async fn a_replica_listed_whole_at_start_up_is_compacted_without_any_listing() {
    let (_dir, db, pool, signal) = common::live_db().await;
    let (base, faults, store) = faulty_memory_store();
    let replicator = Replicator::start(&db, store.clone(), signal, "l", eager_compaction())
        .await
        .unwrap();
    faults.add(Rule::new(Op::List, Action::Fail).key("ltx/"));
    compacts_and_deletes_without_listing(&pool, replicator, &base).await;
}

async fn wait_for_level_one(base: &Store, txid: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while base.list_level(1).await.unwrap().iter().map(|f| f.max_txid).max() != Some(txid) {
        assert!(Instant::now() < deadline, "level 1 reaches TXID {txid}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a few durable rows while listings fail, and waits until level 1 reaches the newest
/// TXID and level 0 keeps only its newest file; then shuts the replicator down.
async fn compacts_and_deletes_without_listing(pool: &sqlx::SqlitePool, replicator: Replicator, base: &Store) {
    for i in 0..5 {
        insert(pool, &format!("v{i}")).await;
        replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let newest = replicator.status().replicated_txid;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l1_max = base.list_level(1).await.unwrap().iter().map(|f| f.max_txid).max();
        let l0 = level0(base).await;
        if l1_max == Some(newest) && l0 == vec![newest] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "level 1 reaches TXID {newest} and level 0 keeps only its newest file, without listing: L1 max {l1_max:?}, L0 {l0:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
}

/// Level 1 merges every level-0 file of its interval; fetching them back cost a GET each,
/// and on a store that serves requests one at a time those GETs queued the writer's PUTs
/// (replication lag p99 on moto, BENCHMARKS.md). The writer builds level 1 from the bytes it
/// shipped itself: with every level-0 GET failing, level 1 still reaches the newest TXID, and
/// the replica restores to the live rows.
#[tokio::test]
async fn level_one_is_built_from_what_this_instance_shipped_without_fetching_it_back() {
    level_one_from_shipped_bytes(None).await;
}

/// The same on an encrypted replica: the writer holds the plaintext it sealed as it sent it,
/// and level 1 is sealed in turn — readable with the key, refused without it.
#[tokio::test]
async fn level_one_of_an_encrypted_replica_is_built_from_the_plaintext_shipped_and_sealed() {
    level_one_from_shipped_bytes(Some("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")).await;
}

/// Twenty durable rows with every level-0 GET failing; level 1 must reach the newest TXID,
/// and the replica without its level 0 must restore to the live rows (with `key`, if set).
async fn level_one_from_shipped_bytes(key: Option<&str>) {
    let cipher = || key.map(|k| ObjectCipher::from_base64(k).unwrap());
    let (dir, db, pool, signal) = common::live_db().await;
    let (base, faults, mut store) = faulty_memory_store();
    if let Some(cipher) = cipher() {
        store = store.with_encryption(cipher);
    }
    faults.add(Rule::new(Op::Get, Action::Fail).key("ltx/0/"));
    let replicator = Replicator::start(&db, store.clone(), signal, "l", eager_compaction())
        .await
        .unwrap();
    for i in 0..20 {
        insert(&pool, &format!("v{i}")).await;
        replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    }
    // With no level-0 file fetched.
    wait_for_level_one(&base, replicator.status().replicated_txid).await;
    let live = common::rows(&db).await;
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    // What level 1 holds is what was committed: restored from the levels above 0 alone.
    faults.clear();
    for f in base.list_level(0).await.unwrap() {
        base.delete(&[f]).await.unwrap();
    }
    let restored = dir.path().join("restored.db");
    let reader = match cipher() {
        Some(cipher) => {
            let refused = restore(&base, &dir.path().join("no-key.db"), Target::Latest, None).await;
            assert!(refused.is_err(), "level 1 is sealed: no restore without the key");
            base.reopen().with_encryption(cipher)
        }
        None => base.reopen(),
    };
    restore(&reader, &restored, Target::Latest, None).await.unwrap();
    assert_eq!(common::rows(&restored).await, live);
    assert_eq!(live.len(), 20);
}

/// An instance replaced more often than the snapshot interval (a deploy a day, a restart)
/// timed each snapshot from its own start, so it never wrote one, and then nothing above
/// level 0 ever expired. The schedule follows the newest snapshot in the replica: the second
/// life, finding none, writes one; the lives after it, finding it younger than the interval,
/// write none.
#[tokio::test]
async fn an_instance_restarted_more_often_than_the_snapshot_interval_still_writes_snapshots() {
    let (_dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let options = ReplicaOptions {
        compaction: CompactionPolicy {
            levels: vec![Duration::from_millis(100)],
            snapshot_interval: Duration::from_secs(3600),
            ..CompactionPolicy::default()
        },
        ..ReplicaOptions::default()
    };
    let snapshots = || async { store.list_level(9).await.unwrap().len() };
    for life in 0..4 {
        let replicator = Replicator::start(&db, store.clone(), signal.clone(), "l", options.clone())
            .await
            .unwrap();
        for i in 0..3 {
            insert(&pool, &format!("{life}-{i}")).await;
            replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
        }
        if life == 1 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while snapshots().await == 0 {
                assert!(Instant::now() < deadline, "no snapshot in the second life");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            // Time for a compaction round, which would write one if it were due.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        replicator
            .shutdown(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(snapshots().await, usize::from(life >= 1), "after life {life}");
    }
    pool.close().await;
}

/// A writer whose clock runs behind the time its predecessor's last file was written (here
/// the predecessor's clock ran ten minutes ahead). Stamped from its own clock, its files — and
/// its compactions of the predecessor's — said they were written before that last file, and a
/// `--timestamp` restore to a time in between took commits made after it. Its files are now
/// stamped after the history's newest, and such a restore holds none of them.
#[tokio::test]
async fn a_writer_whose_clock_is_behind_its_predecessors_stamps_its_files_after_them() {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let replicator = Replicator::start(&db, store.clone(), signal.clone(), "l", ReplicaOptions::default())
        .await
        .unwrap();
    insert(&pool, "before").await;
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();

    // The predecessor's newest file, as a clock ten minutes ahead stamped it.
    let newest = store
        .list_level(0)
        .await
        .unwrap()
        .into_iter()
        .max_by_key(|f| f.max_txid)
        .unwrap();
    let bytes = store.get(&newest).await.unwrap();
    // (Whole milliseconds, as stamps are.)
    let ahead_ms = (std::time::SystemTime::now() + Duration::from_secs(600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ahead = std::time::UNIX_EPOCH + Duration::from_millis(ahead_ms);
    store.delete(std::slice::from_ref(&newest)).await.unwrap();
    let _ = store
        .put_ltx(0, newest.min_txid, newest.max_txid, bytes, ahead_ms as i64)
        .await
        .unwrap();

    let replicator = Replicator::start(&db, store.clone(), signal, "l", ReplicaOptions::default())
        .await
        .unwrap();
    for n in 0..3 {
        insert(&pool, &format!("after-{n}")).await;
        replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    }
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    for file in store.list_level(0).await.unwrap() {
        if file.max_txid > newest.max_txid {
            let at = store.created_at(&file).await.unwrap();
            assert!(
                at >= ahead,
                "{} is stamped {at:?}, before its predecessor's {ahead:?}",
                file.key
            );
        }
    }
    // A restore to just before the predecessor's last file holds nothing written after it.
    let out = dir.path().join("as-of.db");
    restore(&store, &out, Target::Time(ahead - Duration::from_secs(1)), None)
        .await
        .unwrap();
    let rows = common::rows(&out).await;
    assert!(rows.iter().all(|(_, v)| !v.starts_with("after-")), "{rows:?}");
    pool.close().await;
}
