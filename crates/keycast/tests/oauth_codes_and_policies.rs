//! Against the real binary: the policies list first-party pages show before consent, and
//! an authorization code that outlived its TTL being refused at the token endpoint.

mod harness;

use std::time::Duration;

use harness::api::*;
use harness::flow::{approve, authorize_query, pkce, register, token_request};
use harness::{Engine, Keycast, Launch};
use serde_json::json;

/// Consent for `test-app` under policy:social: the code and its PKCE verifier.
fn approved_code(server: &Keycast, cookie: &str) -> (String, String) {
    let (challenge, verifier) = pkce();
    (
        approve(server, cookie, &authorize_query("policy:social", &challenge)),
        verifier,
    )
}

fn an_expired_code_is_invalid_grant_over_http(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    // Codes live 2 s here (production: 600 s); the setting can only shorten the TTL.
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_OAUTH_CODE_TTL_SECS", "2")
        .start();
    let (cookie, _) = register(&server, "expiry@example.com", None);

    // Redeemed at once, a code works: the short TTL is what makes the next one fail.
    let (fresh, verifier) = approved_code(&server, &cookie);
    let ok = token_request(&server, &fresh, &verifier, REDIRECT);
    assert_eq!(ok.status, 200, "{}", ok.body);

    let (stale, verifier) = approved_code(&server, &cookie);
    std::thread::sleep(Duration::from_millis(3100));
    let expired = token_request(&server, &stale, &verifier, REDIRECT);
    assert_eq!(expired.status, 400, "{}", expired.body);
    assert_eq!(expired.json()["error"], "invalid_grant", "{}", expired.body);
    assert!(
        expired.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        expired.body
    );
}

fn policies_are_listed_with_what_they_permit(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let r = get(&server, "/api/policies", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let policies = r.json()["policies"].as_array().cloned().unwrap();
    let slugs: Vec<&str> = policies.iter().map(|p| p["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs, ["full", "readonly", "social", "wallet"]);
    let by_slug = |slug: &str| policies.iter().find(|p| p["slug"] == slug).unwrap().clone();

    let social = by_slug("social");
    assert_eq!(social["name"], "Social");
    assert!(!social["description"].as_str().unwrap().is_empty());
    assert_eq!(
        social["permissions"]["allowed_kinds"],
        json!([0, 1, 3, 4, 7, 44, 1059, 9735, 22242])
    );
    assert_eq!(by_slug("wallet")["permissions"]["allowed_kinds"], json!([9734]));
    assert_eq!(by_slug("readonly")["permissions"]["decrypt"], true);
    assert_eq!(by_slug("readonly")["permissions"]["allowed_kinds"], json!([22242]));
    assert_eq!(by_slug("wallet")["permissions"]["decrypt"], false);
    assert_eq!(by_slug("full")["permissions"]["full_access"], true);
    assert_eq!(by_slug("full")["permissions"]["allowed_kinds"], json!(null));

    // Every listed slug is a scope the authorization server accepts.
    let metadata = get(&server, "/.well-known/oauth-authorization-server", None).json();
    let scopes: Vec<String> = slugs.iter().map(|s| format!("policy:{s}")).collect();
    assert_eq!(metadata["scopes_supported"], json!(scopes));
}

/// Issue 12, item 4: the wallet policy, described as signing zap requests, must not read or
/// write direct messages, and the consent page's words are the enforced permissions.
fn a_wallet_app_cannot_read_direct_messages_and_the_consent_page_says_so(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let (cookie, _) = register(&server, "wallet-user@example.com", None);
    let (challenge, _) = harness::flow::pkce();
    let consent = get(
        &server,
        &format!(
            "/api/oauth/authorize?{}",
            harness::flow::authorize_query("policy:wallet", &challenge)
        ),
        Some(&cookie),
    );

    let token = harness::flow::grant(&server, &cookie, "policy:wallet")["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let correspondent = nostr::Keys::generate();
    let me = rpc(&server, &token, "get_public_key", json!([])).json()["result"]
        .as_str()
        .unwrap()
        .to_owned();
    let me = nostr::PublicKey::from_hex(&me).unwrap();
    let dm = nostr::nips::nip44::encrypt(
        correspondent.secret_key(),
        &me,
        "meet me at noon",
        nostr::nips::nip44::Version::V2,
    )
    .unwrap();
    let peer = correspondent.public_key().to_hex();
    let read = rpc(&server, &token, "nip44_decrypt", json!([peer, dm]));
    assert_eq!(read.status, 403, "a wallet app read a direct message: {}", read.body);
    let nip04 = rpc(&server, &token, "nip04_decrypt", json!([peer, "eA==?iv=eA=="]));
    assert_eq!(nip04.status, 403, "{}", nip04.body);
    let write = rpc(&server, &token, "nip44_encrypt", json!([peer, "hi"]));
    assert_eq!(write.status, 403, "{}", write.body);
    let zap = json!({"kind": 9734, "content": "", "tags": [], "created_at": 1_700_000_000});
    assert_eq!(rpc(&server, &token, "sign_event", json!([zap])).status, 200);
    assert!(consent.body.contains("zap requests (kind 9734)"), "{}", consent.body);
    assert!(
        consent.body.contains("Not read your encrypted messages"),
        "{}",
        consent.body
    );
    assert!(consent.body.contains("Not encrypt messages"), "{}", consent.body);
}

on_both_engines!(
    an_expired_code_is_invalid_grant_over_http,
    policies_are_listed_with_what_they_permit,
    a_wallet_app_cannot_read_direct_messages_and_the_consent_page_says_so,
);
