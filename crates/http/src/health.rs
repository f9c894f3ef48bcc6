//! Kubernetes/Cloud Run style probes.
//!
//! - `live`: the process is up and serving HTTP — 200 unless a dependency says it can never
//!   serve properly again (e.g. replication fenced for good); then 503, so the platform
//!   replaces the instance.
//! - `startup`: 200 once the database is open and migrated (and, with a replica, restored);
//!   503 before, so the platform does not send traffic to an instance still restoring.
//! - `ready`: 200 only when every dependency (e.g. replication) is healthy and a real query
//!   succeeds right now; 503 with a JSON reason otherwise.
//!
//! The reasons name the lease's holder (host and process), the store's error (bucket, prefix,
//! service account) or the database's: on a public URL that is a map for whoever asks. They
//! are given whole to those `/metrics` answers (a direct loopback peer, or the metrics token);
//! anyone else gets that the instance is not ready, and where to look.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
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

/// Who asked: whether they may read the reasons whole (see the module's doc).
struct Asker {
    trusted: bool,
}

impl axum::extract::FromRequestParts<AppState> for Asker {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        Ok(Asker {
            trusted: crate::metrics::allowed(state, peer, &parts.headers).is_ok(),
        })
    }
}

impl Asker {
    /// `reason` whole for a trusted asker; otherwise what it is about, without its details.
    fn unavailable(&self, what: &str, reason: String) -> AppError {
        AppError::Unavailable(if self.trusted {
            reason
        } else {
            format!(
                "{what}; the instance's log says why (and this probe, asked from the instance's own machine or \
                 with KEYCAST_METRICS_TOKEN)"
            )
        })
    }
}

async fn live(State(state): State<AppState>, asker: Asker) -> Result<Json<Value>, AppError> {
    for dependency in state.dependencies() {
        dependency
            .liveness()
            .map_err(|reason| asker.unavailable("keycast can no longer serve", reason))?;
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

async fn ready(State(state): State<AppState>, asker: Asker) -> Result<Json<Value>, AppError> {
    let db = state
        .db()
        .ok_or_else(|| AppError::Unavailable("keycast is starting: the database is not open yet".into()))?;
    for dependency in state.dependencies() {
        dependency
            .readiness()
            .map_err(|reason| asker.unavailable("keycast is not ready", reason))?;
    }
    match tokio::time::timeout(READY_QUERY_TIMEOUT, db.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({ "status": "ok" }))),
        Ok(Err(e)) => Err(asker.unavailable(
            "the database did not answer a query",
            format!("the database did not answer a query: {e}"),
        )),
        Err(_) => Err(AppError::Unavailable(format!(
            "the database did not answer a query within {} s",
            READY_QUERY_TIMEOUT.as_secs()
        ))),
    }
}
