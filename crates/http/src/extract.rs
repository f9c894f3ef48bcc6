//! Small extractors shared by the API handlers, each answering with [`AppError`] JSON
//! (axum's own rejections are plain text).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use serde::de::DeserializeOwned;

use crate::{AppError, AppState};

/// A JSON body, which must say `Content-Type: application/json` (a cross-site form can
/// send `text/plain` but not that: see `origin`); otherwise 415. A malformed one is a 400
/// naming the problem.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        if !is_json(req.headers()) {
            return Err(AppError::UnsupportedMediaType(
                "send the body as JSON with Content-Type: application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(unread)?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| AppError::BadRequest(format!("the body must be JSON: {e}")))
    }
}

/// Why a body was not read: past the route's limit (`DefaultBodyLimit`, see
/// [`crate::BODY_LIMIT`]) a 413, otherwise (the client went away mid-body) a 400.
pub(crate) fn unread(rejection: BytesRejection) -> AppError {
    if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        AppError::PayloadTooLarge(format!(
            "the request body is larger than this endpoint reads ({rejection})"
        ))
    } else {
        AppError::BadRequest("the request body could not be read".into())
    }
}

/// A body that may be JSON (`Content-Type: application/json`) or a form
/// (`application/x-www-form-urlencoded`), as OAuth endpoints accept both; any other type is
/// a 415. `json` says which it was.
pub struct FormOrJson<T> {
    pub value: T,
    pub json: bool,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for FormOrJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let json = is_json(req.headers());
        if !json && !is_form(req.headers()) {
            return Err(AppError::UnsupportedMediaType(
                "send a form (application/x-www-form-urlencoded) or JSON (application/json)".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(unread)?;
        let value = if json {
            serde_json::from_slice(&bytes).map_err(|e| AppError::BadRequest(format!("the body must be JSON: {e}")))?
        } else {
            // Every field OAuth sends is a string: build a JSON object of them and let serde
            // map it onto `T` (the first occurrence of a repeated field wins).
            let mut map = serde_json::Map::new();
            for (k, v) in url::form_urlencoded::parse(&bytes) {
                map.entry(k.into_owned())
                    .or_insert(serde_json::Value::String(v.into_owned()));
            }
            serde_json::from_value(serde_json::Value::Object(map))
                .map_err(|e| AppError::BadRequest(format!("malformed form: {e}")))?
        };
        Ok(FormOrJson { value, json })
    }
}

/// A query string, parsed as `application/x-www-form-urlencoded`; a parameter given more than
/// once counts with its first value (as the form bodies do), and a malformed one is a 400 in
/// keycast's JSON error shape naming the problem (axum's own rejection is plain text).
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, AppError> {
        let query = parts.uri.query().unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let first: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| seen.insert(k.clone()))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let canonical = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(first)
            .finish();
        serde_urlencoded::from_str(&canonical)
            .map(QueryParams)
            .map_err(|e| AppError::BadRequest(format!("malformed query: {e}")))
    }
}

/// One segment of the path, as axum's `Path` reads it; a malformed one (percent-encoded
/// bytes that are not UTF-8) is a 400 in keycast's JSON error shape, or its HTML page on
/// the pages (axum's own rejection is plain text).
pub struct PathParam<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParam<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| PathParam(value))
            .map_err(|e| AppError::BadRequest(format!("malformed address: {}", e.body_text())))
    }
}

/// The media type of the body, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next()?.trim().to_ascii_lowercase())
}

fn is_json(headers: &HeaderMap) -> bool {
    media_type(headers)
        .is_some_and(|t| t == "application/json" || (t.starts_with("application/") && t.ends_with("+json")))
}

fn is_form(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(|t| t == "application/x-www-form-urlencoded")
}

/// The client's rate-limit key: its address, or its IPv6 /64 (see [`crate::limit`]).
pub struct ClientIp(pub String);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(state.limits().client_key(parts)))
    }
}

/// Whether the client reached keycast over HTTPS: `X-Forwarded-Proto: https` from the
/// proxy in front, or a public URL that is https. Decides the cookie's `Secure` flag.
pub struct OverHttps(pub bool);

impl FromRequestParts<AppState> for OverHttps {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(OverHttps(over_https(&parts.headers, state)))
    }
}

/// See [`OverHttps`].
pub(crate) fn over_https(headers: &HeaderMap, state: &AppState) -> bool {
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
    forwarded || state.options().public_url.starts_with("https://")
}
