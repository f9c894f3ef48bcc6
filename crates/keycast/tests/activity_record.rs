//! A grant's activity record stays bounded however fast its app signs, against the real
//! binary on both engines, and what the record served still holds: the grant's total of
//! signatures (shown to its owner, and its `max_signatures`) and its rates.
//!
//! Before, every request of an app added a row for good: an app (hostile, or a loop in its
//! code) signing 10,000 times a second grows the database by 2 MB a second, and on Cloud Run
//! that disk is memory: the instance runs out of it and nobody can sign or log in. Each
//! owner's page and every first signature after a restart also counted the whole record.

mod harness;

use harness::api::*;
use harness::flow::{approve_with, authorize_query, grant, pkce, register, token_request};
use harness::{Engine, Keycast, Launch};
use serde_json::{json, Value};

/// Rows kept per grant in these tests (`KEYCAST_ACTIVITY_PER_GRANT`).
const KEPT: i64 = 100;

fn sql(server: &Keycast, sql: &str) -> String {
    match &server.database {
        Some(db) => db.query(sql),
        None => harness::sqlite_exec(&server.data_dir.join("keycast.db"), sql),
    }
}

fn rows_of(server: &Keycast, authorization: &str) -> i64 {
    sql(
        server,
        &format!("SELECT COUNT(*) FROM activity WHERE authorization_id = '{authorization}'"),
    )
    .trim()
    .parse()
    .unwrap()
}

fn limited(server: &Keycast, cookie: &str, choices: &[(&str, &str)]) -> Value {
    let (challenge, verifier) = pkce();
    let code = approve_with(server, cookie, &authorize_query("policy:social", &challenge), choices);
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn sign(server: &Keycast, app: &Value, n: usize) -> Reply {
    rpc(
        server,
        app["access_token"].as_str().unwrap(),
        "sign_event",
        json!([{ "kind": 1, "content": format!("note {n}") }]),
    )
}

fn usage(server: &Keycast, cookie: &str, app: &Value) -> Value {
    let id = app["authorization_id"].as_str().unwrap();
    let r = get(server, &format!("/api/user/authorizations/{id}"), Some(cookie));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["usage"].clone()
}

fn the_record_stays_bounded_and_the_counts_it_served_hold(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let launch = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_ACTIVITY_PER_GRANT", &KEPT.to_string())
        .env("KEYCAST_ACTIVITY_FLUSH_MS", "20");
    let server = launch.start();
    let (cookie, _) = register(&server, "busy@example.com", None);

    // An app without limits signs four times what is kept.
    let free = grant(&server, &cookie, "policy:social");
    let signed = 4 * KEPT as usize;
    for n in 0..signed {
        assert_eq!(sign(&server, &free, n).status, 200);
    }
    // A grant of 300 signatures a day at most, used up, then asked again and again.
    let daily = limited(&server, &cookie, &[("per_day", "300")]);
    for n in 0..300 {
        let r = sign(&server, &daily, n);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for n in 0..3 * KEPT as usize {
        let r = sign(&server, &daily, n);
        assert_eq!(r.json()["code"], "grant_rate_limited", "{}", r.body);
    }
    // A grant of 250 signatures in all, used up.
    let total = limited(&server, &cookie, &[("max_signatures", "250")]);
    for n in 0..250 {
        assert_eq!(sign(&server, &total, n).status, 200);
    }
    assert_eq!(sign(&server, &total, 250).json()["code"], "grant_exhausted");
    // Once the owner's page counts every signature, the records are written.
    let expected = [(&free, signed), (&daily, 300), (&total, 250)];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let totals: Vec<Value> = expected
            .iter()
            .map(|(app, _)| usage(&server, &cookie, app)["signatures"].clone())
            .collect();
        if expected.iter().zip(&totals).all(|((_, n), t)| t == n) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the owner's page counts {totals:?} signatures of {:?} made",
            expected.iter().map(|(_, n)| n).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let free_id = free["authorization_id"].as_str().unwrap();
    let kept = rows_of(&server, free_id);
    assert!(
        kept <= 2 * KEPT,
        "{signed} signatures left {kept} rows of activity; at most {} are kept",
        2 * KEPT
    );
    // Only the refusals beyond the kept ones go: a day's signatures under a daily limit
    // are what that limit counts after a restart.
    let daily_rows = rows_of(&server, daily["authorization_id"].as_str().unwrap());
    assert!(
        (300..=300 + 2 * KEPT).contains(&daily_rows),
        "{daily_rows} rows for 300 signatures and {} refusals",
        3 * KEPT
    );
    let recent =
        get(&server, &format!("/api/user/authorizations/{free_id}"), Some(&cookie)).json()["recent_activity"].clone();
    assert_eq!(recent.as_array().unwrap().len(), 20, "{recent}");
    assert_eq!(recent[0]["result"], "done", "the newest stay: {recent}");
    server.stop();

    // After a restart the limits count what the record served before.
    let server = launch.start();
    let r = sign(&server, &total, 251);
    assert_eq!(r.json()["code"], "grant_exhausted", "{}", r.body);
    let r = sign(&server, &daily, 301);
    assert_eq!(r.json()["code"], "grant_rate_limited", "{}", r.body);
    assert_eq!(usage(&server, &cookie, &total)["signatures"], 250);
    assert_eq!(sign(&server, &free, signed).status, 200);
    server.stop();
}

/// A revoked grant, and one past its chosen duration, keeps its newest 20 records (what its
/// page shows), trimmed by the housekeeping sweep; its total still counts every signature.
fn a_revoked_grant_keeps_its_newest_records_and_its_total(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_ACTIVITY_FLUSH_MS", "20")
        .env("KEYCAST_SWEEP_INTERVAL_SECS", "1")
        .start();
    let (cookie, _) = register(&server, "revoked@example.com", None);
    let app = grant(&server, &cookie, "policy:social");
    let id = app["authorization_id"].as_str().unwrap().to_owned();
    let hourly = limited(&server, &cookie, &[("duration", "hour")]);
    let hourly_id = hourly["authorization_id"].as_str().unwrap().to_owned();
    for n in 0..60 {
        assert_eq!(sign(&server, &app, n).status, 200);
        assert_eq!(sign(&server, &hourly, n).status, 200);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while usage(&server, &cookie, &app)["signatures"] != 60 || usage(&server, &cookie, &hourly)["signatures"] != 60 {
        assert!(std::time::Instant::now() < deadline, "the activity was never written");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(rows_of(&server, &id), 60, "a live grant keeps its 60 (of 1,000)");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        rows_of(&server, &hourly_id),
        60,
        "and so does one within its hour, sweep after sweep"
    );
    let path = format!("/api/user/authorizations/{id}");
    assert_eq!(delete(&server, &path, &cookie).status, 204);
    // The hour is over.
    sql(
        &server,
        &format!("UPDATE authorizations SET terms = '{{\"expires_at\":1}}' WHERE id = '{hourly_id}'"),
    );
    while rows_of(&server, &id) > 20 || rows_of(&server, &hourly_id) > 20 {
        assert!(std::time::Instant::now() < deadline, "never trimmed:\n{}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(rows_of(&server, &id), 20);
    assert_eq!(rows_of(&server, &hourly_id), 20);
    let shown = get(&server, &path, Some(&cookie)).json();
    assert_eq!(shown["usage"]["signatures"], 60, "{shown}");
    assert_eq!(shown["recent_activity"].as_array().unwrap().len(), 20, "{shown}");
    server.stop();
}

/// An app erasing what it signed from its owner's view: one `sign_event`, then three times
/// the kept number of `get_public_key` calls (always allowed, never limited). With one
/// newest-N for every method, pruning removed the signature's record; the owner's page
/// still counted it, but no longer showed what was signed, or when. Signing requests and
/// the rest are now kept apart.
fn a_flood_of_other_calls_does_not_push_what_an_app_signed_out_of_the_record(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_ACTIVITY_PER_GRANT", &KEPT.to_string())
        .env("KEYCAST_ACTIVITY_FLUSH_MS", "20")
        .start();
    let (cookie, _) = register(&server, "erased@example.com", None);
    let app = grant(&server, &cookie, "policy:social");
    assert_eq!(sign(&server, &app, 0).status, 200);
    let access = app["access_token"].as_str().unwrap();
    for n in 0..3 * KEPT {
        if n % 2 == 0 {
            assert_eq!(rpc(&server, access, "get_public_key", json!([])).status, 200);
        } else {
            // A kind its policy does not allow: refused, and recorded as refused.
            let refused = rpc(
                &server,
                access,
                "sign_event",
                json!([{ "kind": 30023, "content": "x" }]),
            );
            assert_ne!(refused.status, 200, "{}", refused.body);
        }
    }
    let id = app["authorization_id"].as_str().unwrap();
    // Written and pruned (the record no longer changes, flushed every 20 ms): the other
    // calls are down to what is kept.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let before = rows_of(&server, id);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let rows = rows_of(&server, id);
        if rows == before && (KEPT..=5 * KEPT / 4 + 1).contains(&rows) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the record was not written and pruned: {rows} rows"
        );
    }
    let signatures: i64 = sql(
        &server,
        &format!("SELECT COUNT(*) FROM activity WHERE authorization_id = '{id}' AND method = 'sign_event' AND result IS NULL"),
    )
    .trim()
    .parse()
    .unwrap();
    assert_eq!(signatures, 1, "the signature's record is kept");
    // What the owner's page shows from the record: the signature in the day's count.
    let shown = usage(&server, &cookie, &app);
    assert_eq!(shown["signatures"], 1, "{shown}");
    assert_eq!(shown["last_day"], 1, "{shown}");
    server.stop();
}

on_both_engines!(
    the_record_stays_bounded_and_the_counts_it_served_hold,
    a_revoked_grant_keeps_its_newest_records_and_its_total,
    a_flood_of_other_calls_does_not_push_what_an_app_signed_out_of_the_record
);
