//! OAuth 2.0 (RFC 6749) authorization-code flow with PKCE S256 required (RFC 7636), and
//! the RFC 8414 metadata document.
//!
//! - `GET /api/oauth/authorize`: validates the request, then shows a login form (no
//!   session) or the consent page (redirect origin, policy, approve/deny, CSRF token).
//! - `POST /api/oauth/login`: the login form; back to the consent page on success.
//! - `POST /api/oauth/authorize`: the decision. A form post (with the session-bound CSRF
//!   token) answers 302 to the app; a JSON post from a first-party page (session cookie and
//!   an `Origin` of this server) answers `{code, redirect_uri}`.
//! - `POST /api/oauth/token`: form or JSON, `authorization_code` or `refresh_token`
//!   (rotating; see `keycast_core::refresh`); RFC 6749 §5.2 errors (`{error,
//!   error_description}`, 400). Redemption and rotation are atomic in core.
//! - `POST /api/oauth/revoke`: RFC 7009 token revocation.
//!
//! Codes, PKCE and redirect rules live in `keycast_core::oauth`; this module only decodes,
//! renders and redirects.

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, LOCATION, ORIGIN, PRAGMA, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keycast_core::clients::{self, ClientIdentity};
use keycast_core::oauth::{self, CodeRequest, OAuthError, TokenRequest};
use keycast_core::refresh::RefreshRequest;
use keycast_core::terms::{Choice, GrantDuration, Limits};
use keycast_core::Authorization;
use keycast_db::policies::{self, PolicyRow};
use keycast_db::{now_unix, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::extract::{ClientIp, FormOrJson, OverHttps, QueryParams};
use crate::page;
use crate::session::{
    check_shown_long_enough, csrf_matches, csrf_token, now_ms, shown_stamp, MaybeSession, SessionUser,
};
use crate::{AppError, AppState};

/// How long the token's answer waits for NIP-46 to listen for the new bunker (see
/// [`exchange`]); past it, answered anyway.
const LISTENING_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/oauth/authorize", get(authorize_page).post(decide))
        .route("/api/oauth/login", post(login_form))
        .route("/api/oauth/token", post(token))
        .route("/api/oauth/revoke", post(revoke))
        .route("/.well-known/oauth-authorization-server", get(metadata))
}

/// The authorization request's parameters (query of the GET, fields of the POST).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct AuthorizeParams {
    response_type: Option<String>,
    pub(crate) client_id: String,
    redirect_uri: String,
    scope: String,
    state: Option<String>,
    code_challenge: String,
    code_challenge_method: String,
}

impl AuthorizeParams {
    /// Checks everything core will check again at issue, so errors show before consent, and
    /// judges the client (registered, unregistered, refused).
    /// Checks the request; `host` is the `Host` it was sent to (keycast's own address, as well
    /// as the public URL's).
    async fn validate(
        &self,
        state: &AppState,
        host: Option<&str>,
    ) -> Result<(String, PolicyRow, ClientIdentity), OAuthFailure> {
        if self.response_type.as_deref().is_some_and(|t| t != "code") {
            return Err(OAuthFailure::new(
                "unsupported_response_type",
                "response_type must be code",
            ));
        }
        oauth::check_client_id(&self.client_id)?;
        if self.state.as_ref().is_some_and(|s| s.len() > oauth::MAX_STATE_BYTES) {
            return Err(OAuthFailure::new(
                "invalid_request",
                &format!("state is longer than {} bytes", oauth::MAX_STATE_BYTES),
            ));
        }
        let origin = oauth::redirect_origin(&self.redirect_uri)?;
        // An app whose codes come back to keycast's own address would be shown as keycast
        // itself ("Allow https://keycast.example to sign for you?"), and its codes would land
        // in keycast's own request log.
        if crate::origin::is_own_origin(&state.options().public_url, host, &origin) {
            return Err(OAuthFailure::new(
                "invalid_request",
                "redirect_uri is on keycast's own address; an app names an address of its own",
            ));
        }
        if self.code_challenge_method != "S256" || self.code_challenge.is_empty() {
            return Err(OAuthFailure::new(
                "invalid_request",
                "PKCE is required: send code_challenge with code_challenge_method=S256",
            ));
        }
        let (db, _) = state.api()?;
        let identity = clients::identify(
            db,
            &self.client_id,
            &self.redirect_uri,
            state.options().open_registration,
        )
        .await?;
        let policy = oauth::scope_policy(db, &self.scope).await?;
        Ok((origin, policy, identity))
    }

    fn code_request<'a>(
        &'a self,
        user: &'a UserId,
        policy: &'a PolicyRow,
        choice: Choice,
        session: &'a keycast_db::TokenHash,
    ) -> CodeRequest<'a> {
        CodeRequest {
            choice,
            session,
            user_id: user,
            client_id: &self.client_id,
            redirect_uri: &self.redirect_uri,
            policy,
            code_challenge: &self.code_challenge,
            code_challenge_method: &self.code_challenge_method,
        }
    }

    /// The app's redirect URI with `pairs`, `state` and `iss` appended to its query. `iss`
    /// (RFC 9207) names who answered: an app that uses several authorization servers tells
    /// from it which one this code is for, so a hostile one cannot have it send a code from
    /// here to its own token endpoint (a mix-up attack).
    fn redirect_with(&self, issuer: &str, pairs: &[(&str, &str)]) -> String {
        let mut url = url::Url::parse(&self.redirect_uri).expect("validated by redirect_origin");
        {
            let mut query = url.query_pairs_mut();
            for (k, v) in pairs {
                query.append_pair(k, v);
            }
            if let Some(s) = &self.state {
                query.append_pair("state", s);
            }
            query.append_pair("iss", issuer);
        }
        url.into()
    }

    /// The query string that reproduces this request (the login form's way back).
    pub(crate) fn to_query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("response_type", self.response_type.as_deref().unwrap_or("code"));
        q.append_pair("client_id", &self.client_id);
        q.append_pair("redirect_uri", &self.redirect_uri);
        q.append_pair("scope", &self.scope);
        if let Some(s) = &self.state {
            q.append_pair("state", s);
        }
        q.append_pair("code_challenge", &self.code_challenge);
        q.append_pair("code_challenge_method", &self.code_challenge_method);
        q.finish()
    }

    pub(crate) fn hidden_fields(&self) -> Vec<(&'static str, &str)> {
        let mut fields = vec![
            ("client_id", self.client_id.as_str()),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("scope", self.scope.as_str()),
            ("code_challenge", self.code_challenge.as_str()),
            ("code_challenge_method", self.code_challenge_method.as_str()),
        ];
        if let Some(s) = &self.state {
            fields.push(("state", s.as_str()));
        }
        fields
    }
}

/// `GET /api/oauth/authorize`: the login form or the consent page.
async fn authorize_page(
    State(state): State<AppState>,
    MaybeSession(session): MaybeSession,
    headers: HeaderMap,
    params: Result<QueryParams<AuthorizeParams>, AppError>,
) -> Result<Response, OAuthFailure> {
    let QueryParams(params) = params.map_err(OAuthFailure::invalid_request)?;
    let (origin, policy, identity) = params.validate(&state, host_of(&headers)).await?;
    let page = match session {
        None => page::login(&params, None),
        Some(s) if s.user.email_verified_at.is_none() => page::verify_first(&s.user.email),
        Some(s) => {
            // Nothing to approve until the owner revokes an app (the approval checks again).
            match crate::user::grant_cap(&state, &s.user.id).await {
                Ok(()) => {}
                Err(AppError::Conflict(message)) => {
                    let page = page::at_grant_cap(&s.user.email, &message);
                    return Ok(no_store((StatusCode::CONFLICT, Html(page))).into_response());
                }
                Err(other) => return Err(other.into()),
            }
            // The words come from the permissions themselves, never from stored prose.
            let lines = keycast_core::Policy::from_row(&policy)
                .map_err(AppError::internal)?
                .summary()
                .lines();
            let (db, _) = state.api()?;
            let mut own = Vec::new();
            for row in policies::list_owned(db, &s.user.id).await.map_err(AppError::from)? {
                let words = keycast_core::Policy::from_row(&row)
                    .map_err(AppError::internal)?
                    .summary()
                    .lines();
                own.push((row, words));
            }
            let consent = page::Consent {
                params: &params,
                origin: &origin,
                identity: &identity,
                policy: &policy,
                lines: &lines,
                own: &own,
            };
            page::consent(
                &consent,
                &s.user.email,
                &csrf_token(&s.token),
                &shown_stamp(&s.token, now_ms()),
            )
        }
    };
    Ok(no_store(Html(page)).into_response())
}

#[derive(Deserialize)]
struct LoginForm {
    email: String,
    password: String,
    #[serde(flatten)]
    params: AuthorizeParams,
}

/// `POST /api/oauth/login` (form): logs in and returns to the consent page (303), or shows
/// the form again with the error.
async fn login_form(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    FormOrJson { value: form, .. }: FormOrJson<LoginForm>,
) -> Result<Response, AppError> {
    match crate::auth::log_in(&state, &ip, secure, &form.email, form.password).await {
        Ok((_, cookie)) => {
            let back = format!("/api/oauth/authorize?{}", form.params.to_query());
            let location = HeaderValue::from_str(&back).map_err(AppError::internal)?;
            Ok((StatusCode::SEE_OTHER, [(SET_COOKIE, cookie), (LOCATION, location)]).into_response())
        }
        Err(AppError::Unauthorized(message)) => Ok((
            StatusCode::UNAUTHORIZED,
            Html(page::login(&form.params, Some(&message))),
        )
            .into_response()),
        Err(other) => Err(other),
    }
}

#[derive(Deserialize)]
struct Decision {
    /// Form: `approve` or `deny` (the button pressed).
    #[serde(default)]
    decision: Option<String>,
    /// JSON: `true` to approve.
    #[serde(default)]
    approved: Option<bool>,
    /// Form: the session-bound CSRF token from the consent page.
    #[serde(default)]
    csrf: Option<String>,
    /// Form: when the consent page was shown (see [`check_shown_long_enough`]).
    #[serde(default)]
    shown: Option<String>,
    /// How long the grant lasts: `hour`, `day`, `week` or `forever` (the default).
    #[serde(default)]
    duration: Option<Value>,
    /// Optional limits (whole numbers; empty or absent: none).
    #[serde(default)]
    max_signatures: Option<Value>,
    #[serde(default)]
    per_minute: Option<Value>,
    #[serde(default)]
    per_hour: Option<Value>,
    #[serde(default)]
    per_day: Option<Value>,
    /// The owner may put one of their own policies (or another public one) on the grant
    /// instead of the one the app asked for; by slug.
    #[serde(default)]
    policy: Option<String>,
    #[serde(flatten)]
    params: AuthorizeParams,
}

impl Decision {
    /// The owner's choice of duration and limits (form strings or JSON numbers).
    fn choice(&self) -> Result<Choice, OAuthFailure> {
        let text = |v: &Option<Value>| match v {
            Some(Value::String(s)) => s.trim().to_owned(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        let duration =
            GrantDuration::parse(&text(&self.duration)).map_err(|why| OAuthFailure::new("invalid_request", &why))?;
        let limit = |name: &str, v: &Option<Value>| -> Result<Option<u32>, OAuthFailure> {
            let t = text(v);
            if t.is_empty() {
                return Ok(None);
            }
            t.parse::<u32>().ok().filter(|n| *n >= 1).map(Some).ok_or_else(|| {
                OAuthFailure::new(
                    "invalid_request",
                    &format!("{name} must be a whole number from 1 to 4294967295, or empty for no limit"),
                )
            })
        };
        Ok(Choice {
            duration_secs: duration.secs(),
            limits: Limits {
                max_signatures: limit("max_signatures", &self.max_signatures)?.map(u64::from),
                per_minute: limit("per_minute", &self.per_minute)?,
                per_hour: limit("per_hour", &self.per_hour)?,
                per_day: limit("per_day", &self.per_day)?,
            },
        })
    }
}

/// `POST /api/oauth/authorize`: the user's decision (see the module doc).
async fn decide(
    State(state): State<AppState>,
    session: SessionUser,
    headers: HeaderMap,
    body: Result<FormOrJson<Decision>, AppError>,
) -> Result<Response, OAuthFailure> {
    let FormOrJson { value: d, json } = body.map_err(OAuthFailure::invalid_request)?;
    if json {
        check_same_origin(&state, &headers)?;
    } else if !d.csrf.as_deref().is_some_and(|c| csrf_matches(&session.token, c)) {
        let why = "the consent form's CSRF token is missing or wrong; reload the consent page";
        return Err(AppError::Forbidden(why.into()).into());
    }
    let (_, mut policy, _) = d.params.validate(&state, host_of(&headers)).await?;
    if let Some(slug) = d.policy.as_deref().filter(|s| !s.is_empty() && *s != policy.slug) {
        // Only the owner chooses here (CSRF token or same-origin JSON): a public policy
        // or one of their own; another user's custom policy is unknown.
        let (db, _) = state.api()?;
        policy = policies::find_usable(db, &session.user.id, slug)
            .await
            .map_err(AppError::from)?
            .ok_or_else(|| OAuthFailure::new("invalid_request", &format!("there is no policy {slug:?} you can use")))?;
    }
    let approved = d.approved.unwrap_or(false) || d.decision.as_deref() == Some("approve");
    if approved {
        if !json {
            check_shown_long_enough(&session.token, d.shown.as_deref(), now_ms())?;
        }
        keycast_core::account_security::require_verified(&session.user).map_err(AppError::from)?;
    }
    let target = if approved {
        crate::user::admit_new_grant(&state, &session.user.id).await?;
        let (db, _) = state.api()?;
        state.ensure_writable().await?;
        session.ensure_still_live(&state).await?;
        // Fault injection: a pause in which a reset may end the session.
        keycast_core::hold_at_fail_point("consent-after-session-check").await;
        let session_hash = keycast_core::secret::hash_token(&session.token);
        let request = d
            .params
            .code_request(&session.user.id, &policy, d.choice()?, &session_hash);
        let code = oauth::issue_code(db, &request, state.options().code_ttl_secs, now_unix()).await?;
        state.confirm_write(false).await?;
        Ok((
            code.expose().clone(),
            d.params.redirect_with(&issuer(&state), &[("code", code.expose())]),
        ))
    } else {
        Err(d.params.redirect_with(&issuer(&state), &[("error", "access_denied")]))
    };
    Ok(match (json, target) {
        (true, Ok((code, uri))) => no_store(Json(json!({ "code": code, "redirect_uri": uri }))).into_response(),
        (true, Err(uri)) => Json(json!({ "error": "access_denied", "redirect_uri": uri })).into_response(),
        (false, Ok((_, uri)) | Err(uri)) => found(&uri)?,
    })
}

/// The `Host` a request was sent to.
fn host_of(headers: &HeaderMap) -> Option<&str> {
    headers.get("host").and_then(|v| v.to_str().ok())
}

/// A JSON approval must come from one of keycast's own pages: its `Origin` is the public
/// URL's, or the scheme and host the request was sent to.
fn check_same_origin(state: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    let origin = headers.get(ORIGIN).and_then(|v| v.to_str().ok());
    let ok = origin.is_some_and(|o| crate::origin::is_own_origin(&state.options().public_url, host_of(headers), o));
    if ok {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "a JSON approval must come from keycast's own pages (Origin mismatch)".into(),
        ))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenParams {
    grant_type: String,
    code: String,
    pub(crate) client_id: String,
    redirect_uri: String,
    code_verifier: String,
    refresh_token: String,
}

/// The first of `fields` that is empty, as RFC 6749's `invalid_request`.
fn require(fields: &[(&str, &str)]) -> Result<(), OAuthFailure> {
    match fields.iter().find(|(_, v)| v.is_empty()) {
        Some((name, _)) => Err(OAuthFailure::new("invalid_request", &format!("{name} is required"))),
        None => Ok(()),
    }
}

/// `POST /api/oauth/token`: `authorization_code` → `{access_token, token_type, expires_in,
/// refresh_token, scope, bunker_url, policy, authorization_id}`; `refresh_token` → the same
/// without `bunker_url` (the one the app holds keeps working).
async fn token(
    State(state): State<AppState>,
    body: Result<FormOrJson<TokenParams>, AppError>,
) -> Result<Response, OAuthFailure> {
    let FormOrJson { value: p, .. } = body.map_err(OAuthFailure::invalid_request)?;
    match p.grant_type.as_str() {
        "authorization_code" => exchange(&state, &p).await,
        "refresh_token" => refresh(&state, &p).await,
        _ => Err(OAuthFailure::new(
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token",
        )),
    }
}

async fn exchange(state: &AppState, p: &TokenParams) -> Result<Response, OAuthFailure> {
    require(&[
        ("code", &p.code),
        ("client_id", &p.client_id),
        ("redirect_uri", &p.redirect_uri),
    ])?;
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    let request = TokenRequest {
        code: &p.code,
        client_id: &p.client_id,
        redirect_uri: &p.redirect_uri,
        code_verifier: &p.code_verifier,
    };
    let options = state.options();
    let now = now_unix();
    let grant = oauth::exchange_code(
        &services.signer,
        &request,
        &options.relays,
        options.token_lifetimes,
        services.signer.max_live_grants(),
        now,
    )
    .await;
    // NIP-46 starts listening for the new bunker now, before the app can use its URL. (A
    // revocation says so itself; a refused code changed no grant, and must not make every
    // instance re-read them all: anyone can send one.)
    let listening = grant.is_ok().then(|| {
        services.signer.authorizations_changed();
        services.signer.bunker_generation()
    });
    // An app connects the moment it has its URL, and a request published before keycast
    // subscribes for its bunker is lost (relays keep no ephemeral event): the answer waits
    // until NIP-46 listens for it, alongside the durable wait. Reading thousands of bunkers
    // takes a while; a relay that is down does not hold it up (the sync reports what it read
    // either way). Capped well inside the request's own limit: the code is spent by now, and
    // an answer cut off there would leave the app to present it again, which revokes the grant.
    let request_limit = state.options().request_timeout;
    let within = match request_limit.is_zero() {
        true => LISTENING_WITHIN,
        false => LISTENING_WITHIN.min(request_limit / 4),
    };
    let listened = async {
        if let Some(generation) = listening {
            services.signer.wait_bunkers_synced(generation, within).await;
        }
    };
    // A code used twice revokes the grant it became: that must be durable too.
    let (durable, ()) = tokio::join!(state.confirm_write(true), listened);
    durable?;
    let grant = grant?;
    let mut body = token_body(
        &grant.authorization,
        grant.access_token.expose(),
        grant.access_token_expires_at - now,
        grant.refresh_token.as_ref().map(|t| t.expose().as_str()),
    );
    body["bunker_url"] = json!(grant.bunker_url().expose());
    Ok(no_store(Json(body)).into_response())
}

async fn refresh(state: &AppState, p: &TokenParams) -> Result<Response, OAuthFailure> {
    require(&[("refresh_token", &p.refresh_token), ("client_id", &p.client_id)])?;
    let (db, services) = state.api()?;
    // Each refresh stores a token pair, and spent refresh tokens are kept for reuse detection
    // (`housekeeping::SPENT_REFRESH_MEMORY_SECS`): an app refreshing in a loop grew the database
    // by a pair a request. Counted per grant: one app cannot hold up the account's others.
    if let Some(grant) = keycast_core::refresh::grant_of(db, &p.refresh_token, now_unix())
        .await
        .map_err(AppError::from)?
    {
        state
            .limits()
            .check(
                &format!("refresh:{}", grant.as_str()),
                crate::limit::REFRESHES_PER_GRANT,
            )
            .await?;
    }
    state.ensure_writable().await?;
    let request = RefreshRequest {
        refresh_token: &p.refresh_token,
        client_id: &p.client_id,
    };
    let now = now_unix();
    let refreshed =
        keycast_core::refresh::refresh(&services.signer, &request, state.options().token_lifetimes, now).await;
    // A refused reuse has revoked the family: that must be durable too.
    state.confirm_write(true).await?;
    let refreshed = refreshed?;
    let body = token_body(
        &refreshed.authorization,
        refreshed.access_token.expose(),
        refreshed.access_token_expires_at - now,
        Some(refreshed.refresh_token.expose()),
    );
    Ok(no_store(Json(body)).into_response())
}

fn token_body(authz: &Authorization, access: &str, expires_in: i64, refresh: Option<&str>) -> Value {
    let policy = &authz.policy;
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": format!("policy:{}", policy.slug),
        "authorization_id": authz.id.as_str(),
        "policy": policy_json(policy),
    });
    if let Some(refresh) = refresh {
        body["refresh_token"] = json!(refresh);
    }
    body
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RevokeParams {
    token: String,
    /// `access_token` or `refresh_token`; a hint only (RFC 7009 §2.1), both are looked up.
    #[allow(dead_code)]
    token_type_hint: Option<String>,
}

/// `POST /api/oauth/revoke` (RFC 7009): 200 whether or not the token existed.
async fn revoke(
    State(state): State<AppState>,
    body: Result<FormOrJson<RevokeParams>, AppError>,
) -> Result<Response, OAuthFailure> {
    let FormOrJson { value: p, .. } = body.map_err(OAuthFailure::invalid_request)?;
    require(&[("token", &p.token)])?;
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    keycast_core::refresh::revoke_token(&services.signer, &p.token)
        .await
        .map_err(AppError::from)?;
    state.confirm_write(true).await?;
    Ok(no_store(StatusCode::OK).into_response())
}

/// A policy as the token response and the user's authorization list show it.
pub(crate) fn policy_json(policy: &keycast_core::Policy) -> Value {
    json!({
        "slug": policy.slug,
        "allowed_kinds": policy.allowed_kinds,
        "denied_kinds": policy.denied_kinds,
        "any_kind": policy.any_kind,
        "blocked_words": policy.blocked_words,
        "encrypt": policy.encrypt,
        "decrypt": policy.decrypt,
        "encrypt_to_self": policy.encrypt_to_self,
        "full_access": policy.full_access,
    })
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
async fn metadata(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let (db, _) = state.api()?;
    let scopes: Vec<String> = policies::list(db)
        .await?
        .into_iter()
        .map(|p| format!("policy:{}", p.slug))
        .collect();
    let issuer = issuer(&state);
    Ok(Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/api/oauth/authorize"),
        "token_endpoint": format!("{issuer}/api/oauth/token"),
        "revocation_endpoint": format!("{issuer}/api/oauth/revoke"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": scopes,
        "authorization_response_iss_parameter_supported": true,
    })))
}

/// This server's issuer identifier (RFC 8414): its public URL.
fn issuer(state: &AppState) -> String {
    state.options().public_url.trim_end_matches('/').to_owned()
}

fn found(uri: &str) -> Result<Response, OAuthFailure> {
    let location = HeaderValue::from_str(uri).map_err(AppError::internal)?;
    Ok((StatusCode::FOUND, [(LOCATION, location)]).into_response())
}

fn no_store(inner: impl IntoResponse) -> impl IntoResponse {
    (
        [
            (CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        inner,
    )
}

/// An OAuth endpoint's failure: RFC 6749 `{error, error_description}` (400), or an
/// [`AppError`] for what is not OAuth's business (no session, 503, CSRF).
#[derive(Debug)]
pub(crate) enum OAuthFailure {
    Rfc { error: &'static str, description: String },
    App(AppError),
}

impl OAuthFailure {
    fn new(error: &'static str, description: &str) -> OAuthFailure {
        OAuthFailure::Rfc {
            error,
            description: description.to_owned(),
        }
    }

    /// A request the endpoint could not even read (malformed query or body, wrong media
    /// type) is RFC 6749's `invalid_request`, in its shape; other failures keep theirs.
    fn invalid_request(err: AppError) -> OAuthFailure {
        match err {
            AppError::BadRequest(reason) | AppError::UnsupportedMediaType(reason) => OAuthFailure::Rfc {
                error: "invalid_request",
                description: reason,
            },
            other => OAuthFailure::App(other),
        }
    }
}

impl From<OAuthError> for OAuthFailure {
    fn from(err: OAuthError) -> Self {
        let error = err.code();
        match err {
            OAuthError::Internal(cause) => OAuthFailure::App(cause.into()),
            OAuthError::InvalidRequest { reason }
            | OAuthError::InvalidGrant { reason }
            | OAuthError::InvalidScope { reason }
            | OAuthError::UnauthorizedClient { reason } => OAuthFailure::Rfc {
                error,
                description: reason,
            },
        }
    }
}

impl From<AppError> for OAuthFailure {
    fn from(err: AppError) -> Self {
        OAuthFailure::App(err)
    }
}

impl IntoResponse for OAuthFailure {
    fn into_response(self) -> Response {
        match self {
            OAuthFailure::Rfc { error, description } => (
                StatusCode::BAD_REQUEST,
                [(CACHE_CONTROL, HeaderValue::from_static("no-store"))],
                Json(json!({ "error": error, "error_description": description })),
            )
                .into_response(),
            OAuthFailure::App(err) => err.into_response(),
        }
    }
}
