//! Password hashing (argon2id) and the re-authentication proof that key export requires.
//!
//! # Parameters
//! [`PasswordParams::default`] is OWASP's first argon2id recommendation: 19 MiB of
//! memory (`m = 19456` KiB), 2 passes (`t = 2`), 1 lane (`p = 1`), 32-byte output, a
//! random 16-byte salt per hash. That is ~20–40 ms of one core per hash on the reference
//! machine. The parameters are stored in each PHC string, so raising them later leaves
//! old hashes verifiable.
//!
//! Hashing and verifying are CPU-bound: async callers use [`PasswordHasher::hash_async`]
//! and [`PasswordHasher::verify_async`], which run on tokio's blocking pool through the
//! bounded [`HashingQueue`] (memory budget, refusal with [`PasswordError::Busy`] beyond it),
//! never the synchronous forms on a runtime thread. Verification compares the derived output in
//! constant time (the `password-hash` crate's `Output` equality), and
//! [`PasswordHasher::verify_dummy`] lets a login for an unknown email cost the same.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use keycast_db::users::User;
use keycast_db::UserId;

use crate::hashing_queue::{Busy, HashingQueue, ARGON2_MIB};
use crate::secret::Secret;

/// Shortest accepted new password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest accepted new password, in bytes (bounds hashing work per request).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Why a password operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The password does not match.
    #[error("wrong password")]
    Mismatch,
    #[error("the password must be at least {MIN_PASSWORD_CHARS} characters long")]
    TooShort,
    #[error("the password must be at most {MAX_PASSWORD_BYTES} bytes long")]
    TooLong,
    /// The stored hash is not a PHC string argon2 understands.
    #[error("the stored password hash is unreadable")]
    CorruptHash,
    /// argon2 failed (bad parameters), or the blocking task died.
    #[error("password hashing failed: {0}")]
    Hashing(String),
    /// The hashing queue is full (see [`HashingQueue`]); retry shortly.
    #[error(transparent)]
    Busy(#[from] Busy),
}

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordParams {
    /// Memory in KiB. Default 19456 (19 MiB).
    pub memory_kib: u32,
    /// Passes over memory. Default 2.
    pub iterations: u32,
    /// Lanes. Default 1.
    pub parallelism: u32,
}

impl Default for PasswordParams {
    fn default() -> Self {
        PasswordParams {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Hashes and verifies passwords with argon2id. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PasswordHasher {
    params: Params,
    /// A hash of a random password, verified against when the account does not exist.
    dummy_hash: String,
    /// Where the async forms run (shared with key export's scrypt).
    queue: HashingQueue,
}

/// Proof that a user just typed their password: produced only by
/// [`PasswordHasher::reauthenticate`], required by key export.
#[derive(Debug)]
pub struct Reauthenticated {
    user_id: UserId,
    /// The hash the password was checked against: what a change replaces only while it is
    /// still the account's (a reset meanwhile outranks it).
    checked_hash: String,
}

impl Reauthenticated {
    /// Whose password was checked.
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// The password hash the check was made against.
    pub fn checked_hash(&self) -> &str {
        &self.checked_hash
    }
}

/// Checks a new password against the length rules.
///
/// # Errors
/// [`PasswordError::TooShort`], [`PasswordError::TooLong`].
pub fn validate_new_password(password: &Secret<String>) -> Result<(), PasswordError> {
    let text = password.expose();
    if text.len() > MAX_PASSWORD_BYTES {
        return Err(PasswordError::TooLong);
    }
    if text.chars().count() < MIN_PASSWORD_CHARS {
        return Err(PasswordError::TooShort);
    }
    Ok(())
}

impl PasswordHasher {
    /// A hasher with these parameters.
    ///
    /// # Errors
    /// [`PasswordError::Hashing`] when argon2 rejects the parameters.
    pub fn new(params: PasswordParams) -> Result<PasswordHasher, PasswordError> {
        PasswordHasher::with_queue(params, HashingQueue::default())
    }

    /// A hasher with these parameters whose async forms run through `queue`.
    ///
    /// # Errors
    /// [`PasswordError::Hashing`] when argon2 rejects the parameters.
    pub fn with_queue(params: PasswordParams, queue: HashingQueue) -> Result<PasswordHasher, PasswordError> {
        let params = Params::new(params.memory_kib, params.iterations, params.parallelism, None)
            .map_err(|e| PasswordError::Hashing(e.to_string()))?;
        let mut hasher = PasswordHasher {
            params,
            dummy_hash: String::new(),
            queue,
        };
        hasher.dummy_hash = hasher.hash(&crate::secret::random_token())?;
        Ok(hasher)
    }

    /// The queue the async forms run through (key export's scrypt shares it).
    pub fn queue(&self) -> &HashingQueue {
        &self.queue
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// Hashes a password into a PHC string (`$argon2id$v=19$m=…`). Blocking.
    ///
    /// # Errors
    /// [`PasswordError::Hashing`].
    pub fn hash(&self, password: &Secret<String>) -> Result<String, PasswordError> {
        let salt = SaltString::generate(&mut OsRng);
        self.argon2()
            .hash_password(password.expose().as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| PasswordError::Hashing(e.to_string()))
    }

    /// Checks a password against a stored PHC string, in constant time. Blocking.
    ///
    /// # Errors
    /// [`PasswordError::Mismatch`], [`PasswordError::CorruptHash`].
    pub fn verify(&self, password: &Secret<String>, phc: &str) -> Result<(), PasswordError> {
        let parsed = PasswordHash::new(phc).map_err(|_| PasswordError::CorruptHash)?;
        self.argon2()
            .verify_password(password.expose().as_bytes(), &parsed)
            .map_err(|e| match e {
                argon2::password_hash::Error::Password => PasswordError::Mismatch,
                _ => PasswordError::CorruptHash,
            })
    }

    /// Spends the time of one verification and fails: for logins naming an unknown
    /// email, so response time does not reveal which emails have accounts. Blocking.
    pub fn verify_dummy(&self, password: &Secret<String>) -> PasswordError {
        let _ = self.verify(password, &self.dummy_hash);
        PasswordError::Mismatch
    }

    /// [`PasswordHasher::hash`] on the blocking pool.
    ///
    /// # Errors
    /// As `hash`.
    pub async fn hash_async(&self, password: &Secret<String>) -> Result<String, PasswordError> {
        let (hasher, password) = (self.clone(), password.clone());
        self.queue.run(ARGON2_MIB, move || hasher.hash(&password)).await?
    }

    /// [`PasswordHasher::verify`] on the blocking pool; `phc: None` (unknown account)
    /// runs [`PasswordHasher::verify_dummy`].
    ///
    /// # Errors
    /// As `verify`.
    pub async fn verify_async(&self, password: &Secret<String>, phc: Option<&str>) -> Result<(), PasswordError> {
        let (hasher, password, phc) = (self.clone(), password.clone(), phc.map(str::to_owned));
        self.queue
            .run(ARGON2_MIB, move || match phc {
                Some(phc) => hasher.verify(&password, &phc),
                None => Err(hasher.verify_dummy(&password)),
            })
            .await?
    }

    /// Checks `user`'s password again (before a sensitive action such as key export) and
    /// returns the proof those actions require.
    ///
    /// # Errors
    /// [`PasswordError::Mismatch`] and as `verify`.
    pub async fn reauthenticate(
        &self,
        user: &User,
        password: &Secret<String>,
    ) -> Result<Reauthenticated, PasswordError> {
        self.verify_async(password, Some(&user.password_hash)).await?;
        Ok(Reauthenticated {
            user_id: user.id.clone(),
            checked_hash: user.password_hash.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fast_hasher;

    #[test]
    fn default_parameters_are_owasp_argon2id() {
        let hasher = PasswordHasher::new(PasswordParams::default()).unwrap();
        let phc = hasher.hash(&"correct horse".into()).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    }

    #[test]
    fn right_password_verifies_and_wrong_one_is_a_mismatch() {
        let hasher = fast_hasher();
        let phc = hasher.hash(&"correct horse".into()).unwrap();
        assert!(!phc.contains("correct horse"));
        hasher.verify(&"correct horse".into(), &phc).unwrap();
        assert!(matches!(
            hasher.verify(&"wrong horse".into(), &phc),
            Err(PasswordError::Mismatch)
        ));
    }

    #[test]
    fn same_password_hashes_differently_each_time() {
        let hasher = fast_hasher();
        assert_ne!(
            hasher.hash(&"pw-pw-pw-pw".into()).unwrap(),
            hasher.hash(&"pw-pw-pw-pw".into()).unwrap()
        );
    }

    #[test]
    fn garbage_hash_is_reported_corrupt() {
        let err = fast_hasher().verify(&"x".into(), "not-a-phc").unwrap_err();
        assert!(matches!(err, PasswordError::CorruptHash));
    }

    #[test]
    fn new_password_length_rules() {
        assert!(matches!(
            validate_new_password(&"short".into()),
            Err(PasswordError::TooShort)
        ));
        assert!(validate_new_password(&"long enough".into()).is_ok());
        let huge = Secret::new("x".repeat(MAX_PASSWORD_BYTES + 1));
        assert!(matches!(validate_new_password(&huge), Err(PasswordError::TooLong)));
    }

    #[tokio::test]
    async fn async_forms_agree_and_unknown_account_is_a_mismatch() {
        let hasher = fast_hasher();
        let phc = hasher.hash_async(&"pw-pw-pw-pw".into()).await.unwrap();
        hasher.verify_async(&"pw-pw-pw-pw".into(), Some(&phc)).await.unwrap();
        let unknown = hasher.verify_async(&"pw-pw-pw-pw".into(), None).await;
        assert!(matches!(unknown, Err(PasswordError::Mismatch)));
    }

    #[tokio::test]
    async fn reauthentication_needs_the_right_password() {
        let hasher = fast_hasher();
        let user = User {
            id: UserId::generate(),
            email: "a@x.org".into(),
            password_hash: hasher.hash(&"pw-pw-pw-pw".into()).unwrap(),
            username: None,
            email_verified_at: None,
            created_at: 0,
            updated_at: 0,
        };
        let proof = hasher.reauthenticate(&user, &"pw-pw-pw-pw".into()).await.unwrap();
        assert_eq!(proof.user_id(), &user.id);
        assert!(hasher.reauthenticate(&user, &"nope-nope".into()).await.is_err());
    }
}
