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
//!
//! # Hand-over requests
//! On Cloud Run the new revision must be ready *before* the old instance gets SIGTERM, and a
//! holder that keeps receiving writes keeps renewing: waiting alone would never end. So a
//! waiting newcomer also writes a *hand-over request* into the live lease (same owner, epoch
//! and expiry; `handover_requested_by` set), by compare-and-swap. The holder learns of it on
//! its next renewal (which then conflicts) or its next [`Lease::keep`] check — at most every
//! [`DEFAULT_CHECK_INTERVAL`] while it writes, never while idle — as
//! [`LeaseError::HandoverRequested`]; it then ships everything, releases, and stops writing.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};

use crate::store::{PutOutcome, Store, StoreError, UpdateOutcome};

/// Lease lifetime after each renewal (seconds).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// How long a starting instance waits for the holder to release (seconds).
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(60);
/// While writing, the holder reads the lease at most this often to notice a hand-over request
/// before its next renewal is due (one GET per interval under writes; none while idle).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
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
    /// See [`DEFAULT_CHECK_INTERVAL`].
    pub check_interval: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_LEASE_TTL,
            wait: DEFAULT_LEASE_WAIT,
            check_interval: DEFAULT_CHECK_INTERVAL,
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
    /// A starting instance asked for the lease: the holder should ship everything, then
    /// [`Lease::release`]. The lease is still this instance's until then.
    #[error("instance {by} asked for the replica lease: hand the replica over")]
    HandoverRequested { by: String },
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
    /// A waiting newcomer that asked the holder to hand over (absent in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handover_requested_by: Option<String>,
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
    /// See [`LeaseOptions::check_interval`].
    check_interval: Duration,
    /// When the stored lease was last read or written by this holder.
    checked: Instant,
    /// The hand-over request seen in the stored lease, carried on by later renewals.
    handover: Option<String>,
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
                        handover_requested_by: None,
                    };
                    if let PutOutcome::Created = store.put_object_create(OBJECT, encode(&record)).await? {
                        if let Some(lease) = Self::confirm(store, &record, options, before).await? {
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
                            handover_requested_by: None,
                        };
                        if let UpdateOutcome::Updated(version) =
                            store.put_object_update(OBJECT, encode(&record), &version).await?
                        {
                            return Ok(Lease::held(store, record, options, version, before));
                        }
                        continue;
                    }
                    if current.handover_requested_by.is_none() {
                        // Ask the holder to hand over. A conflict means the lease changed
                        // (a renewal, a release): look again at once and ask again if needed.
                        let holder = current.owner.clone();
                        let request = Record {
                            handover_requested_by: Some(owner.into()),
                            ..current
                        };
                        match store.put_object_update(OBJECT, encode(&request), &version).await? {
                            UpdateOutcome::Updated(_) => {
                                tracing::info!(%holder, "asked the replica lease holder to hand over");
                            }
                            UpdateOutcome::Conflict => {}
                        }
                        continue;
                    }
                    let expires_in_secs = (current.expires_at_ms - now_ms()) / 1000;
                    if started.elapsed() >= options.wait {
                        if current.handover_requested_by.as_deref() == Some(owner) {
                            // Giving up: withdraw the request (best effort), so the holder
                            // does not step down for an instance that is not coming.
                            let withdrawn = Record {
                                handover_requested_by: None,
                                ..current.clone()
                            };
                            let _ = store.put_object_update(OBJECT, encode(&withdrawn), &version).await;
                        }
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
        options: LeaseOptions,
        before: Instant,
    ) -> Result<Option<Lease>, LeaseError> {
        let Some((bytes, version)) = store.get_object(OBJECT).await? else {
            return Ok(None);
        };
        if decode(&bytes)? != *record {
            return Ok(None);
        }
        Ok(Some(Lease::held(store, record.clone(), options, version, before)))
    }

    fn held(store: &Store, record: Record, options: LeaseOptions, version: UpdateVersion, before: Instant) -> Lease {
        Lease {
            store: store.clone(),
            owner: record.owner,
            epoch: record.epoch,
            ttl: options.ttl,
            version,
            expires: before + options.ttl,
            check_interval: options.check_interval,
            checked: before,
            handover: None,
        }
    }

    /// Takes back a lease `owner` released at `epoch`, if nobody took it since: a hand-over
    /// whose requester never came (it was stopped while waiting). Anyone else's lease, or a
    /// later epoch, is left alone: the replica may have moved on.
    ///
    /// # Errors
    /// Store errors; a malformed lease object.
    pub async fn reclaim(
        store: &Store,
        owner: &str,
        epoch: u64,
        options: LeaseOptions,
    ) -> Result<Option<Lease>, LeaseError> {
        let before = Instant::now();
        let Some((bytes, version)) = store.get_object(OBJECT).await? else {
            return Ok(None);
        };
        let current = decode(&bytes)?;
        if current.owner != owner || current.epoch != epoch || !current.released {
            return Ok(None);
        }
        let record = Record {
            owner: owner.into(),
            epoch: epoch + 1,
            expires_at_ms: expiry_ms(options.ttl),
            released: false,
            handover_requested_by: None,
        };
        match store.put_object_update(OBJECT, encode(&record), &version).await? {
            UpdateOutcome::Updated(version) => Ok(Some(Lease::held(store, record, options, version, before))),
            UpdateOutcome::Conflict => Ok(None),
        }
    }

    /// The options this lease was taken with (`wait` is not kept: zero).
    pub fn options(&self) -> LeaseOptions {
        LeaseOptions {
            ttl: self.ttl,
            wait: Duration::ZERO,
            check_interval: self.check_interval,
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

    /// The hand-over request this holder has seen, if any.
    pub fn handover_requested_by(&self) -> Option<&str> {
        self.handover.as_deref()
    }

    /// What a holder calls before it writes: renews when due ([`Lease::needs_renewal`]),
    /// otherwise reads the lease when the last look is older than the check interval, so a
    /// hand-over request is noticed within about that interval while writes go on. Makes no
    /// request otherwise.
    ///
    /// # Errors
    /// As [`Lease::renew`] and [`Lease::check`].
    pub async fn keep(&mut self) -> Result<(), LeaseError> {
        if self.needs_renewal() {
            self.renew().await
        } else if self.checked.elapsed() >= self.check_interval {
            self.check().await
        } else {
            Ok(())
        }
    }

    /// Reads the stored lease (one GET) to learn of a hand-over request or a takeover.
    ///
    /// # Errors
    /// [`LeaseError::HandoverRequested`] when a newcomer asked for the lease (the first time
    /// this holder sees the request); [`LeaseError::Lost`] when it is someone else's.
    pub async fn check(&mut self) -> Result<(), LeaseError> {
        let before = Instant::now();
        let Some((bytes, version)) = self.store.get_object(OBJECT).await? else {
            return Err(LeaseError::Lost {
                by: "nobody (the lease object is gone)".into(),
            });
        };
        self.checked = before;
        self.judge(decode(&bytes)?, version)
    }

    /// Compares the stored lease with this holder's: still ours, ours with a (new) hand-over
    /// request, or lost.
    fn judge(&mut self, stored: Record, version: UpdateVersion) -> Result<(), LeaseError> {
        if stored.owner != self.owner || stored.epoch != self.epoch || stored.released {
            return Err(LeaseError::Lost {
                by: format!("{} (epoch {})", stored.owner, stored.epoch),
            });
        }
        // Ours still: adopt its version, so that renewing and releasing by CAS keep working.
        self.version = version;
        match stored.handover_requested_by {
            Some(by) if self.handover.is_none() => {
                self.handover = Some(by.clone());
                Err(LeaseError::HandoverRequested { by })
            }
            _ => Ok(()),
        }
    }

    /// Extends the lease by the TTL, by compare-and-swap. A hand-over request already seen
    /// is kept in the stored lease.
    ///
    /// # Errors
    /// [`LeaseError::HandoverRequested`] if a newcomer asked for the lease since (the lease
    /// is still ours, not extended; release it once everything is shipped);
    /// [`LeaseError::Lost`] if another instance took it (this one is fenced).
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        // A conflict that leaves the lease ours (a request already seen, rewritten) is
        // retried with the new version; anything else ends the loop.
        for _ in 0..3 {
            let before = Instant::now();
            let record = Record {
                owner: self.owner.clone(),
                epoch: self.epoch,
                expires_at_ms: expiry_ms(self.ttl),
                released: false,
                handover_requested_by: self.handover.clone(),
            };
            match self
                .store
                .put_object_update(OBJECT, encode(&record), &self.version)
                .await?
            {
                UpdateOutcome::Updated(version) => {
                    self.version = version;
                    self.expires = before + self.ttl;
                    self.checked = before;
                    return Ok(());
                }
                UpdateOutcome::Conflict => {
                    let Some((bytes, version)) = self.store.get_object(OBJECT).await? else {
                        return Err(self.lost().await);
                    };
                    self.checked = before;
                    self.judge(decode(&bytes)?, version)?;
                }
            }
        }
        Err(self.lost().await)
    }

    /// Marks the lease released so a waiting instance takes it at once. A hand-over request
    /// written meanwhile does not stop it.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] if it was no longer ours; store errors.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        for _ in 0..3 {
            let record = Record {
                owner: self.owner.clone(),
                epoch: self.epoch,
                expires_at_ms: now_ms(),
                released: true,
                handover_requested_by: None,
            };
            match self
                .store
                .put_object_update(OBJECT, encode(&record), &self.version)
                .await?
            {
                UpdateOutcome::Updated(_) => return Ok(()),
                UpdateOutcome::Conflict => {
                    let Some((bytes, version)) = self.store.get_object(OBJECT).await? else {
                        break;
                    };
                    match self.judge(decode(&bytes)?, version) {
                        Ok(()) | Err(LeaseError::HandoverRequested { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(self.lost().await)
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
            check_interval: Duration::from_millis(100),
        }
    }

    /// The stored record, as other instances see it.
    async fn stored(store: &Store) -> Record {
        decode(&store.get_object(OBJECT).await.unwrap().unwrap().0).unwrap()
    }

    /// Waits (up to 5 s) until a waiting instance has written its hand-over request.
    async fn requested(store: &Store) -> String {
        let started = Instant::now();
        loop {
            if let Some(by) = stored(store).await.handover_requested_by {
                return by;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "no hand-over request");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A busy holder renews before its lease lapses; the newcomer's request turns its next
    /// renewal into `HandoverRequested`, and once released the newcomer gets it at once.
    async fn handover_on_renewal(store: Store) {
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { Lease::acquire(&store, "b", quick(60_000, 30_000)).await }
        });
        assert_eq!(requested(&store).await, "b");
        let record = stored(&store).await;
        assert_eq!((record.owner.as_str(), record.epoch, record.released), ("a", 1, false));

        let err = a.renew().await.unwrap_err();
        assert!(
            matches!(err, LeaseError::HandoverRequested { ref by } if by == "b"),
            "{err}"
        );
        assert_eq!(a.handover_requested_by(), Some("b"));
        // Still ours while the holder ships its tail: renewing keeps the request.
        a.renew().await.unwrap();
        a.check().await.unwrap();
        assert_eq!(stored(&store).await.handover_requested_by.as_deref(), Some("b"));

        let released = Instant::now();
        a.release().await.unwrap();
        let mut b = waiter.await.unwrap().unwrap();
        assert!(
            released.elapsed() < Duration::from_secs(2),
            "the newcomer takes a released lease at once: {:?}",
            released.elapsed()
        );
        assert_eq!(b.epoch(), 2);
        assert_eq!(stored(&store).await.handover_requested_by, None);
        b.renew().await.unwrap();
    }

    /// Between renewals, `keep` notices a request within the check interval (one GET), and
    /// makes no request at all before that interval has passed.
    async fn handover_on_check(store: Store) {
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { Lease::acquire(&store, "b", quick(60_000, 30_000)).await }
        });
        requested(&store).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!a.needs_renewal());
        let err = a.keep().await.unwrap_err();
        assert!(
            matches!(err, LeaseError::HandoverRequested { ref by } if by == "b"),
            "{err}"
        );
        a.keep().await.unwrap();
        a.release().await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().epoch(), 2);
    }

    #[tokio::test]
    async fn a_released_lease_nobody_took_is_reclaimed_by_its_last_holder_only() {
        let store = Store::in_memory();
        let a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        let options = a.options();
        a.release().await.unwrap();
        assert!(Lease::reclaim(&store, "b", 1, options).await.unwrap().is_none());
        let a = Lease::reclaim(&store, "a", 1, options)
            .await
            .unwrap()
            .expect("nobody took it");
        assert_eq!(a.epoch(), 2);
        assert!(
            Lease::reclaim(&store, "a", 1, options).await.unwrap().is_none(),
            "live now"
        );
        a.release().await.unwrap();
        let b = Lease::acquire(&store, "b", quick(60_000, 0)).await.unwrap();
        b.release().await.unwrap();
        assert!(
            Lease::reclaim(&store, "a", 2, options).await.unwrap().is_none(),
            "someone held it since"
        );
    }

    #[tokio::test]
    async fn memory_lease_hands_over_on_request() {
        handover_on_renewal(Store::in_memory()).await;
        handover_on_check(Store::in_memory()).await;
    }

    #[tokio::test]
    async fn file_lease_hands_over_on_request() {
        for run in [0, 1] {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("file://{}", dir.path().display());
            let store = Store::from_url(&url, &|_| None).unwrap().unwrap();
            if run == 0 {
                handover_on_renewal(store).await;
            } else {
                handover_on_check(store).await;
            }
        }
    }

    #[test]
    fn old_records_without_a_request_still_parse() {
        let old = br#"{"owner":"a","epoch":3,"expires_at_ms":5,"released":false}"#;
        let record = decode(old).unwrap();
        assert_eq!(record.handover_requested_by, None);
        assert!(!String::from_utf8(encode(&record).to_vec())
            .unwrap()
            .contains("handover"));
    }

    async fn suite(store: Store) {
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        assert_eq!(a.epoch(), 1);
        let err = Lease::acquire(&store, "b", quick(60_000, 300)).await.unwrap_err();
        assert!(
            matches!(err, LeaseError::Held { ref owner, .. } if owner == "a"),
            "{err}"
        );
        // The newcomer that gave up withdrew its hand-over request.
        a.renew().await.unwrap();
        assert_eq!(stored(&store).await.handover_requested_by, None);

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
            check_interval: DEFAULT_CHECK_INTERVAL,
            checked: Instant::now(),
            handover: None,
        };
        assert!(!lease.needs_renewal());
        let late = Lease {
            expires: Instant::now() + Duration::from_secs(4),
            ..lease
        };
        assert!(late.needs_renewal());
    }
}
