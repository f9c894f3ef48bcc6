//! The single-writer lease: one small object (`keycast/lease.json`) changed only by
//! compare-and-swap, so at most one instance believes it may write the replica.
//!
//! The lease is an orderly hand-over mechanism, not the safety net: every data object is
//! also written create-only at a TXID-derived key, so even two instances that both think
//! they hold the lease (one paused past its TTL, say) collide instead of corrupting the
//! replica. The lease makes that rare, and makes hand-over on deploy lossless:
//!
//! 1. a starting instance waits (up to `wait`) while another holds an unexpired lease;
//! 2. the holder, on SIGTERM, ships its last frames and *releases* the lease;
//! 3. the newcomer takes it (epoch + 1), restores the latest state, and serves.
//!
//! An expired lease may be taken over; its old holder learns it lost when its next renewal
//! fails the compare-and-swap, and stops (fenced).
//!
//! Renewal is lazy: the holder renews only when it is about to write and less than half the
//! TTL is left, so an idle instance makes no requests. An idle holder's lease therefore
//! lapses, and a newcomer may take it without waiting; the old holder then has nothing
//! unshipped and learns it was replaced on its next write.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};

use crate::store::{PutOutcome, Store, StoreError, UpdateOutcome};

/// Lease lifetime after each renewal (seconds).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// How long a starting instance waits for the holder to release (seconds).
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(60);
/// How often a waiting instance looks at the lease again.
const POLL: Duration = Duration::from_millis(250);
const OBJECT: &str = "keycast/lease.json";

/// Lease tunables.
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    /// See [`DEFAULT_LEASE_TTL`].
    pub ttl: Duration,
    /// See [`DEFAULT_LEASE_WAIT`].
    pub wait: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_LEASE_TTL,
            wait: DEFAULT_LEASE_WAIT,
        }
    }
}

/// Why the lease could not be had or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "instance {owner} holds the replica lease (expires in {expires_in_secs} s) and did not release it within {waited_secs} s; \
         stop it, or wait for its lease to expire"
    )]
    Held {
        owner: String,
        expires_in_secs: i64,
        waited_secs: u64,
    },
    #[error("the replica lease was taken over by {by}: this instance is fenced and must stop writing")]
    Lost { by: String },
    #[error("the replica lease object is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The stored lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    owner: String,
    epoch: u64,
    /// Wall-clock expiry (ms since the Unix epoch), for other instances to judge.
    expires_at_ms: i64,
    released: bool,
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    owner: String,
    epoch: u64,
    ttl: Duration,
    version: UpdateVersion,
    /// Local, monotonic expiry: measured from *before* the write that set it, so the holder
    /// always believes its lease ends earlier than other instances do.
    expires: Instant,
}

impl Lease {
    /// Takes the lease, waiting up to `options.wait` for a live holder to release it.
    ///
    /// # Errors
    /// [`LeaseError::Held`] when the wait ran out; store errors.
    pub async fn acquire(store: &Store, owner: &str, options: LeaseOptions) -> Result<Lease, LeaseError> {
        let started = Instant::now();
        let mut announced = false;
        loop {
            let before = Instant::now();
            match store.get_object(OBJECT).await? {
                None => {
                    let record = Record {
                        owner: owner.into(),
                        epoch: 1,
                        expires_at_ms: expiry_ms(options.ttl),
                        released: false,
                    };
                    if let PutOutcome::Created = store.put_object_create(OBJECT, encode(&record)).await? {
                        if let Some(lease) = Self::confirm(store, &record, options.ttl, before).await? {
                            return Ok(lease);
                        }
                    }
                }
                Some((bytes, version)) => {
                    let current = decode(&bytes)?;
                    let free = current.released || current.expires_at_ms <= now_ms() || current.owner == owner;
                    if free {
                        if !current.released && current.owner != owner {
                            tracing::warn!(previous = %current.owner, epoch = current.epoch, "took over an expired replica lease; its holder is now fenced");
                        }
                        let record = Record {
                            owner: owner.into(),
                            epoch: current.epoch + 1,
                            expires_at_ms: expiry_ms(options.ttl),
                            released: false,
                        };
                        if let UpdateOutcome::Updated(version) =
                            store.put_object_update(OBJECT, encode(&record), &version).await?
                        {
                            return Ok(Lease::held(store, record, options.ttl, version, before));
                        }
                        continue;
                    }
                    let expires_in_secs = (current.expires_at_ms - now_ms()) / 1000;
                    if started.elapsed() >= options.wait {
                        return Err(LeaseError::Held {
                            owner: current.owner,
                            expires_in_secs,
                            waited_secs: options.wait.as_secs(),
                        });
                    }
                    if !announced {
                        tracing::info!(holder = %current.owner, expires_in_secs, "waiting for the current holder to release the replica lease");
                        announced = true;
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// After a create, reads the lease back for its version; `None` if someone else's.
    async fn confirm(
        store: &Store,
        record: &Record,
        ttl: Duration,
        before: Instant,
    ) -> Result<Option<Lease>, LeaseError> {
        let Some((bytes, version)) = store.get_object(OBJECT).await? else {
            return Ok(None);
        };
        if decode(&bytes)? != *record {
            return Ok(None);
        }
        Ok(Some(Lease::held(store, record.clone(), ttl, version, before)))
    }

    fn held(store: &Store, record: Record, ttl: Duration, version: UpdateVersion, before: Instant) -> Lease {
        Lease {
            store: store.clone(),
            owner: record.owner,
            epoch: record.epoch,
            ttl,
            version,
            expires: before + ttl,
        }
    }

    /// The lease's epoch: one more than the previous holder's.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Who holds it (this instance).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Less than half the TTL is left: renew before writing.
    pub fn needs_renewal(&self) -> bool {
        Instant::now() + self.ttl / 2 >= self.expires
    }

    /// Extends the lease by the TTL, by compare-and-swap.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] if another instance changed the lease since (this one is fenced).
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let before = Instant::now();
        let record = Record {
            owner: self.owner.clone(),
            epoch: self.epoch,
            expires_at_ms: expiry_ms(self.ttl),
            released: false,
        };
        match self
            .store
            .put_object_update(OBJECT, encode(&record), &self.version)
            .await?
        {
            UpdateOutcome::Updated(version) => {
                self.version = version;
                self.expires = before + self.ttl;
                Ok(())
            }
            UpdateOutcome::Conflict => Err(self.lost().await),
        }
    }

    /// Marks the lease released so a waiting instance takes it at once.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] if it was no longer ours; store errors.
    pub async fn release(self) -> Result<(), LeaseError> {
        let record = Record {
            owner: self.owner.clone(),
            epoch: self.epoch,
            expires_at_ms: now_ms(),
            released: true,
        };
        match self
            .store
            .put_object_update(OBJECT, encode(&record), &self.version)
            .await?
        {
            UpdateOutcome::Updated(_) => Ok(()),
            UpdateOutcome::Conflict => Err(self.lost().await),
        }
    }

    /// Builds the "lost" error, naming the new holder when it can be read.
    async fn lost(&self) -> LeaseError {
        let by = match self.store.get_object(OBJECT).await {
            Ok(Some((bytes, _))) => decode(&bytes)
                .map(|r| format!("{} (epoch {})", r.owner, r.epoch))
                .unwrap_or_default(),
            _ => "another instance".into(),
        };
        LeaseError::Lost { by }
    }
}

fn encode(record: &Record) -> Bytes {
    Bytes::from(serde_json::to_vec(record).expect("a lease record always serialises"))
}

fn decode(bytes: &[u8]) -> Result<Record, LeaseError> {
    serde_json::from_slice(bytes).map_err(|e| LeaseError::Malformed(e.to_string()))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn expiry_ms(ttl: Duration) -> i64 {
    now_ms() + ttl.as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(ttl_ms: u64, wait_ms: u64) -> LeaseOptions {
        LeaseOptions {
            ttl: Duration::from_millis(ttl_ms),
            wait: Duration::from_millis(wait_ms),
        }
    }

    async fn suite(store: Store) {
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        assert_eq!(a.epoch(), 1);
        let err = Lease::acquire(&store, "b", quick(60_000, 300)).await.unwrap_err();
        assert!(
            matches!(err, LeaseError::Held { ref owner, .. } if owner == "a"),
            "{err}"
        );
        a.renew().await.unwrap();

        // A waiting instance gets the lease as soon as the holder releases it.
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { Lease::acquire(&store, "b", quick(60_000, 10_000)).await }
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        a.release().await.unwrap();
        let mut b = waiter.await.unwrap().unwrap();
        assert_eq!(b.epoch(), 2);
        b.renew().await.unwrap();
    }

    async fn takeover(store: Store) {
        let mut a = Lease::acquire(&store, "a", quick(200, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let b = Lease::acquire(&store, "b", quick(60_000, 0)).await.unwrap();
        assert_eq!(b.epoch(), 2, "an expired lease is taken over");
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref by } if by.contains('b')), "{err}");
    }

    #[tokio::test]
    async fn memory_lease_waits_for_release_and_refuses_a_live_holder() {
        suite(Store::in_memory()).await;
        takeover(Store::in_memory()).await;
    }

    #[tokio::test]
    async fn file_lease_works_without_native_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        suite(Store::from_url(&url, &|_| None).unwrap().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        takeover(Store::from_url(&url, &|_| None).unwrap().unwrap()).await;
    }

    #[test]
    fn renewal_is_due_in_the_second_half_of_the_ttl() {
        let store = Store::in_memory();
        let lease = Lease {
            store,
            owner: "a".into(),
            epoch: 1,
            ttl: Duration::from_secs(10),
            version: UpdateVersion {
                e_tag: None,
                version: None,
            },
            expires: Instant::now() + Duration::from_secs(10),
        };
        assert!(!lease.needs_renewal());
        let late = Lease {
            expires: Instant::now() + Duration::from_secs(4),
            ..lease
        };
        assert!(late.needs_renewal());
    }
}
