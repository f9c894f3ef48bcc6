//! `/metrics` in the Prometheus text format, and the middleware that counts requests.
//!
//! The recorder is installed by the binary; this module only records through the `metrics`
//! facade and renders through the handle in [`AppState`].

use std::time::Instant;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use keycast_core::secret::ct_eq;

use crate::{AppError, AppState};

/// Request counter, labelled by method, route template and status.
pub const HTTP_REQUESTS_TOTAL: &str = "keycast_http_requests_total";
/// Request latency histogram (seconds), labelled by method and route template.
pub const HTTP_REQUEST_DURATION: &str = "keycast_http_request_duration_seconds";
/// Open connections in the database pool.
pub const DB_POOL_CONNECTIONS: &str = "keycast_db_pool_connections";
/// Idle connections in the database pool.
pub const DB_POOL_IDLE: &str = "keycast_db_pool_idle_connections";

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

/// `GET /metrics`: with `KEYCAST_METRICS_TOKEN`, only with `Authorization: Bearer <it>`;
/// without, only for a direct loopback peer (no `X-Forwarded-For`: a proxy on the same host
/// must not make the world local). Refused with 401 / 403 otherwise (issue 12, item 10).
async fn render(State(state): State<AppState>, request: Request) -> Result<Response, AppError> {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    allowed(&state, peer, request.headers())?;
    if let Some(db) = state.db() {
        let (size, idle) = db.pool_stats();
        metrics::gauge!(DB_POOL_CONNECTIONS).set(f64::from(size));
        metrics::gauge!(DB_POOL_IDLE).set(idle as f64);
    }
    for dependency in state.dependencies() {
        dependency.export_metrics();
    }
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics().render()).into_response())
}

pub(crate) fn allowed(state: &AppState, peer: Option<SocketAddr>, headers: &HeaderMap) -> Result<(), AppError> {
    match &state.options().metrics_token {
        Some(token) => {
            let given = headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            if ct_eq(given.trim().as_bytes(), token.expose().as_bytes()) {
                Ok(())
            } else {
                Err(AppError::Unauthorized(
                    "/metrics needs Authorization: Bearer <KEYCAST_METRICS_TOKEN>".into(),
                ))
            }
        }
        None => {
            let local = peer.is_some_and(|p| p.ip().is_loopback()) && !headers.contains_key("x-forwarded-for");
            if local {
                Ok(())
            } else {
                Err(AppError::Forbidden(
                    "/metrics answers loopback only; set KEYCAST_METRICS_TOKEN to scrape it from elsewhere".into(),
                ))
            }
        }
    }
}

/// Counts and times every request. Routes are labelled by their template (`/api/x/{id}`),
/// never the raw path, and methods by the standard ones (hyper accepts any token as a
/// method), so label cardinality stays bounded: each new label set is a series kept for good.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS_TOTAL, "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A request's method as a metrics label: the standard methods by name, any other `other`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
