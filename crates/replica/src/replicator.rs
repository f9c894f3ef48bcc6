//! The replicator: ships every commit of one SQLite database to the object store as LTX
//! segments, and owns the database's checkpoints.
//!
//! # Who checkpoints
//! Only the replicator. Application connections run with `wal_autocheckpoint=0` and a WAL
//! hook (see [`crate::capture`]), so SQLite never folds frames into the database file on
//! its own. The replicator checkpoints (PASSIVE) only frames it has shipped: it holds a read
//! snapshot at the shipped position (see [`crate::snapshot`]), which stops any checkpoint
//! there, and takes SQLite's write lock only for the moment the WAL may restart — never
//! across an upload, except the small tail of a hand-over. A WAL restart it did not cause is
//! detected by the salts and answered with a full image, never by guessing.
//!
//! # The loop
//! Wait for a commit (or a timer) → read every frame committed since the last segment →
//! encode one L0 segment (group commit: all commits pending at that moment) → create-only
//! PUT at `ltx/0/<txid>-<txid>.ltx` → confirm the lease still held → advance. While the
//! database is idle nothing happens: no timer issues object-store requests unless something
//! new was shipped.
//!
//! # Unknown outcomes
//! An upload whose answer was lost is retried with exactly the same bytes, and a collision is
//! resolved by reading the object: our own bytes mean our upload happened. Someone else's
//! bytes are resolved by reading the lease: if it is no longer ours, this instance is
//! *fenced* (see [`Status::fenced`]); if it still is, the object was left by an instance that
//! lost the lease before its upload landed — which therefore never acknowledged it — and is
//! replaced.
//!
//! # Fencing is visible
//! A fenced instance can never write again. It refuses writes, fails readiness and liveness,
//! and wakes everyone waiting for durability with an error; [`Monitor::fenced`] lets the
//! process exit so the platform replaces it.
//!
//! # Hand-over
//! See [`handover`]: when a starting instance asks for the lease, writes are refused, every
//! committed frame is shipped, the lease released; the write lock then stays held until
//! shutdown, unless the newcomer never comes and the lease is taken back.

mod handover;
mod worker;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::capture::CommitSignal;
use crate::compactor::CompactionPolicy;
use crate::lease::{Lease, LeaseError};
use crate::segment::SegmentError;
use crate::store::{Store, StoreError};
use worker::Worker;

/// How long a write waits for a due lease renewal before deciding without it.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Checkpoint when the WAL holds at least this many frames (pages): 16 MiB of 4 KiB pages.
/// Each checkpoint holds SQLite's write lock for a few milliseconds (the tail's upload, the
/// checkpoint's own fsyncs); at SQLite's 1000 pages those pauses cost sustained writers
/// about a fifth of their throughput, at 4000 pages they cost what SQLite's own
/// auto-checkpoint does (see BENCHMARKS.md, throughput).
pub const DEFAULT_CHECKPOINT_PAGES: u32 = 4000;
/// Checkpoint at least this often while something was shipped since the last one.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// Upper bound of WAL bytes folded into one segment (64 MiB, as Litestream).
pub const DEFAULT_MAX_SEGMENT_BYTES: u64 = 64 << 20;
/// First retry delay after a failed upload; doubles up to [`DEFAULT_RETRY_MAX`].
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest delay between retries of a failing upload.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest time SQLite's write lock is held around an upload before it is let go (the upload
/// goes on outside it): application writes wait for the lock up to their `busy_timeout`
/// (5 s), so a slow store must never hold it that long.
pub const DEFAULT_LOCK_BUDGET: Duration = Duration::from_millis(500);
/// How many segment uploads may be in flight at once while the replicator ships committed
/// frames (at most [`crate::store::MAX_UPLOADS_IN_FLIGHT`]). One by default: with more, a
/// commit that arrives while an upload is under way goes out at once instead of after it,
/// but every upload then carries fewer commits — on moto at 500 commits/s, 2 or 4 in flight
/// multiplied the PUTs until the store fell seconds behind, where one at a time batches
/// more commits into each PUT as the store slows (BENCHMARKS.md, "shipping pipeline"). Each
/// PUT is also a billed request. A durable waiter's segment goes out beside the uploads in
/// flight whatever the value (see `Worker::sync`), so a durable write waits for one PUT, not
/// two. Commits are acknowledged in TXID order whatever the value;
/// see `docs/ARCHITECTURE.md` (shipping pipeline) for what a crash leaves.
pub const DEFAULT_UPLOADS_IN_FLIGHT: usize = 1;

/// How often the replica is restored in the background and compared with the live database.
pub const DEFAULT_VERIFY_INTERVAL: Duration = Duration::from_secs(3600);

/// Tunables of the replicator. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// See [`DEFAULT_CHECKPOINT_PAGES`].
    pub checkpoint_pages: u32,
    /// See [`DEFAULT_CHECKPOINT_INTERVAL`].
    pub checkpoint_interval: Duration,
    /// See [`DEFAULT_MAX_SEGMENT_BYTES`].
    pub max_segment_bytes: u64,
    /// See [`DEFAULT_RETRY_MIN`].
    pub retry_min: Duration,
    /// See [`DEFAULT_RETRY_MAX`].
    pub retry_max: Duration,
    /// See [`DEFAULT_LOCK_BUDGET`].
    pub lock_budget: Duration,
    /// Compaction levels, snapshots and retention.
    pub compaction: CompactionPolicy,
    /// See [`DEFAULT_VERIFY_INTERVAL`]; zero disables background verification. Runs only when
    /// something was shipped since the last one (an idle database costs nothing).
    pub verify_interval: Duration,
    /// See [`DEFAULT_UPLOADS_IN_FLIGHT`]; 1 ships one segment at a time. Values past
    /// [`crate::store::MAX_UPLOADS_IN_FLIGHT`] count as that.
    pub uploads_in_flight: usize,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            checkpoint_pages: DEFAULT_CHECKPOINT_PAGES,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            max_segment_bytes: DEFAULT_MAX_SEGMENT_BYTES,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            lock_budget: DEFAULT_LOCK_BUDGET,
            compaction: CompactionPolicy::default(),
            verify_interval: DEFAULT_VERIFY_INTERVAL,
            uploads_in_flight: DEFAULT_UPLOADS_IN_FLIGHT,
        }
    }
}

/// How long past its deadline [`Replicator::shutdown`] waits for the worker: the lease's
/// release after a final sync that finished just in time (Cloud Run kills 2 s after the
/// default grace period).
const RELEASE_AFTER_DEADLINE: Duration = Duration::from_secs(1);

/// Why replication could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("sqlite: {0}")]
    Sqlite(#[from] sqlx::Error),
    #[error("cannot write the local replication record: {0}")]
    LocalState(#[from] std::io::Error),
    #[error("another writer already stored TXID {txid} in the replica: this instance is fenced and stops replicating")]
    Fenced { txid: u64 },
    #[error("the replicator has stopped")]
    Stopped,
    #[error("the replica lease was taken over by {by}: this instance is fenced and stops replicating")]
    LeaseLost { by: String },
    #[error("cannot confirm this instance still holds the replica lease ({reason}); refusing writes until it can")]
    LeaseUnconfirmed { reason: String },
    #[error("handing the replica over to {to}, which is starting: this instance no longer accepts writes")]
    HandingOver { to: String },
    #[error("the replica was handed over to {to} at TXID {txid}: this instance no longer accepts writes")]
    HandedOver { to: String, txid: u64 },
    #[error(
        "the replica reaches TXID {remote} but this instance's database is at TXID {local}: another writer \
         stored objects since this instance restored, and it will not write over what it has not restored"
    )]
    ReplicaAhead { local: u64, remote: u64 },
    #[error(
        "the replica reaches TXID {remote} but the local replication record says TXID {local} was shipped: \
         objects are missing from the replica, and this instance will not write over the gap"
    )]
    ReplicaBehind { local: u64, remote: u64 },
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("timed out after {0:?} waiting for the replica")]
    Timeout(Duration),
    #[error("the replication worker panicked: {0}")]
    Panicked(String),
}

impl ReplicaError {
    /// Whether this error means the instance may never write the replica again.
    fn is_fatal(&self) -> bool {
        matches!(self, ReplicaError::Fenced { .. } | ReplicaError::LeaseLost { .. })
    }
}

/// A point-in-time view of replication, for `/metrics`, health and `keycast replica status`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Highest TXID stored in the replica by this process (or found there at start).
    pub replicated_txid: u64,
    /// Commits the application made in this process.
    pub local_commits: u64,
    /// Of those, how many are in the replica.
    pub shipped_commits: u64,
    /// Seconds the oldest unshipped commit has waited (0 when caught up).
    pub lag_seconds: f64,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Since when uploads have been failing without a success.
    pub failing_since: Option<Instant>,
    /// This instance may never write the replica again (another writer owns it, or the
    /// replica moved past this instance's state); see `fence_reason`.
    pub fenced: bool,
    /// Why it is fenced.
    pub fence_reason: Option<String>,
    /// A starting instance asked for the replica (or took it over): this one refuses writes
    /// and hands over.
    pub handing_over_to: Option<String>,
    /// The lease lapsed while this instance was idle and another took it: nothing was lost,
    /// and this instance steps aside as after a hand-over.
    pub superseded: bool,
    /// The hand-over finished: everything up to this TXID is shipped and the lease released.
    pub handed_over_txid: Option<u64>,
    /// Segments stored / checkpoints run since start.
    pub segments: u64,
    pub checkpoints: u64,
    /// The last background verification that reached a verdict, if one ran.
    pub verification: Option<Verification>,
    /// The last background verification that could not check the replica (the store or the
    /// scratch disk failed it), since the last verdict.
    pub verification_inconclusive: Option<Verification>,
    /// Since when the lease could not be confirmed (its renewal failed or did not answer) and
    /// the clocks no longer vouch for it: writes are refused meanwhile. `None` while the
    /// lease is confirmed, or lapsed idle with nothing asking to write.
    pub lease_unconfirmed_since: Option<Instant>,
    /// Why, while `lease_unconfirmed_since` is set.
    pub lease_error: Option<String>,
}

/// The outcome of one background verification.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The TXID restored and compared.
    pub txid: u64,
    /// `None` when the restored replica matched the live database; the reason otherwise
    /// (or why it could not be checked).
    pub error: Option<String>,
    /// When it finished.
    pub at: SystemTime,
}

/// See [`Shared::lease_view`].
#[derive(Debug, Clone, Copy)]
struct LeaseView {
    /// [`Lease::valid_until`].
    valid_until: Instant,
    /// The same moment by the wall clock (ms since the epoch). The monotonic clock stops
    /// while a VM is suspended; the wall clock does not, and the lease runs out by it for
    /// everyone else.
    valid_until_ms: i64,
    /// [`Lease::renewal_due_at`].
    renewal_due_at: Instant,
}

impl LeaseView {
    fn of(lease: &Lease) -> LeaseView {
        let valid_for = lease.valid_for();
        LeaseView {
            valid_until: Instant::now() + valid_for,
            valid_until_ms: now_ms().saturating_add(i64::try_from(valid_for.as_millis()).unwrap_or(i64::MAX)),
            renewal_due_at: lease.renewal_due_at(),
        }
    }

    /// Whether the lease is still valid by both clocks, at `now` and `now_ms`.
    fn trusted(&self, now: Instant, now_ms: i64) -> bool {
        now < self.valid_until && now_ms < self.valid_until_ms
    }
}

/// Handle on a running replicator. Dropping it without [`Replicator::shutdown`] stops it
/// at once, like a crash (nothing more is shipped, the lease is not released).
pub struct Replicator {
    shared: Arc<Shared>,
    stop: watch::Sender<Option<Instant>>,
    task: Option<tokio::task::JoinHandle<Result<u64, ReplicaError>>>,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

struct Shared {
    signal: Arc<CommitSignal>,
    store: Store,
    status: Mutex<Status>,
    shipped: watch::Sender<u64>,
    /// When the first commit not yet shipped was observed.
    pending_since: Mutex<Option<Instant>>,
    /// The single-writer lease, if the deployment uses one.
    lease: tokio::sync::Mutex<Option<Lease>>,
    /// Whether a lease is used at all.
    leased: bool,
    /// What the lease's clocks say, cached whenever it is written or read, so that a write
    /// can be judged without waiting for the lease's lock; `None` once there is no lease.
    lease_view: Mutex<Option<LeaseView>>,
    /// Rounds, hand-overs and final syncs in progress: the keeper renews the lease meanwhile.
    busy: AtomicUsize,
    /// Becomes true once, when the instance is fenced.
    fenced: watch::Sender<bool>,
    /// A renewal started by a write is running (see [`Shared::spawn_renewal`]).
    renewal_in_flight: AtomicBool,
    /// Counts finished renewals started by writes, for writes waiting on one.
    renewed: watch::Sender<u64>,
    /// Since when, and why, renewing the lease has failed (see
    /// [`Status::lease_unconfirmed_since`]); cleared by a renewal that succeeds.
    lease_failing: Mutex<Option<(Instant, String)>>,
    /// The highest commit count a durable waiter has asked for. While it is past what the
    /// uploads in flight cover, the shipping loop sends its segment at once beside them
    /// instead of after them (see `Worker::sync`).
    durable_wanted: AtomicU64,
    /// Wakes the shipping loop when a durable waiter arrives while an upload is in flight
    /// (the commit signal alone would wake it on every commit).
    durable_waiting: tokio::sync::Notify,
    /// Run by a hand-over before it locks the database, in order (see
    /// [`Monitor::before_handover`]).
    before_handover: Mutex<Vec<BeforeHandover>>,
    /// Whether those hooks ran for the hand-over under way. Held while they run: the worker
    /// and shutdown may both get there (see [`Monitor::write_before_handover`]), and they run
    /// once. Cleared when the instance takes the replica back.
    before_handover_ran: tokio::sync::Mutex<bool>,
}

/// What the application writes before a hand-over locks the database: what it still holds in
/// memory (keycast: the signing activity not yet written, the NIP-46 requests seen lately).
/// See [`Monitor::before_handover`].
pub type BeforeHandover =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// How long a hand-over waits for the hooks of [`Monitor::before_handover`], all together,
/// before it goes on without the rest (the newcomer is waiting).
pub const BEFORE_HANDOVER_LIMIT: Duration = Duration::from_secs(5);

impl Replicator {
    /// Starts replicating the database at `db`, whose application connections report commits
    /// to `signal`. If the replica is empty the first segment is a full image of the
    /// database; if it holds data, the local replication record must say this database is
    /// exactly its latest state (see [`crate::bootstrap`]), else starting fails rather than
    /// writing over what this instance never restored.
    ///
    /// `lineage` identifies the database (see `keycast_db::meta`); it is recorded locally and,
    /// for a new replica, in the replica.
    ///
    /// # Errors
    /// Store, SQLite and I/O errors during the initial alignment;
    /// [`ReplicaError::ReplicaAhead`] / [`ReplicaError::ReplicaBehind`].
    pub async fn start(
        db: &Path,
        store: Store,
        signal: Arc<CommitSignal>,
        lineage: &str,
        options: ReplicaOptions,
    ) -> Result<Replicator, ReplicaError> {
        Self::start_with_lease(db, store, signal, lineage, options, None).await
    }

    /// As [`Replicator::start`], holding `lease` (see [`crate::lease`]): it is renewed before
    /// writes and while work is under way, a lost lease fences this instance, and shutdown
    /// releases it.
    ///
    /// # Errors
    /// As [`Replicator::start`].
    pub async fn start_with_lease(
        db: &Path,
        store: Store,
        signal: Arc<CommitSignal>,
        lineage: &str,
        options: ReplicaOptions,
        lease: Option<Lease>,
    ) -> Result<Replicator, ReplicaError> {
        let (shipped, _) = watch::channel(signal.commits());
        let view = lease.as_ref().map(LeaseView::of);
        let shared = Arc::new(Shared {
            signal: signal.clone(),
            store: store.clone(),
            status: Mutex::new(Status::default()),
            shipped,
            pending_since: Mutex::new(None),
            leased: lease.is_some(),
            lease_view: Mutex::new(view),
            lease: tokio::sync::Mutex::new(lease),
            busy: AtomicUsize::new(0),
            fenced: watch::channel(false).0,
            renewal_in_flight: AtomicBool::new(false),
            lease_failing: Mutex::new(None),
            renewed: watch::channel(0).0,
            durable_wanted: AtomicU64::new(0),
            durable_waiting: tokio::sync::Notify::new(),
            before_handover: Mutex::new(Vec::new()),
            before_handover_ran: tokio::sync::Mutex::new(false),
        });
        let keeper = shared
            .leased
            .then(|| tokio::spawn(handover::keep_lease_while_busy(shared.clone())));
        let mut worker = Worker::open(db, store, signal, lineage, options, shared.clone()).await?;
        if let Err(e) = worker.align().await {
            if let Some(keeper) = keeper {
                keeper.abort();
            }
            // Hand the lease back so that whoever should write can, at once.
            if let Some(lease) = shared.lease.lock().await.take() {
                let _ = lease.release().await;
            }
            return Err(e);
        }
        shared.status.lock().expect("status lock").replicated_txid = worker.txid();
        let (stop, stop_rx) = watch::channel(None);
        worker.publish_shipped(worker.shipped_mark());
        let task = tokio::spawn(run_or_fence(worker, stop_rx, shared.clone()));
        Ok(Replicator {
            shared,
            stop,
            task: Some(task),
            keeper,
        })
    }

    /// Current replication status.
    pub fn status(&self) -> Status {
        self.shared.snapshot_status()
    }

    /// A cheap, cloneable view of the status that outlives nothing: for health checks and
    /// metrics, which must not own the replicator.
    pub fn monitor(&self) -> Monitor {
        Monitor(self.shared.clone())
    }

    /// The store this replicator writes to.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Waits until every commit the application made before this call is in the object store.
    /// See [`Monitor::wait_durable`].
    ///
    /// # Errors
    /// As [`Monitor::wait_durable`].
    pub async fn wait_durable(&self, timeout: Duration) -> Result<u64, ReplicaError> {
        self.monitor().wait_durable(timeout).await
    }

    /// Marks the lease as held by an instance that finished starting (see
    /// [`Lease::mark_serving`]): call once the process serves. Without a lease, nothing.
    ///
    /// # Errors
    /// The lease was lost (this instance is then fenced), or the store failed.
    pub async fn mark_serving(&self) -> Result<(), ReplicaError> {
        let mut lease = self.shared.lease.lock().await;
        let Some(held) = lease.as_mut() else {
            return Ok(());
        };
        let result = held.mark_serving().await;
        self.shared.note_lease(held);
        if let Some(by) = held.handover_requested_by().map(str::to_owned) {
            // Someone asked while this instance was starting: hand over now rather than at
            // the next write, which an idle instance may never see.
            self.shared.begin_handover(&by);
        }
        match result {
            Ok(()) => {
                self.shared.lease_confirmed();
                Ok(())
            }
            Err(LeaseError::Lost { by }) => Err(self.shared.lost(by)),
            Err(e) => Err(e.into()),
        }
    }

    /// Ships the last committed frames (trying until `deadline`), records a clean stop,
    /// releases the lease, and closes the replicator's connections. Call after the
    /// application's pool is closed.
    ///
    /// # Errors
    /// The last upload error if the final sync did not finish by `deadline`.
    pub async fn shutdown(mut self, deadline: Instant) -> Result<u64, ReplicaError> {
        let asked = Instant::now();
        let _ = self.stop.send(Some(deadline));
        self.shared.signal.wake();
        let mut task = self.task.take().expect("the worker runs until shutdown");
        // The worker retries only until the deadline, but a store request already in flight
        // waits out the store's own timeout (30 s), past the platform's kill. The lease's
        // release gets a moment more; past that the worker is stopped here, and says so.
        let by = deadline + RELEASE_AFTER_DEADLINE;
        let joined = match tokio::time::timeout_at(by.into(), &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                task.abort();
                // It may have finished just then (its last steps do not wait on the store).
                match task.await {
                    Err(e) if e.is_cancelled() => {
                        let status = self.status();
                        tracing::error!(
                            replicated_txid = status.replicated_txid,
                            unshipped_commits = status.local_commits.saturating_sub(status.shipped_commits),
                            "the final sync did not finish in time (the store stopped answering?); commits past the replicated TXID are only on local disk, and the lease lapses instead of being released"
                        );
                        Ok(Err(ReplicaError::Timeout(by.saturating_duration_since(asked))))
                    }
                    joined => joined,
                }
            }
        };
        let result = match joined {
            Ok(result) => result,
            Err(e) => Err(ReplicaError::LocalState(std::io::Error::other(e.to_string()))),
        };
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        result
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        // Nobody checkpoints any more: commits must not wait for it.
        self.shared.signal.set_wal_limit(0);
        for task in [self.keeper.take().map(|t| t.abort_handle())]
            .into_iter()
            .chain([self.task.as_ref().map(|t| t.abort_handle())])
            .flatten()
        {
            task.abort();
        }
    }
}

/// Runs the worker until shutdown asks it to stop. A worker that ends before that (an error
/// it did not fence for, or a panic, which tokio would otherwise keep to the task) leaves an
/// instance that takes writes nobody ships while its probes look healthy: fence it, so the
/// application refuses writes and makes way for an instance that restores first.
async fn run_or_fence(
    worker: Worker,
    stop: watch::Receiver<Option<Instant>>,
    shared: Arc<Shared>,
) -> Result<u64, ReplicaError> {
    use futures::FutureExt as _;
    let asked = stop.clone();
    let result = std::panic::AssertUnwindSafe(worker.run(stop))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(ReplicaError::Panicked(panic_message(panic.as_ref()))));
    if asked.borrow().is_none() {
        // Nobody checkpoints any more: commits must not wait for it.
        shared.signal.set_wal_limit(0);
        let why = match &result {
            Ok(_) => "the replication worker stopped".to_owned(),
            Err(e) => format!("the replication worker stopped: {e}"),
        };
        shared.fence(why);
    }
    result
}

/// The text a panic was raised with, when it has one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Read-only view of a replicator's [`Status`].
#[derive(Clone)]
pub struct Monitor(Arc<Shared>);

impl Monitor {
    /// Registers what a hand-over runs before it takes SQLite's write lock for good: the
    /// application's last writes of what it holds only in memory, which can commit (and ship
    /// with the tail) then and never after. Hooks run in the order registered, all of them
    /// within [`BEFORE_HANDOVER_LIMIT`].
    pub fn before_handover(&self, hook: BeforeHandover) {
        self.0.before_handover.lock().expect("hooks lock").push(hook);
    }

    /// Shutdown during a hand-over that was asked for but has not written yet (the worker was
    /// still busy with a round when the SIGTERM came): runs the hooks of
    /// [`Monitor::before_handover`] now, while the application can still write, since the
    /// final sync that then ships the tail runs none. Does nothing if they already ran
    /// (waiting for them if they are running), or when no hand-over is under way, or nothing
    /// could ship (fenced, or stepped aside after the lease was taken).
    pub async fn write_before_handover(&self) {
        let to = {
            let status = self.0.status.lock().expect("status lock");
            match &status.handing_over_to {
                Some(to) if !status.fenced && !status.superseded => to.clone(),
                _ => return,
            }
        };
        self.0.write_before_handover(&to).await;
    }

    /// Current replication status.
    pub fn status(&self) -> Status {
        self.0.snapshot_status()
    }

    /// Completes once this instance is fenced (at once if it already is): it can never write
    /// the replica again, and should make way for one that can.
    pub async fn fenced(&self) {
        let mut fenced = self.0.fenced.subscribe();
        let _ = fenced.wait_for(|f| *f).await;
    }

    /// Whether this instance may accept a write now: not fenced, not handing over, and its
    /// lease (if any) still its own. While the lease is fresh that is known locally, at no
    /// cost; once its renewal is due it is renewed now, so a write after a long idle period
    /// learns of a takeover *before* it is accepted. When the renewal fails or does not answer
    /// within 2 s, the write is accepted only while the lease is still valid by the clocks
    /// (nobody can take it before it runs out); otherwise it is refused: fail closed.
    ///
    /// # Errors
    /// Why writes are refused: fenced, handing over, or a lease that cannot be confirmed.
    pub async fn check_writable(&self) -> Result<(), ReplicaError> {
        if let Some(refused) = self.0.refusal() {
            return Err(refused);
        }
        // Not due by the monotonic clock and valid by the wall clock too: a VM suspended in
        // the first half of the lease resumes with its monotonic clock where it stopped.
        if !self.0.leased || (!self.0.renewal_due() && self.0.lease_trusted()) {
            return Ok(());
        }
        // One renewal at a time runs in the background (never cancelled half way); a write
        // waits for it only when the clocks alone can no longer vouch for the lease.
        let mut renewed = self.0.renewed.subscribe();
        self.0.spawn_renewal();
        if self.0.lease_trusted() {
            return Ok(());
        }
        let _ = tokio::time::timeout(LEASE_CHECK_TIMEOUT, renewed.changed()).await;
        if let Some(refused) = self.0.refusal() {
            return Err(refused);
        }
        match self.0.lease_trusted() {
            true => Ok(()),
            false => {
                let reason = format!("its renewal did not succeed within {} s", LEASE_CHECK_TIMEOUT.as_secs());
                self.0.lease_failed(&reason);
                Err(ReplicaError::LeaseUnconfirmed { reason })
            }
        }
    }

    /// Waits until every commit the application made before this call is in the object store.
    ///
    /// # Errors
    /// [`ReplicaError::Timeout`] if that takes longer than `timeout`; [`ReplicaError::Fenced`]
    /// or [`ReplicaError::Stopped`] if it can never happen. Never a false success.
    pub async fn wait_durable(&self, timeout: Duration) -> Result<u64, ReplicaError> {
        let wanted = self.0.signal.commits();
        self.0.durable_wanted.fetch_max(wanted, Ordering::SeqCst);
        self.0.signal.wake();
        self.0.durable_waiting.notify_one();
        let mut rx = self.0.shipped.subscribe();
        let wait = async {
            loop {
                if *rx.borrow_and_update() >= wanted {
                    return Ok(self.0.snapshot_status().replicated_txid);
                }
                if let Some(never) = self.0.final_refusal() {
                    return Err(never);
                }
                if rx.changed().await.is_err() {
                    return Err(ReplicaError::Stopped);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ReplicaError::Timeout(timeout))?
    }
}

impl Shared {
    /// Remembers what the lease's clocks say, after any write or read of it.
    fn note_lease(&self, lease: &Lease) {
        *self.lease_view.lock().expect("lease view") = Some(LeaseView::of(lease));
    }

    /// Whether the lease (if any) is still valid by the clocks alone.
    fn lease_trusted(&self) -> bool {
        match *self.lease_view.lock().expect("lease view") {
            Some(view) => view.trusted(Instant::now(), now_ms()),
            None => !self.leased,
        }
    }

    /// Records that the lease could not be renewed (kept from the first failure on).
    fn lease_failed(&self, why: &str) {
        let mut failing = self.lease_failing.lock().expect("lease failing");
        if failing.is_none() {
            tracing::warn!(reason = %why, "cannot confirm the replica lease: writes are refused until it is renewed");
            *failing = Some((Instant::now(), why.to_owned()));
        }
    }

    /// Records that the lease was renewed (or read and found ours).
    fn lease_confirmed(&self) {
        if self.lease_failing.lock().expect("lease failing").take().is_some() {
            tracing::info!("the replica lease is confirmed again");
        }
    }

    /// Whether the lease is due for renewal (or there is none any more, e.g. handed over).
    fn renewal_due(&self) -> bool {
        match *self.lease_view.lock().expect("lease view") {
            Some(view) => Instant::now() >= view.renewal_due_at,
            None => self.leased,
        }
    }

    /// Whether a compaction running beside shipping may delete objects now: not fenced, not
    /// handing over (nor stepped aside), and the lease (if any) still valid by the clocks —
    /// which a paused process that resumes finds run out before it has looked at the store.
    fn may_delete(&self) -> bool {
        self.refusal().is_none() && self.lease_trusted()
    }

    /// Whether the worker may delete what stands in the way of its own uploads (a stale
    /// writer's object at its next TXID, an unacknowledged tail): neither fenced nor handed
    /// over — a hand-over under way still ships its last commits, and clears their way — and
    /// the lease valid by the clocks.
    fn may_clear_for_upload(&self) -> bool {
        self.final_refusal().is_none() && self.lease_trusted()
    }

    fn handing_over_to(&self) -> Option<String> {
        self.status.lock().expect("status lock").handing_over_to.clone()
    }

    /// Runs the hooks of [`Monitor::before_handover`] for the hand-over to `to`, once, within
    /// [`BEFORE_HANDOVER_LIMIT`].
    async fn write_before_handover(&self, to: &str) {
        let mut ran = self.before_handover_ran.lock().await;
        if *ran {
            return;
        }
        *ran = true;
        let hooks: Vec<_> = self.before_handover.lock().expect("hooks lock").clone();
        let last_writes = async {
            for hook in hooks {
                hook().await;
            }
        };
        if tokio::time::timeout(BEFORE_HANDOVER_LIMIT, last_writes).await.is_err() {
            tracing::warn!(%to, "the application's last writes before the hand-over did not finish in time; handing over without the rest");
        }
    }

    /// Records that `by` asked for the replica and wakes the worker to hand over.
    fn begin_handover(&self, by: &str) {
        {
            let mut status = self.status.lock().expect("status lock");
            if status.handing_over_to.is_some() {
                return;
            }
            status.handing_over_to = Some(by.to_owned());
        }
        metrics::gauge!("keycast_replica_handing_over").set(1.0);
        tracing::info!(to = %by, "a starting instance asked for the replica: handing it over (refusing writes, shipping the rest)");
        self.signal.wake();
    }

    /// Why a write must be refused now, if it must: fenced, or handing the replica over.
    fn refusal(&self) -> Option<ReplicaError> {
        let status = self.status.lock().expect("status lock");
        if status.fenced {
            return Some(ReplicaError::Fenced {
                txid: status.replicated_txid + 1,
            });
        }
        status.handing_over_to.clone().map(|to| match status.handed_over_txid {
            Some(txid) => ReplicaError::HandedOver { to, txid },
            None => ReplicaError::HandingOver { to },
        })
    }

    /// Why a commit not shipped yet never will be: fenced, or the hand-over is finished.
    fn final_refusal(&self) -> Option<ReplicaError> {
        let status = self.status.lock().expect("status lock");
        if status.fenced {
            return Some(ReplicaError::Fenced {
                txid: status.replicated_txid + 1,
            });
        }
        match (&status.handing_over_to, status.handed_over_txid) {
            (Some(to), Some(txid)) => Some(ReplicaError::HandedOver { to: to.clone(), txid }),
            _ => None,
        }
    }

    /// Records a verification's outcome. One that could not check the replica (see
    /// [`crate::verify::VerifyError::is_inconclusive`]) is no verdict on it: it is logged as a
    /// warning and counted, and `keycast_replica_verification_ok` keeps the last verdict.
    /// Returns true for an inconclusive one, and then wakes the worker, which schedules the
    /// next attempt sooner.
    fn record_verification_outcome(&self, txid: u64, result: Result<(), crate::verify::VerifyError>) -> bool {
        match result {
            Err(e) if e.is_inconclusive() => {
                metrics::counter!("keycast_replica_verification_inconclusive_total").increment(1);
                tracing::warn!(txid, error = %e, "could not verify the replica this time (it is not known to be wrong); trying again soon");
                self.status.lock().expect("status lock").verification_inconclusive = Some(Verification {
                    txid,
                    error: Some(format!("could not check the replica: {e}")),
                    at: SystemTime::now(),
                });
                self.signal.wake();
                true
            }
            other => {
                self.record_verification(txid, other.err().map(|e| e.to_string()));
                false
            }
        }
    }

    fn record_verification(&self, txid: u64, error: Option<String>) {
        metrics::gauge!("keycast_replica_verification_ok").set(if error.is_none() { 1.0 } else { 0.0 });
        metrics::gauge!("keycast_replica_verification_txid").set(txid as f64);
        match &error {
            None => tracing::info!(txid, "verified: the replica restores to exactly the live database"),
            Some(e) => {
                tracing::error!(txid, error = %e, "VERIFICATION FAILED: the replica does not restore to the live database")
            }
        }
        let mut status = self.status.lock().expect("status lock");
        status.verification_inconclusive = None;
        status.verification = Some(Verification {
            txid,
            error,
            at: SystemTime::now(),
        });
    }

    /// Stops this instance from writing the replica, for good, and tells everyone waiting:
    /// durable waiters get their error now, and [`Monitor::fenced`] completes.
    fn fence(&self, reason: String) {
        {
            let mut status = self.status.lock().expect("status lock");
            if status.fenced {
                return;
            }
            status.fenced = true;
            status.fence_reason = Some(reason.clone());
        }
        metrics::gauge!("keycast_replica_fenced").set(1.0);
        tracing::error!(%reason, "this instance is fenced: it can no longer write the replica; refusing writes from now on");
        self.shipped.send_modify(|_| {});
        self.fenced.send_replace(true);
    }

    fn snapshot_status(&self) -> Status {
        let mut status = self.status.lock().expect("status lock").clone();
        if let Some((since, error)) = self.lease_failing.lock().expect("lease failing").clone() {
            if !self.lease_trusted() {
                status.lease_unconfirmed_since = Some(since);
                status.lease_error = Some(error);
            }
        }
        status.local_commits = self.signal.commits();
        status.shipped_commits = *self.shipped.borrow();
        status.lag_seconds = match *self.pending_since.lock().expect("pending lock") {
            Some(since) if status.local_commits > status.shipped_commits => since.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        status
    }

    /// Starts renewing the lease in the background unless a renewal started this way is
    /// already running; its outcome (a takeover, a hand-over request) lands in the status.
    fn spawn_renewal(self: &Arc<Self>) {
        if self.renewal_in_flight.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            if let Err(e) = shared.keep_lease(handover::Keep::Writing).await {
                tracing::debug!(error = %e, "lease renewal before a write did not succeed");
            }
            shared.renewal_in_flight.store(false, Ordering::SeqCst);
            shared.renewed.send_modify(|n| *n += 1);
        });
    }

    /// Counts work in progress for as long as the guard lives (see [`Shared::busy`]).
    fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }
}

/// See [`Shared::busy`].
struct Busy(Arc<Shared>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Milliseconds since the Unix epoch.
/// Makes one of the replicator's own connections leave the WAL in place when it closes, even
/// as the database's last: a stop whose final sync failed (or a worker aborted) has commits
/// the replica lacks in the WAL only, and folded into the file under a record that still
/// names a WAL position they looked to the next start like a power loss, and were restored
/// over. A final sync that shipped everything turns it back off on the connection closed
/// last (`Worker::fold_wal_on_close`).
pub(crate) async fn keep_wal_on_close(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    // SAFETY: a live connection its caller owns.
    unsafe { crate::capture::keep_wal_on_close(handle.as_raw_handle()) };
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process suspended past its lease (a VM paused, a container frozen) resumes with its
    /// monotonic clock where it stopped: by it alone the lease still looked valid, and writes
    /// were accepted that the next upload's check then fenced and lost.
    #[test]
    fn a_lease_runs_out_by_the_wall_clock_too() {
        let now = Instant::now();
        let view = LeaseView {
            valid_until: now + Duration::from_secs(10),
            valid_until_ms: 1_000_000,
            renewal_due_at: now,
        };
        assert!(view.trusted(now, 999_999));
        assert!(
            !view.trusted(now, 1_000_000),
            "suspended past it: the wall clock says so"
        );
        assert!(!view.trusted(now + Duration::from_secs(10), 0));
    }
}
