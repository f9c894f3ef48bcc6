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

use std::ffi::{c_char, c_int, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use libsqlite3_sys::{sqlite3, sqlite3_wal_hook, SQLITE_OK};
use tokio::sync::Notify;

/// Shared between the WAL hooks of all connections and the replicator.
#[derive(Debug, Default)]
pub struct CommitSignal {
    commits: AtomicU64,
    notify: Notify,
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

unsafe extern "C" fn on_commit(ctx: *mut c_void, _db: *mut sqlite3, _name: *const c_char, _frames: c_int) -> c_int {
    // SAFETY: ctx was produced by Arc::into_raw in install_wal_hook and is never released.
    let signal = unsafe { &*(ctx as *const CommitSignal) };
    signal.committed();
    SQLITE_OK
}

#[cfg(test)]
mod tests {
    use super::*;

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
