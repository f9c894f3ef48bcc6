//! `POST /api/nostr`: the HTTP RPC transport. `Authorization: Bearer <access token>`,
//! body `{method, params}` → `{result}` or `{error, code}`.
//!
//! This module only decodes the wire format into [`keycast_core::Request`], calls
//! [`keycast_core::Signer::execute`] (the one signing path NIP-46 calls too) and encodes
//! the [`Response`]. Params follow NIP-46: `sign_event` takes the event template as a JSON
//! object or as its JSON text; encrypt takes `[peer_pubkey_hex, plaintext]`, decrypt
//! `[peer_pubkey_hex, ciphertext]`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use keycast_core::nostr::{Kind, PublicKey, Tag, Timestamp, UnsignedEvent};
use keycast_core::{AuthError, Request, SignError, Transport};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/api/nostr", post(rpc))
}

#[derive(Deserialize)]
struct Call {
    method: String,
    #[serde(default)]
    params: Value,
}

/// `POST /api/nostr`.
async fn rpc(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    match handle(&state, &headers, &body).await {
        Ok(result) => Json(json!({ "result": result })).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn handle(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Value, RpcError> {
    let token = bearer(headers).ok_or(RpcError::Unauthorized(
        "send the access token as Authorization: Bearer <token>".into(),
    ))?;
    let (_, services) = state.api().map_err(|_| RpcError::Unavailable)?;
    let authz = services.signer.authorize_token(token).await?;
    let call: Call = serde_json::from_slice(body)
        .map_err(|e| RpcError::BadRequest(format!("the body must be JSON {{\"method\", \"params\"}}: {e}")))?;
    let request = decode(&call, authz.bunker_pubkey)?;
    let response = services.signer.execute(&authz, request, Transport::Http).await?;
    Ok(encode(response))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// Decodes a call into a core request. `placeholder` fills the template's `pubkey` when
/// it has none (the signer replaces it with the user's key anyway).
fn decode(call: &Call, placeholder: PublicKey) -> Result<Request, RpcError> {
    let params = match &call.params {
        Value::Array(items) => items.as_slice(),
        Value::Null => &[],
        _ => return Err(bad("params must be an array")),
    };
    let peer_and_text = |what: &str| -> Result<(PublicKey, String), RpcError> {
        match params {
            [Value::String(peer), Value::String(text)] => {
                let peer = PublicKey::parse(peer).map_err(|_| {
                    bad(&format!(
                        "params[0] must be the peer's public key (64 hex characters), not {peer:?}"
                    ))
                })?;
                Ok((peer, text.clone()))
            }
            _ => Err(bad(&format!("{} takes [peer_pubkey_hex, {what}]", call.method))),
        }
    };
    Ok(match call.method.as_str() {
        "get_public_key" => Request::GetPublicKey,
        "sign_event" => Request::SignEvent(template(params.first(), placeholder)?),
        "nip04_encrypt" => peer_and_text("plaintext").map(|(peer, plaintext)| Request::Nip04Encrypt { peer, plaintext })?,
        "nip04_decrypt" => peer_and_text("ciphertext").map(|(peer, ciphertext)| Request::Nip04Decrypt { peer, ciphertext })?,
        "nip44_encrypt" => peer_and_text("plaintext").map(|(peer, plaintext)| Request::Nip44Encrypt { peer, plaintext })?,
        "nip44_decrypt" => peer_and_text("ciphertext").map(|(peer, ciphertext)| Request::Nip44Decrypt { peer, ciphertext })?,
        other => return Err(RpcError::BadRequest(format!(
            "unknown method {other:?}; supported: get_public_key, sign_event, nip04_encrypt, nip04_decrypt, nip44_encrypt, nip44_decrypt"
        ))),
    })
}

/// The event template of `sign_event`: `{kind, content, tags?, created_at?}` as an object
/// or as JSON text.
fn template(param: Option<&Value>, placeholder: PublicKey) -> Result<UnsignedEvent, RpcError> {
    let parsed;
    let object = match param {
        Some(Value::String(text)) => {
            parsed = serde_json::from_str::<Value>(text).map_err(|e| bad(&format!("params[0] is not JSON: {e}")))?;
            &parsed
        }
        Some(value @ Value::Object(_)) => value,
        _ => return Err(bad("sign_event takes [event_template] (an object or its JSON text)")),
    };
    let kind = object
        .get("kind")
        .and_then(Value::as_u64)
        .and_then(|k| u16::try_from(k).ok())
        .ok_or_else(|| bad("the event template needs a kind from 0 to 65535"))?;
    let content = match object.get("content") {
        Some(Value::String(c)) => c.clone(),
        None => String::new(),
        Some(_) => return Err(bad("the event template's content must be a string")),
    };
    let created_at = match object.get("created_at") {
        None | Some(Value::Null) => Timestamp::now(),
        Some(v) => Timestamp::from(
            v.as_u64()
                .ok_or_else(|| bad("created_at must be a unix time in seconds"))?,
        ),
    };
    let tags = match object.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value::<Vec<Vec<String>>>(v.clone())
            .map_err(|_| bad("tags must be an array of arrays of strings"))?
            .into_iter()
            .map(|t| Tag::parse(t).map_err(|e| bad(&format!("invalid tag: {e}"))))
            .collect::<Result<_, _>>()?,
    };
    Ok(UnsignedEvent::new(
        placeholder,
        created_at,
        Kind::from(kind),
        tags,
        content,
    ))
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
    Unauthorized(String),
    Forbidden(String),
    Unavailable,
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
            SignError::Revoked | SignError::Expired | SignError::UnknownToken | SignError::Auth(_) => {
                RpcError::Unauthorized(err.to_string())
            }
            SignError::BadRequest { reason } => RpcError::BadRequest(reason),
            SignError::NoKey => RpcError::Internal("authorization without a user key".into()),
            SignError::Internal(cause) => RpcError::Internal(cause.to_string()),
        }
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            RpcError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            RpcError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m),
            RpcError::Forbidden(m) => (StatusCode::FORBIDDEN, "policy_denied", m),
            RpcError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "keycast is starting; retry in a moment".to_owned(),
            ),
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
