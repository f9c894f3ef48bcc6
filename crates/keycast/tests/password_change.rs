//! Changing the password while logged in, against the real binary on both engines: the
//! current password is checked again (with the same backoff as every re-authentication),
//! every session ends (the changer gets a new one), the apps stay, the account is mailed —
//! through the JSON API and the dashboard's form. A reset link outranks it: whoever holds the
//! password cannot keep the mailbox owner from taking the account over.

mod harness;

use harness::api::*;
use harness::flow::{grant, login, register};
use harness::{Engine, Keycast, Launch};
use serde_json::{json, Value};

const NEW_PASSWORD: &str = "a brand new passphrase";

fn change(server: &Keycast, cookie: &str, current: &str, new: &str) -> Reply {
    post_json(
        server,
        "/api/user/password",
        Some(cookie),
        &json!({ "current_password": current, "new_password": new }),
    )
}

fn mails(server: &Keycast, email: &str, purpose: &str) -> Vec<Value> {
    let outbox = get(server, "/api/test/outbox", None).json();
    outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["to"] == email && m["purpose"] == purpose)
        .cloned()
        .collect()
}

fn signs(server: &Keycast, app: &Value) -> u16 {
    let access = app["access_token"].as_str().unwrap();
    rpc(
        server,
        access,
        "sign_event",
        json!([{ "kind": 1, "content": "still here" }]),
    )
    .status
}

fn the_password_changes_other_sessions_end_and_apps_stay(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let email = "alice@example.com";
    let (here, _) = register(&server, email, None);
    let elsewhere = cookie_of(&login(&server, email, PASSWORD));
    let app = grant(&server, &here, "policy:social");

    // Bad input: a clear error, nothing changed.
    let r = change(&server, &here, PASSWORD, "short");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["message"].as_str().unwrap().contains("8"), "{}", r.body);
    let r = change(&server, &here, "not my password", NEW_PASSWORD);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "unauthorized", "{}", r.body);
    let r = post_json(
        &server,
        "/api/user/password",
        None,
        &json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
    );
    assert_eq!(r.status, 401, "a session is needed: {}", r.body);
    assert_eq!(login(&server, email, PASSWORD).status, 200, "unchanged so far");

    let r = change(&server, &here, PASSWORD, NEW_PASSWORD);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["other_sessions_ended"],
        2,
        "the other login and the one just made: {}",
        r.body
    );
    let renewed = cookie_of(&r);
    assert_eq!(
        get(&server, "/api/user/key", Some(&here)).status,
        401,
        "the changer's old cookie ends too: whoever shares it is out"
    );
    assert_eq!(
        get(&server, "/api/user/key", Some(&renewed)).status,
        200,
        "the changer carries on with a new session"
    );
    assert_eq!(
        get(&server, "/api/user/key", Some(&elsewhere)).status,
        401,
        "another one ends"
    );
    assert_eq!(login(&server, email, PASSWORD).status, 401, "the old password is gone");
    let fresh = login(&server, email, NEW_PASSWORD);
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    assert_eq!(signs(&server, &app), 200, "apps stay authorized");
    let notices = mails(&server, email, "password_changed");
    assert_eq!(notices.len(), 1, "mailed once");
    assert!(
        notices[0]["body"].as_str().unwrap().contains("/forgot-password"),
        "{}",
        notices[0]
    );
    let dashboard = get(&server, "/dashboard", Some(&renewed)).body;
    assert!(dashboard.contains("password changed"), "recorded: {dashboard}");

    // The dashboard's form does the same, behind its CSRF token.
    let csrf = hidden_input(&dashboard, "csrf").unwrap();
    let fields = [
        ("csrf", csrf.as_str()),
        ("current_password", NEW_PASSWORD),
        ("new_password", "yet another passphrase"),
    ];
    let forged = [("csrf", "wrong"), fields[1], fields[2]];
    let r = post_form(&server, "/dashboard/password", Some(&renewed), &forged);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post_form(&server, "/dashboard/password", Some(&renewed), &fields);
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.location.as_deref(), Some("/dashboard?sent=password"));
    let again = cookie_of(&r);
    let page = get(&server, "/dashboard?sent=password", Some(&again)).body;
    assert!(page.contains("Your password is changed"), "{page}");
    assert_eq!(get(&server, "/api/user/key", Some(&renewed)).status, 401);
    assert_eq!(login(&server, email, "yet another passphrase").status, 200);
    let csrf = hidden_input(&page, "csrf").unwrap();
    let wrong = [
        ("csrf", csrf.as_str()),
        ("current_password", "nope"),
        ("new_password", "and one more passphrase"),
    ];
    let r = post_form(&server, "/dashboard/password", Some(&again), &wrong);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.body.contains("<html") && r.body.contains("wrong password"),
        "{}",
        r.body
    );
}

fn guessing_the_current_password_is_slowed_down(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let (cookie, _) = register(&server, "bob@example.com", None);
    let statuses: Vec<u16> = (0..8)
        .map(|i| change(&server, &cookie, &format!("guess number {i}"), NEW_PASSWORD).status)
        .collect();
    let slowed = statuses.iter().position(|s| *s == 429);
    assert!(slowed.is_some_and(|at| at >= 5), "{statuses:?}");
    let r = change(&server, &cookie, PASSWORD, NEW_PASSWORD);
    assert_eq!(r.status, 429, "even the right one waits: {}", r.body);
    assert!(r.retry_after.is_some(), "{}", r.body);
    assert_eq!(
        login(&server, "bob@example.com", PASSWORD).status,
        429,
        "the guesses count against logging in from the same client too"
    );
}

/// The same guesses sent all at once. Each took the backoff's check before any had failed
/// (hashing takes a while), so forty at once were forty guesses, and again whenever the
/// backoff ended: about 70 times the guessing rate the backoff allows. A try now counts as
/// it starts.
fn guesses_sent_at_once_are_slowed_down_too(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let (cookie, _) = register(&server, "carol@example.com", None);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let guesses: Vec<_> = (0..40)
            .map(|i| {
                let (server, cookie) = (&server, &cookie);
                scope.spawn(move || change(server, cookie, &format!("guess number {i}"), NEW_PASSWORD).status)
            })
            .collect();
        guesses.into_iter().map(|g| g.join().unwrap()).collect()
    });
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert!(
        checked <= keycast_http::limit::FREE_FAILURES as usize + 1,
        "{checked} guesses checked of 40 sent at once: {statuses:?}"
    );
    assert!(statuses.iter().all(|s| [401, 429].contains(s)), "{statuses:?}");
}

/// Whoever holds an account's password — a squatter who registered the owner's address, or
/// someone the password leaked to — changes it while the mailbox owner resets it. Before, each
/// change used up every reset link out: changing it in a loop kept the owner from ever taking
/// the account over.
fn a_password_change_cannot_keep_the_mailbox_owner_from_resetting(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let email = "owner@example.org";
    let (squatter, _) = harness::flow::register_unverified(&server, email, None);
    let asked = post_json(&server, "/api/auth/forgot-password", None, &json!({ "email": email }));
    assert_eq!(asked.status, 202, "{}", asked.body);
    let link = harness::flow::mailed_token(&server, email, "reset_password");
    let changed = change(&server, &squatter, PASSWORD, NEW_PASSWORD);
    assert_eq!(changed.status, 200, "{}", changed.body);
    let squatter = cookie_of(&changed);

    let reset = post_json(
        &server,
        "/api/auth/reset-password",
        None,
        &json!({ "token": link, "password": "the owner's own passphrase" }),
    );
    assert_eq!(reset.status, 200, "the owner's link still works: {}", reset.body);
    assert_eq!(
        get(&server, "/api/user/key", Some(&squatter)).status,
        401,
        "the take-over ends the changer's session"
    );
    assert_eq!(login(&server, email, NEW_PASSWORD).status, 401);
    assert_eq!(login(&server, email, "the owner's own passphrase").status, 200);
}

on_both_engines!(
    the_password_changes_other_sessions_end_and_apps_stay,
    a_password_change_cannot_keep_the_mailbox_owner_from_resetting,
    guessing_the_current_password_is_slowed_down,
    guesses_sent_at_once_are_slowed_down_too,
);
