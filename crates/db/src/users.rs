//! The `users` table: accounts (email, argon2id password hash, optional NIP-05 username).
//!
//! Owns rows only; password hashing and verification live in `keycast-core`. Emails are
//! stored as given: callers normalise (trim, lowercase) before insert and lookup.

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::{Db, EngineKind};

use crate::{RepoError, UserId};

/// A stored account.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct User {
    pub id: UserId,
    pub email: String,
    /// An argon2id PHC string; never a password.
    pub password_hash: String,
    /// The NIP-05 local part, if the user chose one.
    pub username: Option<String>,
    /// When the email was verified (unix seconds), `None` until then.
    pub email_verified_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What [`insert`] needs; the id is generated.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub email: &'a str,
    pub password_hash: &'a str,
    pub username: Option<&'a str>,
}

macro_rules! columns {
    () => {
        "id, email, password_hash, username, email_verified_at, created_at, updated_at"
    };
}

/// Inserts a new user with a fresh id.
///
/// # Errors
/// [`RepoError::AlreadyExists`] when the email or username is taken (check with
/// `is_duplicate_of("email")` / `("username")`); database errors.
pub async fn insert(db: &Db, new: &NewUser<'_>, now: i64) -> Result<User, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "INSERT INTO users (id, email, password_hash, username, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $5) RETURNING ",
            columns!(),
            ""
        );
        Ok(sqlx::query_as(sql)
            .bind(UserId::generate())
            .bind(new.email)
            .bind(new.password_hash)
            .bind(new.username)
            .bind(now)
            .fetch_all(pool)
            .await?
            .into_one()?)
    })
}

/// The user with this id.
///
/// # Errors
/// Database errors.
pub async fn find_by_id(db: &Db, id: &UserId) -> Result<Option<User>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM users WHERE id = $1");
        Ok(sqlx::query_as(sql).bind(id).fetch_optional(pool).await?)
    })
}

/// The user with this (already normalised) email.
///
/// # Errors
/// Database errors.
pub async fn find_by_email(db: &Db, email: &str) -> Result<Option<User>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM users WHERE email = $1");
        Ok(sqlx::query_as(sql).bind(email).fetch_optional(pool).await?)
    })
}

/// The user with this NIP-05 username.
///
/// # Errors
/// Database errors.
pub async fn find_by_username(db: &Db, username: &str) -> Result<Option<User>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM users WHERE username = $1");
        Ok(sqlx::query_as(sql).bind(username).fetch_optional(pool).await?)
    })
}

/// Sets the password hash and ends every session of the user, in one transaction. A login
/// that checked the old password opens its session only while the hash is still the one it
/// checked (see `sessions::insert`): it lands before this (and is ended here) or after it
/// (and is refused), never with a session under the old password. With `replacing`, only
/// while the stored hash is that one (a change, whose current password was checked against
/// it: a reset meanwhile outranks it). Returns the sessions ended, or `None` if there is no
/// such user (or it no longer has the hash `replacing` names).
///
/// # Errors
/// Database errors.
pub async fn set_password_hash_ending_sessions(
    db: &Db,
    id: &UserId,
    hash: &str,
    replacing: Option<&str>,
    now: i64,
) -> Result<Option<u64>, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE users SET password_hash = $1, updated_at = $2 WHERE id = $3 AND ($4 IS NULL OR password_hash = $4)",
        )
        .bind(hash)
        .bind(now)
        .bind(id)
        .bind(replacing)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        let ended = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(ended.rows_affected()))
    })
}

/// Sets (or clears) the NIP-05 username. Returns false if no such user.
///
/// # Errors
/// [`RepoError::AlreadyExists`] when another user has it; database errors.
pub async fn set_username(db: &Db, id: &UserId, username: Option<&str>, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("UPDATE users SET username = $1, updated_at = $2 WHERE id = $3")
            .bind(username)
            .bind(now)
            .bind(id)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Marks the email verified at `now`; idempotent (the first time wins). Returns false if
/// no such user.
///
/// # Errors
/// Database errors.
pub async fn mark_email_verified(db: &Db, id: &UserId, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE users SET email_verified_at = COALESCE(email_verified_at, $1), updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// [`delete`], only while `password_hash` (the one the owner's password was checked
/// against) is still the account's: false otherwise (a reset meanwhile outranks it).
///
/// # Errors
/// Database errors.
pub async fn delete_with_password(db: &Db, id: &UserId, password_hash: &str) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM users WHERE id = $1 AND password_hash = $2")
            .bind(id)
            .bind(password_hash)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Deletes the user and, by cascade, their sessions, tokens, key, authorizations and
/// activity. Returns false if no such user.
///
/// # Errors
/// Database errors.
pub async fn delete(db: &Db, id: &UserId) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// The statement that locks `$1`'s user row until the end of the transaction, where an
/// engine needs it for a per-account cap checked by counting (live grants, custom policies,
/// sessions). On PostgreSQL (READ COMMITTED) each statement counts in its own snapshot, so
/// two inserts for one account counting at once would both find room; taken first, this lock
/// makes them count one after another. SQLite writes one transaction at a time: none needed.
pub(crate) fn account_lock(kind: EngineKind) -> Option<&'static str> {
    match kind {
        EngineKind::Sqlite => None,
        EngineKind::Postgres => Some("SELECT 1 FROM users WHERE id = $1 FOR UPDATE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    fn alice() -> NewUser<'static> {
        NewUser {
            email: "alice@example.com",
            password_hash: "$argon2id$stub",
            username: Some("alice"),
        }
    }

    #[tokio::test]
    async fn inserted_user_is_found_by_id_email_and_username() {
        for (_guard, db) in temp_dbs().await {
            let user = insert(&db, &alice(), 100).await.unwrap();
            assert_eq!(user.created_at, 100);
            assert_eq!(find_by_id(&db, &user.id).await.unwrap().as_ref(), Some(&user));
            assert_eq!(
                find_by_email(&db, "alice@example.com").await.unwrap().as_ref(),
                Some(&user)
            );
            assert_eq!(find_by_username(&db, "alice").await.unwrap().as_ref(), Some(&user));
            assert_eq!(find_by_email(&db, "bob@example.com").await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn duplicate_email_is_reported_as_email_taken() {
        for (_guard, db) in temp_dbs().await {
            insert(&db, &alice(), 1).await.unwrap();
            let err = insert(
                &db,
                &NewUser {
                    username: None,
                    ..alice()
                },
                2,
            )
            .await
            .unwrap_err();
            assert!(err.is_duplicate_of("email"), "{err:?}");
            assert!(!err.is_duplicate_of("username"), "{err:?}");
        }
    }

    #[tokio::test]
    async fn duplicate_username_is_reported_as_username_taken() {
        for (_guard, db) in temp_dbs().await {
            insert(&db, &alice(), 1).await.unwrap();
            let bob = NewUser {
                email: "bob@example.com",
                ..alice()
            };
            assert!(insert(&db, &bob, 2).await.unwrap_err().is_duplicate_of("username"));
        }
    }

    #[tokio::test]
    async fn email_verification_keeps_the_first_time() {
        for (_guard, db) in temp_dbs().await {
            let user = insert(&db, &alice(), 1).await.unwrap();
            assert!(mark_email_verified(&db, &user.id, 10).await.unwrap());
            assert!(mark_email_verified(&db, &user.id, 20).await.unwrap());
            let user = find_by_id(&db, &user.id).await.unwrap().unwrap();
            assert_eq!((user.email_verified_at, user.updated_at), (Some(10), 20));
        }
    }

    #[tokio::test]
    async fn password_and_username_updates_apply_and_delete_removes() {
        for (_guard, db) in temp_dbs().await {
            let user = insert(&db, &alice(), 1).await.unwrap();
            assert_eq!(
                set_password_hash_ending_sessions(&db, &user.id, "$argon2id$new", None, 5)
                    .await
                    .unwrap(),
                Some(0)
            );
            assert!(set_username(&db, &user.id, None, 6).await.unwrap());
            let found = find_by_id(&db, &user.id).await.unwrap().unwrap();
            assert_eq!((found.password_hash.as_str(), found.username), ("$argon2id$new", None));
            assert!(delete(&db, &user.id).await.unwrap());
            assert!(!delete(&db, &user.id).await.unwrap());
            assert_eq!(find_by_id(&db, &user.id).await.unwrap(), None);
        }
    }
}
