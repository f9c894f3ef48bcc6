//! Login sessions (`sessions`) and single-use mailed tokens (`user_tokens`), both looked
//! up by [`TokenHash`]: the raw cookie or mailed token never reaches the database.

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::Db;

use crate::{RepoError, TokenHash, UserId};

/// A live login session.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    pub token_hash: TokenHash,
    pub user_id: UserId,
    pub created_at: i64,
    pub expires_at: i64,
}

/// Stores a session that expires at `expires_at` (unix seconds), and ends the user's
/// oldest sessions beyond the newest `keep` (this one among them), in one transaction (on
/// PostgreSQL under the account's lock, so logins at once cannot leave more than `keep`).
///
/// With `opened_with`, only while the user's password hash is still that one: a login checks
/// the password for a while (the hashing queue, argon2) and must not open a session after a
/// reset or change replaced it (see `users::set_password_hash_ending_sessions`). Returns
/// false when it was replaced.
///
/// # Errors
/// [`RepoError::MissingReference`] for an unknown user; database errors.
pub async fn insert(
    db: &Db,
    hash: &TokenHash,
    user: &UserId,
    opened_with: Option<&str>,
    now: i64,
    expires_at: i64,
    keep: u32,
) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        if let Some(lock) = crate::users::account_lock(db.kind()) {
            sqlx::query(lock).bind(user).execute(&mut *tx).await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) SELECT $1, $2, $3, $4 \
             WHERE $5 IS NULL OR EXISTS (SELECT 1 FROM users WHERE id = $2 AND password_hash = $5)",
        )
        .bind(hash)
        .bind(user)
        .bind(now)
        .bind(expires_at)
        .bind(opened_with)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Ok(false);
        }
        // This one and the newest `keep - 1` others: sessions made in the same second tie on
        // `created_at`, and a newest `keep` that left this one out would keep `keep + 1`.
        sqlx::query(
            "DELETE FROM sessions WHERE user_id = $1 AND token_hash <> $2 AND token_hash NOT IN \
             (SELECT token_hash FROM sessions WHERE user_id = $1 AND token_hash <> $2 \
              ORDER BY created_at DESC, token_hash LIMIT $3)",
        )
        .bind(user)
        .bind(hash)
        .bind(i64::from(keep.saturating_sub(1)))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    })
}

/// The session with this hash if it has not expired at `now`.
///
/// # Errors
/// Database errors.
pub async fn find_live_by_hash(db: &Db, hash: &TokenHash, now: i64) -> Result<Option<Session>, RepoError> {
    on_engine!(db, |pool| {
        Ok(sqlx::query_as(
        "SELECT token_hash, user_id, created_at, expires_at FROM sessions WHERE token_hash = $1 AND expires_at > $2",
    )
    .bind(hash)
    .bind(now)
    .fetch_optional(pool)
    .await?)
    })
}

/// Ends one session (logout). Returns false if there was none.
///
/// # Errors
/// Database errors.
pub async fn delete(db: &Db, hash: &TokenHash) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(hash)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Ends every session of a user (after a password reset). Returns how many ended.
///
/// # Errors
/// Database errors.
pub async fn delete_for_user(db: &Db, user: &UserId) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    })
}

/// Removes sessions expired at `now`. Returns how many.
///
/// # Errors
/// Database errors.
pub async fn delete_expired(db: &Db, now: i64) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    })
}

/// What a mailed single-use token is for. A token of one purpose never redeems as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    VerifyEmail,
    ResetPassword,
}

impl TokenPurpose {
    /// The stored text (`user_tokens.purpose`).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenPurpose::VerifyEmail => "verify_email",
            TokenPurpose::ResetPassword => "reset_password",
        }
    }
}

/// Stores a single-use token for `purpose`, valid until `expires_at`.
///
/// # Errors
/// [`RepoError::MissingReference`] for an unknown user; database errors.
pub async fn insert_user_token(
    db: &Db,
    hash: &TokenHash,
    user: &UserId,
    purpose: TokenPurpose,
    now: i64,
    expires_at: i64,
) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query(
        "INSERT INTO user_tokens (token_hash, user_id, purpose, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(hash)
    .bind(user)
    .bind(purpose.as_str())
    .bind(now)
    .bind(expires_at)
    .execute(pool)
    .await?;
        Ok(())
    })
}

/// Redeems a single-use token: one conditional `UPDATE` marks it used and returns its
/// user, so of two concurrent redemptions at most one succeeds. `None` when the token is
/// unknown, of another purpose, expired or already used.
///
/// # Errors
/// Database errors.
pub async fn redeem_user_token(
    db: &Db,
    hash: &TokenHash,
    purpose: TokenPurpose,
    now: i64,
) -> Result<Option<UserId>, RepoError> {
    on_engine!(db, |pool| {
        Ok(sqlx::query_scalar(
            "UPDATE user_tokens SET used_at = $1 \
         WHERE token_hash = $2 AND purpose = $3 AND used_at IS NULL AND expires_at > $1 \
         RETURNING user_id",
        )
        .bind(now)
        .bind(hash)
        .bind(purpose.as_str())
        .fetch_all(pool)
        .await?
        .into_first())
    })
}

/// Gives back a token [`redeem_user_token`] used up at `redeemed_at`, when what it was
/// redeemed for failed part way: the link works again. Returns whether it was given back.
///
/// # Errors
/// Database errors.
pub async fn unredeem_user_token(
    db: &Db,
    hash: &TokenHash,
    purpose: TokenPurpose,
    redeemed_at: i64,
) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE user_tokens SET used_at = NULL WHERE token_hash = $1 AND purpose = $2 AND used_at = $3",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(redeemed_at)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Uses up every outstanding token of `user` for `purpose` (after a password reset, so an
/// older reset link mailed earlier, perhaps to someone else's request, no longer works).
/// Returns how many.
///
/// # Errors
/// Database errors.
pub async fn use_up_user_tokens(db: &Db, user: &UserId, purpose: TokenPurpose, now: i64) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        let done =
            sqlx::query("UPDATE user_tokens SET used_at = $1 WHERE user_id = $2 AND purpose = $3 AND used_at IS NULL")
                .bind(now)
                .bind(user)
                .bind(purpose.as_str())
                .execute(pool)
                .await?;
        Ok(done.rows_affected())
    })
}

/// Removes mailed single-use tokens expired at `now`, used or not. Returns how many.
///
/// # Errors
/// Database errors.
pub async fn delete_expired_user_tokens(db: &Db, now: i64) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM user_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    })
}

/// The user a single-use token belongs to if it would redeem now (known, of `purpose`,
/// unused, unexpired), without using it.
///
/// # Errors
/// Database errors.
pub async fn find_live_user_token(
    db: &Db,
    hash: &TokenHash,
    purpose: TokenPurpose,
    now: i64,
) -> Result<Option<UserId>, RepoError> {
    on_engine!(db, |pool| {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM user_tokens \
         WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(now)
        .fetch_optional(pool)
        .await?)
    })
}

/// Whether a single-use token would redeem now (known, of `purpose`, unused, unexpired),
/// without using it: lets a page explain a dead link before asking for input.
///
/// # Errors
/// Database errors.
pub async fn is_live_user_token(db: &Db, hash: &TokenHash, purpose: TokenPurpose, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        // `SELECT 1` is an INTEGER on SQLite and an int4 on PostgreSQL: i32 reads both.
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM user_tokens \
         WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(now)
        .fetch_optional(pool)
        .await?;
        Ok(found.is_some())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{temp_dbs, test_user};

    #[tokio::test]
    async fn live_session_is_found_by_hash_until_it_expires() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let hash = TokenHash::of(b"cookie");
            insert(&db, &hash, &user, None, 10, 20, 50).await.unwrap();
            let found = find_live_by_hash(&db, &hash, 19).await.unwrap().unwrap();
            assert_eq!(found.user_id, user);
            assert_eq!(find_live_by_hash(&db, &hash, 20).await.unwrap(), None);
            assert_eq!(
                find_live_by_hash(&db, &TokenHash::of(b"other"), 11).await.unwrap(),
                None
            );
        }
    }

    /// Logins at once keep no more than the newest `keep`: see [`crate::users::account_lock`].
    #[tokio::test]
    async fn logins_at_once_keep_no_more_than_the_newest() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "race@x.org").await;
            let racing: Vec<_> = (0..40u32)
                .map(|n| {
                    let (db, user) = (db.clone(), user.clone());
                    tokio::spawn(
                        async move { insert(&db, &TokenHash::of(&n.to_be_bytes()), &user, None, 1, 100, 3).await },
                    )
                })
                .collect();
            for outcome in racing {
                outcome.await.unwrap().unwrap();
            }
            let mut live = 0;
            for n in 0..40u32 {
                let hash = TokenHash::of(&n.to_be_bytes());
                live += usize::from(find_live_by_hash(&db, &hash, 2).await.unwrap().is_some());
            }
            assert_eq!(live, 3, "{:?}", db.kind());
        }
    }

    #[tokio::test]
    async fn logout_and_user_wide_delete_end_sessions() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            for raw in [b"s1", b"s2", b"s3"] {
                insert(&db, &TokenHash::of(raw), &user, None, 1, 100, 50).await.unwrap();
            }
            assert!(delete(&db, &TokenHash::of(b"s1")).await.unwrap());
            assert!(!delete(&db, &TokenHash::of(b"s1")).await.unwrap());
            assert_eq!(delete_for_user(&db, &user).await.unwrap(), 2);
        }
    }

    #[tokio::test]
    async fn a_new_session_ends_the_oldest_beyond_the_kept_number_of_that_user_only() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let other = test_user(&db, "b@x.org").await;
            insert(&db, &TokenHash::of(b"theirs"), &other, None, 1, 100, 2)
                .await
                .unwrap();
            for (at, raw) in [(1, b"s1"), (2, b"s2"), (3, b"s3")] {
                insert(&db, &TokenHash::of(raw), &user, None, at, 100, 2).await.unwrap();
            }
            let live = |raw: &'static [u8]| {
                let db = db.clone();
                async move { find_live_by_hash(&db, &TokenHash::of(raw), 10).await.unwrap().is_some() }
            };
            assert!(!live(b"s1").await, "the oldest ended");
            assert!(live(b"s2").await && live(b"s3").await && live(b"theirs").await);
        }
    }

    #[tokio::test]
    async fn expired_sessions_are_purged() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            insert(&db, &TokenHash::of(b"old"), &user, None, 1, 5, 50)
                .await
                .unwrap();
            insert(&db, &TokenHash::of(b"new"), &user, None, 1, 50, 50)
                .await
                .unwrap();
            assert_eq!(delete_expired(&db, 10).await.unwrap(), 1);
            assert!(find_live_by_hash(&db, &TokenHash::of(b"new"), 10)
                .await
                .unwrap()
                .is_some());
        }
    }

    #[tokio::test]
    async fn a_session_opened_with_a_password_opens_only_while_it_is_the_accounts() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let checked = TokenHash::of(b"checked");
            assert!(insert(&db, &checked, &user, Some("$argon2id$stub"), 1, 100, 50)
                .await
                .unwrap());
            // A change or reset in between: no session, and the others end with it.
            let ended = crate::users::set_password_hash_ending_sessions(&db, &user, "$argon2id$new", None, 2).await;
            assert_eq!(ended.unwrap(), Some(1));
            let late = TokenHash::of(b"late");
            assert!(!insert(&db, &late, &user, Some("$argon2id$stub"), 3, 100, 50)
                .await
                .unwrap());
            assert_eq!(find_live_by_hash(&db, &late, 4).await.unwrap(), None);
            assert_eq!(find_live_by_hash(&db, &checked, 4).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn session_for_unknown_user_is_a_missing_reference() {
        for (_guard, db) in temp_dbs().await {
            let err = insert(&db, &TokenHash::of(b"x"), &UserId::generate(), None, 1, 2, 50)
                .await
                .unwrap_err();
            assert!(matches!(err, RepoError::MissingReference), "{err:?}");
        }
    }

    #[tokio::test]
    async fn user_token_redeems_once_for_its_purpose_only() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let hash = TokenHash::of(b"mailed");
            insert_user_token(&db, &hash, &user, TokenPurpose::ResetPassword, 1, 100)
                .await
                .unwrap();
            let wrong = redeem_user_token(&db, &hash, TokenPurpose::VerifyEmail, 2).await;
            assert_eq!(wrong.unwrap(), None, "a reset token must not verify an email");
            let live = |purpose, now| is_live_user_token(&db, &hash, purpose, now);
            assert!(
                live(TokenPurpose::ResetPassword, 2).await.unwrap(),
                "looking does not use it up"
            );
            assert!(!live(TokenPurpose::VerifyEmail, 2).await.unwrap());
            assert!(!live(TokenPurpose::ResetPassword, 100).await.unwrap(), "expired");
            let first = redeem_user_token(&db, &hash, TokenPurpose::ResetPassword, 2).await;
            assert_eq!(first.unwrap(), Some(user));
            let second = redeem_user_token(&db, &hash, TokenPurpose::ResetPassword, 3).await;
            assert_eq!(second.unwrap(), None);
            assert!(!live(TokenPurpose::ResetPassword, 3).await.unwrap(), "used");
        }
    }

    #[tokio::test]
    async fn expired_user_token_does_not_redeem() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let hash = TokenHash::of(b"mailed");
            insert_user_token(&db, &hash, &user, TokenPurpose::VerifyEmail, 1, 10)
                .await
                .unwrap();
            assert_eq!(
                redeem_user_token(&db, &hash, TokenPurpose::VerifyEmail, 10)
                    .await
                    .unwrap(),
                None
            );
        }
    }
}
