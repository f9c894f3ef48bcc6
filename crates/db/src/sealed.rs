//! Every ciphertext made under the master key, table by table, for master-key rotation:
//! users' Nostr keys (`keys.encrypted_secret`) and authorizations' bunker keys
//! (`authorizations.bunker_secret_encrypted`).
//!
//! Rotation reads them in pages ordered by id and replaces each one with a compare-and-swap
//! ([`swap`]): a row that a serving instance changed or deleted meanwhile is left alone, so
//! a rotation running beside `keycast serve` never overwrites a newer key with an older one.
//! Which master key encrypts a row is in the ciphertext itself (its key id), so no column
//! records rotation progress and a re-run simply skips what is done.

use crate::pool::on_engine;
use crate::{Db, RepoError};

/// A column holding ciphertexts under the master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedColumn {
    /// `keys.encrypted_secret`; the owner is `keys.user_id`.
    UserKeys,
    /// `authorizations.bunker_secret_encrypted`; the owner is the authorization itself.
    BunkerKeys,
}

impl SealedColumn {
    /// Both columns, in the order rotation walks them.
    pub const ALL: [SealedColumn; 2] = [SealedColumn::UserKeys, SealedColumn::BunkerKeys];

    /// `table.column`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            SealedColumn::UserKeys => "keys.encrypted_secret",
            SealedColumn::BunkerKeys => "authorizations.bunker_secret_encrypted",
        }
    }

    fn page_sql(self) -> &'static str {
        match self {
            SealedColumn::UserKeys => {
                "SELECT id, user_id AS owner, encrypted_secret AS ciphertext FROM keys WHERE id > $1 ORDER BY id LIMIT $2"
            }
            SealedColumn::BunkerKeys => {
                "SELECT id, id AS owner, bunker_secret_encrypted AS ciphertext FROM authorizations \
                 WHERE id > $1 ORDER BY id LIMIT $2"
            }
        }
    }

    fn foreign_sql(self) -> &'static str {
        match self {
            SealedColumn::UserKeys => {
                "SELECT COUNT(*) FROM keys WHERE substr(encrypted_secret, 1, 1) = $1 \
                 AND substr(encrypted_secret, 1, $2) <> $3 AND substr(encrypted_secret, 1, $2) <> $4"
            }
            SealedColumn::BunkerKeys => {
                "SELECT COUNT(*) FROM authorizations WHERE substr(bunker_secret_encrypted, 1, 1) = $1 \
                 AND substr(bunker_secret_encrypted, 1, $2) <> $3 AND substr(bunker_secret_encrypted, 1, $2) <> $4"
            }
        }
    }

    fn swap_sql(self) -> &'static str {
        match self {
            SealedColumn::UserKeys => "UPDATE keys SET encrypted_secret = $1 WHERE id = $2 AND encrypted_secret = $3",
            SealedColumn::BunkerKeys => {
                "UPDATE authorizations SET bunker_secret_encrypted = $1 WHERE id = $2 AND bunker_secret_encrypted = $3"
            }
        }
    }
}

/// One stored ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Sealed {
    /// The row's id (`keys.id` or `authorizations.id`).
    pub id: String,
    /// Whose key it is: the id bound into the ciphertext's associated data (a user id or
    /// an authorization id).
    pub owner: String,
    pub ciphertext: Vec<u8>,
}

/// Up to `limit` rows of `column` with an id after `after` (`""` for the first page), in id
/// order.
///
/// # Errors
/// Database errors.
pub async fn page(db: &Db, column: SealedColumn, after: &str, limit: i64) -> Result<Vec<Sealed>, RepoError> {
    on_engine!(db, |pool| {
        Ok(sqlx::query_as(column.page_sql())
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?)
    })
}

/// How many rows of `column` carry a header that starts with `format` but is neither
/// `allowed[0]` nor `allowed[1]` (headers of one length, format byte included): keys under a
/// master key that is not configured, counted without reading a ciphertext out.
///
/// # Errors
/// Database errors.
pub async fn count_foreign(db: &Db, column: SealedColumn, format: u8, allowed: [&[u8]; 2]) -> Result<i64, RepoError> {
    let len = allowed[0].len() as i32;
    let format = [format];
    on_engine!(db, |pool| {
        Ok(sqlx::query_scalar(column.foreign_sql())
            .bind(&format[..])
            .bind(len)
            .bind(allowed[0])
            .bind(allowed[1])
            .fetch_one(pool)
            .await?)
    })
}

/// Replaces row `id`'s ciphertext `old` with `new`, only if it still holds `old`. Returns
/// whether it did (false: the row changed or went away meanwhile).
///
/// # Errors
/// Database errors.
pub async fn swap(db: &Db, column: SealedColumn, id: &str, old: &[u8], new: &[u8]) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(column.swap_sql())
            .bind(new)
            .bind(id)
            .bind(old)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{self, KeyOrigin, NewKey};
    use crate::testing::{temp_dbs, test_authorization, test_user};
    use crate::KeyId;

    #[tokio::test]
    async fn pages_walk_every_ciphertext_and_swap_is_compare_and_swap() {
        for (_guard, db) in temp_dbs().await {
            let mut users = Vec::new();
            for n in 0..5 {
                let user = test_user(&db, &format!("u{n}@x.org")).await;
                let (id, pubkey, sealed) = (KeyId::generate(), format!("{n:064}"), format!("sealed-{n}"));
                let new = NewKey {
                    id: &id,
                    user_id: &user,
                    pubkey: &pubkey,
                    encrypted_secret: sealed.as_bytes(),
                    origin: KeyOrigin::Generated,
                };
                keys::insert(&db, &new, 1).await.unwrap();
                users.push(user);
            }
            let grant = test_authorization(&db, &users[0], "bb").await;

            let mut seen = Vec::new();
            let mut after = String::new();
            loop {
                let rows = page(&db, SealedColumn::UserKeys, &after, 2).await.unwrap();
                let Some(last) = rows.last() else { break };
                after = last.id.clone();
                seen.extend(rows);
            }
            assert_eq!(seen.len(), 5);
            assert!(seen.windows(2).all(|w| w[0].id < w[1].id));
            let owners: std::collections::HashSet<_> = seen.iter().map(|s| s.owner.clone()).collect();
            assert_eq!(owners, users.iter().map(|u| u.as_str().to_owned()).collect());

            let row = &seen[0];
            assert!(!swap(&db, SealedColumn::UserKeys, &row.id, b"not what it holds", b"x")
                .await
                .unwrap());
            assert!(swap(&db, SealedColumn::UserKeys, &row.id, &row.ciphertext, b"resealed")
                .await
                .unwrap());
            let again = page(&db, SealedColumn::UserKeys, "", 1).await.unwrap();
            assert_eq!(again[0].ciphertext, b"resealed");

            let bunkers = page(&db, SealedColumn::BunkerKeys, "", 10).await.unwrap();
            assert_eq!(bunkers.len(), 1);
            assert_eq!(
                (bunkers[0].id.as_str(), bunkers[0].owner.as_str()),
                (grant.id.as_str(), grant.id.as_str())
            );
            assert!(swap(
                &db,
                SealedColumn::BunkerKeys,
                &grant.id.to_string(),
                b"ciphertext",
                b"new"
            )
            .await
            .unwrap());
            assert_eq!(
                page(&db, SealedColumn::BunkerKeys, "", 10).await.unwrap()[0].ciphertext,
                b"new"
            );
        }
    }
}
