//! The NIP-46 clients apps are built with, each driving keycast through a real relay
//! (issue 16): nostr-tools' `BunkerSigner` (2.25.2), NDK's `NDKNip46Signer` (3.0.3) and
//! rust-nostr's `NostrConnect` (nostr-connect 0.44). One keycast instance per relay serves
//! every client (each with its own grant), then is redeployed, and every client comes back
//! with the same client key.

mod harness;

use std::path::Path;

use harness::api::*;
use harness::flow::{grant, register};
use harness::nostr::{keypair, BunkerClient, Relay};
use harness::rust_connect::{App, JsApp, RustApp};
use harness::{free_port, Keycast, Launch};
use nostr::nips::{nip04, nip44};
use nostr::{Event, Keys, PublicKey};
use serde_json::{json, Value};

/// A refusal must arrive well before any client's own timeout.
const REFUSAL_WITHIN_MS: f64 = 1000.0;

/// Every client whose peer is installed: `None` skips the test outside scripts/test.sh.
fn apps() -> Option<Vec<Box<dyn App>>> {
    Some(vec![
        Box::new(JsApp::nostr_tools()?),
        Box::new(JsApp::ndk()?),
        Box::new(RustApp::default()),
    ])
}

/// A client's session: the bunker URL it was given and its own key.
struct Session {
    bunker: String,
    client_sk: String,
}

fn assert_refused(app: &dyn App, reply: &Value, expected: &str) {
    let name = app.name();
    assert_eq!(
        reply["ok"], false,
        "{name}: expected a refusal naming {expected:?}: {reply}"
    );
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(expected),
        "{name}: refusal {error:?} does not say {expected:?}"
    );
    let ms = reply["ms"].as_f64().unwrap();
    assert!(ms < REFUSAL_WITHIN_MS, "{name}: the refusal took {ms} ms: {reply}");
}

fn sign(app: &mut dyn App, content: &str, user: &PublicKey) -> Event {
    let signed = app.call_ok(json!({"op": "sign_event", "event": {"kind": 1, "content": content, "tags": [["t", "keycast"]], "created_at": 1_700_000_000}}));
    assert_eq!(
        signed["verified"],
        true,
        "{}: the client verifies it: {signed}",
        app.name()
    );
    let event: Event = serde_json::from_value(signed["event"].clone()).unwrap();
    event.verify().expect("the nostr crate verifies it independently");
    assert_eq!(event.pubkey, *user, "{}: signed by the user's key", app.name());
    assert_eq!(event.content, content);
    event
}

/// Everything an app does with a bunker URL, through `relay`; returns the session so it can
/// come back after a redeploy.
fn exercise(app: &mut dyn App, server: &Keycast, cookie: &str, user: &PublicKey, relay: &str) -> Session {
    let name = app.name();
    let token = grant(server, cookie, "policy:social");
    let bunker = token["bunker_url"].as_str().unwrap().to_owned();
    let (client_sk, client_pk) = keypair();
    let connected = app.call(json!({"op": "connect", "bunker": bunker, "client_sk": client_sk}));
    assert_eq!(connected["ok"], true, "{name} connects: {connected}\n{}", server.log());
    assert_eq!(connected["client_pubkey"], client_pk.as_str());
    let pk = app.call_ok(json!({"op": "get_public_key"}));
    assert_eq!(pk["pubkey"], user.to_hex(), "{name}: get_public_key is the user's key");
    sign(app, &format!("hello from {name}"), user);

    // What the user encrypts, the peer reads, and back: NIP-44 and NIP-04.
    let peer = Keys::generate();
    let hex = peer.public_key().to_hex();
    let sealed = app.call_ok(json!({"op": "nip44_encrypt", "peer": hex, "text": "nip44 note"}));
    let opened = nip44::decrypt(peer.secret_key(), user, sealed["result"].as_str().unwrap()).unwrap();
    assert_eq!(opened, "nip44 note", "{name}");
    let reply = nip44::encrypt(peer.secret_key(), user, "nip44 answer", nip44::Version::V2).unwrap();
    let opened = app.call_ok(json!({"op": "nip44_decrypt", "peer": hex, "text": reply}));
    assert_eq!(opened["result"], "nip44 answer", "{name}");
    let sealed = app.call_ok(json!({"op": "nip04_encrypt", "peer": hex, "text": "nip04 note"}));
    let opened = nip04::decrypt(peer.secret_key(), user, sealed["result"].as_str().unwrap()).unwrap();
    assert_eq!(opened, "nip04 note", "{name}");
    let reply = nip04::encrypt(peer.secret_key(), user, "nip04 answer").unwrap();
    let opened = app.call_ok(json!({"op": "nip04_decrypt", "peer": hex, "text": reply}));
    assert_eq!(opened["result"], "nip04 answer", "{name}");

    // (A kind the social policy does not allow is no longer refused but asked with NIP-46
    // `auth_url`, issue 14: tests/approvals.rs drives that with each of these clients.)

    if app.has_session_methods() {
        assert_eq!(app.call_ok(json!({"op": "ping"}))["result"], "pong", "{name}");
        let switched = app.call_ok(json!({"op": "switch_relays"}));
        assert!(
            switched.to_string().contains(relay),
            "{name}: switch_relays names {relay}: {switched}"
        );
        app.call_ok(json!({"op": "logout"}));
        // Logged out: the same key is no longer bound…
        app.call_ok(json!({"op": "connect", "bunker": bunker, "client_sk": client_sk, "handshake": false}));
        let unbound = app.call(json!({"op": "raw", "method": "get_public_key", "params": []}));
        assert_refused(app, &unbound, "not connected");
        // …until the app connects again with the secret.
        app.call_ok(json!({"op": "connect", "bunker": bunker, "client_sk": client_sk}));
        sign(app, "after logging in again", user);
    }
    eprintln!("{name}: every method answered through {relay}");
    Session { bunker, client_sk }
}

/// Runs every client against `launch`'s keycast, redeploys it (`wipe`: on an empty disk, from
/// the replica), and brings every client back with its client key and bunker URL.
fn matrix(launch: impl Fn() -> Launch, data: &Path, relay: &str, wipe: bool) {
    let Some(mut apps) = apps() else { return };
    let server = launch().start();
    let (cookie, account) = register(&server, "matrix@example.com", None);
    let user = PublicKey::from_hex(account["pubkey"].as_str().unwrap()).unwrap();
    let sessions: Vec<Session> = apps
        .iter_mut()
        .map(|app| exercise(app.as_mut(), &server, &cookie, &user, relay))
        .collect();
    server.stop();
    if wipe {
        std::fs::remove_dir_all(data).unwrap();
    }

    let server = launch().start();
    for (app, session) in apps.iter_mut().zip(&sessions) {
        let again = app.call(
            json!({"op": "connect", "bunker": session.bunker, "client_sk": session.client_sk, "timeout_ms": 10_000}),
        );
        assert_eq!(
            again["ok"],
            true,
            "{} reconnects after the redeploy: {again}\n{}",
            app.name(),
            server.log()
        );
        sign(app.as_mut(), "after the redeploy", &user);
    }
}

/// A free loopback port, so the embedded relay keeps its URL across the redeploy (bunker
/// URLs name it).
#[test]
fn every_client_works_through_the_embedded_relay_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (data, replica) = (dir.path().join("data"), dir.path().join("replica"));
    let addr = format!("127.0.0.1:{}", free_port());
    let relay = format!("ws://{addr}");
    let launch = || {
        Launch::new(&data)
            .redeployable(&replica)
            .env("KEYCAST_EMBEDDED_RELAY_ADDR", &addr)
    };
    matrix(launch, &data, &relay, false);
}

#[test]
fn every_client_works_through_an_external_relay_and_after_a_redeploy() {
    let Some(relay) = Relay::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (data, replica) = (dir.path().join("data"), dir.path().join("replica"));
    let launch = || {
        Launch::new(&data)
            .redeployable(&replica)
            .env("BUNKER_RELAYS", relay.url())
    };
    matrix(launch, &data, relay.url(), true);
}

/// The `nostrconnect://` flow, client-initiated: each client shows its URI, the user pastes it
/// on keycast, and the client hears the bunker's answer and signs. rust-nostr's 0.44 client
/// is left out: it writes the pre-2025 URI (`metadata=<JSON>`, no `secret`) and waits for an
/// `"ack"` where the current NIP-46 sends the secret; keycast refuses that URI with a reason.
#[test]
fn every_client_connects_by_nostrconnect() {
    let Some(mut apps) = apps() else { return };
    apps.retain(|app| app.has_session_methods());
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let (cookie, account) = register(&server, "nc-matrix@example.com", None);
    let user = PublicKey::from_hex(account["pubkey"].as_str().unwrap()).unwrap();
    let relay = embedded_relay(&server, &cookie);
    for app in &mut apps {
        let name = app.name();
        let started =
            app.call_ok(json!({"op": "nostrconnect", "relays": [relay], "perms": ["sign_event:1", "nip44_encrypt"]}));
        let accepted = post_json(
            &server,
            "/api/user/nostrconnect",
            Some(&cookie),
            &json!({"uri": started["uri"], "policy": "social"}),
        );
        assert_eq!(accepted.status, 201, "{name}: {}", accepted.body);
        let answered = app.call_ok(json!({"op": "nostrconnect_wait", "timeout_ms": 20_000}));
        assert_eq!(answered["bunker_pubkey"], accepted.json()["bunker_pubkey"], "{name}");
        sign(app.as_mut(), &format!("{name} via nostrconnect"), &user);
    }

    let mut rust = RustApp::default();
    let started = rust.call_ok(json!({"op": "nostrconnect", "relays": [relay]}));
    let refused = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&cookie),
        &json!({"uri": started["uri"], "policy": "social"}),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.json()["message"].as_str().unwrap().contains("secret"),
        "{}",
        refused.body
    );
}

/// The embedded relay's URL, as the bunker URLs name it.
fn embedded_relay(server: &Keycast, cookie: &str) -> String {
    let token = grant(server, cookie, "policy:readonly");
    query_param(token["bunker_url"].as_str().unwrap(), "relay").unwrap()
}

/// Login by NIP-05 (issue 16): `nostr.json` names the user and carries NIP-46's discovery
/// (`nip46.relays`, `nostrconnect_url`); an app that knows only `alice@keycast` builds its
/// `nostrconnect://` URI for those relays, opens the URL with it, and the owner meets the
/// consent form filled in; once approved the app signs.
#[test]
fn an_app_that_knows_only_a_nip05_name_reaches_the_consent_flow() {
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let (cookie, account) = register(&server, "alice@example.com", None);
    let named = post_json(
        &server,
        "/api/user/username",
        Some(&cookie),
        &json!({"username": "alice"}),
    );
    assert_eq!(named.status, 200, "{}", named.body);

    let doc = get(&server, "/.well-known/nostr.json?name=alice", None).json();
    assert_eq!(doc["names"]["alice"], account["pubkey"], "{doc}");
    let relays = doc["nip46"]["relays"].as_array().expect("nip46.relays").clone();
    assert_eq!(relays, [json!(embedded_relay(&server, &cookie))], "{doc}");
    let template = doc["nip46"]["nostrconnect_url"].as_str().expect("nostrconnect_url");
    // In the fragment: the URI carries the app's secret, and a query is in every request log
    // in front of keycast (before: `/dashboard?nostrconnect=`).
    assert!(
        template.ends_with("/dashboard#nostrconnect=<nostrconnect>"),
        "{template}"
    );
    let unknown = get(&server, "/.well-known/nostr.json?name=nobody", None).json();
    assert_eq!(unknown["names"], json!({}), "{unknown}");
    assert!(
        unknown["nip46"]["nostrconnect_url"].is_string(),
        "discovery does not depend on the name"
    );

    let started = client.call_ok(json!({"op": "nostrconnect", "relays": relays, "perms": ["sign_event:1"]}));
    let uri = started["uri"].as_str().unwrap();
    let encoded: String = url::form_urlencoded::byte_serialize(uri.as_bytes()).collect();
    let opened = url::Url::parse(&template.replace("<nostrconnect>", &encoded)).unwrap();
    assert_eq!(opened.query(), None, "{opened}");
    // What the page's script does in a browser (the Chromium test runs it): the fragment's
    // URI goes into the page's review form, which posts it.
    let dashboard = get(&server, opened.path(), Some(&cookie));
    assert!(
        dashboard
            .body
            .contains("<input name=\"uri\" autocomplete=\"off\" data-from-fragment=\"nostrconnect\">"),
        "{}",
        dashboard.body
    );
    let from_fragment: String = url::form_urlencoded::parse(opened.fragment().unwrap().as_bytes())
        .find(|(k, _)| k == "nostrconnect")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert_eq!(from_fragment, uri);
    let page = post_form(
        &server,
        "/dashboard/nostrconnect/review",
        Some(&cookie),
        &[
            ("csrf", &hidden_input(&dashboard.body, "csrf").unwrap()),
            ("uri", &from_fragment),
        ],
    );
    assert_eq!(page.status, 200, "{}", page.body);
    let prefilled = uri.replace('&', "&amp;");
    assert!(
        page.body.contains(&format!("value=\"{prefilled}\"")),
        "the form carries the app's URI: {}",
        page.body
    );
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let approved = post_form(
        &server,
        "/dashboard/nostrconnect",
        Some(&cookie),
        &[("csrf", &csrf), ("uri", uri), ("policy", "social")],
    );
    assert_eq!(approved.status, 303, "{}", approved.body);
    client.call_ok(json!({"op": "nostrconnect_wait", "timeout_ms": 10_000}));
    let signed = client.call_ok(json!({"op": "sign_event", "event": {"kind": 1, "content": "found by NIP-05"}}));
    assert_eq!(signed["verified"], true);
    assert_eq!(signed["event"]["pubkey"], account["pubkey"]);
}
