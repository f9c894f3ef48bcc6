//! Rows whose time is over leave the database, against the real binary on both engines:
//! expired sessions, mailed tokens, OAuth codes, access tokens and approvals (each holds the
//! request it asks about, up to ~90 KB; before, a revoked grant's stayed for good), and
//! refresh tokens 30 days past their expiry (kept that long so a spent one presented again still revokes its
//! authorization). Live ones stay. Before, none was ever removed: on Cloud Run, where the
//! disk is memory, every login and every hourly token refresh grew the database for good.

mod harness;

use std::time::{Duration, Instant};

use harness::api::*;
use harness::flow::{grant, login, register};
use harness::{Engine, Keycast, Launch};

/// Runs `sql` on the server's own database, SQLite or PostgreSQL.
fn sql(server: &Keycast, sql: &str) -> String {
    match &server.database {
        Some(db) => db.query(sql),
        None => harness::sqlite_exec(&server.data_dir.join("keycast.db"), sql),
    }
}

fn count(server: &Keycast, table: &str) -> i64 {
    sql(server, &format!("SELECT COUNT(*) FROM {table}"))
        .trim()
        .parse()
        .unwrap()
}

/// The stored hash of the session in `cookie` (`keycast_session=<token>`).
fn session_hash(cookie: &str) -> String {
    let raw = cookie.split_once('=').unwrap().1;
    keycast_db::TokenHash::of(raw.as_bytes()).as_str().to_owned()
}

fn expired_sessions_tokens_and_codes_are_removed_and_live_ones_stay(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_SWEEP_INTERVAL_SECS", "1")
        .start();
    let (cookie, _) = register(&server, "ann@example.com", None);
    let old = cookie_of(&login(&server, "ann@example.com", PASSWORD));
    let first = grant(&server, &cookie, "policy:social");
    assert!(count(&server, "sessions") >= 2 && count(&server, "oauth_codes") >= 1);
    // An article is not among `social`'s kinds: the owner is asked, twice.
    for content in ["one", "two"] {
        let asked = rpc(
            &server,
            first["access_token"].as_str().unwrap(),
            "sign_event",
            serde_json::json!([{ "kind": 30023, "content": content, "tags": [["d", content]] }]),
        );
        assert_eq!(asked.json()["code"], "approval_required", "{}", asked.body);
    }

    // Time passes for all but the first session and a fresh token pair.
    let keep = session_hash(&cookie);
    let day = 86_400;
    let now = keycast_db::now_unix();
    sql(
        &server,
        &format!("UPDATE sessions SET expires_at = 1 WHERE token_hash <> '{keep}'"),
    );
    sql(&server, "UPDATE user_tokens SET expires_at = 1");
    sql(&server, "UPDATE oauth_codes SET expires_at = 1");
    sql(&server, "UPDATE access_tokens SET expires_at = 1");
    sql(&server, "UPDATE approvals SET expires_at = 1");
    // A refresh token that expired 29 days ago is still remembered; one 31 days ago is not.
    sql(
        &server,
        &format!("UPDATE refresh_tokens SET expires_at = {}", now - 31 * day),
    );
    let recent = {
        let second = grant(&server, &cookie, "policy:social");
        let token = second["refresh_token"].as_str().unwrap().to_owned();
        let hash = keycast_db::TokenHash::of(token.as_bytes()).as_str().to_owned();
        sql(
            &server,
            &format!(
                "UPDATE refresh_tokens SET expires_at = {} WHERE token_hash = '{hash}'",
                now - 29 * day
            ),
        );
        hash
    };

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = [
            count(&server, "sessions"),
            count(&server, "user_tokens"),
            count(&server, "oauth_codes"),
            count(&server, "access_tokens"),
            count(&server, "refresh_tokens"),
            count(&server, "approvals"),
        ];
        // The second grant's code and access token expire on their own later: only the
        // first session, the second grant's rows and the remembered refresh token are left.
        if left == [1, 0, 1, 1, 1, 0] {
            break;
        }
        assert!(Instant::now() < deadline, "not swept: {left:?}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let remembered = sql(&server, "SELECT token_hash FROM refresh_tokens");
    assert_eq!(
        remembered.trim(),
        recent,
        "the refresh token 29 days past expiry is kept"
    );
    assert_eq!(
        get(&server, "/api/user/key", Some(&cookie)).status,
        200,
        "the live session stays"
    );
    assert_eq!(get(&server, "/api/user/key", Some(&old)).status, 401);
    assert!(
        server.log().contains("removed expired sessions, tokens and codes"),
        "{}",
        server.log()
    );
}

/// A deleted custom policy stayed as a row for good (about 80 KB at the caps), named or not:
/// with creations at one a minute after the first 30, an account grew the database by that
/// every minute, for ever. The sweep removes deleted policies nothing names; one a revoked
/// grant names stays (its page shows it).
fn deleted_policies_nothing_names_are_removed(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_SWEEP_INTERVAL_SECS", "1")
        .start();
    let (cookie, _) = register(&server, "tidy@example.com", None);
    let create = |name: &str| {
        let r = post_json(
            &server,
            "/api/user/policies",
            Some(&cookie),
            &serde_json::json!({ "name": name, "permissions": { "allowed_kinds": [1] } }),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["slug"].as_str().unwrap().to_owned()
    };
    let (unused, named) = (create("unused"), create("named"));
    let app = grant(&server, &cookie, "policy:social");
    let app = app["authorization_id"].as_str().unwrap();
    let moved = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{app}"),
        &cookie,
        &serde_json::json!({ "policy": named }),
    );
    assert_eq!(moved.status, 200, "{}", moved.body);
    assert_eq!(
        delete(&server, &format!("/api/user/authorizations/{app}"), &cookie).status,
        204
    );
    for slug in [&unused, &named] {
        assert_eq!(
            delete(&server, &format!("/api/user/policies/{slug}"), &cookie).status,
            204
        );
    }
    let custom = || {
        sql(
            &server,
            "SELECT slug FROM policies WHERE owner_user_id IS NOT NULL ORDER BY slug",
        )
        .lines()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while custom() != [named.clone()] {
        assert!(Instant::now() < deadline, "not swept: {:?}\n{}", custom(), server.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let page = get(&server, &format!("/dashboard/authorizations/{app}"), Some(&cookie));
    assert_eq!(page.status, 200, "the revoked grant's page: {}", page.body);
}

on_both_engines!(
    expired_sessions_tokens_and_codes_are_removed_and_live_ones_stay,
    deleted_policies_nothing_names_are_removed,
);
