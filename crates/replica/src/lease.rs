//! The single-writer lease: one small object (`keycast/lease.json`) changed only by
//! compare-and-swap, so at most one instance believes it may write the replica.
//!
//! The lease is an orderly hand-over mechanism, not the only safety net: every data object is
//! also written create-only at a TXID-derived key, so two instances that both think they hold
//! the lease collide instead of overwriting each other. The lease makes that rare, and makes
//! hand-over on deploy lossless:
//!
//! 1. a starting instance waits (up to `wait`) while another holds an unexpired lease, and
//!    asks it to hand over (below);
//! 2. the holder ships everything and *releases* the lease;
//! 3. the newcomer takes it (epoch + 1), restores the latest state, and serves.
//!
//! # Who is who
//! The lease names its holder by a caller-chosen *owner* string that must be unique to the
//! process: keycast uses `<host>-<pid>#<random>`, because host names and PIDs repeat (in a
//! container the binary is PID 1, and several instances may call themselves `localhost`).
//! A lease held under this process's own owner string can only be this process's own write
//! whose answer was lost, so it is adopted rather than treated as someone else's.
//!
//! # Time
//! Expiry is judged twice, conservatively on both sides, so that clock skew between instances
//! cannot make two of them write at once:
//! - the holder measures its lease from *before* the write that set it, on the monotonic
//!   clock, and stops trusting it `margin` before that local expiry ([`Lease::is_valid`]);
//! - a newcomer takes an unreleased lease once it has watched that same record stay
//!   unchanged for a TTL plus the margin ([`LeaseOptions::takeover_after`]) on its own
//!   monotonic clock: by then the holder's own clocks have told it to stop trusting the lease
//!   (or it renewed, which changes the record), however far its wall clock is from the
//!   newcomer's; or once the record's stamped (wall-clock) expiry is that long past, so that
//!   progress made before a restart is not lost. Before, a stamp a margin past was enough: a
//!   holder whose wall clock ran behind by more than twice the margin (6 s) stamped an expiry
//!   that looked past while it still trusted its lease, and both wrote; one ahead kept every
//!   newcomer out for as long. Skew up to the TTL plus twice the margin (21 s by default) is
//!   now tolerated. [`Lease::take_back`] and `accept_loss` judge stamps the same way.
//!
//! # Unknown outcomes
//! A compare-and-swap whose answer was lost may or may not have been applied. Every write of
//! the lease is therefore resolved by reading it back: if the stored record is exactly what
//! this process wrote, the write happened; anything else is the truth to act on.
//!
//! # Renewal
//! Renewal is lazy: the holder renews when it is about to write (or is busy shipping) and less
//! than half the TTL is left, so an idle instance makes no requests. An idle holder's lease
//! therefore lapses; renewing a lapsed lease nobody took still succeeds (the compare-and-swap
//! proves nobody did), and a newcomer takes a lapsed one as the Time section says.
//!
//! # Hand-over requests
//! On Cloud Run the new revision must be ready *before* the old instance gets SIGTERM, and a
//! holder that keeps receiving writes keeps renewing: waiting alone would never end. So a
//! waiting newcomer also writes a *hand-over request* into the live lease (same owner, epoch
//! and expiry; `handover_requested_by` set), by compare-and-swap. The holder learns of it on
//! its next renewal (which then conflicts) or its next [`Lease::keep`] check — at most every
//! [`DEFAULT_CHECK_INTERVAL`] while it writes, never while idle — as
//! [`LeaseError::HandoverRequested`]; it then ships everything, releases, and stops writing.
//!
//! # Serving, and taking back
//! A newcomer marks its lease *serving* once its start-up has finished
//! ([`Lease::mark_serving`]). An instance that handed over may take the lease back
//! ([`Lease::take_back`]) while it is still exactly as released, or when the instance that
//! took it never started serving and let it lapse (a deploy that failed after taking the
//! lease), or when its own release failed and the lease lapsed untaken — never from an
//! instance that served.
//!
//! # The high-water mark
//! Each write of the lease records the highest TXID its holder knows to be in the replica
//! ([`Lease::note_txid`]), at no extra request: a later restore that finds the replica short
//! of it knows the newest objects were deleted, instead of silently rolling back. On an
//! encrypted replica the mark carries a MAC, made only by a holder that has shipped or
//! checked it ([`crate::mark`]): a mark copied from a record is copied with its MAC as found,
//! so a forged one is never made valid by passing through an honest holder.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::mark::{self, Mark, MarkError};
use crate::store::{Store, StoreError, UpdateOutcome};

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

impl LeaseOptions {
    /// The clock-skew allowance: a fifth of the TTL (3 s by default).
    pub fn margin(&self) -> Duration {
        self.ttl / 5
    }

    /// How long another instance's lease is watched unchanged, and how far past its stamped
    /// expiry it must be, before it is taken: the TTL plus the margin (see the module's Time
    /// section).
    pub fn takeover_after(&self) -> Duration {
        self.ttl + self.margin()
    }
}

/// Why the lease could not be had or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "instance {owner} holds the replica lease and did not release it within {waited_secs} s \
         (left unrenewed, it is free to take within {free_in_secs} s); stop it, or start again later"
    )]
    Held {
        owner: String,
        /// The longest until a starting instance takes it if nobody renews it: its stamped
        /// expiry a TTL and the margin past (watching it may free it sooner).
        free_in_secs: i64,
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
    Mark(#[from] MarkError),
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
    /// When it asked (ms since the Unix epoch; absent in older records, which never go
    /// stale): a request older than [`STALE_REQUEST`] is from a newcomer that gave up or died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handover_requested_at_ms: Option<i64>,
    /// The holder finished starting and served (see [`Lease::mark_serving`]). Records from
    /// before this field read as serving, so nobody takes them back.
    #[serde(default = "yes")]
    serving: bool,
    /// The highest TXID the holder knew to be in the replica when it wrote this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    txid: Option<u64>,
    /// On an encrypted replica, the MAC of `txid` (see [`crate::mark`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    txid_mac: Option<String>,
}

fn yes() -> bool {
    true
}

/// Age past which a hand-over request is ignored (by the holder) and replaced (by the next
/// newcomer). A newcomer killed while it waited (a deploy cancelled, a startup probe given up)
/// left its request for good: an idle holder found it at its next write, hours later, and
/// handed the replica over to nobody — a lease's time of refused writes at a random moment —
/// and a busy one left the next newcomer waiting on a request it never answered.
const STALE_REQUEST: Duration = Duration::from_secs(600);

impl Record {
    /// A hand-over request old enough to be a newcomer's that is gone.
    fn request_is_stale(&self) -> bool {
        self.handover_requested_at_ms
            .is_some_and(|at| now_ms().saturating_sub(at) > STALE_REQUEST.as_millis() as i64)
    }

    /// Free to take: released, or lapsed by more than the skew margin.
    fn free_in_secs(&self, options: LeaseOptions) -> i64 {
        let free_at = self.expires_at_ms + i64::try_from(options.takeover_after().as_millis()).unwrap_or(i64::MAX);
        (free_at - now_ms()).max(0) / 1000
    }

    fn is_free(&self, margin: Duration) -> bool {
        self.released || self.expires_at_ms + margin.as_millis() as i64 <= now_ms()
    }

    fn describe(&self) -> String {
        format!("{} (epoch {})", self.owner, self.epoch)
    }

    /// The record's mark, authenticated if its MAC proves it under `store`'s key.
    fn mark(&self, store: &Store) -> Mark {
        Mark {
            txid: self.txid,
            authenticated: store.verify_record_mac(&mark::message(self.txid), self.txid_mac.as_deref()),
        }
    }
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
    /// The wall-clock expiry written in the record, checked too: a monotonic clock that
    /// stood still (a suspended VM) must not make a lapsed lease look valid.
    wall_expires_ms: i64,
    /// See [`LeaseOptions::check_interval`].
    check_interval: Duration,
    /// When the stored lease was last read or written by this holder.
    checked: Instant,
    /// The hand-over request seen in the stored lease, carried on by later renewals.
    handover: Option<String>,
    /// Written into every record: see [`Lease::mark_serving`].
    serving: bool,
    /// Written into every record: see [`Lease::note_txid`].
    txid: Option<u64>,
    /// Written with `txid`: its MAC, as found in the record this lease replaced until this
    /// holder vouches for the mark itself.
    txid_mac: Option<String>,
    /// The high-water mark the previous holder left in the record this lease replaced.
    previous: Mark,
    /// Publishes the expiry on every renewal, for [`Lease::clock`].
    clock: watch::Sender<Expiry>,
}

/// When a lease stops being valid by each clock: its holder's local expiry (monotonic) and
/// the record's (wall clock), the margin already taken off both.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    at: Instant,
    at_ms: i64,
}

/// A view of a lease's validity by the clocks that follows its renewals, for work that runs
/// while something else holds the lease (see [`keep_alive_while`]): a start-up that deletes
/// from the replica after a long restore asks it right before deleting, since a lease that
/// could not be renewed meanwhile may have been taken, and the objects rewritten, by another
/// instance. A released (dropped) lease is never valid.
#[derive(Debug, Clone)]
pub struct LeaseClock(watch::Receiver<Expiry>);

impl LeaseClock {
    /// Whether no other instance can have taken the lease yet, by both clocks, as
    /// [`Lease::is_valid`] says.
    pub fn is_valid(&self) -> bool {
        let Expiry { at, at_ms } = *self.0.borrow();
        self.0.has_changed().is_ok() && Instant::now() < at && now_ms() < at_ms
    }
}

/// What a compare-and-swap of the lease came to, once an unknown outcome was read back.
enum Swap {
    /// Stored; the new version.
    Done(UpdateVersion),
    /// Someone else's record is there (or none at all).
    Lost(Option<(Record, UpdateVersion)>),
}

/// Writes `next` over the lease at `version`. A conflict or a failed request is resolved by
/// reading the lease back: exactly `next` means the write happened (its answer was lost);
/// another record at another version means someone wrote since `version` — that is the
/// truth to act on, even though the request failed.
///
/// # Errors
/// The request's error when the write did not happen and nothing else is known (the lease
/// is still at `version`, or gone, or cannot be read); a malformed lease.
async fn swap(store: &Store, next: &Record, expected: &UpdateVersion) -> Result<Swap, LeaseError> {
    let failure = match store.put_object_update(OBJECT, encode(next), expected).await {
        Ok(UpdateOutcome::Updated(version)) => return Ok(Swap::Done(version)),
        Ok(UpdateOutcome::Conflict) => None,
        Err(e) => Some(e),
    };
    let stored = match store.get_object(OBJECT).await {
        Ok(stored) => stored,
        Err(read) => return Err(failure.unwrap_or(read).into()),
    };
    match stored {
        Some((bytes, version)) => {
            let record = decode(&bytes)?;
            if record == *next {
                tracing::info!(owner = %next.owner, "a lease write whose answer was lost had been applied");
                return Ok(Swap::Done(version));
            }
            match failure {
                // Unchanged: the request failed before it applied. Retry.
                Some(e) if version == *expected => Err(e.into()),
                _ => Ok(Swap::Lost(Some((record, version)))),
            }
        }
        None => match failure {
            Some(e) => Err(e.into()),
            None => Ok(Swap::Lost(None)),
        },
    }
}

/// Creates the lease object holding `record`, resolving an unknown outcome by reading it
/// back. `None` when someone else's lease is there (a create-only write of ours can never
/// land over it, whatever became of the request).
async fn create(store: &Store, record: &Record) -> Result<Option<UpdateVersion>, LeaseError> {
    let failure = store.put_object_create(OBJECT, encode(record)).await.err();
    match store.get_object(OBJECT).await {
        Ok(Some((bytes, version))) if decode(&bytes)? == *record => Ok(Some(version)),
        Ok(Some(_)) => Ok(None),
        Ok(None) => match failure {
            Some(e) => Err(e.into()),
            None => Ok(None),
        },
        Err(read) => Err(failure.unwrap_or(read).into()),
    }
}

impl Lease {
    /// Takes the lease, waiting up to `options.wait` for a live holder to release it, and
    /// asking it to hand over meanwhile. `owner` must be unique to this process.
    ///
    /// A store that fails a request meanwhile is asked again until the wait runs out: every
    /// round starts by reading the lease, which tells what became of a write whose outcome
    /// is unknown (a hand-over request that landed, a takeover of ours).
    ///
    /// # Errors
    /// [`LeaseError::Held`] when the wait ran out; store errors (the last, once it ran out).
    pub async fn acquire(store: &Store, owner: &str, options: LeaseOptions) -> Result<Lease, LeaseError> {
        let started = Instant::now();
        let mut announced = false;
        // The holder's record (owner, epoch, stamped expiry) and when this instance first saw
        // it: a request of ours written into it changes neither.
        let mut watched: Option<((String, u64, i64), Instant)> = None;
        // A store error within the wait: look again shortly.
        macro_rules! or_look_again {
            ($request:expr) => {
                match $request {
                    Err(LeaseError::Store(e)) if started.elapsed() < options.wait => {
                        tracing::warn!(error = %e, "cannot reach the replica lease; trying again");
                        tokio::time::sleep(POLL).await;
                        continue;
                    }
                    done => done?,
                }
            };
        }
        loop {
            let before = Instant::now();
            let found = or_look_again!(store.get_object(OBJECT).await.map_err(LeaseError::from));
            let seen_at = Instant::now();
            match found {
                None => {
                    let record = Self::fresh(owner, 1, options, None);
                    if let Some(version) = or_look_again!(create(store, &record).await) {
                        return Ok(Lease::held(store, record, options, version, before, Mark::default()));
                    }
                    continue;
                }
                Some((bytes, version)) => {
                    let current = decode(&bytes)?;
                    if current.owner == owner && !current.released {
                        // Our own write whose answer was lost (the owner is unique to us). Its
                        // mark is the previous holder's, copied with its MAC as found.
                        let previous = current.mark(store);
                        return Ok(Lease::held(store, current, options, version, before, previous));
                    }
                    let record = (current.owner.clone(), current.epoch, current.expires_at_ms);
                    let watched_since = match &watched {
                        Some((seen, since)) if *seen == record => *since,
                        _ => {
                            watched = Some((record, seen_at));
                            seen_at
                        }
                    };
                    // Watched unchanged for a TTL and the margin: its holder, whatever its wall
                    // clock says, has by its own monotonic clock stopped trusting it (or renewed
                    // it, which would have changed it).
                    let lapsed = current.released
                        || watched_since.elapsed() >= options.takeover_after()
                        || current.is_free(options.takeover_after());
                    if lapsed {
                        if !current.released {
                            tracing::warn!(previous = %current.describe(), "took over an expired replica lease; its holder is now fenced");
                        }
                        let record = Self::fresh(owner, current.epoch + 1, options, Some(&current));
                        if let Swap::Done(version) = or_look_again!(swap(store, &record, &version).await) {
                            let previous = current.mark(store);
                            return Ok(Lease::held(store, record, options, version, before, previous));
                        }
                        continue;
                    }
                    if current.handover_requested_by.is_none() || current.request_is_stale() {
                        // Ask the holder to hand over. A conflict means the lease changed
                        // (a renewal, a release): look again at once and ask again if needed.
                        let holder = current.describe();
                        let request = Record {
                            handover_requested_by: Some(owner.into()),
                            handover_requested_at_ms: Some(now_ms()),
                            ..current
                        };
                        if let Swap::Done(_) = or_look_again!(swap(store, &request, &version).await) {
                            tracing::info!(%holder, "asked the replica lease holder to hand over");
                        }
                        continue;
                    }
                    let free_in_secs = current.free_in_secs(options);
                    if started.elapsed() >= options.wait {
                        if current.handover_requested_by.as_deref() == Some(owner) {
                            // Giving up: withdraw the request (best effort), so the holder
                            // does not step down for an instance that is not coming.
                            let withdrawn = Record {
                                handover_requested_by: None,
                                handover_requested_at_ms: None,
                                ..current.clone()
                            };
                            let _ = store.put_object_update(OBJECT, encode(&withdrawn), &version).await;
                        }
                        return Err(LeaseError::Held {
                            owner: current.owner,
                            free_in_secs,
                            waited_secs: options.wait.as_secs(),
                        });
                    }
                    if !announced {
                        tracing::info!(holder = %current.describe(), free_in_secs, "waiting for the current holder to release the replica lease");
                        announced = true;
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A new, not yet serving record for `owner` at `epoch`, carrying on the mark of the
    /// record it replaces (with its MAC as found: see [`Lease::confirm_mark`]).
    fn fresh(owner: &str, epoch: u64, options: LeaseOptions, replacing: Option<&Record>) -> Record {
        Record {
            owner: owner.into(),
            epoch,
            expires_at_ms: expiry_ms(options.ttl),
            released: false,
            handover_requested_by: None,
            handover_requested_at_ms: None,
            serving: false,
            txid: replacing.and_then(|r| r.txid),
            txid_mac: replacing.and_then(|r| r.txid_mac.clone()),
        }
    }

    fn held(
        store: &Store,
        record: Record,
        options: LeaseOptions,
        version: UpdateVersion,
        before: Instant,
        previous: Mark,
    ) -> Lease {
        Lease {
            store: store.clone(),
            owner: record.owner,
            epoch: record.epoch,
            ttl: options.ttl,
            version,
            expires: before + options.ttl,
            wall_expires_ms: record.expires_at_ms,
            check_interval: options.check_interval,
            checked: before,
            handover: record.handover_requested_by,
            serving: record.serving,
            txid: record.txid,
            txid_mac: record.txid_mac,
            previous,
            clock: watch::Sender::new(expiry(before + options.ttl, record.expires_at_ms, options.margin())),
        }
    }

    /// After handing over: takes the lease if nobody holds it — it was released (by this
    /// instance, never taken, or by whoever took it since), or it lapsed in the hands of an
    /// instance that never started serving (a deploy that failed, or was killed, after taking
    /// the lease). An instance that served keeps its lease even while it lapses idle, so a
    /// healthy newcomer is never robbed. The caller must then check that the replica has not
    /// moved past its own state before writing, and give the lease back if it has.
    ///
    /// # Errors
    /// Store errors; a malformed lease object.
    pub async fn take_back(store: &Store, owner: &str, options: LeaseOptions) -> Result<Option<Lease>, LeaseError> {
        let before = Instant::now();
        let Some((bytes, version)) = store.get_object(OBJECT).await? else {
            return Ok(None);
        };
        let current = decode(&bytes)?;
        let failed_newcomer = !current.released && !current.serving && current.is_free(options.takeover_after());
        // Its own lease, whose release failed at the hand-over, and which nobody took for a
        // whole TTL after it lapsed (a waiting newcomer polls a free lease within a moment):
        // the newcomer is gone.
        let never_released = !current.released && current.owner == owner && current.is_free(options.takeover_after());
        if !current.released && !failed_newcomer && !never_released {
            return Ok(None);
        }
        if failed_newcomer {
            tracing::warn!(newcomer = %current.describe(), "the instance that took the replica lease never started serving and let it go");
        }
        let record = Record {
            serving: true,
            ..Self::fresh(owner, current.epoch + 1, options, Some(&current))
        };
        match swap(store, &record, &version).await? {
            Swap::Done(version) => Ok(Some(Lease::held(
                store,
                record,
                options,
                version,
                before,
                current.mark(store),
            ))),
            Swap::Lost(_) => Ok(None),
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

    /// The clock-skew allowance, a fifth of the TTL (see the module docs).
    pub fn margin(&self) -> Duration {
        self.options().margin()
    }

    /// How much longer this holder may trust its lease without asking the store: its local
    /// expiry minus the margin. Zero once that has passed.
    pub fn valid_for(&self) -> Duration {
        let wall_left = Duration::from_millis((self.wall_expires_ms - now_ms()).max(0) as u64);
        self.expires
            .saturating_duration_since(Instant::now())
            .min(wall_left)
            .saturating_sub(self.margin())
    }

    /// Whether no other instance can have taken the lease yet, by the clocks alone.
    pub fn is_valid(&self) -> bool {
        !self.valid_for().is_zero()
    }

    /// Follows this lease's validity from elsewhere (see [`LeaseClock`]).
    pub fn clock(&self) -> LeaseClock {
        LeaseClock(self.clock.subscribe())
    }

    /// The moment [`Lease::is_valid`] turns false, as far as can be told now.
    pub fn valid_until(&self) -> Instant {
        Instant::now() + self.valid_for()
    }

    /// Less than half the TTL is left: renew before writing.
    pub fn needs_renewal(&self) -> bool {
        Instant::now() >= self.renewal_due_at()
    }

    /// When [`Lease::needs_renewal`] turns true.
    pub fn renewal_due_at(&self) -> Instant {
        self.expires.checked_sub(self.ttl / 2).unwrap_or(self.expires)
    }

    /// The hand-over request this holder has seen, if any.
    pub fn handover_requested_by(&self) -> Option<&str> {
        self.handover.as_deref()
    }

    /// The high-water mark found in the lease this one replaced: the highest TXID the previous
    /// holder knew to be in the replica. A replica that reaches less lost its newest objects.
    pub fn previous_txid(&self) -> Option<u64> {
        self.previous.txid
    }

    /// [`Lease::previous_txid`], and whether its MAC proved it (see [`crate::mark`]).
    pub fn previous_mark(&self) -> Mark {
        self.previous
    }

    /// Checks the mark the previous holder left before a restore relies on it (see
    /// [`crate::mark::trusted`]), and returns the TXID the restore must reach.
    ///
    /// A mark believed without a MAC (a replica an earlier keycast wrote, a new one) gets this
    /// holder's MAC at once, one lease write before it writes any object: its objects are
    /// flagged, and a crash before its first renewal would otherwise leave the next start an
    /// unauthenticated mark beside flagged objects, which it must refuse.
    ///
    /// # Errors
    /// [`MarkError::Unauthenticated`] (as [`LeaseError::Mark`]); as [`Lease::renew`].
    pub async fn confirm_mark(&mut self) -> Result<Option<u64>, LeaseError> {
        let txid = mark::trusted(&self.store, self.previous).await?;
        if self.store.is_encrypted() && !self.previous.authenticated {
            self.txid_mac = self.store.record_mac(&mark::message(self.txid));
            // A hand-over request found by the renewal is answered later, but it left the
            // record unwritten: the renewal after it keeps the request and writes the MAC.
            for _ in 0..2 {
                match self.renew().await {
                    Ok(()) => break,
                    Err(LeaseError::HandoverRequested { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(txid)
    }

    /// Records `txid` as in the replica; written with the next renewal or release.
    pub fn note_txid(&mut self, txid: u64) {
        self.txid = Some(self.txid.map_or(txid, |t| t.max(txid)));
        self.txid_mac = self.store.record_mac(&mark::message(self.txid));
    }

    /// Whether this holder marked itself serving (see [`Lease::mark_serving`]).
    pub fn is_serving(&self) -> bool {
        self.serving
    }

    /// Marks the lease as held by an instance that finished starting, renewing it: from now on
    /// the instance that handed over to this one never takes it back.
    ///
    /// # Errors
    /// As [`Lease::renew`].
    pub async fn mark_serving(&mut self) -> Result<(), LeaseError> {
        self.serving = true;
        match self.renew().await {
            Ok(()) | Err(LeaseError::HandoverRequested { .. }) => Ok(()),
            Err(e) => Err(e),
        }
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
            return Err(LeaseError::Lost { by: stored.describe() });
        }
        // Ours still: adopt its version, so that renewing and releasing by CAS keep working.
        self.version = version;
        let stale = stored.request_is_stale();
        match stored.handover_requested_by {
            Some(by) if self.handover.is_none() && !stale => {
                self.handover = Some(by.clone());
                Err(LeaseError::HandoverRequested { by })
            }
            _ => Ok(()),
        }
    }

    /// The record this holder writes now, expiring a TTL from now.
    fn record(&self, released: bool) -> Record {
        Record {
            owner: self.owner.clone(),
            epoch: self.epoch,
            expires_at_ms: if released { now_ms() } else { expiry_ms(self.ttl) },
            released,
            handover_requested_by: if released { None } else { self.handover.clone() },
            // A request seen is being answered (the hand-over is under way): it no longer ages.
            handover_requested_at_ms: None,
            serving: self.serving,
            txid: self.txid,
            txid_mac: self.txid_mac.clone(),
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
            let record = self.record(false);
            match swap(&self.store, &record, &self.version).await? {
                Swap::Done(version) => {
                    self.version = version;
                    self.expires = before + self.ttl;
                    self.wall_expires_ms = record.expires_at_ms;
                    self.clock
                        .send_replace(expiry(self.expires, self.wall_expires_ms, self.margin()));
                    self.checked = before;
                    return Ok(());
                }
                Swap::Lost(None) => return Err(self.lost().await),
                Swap::Lost(Some((stored, version))) => {
                    self.checked = before;
                    self.judge(stored, version)?;
                }
            }
        }
        Err(self.lost().await)
    }

    /// Marks the lease released so a waiting instance takes it at once. A hand-over request
    /// written meanwhile does not stop it. A failed request is tried twice more, within about
    /// a second (see [`Lease::release_by`]).
    ///
    /// # Errors
    /// [`LeaseError::Lost`] if it was no longer ours; store errors.
    pub async fn release(self) -> Result<(), LeaseError> {
        self.release_by(Instant::now() + Duration::from_secs(1)).await
    }

    /// [`Lease::release`], trying a failed request again (twice at most) only while that can
    /// be done before `by` (a shutdown's deadline): unreleased, the lease keeps a waiting
    /// newcomer out for a TTL and more while this instance already refuses writes, but a
    /// stop must not run into the platform's kill for it.
    ///
    /// # Errors
    /// As [`Lease::release`].
    pub async fn release_by(mut self, by: Instant) -> Result<(), LeaseError> {
        let mut failures = 0;
        for _ in 0..5 {
            let swapped = match swap(&self.store, &self.record(true), &self.version).await {
                Err(LeaseError::Store(e)) if failures < 2 && Instant::now() + RELEASE_RETRY * (failures + 1) < by => {
                    failures += 1;
                    tracing::warn!(error = %e, "releasing the replica lease failed; trying again");
                    tokio::time::sleep(RELEASE_RETRY * failures).await;
                    continue;
                }
                swapped => swapped?,
            };
            match swapped {
                Swap::Done(_) => return Ok(()),
                Swap::Lost(None) => break,
                Swap::Lost(Some((stored, version))) => match self.judge(stored, version) {
                    Ok(()) | Err(LeaseError::HandoverRequested { .. }) => {}
                    Err(e) => return Err(e),
                },
            }
        }
        Err(self.lost().await)
    }

    /// Builds the "lost" error, naming the new holder when it can be read.
    async fn lost(&self) -> LeaseError {
        let by = match self.store.get_object(OBJECT).await {
            Ok(Some((bytes, _))) => decode(&bytes).map(|r| r.describe()).unwrap_or_default(),
            _ => "another instance".into(),
        };
        LeaseError::Lost { by }
    }
}

/// The high-water mark recorded in the replica's lease object (see [`Lease::note_txid`]),
/// for restores that want to know how far the replica reached: `None` when there is no lease
/// or it carries no mark.
///
/// # Errors
/// Store errors; a malformed lease object; a mark that cannot be believed (see
/// [`crate::mark::trusted`]).
pub async fn recorded_txid(store: &Store) -> Result<Option<u64>, LeaseError> {
    let found = match store.get_object(OBJECT).await? {
        Some((bytes, _)) => decode(&bytes)?.mark(store),
        None => Mark::default(),
    };
    Ok(mark::trusted(store, found).await?)
}

/// Who holds the replica, as the lease object says: for people (`keycast replica status`),
/// never for deciding who may write (that is [`Lease::acquire`]'s, by compare-and-swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's name (`<host>-<pid>#<random>`).
    pub owner: String,
    pub epoch: u64,
    /// Wall-clock expiry of its last renewal (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// Given back (a clean stop, a hand-over): nobody holds it.
    pub released: bool,
    /// A starting instance waiting for it.
    pub handover_requested_by: Option<String>,
}

/// The lease as stored; `None` when the replica has none (no instance has written).
///
/// # Errors
/// Store errors; a malformed lease object.
pub async fn holder(store: &Store) -> Result<Option<Holder>, LeaseError> {
    let Some((bytes, _)) = store.get_object(OBJECT).await? else {
        return Ok(None);
    };
    let record = decode(&bytes)?;
    Ok(Some(Holder {
        owner: record.owner,
        epoch: record.epoch,
        expires_at_ms: record.expires_at_ms,
        released: record.released,
        handover_requested_by: record.handover_requested_by,
    }))
}

/// `keycast replica accept-loss`: records the TXID the replica reaches now as its high-water
/// mark (with the replica key's MAC), so that the next start restores what the replica holds
/// although its newest objects are gone or its mark could not be believed. Refused while an
/// instance holds the lease: this is for a replica no instance serves. Returns the TXID.
///
/// # Errors
/// [`LeaseError::Held`] (without waiting) or [`LeaseError::Lost`] when an instance holds or
/// takes the lease; store errors.
pub async fn accept_loss(store: &Store, owner: &str, options: LeaseOptions) -> Result<u64, LeaseError> {
    let tip = store.max_txid().await?;
    let before = Instant::now();
    let taken = match store.get_object(OBJECT).await? {
        None => {
            let record = Lease::fresh(owner, 1, options, None);
            create(store, &record).await?.map(|version| (record, version))
        }
        Some((bytes, version)) => {
            let current = decode(&bytes)?;
            if !current.is_free(options.takeover_after()) {
                return Err(LeaseError::Held {
                    free_in_secs: current.free_in_secs(options),
                    owner: current.owner,
                    waited_secs: 0,
                });
            }
            let record = Lease::fresh(owner, current.epoch + 1, options, Some(&current));
            match swap(store, &record, &version).await? {
                Swap::Done(version) => Some((record, version)),
                Swap::Lost(_) => None,
            }
        }
    };
    let Some((record, version)) = taken else {
        return Err(LeaseError::Lost {
            by: "an instance that took it meanwhile".into(),
        });
    };
    let mut lease = Lease::held(store, record, options, version, before, Mark::default());
    // Before the mark moves: a start then restores no TXID a lost history has a record for.
    if let Err(e) = crate::verify::forget_checksums_past(store, tip).await {
        let _ = lease.release().await;
        return Err(e.into());
    }
    lease.txid = (tip > 0).then_some(tip);
    lease.txid_mac = store.record_mac(&mark::message(lease.txid));
    lease.release().await?;
    Ok(tip)
}

/// The pause before releasing the lease again after a failed attempt (doubled the second time).
const RELEASE_RETRY: Duration = Duration::from_millis(250);

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

fn expiry(expires: Instant, wall_expires_ms: i64, margin: Duration) -> Expiry {
    Expiry {
        at: expires.checked_sub(margin).unwrap_or(expires),
        at_ms: wall_expires_ms - margin.as_millis() as i64,
    }
}

fn expiry_ms(ttl: Duration) -> i64 {
    now_ms() + ttl.as_millis() as i64
}

/// Runs `work` while keeping `lease` alive: renews it whenever due (looking every tenth of the
/// TTL), so a long start-up — a large restore — does not let it lapse under a live instance.
/// A renewal that fails only because the store is unreachable is retried at the next look.
///
/// # Errors
/// [`LeaseError::Lost`] (or a malformed lease) when the lease was taken meanwhile: the work is
/// abandoned, since this instance may no longer write.
pub async fn keep_alive_while<F: std::future::Future>(lease: &mut Lease, work: F) -> Result<F::Output, LeaseError> {
    tokio::pin!(work);
    loop {
        let look = lease.ttl / 10;
        tokio::select! {
            out = &mut work => return Ok(out),
            () = tokio::time::sleep(look) => {
                if lease.needs_renewal() {
                    match lease.renew().await {
                        Ok(()) | Err(LeaseError::HandoverRequested { .. }) => {}
                        Err(LeaseError::Store(e)) => {
                            tracing::warn!(error = %e, "cannot renew the replica lease now; trying again shortly");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{Action, Faults, Op, Rule};

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

    /// A newcomer killed while it waited left its request behind. Before, the holder handed
    /// over to it whenever it next looked (an idle one: hours later, at its next write), and
    /// the next newcomer, finding a request there, never asked: it waited in vain.
    #[tokio::test]
    async fn a_stale_handover_request_is_ignored_and_replaced() {
        let store = Store::in_memory();
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        let (bytes, version) = store.get_object(OBJECT).await.unwrap().unwrap();
        let stale = Record {
            handover_requested_by: Some("gone".into()),
            handover_requested_at_ms: Some(now_ms() - STALE_REQUEST.as_millis() as i64 - 1_000),
            ..decode(&bytes).unwrap()
        };
        assert!(matches!(swap(&store, &stale, &version).await.unwrap(), Swap::Done(_)));
        a.check().await.unwrap();
        assert_eq!(a.handover_requested_by(), None, "the holder ignores it");
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { Lease::acquire(&store, "b", quick(60_000, 30_000)).await }
        });
        assert_eq!(requested_by(&store, "b").await, "b", "the next newcomer asks over it");
        let err = a.renew().await.unwrap_err();
        assert!(
            matches!(err, LeaseError::HandoverRequested { ref by } if by == "b"),
            "{err}"
        );
        a.release().await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().epoch(), 2);
    }

    /// Waits (up to 5 s) until the stored hand-over request names `who`.
    async fn requested_by(store: &Store, who: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(by) = stored(store).await.handover_requested_by.filter(|by| by == who) {
                return by;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "{who} never asked");
            tokio::time::sleep(Duration::from_millis(10)).await;
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
    async fn a_released_lease_is_taken_back_but_a_serving_newcomer_is_never_robbed() {
        let store = Store::in_memory();
        let options = quick(1000, 0);
        let a = Lease::acquire(&store, "a", options).await.unwrap();
        a.release().await.unwrap();
        let a = Lease::take_back(&store, "a", options)
            .await
            .unwrap()
            .expect("nobody took it");
        assert_eq!(a.epoch(), 2);
        assert!(stored(&store).await.serving, "taken back by an instance that serves");
        assert!(
            Lease::take_back(&store, "a", options).await.unwrap().is_none(),
            "held now"
        );
        a.release().await.unwrap();

        // A newcomer that takes it and serves keeps it, even once its lease lapses idle.
        let mut b = Lease::acquire(&store, "b", options).await.unwrap();
        b.mark_serving().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1400)).await;
        assert!(
            Lease::take_back(&store, "a", options).await.unwrap().is_none(),
            "a serving instance's idle lease is not taken back"
        );
        b.renew().await.unwrap();
        b.release().await.unwrap();

        // A newcomer that dies before serving lets it lapse: the old holder takes it back.
        let _c = Lease::acquire(&store, "c", options).await.unwrap();
        assert!(
            Lease::take_back(&store, "a", options).await.unwrap().is_none(),
            "still live"
        );
        // Past its stamped expiry by the TTL and the margin, as a newcomer takes a lease.
        tokio::time::sleep(Duration::from_millis(1000) + options.takeover_after() + Duration::from_millis(200)).await;
        let a = Lease::take_back(&store, "a", options)
            .await
            .unwrap()
            .expect("a newcomer that never served and lapsed");
        assert_eq!(a.epoch(), 5);
    }

    /// A hand-over whose release failed (the store did not answer) leaves the lease as it
    /// was, held by the instance that handed over. If the newcomer then dies before taking it,
    /// nobody ever writes again unless that instance takes its own lease back once it lapsed.
    /// Before, it never did: it stayed parked, refusing every write, for good.
    #[tokio::test]
    async fn a_lease_whose_release_failed_is_taken_back_once_it_lapsed_untaken() {
        let store = Store::in_memory();
        let options = quick(1000, 0);
        let mut a = Lease::acquire(&store, "a", options).await.unwrap();
        a.mark_serving().await.unwrap();
        drop(a);
        assert!(
            Lease::take_back(&store, "a", options).await.unwrap().is_none(),
            "not before it lapsed: a waiting newcomer may still take it"
        );
        assert!(
            Lease::take_back(&store, "b", options).await.unwrap().is_none(),
            "nobody else's to take back"
        );
        tokio::time::sleep(Duration::from_millis(1400)).await;
        assert!(
            Lease::take_back(&store, "a", options).await.unwrap().is_none(),
            "lapsed, but not for a whole TTL: a newcomer polling for it takes it first"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            Lease::take_back(&store, "b", options).await.unwrap().is_none(),
            "still nobody else's to take back"
        );
        let a = Lease::take_back(&store, "a", options)
            .await
            .unwrap()
            .expect("its own lease, lapsed and untaken");
        assert_eq!(a.epoch(), 2);
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
    fn old_records_still_parse_and_count_as_serving() {
        let old = br#"{"owner":"a","epoch":3,"expires_at_ms":5,"released":false}"#;
        let record = decode(old).unwrap();
        assert_eq!(record.handover_requested_by, None);
        assert!(record.serving, "nobody takes back a lease from an older keycast");
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

    /// An expired lease is taken over only once the skew margin has passed too; its old
    /// holder stops trusting it a margin *before* its own expiry. (The stored expiry is set
    /// directly, so that a loaded machine's late wake-ups cannot blur the margin.)
    async fn takeover(store: Store) {
        let options = quick(500, 0);
        let margin_ms = options.margin().as_millis() as i64;
        let mut a = Lease::acquire(&store, "a", options).await.unwrap();
        assert!(a.is_valid());
        tokio::time::sleep(Duration::from_millis(420)).await;
        assert!(!a.is_valid(), "the holder distrusts its lease a margin before expiry");
        let set_expiry = |expires_at_ms: i64| {
            let store = store.clone();
            async move {
                let (bytes, version) = store.get_object(OBJECT).await.unwrap().unwrap();
                let record = Record {
                    expires_at_ms,
                    ..decode(&bytes).unwrap()
                };
                let _ = store
                    .put_object_update(OBJECT, encode(&record), &version)
                    .await
                    .unwrap();
            }
        };
        // The newcomer judges by its own margin; a long one (2 s) keeps "expired, but within
        // the margin" true however late a loaded machine runs the next line.
        let newcomer = quick(10_000, 0);
        let newcomer_margin_ms = newcomer.margin().as_millis() as i64;
        assert!(newcomer_margin_ms > margin_ms);
        // Expired by the wall clock, but within the margin: not free yet.
        set_expiry(now_ms() - newcomer_margin_ms / 2).await;
        let early = Lease::acquire(&store, "b", newcomer).await.unwrap_err();
        assert!(matches!(early, LeaseError::Held { .. }), "{early}");
        // Past the margin, but not yet watched for a TTL: not free yet either.
        set_expiry(now_ms() - 2 * newcomer_margin_ms).await;
        let unwatched = Lease::acquire(&store, "b", newcomer).await.unwrap_err();
        assert!(matches!(unwatched, LeaseError::Held { .. }), "{unwatched}");
        // Its stamp is 4 s past; free once 12 s past (a second may have gone by meanwhile).
        let said = unwatched.to_string();
        assert!(
            said.contains("free to take within 8 s") || said.contains("free to take within 7 s"),
            "{said}"
        );
        // Stamped expired a TTL and the margin ago (a crash before this start): taken at once.
        set_expiry(now_ms() - newcomer.takeover_after().as_millis() as i64 - 2 * newcomer_margin_ms).await;
        let b = Lease::acquire(&store, "b", newcomer).await.unwrap();
        assert_eq!(b.epoch(), 2, "an expired lease is taken over");
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref by } if by.contains('b')), "{err}");
    }

    /// A holder whose wall clock runs behind the newcomer's stamps an expiry that looks past
    /// to the newcomer while the holder still trusts its lease (its own clocks say so). The
    /// newcomer takes it only after watching it unchanged for a TTL and the margin: by then
    /// the holder has stopped trusting it. Before, it was taken at once, and both wrote.
    #[tokio::test]
    async fn a_holder_whose_clock_is_behind_is_not_robbed_while_it_trusts_its_lease() {
        let store = Store::in_memory();
        let options = quick(1000, 5000);
        let a = Lease::acquire(&store, "a", options).await.unwrap();
        // What a holder a TTL behind writes: an expiry at the newcomer's now, a TTL early.
        // Before, a margin later it was taken, while the holder trusted it for most of a TTL.
        rewrite_stored(&store, |r| Record {
            expires_at_ms: now_ms(),
            ..r
        })
        .await;
        let started = Instant::now();
        let taking = tokio::spawn({
            let store = store.clone();
            async move { Lease::acquire(&store, "b", options).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(a.is_valid(), "the holder trusts its lease");
        assert!(!taking.is_finished(), "the newcomer took a lease its holder trusts");
        let b = taking.await.unwrap().unwrap();
        assert!(!a.is_valid(), "taken only once the holder stopped trusting it");
        assert!(started.elapsed() >= options.ttl + options.margin());
        assert_eq!(b.epoch(), 2);
    }

    /// A holder whose wall clock runs an hour ahead stamps an expiry an hour away. Before,
    /// every newcomer waited that hour (or gave up) after the holder died. Now it watches
    /// the record for a TTL and the margin, and takes it once the holder's own clocks have
    /// told it to stop trusting it.
    #[tokio::test]
    async fn a_holder_whose_clock_is_ahead_keeps_no_one_out_for_longer_than_a_ttl() {
        let store = Store::in_memory();
        let options = quick(1000, 5000);
        let a = Lease::acquire(&store, "a", options).await.unwrap();
        rewrite_stored(&store, |r| Record {
            expires_at_ms: now_ms() + 3_600_000,
            ..r
        })
        .await;
        let b = Lease::acquire(&store, "b", options).await.unwrap();
        assert!(!a.is_valid(), "taken only once the holder stopped trusting it");
        assert_eq!(b.epoch(), 2);
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

    /// Every lease write whose answer is lost after the store applied it — creating, taking
    /// over, renewing, releasing — is recognised by reading the lease back, not mistaken for
    /// a failure or for another instance's lease.
    #[tokio::test]
    async fn lease_writes_whose_answer_was_lost_are_recognised_as_done() {
        let faults = Faults::new();
        let store = Store::in_memory().with_faults(&faults);
        let lose_next_put = || faults.add(Rule::new(Op::Put, Action::LoseResponse).key("lease").times(1));

        lose_next_put();
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        assert_eq!((stored(&store).await.owner.as_str(), a.epoch()), ("a", 1));

        lose_next_put();
        a.renew().await.expect("a renewal that was applied is a renewal");
        a.renew().await.expect("and the next one uses the right version");

        lose_next_put();
        a.release().await.expect("a release that was applied is a release");
        assert!(stored(&store).await.released);

        lose_next_put();
        let b = Lease::acquire(&store, "b", quick(60_000, 0)).await.unwrap();
        assert_eq!(b.epoch(), 2, "taking a released lease, answer lost: taken once");

        // A failure that never reached the store stays a failure. (Within the same
        // millisecond the renewal would write exactly what is stored, which counts as done.)
        tokio::time::sleep(Duration::from_millis(5)).await;
        faults.add(Rule::new(Op::Put, Action::Fail).key("lease").times(1));
        let mut b = b;
        let failed = b.renew().await;
        assert!(matches!(failed, Err(LeaseError::Store(_))), "{failed:?}");
        b.renew().await.unwrap();
    }

    /// A newcomer's hand-over request applied, its answer lost, and the read that would
    /// tell failed too. Before, the newcomer gave up at once (a failed deploy), leaving its
    /// request behind: the holder handed over to nobody, refused writes, and took the lease
    /// back a TTL later. Now it looks again and waits for the hand-over it asked for.
    #[tokio::test]
    async fn a_newcomer_whose_request_had_an_unknown_outcome_waits_on() {
        let faults = Faults::new();
        let store = Store::in_memory().with_faults(&faults);
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        faults.add(
            Rule::new(Op::Put, Action::LoseResponse)
                .body("\"handover_requested_by\":\"b\"")
                .times(1),
        );
        // The newcomer's first read goes through; the read-back after its request fails.
        faults.add(Rule::new(Op::Get, Action::Delay(Duration::ZERO)).key("lease").times(1));
        faults.add(Rule::new(Op::Get, Action::Fail).key("lease").times(1));
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { Lease::acquire(&store, "b", quick(60_000, 5_000)).await }
        });
        // Both faults hit the newcomer (the test's own reads come after).
        let started = Instant::now();
        while !faults.spent() {
            assert!(started.elapsed() < Duration::from_secs(5), "the faults never fired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(requested_by(&store, "b").await, "b");
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::HandoverRequested { .. }), "{err}");
        a.release().await.unwrap();
        let b = waiter
            .await
            .unwrap()
            .expect("the newcomer takes the lease it asked for");
        assert_eq!(b.epoch(), 2);
    }

    /// A release whose request failed once (a timeout, a 503). Before, it was given up at
    /// once: the newcomer waiting for the lease waited out the TTL and its margin, while the
    /// instance handing over already refused every write.
    #[tokio::test]
    async fn a_release_that_failed_once_is_tried_again() {
        let faults = Faults::new();
        let store = Store::in_memory().with_faults(&faults);
        let a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        faults.add(Rule::new(Op::Put, Action::Fail).body("\"released\":true").times(1));
        a.release().await.unwrap();
        assert!(stored(&store).await.released);
    }

    /// A renewal whose request failed, and whose read-back finds another instance's record
    /// where the version it renewed from was: the lease was taken (say, while this holder
    /// was paused). Before, what was read was thrown away with the failure: the holder, still
    /// valid by its clocks, went on writing and acknowledging for up to a TTL on a lease it
    /// had seen another hold. A failure that changed nothing stays a failure to retry.
    #[tokio::test]
    async fn a_failed_renewal_that_reads_another_holder_is_lost() {
        let faults = Faults::new();
        let store = Store::in_memory().with_faults(&faults);
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        // (Within the same millisecond the renewal would write exactly what is stored.)
        tokio::time::sleep(Duration::from_millis(5)).await;
        faults.add(Rule::new(Op::Put, Action::Fail).key("lease").times(1));
        let failed = a.renew().await;
        assert!(matches!(failed, Err(LeaseError::Store(_))), "{failed:?}");

        let (bytes, version) = store.get_object(OBJECT).await.unwrap().unwrap();
        let taken = Record {
            owner: "b".into(),
            epoch: 2,
            ..decode(&bytes).unwrap()
        };
        assert!(matches!(swap(&store, &taken, &version).await.unwrap(), Swap::Done(_)));
        faults.add(Rule::new(Op::Put, Action::Fail).key("lease").times(1));
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { ref by } if by.contains('b')), "{err}");
    }

    /// Two processes may share a host name and a PID (two containers, PID 1 each, both
    /// `localhost`): with distinct owner strings the second asks for a hand-over instead of
    /// taking a live lease.
    #[tokio::test]
    async fn a_second_instance_never_takes_a_live_lease() {
        let store = Store::in_memory();
        let mut a = Lease::acquire(&store, "localhost-1#aaaa", quick(60_000, 0))
            .await
            .unwrap();
        let err = Lease::acquire(&store, "localhost-1#bbbb", quick(60_000, 300))
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        a.renew().await.unwrap();
        assert_eq!(a.epoch(), 1);
    }

    #[tokio::test]
    async fn the_high_water_mark_travels_with_the_lease() {
        let store = Store::in_memory();
        let mut a = Lease::acquire(&store, "a", quick(60_000, 0)).await.unwrap();
        assert_eq!(a.previous_txid(), None);
        a.note_txid(7);
        a.note_txid(5);
        a.renew().await.unwrap();
        assert_eq!(recorded_txid(&store).await.unwrap(), Some(7));
        a.note_txid(9);
        a.release().await.unwrap();
        let b = Lease::acquire(&store, "b", quick(60_000, 0)).await.unwrap();
        assert_eq!(b.previous_txid(), Some(9));
        assert_eq!(
            recorded_txid(&store).await.unwrap(),
            Some(9),
            "carried into the new lease"
        );
    }

    fn encrypted() -> Store {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        Store::in_memory().with_encryption(crate::crypt::ObjectCipher::from_base64(key).unwrap())
    }

    /// Rewrites the stored lease as whoever holds the bucket can: without the key.
    async fn rewrite_stored(store: &Store, change: impl FnOnce(Record) -> Record) {
        let (bytes, version) = store.get_object(OBJECT).await.unwrap().unwrap();
        let record = change(decode(&bytes).unwrap());
        let updated = store
            .put_object_update(OBJECT, encode(&record), &version)
            .await
            .unwrap();
        assert!(matches!(updated, UpdateOutcome::Updated(_)));
    }

    async fn lower_the_mark(store: &Store, txid: u64) {
        rewrite_stored(store, |record| Record {
            txid: Some(txid),
            ..record
        })
        .await;
    }

    /// Stores a level-0 object at `txid` that is only an LTX header with writer stamp
    /// `node_id` (what the mark's check reads).
    async fn put_stamped(store: &Store, txid: u64, node_id: u64) {
        let header = crate::ltx::Header {
            flags: crate::ltx::FLAG_NO_CHECKSUM,
            page_size: 4096,
            commit: 4,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms: 1_700_000_000_000,
            node_id,
            ..crate::ltx::Header::default()
        };
        let put = store.put_ltx(0, txid, txid, Bytes::from(header.to_bytes().to_vec()), 0);
        assert_eq!(put.await.unwrap(), crate::store::PutOutcome::Created);
    }

    fn mark(txid: u64, authenticated: bool) -> Mark {
        Mark {
            txid: Some(txid),
            authenticated,
        }
    }

    #[tokio::test]
    async fn a_forged_mark_is_never_made_valid_by_the_holders_it_passes_through() {
        let store = encrypted();
        let options = quick(60_000, 1_000);
        let mut a = Lease::acquire(&store, "a", options).await.unwrap();
        a.note_txid(9);
        a.release().await.unwrap();
        let b = Lease::acquire(&store, "b", options).await.unwrap();
        assert_eq!(b.previous_mark(), mark(9, true));
        b.release().await.unwrap();

        lower_the_mark(&store, 5).await;
        // Taken over, then taken back: each holder writes the mark on as it found it.
        let c = Lease::acquire(&store, "c", options).await.unwrap();
        assert_eq!(c.previous_mark(), mark(5, false));
        c.release().await.unwrap();
        let c = Lease::take_back(&store, "c", options).await.unwrap().unwrap();
        assert_eq!(c.previous_mark(), mark(5, false));
        c.release().await.unwrap();
        let d = Lease::acquire(&store, "d", options).await.unwrap();
        assert_eq!(d.previous_mark(), mark(5, false));
        assert_eq!(
            recorded_txid(&store).await.unwrap(),
            Some(5),
            "an empty replica has nothing to refuse"
        );
    }

    #[tokio::test]
    async fn a_mark_without_a_valid_mac_is_refused_beside_objects_written_under_one() {
        let store = encrypted();
        let options = quick(60_000, 1_000);
        let mut a = Lease::acquire(&store, "a", options).await.unwrap();
        // An earlier keycast's replica: objects without the flag, a mark without a MAC.
        let earlier = 1_700_000_000_000;
        put_stamped(&store, 1, earlier).await;
        a.txid = Some(1);
        a.release().await.unwrap();

        // Upgraded: believed, and vouched for before anything flagged is written.
        let mut b = Lease::acquire(&store, "b", options).await.unwrap();
        assert_eq!(b.previous_mark(), mark(1, false));
        assert_eq!(b.confirm_mark().await.unwrap(), Some(1));
        assert!(stored(&store).await.mark(&store).authenticated, "vouched for at once");
        put_stamped(&store, 2, mark::stamp(1_700_000_000_001, earlier, true)).await;
        b.note_txid(2);
        b.release().await.unwrap();
        assert_eq!(recorded_txid(&store).await.unwrap(), Some(2));

        lower_the_mark(&store, 1).await;
        let refused = recorded_txid(&store).await;
        assert!(
            matches!(refused, Err(LeaseError::Mark(MarkError::Unauthenticated { .. }))),
            "{refused:?}"
        );
        let mut c = Lease::acquire(&store, "c", options).await.unwrap();
        assert!(matches!(c.confirm_mark().await, Err(LeaseError::Mark(_))));
        c.release().await.unwrap();

        // The operator takes what the replica holds, knowingly.
        assert_eq!(accept_loss(&store, "operator", options).await.unwrap(), 2);
        assert_eq!(recorded_txid(&store).await.unwrap(), Some(2));
        let mut d = Lease::acquire(&store, "d", options).await.unwrap();
        assert_eq!(d.confirm_mark().await.unwrap(), Some(2));
        // Not while an instance holds the lease.
        assert!(matches!(
            accept_loss(&store, "operator", options).await,
            Err(LeaseError::Held { .. })
        ));
    }

    /// A newcomer's hand-over request found by the renewal that was to write the MAC: the
    /// renewal answers with the request and writes nothing, and the mark stayed without a MAC
    /// while this holder went on to write objects that need one.
    #[tokio::test]
    async fn a_mark_is_vouched_for_even_when_a_handover_request_comes_first() {
        let store = encrypted();
        let mut a = Lease::acquire(&store, "a", quick(60_000, 1_000)).await.unwrap();
        let waiting = tokio::spawn({
            let store = store.reopen();
            async move { Lease::acquire(&store, "b", quick(60_000, 60_000)).await }
        });
        assert_eq!(requested(&store).await, "b");
        assert_eq!(a.confirm_mark().await.unwrap(), None);
        let record = stored(&store).await;
        assert!(record.mark(&store).authenticated, "{record:?}");
        assert_eq!(
            record.handover_requested_by.as_deref(),
            Some("b"),
            "the request is kept"
        );
        waiting.abort();
    }

    /// An upgrade whose new instance failed before it served, and the old one (an earlier
    /// keycast) took the replica back: its lease writes carry no MAC, and it follows the new
    /// instance's stamps with `stamp + 1`. Its objects say it wrote them, so the next start of
    /// the new version believes the mark instead of refusing every deploy.
    #[tokio::test]
    async fn a_mark_an_earlier_keycast_wrote_after_a_newer_one_is_believed() {
        let store = encrypted();
        let options = quick(60_000, 1_000);
        let new = mark::stamp(1_700_000_000_000, 0, true);
        put_stamped(&store, 1, new).await;
        let mut a = Lease::acquire(&store, "new", options).await.unwrap();
        a.note_txid(1);
        a.release().await.unwrap();
        // The earlier keycast: the lease rewritten without the MAC, an object stamped `+ 1`.
        let old = Lease::acquire(&store, "old", options).await.unwrap();
        rewrite_stored(&store, |record| Record {
            txid: Some(2),
            txid_mac: None,
            ..record
        })
        .await;
        put_stamped(&store, 2, new + 1).await;
        drop(old);
        assert_eq!(recorded_txid(&store).await.unwrap(), Some(2));
        // A second holding of the earlier keycast (a restart): `+ 1` again.
        lower_the_mark(&store, 3).await;
        put_stamped(&store, 3, new + 2).await;
        assert_eq!(recorded_txid(&store).await.unwrap(), Some(3));
    }

    /// What a start-up that deletes after a long restore relies on: a lease that could not be
    /// renewed meanwhile is seen to lapse by the work, though the store still names its holder.
    #[tokio::test]
    async fn a_lease_clock_sees_a_lease_lapse_that_could_not_be_renewed_and_one_released() {
        let faults = Faults::new();
        let store = Store::in_memory().with_faults(&faults);
        let mut a = Lease::acquire(&store, "a", quick(400, 0)).await.unwrap();
        let clock = a.clock();
        assert!(clock.is_valid());
        faults.add(Rule::new(Op::Put, Action::Fail));
        let work = async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            clock.is_valid()
        };
        assert!(!keep_alive_while(&mut a, work).await.unwrap(), "lapsed by the clocks");
        faults.clear();
        a.renew().await.unwrap();
        assert!(clock.is_valid(), "valid again once renewed");
        a.release().await.unwrap();
        assert!(!clock.is_valid(), "a released lease is nobody's to trust");
    }

    #[tokio::test]
    async fn keep_alive_while_renews_through_long_work() {
        let store = Store::in_memory();
        let mut a = Lease::acquire(&store, "a", quick(400, 0)).await.unwrap();
        let clock = a.clock();
        let work = async {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            clock.is_valid()
        };
        let valid_at_the_end = keep_alive_while(&mut a, work).await.unwrap();
        assert!(valid_at_the_end, "the work sees the renewals");
        assert!(a.is_valid(), "renewed throughout");
        let err = Lease::acquire(&store, "b", quick(60_000, 0)).await.unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "nobody could take it: {err}");
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
            wall_expires_ms: now_ms() + 10_000,
            check_interval: DEFAULT_CHECK_INTERVAL,
            checked: Instant::now(),
            handover: None,
            serving: false,
            txid: None,
            txid_mac: None,
            previous: Mark::default(),
            clock: watch::Sender::new(expiry(Instant::now(), 0, Duration::ZERO)),
        };
        assert!(!lease.needs_renewal());
        let late = Lease {
            expires: Instant::now() + Duration::from_secs(4),
            ..lease
        };
        assert!(late.needs_renewal());
    }
}
