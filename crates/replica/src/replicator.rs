//! The replicator: ships every commit of one SQLite database to the object store as LTX
//! segments, and owns the database's checkpoints.
//!
//! # Who checkpoints
//! Only the replicator. Application connections run with `wal_autocheckpoint=0` and a WAL
//! hook (see [`crate::capture`]), so SQLite never folds frames into the database file on
//! its own. The replicator checkpoints (PASSIVE) only while holding SQLite's write lock
//! (`BEGIN IMMEDIATE` on its own connection) and only after shipping every committed frame,
//! so no frame can be checkpointed — and then overwritten by a WAL restart — before it is
//! in the object store. A WAL restart it did not cause is detected by the salts and answered
//! with a full image, never by guessing.
//!
//! # The loop
//! Wait for a commit (or a timer) → read every frame committed since the last segment →
//! encode one L0 segment (group commit: all commits pending at that moment) → create-only
//! PUT at `ltx/0/<txid>-<txid>.ltx` → advance. While the database is idle nothing happens:
//! no timer issues object-store requests unless something new was shipped.
//!
//! A create-only PUT that finds the key taken means another writer shipped that TXID: this
//! instance is *fenced* and stops shipping at once (see [`Status::fenced`]).
//!
//! # Hand-over
//! When a starting instance asks for the lease (see [`crate::lease`]), the replicator learns
//! it before a write or a shipment and hands over: writes are refused from that moment, the
//! worker takes SQLite's write lock (`BEGIN IMMEDIATE`) so no commit can slip in, ships every
//! committed frame, releases the lease, and then keeps the lock until shutdown: nothing can
//! commit locally any more, so nothing acknowledged is left behind. Durable waits for commits
//! made before the lock succeed; a write that raced the hand-over gets an error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use tokio::sync::watch;

use crate::capture::CommitSignal;
use crate::compactor::{self, CompactionPolicy};
use crate::lease::{Lease, LeaseError, LeaseOptions};
use crate::local_state::{self, LocalState};
use crate::segment::{self, Cursor, Segment, SegmentError};
use crate::snapshot::Snapshot;
use crate::store::{PutOutcome, Store, StoreError};

/// How long a write waits for a due lease renewal before going ahead without it.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Checkpoint when the WAL holds at least this many frames (pages).
pub const DEFAULT_CHECKPOINT_PAGES: u32 = 1000;
/// Checkpoint at least this often while something was shipped since the last one.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// Upper bound of WAL bytes folded into one segment (64 MiB, as Litestream).
pub const DEFAULT_MAX_SEGMENT_BYTES: u64 = 64 << 20;
/// First retry delay after a failed upload; doubles up to [`DEFAULT_RETRY_MAX`].
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest delay between retries of a failing upload.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);

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
    /// Compaction levels, snapshots and retention.
    pub compaction: CompactionPolicy,
    /// See [`DEFAULT_VERIFY_INTERVAL`]; zero disables background verification. Runs only when
    /// something was shipped since the last one (an idle database costs nothing).
    pub verify_interval: Duration,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            checkpoint_pages: DEFAULT_CHECKPOINT_PAGES,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            max_segment_bytes: DEFAULT_MAX_SEGMENT_BYTES,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            compaction: CompactionPolicy::default(),
            verify_interval: DEFAULT_VERIFY_INTERVAL,
        }
    }
}

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
    #[error("handing the replica over to {to}, which is starting: this instance no longer accepts writes")]
    HandingOver { to: String },
    #[error("the replica was handed over to {to} at TXID {txid}: this instance no longer accepts writes")]
    HandedOver { to: String, txid: u64 },
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("timed out after {0:?} waiting for the replica")]
    Timeout(Duration),
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
    /// Another writer took over the replica; this instance no longer ships.
    pub fenced: bool,
    /// A starting instance asked for the replica: this one refuses writes and hands over.
    pub handing_over_to: Option<String>,
    /// The hand-over finished: everything up to this TXID is shipped and the lease released.
    pub handed_over_txid: Option<u64>,
    /// Segments stored / checkpoints run since start.
    pub segments: u64,
    pub checkpoints: u64,
    /// The last background verification, if one ran.
    pub verification: Option<Verification>,
}

/// The outcome of one background verification.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The TXID restored and compared.
    pub txid: u64,
    /// `None` when the restored replica matched the live database; the reason otherwise.
    pub error: Option<String>,
    /// When it finished.
    pub at: SystemTime,
}

/// Handle on a running replicator.
pub struct Replicator {
    shared: Arc<Shared>,
    stop: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<Result<u64, ReplicaError>>,
}

struct Shared {
    signal: Arc<CommitSignal>,
    store: Store,
    status: Mutex<Status>,
    shipped: watch::Sender<u64>,
    /// When the first commit not yet shipped was observed.
    pending_since: Mutex<Option<Instant>>,
    /// The single-writer lease, if the deployment uses one; renewed before writes.
    lease: tokio::sync::Mutex<Option<Lease>>,
}

impl Replicator {
    /// Starts replicating the database at `db`, whose application connections report commits
    /// to `signal`. If the replica is empty (or continuity with it cannot be proven) the first
    /// segment is a full image of the database.
    ///
    /// `lineage` identifies the database (see `keycast_db::meta`); it is recorded locally and,
    /// for a new replica, in the replica.
    ///
    /// # Errors
    /// Store, SQLite and I/O errors during the initial alignment.
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
    /// writes when due, a lost lease fences this instance, and shutdown releases it.
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
        let shared = Arc::new(Shared {
            signal: signal.clone(),
            store: store.clone(),
            status: Mutex::new(Status::default()),
            shipped,
            pending_since: Mutex::new(None),
            lease: tokio::sync::Mutex::new(lease),
        });
        let mut worker = Worker::open(db, store, signal, lineage, options, shared.clone()).await?;
        worker.align().await?;
        shared.status.lock().expect("status lock").replicated_txid = worker.cursor.txid;
        let (stop, stop_rx) = watch::channel(None);
        worker.publish_shipped(worker.shipped_mark);
        let task = tokio::spawn(worker.run(stop_rx));
        Ok(Replicator { shared, stop, task })
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

    /// Ships the last committed frames (trying until `deadline`), records a clean stop, and
    /// closes the replicator's connections. Call after the application's pool is closed.
    ///
    /// # Errors
    /// The last upload error if the final sync did not finish by `deadline`.
    pub async fn shutdown(self, deadline: Instant) -> Result<u64, ReplicaError> {
        let _ = self.stop.send(Some(deadline));
        self.shared.signal.wake();
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ReplicaError::LocalState(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Read-only view of a replicator's [`Status`].
#[derive(Clone)]
pub struct Monitor(Arc<Shared>);

impl Monitor {
    /// Current replication status.
    pub fn status(&self) -> Status {
        self.0.snapshot_status()
    }

    /// Whether this instance may still accept writes: not fenced, and its lease (if any)
    /// still ours — renewed now if it is due, so a write after a long idle period learns
    /// of a takeover *before* it is accepted rather than after. A renewal that fails only
    /// because the store is unreachable does not refuse the write.
    ///
    /// # Errors
    /// [`ReplicaError::Fenced`]-like errors saying why writes are refused.
    pub async fn check_writable(&self) -> Result<(), ReplicaError> {
        if let Some(refused) = self.0.refusal() {
            return Err(refused);
        }
        // A renewal that cannot finish quickly means the store is struggling (see below). It
        // runs as its own task so that giving up waiting never cancels a compare-and-swap
        // half way, which would leave this instance with a stale lease version.
        let shared = self.0.clone();
        let renewal = tokio::spawn(async move { shared.keep_lease().await });
        let renewal = match tokio::time::timeout(LEASE_CHECK_TIMEOUT, renewal).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ReplicaError::LocalState(std::io::Error::other(join.to_string()))),
            Err(_) => Err(ReplicaError::Timeout(LEASE_CHECK_TIMEOUT)),
        };
        match renewal {
            Err(e @ ReplicaError::LeaseLost { .. }) => {
                self.0.fence();
                Err(e)
            }
            Err(e @ ReplicaError::HandingOver { .. }) => Err(e),
            // The store is unreachable: nobody else can take the lease through it either, so
            // async writes go on (they ship when it is back); durable ones wait and fail.
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the replica lease now; accepting the write, it ships when the store is back");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Waits until every commit the application made before this call is in the object store.
    ///
    /// # Errors
    /// [`ReplicaError::Timeout`] if that takes longer than `timeout`; [`ReplicaError::Fenced`]
    /// or [`ReplicaError::Stopped`] if it can never happen. Never a false success.
    pub async fn wait_durable(&self, timeout: Duration) -> Result<u64, ReplicaError> {
        let wanted = self.0.signal.commits();
        self.0.signal.wake();
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
    /// Before a write or a shipment: renews the lease when due, or looks for a hand-over
    /// request when the last look is old enough ([`Lease::keep`]); no request otherwise.
    ///
    /// # Errors
    /// [`ReplicaError::HandingOver`] once a starting instance asked for the replica (the
    /// hand-over is then under way); [`ReplicaError::LeaseLost`]; store errors.
    async fn keep_lease(&self) -> Result<(), ReplicaError> {
        if let Some(to) = self.handing_over_to() {
            return Err(ReplicaError::HandingOver { to });
        }
        let mut lease = self.lease.lock().await;
        let Some(held) = lease.as_mut() else {
            return Ok(());
        };
        if let Some(to) = held.handover_requested_by() {
            return Err(ReplicaError::HandingOver { to: to.to_owned() });
        }
        match held.keep().await {
            Ok(()) => Ok(()),
            Err(LeaseError::HandoverRequested { by }) => {
                self.begin_handover(&by);
                Err(ReplicaError::HandingOver { to: by })
            }
            Err(LeaseError::Lost { by }) => Err(ReplicaError::LeaseLost { by }),
            Err(other) => Err(ReplicaError::Lease(other)),
        }
    }

    /// During the hand-over's final shipment: the lease is still ours until released, so
    /// only renew it if due (keeping the request in it).
    async fn keep_lease_handing_over(&self) -> Result<(), ReplicaError> {
        let mut lease = self.lease.lock().await;
        match lease.as_mut() {
            Some(held) if held.needs_renewal() => match held.renew().await {
                Ok(()) | Err(LeaseError::HandoverRequested { .. }) => Ok(()),
                Err(LeaseError::Lost { by }) => Err(ReplicaError::LeaseLost { by }),
                Err(other) => Err(ReplicaError::Lease(other)),
            },
            _ => Ok(()),
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

    fn handing_over_to(&self) -> Option<String> {
        self.status.lock().expect("status lock").handing_over_to.clone()
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

    fn record_verification(&self, txid: u64, error: Option<String>) {
        metrics::gauge!("keycast_replica_verification_ok").set(if error.is_none() { 1.0 } else { 0.0 });
        metrics::gauge!("keycast_replica_verification_txid").set(txid as f64);
        match &error {
            None => tracing::info!(txid, "verified: the replica restores to exactly the live database"),
            Some(e) => {
                tracing::error!(txid, error = %e, "VERIFICATION FAILED: the replica does not restore to the live database")
            }
        }
        self.status.lock().expect("status lock").verification = Some(Verification {
            txid,
            error,
            at: SystemTime::now(),
        });
    }

    /// Stops this instance from writing the replica, for good.
    fn fence(&self) {
        self.status.lock().expect("status lock").fenced = true;
        metrics::gauge!("keycast_replica_fenced").set(1.0);
        tracing::error!("this instance is fenced: another writer owns the replica; refusing writes from now on");
    }

    fn snapshot_status(&self) -> Status {
        let mut status = self.status.lock().expect("status lock").clone();
        status.local_commits = self.signal.commits();
        status.shipped_commits = *self.shipped.borrow();
        status.lag_seconds = match *self.pending_since.lock().expect("pending lock") {
            Some(since) if status.local_commits > status.shipped_commits => since.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        status
    }
}

/// The state owned by the background task.
struct Worker {
    db: PathBuf,
    store: Store,
    signal: Arc<CommitSignal>,
    lineage: String,
    options: ReplicaOptions,
    cursor: Cursor,
    /// Holds SQLite's write lock while checkpointing or taking a full image.
    lock_conn: SqliteConnection,
    /// Runs the checkpoints (a checkpoint cannot run inside the lock connection's transaction).
    checkpoint_conn: SqliteConnection,
    shared: Arc<Shared>,
    /// Commit counter value known to be shipped.
    shipped_mark: u64,
    last_checkpoint: Instant,
    shipped_since_checkpoint: bool,
    compaction: compactor::Schedule,
    last_verify: Instant,
    shipped_since_verify: bool,
    verifying: Option<tokio::task::JoinHandle<()>>,
    /// `lock_conn` holds SQLite's write lock (inside a checkpoint or a full image).
    locked: bool,
    /// The read snapshot held between rounds (see [`crate::snapshot`]).
    snapshot: Snapshot,
    /// Shipping the last frames for a hand-over: the lease is only renewed, not checked.
    handing_over: bool,
    /// The hand-over is done: `lock_conn` keeps the write lock and nothing ships any more.
    handed_over: bool,
    /// After a hand-over: the lease this instance released, to take back if the requester
    /// never took it (see [`Worker::reclaim`]).
    released: Option<Released>,
}

/// A lease released by a hand-over, and when.
struct Released {
    owner: String,
    epoch: u64,
    options: LeaseOptions,
    at: Instant,
}

impl Worker {
    async fn open(
        db: &Path,
        store: Store,
        signal: Arc<CommitSignal>,
        lineage: &str,
        options: ReplicaOptions,
        shared: Arc<Shared>,
    ) -> Result<Worker, ReplicaError> {
        let connect = SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(Duration::from_secs(5))
            .pragma("wal_autocheckpoint", "0");
        let lock_conn = connect.clone().connect().await?;
        let checkpoint_conn = connect.connect().await?;
        let page_size = segment::page_size_of(db)?;
        let compaction = compactor::Schedule::new(&options.compaction);
        Ok(Worker {
            db: db.to_owned(),
            store,
            signal,
            lineage: lineage.to_owned(),
            options,
            cursor: Cursor {
                txid: 0,
                commit: 0,
                page_size,
                wal: None,
                reset_expected: false,
            },
            lock_conn,
            checkpoint_conn,
            shared,
            shipped_mark: 0,
            last_checkpoint: Instant::now(),
            shipped_since_checkpoint: false,
            compaction,
            last_verify: Instant::now(),
            shipped_since_verify: false,
            verifying: None,
            locked: false,
            snapshot: Snapshot::open(db).await?,
            handing_over: false,
            handed_over: false,
            released: None,
        })
    }

    /// Establishes where shipping resumes: from the local record when it provably matches
    /// the replica, otherwise with a full image at the next TXID (TXID 1 on an empty replica).
    async fn align(&mut self) -> Result<(), ReplicaError> {
        let remote_max = self
            .store
            .list_all()
            .await?
            .iter()
            .map(|f| f.max_txid)
            .max()
            .unwrap_or(0);
        let record = local_state::load(&self.db)?;
        self.shipped_mark = self.signal.commits();
        if let Some(record) = record.filter(|r| r.txid == remote_max && remote_max > 0) {
            self.cursor = Cursor {
                txid: record.txid,
                commit: record.commit,
                page_size: record.page_size,
                wal: record.wal,
                reset_expected: record.clean,
            };
            if self.changed_while_down(&record)? {
                tracing::warn!("the database file changed while keycast was down; shipping a full image");
                return self.ship_full_image().await;
            }
            tracing::info!(
                txid = record.txid,
                clean = record.clean,
                "replication resumes from the local record"
            );
            // Anything committed after the record (a crash before the last upload) ships now;
            // a WAL generation that cannot be tied to the record gets a full image instead.
            return self.sync_all().await.map(|_| ());
        }
        if remote_max == 0 {
            let _ = self
                .store
                .put_object_create("keycast/lineage.json", lineage_document(&self.lineage))
                .await?;
        }
        self.cursor.txid = remote_max;
        self.ship_full_image().await
    }

    /// After a clean stop the file alone held the shipped state. Only the replicator
    /// checkpoints, so nothing keycast did since (migrations included) has touched the file:
    /// a different checksum means another program wrote to it while keycast was down.
    fn changed_while_down(&self, record: &LocalState) -> Result<bool, ReplicaError> {
        let Some(expected) = record.db_checksum.filter(|_| record.clean) else {
            return Ok(false);
        };
        Ok(crate::checksum::database_checksum_path(&self.db, record.page_size)? != expected)
    }

    /// Takes SQLite's write lock (unless held already), then ships a full image of the
    /// database at the next TXID.
    async fn ship_full_image(&mut self) -> Result<(), ReplicaError> {
        let took_lock = self.lock().await?;
        let result = async {
            let mark = self.signal.commits();
            let (db, txid) = (self.db.clone(), self.cursor.txid + 1);
            let segment = tokio::task::spawn_blocking(move || segment::full_image(&db, txid, now_ms()))
                .await
                .map_err(|e| ReplicaError::LocalState(std::io::Error::other(e.to_string())))??;
            self.put(segment).await?;
            self.shipped_mark = mark;
            tracing::info!(txid, "shipped a full image of the database");
            Ok(())
        }
        .await;
        if took_lock {
            self.unlock().await?;
        }
        result
    }

    /// Takes SQLite's write lock on `lock_conn`: no commit can land until [`Self::unlock`].
    /// The read snapshot is refreshed under the lock so that it covers every commit (and so
    /// does not hold back our own checkpoint). Returns false when the lock is already held.
    async fn lock(&mut self) -> Result<bool, ReplicaError> {
        if self.locked {
            return Ok(false);
        }
        sqlx::query("BEGIN IMMEDIATE").execute(&mut self.lock_conn).await?;
        self.locked = true;
        self.snapshot.refresh().await?;
        Ok(true)
    }

    /// Refreshes the snapshot while still holding the lock (after a full checkpoint it then
    /// reads from the database file only, which lets the next writer restart the WAL), then
    /// releases the write lock.
    async fn unlock(&mut self) -> Result<(), ReplicaError> {
        let refreshed = self.snapshot.refresh().await;
        self.locked = false;
        sqlx::query("ROLLBACK").execute(&mut self.lock_conn).await?;
        Ok(refreshed?)
    }

    /// Stores one segment create-only and advances the cursor.
    async fn put(&mut self, segment: Segment) -> Result<(), ReplicaError> {
        let lease = if self.handing_over {
            self.shared.keep_lease_handing_over().await
        } else {
            self.shared.keep_lease().await
        };
        if let Err(e) = lease {
            if matches!(e, ReplicaError::LeaseLost { .. }) {
                self.shared.fence();
            }
            return Err(e);
        }
        let size = segment.bytes.len();
        match self
            .store
            .put_ltx(0, segment.txid, segment.txid, Bytes::from(segment.bytes), now_ms())
            .await?
        {
            PutOutcome::Created => {}
            PutOutcome::AlreadyExists => {
                tracing::error!(
                    txid = segment.txid,
                    "another writer already stored this TXID in the replica"
                );
                self.shared.fence();
                return Err(ReplicaError::Fenced { txid: segment.txid });
            }
        }
        self.cursor = segment.next;
        self.shipped_since_checkpoint = true;
        self.shipped_since_verify = true;
        self.compaction.note_shipped();
        local_state::store(&self.db, &self.record(false))?;
        metrics::counter!("keycast_replica_segments_total").increment(1);
        metrics::gauge!("keycast_replica_txid").set(self.cursor.txid as f64);
        tracing::debug!(
            txid = segment.txid,
            bytes = size,
            commits = segment.commits,
            "segment stored"
        );
        {
            let shared = &self.shared;
            let mut status = shared.status.lock().expect("status lock");
            status.replicated_txid = self.cursor.txid;
            status.segments += 1;
            status.last_error = None;
            status.failing_since = None;
        }
        Ok(())
    }

    fn record(&self, clean: bool) -> LocalState {
        LocalState {
            lineage: self.lineage.clone(),
            replica: self.store.describe(),
            txid: self.cursor.txid,
            commit: self.cursor.commit,
            page_size: self.cursor.page_size,
            wal: self.cursor.wal,
            clean,
            db_checksum: None,
            updated_at_ms: now_ms(),
            last_error: None,
            verification: self
                .shared
                .status
                .lock()
                .expect("status lock")
                .verification
                .as_ref()
                .map(|v| local_state::VerificationRecord {
                    txid: v.txid,
                    at_ms: v
                        .at
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0),
                    error: v.error.clone(),
                }),
        }
    }

    /// Ships segments until nothing committed is left unshipped. Returns how many it stored.
    async fn sync_all(&mut self) -> Result<usize, ReplicaError> {
        self.sync(false).await
    }

    /// Ships segments until caught up — or, with `yield_for_checkpoint`, until the WAL has
    /// grown past the checkpoint threshold: under sustained writes the loop would otherwise
    /// never end and the WAL would grow without bound.
    async fn sync(&mut self, yield_for_checkpoint: bool) -> Result<usize, ReplicaError> {
        let mut stored = 0;
        loop {
            let mark = self.signal.commits();
            let next = self.read_next_segment().await?;
            match next {
                Ok(Some(segment)) => {
                    self.put(segment).await?;
                    stored += 1;
                    if yield_for_checkpoint && self.wal_frames() >= u64::from(self.options.checkpoint_pages) {
                        return Ok(stored);
                    }
                }
                Ok(None) => {
                    self.shipped_mark = mark;
                    self.publish_shipped(mark);
                    return Ok(stored);
                }
                Err(SegmentError::ContinuityLost) => {
                    tracing::warn!("the WAL restarted outside the replicator's control; shipping a full image");
                    self.ship_full_image().await?;
                    stored += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads the next segment while a read snapshot is held (see [`crate::snapshot`]).
    async fn read_next_segment(&mut self) -> Result<Result<Option<Segment>, SegmentError>, ReplicaError> {
        if !self.locked && !self.snapshot.is_held() {
            self.snapshot.refresh().await?;
        }
        let (db, cursor, max) = (self.db.clone(), self.cursor, self.options.max_segment_bytes);
        tokio::task::spawn_blocking(move || segment::next_wal_segment(&db, &cursor, max, now_ms()))
            .await
            .map_err(|e| ReplicaError::LocalState(std::io::Error::other(e.to_string())))
    }

    fn publish_shipped(&self, mark: u64) {
        {
            let shared = &self.shared;
            shared.shipped.send_if_modified(|v| {
                let changed = mark > *v;
                *v = (*v).max(mark);
                changed
            });
            let mut pending = shared.pending_since.lock().expect("pending lock");
            *pending = if self.signal.commits() > mark {
                Some(Instant::now())
            } else {
                None
            };
        }
    }

    /// The background loop; returns the replicated TXID at the end.
    async fn run(mut self, mut stop: watch::Receiver<Option<Instant>>) -> Result<u64, ReplicaError> {
        let mut backoff = self.options.retry_min;
        let mut failing = false;
        loop {
            let requested = *stop.borrow();
            if let Some(deadline) = requested {
                return self.finish(deadline).await;
            }
            if self.handed_over {
                // Parked until shutdown, holding the write lock; one look at the lease after
                // a TTL, in case the instance that asked for it never came.
                let reclaim_in = self
                    .released
                    .as_ref()
                    .map(|r| r.options.ttl.saturating_sub(r.at.elapsed()));
                tokio::select! {
                    changed = stop.changed() => if changed.is_err() {
                        return Ok(self.cursor.txid);
                    },
                    () = tokio::time::sleep(reclaim_in.unwrap_or(Duration::from_secs(3600))) => {
                        if reclaim_in.is_some() {
                            self.reclaim().await?;
                        }
                    }
                }
                continue;
            }
            if let Some(to) = self.shared.handing_over_to() {
                self.hand_over(&to, &stop).await?;
                continue;
            }
            let wait = if failing { backoff } else { self.next_timer() };
            tokio::select! {
                () = self.signal.wait() => self.note_pending(),
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => continue,
            }
            match self.step().await {
                Ok(()) => {
                    failing = false;
                    backoff = self.options.retry_min;
                }
                Err(e @ (ReplicaError::Fenced { .. } | ReplicaError::LeaseLost { .. })) => return Err(e),
                // The next round hands over.
                Err(ReplicaError::HandingOver { .. }) => {
                    self.reset_transactions().await;
                    failing = false;
                }
                Err(e) => {
                    self.note_failure(&e);
                    self.reset_transactions().await;
                    failing = true;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
    }

    fn note_pending(&self) {
        {
            let shared = &self.shared;
            let mut pending = shared.pending_since.lock().expect("pending lock");
            if pending.is_none() && self.signal.commits() > self.shipped_mark {
                *pending = Some(Instant::now());
            }
        }
    }

    /// After a failed round, returns `lock_conn` to a known state: no transaction open.
    async fn reset_transactions(&mut self) {
        let _ = sqlx::query("ROLLBACK").execute(&mut self.lock_conn).await;
        self.locked = false;
        self.snapshot.release().await;
        let _ = self.snapshot.refresh().await;
    }

    fn note_failure(&self, error: &ReplicaError) {
        metrics::counter!("keycast_replica_sync_errors_total").increment(1);
        tracing::warn!(error = %error, "replication attempt failed; retrying");
        // Best effort: lets `keycast replica status` in another process show the error.
        let mut record = self.record(false);
        record.last_error = Some(error.to_string());
        let _ = local_state::store(&self.db, &record);
        {
            let shared = &self.shared;
            let mut status = shared.status.lock().expect("status lock");
            status.last_error = Some(error.to_string());
            status.failing_since.get_or_insert_with(Instant::now);
        }
    }

    /// One round: ship what is committed, then checkpoint and compact if due.
    async fn step(&mut self) -> Result<(), ReplicaError> {
        self.sync(true).await?;
        if self.checkpoint_due() {
            self.checkpoint().await?;
        }
        if self.verify_due() {
            self.start_verification().await?;
        }
        if self.compaction.due() {
            compactor::run_due(
                &self.store,
                &self.options.compaction,
                &mut self.compaction,
                SystemTime::now(),
            )
            .await?;
        }
        Ok(())
    }

    fn next_timer(&self) -> Duration {
        let checkpoint = if self.shipped_since_checkpoint {
            self.options
                .checkpoint_interval
                .saturating_sub(self.last_checkpoint.elapsed())
        } else {
            Duration::from_secs(3600)
        };
        let verify = if self.shipped_since_verify && !self.options.verify_interval.is_zero() {
            self.options.verify_interval.saturating_sub(self.last_verify.elapsed())
        } else {
            Duration::from_secs(3600)
        };
        checkpoint
            .min(self.compaction.next_in())
            .min(verify)
            .max(Duration::from_millis(1))
    }

    fn verify_due(&self) -> bool {
        !self.options.verify_interval.is_zero()
            && self.shipped_since_verify
            && self.last_verify.elapsed() >= self.options.verify_interval
            && self.verifying.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Takes the live database's checksum at the shipped TXID (under the write lock, so both
    /// are the same state), then restores that TXID and compares, in the background.
    async fn start_verification(&mut self) -> Result<(), ReplicaError> {
        let took_lock = self.lock().await?;
        let measured = async {
            self.sync_all().await?;
            let db = self.db.clone();
            let sum = tokio::task::spawn_blocking(move || segment::LiveImage::open(&db)?.checksum())
                .await
                .map_err(|e| ReplicaError::LocalState(std::io::Error::other(e.to_string())))??;
            Ok::<_, ReplicaError>((self.cursor.txid, sum))
        }
        .await;
        if took_lock {
            self.unlock().await?;
        }
        let (txid, expected) = measured?;
        self.last_verify = Instant::now();
        self.shipped_since_verify = false;
        let (store, shared) = (self.store.clone(), self.shared.clone());
        let scratch = self.db.parent().map(Path::to_owned).unwrap_or_else(std::env::temp_dir);
        self.verifying = Some(tokio::spawn(async move {
            let result = crate::verify::verify_at(&store, txid, expected, &scratch).await;
            shared.record_verification(txid, result.err().map(|e| e.to_string()));
        }));
        Ok(())
    }

    fn checkpoint_due(&self) -> bool {
        let frames = self.wal_frames();
        frames >= u64::from(self.options.checkpoint_pages)
            || (self.shipped_since_checkpoint && self.last_checkpoint.elapsed() >= self.options.checkpoint_interval)
    }

    /// Frames in the current WAL generation up to the shipped position. (The file's size
    /// would overcount: SQLite restarts the WAL in place without shrinking it.)
    fn wal_frames(&self) -> u64 {
        if self.cursor.reset_expected {
            return 0; // fully checkpointed; the next write starts a new WAL generation
        }
        let offset = self.cursor.wal.map_or(0, |c| c.offset);
        offset.saturating_sub(32) / (24 + u64::from(self.cursor.page_size))
    }

    /// Under the write lock: ship the rest, then PASSIVE-checkpoint from the other connection.
    async fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        // Ship what is there before taking the write lock, so writers wait only for the tail.
        self.sync(true).await?;
        let took_lock = self.lock().await?;
        let result = async {
            self.sync_all().await?;
            let (_busy, log, done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut self.checkpoint_conn)
                .await?;
            // Every frame is in the database file: the next writer may restart the WAL, and
            // that restart continues exactly the shipped state.
            self.cursor.reset_expected = log >= 0 && log == done;
            Ok::<_, ReplicaError>((log, done))
        }
        .await;
        if took_lock {
            self.unlock().await?;
        }
        let (log, done) = result?;
        self.last_checkpoint = Instant::now();
        self.shipped_since_checkpoint = false;
        metrics::counter!("keycast_replica_checkpoints_total", "mode" => "passive").increment(1);
        {
            let shared = &self.shared;
            shared.status.lock().expect("status lock").checkpoints += 1;
        }
        tracing::debug!(log, done, "checkpointed");
        Ok(())
    }

    /// Hands the replica over to `to`: under SQLite's write lock (so no commit can land
    /// after it), ships every committed frame, then releases the lease. The lock stays held
    /// until shutdown. Store failures are retried until shutdown's deadline.
    ///
    /// # Errors
    /// Fenced or lost lease; the last store error when shutdown's deadline passed.
    async fn hand_over(&mut self, to: &str, stop: &watch::Receiver<Option<Instant>>) -> Result<(), ReplicaError> {
        self.handing_over = true;
        let mut backoff = self.options.retry_min;
        loop {
            let shipped = async {
                self.lock().await?;
                self.sync_all().await
            }
            .await;
            match shipped {
                Ok(_) => break,
                Err(e @ (ReplicaError::Fenced { .. } | ReplicaError::LeaseLost { .. })) => return Err(e),
                Err(e) => {
                    if stop
                        .borrow()
                        .is_some_and(|deadline| Instant::now() + backoff >= deadline)
                    {
                        tracing::error!(error = %e, txid = self.cursor.txid, %to, "the hand-over could not ship the last commits; they are only on local disk");
                        return Err(e);
                    }
                    self.note_failure(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
        let txid = self.cursor.txid;
        if let Some(lease) = self.shared.lease.lock().await.take() {
            let released = Released {
                owner: lease.owner().to_owned(),
                epoch: lease.epoch(),
                options: lease.options(),
                at: Instant::now(),
            };
            match lease.release().await {
                Ok(()) => self.released = Some(released),
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the replica lease; the newcomer takes it when it lapses")
                }
            }
        }
        self.handed_over = true;
        {
            let mut status = self.shared.status.lock().expect("status lock");
            status.handed_over_txid = Some(txid);
            status.last_error = None;
            status.failing_since = None;
        }
        // Wake durable waiters: theirs is shipped, or will never be.
        self.shared.shipped.send_modify(|_| {});
        metrics::counter!("keycast_replica_handovers_total").increment(1);
        tracing::info!(%to, txid, "handed the replica over: every committed transaction is in the replica and the lease is released; this instance accepts no more writes");
        Ok(())
    }

    /// A TTL after a hand-over: if the lease is still as this instance released it (the
    /// instance that asked was stopped before it took over), take it back and resume. The
    /// write lock was held throughout, so the local database is exactly the replica's state.
    /// A lease someone else took leaves this instance handed over; an unreadable one is
    /// looked at again a TTL later.
    ///
    /// # Errors
    /// SQLite errors when releasing the write lock.
    async fn reclaim(&mut self) -> Result<(), ReplicaError> {
        let Some(released) = self.released.take() else {
            return Ok(());
        };
        let lease = match Lease::reclaim(&self.store, &released.owner, released.epoch, released.options).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot look at the replica lease after the hand-over; trying again in a TTL");
                self.released = Some(Released {
                    at: Instant::now(),
                    ..released
                });
                return Ok(());
            }
        };
        let (epoch, to) = (lease.epoch(), self.shared.handing_over_to().unwrap_or_default());
        *self.shared.lease.lock().await = Some(lease);
        {
            let mut status = self.shared.status.lock().expect("status lock");
            status.handing_over_to = None;
            status.handed_over_txid = None;
        }
        self.handing_over = false;
        self.handed_over = false;
        metrics::gauge!("keycast_replica_handing_over").set(0.0);
        tracing::warn!(%to, epoch, txid = self.cursor.txid, "the instance that asked for the replica never took it: resuming as its writer");
        self.unlock().await
    }

    /// Final sync, retried until `deadline`; then the clean-stop record and closed connections.
    async fn finish(mut self, deadline: Instant) -> Result<u64, ReplicaError> {
        if self.shared.handing_over_to().is_some() {
            // Asked to hand over while stopping: the final sync is the hand-over.
            self.handing_over = true;
        }
        let mut backoff = self.options.retry_min;
        while !self.handed_over {
            match self.sync_all().await {
                Ok(_) => break,
                Err(e @ (ReplicaError::Fenced { .. } | ReplicaError::LeaseLost { .. })) => return Err(e),
                Err(e) if Instant::now() + backoff >= deadline => {
                    tracing::error!(error = %e, txid = self.cursor.txid, "final sync failed; the last commits are only on local disk");
                    return Err(e);
                }
                Err(e) => {
                    self.note_failure(&e);
                    self.reset_transactions().await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
        let mut record = self.record(true);
        if let Some(lease) = self.shared.lease.lock().await.take() {
            match lease.release().await {
                Ok(()) => tracing::info!("released the replica lease"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the replica lease; a successor waits for it to expire")
                }
            }
        }
        let (db, page_size, txid) = (self.db.clone(), self.cursor.page_size, self.cursor.txid);
        let Worker {
            snapshot,
            lock_conn,
            checkpoint_conn,
            ..
        } = self;
        snapshot.close().await;
        let _ = lock_conn.close().await;
        let _ = checkpoint_conn.close().await;
        // If ours were the last connections, SQLite folded the WAL into the file and removed
        // it; the file alone is then the state at this TXID, and its checksum proves it later.
        if !segment::wal_path(&db).exists() {
            record.db_checksum = crate::checksum::database_checksum_path(&db, page_size).ok();
        }
        local_state::store(&db, &record)?;
        Ok(txid)
    }
}

fn lineage_document(lineage: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "lineage": lineage, "created_at_ms": now_ms() }).to_string())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
