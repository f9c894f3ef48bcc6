//! What a caller may ask of the signer, and what it gets back, independent of transport.
//!
//! HTTP RPC and NIP-46 decode their wire formats into [`Request`] and encode [`Response`];
//! neither holds any rule of its own.

use nostr::{Event, PublicKey, UnsignedEvent};

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
