//! What an authorization may do: [`Policy`], parsed from `policies.permissions`, and
//! [`evaluate`], the **one** function both transports call before any operation.
//!
//! Every capability is granted explicitly (issue 12, item 4: a policy that only listed kinds
//! used to allow encrypting and decrypting with any peer, so a "wallet" could read every
//! direct message):
//!
//! | permission | grants | restricts |
//! |---|---|---|
//! | `allowed_kinds: [..]` | `sign_event` of these kinds | with `full_access` or `any_kind`, signing to these kinds |
//! | `any_kind: true` | `sign_event` of any kind | – |
//! | `denied_kinds: [..]` | – | never sign these kinds, whatever else grants them |
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
    /// Kinds `sign_event` may sign; `None` = none (or any, with `full_access` or `any_kind`).
    pub allowed_kinds: Option<BTreeSet<u16>>,
    /// Kinds never signed, whatever else allows them.
    pub denied_kinds: BTreeSet<u16>,
    /// Sign any kind (unless `allowed_kinds` narrows or `denied_kinds` removes it).
    pub any_kind: bool,
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

/// The stored permissions document. Unknown fields are refused, so a typo cannot widen
/// (or silently fail to narrow) a policy; defaults are left out when written.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Permissions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_kinds: Option<BTreeSet<u16>>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub denied_kinds: BTreeSet<u16>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub any_kind: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_words: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypt: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub decrypt: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypt_to_self: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub full_access: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
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
    /// Any kind but these.
    AnyExcept(BTreeSet<u16>),
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
                Signing::AnyExcept(denied) => !denied.contains(&event.kind.as_u16()),
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
            Signing::Kinds(kinds) => format!("Sign only these events as you: {}.", kind_names(kinds)),
            Signing::AnyExcept(denied) => {
                format!("Sign any event as you except these: {}.", kind_names(denied))
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

fn kind_names(kinds: &BTreeSet<u16>) -> String {
    kinds.iter().map(|k| kind_name(*k)).collect::<Vec<_>>().join(", ")
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
        Ok(Policy::from_permissions(slug, parsed))
    }

    /// The policy of a permissions document already parsed.
    pub fn from_permissions(slug: &str, p: Permissions) -> Policy {
        Policy {
            slug: slug.to_owned(),
            allowed_kinds: p.allowed_kinds,
            denied_kinds: p.denied_kinds,
            any_kind: p.any_kind,
            // Empty words would match everything; they mean nothing and are dropped.
            blocked_words: p
                .blocked_words
                .iter()
                .map(|w| w.trim().to_lowercase())
                .filter(|w| !w.is_empty())
                .collect(),
            encrypt: p.encrypt,
            decrypt: p.decrypt,
            encrypt_to_self: p.encrypt_to_self,
            full_access: p.full_access,
        }
    }

    /// The permissions document of this policy (what is stored and shown by the API).
    pub fn permissions(&self) -> Permissions {
        Permissions {
            allowed_kinds: self.allowed_kinds.clone(),
            denied_kinds: self.denied_kinds.clone(),
            any_kind: self.any_kind,
            blocked_words: self.blocked_words.clone(),
            encrypt: self.encrypt,
            decrypt: self.decrypt,
            encrypt_to_self: self.encrypt_to_self,
            full_access: self.full_access,
        }
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
        let sign = match (&self.allowed_kinds, self.full_access || self.any_kind) {
            (Some(kinds), _) => {
                let kinds: BTreeSet<u16> = kinds.difference(&self.denied_kinds).copied().collect();
                if kinds.is_empty() {
                    Signing::Nothing
                } else {
                    Signing::Kinds(kinds)
                }
            }
            (None, true) if self.denied_kinds.is_empty() => Signing::Any,
            (None, true) if self.denied_kinds.len() == usize::from(u16::MAX) + 1 => Signing::Nothing,
            (None, true) => Signing::AnyExcept(self.denied_kinds.clone()),
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
        let mut decoded = Vec::new();
        json_texts(text, &mut decoded, 0);
        self.check_texts(std::iter::once(text).chain(decoded.iter().map(String::as_str)), what)
    }

    /// No blocked word in any of `texts`, each compared as readers read it ([`folded`]).
    fn check_texts<'a>(&self, texts: impl IntoIterator<Item = &'a str>, what: &str) -> Result<(), Denial> {
        if self.blocked_words.is_empty() {
            return Ok(());
        }
        let words: Vec<(String, &String)> = self.blocked_words.iter().map(|w| (folded(w), w)).collect();
        for text in texts {
            let text = folded(text);
            if let Some((_, word)) = words.iter().find(|(w, _)| !w.is_empty() && text.contains(w.as_str())) {
                return self.deny(format_args!("{what} containing the word \"{word}\" is not allowed"));
            }
        }
        Ok(())
    }

    /// A blocked word may sit anywhere readers see it: the content, any tag (hashtags,
    /// titles, subjects), and behind a JSON escape in content that is JSON — a profile, a
    /// repost's event, channel metadata — however deep.
    fn check_event(&self, event: &nostr::UnsignedEvent) -> Result<(), Denial> {
        if self.blocked_words.is_empty() {
            return Ok(());
        }
        let mut decoded = Vec::new();
        json_texts(&event.content, &mut decoded, 0);
        let tags = event
            .tags
            .iter()
            .flat_map(|tag| tag.as_slice().iter().map(String::as_str));
        let texts = std::iter::once(event.content.as_str())
            .chain(tags)
            .chain(decoded.iter().map(String::as_str));
        self.check_texts(texts, "signing content")
    }

    fn check_kind(&self, kind: u16) -> Result<(), Denial> {
        if self.denied_kinds.contains(&kind) {
            return self.deny(format_args!("kind {kind} is denied"));
        }
        let allowed = match &self.allowed_kinds {
            Some(kinds) => kinds.contains(&kind),
            None => self.full_access || self.any_kind,
        };
        if !allowed {
            return self.deny(format_args!("kind {kind} is not allowed"));
        }
        Ok(())
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

/// `text` as a blocked word is looked for in it: compatibility forms folded (NFKC: fullwidth
/// and other stylised letters read as the plain ones), invisible format characters dropped
/// (zero-width spaces and joiners, soft hyphens, direction marks), lowercased. Each changes how
/// a word is spelled in bytes, not how it reads. Look-alike letters from other scripts (a
/// Cyrillic "а") are not folded.
fn folded(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    text.nfkc()
        .filter(|c| !is_invisible(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// Every string in `json`, keys included, decoded.
/// How deep [`json_texts`] looks into JSON held in JSON strings (a repost of a repost of a
/// profile is three).
const JSON_DEPTH: usize = 4;

/// The strings of `text` as a reader of it sees them, when it is JSON (an object or array):
/// every key and string value with its escapes decoded, and those that are JSON themselves
/// (an event inside a repost, a rumor inside an encrypted message) decoded in turn.
fn json_texts(text: &str, out: &mut Vec<String>, depth: usize) {
    let trimmed = text.trim_start();
    if depth >= JSON_DEPTH || !(trimmed.starts_with('{') || trimmed.starts_with('[')) {
        return;
    }
    let Ok(json) = serde_json::from_str::<serde_json::Value>(trimmed) else {
        return;
    };
    let from = out.len();
    json_strings(&json, out);
    for i in from..out.len() {
        let inner = out[i].clone();
        json_texts(&inner, out, depth + 1);
    }
}

fn json_strings(json: &serde_json::Value, out: &mut Vec<String>) {
    match json {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|item| json_strings(item, out)),
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                out.push(key.clone());
                json_strings(value, out);
            }
        }
        _ => {}
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
        Request::SignEvent(event) => policy
            .check_kind(event.kind.as_u16())
            .and_then(|()| policy.check_event(event)),
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

    /// A blocked word is what readers read, not a byte string: in a tag (a hashtag, a title),
    /// behind a JSON escape in a profile, split by an invisible character, or in fullwidth
    /// letters, it reads the same. Before, each of these was signed.
    #[test]
    fn blocked_words_are_found_in_tags_escapes_and_disguised_spellings() {
        let (user, _) = keys();
        let clean = Policy::parse("clean", r#"{"any_kind":true,"blocked_words":["spam"]}"#).unwrap();
        let tagged = Request::SignEvent(UnsignedEvent::new(
            user,
            Timestamp::from(1),
            Kind::from(1),
            Tags::parse([vec!["t", "spam"]]).unwrap(),
            "hi",
        ));
        let refused = [
            tagged,
            sign(&user, 0, r#"{"name":"\u0073pam"}"#),
            sign(&user, 1, "s\u{200b}pam"),
            sign(&user, 1, "buy ｓｐａｍ"),
            sign(&user, 1, "SP\u{00AD}AM"),
        ];
        for request in &refused {
            assert!(evaluate(&clean, request, &user).is_err(), "{request:?}");
        }
        for fine in ["spa m", "hi", r#"{"name":"\u0068am"}"#] {
            assert!(evaluate(&clean, &sign(&user, 0, fine), &user).is_ok(), "{fine}");
        }
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

    /// Every request the agreement tests ask about: each method with the user's own key and
    /// another as peer, and signing of every kind in `kinds`.
    fn requests(user: PublicKey, other: PublicKey, kinds: impl Iterator<Item = u16>) -> Vec<Request> {
        let mut requests = vec![Request::GetPublicKey];
        for peer in [user, other] {
            // Digits only: no generated blocked word matches them (content rules are
            // checked separately below).
            requests.push(Request::Nip04Encrypt {
                peer,
                plaintext: "0".into(),
            });
            requests.push(Request::Nip44Encrypt {
                peer,
                plaintext: "0".into(),
            });
            requests.push(Request::Nip04Decrypt {
                peer,
                ciphertext: "0?iv=1".into(),
            });
            requests.push(Request::Nip44Decrypt {
                peer,
                ciphertext: "0".into(),
            });
        }
        requests.extend(kinds.map(|kind| sign(&user, kind, "")));
        requests
    }

    /// What the summary says agrees with [`evaluate`] on every request, and its words say
    /// which way signing goes.
    fn assert_summary_agrees(policy: &Policy, requests: &[Request], user: &PublicKey) {
        let summary = policy.summary();
        for request in requests {
            assert_eq!(
                evaluate(policy, request, user).is_ok(),
                summary.permits(request, user),
                "policy {policy:?} and {request:?}: the consent text and the enforcement disagree"
            );
        }
        let text = summary.lines().join(" ");
        let says = |words: &str| text.contains(words);
        match &summary.sign {
            Signing::Nothing => assert!(says("Sign nothing"), "{text}"),
            Signing::Any => assert!(says("Sign any event as you:"), "{text}"),
            Signing::Kinds(kinds) => assert!(says("Sign only these") && says(&kind_names(kinds)), "{text}"),
            Signing::AnyExcept(kinds) => assert!(says("except these") && says(&kind_names(kinds)), "{text}"),
        }
    }

    /// Every seeded policy, every method, every kind, both kinds of peer: what the consent
    /// page says ([`Summary`]) is exactly what [`evaluate`] enforces.
    #[tokio::test]
    async fn every_seeded_policy_does_exactly_what_its_consent_text_says() {
        let fx = crate::testing::fixture().await;
        let rows = keycast_db::policies::list(fx.pool()).await.unwrap();
        assert_eq!(rows.len(), 4, "the seeded policies");
        let (user, other) = keys();
        let requests = requests(user, other, 0..=u16::MAX);
        for row in rows {
            assert_summary_agrees(&Policy::from_row(&row).unwrap(), &requests, &user);
        }
    }

    #[test]
    fn denied_kinds_win_over_every_grant_and_the_words_say_so() {
        let (user, _) = keys();
        let no_dms = Policy::parse("no-dms", r#"{"any_kind":true,"denied_kinds":[4,1059]}"#).unwrap();
        assert!(evaluate(&no_dms, &sign(&user, 1, "x"), &user).is_ok());
        let denial = evaluate(&no_dms, &sign(&user, 4, "x"), &user).unwrap_err();
        assert_eq!(denial.reason, "kind 4 is denied by policy no-dms");
        let text = no_dms.summary().lines().join(" ");
        assert!(
            text.contains("except these: direct messages (NIP-04) (kind 4), gift wraps (kind 1059)"),
            "{text}"
        );
        assert!(
            text.contains("Not encrypt") && text.contains("Not read"),
            "any_kind grants no crypto: {text}"
        );
        let full = Policy::parse("f", r#"{"full_access":true,"allowed_kinds":[1,4],"denied_kinds":[4]}"#).unwrap();
        assert!(evaluate(&full, &sign(&user, 4, "x"), &user).is_err());
        assert_eq!(full.summary().sign, Signing::Kinds([1].into()));
        let round = Policy::parse("r", &serde_json::to_string(&no_dms.permissions()).unwrap()).unwrap();
        assert_eq!(round.permissions(), no_dms.permissions(), "the document round-trips");
    }

    fn permissions_strategy() -> impl proptest::strategy::Strategy<Value = Permissions> {
        use proptest::prelude::*;
        // A small universe of kinds, so allowed and denied sets overlap often.
        let kinds = || proptest::collection::btree_set(0u16..12, 0..6);
        (
            proptest::option::of(kinds()),
            kinds(),
            proptest::array::uniform6(any::<bool>()),
            proptest::collection::vec("[a-z]{0,3}", 0..3),
        )
            .prop_map(|(allowed_kinds, denied_kinds, b, blocked_words)| Permissions {
                allowed_kinds,
                denied_kinds,
                any_kind: b[0],
                blocked_words,
                encrypt: b[1],
                decrypt: b[2],
                encrypt_to_self: b[3],
                full_access: b[4] && b[5],
            })
    }

    proptest::proptest! {
        /// Custom policies are any combination of permissions: for each generated one, the
        /// words agree with the enforcement on every method, both peers and every kind of
        /// the universe (and one outside it), and the document round-trips.
        #[test]
        fn every_generated_policy_does_exactly_what_its_words_say(permissions in permissions_strategy()) {
            let (user, other) = keys();
            let policy = Policy::from_permissions("custom", permissions);
            assert_summary_agrees(&policy, &requests(user, other, (0..14).chain([30023])), &user);
            // The content rule: stated with every word, and enforced on what may be signed.
            let summary = policy.summary();
            if let Some(word) = policy.blocked_words.first() {
                let text = summary.lines().join(" ");
                proptest::prop_assert!(text.contains(&policy.blocked_words.join(", ")), "{}", text);
                let kind = (0..14).find(|k| summary.permits(&sign(&user, *k, ""), &user));
                if let Some(kind) = kind {
                    let loud = format!("A {} B", word.to_uppercase());
                    proptest::prop_assert!(evaluate(&policy, &sign(&user, kind, &loud), &user).is_err());
                }
            } else {
                proptest::prop_assert!(!summary.lines().join(" ").contains("Never sign"));
            }
            let stored = serde_json::to_string(&policy.permissions()).unwrap();
            proptest::prop_assert_eq!(Policy::parse("custom", &stored).unwrap(), policy);
        }
    }
}
