//! Pending approvals (`approvals`) and the kinds an owner allowed "from now on"
//! (`authorization_kinds`): issue 14, asking instead of refusing.
//!
//! An approval is found by the hash of the random id in its URL, never by the id. Deciding
//! is one conditional `UPDATE` (only a pending, unexpired row), so two clicks — on one
//! instance or two — decide once. An HTTP "allow once" is spent by the retry that matches
//! its fingerprint, again by one conditional `UPDATE`. What the rows mean (who may decide,
//! what a decision does) is `keycast-core`'s.

use crate::pool::on_engine;
use crate::Db;
use crate::{AuthorizationId, RepoError, TokenHash, UserId};

/// A stored approval, with the owner of its authorization.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApprovalRow {
    pub id_hash: TokenHash,
    pub authorization_id: AuthorizationId,
    /// The owner of the authorization (from `authorizations`).
    pub user_id: UserId,
    /// The app's `client_id` (from `authorizations`).
    pub client_id: String,
    /// Where the grant's OAuth answer went, or a `nostrconnect://` app's own `url` hint
    /// (from `authorizations`).
    pub redirect_origin: String,
    /// `http` or `nip46`.
    pub transport: String,
    pub method: String,
    pub kind: Option<i64>,
    /// `{method, params}` NIP-44 encrypted by the bunker key to itself.
    pub request_sealed: String,
    pub fingerprint: String,
    pub nip46_request_id: Option<String>,
    pub nip46_client: Option<String>,
    /// `nip44` or `nip04`: the cipher the reply must use.
    pub nip46_cipher: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    /// `None` pending; `once`, `kind` or `deny`.
    pub decision: Option<String>,
    pub decided_at: Option<i64>,
    pub used_at: Option<i64>,
}

/// What [`insert`] stores.
#[derive(Debug, Clone)]
pub struct NewApproval<'a> {
    pub id_hash: &'a TokenHash,
    pub authorization_id: &'a AuthorizationId,
    pub transport: &'a str,
    pub method: &'a str,
    pub kind: Option<i64>,
    pub request_sealed: &'a str,
    pub fingerprint: &'a str,
    pub nip46_request_id: Option<&'a str>,
    pub nip46_client: Option<&'a str>,
    pub nip46_cipher: Option<&'a str>,
    pub expires_at: i64,
}

macro_rules! columns {
    () => {
        "p.id_hash, p.authorization_id, a.user_id, a.client_id, a.redirect_origin, p.transport, p.method, p.kind, \
         p.request_sealed, p.fingerprint, p.nip46_request_id, p.nip46_client, p.nip46_cipher, \
         p.created_at, p.expires_at, p.decision, p.decided_at, p.used_at"
    };
}

/// `SELECT COUNT(*)` of the approvals pending at `$now` of the account owning authorization
/// `$authz` (placeholders), across its grants not revoked.
macro_rules! account_pending_sql {
    ($authz:literal, $now:literal) => {
        concat!(
            "SELECT COUNT(*) FROM approvals p JOIN authorizations a ON a.id = p.authorization_id \
             WHERE a.user_id = (SELECT user_id FROM authorizations WHERE id = ",
            $authz,
            ") AND a.revoked_at IS NULL AND p.decision IS NULL AND p.expires_at > ",
            $now
        )
    };
}

/// Removes every approval that expired by `now`, decided or not: none can be decided or used
/// any more. Returns how many.
///
/// # Errors
/// Database errors.
pub async fn delete_expired(db: &Db, now: i64) -> Result<u64, RepoError> {
    on_engine!(db, |pool| {
        Ok(sqlx::query("DELETE FROM approvals WHERE expires_at <= $1")
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected())
    })
}

/// Stores a pending approval while the authorization has fewer than `max_pending` pending
/// and unexpired, and its account fewer than `max_pending_account` across all its grants,
/// counted in the same statement (on PostgreSQL under a lock of the account's row, for the
/// reason [`crate::users::account_lock`] gives): requests counting apart all found
/// room. First deletes this authorization's approvals that expired before `now` (so the
/// table holds only what may still be decided or used).
///
/// # Errors
/// [`RepoError::TooMany`] at either cap; [`RepoError::MissingReference`] for an unknown
/// authorization; database errors.
pub async fn insert(
    db: &Db,
    new: &NewApproval<'_>,
    now: i64,
    max_pending: i64,
    max_pending_account: i64,
) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        if db.kind() == crate::EngineKind::Postgres {
            // NO KEY: still one insert at a time per account, without holding up the
            // foreign-key checks (KEY SHARE) of rows that name the account — an "allow kind"
            // decision holding an approval this insert's DELETE waits for would otherwise
            // deadlock.
            sqlx::query(
                "SELECT 1 FROM users WHERE id = (SELECT user_id FROM authorizations WHERE id = $1) FOR NO KEY UPDATE",
            )
            .bind(new.authorization_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM approvals WHERE authorization_id = $1 AND expires_at <= $2")
            .bind(new.authorization_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(concat!(
            "INSERT INTO approvals (id_hash, authorization_id, transport, method, kind, request_sealed, \
             fingerprint, nip46_request_id, nip46_client, nip46_cipher, created_at, expires_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 \
             WHERE (SELECT COUNT(*) FROM approvals \
                    WHERE authorization_id = $2 AND decision IS NULL AND expires_at > $11) < $13 \
             AND (",
            account_pending_sql!("$2", "$11"),
            ") < $14"
        ))
        .bind(new.id_hash)
        .bind(new.authorization_id)
        .bind(new.transport)
        .bind(new.method)
        .bind(new.kind)
        .bind(new.request_sealed)
        .bind(new.fingerprint)
        .bind(new.nip46_request_id)
        .bind(new.nip46_client)
        .bind(new.nip46_cipher)
        .bind(now)
        .bind(new.expires_at)
        .bind(max_pending)
        .bind(max_pending_account)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(RepoError::TooMany("pending approvals"));
        }
        tx.commit().await?;
        Ok(())
    })
}

/// How many approvals of the account owning `authorization` are pending and unexpired at
/// `now`, across its grants not revoked (a revoked grant's can never be allowed, and must not
/// hold the account's other apps back).
///
/// # Errors
/// Database errors.
pub async fn count_pending_for_account(db: &Db, authorization: &AuthorizationId, now: i64) -> Result<i64, RepoError> {
    Ok(on_engine!(db, |pool| {
        sqlx::query_scalar(account_pending_sql!("$1", "$2"))
            .bind(authorization)
            .bind(now)
            .fetch_one(pool)
            .await?
    }))
}

/// How many approvals of this authorization are pending and unexpired at `now`.
///
/// # Errors
/// Database errors.
pub async fn count_pending(db: &Db, authorization: &AuthorizationId, now: i64) -> Result<i64, RepoError> {
    Ok(on_engine!(db, |pool| {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM approvals WHERE authorization_id = $1 AND decision IS NULL AND expires_at > $2",
        )
        .bind(authorization)
        .bind(now)
        .fetch_one(pool)
        .await?
    }))
}

/// The approval whose id hashes to `id_hash`, in any state.
///
/// # Errors
/// Database errors.
pub async fn find(db: &Db, id_hash: &TokenHash) -> Result<Option<ApprovalRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM approvals p JOIN authorizations a ON a.id = p.authorization_id WHERE p.id_hash = $1"
        );
        Ok(sqlx::query_as(sql).bind(id_hash).fetch_optional(pool).await?)
    })
}

/// Records `decision` on a pending, unexpired approval of a grant not revoked, and moves
/// its expiry to `expires_at` (the window an HTTP retry has to use an "allow once"); with
/// `allow_kind`, adds that kind to the grant in the same transaction (a decision recorded
/// without its kind said "allowed from now on" and allowed nothing). Returns whether this
/// call decided it: false when it was decided before, expired, revoked, or does not exist.
///
/// # Errors
/// Database errors.
pub async fn decide(
    db: &Db,
    id_hash: &TokenHash,
    decision: &str,
    now: i64,
    expires_at: i64,
    allow_kind: Option<i64>,
) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        let done = sqlx::query(
            "UPDATE approvals SET decision = $2, decided_at = $3, expires_at = $4 \
             WHERE id_hash = $1 AND decision IS NULL AND expires_at > $3 \
             AND ($2 = 'deny' OR authorization_id IN (SELECT id FROM authorizations WHERE revoked_at IS NULL))",
        )
        .bind(id_hash)
        .bind(decision)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done != 1 {
            return Ok(false);
        }
        if let Some(kind) = allow_kind {
            sqlx::query(
                "INSERT INTO authorization_kinds (authorization_id, kind, approved_at) \
                 SELECT authorization_id, $2, $3 FROM approvals WHERE id_hash = $1 \
                 ON CONFLICT (authorization_id, kind) DO NOTHING",
            )
            .bind(id_hash)
            .bind(kind)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    })
}

/// Closes a still-pending approval as `expired` (the NIP-46 client is then told). Returns
/// the row when this call closed it; `None` when it was decided before (or is unknown).
///
/// # Errors
/// Database errors.
pub async fn close_undecided(db: &Db, id_hash: &TokenHash, now: i64) -> Result<Option<ApprovalRow>, RepoError> {
    let closed = on_engine!(db, |pool| {
        sqlx::query(
            "UPDATE approvals SET decision = 'expired', decided_at = $2 WHERE id_hash = $1 AND decision IS NULL",
        )
        .bind(id_hash)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected()
    });
    if closed == 1 {
        find(db, id_hash).await
    } else {
        Ok(None)
    }
}

/// The unexpired, unspent HTTP "allow once" approvals of this authorization whose
/// fingerprint is `fingerprint`, oldest decision first: what a retry may spend ([`spend`]).
///
/// # Errors
/// Database errors.
pub async fn unused_onces(
    db: &Db,
    authorization: &AuthorizationId,
    fingerprint: &str,
    now: i64,
) -> Result<Vec<ApprovalRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM approvals p JOIN authorizations a ON a.id = p.authorization_id \
             WHERE p.authorization_id = $1 AND p.fingerprint = $2 AND p.transport = 'http' \
             AND p.decision = 'once' AND p.used_at IS NULL AND p.expires_at > $3 \
             ORDER BY p.decided_at LIMIT 20"
        );
        Ok(sqlx::query_as(sql)
            .bind(authorization)
            .bind(fingerprint)
            .bind(now)
            .fetch_all(pool)
            .await?)
    })
}

/// Spends the "allow once" `id_hash` if it is still unspent and unexpired (one conditional
/// `UPDATE`: of retries at once, exactly one spends it). Returns whether this call did.
///
/// # Errors
/// Database errors.
pub async fn spend(db: &Db, id_hash: &TokenHash, now: i64) -> Result<bool, RepoError> {
    let spent = on_engine!(db, |pool| {
        sqlx::query(
            "UPDATE approvals SET used_at = $2 WHERE id_hash = $1 AND decision = 'once' \
             AND used_at IS NULL AND expires_at > $2",
        )
        .bind(id_hash)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected()
    });
    Ok(spent == 1)
}

/// The kinds the owner allowed this authorization from now on, ascending.
///
/// # Errors
/// Database errors.
pub async fn allowed_kinds(db: &Db, authorization: &AuthorizationId) -> Result<Vec<i64>, RepoError> {
    Ok(on_engine!(db, |pool| {
        sqlx::query_scalar("SELECT kind FROM authorization_kinds WHERE authorization_id = $1 ORDER BY kind")
            .bind(authorization)
            .fetch_all(pool)
            .await?
    }))
}
