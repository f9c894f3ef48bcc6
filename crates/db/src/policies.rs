//! The `policies` table: named permission sets. `social`, `readonly`, `wallet`, `full`
//! are seeded by the first migration and public (no owner); a *custom* policy belongs to
//! the user who built it (`owner_user_id`, migration 0009) and is found only for them —
//! [`list`] and [`find_by_slug`] (what apps and the public API see) return public
//! policies only. `permissions` is JSON that `keycast-core::policy` parses and
//! evaluates; this module treats it as text.

use crate::pool::on_engine;
use crate::Db;

use crate::{PolicyId, RepoError, UserId};

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
    /// `None` for a public (seeded) policy; the owner of a custom one.
    pub owner_user_id: Option<UserId>,
}

macro_rules! columns {
    () => {
        "id, slug, display_name, description, permissions, created_at, owner_user_id"
    };
}

/// The public policy with this slug (never a user's custom policy: this is what an app's
/// `scope=policy:<slug>` resolves).
///
/// # Errors
/// Database errors.
pub async fn find_by_slug(db: &Db, slug: &str) -> Result<Option<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM policies WHERE slug = $1 AND owner_user_id IS NULL"
        );
        Ok(sqlx::query_as(sql).bind(slug).fetch_optional(pool).await?)
    })
}

/// The policy with this id, public or custom (an authorization's, whoever owns it).
///
/// # Errors
/// Database errors.
pub async fn find_by_id(db: &Db, id: &PolicyId) -> Result<Option<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM policies WHERE id = $1");
        Ok(sqlx::query_as(sql).bind(id).fetch_optional(pool).await?)
    })
}

/// Every public policy, by slug.
///
/// # Errors
/// Database errors.
pub async fn list(db: &Db) -> Result<Vec<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM policies WHERE owner_user_id IS NULL ORDER BY slug"
        );
        Ok(sqlx::query_as(sql).fetch_all(pool).await?)
    })
}

/// The policy `user` may use under this slug: a public one, or one of their own.
///
/// # Errors
/// Database errors.
pub async fn find_usable(db: &Db, user: &UserId, slug: &str) -> Result<Option<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM policies WHERE slug = $1 AND (owner_user_id IS NULL OR owner_user_id = $2)"
        );
        Ok(sqlx::query_as(sql).bind(slug).bind(user).fetch_optional(pool).await?)
    })
}

/// `user`'s custom policies, by name.
///
/// # Errors
/// Database errors.
pub async fn list_owned(db: &Db, user: &UserId) -> Result<Vec<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM policies WHERE owner_user_id = $1 ORDER BY display_name, slug"
        );
        Ok(sqlx::query_as(sql).bind(user).fetch_all(pool).await?)
    })
}

/// Stores a custom policy (its `owner_user_id` must be set).
///
/// # Errors
/// Database errors (a taken slug among them).
pub async fn insert(db: &Db, row: &PolicyRow) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query(
            "INSERT INTO policies (id, slug, display_name, description, permissions, created_at, owner_user_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&row.id)
        .bind(&row.slug)
        .bind(&row.display_name)
        .bind(&row.description)
        .bind(&row.permissions)
        .bind(row.created_at)
        .bind(&row.owner_user_id)
        .execute(pool)
        .await?;
        Ok(())
    })
}

/// Changes the name and permissions of `owner`'s custom policy `id`; false if there is no
/// such policy of theirs (a public policy never matches: it has no owner).
///
/// # Errors
/// Database errors.
pub async fn update_owned(
    db: &Db,
    id: &PolicyId,
    owner: &UserId,
    display_name: &str,
    description: &str,
    permissions: &str,
) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE policies SET display_name = $1, description = $2, permissions = $3 \
             WHERE id = $4 AND owner_user_id = $5",
        )
        .bind(display_name)
        .bind(description)
        .bind(permissions)
        .bind(id)
        .bind(owner)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
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

    #[tokio::test]
    async fn a_custom_policy_is_found_for_its_owner_only() {
        for (_guard, db) in temp_dbs().await {
            let owner = crate::testing::test_user(&db, "owner@example.com").await;
            let other = crate::testing::test_user(&db, "other@example.com").await;
            let row = PolicyRow {
                id: PolicyId::generate(),
                slug: "custom-1".into(),
                display_name: "Mine".into(),
                description: String::new(),
                permissions: "{}".into(),
                created_at: 1,
                owner_user_id: Some(owner.clone()),
            };
            insert(&db, &row).await.unwrap();
            assert_eq!(find_usable(&db, &owner, "custom-1").await.unwrap(), Some(row.clone()));
            assert_eq!(find_usable(&db, &other, "custom-1").await.unwrap(), None);
            assert!(find_usable(&db, &other, "social").await.unwrap().is_some());
            assert_eq!(find_by_slug(&db, "custom-1").await.unwrap(), None, "not public");
            assert_eq!(list(&db).await.unwrap().len(), 4, "not listed publicly");
            assert_eq!(list_owned(&db, &owner).await.unwrap(), vec![row.clone()]);
            assert!(list_owned(&db, &other).await.unwrap().is_empty());
            assert!(!update_owned(&db, &row.id, &other, "x", "", "{}").await.unwrap());
            let social = find_by_slug(&db, "social").await.unwrap().unwrap();
            assert!(!update_owned(&db, &social.id, &owner, "x", "", "{}").await.unwrap());
            assert!(update_owned(&db, &row.id, &owner, "Renamed", "", "{\"encrypt\":true}")
                .await
                .unwrap());
            let found = find_by_id(&db, &row.id).await.unwrap().unwrap();
            assert_eq!(
                (found.display_name.as_str(), found.permissions.as_str()),
                ("Renamed", "{\"encrypt\":true}")
            );
        }
    }
}
