//! Embedded migrations, run at start: `migrations/sqlite/` or `migrations/postgres/`, the
//! same versions with the same meaning.
//!
//! A database stamped with a migration this binary does not know was written by a newer
//! keycast. Running on it could silently drop or misread data, so it is refused with an
//! error naming both versions; roll forward instead.
//!
//! On PostgreSQL several instances may start together: the check and the migrations run on
//! one connection holding a session advisory lock ([`MIGRATION_LOCK`]), so exactly one of
//! them migrates and the others find the work done.

use sqlx::migrate::Migrator;
use sqlx::Connection;

use crate::pool::Engine;
use crate::Db;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory lock key that serializes keycast's migrations on a PostgreSQL server
/// (`pg_advisory_lock`): the ASCII of "keycast" as a number, unlikely to collide with
/// another application's key.
pub const MIGRATION_LOCK: i64 = 0x6b_6579_6361_7374;

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

/// The highest applied migration, or `None` on a fresh database (`$conn`: a `&mut`
/// connection of either engine; `$table`: the query that finds sqlx's bookkeeping table).
macro_rules! applied_version {
    ($conn:expr, $table:expr) => {
        async {
            let table: Option<String> = sqlx::query_scalar($table).fetch_optional(&mut *$conn).await?;
            match table {
                None => Ok::<Option<i64>, sqlx::Error>(None),
                Some(_) => {
                    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
                        .fetch_one(&mut *$conn)
                        .await
                }
            }
        }
    };
}

/// Applies pending migrations; idempotent.
///
/// # Errors
/// [`MigrateError::SchemaTooNew`] if the database has a migration newer than the binary.
pub async fn run(db: &Db) -> Result<(), MigrateError> {
    match db.engine() {
        Engine::Sqlite(pool) => {
            let mut conn = pool.acquire().await?;
            refuse_newer(applied_version!(conn, SQLITE_TABLE).await?)?;
            SQLITE_MIGRATIONS.run(&mut *conn).await?;
        }
        Engine::Postgres(pool) => {
            // One connection throughout: the advisory lock belongs to the session.
            let mut conn = pool.acquire().await?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await?;
            let outcome = async {
                refuse_newer(applied_version!(conn, POSTGRES_TABLE).await?)?;
                POSTGRES_MIGRATIONS.run(&mut *conn).await?;
                Ok::<(), MigrateError>(())
            }
            .await;
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // A connection whose unlock failed must not go back to the pool holding it.
                let _ = conn.detach().close().await;
            }
            outcome?;
        }
    }
    Ok(())
}

fn refuse_newer(database: Option<i64>) -> Result<(), MigrateError> {
    let binary = latest_version();
    match database {
        Some(database) if database > binary => Err(MigrateError::SchemaTooNew { database, binary }),
        _ => Ok(()),
    }
}

const SQLITE_TABLE: &str = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";
const POSTGRES_TABLE: &str = "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
                              WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'";

#[cfg(test)]
mod tests {
    use crate::{Db, DbOptions, OpenError};

    #[test]
    fn both_engines_carry_the_same_migration_versions() {
        let versions =
            |m: &sqlx::migrate::Migrator| m.iter().map(|m| (m.version, m.description.clone())).collect::<Vec<_>>();
        assert_eq!(
            versions(&super::SQLITE_MIGRATIONS),
            versions(&super::POSTGRES_MIGRATIONS)
        );
    }

    #[tokio::test]
    async fn migrations_are_idempotent_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DbOptions::new(dir.path().join("k.db"));
        let db = Db::open_sqlite(&opts).await.unwrap();
        db.close().await;
        let db = Db::open_sqlite(&opts).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM policies")
            .fetch_one(db.as_sqlite().unwrap())
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
        .execute(db.as_sqlite().unwrap())
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
