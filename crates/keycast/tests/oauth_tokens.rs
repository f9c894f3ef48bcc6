//! OAuth tokens an app can live with, against the real binary, driven by the standard
//! OAuth client library (`oauth2`): short-lived access tokens, rotating refresh tokens
//! (RFC 6749 §6), reuse of a spent refresh token revoking the whole family (RFC 9700
//! §4.14), RFC 7009 revocation, and the RFC 8414 metadata advertising it all. The bunker
//! URL of the first exchange keeps working across refreshes (nostr-tools over NIP-46).

mod harness;

use harness::api::*;
use harness::flow::{approve, authorize_query, pkce, refresh_request, register, token_request};
use harness::nostr::BunkerClient;
use harness::{Engine, Keycast, Launch};
use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    ClientId, EndpointNotSet, EndpointSet, ExtraTokenFields, RefreshToken, RequestTokenError, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde_json::{json, Value};

fn start(engine: Engine) -> (tempfile::TempDir, Keycast) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    (dir, server)
}

/// keycast's extra token-response fields; a refresh response has no `bunker_url` (the app
/// keeps the one it has).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct KeycastFields {
    #[serde(default)]
    bunker_url: Option<String>,
    authorization_id: String,
    policy: Value,
}
impl ExtraTokenFields for KeycastFields {}

type Token = StandardTokenResponse<KeycastFields, BasicTokenType>;
type Client = oauth2::Client<
    BasicErrorResponse,
    Token,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

fn oauth_http(request: oauth2::HttpRequest) -> Result<oauth2::HttpResponse, ureq::Error> {
    let response = agent().run(request)?;
    let (parts, mut body) = response.into_parts();
    Ok(oauth2::HttpResponse::from_parts(parts, body.read_to_vec()?))
}

fn client(server: &Keycast, client_id: &str) -> Client {
    oauth2::Client::new(ClientId::new(client_id.into()))
        .set_token_uri(TokenUrl::new(format!("{}/api/oauth/token", server.base)).unwrap())
}

/// Register → consent → code exchange: (session cookie, the token response as parsed by
/// the OAuth client).
fn first_grant(server: &Keycast, email: &str) -> (String, Token) {
    let (cookie, _) = register(server, email, None);
    let (challenge, verifier) = pkce();
    let code = approve(server, &cookie, &authorize_query("policy:social", &challenge));
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    let token: Token = serde_json::from_str(&r.body).expect("the OAuth client reads the token response");
    (cookie, token)
}

fn refresh(client: &Client, token: &RefreshToken) -> Result<Token, BasicErrorResponseType> {
    client
        .exchange_refresh_token(token)
        .request(&oauth_http)
        .map_err(|err| match err {
            RequestTokenError::ServerResponse(response) => response.error().clone(),
            other => panic!("the refresh failed without an OAuth error: {other:?}"),
        })
}

fn signs(server: &Keycast, access: &str) -> u16 {
    rpc(server, access, "sign_event", json!([{ "kind": 1, "content": "hi" }])).status
}

/// RFC 7009 revocation as an app sends it (the `oauth2` crate refuses a plain-http
/// revocation URL, so the form is posted as that crate would post it).
fn revoke(server: &Keycast, token: &str, hint: &str) -> Reply {
    let body = form(&[("token", token), ("token_type_hint", hint), ("client_id", "test-app")]);
    post(
        server,
        "/api/oauth/revoke",
        None,
        "application/x-www-form-urlencoded",
        &body,
        &[],
    )
}

fn refresh_rotates_the_pair_and_the_bunker_url_keeps_working(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, first) = first_grant(&server, "rotate@example.com");
    let expires_in = first.expires_in().unwrap().as_secs();
    assert!(
        (3590..=3600).contains(&expires_in),
        "access tokens live an hour: {expires_in}"
    );
    let r0 = first
        .refresh_token()
        .expect("the code exchange issues a refresh token")
        .clone();
    let bunker = first.extra_fields().bunker_url.clone().unwrap();

    let app = client(&server, "test-app");
    let second = refresh(&app, &r0).expect("a refresh returns a new pair");
    let r1 = second
        .refresh_token()
        .expect("each refresh returns a new refresh token");
    assert_ne!(r1.secret(), r0.secret(), "the refresh token rotates");
    assert_ne!(second.access_token().secret(), first.access_token().secret());
    assert_eq!(
        second.extra_fields().authorization_id,
        first.extra_fields().authorization_id
    );
    assert_eq!(second.scopes().unwrap()[0].as_str(), "policy:social");
    assert!(second.expires_in().unwrap().as_secs() > 3500);
    assert_eq!(signs(&server, second.access_token().secret()), 200);
    let third = refresh(&app, r1).expect("the rotated token refreshes again");
    assert_eq!(signs(&server, third.access_token().secret()), 200);

    // The bunker URL from the first exchange still works after two refreshes.
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let connected = nip46.connect(&bunker);
    assert_eq!(connected["ok"], true, "connect after refreshes: {connected}");
    let signed =
        nip46.sign_event(json!({"kind": 1, "content": "after refresh", "tags": [], "created_at": 1_700_000_000}));
    assert_eq!(signed["ok"], true, "{signed}");
}

fn reusing_a_spent_refresh_token_revokes_the_whole_family(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, first) = first_grant(&server, "reuse@example.com");
    let app = client(&server, "test-app");
    let r0 = first.refresh_token().unwrap().clone();
    let second = refresh(&app, &r0).unwrap();
    let legit = refresh(&app, second.refresh_token().unwrap()).unwrap();
    assert_eq!(signs(&server, legit.access_token().secret()), 200);

    // A thief (or a confused app) presents an older spent token again: not the immediately
    // previous one, so no grace applies even within seconds.
    assert_eq!(refresh(&app, &r0).unwrap_err(), BasicErrorResponseType::InvalidGrant);

    // The whole family is gone: the latest refresh token, every access token, the grant.
    let r2 = legit.refresh_token().unwrap();
    assert_eq!(refresh(&app, r2).unwrap_err(), BasicErrorResponseType::InvalidGrant);
    for access in [first.access_token(), legit.access_token()] {
        let r = rpc(&server, access.secret(), "get_public_key", json!([]));
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(r.body.contains("revoked"), "{}", r.body);
        // RFC 6750 §3: what tells an OAuth client to refresh or authorize again.
        let challenge = r.www_authenticate.unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains(r#"error="invalid_token""#),
            "{challenge:?}"
        );
    }
    // No token at all: a challenge without an error code (§3.1).
    let bare = post(
        &server,
        "/api/nostr",
        None,
        "application/json",
        r#"{"method":"get_public_key"}"#,
        &[],
    );
    assert_eq!(bare.status, 401, "{}", bare.body);
    assert_eq!(bare.www_authenticate.as_deref(), Some(r#"Bearer realm="keycast""#));
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert!(
        listed["authorizations"][0]["revoked_at"].is_i64(),
        "the owner sees the grant revoked: {listed}"
    );
}

fn a_refresh_token_is_refused_to_another_client_and_not_spent(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, first) = first_grant(&server, "other@example.com");
    let r0 = first.refresh_token().unwrap().clone();
    let err = refresh(&client(&server, "evil-app"), &r0).unwrap_err();
    assert_eq!(err, BasicErrorResponseType::InvalidGrant);
    let ok = refresh(&client(&server, "test-app"), &r0).expect("the owner's client can still use it");
    assert_eq!(signs(&server, ok.access_token().secret()), 200);
    let unknown = refresh(&client(&server, "test-app"), &RefreshToken::new("nope".into())).unwrap_err();
    assert_eq!(unknown, BasicErrorResponseType::InvalidGrant);
}

fn revocation_ends_an_access_token_alone_or_the_whole_grant(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, first) = first_grant(&server, "revoke@example.com");
    let app = client(&server, "test-app");

    let r = revoke(&server, first.access_token().secret(), "access_token");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        signs(&server, first.access_token().secret()),
        401,
        "the revoked access token"
    );
    let next = refresh(&app, first.refresh_token().unwrap()).expect("the refresh token survives it");
    assert_eq!(signs(&server, next.access_token().secret()), 200);

    // Revoking the refresh token signs the app out: the grant and its tokens end.
    let r = revoke(&server, next.refresh_token().unwrap().secret(), "refresh_token");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(signs(&server, next.access_token().secret()), 401);
    assert_eq!(
        refresh(&app, next.refresh_token().unwrap()).unwrap_err(),
        BasicErrorResponseType::InvalidGrant
    );

    // RFC 7009 §2.2: an unknown token is not an error; a missing one is.
    assert_eq!(revoke(&server, "not-a-token", "access_token").status, 200);
    let missing = post(
        &server,
        "/api/oauth/revoke",
        None,
        "application/x-www-form-urlencoded",
        "token_type_hint=access_token",
        &[],
    );
    assert_eq!(
        (missing.status, missing.json()["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

fn metadata_advertises_refresh_and_revocation(engine: Engine) {
    let (_dir, server) = start(engine);
    let meta = get(&server, "/.well-known/oauth-authorization-server", None).json();
    assert_eq!(
        meta["grant_types_supported"],
        json!(["authorization_code", "refresh_token"])
    );
    assert_eq!(
        meta["revocation_endpoint"].as_str().unwrap(),
        format!("{}/api/oauth/revoke", meta["issuer"].as_str().unwrap())
    );
    assert_eq!(meta["revocation_endpoint_auth_methods_supported"], json!(["none"]));
}

/// Every authorization response, a code or a refusal, names its issuer (RFC 9207), the one
/// in the metadata, and the metadata says it does. An app that uses several authorization
/// servers checks it: otherwise a hostile one can have it send a code from here to the
/// hostile server's token endpoint (a mix-up attack).
fn every_authorization_response_names_its_issuer(engine: Engine) {
    let (_dir, server) = start(engine);
    let meta = get(&server, "/.well-known/oauth-authorization-server", None).json();
    assert_eq!(meta["authorization_response_iss_parameter_supported"], json!(true));
    let issuer = meta["issuer"].as_str().unwrap().to_owned();
    let (cookie, _) = register(&server, "issuer@example.com", None);
    let (challenge, _) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let answer = |decision: &str| {
        let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&cookie));
        let csrf = hidden_input(&page.body, "csrf").unwrap();
        let mut fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        fields.extend([("csrf".into(), csrf), ("decision".into(), decision.to_owned())]);
        let body = form(&fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
        let r = post(&server, "/api/oauth/authorize", Some(&cookie), FORM, &body, &[]);
        assert_eq!(r.status, 302, "{}", r.body);
        r.location.unwrap()
    };
    let approved = answer("approve");
    assert!(query_param(&approved, "code").is_some(), "{approved}");
    assert_eq!(
        query_param(&approved, "iss").as_deref(),
        Some(issuer.as_str()),
        "{approved}"
    );
    let denied = answer("deny");
    assert_eq!(query_param(&denied, "error").as_deref(), Some("access_denied"));
    assert_eq!(
        query_param(&denied, "iss").as_deref(),
        Some(issuer.as_str()),
        "{denied}"
    );
}

fn access_token_lifetime_is_a_setting(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_ACCESS_TOKEN_TTL_SECS", "120")
        .start();
    let (_, first) = first_grant(&server, "ttl@example.com");
    let expires_in = first.expires_in().unwrap().as_secs();
    assert!((110..=120).contains(&expires_in), "{expires_in}");
    let next = refresh(&client(&server, "test-app"), first.refresh_token().unwrap()).unwrap();
    assert!((110..=120).contains(&next.expires_in().unwrap().as_secs()));
}

/// The number a `SELECT COUNT(*)` on the server's database answers, whichever engine.
fn exec_count(server: &Keycast, sql: &str) -> i64 {
    let out = match server.database.as_deref() {
        None => harness::sqlite_query(&server.data_dir.join("keycast.db"), sql),
        Some(pg) => harness::engine::psql(&pg.url, sql),
    };
    out.trim().parse().unwrap_or_else(|_| panic!("{sql}: {out}"))
}

/// Runs `sql` on the server's database, whichever engine.
fn exec_sql(server: &Keycast, sql: &str) {
    match server.database.as_deref() {
        None => {
            harness::sqlite_exec(&server.data_dir.join("keycast.db"), sql);
        }
        Some(pg) => {
            harness::engine::psql(&pg.url, sql);
        }
    }
}

fn a_lost_refresh_response_may_be_retried_once_within_the_grace_window(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, first) = first_grant(&server, "grace@example.com");
    let app = client(&server, "test-app");
    let r0 = first.refresh_token().unwrap().clone();
    // The response to this refresh is lost: the app never sees `lost`.
    let lost = refresh(&app, &r0).unwrap();
    // It retries with the token it still holds, and gets a working pair; nothing revoked.
    let retried = refresh(&app, &r0).expect("a retry within the grace window is answered");
    assert_ne!(
        retried.refresh_token().unwrap().secret(),
        lost.refresh_token().unwrap().secret()
    );
    assert_eq!(
        retried.extra_fields().authorization_id,
        first.extra_fields().authorization_id
    );
    assert_eq!(signs(&server, retried.access_token().secret()), 200);
    // The lost pair is replaced: its access token no longer signs.
    assert_eq!(signs(&server, lost.access_token().secret()), 401);
    // The retried pair rotates on as usual.
    let next = refresh(&app, retried.refresh_token().unwrap()).expect("the retried token refreshes");
    assert_eq!(signs(&server, next.access_token().secret()), 200);
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert!(listed["authorizations"][0]["revoked_at"].is_null(), "{listed}");

    // The first token again, now that its successor was used: reuse, the family goes.
    assert_eq!(refresh(&app, &r0).unwrap_err(), BasicErrorResponseType::InvalidGrant);
    assert_eq!(signs(&server, next.access_token().secret()), 401);
}

fn a_replaced_successor_presented_later_is_reuse(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, first) = first_grant(&server, "thief@example.com");
    let app = client(&server, "test-app");
    let r0 = first.refresh_token().unwrap().clone();
    let legit = refresh(&app, &r0).unwrap();
    // A thief holding r0 uses the grace window...
    let stolen = refresh(&app, &r0).unwrap();
    assert_eq!(signs(&server, stolen.access_token().secret()), 200);
    // ...and the app, which did get its response, refreshes: reuse, everything revoked.
    assert_eq!(
        refresh(&app, legit.refresh_token().unwrap()).unwrap_err(),
        BasicErrorResponseType::InvalidGrant
    );
    assert_eq!(signs(&server, stolen.access_token().secret()), 401);
}

fn a_retry_after_the_grace_window_revokes_the_family(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, first) = first_grant(&server, "late@example.com");
    let app = client(&server, "test-app");
    let r0 = first.refresh_token().unwrap().clone();
    let lost = refresh(&app, &r0).unwrap();
    // The window passes (the spend is moved into the past rather than waited for).
    exec_sql(
        &server,
        "UPDATE refresh_tokens SET used_at = used_at - 31 WHERE used_at IS NOT NULL",
    );
    assert_eq!(refresh(&app, &r0).unwrap_err(), BasicErrorResponseType::InvalidGrant);
    assert_eq!(signs(&server, lost.access_token().secret()), 401, "revoked");
    assert_eq!(
        refresh(&app, lost.refresh_token().unwrap()).unwrap_err(),
        BasicErrorResponseType::InvalidGrant
    );
}

/// A browser app signs its user out by revoking its tokens from its own page (RFC 7009 §2:
/// the token is the credential; the same as the token endpoint). Before, the request, from
/// another origin, was refused 403 as a cross-site change, and the tokens stayed live.
fn a_browser_app_on_another_origin_can_revoke_its_tokens(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, token) = first_grant(&server, "spa@example.com");
    let body = form(&[("token", token.refresh_token().unwrap().secret().as_str())]);
    let r = post(
        &server,
        "/api/oauth/revoke",
        None,
        "application/x-www-form-urlencoded",
        &body,
        &[("Origin", "https://app.example"), ("Sec-Fetch-Site", "cross-site")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        signs(&server, token.access_token().secret()),
        401,
        "the app is signed out"
    );
}

/// An access token revoked (RFC 7009) while a request is looking it up: the lookup read the
/// token before the revocation and cached it after, so the revoked token went on signing
/// for the cache's lifetime. The cache's rule — read its epoch before the query — was broken
/// there.
fn a_token_revoked_during_its_lookup_is_not_cached_again(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, token) = first_grant(&server, "race@example.com");
    let access = token.access_token().secret().to_owned();
    if !harness::arm_failpoint(&server, "signer-after-token-read", "1*return(800)") {
        return;
    }
    let held = server.held_count("signer-after-token-read");
    std::thread::scope(|scope| {
        let looking_up = scope.spawn(|| signs(&server, &access));
        server.wait_until_held("signer-after-token-read", held + 1);
        assert_eq!(revoke(&server, &access, "access_token").status, 200);
        // Nor does the request under way sign after the revocation was answered. (Before,
        // it did: 200, 600 ms after the revocation's 200.)
        assert_eq!(looking_up.join().unwrap(), 401, "the request under way");
    });
    assert_eq!(
        signs(&server, &access),
        401,
        "the revoked token, after the lookup under way"
    );
}

/// Each refresh stores a token pair, and spent refresh tokens are kept a month past their
/// expiry for reuse detection: an app refreshing in a loop grew the database by a pair a
/// request, without bound. A grant refreshes 5 times at once, then once every 5 minutes; the
/// account's other apps are not held up by it.
fn refreshing_in_a_loop_is_slowed_down(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, first) = first_grant(&server, "loop@example.com");
    let client = client(&server, "test-app");
    let mut token = first.refresh_token().unwrap().clone();
    for n in 0..5 {
        let next = refresh(&client, &token).unwrap_or_else(|e| panic!("refresh {n}: {e:?}"));
        token = next.refresh_token().unwrap().clone();
    }
    let limited = refresh_request(&server, token.secret());
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(limited.retry_after.is_some());
    // Not spent, and nothing stored for it.
    let rows = exec_count(&server, "SELECT COUNT(*) FROM refresh_tokens");
    assert_eq!(rows, 6, "no pair stored for the refused refresh");
    // Another app of the same account refreshes as usual.
    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let other: Token = serde_json::from_str(&token_request(&server, &code, &verifier, REDIRECT).body).unwrap();
    refresh(&client, other.refresh_token().unwrap()).expect("the account's other app refreshes");
}

/// The previous refresh token presented again and again within its grace window (each time
/// replacing the unused successor). Before, the per-grant refresh limit counted only unspent
/// tokens: every replay got a pair (20 of 20 here), stored a row kept for two months, and
/// emptied the caches of every instance. Now replays count against the same limit.
fn replaying_a_refresh_token_in_its_grace_window_is_slowed_down_too(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, first) = first_grant(&server, "replay@example.com");
    let r0 = first.refresh_token().unwrap().clone();
    refresh(&client(&server, "test-app"), &r0).expect("the first refresh");
    let answers: Vec<u16> = (0..20).map(|_| refresh_request(&server, r0.secret()).status).collect();
    let answered = answers.iter().filter(|s| **s == 200).count();
    assert!(answered <= 4, "replays answered with a pair: {answers:?}");
    assert!(answers.contains(&429), "{answers:?}");
    let rows = exec_count(&server, "SELECT COUNT(*) FROM refresh_tokens");
    assert!(rows <= 2 + 4, "{rows} refresh tokens stored");
}

on_both_engines!(
    refreshing_in_a_loop_is_slowed_down,
    replaying_a_refresh_token_in_its_grace_window_is_slowed_down_too,
    a_token_revoked_during_its_lookup_is_not_cached_again,
    a_browser_app_on_another_origin_can_revoke_its_tokens,
    a_lost_refresh_response_may_be_retried_once_within_the_grace_window,
    a_replaced_successor_presented_later_is_reuse,
    a_retry_after_the_grace_window_revokes_the_family,
    refresh_rotates_the_pair_and_the_bunker_url_keeps_working,
    reusing_a_spent_refresh_token_revokes_the_whole_family,
    a_refresh_token_is_refused_to_another_client_and_not_spent,
    revocation_ends_an_access_token_alone_or_the_whole_grant,
    metadata_advertises_refresh_and_revocation,
    every_authorization_response_names_its_issuer,
    access_token_lifetime_is_a_setting,
);
