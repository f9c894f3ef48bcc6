//! Deleting one's account, against the real binary on both engines: the password is checked
//! again; then every app is disconnected on both transports' credentials, every session
//! ends, the key and everything under the account leave the database, the NIP-05 name and
//! the address are free again, and the address is mailed. Another user's service carries
//! on, their activity still recorded although the deleted account's last signatures were
//! still buffered. Through the JSON API and the dashboard's form; and by the operator,
//! through the admin API, for an owner who lost both password and mailbox.

mod harness;

use std::time::Duration;

use harness::api::*;
use harness::flow::{grant, login, register};
use harness::nostr::BunkerClient;
use harness::{Engine, Keycast, Launch};
use serde_json::{json, Value};

fn sign(server: &Keycast, app: &Value, content: &str) -> Reply {
    let access = app["access_token"].as_str().unwrap();
    rpc(server, access, "sign_event", json!([{ "kind": 1, "content": content }]))
}

fn delete_account(server: &Keycast, cookie: &str, password: &str) -> Reply {
    post_json(
        server,
        "/api/user/delete",
        Some(cookie),
        &json!({ "password": password }),
    )
}

fn mailed(server: &Keycast, email: &str, purpose: &str) -> usize {
    get(server, "/api/test/outbox", None).json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["to"] == email && m["purpose"] == purpose)
        .count()
}

/// Waits until `cookie`'s activity lists a signature with `content`'s app — activity is
/// buffered and written about once a second.
fn activity_recorded(server: &Keycast, cookie: &str, authorization: &str) -> bool {
    (0..60).any(|_| {
        let a = get(server, "/api/user/activity", Some(cookie)).json();
        let found = a["activity"]
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["authorization_id"] == authorization));
        if !found {
            std::thread::sleep(Duration::from_millis(100));
        }
        found
    })
}

fn an_account_is_deleted_with_its_key_and_everything_under_it(engine: Engine) {
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Launch::on(engine, &data).start();
    let email = "alice@example.com";
    let (cookie, registered) = register(&server, email, None);
    let user_id = registered["user_id"].as_str().unwrap().to_owned();
    let pubkey = registered["pubkey"].as_str().unwrap().to_owned();
    let elsewhere = cookie_of(&login(&server, email, PASSWORD));
    let claimed = post_json(
        &server,
        "/api/user/username",
        Some(&cookie),
        &json!({ "username": "alice" }),
    );
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    let policy = post_json(
        &server,
        "/api/user/policies",
        Some(&cookie),
        &json!({ "name": "Mine", "permissions": { "allowed_kinds": [1] } }),
    );
    assert_eq!(policy.status, 201, "{}", policy.body);
    let app = grant(&server, &cookie, "policy:social");
    let connected = nip46.connect(app["bunker_url"].as_str().unwrap());
    assert_eq!(connected["ok"], true, "{connected}");
    let (bob, _) = register(&server, "bob@example.com", None);
    let bobs_app = grant(&server, &bob, "policy:social");

    // A wrong password deletes nothing.
    let r = delete_account(&server, &cookie, "not my password");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(sign(&server, &app, "before").status, 200);
    let remote = nip46.sign_event(json!({"kind": 1, "content": "before"}));
    assert_eq!(remote["ok"], true, "{remote}");

    // The app's last signature is still in the activity buffer when the account goes.
    assert_eq!(sign(&server, &app, "last words").status, 200);
    let r = delete_account(&server, &cookie, PASSWORD);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        r.set_cookie.as_deref().is_some_and(|c| c.contains("Max-Age=0")),
        "the session cookie is cleared: {:?}",
        r.set_cookie
    );

    let r = sign(&server, &app, "after");
    assert_eq!(r.status, 401, "the app is disconnected: {}", r.body);
    let remote = nip46.call(json!({"op": "sign_event", "event": {"kind": 1, "content": "after"}, "timeout_ms": 3000}));
    // Silent, not "unknown token": its subscription ended with the revocation (a reply
    // would need the bunker's key, deleted with the account).
    assert_eq!(remote["error"], "timeout", "the bunker no longer serves: {remote}");
    assert_eq!(get(&server, "/api/user/key", Some(&cookie)).status, 401);
    assert_eq!(get(&server, "/api/user/key", Some(&elsewhere)).status, 401);
    assert_eq!(login(&server, email, PASSWORD).status, 401);
    let names = get(&server, "/.well-known/nostr.json?name=alice", None).json();
    assert_eq!(names["names"], json!({}), "the name is free: {names}");
    assert_eq!(mailed(&server, email, "account_deleted"), 1);
    let logged = server.log();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("account deleted") && l.contains(&user_id)),
        "the deletion is logged with the user id, for a recovery to before it:\n{logged}"
    );
    if engine == Engine::Sqlite {
        let db = data.join("keycast.db");
        for table in [
            "users WHERE id",
            "keys WHERE user_id",
            "authorizations WHERE user_id",
            "policies WHERE owner_user_id",
        ] {
            let left = harness::sqlite_query(&db, &format!("SELECT COUNT(*) FROM {table} = '{user_id}'"));
            assert_eq!(left.trim(), "0", "{table}");
        }
    }

    // Bob carries on: his activity is recorded although Alice's last one could not be.
    assert_eq!(sign(&server, &bobs_app, "still here").status, 200);
    let bobs_id = bobs_app["authorization_id"].as_str().unwrap();
    assert!(activity_recorded(&server, &bob, bobs_id), "bob's activity is written");

    // The address is free: a new account with a new key.
    let again = post_json(
        &server,
        "/api/auth/register",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    );
    assert_eq!(again.status, 201, "{}", again.body);
    assert_ne!(again.json()["pubkey"], pubkey.as_str(), "{}", again.body);
}

fn the_dashboard_deletes_the_account_behind_its_password_and_csrf_token(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let email = "carol@example.com";
    let (cookie, _) = register(&server, email, None);
    let dashboard = get(&server, "/dashboard", Some(&cookie)).body;
    assert!(dashboard.contains("action=\"/dashboard/delete\""), "{dashboard}");
    let csrf = hidden_input(&dashboard, "csrf").unwrap();

    let r = post_form(
        &server,
        "/dashboard/delete",
        Some(&cookie),
        &[("csrf", "wrong"), ("password", PASSWORD)],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post_form(
        &server,
        "/dashboard/delete",
        Some(&cookie),
        &[("csrf", &csrf), ("password", "nope")],
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("<html"), "an HTML page: {}", r.body);
    assert_eq!(login(&server, email, PASSWORD).status, 200, "still there");

    let r = post_form(
        &server,
        "/dashboard/delete",
        Some(&cookie),
        &[("csrf", &csrf), ("password", PASSWORD)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Your account is deleted"), "{}", r.body);
    assert!(r.set_cookie.as_deref().is_some_and(|c| c.contains("Max-Age=0")));
    assert_eq!(login(&server, email, PASSWORD).status, 401);
    let r = get(&server, "/dashboard", Some(&cookie));
    assert_eq!(r.status, 303, "back to the login page: {}", r.body);
}

const ADMIN_TOKEN: &str = "an-operator-token-of-at-least-32-characters";

fn lookup(server: &Keycast, token: Option<&str>, by: Value) -> Reply {
    admin(server, "POST", "/api/admin/users/lookup", token, Some(&by))
}

fn an_operator_finds_and_deletes_an_account_through_the_admin_api(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_ADMIN_TOKEN", ADMIN_TOKEN)
        .start();
    let email = "dave@example.com";
    let (cookie, registered) = register(&server, email, None);
    let user_id = registered["user_id"].as_str().unwrap().to_owned();
    let claimed = post_json(
        &server,
        "/api/user/username",
        Some(&cookie),
        &json!({ "username": "dave" }),
    );
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    let app = grant(&server, &cookie, "policy:social");
    let (erin, _) = register(&server, "erin@example.com", None);
    let erins_app = grant(&server, &erin, "policy:social");

    // Only the operator's token opens it.
    for token in [
        None,
        Some("not-the-operator-token"),
        Some(app["access_token"].as_str().unwrap()),
    ] {
        let r = lookup(&server, token, json!({ "email": email }));
        assert_eq!(r.status, 401, "{token:?}: {}", r.body);
        let r = admin(&server, "DELETE", &format!("/api/admin/users/{user_id}"), token, None);
        assert_eq!(r.status, 401, "{token:?}: {}", r.body);
    }
    assert_eq!(sign(&server, &app, "still mine").status, 200);

    // Found by any of its names, as the operator may be told it.
    let found = lookup(&server, Some(ADMIN_TOKEN), json!({ "email": " Dave@Example.com " }));
    assert_eq!(found.status, 200, "{}", found.body);
    let account = found.json();
    assert_eq!(account["user_id"], user_id.as_str(), "{account}");
    assert_eq!(account["pubkey"], registered["pubkey"], "{account}");
    assert_eq!(account["username"], "dave", "{account}");
    assert_eq!(account["live_authorizations"], 1, "{account}");
    assert!(!found.body.contains("argon2"), "no password hash: {}", found.body);
    for by in [
        json!({ "user_id": user_id }),
        json!({ "username": "DAVE" }),
        json!({ "pubkey": registered["pubkey"] }),
        json!({ "pubkey": account["npub"] }),
    ] {
        let r = lookup(&server, Some(ADMIN_TOKEN), by.clone());
        assert_eq!(r.status, 200, "{by}: {}", r.body);
        assert_eq!(r.json()["user_id"], user_id.as_str(), "{by}");
    }
    for (by, status) in [
        (json!({}), 400),
        (json!({ "email": email, "username": "dave" }), 400),
        (json!({ "pubkey": "npub1notakey" }), 400),
        (json!({ "email": "nobody@example.com" }), 404),
    ] {
        let r = lookup(&server, Some(ADMIN_TOKEN), by.clone());
        assert_eq!(r.status, status, "{by}: {}", r.body);
        assert!(r.json()["error"].is_string(), "a JSON error: {}", r.body);
    }

    let r = admin(
        &server,
        "DELETE",
        &format!("/api/admin/users/{user_id}"),
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(sign(&server, &app, "after").status, 401, "the app is disconnected");
    assert_eq!(
        get(&server, "/api/user/key", Some(&cookie)).status,
        401,
        "the session ended"
    );
    assert_eq!(login(&server, email, PASSWORD).status, 401);
    assert_eq!(
        lookup(&server, Some(ADMIN_TOKEN), json!({ "user_id": user_id })).status,
        404
    );
    let again = admin(
        &server,
        "DELETE",
        &format!("/api/admin/users/{user_id}"),
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(again.status, 404, "{}", again.body);
    let mails = get(&server, "/api/test/outbox", None).json();
    let notice = mails["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["to"] == email && m["purpose"] == "account_deleted")
        .unwrap_or_else(|| panic!("the address is mailed: {mails}"));
    assert!(notice["body"].as_str().unwrap().contains("operator"), "{notice}");
    let logged = server.log();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("account deleted") && l.contains(&user_id) && l.contains("operator")),
        "the deletion is logged with the user id and who did it:\n{logged}"
    );
    assert_eq!(sign(&server, &erins_app, "unaffected").status, 200);
}

on_both_engines!(
    an_account_is_deleted_with_its_key_and_everything_under_it,
    the_dashboard_deletes_the_account_behind_its_password_and_csrf_token,
    an_operator_finds_and_deletes_an_account_through_the_admin_api,
);
