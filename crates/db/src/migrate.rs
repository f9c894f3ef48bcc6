//! Embedded migrations, run at start.
//!
//! A database stamped with a migration this binary does not know was written by a newer
//! keycast. Running on it could silently drop or misread data, so it is refused with an
//! error naming both versions; roll forward instead.

use sqlx::migrate::Migrator;
use sqlx::SqlitePool;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Why migrations could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the database schema is at version {database}, newer than this keycast binary knows \
         (version {binary}); it was written by a newer keycast, so run that version or newer \
         (keycast never downgrades a schema)"
    )]
    SchemaTooNew { database: i64, binary: i64 },
    #[error("database migration failed: {0}")]
    Failed(#[from] sqlx::migrate::MigrateError),
    #[error("cannot read the applied migrations: {0}")]
    Query(#[from] sqlx::Error),
}

/// The newest schema version this binary carries.
pub fn latest_version() -> i64 {
    SQLITE_MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Applies pending migrations; idempotent.
///
/// # Errors
/// [`MigrateError::SchemaTooNew`] if the database has a migration newer than the binary.
pub async fn run(pool: &SqlitePool) -> Result<(), MigrateError> {
    if let Some(database) = applied_version(pool).await? {
        let binary = latest_version();
        if database > binary {
            return Err(MigrateError::SchemaTooNew { database, binary });
        }
    }
    SQLITE_MIGRATIONS.run(pool).await?;
    Ok(())
}

/// The highest applied migration, or `None` on a fresh database.
async fn applied_version(pool: &SqlitePool) -> Result<Option<i64>, sqlx::Error> {
    let table: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'")
            .fetch_optional(pool)
            .await?;
    if table.is_none() {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use crate::{Db, DbOptions, OpenError};

    #[tokio::test]
    async fn migrations_are_idempotent_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DbOptions::new(dir.path().join("k.db"));
        let db = Db::open_sqlite(&opts).await.unwrap();
        db.close().await;
        let db = Db::open_sqlite(&opts).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM policies")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 4, "seeded policies exist exactly once");
    }

    #[tokio::test]
    async fn schema_newer_than_binary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DbOptions::new(dir.path().join("k.db"));
        let db = Db::open_sqlite(&opts).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from the future', 1, x'00', 0)",
        )
        .execute(db.pool())
        .await
        .unwrap();
        db.close().await;
        let err = Db::open_sqlite(&opts).await.unwrap_err();
        assert!(matches!(
            err,
            OpenError::Migrate(super::MigrateError::SchemaTooNew { database: 9999, .. })
        ));
        assert!(err.to_string().contains("newer than this keycast binary"), "{err}");
    }
}
