//! The background tasks an instance cannot serve without: the NIP-46 listener, the activity
//! flusher, the embedded relay, and on PostgreSQL the heartbeat and change notices.
//!
//! Tokio keeps a process running when one of its tasks panics or returns. Without this the
//! HTTP server would go on answering every probe while, say, no NIP-46 request is ever
//! answered again: a fault the platform cannot see. A task spawned through [`Vitals`]
//! reports its end instead, and `keycast serve` shuts down and exits non-zero, so the
//! platform starts a replacement. (The replicator watches its own worker: it fences the
//! instance, see `keycast_replica::Replicator`.)

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Where vital tasks report their end. Clones share it; the first end reported is kept.
#[derive(Clone, Debug)]
pub struct Vitals(Arc<watch::Sender<Option<String>>>);

impl Default for Vitals {
    fn default() -> Self {
        Vitals(Arc::new(watch::channel(None).0))
    }
}

impl Vitals {
    /// Spawns `task`, which should run until it is aborted. Its returning or panicking is
    /// reported to [`Vitals::stopped`] under `name` (say, "the NIP-46 listener"); being
    /// aborted, which is how shutdown stops it, is not.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task);
        let abort = handle.abort_handle();
        let report = self.0.clone();
        tokio::spawn(async move {
            let why = match handle.await {
                Ok(()) => format!("{name} returned"),
                Err(e) if e.is_panic() => format!("{name} ended: {e}"),
                Err(_) => return,
            };
            tracing::error!(reason = %why, "a task this instance cannot serve without has ended");
            report.send_if_modified(|first| {
                let unset = first.is_none();
                if unset {
                    *first = Some(why);
                }
                unset
            });
        });
        abort
    }

    /// Completes with the reason once a vital task has ended (at once if one already has).
    pub async fn stopped(&self) -> String {
        let mut ended = self.0.subscribe();
        // `self` holds the sender, so the channel cannot close while this waits.
        let why = match ended.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        };
        why
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panic_or_a_return_is_reported_with_its_name_and_an_abort_is_not() {
        let vitals = Vitals::default();
        let aborted = vitals.spawn("the sleeper", std::future::pending());
        aborted.abort();
        let quiet = tokio::time::timeout(Duration::from_millis(100), vitals.stopped()).await;
        assert!(quiet.is_err(), "an aborted task was reported: {quiet:?}");

        vitals.spawn("the listener", async { panic!("injected") });
        let why = tokio::time::timeout(Duration::from_secs(5), vitals.stopped())
            .await
            .unwrap();
        assert!(why.starts_with("the listener ended: "), "{why}");
        assert!(why.contains("injected"), "{why}");

        // The first end is the one kept; a clone sees it too.
        vitals.spawn("the flusher", async {});
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(vitals.clone().stopped().await, why);

        let other = Vitals::default();
        other.spawn("the flusher", async {});
        let why = tokio::time::timeout(Duration::from_secs(5), other.stopped())
            .await
            .unwrap();
        assert_eq!(why, "the flusher returned");
    }
}
