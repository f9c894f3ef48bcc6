//! The live database file, opened once per process and never closed.
//!
//! SQLite's unix VFS locks with POSIX advisory locks, which belong to the process and the
//! file, not to a descriptor: closing *any* descriptor of the database file drops every lock
//! the process holds on it, SQLite's own included ("How To Corrupt An SQLite Database File",
//! section 2.2). The replicator reads pages straight from the file. Had it opened and closed
//! the file for each read, another process on the same database (an operator's `sqlite3`,
//! `keycast clients add`) would find no lock when it closes, take itself for the last
//! connection, checkpoint and delete the WAL under keycast, and keycast would go on
//! committing into the unlinked file. So the file is opened here once, by device and inode,
//! and its descriptor is kept for the life of the process.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

type Open = HashMap<(u64, u64), Arc<File>>;

static OPEN: OnceLock<Mutex<Open>> = OnceLock::new();

/// A descriptor of the database file at `path`, shared, and never closed while the file
/// still has a name.
///
/// # Errors
/// I/O errors of `stat` or `open`.
pub(crate) fn open(path: &Path) -> std::io::Result<Arc<File>> {
    let mut open = OPEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    // A file replaced since (a restore renames a new one into place) or deleted has no name
    // left, and no connection of this process can be using it: its descriptor may go.
    open.retain(|_, file| file.metadata().is_ok_and(|m| m.nlink() > 0));
    let named = std::fs::metadata(path)?; // a stat, not a descriptor
    if let Some(file) = open.get(&(named.dev(), named.ino())) {
        return Ok(file.clone());
    }
    let file = File::open(path)?;
    let opened = file.metadata()?;
    let key = (opened.dev(), opened.ino());
    if let Some(known) = open.get(&key) {
        // The name moved between the stat and the open onto a file already held: keep this
        // descriptor open too, since closing it would drop the locks.
        std::mem::forget(file);
        return Ok(known.clone());
    }
    let file = Arc::new(file);
    open.insert(key, file.clone());
    Ok(file)
}

/// The id of another process that has the SQLite database at `path` open, if one does: a
/// connection holds SQLite's shared lock on the file for as long as it is open (WAL mode),
/// and `F_GETLK` names the holder of a conflicting lock. This process's own locks do not
/// count.
///
/// # Errors
/// I/O errors opening the file or asking for its locks.
pub fn opened_elsewhere(path: &Path) -> std::io::Result<Option<u32>> {
    use std::os::fd::AsRawFd;
    // SQLite's lock bytes (os_unix.c): PENDING_BYTE, RESERVED_BYTE, then the 510 bytes
    // readers share.
    const PENDING_BYTE: libc::off_t = 0x4000_0000;
    const LOCK_BYTES: libc::off_t = 512;
    // Through `open`: closing a descriptor of the file would drop this process's locks.
    let file = open(path)?;
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut probe: libc::flock = unsafe { std::mem::zeroed() };
    probe.l_type = libc::F_WRLCK as libc::c_short;
    probe.l_whence = libc::SEEK_SET as libc::c_short;
    probe.l_start = PENDING_BYTE;
    probe.l_len = LOCK_BYTES;
    // SAFETY: F_GETLK on a valid, owned descriptor with a valid `flock` to fill in.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut probe) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((probe.l_type != libc::F_UNLCK as libc::c_short).then_some(probe.l_pid as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's shared lock on the database file, as `/proc/locks` lists it for `pid`.
    fn sqlite_holds_a_lock(path: &Path) -> bool {
        let ino = std::fs::metadata(path).unwrap().ino();
        let pid = std::process::id();
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains(&format!(" {pid} ")) && l.contains(&format!(":{ino} ")))
    }

    #[tokio::test]
    async fn reading_the_file_leaves_sqlites_locks_in_place() {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
        use sqlx::{ConnectOptions, Connection};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.db");
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x)").execute(&mut conn).await.unwrap();
        sqlx::query("SELECT * FROM t").fetch_all(&mut conn).await.unwrap();
        assert!(sqlite_holds_a_lock(&path), "SQLite's shared lock");
        for _ in 0..3 {
            let file = open(&path).unwrap();
            drop(file);
            crate::segment::page_size_of(&path).unwrap();
        }
        assert!(sqlite_holds_a_lock(&path), "still held after reading the file");
        // What the module exists to avoid: a descriptor of our own, closed.
        drop(File::open(&path).unwrap());
        assert!(!sqlite_holds_a_lock(&path), "a closed descriptor drops the lock");
        conn.close().await.unwrap();
    }
}
