//! Rotating refresh tokens (`refresh_tokens`), stored only as [`TokenHash`]es, and the
//! revocation of single access tokens (RFC 7009).
//!
//! A token's family is its authorization: every refresh token descends from the one the
//! code exchange issued for it. [`rotate`] spends a token and stores its successor and a
//! new access token in one transaction, and the spend is one conditional `UPDATE`, so of
//! two concurrent refreshes with the same token at most one succeeds. Deciding what a
//! failed spend means (reuse, expiry, revocation) is `keycast-core`'s job, from [`find`].

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::Db;
use crate::{AuthorizationId, RepoError, TokenHash, UserId};

const INSERT_REFRESH_TOKEN: &str =
    "INSERT INTO refresh_tokens (token_hash, authorization_id, created_at, expires_at) VALUES ($1, $2, $3, $4)";

/// Stores the new pair `$next` of `$authorization` in the transaction `$tx`: a macro, since
/// the bodies run under `on_engine!` with either engine's transaction type.
macro_rules! insert_pair {
    ($tx:ident, $next:ident, $authorization:ident, $now:ident) => {
        sqlx::query(INSERT_REFRESH_TOKEN)
            .bind($next.refresh_hash)
            .bind(&$authorization)
            .bind($now)
            .bind($next.refresh_expires_at)
            .execute(&mut *$tx)
            .await?;
        sqlx::query(crate::oauth::INSERT_ACCESS_TOKEN)
            .bind($next.access_hash)
            .bind(&$authorization)
            .bind($now)
            .bind($next.access_expires_at)
            .execute(&mut *$tx)
            .await?;
    };
}

/// A stored refresh token with what the refresh checks need of its authorization.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RefreshRow {
    pub authorization_id: AuthorizationId,
    pub user_id: UserId,
    pub client_id: String,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    /// The authorization's revocation time.
    pub revoked_at: Option<i64>,
    /// The refresh token that replaced this one, once spent (migration 0009).
    pub successor_hash: Option<TokenHash>,
}

/// Stores a refresh token for an authorization, valid until `expires_at`.
///
/// # Errors
/// [`RepoError::MissingReference`] for an unknown authorization; database errors.
pub async fn insert(
    db: &Db,
    hash: &TokenHash,
    authorization: &AuthorizationId,
    now: i64,
    expires_at: i64,
) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query(INSERT_REFRESH_TOKEN)
            .bind(hash)
            .bind(authorization)
            .bind(now)
            .bind(expires_at)
            .execute(pool)
            .await?;
        Ok(())
    })
}

/// Looks a refresh token up by hash, spent, expired or revoked alike.
///
/// # Errors
/// Database errors.
pub async fn find(db: &Db, hash: &TokenHash) -> Result<Option<RefreshRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = "SELECT r.authorization_id, a.user_id, a.client_id, r.expires_at, r.used_at, a.revoked_at, \
                   r.successor_hash FROM refresh_tokens r JOIN authorizations a ON a.id = r.authorization_id \
                   WHERE r.token_hash = $1";
        Ok(sqlx::query_as(sql).bind(hash).fetch_optional(pool).await?)
    })
}

/// The pair that replaces a spent refresh token.
#[derive(Debug, Clone)]
pub struct Successor<'a> {
    pub refresh_hash: &'a TokenHash,
    pub refresh_expires_at: i64,
    pub access_hash: &'a TokenHash,
    pub access_expires_at: i64,
}

/// Spends the refresh token `old` (unspent, unexpired, of a live authorization) and stores
/// `next` in its family, in one transaction. Returns the authorization, or `None` when the
/// token could not be spent (then nothing was stored). Of any number of concurrent calls
/// with the same token, at most one returns `Some`.
///
/// # Errors
/// Database errors (then nothing was spent).
pub async fn rotate(
    db: &Db,
    old: &TokenHash,
    next: &Successor<'_>,
    now: i64,
) -> Result<Option<AuthorizationId>, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        let spent: Option<AuthorizationId> = sqlx::query_scalar(
            "UPDATE refresh_tokens SET used_at = $1, successor_hash = $3, successor_access_hash = $4 \
             WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 \
             AND authorization_id IN (SELECT id FROM authorizations WHERE revoked_at IS NULL) \
             RETURNING authorization_id",
        )
        .bind(now)
        .bind(old)
        .bind(next.refresh_hash)
        .bind(next.access_hash)
        .fetch_all(&mut *tx)
        .await?
        .into_first();
        let Some(authorization) = spent else {
            return Ok(None);
        };
        insert_pair!(tx, next, authorization, now);
        tx.commit().await?;
        Ok(Some(authorization))
    })
}

/// The grace retry of a lost refresh response: `old` was spent at or after `spent_since`
/// and its successor `superseded` was never used. In one transaction, spends `superseded`
/// (so presenting it later is reuse), deletes the access token issued with it, and stores
/// `next` as `old`'s successor instead.
/// Returns the authorization, or `None` when any condition no longer holds (the successor
/// was used meanwhile, the window passed, the authorization was revoked): then nothing
/// changed. Of concurrent retries, at most one replaces a given successor.
///
/// # Errors
/// Database errors (then nothing changed).
pub async fn replace_unused_successor(
    db: &Db,
    old: &TokenHash,
    superseded: &TokenHash,
    next: &Successor<'_>,
    spent_since: i64,
    now: i64,
) -> Result<Option<AuthorizationId>, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        // The access token issued with the superseded successor goes with it.
        let superseded_access: Option<Option<TokenHash>> = sqlx::query_scalar(
            "SELECT successor_access_hash FROM refresh_tokens WHERE token_hash = $1 AND successor_hash = $2",
        )
        .bind(old)
        .bind(superseded)
        .fetch_optional(&mut *tx)
        .await?;
        let authorization: Option<AuthorizationId> = sqlx::query_scalar(
            "UPDATE refresh_tokens SET successor_hash = $1, successor_access_hash = $2 \
             WHERE token_hash = $3 AND successor_hash = $4 AND used_at >= $5 \
             AND authorization_id IN (SELECT id FROM authorizations WHERE revoked_at IS NULL) \
             RETURNING authorization_id",
        )
        .bind(next.refresh_hash)
        .bind(next.access_hash)
        .bind(old)
        .bind(superseded)
        .bind(spent_since)
        .fetch_all(&mut *tx)
        .await?
        .into_first();
        let Some(authorization) = authorization else {
            return Ok(None);
        };
        // Spent, not deleted: should whoever holds it present it later, that is reuse.
        let removed = sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL")
            .bind(now)
            .bind(superseded)
            .execute(&mut *tx)
            .await?;
        if removed.rows_affected() != 1 {
            // The successor was used meanwhile: the retry is reuse after all.
            tx.rollback().await?;
            return Ok(None);
        }
        if let Some(Some(access)) = superseded_access {
            sqlx::query("DELETE FROM access_tokens WHERE token_hash = $1")
                .bind(access)
                .execute(&mut *tx)
                .await?;
        }
        insert_pair!(tx, next, authorization, now);
        tx.commit().await?;
        Ok(Some(authorization))
    })
}

/// Deletes one access token (RFC 7009 revocation of an access token). Returns the
/// authorization it belonged to, `None` if there was no such token.
///
/// # Errors
/// Database errors.
pub async fn delete_access_token(db: &Db, hash: &TokenHash) -> Result<Option<AuthorizationId>, RepoError> {
    on_engine!(db, |pool| {
        Ok(
            sqlx::query_scalar("DELETE FROM access_tokens WHERE token_hash = $1 RETURNING authorization_id")
                .bind(hash)
                .fetch_all(pool)
                .await?
                .into_first(),
        )
    })
}

/// Removes refresh tokens that expired before `now`, spent or not. Returns how many.
///
/// # Errors
/// Database errors.
pub async fn delete_expired(db: &Db, now: i64) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::{find_token_grant, insert_access_token};
    use crate::testing::{temp_dbs, test_authorization, test_user};

    fn successor<'a>(refresh: &'a TokenHash, access: &'a TokenHash) -> Successor<'a> {
        Successor {
            refresh_hash: refresh,
            refresh_expires_at: 500,
            access_hash: access,
            access_expires_at: 200,
        }
    }

    #[tokio::test]
    async fn rotation_spends_the_old_token_once_and_stores_the_new_pair() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let (r0, r1, a1) = (TokenHash::of(b"r0"), TokenHash::of(b"r1"), TokenHash::of(b"a1"));
            insert(&db, &r0, &authz.id, 1, 100).await.unwrap();
            assert_eq!(
                rotate(&db, &r0, &successor(&r1, &a1), 10).await.unwrap(),
                Some(authz.id.clone())
            );
            let spent = find(&db, &r0).await.unwrap().unwrap();
            assert_eq!((spent.used_at, spent.client_id.as_str()), (Some(10), "app"));
            assert_eq!(find(&db, &r1).await.unwrap().unwrap().used_at, None);
            assert_eq!(find_token_grant(&db, &a1).await.unwrap().unwrap().token_expires_at, 200);
            let (r2, a2) = (TokenHash::of(b"r2"), TokenHash::of(b"a2"));
            assert_eq!(rotate(&db, &r0, &successor(&r2, &a2), 11).await.unwrap(), None);
            assert_eq!(find(&db, &r2).await.unwrap(), None, "a refused rotation stores nothing");
        }
    }

    #[tokio::test]
    async fn expired_or_revoked_tokens_do_not_rotate() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let (r0, r1, a1) = (TokenHash::of(b"r0"), TokenHash::of(b"r1"), TokenHash::of(b"a1"));
            insert(&db, &r0, &authz.id, 1, 100).await.unwrap();
            assert_eq!(rotate(&db, &r0, &successor(&r1, &a1), 100).await.unwrap(), None);
            let live = TokenHash::of(b"live");
            insert(&db, &live, &authz.id, 1, 1000).await.unwrap();
            crate::authz::revoke(&db, &authz.id, &user, 50).await.unwrap();
            assert_eq!(rotate(&db, &live, &successor(&r1, &a1), 60).await.unwrap(), None);
            assert_eq!(find(&db, &live).await.unwrap().unwrap().revoked_at, Some(50));
            assert_eq!(delete_expired(&db, 100).await.unwrap(), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_rotations_of_one_token_let_exactly_one_win() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let r0 = TokenHash::of(b"r0");
            insert(&db, &r0, &authz.id, 1, 100).await.unwrap();
            let tasks: Vec<_> = (0..8u8)
                .map(|i| {
                    let (db, r0) = (db.clone(), r0.clone());
                    tokio::spawn(async move {
                        let (r, a) = (TokenHash::of(&[b'r', i]), TokenHash::of(&[b'a', i]));
                        rotate(&db, &r0, &successor(&r, &a), 10).await.unwrap().is_some()
                    })
                })
                .collect();
            let mut winners = 0;
            for task in tasks {
                winners += usize::from(task.await.unwrap());
            }
            assert_eq!(winners, 1);
        }
    }

    #[tokio::test]
    async fn an_access_token_is_deleted_alone() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let (a, b) = (TokenHash::of(b"a"), TokenHash::of(b"b"));
            insert_access_token(&db, &a, &authz.id, 1, 100).await.unwrap();
            insert_access_token(&db, &b, &authz.id, 1, 100).await.unwrap();
            assert_eq!(delete_access_token(&db, &a).await.unwrap(), Some(authz.id.clone()));
            assert_eq!(delete_access_token(&db, &a).await.unwrap(), None);
            assert!(find_token_grant(&db, &b).await.unwrap().is_some());
        }
    }
}
