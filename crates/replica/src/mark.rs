//! The replica's high-water mark, and why a restore may believe it.
//!
//! The lease records the highest TXID its holder knew to be in the replica (see
//! `Lease::note_txid`): a restore that reaches less knows the newest objects were deleted and
//! refuses, instead of silently serving an older state — a revoked grant live again, an old
//! password back. Whoever can write the bucket could otherwise delete the newest objects and
//! lower the mark to match.
//!
//! On an encrypted replica the mark therefore carries a MAC under the replica key
//! (`txid_mac` in `keycast/lease.json`), and every object keycast writes says so: its writer
//! stamp (the LTX header's node ID, authenticated with the rest of the object) has
//! [`MARK_AUTHENTICATED`] set and is a multiple of [`STAMP_STEP`] ([`written_under_a_mac`]).
//! A mark without a valid MAC is believed only while the newest object is not so stamped: a
//! replica written by a keycast from before the MAC (an upgrade), or by one that took it over
//! since (a rollback, or a failed deploy's old instance taking the replica back: it follows
//! the newest stamp with `stamp + 1`, and writes the lease without the MAC). Otherwise the
//! restore is refused, and `keycast replica accept-loss` is the way to take the older state
//! knowingly — also after an earlier keycast held the replica without writing an object, which
//! nothing tells from a stripped MAC.
//!
//! What this cannot tell: a genuine older lease object put back together with the deletion
//! (a replay; object versioning or a retention lock on the bucket prevents it), and the
//! objects past the mark, which trails the replica's tip by up to a lease renewal. On an
//! unencrypted replica nothing can be authenticated: whoever writes the bucket can write
//! any state into it.

use crate::ltx::{Header, HEADER_SIZE};
use crate::store::{Store, StoreError};

/// Set in the writer stamp of every object keycast writes to an encrypted replica, since the
/// lease's mark carries a MAC. Above any millisecond clock reading, so stamps keep increasing
/// across the upgrade.
pub const MARK_AUTHENTICATED: u64 = 1 << 62;

/// Stamps of a keycast that authenticates the mark are multiples of this. An earlier keycast
/// that takes the replica over follows the newest stamp with `stamp + 1` (its clock is far
/// below the flag), once per holding: a thousand holdings in a row before one lands on a
/// multiple again.
pub const STAMP_STEP: u64 = 1024;

/// Whether an object with writer stamp `stamp` was written by a keycast that authenticates
/// the lease's mark: [`MARK_AUTHENTICATED`] set and a multiple of [`STAMP_STEP`]. An earlier
/// keycast's objects after ours are not, and its lease has no MAC: its mark is believed.
pub fn written_under_a_mac(stamp: u64) -> bool {
    stamp & MARK_AUTHENTICATED != 0 && stamp.is_multiple_of(STAMP_STEP)
}

/// A high-water mark read from a lease record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// The highest TXID the record's writer knew to be in the replica; `None` if it knew none.
    pub txid: Option<u64>,
    /// Its MAC proves it was written by a holder of the replica key. Always false on an
    /// unencrypted replica, and for a lease that did not exist.
    pub authenticated: bool,
}

/// Why a mark cannot be believed.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error(
        "the replica {replica} was written by a keycast that authenticates its high-water mark, but keycast/lease.json \
         carries no valid MAC for its mark ({mark}): it was replaced, edited or removed by someone without the \
         replica key, perhaps to roll the replica back to an older state. Nothing was restored. Find out who \
         changed it; to serve what the replica holds now, knowingly, run `keycast replica accept-loss`"
    )]
    Unauthenticated { replica: String, mark: String },
    #[error("object {key} has no valid LTX header: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the MAC of a mark covers.
pub(crate) fn message(txid: Option<u64>) -> Vec<u8> {
    match txid {
        Some(txid) => format!("keycast/lease.json txid {txid}").into_bytes(),
        None => b"keycast/lease.json txid none".to_vec(),
    }
}

/// A writer stamp for a writer whose clock reads `now_ms`, following `newest` (the newest stamp
/// in the history it takes over); on an encrypted replica flagged and a multiple of
/// [`STAMP_STEP`] (see [`written_under_a_mac`]).
pub(crate) fn stamp(now_ms: u64, newest: u64, encrypted: bool) -> u64 {
    if !encrypted {
        return now_ms.max(newest + 1);
    }
    (now_ms | MARK_AUTHENTICATED)
        .max(newest + 1)
        .next_multiple_of(STAMP_STEP)
}

/// The TXID a restore of the latest state must reach: `mark.txid`, once it is believed.
///
/// # Errors
/// [`MarkError::Unauthenticated`] for an encrypted replica whose newest object was written
/// under an authenticated mark, when `mark` is not; store errors.
pub async fn trusted(store: &Store, mark: Mark) -> Result<Option<u64>, MarkError> {
    if !store.is_encrypted() || mark.authenticated {
        return Ok(mark.txid);
    }
    if newest_stamp(store).await?.is_some_and(written_under_a_mac) {
        return Err(MarkError::Unauthenticated {
            replica: store.describe(),
            mark: mark.txid.map_or("none".into(), |t| format!("TXID {t}")),
        });
    }
    Ok(mark.txid)
}

/// The writer stamp of the replica's newest object (`None` for an empty replica). One listing
/// and one GET; only on the path where a mark is not authenticated.
async fn newest_stamp(store: &Store) -> Result<Option<u64>, MarkError> {
    // Retention may delete the newest-but-one between the listing and the read, never the
    // newest; a second look settles a compaction that replaced it meanwhile.
    let mut gone = None;
    for _ in 0..2 {
        let files = store.list_all().await?;
        let Some(newest) = files.iter().max_by_key(|f| (f.max_txid, std::cmp::Reverse(f.size))) else {
            return Ok(None);
        };
        match store.get(newest).await {
            Ok(bytes) => {
                let header =
                    Header::from_bytes(&bytes[..HEADER_SIZE.min(bytes.len())]).map_err(|e| MarkError::Corrupt {
                        key: newest.key.to_string(),
                        reason: e.to_string(),
                    })?;
                return Ok(Some(header.node_id));
            }
            Err(e @ StoreError::NotFound { .. }) => gone = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(gone.expect("set by the loop").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_increase_across_upgrades_and_rollbacks_and_say_who_wrote() {
        let before = stamp(1_700_000_000_000, 1_699_999_999_999, false);
        assert!(!written_under_a_mac(before));
        let after = stamp(1_700_000_000_001, before, true);
        assert!(after > before && written_under_a_mac(after));
        // An earlier keycast taking over follows the newest stamp (`newest + 1`, as its
        // clock is behind it), once per holding: its objects are not taken for ours.
        let mut earlier = after;
        for _ in 0..3 {
            earlier = (1_700_000_000_002u64).max(earlier + 1);
            assert!(earlier > after && !written_under_a_mac(earlier));
        }
        // And ours after it again, past it.
        let again = stamp(5, earlier, true);
        assert!(again > earlier && written_under_a_mac(again));
        assert_eq!(stamp(5, after, true), after + STAMP_STEP);
    }

    #[test]
    fn every_mark_has_its_own_message() {
        assert_ne!(message(None), message(Some(0)));
        assert_ne!(message(Some(1)), message(Some(10)));
    }
}
