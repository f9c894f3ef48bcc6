//! The lease as the replicator uses it — checked before writes, renewed while work is under
//! way, confirmed after uploads — and the hand-over: shipping everything to make way for a
//! starting instance, taking the replica back when nobody took it, and the final sync.
//!
//! # Hand-over
//! When a starting instance asks for the lease (see [`crate::lease`]), the replicator learns
//! it before a write or a shipment and hands over: writes are refused from that moment, the
//! application writes what it holds only in memory (`Monitor::before_handover`), the worker
//! ships what is committed, takes SQLite's write lock (`BEGIN IMMEDIATE`) so no commit
//! can slip in, ships the tail, releases the lease, and then keeps the lock until shutdown:
//! nothing can commit locally any more, so nothing acknowledged is left behind. Durable waits
//! for commits made before the lock succeed; a write that raced the hand-over gets an error.
//! The lease is renewed throughout, so a slow store cannot make it lapse half way.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::worker::Worker;
use super::{ReplicaError, Shared};
use crate::lease::{Lease, LeaseError, LeaseOptions};
use crate::local_state;

/// What the lease is kept for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Keep {
    /// Before a write or an upload in normal operation: renew when due, refuse once a
    /// hand-over is under way or was asked for. (Looking for new requests is the keeper's
    /// job, so that a slow store never delays a write by a lease read.)
    Writing,
    /// During the hand-over's (or the final sync's) shipments: only renew when due.
    HandingOver,
}

/// A lease released by a hand-over, and when.
pub(super) struct Released {
    pub(super) owner: String,
    pub(super) options: LeaseOptions,
    pub(super) at: Instant,
}

impl Shared {
    /// Before a write or an upload: renews the lease when due; no request otherwise.
    /// A renewal that fails because the store is unreachable does not stop anything while the
    /// lease is still valid by the clocks — nobody can take it before it runs out — and stops
    /// everything once it is not: fail closed.
    ///
    /// # Errors
    /// [`ReplicaError::HandingOver`] once a starting instance asked for the replica;
    /// [`ReplicaError::LeaseLost`] (this instance is then fenced);
    /// [`ReplicaError::LeaseUnconfirmed`].
    pub(super) async fn keep_lease(&self, keep: Keep) -> Result<(), ReplicaError> {
        let writing = matches!(keep, Keep::Writing);
        if writing {
            if let Some(to) = self.handing_over_to() {
                return Err(ReplicaError::HandingOver { to });
            }
        }
        let mut lease = self.lease.lock().await;
        let Some(held) = lease.as_mut() else {
            return Ok(());
        };
        if let (true, Some(to)) = (writing, held.handover_requested_by()) {
            let to = to.to_owned();
            self.begin_handover(&to);
            return Err(ReplicaError::HandingOver { to });
        }
        let result = match held.needs_renewal() {
            true => held.renew().await,
            false => Ok(()),
        };
        self.note_lease(held);
        match result {
            Ok(()) => {
                self.lease_confirmed();
                Ok(())
            }
            Err(LeaseError::HandoverRequested { by }) if writing => {
                self.begin_handover(&by);
                Err(ReplicaError::HandingOver { to: by })
            }
            Err(LeaseError::HandoverRequested { .. }) => Ok(()),
            Err(LeaseError::Lost { by }) => Err(self.lost(by)),
            Err(e) if held.is_valid() => {
                tracing::warn!(error = %e, "cannot renew the replica lease now; it is still valid, going on");
                Ok(())
            }
            Err(e) => {
                self.lease_failed(&e.to_string());
                Err(ReplicaError::LeaseUnconfirmed { reason: e.to_string() })
            }
        }
    }

    /// After an upload landed: it counts only if the lease was still ours when it did. While
    /// the lease is valid by the clocks that is certain; otherwise the lease is read — ours
    /// at the time of reading means ours when the upload landed before it.
    ///
    /// # Errors
    /// [`ReplicaError::LeaseLost`] (fenced); [`ReplicaError::LeaseUnconfirmed`] when the
    /// lease cannot be read (the upload is then retried, and recognised as ours).
    pub(super) async fn confirm_after_put(&self) -> Result<(), ReplicaError> {
        let mut lease = self.lease.lock().await;
        match lease.as_mut() {
            Some(held) if !held.is_valid() => self.read_lease(held).await,
            _ => Ok(()),
        }
    }

    /// Reads the lease (one GET): the truth about who may write, when an outcome is unknown.
    ///
    /// # Errors
    /// As [`Shared::confirm_after_put`].
    pub(super) async fn check_lease(&self) -> Result<(), ReplicaError> {
        let mut lease = self.lease.lock().await;
        match lease.as_mut() {
            Some(held) => self.read_lease(held).await,
            None => Ok(()),
        }
    }

    /// The lease was taken by `by` while this instance did not look. With commits not yet
    /// shipped, they can never be (fenced). With none, nothing is lost: this instance merely
    /// lapsed while idle, and steps aside exactly as after a hand-over (see
    /// [`Worker::step_aside`]) — able to take the replica back if its taker never serves.
    pub(super) fn lost(&self, by: String) -> ReplicaError {
        if self.signal.commits() > *self.shipped.borrow() {
            self.fence(format!(
                "the replica lease was taken over by {by} while commits were not yet replicated"
            ));
            return ReplicaError::LeaseLost { by };
        }
        {
            let mut status = self.status.lock().expect("status lock");
            if status.fenced || status.superseded {
                return ReplicaError::HandingOver { to: by };
            }
            status.superseded = true;
            status.handing_over_to = Some(by.clone());
        }
        metrics::gauge!("keycast_replica_handing_over").set(1.0);
        tracing::warn!(%by, "this instance's lease lapsed while it was idle and another instance took it: stepping aside (nothing was unreplicated)");
        self.signal.wake();
        ReplicaError::HandingOver { to: by }
    }

    async fn read_lease(&self, held: &mut Lease) -> Result<(), ReplicaError> {
        let result = held.check().await;
        self.note_lease(held);
        match result {
            Ok(()) => {
                self.lease_confirmed();
                Ok(())
            }
            Err(LeaseError::HandoverRequested { by }) => {
                self.begin_handover(&by);
                Ok(())
            }
            Err(LeaseError::Lost { by }) => {
                self.fence(format!("the replica lease was taken over by {by}"));
                Err(ReplicaError::LeaseLost { by })
            }
            Err(e) => {
                self.lease_failed(&e.to_string());
                Err(ReplicaError::LeaseUnconfirmed { reason: e.to_string() })
            }
        }
    }
}

/// While the worker is busy (a round, a hand-over, the final sync), while the instance has
/// not yet started serving, and while the lease could not be confirmed: renews the lease when
/// due, so a slow upload, compaction, verification or start-up cannot let it lapse under a
/// live instance (a start-up's lapsed lease was taken back by the instance it came from), and
/// a store that failed a renewal is asked again until it answers; otherwise reads it once per
/// check interval to notice a hand-over request within about a second while writes go on
/// ([`Lease::keep`]). While idle and serving it does nothing, so an idle instance makes no
/// requests.
pub(super) async fn keep_lease_while_busy(shared: Arc<Shared>) {
    let look = match shared.lease.lock().await.as_ref() {
        Some(lease) => (lease.options().ttl / 10).min(lease.options().check_interval),
        None => return,
    };
    loop {
        tokio::time::sleep(look).await;
        let failing = shared.lease_failing.lock().expect("lease failing").is_some();
        let mut lease = shared.lease.lock().await;
        let Some(held) = lease.as_mut() else {
            continue;
        };
        if shared.busy.load(Ordering::SeqCst) == 0 && held.is_serving() && !failing {
            continue;
        }
        let result = held.keep().await;
        shared.note_lease(held);
        match result {
            Ok(()) => shared.lease_confirmed(),
            Err(LeaseError::HandoverRequested { by }) => shared.begin_handover(&by),
            Err(LeaseError::Lost { by }) => {
                shared.lost(by);
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the replica lease now; trying again shortly"),
        }
    }
}

impl Worker {
    /// Hands the replica over to `to`: ships what is committed, then under SQLite's write
    /// lock (so no commit can land after it) ships the tail, then releases the lease. The lock
    /// stays held until shutdown. Store failures are retried until shutdown's deadline.
    ///
    /// # Errors
    /// Fenced or lost lease; the last store error when shutdown's deadline passed.
    pub(super) async fn hand_over(
        &mut self,
        to: &str,
        stop: &watch::Receiver<Option<Instant>>,
    ) -> Result<(), ReplicaError> {
        self.handing_over = true;
        let _busy = self.shared.busy();
        // Compaction deletes objects: it must be over before the newcomer may restore.
        self.stop_compaction().await;
        self.shared.write_before_handover(to).await;
        let mut backoff = self.options.retry_min;
        loop {
            let shipped = async {
                self.sync_all().await?;
                self.lock().await?;
                self.sync_all().await
            }
            .await;
            match shipped {
                Ok(_) => break,
                Err(e) if e.is_fatal() => {
                    self.shared.fence(e.to_string());
                    return Err(e);
                }
                Err(e) => {
                    if stop
                        .borrow()
                        .is_some_and(|deadline| Instant::now() + backoff >= deadline)
                    {
                        tracing::error!(error = %e, txid = self.cursor.txid, %to, "the hand-over could not ship the last commits; they are only on local disk");
                        return Err(e);
                    }
                    self.note_failure(&e);
                    self.reset_transactions().await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
        let txid = self.cursor.txid;
        if let Some(lease) = self.shared.lease.lock().await.take() {
            let released = Released {
                owner: lease.owner().to_owned(),
                options: lease.options(),
                at: Instant::now(),
            };
            // Remembered either way: should the newcomer die before taking it, the lease is
            // taken back once it lapsed (see `take_back`), released or not.
            let by = stop
                .borrow()
                .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(1));
            if let Err(e) = lease.release_by(by).await {
                tracing::warn!(error = %e, "could not release the replica lease; the newcomer takes it when it lapses");
            }
            self.released = Some(released);
        }
        *self.shared.lease_view.lock().expect("lease view") = None;
        self.handed_over = true;
        {
            let mut status = self.shared.status.lock().expect("status lock");
            status.handed_over_txid = Some(txid);
            status.last_error = None;
            status.failing_since = None;
        }
        // Wake durable waiters: theirs is shipped, or will never be.
        self.shared.shipped.send_modify(|_| {});
        metrics::counter!("keycast_replica_handovers_total").increment(1);
        tracing::info!(%to, txid, "handed the replica over: every committed transaction is in the replica; this instance accepts no more writes");
        Ok(())
    }

    /// After [`Shared::lost`] decided this instance merely lapsed: take SQLite's write lock (no
    /// commit can land from now on), make sure nothing committed is unshipped, and park as if
    /// handed over. A commit that slipped in meanwhile can never ship: fenced.
    ///
    /// # Errors
    /// [`ReplicaError::LeaseLost`] when a commit slipped in; SQLite errors.
    pub(super) async fn step_aside(&mut self) -> Result<(), ReplicaError> {
        self.stop_compaction().await;
        let lease = self.shared.lease.lock().await.take();
        *self.shared.lease_view.lock().expect("lease view") = None;
        self.lock().await?;
        let nothing_unshipped = self.pending.is_empty() && matches!(self.read_next_segment_now().await?, Ok(None));
        let to = self.shared.handing_over_to().unwrap_or_default();
        if !nothing_unshipped {
            self.shared.fence(format!(
                "the replica lease was taken over by {to} while a commit was not yet replicated"
            ));
            return Err(ReplicaError::LeaseLost { by: to });
        }
        self.released = lease.map(|lease| Released {
            owner: lease.owner().to_owned(),
            options: lease.options(),
            at: Instant::now(),
        });
        self.handed_over = true;
        self.shared.status.lock().expect("status lock").handed_over_txid = Some(self.cursor.txid);
        self.shared.shipped.send_modify(|_| {});
        tracing::info!(%to, txid = self.cursor.txid, "stepped aside: every committed transaction is in the replica; this instance accepts no more writes");
        Ok(())
    }

    /// Gives back a lease taken back for nothing and stops writing for good: only a new
    /// instance, which restores first, may write now.
    async fn refuse_take_back(&mut self, lease: Lease, reason: String) {
        let _ = lease.release().await;
        self.released = None;
        self.shared.fence(reason);
    }

    /// Once a TTL after a hand-over: if nobody holds the lease any more — the instance that
    /// asked was stopped before it took over, or took it but died (or was stopped) before it
    /// served — take it back. Resume as the writer if the replica is exactly where this
    /// instance left it (the write lock was held throughout, so the local database is that
    /// state); if the replica moved on, this instance is behind for good: give the lease back
    /// and fence, so the platform replaces it with one that restores first.
    ///
    /// # Errors
    /// SQLite errors when releasing the write lock.
    pub(super) async fn take_back(&mut self) -> Result<(), ReplicaError> {
        let Some(released) = self.released.as_mut() else {
            return Ok(());
        };
        released.at = Instant::now();
        let (owner, options) = (released.owner.clone(), released.options);
        let lease = match Lease::take_back(&self.store, &owner, options).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot look at the replica lease after the hand-over; trying again in a TTL");
                return Ok(());
            }
        };
        let remote = match self.store.list_all().await {
            Ok(files) => files.iter().map(|f| f.max_txid).max().unwrap_or(0),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the replica after taking the lease back; giving it back");
                let _ = lease.release().await;
                return Ok(());
            }
        };
        // The replica "exactly where this instance left it" may be one whose newer objects
        // were deleted and whose lease was made to look released: the mark the lease carried
        // says how far it reached, once it is believed (see `crate::mark`).
        let short_of_mark = match crate::mark::trusted(&self.store, lease.previous_mark()).await {
            Ok(mark) => mark.filter(|m| *m > self.cursor.txid),
            Err(crate::mark::MarkError::Store(e)) => {
                tracing::warn!(error = %e, "cannot read the replica after taking the lease back; giving it back");
                let _ = lease.release().await;
                return Ok(());
            }
            Err(e) => {
                self.refuse_take_back(lease, format!("not taking the replica back: {e}"))
                    .await;
                return Ok(());
            }
        };
        let to = self.shared.handing_over_to().unwrap_or_default();
        if let Some(mark) = short_of_mark {
            let reason = format!(
                "not taking the replica back: its lease records TXID {mark} as replicated, past TXID {} where this instance handed it over, but the replica reaches only TXID {remote}: its newest objects are missing",
                self.cursor.txid
            );
            self.refuse_take_back(lease, reason).await;
            return Ok(());
        }
        if remote != self.cursor.txid {
            let reason = format!(
                "the replica moved on to TXID {remote} after this instance handed it over at TXID {}: its database is behind, and only a new instance (which restores first) may write",
                self.cursor.txid
            );
            self.refuse_take_back(lease, reason).await;
            return Ok(());
        }
        let epoch = lease.epoch();
        // A new holding, a new stamp: past any the instance that asked may have used.
        self.writer = super::worker::next_writer(self.writer, &self.store);
        self.shared.note_lease(&lease);
        *self.shared.lease.lock().await = Some(lease);
        self.shared.lease_confirmed();
        {
            let mut status = self.shared.status.lock().expect("status lock");
            status.handing_over_to = None;
            status.handed_over_txid = None;
            status.superseded = false;
        }
        self.released = None;
        self.handing_over = false;
        self.handed_over = false;
        // The next hand-over writes its own last rows.
        *self.shared.before_handover_ran.lock().await = false;
        metrics::gauge!("keycast_replica_handing_over").set(0.0);
        tracing::warn!(%to, epoch, txid = self.cursor.txid, "the instance that asked for the replica never served: taking it back and resuming as its writer");
        self.unlock().await
    }

    /// Final sync, retried until `deadline`; then the clean-stop record, the lease released,
    /// and closed connections.
    pub(super) async fn finish(mut self, deadline: Instant) -> Result<u64, ReplicaError> {
        // No compaction outlives the instance, nor races the final sync for the store.
        self.stop_compaction().await;
        let fenced = self.shared.status.lock().expect("status lock").fence_reason.clone();
        if let Some(reason) = fenced {
            tracing::warn!(%reason, txid = self.cursor.txid, "fenced: nothing more is shipped");
            let txid = self.cursor.txid;
            self.close_connections().await;
            return Err(ReplicaError::Fenced { txid: txid + 1 });
        }
        let _busy = self.shared.busy();
        if self.shared.handing_over_to().is_some() {
            // Asked to hand over while stopping: the final sync is the hand-over.
            self.handing_over = true;
        }
        let mut backoff = self.options.retry_min;
        while !self.handed_over {
            match self.sync_all().await {
                Ok(_) => break,
                Err(e) if e.is_fatal() => {
                    self.shared.fence(e.to_string());
                    return Err(e);
                }
                // Asked for just as the stop began: this sync is the hand-over all the same.
                // (Refused as a write instead, it was retried until the deadline, and the
                // stop reported the last commits as left on local disk.)
                Err(ReplicaError::HandingOver { .. }) if !self.handing_over => {
                    self.handing_over = true;
                    self.reset_transactions().await;
                }
                Err(e) if Instant::now() + backoff >= deadline => {
                    tracing::error!(error = %e, txid = self.cursor.txid, "final sync failed; the last commits are only on local disk");
                    return Err(e);
                }
                Err(e) => {
                    self.note_failure(&e);
                    self.reset_transactions().await;
                    tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
        let mut record = self.record(true);
        if let Some(mut lease) = self.shared.lease.lock().await.take() {
            lease.note_txid(self.cursor.txid);
            match lease.release_by(deadline).await {
                Ok(()) => tracing::info!("released the replica lease"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the replica lease; a successor waits for it to expire")
                }
            }
        }
        let (db, page_size, txid) = (self.db.clone(), self.cursor.page_size, self.cursor.txid);
        self.fold_wal_on_close().await?;
        self.close_connections().await;
        // If ours were the last connections, SQLite folded the WAL into the file and removed
        // it; the file alone is then the state at this TXID, and its checksum proves it later.
        if !crate::segment::wal_path(&db).exists() {
            record.db_checksum = crate::checksum::database_checksum_path(&db, page_size).ok();
        }
        local_state::store(&db, &record)?;
        Ok(txid)
    }
}
