//! The account pages, server-rendered for people (not part of the JSON API nor of
//! `openapi.json`): `GET /` (to the dashboard or the login page), the register and login
//! forms, the dashboard (key, authorizations with a revoke button, recent activity, log
//! out, a new verification link), and the pages the mailed links lead to:
//! `/verify-email#token=` (a button that confirms the address), `/reset-password#token=`
//! (a new-password form) and `/forgot-password` (asks for a reset link).
//!
//! The form handlers call the same functions as the JSON endpoints
//! ([`crate::auth::sign_up`], [`crate::auth::log_in`], [`crate::auth::end_session`],
//! [`crate::auth::confirm_email`], [`crate::auth::request_mail`],
//! [`crate::auth::set_new_password`], [`crate::user::revoke_authorization`]), so rate
//! limits and durability are the same. Every value shown is escaped with [`escape`].
//! State-changing forms of a session (revoke, log out, resend) carry the session's CSRF
//! token; every post from another site is refused before it gets here (`origin`, login
//! CSRF), and the mailed forms also need the mailed token.
//!
//! Every error on these routes is an HTML page with its status ([`crate::page::html_errors`]).
//! Verifying takes a click rather than happening on `GET`, so a mail scanner that opens the
//! link does not use the single-use token up.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::header::{LOCATION, RETRY_AFTER, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use keycast_core::account_security;
use keycast_core::keys;
use keycast_core::nostr::nips::nip19::ToBech32;
use keycast_db::sessions::TokenPurpose;
use keycast_db::{activity, authz as authz_repo};
use serde::Deserialize;

use crate::extract::{ClientIp, FormOrJson, OverHttps, PathParam, QueryParams};
use crate::page::{escape, html, layout, layout_with};
use crate::session::{clear_cookie, csrf_matches, csrf_token, MaybeSession, SessionUser};
use crate::{AppError, AppState};

/// How many activity records the dashboard shows.
const DASHBOARD_ACTIVITY: i64 = 50;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/register", get(register_page).post(register_form))
        .route("/login", get(login_page).post(login_form))
        .route("/logout", post(logout_form))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/authorizations/{id}/revoke", post(revoke_form))
        .route("/dashboard/resend-verification", post(resend_form))
        .route("/dashboard/nostrconnect", post(nostrconnect_form))
        .route("/dashboard/nostrconnect/review", post(nostrconnect_review))
        .route("/dashboard/key/replace", post(replace_key_form))
        .route("/dashboard/key/dismiss-exposure", post(dismiss_exposure_form))
        .route("/verify-email", get(verify_page).post(verify_form))
        .route("/forgot-password", get(forgot_page).post(forgot_form))
        .route("/reset-password", get(reset_page).post(reset_form))
        .layer(axum::middleware::from_fn(crate::page::html_errors))
}

/// `GET /` → 303 to `/dashboard` with a session, to `/login` without.
async fn home(MaybeSession(session): MaybeSession) -> Response {
    see_other(if session.is_some() { "/dashboard" } else { "/login" })
}

async fn register_page() -> Response {
    html(StatusCode::OK, register_html("", None))
}

async fn login_page(MaybeSession(session): MaybeSession) -> Response {
    if session.is_some() {
        return see_other("/dashboard");
    }
    html(StatusCode::OK, login_html("", None))
}

#[derive(Deserialize)]
struct RegisterForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    nsec: Option<String>,
}

/// `POST /register` (form) → 303 to `/dashboard` with the session cookie, or the form again
/// with the reason (400, 409, 429).
async fn register_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    FormOrJson { value: form, .. }: FormOrJson<RegisterForm>,
) -> Result<Response, AppError> {
    let email = form.email.clone();
    match crate::auth::sign_up(&state, &ip, secure, form.email, form.password, form.nsec).await {
        Ok((_, _, cookie)) => Ok(logged_in(cookie)),
        Err(err) => form_error(err, |message| register_html(&email, Some(message))),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

/// `POST /login` (form) → 303 to `/dashboard` with the session cookie, or the form again
/// with the reason (400, 401, 429).
async fn login_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    FormOrJson { value: form, .. }: FormOrJson<LoginForm>,
) -> Result<Response, AppError> {
    match crate::auth::log_in(&state, &ip, secure, &form.email, form.password).await {
        Ok((_, cookie)) => Ok(logged_in(cookie)),
        Err(err) => form_error(err, |message| login_html(&form.email, Some(message))),
    }
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    pub(crate) csrf: String,
}

/// `POST /logout` (form with the CSRF token) → 303 to `/login`, the session ended and the
/// cookie cleared. Without a live session it only clears the cookie.
async fn logout_form(
    State(state): State<AppState>,
    OverHttps(secure): OverHttps,
    MaybeSession(session): MaybeSession,
    headers: HeaderMap,
    FormOrJson { value: form, .. }: FormOrJson<CsrfForm>,
) -> Result<Response, AppError> {
    if let Some(session) = session {
        check_csrf(&session, &form.csrf)?;
        crate::auth::end_session(&state, &headers, secure).await?;
    }
    let mut response = see_other("/login");
    response.headers_mut().insert(SET_COOKIE, clear_cookie(secure));
    Ok(response)
}

/// `POST /dashboard/authorizations/{id}/revoke` (form with the CSRF token) → 303 back to
/// the dashboard once the revocation is durable; 403 without the right token, 404 if it is
/// not the user's live authorization.
async fn revoke_form(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    PathParam(id): PathParam<String>,
    FormOrJson { value: form, .. }: FormOrJson<CsrfForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    crate::user::revoke_authorization(&state, &session.user.id, id).await?;
    Ok(see_other("/dashboard"))
}

#[derive(Deserialize)]
struct NostrConnectForm {
    csrf: String,
    uri: String,
    policy: String,
}

/// What a `nostrconnect://` link that filled the form in names, for the owner to check before
/// choosing: the name and site the app gives itself (its own words), its key, and the relays
/// keycast would connect to for it.
fn linked_app(uri: &str) -> String {
    let parsed = match keycast_core::nostrconnect::NostrConnectUri::parse(uri) {
        Ok(parsed) => parsed,
        Err(e) => {
            return format!(
                "<p class=\"error\">The link you followed is not usable: {}</p>",
                escape(&e.to_string())
            )
        }
    };
    let key = parsed.client.to_bech32().unwrap_or_else(|_| parsed.client.to_hex());
    let relays: String = parsed
        .relays
        .iter()
        .map(|r| format!("<li><code>{}</code></li>", escape(r)))
        .collect();
    format!(
        "<p>A link asks you to connect an app. Check it is the app you mean: the name and site are \
         what the app says of itself.</p><dl>\
         <dt>Name</dt><dd>{name}</dd><dt>Site</dt><dd>{site}</dd>\
         <dt>App key</dt><dd><code>{key}</code></dd><dt>Relays</dt><dd><ul>{relays}</ul></dd></dl>",
        name = escape(parsed.name.as_deref().unwrap_or("(none given)")),
        site = escape(parsed.url.as_deref().unwrap_or("(none given)")),
        key = escape(&key),
    )
}

/// `POST /dashboard/nostrconnect` (form: CSRF token, `uri`, `policy`) → 303 back to the
/// dashboard once the authorization is durable (keycast then answers the app on its
/// relays); a bad URI or policy shows an error page saying what is wrong.
async fn nostrconnect_form(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<NostrConnectForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    crate::user::accept_nostrconnect(&state, &session, &form.uri, &form.policy).await?;
    Ok(see_other("/dashboard?sent=nostrconnect"))
}

#[derive(Deserialize)]
struct ReplaceKeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    password: String,
}

/// `POST /dashboard/key/replace` (form: CSRF token, password) → 303 back to the dashboard
/// with a new key; every authorization revoked (as `POST /api/user/key/replace`).
async fn replace_key_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<ReplaceKeyForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    crate::user::start_fresh(&state, &ip, &session.user, form.password).await?;
    Ok(see_other("/dashboard?sent=newkey"))
}

/// `POST /dashboard/key/dismiss-exposure` (form with the CSRF token) → 303 back to the
/// dashboard without the exposure warning (as `DELETE /api/user/key/exposure`).
async fn dismiss_exposure_form(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<CsrfForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    crate::user::dismiss_key_exposure(&state, &session.user.id).await?;
    Ok(see_other("/dashboard"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DashboardQuery {
    /// `verification` after a new verification link was requested.
    sent: Option<String>,
    /// An app's `nostrconnect://` URI from a link made before the fragment form
    /// (`#nostrconnect=`, NIP-46 discovery's `nostrconnect_url`): sent on to that form.
    nostrconnect: Option<String>,
}

/// `GET /dashboard` → the user's key, authorizations and recent activity; 303 to `/login`
/// without a session. `?nostrconnect=` (a link made before the fragment form below) is sent
/// on to `#nostrconnect=` at once: rendered in place, the app's secret stayed in the address
/// bar and went out as the `Referer` of every post from the page.
async fn dashboard(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    QueryParams(query): QueryParams<DashboardQuery>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    if let Some(uri) = query.nostrconnect.as_deref().filter(|uri| !uri.is_empty()) {
        return to_fragment("/dashboard", "nostrconnect", uri);
    }
    dashboard_page(&state, &session, &query).await
}

#[derive(Deserialize)]
struct ReviewForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    uri: String,
}

/// `POST /dashboard/nostrconnect/review` (form: CSRF token, `uri`) → the dashboard with the
/// `nostrconnect://` form filled in. NIP-46 discovery's `nostrconnect_url` is
/// `/dashboard#nostrconnect=<uri>`: the URI carries the app's secret, which in a query would
/// be in every request log in front of keycast (and in the `Referer` of the page's own
/// posts) — whoever read it could answer the app first, as its signer. The page's script
/// takes it from the fragment, which no request carries, and posts it here.
async fn nostrconnect_review(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<ReviewForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    let query = DashboardQuery {
        sent: None,
        nostrconnect: Some(form.uri),
    };
    dashboard_page(&state, &session, &query).await
}

async fn dashboard_page(state: &AppState, session: &SessionUser, query: &DashboardQuery) -> Result<Response, AppError> {
    let (db, _) = state.api()?;
    let key = keys::find_user_key(db, &session.user.id).await?;
    let authorizations = authz_repo::list_for_user(db, &session.user.id, keycast_db::now_unix()).await?;
    // The user's own policies name their grants and may be chosen for a new app too.
    let policies = crate::grants::policies_by_id(db, &session.user.id, &authorizations).await?;
    let recent = activity::list_for_user(db, &session.user.id, DASHBOARD_ACTIVITY).await?;
    let events = account_security::account_events(db, &session.user.id, DASHBOARD_ACTIVITY).await?;
    let exposure = account_security::key_exposure(db, &session.user.id).await?;
    let csrf = escape(&csrf_token(&session.token));

    let npub = key.pubkey.to_bech32().unwrap_or_default();
    let verified = session.user.email_verified_at.is_some();
    let mut body = format!(
        "<header class=\"bar\"><h1>keycast</h1>\
         <form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\">Log out</button></form></header>\
         <p>Signed in as <strong>{email}</strong>{unverified}.</p>{resend}{notice}\
         <h2>Your key</h2>\
         <dl><dt>npub</dt><dd><code class=\"npub\">{npub}</code></dd>\
         <dt>Public key (hex)</dt><dd><code>{hex}</code></dd>\
         <dt>Origin</dt><dd>{origin}</dd></dl>{exposed}\
         <h2>Authorized apps</h2>\
         <p><a href=\"/dashboard/policies\">Your policies</a>: build your own from permissions.</p>",
        exposed = exposure_html(exposure.as_ref(), &csrf),
        email = escape(&session.user.email),
        unverified = if verified { "" } else { " (email not verified yet)" },
        // A form cannot sit inside a paragraph (the parser would close it): its own block.
        resend = if verified {
            String::new()
        } else {
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/dashboard/resend-verification\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <button type=\"submit\">Send the verification link again</button></form>"
            )
        },
        notice = match query.sent.as_deref() {
            Some("verification") => {
                "<p class=\"notice\" role=\"status\">A new verification link is on its way to your mailbox.</p>"
            }
            Some("nostrconnect") => {
                "<p class=\"notice\" role=\"status\">The app is authorized; keycast has answered it on its relays.</p>"
            }
            Some("newkey") => {
                "<p class=\"notice\" role=\"status\">You have a new key; every app was disconnected.</p>"
            }
            Some("password") => {
                "<p class=\"notice\" role=\"status\">Your password is changed; every other session has ended.</p>"
            }
            _ => "",
        },
        npub = escape(&npub),
        hex = escape(&key.pubkey.to_hex()),
        origin = escape(key.origin.as_str()),
    );

    if authorizations.is_empty() {
        body.push_str("<p>No app is authorized to sign for you yet.</p>");
    } else {
        body.push_str(
            "<table><thead><tr><th>App</th><th>Redirect origin</th><th>Policy</th>\
             <th>Created</th><th>Status</th></tr></thead><tbody>",
        );
        for row in &authorizations {
            let policy = policies
                .get(&row.policy_id)
                .map(|p| format!("{} (<code>{}</code>)", escape(&p.display_name), escape(&p.slug)))
                .unwrap_or_else(|| "?".into());
            let status = match row.revoked_at {
                Some(at) => format!("revoked {}", escape(&time(at))),
                None => format!(
                    "<form method=\"post\" action=\"/dashboard/authorizations/{id}/revoke\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <button type=\"submit\">Revoke</button></form>",
                    id = escape(row.id.as_str()),
                ),
            };
            body.push_str(&format!(
                "<tr class=\"authorization\"><td><a href=\"/dashboard/authorizations/{id}\">{client}</a></td>\
                 <td>{origin}</td><td>{policy}</td><td>{created}</td><td>{status}</td></tr>",
                id = escape(row.id.as_str()),
                client = escape(&row.client_id),
                origin = escape(&row.redirect_origin),
                created = escape(&time(row.created_at)),
            ));
        }
        body.push_str("</tbody></table>");
    }

    let mut choices: Vec<_> = policies.values().filter(|p| p.deleted_at.is_none()).collect();
    choices.sort_by(|a, b| a.slug.cmp(&b.slug));
    // A link may fill the form in (NIP-46 discovery's `nostrconnect_url`), from any site:
    // then the page says what the link names, and nothing is chosen for the owner.
    let linked = query.nostrconnect.as_deref().filter(|uri| !uri.is_empty());
    let options: String = choices
        .iter()
        .map(|p| {
            format!(
                "<option value=\"{slug}\"{selected}>{name}</option>",
                slug = escape(&p.slug),
                selected = if linked.is_none() && p.slug == "social" {
                    " selected"
                } else {
                    ""
                },
                name = escape(&p.display_name),
            )
        })
        .collect();
    let placeholder = if linked.is_some() {
        "<option value=\"\" selected disabled>choose what it may do</option>"
    } else {
        ""
    };
    // Filled from the fragment and posted by the page's script (see `nostrconnect_review`).
    if linked.is_none() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/dashboard/nostrconnect/review\" data-submit-when-filled hidden>\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input name=\"uri\" autocomplete=\"off\" data-from-fragment=\"nostrconnect\"></form>"
        ));
    }
    body.push_str(&format!(
        "<h2>Connect an app with nostrconnect://</h2>{summary}\
         <form method=\"post\" action=\"/dashboard/nostrconnect\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>The app's <code>nostrconnect://</code> link\
         <input name=\"uri\" required autocomplete=\"off\" spellcheck=\"false\" placeholder=\"nostrconnect://…\" \
         value=\"{uri}\"></label>\
         <label>Allow it to<select name=\"policy\" required>{placeholder}{options}</select></label>\
         <button type=\"submit\" data-after-view>Authorize the app</button></form>",
        summary = linked.map(linked_app).unwrap_or_default(),
        uri = escape(linked.unwrap_or_default()),
    ));

    body.push_str(&crate::account_pages::dashboard_sections(&csrf_token(&session.token)));

    body.push_str("<h2>Recent activity</h2>");
    if !events.is_empty() {
        body.push_str(
            "<table class=\"account-events\"><thead><tr><th>When</th><th>Your account</th><th>Details</th>\
             </tr></thead><tbody>",
        );
        for e in &events {
            body.push_str(&format!(
                "<tr><td>{when}</td><td>{event}</td><td>{detail}</td></tr>",
                when = escape(&time(e.created_at)),
                event = escape(&e.event.replace('_', " ")),
                detail = escape(&e.detail),
            ));
        }
        body.push_str("</tbody></table>");
    }
    if recent.is_empty() {
        body.push_str("<p>No signing activity yet (it appears about a second after a request).</p>");
    } else {
        let apps: HashMap<_, _> = authorizations
            .iter()
            .map(|a| (a.id.clone(), a.client_id.as_str()))
            .collect();
        body.push_str(
            "<table><thead><tr><th>When</th><th>App</th><th>Method</th><th>Kind</th>\
             <th>Transport</th></tr></thead><tbody>",
        );
        for a in &recent {
            body.push_str(&format!(
                "<tr><td>{when}</td><td>{app}</td><td>{method}</td><td>{kind}</td><td>{transport}</td></tr>",
                when = escape(&time(a.created_at)),
                app = escape(apps.get(&a.authorization_id).copied().unwrap_or("?")),
                method = escape(&a.method),
                kind = a.kind.map(|k| k.to_string()).unwrap_or_default(),
                transport = escape(&a.transport),
            ));
        }
        body.push_str("</tbody></table>");
    }

    let page = layout_with(
        "Dashboard",
        "body{max-width:56rem}table{border-collapse:collapse;width:100%}\
         th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:middle}\
         td form,td button,.bar button{margin:0;width:auto}form.inline button{width:auto}\
         .notice{color:#060}.exposed{border:2px solid #b00;padding:0 1rem;margin:1rem 0}.bar{display:flex;justify-content:space-between;\
         align-items:center}dd{margin:0 0 .5rem}code{word-break:break-all}",
        &body,
    );
    Ok(html(StatusCode::OK, page))
}

/// The warning shown while the key may be known to a previous holder of the account, with
/// the two ways out: a new key (password), or "this key is mine".
fn exposure_html(exposure: Option<&(i64, String)>, csrf: &str) -> String {
    let Some((since, reason)) = exposure else {
        return String::new();
    };
    format!(
        "<section class=\"exposed\" role=\"alert\"><h2>Your key may be known to someone else</h2>\
         <p>{text} (noted {since}.)</p>\
         <form method=\"post\" action=\"/dashboard/key/replace\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Password <input type=\"password\" name=\"password\" required autocomplete=\"current-password\"></label>\
         <button type=\"submit\">Start fresh with a new key</button></form>\
         <p>A new key disconnects every app; your followers see a new account. If you alone ever held this key \
         (you brought it, or you exported it yourself), you may keep it:</p>\
         <form method=\"post\" action=\"/dashboard/key/dismiss-exposure\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\" data-after-view>This key is mine alone: hide this warning</button></form></section>",
        text = escape(account_security::exposure_text(reason)),
        since = escape(&time(*since)),
    )
}

/// `POST /dashboard/resend-verification` (form with the CSRF token) → 303 back to the
/// dashboard, which says a new link is on its way (as `POST /api/auth/resend-verification`).
async fn resend_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<CsrfForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else {
        return Ok(see_other("/login"));
    };
    check_csrf(&session, &form.csrf)?;
    crate::auth::request_mail(&state, &ip, &session.user.email, TokenPurpose::VerifyEmail).await?;
    Ok(see_other("/dashboard?sent=verification"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenForm {
    token: String,
    password: String,
}

/// The mailed token of a link, or a 400 page when the link was cut short.
fn mailed_token(token: &str) -> Result<&str, AppError> {
    if token.trim().is_empty() {
        Err(AppError::BadRequest(
            "this link is incomplete: open the link from the mail exactly as it was sent".into(),
        ))
    } else {
        Ok(token.trim())
    }
}

/// Whether a mailed link's token still works; `false` shows the dead-link page at once.
async fn link_is_live(state: &AppState, token: &str, purpose: TokenPurpose) -> Result<bool, AppError> {
    let (db, _) = state.api()?;
    Ok(keycast_core::accounts::mail_token_is_live(db, token, purpose, keycast_db::now_unix()).await?)
}

/// `GET /verify-email#token=` (the mailed link) → a button that confirms the address, the
/// token taken from the fragment as on the reset page ([`reset_page`]): whoever registered
/// someone else's address holds the password, so the token is the only proof of the mailbox,
/// and in the query it was in every request log, mail scanner's report and browser history.
/// A link mailed before, with `?token=`, is checked and sent on to the fragment form, or
/// (400) told at once that it no longer works.
async fn verify_page(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<TokenForm>,
) -> Result<Response, AppError> {
    if q.token.trim().is_empty() {
        return Ok(html(StatusCode::OK, verify_html("", None)));
    }
    let token = mailed_token(&q.token)?;
    if !link_is_live(&state, token, TokenPurpose::VerifyEmail).await? {
        return Ok(dead_verify_link());
    }
    to_fragment("/verify-email", "token", token)
}

/// 303 to `path#name=value`: a legacy link's secret moved out of the query.
fn to_fragment(path: &str, name: &str, value: &str) -> Result<Response, AppError> {
    let fragment: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair(name, value)
        .finish();
    let location = HeaderValue::from_str(&format!("{path}#{fragment}"))
        .map_err(|_| AppError::BadRequest("this link is malformed: ask for a new one".into()))?;
    Ok((StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response())
}

/// The confirmation form: the mailed token and the account's password. Only the person
/// who registered knows the password; a mailbox owner who did not register is sent to the
/// password reset, which takes the account over (see `core::account_security`).
fn verify_html(token: &str, error: Option<&str>) -> String {
    let token = token_field(token, "Confirmation code");
    let body = format!(
        "<h1>Confirm your email address</h1>{error}\
         <p>Enter your keycast password to confirm that this mailbox belongs to your account.</p>\
         <form method=\"post\" action=\"/verify-email\">{token}\
         <label>Password <input type=\"password\" name=\"password\" required autocomplete=\"current-password\"></label>\
         <button type=\"submit\">Confirm my email</button></form>\
         <p>Did not create a keycast account? Someone else did, with your address. \
         <a href=\"/forgot-password\">Reset the password</a> to take the account over: that disconnects \
         everything they set up.</p>",
        error = error_html(error),
    );
    layout("Confirm your email", &body)
}

/// `POST /verify-email` (form: the mailed token) → a page saying the address is confirmed,
/// or why not (400: the link is invalid, used or expired; how to get a new one).
async fn verify_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    FormOrJson { value: form, .. }: FormOrJson<TokenForm>,
) -> Result<Response, AppError> {
    let token = mailed_token(&form.token)?.to_owned();
    match crate::auth::confirm_email(&state, &ip, &token, form.password).await {
        Ok(()) => {
            let body = "<h1>Your email address is confirmed</h1>\
                        <p>Thank you. <a href=\"/dashboard\">Go to your dashboard</a>.</p>";
            Ok(html(StatusCode::OK, layout("Email confirmed", body)))
        }
        Err(AppError::BadRequest(_)) => Ok(dead_verify_link()),
        Err(err) => form_error(err, |message| verify_html(&token, Some(message))),
    }
}

/// 400: the verification link is unknown, used or expired, and how to get a new one.
fn dead_verify_link() -> Response {
    let body = "<h1>This link no longer works</h1>\
                <p class=\"error\" role=\"alert\">The confirmation link is invalid, was already used, \
                or has expired (links last 24 hours).</p>\
                <p><a href=\"/login\">Log in</a> and use <em>Send the verification link again</em> on your \
                dashboard to get a new one. If you already confirmed, there is nothing left to do.</p>";
    html(StatusCode::BAD_REQUEST, layout("Link expired", body))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct EmailForm {
    email: String,
}

/// `GET /forgot-password` → the form that asks for a reset link.
async fn forgot_page() -> Response {
    html(StatusCode::OK, forgot_html("", None))
}

/// `POST /forgot-password` (form) → a page saying a link is on its way (the same whether or
/// not the account exists), or the form again with the reason (400, 429).
async fn forgot_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    FormOrJson { value: form, .. }: FormOrJson<EmailForm>,
) -> Result<Response, AppError> {
    match crate::auth::request_mail(&state, &ip, &form.email, TokenPurpose::ResetPassword).await {
        Ok(()) => {
            let body = format!(
                "<h1>Check your mailbox</h1>\
                 <p>If an account with <strong>{email}</strong> exists, a link to choose a new password is on \
                 its way. It works once, for {minutes} minutes.</p><p><a href=\"/login\">Back to log in</a></p>",
                email = escape(form.email.trim()),
                minutes = keycast_core::accounts::RESET_PASSWORD_TTL_SECS / 60,
            );
            Ok(html(StatusCode::OK, layout("Check your mailbox", &body)))
        }
        Err(err) => form_error(err, |message| forgot_html(&form.email, Some(message))),
    }
}

/// `GET /reset-password#token=` (the mailed link) → the new-password form, which takes the
/// token from the fragment (see [`crate::page::FRAGMENT_FIELDS`]): a token in the query would
/// be in every request log in front of keycast, and in the form's `Referer`, for the hour it
/// stays usable. A link mailed before, with `?token=`, is checked and sent on to the fragment
/// form, or (400) told at once that it no longer works.
async fn reset_page(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<TokenForm>,
) -> Result<Response, AppError> {
    if q.token.trim().is_empty() {
        return Ok(html(StatusCode::OK, reset_html("", None)));
    }
    let token = mailed_token(&q.token)?;
    if link_is_live(&state, token, TokenPurpose::ResetPassword).await? {
        return to_fragment("/reset-password", "token", token);
    }
    let body = format!(
        "<h1>This link no longer works</h1>\
         <p class=\"error\" role=\"alert\">The reset link is invalid, was already used, or has expired \
         (links last {minutes} minutes).</p><p><a href=\"/forgot-password\">Ask for a new one</a>.</p>",
        minutes = keycast_core::accounts::RESET_PASSWORD_TTL_SECS / 60,
    );
    Ok(html(StatusCode::BAD_REQUEST, layout("Link expired", &body)))
}

/// `POST /reset-password` (form: the mailed token and the new password) → a page saying
/// the password changed (every session ended), or the form again with the reason (400 for
/// a used/expired link or a too-short password, 429).
async fn reset_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    FormOrJson { value: form, .. }: FormOrJson<TokenForm>,
) -> Result<Response, AppError> {
    let token = mailed_token(&form.token)?.to_owned();
    match crate::auth::set_new_password(&state, &ip, &token, form.password).await {
        Ok(()) => {
            let body = "<h1>Your password was changed</h1>\
                        <p>Every session was logged out. <a href=\"/login\">Log in</a> with the new password.</p>";
            Ok(html(StatusCode::OK, layout("Password changed", body)))
        }
        Err(err) => form_error(err, |message| reset_html(&token, Some(message))),
    }
}

fn forgot_html(email: &str, error: Option<&str>) -> String {
    let body = format!(
        "<h1>Forgot your password?</h1>{error}\
         <p>Enter your account's email address and keycast mails you a link to choose a new password.</p>\
         <form method=\"post\" action=\"/forgot-password\">\
         <label>Email <input type=\"email\" name=\"email\" value=\"{email}\" required autocomplete=\"username\"></label>\
         <button type=\"submit\">Send me a link</button></form>\
         <p><a href=\"/login\">Back to log in</a></p>",
        error = error_html(error),
        email = escape(email),
    );
    layout("Forgot password", &body)
}

/// A mailed token's form field: hidden, holding `token`; or without one (the mailed link
/// keeps it in its fragment) a field named `label`, which the page's script fills from the
/// fragment and hides.
fn token_field(token: &str, label: &str) -> String {
    if token.is_empty() {
        format!(
            "<label>{label} (the part of the mailed link after <code>#token=</code>) \
             <input name=\"token\" required autocomplete=\"off\" data-from-fragment=\"token\"></label>"
        )
    } else {
        format!("<input type=\"hidden\" name=\"token\" value=\"{}\">", escape(token))
    }
}

/// The new-password form (see [`token_field`]).
fn reset_html(token: &str, error: Option<&str>) -> String {
    let token = token_field(token, "Reset code");
    let body = format!(
        "<h1>Choose a new password</h1>{error}\
         <form method=\"post\" action=\"/reset-password\">{token}\
         <label>New password <input type=\"password\" name=\"password\" required minlength=\"8\" \
         autocomplete=\"new-password\"></label>\
         <button type=\"submit\">Set the new password</button></form>\
         <p>Link used or expired? <a href=\"/forgot-password\">Ask for a new one</a>.</p>",
        error = error_html(error),
    );
    layout("Reset password", &body)
}

fn register_html(email: &str, error: Option<&str>) -> String {
    // The key's field is no password field (masked by CSS instead): browsers take a second
    // password field for the new password and offer to save it, which would put the Nostr
    // secret key in a synced password store and fill it in as keycast's password later.
    let body = format!(
        "<h1>Create a keycast account</h1>{error}\
         <form method=\"post\" action=\"/register\">\
         <label>Email <input type=\"email\" name=\"email\" value=\"{email}\" required autocomplete=\"username\"></label>\
         <label>Password <input type=\"password\" name=\"password\" required minlength=\"8\" autocomplete=\"new-password\"></label>\
         <label>Your own key (optional: <code>nsec1…</code> or hex; leave empty to get a new one) \
         <input name=\"nsec\" class=\"secret\" autocomplete=\"off\" autocapitalize=\"off\" \
         spellcheck=\"false\"></label>\
         <button type=\"submit\">Create account</button></form>\
         <p>Already have an account? <a href=\"/login\">Log in</a>.</p>",
        error = error_html(error),
        email = escape(email),
    );
    layout("Register", &body)
}

fn login_html(email: &str, error: Option<&str>) -> String {
    let body = format!(
        "<h1>Log in to keycast</h1>{error}\
         <form method=\"post\" action=\"/login\">\
         <label>Email <input type=\"email\" name=\"email\" value=\"{email}\" required autocomplete=\"username\"></label>\
         <label>Password <input type=\"password\" name=\"password\" required autocomplete=\"current-password\"></label>\
         <button type=\"submit\">Log in</button></form>\
         <p><a href=\"/forgot-password\">Forgot your password?</a> No account yet? \
         <a href=\"/register\">Create one</a>.</p>",
        error = error_html(error),
        email = escape(email),
    );
    layout("Log in", &body)
}

fn error_html(error: Option<&str>) -> String {
    error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default()
}

/// A form's failure a person can act on (bad input, wrong password, taken email, too many
/// attempts) shows the form again with the message and keeps the status; anything else
/// (503, 500) is the usual JSON error.
fn form_error(err: AppError, render: impl FnOnce(&str) -> String) -> Result<Response, AppError> {
    let status = match &err {
        AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        AppError::Conflict(_) => StatusCode::CONFLICT,
        AppError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => return Err(err),
    };
    let mut response = html(status, render(&err.to_string()));
    if let AppError::TooManyRequests { retry_after_secs } = err {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    }
    Ok(response)
}

pub(crate) fn check_csrf(session: &SessionUser, candidate: &str) -> Result<(), AppError> {
    if csrf_matches(&session.token, candidate) {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "the form's CSRF token is missing or wrong; reload the page and try again".into(),
        ))
    }
}

/// 303 to `/dashboard` with the new session cookie.
fn logged_in(cookie: HeaderValue) -> Response {
    let mut response = see_other("/dashboard");
    response.headers_mut().insert(SET_COOKIE, cookie);
    response
}

pub(crate) fn see_other(location: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, HeaderValue::from_static(location))]).into_response()
}

/// A unix time as `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn time(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| unix.to_string())
}
