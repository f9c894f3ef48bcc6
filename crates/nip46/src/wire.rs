//! NIP-46 on the wire: kind 24133 events whose content is an encrypted JSON-RPC-like
//! message — `{id, method, params}` from the client, `{id, result, error?}` back.
//!
//! Content is NIP-44 (v2) per the current spec; NIP-04 is still accepted and answered in
//! kind, because older clients send it. The two are told apart by NIP-04's `?iv=` suffix.

use nostr::nips::{nip04, nip44};
use nostr::{Event, EventBuilder, Keys, Kind, PublicKey, Tag};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which cipher a request came in; the reply uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Nip44,
    Nip04,
}

impl Cipher {
    fn of(content: &str) -> Cipher {
        if content.contains("?iv=") {
            Cipher::Nip04
        } else {
            Cipher::Nip44
        }
    }
}

/// A decrypted request.
#[derive(Debug, Clone, Deserialize)]
pub struct RpcRequest {
    pub id: String,
    pub method: String,
    #[serde(default)]
    pub params: Vec<Value>,
}

/// A reply: exactly one of `result` and `error` is meaningful. Clients (nostr-tools among
/// them) resolve only on a non-empty `result` and reject on any `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RpcReply {
    pub id: String,
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RpcReply {
    pub fn ok(id: &str, result: impl Into<String>) -> Self {
        RpcReply {
            id: id.to_owned(),
            result: result.into(),
            error: None,
        }
    }

    pub fn error(id: &str, error: impl Into<String>) -> Self {
        RpcReply {
            id: id.to_owned(),
            result: String::new(),
            error: Some(error.into()),
        }
    }
}

/// The longest request id answered. Clients send short ones (nostr-tools a counter after a
/// random prefix, others a UUID or 64 hex digits); an id is kept for the dedup window and
/// echoed in the reply to every relay, so one of 100 KB costs that much memory for minutes
/// and that much of every relay's bandwidth.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Why an incoming event cannot be answered at all (no id to answer to).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the request id is longer than {MAX_REQUEST_ID_BYTES} bytes")]
    IdTooLong,
    /// A NUL or other control character: kept in `nip46_seen` at a hand-over, a NUL would
    /// make that table one PostgreSQL cannot take (`keycast migrate --to`).
    #[error("the request id holds control characters")]
    IdNotText,
    #[error("the content does not decrypt with the bunker key")]
    Decrypt,
    /// Where the JSON went wrong, not what it held (serde quotes values: a secret sent in
    /// the wrong place would reach the log).
    #[error("the decrypted content is not a NIP-46 request ({kind:?} error at line {line}, column {column})")]
    Json {
        kind: serde_json::error::Category,
        line: usize,
        column: usize,
    },
}

/// Decrypts `event` (sent to `bunker`) into a request.
///
/// # Errors
/// [`OpenError`] when it cannot be decrypted or parsed.
pub fn open(bunker: &Keys, event: &Event) -> Result<(RpcRequest, Cipher), OpenError> {
    let cipher = Cipher::of(&event.content);
    let plaintext = match cipher {
        Cipher::Nip44 => nip44::decrypt(bunker.secret_key(), &event.pubkey, &event.content).ok(),
        Cipher::Nip04 => nip04::decrypt(bunker.secret_key(), &event.pubkey, &event.content).ok(),
    }
    .ok_or(OpenError::Decrypt)?;
    let request: RpcRequest = serde_json::from_str(&plaintext).map_err(|e| OpenError::Json {
        kind: e.classify(),
        line: e.line(),
        column: e.column(),
    })?;
    if request.id.len() > MAX_REQUEST_ID_BYTES {
        return Err(OpenError::IdTooLong);
    }
    if request.id.chars().any(char::is_control) {
        return Err(OpenError::IdNotText);
    }
    Ok((request, cipher))
}

/// The largest reply sent: what NIP-44 encrypts at most (NIP-04 replies are held to it too,
/// for the relays between).
pub const MAX_REPLY_BYTES: usize = 65_535;

/// Builds the signed reply event from `bunker` to `client`; a reply larger than
/// [`MAX_REPLY_BYTES`] becomes an error reply with its id.
///
/// # Errors
/// Encryption or signing failure (not expected with valid keys).
pub fn seal(bunker: &Keys, client: &PublicKey, cipher: Cipher, reply: &RpcReply) -> Result<Event, String> {
    let mut json = serde_json::to_string(reply).map_err(|e| e.to_string())?;
    if json.len() > MAX_REPLY_BYTES {
        // NIP-44 cannot encrypt it, and relays refuse an event that size: unanswered, the
        // client would wait for good. A signed event travels as JSON inside JSON, so its
        // escapes double: a request that fits can have a reply that does not.
        tracing::warn!(
            bytes = json.len(),
            "nip46: a reply too large to send; answering with an error"
        );
        let refusal = RpcReply::error(
            &reply.id,
            format!(
                "the reply would be {} bytes, more than NIP-46 carries ({MAX_REPLY_BYTES}): send less",
                json.len()
            ),
        );
        json = serde_json::to_string(&refusal).map_err(|e| e.to_string())?;
    }
    let content = match cipher {
        Cipher::Nip44 => {
            nip44::encrypt(bunker.secret_key(), client, json, nip44::Version::V2).map_err(|e| e.to_string())?
        }
        Cipher::Nip04 => nip04::encrypt(bunker.secret_key(), client, json).map_err(|e| e.to_string())?,
    };
    EventBuilder::new(Kind::NostrConnect, content)
        .tag(Tag::public_key(*client))
        .sign_with_keys(bunker)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_event(client: &Keys, bunker: &PublicKey, cipher: Cipher, body: &str) -> Event {
        let content = match cipher {
            Cipher::Nip44 => nip44::encrypt(client.secret_key(), bunker, body, nip44::Version::V2).unwrap(),
            Cipher::Nip04 => nip04::encrypt(client.secret_key(), bunker, body).unwrap(),
        };
        EventBuilder::new(Kind::NostrConnect, content)
            .tag(Tag::public_key(*bunker))
            .sign_with_keys(client)
            .unwrap()
    }

    #[test]
    fn a_request_opens_and_the_reply_answers_in_the_same_cipher() {
        let (client, bunker) = (Keys::generate(), Keys::generate());
        for cipher in [Cipher::Nip44, Cipher::Nip04] {
            let event = request_event(
                &client,
                &bunker.public_key(),
                cipher,
                r#"{"id":"7","method":"ping","params":[]}"#,
            );
            let (request, seen) = open(&bunker, &event).unwrap();
            assert_eq!(
                (request.id.as_str(), request.method.as_str(), seen),
                ("7", "ping", cipher)
            );

            let reply = seal(&bunker, &client.public_key(), seen, &RpcReply::ok("7", "pong")).unwrap();
            assert_eq!(reply.kind, Kind::NostrConnect);
            assert_eq!(reply.pubkey, bunker.public_key());
            assert!(reply.tags.public_keys().any(|p| *p == client.public_key()));
            reply.verify().unwrap();
            let text = match cipher {
                Cipher::Nip44 => nip44::decrypt(client.secret_key(), &bunker.public_key(), &reply.content).unwrap(),
                Cipher::Nip04 => nip04::decrypt(client.secret_key(), &bunker.public_key(), &reply.content).unwrap(),
            };
            assert_eq!(text, r#"{"id":"7","result":"pong"}"#);
        }
    }

    #[test]
    fn errors_carry_an_empty_result_and_the_reason() {
        let json = serde_json::to_string(&RpcReply::error("1", "no")).unwrap();
        assert_eq!(json, r#"{"id":"1","result":"","error":"no"}"#);
    }

    #[test]
    fn content_for_another_key_or_not_json_is_refused() {
        let (client, bunker, other) = (Keys::generate(), Keys::generate(), Keys::generate());
        let event = request_event(
            &client,
            &other.public_key(),
            Cipher::Nip44,
            r#"{"id":"1","method":"ping"}"#,
        );
        assert!(matches!(open(&bunker, &event), Err(OpenError::Decrypt)));
        let event = request_event(&client, &bunker.public_key(), Cipher::Nip44, "hello");
        assert!(matches!(open(&bunker, &event), Err(OpenError::Json { .. })));
    }

    /// serde's message quotes the value it could not take: a secret sent as the params'
    /// string reached the (debug) log through it.
    #[test]
    fn why_a_request_is_not_json_says_where_not_what() {
        let (client, bunker) = (Keys::generate(), Keys::generate());
        let body = r#"{"id":"1","method":"connect","params":"bunker-key,CANARY-connect-secret"}"#;
        let event = request_event(&client, &bunker.public_key(), Cipher::Nip44, body);
        let why = open(&bunker, &event).err().unwrap().to_string();
        assert!(why.contains("not a NIP-46 request"), "{why}");
        assert!(!why.contains("CANARY"), "{why}");
    }

    #[test]
    fn an_id_past_the_limit_or_not_text_is_refused() {
        let (client, bunker) = (Keys::generate(), Keys::generate());
        let with_id = |id: &str| {
            let body = serde_json::json!({"id": id, "method": "ping"}).to_string();
            request_event(&client, &bunker.public_key(), Cipher::Nip44, &body)
        };
        let longest = "a".repeat(MAX_REQUEST_ID_BYTES);
        assert_eq!(open(&bunker, &with_id(&longest)).unwrap().0.id, longest);
        assert!(matches!(open(&bunker, &with_id("a\u{0}b")), Err(OpenError::IdNotText)));
        assert!(matches!(
            open(&bunker, &with_id("line\nbreak")),
            Err(OpenError::IdNotText)
        ));
        let event = with_id(&"a".repeat(MAX_REQUEST_ID_BYTES + 1));
        assert!(matches!(open(&bunker, &event), Err(OpenError::IdTooLong)));
    }
}
