//! Accounts: registration (with a generated or imported key), login, sessions, and the
//! single-use tokens mailed for email verification and password reset.
//!
//! Session cookies and mailed tokens are [`random_token`]s stored only as hashes.
//! Sending mail and setting cookies are the HTTP layer's job; this module hands back the
//! raw token exactly once.

use keycast_db::sessions::{self as session_repo, TokenPurpose};
use keycast_db::users::{self as user_repo, NewUser, User};
use keycast_db::Db;
use keycast_db::{RepoError, UserId};

use crate::key_manager::KeyManager;
use crate::keys::{self, KeyError, UserKey};
use crate::password::{validate_new_password, PasswordError, PasswordHasher};
use crate::secret::{hash_token, random_token, Secret};

/// Life of a login session: 30 days (seconds).
pub const SESSION_TTL_SECS: i64 = 30 * 24 * 3600;
/// Sessions an account keeps: a new one ends the oldest beyond this. Logins come from many
/// addresses (rate limits are per client), and each session is a row for 30 days.
pub const MAX_SESSIONS_PER_ACCOUNT: u32 = 50;
/// Life of an email-verification token: 24 hours (seconds).
pub const VERIFY_EMAIL_TTL_SECS: i64 = 24 * 3600;
/// Life of a password-reset token: 1 hour (seconds).
pub const RESET_PASSWORD_TTL_SECS: i64 = 3600;

/// Why an account operation failed. The `Display` text is safe to show the user, except
/// for [`AccountError::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the email address is not valid")]
    InvalidEmail,
    #[error("an account with this email already exists")]
    EmailTaken,
    /// Wrong email or password (deliberately not saying which).
    #[error("wrong email or password")]
    InvalidCredentials,
    /// A mailed token that is unknown, used, expired or for another purpose.
    #[error("the link is invalid or has expired")]
    InvalidToken,
    /// The email is not verified yet, and the action needs it (key export, a new
    /// authorization, a NIP-05 name).
    #[error(
        "confirm your email address first: open the link keycast mailed you (the dashboard sends a new one); \
         until then keycast does not export keys, authorize apps or give out NIP-05 names"
    )]
    EmailNotVerified,
    /// Confirming an email needs the account's password as well as the link.
    #[error(
        "that is not this account's password; if you did not create this keycast account, someone else did \
         with your address: use \"Forgot your password?\" to take it over"
    )]
    WrongPassword,
    #[error(transparent)]
    Password(PasswordError),
    /// Import problems ([`KeyError::InvalidImport`], [`KeyError::KeyTaken`]) and key
    /// storage failures.
    #[error(transparent)]
    Key(KeyError),
    #[error("internal error")]
    Internal(#[source] RepoError),
}

impl From<RepoError> for AccountError {
    fn from(err: RepoError) -> Self {
        AccountError::Internal(err)
    }
}

impl From<PasswordError> for AccountError {
    fn from(err: PasswordError) -> Self {
        match err {
            PasswordError::Mismatch => AccountError::InvalidCredentials,
            other => AccountError::Password(other),
        }
    }
}

impl From<KeyError> for AccountError {
    fn from(err: KeyError) -> Self {
        AccountError::Key(err)
    }
}

/// A new session's cookie value (shown once) and expiry.
#[derive(Debug)]
pub struct NewSession {
    pub token: Secret<String>,
    pub expires_at: i64,
}

/// What registration needs.
#[derive(Debug)]
pub struct Registration {
    pub email: String,
    pub password: Secret<String>,
    /// The user's own key (`nsec1…` or hex); `None` generates one.
    pub import_key: Option<Secret<String>>,
}

/// A registered account, its key and its first session.
#[derive(Debug)]
pub struct Registered {
    pub user: User,
    pub key: UserKey,
    pub session: NewSession,
}

/// Longest NIP-05 username, in characters.
pub const MAX_USERNAME_CHARS: usize = 64;

/// NIP-05 names nobody may claim (issue 12, item 9): `_` is shown by clients as the bare
/// domain (`@keycast.example`), and the rest read as the operator speaking. The operator
/// adds their own with `KEYCAST_RESERVED_USERNAMES`.
pub const RESERVED_USERNAMES: &[&str] = &[
    "_",
    "abuse",
    "admin",
    "administrator",
    "api",
    "billing",
    "bunker",
    "contact",
    "help",
    "hostmaster",
    "info",
    "keycast",
    "mail",
    "mod",
    "moderator",
    "no-reply",
    "noreply",
    "nostr",
    "official",
    "operator",
    "owner",
    "postmaster",
    "root",
    "security",
    "signer",
    "staff",
    "support",
    "sysadmin",
    "system",
    "team",
    "verified",
    "webmaster",
    "www",
];

/// Why a NIP-05 username cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("a username is 1 to {MAX_USERNAME_CHARS} characters of a-z, 0-9, '.', '_' and '-', with at least one letter or digit, not starting with '_'")]
    Invalid,
    #[error("the username {0:?} is reserved")]
    Reserved(String),
}

/// Trims and lowercases a wanted NIP-05 username and checks it: its shape, and that it is
/// neither a built-in reserved name nor one of `extra_reserved` (lowercase).
///
/// # Errors
/// [`UsernameError`].
pub fn validate_username(wanted: &str, extra_reserved: &[String]) -> Result<String, UsernameError> {
    let name = wanted.trim().to_lowercase();
    let shape = (1..=MAX_USERNAME_CHARS).contains(&name.chars().count())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if name == "_" || is_reserved(&name, extra_reserved) {
        return Err(UsernameError::Reserved(name));
    }
    let meaningful = name.bytes().any(|b| b.is_ascii_alphanumeric()) && !name.starts_with('_');
    if !shape || !meaningful {
        return Err(UsernameError::Invalid);
    }
    Ok(name)
}

/// Whether `name` (lowercase) is reserved, built in or by the operator.
pub fn is_reserved(name: &str, extra_reserved: &[String]) -> bool {
    RESERVED_USERNAMES.contains(&name) || extra_reserved.iter().any(|r| r == name)
}

/// Trims and lowercases an email and checks its shape (one `@`, non-empty parts, no
/// spaces, at most 254 bytes): how an address names an account (login, mail links, the
/// operator's lookup). A new account's address must also pass [`new_email`].
///
/// # Errors
/// [`AccountError::InvalidEmail`].
pub fn normalize_email(email: &str) -> Result<String, AccountError> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    valid.then_some(email).ok_or(AccountError::InvalidEmail)
}

/// [`normalize_email`] for an account's new address, which must hold none of the characters
/// that make a mailbox out of an address: a mailer reads `"name" <addr>` as mail to `addr`
/// (under a name the registrant chose), and `a@x,b@y` as two. Accounts registered before this
/// rule keep their address: they still log in and get mail links (sent to the address alone).
///
/// # Errors
/// [`AccountError::InvalidEmail`].
pub fn new_email(email: &str) -> Result<String, AccountError> {
    let email = normalize_email(email)?;
    let mailbox_syntax = crate::shown::disguised(&email) || email.chars().any(|c| "<>()[]\\,;:\"".contains(c));
    // Dot-atoms, as a mailer reads them: `user@example.org.` or `a..b@x.org` were accepted,
    // and the account could never be sent its verification or a reset link.
    let dot_atoms = email
        .split_once('@')
        .is_some_and(|(local, domain)| local.split('.').chain(domain.split('.')).all(|atom| !atom.is_empty()));
    (!mailbox_syntax && dot_atoms)
        .then_some(email)
        .ok_or(AccountError::InvalidEmail)
}

/// Creates an account with its key (imported or generated) and a session. Nothing is
/// left behind if the key cannot be stored.
///
/// # Errors
/// [`AccountError::InvalidEmail`], [`AccountError::EmailTaken`],
/// [`AccountError::Password`] (length rules), [`AccountError::Key`] with
/// [`KeyError::InvalidImport`] or [`KeyError::KeyTaken`]; [`AccountError::Internal`].
pub async fn register(
    db: &Db,
    km: &dyn KeyManager,
    hasher: &PasswordHasher,
    registration: &Registration,
    now: i64,
) -> Result<Registered, AccountError> {
    let email = new_email(&registration.email)?;
    validate_new_password(&registration.password)?;
    let imported = registration.import_key.as_ref().map(keys::parse_import).transpose()?;
    let password_hash = hasher.hash_async(&registration.password).await?;
    let new = NewUser {
        email: &email,
        password_hash: &password_hash,
        username: None,
    };
    let user = user_repo::insert(db, &new, now).await.map_err(|e| {
        if e.is_duplicate_of("email") {
            AccountError::EmailTaken
        } else {
            e.into()
        }
    })?;
    let stored = match &imported {
        Some(keys) => keys::store_user_key(db, km, &user.id, keys, keycast_db::keys::KeyOrigin::Imported, now).await,
        None => keys::generate_user_key(db, km, &user.id, now).await,
    };
    let key = match stored {
        Ok(key) => key,
        Err(err) => {
            user_repo::delete(db, &user.id).await?;
            return Err(err.into());
        }
    };
    let session = create_session(db, &user.id, now).await?;
    Ok(Registered { user, key, session })
}

/// Checks email and password and opens a session. An unknown email costs the same time
/// as a wrong password.
///
/// # Errors
/// [`AccountError::InvalidCredentials`]; [`AccountError::Internal`].
pub async fn login(
    db: &Db,
    hasher: &PasswordHasher,
    email: &str,
    password: &Secret<String>,
    now: i64,
) -> Result<(User, NewSession), AccountError> {
    let user = match normalize_email(email) {
        Ok(email) => user_repo::find_by_email(db, &email).await?,
        Err(_) => None,
    };
    hasher
        .verify_async(password, user.as_ref().map(|u| u.password_hash.as_str()))
        .await?;
    let user = user.ok_or(AccountError::InvalidCredentials)?;
    if let Some(ms) = held_after_password_check() {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    // The password was checked against the hash read before the wait for the hasher: a
    // reset or change since then has ended every session and must not see a new one.
    let session = open_session(db, &user.id, Some(&user.password_hash), now)
        .await?
        .ok_or(AccountError::InvalidCredentials)?;
    Ok((user, session))
}

/// Milliseconds the tests hold a login between its password check and its session (fail
/// point `login-after-password-check`, `return(<ms>)`); always `None` without fault injection.
fn held_after_password_check() -> Option<u64> {
    fail::fail_point!("login-after-password-check", |ms| crate::held_at_fail_point(
        "login-after-password-check",
        ms
    ));
    None
}

/// Milliseconds the tests hold a password change between its checks and its write (fail
/// point `password-change-before-store`, `return(<ms>)`); always `None` without fault injection.
fn held_before_password_change() -> Option<u64> {
    fail::fail_point!("password-change-before-store", |ms| crate::held_at_fail_point(
        "password-change-before-store",
        ms
    ));
    None
}

/// Opens a session for `user`.
///
/// # Errors
/// Storage errors.
pub async fn create_session(db: &Db, user: &UserId, now: i64) -> Result<NewSession, RepoError> {
    Ok(open_session(db, user, None, now)
        .await?
        .expect("a session without a password condition is always opened"))
}

/// Opens a session for `user`; with `checked`, only while its password hash is still that
/// one (`None` otherwise).
async fn open_session(
    db: &Db,
    user: &UserId,
    checked: Option<&str>,
    now: i64,
) -> Result<Option<NewSession>, RepoError> {
    let token = random_token();
    let expires_at = now + SESSION_TTL_SECS;
    let opened = session_repo::insert(
        db,
        &hash_token(token.expose()),
        user,
        checked,
        now,
        expires_at,
        MAX_SESSIONS_PER_ACCOUNT,
    )
    .await?;
    Ok(opened.then_some(NewSession { token, expires_at }))
}

/// The user of a live session cookie.
///
/// # Errors
/// Storage errors.
pub async fn session_user(db: &Db, token: &str, now: i64) -> Result<Option<User>, RepoError> {
    match session_repo::find_live_by_hash(db, &hash_token(token), now).await? {
        Some(session) => user_repo::find_by_id(db, &session.user_id).await,
        None => Ok(None),
    }
}

/// Ends a session. Returns false if it did not exist.
///
/// # Errors
/// Storage errors.
pub async fn logout(db: &Db, token: &str) -> Result<bool, RepoError> {
    session_repo::delete(db, &hash_token(token)).await
}

/// Changes the re-authenticated user's password. Every session ends (the changer's too:
/// whoever shares its cookie must not keep it) as the new password takes effect, in one
/// transaction: whoever knew the old password keeps nothing it opened, not even a login
/// still checking it. The changer gets a new session,
/// returned with how many *other* sessions ended. Reset links stay usable: they reach only the
/// mailbox, the root of trust, and a reset outranks a change — were they used up, whoever
/// holds the password (a squatter on the owner's address) could change it in a loop and no
/// link the owner asks for would ever work.
/// Apps keep their authorizations (they never held the password); an owner who suspects
/// more than a leaked password revokes them, or resets the password, which does. Recorded
/// in the account's events.
///
/// # Errors
/// [`AccountError::Password`] (length rules, hashing busy); storage errors.
pub async fn change_password(
    db: &Db,
    hasher: &PasswordHasher,
    proof: &crate::Reauthenticated,
    new_password: &Secret<String>,
    now: i64,
) -> Result<(u64, NewSession), AccountError> {
    validate_new_password(new_password)?;
    let password_hash = hasher.hash_async(new_password).await?;
    let user = proof.user_id();
    if let Some(ms) = held_before_password_change() {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    // The changer's own session is one of them. None: the password checked is no longer the
    // account's (a reset meanwhile, which outranks this), or the account is gone.
    let ended = user_repo::set_password_hash_ending_sessions(db, user, &password_hash, Some(proof.checked_hash()), now)
        .await?
        .ok_or(AccountError::InvalidCredentials)?;
    let others = ended.saturating_sub(1);
    let detail = format!("{others} other session{} ended", if others == 1 { "" } else { "s" });
    keycast_db::account_events::insert(db, user, "password_changed", &detail, now).await?;
    // Under the password just set: a reset in between ends it first.
    let session = open_session(db, user, Some(&password_hash), now)
        .await?
        .ok_or(AccountError::InvalidCredentials)?;
    Ok((others, session))
}

/// Deletes the re-authenticated user's account, for good. Every authorization is revoked
/// first, through the signer (every cache here and on every other instance drops it, and
/// NIP-46 stops serving its bunker); then the user row goes and, by cascade, the key,
/// sessions, tokens, custom policies, authorizations, their activity and the account's
/// events. Two steps that fail closed: a crash between them leaves an account whose apps
/// are all disconnected, which the owner deletes again. Only while the password `proof`
/// checked is still the account's: a reset meanwhile outranks the deletion.
///
/// # Errors
/// [`AccountError::InvalidCredentials`] when the password changed since it was checked (or
/// the account is gone); storage errors.
pub async fn delete_account(signer: &crate::Signer, proof: &crate::Reauthenticated) -> Result<(), AccountError> {
    // A reset since the password was checked outranks the deletion: checked first, and again
    // by the deletion itself (a reset may land in between).
    if !crate::account_security::password_still_current(signer.db(), proof).await? {
        return Err(AccountError::InvalidCredentials);
    }
    crate::account_security::hold_after_password_check().await;
    let deleted = erase(signer, proof.user_id(), Some(proof.checked_hash()), "owner").await?;
    if !deleted && user_repo::find_by_id(signer.db(), proof.user_id()).await?.is_some() {
        return Err(AccountError::InvalidCredentials);
    }
    Ok(())
}

/// Deletes `user`'s account on the operator's word (the admin API, which authenticated the
/// operator): the same steps as [`delete_account`], for an owner who lost both password
/// and mailbox, or an account the operator must remove. False if there was no such
/// account.
///
/// # Errors
/// Storage errors.
pub async fn delete_account_as_operator(signer: &crate::Signer, user: &UserId) -> Result<bool, AccountError> {
    Ok(erase(signer, user, None, "operator").await?)
}

/// Revokes `user`'s authorizations, then deletes the account — only while its password hash
/// is still `checked`, when given.
async fn erase(
    signer: &crate::Signer,
    user: &UserId,
    checked: Option<&str>,
    by: &'static str,
) -> Result<bool, RepoError> {
    let revoked = signer.revoke_all(user).await?;
    let deleted = match checked {
        Some(hash) => user_repo::delete_with_password(signer.db(), user, hash).await?,
        None => user_repo::delete(signer.db(), user).await?,
    };
    signer.invalidate_user(user);
    if deleted {
        // The one trace left of the account: what an operator looks for after a
        // point-in-time recovery to before it (see OPERATIONS.md, section 8).
        tracing::info!(user_id = %user, authorizations_revoked = revoked, by, "account deleted");
    }
    Ok(deleted)
}

/// How an operator names an account.
#[derive(Debug, Clone)]
pub enum AccountRef {
    Id(UserId),
    /// As given: normalized here as at registration.
    Email(String),
    /// The NIP-05 name, lowercase.
    Username(String),
    Pubkey(nostr::PublicKey),
}

/// What an operator is shown of an account: who it is, never its password hash or key
/// material.
#[derive(Debug, Clone)]
pub struct AccountSummary {
    pub user: User,
    /// `None` only for an account caught between its row and its key (a crash during
    /// registration).
    pub pubkey: Option<nostr::PublicKey>,
    /// Authorizations not revoked (some may have run out of time).
    pub live_authorizations: usize,
}

/// Finds the account `by` names, for the operator.
///
/// # Errors
/// Storage errors; a stored public key that does not parse.
pub async fn find_for_operator(db: &Db, by: &AccountRef) -> Result<Option<AccountSummary>, AccountError> {
    let user = match by {
        AccountRef::Id(id) => user_repo::find_by_id(db, id).await?,
        AccountRef::Email(email) => match normalize_email(email) {
            Ok(email) => user_repo::find_by_email(db, &email).await?,
            Err(_) => None,
        },
        AccountRef::Username(name) => user_repo::find_by_username(db, &name.trim().to_lowercase()).await?,
        AccountRef::Pubkey(pubkey) => match keycast_db::keys::find_by_pubkey(db, &pubkey.to_hex()).await? {
            Some(key) => user_repo::find_by_id(db, &key.user_id).await?,
            None => None,
        },
    };
    let Some(user) = user else { return Ok(None) };
    let pubkey = match keycast_db::keys::find_by_user(db, &user.id).await? {
        Some(stored) => {
            Some(nostr::PublicKey::from_hex(&stored.pubkey).map_err(|_| AccountError::Key(KeyError::CorruptKey))?)
        }
        None => None,
    };
    let now = keycast_db::now_unix();
    let live_authorizations = keycast_db::authz::list_for_user(db, &user.id, now)
        .await?
        .iter()
        .filter(|a| {
            let ended = crate::terms::GrantTerms::from_json(a.terms.as_deref())
                .map(|terms| terms.check_expiry(now).is_err())
                .unwrap_or(false);
            a.revoked_at.is_none() && !ended
        })
        .count();
    Ok(Some(AccountSummary {
        user,
        pubkey,
        live_authorizations,
    }))
}

/// Issues a single-use token to mail to `user` (link in the email).
///
/// # Errors
/// Storage errors.
pub async fn issue_mail_token(
    db: &Db,
    user: &UserId,
    purpose: TokenPurpose,
    now: i64,
) -> Result<Secret<String>, RepoError> {
    let ttl = match purpose {
        TokenPurpose::VerifyEmail => VERIFY_EMAIL_TTL_SECS,
        TokenPurpose::ResetPassword => RESET_PASSWORD_TTL_SECS,
    };
    let token = random_token();
    session_repo::insert_user_token(db, &hash_token(token.expose()), user, purpose, now, now + ttl).await?;
    Ok(token)
}

/// Whether a mailed token would still redeem for `purpose` (without using it up), so a page
/// can explain a dead link at once.
///
/// # Errors
/// Storage errors.
pub async fn mail_token_is_live(db: &Db, token: &str, purpose: TokenPurpose, now: i64) -> Result<bool, RepoError> {
    session_repo::is_live_user_token(db, &hash_token(token), purpose, now).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fast_hasher, fixture};
    use nostr::nips::nip19::ToBech32;

    fn registration(email: &str, key: Option<&str>) -> Registration {
        Registration {
            email: email.into(),
            password: "correct horse".into(),
            import_key: key.map(Secret::from),
        }
    }

    #[test]
    fn emails_are_normalised_and_malformed_ones_refused() {
        assert_eq!(normalize_email("  Bob@Example.COM ").unwrap(), "bob@example.com");
        assert_eq!(new_email("  Bob@Example.COM ").unwrap(), "bob@example.com");
        for bad in ["", "bob", "@x.org", "bob@", "b ob@x.org", "a@b@c"] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
        // A new account's address, not an older one's.
        for bad in [
            "\"x\"<bob@x.org>",
            "<bob@x.org>",
            "a@x.org,bob@x.org",
            "bob@x.org;",
            "bob(c)@x.org",
            "bob@x.org\u{0}",
            // No mailer sends to these: the account could never get a link.
            "bob@example.org.",
            "a..b@x.org",
            ".bob@x.org",
            "bob.@x.org",
            "bob@x..org",
        ] {
            assert!(new_email(bad).is_err(), "{bad:?}");
        }
        assert!(new_email("bob.smith+tag@mail.example.org").is_ok());
        assert!(new_email("dev@localhost").is_ok());
        assert_eq!(
            normalize_email("\"x\"<Bob@x.org>").unwrap(),
            "\"x\"<bob@x.org>",
            "an older account's address still names it"
        );
    }

    #[test]
    fn usernames_are_normalised_and_reserved_or_meaningless_ones_refused() {
        let extra = vec!["acme".to_owned()];
        assert_eq!(validate_username(" Alice.B ", &extra).unwrap(), "alice.b");
        for reserved in ["_", "Admin", "keycast", "postmaster", "acme"] {
            assert!(
                matches!(validate_username(reserved, &extra), Err(UsernameError::Reserved(_))),
                "{reserved}"
            );
        }
        for bad in [
            "",
            "..",
            "-_-",
            "_hidden",
            "no spaces",
            &"a".repeat(MAX_USERNAME_CHARS + 1),
        ] {
            assert_eq!(validate_username(bad, &extra), Err(UsernameError::Invalid), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn register_generates_a_key_and_opens_a_session() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        let reg = register(fx.pool(), fx.km.as_ref(), &hasher, &registration("Bob@x.org", None), 10)
            .await
            .unwrap();
        assert_eq!(reg.user.email, "bob@x.org");
        assert_eq!(reg.key.origin, keycast_db::keys::KeyOrigin::Generated);
        let found = session_user(fx.pool(), reg.session.token.expose(), 11).await.unwrap();
        assert_eq!(found.map(|u| u.id), Some(reg.user.id));
    }

    #[tokio::test]
    async fn register_imports_an_nsec_with_its_pubkey() {
        let fx = fixture().await;
        let own = nostr::Keys::generate();
        let nsec = own.secret_key().to_bech32().unwrap();
        let reg = register(
            fx.pool(),
            fx.km.as_ref(),
            &fast_hasher(),
            &registration("b@x.org", Some(&nsec)),
            1,
        )
        .await
        .unwrap();
        assert_eq!(reg.key.pubkey, own.public_key());
        assert_eq!(reg.key.origin, keycast_db::keys::KeyOrigin::Imported);
    }

    #[tokio::test]
    async fn register_with_a_taken_key_leaves_no_account_behind() {
        let fx = fixture().await;
        let hex = nostr::Keys::generate().secret_key().to_secret_hex();
        let hasher = fast_hasher();
        register(
            fx.pool(),
            fx.km.as_ref(),
            &hasher,
            &registration("a1@x.org", Some(&hex)),
            1,
        )
        .await
        .unwrap();
        let err = register(
            fx.pool(),
            fx.km.as_ref(),
            &hasher,
            &registration("a2@x.org", Some(&hex)),
            1,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AccountError::Key(KeyError::KeyTaken)), "{err:?}");
        assert!(user_repo::find_by_email(fx.pool(), "a2@x.org").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn register_refuses_bad_import_duplicate_email_and_short_password() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        let bad = register(
            fx.pool(),
            fx.km.as_ref(),
            &hasher,
            &registration("c@x.org", Some("npub1xyz")),
            1,
        )
        .await;
        assert!(matches!(bad, Err(AccountError::Key(KeyError::InvalidImport))));
        let dup = register(
            fx.pool(),
            fx.km.as_ref(),
            &hasher,
            &registration("alice@example.com", None),
            1,
        )
        .await;
        assert!(matches!(dup, Err(AccountError::EmailTaken)));
        let short = Registration {
            password: "short".into(),
            ..registration("d@x.org", None)
        };
        let short = register(fx.pool(), fx.km.as_ref(), &hasher, &short, 1).await;
        assert!(matches!(short, Err(AccountError::Password(PasswordError::TooShort))));
    }

    #[tokio::test]
    async fn login_needs_the_right_password_and_says_nothing_about_emails() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        register(fx.pool(), fx.km.as_ref(), &hasher, &registration("b@x.org", None), 1)
            .await
            .unwrap();
        let (user, session) = login(fx.pool(), &hasher, " B@x.org", &"correct horse".into(), 2)
            .await
            .unwrap();
        assert_eq!(user.email, "b@x.org");
        assert!(logout(fx.pool(), session.token.expose()).await.unwrap());
        assert_eq!(session_user(fx.pool(), session.token.expose(), 3).await.unwrap(), None);
        let wrong = login(fx.pool(), &hasher, "b@x.org", &"wrong horse".into(), 2)
            .await
            .unwrap_err();
        let unknown = login(fx.pool(), &hasher, "zz@x.org", &"correct horse".into(), 2)
            .await
            .unwrap_err();
        assert_eq!(wrong.to_string(), unknown.to_string());
        assert!(matches!(unknown, AccountError::InvalidCredentials));
    }
}
