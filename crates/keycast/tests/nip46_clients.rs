//! The NIP-46 clients apps are built with, each driving keycast through a real relay
//! (issue 16): nostr-tools' `BunkerSigner`, NDK's `NDKNip46Signer` and rust-nostr's
//! `nostr-connect`.

mod harness;

use harness::flow::{grant, register};
use harness::nostr::BunkerClient;
use harness::Launch;
use serde_json::json;

/// NDK sends `connect` with params `["", secret]`: every NDK-based app's first step.
#[test]
fn ndk_connects_with_a_bunker_url_and_signs() {
    let Some(mut client) = BunkerClient::spawn_ndk() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let (cookie, account) = register(&server, "ndk@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let bunker = token["bunker_url"].as_str().unwrap();
    let connected = client.call(json!({"op": "connect", "bunker": bunker}));
    assert_eq!(
        connected["ok"],
        true,
        "NDK connects: {connected}; log:\n{}",
        server.log()
    );
    let signed = client.call_ok(json!({"op": "sign_event", "event": {"kind": 1, "content": "hello from NDK"}}));
    assert_eq!(signed["verified"], true, "{signed}");
    assert_eq!(signed["event"]["pubkey"], account["pubkey"]);
}
