//! Facts about the database itself, kept in the `keycast_meta` table.
//!
//! The *lineage* is a random id given to a database when it is first created. It travels
//! with the data (restores keep it), so the replicator can tell a local file that belongs
//! to a replica from one that merely sits at the same path.

use sqlx::SqlitePool;

const LINEAGE_KEY: &str = "lineage";

/// Reads a value, `None` if unset.
///
/// # Errors
/// Database errors.
pub async fn get(pool: &SqlitePool, key: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM keycast_meta WHERE key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
}

/// Returns this database's lineage, creating it from `new_id` on first call. Idempotent:
/// once set, the stored lineage wins and `new_id` is ignored.
///
/// # Errors
/// Database errors.
pub async fn ensure_lineage(pool: &SqlitePool, new_id: &str) -> Result<String, sqlx::Error> {
    sqlx::query("INSERT INTO keycast_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
        .bind(LINEAGE_KEY)
        .bind(new_id)
        .execute(pool)
        .await?;
    Ok(get(pool, LINEAGE_KEY).await?.unwrap_or_else(|| new_id.to_owned()))
}

/// This database's lineage, `None` for a database not yet stamped.
///
/// # Errors
/// Database errors.
pub async fn lineage(pool: &SqlitePool) -> Result<Option<String>, sqlx::Error> {
    get(pool, LINEAGE_KEY).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Db, DbOptions};

    #[tokio::test]
    async fn lineage_is_set_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap();
        assert_eq!(lineage(db.pool()).await.unwrap(), None);
        assert_eq!(ensure_lineage(db.pool(), "aaa").await.unwrap(), "aaa");
        assert_eq!(ensure_lineage(db.pool(), "bbb").await.unwrap(), "aaa");
    }
}
