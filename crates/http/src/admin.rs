//! The operator's API (`/api/admin/*`): registered apps. Authenticated by one bearer
//! token, `KEYCAST_ADMIN_TOKEN`, compared in constant time (through SHA-256, so not even
//! its length is timed). A request without a bearer token is 401; without the setting the
//! admin API is off and a request with a token is 404, naming the setting. The same operations exist offline as
//! `keycast clients add|list|remove`.
//!
//! - `GET /api/admin/clients` → `{clients: [{client_id, name, redirect_uris, logo_url, created_at}]}`
//! - `POST /api/admin/clients` `{name, redirect_uris, logo_url?}` → 201, the client with its new id
//! - `DELETE /api/admin/clients/{client_id}` → 204, or 404

use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use keycast_core::clients::{self, ClientError, NewClient};
use keycast_core::secret::{ct_eq, hash_token};
use keycast_db::now_unix;
use serde_json::{json, Value};

use crate::extract::JsonBody;
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/admin/clients", get(list).post(add))
        .route("/api/admin/clients/{client_id}", delete(remove))
}

/// Proof that the request carries the admin token.
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let unauthorized =
            || AppError::Unauthorized("the admin API needs Authorization: Bearer <KEYCAST_ADMIN_TOKEN>".into());
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(unauthorized)?;
        let Some(token) = &state.options().admin_token else {
            return Err(AppError::NotFound(
                "the admin API is off: set KEYCAST_ADMIN_TOKEN to turn it on".into(),
            ));
        };
        let expected = hash_token(token.expose());
        if ct_eq(hash_token(given).as_str().as_bytes(), expected.as_str().as_bytes()) {
            Ok(Admin)
        } else {
            Err(unauthorized())
        }
    }
}

fn client_error(err: ClientError) -> AppError {
    match err {
        ClientError::Invalid(message) => AppError::BadRequest(message),
        other => AppError::internal(other),
    }
}

async fn list(State(state): State<AppState>, _: Admin) -> Result<Json<Value>, AppError> {
    let (db, _) = state.api()?;
    let clients = clients::list(db).await.map_err(client_error)?;
    Ok(Json(json!({ "clients": clients })))
}

async fn add(
    State(state): State<AppState>,
    _: Admin,
    JsonBody(new): JsonBody<NewClient>,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let (db, _) = state.api()?;
    state.ensure_writable().await?;
    let client = clients::register(db, &new, now_unix()).await.map_err(client_error)?;
    state.confirm_write(true).await?;
    Ok((StatusCode::CREATED, Json(json!(client))))
}

async fn remove(
    State(state): State<AppState>,
    _: Admin,
    Path(client_id): Path<String>,
) -> Result<StatusCode, AppError> {
    let (db, _) = state.api()?;
    state.ensure_writable().await?;
    if !clients::remove(db, &client_id).await? {
        return Err(AppError::NotFound(format!("no registered client {client_id:?}")));
    }
    state.confirm_write(true).await?;
    Ok(StatusCode::NO_CONTENT)
}
