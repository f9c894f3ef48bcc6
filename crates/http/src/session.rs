//! Browser sessions: the `keycast_session` cookie, the [`SessionUser`] extractor that
//! resolves it (by its hash, in core) to a user, and the session-bound CSRF token of the
//! consent form.

use axum::extract::FromRequestParts;
use axum::http::header::COOKIE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use keycast_core::accounts::{self, NewSession, SESSION_TTL_SECS};
use keycast_core::secret::ct_eq;
use keycast_db::now_unix;
use keycast_db::users::User;
use sha2::{Digest, Sha256};

use crate::{AppError, AppState};

/// The session cookie's name over plain HTTP (development).
pub const SESSION_COOKIE: &str = "keycast_session";
/// The session cookie's name over HTTPS: the `__Host-` prefix makes browsers refuse it
/// unless it is `Secure`, for `Path=/` and without `Domain`, so no sibling subdomain (and no
/// plain-HTTP response) can plant or overwrite it.
pub const SECURE_SESSION_COOKIE: &str = "__Host-keycast_session";

fn cookie_name(secure: bool) -> &'static str {
    if secure {
        SECURE_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    }
}

/// The logged-in user of a request. Rejects with 401 JSON when there is no live session.
pub struct SessionUser {
    pub user: User,
    /// The raw cookie value (to log out, and to derive the CSRF token).
    pub token: String,
}

impl FromRequestParts<AppState> for SessionUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        MaybeSession::from_request_parts(parts, state)
            .await?
            .0
            .ok_or_else(|| AppError::Unauthorized("log in first: no valid session cookie".into()))
    }
}

impl SessionUser {
    /// Right before a write that gives an app access to the account (a grant, an
    /// authorization code): the session must still be live. A request can spend long
    /// between its session check and its write (resolving the relays' names, which whoever
    /// runs their DNS can hold), and a password reset, which ends every session and then
    /// revokes every grant, must not see a grant appear after it from a request it ended.
    ///
    /// # Errors
    /// 401 when the session has ended meanwhile.
    pub async fn ensure_still_live(&self, state: &AppState) -> Result<(), AppError> {
        let (db, _) = state.api()?;
        match accounts::session_user(db, &self.token, now_unix()).await? {
            Some(user) if user.id == self.user.id => Ok(()),
            // What an insert conditional on the session says when it finds it gone.
            _ => Err(keycast_db::RepoError::SessionEnded.into()),
        }
    }
}

/// The session of a request if there is one (pages that show a login form otherwise).
pub struct MaybeSession(pub Option<SessionUser>);

impl FromRequestParts<AppState> for MaybeSession {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let secure = crate::extract::over_https(&parts.headers, state);
        let Some(token) = session_token(&parts.headers, secure) else {
            return Ok(MaybeSession(None));
        };
        let (db, _) = state.api()?;
        let user = accounts::session_user(db, &token, now_unix()).await?;
        Ok(MaybeSession(user.map(|user| SessionUser { user, token })))
    }
}

/// The session cookie's value, if the request carries one (over HTTPS only the
/// `__Host-` cookie counts).
pub fn session_token(headers: &HeaderMap, secure: bool) -> Option<String> {
    let name = cookie_name(secure);
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(candidate, _)| *candidate == name)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` for a new session: `HttpOnly; SameSite=Lax; Path=/`; over HTTPS `Secure`
/// and named [`SECURE_SESSION_COOKIE`].
pub fn session_cookie(session: &NewSession, secure: bool) -> HeaderValue {
    let max_age = (session.expires_at - now_unix()).clamp(0, SESSION_TTL_SECS);
    cookie(session.token.expose(), max_age, secure)
}

/// `Set-Cookie` that deletes the session cookie.
pub fn clear_cookie(secure: bool) -> HeaderValue {
    cookie("", 0, secure)
}

fn cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let name = cookie_name(secure);
    let secure = if secure { "; Secure" } else { "" };
    let text = format!("{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax{secure}");
    HeaderValue::from_str(&text).expect("cookie values are base64url")
}

/// The consent form's CSRF token for a session: SHA-256 over a fixed label and the
/// session token, base64url. Only someone holding the session cookie can compute it, and
/// it changes with every session.
pub fn csrf_token(session_token: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"keycast-consent-csrf-v1\0");
    hasher.update(session_token.as_bytes());
    URL_SAFE_NO_PAD.encode(hasher.finalize())
}

/// Whether `candidate` is the CSRF token of `session_token` (constant-time).
pub fn csrf_matches(session_token: &str, candidate: &str) -> bool {
    ct_eq(csrf_token(session_token).as_bytes(), candidate.as_bytes())
}

/// How long a consent or approval page must have been shown before its "approve" counts.
/// A hostile page that gets a double click from its visitor can bring keycast's page up
/// under the pointer between the two clicks (double-clickjacking: framing is refused, but a
/// new window or a navigation is not), and the second click lands on "Approve" a moment
/// after the page appeared. Reading what one approves takes longer.
pub const MIN_SHOWN_MS: i64 = 800;

/// A page's "shown at" stamp for its form, `{unix ms}.{MAC}`: the MAC (SHA-256 over a label,
/// the session token and the time, as [`csrf_token`]) makes it unforgeable and good for this
/// session only.
pub fn shown_stamp(session_token: &str, now_ms: i64) -> String {
    format!("{now_ms}.{}", shown_mac(session_token, now_ms))
}

fn shown_mac(session_token: &str, at_ms: i64) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"keycast-shown-at-v1\0");
    hasher.update(session_token.as_bytes());
    hasher.update(b"\0");
    hasher.update(at_ms.to_string().as_bytes());
    URL_SAFE_NO_PAD.encode(hasher.finalize())
}

/// Refuses an approval that came back less than [`MIN_SHOWN_MS`] after its page was shown,
/// or with a stamp that is not this session's. A form without a stamp passes: the button a
/// double click can land on is on keycast's own pages, which always carry one, and a request
/// made any other way needs the CSRF token, which only the session's holder can read.
///
/// # Errors
/// [`AppError::Forbidden`], saying why and what to do.
pub fn check_shown_long_enough(session_token: &str, stamp: Option<&str>, now_ms: i64) -> Result<(), AppError> {
    let Some(stamp) = stamp.filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let shown_at = stamp
        .split_once('.')
        .and_then(|(at, mac)| at.parse::<i64>().ok().map(|at| (at, mac)))
        .filter(|(at, mac)| ct_eq(shown_mac(session_token, *at).as_bytes(), mac.as_bytes()))
        .map(|(at, _)| at)
        .ok_or_else(|| {
            AppError::Forbidden("the page's form is not this session's; reload the page and try again".into())
        })?;
    let shown_for = now_ms.saturating_sub(shown_at);
    if shown_for < MIN_SHOWN_MS {
        return Err(AppError::Forbidden(format!(
            "approved {shown_for} ms after the page appeared, too soon to have been read (a hostile page can turn a \
             double click into a click on this page); go back, check what is asked, and approve again"
        )));
    }
    Ok(())
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
