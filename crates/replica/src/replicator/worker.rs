//! The replicator's background task: reads committed WAL frames, ships them as segments,
//! checkpoints what is shipped, and starts compactions (in a task of their own beside
//! shipping, stopped before the lease is let go: see [`Worker::compact`]) and verifications.
//!
//! Shipping one segment has a local half (read the WAL, encode, prepare the upload once) and a
//! network half ([`Worker::transfer`]: lease check, create-only PUT, lease confirmation) that
//! owns everything it needs, so SQLite's write lock can be let go while it runs.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, SqliteConnection};
use tokio::sync::{watch, Notify};

use super::handover::{Keep, Released};
use super::{now_ms, ReplicaError, ReplicaOptions, Shared};
use crate::capture::CommitSignal;
use crate::compactor;
use crate::local_state::{self, LocalState};
use crate::segment::{self, Cursor, Segment, SegmentError};
use crate::snapshot::Snapshot;
use crate::store::{LtxObject, PreparedLtx, PutOutcome, Store};

/// How often an idle worker looks at the WAL for commits this process did not make.
const FOREIGN_COMMIT_POLL: Duration = Duration::from_secs(1);

/// The WAL's size and modification time: what [`wal_changed`] compares.
type WalStamp = Option<(u64, Option<SystemTime>)>;

fn wal_stamp(wal: &Path) -> WalStamp {
    std::fs::metadata(wal).ok().map(|m| (m.len(), m.modified().ok()))
}

/// Resolves once the WAL at `wal` differs in size or time from `before` (checked every
/// [`FOREIGN_COMMIT_POLL`]): a commit this process's hook never saw — `keycast clients add`
/// beside the running service. Its own commits signal at once; without this, such a commit
/// waited for the next one of its own (an idle instance's might be an hour away), and a
/// deploy or a lost disk meanwhile left it behind. `before` is taken before the round reads
/// the WAL, so a commit landing while it does is not taken for the baseline.
async fn wal_changed(wal: PathBuf, before: WalStamp) {
    loop {
        tokio::time::sleep(FOREIGN_COMMIT_POLL).await;
        if wal_stamp(&wal) != before {
            return;
        }
    }
}

/// The most uploads in flight at once, whatever the options and durable waiters (a restore
/// relies on it: see [`crate::store::unacknowledged_tail`]).
const MAX_IN_FLIGHT: usize = crate::store::MAX_UPLOADS_IN_FLIGHT as usize;

/// How many times a stale writer's object at our TXID is replaced before giving up the round.
const STALE_REPLACEMENTS: usize = 3;

/// A segment at most this large means the replicator has caught up with the writer (see
/// [`Worker::catch_up`]).
const CATCH_UP_BYTES: u64 = 1 << 20;
/// Longest time spent catching up before taking the write lock anyway.
const CATCH_UP_TIME: Duration = Duration::from_secs(2);
/// See [`Worker::wal_over_limit`].
const WAL_LIMIT_FACTOR: u64 = 2;
/// Commits wait for the next checkpoint once the WAL holds this many times the checkpoint
/// threshold, or [`WAL_HOLD_MIN_FRAMES`] if that is more (see `crate::capture`).
pub(super) const WAL_HOLD_FACTOR: u32 = 3;
/// 12,000 frames: about 47 MiB of 4 KiB pages, with the default threshold (4000) the limit.
pub(super) const WAL_HOLD_MIN_FRAMES: u32 = 12_000;

/// One segment ready to ship, kept as it is until it is known to be stored: a retry after an
/// unknown outcome must send exactly the same bytes.
#[derive(Debug, Clone)]
pub(super) struct Upload {
    txid: u64,
    next: Cursor,
    commits: usize,
    prepared: PreparedLtx,
    /// The commit counter when the segment was read, if it holds everything committed then:
    /// once stored, every commit up to this mark is durable.
    mark: Option<u64>,
    /// When it was ready to send (for the debug log of where shipping's time goes).
    prepared_at: Instant,
}

/// The state owned by the background task.
pub(super) struct Worker {
    pub(super) db: PathBuf,
    pub(super) store: Store,
    pub(super) signal: Arc<CommitSignal>,
    pub(super) lineage: String,
    pub(super) options: ReplicaOptions,
    pub(super) cursor: Cursor,
    /// Holds SQLite's write lock while the WAL may restart, and during a hand-over.
    pub(super) lock_conn: SqliteConnection,
    /// Runs the checkpoints (a checkpoint cannot run inside the lock connection's transaction).
    checkpoint_conn: SqliteConnection,
    pub(super) shared: Arc<Shared>,
    /// Commit counter value known to be shipped.
    shipped_mark: u64,
    last_checkpoint: Instant,
    shipped_since_checkpoint: bool,
    compaction: compactor::Schedule,
    /// The compaction running beside shipping, if any (see [`Worker::compact`]).
    compacting: Option<Compacting>,
    /// The replica's files as this instance knows them, for compaction (see
    /// [`compactor::Known`]).
    known: Arc<compactor::Known>,
    last_verify: Instant,
    shipped_since_verify: bool,
    /// The background verification; it ends `true` when it could not check the replica.
    verifying: Option<tokio::task::JoinHandle<bool>>,
    /// `lock_conn` holds SQLite's write lock.
    pub(super) locked: bool,
    /// The read snapshot held between rounds (see [`crate::snapshot`]).
    pub(super) snapshot: Snapshot,
    /// Uploads whose outcome is not known yet, in TXID order (the first one failed; those
    /// behind it were in flight with it): retried, exactly as they are, before anything new
    /// is read.
    pub(super) pending: VecDeque<Upload>,
    /// Shipping the last frames for a hand-over: the lease is only renewed, not checked.
    pub(super) handing_over: bool,
    /// The hand-over is done: `lock_conn` keeps the write lock and nothing ships any more.
    pub(super) handed_over: bool,
    /// After a hand-over: the lease this instance released, to take back if nobody else
    /// holds it (see [`Worker::take_back`]).
    pub(super) released: Option<Released>,
    /// This writer's stamp, in the header of every file it writes (see [`next_writer`]).
    pub(super) writer: u64,
    /// When each file it writes says it was written (see [`Worker::time_stamp`]).
    pub(super) times: TimeStamps,
}

/// The times this writer stamps its files with (the header's timestamp and the store's
/// timestamp metadata, which a `--timestamp` restore selects files by): its wall clock, moved
/// forward by how far it was behind the newest file of the history it took over, and never
/// back. Stamped from the clock alone, a successor whose clock ran minutes behind stamped its
/// files — and its compactions of its predecessor's — before its predecessor's last ones, and a
/// restore to a time in between took commits made after it.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TimeStamps {
    ahead_ms: i64,
    last_ms: i64,
}

impl TimeStamps {
    /// Stamps that never fall before `newest_ms` (the history's newest file).
    fn after(newest_ms: i64) -> TimeStamps {
        TimeStamps {
            ahead_ms: (newest_ms - now_ms()).max(0),
            last_ms: newest_ms,
        }
    }

    fn next(&mut self) -> i64 {
        self.last_ms = (now_ms() + self.ahead_ms).max(self.last_ms);
        self.last_ms
    }
}

/// A writer's stamp: its start time (ms since the Unix epoch), and more than `newest`, the
/// newest stamp in the history it took over, whatever the clocks say. Stamps therefore
/// increase along the replica's history; an instance paused past its lease has an older one
/// than whoever took over, so a file it stores late is told from theirs and never restored
/// over them (see `apply::Applied::check_writer`). On an encrypted replica the stamp also says
/// that the lease's mark is authenticated (see [`crate::mark`]).
pub(super) fn next_writer(newest: u64, store: &Store) -> u64 {
    crate::mark::stamp(now_ms().max(0) as u64, newest, store.is_encrypted())
}

impl Worker {
    pub(super) async fn open(
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
        let mut lock_conn = connect.clone().connect().await?;
        {
            // Under sustained writes `BEGIN IMMEDIATE` contends with a writer that holds the
            // lock most of the time: retry within a millisecond (see `capture`).
            let mut handle = lock_conn.lock_handle().await?;
            // SAFETY: a live connection owned by this worker.
            unsafe { crate::capture::install_busy_handler(handle.as_raw_handle(), Duration::from_secs(5)) };
        }
        let mut checkpoint_conn = connect.connect().await?;
        for conn in [&mut lock_conn, &mut checkpoint_conn] {
            super::keep_wal_on_close(conn).await?;
        }
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
            compacting: None,
            known: Arc::new(compactor::Known::new()),
            last_verify: Instant::now(),
            shipped_since_verify: false,
            verifying: None,
            locked: false,
            snapshot: Snapshot::open(db).await?,
            pending: VecDeque::new(),
            handing_over: false,
            handed_over: false,
            released: None,
            writer: 0,
            times: TimeStamps::default(),
        })
    }

    /// Starts this writer's time stamps past the newest file in `recent` (one HEAD on a cloud
    /// store, for the time its writer recorded); unknown, from the clock alone.
    async fn time_stamps_after(&mut self, recent: &[LtxObject]) {
        let Some(newest) = recent.iter().max_by_key(|f| (f.max_txid, f.level)) else {
            return;
        };
        match self.store.created_at(newest).await {
            Ok(at) => {
                let newest_ms = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                self.times = TimeStamps::after(newest_ms);
                if self.times.ahead_ms > 1_000 {
                    tracing::warn!(
                        behind_ms = self.times.ahead_ms,
                        newest = %newest.key,
                        "this instance's clock is behind the time the replica's newest file was written; its files are stamped that much later, so a point-in-time restore never puts them before it"
                    );
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read when the replica's newest file was written; stamping from the clock")
            }
        }
    }

    /// The time the next file this writer writes is stamped with.
    fn time_stamp(&mut self) -> i64 {
        self.times.next()
    }

    /// Where large segments, compactions and verification restores are written while they
    /// are built: next to the database, on the disk sized for it.
    pub(super) fn scratch(&self) -> PathBuf {
        self.db.parent().map(Path::to_owned).unwrap_or_else(std::env::temp_dir)
    }

    /// The last TXID shipped.
    pub(super) fn txid(&self) -> u64 {
        self.cursor.txid
    }

    /// The commit counter value known to be shipped.
    pub(super) fn shipped_mark(&self) -> u64 {
        self.shipped_mark
    }

    /// Establishes where shipping resumes. An empty replica gets a full image at TXID 1. A
    /// replica with data is resumed only when the local record says this database is exactly
    /// its latest state; anything else is refused, because writing the next TXID over a state
    /// this instance never restored could erase another writer's commits.
    pub(super) async fn align(&mut self) -> Result<(), ReplicaError> {
        // Stands in for a store that fails here (`FAILPOINTS=replica-align=return`): a start
        // that fails after the database was opened and migrated.
        fail::fail_point!("replica-align", |_| Err(ReplicaError::LocalState(
            std::io::Error::other("fail point replica-align")
        )));
        // One listing: its level-0 part starts at or before the tip, so it also holds any
        // unacknowledged tail past it.
        let recent = self.store.list_recent().await?;
        let remote_max = crate::store::tip(&recent);
        let record = local_state::load(&self.db)?;
        self.shipped_mark = self.signal.commits();
        match record {
            Some(record) if record.txid == remote_max && remote_max > 0 => {
                self.writer = next_writer(record.writer, &self.store);
                let newest_snapshot = recent
                    .iter()
                    .filter(|f| f.level == crate::store::SNAPSHOT_LEVEL)
                    .map(|f| f.created_at)
                    .max();
                self.compaction
                    .snapshot_after(newest_snapshot, &self.options.compaction);
                self.time_stamps_after(&recent).await;
                self.remove_unacknowledged_tail(remote_max, &recent).await?;
                self.know_if_complete(recent.into_iter().filter(|f| f.max_txid <= remote_max));
                self.resume(record).await
            }
            _ if remote_max == 0 => {
                self.writer = next_writer(record.map_or(0, |r| r.writer), &self.store);
                self.know_if_complete(recent.into_iter());
                self.record_lineage().await?;
                self.cursor.txid = 0;
                let upload = self.full_image_upload().await?;
                self.ship(upload).await
            }
            Some(record) if record.txid > remote_max => Err(ReplicaError::ReplicaBehind {
                local: record.txid,
                remote: remote_max,
            }),
            record => Err(ReplicaError::ReplicaAhead {
                local: record.map_or(0, |r| r.txid),
                remote: remote_max,
            }),
        }
    }

    /// Hands compaction the alignment's listing as its index of the replica (see
    /// [`compactor::Known`]) when that listing holds every file: `list_recent` lists level 0
    /// from the start only when no level above holds a file. A replica this instance starts
    /// (or one younger than its first level-1 run) then needs no listing ever — on a store
    /// that serves requests one at a time, listing the thousand level-0 files of the first
    /// interval held the writer's PUTs for 150 ms.
    fn know_if_complete(&self, files: impl Iterator<Item = LtxObject> + Clone) {
        if files.clone().all(|f| f.level == 0) {
            self.known.seed(files);
        }
    }

    /// Deletes the level-0 objects past the replica's tip: a pipelined writer that died left
    /// them ahead of an upload that never landed, and none was acknowledged (see
    /// [`crate::store::unacknowledged_tail`]). This instance writes those TXIDs next; left in
    /// place they would collide with its uploads. `recent` is the listing that found the tip.
    async fn remove_unacknowledged_tail(&self, tip: u64, recent: &[LtxObject]) -> Result<(), ReplicaError> {
        let past: Vec<_> = recent
            .iter()
            .filter(|f| f.level == 0 && f.min_txid > tip)
            .cloned()
            .collect();
        if !past.is_empty() {
            self.may_delete_now().await?;
            tracing::warn!(
                tip,
                objects = past.len(),
                "removing objects past the replica's tip that were never acknowledged (stored ahead of an upload that never landed)"
            );
            self.store.delete(&past).await?;
        }
        Ok(())
    }

    /// Right before deleting from the replica: the lease must be valid by the clocks (renewed
    /// first when due). A deletion goes by key, and the keys this instance means to delete are
    /// the very ones a writer that took the replica meanwhile stores its own TXIDs at, so an
    /// instance that may not write must not delete either — not even one the lease object
    /// still names, whose answer came back late, or that could not renew it.
    ///
    /// # Errors
    /// [`ReplicaError::LeaseUnconfirmed`] (or what [`Shared::keep_lease`] says).
    async fn may_delete_now(&self) -> Result<(), ReplicaError> {
        self.shared.keep_lease(Keep::HandingOver).await?;
        if self.shared.may_clear_for_upload() {
            return Ok(());
        }
        Err(ReplicaError::LeaseUnconfirmed {
            reason:
                "the replica lease is not valid by the clocks: nothing is deleted from the replica until it is renewed"
                    .into(),
        })
    }

    /// Names this database's lineage in an empty replica (replacing a lineage left there by a
    /// database whose files were removed), so checksum records stay with their database.
    async fn record_lineage(&self) -> Result<(), ReplicaError> {
        const NAME: &str = "keycast/lineage.json";
        let document = lineage_document(&self.lineage);
        match self.store.get_object(NAME).await? {
            None => {
                let _ = self.store.put_object_create(NAME, document).await?;
            }
            Some((_, version)) => {
                if crate::verify::replica_lineage(&self.store).await?.as_deref() != Some(self.lineage.as_str()) {
                    let _ = self.store.put_object_update(NAME, document, &version).await?;
                }
            }
        }
        Ok(())
    }

    /// Continues from a local record that matches the replica's latest TXID.
    async fn resume(&mut self, record: LocalState) -> Result<(), ReplicaError> {
        // A clean stop that folded the WAL into the file (its checksum recorded) left no WAL
        // position to continue: any new WAL generation starts after it.
        let wal = if record.clean && record.db_checksum.is_some() {
            None
        } else {
            record.wal
        };
        self.cursor = Cursor {
            txid: record.txid,
            commit: record.commit,
            page_size: record.page_size,
            wal,
            reset_expected: wal.is_some() && record.checkpointed,
        };
        if self.changed_while_down(&record)? {
            tracing::warn!("the database file changed while keycast was down; shipping a full image");
            let upload = self.full_image_upload().await?;
            return self.ship(upload).await;
        }
        tracing::info!(
            txid = record.txid,
            clean = record.clean,
            "replication resumes from the local record"
        );
        // Anything committed after the record (a crash before the last upload) ships now;
        // a WAL generation that cannot be tied to the record gets a full image instead.
        self.sync_all().await.map(|_| ())
    }

    /// After a clean stop, or a restore, the file alone held the shipped state. Only the
    /// replicator checkpoints, so nothing keycast did since (migrations included) has touched
    /// the file: a different checksum means it was written without keycast shipping it —
    /// another program's last connection folding its WAL in, say, while keycast was down.
    fn changed_while_down(&self, record: &LocalState) -> Result<bool, ReplicaError> {
        let Some(expected) = record.db_checksum.filter(|_| record.clean) else {
            return Ok(false);
        };
        Ok(crate::checksum::database_checksum_path(&self.db, record.page_size)? != expected)
    }

    /// A full image of the database at the next TXID. SQLite's write lock is held only to pin
    /// the state (the committed end of the WAL, and the read snapshot right there); the image
    /// is read after letting go of it, since the snapshot keeps every checkpoint short of it.
    async fn full_image_upload(&mut self) -> Result<Upload, ReplicaError> {
        let took_lock = self.lock().await?;
        // Under the lock: every commit counted now is in the image.
        let mark = self.signal.commits();
        let db = self.db.clone();
        let end = tokio::task::spawn_blocking(move || segment::wal_end(&db))
            .await
            .map_err(join_error)?;
        if took_lock {
            self.unlock().await?;
        }
        let (db, txid, end, writer) = (self.db.clone(), self.cursor.txid + 1, end?, self.writer);
        let (scratch, stamp) = (self.scratch(), self.time_stamp());
        let segment =
            tokio::task::spawn_blocking(move || segment::full_image_upto(&db, end, txid, stamp, writer, &scratch))
                .await
                .map_err(join_error)??;
        tracing::info!(txid, "built a full image of the database");
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || prepare(&store, segment, mark, stamp))
            .await
            .map_err(join_error)?
    }

    /// Takes SQLite's write lock on `lock_conn`: no commit can land until [`Self::unlock`].
    /// The read snapshot is refreshed under the lock so that it covers every commit (and so
    /// does not hold back our own checkpoint). Returns false when the lock is already held.
    pub(super) async fn lock(&mut self) -> Result<bool, ReplicaError> {
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
    pub(super) async fn unlock(&mut self) -> Result<(), ReplicaError> {
        let refreshed = self.snapshot.refresh().await;
        self.locked = false;
        sqlx::query("ROLLBACK").execute(&mut self.lock_conn).await?;
        Ok(refreshed?)
    }

    fn keep_mode(&self) -> Keep {
        if self.handing_over {
            Keep::HandingOver
        } else {
            Keep::Writing
        }
    }

    /// The network half of shipping `upload`: the lease check before the PUT, the create-only
    /// PUT, and — for an upload that landed — the confirmation that the lease was still ours
    /// when it did. Owns what it uses, so the caller may let go of the write lock meanwhile.
    fn transfer(&self, upload: &Upload) -> impl Future<Output = Result<PutOutcome, ReplicaError>> + Send + 'static {
        let (shared, store, prepared, keep) = (
            self.shared.clone(),
            self.store.clone(),
            upload.prepared.clone(),
            self.keep_mode(),
        );
        async move {
            shared.keep_lease(keep).await?;
            let outcome = store.put_prepared(&prepared).await?;
            if outcome == PutOutcome::Created {
                shared.confirm_after_put().await?;
            }
            Ok(outcome)
        }
    }

    /// Ships one upload and advances the cursor.
    async fn ship(&mut self, upload: Upload) -> Result<(), ReplicaError> {
        let result = self.transfer(&upload).await;
        self.settle_upload(upload, result).await
    }

    /// Ships one upload under the write lock, letting go of the lock if the upload takes
    /// longer than the lock budget (it then finishes outside). Returns whether the lock is
    /// still held.
    async fn ship_locked(&mut self, upload: Upload) -> Result<bool, ReplicaError> {
        let transfer = self.transfer(&upload);
        tokio::pin!(transfer);
        let budget = tokio::time::sleep(self.options.lock_budget);
        let result = tokio::select! {
            result = &mut transfer => result,
            () = budget => {
                self.unlock().await?;
                tracing::debug!(txid = upload.txid, "an upload outlasted the lock budget; finishing it without the write lock");
                transfer.await
            }
        };
        self.settle_upload(upload, result).await?;
        Ok(self.locked)
    }

    /// Acts on a transfer's outcome: advance, resolve a collision, or keep the upload to retry.
    async fn settle_upload(
        &mut self,
        upload: Upload,
        result: Result<PutOutcome, ReplicaError>,
    ) -> Result<(), ReplicaError> {
        match result {
            Ok(PutOutcome::Created) => self.advance(upload).await,
            Ok(PutOutcome::AlreadyExists) => self.resolve_collision(upload).await,
            Err(e) => {
                self.pending.push_front(upload);
                Err(e)
            }
        }
    }

    /// The key of our next TXID holds someone else's bytes. Who may write is what the lease
    /// says, so read it. Not ours: fenced. Still ours: the object was left by an instance that
    /// lost the lease before its upload landed; such an instance confirms the lease after
    /// every upload, so it never acknowledged that object — and this instance never restored
    /// it. Replace it, or the chain would mix two histories.
    async fn resolve_collision(&mut self, upload: Upload) -> Result<(), ReplicaError> {
        let key = upload.prepared.key.to_string();
        if !self.shared.leased {
            tracing::error!(txid = upload.txid, %key, "another writer already stored this TXID in the replica");
            self.shared
                .fence(format!("another writer stored TXID {} in the replica", upload.txid));
            return Err(ReplicaError::Fenced { txid: upload.txid });
        }
        for _ in 0..STALE_REPLACEMENTS {
            let may_delete = match self.shared.check_lease().await {
                Ok(()) => self.may_delete_now().await,
                Err(e) => Err(e),
            };
            if let Err(e) = may_delete {
                self.pending.push_front(upload);
                return Err(e);
            }
            tracing::error!(
                txid = upload.txid,
                %key,
                "found an object at this instance's next TXID stored by an instance that had lost the replica lease; it was never acknowledged, and it is replaced"
            );
            metrics::counter!("keycast_replica_stale_objects_replaced_total").increment(1);
            if let Err(e) = self.store.delete_key(&upload.prepared.key).await {
                self.pending.push_front(upload);
                return Err(e.into());
            }
            match self.transfer(&upload).await {
                Ok(PutOutcome::Created) => return self.advance(upload).await,
                Ok(PutOutcome::AlreadyExists) => continue,
                Err(e) => {
                    self.pending.push_front(upload);
                    return Err(e);
                }
            }
        }
        // Something keeps writing this key: back off and look again next round.
        self.pending.push_front(upload);
        Err(ReplicaError::LeaseUnconfirmed {
            reason: format!("another instance keeps storing objects at {key}"),
        })
    }

    /// The upload is in the replica: move the cursor, write the local record (without waiting
    /// for the disk: see [`local_state::store_quick`] — a record that a power loss left
    /// pointing past the WAL is caught at start-up by `segment::wal_reaches`, which is why
    /// the WAL need not be synced here), and note the TXID in the lease.
    async fn advance(&mut self, upload: Upload) -> Result<(), ReplicaError> {
        self.cursor = upload.next;
        self.shipped_since_checkpoint = true;
        self.shipped_since_verify = true;
        self.compaction.note_shipped();
        self.known.note_stored(&upload.prepared);
        {
            let mut status = self.shared.status.lock().expect("status lock");
            status.replicated_txid = self.cursor.txid;
            status.segments += 1;
            status.last_error = None;
            status.failing_since = None;
        }
        if let Some(mark) = upload.mark {
            // Durable waiters need not wait for the loop to catch up, which under steady
            // writes it may never quite do. (After the status, so they read this TXID.) Nor
            // for the local record below: it only tells a restart where shipping stood, and
            // one left behind the replica by a crash right here makes start-up restore.
            self.shipped_mark = self.shipped_mark.max(mark);
            self.publish_shipped(self.shipped_mark);
        }
        // In place, on this thread: one `pwrite` into the page cache, cheaper than a hand-off
        // to the blocking pool after every segment.
        local_state::store_quick(&self.db, &self.record(false))?;
        if let Some(lease) = self.shared.lease.lock().await.as_mut() {
            lease.note_txid(upload.txid);
        }
        metrics::counter!("keycast_replica_segments_total").increment(1);
        metrics::gauge!("keycast_replica_txid").set(self.cursor.txid as f64);
        tracing::debug!(
            txid = upload.txid,
            bytes = upload.prepared.len(),
            commits = upload.commits,
            sent_to_stored_us = upload.prepared_at.elapsed().as_micros() as u64,
            "segment stored"
        );
        Ok(())
    }

    pub(super) fn record(&self, clean: bool) -> LocalState {
        LocalState {
            lineage: self.lineage.clone(),
            replica: self.store.describe(),
            txid: self.cursor.txid,
            commit: self.cursor.commit,
            page_size: self.cursor.page_size,
            wal: self.cursor.wal,
            clean,
            checkpointed: self.cursor.reset_expected,
            db_checksum: None,
            updated_at_ms: now_ms(),
            last_error: None,
            writer: self.writer,
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
    pub(super) async fn sync_all(&mut self) -> Result<usize, ReplicaError> {
        self.sync(false).await
    }

    /// Ships segments until caught up — or, with `yield_for_checkpoint`, until the WAL has
    /// grown past the checkpoint threshold: under sustained writes the loop would otherwise
    /// never end and the WAL would grow without bound.
    ///
    /// Up to `uploads_in_flight` uploads go out at once (the shipping pipeline): a segment is
    /// read and sent as soon as commits arrive, without waiting for the upload before it.
    /// With fewer configured (one by default: each upload then carries every commit that
    /// arrived while the one before it was under way, which keeps the PUTs and the request
    /// bill down), a durable waiter is the exception: when one waits for commits past what
    /// the uploads in flight hold, its segment is read and sent at once beside them (up to
    /// [`crate::store::MAX_UPLOADS_IN_FLIGHT`]), so it waits for one PUT rather than for the
    /// one under way and then its own.
    /// Outcomes are settled strictly in TXID order, so the cursor, the local record, the
    /// lease's TXID and every durable acknowledgement still advance one TXID at a time: a
    /// commit is acknowledged only once every TXID up to its own is stored. When one upload
    /// fails, it and every upload behind it stay pending, exactly as they are, and are
    /// retried in order; objects stored ahead of it that a crash leaves past the gap were
    /// never acknowledged (see [`crate::store::unacknowledged_tail`]).
    async fn sync(&mut self, yield_for_checkpoint: bool) -> Result<usize, ReplicaError> {
        let depth = self.options.uploads_in_flight.clamp(1, MAX_IN_FLIGHT);
        if self.handing_over {
            return self.sync_serially(yield_for_checkpoint).await;
        }
        let mut stored = 0;
        // Whatever an earlier round left with an unknown outcome goes first, one at a time.
        while let Some(upload) = self.pending.pop_front() {
            self.ship(upload).await?;
            stored += 1;
        }
        let threshold = u64::from(self.options.checkpoint_pages);
        let mut flight = FuturesOrdered::new();
        let mut queued: VecDeque<Upload> = VecDeque::new();
        // Where the next read starts: past the last upload queued.
        let mut ahead = self.cursor;
        // The commit counter before a read that found nothing new: once every upload queued
        // before it is stored, every commit up to it is shipped.
        let mut caught_up: Option<u64> = None;
        let mut reading = true;
        loop {
            while reading && self.room_in_flight(&queued, depth) {
                let mark = self.signal.commits();
                match self.read_upload_after(ahead, mark).await? {
                    Ok(Some(upload)) => {
                        ahead = upload.next;
                        flight.push_back(InFlight(tokio::spawn(self.transfer(&upload))));
                        queued.push_back(upload);
                        caught_up = None;
                    }
                    Ok(None) => {
                        caught_up = Some(mark);
                        break;
                    }
                    // A restarted WAL (a full image) or a read error: settle what is in
                    // flight first, then the serial path deals with it.
                    Err(e) => {
                        if queued.is_empty() {
                            return match e {
                                SegmentError::ContinuityLost => {
                                    Ok(stored + self.sync_serially(yield_for_checkpoint).await?)
                                }
                                e => Err(e.into()),
                            };
                        }
                        reading = false;
                    }
                }
            }
            if queued.is_empty() {
                return match caught_up {
                    Some(mark) => {
                        self.shipped_mark = mark;
                        self.publish_shipped(mark);
                        Ok(stored)
                    }
                    None if yield_for_checkpoint && self.wal_frames() >= threshold => Ok(stored),
                    None => Ok(stored + self.sync_serially(yield_for_checkpoint).await?),
                };
            }
            let shared = self.shared.clone();
            let result = tokio::select! {
                biased;
                Some(result) = flight.next() => result,
                // New commits while uploads are under way: read and send them now.
                () = self.signal.wait(), if reading && queued.len() < depth => continue,
                // A durable waiter: its segment may go out beside the uploads in flight.
                () = shared.durable_waiting.notified(), if reading && queued.len() < MAX_IN_FLIGHT => continue,
            };
            let upload = queued.pop_front().expect("one queued upload per transfer in flight");
            if let Err(e) = self.settle_upload(upload, result).await {
                // The failed upload is pending; the ones behind it follow it, unsettled (a
                // retry of one that did land recognises its own bytes).
                self.pending.extend(queued);
                return Err(e);
            }
            stored += 1;
            if yield_for_checkpoint && self.wal_frames() >= threshold {
                reading = false;
            }
        }
    }

    /// Whether [`Self::sync`] may read and send another segment beside the uploads `queued`:
    /// fewer than `depth` are in flight, or a durable waiter waits for commits past what they
    /// hold (the last one's mark; one that did not reach the WAL's end holds less).
    fn room_in_flight(&self, queued: &VecDeque<Upload>, depth: usize) -> bool {
        if queued.len() < depth {
            return true;
        }
        if queued.len() >= MAX_IN_FLIGHT {
            return false;
        }
        let covered = queued.back().and_then(|u| u.mark).unwrap_or(0).max(self.shipped_mark);
        self.shared.durable_wanted.load(std::sync::atomic::Ordering::SeqCst) > covered
    }

    /// [`Self::sync`], one upload at a time.
    async fn sync_serially(&mut self, yield_for_checkpoint: bool) -> Result<usize, ReplicaError> {
        let mut stored = 0;
        loop {
            let mark = self.signal.commits();
            match self.next_upload().await? {
                Some(upload) => {
                    self.ship(upload).await?;
                    stored += 1;
                    if yield_for_checkpoint && self.wal_frames() >= u64::from(self.options.checkpoint_pages) {
                        return Ok(stored);
                    }
                }
                None => {
                    self.shipped_mark = mark;
                    self.publish_shipped(mark);
                    return Ok(stored);
                }
            }
        }
    }

    /// The upload to ship next: the one whose outcome is unknown, else the next batch of
    /// committed WAL frames, else (when the WAL restarted outside our control) a full image.
    async fn next_upload(&mut self) -> Result<Option<Upload>, ReplicaError> {
        if let Some(upload) = self.pending.pop_front() {
            return Ok(Some(upload));
        }
        let mark = self.signal.commits();
        match self.read_upload_after(self.cursor, mark).await? {
            Ok(found) => Ok(found),
            Err(SegmentError::ContinuityLost) => {
                tracing::warn!("the WAL restarted outside the replicator's control; shipping a full image");
                self.full_image_upload().await.map(Some)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the next segment as things stand (no snapshot refresh), to learn whether
    /// anything committed is unshipped.
    pub(super) async fn read_next_segment_now(
        &mut self,
    ) -> Result<Result<Option<Segment>, SegmentError>, ReplicaError> {
        let (db, cursor, max, writer, scratch) = (
            self.db.clone(),
            self.cursor,
            self.options.max_segment_bytes,
            self.writer,
            self.scratch(),
        );
        // Only looked at, never shipped: the clock will do.
        tokio::task::spawn_blocking(move || segment::next_wal_segment(&db, &cursor, max, now_ms(), writer, &scratch))
            .await
            .map_err(join_error)
    }

    /// Reads the segment that follows `cursor` (the shipped cursor, or the last upload in
    /// flight) while a read snapshot is held, and encodes it for upload; `mark` is the commit
    /// counter before the read. One trip to the blocking pool for both: a thread hand-off
    /// costs more than reading a small segment, and a large one is not encoded on the
    /// runtime's threads.
    async fn read_upload_after(
        &mut self,
        cursor: Cursor,
        mark: u64,
    ) -> Result<Result<Option<Upload>, SegmentError>, ReplicaError> {
        if !self.locked && !self.snapshot.is_held() {
            self.snapshot.refresh().await?;
        }
        let (db, max, writer, scratch, store) = (
            self.db.clone(),
            self.options.max_segment_bytes,
            self.writer,
            self.scratch(),
            self.store.clone(),
        );
        let started = Instant::now();
        let stamp = self.time_stamp();
        let (read, queued_us) = tokio::task::spawn_blocking(move || {
            let queued_us = started.elapsed().as_micros() as u64;
            let read = match segment::next_wal_segment(&db, &cursor, max, stamp, writer, &scratch) {
                Ok(Some(segment)) => prepare(&store, segment, mark, stamp).map(|upload| Ok(Some(upload))),
                Ok(None) => Ok(Ok(None)),
                Err(e) => Ok(Err(e)),
            };
            (read, queued_us)
        })
        .await
        .map_err(join_error)?;
        if let Ok(Ok(Some(upload))) = &read {
            tracing::debug!(
                txid = upload.txid,
                queued_us,
                read_and_encoded_us = started.elapsed().as_micros() as u64,
                "segment read and encoded"
            );
        }
        read
    }

    pub(super) fn publish_shipped(&self, mark: u64) {
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

    /// Takes the write lock and ships whatever committed since the last segment, so that the
    /// shipped position is the committed end and the read snapshot sits right there. Returns
    /// true with the lock still held; false (lock released) when the tail took longer than
    /// the lock budget to upload — it was finished outside the lock, try again later.
    async fn settle(&mut self) -> Result<bool, ReplicaError> {
        if !self.wal_over_limit() {
            self.catch_up().await?;
        }
        self.lock().await?;
        loop {
            let mark = self.signal.commits();
            match self.next_upload().await? {
                None => {
                    self.shipped_mark = mark;
                    self.publish_shipped(mark);
                    self.snapshot.refresh().await?;
                    return Ok(true);
                }
                Some(upload) => {
                    if !self.ship_locked(upload).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Ships segments, without the write lock, until the one just shipped was small (it held
    /// everything committed when it was read and little of it) or nothing is left — or for
    /// at most [`CATCH_UP_TIME`]. Under sustained writes the loop would never find nothing
    /// left; a small last segment means what commits while the lock is taken next is small
    /// too, so the tail shipped under the lock fits its budget and the checkpoint happens.
    async fn catch_up(&mut self) -> Result<(), ReplicaError> {
        let deadline = Instant::now() + CATCH_UP_TIME;
        loop {
            let mark = self.signal.commits();
            let Some(upload) = self.next_upload().await? else {
                self.shipped_mark = mark;
                self.publish_shipped(mark);
                return Ok(());
            };
            let small = upload.mark.is_some() && upload.prepared.len() <= CATCH_UP_BYTES;
            self.ship(upload).await?;
            if small || self.wal_over_limit() || Instant::now() >= deadline {
                return Ok(());
            }
        }
    }

    /// The background loop; returns the replicated TXID at the end.
    pub(super) async fn run(mut self, mut stop: watch::Receiver<Option<Instant>>) -> Result<u64, ReplicaError> {
        let mut backoff = self.options.retry_min;
        let mut failing = false;
        let wal = segment::wal_path(&self.db);
        // As the WAL was before the last round read it (see `wal_changed`).
        let mut read_from = wal_stamp(&wal);
        loop {
            // Commits wait at the WAL limit only while this loop checkpoints (see
            // `crate::capture`); any other state lifts it.
            self.hold_writers(false);
            let requested = *stop.borrow();
            if let Some(deadline) = requested {
                return self.finish(deadline).await;
            }
            fail::fail_point!("replica-worker", |_| Err(ReplicaError::Stopped));
            if self.handed_over || self.shared.status.lock().expect("status lock").fenced {
                self.stop_compaction().await;
                self.park(&mut stop).await?;
                continue;
            }
            if self.shared.status.lock().expect("status lock").superseded {
                self.step_aside().await?;
                continue;
            }
            if let Some(to) = self.shared.handing_over_to() {
                self.hand_over(&to, &stop).await?;
                continue;
            }
            self.hold_writers(!failing);
            let wait = if failing { backoff } else { self.next_timer() };
            tokio::select! {
                () = self.signal.wait() => self.note_pending(),
                () = tokio::time::sleep(wait) => {}
                () = self.compaction_finished() => {}
                () = wal_changed(wal.clone(), read_from) => {}
                _ = stop.changed() => continue,
            }
            read_from = wal_stamp(&wal);
            match self.step().await {
                Ok(()) => {
                    failing = false;
                    backoff = self.options.retry_min;
                }
                Err(e) if e.is_fatal() => {
                    self.hold_writers(false);
                    self.shared.fence(e.to_string());
                    self.stop_compaction().await;
                    return Err(e);
                }
                // The next round hands over.
                Err(ReplicaError::HandingOver { .. }) => {
                    self.reset_transactions().await;
                    failing = false;
                }
                Err(e) => {
                    self.hold_writers(false);
                    self.note_failure(&e);
                    self.reset_transactions().await;
                    failing = true;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
    }

    /// Sets or lifts the WAL limit at which commits wait for a checkpoint (see
    /// `crate::capture`): [`WAL_HOLD_FACTOR`] times the checkpoint threshold, at least
    /// [`WAL_HOLD_MIN_FRAMES`].
    fn hold_writers(&self, on: bool) {
        let limit = self
            .options
            .checkpoint_pages
            .saturating_mul(WAL_HOLD_FACTOR)
            .max(WAL_HOLD_MIN_FRAMES);
        self.signal.set_wal_limit(if on { limit } else { 0 });
    }

    /// Handed over or fenced: nothing ships any more. Waits for shutdown; a handed-over
    /// instance looks at the lease once a TTL, in case nobody took the replica after all.
    async fn park(&mut self, stop: &mut watch::Receiver<Option<Instant>>) -> Result<(), ReplicaError> {
        let look = self
            .released
            .as_ref()
            .filter(|_| self.handed_over)
            .map(|r| r.options.ttl.saturating_sub(r.at.elapsed()));
        tokio::select! {
            changed = stop.changed() => if changed.is_err() {
                // The handle is gone without a shutdown: stop like a crash.
                return Err(ReplicaError::Stopped);
            },
            () = tokio::time::sleep(look.unwrap_or(Duration::from_secs(3600))) => {
                if look.is_some() {
                    self.take_back().await?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn note_pending(&self) {
        let mut pending = self.shared.pending_since.lock().expect("pending lock");
        if pending.is_none() && self.signal.commits() > self.shipped_mark {
            *pending = Some(Instant::now());
        }
    }

    /// After a failed round, returns `lock_conn` to a known state: no transaction open, and a
    /// read snapshot held — a new one taken *before* the old is let go, so that a foreign
    /// checkpoint never finds a moment with none.
    pub(super) async fn reset_transactions(&mut self) {
        let _ = sqlx::query("ROLLBACK").execute(&mut self.lock_conn).await;
        self.locked = false;
        if self.snapshot.refresh().await.is_err() {
            self.snapshot.release().await;
            let _ = self.snapshot.refresh().await;
        }
    }

    pub(super) fn note_failure(&self, error: &ReplicaError) {
        metrics::counter!("keycast_replica_sync_errors_total").increment(1);
        tracing::warn!(error = %error, "replication attempt failed; retrying");
        // Best effort: lets `keycast replica status` in another process show the error.
        let mut record = self.record(false);
        record.last_error = Some(error.to_string());
        let _ = local_state::store_quick(&self.db, &record);
        let mut status = self.shared.status.lock().expect("status lock");
        status.last_error = Some(error.to_string());
        status.failing_since.get_or_insert_with(Instant::now);
    }

    /// One round: ship what is committed, then checkpoint, verify and start a compaction if due.
    async fn step(&mut self) -> Result<(), ReplicaError> {
        let _busy = self.shared.busy();
        if let Some(ms) = held_round() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.sync(true).await?;
        if self.checkpoint_due() {
            self.checkpoint().await?;
        }
        self.reap_verification();
        if self.verify_due() {
            self.start_verification().await?;
        }
        self.compact().await;
        Ok(())
    }

    /// Starts what compaction is due, up to what this instance shipped (an object past it is
    /// nobody's business but the next upload's), in a task of its own beside shipping: a
    /// compaction on a slow store must not hold up uploads, nor the durable commits waiting
    /// on them. One runs at a time; a finished one is collected first. A failure does not
    /// fail the round: the schedule backs off, and an idle database stops retrying (see
    /// [`compactor::Schedule::failed`]).
    ///
    /// Compaction deletes objects, so it runs only while this instance may write: its
    /// retention asks [`Shared::may_delete`] right before deleting (a paused process
    /// resumes into a lapsed lease), and the worker stops it — aborted and awaited, see
    /// [`Worker::stop_compaction`] — before a hand-over releases the lease, when the
    /// instance is fenced or steps aside, and on shutdown.
    async fn compact(&mut self) {
        if self.compacting.as_ref().is_some_and(|c| c.task.is_finished()) {
            let Compacting { run, mut task, .. } = self.compacting.take().expect("checked");
            let outcome = (&mut task.0).await.ok();
            match &outcome {
                Some(Err(e)) => {
                    metrics::counter!("keycast_replica_compaction_errors_total").increment(1);
                    let retry_in = self.compaction.finished(&run, outcome.as_ref());
                    tracing::warn!(error = %e, retry_in_secs = retry_in.map(|d| d.as_secs()), "compaction failed; backing off");
                }
                _ => {
                    self.compaction.finished(&run, outcome.as_ref());
                }
            }
        }
        if self.compacting.is_some() {
            return;
        }
        let Some(run) = self.compaction.take_due(&self.options.compaction) else {
            return;
        };
        let (store, policy, upto, scratch) = (
            self.store.clone(),
            self.options.compaction.clone(),
            self.cursor.txid,
            self.scratch(),
        );
        let (shared, known) = (self.shared.clone(), self.known.clone());
        let job = run.clone();
        let done = Arc::new(Notify::new());
        let notify = done.clone();
        let task = tokio::spawn(async move {
            // The lease is renewed while it runs, as during any other work.
            let _busy = shared.busy();
            let may_delete = move || shared.may_delete();
            let outcome = compactor::run(
                &store,
                &known,
                &policy,
                &job,
                SystemTime::now(),
                upto,
                &scratch,
                &may_delete,
            )
            .await;
            notify.notify_one();
            outcome
        });
        self.compacting = Some(Compacting {
            run,
            task: AbortOnDrop(task),
            done,
        });
    }

    /// Resolves when the running compaction has ended (never while none runs): its result
    /// is collected, and the level above scheduled, at once — an idle database would
    /// otherwise leave it until the next write or timer, an hour away.
    fn compaction_finished(&self) -> impl Future<Output = ()> + 'static {
        let done = self.compacting.as_ref().map(|c| c.done.clone());
        async move {
            match done {
                Some(done) => done.notified().await,
                None => std::future::pending().await,
            }
        }
    }

    /// Stops a running compaction and waits until it has: once this returns, it sends no
    /// request any more (one already sent may still land, but it was decided while this
    /// instance held the lease, about files it had shipped). Its work goes back on the
    /// schedule, and what it knew of the replica is forgotten: whoever writes next may change
    /// it.
    pub(super) async fn stop_compaction(&mut self) {
        if let Some(Compacting { run, mut task, .. }) = self.compacting.take() {
            task.0.abort();
            let outcome = (&mut task.0).await.ok();
            self.compaction.finished(&run, outcome.as_ref().filter(|o| o.is_ok()));
        }
        self.known.invalidate();
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

    /// Takes the live database's checksum at the shipped TXID, then restores that TXID and
    /// compares, in the background. The write lock is held only while the tail ships (within
    /// the lock budget) and the read snapshot is pinned at the shipped position; the checksum
    /// is read after letting go of it, since nothing past the snapshot can reach the file.
    async fn start_verification(&mut self) -> Result<(), ReplicaError> {
        if !self.settle().await? {
            return Ok(()); // the tail did not ship within the budget: next round
        }
        let (txid, limit) = (self.cursor.txid, self.cursor.wal);
        self.unlock().await?;
        let db = self.db.clone();
        let expected = tokio::task::spawn_blocking(move || segment::LiveImage::open_upto(&db, limit)?.checksum())
            .await
            .map_err(join_error)??;
        self.last_verify = Instant::now();
        self.shipped_since_verify = false;
        let (store, shared) = (self.store.clone(), self.shared.clone());
        let (scratch, lineage) = (self.scratch(), self.lineage.clone());
        self.verifying = Some(tokio::spawn(async move {
            let result = crate::verify::verify_at(&store, txid, expected, &scratch, &lineage).await;
            shared.record_verification_outcome(txid, result.map(|_| ()))
        }));
        Ok(())
    }

    /// A finished verification that could not check the replica (the store or the disk
    /// failed it) is tried again after a twelfth of the interval (five minutes for the
    /// default hour), whether or not anything shipped since.
    fn reap_verification(&mut self) {
        let Some(task) = self.verifying.take_if(|t| t.is_finished()) else {
            return;
        };
        if let Some(Ok(true)) = futures::FutureExt::now_or_never(task) {
            let interval = self.options.verify_interval;
            self.shipped_since_verify = true;
            self.last_verify = Instant::now()
                .checked_sub(interval - interval / 12)
                .unwrap_or(self.last_verify);
        }
    }

    fn checkpoint_due(&self) -> bool {
        let frames = self.wal_frames();
        frames >= u64::from(self.options.checkpoint_pages)
            || (self.shipped_since_checkpoint && self.last_checkpoint.elapsed() >= self.options.checkpoint_interval)
    }

    /// Whether the WAL has grown so far past the checkpoint threshold (to [`WAL_LIMIT_FACTOR`]
    /// times it) that the checkpoint must not wait to catch up first: the write lock is taken
    /// at once, which stops the WAL from growing while the tail ships (within the lock
    /// budget) and the checkpoint runs. Writes wait for it as they would for SQLite's own
    /// checkpoint; this is what keeps the WAL bounded when uploads stall under sustained
    /// writes.
    fn wal_over_limit(&self) -> bool {
        self.wal_frames() >= u64::from(self.options.checkpoint_pages) * WAL_LIMIT_FACTOR
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

    /// Settles (everything committed shipped, the write lock held), then PASSIVE-checkpoints
    /// from the other connection and lets go of the lock. With the WAL fully checkpointed, the
    /// next writer restarts it, continuing exactly the shipped state.
    async fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        let (due_frames, started) = (self.wal_frames(), Instant::now());
        if !self.settle().await? {
            tracing::debug!("the WAL tail did not ship within the lock budget; checkpointing next round");
            return Ok(());
        }
        let settled_ms = started.elapsed().as_millis() as u64;
        let result = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut self.checkpoint_conn)
            .await;
        if let Ok((_, log, done)) = &result {
            self.cursor.reset_expected = *log >= 0 && log == done;
            if self.cursor.reset_expected {
                // Recorded before the next writer can restart the WAL (it waits for our lock):
                // after a crash, that new generation is then known to continue this state.
                local_state::store(&self.db, &self.record(false))?;
            }
        }
        self.unlock().await?;
        let (_busy, log, done) = result?;
        // Commits held at the WAL limit go on: the next one restarts the WAL.
        self.signal.checkpoint_done();
        self.last_checkpoint = Instant::now();
        self.shipped_since_checkpoint = false;
        metrics::counter!("keycast_replica_checkpoints_total", "mode" => "passive").increment(1);
        self.shared.status.lock().expect("status lock").checkpoints += 1;
        tracing::debug!(
            log,
            done,
            due_frames,
            settled_ms,
            took_ms = started.elapsed().as_millis() as u64,
            "checkpointed"
        );
        Ok(())
    }

    /// Closes the replicator's connections (after the final sync).
    /// After a final sync that shipped everything: whichever of these connections closes
    /// last folds the WAL into the file again (see [`super::keep_wal_on_close`]), so the file
    /// alone is the state the clean-stop record names. All of them: a connection's close
    /// returns before SQLite has let go of it, so which one is last is not known.
    pub(super) async fn fold_wal_on_close(&mut self) -> Result<(), ReplicaError> {
        for conn in self
            .snapshot
            .connections()
            .chain([&mut self.lock_conn, &mut self.checkpoint_conn])
        {
            let mut handle = conn.lock_handle().await?;
            // SAFETY: a live connection owned by this worker.
            unsafe { crate::capture::set_keep_wal_on_close(handle.as_raw_handle(), false) };
        }
        Ok(())
    }

    pub(super) async fn close_connections(self) {
        let Worker {
            snapshot,
            lock_conn,
            checkpoint_conn,
            ..
        } = self;
        snapshot.close().await;
        let _ = sqlx::Connection::close(lock_conn).await;
        let _ = sqlx::Connection::close(checkpoint_conn).await;
    }
}

/// A compaction running in its own task, and the work it took from the schedule.
struct Compacting {
    run: compactor::Run,
    task: AbortOnDrop<Result<Vec<usize>, ReplicaError>>,
    /// Notified as the task ends (a permit waits if nobody listens yet).
    done: Arc<Notify>,
}

/// A task aborted when its handle is dropped: if the worker itself is aborted (the
/// replicator dropped without a shutdown, as in a crash), its compaction must not go on
/// deleting objects unsupervised.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A transfer of the shipping pipeline, running as its own task so that it progresses while
/// the worker settles the uploads before it (and may take the lease's lock meanwhile), and
/// stopped if dropped unfinished — a failed round, or the worker itself stopping like a crash.
struct InFlight(tokio::task::JoinHandle<Result<PutOutcome, ReplicaError>>);

impl Future for InFlight {
    type Output = Result<PutOutcome, ReplicaError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|joined| joined.unwrap_or_else(|e| Err(join_error(e))))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Milliseconds the tests hold each round before it ships, as a slow store would (fail point
/// `replica-round`, `return(<ms>)`); always `None` without fault injection.
fn held_round() -> Option<u64> {
    fail::fail_point!("replica-round", |ms: Option<String>| ms.and_then(|ms| ms.parse().ok()));
    None
}

/// Encodes `segment`, read when the commit counter stood at `mark`, for upload once (see
/// [`Upload`]), stamped `stamp` (as its header is).
fn prepare(store: &Store, segment: Segment, mark: u64, stamp: i64) -> Result<Upload, ReplicaError> {
    let prepared = store.prepare_ltx(0, segment.txid, segment.txid, segment.body, stamp)?;
    Ok(Upload {
        txid: segment.txid,
        next: segment.next,
        commits: segment.commits,
        mark: segment.reached_end.then_some(mark),
        prepared_at: Instant::now(),
        prepared,
    })
}

pub(super) fn join_error(e: tokio::task::JoinError) -> ReplicaError {
    ReplicaError::LocalState(std::io::Error::other(e.to_string()))
}

fn lineage_document(lineage: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "lineage": lineage, "created_at_ms": now_ms() }).to_string())
}
