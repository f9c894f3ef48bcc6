//! The signer's in-memory caches, with explicit invalidation.
//!
//! Each [`EpochMap`] carries an *epoch* that every invalidation bumps. A loader reads the
//! epoch before it queries the database and may insert only if the epoch is unchanged,
//! so a load that raced a revocation can never put the pre-revocation state back into
//! the cache. Entries also expire after a time-to-live, which bounds staleness for
//! changes made by *another* instance (PostgreSQL scale-out); on one instance explicit
//! invalidation makes changes visible on the very next request. A map that reaches its
//! capacity is cleared (simple and safe: the next requests reload).
//!
//! **Refresh ahead.** Past half its TTL an entry is reloaded by *one* caller: the first
//! [`EpochMap::get`] after that point answers a miss (that caller reads the database and
//! inserts afresh), every other caller keeps the cached value, which is still within its
//! TTL. So a key in steady use never expires under load: signing does not stall in a
//! herd of reloads every TTL (PostgreSQL's is 5 s), and a slow database delays one
//! request per entry and TTL instead of all of them. Staleness stays bounded by the TTL.
//!
//! **One load at a time per key.** A caller that must load takes the key's turn first
//! ([`EpochMap::load_turn`]); one that waited for another caller's load uses what that load
//! inserted. So a cold or expired entry wanted by fifty concurrent requests costs one query,
//! not fifty, and a slow database cannot drain the connection pool with duplicate reloads.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

/// A cache map whose inserts are guarded by an invalidation epoch.
#[derive(Debug)]
pub(crate) struct EpochMap<K, V> {
    inner: RwLock<Inner<K, V>>,
    ttl: Duration,
    capacity: usize,
    /// Load turns, striped by key hash (distinct keys rarely share a stripe).
    turns: Box<[tokio::sync::Mutex<()>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// Stripes of [`EpochMap::load_turn`]: loads of distinct keys that share one wait for each other.
const TURN_STRIPES: usize = 64;

#[derive(Debug)]
struct Inner<K, V> {
    epoch: u64,
    entries: HashMap<K, Entry<V>>,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    at: Instant,
    /// Some caller has taken on reloading it (past half the TTL).
    refreshing: AtomicBool,
}

impl<K: Eq + Hash, V: Clone> EpochMap<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        EpochMap {
            inner: RwLock::new(Inner {
                epoch: 0,
                entries: HashMap::new(),
            }),
            ttl,
            capacity: capacity.max(1),
            turns: (0..TURN_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Waits for the turn to load `key` (hold the guard across the load and the insert).
    /// Also returns the value if another caller inserted it while this one waited: then
    /// there is nothing left to load.
    pub async fn load_turn(&self, key: &K) -> (tokio::sync::MutexGuard<'_, ()>, Option<V>) {
        let asked = Instant::now();
        let stripe = (self.hasher.hash_one(key) as usize) % self.turns.len();
        let turn = self.turns[stripe].lock().await;
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let loaded = inner
            .entries
            .get(key)
            .filter(|e| e.at >= asked && e.at.elapsed() < self.ttl)
            .map(|e| e.value.clone());
        drop(inner);
        (turn, loaded)
    }

    /// The current epoch; read it before loading what will be inserted.
    pub fn epoch(&self) -> u64 {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).epoch
    }

    /// The cached value if present and younger than the TTL — except that the first
    /// caller past half the TTL gets `None`, to reload it for everyone (see the module doc).
    pub fn get(&self, key: &K) -> Option<V> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let entry = inner.entries.get(key)?;
        let age = entry.at.elapsed();
        if age >= self.ttl {
            return None;
        }
        if age >= self.ttl / 2 && !entry.refreshing.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(entry.value.clone())
    }

    /// Inserts unless something was invalidated since `epoch` was read. Returns whether
    /// it inserted.
    pub fn insert_if_current(&self, epoch: u64, key: K, value: V) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if inner.epoch != epoch {
            return false;
        }
        if inner.entries.len() >= self.capacity {
            inner.entries.clear();
        }
        inner.entries.insert(
            key,
            Entry {
                value,
                at: Instant::now(),
                refreshing: AtomicBool::new(false),
            },
        );
        true
    }

    /// Drops one entry and bumps the epoch.
    pub fn invalidate(&self, key: &K) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        inner.epoch += 1;
        inner.entries.remove(key);
    }

    /// Drops every entry for which `stale` holds and bumps the epoch.
    pub fn invalidate_where(&self, stale: impl Fn(&K, &V) -> bool) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        inner.epoch += 1;
        inner.entries.retain(|k, e| !stale(k, &e.value));
    }

    /// Number of entries (fresh or not).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> EpochMap<&'static str, u32> {
        EpochMap::new(Duration::from_secs(60), 3)
    }

    #[test]
    fn inserted_value_is_returned_until_invalidated() {
        let cache = map();
        assert!(cache.insert_if_current(cache.epoch(), "a", 1));
        assert_eq!(cache.get(&"a"), Some(1));
        cache.invalidate(&"a");
        assert_eq!(cache.get(&"a"), None);
    }

    #[test]
    fn load_that_raced_an_invalidation_is_not_cached() {
        let cache = map();
        let epoch = cache.epoch();
        cache.invalidate(&"a");
        assert!(!cache.insert_if_current(epoch, "a", 1));
        assert_eq!(cache.get(&"a"), None);
    }

    #[test]
    fn entries_older_than_the_ttl_are_misses() {
        let cache = EpochMap::new(Duration::ZERO, 3);
        cache.insert_if_current(cache.epoch(), "a", 1);
        assert_eq!(cache.get(&"a"), None);
    }

    #[test]
    fn past_half_the_ttl_one_caller_reloads_and_the_others_keep_the_value() {
        let cache = EpochMap::new(Duration::from_secs(4), 3);
        cache.insert_if_current(cache.epoch(), "a", 1);
        assert_eq!(cache.get(&"a"), Some(1));
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(cache.get(&"a"), None, "the first caller past half the TTL reloads");
        assert_eq!(cache.get(&"a"), Some(1), "the others are served meanwhile");
        assert_eq!(cache.get(&"a"), Some(1));
        cache.insert_if_current(cache.epoch(), "a", 2);
        assert_eq!(cache.get(&"a"), Some(2), "the reload renews the entry");
    }

    #[tokio::test]
    async fn a_caller_that_waited_for_another_ones_load_uses_it() {
        let cache = map();
        let (turn, loaded) = cache.load_turn(&"a").await;
        assert_eq!(loaded, None, "nothing loaded yet: this caller loads");
        let waiting = cache.load_turn(&"a");
        tokio::pin!(waiting);
        assert!(
            futures_util_poll(&mut waiting).is_none(),
            "a second caller waits for the first one's turn"
        );
        cache.insert_if_current(cache.epoch(), "a", 7);
        drop(turn);
        let (turn, loaded) = waiting.await;
        assert_eq!(loaded, Some(7), "and takes what the first one loaded");
        drop(turn);
        let (_turn, loaded) = cache.load_turn(&"b").await;
        assert_eq!(loaded, None);
    }

    /// Polls a future once.
    fn futures_util_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn full_map_is_cleared_before_the_next_insert() {
        let cache = map();
        for (k, v) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
            cache.insert_if_current(cache.epoch(), k, v);
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&"d"), Some(4));
    }

    #[test]
    fn invalidate_where_drops_matching_entries_only() {
        let cache = map();
        cache.insert_if_current(cache.epoch(), "a", 1);
        cache.insert_if_current(cache.epoch(), "b", 2);
        cache.invalidate_where(|_, v| *v == 1);
        assert_eq!((cache.get(&"a"), cache.get(&"b")), (None, Some(2)));
    }
}
