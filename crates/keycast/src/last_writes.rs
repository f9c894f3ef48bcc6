//! What an instance writes before it hands the replica over (SQLite), through the
//! replicator's `Monitor::before_handover` hooks: what it holds only in memory and the
//! newcomer must not be without. From the hand-over's write lock on nothing can commit here.
//! Shutdown writes the same (see `serve::shut_down`): the next instance may start within the
//! minute a relay replays.
//!
//! - The signing activity not yet written (about a second's worth), once the requests under
//!   way have recorded theirs: the newcomer counts those signatures against the grants'
//!   limits, and the owner sees them.
//! - The NIP-46 requests seen lately (`keycast_db::nip46_seen`): a relay that keeps ephemeral
//!   events replays the last minute's requests to the newcomer's subscription, and the
//!   newcomer must not answer them a second time.

use std::sync::Arc;
use std::time::Duration;

use keycast_core::nostr::PublicKey;
use keycast_core::Signer;
use keycast_db::{Db, EngineKind};
use keycast_nip46::{Nip46Service, SeenRequests};
use keycast_replica::replicator::Monitor;

/// How long a hand-over waits for the signing requests under way (see
/// `keycast_core::in_flight`), within the replicator's own limit on its last writes.
const DRAIN: Duration = Duration::from_secs(3);
const _: () = assert!(DRAIN.as_millis() < keycast_replica::BEFORE_HANDOVER_LIMIT.as_millis());

/// The most NIP-46 requests a hand-over passes on: two minutes of requests at over 800 a
/// second. Past this many, a relay's replay of the rest may be answered twice.
const SEEN_HANDED_OVER: usize = 100_000;

/// Registers the signer's last write: wait for the requests under way, then flush.
pub fn hand_over_activity(monitor: &Monitor, signer: &Arc<Signer>) {
    let signer = signer.clone();
    monitor.before_handover(Arc::new(move || {
        let signer = signer.clone();
        Box::pin(async move {
            if !signer.drain(DRAIN).await {
                tracing::warn!("requests under way did not end before the hand-over; their activity may be missing");
            }
            if let Err(err) = signer.flush().await {
                tracing::warn!(error = %err, pending = signer.pending_activity(), "could not write signing activity before handing over");
            }
        })
    }));
}

/// Registers the write of the NIP-46 requests `service` has seen, for the next instance.
pub fn hand_over_seen_requests(monitor: &Monitor, service: &Nip46Service, db: &Db) {
    let (seen, db) = (service.seen(), db.clone());
    monitor.before_handover(Arc::new(move || {
        let (seen, db) = (seen.clone(), db.clone());
        Box::pin(async move { write_seen_requests(&seen, &db).await })
    }));
}

/// Writes the NIP-46 requests seen lately for the next instance on this database (SQLite; on
/// PostgreSQL the instances share `nip46_claims` instead).
pub async fn write_seen_requests(seen: &SeenRequests, db: &Db) {
    if db.kind() != EngineKind::Sqlite {
        return;
    }
    let entries: Vec<(String, String)> = seen
        .entries()
        .into_iter()
        .take(SEEN_HANDED_OVER)
        .map(|(client, id)| (client.to_hex(), id))
        .collect();
    if let Err(err) = keycast_db::nip46_seen::replace(db, &entries, keycast_db::now_unix()).await {
        tracing::warn!(error = %err, "could not pass the NIP-46 requests seen on; a relay's replay may be answered twice");
    }
}

/// The NIP-46 requests the previous instance on this database had seen when it handed the
/// replica over or stopped (SQLite).
pub async fn seen_before(db: &Db) -> Vec<(PublicKey, String)> {
    if db.kind() != EngineKind::Sqlite {
        return Vec::new();
    }
    let since = keycast_db::now_unix() - keycast_nip46::DEDUP_WINDOW.as_secs() as i64;
    match keycast_db::nip46_seen::since(db, since).await {
        Ok(rows) => rows
            .into_iter()
            .filter_map(|(client, id)| Some((PublicKey::from_hex(&client).ok()?, id)))
            .collect(),
        Err(err) => {
            tracing::warn!(error = %err, "could not read the NIP-46 requests the previous instance had seen; a relay's replay may be answered twice");
            Vec::new()
        }
    }
}
