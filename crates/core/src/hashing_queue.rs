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
    permits: Arc<Semaphore>,
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
                permits: Arc::new(Semaphore::new(budget_mib as usize)),
                budget_mib,
                waiting: AtomicUsize::new(0),
                max_waiting,
            }),
        }
    }

    /// Runs `work`, which needs `cost_mib` MiB, on the blocking pool once the budget allows.
    ///
    /// A caller that gives up (a client that hangs up, a request timeout) stops waiting and
    /// leaves the waiting room at once; work already started runs to its end on the blocking
    /// pool, which cannot stop it, and keeps its memory until then.
    ///
    /// # Errors
    /// [`Busy`] at once when `max_waiting` jobs are already waiting (or the blocking task died).
    pub async fn run<T: Send + 'static>(
        &self,
        cost_mib: u32,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let cost = cost_mib.clamp(1, self.inner.budget_mib);
        let permit = {
            let waiting = Waiting::enter(&self.inner.waiting);
            if waiting.ahead >= self.inner.max_waiting && self.inner.permits.available_permits() < cost as usize {
                metrics::counter!("keycast_hashing_refused_total").increment(1);
                return Err(Busy);
            }
            self.inner
                .permits
                .clone()
                .acquire_many_owned(cost)
                .await
                .map_err(|_| Busy)?
        };
        // Counted as it starts: what argon2 and scrypt cost an operator (and what a budget
        // checked before the password is to spare).
        metrics::counter!("keycast_hashing_jobs_total").increment(1);
        tokio::task::spawn_blocking(move || {
            let _memory = permit;
            work()
        })
        .await
        .map_err(|_| Busy)
    }

    /// Jobs waiting for the budget now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Acquire)
    }
}

/// A place in the waiting room, left however the wait ends (a caller that gives up included).
struct Waiting<'a> {
    count: &'a AtomicUsize,
    /// How many were waiting before this one.
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Waiting<'a> {
        let ahead = count.fetch_add(1, Ordering::AcqRel);
        Waiting { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
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

    /// A caller that gave up while it waited used to stay counted as waiting, for good: after
    /// `max_waiting` of them every job that found the budget in use was refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_while_waiting_leaves_the_waiting_room() {
        let queue = HashingQueue::new(19, 2);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let running = tokio::spawn({
            let queue = queue.clone();
            async move { queue.run(ARGON2_MIB, move || hold.recv().ok()).await }
        });
        while queue.inner.permits.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..4 {
            let gave_up = tokio::time::timeout(Duration::from_millis(20), queue.run(ARGON2_MIB, || ())).await;
            assert!(gave_up.is_err(), "it waited, then its caller gave up");
        }
        assert_eq!(queue.waiting(), 0);
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.run(ARGON2_MIB, || 1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(1), "room to wait is left");
        running.await.unwrap().unwrap();
    }

    /// A caller that gave up while its work ran gave the memory back at once, though the work
    /// went on on the blocking pool: callers that hang up ran jobs beyond the budget.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_caller_gave_up_keeps_its_memory_until_it_ends() {
        let queue = HashingQueue::new(19, 4);
        let running = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let job = |running: Arc<AtomicU32>, peak: Arc<AtomicU32>| {
            move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(150));
                running.fetch_sub(1, Ordering::SeqCst);
            }
        };
        for _ in 0..3 {
            let work = job(running.clone(), peak.clone());
            let _ = tokio::time::timeout(Duration::from_millis(30), queue.run(ARGON2_MIB, work)).await;
        }
        queue.run(ARGON2_MIB, job(running.clone(), peak.clone())).await.unwrap();
        assert_eq!(peak.load(Ordering::SeqCst), 1, "19 MiB fit one job at a time");
    }
}
