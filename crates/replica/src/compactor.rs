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

use crate::ltx::{Encoder, Header, FLAG_NO_CHECKSUM};
use crate::restore::{self, RestoreError, Target};
use crate::spill::{Body, SpillWriter, DEFAULT_SPILL_LIMIT};
use crate::store::{LtxObject, PutOutcome, Store};
use crate::ReplicaError;

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
    /// third — under 1000 files at 100 writes/s — for the same total compaction work.)
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
                Duration::from_secs(30),
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

/// Runs every due compaction level, then the snapshot if due, then retention. Large merges
/// are written into temporary files in `scratch`.
///
/// # Errors
/// Store and decoding errors; nothing is deleted unless its replacement was stored.
pub async fn run_due(
    store: &Store,
    policy: &CompactionPolicy,
    schedule: &mut Schedule,
    now: SystemTime,
    upto: u64,
    scratch: &Path,
) -> Result<(), ReplicaError> {
    let instant = Instant::now();
    let mut changed = false;
    for i in 0..policy.levels.len() {
        if schedule.dirty[i] && instant >= schedule.next[i] {
            let level = (i + 1) as u8;
            if compact_level(store, level, upto, scratch).await?.is_some() {
                if let Some(next) = schedule.dirty.get_mut(i + 1) {
                    *next = true;
                }
                changed = true;
            }
            schedule.dirty[i] = false;
            schedule.next[i] = instant + policy.levels[i];
        }
    }
    if schedule.snapshot_dirty && instant >= schedule.snapshot_next {
        snapshot(store, upto, scratch).await?;
        schedule.snapshot_dirty = false;
        schedule.snapshot_next = instant + policy.snapshot_interval;
        changed = true;
    }
    if changed {
        enforce_retention(store, policy, now).await?;
    }
    Ok(())
}

/// Merges the level−1 files newer than `level`'s newest file, up to TXID `upto`, into one
/// `level` file (built in `scratch`). Returns the stored object's TXID range, or `None` when
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
    let done = store
        .list_level(level)
        .await?
        .iter()
        .map(|f| f.max_txid)
        .max()
        .unwrap_or(0);
    let mut inputs: Vec<LtxObject> = Vec::new();
    // Only what is past `done` is merged: the level below is listed from there, not through
    // the history retention still keeps.
    for file in store
        .list_level_from(level - 1, done + 1)
        .await?
        .into_iter()
        .filter(|f| f.min_txid > done && f.max_txid <= upto)
    {
        let expected = inputs.last().map_or(done + 1, |f| f.max_txid + 1);
        if file.min_txid != expected {
            break; // only a contiguous run can be merged
        }
        inputs.push(file);
    }
    if inputs.is_empty() {
        return Ok(None);
    }
    let (min, max) = (inputs[0].min_txid, inputs[inputs.len() - 1].max_txid);
    let (body, timestamp_ms) = merge(store, &inputs, min, scratch).await?;
    store_create(store, level, min, max, body, timestamp_ms).await?;
    metrics::counter!("keycast_replica_compactions_total", "level" => level.to_string()).increment(1);
    Ok(Some((min, max)))
}

/// Writes a level-9 snapshot of the state at the newest TXID up to `upto` the replica can
/// restore, built from the replica itself (in `scratch`).
///
/// # Errors
/// Store and decoding errors.
pub async fn snapshot(store: &Store, upto: u64, scratch: &Path) -> Result<Option<u64>, ReplicaError> {
    let mut files = store.list_all().await?;
    files.retain(|f| f.max_txid <= upto);
    let plan = restore::plan(&files, Target::Latest, &store.describe())
        .map_err(|e| ReplicaError::LocalState(std::io::Error::other(e.to_string())))?;
    let max = plan.last().map_or(0, |f| f.max_txid);
    if files.iter().any(|f| f.level == SNAPSHOT_LEVEL && f.max_txid == max) {
        return Ok(None);
    }
    let (body, timestamp_ms) = merge(store, &plan, 1, scratch).await?;
    store_create(store, SNAPSHOT_LEVEL, 1, max, body, timestamp_ms).await?;
    metrics::counter!("keycast_replica_snapshots_total").increment(1);
    Ok(Some(max))
}

/// Applies `inputs` in order and encodes their union (newest page wins) as one file whose
/// TXIDs start at `min`. Header: last input's commit and timestamp, as Litestream does; the
/// timestamp is returned too, because it must also become the object's CreatedAt.
async fn merge(store: &Store, inputs: &[LtxObject], min: u64, scratch: &Path) -> Result<(Body, i64), ReplicaError> {
    std::fs::create_dir_all(scratch)?;
    let pages = tempfile::tempfile_in(scratch)?;
    let (applied, pages) = crate::apply::apply_files(store, inputs, pages, scratch, min - 1, None)
        .await
        .map_err(replica_error)?;
    let last = applied.last.expect("inputs is not empty");
    let header = Header {
        flags: FLAG_NO_CHECKSUM,
        page_size: last.page_size,
        commit: last.commit,
        min_txid: min,
        max_txid: last.max_txid,
        timestamp_ms: last.timestamp_ms,
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
/// same inputs, so it is accepted.
async fn store_create(
    store: &Store,
    level: u8,
    min: u64,
    max: u64,
    body: Body,
    timestamp_ms: i64,
) -> Result<(), ReplicaError> {
    let prepared = store.prepare_ltx(level, min, max, body, timestamp_ms)?;
    match store.put_prepared(&prepared).await? {
        PutOutcome::Created | PutOutcome::AlreadyExists => Ok(()),
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
    // Levels 1–9 whole; level 0, the long one, only as far as its deletable prefix (below).
    let files: Vec<LtxObject> =
        futures::future::try_join_all((1..=SNAPSHOT_LEVEL).map(|level| store.list_level(level)))
            .await?
            .into_iter()
            .flatten()
            .collect();
    let by_level = |level: u8| files.iter().filter(move |f| f.level == level);
    let older_than = |f: &LtxObject, age: Duration| now.duration_since(f.created_at).is_ok_and(|a| a > age);
    let mut doomed: Vec<LtxObject> = Vec::new();

    let snapshots: Vec<&LtxObject> = by_level(SNAPSHOT_LEVEL).collect();
    let expired: Vec<&LtxObject> = snapshots
        .iter()
        .rev()
        .skip(1)
        .filter(|f| older_than(f, policy.snapshot_retention))
        .copied()
        .collect();
    if let Some(floor) = expired.iter().map(|f| f.max_txid).max() {
        for level in 1..SNAPSHOT_LEVEL {
            let level_files: Vec<&LtxObject> = by_level(level).collect();
            let keep_last = level_files.last().map(|f| f.max_txid);
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
        // Level 0 in TXID (so time) order, up to the first file L1 does not cover or that
        // is too young: everything after it is too.
        let (l0, complete) = store
            .list_level_while(0, |f| f.max_txid <= l1_max && older_than(f, policy.l0_retention))
            .await?;
        // The newest level-0 file stays; it is in `l0` only if the listing reached the end.
        let keep_last = if complete { l0.last().map(|f| f.max_txid) } else { None };
        doomed.extend(l0.into_iter().filter(|f| Some(f.max_txid) != keep_last));
    }
    store.delete(&doomed).await?;
    // Uploads in parts that a crash left at their staging key (see `store`): an hour is far
    // longer than any upload, so whatever is older is nobody's.
    let staged = store.prune_staging(now - STAGING_MAX_AGE).await?;
    // Counts finished passes, so a caller (or a test) can tell a round is over.
    metrics::counter!("keycast_replica_retention_passes_total").increment(1);
    Ok(doomed.len() + staged)
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
        let snaps: Vec<(u64, u64)> = store
            .list_level(9)
            .await
            .unwrap()
            .iter()
            .map(|f| (f.min_txid, f.max_txid))
            .collect();
        assert_eq!(snaps, vec![(1, 3)], "the older snapshot expired, the newest stays");
        // As Litestream: the floor is the newest expired snapshot's TXID (2).
        let l1: Vec<(u64, u64)> = store
            .list_level(1)
            .await
            .unwrap()
            .iter()
            .map(|f| (f.min_txid, f.max_txid))
            .collect();
        assert_eq!(l1, vec![(2, 2), (3, 3)], "L1 wholly below the floor is gone");
        let files = store.list_all().await.unwrap();
        let plan = restore::plan(&files, Target::Latest, "mem").unwrap();
        assert_eq!(plan.last().unwrap().max_txid, 3, "the latest state is still restorable");
    }
}
