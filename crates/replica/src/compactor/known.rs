//! The replica's LTX files as the writer knows them: listed once, when compaction first needs
//! them, then kept up to date from the writer's own uploads, compactions and deletions. So
//! compaction and retention cost no listings — listings are class-A requests, the bulk of the
//! object-store bill (BENCHMARKS.md, "Object-store cost of a day").
//!
//! It is exact because only the lease holder writes the replica: while this instance writes,
//! nobody else adds or removes a file at or below its TXIDs (a stale writer's object past them
//! is replaced, and noted, when this instance ships that TXID). The worker drops the index
//! whenever it stops compacting (a hand-over, stepping aside), and a run that fails drops it
//! too — a file someone else deleted is then listed afresh, not trusted.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::store::{LtxObject, Store, StoreError};

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Known {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Every file, by (level, min TXID, max TXID); `None` until listed.
    files: Option<BTreeMap<(u8, u64, u64), LtxObject>>,
    /// Files noted while the first listing runs: the listing may or may not include them.
    noted_while_listing: Vec<LtxObject>,
    listing: bool,
    /// When the staging area was last pruned (see `compactor::enforce_retention`).
    pruned_at: Option<Instant>,
}

impl Known {
    /// An index that lists the replica when first asked.
    pub fn new() -> Known {
        Known::default()
    }

    /// A file this instance stored.
    pub fn note(&self, file: LtxObject) {
        let mut state = self.state.lock().expect("known files");
        if state.listing {
            state.noted_while_listing.push(file.clone());
        }
        if let Some(files) = state.files.as_mut() {
            files.insert((file.level, file.min_txid, file.max_txid), file);
        }
    }

    /// Files this instance deleted.
    pub fn forget(&self, deleted: &[LtxObject]) {
        let mut state = self.state.lock().expect("known files");
        if let Some(files) = state.files.as_mut() {
            for f in deleted {
                files.remove(&(f.level, f.min_txid, f.max_txid));
            }
        }
    }

    /// Forgets everything: the next [`Known::files`] lists the replica again.
    pub fn invalidate(&self) {
        let mut state = self.state.lock().expect("known files");
        state.files = None;
        state.pruned_at = None;
    }

    /// Every file, sorted by level, then TXIDs; lists the replica the first time.
    ///
    /// # Errors
    /// The listing's.
    pub async fn files(&self, store: &Store) -> Result<Vec<LtxObject>, StoreError> {
        {
            let mut state = self.state.lock().expect("known files");
            if let Some(files) = state.files.as_ref() {
                return Ok(files.values().cloned().collect());
            }
            state.listing = true;
            state.noted_while_listing.clear();
        }
        let listed = store.list_all().await;
        let mut state = self.state.lock().expect("known files");
        state.listing = false;
        let noted = std::mem::take(&mut state.noted_while_listing);
        let mut files: BTreeMap<(u8, u64, u64), LtxObject> = listed?
            .into_iter()
            .map(|f| ((f.level, f.min_txid, f.max_txid), f))
            .collect();
        for f in noted {
            files.insert((f.level, f.min_txid, f.max_txid), f);
        }
        let all = files.values().cloned().collect();
        state.files = Some(files);
        Ok(all)
    }

    /// Whether the staging area is due for pruning (at most once per `every`), marking it
    /// done.
    pub(super) fn prune_due(&self, every: std::time::Duration) -> bool {
        let mut state = self.state.lock().expect("known files");
        let due = state.pruned_at.is_none_or(|at| at.elapsed() >= every);
        if due {
            state.pruned_at = Some(Instant::now());
        }
        due
    }
}
