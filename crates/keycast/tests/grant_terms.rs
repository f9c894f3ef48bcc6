//! Grants with time and limits, against the real binary: the owner picks a duration and
//! limits on the consent page; an expired or exhausted grant, or one past a rate, is
//! refused on both transports — HTTP RPC and NIP-46 (nostr-tools through keycast's
//! embedded relay) — with a reason an app can show. Both transports share one count,
//! because both go through `Signer::execute`.

mod harness;

use harness::api::*;
use harness::engine::psql;
use harness::flow::{approve_with, authorize_query, pkce, refresh_request, register, token_request};
use harness::nostr::BunkerClient;
use harness::{sqlite_exec, sqlite_query, Engine, Keycast, Launch};
use serde_json::{json, Value};

fn start(engine: Engine, dir: &std::path::Path) -> Keycast {
    Launch::on(engine, &dir.join("data")).start()
}

/// Consent with the owner's choices (`duration`, limits) → the token response.
fn grant_with(server: &Keycast, cookie: &str, choices: &[(&str, &str)]) -> Value {
    let (challenge, verifier) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let page = get(server, &format!("/api/oauth/authorize?{query}"), Some(cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    for field in [
        "name=\"duration\"",
        "name=\"max_signatures\"",
        "name=\"per_minute\"",
        "name=\"per_hour\"",
        "name=\"per_day\"",
    ] {
        assert!(
            page.body.contains(field),
            "the consent page offers {field}: {}",
            page.body
        );
    }
    assert!(page.body.contains("Until I revoke it") && page.body.contains("A week"));
    let code = approve_with(server, cookie, &query, choices);
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn sign_http(server: &Keycast, token: &Value, n: u32) -> Reply {
    let access = token["access_token"].as_str().unwrap();
    rpc(
        server,
        access,
        "sign_event",
        json!([{ "kind": 1, "content": format!("note {n}") }]),
    )
}

fn sign_nip46(client: &mut BunkerClient, n: u32) -> Value {
    client.sign_event(json!({"kind": 1, "content": format!("nip46 note {n}"), "tags": [], "created_at": 1_700_000_000}))
}

fn assert_refused_http(reply: &Reply, code: &str, says: &str) {
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(reply.json()["code"], code, "{}", reply.body);
    assert!(reply.json()["error"].as_str().unwrap().contains(says), "{}", reply.body);
}

fn assert_refused_nip46(reply: &Value, says: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["error"].as_str().unwrap_or_default().contains(says), "{reply}");
}

fn exhausted_grant_is_refused_on_both_transports_with_one_count(engine: Engine) {
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "total@example.com", None);
    let token = grant_with(&server, &cookie, &[("max_signatures", "3"), ("per_minute", "")]);
    let connected = nip46.connect(token["bunker_url"].as_str().unwrap());
    assert_eq!(connected["ok"], true, "{connected}");

    assert_eq!(sign_http(&server, &token, 1).status, 200);
    assert_eq!(sign_nip46(&mut nip46, 2)["ok"], true);
    assert_eq!(sign_http(&server, &token, 3).status, 200);
    let says = "3 signatures are used up";
    assert_refused_http(&sign_http(&server, &token, 4), "grant_exhausted", says);
    assert_refused_nip46(&sign_nip46(&mut nip46, 5), says);
    // The owner sees the terms they chose.
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    let authz = &listed["authorizations"][0];
    assert_eq!(authz["limits"], json!({ "max_signatures": 3 }), "{listed}");
    assert_eq!(authz["expires_at"], Value::Null, "until revoked: {listed}");
    // What is not a signature is still allowed.
    let pk = rpc(
        &server,
        token["access_token"].as_str().unwrap(),
        "get_public_key",
        json!([]),
    );
    assert_eq!(pk.status, 200, "{}", pk.body);
}

fn rate_limited_grant_says_when_to_retry_on_both_transports(engine: Engine) {
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "rate@example.com", None);
    // Generous against a loaded machine: the three signatures take well under a minute.
    let token = grant_with(&server, &cookie, &[("per_minute", "2"), ("per_day", "100")]);
    let connected = nip46.connect(token["bunker_url"].as_str().unwrap());
    assert_eq!(connected["ok"], true, "{connected}");
    assert_eq!(sign_http(&server, &token, 1).status, 200);
    assert_eq!(sign_nip46(&mut nip46, 2)["ok"], true);
    let refused = sign_http(&server, &token, 3);
    assert_refused_http(&refused, "grant_rate_limited", "2 signatures per minute");
    assert!(
        refused.json()["error"].as_str().unwrap().contains("retry in"),
        "{}",
        refused.body
    );
    assert_refused_nip46(&sign_nip46(&mut nip46, 4), "2 signatures per minute");
}

fn bad_limits_at_consent_are_refused_with_the_field_named(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "bad@example.com", None);
    let (challenge, _) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let page = get(&server, &format!("/api/oauth/authorize?{query}"), Some(&cookie));
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    for (field, value, says) in [
        ("per_hour", "-1", "per_hour"),
        ("max_signatures", "lots", "max_signatures"),
        ("duration", "month", "hour, day, week or forever"),
    ] {
        let mut fields: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        fields.extend([
            ("csrf".to_owned(), csrf.clone()),
            ("decision".into(), "approve".into()),
            (field.into(), value.into()),
        ]);
        let body = form(&fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
        let r = post(&server, "/api/oauth/authorize", Some(&cookie), FORM, &body, &[]);
        assert_eq!(r.status, 400, "{field}={value}: {}", r.body);
        assert!(r.body.contains(says), "{}", r.body);
    }
}

/// Reads or writes the `terms` of the only authorization, on whichever engine.
fn terms_sql(data_dir: &std::path::Path, database: Option<&harness::engine::PgDatabase>, sql: &str) -> String {
    match database {
        None => {
            let db = data_dir.join("keycast.db");
            if sql.starts_with("SELECT") {
                sqlite_query(&db, sql)
            } else {
                sqlite_exec(&db, sql)
            }
        }
        Some(pg) => psql(&pg.url, sql),
    }
}

fn expired_grant_is_refused_on_both_transports(engine: Engine) {
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The bunker URL names the embedded relay: the same port after the restart below.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay = format!("127.0.0.1:{port}");
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_EMBEDDED_RELAY_ADDR", &relay)
        .start();
    let (cookie, _) = register(&server, "hour@example.com", None);
    let token = grant_with(&server, &cookie, &[("duration", "hour")]);
    assert_eq!(sign_http(&server, &token, 1).status, 200);
    let now = keycast_db::now_unix();
    let select = "SELECT terms FROM authorizations";
    let terms: Value = serde_json::from_str(&terms_sql(&server.data_dir, server.database.as_deref(), select)).unwrap();
    let expires_at = terms["expires_at"].as_i64().unwrap();
    assert!(
        (now + 3500..=now + 3600).contains(&expires_at),
        "an hour from the exchange: {terms}"
    );
    // Its refresh tokens end with it. Before, each lived 30 days.
    let refreshed = refresh_request(&server, token["refresh_token"].as_str().unwrap());
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let longest = "SELECT MAX(expires_at) FROM refresh_tokens";
    let longest: i64 = terms_sql(&server.data_dir, server.database.as_deref(), longest)
        .trim()
        .parse()
        .unwrap();
    assert!(
        longest <= expires_at,
        "a refresh token outlives its grant: {longest} > {expires_at}"
    );
    let token = json!({
        "access_token": refreshed.json()["access_token"],
        "refresh_token": refreshed.json()["refresh_token"],
        "bunker_url": token["bunker_url"],
    });

    // An hour passes: the stored expiry moves into the past (written while keycast is
    // stopped), and keycast starts afresh on the same database, so no cache hides it.
    let database = server.database.clone();
    let data_dir = server.data_dir.clone();
    server.stop();
    let past = format!("UPDATE authorizations SET terms = '{{\"expires_at\":{}}}'", now - 1);
    terms_sql(&data_dir, database.as_deref(), &past);
    let mut launch = Launch::new(&dir.path().join("data")).env("KEYCAST_EMBEDDED_RELAY_ADDR", &relay);
    if let Some(db) = &database {
        launch = launch.postgres(db);
    }
    let server = launch.start();

    assert_refused_http(&sign_http(&server, &token, 2), "grant_expired", "this grant expired at");
    // Nor does it yield new tokens (RFC 6749 §5.2). Before, a refresh kept returning pairs.
    let refused = refresh_request(&server, token["refresh_token"].as_str().unwrap());
    assert_eq!(
        (refused.status, refused.json()["error"].clone()),
        (400, json!("invalid_grant")),
        "{}",
        refused.body
    );
    let connected = nip46.connect(token["bunker_url"].as_str().unwrap());
    assert_eq!(connected["ok"], true, "{connected}");
    assert_refused_nip46(&sign_nip46(&mut nip46, 3), "this grant expired at");
}

/// A grant whose signatures are used up asks the owner for nothing: a kind its policy does
/// not cover is refused as used up, not put to the owner as an approval (which, allowed
/// once, would then be spent and refused anyway). Before, the app of an exhausted grant kept
/// prompts pending in front of its owner.
fn an_exhausted_grant_asks_the_owner_for_nothing(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data")).start();
    let (cookie, _) = register(&server, "asks@example.com", None);
    let token = grant_with(&server, &cookie, &[("max_signatures", "1")]);
    let access = token["access_token"].as_str().unwrap();
    let note = rpc(
        &server,
        access,
        "sign_event",
        json!([{ "kind": 1, "content": "the one" }]),
    );
    assert_eq!(note.status, 200, "{}", note.body);
    let article = rpc(
        &server,
        access,
        "sign_event",
        json!([{ "kind": 30023, "content": "more", "tags": [["d", "x"]] }]),
    );
    assert_eq!(
        article.json()["code"],
        "grant_exhausted",
        "refused as used up, no approval asked for: {}",
        article.body
    );
}

/// A signature outlives its grant: an app with an hour's grant (or one about to be revoked)
/// could sign notes dated weeks ahead and publish each when its date comes. Events are signed
/// dated at most 10 minutes ahead, and never after the grant ends, on both transports; the
/// refusal says why. Before, any date was signed.
fn an_event_dated_past_the_grant_is_not_signed_on_either_transport(engine: Engine) {
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "dated@example.com", None);
    let hour = grant_with(&server, &cookie, &[("duration", "hour")]);
    let forever = grant_with(&server, &cookie, &[]);
    let connected = nip46.connect(forever["bunker_url"].as_str().unwrap());
    assert_eq!(connected["ok"], true, "{connected}");
    let now = keycast_db::now_unix();
    let dated = |token: &Value, at: i64| {
        rpc(
            &server,
            token["access_token"].as_str().unwrap(),
            "sign_event",
            json!([{ "kind": 1, "content": "dated", "created_at": at }]),
        )
    };

    let ahead = dated(&forever, now + 7 * 86_400);
    assert_eq!(ahead.status, 400, "{}", ahead.body);
    assert!(ahead.body.contains("at most 600 s ahead"), "{}", ahead.body);
    let over_nip46 =
        nip46.sign_event(json!({"kind": 1, "content": "dated", "tags": [], "created_at": now + 7 * 86_400}));
    assert_refused_nip46(&over_nip46, "ahead");
    // Past the hour's grant, too (the grant's end is checked as well: see `signer::tests`).
    let past_the_hour = dated(&hour, now + 3_600 + 120);
    assert_eq!(past_the_hour.status, 400, "{}", past_the_hour.body);

    // A clock a few minutes fast, and the past, are signed as before.
    assert_eq!(dated(&forever, now + 300).status, 200);
    assert_eq!(dated(&hour, 1_700_000_000).status, 200);
    let signed = nip46.sign_event(json!({"kind": 1, "content": "now", "tags": [], "created_at": now}));
    assert_eq!(signed["ok"], true, "{signed}");
}

/// An ended grant no longer counts against the account's cap on live grants, so another
/// takes its place; then the owner (or whoever holds the session) extends the ended one.
/// Before, the edit revived it: live grants past the cap, one an hour. Now an ended grant
/// cannot be edited; the app is authorized again, under the cap.
fn an_ended_grant_cannot_be_revived_past_the_cap(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::on(engine, &dir.path().join("data"))
        .env("KEYCAST_MAX_GRANTS_PER_ACCOUNT", "1")
        .start();
    let (cookie, _) = register(&server, "revive@example.com", None);
    let ended = grant_with(&server, &cookie, &[("duration", "hour")]);
    let past = format!(
        "UPDATE authorizations SET terms = '{{\"expires_at\":{}}}'",
        keycast_db::now_unix() - 1
    );
    terms_sql(&server.data_dir, server.database.as_deref(), &past);
    let live = grant_with(&server, &cookie, &[]);
    assert_eq!(sign_http(&server, &live, 1).status, 200);
    let id = ended["authorization_id"].as_str().unwrap();
    let revived = send_json(
        &server,
        "PATCH",
        &format!("/api/user/authorizations/{id}"),
        &cookie,
        &json!({ "duration": "forever" }),
    );
    assert_eq!(revived.status, 404, "{}", revived.body);
    assert!(revived.body.contains("ended"), "{}", revived.body);
    assert_refused_http(&sign_http(&server, &ended, 2), "grant_expired", "this grant expired at");
}

/// The owner revokes an app's grant while one of its signatures is under way (made, and held
/// 800 ms by a fail point before it is handed out, as a request queued for its grant's count
/// would be). Before, the signature went out 600 ms after the revocation was answered: the
/// owner was told "revoked", and the app got one more. Now it is not handed out, on either
/// transport (HTTP looks at its token again too).
fn a_signature_under_way_when_its_grant_is_revoked_is_not_handed_out(engine: Engine) {
    let Some(mut nip46) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path());
    let (cookie, _) = register(&server, "underway@example.com", None);
    for transport in ["http", "nip46"] {
        let token = grant_with(&server, &cookie, &[]);
        let id = token["authorization_id"].as_str().unwrap().to_owned();
        if transport == "nip46" {
            let connected = nip46.connect(token["bunker_url"].as_str().unwrap());
            assert_eq!(connected["ok"], true, "{connected}");
        }
        if !harness::arm_failpoint(&server, "signer-before-record", "1*return(800)") {
            return;
        }
        let held = server.held_count("signer-before-record");
        let handed_out = std::thread::scope(|scope| {
            let signing = scope.spawn(|| match transport {
                "http" => sign_http(&server, &token, 1).status == 200,
                _ => sign_nip46(&mut nip46, 1)["ok"] == true,
            });
            server.wait_until_held("signer-before-record", held + 1);
            let revoked = delete(&server, &format!("/api/user/authorizations/{id}"), &cookie);
            assert_eq!(revoked.status, 204, "{}", revoked.body);
            signing.join().unwrap()
        });
        assert!(!handed_out, "{transport}: signed after the revocation was answered");
    }
}

/// The owner edits an app's grant to `limits` while one of its signatures is under way: a
/// grant with `choices` signs twice, then a third time, counted and held 800 ms by a fail
/// point before it is recorded, while the edit is answered. Returns the server (in `dir`)
/// and the grant's token once the third signature is out; `None` without fail points.
fn edited_while_signing(
    engine: Engine,
    dir: &std::path::Path,
    choices: &[(&str, &str)],
    limits: Value,
) -> Option<(Keycast, Value)> {
    let server = start(engine, dir);
    let (cookie, _) = register(&server, "edited@example.com", None);
    let token = grant_with(&server, &cookie, choices);
    let id = token["authorization_id"].as_str().unwrap().to_owned();
    for n in 1..=2 {
        assert_eq!(sign_http(&server, &token, n).status, 200);
    }
    if !harness::arm_failpoint(&server, "signer-before-record", "1*return(800)") {
        return None;
    }
    let held = server.held_count("signer-before-record");
    std::thread::scope(|scope| {
        let third = scope.spawn(|| sign_http(&server, &token, 3));
        server.wait_until_held("signer-before-record", held + 1);
        let path = format!("/api/user/authorizations/{id}");
        let edited = send_json(&server, "PATCH", &path, &cookie, &json!({ "limits": limits }));
        assert_eq!(edited.status, 200, "{}", edited.body);
        let third = third.join().unwrap();
        assert_eq!(third.status, 200, "{}", third.body);
    });
    Some((server, token))
}

/// On SQLite an edit dropped the grant's count, counted again from the stored activity,
/// which did not hold the signature under way yet: with `max_signatures` 3, a fourth went
/// out. The count now survives the edit.
fn a_signature_under_way_when_its_grant_is_edited_still_counts(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let choices = [("max_signatures", "3"), ("per_minute", "")];
    let Some((server, token)) = edited_while_signing(engine, dir.path(), &choices, json!({ "max_signatures": 3 }))
    else {
        return;
    };
    assert_refused_http(&sign_http(&server, &token, 4), "grant_exhausted", "used up");
}

/// As above for a rate: the signature under way stayed out of the minute's count read again
/// from the store, and one more than the rate went out.
fn a_signature_under_way_when_its_grant_is_edited_still_counts_in_its_rate(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let limits = json!({ "per_minute": 3, "per_hour": 100 });
    let Some((server, token)) = edited_while_signing(engine, dir.path(), &[("per_minute", "3")], limits) else {
        return;
    };
    assert_refused_http(&sign_http(&server, &token, 4), "grant_rate_limited", "per minute");
}

on_both_engines!(
    a_signature_under_way_when_its_grant_is_edited_still_counts,
    a_signature_under_way_when_its_grant_is_edited_still_counts_in_its_rate,
    an_event_dated_past_the_grant_is_not_signed_on_either_transport,
    a_signature_under_way_when_its_grant_is_revoked_is_not_handed_out,
    an_ended_grant_cannot_be_revived_past_the_cap,
    an_exhausted_grant_asks_the_owner_for_nothing,
    exhausted_grant_is_refused_on_both_transports_with_one_count,
    rate_limited_grant_says_when_to_retry_on_both_transports,
    bad_limits_at_consent_are_refused_with_the_field_named,
    expired_grant_is_refused_on_both_transports,
);
