//! Rotating refresh tokens (RFC 6749 §6, RFC 9700 §4.14) and token revocation (RFC 7009).
//!
//! The code exchange issues an access token (short-lived, an hour by default) and a
//! refresh token. Each refresh spends its refresh token and returns a new pair; the
//! authorization — its policy, its bunker and the bunker URL the app already holds — is
//! unchanged. Presenting a refresh token that was already spent means two parties hold it
//! (the app and a thief; which is which cannot be known), so the whole family is revoked:
//! the authorization, with every access token, refresh token and its bunker. The app's
//! owner sees it revoked and can authorize again.
//!
//! One exception keeps a lost response from costing the app its grant (RFC 9700 §4.14.2
//! allows this leeway): within [`REFRESH_GRACE_SECS`] of a refresh, and only while the
//! token it issued has never been used, the *immediately previous* token may be presented
//! again. That retry is answered with a fresh pair which **replaces** the unused successor:
//! the successor is spent and the access token issued with it deleted, so the family still
//! has exactly one live refresh token and nothing is revoked. Should the successor turn up
//! later after all (the retry came from a thief, and the app did get the response), it is
//! reuse and revokes the family, thief's pair included. Presenting the previous token after
//! the window or after the successor was used, or presenting any older token, is reuse as
//! before.
//!
//! Tokens are random, stored hashed (SHA-256 of 256 random bits: a lookup by hash is not a
//! comparison an attacker can time), and a refresh's `client_id` is compared in constant
//! time. This module holds no HTTP: `keycast-http` decodes and renders.

use keycast_db::refresh::{self as refresh_repo, Successor};
use keycast_db::RepoError;

use crate::authz::Authorization;
use crate::error::{AuthError, InternalError};
use crate::oauth::OAuthError;
use crate::secret::{ct_eq, hash_token, random_token, Secret};
use crate::Signer;

/// Default life of an access token: one hour (seconds). Apps refresh for another.
pub const DEFAULT_ACCESS_TOKEN_TTL_SECS: i64 = 3600;
/// Default life of a refresh token: 30 days (seconds), counted afresh at each rotation,
/// so an app used at least monthly never has to ask its user again.
pub const DEFAULT_REFRESH_TOKEN_TTL_SECS: i64 = 30 * 24 * 3600;

/// How long after a refresh its spent token may still be presented once more, when the
/// response was lost (see the module doc).
pub const REFRESH_GRACE_SECS: i64 = 30;

/// How long issued tokens live, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLifetimes {
    /// Access tokens. Default [`DEFAULT_ACCESS_TOKEN_TTL_SECS`].
    pub access_secs: i64,
    /// Refresh tokens. Default [`DEFAULT_REFRESH_TOKEN_TTL_SECS`].
    pub refresh_secs: i64,
}

impl Default for TokenLifetimes {
    fn default() -> Self {
        TokenLifetimes {
            access_secs: DEFAULT_ACCESS_TOKEN_TTL_SECS,
            refresh_secs: DEFAULT_REFRESH_TOKEN_TTL_SECS,
        }
    }
}

/// What a successful refresh returns: the authorization (unchanged) and the new pair.
#[derive(Debug)]
pub struct Refreshed {
    /// The authorization, `expires_at` being the new access token's expiry.
    pub authorization: Authorization,
    pub access_token: Secret<String>,
    pub access_token_expires_at: i64,
    pub refresh_token: Secret<String>,
}

/// The refresh request (`grant_type=refresh_token`).
#[derive(Debug, Clone)]
pub struct RefreshRequest<'a> {
    pub refresh_token: &'a str,
    /// The public client's id; must be the one the token was issued to.
    pub client_id: &'a str,
}

/// Issues the first refresh token of an authorization's family, valid `ttl_secs`.
///
/// # Errors
/// Storage errors.
pub async fn issue_refresh_token(
    db: &keycast_db::Db,
    authorization: &keycast_db::AuthorizationId,
    ttl_secs: i64,
    now: i64,
) -> Result<Secret<String>, RepoError> {
    let token = random_token();
    refresh_repo::insert(db, &hash_token(token.expose()), authorization, now, now + ttl_secs).await?;
    Ok(token)
}

fn invalid_grant(reason: &str) -> OAuthError {
    OAuthError::InvalidGrant { reason: reason.into() }
}

impl From<AuthError> for OAuthError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Internal(cause) => OAuthError::Internal(cause),
            other => OAuthError::InvalidGrant {
                reason: other.to_string(),
            },
        }
    }
}

/// The authorization a refresh token that can still yield a pair belongs to — live and
/// unspent, or spent within the grace window (its retry replaces the unused successor):
/// what a refresh is counted against before it is made. A dead token (spent before that,
/// expired, revoked) counts against nothing: it is refused without storing anything.
///
/// # Errors
/// Storage errors.
pub async fn grant_of(
    db: &keycast_db::Db,
    token: &str,
    now: i64,
) -> Result<Option<keycast_db::AuthorizationId>, keycast_db::RepoError> {
    let grace = now - REFRESH_GRACE_SECS;
    Ok(refresh_repo::find(db, &hash_token(token))
        .await?
        .filter(|row| row.used_at.is_none_or(|used| used >= grace) && row.revoked_at.is_none() && row.expires_at > now)
        .map(|row| row.authorization_id))
}

/// Spends a refresh token for a new pair (see the module doc). Commits: the caller should
/// wait for durability before answering.
///
/// # Errors
/// [`OAuthError::InvalidGrant`] for an unknown, expired or spent token (a spent one
/// revokes its authorization first), a revoked authorization, or another client's token;
/// [`OAuthError::Internal`].
pub async fn refresh(
    signer: &Signer,
    request: &RefreshRequest<'_>,
    lifetimes: TokenLifetimes,
    now: i64,
) -> Result<Refreshed, OAuthError> {
    let db = signer.db();
    let old = hash_token(request.refresh_token);
    let row = refresh_repo::find(db, &old)
        .await?
        .ok_or_else(|| invalid_grant("the refresh token is unknown"))?;
    // Another client's token is refused without spending it: its holder is not its owner.
    if !ct_eq(row.client_id.as_bytes(), request.client_id.as_bytes()) {
        return Err(invalid_grant("client_id does not match the refresh token"));
    }
    // A grant for a time ends then, refresh tokens and all (RFC 6749 §5.2: `invalid_grant`):
    // it yields no pair after, and none that outlives it.
    let ends_at = keycast_db::authz::find_by_id(db, &row.authorization_id)
        .await?
        .and_then(|grant| crate::terms::GrantTerms::from_json(grant.terms.as_deref()).ok())
        .and_then(|terms| terms.expires_at);
    if ends_at.is_some_and(|at| now >= at) {
        return Err(invalid_grant(
            "the grant has ended (the duration its owner chose); ask them to authorize the app again",
        ));
    }
    let (access, refresh_token) = (random_token(), random_token());
    let next = Successor {
        refresh_hash: &hash_token(refresh_token.expose()),
        refresh_expires_at: ends_at.map_or(now + lifetimes.refresh_secs, |at| at.min(now + lifetimes.refresh_secs)),
        access_hash: &hash_token(access.expose()),
        access_expires_at: now + lifetimes.access_secs,
    };
    let spendable = row.used_at.is_none() && row.revoked_at.is_none() && row.expires_at > now;
    if spendable && refresh_repo::rotate(db, &old, &next, now).await?.is_some() {
        let authorization = signer.authorize_token(access.expose()).await?;
        return Ok(Refreshed {
            authorization,
            access_token: access,
            access_token_expires_at: next.access_expires_at,
            refresh_token,
        });
    }
    // Not spent by this call: classify from the row as it is now (a concurrent refresh
    // with the same token has spent it: that is reuse too).
    let row = refresh_repo::find(db, &old)
        .await?
        .ok_or_else(|| invalid_grant("the refresh token is unknown"))?;
    if row.revoked_at.is_some() {
        return Err(invalid_grant("the authorization has been revoked"));
    }
    if let (Some(used_at), Some(successor)) = (row.used_at, row.successor_hash.as_ref()) {
        // A retry of a refresh whose response was lost: the successor was never used.
        let since = now - REFRESH_GRACE_SECS;
        if used_at >= since
            && refresh_repo::replace_unused_successor(db, &old, successor, &next, since, now)
                .await?
                .is_some()
        {
            tracing::info!(
                authorization = %row.authorization_id,
                "a refresh token was presented again within the grace window: its unused successor was replaced"
            );
            // The replaced access token may sit in a cache (here, or on another instance).
            signer.invalidate_authorization(&row.authorization_id);
            let authorization = signer.authorize_token(access.expose()).await?;
            return Ok(Refreshed {
                authorization,
                access_token: access,
                access_token_expires_at: next.access_expires_at,
                refresh_token,
            });
        }
    }
    if row.used_at.is_some() {
        signer.revoke_authorization(&row.authorization_id, &row.user_id).await?;
        tracing::warn!(
            authorization = %row.authorization_id,
            "a spent refresh token was presented again: authorization revoked (RFC 9700 §4.14)"
        );
        return Err(invalid_grant(
            "the refresh token was already used; the authorization has been revoked to protect the account",
        ));
    }
    Err(invalid_grant("the refresh token has expired"))
}

/// RFC 7009 revocation of `token`, whichever kind it is. A refresh token revokes its whole
/// authorization (the app is signing out: its bunker and every token end with it); an
/// access token ends alone. An unknown token is not an error (RFC 7009 §2.2). Possession
/// of the token is the credential, as it is for using it. Commits: the caller should wait
/// for durability before answering.
///
/// # Errors
/// Storage errors.
pub async fn revoke_token(signer: &Signer, token: &str) -> Result<(), InternalError> {
    let hash = hash_token(token);
    let db = signer.db();
    if let Some(row) = refresh_repo::find(db, &hash).await? {
        signer.revoke_authorization(&row.authorization_id, &row.user_id).await?;
        return Ok(());
    }
    if refresh_repo::delete_access_token(db, &hash).await?.is_some() {
        signer.invalidate_token(&hash);
    }
    Ok(())
}
