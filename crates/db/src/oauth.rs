//! OAuth 2.0 authorization codes (`oauth_codes`) and the opaque bearer tokens issued for
//! them (`access_tokens`), both stored only as [`TokenHash`]es.
//!
//! Redemption of a code is one conditional `UPDATE … RETURNING`, so two concurrent token
//! requests with the same code can never both succeed. Checking PKCE, `client_id` and
//! `redirect_uri` against the redeemed row is `keycast-core`'s job; a code that fails
//! those checks has still been used up, as RFC 6749 §4.1.2 asks. A redeemed code keeps the
//! authorization it became ([`link_code`]) until it expires, so that a second use of it can
//! revoke that authorization ([`find_redeemed_code`]).

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::Db;

use crate::authz::AuthorizationRow;
use crate::{AuthorizationId, PolicyId, RepoError, TokenHash, UserId};

/// A stored authorization code.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OAuthCode {
    pub code_hash: TokenHash,
    pub user_id: UserId,
    pub client_id: String,
    pub redirect_uri: String,
    pub policy_id: PolicyId,
    /// The PKCE S256 challenge (base64url of SHA-256 of the verifier).
    pub code_challenge: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub redeemed_at: Option<i64>,
    /// The terms the owner chose at consent (JSON), for the grant the code becomes.
    pub terms: Option<String>,
    /// The authorization it became, once redeemed ([`link_code`]).
    pub authorization_id: Option<AuthorizationId>,
}

/// What [`insert_code`] needs.
#[derive(Debug, Clone)]
pub struct NewCode<'a> {
    pub code_hash: &'a TokenHash,
    pub user_id: &'a UserId,
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub policy_id: &'a PolicyId,
    pub code_challenge: &'a str,
    /// See [`OAuthCode::terms`].
    pub terms: Option<&'a str>,
    /// The owner's session that consented: the code is written only while it is live.
    pub session: &'a TokenHash,
}

macro_rules! code_columns {
    () => {
        "code_hash, user_id, client_id, redirect_uri, policy_id, code_challenge, created_at, expires_at, redeemed_at, terms, \
         authorization_id"
    };
}

/// Stores a code valid until `expires_at`.
///
/// # Errors
/// [`RepoError::MissingReference`] for an unknown user or policy; [`RepoError::SessionEnded`]
/// once the consenting session has ended; database errors.
pub async fn insert_code(db: &Db, new: &NewCode<'_>, now: i64, expires_at: i64) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        // A password reset ends the sessions in the transaction that sets the password, which
        // updates the user row: under its lock, this insert either comes first (and the reset's
        // take-over, which follows, deletes the code) or finds the session gone.
        if let Some(lock) = crate::users::account_lock(db.kind()) {
            sqlx::query(lock).bind(new.user_id).execute(&mut *tx).await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO oauth_codes (code_hash, user_id, client_id, redirect_uri, policy_id, code_challenge, \
         created_at, expires_at, terms) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
         WHERE EXISTS (SELECT 1 FROM sessions WHERE token_hash = $10 AND user_id = $2 AND expires_at > $7)",
        )
        .bind(new.code_hash)
        .bind(new.user_id)
        .bind(new.client_id)
        .bind(new.redirect_uri)
        .bind(new.policy_id)
        .bind(new.code_challenge)
        .bind(now)
        .bind(expires_at)
        .bind(new.terms)
        .bind(new.session)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        match inserted.rows_affected() {
            1 => Ok(()),
            _ => Err(RepoError::SessionEnded),
        }
    })
}

/// Uses up a code: marks it redeemed at `now` and returns it, in one statement. `None`
/// when the code is unknown, expired or already redeemed. Of any number of concurrent
/// calls with the same code, at most one returns `Some`.
///
/// # Errors
/// Database errors.
pub async fn redeem_code(db: &Db, hash: &TokenHash, now: i64) -> Result<Option<OAuthCode>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "UPDATE oauth_codes SET redeemed_at = $1 \
         WHERE code_hash = $2 AND redeemed_at IS NULL AND expires_at > $1 RETURNING ",
            code_columns!(),
            ""
        );
        Ok(sqlx::query_as(sql)
            .bind(now)
            .bind(hash)
            .fetch_all(pool)
            .await?
            .into_first())
    })
}

/// Records that the redeemed code `hash` became `authorization`. False when the code is gone:
/// its account's grants were all revoked since it was redeemed (see
/// `authz::revoke_all_for_user`), or it was used again meanwhile ([`drop_unlinked_code`]), and
/// `authorization` must not outlive that.
///
/// # Errors
/// Database errors.
pub async fn link_code(db: &Db, hash: &TokenHash, authorization: &AuthorizationId) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("UPDATE oauth_codes SET authorization_id = $1 WHERE code_hash = $2")
            .bind(authorization)
            .bind(hash)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Deletes the redeemed code `hash` if no grant is linked to it yet: its exchange was
/// refused, or is still under way, and then the [`link_code`] it ends with finds nothing and
/// revokes the grant it made. False when a grant was linked first.
///
/// # Errors
/// Database errors.
pub async fn drop_unlinked_code(db: &Db, hash: &TokenHash) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM oauth_codes WHERE code_hash = $1 AND authorization_id IS NULL")
            .bind(hash)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// The code `hash` if it was redeemed and has not expired at `now`: what a second use of a
/// code finds.
///
/// # Errors
/// Database errors.
pub async fn find_redeemed_code(db: &Db, hash: &TokenHash, now: i64) -> Result<Option<OAuthCode>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            code_columns!(),
            " FROM oauth_codes WHERE code_hash = $1 AND redeemed_at IS NOT NULL AND expires_at > $2"
        );
        Ok(sqlx::query_as(sql).bind(hash).bind(now).fetch_optional(pool).await?)
    })
}

/// Whether a code not yet redeemed and not expired at `now` would become a grant under
/// `policy`: such a code takes the policy as it is when it is exchanged.
///
/// # Errors
/// Database errors.
pub async fn pending_under_policy(db: &Db, policy: &PolicyId, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM oauth_codes WHERE policy_id = $1 AND redeemed_at IS NULL AND expires_at > $2 LIMIT 1",
        )
        .bind(policy)
        .bind(now)
        .fetch_optional(pool)
        .await?;
        Ok(found.is_some())
    })
}

/// Removes codes that expired before `now`, redeemed or not. Returns how many.
///
/// # Errors
/// Database errors.
pub async fn delete_expired_codes(db: &Db, now: i64) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM oauth_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    })
}

pub(crate) const INSERT_ACCESS_TOKEN: &str =
    "INSERT INTO access_tokens (token_hash, authorization_id, created_at, expires_at) VALUES ($1, $2, $3, $4)";

/// Stores a bearer token for an authorization, valid until `expires_at`.
///
/// # Errors
/// [`RepoError::MissingReference`] for an unknown authorization; database errors.
pub async fn insert_access_token(
    db: &Db,
    hash: &TokenHash,
    authorization: &AuthorizationId,
    now: i64,
    expires_at: i64,
) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query(INSERT_ACCESS_TOKEN)
            .bind(hash)
            .bind(authorization)
            .bind(now)
            .bind(expires_at)
            .execute(pool)
            .await?;
        Ok(())
    })
}

/// A bearer token with the authorization it stands for.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenGrant {
    pub token_created_at: i64,
    pub token_expires_at: i64,
    #[sqlx(flatten)]
    pub authorization: AuthorizationRow,
}

/// Looks a bearer token up by hash, with its authorization, whatever its expiry or the
/// authorization's revocation (the caller decides, so it can say *why* it refuses).
///
/// # Errors
/// Database errors.
pub async fn find_token_grant(db: &Db, hash: &TokenHash) -> Result<Option<TokenGrant>, RepoError> {
    on_engine!(db, |pool| {
        // The columns of `authz::columns!()`, qualified for the join.
        let sql = "SELECT t.created_at AS token_created_at, t.expires_at AS token_expires_at, \
               a.id, a.user_id, a.policy_id, a.client_id, a.redirect_origin, a.bunker_pubkey, \
               a.bunker_secret_encrypted, a.connect_secret_hash, a.relays, a.connected_client_pubkey, \
               a.connected_at, a.created_at, a.revoked_at, a.terms \
               FROM access_tokens t JOIN authorizations a ON a.id = t.authorization_id WHERE t.token_hash = $1";
        Ok(sqlx::query_as(sql).bind(hash).fetch_optional(pool).await?)
    })
}

/// Removes tokens that expired before `now`. Returns how many.
///
/// # Errors
/// Database errors.
pub async fn delete_expired_tokens(db: &Db, now: i64) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM access_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{temp_dbs, test_authorization, test_user};

    /// A live session of `user`: a code is written only while its consent's session lives.
    async fn session(db: &Db, user: &UserId) -> TokenHash {
        let hash = session_of(user);
        crate::sessions::insert(db, &hash, user, None, 1, i64::MAX, 10)
            .await
            .unwrap();
        hash
    }

    /// The session [`session`] opened for `user`.
    fn session_of(user: &UserId) -> TokenHash {
        TokenHash::of(format!("session of {user}").as_bytes())
    }

    async fn stored_code(db: &Db, raw: &[u8], expires_at: i64) -> TokenHash {
        let user = test_user(db, &format!("{}@x.org", hex::encode(raw))).await;
        let session = session(db, &user).await;
        let hash = TokenHash::of(raw);
        let new = NewCode {
            code_hash: &hash,
            user_id: &user,
            client_id: "app",
            redirect_uri: "https://app.example/cb",
            policy_id: &PolicyId::new("pol_social"),
            code_challenge: "challenge",
            terms: None,
            session: &session,
        };
        insert_code(db, &new, 1, expires_at).await.unwrap();
        hash
    }

    #[tokio::test]
    async fn a_code_whose_consents_session_ended_is_not_written() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "ended@x.org").await;
            let hash = TokenHash::of(b"ended");
            let ended = session(&db, &user).await;
            crate::sessions::delete_for_user(&db, &user).await.unwrap();
            let new = NewCode {
                code_hash: &hash,
                user_id: &user,
                client_id: "app",
                redirect_uri: "https://app.example/cb",
                policy_id: &PolicyId::new("pol_social"),
                code_challenge: "challenge",
                terms: None,
                session: &ended,
            };
            let refused = insert_code(&db, &new, 1, 600).await;
            assert!(matches!(refused, Err(RepoError::SessionEnded)), "{refused:?}");
            assert_eq!(redeem_code(&db, &hash, 2).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn code_redeems_once_and_returns_its_row() {
        for (_guard, db) in temp_dbs().await {
            let hash = stored_code(&db, b"code", 600).await;
            let code = redeem_code(&db, &hash, 10).await.unwrap().unwrap();
            assert_eq!(
                (code.client_id.as_str(), code.code_challenge.as_str(), code.redeemed_at),
                ("app", "challenge", Some(10))
            );
            assert_eq!(redeem_code(&db, &hash, 11).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn expired_or_unknown_code_does_not_redeem() {
        for (_guard, db) in temp_dbs().await {
            let hash = stored_code(&db, b"code", 600).await;
            assert_eq!(redeem_code(&db, &hash, 600).await.unwrap(), None);
            assert_eq!(redeem_code(&db, &TokenHash::of(b"nope"), 10).await.unwrap(), None);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_redemptions_of_one_code_let_exactly_one_win() {
        for (_guard, db) in temp_dbs().await {
            for round in 0..5u8 {
                let hash = stored_code(&db, &[round], 600).await;
                let tasks: Vec<_> = (0..8)
                    .map(|_| {
                        let (db, hash) = (db.clone(), hash.clone());
                        tokio::spawn(async move { redeem_code(&db, &hash, 10).await.unwrap() })
                    })
                    .collect();
                let mut winners = 0;
                for task in tasks {
                    winners += usize::from(task.await.unwrap().is_some());
                }
                assert_eq!(winners, 1, "round {round}");
            }
        }
    }

    #[tokio::test]
    async fn revoking_all_of_an_accounts_grants_takes_its_codes_with_them() {
        for (_guard, db) in temp_dbs().await {
            let kept = stored_code(&db, b"another account", 600).await;
            let pending = stored_code(&db, b"owner", 600).await;
            let redeemed = TokenHash::of(b"redeemed");
            let owner = redeem_code(&db, &pending, 5).await.unwrap().unwrap().user_id;
            let session = session_of(&owner);
            let new = NewCode {
                code_hash: &redeemed,
                user_id: &owner,
                client_id: "app",
                redirect_uri: "https://app.example/cb",
                policy_id: &PolicyId::new("pol_social"),
                code_challenge: "challenge",
                terms: None,
                session: &session,
            };
            insert_code(&db, &new, 1, 600).await.unwrap();
            assert!(redeem_code(&db, &redeemed, 6).await.unwrap().is_some());
            let grant = test_authorization(&db, &owner, "b1").await;

            crate::authz::revoke_all_for_user(&db, &owner, 7).await.unwrap();
            assert_eq!(redeem_code(&db, &pending, 8).await.unwrap(), None, "an unredeemed code");
            assert!(
                !link_code(&db, &redeemed, &grant.id).await.unwrap(),
                "a code redeemed before, whose grant is inserted after"
            );
            let other = redeem_code(&db, &kept, 8).await.unwrap().unwrap();
            let other_grant = test_authorization(&db, &other.user_id, "b2").await;
            assert!(
                link_code(&db, &kept, &other_grant.id).await.unwrap(),
                "another account's code"
            );
        }
    }

    #[tokio::test]
    async fn expired_codes_are_purged() {
        for (_guard, db) in temp_dbs().await {
            stored_code(&db, b"old", 5).await;
            stored_code(&db, b"new", 50).await;
            assert_eq!(delete_expired_codes(&db, 10).await.unwrap(), 1);
        }
    }

    #[tokio::test]
    async fn token_grant_carries_expiry_and_the_authorization() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let hash = TokenHash::of(b"bearer");
            insert_access_token(&db, &hash, &authz.id, 3, 90).await.unwrap();
            let grant = find_token_grant(&db, &hash).await.unwrap().unwrap();
            assert_eq!((grant.token_created_at, grant.token_expires_at), (3, 90));
            assert_eq!(grant.authorization, authz);
            assert_eq!(find_token_grant(&db, &TokenHash::of(b"x")).await.unwrap(), None);
            assert_eq!(delete_expired_tokens(&db, 90).await.unwrap(), 1);
            assert_eq!(find_token_grant(&db, &hash).await.unwrap(), None);
        }
    }
}
