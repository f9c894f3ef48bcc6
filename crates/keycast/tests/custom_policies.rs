//! Custom policies and editing an app's grant, against the real binary on both engines:
//! the owner builds a policy from permissions (JSON API and dashboard forms), uses it at
//! consent or puts it on an app's grant, edits it later — and the very next request on both
//! transports (HTTP RPC, NIP-46 through keycast's embedded relay with nostr-tools) is
//! judged by what the owner now reads. Another user can neither read, use, edit nor delete
//! it, and an app cannot ask for it. The owner deletes it once no live app uses it.

mod harness;

use harness::api::*;
use harness::flow::{authorize_query, grant, pkce, register, token_request};
use harness::nostr::BunkerClient;
use harness::{Engine, Keycast, Launch};
use serde_json::{json, Value};

fn start(engine: Engine, dir: &std::path::Path) -> Keycast {
    Launch::on(engine, &dir.join("data")).start()
}

fn sign_http(server: &Keycast, token: &Value, kind: u16, content: &str) -> Reply {
    let access = token["access_token"].as_str().unwrap();
    rpc(
        server,
        access,
        "sign_event",
        json!([{ "kind": kind, "content": content }]),
    )
}

fn sign_nip46(client: &mut BunkerClient, kind: u16, content: &str) -> Value {
    client.sign_event(json!({"kind": kind, "content": content, "tags": [], "created_at": 1_700_000_000}))
}

/// Both transports sign `kind` with `content`, or both refuse it saying `says`.
fn both(server: &Keycast, token: &Value, nip46: &mut BunkerClient, kind: u16, content: &str, says: Option<&str>) {
    let http = sign_http(server, token, kind, content);
    let remote = sign_nip46(nip46, kind, content);
    match says {
        None => {
            assert_eq!(http.status, 200, "kind {kind} over HTTP: {}", http.body);
            assert_eq!(remote["ok"], true, "kind {kind} over NIP-46: {remote}");
        }
        Some(says) => {
            assert_eq!(http.status, 403, "kind {kind} over HTTP: {}", http.body);
            assert!(http.body.contains(says), "HTTP says {says:?}: {}", http.body);
            assert_eq!(remote["ok"], false, "kind {kind} over NIP-46: {remote}");
            assert!(remote.to_string().contains(says), "NIP-46 says {says:?}: {remote}");
        }
    }
}

/// Both transports ask the owner instead of signing `kind`: HTTP 403 `approval_required`
/// with the page's URL, NIP-46 `auth_url`.
fn asked(server: &Keycast, token: &Value, nip46: &mut BunkerClient, kind: u16, content: &str) {
    let http = sign_http(server, token, kind, content);
    assert_eq!(http.status, 403, "kind {kind} over HTTP: {}", http.body);
    assert_eq!(http.json()["code"], "approval_required", "{}", http.body);
    assert!(
        http.json()["approval_url"].as_str().unwrap().contains("/approvals/"),
        "{}",
        http.body
    );
    nip46.call_ok(json!({"op": "start_sign_event", "event": {"kind": kind, "content": content}}));
    let url = nip46.call_ok(json!({"op": "auth_url", "timeout_ms": 5000}));
    assert!(
        url["url"].as_str().unwrap().contains("/approvals/"),
        "kind {kind} over NIP-46: {url}"
    );
}

fn create_policy(server: &Keycast, cookie: &str, name: &str, permissions: Value) -> Value {
    let r = post_json(
        server,
        "/api/user/policies",
        Some(cookie),
        &json!({ "name": name, "permissions": permissions }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

/// The owner approves an app's `policy:social` request with their own policy `slug`
/// chosen instead (the consent form): the reply, and the PKCE verifier for the code.
fn consent_with(server: &Keycast, cookie: &str, slug: &str) -> (Reply, String) {
    let (challenge, verifier) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let page = get(server, &format!("/api/oauth/authorize?{query}"), Some(cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let mut fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    fields.extend([
        ("csrf".to_owned(), csrf),
        ("decision".into(), "approve".into()),
        ("policy".into(), slug.to_owned()),
    ]);
    let body = form(&fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
    (
        post(server, "/api/oauth/authorize", Some(cookie), FORM, &body, &[]),
        verifier,
    )
}

/// The code of an approved consent (see [`consent_with`]) and its verifier.
fn consented_code(server: &Keycast, cookie: &str, slug: &str) -> (String, String) {
    let (r, verifier) = consent_with(server, cookie, slug);
    assert_eq!(r.status, 302, "{}", r.body);
    (query_param(&r.location.unwrap(), "code").unwrap(), verifier)
}

fn edited_policy_and_grant_apply_to_the_next_request_on_both_transports(engine: Engine) {
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "owner@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let id = token["authorization_id"].as_str().unwrap().to_owned();
    let connected = nip46.connect(token["bunker_url"].as_str().unwrap());
    assert_eq!(connected["ok"], true, "{connected}");
    both(&server, &token, &mut nip46, 1, "hello", None);

    // A typo cannot slip through as a permission that is silently ignored.
    let typo = post_json(
        &server,
        "/api/user/policies",
        Some(&cookie),
        &json!({ "name": "typo", "permissions": { "denied_kind": [1] } }),
    );
    assert_eq!(typo.status, 400, "{}", typo.body);
    assert!(typo.body.contains("unknown field"), "{}", typo.body);

    let policy = create_policy(
        &server,
        &cookie,
        "No notes",
        json!({ "any_kind": true, "denied_kinds": [1], "blocked_words": ["Spam"] }),
    );
    let slug = policy["slug"].as_str().unwrap().to_owned();
    let words = policy["description"].as_str().unwrap();
    assert!(
        words.contains("Sign any event as you except these: notes (kind 1).") && words.contains("spam"),
        "the words come from the permissions: {policy}"
    );
    let listed = get(&server, "/api/user/policies", Some(&cookie)).json();
    assert_eq!(listed["policies"][0]["slug"], slug.as_str(), "{listed}");

    // Put it on the app's grant: the very next request on each transport obeys it.
    let r = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{id}"),
        &cookie,
        &json!({ "policy": slug }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["policy"]["slug"], slug.as_str(), "{}", r.body);
    both(&server, &token, &mut nip46, 1, "hello", Some("kind 1 is denied"));
    both(&server, &token, &mut nip46, 7, "buy SPAM", Some("spam"));
    both(&server, &token, &mut nip46, 7, "+", None);

    // Edit the policy itself: again the next request obeys.
    let r = send_json(
        &server,
        "PUT",
        &format!("/api/user/policies/{slug}"),
        &cookie,
        &json!({ "name": "Notes only", "permissions": { "allowed_kinds": [1] } }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    both(&server, &token, &mut nip46, 1, "hello again", None);
    // A kind the policy no longer allows is not refused but asked (approvals, issue 14).
    asked(&server, &token, &mut nip46, 7, "+");

    // Duration and limits from the dashboard's API: an hour from now, two signatures a day.
    let r = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{id}"),
        &cookie,
        &json!({ "duration": "hour", "limits": { "per_day": 100 } }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let shown = r.json();
    let expires_at = shown["expires_at"].as_i64().unwrap();
    let now = keycast_db::now_unix();
    assert!((now + 3500..=now + 3600).contains(&expires_at), "{shown}");
    assert_eq!(shown["limits"], json!({ "per_day": 100 }), "{shown}");
    assert!(shown["usage"]["signatures"].is_i64(), "{shown}");
    let bad = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{id}"),
        &cookie,
        &json!({ "limits": { "per_week": 1 } }),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);

    // The per-app page says what is enforced, and lists the activity once it is flushed.
    let page_path = format!("/dashboard/authorizations/{id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let page = loop {
        let page = get(&server, &page_path, Some(&cookie));
        assert_eq!(page.status, 200, "{}", page.body);
        if page.body.contains("sign_event") || std::time::Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        page.body.contains("Sign only these events as you: notes (kind 1)."),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("sign_event") && page.body.contains("nip46"),
        "recent activity: {}",
        page.body
    );
    assert!(page.body.contains("Notes only"), "{}", page.body);
    assert!(
        page.body.contains("refused (policy_denied)"),
        "refusals are listed: {}",
        page.body
    );
    let shown = get(&server, &format!("/api/user/authorizations/{id}"), Some(&cookie)).json();
    let results: Vec<&str> = shown["recent_activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["result"].as_str().unwrap())
        .collect();
    assert!(
        results.contains(&"done") && results.contains(&"policy_denied"),
        "{shown}"
    );
    assert!(
        !page.body.contains(token["access_token"].as_str().unwrap()),
        "no secret on the page"
    );
}

fn another_user_cannot_read_use_or_edit_a_custom_policy_nor_can_an_app_ask_for_it(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (alice, _) = register(&server, "alice@example.com", None);
    let (mallory, _) = register(&server, "mallory@example.com", None);
    let policy = create_policy(&server, &alice, "Alice's", json!({ "full_access": true }));
    let slug = policy["slug"].as_str().unwrap();
    let alice_grant = grant(&server, &alice, "policy:readonly");
    let alice_id = alice_grant["authorization_id"].as_str().unwrap();
    let mallory_grant = grant(&server, &mallory, "policy:readonly");
    let mallory_id = mallory_grant["authorization_id"].as_str().unwrap();

    // Read: neither listed to Mallory nor public.
    let listed = get(&server, "/api/user/policies", Some(&mallory)).json();
    assert_eq!(listed["policies"], json!([]), "{listed}");
    let public = get(&server, "/api/policies", None);
    assert!(!public.body.contains(slug), "{}", public.body);
    let metadata = get(&server, "/.well-known/oauth-authorization-server", None);
    assert!(!metadata.body.contains(slug), "{}", metadata.body);
    // Edit: as if it did not exist.
    let r = send_json(
        &server,
        "PUT",
        &format!("/api/user/policies/{slug}"),
        &mallory,
        &json!({ "name": "Mine now", "permissions": {} }),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = send_json(
        &server,
        "PUT",
        "/api/user/policies/social",
        &mallory,
        &json!({ "name": "x", "permissions": { "full_access": true } }),
    );
    assert_eq!(r.status, 404, "a public policy is nobody's to edit: {}", r.body);
    // Use: not on Mallory's grant, not at Mallory's consent.
    let r = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{mallory_id}"),
        &mallory,
        &json!({ "policy": slug }),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let (challenge, _) = pkce();
    let query = authorize_query("policy:readonly", &challenge);
    let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&mallory));
    assert!(!page.body.contains(slug), "not offered to Mallory");
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let mut fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    fields.extend([
        ("csrf".to_owned(), csrf),
        ("decision".into(), "approve".into()),
        ("policy".into(), slug.to_owned()),
    ]);
    let body = form(&fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
    let r = post(&server, "/api/oauth/authorize", Some(&mallory), FORM, &body, &[]);
    assert_eq!(r.status, 400, "{}", r.body);
    // Alice's grant: Mallory can neither see nor edit it.
    let path = format!("/api/user/authorizations/{alice_id}");
    assert_eq!(get(&server, &path, Some(&mallory)).status, 404);
    let r = send_json(&server, "PATCH", &path, &mallory, &json!({ "policy": "full" }));
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        get(
            &server,
            &format!("/dashboard/authorizations/{alice_id}"),
            Some(&mallory)
        )
        .status,
        404
    );
    // An app cannot ask for it, even with Alice logged in.
    let (challenge, _) = pkce();
    let query = authorize_query(&format!("policy:{slug}"), &challenge);
    let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&alice));
    assert_ne!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("no policy") || page.location.as_deref().is_some_and(|l| l.contains("invalid_scope")),
        "{}",
        page.body
    );
    // Alice's grant still reads only.
    let signed = sign_http(&server, &alice_grant, 1, "x");
    assert_eq!(signed.status, 403, "{}", signed.body);
}

fn the_owner_picks_a_custom_policy_at_consent_and_builds_one_with_the_dashboard_forms(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "forms@example.com", None);

    // Build a policy with the dashboard's form; its name is shown escaped.
    let page = get(&server, "/dashboard/policies", Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let r = post_form(
        &server,
        "/dashboard/policies",
        Some(&cookie),
        &[
            ("csrf", &csrf),
            ("name", "<b>Reactions</b>"),
            ("sign", "kinds"),
            ("allowed_kinds", "7, 1"),
            ("denied_kinds", "1"),
            ("encrypt", "on"),
            ("peers", "own"),
            ("blocked_words", "scam, spam"),
        ],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let bad = post_form(
        &server,
        "/dashboard/policies",
        Some(&cookie),
        &[
            ("csrf", &csrf),
            ("name", "bad"),
            ("sign", "kinds"),
            ("allowed_kinds", "seven"),
        ],
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("allowed_kinds"), "{}", bad.body);
    let page = get(&server, "/dashboard/policies", Some(&cookie));
    assert!(
        page.body.contains("&lt;b&gt;Reactions&lt;/b&gt;") && !page.body.contains("<b>Reactions"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("Sign only these events as you: reactions (kind 7)."),
        "{}",
        page.body
    );
    assert!(page.body.contains("Encrypt notes to yourself only."), "{}", page.body);
    let slug = get(&server, "/api/user/policies", Some(&cookie)).json()["policies"][0]["slug"]
        .as_str()
        .unwrap()
        .to_owned();

    // At consent the owner sees it, with its words, and puts it on the grant.
    let (challenge, _) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&cookie));
    assert!(page.body.contains(&format!("value=\"{slug}\"")), "{}", page.body);
    assert!(page.body.contains("reactions (kind 7)"), "{}", page.body);
    let (code, verifier) = consented_code(&server, &cookie, &slug);
    let token = token_request(&server, &code, &verifier, REDIRECT).json();
    assert_eq!(token["policy"]["slug"], slug.as_str(), "{token}");
    assert_eq!(sign_http(&server, &token, 7, "+").status, 200);
    assert_eq!(sign_http(&server, &token, 1, "note").status, 403);
    assert_eq!(sign_http(&server, &token, 7, "a scam").status, 403);

    // The app's page edits its permissions with the same fields.
    let id = token["authorization_id"].as_str().unwrap();
    let page = get(&server, &format!("/dashboard/authorizations/{id}"), Some(&cookie));
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let r = post_form(
        &server,
        &format!("/dashboard/authorizations/{id}"),
        Some(&cookie),
        &[
            ("csrf", &csrf),
            ("own_permissions", "1"),
            ("sign", "any"),
            ("denied_kinds", "7"),
        ],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(sign_http(&server, &token, 1, "note").status, 200);
    assert_eq!(sign_http(&server, &token, 7, "+").status, 403);
    let r = post_form(
        &server,
        &format!("/dashboard/authorizations/{id}"),
        Some(&cookie),
        &[("csrf", "wrong"), ("policy", "full")],
    );
    assert_eq!(r.status, 403, "{}", r.body);
}

fn a_custom_policy_is_deleted_by_its_owner_once_no_live_app_uses_it(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (alice, _) = register(&server, "alice@example.com", None);
    let (mallory, _) = register(&server, "mallory@example.com", None);
    let policy = create_policy(&server, &alice, "Reactions", json!({ "allowed_kinds": [7] }));
    let slug = policy["slug"].as_str().unwrap().to_owned();
    let path = format!("/api/user/policies/{slug}");
    // A code approved under it but not yet redeemed, and a live app under it.
    let (pending_code, pending_verifier) = consented_code(&server, &alice, &slug);
    let (code, verifier) = consented_code(&server, &alice, &slug);
    let app = token_request(&server, &code, &verifier, REDIRECT).json();
    let app_id = app["authorization_id"].as_str().unwrap();
    let other = grant(&server, &alice, "policy:social");
    let other_id = other["authorization_id"].as_str().unwrap();

    // In use: refused with what to do, and the app keeps signing what it may.
    let r = delete(&server, &path, &alice);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"], "conflict", "{}", r.body);
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("1 app still uses") && message.contains("Reactions") && message.contains("revoke"),
        "{message}"
    );
    let page = get(&server, "/dashboard/policies", Some(&alice));
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let form_path = format!("{path}/delete").replace("/api/user/", "/dashboard/");
    assert!(page.body.contains(&format!("action=\"{form_path}\"")), "{}", page.body);
    let r = post_form(&server, &form_path, Some(&alice), &[("csrf", &csrf)]);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("1 app still uses"), "the page says why: {}", r.body);
    assert_eq!(sign_http(&server, &app, 7, "+").status, 200);

    // Nobody else's to delete, nor a public policy.
    assert_eq!(delete(&server, &path, &mallory).status, 404);
    assert_eq!(delete(&server, "/api/user/policies/social", &alice).status, 404);

    // Once the app is revoked it goes: no longer listed, editable, usable or redeemable.
    assert_eq!(
        delete(&server, &format!("/api/user/authorizations/{app_id}"), &alice).status,
        204
    );
    let r = delete(&server, &path, &alice);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(delete(&server, &path, &alice).status, 404, "deleted once");
    let listed = get(&server, "/api/user/policies", Some(&alice)).json();
    assert_eq!(listed["policies"], json!([]), "{listed}");
    assert!(!get(&server, "/dashboard/policies", Some(&alice)).body.contains(&slug));
    let r = send_json(
        &server,
        "PUT",
        &path,
        &alice,
        &json!({ "name": "Back", "permissions": {} }),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{other_id}"),
        &alice,
        &json!({ "policy": slug }),
    );
    assert_eq!(r.status, 404, "no app is put under it: {}", r.body);
    let (r, _) = consent_with(&server, &alice, &slug);
    assert_eq!(r.status, 400, "not offered at consent: {}", r.body);
    let r = token_request(&server, &pending_code, &pending_verifier, REDIRECT);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.body);
    assert!(r.body.contains("deleted"), "{}", r.body);
    // The revoked app's history still names it.
    let revoked = get(&server, &format!("/api/user/authorizations/{app_id}"), Some(&alice));
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert!(revoked.body.contains("Reactions"), "{}", revoked.body);
    let listed = get(&server, "/api/user/authorizations", Some(&alice)).json();
    let entry = listed["authorizations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == app_id)
        .unwrap();
    assert_eq!(entry["policy"], slug.as_str(), "{listed}");
    let dashboard = get(&server, "/dashboard", Some(&alice)).body;
    assert!(
        dashboard.contains(&format!("Reactions (<code>{slug}</code>)")),
        "{dashboard}"
    );
    assert!(
        !dashboard.contains(&format!("value=\"{slug}\"")),
        "not offered for a new app: {dashboard}"
    );

    // The dashboard's button deletes an unused one.
    let unused = create_policy(&server, &alice, "Unused", json!({}));
    let unused_slug = unused["slug"].as_str().unwrap();
    let r = post_form(
        &server,
        &format!("/dashboard/policies/{unused_slug}/delete"),
        Some(&alice),
        &[("csrf", &csrf)],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let listed = get(&server, "/api/user/policies", Some(&alice)).json();
    assert_eq!(listed["policies"], json!([]), "{listed}");
    let r = post_form(
        &server,
        &format!("/dashboard/policies/{unused_slug}/delete"),
        Some(&alice),
        &[("csrf", "wrong")],
    );
    assert_eq!(r.status, 403, "{}", r.body);
}

/// Text with a NUL character, which SQLite stores and PostgreSQL refuses: a policy named
/// with one, an app asking with a `client_id` holding `%00`. Before, SQLite stored it (and
/// `keycast migrate --to` then stopped at that row) while PostgreSQL answered 500. Now both
/// answer 400 (no control character is meant there) and store nothing.
fn text_with_a_nul_is_refused_alike_on_both_engines(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "nul@example.com", None);
    let named = post_json(
        &server,
        "/api/user/policies",
        Some(&cookie),
        &json!({ "name": "a\u{0}b", "permissions": { "any_kind": true } }),
    );
    assert_eq!(named.status, 400, "{}", named.body);
    assert!(named.body.contains("control characters"), "{}", named.body);
    let listed = get(&server, "/api/user/policies", Some(&cookie)).json();
    assert!(!listed.to_string().contains("a\\u0000b"), "{listed}");
    let (_, challenge) = pkce();
    let query = authorize_query("policy:social", &challenge).replace("client_id=test-app", "client_id=test%00app");
    let asked = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&cookie));
    assert_eq!(asked.status, 400, "{}", asked.body);
    // A `nostrconnect://` app's name becomes its grant's `client_id`.
    let app = nostr::Keys::generate().public_key().to_hex();
    let uri = format!("nostrconnect://{app}?relay=wss%3A%2F%2Frelay.example.com&secret=s3&name=a%00b");
    let accepted = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&cookie),
        &json!({ "uri": uri, "policy": "social" }),
    );
    assert_eq!(accepted.status, 400, "{}", accepted.body);
    assert!(accepted.body.contains("control characters"), "{}", accepted.body);
    // The escape as text (a backslash, then `u0000`) is no NUL, and is taken.
    let literal = create_policy(&server, &cookie, "a\\u0000b", json!({ "any_kind": true }));
    assert_eq!(literal["name"], "a\\u0000b");
}

on_both_engines!(
    text_with_a_nul_is_refused_alike_on_both_engines,
    a_custom_policy_is_deleted_by_its_owner_once_no_live_app_uses_it,
    edited_policy_and_grant_apply_to_the_next_request_on_both_transports,
    another_user_cannot_read_use_or_edit_a_custom_policy_nor_can_an_app_ask_for_it,
    the_owner_picks_a_custom_policy_at_consent_and_builds_one_with_the_dashboard_forms,
);

/// A blocked word behind a JSON escape, in content that is JSON: a repost's event, channel
/// metadata (kind 41), the rumor a NIP-17 message encrypts. Readers see the word. Before, the
/// escapes were decoded in profiles (kind 0) only: each of these was signed or encrypted,
/// though the consent page promised "never sign or encrypt text containing" it.
#[test]
fn a_blocked_word_behind_a_json_escape_is_found_in_any_json_content_and_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(Engine::Sqlite, dir.path());
    let (cookie, _) = register(&server, "escapes@example.com", None);
    let permissions = json!({ "any_kind": true, "encrypt": true, "blocked_words": ["spam"] });
    let policy = create_policy(&server, &cookie, "No spam", permissions);
    let (code, verifier) = consented_code(&server, &cookie, policy["slug"].as_str().unwrap());
    let token = token_request(&server, &code, &verifier, REDIRECT).json();
    let escaped = r#"{"name":"\u0073pam"}"#;
    let repost = json!({ "kind": 0, "content": escaped, "tags": [] }).to_string();
    for (kind, content) in [(41, escaped), (6, repost.as_str())] {
        let signed = sign_http(&server, &token, kind, content);
        assert_eq!(signed.status, 403, "kind {kind}: {}", signed.body);
    }
    let peer = nostr::Keys::generate().public_key().to_hex();
    let rumor = r#"{"kind":14,"content":"buy \u0073pam","tags":[]}"#;
    let access = token["access_token"].as_str().unwrap();
    let encrypted = rpc(&server, access, "nip44_encrypt", json!([peer, rumor]));
    assert_eq!(encrypted.status, 403, "{}", encrypted.body);
    // JSON without the word is signed as before.
    assert_eq!(sign_http(&server, &token, 41, r#"{"name":"\u0068am"}"#).status, 200);
}
