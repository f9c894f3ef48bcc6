//! Asking instead of refusing (issue 14), against the real binary on both engines: a request
//! the grant's policy does not cover is answered with an approval URL — HTTP RPC 403
//! `approval_required`, NIP-46 `auth_url` (nostr-tools' `BunkerSigner` and its `onauth`
//! callback, through keycast's embedded relay) — and the logged-in owner allows it once,
//! allows the kind from now on, or denies it on that page. Also the attacks: another
//! account's session, a missing CSRF token, another site's post, a spent, expired or
//! unknown approval.

mod harness;

use harness::api::*;
use harness::flow::{grant, register};
use harness::nostr::{BunkerClient, Relay};
use harness::rust_connect::{App, JsApp, RustApp};
use harness::{Engine, Keycast, Launch, PgDatabase, TEST_MASTER_KEY};
use serde_json::{json, Value};

fn start(engine: Engine, dir: &std::path::Path, env: &[(&str, &str)]) -> Keycast {
    let mut launch = Launch::on(engine, &dir.join("data"));
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    launch.start()
}

/// An article (kind 30023): not among the kinds of the seeded `social` policy.
fn article(content: &str) -> Value {
    json!([{ "kind": 30023, "content": content, "tags": [["d", "slug"]] }])
}

fn sign(server: &Keycast, token: &Value, params: Value) -> Reply {
    rpc(server, token["access_token"].as_str().unwrap(), "sign_event", params)
}

/// The path of an approval URL, checked to live under the server's public URL.
fn approval_path(server: &Keycast, reply: &Reply) -> String {
    assert_eq!(reply.status, 403, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["code"], "approval_required", "{body}");
    assert!(body["error"].as_str().unwrap().contains("kind 30023"), "{body}");
    assert!(body["expires_at"].as_i64().unwrap() > keycast_db::now_unix(), "{body}");
    path_of(server, body["approval_url"].as_str().unwrap())
}

/// The path of `url`, checked to be an approval page under keycast's public URL (by
/// default `http://localhost:<port>`).
fn path_of(server: &Keycast, url: &str) -> String {
    let parsed = url::Url::parse(url).unwrap();
    let base = url::Url::parse(&server.base).unwrap();
    assert_eq!(parsed.port(), base.port(), "{url} is keycast's");
    let path = parsed.path();
    assert!(
        path.starts_with("/approvals/") && path.len() > "/approvals/".len() + 40,
        "{url}"
    );
    path.to_owned()
}

/// Opens the approval page as `cookie` and posts `decision` with its CSRF token.
fn decide(server: &Keycast, cookie: &str, path: &str, decision: &str) -> Reply {
    let page = get(server, path, Some(cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = hidden_input(&page.body, "csrf").expect("the page has a form");
    post_form(server, path, Some(cookie), &[("csrf", &csrf), ("decision", decision)])
}

fn assert_signed(reply: &Reply, kind: u64) -> nostr::Event {
    assert_eq!(reply.status, 200, "{}", reply.body);
    let event: nostr::Event = serde_json::from_value(reply.json()["result"].clone()).unwrap();
    event.verify().expect("a valid signature");
    assert_eq!(u64::from(event.kind.as_u16()), kind);
    event
}

fn http_allow_once_lets_exactly_one_retry_of_the_same_request(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "once@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let content = "My <b>article</b> & more: ".to_owned() + &"long ".repeat(100);
    let path = approval_path(&server, &sign(&server, &token, article(&content)));

    // The owner sees what is asked, escaped and whole: "allow once" signs all of it. (Before,
    // the page showed the first 280 characters and the first 50 tags; what followed was
    // signed unseen.)
    let page = get(&server, &path, Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    for shown in [
        "30023",
        "sign event",
        "My &lt;b&gt;article&lt;/b&gt; &amp; more",
        "526 characters, all of them",
        "Allow once",
        "Allow kind 30023 from now on",
        "Deny",
    ] {
        assert!(page.body.contains(shown), "the page shows {shown:?}: {}", page.body);
    }
    assert!(!page.body.contains("<b>article"), "content is escaped");
    assert!(page.body.contains(&"long ".repeat(100)), "the whole content");

    let done = decide(&server, &cookie, &path, "once");
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("Allowed"), "{}", done.body);
    // The retry (its created_at filled afresh) passes, once; a different request does not.
    assert_eq!(sign(&server, &token, article("other text")).status, 403);
    let event = assert_signed(&sign(&server, &token, article(&content)), 30023);
    assert_eq!(event.content, content);
    let again = sign(&server, &token, article(&content));
    approval_path(&server, &again);
    // Deciding the spent approval again is refused.
    let csrf = hidden_input(&get(&server, "/dashboard", Some(&cookie)).body, "csrf").unwrap();
    let twice = post_form(&server, &path, Some(&cookie), &[("csrf", &csrf), ("decision", "once")]);
    assert_eq!(twice.status, 409, "{}", twice.body);
}

/// What an event does is often in its tags, not its content: the notes a deletion removes,
/// the relays a relay list names, a zap's amount and recipient. The approval page showed
/// the kind, the number of tags and the content; the owner approved blind what the tags said.
/// Now it shows them (escaped), and the date the event carries.
fn the_approval_page_shows_the_tags_and_the_date_the_owner_would_sign(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "tags@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let target = "a".repeat(64);
    let params = json!([{ "kind": 30023, "content": "just tidying up", "created_at": 1_600_000_000,
                         "tags": [["d", "slug"], ["e", target], ["p", "<script>x</script>"]] }]);
    let path = approval_path(&server, &sign(&server, &token, params));
    let page = get(&server, &path, Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains(&target), "the tag's value is shown: {}", page.body);
    assert!(page.body.contains("&lt;script&gt;"), "escaped: {}", page.body);
    assert!(!page.body.contains("<script>x"), "{}", page.body);
    assert!(page.body.contains("2020-09-13"), "the event's date: {}", page.body);
    // The app as the consent page names it: an unregistered one by where its answers went,
    // the name it chose marked unchecked (an app may call itself after one the owner trusts).
    // Before, the page said only "App: test-app".
    assert!(
        page.body
            .contains("<strong class=\"redirect-host\">http://127.0.0.1:9</strong>"),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains("unverified app: the name it gives itself (<code>test-app</code>) is unchecked"),
        "{}",
        page.body
    );
}

/// A registered app is named on the approval page as the operator registered it, marked
/// verified (here `test-app`, the harness's client, registered from the shell).
#[test]
fn the_approval_page_names_a_registered_app_by_its_registered_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(Engine::Sqlite, dir.path(), &[]);
    harness::sqlite_exec(
        &server.data_dir.join("keycast.db"),
        &format!(
            "INSERT INTO oauth_clients (client_id, name, redirect_uris, logo_url, created_at) \
             VALUES ('test-app', 'Primal', '[\"{}\"]', NULL, 1)",
            harness::api::REDIRECT
        ),
    );
    let (cookie, _) = register(&server, "registered@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let path = approval_path(&server, &sign(&server, &token, article("from a registered app")));
    let page = get(&server, &path, Some(&cookie));
    assert!(
        page.body.contains("<strong>Primal</strong> <span class=\"client verified\">&#10003; verified app, at http://127.0.0.1:9</span>"),
        "{}",
        page.body
    );
}

/// A `nostrconnect://` app names itself: one that took a registered app's id as its name
/// (ids are public, in every authorize URL), with that app's site as its `url`, passed on
/// the approval page for the registered app, marked verified. Such a name is not kept.
#[test]
fn an_app_cannot_pass_for_a_registered_one_by_the_name_it_gives_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(Engine::Sqlite, dir.path(), &[]);
    let registered = "app_0123456789abcdef01234567";
    harness::sqlite_exec(
        &server.data_dir.join("keycast.db"),
        &format!(
            "INSERT INTO oauth_clients (client_id, name, redirect_uris, logo_url, created_at) \
             VALUES ('{registered}', 'Primal', '[\"{}\"]', NULL, 1)",
            harness::api::REDIRECT
        ),
    );
    let (cookie, _) = register(&server, "spoofed@example.com", None);
    let uri = format!(
        "nostrconnect://{}?relay={}&secret=s3cret&name={registered}&url={}",
        nostr::Keys::generate().public_key().to_hex(),
        url::form_urlencoded::byte_serialize(b"ws://127.0.0.1:9").collect::<String>(),
        url::form_urlencoded::byte_serialize(b"http://127.0.0.1:9").collect::<String>(),
    );
    let accepted = post_json(
        &server,
        "/api/user/nostrconnect",
        Some(&cookie),
        &json!({ "uri": uri, "policy": "social" }),
    );
    assert_eq!(accepted.status, 201, "{}", accepted.body);
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert_eq!(listed["authorizations"][0]["client_id"], "nostrconnect", "{listed}");
}

/// The page shows the event's date, and "allow once" holds for that date: a retry dated
/// afresh passes, one dated otherwise does not (here years back; years ahead is refused
/// before any approval, see `grant_terms.rs`). Before, the date was not compared, and an app
/// could have a replaceable event (a relay list, a profile) signed for the year 2100,
/// outranking every later one the owner publishes.
fn http_allow_once_holds_for_the_date_the_owner_saw(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "dated@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let path = approval_path(&server, &sign(&server, &token, article("dated today")));
    assert_eq!(decide(&server, &cookie, &path, "once").status, 200);
    let back = json!([{ "kind": 30023, "content": "dated today", "tags": [["d", "slug"]],
                        "created_at": 1_600_000_000_u64 }]);
    let refused = sign(&server, &token, back);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.json()["code"], "approval_required", "{}", refused.body);
    assert_signed(&sign(&server, &token, article("dated today")), 30023);
}

fn http_allow_kind_holds_for_later_requests_and_across_a_restart(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "kind@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let path = approval_path(&server, &sign(&server, &token, article("first")));
    let done = decide(&server, &cookie, &path, "kind");
    assert_eq!(done.status, 200, "{}", done.body);
    assert_signed(&sign(&server, &token, article("first")), 30023);
    assert_signed(&sign(&server, &token, article("second, different")), 30023);
    // Only that kind: another one is still asked.
    let other = sign(&server, &token, json!([{ "kind": 30024, "content": "draft" }]));
    assert_eq!(other.json()["code"], "approval_required", "{}", other.body);
    // It is part of what the grant allows, as the owner sees it.
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert_eq!(
        listed["authorizations"][0]["approved_kinds"],
        json!([30023]),
        "{listed}"
    );
    // And in the words of the app's dashboard page ("This app may: …").
    let id = listed["authorizations"][0]["id"].as_str().unwrap();
    let page = get(&server, &format!("/dashboard/authorizations/{id}"), Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    let allows = page
        .body
        .split("<ul class=\"allows\">")
        .nth(1)
        .and_then(|rest| rest.split("</ul>").next());
    assert!(
        allows.is_some_and(|words| words.contains("30023")),
        "the approved kind is in what the page says the app may do: {}",
        page.body
    );

    // It is stored, not cached: a restarted keycast still allows it.
    let database = server.database.clone();
    server.stop();
    let mut launch = Launch::new(&dir.path().join("data"));
    if let Some(db) = &database {
        launch = launch.postgres(db);
    }
    let server = launch.start();
    assert_signed(&sign(&server, &token, article("after the restart")), 30023);
}

fn deny_another_account_csrf_and_unknown_ids_are_refused(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "owner@example.com", None);
    let (intruder, _) = register(&server, "intruder@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let path = approval_path(&server, &sign(&server, &token, article("secret draft")));

    // Another account sees nothing of it and cannot decide it, with its own CSRF token.
    let seen = get(&server, &path, Some(&intruder));
    assert_eq!(seen.status, 403, "{}", seen.body);
    assert!(!seen.body.contains("secret draft"), "{}", seen.body);
    assert!(seen.body.contains("belongs to another account"), "{}", seen.body);
    let csrf = hidden_input(&get(&server, "/dashboard", Some(&intruder)).body, "csrf").unwrap();
    let forged = post_form(
        &server,
        &path,
        Some(&intruder),
        &[("csrf", &csrf), ("decision", "kind")],
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    // The owner, without the CSRF token, or from another site, is refused too.
    let no_csrf = post_form(&server, &path, Some(&cookie), &[("decision", "once")]);
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);
    let page = get(&server, &path, Some(&cookie));
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let body = form(&[("csrf", &csrf), ("decision", "once")]);
    let cross = post(
        &server,
        &path,
        Some(&cookie),
        FORM,
        &body,
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(cross.status, 403, "{}", cross.body);
    // Without a session: log in first.
    assert_eq!(get(&server, &path, None).status, 401);
    // None of that decided it: still pending, and the retry is still asked.
    assert_eq!(sign(&server, &token, article("secret draft")).status, 403);
    assert!(get(&server, &path, Some(&cookie)).body.contains("Allow once"));

    let denied = decide(&server, &cookie, &path, "deny");
    assert_eq!(denied.status, 200, "{}", denied.body);
    assert!(denied.body.contains("Denied"), "{}", denied.body);
    approval_path(&server, &sign(&server, &token, article("secret draft")));
    assert!(get(&server, &path, Some(&cookie))
        .body
        .contains("Already decided: deny"));

    let unknown = get(
        &server,
        "/approvals/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        Some(&cookie),
    );
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert!(
        unknown.body.contains("there is no approval at this address"),
        "{}",
        unknown.body
    );
    let csrf = hidden_input(&get(&server, "/dashboard", Some(&cookie)).body, "csrf").unwrap();
    let unknown = post_form(
        &server,
        "/approvals/nope",
        Some(&cookie),
        &[("csrf", &csrf), ("decision", "once")],
    );
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}

fn an_expired_approval_cannot_be_decided(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[("KEYCAST_APPROVAL_TTL_SECS", "2")]);
    let (cookie, _) = register(&server, "late@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let path = approval_path(&server, &sign(&server, &token, article("too late")));
    let page = get(&server, &path, Some(&cookie));
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    // Time itself is what is tested: wait past the two seconds.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(get(&server, &path, Some(&cookie)).body.contains("has expired"));
    let late = post_form(&server, &path, Some(&cookie), &[("csrf", &csrf), ("decision", "once")]);
    assert_eq!(late.status, 410, "{}", late.body);
    assert!(late.body.contains("has expired"), "{}", late.body);
    assert_eq!(
        sign(&server, &token, article("too late")).json()["code"],
        "approval_required"
    );
}

/// An app's burst of requests its policy does not cover: each counted the pending approvals
/// before any other had stored its own, so all found room, and the app stored a sealed
/// request (up to 87 KiB) per request it sent, past the cap of 20 — again every time they
/// expired. The count is now part of the insert (on PostgreSQL under the grant's lock).
fn a_burst_of_requests_stores_no_more_approvals_than_the_cap(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "burst@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let (server, token) = (&server, &token);
        let racing: Vec<_> = (0..60)
            .map(|i| scope.spawn(move || sign(server, token, article(&format!("burst {i}")))))
            .collect();
        racing.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let asked = replies
        .iter()
        .filter(|r| r.status == 403 && r.json()["code"] == "approval_required")
        .count();
    let refused = replies
        .iter()
        .filter(|r| r.status == 403 && r.body.contains("20 approvals already wait for the owner"))
        .count();
    assert_eq!(
        (asked, refused),
        (20, 40),
        "{:?}",
        replies.iter().map(|r| (r.status, &r.body)).collect::<Vec<_>>()
    );
}

/// Each grant may keep 20 approvals waiting and an account may hold 100 grants: 2,000
/// sealed requests (up to ~88 KB each) for one account, asked again each time they expired.
/// An account keeps at most 100 waiting across its apps.
fn an_account_keeps_at_most_a_hundred_approvals_waiting(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "many-apps@example.com", None);
    let tokens: Vec<Value> = (0..6).map(|_| grant(&server, &cookie, "policy:social")).collect();
    let mut asked = 0;
    let mut refused_for_the_account = 0;
    for (app, token) in tokens.iter().enumerate() {
        for n in 0..20 {
            let reply = sign(&server, token, article(&format!("app {app}, request {n}")));
            assert_eq!(reply.status, 403, "{}", reply.body);
            if reply.json()["code"] == "approval_required" {
                asked += 1;
            } else if reply
                .body
                .contains("approvals already wait for the owner across their apps")
            {
                refused_for_the_account += 1;
            } else {
                panic!("app {app}, request {n}: {}", reply.body);
            }
        }
    }
    assert_eq!((asked, refused_for_the_account), (100, 20));
    // Revoking the apps whose requests wait frees their places: those can never be allowed.
    for token in &tokens[..5] {
        let id = token["authorization_id"].as_str().unwrap();
        assert_eq!(
            delete(&server, &format!("/api/user/authorizations/{id}"), &cookie).status,
            204
        );
    }
    let reply = sign(&server, &tokens[5], article("after the revocations"));
    assert_eq!(reply.json()["code"], "approval_required", "{}", reply.body);
}

/// An approval of a grant revoked since was still decided: "Allowed. The app's next try of
/// this request will succeed." — untrue (the revoked grant signs nothing), and "allow kind"
/// added a kind to a grant no one can use. Now refused (410), saying the app has ended.
fn an_approval_of_a_revoked_app_cannot_be_allowed(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "revoked@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    let path = approval_path(&server, &sign(&server, &token, article("after revocation")));
    let page = get(&server, &path, Some(&cookie));
    let csrf = hidden_input(&page.body, "csrf").unwrap();
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    let id = listed["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let revoked = delete(&server, &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    for decision in ["once", "kind"] {
        let late = post_form(
            &server,
            &path,
            Some(&cookie),
            &[("csrf", &csrf), ("decision", decision)],
        );
        assert_eq!(late.status, 410, "{decision}: {}", late.body);
        assert!(
            late.body.contains("authorization has ended"),
            "{decision}: {}",
            late.body
        );
    }
    // Denying still works: a NIP-46 app is told, rather than left to wait.
    let denied = post_form(&server, &path, Some(&cookie), &[("csrf", &csrf), ("decision", "deny")]);
    assert_eq!(denied.status, 200, "{}", denied.body);
    let listed = get(&server, "/api/user/authorizations", Some(&cookie)).json();
    assert!(
        !listed.to_string().contains("30023"),
        "no kind was added to the revoked grant: {listed}"
    );
}

/// The owner's decision on a NIP-46 request was recorded, then the wait for the replica
/// failed (503) — or the request was dropped: a timeout, a browser closed — before the app
/// was answered. The app waited for an answer that never came, and the owner's retry was
/// told "already decided". Now the app is always answered: with the result once the
/// decision is durable, otherwise with an error saying to send the request again.
#[test]
fn a_nip46_decision_the_replica_did_not_confirm_still_answers_the_app() {
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        Engine::Sqlite,
        dir.path(),
        &[("KEYCAST_REPLICA_DURABLE_TIMEOUT_SECS", "1")],
    );
    let (cookie, _) = register(&server, "unsaved@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    assert_eq!(client.connect(token["bunker_url"].as_str().unwrap())["ok"], true);
    let event = json!({"kind": 30023, "content": "unsaved", "tags": []});
    client.call_ok(json!({ "op": "start_sign_event", "event": event, "timeout_ms": 1000 }));
    let url = client.call_ok(json!({ "op": "auth_url", "timeout_ms": 15000 }));
    let path = path_of(&server, url["url"].as_str().unwrap());
    // Every replication round waits 5 s: the decision's durable wait (1 s) fails.
    if !harness::arm_failpoint(&server, "replica-round", "return(5000)") {
        return;
    }
    let decided = decide(&server, &cookie, &path, "kind");
    assert_eq!(decided.status, 503, "{}", decided.body);
    assert!(decided.body.contains("the app was told"), "{}", decided.body);
    let answered = client.call(json!({ "op": "finish_sign_event", "timeout_ms": 15000 }));
    assert_eq!(answered["ok"], false, "{answered}");
    assert!(
        answered["error"]
            .as_str()
            .unwrap()
            .contains("could not be confirmed saved"),
        "keycast's own answer, not the client's timeout: {answered}"
    );
}

/// The owner's decision committed, and the database's answer was lost (a reset connection).
/// Before, the click answered 500, the app was never answered (the decision was recorded but
/// never carried out), and a second click was told it was already decided. Now the row is
/// read back: the decision it holds is this click's, and is carried out.
#[test]
fn a_decision_whose_database_answer_was_lost_is_still_carried_out() {
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(Engine::Sqlite, dir.path(), &[]);
    let (cookie, account) = register(&server, "lost-answer@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    assert_eq!(client.connect(token["bunker_url"].as_str().unwrap())["ok"], true);
    let event = json!({"kind": 30023, "content": "decided", "tags": []});
    client.call_ok(json!({ "op": "start_sign_event", "event": event, "timeout_ms": 1000 }));
    let url = client.call_ok(json!({ "op": "auth_url", "timeout_ms": 15000 }));
    let path = path_of(&server, url["url"].as_str().unwrap());
    if !harness::arm_failpoint(&server, "approval-decide-answer-lost", "1*return") {
        return;
    }
    let decided = decide(&server, &cookie, &path, "once");
    assert_eq!(decided.status, 200, "{}", decided.body);
    assert!(decided.body.contains("The app has its answer"), "{}", decided.body);
    let answered = client.call(json!({ "op": "finish_sign_event", "timeout_ms": 15000 }));
    assert_eq!(answered["ok"], true, "{answered}");
    assert_eq!(answered["event"]["pubkey"], account["pubkey"], "{answered}");
}

/// A NIP-46 client whose request nobody decides is not left waiting: when the approval
/// expires it gets an error with the request's id.
fn nip46_an_undecided_approval_ends_in_an_error_reply(engine: Engine) {
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[("KEYCAST_APPROVAL_TTL_SECS", "2")]);
    let (cookie, _) = register(&server, "nobody@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    assert_eq!(client.connect(token["bunker_url"].as_str().unwrap())["ok"], true);
    let event = json!({"kind": 30023, "content": "unanswered", "tags": []});
    client.call_ok(json!({ "op": "start_sign_event", "event": event, "timeout_ms": 1000 }));
    let url = client.call_ok(json!({ "op": "auth_url", "timeout_ms": 15000 }));
    let path = path_of(&server, url["url"].as_str().unwrap());
    let ended = client.call(json!({ "op": "finish_sign_event", "timeout_ms": 15000 }));
    assert_eq!(ended["ok"], false, "{ended}");
    assert!(
        ended["error"].as_str().unwrap().contains("did not decide within 2 s"),
        "{ended}"
    );
    // Closed: the page says so, and a late click is refused.
    assert!(get(&server, &path, Some(&cookie)).body.contains("expired undecided"));
    let csrf = hidden_input(&get(&server, "/dashboard", Some(&cookie)).body, "csrf").unwrap();
    let late = post_form(&server, &path, Some(&cookie), &[("csrf", &csrf), ("decision", "once")]);
    assert_eq!(late.status, 410, "{}", late.body);
}

/// The NIP-46 side: `auth_url`, then the real answer with the same request id.
fn nip46_auth_url_then_the_owners_decision_reaches_the_client(engine: Engine) {
    if let Some(mut app) = JsApp::nostr_tools() {
        auth_url_then_the_owners_decision(engine, &mut app);
    }
}

/// The same with NDK's `NDKNip46Signer`, which emits `authUrl` and keeps waiting for the
/// request's real answer.
fn nip46_auth_url_then_the_owners_decision_reaches_an_ndk_client(engine: Engine) {
    if let Some(mut app) = JsApp::ndk() {
        auth_url_then_the_owners_decision(engine, &mut app);
    }
}

/// The same with rust-nostr's `NostrConnect`, whose `auth_url` handler receives the URL while
/// the request keeps waiting.
fn nip46_auth_url_then_the_owners_decision_reaches_a_rust_nostr_client(engine: Engine) {
    auth_url_then_the_owners_decision(engine, &mut RustApp::default());
}

fn auth_url_then_the_owners_decision(engine: Engine, client: &mut dyn App) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(engine, dir.path(), &[]);
    let (cookie, _) = register(&server, "bunker@example.com", None);
    let token = grant(&server, &cookie, "policy:social");
    client.call_ok(json!({ "op": "connect", "bunker": token["bunker_url"] }));
    let event = json!({"kind": 30023, "content": "over NIP-46", "tags": [["d", "n"]]});
    let name = client.name();

    let ask = |client: &mut dyn App, event: &Value| -> String {
        client.call_ok(json!({ "op": "start_sign_event", "event": event, "timeout_ms": 1000 }));
        let reply = client.call_ok(json!({ "op": "auth_url", "timeout_ms": 15000 }));
        path_of(&server, reply["url"].as_str().unwrap())
    };
    let finish = |client: &mut dyn App| client.call(json!({ "op": "finish_sign_event", "timeout_ms": 15000 }));

    // Allow once: the client's pending request resolves with the signed event.
    let path = ask(client, &event);
    assert!(get(&server, &path, Some(&cookie)).body.contains("NIP-46"));
    assert_eq!(decide(&server, &cookie, &path, "once").status, 200);
    let signed = finish(client);
    assert_eq!(signed["ok"], true, "{name}: {signed}");
    assert_eq!(signed["verified"], true, "{name}: {signed}");
    assert_eq!(signed["event"]["kind"], 30023, "{name}: {signed}");
    assert_eq!(signed["event"]["content"], "over NIP-46", "{name}: {signed}");

    // Once means once: the same request is asked again; deny sends the error.
    let path = ask(client, &event);
    assert_eq!(decide(&server, &cookie, &path, "deny").status, 200);
    let denied = finish(client);
    assert_eq!(denied["ok"], false, "{name}: {denied}");
    assert!(denied["error"].as_str().unwrap().contains("denied"), "{name}: {denied}");

    // Allow the kind: this request is answered, and later ones need no asking.
    let path = ask(client, &event);
    assert_eq!(decide(&server, &cookie, &path, "kind").status, 200);
    let signed = finish(client);
    assert_eq!(signed["verified"], true, "{name}: {signed}");
    let later = client.call(json!({ "op": "sign_event", "event": {"kind": 30023, "content": "later", "tags": []} }));
    assert_eq!(later["ok"], true, "{name}: {later}");
    assert_eq!(later["verified"], true, "{name}: {later}");
    // And over HTTP too: one policy path.
    assert_signed(&sign(&server, &token, article("by http")), 30023);
}

/// Several instances on PostgreSQL: the owner's click lands on another instance than the one
/// that received the NIP-46 request and sent the `auth_url`; the reply still reaches the app.
#[test]
fn nip46_approval_clicked_on_another_instance_still_answers_the_app() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let Some(relay) = Relay::start() else { return };
    let Some(mut client) = BunkerClient::spawn() else {
        return;
    };
    let database = PgDatabase::create("approvals");
    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<Keycast> = (0..2)
        .map(|i| {
            Launch::new(&dir.path().join(format!("data{i}")))
                .postgres(&database)
                .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
                .env("BUNKER_RELAYS", relay.url())
                .start()
        })
        .collect();
    let (cookie, _) = register(&servers[0], "two@example.com", None);
    let token = grant(&servers[0], &cookie, "policy:social");
    let connected = client.connect(token["bunker_url"].as_str().unwrap());
    assert_eq!(connected["ok"], true, "{connected}");
    let event = json!({"kind": 30023, "content": "across instances", "tags": []});
    client.call_ok(json!({ "op": "start_sign_event", "event": event, "timeout_ms": 1000 }));
    let url = client.call_ok(json!({ "op": "auth_url", "timeout_ms": 15000 }))["url"]
        .as_str()
        .unwrap()
        .to_owned();
    // The URL names the instance that answered (its default public URL has its port).
    let port = url::Url::parse(&url).unwrap().port();
    let other = servers
        .iter()
        .find(|s| url::Url::parse(&s.base).unwrap().port() != port)
        .expect("two instances");
    let path = url::Url::parse(&url).unwrap().path().to_owned();
    assert_eq!(decide(other, &cookie, &path, "once").status, 200);
    let signed = client.call(json!({ "op": "finish_sign_event", "timeout_ms": 15000 }));
    assert_eq!(signed["ok"], true, "{signed}");
    assert_eq!(signed["verified"], true, "{signed}");
    assert_eq!(signed["event"]["content"], "across instances", "{signed}");
}

on_both_engines!(
    the_approval_page_shows_the_tags_and_the_date_the_owner_would_sign,
    http_allow_once_lets_exactly_one_retry_of_the_same_request,
    http_allow_once_holds_for_the_date_the_owner_saw,
    http_allow_kind_holds_for_later_requests_and_across_a_restart,
    deny_another_account_csrf_and_unknown_ids_are_refused,
    an_expired_approval_cannot_be_decided,
    a_burst_of_requests_stores_no_more_approvals_than_the_cap,
    an_account_keeps_at_most_a_hundred_approvals_waiting,
    an_approval_of_a_revoked_app_cannot_be_allowed,
    nip46_auth_url_then_the_owners_decision_reaches_the_client,
    nip46_auth_url_then_the_owners_decision_reaches_an_ndk_client,
    nip46_auth_url_then_the_owners_decision_reaches_a_rust_nostr_client,
    nip46_an_undecided_approval_ends_in_an_error_reply,
);
