//! Client-side encryption of replica objects: AES-256-GCM, with the object's key (its path
//! in the store) as associated data, so an object cannot be swapped for another one.
//!
//! Format of an encrypted object: `MAGIC` (8 bytes) ‖ nonce (12 random bytes) ‖ ciphertext
//! and tag. Encrypted replicas are keycast-only: the stock Litestream binary cannot read
//! them (it finds no LTX magic), which the documentation says.
//!
//! Objects can be as large as the database, so besides the one-shot [`ObjectCipher::seal`] and
//! [`ObjectCipher::open`] there is a streaming form ([`Sealer`], [`Opener`]) that produces and
//! checks exactly the same bytes piece by piece: GCM is counter-mode encryption plus a GHASH
//! over the ciphertext, both of which run incrementally.
//!
//! The same key also authenticates the replica's own small records that must not be forged
//! by whoever can write the bucket (the lease's high-water mark, see `crate::lease`): an
//! HMAC-SHA256 under a key derived from it ([`ObjectCipher::record_mac`]).

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use ctr::cipher::{KeyIvInit, StreamCipher};
use ghash::universal_hash::UniversalHash;
use ghash::GHash;

/// Marks an encrypted object (and its format version).
pub const MAGIC: &[u8; 8] = b"KCENC1\0\0";
/// Bytes of the random nonce after [`MAGIC`].
pub const NONCE_LEN: usize = 12;
/// Bytes of the authentication tag at the end of an encrypted object.
pub const TAG_LEN: usize = 16;
/// What encryption adds to an object's length: magic, nonce and tag.
pub const OVERHEAD: u64 = (MAGIC.len() + NONCE_LEN + TAG_LEN) as u64;

type Ctr = ctr::Ctr32BE<Aes256>;

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
    /// The same key for the streaming form, which drives AES and GHASH itself. Wiped when
    /// dropped, as the AES key schedules are (`aes`'s `zeroize` feature).
    key: zeroize::Zeroizing<[u8; 32]>,
    /// HMAC-SHA256(key, [`RECORD_KEY_LABEL`]): the key of [`ObjectCipher::record_mac`], so the
    /// encryption key itself is used by AES-GCM only.
    record_key: zeroize::Zeroizing<[u8; 32]>,
}

/// What derives the records' MAC key from the replica key.
const RECORD_KEY_LABEL: &[u8] = b"keycast replica records v1";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn hmac(key: &[u8], message: &[u8]) -> HmacSha256 {
    use hmac::Mac;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac
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
            .map(zeroize::Zeroizing::new)
            .map_err(|_| CryptError::BadKey("not standard base64 (A-Z, a-z, 0-9, + and /)".into()))?;
        if bytes.len() != 32 {
            return Err(CryptError::BadKey(format!("got {} bytes", bytes.len())));
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|e| CryptError::BadKey(e.to_string()))?;
        let key = zeroize::Zeroizing::new(<[u8; 32]>::try_from(bytes.as_slice()).expect("checked: 32 bytes"));
        let record_key = {
            use hmac::Mac;
            zeroize::Zeroizing::new(hmac(key.as_slice(), RECORD_KEY_LABEL).finalize().into_bytes().into())
        };
        Ok(ObjectCipher {
            cipher,
            key,
            record_key,
        })
    }

    /// Whether `text` (standard base64) is this very key, compared in constant time.
    pub fn is_key(&self, text: &str) -> bool {
        use base64::Engine;
        use subtle::ConstantTimeEq;
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map(zeroize::Zeroizing::new)
            .is_ok_and(|bytes| bool::from(bytes.as_slice().ct_eq(self.key.as_slice())))
    }

    /// A MAC of `message` (base64): proof that whoever wrote it held the replica key.
    pub fn record_mac(&self, message: &[u8]) -> String {
        use base64::Engine;
        use hmac::Mac;
        base64::engine::general_purpose::STANDARD
            .encode(hmac(self.record_key.as_slice(), message).finalize().into_bytes())
    }

    /// Whether `mac` is [`ObjectCipher::record_mac`] of `message`, compared in constant time.
    pub fn verify_record_mac(&self, message: &[u8], mac: &str) -> bool {
        use base64::Engine;
        use hmac::Mac;
        base64::engine::general_purpose::STANDARD
            .decode(mac)
            .is_ok_and(|mac| hmac(self.record_key.as_slice(), message).verify_slice(&mac).is_ok())
    }

    /// A fresh random nonce for one object.
    pub fn new_nonce() -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random number generator is unavailable");
        nonce
    }

    /// Starts encrypting, piece by piece, the object stored at `key` with `nonce`. The output
    /// is [`Sealer::prefix`], every piece passed through [`Sealer::update`], then
    /// [`Sealer::finish`]'s tag: byte for byte what [`ObjectCipher::seal`] gives for the
    /// whole plaintext with the same nonce. The same nonce and plaintext always give the same
    /// bytes, which is what lets a retried upload be recognised.
    pub fn sealer(&self, key: &str, nonce: [u8; NONCE_LEN]) -> Sealer {
        Sealer {
            gcm: Gcm::new(&self.key, nonce, key.as_bytes()),
            nonce,
        }
    }

    /// Starts decrypting, piece by piece, the object stored at `key` whose nonce is `nonce`
    /// (the bytes after [`MAGIC`]). The plaintext pieces are not authenticated until
    /// [`Opener::finish`] accepts the tag: use them only where a failure can still undo them.
    pub fn opener(&self, key: &str, nonce: [u8; NONCE_LEN]) -> Opener {
        Opener {
            gcm: Gcm::new(&self.key, nonce, key.as_bytes()),
        }
    }

    /// Encrypts `plaintext` for the object stored at `key`.
    pub fn seal(&self, key: &str, plaintext: &[u8]) -> Vec<u8> {
        let nonce = Self::new_nonce();
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

/// Encrypts one object piece by piece; see [`ObjectCipher::sealer`].
pub struct Sealer {
    gcm: Gcm,
    nonce: [u8; NONCE_LEN],
}

impl Sealer {
    /// What the object starts with: [`MAGIC`] and the nonce.
    pub fn prefix(&self) -> [u8; MAGIC.len() + NONCE_LEN] {
        let mut out = [0u8; MAGIC.len() + NONCE_LEN];
        out[..MAGIC.len()].copy_from_slice(MAGIC);
        out[MAGIC.len()..].copy_from_slice(&self.nonce);
        out
    }

    /// Encrypts the next piece of plaintext in place.
    pub fn update(&mut self, piece: &mut [u8]) {
        self.gcm.ctr.apply_keystream(piece);
        self.gcm.absorb(piece);
    }

    /// The tag that ends the object.
    pub fn finish(self) -> [u8; TAG_LEN] {
        self.gcm.tag()
    }
}

/// Decrypts one object piece by piece; see [`ObjectCipher::opener`].
pub struct Opener {
    gcm: Gcm,
}

impl Opener {
    /// Decrypts the next piece of ciphertext in place (the tag excluded).
    pub fn update(&mut self, piece: &mut [u8]) {
        self.gcm.absorb(piece);
        self.gcm.ctr.apply_keystream(piece);
    }

    /// Checks the tag that ended the object, in constant time.
    ///
    /// # Errors
    /// `Undecryptable(object)` when it does not match: a wrong key, or a corrupt object.
    pub fn finish(self, tag: &[u8], object: &str) -> Result<(), CryptError> {
        use subtle::ConstantTimeEq;
        match bool::from(self.gcm.tag().ct_eq(tag)) {
            true => Ok(()),
            false => Err(CryptError::Undecryptable(object.into())),
        }
    }
}

/// GCM with a 96-bit nonce, run incrementally (NIST SP 800-38D, as `aes-gcm` computes it):
/// counter mode from J0 + 1, GHASH over the associated data and the ciphertext, and the tag
/// GHASH ⊕ E(J0).
struct Gcm {
    ctr: Ctr,
    ghash: GHash,
    /// E(J0), which masks the tag.
    mask: [u8; 16],
    /// Ciphertext not yet hashed because it does not fill a block.
    partial: [u8; 16],
    partial_len: usize,
    aad_len: u64,
    text_len: u64,
}

impl Gcm {
    fn new(key: &[u8; 32], nonce: [u8; NONCE_LEN], aad: &[u8]) -> Gcm {
        use aes_gcm::aes::cipher::BlockEncrypt;
        let aes = <Aes256 as KeyInit>::new(key.into());
        let mut h = ghash::Block::default();
        aes.encrypt_block(&mut h);
        let mut ghash = GHash::new(&h);
        ghash.update_padded(aad);
        let mut j0 = [0u8; 16];
        j0[..NONCE_LEN].copy_from_slice(&nonce);
        j0[15] = 1;
        let mut ctr = Ctr::new(key.into(), &j0.into());
        let mut mask = [0u8; 16];
        ctr.apply_keystream(&mut mask);
        Gcm {
            ctr,
            ghash,
            mask,
            partial: [0; 16],
            partial_len: 0,
            aad_len: aad.len() as u64,
            text_len: 0,
        }
    }

    /// Hashes the next ciphertext bytes, whole blocks at once.
    fn absorb(&mut self, mut bytes: &[u8]) {
        self.text_len += bytes.len() as u64;
        if self.partial_len > 0 {
            let take = (16 - self.partial_len).min(bytes.len());
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(&bytes[..take]);
            self.partial_len += take;
            bytes = &bytes[take..];
            if self.partial_len < 16 {
                return;
            }
            self.ghash.update(&[self.partial.into()]);
            self.partial_len = 0;
        }
        let whole = bytes.len() / 16 * 16;
        let blocks: Vec<ghash::Block> = bytes[..whole]
            .chunks_exact(16)
            .map(|block| <[u8; 16]>::try_from(block).expect("16 bytes").into())
            .collect();
        self.ghash.update(&blocks);
        let rest = &bytes[whole..];
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }

    fn tag(mut self) -> [u8; TAG_LEN] {
        if self.partial_len > 0 {
            self.ghash.update_padded(&self.partial[..self.partial_len]);
        }
        let mut lengths = ghash::Block::default();
        lengths[..8].copy_from_slice(&(self.aad_len * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&(self.text_len * 8).to_be_bytes());
        self.ghash.update(&[lengths]);
        let mut tag: [u8; TAG_LEN] = self.ghash.finalize().into();
        for (t, m) in tag.iter_mut().zip(self.mask) {
            *t ^= m;
        }
        tag
    }
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
    fn a_record_mac_proves_the_key_and_the_message() {
        let a = ObjectCipher::from_base64(KEY_A).unwrap();
        let mac = a.record_mac(b"txid=7");
        assert!(a.verify_record_mac(b"txid=7", &mac));
        assert_eq!(mac, ObjectCipher::from_base64(KEY_A).unwrap().record_mac(b"txid=7"));
        assert!(!a.verify_record_mac(b"txid=6", &mac), "bound to its message");
        assert!(!ObjectCipher::from_base64(KEY_B)
            .unwrap()
            .verify_record_mac(b"txid=7", &mac));
        for forged in ["", "not base64!", "AAAA", &mac[..mac.len() - 4]] {
            assert!(!a.verify_record_mac(b"txid=7", forged), "{forged:?}");
        }
        // Under a key of its own, not the encryption key.
        let raw = {
            use base64::Engine;
            use hmac::Mac;
            let key = base64::engine::general_purpose::STANDARD.decode(KEY_A).unwrap();
            base64::engine::general_purpose::STANDARD.encode(hmac(&key, b"txid=7").finalize().into_bytes())
        };
        assert_ne!(mac, raw);
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

    /// Seals `plaintext` with the streaming form, fed in pieces of `piece` bytes.
    fn seal_in_pieces(
        cipher: &ObjectCipher,
        key: &str,
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
        piece: usize,
    ) -> Vec<u8> {
        let mut sealer = cipher.sealer(key, nonce);
        let mut out = sealer.prefix().to_vec();
        for chunk in plaintext.chunks(piece.max(1)) {
            let mut chunk = chunk.to_vec();
            sealer.update(&mut chunk);
            out.extend_from_slice(&chunk);
        }
        out.extend_from_slice(&sealer.finish());
        out
    }

    #[test]
    fn the_streaming_form_writes_and_reads_exactly_what_the_one_shot_form_does() {
        let cipher = ObjectCipher::from_base64(KEY_A).unwrap();
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 4096, 5000] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let one_shot = cipher.seal("ltx/0/a.ltx", &plaintext);
            let nonce: [u8; NONCE_LEN] = one_shot[MAGIC.len()..MAGIC.len() + NONCE_LEN].try_into().unwrap();
            for piece in [1, 5, 16, 17, 1000, 10_000] {
                let streamed = seal_in_pieces(&cipher, "ltx/0/a.ltx", nonce, &plaintext, piece);
                assert_eq!(streamed, one_shot, "len {len}, pieces of {piece}");
                let body = &streamed[MAGIC.len() + NONCE_LEN..streamed.len() - TAG_LEN];
                let mut opener = cipher.opener("ltx/0/a.ltx", nonce);
                let mut opened = Vec::new();
                for chunk in body.chunks(piece) {
                    let mut chunk = chunk.to_vec();
                    opener.update(&mut chunk);
                    opened.extend_from_slice(&chunk);
                }
                opener.finish(&streamed[streamed.len() - TAG_LEN..], "k").unwrap();
                assert_eq!(opened, plaintext);
            }
        }
    }

    #[test]
    fn the_streaming_opener_refuses_a_flipped_bit_a_wrong_key_and_another_object_name() {
        let cipher = ObjectCipher::from_base64(KEY_A).unwrap();
        let nonce = ObjectCipher::new_nonce();
        let sealed = seal_in_pieces(&cipher, "ltx/0/a.ltx", nonce, b"some pages of a database", 7);
        let open = |cipher: &ObjectCipher, name: &str, bytes: &[u8]| {
            let mut opener = cipher.opener(name, nonce);
            let mut body = bytes[MAGIC.len() + NONCE_LEN..bytes.len() - TAG_LEN].to_vec();
            opener.update(&mut body);
            opener.finish(&bytes[bytes.len() - TAG_LEN..], name)
        };
        assert!(open(&cipher, "ltx/0/a.ltx", &sealed).is_ok());
        for at in MAGIC.len() + NONCE_LEN..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(open(&cipher, "ltx/0/a.ltx", &bad).is_err(), "flip at {at}");
        }
        assert!(open(&ObjectCipher::from_base64(KEY_B).unwrap(), "ltx/0/a.ltx", &sealed).is_err());
        assert!(open(&cipher, "ltx/0/b.ltx", &sealed).is_err());
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
