//! What an authorization may do: [`Policy`], parsed from `policies.permissions`, and
//! [`evaluate`], the **one** function both transports call before any operation.
//!
//! Permissions follow the predecessor's table and combine by AND — every permission
//! present must allow the request:
//!
//! | permission | sign_event | encrypt | decrypt |
//! |---|---|---|---|
//! | `allowed_kinds: [..]` | kind must be listed | – | – |
//! | `blocked_words: [..]` (content filter) | content must not contain one | plaintext must not contain one | – |
//! | `encrypt_to_self: true` | – | peer must be the user | peer must be the user |
//! | `decrypt_only: true` | only kind 22242 (relay auth) | refused | – |
//! | `full_access: true` | – | – | – |
//!
//! `full_access` adds no restriction of its own, so `{"full_access": true}` allows
//! everything and, like the predecessor, an empty document `{}` does too. Unknown fields
//! are refused at parse time, so a typo cannot silently widen a policy.
//! `get_public_key` is always allowed. Blocked words match case-insensitively.

use std::collections::BTreeSet;

use keycast_db::policies::PolicyRow;
use nostr::PublicKey;

use crate::request::Request;

/// Kind 22242: NIP-42 relay authentication, the one kind a read-only app may sign.
pub const RELAY_AUTH_KIND: u16 = 22242;

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// The policy's slug, named in denials.
    pub slug: String,
    /// Kinds `sign_event` may sign; `None` = any.
    pub allowed_kinds: Option<BTreeSet<u16>>,
    /// Words (lowercased) that may not appear in signed content or encrypted plaintext.
    pub blocked_words: Vec<String>,
    /// Encrypt/decrypt only with the user's own key as peer.
    pub encrypt_to_self: bool,
    /// Decrypt and relay-auth only.
    pub decrypt_only: bool,
    /// Everything (adds no restriction).
    pub full_access: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Permissions {
    #[serde(default)]
    allowed_kinds: Option<BTreeSet<u16>>,
    #[serde(default)]
    blocked_words: Vec<String>,
    #[serde(default)]
    encrypt_to_self: bool,
    #[serde(default)]
    decrypt_only: bool,
    #[serde(default)]
    full_access: bool,
}

/// A stored permissions document that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("policy {slug} has invalid permissions: {reason}")]
pub struct PolicyError {
    pub slug: String,
    pub reason: String,
}

/// Why [`evaluate`] refused a request; `reason` is meant for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denial {
    pub reason: String,
}

impl Policy {
    /// Parses a permissions JSON document.
    ///
    /// # Errors
    /// [`PolicyError`] for invalid JSON, wrong types or unknown fields.
    pub fn parse(slug: &str, permissions: &str) -> Result<Policy, PolicyError> {
        let parsed: Permissions = serde_json::from_str(permissions).map_err(|e| PolicyError {
            slug: slug.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Policy {
            slug: slug.to_owned(),
            allowed_kinds: parsed.allowed_kinds,
            blocked_words: parsed.blocked_words.iter().map(|w| w.to_lowercase()).collect(),
            encrypt_to_self: parsed.encrypt_to_self,
            decrypt_only: parsed.decrypt_only,
            full_access: parsed.full_access,
        })
    }

    /// Parses a stored policy row.
    ///
    /// # Errors
    /// As [`Policy::parse`].
    pub fn from_row(row: &PolicyRow) -> Result<Policy, PolicyError> {
        Policy::parse(&row.slug, &row.permissions)
    }

    fn deny(&self, what: impl std::fmt::Display) -> Result<(), Denial> {
        Err(Denial {
            reason: format!("{what} by policy {}", self.slug),
        })
    }

    fn check_content(&self, text: &str, what: &str) -> Result<(), Denial> {
        if self.blocked_words.is_empty() {
            return Ok(());
        }
        let lower = text.to_lowercase();
        match self
            .blocked_words
            .iter()
            .find(|w| !w.is_empty() && lower.contains(w.as_str()))
        {
            Some(word) => self.deny(format_args!("{what} containing the word \"{word}\" is not allowed")),
            None => Ok(()),
        }
    }

    fn check_sign(&self, kind: u16, content: &str) -> Result<(), Denial> {
        if self.decrypt_only && kind != RELAY_AUTH_KIND {
            return self.deny(format_args!(
                "signing kind {kind} is not allowed (only kind {RELAY_AUTH_KIND}, relay authentication, is)"
            ));
        }
        if let Some(kinds) = &self.allowed_kinds {
            if !kinds.contains(&kind) {
                return self.deny(format_args!("kind {kind} is not allowed"));
            }
        }
        self.check_content(content, "signing content")
    }

    fn check_encrypt(&self, peer: &PublicKey, plaintext: &str, user: &PublicKey) -> Result<(), Denial> {
        if self.decrypt_only {
            return self.deny("encryption is not allowed");
        }
        if self.encrypt_to_self && peer != user {
            return self.deny("encryption to another key than the user's own is not allowed");
        }
        self.check_content(plaintext, "encrypting a message")
    }

    fn check_decrypt(&self, peer: &PublicKey, user: &PublicKey) -> Result<(), Denial> {
        if self.encrypt_to_self && peer != user {
            return self.deny("decryption of messages with another key than the user's own is not allowed");
        }
        Ok(())
    }
}

/// Decides whether `policy` allows `request` for the user whose public key is `user`.
/// Used by every transport for every operation.
///
/// # Errors
/// [`Denial`] with a reason naming what was refused and the policy, e.g.
/// "kind 30023 is not allowed by policy social".
pub fn evaluate(policy: &Policy, request: &Request, user: &PublicKey) -> Result<(), Denial> {
    match request {
        Request::GetPublicKey => Ok(()),
        Request::SignEvent(event) => policy.check_sign(event.kind.as_u16(), &event.content),
        Request::Nip04Encrypt { peer, plaintext } | Request::Nip44Encrypt { peer, plaintext } => {
            policy.check_encrypt(peer, plaintext, user)
        }
        Request::Nip04Decrypt { peer, .. } | Request::Nip44Decrypt { peer, .. } => policy.check_decrypt(peer, user),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{Keys, Kind, Tags, Timestamp, UnsignedEvent};

    fn sign(user: &PublicKey, kind: u16, content: &str) -> Request {
        Request::SignEvent(UnsignedEvent::new(
            *user,
            Timestamp::from(1),
            Kind::from(kind),
            Tags::new(),
            content,
        ))
    }

    fn encrypt(peer: PublicKey, text: &str) -> Request {
        Request::Nip44Encrypt {
            peer,
            plaintext: text.into(),
        }
    }

    fn decrypt(peer: PublicKey) -> Request {
        Request::Nip04Decrypt {
            peer,
            ciphertext: "x?iv=y".into(),
        }
    }

    fn keys() -> (PublicKey, PublicKey) {
        (Keys::generate().public_key(), Keys::generate().public_key())
    }

    const SOCIAL: &str = r#"{"allowed_kinds":[0,1,3,4,7,44,1059,9735,22242]}"#;

    #[test]
    fn sign_denied_when_kind_not_allowed() {
        let (user, _) = keys();
        let social = Policy::parse("social", SOCIAL).unwrap();
        assert!(evaluate(&social, &sign(&user, 1, "hi"), &user).is_ok());
        let denial = evaluate(&social, &sign(&user, 30023, "article"), &user).unwrap_err();
        assert_eq!(denial.reason, "kind 30023 is not allowed by policy social");
    }

    #[test]
    fn allowed_kinds_does_not_restrict_encryption() {
        let (user, peer) = keys();
        let wallet = Policy::parse("wallet", r#"{"allowed_kinds":[9734]}"#).unwrap();
        assert!(evaluate(&wallet, &encrypt(peer, "hi"), &user).is_ok());
        assert!(evaluate(&wallet, &decrypt(peer), &user).is_ok());
    }

    #[test]
    fn decrypt_only_allows_decrypt_and_relay_auth_only() {
        let (user, peer) = keys();
        let readonly = Policy::parse("readonly", r#"{"decrypt_only":true}"#).unwrap();
        assert!(evaluate(&readonly, &decrypt(peer), &user).is_ok());
        assert!(evaluate(&readonly, &sign(&user, RELAY_AUTH_KIND, ""), &user).is_ok());
        let sign_denial = evaluate(&readonly, &sign(&user, 1, "hi"), &user).unwrap_err();
        assert!(sign_denial.reason.contains("kind 1 is not allowed"), "{sign_denial}");
        let enc_denial = evaluate(&readonly, &encrypt(peer, "hi"), &user).unwrap_err();
        assert_eq!(enc_denial.reason, "encryption is not allowed by policy readonly");
    }

    #[test]
    fn encrypt_to_self_requires_the_user_as_peer_both_ways() {
        let (user, peer) = keys();
        let own = Policy::parse("own", r#"{"encrypt_to_self":true}"#).unwrap();
        assert!(evaluate(&own, &encrypt(user, "note to self"), &user).is_ok());
        assert!(evaluate(&own, &decrypt(user), &user).is_ok());
        assert!(evaluate(&own, &encrypt(peer, "hi"), &user).is_err());
        assert!(evaluate(&own, &decrypt(peer), &user).is_err());
        assert!(evaluate(&own, &sign(&user, 1, "hi"), &user).is_ok());
    }

    #[test]
    fn content_filter_blocks_sign_and_encrypt_but_not_decrypt() {
        let (user, peer) = keys();
        let clean = Policy::parse("clean", r#"{"blocked_words":["Spam"]}"#).unwrap();
        let denial = evaluate(&clean, &sign(&user, 1, "buy SPAM now"), &user).unwrap_err();
        assert!(denial.reason.contains("\"spam\""), "{denial}");
        assert!(evaluate(&clean, &encrypt(peer, "spammy"), &user).is_err());
        assert!(evaluate(&clean, &decrypt(peer), &user).is_ok());
        assert!(evaluate(&clean, &sign(&user, 1, "ham"), &user).is_ok());
    }

    #[test]
    fn permissions_combine_by_and() {
        let (user, _) = keys();
        let both = Policy::parse(
            "both",
            r#"{"allowed_kinds":[1],"blocked_words":["x"],"full_access":true}"#,
        )
        .unwrap();
        assert!(evaluate(&both, &sign(&user, 1, "ok"), &user).is_ok());
        assert!(
            evaluate(&both, &sign(&user, 1, "xx"), &user).is_err(),
            "content filter still applies"
        );
        assert!(
            evaluate(&both, &sign(&user, 7, "ok"), &user).is_err(),
            "kinds still apply"
        );
    }

    #[test]
    fn full_access_allows_everything() {
        let (user, peer) = keys();
        let full = Policy::parse("full", r#"{"full_access":true}"#).unwrap();
        for request in [
            sign(&user, 30023, "x"),
            encrypt(peer, "x"),
            decrypt(peer),
            Request::GetPublicKey,
        ] {
            assert!(evaluate(&full, &request, &user).is_ok(), "{request:?}");
        }
    }

    #[test]
    fn get_public_key_is_always_allowed() {
        let (user, _) = keys();
        let readonly = Policy::parse("readonly", r#"{"decrypt_only":true,"allowed_kinds":[]}"#).unwrap();
        assert!(evaluate(&readonly, &Request::GetPublicKey, &user).is_ok());
    }

    #[test]
    fn unknown_or_mistyped_permissions_are_refused() {
        let typo = Policy::parse("typo", r#"{"allowed_kind":[1]}"#).unwrap_err();
        assert!(
            typo.to_string().contains("policy typo has invalid permissions"),
            "{typo}"
        );
        assert!(Policy::parse("bad", r#"{"allowed_kinds":"1"}"#).is_err());
        assert!(Policy::parse("bad", "not json").is_err());
    }
}
