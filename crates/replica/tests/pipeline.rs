//! Several uploads in flight at once (the shipping pipeline) against the replica's ordering
//! guarantee: a commit is acknowledged only once every TXID up to its own is stored, and an
//! object stored ahead of one that never landed (a failed upload, a lost answer, a crash in
//! between) is never restored over the gap it leaves, nor does it stop the next writer.

mod common;

use std::time::{Duration, Instant};

use keycast_replica::bootstrap::{self, Bootstrap};
use keycast_replica::faults::{Action, Faults, Gate, Op, Rule};
use keycast_replica::restore::{restore, RestoreError, Target};
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
    stuck_upload_with_later_durable_writes(pipelined()).await;
}

/// The same with the default options (one upload in flight): each later commit is waited
/// for as durable, so its segment goes out at once beside the stuck upload rather than after
/// it — and the same guarantees hold for those uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_writes_behind_a_stuck_upload_ship_beside_it_and_none_is_acknowledged_or_restored_over() {
    stuck_upload_with_later_durable_writes(ReplicaOptions::default()).await;
}

async fn stuck_upload_with_later_durable_writes(options: ReplicaOptions) {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let faults = Faults::new();
    let replicator = Replicator::start(&db, store.reopen().with_faults(&faults), signal, "l", options.clone())
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
    let prepared = bootstrap::prepare(&crashed, &store, None, &|| true).await.unwrap();
    assert!(
        matches!(prepared, Bootstrap::Resume { .. } | Bootstrap::Restored { .. }),
        "{prepared:?}"
    );
    let next_db = crashed;
    let signal = CommitSignal::new();
    let pool = common::app_pool(&next_db, &signal).await;
    let replicator = Replicator::start(&next_db, store.clone(), signal, "l", options)
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

/// A replicator with the default options (one upload in flight) over a store that faults can
/// be put on, with one write ("first") already durable; `held` is the next commit's TXID.
struct Started {
    dir: tempfile::TempDir,
    pool: sqlx::SqlitePool,
    store: Store,
    faults: Faults,
    replicator: Replicator,
    held: u64,
}

async fn one_durable_write() -> Started {
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let faults = Faults::new();
    let replicator = Replicator::start(
        &db,
        store.reopen().with_faults(&faults),
        signal,
        "l",
        ReplicaOptions::default(),
    )
    .await
    .unwrap();
    insert(&pool, "first").await;
    replicator.wait_durable(Duration::from_secs(5)).await.unwrap();
    let held = replicator.status().replicated_txid + 1;
    Started {
        dir,
        pool,
        store,
        faults,
        replicator,
        held,
    }
}

/// Commits a durable write while the upload of `held` is held, and waits until its segment is
/// stored beside it; returns the durable wait, which must still be pending.
async fn durable_write_beside(
    pool: &sqlx::SqlitePool,
    replicator: &Replicator,
    store: &Store,
    held: u64,
) -> tokio::task::JoinHandle<Result<u64, keycast_replica::ReplicaError>> {
    insert(pool, "durable").await;
    let monitor = replicator.monitor();
    let waiter = tokio::spawn(async move { monitor.wait_durable(Duration::from_secs(10)).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored_past(store, held).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the durable write's segment did not go out beside the held upload"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    waiter
}

/// Stops writing and replicating, and returns the values a restore of the replica holds.
async fn shut_down_and_restore(
    pool: sqlx::SqlitePool,
    replicator: Replicator,
    store: &Store,
    dir: &tempfile::TempDir,
) -> Vec<String> {
    pool.close().await;
    replicator
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    restored(store, dir.path(), "restored.db").await.1
}

/// The upload objects past `txid` in level 0.
async fn stored_past(store: &Store, txid: u64) -> Vec<u64> {
    let files = store.list_level(0).await.unwrap();
    files.iter().filter(|f| f.min_txid > txid).map(|f| f.min_txid).collect()
}

/// One upload in flight (the default): while an ordinary commit's upload is under way, the
/// commits after it wait for it and go out together in the next upload (fewer PUTs, a smaller
/// bill) — but a commit someone waits for as durable goes out at once beside it, and is
/// acknowledged only once the upload before it has landed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_write_ships_beside_the_upload_in_flight_and_is_acknowledged_after_it() {
    let Started {
        dir,
        pool,
        store,
        faults,
        replicator,
        held,
    } = one_durable_write().await;
    // An ordinary commit (TXID `held`) whose upload is held.
    let gate = Gate::new();
    let name = store.ltx_key(0, held, held).filename().unwrap().to_owned();
    faults.add(Rule::new(Op::Put, Action::Hold(gate.clone())).key(&name));
    insert(&pool, "async").await;
    tokio::time::timeout(Duration::from_secs(5), gate.reached())
        .await
        .expect("the ordinary commit's upload goes out");
    // More ordinary commits wait for it: nothing goes out beside it. (A window, since what is
    // checked is that something does not happen; a second upload would leave at once.)
    insert(&pool, "async 2").await;
    insert(&pool, "async 3").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        stored_past(&store, held).await,
        Vec::<u64>::new(),
        "ordinary commits ship one upload at a time"
    );

    // A durable write: its segment (with the two ordinary commits before it) lands at once.
    let waiter = durable_write_beside(&pool, &replicator, &store, held).await;
    // Its bytes are stored, but the TXID before them is not: no acknowledgement yet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "a durable write was acknowledged before the upload ahead of it landed"
    );
    gate.open();
    let txid = waiter.await.unwrap().expect("acknowledged once both are stored");
    assert!(txid > held, "acknowledged at TXID {txid}, past the held {held}");

    let values = shut_down_and_restore(pool, replicator, &store, &dir).await;
    assert_eq!(values, ["first", "async", "async 2", "async 3", "durable"]);
}

/// A durable write's upload goes out beside a held one and lands, but its answer is lost: the
/// held one lands, the lost one is retried (and recognised as its own bytes), and only then is
/// the durable write acknowledged; the replica restores to the newest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_to_a_durable_write_shipped_beside_the_upload_in_flight_is_retried_before_the_acknowledgement() {
    let Started {
        dir,
        pool,
        store,
        faults,
        replicator,
        held,
    } = one_durable_write().await;
    let key = |txid| store.ltx_key(0, txid, txid).filename().unwrap().to_owned();
    let gate = Gate::new();
    faults.add(Rule::new(Op::Put, Action::Hold(gate.clone())).key(&key(held)).times(1));
    faults.add(Rule::new(Op::Put, Action::LoseResponse).key(&key(held + 1)).times(1));
    insert(&pool, "async").await;
    tokio::time::timeout(Duration::from_secs(5), gate.reached())
        .await
        .expect("the ordinary commit's upload goes out");
    let waiter = durable_write_beside(&pool, &replicator, &store, held).await;
    assert!(!waiter.is_finished(), "acknowledged before the held upload landed");
    gate.open();
    let txid = waiter.await.unwrap().expect("acknowledged after the retry");
    assert!(txid > held, "acknowledged at TXID {txid}, past the held {held}");
    let values = shut_down_and_restore(pool, replicator, &store, &dir).await;
    assert_eq!(values, ["first", "async", "durable"]);
}

/// A replica whose newest object is a stale writer's, stored after another writer's last
/// commit: see [`a_paused_writers_upload_landing_after_a_takeover_is_never_restored_over_the_new_history`].
struct StaleTail {
    dir: tempfile::TempDir,
    store: Store,
    /// Every commit acknowledged, in order.
    acknowledged: Vec<String>,
    /// The last acknowledged TXID (B's); the stale object is at the next.
    tip: u64,
    /// B, still running, with its pool and the faults its store meets.
    b: Option<(Replicator, sqlx::SqlitePool, Faults)>,
    /// Keep the paused writer's requests from ever reaching the store.
    _gates: (Gate, Gate),
}

impl StaleTail {
    /// Stops B cleanly.
    async fn stop_b(&mut self) {
        let (b, pool, _) = self.b.take().expect("B runs");
        pool.close().await;
        b.shutdown(Instant::now() + Duration::from_secs(5)).await.unwrap();
    }
}

fn short_lease() -> keycast_replica::lease::LeaseOptions {
    keycast_replica::lease::LeaseOptions {
        ttl: Duration::from_millis(500),
        wait: Duration::from_secs(3),
        check_interval: Duration::from_millis(100),
    }
}

/// A writer (A) with two uploads in flight (a durable write's segment beside the one before
/// it) is paused past its lease; the next writer (B) restores the replica's state before both
/// and ships one commit of its own, at the first of the two TXIDs, and stops. A's second
/// upload lands after B's takeover, at the TXID after: contiguous, but from the other history.
/// B is left running.
async fn replica_with_a_stale_tail() -> StaleTail {
    use keycast_replica::lease::Lease;
    let lease_options = short_lease();
    let (dir, db, pool, signal) = common::live_db().await;
    let store = Store::in_memory();
    let faults = Faults::new();
    let a_store = store.reopen().with_faults(&faults);
    let lease = Lease::acquire(&a_store, "a", lease_options).await.unwrap();
    let a = Replicator::start_with_lease(&db, a_store, signal, "l", ReplicaOptions::default(), Some(lease))
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..3 {
        let v = format!("a{i}");
        insert(&pool, &v).await;
        a.wait_durable(Duration::from_secs(5)).await.unwrap();
        acknowledged.push(v);
    }

    // A's next upload never lands; a durable write's segment goes out beside it and is held.
    let stuck = a.status().replicated_txid + 1;
    let key = |txid: u64| store.ltx_key(0, txid, txid).filename().unwrap().to_owned();
    let (never, late, pause) = (Gate::new(), Gate::new(), Gate::new());
    faults.add(Rule::new(Op::Put, Action::Hold(never.clone())).key(&key(stuck)));
    faults.add(Rule::new(Op::Put, Action::Hold(late.clone())).key(&key(stuck + 1)));
    insert(&pool, "b0").await;
    tokio::time::timeout(Duration::from_secs(5), never.reached())
        .await
        .expect("the upload of b0 goes out");
    insert(&pool, "b1").await;
    let monitor = a.monitor();
    let waiter = tokio::spawn(async move { monitor.wait_durable(Duration::from_secs(30)).await });
    tokio::time::timeout(Duration::from_secs(5), late.reached())
        .await
        .expect("the upload of b1 goes out beside it");
    // A is paused: nothing else of it reaches the store, and its lease lapses.
    for op in [Op::Put, Op::Get, Op::List, Op::Delete] {
        faults.add(Rule::new(op, Action::Hold(pause.clone())));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // B takes over from the replica as it is (a0..a2) and ships one durable commit.
    let b_db = dir.path().join("b").join("b.db");
    std::fs::create_dir_all(b_db.parent().unwrap()).unwrap();
    let b_faults = Faults::new();
    let b_store = store.reopen().with_faults(&b_faults);
    let lease = Lease::acquire(&b_store, "b", lease_options).await.unwrap();
    bootstrap::prepare(&b_db, &b_store, lease.previous_txid(), &|| lease.is_valid())
        .await
        .unwrap();
    let b_signal = CommitSignal::new();
    let b_pool = common::app_pool(&b_db, &b_signal).await;
    let b = Replicator::start_with_lease(&b_db, b_store, b_signal, "l", ReplicaOptions::default(), Some(lease))
        .await
        .unwrap();
    // A's second upload lands now, at the TXID after the one B is about to use.
    late.open();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stored_past(&store, stuck).await.contains(&(stuck + 1)) {
        assert!(Instant::now() < deadline, "A's held upload landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    insert(&b_pool, "c0").await;
    b.wait_durable(Duration::from_secs(5)).await.unwrap();
    acknowledged.push("c0".to_owned());
    assert_eq!(
        b.status().replicated_txid,
        stuck,
        "B's commit is at the first of the two TXIDs"
    );
    waiter.abort();
    drop(a);
    StaleTail {
        dir,
        store,
        acknowledged,
        tip: stuck,
        b: Some((b, b_pool, b_faults)),
        _gates: (never, pause),
    }
}

/// Starts a writer on `db` as keycast does (lease, start-up, replicator) and makes one
/// durable commit of `value`.
async fn start_and_commit(store: &Store, db: &std::path::Path, owner: &str, value: &str) {
    use keycast_replica::lease::Lease;
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let lease = Lease::acquire(store, owner, short_lease()).await.unwrap();
    bootstrap::prepare(db, store, lease.previous_txid(), &|| lease.is_valid())
        .await
        .unwrap();
    let signal = CommitSignal::new();
    let pool = common::app_pool(db, &signal).await;
    let writer = Replicator::start_with_lease(db, store.clone(), signal, "l", ReplicaOptions::default(), Some(lease))
        .await
        .unwrap();
    insert(&pool, value).await;
    writer.wait_durable(Duration::from_secs(5)).await.unwrap();
    pool.close().await;
    writer.shutdown(Instant::now() + Duration::from_secs(5)).await.unwrap();
}

/// The next restore must stop at B's commit — applying the stale object over it would lose
/// that acknowledged commit and bring back A's unacknowledged ones — and the writer after
/// must ship on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_writers_upload_landing_after_a_takeover_is_never_restored_over_the_new_history() {
    let mut tail = replica_with_a_stale_tail().await;
    tail.stop_b().await;
    let StaleTail {
        dir,
        store,
        mut acknowledged,
        tip,
        b: _,
        _gates: _paused,
    } = tail;
    let (txid, values) = restored(&store, dir.path(), "after-b.db").await;
    assert_eq!(
        values, acknowledged,
        "B's acknowledged commit, nothing of A's unacknowledged ones"
    );
    assert_eq!(txid, tip, "the restore stops before the stale object");
    let past = restore(&store, &dir.path().join("past.db"), Target::Txid(tip + 1), None).await;
    assert!(
        matches!(past, Err(RestoreError::TxidUnreachable { wanted, reached, .. }) if wanted == tip + 1 && reached == tip),
        "the stale object's TXID is not in the replica's history: {past:?}"
    );

    // The writer after B ships on from B's commit.
    start_and_commit(&store, &dir.path().join("d").join("d.db"), "d", "d0").await;
    acknowledged.push("d0".to_owned());
    let (_, values) = restored(&store, dir.path(), "after-d.db").await;
    assert_eq!(values, acknowledged);
}

/// A start-up deletes the stale tail after its restore, by the keys it listed before. A
/// start whose lease could not be renewed during a long restore lapsed meanwhile; another
/// instance took the replica, removed that tail itself and acknowledged a commit at the
/// stale object's key. The first start then deleted that acknowledged commit. It now asks
/// the lease right before deleting, and stops instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_lease_lapsed_during_its_restore_deletes_nothing_another_writer_stored() {
    use keycast_replica::bootstrap::BootstrapError;
    use keycast_replica::lease::{keep_alive_while, Lease};
    let mut tail = replica_with_a_stale_tail().await;
    tail.stop_b().await;
    let StaleTail {
        dir,
        store,
        mut acknowledged,
        tip,
        b: _,
        _gates: _paused,
    } = tail;

    // D takes the lease and restores; the store refuses its lease requests, and the first object of
    // its restore is slow (every other object, the stale one too, is fetched beside it). Whichever
    // object that is: level 0's first file, or a snapshot B may have written after its start.
    let faults = Faults::new();
    let d_store = store.reopen().with_faults(&faults);
    let mut lease = Lease::acquire(&d_store, "d", short_lease()).await.unwrap();
    let clock = lease.clock();
    // (Reads of the lease fail too: a renewal that read it would learn of the takeover below
    // and abandon the start-up, which is as safe but not what this test is about.)
    faults.add(Rule::new(Op::Put, Action::Fail).key("lease"));
    faults.add(Rule::new(Op::Get, Action::Fail).key("lease"));
    let slow = Gate::new();
    faults.add(Rule::new(Op::Get, Action::Hold(slow.clone())).key("ltx/").times(1));
    let d_db = dir.path().join("d").join("d.db");
    std::fs::create_dir_all(d_db.parent().unwrap()).unwrap();
    let d = tokio::spawn({
        let (d_store, d_db) = (d_store.clone(), d_db.clone());
        async move {
            let recorded = lease.previous_txid();
            keep_alive_while(
                &mut lease,
                bootstrap::prepare(&d_db, &d_store, recorded, &|| clock.is_valid()),
            )
            .await
        }
    });
    tokio::time::timeout(Duration::from_secs(5), slow.reached())
        .await
        .expect("D's restore fetches its first object");

    // Meanwhile D's lease lapses; E takes the replica and acknowledges a commit at the stale
    // object's TXID.
    start_and_commit(&store, &dir.path().join("e").join("e.db"), "e", "e0").await;
    acknowledged.push("e0".to_owned());
    assert!(
        stored_past(&store, tip - 1).await.contains(&(tip + 1)),
        "E's commit is at the stale object's key"
    );

    slow.open();
    let outcome = tokio::time::timeout(Duration::from_secs(10), d)
        .await
        .expect("D's start-up ends")
        .unwrap();
    let (_, values) = restored(&store, dir.path(), "after-e.db").await;
    assert_eq!(values, acknowledged, "E's acknowledged commit is still in the replica");
    assert!(
        matches!(outcome, Ok(Err(BootstrapError::LeaseLapsed { .. }))),
        "D stops, saying why: {outcome:?}"
    );
    assert!(!d_db.exists(), "D leaves no half-prepared database to serve");
}

/// A start-up restore that fails after the restored file is complete — here deleting the
/// stale tail fails on the store; a SIGTERM that drops the start-up, a kill or a power cut do
/// the same — left the restored file in place without its replication record, and every
/// later start refused it as a database of unknown origin, until someone removed it by hand.
/// The file now takes the database's name only with its record written, and the next start
/// restores again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_up_restore_that_fails_at_its_end_leaves_nothing_the_next_start_refuses() {
    use keycast_replica::bootstrap::Bootstrap;
    use keycast_replica::lease::Lease;
    let mut tail = replica_with_a_stale_tail().await;
    tail.stop_b().await;
    let (dir, store) = (&tail.dir, tail.store.clone());

    let faults = Faults::new();
    let d_store = store.reopen().with_faults(&faults);
    faults.add(Rule::new(Op::Delete, Action::Fail));
    let d_db = dir.path().join("d").join("d.db");
    std::fs::create_dir_all(d_db.parent().unwrap()).unwrap();
    let lease = Lease::acquire(&d_store, "d", short_lease()).await.unwrap();
    let failed = bootstrap::prepare(&d_db, &d_store, lease.previous_txid(), &|| lease.is_valid()).await;
    assert!(failed.is_err(), "the stale tail's deletion failed: {failed:?}");
    assert!(
        !d_db.exists(),
        "a restore without its record is left at the database's name"
    );

    faults.clear();
    let again = bootstrap::prepare(&d_db, &d_store, lease.previous_txid(), &|| lease.is_valid()).await;
    assert!(
        matches!(again, Ok(Bootstrap::Restored { .. })),
        "the next start restores: {again:?}"
    );
    assert!(d_db.exists());
    let leftovers: Vec<_> = std::fs::read_dir(d_db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("restore"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// B's next commit meets the stale object at its TXID, which it replaces (deleting it first:
/// see `Worker::resolve_collision`). The answer to B's upload comes late — B was paused — and
/// B's lease lapsed meanwhile, unrenewed, though nobody took it yet and the lease object
/// still names B, as the read before the deletion confirms. B deleted anyway; had another
/// instance taken the replica in the same pause, that key would have held its acknowledged
/// commit. Nothing is deleted now until the lease is valid by the clocks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_lease_lapsed_deletes_nothing_from_the_replica() {
    let tail = replica_with_a_stale_tail().await;
    let (store, tip) = (tail.store.clone(), tail.tip);
    let (b, b_pool, b_faults) = tail.b.as_ref().expect("B runs");
    let stale = store
        .list_level(0)
        .await
        .unwrap()
        .into_iter()
        .find(|f| f.min_txid == tip + 1)
        .expect("the stale object");
    let stale_bytes = store.get(&stale).await.unwrap();
    let answer = Gate::new();
    let key = stale.key.filename().unwrap().to_owned();
    b_faults.add(
        Rule::new(Op::Put, Action::HoldAnswer(answer.clone()))
            .key(&key)
            .times(1),
    );
    insert(b_pool, "c1").await;
    tokio::time::timeout(Duration::from_secs(5), answer.reached())
        .await
        .expect("B's upload of c1 meets the stale object");
    // B cannot renew its lease while it waits, and it lapses.
    b_faults.add(Rule::new(Op::Put, Action::Fail).key("lease"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    answer.open();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.status().last_error.is_none() {
        assert!(Instant::now() < deadline, "B stops shipping for want of a lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = store.get(&stale).await.ok();
    assert!(
        still.as_deref() == Some(&stale_bytes[..]),
        "B, its lease lapsed, deleted nothing: {:?}",
        b.status().last_error
    );
}

/// B's next commit meets the stale object at its TXID while a starting instance (C) asks for
/// the replica: the hand-over ships B's last commit, replacing the stale object on the way.
/// The first version of the lease check before deletions took the hand-over under way for a
/// lease no longer valid, and the hand-over could not ship it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_replaces_a_stale_object_in_the_way_of_its_last_commits() {
    use keycast_replica::lease::{holder, Lease, LeaseOptions};
    let tail = replica_with_a_stale_tail().await;
    let (store, mut acknowledged, tip) = (tail.store.clone(), tail.acknowledged.clone(), tail.tip);
    let (b, b_pool, b_faults) = tail.b.as_ref().expect("B runs");
    // B's upload of its next commit waits until C has asked for the replica.
    let held = Gate::new();
    let key = store.ltx_key(0, tip + 1, tip + 1).filename().unwrap().to_owned();
    b_faults.add(Rule::new(Op::Put, Action::Hold(held.clone())).key(&key).times(1));
    insert(b_pool, "c1").await;
    let monitor = b.monitor();
    let durable = tokio::spawn(async move { monitor.wait_durable(Duration::from_secs(20)).await });
    tokio::time::timeout(Duration::from_secs(5), held.reached())
        .await
        .expect("B's upload of c1 goes out");
    let asking = tokio::spawn({
        let store = store.clone();
        async move {
            let options = LeaseOptions {
                wait: Duration::from_secs(15),
                ..short_lease()
            };
            Lease::acquire(&store, "c", options).await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while holder(&store)
        .await
        .unwrap()
        .and_then(|h| h.handover_requested_by)
        .is_none()
    {
        assert!(Instant::now() < deadline, "C asks for the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    held.open();
    durable
        .await
        .unwrap()
        .expect("c1 ships: the hand-over replaced the stale object");
    acknowledged.push("c1".into());
    let lease = tokio::time::timeout(Duration::from_secs(20), asking)
        .await
        .expect("C gets the replica")
        .unwrap()
        .expect("B handed over");
    let c_db = tail.dir.path().join("c").join("c.db");
    std::fs::create_dir_all(c_db.parent().unwrap()).unwrap();
    bootstrap::prepare(&c_db, &store, lease.previous_txid(), &|| lease.is_valid())
        .await
        .unwrap();
    let values: Vec<String> = common::rows(&c_db).await.into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, acknowledged);
}
