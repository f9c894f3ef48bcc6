//! Client-side encryption of replica objects: AES-256-GCM, with the object's key (its path
//! in the store) as associated data, so an object cannot be swapped for another one.
//!
//! Format of an encrypted object: `MAGIC` (8 bytes) ‖ nonce (12 random bytes) ‖ ciphertext
//! and tag. Encrypted replicas are keycast-only: the stock Litestream binary cannot read
//! them (it finds no LTX magic), which the documentation says.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};

/// Marks an encrypted object (and its format version).
pub const MAGIC: &[u8; 8] = b"KCENC1\0\0";
const NONCE_LEN: usize = 12;

/// Why an object could not be encrypted or decrypted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptError {
    #[error("the replica encryption key must be 32 bytes, base64-encoded ({0})")]
    BadKey(String),
    #[error("object {0} is encrypted: set KEYCAST_REPLICA_ENCRYPTION_KEY to the key it was written with")]
    KeyMissing(String),
    #[error("object {0} is not encrypted but KEYCAST_REPLICA_ENCRYPTION_KEY is set: this replica was written without encryption")]
    NotEncrypted(String),
    #[error("object {0} cannot be decrypted: wrong KEYCAST_REPLICA_ENCRYPTION_KEY, or the object is corrupt")]
    Undecryptable(String),
}

/// An AES-256-GCM key for replica objects.
#[derive(Clone)]
pub struct ObjectCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for ObjectCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectCipher(..)")
    }
}

impl ObjectCipher {
    /// A cipher from 32 key bytes given as standard base64.
    ///
    /// # Errors
    /// [`CryptError::BadKey`] for anything but 32 bytes of valid base64.
    pub fn from_base64(text: &str) -> Result<ObjectCipher, CryptError> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| CryptError::BadKey(format!("not base64: {e}")))?;
        if bytes.len() != 32 {
            return Err(CryptError::BadKey(format!("got {} bytes", bytes.len())));
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|e| CryptError::BadKey(e.to_string()))?;
        Ok(ObjectCipher { cipher })
    }

    /// Encrypts `plaintext` for the object stored at `key`.
    pub fn seal(&self, key: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random number generator is unavailable");
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: key.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts the object stored at `key`.
    ///
    /// # Errors
    /// [`CryptError::NotEncrypted`] or [`CryptError::Undecryptable`].
    pub fn open(&self, key: &str, bytes: &[u8]) -> Result<Vec<u8>, CryptError> {
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| CryptError::NotEncrypted(key.into()))?;
        if body.len() < NONCE_LEN {
            return Err(CryptError::Undecryptable(key.into()));
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptError::Undecryptable(key.into()))?;
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| CryptError::Undecryptable(key.into()))
    }
}

/// Whether `bytes` looks like an encrypted object.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";

    #[test]
    fn round_trips_and_hides_the_plaintext() {
        let cipher = ObjectCipher::from_base64(KEY_A).unwrap();
        let sealed = cipher.seal("ltx/0/a.ltx", b"LTX1 secret pages");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(cipher.open("ltx/0/a.ltx", &sealed).unwrap(), b"LTX1 secret pages");
    }

    #[test]
    fn a_wrong_key_or_a_swapped_object_is_refused() {
        let sealed = ObjectCipher::from_base64(KEY_A).unwrap().seal("ltx/0/a.ltx", b"x");
        let wrong = ObjectCipher::from_base64(KEY_B).unwrap();
        assert_eq!(
            wrong.open("ltx/0/a.ltx", &sealed),
            Err(CryptError::Undecryptable("ltx/0/a.ltx".into()))
        );
        let right = ObjectCipher::from_base64(KEY_A).unwrap();
        assert!(
            matches!(right.open("ltx/0/b.ltx", &sealed), Err(CryptError::Undecryptable(_))),
            "bound to its key"
        );
        assert!(matches!(
            right.open("k", b"LTX1plain"),
            Err(CryptError::NotEncrypted(_))
        ));
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(matches!(
            ObjectCipher::from_base64("not base64!"),
            Err(CryptError::BadKey(_))
        ));
        assert!(matches!(ObjectCipher::from_base64("AAAA"), Err(CryptError::BadKey(m)) if m.contains("3 bytes")));
    }
}
