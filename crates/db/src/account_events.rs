//! The `account_events` table: what happened to an account itself — a key export, a
//! password reset, an email verification, authorizations revoked by a take-over, a key
//! replaced — as opposed to what its authorizations did (`activity`).
//!
//! Rows are few and each one matters (an export must never go unrecorded), so they are
//! written one by one, synchronously, before the action's result is handed out.

use crate::pool::on_engine;
use crate::Db;

use crate::{ActivityId, RepoError, UserId};

/// A stored account event.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AccountEvent {
    pub id: ActivityId,
    pub user_id: UserId,
    /// What happened: `key_exported`, `password_reset`, `email_verified`,
    /// `authorizations_revoked`, `key_replaced`, `exposure_dismissed`.
    pub event: String,
    /// Details for the user (the export format, how many authorizations, …).
    pub detail: String,
    pub created_at: i64,
}

/// Records `event` for `user`.
///
/// # Errors
/// [`RepoError::MissingReference`] for an unknown user; database errors.
pub async fn insert(db: &Db, user: &UserId, event: &str, detail: &str, now: i64) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query("INSERT INTO account_events (id, user_id, event, detail, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(ActivityId::generate())
            .bind(user)
            .bind(event)
            .bind(detail)
            .bind(now)
            .execute(pool)
            .await?;
        Ok(())
    })
}

/// The newest `limit` events of `user`, newest first.
///
/// # Errors
/// Database errors.
pub async fn list_for_user(db: &Db, user: &UserId, limit: i64) -> Result<Vec<AccountEvent>, RepoError> {
    on_engine!(db, |pool| {
        let sql = "SELECT id, user_id, event, detail, created_at FROM account_events \
               WHERE user_id = $1 ORDER BY created_at DESC, id LIMIT $2";
        Ok(sqlx::query_as(sql).bind(user).bind(limit).fetch_all(pool).await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{temp_dbs, test_user};

    #[tokio::test]
    async fn events_are_listed_per_user_newest_first() {
        for (_guard, db) in temp_dbs().await {
            let alice = test_user(&db, "a@x.org").await;
            let bob = test_user(&db, "b@x.org").await;
            insert(&db, &alice, "key_exported", "nsec", 1).await.unwrap();
            insert(&db, &alice, "password_reset", "", 2).await.unwrap();
            insert(&db, &bob, "key_exported", "nsec", 3).await.unwrap();
            let events: Vec<_> = list_for_user(&db, &alice, 10)
                .await
                .unwrap()
                .into_iter()
                .map(|e| (e.event, e.created_at))
                .collect();
            assert_eq!(
                events,
                [("password_reset".to_owned(), 2), ("key_exported".to_owned(), 1)]
            );
            let unknown = insert(&db, &UserId::generate(), "x", "", 1).await.unwrap_err();
            assert!(matches!(unknown, RepoError::MissingReference), "{unknown:?}");
        }
    }
}
