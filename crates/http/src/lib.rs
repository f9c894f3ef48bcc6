//! keycast's HTTP transport: a thin axum adapter over the layers below it.
//!
//! # Layout
//! - [`state`]: what handlers share ([`AppState`]): the database once it is open, metrics.
//! - [`health`]: `/healthz/{live,startup,ready}` probes.
//! - [`metrics`]: `/metrics` and the request-counting middleware.
//! - [`error`]: [`AppError`], the one way handlers answer with an error (JSON, no internals).
//!
//! [`app`] builds the router without a socket, so tests can drive it with `oneshot`.

pub mod error;
pub mod health;
pub mod metrics;
pub mod state;
mod testing;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

pub use error::AppError;
pub use state::{AppState, BoxFuture, Dependency, Durability, DurabilityMode, HttpOptions};

/// Builds the whole HTTP application over `state`.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new().merge(health::routes()).merge(metrics::routes());
    if state.options().test_routes {
        router = router.merge(testing::routes());
    }
    router
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), enforce_timeout))
        .layer(axum::middleware::from_fn(metrics::track_requests))
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
