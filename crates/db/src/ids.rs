//! Typed ids and token hashes.
//!
//! Every id is a newtype over `String`, so a key id cannot be passed where a user id is
//! expected. New ids are 128 random bits from the operating system, hex-encoded, made in
//! Rust (never by the database) so the same SQL runs on SQLite and PostgreSQL.
//!
//! [`TokenHash`] is the only form in which a bearer token, session cookie, OAuth code or
//! connect secret reaches the database: it can be built only by hashing, so a raw token
//! cannot be stored by mistake.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// 128 random bits from the OS, as 32 lowercase hex characters.
fn random_hex_128() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, sqlx::Type, serde::Serialize, serde::Deserialize)]
        #[sqlx(transparent)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A fresh random id (128 bits from the OS, hex).
            pub fn generate() -> Self {
                Self(random_hex_128())
            }

            /// Wraps an id received from outside (a URL path, a stored reference). No
            /// validation: an unknown id simply finds nothing.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

typed_id!(
    /// A user account (`users.id`).
    UserId
);
typed_id!(
    /// A user's stored Nostr key (`keys.id`).
    KeyId
);
typed_id!(
    /// One app's grant to sign for one user (`authorizations.id`).
    AuthorizationId
);
typed_id!(
    /// A policy (`policies.id`); the seeded ones are `pol_social`, `pol_readonly`, …
    PolicyId
);
typed_id!(
    /// One activity record (`activity.id`).
    ActivityId
);

/// SHA-256 of a high-entropy secret (token, code, connect secret), lowercase hex.
///
/// SHA-256 without salt or stretching is right here because every hashed value is
/// 256 random bits made by keycast, never a human-chosen password (those use argon2id in
/// `keycast-core`). Looking a token up by its hash needs no constant-time compare: the
/// database index compares hashes, and learning a hash prefix says nothing about a
/// token the attacker does not already have.
#[derive(Debug, Clone, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct TokenHash(String);

impl TokenHash {
    /// Hashes a raw token. The only constructor: a `TokenHash` is never a raw token.
    pub fn of(raw: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(raw)))
    }

    /// The hash as hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A hash as [`TokenHash::as_str`] writes it (another instance's announcement): 64
    /// lowercase hex digits, never a raw token.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| Self(hex.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_128_bit_hex_and_distinct() {
        let a = UserId::generate();
        let b = UserId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn token_hash_is_sha256_hex_of_the_token() {
        let hash = TokenHash::of(b"abc");
        assert_eq!(
            hash.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(hash, TokenHash::of(b"abd"));
    }
}
