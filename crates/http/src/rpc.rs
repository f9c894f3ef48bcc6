//! `POST /api/nostr`: the HTTP RPC transport. `Authorization: Bearer <access token>`,
//! body `{method, params}` → `{result}` or `{error, code}`.
//!
//! This module only decodes the wire format into [`keycast_core::Request`], calls
//! [`keycast_core::Signer::execute`] (the one signing path NIP-46 calls too) and encodes
//! the [`Response`]. Params follow NIP-46 (see [`Request::decode`]); unlike NIP-46,
//! `sign_event`'s result is the event as a JSON object, as the predecessor's clients expect.
//!
//! A request the policy does not cover but its owner may allow is answered 403
//! `approval_required` with `approval_url` (the owner's page) and `expires_at`; once the owner
//! allows it, the same request again succeeds ([`keycast_core::approval`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use keycast_core::approval::Asker;
use keycast_core::nostr::PublicKey;
use keycast_core::{AuthError, InternalError, Request, SignError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route(
        "/api/nostr",
        post(rpc).layer(axum::extract::DefaultBodyLimit::max(crate::RPC_BODY_LIMIT)),
    )
}

#[derive(Deserialize)]
struct Call {
    method: String,
    #[serde(default)]
    params: Value,
}

/// `POST /api/nostr`.
async fn rpc(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return match crate::extract::unread(rejection) {
                AppError::PayloadTooLarge(m) => RpcError::TooLarge(m),
                other => RpcError::BadRequest(other.to_string()),
            }
            .into_response()
        }
    };
    match handle(&state, &headers, &body).await {
        Ok(result) => Json(json!({ "result": result })).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn handle(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Value, RpcError> {
    let token = bearer(headers).ok_or(RpcError::NoToken)?;
    let (_, services) = state.api().map_err(|_| RpcError::Unavailable {
        message: "keycast is starting; retry in a moment".into(),
        retry_after_secs: 1,
    })?;
    // Counted from before the writer check, so a hand-over waits for this request to end.
    let _request = services.signer.request();
    // A deploy's old instance keeps getting requests until the traffic has moved.
    if !state.is_writer().await {
        return Err(RpcError::Moved);
    }
    let checkpoint = services.signer.token_checkpoint();
    let authz = services.signer.authorize_token(token).await?;
    let call: Call = serde_json::from_slice(body)
        .map_err(|e| RpcError::BadRequest(format!("the body must be JSON {{\"method\", \"params\"}}: {e}")))?;
    let request = decode(&call, authz.bunker_pubkey)?;
    let response = services.signer.execute_or_ask(&authz, request, Asker::Http).await?;
    // The token revoked while this request was under way: its result does not go out.
    services.signer.ensure_token_live(token, checkpoint).await?;
    Ok(encode(response))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// Decodes a call into a core request with the decoder NIP-46 uses too.
fn decode(call: &Call, placeholder: PublicKey) -> Result<Request, RpcError> {
    let params = match &call.params {
        Value::Array(items) => items.as_slice(),
        Value::Null => &[],
        _ => return Err(bad("params must be an array")),
    };
    Request::decode(&call.method, params, placeholder).map_err(|e| RpcError::BadRequest(e.to_string()))
}

fn encode(response: keycast_core::Response) -> Value {
    match response {
        keycast_core::Response::PublicKey(pk) => Value::String(pk.to_hex()),
        keycast_core::Response::Event(event) => serde_json::to_value(&*event).unwrap_or(Value::Null),
        keycast_core::Response::Text(text) => Value::String(text),
    }
}

fn bad(message: &str) -> RpcError {
    RpcError::BadRequest(message.to_owned())
}

/// An RPC failure, answered `{error: <message>, code: <stable code>}`.
#[derive(Debug)]
enum RpcError {
    BadRequest(String),
    /// The body is past [`crate::RPC_BODY_LIMIT`]: 413.
    TooLarge(String),
    /// No `Authorization: Bearer` header: 401 with a challenge and no error code (RFC 6750
    /// §3.1: the request carried no authentication).
    NoToken,
    /// A token that is unknown, expired or revoked: 401, `error="invalid_token"`.
    Unauthorized(String),
    Forbidden(String),
    /// The grant's terms refuse it; the code says which (`grant_expired`, …).
    Grant(&'static str, String),
    /// The owner may allow it at `url` (until `expires_at`, unix seconds).
    Approval {
        message: String,
        url: String,
        expires_at: i64,
    },
    /// 503 with a message saying why and when to retry.
    /// 503 with `Retry-After`: starting, or a transient database state.
    Unavailable {
        message: String,
        retry_after_secs: u64,
    },
    /// 503 with `Retry-After: 1`: this instance handed the database over (a deploy) or lost it;
    /// a retry reaches the instance that has it.
    Moved,
    Internal(String),
}

impl From<AuthError> for RpcError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Internal(cause) => RpcError::Internal(cause.to_string()),
            other => RpcError::Unauthorized(other.to_string()),
        }
    }
}

impl From<SignError> for RpcError {
    fn from(err: SignError) -> Self {
        match err {
            SignError::PolicyDenied { reason } => RpcError::Forbidden(reason),
            SignError::GrantRefused { code, reason } => RpcError::Grant(code, reason),
            SignError::ApprovalRequired {
                reason,
                url,
                expires_at,
            } => RpcError::Approval {
                message: reason,
                url,
                expires_at,
            },
            SignError::Revoked | SignError::Expired | SignError::UnknownToken | SignError::Auth(_) => {
                RpcError::Unauthorized(err.to_string())
            }
            SignError::BadRequest { reason } => RpcError::BadRequest(reason),
            SignError::NoKey => RpcError::Internal("authorization without a user key".into()),
            SignError::Internal(InternalError::Repo(cause)) => match crate::error::transient(&cause) {
                Some((message, retry_after_secs)) => RpcError::Unavailable {
                    message,
                    retry_after_secs,
                },
                None => RpcError::Internal(cause.to_string()),
            },
            SignError::Internal(cause) => RpcError::Internal(cause.to_string()),
        }
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            RpcError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            RpcError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m),
            RpcError::NoToken => {
                let body = json!({
                    "error": "send the access token as Authorization: Bearer <token>",
                    "code": "unauthorized",
                });
                let challenge = [(WWW_AUTHENTICATE, r#"Bearer realm="keycast""#.to_owned())];
                return (StatusCode::UNAUTHORIZED, challenge, Json(body)).into_response();
            }
            RpcError::Unauthorized(m) => {
                // RFC 6750 §3: tells a client (an OAuth library) to refresh or re-authorize,
                // rather than retry. The description is a quoted string: no quotes in it.
                let description: String = m
                    .chars()
                    .filter(|c| !matches!(c, '"' | '\\') && !c.is_control())
                    .collect();
                let challenge = [(
                    WWW_AUTHENTICATE,
                    format!(r#"Bearer realm="keycast", error="invalid_token", error_description="{description}""#),
                )];
                let body = json!({ "error": m, "code": "unauthorized" });
                return (StatusCode::UNAUTHORIZED, challenge, Json(body)).into_response();
            }
            RpcError::Forbidden(m) => (StatusCode::FORBIDDEN, "policy_denied", m),
            RpcError::Grant(code, m) => (StatusCode::FORBIDDEN, code, m),
            RpcError::Approval {
                message,
                url,
                expires_at,
            } => {
                let body = json!({
                    "error": message,
                    "code": "approval_required",
                    "approval_url": url,
                    "expires_at": expires_at,
                });
                return (StatusCode::FORBIDDEN, Json(body)).into_response();
            }
            RpcError::Unavailable {
                message,
                retry_after_secs,
            } => {
                let body = json!({ "error": message, "code": "unavailable" });
                let retry = [(axum::http::header::RETRY_AFTER, retry_after_secs.max(1).to_string())];
                return (StatusCode::SERVICE_UNAVAILABLE, retry, Json(body)).into_response();
            }
            RpcError::Moved => {
                let body = json!({
                    "error": "this instance no longer holds the database (another took it over, as in a deploy) and does not sign; retry: the request will reach the instance that holds it",
                    "code": "unavailable",
                });
                let retry = [(axum::http::header::RETRY_AFTER, "1")];
                return (StatusCode::SERVICE_UNAVAILABLE, retry, Json(body)).into_response();
            }
            RpcError::Internal(cause) => {
                tracing::error!(%cause, "rpc internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "something went wrong inside keycast; the cause is in the server log".to_owned(),
                )
            }
        };
        (status, Json(json!({ "error": message, "code": code }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keycast_db::RepoError;

    fn retry_after(response: &Response) -> Option<&str> {
        response
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap())
    }

    /// On PostgreSQL a grant with limits counts each signature in the database: with its
    /// disk full, the signature is refused with a 503 that says why, not a 500.
    #[test]
    fn a_full_database_disk_is_a_503_that_says_so() {
        let full = RepoError::StorageFull(sqlx::Error::Protocol(
            "could not extend file: No space left on device".into(),
        ));
        let response = RpcError::from(SignError::Internal(InternalError::Repo(full))).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after(&response), Some("30"), "when to retry");
        let busy = RepoError::Busy(sqlx::Error::PoolTimedOut);
        let response = RpcError::from(SignError::Internal(InternalError::Repo(busy))).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after(&response), Some("1"));
        let other = RepoError::Database(sqlx::Error::PoolTimedOut);
        let response = RpcError::from(SignError::Internal(InternalError::Repo(other))).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
