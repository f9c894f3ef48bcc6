//! The logged-in user's own resources: authorizations (list, revoke), activity, key
//! (public side, export after password re-authentication), password (changed after
//! re-authentication), the account itself (deleted after re-authentication).

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use keycast_core::account_security::{self, ExportFormat};
use keycast_core::authz::GrantError;
use keycast_core::keys;
use keycast_core::nostr::nips::nip19::ToBech32;
use keycast_core::nostrconnect::RelayCapError;
use keycast_core::terms::GrantTerms;
use keycast_core::{NostrConnectUri, Secret};
use keycast_db::users::User;
use keycast_db::{activity, authz as authz_repo, now_unix, policies, AuthorizationId, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::extract::{ClientIp, JsonBody, OverHttps, PathParam, QueryParams};
use crate::limit::GRANTS_PER_ACCOUNT;
use crate::session::SessionUser;
use crate::{AppError, AppState};

/// Most activity records one request returns.
const MAX_ACTIVITY: i64 = 500;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/user/authorizations", get(list_authorizations))
        .route(
            "/api/user/authorizations/{id}",
            delete(revoke)
                .get(crate::grants::show_authorization)
                .patch(crate::grants::edit_authorization)
                .layer(axum::extract::DefaultBodyLimit::max(crate::POLICY_BODY_LIMIT)),
        )
        .route("/api/user/activity", get(list_activity))
        .route("/api/user/key", get(key))
        .route("/api/user/key/export", post(export))
        .route("/api/user/key/replace", post(replace_key))
        .route("/api/user/key/exposure", delete(dismiss_exposure))
        .route("/api/user/nostrconnect", post(nostrconnect))
        .route("/api/user/password", post(change_password))
        .route("/api/user/delete", post(delete_account))
}

/// `GET /api/user/authorizations` → `{authorizations: [{id, client_id, policy,
/// redirect_origin, bunker_pubkey, created_at, revoked_at, last_activity, expires_at,
/// limits, approved_kinds}]}`.
async fn list_authorizations(State(state): State<AppState>, session: SessionUser) -> Result<Json<Value>, AppError> {
    let (db, _) = state.api()?;
    let rows = authz_repo::list_for_user(db, &session.user.id, now_unix()).await?;
    let policies = crate::grants::policies_by_id(db, &session.user.id, &rows).await?;
    let mut out = Vec::new();
    for row in rows {
        let last = activity::list_for_authorization(db, &row.id, 1).await?;
        let terms = GrantTerms::from_json(row.terms.as_deref()).map_err(AppError::internal)?;
        out.push(json!({
            "id": row.id.as_str(),
            "client_id": row.client_id,
            "policy": policies.get(&row.policy_id).map(|p| &p.slug),
            "redirect_origin": row.redirect_origin,
            "bunker_pubkey": row.bunker_pubkey,
            "connected_client_pubkey": row.connected_client_pubkey,
            "created_at": row.created_at,
            "revoked_at": row.revoked_at,
            "last_activity": last.first().map(|a| a.created_at),
            "expires_at": terms.expires_at,
            "limits": terms.limits,
            // Kinds the owner allowed on an approval page, on top of the policy.
            "approved_kinds": keycast_db::approvals::allowed_kinds(db, &row.id).await?,
        }));
    }
    Ok(Json(json!({ "authorizations": out })))
}

/// `DELETE /api/user/authorizations/{id}` → 204 once the revocation is durable; the very
/// next request with its token or bunker is refused. 404 if it is not the user's or was
/// already revoked.
async fn revoke(
    State(state): State<AppState>,
    session: SessionUser,
    PathParam(id): PathParam<String>,
) -> Result<StatusCode, AppError> {
    revoke_authorization(&state, &session.user.id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What a revocation that could not be made answers.
fn revocation_failed(err: keycast_core::SignError) -> AppError {
    match err {
        keycast_core::SignError::Internal(cause) => cause.into(),
        other => AppError::internal(other),
    }
}

/// Revokes the user's live authorization `id` and waits until that is durable and in force
/// on every instance (shared with the dashboard's revoke button). 404 if it is not the
/// user's, or was revoked already — then only after the same wait: it may be this request's
/// own retry, whose first answer was lost after the revocation was made.
pub(crate) async fn revoke_authorization(state: &AppState, user: &UserId, id: String) -> Result<(), AppError> {
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    let revocation = services
        .signer
        .revoke(&AuthorizationId::new(id), user)
        .await
        .map_err(revocation_failed)?;
    if revocation == keycast_core::Revocation::NotFound {
        return Err(AppError::NotFound("no such live authorization of yours".into()));
    }
    state.confirm_write(true).await?;
    if revocation == keycast_core::Revocation::AlreadyRevoked {
        return Err(AppError::NotFound("this authorization is revoked already".into()));
    }
    Ok(())
}

#[derive(Deserialize)]
struct NostrConnectBody {
    uri: String,
    policy: String,
}

/// `POST /api/user/nostrconnect {uri, policy}` → 201 `{id, bunker_pubkey, client_pubkey,
/// policy, relays}`: authorizes the app that showed the `nostrconnect://` URI under the
/// chosen policy. Once durable, keycast answers the app on its relays with its secret.
async fn nostrconnect(
    State(state): State<AppState>,
    session: SessionUser,
    JsonBody(body): JsonBody<NostrConnectBody>,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let authz = accept_nostrconnect(&state, &session, &body.uri, &body.policy).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": authz.id.as_str(),
            "bunker_pubkey": authz.bunker_pubkey.to_hex(),
            "client_pubkey": authz.connected_client_pubkey.map(|pk| pk.to_hex()),
            "policy": authz.policy.slug,
            "relays": authz.relays,
        })),
    ))
}

/// The checks of a `nostrconnect://` URI before its grant: public relays (unless allowed),
/// within the caps on relays, and `policy` one `user` may use. Returns the policy.
async fn usable_nostrconnect(
    state: &AppState,
    user: &UserId,
    uri: &NostrConnectUri,
    policy: &str,
) -> Result<keycast_db::policies::PolicyRow, AppError> {
    if !state.options().nostrconnect_internal_relays {
        uri.refuse_internal_relays()
            .await
            .map_err(|e| AppError::BadRequest(e.to_string()))?;
    }
    let (db, _) = state.api()?;
    check_relay_caps(state, user, uri, None).await?;
    // A public policy, or one of the user's own custom policies.
    policies::find_usable(db, user, policy).await?.ok_or_else(|| {
        AppError::BadRequest(format!(
            "unknown policy {policy:?}; GET /api/policies lists them (e.g. social, readonly, wallet, full), \
             GET /api/user/policies your own"
        ))
    })
}

/// [`NostrConnectUri::check_relay_caps`] with keycast's caps and relays (400 past a cap).
async fn check_relay_caps(
    state: &AppState,
    user: &UserId,
    uri: &NostrConnectUri,
    stored: Option<&keycast_db::AuthorizationId>,
) -> Result<(), AppError> {
    let (db, _) = state.api()?;
    let options = state.options();
    uri.check_relay_caps(db, user, options.nostrconnect_relay_caps, &options.relays, stored)
        .await
        .map_err(|e| match e {
            RelayCapError::Refused(e) => AppError::BadRequest(e.to_string()),
            RelayCapError::Repo(e) => e.into(),
        })
}

/// Creates a `nostrconnect://` authorization for `user` and waits until it is durable
/// (shared with the dashboard's form).
pub(crate) async fn accept_nostrconnect(
    state: &AppState,
    session: &SessionUser,
    uri: &str,
    policy: &str,
) -> Result<keycast_core::Authorization, AppError> {
    account_security::require_verified(&session.user)?;
    let user = &session.user.id;
    let uri = NostrConnectUri::parse(uri).map_err(|e| AppError::BadRequest(e.to_string()))?;
    // Before the relays' names are looked up (a lookup can take seconds, on a blocking
    // thread): past the budget, an acceptance costs none. A URI refused after it has spent its
    // attempt: its lookups are what the budget is for.
    admit_new_grant(state, user).await?;
    let policy = usable_nostrconnect(state, user, &uri, policy).await?;
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    if let Some(ms) = held_before_grant() {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    session.ensure_still_live(state).await?;
    // Fault injection: a pause in which a reset may end the session.
    keycast_core::hold_at_fail_point("nostrconnect-after-session-check").await;
    let authz = services
        .signer
        .accept_nostrconnect(user, &policy, &uri, &keycast_core::secret::hash_token(&session.token))
        .await
        .map_err(|e| match e {
            e @ GrantError::PolicyDeleted { .. } => AppError::BadRequest(e.to_string()),
            e @ GrantError::TooManyGrants { .. } => AppError::Conflict(e.to_string()),
            e => keycast_core::InternalError::from(e).into(),
        })?;
    // Counted again with the grant stored: acceptances at once each found room above.
    if let Err(refused) = check_relay_caps(state, user, &uri, Some(&authz.id)).await {
        // Taken back whatever else revoked it meanwhile (a reset, the owner): the answer is the
        // cap's refusal either way.
        services
            .signer
            .revoke(&authz.id, user)
            .await
            .map_err(revocation_failed)?;
        state.confirm_write(true).await?;
        return Err(refused);
    }
    state.confirm_write(true).await?;
    // NIP-46 starts listening for the new bunker on hearing this, then answers the client.
    services.signer.announce_nostrconnect(&authz, &uri);
    Ok(authz)
}

/// Milliseconds the tests hold a `nostrconnect://` acceptance before its grant is written, as
/// a slow DNS answer for one of its relays would (fail point `nostrconnect-before-grant`,
/// `return(<ms>)`); always `None` without fault injection.
fn held_before_grant() -> Option<u64> {
    fail::fail_point!("nostrconnect-before-grant", |ms| keycast_core::held_at_fail_point(
        "nostrconnect-before-grant",
        ms
    ));
    None
}

/// Whether `user` may start one more grant (an OAuth consent, a `nostrconnect://`
/// acceptance): within [`GRANTS_PER_ACCOUNT`] (429 beyond), and with fewer live grants
/// than the cap (409, saying to revoke one). The insert checks the cap again, atomically.
pub(crate) async fn admit_new_grant(state: &AppState, user: &UserId) -> Result<(), AppError> {
    state
        .limits()
        .check(&format!("grant:{user}"), GRANTS_PER_ACCOUNT)
        .await?;
    grant_cap(state, user).await
}

/// 409 ([`AppError::Conflict`], saying to revoke one) when `user` has the most live grants
/// an account may have.
pub(crate) async fn grant_cap(state: &AppState, user: &UserId) -> Result<(), AppError> {
    let (db, services) = state.api()?;
    let max = services.signer.max_live_grants();
    if authz_repo::count_live_for_user(db, user, now_unix()).await? >= i64::from(max) {
        return Err(AppError::Conflict(GrantError::TooManyGrants { max }.to_string()));
    }
    Ok(())
}

#[derive(Deserialize)]
struct ActivityQuery {
    limit: Option<i64>,
}

/// `GET /api/user/activity?limit=` → `{activity: [{authorization_id, method, kind,
/// transport, created_at}]}`, newest first (default 100). Records reach the database
/// about a second after the request.
async fn list_activity(
    State(state): State<AppState>,
    session: SessionUser,
    QueryParams(q): QueryParams<ActivityQuery>,
) -> Result<Json<Value>, AppError> {
    let (db, _) = state.api()?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_ACTIVITY);
    let rows = activity::list_for_user(db, &session.user.id, limit).await?;
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|a| {
            json!({
                "authorization_id": a.authorization_id.as_str(),
                "method": a.method,
                "kind": a.kind,
                "transport": a.transport,
                "created_at": a.created_at,
            })
        })
        .collect();
    let account: Vec<Value> = account_security::account_events(db, &session.user.id, limit)
        .await?
        .into_iter()
        .map(|e| json!({ "event": e.event, "detail": e.detail, "created_at": e.created_at }))
        .collect();
    Ok(Json(json!({ "activity": rows, "account": account })))
}

/// `GET /api/user/key` → `{pubkey, npub, origin, exposure}`; `exposure` is `null`, or
/// `{since, reason, message}` when the key may be known to a previous holder of the account.
async fn key(State(state): State<AppState>, session: SessionUser) -> Result<Json<Value>, AppError> {
    let (db, _) = state.api()?;
    let key = keys::find_user_key(db, &session.user.id).await?;
    let exposure = account_security::key_exposure(db, &session.user.id).await?;
    Ok(Json(key_json(&key, exposure)))
}

fn key_json(key: &keys::UserKey, exposure: Option<(i64, String)>) -> Value {
    json!({
        "pubkey": key.pubkey.to_hex(),
        "npub": key.pubkey.to_bech32().unwrap_or_default(),
        "origin": key.origin.as_str(),
        "exposure": exposure.map(|(since, reason)| json!({
            "since": since,
            "message": account_security::exposure_text(&reason),
            "reason": reason,
        })),
    })
}

#[derive(Deserialize)]
struct PasswordBody {
    password: String,
}

/// `POST /api/user/key/replace {password}` → 200 `{pubkey, npub, origin, exposure: null}`:
/// a new generated key; every authorization is revoked.
async fn replace_key(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    session: SessionUser,
    JsonBody(body): JsonBody<PasswordBody>,
) -> Result<Json<Value>, AppError> {
    let key = start_fresh(&state, &ip, &session.user, body.password).await?;
    Ok(Json(key_json(&key, None)))
}

/// Re-checks the password, replaces the key and waits until that is durable (shared with
/// the dashboard's button).
pub(crate) async fn start_fresh(
    state: &AppState,
    ip: &str,
    user: &User,
    password: String,
) -> Result<keys::UserKey, AppError> {
    // Recorded in the account's events, made durable, and an argon2 check each: the same
    // budget as exports and password changes.
    let proof = reauthenticate_for_change(state, ip, user, password).await?;
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    let key = account_security::replace_key(&services.signer, services.keys.as_ref(), &proof, now_unix()).await?;
    state.confirm_write(true).await?;
    Ok(key)
}

/// `DELETE /api/user/key/exposure` → 204: the owner says the key is theirs alone; the
/// warning goes (recorded in the account's events). 404 when there was none.
async fn dismiss_exposure(State(state): State<AppState>, session: SessionUser) -> Result<StatusCode, AppError> {
    dismiss_key_exposure(&state, &session.user.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Clears the exposure mark (shared with the dashboard's button).
pub(crate) async fn dismiss_key_exposure(state: &AppState, user: &UserId) -> Result<(), AppError> {
    let (db, _) = state.api()?;
    state.ensure_writable().await?;
    if !account_security::dismiss_exposure(db, user, now_unix()).await? {
        return Err(AppError::NotFound("the key is not marked exposed".into()));
    }
    state.confirm_write(false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangePasswordBody {
    current_password: String,
    new_password: String,
}

/// `POST /api/user/password {current_password, new_password}` → 200 `{other_sessions_ended}`
/// and a new session cookie, once durable: every session that existed has ended, this one
/// included; apps stay authorized. The account is mailed.
async fn change_password(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    session: SessionUser,
    JsonBody(body): JsonBody<ChangePasswordBody>,
) -> Result<Response, AppError> {
    let (ended, cookie) = set_password(&state, &ip, secure, &session, body.current_password, body.new_password).await?;
    Ok(([(SET_COOKIE, cookie)], Json(json!({ "other_sessions_ended": ended }))).into_response())
}

/// Re-checks the current password, sets the new one, waits until that is durable and
/// mails the account (shared with the dashboard's form). Returns how many other sessions
/// ended and the `Set-Cookie` of the changer's new session.
pub(crate) async fn set_password(
    state: &AppState,
    ip: &str,
    secure: bool,
    session: &SessionUser,
    current: String,
    new: String,
) -> Result<(u64, HeaderValue), AppError> {
    let new = Secret::new(new);
    // Bad input costs no argon2 work and no backoff step.
    keycast_core::password::validate_new_password(&new)?;
    let proof = reauthenticate_for_change(state, ip, &session.user, current).await?;
    let (db, services) = state.api()?;
    state.ensure_writable().await?;
    let (ended, fresh) =
        keycast_core::accounts::change_password(db, &services.hasher, &proof, &new, now_unix()).await?;
    state.confirm_write(true).await?;
    crate::auth::send_password_changed_notice(state, &session.user, ip);
    Ok((ended, crate::session::session_cookie(&fresh, secure)))
}

/// `POST /api/user/delete {password}` → 204 once durable, the session cookie cleared: the
/// account, its key and everything under it are gone, every app disconnected. The address
/// is mailed.
async fn delete_account(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    OverHttps(secure): OverHttps,
    session: SessionUser,
    JsonBody(body): JsonBody<PasswordBody>,
) -> Result<Response, AppError> {
    remove_account(&state, &ip, &session.user, body.password).await?;
    Ok((
        StatusCode::NO_CONTENT,
        [(SET_COOKIE, crate::session::clear_cookie(secure))],
    )
        .into_response())
}

/// Re-checks the password, deletes the account, waits until that is durable and mails the
/// address (shared with the dashboard's form).
pub(crate) async fn remove_account(state: &AppState, ip: &str, user: &User, password: String) -> Result<(), AppError> {
    notice_can_go(state)?;
    let proof = reauthenticate(state, ip, user, password).await?;
    let (_, services) = state.api()?;
    state.ensure_writable().await?;
    keycast_core::accounts::delete_account(&services.signer, &proof).await?;
    state.confirm_write(true).await?;
    crate::auth::send_account_deleted_notice(state, user, crate::auth::DeletedBy::Owner { ip });
    Ok(())
}

/// Checks the password again for a change recorded in the account's events (an export, a
/// new password, a new key), counted against the account's budget
/// ([`crate::limit::NOTICED_CHANGES_PER_ACCOUNT`]). The budget is asked before the password
/// is hashed, so a loop of right passwords past it costs no argon2 work (one account's loop
/// held the hashing queue full for everyone), and spent only once the password is right, so
/// a stolen session alone cannot spend the owner's budget — not even with requests it
/// abandons half way.
/// Refuses a change whose notice to the owner (an export, a password change or replaced key,
/// a deletion) could not be mailed now: whoever holds the password could otherwise fill the
/// account mail lane first and export unannounced.
fn notice_can_go(state: &AppState) -> Result<(), AppError> {
    if state.mail_has_room(crate::mail::Lane::Account) {
        return Ok(());
    }
    Err(AppError::Unavailable(
        "this change mails a notice to the account, and too many mails wait for the mail server; try again in a moment"
            .into(),
    ))
}

async fn reauthenticate_for_change(
    state: &AppState,
    ip: &str,
    user: &User,
    password: String,
) -> Result<keycast_core::Reauthenticated, AppError> {
    notice_can_go(state)?;
    let (budget, rate) = (
        format!("noticed:{}", user.id),
        crate::limit::NOTICED_CHANGES_PER_ACCOUNT,
    );
    state.limits().peek(&budget, rate).await?;
    let proof = reauthenticate(state, ip, user, password).await?;
    state.limits().check(&budget, rate).await?;
    Ok(proof)
}

/// Checks the user's password again, with a backoff per account and client (see
/// [`crate::limit`]).
async fn reauthenticate(
    state: &AppState,
    ip: &str,
    user: &User,
    password: String,
) -> Result<keycast_core::Reauthenticated, AppError> {
    let (_, services) = state.api()?;
    let backoff = crate::limit::password_key(&user.email, ip);
    state.limits().start_password_try(&backoff).await?;
    match services.hasher.reauthenticate(user, &Secret::new(password)).await {
        Ok(proof) => {
            state.limits().password_succeeded(&backoff).await;
            Ok(proof)
        }
        // A wrong password was counted when the try started; an answer that judged nothing
        // (the hashing queue full) is not.
        Err(err) => Err(crate::auth::judged_or_uncounted(state, &backoff, err.into()).await),
    }
}

#[derive(Deserialize)]
struct ExportBody {
    password: String,
    format: String,
    #[serde(default)]
    passphrase: Option<String>,
}

/// `POST /api/user/key/export {password, format: nsec|ncryptsec, passphrase?}` →
/// `{format, key}` (never cached). Needs a verified email; the password is checked again;
/// the export is recorded (and durable) before the key is answered, and mailed to the account.
async fn export(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    session: SessionUser,
    JsonBody(body): JsonBody<ExportBody>,
) -> Result<Response, AppError> {
    account_security::require_verified(&session.user)?;
    let format = match (body.format.as_str(), body.passphrase) {
        ("nsec", _) => ExportFormat::Nsec,
        ("ncryptsec", Some(p)) if p.chars().count() >= 8 => ExportFormat::Ncryptsec(Secret::new(p)),
        ("ncryptsec", _) => {
            return Err(AppError::BadRequest(
                "ncryptsec needs a passphrase of at least 8 characters".into(),
            ))
        }
        _ => return Err(AppError::BadRequest("format must be nsec or ncryptsec".into())),
    };
    let proof = reauthenticate_for_change(&state, &ip, &session.user, body.password).await?;
    let (db, services) = state.api()?;
    state.ensure_writable().await?;
    let key = account_security::export_key(
        db,
        services.keys.as_ref(),
        services.hasher.queue(),
        &session.user,
        &proof,
        format,
        now_unix(),
    )
    .await?;
    // The record of the export must survive before anyone holds the key.
    state.confirm_write(true).await?;
    crate::auth::send_export_notice(&state, &session.user, &body.format, &ip);
    Ok((
        [
            (CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        ],
        export_body(&body.format, &key),
    )
        .into_response())
}

/// `{"format": …, "key": …}` in a buffer that is zeroized when the server is done sending
/// it (the last reference to the body drops), so no copy of the exported key stays behind
/// in freed memory. Both values are bech32 or a fixed word: no JSON escaping needed.
fn export_body(format: &str, key: &Secret<String>) -> axum::body::Body {
    let format = if format == "ncryptsec" { "ncryptsec" } else { "nsec" };
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(key.expose().len() + 32));
    buf.extend_from_slice(b"{\"format\":\"");
    buf.extend_from_slice(format.as_bytes());
    buf.extend_from_slice(b"\",\"key\":\"");
    buf.extend_from_slice(key.expose().as_bytes());
    buf.extend_from_slice(b"\"}");
    axum::body::Body::from(bytes::Bytes::from_owner(ZeroizingBody(buf)))
}

/// Owner of a response body's bytes that wipes them on drop.
struct ZeroizingBody(zeroize::Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
