//! The dashboard's pages for shaping grants (server-rendered like `pages.rs`, every value
//! escaped, no secret shown; forms carry the session's CSRF token):
//!
//! - `GET /dashboard/authorizations/{id}`: one app — its policy in words, expiry, limits
//!   and usage so far, last used, recent activity — and forms to edit its grant
//!   (`POST /dashboard/authorizations/{id}`: another policy, duration, limits; or its own
//!   permissions).
//! - `GET /dashboard/policies`: the user's custom policies with a form each, and a form to
//!   build a new one (`POST /dashboard/policies`, `POST /dashboard/policies/{slug}`,
//!   `POST /dashboard/policies/{slug}/delete`).
//!
//! The handlers call the JSON API's functions (`crate::grants`), so the rules and the
//! durability wait are the same. The words shown come from the permissions.

use axum::extract::State;
use axum::http::header::LOCATION;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use keycast_core::grants::GrantEdit;
use keycast_core::policy::{Permissions, Policy};
use keycast_core::terms::{GrantDuration, Limits};
use keycast_db::policies::{self as policy_repo, PolicyRow};
use serde::Deserialize;

use crate::extract::{FormOrJson, PathParam};
use crate::grants::{apply_edit, load_grant, remove_policy, save_policy};
use crate::page::{escape, html, layout_with};
use crate::pages::{check_csrf, time, CsrfForm};
use crate::session::{csrf_token, MaybeSession};
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard/authorizations/{id}", get(app_page).post(edit_form))
        .route("/dashboard/policies", get(policies_page).post(create_form))
        .route("/dashboard/policies/{slug}", post(update_form))
        .route("/dashboard/policies/{slug}/delete", post(delete_form))
        .layer(axum::extract::DefaultBodyLimit::max(crate::POLICY_BODY_LIMIT))
        .layer(axum::middleware::from_fn(crate::page::html_errors))
}

const CSS: &str = "body{max-width:56rem}table{border-collapse:collapse;width:100%}\
     th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd}\
     fieldset{margin:.5rem 0}label{display:block;margin:.3rem 0}dd{margin:0 0 .5rem}\
     input[type=checkbox],input[type=radio]{width:auto}";

fn see_other(location: &str) -> Result<Response, AppError> {
    let location = HeaderValue::from_str(location).map_err(AppError::internal)?;
    Ok((StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response())
}

fn login() -> Result<Response, AppError> {
    see_other("/login")
}

/// `<ul>` of a policy's words.
fn words(lines: &[String]) -> String {
    let items: String = lines.iter().map(|l| format!("<li>{}</li>", escape(l))).collect();
    format!("<ul class=\"allows\">{items}</ul>")
}

fn policy_words(row: &PolicyRow) -> Result<String, AppError> {
    let policy = Policy::from_row(row).map_err(AppError::internal)?;
    Ok(words(&policy.summary().lines()))
}

fn limit_text(limit: Option<impl ToString>) -> String {
    limit.map(|l| l.to_string()).unwrap_or_default()
}

/// `GET /dashboard/authorizations/{id}`: one app's grant, usage and activity, and its edit
/// forms. 404 if it is not the user's.
async fn app_page(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    PathParam(id): PathParam<String>,
) -> Result<Response, AppError> {
    let Some(session) = session else { return login() };
    let view = load_grant(&state, &session.user.id, &id).await?;
    let (db, _) = state.api()?;
    let csrf = escape(&csrf_token(&session.token));
    let id = escape(view.row.id.as_str());
    let limits = view.terms.limits;
    let [total, minute, hour, day] = view.usage;
    let of = |used: i64, limit: Option<u32>| match limit {
        Some(l) => format!("{used} of {l}"),
        None => format!("{used} (no limit)"),
    };
    let mut body = format!(
        "<p><a href=\"/dashboard\">&larr; Dashboard</a></p>\
         <h1>{client}</h1>\
         <dl><dt>Redirect origin</dt><dd>{origin}</dd>\
         <dt>Authorized</dt><dd>{created}</dd>\
         <dt>Status</dt><dd class=\"status\">{status}</dd>\
         <dt>Expires</dt><dd class=\"expiry\">{expiry}</dd>\
         <dt>Last used</dt><dd class=\"last-used\">{last}</dd></dl>\
         <h2>Policy: {name} (<code>{slug}</code>)</h2><p>This app may:</p>{words}\
         <h2>Limits and usage</h2>\
         <table class=\"usage\"><thead><tr><th>Signatures</th><th>Used / limit</th></tr></thead><tbody>\
         <tr><td>In all</td><td>{total}</td></tr><tr><td>Last minute</td><td>{minute}</td></tr>\
         <tr><td>Last hour</td><td>{hour}</td></tr><tr><td>Last day</td><td>{day}</td></tr></tbody></table>",
        client = escape(&view.row.client_id),
        origin = escape(&view.row.redirect_origin),
        created = escape(&time(view.row.created_at)),
        status = match view.row.revoked_at {
            Some(at) => format!("revoked {}", escape(&time(at))),
            None => "live".into(),
        },
        expiry = match view.terms.expires_at {
            Some(at) => escape(&time(at)),
            None => "when you revoke it".into(),
        },
        last = view.last_used.map_or_else(|| "never".into(), |at| escape(&time(at))),
        name = escape(&view.policy.display_name),
        slug = escape(&view.policy.slug),
        words = words(&view.lines),
        total = match limits.max_signatures {
            Some(l) => format!("{total} of {l}"),
            None => format!("{total} (no limit)"),
        },
        minute = of(minute, limits.per_minute),
        hour = of(hour, limits.per_hour),
        day = of(day, limits.per_day),
    );

    body.push_str("<h2>Recent activity</h2>");
    if view.recent.is_empty() {
        body.push_str("<p>Nothing yet (it appears about a second after a request).</p>");
    } else {
        body.push_str(
            "<table class=\"activity\"><thead><tr><th>When</th><th>Method</th><th>Kind</th>\
             <th>Transport</th><th>Result</th></tr></thead><tbody>",
        );
        for a in &view.recent {
            body.push_str(&format!(
                "<tr><td>{when}</td><td>{method}</td><td>{kind}</td><td>{transport}</td><td>{result}</td></tr>",
                when = escape(&time(a.created_at)),
                method = escape(&a.method),
                kind = a.kind.map(|k| k.to_string()).unwrap_or_default(),
                transport = escape(&a.transport),
                result = match &a.result {
                    None => "done".to_owned(),
                    Some(code) => format!("refused ({})", escape(code)),
                },
            ));
        }
        body.push_str("</tbody></table>");
    }

    if view.row.revoked_at.is_none() {
        let mut options = String::from("<option value=\"\" selected>Keep the current policy</option>");
        let mut choices = policy_repo::list(db).await?;
        choices.extend(policy_repo::list_owned(db, &session.user.id).await?);
        for p in &choices {
            options.push_str(&format!(
                "<option value=\"{slug}\">{name}{mine}</option>",
                slug = escape(&p.slug),
                name = escape(&p.display_name),
                mine = if p.owner_user_id.is_some() { " (yours)" } else { "" },
            ));
        }
        let current = Policy::from_row(&view.policy)
            .map_err(AppError::internal)?
            .permissions();
        body.push_str(&format!(
            "<h2>Change this grant</h2>\
             <form method=\"post\" action=\"/dashboard/authorizations/{id}\" class=\"edit-terms\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>Policy <select name=\"policy\">{options}</select></label>\
             <label>For how long, from now <select name=\"duration\"><option value=\"\" selected>Keep the expiry</option>\
             <option value=\"hour\">An hour</option><option value=\"day\">A day</option>\
             <option value=\"week\">A week</option><option value=\"forever\">Until I revoke it</option></select></label>\
             <fieldset><legend>Limits (empty means none)</legend>\
             <label>Signatures in all <input type=\"number\" min=\"1\" name=\"max_signatures\" value=\"{max}\"></label>\
             <label>Per minute <input type=\"number\" min=\"1\" name=\"per_minute\" value=\"{pm}\"></label>\
             <label>Per hour <input type=\"number\" min=\"1\" name=\"per_hour\" value=\"{ph}\"></label>\
             <label>Per day <input type=\"number\" min=\"1\" name=\"per_day\" value=\"{pd}\"></label></fieldset>\
             <button type=\"submit\">Save</button></form>\
             <h2>Or give this app its own permissions</h2>\
             <form method=\"post\" action=\"/dashboard/authorizations/{id}\" class=\"edit-permissions\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"own_permissions\" value=\"1\">{fields}\
             <button type=\"submit\">Save these permissions</button></form>\
             <form method=\"post\" action=\"/dashboard/authorizations/{id}/revoke\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">Revoke</button></form>",
            max = limit_text(limits.max_signatures),
            pm = limit_text(limits.per_minute),
            ph = limit_text(limits.per_hour),
            pd = limit_text(limits.per_day),
            fields = permission_fields(&current),
        ));
    }
    let page = layout_with(&format!("{} — keycast", view.row.client_id), CSS, &body);
    Ok(html(StatusCode::OK, page))
}

/// The permission fields of a policy form, filled with `p`.
fn permission_fields(p: &Permissions) -> String {
    let kinds = |k: &mut dyn Iterator<Item = &u16>| k.map(u16::to_string).collect::<Vec<_>>().join(", ");
    let sign = match (&p.allowed_kinds, p.any_kind || p.full_access) {
        (Some(_), _) => "kinds",
        (None, true) => "any",
        (None, false) => "none",
    };
    let checked = |on: bool| if on { " checked" } else { "" };
    let radio = |value: &str, label: &str| {
        format!(
            "<label><input type=\"radio\" name=\"sign\" value=\"{value}\"{c}> {label}</label>",
            c = checked(sign == value)
        )
    };
    format!(
        "<fieldset><legend>Signing</legend>{none}{listed}\
         <label>Kinds allowed (comma-separated) <input name=\"allowed_kinds\" value=\"{allowed}\" placeholder=\"1, 7\"></label>\
         {any}<label>Kinds denied, always (comma-separated) <input name=\"denied_kinds\" value=\"{denied}\" placeholder=\"4, 1059\"></label>\
         </fieldset><fieldset><legend>Encryption</legend>\
         <label><input type=\"checkbox\" name=\"encrypt\" value=\"on\"{enc}> Encrypt messages</label>\
         <label><input type=\"checkbox\" name=\"decrypt\" value=\"on\"{dec}> Decrypt messages</label>\
         <label>With whom <select name=\"peers\"><option value=\"anyone\"{anyone}>Anyone</option>\
         <option value=\"own\"{own}>Only my own key</option></select></label></fieldset>\
         <fieldset><legend>Content rules</legend>\
         <label>Blocked words (comma-separated; never signed nor encrypted) \
         <input name=\"blocked_words\" value=\"{words}\"></label></fieldset>",
        none = radio("none", "Sign nothing"),
        listed = radio("kinds", "Sign only the kinds allowed below"),
        any = radio("any", "Sign any kind but those denied below"),
        allowed = escape(&kinds(&mut p.allowed_kinds.iter().flatten())),
        denied = escape(&kinds(&mut p.denied_kinds.iter())),
        enc = checked(p.encrypt || p.full_access),
        dec = checked(p.decrypt || p.full_access),
        anyone = if p.encrypt_to_self { "" } else { " selected" },
        own = if p.encrypt_to_self { " selected" } else { "" },
        words = escape(&p.blocked_words.join(", ")),
    )
}

/// The permission fields as posted.
#[derive(Deserialize, Default)]
#[serde(default)]
struct PermissionForm {
    sign: String,
    allowed_kinds: String,
    denied_kinds: String,
    encrypt: Option<String>,
    decrypt: Option<String>,
    peers: String,
    blocked_words: String,
}

fn parse_kinds(field: &str, text: &str) -> Result<std::collections::BTreeSet<u16>, AppError> {
    text.split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u16>().map_err(|_| {
                AppError::BadRequest(format!(
                    "{field}: {t:?} is not an event kind (a whole number from 0 to 65535)"
                ))
            })
        })
        .collect()
}

impl PermissionForm {
    fn permissions(&self) -> Result<Permissions, AppError> {
        let allowed = parse_kinds("allowed_kinds", &self.allowed_kinds)?;
        let (allowed_kinds, any_kind) = match self.sign.as_str() {
            "none" => (None, false),
            "kinds" => (Some(allowed), false),
            "any" => (None, true),
            other => {
                return Err(AppError::BadRequest(format!(
                    "sign {other:?}: expected none, kinds or any"
                )))
            }
        };
        let encrypt_to_self = match self.peers.as_str() {
            "" | "anyone" => false,
            "own" => true,
            other => return Err(AppError::BadRequest(format!("peers {other:?}: expected anyone or own"))),
        };
        Ok(Permissions {
            allowed_kinds,
            denied_kinds: parse_kinds("denied_kinds", &self.denied_kinds)?,
            any_kind,
            blocked_words: self
                .blocked_words
                .split(',')
                .map(str::trim)
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect(),
            encrypt: self.encrypt.is_some(),
            decrypt: self.decrypt.is_some(),
            encrypt_to_self,
            full_access: false,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct EditForm {
    csrf: String,
    policy: String,
    duration: String,
    max_signatures: String,
    per_minute: String,
    per_hour: String,
    per_day: String,
    own_permissions: String,
    #[serde(flatten)]
    permissions: PermissionForm,
}

fn limit<T: std::str::FromStr>(name: &str, text: &str) -> Result<Option<T>, AppError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<u64>() {
        Ok(n) if n >= 1 => text
            .parse::<T>()
            .map(Some)
            .map_err(|_| AppError::BadRequest(format!("{name}: {text} is too large"))),
        _ => Err(AppError::BadRequest(format!(
            "{name} must be a whole number from 1, or empty for no limit"
        ))),
    }
}

/// `POST /dashboard/authorizations/{id}` → 303 back to the app's page once the edit is
/// durable; 400 with what is wrong; 404 if it is not the user's live authorization.
async fn edit_form(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    PathParam(id): PathParam<String>,
    FormOrJson { value: form, .. }: FormOrJson<EditForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else { return login() };
    check_csrf(&session, &form.csrf)?;
    let edit = if form.own_permissions.is_empty() {
        GrantEdit {
            policy: Some(form.policy.trim().to_owned()).filter(|p| !p.is_empty()),
            permissions: None,
            duration: match form.duration.as_str() {
                "" => None,
                d => Some(GrantDuration::parse(d).map_err(AppError::BadRequest)?),
            },
            limits: Some(Limits {
                max_signatures: limit("max_signatures", &form.max_signatures)?,
                per_minute: limit("per_minute", &form.per_minute)?,
                per_hour: limit("per_hour", &form.per_hour)?,
                per_day: limit("per_day", &form.per_day)?,
            }),
        }
    } else {
        GrantEdit {
            permissions: Some(form.permissions.permissions()?),
            ..GrantEdit::default()
        }
    };
    apply_edit(&state, &session.user.id, &id, edit).await?;
    see_other(&format!("/dashboard/authorizations/{}", urlencoding(&id)))
}

/// Percent-encodes a path segment (ids are hex, but the path came from outside).
fn urlencoding(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// `GET /dashboard/policies`: the user's custom policies (words and a form each) and a form
/// to build one.
async fn policies_page(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
) -> Result<Response, AppError> {
    let Some(session) = session else { return login() };
    let (db, _) = state.api()?;
    let csrf = escape(&csrf_token(&session.token));
    let mut body = String::from(
        "<p><a href=\"/dashboard\">&larr; Dashboard</a></p><h1>Your policies</h1>\
         <p>Build a policy from permissions, then choose it when you authorize an app or on an app's page. \
         Changing a policy changes what every app under it may do, from its next request. \
         A policy can be deleted once no live app uses it.</p>",
    );
    let rows = policy_repo::list_owned(db, &session.user.id).await?;
    if rows.is_empty() {
        body.push_str("<p>You have no policy of your own yet.</p>");
    }
    for row in &rows {
        let permissions = Policy::from_row(row).map_err(AppError::internal)?.permissions();
        body.push_str(&format!(
            "<section class=\"policy\"><h2>{name} (<code>{slug}</code>)</h2><p>An app under it may:</p>{words}\
             <details><summary>Change it</summary>\
             <form method=\"post\" action=\"/dashboard/policies/{slug}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>Name <input name=\"name\" required value=\"{name}\"></label>{fields}\
             <button type=\"submit\">Save</button></form></details>\
             <form method=\"post\" action=\"/dashboard/policies/{slug}/delete\" class=\"delete\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\">Delete this policy</button></form></section>",
            name = escape(&row.display_name),
            slug = escape(&row.slug),
            words = policy_words(row)?,
            fields = permission_fields(&permissions),
        ));
    }
    body.push_str(&format!(
        "<h2>Build a new policy</h2><form method=\"post\" action=\"/dashboard/policies\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Name <input name=\"name\" required></label>{fields}\
         <button type=\"submit\">Create the policy</button></form>",
        fields = permission_fields(&Permissions::default()),
    ));
    Ok(html(StatusCode::OK, layout_with("Your policies — keycast", CSS, &body)))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PolicyForm {
    csrf: String,
    name: String,
    #[serde(flatten)]
    permissions: PermissionForm,
}

/// `POST /dashboard/policies` → 303 to the policies page with the new policy.
async fn create_form(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    FormOrJson { value: form, .. }: FormOrJson<PolicyForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else { return login() };
    check_csrf(&session, &form.csrf)?;
    save_policy(
        &state,
        &session.user.id,
        None,
        &form.name,
        form.permissions.permissions()?,
    )
    .await?;
    see_other("/dashboard/policies")
}

/// `POST /dashboard/policies/{slug}` → 303 to the policies page once the change is
/// durable; 404 if it is not one of the user's policies.
async fn update_form(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    PathParam(slug): PathParam<String>,
    FormOrJson { value: form, .. }: FormOrJson<PolicyForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else { return login() };
    check_csrf(&session, &form.csrf)?;
    let permissions = form.permissions.permissions()?;
    save_policy(&state, &session.user.id, Some(&slug), &form.name, permissions).await?;
    see_other("/dashboard/policies")
}

/// `POST /dashboard/policies/{slug}/delete` → 303 to the policies page once the deletion
/// is durable; 409 (a page saying which apps to move first) while a live app uses it.
async fn delete_form(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    PathParam(slug): PathParam<String>,
    FormOrJson { value: form, .. }: FormOrJson<CsrfForm>,
) -> Result<Response, AppError> {
    let Some(session) = session else { return login() };
    check_csrf(&session, &form.csrf)?;
    remove_policy(&state, &session.user.id, &slug).await?;
    see_other("/dashboard/policies")
}
