//! The account pages against the real binary: register and log in through the HTML forms,
//! the dashboard (key, authorizations, activity), revoking from the dashboard with and
//! without the CSRF token, and logging out.

mod harness;

use std::time::{Duration, Instant};

use harness::api::*;
use harness::{Engine, Keycast, Launch};
use oauth2::PkceCodeChallenge;
use serde_json::json;

fn start(engine: Engine) -> (tempfile::TempDir, Keycast) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    (dir, server)
}

/// Registers `email` through the HTML form: returns the session cookie.
fn register_with_form(server: &Keycast, email: &str) -> String {
    let r = post_form(
        server,
        "/register",
        None,
        &[("email", email), ("password", PASSWORD), ("nsec", "")],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location.as_deref(), Some("/dashboard"));
    // Authorizing apps needs a confirmed address: confirm it as its owner would.
    harness::flow::verify_email(server, email);
    cookie_of(&r)
}

fn dashboard(server: &Keycast, cookie: &str) -> String {
    let r = get(server, "/dashboard", Some(cookie));
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// Consent (approved) → token for `test-app` with the `social` policy: the access token.
fn authorize_app(server: &Keycast, cookie: &str) -> String {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let query = form(&[
        ("response_type", "code"),
        ("client_id", "test-app"),
        ("redirect_uri", REDIRECT),
        ("scope", "policy:social"),
        ("state", "st-1"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ]);
    let page = get(server, &format!("/api/oauth/authorize?{query}"), Some(cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = hidden_input(&page.body, "csrf").expect("the consent page carries a CSRF token");
    let body = format!("{query}&{}", form(&[("csrf", &csrf), ("decision", "approve")]));
    let r = post(server, "/api/oauth/authorize", Some(cookie), FORM, &body, &[]);
    assert_eq!(r.status, 302, "{}", r.body);
    let code = query_param(&r.location.unwrap(), "code").expect("a code");
    let r = post_form(
        server,
        "/api/oauth/token",
        None,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", "test-app"),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier.secret()),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["access_token"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------

fn register_and_login_forms_lead_to_a_dashboard_showing_the_key(engine: Engine) {
    let (_dir, server) = start(engine);

    // Without a session, / and /dashboard send the visitor to the login page.
    let home = get(&server, "/", None);
    assert_eq!((home.status, home.location.as_deref()), (303, Some("/login")));
    let dash = get(&server, "/dashboard", None);
    assert_eq!((dash.status, dash.location.as_deref()), (303, Some("/login")));
    let page = get(&server, "/register", None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("action=\"/register\""), "{}", page.body);
    let page = get(&server, "/login", None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("action=\"/login\""), "{}", page.body);

    let cookie = register_with_form(&server, "page@example.com");
    let key = get(&server, "/api/user/key", Some(&cookie)).json();
    let npub = key["npub"].as_str().unwrap();
    assert!(npub.starts_with("npub1"));
    let body = dashboard(&server, &cookie);
    assert!(body.contains(npub), "the dashboard shows the npub: {body}");
    assert!(body.contains(key["pubkey"].as_str().unwrap()));
    assert!(body.contains("page@example.com"));
    assert!(body.contains("No app is authorized"));
    let home = get(&server, "/", Some(&cookie));
    assert_eq!((home.status, home.location.as_deref()), (303, Some("/dashboard")));

    // Errors re-render the form with a message, keep the status, and escape what was typed.
    let r = post_form(
        &server,
        "/register",
        None,
        &[("email", "<b>not an email"), ("password", PASSWORD)],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("class=\"error\""), "{}", r.body);
    assert!(
        r.body.contains("&lt;b&gt;not an email") && !r.body.contains("<b>not"),
        "{}",
        r.body
    );
    let r = post_form(
        &server,
        "/register",
        None,
        &[("email", "short@example.com"), ("password", "x")],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("class=\"error\"") && r.set_cookie.is_none(),
        "{}",
        r.body
    );
    let r = post_form(
        &server,
        "/register",
        None,
        &[("email", "page@example.com"), ("password", PASSWORD)],
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("class=\"error\""), "{}", r.body);
    let r = post_form(
        &server,
        "/login",
        None,
        &[("email", "page@example.com"), ("password", "wrong password")],
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.body.contains("class=\"error\"") && r.body.contains("page@example.com"),
        "{}",
        r.body
    );
    assert!(r.set_cookie.is_none());

    // A login form posted from another site is refused (login CSRF).
    let r = post(
        &server,
        "/login",
        None,
        FORM,
        &form(&[("email", "page@example.com"), ("password", PASSWORD)]),
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.set_cookie.is_none());

    // The right password logs in (from keycast's own origin too).
    let r = post(
        &server,
        "/login",
        None,
        FORM,
        &form(&[("email", "page@example.com"), ("password", PASSWORD)]),
        &[("Origin", &server.base)],
    );
    assert_eq!(
        (r.status, r.location.as_deref()),
        (303, Some("/dashboard")),
        "{}",
        r.body
    );
    let second = cookie_of(&r);
    assert!(dashboard(&server, &second).contains(npub));
    let page = get(&server, "/login", Some(&second));
    assert_eq!((page.status, page.location.as_deref()), (303, Some("/dashboard")));
    // Too many wrong passwords: the form again with the reason, 429 and Retry-After.
    let mut limited = None;
    for _ in 0..10 {
        let r = post_form(
            &server,
            "/login",
            None,
            &[("email", "page@example.com"), ("password", "wrong password")],
        );
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = limited.expect("the login form is rate-limited");
    assert!(r.body.contains("class=\"error\""), "{}", r.body);
    assert!(r.retry_after.is_some());
}

fn the_dashboard_lists_authorizations_and_revokes_only_with_the_csrf_token(engine: Engine) {
    let (_dir, server) = start(engine);
    let cookie = register_with_form(&server, "apps@example.com");
    let token = authorize_app(&server, &cookie);
    assert_eq!(rpc(&server, &token, "get_public_key", json!([])).status, 200);

    let body = dashboard(&server, &cookie);
    assert!(body.contains("test-app"), "{body}");
    assert!(body.contains("http://127.0.0.1:9"), "{body}");
    assert!(body.contains("<code>social</code>"), "{body}");
    let action = form_action(&body, "/dashboard/authorizations/").expect("a revoke button");
    assert!(action.ends_with("/revoke"), "{action}");
    let csrf = hidden_input(&body, "csrf").expect("the dashboard's forms carry the CSRF token");

    // The activity of the app shows up (written about a second after the request).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = dashboard(&server, &cookie);
        if body.contains("get_public_key") {
            break;
        }
        assert!(Instant::now() < deadline, "no activity on the dashboard: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Without the token, or with a wrong one: 403 and nothing revoked.
    let r = post_form(&server, &action, Some(&cookie), &[]);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post_form(&server, &action, Some(&cookie), &[("csrf", "not-the-token")]);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(rpc(&server, &token, "get_public_key", json!([])).status, 200);
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert!(listed["authorizations"][0]["revoked_at"].is_null(), "{listed}");
    // Without a session: to the login page, nothing revoked.
    let r = post_form(&server, &action, None, &[("csrf", &csrf)]);
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/login")));
    assert_eq!(rpc(&server, &token, "get_public_key", json!([])).status, 200);

    // With it: back to the dashboard, and the very next request with the token is refused.
    let r = post_form(&server, &action, Some(&cookie), &[("csrf", &csrf)]);
    assert_eq!(
        (r.status, r.location.as_deref()),
        (303, Some("/dashboard")),
        "{}",
        r.body
    );
    let after = rpc(&server, &token, "sign_event", json!([{ "kind": 1, "content": "x" }]));
    assert_eq!(after.status, 401, "{}", after.body);
    let body = dashboard(&server, &cookie);
    assert!(body.contains("revoked "), "{body}");
    assert!(form_action(&body, "/dashboard/authorizations/").is_none(), "{body}");
    // Revoking again: 404.
    assert_eq!(
        post_form(&server, &action, Some(&cookie), &[("csrf", &csrf)]).status,
        404
    );
}

fn logout_needs_the_csrf_token_and_ends_the_session(engine: Engine) {
    let (_dir, server) = start(engine);
    let cookie = register_with_form(&server, "bye@example.com");
    let body = dashboard(&server, &cookie);
    assert!(body.contains("action=\"/logout\""), "{body}");
    let csrf = hidden_input(&body, "csrf").unwrap();

    let r = post_form(&server, "/logout", Some(&cookie), &[]);
    assert_eq!(r.status, 403, "{}", r.body);
    dashboard(&server, &cookie);

    let r = post_form(&server, "/logout", Some(&cookie), &[("csrf", &csrf)]);
    assert_eq!((r.status, r.location.as_deref()), (303, Some("/login")), "{}", r.body);
    assert!(
        r.set_cookie.as_deref().is_some_and(|c| c.contains("Max-Age=0")),
        "{:?}",
        r.set_cookie
    );
    let dash = get(&server, "/dashboard", Some(&cookie));
    assert_eq!((dash.status, dash.location.as_deref()), (303, Some("/login")));
    assert_eq!(get(&server, "/api/user/key", Some(&cookie)).status, 401);
}

/// The `<input …>` tags of `html` that carry `name="{name}"`.
fn inputs_named<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let needle = format!("name=\"{name}\"");
    html.match_indices("<input")
        .map(|(at, _)| &html[at..at + html[at..].find('>').unwrap()])
        .filter(|tag| tag.contains(&needle))
        .collect()
}

/// A password manager saves what sits in a password field, and fills in what it saved: the
/// registration form's optional key was a second password field, which browsers take for
/// the new password (or offer to save), so the Nostr secret key could land in a synced
/// password store and be typed in as keycast's password later. The app's `nostrconnect://`
/// link (it holds the app's secret) was a plain field, which browsers remember by its name
/// and offer on other sites. Each secret field now stays out of both.
#[test]
fn secret_fields_are_kept_out_of_password_managers_and_form_history() {
    let (_dir, server) = start(Engine::Sqlite);
    let page = get(&server, "/register", None);
    assert_eq!(
        page.body.matches("type=\"password\"").count(),
        1,
        "one password field: {}",
        page.body
    );
    let nsec = inputs_named(&page.body, "nsec");
    assert_eq!(nsec.len(), 1, "{}", page.body);
    assert!(!nsec[0].contains("type=\"password\""), "{}", nsec[0]);
    for attribute in ["autocomplete=\"off\"", "spellcheck=\"false\"", "autocapitalize=\"off\""] {
        assert!(
            nsec[0].contains(attribute),
            "{attribute} on the key's field: {}",
            nsec[0]
        );
    }
    let cookie = register_with_form(&server, "fields@example.com");
    let body = dashboard(&server, &cookie);
    let uris = inputs_named(&body, "uri");
    assert!(!uris.is_empty(), "{body}");
    for uri in uris {
        assert!(uri.contains("autocomplete=\"off\""), "{uri}");
    }
}

/// A `nostrconnect://` link made before the fragment form (`/dashboard?nostrconnect=`) was
/// rendered in place: the app's secret stayed in the address bar and the history, and went out
/// again as the `Referer` of every post from that page (authorize, revoke, log out), which
/// proxies and request logs keep. It is now sent on to the fragment form at once.
#[test]
fn a_legacy_nostrconnect_link_is_sent_on_to_the_fragment_form() {
    let (_dir, server) = start(Engine::Sqlite);
    let cookie = register_with_form(&server, "legacy@example.com");
    let uri = format!(
        "nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cr3t-legacy",
        nostr::Keys::generate().public_key().to_hex()
    );
    let encoded: String = url::form_urlencoded::byte_serialize(uri.as_bytes()).collect();
    let page = get(&server, &format!("/dashboard?nostrconnect={encoded}"), Some(&cookie));
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(
        page.location.as_deref(),
        Some(format!("/dashboard#nostrconnect={encoded}").as_str())
    );
    assert!(!page.body.contains("s3cr3t-legacy"), "{}", page.body);
}

on_both_engines!(
    register_and_login_forms_lead_to_a_dashboard_showing_the_key,
    the_dashboard_lists_authorizations_and_revokes_only_with_the_csrf_token,
    logout_needs_the_csrf_token_and_ends_the_session,
);
