//! The operator's API (`/api/admin/*`): registered apps, and finding and deleting accounts.
//! Authenticated by one bearer
//! token, `KEYCAST_ADMIN_TOKEN`, compared in constant time (through SHA-256, so not even
//! its length is timed). A request without a bearer token is 401; without the setting the
//! admin API is off and a request with a token is 404, naming the setting. The same operations exist offline as
//! `keycast clients add|list|remove`.
//!
//! - `GET /api/admin/clients` → `{clients: [{client_id, name, redirect_uris, logo_url, created_at}]}`
//! - `POST /api/admin/clients` `{name, redirect_uris, logo_url?}` → 201, the client with its new id
//! - `DELETE /api/admin/clients/{client_id}` → 204, or 404
//! - `POST /api/admin/users/lookup` `{user_id | email | username | pubkey}` → the account, or
//!   404. A POST so that the address travels in the body: the platform's request log keeps
//!   every URL.
//! - `DELETE /api/admin/users/{user_id}` → 204 once durable, or 404: as the owner's own
//!   deletion, without the password; the address is mailed.

use axum::extract::{FromRequestParts, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use keycast_core::accounts::{self, AccountRef, AccountSummary};
use keycast_core::clients::{self, ClientError, NewClient};
use keycast_core::nostr::{PublicKey, ToBech32};
use keycast_core::secret::{ct_eq, hash_token};
use keycast_db::{now_unix, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::extract::{JsonBody, PathParam};
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/admin/clients", get(list).post(add))
        .route("/api/admin/clients/{client_id}", delete(remove))
        .route("/api/admin/users/lookup", post(lookup_user))
        .route("/api/admin/users/{user_id}", delete(delete_user))
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
        other => keycast_core::InternalError::from(other).into(),
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
    PathParam(client_id): PathParam<String>,
) -> Result<StatusCode, AppError> {
    let (db, _) = state.api()?;
    state.ensure_writable().await?;
    if !clients::remove(db, &client_id).await? {
        return Err(AppError::NotFound(format!("no registered client {client_id:?}")));
    }
    state.confirm_write(true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One way to name an account; exactly one field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lookup {
    user_id: Option<String>,
    email: Option<String>,
    username: Option<String>,
    /// Hex or `npub`.
    pubkey: Option<String>,
}

impl Lookup {
    fn account_ref(self) -> Result<AccountRef, AppError> {
        let given = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let fields = [
            given(self.user_id),
            given(self.email),
            given(self.username),
            given(self.pubkey),
        ];
        let [user_id, email, username, pubkey] = match fields.iter().filter(|f| f.is_some()).count() {
            1 => fields,
            _ => {
                return Err(AppError::BadRequest(
                    "name the account by exactly one of user_id, email, username or pubkey".into(),
                ))
            }
        };
        Ok(if let Some(id) = user_id {
            AccountRef::Id(UserId::new(id.trim()))
        } else if let Some(email) = email {
            AccountRef::Email(email)
        } else if let Some(name) = username {
            AccountRef::Username(name)
        } else {
            let text = pubkey.unwrap_or_default();
            let key = PublicKey::parse(text.trim())
                .map_err(|_| AppError::BadRequest("pubkey is neither 64 hex digits nor an npub".into()))?;
            AccountRef::Pubkey(key)
        })
    }
}

fn summary_json(found: &AccountSummary) -> Value {
    let user = &found.user;
    json!({
        "user_id": user.id.as_str(),
        "email": user.email,
        "email_verified": user.email_verified_at.is_some(),
        "username": user.username,
        "pubkey": found.pubkey.map(|k| k.to_hex()),
        "npub": found.pubkey.and_then(|k| k.to_bech32().ok()),
        "created_at": user.created_at,
        "live_authorizations": found.live_authorizations,
    })
}

async fn lookup_user(
    State(state): State<AppState>,
    _: Admin,
    JsonBody(body): JsonBody<Lookup>,
) -> Result<Json<Value>, AppError> {
    let by = body.account_ref()?;
    let (db, _) = state.api()?;
    match accounts::find_for_operator(db, &by).await? {
        Some(found) => Ok(Json(summary_json(&found))),
        None => Err(AppError::NotFound("no account matches".into())),
    }
}

async fn delete_user(
    State(state): State<AppState>,
    _: Admin,
    PathParam(user_id): PathParam<String>,
) -> Result<StatusCode, AppError> {
    let (db, services) = state.api()?;
    let id = UserId::new(user_id);
    // Read first: the mail goes to the address the row held.
    let Some(user) = keycast_db::users::find_by_id(db, &id).await? else {
        return Err(AppError::NotFound(format!("no account with user_id {:?}", id.as_str())));
    };
    state.ensure_writable().await?;
    accounts::delete_account_as_operator(&services.signer, &id).await?;
    state.confirm_write(true).await?;
    crate::auth::send_account_deleted_notice(&state, &user, crate::auth::DeletedBy::Operator);
    Ok(StatusCode::NO_CONTENT)
}
