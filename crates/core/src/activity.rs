//! The activity buffer: records of what authorizations did, kept in memory and written
//! in batches by [`crate::Signer::flush`], so signing never waits on a database commit.
//!
//! The buffer is bounded. If the database stays unwritable long enough to fill it, the
//! oldest records are dropped and counted ([`ActivityBuffer::dropped`]): losing audit
//! lines is better than running out of memory or stopping signing. The signatures among
//! them are still counted per grant and added to its stored total by the next flush, so
//! that a `max_signatures` grant cannot sign more after a restart because its record was
//! dropped.
//!
//! The stored record is bounded too ([`RecordBound`]): an app signing as fast as it can
//! would otherwise grow the database by every request for good, and on Cloud Run that disk
//! is memory. Each grant keeps about its newest [`DEFAULT_KEPT_PER_GRANT`] records; older
//! ones are pruned as it signs (`keycast_db::activity::prune`), their signatures still
//! counted in the grant's total, and a grant with a rate limit keeps the signatures of its
//! longest window, which that limit counts again after a restart.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use keycast_db::activity::NewActivity;
use keycast_db::AuthorizationId;

/// Default bound on buffered records.
pub const DEFAULT_ACTIVITY_CAPACITY: usize = 100_000;

/// Default number of records kept per grant: the owner's pages show the newest 20 of a
/// grant and 500 of an account.
pub const DEFAULT_KEPT_PER_GRANT: u32 = 1_000;

/// Which grants have written enough since their last pruning to be pruned again: a quarter
/// of the kept number, so pruning costs a statement per that many records and a grant's
/// record stays under 2.25 times the kept number (the kept number of each class, see
/// `keycast_db::activity::prune`, plus a quarter, plus one flush).
#[derive(Debug)]
pub(crate) struct RecordBound {
    keep: u32,
    /// Records written per grant since its last pruning (or since start).
    written: Mutex<HashMap<AuthorizationId, u32>>,
}

impl RecordBound {
    pub fn new(keep: u32) -> Self {
        RecordBound {
            keep: keep.max(1),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Records kept per grant.
    pub fn keep(&self) -> u32 {
        self.keep
    }

    /// Counts a written batch; returns the grants now due for pruning.
    pub fn written(&self, batch: &[NewActivity]) -> Vec<AuthorizationId> {
        let due_after = (self.keep / 4).max(1);
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        for record in batch {
            *written.entry(record.authorization_id.clone()).or_insert(0) += 1;
        }
        // Still due after a pruning that failed: it is tried again with the next batch.
        let due: HashSet<&AuthorizationId> = batch
            .iter()
            .map(|r| &r.authorization_id)
            .filter(|id| written.get(*id).is_some_and(|n| *n >= due_after))
            .collect();
        due.into_iter().cloned().collect()
    }

    /// The grant was pruned (or is gone): it counts from zero again.
    pub fn pruned(&self, id: &AuthorizationId) {
        self.written.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }
}

/// Whether a record is one signature made (what a grant's total counts: see
/// `keycast_db::activity::SIGNATURES_IN_ALL`).
fn is_signature(record: &NewActivity) -> bool {
    record.method == "sign_event" && record.result.is_none()
}

/// Records waiting to be written.
#[derive(Debug)]
pub(crate) struct ActivityBuffer {
    pending: Mutex<VecDeque<NewActivity>>,
    capacity: usize,
    dropped: AtomicU64,
    /// Signatures among the dropped records, per grant, not yet in its stored total (one
    /// entry per grant, so bounded by the grants that signed). Locked after `pending`.
    dropped_signatures: Mutex<HashMap<AuthorizationId, u64>>,
}

impl ActivityBuffer {
    pub fn new(capacity: usize) -> Self {
        ActivityBuffer {
            pending: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
            dropped_signatures: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a record; drops the oldest when full.
    pub fn record(&self, activity: NewActivity) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= self.capacity {
            let oldest = pending.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.count_dropped(oldest);
        }
        pending.push_back(activity);
    }

    /// Keeps the signatures of `dropped` records for [`ActivityBuffer::take_dropped_signatures`].
    fn count_dropped(&self, dropped: impl IntoIterator<Item = NewActivity>) {
        let mut counts = self.dropped_signatures.lock().unwrap_or_else(PoisonError::into_inner);
        for record in dropped.into_iter().filter(is_signature) {
            *counts.entry(record.authorization_id).or_insert(0) += 1;
        }
    }

    /// The signatures dropped since the last call, per grant, for the caller to add to the
    /// grants' stored totals (and to give back with [`ActivityBuffer::untake_dropped_signatures`]
    /// if it cannot).
    pub fn take_dropped_signatures(&self) -> HashMap<AuthorizationId, u64> {
        std::mem::take(&mut *self.dropped_signatures.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Gives back counts [`ActivityBuffer::take_dropped_signatures`] returned.
    pub fn untake_dropped_signatures(&self, taken: HashMap<AuthorizationId, u64>) {
        let mut counts = self.dropped_signatures.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, n) in taken {
            *counts.entry(id).or_insert(0) += n;
        }
    }

    /// Takes the oldest `most` records buffered (all, if fewer).
    pub fn take(&self, most: usize) -> Vec<NewActivity> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let n = most.min(pending.len());
        pending.drain(..n).collect()
    }

    /// Puts back a batch that could not be written, ahead of newer records, keeping the
    /// newest `capacity` in all.
    pub fn put_back(&self, batch: Vec<NewActivity>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let mut merged = VecDeque::from(batch);
        merged.append(&mut pending);
        let excess = merged.len().saturating_sub(self.capacity);
        self.count_dropped(merged.drain(..excess));
        self.dropped.fetch_add(excess as u64, Ordering::Relaxed);
        *pending = merged;
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Records dropped because the buffer was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keycast_db::activity::Transport;
    use keycast_db::AuthorizationId;

    fn at(t: i64) -> NewActivity {
        NewActivity {
            id: keycast_db::ActivityId::generate(),
            authorization_id: AuthorizationId::new("a"),
            method: "sign_event",
            kind: Some(1),
            transport: Transport::Nip46,
            created_at: t,
            result: None,
        }
    }

    fn times(batch: &[NewActivity]) -> Vec<i64> {
        batch.iter().map(|a| a.created_at).collect()
    }

    #[test]
    fn full_buffer_drops_the_oldest_and_counts_it() {
        let buffer = ActivityBuffer::new(2);
        for t in 1..=3 {
            buffer.record(at(t));
        }
        assert_eq!(buffer.dropped(), 1);
        assert_eq!(times(&buffer.take(usize::MAX)), [2, 3]);
        assert_eq!(buffer.len(), 0);
    }

    #[test]
    fn take_hands_out_the_oldest_first_in_bounded_batches() {
        let buffer = ActivityBuffer::new(10);
        for t in 1..=5 {
            buffer.record(at(t));
        }
        assert_eq!(times(&buffer.take(2)), [1, 2]);
        assert_eq!(times(&buffer.take(2)), [3, 4]);
        assert_eq!(times(&buffer.take(2)), [5]);
        assert!(buffer.take(2).is_empty());
    }

    #[test]
    fn failed_batch_goes_back_before_newer_records() {
        let buffer = ActivityBuffer::new(3);
        buffer.record(at(1));
        buffer.record(at(2));
        let batch = buffer.take(usize::MAX);
        buffer.record(at(3));
        buffer.record(at(4));
        buffer.put_back(batch);
        assert_eq!(times(&buffer.take(usize::MAX)), [2, 3, 4]);
        assert_eq!(buffer.dropped(), 1);
    }

    #[test]
    fn dropped_signatures_are_counted_per_grant_until_taken_and_given_back_if_unwritten() {
        let buffer = ActivityBuffer::new(2);
        let of = |id: &str, method: &'static str, result: Option<&'static str>| NewActivity {
            id: keycast_db::ActivityId::generate(),
            authorization_id: AuthorizationId::new(id),
            method,
            result,
            ..at(1)
        };
        buffer.record(of("a", "sign_event", None));
        buffer.record(of("a", "sign_event", Some("policy_denied")));
        buffer.record(of("b", "nip44_encrypt", None));
        buffer.record(of("b", "sign_event", None));
        buffer.record(of("c", "sign_event", None));
        // Dropped: a's signature, a's refusal, b's encryption (only the first counts).
        assert_eq!(buffer.dropped(), 3);
        let batch = buffer.take(usize::MAX);
        buffer.record(of("c", "sign_event", None));
        buffer.record(of("c", "sign_event", None));
        buffer.put_back(batch); // b's and c's first signatures no longer fit
        let taken = buffer.take_dropped_signatures();
        let expected = HashMap::from([
            (AuthorizationId::new("a"), 1),
            (AuthorizationId::new("b"), 1),
            (AuthorizationId::new("c"), 1),
        ]);
        assert_eq!(taken, expected);
        assert!(buffer.take_dropped_signatures().is_empty(), "taken once");
        buffer.untake_dropped_signatures(taken);
        buffer.record(of("c", "sign_event", None));
        let again = buffer.take_dropped_signatures();
        assert_eq!(again[&AuthorizationId::new("c")], 2, "given back, and added to");
    }

    #[test]
    fn a_grant_is_due_for_pruning_every_quarter_of_the_kept_records_until_pruned() {
        let bound = RecordBound::new(8);
        let of = |id: &str, n: usize| -> Vec<NewActivity> {
            (0..n)
                .map(|t| NewActivity {
                    id: keycast_db::ActivityId::generate(),
                    authorization_id: AuthorizationId::new(id),
                    ..at(t as i64)
                })
                .collect()
        };
        assert!(bound.written(&of("a", 1)).is_empty());
        let mut batch = of("a", 1);
        batch.extend(of("b", 1));
        assert_eq!(bound.written(&batch), [AuthorizationId::new("a")], "a: 2 of 8/4");
        // Not pruned (it failed): due again with its next record, and only once per batch.
        assert_eq!(bound.written(&of("a", 3)), [AuthorizationId::new("a")]);
        bound.pruned(&AuthorizationId::new("a"));
        assert!(bound.written(&of("a", 1)).is_empty(), "counted from zero again");
        assert_eq!(bound.written(&of("b", 1)), [AuthorizationId::new("b")]);
    }
}
