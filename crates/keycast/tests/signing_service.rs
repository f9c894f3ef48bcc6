//! The signing service as apps and users meet it, against the real binary: accounts, the
//! OAuth 2.0 + PKCE flow driven by a standard OAuth client library (`oauth2`), HTTP RPC
//! signing verified independently, revocation, RFC 6749 errors, CSRF, rate limits,
//! policies, and no secret key material on disk, in the replica or in the log.

mod harness;

use harness::CommandExt as _;

use std::time::Duration;

use harness::api::*;
use harness::flow::{approve, authorize_query, pkce, register, register_unverified, token_request};
use harness::{Engine, Keycast, Launch};
use nostr::nips::nip19::ToBech32;
use nostr::{Event, JsonUtil, Keys};
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, ExtraTokenFields, PkceCodeChallenge, RedirectUrl, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Flow helpers.
// ---------------------------------------------------------------------------------------

fn start(engine: Engine) -> (tempfile::TempDir, Keycast) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    (dir, server)
}

/// Register → consent → token (by hand): returns (session cookie, access token, pubkey hex).
fn access_token(server: &Keycast, email: &str, scope: &str) -> (String, String, String) {
    let (cookie, account) = register(server, email, None);
    let (challenge, verifier) = pkce();
    let code = approve(server, &cookie, &authorize_query(scope, &challenge));
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.json()["access_token"].as_str().unwrap().to_owned();
    (cookie, token, account["pubkey"].as_str().unwrap().to_owned())
}

// ---------------------------------------------------------------------------------------
// The standard OAuth client.
// ---------------------------------------------------------------------------------------

/// keycast's extra token-response fields.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct KeycastFields {
    bunker_url: String,
    policy: Value,
}
impl ExtraTokenFields for KeycastFields {}

/// oauth2's HTTP client, over ureq 3 (both speak `http` 1 types).
fn oauth_http(request: oauth2::HttpRequest) -> Result<oauth2::HttpResponse, ureq::Error> {
    let response = agent().run(request)?;
    let (parts, mut body) = response.into_parts();
    Ok(oauth2::HttpResponse::from_parts(parts, body.read_to_vec()?))
}

fn oauth_client_library_flow_signs_an_event_that_verifies_independently(engine: Engine) {
    let (_dir, server) = start(engine);
    let own = Keys::generate();
    let (cookie, account) = register(
        &server,
        "alice@example.com",
        Some(&own.secret_key().to_bech32().unwrap()),
    );
    assert_eq!(account["pubkey"], own.public_key().to_hex());
    assert!(account["npub"].as_str().unwrap().starts_with("npub1"));

    let client = oauth2::Client::<
        BasicErrorResponse,
        StandardTokenResponse<KeycastFields, BasicTokenType>,
        BasicTokenIntrospectionResponse,
        StandardRevocableToken,
        BasicRevocationErrorResponse,
    >::new(ClientId::new("test-app".into()))
    .set_auth_uri(AuthUrl::new(format!("{}/api/oauth/authorize", server.base)).unwrap())
    .set_token_uri(TokenUrl::new(format!("{}/api/oauth/token", server.base)).unwrap())
    .set_redirect_uri(RedirectUrl::new(REDIRECT.into()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (auth_url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("policy:social".into()))
        .set_pkce_challenge(challenge)
        .url();

    // The browser: consent page (logged in), approve, follow the redirect.
    let path = &auth_url.as_str()[server.base.len()..];
    let page = get(&server, path, Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("http://127.0.0.1:9") && page.body.contains("social"),
        "{}",
        page.body
    );
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let mut fields: Vec<(String, String)> = auth_url.query_pairs().into_owned().collect();
    fields.push(("csrf".into(), csrf));
    fields.push(("decision".into(), "approve".into()));
    let body = form(&fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
    let r = post(
        &server,
        "/api/oauth/authorize",
        Some(&cookie),
        "application/x-www-form-urlencoded",
        &body,
        &[],
    );
    assert_eq!(r.status, 302, "{}", r.body);
    let location = r.location.unwrap();
    assert_eq!(
        query_param(&location, "state").as_deref(),
        Some(state.secret().as_str())
    );
    let code = query_param(&location, "code").unwrap();

    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request(&oauth_http)
        .expect("the OAuth client accepts keycast's token response");
    assert_eq!(*token.token_type(), BasicTokenType::Bearer);
    assert!(token
        .expires_in()
        .is_some_and(|d| d.as_secs() <= 3600 && d.as_secs() > 3500));
    assert!(
        token.refresh_token().is_some(),
        "the code exchange issues a refresh token"
    );
    assert_eq!(token.scopes().unwrap()[0].as_str(), "policy:social");
    assert!(
        token.extra_fields().bunker_url.starts_with("bunker://"),
        "{:?}",
        token.extra_fields()
    );
    assert_eq!(token.extra_fields().policy["slug"], "social");

    let access = token.access_token().secret();
    let pk = rpc(&server, access, "get_public_key", json!([]));
    assert_eq!(pk.json()["result"], own.public_key().to_hex(), "{}", pk.body);
    let template =
        json!({ "kind": 1, "content": "hello from keycast", "tags": [["t", "test"]], "created_at": 1_700_000_000 });
    let signed = rpc(&server, access, "sign_event", json!([template]));
    assert_eq!(signed.status, 200, "{}", signed.body);
    let event_json = signed.json()["result"].to_string();
    let event = Event::from_json(&event_json).unwrap();
    event.verify().expect("id and signature verify with the nostr crate");
    assert_eq!(event.pubkey, own.public_key());
    assert_eq!(event.content, "hello from keycast");
    verify_with_nostr_tools(&event_json);

    // The template may also come as JSON text, as NIP-46 sends it.
    let as_text = rpc(&server, access, "sign_event", json!([template.to_string()]));
    assert_eq!(as_text.status, 200, "{}", as_text.body);
}

/// Verifies the event with nostr-tools' `verifyEvent` in Node when the peer is installed
/// (scripts/install-peers.sh); skips loudly otherwise, fails under scripts/test.sh.
fn verify_with_nostr_tools(event_json: &str) {
    let Some(dir) = harness::peer("KEYCAST_NOSTR_TOOLS_DIR") else {
        eprintln!("SKIPPING the nostr-tools check: KEYCAST_NOSTR_TOOLS_DIR is not set");
        return;
    };
    let script = "const {verifyEvent} = require('nostr-tools/pure'); \
                  const e = JSON.parse(process.argv[1]); \
                  process.exit(verifyEvent(e) ? 0 : 3);";
    let status = std::process::Command::new("node")
        .current_dir(&dir)
        .args(["-e", script, event_json])
        .output_within(harness::COMMAND_TIMEOUT)
        .status;
    assert!(status.success(), "nostr-tools verifyEvent rejected {event_json}");
}

fn revoked_authorization_is_refused_on_the_very_next_request(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, token, _) = access_token(&server, "bob@example.com", "policy:social");
    assert_eq!(rpc(&server, &token, "get_public_key", json!([])).status, 200);
    let list = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    let authz = &list["authorizations"][0];
    assert_eq!(authz["policy"], "social");
    assert_eq!(authz["redirect_origin"], "http://127.0.0.1:9");
    let id = authz["id"].as_str().unwrap();

    assert_eq!(
        delete(&server, &format!("/api/user/authorizations/{id}"), &cookie).status,
        204
    );
    let after = rpc(&server, &token, "sign_event", json!([{ "kind": 1, "content": "x" }]));
    assert_eq!(after.status, 401, "{}", after.body);
    assert!(
        after.json()["error"].as_str().unwrap().contains("revoked"),
        "{}",
        after.body
    );
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert!(listed["authorizations"][0]["revoked_at"].is_i64());
    assert_eq!(
        delete(&server, &format!("/api/user/authorizations/{id}"), &cookie).status,
        404
    );
}

fn token_endpoint_refuses_bad_pkce_reuse_and_redirect_mismatch_with_rfc6749_errors(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, _) = register(&server, "carol@example.com", None);

    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let (_, other_verifier) = pkce();
    let wrong = token_request(&server, &code, &other_verifier, REDIRECT);
    assert_eq!(
        (wrong.status, wrong.json()["error"].as_str()),
        (400, Some("invalid_grant")),
        "{}",
        wrong.body
    );
    assert!(wrong.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("code_verifier"));
    let burnt = token_request(&server, &code, &verifier, REDIRECT);
    assert_eq!(
        burnt.json()["error"],
        "invalid_grant",
        "a failed attempt uses the code up"
    );

    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let mismatch = token_request(&server, &code, &verifier, "http://127.0.0.1:9/other");
    assert_eq!(mismatch.json()["error"], "invalid_grant", "{}", mismatch.body);

    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    assert_eq!(token_request(&server, &code, &verifier, REDIRECT).status, 200);
    let reuse = token_request(&server, &code, &verifier, REDIRECT);
    assert_eq!(
        (reuse.status, reuse.json()["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    let unsupported = post(
        &server,
        "/api/oauth/token",
        None,
        "application/x-www-form-urlencoded",
        "grant_type=password",
        &[],
    );
    assert_eq!(unsupported.json()["error"], "unsupported_grant_type");
    let missing = post(
        &server,
        "/api/oauth/token",
        None,
        "application/json",
        r#"{"grant_type":"authorization_code"}"#,
        &[],
    );
    assert_eq!(missing.json()["error"], "invalid_request", "{}", missing.body);
}

/// Four exchanges of one code at once, each with its verifier: a code used twice, so no grant
/// outlives them (RFC 6749 §4.1.2), and at most one was ever answered with a token.
fn concurrent_redemptions_of_one_code_leave_no_grant(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, _) = register(&server, "dave@example.com", None);
    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| token_request(&server, &code, &verifier, REDIRECT).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().filter(|s| **s == 200).count() <= 1, "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 400).count() >= 3, "{statuses:?}");
    let live = live_grants(&server, &cookie);
    assert!(live.is_empty(), "no grant from a code used twice stays live: {live:?}");
}

/// RFC 6749 §4.1.2: a code used twice may have been stolen, and what it became is revoked.
/// Before, the second use was refused and the grant it became went on signing. A leaked code
/// without its verifier revokes nothing (else whoever found it in a log could end the grant).
fn a_code_used_twice_with_its_verifier_revokes_the_grant_it_became(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, _) = register(&server, "twice@example.com", None);
    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let first = token_request(&server, &code, &verifier, REDIRECT);
    assert_eq!(first.status, 200, "{}", first.body);
    let token = first.json()["access_token"].as_str().unwrap().to_owned();
    let signs = || rpc(&server, &token, "sign_event", json!([{ "kind": 1, "content": "x" }])).status;
    assert_eq!(signs(), 200);

    let (_, not_the_verifier) = pkce();
    let leaked = token_request(&server, &code, &not_the_verifier, REDIRECT);
    assert_eq!(leaked.json()["error"], "invalid_grant", "{}", leaked.body);
    assert_eq!(signs(), 200, "a leaked code alone revokes nothing");

    let again = token_request(&server, &code, &verifier, REDIRECT);
    assert_eq!(
        (again.status, again.json()["error"].as_str()),
        (400, Some("invalid_grant")),
        "{}",
        again.body
    );
    assert!(
        again.json()["error_description"].as_str().unwrap().contains("revoked"),
        "{}",
        again.body
    );
    assert_eq!(signs(), 401, "the grant the code became is revoked");
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert!(!listed["authorizations"][0]["revoked_at"].is_null(), "{listed}");
}

/// The same code and verifier presented twice at once — the app and whoever stole both, sent
/// by the same redirect — while the first exchange is still making its grant. Before, the
/// second found the code redeemed but not yet linked to a grant, refused it, and remembered
/// nothing: the first went on to link its grant and kept it, so the theft RFC 6749 §4.1.2
/// asks to stop went unnoticed whenever the two came close together.
fn a_code_used_again_while_its_first_exchange_is_under_way_leaves_no_grant(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, _) = register(&server, "racing@example.com", None);
    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    if !harness::arm_failpoint(&server, "code-exchange-before-link", "1*return(1500)") {
        return;
    }
    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(|| token_request(&server, &code, &verifier, REDIRECT));
        server.wait_until_held("code-exchange-before-link", 1);
        let second = token_request(&server, &code, &verifier, REDIRECT);
        (first.join().unwrap(), second)
    });
    assert_eq!(second.json()["error"], "invalid_grant", "{}", second.body);
    assert_eq!(
        first.json()["error"],
        "invalid_grant",
        "the first exchange keeps no grant: {}",
        first.body
    );
    let live = live_grants(&server, &cookie);
    assert!(live.is_empty(), "no grant from a code used twice stays live: {live:?}");
}

fn authorize_requires_pkce_s256_and_a_safe_redirect(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, _) = register(&server, "erin@example.com", None);
    let (challenge, _) = pkce();
    let base = [
        ("client_id", "test-app"),
        ("redirect_uri", REDIRECT),
        ("scope", "policy:social"),
    ];
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "invalid_request"),
        (
            &[("code_challenge", &challenge), ("code_challenge_method", "plain")],
            "invalid_request",
        ),
        (
            &[
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
                ("scope", "policy:nope"),
            ],
            "invalid_scope",
        ),
        (
            &[
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
                ("redirect_uri", "http://evil.example/cb"),
            ],
            "invalid_request",
        ),
    ];
    for (extra, expected) in cases {
        let mut pairs: Vec<(&str, &str)> = base
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .copied()
            .collect();
        pairs.extend_from_slice(extra);
        let r = get(
            &server,
            &format!("/api/oauth/authorize?{}", form(&pairs)),
            Some(&cookie),
        );
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (400, Some(expected)),
            "{pairs:?}: {}",
            r.body
        );
    }
    let metadata = get(&server, "/.well-known/oauth-authorization-server", None).json();
    assert_eq!(metadata["code_challenge_methods_supported"], json!(["S256"]));
    assert!(metadata["scopes_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("policy:readonly")));
}

fn consent_post_without_the_right_csrf_token_is_refused_and_deny_redirects(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, _) = register(&server, "frank@example.com", None);
    let (challenge, _) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let login_page = get(&server, &format!("/api/oauth/authorize?{query}"), None);
    assert!(
        login_page.status == 200 && login_page.body.contains("action=\"/api/oauth/login\""),
        "no session → login form"
    );

    let fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let with = |extra: &[(&str, &str)]| {
        let mut pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        pairs.extend_from_slice(extra);
        form(&pairs)
    };
    let ct = "application/x-www-form-urlencoded";
    let none = post(
        &server,
        "/api/oauth/authorize",
        Some(&cookie),
        ct,
        &with(&[("decision", "approve")]),
        &[],
    );
    assert_eq!(none.status, 403, "{}", none.body);
    let wrong = with(&[
        ("decision", "approve"),
        ("csrf", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ]);
    assert_eq!(
        post(&server, "/api/oauth/authorize", Some(&cookie), ct, &wrong, &[]).status,
        403
    );
    // Another user's valid token does not work with this session either.
    let (other_cookie, _) = register(&server, "grace@example.com", None);
    let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&other_cookie));
    let foreign = with(&[
        ("decision", "approve"),
        ("csrf", &hidden_input(&page.body, "csrf").unwrap()),
    ]);
    assert_eq!(
        post(&server, "/api/oauth/authorize", Some(&cookie), ct, &foreign, &[]).status,
        403
    );

    let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&cookie));
    let deny = with(&[
        ("decision", "deny"),
        ("csrf", &hidden_input(&page.body, "csrf").unwrap()),
    ]);
    let r = post(&server, "/api/oauth/authorize", Some(&cookie), ct, &deny, &[]);
    let location = r.location.expect("deny redirects");
    assert_eq!(query_param(&location, "error").as_deref(), Some("access_denied"));
    assert_eq!(query_param(&location, "state").as_deref(), Some("st-123"));

    // The JSON variant needs this server's Origin.
    let json_body = json!({ "client_id": "test-app", "redirect_uri": REDIRECT, "scope": "policy:social", "state": "s",
        "code_challenge": challenge, "code_challenge_method": "S256", "approved": true })
    .to_string();
    let cross = post(
        &server,
        "/api/oauth/authorize",
        Some(&cookie),
        "application/json",
        &json_body,
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(cross.status, 403, "{}", cross.body);
    let own = post(
        &server,
        "/api/oauth/authorize",
        Some(&cookie),
        "application/json",
        &json_body,
        &[("Origin", &server.base)],
    );
    assert_eq!(own.status, 200, "{}", own.body);
    assert!(own.json()["code"].is_string() && own.json()["redirect_uri"].as_str().unwrap().starts_with(REDIRECT));
}

fn password_reset_attempts_are_rate_limited(engine: Engine) {
    let (_dir, server) = start(engine);
    let body = json!({ "token": "not-a-real-token", "password": "a new password 1" });
    let statuses: Vec<u16> = (0..11)
        .map(|_| post_json(&server, "/api/auth/reset-password", None, &body).status)
        .collect();
    assert!(
        statuses[..10].iter().all(|s| *s == 400),
        "bad tokens are refused: {statuses:?}"
    );
    assert_eq!(
        statuses[10], 429,
        "the 11th attempt from one address is rate-limited: {statuses:?}"
    );
}

fn login_is_rate_limited_with_retry_after(engine: Engine) {
    let (_dir, server) = start(engine);
    register(&server, "heidi@example.com", None);
    let body = json!({ "email": "heidi@example.com", "password": "wrong password" });
    let statuses: Vec<Reply> = (0..6)
        .map(|_| post_json(&server, "/api/auth/login", None, &body))
        .collect();
    assert!(
        statuses[..5].iter().all(|r| r.status == 401),
        "{:?}",
        statuses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let limited = &statuses[5];
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.json()["error"], "rate_limited");
    assert!(limited.retry_after.as_deref().unwrap().parse::<u64>().unwrap() >= 1);
    let right = post_json(
        &server,
        "/api/auth/login",
        None,
        &json!({ "email": "heidi@example.com", "password": PASSWORD }),
    );
    assert_eq!(right.status, 429, "the right password does not bypass the limit either");
}

fn policies_deny_per_permission_with_the_reason(engine: Engine) {
    let (_dir, server) = start(engine);
    let (_, social, _) = access_token(&server, "ivan@example.com", "policy:social");
    let long_form = rpc(
        &server,
        &social,
        "sign_event",
        json!([{ "kind": 30023, "content": "article" }]),
    );
    // Not covered, but the owner may allow it (issue 14): 403 with the reason and where.
    assert_eq!(long_form.status, 403, "{}", long_form.body);
    assert_eq!(long_form.json()["code"], "approval_required", "{}", long_form.body);
    assert!(
        long_form.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("kind 30023 is not allowed by policy social"),
        "{}",
        long_form.body
    );
    assert_eq!(
        rpc(&server, &social, "sign_event", json!([{ "kind": 7, "content": "+" }])).status,
        200
    );

    let (_, readonly, _) = access_token(&server, "judy@example.com", "policy:readonly");
    let note = rpc(
        &server,
        &readonly,
        "sign_event",
        json!([{ "kind": 1, "content": "hi" }]),
    );
    assert_eq!(note.status, 403, "{}", note.body);
    let peer = Keys::generate();
    let own_pk = nostr::PublicKey::from_hex(
        rpc(&server, &readonly, "get_public_key", json!([])).json()["result"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let ciphertext = nostr::nips::nip44::encrypt(
        peer.secret_key(),
        &own_pk,
        "secret note",
        nostr::nips::nip44::Version::V2,
    )
    .unwrap();
    let decrypted = rpc(
        &server,
        &readonly,
        "nip44_decrypt",
        json!([peer.public_key().to_hex(), ciphertext]),
    );
    assert_eq!(decrypted.json()["result"], "secret note", "{}", decrypted.body);
    let encrypt = rpc(
        &server,
        &readonly,
        "nip44_encrypt",
        json!([peer.public_key().to_hex(), "x"]),
    );
    assert_eq!(encrypt.status, 403, "{}", encrypt.body);

    let unknown = rpc(&server, &social, "ping", json!([]));
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.json()["error"].as_str().unwrap().starts_with("unknown method"),
        "{}",
        unknown.body
    );
    let malformed = rpc(&server, &social, "nip44_encrypt", json!(["not-a-key", "x"]));
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert_eq!(rpc(&server, "not-a-token", "get_public_key", json!([])).status, 401);
}

fn email_verification_and_password_reset_use_single_use_mailed_tokens(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, _) = register_unverified(&server, "kim@example.com", None);
    let outbox = get(&server, "/api/test/outbox", None).json();
    let verify = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["purpose"] == "verify_email")
        .unwrap();
    let token = verify["token"].as_str().unwrap();
    let confirm = |password: &str| {
        let body = json!({ "token": token, "password": password });
        post_json(&server, "/api/auth/verify-email", None, &body).status
    };
    assert_eq!(confirm("not the password"), 401, "the link alone does not confirm");
    assert_eq!(confirm(PASSWORD), 200, "a wrong password did not use the link up");
    assert_eq!(confirm(PASSWORD), 400);

    assert_eq!(
        post_json(
            &server,
            "/api/auth/forgot-password",
            None,
            &json!({ "email": "kim@example.com" })
        )
        .status,
        202
    );
    assert_eq!(
        post_json(
            &server,
            "/api/auth/forgot-password",
            None,
            &json!({ "email": "nobody@example.com" })
        )
        .status,
        202
    );
    let outbox = get(&server, "/api/test/outbox", None).json();
    let reset = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["purpose"] == "reset_password")
        .unwrap();
    let body = json!({ "token": reset["token"], "password": "a brand new password" });
    assert_eq!(post_json(&server, "/api/auth/reset-password", None, &body).status, 200);
    assert_eq!(
        get(&server, "/api/user/key", Some(&cookie)).status,
        401,
        "a reset ends every session"
    );
    let login = post_json(
        &server,
        "/api/auth/login",
        None,
        &json!({ "email": "kim@example.com", "password": "a brand new password" }),
    );
    assert_eq!(login.status, 200, "{}", login.body);
    assert!(login.set_cookie.unwrap().contains("HttpOnly; SameSite=Lax"));
}

fn nip05_serves_chosen_usernames_and_export_needs_the_password(engine: Engine) {
    let (_dir, server) = start(engine);
    let (cookie, account) = register(&server, "leo@example.com", None);
    let set = post_json(
        &server,
        "/api/user/username",
        Some(&cookie),
        &json!({ "username": "Leo" }),
    );
    assert_eq!(set.status, 200, "{}", set.body);
    let names = get(&server, "/.well-known/nostr.json?name=leo", None).json();
    assert_eq!(names["names"]["leo"], account["pubkey"]);
    let (other, _) = register(&server, "mia@example.com", None);
    assert_eq!(
        post_json(
            &server,
            "/api/user/username",
            Some(&other),
            &json!({ "username": "leo" })
        )
        .status,
        409
    );
    assert_eq!(
        post_json(
            &server,
            "/api/user/username",
            Some(&other),
            &json!({ "username": "no spaces" })
        )
        .status,
        400
    );

    let wrong = post_json(
        &server,
        "/api/user/key/export",
        Some(&cookie),
        &json!({ "password": "nope nope", "format": "nsec" }),
    );
    assert_eq!(wrong.status, 401);
    let nsec = post_json(
        &server,
        "/api/user/key/export",
        Some(&cookie),
        &json!({ "password": PASSWORD, "format": "nsec" }),
    );
    let keys = Keys::parse(nsec.json()["key"].as_str().unwrap()).unwrap();
    assert_eq!(keys.public_key().to_hex(), account["pubkey"]);
    assert_eq!(
        post(&server, "/api/auth/logout", Some(&cookie), "application/json", "", &[]).status,
        204
    );
    assert_eq!(get(&server, "/api/user/key", Some(&cookie)).status, 401);
}

#[test]
fn the_secret_key_never_reaches_the_database_the_replica_the_log_or_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Launch::new(&data)
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_LOG", "debug")
        .start();
    let own = Keys::generate();
    let nsec = own.secret_key().to_bech32().unwrap();
    let (cookie, _) = register(&server, "nora@example.com", Some(&nsec));
    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let granted = token_request(&server, &code, &verifier, REDIRECT).json();
    let field = |name: &str| {
        granted[name]
            .as_str()
            .unwrap_or_else(|| panic!("the token response has {name}: {granted}"))
            .to_owned()
    };
    let (token, refresh, bunker_url) = (field("access_token"), field("refresh_token"), field("bunker_url"));
    let connect_secret = url::Url::parse(&bunker_url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "secret")
        .map(|(_, v)| v.into_owned())
        .expect("the bunker URL carries a connect secret");
    let session = cookie.split_once('=').map(|(_, v)| v).unwrap_or(&cookie).to_owned();
    assert_eq!(
        rpc(&server, &token, "sign_event", json!([{ "kind": 1, "content": "x" }])).status,
        200
    );
    // The signature's activity record is written (buffered, about once a second) and shipped
    // before the database and the replica are read.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let activity = get(&server, "/api/user/activity", Some(&cookie)).json();
        let (_, metrics) = server.get("/metrics");
        let written = activity["activity"].as_array().is_some_and(|rows| !rows.is_empty());
        let shipped = harness::metric_sum(&metrics, "keycast_replica_shipped_commits")
            >= harness::metric_sum(&metrics, "keycast_replica_local_commits");
        if written && shipped {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the signature was not recorded and shipped: {activity}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let wal = std::fs::read(data.join("keycast.db-wal")).unwrap_or_default();
    let (stdout, log) = server.stop_with_output();
    assert!(stdout.contains("keycast listening on"), "stdout was captured: {stdout}");

    let raw = own.secret_key().to_secret_bytes();
    // The key, and every credential the flow handed out: each is stored hashed or encrypted,
    // and none is logged.
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("secret key, hex", own.secret_key().to_secret_hex().into_bytes()),
        (
            "secret key, HEX",
            own.secret_key().to_secret_hex().to_uppercase().into_bytes(),
        ),
        ("secret key, nsec", nsec.clone().into_bytes()),
        ("secret key, raw bytes", raw.to_vec()),
        ("access token", token.into_bytes()),
        ("refresh token", refresh.into_bytes()),
        ("authorization code", code.into_bytes()),
        ("connect secret", connect_secret.into_bytes()),
        ("session cookie", session.into_bytes()),
        ("password", harness::api::PASSWORD.as_bytes().to_vec()),
    ];
    let mut files = vec![
        (data.join("keycast.db-wal (while running)"), wal),
        (data.join("log (stderr)"), log.into_bytes()),
        (data.join("stdout"), stdout.into_bytes()),
    ];
    for root in [data.clone(), dir.path().join("data-replica")] {
        collect_files(&root, &mut files);
    }
    assert!(
        files.iter().any(|(p, _)| p.ends_with("keycast.db")),
        "the database was scanned"
    );
    assert!(
        files.iter().any(|(p, _)| p.extension().is_some_and(|e| e == "ltx")),
        "the replica was scanned"
    );
    for (path, bytes) in &files {
        for (what, needle) in &needles {
            assert!(!contains(bytes, needle), "the {what} appears in {}", path.display());
        }
    }
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_master_key_that_cannot_decrypt_the_stored_keys_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_a = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let server = Launch::new(&data).env("KEYCAST_MASTER_KEY", key_a).start();
    register(&server, "olga@example.com", None);
    server.stop();
    assert!(!data.join("master.key").exists(), "no dev key when one is configured");

    let key_b = "HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";
    let refused = Launch::new(&data)
        .env("KEYCAST_MASTER_KEY", key_b)
        .run_to_exit(harness::START_TIMEOUT);
    let (status, stderr) = (refused.status, refused.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("KEYCAST_MASTER_KEY") && !stderr.contains("HxwdHhsa"),
        "{stderr}"
    );
}

#[test]
fn without_a_master_key_a_private_dev_key_is_generated_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Launch::new(&data).start();
    let log = server.stop();
    let meta = std::fs::metadata(data.join("master.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    assert!(log.contains("DEVELOPMENT MASTER KEY"), "{log}");
}

/// The predecessor lost every account on each deploy. Here: register with an imported key,
/// authorize an app; SIGTERM; wipe the data directory (as Cloud Run does); start again on the
/// same replica and master key — login works and the same access token signs with the same key.
#[test]
fn redeploy_keeps_accounts_keys_and_authorizations() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let replica = dir.path().join("replica");
    let launch = || {
        Launch::new(&data)
            .redeployable(&replica)
            .env("KEYCAST_TEST_ROUTES", "true")
    };
    let imported = Keys::generate();
    let nsec = imported.secret_key().to_bech32().unwrap();
    let server = launch().start();
    let (cookie, account) = register(&server, "deploy@example.com", Some(&nsec));
    assert_eq!(account["pubkey"].as_str().unwrap(), imported.public_key().to_hex());
    let (challenge, verifier) = pkce();
    let code = approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let token = token_request(&server, &code, &verifier, REDIRECT).json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    server.stop();

    std::fs::remove_dir_all(&data).unwrap();
    let server = launch().start();
    let login = post_json(
        &server,
        "/api/auth/login",
        None,
        &json!({ "email": "deploy@example.com", "password": PASSWORD }),
    );
    assert_eq!(login.status, 200, "login after the redeploy: {}", login.body);
    let template = json!({ "kind": 1, "content": "after the redeploy", "tags": [], "created_at": 1_700_000_000 });
    let signed = rpc(&server, &token, "sign_event", json!([template]));
    assert_eq!(signed.status, 200, "the old access token still signs: {}", signed.body);
    let event: Event = serde_json::from_value(signed.json()["result"].clone()).unwrap();
    assert_eq!(
        event.pubkey,
        imported.public_key(),
        "signed with the same (imported) key"
    );
    event.verify().unwrap();
    server.stop();
}

/// NIP-04 and NIP-44 over the HTTP RPC, each direction checked by the peer itself: what
/// keycast encrypts the peer decrypts with its own key, and what the peer encrypts keycast
/// decrypts — so both ends agree on the shared secret, not just keycast with itself.
#[test]
fn rpc_encryption_is_read_by_the_peer_and_reads_the_peer() {
    let (_dir, server) = start(Engine::Sqlite);
    let (_, token, _) = access_token(&server, "nina@example.com", "policy:full");
    let peer = Keys::generate();
    let user = nostr::PublicKey::from_hex(
        rpc(&server, &token, "get_public_key", json!([])).json()["result"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let peer_hex = peer.public_key().to_hex();

    let sealed = rpc(&server, &token, "nip04_encrypt", json!([peer_hex, "meet at noon"]));
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    let opened = nostr::nips::nip04::decrypt(peer.secret_key(), &user, sealed.json()["result"].as_str().unwrap())
        .expect("the peer decrypts keycast's NIP-04");
    assert_eq!(opened, "meet at noon");
    let from_peer = nostr::nips::nip04::encrypt(peer.secret_key(), &user, "bring keys").unwrap();
    let read = rpc(&server, &token, "nip04_decrypt", json!([peer_hex, from_peer]));
    assert_eq!(read.json()["result"], "bring keys", "{}", read.body);

    let sealed = rpc(&server, &token, "nip44_encrypt", json!([peer_hex, "meet at one"]));
    assert_eq!(sealed.status, 200, "{}", sealed.body);
    let opened = nostr::nips::nip44::decrypt(peer.secret_key(), &user, sealed.json()["result"].as_str().unwrap())
        .expect("the peer decrypts keycast's NIP-44");
    assert_eq!(opened, "meet at one");
}

on_both_engines!(
    oauth_client_library_flow_signs_an_event_that_verifies_independently,
    revoked_authorization_is_refused_on_the_very_next_request,
    token_endpoint_refuses_bad_pkce_reuse_and_redirect_mismatch_with_rfc6749_errors,
    concurrent_redemptions_of_one_code_leave_no_grant,
    a_code_used_twice_with_its_verifier_revokes_the_grant_it_became,
    a_code_used_again_while_its_first_exchange_is_under_way_leaves_no_grant,
    authorize_requires_pkce_s256_and_a_safe_redirect,
    consent_post_without_the_right_csrf_token_is_refused_and_deny_redirects,
    password_reset_attempts_are_rate_limited,
    login_is_rate_limited_with_retry_after,
    policies_deny_per_permission_with_the_reason,
    email_verification_and_password_reset_use_single_use_mailed_tokens,
    nip05_serves_chosen_usernames_and_export_needs_the_password,
);
