//! The pages in a real browser: Debian's Chromium, driven by playwright-core, registers on
//! the real binary's register page and lands on the dashboard showing the new key. A
//! screenshot of that dashboard is kept in the test's temporary directory.
//!
//! Needs the peers from scripts/install-peers.sh (`KEYCAST_TEST_CHROMIUM`,
//! `KEYCAST_PLAYWRIGHT_DIR`); the driver script is `testdata/<this test>/drive.js`.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::api::*;
use harness::{run_with_timeout, Keycast, Launch};
use serde_json::{json, Value};

/// Width and height from a PNG's IHDR chunk, or `None` if `bytes` is not a PNG.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.len() < 24 || &bytes[..8] != SIGNATURE || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    Some((be(16), be(20)))
}

/// Whether Chromium and playwright-core are installed (a missing peer skips the test outside
/// scripts/test.sh and fails it inside).
fn chromium_installed() -> bool {
    harness::peer("KEYCAST_TEST_CHROMIUM").is_some() && harness::peer("KEYCAST_PLAYWRIGHT_DIR").is_some()
}

/// Runs `testdata/<test>/drive.js` with `args` in Chromium and returns the JSON line it
/// prints last.
fn drive(test: &str, args: &[&std::ffi::OsStr]) -> Value {
    let (chromium, playwright) = (
        harness::peer("KEYCAST_TEST_CHROMIUM").unwrap(),
        harness::peer("KEYCAST_PLAYWRIGHT_DIR").unwrap(),
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/testdata/{test}/drive.js"));
    let mut node = Command::new("node");
    node.arg(&script)
        .args(args)
        .env("NODE_PATH", Path::new(&playwright).join("node_modules"))
        .env("CHROMIUM", &chromium);
    let run = run_with_timeout(node, Duration::from_secs(120));
    run.assert_success("the Chromium driver");
    run.stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result line from the driver:\n{}", run.stdout))
}

#[test]
fn a_person_registers_in_chromium_and_sees_their_key() {
    if !chromium_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let email = "browser@example.com";
    let screenshot = dir.path().join("dashboard.png");
    let profile = dir.path().join("chromium-profile");
    let shown = drive(
        "a_person_registers_in_chromium_and_sees_their_key",
        &[
            server.base.as_ref(),
            email.as_ref(),
            PASSWORD.as_ref(),
            screenshot.as_ref(),
            profile.as_ref(),
        ],
    );
    assert!(shown["url"].as_str().unwrap().ends_with("/dashboard"), "{shown}");
    assert_eq!(shown["title"], "Dashboard · keycast");

    // The key the dashboard shows is the account's key, as the API reports it.
    let login = post_json(
        &server,
        "/api/auth/login",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    );
    assert_eq!(login.status, 200, "the browser created the account: {}", login.body);
    assert_eq!(shown["hex"], login.json()["pubkey"], "{shown}");
    assert_eq!(shown["npub"], login.json()["npub"], "{shown}");

    // The screenshot is a real rendering of the page, not an empty file or a blank image.
    let png = std::fs::read(&screenshot).expect("the driver saved a screenshot");
    let (width, height) = png_size(&png).expect("the screenshot is a PNG");
    assert!(width >= 1000 && height >= 300, "{width}x{height}");
    assert!(
        png.len() > 10_000,
        "a {} byte PNG is too small to show the dashboard",
        png.len()
    );
    eprintln!(
        "dashboard screenshot: {} ({width}x{height}, {} bytes)",
        screenshot.display(),
        png.len()
    );
}

/// Opens the newest `purpose` mail's link for `email` in Chromium and submits its form with
/// `password`: the token, the driver's result (every request sent, the address bar after the
/// page's script ran, the page reached).
fn follow_mailed_link(server: &Keycast, dir: &Path, email: &str, purpose: &str, password: &str) -> (String, Value) {
    let token = harness::flow::mailed_token(server, email, purpose);
    let outbox = get(server, "/api/test/outbox", None).json();
    let body = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|m| m["purpose"] == purpose)
        .and_then(|m| m["body"].as_str())
        .unwrap()
        .to_owned();
    let link = body
        .split_whitespace()
        .find(|w| w.starts_with("http") && (w.contains("/verify-email") || w.contains("/reset-password")))
        .unwrap_or_else(|| panic!("no link in:\n{body}"))
        .to_owned();
    let profile = dir.join(format!("chromium-profile-{purpose}"));
    let seen = drive(
        "a_mailed_link_keeps_its_token_out_of_every_request",
        &[link.as_ref(), password.as_ref(), profile.as_ref()],
    );
    let sent = seen["sent"].as_array().unwrap();
    assert!(sent.len() >= 2, "the page and the form's post: {seen}");
    for request in sent {
        assert!(
            !request.to_string().contains(&token),
            "the {purpose} token was sent in a request's URL or Referer: {request}"
        );
    }
    assert!(
        !seen["address"].as_str().unwrap().contains(&token),
        "the token stays in the address bar (and the history): {seen}"
    );
    assert_eq!(seen["codeFieldVisible"], false, "the script filled the code in: {seen}");
    (token, seen)
}

/// A reset link carried its token in the query: every request log in front of keycast
/// (Cloud Run's keeps each URL) recorded it, and the form's post sent it again as `Referer`,
/// for the hour it stayed usable — whoever reads those logs could take the account over and
/// export its key. The token is now in the link's fragment, which a browser never sends; the
/// page's script moves it into the form.
#[test]
fn a_reset_link_keeps_its_token_out_of_every_request() {
    if !chromium_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    let email = "reset-in-chromium@example.com";
    harness::flow::register_unverified(&server, email, None);
    let asked = post_json(&server, "/api/auth/forgot-password", None, &json!({ "email": email }));
    assert_eq!(asked.status, 202, "{}", asked.body);
    let new_password = "a new password typed in chromium";
    let (_, seen) = follow_mailed_link(&server, dir.path(), email, "reset_password", new_password);
    assert_eq!(seen["heading"], "Your password was changed", "{seen}");
    let login = |password: &str| {
        post_json(
            &server,
            "/api/auth/login",
            None,
            &json!({ "email": email, "password": password }),
        )
        .status
    };
    assert_eq!(login(new_password), 200);
    assert_eq!(login(PASSWORD), 401);
}

/// The address confirmation's link carried its token in the query, where request logs,
/// mail scanners' reports and browser history keep it. Whoever registered someone else's
/// address holds the password: the token is the only proof of the mailbox, and with it they
/// confirm an address that is not theirs. Now in the fragment, as the reset link's.
#[test]
fn a_confirmation_link_keeps_its_token_out_of_every_request() {
    if !chromium_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    let email = "confirm-in-chromium@example.com";
    harness::flow::register_unverified(&server, email, None);
    let (_, seen) = follow_mailed_link(&server, dir.path(), email, "verify_email", PASSWORD);
    assert_eq!(seen["heading"], "Your email address is confirmed", "{seen}");
    let login = post_json(
        &server,
        "/api/auth/login",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    );
    assert_eq!(login.status, 200, "{}", login.body);
    assert_eq!(login.json()["email_verified"], true, "{}", login.body);
}

/// An app that knows only `name@keycast` opens NIP-46 discovery's `nostrconnect_url` with its
/// `nostrconnect://` URI, which carries the app's secret. In the query (`/dashboard?nostrconnect=`)
/// it was in every request log in front of keycast and in the `Referer` of the page's posts:
/// whoever read it could answer the app first, as its signer, and be sent everything it asks
/// to sign. The URI is now in the fragment; the page's script posts it to be shown.
#[test]
fn a_nostrconnect_link_keeps_its_secret_out_of_every_request() {
    if !chromium_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let email = "linked-in-chromium@example.com";
    harness::flow::register(&server, email, None);
    let doc = get(&server, "/.well-known/nostr.json?name=anyone", None).json();
    let template = doc["nip46"]["nostrconnect_url"].as_str().unwrap();
    let secret = "f00dfeedsecret";
    let uri = format!(
        "nostrconnect://{}?relay={}&secret={secret}&name=linked-app",
        nostr::Keys::generate().public_key().to_hex(),
        url::form_urlencoded::byte_serialize(b"wss://relay.example.com").collect::<String>(),
    );
    let encoded: String = url::form_urlencoded::byte_serialize(uri.as_bytes()).collect();
    let link = template.replace("<nostrconnect>", &encoded);

    // Logged in on the host the link names (the public URL's), where the session cookie is.
    let base = &link[..link.find("/dashboard").unwrap()];
    let profile = dir.path().join("chromium-profile");
    let seen = drive(
        "a_nostrconnect_link_keeps_its_secret_out_of_every_request",
        &[
            base.as_ref(),
            email.as_ref(),
            PASSWORD.as_ref(),
            link.as_ref(),
            profile.as_ref(),
        ],
    );

    assert_eq!(seen["uri"], uri.as_str(), "the form holds the app's URI: {seen}");
    assert_eq!(seen["chosen"], "", "no permission chosen for the owner: {seen}");
    let sent = seen["sent"].as_array().unwrap();
    assert!(sent.len() >= 2, "the page and the review's post: {seen}");
    for request in sent {
        assert!(
            !request.to_string().contains(secret),
            "the app's secret was sent in a request's URL or Referer: {request}"
        );
    }
}
