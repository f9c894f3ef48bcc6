//! Pre-registration hijacking (issue 12, item 1), as the attacker and the victim meet the
//! real binary: someone registers the victim's address first, with a key they hold; until
//! the mailbox owner proves control, the account can do nothing that outlives a take-over,
//! and the take-over (a password reset) ends everything the registrant set up and says the
//! key is compromised. Every key export is recorded and mailed.

mod harness;

use harness::api::*;
use harness::flow::{grant, login, mailed_token, register, register_unverified};
use harness::{Keycast, Launch};
use nostr::nips::nip19::ToBech32;
use nostr::Keys;
use serde_json::{json, Value};

fn start() -> (tempfile::TempDir, Keycast) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    (dir, server)
}

fn export(server: &Keycast, cookie: &str, password: &str) -> Reply {
    post_json(
        server,
        "/api/user/key/export",
        Some(cookie),
        &json!({ "password": password, "format": "nsec" }),
    )
}

/// The victim asks for a reset link and uses it: what the mailbox owner can always do.
fn reset(server: &Keycast, email: &str, new_password: &str) {
    let asked = post_json(server, "/api/auth/forgot-password", None, &json!({ "email": email }));
    assert_eq!(asked.status, 202, "{}", asked.body);
    let token = mailed_token(server, email, "reset_password");
    let body = json!({ "token": token, "password": new_password });
    let done = post_json(server, "/api/auth/reset-password", None, &body);
    assert_eq!(done.status, 200, "{}", done.body);
}

#[test]
fn a_pre_registered_account_gives_its_registrant_nothing_that_outlives_the_mailbox_owner() {
    let (_dir, server) = start();
    let victim = "victim@example.org";
    let planted = Keys::generate();
    let nsec = planted.secret_key().to_bech32().unwrap();
    let (attacker, _) = register_unverified(&server, victim, Some(&nsec));

    // What the registrant tries before anyone has proved they own the mailbox.
    let exported = export(&server, &attacker, PASSWORD);
    assert_eq!(
        exported.status, 403,
        "export of an unverified account: {}",
        exported.body
    );
    assert!(exported.body.contains("confirm your email"), "{}", exported.body);
    let (challenge, _) = harness::flow::pkce();
    let mut approval: Value =
        url::form_urlencoded::parse(harness::flow::authorize_query("policy:full", &challenge).as_bytes())
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect::<serde_json::Map<_, _>>()
            .into();
    approval["approved"] = json!(true);
    let approved = post(
        &server,
        "/api/oauth/authorize",
        Some(&attacker),
        "application/json",
        &approval.to_string(),
        &[("Origin", &server.base)],
    );
    assert_eq!(
        approved.status, 403,
        "an app approved by an unverified account: {}",
        approved.body
    );
    let consent = get(
        &server,
        &format!(
            "/api/oauth/authorize?{}",
            harness::flow::authorize_query("policy:full", &challenge)
        ),
        Some(&attacker),
    );
    assert!(consent.body.contains("Confirm your email first"), "{}", consent.body);
    assert!(
        hidden_input(&consent.body, "csrf").is_none(),
        "no approve form: {}",
        consent.body
    );
    let nostrconnect = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&attacker),
        &json!({
            "uri": format!("nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cret", Keys::generate().public_key().to_hex()),
            "policy": "full",
        }),
    );
    assert_eq!(nostrconnect.status, 403, "{}", nostrconnect.body);
    let name = post_json(
        &server,
        "/api/user/username",
        Some(&attacker),
        &json!({ "username": "victim" }),
    );
    assert_eq!(
        name.status, 403,
        "a NIP-05 name for an unverified account: {}",
        name.body
    );

    // The victim clicks the verification link they never asked for: without the password
    // (which only the registrant knows) it confirms nothing, and the registrant gains nothing.
    let token = mailed_token(&server, victim, "verify_email");
    let clicked = post_form(&server, "/verify-email", None, &[("token", &token), ("password", "")]);
    assert_eq!(clicked.status, 401, "{}", clicked.body);
    assert!(clicked.body.contains("Forgot your password"), "{}", clicked.body);
    assert_eq!(export(&server, &attacker, PASSWORD).status, 403);

    // The victim takes the account over with a password reset.
    reset(&server, victim, "the victim's own password");
    assert_eq!(
        get(&server, "/api/user/key", Some(&attacker)).status,
        401,
        "registrant's session ended"
    );
    assert_eq!(
        login(&server, victim, PASSWORD).status,
        401,
        "registrant's password is gone"
    );
    let owner = login(&server, victim, "the victim's own password");
    assert_eq!(owner.status, 200, "{}", owner.body);
    assert_eq!(
        owner.json()["email_verified"],
        true,
        "the reset link proved the mailbox"
    );
    let cookie = cookie_of(&owner);

    // …and is told the key is the registrant's, with a way to start fresh.
    let key = get(&server, "/api/user/key", Some(&cookie)).json();
    assert_eq!(key["pubkey"], planted.public_key().to_hex());
    assert_eq!(key["exposure"]["reason"], "imported_before_verification", "{key}");
    let dashboard = get(&server, "/dashboard", Some(&cookie));
    assert!(
        dashboard.body.contains("Your key may be known to someone else"),
        "{}",
        dashboard.body
    );
    let csrf = hidden_input(&dashboard.body, "csrf").unwrap();
    let fresh = post_form(
        &server,
        "/dashboard/key/replace",
        Some(&cookie),
        &[("csrf", &csrf), ("password", "the victim's own password")],
    );
    assert_eq!(fresh.status, 303, "{}", fresh.body);
    let key = get(&server, "/api/user/key", Some(&cookie)).json();
    assert_ne!(key["pubkey"], planted.public_key().to_hex(), "a new key");
    assert_eq!(key["exposure"], Value::Null, "{key}");
    let dashboard = get(&server, "/dashboard", Some(&cookie));
    assert!(!dashboard.body.contains("Your key may be known to someone else"));
    assert!(
        dashboard.body.contains("key replaced"),
        "the account's events are listed"
    );
}

#[test]
fn every_export_is_recorded_and_mailed_and_a_reset_revokes_what_the_password_holder_set_up() {
    let (_dir, server) = start();
    let email = "owner@example.org";
    let (cookie, _) = register(&server, email, None);
    let token = grant(&server, &cookie, "policy:full")["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(rpc(&server, &token, "get_public_key", json!([])).status, 200);

    // Someone with the password (and a session) exports the key.
    let exported = export(&server, &cookie, PASSWORD);
    assert_eq!(exported.status, 200, "{}", exported.body);
    assert!(exported.json()["key"].as_str().unwrap().starts_with("nsec1"));
    let activity = get(&server, "/api/user/activity", Some(&cookie)).json();
    let events: Vec<&Value> = activity["account"].as_array().unwrap().iter().collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "key_exported" && e["detail"] == "nsec"),
        "{activity}"
    );
    let outbox = get(&server, "/api/test/outbox", None).json();
    let notice = outbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["to"] == email && m["purpose"] == "key_exported")
        .unwrap_or_else(|| panic!("no export notice mailed: {outbox}"));
    assert!(
        notice["body"].as_str().unwrap().contains("was exported (nsec)"),
        "{notice}"
    );

    // The owner resets the password: the app the password holder approved stops signing,
    // and the exported key is flagged.
    reset(&server, email, "a new password, mine");
    let refused = rpc(&server, &token, "get_public_key", json!([]));
    assert_eq!(
        refused.status, 401,
        "an authorization survived the reset: {}",
        refused.body
    );
    let owner = cookie_of(&login(&server, email, "a new password, mine"));
    let key = get(&server, "/api/user/key", Some(&owner)).json();
    assert_eq!(key["exposure"]["reason"], "exported", "{key}");
    let list = get(&server, "/api/user/authorizations", Some(&owner)).json();
    assert!(
        list["authorizations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| !a["revoked_at"].is_null()),
        "{list}"
    );
    // The owner who exported it themselves may keep the key.
    let dismissed = delete(&server, "/api/user/key/exposure", &owner);
    assert_eq!(dismissed.status, 204, "{}", dismissed.body);
    assert_eq!(
        get(&server, "/api/user/key", Some(&owner)).json()["exposure"],
        Value::Null
    );
}

#[test]
fn the_development_outbox_prints_the_verification_link_so_one_machine_runs_the_whole_flow() {
    let (_dir, server) = start();
    let email = "solo@example.org";
    register_unverified(&server, email, None);
    let token = mailed_token(&server, email, "verify_email");
    wait_for_log(&server, &format!("/verify-email#token={token}"));
    // A reset link never is: it alone would take the account over.
    post_json(&server, "/api/auth/forgot-password", None, &json!({ "email": email }));
    let reset = mailed_token(&server, email, "reset_password");
    wait_for_log(&server, "Reset your keycast password");
    assert!(!server.log().contains(&reset), "a reset token reached the log");
}

fn wait_for_log(server: &Keycast, text: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server.log().contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "{text:?} is not in the log:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whoever held the password approved an app and kept its authorization code unredeemed (a
/// code lives 10 minutes, and a fresh one is a consent away). A reset revokes every grant the
/// account has; the code must not become a new one after it. Before, it did: a live grant on
/// the owner's key for the previous holder, after the owner had taken the account back.
#[test]
fn a_code_issued_before_a_reset_cannot_be_redeemed_after_it() {
    let (_dir, server) = start();
    let email = "pending@example.org";
    let (cookie, _) = register(&server, email, None);
    let (challenge, verifier) = harness::flow::pkce();
    let code = harness::flow::approve(
        &server,
        &cookie,
        &harness::flow::authorize_query("policy:full", &challenge),
    );

    reset(&server, email, "a new password, mine");
    let redeemed = harness::flow::token_request(&server, &code, &verifier, harness::api::REDIRECT);
    assert_eq!(
        redeemed.status, 400,
        "a code from before the reset became a grant: {}",
        redeemed.body
    );
    assert_eq!(redeemed.json()["error"], "invalid_grant", "{}", redeemed.body);
}

/// A login with the password holder's password, still being checked when the mailbox owner
/// resets it (the hashing queue and argon2 take a while; whoever holds the password can keep
/// logins under way from many addresses). Before, the login opened its session after the
/// reset had ended the others, and that session lived on under the new password, able to
/// approve apps as the owner. Now a session opens only while the password it checked is still
/// the account's; the same holds against a password change.
#[test]
fn a_login_still_checking_a_password_that_is_then_replaced_opens_no_session() {
    let (_dir, server) = start();
    let email = "racing@example.com";
    register_unverified(&server, email, None);
    // Each login is held 1.5 s between its password check and its session.
    if !harness::arm_failpoint(&server, "login-after-password-check", "return(1500)") {
        return;
    }
    let racing = |password: &str, replace: &dyn Fn()| {
        std::thread::scope(|scope| {
            let held = server.held_count("login-after-password-check");
            let login = scope.spawn(|| login(&server, email, password));
            server.wait_until_held("login-after-password-check", held + 1);
            replace();
            let login = login.join().unwrap();
            let still = (login.status == 200).then(|| get(&server, "/api/user/key", Some(&cookie_of(&login))).status);
            (login.status, still)
        })
    };

    let reset_meanwhile = racing(PASSWORD, &|| reset(&server, email, "the mailbox owner's own"));
    assert_eq!(
        reset_meanwhile,
        (401, None),
        "(the login's status, and what its session gets) when a reset replaced the password it checked"
    );

    let owner = login(&server, email, "the mailbox owner's own");
    assert_eq!(owner.status, 200, "{}", owner.body);
    let owners = cookie_of(&owner);
    let changed_meanwhile = racing("the mailbox owner's own", &|| {
        let body = json!({ "current_password": "the mailbox owner's own", "new_password": "changed once more" });
        let changed = post_json(&server, "/api/user/password", Some(&owners), &body);
        assert_eq!(changed.status, 200, "{}", changed.body);
    });
    assert_eq!(
        changed_meanwhile,
        (401, None),
        "(the login's status, and what its session gets) when a change replaced the password it checked"
    );
}

/// Whoever holds the password keeps `nostrconnect://` acceptances under way, each held by the
/// DNS of a relay name they run (a fail point holds it here), and lets one go on once the
/// mailbox owner has reset the password. Before, the acceptance wrote its grant after the
/// reset had revoked the others: a live bunker for the password holder's app on the
/// owner's account. Now a grant is written only while the session that asked for it is live.
#[test]
fn a_grant_under_way_when_the_password_is_reset_is_never_written() {
    let (_dir, server) = start();
    let email = "pending@example.com";
    let (holder, _) = register(&server, email, None);
    if !harness::arm_failpoint(&server, "nostrconnect-before-grant", "return(1500)") {
        return;
    }
    let held = server.held_count("nostrconnect-before-grant");
    let pending = std::thread::scope(|scope| {
        let pending = scope.spawn(|| {
            post_json(
                &server,
                "/api/user/nostrconnect",
                Some(&holder),
                &json!({
                    "uri": format!("nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cret", Keys::generate().public_key().to_hex()),
                    "policy": "full",
                }),
            )
        });
        server.wait_until_held("nostrconnect-before-grant", held + 1);
        reset(&server, email, "the mailbox owner's own");
        pending.join().unwrap()
    });
    assert_eq!(pending.status, 401, "{}", pending.body);
    let owner = login(&server, email, "the mailbox owner's own");
    assert_eq!(owner.status, 200, "{}", owner.body);
    let live = live_grants(&server, &cookie_of(&owner));
    assert!(live.is_empty(), "grants live after the reset: {live:?}");
}

/// The password holder's grant checked its session, then waited (a slow database, a busy
/// instance) while the mailbox owner reset the password: the consent's code, or the
/// `nostrconnect://` grant, was written after the reset had ended every session and revoked
/// every grant, and the holder kept an app signing for the owner. Now the write itself is
/// conditional on the session (on PostgreSQL under the account's lock).
fn a_grant_whose_session_a_reset_ended_after_its_check_is_never_written(fail_point: &str) {
    let (_dir, server) = start();
    let email = format!("{fail_point}@example.com");
    let (holder, _) = register(&server, &email, None);
    if !harness::arm_failpoint(&server, fail_point, "1*return(1500)") {
        return;
    }
    let held = server.held_count(fail_point);
    let (challenge, verifier) = harness::flow::pkce();
    let query = harness::flow::authorize_query("policy:full", &challenge);
    let pending = std::thread::scope(|scope| {
        let pending = scope.spawn(|| match fail_point {
            "consent-after-session-check" => harness::flow::consent(&server, &holder, &query, &[]),
            _ => post_json(
                &server,
                "/api/user/nostrconnect",
                Some(&holder),
                &json!({
                    "uri": format!("nostrconnect://{}?relay=ws%3A%2F%2F127.0.0.1%3A9&secret=s3cret", Keys::generate().public_key().to_hex()),
                    "policy": "full",
                }),
            ),
        });
        server.wait_until_held(fail_point, held + 1);
        reset(&server, &email, "the mailbox owner's own");
        pending.join().unwrap()
    });
    if let Some(code) = pending.location.as_deref().and_then(|l| query_param(l, "code")) {
        // What the holder does with a code it was given: exchange it.
        let exchanged = harness::flow::token_request(&server, &code, &verifier, REDIRECT);
        eprintln!("the holder's code exchanged: {}", exchanged.status);
    }
    let owner = login(&server, &email, "the mailbox owner's own");
    assert_eq!(owner.status, 200, "{}", owner.body);
    let live = live_grants(&server, &cookie_of(&owner));
    assert!(live.is_empty(), "grants live after the reset: {live:?}");
    assert_eq!(pending.status, 401, "{}", pending.body);
}

#[test]
fn a_consent_whose_session_a_reset_ended_after_its_check_writes_no_code() {
    a_grant_whose_session_a_reset_ended_after_its_check_is_never_written("consent-after-session-check");
}

#[test]
fn a_nostrconnect_acceptance_whose_session_a_reset_ended_after_its_check_writes_no_grant() {
    a_grant_whose_session_a_reset_ended_after_its_check_is_never_written("nostrconnect-after-session-check");
}

/// An export records the key as exported, then reads the key to hand it out. A key
/// replacement in between (the owner starting fresh) cleared that record with the old key,
/// and the export handed out the new key, recorded nowhere: the dashboard never said the new
/// key had left keycast, and a later take-over would not mark it exposed. Now an export hands
/// out only the key it recorded (409 otherwise: nothing exported).
#[test]
fn an_export_racing_a_key_replacement_hands_out_only_the_key_it_recorded() {
    let (_dir, server) = start();
    let (cookie, _) = register(&server, "racing-export@example.com", None);
    let before = get(&server, "/api/user/key", Some(&cookie)).json()["pubkey"].clone();
    if !harness::arm_failpoint(&server, "export-after-record", "1*return(3000)") {
        return;
    }
    let held = server.held_count("export-after-record");
    let (exported, replaced) = std::thread::scope(|scope| {
        let exporting = scope.spawn(|| export(&server, &cookie, PASSWORD));
        server.wait_until_held("export-after-record", held + 1);
        let replaced = post_json(
            &server,
            "/api/user/key/replace",
            Some(&cookie),
            &json!({ "password": PASSWORD }),
        );
        (exporting.join().unwrap(), replaced)
    });
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    let after = replaced.json()["pubkey"].clone();
    assert_ne!(before, after);
    // The replacement was answered while the export was held, so the key the export reads
    // is the new one, which it never recorded.
    assert_eq!(exported.status, 409, "{}", exported.body);
    let activity = get(&server, "/api/user/activity", Some(&cookie)).json();
    assert!(
        activity["account"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "key_export_abandoned"),
        "the account's record says the export did not happen: {activity}"
    );
}

/// Whoever holds the password changes it while the mailbox owner resets it: the change was
/// checked against the old password, then waited (the hashing queue) while the reset took
/// the account over. Before, the change then wrote its password over the owner's and opened
/// a session under it: the owner was locked out again. Now a change writes only while the
/// password it checked is still the account's.
#[test]
fn a_password_change_checked_before_a_reset_does_not_outlive_it() {
    let (_dir, server) = start();
    let email = "changing@example.com";
    let (holder, _) = register(&server, email, None);
    if !harness::arm_failpoint(&server, "password-change-before-store", "1*return(1500)") {
        return;
    }
    let held = server.held_count("password-change-before-store");
    let changed = std::thread::scope(|scope| {
        let changing = scope.spawn(|| {
            let body = json!({ "current_password": PASSWORD, "new_password": "the holder's new one" });
            post_json(&server, "/api/user/password", Some(&holder), &body)
        });
        server.wait_until_held("password-change-before-store", held + 1);
        reset(&server, email, "the mailbox owner's own");
        changing.join().unwrap()
    });
    assert_eq!(changed.status, 401, "{}", changed.body);
    assert_eq!(login(&server, email, "the holder's new one").status, 401);
    assert_eq!(login(&server, email, "the mailbox owner's own").status, 200);
}

/// What the password holder asks for, checked against the old password and still under way
/// (held: the hashing queue, a slow database) while the mailbox owner resets it.
fn held_through_a_reset(server: &Keycast, email: &str, ask: impl FnOnce() -> Reply + Send) -> Reply {
    assert!(
        harness::arm_failpoint(server, "account-write-after-password-check", "1*return(1500)"),
        "needs the failpoints build"
    );
    let held = server.held_count("account-write-after-password-check");
    std::thread::scope(|scope| {
        let asking = scope.spawn(ask);
        server.wait_until_held("account-write-after-password-check", held + 1);
        reset(server, email, "the mailbox owner's own");
        asking.join().unwrap()
    })
}

/// An export, a key replacement or an account deletion whose password was checked before a
/// reset and whose write came after it. Before, each went through: the holder got the nsec
/// while the owner's page said the key was never exported (the reset had looked before the
/// export was recorded), or replaced the owner's key, or deleted the account the owner had
/// just taken back. Now each writes only while the password it checked is the account's.
#[test]
fn an_export_replacement_or_deletion_checked_before_a_reset_does_not_outlive_it() {
    let (_dir, server) = start();
    if !harness::arm_failpoint(&server, "account-write-after-password-check", "off") {
        return;
    }
    let owners_key = |email: &str| {
        let owner = cookie_of(&login(&server, email, "the mailbox owner's own"));
        get(&server, "/api/user/key", Some(&owner)).json()
    };

    let (holder, account) = register(&server, "exporting@example.com", None);
    let exported = held_through_a_reset(&server, "exporting@example.com", || export(&server, &holder, PASSWORD));
    assert_eq!(exported.status, 401, "{}", exported.body);
    assert!(!exported.body.contains("nsec1"));
    let key = owners_key("exporting@example.com");
    assert_eq!(key["pubkey"], account["pubkey"], "{key}");
    assert_eq!(key["exposure"], Value::Null, "nothing was exported: {key}");

    let (holder, account) = register(&server, "replacing@example.com", None);
    let replaced = held_through_a_reset(&server, "replacing@example.com", || {
        post_json(
            &server,
            "/api/user/key/replace",
            Some(&holder),
            &json!({ "password": PASSWORD }),
        )
    });
    assert_eq!(replaced.status, 401, "{}", replaced.body);
    let key = owners_key("replacing@example.com");
    assert_eq!(key["pubkey"], account["pubkey"], "the key was not replaced: {key}");

    let (holder, _) = register(&server, "deleting@example.com", None);
    let deleted = held_through_a_reset(&server, "deleting@example.com", || {
        post_json(
            &server,
            "/api/user/delete",
            Some(&holder),
            &json!({ "password": PASSWORD }),
        )
    });
    assert_eq!(deleted.status, 401, "{}", deleted.body);
    assert_eq!(
        login(&server, "deleting@example.com", "the mailbox owner's own").status,
        200,
        "the account is still there"
    );
}

/// Until a reset stores the new password, the old one is still the account's: a login with
/// it opens a session, and that session can grant an app. Before, a grant made in that
/// moment (after the reset had revoked the others) outlived the reset, a live app for the
/// password holder on the account the owner had just taken back. Now the reset revokes again
/// once the new password is in place.
#[test]
fn a_grant_made_while_a_reset_stores_its_password_does_not_outlive_it() {
    let (_dir, server) = start();
    let email = "racing@example.com";
    register(&server, email, None);
    if !harness::arm_failpoint(&server, "reset-before-password-store", "1*return(2000)") {
        return;
    }
    let held = server.held_count("reset-before-password-store");
    let token = std::thread::scope(|scope| {
        let resetting = scope.spawn(|| reset(&server, email, "the mailbox owner's own"));
        server.wait_until_held("reset-before-password-store", held + 1);
        let logged_in = login(&server, email, PASSWORD);
        assert_eq!(
            logged_in.status, 200,
            "the old password is still the account's: {}",
            logged_in.body
        );
        let token = grant(&server, &cookie_of(&logged_in), "policy:social");
        resetting.join().unwrap();
        token["access_token"].as_str().unwrap().to_owned()
    });
    let signed = rpc(
        &server,
        &token,
        "sign_event",
        json!([{ "kind": 1, "content": "after the reset" }]),
    );
    assert!(
        signed.status >= 400,
        "the holder's grant still signs: {} {}",
        signed.status,
        signed.body
    );
    let owner = cookie_of(&login(&server, email, "the mailbox owner's own"));
    let live = get(&server, "/api/user/authorizations", Some(&owner)).json();
    let listed = live["authorizations"].as_array().unwrap();
    assert!(
        !listed.is_empty() && listed.iter().all(|a| !a["revoked_at"].is_null()),
        "{live}"
    );
}

/// A reset that failed part way (a busy database after the link was used up): before, the
/// owner was told to retry, but the link was dead (400) and the old password still worked.
/// Now the link is given back, and the retry finishes the take-over.
#[test]
fn a_reset_that_failed_part_way_can_be_retried_with_the_same_link() {
    let (_dir, server) = start();
    let email = "retrying@example.com";
    register(&server, email, None);
    if !harness::arm_failpoint(&server, "take-over-fails", "1*return") {
        return;
    }
    let asked = post_json(&server, "/api/auth/forgot-password", None, &json!({ "email": email }));
    assert_eq!(asked.status, 202, "{}", asked.body);
    let token = mailed_token(&server, email, "reset_password");
    let body = json!({ "token": token, "password": "the mailbox owner's own" });
    let failed = post_json(&server, "/api/auth/reset-password", None, &body);
    assert_eq!(failed.status, 503, "{}", failed.body);
    let retried = post_json(&server, "/api/auth/reset-password", None, &body);
    assert_eq!(retried.status, 200, "the same link works again: {}", retried.body);
    assert_eq!(
        login(&server, email, PASSWORD).status,
        401,
        "the old password no longer works"
    );
    assert_eq!(login(&server, email, "the mailbox owner's own").status, 200);
    let spent = post_json(&server, "/api/auth/reset-password", None, &body);
    assert_eq!(spent.status, 400, "and is used up once it worked: {}", spent.body);
}
