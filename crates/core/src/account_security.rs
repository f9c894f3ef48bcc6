//! What protects an account against the person who registered it before its mailbox owner
//! (issue 12, item 1: pre-registration hijacking).
//!
//! Anyone can register any email address. Until the mailbox owner proves control (a
//! verification link, or a password reset — both mailed), keycast treats the account as
//! the registrant's, not the mailbox owner's, and lets it do nothing that outlives a
//! take-over or leaks the key:
//! - [`require_verified`] gates key export, new authorizations (OAuth consent,
//!   `nostrconnect://`) and NIP-05 names;
//! - [`verify_email`] needs the account's password as well as the mailed token, so a
//!   mailbox owner who clicks a link for an account someone else registered does not hand
//!   that person a verified account (they reset the password instead);
//! - a **take-over** — every password reset, and the first verification of a never-verified
//!   account — revokes every authorization (a reset also ends every session and uses up
//!   every other reset link), and marks the key as *exposed* when the previous holder may
//!   know it: it was
//!   exported (recorded, see [`export_key`]), or it was imported by whoever registered an
//!   account that is now reset by the mailbox owner;
//! - every export is recorded (`account_events`, `keys.last_exported_at`) before the key is
//!   handed out; the HTTP layer also mails the account;
//! - an exposed key is shown on the dashboard with a way to start fresh ([`replace_key`]) or,
//!   for an owner who knows the key is theirs alone, to dismiss the warning.

use keycast_db::account_events::{self as event_repo, AccountEvent};
use keycast_db::keys::{self as key_repo, KeyOrigin, NewKey};
use keycast_db::sessions::{self as session_repo, TokenPurpose};
use keycast_db::users::{self as user_repo, User};
use keycast_db::Db;
use keycast_db::{KeyId, RepoError, UserId};
use nostr::Keys;

use crate::accounts::AccountError;
use crate::key_manager::{KeyManager, KeyOwner};
use crate::keys::{self, KeyError, UserKey};
use crate::password::{validate_new_password, PasswordHasher, Reauthenticated};
use crate::secret::{hash_token, Secret};
use crate::signer::Signer;

/// Why a key is marked exposed (`keys.exposure`).
pub mod exposure {
    /// The key was exported while someone else may have held the password.
    pub const EXPORTED: &str = "exported";
    /// The key was brought by whoever registered the account, before the mailbox owner
    /// took it over with a password reset.
    pub const IMPORTED_BEFORE_VERIFICATION: &str = "imported_before_verification";
    /// The account was never verified when keycast started recording exports (set by the
    /// schema migration): an export may have gone unrecorded.
    pub const UNVERIFIED_BEFORE_UPGRADE: &str = "unverified_before_upgrade";
}

/// What the dashboard says about an exposure `reason`.
pub fn exposure_text(reason: &str) -> &'static str {
    match reason {
        exposure::EXPORTED => {
            "This key was exported while someone else may have held your password. Whoever exported it can sign as you, forever."
        }
        exposure::IMPORTED_BEFORE_VERIFICATION => {
            "This key was brought by whoever registered this account, before you proved the email address is yours: they hold it."
        }
        _ => {
            "This key belonged to an account whose email was not verified at a time keycast did not record key exports: whoever registered the account may hold it."
        }
    }
}

/// Refuses what an account may do only once its email is verified: export the key,
/// authorize an app, claim a NIP-05 name.
///
/// # Errors
/// [`AccountError::EmailNotVerified`].
pub fn require_verified(user: &User) -> Result<(), AccountError> {
    match user.email_verified_at {
        Some(_) => Ok(()),
        None => Err(AccountError::EmailNotVerified),
    }
}

/// How the mailbox owner proved control of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TakeOver {
    PasswordReset,
    FirstVerification,
}

/// Confirms the email with the mailed `token` and the account's `password` (which the
/// registrant knows and a mailbox owner who did not register does not: they reset the
/// password instead). The token is used up only when the password is right. The first
/// verification of an account is a take-over (see the module doc).
///
/// # Errors
/// [`AccountError::InvalidToken`]; [`AccountError::WrongPassword`] (token kept);
/// [`AccountError::Password`] when hashing is busy; [`AccountError::Internal`].
pub async fn verify_email(
    signer: &Signer,
    hasher: &PasswordHasher,
    token: &str,
    password: &Secret<String>,
    now: i64,
) -> Result<UserId, AccountError> {
    let db = signer.db();
    let hash = hash_token(token);
    let user = live_token_user(db, &hash, TokenPurpose::VerifyEmail, now).await?;
    hasher
        .verify_async(password, Some(&user.password_hash))
        .await
        .map_err(|e| match AccountError::from(e) {
            AccountError::InvalidCredentials => AccountError::WrongPassword,
            other => other,
        })?;
    session_repo::redeem_user_token(db, &hash, TokenPurpose::VerifyEmail, now)
        .await?
        .ok_or(AccountError::InvalidToken)?;
    // The address is confirmed: every other link to confirm it is spent too. Each would
    // otherwise stay, for its day, a way to check guesses at the password.
    session_repo::use_up_user_tokens(db, &user.id, TokenPurpose::VerifyEmail, now).await?;
    if user.email_verified_at.is_none() {
        user_repo::mark_email_verified(db, &user.id, now).await?;
        take_over(signer, &user, TakeOver::FirstVerification, now).await?;
        event_repo::insert(db, &user.id, "email_verified", "", now).await?;
    }
    Ok(user.id)
}

/// The account a live email-confirmation `token` belongs to: whose password
/// [`verify_email`] will check (so a caller can slow down guesses at it as at login).
///
/// # Errors
/// [`AccountError::InvalidToken`]; [`AccountError::Internal`].
pub async fn verification_account(db: &Db, token: &str, now: i64) -> Result<User, AccountError> {
    live_token_user(db, &hash_token(token), TokenPurpose::VerifyEmail, now).await
}

/// Sets a new password with a mailed reset `token`: a take-over (see the module doc) that
/// also verifies the email, since the link reached the mailbox. The token is checked before
/// the password is hashed (a guessed token costs no argon2 work) and used up only after.
///
/// # Errors
/// [`AccountError::Password`] (length rules, hashing busy), [`AccountError::InvalidToken`];
/// [`AccountError::Internal`].
pub async fn reset_password(
    signer: &Signer,
    hasher: &PasswordHasher,
    token: &str,
    new_password: &Secret<String>,
    now: i64,
) -> Result<UserId, AccountError> {
    validate_new_password(new_password)?;
    let db = signer.db();
    let hash = hash_token(token);
    let user = live_token_user(db, &hash, TokenPurpose::ResetPassword, now).await?;
    let password_hash = hasher.hash_async(new_password).await?;
    session_repo::redeem_user_token(db, &hash, TokenPurpose::ResetPassword, now)
        .await?
        .ok_or(AccountError::InvalidToken)?;
    let outcome = async {
        // Fail closed: everything the previous holder could use ends before the new password
        // takes effect.
        take_over(signer, &user, TakeOver::PasswordReset, now).await?;
        hold_before_password_store().await;
        // Again with the new password: a login that checked the old one meanwhile.
        user_repo::set_password_hash_ending_sessions(db, &user.id, &password_hash, None, now).await?;
        // And the take-over again: until the line above, the old password was still the
        // account's, so a session it opened in between could still write a grant or export
        // the key. From here nothing checked against it writes (exports, key replacements
        // and deletions are conditional on the password they checked).
        take_over(signer, &user, TakeOver::PasswordReset, now).await?;
        user_repo::mark_email_verified(db, &user.id, now).await?;
        event_repo::insert(db, &user.id, "password_reset", "", now).await?;
        Ok::<(), AccountError>(())
    }
    .await;
    if let Err(failed) = outcome {
        // Every step is safe to run again: the link is given back, so the owner's retry (the
        // answer says to retry) finishes the take-over. Kept used up, it left the old
        // password working and the owner with a dead link, perhaps past their mail limit.
        if let Err(err) = session_repo::unredeem_user_token(db, &hash, TokenPurpose::ResetPassword, now).await {
            tracing::warn!(error = %err, "a reset failed part way and its link could not be given back");
        }
        return Err(failed);
    }
    Ok(user.id)
}

async fn live_token_user(
    db: &Db,
    hash: &keycast_db::TokenHash,
    purpose: TokenPurpose,
    now: i64,
) -> Result<User, AccountError> {
    let id = session_repo::find_live_user_token(db, hash, purpose, now)
        .await?
        .ok_or(AccountError::InvalidToken)?;
    user_repo::find_by_id(db, &id).await?.ok_or(AccountError::InvalidToken)
}

/// The mailbox owner takes the account over from whoever held it: authorizations revoked
/// (caches too), on a reset also sessions ended and other reset links used up, the key
/// marked exposed when the previous holder may know it. `user` is the account as it was
/// before.
async fn take_over(signer: &Signer, user: &User, how: TakeOver, now: i64) -> Result<(), AccountError> {
    let db = signer.db();
    if take_over_fails() {
        return Err(RepoError::Busy(sqlx::Error::PoolTimedOut).into());
    }
    if how == TakeOver::PasswordReset {
        // The first verification was made with the password: its sessions are the
        // verifier's own. A reset ends whatever the previous password opened — first, so
        // that a grant a session was still writing is among those revoked next, and one
        // written after finds its session gone (see the HTTP layer's
        // `SessionUser::ensure_still_live`).
        session_repo::delete_for_user(db, &user.id).await?;
        session_repo::use_up_user_tokens(db, &user.id, TokenPurpose::ResetPassword, now).await?;
    }
    let revoked = signer.revoke_all(&user.id).await?;
    if revoked > 0 {
        let why = match how {
            TakeOver::PasswordReset => "password reset",
            TakeOver::FirstVerification => "email verified",
        };
        event_repo::insert(
            db,
            &user.id,
            "authorizations_revoked",
            &format!("{revoked} ({why})"),
            now,
        )
        .await?;
    }
    if let Some(key) = key_repo::find_by_user(db, &user.id).await? {
        let reason = if key.last_exported_at.is_some() {
            Some(exposure::EXPORTED)
        } else if how == TakeOver::PasswordReset
            && user.email_verified_at.is_none()
            && key.origin == KeyOrigin::Imported
        {
            Some(exposure::IMPORTED_BEFORE_VERIFICATION)
        } else {
            None
        };
        if let Some(reason) = reason {
            key_repo::mark_exposed(db, &user.id, reason, now).await?;
        }
    }
    signer.invalidate_user(&user.id);
    Ok(())
}

/// Whether the password `proof` checked is still the account's: a reset (or a change) since
/// outranks what it was checked for.
///
/// # Errors
/// Database errors.
pub(crate) async fn password_still_current(db: &Db, proof: &Reauthenticated) -> Result<bool, RepoError> {
    Ok(user_repo::find_by_id(db, proof.user_id())
        .await?
        .is_some_and(|user| user.password_hash == proof.checked_hash()))
}

/// Why a write conditional on the checked password did nothing: the password is no longer
/// the account's, or else `otherwise`.
async fn refusal(db: &Db, proof: &Reauthenticated, otherwise: KeyError) -> Result<AccountError, RepoError> {
    Ok(match password_still_current(db, proof).await? {
        true => AccountError::Key(otherwise),
        false => AccountError::InvalidCredentials,
    })
}

/// Fault injection: a pause (ms) between a password check and the write it allows (an
/// export, a key replacement, a deletion), the window in which a reset may take the account
/// over (fail point `account-write-after-password-check`).
pub(crate) async fn hold_after_password_check() {
    crate::hold_at_fail_point("account-write-after-password-check").await;
}

/// Fault injection: a pause (ms) in a reset between the take-over and the new password's
/// store, while the old password is still the account's (fail point
/// `reset-before-password-store`).
async fn hold_before_password_store() {
    crate::hold_at_fail_point("reset-before-password-store").await;
}

/// Fault injection: the take-over fails (a busy database), part way through a reset (fail
/// point `take-over-fails`).
fn take_over_fails() -> bool {
    fail::fail_point!("take-over-fails", |_| true);
    false
}

/// The form of an exported key.
#[derive(Debug)]
pub enum ExportFormat {
    /// `nsec1…`
    Nsec,
    /// NIP-49 `ncryptsec1…` under this passphrase.
    Ncryptsec(Secret<String>),
}

impl ExportFormat {
    fn name(&self) -> &'static str {
        match self {
            ExportFormat::Nsec => "nsec",
            ExportFormat::Ncryptsec(_) => "ncryptsec",
        }
    }
}

/// Exports the re-authenticated, verified `user`'s key. The export is recorded (account
/// event, `keys.last_exported_at`) *before* the key is produced: an export that cannot be
/// recorded does not happen.
///
/// # Errors
/// [`AccountError::EmailNotVerified`]; [`AccountError::Key`] (no key, export failure,
/// hashing busy); [`AccountError::Internal`].
pub async fn export_key(
    db: &Db,
    km: &dyn KeyManager,
    queue: &crate::HashingQueue,
    user: &User,
    proof: &Reauthenticated,
    format: ExportFormat,
    now: i64,
) -> Result<Secret<String>, AccountError> {
    require_verified(user)?;
    if proof.user_id() != &user.id {
        return Err(AccountError::InvalidCredentials);
    }
    hold_after_password_check().await;
    let Some(recorded) = key_repo::mark_exported(db, &user.id, proof.checked_hash(), now).await? else {
        return Err(refusal(db, proof, KeyError::NoKey).await?);
    };
    event_repo::insert(db, &user.id, "key_exported", format.name(), now).await?;
    // Fault injection: a pause in which the key may be replaced (fail point
    // `export-after-record`).
    crate::hold_at_fail_point("export-after-record").await;
    let exported = match format {
        ExportFormat::Nsec => keys::export_nsec(db, km, proof, &recorded).await,
        ExportFormat::Ncryptsec(passphrase) => {
            keys::export_ncryptsec(db, km, proof, &recorded, &passphrase, queue).await
        }
    };
    if let Err(KeyError::ReplacedMeanwhile) = exported {
        // The account's record says "exported" above: it says what became of it too.
        event_repo::insert(
            db,
            &user.id,
            "key_export_abandoned",
            "the key was replaced meanwhile",
            now,
        )
        .await?;
    }
    Ok(exported?)
}

/// Starts fresh: replaces the re-authenticated user's key with a newly generated one and
/// revokes every authorization (they would otherwise sign with a key their apps never saw).
/// The old key's export and exposure records go with it.
///
/// # Errors
/// [`AccountError::Key`]; [`AccountError::Internal`].
pub async fn replace_key(
    signer: &Signer,
    km: &dyn KeyManager,
    proof: &Reauthenticated,
    now: i64,
) -> Result<UserKey, AccountError> {
    let db = signer.db();
    let user = proof.user_id();
    if !password_still_current(db, proof).await? {
        return Err(AccountError::InvalidCredentials);
    }
    // Past the check, so that what decides is the replacement's own condition below.
    hold_after_password_check().await;
    let old = keys::find_user_key(db, user).await?;
    let revoked = signer.revoke_all(user).await?;
    let fresh = Keys::generate();
    let key_id = KeyId::generate();
    let sealed = keys::seal(km, &fresh, KeyOwner::User(user))?;
    let new = NewKey {
        id: &key_id,
        user_id: user,
        pubkey: &fresh.public_key().to_hex(),
        encrypted_secret: &sealed,
        origin: KeyOrigin::Generated,
    };
    if !key_repo::replace(db, &new, proof.checked_hash(), now)
        .await
        .map_err(KeyError::from)?
    {
        return Err(refusal(db, proof, KeyError::NoKey).await?);
    }
    signer.invalidate_user(user);
    let detail = format!(
        "{} replaced by {}; {revoked} authorizations revoked",
        old.pubkey.to_hex(),
        fresh.public_key().to_hex()
    );
    event_repo::insert(db, user, "key_replaced", &detail, now).await?;
    Ok(UserKey {
        key_id,
        pubkey: fresh.public_key(),
        origin: KeyOrigin::Generated,
    })
}

/// The owner says the key is theirs alone: the exposure warning goes away (recorded).
/// Returns whether there was one.
///
/// # Errors
/// [`AccountError::Internal`].
pub async fn dismiss_exposure(db: &Db, user: &UserId, now: i64) -> Result<bool, AccountError> {
    let cleared = key_repo::clear_exposure(db, user).await?;
    if cleared {
        event_repo::insert(db, user, "exposure_dismissed", "", now).await?;
    }
    Ok(cleared)
}

/// Whether and why the user's key is marked exposed: `(since, reason)`.
///
/// # Errors
/// [`AccountError::Internal`].
pub async fn key_exposure(db: &Db, user: &UserId) -> Result<Option<(i64, String)>, AccountError> {
    let key = key_repo::find_by_user(db, user).await?;
    Ok(key.and_then(|k| Some((k.exposed_at?, k.exposure.unwrap_or_default()))))
}

/// The newest `limit` account events of `user` (exports, resets, take-overs).
///
/// # Errors
/// [`AccountError::Internal`].
pub async fn account_events(db: &Db, user: &UserId, limit: i64) -> Result<Vec<AccountEvent>, AccountError> {
    Ok(event_repo::list_for_user(db, user, limit).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::{issue_mail_token, login, register, session_user, Registration};
    use crate::authz::create_grant;
    use crate::testing::{fast_hasher, fixture, social_policy, Fixture};
    use crate::SignerOptions;
    use std::sync::Arc;

    fn signer(fx: &Fixture) -> Signer {
        Signer::new(fx.pool().clone(), fx.km.clone(), SignerOptions::default())
    }

    async fn registered(fx: &Fixture, hasher: &PasswordHasher, email: &str, import: Option<&Keys>) -> User {
        let reg = Registration {
            email: email.into(),
            password: "correct horse".into(),
            import_key: import.map(|k| Secret::new(k.secret_key().to_secret_hex())),
        };
        register(fx.pool(), fx.km.as_ref(), hasher, &reg, 1).await.unwrap().user
    }

    #[tokio::test]
    async fn verification_needs_the_password_and_keeps_the_token_when_it_is_wrong() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        let user = registered(&fx, &hasher, "b@x.org", None).await;
        let signer = signer(&fx);
        let token = issue_mail_token(fx.pool(), &user.id, TokenPurpose::VerifyEmail, 2)
            .await
            .unwrap();
        let wrong = verify_email(&signer, &hasher, token.expose(), &"not it at all".into(), 3).await;
        assert!(matches!(wrong, Err(AccountError::WrongPassword)), "{wrong:?}");
        assert!(require_verified(&user_repo::find_by_id(fx.pool(), &user.id).await.unwrap().unwrap()).is_err());
        verify_email(&signer, &hasher, token.expose(), &"correct horse".into(), 4)
            .await
            .unwrap();
        let user = user_repo::find_by_id(fx.pool(), &user.id).await.unwrap().unwrap();
        assert_eq!(user.email_verified_at, Some(4));
        let again = verify_email(&signer, &hasher, token.expose(), &"correct horse".into(), 5).await;
        assert!(matches!(again, Err(AccountError::InvalidToken)), "{again:?}");
    }

    #[tokio::test]
    async fn a_reset_takes_the_account_over_from_whoever_held_it() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        let planted = Keys::generate();
        let user = registered(&fx, &hasher, "victim@x.org", Some(&planted)).await;
        let signer = signer(&fx);
        // A grant from before the rules (or through a bug): it must not survive.
        let policy = social_policy(&fx).await;
        let mut grant = fx.new_grant(&policy);
        grant.user_id = &user.id;
        let grant = create_grant(fx.pool(), fx.km.as_ref(), &grant, 2).await.unwrap();
        let (_, session) = login(fx.pool(), &hasher, "victim@x.org", &"correct horse".into(), 2)
            .await
            .unwrap();
        let older = issue_mail_token(fx.pool(), &user.id, TokenPurpose::ResetPassword, 2)
            .await
            .unwrap();
        let token = issue_mail_token(fx.pool(), &user.id, TokenPurpose::ResetPassword, 3)
            .await
            .unwrap();

        reset_password(&signer, &hasher, token.expose(), &"mine now!".into(), 4)
            .await
            .unwrap();
        let row = keycast_db::authz::find_by_id(fx.pool(), &grant.authorization.id)
            .await
            .unwrap()
            .unwrap();
        assert!(row.revoked_at.is_some(), "the registrant's authorization is revoked");
        assert!(signer.authorize_token(grant.access_token.expose()).await.is_err());
        assert_eq!(session_user(fx.pool(), session.token.expose(), 5).await.unwrap(), None);
        let other = reset_password(&signer, &hasher, older.expose(), &"theirs again".into(), 5).await;
        assert!(
            matches!(other, Err(AccountError::InvalidToken)),
            "an older reset link is dead"
        );
        let user = user_repo::find_by_id(fx.pool(), &user.id).await.unwrap().unwrap();
        assert_eq!(user.email_verified_at, Some(4), "the reset link reached the mailbox");
        let exposure = key_exposure(fx.pool(), &user.id).await.unwrap();
        assert_eq!(exposure, Some((4, exposure::IMPORTED_BEFORE_VERIFICATION.to_owned())));

        let proof = hasher.reauthenticate(&user, &"mine now!".into()).await.unwrap();
        let fresh = replace_key(&signer, fx.km.as_ref(), &proof, 6).await.unwrap();
        assert_ne!(fresh.pubkey, planted.public_key());
        assert_eq!(key_exposure(fx.pool(), &user.id).await.unwrap(), None);
        let events: Vec<String> = account_events(fx.pool(), &user.id, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect();
        // Newest first; the reset's two events share a second, so their order is free.
        assert_eq!(events[0], "key_replaced");
        let mut reset: Vec<&str> = events[1..].iter().map(String::as_str).collect();
        reset.sort_unstable();
        assert_eq!(reset, ["authorizations_revoked", "password_reset"]);
    }

    #[tokio::test]
    async fn export_needs_a_verified_email_and_is_recorded_first() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        let user = registered(&fx, &hasher, "c@x.org", None).await;
        let proof = hasher.reauthenticate(&user, &"correct horse".into()).await.unwrap();
        let refused = export_key(
            fx.pool(),
            fx.km.as_ref(),
            hasher.queue(),
            &user,
            &proof,
            ExportFormat::Nsec,
            2,
        )
        .await;
        assert!(matches!(refused, Err(AccountError::EmailNotVerified)), "{refused:?}");
        assert!(account_events(fx.pool(), &user.id, 10).await.unwrap().is_empty());

        user_repo::mark_email_verified(fx.pool(), &user.id, 3).await.unwrap();
        let user = user_repo::find_by_id(fx.pool(), &user.id).await.unwrap().unwrap();
        let nsec = export_key(
            fx.pool(),
            fx.km.as_ref(),
            hasher.queue(),
            &user,
            &proof,
            ExportFormat::Nsec,
            4,
        )
        .await
        .unwrap();
        assert!(nsec.expose().starts_with("nsec1"));
        let events = account_events(fx.pool(), &user.id, 10).await.unwrap();
        assert_eq!(
            (events[0].event.as_str(), events[0].detail.as_str()),
            ("key_exported", "nsec")
        );

        // A later reset marks the exported key as exposed.
        let signer = signer(&fx);
        let token = issue_mail_token(fx.pool(), &user.id, TokenPurpose::ResetPassword, 5)
            .await
            .unwrap();
        reset_password(&signer, &hasher, token.expose(), &"brand new pw".into(), 6)
            .await
            .unwrap();
        let exposure = key_exposure(fx.pool(), &user.id).await.unwrap();
        assert_eq!(exposure, Some((6, exposure::EXPORTED.to_owned())));
        assert!(dismiss_exposure(fx.pool(), &user.id, 7).await.unwrap());
        assert_eq!(key_exposure(fx.pool(), &user.id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_registrant_who_verifies_their_own_generated_key_sees_no_exposure() {
        let fx = fixture().await;
        let hasher = fast_hasher();
        let user = registered(&fx, &hasher, "d@x.org", None).await;
        let signer = Arc::new(signer(&fx));
        let token = issue_mail_token(fx.pool(), &user.id, TokenPurpose::VerifyEmail, 2)
            .await
            .unwrap();
        verify_email(&signer, &hasher, token.expose(), &"correct horse".into(), 3)
            .await
            .unwrap();
        assert_eq!(key_exposure(fx.pool(), &user.id).await.unwrap(), None);
    }
}
