//! The dashboard's account forms (server-rendered, forms carry the session's CSRF token),
//! calling the JSON API's functions so the rules, backoff, durability wait and mail are the
//! same:
//!
//! - `POST /dashboard/password`: change the password (as `POST /api/user/password`).
//! - `POST /dashboard/delete`: delete the account (as `POST /api/user/delete`), then a page
//!   saying so, the session cookie cleared.

use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;

use crate::extract::{ClientIp, FormOrJson, OverHttps};
use crate::page::{escape, html, layout};
use crate::pages::{check_csrf, see_other};
use crate::session::{clear_cookie, MaybeSession};
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard/password", post(password_form))
        .route("/dashboard/delete", post(delete_form))
        .layer(axum::middleware::from_fn(crate::page::html_errors))
}

/// The dashboard's "Your password" and "Delete your account" sections.
pub(crate) fn dashboard_sections(csrf: &str) -> String {
    format!(
        "<h2>Your password</h2>\
         <form method=\"post\" action=\"/dashboard/password\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Current password <input type=\"password\" name=\"current_password\" required \
         autocomplete=\"current-password\"></label>\
         <label>New password <input type=\"password\" name=\"new_password\" required \
         autocomplete=\"new-password\"></label>\
         <button type=\"submit\">Change the password</button></form>\
         <p>Changing it ends every other session; your apps stay connected.</p>\
         <h2>Delete your account</h2>\
         <p>This deletes your key from keycast for good and disconnects every app. Export the key first if \
         you want to keep this Nostr identity.</p>\
         <form method=\"post\" action=\"/dashboard/delete\" class=\"delete-account\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Password <input type=\"password\" name=\"password\" required autocomplete=\"current-password\"></label>\
         <button type=\"submit\">Delete my account and key</button></form>",
        csrf = escape(csrf),
    )
}

#[derive(Deserialize)]
struct PasswordForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    current_password: String,
    #[serde(default)]
    new_password: String,
}

/// `POST /dashboard/password` (form: CSRF token, current and new password) → 303 back to
/// the dashboard with a new session cookie once the change is durable (as
/// `POST /api/user/password`).
async fn password_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<PasswordForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    let (_, cookie) =
        crate::user::set_password(&state, &ip, secure, &session, form.current_password, form.new_password).await?;
    let mut response = see_other("/dashboard?sent=password");
    response.headers_mut().insert(SET_COOKIE, cookie);
    Ok(response)
}

#[derive(Deserialize)]
struct DeleteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    password: String,
}

/// `POST /dashboard/delete` (form: CSRF token, password) → 200, a page saying the account
/// is gone, once that is durable; the session cookie cleared.
async fn delete_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<DeleteForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    crate::user::remove_account(&state, &ip, &session.user, form.password).await?;
    let body = format!(
        "<h1>Your account is deleted</h1><p>The account {email}, its key and every app's access are gone \
         from keycast. A mail confirms it.</p><p><a href=\"/register\">Create a new account</a></p>",
        email = escape(&session.user.email),
    );
    let mut response = html(StatusCode::OK, layout("Account deleted — keycast", &body));
    response.headers_mut().insert(SET_COOKIE, clear_cookie(secure));
    Ok(response)
}
