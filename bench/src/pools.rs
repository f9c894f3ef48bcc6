//! The two ways the workload opens its database, and where a commit ended in the WAL.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use keycast_replica::{capture, CommitSignal};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

/// The pool keycast runs with replication on, as `keycast_db::pool` opens it: WAL,
/// `synchronous=NORMAL`, no autocheckpoint (only the replicator checkpoints), the commit
/// hook reporting to `signal`, and keycast's busy handler.
pub async fn keycast_pool(path: &Path, signal: &Arc<CommitSignal>) -> anyhow::Result<SqlitePool> {
    let signal = signal.clone();
    SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(move |conn, _| {
            let signal = signal.clone();
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                // SAFETY: a live connection owned by the pool; the hook and the busy handler
                // live as long as it.
                unsafe {
                    capture::install_wal_hook(handle.as_raw_handle(), &signal);
                    capture::install_busy_handler(handle.as_raw_handle(), BUSY_TIMEOUT);
                }
                Ok(())
            })
        })
        .connect_with(base_options(path).pragma("wal_autocheckpoint", "0"))
        .await
        .with_context(|| format!("open {}", path.display()))
}

/// A plain SQLite pool: the same settings minus the hook, with SQLite's default
/// autocheckpoint (1000 pages). The Litestream side and the no-replication baseline use it.
pub async fn plain_pool(path: &Path) -> anyhow::Result<SqlitePool> {
    SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(base_options(path))
        .await
        .with_context(|| format!("open {}", path.display()))
}

fn base_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The benchmark table.
pub async fn create_table(pool: &SqlitePool) -> anyhow::Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        .execute(pool)
        .await?;
    Ok(())
}

/// The workload's transaction: one row with a 100-byte random blob.
pub const INSERT_SMALL: &str = "INSERT INTO t (v) VALUES (randomblob(100))";

/// Where the last commit ended in the WAL, read from the wal-index header in `<db>-shm`.
///
/// The `-wal` file's length is *not* the end of committed data once the WAL has restarted
/// after a checkpoint: SQLite rewrites it from the start without truncating it. The wal-index
/// header (SQLite's documented "WAL-index format") holds `mxFrame`, the last valid frame, and
/// the salts of the current generation, and every commit updates it before returning — so
/// read right after a commit it gives that commit's end offset (an overestimate only if
/// another writer, such as Litestream's own bookkeeping, committed in between).
pub struct WalProbe {
    shm_path: PathBuf,
    shm: Option<File>,
}

/// A commit's position: WAL generation (salts, as big-endian in the WAL header) and the
/// offset just past its commit frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalEnd {
    pub salt1: u32,
    pub salt2: u32,
    pub end: u64,
}

impl WalProbe {
    pub fn new(db: &Path) -> WalProbe {
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push("-shm");
        WalProbe {
            shm_path: db.with_file_name(name),
            shm: None,
        }
    }

    /// Reads the wal-index header (both copies must agree, as SQLite itself requires).
    pub fn read(&mut self) -> anyhow::Result<WalEnd> {
        if self.shm.is_none() {
            self.shm = Some(File::open(&self.shm_path).with_context(|| format!("open {}", self.shm_path.display()))?);
        }
        let shm = self.shm.as_ref().expect("opened");
        for _ in 0..100 {
            let mut buf = [0u8; 96];
            shm.read_exact_at(&mut buf, 0)?;
            if buf[..48] != buf[48..] {
                std::thread::yield_now();
                continue;
            }
            let u32_ne = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().expect("4"));
            let version = u32_ne(0);
            if version != 3_007_000 {
                bail!("unexpected wal-index version {version} in {}", self.shm_path.display());
            }
            let sz = u32::from(u16::from_ne_bytes([buf[14], buf[15]]));
            let page_size = if sz == 1 { 65536 } else { sz };
            let mx_frame = u64::from(u32_ne(16));
            return Ok(WalEnd {
                salt1: u32::from_be_bytes(buf[32..36].try_into().expect("4")),
                salt2: u32::from_be_bytes(buf[36..40].try_into().expect("4")),
                end: 32 + mx_frame * (24 + u64::from(page_size)),
            });
        }
        bail!("the wal-index header of {} kept changing", self.shm_path.display())
    }
}

/// Reads salts from the `-wal` file header: a cross-check of [`WalProbe`].
pub fn wal_file_salts(db: &Path) -> anyhow::Result<(u32, u32)> {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-wal");
    let wal = File::open(db.with_file_name(name))?;
    let mut buf = [0u8; 8];
    wal.read_exact_at(&mut buf, 16)?;
    Ok((
        u32::from_be_bytes(buf[..4].try_into().expect("4")),
        u32::from_be_bytes(buf[4..].try_into().expect("4")),
    ))
}
