//! Facts about the database itself, kept in the `keycast_meta` table.
//!
//! The *lineage* is a random id given to a database when it is first created. It travels
//! with the data (restores keep it), so the replicator can tell a local file that belongs
//! to a replica from one that merely sits at the same path.

use crate::pool::on_engine;
use crate::Db;

const LINEAGE_KEY: &str = "lineage";

/// Reads a value, `None` if unset.
///
/// # Errors
/// Database errors.
pub async fn get(db: &Db, key: &str) -> Result<Option<String>, sqlx::Error> {
    on_engine!(db, |pool| {
        sqlx::query_scalar("SELECT value FROM keycast_meta WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await
    })
}

/// Stores a new value under `key` (the test routes' writes).
///
/// # Errors
/// A value already stored under `key`; database errors.
pub async fn insert(db: &Db, key: &str, value: &str) -> Result<(), sqlx::Error> {
    on_engine!(db, |pool| {
        sqlx::query("INSERT INTO keycast_meta (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(pool)
            .await
            .map(|_| ())
    })
}

/// Returns this database's lineage, creating it from `new_id` on first call. Idempotent:
/// once set, the stored lineage wins and `new_id` is ignored.
///
/// # Errors
/// Database errors.
pub async fn ensure_lineage(db: &Db, new_id: &str) -> Result<String, sqlx::Error> {
    on_engine!(db, |pool| {
        sqlx::query("INSERT INTO keycast_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(LINEAGE_KEY)
            .bind(new_id)
            .execute(pool)
            .await?;
    });
    Ok(get(db, LINEAGE_KEY).await?.unwrap_or_else(|| new_id.to_owned()))
}

/// This database's lineage, `None` for a database not yet stamped.
///
/// # Errors
/// Database errors.
pub async fn lineage(db: &Db) -> Result<Option<String>, sqlx::Error> {
    get(db, LINEAGE_KEY).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Db, DbOptions};

    #[tokio::test]
    async fn lineage_is_set_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap();
        assert_eq!(lineage(&db).await.unwrap(), None);
        assert_eq!(ensure_lineage(&db, "aaa").await.unwrap(), "aaa");
        assert_eq!(ensure_lineage(&db, "bbb").await.unwrap(), "aaa");
    }
}
