//! The replicator's record on local disk of what it has shipped, kept next to the database
//! as `<db>-replica.json`.
//!
//! It is what lets a restarted process prove that the local database continues the replica
//! (same lineage, same TXID, same WAL position) instead of guessing. It is written with
//! write-to-temp + rename after every shipped batch, so a crash leaves the previous record,
//! never a torn one. If it is missing or does not match, keycast never assumes continuity:
//! it restores, refuses, or ships a full snapshot (see `bootstrap`).

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
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is malformed: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the record atomically (temp file + rename).
///
/// # Errors
/// I/O errors.
pub fn store(db: &Path, state: &LocalState) -> std::io::Result<()> {
    use std::io::Write;
    let path = path_for(db);
    let temp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    // Durable before it replaces the old record: after a power loss the record is the old
    // one or the new one, never an empty file that would stop keycast from starting.
    file.sync_data()?;
    std::fs::rename(&temp, &path)
}

/// Removes the record (the database it described is gone or moved).
pub fn remove(db: &Path) {
    let _ = std::fs::remove_file(path_for(db));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_absent_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("k.db");
        assert_eq!(load(&db).unwrap(), None);
        let state = LocalState {
            lineage: "l".into(),
            replica: "file:///r".into(),
            txid: 7,
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
        };
        store(&db, &state).unwrap();
        assert_eq!(load(&db).unwrap(), Some(state));
        std::fs::write(path_for(&db), b"{").unwrap();
        assert!(load(&db).is_err(), "a torn record is an error, not 'absent'");
    }
}
