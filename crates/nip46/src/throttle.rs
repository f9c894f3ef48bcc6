//! Token buckets that bound what relays and strangers can make keycast do (issue 12 item 6).
//!
//! - [`Strangers`]: requests from a client that is not the one bound to the bunker it
//!   addresses (a new app's `connect`, or anyone with a fresh key) cost an ECDH, a handler run
//!   and a signed reply. They are admitted per relay and per (relay, bunker) pair; beyond
//!   that they are dropped before any of that work, unanswered. The bound client is never
//!   limited here. A bunker whose own bucket a stranger keeps empty (one event every few
//!   seconds does it) would hear no new app's `connect`: while its relay has capacity to
//!   spare, such a request is still opened, and answered only if it is a `connect` that
//!   binds ([`Admission::ConnectOnly`]). Blocking a new app then takes a flood at the relay's
//!   rate, which blocks every bunker on that relay anyway.
//! - [`Throttled`]: a relay connection's incoming messages, for the relays apps name (not the
//!   operator's), are read at a bounded rate, so a relay pushing valid events as fast as it
//!   can costs at most that many signature checks a second; the rest waits in the socket
//!   (TCP back pressure), not in keycast's memory.
//!
//! Every operation is O(1): the buckets live in two generations that are dropped whole
//! ([`Generations`]), never scanned.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_wsocket::futures_util::Stream;
use keycast_core::nostr::PublicKey;
use nostr_sdk::RelayUrl;

/// A refill rate and a capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens held (a burst).
    pub burst: f64,
}

impl Rate {
    /// `per_sec` a second, with a burst of two seconds' worth (at least 1).
    pub fn per_sec(per_sec: u32) -> Rate {
        let per_sec = f64::from(per_sec);
        Rate {
            per_sec,
            burst: (2.0 * per_sec).max(1.0),
        }
    }

    /// How long an empty bucket takes to fill.
    fn refill(self) -> Duration {
        Duration::from_secs_f64(self.burst / self.per_sec)
    }
}

/// One token bucket; the rate is kept by its owner.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.at = now;
    }

    /// Whether a token is there now (none is taken).
    pub fn ready(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= 1.0
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let ready = self.ready(rate, now);
        if ready {
            self.tokens -= 1.0;
        }
        ready
    }

    /// How long until a token is there.
    pub fn wait(&mut self, rate: Rate, now: Instant) -> Duration {
        self.refill(rate, now);
        Duration::from_secs_f64(((1.0 - self.tokens) / rate.per_sec).max(0.0))
    }
}

/// A map whose entries expire in two generations, dropped whole: an entry untouched for
/// one to two `period`s is gone. Lookups and inserts are O(1); nothing is ever scanned.
/// For buckets, a `period` at least as long as a full refill makes expiry invisible: a
/// bucket idle that long would be full again anyway.
#[derive(Debug)]
pub struct Generations<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    rotated_at: Instant,
    period: Duration,
}

impl<K: Hash + Eq, V> Generations<K, V> {
    pub fn new(period: Duration, now: Instant) -> Self {
        Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            rotated_at: now,
            period,
        }
    }

    /// The entry for `key`, made with `make` if absent or expired. Also hands back the
    /// generation that expired, if one did, for the caller to free outside any lock.
    pub fn entry(&mut self, key: K, now: Instant, make: impl FnOnce() -> V) -> (&mut V, Option<HashMap<K, V>>) {
        let mut expired = None;
        if now.saturating_duration_since(self.rotated_at) >= self.period {
            let current = std::mem::take(&mut self.current);
            expired = Some(std::mem::replace(&mut self.previous, current));
            self.rotated_at = now;
        }
        let value = match self.previous.remove(&key) {
            Some(old) => self.current.entry(key).or_insert(old),
            None => self.current.entry(key).or_insert_with(make),
        };
        (value, expired)
    }

    /// Entries held (both generations).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Buckets per (relay, bunker) that bunker's strangers share: a handful of connects, then
/// one every few seconds.
pub const PER_BUNKER: Rate = Rate {
    per_sec: 1.0 / 6.0,
    burst: 10.0,
};

/// Admission of requests from clients not bound to the bunker they address.
#[derive(Debug)]
pub struct Strangers {
    per_relay: Rate,
    per_bunker: Rate,
    /// `(relay, None)`: the relay's bucket; `(relay, Some(bunker))`: the pair's.
    buckets: Mutex<Generations<(RelayUrl, Option<PublicKey>), Bucket>>,
}

impl Strangers {
    /// `per_relay` for all strangers arriving on one relay, [`PER_BUNKER`] for those of one
    /// bunker on one relay.
    pub fn new(per_relay: Rate) -> Strangers {
        Strangers::with_rates(per_relay, PER_BUNKER)
    }

    fn with_rates(per_relay: Rate, per_bunker: Rate) -> Strangers {
        let period = per_relay.refill().max(per_bunker.refill()).max(Duration::from_secs(60));
        Strangers {
            per_relay,
            per_bunker,
            buckets: Mutex::new(Generations::new(period, Instant::now())),
        }
    }

    /// Whether a stranger's request to `bunker` arriving on `relay` may be handled now.
    /// [`Admission::Full`] takes a token from both buckets; [`Admission::ConnectOnly`] (the
    /// pair's bucket empty, the relay's more than half full) takes one from the relay's only.
    pub fn admit(&self, relay: &RelayUrl, bunker: &PublicKey, now: Instant) -> Admission {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Admission::Refused;
        };
        let (pair, expired_a) = buckets.entry((relay.clone(), Some(*bunker)), now, || {
            Bucket::full(self.per_bunker, now)
        });
        let pair_ready = pair.ready(self.per_bunker, now);
        let (shared, expired_b) = buckets.entry((relay.clone(), None), now, || Bucket::full(self.per_relay, now));
        let spare = shared.ready(self.per_relay, now) && shared.tokens > self.per_relay.burst / 2.0;
        let admission = if pair_ready && shared.take(self.per_relay, now) {
            let (pair, _) = buckets.entry((relay.clone(), Some(*bunker)), now, || {
                Bucket::full(self.per_bunker, now)
            });
            pair.take(self.per_bunker, now);
            Admission::Full
        } else if !pair_ready && spare && shared.take(self.per_relay, now) {
            Admission::ConnectOnly
        } else {
            Admission::Refused
        };
        drop(buckets);
        // Freed after the lock is released: the lock is only ever held for O(1) work.
        drop((expired_a, expired_b));
        admission
    }
}

/// What [`Strangers::admit`] lets a stranger's request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Handled and answered as any request.
    Full,
    /// Opened, and answered only if it is a `connect` that binds the client (its secret is
    /// right): the bunker's own bucket is empty, its relay has capacity to spare.
    ConnectOnly,
    /// Dropped unopened.
    Refused,
}

/// A relay connection's incoming messages at no more than `rate` (see the module docs).
pub struct Throttled<S> {
    inner: S,
    rate: Rate,
    bucket: Bucket,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Throttled<S> {
    pub fn new(inner: S, rate: Rate) -> Self {
        Throttled {
            inner,
            rate,
            bucket: Bucket::full(rate, now()),
            sleep: None,
        }
    }
}

impl<S: Stream + Unpin> Stream for Throttled<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            let now = now();
            if this.bucket.ready(this.rate, now) {
                break;
            }
            let wait = this.bucket.wait(this.rate, now);
            this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
        }
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(_)) = &next {
            this.bucket.take(this.rate, now());
        }
        next
    }
}

/// Now on tokio's clock (which tests can pause), as the bucket's `Instant`.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(n: u16) -> RelayUrl {
        RelayUrl::parse(&format!("ws://127.0.0.1:{n}")).unwrap()
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate::per_sec(10);
        let start = Instant::now();
        let mut bucket = Bucket::full(rate, start);
        let burst = (0..100).filter(|_| bucket.take(rate, start)).count();
        assert_eq!(burst, 20, "two seconds' worth");
        assert!(!bucket.take(rate, start));
        assert_eq!(bucket.wait(rate, start), Duration::from_millis(100));
        let later = start + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| bucket.take(rate, later)).count(), 10);
    }

    #[test]
    fn strangers_are_limited_per_bunker_and_per_relay() {
        let per_relay = Rate {
            per_sec: 1.0,
            burst: 15.0,
        };
        let strangers = Strangers::with_rates(per_relay, PER_BUNKER);
        let (a, b) = (
            keycast_core::nostr::Keys::generate().public_key(),
            keycast_core::nostr::Keys::generate().public_key(),
        );
        let now = Instant::now();
        let admitted = |bunker, relay: &RelayUrl| {
            (0..100)
                .filter(|_| strangers.admit(relay, bunker, now) == Admission::Full)
                .count()
        };
        assert_eq!(admitted(&a, &relay(1)), 10, "a bunker's burst on one relay");
        assert_eq!(admitted(&b, &relay(1)), 5, "what is left of the relay's burst");
        assert_eq!(admitted(&b, &relay(2)), 10, "another relay has its own buckets");
        // A bunker refused for its own bucket takes nothing from the relay's.
        let later = now + Duration::from_secs(6);
        assert_eq!(strangers.admit(&relay(1), &a, later), Admission::Full);
        assert_eq!(strangers.admit(&relay(1), &a, later), Admission::Refused);
        assert_eq!(strangers.admit(&relay(1), &b, later), Admission::Full);
    }

    #[test]
    fn a_bunker_whose_bucket_a_stranger_keeps_empty_still_hears_connects_while_its_relay_has_spare() {
        let per_relay = Rate::per_sec(20);
        let strangers = Strangers::with_rates(per_relay, PER_BUNKER);
        let (a, b) = (
            keycast_core::nostr::Keys::generate().public_key(),
            keycast_core::nostr::Keys::generate().public_key(),
        );
        let now = Instant::now();
        let admissions = |bunker, n| {
            (0..n)
                .map(|_| strangers.admit(&relay(1), bunker, now))
                .collect::<Vec<_>>()
        };
        let first = admissions(&a, 40);
        let count = |kind| first.iter().filter(|&&x| x == kind).count();
        assert_eq!(count(Admission::Full), 10, "the bunker's own burst");
        // Connects only while the relay keeps more than half its burst (40): 30 after the ten.
        assert_eq!(count(Admission::ConnectOnly), 10);
        assert_eq!(count(Admission::Refused), 20);
        // Another bunker on the relay keeps the half the flood could not take.
        assert_eq!(admissions(&b, 30).iter().filter(|&&x| x == Admission::Full).count(), 10);
        // A second later the relay has spare again (20 a second): `a` hears a connect.
        let later = now + Duration::from_secs(1);
        assert_eq!(strangers.admit(&relay(1), &a, later), Admission::ConnectOnly);
    }

    #[test]
    fn generations_expire_untouched_entries_whole() {
        let start = Instant::now();
        let period = Duration::from_secs(60);
        let mut map: Generations<u32, u32> = Generations::new(period, start);
        *map.entry(1, start, || 0).0 += 1;
        *map.entry(2, start, || 0).0 += 1;
        // One rotation later: both still there (moved to the older generation); 1 touched.
        let (one, expired) = map.entry(1, start + period, || 0);
        assert_eq!(*one, 1);
        assert!(expired.is_some_and(|e| e.is_empty()));
        // Two rotations later the untouched one is gone, the touched one kept.
        let (_, expired) = map.entry(3, start + 2 * period, || 0);
        assert_eq!(expired.map(|e| e.len()), Some(1), "entry 2 expired");
        assert_eq!(*map.entry(1, start + 2 * period, || 0).0, 1);
        assert_eq!(map.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_stream_yields_its_burst_then_its_rate() {
        use async_wsocket::futures_util::StreamExt;
        let source = async_wsocket::futures_util::stream::iter(0..1000);
        let mut throttled = Throttled::new(source, Rate::per_sec(50));
        let start = tokio::time::Instant::now();
        let mut got = 0;
        while throttled.next().await.is_some() {
            got += 1;
            if got == 100 + 50 {
                break;
            }
        }
        // 100 at once, then 50 a second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1100),
            "{took:?}"
        );
    }
}
