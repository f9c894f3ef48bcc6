//! Kubernetes/Cloud Run style probes.
//!
//! - `live`: the process is up and serving HTTP — 200 unless a dependency says it can never
//!   serve properly again (e.g. replication fenced for good); then 503, so the platform
//!   replaces the instance.
//! - `startup`: 200 once the database is open and migrated (and, with a replica, restored);
//!   503 before, so the platform does not send traffic to an instance still restoring.
//! - `ready`: 200 only when every dependency (e.g. replication) is healthy and a real query
//!   succeeds right now; 503 with a JSON reason otherwise.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::{AppError, AppState};

/// How long the readiness query may take before the instance is reported unready.
const READY_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz/live", get(live))
        .route("/healthz/startup", get(startup))
        .route("/healthz/ready", get(ready))
}

async fn live(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    for dependency in state.dependencies() {
        dependency.liveness().map_err(AppError::Unavailable)?;
    }
    Ok(Json(json!({ "status": "ok" })))
}

async fn startup(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    match state.db() {
        Some(_) => Ok(Json(json!({ "status": "ok" }))),
        None => Err(AppError::Unavailable(
            "keycast is starting: the database is not open yet".into(),
        )),
    }
}

async fn ready(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let db = state
        .db()
        .ok_or_else(|| AppError::Unavailable("keycast is starting: the database is not open yet".into()))?;
    for dependency in state.dependencies() {
        dependency.readiness().map_err(AppError::Unavailable)?;
    }
    match tokio::time::timeout(READY_QUERY_TIMEOUT, db.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({ "status": "ok" }))),
        Ok(Err(e)) => Err(AppError::Unavailable(format!(
            "the database did not answer a query: {e}"
        ))),
        Err(_) => Err(AppError::Unavailable(format!(
            "the database did not answer a query within {} s",
            READY_QUERY_TIMEOUT.as_secs()
        ))),
    }
}
