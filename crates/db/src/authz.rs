//! The `authorizations` table: one app's grant to sign for one user.
//!
//! Each row carries its own bunker keypair (the secret as key-manager ciphertext), the
//! hash of its NIP-46 connect secret, its relays (JSON array text), the client bound by
//! the first valid `connect`, and `revoked_at`. Revocation is a conditional `UPDATE`; the
//! caches that must hear about it live in `keycast-core`.

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::{Db, EngineKind};

use crate::{AuthorizationId, PolicyId, RepoError, TokenHash, UserId};

/// A stored authorization.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuthorizationRow {
    pub id: AuthorizationId,
    pub user_id: UserId,
    pub policy_id: PolicyId,
    /// The OAuth `client_id` the app presented.
    pub client_id: String,
    /// Origin of the app's redirect URI, shown to the user.
    pub redirect_origin: String,
    /// The bunker's public key, 64 lowercase hex.
    pub bunker_pubkey: String,
    /// The bunker's secret key as key-manager ciphertext.
    pub bunker_secret_encrypted: Vec<u8>,
    /// Hash of the NIP-46 connect secret.
    pub connect_secret_hash: TokenHash,
    /// JSON array of relay URLs.
    pub relays: String,
    /// The NIP-46 client bound by the first `connect` carrying the secret.
    pub connected_client_pubkey: Option<String>,
    pub connected_at: Option<i64>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// The owner's terms (expiry, limits) as JSON; `None`: until revoked, no limits.
    pub terms: Option<String>,
}

/// What [`insert`] needs. The id is chosen by the caller before encrypting the bunker
/// secret, since it is part of the ciphertext's associated data.
#[derive(Debug, Clone)]
pub struct NewAuthorization<'a> {
    pub id: &'a AuthorizationId,
    pub user_id: &'a UserId,
    pub policy_id: &'a PolicyId,
    pub client_id: &'a str,
    pub redirect_origin: &'a str,
    pub bunker_pubkey: &'a str,
    pub bunker_secret_encrypted: &'a [u8],
    pub connect_secret_hash: &'a TokenHash,
    pub relays: &'a str,
    /// See [`AuthorizationRow::terms`].
    pub terms: Option<&'a str>,
    /// The most live grants its user may have, this one included.
    pub max_live: u32,
    /// The owner's session that asked for it (a `nostrconnect://` acceptance): written only
    /// while that session is live. `None` where no session asks (a code's exchange: the code
    /// is what the owner's consent wrote, see `oauth::link_code`).
    pub session: Option<&'a TokenHash>,
}

macro_rules! columns {
    () => {
        "id, user_id, policy_id, client_id, redirect_origin, bunker_pubkey, \
     bunker_secret_encrypted, connect_secret_hash, relays, connected_client_pubkey, connected_at, created_at, revoked_at, terms"
    };
}

/// How many live grants user `$user` has at time `$now` (placeholders): not revoked, and
/// not past the `expires_at` of their terms, which `$expires` reads from the JSON on the
/// engine ([`sqlite_expires`], [`postgres_expires`]).
macro_rules! live_count_sql {
    ($expires:expr, $user:literal, $now:literal) => {
        concat!(
            "(SELECT COUNT(*) FROM authorizations WHERE user_id = ",
            $user,
            " AND revoked_at IS NULL AND COALESCE(",
            $expires,
            ", ",
            $now,
            " + 1) > ",
            $now,
            ")"
        )
    };
}

/// `INSERT INTO authorizations … SELECT` the new row's values, only while its policy is not
/// deleted and its user has fewer than `$12` live grants; `$lock` locks the policy row on
/// PostgreSQL (see [`insert`]).
macro_rules! insert_sql {
    ($lock:literal, $expires:expr) => {
        concat!(
            "INSERT INTO authorizations (id, user_id, policy_id, client_id, redirect_origin, bunker_pubkey, \
             bunker_secret_encrypted, connect_secret_hash, relays, created_at, terms) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 \
             WHERE EXISTS (SELECT 1 FROM policies WHERE id = $3 AND deleted_at IS NULL",
            $lock,
            ") AND ",
            live_count_sql!($expires, "$2", "$10"),
            " < $12 AND ($13 IS NULL OR EXISTS (SELECT 1 FROM sessions WHERE token_hash = $13 AND user_id = $2 AND expires_at > $10)) \
             RETURNING ",
            columns!()
        )
    };
}

/// `expires_at` of a grant's terms (JSON text) on SQLite.
macro_rules! sqlite_expires {
    () => {
        "json_extract(terms, '$.expires_at')"
    };
}

/// `expires_at` of a grant's terms (JSON text) on PostgreSQL.
macro_rules! postgres_expires {
    () => {
        "(terms::json->>'expires_at')::BIGINT"
    };
}
pub(crate) use {postgres_expires, sqlite_expires};

/// Stores a new authorization, under a policy that is not deleted.
///
/// The policy's check is part of the insert. On PostgreSQL it also takes a share lock on the
/// policy row, so a deletion of that policy running at the same moment (which locks the row,
/// then counts its live authorizations: [`crate::policies::delete_owned`]) either finishes
/// first, and this insert finds the policy deleted, or waits for this insert and counts it.
/// The account's live grants are counted in the same statement, on PostgreSQL under the
/// account's lock ([`crate::users::account_lock`]), so inserts at once cannot pass `max_live`.
///
/// # Errors
/// [`RepoError::MissingReference`] for an unknown user or an unknown or deleted policy;
/// [`RepoError::AlreadyExists`] for a reused id or bunker pubkey; database errors.
pub async fn insert(db: &Db, new: &NewAuthorization<'_>, now: i64) -> Result<AuthorizationRow, RepoError> {
    let sql = match db.kind() {
        EngineKind::Sqlite => insert_sql!("", sqlite_expires!()),
        EngineKind::Postgres => insert_sql!(" FOR SHARE", postgres_expires!()),
    };
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        if let Some(lock) = crate::users::account_lock(db.kind()) {
            sqlx::query(lock).bind(new.user_id).execute(&mut *tx).await?;
        }
        let row: Option<AuthorizationRow> = sqlx::query_as(sql)
            .bind(new.id)
            .bind(new.user_id)
            .bind(new.policy_id)
            .bind(new.client_id)
            .bind(new.redirect_origin)
            .bind(new.bunker_pubkey)
            .bind(new.bunker_secret_encrypted)
            .bind(new.connect_secret_hash)
            .bind(new.relays)
            .bind(now)
            .bind(new.terms)
            .bind(i64::from(new.max_live))
            .bind(new.session)
            .fetch_all(&mut *tx)
            .await?
            .into_first();
        tx.commit().await?;
        match row {
            Some(row) => Ok(row),
            None if match new.session {
                Some(session) => crate::sessions::find_live_by_hash(db, session, now).await?.is_none(),
                None => false,
            } =>
            {
                Err(RepoError::SessionEnded)
            }
            None if count_live_for_user(db, new.user_id, now).await? >= i64::from(new.max_live) => {
                Err(RepoError::TooMany("live authorizations"))
            }
            None => Err(RepoError::MissingReference),
        }
    })
}

/// How many live grants `user` has at `now`: not revoked, and not past the `expires_at` of
/// their terms.
///
/// # Errors
/// Database errors.
pub async fn count_live_for_user(db: &Db, user: &UserId, now: i64) -> Result<i64, RepoError> {
    let sql = match db.kind() {
        EngineKind::Sqlite => concat!("SELECT ", live_count_sql!(sqlite_expires!(), "$1", "$2")),
        EngineKind::Postgres => concat!("SELECT ", live_count_sql!(postgres_expires!(), "$1", "$2")),
    };
    on_engine!(db, |pool| {
        let query = sqlx::query_scalar(sql).bind(user);
        Ok(query.bind(now).fetch_one(pool).await?)
    })
}

/// The authorization with this id, revoked or not.
///
/// # Errors
/// Database errors.
pub async fn find_by_id(db: &Db, id: &AuthorizationId) -> Result<Option<AuthorizationRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM authorizations WHERE id = $1");
        Ok(sqlx::query_as(sql).bind(id).fetch_optional(pool).await?)
    })
}

/// The authorization whose bunker has this public key (64 lowercase hex), revoked or not.
///
/// # Errors
/// Database errors.
pub async fn find_by_bunker_pubkey(db: &Db, bunker_pubkey: &str) -> Result<Option<AuthorizationRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM authorizations WHERE bunker_pubkey = $1");
        Ok(sqlx::query_as(sql).bind(bunker_pubkey).fetch_optional(pool).await?)
    })
}

/// The oldest and the newest authorization (one row when there is only one, none on an
/// empty table), revoked ones included: the bunker keys the start-up check decrypts.
///
/// # Errors
/// Database errors.
pub async fn find_oldest_and_newest(db: &Db) -> Result<Vec<AuthorizationRow>, RepoError> {
    on_engine!(db, |pool| {
        let oldest = concat!(
            "SELECT ",
            columns!(),
            " FROM authorizations ORDER BY created_at, id LIMIT 1"
        );
        let newest = concat!(
            "SELECT ",
            columns!(),
            " FROM authorizations ORDER BY created_at DESC, id DESC LIMIT 1"
        );
        let mut rows: Vec<AuthorizationRow> = Vec::new();
        for sql in [oldest, newest] {
            if let Some(row) = sqlx::query_as::<_, AuthorizationRow>(sql).fetch_optional(pool).await? {
                if rows.iter().all(|r| r.id != row.id) {
                    rows.push(row);
                }
            }
        }
        Ok(rows)
    })
}

/// A bunker the NIP-46 signer listens for.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LiveBunker {
    /// 64 lowercase hex.
    pub bunker_pubkey: String,
    /// JSON array of relay URLs.
    pub relays: String,
    /// The client bound by `connect` (64 lowercase hex), if any.
    pub connected_client_pubkey: Option<String>,
    pub revoked_at: Option<i64>,
    pub user_id: String,
    /// The grant's terms (JSON), whose `expires_at` ends it too.
    pub terms: Option<String>,
}

/// `SELECT … FROM authorizations WHERE` a grant is live, or ended (revoked, or past the
/// `expires_at` of its terms, read by `$expires`) at or after `$1`.
macro_rules! bunkers_sql {
    ($expires:expr) => {
        concat!(
            "SELECT bunker_pubkey, relays, connected_client_pubkey, revoked_at, user_id, terms FROM authorizations \
             WHERE (revoked_at IS NULL AND COALESCE(",
            $expires,
            ", $1) >= $1) OR revoked_at >= $1 ORDER BY created_at, id"
        )
    };
}

/// The bunker pubkey, relays and bound client of every authorization that is live or ended
/// (revoked, or past its terms' expiry) at or after `ended_since` (so a client of a recently
/// ended one hears why instead of nothing), oldest first. A grant that expired before is
/// left out here: they were all read and parsed at every sync, and an account may start a
/// grant of an hour a minute.
///
/// # Errors
/// Database errors.
pub async fn list_bunkers_to_serve(db: &Db, ended_since: i64) -> Result<Vec<LiveBunker>, RepoError> {
    let sql = match db.kind() {
        EngineKind::Sqlite => bunkers_sql!(sqlite_expires!()),
        EngineKind::Postgres => bunkers_sql!(postgres_expires!()),
    };
    on_engine!(db, |pool| {
        Ok(sqlx::query_as(sql).bind(ended_since).fetch_all(pool).await?)
    })
}

/// `(id, user, relays as JSON array text)` of every live authorization (not revoked, not past
/// its terms' expiry at `now`) whose relays are not exactly `except` (the JSON text grants
/// made with the operator's relays carry, so the common case is skipped in SQL). For the
/// caps on relays named by apps: an expired grant counted against them for good.
///
/// # Errors
/// Database errors.
pub async fn list_live_relays(
    db: &Db,
    except: &str,
    now: i64,
) -> Result<Vec<(AuthorizationId, UserId, String)>, RepoError> {
    let sql = match db.kind() {
        EngineKind::Sqlite => concat!(
            "SELECT id, user_id, relays FROM authorizations WHERE revoked_at IS NULL AND relays <> $1 AND COALESCE(",
            sqlite_expires!(),
            ", $2 + 1) > $2"
        ),
        EngineKind::Postgres => concat!(
            "SELECT id, user_id, relays FROM authorizations WHERE revoked_at IS NULL AND relays <> $1 AND COALESCE(",
            postgres_expires!(),
            ", $2 + 1) > $2"
        ),
    };
    on_engine!(db, |pool| {
        Ok(sqlx::query_as(sql).bind(except).bind(now).fetch_all(pool).await?)
    })
}

/// Revoked authorizations a user's list shows, the newest.
pub const LISTED_REVOKED: i64 = 100;

/// `SELECT` a user's (`$1`) live authorizations at `$3` and the newest `$2` that ended
/// (revoked, or past the `expires_at` of their terms, read by `$expires`).
macro_rules! list_for_user_sql {
    ($expires:expr) => {
        concat!(
            "SELECT ",
            columns!(),
            " FROM authorizations WHERE user_id = $1 AND ((revoked_at IS NULL AND COALESCE(",
            $expires,
            ", $3 + 1) > $3) OR id IN (\
               SELECT id FROM authorizations WHERE user_id = $1 AND (revoked_at IS NOT NULL OR ",
            $expires,
            " <= $3) ORDER BY created_at DESC, id LIMIT $2)) \
             ORDER BY created_at DESC, id"
        )
    };
}

/// A user's authorizations at `now`, newest first: every live one, and the newest
/// [`LISTED_REVOKED`] that ended (revoked, or past their terms' expiry). Ended rows are kept
/// (their activity, what a reused code or token names), and an account may start a grant a
/// minute: listed whole, a month of that was tens of thousands of rows and queries for each
/// list.
///
/// # Errors
/// Database errors.
pub async fn list_for_user(db: &Db, user: &UserId, now: i64) -> Result<Vec<AuthorizationRow>, RepoError> {
    let sql = match db.kind() {
        EngineKind::Sqlite => list_for_user_sql!(sqlite_expires!()),
        EngineKind::Postgres => list_for_user_sql!(postgres_expires!()),
    };
    on_engine!(db, |pool| {
        Ok(sqlx::query_as(sql)
            .bind(user)
            .bind(LISTED_REVOKED)
            .bind(now)
            .fetch_all(pool)
            .await?)
    })
}

/// Revokes an authorization of `user` at `now`. Returns true if this call revoked it,
/// false if it was already revoked, belongs to someone else, or does not exist
/// (idempotent: the first revocation time is kept).
///
/// # Errors
/// Database errors.
pub async fn revoke(db: &Db, id: &AuthorizationId, user: &UserId, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE authorizations SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(user)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

macro_rules! update_grant_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE authorizations SET policy_id = $1, terms = $2 \
             WHERE id = $3 AND user_id = $4 AND revoked_at IS NULL \
             AND EXISTS (SELECT 1 FROM policies WHERE id = $1 AND deleted_at IS NULL",
            $lock,
            ")"
        )
    };
}

/// Changes the policy and terms of `user`'s live authorization `id` (the owner edits an
/// app's grant); false if it is not theirs or not live, or `policy` was deleted. The
/// caller checks that `policy` is one `user` may use.
///
/// # Errors
/// Database errors.
pub async fn update_grant(
    db: &Db,
    id: &AuthorizationId,
    user: &UserId,
    policy: &PolicyId,
    terms: Option<&str>,
) -> Result<bool, RepoError> {
    // Locks the policy row on PostgreSQL, as `insert` does and for the same reason.
    let sql = match db.kind() {
        EngineKind::Sqlite => update_grant_sql!(""),
        EngineKind::Postgres => update_grant_sql!(" FOR SHARE"),
    };
    on_engine!(db, |pool| {
        let done = sqlx::query(sql)
            .bind(policy)
            .bind(terms)
            .bind(id)
            .bind(user)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// The live authorizations under policy `id` (a custom policy was edited: their caches go).
///
/// # Errors
/// Database errors.
pub async fn list_live_ids_for_policy(db: &Db, id: &PolicyId) -> Result<Vec<AuthorizationId>, RepoError> {
    on_engine!(db, |pool| {
        Ok(
            sqlx::query_scalar("SELECT id FROM authorizations WHERE policy_id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_all(pool)
                .await?,
        )
    })
}

/// Revokes every live authorization of `user` at `now` (a take-over of the account, a new
/// key, a deletion) and returns the ids it revoked. The user's authorization codes go first,
/// in the same transaction, redeemed or not: a code still unredeemed would otherwise become a
/// grant after this, for whoever held the account before. An exchange that redeemed its code
/// just before and inserts its grant just after finds its code gone when it links the two
/// (`oauth::link_code`) and revokes the grant itself; the order matters on PostgreSQL, where
/// the revocation's statement sees a grant committed before it starts, and the link waits for
/// (then misses) a code this transaction deletes.
///
/// # Errors
/// Database errors (then nothing changed).
pub async fn revoke_all_for_user(db: &Db, user: &UserId, now: i64) -> Result<Vec<AuthorizationId>, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        sqlx::query("DELETE FROM oauth_codes WHERE user_id = $1")
            .bind(user)
            .execute(&mut *tx)
            .await?;
        let revoked = sqlx::query_scalar(
            "UPDATE authorizations SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL RETURNING id",
        )
        .bind(now)
        .bind(user)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(revoked)
    })
}

/// Binds the NIP-46 client to a live authorization. Succeeds when no client is bound yet
/// (the first valid `connect` wins, atomically) or when the same client connects again.
/// Returns false when another client is bound or the authorization is revoked/unknown.
///
/// # Errors
/// Database errors.
pub async fn bind_client(db: &Db, id: &AuthorizationId, client_pubkey: &str, now: i64) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE authorizations SET connected_client_pubkey = $1, connected_at = COALESCE(connected_at, $2) \
         WHERE id = $3 AND revoked_at IS NULL \
           AND (connected_client_pubkey IS NULL OR connected_client_pubkey = $1)",
        )
        .bind(client_pubkey)
        .bind(now)
        .bind(id)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Ends `client_pubkey`'s binding to the authorization (NIP-46 `logout`): afterwards a
/// `connect` with the connect secret binds whichever client presents it. True if that
/// client was bound; a no-op otherwise.
///
/// # Errors
/// [`RepoError`] on storage failure.
pub async fn unbind_client(db: &Db, id: &AuthorizationId, client_pubkey: &str) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "UPDATE authorizations SET connected_client_pubkey = NULL \
         WHERE id = $1 AND connected_client_pubkey = $2",
        )
        .bind(id)
        .bind(client_pubkey)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{insert_capped, temp_dbs, test_authorization, test_user};

    #[tokio::test]
    async fn inserted_authorization_is_found_by_id_bunker_and_user() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let row = test_authorization(&db, &user, "b1").await;
            assert_eq!(row.policy_id.as_str(), "pol_social");
            assert_eq!(row.revoked_at, None);
            assert_eq!(find_by_id(&db, &row.id).await.unwrap().as_ref(), Some(&row));
            assert_eq!(find_by_bunker_pubkey(&db, "b1").await.unwrap().as_ref(), Some(&row));
            assert_eq!(list_for_user(&db, &user, 1_000).await.unwrap(), vec![row]);
        }
    }

    #[tokio::test]
    async fn an_account_has_at_most_its_live_grants_and_revoked_or_expired_ones_do_not_count() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let other = test_user(&db, "b@x.org").await;
            let now = 1_000;
            let grant_at = |at: i64, user: UserId, bunker: &'static str, terms: Option<&'static str>| {
                let db = db.clone();
                async move { insert_capped(&db, &user, bunker, terms, 2, at).await }
            };
            let grant = |user, bunker, terms| grant_at(now, user, bunker, terms);
            let first = grant(user.clone(), "b1", None).await.unwrap();
            grant(user.clone(), "b2", Some("{\"per_day\":3}")).await.unwrap();
            assert_eq!(count_live_for_user(&db, &user, now).await.unwrap(), 2);
            let refused = grant(user.clone(), "b3", None).await.unwrap_err();
            assert!(matches!(refused, RepoError::TooMany(_)), "{refused:?}");
            grant(other.clone(), "b4", None)
                .await
                .expect("another account counts alone");

            assert!(revoke(&db, &first.id, &user, now).await.unwrap());
            let third = grant(user.clone(), "b5", Some("{\"expires_at\":1001}")).await.unwrap();
            assert!(grant(user.clone(), "b6", None).await.is_err(), "two live again");
            // Once the third's time is over, it no longer counts.
            assert_eq!(count_live_for_user(&db, &user, 1_001).await.unwrap(), 1, "{third:?}");
            grant_at(1_001, user.clone(), "b7", None)
                .await
                .expect("an expired grant frees its place");
        }
    }

    /// Inserts for one account racing each other: on PostgreSQL (READ COMMITTED) each
    /// statement counts the live grants in its own snapshot, so without a lock on the account
    /// several could count below the cap and all insert.
    #[tokio::test]
    async fn inserts_racing_for_the_last_places_stay_within_the_cap() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "race@x.org").await;
            let racing: Vec<_> = (0..40)
                .map(|n| {
                    let (db, user) = (db.clone(), user.clone());
                    tokio::spawn(async move { insert_capped(&db, &user, &format!("bunker{n}"), None, 3, 1_000).await })
                })
                .collect();
            let mut granted = 0;
            for outcome in racing {
                match outcome.await.unwrap() {
                    Ok(_) => granted += 1,
                    Err(RepoError::TooMany(_)) => {}
                    Err(other) => panic!("{other:?}"),
                }
            }
            assert_eq!(granted, 3, "{:?}", db.kind());
            assert_eq!(count_live_for_user(&db, &user, 1_000).await.unwrap(), 3);
        }
    }

    #[tokio::test]
    async fn a_grant_is_edited_by_its_owner_only_while_live() {
        for (_guard, db) in temp_dbs().await {
            let owner = test_user(&db, "a@x.org").await;
            let other = test_user(&db, "b@x.org").await;
            let row = test_authorization(&db, &owner, "b1").await;
            let wallet = PolicyId::new("pol_wallet");
            assert!(
                !update_grant(&db, &row.id, &other, &wallet, None).await.unwrap(),
                "not theirs"
            );
            assert!(update_grant(&db, &row.id, &owner, &wallet, Some("{\"per_day\":3}"))
                .await
                .unwrap());
            let found = find_by_id(&db, &row.id).await.unwrap().unwrap();
            assert_eq!(
                (found.policy_id, found.terms.as_deref()),
                (wallet.clone(), Some("{\"per_day\":3}"))
            );
            assert_eq!(
                list_live_ids_for_policy(&db, &wallet).await.unwrap(),
                vec![row.id.clone()]
            );
            revoke(&db, &row.id, &owner, 5).await.unwrap();
            assert!(
                !update_grant(&db, &row.id, &owner, &wallet, None).await.unwrap(),
                "revoked"
            );
            assert!(list_live_ids_for_policy(&db, &wallet).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn revoke_is_idempotent_and_scoped_to_the_owner() {
        for (_guard, db) in temp_dbs().await {
            let owner = test_user(&db, "a@x.org").await;
            let other = test_user(&db, "b@x.org").await;
            let row = test_authorization(&db, &owner, "b1").await;
            assert!(!revoke(&db, &row.id, &other, 5).await.unwrap(), "not theirs");
            assert!(revoke(&db, &row.id, &owner, 5).await.unwrap());
            assert!(!revoke(&db, &row.id, &owner, 9).await.unwrap());
            let row = find_by_id(&db, &row.id).await.unwrap().unwrap();
            assert_eq!(row.revoked_at, Some(5));
        }
    }

    #[tokio::test]
    async fn revoking_all_of_a_users_authorizations_keeps_earlier_revocations_and_others() {
        for (_guard, db) in temp_dbs().await {
            let owner = test_user(&db, "a@x.org").await;
            let other = test_user(&db, "b@x.org").await;
            let a1 = test_authorization(&db, &owner, "b1").await;
            let a2 = test_authorization(&db, &owner, "b2").await;
            let b1 = test_authorization(&db, &other, "b3").await;
            assert!(revoke(&db, &a1.id, &owner, 5).await.unwrap());
            assert_eq!(revoke_all_for_user(&db, &owner, 9).await.unwrap(), vec![a2.id.clone()]);
            for (id, revoked_at) in [(a1.id, Some(5)), (a2.id, Some(9)), (b1.id, None)] {
                let row = find_by_id(&db, &id).await.unwrap().unwrap();
                assert_eq!(row.revoked_at, revoked_at);
            }
        }
    }

    #[tokio::test]
    async fn bunkers_to_serve_leave_out_long_revoked_authorizations() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let live = test_authorization(&db, &user, "b1").await;
            let recent = test_authorization(&db, &user, "b2").await;
            let old = test_authorization(&db, &user, "b3").await;
            assert!(revoke(&db, &recent.id, &user, 100).await.unwrap());
            assert!(revoke(&db, &old.id, &user, 5).await.unwrap());
            // Ended by their terms: one lately (still served, so its client hears why), one
            // long ago (read and parsed at every sync before), one not yet.
            let expiring = |at: i64| format!(r#"{{"expires_at":{at}}}"#);
            insert_capped(&db, &user, "b4", Some(&expiring(60)), 100, 2)
                .await
                .unwrap();
            insert_capped(&db, &user, "b5", Some(&expiring(10)), 100, 2)
                .await
                .unwrap();
            insert_capped(&db, &user, "b6", Some(&expiring(5_000)), 100, 2)
                .await
                .unwrap();
            let mut served: Vec<String> = list_bunkers_to_serve(&db, 50)
                .await
                .unwrap()
                .into_iter()
                .map(|b| b.bunker_pubkey)
                .collect();
            served.sort();
            assert_eq!(served, ["b1", "b2", "b4", "b6"]);
            assert!(list_bunkers_to_serve(&db, 50)
                .await
                .unwrap()
                .iter()
                .all(|b| b.relays == live.relays));
        }
    }

    /// A grant past its terms' expiry is over, as a revoked one: it named relays that
    /// counted against the caps on relays named by apps for good.
    #[tokio::test]
    async fn a_grant_past_its_terms_names_no_live_relays_and_is_listed_as_ended() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let live = test_authorization(&db, &user, "b1").await;
            let expired = insert_capped(&db, &user, "b2", Some(r#"{"expires_at":500}"#), 100, 2)
                .await
                .unwrap();
            let relays = list_live_relays(&db, "[]", 1_000).await.unwrap();
            assert_eq!(relays, vec![(live.id.clone(), user.clone(), live.relays.clone())]);
            assert_eq!(
                list_live_relays(&db, "[]", 400).await.unwrap().len(),
                2,
                "not yet expired at 400"
            );
            let listed: Vec<AuthorizationId> = list_for_user(&db, &user, 1_000)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect();
            assert!(listed.contains(&live.id) && listed.contains(&expired.id), "{listed:?}");
        }
    }

    #[tokio::test]
    async fn first_client_binds_and_others_are_refused() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let row = test_authorization(&db, &user, "b1").await;
            assert!(bind_client(&db, &row.id, "c1", 3).await.unwrap());
            assert!(
                bind_client(&db, &row.id, "c1", 4).await.unwrap(),
                "same client reconnects"
            );
            assert!(!bind_client(&db, &row.id, "c2", 5).await.unwrap());
            let row = find_by_id(&db, &row.id).await.unwrap().unwrap();
            assert_eq!(
                (row.connected_client_pubkey.as_deref(), row.connected_at),
                (Some("c1"), Some(3))
            );
        }
    }

    #[tokio::test]
    async fn revoked_authorization_binds_no_client() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let row = test_authorization(&db, &user, "b1").await;
            revoke(&db, &row.id, &user, 2).await.unwrap();
            assert!(!bind_client(&db, &row.id, "c1", 3).await.unwrap());
        }
    }
}
