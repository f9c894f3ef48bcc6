//! The replicator's record on local disk of what it has shipped, kept next to the database
//! as `<db>-replica.json`.
//!
//! It is what lets a restarted process prove that the local database continues the replica
//! (same lineage, same TXID, same WAL position) instead of guessing. Checkpoints and clean
//! stops write it durably (temp file, fsync, rename: after a power loss it is the old record
//! or the new one); after every shipped batch it is rewritten in place without waiting for
//! the disk ([`store_quick`]). If it is missing, unreadable or does not match, keycast never
//! assumes continuity: it restores, refuses, or ships a full snapshot (see `bootstrap`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::wal::{WalHeader, WalPosition};

/// Where in the WAL the replicator stopped: the generation (salts) and the byte position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalCursor {
    pub salt1: u32,
    pub salt2: u32,
    pub offset: u64,
    pub checksum1: u32,
    pub checksum2: u32,
}

impl WalCursor {
    /// The cursor right after `position` in the WAL generation of `header`.
    pub fn new(header: &WalHeader, position: WalPosition) -> Self {
        let (salt1, salt2) = header.salts();
        Self {
            salt1,
            salt2,
            offset: position.offset,
            checksum1: position.checksum.0,
            checksum2: position.checksum.1,
        }
    }

    /// Whether `header` is the same WAL generation.
    pub fn same_generation(&self, header: &WalHeader) -> bool {
        header.salts() == (self.salt1, self.salt2)
    }

    /// Whether `header` is the generation SQLite starts when it restarts this one in place
    /// (after a full checkpoint): the first salt is one more, the second is new.
    pub fn restarted_into(&self, header: &WalHeader) -> bool {
        header.salts().0 == self.salt1.wrapping_add(1)
    }

    /// The position to resume reading from.
    pub fn position(&self) -> WalPosition {
        WalPosition {
            offset: self.offset,
            checksum: (self.checksum1, self.checksum2),
        }
    }
}

/// The record itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    /// The database's lineage (its id in `keycast_meta`); empty until the replicator starts.
    pub lineage: String,
    /// The replica this state refers to (described, without credentials).
    pub replica: String,
    /// Last TXID in the replica that this database's content includes.
    pub txid: u64,
    /// Database size in pages at `txid`.
    pub commit: u32,
    /// Page size of the database.
    pub page_size: u32,
    /// WAL position right after the last shipped frame; `None` when the WAL held nothing
    /// unshipped at `txid` (fresh restore, or after a clean shutdown).
    pub wal: Option<WalCursor>,
    /// True when written by a clean shutdown after the final sync succeeded.
    pub clean: bool,
    /// Every frame up to `wal` was checkpointed into the database file (and synced): a WAL
    /// that SQLite restarted in place since continues exactly the shipped state.
    #[serde(default)]
    pub checkpointed: bool,
    /// Checksum of the database file after a clean shutdown folded the WAL into it. A
    /// mismatch at the next start means someone changed the file while keycast was down.
    #[serde(default)]
    pub db_checksum: Option<u64>,
    /// When this record was written (ms since the Unix epoch).
    #[serde(default)]
    pub updated_at_ms: i64,
    /// The last replication error since the last success, for `keycast replica status`.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The last background verification: TXID, when (ms), and the failure if it failed.
    #[serde(default)]
    pub verification: Option<VerificationRecord>,
    /// The newest writer stamp in this database's history (the LTX header's node id: see
    /// `apply::Applied::check_writer`); the next writer's stamp must be larger. 0 before
    /// stamps.
    #[serde(default)]
    pub writer: u64,
}

/// A background verification's outcome, as recorded locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationRecord {
    pub txid: u64,
    pub at_ms: i64,
    pub error: Option<String>,
}

/// `<db>-replica.json`
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-replica.json");
    db.with_file_name(name)
}

/// Reads the record; `Ok(None)` if there is none.
///
/// # Errors
/// An unreadable or malformed file is an error, never treated as absent.
pub fn load(db: &Path) -> std::io::Result<Option<LocalState>> {
    let path = path_for(db);
    let mut attempt = 0;
    loop {
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => return Ok(Some(state)),
                // The running replicator rewrites the record in place (see [`store_quick`]):
                // a read that raced such a write may see a mix; read it again.
                Err(_) if attempt < 3 => attempt += 1,
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is malformed: {e}", path.display()),
                    ))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Replaces the record atomically (temp file + rename), durably: the new record is on disk
/// before it replaces the old one, and the rename is on disk before this returns, so after a
/// power loss the record is the old one or the new one, and once this returns the new one.
/// For records that matter after a power loss: a checkpoint, a clean stop, the record of a
/// start-up restore (written before the restored file takes the database's name: see
/// `bootstrap::restore_into`).
///
/// # Errors
/// I/O errors.
pub fn store(db: &Path, state: &LocalState) -> std::io::Result<()> {
    use std::io::Write;
    let path = path_for(db);
    let temp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    file.sync_data()?;
    std::fs::rename(&temp, &path)?;
    sync_dir(&path)
}

/// Makes the directory entries beside `path` durable (fail point `local-state-dir-sync` fails it).
fn sync_dir(path: &Path) -> std::io::Result<()> {
    fail::fail_point!("local-state-dir-sync", |_| Err(std::io::Error::other(
        "injected: the directory could not be synced"
    )));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::File::open(dir)?.sync_all() {
        // A filesystem that cannot sync a directory (EINVAL, ENOTSUP) says so for every one:
        // nothing more durable is on offer there, and refusing would stop the replicator.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        synced => synced,
    }
}

/// Rewrites the record in place, in one write, without waiting for the disk: what the
/// replicator does after every segment, hundreds of times a second under load — so it
/// creates no file (a new inode per segment was a third of the replicator's CPU time on ext4).
/// The JSON is padded with spaces to the old length, so one `pwrite` replaces it whole and
/// nothing is truncated. A crash of the process leaves the new record (the page cache
/// survives it); a power loss may leave an older record, or an unreadable one. Both are safe,
/// because start-up never trusts a record it cannot tie to the local files: a record behind
/// the replica, or an unreadable one, means the replica is restored (the local file is moved
/// aside), and a record pointing past what the WAL still holds is noticed (see `bootstrap`).
///
/// # Errors
/// I/O errors.
pub fn store_quick(db: &Path, state: &LocalState) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let path = path_for(db);
    let file = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return store(db, state),
        Err(e) => return Err(e),
    };
    let mut bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let old = file.metadata()?.len();
    if (bytes.len() as u64) < old {
        bytes.resize(old as usize, b' ');
    }
    file.write_all_at(&bytes, 0)
}

/// Removes the record (the database it described is gone or moved).
pub fn remove(db: &Path) {
    let _ = std::fs::remove_file(path_for(db));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record at `txid`, in the middle of a WAL.
    fn record(txid: u64) -> LocalState {
        LocalState {
            lineage: "l".into(),
            replica: "file:///r".into(),
            txid,
            commit: 3,
            page_size: 4096,
            wal: Some(WalCursor {
                salt1: 1,
                salt2: 2,
                offset: 32,
                checksum1: 3,
                checksum2: 4,
            }),
            clean: false,
            checkpointed: false,
            db_checksum: Some(9),
            updated_at_ms: 1,
            last_error: None,
            verification: None,
            writer: 5,
        }
    }

    /// The rename is made durable, and a failure to do so is an error, not a record that a
    /// power cut may take away.
    #[test]
    fn a_record_whose_directory_entry_could_not_be_synced_is_not_reported_stored() {
        if !fail::has_failpoints() {
            eprintln!("SKIPPED: built without fault injection (--features keycast/failpoints)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        let state = record(7);
        fail::cfg("local-state-dir-sync", "1*return").unwrap();
        assert!(store(&db, &state).is_err(), "stored without a durable directory entry");
        store(&db, &state).unwrap();
        fail::remove("local-state-dir-sync");
        assert_eq!(load(&db).unwrap().map(|s| s.txid), Some(7));
    }

    #[test]
    fn round_trips_and_absent_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        assert_eq!(load(&db).unwrap(), None);
        let state = record(7);
        store(&db, &state).unwrap();
        assert_eq!(load(&db).unwrap(), Some(state.clone()));

        // Rewritten in place: the same file, a longer then a shorter record, each read back
        // exactly (the shorter one padded over the longer).
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(path_for(&db)).unwrap().ino();
        let longer = LocalState {
            last_error: Some("x".repeat(500)),
            ..state.clone()
        };
        store_quick(&db, &longer).unwrap();
        assert_eq!(load(&db).unwrap(), Some(longer));
        let shorter = LocalState { txid: 8, ..state };
        store_quick(&db, &shorter).unwrap();
        assert_eq!(load(&db).unwrap(), Some(shorter));
        assert_eq!(std::fs::metadata(path_for(&db)).unwrap().ino(), inode, "no new file");
        // No record yet: written whole.
        let other = dir.path().join("other.db");
        store_quick(&other, &load(&db).unwrap().unwrap()).unwrap();
        assert!(load(&other).unwrap().is_some());

        std::fs::write(path_for(&db), b"{").unwrap();
        assert!(load(&db).is_err(), "a torn record is an error, not 'absent'");
    }
}
