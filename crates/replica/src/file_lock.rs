//! An exclusive advisory lock on a file (`flock(2)`), held until dropped. Used where the
//! local filesystem must stand in for an object store's compare-and-swap.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// A held `flock(LOCK_EX)`; released when dropped (or when the process dies).
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Blocks until the exclusive lock on `path` (created if missing) is held.
    ///
    /// # Errors
    /// I/O errors creating or locking the file.
    pub fn exclusive(path: &Path) -> std::io::Result<FileLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = File::options().create(true).truncate(false).write(true).open(path)?;
        // SAFETY: flock on a valid, owned descriptor has no memory-safety preconditions.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileLock { file })
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the descriptor would release it too.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}
