//! NIP-05: `GET /.well-known/nostr.json?name=` for users who chose a username, and
//! `POST /api/user/username` to choose one.

use axum::extract::State;
use axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keycast_core::{accounts, keys};
use keycast_db::{now_unix, users};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::extract::{JsonBody, QueryParams};
use crate::session::SessionUser;
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/.well-known/nostr.json", get(nostr_json))
        .route("/api/user/username", post(set_username))
}

#[derive(Deserialize)]
struct NameQuery {
    #[serde(default)]
    name: String,
}

/// `GET /.well-known/nostr.json?name=alice` → `{"names": {"alice": "<hex>"}, "nip46": {…}}`
/// (empty `names` for an unknown name). Readable from any origin, as NIP-05 requires.
///
/// `nip46` is NIP-46's remote-signer discovery (issue 16): the relays keycast's bunkers
/// listen on, and `nostrconnect_url`, the page an app opens with its `nostrconnect://` URI in
/// place of `<nostrconnect>` — the consent form, after logging in. So an app that knows only
/// `name@keycast` reaches a consent flow. `names._` (a signer-wide key) is not published:
/// keycast has a key per authorization, which the app learns from the `connect` answer.
async fn nostr_json(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<NameQuery>,
) -> Result<Response, AppError> {
    let (db, _) = state.api()?;
    let name = q.name.trim().to_lowercase();
    let mut names = serde_json::Map::new();
    let reserved = &state.options().reserved_usernames;
    // A reserved name is never served, even if an account took it before it was reserved.
    if accounts::validate_username(&name, reserved).is_ok() {
        if let Some(user) = users::find_by_username(db, &name).await? {
            let key = keys::find_user_key(db, &user.id).await?;
            names.insert(name, Value::String(key.pubkey.to_hex()));
        }
    }
    let options = state.options();
    let nip46 = json!({
        "relays": options.relays,
        // In the fragment: the URI carries the app's secret (see `pages::nostrconnect_review`).
        "nostrconnect_url": format!("{}/dashboard#nostrconnect=<nostrconnect>", options.public_url.trim_end_matches('/')),
    });
    let cors = [(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"))];
    Ok((cors, Json(json!({ "names": names, "nip46": nip46 }))).into_response())
}

#[derive(Deserialize)]
struct UsernameBody {
    username: String,
}

/// `POST /api/user/username {username}` → `{username, nip05}`; 409 if taken.
async fn set_username(
    State(state): State<AppState>,
    session: SessionUser,
    JsonBody(body): JsonBody<UsernameBody>,
) -> Result<Json<Value>, AppError> {
    keycast_core::account_security::require_verified(&session.user)?;
    let name = accounts::validate_username(&body.username, &state.options().reserved_usernames)
        .map_err(|e| AppError::BadRequest(e.to_string()))?;
    let (db, _) = state.api()?;
    state.ensure_writable().await?;
    users::set_username(db, &session.user.id, Some(&name), now_unix())
        .await
        .map_err(|e| match e.is_duplicate_of("username") {
            true => AppError::Conflict("this username is taken".into()),
            false => e.into(),
        })?;
    state.confirm_write(false).await?;
    let host = url::Url::parse(&state.options().public_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    Ok(Json(json!({ "username": name, "nip05": format!("{name}@{host}") })))
}
