//! What a caller may ask of the signer, and what it gets back, independent of transport.
//!
//! HTTP RPC and NIP-46 decode their wire formats into [`Request`] and encode [`Response`];
//! neither holds any rule of its own.

use nostr::{Event, Kind, PublicKey, Tag, Timestamp, UnsignedEvent};
use serde_json::Value;

pub use keycast_db::activity::Transport;

/// One signer operation, as both transports name them (NIP-46 method names).
#[derive(Debug, Clone)]
pub enum Request {
    /// `get_public_key`: the user's public key.
    GetPublicKey,
    /// `sign_event`: sign the template as the user. Its `pubkey` and `id` are replaced by
    /// the user's key and the recomputed id.
    SignEvent(UnsignedEvent),
    /// `nip04_encrypt` to `peer`.
    Nip04Encrypt { peer: PublicKey, plaintext: String },
    /// `nip04_decrypt` from `peer`.
    Nip04Decrypt { peer: PublicKey, ciphertext: String },
    /// `nip44_encrypt` (v2) to `peer`.
    Nip44Encrypt { peer: PublicKey, plaintext: String },
    /// `nip44_decrypt` from `peer`.
    Nip44Decrypt { peer: PublicKey, ciphertext: String },
}

impl Request {
    /// The NIP-46 method name, also what the activity log records.
    pub fn method(&self) -> &'static str {
        match self {
            Request::GetPublicKey => "get_public_key",
            Request::SignEvent(_) => "sign_event",
            Request::Nip04Encrypt { .. } => "nip04_encrypt",
            Request::Nip04Decrypt { .. } => "nip04_decrypt",
            Request::Nip44Encrypt { .. } => "nip44_encrypt",
            Request::Nip44Decrypt { .. } => "nip44_decrypt",
        }
    }

    /// The event kind of a `sign_event`, for the activity log.
    pub fn kind(&self) -> Option<u16> {
        match self {
            Request::SignEvent(event) => Some(event.kind.as_u16()),
            _ => None,
        }
    }
}

/// The result of a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// For `get_public_key`.
    PublicKey(PublicKey),
    /// For `sign_event`: the signed event.
    Event(Box<Event>),
    /// For the encrypt/decrypt methods: the ciphertext or the plaintext.
    Text(String),
}

/// The methods [`Request::decode`] accepts, for error messages and documents.
pub const METHODS: &[&str] = &[
    "get_public_key",
    "sign_event",
    "nip04_encrypt",
    "nip04_decrypt",
    "nip44_encrypt",
    "nip44_decrypt",
];

/// Why a `{method, params}` call is not a [`Request`]. The text is for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown method {0:?}; supported: get_public_key, sign_event, nip04_encrypt, nip04_decrypt, nip44_encrypt, nip44_decrypt")]
    UnknownMethod(String),
    #[error("{0}")]
    BadParams(String),
}

impl Request {
    /// Decodes a NIP-46-style call — the wire shape both transports share. `sign_event`
    /// takes the event template as a JSON object or as its JSON text; encrypt takes
    /// `[peer_pubkey_hex, plaintext]`, decrypt `[peer_pubkey_hex, ciphertext]`.
    /// `placeholder` fills the template's `pubkey` (the signer replaces it with the
    /// user's key anyway).
    ///
    /// # Errors
    /// [`DecodeError::UnknownMethod`], or [`DecodeError::BadParams`] naming what is wrong.
    pub fn decode(method: &str, params: &[Value], placeholder: PublicKey) -> Result<Request, DecodeError> {
        let peer_and_text = |what: &str| -> Result<(PublicKey, String), DecodeError> {
            match params {
                [Value::String(peer), Value::String(text)] => {
                    // Not echoed: swapped params put the plaintext here, and refusals are
                    // logged.
                    let peer = PublicKey::parse(peer).map_err(|_| {
                        bad(&format!(
                            "params[0] must be the peer's public key (64 hex characters), not {} characters of something else",
                            peer.chars().count()
                        ))
                    })?;
                    Ok((peer, text.clone()))
                }
                _ => Err(bad(&format!("{method} takes [peer_pubkey_hex, {what}]"))),
            }
        };
        Ok(match method {
            "get_public_key" => Request::GetPublicKey,
            "sign_event" => Request::SignEvent(template(params.first(), placeholder)?),
            "nip04_encrypt" => {
                let (peer, plaintext) = peer_and_text("plaintext")?;
                Request::Nip04Encrypt { peer, plaintext }
            }
            "nip04_decrypt" => {
                let (peer, ciphertext) = peer_and_text("ciphertext")?;
                Request::Nip04Decrypt { peer, ciphertext }
            }
            "nip44_encrypt" => {
                let (peer, plaintext) = peer_and_text("plaintext")?;
                Request::Nip44Encrypt { peer, plaintext }
            }
            "nip44_decrypt" => {
                let (peer, ciphertext) = peer_and_text("ciphertext")?;
                Request::Nip44Decrypt { peer, ciphertext }
            }
            other => return Err(DecodeError::UnknownMethod(other.chars().take(32).collect())),
        })
    }
}

/// The event template of `sign_event`: `{kind, content, tags?, created_at?}` as an object
/// or as JSON text.
fn template(param: Option<&Value>, placeholder: PublicKey) -> Result<UnsignedEvent, DecodeError> {
    let parsed;
    let object = match param {
        Some(Value::String(text)) => {
            parsed = serde_json::from_str::<Value>(text).map_err(|e| bad(&format!("params[0] is not JSON: {e}")))?;
            &parsed
        }
        Some(value @ Value::Object(_)) => value,
        _ => return Err(bad("sign_event takes [event_template] (an object or its JSON text)")),
    };
    let kind = object
        .get("kind")
        .and_then(Value::as_u64)
        .and_then(|k| u16::try_from(k).ok())
        .ok_or_else(|| bad("the event template needs a kind from 0 to 65535"))?;
    let content = match object.get("content") {
        Some(Value::String(c)) => c.clone(),
        None => String::new(),
        Some(_) => return Err(bad("the event template's content must be a string")),
    };
    let created_at = match object.get("created_at") {
        None | Some(Value::Null) => Timestamp::now(),
        Some(v) => Timestamp::from(
            v.as_u64()
                .ok_or_else(|| bad("created_at must be a unix time in seconds"))?,
        ),
    };
    let tags = match object.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value::<Vec<Vec<String>>>(v.clone())
            .map_err(|_| bad("tags must be an array of arrays of strings"))?
            .into_iter()
            .map(|t| Tag::parse(t).map_err(|e| bad(&format!("invalid tag: {e}"))))
            .collect::<Result<_, _>>()?,
    };
    Ok(UnsignedEvent::new(
        placeholder,
        created_at,
        Kind::from(kind),
        tags,
        content,
    ))
}

fn bad(message: &str) -> DecodeError {
    DecodeError::BadParams(message.to_owned())
}
