//! Start-up: decide, from the local database file and the replica, what state to serve.
//!
//! | local file | replica | local record | outcome |
//! |---|---|---|---|
//! | none | empty | – | [`Bootstrap::Fresh`]: create a new database; it becomes TXID 1 |
//! | none | has data | – | [`Bootstrap::Restored`]: restore the latest state first |
//! | exists | empty | any | [`Bootstrap::Adopt`]: the local file seeds the replica (a full image) |
//! | exists | has data | matches (same lineage, same TXID) | [`Bootstrap::Resume`] |
//! | exists | has data | TXID behind the replica | local moved aside to `<db>.behind-<unix>`, then [`Bootstrap::Restored`] |
//! | exists | has data | matches, but the local WAL lost frames the record says were shipped (a power loss) | local moved aside, then [`Bootstrap::Restored`] |
//! | exists | has data | none, other lineage, or TXID ahead of the replica | refused with [`BootstrapError`]: keycast cannot tell which copy is right, so it serves neither |
//! | any | short of the lease's high-water mark | – | refused: the replica's newest objects were deleted, and restoring would silently roll back |
//!
//! The stale file is kept, never deleted: it may hold commits that were acknowledged
//! locally but never reached the replica, and an operator may want them.

use std::path::{Path, PathBuf};

use crate::local_state::{self, LocalState};
use crate::restore::{self, RestoreError, Restored};
use crate::store::{LtxObject, Store, StoreError};

/// What start-up found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// No database anywhere: a new one will be created.
    Fresh,
    /// The database was restored from the replica (and a stale local copy, if any, moved to
    /// `moved_aside`).
    Restored {
        restored: Restored,
        moved_aside: Option<PathBuf>,
    },
    /// A local database and an empty replica: the local file seeds the replica.
    Adopt,
    /// The local database is exactly the replica's latest state (plus unshipped commits).
    Resume { txid: u64 },
}

/// Why start-up refuses to pick a state.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "a database exists at {db} but has no replication record, and the replica {replica} already holds data \
         (up to TXID {remote}); keycast cannot tell which is newer. Move the local file away to restore from \
         the replica, or point KEYCAST_REPLICA_URL at an empty location to replicate this file from scratch"
    )]
    UnknownLocal { db: PathBuf, replica: String, remote: u64 },
    #[error(
        "the database at {db} belongs to lineage {local} but the replica {replica} holds lineage {remote}: they are \
         different databases. Move the local file away to restore from the replica, or use another replica location"
    )]
    OtherLineage {
        db: PathBuf,
        replica: String,
        local: String,
        remote: String,
    },
    #[error(
        "the database at {db} is at TXID {local} but the replica {replica} only reaches TXID {remote}: files are \
         missing from the replica. keycast will not overwrite either; restore the missing objects, or point \
         KEYCAST_REPLICA_URL at an empty location to replicate this file from scratch"
    )]
    ReplicaBehind {
        db: PathBuf,
        replica: String,
        local: u64,
        remote: u64,
    },
    #[error(
        "the replica {replica} reaches only TXID {remote}, but its lease records TXID {recorded} as replicated: \
         its newest objects are missing (deleted or lost) or could not be applied. keycast will not silently roll back to an older state; \
         restore the missing objects, or, to accept the loss, run `keycast replica accept-loss` (it records in \
         {lease_object} the TXID the replica reaches now)"
    )]
    ReplicaTruncated {
        replica: String,
        remote: u64,
        recorded: u64,
        lease_object: String,
    },
    #[error(
        "the replica lease on {replica} could not be renewed during start-up and has lapsed: another instance \
         may hold the replica now, so nothing is deleted from it and this start stops. Check that the store \
         accepts writes; the next start takes the lease again"
    )]
    LeaseLapsed { replica: String },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the local replication record: {0}")]
    Io(#[from] std::io::Error),
}

/// Prepares `db` from `store` as the table above says. Call before opening the database,
/// holding the lease; `recorded` is the high-water mark the lease carried (see
/// [`crate::lease::Lease::previous_txid`]). `may_delete` is asked right before anything is
/// deleted from the replica (a stale writer's tail, after a restore): whether the lease is
/// still valid (see [`crate::lease::LeaseClock`]).
///
/// # Errors
/// See [`BootstrapError`].
pub async fn prepare(
    db: &Path,
    store: &Store,
    recorded: Option<u64>,
    may_delete: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Bootstrap, BootstrapError> {
    // One listing serves both the decision and, if it comes to that, the restore.
    let recent = store.list_recent().await?;
    let remote = crate::store::tip(&recent);
    if let Some(recorded) = recorded.filter(|r| *r > remote) {
        return Err(truncated(store, remote, recorded));
    }
    let local = db.exists();
    if !local {
        move_leftovers_aside(db)?;
    }
    match (local, remote) {
        (false, 0) => Ok(Bootstrap::Fresh),
        (false, _) => restore_into(db, store, None, &recent, recorded, may_delete).await,
        (true, 0) => Ok(Bootstrap::Adopt),
        (true, _) => compare(db, store, remote, &recent, recorded, may_delete).await,
    }
}

async fn compare(
    db: &Path,
    store: &Store,
    remote: u64,
    recent: &[LtxObject],
    recorded: Option<u64>,
    may_delete: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Bootstrap, BootstrapError> {
    let record = match local_state::load(db) {
        Ok(record) => record,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            // Written without waiting for the disk after each segment: a power loss can leave
            // it unreadable. It then proves nothing, and the replica holds everything shipped.
            let aside = move_aside(db)?;
            tracing::warn!(error = %e, moved_to = %aside.display(), "the local replication record is unreadable (a power loss?); restoring from the replica, the old file is kept");
            return restore_into(db, store, Some(aside), recent, recorded, may_delete).await;
        }
        Err(e) => return Err(e.into()),
    };
    let Some(record) = record else {
        return Err(BootstrapError::UnknownLocal {
            db: db.to_owned(),
            replica: store.describe(),
            remote,
        });
    };
    let behind = match judge(db, &record, store, remote).await? {
        Verdict::Resume => return Ok(Bootstrap::Resume { txid: record.txid }),
        Verdict::OtherLineage { remote: remote_lineage } => {
            return Err(BootstrapError::OtherLineage {
                db: db.to_owned(),
                replica: store.describe(),
                local: record.lineage,
                remote: remote_lineage,
            })
        }
        Verdict::Ahead => {
            return Err(BootstrapError::ReplicaBehind {
                db: db.to_owned(),
                replica: store.describe(),
                local: record.txid,
                remote,
            })
        }
        Verdict::Behind => true,
        Verdict::WalLost => false,
    };
    let aside = move_aside(db)?;
    if behind {
        tracing::warn!(
            local_txid = record.txid,
            replica_txid = remote,
            moved_to = %aside.display(),
            "the local database is behind the replica (another instance wrote since); restoring, the old file is kept"
        );
    } else {
        tracing::warn!(
            txid = record.txid,
            moved_to = %aside.display(),
            "the local WAL no longer holds frames that were replicated (a power loss?); restoring from the replica, the old file is kept"
        );
    }
    restore_into(db, store, Some(aside), recent, recorded, may_delete).await
}

/// What start-up makes of a local database with a replication `record`, beside a replica
/// with data (up to TXID `remote`). Whatever is not [`Verdict::Resume`] is refused or
/// restored over, so a command that writes to the database must not write to it either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Exactly the replica's latest state (plus unshipped commits): resumed.
    Resume,
    /// A different database (lineage `remote` in the replica): refused.
    OtherLineage { remote: String },
    /// Past the replica's newest TXID (objects missing from it): refused.
    Ahead,
    /// Behind the replica (another instance wrote since): moved aside and restored over.
    Behind,
    /// Its WAL lost frames the record says were shipped (a power loss, or another program's
    /// last connection folding and removing it): moved aside and restored over.
    WalLost,
}

/// Judges `db` and its `record` against the replica (see [`Verdict`]); reads the replica's
/// lineage (one request).
///
/// # Errors
/// Store and I/O errors.
pub async fn judge(db: &Path, record: &LocalState, store: &Store, remote: u64) -> Result<Verdict, BootstrapError> {
    if let Some(remote_lineage) = replica_lineage(store).await? {
        if !record.lineage.is_empty() && record.lineage != remote_lineage {
            return Ok(Verdict::OtherLineage { remote: remote_lineage });
        }
    }
    if record.txid > remote {
        return Ok(Verdict::Ahead);
    }
    if record.txid < remote {
        return Ok(Verdict::Behind);
    }
    let shipped_frames_lost = match &record.wal {
        Some(cursor) if !(record.clean && record.db_checksum.is_some()) => {
            !crate::segment::wal_reaches(db, cursor, record.checkpointed)
                .map_err(|e| std::io::Error::other(e.to_string()))?
        }
        _ => false,
    };
    Ok(if shipped_frames_lost {
        Verdict::WalLost
    } else {
        Verdict::Resume
    })
}

/// Restores the latest state into `db`, planned from `recent`, the listing start-up just made.
/// A restore that stops short of `recorded` (the lease's high-water mark) is refused, and
/// removes nothing from the replica: what it could not apply was acknowledged.
///
/// The restore is built under a staging name beside `db` and its replication record written
/// before it takes `db`'s name: a database at `db` without a record is refused by every start
/// as one of unknown origin, so `db` never exists without one. Before, the record came last,
/// after the stale tail's deletion (a store request) and a checksum of the whole file
/// (seconds, for a large one): a store error there, a SIGTERM that dropped the start-up, a
/// kill or a power cut left a restored database that no start would take. Now any of them
/// leaves the staging file, which the next start removes before restoring again.
async fn restore_into(
    db: &Path,
    store: &Store,
    moved_aside: Option<PathBuf>,
    recent: &[LtxObject],
    recorded: Option<u64>,
    may_delete: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Bootstrap, BootstrapError> {
    if let Some(parent) = db.parent() {
        std::fs::create_dir_all(parent)?;
    }
    tracing::info!(replica = %store.describe(), "restoring the database from the replica before serving");
    let staging = Staging::new(db)?;
    let restored = restore::restore_latest_listed(store, &staging.path, recent).await?;
    if let Some(recorded) = recorded.filter(|r| *r > restored.txid) {
        return Err(truncated(store, restored.txid, recorded));
    }
    if restored.stale.is_some() {
        if !may_delete() {
            return Err(BootstrapError::LeaseLapsed {
                replica: store.describe(),
            });
        }
        remove_stale_tail(store, restored.txid, recent).await?;
    }
    // The file alone is the restored state. Anything that folds a WAL into it before the
    // replicator runs (another program's last connection closing, the migrations of a start
    // that then fails) changes it without a trace in any WAL: the checksum is what notices it
    // (see `Worker::changed_while_down`), and a full image ships instead.
    let db_checksum = {
        let (path, page_size) = (staging.path.clone(), restored.page_size);
        tokio::task::spawn_blocking(move || crate::checksum::database_checksum_path(&path, page_size))
            .await
            .map_err(std::io::Error::other)??
    };
    local_state::store(
        db,
        &LocalState {
            lineage: String::new(),
            replica: store.describe(),
            txid: restored.txid,
            commit: restored.pages,
            page_size: restored.page_size,
            wal: None,
            clean: true,
            checkpointed: false,
            db_checksum: Some(db_checksum),
            updated_at_ms: crate::replicator::now_ms(),
            last_error: None,
            verification: None,
            writer: restored.newest_writer,
        },
    )?;
    staging.publish(db)?;
    tracing::info!(
        txid = restored.txid,
        files = restored.files,
        bytes = restored.bytes,
        "restore complete"
    );
    Ok(Bootstrap::Restored { restored, moved_aside })
}

/// A start-up restore's file before it takes the database's name (see [`restore_into`]):
/// removed when dropped unless published — on an error, and when the start-up is dropped.
struct Staging {
    path: PathBuf,
    published: bool,
}

impl Staging {
    /// `<db>.bootstrap-restore`, after removing what a start killed while restoring left there.
    fn new(db: &Path) -> std::io::Result<Staging> {
        let mut name = db.as_os_str().to_owned();
        name.push(".bootstrap-restore");
        let path = PathBuf::from(name);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed a restore a start-up left unfinished"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Staging { path, published: false })
    }

    /// Gives the restore `db`'s name (which must be free: it was moved aside or never was),
    /// durably.
    fn publish(mut self, db: &Path) -> std::io::Result<()> {
        restore::rename_no_replace(&self.path, db)?;
        self.published = true;
        restore::sync_dir(db);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Deletes the level-0 objects past `txid`, where the restore stopped at a stale writer's
/// object (see `restore::Restored::stale`): this instance, holding the lease, writes those
/// TXIDs next, and the replica's tip must be its own. An object that lands even later meets
/// this writer's own upload at its TXID (see `worker::resolve_collision`).
async fn remove_stale_tail(store: &Store, txid: u64, recent: &[LtxObject]) -> Result<(), BootstrapError> {
    let past: Vec<LtxObject> = recent
        .iter()
        .filter(|f| f.level == 0 && f.min_txid > txid)
        .cloned()
        .collect();
    tracing::warn!(
        txid,
        objects = past.len(),
        "removing objects an instance stored after it had lost the replica (past the TXID restored)"
    );
    store.delete(&past).await?;
    Ok(())
}

/// The lineage recorded in the replica by keycast; `None` for replicas Litestream wrote.
async fn replica_lineage(store: &Store) -> Result<Option<String>, StoreError> {
    crate::verify::replica_lineage(store).await
}

/// Renames the database and its `-wal`/`-shm`/record to `<db>.behind-<unix>…`.
/// The replica reaches only `remote`, short of the `recorded` high-water mark.
fn truncated(store: &Store, remote: u64, recorded: u64) -> BootstrapError {
    BootstrapError::ReplicaTruncated {
        replica: store.describe(),
        remote,
        recorded,
        lease_object: "keycast/lease.json".into(),
    }
}

/// A WAL (or shared memory, or journal) without its database: the database was moved away
/// and this was left. Opened beside a restored or a new database, SQLite would apply it (it
/// ties no WAL to its file) and mix two states; it is kept beside, renamed, for whoever moved
/// the database.
pub fn move_leftovers_aside(db: &Path) -> std::io::Result<()> {
    for leftover in restore::leftovers(db) {
        let mut aside = leftover.as_os_str().to_owned();
        aside.push(format!(".orphan-{}", crate::replicator::now_ms()));
        std::fs::rename(&leftover, &aside)?;
        tracing::warn!(file = %leftover.display(), moved_to = %Path::new(&aside).display(), "a database's WAL was left without its database: moved aside");
    }
    Ok(())
}

fn move_aside(db: &Path) -> std::io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    move_aside_as(db, stamp)
}

/// [`move_aside`] under `.behind-<stamp>`, or `.behind-<stamp>-<n>` when that name (or one of
/// its side files) is taken: a second set-aside copy in the same second (a clock reset to
/// the same time at every boot) replaced the first, which may have held commits never
/// shipped, and left its WAL beside the second.
fn move_aside_as(db: &Path, stamp: u64) -> std::io::Result<PathBuf> {
    let named = |n: u32| {
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        match n {
            0 => name.push(format!(".behind-{stamp}")),
            n => name.push(format!(".behind-{stamp}-{n}")),
        }
        db.with_file_name(name)
    };
    let taken = |aside: &Path| {
        aside.exists()
            || restore::SIDE_FILES.iter().any(|suffix| {
                let mut side = aside.as_os_str().to_owned();
                side.push(suffix);
                Path::new(&side).exists()
            })
    };
    let mut n = 0;
    let aside = loop {
        let aside = named(n);
        if !taken(&aside) {
            match restore::rename_no_replace(db, &aside) {
                Ok(()) => break aside,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        n += 1;
    };
    for suffix in restore::SIDE_FILES {
        let mut from = db.as_os_str().to_owned();
        from.push(suffix);
        let mut to = aside.as_os_str().to_owned();
        to.push(suffix);
        if Path::new(&from).exists() {
            std::fs::rename(&from, &to)?;
        }
    }
    local_state::remove(db);
    Ok(aside)
}

#[cfg(test)]
mod aside_tests {
    use super::*;

    /// Two copies set aside in the same second: each keeps its own name and its own WAL.
    #[test]
    fn a_second_copy_set_aside_in_the_same_second_replaces_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keycast.db");
        let wal = |p: &Path| {
            let mut w = p.as_os_str().to_owned();
            w.push("-wal");
            PathBuf::from(w)
        };
        std::fs::write(&db, b"first").unwrap();
        std::fs::write(wal(&db), b"first's commits").unwrap();
        let first = move_aside_as(&db, 7).unwrap();
        std::fs::write(&db, b"second").unwrap();
        let second = move_aside_as(&db, 7).unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read(&first).unwrap(), b"first");
        assert_eq!(std::fs::read(wal(&first)).unwrap(), b"first's commits");
        assert_eq!(std::fs::read(&second).unwrap(), b"second");
        assert!(!wal(&second).exists(), "the first's WAL is not beside the second");
        assert!(!db.exists());
    }
}
