//! OAuth 2.0 authorization codes (RFC 6749) with mandatory PKCE S256 (RFC 7636), and
//! their exchange for a grant.
//!
//! A code is redeemed by one conditional `UPDATE` before anything else is checked, so it
//! can be exchanged at most once even under a race; a request with the wrong verifier,
//! client or redirect URI still uses it up (RFC 6749 §4.1.2 asks that a code be used
//! once). A code used again by its client, with its verifier, revokes the grant it became
//! (§4.1.2: the server SHOULD revoke what it issued from a code used twice). HTTP renders
//! [`OAuthError::code`] as the RFC 6749 `error` field.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use keycast_db::oauth::{self as oauth_repo, NewCode};
use keycast_db::policies::{self as policy_repo, PolicyRow};
use keycast_db::Db;
use keycast_db::{RepoError, UserId};
use sha2::{Digest, Sha256};

use crate::authz::{create_grant, Grant, GrantError, NewGrant};
use crate::error::InternalError;
use crate::refresh::{issue_refresh_token, TokenLifetimes};
use crate::secret::{ct_eq, hash_token, random_token, Secret};
use crate::signer::Signer;
use crate::terms::Choice;

/// Default and longest life of an authorization code: 10 minutes (seconds), the most
/// RFC 6749 §4.1.2 recommends. Deployments may shorten it (`KEYCAST_OAUTH_CODE_TTL_SECS`).
pub const CODE_TTL_SECS: i64 = 600;

/// An OAuth failure, by RFC 6749 error code. `reason` is the `error_description`.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("invalid_request: {reason}")]
    InvalidRequest { reason: String },
    #[error("invalid_grant: {reason}")]
    InvalidGrant { reason: String },
    #[error("invalid_scope: {reason}")]
    InvalidScope { reason: String },
    /// The client may not ask (an unregistered app while open registration is off).
    #[error("unauthorized_client: {reason}")]
    UnauthorizedClient { reason: String },
    #[error("internal error")]
    Internal(#[source] InternalError),
}

impl OAuthError {
    /// The RFC 6749 `error` value.
    pub fn code(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest { .. } => "invalid_request",
            OAuthError::InvalidGrant { .. } => "invalid_grant",
            OAuthError::InvalidScope { .. } => "invalid_scope",
            OAuthError::UnauthorizedClient { .. } => "unauthorized_client",
            OAuthError::Internal(_) => "server_error",
        }
    }
}

impl From<RepoError> for OAuthError {
    fn from(err: RepoError) -> Self {
        OAuthError::Internal(err.into())
    }
}

impl From<GrantError> for OAuthError {
    fn from(err: GrantError) -> Self {
        OAuthError::Internal(err.into())
    }
}

fn invalid_request(reason: impl Into<String>) -> OAuthError {
    OAuthError::InvalidRequest { reason: reason.into() }
}

fn invalid_grant(reason: impl Into<String>) -> OAuthError {
    OAuthError::InvalidGrant { reason: reason.into() }
}

/// The longest `client_id` accepted. It is stored with every code and grant (and a revoked
/// grant's row is kept), so an unbounded one lets an account grow the database at will;
/// client ids in use are names or URLs far shorter.
pub const MAX_CLIENT_ID_BYTES: usize = 256;
/// The longest `redirect_uri` accepted (stored like the client id).
pub const MAX_REDIRECT_URI_BYTES: usize = 2048;
/// The longest `state` accepted: echoed in the redirect, never stored.
pub const MAX_STATE_BYTES: usize = 2048;

/// A `client_id` that is present and within [`MAX_CLIENT_ID_BYTES`].
///
/// # Errors
/// [`OAuthError::InvalidRequest`] naming the field.
pub fn check_client_id(client_id: &str) -> Result<(), OAuthError> {
    if client_id.trim().is_empty() {
        return Err(invalid_request("client_id is required"));
    }
    if client_id.len() > MAX_CLIENT_ID_BYTES {
        return Err(invalid_request(format!(
            "client_id is longer than {MAX_CLIENT_ID_BYTES} bytes"
        )));
    }
    // RFC 6749 §A.1: visible characters and spaces. A control character is never meant, a
    // NUL is text PostgreSQL refuses (a 500 there, and a row that stops the move there), and
    // the consent page shows the id: see `shown::disguised`.
    if crate::shown::disguised(client_id) {
        return Err(invalid_request(format!("client_id {}", crate::shown::REFUSED)));
    }
    Ok(())
}

/// Checks a redirect URI (absolute `https`, or `http` on localhost / a loopback
/// address; no fragment) and returns its origin (`scheme://host[:port]`), which is what
/// the consent page shows and the authorization records.
///
/// # Errors
/// [`OAuthError::InvalidRequest`].
pub fn redirect_origin(uri: &str) -> Result<String, OAuthError> {
    if uri.len() > MAX_REDIRECT_URI_BYTES {
        return Err(invalid_request(format!(
            "redirect_uri is longer than {MAX_REDIRECT_URI_BYTES} bytes"
        )));
    }
    let url = url::Url::parse(uri).map_err(|_| invalid_request("redirect_uri is not an absolute URL"))?;
    if url.fragment().is_some() {
        return Err(invalid_request("redirect_uri must not have a fragment"));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => {}
        "http" if loopback => {}
        _ => return Err(invalid_request("redirect_uri must use https (or http on localhost)")),
    }
    Ok(url.origin().ascii_serialization())
}

/// The policy slug of a `policy:<slug>` scope.
///
/// # Errors
/// [`OAuthError::InvalidScope`].
pub fn policy_slug(scope: &str) -> Result<&str, OAuthError> {
    scope
        .trim()
        .strip_prefix("policy:")
        .filter(|slug| !slug.is_empty())
        .ok_or_else(|| OAuthError::InvalidScope {
            reason: "scope must be policy:<slug>, e.g. policy:social".into(),
        })
}

/// Looks up the policy a scope names.
///
/// # Errors
/// [`OAuthError::InvalidScope`] for a malformed scope or unknown policy.
pub async fn scope_policy(db: &Db, scope: &str) -> Result<PolicyRow, OAuthError> {
    let slug = policy_slug(scope)?;
    policy_repo::find_by_slug(db, slug)
        .await?
        .ok_or_else(|| OAuthError::InvalidScope {
            reason: format!("there is no policy {slug:?}"),
        })
}

/// The S256 challenge of a verifier: base64url(SHA-256(verifier)), no padding.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// RFC 7636 §4.1: 43–128 characters of `[A-Za-z0-9-._~]`.
fn valid_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// What the consent step approved.
#[derive(Debug, Clone)]
pub struct CodeRequest<'a> {
    pub user_id: &'a UserId,
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub policy: &'a PolicyRow,
    pub code_challenge: &'a str,
    /// Must be `S256`; `plain` and absence are refused.
    pub code_challenge_method: &'a str,
    /// The owner's choice of duration and limits for the grant.
    pub choice: Choice,
    /// The owner's session that consented: the code is written only while it is live, so a
    /// consent checked before a password reset ended that session writes nothing after it.
    pub session: &'a keycast_db::TokenHash,
}

/// Issues a code for an approved request, valid `ttl_secs` (clamped to 1..=[`CODE_TTL_SECS`]).
///
/// # Errors
/// [`OAuthError::InvalidRequest`] for a missing client id, a bad redirect URI, or PKCE
/// that is missing, not S256, or malformed; [`OAuthError::Internal`].
pub async fn issue_code(
    db: &Db,
    request: &CodeRequest<'_>,
    ttl_secs: i64,
    now: i64,
) -> Result<Secret<String>, OAuthError> {
    check_client_id(request.client_id)?;
    redirect_origin(request.redirect_uri)?;
    if request.code_challenge_method != "S256" {
        return Err(invalid_request("PKCE is required: code_challenge_method must be S256"));
    }
    let challenge_ok = request.code_challenge.len() == 43
        && URL_SAFE_NO_PAD
            .decode(request.code_challenge)
            .is_ok_and(|d| d.len() == 32);
    if !challenge_ok {
        return Err(invalid_request(
            "code_challenge must be the base64url SHA-256 of the verifier",
        ));
    }
    let code = random_token();
    let terms = request.choice.to_json();
    let new = NewCode {
        code_hash: &hash_token(code.expose()),
        user_id: request.user_id,
        client_id: request.client_id,
        redirect_uri: request.redirect_uri,
        policy_id: &request.policy.id,
        code_challenge: request.code_challenge,
        terms: terms.as_deref(),
        session: request.session,
    };
    oauth_repo::insert_code(db, &new, now, now + ttl_secs.clamp(1, CODE_TTL_SECS)).await?;
    Ok(code)
}

/// The token request (`grant_type=authorization_code`).
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    pub code: &'a str,
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub code_verifier: &'a str,
}

/// Exchanges a code for a grant (new authorization, bunker keypair, connect secret,
/// access and refresh tokens living as `lifetimes` says, bunker on `relays`), while its
/// user has fewer than `max_live` live grants.
///
/// # Errors
/// [`OAuthError::InvalidRequest`] for a malformed verifier (the code is not used up);
/// [`OAuthError::InvalidGrant`] for an unknown, expired or used code (a used one presented
/// with its client id and verifier revokes the grant it became: see [`reused`]), or a
/// client id, redirect URI or verifier that does not match, or a user with `max_live` live
/// grants already; [`OAuthError::Internal`].
pub async fn exchange_code(
    signer: &Signer,
    request: &TokenRequest<'_>,
    relays: &[String],
    lifetimes: TokenLifetimes,
    max_live: u32,
    now: i64,
) -> Result<Grant, OAuthError> {
    if !valid_verifier(request.code_verifier) {
        return Err(invalid_request(
            "code_verifier must be 43-128 characters of [A-Za-z0-9-._~]",
        ));
    }
    let db = signer.db();
    let hash = hash_token(request.code);
    let Some(code) = oauth_repo::redeem_code(db, &hash, now).await? else {
        return Err(reused(signer, request, now).await?);
    };
    let mut grant = match grant_of(signer, request, &code, relays, lifetimes, max_live, now).await {
        Ok(grant) => grant,
        Err(refused) => {
            // The code is used up and became no grant: it goes, so that presenting it again
            // reads as an unknown code, not as the theft of a grant (see `reused`).
            if let Err(err) = oauth_repo::drop_unlinked_code(db, &hash).await {
                tracing::warn!(error = %err, "a refused code could not be removed; it expires in minutes");
            }
            return Err(refused);
        }
    };
    // Fault injection: a pause between the grant's insert and the code's link to it.
    crate::hold_at_fail_point("code-exchange-before-link").await;
    if !oauth_repo::link_code(db, &hash, &grant.authorization.id).await? {
        // Since this code's redemption, every grant of the account was revoked (a password
        // reset, a new key, a deletion), or the code was presented again with its verifier
        // (see `reused`): the grant goes too.
        signer
            .revoke_authorization(&grant.authorization.id, &code.user_id)
            .await?;
        return Err(invalid_grant(
            "the code was used again while it was being exchanged, or the account's grants were revoked since \
             it was issued; authorize the app again",
        ));
    }
    // No refresh token outlives a grant for a time.
    let refresh_secs = match grant.authorization.terms.expires_at {
        Some(at) => (at - now).clamp(1, lifetimes.refresh_secs),
        None => lifetimes.refresh_secs,
    };
    let refresh = issue_refresh_token(db, &grant.authorization.id, refresh_secs, now).await?;
    grant.refresh_token = Some(refresh);
    Ok(grant)
}

/// The grant the redeemed `code` becomes, once `request` proves it may: its client, redirect
/// URI and PKCE verifier match, and the policy chosen at consent is still there.
async fn grant_of(
    signer: &Signer,
    request: &TokenRequest<'_>,
    code: &keycast_db::oauth::OAuthCode,
    relays: &[String],
    lifetimes: TokenLifetimes,
    max_live: u32,
    now: i64,
) -> Result<Grant, OAuthError> {
    let db = signer.db();
    if !ct_eq(code.client_id.as_bytes(), request.client_id.as_bytes()) {
        return Err(invalid_grant("client_id does not match the code"));
    }
    if code.redirect_uri != request.redirect_uri {
        return Err(invalid_grant("redirect_uri does not match the authorization request"));
    }
    if !ct_eq(
        pkce_challenge(request.code_verifier).as_bytes(),
        code.code_challenge.as_bytes(),
    ) {
        return Err(invalid_grant("code_verifier does not match the code_challenge"));
    }
    let choice: Choice = match code.terms.as_deref() {
        Some(json) => serde_json::from_str(json).map_err(|_| invalid_grant("the code's terms are unreadable"))?,
        None => Choice::default(),
    };
    let deleted = || invalid_grant("the policy chosen at consent was deleted since; authorize the app again");
    let policy = policy_repo::find_by_id(db, &code.policy_id)
        .await?
        .filter(|policy| policy.deleted_at.is_none())
        .ok_or_else(deleted)?;
    let new = NewGrant {
        user_id: &code.user_id,
        policy: &policy,
        client_id: &code.client_id,
        redirect_origin: &redirect_origin(&code.redirect_uri)?,
        relays,
        token_ttl_secs: lifetimes.access_secs,
        terms: choice.terms_from(now),
        max_live,
        // The code is what the owner's consent wrote: a reset since deleted it (`link_code`).
        session: None,
    };
    match create_grant(db, signer.key_manager(), &new, now).await {
        // Deleted between the check above and the insert.
        Err(GrantError::PolicyDeleted { .. }) => Err(deleted()),
        // Consent checks this too; codes issued before the account filled up end here.
        Err(e @ GrantError::TooManyGrants { .. }) => Err(invalid_grant(e.to_string())),
        other => Ok(other?),
    }
}

/// What a code presented after it was redeemed gets. RFC 6749 §4.1.2: such a code may have
/// been stolen, and the server SHOULD revoke what it issued from it. keycast revokes the grant
/// the code became only when the request proves it holds both the code and its PKCE verifier
/// (and names the code's client): a code that leaked alone (a log, a `Referer`) must not let
/// whoever found it revoke a user's grant. A client that retries after losing the answer
/// revokes its own grant too, and must ask its user again: a lost answer and a theft look the
/// same from here. Commits: the caller should wait for durability before answering.
///
/// # Errors
/// Storage errors.
async fn reused(signer: &Signer, request: &TokenRequest<'_>, now: i64) -> Result<OAuthError, OAuthError> {
    let unusable = invalid_grant("the code is unknown, expired or already used");
    let code_hash = hash_token(request.code);
    let Some(code) = oauth_repo::find_redeemed_code(signer.db(), &code_hash, now).await? else {
        return Ok(unusable);
    };
    let proven = ct_eq(code.client_id.as_bytes(), request.client_id.as_bytes())
        && ct_eq(
            pkce_challenge(request.code_verifier).as_bytes(),
            code.code_challenge.as_bytes(),
        );
    if !proven {
        return Ok(unusable);
    }
    let authorization = match code.authorization_id {
        Some(linked) => linked,
        // Its first exchange is still making the grant: the code goes, so that exchange's
        // link finds nothing and revokes what it made. Unless it linked first.
        None if oauth_repo::drop_unlinked_code(signer.db(), &code_hash).await? => {
            metrics::counter!("keycast_oauth_code_reused_total").increment(1);
            tracing::warn!(
                client_id = %code.client_id,
                "an authorization code was used twice while its first exchange was under way: that exchange keeps no grant (RFC 6749 section 4.1.2)"
            );
            return Ok(revoked());
        }
        None => match oauth_repo::find_redeemed_code(signer.db(), &code_hash, now)
            .await?
            .and_then(|code| code.authorization_id)
        {
            Some(linked) => linked,
            None => return Ok(unusable),
        },
    };
    if signer.revoke_authorization(&authorization, &code.user_id).await? {
        metrics::counter!("keycast_oauth_code_reused_total").increment(1);
        tracing::warn!(
            %authorization,
            client_id = %code.client_id,
            "an authorization code was used twice: the grant it became is revoked (RFC 6749 section 4.1.2)"
        );
    }
    Ok(revoked())
}

fn revoked() -> OAuthError {
    invalid_grant(
        "the code was already used: the grant it became is revoked, as a code used twice may have been stolen; authorize the app again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, social_policy, Fixture};
    use std::sync::Arc;

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const REDIRECT: &str = "https://app.example/cb";

    async fn code(fx: &Fixture) -> Secret<String> {
        let policy = social_policy(fx).await;
        let challenge = pkce_challenge(VERIFIER);
        let session = crate::testing::session(fx.pool(), &fx.user).await;
        let request = CodeRequest {
            user_id: &fx.user,
            client_id: "app",
            redirect_uri: REDIRECT,
            policy: &policy,
            code_challenge: &challenge,
            code_challenge_method: "S256",
            choice: Choice::default(),
            session: &session,
        };
        issue_code(fx.pool(), &request, CODE_TTL_SECS, 100).await.unwrap()
    }

    fn token_request<'a>(code: &'a Secret<String>) -> TokenRequest<'a> {
        TokenRequest {
            code: code.expose(),
            client_id: "app",
            redirect_uri: REDIRECT,
            code_verifier: VERIFIER,
        }
    }

    fn signer(fx: &Fixture) -> Signer {
        Signer::new(fx.db.clone(), fx.km.clone(), crate::signer::SignerOptions::default())
    }

    async fn exchange(fx: &Fixture, request: &TokenRequest<'_>, now: i64) -> Result<Grant, OAuthError> {
        exchange_code(
            &signer(fx),
            request,
            &fx.relays,
            TokenLifetimes::default(),
            crate::authz::DEFAULT_MAX_LIVE_GRANTS,
            now,
        )
        .await
    }

    #[test]
    fn pkce_challenge_matches_rfc7636_appendix_b() {
        assert_eq!(pkce_challenge(VERIFIER), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    }

    #[test]
    fn redirect_uris_must_be_https_or_loopback_http() {
        assert_eq!(
            redirect_origin("https://app.example:8443/cb?x=1").unwrap(),
            "https://app.example:8443"
        );
        assert_eq!(
            redirect_origin("http://127.0.0.1:5173/cb").unwrap(),
            "http://127.0.0.1:5173"
        );
        assert!(redirect_origin("http://localhost/cb").is_ok());
        assert!(redirect_origin("http://[::1]:9/cb").is_ok());
        for bad in [
            "http://app.example/cb",
            "myapp://cb",
            "/relative",
            "https://app.example/cb#frag",
        ] {
            assert!(redirect_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scope_names_a_policy() {
        assert_eq!(policy_slug("policy:social").unwrap(), "social");
        assert_eq!(policy_slug("openid").unwrap_err().code(), "invalid_scope");
        assert!(policy_slug("policy:").is_err());
    }

    #[tokio::test]
    async fn code_exchanges_once_for_a_grant() {
        let fx = fixture().await;
        let code = code(&fx).await;
        let grant = exchange(&fx, &token_request(&code), 101).await.unwrap();
        assert_eq!(grant.authorization.redirect_origin, "https://app.example");
        assert_eq!(grant.authorization.policy.slug, "social");
        let again = exchange(&fx, &token_request(&code), 102).await.unwrap_err();
        assert_eq!(again.code(), "invalid_grant");
    }

    /// RFC 6749 §4.1.2: a code used twice may have been stolen; what it became is revoked —
    /// but only for a request that holds the verifier too, so a leaked code alone cannot
    /// revoke anybody's grant.
    #[tokio::test]
    async fn a_code_used_again_with_its_verifier_revokes_the_grant_it_became() {
        let fx = fixture().await;
        let live = |id: keycast_db::AuthorizationId| {
            let db = fx.db.clone();
            async move {
                let row = keycast_db::authz::find_by_id(&db, &id).await.unwrap().unwrap();
                row.revoked_at.is_none()
            }
        };
        let code = code(&fx).await;
        let grant = exchange(&fx, &token_request(&code), 101).await.unwrap();
        let id = grant.authorization.id.clone();
        let leaked = TokenRequest {
            code_verifier: "a-guess-that-is-long-enough-to-be-a-well-formed-verifier-000",
            ..token_request(&code)
        };
        let refused = exchange(&fx, &leaked, 102).await.unwrap_err();
        assert!(refused.to_string().contains("already used"), "{refused}");
        let other_client = TokenRequest {
            client_id: "another-app",
            ..token_request(&code)
        };
        exchange(&fx, &other_client, 102).await.unwrap_err();
        assert!(live(id.clone()).await, "the code alone revokes nothing");

        let replayed = exchange(&fx, &token_request(&code), 103).await.unwrap_err();
        assert_eq!(replayed.code(), "invalid_grant");
        assert!(replayed.to_string().contains("revoked"), "{replayed}");
        assert!(!live(id.clone()).await, "the grant the code became is revoked");
        // Once the code has expired it is forgotten like any other.
        let late = exchange(&fx, &token_request(&code), 100 + CODE_TTL_SECS)
            .await
            .unwrap_err();
        assert!(!late.to_string().contains("revoked"), "{late}");
    }

    /// A code presented again, with its verifier, while it is being exchanged is a code used
    /// twice (RFC 6749 §4.1.2) however close together the two come: at most one exchange is
    /// answered with a grant, and none is left live.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_exchanges_of_one_code_leave_no_grant() {
        let fx = fixture().await;
        let code = code(&fx).await;
        let signer = Arc::new(signer(&fx));
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let (signer, relays, code) = (signer.clone(), fx.relays.clone(), code.clone());
                tokio::spawn(async move {
                    let request = token_request(&code);
                    exchange_code(
                        &signer,
                        &request,
                        &relays,
                        TokenLifetimes::default(),
                        crate::authz::DEFAULT_MAX_LIVE_GRANTS,
                        101,
                    )
                    .await
                    .is_ok()
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            winners += usize::from(task.await.unwrap());
        }
        assert!(winners <= 1, "{winners} exchanges answered");
        let live = keycast_db::authz::count_live_for_user(&fx.db, &fx.user, 101)
            .await
            .unwrap();
        assert_eq!(live, 0, "a grant of a code used twice stayed live");
    }

    #[tokio::test]
    async fn wrong_verifier_client_or_redirect_is_invalid_grant_and_burns_the_code() {
        let fx = fixture().await;
        let other_verifier = "x".repeat(43);
        let c = code(&fx).await;
        let wrong_verifier = TokenRequest {
            code_verifier: &other_verifier,
            ..token_request(&c)
        };
        let err = exchange(&fx, &wrong_verifier, 101).await.unwrap_err();
        assert!(err.to_string().contains("code_verifier does not match"), "{err}");
        let retry = exchange(&fx, &token_request(&c), 102).await.unwrap_err();
        assert_eq!(retry.code(), "invalid_grant", "the code was used up");
        // It became no grant, so presenting it again is no theft of one.
        assert!(!retry.to_string().contains("revoked"), "{retry}");
        let c = code(&fx).await;
        let wrong_client = TokenRequest {
            client_id: "evil",
            ..token_request(&c)
        };
        assert!(exchange(&fx, &wrong_client, 101)
            .await
            .unwrap_err()
            .to_string()
            .contains("client_id"));
        let c = code(&fx).await;
        let wrong_redirect = TokenRequest {
            redirect_uri: "https://app.example/other",
            ..token_request(&c)
        };
        let err = exchange(&fx, &wrong_redirect, 101).await.unwrap_err();
        assert!(err.to_string().contains("redirect_uri"), "{err}");
        let retry = exchange(&fx, &token_request(&c), 102).await.unwrap_err();
        assert!(!retry.to_string().contains("revoked"), "{retry}");
    }

    #[tokio::test]
    async fn expired_code_is_invalid_grant() {
        let fx = fixture().await;
        let code = code(&fx).await;
        let err = exchange(&fx, &token_request(&code), 100 + CODE_TTL_SECS)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_grant");
    }

    #[tokio::test]
    async fn a_code_lives_its_ttl_and_never_longer_than_ten_minutes() {
        let fx = fixture().await;
        let policy = social_policy(&fx).await;
        let challenge = pkce_challenge(VERIFIER);
        let session = crate::testing::session(fx.pool(), &fx.user).await;
        let request = CodeRequest {
            user_id: &fx.user,
            client_id: "app",
            redirect_uri: REDIRECT,
            policy: &policy,
            code_challenge: &challenge,
            code_challenge_method: "S256",
            choice: Choice::default(),
            session: &session,
        };
        let short = issue_code(fx.pool(), &request, 5, 100).await.unwrap();
        assert_eq!(
            exchange(&fx, &token_request(&short), 105).await.unwrap_err().code(),
            "invalid_grant"
        );
        let long = issue_code(fx.pool(), &request, 3600, 100).await.unwrap();
        let err = exchange(&fx, &token_request(&long), 100 + CODE_TTL_SECS)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            "invalid_grant",
            "a longer TTL is clamped to {CODE_TTL_SECS} s"
        );
        let fresh = issue_code(fx.pool(), &request, 5, 100).await.unwrap();
        exchange(&fx, &token_request(&fresh), 104).await.unwrap();
    }

    #[tokio::test]
    async fn missing_or_plain_pkce_is_refused_at_authorization() {
        let fx = fixture().await;
        let policy = social_policy(&fx).await;
        let challenge = pkce_challenge(VERIFIER);
        for (method, challenge) in [("plain", challenge.as_str()), ("", ""), ("S256", "short")] {
            let session = crate::testing::session(fx.pool(), &fx.user).await;
            let request = CodeRequest {
                user_id: &fx.user,
                client_id: "app",
                redirect_uri: REDIRECT,
                policy: &policy,
                code_challenge: challenge,
                code_challenge_method: method,
                choice: Choice::default(),
                session: &session,
            };
            assert_eq!(
                issue_code(fx.pool(), &request, CODE_TTL_SECS, 1)
                    .await
                    .unwrap_err()
                    .code(),
                "invalid_request",
                "{method}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_verifier_is_invalid_request_and_keeps_the_code() {
        let fx = fixture().await;
        let code = code(&fx).await;
        let bad = TokenRequest {
            code_verifier: "short",
            ..token_request(&code)
        };
        assert_eq!(exchange(&fx, &bad, 101).await.unwrap_err().code(), "invalid_request");
        exchange(&fx, &token_request(&code), 102).await.unwrap();
    }
}
