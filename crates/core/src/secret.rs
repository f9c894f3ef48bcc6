//! Handling of secret values: a wrapper that zeroizes and never prints, constant-time
//! comparison, random tokens and their stored hashes.
//!
//! Owns no policy about *which* values are secret; every module that holds a password,
//! token or decrypted key wraps it in [`Secret`] and reads it through the greppable
//! [`Secret::expose`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use keycast_db::TokenHash;
use rand::RngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// A secret value: zeroized when dropped, printed as `Secret(..)`, not serializable.
///
/// Read it with [`Secret::expose`], so every place that touches the plaintext is easy to
/// find with grep.
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    /// Wraps a value; from here on it is zeroized on drop.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value. Do not copy it out of the wrapper unless it goes straight into
    /// another zeroizing holder.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl<T: Zeroize + Clone> Clone for Secret<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret<String> {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// Compares two byte strings in time independent of where they differ (the length is
/// not hidden). Use for every comparison of a secret with a candidate.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// `N` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Secret<[u8; N]> {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    Secret::new(bytes)
}

/// A fresh bearer token, session cookie value, OAuth code or connect secret: 32 bytes
/// (256 bits) from the OS, base64url without padding (43 characters, URL- and
/// cookie-safe). Store only [`hash_token`] of it.
pub fn random_token() -> Secret<String> {
    Secret::new(URL_SAFE_NO_PAD.encode(random_bytes::<32>().expose()))
}

/// The form in which a token is stored and looked up: SHA-256, hex. Right for random
/// 256-bit tokens; passwords use `password` (argon2id) instead.
pub fn hash_token(token: &str) -> TokenHash {
    TokenHash::of(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_value() {
        let secret = Secret::new(String::from("hunter2"));
        assert_eq!(format!("{secret:?}"), "Secret(..)");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(Secret(..))");
    }

    #[test]
    fn drop_zeroizes_the_value_in_place() {
        let mut slot = std::mem::ManuallyDrop::new(Secret::new([7u8; 32]));
        // SAFETY: dropped exactly once, then only the (still allocated) bytes are read.
        unsafe { std::mem::ManuallyDrop::drop(&mut slot) };
        assert_eq!(slot.0, [0u8; 32]);
    }

    #[test]
    fn ct_eq_compares_contents() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
    }

    #[test]
    fn random_tokens_are_256_bit_base64url_and_distinct() {
        let a = random_token();
        let b = random_token();
        assert_eq!(a.expose().len(), 43);
        assert_eq!(URL_SAFE_NO_PAD.decode(a.expose()).unwrap().len(), 32);
        assert!(a
            .expose()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn token_hash_is_stable_and_not_the_token() {
        let token = random_token();
        let hash = hash_token(token.expose());
        assert_eq!(hash, hash_token(token.expose()));
        assert_eq!(hash.as_str().len(), 64);
        assert!(!hash.as_str().contains(token.expose().as_str()));
    }
}
