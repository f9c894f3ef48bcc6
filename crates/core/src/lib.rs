//! keycast's domain: accounts, users' keys and their encryption at rest, authorizations,
//! policies, and the one signing path both transports call.
//!
//! # Layout
//! - [`secret`]: [`Secret`] (zeroizes, never prints), `ct_eq`, random tokens, token hashes.
//! - [`key_manager`]: [`KeyManager`] and the AES-256-GCM [`MasterKeyManager`].
//! - [`rotation`]: master-key rotation (resumable, verified, safe beside `serve`).
//! - [`keys`]: generate / import / load / export users' keys; bunker keys; the start-up
//!   check [`keys::verify_can_decrypt`].
//! - [`password`]: argon2id, and the [`Reauthenticated`] proof export requires.
//! - [`hashing_queue`]: the bounded queue (memory budget) argon2 and scrypt run through.
//! - [`policy`]: [`Policy`] and [`policy::evaluate`], the one permission check.
//! - [`approval`]: asking the owner instead of refusing (NIP-46 `auth_url`, HTTP 403 with
//!   an approval URL), and the kinds an owner allowed from now on.
//! - [`request`]: [`Request`] / [`Response`], what transports decode into and encode.
//! - [`authz`]: [`Authorization`], grants (bunker keypair, connect secret, token).
//! - [`accounts`]: register, log in, sessions, mailed single-use tokens.
//! - [`account_security`]: what the mailbox owner's proof of control does (verification,
//!   password reset, take-over), the verified-email gate, recorded key export, exposure.
//! - [`oauth`]: authorization codes with PKCE S256, exchanged atomically for a grant.
//! - [`clients`]: registered apps, and whether a `client_id` is verified, unverified or refused.
//! - [`refresh`]: rotating refresh tokens with reuse detection, RFC 7009 revocation.
//! - [`terms`]: a grant's duration and limits, and the meter that enforces them.
//! - [`grants`]: custom policies, and the owner's edits of an app's grant.
//! - [`signer`]: [`Signer`] — resolve a credential, `execute` a request, caches with
//!   explicit invalidation, buffered activity.
//! - [`housekeeping`]: removing sessions, tokens and codes whose time is over.
//! - [`cluster`]: many instances on PostgreSQL — change notices between them (so a
//!   revocation anywhere is refused everywhere on the next request) and which instance
//!   answers each NIP-46 request.
//! - [`vital`]: the background tasks an instance cannot serve without, and the report
//!   that one of them ended (so `serve` exits and the platform replaces it).
//!
//! This crate knows nothing of HTTP, relays, environment variables or files; the binary
//! reads configuration and passes values in.

pub mod account_security;
pub mod accounts;
mod activity;
pub mod approval;
pub mod authz;
mod cache;
pub mod clients;
pub mod cluster;
pub mod durability;
mod error;
pub mod grants;
pub mod hashing_queue;
pub mod housekeeping;
pub mod in_flight;
pub mod key_manager;
pub mod keys;
pub mod nostrconnect;
pub mod oauth;
pub mod password;
pub mod policy;
pub mod refresh;
pub mod request;
pub mod rotation;
pub mod secret;
pub mod shown;
pub mod signer;
pub mod terms;
#[cfg(test)]
mod testing;
pub mod vital;

pub use activity::{DEFAULT_ACTIVITY_CAPACITY, DEFAULT_KEPT_PER_GRANT};
pub use authz::{Authorization, Grant};
pub use durability::Durability;
pub use error::{AuthError, InternalError, SignError};
pub use hashing_queue::HashingQueue;
pub use key_manager::{KeyManager, KeyOwner, Keyring, MasterKey, MasterKeyManager};
pub use keys::KeyError;
pub use nostrconnect::NostrConnectUri;
pub use password::{PasswordHasher, PasswordParams, Reauthenticated};
pub use policy::{Denial, Policy};
pub use request::{DecodeError, Request, Response, Transport};
pub use secret::Secret;
pub use signer::{Announcement, Change, Revocation, Signer, SignerOptions};

/// Re-exported so transports build requests with the same `nostr` version.
pub use nostr;

/// What a fail point that holds a request (`return(<ms>)`) returns: the milliseconds to hold
/// it, logged as `held at fail point <name>` so that a test acts once the request is held,
/// not after a guess at how long that takes. Only fail points call it (none in a build
/// without fault injection).
#[doc(hidden)]
pub fn held_at_fail_point(name: &str, ms: Option<String>) -> Option<u64> {
    let ms = ms.and_then(|ms| ms.parse().ok());
    tracing::info!("held at fail point {name} for {} ms", ms.unwrap_or(0));
    ms
}

/// Fault injection: pauses for as long as the fail point `name` says (`return(<ms>)`, see
/// [`held_at_fail_point`]); returns at once without fault injection.
#[doc(hidden)]
pub async fn hold_at_fail_point(name: &str) {
    if let Some(ms) = held_ms(name) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

fn held_ms(name: &str) -> Option<u64> {
    fail::fail_point!(name, |ms| held_at_fail_point(name, ms));
    // Read only by the fail point, which is compiled out without the `failpoints` feature.
    let _ = name;
    None
}
