//! [`AppError`]: every error a handler returns, rendered as JSON.
//!
//! The body is `{"error": "<stable_code>", "message": "<what a person can act on>"}`.
//! Internal failures never leak their cause to the client: the cause is logged here,
//! once, and the client gets `internal_error`.

use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
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
    /// Something failed inside keycast; the cause is logged, not returned. 500.
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
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
        (status, Json(json!({ "error": code, "message": message }))).into_response()
    }
}

/// The fallback for unknown routes.
pub async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::NotFound(format!("no route for {method} {}", uri.path()))
}
