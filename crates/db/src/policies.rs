//! The `policies` table: named permission sets. `social`, `readonly`, `wallet`, `full`
//! are seeded by the first migration and public (no owner); a *custom* policy belongs to
//! the user who built it (`owner_user_id`, migration 0009) and is found only for them —
//! [`list`] and [`find_by_slug`] (what apps and the public API see) return public
//! policies only. A custom policy is deleted by marking it (`deleted_at`, migration 0011):
//! revoked authorizations and OAuth codes still point at the row, so [`find_by_id`] still
//! finds it, while [`find_usable`] and [`list_owned`] no longer do. `permissions` is JSON
//! that `keycast-core::policy` parses and evaluates; this module treats it as text.

use crate::pool::{on_engine, Engine};
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

/// Stores a custom policy (its `owner_user_id` must be set) while its owner has fewer than
/// `max_live` custom policies not deleted, checked in the same statement (on PostgreSQL under
/// the owner's lock: see [`crate::users::account_lock`]).
///
/// # Errors
/// [`RepoError::TooMany`] at `max_live`; database errors (a taken slug among them).
pub async fn insert(db: &Db, row: &PolicyRow, max_live: u32) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        if let Some(lock) = crate::users::account_lock(db.kind()) {
            sqlx::query(lock).bind(&row.owner_user_id).execute(&mut *tx).await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO policies (id, slug, display_name, description, permissions, created_at, owner_user_id) \
             SELECT $1, $2, $3, $4, $5, $6, $7 \
             WHERE (SELECT COUNT(*) FROM policies WHERE owner_user_id = $7 AND deleted_at IS NULL) < $8",
        )
        .bind(&row.id)
        .bind(&row.slug)
        .bind(&row.display_name)
        .bind(&row.description)
        .bind(&row.permissions)
        .bind(row.created_at)
        .bind(&row.owner_user_id)
        .bind(i64::from(max_live))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(RepoError::TooMany("custom policies"));
        }
        tx.commit().await?;
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

/// Removes the rows of deleted custom policies that no authorization or code names (a
/// revoked grant's page still shows its policy, and a code names the one it grants): a
/// deleted policy otherwise stayed for good, up to ~80 KB each. Returns how many.
///
/// No row can come to name a deleted policy: grants and codes are written only under one
/// not deleted (on PostgreSQL under its share lock).
///
/// # Errors
/// Database errors.
pub async fn purge_deleted(db: &Db) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        Ok(sqlx::query(
            "DELETE FROM policies WHERE deleted_at IS NOT NULL AND owner_user_id IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM authorizations a WHERE a.policy_id = policies.id) \
             AND NOT EXISTS (SELECT 1 FROM oauth_codes c WHERE c.policy_id = policies.id)",
        )
        .execute(pool)
        .await?
        .rows_affected())
    })
}

/// Deletes `owner`'s custom policy `id` at `now`, unless a live authorization uses it: an
/// app's permissions never change behind the owner's back, so they move or revoke it first.
///
/// No authorization can slip under the policy while it is being deleted. On SQLite the
/// check and the mark are one statement, and writes are serial. On PostgreSQL the policy row
/// is locked first, which waits for any insert or grant edit that holds its share lock (see
/// [`crate::authz::insert`]) to commit; the count that follows, with a fresh snapshot, then
/// sees it. Those writes in turn find the policy deleted once this commits.
///
/// # Errors
/// Database errors.
pub async fn delete_owned(db: &Db, id: &PolicyId, owner: &UserId, now: i64) -> Result<Deletion, RepoError> {
    match db.engine() {
        Engine::Sqlite(pool) => delete_owned_serial(pool, id, owner, now).await,
        Engine::Postgres(pool) => delete_owned_locked(pool, id, owner, now).await,
    }
}

/// [`delete_owned`] on SQLite: check and mark in one statement, then tell why if nothing was
/// marked.
async fn delete_owned_serial(
    pool: &sqlx::SqlitePool,
    id: &PolicyId,
    owner: &UserId,
    now: i64,
) -> Result<Deletion, RepoError> {
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
    let live: i64 = sqlx::query_scalar(COUNT_LIVE)
        .bind(id)
        .bind(owner)
        .fetch_one(pool)
        .await?;
    Ok(if live > 0 {
        Deletion::InUse(live)
    } else {
        Deletion::NotFound
    })
}

/// [`delete_owned`] on PostgreSQL: lock, count, mark, in one transaction.
async fn delete_owned_locked(
    pool: &sqlx::PgPool,
    id: &PolicyId,
    owner: &UserId,
    now: i64,
) -> Result<Deletion, RepoError> {
    let mut tx = pool.begin().await?;
    let found: Option<PolicyId> = sqlx::query_scalar(
        "SELECT id FROM policies WHERE id = $1 AND owner_user_id = $2 AND deleted_at IS NULL FOR UPDATE",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    if found.is_none() {
        return Ok(Deletion::NotFound);
    }
    let live: i64 = sqlx::query_scalar(COUNT_LIVE)
        .bind(id)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
    if live > 0 {
        return Ok(Deletion::InUse(live));
    }
    sqlx::query("UPDATE policies SET deleted_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Deletion::Deleted)
}

/// How many live authorizations `owner`'s undeleted policy `$1` has (`$2`: the owner).
const COUNT_LIVE: &str = "SELECT COUNT(*) FROM authorizations a JOIN policies p ON p.id = a.policy_id \
     WHERE a.policy_id = $1 AND a.revoked_at IS NULL AND p.owner_user_id = $2 AND p.deleted_at IS NULL";

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

    /// Creations racing for an owner's last places: see [`crate::users::account_lock`].
    #[tokio::test]
    async fn creations_racing_for_the_last_places_stay_within_the_cap() {
        for (_guard, db) in temp_dbs().await {
            let owner = crate::testing::test_user(&db, "race@x.org").await;
            let racing: Vec<_> = (0..40)
                .map(|n| {
                    let (db, row) = (db.clone(), custom(&owner, &format!("p{n}"), "P"));
                    tokio::spawn(async move { insert(&db, &row, 3).await })
                })
                .collect();
            let mut created = 0;
            for outcome in racing {
                match outcome.await.unwrap() {
                    Ok(()) => created += 1,
                    Err(RepoError::TooMany(_)) => {}
                    Err(other) => panic!("{other:?}"),
                }
            }
            assert_eq!(created, 3, "{:?}", db.kind());
            assert_eq!(list_owned(&db, &owner).await.unwrap().len(), 3);
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
            insert(&db, &row, 100).await.unwrap();
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
            insert(&db, &row, 100).await.unwrap();
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

    /// A scratch PostgreSQL database with `owner` and their custom policy, or `None` without
    /// a test server.
    async fn postgres_with_policy() -> Option<(crate::scratch::ScratchDatabase, Db, UserId, PolicyRow)> {
        let server = crate::scratch::test_server()?;
        let scratch = crate::scratch::create_database(&server, "policy_race").await.unwrap();
        let db = Db::open_postgres(&crate::PgOptions::new(&scratch.url)).await.unwrap();
        let owner = crate::testing::test_user(&db, "owner@example.com").await;
        let row = custom(&owner, "custom-race", "Raced");
        insert(&db, &row, 100).await.unwrap();
        Some((scratch, db, owner, row))
    }

    /// Waits until some transaction waits for a lock: the racing statement has started and
    /// is held by the lock under test.
    async fn someone_waits_for_a_lock(db: &Db) {
        let pool = db.as_postgres().unwrap();
        for _ in 0..1000 {
            let waiting: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_locks WHERE NOT granted")
                .fetch_one(pool)
                .await
                .unwrap();
            if waiting > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the racing statement never waited for the lock");
    }

    #[tokio::test]
    async fn on_postgresql_a_consent_racing_a_deletion_does_not_land_under_the_deleted_policy() {
        let Some((_scratch, db, owner, row)) = postgres_with_policy().await else {
            return;
        };
        // The deletion has locked and marked the row, not yet committed...
        let mut deleting = db.as_postgres().unwrap().begin().await.unwrap();
        sqlx::query("SELECT id FROM policies WHERE id = $1 FOR UPDATE")
            .bind(&row.id)
            .execute(&mut *deleting)
            .await
            .unwrap();
        sqlx::query("UPDATE policies SET deleted_at = 5 WHERE id = $1")
            .bind(&row.id)
            .execute(&mut *deleting)
            .await
            .unwrap();
        // ...when the app's authorization is inserted under it.
        let insert = tokio::spawn({
            let (db, owner, policy) = (db.clone(), owner.clone(), row.id.clone());
            async move {
                let new = crate::authz::NewAuthorization {
                    id: &crate::AuthorizationId::generate(),
                    user_id: &owner,
                    policy_id: &policy,
                    client_id: "app",
                    redirect_origin: "https://app.example",
                    bunker_pubkey: &"d".repeat(64),
                    bunker_secret_encrypted: b"ciphertext",
                    connect_secret_hash: &crate::TokenHash::of(b"connect"),
                    relays: "[]",
                    terms: None,
                    max_live: 100,
                    session: None,
                };
                crate::authz::insert(&db, &new, 6).await
            }
        });
        someone_waits_for_a_lock(&db).await;
        deleting.commit().await.unwrap();
        let inserted = insert.await.unwrap();
        assert!(
            matches!(inserted, Err(RepoError::MissingReference)),
            "an app landed under a policy deleted before it committed: {inserted:?}"
        );
    }

    #[tokio::test]
    async fn on_postgresql_a_deletion_racing_a_consent_counts_the_new_app() {
        let Some((_scratch, db, owner, row)) = postgres_with_policy().await else {
            return;
        };
        // An app's authorization is being inserted under the policy, holding its share lock
        // as `authz::insert` does, not yet committed...
        let mut consenting = db.as_postgres().unwrap().begin().await.unwrap();
        sqlx::query("SELECT 1 FROM policies WHERE id = $1 AND deleted_at IS NULL FOR SHARE")
            .bind(&row.id)
            .execute(&mut *consenting)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO authorizations (id, user_id, policy_id, client_id, redirect_origin, bunker_pubkey, \
             bunker_secret_encrypted, connect_secret_hash, relays, created_at) \
             VALUES ('a1', $1, $2, 'app', 'https://app.example', $3, '\\x00', 'h', '[]', 1)",
        )
        .bind(&owner)
        .bind(&row.id)
        .bind("e".repeat(64))
        .execute(&mut *consenting)
        .await
        .unwrap();
        // ...when the owner deletes the policy.
        let deletion = tokio::spawn({
            let (db, owner, id) = (db.clone(), owner.clone(), row.id.clone());
            async move { delete_owned(&db, &id, &owner, 7).await }
        });
        someone_waits_for_a_lock(&db).await;
        consenting.commit().await.unwrap();
        assert_eq!(
            deletion.await.unwrap().unwrap(),
            Deletion::InUse(1),
            "the policy was deleted under an app that committed first"
        );
        assert_eq!(find_usable(&db, &owner, "custom-race").await.unwrap(), Some(row));
    }
}
