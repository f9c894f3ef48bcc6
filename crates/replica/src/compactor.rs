//! Compaction, snapshots and retention, written against [`Store`] only.
//!
//! Laid out as Litestream 0.5 does, so its `restore` reads our replicas:
//! - **Level n (1–8)** merges the level n−1 files newer than level n's newest file into one
//!   file (newest page wins), every `levels[n-1]` interval — by default L1 every 10 s, L2
//!   every 5 min, L3 every hour.
//! - **Level 9** holds snapshots `1-<txid>`: the whole database, every `snapshot_interval`.
//! - **Retention** deletes snapshots older than `snapshot_retention` (always keeping the
//!   newest), compacted files wholly below the oldest kept snapshot, and L0 files older than
//!   `l0_retention` that L1 already covers.
//!
//! The replicator runs compaction in a task of its own, beside shipping ([`Schedule::take_due`]
//! hands it a [`Run`], [`Schedule::finished`] takes the outcome back): a slow store delays
//! compaction, never an upload. Because compaction deletes objects, retention asks its caller
//! right before deleting whether this instance may still write ([`run`]'s `may_delete`), and
//! the replicator stops a running compaction before it lets go of the lease.
//!
//! Work happens only when something new was shipped since the last run, so an idle
//! database costs no object-store requests. A failing run backs off (capped exponential,
//! 5 s up to 5 min) and, while nothing new is shipped, gives up after
//! [`GIVE_UP_AFTER`] attempts, so a broken store does not turn an idle instance into a
//! stream of requests.
//!
//! Compaction only ever reads files up to the TXID its caller shipped itself: an object past
//! that may be a stale writer's, about to be replaced, and must never be merged into a level.
//!
//! A merge applies its inputs in order to a sparse temporary page file in the scratch
//! directory (as a restore does, see [`crate::apply`]) and encodes the pages written into a
//! [`SpillWriter`]: memory stays bounded whatever the size of the database or of the inputs.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::apply::Fetching;
use crate::ltx::{Encoder, Header, FLAG_NO_CHECKSUM};
use crate::restore::{self, RestoreError, Target};
use crate::spill::{Body, SpillWriter, DEFAULT_SPILL_LIMIT};
use crate::store::{LtxObject, PutOutcome, Store};
use crate::ReplicaError;

mod known;
pub use known::Known;

/// Level 9: snapshots.
pub const SNAPSHOT_LEVEL: u8 = 9;
/// First retry delay after a failed run; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest delay between retries of a failing run.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Failed runs in a row after which, until something new is shipped, no retry is scheduled.
pub const GIVE_UP_AFTER: u32 = 8;

/// When to compact, snapshot and delete. Defaults follow Litestream 0.5 but for level 1.
#[derive(Debug, Clone)]
pub struct CompactionPolicy {
    /// Interval of each compaction level, L1 first. Default 10 s, 5 min, 1 h. (Litestream's
    /// L1 is 30 s; 10 s keeps the level-0 tail a cold start must fetch file by file to a
    /// third — under 1000 files at 100 writes/s — for the same total compaction work. It
    /// runs beside shipping, so a slow store does not make durable commits wait for it.)
    pub levels: Vec<Duration>,
    /// How often a full snapshot (level 9) is written. Default 24 h.
    pub snapshot_interval: Duration,
    /// How long snapshots are kept (the newest always is). Default 24 h.
    pub snapshot_retention: Duration,
    /// How long L0 files are kept once L1 covers them. Default 5 min.
    pub l0_retention: Duration,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            levels: vec![
                Duration::from_secs(10),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ],
            snapshot_interval: Duration::from_secs(24 * 3600),
            snapshot_retention: Duration::from_secs(24 * 3600),
            l0_retention: Duration::from_secs(300),
        }
    }
}

/// When each level is next due, and whether it has new input.
#[derive(Debug)]
pub struct Schedule {
    next: Vec<Instant>,
    dirty: Vec<bool>,
    snapshot_next: Instant,
    snapshot_dirty: bool,
    /// Failed runs in a row.
    failures: u32,
    /// No run before this, after a failure.
    retry_at: Option<Instant>,
    /// Gave up retrying until something new is shipped.
    stalled: bool,
}

impl Schedule {
    /// A schedule whose first runs are one interval from now.
    pub fn new(policy: &CompactionPolicy) -> Self {
        let now = Instant::now();
        Self {
            next: policy.levels.iter().map(|i| now + *i).collect(),
            dirty: vec![false; policy.levels.len()],
            snapshot_next: now + policy.snapshot_interval,
            snapshot_dirty: false,
            failures: 0,
            retry_at: None,
            stalled: false,
        }
    }

    /// Times the next snapshot from the newest one in the replica (`None`: there is none),
    /// not from this process's start: an instance replaced more often than the interval (a
    /// deploy a day, a restart) would otherwise never write one, and then nothing above
    /// level 0 would ever expire. A replica without a snapshot gets one with the next
    /// shipped file.
    pub fn snapshot_after(&mut self, newest: Option<SystemTime>, policy: &CompactionPolicy) {
        let now = Instant::now();
        self.snapshot_next = match newest {
            Some(at) => {
                let age = SystemTime::now().duration_since(at).unwrap_or_default();
                now + policy.snapshot_interval.saturating_sub(age)
            }
            None => now,
        };
    }

    /// A run succeeded: the backoff starts over.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.stalled = false;
    }

    /// A run failed: schedules the retry after a capped exponential backoff, and returns it;
    /// `None` when it gave up until something new is shipped.
    pub fn failed(&mut self) -> Option<Duration> {
        self.failures += 1;
        if self.failures >= GIVE_UP_AFTER {
            self.stalled = true;
            self.retry_at = None;
            return None;
        }
        let delay = RETRY_MIN
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(RETRY_MAX);
        self.retry_at = Some(Instant::now() + delay);
        Some(delay)
    }

    /// A new L0 file exists: L1 and the snapshot have work.
    pub fn note_shipped(&mut self) {
        if let Some(first) = self.dirty.first_mut() {
            *first = true;
        }
        self.snapshot_dirty = true;
        if self.stalled {
            // New data: worth one more attempt, with the backoff where it was.
            self.stalled = false;
            self.failures = GIVE_UP_AFTER - 1;
            self.retry_at = Some(Instant::now() + RETRY_MAX);
        }
    }

    /// Whether any level with new input has reached its time (and no failure backoff or
    /// give-up holds it back).
    pub fn due(&self) -> bool {
        let now = Instant::now();
        if self.stalled || self.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        self.dirty.iter().zip(&self.next).any(|(d, n)| *d && now >= *n)
            || (self.snapshot_dirty && now >= self.snapshot_next)
    }

    /// Time until the next due run; an hour when nothing has new input (or it gave up).
    pub fn next_in(&self) -> Duration {
        let now = Instant::now();
        if self.stalled {
            return Duration::from_secs(3600);
        }
        let not_before = self
            .retry_at
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        let levels = self
            .dirty
            .iter()
            .zip(&self.next)
            .filter(|(d, _)| **d)
            .map(|(_, n)| n.saturating_duration_since(now));
        let snapshot = self
            .snapshot_dirty
            .then(|| self.snapshot_next.saturating_duration_since(now));
        levels
            .chain(snapshot)
            .min()
            .map_or(Duration::from_secs(3600), |next| next.max(not_before))
    }
}

/// The work of one compaction run, taken from the [`Schedule`] when due (see
/// [`Schedule::take_due`]) and carried out by [`run`], away from the shipping loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Indices (level − 1) of the levels to compact, lowest first.
    pub levels: Vec<usize>,
    /// Whether a snapshot is due too.
    pub snapshot: bool,
}

impl Schedule {
    /// Takes every level (and the snapshot) that is due now, as one [`Run`]: each is marked
    /// done and its next time set, as if the run succeeded; [`Schedule::finished`] puts the
    /// work back if it did not. `None` when nothing is due.
    pub fn take_due(&mut self, policy: &CompactionPolicy) -> Option<Run> {
        if !self.due() {
            return None;
        }
        let now = Instant::now();
        let mut run = Run {
            levels: Vec::new(),
            snapshot: false,
        };
        for i in 0..policy.levels.len() {
            if self.dirty[i] && now >= self.next[i] {
                self.dirty[i] = false;
                self.next[i] = now + policy.levels[i];
                run.levels.push(i);
            }
        }
        if self.snapshot_dirty && now >= self.snapshot_next {
            self.snapshot_dirty = false;
            self.snapshot_next = now + policy.snapshot_interval;
            run.snapshot = true;
        }
        Some(run)
    }

    /// A run ended. Each level it compacted into gives the level above new input. A failed
    /// or stopped run puts all of its work back, due at once (after the failure backoff, for
    /// a failure; redoing a level that did finish costs a listing, nothing more). Returns
    /// the retry delay of a failure, as [`Schedule::failed`].
    pub fn finished(&mut self, run: &Run, outcome: Option<&Result<Vec<usize>, ReplicaError>>) -> Option<Duration> {
        match outcome {
            Some(Ok(compacted)) => {
                for i in compacted {
                    if let Some(next) = self.dirty.get_mut(i + 1) {
                        *next = true;
                    }
                }
                self.succeeded();
                None
            }
            failed_or_stopped => {
                let now = Instant::now();
                for &i in &run.levels {
                    self.dirty[i] = true;
                    self.next[i] = now;
                }
                if run.snapshot {
                    self.snapshot_dirty = true;
                    self.snapshot_next = now;
                }
                failed_or_stopped.and_then(|_| self.failed())
            }
        }
    }
}

/// Carries out `run`: its compaction levels, then the snapshot, then retention — reading no
/// file past TXID `upto`. The files come from `known` (see [`Known`]), kept up to date as
/// files are stored and deleted, so a run lists nothing once the index exists; a failed run
/// drops the index. Large merges are written into temporary files in `scratch`. Returns the
/// levels (as indices) that produced a new file.
///
/// Runs beside the shipping loop, so the writer may lose the lease while it does: nothing is
/// deleted unless `may_delete` says, right before the deletion, that this instance still
/// holds the lease (see [`enforce_retention_guarded`]).
///
/// # Errors
/// Store and decoding errors; [`ReplicaError::LeaseUnconfirmed`] when retention was refused
/// by `may_delete`. Nothing is deleted unless its replacement was stored.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: &Store,
    known: &Known,
    policy: &CompactionPolicy,
    run: &Run,
    now: SystemTime,
    upto: u64,
    scratch: &Path,
    may_delete: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Vec<usize>, ReplicaError> {
    let result = async {
        let mut files = known.files(store).await?;
        let held = |f: &LtxObject| known.held(f);
        let fetching = Fetching {
            ahead: crate::apply::BACKGROUND_FETCH_CONCURRENCY,
            held: &held,
        };
        let mut compacted = Vec::new();
        for &i in &run.levels {
            let inputs = inputs_for(&files, (i + 1) as u8, upto);
            if !inputs.is_empty() {
                let file = merge_into(store, (i + 1) as u8, &inputs, scratch, fetching).await?;
                if file.level == 1 {
                    known.release_through(file.max_txid);
                }
                known.note(file.clone());
                files.push(file);
                compacted.push(i);
            }
        }
        let mut changed = !compacted.is_empty();
        if run.snapshot {
            if let Some(file) = snapshot_of(store, files.clone(), upto, scratch, fetching).await? {
                known.note(file.clone());
                files.push(file);
            }
            changed = true;
        }
        if changed {
            files.sort_by_key(|f| (f.level, f.min_txid, f.max_txid));
            let doomed = doomed_among(&files, policy, now);
            if !may_delete() {
                return Err(not_the_writer());
            }
            store.delete(&doomed).await?;
            known.forget(&doomed);
            if known.prune_due(STAGING_MAX_AGE) {
                store.prune_staging(now - STAGING_MAX_AGE).await?;
            }
            metrics::counter!("keycast_replica_retention_passes_total").increment(1);
        }
        Ok(compacted)
    }
    .await;
    if result.is_err() {
        known.invalidate();
    }
    result
}

/// The level−1 files to merge into `level`: from the TXID after `level`'s newest file in
/// `files`, up to TXID `upto`, as far as they form a contiguous chain. Each step takes the
/// file that reaches furthest among those holding the next TXID, as a restore does: files of
/// one level may overlap (a paused writer's compaction landing after its successor's), and
/// one that starts before the next TXID must not stop the chain for good.
fn inputs_for(files: &[LtxObject], level: u8, upto: u64) -> Vec<LtxObject> {
    let done = files
        .iter()
        .filter(|f| f.level == level)
        .map(|f| f.max_txid)
        .max()
        .unwrap_or(0);
    let mut below: Vec<&LtxObject> = files
        .iter()
        .filter(|f| f.level == level - 1 && f.max_txid > done && f.max_txid <= upto)
        .collect();
    below.sort_by_key(|f| f.min_txid);
    // One sweep by start (a level 0 behind a stalled compaction holds tens of thousands of
    // files): every file passed has been weighed, and the one taken reaches past them all.
    let mut inputs: Vec<LtxObject> = Vec::new();
    let (mut next, mut at) = (done + 1, 0);
    loop {
        let mut best: Option<&LtxObject> = None;
        while let Some(file) = below.get(at).filter(|f| f.min_txid <= next) {
            if file.max_txid >= next && best.is_none_or(|b| file.max_txid > b.max_txid) {
                best = Some(file);
            }
            at += 1;
        }
        let Some(file) = best else { break };
        inputs.push(file.clone());
        next = file.max_txid + 1;
    }
    inputs
}

/// Merges the level−1 files that continue `level` past its newest file (see `inputs_for`:
/// one may start before it), up to TXID `upto`, into one `level` file (built in `scratch`). Returns the stored object's TXID range, or `None` when
/// there was nothing to merge.
///
/// # Errors
/// Store and decoding errors.
pub async fn compact_level(
    store: &Store,
    level: u8,
    upto: u64,
    scratch: &Path,
) -> Result<Option<(u64, u64)>, ReplicaError> {
    let mut files = store.list_level(level).await?;
    // The level below whole, not only past `done`: a file there may start before it (see
    // `inputs_for`).
    files.extend(store.list_level(level - 1).await?);
    let inputs = inputs_for(&files, level, upto);
    if inputs.is_empty() {
        return Ok(None);
    }
    let fetching = Fetching::from_store(crate::apply::BACKGROUND_FETCH_CONCURRENCY);
    let file = merge_into(store, level, &inputs, scratch, fetching).await?;
    Ok(Some((file.min_txid, file.max_txid)))
}

/// Merges `inputs` (a contiguous run, oldest first) into one `level` file and stores it.
async fn merge_into(
    store: &Store,
    level: u8,
    inputs: &[LtxObject],
    scratch: &Path,
    fetching: Fetching<'_>,
) -> Result<LtxObject, ReplicaError> {
    let (min, max) = (inputs[0].min_txid, inputs[inputs.len() - 1].max_txid);
    let (body, timestamp_ms) = merge(store, inputs, min, scratch, fetching).await?;
    let file = store_create(store, level, min, max, body, timestamp_ms).await?;
    metrics::counter!("keycast_replica_compactions_total", "level" => level.to_string()).increment(1);
    Ok(file)
}

/// Writes a level-9 snapshot of the state at the newest TXID up to `upto` the replica can
/// restore, built from the replica itself (in `scratch`).
///
/// # Errors
/// Store and decoding errors.
pub async fn snapshot(store: &Store, upto: u64, scratch: &Path) -> Result<Option<u64>, ReplicaError> {
    let files = store.list_all().await?;
    let fetching = Fetching::from_store(crate::apply::BACKGROUND_FETCH_CONCURRENCY);
    Ok(snapshot_of(store, files, upto, scratch, fetching)
        .await?
        .map(|f| f.max_txid))
}

/// As [`snapshot`], from the replica's `files`; returns the file stored, if one was.
async fn snapshot_of(
    store: &Store,
    mut files: Vec<LtxObject>,
    upto: u64,
    scratch: &Path,
    fetching: Fetching<'_>,
) -> Result<Option<LtxObject>, ReplicaError> {
    files.retain(|f| f.max_txid <= upto);
    files.sort_by_key(|f| (f.level, f.min_txid, f.max_txid));
    let plan = restore::plan(&files, Target::Latest, &store.describe())
        .map_err(|e| ReplicaError::LocalState(std::io::Error::other(e.to_string())))?;
    let max = plan.last().map_or(0, |f| f.max_txid);
    if files.iter().any(|f| f.level == SNAPSHOT_LEVEL && f.max_txid == max) {
        return Ok(None);
    }
    let (body, timestamp_ms) = merge(store, &plan, 1, scratch, fetching).await?;
    let file = store_create(store, SNAPSHOT_LEVEL, 1, max, body, timestamp_ms).await?;
    metrics::counter!("keycast_replica_snapshots_total").increment(1);
    Ok(Some(file))
}

/// Applies `inputs` in order and encodes their union (newest page wins) as one file whose
/// TXIDs start at `min`. Header: last input's commit and timestamp, as Litestream does; the
/// timestamp is returned too, because it must also become the object's CreatedAt.
async fn merge(
    store: &Store,
    inputs: &[LtxObject],
    min: u64,
    scratch: &Path,
    fetching: Fetching<'_>,
) -> Result<(Body, i64), ReplicaError> {
    std::fs::create_dir_all(scratch)?;
    let pages = tempfile::tempfile_in(scratch)?;
    let (applied, pages) = crate::apply::apply_files(store, inputs, pages, scratch, min - 1, None, fetching)
        .await
        .map_err(replica_error)?;
    if let Some(stale) = applied.stale {
        // This writer compacts only what it shipped itself; a stale file among that is damage.
        return Err(replica_error(RestoreError::StaleWriter {
            key: stale.key.to_string(),
        }));
    }
    let last = applied.last.expect("inputs is not empty");
    let header = Header {
        flags: FLAG_NO_CHECKSUM,
        page_size: last.page_size,
        commit: last.commit,
        min_txid: min,
        max_txid: last.max_txid,
        timestamp_ms: last.timestamp_ms,
        // The newest of its inputs' writers: the chain's stamps stay in order.
        node_id: applied.newest_writer,
        ..Header::default()
    };
    let scratch = scratch.to_owned();
    let body = tokio::task::spawn_blocking(move || -> Result<Body, ReplicaError> {
        let segment_error = crate::segment::SegmentError::from;
        let mut encoder =
            Encoder::with_writer(header, SpillWriter::new(&scratch, DEFAULT_SPILL_LIMIT)).map_err(segment_error)?;
        let mut page = vec![0u8; header.page_size as usize];
        for pgno in (1..=header.commit).filter(|p| applied.written.contains(*p)) {
            pages.read_exact_at(&mut page, u64::from(pgno - 1) * u64::from(header.page_size))?;
            encoder.encode_page(pgno, &page).map_err(segment_error)?;
        }
        Ok(encoder.finish(0).map_err(segment_error)?.finish()?)
    })
    .await
    .map_err(|e| ReplicaError::LocalState(std::io::Error::other(e.to_string())))??;
    Ok((body, last.timestamp_ms))
}

/// A failed merge as the replicator reports it: store errors as such, the rest as local ones.
fn replica_error(e: RestoreError) -> ReplicaError {
    match e {
        RestoreError::Store(e) => ReplicaError::Store(e),
        e => ReplicaError::LocalState(std::io::Error::other(e.to_string())),
    }
}

/// Create-only store of a derived file, created "at" its header timestamp (the newest input's
/// time): point-in-time restores compare that, so a compacted file must not look newer than
/// the commits it holds. A file already at the same key holds the same TXID range from the
/// same inputs, so it is accepted. Returns the stored file as a listing would show it (its
/// time: now, as stores other than the file backend list it — retention then keeps it the
/// longer).
async fn store_create(
    store: &Store,
    level: u8,
    min: u64,
    max: u64,
    body: Body,
    timestamp_ms: i64,
) -> Result<LtxObject, ReplicaError> {
    let prepared = store.prepare_ltx(level, min, max, body, timestamp_ms)?;
    let file = prepared.described();
    match store.put_prepared(&prepared).await? {
        PutOutcome::Created => Ok(file),
        // Another compactor's output of the same range (a paused writer's) holds the same
        // pages — if it is whole. Retention deletes the inputs once this file is noted, so it
        // is read through first: a broken one (an interrupted copy) stops the compaction, and
        // the inputs stay.
        PutOutcome::AlreadyExists => match crate::verify::check_object(store, &file).await {
            Ok(_) => Ok(file),
            Err(e) => Err(replica_error(RestoreError::Mismatch {
                key: file.key.to_string(),
                reason: format!(
                    "an object already at this compaction's key does not read whole ({e}); its inputs are kept"
                ),
            })),
        },
    }
}

/// Deletes what the policy no longer needs. Never deletes the newest file of any level.
///
/// # Errors
/// Store errors.
pub async fn enforce_retention(
    store: &Store,
    policy: &CompactionPolicy,
    now: SystemTime,
) -> Result<usize, ReplicaError> {
    enforce_retention_guarded(store, policy, now, &|| true).await
}

/// As [`enforce_retention`], asking `may_delete` right before deleting anything. A
/// compaction running beside the shipping loop passes "this instance still holds the lease
/// by the clocks, is neither fenced nor handing over": an instance that was paused (or cut
/// off) while it listed must not act on that listing once another instance may write —
/// it could delete what that instance's restore planned to read.
///
/// # Errors
/// Store errors; [`ReplicaError::LeaseUnconfirmed`] when `may_delete` refuses.
pub async fn enforce_retention_guarded(
    store: &Store,
    policy: &CompactionPolicy,
    now: SystemTime,
    may_delete: &(dyn Fn() -> bool + Send + Sync),
) -> Result<usize, ReplicaError> {
    // Levels 1–9 whole; level 0, the long one, only as far as its deletable prefix (below).
    let mut files: Vec<LtxObject> =
        futures::future::try_join_all((1..=SNAPSHOT_LEVEL).map(|level| store.list_level(level)))
            .await?
            .into_iter()
            .flatten()
            .collect();
    if let Some(l1_max) = files.iter().filter(|f| f.level == 1).map(|f| f.max_txid).max() {
        // Level 0 in TXID (so time) order, up to the first file L1 does not cover or that
        // is too young: everything after it is too.
        let (l0, complete) = store
            .list_level_while(0, |f| l0_deletable(f, l1_max, policy, now))
            .await?;
        // The newest level-0 file stays; it is in `l0` only if the listing reached the end
        // (then a sentinel past it keeps it the newest, below).
        files.extend(l0);
        if !complete {
            files.push(sentinel_l0());
        }
    }
    files.sort_by_key(|f| (f.level, f.min_txid, f.max_txid));
    let doomed = doomed_among(&files, policy, now);
    if !may_delete() {
        return Err(not_the_writer());
    }
    store.delete(&doomed).await?;
    // Uploads in parts that a crash left at their staging key (see `store`): an hour is far
    // longer than any upload, so whatever is older is nobody's.
    let staged = store.prune_staging(now - STAGING_MAX_AGE).await?;
    // Counts finished passes, so a caller (or a test) can tell a round is over.
    metrics::counter!("keycast_replica_retention_passes_total").increment(1);
    Ok(doomed.len() + staged)
}

fn not_the_writer() -> ReplicaError {
    ReplicaError::LeaseUnconfirmed {
        reason: "retention stopped before deleting: this instance no longer holds the replica lease".into(),
    }
}

/// Whether a level-0 file may go: level 1 covers it and it is older than `l0_retention`.
fn l0_deletable(f: &LtxObject, l1_max: u64, policy: &CompactionPolicy, now: SystemTime) -> bool {
    f.max_txid <= l1_max && older_than(f, policy.l0_retention, now)
}

fn older_than(f: &LtxObject, age: Duration, now: SystemTime) -> bool {
    now.duration_since(f.created_at).is_ok_and(|a| a > age)
}

/// A level-0 entry standing for "more files follow" (never deleted: it is the newest).
fn sentinel_l0() -> LtxObject {
    LtxObject {
        level: 0,
        min_txid: u64::MAX,
        max_txid: u64::MAX,
        size: 0,
        created_at: SystemTime::UNIX_EPOCH,
        key: object_store::path::Path::from("sentinel"),
    }
}

/// What the policy no longer needs among `files` (sorted by level, then TXIDs): expired
/// snapshots (those whose successor is past the retention; never the newest) and compacted
/// files wholly below the newest expired one,
/// and the level-0 files level 1 covers that are older than `l0_retention`, up to the first
/// that is not (never the newest level-0 file).
fn doomed_among(files: &[LtxObject], policy: &CompactionPolicy, now: SystemTime) -> Vec<LtxObject> {
    let by_level = |level: u8| files.iter().filter(move |f| f.level == level);
    let mut doomed: Vec<LtxObject> = Vec::new();

    // A snapshot goes once the one after it is past the retention: until then it is the
    // base a restore to a time inside the retention starts from (with the compactions above
    // it). Gone as soon as the next one existed, right after each snapshot no restore could
    // reach back past it.
    let snapshots: Vec<&LtxObject> = by_level(SNAPSHOT_LEVEL).collect();
    let expired: Vec<&LtxObject> = snapshots
        .windows(2)
        .filter(|pair| older_than(pair[1], policy.snapshot_retention, now))
        .map(|pair| pair[0])
        .collect();
    if let Some(floor) = expired.iter().map(|f| f.max_txid).max() {
        for level in 1..SNAPSHOT_LEVEL {
            let level_files: Vec<&LtxObject> = by_level(level).collect();
            // The level's furthest file, not its last by name: files of a level may overlap.
            let keep_last = level_files.iter().map(|f| f.max_txid).max();
            doomed.extend(
                level_files
                    .into_iter()
                    .filter(|f| f.max_txid < floor && Some(f.max_txid) != keep_last)
                    .cloned(),
            );
        }
    }
    doomed.extend(expired.into_iter().cloned());

    if let Some(l1_max) = by_level(1).map(|f| f.max_txid).max() {
        let l0: Vec<&LtxObject> = by_level(0).collect();
        let newest = l0.last().map(|f| (f.min_txid, f.max_txid));
        doomed.extend(
            l0.into_iter()
                .take_while(|f| l0_deletable(f, l1_max, policy, now))
                .filter(|f| Some((f.min_txid, f.max_txid)) != newest)
                .cloned(),
        );
    }
    doomed
}

/// Age past which a staging object is an interrupted upload's.
const STAGING_MAX_AGE: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx;
    use bytes::Bytes;

    const PAGE: u32 = 512;

    /// An L0-style file for `txid` holding `pages` (pgno, fill byte), database size `commit`.
    fn file(txid: u64, commit: u32, pages: &[(u32, u8)]) -> Bytes {
        let header = Header {
            flags: FLAG_NO_CHECKSUM,
            page_size: PAGE,
            commit,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms: 1_000 * txid as i64,
            ..Header::default()
        };
        let mut encoder = Encoder::new(header).unwrap();
        for (pgno, fill) in pages {
            encoder.encode_page(*pgno, &vec![*fill; PAGE as usize]).unwrap();
        }
        Bytes::from(encoder.finish(0).unwrap())
    }

    async fn put(store: &Store, level: u8, txid: u64, bytes: Bytes) {
        assert!(matches!(
            store.put_ltx(level, txid, txid, bytes, 0).await.unwrap(),
            PutOutcome::Created
        ));
    }

    /// The TXID ranges of `level`'s files, in name order.
    async fn ranges(store: &Store, level: u8) -> Vec<(u64, u64)> {
        let files = store.list_level(level).await.unwrap();
        files.iter().map(|f| (f.min_txid, f.max_txid)).collect()
    }

    async fn pages_of(store: &Store, level: u8) -> Vec<(u64, u64, Vec<(u32, u8)>)> {
        let mut out = Vec::new();
        for f in store.list_level(level).await.unwrap() {
            let decoded = ltx::decode(&store.get(&f).await.unwrap()).unwrap();
            out.push((
                f.min_txid,
                f.max_txid,
                decoded.pages.iter().map(|(p, d)| (*p, d[0])).collect(),
            ));
        }
        out
    }

    #[tokio::test]
    async fn compaction_merges_contiguous_files_newest_page_wins_and_drops_pages_past_commit() {
        let store = Store::in_memory();
        put(&store, 0, 1, file(1, 3, &[(1, 1), (2, 1), (3, 1)])).await;
        put(&store, 0, 2, file(2, 3, &[(2, 2)])).await;
        put(&store, 0, 3, file(3, 2, &[(1, 3)])).await; // shrinks to 2 pages
        assert_eq!(
            compact_level(&store, 1, u64::MAX, &std::env::temp_dir()).await.unwrap(),
            Some((1, 3))
        );
        assert_eq!(pages_of(&store, 1).await, vec![(1, 3, vec![(1, 3), (2, 2)])]);
        assert_eq!(
            compact_level(&store, 1, u64::MAX, &std::env::temp_dir()).await.unwrap(),
            None,
            "nothing new to merge"
        );
    }

    /// Compaction runs while the writer ships through the same store: it fetches its inputs a
    /// few at a time, so a store that serves one request at a time does not queue the writer's
    /// next PUT behind dozens of GETs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_fetches_its_inputs_a_few_at_a_time() {
        use crate::faults::{Action, Faults, Gate, Op, Rule};
        let store = Store::in_memory();
        for txid in 1..=40 {
            put(&store, 0, txid, file(txid, 1, &[(1, txid as u8)])).await;
        }
        let (faults, gate) = (Faults::new(), Gate::new());
        faults.add(Rule::new(Op::Get, Action::Hold(gate.clone())));
        let faulty = store.reopen().with_faults(&faults);
        let compaction = tokio::spawn(async move { compact_level(&faulty, 1, u64::MAX, &std::env::temp_dir()).await });
        gate.reached().await;
        // A window, since what is checked is that no more GETs are sent: with the restore's
        // fetch-ahead all 40 would be held at once within it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(gate.held(), crate::apply::BACKGROUND_FETCH_CONCURRENCY);
        gate.open();
        assert_eq!(compaction.await.unwrap().unwrap(), Some((1, 40)));
        assert_eq!(pages_of(&store, 1).await, vec![(1, 40, vec![(1, 40)])]);
    }

    #[tokio::test]
    async fn compaction_stops_at_a_gap_and_continues_from_the_level_it_builds() {
        let store = Store::in_memory();
        put(&store, 0, 1, file(1, 1, &[(1, 1)])).await;
        put(&store, 0, 2, file(2, 1, &[(1, 2)])).await;
        put(&store, 0, 4, file(4, 1, &[(1, 4)])).await;
        assert_eq!(
            compact_level(&store, 1, u64::MAX, &std::env::temp_dir()).await.unwrap(),
            Some((1, 2))
        );
        put(&store, 0, 3, file(3, 1, &[(1, 3)])).await;
        assert_eq!(
            compact_level(&store, 1, u64::MAX, &std::env::temp_dir()).await.unwrap(),
            Some((3, 4))
        );
    }

    /// Level 1 holds 1-10 and, overlapping it, 1-20 (a paused writer's compaction that
    /// landed late), then 21-30; level 2 reached 10. The chain went by exact starts: 11 was
    /// never one, so level 2 stopped advancing for good, silently.
    #[tokio::test]
    async fn compaction_follows_a_level_whose_files_overlap() {
        let tmp = std::env::temp_dir();
        let (store, other) = (Store::in_memory(), Store::in_memory());
        for txid in 1..=30 {
            put(&store, 0, txid, file(txid, 1, &[(1, txid as u8)])).await;
            if txid <= 20 {
                put(&other, 0, txid, file(txid, 1, &[(1, txid as u8)])).await;
            }
        }
        assert_eq!(compact_level(&store, 1, 10, &tmp).await.unwrap(), Some((1, 10)));
        assert_eq!(compact_level(&store, 2, 10, &tmp).await.unwrap(), Some((1, 10)));
        assert_eq!(compact_level(&other, 1, 20, &tmp).await.unwrap(), Some((1, 20)));
        let late = other.list_level(1).await.unwrap().remove(0);
        assert!(matches!(
            store
                .put_ltx(1, 1, 20, other.get(&late).await.unwrap(), 0)
                .await
                .unwrap(),
            PutOutcome::Created
        ));
        assert_eq!(compact_level(&store, 1, 30, &tmp).await.unwrap(), Some((21, 30)));
        assert_eq!(compact_level(&store, 2, u64::MAX, &tmp).await.unwrap(), Some((1, 30)));
        let newest = pages_of(&store, 2).await.pop().unwrap();
        assert_eq!(newest, (1, 30, vec![(1, 30)]));
    }

    /// An object already at a compaction's key was taken for the compaction's own output, and
    /// retention then deleted the inputs: a broken one (an interrupted copy) left a hole no
    /// restore could cross. It is read through first now; a broken one stops the compaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_object_already_at_a_compactions_key_keeps_the_inputs() {
        let store = Store::in_memory();
        for txid in 1..=3 {
            put(&store, 0, txid, file(txid, 1, &[(1, txid as u8)])).await;
        }
        // It lands while the compaction reads its inputs (after it listed the level).
        use crate::faults::{Action, Faults, Gate, Op, Rule};
        let (faults, gate) = (Faults::new(), Gate::new());
        faults.add(Rule::new(Op::Get, Action::Hold(gate.clone())).times(1));
        let faulty = store.reopen().with_faults(&faults);
        let compaction = tokio::spawn(async move { compact_level(&faulty, 1, u64::MAX, &std::env::temp_dir()).await });
        gate.reached().await;
        let whole = file(1, 1, &[(1, 1)]);
        let broken = Bytes::from(whole[..whole.len() - 8].to_vec());
        let stored = store.put_ltx(1, 1, 3, broken, 0).await.unwrap();
        assert!(matches!(stored, PutOutcome::Created));
        gate.open();
        let err = compaction.await.unwrap();
        assert!(err.is_err(), "{err:?}");
        assert_eq!(ranges(&store, 0).await, vec![(1, 1), (2, 2), (3, 3)]);
    }

    #[tokio::test]
    async fn snapshot_covers_everything_and_is_written_once_per_txid() {
        let store = Store::in_memory();
        put(&store, 0, 1, file(1, 2, &[(1, 1), (2, 1)])).await;
        put(&store, 0, 2, file(2, 2, &[(2, 2)])).await;
        assert_eq!(
            snapshot(&store, u64::MAX, &std::env::temp_dir()).await.unwrap(),
            Some(2)
        );
        assert_eq!(
            pages_of(&store, SNAPSHOT_LEVEL).await,
            vec![(1, 2, vec![(1, 1), (2, 2)])]
        );
        assert_eq!(snapshot(&store, u64::MAX, &std::env::temp_dir()).await.unwrap(), None);
    }

    /// Retention below an expired snapshot keeps each level's furthest file, which compaction
    /// continues from. Files of a level may overlap (1-4, 3-30, 5-10): the last by name
    /// (5-10) was kept and 3-30 deleted, and the level went back to 10.
    #[tokio::test]
    async fn retention_keeps_the_furthest_file_of_a_level_whose_files_overlap() {
        let store = Store::in_memory();
        let ranged = |min: u64, max: u64| {
            let header = Header {
                flags: FLAG_NO_CHECKSUM,
                page_size: PAGE,
                commit: 1,
                min_txid: min,
                max_txid: max,
                timestamp_ms: 1_000 * max as i64,
                ..Header::default()
            };
            let mut encoder = Encoder::new(header).unwrap();
            encoder.encode_page(1, &vec![max as u8; PAGE as usize]).unwrap();
            Bytes::from(encoder.finish(0).unwrap())
        };
        for (level, min, max) in [
            (1, 1, 4),
            (1, 3, 30),
            (1, 5, 10),
            (SNAPSHOT_LEVEL, 1, 40),
            (SNAPSHOT_LEVEL, 1, 50),
        ] {
            let stored = store.put_ltx(level, min, max, ranged(min, max), 0).await.unwrap();
            assert!(matches!(stored, PutOutcome::Created));
        }
        let policy = CompactionPolicy::default();
        let later = SystemTime::now() + policy.snapshot_retention + Duration::from_secs(1);
        enforce_retention(&store, &policy, later).await.unwrap();
        assert_eq!(ranges(&store, 1).await, vec![(3, 30)]);
    }

    /// A snapshot in a run where level 1 was not due (at 5, level 1 at 3), then level 1's
    /// next file (4-7) straddles it, and retention removes the level-0 files it covers but the
    /// newest. The recent listing started level 1 past the snapshot and missed 4-7: the
    /// chain stopped at 5, and TXID 7 — acknowledged — looked like an unacknowledged tail
    /// (the next writer would have deleted it, or start-up refused a truncated replica).
    #[tokio::test]
    async fn a_level_one_file_straddling_the_newest_snapshot_is_in_the_recent_listing() {
        let store = Store::in_memory();
        let tmp = std::env::temp_dir();
        let ship = |txid: u64| put(&store, 0, txid, file(txid, 1, &[(1, txid as u8)]));
        for txid in 1..=3 {
            ship(txid).await;
        }
        assert_eq!(compact_level(&store, 1, 3, &tmp).await.unwrap(), Some((1, 3)));
        for txid in 4..=5 {
            ship(txid).await;
        }
        assert_eq!(snapshot(&store, 5, &tmp).await.unwrap(), Some(5));
        for txid in 6..=7 {
            ship(txid).await;
        }
        assert_eq!(compact_level(&store, 1, 7, &tmp).await.unwrap(), Some((4, 7)));
        let policy = CompactionPolicy {
            l0_retention: Duration::from_secs(300),
            ..CompactionPolicy::default()
        };
        enforce_retention(&store, &policy, SystemTime::now() + Duration::from_secs(301))
            .await
            .unwrap();
        let recent = store.list_recent().await.unwrap();
        assert_eq!(crate::store::tip(&recent), 7, "{recent:?}");
        assert_eq!(store.max_txid().await.unwrap(), 7);
        let plan = crate::restore::plan(&recent, crate::restore::Target::Latest, "test").unwrap();
        assert_eq!(plan.last().map(|f| f.max_txid), Some(7));
    }

    #[tokio::test]
    async fn retention_drops_l0_covered_by_l1_only_once_old_enough() {
        let store = Store::in_memory();
        for txid in 1..=3 {
            put(&store, 0, txid, file(txid, 1, &[(1, txid as u8)])).await;
        }
        let policy = CompactionPolicy {
            l0_retention: Duration::from_secs(300),
            ..CompactionPolicy::default()
        };
        assert_eq!(
            enforce_retention(&store, &policy, SystemTime::now()).await.unwrap(),
            0,
            "no L1: L0 is kept"
        );
        compact_level(&store, 1, u64::MAX, &std::env::temp_dir()).await.unwrap();
        assert_eq!(
            enforce_retention(&store, &policy, SystemTime::now()).await.unwrap(),
            0,
            "too young"
        );
        let later = SystemTime::now() + Duration::from_secs(301);
        assert_eq!(
            enforce_retention(&store, &policy, later).await.unwrap(),
            2,
            "all but the newest L0"
        );
        let left: Vec<u64> = store.list_level(0).await.unwrap().iter().map(|f| f.max_txid).collect();
        assert_eq!(left, vec![3]);
    }

    /// The window a `--timestamp` restore reaches back. A snapshot past the retention went
    /// as soon as a newer one existed, with the compactions below it: right after each
    /// (daily) snapshot, no restore could reach a time before it. Now it stays the base until
    /// its successor is past the retention too.
    #[test]
    fn a_snapshot_stays_until_the_next_one_is_past_the_retention() {
        let policy = CompactionPolicy::default();
        let day = policy.snapshot_retention;
        let now = SystemTime::now();
        let obj = |level: u8, min_txid: u64, max_txid: u64, age: Duration| LtxObject {
            level,
            min_txid,
            max_txid,
            size: 1,
            created_at: now - age,
            key: object_store::path::Path::from(format!("ltx/{level}/{min_txid}-{max_txid}")),
        };
        let hour = Duration::from_secs(3600);
        let files = vec![
            obj(1, 1, 10, day + hour),
            obj(1, 11, 20, day / 2),
            obj(1, 21, 30, Duration::from_secs(60)),
            obj(SNAPSHOT_LEVEL, 1, 10, day + Duration::from_secs(1)),
            obj(SNAPSHOT_LEVEL, 1, 30, Duration::from_secs(60)),
        ];
        assert_eq!(
            doomed_among(&files, &policy, now),
            Vec::<LtxObject>::new(),
            "a restore to half a day ago starts from the older snapshot"
        );
        // A day later the newer one is past the retention itself: the older one and what is
        // wholly below it go; the newer one is the base of the whole window.
        let later = now + day;
        let doomed: Vec<(u8, u64, u64)> = doomed_among(&files, &policy, later)
            .iter()
            .map(|f| (f.level, f.min_txid, f.max_txid))
            .collect();
        assert_eq!(
            doomed,
            vec![(SNAPSHOT_LEVEL, 1, 10)],
            "level 1's furthest file below it stays"
        );
    }

    /// An instance replaced more often than the snapshot interval timed each snapshot from its
    /// own start, so it never wrote one (and nothing above level 0 ever expired). The schedule
    /// now follows the newest snapshot in the replica.
    #[test]
    fn the_next_snapshot_is_timed_from_the_newest_in_the_replica_not_from_the_start() {
        let policy = CompactionPolicy::default();
        let mut schedule = Schedule::new(&policy);
        schedule.note_shipped();
        assert!(!schedule.due(), "a fresh schedule waits an interval");
        schedule.snapshot_after(None, &policy);
        assert!(
            schedule.due(),
            "a replica without a snapshot gets one with the next file"
        );
        let run = schedule.take_due(&policy).unwrap();
        assert!(run.snapshot);

        // (No compaction levels: the snapshot is all the schedule holds.)
        let policy = CompactionPolicy {
            levels: Vec::new(),
            ..policy
        };
        let mut schedule = Schedule::new(&policy);
        schedule.note_shipped();
        schedule.snapshot_after(
            Some(SystemTime::now() - policy.snapshot_interval + Duration::from_secs(60)),
            &policy,
        );
        assert!(!schedule.due());
        let next = schedule.next_in();
        assert!(
            next <= Duration::from_secs(60) && next > Duration::from_secs(50),
            "{next:?}"
        );
        schedule.snapshot_after(Some(SystemTime::now() - policy.snapshot_interval * 2), &policy);
        assert!(schedule.due(), "one overdue is taken at once");
    }

    #[tokio::test]
    async fn expired_snapshots_go_with_the_compactions_below_them_but_the_newest_stays() {
        let store = Store::in_memory();
        for txid in 1..=2 {
            put(&store, 0, txid, file(txid, 1, &[(1, txid as u8)])).await;
            compact_level(&store, 1, u64::MAX, &std::env::temp_dir()).await.unwrap();
        }
        snapshot(&store, u64::MAX, &std::env::temp_dir()).await.unwrap();
        put(&store, 0, 3, file(3, 1, &[(1, 3)])).await;
        compact_level(&store, 1, u64::MAX, &std::env::temp_dir()).await.unwrap();
        snapshot(&store, u64::MAX, &std::env::temp_dir()).await.unwrap();
        let policy = CompactionPolicy::default();
        let later = SystemTime::now() + policy.snapshot_retention + Duration::from_secs(1);
        enforce_retention(&store, &policy, later).await.unwrap();
        assert_eq!(
            ranges(&store, 9).await,
            vec![(1, 3)],
            "the older snapshot expired, the newest stays"
        );
        // As Litestream: the floor is the newest expired snapshot's TXID (2).
        assert_eq!(
            ranges(&store, 1).await,
            vec![(2, 2), (3, 3)],
            "L1 wholly below the floor is gone"
        );
        let files = store.list_all().await.unwrap();
        let plan = restore::plan(&files, Target::Latest, "mem").unwrap();
        assert_eq!(plan.last().unwrap().max_txid, 3, "the latest state is still restorable");
    }
}
