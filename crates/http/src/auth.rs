//! Accounts over HTTP: register, log in and out, verify the email, reset the password.
//!
//! Handlers are thin: rate-limit, call `keycast_core::accounts`, set or clear the session
//! cookie. Mail goes out through [`AppState::send_mail`] (SMTP or the development outbox,
//! see [`crate::mail`]) without waiting for delivery. The pages (`pages.rs`) call the same
//! shared functions, so limits and behaviour are the same in both.

use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use keycast_core::account_security;
use keycast_core::accounts::{self, Registration};
use keycast_core::keys;
use keycast_core::nostr::nips::nip19::ToBech32;
use keycast_core::nostr::PublicKey;
use keycast_core::Secret;
use keycast_db::sessions::TokenPurpose;
use keycast_db::users::{self as user_repo, User};
use keycast_db::{now_unix, Db};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::extract::{ClientIp, JsonBody, OverHttps};
use crate::limit::{LOGIN_PER_IP, MAIL_PER_EMAIL, MAIL_PER_IP, REGISTER_PER_IP, RESET_PER_IP};
use crate::mail::Mail;
use crate::session::{clear_cookie, session_cookie, session_token};
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/auth/register", post(register))
        .route("/api/auth/login", post(login))
        .route("/api/auth/logout", post(logout))
        .route("/api/auth/verify-email", post(verify_email))
        .route("/api/auth/resend-verification", post(resend_verification))
        .route("/api/auth/forgot-password", post(forgot_password))
        .route("/api/auth/reset-password", post(reset_password))
}

#[derive(Deserialize)]
struct RegisterBody {
    email: String,
    password: String,
    /// The user's own key, `nsec1…` or hex; omitted → keycast generates one.
    #[serde(default)]
    nsec: Option<String>,
}

/// `POST /api/auth/register` → 201 `{user_id, email, pubkey, npub}` + session cookie.
async fn register(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Response, AppError> {
    let (user, pubkey, cookie) = sign_up(&state, &ip, secure, body.email, body.password, body.nsec).await?;
    let body = account_json(&user, &pubkey);
    Ok((StatusCode::CREATED, [(SET_COOKIE, cookie)], Json(body)).into_response())
}

/// Rate-limits, creates the account (importing `nsec` when given and not blank), queues
/// the verification mail and opens a session (shared with the register page).
pub(crate) async fn sign_up(
    state: &AppState,
    ip: &str,
    secure: bool,
    email: String,
    password: String,
    nsec: Option<String>,
) -> Result<(User, PublicKey, axum::http::HeaderValue), AppError> {
    state.limits().check(&format!("register:{ip}"), REGISTER_PER_IP).await?;
    let (db, services) = state.api()?;
    state.ensure_writable().await?;
    let registration = Registration {
        email,
        password: Secret::new(password),
        import_key: nsec.filter(|k| !k.trim().is_empty()).map(Secret::new),
    };
    let now = now_unix();
    let done = accounts::register(db, services.keys.as_ref(), &services.hasher, &registration, now).await?;
    state.confirm_write(true).await?;
    // The account exists now: a mail that cannot be issued must not turn that into an error
    // (the user can ask for the link again).
    if let Err(err) = send_mail(state, db, &done.user, TokenPurpose::VerifyEmail).await {
        tracing::warn!(user = %done.user.id.as_str(), error = ?err, "could not issue the verification mail");
    }
    let cookie = session_cookie(&done.session, secure);
    Ok((done.user, done.key.pubkey, cookie))
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

/// `POST /api/auth/login` → 200 `{user_id, email, pubkey, npub}` + session cookie.
async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Response, AppError> {
    let (user, cookie) = log_in(&state, &ip, secure, &body.email, body.password).await?;
    let (db, _) = state.api()?;
    let key = keys::find_user_key(db, &user.id).await?;
    Ok(([(SET_COOKIE, cookie)], Json(account_json(&user, &key.pubkey))).into_response())
}

/// Rate-limits, checks the password and opens a session (shared with the OAuth login form).
pub(crate) async fn log_in(
    state: &AppState,
    ip: &str,
    secure: bool,
    email: &str,
    password: String,
) -> Result<(User, axum::http::HeaderValue), AppError> {
    state.limits().check(&format!("login-ip:{ip}"), LOGIN_PER_IP).await?;
    let (db, services) = state.api()?;
    state.ensure_writable().await?;
    // Wrong passwords slow down this client at this account only (see `crate::limit`).
    let backoff = crate::limit::password_key(email, ip);
    state.limits().start_password_try(&backoff).await?;
    let outcome = accounts::login(db, &services.hasher, email, &Secret::new(password), now_unix()).await;
    let (user, session) = match outcome {
        Ok(done) => {
            state.limits().password_succeeded(&backoff).await;
            done
        }
        // A wrong password was counted when the try started; an answer that judged nothing
        // (the hashing queue full) is not.
        Err(err) => return Err(judged_or_uncounted(state, &backoff, err.into()).await),
    };
    state.confirm_write(false).await?;
    Ok((user, session_cookie(&session, secure)))
}

/// Passes on the error a password try ended with, uncounting the try (see
/// [`crate::limit::RateLimits::password_unjudged`]) unless it is the verdict that the
/// password is wrong (or names no account).
pub(crate) async fn judged_or_uncounted(state: &AppState, backoff: &str, err: AppError) -> AppError {
    if !matches!(err, AppError::Unauthorized(_)) {
        state.limits().password_unjudged(backoff).await;
    }
    err
}

/// `POST /api/auth/logout` → 204, the session ended and the cookie cleared.
async fn logout(
    State(state): State<AppState>,
    OverHttps(secure): OverHttps,
    headers: axum::http::HeaderMap,
) -> Result<Response, AppError> {
    end_session(&state, &headers, secure).await?;
    Ok((StatusCode::NO_CONTENT, [(SET_COOKIE, clear_cookie(secure))]).into_response())
}

/// Ends the request's session, if it carries one (shared with the dashboard's logout).
pub(crate) async fn end_session(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    secure: bool,
) -> Result<(), AppError> {
    if let Some(token) = session_token(headers, secure) {
        let (db, _) = state.api()?;
        accounts::logout(db, &token).await?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct VerifyBody {
    token: String,
    password: String,
}

/// `POST /api/auth/verify-email {token, password}` → 200 `{verified: true}`; a used,
/// expired or unknown token is a 400, a wrong password a 401 (the token stays usable).
async fn verify_email(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<VerifyBody>,
) -> Result<Json<Value>, AppError> {
    confirm_email(&state, &ip, &body.token, body.password).await?;
    Ok(Json(json!({ "verified": true })))
}

/// Confirms an email with the mailed token and the account's password (shared with the
/// verify-email page). Rate-limited per IP like a reset, and each password tried is a guess
/// at the account's password like a login's: the same backoff per account and client (a
/// token read from a log was a way to guess around it).
pub(crate) async fn confirm_email(state: &AppState, ip: &str, token: &str, password: String) -> Result<(), AppError> {
    state
        .limits()
        .check(&format!("reset-submit-ip:{ip}"), RESET_PER_IP)
        .await?;
    let (db, services) = state.api()?;
    state.ensure_writable().await?;
    let account = account_security::verification_account(db, token, now_unix()).await?;
    let backoff = crate::limit::password_key(&account.email, ip);
    state.limits().start_password_try(&backoff).await?;
    let password = Secret::new(password);
    match account_security::verify_email(&services.signer, &services.hasher, token, &password, now_unix()).await {
        Ok(_) => state.limits().password_succeeded(&backoff).await,
        Err(err) => return Err(judged_or_uncounted(state, &backoff, err.into()).await),
    }
    // The first verification may revoke authorizations: a write that changes who may sign.
    state.confirm_write(true).await
}

#[derive(Deserialize)]
struct EmailBody {
    email: String,
}

/// What the mail-requesting endpoints answer, whether or not the account exists.
const MAIL_ON_ITS_WAY: &str = "if an account with this email exists, a link is on its way";

/// `POST /api/auth/resend-verification {email}` → 202 whether or not the account exists or
/// is already verified (so the answer says nothing about which emails are registered).
async fn resend_verification(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<EmailBody>,
) -> Result<Response, AppError> {
    request_mail(&state, &ip, &body.email, TokenPurpose::VerifyEmail).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "message": MAIL_ON_ITS_WAY }))).into_response())
}

/// `POST /api/auth/forgot-password {email}` → 202 whether or not the account exists (so
/// the answer says nothing about which emails are registered).
async fn forgot_password(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<EmailBody>,
) -> Result<Response, AppError> {
    request_mail(&state, &ip, &body.email, TokenPurpose::ResetPassword).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "message": MAIL_ON_ITS_WAY }))).into_response())
}

/// Rate-limits (per IP and per email, a bucket per purpose), then mails a new
/// `purpose` link if that makes sense for the account: a reset link to any account, a
/// verification link only to one not yet verified. Answers the same either way (shared
/// with the forgot-password page).
pub(crate) async fn request_mail(
    state: &AppState,
    ip: &str,
    email: &str,
    purpose: TokenPurpose,
) -> Result<(), AppError> {
    let bucket = purpose.as_str();
    // Asked first, for every address alike (the answer reveals no account), and before any
    // bucket is spent: told to retry, the user loses nothing; a mail dropped for a full queue
    // would have been answered "on its way" and cost one of their few tries.
    if !state.mail_has_room(crate::mail::Lane::of(bucket)) {
        return Err(AppError::Unavailable(
            "too many mails are waiting for the mail server; ask again in a moment".into(),
        ));
    }
    state.limits().check(&format!("{bucket}-ip:{ip}"), MAIL_PER_IP).await?;
    let email = accounts::normalize_email(email)?;
    state
        .limits()
        .check(&format!("{bucket}-email:{email}"), MAIL_PER_EMAIL)
        .await?;
    let (db, _) = state.api()?;
    let Some(user) = user_repo::find_by_email(db, &email).await? else {
        return Ok(());
    };
    if purpose == TokenPurpose::VerifyEmail && user.email_verified_at.is_some() {
        return Ok(());
    }
    state.ensure_writable().await?;
    send_mail(state, db, &user, purpose).await
}

#[derive(Deserialize)]
struct ResetBody {
    token: String,
    password: String,
}

/// `POST /api/auth/reset-password {token, password}` → 200; a take-over of the account:
/// every session ends, every authorization is revoked, other reset links die.
async fn reset_password(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<ResetBody>,
) -> Result<Json<Value>, AppError> {
    set_new_password(&state, &ip, &body.token, body.password).await?;
    Ok(Json(json!({ "reset": true })))
}

/// Redeems a reset token and sets the password (shared with the reset-password page).
/// Rate-limited per IP: a wrong guess costs little (core checks the token before hashing),
/// but guessing must still be slow.
pub(crate) async fn set_new_password(
    state: &AppState,
    ip: &str,
    token: &str,
    password: String,
) -> Result<(), AppError> {
    state
        .limits()
        .check(&format!("reset-submit-ip:{ip}"), RESET_PER_IP)
        .await?;
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    let password = Secret::new(password);
    account_security::reset_password(&services.signer, &services.hasher, token, &password, now_unix()).await?;
    // Revocations: a write that changes who may sign.
    state.confirm_write(true).await
}

/// Issues a single-use token and sends the mail carrying its link (delivery runs on in the
/// background; see [`crate::mail`]).
async fn send_mail(state: &AppState, db: &Db, user: &User, purpose: TokenPurpose) -> Result<(), AppError> {
    let token = accounts::issue_mail_token(db, &user.id, purpose, now_unix()).await?;
    // The token must be in the database before anyone can follow the link.
    state.confirm_write(false).await?;
    let base = state.options().public_url.trim_end_matches('/');
    let (subject, text) = match purpose {
        TokenPurpose::VerifyEmail => (
            "Confirm your keycast email",
            format!(
                "Hello,\n\nplease confirm that {email} is your email address for keycast by opening this link:\n\n\
                 {base}/verify-email#token={token}\n\nThe link works once and expires in {hours} hours. If you did \
                 not create a keycast account, ignore this mail.\n",
                email = user.email,
                token = token.expose(),
                hours = accounts::VERIFY_EMAIL_TTL_SECS / 3600,
            ),
        ),
        TokenPurpose::ResetPassword => (
            "Reset your keycast password",
            format!(
                "Hello,\n\nsomeone, hopefully you, asked to reset the keycast password of {email}. Choose a new \
                 password here:\n\n{base}/reset-password#token={token}\n\nThe link works once and expires in \
                 {minutes} minutes. If you did not ask for this, ignore this mail: your password stays as it is.\n",
                email = user.email,
                token = token.expose(),
                minutes = accounts::RESET_PASSWORD_TTL_SECS / 60,
            ),
        ),
    };
    state.send_mail(Mail {
        to: user.email.clone(),
        subject: subject.into(),
        body: text,
        purpose: purpose.as_str(),
        token: token.expose().clone(),
        link: (purpose == TokenPurpose::VerifyEmail).then(|| format!("{base}/verify-email#token={}", token.expose())),
    });
    Ok(())
}

/// Tells the account its key was exported (sent after the export was recorded): the owner
/// learns of an export they did not make, and what to do.
pub(crate) fn send_export_notice(state: &AppState, user: &User, format: &str, ip: &str) {
    let base = state.options().public_url.trim_end_matches('/');
    let when = mail_time();
    let body = format!(
        "Hello,\n\nthe secret key of the keycast account {email} was exported ({format}) at {when}, from the \
         address {ip}. Whoever exported it can sign as you for as long as the key is used.\n\nIf that was you, \
         there is nothing to do. If it was not: reset your password at {base}/forgot-password (that ends every \
         session and disconnects every app), then start fresh with a new key on your dashboard.\n",
        email = user.email,
    );
    state.send_mail(Mail {
        to: user.email.clone(),
        subject: "Your keycast key was exported".into(),
        body,
        purpose: "key_exported",
        token: String::new(),
        link: None,
    });
}

/// Now, as a notice mail says it.
fn mail_time() -> String {
    chrono::DateTime::from_timestamp(now_unix(), 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// Tells the account that its password was changed, and what to do if that was not its
/// owner (the reset link's take-over ends everything the changer opened).
pub(crate) fn send_password_changed_notice(state: &AppState, user: &User, ip: &str) {
    let base = state.options().public_url.trim_end_matches('/');
    let when = mail_time();
    let body = format!(
        "Hello,\n\nthe password of the keycast account {email} was changed at {when}, from the address {ip}. \
         Every other session was ended; your apps stay connected.\n\nIf that was you, there is nothing to do. \
         If it was not: reset your password at {base}/forgot-password (that ends every session and disconnects \
         every app).\n",
        email = user.email,
    );
    state.send_mail(Mail {
        to: user.email.clone(),
        subject: "Your keycast password was changed".into(),
        body,
        purpose: "password_changed",
        token: String::new(),
        link: None,
    });
}

/// Who deleted an account, for the notice.
pub(crate) enum DeletedBy<'a> {
    /// The owner, with the password, from this client address.
    Owner { ip: &'a str },
    /// The operator, through the admin API.
    Operator,
}

/// Tells the address that its account was deleted, and what it means if its owner did not
/// ask for it.
pub(crate) fn send_account_deleted_notice(state: &AppState, user: &User, by: DeletedBy<'_>) {
    let when = mail_time();
    let (how, otherwise) = match by {
        DeletedBy::Owner { ip } => (
            format!("from the address {ip}, with its password"),
            "If it was not, someone knew your password: change it wherever else you use it.",
        ),
        DeletedBy::Operator => (
            "by the operator of this keycast service".to_owned(),
            "If you did not ask for it, contact the operator of this service.",
        ),
    };
    let body = format!(
        "Hello,\n\nthe keycast account {email} was deleted at {when}, {how}. Its Nostr key is gone from \
         keycast with it (unless you exported it, keycast can no longer sign as you), and every app it had \
         authorized is disconnected.\n\nIf that was you, there is nothing to do. {otherwise}\n",
        email = user.email,
    );
    state.send_mail(Mail {
        to: user.email.clone(),
        subject: "Your keycast account was deleted".into(),
        body,
        purpose: "account_deleted",
        token: String::new(),
        link: None,
    });
}

/// What the account endpoints answer.
pub(crate) fn account_json(user: &User, pubkey: &PublicKey) -> Value {
    json!({
        "user_id": user.id.as_str(),
        "email": user.email,
        "email_verified": user.email_verified_at.is_some(),
        "pubkey": pubkey.to_hex(),
        "npub": pubkey.to_bech32().unwrap_or_default(),
    })
}
