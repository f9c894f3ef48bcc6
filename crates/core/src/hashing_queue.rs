//! A bounded queue for the memory-hard work a request can trigger: argon2id password hashing
//! (19 MiB each) and NIP-49 scrypt export (64 MiB). Without it, a burst of logins runs one
//! hash per blocking thread at once (tokio allows 512): 300 concurrent wrong-password logins
//! took keycast from 21 MiB to 5,357 MiB (issue 12, item 5).
//!
//! The queue has a memory budget in MiB ([`DEFAULT_BUDGET_MIB`]): each job takes as many
//! permits as it needs memory, so at most budget ÷ 19 hashes (or budget ÷ 64 exports) run at
//! once. At most `max_waiting` jobs wait for permits; one more is refused at once with
//! [`Busy`], which HTTP answers 503 with `Retry-After`. The process's memory for this work is
//! therefore bounded by the budget, whatever the load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Default memory budget, MiB: six argon2id hashes or two scrypt exports at once.
pub const DEFAULT_BUDGET_MIB: u32 = 128;
/// Default number of jobs that may wait for the budget.
pub const DEFAULT_MAX_WAITING: usize = 64;
/// Memory of one argon2id hash with the default parameters, MiB (rounded up).
pub const ARGON2_MIB: u32 = 19;
/// Memory of one NIP-49 export at `LOG_N` 16 (scrypt, r = 8), MiB.
pub const SCRYPT_MIB: u32 = 64;

/// The queue was full: try again in a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("keycast is busy checking other passwords; retry in a second")]
pub struct Busy;

/// The queue; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct HashingQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Semaphore,
    budget_mib: u32,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl Default for HashingQueue {
    fn default() -> Self {
        HashingQueue::new(DEFAULT_BUDGET_MIB, DEFAULT_MAX_WAITING)
    }
}

impl HashingQueue {
    /// A queue with `budget_mib` MiB of memory for running jobs and room for `max_waiting`
    /// waiting ones. A budget below one job's need still runs that job alone.
    pub fn new(budget_mib: u32, max_waiting: usize) -> HashingQueue {
        let budget_mib = budget_mib.max(1);
        HashingQueue {
            inner: Arc::new(Inner {
                permits: Semaphore::new(budget_mib as usize),
                budget_mib,
                waiting: AtomicUsize::new(0),
                max_waiting,
            }),
        }
    }

    /// Runs `work`, which needs `cost_mib` MiB, on the blocking pool once the budget allows.
    ///
    /// # Errors
    /// [`Busy`] at once when `max_waiting` jobs are already waiting (or the blocking task died).
    pub async fn run<T: Send + 'static>(
        &self,
        cost_mib: u32,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let cost = cost_mib.clamp(1, self.inner.budget_mib);
        let waiting = self.inner.waiting.fetch_add(1, Ordering::AcqRel);
        let permit = if waiting >= self.inner.max_waiting && self.inner.permits.available_permits() < cost as usize {
            None
        } else {
            self.inner.permits.acquire_many(cost).await.ok()
        };
        self.inner.waiting.fetch_sub(1, Ordering::AcqRel);
        let permit = permit.ok_or(Busy)?;
        let result = tokio::task::spawn_blocking(work).await.map_err(|_| Busy);
        drop(permit);
        result
    }

    /// Jobs waiting for the budget now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn jobs_share_the_budget_and_the_queue_refuses_beyond_its_room() {
        let queue = HashingQueue::new(40, 3);
        let running = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let mut jobs = Vec::new();
        for _ in 0..12 {
            let (queue, running, peak) = (queue.clone(), running.clone(), peak.clone());
            jobs.push(tokio::spawn(async move {
                queue
                    .run(ARGON2_MIB, move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
            }));
        }
        let mut busy = 0;
        for job in jobs {
            if job.await.unwrap().is_err() {
                busy += 1;
            }
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2, "40 MiB fit two 19 MiB hashes");
        assert!(
            busy >= 12 - 2 - 3,
            "at most 2 running + 3 waiting are served first: {busy} refused"
        );
        assert!(
            queue.run(SCRYPT_MIB, || 7).await == Ok(7),
            "a job bigger than the budget runs alone"
        );
    }
}
