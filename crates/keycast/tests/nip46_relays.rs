//! Relays keycast does not control (issue 12 items 6 and 7): the relays a `nostrconnect://`
//! URI names are judged again at every connection, capped, told only about the bunkers that
//! use them, and cannot flood keycast into slowing down or answering strangers.

mod harness;

use std::time::{Duration, Instant};

use harness::api::*;
use harness::flow::register;
use harness::native::{Cipher, NativeClient};
use harness::nostr::Relay;
use harness::scripted_relay::ScriptedRelay;
use harness::{Keycast, Launch};
use nostr::{Keys, PublicKey};
use serde_json::json;

/// Accepts `nostrconnect://<client>?relay=<relay>…` for the signed-in `cookie`.
fn nostrconnect(server: &Keycast, cookie: &str, client: &Keys, relays: &[&str]) -> Reply {
    let relays: String = relays
        .iter()
        .map(|r| {
            format!(
                "relay={}&",
                url::form_urlencoded::byte_serialize(r.as_bytes()).collect::<String>()
            )
        })
        .collect();
    let uri = format!("nostrconnect://{}?{relays}secret=s3cret", client.public_key().to_hex());
    post_json(
        server,
        "/api/user/nostrconnect",
        Some(cookie),
        &json!({"uri": uri, "policy": "social"}),
    )
}

/// Issue 12 item 7: a name judged public when the URI was accepted may resolve to an
/// internal address later (DNS rebinding, or a record changed on purpose). keycast
/// resolves it again at every connection and connects only to the addresses it checked, so
/// the NIP-46 pool never reaches the loopback relay the name now points at — while the
/// operator's own relay on loopback (`BUNKER_RELAYS`) keeps working.
///
/// The test decides what the name resolves to with an `/etc/hosts` of its own, bind-mounted
/// in keycast's private mount namespace.
#[test]
fn a_relay_name_that_resolves_to_loopback_at_connect_time_is_refused() {
    let Some(bunker_relay) = Relay::start() else {
        return;
    };
    let target = ScriptedRelay::start();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let name = "relay.rebind-test.net";
    // When the URI is accepted the name resolves to a public address.
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n93.184.215.14 {name}\n")).unwrap();
    let launch = |nip46: &str| {
        Launch::new(&dir.path().join("data"))
            .with_hosts(&hosts)
            .env("BUNKER_RELAYS", bunker_relay.url())
            .env("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS", "false")
            .env("KEYCAST_NIP46", nip46)
    };
    let server = launch("false").start();
    let (cookie, account) = register(&server, "rebind@example.com", None);
    let client = Keys::generate();
    let relay = format!("ws://{name}:{}", target.port());
    let accepted = nostrconnect(&server, &cookie, &client, &[&relay]);
    assert_eq!(accepted.status, 201, "{}", accepted.body);
    let bunker = PublicKey::from_hex(accepted.json()["bunker_pubkey"].as_str().unwrap()).unwrap();
    server.stop();

    // Later the name points at loopback, where a relay happens to listen.
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.1 {name}\n")).unwrap();
    let server = launch("true").start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(
            target.connections(),
            0,
            "keycast connected to {relay}, which now resolves to 127.0.0.1; log:\n{}",
            server.log()
        );
        let log = server.log();
        if log.contains("refusing to connect to a relay") && log.contains(name) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keycast never said it refused {relay}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refusal = server
        .log()
        .lines()
        .find(|l| l.contains("refusing to connect to a relay"))
        .unwrap()
        .to_owned();
    assert!(
        refusal.contains("(127.0.0.1)"),
        "the refusal names the address: {refusal}"
    );

    // The operator's relay is on loopback too, and is used: the client is answered there.
    let mut app = NativeClient::connect_as(bunker_relay.url(), bunker, client);
    app.send(&[("1".into(), "get_public_key", json!([]))], Cipher::Nip44);
    let replies = app.replies(1, Duration::from_secs(10));
    assert_eq!(replies.len(), 1, "answered on BUNKER_RELAYS; log:\n{}", server.log());
    assert_eq!(replies[0].json["result"], account["pubkey"]);
    // Reconnection attempts are judged afresh and refused too.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.log().matches("refusing to connect to a relay").count() < 2 {
        assert!(Instant::now() < deadline, "no second attempt; log:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(target.connections(), 0, "log:\n{}", server.log());
}
