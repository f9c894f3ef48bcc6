//! The `policies` table: named permission sets. `social`, `readonly`, `wallet`, `full`
//! are seeded by the first migration and public (no owner); a *custom* policy belongs to
//! the user who built it (`owner_user_id`, migration 0009) and is found only for them —
//! [`list`] and [`find_by_slug`] (what apps and the public API see) return public
//! policies only. A custom policy is deleted by marking it (`deleted_at`, migration 0011):
//! revoked authorizations and OAuth codes still point at the row, so [`find_by_id`] still
//! finds it, while [`find_usable`] and [`list_owned`] no longer do. `permissions` is JSON
//! that `keycast-core::policy` parses and evaluates; this module treats it as text.

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
    /// When its owner deleted it (a custom policy only).
    pub deleted_at: Option<i64>,
}

/// What [`delete_owned`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    Deleted,
    /// Not deleted: this many live (unrevoked) authorizations use it.
    InUse(i64),
    /// No such undeleted custom policy of the owner's.
    NotFound,
}

macro_rules! columns {
    () => {
        "id, slug, display_name, description, permissions, created_at, owner_user_id, deleted_at"
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

/// The policy with this id, public or custom, deleted or not (an authorization's,
/// whoever owns it).
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

/// The policy `user` may use under this slug: a public one, or one of their own that they
/// have not deleted.
///
/// # Errors
/// Database errors.
pub async fn find_usable(db: &Db, user: &UserId, slug: &str) -> Result<Option<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM policies WHERE slug = $1 AND (owner_user_id IS NULL OR owner_user_id = $2) AND deleted_at IS NULL"
        );
        Ok(sqlx::query_as(sql).bind(slug).bind(user).fetch_optional(pool).await?)
    })
}

/// `user`'s custom policies that they have not deleted, by name.
///
/// # Errors
/// Database errors.
pub async fn list_owned(db: &Db, user: &UserId) -> Result<Vec<PolicyRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM policies WHERE owner_user_id = $1 AND deleted_at IS NULL ORDER BY display_name, slug"
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
/// such policy of theirs (a public policy never matches: it has no owner; nor does a
/// deleted one).
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
             WHERE id = $4 AND owner_user_id = $5 AND deleted_at IS NULL",
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

/// Deletes `owner`'s custom policy `id` at `now`, unless a live authorization uses it: an
/// app's permissions never change behind the owner's back, so they move or revoke it first.
///
/// The check and the mark are one statement. An authorization that another transaction
/// puts under the policy at the same moment (on PostgreSQL, a consent or a grant edit
/// committing while this runs) can still end up under a deleted policy: it keeps the
/// permissions it was given, shows the policy's name, and can be moved to another.
///
/// # Errors
/// Database errors.
pub async fn delete_owned(db: &Db, id: &PolicyId, owner: &UserId, now: i64) -> Result<Deletion, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE policies SET deleted_at = $1 \
             WHERE id = $2 AND owner_user_id = $3 AND deleted_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM authorizations WHERE policy_id = $2 AND revoked_at IS NULL)",
        )
        .bind(now)
        .bind(id)
        .bind(owner)
        .execute(pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Deletion::Deleted);
        }
        let live: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM authorizations a JOIN policies p ON p.id = a.policy_id \
             WHERE a.policy_id = $1 AND a.revoked_at IS NULL AND p.owner_user_id = $2 AND p.deleted_at IS NULL",
        )
        .bind(id)
        .bind(owner)
        .fetch_one(pool)
        .await?;
        Ok(if live > 0 {
            Deletion::InUse(live)
        } else {
            Deletion::NotFound
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    /// A custom policy of `owner` that allows nothing, not yet stored.
    fn custom(owner: &UserId, slug: &str, name: &str) -> PolicyRow {
        PolicyRow {
            id: PolicyId::generate(),
            slug: slug.into(),
            display_name: name.into(),
            description: String::new(),
            permissions: "{}".into(),
            created_at: 1,
            owner_user_id: Some(owner.clone()),
            deleted_at: None,
        }
    }

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
            let row = custom(&owner, "custom-1", "Mine");
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

    #[tokio::test]
    async fn a_custom_policy_is_deleted_only_by_its_owner_and_only_once_no_live_app_uses_it() {
        use crate::authz;
        for (_guard, db) in temp_dbs().await {
            let owner = crate::testing::test_user(&db, "owner@example.com").await;
            let other = crate::testing::test_user(&db, "other@example.com").await;
            let row = custom(&owner, "custom-gone", "Soon gone");
            insert(&db, &row).await.unwrap();
            let app = crate::testing::test_authorization(&db, &owner, &"b".repeat(64)).await;
            assert!(authz::update_grant(&db, &app.id, &owner, &row.id, None).await.unwrap());

            assert_eq!(delete_owned(&db, &row.id, &owner, 5).await.unwrap(), Deletion::InUse(1));
            assert_eq!(delete_owned(&db, &row.id, &other, 5).await.unwrap(), Deletion::NotFound);
            let social = find_by_slug(&db, "social").await.unwrap().unwrap();
            assert_eq!(
                delete_owned(&db, &social.id, &owner, 5).await.unwrap(),
                Deletion::NotFound,
                "a public policy is nobody's to delete"
            );
            assert_eq!(
                find_usable(&db, &owner, "custom-gone").await.unwrap(),
                Some(row.clone())
            );

            assert!(authz::revoke(&db, &app.id, &owner, 6).await.unwrap());
            assert_eq!(delete_owned(&db, &row.id, &owner, 7).await.unwrap(), Deletion::Deleted);
            assert_eq!(find_usable(&db, &owner, "custom-gone").await.unwrap(), None);
            assert!(list_owned(&db, &owner).await.unwrap().is_empty());
            assert!(!update_owned(&db, &row.id, &owner, "Back", "", "{}").await.unwrap());
            assert_eq!(
                find_by_id(&db, &row.id).await.unwrap().map(|p| p.deleted_at),
                Some(Some(7)),
                "the revoked app's history still names it"
            );
            assert_eq!(delete_owned(&db, &row.id, &owner, 8).await.unwrap(), Deletion::NotFound);

            let live = crate::testing::test_authorization(&db, &owner, &"c".repeat(64)).await;
            assert!(
                !authz::update_grant(&db, &live.id, &owner, &row.id, None).await.unwrap(),
                "no app is moved under a deleted policy"
            );
        }
    }
}
