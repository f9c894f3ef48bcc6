//! Reconnecting to relays that dropped, with a capped exponential backoff that resets once
//! a connection has held.
//!
//! nostr-sdk can reconnect by itself, but its adaptive interval (0.44) grows with the
//! relay's lifetime failure count and never shrinks: after one long outage, every later
//! drop — even a routine relay restart — would wait up to a minute, longer than any client
//! waits for an answer. So the pool's relays are added with reconnection off (a drop leaves
//! them `Terminated`) and this supervisor brings them back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nostr_sdk::pool::RelayPool;
use nostr_sdk::{RelayStatus, RelayUrl};

/// First wait after a failed attempt; it doubles per failure up to [`MAX_WAIT`].
pub const MIN_WAIT: Duration = Duration::from_secs(1);
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// A connection that held this long resets the backoff (a relay that accepts and drops at
/// once keeps backing off).
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often relay states are looked at.
const TICK: Duration = Duration::from_millis(250);

/// One relay's reconnection schedule.
#[derive(Debug, Clone)]
pub struct Backoff {
    wait: Duration,
    next_attempt: Instant,
    connected_since: Option<Instant>,
}

impl Backoff {
    pub fn new(now: Instant) -> Backoff {
        Backoff {
            wait: MIN_WAIT,
            next_attempt: now,
            connected_since: None,
        }
    }

    /// The relay is connected at `now`. Once it has held for [`STABLE_AFTER`], the next
    /// drop is retried at once and the backoff starts over.
    pub fn connected(&mut self, now: Instant) {
        let since = *self.connected_since.get_or_insert(now);
        if now.duration_since(since) >= STABLE_AFTER {
            self.wait = MIN_WAIT;
            self.next_attempt = now;
        }
    }

    /// The relay is down at `now`: whether to try again now. Each failed attempt doubles
    /// the wait before the next, up to [`MAX_WAIT`].
    pub fn down(&mut self, now: Instant) -> bool {
        self.connected_since = None;
        if now < self.next_attempt {
            return false;
        }
        self.next_attempt = now + self.wait;
        self.wait = (self.wait * 2).min(MAX_WAIT);
        true
    }
}

/// Watches every relay of `pool` and reconnects the ones that dropped. Runs until aborted.
pub async fn supervise(pool: RelayPool) {
    let mut schedules: HashMap<RelayUrl, Backoff> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let relays = pool.relays().await;
        schedules.retain(|url, _| relays.contains_key(url));
        let now = Instant::now();
        for (url, relay) in relays {
            let schedule = schedules.entry(url.clone()).or_insert_with(|| Backoff::new(now));
            match relay.status() {
                RelayStatus::Connected => schedule.connected(now),
                RelayStatus::Terminated | RelayStatus::Disconnected if schedule.down(now) => {
                    metrics::counter!("keycast_nip46_reconnects_total").increment(1);
                    tracing::debug!(relay = %url, "nip46: reconnecting");
                    relay.connect();
                }
                // Initialized (connect not yet called), Pending/Connecting (an attempt is
                // under way), Banned, Sleeping: leave it.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_back_off_exponentially_up_to_the_cap() {
        let start = Instant::now();
        let mut b = Backoff::new(start);
        let mut attempts = Vec::new();
        let mut t = start;
        while t < start + Duration::from_secs(120) {
            if b.down(t) {
                attempts.push(t.duration_since(start).as_secs());
            }
            t += Duration::from_millis(250);
        }
        assert_eq!(&attempts[..7], [0, 1, 3, 7, 15, 31, 61]);
        assert_eq!(attempts[7] - attempts[6], 30, "capped at 30 s");
    }

    #[test]
    fn a_connection_that_held_resets_the_backoff_and_a_flapping_one_does_not() {
        let start = Instant::now();
        let mut b = Backoff::new(start);
        for s in [0, 1, 3, 7] {
            assert!(b.down(start + Duration::from_secs(s)));
        }
        // Connected for 2 s, then dropped: the schedule goes on (next at 15 s, then 31 s).
        b.connected(start + Duration::from_secs(8));
        b.connected(start + Duration::from_secs(10));
        assert!(
            !b.down(start + Duration::from_secs(10)),
            "a flapping relay is not hammered"
        );
        assert!(b.down(start + Duration::from_secs(15)));
        assert!(!b.down(start + Duration::from_secs(20)));
        // Connected for 10 s: back to 1 s.
        let later = start + Duration::from_secs(100);
        b.connected(later);
        b.connected(later + STABLE_AFTER);
        let dropped = later + STABLE_AFTER + Duration::from_secs(1);
        assert!(b.down(dropped), "a drop after a stable connection is retried at once");
        assert!(b.down(dropped + MIN_WAIT), "then after 1 s");
    }
}
