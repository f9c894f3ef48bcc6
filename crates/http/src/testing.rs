//! Routes that exist only for the black-box tests, mounted when
//! [`HttpOptions::test_routes`](crate::HttpOptions) is on (`KEYCAST_TEST_ROUTES=true`).

use std::time::Duration;

use axum::extract::Query;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::AppState;

/// Longest sleep the slow route accepts, so a typo cannot hang a test run.
const MAX_SLEEP_MS: u64 = 30_000;

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/api/test/slow", get(slow))
}

#[derive(Deserialize)]
struct SlowQuery {
    ms: u64,
}

/// Answers after `ms` milliseconds: an in-flight request that graceful shutdown must finish.
async fn slow(Query(q): Query<SlowQuery>) -> Json<Value> {
    let ms = q.ms.min(MAX_SLEEP_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Json(json!({ "slept_ms": ms }))
}
