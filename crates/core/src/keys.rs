//! Users' Nostr keys: generate, import, store encrypted, load, export; plus the bunker
//! keys of authorizations and the start-up check that the master key fits the data.
//!
//! Decrypted keys exist only as [`nostr::Keys`] (whose secret is erased on drop) or
//! inside [`Secret`]; nothing here logs, prints or stores a plaintext key. Export needs a
//! [`Reauthenticated`] proof, which only a successful password check can produce.

use keycast_db::authz as authz_repo;
use keycast_db::keys::{self as key_repo, KeyOrigin, NewKey, StoredKey};
use keycast_db::Db;
use keycast_db::{AuthorizationId, KeyId, RepoError, UserId};
use nostr::nips::nip19::ToBech32;
use nostr::nips::nip49::{EncryptedSecretKey, KeySecurity};
use nostr::{Keys, SecretKey};

use crate::key_manager::{KeyManager, KeyOwner};
use crate::password::Reauthenticated;
use crate::secret::Secret;

/// scrypt cost of exported `ncryptsec` (NIP-49 `LOG_N`): 2^16 rounds, ~64 MiB, the
/// NIP's recommended default.
pub const NCRYPTSEC_LOG_N: u8 = 16;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configured master key is unusable; the reason never contains the key.
    #[error("the master key is invalid: {0}")]
    InvalidMasterKey(String),
    /// The stored keys were encrypted under another master key.
    #[error(
        "the master key does not decrypt the keys stored in this database (key {key_id} failed); \
         start keycast with the master key these keys were created with"
    )]
    MasterKeyMismatch { key_id: String },
    /// A ciphertext is malformed, from another master key, or for another owner.
    #[error("a stored key could not be decrypted")]
    Undecryptable,
    /// A stored ciphertext decrypted to bytes that are not a valid secp256k1 key.
    #[error("a stored key decrypted to an invalid secret key")]
    CorruptKey,
    /// The cipher failed while encrypting.
    #[error("encryption failed")]
    Crypto,
    /// What the user gave to import is neither an `nsec1…` nor 64 hex characters of a
    /// valid secret key.
    #[error("the key to import must be an nsec1… bech32 string or 64 hexadecimal characters of a valid secret key")]
    InvalidImport,
    /// The user has no key.
    #[error("this account has no key")]
    NoKey,
    /// The user already has a key.
    #[error("this account already has a key")]
    AlreadyHasKey,
    /// Another account holds this public key.
    #[error("this key is already registered to another account")]
    KeyTaken,
    /// NIP-49 encryption of an export failed.
    #[error("the key could not be exported as ncryptsec")]
    Export,
    /// The key was replaced between the export's record and its read: nothing was handed out.
    #[error(
        "the key was replaced while it was being exported, so nothing was exported; export the new key if you need it"
    )]
    ReplacedMeanwhile,
    /// The hashing queue is full; retry shortly.
    #[error(transparent)]
    Busy(#[from] crate::hashing_queue::Busy),
    /// A storage failure.
    #[error(transparent)]
    Repo(RepoError),
}

impl From<RepoError> for KeyError {
    fn from(err: RepoError) -> Self {
        if err.is_duplicate_of("user_id") {
            KeyError::AlreadyHasKey
        } else if err.is_duplicate_of("pubkey") {
            KeyError::KeyTaken
        } else {
            KeyError::Repo(err)
        }
    }
}

/// What is public about a stored user key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKey {
    pub key_id: KeyId,
    pub pubkey: nostr::PublicKey,
    pub origin: KeyOrigin,
}

/// Parses a key the user brings: `nsec1…` or 64 hex characters, surrounding whitespace
/// ignored. Nothing else is accepted (no `ncryptsec`, no mnemonic).
///
/// # Errors
/// [`KeyError::InvalidImport`].
pub fn parse_import(input: &Secret<String>) -> Result<Keys, KeyError> {
    let text = input.expose().trim();
    let is_hex = text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex && !text.starts_with("nsec1") {
        return Err(KeyError::InvalidImport);
    }
    let secret = SecretKey::parse(text).map_err(|_| KeyError::InvalidImport)?;
    Ok(Keys::new(secret))
}

/// Encrypts a key's secret for `owner`.
///
/// # Errors
/// [`KeyError::Crypto`].
pub fn seal(km: &dyn KeyManager, keys: &Keys, owner: KeyOwner<'_>) -> Result<Vec<u8>, KeyError> {
    let secret = Secret::new(keys.secret_key().to_secret_bytes());
    km.encrypt(&secret, owner)
}

/// Decrypts a key sealed with [`seal`] for the same `owner`.
///
/// # Errors
/// [`KeyError::Undecryptable`], [`KeyError::CorruptKey`].
pub fn open(km: &dyn KeyManager, ciphertext: &[u8], owner: KeyOwner<'_>) -> Result<Keys, KeyError> {
    let secret = km.decrypt(ciphertext, owner)?;
    let secret = SecretKey::from_slice(secret.expose()).map_err(|_| KeyError::CorruptKey)?;
    Ok(Keys::new(secret))
}

/// Stores `keys` as `user`'s key, encrypted.
///
/// # Errors
/// [`KeyError::AlreadyHasKey`], [`KeyError::KeyTaken`], storage errors.
pub async fn store_user_key(
    db: &Db,
    km: &dyn KeyManager,
    user: &UserId,
    keys: &Keys,
    origin: KeyOrigin,
    now: i64,
) -> Result<UserKey, KeyError> {
    let key_id = KeyId::generate();
    let sealed = seal(km, keys, KeyOwner::User(user))?;
    let pubkey = keys.public_key();
    let new = NewKey {
        id: &key_id,
        user_id: user,
        pubkey: &pubkey.to_hex(),
        encrypted_secret: &sealed,
        origin,
    };
    key_repo::insert(db, &new, now).await?;
    Ok(UserKey { key_id, pubkey, origin })
}

/// Generates a fresh key for `user` and stores it.
///
/// # Errors
/// As [`store_user_key`].
pub async fn generate_user_key(db: &Db, km: &dyn KeyManager, user: &UserId, now: i64) -> Result<UserKey, KeyError> {
    store_user_key(db, km, user, &Keys::generate(), KeyOrigin::Generated, now).await
}

/// Imports the user's own key (see [`parse_import`]) and stores it.
///
/// # Errors
/// [`KeyError::InvalidImport`], then as [`store_user_key`].
pub async fn import_user_key(
    db: &Db,
    km: &dyn KeyManager,
    user: &UserId,
    input: &Secret<String>,
    now: i64,
) -> Result<UserKey, KeyError> {
    let keys = parse_import(input)?;
    store_user_key(db, km, user, &keys, KeyOrigin::Imported, now).await
}

/// The public side of `user`'s key.
///
/// # Errors
/// [`KeyError::NoKey`], storage errors.
pub async fn find_user_key(db: &Db, user: &UserId) -> Result<UserKey, KeyError> {
    let stored = key_repo::find_by_user(db, user).await?.ok_or(KeyError::NoKey)?;
    public_part(&stored)
}

fn public_part(stored: &StoredKey) -> Result<UserKey, KeyError> {
    let pubkey = nostr::PublicKey::from_hex(&stored.pubkey).map_err(|_| KeyError::CorruptKey)?;
    Ok(UserKey {
        key_id: stored.id.clone(),
        pubkey,
        origin: stored.origin,
    })
}

/// Loads and decrypts `user`'s key.
///
/// # Errors
/// [`KeyError::NoKey`], [`KeyError::Undecryptable`], [`KeyError::CorruptKey`] (also when
/// the decrypted key does not match the stored public key), storage errors.
pub async fn load_user_keys(db: &Db, km: &dyn KeyManager, user: &UserId) -> Result<Keys, KeyError> {
    let stored = key_repo::find_by_user(db, user).await?.ok_or(KeyError::NoKey)?;
    let keys = open(km, &stored.encrypted_secret, KeyOwner::User(user))?;
    if keys.public_key().to_hex() != stored.pubkey {
        return Err(KeyError::CorruptKey);
    }
    Ok(keys)
}

/// The re-authenticated user's key, if it is still `recorded` (the public key an export
/// recorded as exported): a key replaced since was recorded nowhere, and is not handed out.
async fn recorded_key(db: &Db, km: &dyn KeyManager, proof: &Reauthenticated, recorded: &str) -> Result<Keys, KeyError> {
    let keys = load_user_keys(db, km, proof.user_id()).await?;
    if keys.public_key().to_hex() != recorded {
        return Err(KeyError::ReplacedMeanwhile);
    }
    Ok(keys)
}

/// Exports the re-authenticated user's key as `nsec1…`, if it is still the key `recorded`
/// (its public key) as exported.
///
/// # Errors
/// As [`load_user_keys`]; [`KeyError::ReplacedMeanwhile`].
pub async fn export_nsec(
    db: &Db,
    km: &dyn KeyManager,
    proof: &Reauthenticated,
    recorded: &str,
) -> Result<Secret<String>, KeyError> {
    let keys = recorded_key(db, km, proof, recorded).await?;
    let nsec = keys.secret_key().to_bech32().map_err(|_| KeyError::Export)?;
    Ok(Secret::new(nsec))
}

/// Exports the re-authenticated user's key as NIP-49 `ncryptsec1…`, encrypted under
/// `passphrase` with scrypt cost [`NCRYPTSEC_LOG_N`], if it is still the key `recorded` as
/// exported. CPU- and memory-heavy (~64 MiB, tenths of a second): runs through the bounded
/// `queue`.
///
/// # Errors
/// As [`load_user_keys`]; [`KeyError::Export`], [`KeyError::ReplacedMeanwhile`].
pub async fn export_ncryptsec(
    db: &Db,
    km: &dyn KeyManager,
    proof: &Reauthenticated,
    recorded: &str,
    passphrase: &Secret<String>,
    queue: &crate::HashingQueue,
) -> Result<Secret<String>, KeyError> {
    let keys = recorded_key(db, km, proof, recorded).await?;
    let passphrase = passphrase.clone();
    queue
        .run(crate::hashing_queue::SCRYPT_MIB, move || {
            let encrypted = EncryptedSecretKey::new(
                keys.secret_key(),
                passphrase.expose(),
                NCRYPTSEC_LOG_N,
                KeySecurity::Unknown,
            )
            .map_err(|_| KeyError::Export)?;
            encrypted.to_bech32().map(Secret::new).map_err(|_| KeyError::Export)
        })
        .await?
}

/// A fresh bunker keypair for a new authorization, sealed for it.
///
/// # Errors
/// [`KeyError::Crypto`].
pub fn new_bunker_key(km: &dyn KeyManager, authorization: &AuthorizationId) -> Result<(Keys, Vec<u8>), KeyError> {
    let keys = Keys::generate();
    let sealed = seal(km, &keys, KeyOwner::Bunker(authorization))?;
    Ok((keys, sealed))
}

/// Checks at start that `km` decrypts the stored keys. It decrypts a sample, not every
/// key (start-up must stay fast with many users): of each kind of sealed key — users'
/// Nostr keys and authorizations' bunker keys — the oldest and the newest, so a master key
/// that was swapped at some point in the database's life is caught at either end. An
/// empty database passes.
///
/// # Errors
/// [`KeyError::MasterKeyMismatch`] naming the key that failed; storage errors.
pub async fn verify_can_decrypt(db: &Db, km: &dyn KeyManager) -> Result<(), KeyError> {
    for stored in key_repo::find_oldest_and_newest(db).await? {
        check_opens(
            km,
            &stored.encrypted_secret,
            KeyOwner::User(&stored.user_id),
            stored.id.as_str(),
        )?;
    }
    for row in authz_repo::find_oldest_and_newest(db).await? {
        let what = format!("bunker key of authorization {}", row.id.as_str());
        check_opens(km, &row.bunker_secret_encrypted, KeyOwner::Bunker(&row.id), &what)?;
    }
    Ok(())
}

/// Decrypts one sealed key, mapping a failure to [`KeyError::MasterKeyMismatch`] naming `what`.
fn check_opens(km: &dyn KeyManager, ciphertext: &[u8], owner: KeyOwner<'_>, what: &str) -> Result<(), KeyError> {
    match open(km, ciphertext, owner) {
        Ok(_) => Ok(()),
        Err(KeyError::Undecryptable | KeyError::CorruptKey) => Err(KeyError::MasterKeyMismatch {
            key_id: what.to_owned(),
        }),
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::create_grant;
    use crate::key_manager::{MasterKey, MasterKeyManager};
    use crate::testing::{fast_hasher, fixture, social_policy, test_user};
    use keycast_db::users;
    use nostr::nips::nip19::FromBech32;

    #[test]
    fn import_accepts_nsec_and_hex_with_surrounding_space() {
        let keys = Keys::generate();
        let nsec = keys.secret_key().to_bech32().unwrap();
        let hex = keys.secret_key().to_secret_hex();
        for input in [nsec.clone(), format!("  {nsec}\n"), hex.clone(), hex.to_uppercase()] {
            let parsed = parse_import(&Secret::new(input)).unwrap();
            assert_eq!(parsed.public_key(), keys.public_key());
        }
    }

    #[test]
    fn import_refuses_anything_else() {
        let keys = Keys::generate();
        let npub = keys.public_key().to_bech32().unwrap();
        let hex = keys.secret_key().to_secret_hex();
        let ncryptsec = keys.secret_key().encrypt("pw").unwrap().to_bech32().unwrap();
        let zero = "0".repeat(64);
        for input in [
            npub,
            hex[..63].to_owned(),
            format!("{hex}00"),
            ncryptsec,
            zero,
            "nsec1qqqq".into(),
            String::new(),
        ] {
            let err = parse_import(&Secret::new(input.clone())).unwrap_err();
            assert!(matches!(err, KeyError::InvalidImport), "{input}: {err:?}");
        }
        assert!(KeyError::InvalidImport.to_string().contains("nsec1"));
    }

    #[tokio::test]
    async fn stored_key_loads_back_with_its_pubkey() {
        let fx = fixture().await;
        let keys = load_user_keys(fx.pool(), fx.km.as_ref(), &fx.user).await.unwrap();
        assert_eq!(keys.public_key(), fx.user_pubkey);
        assert_eq!(find_user_key(fx.pool(), &fx.user).await.unwrap().pubkey, fx.user_pubkey);
        let nobody = UserId::generate();
        assert!(matches!(
            load_user_keys(fx.pool(), fx.km.as_ref(), &nobody).await,
            Err(KeyError::NoKey)
        ));
    }

    #[tokio::test]
    async fn a_second_key_for_a_user_or_a_taken_pubkey_is_refused() {
        let fx = fixture().await;
        let again = generate_user_key(fx.pool(), fx.km.as_ref(), &fx.user, 2)
            .await
            .unwrap_err();
        assert!(matches!(again, KeyError::AlreadyHasKey), "{again:?}");
        let bob = test_user(fx.pool(), "bob@x.org").await;
        let same = load_user_keys(fx.pool(), fx.km.as_ref(), &fx.user).await.unwrap();
        let taken = store_user_key(fx.pool(), fx.km.as_ref(), &bob, &same, KeyOrigin::Imported, 2)
            .await
            .unwrap_err();
        assert!(matches!(taken, KeyError::KeyTaken), "{taken:?}");
    }

    #[tokio::test]
    async fn ciphertext_moved_to_another_user_does_not_decrypt() {
        let fx = fixture().await;
        let bob = test_user(fx.pool(), "bob@x.org").await;
        generate_user_key(fx.pool(), fx.km.as_ref(), &bob, 2).await.unwrap();
        sqlx::query("UPDATE keys SET encrypted_secret = (SELECT encrypted_secret FROM keys WHERE user_id = $1) WHERE user_id = $2")
            .bind(&fx.user)
            .bind(&bob)
            .execute(fx.pool().as_sqlite().unwrap())
            .await
            .unwrap();
        let err = load_user_keys(fx.pool(), fx.km.as_ref(), &bob).await.unwrap_err();
        assert!(matches!(err, KeyError::Undecryptable), "{err:?}");
    }

    #[tokio::test]
    async fn plaintext_keys_never_reach_the_database_files() {
        let fx = fixture().await;
        let own = Keys::generate();
        let bob = test_user(fx.pool(), "bob@x.org").await;
        store_user_key(fx.pool(), fx.km.as_ref(), &bob, &own, KeyOrigin::Imported, 2)
            .await
            .unwrap();
        let policy = social_policy(&fx).await;
        let grant = create_grant(fx.pool(), fx.km.as_ref(), &fx.new_grant(&policy), 3)
            .await
            .unwrap();
        let generated = load_user_keys(fx.pool(), fx.km.as_ref(), &fx.user).await.unwrap();
        let row = keycast_db::authz::find_by_id(fx.pool(), &grant.authorization.id)
            .await
            .unwrap()
            .unwrap();
        let bunker = open(fx.km.as_ref(), &row.bunker_secret_encrypted, KeyOwner::Bunker(&row.id)).unwrap();

        let mut files = Vec::new();
        for name in ["k.db", "k.db-wal"] {
            files.extend(std::fs::read(fx.dir.path().join(name)).unwrap_or_default());
        }
        let contains = |needle: &[u8]| files.windows(needle.len()).any(|w| w == needle);
        assert!(
            contains(own.public_key().to_hex().as_bytes()),
            "the scan must see stored rows"
        );
        for keys in [&own, &generated, &bunker] {
            let secret = keys.secret_key();
            assert!(!contains(secret.as_secret_bytes()), "raw secret bytes in the database");
            assert!(
                !contains(secret.to_secret_hex().as_bytes()),
                "hex secret in the database"
            );
            assert!(
                !contains(secret.to_secret_hex().to_uppercase().as_bytes()),
                "HEX secret in the database"
            );
            assert!(
                !contains(secret.to_bech32().unwrap().as_bytes()),
                "nsec in the database"
            );
        }
        for token in [grant.access_token.expose(), grant.connect_secret.expose()] {
            assert!(!contains(token.as_bytes()), "raw token in the database");
        }
    }

    #[tokio::test]
    async fn start_up_check_accepts_the_right_master_key_and_names_the_wrong_one() {
        let fx = fixture().await;
        verify_can_decrypt(fx.pool(), fx.km.as_ref()).await.unwrap();
        let other = MasterKeyManager::new(MasterKey::generate());
        let err = verify_can_decrypt(fx.pool(), &other).await.unwrap_err();
        assert!(matches!(err, KeyError::MasterKeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("does not decrypt the keys stored"), "{err}");
    }

    #[tokio::test]
    async fn start_up_check_catches_a_newer_user_key_or_a_bunker_key_under_another_master_key() {
        let fx = fixture().await;
        let other = MasterKeyManager::new(MasterKey::generate());
        // A newer user key sealed under another master key: the oldest alone would pass.
        let bob = test_user(fx.pool(), "bob@x.org").await;
        generate_user_key(fx.pool(), &other, &bob, 5).await.unwrap();
        let err = verify_can_decrypt(fx.pool(), fx.km.as_ref()).await.unwrap_err();
        assert!(matches!(err, KeyError::MasterKeyMismatch { .. }), "{err:?}");
        key_repo::delete_for_user(fx.pool(), &bob).await.unwrap();
        verify_can_decrypt(fx.pool(), fx.km.as_ref()).await.unwrap();
        // A bunker key sealed under another master key, user keys fine.
        let policy = social_policy(&fx).await;
        create_grant(fx.pool(), &other, &fx.new_grant(&policy), 6)
            .await
            .unwrap();
        let err = verify_can_decrypt(fx.pool(), fx.km.as_ref()).await.unwrap_err();
        assert!(err.to_string().contains("bunker key of authorization"), "{err}");
    }

    #[tokio::test]
    async fn start_up_check_passes_on_an_empty_database() {
        let fx = fixture().await;
        key_repo::delete_for_user(fx.pool(), &fx.user).await.unwrap();
        let other = MasterKeyManager::new(MasterKey::generate());
        verify_can_decrypt(fx.pool(), &other).await.unwrap();
    }

    #[tokio::test]
    async fn export_after_reauthentication_gives_the_same_key() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        let hash = hasher.hash(&"pw-pw-pw-pw".into()).unwrap();
        users::set_password_hash_ending_sessions(fx.pool(), &fx.user, &hash, None, 2)
            .await
            .unwrap();
        let user = users::find_by_id(fx.pool(), &fx.user).await.unwrap().unwrap();
        assert!(hasher.reauthenticate(&user, &"wrong-pw".into()).await.is_err());
        let proof = hasher.reauthenticate(&user, &"pw-pw-pw-pw".into()).await.unwrap();

        let recorded = fx.user_pubkey.to_hex();
        let nsec = export_nsec(fx.pool(), fx.km.as_ref(), &proof, &recorded).await.unwrap();
        assert!(nsec.expose().starts_with("nsec1"));
        assert_eq!(Keys::parse(nsec.expose()).unwrap().public_key(), fx.user_pubkey);
        let another = Keys::generate().public_key().to_hex();
        assert!(matches!(
            export_nsec(fx.pool(), fx.km.as_ref(), &proof, &another).await,
            Err(KeyError::ReplacedMeanwhile)
        ));

        let ncryptsec = export_ncryptsec(
            fx.pool(),
            fx.km.as_ref(),
            &proof,
            &recorded,
            &"file pass".into(),
            hasher.queue(),
        )
        .await
        .unwrap();
        assert!(ncryptsec.expose().starts_with("ncryptsec1"));
        let decrypted = EncryptedSecretKey::from_bech32(ncryptsec.expose())
            .unwrap()
            .decrypt("file pass")
            .unwrap();
        assert_eq!(Keys::new(decrypted).public_key(), fx.user_pubkey);
    }
}
