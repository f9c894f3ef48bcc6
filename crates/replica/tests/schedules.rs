//! Randomized schedules (issue 10): histories of two or three instances sharing one replica,
//! with writes, crashes (torn WAL tails included), clean stops, restarts that ask for the
//! lease, paused instances, and store faults (failed requests, lost answers, slow answers).
//! After each history, with every instance crashed:
//! - every write acknowledged as durable is in a restore of the replica;
//! - the replica restores, and passes `integrity_check` (restore checks it);
//! - no background verification ever found the replica differing from a live database.
//!
//! Two instances acknowledging writes at the same time would show here as acknowledged writes
//! missing from the replica: their histories diverge, and only one can be its chain.
//!
//! Each case is generated from a seed (printed on failure). A few cases run in the suite;
//! `scripts/schedules.sh` runs a long campaign. To replay one case:
//! `KEYCAST_SCHEDULE_SEED=<seed> KEYCAST_SCHEDULE_CASES=1 cargo test -p keycast-replica --test schedules`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keycast_replica::bootstrap;
use keycast_replica::compactor::CompactionPolicy;
use keycast_replica::faults::{Action, Faults, Gate, Op, Rule};
use keycast_replica::lease::{Lease, LeaseOptions};
use keycast_replica::replicator::Monitor;
use keycast_replica::restore::{restore, RestoreError, Target};
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};
use sqlx::SqlitePool;

/// A tiny deterministic generator (splitmix64): the whole case follows from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One step of a history.
#[derive(Debug, Clone)]
enum Step {
    /// `count` writes on the `pick`-th running instance (if it accepts them), durable or not.
    Write { pick: usize, count: usize, durable: bool },
    /// The split brain: `at` starts a durable write and is paused (its requests, the upload
    /// included, stop reaching the store) past its lease; `by` starts meanwhile and writes;
    /// then `at` resumes.
    /// With `land_first`, `at`'s stuck upload lands before `by` writes (at the TXID `by`
    /// will use next).
    Takeover { at: usize, by: usize, land_first: bool },
    /// Writes on every running instance at once.
    Race,
    /// SIGKILL-equivalent; with `tear`, the unsynced end of the WAL is torn off too.
    Crash { at: usize, tear: bool },
    /// A clean stop: final sync, lease released.
    Stop { at: usize },
    /// (Re)start: take the lease (asking a live holder to hand over), restore, replicate.
    Start { at: usize },
    /// The instance's requests stop reaching the store for a while (a paused process).
    Pause { at: usize, ms: u64 },
    /// A store fault for the instance's requests.
    Fault { at: usize, fault: StoreFault },
    /// Time passes.
    Sleep { ms: u64 },
}

#[derive(Debug, Clone, Copy)]
enum StoreFault {
    FailNextPut,
    LoseNextPutAnswer,
    LoseNextLeaseAnswer,
    SlowRequests(u64),
    Clear,
}

fn history(rng: &mut Rng, instances: usize) -> Vec<Step> {
    let mut steps = vec![Step::Start { at: 0 }];
    let len = 10 + rng.below(10) as usize;
    for _ in 0..len {
        let at = rng.below(instances as u64) as usize;
        steps.push(match rng.below(22) {
            0..=6 => Step::Write {
                pick: rng.below(3) as usize,
                count: 1 + rng.below(4) as usize,
                durable: rng.below(3) != 0,
            },
            7 => Step::Race,
            20 | 21 => Step::Takeover {
                at,
                by: (at + 1 + rng.below(instances as u64 - 1) as usize) % instances,
                land_first: rng.below(2) == 0,
            },
            8 | 9 => Step::Crash {
                at,
                tear: rng.below(2) == 0,
            },
            10 => Step::Stop { at },
            11..=13 => Step::Start { at },
            14 => Step::Pause {
                at,
                ms: 200 + rng.below(900),
            },
            15 | 16 => Step::Fault {
                at,
                fault: match rng.below(5) {
                    0 => StoreFault::FailNextPut,
                    1 => StoreFault::LoseNextPutAnswer,
                    2 => StoreFault::LoseNextLeaseAnswer,
                    3 => StoreFault::SlowRequests(50 + rng.below(250)),
                    _ => StoreFault::Clear,
                },
            },
            _ => Step::Sleep {
                ms: 100 + rng.below(800),
            },
        });
    }
    steps
}

const TTL: Duration = Duration::from_millis(500);

fn lease_options() -> LeaseOptions {
    LeaseOptions {
        ttl: TTL,
        wait: Duration::from_millis(1500),
        check_interval: Duration::from_millis(100),
    }
}

fn replica_options() -> ReplicaOptions {
    ReplicaOptions {
        checkpoint_pages: 16,
        compaction: CompactionPolicy {
            levels: vec![Duration::from_millis(700)],
            snapshot_interval: Duration::from_secs(2),
            snapshot_retention: Duration::from_secs(3),
            l0_retention: Duration::ZERO,
        },
        verify_interval: Duration::from_millis(1500),
        retry_max: Duration::from_millis(300),
        ..ReplicaOptions::default()
    }
}

struct Running {
    pool: SqlitePool,
    replicator: Replicator,
}

struct Instance {
    db: PathBuf,
    faults: Faults,
    store: Store,
    incarnation: u32,
    running: Option<Running>,
}

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    instances: Vec<Instance>,
    next_key: u64,
    durable: Vec<String>,
    /// Durable acknowledgements that arrived in the background (a paused writer's).
    late_acks: Arc<Mutex<Vec<String>>>,
    /// The writes still under way in the background; they end within their durable wait.
    background: Vec<tokio::task::JoinHandle<()>>,
    log: Vec<String>,
}

/// What a history came to, for the histories whose outcome is known.
struct Outcome {
    /// Durable writes acknowledged, the paused writer's late ones included.
    durable: usize,
    log: Vec<String>,
}

impl World {
    fn new(instances: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::in_memory();
        let instances = (0..instances)
            .map(|i| {
                let faults = Faults::new();
                Instance {
                    db: dir.path().join(format!("i{i}")).join("live.db"),
                    store: store.reopen().with_faults(&faults),
                    faults,
                    incarnation: 0,
                    running: None,
                }
            })
            .collect();
        World {
            _dir: dir,
            store,
            instances,
            next_key: 0,
            durable: Vec::new(),
            late_acks: Arc::default(),
            background: Vec::new(),
            log: Vec::new(),
        }
    }

    async fn apply(&mut self, step: &Step) {
        match *step {
            Step::Write { pick, count, durable } => {
                let running: Vec<usize> = (0..self.instances.len())
                    .filter(|i| self.instances[*i].running.is_some())
                    .collect();
                if let Some(at) = running.get(pick % running.len().max(1)).copied() {
                    for _ in 0..count {
                        self.write(at, durable).await;
                    }
                }
            }
            Step::Takeover { at, by, land_first } => {
                if self.instances[at].running.is_none() {
                    return;
                }
                // First only uploads stop reaching the store, so that a durable write's upload
                // goes out while the lease is fresh and gets stuck; then everything else too,
                // so the lease lapses.
                let gate = Gate::new();
                self.instances[at]
                    .faults
                    .add(Rule::new(Op::Put, Action::Hold(gate.clone())).key(".ltx"));
                self.next_key += 1;
                let key = format!("k{:06}", self.next_key);
                let r = self.instances[at].running.as_ref().unwrap();
                let (pool, monitor) = (r.pool.clone(), r.replicator.monitor());
                let acked = self.late_acks.clone();
                self.background.push(tokio::spawn(async move {
                    if let (key, true) = attempt_with(&pool, &monitor, key, true).await {
                        acked.lock().unwrap().push(key);
                    }
                }));
                // An instance that may no longer write uploads nothing; the known histories
                // require the upload to be held (see `known_split_brains_never_lose_a_durable_write`).
                if tokio::time::timeout(Duration::from_secs(1), gate.reached())
                    .await
                    .is_ok()
                {
                    self.log.push(format!("takeover of {at}: its upload is held"));
                }
                for op in [Op::Put, Op::Get, Op::List, Op::Delete] {
                    self.instances[at].faults.add(Rule::new(op, Action::Hold(gate.clone())));
                }
                tokio::time::sleep(TTL + TTL / 2).await;
                self.start(by).await;
                let resume = |faults: &Faults| {
                    faults.clear();
                    gate.open();
                };
                if land_first {
                    resume(&self.instances[at].faults);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                for _ in 0..3 {
                    self.write(by, true).await;
                }
                if !land_first {
                    resume(&self.instances[at].faults);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                self.log
                    .push(format!("takeover of {at} by {by} (land first {land_first})"));
            }
            Step::Race => {
                let running: Vec<usize> = (0..self.instances.len())
                    .filter(|i| self.instances[*i].running.is_some())
                    .collect();
                let writes = running.iter().map(|i| {
                    self.next_key += 1;
                    let key = format!("k{:06}", self.next_key);
                    let r = self.instances[*i].running.as_ref().unwrap();
                    attempt(r, key, true)
                });
                for (key, ok) in futures::future::join_all(writes).await {
                    if ok {
                        self.durable.push(key);
                    }
                }
            }
            Step::Crash { at, tear } => self.crash(at, tear).await,
            Step::Stop { at } => {
                if let Some(r) = self.instances[at].running.take() {
                    r.pool.close().await;
                    let result = r.replicator.shutdown(Instant::now() + Duration::from_secs(3)).await;
                    self.log.push(format!("stop {at}: {result:?}"));
                }
            }
            Step::Start { at } => self.start(at).await,
            Step::Pause { at, ms } => {
                let gate = Gate::new();
                for op in [Op::Put, Op::Get, Op::List, Op::Delete] {
                    self.instances[at].faults.add(Rule::new(op, Action::Hold(gate.clone())));
                }
                let faults = self.instances[at].faults.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    faults.clear();
                    gate.open();
                });
            }
            Step::Fault { at, fault } => {
                let faults = &self.instances[at].faults;
                match fault {
                    StoreFault::FailNextPut => faults.add(Rule::new(Op::Put, Action::Fail).key(".ltx").times(1)),
                    StoreFault::LoseNextPutAnswer => {
                        faults.add(Rule::new(Op::Put, Action::LoseResponse).key(".ltx").times(1))
                    }
                    StoreFault::LoseNextLeaseAnswer => {
                        faults.add(Rule::new(Op::Put, Action::LoseResponse).key("lease").times(1))
                    }
                    StoreFault::SlowRequests(ms) => {
                        for op in [Op::Put, Op::Get, Op::List] {
                            faults.add(Rule::new(op, Action::Delay(Duration::from_millis(ms))));
                        }
                    }
                    StoreFault::Clear => faults.clear(),
                }
            }
            Step::Sleep { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }

    async fn write(&mut self, at: usize, durable: bool) {
        let Some(r) = self.instances[at].running.as_ref() else {
            return;
        };
        self.next_key += 1;
        let key = format!("k{:06}", self.next_key);
        let (key, ok) = attempt(r, key, durable).await;
        if ok && durable {
            self.durable.push(key);
        }
    }

    async fn crash(&mut self, at: usize, tear: bool) {
        let Some(r) = self.instances[at].running.take() else {
            return;
        };
        drop(r.replicator);
        // The disk as a killed process leaves it; the instance lives on in the copy.
        let instance = &mut self.instances[at];
        let dir = instance
            .db
            .parent()
            .unwrap()
            .join(format!("crash-{}", instance.incarnation));
        instance.db = common::crash_copy(&instance.db, &dir);
        r.pool.close().await;
        if tear {
            tear_unsynced_tail(&instance.db);
        }
        self.log.push(format!("crash {at} (tear {tear})"));
    }

    async fn start(&mut self, at: usize) {
        if self.instances[at].running.is_some() {
            return;
        }
        let instance = &mut self.instances[at];
        instance.incarnation += 1;
        let owner = format!("i{at}#{}", instance.incarnation);
        std::fs::create_dir_all(instance.db.parent().unwrap()).unwrap();
        let lease = match Lease::acquire(&instance.store, &owner, lease_options()).await {
            Ok(lease) => lease,
            Err(e) => {
                self.log.push(format!("start {at}: no lease: {e}"));
                return;
            }
        };
        let recorded = lease.previous_txid();
        if let Err(e) = bootstrap::prepare(&instance.db, &instance.store, recorded, &|| lease.is_valid()).await {
            self.log.push(format!("start {at}: bootstrap refused: {e}"));
            let _ = lease.release().await;
            return;
        }
        let signal = CommitSignal::new();
        let pool = common::app_pool(&instance.db, &signal).await;
        // Rows of about 3 KB: one to a page, so a segment lost or mixed into the chain
        // is not papered over by a later one rewriting the same page.
        sqlx::query("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE, pad BLOB)")
            .execute(&pool)
            .await
            .unwrap();
        let started = Replicator::start_with_lease(
            &instance.db,
            instance.store.clone(),
            signal,
            "lineage",
            replica_options(),
            Some(lease),
        )
        .await;
        match started {
            Ok(replicator) => {
                let _ = replicator.mark_serving().await;
                self.log.push(format!(
                    "start {at}: replicating at TXID {}",
                    replicator.status().replicated_txid
                ));
                instance.running = Some(Running { pool, replicator });
            }
            Err(e) => {
                self.log.push(format!("start {at}: replication refused: {e}"));
                pool.close().await;
            }
        }
    }

    /// Crashes everything, then checks the promise against a restore of the replica, which
    /// must restore (and pass SQLite's integrity check) whenever anything was written to it.
    async fn check(mut self) -> Result<Outcome, String> {
        let mut verification_failures = Vec::new();
        for at in 0..self.instances.len() {
            if let Some(r) = self.instances[at].running.as_ref() {
                if let Some(v) = r.replicator.status().verification {
                    if let Some(e) = v.error {
                        verification_failures.push(format!("instance {at} at TXID {}: {e}", v.txid));
                    }
                }
            }
            self.crash(at, false).await;
        }
        if !verification_failures.is_empty() {
            return Err(format!("verification failed: {verification_failures:?}"));
        }
        // Background writes end within their 2 s durable wait.
        for write in self.background.drain(..) {
            tokio::time::timeout(Duration::from_secs(10), write)
                .await
                .map_err(|_| "a background write did not end within 10 s".to_owned())?
                .map_err(|e| format!("a background write panicked: {e}"))?;
        }
        self.durable.extend(self.late_acks.lock().unwrap().drain(..));
        let out = self._dir.path().join("restored.db");
        let restored = match restore(&self.store, &out, Target::Latest, None).await {
            Ok(restored) => restored,
            // Nothing ever reached the replica: nothing can have been acknowledged.
            Err(RestoreError::Empty(_)) if self.durable.is_empty() => {
                return Ok(Outcome {
                    durable: 0,
                    log: self.log,
                })
            }
            Err(e) => return Err(format!("the replica does not restore: {e}")),
        };
        let rows: Vec<String> = common::rows(&out).await.into_iter().map(|(_, v)| v).collect();
        let lost: Vec<&String> = self.durable.iter().filter(|k| !rows.contains(k)).collect();
        if !lost.is_empty() {
            return Err(format!(
                "{} of {} durable writes lost (restored TXID {}), e.g. {:?}",
                lost.len(),
                self.durable.len(),
                restored.txid,
                &lost[..lost.len().min(5)]
            ));
        }
        Ok(Outcome {
            durable: self.durable.len(),
            log: self.log,
        })
    }
}

/// One write: accepted only if the instance says it may write; `(key, durably acked)`.
async fn attempt(r: &Running, key: String, durable: bool) -> (String, bool) {
    attempt_with(&r.pool, &r.replicator.monitor(), key, durable).await
}

async fn attempt_with(pool: &SqlitePool, monitor: &Monitor, key: String, durable: bool) -> (String, bool) {
    if monitor.check_writable().await.is_err() {
        return (key, false);
    }
    let inserted = sqlx::query("INSERT INTO t (v, pad) VALUES ($1, randomblob(3000))")
        .bind(&key)
        .execute(pool)
        .await;
    if inserted.is_err() {
        return (key, false);
    }
    if !durable {
        return (key, false);
    }
    let ok = monitor.wait_durable(Duration::from_secs(2)).await.is_ok();
    (key, ok)
}

/// Cuts the WAL in half: what a power loss may do to it. Nothing syncs the WAL between
/// checkpoints (`synchronous=NORMAL`, and the replicator does not wait for the disk either),
/// so the cut may fall before what the local record says was shipped — start-up must then
/// notice that the WAL no longer reaches the record and restore from the replica.
fn tear_unsynced_tail(db: &Path) {
    let wal = keycast_replica::segment::wal_path(db);
    let Ok(len) = std::fs::metadata(&wal).map(|m| m.len()) else {
        return;
    };
    if len > 33 {
        let cut = 32 + (len - 32) / 2;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .unwrap()
            .set_len(cut)
            .unwrap();
    }
}

async fn run_steps(instances: usize, steps: &[Step]) -> Result<Outcome, String> {
    let mut world = World::new(instances);
    for step in steps {
        world.apply(step).await;
    }
    let log = world.log.clone();
    world
        .check()
        .await
        .map_err(|e| format!("{e}\nsteps: {steps:#?}\nevents: {log:#?}"))
}

/// The histories that once broke the replica, kept as they are: a paused writer's upload that
/// lands at the TXID its successor uses next (before and after the successor's own), and a
/// writer whose lease answer is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn known_split_brains_never_lose_a_durable_write() {
    if std::env::var("KEYCAST_SCHEDULE_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("keycast_replica=debug")
            .try_init();
    }
    for land_first in [true, false] {
        let steps = [
            Step::Start { at: 0 },
            Step::Write {
                pick: 0,
                count: 2,
                durable: true,
            },
            Step::Takeover {
                at: 0,
                by: 1,
                land_first,
            },
            Step::Write {
                pick: 0,
                count: 3,
                durable: true,
            },
        ];
        let outcome = run_steps(2, &steps).await.unwrap();
        // The history happened as written: instance 0 wrote, its upload was held while 1
        // took over, and 1 wrote its three — so the promise was tested, not skipped.
        let happened = |event: &str| outcome.log.iter().any(|e| e.starts_with(event));
        assert!(
            happened("takeover of 0: its upload is held") && happened("start 1: replicating"),
            "land first {land_first}: {:#?}",
            outcome.log
        );
        assert!(
            outcome.durable >= 5,
            "land first {land_first}: {} durable writes acknowledged, not 2 + 3: {:#?}",
            outcome.durable,
            outcome.log
        );
    }
    let steps = [
        Step::Start { at: 0 },
        Step::Fault {
            at: 0,
            fault: StoreFault::LoseNextLeaseAnswer,
        },
        Step::Write {
            pick: 0,
            count: 3,
            durable: true,
        },
        Step::Fault {
            at: 0,
            fault: StoreFault::LoseNextPutAnswer,
        },
        Step::Write {
            pick: 0,
            count: 3,
            durable: true,
        },
        Step::Start { at: 1 },
        Step::Write {
            pick: 0,
            count: 2,
            durable: true,
        },
    ];
    let outcome = run_steps(2, &steps).await.unwrap();
    assert!(
        outcome.durable >= 3,
        "{} durable writes acknowledged: {:#?}",
        outcome.durable,
        outcome.log
    );
}

/// Runs the history `seed` makes; returns the durable writes acknowledged.
async fn run_case(seed: u64) -> Result<usize, String> {
    let mut rng = Rng(seed);
    let instances = 2 + rng.below(2) as usize;
    let steps = history(&mut rng, instances);
    let mut world = World::new(instances);
    for step in &steps {
        world.apply(step).await;
    }
    let log = world.log.clone();
    eprintln!(
        "  {instances} instances, {} steps, {} durable writes acknowledged; events: {}",
        steps.len(),
        world.durable.len(),
        log.iter()
            .map(|e| e.split(':').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    world
        .check()
        .await
        .map(|outcome| outcome.durable)
        .map_err(|e| format!("{e}\nseed {seed}, {instances} instances\nsteps: {steps:#?}\nevents: {log:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_schedules_never_lose_a_durable_write_nor_corrupt_the_replica() {
    let cases: u64 = std::env::var("KEYCAST_SCHEDULE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let base: u64 = std::env::var("KEYCAST_SCHEDULE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut durable = 0;
    for case in 0..cases {
        let seed = base.wrapping_add(case);
        eprintln!("schedule case {case}: seed {seed}");
        match run_case(seed).await {
            Ok(acknowledged) => durable += acknowledged,
            Err(failure) => {
                panic!("SCHEDULE FAILED (replay with KEYCAST_SCHEDULE_SEED={seed} KEYCAST_SCHEDULE_CASES=1): {failure}")
            }
        }
    }
    // Schedules in which nothing could be acknowledged would prove nothing.
    assert!(
        durable > 0,
        "no durable write was acknowledged in {cases} schedules from seed {base}"
    );
}
