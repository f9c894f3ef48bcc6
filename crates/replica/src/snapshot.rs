//! A read snapshot the replicator holds open at all times, as Litestream does.
//!
//! While a read transaction is open, SQLite can neither backfill frames committed after its
//! snapshot nor restart the WAL past it (`walCheckpoint` needs the reader's lock for both).
//! So (1) pages the replicator reads from the database file never come from commits it has
//! not read yet, and (2) a checkpoint run by another program — an operator's `sqlite3` —
//! cannot wipe frames before they are shipped: it waits, then gives up busy.
//!
//! Any snapshot will do for that — an older one only holds back more — so it is refreshed
//! only where its age matters: under the write lock around our own checkpoint, so that it
//! neither limits the checkpoint nor (once everything is backfilled) stops the next writer
//! from restarting the WAL.
//!
//! Refreshing a snapshot must never leave a moment with none held, or a waiting foreign
//! checkpoint could slip through. Two connections take turns: the new snapshot is opened on
//! one before the old one is released on the other.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};

/// Two connections, at most one holding the current read transaction.
pub struct Snapshot {
    conns: [SqliteConnection; 2],
    current: Option<usize>,
}

impl Snapshot {
    /// Opens the two connections; no snapshot is held yet.
    ///
    /// # Errors
    /// SQLite errors opening the database.
    pub async fn open(db: &Path) -> Result<Snapshot, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(Duration::from_secs(5))
            .pragma("wal_autocheckpoint", "0");
        let mut conns = [options.clone().connect().await?, options.connect().await?];
        for conn in &mut conns {
            crate::replicator::keep_wal_on_close(conn).await?;
        }
        Ok(Snapshot { conns, current: None })
    }

    /// Takes a snapshot of the database as committed now, then releases the previous one.
    ///
    /// # Errors
    /// SQLite errors; the previous snapshot (if any) is then still held.
    pub async fn refresh(&mut self) -> Result<(), sqlx::Error> {
        let next = self.current.map_or(0, |c| 1 - c);
        begin_read(&mut self.conns[next]).await?;
        if let Some(old) = self.current.replace(next) {
            sqlx::query("ROLLBACK").execute(&mut self.conns[old]).await?;
        }
        Ok(())
    }

    /// Whether a snapshot is held.
    pub fn is_held(&self) -> bool {
        self.current.is_some()
    }

    /// Releases every snapshot (before closing, or to recover from an error).
    pub async fn release(&mut self) {
        self.current = None;
        for conn in &mut self.conns {
            // Fails harmlessly ("no transaction is active") on the idle connection.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        }
    }

    /// Both connections (for settings that outlive a snapshot).
    pub fn connections(&mut self) -> impl Iterator<Item = &mut SqliteConnection> {
        self.conns.iter_mut()
    }

    /// Releases and closes both connections.
    pub async fn close(mut self) {
        self.release().await;
        for conn in self.conns {
            let _ = conn.close().await;
        }
    }
}

/// Opens a read transaction: `BEGIN` is lazy, the first read pins the snapshot.
async fn begin_read(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("BEGIN").execute(&mut *conn).await?;
    if let Err(e) = sqlx::query("SELECT COUNT(*) FROM sqlite_master")
        .execute(&mut *conn)
        .await
    {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return Err(e);
    }
    Ok(())
}
