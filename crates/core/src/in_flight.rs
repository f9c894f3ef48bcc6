//! Requests on their way through a transport, counted so that a hand-over can wait for them.
//!
//! On SQLite a deploy's old instance stops answering once it is no longer the writer
//! (`Durability::is_writer`, checked by each transport before it starts), and its hand-over
//! then writes the signing activity still buffered. A request that passed that check just
//! before the hand-over began may still be signing: its record would reach the buffer after
//! the last write, and be lost. Each transport therefore holds a [`Guard`] from *before* its
//! writer check until it has answered (NIP-46 from the moment it hands the request to a
//! task); the hand-over waits for the count to reach zero ([`InFlight::drain`]) before it
//! writes. A request that starts after the hand-over began fails the writer check, so the
//! wait is for the few already under way. Shutdown waits the same way before its last write,
//! once no new request is taken.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// A count of requests under way. See the module documentation.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    drained: Notify,
}

/// One request under way; ends when dropped. Owned, so a request handed to a task of its
/// own is counted before the task starts.
#[derive(Debug)]
pub struct Guard(Arc<InFlight>);

impl InFlight {
    /// Counts a request until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> Guard {
        self.count.fetch_add(1, Ordering::SeqCst);
        Guard(self.clone())
    }

    /// Waits until no request is under way, at most `limit`. Returns whether none is.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the count is read, so a guard dropped in between wakes it.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return self.count.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn drain_waits_for_the_requests_under_way_and_no_longer() {
        let requests = Arc::new(InFlight::default());
        assert!(requests.drain(Duration::from_millis(10)).await, "none under way");
        let (started, finish) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let request = tokio::spawn({
            let (requests, started, finish) = (requests.clone(), started.clone(), finish.clone());
            async move {
                let _guard = requests.enter();
                started.notify_one();
                finish.notified().await;
            }
        });
        started.notified().await;
        assert!(!requests.drain(Duration::from_millis(50)).await, "one is under way");
        let draining = tokio::spawn({
            let requests = requests.clone();
            async move { requests.drain(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        finish.notify_one();
        request.await.unwrap();
        assert!(draining.await.unwrap(), "drained once it ended");
    }
}
