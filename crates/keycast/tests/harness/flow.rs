//! The OAuth 2.0 + PKCE flow by hand, as first-party pages drive it: register, consent,
//! token. Tests that need a grant (an access token, a bunker URL) start here.

use oauth2::PkceCodeChallenge;
use serde_json::{json, Value};

use super::api::*;
use super::Keycast;

/// Registers `email` (with `nsec` if given) and confirms the address the way its owner
/// would (the mailed link, with the password): keycast authorizes apps, exports keys and
/// gives out NIP-05 names only for confirmed accounts. Returns the session cookie and the
/// registration's body.
pub fn register(server: &Keycast, email: &str, nsec: Option<&str>) -> (String, Value) {
    let (cookie, body) = register_unverified(server, email, nsec);
    verify_email(server, email);
    (cookie, body)
}

/// `POST /api/auth/login` with this email and password.
pub fn login(server: &Keycast, email: &str, password: &str) -> Reply {
    post_json(
        server,
        "/api/auth/login",
        None,
        &json!({ "email": email, "password": password }),
    )
}

/// [`login`] from the client `forwarded_for` (`X-Forwarded-For`; keycast reads it behind
/// `KEYCAST_TRUSTED_PROXY_HOPS`), so a test can log in past one client's rate limit.
pub fn login_from(server: &Keycast, email: &str, password: &str, forwarded_for: &str) -> Reply {
    post(
        server,
        "/api/auth/login",
        None,
        "application/json",
        &json!({ "email": email, "password": password }).to_string(),
        &[("X-Forwarded-For", forwarded_for)],
    )
}

/// Registers `email` without confirming it (what anyone can do with any address).
pub fn register_unverified(server: &Keycast, email: &str, nsec: Option<&str>) -> (String, Value) {
    let r = post_json(
        server,
        "/api/auth/register",
        None,
        &json!({ "email": email, "password": PASSWORD, "nsec": nsec }),
    );
    assert_eq!(r.status, 201, "register: {}", r.body);
    let cookie = cookie_of(&r);
    (cookie, r.json())
}

/// The newest token mailed to `email` for `purpose`, from the development outbox (needs the
/// test routes, on by default in the harness).
pub fn mailed_token(server: &Keycast, email: &str, purpose: &str) -> String {
    let outbox = get(server, "/api/test/outbox", None);
    assert_eq!(outbox.status, 200, "the test outbox: {}", outbox.body);
    outbox.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["to"] == email && m["purpose"] == purpose)
        .and_then(|m| m["token"].as_str())
        .unwrap_or_else(|| panic!("no {purpose} mail to {email} in the outbox"))
        .to_owned()
}

/// Confirms `email` with the mailed token and the harness password.
pub fn verify_email(server: &Keycast, email: &str) {
    let token = mailed_token(server, email, "verify_email");
    let r = post_json(
        server,
        "/api/auth/verify-email",
        None,
        &json!({ "token": token, "password": PASSWORD }),
    );
    assert_eq!(r.status, 200, "verify-email: {}", r.body);
}

/// A PKCE pair: (challenge, verifier).
pub fn pkce() -> (String, String) {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    (challenge.as_str().to_owned(), verifier.secret().clone())
}

pub fn authorize_query(scope: &str, challenge: &str) -> String {
    form(&[
        ("response_type", "code"),
        ("client_id", "test-app"),
        ("redirect_uri", REDIRECT),
        ("scope", scope),
        ("state", "st-123"),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
    ])
}

/// GET the consent page for `query` and approve it: returns the redirect's code.
pub fn approve(server: &Keycast, cookie: &str, query: &str) -> String {
    approve_with(server, cookie, query, &[])
}

/// GET the consent page for `query` and approve it with the owner's `choices`, as its form
/// does: the answer, whatever it is.
pub fn consent(server: &Keycast, cookie: &str, query: &str, choices: &[(&str, &str)]) -> Reply {
    let page = get(server, &format!("/api/oauth/authorize?{query}"), Some(cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = hidden_input(&page.body, "csrf").expect("the consent page carries a CSRF token");
    let mut fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    fields.push(("csrf".into(), csrf));
    fields.push(("decision".into(), "approve".into()));
    fields.extend(choices.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let body = form(&fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
    post(server, "/api/oauth/authorize", Some(cookie), FORM, &body, &[])
}

/// [`approve`] with the owner's choices on the consent page (`duration`, limits, `policy`).
pub fn approve_with(server: &Keycast, cookie: &str, query: &str, choices: &[(&str, &str)]) -> String {
    let r = consent(server, cookie, query, choices);
    assert_eq!(r.status, 302, "{}", r.body);
    let location = r.location.expect("redirect");
    assert!(location.starts_with(REDIRECT), "{location}");
    assert_eq!(query_param(&location, "state").as_deref(), Some("st-123"));
    query_param(&location, "code").expect("a code in the redirect")
}

pub fn token_request(server: &Keycast, code: &str, verifier: &str, redirect: &str) -> Reply {
    token_endpoint(
        server,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("client_id", "test-app"),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ],
    )
}

/// `POST /api/oauth/token` with `pairs` as a form.
fn token_endpoint(server: &Keycast, pairs: &[(&str, &str)]) -> Reply {
    post(
        server,
        "/api/oauth/token",
        None,
        "application/x-www-form-urlencoded",
        &form(pairs),
        &[],
    )
}

/// A refresh with `refresh_token` by the harness's client (`test-app`), as a raw form, so
/// that a refusal (429, 400) is seen as it is.
pub fn refresh_request(server: &Keycast, refresh_token: &str) -> Reply {
    token_endpoint(
        server,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", "test-app"),
        ],
    )
}

/// Consent → token for a signed-in user: the token response (`access_token`,
/// `bunker_url`, `policy`, …).
pub fn grant(server: &Keycast, cookie: &str, scope: &str) -> Value {
    let (challenge, verifier) = pkce();
    let code = approve(server, cookie, &authorize_query(scope, &challenge));
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Consent to `policy:social` for the signed-in `cookie` → an access token.
pub fn access_token(server: &Keycast, cookie: &str) -> String {
    let (challenge, verifier) = pkce();
    let code = approve(server, cookie, &authorize_query("policy:social", &challenge));
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["access_token"].as_str().unwrap().to_owned()
}
