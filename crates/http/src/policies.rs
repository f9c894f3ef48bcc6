//! `GET /api/policies`: the policies an app may ask for (`scope=policy:<slug>`), so
//! first-party pages and clients can show what each one allows before asking for consent.
//! Public: policies are the same for everyone and say nothing about any user.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use keycast_core::Policy;
use keycast_db::policies;
use serde_json::{json, Value};

use crate::oauth::policy_json;
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/api/policies", get(list))
}

/// `GET /api/policies` → `{policies: [{slug, name, description, permissions}]}`, by slug;
/// `description` is generated from the permissions (the consent page's words).
async fn list(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let (db, _) = state.api()?;
    let mut out = Vec::new();
    for row in policies::list(db).await? {
        // A stored document core cannot read is keycast's fault, not the caller's.
        let policy = Policy::from_row(&row).map_err(AppError::internal)?;
        let mut permissions = policy_json(&policy);
        if let Some(map) = permissions.as_object_mut() {
            map.remove("slug");
        }
        out.push(json!({
            "slug": row.slug,
            "name": row.display_name,
            // Generated from the permissions, so it says what is enforced.
            "description": policy.summary().lines().join(" "),
            "permissions": permissions,
        }));
    }
    Ok(Json(json!({ "policies": out })))
}
