//! `/metrics` in the Prometheus text format, and the middleware that counts requests.
//!
//! The recorder is installed by the binary; this module only records through the `metrics`
//! facade and renders through the handle in [`AppState`].

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

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

async fn render(State(state): State<AppState>) -> impl IntoResponse {
    if let Some(db) = state.db() {
        let (size, idle) = db.pool_stats();
        metrics::gauge!(DB_POOL_CONNECTIONS).set(f64::from(size));
        metrics::gauge!(DB_POOL_IDLE).set(idle as f64);
    }
    for dependency in state.dependencies() {
        dependency.export_metrics();
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics().render())
}

/// Counts and times every request. Routes are labelled by their template (`/api/x/{id}`),
/// never the raw path, so label cardinality stays bounded.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS_TOTAL, "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
