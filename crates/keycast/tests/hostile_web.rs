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
