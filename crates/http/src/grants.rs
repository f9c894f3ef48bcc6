//! The owner shapes their grants (JSON API; the dashboard's forms call the same functions):
//!
//! - `GET /api/user/policies`, `POST /api/user/policies`, `PUT` and `DELETE
//!   /api/user/policies/{slug}`: their custom policies (`keycast_core::grants`), each with
//!   the words generated from its permissions; one that a live app uses is not deleted.
//! - `GET /api/user/authorizations/{id}`: one app's grant — policy in words, expiry,
//!   limits and usage so far, last used, recent activity.
//! - `PATCH /api/user/authorizations/{id}`: edit it (another policy or other permissions,
//!   another duration, other limits); the very next request on either transport is judged
//!   by the edited grant.
//!
//! Everything here is the session user's own: another user's policy or grant is a 404,
//! exactly like one that does not exist.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use keycast_core::grants::{self, GrantEdit, GrantEditError};
use keycast_core::terms::{GrantDuration, GrantTerms, Limits};
use keycast_core::Policy;
use keycast_db::policies::{self as policy_repo, PolicyRow};
use keycast_db::{activity, authz as authz_repo, now_unix, AuthorizationId, Db, PolicyId, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::extract::{JsonBody, PathParam};
use crate::session::SessionUser;
use crate::{AppError, AppState};

/// How many operations the per-app view lists.
pub(crate) const RECENT_ACTIVITY: i64 = 20;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/user/policies", get(list_policies).post(create_policy))
        .route("/api/user/policies/{slug}", put(update_policy).delete(delete_policy))
        .layer(axum::extract::DefaultBodyLimit::max(crate::POLICY_BODY_LIMIT))
    // `GET` and `PATCH /api/user/authorizations/{id}` sit with its `DELETE` in `user.rs`.
}

impl From<GrantEditError> for AppError {
    fn from(err: GrantEditError) -> Self {
        match err {
            GrantEditError::Invalid(why) => AppError::BadRequest(why),
            GrantEditError::NotFound(why) => AppError::NotFound(why),
            GrantEditError::InUse(why) => AppError::Conflict(why),
            e @ GrantEditError::TooManyPolicies => AppError::Conflict(e.to_string()),
            GrantEditError::Repo(e) => e.into(),
        }
    }
}

/// A policy as the API shows it: permissions, and the words generated from them.
pub(crate) fn policy_view(row: &PolicyRow) -> Result<Value, AppError> {
    let policy = Policy::from_row(row).map_err(AppError::internal)?;
    Ok(json!({
        "slug": row.slug,
        "name": row.display_name,
        "custom": row.owner_user_id.is_some(),
        "description": policy.summary().lines().join(" "),
        "lines": policy.summary().lines(),
        "permissions": policy.permissions(),
        "created_at": row.created_at,
    }))
}

/// `GET /api/user/policies` → `{policies: [...]}`: the user's custom policies.
async fn list_policies(State(state): State<AppState>, session: SessionUser) -> Result<Json<Value>, AppError> {
    let (db, _) = state.api()?;
    let rows = policy_repo::list_owned(db, &session.user.id).await?;
    let out = rows.iter().map(policy_view).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "policies": out })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    name: String,
    permissions: Value,
}

/// `POST /api/user/policies {name, permissions}` → 201 with the policy (slug generated).
async fn create_policy(
    State(state): State<AppState>,
    session: SessionUser,
    JsonBody(body): JsonBody<PolicyBody>,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let permissions = grants::parse_permissions(body.permissions)?;
    let row = save_policy(&state, &session.user.id, None, &body.name, permissions).await?;
    Ok((StatusCode::CREATED, Json(policy_view(&row)?)))
}

/// `PUT /api/user/policies/{slug} {name, permissions}` → the policy; every app under it
/// is judged by the new permissions from its next request.
async fn update_policy(
    State(state): State<AppState>,
    session: SessionUser,
    PathParam(slug): PathParam<String>,
    JsonBody(body): JsonBody<PolicyBody>,
) -> Result<Json<Value>, AppError> {
    let permissions = grants::parse_permissions(body.permissions)?;
    let row = save_policy(&state, &session.user.id, Some(&slug), &body.name, permissions).await?;
    Ok(Json(policy_view(&row)?))
}

/// `DELETE /api/user/policies/{slug}` → 204 once the deletion is durable; 409 while a
/// live app uses it.
async fn delete_policy(
    State(state): State<AppState>,
    session: SessionUser,
    PathParam(slug): PathParam<String>,
) -> Result<StatusCode, AppError> {
    remove_policy(&state, &session.user.id, &slug).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a custom policy, waiting until that is durable. Shared with the dashboard.
pub(crate) async fn remove_policy(state: &AppState, user: &UserId, slug: &str) -> Result<(), AppError> {
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    grants::delete_policy(&services.signer, user, slug, now_unix()).await?;
    state.confirm_write(true).await?;
    Ok(())
}

/// Creates (`slug: None`) or changes a custom policy, waiting until that is durable and
/// (PostgreSQL) every instance dropped the old one. Shared with the dashboard.
pub(crate) async fn save_policy(
    state: &AppState,
    user: &UserId,
    slug: Option<&str>,
    name: &str,
    permissions: keycast_core::policy::Permissions,
) -> Result<PolicyRow, AppError> {
    let (_, services) = state.api()?;
    if slug.is_none() {
        // Deleted policies stay as rows while their revoked grants name them: the cap alone
        // would not bound a loop of creations and deletions.
        state
            .limits()
            .check(&format!("policy:{user}"), crate::limit::POLICIES_PER_ACCOUNT)
            .await?;
    } else {
        edit_allowed(state, user).await?;
    }
    state.ensure_writable().await?;
    let row = match slug {
        None => grants::create_policy(&services.signer, user, name, permissions, now_unix()).await?,
        Some(slug) => grants::update_policy(&services.signer, user, slug, name, permissions).await?,
    };
    state.confirm_write(true).await?;
    Ok(row)
}

/// The public policies, `user`'s own, and any other policy one of `rows` (their
/// authorizations) is under — a deleted custom policy still names a revoked app — by id.
/// Only the undeleted ones may be chosen for an app.
pub(crate) async fn policies_by_id(
    db: &Db,
    user: &UserId,
    rows: &[authz_repo::AuthorizationRow],
) -> Result<HashMap<PolicyId, PolicyRow>, AppError> {
    let mut policies: HashMap<_, _> = policy_repo::list(db)
        .await?
        .into_iter()
        .chain(policy_repo::list_owned(db, user).await?)
        .map(|p| (p.id.clone(), p))
        .collect();
    for row in rows {
        if !policies.contains_key(&row.policy_id) {
            if let Some(p) = policy_repo::find_by_id(db, &row.policy_id).await? {
                policies.insert(p.id.clone(), p);
            }
        }
    }
    Ok(policies)
}

/// One grant as its owner sees it (the per-app view and `GET /api/user/authorizations/{id}`).
pub(crate) struct GrantView {
    pub row: authz_repo::AuthorizationRow,
    pub policy: PolicyRow,
    pub lines: Vec<String>,
    pub terms: GrantTerms,
    /// Signatures in all, and in the last minute, hour and day.
    pub usage: [i64; 4],
    pub last_used: Option<i64>,
    pub recent: Vec<activity::Activity>,
}

/// Loads `user`'s authorization `id` (live or revoked) with its usage and activity.
///
/// # Errors
/// 404 if it is not theirs.
pub(crate) async fn load_grant(state: &AppState, user: &UserId, id: &str) -> Result<GrantView, AppError> {
    let (db, _) = state.api()?;
    let id = AuthorizationId::new(id);
    let row = authz_repo::find_by_id(db, &id)
        .await?
        .filter(|r| r.user_id == *user)
        .ok_or_else(|| AppError::NotFound("no such authorization of yours".into()))?;
    let policy = policy_repo::find_by_id(db, &row.policy_id)
        .await?
        .ok_or_else(|| AppError::internal("an authorization's policy is missing"))?;
    // The words include the kinds the owner allowed on approval pages: what is enforced.
    let approved = keycast_db::approvals::allowed_kinds(db, &id).await?;
    let parsed = Policy::from_row(&policy).map_err(AppError::internal)?;
    let approved = approved.into_iter().filter_map(|k| u16::try_from(k).ok()).collect();
    let lines = keycast_core::approval::with_kinds(&parsed, &approved).summary().lines();
    let terms = GrantTerms::from_json(row.terms.as_deref()).map_err(AppError::internal)?;
    let now = now_unix();
    let (total, times) = activity::signatures(db, &id, now - 86_400).await?;
    let within = |secs: i64| {
        times
            .iter()
            .filter(|(t, _)| *t > now - secs)
            .map(|(_, n)| n)
            .sum::<i64>()
    };
    let recent = activity::list_for_authorization(db, &id, RECENT_ACTIVITY).await?;
    Ok(GrantView {
        usage: [total, within(60), within(3600), within(86_400)],
        last_used: recent.first().map(|a| a.created_at),
        row,
        policy,
        lines,
        terms,
        recent,
    })
}

/// `GET /api/user/authorizations/{id}` → `{id, client_id, redirect_origin, policy,
/// expires_at, limits, usage, last_used, recent_activity, ...}`.
pub(crate) async fn show_authorization(
    State(state): State<AppState>,
    session: SessionUser,
    PathParam(id): PathParam<String>,
) -> Result<Json<Value>, AppError> {
    let view = load_grant(&state, &session.user.id, &id).await?;
    let [total, minute, hour, day] = view.usage;
    Ok(Json(json!({
        "id": view.row.id.as_str(),
        "client_id": view.row.client_id,
        "redirect_origin": view.row.redirect_origin,
        "bunker_pubkey": view.row.bunker_pubkey,
        "created_at": view.row.created_at,
        "revoked_at": view.row.revoked_at,
        "policy": policy_view(&view.policy)?,
        "expires_at": view.terms.expires_at,
        "limits": view.terms.limits,
        "usage": { "signatures": total, "last_minute": minute, "last_hour": hour, "last_day": day },
        "last_used": view.last_used,
        "recent_activity": view.recent.iter().map(|a| json!({
            "method": a.method,
            "kind": a.kind,
            "transport": a.transport,
            "created_at": a.created_at,
            "result": a.result.as_deref().unwrap_or("done"),
        })).collect::<Vec<_>>(),
    })))
}

/// The edit as sent: `policy` (slug) or `permissions`; `duration` (`hour`, `day`, `week`,
/// `forever`, from now); `limits` (replaces all four; `{}` removes them).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct EditBody {
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub permissions: Option<Value>,
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub limits: Option<Value>,
}

/// `PATCH /api/user/authorizations/{id}` → the edited grant (as the GET).
pub(crate) async fn edit_authorization(
    State(state): State<AppState>,
    session: SessionUser,
    PathParam(id): PathParam<String>,
    JsonBody(body): JsonBody<EditBody>,
) -> Result<Json<Value>, AppError> {
    let limits = match body.limits {
        None => None,
        Some(v) => Some(
            serde_json::from_value::<StrictLimits>(v)
                .map_err(|e| AppError::BadRequest(format!("limits: {e}")))?
                .into_limits()?,
        ),
    };
    let edit = GrantEdit {
        policy: body.policy,
        permissions: body.permissions.map(grants::parse_permissions).transpose()?,
        duration: body
            .duration
            .as_deref()
            .map(GrantDuration::parse)
            .transpose()
            .map_err(AppError::BadRequest)?,
        limits,
    };
    apply_edit(&state, &session.user.id, &id, edit).await?;
    show_authorization(State(state), session, PathParam(id)).await
}

/// Limits as the API takes them: unknown fields refused, zero refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictLimits {
    #[serde(default)]
    max_signatures: Option<u64>,
    #[serde(default)]
    per_minute: Option<u32>,
    #[serde(default)]
    per_hour: Option<u32>,
    #[serde(default)]
    per_day: Option<u32>,
}

impl StrictLimits {
    fn into_limits(self) -> Result<Limits, AppError> {
        let zero = [
            self.max_signatures == Some(0),
            self.per_minute == Some(0),
            self.per_hour == Some(0),
            self.per_day == Some(0),
        ];
        if zero.iter().any(|z| *z) {
            return Err(AppError::BadRequest(
                "limits must be whole numbers from 1, or left out for no limit".into(),
            ));
        }
        Ok(Limits {
            max_signatures: self.max_signatures,
            per_minute: self.per_minute,
            per_hour: self.per_hour,
            per_day: self.per_day,
        })
    }
}

/// Counts an edit of a policy or a grant against the account's budget
/// ([`crate::limit::EDITS_PER_ACCOUNT`]).
async fn edit_allowed(state: &AppState, user: &UserId) -> Result<(), AppError> {
    state
        .limits()
        .check(&format!("edit:{user}"), crate::limit::EDITS_PER_ACCOUNT)
        .await
}

/// Applies an edit and waits until it is durable and (PostgreSQL) every instance dropped
/// the old grant. Shared with the dashboard.
pub(crate) async fn apply_edit(state: &AppState, user: &UserId, id: &str, edit: GrantEdit) -> Result<(), AppError> {
    let (_, services) = state.api()?;
    edit_allowed(state, user).await?;
    if edit.permissions.is_some() {
        // An app's own permissions may be a new policy, kept as a row after the app moves on:
        // the same budget as creating one.
        state
            .limits()
            .check(&format!("policy:{user}"), crate::limit::POLICIES_PER_ACCOUNT)
            .await?;
    }
    state.ensure_writable().await?;
    grants::edit_grant(&services.signer, user, &AuthorizationId::new(id), edit, now_unix()).await?;
    state.confirm_write(true).await?;
    Ok(())
}
