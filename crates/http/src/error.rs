//! [`AppError`]: every error a handler returns, rendered as JSON.
//!
//! The body is `{"error": "<stable_code>", "message": "<what a person can act on>"}`. On
//! routes that serve HTML (the pages), the same error becomes an HTML page with the same
//! status and message (`page::html_errors`), from the [`ErrorMessage`] every error
//! response carries in its extensions.
//! Internal failures never leak their cause to the client: the cause is logged here,
//! once, and the client gets `internal_error`.
//!
//! Core's errors are mapped here, in one place (`From` impls at the end), so every
//! handler answers the same cause with the same status and code. Two wire formats differ
//! on purpose and live with their endpoints: OAuth's RFC 6749 errors (`oauth.rs`) and the
//! RPC's `{error}` (`rpc.rs`).

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keycast_core::accounts::AccountError;
use keycast_core::password::PasswordError;
use keycast_core::KeyError;
use keycast_db::RepoError;
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The service is not ready for this request (starting, shutting down, or a dependency
    /// is failing). 503.
    #[error("{0}")]
    Unavailable(String),
    /// No such route or resource. 404.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed. 400.
    #[error("{0}")]
    BadRequest(String),
    /// No valid session or credentials. 401, code `unauthorized`.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated but not allowed (bad CSRF token, wrong origin). 403, code `forbidden`.
    #[error("{0}")]
    Forbidden(String),
    /// The thing already exists (email, username, key). 409, code `conflict`.
    #[error("{0}")]
    Conflict(String),
    /// The thing existed but its time is over (an expired approval). 410, code `gone`.
    #[error("{0}")]
    Gone(String),
    /// The body's `Content-Type` is not one this endpoint reads. 415, code
    /// `unsupported_media_type`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body is larger than the endpoint reads ([`crate::BODY_LIMIT`]). 413, code
    /// `payload_too_large`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Too many attempts; retry after `retry_after_secs`. 429, code `rate_limited`, with
    /// a `Retry-After` header.
    #[error("too many attempts; retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// Keycast is saturated (the password-hashing queue is full); retry after
    /// `retry_after_secs`. 503, code `unavailable`, with a `Retry-After` header.
    #[error("{message}")]
    Overloaded { message: String, retry_after_secs: u64 },
    /// Something failed inside keycast; the cause is logged, not returned. 500.
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::Unavailable(_) | AppError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AppError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AppError::Gone(_) => (StatusCode::GONE, "gone"),
            AppError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            AppError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            AppError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    /// An internal failure whose cause (`Debug`/`Display` of `err`) is logged, never sent.
    pub fn internal(err: impl std::fmt::Display) -> AppError {
        AppError::Internal(err.to_string())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            AppError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                "something went wrong inside keycast; the cause is in the server log".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(json!({ "error": code, "message": message.clone() }))).into_response();
        // Routes that serve HTML re-render the error from this (see `page::html_errors`).
        response.extensions_mut().insert(ErrorMessage(message));
        let retry_after = match self {
            AppError::TooManyRequests { retry_after_secs } | AppError::Overloaded { retry_after_secs, .. } => {
                Some(retry_after_secs)
            }
            // Starting, stopping, or a dependency failing: soon, or on another instance.
            AppError::Unavailable(_) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// The message of an [`AppError`] response, in its extensions: what a person can act on,
/// already stripped of internals (so rendering it again as HTML has no side effects).
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

/// The fallback for unknown routes: JSON, or an HTML page for a browser (it asks for
/// `text/html`) outside the API's paths.
pub async fn not_found(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if crate::page::wants_html(uri.path(), &headers) {
        let message = format!("there is no page at {}; check the address", uri.path());
        crate::page::error_page(AppError::NotFound(message).into_response())
    } else {
        AppError::NotFound(format!("no route for {method} {}", uri.path())).into_response()
    }
}

/// A storage failure that is not a bug but a state to wait out: what the client hears and
/// after how many seconds to retry, logged here for the operator once per refused request.
/// Both the API and HTTP RPC answer 503 with it; `None` for any other failure.
pub(crate) fn transient(cause: &RepoError) -> Option<(String, u64)> {
    match cause {
        RepoError::StorageFull(_) => {
            tracing::error!(%cause, "the database's disk is full: writes fail until space is freed");
            let message = "keycast's database disk is full, so nothing was changed; retry later (the operator is \
                           told in the server log)";
            Some((message.into(), 30))
        }
        RepoError::Busy(_) => {
            tracing::warn!(%cause, "the database stayed busy past the wait");
            Some(("keycast's database is busy; retry in a moment".into(), 1))
        }
        _ => None,
    }
}

impl From<RepoError> for AppError {
    fn from(err: RepoError) -> Self {
        if let RepoError::SessionEnded = err {
            return AppError::Unauthorized(err.to_string());
        }
        match transient(&err) {
            Some((message, retry_after_secs)) => AppError::Overloaded {
                message,
                retry_after_secs,
            },
            None => AppError::internal(err),
        }
    }
}

impl From<keycast_core::InternalError> for AppError {
    fn from(err: keycast_core::InternalError) -> Self {
        match err {
            keycast_core::InternalError::Repo(e) => e.into(),
            other => AppError::internal(other),
        }
    }
}

impl From<AccountError> for AppError {
    fn from(err: AccountError) -> Self {
        match err {
            AccountError::InvalidEmail | AccountError::InvalidToken => AppError::BadRequest(err.to_string()),
            AccountError::EmailTaken => AppError::Conflict(err.to_string()),
            AccountError::InvalidCredentials | AccountError::WrongPassword => AppError::Unauthorized(err.to_string()),
            AccountError::EmailNotVerified => AppError::Forbidden(err.to_string()),
            AccountError::Password(p) => p.into(),
            AccountError::Key(k) => k.into(),
            AccountError::Internal(e) => e.into(),
        }
    }
}

impl From<keycast_core::hashing_queue::Busy> for AppError {
    fn from(busy: keycast_core::hashing_queue::Busy) -> Self {
        AppError::Overloaded {
            message: busy.to_string(),
            retry_after_secs: 1,
        }
    }
}

impl From<PasswordError> for AppError {
    fn from(err: PasswordError) -> Self {
        match err {
            PasswordError::TooShort | PasswordError::TooLong => AppError::BadRequest(err.to_string()),
            PasswordError::Mismatch => AppError::Unauthorized("wrong password".into()),
            PasswordError::Busy(busy) => busy.into(),
            PasswordError::CorruptHash | PasswordError::Hashing(_) => AppError::internal(err),
        }
    }
}

impl From<KeyError> for AppError {
    fn from(err: KeyError) -> Self {
        match err {
            KeyError::InvalidImport => AppError::BadRequest(err.to_string()),
            KeyError::KeyTaken | KeyError::AlreadyHasKey | KeyError::ReplacedMeanwhile => {
                AppError::Conflict(err.to_string())
            }
            KeyError::NoKey => AppError::NotFound(err.to_string()),
            KeyError::Busy(busy) => busy.into(),
            KeyError::Repo(e) => e.into(),
            other => AppError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// keycast starting (or a dependency failing) says when to try again, as API.md says.
    #[test]
    fn an_unavailable_keycast_says_when_to_retry() {
        let response = AppError::Unavailable("keycast is starting".into()).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap()),
            Some("1")
        );
    }

    /// A busy database is a 503 to retry in a second, not a 500.
    #[test]
    fn a_busy_database_is_a_503_to_retry() {
        let response = AppError::from(RepoError::Busy(sqlx::Error::PoolTimedOut)).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let other = AppError::from(RepoError::Database(sqlx::Error::RowNotFound)).into_response();
        assert_eq!(other.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
