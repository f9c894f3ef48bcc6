//! A full disk under the database, against the real binary. keycast's data directory sits on
//! a small tmpfs (a Cloud Run in-memory volume has a size limit; a VM's disk fills up), which
//! the test fills. While it is full, every write either fails with a JSON error (503 saying
//! the disk is full) or is made; none is answered as made and then missing. Once space is freed, keycast writes again
//! without a restart, and every write it acknowledged is restored from the replica.
//!
//! The case that failed before: SQLite commits a statement outside a transaction when the
//! statement ends, and a full disk refuses that commit; sqlx's `fetch_optional` stops at the
//! first `RETURNING` row and drops the error of the statement's end. A token revocation
//! (`DELETE … RETURNING`) answered 200 and the token kept working.

mod harness;

use std::process::Command;

use harness::api::*;
use harness::engine::psql;
use harness::flow::{approve_with, authorize_query, grant, pkce, register, token_request};
use harness::tmpfs::Tmpfs;
use harness::{CommandExt as _, Launch};
use serde_json::json;

fn registration(server: &harness::Keycast, email: &str) -> Reply {
    post_json(
        server,
        "/api/auth/register",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    )
}

fn revoke(server: &harness::Keycast, token: &str) -> Reply {
    post(server, "/api/oauth/revoke", None, FORM, &form(&[("token", token)]), &[])
}

fn signs(server: &harness::Keycast, token: &str) -> u16 {
    rpc(server, token, "sign_event", json!([{ "kind": 1, "content": "hi" }])).status
}

/// Registers accounts (`register(email, i)`) until the full disk refuses one, which must be
/// the 503 that says so, with `Retry-After`; returns the addresses acknowledged before it.
fn register_until_refused(register: impl Fn(&str, usize) -> Reply) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for i in 0..2000 {
        let email = format!("while-full-{i}@example.com");
        let r = register(&email, i);
        if r.status == 201 {
            acknowledged.push(email);
            continue;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(
            r.json()["message"].as_str().is_some_and(|m| m.contains("disk is full")),
            "a JSON error saying why: {}",
            r.body
        );
        assert!(r.retry_after.is_some(), "with Retry-After");
        return acknowledged;
    }
    panic!("no registration failed on the full disk");
}

#[test]
fn a_full_disk_fails_writes_clearly_and_loses_none_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "24m") else {
        return;
    };
    let replica = dir.path().join("replica");
    let server = Launch::new(&disk.point.join("data")).redeployable(&replica).start();
    let (cookie, _) = register(&server, "alice@example.com", None);
    let app = grant(&server, &cookie, "policy:social");
    let access = app["access_token"].as_str().unwrap().to_owned();
    assert_eq!(signs(&server, &access), 200);
    // A grant with limits: its count lives in memory on SQLite, so it signs on too.
    let (challenge, verifier) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let code = approve_with(&server, &cookie, &query, &[("per_day", "100")]);
    let limited = token_request(&server, &code, &verifier, REDIRECT).json();
    let counted = limited["access_token"].as_str().unwrap().to_owned();
    assert_eq!(signs(&server, &counted), 200);

    disk.fill();
    let mut acknowledged = vec!["alice@example.com".to_owned()];
    acknowledged.extend(register_until_refused(|email, _| registration(&server, email)));
    assert_eq!(signs(&server, &access), 200, "signing only reads: it goes on");
    assert_eq!(
        signs(&server, &counted),
        200,
        "a grant's count is kept in memory on SQLite"
    );

    // The owner's revocation of the app fails whole, saying why.
    let authorization = format!("/api/user/authorizations/{}", app["authorization_id"].as_str().unwrap());
    let r = delete(&server, &authorization, &cookie);
    assert_eq!(r.status, 503, "{}", r.body);

    // The app's own revocation of its token either fails or holds; it is never answered
    // and then undone.
    let revoked = revoke(&server, &access);
    disk.free();
    if revoked.status == 200 {
        assert_eq!(
            signs(&server, &access),
            401,
            "revoked with 200, yet the token still signs"
        );
    } else {
        // RFC 7009 §2.2.1: 503 while the server cannot revoke for now.
        assert_eq!(revoked.status, 503, "{}", revoked.body);
        assert_eq!(signs(&server, &access), 200, "a failed revocation changed nothing");
        assert_eq!(revoke(&server, &access).status, 200);
        assert_eq!(signs(&server, &access), 401);
    }

    // The operator is paged by its own counter (signing kept the 5xx rate low).
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        harness::metric_sum(&metrics, "keycast_database_disk_full_total") >= 1.0,
        "the refusals are counted: {metrics}"
    );

    // Space is back: writes work again without a restart.
    assert_eq!(delete(&server, &authorization, &cookie).status, 204);
    let after = registration(&server, "after@example.com");
    assert_eq!(after.status, 201, "{}", after.body);
    acknowledged.push("after@example.com".to_owned());
    server.stop();

    // Every acknowledged account is in the replica.
    let restored = Launch::new(&dir.path().join("elsewhere"))
        .redeployable(&replica)
        .start();
    for email in &acknowledged {
        let r = post_json(
            &restored,
            "/api/auth/login",
            None,
            &json!({ "email": email, "password": PASSWORD }),
        );
        assert_eq!(
            r.status, 200,
            "{email} was acknowledged but is not in the replica: {}",
            r.body
        );
    }
    restored.stop();
}

const ADMIN_TOKEN: &str = "an-operator-token-of-at-least-32-characters";

/// Every kind of write a person, an app or the operator can ask for, while the disk is full:
/// each is made, or refused with the 503 that says the disk is full. None is a 500 (which
/// tells nobody what to do, and pages as a bug), and a refused one changed nothing.
///
/// Failed before: the storage error reached HTTP wrapped in a grant, key or client error,
/// and OAuth consent, the NIP-46 `nostrconnect` grant, the operator's app registration and
/// others answered 500.
#[test]
fn every_write_on_a_full_disk_is_made_or_refused_as_full_never_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "24m") else {
        return;
    };
    let server = Launch::new(&disk.point.join("data"))
        .redeployable(&dir.path().join("replica"))
        .env("KEYCAST_ADMIN_TOKEN", ADMIN_TOKEN)
        .start();
    let (cookie, _) = register(&server, "alice@example.com", None);
    let app = grant(&server, &cookie, "policy:social");
    let authorization = format!("/api/user/authorizations/{}", app["authorization_id"].as_str().unwrap());
    let refresh = app["refresh_token"].as_str().unwrap().to_owned();
    let (challenge, verifier) = pkce();
    let code = harness::flow::approve(&server, &cookie, &authorize_query("policy:social", &challenge));
    let client = admin(
        &server,
        "POST",
        "/api/admin/clients",
        Some(ADMIN_TOKEN),
        Some(&json!({ "name": "Coracle", "redirect_uris": [harness::api::REDIRECT] })),
    );
    assert_eq!(client.status, 201, "{}", client.body);
    let client = format!("/api/admin/clients/{}", client.json()["client_id"].as_str().unwrap());
    let policy = post_json(
        &server,
        "/api/user/policies",
        Some(&cookie),
        &json!({ "name": "Mine", "permissions": { "full_access": true } }),
    );
    assert_eq!(policy.status, 201, "{}", policy.body);
    let policy = format!("/api/user/policies/{}", policy.json()["slug"].as_str().unwrap());
    let (_, bob) = register(&server, "bob@example.com", None);
    let bob = format!("/api/admin/users/{}", bob["user_id"].as_str().unwrap());
    harness::flow::register_unverified(&server, "carol@example.com", None);
    let verification = harness::flow::mailed_token(&server, "carol@example.com", "verify_email");
    let asked = post_json(
        &server,
        "/api/auth/forgot-password",
        None,
        &json!({ "email": "alice@example.com" }),
    );
    assert_eq!(asked.status, 202, "{}", asked.body);
    let reset = harness::flow::mailed_token(&server, "alice@example.com", "reset_password");
    let nostrconnect = format!(
        "nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cret",
        nostr::Keys::generate().public_key().to_hex()
    );

    disk.fill();
    // Until SQLite can no longer grow its files (the WAL may have room left at first).
    register_until_refused(|email, _| registration(&server, email));

    let (challenge2, _) = pkce();
    let password = json!({ "password": PASSWORD });
    let attempts: Vec<(&str, Reply)> = vec![
        ("login", harness::flow::login(&server, "alice@example.com", PASSWORD)),
        (
            "OAuth consent",
            harness::flow::consent(&server, &cookie, &authorize_query("policy:social", &challenge2), &[]),
        ),
        (
            "code redemption",
            token_request(&server, &code, &verifier, harness::api::REDIRECT),
        ),
        (
            "token refresh",
            post_form(
                &server,
                "/api/oauth/token",
                None,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &refresh),
                    ("client_id", "test-app"),
                ],
            ),
        ),
        (
            "grant edit",
            send_json(&server, "PATCH", &authorization, &cookie, &json!({ "duration": "day" })),
        ),
        (
            "policy creation",
            post_json(
                &server,
                "/api/user/policies",
                Some(&cookie),
                &json!({ "name": "Another", "permissions": { "full_access": true } }),
            ),
        ),
        (
            "policy change",
            send_json(
                &server,
                "PUT",
                &policy,
                &cookie,
                &json!({ "name": "Mine", "permissions": { "allowed_kinds": [1] } }),
            ),
        ),
        ("policy deletion", delete(&server, &policy, &cookie)),
        (
            "nostrconnect grant",
            post_json(
                &server,
                "/api/user/nostrconnect",
                Some(&cookie),
                &json!({ "uri": nostrconnect, "policy": "social" }),
            ),
        ),
        (
            "username",
            post_json(
                &server,
                "/api/user/username",
                Some(&cookie),
                &json!({ "username": "alice" }),
            ),
        ),
        (
            "key export",
            post_json(
                &server,
                "/api/user/key/export",
                Some(&cookie),
                &json!({ "password": PASSWORD, "format": "nsec" }),
            ),
        ),
        (
            "password change",
            post_json(
                &server,
                "/api/user/password",
                Some(&cookie),
                &json!({ "current_password": PASSWORD, "new_password": "another long password" }),
            ),
        ),
        (
            "email verification",
            post_json(
                &server,
                "/api/auth/verify-email",
                None,
                &json!({ "token": verification, "password": PASSWORD }),
            ),
        ),
        (
            "app registration",
            admin(
                &server,
                "POST",
                "/api/admin/clients",
                Some(ADMIN_TOKEN),
                Some(&json!({ "name": "Primal", "redirect_uris": [harness::api::REDIRECT] })),
            ),
        ),
        (
            "app removal",
            admin(&server, "DELETE", &client, Some(ADMIN_TOKEN), None),
        ),
        (
            "account removal",
            admin(&server, "DELETE", &bob, Some(ADMIN_TOKEN), None),
        ),
        (
            "key replacement",
            post_json(&server, "/api/user/key/replace", Some(&cookie), &password),
        ),
        (
            "password reset",
            post_json(
                &server,
                "/api/auth/reset-password",
                None,
                &json!({ "token": reset, "password": "a third long password" }),
            ),
        ),
        (
            "logout",
            post_json(&server, "/api/auth/logout", Some(&cookie), &json!({})),
        ),
        (
            "account deletion",
            post_json(&server, "/api/user/delete", Some(&cookie), &password),
        ),
    ];
    for (what, r) in &attempts {
        eprintln!("on the full disk, {what}: {}", r.status);
    }
    let wrong: Vec<String> = attempts
        .iter()
        .filter(|(_, r)| r.status >= 500 && !(r.status == 503 && r.body.contains("disk is full")))
        .map(|(what, r)| format!("{what}: {} {}", r.status, r.body))
        .collect();
    assert!(
        wrong.is_empty(),
        "writes that failed without saying the disk is full:\n{}\n\nkeycast's log:\n{}",
        wrong.join("\n"),
        server.log()
    );
    let refusals = attempts.iter().filter(|(_, r)| r.status == 503).count();
    assert!(
        refusals >= attempts.len() / 2,
        "the disk refused most of them ({refusals} of {})",
        attempts.len()
    );

    // A refused logout and deletion left the session and the account as they were.
    disk.free();
    let outcome = |what: &str| {
        attempts
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, r)| r.status)
            .unwrap()
    };
    let refused = |what: &str| outcome(what) == 503;
    // Each check below holds only when the writes that could change what it reads were all
    // refused; the test fails unless most of them ran.
    let mut checked = Vec::new();
    if refused("logout") && refused("account deletion") && refused("password reset") {
        checked.push("session kept");
        let mine = get(&server, "/api/user/authorizations", Some(&cookie));
        assert_eq!(
            mine.status, 200,
            "a refused logout left the session signed in: {}",
            mine.body
        );
    }
    if refused("password change") && refused("password reset") && refused("account deletion") {
        checked.push("password kept");
        let r = harness::flow::login(&server, "alice@example.com", PASSWORD);
        assert_eq!(r.status, 200, "the password is the one before: {}", r.body);
    }
    if refused("account removal") {
        checked.push("account kept");
        let r = harness::flow::login(&server, "bob@example.com", PASSWORD);
        assert_eq!(r.status, 200, "a refused removal kept the account: {}", r.body);
    }
    if refused("key replacement")
        && refused("account deletion")
        && refused("password reset")
        && refused("token refresh")
    {
        checked.push("key kept");
        let access = app["access_token"].as_str().unwrap();
        assert_eq!(signs(&server, access), 200, "the app still signs with the key it had");
        let grant = get(&server, &authorization, Some(&cookie)).json();
        if refused("grant edit") {
            assert!(grant["expires_at"].is_null(), "a refused edit set no end: {grant}");
        }
    }
    if refused("policy deletion") && refused("account deletion") {
        checked.push("policy kept");
        let listed = get(&server, "/api/user/policies", Some(&cookie)).json();
        let slug = policy.trim_start_matches("/api/user/policies/");
        assert!(
            listed["policies"].as_array().unwrap().iter().any(|p| p["slug"] == slug),
            "a refused deletion kept the policy: {listed}"
        );
    }
    assert!(
        checked.len() >= 4,
        "only {checked:?} could be checked: the disk refused {:?}",
        attempts.iter().map(|(w, r)| (*w, r.status)).collect::<Vec<_>>()
    );
    server.stop();
}

/// The same on PostgreSQL: the database's tables live in a tablespace on a small tmpfs (its
/// WAL stays on the server's own disk, as on a managed server whose storage fills), which
/// the test fills. PostgreSQL's "could not extend file" (SQLSTATE 53100) is answered as the
/// same 503, signing under an unlimited grant goes on, and writes resume once space is back
/// with every acknowledged one in place.
#[test]
fn on_postgresql_a_full_disk_fails_writes_clearly_and_loses_none_it_acknowledged() {
    let Some(admin) = harness::engine::postgres_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("tablespace"), "24m") else {
        return;
    };
    // The server runs as `postgres`, which must own a tablespace's directory.
    let owned = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&disk.point)
        .output_within(harness::COMMAND_TIMEOUT);
    assert!(owned.status.success(), "{}", String::from_utf8_lossy(&owned.stderr));
    let space = format!("kt_full_{}", std::process::id());
    psql(
        &admin,
        &format!("CREATE TABLESPACE {space} LOCATION '{}'", disk.point.display()),
    );
    let database = harness::engine::PgDatabase::create("disk_full");
    psql(
        &admin,
        &format!("ALTER DATABASE {} SET TABLESPACE {space}", database.name()),
    );

    // Registrations come from many addresses: the per-client limit is not what is tested.
    let server = Launch::new(&dir.path().join("data"))
        .postgres(&database)
        .env("KEYCAST_TRUSTED_PROXY_HOPS", "1")
        .start();
    let registration = |email: &str, i: usize| {
        post(
            &server,
            "/api/auth/register",
            None,
            "application/json",
            &json!({ "email": email, "password": PASSWORD }).to_string(),
            &[("X-Forwarded-For", &format!("10.2.{}.{}", i / 200, i % 200 + 1))],
        )
    };
    let (cookie, _) = register(&server, "alice@example.com", None);
    let app = grant(&server, &cookie, "policy:social");
    let access = app["access_token"].as_str().unwrap().to_owned();
    assert_eq!(signs(&server, &access), 200);

    disk.fill();
    let mut acknowledged = vec!["alice@example.com".to_owned()];
    acknowledged.extend(register_until_refused(registration));
    assert_eq!(signs(&server, &access), 200, "signing only reads: it goes on");
    let authorization = format!("/api/user/authorizations/{}", app["authorization_id"].as_str().unwrap());
    let r = delete(&server, &authorization, &cookie);
    assert!(
        r.status == 204 || (r.status == 503 && r.body.contains("disk is full")),
        "{} {}",
        r.status,
        r.body
    );
    let revoked = r.status == 204;

    disk.free();
    assert_eq!(
        signs(&server, &access),
        if revoked { 401 } else { 200 },
        "the revocation's answer held"
    );
    if !revoked {
        assert_eq!(delete(&server, &authorization, &cookie).status, 204);
        assert_eq!(signs(&server, &access), 401);
    }
    let after = registration("after@example.com", 5000);
    assert_eq!(after.status, 201, "writes resume without a restart: {}", after.body);
    acknowledged.push("after@example.com".to_owned());
    for (i, email) in acknowledged.iter().enumerate() {
        let client = format!("10.3.{}.{}", i / 200, i % 200 + 1);
        let r = harness::flow::login_from(&server, email, PASSWORD, &client);
        assert_eq!(r.status, 200, "{email} was acknowledged but is missing: {}", r.body);
    }
    server.stop();
    drop(database);
    psql(&admin, &format!("DROP TABLESPACE IF EXISTS {space}"));
}
