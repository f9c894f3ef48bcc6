//! NIP-46 driven by a client with native crypto (`harness::native`), for what nostr-tools
//! cannot do: NIP-04 on the wire, and a burst of requests larger than keycast handles at once.

mod harness;

use std::time::Duration;

use harness::api::*;
use harness::flow::{grant, register};
use harness::native::{Cipher, NativeClient};
use harness::nostr::Relay;
use harness::{Keycast, Launch};
use nostr::PublicKey;
use serde_json::{json, Value};

/// keycast on its embedded relay with a grant: (server, user pubkey, bunker pubkey, relay,
/// connect secret).
fn bunker(dir: &std::path::Path, env: &[(&str, &str)]) -> (Keycast, String, PublicKey, String, String) {
    let mut launch = Launch::new(&dir.join("data"));
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    let server = launch.start();
    let (cookie, account) = register(&server, "native@example.com", None);
    let (bunker, relay, secret) = bunker_of(&grant(&server, &cookie, "policy:social"));
    (
        server,
        account["pubkey"].as_str().unwrap().to_owned(),
        bunker,
        relay,
        secret,
    )
}

/// A grant's bunker URL, taken apart: (bunker key, its first relay, connect secret).
fn bunker_of(grant: &Value) -> (PublicKey, String, String) {
    let url = grant["bunker_url"].as_str().unwrap();
    let bunker = PublicKey::from_hex(url.trim_start_matches("bunker://").split('?').next().unwrap()).unwrap();
    (
        bunker,
        query_param(url, "relay").unwrap(),
        query_param(url, "secret").unwrap(),
    )
}

/// The app's own burst (its client is bound): a stranger's requests are rate-limited
/// before they reach the in-flight slots (issue 12 item 6), so only a bound client can
/// overflow them.
#[test]
fn a_burst_beyond_capacity_is_answered_busy_never_dropped_silently() {
    let dir = tempfile::tempdir().unwrap();
    // One request at a time: a burst of connects (each waits for the replica) overflows it.
    let (_server, _, bunker, relay, secret) = bunker(dir.path(), &[("KEYCAST_NIP46_MAX_IN_FLIGHT", "1")]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(&[("c".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5))[0].json["result"], "ack");
    let burst: Vec<(String, &str, Value)> = (0..30)
        .map(|i| (format!("c{i}"), "connect", json!([bunker.to_hex(), secret])))
        .collect();
    client.send(&burst, Cipher::Nip44);
    let replies = client.replies(burst.len(), Duration::from_secs(10));
    assert_eq!(replies.len(), burst.len(), "every request of the burst is answered");
    let busy = replies
        .iter()
        .filter(|r| r.json["error"].as_str().is_some_and(|e| e.contains("busy")))
        .count();
    let acked = replies.iter().filter(|r| r.json["result"] == "ack").count();
    assert!(
        busy > 0,
        "some are refused as busy: {:?}",
        replies.iter().map(|r| &r.json).collect::<Vec<_>>()
    );
    assert!(acked > 0, "and some are served");
    assert_eq!(busy + acked, burst.len(), "nothing else went wrong");
}

#[test]
fn a_production_instance_refuses_nostrconnect_relays_on_internal_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("BUNKER_RELAYS", "wss://relay.example")
        .env("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS", "false")
        .env("KEYCAST_NIP46", "false")
        .start();
    let (cookie, _) = register(&server, "ssrf@example.com", None);
    let client = nostr::Keys::generate().public_key().to_hex();
    for relay in ["ws://127.0.0.1:9", "wss://169.254.169.254", "wss://10.0.0.7"] {
        let uri = format!("nostrconnect://{client}?relay={relay}&secret=s");
        let r = post_json(
            &server,
            "/api/user/nostrconnect",
            Some(&cookie),
            &json!({"uri": uri, "policy": "social"}),
        );
        assert_eq!(r.status, 400, "{relay}: {}", r.body);
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS"),
            "{}",
            r.body
        );
    }
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert_eq!(
        listed["authorizations"].as_array().unwrap().len(),
        0,
        "nothing was created"
    );
}

/// Older clients still send NIP-04 on the wire (nostr-tools no longer can); keycast answers
/// them in kind, and NIP-44 requests in NIP-44.
#[test]
fn each_request_is_answered_in_the_cipher_it_came_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(
        &[("1".into(), "connect", json!([bunker.to_hex(), secret]))],
        Cipher::Nip04,
    );
    let connected = client.replies(1, Duration::from_secs(5));
    assert_eq!(connected.len(), 1, "a NIP-04 connect is answered");
    assert_eq!(connected[0].json, json!({"id": "1", "result": "ack"}));
    assert_eq!(connected[0].cipher, Cipher::Nip04, "in NIP-04");

    for (id, cipher) in [("2", Cipher::Nip04), ("3", Cipher::Nip44)] {
        client.send(&[(id.into(), "get_public_key", json!([]))], cipher);
        let reply = client.replies(1, Duration::from_secs(5));
        assert_eq!(reply.len(), 1, "{cipher:?} get_public_key is answered");
        assert_eq!(reply[0].json, json!({"id": id, "result": user_pubkey}));
        assert_eq!(reply[0].cipher, cipher);
    }
}

/// A bound app that sent `nip44_encrypt` with its params swapped had its plaintext — which
/// travelled encrypted — written to keycast's log in the refusal ("… not \"<plaintext>\"").
/// Refusals now name what is wrong without repeating what was sent.
#[test]
fn a_refused_request_does_not_put_what_it_carried_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[("KEYCAST_LOG", "debug")]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(
        &[("1".into(), "connect", json!([bunker.to_hex(), secret]))],
        Cipher::Nip44,
    );
    assert_eq!(client.replies(1, Duration::from_secs(5)).len(), 1);
    let canary = "CANARY-9c1e a private message";
    client.send(
        &[("2".into(), "nip44_encrypt", json!([canary, user_pubkey]))],
        Cipher::Nip44,
    );
    let refused = client.replies(1, Duration::from_secs(5));
    assert_eq!(refused.len(), 1, "the swapped request is answered");
    let error = refused[0].json["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("params[0] must be the peer's public key"), "{error}");
    assert!(
        server.log().contains("nip46 request refused"),
        "the refusal is logged: {}",
        server.log()
    );
    assert!(!server.log().contains("CANARY-9c1e"), "{}", server.log());
}

/// Anyone who sees a bunker's key on a public relay can send it requests. Each refusal was
/// logged at INFO — twenty a second a relay, from strangers, for nothing: they are counted in
/// `keycast_nip46_requests_total{outcome}` and logged at debug only.
#[test]
fn strangers_refused_by_a_bunker_do_not_fill_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _, bunker, relay, _) = bunker(dir.path(), &[]);
    let sign = json!([json!({"kind": 1, "content": "x", "tags": [], "created_at": 1_700_000_000}).to_string()]);
    for n in 0..10 {
        let mut stranger = NativeClient::connect(&relay, bunker);
        stranger.send(&[(format!("s{n}"), "sign_event", sign.clone())], Cipher::Nip44);
        assert_eq!(
            stranger.replies(1, Duration::from_secs(5)).len(),
            1,
            "stranger {n} is answered"
        );
    }
    let (_, metrics) = server.get("/metrics");
    assert!(
        harness::metric_sum(&metrics, "keycast_nip46_requests_total") >= 10.0,
        "the refusals are counted"
    );
    let logged = server.log().matches("nip46 request refused").count();
    assert!(
        logged < 3,
        "{logged} lines for strangers' refused requests:\n{}",
        server.log()
    );
}

/// A relay that stores ephemeral events replays them to a new subscription (after keycast
/// restarts or reconnects): a request minutes old must not be signed again.
#[test]
fn a_request_older_than_a_minute_is_not_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(
        &[("1".into(), "connect", json!([bunker.to_hex(), secret]))],
        Cipher::Nip44,
    );
    assert_eq!(client.replies(1, Duration::from_secs(5)).len(), 1);

    let old = nostr::Timestamp::from(nostr::Timestamp::now().as_secs() - 300);
    client.send_dated(&[("old".into(), "get_public_key", json!([]))], Cipher::Nip44, old);
    client.send(&[("new".into(), "get_public_key", json!([]))], Cipher::Nip44);
    let replies = client.replies(2, Duration::from_secs(2));
    let ids: Vec<&Value> = replies.iter().map(|r| &r.json["id"]).collect();
    assert_eq!(ids, [&json!("new")], "only the fresh request is answered");
    assert_eq!(replies[0].json["result"], user_pubkey.as_str());
}

/// Issue 16: what clients in the field send as `connect` is accepted — an empty, null or
/// missing first parameter (NDK sends `""`), the optional requested permissions and client
/// metadata — and what they ask for never widens the owner's grant.
#[test]
fn connect_is_liberal_in_its_parameters_and_strict_in_what_it_grants() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[]);
    let metadata = json!({"name": "An app", "url": "https://app.example", "image": "https://app.example/i.png"});
    let variants = [
        json!(["", secret]),
        json!([null, secret]),
        json!([bunker.to_hex(), secret, "sign_event:30023,nip44_decrypt"]),
        json!(["", secret, "", metadata]),
        json!([user_pubkey, secret]),
    ];
    // The bound client may send `connect` again, in any of these shapes.
    let mut client = NativeClient::connect(&relay, bunker);
    for (i, params) in variants.iter().enumerate() {
        let id = format!("c{i}");
        client.send(&[(id.clone(), "connect", params.clone())], Cipher::Nip44);
        let reply = client.replies(1, Duration::from_secs(5));
        assert_eq!(reply.len(), 1, "connect {params} is answered");
        assert_eq!(reply[0].json, json!({"id": id, "result": "ack"}), "connect {params}");
    }
    // Only the secret: no first parameter at all is not a valid shape (the secret is the
    // second); an empty parameter list from an unbound client has no secret.
    let mut stranger = NativeClient::connect(&relay, bunker);
    stranger.send(&[("s".into(), "connect", json!([]))], Cipher::Nip44);
    let reply = stranger.replies(1, Duration::from_secs(5));
    assert!(
        reply[0].json["error"].as_str().unwrap_or_default().contains("secret"),
        "{}",
        reply[0].json
    );

    // The client asked for kind 30023 and decryption: the social policy grants neither.
    client.send(
        &[(
            "k".into(),
            "sign_event",
            json!([json!({"kind": 30023, "content": "long", "tags": [], "created_at": 1_700_000_000}).to_string()]),
        )],
        Cipher::Nip44,
    );
    // Not granted, so the owner is asked (issue 14): NIP-46's `auth_url` reply, same id.
    let asked = client.replies(1, Duration::from_secs(5));
    assert_eq!(asked[0].json["id"], "k", "{}", asked[0].json);
    assert_eq!(asked[0].json["result"], "auth_url", "{}", asked[0].json);
    assert!(
        asked[0].json["error"]
            .as_str()
            .unwrap_or_default()
            .contains("/approvals/"),
        "{}",
        asked[0].json
    );
}

/// Issue 16: `logout` ends the client's session; the same app connecting again (a fresh
/// client key, the bunker URL's secret) is bound, and the old client key no longer signs.
#[test]
fn a_fresh_connect_after_logout_binds_the_new_client() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut first = NativeClient::connect(&relay, bunker);
    first.send(&[("1".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(first.replies(1, Duration::from_secs(5))[0].json["result"], "ack");
    first.send(&[("2".into(), "logout", json!([]))], Cipher::Nip44);
    assert_eq!(first.replies(1, Duration::from_secs(5))[0].json["result"], "ack");

    let mut second = NativeClient::connect(&relay, bunker);
    second.send(&[("1".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    let reply = second.replies(1, Duration::from_secs(5));
    assert_eq!(reply[0].json["result"], "ack", "{}", reply[0].json);
    second.send(&[("2".into(), "get_public_key", json!([]))], Cipher::Nip44);
    assert_eq!(
        second.replies(1, Duration::from_secs(5))[0].json["result"],
        user_pubkey.as_str()
    );

    first.send(&[("3".into(), "get_public_key", json!([]))], Cipher::Nip44);
    let reply = first.replies(1, Duration::from_secs(5));
    assert!(
        reply[0].json["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not connected"),
        "{}",
        reply[0].json
    );
}

/// Issue 16: a phone whose clock is half a minute off either way is still answered.
#[test]
fn requests_within_the_clock_skew_window_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut client = NativeClient::connect(&relay, bunker);
    let now = nostr::Timestamp::now().as_secs();
    client.send_dated(
        &[("1".into(), "connect", json!(["", secret]))],
        Cipher::Nip44,
        (now - 30).into(),
    );
    assert_eq!(client.replies(1, Duration::from_secs(5))[0].json["result"], "ack");
    client.send_dated(
        &[("2".into(), "get_public_key", json!([]))],
        Cipher::Nip44,
        (now + 30).into(),
    );
    let reply = client.replies(1, Duration::from_secs(5));
    assert_eq!(reply[0].json["result"], user_pubkey.as_str(), "{}", reply[0].json);
}

/// Issue 12 item 8: a request dated in the future is not answered either — a captured
/// request (or one a relay holds back) cannot be run later, once the window around its date
/// has passed; dedup remembers every answered request for as long as that window is open.
#[test]
fn a_request_dated_in_the_future_is_not_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(&[("1".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5)).len(), 1);

    let future = nostr::Timestamp::from(nostr::Timestamp::now().as_secs() + 300);
    client.send_dated(&[("later".into(), "get_public_key", json!([]))], Cipher::Nip44, future);
    client.send(&[("now".into(), "get_public_key", json!([]))], Cipher::Nip44);
    // The same request again (same client, same id) within the window: answered once.
    client.send(&[("now".into(), "get_public_key", json!([]))], Cipher::Nip44);
    let replies = client.replies(3, Duration::from_secs(2));
    let ids: Vec<&Value> = replies.iter().map(|r| &r.json["id"]).collect();
    assert_eq!(ids, [&json!("now")], "only the request dated now is answered, once");
    assert_eq!(replies[0].json["result"], user_pubkey.as_str());
}

/// Issue 12 item 7: names are resolved and every special-purpose range is refused — a
/// wildcard-DNS name for a private address (`10.0.0.1.nip.io`; it does not resolve in this
/// sandbox, and a name that does not resolve is refused too), the cloud metadata server's
/// bare name, NAT64, 6to4, benchmarking and reserved ranges.
#[test]
fn nostrconnect_relays_are_resolved_and_special_ranges_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("BUNKER_RELAYS", "wss://relay.example")
        .env("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS", "false")
        .env("KEYCAST_NIP46", "false")
        .start();
    let (cookie, _) = register(&server, "ssrf2@example.com", None);
    let client = nostr::Keys::generate().public_key().to_hex();
    for relay in [
        "wss://10.0.0.1.nip.io",
        "wss://metadata",
        "ws://metadata.google.internal",
        "wss://[64:ff9b::a00:1]",
        "wss://[2002:a00:1::]",
        "wss://198.18.0.1",
        "wss://240.0.0.1",
    ] {
        let uri = format!("nostrconnect://{client}?relay={relay}&secret=s");
        let r = post_json(
            &server,
            "/api/user/nostrconnect",
            Some(&cookie),
            &json!({"uri": uri, "policy": "social"}),
        );
        assert_eq!(r.status, 400, "{relay}: {}", r.body);
        assert!(
            r.body.contains("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS"),
            "{relay}: {}",
            r.body
        );
    }
}

/// A request id is kept for the dedup window (minutes) and echoed in the reply to every
/// relay: an id of 100 KB from a client, a thousand times, held a gigabyte. Ids past 128
/// bytes are not answered (no client sends them: nostr-tools sends a counter with a random
/// prefix, others a UUID or 64 hex digits).
#[test]
fn a_request_with_an_oversized_id_is_not_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(&[("c".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5))[0].json["result"], "ack");

    let (longest, too_long) = ("x".repeat(128), "y".repeat(129 * 400));
    client.send(
        &[(too_long, "ping", json!([])), (longest.clone(), "ping", json!([]))],
        Cipher::Nip04,
    );
    let replies = client.replies(2, Duration::from_secs(3));
    let ids: Vec<&str> = replies.iter().map(|r| r.json["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [longest.as_str()], "only the id within bounds is answered");
    let metrics = get(&server, "/metrics", None).body;
    assert_eq!(
        harness::metric_sum(&metrics, "keycast_nip46_undecryptable_total"),
        1.0,
        "counted among the requests that cannot be opened"
    );
}

/// A revoked bunker is still served for a while, to answer "revoked"; its client is no longer
/// the bunker's: it gets a stranger's limits. Before, the app its owner had just revoked was
/// the one client keycast answered without any limit (each answer a key unwrap, an ECDH and a
/// reply to every relay).
#[test]
fn a_revoked_apps_client_is_limited_like_a_stranger() {
    let dir = tempfile::tempdir().unwrap();
    let mut launch = Launch::new(&dir.path().join("data"));
    launch = launch.env("KEYCAST_NIP46_UNBOUND_REQUESTS_PER_SEC", "20");
    let server = launch.start();
    let (cookie, _) = register(&server, "revoked@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let (bunker, relay, secret) = bunker_of(&token);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(&[("c".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5))[0].json["result"], "ack");

    let id = token["authorization_id"].as_str().unwrap();
    let revoked = delete(&server, &format!("/api/user/authorizations/{id}"), &cookie);
    assert!(revoked.status < 300, "{}", revoked.body);
    client.send(&[("after".into(), "ping", json!([]))], Cipher::Nip44);
    let answer = client.replies(1, Duration::from_secs(5));
    assert_eq!(answer.len(), 1, "the revoked app is told");
    assert!(
        answer[0].json["error"].as_str().unwrap_or_default().contains("revoked"),
        "{}",
        answer[0].json
    );

    // Once keycast's view of its bunkers has caught up with the revocation (it re-reads them
    // at each change), a burst from the revoked app.
    std::thread::sleep(Duration::from_secs(2));
    let burst: Vec<(String, &str, Value)> = (0..60).map(|i| (format!("b{i}"), "ping", json!([]))).collect();
    client.send(&burst, Cipher::Nip44);
    let answered = client.replies(burst.len(), Duration::from_secs(5)).len();
    assert!(
        answered <= 12,
        "{answered} of a burst of 60 from a revoked app answered; a stranger gets about 10"
    );
    let metrics = get(&server, "/metrics", None).body;
    assert!(harness::metric_sum(&metrics, "keycast_nip46_unbound_dropped_total") > 0.0);
}

/// A bunker's strangers share a small bucket (ten, then one every six seconds), and the app
/// a user just granted is a stranger until its `connect` binds it. Before, anyone who saw the
/// bunker's key on a relay could keep that bucket empty with an event every few seconds and
/// no new app's `connect` was ever read. Now, while the relay has capacity to spare, a
/// `connect` past the bucket is still opened, and answered if its secret binds; the
/// stranger's own requests past the bucket stay unanswered.
#[test]
fn a_stranger_emptying_a_bunkers_bucket_does_not_keep_its_app_from_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, _, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut stranger = NativeClient::connect(&relay, bunker);
    let flood: Vec<(String, &str, Value)> = (0..25).map(|i| (format!("s{i}"), "ping", json!([]))).collect();
    stranger.send(&flood, Cipher::Nip44);
    let answered = stranger.replies(flood.len(), Duration::from_secs(3)).len();
    assert!(
        answered <= 11,
        "{answered} of the stranger's 25 answered: its bucket holds ten"
    );
    // A wrong secret past the bucket is not answered either.
    stranger.send(&[("w".into(), "connect", json!(["", "not-the-secret"]))], Cipher::Nip44);
    assert!(
        stranger.replies(1, Duration::from_secs(2)).is_empty(),
        "a wrong secret past the bucket is dropped"
    );

    let mut app = NativeClient::connect(&relay, bunker);
    app.send(&[("c".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    let reply = app.replies(1, Duration::from_secs(5));
    assert_eq!(
        reply.len(),
        1,
        "the app's connect is answered while the stranger has emptied the bucket"
    );
    assert_eq!(reply[0].json["result"], "ack", "{}", reply[0].json);
    // Bound now: its requests are no stranger's.
    app.send(&[("p".into(), "ping", json!([]))], Cipher::Nip44);
    assert_eq!(app.replies(1, Duration::from_secs(5))[0].json["result"], "pong");
}

/// Apps publish each request to every relay of the bunker URL, so keycast receives it once
/// per relay. Every copy is answered once: before, a copy arriving while keycast was at
/// capacity (the first copy holding the last slot) was answered "busy" under the id of the
/// request under way, and clients reject on the first error; each copy also took a slot and
/// a decryption. (nostr-sdk's pool passes an event on once, whichever relays it comes from;
/// this holds it to that.) The same holds for whoever republishes a captured request.
#[test]
fn a_request_on_two_relays_is_answered_once_even_at_capacity() {
    let (Some(first), Some(second)) = (Relay::start(), Relay::start()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("BUNKER_RELAYS", &format!("{},{}", first.url(), second.url()))
        .env("KEYCAST_NIP46_MAX_IN_FLIGHT", "1")
        .start();
    let (cookie, _) = register(&server, "tworelays@example.com", None);
    let (bunker, _, secret) = bunker_of(&grant(&server, &cookie, "policy:social"));
    let mut client = NativeClient::connect_to(&[first.url(), second.url()], bunker, nostr::Keys::generate());
    client.send(&[("c".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5))[0].json["result"], "ack");
    // The signature is held 2 s before its record: the one slot stays taken.
    if !harness::arm_failpoint(&server, "signer-before-record", "return(2000)") {
        return;
    }
    let event = json!({"kind": 1, "content": "once", "tags": [], "created_at": nostr::Timestamp::now().as_secs()});
    client.send(
        &[("held".into(), "sign_event", json!([event.to_string()]))],
        Cipher::Nip44,
    );
    std::thread::sleep(Duration::from_millis(300));
    client.send_again();
    let replies = client.replies(3, Duration::from_secs(5));
    let shown: Vec<&Value> = replies.iter().map(|r| &r.json).collect();
    assert_eq!(replies.len(), 1, "one answer to one request: {shown:?}");
    assert!(
        replies[0].json["result"]
            .as_str()
            .is_some_and(|r| r.contains("\"sig\"")),
        "{shown:?}"
    );
}

/// Anyone who reaches the embedded relay can publish a kind-24133 event addressed to a bunker
/// keycast serves. keycast reads at most 256 KiB a message from a relay (a bigger one ends
/// the connection), so one event past that, forwarded, cut keycast off the relay — again and
/// again, the reconnect waiting longer each time. The embedded relay refuses such events.
#[test]
fn an_oversized_event_on_the_embedded_relay_does_not_cut_keycast_off() {
    let dir = tempfile::tempdir().unwrap();
    let (server, user_pubkey, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(&[("c".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5))[0].json["result"], "ack");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = nostr_sdk::pool::RelayPool::new();
        pool.add_relay(relay.as_str(), nostr_sdk::pool::RelayOptions::new())
            .await
            .unwrap();
        pool.connect().await;
        pool.wait_for_connection(Duration::from_secs(5)).await;
        let huge = nostr::EventBuilder::new(nostr::Kind::NostrConnect, "x".repeat(300 * 1024))
            .tag(nostr::Tag::public_key(bunker))
            .sign_with_keys(&nostr::Keys::generate())
            .unwrap();
        let sent = pool.send_event(&huge).await;
        assert!(
            sent.as_ref().map_or(true, |output| output.success.is_empty()),
            "the embedded relay took an event of 300 KiB: {sent:?}"
        );
    });
    std::thread::sleep(Duration::from_secs(2));
    client.send(&[("after".into(), "get_public_key", json!([]))], Cipher::Nip44);
    let replies = client.replies(1, Duration::from_secs(3));
    assert_eq!(replies.len(), 1, "keycast still answers on the relay");
    assert_eq!(replies[0].json["result"], user_pubkey.as_str());
    let metrics = get(&server, "/metrics", None).body;
    assert!(
        harness::metric_sum(&metrics, "keycast_embedded_relay_cut_off_total") >= 1.0,
        "the event reached the relay and was refused there"
    );
    assert_eq!(
        harness::metric_sum(&metrics, "keycast_nip46_reconnects_total"),
        0.0,
        "keycast's connection to the relay held"
    );
}

/// A reply larger than NIP-44 can encrypt (65,535 bytes): `nip44_encrypt` of 49,000 bytes
/// makes about 65,600 of ciphertext, and a signed event travels as JSON inside JSON, its
/// escapes doubled. Sealing failed, the failure was logged, and nothing was sent: the app
/// waited for good. It now gets an error with the request's id, and goes on being answered.
#[test]
fn a_reply_too_large_for_nip44_is_answered_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, _user, bunker, relay, secret) = bunker(dir.path(), &[]);
    let mut client = NativeClient::connect(&relay, bunker);
    client.send(
        &[("1".into(), "connect", json!([bunker.to_hex(), secret]))],
        Cipher::Nip44,
    );
    assert_eq!(client.replies(1, Duration::from_secs(5)).len(), 1);

    let peer = nostr::Keys::generate().public_key().to_hex();
    let quotes =
        json!({"kind": 1, "content": "\"".repeat(20_000), "tags": [], "created_at": nostr::Timestamp::now().as_secs()});
    client.send(
        &[
            ("big-encrypt".into(), "nip44_encrypt", json!([peer, "a".repeat(49_000)])),
            ("big-sign".into(), "sign_event", json!([quotes])),
        ],
        Cipher::Nip44,
    );
    let mut replies = client.replies(2, Duration::from_secs(10));
    replies.sort_by_key(|r| r.json["id"].as_str().unwrap_or_default().to_owned());
    let ids: Vec<&str> = replies
        .iter()
        .map(|r| r.json["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids, ["big-encrypt", "big-sign"], "both are answered");
    for reply in &replies {
        let error = reply.json["error"].as_str().unwrap_or_default();
        assert!(error.contains("more than NIP-46 carries"), "{}", reply.json);
    }

    client.send(&[("after".into(), "get_public_key", json!([]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5)).len(), 1, "the app goes on");
}
