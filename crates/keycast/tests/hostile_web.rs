//! keycast against a hostile web (issue 12, items 2 and 3): a page on another site posts
//! forms to keycast (login CSRF, cross-site state changes) or frames its pages
//! (clickjacking). The browser cases run in Debian's Chromium through playwright-core; the
//! rest send exactly the headers a browser sends. The driver script is
//! `testdata/hostile_site/drive.js`.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::api::*;
use harness::flow::{grant, register};
use harness::{run_with_timeout, Keycast, Launch};
use serde_json::{json, Value};

fn start() -> (tempfile::TempDir, Keycast) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    (dir, server)
}

/// Runs the hostile page in Chromium (`mode` and its arguments) and returns its result line,
/// or `None` when the browser peers are not installed (skipped loudly).
fn hostile_page(server: &Keycast, dir: &Path, mode: &str, args: &[&str]) -> Option<Value> {
    let chromium = harness::peer("KEYCAST_TEST_CHROMIUM")?;
    let playwright = harness::peer("KEYCAST_PLAYWRIGHT_DIR")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/hostile_site/drive.js");
    let mut node = Command::new("node");
    node.arg(&script)
        .args([mode, server.base.as_str()])
        .arg(dir.join(format!("chromium-{mode}")))
        .args(args)
        .env("NODE_PATH", Path::new(&playwright).join("node_modules"))
        .env("CHROMIUM", &chromium);
    let run = run_with_timeout(node, Duration::from_secs(120));
    run.assert_success("the hostile page in Chromium");
    let line = run.stdout.lines().last().unwrap_or_default();
    Some(serde_json::from_str(line).unwrap_or_else(|_| panic!("no result line from the driver:\n{}", run.stdout)))
}

#[test]
fn a_page_on_another_site_cannot_log_the_visitor_into_the_attackers_account() {
    let (dir, server) = start();
    let attacker = "attacker@example.net";
    register(&server, attacker, None);
    let Some(result) = hostile_page(&server, dir.path(), "login-csrf", &[attacker, PASSWORD]) else {
        return;
    };
    for answer in result["answers"].as_array().unwrap() {
        assert_eq!(answer["status"], 403, "a cross-site login form was served: {result}");
    }
    assert_eq!(
        result["key_status"], 401,
        "the visitor's browser is logged into the attacker's account: {result}"
    );
    assert!(result["cookies"].as_array().unwrap().is_empty(), "{result}");
}

#[test]
fn state_changes_from_another_site_are_refused_and_json_needs_its_content_type() {
    let (_dir, server) = start();
    let (cookie, _) = register(&server, "user@example.org", None);
    let authz = grant(&server, &cookie, "policy:social")["authorization_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let evil = [("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site")];
    let body = json!({ "email": "user@example.org", "password": PASSWORD }).to_string();

    // What a cross-site form can send: text/plain (JSON inside) or urlencoded, with the
    // browser's Origin and Sec-Fetch-Site.
    for (path, content_type, with_cookie) in [
        ("/api/auth/login", "text/plain", false),
        ("/api/auth/register", "text/plain", false),
        ("/login", FORM, false),
        ("/api/oauth/login", FORM, false),
        ("/api/user/username", "text/plain", true),
        ("/api/user/nostrconnect", "text/plain", true),
        ("/api/user/key/export", "text/plain", true),
        ("/api/user/password", "text/plain", true),
        ("/api/user/delete", "text/plain", true),
        ("/dashboard/password", FORM, true),
        ("/dashboard/delete", FORM, true),
    ] {
        let r = post(
            &server,
            path,
            with_cookie.then_some(cookie.as_str()),
            content_type,
            &body,
            &evil,
        );
        assert_eq!(r.status, 403, "{path} from another site: {}", r.body);
        assert!(r.set_cookie.is_none(), "{path} set a cookie for another site");
    }
    // A sibling subdomain (same site, other origin) is refused too.
    let sibling = post(
        &server,
        "/api/auth/login",
        None,
        "application/json",
        &body,
        &[("Origin", "http://other.localhost"), ("Sec-Fetch-Site", "same-site")],
    );
    assert_eq!(sibling.status, 403, "{}", sibling.body);
    let revoke = agent()
        .delete(format!("{}/api/user/authorizations/{authz}", server.base))
        .header("Cookie", &cookie)
        .header("Origin", "https://evil.example")
        .call();
    assert_eq!(reply(revoke).status, 403, "a cross-site revocation");
    let drop_policy = agent()
        .delete(format!("{}/api/user/policies/custom-0000000000000000", server.base))
        .header("Cookie", &cookie)
        .header("Origin", "https://evil.example")
        .call();
    assert_eq!(reply(drop_policy).status, 403, "a cross-site policy deletion");

    // JSON endpoints read JSON only when it says so, even from keycast's own origin.
    let own = [("Origin", server.base.as_str())];
    let plain = post(&server, "/api/auth/login", None, "text/plain", &body, &own);
    assert_eq!(plain.status, 415, "{}", plain.body);
    assert_eq!(plain.json()["error"], "unsupported_media_type");
    let ok = post(&server, "/api/auth/login", None, "application/json", &body, &own);
    assert_eq!(ok.status, 200, "{}", ok.body);

    // What apps on other origins are meant to call still works: bearer RPC, token exchange.
    let token = grant(&server, &cookie, "policy:social")["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let signed = post(
        &server,
        "/api/nostr",
        None,
        "application/json",
        &json!({ "method": "get_public_key", "params": [] }).to_string(),
        &[
            ("Origin", "https://app.example"),
            ("Sec-Fetch-Site", "cross-site"),
            ("Authorization", &format!("Bearer {token}")),
        ],
    );
    assert_eq!(signed.status, 200, "{}", signed.body);
}

#[test]
fn keycasts_login_and_consent_pages_cannot_be_framed_by_another_site() {
    let (dir, server) = start();
    let (challenge, _) = harness::flow::pkce();
    let path = format!(
        "/api/oauth/authorize?{}",
        harness::flow::authorize_query("policy:full", &challenge)
    );
    let Some(result) = hostile_page(&server, dir.path(), "framing", &[&path]) else {
        return;
    };
    assert_eq!(result["status"], 200, "{result}");
    assert_eq!(
        result["rendered"], false,
        "the OAuth login page rendered inside another site: {result}"
    );
}

/// Double-clickjacking in the browser: the hostile page navigates its opener to keycast's
/// consent page while a popup of its own is in front, and closes the popup on the first
/// click of a double click; the page has been loaded for long, and the second click lands on
/// "Approve" the moment it is uncovered. In Chromium, under the page's CSP, "Approve" is
/// held back until the page has been visible and focused for a moment: at load, and again
/// right after the window lost and regained focus; a click then does nothing, one a second
/// later approves. Before, the button took the click at once, whenever the page was loaded.
#[test]
fn approve_waits_until_the_consent_page_has_been_in_view() {
    let (dir, server) = start();
    let (cookie, _) = register(&server, "gate@example.com", None);
    let (challenge, _) = harness::flow::pkce();
    let path = format!(
        "/api/oauth/authorize?{}",
        harness::flow::authorize_query("policy:social", &challenge)
    );
    let Some(result) = hostile_page(&server, dir.path(), "view-gate", &[&path, &cookie]) else {
        return;
    };
    assert_eq!(result["disabledAtLoad"], true, "{result}");
    assert_eq!(
        result["postsAtOnce"], 0,
        "a click as the page appeared approved: {result}"
    );
    assert_eq!(result["enabledAfterView"], true, "{result}");
    assert_eq!(result["disabledAfterRefocus"], true, "{result}");
    assert_eq!(
        result["postsAfterRefocus"], 0,
        "a click as the window regained focus approved: {result}"
    );
    assert_eq!(result["enabledAfterRefocusWait"], true, "{result}");
    assert_eq!(result["postsAfterWait"], 1, "{result}");
}

/// Double-clickjacking: a page on another site that gets a double click from its visitor
/// brings keycast's page up under the pointer between the two clicks (framing is refused; a
/// new window or a navigation is not), and the second click lands on "Approve" a moment
/// after the page appeared. The consent and approval pages carry when they were shown, and
/// an approval sooner than anyone reads is refused; the same form a moment later goes
/// through, and refusing is never held up. Before, the click granted the app access, or
/// signed what it asked.
#[test]
fn an_approval_clicked_as_its_page_appears_is_refused() {
    let (_dir, server) = start();
    let (cookie, _) = register(&server, "dblclick@example.com", None);
    let (challenge, _) = harness::flow::pkce();
    let query = harness::flow::authorize_query("policy:social", &challenge);
    let consent = |decision: &str, csrf: &str, shown: &str| {
        let mut fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        fields.extend(
            [("csrf", csrf), ("decision", decision), ("shown", shown)].map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        post_form(&server, "/api/oauth/authorize", Some(&cookie), &pairs)
    };
    let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&cookie));
    let (csrf, shown) = (
        hidden_input(&page.body, "csrf").unwrap(),
        hidden_input(&page.body, "shown").expect("the consent form says when it was shown"),
    );
    let at_once = consent("approve", &csrf, &shown);
    assert_eq!(at_once.status, 403, "{}", at_once.body);
    assert!(
        at_once.json()["message"].as_str().unwrap().contains("too soon"),
        "{}",
        at_once.body
    );
    let (at, mac) = shown.split_once('.').unwrap();
    let backdated = format!("{}.{mac}", at.parse::<i64>().unwrap() - 5_000);
    let forged = consent("approve", &csrf, &backdated);
    assert_eq!(forged.status, 403, "a backdated stamp: {}", forged.body);
    let denied = consent("deny", &csrf, &shown);
    assert_eq!(denied.status, 302, "{}", denied.body);
    assert_eq!(
        query_param(denied.location.as_deref().unwrap(), "error").as_deref(),
        Some("access_denied")
    );
    std::thread::sleep(Duration::from_millis(900));
    let read = consent("approve", &csrf, &shown);
    assert_eq!(read.status, 302, "{}", read.body);
    assert!(query_param(read.location.as_deref().unwrap(), "code").is_some());

    // The page that approves one signature the grant's policy does not cover.
    let token = grant(&server, &cookie, "policy:social");
    let asked = rpc(
        &server,
        token["access_token"].as_str().unwrap(),
        "sign_event",
        json!([{ "kind": 30023, "content": "an article", "tags": [["d", "a"]] }]),
    );
    assert_eq!(asked.status, 403, "{}", asked.body);
    let url = url::Url::parse(asked.json()["approval_url"].as_str().unwrap()).unwrap();
    let page = get(&server, url.path(), Some(&cookie));
    let (csrf, shown) = (
        hidden_input(&page.body, "csrf").unwrap(),
        hidden_input(&page.body, "shown").expect("the approval form says when it was shown"),
    );
    let allow = || {
        post_form(
            &server,
            url.path(),
            Some(&cookie),
            &[("csrf", &csrf), ("decision", "once"), ("shown", &shown)],
        )
    };
    let at_once = allow();
    assert_eq!(at_once.status, 403, "{}", at_once.body);
    std::thread::sleep(Duration::from_millis(900));
    let read = allow();
    assert_eq!(read.status, 200, "{}", read.body);
    assert!(read.body.contains("Allowed"), "{}", read.body);
}

/// Text an app chooses is shown on keycast's own pages: its `client_id` on the consent page,
/// its `nostrconnect://` name on the dashboard and the approval page. Unicode's invisible
/// format characters passed the check for control characters: a right-to-left override
/// turned the rest of the consent page's warning around ("Approve only if you came here
/// from …"), and a zero-width space made "Da\u{200b}mus" look like Damus while being another
/// name. Such characters are refused (400) wherever an app or a user names something.
#[test]
fn names_with_invisible_or_reordering_characters_are_refused() {
    let (_dir, server) = start();
    let (cookie, _) = register(&server, "bidi@example.com", None);
    let (challenge, _) = harness::flow::pkce();
    let query = harness::flow::authorize_query("policy:social", &challenge);
    for disguised in [
        "Primal%E2%80%AE",
        "Da%E2%80%8Bmus",
        "Da%E2%80%8Dmus",
        "%E2%81%A6app%E2%81%A9",
        "app%EF%BB%BF",
    ] {
        let page = get(
            &server,
            &format!(
                "/api/oauth/authorize?{}",
                query.replace("client_id=test-app", &format!("client_id={disguised}"))
            ),
            Some(&cookie),
        );
        assert_eq!(page.status, 400, "client_id {disguised}: {}", page.body);
        assert_eq!(page.json()["error"], "invalid_request", "{}", page.body);
    }
    let accepted = get(
        &server,
        &format!(
            "/api/oauth/authorize?{}",
            query.replace("client_id=test-app", "client_id=%C3%9Cber%20App")
        ),
        Some(&cookie),
    );
    assert_eq!(
        accepted.status, 200,
        "an ordinary non-ASCII name is shown: {}",
        accepted.body
    );

    let nostrconnect = |name: &str| {
        let uri = format!(
            "nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cret&name={name}",
            nostr::Keys::generate().public_key().to_hex()
        );
        post_json(
            &server,
            "/api/user/nostrconnect",
            Some(&cookie),
            &json!({ "uri": uri, "policy": "social" }),
        )
    };
    for disguised in [
        "Primal%E2%80%AE",
        "Da%E2%80%8Bmus",
        "app_%E2%80%8D0123456789abcdef01234567",
    ] {
        let refused = nostrconnect(disguised);
        assert_eq!(refused.status, 400, "name {disguised}: {}", refused.body);
        assert!(refused.body.contains("invisible"), "{}", refused.body);
    }
    let policy = post_json(
        &server,
        "/api/user/policies",
        Some(&cookie),
        &json!({ "name": "mine\u{202e}", "permissions": { "allowed_kinds": [1] } }),
    );
    assert_eq!(policy.status, 400, "{}", policy.body);
}

/// An OAuth app's origin is proven (its code goes there); a `nostrconnect://` app's `url` is
/// whatever it wrote. It was shown where an OAuth app shows its proven origin — the
/// dashboard's "Redirect origin", the grant page, the approval page's app line — so an app
/// calling itself `url=https://damus.io` looked like the user's real, OAuth-connected Damus.
/// It is now shown as what the app says, marked unverified.
#[test]
fn a_nostrconnect_apps_own_site_is_not_shown_as_a_checked_origin() {
    let (_dir, server) = start();
    let (cookie, _) = register(&server, "impostor@example.com", None);
    let uri = format!(
        "nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cret&name=Damus&url=https%3A%2F%2Fdamus.io",
        nostr::Keys::generate().public_key().to_hex()
    );
    let accepted = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&cookie),
        &json!({ "uri": uri, "policy": "social" }),
    );
    assert!(accepted.status < 300, "{}", accepted.body);
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    let shown = listed["authorizations"][0]["redirect_origin"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(shown, "https://damus.io", "{listed}");
    assert!(
        shown.contains("nostrconnect") && shown.contains("unverified"),
        "{shown}"
    );
    let id = listed["authorizations"][0]["id"].as_str().unwrap();
    for page in ["/dashboard".to_owned(), format!("/dashboard/authorizations/{id}")] {
        let body = get(&server, &page, Some(&cookie)).body;
        assert!(
            !body.contains(">https://damus.io<"),
            "{page} shows the app's claim as its origin: {body}"
        );
        assert!(body.contains("unverified"), "{page}: {body}");
    }
}

/// An app that names keycast's own address as its redirect was shown as keycast itself —
/// "Allow http://localhost:… to sign for you?", keycast's address — and its codes landed in
/// keycast's own request log. Refused (400), whether the app is registered or not.
#[test]
fn an_app_redirecting_to_keycasts_own_address_is_refused() {
    let (_dir, server) = start();
    let (cookie, _) = register(&server, "mirror@example.com", None);
    let port = server.base.rsplit(':').next().unwrap().trim_end_matches('/');
    let (challenge, _) = harness::flow::pkce();
    // Its public URL (`KEYCAST_PUBLIC_URL`, here the default `http://localhost:<port>`), and
    // the address the request was sent to (behind Cloud Run, the `*.run.app` name as well as
    // a custom domain).
    for own in [
        format!("http://localhost:{port}/dashboard"),
        format!("{}/dashboard", server.base),
    ] {
        let query = harness::flow::authorize_query("policy:social", &challenge).replace(
            &url::form_urlencoded::byte_serialize(REDIRECT.as_bytes()).collect::<String>(),
            &url::form_urlencoded::byte_serialize(own.as_bytes()).collect::<String>(),
        );
        let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&cookie));
        assert_eq!(page.status, 400, "{own}: {}", page.body);
        assert_eq!(page.json()["error"], "invalid_request", "{}", page.body);
    }
}

/// The response headers of a GET, lowercased names.
fn headers_of(server: &Keycast, path: &str, cookie: Option<&str>) -> (u16, Vec<(String, String)>) {
    let mut req = agent()
        .get(format!("{}{path}", server.base))
        .header("Accept", "text/html");
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    let response = req.call().unwrap();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    (response.status().as_u16(), headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn every_answer_carries_strict_security_headers_and_https_adds_hsts_and_a_host_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_PUBLIC_URL", "https://keycast.test")
        // Refused with an https public URL (and not needed here).
        .env("KEYCAST_TEST_ROUTES", "false")
        // Required with one.
        .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY)
        .start();
    let r = post_json(
        &server,
        "/api/auth/register",
        None,
        &json!({ "email": "tls@example.org", "password": PASSWORD }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let set_cookie = r.set_cookie.clone().unwrap();
    assert!(set_cookie.starts_with("__Host-keycast_session="), "{set_cookie}");
    assert!(
        set_cookie.contains("; Secure") && set_cookie.contains("Path=/"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains("Domain"), "{set_cookie}");
    let cookie = cookie_of(&r);
    // Only the prefixed cookie opens the session over https.
    let plain_name = cookie.replacen("__Host-", "", 1);
    assert_eq!(get(&server, "/api/user/key", Some(&plain_name)).status, 401);
    assert_eq!(get(&server, "/api/user/key", Some(&cookie)).status, 200);

    let (challenge, _) = harness::flow::pkce();
    let consent = format!(
        "/api/oauth/authorize?{}",
        harness::flow::authorize_query("policy:social", &challenge)
    );
    for (path, cookie) in [
        ("/login", None),
        (consent.as_str(), None),
        (consent.as_str(), Some(cookie.as_str())),
        ("/dashboard", Some(cookie.as_str())),
        ("/no-such-page", None),
    ] {
        let (status, headers) = headers_of(&server, path, cookie);
        assert!(status == 200 || status == 404, "{path}: {status}");
        assert!(
            header(&headers, "content-type").unwrap().starts_with("text/html"),
            "{path}"
        );
        let csp = header(&headers, "content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"),
            "{path}: {csp}"
        );
        assert_eq!(header(&headers, "x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"), "{path}");
        assert_eq!(header(&headers, "referrer-policy"), Some("same-origin"), "{path}");
        assert_eq!(
            header(&headers, "strict-transport-security"),
            Some("max-age=63072000"),
            "{path}"
        );
    }
    let (_, api) = headers_of(&server, "/api/policies", None);
    assert_eq!(header(&api, "x-content-type-options"), Some("nosniff"));
    assert!(header(&api, "strict-transport-security").is_some());

    // Plain http (development): no HSTS, the unprefixed cookie.
    let (_dev_dir, dev) = start();
    let (_, headers) = headers_of(&dev, "/login", None);
    assert!(header(&headers, "strict-transport-security").is_none());
    assert!(header(&headers, "content-security-policy")
        .unwrap()
        .contains("frame-ancestors 'none'"));
}
