//! Routes that exist only for the black-box tests, mounted when
//! [`HttpOptions::test_routes`](crate::HttpOptions) is on (`KEYCAST_TEST_ROUTES=true`).

use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::extract::QueryParams;
use crate::{AppError, AppState};

/// Longest sleep the slow route accepts, so a typo cannot hang a test run.
const MAX_SLEEP_MS: u64 = 30_000;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/test/slow", get(slow))
        .route("/api/test/write", post(write))
        .route("/api/test/outbox", get(outbox))
        .route("/api/test/failpoint", post(failpoint))
}

#[derive(Deserialize)]
struct FailpointQuery {
    name: String,
    actions: String,
}

/// Arms one of keycast's `fail_point!`s, e.g. `name=replica-worker&actions=panic(injected)`
/// (the `fail` crate's action syntax): how the tests make a task the instance cannot serve
/// without end, and watch what the instance does about it.
async fn failpoint(QueryParams(q): QueryParams<FailpointQuery>) -> Result<Json<Value>, AppError> {
    if !fail::has_failpoints() {
        return Err(AppError::NotFound(
            "this keycast was built without fault injection (cargo feature keycast/failpoints, which scripts/test.sh turns on)".into(),
        ));
    }
    fail::cfg(q.name.clone(), &q.actions).map_err(|e| AppError::BadRequest(format!("actions {:?}: {e}", q.actions)))?;
    tracing::warn!(name = %q.name, actions = %q.actions, "a test armed a failpoint");
    Ok(Json(json!({ "name": q.name, "actions": q.actions })))
}

#[derive(Deserialize)]
struct WriteQuery {
    key: String,
    #[serde(default)]
    durable: bool,
}

/// Inserts one row (`keycast_meta`, key `test:<key>`) in its own transaction, and with
/// `durable=true` answers only once it is in the replica: the writes the replication tests
/// count and look for after a crash or a redeploy.
async fn write(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<WriteQuery>,
) -> Result<Json<Value>, AppError> {
    let db = state
        .db()
        .ok_or_else(|| AppError::Unavailable("keycast is starting".into()))?;
    state.ensure_writable().await?;
    keycast_db::meta::insert(db, &format!("test:{}", q.key), &keycast_db::now_unix().to_string())
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?;
    state.confirm_write(q.durable).await?;
    Ok(Json(json!({ "key": q.key, "durable": q.durable })))
}

/// Every message in the development outbox, tokens included (what a user would find in
/// their mailbox).
async fn outbox(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "messages": state.outbox().messages() }))
}

#[derive(Deserialize)]
struct SlowQuery {
    ms: u64,
}

/// Answers after `ms` milliseconds: an in-flight request that graceful shutdown must finish.
async fn slow(QueryParams(q): QueryParams<SlowQuery>) -> Json<Value> {
    let ms = q.ms.min(MAX_SLEEP_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Json(json!({ "slept_ms": ms }))
}
