//! Master-key rotation: re-encrypt every stored key (users' Nostr keys, authorizations'
//! bunker keys) under the [`Keyring`]'s current master key, then prove every one of them
//! opens under that key alone.
//!
//! - **Resumable**: each ciphertext names its master key (key id in its header), so a row
//!   already under the current key is skipped by its header alone; an interrupted run
//!   (killed, or stopped by its limit) leaves every row whole under one key or the other,
//!   and the next run continues.
//! - **Safe beside a serving instance**: each row is replaced by a compare-and-swap on its
//!   old ciphertext, so a key a serving instance replaced meanwhile is never overwritten;
//!   a serving instance configured with both keys reads either during the rotation.
//! - **Verified**: a new ciphertext is decrypted under the current key alone and compared
//!   with the secret before it is written, and the run ends by opening every stored key
//!   under the current key alone ([`RotationReport::remaining`] counts what is still not
//!   under it). Only when that count is zero may the previous key be dropped.
//!
//! Nothing here logs a secret or a ciphertext: row ids and counts only.

use keycast_db::sealed::{self, Sealed, SealedColumn};
use keycast_db::{AuthorizationId, Db, RepoError, UserId};

use crate::key_manager::{KeyManager, KeyOwner, Keyring};
use crate::keys::{self, KeyError};
use crate::secret::ct_eq;

/// Rows read per query.
const PAGE: i64 = 500;

/// What a rotation did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RotationReport {
    /// Rows re-encrypted under the current key by this run.
    pub reencrypted: u64,
    /// Rows found already under the current key (by an earlier, interrupted run, or
    /// written since the current key was configured).
    pub already_current: u64,
    /// Rows that changed between being read and being replaced (a serving instance wrote
    /// them); left as written.
    pub changed_meanwhile: u64,
    /// Rows that opened under the current key alone in the final check.
    pub verified: u64,
    /// Rows still not under the current key after this run; zero when the rotation is
    /// complete.
    pub remaining: u64,
}

impl RotationReport {
    /// Whether every stored key is under the current key and opens under it alone.
    pub fn complete(&self) -> bool {
        self.remaining == 0
    }
}

/// Why a rotation stopped.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// Neither configured key opens this row; nothing was written for it.
    #[error(
        "{column} of row {id} opens under neither the current nor the previous master key; \
         it was left as it is (set KEYCAST_MASTER_KEY_PREVIOUS to the key it was made with)"
    )]
    Undecryptable { column: &'static str, id: String },
    /// A row under the current key does not open under it alone.
    #[error("verification failed: {column} of row {id} is labelled with the current master key but does not open under it ({source})")]
    Verification {
        column: &'static str,
        id: String,
        source: KeyError,
    },
    #[error("re-encryption failed: {0}")]
    Key(#[from] KeyError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Re-encrypts up to `limit` rows (all with `None`) that are not under `ring`'s current
/// key, then checks every row. See the module documentation.
///
/// # Errors
/// [`RotationError::Undecryptable`] for a row neither key opens (rows before it stay
/// rotated; a re-run continues once the right previous key is configured);
/// [`RotationError::Verification`]; database errors.
pub async fn rotate(db: &Db, ring: &Keyring, limit: Option<u64>) -> Result<RotationReport, RotationError> {
    let mut report = RotationReport::default();
    let mut budget = limit;
    for column in SealedColumn::ALL {
        let before = report.reencrypted;
        let mut rows = Pages::new(column);
        while let Some(row) = rows.next(db).await? {
            if ring.is_current(&row.ciphertext) {
                report.already_current += 1;
                continue;
            }
            if budget == Some(0) {
                continue;
            }
            let new = reseal(ring, column, &row)?;
            if sealed::swap(db, column, &row.id, &row.ciphertext, &new).await? {
                report.reencrypted += 1;
                budget = budget.map(|b| b - 1);
            } else {
                report.changed_meanwhile += 1;
            }
        }
        tracing::info!(
            column = column.name(),
            reencrypted = report.reencrypted - before,
            "master-key rotation: column done"
        );
    }
    let (verified, remaining) = verify(db, ring).await?;
    report.verified = verified;
    report.remaining = remaining;
    Ok(report)
}

/// Opens every row under `ring`'s current key alone: returns how many opened, and how
/// many are not under the current key yet.
///
/// # Errors
/// [`RotationError::Verification`] for a row labelled with the current key that does not
/// open under it; database errors.
pub async fn verify(db: &Db, ring: &Keyring) -> Result<(u64, u64), RotationError> {
    let (mut verified, mut remaining) = (0, 0);
    for column in SealedColumn::ALL {
        let mut rows = Pages::new(column);
        while let Some(row) = rows.next(db).await? {
            if !ring.is_current(&row.ciphertext) {
                remaining += 1;
                continue;
            }
            let mut ids = Ids::default();
            keys::open(ring.current(), &row.ciphertext, owner(column, &row, &mut ids)).map_err(|source| {
                RotationError::Verification {
                    column: column.name(),
                    id: row.id.clone(),
                    source,
                }
            })?;
            verified += 1;
        }
    }
    Ok((verified, remaining))
}

/// How many stored keys are under a master key the keyring does not hold (by their
/// headers; nothing is decrypted): more than zero at start means a rotation was left
/// unfinished and its previous key dropped too early. Ciphertexts from before key ids
/// (format 1) are not counted; the start-up sample decrypts those.
///
/// # Errors
/// Database errors.
pub async fn count_under_other_keys(db: &Db, ring: &Keyring) -> Result<i64, RepoError> {
    let [current, previous] = ring.headers();
    let mut total = 0;
    for column in SealedColumn::ALL {
        total += sealed::count_foreign(db, column, crate::key_manager::FORMAT_V2, [&current, &previous]).await?;
    }
    Ok(total)
}

/// The rows of one column, read a page at a time in id order.
struct Pages {
    column: SealedColumn,
    after: String,
    page: std::vec::IntoIter<Sealed>,
}

impl Pages {
    fn new(column: SealedColumn) -> Pages {
        Pages {
            column,
            after: String::new(),
            page: Vec::new().into_iter(),
        }
    }

    async fn next(&mut self, db: &Db) -> Result<Option<Sealed>, RepoError> {
        if let Some(row) = self.page.next() {
            return Ok(Some(row));
        }
        let rows = sealed::page(db, self.column, &self.after, PAGE).await?;
        if let Some(last) = rows.last() {
            self.after = last.id.clone();
        }
        self.page = rows.into_iter();
        Ok(self.page.next())
    }
}

/// Typed ids for a row's owner, kept alive for the borrow in [`KeyOwner`].
#[derive(Default)]
struct Ids {
    user: Option<UserId>,
    authorization: Option<AuthorizationId>,
}

fn owner<'a>(column: SealedColumn, row: &Sealed, ids: &'a mut Ids) -> KeyOwner<'a> {
    match column {
        SealedColumn::UserKeys => KeyOwner::User(ids.user.insert(UserId::new(row.owner.clone()))),
        SealedColumn::BunkerKeys => KeyOwner::Bunker(ids.authorization.insert(AuthorizationId::new(row.owner.clone()))),
    }
}

/// The row's secret under the current key, checked to open under the current key alone
/// to the same secret before anything is written.
fn reseal(ring: &Keyring, column: SealedColumn, row: &Sealed) -> Result<Vec<u8>, RotationError> {
    let mut ids = Ids::default();
    let owner = owner(column, row, &mut ids);
    let undecryptable = || RotationError::Undecryptable {
        column: column.name(),
        id: row.id.clone(),
    };
    let secret = ring.decrypt(&row.ciphertext, owner).map_err(|_| undecryptable())?;
    let new = ring.current().encrypt(&secret, owner)?;
    let check = ring.current().decrypt(&new, owner)?;
    if !ct_eq(check.expose(), secret.expose()) {
        return Err(KeyError::Crypto.into());
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::create_grant;
    use crate::key_manager::{MasterKey, MasterKeyManager};
    use crate::testing::{social_policy, test_user};
    use keycast_db::DbOptions;

    /// A database with `users` users (each with a key) and one grant per user, all sealed
    /// under `old`; returns each user's and each grant's public key.
    async fn populated(db: &Db, old: &MasterKeyManager, users: usize) -> Vec<(UserId, String)> {
        let dummy = crate::testing::fixture().await;
        let policy = social_policy(&dummy).await;
        let mut out = Vec::new();
        for n in 0..users {
            let user = test_user(db, &format!("u{n}@example.com")).await;
            let key = keys::generate_user_key(db, old, &user, 1).await.unwrap();
            let grant = crate::authz::NewGrant {
                user_id: &user,
                policy: &policy,
                client_id: "app",
                redirect_origin: "https://app.example",
                relays: &[],
                token_ttl_secs: 60,
                terms: Default::default(),
                max_live: crate::authz::DEFAULT_MAX_LIVE_GRANTS,
                session: None,
            };
            create_grant(db, old, &grant, 1).await.unwrap();
            out.push((user, key.pubkey.to_hex()));
        }
        out
    }

    fn copy(key: &MasterKey) -> MasterKey {
        MasterKey::from_base64(key.to_base64().expose()).unwrap()
    }

    async fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&DbOptions::new(dir.path().join("k.db"))).await.unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn interrupted_rotation_resumes_and_old_key_then_opens_nothing() {
        let (_dir, db) = temp_db().await;
        let (old, new) = (MasterKey::generate(), MasterKey::generate());
        let before = MasterKeyManager::new(copy(&old));
        let users = populated(&db, &before, 4).await;
        let ring = Keyring::new(copy(&new), Some(copy(&old)));

        // Stopped after 3 of the 8 sealed keys, as if interrupted.
        let first = rotate(&db, &ring, Some(3)).await.unwrap();
        assert_eq!((first.reencrypted, first.remaining, first.verified), (3, 5, 3));
        assert!(!first.complete());
        // With both keys nothing is foreign; with the new key alone the 5 left behind are.
        assert_eq!(count_under_other_keys(&db, &ring).await.unwrap(), 0);
        let new_only = Keyring::new(copy(&new), None);
        assert_eq!(count_under_other_keys(&db, &new_only).await.unwrap(), 5);
        // Meanwhile a serving instance with both keys still opens every key.
        for (user, pubkey) in &users {
            let keys = keys::load_user_keys(&db, &ring, user).await.unwrap();
            assert_eq!(&keys.public_key().to_hex(), pubkey);
        }
        let second = rotate(&db, &ring, None).await.unwrap();
        assert_eq!(
            (second.reencrypted, second.already_current, second.remaining),
            (5, 3, 0)
        );
        assert_eq!(second.verified, 8);
        assert!(second.complete());
        // Idempotent.
        let third = rotate(&db, &ring, None).await.unwrap();
        assert_eq!((third.reencrypted, third.already_current, third.verified), (0, 8, 8));

        let new_alone = MasterKeyManager::new(copy(&new));
        keys::verify_can_decrypt(&db, &new_alone).await.unwrap();
        assert_eq!(count_under_other_keys(&db, &new_only).await.unwrap(), 0);
        assert_eq!(
            count_under_other_keys(&db, &Keyring::new(copy(&old), None))
                .await
                .unwrap(),
            8
        );
        for (user, pubkey) in &users {
            let keys = keys::load_user_keys(&db, &new_alone, user).await.unwrap();
            assert_eq!(&keys.public_key().to_hex(), pubkey);
        }
        // The old key alone opens no stored key at all.
        for column in SealedColumn::ALL {
            for row in sealed::page(&db, column, "", 100).await.unwrap() {
                let mut ids = Ids::default();
                assert!(before.decrypt(&row.ciphertext, owner(column, &row, &mut ids)).is_err());
            }
        }
        assert!(keys::verify_can_decrypt(&db, &before).await.is_err());
    }

    #[tokio::test]
    async fn a_row_neither_key_opens_stops_the_rotation_naming_it() {
        let (_dir, db) = temp_db().await;
        let stranger = MasterKeyManager::new(MasterKey::generate());
        populated(&db, &stranger, 1).await;
        let ring = Keyring::new(MasterKey::generate(), Some(MasterKey::generate()));
        let err = rotate(&db, &ring, None).await.unwrap_err();
        assert!(
            matches!(
                err,
                RotationError::Undecryptable {
                    column: "keys.encrypted_secret",
                    ..
                }
            ),
            "{err}"
        );
        // Nothing was changed.
        assert!(keys::verify_can_decrypt(&db, &stranger).await.is_ok());
    }

    #[tokio::test]
    async fn a_row_changed_meanwhile_is_not_overwritten() {
        let (_dir, db) = temp_db().await;
        let (old, new) = (MasterKey::generate(), MasterKey::generate());
        let before = MasterKeyManager::new(copy(&old));
        populated(&db, &before, 1).await;
        let ring = Keyring::new(copy(&new), Some(copy(&old)));
        let row = sealed::page(&db, SealedColumn::UserKeys, "", 1)
            .await
            .unwrap()
            .remove(0);
        let resealed = reseal(&ring, SealedColumn::UserKeys, &row).unwrap();
        // A serving instance replaces the ciphertext first...
        let fresh = reseal(&ring, SealedColumn::UserKeys, &row).unwrap();
        assert!(
            sealed::swap(&db, SealedColumn::UserKeys, &row.id, &row.ciphertext, &fresh)
                .await
                .unwrap()
        );
        // ...so the rotation's swap on the old ciphertext does nothing.
        assert!(
            !sealed::swap(&db, SealedColumn::UserKeys, &row.id, &row.ciphertext, &resealed)
                .await
                .unwrap()
        );
        let now = sealed::page(&db, SealedColumn::UserKeys, "", 1)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(now.ciphertext, fresh);
    }
}
