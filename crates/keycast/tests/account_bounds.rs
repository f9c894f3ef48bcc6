//! One account cannot grow the database without bound, against the real binary on both
//! engines: it has at most `KEYCAST_MAX_GRANTS_PER_ACCOUNT` live grants (each holds a bunker
//! key, a relay subscription and its kept activity), and starts at most 30 grants at once,
//! then one a minute (each consent stores a code). Past the cap, consent and `nostrconnect`
//! say to revoke an app; codes issued before the cap was reached cannot go past it. It keeps
//! its newest 50 sessions, and at most 25 custom policies.
//!
//! Before, a script with one verified account and its session could approve consents and
//! redeem them as fast as keycast answered: a grant per request, for good. On Cloud Run
//! that disk is memory, shared by every account.

mod harness;

use harness::api::*;
use harness::flow::{authorize_query, grant, login_from, pkce, register, token_request};
use harness::{Engine, Keycast, Launch};
use serde_json::json;

const MAX: usize = 3;

/// The consent form's approval, without asserting the answer: `(reply, verifier)`. The
/// session's CSRF token comes from the dashboard (at the cap the consent page has no form).
fn consent(server: &Keycast, cookie: &str) -> (Reply, String) {
    let (challenge, verifier) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let dashboard = get(server, "/dashboard", Some(cookie));
    let csrf = hidden_input(&dashboard.body, "csrf").expect("the dashboard carries the session's CSRF token");
    let mut fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    fields.push(("csrf".into(), csrf));
    fields.push(("decision".into(), "approve".into()));
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    (
        post_form(server, "/api/oauth/authorize", Some(cookie), &pairs),
        verifier,
    )
}

fn code_of(reply: &Reply) -> String {
    assert_eq!(reply.status, 302, "{}", reply.body);
    query_param(reply.location.as_deref().unwrap(), "code").expect("a code")
}

fn nostrconnect(server: &Keycast, cookie: &str) -> Reply {
    let uri = format!(
        "nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cret",
        nostr::Keys::generate().public_key().to_hex()
    );
    post_json(
        server,
        "/api/user/nostrconnect",
        Some(cookie),
        &json!({ "uri": uri, "policy": "social" }),
    )
}

/// How many of the account's grants are live (not revoked).
fn live_grants(server: &Keycast, cookie: &str) -> usize {
    get(server, "/api/user/authorizations", Some(cookie)).json()["authorizations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["revoked_at"].is_null())
        .count()
}

fn one_account_has_at_most_its_live_grants_and_starts_them_at_a_bounded_rate(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_MAX_GRANTS_PER_ACCOUNT", &MAX.to_string())
        .start();
    let (cookie, _) = register(&server, "many@example.com", None);
    let (other, _) = register(&server, "other@example.com", None);
    let grants: Vec<_> = (0..MAX).map(|_| grant(&server, &cookie, "policy:social")).collect();

    // At the cap: the owner is told what to do, on the consent page and over the API.
    let (challenge, _) = pkce();
    let page = get(
        &server,
        &format!("/api/oauth/authorize?{}", authorize_query("policy:social", &challenge)),
        Some(&cookie),
    );
    assert_eq!(page.status, 409, "{}", page.body);
    assert!(
        page.body.contains("revoke") && !page.body.contains("name=\"decision\""),
        "a page saying to revoke an app, with nothing to approve: {}",
        page.body
    );
    let (refused, _) = consent(&server, &cookie);
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        refused.body.contains("revoke"),
        "says to revoke an app: {}",
        refused.body
    );
    let r = nostrconnect(&server, &cookie);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.json()["message"].as_str().unwrap().contains(&format!("{MAX} apps")),
        "{}",
        r.body
    );
    assert_eq!(consent(&server, &other).0.status, 302, "another account counts alone");

    // Revoking one frees its place.
    let revoke = |g: &serde_json::Value| {
        let path = format!("/api/user/authorizations/{}", g["authorization_id"].as_str().unwrap());
        assert_eq!(delete(&server, &path, &cookie).status, 204);
    };
    revoke(&grants[0]);
    revoke(&grants[1]);
    // Two places, three codes: the third redeemed goes past the cap and is refused.
    let codes: Vec<(String, String)> = (0..3)
        .map(|_| {
            let (reply, verifier) = consent(&server, &cookie);
            (code_of(&reply), verifier)
        })
        .collect();
    let answers: Vec<Reply> = codes
        .iter()
        .map(|(code, verifier)| token_request(&server, code, verifier, REDIRECT))
        .collect();
    assert_eq!(answers[0].status, 200, "{}", answers[0].body);
    assert_eq!(answers[1].status, 200, "{}", answers[1].body);
    assert_eq!(answers[2].status, 400, "{}", answers[2].body);
    assert_eq!(answers[2].json()["error"], "invalid_grant", "{}", answers[2].body);
    assert!(
        answers[2].json()["error_description"]
            .as_str()
            .unwrap()
            .contains("revoke"),
        "{}",
        answers[2].body
    );
    let live = live_grants(&server, &cookie);
    assert_eq!(live, MAX);

    // Starting grants is rate-limited per account: 30 at once (this account has asked for
    // 3 + 1 + 1 + 3 so far), then one a minute.
    revoke(&answers[0].json());
    let mut admitted = 0;
    let limited = loop {
        let (reply, _) = consent(&server, &cookie);
        match reply.status {
            302 => admitted += 1,
            _ => break reply,
        }
        assert!(admitted <= 30, "no limit on consents");
    };
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(limited.retry_after.is_some(), "with Retry-After");
    assert!(
        (20..=23).contains(&admitted),
        "{admitted} more consents after 8 (30 at once, one a minute)"
    );
    assert_eq!(consent(&server, &other).0.status, 302, "other accounts go on");
    server.stop();
}

fn create_policy(server: &Keycast, cookie: &str, n: usize) -> Reply {
    post_json(
        server,
        "/api/user/policies",
        Some(cookie),
        &json!({ "name": format!("policy {n}"), "permissions": { "allowed_kinds": [1] } }),
    )
}

/// Sessions: logging in from many addresses (each within its own rate limit) keeps the
/// newest 50 and ends the oldest. Custom policies: 25 at most, and 30 creations at once
/// then one a minute, since a deleted policy stays as a row (its revoked grants name it).
fn an_account_keeps_its_newest_sessions_and_a_bounded_number_of_policies(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_TRUSTED_PROXY_HOPS", "1")
        .start();
    let (first, _) = register(&server, "logins@example.com", None);
    let mut sessions = vec![first];
    for i in 0..50 {
        let client = format!("10.1.{}.{}", i / 200, i % 200 + 1);
        let r = login_from(&server, "logins@example.com", PASSWORD, &client);
        assert_eq!(r.status, 200, "{}", r.body);
        sessions.push(cookie_of(&r));
    }
    let mine = |cookie: &str| get(&server, "/api/user/policies", Some(cookie)).status;
    let newest = sessions.last().unwrap().clone();
    assert_eq!(mine(&newest), 200);
    // Oldest first by the second they began; within one second any may go.
    let live = sessions.iter().filter(|c| mine(c) == 200).count();
    assert_eq!(live, 50, "51 sessions, the newest 50 kept");

    for n in 0..25 {
        let r = create_policy(&server, &newest, n);
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let full = create_policy(&server, &newest, 25);
    assert_eq!(full.status, 409, "{}", full.body);
    assert!(
        full.json()["message"].as_str().unwrap().contains("delete one"),
        "{}",
        full.body
    );
    let slug = get(&server, "/api/user/policies", Some(&newest)).json()["policies"][0]["slug"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        delete(&server, &format!("/api/user/policies/{slug}"), &newest).status,
        204
    );
    assert_eq!(
        create_policy(&server, &newest, 26).status,
        201,
        "a deletion frees a place"
    );
    // 27 creations asked so far: three more are answered (at the cap), then the rate says no.
    for n in 27..30 {
        assert_eq!(create_policy(&server, &newest, n).status, 409);
    }
    let limited = create_policy(&server, &newest, 30);
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(limited.retry_after.is_some());
    // Giving one app its own permissions may make a policy too (kept as a row once the app
    // goes back to a public one): the same budget. Before, edits made them without a limit.
    let app = grant(&server, &newest, "policy:social");
    let edited = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{}", app["authorization_id"].as_str().unwrap()),
        &newest,
        &json!({ "permissions": { "allowed_kinds": [1, 7] } }),
    );
    assert_eq!(edited.status, 429, "{}", edited.body);
    server.stop();
}

/// Edits of a policy or a grant: each is made durable, and tells every instance to drop its
/// cached grants (PostgreSQL). Only creations were limited: a loop of edits wrote to the
/// replica (or flushed every instance's caches) as fast as it could. 30 at once, then one
/// every 10 s, per account.
fn edits_of_policies_and_grants_are_bounded_per_account(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let (cookie, _) = register(&server, "edits@example.com", None);
    let created = create_policy(&server, &cookie, 0);
    assert_eq!(created.status, 201, "{}", created.body);
    let slug = created.json()["slug"].as_str().unwrap().to_owned();
    let app = grant(&server, &cookie, "policy:social");
    let app = app["authorization_id"].as_str().unwrap().to_owned();
    let edit_policy = |n: usize| {
        send_json(
            &server,
            "PUT",
            &format!("/api/user/policies/{slug}"),
            &cookie,
            &json!({ "name": format!("edit {n}"), "permissions": { "allowed_kinds": [1, n] } }),
        )
    };
    let edit_grant = || {
        send_json(
            &server,
            "PATCH",
            &format!("/api/user/authorizations/{app}"),
            &cookie,
            &json!({ "duration": "week" }),
        )
    };
    for n in 0..20 {
        assert_eq!(edit_policy(n).status, 200, "policy edit {n}");
    }
    for n in 0..10 {
        let r = edit_grant();
        assert_eq!(r.status, 200, "grant edit {n}: {}", r.body);
    }
    let limited = edit_policy(99);
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(limited.retry_after.is_some());
    assert_eq!(edit_grant().status, 429, "the same budget");
    let other = register(&server, "other-edits@example.com", None).0;
    assert_eq!(create_policy(&server, &other, 0).status, 201, "other accounts go on");
    server.stop();
}

/// Codes issued below the cap and redeemed all at once: each redemption counts the live
/// grants and inserts one, and on PostgreSQL (READ COMMITTED, several connections) two of
/// them could both count below the cap and both insert. Before, this went past the cap.
fn codes_redeemed_all_at_once_cannot_pass_the_cap(engine: Engine) {
    const CODES: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_MAX_GRANTS_PER_ACCOUNT", &MAX.to_string())
        .start();
    let (cookie, _) = register(&server, "race@example.com", None);
    let codes: Vec<(String, String)> = (0..CODES)
        .map(|_| {
            let (reply, verifier) = consent(&server, &cookie);
            (code_of(&reply), verifier)
        })
        .collect();
    let start = std::sync::Barrier::new(CODES);
    let answers: Vec<Reply> = std::thread::scope(|scope| {
        let redeeming: Vec<_> = codes
            .iter()
            .map(|(code, verifier)| {
                let (server, start) = (&server, &start);
                scope.spawn(move || {
                    start.wait();
                    token_request(server, code, verifier, REDIRECT)
                })
            })
            .collect();
        redeeming.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let granted = answers.iter().filter(|a| a.status == 200).count();
    for refused in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(refused.json()["error"], "invalid_grant", "{}", refused.body);
    }
    let live = live_grants(&server, &cookie);
    assert_eq!((granted, live), (MAX, MAX), "{CODES} codes redeemed at once");
    server.stop();
}

/// Password hashes (and scrypt exports) keycast has started.
fn hashing_jobs(server: &harness::Keycast) -> f64 {
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    harness::metric_sum(&text, "keycast_hashing_jobs_total")
}

/// Each key export and password change is recorded and mailed to the account. With the right
/// password, a loop of them grew the account's events and spent the operator's mail quota —
/// every other account's verification and reset mail with it — without bound.
fn exports_and_password_changes_are_bounded_per_account(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let email = "exports@example.com";
    let (cookie, _) = register(&server, email, None);
    let export = || {
        post_json(
            &server,
            "/api/user/key/export",
            Some(&cookie),
            &json!({ "password": PASSWORD, "format": "nsec" }),
        )
    };
    // Wrong passwords (a stolen session without the password) spend none of the budget:
    // it is taken before the password is hashed, and given back.
    for _ in 0..3 {
        let wrong = post_json(
            &server,
            "/api/user/key/export",
            Some(&cookie),
            &json!({ "password": "not the password", "format": "nsec" }),
        );
        assert_eq!(wrong.status, 401, "{}", wrong.body);
    }
    for n in 0..10 {
        let r = export();
        assert_eq!(r.status, 200, "export {n}: {}", r.body);
    }
    let hashed = hashing_jobs(&server);
    let limited = export();
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(limited.retry_after.is_some());
    let changed = post_json(
        &server,
        "/api/user/password",
        Some(&cookie),
        &json!({ "current_password": PASSWORD, "new_password": "another passphrase" }),
    );
    assert_eq!(changed.status, 429, "the same budget: {}", changed.body);
    // A new key too: each is recorded in the account's events and made durable, and a loop
    // of them with the right password grew the events and filled the hashing queue without
    // bound. Before, it was answered 200 past the budget.
    let replaced = post_json(
        &server,
        "/api/user/key/replace",
        Some(&cookie),
        &json!({ "password": PASSWORD }),
    );
    assert_eq!(replaced.status, 429, "the same budget: {}", replaced.body);
    // Past the budget a right password costs no argon2 work: one account's loop of them,
    // answered 429 only after the hash, held the hashing queue full for everyone (503).
    assert_eq!(
        hashing_jobs(&server),
        hashed,
        "a request past the budget had its password hashed"
    );
    let outbox = get(&server, "/api/test/outbox", None).json();
    let notices = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["to"] == email && m["purpose"] == "key_exported")
        .count();
    assert_eq!(notices, 10);
    server.stop();
}

/// Revoked grants are kept (their record, what a reused code or token names), and an account
/// may start a grant a minute: listed whole, a month of that was tens of thousands of rows,
/// each with its own queries, on every list and dashboard view. The list holds every live
/// grant and the newest 100 revoked ones.
#[test]
fn the_list_of_grants_holds_the_live_ones_and_the_newest_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let (cookie, _) = register(&server, "history@example.com", None);
    let live = grant(&server, &cookie, "policy:social");
    let old = grant(&server, &cookie, "policy:social");
    let old_id = old["authorization_id"].as_str().unwrap().to_owned();
    assert_eq!(
        delete(&server, &format!("/api/user/authorizations/{old_id}"), &cookie).status,
        204
    );
    // 150 more revoked grants, as a month of grant-and-revoke would leave (copies of the
    // revoked one, each with its own id and bunker key, newer than it).
    harness::sqlite_exec(
        &server.data_dir.join("keycast.db"),
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 150) \
             INSERT INTO authorizations (id, user_id, policy_id, client_id, redirect_origin, bunker_pubkey, \
               bunker_secret_encrypted, connect_secret_hash, relays, created_at, revoked_at) \
             SELECT lower(hex(randomblob(16))), user_id, policy_id, client_id, redirect_origin, \
               lower(hex(randomblob(32))), bunker_secret_encrypted, connect_secret_hash, relays, \
               created_at + i, revoked_at FROM authorizations, n WHERE id = '{old_id}'"
        ),
    );
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    let listed = listed["authorizations"].as_array().unwrap();
    let revoked = listed.iter().filter(|a| !a["revoked_at"].is_null()).count();
    assert_eq!(revoked, keycast_db::authz::LISTED_REVOKED as usize);
    assert!(
        listed.iter().any(|a| a["id"] == live["authorization_id"]),
        "every live grant is listed"
    );
    assert!(
        !listed.iter().any(|a| a["id"] == old_id.as_str()),
        "the oldest revoked one is not"
    );
    // Grants that ended by their duration (an hour's grant a minute) are over too, and never
    // revoked: before, every one of them was listed, each with its own queries.
    harness::sqlite_exec(
        &server.data_dir.join("keycast.db"),
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 150) \
         INSERT INTO authorizations (id, user_id, policy_id, client_id, redirect_origin, bunker_pubkey, \
           bunker_secret_encrypted, connect_secret_hash, relays, created_at, terms) \
         SELECT lower(hex(randomblob(16))), user_id, policy_id, client_id, redirect_origin, \
           lower(hex(randomblob(32))), bunker_secret_encrypted, connect_secret_hash, relays, \
           created_at + 1000 + i, '{\"expires_at\":' || (1 + i) || '}' \
         FROM authorizations, n WHERE revoked_at IS NULL",
    );
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    let listed = listed["authorizations"].as_array().unwrap();
    let ended = listed
        .iter()
        .filter(|a| !a["revoked_at"].is_null() || !a["expires_at"].is_null())
        .count();
    assert_eq!(
        ended,
        keycast_db::authz::LISTED_REVOKED as usize,
        "{} listed",
        listed.len()
    );
    assert!(listed.iter().any(|a| a["id"] == live["authorization_id"]));
    assert_eq!(get(&server, "/dashboard", Some(&cookie)).status, 200);
    server.stop();
}

on_both_engines!(
    one_account_has_at_most_its_live_grants_and_starts_them_at_a_bounded_rate,
    an_account_keeps_its_newest_sessions_and_a_bounded_number_of_policies,
    edits_of_policies_and_grants_are_bounded_per_account,
    codes_redeemed_all_at_once_cannot_pass_the_cap,
    exports_and_password_changes_are_bounded_per_account,
);
