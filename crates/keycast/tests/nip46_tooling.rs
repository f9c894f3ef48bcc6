//! Evidence that the NIP-46 test tooling works without keycast: the real client
//! (nostr-tools `BunkerSigner` through `BunkerClient`) talks through the real external relay
//! (`Relay`, PyPI nostr-relay) to a minimal fake bunker (`tests/js/fake-bunker.mjs`).
//!
//! Keycast's own NIP-46 tests replace the fake with the binary; this file can go once they
//! exist.

mod harness;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

use harness::nostr::{keypair, node_script, BunkerClient, Relay};
use serde_json::{json, Value};

/// `tests/js/fake-bunker.mjs` on one relay, killed on drop.
struct FakeBunker {
    child: Child,
    stdin: ChildStdin,
    /// Its `bunker://` URL (bunker key, relay, secret).
    bunker: String,
    /// The user key it signs with, which differs from the bunker key as in keycast.
    user_pubkey: String,
}

impl FakeBunker {
    fn start(relay: &Relay) -> FakeBunker {
        let dir = std::env::var("KEYCAST_NOSTR_TOOLS_DIR").unwrap();
        let mut cmd = node_script("fake-bunker.mjs", &dir);
        cmd.arg(relay.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("cannot start node");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("fake-bunker.mjs printed no bunker URL");
        let hello: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        FakeBunker {
            child,
            stdin,
            bunker: hello["bunker"].as_str().unwrap().to_owned(),
            user_pubkey: hello["user_pubkey"].as_str().unwrap().to_owned(),
        }
    }

    /// Makes the fake answer a client's `nostrconnect://` URI with its secret.
    fn accept(&mut self, uri: &str) {
        writeln!(self.stdin, "{uri}").unwrap();
    }
}

impl Drop for FakeBunker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hex pubkey in a `bunker://<pubkey>?…` URL.
fn bunker_pubkey(bunker: &str) -> &str {
    &bunker["bunker://".len().."bunker://".len() + 64]
}

#[test]
fn bunker_client_round_trips_through_nostr_relay() {
    let Some(relay) = Relay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let mut fake = FakeBunker::start(&relay);

    let wrong_secret = format!("{}0", fake.bunker);
    let refused = client.connect(&wrong_secret);
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"], "invalid secret", "{refused}");

    let connected = client.connect(&fake.bunker);
    assert_eq!(connected["ok"], true, "{connected}; log:\n{}", client.log());
    assert_eq!(connected["bunker_pubkey"], bunker_pubkey(&fake.bunker));

    let pubkey = client.get_public_key();
    assert_eq!(pubkey["pubkey"], fake.user_pubkey.as_str(), "{pubkey}");
    assert_ne!(fake.user_pubkey, bunker_pubkey(&fake.bunker));

    let signed = client.sign_event(json!({ "kind": 1, "content": "hello from the tooling test", "tags": [] }));
    assert_eq!(signed["ok"], true, "{signed}");
    assert_eq!(signed["verified"], true, "{signed}");
    assert_eq!(signed["event"]["pubkey"], fake.user_pubkey.as_str());
    assert_eq!(signed["event"]["content"], "hello from the tooling test");

    // NIP-44 both ways through the bunker, and checked independently with the nostr crate.
    let (peer_sk, peer_pk) = keypair();
    let sealed = client.nip44_encrypt(&peer_pk, "round trip");
    let ciphertext = sealed["result"].as_str().unwrap_or_else(|| panic!("{sealed}"));
    let opened = client.nip44_decrypt(&peer_pk, ciphertext);
    assert_eq!(opened["result"], "round trip", "{opened}");
    let independently = nostr::nips::nip44::decrypt(
        &nostr::SecretKey::from_hex(&peer_sk).unwrap(),
        &nostr::PublicKey::from_hex(&fake.user_pubkey).unwrap(),
        ciphertext,
    )
    .unwrap();
    assert_eq!(independently, "round trip");

    let pong = client.ping();
    assert_eq!(pong["result"], "pong", "{pong}");

    let unknown = client.raw("frobnicate", json!([]));
    assert_eq!(unknown["ok"], false, "{unknown}");
    assert_eq!(unknown["error"], "unknown method: frobnicate", "{unknown}");

    // nostrconnect://: the client publishes nothing; the signer answers with the secret, then
    // nostr-tools asks it to `switch_relays` (the fake answers null, keeping the relays).
    let offer = client.call_ok(json!({ "op": "nostrconnect", "relays": [relay.url()] }));
    fake.accept(offer["uri"].as_str().unwrap());
    let joined = client.call_ok(json!({ "op": "nostrconnect_wait" }));
    assert_eq!(joined["bunker_pubkey"], bunker_pubkey(&fake.bunker), "{joined}");
    assert_eq!(
        client.sign_event(json!({ "content": "via nostrconnect" }))["verified"],
        true
    );

    let bench = client.bench(50, 5);
    assert_eq!(bench["ok"], true, "{bench}");
    eprintln!(
        "sign_event through nostr-relay to the fake bunker, n=50: p50 {} ms, p99 {} ms, mean {} ms; \
         on the wire p50 {} ms, p99 {} ms",
        bench["p50"], bench["p99"], bench["mean"], bench["wire"]["p50"], bench["wire"]["p99"]
    );

    // A bunker nobody serves: the driver answers "timeout" when told to, instead of hanging.
    let (client_sk, nobody) = keypair();
    let bunker = format!("bunker://{nobody}?relay={}&secret=x", relay.url());
    let silent = client.call(json!({ "op": "connect", "bunker": bunker, "client_sk": client_sk, "timeout_ms": 300 }));
    assert_eq!(silent["ok"], false, "{silent}");
    assert_eq!(silent["error"], "timeout", "{silent}");
    assert!(silent["ms"].as_f64().unwrap() < 1000.0, "{silent}");
}
