//! The activity buffer: records of what authorizations did, kept in memory and written
//! in batches by [`crate::Signer::flush`], so signing never waits on a database commit.
//!
//! The buffer is bounded. If the database stays unwritable long enough to fill it, the
//! oldest records are dropped and counted ([`ActivityBuffer::dropped`]): losing audit
//! lines is better than running out of memory or stopping signing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use keycast_db::activity::NewActivity;

/// Default bound on buffered records.
pub const DEFAULT_ACTIVITY_CAPACITY: usize = 100_000;

/// Records waiting to be written.
#[derive(Debug)]
pub(crate) struct ActivityBuffer {
    pending: Mutex<VecDeque<NewActivity>>,
    capacity: usize,
    dropped: AtomicU64,
}

impl ActivityBuffer {
    pub fn new(capacity: usize) -> Self {
        ActivityBuffer {
            pending: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// Adds a record; drops the oldest when full.
    pub fn record(&self, activity: NewActivity) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= self.capacity {
            pending.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        pending.push_back(activity);
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
        merged.drain(..excess);
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
}
