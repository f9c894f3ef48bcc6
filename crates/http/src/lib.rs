//! keycast's HTTP transport: a thin axum adapter over the layers below it.
//!
//! # Layout
//! - [`state`]: what handlers share ([`AppState`]): the database once it is open, metrics.
//! - [`health`]: `/healthz/{live,startup,ready}` probes.
//! - [`metrics`]: `/metrics` and the request-counting middleware.
//! - [`error`]: [`AppError`], the one way handlers answer with an error (JSON, no internals),
//!   and the one mapping of core's errors onto it.
//! - [`auth`]: register, login, logout, email verification (and a new link), password reset.
//! - [`session`]: the session cookie, the [`session::SessionUser`] extractor, CSRF tokens.
//! - [`oauth`]: `/api/oauth/{authorize,login,token}`, RFC 8414 metadata.
//! - [`rpc`]: `POST /api/nostr`, the HTTP transport of the signer.
//! - [`user`]: the user's authorizations (list, revoke), activity, key and its export,
//!   password change and account deletion.
//! - [`nip05`]: `/.well-known/nostr.json` and choosing a username.
//! - [`openapi`]: `GET /api/openapi.json`, the hand-written OpenAPI 3.1 document.
//! - [`policies`]: `GET /api/policies`, the policies an app may ask for.
//! - `page`: the shared layout, the OAuth login and consent pages, and the HTML error pages
//!   of every route that serves HTML.
//! - `pages`: the account pages for people: `/`, `/register`, `/login`, `/logout`,
//!   `/dashboard` (key, authorizations with revoke, activity), and the pages the mailed
//!   links open (`/verify-email`, `/reset-password`, `/forgot-password`). Not part of
//!   `openapi.json`.
//! - `account_pages`: the dashboard's forms to change the password and delete the account.
//! - `approvals`: `/approvals/{id}`, where an authorization's owner allows or denies a
//!   request its policy does not cover (NIP-46 `auth_url`, HTTP RPC `approval_url`).
//! - `origin`: refuses state-changing requests from other sites (CSRF, login CSRF).
//! - [`limit`]: rate limits (token buckets); [`mail`]: SMTP delivery or the development outbox;
//!   [`extract`]: JSON/form bodies, client IP, HTTPS detection.
//!
//! [`app`] builds the router without a socket, so tests can drive it with `oneshot`.

mod account_pages;
pub mod admin;
mod approvals;
pub mod auth;
pub mod error;
pub mod extract;
mod grant_pages;
mod grants;
pub mod health;
pub mod limit;
pub mod mail;
pub mod metrics;
pub mod nip05;
pub mod oauth;
pub mod openapi;
mod origin;
mod page;
mod pages;
pub mod policies;
pub mod rpc;
pub mod session;
pub mod state;
mod testing;
pub mod user;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

pub use error::AppError;
pub use state::{AppState, BoxFuture, Dependency, Durability, DurabilityMode, HttpOptions, Services};

/// The most a request body may hold (signing: [`RPC_BODY_LIMIT`]; permissions:
/// [`POLICY_BODY_LIMIT`]); larger → 413. Bodies are read whole before a handler's rate limit
/// or credential check, so this bounds what anyone can make keycast hold: every other form and
/// JSON body keycast reads is a few KiB.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The most a body carrying permissions may hold (a custom policy, an app's own
/// permissions): at the caps (100 blocked words of 100 characters, 1,000 kinds twice) a form
/// percent-encodes each byte of a word in three characters — about 90 KB for words in CJK
/// script. These routes need a session.
pub const POLICY_BODY_LIMIT: usize = 256 * 1024;

/// The most a signing request's body may hold: an event of the 128 KiB a relay takes
/// (`embedded` relay's cap), JSON-escaped.
pub const RPC_BODY_LIMIT: usize = 512 * 1024;

/// Builds the whole HTTP application over `state`.
pub fn app(state: AppState) -> Router {
    let mut api = Router::new()
        .merge(admin::routes())
        .merge(auth::routes())
        .merge(oauth::routes())
        .merge(rpc::routes())
        .merge(user::routes())
        .merge(nip05::routes())
        .merge(policies::routes())
        .merge(grants::routes())
        .merge(openapi::routes());
    if let Some(cors) = cors(&state.options().allowed_origins) {
        api = api.layer(cors);
    }
    let mut router = Router::new()
        .merge(health::routes())
        .merge(metrics::routes())
        .merge(pages::routes())
        .merge(approvals::routes())
        .merge(grant_pages::routes())
        .merge(account_pages::routes())
        .merge(api);
    if state.options().test_routes {
        router = router.merge(testing::routes());
    }
    router
        .fallback(error::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin::require_same_origin,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), enforce_timeout))
        .layer(axum::middleware::from_fn(metrics::track_requests))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            page::security_headers,
        ))
        .with_state(state)
}

/// Answers 503 (JSON, like every error) when a request outlives
/// [`HttpOptions::request_timeout`]; zero disables the limit.
async fn enforce_timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.options().request_timeout;
    if limit.is_zero() {
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => AppError::Unavailable(format!(
            "the request took longer than {} s and was abandoned; retry it",
            limit.as_secs_f64()
        ))
        .into_response(),
    }
}

/// CORS for browser apps on `allowed` origins (`ALLOWED_ORIGINS`); `None` when empty. No
/// credentials: cross-origin callers use bearer tokens, never the session cookie.
fn cors(allowed: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderValue, Method};
    let origins: Vec<HeaderValue> = allowed.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    )
}
