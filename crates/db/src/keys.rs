//! The `keys` table: each user's Nostr key as ciphertext.
//!
//! `encrypted_secret` is whatever `keycast-core`'s key manager produced (AES-256-GCM
//! nonce + ciphertext + tag, bound to the owner). This module never sees a plaintext key
//! and cannot encrypt or decrypt one.

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::Db;

use crate::{KeyId, RepoError, UserId};

/// How a key came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Made by keycast at registration.
    Generated,
    /// Brought by the user (nsec or hex).
    Imported,
}

impl KeyOrigin {
    /// The stored text (`keys.origin`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::Generated => "generated",
            KeyOrigin::Imported => "imported",
        }
    }

    fn parse(text: &str) -> Result<Self, RepoError> {
        match text {
            "generated" => Ok(KeyOrigin::Generated),
            "imported" => Ok(KeyOrigin::Imported),
            other => Err(RepoError::Corrupt(format!("keys.origin {other:?}"))),
        }
    }
}

/// A stored (encrypted) key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub id: KeyId,
    pub user_id: UserId,
    /// The public key, 64 lowercase hex characters.
    pub pubkey: String,
    /// Ciphertext from the key manager; never plaintext.
    pub encrypted_secret: Vec<u8>,
    pub origin: KeyOrigin,
    pub created_at: i64,
    /// When the key was last exported (recorded since schema version 2).
    pub last_exported_at: Option<i64>,
    /// When the key was marked as possibly known to someone else, and why (see
    /// [`mark_exposed`]); `None` while it is not.
    pub exposed_at: Option<i64>,
    pub exposure: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: KeyId,
    user_id: UserId,
    pubkey: String,
    encrypted_secret: Vec<u8>,
    origin: String,
    created_at: i64,
    last_exported_at: Option<i64>,
    exposed_at: Option<i64>,
    exposure: Option<String>,
}

impl TryFrom<Row> for StoredKey {
    type Error = RepoError;
    fn try_from(row: Row) -> Result<Self, RepoError> {
        Ok(StoredKey {
            id: row.id,
            user_id: row.user_id,
            pubkey: row.pubkey,
            encrypted_secret: row.encrypted_secret,
            origin: KeyOrigin::parse(&row.origin)?,
            created_at: row.created_at,
            last_exported_at: row.last_exported_at,
            exposed_at: row.exposed_at,
            exposure: row.exposure,
        })
    }
}

/// What [`insert`] needs. The id must be chosen by the caller *before* encrypting,
/// because it may be part of the ciphertext's associated data.
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    pub id: &'a KeyId,
    pub user_id: &'a UserId,
    pub pubkey: &'a str,
    pub encrypted_secret: &'a [u8],
    pub origin: KeyOrigin,
}

macro_rules! columns {
    () => {
        "id, user_id, pubkey, encrypted_secret, origin, created_at, last_exported_at, exposed_at, exposure"
    };
}

/// Stores a user's encrypted key. A user has at most one key.
///
/// # Errors
/// [`RepoError::AlreadyExists`] if the user already has a key (`user_id`) or another
/// user holds this public key (`pubkey`); [`RepoError::MissingReference`] for an unknown
/// user; database errors.
pub async fn insert(db: &Db, new: &NewKey<'_>, now: i64) -> Result<StoredKey, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "INSERT INTO keys (id, user_id, pubkey, encrypted_secret, origin, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
            columns!(),
            ""
        );
        let row: Row = sqlx::query_as(sql)
            .bind(new.id)
            .bind(new.user_id)
            .bind(new.pubkey)
            .bind(new.encrypted_secret)
            .bind(new.origin.as_str())
            .bind(now)
            .fetch_all(pool)
            .await?
            .into_one()?;
        row.try_into()
    })
}

/// The key of a user.
///
/// # Errors
/// Database errors; [`RepoError::Corrupt`] for an unreadable row.
pub async fn find_by_user(db: &Db, user: &UserId) -> Result<Option<StoredKey>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM keys WHERE user_id = $1");
        let row: Option<Row> = sqlx::query_as(sql).bind(user).fetch_optional(pool).await?;
        row.map(TryInto::try_into).transpose()
    })
}

/// The key with this public key (64 lowercase hex).
///
/// # Errors
/// Database errors; [`RepoError::Corrupt`] for an unreadable row.
pub async fn find_by_pubkey(db: &Db, pubkey: &str) -> Result<Option<StoredKey>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM keys WHERE pubkey = $1");
        let row: Option<Row> = sqlx::query_as(sql).bind(pubkey).fetch_optional(pool).await?;
        row.map(TryInto::try_into).transpose()
    })
}

/// The oldest and the newest stored key (one row when there is only one, none on an empty
/// table): the sample the start-up check decrypts to prove the master key matches the data.
///
/// # Errors
/// Database errors; [`RepoError::Corrupt`] for an unreadable row.
pub async fn find_oldest_and_newest(db: &Db) -> Result<Vec<StoredKey>, RepoError> {
    on_engine!(db, |pool| {
        let oldest = concat!("SELECT ", columns!(), " FROM keys ORDER BY created_at, id LIMIT 1");
        let newest = concat!(
            "SELECT ",
            columns!(),
            " FROM keys ORDER BY created_at DESC, id DESC LIMIT 1"
        );
        let mut keys: Vec<StoredKey> = Vec::new();
        for sql in [oldest, newest] {
            let row: Option<Row> = sqlx::query_as(sql).fetch_optional(pool).await?;
            if let Some(key) = row.map(StoredKey::try_from).transpose()? {
                if keys.iter().all(|k| k.id != key.id) {
                    keys.push(key);
                }
            }
        }
        Ok(keys)
    })
}

/// Replaces a user's key with `new` (a fresh key: new id, pubkey and ciphertext): the
/// export and exposure records go with the old key. Returns false if the user had none.
///
/// # Errors
/// [`RepoError::AlreadyExists`] if another user holds the new public key; database errors.
pub async fn replace(db: &Db, new: &NewKey<'_>, password_hash: &str, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        // The password is read in the statement's snapshot: on PostgreSQL a reset committed
        // while this waited for the key's row would go unseen. Under the account's lock (the
        // reset's password write takes it too) the statement reads after the reset.
        if let Some(lock) = crate::users::account_lock(db.kind()) {
            sqlx::query(lock).bind(new.user_id).execute(&mut *tx).await?;
        }
        let done = sqlx::query(
            "UPDATE keys SET id = $1, pubkey = $2, encrypted_secret = $3, origin = $4, created_at = $5, \
         last_exported_at = NULL, exposed_at = NULL, exposure = NULL \
         WHERE user_id = $6 AND EXISTS (SELECT 1 FROM users WHERE id = $6 AND password_hash = $7)",
        )
        .bind(new.id)
        .bind(new.pubkey)
        .bind(new.encrypted_secret)
        .bind(new.origin.as_str())
        .bind(now)
        .bind(new.user_id)
        .bind(password_hash)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Records that the user's key was exported at `now`, while `password_hash` (the one the
/// export's password was checked against) is still the account's, and returns the public
/// key recorded: the export hands out that key only. `None` if they have no key or the
/// password changed (a reset meanwhile outranks the export). On PostgreSQL under the
/// account's lock, as [`replace`].
///
/// # Errors
/// Database errors.
pub async fn mark_exported(db: &Db, user: &UserId, password_hash: &str, now: i64) -> Result<Option<String>, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        if let Some(lock) = crate::users::account_lock(db.kind()) {
            sqlx::query(lock).bind(user).execute(&mut *tx).await?;
        }
        let recorded: Option<String> = sqlx::query_scalar(
            "UPDATE keys SET last_exported_at = $1 \
             WHERE user_id = $2 AND EXISTS (SELECT 1 FROM users WHERE id = $2 AND password_hash = $3) \
             RETURNING pubkey",
        )
        .bind(now)
        .bind(user)
        .bind(password_hash)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .next();
        tx.commit().await?;
        Ok(recorded)
    })
}

/// Marks the user's key as possibly known to someone else, for `reason`; an earlier mark
/// is kept (the first time and reason win). Returns false if they have no key.
///
/// # Errors
/// Database errors.
pub async fn mark_exposed(db: &Db, user: &UserId, reason: &str, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
        "UPDATE keys SET exposed_at = COALESCE(exposed_at, $1), exposure = COALESCE(exposure, $2) WHERE user_id = $3",
    )
    .bind(now)
    .bind(reason)
    .bind(user)
    .execute(pool)
    .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Clears the exposure mark (the owner says the key is theirs alone). Returns whether
/// there was one.
///
/// # Errors
/// Database errors.
pub async fn clear_exposure(db: &Db, user: &UserId) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE keys SET exposed_at = NULL, exposure = NULL WHERE user_id = $1 AND exposed_at IS NOT NULL",
        )
        .bind(user)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Deletes a user's key. Returns false if they had none.
///
/// # Errors
/// Database errors.
pub async fn delete_for_user(db: &Db, user: &UserId) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM keys WHERE user_id = $1")
            .bind(user)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{temp_dbs, test_user, STUB_HASH};

    fn new_key<'a>(id: &'a KeyId, user: &'a UserId, pubkey: &'a str) -> NewKey<'a> {
        NewKey {
            id,
            user_id: user,
            pubkey,
            encrypted_secret: b"\x01ciphertext",
            origin: KeyOrigin::Imported,
        }
    }

    #[tokio::test]
    async fn stored_key_is_found_by_user_pubkey_and_age() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let id = KeyId::generate();
            let key = insert(&db, &new_key(&id, &user, "aa"), 7).await.unwrap();
            assert_eq!(
                (key.origin, key.created_at, key.encrypted_secret.as_slice()),
                (KeyOrigin::Imported, 7, &b"\x01ciphertext"[..])
            );
            assert_eq!(find_by_user(&db, &user).await.unwrap().as_ref(), Some(&key));
            assert_eq!(find_by_pubkey(&db, "aa").await.unwrap().as_ref(), Some(&key));
            assert_eq!(find_oldest_and_newest(&db).await.unwrap(), vec![key.clone()]);
            let other = test_user(&db, "b@x.org").await;
            let newer = insert(&db, &new_key(&KeyId::generate(), &other, "bb"), 9)
                .await
                .unwrap();
            assert_eq!(find_oldest_and_newest(&db).await.unwrap(), vec![key, newer]);
        }
    }

    #[tokio::test]
    async fn export_exposure_and_replacement_are_recorded_on_the_key() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            insert(&db, &new_key(&KeyId::generate(), &user, "aa"), 1).await.unwrap();
            assert_eq!(
                mark_exported(&db, &user, "another password's hash", 5).await.unwrap(),
                None,
                "checked against a password that is no longer the account's"
            );
            assert_eq!(find_by_user(&db, &user).await.unwrap().unwrap().last_exported_at, None);
            assert_eq!(
                mark_exported(&db, &user, STUB_HASH, 5).await.unwrap().as_deref(),
                Some("aa"),
                "the export hands out the key it recorded"
            );
            assert!(mark_exposed(&db, &user, "first", 6).await.unwrap());
            assert!(mark_exposed(&db, &user, "second", 7).await.unwrap());
            let key = find_by_user(&db, &user).await.unwrap().unwrap();
            assert_eq!(
                (key.last_exported_at, key.exposed_at, key.exposure.as_deref()),
                (Some(5), Some(6), Some("first"))
            );
            let id = KeyId::generate();
            let fresh = NewKey {
                origin: KeyOrigin::Generated,
                ..new_key(&id, &user, "bb")
            };
            assert!(!replace(&db, &fresh, "another password's hash", 9).await.unwrap());
            assert!(replace(&db, &fresh, STUB_HASH, 9).await.unwrap());
            let key = find_by_user(&db, &user).await.unwrap().unwrap();
            assert_eq!((key.id, key.pubkey.as_str(), key.created_at), (id, "bb", 9));
            assert_eq!((key.last_exported_at, key.exposed_at, key.exposure), (None, None, None));
            assert!(mark_exposed(&db, &user, "again", 10).await.unwrap());
            assert!(clear_exposure(&db, &user).await.unwrap());
            assert!(!clear_exposure(&db, &user).await.unwrap());
        }
    }

    #[tokio::test]
    async fn a_pubkey_belongs_to_one_user_only() {
        for (_guard, db) in temp_dbs().await {
            let a = test_user(&db, "a@x.org").await;
            let b = test_user(&db, "b@x.org").await;
            insert(&db, &new_key(&KeyId::generate(), &a, "aa"), 1).await.unwrap();
            let err = insert(&db, &new_key(&KeyId::generate(), &b, "aa"), 1)
                .await
                .unwrap_err();
            assert!(err.is_duplicate_of("pubkey"), "{err:?}");
        }
    }

    #[tokio::test]
    async fn a_user_has_one_key_only() {
        for (_guard, db) in temp_dbs().await {
            let a = test_user(&db, "a@x.org").await;
            insert(&db, &new_key(&KeyId::generate(), &a, "aa"), 1).await.unwrap();
            let err = insert(&db, &new_key(&KeyId::generate(), &a, "bb"), 1)
                .await
                .unwrap_err();
            assert!(err.is_duplicate_of("user_id"), "{err:?}");
        }
    }

    #[tokio::test]
    async fn empty_table_has_no_key_and_delete_reports_absence() {
        for (_guard, db) in temp_dbs().await {
            let a = test_user(&db, "a@x.org").await;
            assert_eq!(find_oldest_and_newest(&db).await.unwrap(), vec![]);
            assert!(!delete_for_user(&db, &a).await.unwrap());
            insert(&db, &new_key(&KeyId::generate(), &a, "aa"), 1).await.unwrap();
            assert!(delete_for_user(&db, &a).await.unwrap());
            assert_eq!(find_by_user(&db, &a).await.unwrap(), None);
        }
    }
}
