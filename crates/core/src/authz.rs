//! Authorizations as the signer sees them, and creating them (a *grant*): a bunker
//! keypair, a NIP-46 connect secret, a bearer token.
//!
//! Revoking goes through [`crate::Signer::revoke`], never the repository directly, so
//! the signer's caches hear of it.

use std::sync::Arc;

use keycast_db::authz::{self as authz_repo, AuthorizationRow, NewAuthorization};
use keycast_db::oauth as oauth_repo;
use keycast_db::policies::PolicyRow;
use keycast_db::Db;
use keycast_db::{AuthorizationId, RepoError, UserId};
use nostr::PublicKey;

use crate::key_manager::KeyManager;
use crate::keys::{self, KeyError};
use crate::policy::{Policy, PolicyError};
use crate::secret::{hash_token, random_token, Secret};
use crate::terms::GrantTerms;

/// Default life of an access token: one hour (seconds); apps refresh for another
/// ([`crate::refresh`]).
pub const DEFAULT_TOKEN_TTL_SECS: i64 = crate::refresh::DEFAULT_ACCESS_TOKEN_TTL_SECS;

/// One app's grant to sign for one user, as resolved from a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub id: AuthorizationId,
    pub user_id: UserId,
    pub policy: Arc<Policy>,
    pub client_id: String,
    pub redirect_origin: String,
    /// The bunker's public key (NIP-46 `remote-signer-pubkey`).
    pub bunker_pubkey: PublicKey,
    pub relays: Vec<String>,
    /// The NIP-46 client bound by the first `connect` with the secret.
    pub connected_client_pubkey: Option<PublicKey>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// When the credential that resolved this (a bearer token) expires; `None` for
    /// NIP-46, whose credential is the bound client key.
    pub expires_at: Option<i64>,
    /// The owner's terms: how long the grant lasts, and its limits.
    pub terms: GrantTerms,
}

/// Why a grant could not be created or an authorization read.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The stored row is unreadable (bad pubkey or relays).
    #[error("authorization {id} is corrupt: {what}")]
    Corrupt { id: String, what: &'static str },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The policy was deleted after it was looked up (its owner deleted it meanwhile).
    #[error("policy {slug:?} was deleted meanwhile; choose another")]
    PolicyDeleted { slug: String },
    /// The account already has `max` live grants.
    #[error(
        "this account already has {max} apps with access, the most it may have; revoke one you no longer use \
         on the dashboard, then try again"
    )]
    TooManyGrants { max: u32 },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl Authorization {
    /// Builds the domain view of a stored row.
    ///
    /// # Errors
    /// [`GrantError::Corrupt`].
    pub fn from_row(row: &AuthorizationRow, policy: Arc<Policy>, expires_at: Option<i64>) -> Result<Self, GrantError> {
        let corrupt = |what| GrantError::Corrupt {
            id: row.id.to_string(),
            what,
        };
        let bunker_pubkey = PublicKey::from_hex(&row.bunker_pubkey).map_err(|_| corrupt("bunker_pubkey"))?;
        let relays: Vec<String> = serde_json::from_str(&row.relays).map_err(|_| corrupt("relays"))?;
        let terms = GrantTerms::from_json(row.terms.as_deref()).map_err(|_| corrupt("terms"))?;
        let connected_client_pubkey = match &row.connected_client_pubkey {
            Some(hex) => Some(PublicKey::from_hex(hex).map_err(|_| corrupt("connected_client_pubkey"))?),
            None => None,
        };
        Ok(Authorization {
            id: row.id.clone(),
            user_id: row.user_id.clone(),
            policy,
            client_id: row.client_id.clone(),
            redirect_origin: row.redirect_origin.clone(),
            bunker_pubkey,
            relays,
            connected_client_pubkey,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            expires_at,
            terms,
        })
    }
}

/// What a new grant is for.
#[derive(Debug, Clone)]
pub struct NewGrant<'a> {
    pub user_id: &'a UserId,
    pub policy: &'a PolicyRow,
    pub client_id: &'a str,
    pub redirect_origin: &'a str,
    /// Relays the bunker listens on (from `BUNKER_RELAYS` or the embedded relay).
    pub relays: &'a [String],
    /// Life of the access token, seconds.
    pub token_ttl_secs: i64,
    /// The owner's terms (default: until revoked, no limits).
    pub terms: GrantTerms,
    /// The most live grants the user may have, this one included
    /// ([`DEFAULT_MAX_LIVE_GRANTS`]; `KEYCAST_MAX_GRANTS_PER_ACCOUNT`).
    pub max_live: u32,
    /// The owner's session that asked for it, if one did: the grant is written only while it
    /// is live ([`keycast_db::authz::NewAuthorization::session`]).
    pub session: Option<&'a keycast_db::TokenHash>,
}

/// Live grants (not revoked, not expired) an account may have by default: each holds a
/// bunker key, a relay subscription and up to its kept activity, so one account scripting
/// consents cannot fill the database (on Cloud Run, memory) for everyone.
pub const DEFAULT_MAX_LIVE_GRANTS: u32 = 100;

/// A created grant, with its secrets. The secrets exist only here: the database keeps
/// hashes, so the bunker URL and the token can be shown to the app exactly once.
#[derive(Debug)]
pub struct Grant {
    pub authorization: Authorization,
    pub access_token: Secret<String>,
    pub access_token_expires_at: i64,
    /// The first refresh token of the family, when the grant came from an OAuth code
    /// exchange ([`crate::oauth::exchange_code`]).
    pub refresh_token: Option<Secret<String>>,
    pub connect_secret: Secret<String>,
}

impl Grant {
    /// `bunker://<bunker-pubkey>?relay=…&secret=…`. It carries the connect secret.
    pub fn bunker_url(&self) -> Secret<String> {
        Secret::new(bunker_url(
            &self.authorization.bunker_pubkey,
            &self.authorization.relays,
            self.connect_secret.expose(),
        ))
    }
}

/// Formats a NIP-46 bunker URL (relays percent-encoded).
pub fn bunker_url(bunker: &PublicKey, relays: &[String], secret: &str) -> String {
    let encode = |text: &str| url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
    let mut params: Vec<String> = relays.iter().map(|relay| format!("relay={}", encode(relay))).collect();
    params.push(format!("secret={}", encode(secret)));
    format!("bunker://{}?{}", bunker.to_hex(), params.join("&"))
}

/// Creates an authorization (own bunker keypair, connect secret) and its first access
/// token. Two commits: the caller should wait for durability before answering, and tell
/// the signer ([`crate::Signer::authorizations_changed`]) so NIP-46 listens for the bunker.
///
/// # Errors
/// [`GrantError::Policy`] for an unreadable policy, key and storage errors.
pub async fn create_grant(db: &Db, km: &dyn KeyManager, new: &NewGrant<'_>, now: i64) -> Result<Grant, GrantError> {
    let (authorization, connect_secret) = insert_authorization(db, km, new, now).await?;
    let (access_token, expires_at) = issue_access_token(db, &authorization.id, new.token_ttl_secs, now).await?;
    Ok(Grant {
        authorization: Authorization {
            expires_at: Some(expires_at),
            ..authorization
        },
        access_token,
        access_token_expires_at: expires_at,
        refresh_token: None,
        connect_secret,
    })
}

/// Stores a new authorization with its own bunker keypair and a fresh connect secret
/// (returned once; the row keeps its hash). `new.token_ttl_secs` is not used here.
pub(crate) async fn insert_authorization(
    db: &Db,
    km: &dyn KeyManager,
    new: &NewGrant<'_>,
    now: i64,
) -> Result<(Authorization, Secret<String>), GrantError> {
    let policy = Arc::new(Policy::from_row(new.policy)?);
    let id = AuthorizationId::generate();
    let (bunker, sealed) = keys::new_bunker_key(km, &id)?;
    let connect_secret = random_token();
    let relays = serde_json::to_string(new.relays).unwrap_or_else(|_| "[]".into());
    let terms = new.terms.to_json();
    let row = NewAuthorization {
        id: &id,
        user_id: new.user_id,
        policy_id: &new.policy.id,
        client_id: new.client_id,
        redirect_origin: new.redirect_origin,
        bunker_pubkey: &bunker.public_key().to_hex(),
        bunker_secret_encrypted: &sealed,
        connect_secret_hash: &hash_token(connect_secret.expose()),
        relays: &relays,
        terms: terms.as_deref(),
        max_live: new.max_live,
        session: new.session,
    };
    // The user is the caller's (a session's, a code's), so a missing reference is the
    // policy, deleted since `new.policy` was read.
    let row = authz_repo::insert(db, &row, now).await.map_err(|e| match e {
        RepoError::MissingReference => GrantError::PolicyDeleted {
            slug: new.policy.slug.clone(),
        },
        RepoError::TooMany(_) => GrantError::TooManyGrants { max: new.max_live },
        e => e.into(),
    })?;
    Ok((Authorization::from_row(&row, policy, None)?, connect_secret))
}

/// Issues another bearer token for an existing authorization. Returns the token and its
/// expiry (unix seconds).
///
/// # Errors
/// Storage errors ([`RepoError::MissingReference`] for an unknown authorization).
pub async fn issue_access_token(
    db: &Db,
    authorization: &AuthorizationId,
    ttl_secs: i64,
    now: i64,
) -> Result<(Secret<String>, i64), RepoError> {
    let token = random_token();
    let expires_at = now + ttl_secs;
    oauth_repo::insert_access_token(db, &hash_token(token.expose()), authorization, now, expires_at).await?;
    Ok((token, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, social_policy};

    #[test]
    fn bunker_url_lists_encoded_relays_then_the_secret() {
        let bunker = nostr::Keys::generate().public_key();
        let relays = vec!["wss://relay.example".to_owned(), "ws://127.0.0.1:7777/x?y".to_owned()];
        let url = bunker_url(&bunker, &relays, "s3cret");
        assert_eq!(
            url,
            format!(
                "bunker://{}?relay=wss%3A%2F%2Frelay.example&relay=ws%3A%2F%2F127.0.0.1%3A7777%2Fx%3Fy&secret=s3cret",
                bunker.to_hex()
            )
        );
        assert!(bunker_url(&bunker, &[], "s").ends_with("?secret=s"));
    }

    #[tokio::test]
    async fn grant_stores_only_hashes_and_ciphertext() {
        let fx = fixture().await;
        let policy = social_policy(&fx).await;
        let grant = create_grant(fx.pool(), fx.km.as_ref(), &fx.new_grant(&policy), 100)
            .await
            .unwrap();
        let row = authz_repo::find_by_id(fx.pool(), &grant.authorization.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.connect_secret_hash, hash_token(grant.connect_secret.expose()));
        assert_eq!(row.bunker_pubkey, grant.authorization.bunker_pubkey.to_hex());
        let token = oauth_repo::find_token_grant(fx.pool(), &hash_token(grant.access_token.expose())).await;
        assert_eq!(token.unwrap().unwrap().token_expires_at, 100 + DEFAULT_TOKEN_TTL_SECS);
        let bunker = keys::open(
            fx.km.as_ref(),
            &row.bunker_secret_encrypted,
            crate::KeyOwner::Bunker(&row.id),
        )
        .unwrap();
        assert_eq!(bunker.public_key(), grant.authorization.bunker_pubkey);
        assert!(grant.bunker_url().expose().contains(grant.connect_secret.expose()));
    }

    #[tokio::test]
    async fn every_grant_has_its_own_bunker_key() {
        let fx = fixture().await;
        let policy = social_policy(&fx).await;
        let a = create_grant(fx.pool(), fx.km.as_ref(), &fx.new_grant(&policy), 1)
            .await
            .unwrap();
        let b = create_grant(fx.pool(), fx.km.as_ref(), &fx.new_grant(&policy), 1)
            .await
            .unwrap();
        assert_ne!(a.authorization.bunker_pubkey, b.authorization.bunker_pubkey);
        assert_ne!(a.authorization.bunker_pubkey, fx.user_pubkey);
        assert_ne!(a.connect_secret.expose(), b.connect_secret.expose());
    }

    /// A consent (or a `nostrconnect://` acceptance) read the policy, then its owner deleted
    /// it before the grant was stored: the grant is refused, saying so.
    #[tokio::test]
    async fn a_grant_under_a_policy_deleted_since_it_was_read_is_refused() {
        let fx = fixture().await;
        let social = social_policy(&fx).await;
        let read = keycast_db::policies::PolicyRow {
            id: keycast_db::PolicyId::generate(),
            slug: "custom-stale".into(),
            display_name: "Stale".into(),
            owner_user_id: Some(fx.user.clone()),
            ..social
        };
        keycast_db::policies::insert(fx.pool(), &read, 100).await.unwrap();
        let deleted = keycast_db::policies::delete_owned(fx.pool(), &read.id, &fx.user, 2)
            .await
            .unwrap();
        assert_eq!(deleted, keycast_db::policies::Deletion::Deleted);
        let refused = create_grant(fx.pool(), fx.km.as_ref(), &fx.new_grant(&read), 3).await;
        assert!(
            matches!(&refused, Err(GrantError::PolicyDeleted { slug }) if slug == "custom-stale"),
            "{:?}",
            refused.map(|g| g.authorization.id)
        );
    }
}
