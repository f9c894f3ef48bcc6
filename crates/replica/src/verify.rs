//! Verification: prove the replica restores to exactly the live database.
//!
//! - [`verify_replica`] (`keycast replica verify`): read every object and check its CRC,
//!   then restore the latest state (chain, completeness, `integrity_check`) and compare it with
//!   the checksum keycast recorded for that TXID, if any. Names the first bad object.
//! - [`verify_at`] (the replicator's periodic check): restore a given TXID and compare its
//!   checksum with the live database's checksum at that same TXID, then record the checksum in
//!   the replica (`keycast/checksum/<lineage>/<txid>.json`) so later restores of that TXID
//!   are checked against it too. Records are kept per lineage: a replica location reused by
//!   another database must not hold it to the first one's checksums.

use std::path::Path;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::checksum::copy_checksum_path;
use crate::ltx::{self, LtxError};
use crate::restore::{self, RestoreError, Target};
use crate::store::{Store, StoreError};

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    /// LTX objects whose CRC was checked.
    pub objects: usize,
    /// Bytes read.
    pub bytes: u64,
    /// TXID of the restored state.
    pub txid: u64,
    /// Its database checksum.
    pub checksum: u64,
}

/// Why verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("object {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: LtxError,
    },
    #[error("the replica at TXID {txid} has checksum {replica:016x} but the database had {expected:016x}: the replica does not hold what was written")]
    Mismatch { txid: u64, replica: u64, expected: u64 },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("verification scratch file: {0}")]
    Io(#[from] std::io::Error),
    #[error("retention removed the files that reach TXID {txid} while it was being verified (the replica has compacted past it); a later TXID is verified next")]
    CompactedPast { txid: u64 },
    #[error("the replica restores only to TXID {txid}, short of TXID {recorded} that its lease records as replicated: an object in between is missing or could not be applied")]
    Short { txid: u64, recorded: u64 },
}

impl VerifyError {
    /// True when the replica could not be checked (the store failed a request, or the
    /// scratch restore could not be written: a full disk), as opposed to checked and found
    /// wrong. A missing object or one that does not decrypt is a verdict: the replica lacks
    /// what it must hold (retention pruning one mid-restore is retried before it gets here).
    pub fn is_inconclusive(&self) -> bool {
        match self {
            VerifyError::Io(_) | VerifyError::Restore(RestoreError::Io { .. }) | VerifyError::CompactedPast { .. } => {
                true
            }
            VerifyError::Store(e) | VerifyError::Restore(RestoreError::Store(e)) => matches!(
                e,
                StoreError::Backend { .. } | StoreError::LocalDir { .. } | StoreError::Lock { .. }
            ),
            _ => false,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ChecksumRecord {
    txid: u64,
    checksum: String,
}

fn checksum_object(lineage: &str, txid: u64) -> String {
    format!("keycast/checksum/{lineage}/{txid:016x}.json")
}

/// How often a verification restore is tried when an object it planned with was deleted by
/// retention meanwhile (the replica moved on; a new plan finds the file that covers it).
const REPLANS: usize = 3;

/// The lineage keycast recorded in the replica (`keycast/lineage.json`); `None` for replicas
/// keycast did not start (Litestream's).
///
/// # Errors
/// Store errors.
pub async fn replica_lineage(store: &Store) -> Result<Option<String>, StoreError> {
    let Some((bytes, _)) = store.get_object("keycast/lineage.json").await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("lineage").and_then(|l| l.as_str()).map(str::to_owned))
        .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')))
}

/// The checksum keycast recorded for `txid` of the replica's current lineage, if any.
///
/// # Errors
/// Store errors; a record that cannot be parsed is [`RestoreError::Mismatch`] naming it
/// (tampering or corruption is never ignored).
pub async fn recorded_checksum(store: &Store, txid: u64) -> Result<Option<u64>, RestoreError> {
    let Some(lineage) = replica_lineage(store).await? else {
        return Ok(None);
    };
    let name = checksum_object(&lineage, txid);
    let Some((bytes, _)) = store.get_object(&name).await? else {
        return Ok(None);
    };
    serde_json::from_slice::<ChecksumRecord>(&bytes)
        .ok()
        .filter(|r| r.txid == txid && r.checksum.len() == 16)
        .and_then(|r| u64::from_str_radix(&r.checksum, 16).ok())
        .map(Some)
        .ok_or(RestoreError::Mismatch {
            key: name,
            reason: "the checksum record is malformed".into(),
        })
}

/// Deletes the checksum records of the replica's lineage for TXIDs past `txid`, returning
/// how many. For `accept-loss`: the TXIDs past the state it accepts are written again, with
/// other contents, and a record of the lost history would refuse the new one as corrupt at
/// every start that restored to it.
///
/// # Errors
/// Store errors (records deleted before the failure stay deleted).
pub async fn forget_checksums_past(store: &Store, txid: u64) -> Result<usize, StoreError> {
    let Some(lineage) = replica_lineage(store).await? else {
        return Ok(0);
    };
    let mut forgotten = 0;
    for name in store.list_objects(&format!("keycast/checksum/{lineage}")).await? {
        let Some(recorded) = name
            .rsplit('/')
            .next()
            .and_then(|file| file.strip_suffix(".json"))
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        // Only what `record_checksum` names: nothing else under the directory is touched.
        if recorded > txid && name == checksum_object(&lineage, recorded) {
            store.delete_object(&name).await?;
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

/// Records the verified checksum of `txid` (create-only; a record never changes).
///
/// # Errors
/// Store errors.
pub async fn record_checksum(store: &Store, lineage: &str, txid: u64, checksum: u64) -> Result<(), StoreError> {
    let record = ChecksumRecord {
        txid,
        checksum: format!("{checksum:016x}"),
    };
    let bytes = Bytes::from(serde_json::to_vec(&record).expect("a checksum record serialises"));
    let _ = store.put_object_create(&checksum_object(lineage, txid), bytes).await?;
    Ok(())
}

/// Checks every object, then restores the latest state into `scratch` (a directory) and
/// compares it with the recorded checksum for its TXID where one exists.
///
/// # Errors
/// The first corrupt object, a failed restore, or a checksum mismatch.
pub async fn verify_replica(store: &Store, scratch: &Path) -> Result<Verified, VerifyError> {
    // Read before anything is listed: what the mark records was stored by then, so the
    // restore below must reach it. Read after, on a replica being written, it ran ahead of
    // the restore's plan and made a sound replica look short.
    let recorded = crate::lease::recorded_txid(store).await.map_err(|e| match e {
        crate::lease::LeaseError::Store(e) => VerifyError::Store(e),
        other => VerifyError::Restore(RestoreError::Mismatch {
            key: "keycast/lease.json".into(),
            reason: other.to_string(),
        }),
    })?;
    let checks = store.list_all().await?.into_iter().map(|object| {
        let store = store.clone();
        async move {
            match check_object(&store, &object).await {
                Ok(size) => Ok(Ok(size)),
                Err(VerifyError::Store(StoreError::NotFound { .. })) => Ok(Err(object)),
                Err(e) => Err(e),
            }
        }
    });
    let checked: Vec<Result<u64, crate::store::LtxObject>> = futures::stream::iter(checks)
        .buffer_unordered(CHECK_CONCURRENCY)
        .try_collect()
        .await?;
    // Listed, then gone: retention pruned it meanwhile (it runs every few seconds on a live
    // replica, oldest level-0 files first, which are checked first), and what it held is
    // in a compacted file. Only an object still listed that cannot be read is missing.
    let gone: Vec<_> = checked.iter().filter_map(|c| c.as_ref().err()).collect();
    if !gone.is_empty() {
        let listed = store.list_all().await?;
        if let Some(missing) = gone.iter().find(|g| listed.iter().any(|o| o.key == g.key)) {
            return Err(StoreError::NotFound {
                key: missing.key.to_string(),
            }
            .into());
        }
    }
    let sizes: Vec<u64> = checked.into_iter().filter_map(Result::ok).collect();
    let (objects, bytes) = (sizes.len(), sizes.iter().sum());
    let (txid, checksum) = restore_and_sum(store, Target::Latest, scratch, Plans::AsMany).await?;
    // Objects past a missing one look like uploads never acknowledged: the restore stops
    // before the gap, at a state older than the lease knew was replicated.
    if let Some(recorded) = recorded.filter(|r| *r > txid) {
        return Err(VerifyError::Short { txid, recorded });
    }
    if let Some(expected) = recorded_checksum(store, txid).await? {
        if expected != checksum {
            return Err(VerifyError::Mismatch {
                txid,
                replica: checksum,
                expected,
            });
        }
    }
    Ok(Verified {
        objects,
        bytes,
        txid,
        checksum,
    })
}

/// Objects whose CRC [`verify_replica`] checks at once.
const CHECK_CONCURRENCY: usize = 8;

/// Reads `object` piece by piece and checks it decodes (CRC included); returns its size.
pub(crate) async fn check_object(store: &Store, object: &crate::store::LtxObject) -> Result<u64, VerifyError> {
    let corrupt = |source| VerifyError::Corrupt {
        key: object.key.to_string(),
        source,
    };
    let mut reader = store.open(object).await?;
    let mut decoder = ltx::StreamDecoder::new();
    let mut bytes = 0;
    while let Some(piece) = reader.next().await? {
        bytes += piece.len() as u64;
        decoder.feed(&piece, |_| Ok::<(), LtxError>(())).map_err(corrupt)?;
    }
    decoder.finish().map_err(corrupt)?;
    Ok(bytes)
}

/// Restores `txid` into `scratch` and compares it with `expected`, the live database's
/// checksum at that TXID; on success records the checksum in the replica under `lineage`.
/// An object deleted by retention while the restore read it is not a failure: the plan is
/// made again (a compacted file covers it). If none does — level 1 has moved past `txid`,
/// and the level-0 files that reached it exactly are gone — the state is still in the
/// replica, compacted: [`VerifyError::CompactedPast`], no verdict.
///
/// # Errors
/// A failed restore or a mismatch.
pub async fn verify_at(
    store: &Store,
    txid: u64,
    expected: u64,
    scratch: &Path,
    lineage: &str,
) -> Result<Verified, VerifyError> {
    let mut attempt = 0;
    let (restored, checksum) = loop {
        attempt += 1;
        match restore_and_sum(store, Target::Txid(txid), scratch, Plans::One).await {
            Err(VerifyError::Restore(RestoreError::Store(StoreError::NotFound { key }))) if attempt < REPLANS => {
                tracing::debug!(%key, "an object was pruned during verification; planning the restore again");
            }
            Err(VerifyError::Restore(RestoreError::TxidUnreachable { .. })) if attempt > 1 => {
                return Err(VerifyError::CompactedPast { txid });
            }
            other => break other?,
        }
    };
    if checksum != expected {
        return Err(VerifyError::Mismatch {
            txid: restored,
            replica: checksum,
            expected,
        });
    }
    record_checksum(store, lineage, txid, checksum).await?;
    Ok(Verified {
        objects: 0,
        bytes: 0,
        txid,
        checksum,
    })
}

/// Whether a restore may plan again when an object it planned was deleted (see
/// [`restore::restore`]), or leaves that to its caller.
#[derive(Debug, Clone, Copy)]
enum Plans {
    AsMany,
    One,
}

/// What the directory a verification restores into is called, in `scratch`.
const SCRATCH_PREFIX: &str = ".keycast-verify-";

/// Removes the directories verifications killed outright (SIGKILL, out of memory) left in
/// `scratch`: each holds a copy of the database, on a disk that may be memory, and a process
/// killed again and again would fill it. One still being written is left alone.
fn remove_abandoned_scratch(scratch: &Path) {
    let ours = |name: &std::ffi::OsStr| name.to_str().is_some_and(|name| name.starts_with(SCRATCH_PREFIX));
    for path in restore::abandoned_in(scratch, ours) {
        if path.is_dir() && std::fs::remove_dir_all(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed what a verification that was killed left behind");
        }
    }
}

/// Restores `target` into a temporary file under `scratch`, returning its TXID and checksum.
async fn restore_and_sum(
    store: &Store,
    target: Target,
    scratch: &Path,
    plans: Plans,
) -> Result<(u64, u64), VerifyError> {
    std::fs::create_dir_all(scratch)?;
    remove_abandoned_scratch(scratch);
    let dir = tempfile::Builder::new().prefix(SCRATCH_PREFIX).tempdir_in(scratch)?;
    let out = dir.path().join("verify.db");
    let restored = match plans {
        Plans::AsMany => restore::restore(store, &out, target, None).await?,
        Plans::One => restore::restore_planned_once(store, &out, target).await?,
    };
    let checksum = tokio::task::spawn_blocking(move || copy_checksum_path(&out, restored.page_size))
        .await
        .map_err(std::io::Error::other)??;
    Ok((restored.txid, checksum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failure_to_check_is_inconclusive() {
        let disk_full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        let outage = || StoreError::Backend {
            operation: "get",
            key: "ltx/0/x.ltx".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: "connection reset".into(),
            },
        };
        let missing = || StoreError::NotFound {
            key: "ltx/0/x.ltx".into(),
        };
        for inconclusive in [
            VerifyError::Io(disk_full()),
            VerifyError::Restore(RestoreError::Io {
                path: "verify.db".into(),
                source: disk_full(),
            }),
            VerifyError::Store(outage()),
            VerifyError::Restore(RestoreError::Store(outage())),
            VerifyError::CompactedPast { txid: 5 },
        ] {
            assert!(inconclusive.is_inconclusive(), "{inconclusive}");
        }
        for verdict in [
            VerifyError::Mismatch {
                txid: 3,
                replica: 1,
                expected: 2,
            },
            VerifyError::Restore(RestoreError::Store(missing())),
            VerifyError::Restore(RestoreError::Gap {
                after: 3,
                next: 4,
                found: "6".into(),
            }),
            VerifyError::Restore(RestoreError::Integrity("page 3 is never used".into())),
        ] {
            assert!(!verdict.is_inconclusive(), "{verdict}");
        }
    }
}
