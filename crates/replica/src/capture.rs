//! Commit capture: a WAL hook on every application connection that wakes the replicator.
//!
//! SQLite calls the hook right after a transaction commits in WAL mode, on the committing
//! thread, once the frames are in the `-wal` file. The hook only bumps a counter and wakes
//! the replicator — it never does I/O — so the commit path pays a few nanoseconds.
//!
//! Installing a WAL hook also disables SQLite's automatic checkpointing on that connection
//! (autocheckpoint is itself a WAL hook), which is what we want: only the replicator
//! checkpoints.
//!
//! The counter doubles as a durability position: a writer that reads [`CommitSignal::commits`]
//! after its commit returned knows that every commit up to that number is in the WAL, and the
//! replicator reports which number it has shipped (see `Replicator::wait_durable`).
//!
//! # The WAL limit
//! The hook is also where the WAL is kept bounded. SQLite passes it the WAL's size in frames;
//! when that is past the limit the replicator set ([`CommitSignal::set_wal_limit`]), the
//! committing thread waits — after its commit, holding no lock — for the replicator's next
//! checkpoint, at most [`MAX_WAL_WAIT`]. The commit itself has happened and never fails;
//! it returns a little later, as it would if the writer ran SQLite's own checkpoint. Without
//! it, a writer faster than the uploads (a store that stalls for a moment) grows the WAL —
//! and on a platform whose disk is memory, the instance — without bound. The replicator
//! lifts the limit whenever it cannot checkpoint (uploads failing, fenced, stopped), so a
//! broken store slows nothing down.

use std::ffi::{c_char, c_int, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use libsqlite3_sys::{sqlite3, sqlite3_busy_handler, sqlite3_wal_hook, SQLITE_OK};
use tokio::sync::Notify;

/// Longest a commit waits in the hook for a checkpoint when the WAL is past its limit.
pub const MAX_WAL_WAIT: Duration = Duration::from_secs(1);

/// Shared between the WAL hooks of all connections and the replicator.
#[derive(Debug, Default)]
pub struct CommitSignal {
    commits: AtomicU64,
    notify: Notify,
    /// WAL frames past which a commit waits for the next checkpoint; 0: no limit.
    wal_limit: AtomicU32,
    /// Checkpoints completed (and limit changes): waiting commits watch it change.
    checkpoints: Mutex<u64>,
    checkpointed: Condvar,
}

impl CommitSignal {
    /// A fresh signal, shared by the application pool and the replicator.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Commits seen so far by every hooked connection.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// Records a commit and wakes the replicator. Public so tests and non-hooked writers can
    /// signal too.
    pub fn committed(&self) {
        self.commits.fetch_add(1, Ordering::SeqCst);
        // notify_one stores a permit when nobody waits, so a commit that lands while the
        // replicator is busy uploading is not missed: it wakes the next wait at once.
        self.notify.notify_one();
    }

    /// Waits for the next commit (returns at once if one happened since the last wait).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Wakes the replicator without a commit (shutdown, forced sync).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Sets the WAL size, in frames, past which commits wait for the next checkpoint; 0 lifts
    /// the limit (and releases every waiting commit). See the module docs.
    pub fn set_wal_limit(&self, frames: u32) {
        if self.wal_limit.swap(frames, Ordering::SeqCst) != frames {
            self.checkpoint_done();
        }
    }

    /// The replicator finished a checkpoint: commits waiting for one go on.
    pub fn checkpoint_done(&self) {
        *self.checkpoints.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.checkpointed.notify_all();
    }

    /// Called by the hook after a commit that left `frames` frames in the WAL: waits for the
    /// next checkpoint if that is past the limit. Returns whether it waited.
    pub fn hold_if_over_limit(&self, frames: u32) -> bool {
        let limit = self.wal_limit.load(Ordering::SeqCst);
        if limit == 0 || frames < limit {
            return false;
        }
        metrics::counter!("keycast_replica_wal_limit_waits_total").increment(1);
        let seen = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
        let start = *seen;
        let _ = self
            .checkpointed
            .wait_timeout_while(seen, MAX_WAL_WAIT, |n| *n == start)
            .unwrap_or_else(|e| e.into_inner());
        true
    }
}

/// Installs a busy handler on one raw SQLite connection that retries a locked database
/// every 50 µs at first, backing off to every millisecond, until `timeout` has passed — in
/// place of `busy_timeout`, whose retries back off to 100 ms apart.
///
/// SQLite's own handler suits rare contention. Here the replicator takes the write lock for a
/// few milliseconds at every checkpoint, and under sustained writes its `BEGIN IMMEDIATE`
/// contends with a writer that holds the lock most of the time: with `busy_timeout` the
/// replicator's retries drift apart while the WAL grows, and every writer sleeps on average
/// half its current back-off past the moment the lock is free again.
///
/// # Safety
/// `db` must be a valid, open connection handle.
pub unsafe fn install_busy_handler(db: NonNull<sqlite3>, timeout: Duration) {
    // The context is the timeout itself, in milliseconds: nothing to allocate or free.
    let ms = usize::try_from(timeout.as_millis()).unwrap_or(usize::MAX);
    sqlite3_busy_handler(db.as_ptr(), Some(on_busy), ms as *mut c_void);
}

/// Makes the connection leave the WAL in place when it closes, even as the database's last
/// connection: SQLite otherwise checkpoints the WAL into the file and removes it then. For a
/// program other than `keycast serve` on a replicated database (its commands run while the
/// service is down): folded into the file, its commits — and those the service made but had
/// not shipped before it crashed — would be nowhere the next start can ship them from.
///
/// # Safety
/// `db` must be a valid, open connection handle.
pub unsafe fn keep_wal_on_close(db: NonNull<sqlite3>) {
    set_keep_wal_on_close(db, true);
}

/// [`keep_wal_on_close`], or back to SQLite's default (fold the WAL in when this connection
/// closes last) with `keep` false.
///
/// # Safety
/// `db` must be a valid, open connection handle.
pub unsafe fn set_keep_wal_on_close(db: NonNull<sqlite3>, keep: bool) {
    let set: c_int = c_int::from(keep);
    libsqlite3_sys::sqlite3_db_config(
        db.as_ptr(),
        libsqlite3_sys::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        set,
        std::ptr::null_mut::<c_int>(),
    );
}

std::thread_local! {
    /// When the current run of busy retries on this thread began (SQLite calls the handler
    /// on the thread running the statement, and restarts `count` at 0 for every new wait).
    static BUSY_SINCE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

unsafe extern "C" fn on_busy(ctx: *mut c_void, count: c_int) -> c_int {
    let timeout = Duration::from_millis(ctx as usize as u64);
    let now = std::time::Instant::now();
    let since = BUSY_SINCE.with(|since| {
        if count == 0 || since.get().is_none() {
            since.set(Some(now));
        }
        since.get().unwrap_or(now)
    });
    if now.duration_since(since) >= timeout {
        return 0; // give up: the statement fails with SQLITE_BUSY
    }
    std::thread::sleep(busy_delay(count));
    1
}

/// The pause before retry number `count` + 1: 50 µs, doubling up to 1 ms.
fn busy_delay(count: c_int) -> Duration {
    let shift = u32::try_from(count).unwrap_or(0).min(5);
    Duration::from_micros(50 << shift).min(Duration::from_millis(1))
}

/// Installs the commit hook on one raw SQLite connection.
///
/// # Safety
/// `db` must be a valid, open connection handle; the hook stays installed for the
/// connection's life. The signal is kept alive by a leaked `Arc` reference (one per
/// connection, a few bytes), because SQLite offers no destructor for the hook's context.
pub unsafe fn install_wal_hook(db: NonNull<sqlite3>, signal: &Arc<CommitSignal>) {
    let ctx = Arc::into_raw(signal.clone()) as *mut c_void;
    sqlite3_wal_hook(db.as_ptr(), Some(on_commit), ctx);
}

unsafe extern "C" fn on_commit(ctx: *mut c_void, _db: *mut sqlite3, _name: *const c_char, frames: c_int) -> c_int {
    // SAFETY: ctx was produced by Arc::into_raw in install_wal_hook and is never released.
    let signal = unsafe { &*(ctx as *const CommitSignal) };
    signal.committed();
    // The transaction is committed and its locks released: waiting here holds up only this
    // writer, never the replicator's checkpoint.
    signal.hold_if_over_limit(u32::try_from(frames).unwrap_or(0));
    SQLITE_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `hold_if_over_limit(frames)` on a thread, calling `release` every 10 ms until it
    /// returns; returns whether it waited and for how long.
    fn hold_released_by(signal: &Arc<CommitSignal>, frames: u32, release: impl Fn()) -> (bool, Duration) {
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                (signal.hold_if_over_limit(frames), started.elapsed())
            })
        };
        while !waiter.is_finished() {
            release();
            std::thread::sleep(Duration::from_millis(10));
        }
        waiter.join().unwrap()
    }

    #[test]
    fn a_commit_past_the_wal_limit_waits_for_the_next_checkpoint_and_no_longer() {
        let signal = CommitSignal::new();
        assert!(!signal.hold_if_over_limit(1_000_000), "no limit set: never waits");
        signal.set_wal_limit(100);
        assert!(!signal.hold_if_over_limit(99));
        let (waited, took) = hold_released_by(&signal, 100, || signal.checkpoint_done());
        assert!(
            waited && took < MAX_WAL_WAIT,
            "released by a checkpoint, after {took:?}"
        );
        // Nobody checkpoints: the wait ends on its own.
        let started = std::time::Instant::now();
        assert!(signal.hold_if_over_limit(150));
        assert!(started.elapsed() >= MAX_WAL_WAIT);
        // Lifting the limit releases a waiter at once (or it never waits).
        let (_, took) = hold_released_by(&signal, 200, || signal.set_wal_limit(0));
        assert!(took < MAX_WAL_WAIT, "{took:?}");
        assert!(!signal.hold_if_over_limit(200));
    }

    #[test]
    fn busy_retries_start_fast_and_never_drift_past_a_millisecond() {
        assert_eq!(busy_delay(0), Duration::from_micros(50));
        assert_eq!(busy_delay(1), Duration::from_micros(100));
        assert_eq!(busy_delay(4), Duration::from_micros(800));
        assert_eq!(busy_delay(5), Duration::from_millis(1));
        assert_eq!(busy_delay(10_000), Duration::from_millis(1));
    }

    #[tokio::test]
    async fn a_commit_before_waiting_is_not_lost() {
        let signal = CommitSignal::new();
        signal.committed();
        tokio::time::timeout(std::time::Duration::from_secs(1), signal.wait())
            .await
            .expect("woken");
        assert_eq!(signal.commits(), 1);
    }
}
