//! Dropping a request seen before: the same (client, request id) again, whether a relay
//! replays it, a client retries it, or it arrives on two relays with different event ids.
//! Every operation is O(1) and the lock is never held for more (issue 12 item 6).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keycast_core::nostr::PublicKey;

/// (client, request id) pairs seen within the last `window` (at least; at most twice
/// that): two generations, the older dropped whole when the newer is a window old, so every
/// operation is O(1) — no scan of the entries, ever.
pub struct Seen {
    current: HashSet<(PublicKey, String)>,
    previous: HashSet<(PublicKey, String)>,
    rotated_at: Instant,
    window: Duration,
}

impl Seen {
    /// Remembers each pair for at least `window`.
    pub fn new(window: Duration) -> Seen {
        Seen {
            current: HashSet::new(),
            previous: HashSet::new(),
            rotated_at: Instant::now(),
            window,
        }
    }

    /// Records the pair: true if it was not seen before. Also hands back the generation
    /// that expired, if one did, for the caller to free outside its lock.
    pub fn insert(
        &mut self,
        client: PublicKey,
        id: String,
        now: Instant,
    ) -> (bool, Option<HashSet<(PublicKey, String)>>) {
        let mut expired = None;
        if now.saturating_duration_since(self.rotated_at) >= self.window {
            let current = std::mem::take(&mut self.current);
            expired = Some(std::mem::replace(&mut self.previous, current));
            self.rotated_at = now;
        }
        let key = (client, id);
        let first = !self.previous.contains(&key) && self.current.insert(key);
        (first, expired)
    }

    /// Every pair remembered now (both generations), for the instance that takes over: the
    /// newer generation first, so that a caller keeping only so many keeps the newest (a
    /// relay's replay is of the last minute).
    pub fn entries(&self) -> Vec<(PublicKey, String)> {
        self.current.iter().chain(&self.previous).cloned().collect()
    }

    /// Remembers pairs another instance saw (see [`Seen::entries`]) as if seen now.
    pub fn remember(&mut self, entries: impl IntoIterator<Item = (PublicKey, String)>) {
        self.current.extend(entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEDUP_WINDOW: Duration = Duration::from_secs(120);

    #[test]
    fn a_request_id_is_answered_once_per_client() {
        let mut seen = Seen::new(DEDUP_WINDOW);
        let (a, b) = (
            keycast_core::nostr::Keys::generate().public_key(),
            keycast_core::nostr::Keys::generate().public_key(),
        );
        let now = Instant::now();
        assert!(seen.insert(a, "1".into(), now).0);
        assert!(!seen.insert(a, "1".into(), now).0, "the same request again");
        assert!(seen.insert(b, "1".into(), now).0, "another client may use the same id");
        assert!(seen.insert(a, "2".into(), now).0);
    }

    #[test]
    fn what_one_instance_saw_is_seen_by_the_next() {
        let mut old = Seen::new(DEDUP_WINDOW);
        let a = keycast_core::nostr::Keys::generate().public_key();
        let start = Instant::now();
        old.insert(a, "1".into(), start);
        // One rotation later, "1" is in the older generation, "2" in the newer.
        old.insert(a, "2".into(), start + DEDUP_WINDOW);
        let mut new = Seen::new(DEDUP_WINDOW);
        new.remember(old.entries());
        assert!(!new.insert(a, "1".into(), start).0);
        assert!(!new.insert(a, "2".into(), start).0);
        assert!(new.insert(a, "3".into(), start).0);
        // Kept only so many, the newest are kept.
        let newest: Vec<_> = old.entries().into_iter().take(1).collect();
        assert_eq!(newest, [(a, "2".to_owned())]);
    }

    #[test]
    fn a_request_id_is_remembered_for_at_least_the_dedup_window() {
        let mut seen = Seen::new(DEDUP_WINDOW);
        let a = keycast_core::nostr::Keys::generate().public_key();
        let start = Instant::now();
        assert!(seen.insert(a, "1".into(), start).0);
        // Just before and just after one rotation: still known.
        let almost = start + DEDUP_WINDOW - Duration::from_millis(1);
        assert!(!seen.insert(a, "1".into(), almost).0);
        assert!(!seen.insert(a, "1".into(), start + DEDUP_WINDOW).0);
        // Two rotations later it has expired with its generation.
        assert!(seen.insert(a, "1".into(), start + 3 * DEDUP_WINDOW).0);
    }
}
