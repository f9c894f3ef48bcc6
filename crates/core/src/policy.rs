//! What an authorization may do: [`Policy`], parsed from `policies.permissions`, and
//! [`evaluate`], the **one** function both transports call before any operation.
//!
//! Every capability is granted explicitly (issue 12, item 4: a policy that only listed kinds
//! used to allow encrypting and decrypting with any peer, so a "wallet" could read every
//! direct message):
//!
//! | permission | grants | restricts |
//! |---|---|---|
//! | `allowed_kinds: [..]` | `sign_event` of these kinds | with `full_access`, signing to these kinds |
//! | `encrypt: true` | nip04/nip44 encrypt | – |
//! | `decrypt: true` | nip04/nip44 decrypt | – |
//! | `full_access: true` | sign any kind, encrypt, decrypt | – |
//! | `encrypt_to_self: true` | – | encrypt/decrypt only with the user's own key as peer |
//! | `blocked_words: [..]` | – | signed content and encrypted plaintext must not contain one |
//!
//! `get_public_key` is always allowed; an empty document `{}` allows nothing else. Unknown
//! fields are refused at parse time, so a typo cannot silently widen a policy. Blocked words
//! match case-insensitively.
//!
//! What the consent page says is generated from the same fields ([`Policy::summary`],
//! [`Summary::lines`]), and a test walks every seeded policy and every method to check that
//! [`Summary::permits`] and [`evaluate`] agree, so the words cannot drift from what is
//! enforced again.

use std::collections::BTreeSet;

use keycast_db::policies::PolicyRow;
use nostr::PublicKey;

use crate::request::Request;

/// Kind 22242: NIP-42 relay authentication.
pub const RELAY_AUTH_KIND: u16 = 22242;

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// The policy's slug, named in denials.
    pub slug: String,
    /// Kinds `sign_event` may sign; `None` = none (or any, with `full_access`).
    pub allowed_kinds: Option<BTreeSet<u16>>,
    /// Words (lowercased) that may not appear in signed content or encrypted plaintext.
    pub blocked_words: Vec<String>,
    /// nip04/nip44 encryption allowed.
    pub encrypt: bool,
    /// nip04/nip44 decryption allowed.
    pub decrypt: bool,
    /// Encrypt/decrypt only with the user's own key as peer.
    pub encrypt_to_self: bool,
    /// Sign any kind (unless `allowed_kinds` narrows it), encrypt and decrypt.
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
    encrypt: bool,
    #[serde(default)]
    decrypt: bool,
    #[serde(default)]
    encrypt_to_self: bool,
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

/// Which events a policy lets an app sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    Nothing,
    Kinds(BTreeSet<u16>),
    Any,
}

/// With whom a policy lets an app encrypt or decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    Nobody,
    OwnKey,
    Anyone,
}

/// What a policy allows, in the terms the consent page uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub sign: Signing,
    pub encrypt: Peers,
    pub decrypt: Peers,
    pub blocked_words: Vec<String>,
}

impl Summary {
    /// Whether this summary says `request` is allowed (content filters aside, which the
    /// lines state separately).
    pub fn permits(&self, request: &Request, user: &PublicKey) -> bool {
        let peers_ok = |scope: Peers, peer: &PublicKey| match scope {
            Peers::Nobody => false,
            Peers::OwnKey => peer == user,
            Peers::Anyone => true,
        };
        match request {
            Request::GetPublicKey => true,
            Request::SignEvent(event) => match &self.sign {
                Signing::Nothing => false,
                Signing::Kinds(kinds) => kinds.contains(&event.kind.as_u16()),
                Signing::Any => true,
            },
            Request::Nip04Encrypt { peer, .. } | Request::Nip44Encrypt { peer, .. } => peers_ok(self.encrypt, peer),
            Request::Nip04Decrypt { peer, .. } | Request::Nip44Decrypt { peer, .. } => peers_ok(self.decrypt, peer),
        }
    }

    /// One sentence per capability, for the consent page and `GET /api/policies`.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec!["See your public key.".to_owned()];
        lines.push(match &self.sign {
            Signing::Nothing => "Sign nothing.".to_owned(),
            Signing::Any => "Sign any event as you: posts, profile, follows, deletions, everything.".to_owned(),
            Signing::Kinds(kinds) => {
                let names: Vec<String> = kinds.iter().map(|k| kind_name(*k)).collect();
                format!("Sign only these events as you: {}.", names.join(", "))
            }
        });
        lines.push(match self.encrypt {
            Peers::Nobody => "Not encrypt messages.".to_owned(),
            Peers::OwnKey => "Encrypt notes to yourself only.".to_owned(),
            Peers::Anyone => "Encrypt messages to anyone, as you (NIP-04, NIP-44).".to_owned(),
        });
        lines.push(match self.decrypt {
            Peers::Nobody => "Not read your encrypted messages.".to_owned(),
            Peers::OwnKey => "Decrypt notes to yourself only.".to_owned(),
            Peers::Anyone => "Read every encrypted message sent to you or by you (NIP-04, NIP-44).".to_owned(),
        });
        if !self.blocked_words.is_empty() {
            lines.push(format!(
                "Never sign or encrypt text containing: {}.",
                self.blocked_words.join(", ")
            ));
        }
        lines
    }
}

/// `profile (kind 0)`, or `kind 30000` for a kind without a common name.
fn kind_name(kind: u16) -> String {
    let name = match kind {
        0 => "profile",
        1 => "notes",
        3 => "follow list",
        4 => "direct messages (NIP-04)",
        5 => "deletions",
        6 => "reposts",
        7 => "reactions",
        44 => "channel mutes",
        1059 => "gift wraps",
        9734 => "zap requests",
        9735 => "zap receipts",
        RELAY_AUTH_KIND => "relay authentication",
        30023 => "long-form articles",
        _ => return format!("kind {kind}"),
    };
    format!("{name} (kind {kind})")
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
            encrypt: parsed.encrypt,
            decrypt: parsed.decrypt,
            encrypt_to_self: parsed.encrypt_to_self,
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

    /// What this policy allows, in the consent page's terms.
    pub fn summary(&self) -> Summary {
        let sign = match (&self.allowed_kinds, self.full_access) {
            (Some(kinds), _) if kinds.is_empty() => Signing::Nothing,
            (Some(kinds), _) => Signing::Kinds(kinds.clone()),
            (None, true) => Signing::Any,
            (None, false) => Signing::Nothing,
        };
        let scope = |granted: bool| match (granted || self.full_access, self.encrypt_to_self) {
            (false, _) => Peers::Nobody,
            (true, true) => Peers::OwnKey,
            (true, false) => Peers::Anyone,
        };
        Summary {
            sign,
            encrypt: scope(self.encrypt),
            decrypt: scope(self.decrypt),
            blocked_words: self.blocked_words.clone(),
        }
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
        let allowed = match &self.allowed_kinds {
            Some(kinds) => kinds.contains(&kind),
            None => self.full_access,
        };
        if !allowed {
            return self.deny(format_args!("kind {kind} is not allowed"));
        }
        self.check_content(content, "signing content")
    }

    fn check_encrypt(&self, peer: &PublicKey, plaintext: &str, user: &PublicKey) -> Result<(), Denial> {
        if !(self.encrypt || self.full_access) {
            return self.deny("encryption is not allowed");
        }
        if self.encrypt_to_self && peer != user {
            return self.deny("encryption to another key than the user's own is not allowed");
        }
        self.check_content(plaintext, "encrypting a message")
    }

    fn check_decrypt(&self, peer: &PublicKey, user: &PublicKey) -> Result<(), Denial> {
        if !(self.decrypt || self.full_access) {
            return self.deny("decryption is not allowed");
        }
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

    const SOCIAL: &str = r#"{"allowed_kinds":[0,1,3,4,7,44,1059,9735,22242],"encrypt":true,"decrypt":true}"#;

    #[test]
    fn sign_denied_when_kind_not_allowed() {
        let (user, _) = keys();
        let social = Policy::parse("social", SOCIAL).unwrap();
        assert!(evaluate(&social, &sign(&user, 1, "hi"), &user).is_ok());
        let denial = evaluate(&social, &sign(&user, 30023, "article"), &user).unwrap_err();
        assert_eq!(denial.reason, "kind 30023 is not allowed by policy social");
    }

    #[test]
    fn listing_kinds_grants_no_encryption_or_decryption() {
        let (user, peer) = keys();
        let wallet = Policy::parse("wallet", r#"{"allowed_kinds":[9734]}"#).unwrap();
        let enc = evaluate(&wallet, &encrypt(peer, "hi"), &user).unwrap_err();
        assert_eq!(enc.reason, "encryption is not allowed by policy wallet");
        let dec = evaluate(&wallet, &decrypt(peer), &user).unwrap_err();
        assert_eq!(dec.reason, "decryption is not allowed by policy wallet");
        assert!(evaluate(&wallet, &sign(&user, 9734, ""), &user).is_ok());
    }

    #[test]
    fn an_empty_document_allows_only_the_public_key() {
        let (user, peer) = keys();
        let empty = Policy::parse("empty", "{}").unwrap();
        assert!(evaluate(&empty, &Request::GetPublicKey, &user).is_ok());
        for request in [sign(&user, 1, "x"), encrypt(peer, "x"), decrypt(peer)] {
            assert!(evaluate(&empty, &request, &user).is_err(), "{request:?}");
        }
    }

    #[test]
    fn encrypt_to_self_requires_the_user_as_peer_both_ways() {
        let (user, peer) = keys();
        let own = Policy::parse("own", r#"{"encrypt":true,"decrypt":true,"encrypt_to_self":true}"#).unwrap();
        assert!(evaluate(&own, &encrypt(user, "note to self"), &user).is_ok());
        assert!(evaluate(&own, &decrypt(user), &user).is_ok());
        assert!(evaluate(&own, &encrypt(peer, "hi"), &user).is_err());
        assert!(evaluate(&own, &decrypt(peer), &user).is_err());
    }

    #[test]
    fn content_filter_blocks_sign_and_encrypt_but_not_decrypt() {
        let (user, peer) = keys();
        let clean = Policy::parse("clean", r#"{"full_access":true,"blocked_words":["Spam"]}"#).unwrap();
        let denial = evaluate(&clean, &sign(&user, 1, "buy SPAM now"), &user).unwrap_err();
        assert!(denial.reason.contains("\"spam\""), "{denial}");
        assert!(evaluate(&clean, &encrypt(peer, "spammy"), &user).is_err());
        assert!(evaluate(&clean, &decrypt(peer), &user).is_ok());
        assert!(evaluate(&clean, &sign(&user, 1, "ham"), &user).is_ok());
    }

    #[test]
    fn full_access_allows_everything_and_kinds_narrow_it() {
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
        let narrowed = Policy::parse("n", r#"{"full_access":true,"allowed_kinds":[1]}"#).unwrap();
        assert!(evaluate(&narrowed, &sign(&user, 1, "ok"), &user).is_ok());
        assert!(evaluate(&narrowed, &sign(&user, 7, "ok"), &user).is_err());
    }

    #[test]
    fn unknown_or_mistyped_permissions_are_refused() {
        let typo = Policy::parse("typo", r#"{"allowed_kind":[1]}"#).unwrap_err();
        assert!(
            typo.to_string().contains("policy typo has invalid permissions"),
            "{typo}"
        );
        assert!(
            Policy::parse("old", r#"{"decrypt_only":true}"#).is_err(),
            "the old field is gone"
        );
        assert!(Policy::parse("bad", r#"{"allowed_kinds":"1"}"#).is_err());
        assert!(Policy::parse("bad", "not json").is_err());
    }

    #[test]
    fn the_wallet_summary_says_zap_requests_and_nothing_about_messages_it_cannot_read() {
        let wallet = Policy::parse("wallet", r#"{"allowed_kinds":[9734]}"#).unwrap();
        let lines = wallet.summary().lines().join(" ");
        assert!(lines.contains("zap requests (kind 9734)"), "{lines}");
        assert!(lines.contains("Not read your encrypted messages"), "{lines}");
    }

    /// Every seeded policy, every method, every kind, both kinds of peer: what the consent
    /// page says ([`Summary`]) is exactly what [`evaluate`] enforces.
    #[tokio::test]
    async fn every_seeded_policy_does_exactly_what_its_consent_text_says() {
        let fx = crate::testing::fixture().await;
        let rows = keycast_db::policies::list(fx.pool()).await.unwrap();
        assert_eq!(rows.len(), 4, "the seeded policies");
        let (user, other) = keys();
        for row in rows {
            let policy = Policy::from_row(&row).unwrap();
            let summary = policy.summary();
            let mut requests = vec![Request::GetPublicKey];
            for peer in [user, other] {
                requests.push(Request::Nip04Encrypt {
                    peer,
                    plaintext: "x".into(),
                });
                requests.push(Request::Nip44Encrypt {
                    peer,
                    plaintext: "x".into(),
                });
                requests.push(Request::Nip04Decrypt {
                    peer,
                    ciphertext: "x?iv=y".into(),
                });
                requests.push(Request::Nip44Decrypt {
                    peer,
                    ciphertext: "x".into(),
                });
            }
            requests.extend((0..=u16::MAX).map(|kind| sign(&user, kind, "")));
            for request in &requests {
                assert_eq!(
                    evaluate(&policy, request, &user).is_ok(),
                    summary.permits(request, &user),
                    "policy {} and {request:?}: the consent text and the enforcement disagree",
                    row.slug
                );
            }
            let text = summary.lines().join(" ");
            assert_eq!(
                text.contains("Sign nothing"),
                summary.sign == Signing::Nothing,
                "{}: {text}",
                row.slug
            );
        }
    }
}
