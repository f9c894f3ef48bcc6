//! Registered apps against the real binary: `keycast clients add|list|remove` and the
//! admin API register them; the consent page shows a registered app's name as verified
//! with its redirect host, an unregistered `client_id` as unverified with its redirect host
//! prominent; a registered app's redirect URIs match exactly; with open registration off
//! an unregistered app is refused.

mod harness;

use harness::api::*;
use harness::flow::{pkce, register};
use harness::{keycast_cli, Engine, Keycast, Launch};
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "an-operator-token-of-at-least-32-characters";
const APP_REDIRECT: &str = "http://127.0.0.1:9/registered/callback";

fn start(engine: Engine, env: &[(&str, &str)]) -> (tempfile::TempDir, Keycast) {
    let dir = tempfile::tempdir().unwrap();
    let mut launch = Launch::on(engine, &dir.path().join("data"));
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    (dir, launch.start())
}

/// `keycast clients …` against the server's own database.
fn clients_cli(server: &Keycast, args: &[&str]) -> harness::Finished {
    let data_dir = server.data_dir.to_str().unwrap().to_owned();
    let mut env = vec![("KEYCAST_DATA_DIR", data_dir.as_str())];
    let url = server.database.as_ref().map(|db| db.url.clone());
    if let Some(url) = &url {
        env.push(("DATABASE_URL", url.as_str()));
    }
    let mut full = vec!["clients"];
    full.extend_from_slice(args);
    keycast_cli(&full, &env)
}

fn authorize_path(client_id: &str, redirect: &str) -> String {
    let (challenge, _) = pkce();
    let query = form(&[
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect),
        ("scope", "policy:social"),
        ("state", "s"),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
    ]);
    format!("/api/oauth/authorize?{query}")
}

fn cli_registered_app_is_verified_with_an_exact_redirect_and_others_unverified(engine: Engine) {
    let (_dir, server) = start(engine, &[]);
    let added = clients_cli(
        &server,
        &[
            "add",
            "--name",
            "Damus <Web>",
            "--redirect-uri",
            APP_REDIRECT,
            "--logo-url",
            "https://damus.example/logo.png",
            "--json",
        ],
    );
    assert!(added.status.success(), "clients add: {}", added.stderr);
    let client: Value = serde_json::from_str(added.stdout.trim()).expect("JSON on stdout");
    let id = client["client_id"].as_str().unwrap().to_owned();
    assert_eq!(client["redirect_uris"], json!([APP_REDIRECT]));
    let listed = clients_cli(&server, &["list", "--json"]);
    assert!(listed.stdout.contains(&id), "{}", listed.stdout);

    let (cookie, _) = register(&server, "owner@example.com", None);
    let page = get(&server, &authorize_path(&id, APP_REDIRECT), Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("Allow <strong>Damus &lt;Web&gt;</strong>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("Verified app"), "{}", page.body);
    assert!(
        page.body.contains("http://127.0.0.1:9"),
        "the redirect host is shown: {}",
        page.body
    );
    assert!(!page.body.contains("Unverified"), "{}", page.body);

    // Exact match: a sibling path, an extra query or a prefix is refused, not redirected to.
    for near in [
        "http://127.0.0.1:9/registered/callback/x",
        "http://127.0.0.1:9/registered/callback?x=1",
        "http://127.0.0.1:9/registered",
    ] {
        let refused = get(&server, &authorize_path(&id, near), Some(&cookie));
        assert_eq!(refused.status, 400, "{near}: {}", refused.body);
        assert!(refused.body.contains("registered for this app"), "{}", refused.body);
        assert_eq!(refused.location, None);
    }

    // An unregistered client_id: unverified, its redirect host in the heading.
    let page = get(&server, &authorize_path("Damus <Web>", REDIRECT), Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body
            .contains("Allow <strong class=\"redirect-host\">http://127.0.0.1:9</strong>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("Unverified app"), "{}", page.body);
    assert!(!page.body.contains("Verified app:"), "{}", page.body);

    let removed = clients_cli(&server, &["remove", &id]);
    assert!(removed.status.success(), "{}", removed.stderr);
    let again = clients_cli(&server, &["remove", &id]);
    assert!(!again.status.success());
    assert!(again.stderr.contains("no registered app"), "{}", again.stderr);
    let page = get(&server, &authorize_path(&id, APP_REDIRECT), Some(&cookie));
    assert!(
        page.body.contains("Unverified app"),
        "a removed app is unverified: {}",
        page.body
    );

    let bad = clients_cli(
        &server,
        &["add", "--name", "X", "--redirect-uri", "http://evil.example/cb"],
    );
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("redirect URI"), "{}", bad.stderr);
}

fn admin_api_needs_the_operator_token_and_registers_lists_and_removes(engine: Engine) {
    let (_dir, off) = start(engine, &[]);
    let r = admin(&off, "GET", "/api/admin/clients", Some(ADMIN_TOKEN), None);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("KEYCAST_ADMIN_TOKEN"), "{}", r.body);
    drop(off);

    let (_dir, server) = start(engine, &[("KEYCAST_ADMIN_TOKEN", ADMIN_TOKEN)]);
    for token in [None, Some("wrong"), Some(&ADMIN_TOKEN[1..])] {
        let r = admin(&server, "GET", "/api/admin/clients", token, None);
        assert_eq!(r.status, 401, "{token:?}: {}", r.body);
        assert_eq!(r.json()["error"], "unauthorized");
    }
    let body = json!({ "name": "Coracle", "redirect_uris": [APP_REDIRECT] });
    let created = admin(&server, "POST", "/api/admin/clients", Some(ADMIN_TOKEN), Some(&body));
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["client_id"].as_str().unwrap().to_owned();
    let unauthorized = admin(&server, "POST", "/api/admin/clients", None, Some(&body));
    assert_eq!(unauthorized.status, 401);

    let bad = json!({ "name": "", "redirect_uris": [APP_REDIRECT] });
    let r = admin(&server, "POST", "/api/admin/clients", Some(ADMIN_TOKEN), Some(&bad));
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("bad_request")),
        "{}",
        r.body
    );
    assert!(r.json()["message"].as_str().unwrap().contains("name"), "{}", r.body);

    let listed = admin(&server, "GET", "/api/admin/clients", Some(ADMIN_TOKEN), None).json();
    assert_eq!(listed["clients"][0]["client_id"], id.as_str());
    assert_eq!(listed["clients"][0]["name"], "Coracle");
    let path = format!("/api/admin/clients/{id}");
    assert_eq!(admin(&server, "DELETE", &path, None, None).status, 401);
    assert_eq!(admin(&server, "DELETE", &path, Some(ADMIN_TOKEN), None).status, 204);
    assert_eq!(admin(&server, "DELETE", &path, Some(ADMIN_TOKEN), None).status, 404);
}

fn closed_registration_refuses_unregistered_apps_and_serves_registered_ones(engine: Engine) {
    let (_dir, server) = start(
        engine,
        &[
            ("KEYCAST_ADMIN_TOKEN", ADMIN_TOKEN),
            ("KEYCAST_OPEN_REGISTRATION", "false"),
        ],
    );
    let (cookie, _) = register(&server, "closed@example.com", None);
    let refused = get(&server, &authorize_path("test-app", REDIRECT), Some(&cookie));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.json()["error"], "unauthorized_client", "{}", refused.body);
    assert!(
        refused.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("registered"),
        "{}",
        refused.body
    );

    let body = json!({ "name": "Primal", "redirect_uris": [APP_REDIRECT] });
    let created = admin(&server, "POST", "/api/admin/clients", Some(ADMIN_TOKEN), Some(&body));
    let id = created.json()["client_id"].as_str().unwrap().to_owned();
    let page = get(&server, &authorize_path(&id, APP_REDIRECT), Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<strong>Primal</strong>") && page.body.contains("Verified app"));
}

#[test]
fn an_app_registered_from_the_shell_while_serving_survives_a_redeploy() {
    // `keycast clients add` commits to the live SQLite database beside the running service:
    // a write the service did not make. Its replicator must ship it like its own, or the
    // next deploy (a wiped disk, restored from the replica) silently loses the app.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let launch = Launch::new(&data).redeployable(&dir.path().join("replica"));
    let server = launch.start();
    let added = clients_cli(
        &server,
        &["add", "--name", "Nostrudel", "--redirect-uri", APP_REDIRECT, "--json"],
    );
    assert!(added.status.success(), "clients add while serving: {}", added.stderr);
    let id = serde_json::from_str::<Value>(added.stdout.trim()).unwrap()["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (cookie, _) = register(&server, "owner@example.com", None);
    let page = get(&server, &authorize_path(&id, APP_REDIRECT), Some(&cookie));
    assert!(
        page.body.contains("Verified app"),
        "the serving instance sees it: {}",
        page.body
    );
    server.stop();

    std::fs::remove_dir_all(&data).unwrap();
    // On the wiped disk, before the new instance restored it: the command refuses instead of
    // creating an empty database there, which `serve` would then refuse to start on.
    let env = [
        ("KEYCAST_DATA_DIR", data.to_str().unwrap()),
        (
            "KEYCAST_REPLICA_URL",
            &format!("file://{}", dir.path().join("replica").display()),
        ),
    ];
    let early = harness::keycast_cli(&["clients", "list"], &env);
    assert!(!early.status.success(), "{}", early.stdout);
    assert!(early.stderr.contains("KEYCAST_REPLICA_URL"), "{}", early.stderr);
    assert!(!data.join("keycast.db").exists(), "no empty database left behind");
    let server = launch.start();
    let listed = clients_cli(&server, &["list", "--json"]);
    assert!(listed.stdout.contains(&id), "lost in the redeploy: {}", listed.stdout);
    let cookie = login_cookie(&server, "owner@example.com");
    let page = get(&server, &authorize_path(&id, APP_REDIRECT), Some(&cookie));
    assert!(page.body.contains("<strong>Nostrudel</strong>") && page.body.contains("Verified app"));
}

/// `keycast clients add` beside a service that is idle: its replicator shipped only after a
/// commit of its own (or at its stop), so the app sat in the local WAL alone — an idle
/// instance's next write might be an hour away, and a lost disk or a deploy meanwhile lost
/// it. The replicator now looks every second for commits it did not make.
#[test]
fn an_app_registered_from_the_shell_beside_an_idle_service_reaches_the_replica_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    // Compaction an hour apart: its timer (every 10 s by default, for a while after each
    // shipment) would otherwise wake the replicator, as any write of its own would; an
    // instance idle for a few minutes has no timer sooner than its hourly ones.
    let server = Launch::new(&dir.path().join("data"))
        .redeployable(&replica)
        .env("KEYCAST_REPLICA_COMPACTION_LEVELS", "3600")
        .start();
    let added = clients_cli(
        &server,
        &["add", "--name", "Amethyst", "--redirect-uri", APP_REDIRECT, "--json"],
    );
    assert!(added.status.success(), "clients add while serving: {}", added.stderr);
    let id = serde_json::from_str::<Value>(added.stdout.trim()).unwrap()["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Nothing else happens on the service. The replica gets the app within seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    for n in 0.. {
        let out = dir.path().join(format!("probe-{n}.db"));
        harness::keycast_cli(
            &[
                "restore",
                "--replica",
                &format!("file://{}", replica.display()),
                "-o",
                out.to_str().unwrap(),
            ],
            &[],
        )
        .assert_success("keycast restore");
        let found = harness::sqlite_query(
            &out,
            &format!("SELECT count(*) FROM oauth_clients WHERE client_id = '{id}'"),
        );
        if found.trim() == "1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the app registered beside the idle service is still not in the replica"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(server.get("/healthz/ready").0, 200);
}

/// `keycast clients add` on a persistent disk after the service crashed (SIGKILL, an OOM
/// kill), before it is started again. Before, the command's connection was the last one and
/// SQLite folded the WAL into the file on close; the next start found the WAL gone under its
/// record, took it for a power loss, moved the database aside and restored the replica: the
/// app the command said it registered was gone. Now commands leave the WAL for `serve` to
/// ship.
/// Starts keycast, registers an account, kills it (SIGKILL), then registers an app from the
/// shell on its database: a commit in the WAL only. Returns the app's `client_id`.
fn an_app_added_after_a_crash(launch: &Launch) -> String {
    let mut server = launch.start();
    register(&server, "before-the-crash@example.com", None);
    server.signal(libc::SIGKILL);
    server.wait_exit(std::time::Duration::from_secs(10));
    let added = clients_cli(
        &server,
        &["add", "--name", "Coracle", "--redirect-uri", APP_REDIRECT, "--json"],
    );
    assert!(added.status.success(), "clients add after the crash: {}", added.stderr);
    serde_json::from_str::<Value>(added.stdout.trim()).unwrap()["client_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// After a crash, another program's last connection (an operator's `sqlite3` look) folded
/// the WAL into the file and removed it. The next start sees the replicated frames gone
/// under its record (as after a power loss), moves the copy aside and restores: an app the
/// shell registered meanwhile was lost, though the shell had said "registered". The shell
/// now checks what start-up checks, and refuses.
#[test]
fn the_shell_refuses_a_copy_whose_wal_lost_what_was_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let (data, replica) = (dir.path().join("data"), dir.path().join("replica"));
    let launch = Launch::new(&data).redeployable(&replica);
    let mut server = launch.start();
    register(&server, "before-the-crash@example.com", None);
    server.signal(libc::SIGKILL);
    server.wait_exit(std::time::Duration::from_secs(10));
    harness::sqlite_exec(&data.join("keycast.db"), "SELECT count(*) FROM users");
    assert!(
        !data.join("keycast.db-wal").exists(),
        "sqlite3 folded and removed the WAL"
    );
    let added = harness::keycast_cli(
        &["clients", "add", "--name", "Coracle", "--redirect-uri", APP_REDIRECT],
        &[
            ("KEYCAST_DATA_DIR", data.to_str().unwrap()),
            ("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display())),
        ],
    );
    assert!(
        !added.status.success(),
        "registered on a copy the next start restores over: {}",
        added.stdout
    );
    assert!(added.stderr.contains("no longer holds commits"), "{}", added.stderr);
}

#[test]
fn an_app_registered_from_the_shell_after_a_crash_is_kept_and_replicated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let launch = Launch::new(&data).redeployable(&dir.path().join("replica"));
    let id = an_app_added_after_a_crash(&launch);

    let server = launch.start();
    let listed = clients_cli(&server, &["list", "--json"]);
    assert!(listed.stdout.contains(&id), "lost at the next start: {}", listed.stdout);
    server.stop();
    // And in the replica: a wiped disk gets it back.
    std::fs::remove_dir_all(&data).unwrap();
    let server = launch.start();
    let listed = clients_cli(&server, &["list", "--json"]);
    assert!(listed.stdout.contains(&id), "not replicated: {}", listed.stdout);
}

/// A start that fails after it opened the database (here: replication cannot start) closed
/// it as a clean stop does, and SQLite folded the WAL into the file. The next start found the
/// WAL gone under its record, took that for a power loss and restored the replica over the
/// file: what the crash had left unshipped (this app) was gone for good.
#[test]
fn a_start_that_fails_after_a_crash_leaves_the_unshipped_commits_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let replica = dir.path().join("replica");
    let launch = Launch::new(&data).redeployable(&replica);
    let id = an_app_added_after_a_crash(&launch);

    let failing = Launch::new(&data)
        .redeployable(&replica)
        .env("FAILPOINTS", "replica-align=return");
    match failing.start_or_exit() {
        Ok(started) => {
            started.stop();
            assert_ne!(
                std::env::var("KEYCAST_REQUIRE_PEERS").as_deref(),
                Ok("1"),
                "this keycast was built without fault injection (feature keycast/failpoints)"
            );
            eprintln!("SKIPPED: built without fault injection");
            return;
        }
        Err(failed) => assert!(
            failed.stderr.contains("fail point replica-align"),
            "the start failed for another reason:\n{}",
            failed.stderr
        ),
    }

    let server = launch.start();
    let listed = clients_cli(&server, &["list", "--json"]);
    assert!(
        listed.stdout.contains(&id),
        "lost after the failed start: {}",
        listed.stdout
    );
    server.stop();
    std::fs::remove_dir_all(&data).unwrap();
    let server = launch.start();
    let listed = clients_cli(&server, &["list", "--json"]);
    assert!(listed.stdout.contains(&id), "not replicated: {}", listed.stdout);
}

/// A second process on the live database — `keycast clients add`, or an operator's
/// `sqlite3` — closes its connection believing it is alone unless the service still holds
/// SQLite's locks; it then checkpoints and deletes the WAL under the service, which goes on
/// committing into the unlinked file. The service's locks are POSIX advisory locks, which
/// the process loses whenever any descriptor of the file is closed: the replicator must
/// never open and close the database file on its own.
#[test]
fn the_shell_on_the_live_database_leaves_the_services_wal_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Launch::new(&data).redeployable(&dir.path().join("replica")).start();
    let db = data.join("keycast.db");
    let emails = ["a@example.com", "b@example.com", "c@example.com"];
    register(&server, emails[0], None);
    for (round, email) in emails[1..].iter().enumerate() {
        let name = format!("App {round}");
        let added = clients_cli(&server, &["add", "--name", &name, "--redirect-uri", APP_REDIRECT]);
        assert!(added.status.success(), "clients add while serving: {}", added.stderr);
        // An operator's query through the sqlite3 shell, a write.
        harness::sqlite_exec(&db, "UPDATE users SET updated_at = updated_at + 1");
        register(&server, email, None);
        assert!(
            std::fs::exists(data.join("keycast.db-wal")).unwrap(),
            "the WAL of the running service was deleted under it"
        );
        let seen = harness::sqlite_query(&db, "SELECT COUNT(*) FROM users");
        assert_eq!(
            seen,
            (round + 2).to_string(),
            "another reader sees every account the service made"
        );
    }
    server.stop();
    let again = Launch::new(&data).redeployable(&dir.path().join("replica")).start();
    for email in emails {
        login_cookie(&again, email);
    }
    let listed = clients_cli(&again, &["list", "--json"]);
    assert!(
        listed.stdout.contains("App 0") && listed.stdout.contains("App 1"),
        "{}",
        listed.stdout
    );
    again.stop();
    assert_eq!(harness::sqlite_query(&db, "PRAGMA integrity_check"), "ok");
}

fn login_cookie(server: &Keycast, email: &str) -> String {
    let r = post_json(
        server,
        "/api/auth/login",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    );
    assert_eq!(r.status, 200, "login: {}", r.body);
    cookie_of(&r)
}

/// A path segment that is not UTF-8 once decoded (`%FF`) got axum's own plain-text 400 on
/// every route with an id in its path, not keycast's JSON error (or, on a page, its HTML
/// page): a client parsing errors as documented failed on it (found by a review).
#[test]
fn a_malformed_id_in_a_path_gets_keycasts_own_error() {
    let (_dir, server) = start(Engine::Sqlite, &[("KEYCAST_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let r = admin(&server, "DELETE", "/api/admin/clients/%FF", Some(ADMIN_TOKEN), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "bad_request", "{}", r.body);
    let (cookie, _) = register(&server, "paths@example.com", None);
    let r = delete(&server, "/api/user/authorizations/%FF", &cookie);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "bad_request", "{}", r.body);
    let page = get(&server, "/approvals/%FF", Some(&cookie));
    assert_eq!(page.status, 400, "{}", page.body);
    assert!(page.body.starts_with("<!doctype html>"), "{}", page.body);
}

on_both_engines!(
    cli_registered_app_is_verified_with_an_exact_redirect_and_others_unverified,
    admin_api_needs_the_operator_token_and_registers_lists_and_removes,
    closed_registration_refuses_unregistered_apps_and_serves_registered_ones,
);

/// `keycast clients add` on a copy another instance has moved past (this host handed the
/// replica over, or another took it): the command said "registered", and the next
/// `keycast serve` here found its copy behind the replica, moved it aside and restored —
/// the app was gone. The command now refuses, saying why.
#[test]
fn the_shell_refuses_a_copy_the_replica_has_moved_past() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let (a_data, b_data) = (dir.path().join("a"), dir.path().join("b"));
    let a = Launch::new(&a_data).redeployable(&replica).start();
    a.stop();
    let b = Launch::new(&b_data).redeployable(&replica).start();
    register(&b, "moved-on@example.com", None);
    b.stop();
    let env = [
        ("KEYCAST_DATA_DIR", a_data.to_str().unwrap()),
        ("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display())),
    ];
    let added = harness::keycast_cli(
        &["clients", "add", "--name", "Lost", "--redirect-uri", APP_REDIRECT],
        &env,
    );
    assert!(
        !added.status.success(),
        "a change to a copy the next start restores over was accepted: {}",
        added.stdout
    );
    assert!(added.stderr.contains("has reached TXID"), "{}", added.stderr);
    // An `sqlite3` session with the copy open changes nothing: it ships nothing.
    let mut session = std::process::Command::new("sqlite3")
        .arg(a_data.join("keycast.db"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = session.stdin.as_mut().unwrap();
        stdin.write_all(b"SELECT count(*) FROM users;\n").unwrap();
        stdin.flush().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let beside = harness::keycast_cli(
        &["clients", "add", "--name", "Lost", "--redirect-uri", APP_REDIRECT],
        &env,
    );
    let _ = session.kill();
    let _ = session.wait();
    assert!(
        !beside.status.success(),
        "an sqlite3 session with the copy open let the change through: {}",
        beside.stdout
    );
    assert!(beside.stderr.contains("has reached TXID"), "{}", beside.stderr);
    // Reading it writes nothing the replica could miss, and asks nothing of the store.
    harness::keycast_cli(&["clients", "list"], &env).assert_success("clients list on the old copy");
    // A copy of another database beside this replica: `serve` refuses it, and so does the shell.
    let other = dir.path().join("other");
    let c = Launch::new(&other)
        .redeployable(&dir.path().join("other-replica"))
        .start();
    c.stop();
    let mismatched = harness::keycast_cli(
        &["clients", "add", "--name", "Lost", "--redirect-uri", APP_REDIRECT],
        &[
            ("KEYCAST_DATA_DIR", other.to_str().unwrap()),
            ("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display())),
        ],
    );
    assert!(!mismatched.status.success(), "{}", mismatched.stdout);
    assert!(mismatched.stderr.contains("another lineage"), "{}", mismatched.stderr);
    // Where the replica is current, the shell works as before.
    let env = [
        ("KEYCAST_DATA_DIR", b_data.to_str().unwrap()),
        ("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display())),
    ];
    harness::keycast_cli(&["clients", "list"], &env).assert_success("clients list on the current copy");
}

/// `keycast clients list` only reads. Run with a newer keycast against a database another
/// revision serves, it migrated that database (under the serving instance, before its own
/// revision was deployed). Now a command that only reads migrates nothing: a schema older
/// than the binary is refused, saying why, and left as it was.
#[test]
fn a_command_that_only_reads_migrates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    Launch::new(&data).start().stop();
    let db = data.join("keycast.db");
    // As a database last served by the revision before the newest migration.
    harness::sqlite_exec(
        &db,
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
    );
    let versions = || harness::sqlite_query(&db, "SELECT COUNT(*), MAX(version) FROM _sqlx_migrations");
    let before = versions();
    let listed = keycast_cli(&["clients", "list"], &[("KEYCAST_DATA_DIR", data.to_str().unwrap())]);
    assert!(!listed.status.success(), "{}", listed.stdout);
    assert!(
        listed.stderr.contains("does not migrate"),
        "says why: {}",
        listed.stderr
    );
    assert_eq!(versions(), before, "the schema is as it was");
}
