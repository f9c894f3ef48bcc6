//! NIP-05 names that read as the operator (issue 12, item 9): `_` (shown by clients as the
//! bare domain), `admin`, `support`, … and the operator's own `KEYCAST_RESERVED_USERNAMES`
//! cannot be claimed, and are never served.

mod harness;

use harness::api::*;
use harness::flow::register;
use harness::Launch;
use serde_json::json;

#[test]
fn nobody_can_claim_the_bare_domain_or_an_operator_like_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_RESERVED_USERNAMES", "Acme, acme-support")
        .start();
    let (cookie, _) = register(&server, "claimer@example.org", None);
    let claim = |name: &str| {
        post_json(
            &server,
            "/api/user/username",
            Some(&cookie),
            &json!({ "username": name }),
        )
    };
    for name in [
        "_",
        "admin",
        "Support",
        "keycast",
        "postmaster",
        "acme",
        "acme-support",
        "..",
        "_x",
    ] {
        let r = claim(name);
        assert_eq!(r.status, 400, "{name:?} was claimed: {}", r.body);
        let served = get(&server, &format!("/.well-known/nostr.json?name={name}"), None).json();
        assert_eq!(served["names"], json!({}), "{name:?} is served: {served}");
    }
    assert!(claim("_").body.contains("reserved"));
    let ok = claim("alice");
    assert_eq!(ok.status, 200, "{}", ok.body);
    let served = get(&server, "/.well-known/nostr.json?name=alice", None).json();
    assert!(served["names"]["alice"].is_string(), "{served}");
}
