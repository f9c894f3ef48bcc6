//! The approval page (issue 14, asking instead of refusing): `GET /approvals/{id}` shows the
//! logged-in owner exactly what an app asked that its policy does not cover — app, method,
//! kind, its tags and date, the content (escaped, whole, in a box that scrolls) — and
//! `POST /approvals/{id}` (a form with the session's CSRF token; cross-site posts are
//! refused before it, `origin`) records *allow once*, *allow this kind from now on* or
//! *deny* and carries it out ([`keycast_core::approval`]).
//!
//! The `{id}` is the 256-bit secret that the app received as `approval_url` (HTTP RPC) or
//! `auth_url` (NIP-46); only the owner of the authorization may see or decide it, once,
//! before it expires. Errors are HTML pages with their status (`page::html_errors`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use keycast_core::approval::{ApprovalError, ApprovalView, Decision, Fulfilled};
use keycast_core::nostr::nips::nip19::ToBech32;
use serde::Deserialize;

use crate::extract::{FormOrJson, PathParam};
use crate::page::{escape, html, layout, layout_with};
use crate::session::{
    check_shown_long_enough, csrf_matches, csrf_token, now_ms, shown_stamp, MaybeSession, SessionUser,
};
use crate::{AppError, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/approvals/{id}", get(show).post(decide))
        .layer(axum::middleware::from_fn(crate::page::html_errors))
}

impl From<ApprovalError> for AppError {
    fn from(err: ApprovalError) -> Self {
        match err {
            ApprovalError::NotFound => AppError::NotFound(err.to_string()),
            ApprovalError::NotYours => AppError::Forbidden(err.to_string()),
            ApprovalError::Expired => AppError::Gone(err.to_string()),
            ApprovalError::AlreadyDecided(_) => AppError::Conflict(err.to_string()),
            ApprovalError::KindNeedsSignEvent => AppError::BadRequest(err.to_string()),
            ApprovalError::AppEnded => AppError::Gone(err.to_string()),
            ApprovalError::Internal(cause) => cause.into(),
        }
    }
}

fn owner(session: Option<SessionUser>) -> Result<SessionUser, AppError> {
    session.ok_or_else(|| {
        AppError::Unauthorized(
            "log in to keycast in this browser as the owner of the key, then open the approval link again".into(),
        )
    })
}

/// `GET /approvals/{id}` → the request and the three choices; 401 without a session, 403
/// for another account's approval, 404 for an unknown id.
async fn show(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    PathParam(id): PathParam<String>,
) -> Result<Response, AppError> {
    let session = owner(session)?;
    let (_, services) = state.api()?;
    let view = services.signer.approval(&id, &session.user.id).await?;
    let now = keycast_db::now_unix();
    let csrf = escape(&csrf_token(&session.token));
    let shown = escape(&shown_stamp(&session.token, now_ms()));
    let choices = match (&view.decision, view.expires_at <= now) {
        (Some(decision), _) if decision == "expired" => {
            "<p class=\"error\">This request expired undecided; the app was told.</p>".to_owned()
        }
        (Some(decision), _) => format!("<p class=\"notice\">Already decided: {}.</p>", escape(decision)),
        (None, true) => "<p class=\"error\">This request has expired; the app has to ask again.</p>".to_owned(),
        (None, false) => {
            let kind = match view.kind {
                Some(kind) => format!(
                    "<button type=\"submit\" name=\"decision\" value=\"kind\" data-after-view>Allow kind {kind} from now on</button>"
                ),
                None => String::new(),
            };
            format!(
                "<form method=\"post\" action=\"/approvals/{id}\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"shown\" value=\"{shown}\">\
                 <button type=\"submit\" name=\"decision\" value=\"once\" data-after-view>Allow once</button>{kind}\
                 <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
                id = escape(&id),
            )
        }
    };
    let body = format!("{}{choices}", describe(&view, now));
    Ok(html(
        StatusCode::OK,
        layout_with("Approve a request", PREVIEW_CSS, &body),
    ))
}

/// A request's content and tags, whole, in a box that scrolls: "allow once" signs all of it.
const PREVIEW_CSS: &str = "pre.preview{max-height:20rem;overflow:auto;white-space:pre-wrap;\
     overflow-wrap:anywhere;border:1px solid #ccc;padding:.5rem}";

/// What the app asked, every value escaped.
fn describe(view: &ApprovalView, now: i64) -> String {
    // As the consent page names it: a name the app chose itself could be any app's.
    let app = match &view.registered_name {
        Some(name) => format!(
            "<strong>{}</strong> <span class=\"client verified\">&#10003; verified app, at {}</span>",
            escape(name),
            escape(&view.origin)
        ),
        None => format!(
            "<strong class=\"redirect-host\">{}</strong> <span class=\"client unverified\">&#9888; unverified app: \
             the name it gives itself (<code>{}</code>) is unchecked</span>",
            escape(&view.origin),
            escape(&view.app)
        ),
    };
    let mut rows = vec![
        ("App", app),
        ("Asks to", escape(&view.method.replace('_', " "))),
        (
            "Over",
            escape(if view.transport == "nip46" { "NIP-46" } else { "HTTP" }),
        ),
    ];
    if let Some(kind) = view.kind {
        rows.push(("Event kind", kind.to_string()));
        let tags = if view.tags.is_empty() {
            "none".to_owned()
        } else {
            format!(
                "<pre class=\"preview\">{}</pre> <em>({} in all)</em>",
                escape(&view.tags.join("\n")),
                view.tags.len()
            )
        };
        rows.push(("Tags", tags));
    }
    if let Some(created_at) = view.created_at {
        rows.push(("Dated", escape(&crate::pages::time(created_at))));
    }
    if let Some(peer) = &view.peer {
        rows.push(("With", escape(&peer.to_bech32().unwrap_or_else(|_| peer.to_hex()))));
    }
    if let Some(text) = &view.preview {
        rows.push((
            "Content",
            format!(
                "<pre class=\"preview\">{}</pre> <em>({} characters, all of them)</em>",
                escape(text),
                text.chars().count()
            ),
        ));
    }
    rows.push(("Expires", format!("in {} s", (view.expires_at - now).max(0))));
    let list: String = rows.iter().map(|(k, v)| format!("<dt>{k}</dt><dd>{v}</dd>")).collect();
    format!(
        "<h1>An app asks for something its permission does not cover</h1>\
         <p>Check what it asks. <strong>Allow once</strong> answers this request only; allowing the \
         kind adds it to what the app may sign until you revoke the app.</p><dl>{list}</dl>"
    )
}

#[derive(Deserialize)]
struct DecisionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    decision: String,
    /// When the page was shown (see [`check_shown_long_enough`]).
    #[serde(default)]
    shown: Option<String>,
}

/// `POST /approvals/{id}` (form: CSRF token, `decision` = `once`, `kind` or `deny`) → a page
/// saying what was done, once the decision is durable (and, for NIP-46, the reply is
/// on its way). 401 without a session, 403 without the CSRF token or for another account,
/// 404 unknown, 409 already decided, 410 expired.
async fn decide(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    PathParam(id): PathParam<String>,
    FormOrJson { value: form, .. }: FormOrJson<DecisionForm>,
) -> Result<Response, AppError> {
    let session = owner(session)?;
    if !csrf_matches(&session.token, &form.csrf) {
        return Err(AppError::Forbidden(
            "the form's CSRF token is missing or wrong; reload the page and try again".into(),
        ));
    }
    let decision = Decision::parse(&form.decision).map_err(AppError::BadRequest)?;
    if decision != Decision::Deny {
        check_shown_long_enough(&session.token, form.shown.as_deref(), now_ms())?;
    }
    let (_, services) = state.api()?;
    // Counted until the app is answered, even past this request (see `in_flight`): a
    // hand-over waits for it before its last write of the signing activity.
    let under_way = services.signer.request();
    state.ensure_writable().await?;
    let decided = services.signer.decide(&id, &session.user.id, decision).await?;
    // From here the decision is recorded: the app must hear of it whatever becomes of this
    // request (a timeout, a closed browser drops its future), so the rest runs on its own.
    let signer = services.signer.clone();
    let carried_out = tokio::spawn({
        let state = state.clone();
        async move {
            let _under_way = under_way;
            // "Allow kind" changes who may sign: answered once durable everywhere, like a grant.
            match state.confirm_write(decision == Decision::Kind).await {
                Ok(()) => Ok(signer.fulfil(decided).await),
                Err(unsaved) => {
                    let reason = unsaved.to_string();
                    signer.fulfil_unsaved(decided, &reason).await;
                    // Not "retry it": the decision is recorded, and a second click is told so.
                    Err(AppError::Unavailable(format!(
                        "the decision was recorded here but not confirmed saved ({reason}); the app was told \
                         to send its request again"
                    )))
                }
            }
        }
    });
    let fulfilled = carried_out
        .await
        .map_err(|e| AppError::Internal(format!("carrying out a decision: {e}")))??;
    let done = match (decision, fulfilled) {
        (Decision::Deny, _) => "Denied. The app was told.".to_owned(),
        (_, Fulfilled::AppRetries) => "Allowed. The app's next try of this request will succeed.".to_owned(),
        (_, Fulfilled::Replied(Ok(()))) => "Allowed. The app has its answer.".to_owned(),
        (_, Fulfilled::Replied(Err(reason))) => format!("Allowed, but the request failed: {}", escape(&reason)),
    };
    let extra = if decision == Decision::Kind {
        " The kind is now part of what this app may sign; revoke the app on the dashboard to take it back."
    } else {
        ""
    };
    let body = format!(
        "<h1>Done</h1><p class=\"notice\" role=\"status\">{done}{extra}</p><p><a href=\"/dashboard\">Back to the dashboard</a></p>"
    );
    Ok(html(StatusCode::OK, layout("Request decided", &body)))
}
