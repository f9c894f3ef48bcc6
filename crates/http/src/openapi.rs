//! `GET /api/openapi.json`: the OpenAPI 3.1 document of the HTTP API.
//!
//! The document is written by hand (`crates/http/openapi.json`) and embedded at build time;
//! `tests/openapi.rs` fails when it and the router disagree on paths or methods.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// The OpenAPI 3.1 document, as served.
pub const DOCUMENT: &str = include_str!("../openapi.json");

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/api/openapi.json", get(document))
}

async fn document() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], DOCUMENT)
}
