//! The replica's LTX files as the writer knows them: listed once, when compaction first needs
//! them (or taken from the start-up listing, when that one was complete: see
//! [`Known::seed`]), then kept up to date from the writer's own uploads, compactions and
//! deletions. So compaction and retention cost no listings — listings are class-A requests,
//! the bulk of the object-store bill (BENCHMARKS.md, "Object-store cost of a day").
//!
//! It is exact because only the lease holder writes the replica: while this instance writes,
//! nobody else adds or removes a file at or below its TXIDs (a stale writer's object past them
//! is replaced, and noted, when this instance ships that TXID). The worker drops the index
//! whenever it stops compacting (a hand-over, stepping aside), and a run that fails drops it
//! too — a file someone else deleted is then listed afresh, not trusted.
//!
//! It also holds the bytes of the level-0 files this instance stored, until level 1 holds
//! them: level 1 merges every level-0 file of the last interval (a thousand at 100 writes/s),
//! and fetching them back would cost a GET each and compete with the writer's PUTs on the
//! same store (BENCHMARKS.md, replication lag on S3). The bytes are those the store accepted,
//! create-only, under a lease confirmed after the PUT — the object's contents exactly — and
//! they are checked as they are applied, like fetched ones. At most [`HELD_BYTES`] are held;
//! past that, and for files stored before this instance wrote (or before the index was last
//! dropped), compaction fetches.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;

use crate::store::{LtxObject, PreparedLtx, Store, StoreError};

/// Most bytes of level-0 files held for level 1 (see the module documentation). The lag
/// benchmark's one-row commits make level-0 files of about 2 KiB: 10 s of them (one level-1
/// interval) are about 2 MiB at 100 writes/s and 10 MiB at 500/s. Past the bound, compaction
/// fetches the rest.
pub const HELD_BYTES: usize = 16 << 20;

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
    /// The plaintext of level-0 files this instance stored, by (min TXID, max TXID).
    held: BTreeMap<(u64, u64), Bytes>,
    /// Their total length.
    held_bytes: usize,
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

    /// Every file the replica holds, as a complete listing just found them (nothing is
    /// stored or deleted meanwhile: the writer has not started): no listing is needed.
    pub fn seed(&self, files: impl IntoIterator<Item = LtxObject>) {
        let mut state = self.state.lock().expect("known files");
        state.files = Some(
            files
                .into_iter()
                .map(|f| ((f.level, f.min_txid, f.max_txid), f))
                .collect(),
        );
    }

    /// A level-0 file this instance just stored: noted, and its bytes held for level 1 if
    /// they are in memory and within [`HELD_BYTES`].
    pub fn note_stored(&self, file: &PreparedLtx) {
        self.note(file.described());
        let Some(bytes) = file.body.in_memory().filter(|_| file.level == 0) else {
            return;
        };
        let mut state = self.state.lock().expect("known files");
        if state.held_bytes + bytes.len() <= HELD_BYTES {
            state.held_bytes += bytes.len();
            // A copy of exactly its length: the body's own buffer grew by doubling, and the
            // bound is on what is held, not on half of it.
            let exact = Bytes::copy_from_slice(bytes);
            state.held.insert((file.min_txid, file.max_txid), exact);
            held_gauge(state.held_bytes);
        }
    }

    /// The bytes of `file`, if it is a level-0 file this instance stored and still holds.
    pub fn held(&self, file: &LtxObject) -> Option<Bytes> {
        if file.level != 0 {
            return None;
        }
        let state = self.state.lock().expect("known files");
        state.held.get(&(file.min_txid, file.max_txid)).cloned()
    }

    /// Level 1 holds every TXID up to `txid`: the level-0 bytes up to it are not needed.
    pub fn release_through(&self, txid: u64) {
        let mut state = self.state.lock().expect("known files");
        let kept = state.held.split_off(&(txid + 1, 0));
        let released: usize = state.held.values().map(Bytes::len).sum();
        state.held = kept;
        state.held_bytes -= released;
        held_gauge(state.held_bytes);
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

    /// Forgets everything, held bytes too: the next [`Known::files`] lists the replica again.
    pub fn invalidate(&self) {
        let mut state = self.state.lock().expect("known files");
        state.files = None;
        state.pruned_at = None;
        state.held.clear();
        state.held_bytes = 0;
        held_gauge(0);
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

/// The memory level-0 bytes held for compaction take, for the operator's sizing.
fn held_gauge(bytes: usize) {
    metrics::gauge!("keycast_replica_compaction_held_bytes").set(bytes as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spill::Body;

    fn prepared(store: &Store, level: u8, txid: u64, len: usize) -> PreparedLtx {
        store
            .prepare_ltx(level, txid, txid, Body::from(vec![0u8; len]), 0)
            .unwrap()
    }

    /// Holding is bounded: past [`HELD_BYTES`] nothing more is held (compaction fetches it
    /// instead), until level 1 releases what it covers.
    #[test]
    fn held_bytes_stay_within_their_bound_and_are_released_by_level_one() {
        let store = Store::in_memory();
        let known = Known::new();
        let quarter = HELD_BYTES / 4;
        for txid in 1..=5 {
            known.note_stored(&prepared(&store, 0, txid, quarter));
        }
        let held = |txid| known.held(&prepared(&store, 0, txid, 0).described()).is_some();
        assert_eq!((1..=5).map(held).collect::<Vec<_>>(), [true, true, true, true, false]);
        known.release_through(2);
        assert!(!held(1) && !held(2) && held(3) && held(4));
        known.note_stored(&prepared(&store, 0, 6, quarter));
        known.note_stored(&prepared(&store, 0, 7, quarter));
        known.note_stored(&prepared(&store, 0, 8, quarter));
        assert_eq!((6..=8).map(held).collect::<Vec<_>>(), [true, true, false]);
    }

    /// Only level-0 files are held: level 1 is what merges them. And a dropped index drops
    /// them too — whoever writes next may change the replica.
    #[test]
    fn only_level_zero_is_held_and_invalidating_drops_it() {
        let store = Store::in_memory();
        let known = Known::new();
        known.note_stored(&prepared(&store, 1, 1, 10));
        known.note_stored(&prepared(&store, 0, 2, 10));
        assert!(known.held(&prepared(&store, 1, 1, 0).described()).is_none());
        assert_eq!(known.held(&prepared(&store, 0, 2, 0).described()).unwrap().len(), 10);
        known.invalidate();
        assert!(known.held(&prepared(&store, 0, 2, 0).described()).is_none());
    }
}
