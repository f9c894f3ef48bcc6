//! NIP-46 as apps meet it: the real client (nostr-tools `BunkerSigner`, via
//! `harness::nostr::BunkerClient`) pastes the `bunker://` URL an OAuth flow issued and
//! signs through a real external relay (PyPI nostr-relay) or keycast's embedded relay.
//! Refusals must be answered (within a second), never left to time out.

mod harness;

use std::time::Duration;

use harness::api::*;
use harness::flow::{grant, register};
use harness::nostr::{keypair, BunkerClient, Relay, RsRelay};
use harness::{Engine, Keycast, Launch};
use nostr::nips::nip44;
use nostr::{Event, Keys, PublicKey};
use serde_json::{json, Value};

/// A refusal must arrive well before a client's own timeout.
const REFUSAL_WITHIN_MS: f64 = 1000.0;

fn start_with(engine: Engine, dir: &std::path::Path, env: &[(&str, &str)]) -> Keycast {
    let mut launch = Launch::on(engine, &dir.join("data"));
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    launch.start()
}

/// A user with a grant under `scope`: (session cookie, user pubkey, token response).
fn user_with_grant(server: &Keycast, email: &str, scope: &str) -> (String, String, Value) {
    let (cookie, account) = register(server, email, None);
    let token = grant(server, &cookie, scope);
    (cookie, account["pubkey"].as_str().unwrap().to_owned(), token)
}

fn bunker_url(token: &Value) -> String {
    token["bunker_url"].as_str().expect("bunker_url").to_owned()
}

/// Asserts a reply is a refusal that names `expected`, answered within a second.
fn assert_refused(reply: &Value, expected: &str) {
    assert_eq!(reply["ok"], false, "expected a refusal naming {expected:?}: {reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert_ne!(
        error, "timeout",
        "the refusal was never answered ({expected:?}): {reply}"
    );
    assert!(error.contains(expected), "refusal {error:?} does not say {expected:?}");
    let ms = reply["ms"].as_f64().unwrap();
    assert!(ms < REFUSAL_WITHIN_MS, "refusal took {ms} ms: {reply}");
}

/// connect → get_public_key → sign_event (verified) → NIP-44 round trip → ping, as an app
/// does; returns the signed event.
fn sign_like_an_app(client: &mut BunkerClient, bunker: &str, user_pubkey: &str) -> Event {
    let connected = client.connect(bunker);
    assert_eq!(connected["ok"], true, "connect: {connected}");
    assert_ne!(
        connected["bunker_pubkey"].as_str(),
        Some(user_pubkey),
        "each authorization has its own bunker key"
    );
    let pk = client.call_ok(json!({"op": "get_public_key"}));
    assert_eq!(
        pk["pubkey"].as_str(),
        Some(user_pubkey),
        "get_public_key is the user's key"
    );

    let signed = client.call_ok(json!({"op": "sign_event", "event": {"kind": 1, "content": "hello over NIP-46", "tags": [["t", "keycast"]], "created_at": 1_700_000_000}}));
    assert_eq!(signed["verified"], true, "nostr-tools verifyEvent accepts it: {signed}");
    let event: Event = serde_json::from_value(signed["event"].clone()).unwrap();
    event.verify().expect("the nostr crate verifies it too");
    assert_eq!(event.pubkey.to_hex(), user_pubkey);
    assert_eq!(event.content, "hello over NIP-46");

    // NIP-44 round trip with a peer: what the user encrypts, the peer can read, and back.
    let peer = Keys::generate();
    let user = PublicKey::from_hex(user_pubkey).unwrap();
    let sealed =
        client.call_ok(json!({"op": "nip44_encrypt", "peer": peer.public_key().to_hex(), "text": "secret note"}));
    let ciphertext = sealed["result"].as_str().unwrap();
    assert_eq!(
        nip44::decrypt(peer.secret_key(), &user, ciphertext).unwrap(),
        "secret note"
    );
    let reply = nip44::encrypt(peer.secret_key(), &user, "the answer", nip44::Version::V2).unwrap();
    let opened = client.call_ok(json!({"op": "nip44_decrypt", "peer": peer.public_key().to_hex(), "text": reply}));
    assert_eq!(opened["result"], "the answer");
    assert_eq!(client.call_ok(json!({"op": "ping"}))["result"], "pong");
    event
}

fn bunker_signer_works_through_an_external_relay(engine: Engine) {
    let Some(relay) = Relay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(engine, dir.path(), &[("BUNKER_RELAYS", relay.url())]);
    let (cookie, user_pubkey, token) = user_with_grant(&server, "ext@example.com", "policy:social");
    let bunker = bunker_url(&token);
    assert!(
        bunker.contains(&url_encode(relay.url())),
        "{bunker} names the configured relay"
    );
    sign_like_an_app(&mut client, &bunker, &user_pubkey);

    // The activity log says which transport signed.
    let activity = (0..50)
        .find_map(|_| {
            let a = get(&server, "/api/user/activity", Some(&cookie)).json();
            let rows = a["activity"].as_array().cloned().unwrap_or_default();
            if rows.iter().any(|r| r["method"] == "sign_event") {
                Some(rows)
            } else {
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        })
        .expect("signing activity is recorded");
    assert!(activity
        .iter()
        .any(|r| r["method"] == "sign_event" && r["transport"] == "nip46" && r["kind"] == 1));
}

fn the_embedded_relay_runs_the_whole_flow_on_one_machine(engine: Engine) {
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(engine, dir.path(), &[]);
    let (_, user_pubkey, token) = user_with_grant(&server, "local@example.com", "policy:social");
    let bunker = bunker_url(&token);
    assert!(
        bunker.contains("relay=ws%3A%2F%2F127.0.0.1%3A"),
        "without BUNKER_RELAYS the bunker URL names the embedded loopback relay: {bunker}"
    );
    sign_like_an_app(&mut client, &bunker, &user_pubkey);
    let relays = client.call_ok(json!({"op": "switch_relays"}));
    assert!(relays["relays"].to_string().contains("127.0.0.1"), "{relays}");
    // `logout` is acknowledged; the grant stays until the user revokes it.
    client.call_ok(json!({"op": "logout"}));
}

fn refusals_are_answered_within_a_second(engine: Engine) {
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let Some(mut second) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(engine, dir.path(), &[]);
    let (cookie, _, social) = user_with_grant(&server, "refuse@example.com", "policy:social");
    let bunker = bunker_url(&social);

    // Wrong secret.
    let secret = query_param(&bunker, "secret").unwrap();
    let wrong = bunker.replace(&secret, "not-the-secret");
    assert_refused(&client.connect(&wrong), "secret");

    // A client that never connected may not sign.
    let unbound = client.call(json!({"op": "connect", "bunker": bunker, "handshake": false}));
    assert_eq!(unbound["ok"], true, "{unbound}");
    assert_refused(
        &client.call(json!({"op": "sign_event", "event": {"kind": 1, "content": "x"}})),
        "not connected",
    );

    // Connected: a kind outside the policy, and an unknown method.
    assert_eq!(client.connect(&bunker)["ok"], true);
    // A kind outside the policy is not refused but asked (issue 14): `auth_url`, as fast.
    client.call_ok(json!({"op": "start_sign_event", "event": {"kind": 30023, "content": "long form"}}));
    let asked = client.call_ok(json!({"op": "auth_url", "timeout_ms": 5000}));
    assert!(asked["url"].as_str().unwrap().contains("/approvals/"), "{asked}");
    assert!(asked["ms"].as_f64().unwrap() < REFUSAL_WITHIN_MS, "{asked}");
    assert_refused(&client.raw("frobnicate", json!([])), "unknown method");
    assert_refused(
        &client.call(json!({"op": "sign_event", "event": {"kind": "one"}})),
        "kind",
    );

    // A second client reusing the bound secret is refused; the first keeps working.
    let (other_sk, _) = keypair();
    assert_refused(&second.connect_as(&bunker, &other_sk), "another client");
    assert_eq!(client.call(json!({"op": "ping"}))["ok"], true);

    // Decrypt under a sign-only policy (wallet: kind 9734 only).
    let wallet = grant(&server, &cookie, "policy:wallet");
    let mut wallet_client = BunkerClient::spawn().unwrap();
    assert_eq!(wallet_client.connect(&bunker_url(&wallet))["ok"], true);
    let peer = Keys::generate().public_key().to_hex();
    // Not granted, so asked (issue 14), at once.
    wallet_client.call_ok(json!({"op": "start", "method": "nip44_decrypt", "params": [peer, "AgAAAA"]}));
    let asked = wallet_client.call_ok(json!({"op": "auth_url", "timeout_ms": 5000}));
    assert!(asked["url"].as_str().unwrap().contains("/approvals/"), "{asked}");

    // Revoked: refused on the very next request.
    let id = authorization_id(&server, &cookie, &social);
    assert_eq!(
        delete(&server, &format!("/api/user/authorizations/{id}"), &cookie).status,
        204
    );
    assert_refused(
        &client.call(json!({"op": "sign_event", "event": {"kind": 1, "content": "after revoke"}})),
        "revoked",
    );
}

/// The id of the authorization whose bunker `token` names.
fn authorization_id(server: &Keycast, cookie: &str, token: &Value) -> String {
    let bunker = bunker_url(token);
    let bunker_pubkey = bunker.trim_start_matches("bunker://").split('?').next().unwrap();
    let list = get(server, "/api/user/authorizations", Some(cookie)).json();
    list["authorizations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["bunker_pubkey"] == bunker_pubkey)
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .expect("the authorization is listed")
}

fn a_pasted_nostrconnect_uri_creates_an_authorization_the_client_can_use(engine: Engine) {
    let Some(relay) = Relay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(engine, dir.path(), &[("BUNKER_RELAYS", relay.url())]);
    let (cookie, account) = register(&server, "nc@example.com", None);
    let user_pubkey = account["pubkey"].as_str().unwrap();

    let started = client.call_ok(json!({"op": "nostrconnect", "relays": [relay.url()], "perms": ["sign_event:1"]}));
    let uri = started["uri"].as_str().unwrap();

    // Bad input is refused with a reason, and creates nothing.
    let bad = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&cookie),
        &json!({"uri": "nostrconnect://nope", "policy": "social"}),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.json()["message"].as_str().unwrap().contains("public key"),
        "{}",
        bad.body
    );
    let bad = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&cookie),
        &json!({"uri": uri, "policy": "nope"}),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let none = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert_eq!(none["authorizations"].as_array().unwrap().len(), 0);

    let accepted = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&cookie),
        &json!({"uri": uri, "policy": "social"}),
    );
    assert_eq!(accepted.status, 201, "{}", accepted.body);
    let accepted = accepted.json();
    assert_eq!(accepted["client_pubkey"], started["client_pubkey"]);

    // The client hears the secret back from the new bunker, then signs through it.
    let answered = client.call_ok(json!({"op": "nostrconnect_wait", "timeout_ms": 10_000}));
    assert_eq!(answered["bunker_pubkey"], accepted["bunker_pubkey"]);
    let pk = client.call_ok(json!({"op": "get_public_key"}));
    assert_eq!(pk["pubkey"].as_str(), Some(user_pubkey));
    let signed = client.call_ok(json!({"op": "sign_event", "event": {"kind": 1, "content": "via nostrconnect"}}));
    assert_eq!(signed["verified"], true);
}

#[test]
fn the_same_bunker_url_signs_after_a_redeploy() {
    let Some(relay) = Relay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let replica = dir.path().join("replica");
    let launch = || {
        Launch::new(&data)
            .redeployable(&replica)
            .env("BUNKER_RELAYS", relay.url())
    };
    let server = launch().start();
    let (_, user_pubkey, token) = user_with_grant(&server, "drill@example.com", "policy:social");
    let bunker = bunker_url(&token);
    let before = sign_like_an_app(&mut client, &bunker, &user_pubkey);
    server.stop();

    // Cloud Run: a new instance on an empty disk, restoring from the replica.
    std::fs::remove_dir_all(&data).unwrap();
    let _server = launch().start();
    // Same client session, no reconnect: its binding came back with the replica.
    let signed = client.call_ok(
        json!({"op": "sign_event", "event": {"kind": 1, "content": "after the redeploy"}, "timeout_ms": 10_000}),
    );
    let after: Event = serde_json::from_value(signed["event"].clone()).unwrap();
    after.verify().unwrap();
    assert_eq!(after.pubkey, before.pubkey, "the same key signs");
}

fn url_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn the_dashboard_form_authorizes_a_nostrconnect_app(engine: Engine) {
    let Some(relay) = Relay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(engine, dir.path(), &[("BUNKER_RELAYS", relay.url())]);
    let (cookie, _) = register(&server, "page@example.com", None);
    let started = client.call_ok(json!({"op": "nostrconnect", "relays": [relay.url()]}));
    let uri = started["uri"].as_str().unwrap();

    let dashboard = get(&server, "/dashboard", Some(&cookie));
    assert!(
        dashboard.body.contains("nostrconnect://"),
        "the dashboard offers the form"
    );
    // A link from any site may fill the form in: the page says what the link names, and
    // chooses no permission for the owner. (Before: the bare link in a text field, with
    // `social` — which decrypts every direct message — already chosen.)
    // (What the page's script posts, from the link's `#nostrconnect=` fragment.)
    let csrf = hidden_input(&dashboard.body, "csrf").unwrap();
    let linked = post_form(
        &server,
        "/dashboard/nostrconnect/review",
        Some(&cookie),
        &[("csrf", &csrf), ("uri", uri)],
    )
    .body;
    for shown in [relay.url(), "keycast-tests", "choose what it may do", "App key"] {
        assert!(linked.contains(shown), "the page shows {shown:?}: {linked}");
    }
    assert!(!linked.contains("value=\"social\" selected"), "{linked}");
    let forged = post_form(
        &server,
        "/dashboard/nostrconnect",
        Some(&cookie),
        &[("csrf", "forged"), ("uri", uri), ("policy", "social")],
    );
    assert_eq!(
        forged.status, 403,
        "no authorization without the CSRF token: {}",
        forged.body
    );
    let bad = post_form(
        &server,
        "/dashboard/nostrconnect",
        Some(&cookie),
        &[("csrf", &csrf), ("uri", "bunker://x"), ("policy", "social")],
    );
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("nostrconnect://"),
        "the error page says what is wrong: {}",
        bad.body
    );

    let done = post_form(
        &server,
        "/dashboard/nostrconnect",
        Some(&cookie),
        &[("csrf", &csrf), ("uri", uri), ("policy", "social")],
    );
    assert_eq!(done.status, 303, "{}", done.body);
    client.call_ok(json!({"op": "nostrconnect_wait", "timeout_ms": 10_000}));
    let signed = client.call_ok(json!({"op": "sign_event", "event": {"kind": 7, "content": "+"}}));
    assert_eq!(signed["verified"], true);
    let page = get(&server, "/dashboard", Some(&cookie)).body;
    assert!(
        page.contains("keycast-tests"),
        "the app is listed under its name: {page}"
    );
}

/// Well under the 4.4 s nostr-tools' own publish waits for an `OK`: a signer that waited for
/// one before answering (or before its next request) would lose at least that per reply.
const NO_OK_WAIT_WITHIN_MS: f64 = 1000.0;

/// Issue 6: relays that never send `OK` for ephemeral events must not delay replies.
/// nostr-rs-relay is such a relay; keycast publishes its replies without waiting for an `OK`.
fn replies_do_not_wait_for_the_ok_nostr_rs_relay_never_sends(engine: Engine) {
    let Some(relay) = RsRelay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    assert_eq!(
        oks_until_a_kind_1_is_answered(relay.url()),
        (false, true),
        "nostr-rs-relay answers no OK for kind 24133 (but one for kind 1); log:\n{}",
        relay.log()
    );

    let dir = tempfile::tempdir().unwrap();
    let server = start_with(engine, dir.path(), &[("BUNKER_RELAYS", relay.url())]);
    let (_, user_pubkey, token) = user_with_grant(&server, "rs@example.com", "policy:social");
    let bunker = bunker_url(&token);
    assert!(
        bunker.contains(&url_encode(relay.url())),
        "{bunker} names the configured relay"
    );
    sign_like_an_app(&mut client, &bunker, &user_pubkey);

    let round_trips: Vec<f64> = (0..5)
        .map(|i| {
            let signed =
                client.call_ok(json!({"op": "sign_event", "event": {"kind": 1, "content": format!("no OK {i}")}}));
            assert_eq!(signed["verified"], true, "{signed}");
            signed["ms"].as_f64().unwrap()
        })
        .collect();
    eprintln!("sign_event round trips through nostr-rs-relay (ms): {round_trips:?}");
    for ms in &round_trips {
        assert!(
            *ms < NO_OK_WAIT_WITHIN_MS,
            "a sign_event took {ms} ms through a relay that sends no OK: {round_trips:?}"
        );
    }
}

/// Publishes a kind-24133 event and then a kind-1 event on one connection to `url`, and
/// reads until the kind 1's `OK`: whether an `OK` came for (the 24133, the kind 1).
/// nostr-rs-relay handles a connection's events in order through one writer, so an `OK` for
/// the 24133 would have come first; none before the kind 1's means none at all.
fn oks_until_a_kind_1_is_answered(url: &str) -> (bool, bool) {
    use nostr::{ClientMessage, EventBuilder, Kind, RelayMessage, Tag};
    use nostr_sdk::pool::{RelayOptions, RelayPool, RelayPoolNotification};

    let keys = Keys::generate();
    let ephemeral = EventBuilder::new(Kind::NostrConnect, "no OK for me")
        .tag(Tag::public_key(Keys::generate().public_key()))
        .sign_with_keys(&keys)
        .unwrap();
    let note = EventBuilder::text_note("OK for me").sign_with_keys(&keys).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = RelayPool::new();
        pool.add_relay(url, RelayOptions::new()).await.unwrap();
        pool.try_connect(Duration::from_secs(5)).await;
        let mut notifications = pool.notifications();
        pool.batch_msg_to(
            [url],
            vec![
                ClientMessage::event(ephemeral.clone()),
                ClientMessage::event(note.clone()),
            ],
        )
        .await
        .unwrap();
        let mut answered = (false, false);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !answered.1 {
                if let Ok(RelayPoolNotification::Message {
                    message: RelayMessage::Ok { event_id, .. },
                    ..
                }) = notifications.recv().await
                {
                    answered.0 |= event_id == ephemeral.id;
                    answered.1 |= event_id == note.id;
                }
            }
        })
        .await
        .ok();
        pool.shutdown().await;
        answered
    })
}

/// Live grants copied from the one whose bunker is `template`, each under a bunker key of its
/// own (their secrets are the template's, so they are listened for but not answered).
fn seed_bunkers_like(server: &Keycast, template: &str, count: usize) {
    let db = server.data_dir.join("keycast.db");
    // One `sqlite3` argument is capped at 128 KiB: a thousand keys at a time.
    for batch in 0..count.div_ceil(1000) {
        let keys: Vec<String> = (batch * 1000..count.min((batch + 1) * 1000))
            .map(|_| format!("('{}')", Keys::generate().public_key().to_hex()))
            .collect();
        harness::sqlite_exec(
            &db,
            &format!(
                "CREATE TEMP TABLE k(seed TEXT); INSERT INTO k VALUES {}; \
                 CREATE TEMP TABLE many AS SELECT a.*, k.seed FROM authorizations a, k WHERE a.bunker_pubkey = '{template}'; \
                 UPDATE many SET id = 'seeded-' || seed, bunker_pubkey = seed; \
                 ALTER TABLE many DROP COLUMN seed; \
                 INSERT INTO authorizations SELECT * FROM many;",
                keys.join(",")
            ),
        );
    }
}

/// nostr-rs-relay answers a message over 256 KiB with a `NOTICE` (strfry: over 128 KiB), and
/// keycast named every bunker in one `REQ` to each operator relay. Past about 3,900 live
/// grants the relay refused it, and no app that was authorized after that was answered —
/// nothing in keycast's log said so. The bunkers are now spread over subscriptions of 500.
#[test]
fn apps_are_answered_on_a_relay_that_caps_a_message_when_thousands_of_grants_are_live() {
    let Some(relay) = RsRelay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(Engine::Sqlite, dir.path(), &[("BUNKER_RELAYS", relay.url())]);
    let (_, _, first) = user_with_grant(&server, "crowd@example.com", "policy:social");
    let template = &bunker_url(&first)["bunker://".len()..][..64];
    seed_bunkers_like(&server, template, 8_000);
    // Granted after them: the sync it makes names all 8,002 (in 17 subscriptions), and the
    // app connects the moment it has its URL: the token's answer waits until keycast
    // listens for it (before, with thousands to read, the app's first request could come
    // before the subscription, and be lost).
    let (_, user_pubkey, latest) = user_with_grant(&server, "latest@example.com", "policy:social");
    let connected = client.connect(&bunker_url(&latest));
    assert_eq!(
        connected["ok"],
        true,
        "connect: {connected}; keycast:\n{}",
        server.log()
    );
    let pk = client.call_ok(json!({"op": "get_public_key"}));
    assert_eq!(pk["pubkey"].as_str(), Some(user_pubkey.as_str()));
}

on_both_engines!(
    bunker_signer_works_through_an_external_relay,
    the_embedded_relay_runs_the_whole_flow_on_one_machine,
    refusals_are_answered_within_a_second,
    a_pasted_nostrconnect_uri_creates_an_authorization_the_client_can_use,
    the_dashboard_form_authorizes_a_nostrconnect_app,
    replies_do_not_wait_for_the_ok_nostr_rs_relay_never_sends,
);
