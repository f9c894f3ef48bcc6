//! Encryption of secret keys at rest: the [`KeyManager`] trait and its master-key
//! implementation.
//!
//! Every stored secret key (a user's Nostr key, an authorization's bunker key) is 32
//! bytes encrypted with AES-256-GCM under a key-encryption key, with associated data that
//! names its owner ([`KeyOwner`]): a ciphertext copied onto another user's row fails to
//! decrypt instead of handing them someone else's key.
//!
//! Each ciphertext names the master key that made it: a key id (the first 8 bytes of a
//! SHA-256 over a label and the key, which reveals nothing usable about the key) follows
//! the format byte. That is what makes master-key rotation resumable: a row says by itself
//! whether it is already under the new key (see [`Keyring`] and `crate::rotation`).
//! Ciphertexts written before key ids existed (format 1) carry none; they are tried under
//! each configured key and rewritten by the next rotation.
//!
//! This module reads no environment variable and no file: the binary loads the master key
//! (`KEYCAST_MASTER_KEY`, or the file at `MASTER_KEY_PATH`) and passes its text to
//! [`MasterKey::from_base64`].

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use keycast_db::{AuthorizationId, UserId};
use sha2::{Digest, Sha256};

use crate::keys::KeyError;
use crate::secret::{random_bytes, Secret};

/// First byte of every ciphertext: the format, so another scheme (a KMS envelope) can be
/// added later without guessing. Format 1: no key id (written before rotation existed).
const FORMAT_V1: u8 = 1;
/// Format 2: format byte, key id, nonce, sealed secret and tag.
pub const FORMAT_V2: u8 = 2;
/// AES-GCM nonce length (96 bits, random per encryption).
const NONCE_LEN: usize = 12;
/// Length of a master key's id in a format-2 ciphertext.
pub const KEY_ID_LEN: usize = 8;
/// Format-1 ciphertext length: format byte + nonce + 32 + 16-byte tag.
const V1_LEN: usize = 1 + NONCE_LEN + 32 + 16;
/// Ciphertext length for a 32-byte secret: format byte + key id + nonce + 32 + 16-byte tag.
pub const CIPHERTEXT_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN + 32 + 16;

/// Whose secret a ciphertext holds; becomes the AES-GCM associated data.
#[derive(Debug, Clone, Copy)]
pub enum KeyOwner<'a> {
    /// A user's own Nostr key (`keys.encrypted_secret`).
    User(&'a UserId),
    /// An authorization's bunker key (`authorizations.bunker_secret_encrypted`).
    Bunker(&'a AuthorizationId),
}

impl KeyOwner<'_> {
    /// The associated data: a purpose label and the owner's id, so a user key and a
    /// bunker key can never stand in for each other either.
    pub fn associated_data(&self) -> Vec<u8> {
        match self {
            KeyOwner::User(id) => format!("keycast/user-key/{id}").into_bytes(),
            KeyOwner::Bunker(id) => format!("keycast/bunker-key/{id}").into_bytes(),
        }
    }
}

/// Encrypts and decrypts 32-byte secret keys for storage.
///
/// Implementations are synchronous and fast: a KMS-backed manager should unwrap a data
/// key once at start (envelope encryption) rather than call the KMS per key, which cost
/// the predecessor ~300 ms per key.
pub trait KeyManager: Send + Sync + std::fmt::Debug {
    /// Encrypts `secret` for `owner`. A fresh nonce each call, so equal secrets give
    /// different ciphertexts.
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if the cipher fails (not expected with a valid key).
    fn encrypt(&self, secret: &Secret<[u8; 32]>, owner: KeyOwner<'_>) -> Result<Vec<u8>, KeyError>;

    /// Decrypts what [`KeyManager::encrypt`] produced for the same `owner`.
    ///
    /// # Errors
    /// [`KeyError::Undecryptable`] when the ciphertext is malformed, was made under
    /// another master key, or belongs to another owner.
    fn decrypt(&self, ciphertext: &[u8], owner: KeyOwner<'_>) -> Result<Secret<[u8; 32]>, KeyError>;
}

/// A 256-bit key-encryption key.
pub struct MasterKey(Secret<[u8; 32]>);

impl MasterKey {
    /// Parses the configured master key: 32 bytes, standard base64 (padding optional,
    /// surrounding whitespace such as a file's trailing newline ignored).
    ///
    /// # Errors
    /// [`KeyError::InvalidMasterKey`] naming what is wrong (not base64, wrong length);
    /// the key text itself is never part of the message.
    pub fn from_base64(text: &str) -> Result<MasterKey, KeyError> {
        let text = text.trim().trim_end_matches('=');
        let bytes = Secret::new(
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(text)
                .map_err(|_| KeyError::InvalidMasterKey("it is not valid base64".into()))?,
        );
        let key: [u8; 32] = bytes.expose().as_slice().try_into().map_err(|_| {
            KeyError::InvalidMasterKey(format!("it decodes to {} bytes, expected 32", bytes.expose().len()))
        })?;
        Ok(MasterKey(Secret::new(key)))
    }

    /// A fresh random master key (for `keycast keygen` and the dev key).
    pub fn generate() -> MasterKey {
        MasterKey(random_bytes::<32>())
    }

    /// The key as standard base64, the form [`MasterKey::from_base64`] reads.
    pub fn to_base64(&self) -> Secret<String> {
        Secret::new(STANDARD.encode(self.0.expose()))
    }

    /// The key's public id, as stored in every ciphertext it makes: a one-way digest, so
    /// printing it (logs, `keycast master-key rotate`) says which key is meant without
    /// revealing it.
    pub fn id(&self) -> KeyId {
        let digest = Sha256::new()
            .chain_update(b"keycast/master-key-id/v1\0")
            .chain_update(self.0.expose())
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }
}

/// A master key's id (see [`MasterKey::id`]); printed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Which master key made `ciphertext`: `Some(id)` for format 2, `None` for a format-1
/// ciphertext (no id recorded) or anything malformed.
pub fn key_id_of(ciphertext: &[u8]) -> Option<KeyId> {
    if ciphertext.len() != CIPHERTEXT_LEN || ciphertext[0] != FORMAT_V2 {
        return None;
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&ciphertext[1..=KEY_ID_LEN]);
    Some(KeyId(id))
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// [`KeyManager`] with a master key held in memory (from env or a file).
pub struct MasterKeyManager {
    cipher: Aes256Gcm,
    id: KeyId,
}

impl MasterKeyManager {
    /// A manager encrypting under `key`.
    pub fn new(key: MasterKey) -> MasterKeyManager {
        let cipher = Aes256Gcm::new(key.0.expose().into());
        MasterKeyManager { cipher, id: key.id() }
    }

    /// The id of its master key.
    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// The header every ciphertext it makes starts with: format byte and key id.
    pub fn header(&self) -> [u8; 1 + KEY_ID_LEN] {
        let mut header = [FORMAT_V2; 1 + KEY_ID_LEN];
        header[1..].copy_from_slice(&self.id.0);
        header
    }

    /// Opens a sealed secret: `header` is what precedes the nonce (part of the associated
    /// data in format 2, empty in format 1).
    fn open_sealed(&self, header: &[u8], rest: &[u8], owner: KeyOwner<'_>) -> Result<Secret<[u8; 32]>, KeyError> {
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| KeyError::Undecryptable)?;
        let mut aad = header.to_vec();
        aad.extend_from_slice(&owner.associated_data());
        let plain = Secret::new(
            self.cipher
                .decrypt(&Nonce::from(nonce), Payload { msg: sealed, aad: &aad })
                .map_err(|_| KeyError::Undecryptable)?,
        );
        let key: [u8; 32] = plain
            .expose()
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Undecryptable)?;
        Ok(Secret::new(key))
    }
}

impl std::fmt::Debug for MasterKeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeyManager(..)")
    }
}

impl KeyManager for MasterKeyManager {
    fn encrypt(&self, secret: &Secret<[u8; 32]>, owner: KeyOwner<'_>) -> Result<Vec<u8>, KeyError> {
        let nonce = random_bytes::<NONCE_LEN>();
        let mut header = Vec::with_capacity(CIPHERTEXT_LEN);
        header.extend_from_slice(&self.header());
        // The header is associated data too: a ciphertext relabelled with another key id
        // does not open.
        let mut aad = header.clone();
        aad.extend_from_slice(&owner.associated_data());
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(*nonce.expose()),
                Payload {
                    msg: secret.expose(),
                    aad: &aad,
                },
            )
            .map_err(|_| KeyError::Crypto)?;
        let mut out = header;
        out.extend_from_slice(nonce.expose());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn decrypt(&self, ciphertext: &[u8], owner: KeyOwner<'_>) -> Result<Secret<[u8; 32]>, KeyError> {
        match ciphertext.first() {
            Some(&FORMAT_V2) if key_id_of(ciphertext) == Some(self.id) => {
                let (header, rest) = ciphertext.split_at(1 + KEY_ID_LEN);
                self.open_sealed(header, rest, owner)
            }
            Some(&FORMAT_V1) if ciphertext.len() == V1_LEN => self.open_sealed(&[], &ciphertext[1..], owner),
            _ => Err(KeyError::Undecryptable),
        }
    }
}

/// The master keys of a running keycast: the current one, which encrypts everything new,
/// and during a rotation the previous one (`KEYCAST_MASTER_KEY_PREVIOUS`), which only
/// decrypts what is not yet re-encrypted. A format-2 ciphertext goes straight to the key
/// its id names; a format-1 one is tried under each.
#[derive(Debug)]
pub struct Keyring {
    current: MasterKeyManager,
    previous: Option<MasterKeyManager>,
}

impl Keyring {
    /// A keyring with `current` and, during a rotation, `previous`. The same key given
    /// twice counts once.
    pub fn new(current: MasterKey, previous: Option<MasterKey>) -> Keyring {
        let previous = previous.filter(|p| p.id() != current.id()).map(MasterKeyManager::new);
        Keyring {
            current: MasterKeyManager::new(current),
            previous,
        }
    }

    /// The current key alone: what the verification after a rotation decrypts with.
    pub fn current(&self) -> &MasterKeyManager {
        &self.current
    }

    /// The headers of the configured keys' ciphertexts (the current key's twice without a
    /// previous key).
    pub fn headers(&self) -> [[u8; 1 + KEY_ID_LEN]; 2] {
        let current = self.current.header();
        [
            current,
            self.previous.as_ref().map_or(current, MasterKeyManager::header),
        ]
    }

    /// The ids of the keys this ring opens, current first, comma-separated.
    pub fn ids(&self) -> String {
        std::iter::once(self.current.key_id())
            .chain(self.previous_id())
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The id of the previous key, if one is configured.
    pub fn previous_id(&self) -> Option<KeyId> {
        self.previous.as_ref().map(MasterKeyManager::key_id)
    }

    /// Whether `ciphertext` is already in the current format under the current key (by its
    /// header; it is not decrypted).
    pub fn is_current(&self, ciphertext: &[u8]) -> bool {
        key_id_of(ciphertext) == Some(self.current.id)
    }
}

impl KeyManager for Keyring {
    fn encrypt(&self, secret: &Secret<[u8; 32]>, owner: KeyOwner<'_>) -> Result<Vec<u8>, KeyError> {
        self.current.encrypt(secret, owner)
    }

    fn decrypt(&self, ciphertext: &[u8], owner: KeyOwner<'_>) -> Result<Secret<[u8; 32]>, KeyError> {
        match self.current.decrypt(ciphertext, owner) {
            Ok(secret) => Ok(secret),
            Err(_) => match &self.previous {
                Some(previous) => previous.decrypt(ciphertext, owner),
                None => Err(KeyError::Undecryptable),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AES key schedules behind the master key (and the replica's key) are wiped when
    /// dropped: their first round keys are the key itself. aes-gcm's own `zeroize` feature
    /// did not reach them; this does not compile without `aes`'s.
    #[test]
    fn aes_key_schedules_are_wiped_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<aes::Aes256>();
    }

    fn manager() -> MasterKeyManager {
        MasterKeyManager::new(MasterKey::generate())
    }

    #[test]
    fn encrypted_secret_round_trips_for_its_owner() {
        let km = manager();
        let user = UserId::generate();
        let secret = Secret::new([9u8; 32]);
        let sealed = km.encrypt(&secret, KeyOwner::User(&user)).unwrap();
        assert_eq!(sealed.len(), CIPHERTEXT_LEN);
        assert!(!sealed.windows(32).any(|w| w == [9u8; 32]), "plaintext must not appear");
        assert_eq!(km.decrypt(&sealed, KeyOwner::User(&user)).unwrap().expose(), &[9u8; 32]);
    }

    #[test]
    fn same_secret_encrypts_differently_each_time() {
        let km = manager();
        let user = UserId::generate();
        let secret = Secret::new([1u8; 32]);
        let a = km.encrypt(&secret, KeyOwner::User(&user)).unwrap();
        let b = km.encrypt(&secret, KeyOwner::User(&user)).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn ciphertext_of_one_owner_does_not_decrypt_for_another() {
        let km = manager();
        let (alice, bob) = (UserId::generate(), UserId::generate());
        let sealed = km.encrypt(&Secret::new([2u8; 32]), KeyOwner::User(&alice)).unwrap();
        assert!(matches!(
            km.decrypt(&sealed, KeyOwner::User(&bob)),
            Err(KeyError::Undecryptable)
        ));
        let as_bunker = AuthorizationId::new(alice.as_str());
        assert!(matches!(
            km.decrypt(&sealed, KeyOwner::Bunker(&as_bunker)),
            Err(KeyError::Undecryptable)
        ));
    }

    #[test]
    fn another_master_key_cannot_decrypt() {
        let user = UserId::generate();
        let sealed = manager()
            .encrypt(&Secret::new([3u8; 32]), KeyOwner::User(&user))
            .unwrap();
        assert!(matches!(
            manager().decrypt(&sealed, KeyOwner::User(&user)),
            Err(KeyError::Undecryptable)
        ));
    }

    #[test]
    fn tampered_or_truncated_ciphertext_is_refused() {
        let km = manager();
        let user = UserId::generate();
        let mut sealed = km.encrypt(&Secret::new([4u8; 32]), KeyOwner::User(&user)).unwrap();
        assert!(km.decrypt(&sealed[..20], KeyOwner::User(&user)).is_err());
        sealed[20] ^= 1;
        assert!(matches!(
            km.decrypt(&sealed, KeyOwner::User(&user)),
            Err(KeyError::Undecryptable)
        ));
    }

    /// A format-1 ciphertext as keycast wrote it before key ids existed.
    fn seal_v1(key: &MasterKey, secret: &[u8; 32], owner: KeyOwner<'_>) -> Vec<u8> {
        let cipher = Aes256Gcm::new(key.0.expose().into());
        let nonce = [7u8; NONCE_LEN];
        let aad = owner.associated_data();
        let sealed = cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: secret, aad: &aad })
            .unwrap();
        [&[FORMAT_V1][..], &nonce, &sealed].concat()
    }

    #[test]
    fn ciphertext_names_its_master_key_and_a_relabelled_one_does_not_open() {
        let key = MasterKey::generate();
        let id = key.id();
        assert_eq!(id, MasterKey::from_base64(key.to_base64().expose()).unwrap().id());
        let km = MasterKeyManager::new(key);
        let user = UserId::generate();
        let mut sealed = km.encrypt(&Secret::new([5u8; 32]), KeyOwner::User(&user)).unwrap();
        assert_eq!(key_id_of(&sealed), Some(id));
        assert_eq!(id.to_string().len(), 16);
        sealed[1] ^= 1;
        assert!(km.decrypt(&sealed, KeyOwner::User(&user)).is_err());
    }

    #[test]
    fn keyring_encrypts_under_the_current_key_and_opens_under_either() {
        let (old, new) = (MasterKey::generate(), MasterKey::generate());
        let (old_text, new_text) = (old.to_base64(), new.to_base64());
        let user = UserId::generate();
        let before = MasterKeyManager::new(MasterKey::from_base64(old_text.expose()).unwrap());
        let under_old = before.encrypt(&Secret::new([6u8; 32]), KeyOwner::User(&user)).unwrap();
        let legacy = seal_v1(&old, &[8u8; 32], KeyOwner::User(&user));
        assert_eq!(
            before.decrypt(&legacy, KeyOwner::User(&user)).unwrap().expose(),
            &[8u8; 32]
        );

        let ring = Keyring::new(new, Some(old));
        assert_eq!(
            ring.decrypt(&under_old, KeyOwner::User(&user)).unwrap().expose(),
            &[6u8; 32]
        );
        assert_eq!(
            ring.decrypt(&legacy, KeyOwner::User(&user)).unwrap().expose(),
            &[8u8; 32]
        );
        assert!(!ring.is_current(&under_old) && !ring.is_current(&legacy));
        let fresh = ring.encrypt(&Secret::new([9u8; 32]), KeyOwner::User(&user)).unwrap();
        assert!(ring.is_current(&fresh));
        let new_alone = MasterKeyManager::new(MasterKey::from_base64(new_text.expose()).unwrap());
        assert_eq!(
            new_alone.decrypt(&fresh, KeyOwner::User(&user)).unwrap().expose(),
            &[9u8; 32]
        );
        assert!(before.decrypt(&fresh, KeyOwner::User(&user)).is_err());
        assert!(format!("{ring:?}").contains("MasterKeyManager(..)"));
    }

    #[test]
    fn master_key_parses_its_own_base64_and_refuses_bad_text() {
        let key = MasterKey::generate();
        let text = format!("{}\n", key.to_base64().expose());
        let parsed = MasterKey::from_base64(&text).unwrap();
        assert_eq!(parsed.0.expose(), key.0.expose());
        let short = MasterKey::from_base64(&STANDARD.encode([0u8; 16])).unwrap_err();
        assert!(short.to_string().contains("16 bytes, expected 32"), "{short}");
        let junk = MasterKey::from_base64("not base64 at all!").unwrap_err();
        assert!(junk.to_string().contains("not valid base64"), "{junk}");
        assert_eq!(format!("{key:?}"), "MasterKey(..)");
    }
}
