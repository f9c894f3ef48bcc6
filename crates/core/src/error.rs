//! The signing path's errors: [`AuthError`] (who is asking) and [`SignError`] (what they
//! asked). Each variant is a domain cause a transport maps to its own wire form; the
//! text of a database or crypto failure stays inside [`InternalError`] and is for logs
//! only, never for the wire.

use keycast_db::RepoError;

use crate::authz::GrantError;
use crate::keys::KeyError;
use crate::policy::PolicyError;

/// A failure that is keycast's fault, not the caller's. Log it; answer "internal error".
///
/// A storage failure is always [`InternalError::Repo`], however deep it arose (a key's, a
/// grant's or a client's): the transports tell a full disk from a bug by that variant alone
/// (503 "disk is full", not 500), so the `From` impls below lift it out of the others.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Key(KeyError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Grant(GrantError),
    #[error(transparent)]
    Client(crate::clients::ClientError),
    #[error("signing failed: {0}")]
    Crypto(String),
}

impl From<KeyError> for InternalError {
    fn from(err: KeyError) -> Self {
        match err {
            KeyError::Repo(e) => InternalError::Repo(e),
            other => InternalError::Key(other),
        }
    }
}

impl From<GrantError> for InternalError {
    fn from(err: GrantError) -> Self {
        match err {
            GrantError::Repo(e) => InternalError::Repo(e),
            GrantError::Key(e) => e.into(),
            other => InternalError::Grant(other),
        }
    }
}

impl From<crate::clients::ClientError> for InternalError {
    fn from(err: crate::clients::ClientError) -> Self {
        match err {
            crate::clients::ClientError::Repo(e) => InternalError::Repo(e),
            other => InternalError::Client(other),
        }
    }
}

/// Why a credential does not resolve to a live authorization.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No such bearer token (or bunker). HTTP 401.
    #[error("unknown token")]
    UnknownToken,
    /// The bearer token has expired. HTTP 401.
    #[error("the token has expired")]
    Expired,
    /// The authorization was revoked by its user. HTTP 401.
    #[error("the authorization has been revoked")]
    Revoked,
    /// NIP-46: this client is not the one bound by `connect` (or none is bound yet).
    #[error("this client is not connected to the bunker; send connect with the secret first")]
    ClientNotBound,
    /// NIP-46: `connect` without the right secret.
    #[error("the connect secret is missing or wrong")]
    BadConnectSecret,
    /// NIP-46: another client already holds this bunker.
    #[error("another client is already connected to this bunker")]
    AlreadyBound,
    #[error("internal error")]
    Internal(#[source] InternalError),
}

/// Why [`crate::Signer::execute`] refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The policy refuses it; `reason` is for the user ("kind 30023 is not allowed by
    /// policy social"). HTTP 403; NIP-46 error reply.
    #[error("{reason}")]
    PolicyDenied { reason: String },
    /// The grant's own terms refuse it: expired (`grant_expired`), its signatures used up
    /// (`grant_exhausted`) or a rate reached (`grant_rate_limited`). `reason` is for the
    /// app to show. HTTP 403 with `code`; NIP-46 error reply.
    #[error("{reason}")]
    GrantRefused { code: &'static str, reason: String },
    /// The policy does not cover it, but the owner may allow it: a pending approval was
    /// made ([`crate::approval`]). HTTP 403 with `approval_url`; NIP-46 `auth_url`.
    #[error("{reason}")]
    ApprovalRequired {
        reason: String,
        url: String,
        expires_at: i64,
    },
    /// HTTP 401.
    #[error("the authorization has been revoked")]
    Revoked,
    /// HTTP 401.
    #[error("the token has expired")]
    Expired,
    /// HTTP 401.
    #[error("unknown token")]
    UnknownToken,
    /// The request is malformed or cannot be carried out (e.g. a ciphertext that does
    /// not decrypt). HTTP 400.
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    /// The user has no key to sign with.
    #[error("the account has no key")]
    NoKey,
    /// A credential problem other than the above (NIP-46 binding).
    #[error(transparent)]
    Auth(AuthError),
    #[error("internal error")]
    Internal(#[source] InternalError),
}

impl From<AuthError> for SignError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::UnknownToken => SignError::UnknownToken,
            AuthError::Expired => SignError::Expired,
            AuthError::Revoked => SignError::Revoked,
            AuthError::Internal(e) => SignError::Internal(e),
            other => SignError::Auth(other),
        }
    }
}

macro_rules! internal_into_auth {
    ($($source:ty),*) => {$(
        impl From<$source> for AuthError {
            fn from(err: $source) -> Self {
                AuthError::Internal(err.into())
            }
        }
    )*};
}
internal_into_auth!(RepoError, KeyError, PolicyError, GrantError);

impl From<InternalError> for SignError {
    fn from(err: InternalError) -> Self {
        SignError::Internal(err)
    }
}

impl From<KeyError> for SignError {
    fn from(err: KeyError) -> Self {
        match err {
            KeyError::NoKey => SignError::NoKey,
            other => SignError::Internal(other.into()),
        }
    }
}

impl From<RepoError> for SignError {
    fn from(err: RepoError) -> Self {
        SignError::Internal(err.into())
    }
}
