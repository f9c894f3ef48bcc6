//! The `policies` table: named permission sets (`social`, `readonly`, `wallet`, `full`
//! are seeded by the first migration). `permissions` is JSON that `keycast-core::policy`
//! parses and evaluates; this module treats it as text.

use crate::pool::on_engine;
use crate::Db;

use crate::{PolicyId, RepoError};

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PolicyRow {
    pub id: PolicyId,
    /// Stable name used in OAuth scopes (`policy:<slug>`).
    pub slug: String,
    pub display_name: String,
    pub description: String,
    /// The permissions document (JSON).
    pub permissions: String,
    pub created_at: i64,
}

macro_rules! columns {
    () => {
        "id, slug, display_name, description, permissions, created_at"
    };
}

/// The policy with this slug.
///
/// # Errors
/// Database errors.
pub async fn find_by_slug(db: &Db, slug: &str) -> Result<Option<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM policies WHERE slug = $1");
        Ok(sqlx::query_as(sql).bind(slug).fetch_optional(pool).await?)
    })
}

/// The policy with this id.
///
/// # Errors
/// Database errors.
pub async fn find_by_id(db: &Db, id: &PolicyId) -> Result<Option<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM policies WHERE id = $1");
        Ok(sqlx::query_as(sql).bind(id).fetch_optional(pool).await?)
    })
}

/// Every policy, by slug.
///
/// # Errors
/// Database errors.
pub async fn list(db: &Db) -> Result<Vec<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM policies ORDER BY slug");
        Ok(sqlx::query_as(sql).fetch_all(pool).await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    #[tokio::test]
    async fn seeded_policies_are_listed_and_found_by_slug_and_id() {
        for (_guard, db) in temp_dbs().await {
            let slugs: Vec<String> = list(&db).await.unwrap().into_iter().map(|p| p.slug).collect();
            assert_eq!(slugs, ["full", "readonly", "social", "wallet"]);
            let social = find_by_slug(&db, "social").await.unwrap().unwrap();
            assert!(social.permissions.contains("22242"));
            assert_eq!(find_by_id(&db, &social.id).await.unwrap(), Some(social));
            assert_eq!(find_by_slug(&db, "nope").await.unwrap(), None);
        }
    }
}
