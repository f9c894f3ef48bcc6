//! Several `keycast serve` processes on one PostgreSQL database, as behind a load balancer
//! with no sticky sessions (issue 13): a revocation made on one instance is refused by
//! every other on the very next request, the rate limits that guard passwords count
//! every instance's attempts together, and so do a grant's limits on signatures.

mod harness;

use std::time::{Duration, Instant};

use std::collections::HashMap;

use harness::api::*;
use harness::flow::{
    access_token, approve, approve_with, authorize_query, grant, login, pkce, register, token_request,
};
use harness::link::SilentLink;
use harness::native::{Cipher, NativeClient};
use harness::nostr::{keypair, stored, BunkerClient, Relay};
use harness::{metric_sum, Keycast, Launch, PgDatabase, TEST_MASTER_KEY};
use nostr::nips::nip44;
use nostr::{Keys, PublicKey, SecretKey};
use serde_json::{json, Value};

/// `n` instances on one fresh database, sharing the master key (as every instance of one
/// service must). Caches are trusted for an hour, so nothing below passes by a cache
/// merely expiring: only the instances telling each other makes it pass.
fn instances(n: usize) -> Option<(tempfile::TempDir, Vec<Keycast>)> {
    instances_with(n, &[])
}

fn instances_with(n: usize, env: &[(&str, &str)]) -> Option<(tempfile::TempDir, Vec<Keycast>)> {
    harness::engine::postgres_server()?;
    let database = PgDatabase::create("many");
    let dir = tempfile::tempdir().unwrap();
    let servers = (0..n)
        .map(|i| {
            let mut launch = member(dir.path(), &database, i);
            for (k, v) in env {
                launch = launch.env(k, v);
            }
            launch.start()
        })
        .collect();
    Some((dir, servers))
}

/// Instance `i` of those on `database`, its data under `dir`: the shared master key, caches
/// trusted for an hour.
fn member(dir: &std::path::Path, database: &std::sync::Arc<PgDatabase>, i: usize) -> Launch {
    Launch::new(&dir.join(format!("data{i}")))
        .postgres(database)
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
        .env("KEYCAST_CACHE_TTL_SECS", "3600")
}

fn sign(server: &Keycast, token: &str) -> Reply {
    rpc(server, token, "sign_event", json!([{ "kind": 1, "content": "hello" }]))
}

#[test]
fn a_revocation_on_one_instance_is_refused_by_every_other_on_the_next_request() {
    let Some((_dir, servers)) = instances(3) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "alice@example.com", None);
    // Each round revokes on a different instance, the others having just signed (so each
    // holds the authorization in its caches).
    for (round, revoker) in servers.iter().enumerate() {
        let token = access_token(&servers[round % 3], &cookie);
        for server in &servers {
            let r = sign(server, &token);
            assert_eq!(r.status, 200, "round {round}, before revoking: {}", r.body);
        }
        let list = get(revoker, "/api/user/authorizations", Some(&cookie)).json();
        let live: Vec<&str> = list["authorizations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["revoked_at"].is_null())
            .map(|a| a["id"].as_str().unwrap())
            .collect();
        assert_eq!(live.len(), 1, "{list}");
        let revoked = delete(revoker, &format!("/api/user/authorizations/{}", live[0]), &cookie);
        assert_eq!(revoked.status, 204, "{}", revoked.body);
        for (i, server) in servers.iter().enumerate() {
            let r = sign(server, &token);
            assert_eq!(
                r.status, 401,
                "round {round}: instance {i} signed with a token revoked on instance {round}: {}",
                r.body
            );
            assert!(r.json()["error"].as_str().unwrap().contains("revoked"), "{}", r.body);
        }
    }
}

/// A revocation whose database answer was lost after it committed (a connection reset, a
/// proxy): the owner got an error and tried again. Before, the first try told no other
/// instance (the error returned before the notice), and the retry answered 404 at once
/// ("already revoked") without waiting for anyone: another instance went on signing with the
/// revoked token from its cache (an hour here) — at once if it was slow to hear. Now the
/// notice goes out whatever the answer, and the retry's 404 comes only once every instance
/// has dropped the grant or stopped trusting its caches.
#[test]
fn a_revocation_whose_answer_was_lost_is_in_force_everywhere_when_the_retry_answers() {
    let Some((_dir, servers)) = instances_with(2, &[("KEYCAST_TEST_ROUTES", "true")]) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "lost@example.com", None);
    let token = access_token(&servers[0], &cookie);
    for server in &servers {
        assert_eq!(sign(server, &token).status, 200, "cached on both");
    }
    let list = get(&servers[0], "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    if !harness::arm_failpoint(&servers[0], "revoke-answer-lost", "1*return") {
        return;
    }
    // The other instance is slow to hear (a CPU-starved listener): it acknowledges nothing,
    // and trusts its caches only for the sync timeout past the last beat it heard.
    assert!(harness::arm_failpoint(&servers[1], "cluster-listen-behind", "return"));
    let path = format!("/api/user/authorizations/{id}");
    let lost = delete(&servers[0], &path, &cookie);
    assert!(lost.status >= 500, "the first try fails: {} {}", lost.status, lost.body);
    let retried = delete(&servers[0], &path, &cookie);
    assert_eq!(retried.status, 404, "{}", retried.body);
    assert!(retried.body.contains("revoked already"), "{}", retried.body);
    for (i, server) in servers.iter().enumerate() {
        let r = sign(server, &token);
        assert_eq!(
            r.status, 401,
            "instance {i} signed after the retry was answered: {}",
            r.body
        );
    }
    let unknown = delete(&servers[0], "/api/user/authorizations/nothing-of-yours", &cookie);
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}

/// Any role that may connect to the database may NOTIFY on keycast's channel. Acknowledgements
/// from made-up instances (each id up to 8 KB) were kept for good, one map entry each: a few
/// hundred thousand notices took every instance's memory. Those from instances not known to
/// be live are now kept only while there is room.
#[test]
fn acknowledgements_from_made_up_instances_do_not_grow_memory() {
    let Some(_) = harness::engine::postgres_server() else {
        return;
    };
    let database = PgDatabase::create("forged_acks");
    let dir = tempfile::tempdir().unwrap();
    let server = member(dir.path(), &database, 0).start();
    let id = database.query("SELECT id FROM keycast_instances LIMIT 1");
    assert!(!id.is_empty(), "the instance registered itself");
    let rss_kib = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let before = rss_kib(server.pid());
    // 20,000 acknowledgements of the instance's change 1, each from a new 7,900-byte "instance":
    // about 160 MB if each were kept.
    database.query(&format!(
        "SELECT count(pg_notify('keycast_changes', format('ack %s%s {id} 1', g, repeat('x', 7900)))) \
         FROM generate_series(1, 20000) g"
    ));
    // Read through once the server's notification queue is empty again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while database.query("SELECT pg_notification_queue_usage() > 0") == "t" {
        assert!(Instant::now() < deadline, "the instance never read the notices");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = rss_kib(server.pid());
    assert!(
        after < before + 50 * 1024,
        "20,000 made-up acknowledgements took the instance from {before} KiB to {after} KiB"
    );
    let (status, _) = server.get("/healthz/ready");
    assert_eq!(status, 200, "log:\n{}", server.log());
}

/// An instance whose request pool has run dry (its one connection waits on a table lock,
/// as behind a slow statement) still acknowledges the other instances' changes at once.
/// Before, its acknowledgements waited for that pool, and its listener applied nothing else
/// meanwhile: every revocation made on another instance waited out the 3 s sync timeout.
#[test]
fn an_instance_whose_request_pool_ran_dry_still_acknowledges_at_once() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("drypool");
    let dir = tempfile::tempdir().unwrap();
    let starved = member(dir.path(), &database, 0)
        .env("KEYCAST_DATABASE_MAX_CONNECTIONS", "1")
        .env("KEYCAST_NIP46", "false")
        .start();
    let other = member(dir.path(), &database, 1).env("KEYCAST_NIP46", "false").start();
    let (cookie, _) = register(&other, "dry@example.com", None);
    for _ in 0..3 {
        access_token(&other, &cookie);
    }
    let list = get(&other, "/api/user/authorizations", Some(&cookie)).json();
    let ids: Vec<String> = list["authorizations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    let (challenge, verifier) = pkce();
    let code = approve(&starved, &cookie, &authorize_query("policy:social", &challenge));

    let lock = LockingSession::of(&database, "oauth_codes", "ACCESS EXCLUSIVE");
    std::thread::scope(|scope| {
        // Holds the starved instance's only pooled connection, waiting on the lock.
        let stuck = scope.spawn(|| token_request(&starved, &code, &verifier, REDIRECT));
        // Only once the request waits on the lock does the pool hold nothing else.
        let deadline = Instant::now() + Duration::from_secs(20);
        while database.query(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        ) == "0"
        {
            assert!(Instant::now() < deadline, "the token request never waited on the lock");
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = sync_timeouts(std::slice::from_ref(&other));
        for id in &ids {
            let at = Instant::now();
            let revoked = delete(&other, &format!("/api/user/authorizations/{id}"), &cookie);
            assert_eq!(revoked.status, 204, "{}", revoked.body);
            assert!(
                at.elapsed() < Duration::from_secs(2),
                "a revocation waited {:?} for the starved instance",
                at.elapsed()
            );
        }
        assert_eq!(
            sync_timeouts(std::slice::from_ref(&other)),
            before,
            "no change gave up waiting"
        );
        drop(lock);
        stuck.join().unwrap();
    });
}

/// A request that is still arriving at `server` when it is told to stop: its headers and the
/// first bytes of `body` are sent, then SIGTERM, and the rest only once the instance has left
/// the others ([`Arriving::finish`]).
struct Arriving {
    raw: std::net::TcpStream,
    rest: Vec<u8>,
}

fn arriving_while_it_leaves(server: &Keycast, path: &str, headers: &str, body: &str) -> Arriving {
    use std::io::Write;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut raw = std::net::TcpStream::connect(&address).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        raw,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\n{headers}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    raw.write_all(&body.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    server.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("left the instances") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    Arriving {
        raw,
        rest: body.as_bytes()[10..].to_vec(),
    }
}

impl Arriving {
    /// Sends the rest of the body; the whole answer.
    fn finish(mut self) -> String {
        use std::io::{Read, Write};
        self.raw.write_all(&self.rest).unwrap();
        let mut answer = String::new();
        let _ = self.raw.read_to_string(&mut answer);
        answer
    }
}

/// SIGTERM on one instance while a signing request is still arriving; the instance leaves the
/// others at once (they take its bunkers and stop waiting for its acknowledgements), then
/// finishes the request. A revocation made elsewhere in between is answered without waiting
/// for it — so it must no longer trust what it cached. Before, it signed with the grant just
/// revoked (its caches were trusted until its last heartbeat plus the sync timeout, and with
/// a slow body, longer than that after its last one).
#[test]
fn an_instance_finishing_its_requests_after_leaving_obeys_a_revocation_made_elsewhere() {
    let Some((_dir, mut servers)) = instances(2) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "leaving@example.com", None);
    let token = access_token(&servers[0], &cookie);
    for server in &servers {
        assert_eq!(sign(server, &token).status, 200);
    }
    // A signing request arriving at the instance about to stop.
    let body = json!({"method": "sign_event", "params": [{"kind": 1, "content": "late"}]}).to_string();
    let arriving = arriving_while_it_leaves(
        &servers[1],
        "/api/nostr",
        &format!("Authorization: Bearer {token}\r\nContent-Type: application/json"),
        &body,
    );
    let list = get(&servers[0], "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let revoked = delete(&servers[0], &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let answer = arriving.finish();
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "the stopping instance signed with a grant revoked elsewhere: {answer}"
    );
    let _ = servers.pop().unwrap().wait_exit(Duration::from_secs(15));
}

/// The same stopping instance is asked, in a request that was arriving when it left, to
/// revoke a token (an app signing out): every other instance must hear of it. Before, leaving
/// stopped this instance's publisher with its heartbeat, so the change was never announced
/// and the others signed with the token for their cache's lifetime (an hour here).
#[test]
fn a_change_made_by_an_instance_finishing_its_requests_after_leaving_is_announced() {
    let Some((_dir, mut servers)) = instances(2) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "signing-out@example.com", None);
    let token = access_token(&servers[0], &cookie);
    for server in &servers {
        assert_eq!(sign(server, &token).status, 200);
    }
    let body = form(&[("token", token.as_str()), ("token_type_hint", "access_token")]);
    let arriving = arriving_while_it_leaves(
        &servers[1],
        "/api/oauth/revoke",
        "Content-Type: application/x-www-form-urlencoded",
        &body,
    );
    let answer = arriving.finish();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let r = sign(&servers[0], &token);
    assert_eq!(
        r.status, 401,
        "the other instance signed with the revoked token: {}",
        r.body
    );
    let _ = servers.pop().unwrap().wait_exit(Duration::from_secs(15));
}

/// A change notice that goes out late (the publisher behind) to an instance that does not
/// acknowledge it: the change is answered no sooner than the sync timeout after the notice
/// went out — by then that instance stops trusting what it cached unless it has applied the
/// notice. Before, the timeout ran from the call, and the answer came with the notice barely
/// out: an instance that had heard a heartbeat of its own sent in between still trusted its
/// caches.
#[test]
fn a_change_is_answered_no_sooner_than_the_sync_timeout_after_its_notice_went_out() {
    let Some((_dir, servers)) = instances_with(2, &[("KEYCAST_TEST_ROUTES", "true")]) else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let (cookie, _) = register(a, "late@example.com", None);
    let token = access_token(a, &cookie);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sign(b, &token).status, 200);
    if !harness::arm_failpoint(b, "cluster-listen-behind", "return")
        || !harness::arm_failpoint(a, "cluster-publish", "1*return(2000)")
    {
        return;
    }
    let list = get(a, "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let revoked = delete(a, &format!("/api/user/authorizations/{id}"), &cookie);
    let took = started.elapsed();
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    // The notice goes out 2 s after the revocation; the sync timeout is 3 s.
    assert!(
        took >= Duration::from_millis(4500),
        "answered {took:?} after the call, under 3 s after the notice went out"
    );
    // b never acknowledged: the wait that ran out is counted (the count other tests hold
    // unchanged to show every instance acknowledged at once).
    assert!(
        sync_timeouts(std::slice::from_ref(a)) >= 1.0,
        "a sync timeout went uncounted"
    );
}

/// A change whose notice cannot be sent within the sync timeout (its connection stalled, or a
/// hundred notices queued for one `revoke_all`), while the other instance hears its own
/// heartbeats and trusts its caches. Before, the change was answered at the sync timeout, the
/// notice still unsent, and the other instance went on signing with the revoked grant from
/// its cache. Now the wait for the send lasts as long as a cache entry lives.
#[test]
fn a_change_whose_notice_is_not_yet_sent_is_not_answered_while_others_trust_their_caches() {
    let env = [("KEYCAST_TEST_ROUTES", "true"), ("KEYCAST_CACHE_TTL_SECS", "20")];
    let Some((_dir, servers)) = instances_with(2, &env) else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let (cookie, _) = register(a, "unsent@example.com", None);
    let token = access_token(a, &cookie);
    assert_eq!(sign(b, &token).status, 200, "cached on the other instance");
    // The notice goes out 5 s after the revocation; the sync timeout is 3 s.
    if !harness::arm_failpoint(a, "cluster-publish", "1*return(5000)") {
        return;
    }
    let list = get(a, "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let revoked = delete(a, &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let after = sign(b, &token);
    assert_eq!(
        after.status, 401,
        "the other instance, once the revocation was answered: {}",
        after.body
    );
}

/// An access token revoked alone (RFC 7009, an app signing out) on one instance: every other
/// instance, each holding the token in its cache, refuses it on the very next request.
/// Before, only the revoking instance forgot it; the others signed with it for up to the
/// cache's lifetime.
#[test]
fn an_access_token_revoked_on_one_instance_is_refused_by_every_other_at_once() {
    let Some((_dir, servers)) = instances(3) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "tokens@example.com", None);
    let token = access_token(&servers[0], &cookie);
    for server in &servers {
        let r = sign(server, &token);
        assert_eq!(r.status, 200, "before revoking: {}", r.body);
    }
    let body = form(&[("token", token.as_str()), ("token_type_hint", "access_token")]);
    let revoked = post(
        &servers[1],
        "/api/oauth/revoke",
        None,
        "application/x-www-form-urlencoded",
        &body,
        &[],
    );
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    for (i, server) in servers.iter().enumerate() {
        let r = sign(server, &token);
        assert_eq!(r.status, 401, "instance {i} signed with a revoked token: {}", r.body);
    }
}

/// An account deleted on one instance: every other instance, each holding the account's
/// grant in its caches (trusted for an hour), refuses its token and its sessions on the very
/// next request. A password changed on one instance ends the owner's other sessions on every
/// instance.
#[test]
fn an_account_deleted_or_a_password_changed_on_one_instance_holds_on_every_other_at_once() {
    let Some((_dir, servers)) = instances(3) else {
        return;
    };
    let email = "alice@example.com";
    let (cookie, _) = register(&servers[0], email, None);
    let on_second = cookie_of(&login(&servers[1], email, PASSWORD));
    let changed = post_json(
        &servers[2],
        "/api/user/password",
        Some(&cookie),
        &json!({ "current_password": PASSWORD, "new_password": "a brand new passphrase" }),
    );
    assert_eq!(changed.status, 200, "{}", changed.body);
    let renewed = cookie_of(&changed);
    for (i, server) in servers.iter().enumerate() {
        for ended in [&on_second, &cookie] {
            assert_eq!(
                get(server, "/api/user/key", Some(ended)).status,
                401,
                "instance {i} kept a session the password change ended"
            );
        }
        assert_eq!(get(server, "/api/user/key", Some(&renewed)).status, 200, "instance {i}");
    }
    let cookie = renewed;

    let token = access_token(&servers[0], &cookie);
    for server in &servers {
        assert_eq!(sign(server, &token).status, 200);
    }
    let deleted = post_json(
        &servers[1],
        "/api/user/delete",
        Some(&cookie),
        &json!({ "password": "a brand new passphrase" }),
    );
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    for (i, server) in servers.iter().enumerate() {
        let r = sign(server, &token);
        assert_eq!(r.status, 401, "instance {i} signed for a deleted account: {}", r.body);
        assert_eq!(get(server, "/api/user/key", Some(&cookie)).status, 401, "instance {i}");
    }
}

/// A grant edited, or a custom policy changed, on one instance is obeyed by every other on
/// the very next request (caches trusted for an hour: only the announcement can do it).
#[test]
fn an_edit_of_a_grant_or_a_custom_policy_on_one_instance_is_obeyed_by_every_other_at_once() {
    let Some((_dir, servers)) = instances(2) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "editor@example.com", None);
    let token = grant(&servers[0], &cookie, "policy:social");
    let access = token["access_token"].as_str().unwrap();
    let id = token["authorization_id"].as_str().unwrap();
    for server in &servers {
        assert_eq!(sign(server, access).status, 200, "before the edit");
    }
    let created = post_json(
        &servers[0],
        "/api/user/policies",
        Some(&cookie),
        &json!({ "name": "No notes", "permissions": { "any_kind": true, "denied_kinds": [1] } }),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let slug = created.json()["slug"].as_str().unwrap().to_owned();
    let r = send_json(
        &servers[0],
        "PATCH",
        &format!("/api/user/authorizations/{id}"),
        &cookie,
        &json!({ "policy": slug }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for (i, server) in servers.iter().enumerate() {
        let r = sign(server, access);
        assert_eq!(
            r.status, 403,
            "instance {i} signed kind 1 after the grant was edited: {}",
            r.body
        );
    }
    // The policy itself changes on the other instance: the first obeys at once.
    let r = send_json(
        &servers[1],
        "PUT",
        &format!("/api/user/policies/{slug}"),
        &cookie,
        &json!({ "name": "Notes", "permissions": { "allowed_kinds": [1] } }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for (i, server) in servers.iter().enumerate() {
        let r = sign(server, access);
        assert_eq!(
            r.status, 200,
            "instance {i} after the policy allowed notes again: {}",
            r.body
        );
    }
}

#[test]
fn an_instance_whose_peer_died_still_answers_revocations() {
    // A peer that died without leaving (SIGKILL) cannot acknowledge: the revocation is
    // answered anyway, within the sync timeout, and refused by the survivors at once.
    let Some((_dir, mut servers)) = instances(3) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "bob@example.com", None);
    let token = access_token(&servers[0], &cookie);
    for server in &servers {
        assert_eq!(sign(server, &token).status, 200);
    }
    let mut dead = servers.pop().unwrap();
    dead.signal(libc::SIGKILL);
    dead.wait_exit(Duration::from_secs(10));
    let list = get(&servers[0], "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let revoked = delete(&servers[0], &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a dead peer held the revocation up for {:?}",
        started.elapsed()
    );
    for server in &servers {
        assert_eq!(sign(server, &token).status, 401);
    }
}

/// Consent on `server` with limits chosen by the owner (form fields of the consent page) →
/// an access token.
fn limited_token(server: &Keycast, cookie: &str, limits: &[(&str, &str)]) -> String {
    let (challenge, verifier) = pkce();
    let code = approve_with(server, cookie, &authorize_query("policy:social", &challenge), limits);
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["access_token"].as_str().unwrap().to_owned()
}

/// `per_instance` signatures on each instance at once (one thread per instance), all with
/// `token`: the statuses, and the refusals' codes.
fn sign_everywhere_at_once(servers: &[Keycast], token: &str, per_instance: usize) -> (usize, Vec<String>) {
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let threads: Vec<_> = servers
            .iter()
            .map(|server| scope.spawn(move || (0..per_instance).map(|_| sign(server, token)).collect::<Vec<_>>()))
            .collect();
        threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    let signed = replies.iter().filter(|r| r.status == 200).count();
    let refused = replies
        .iter()
        .filter(|r| r.status != 200)
        .map(|r| {
            assert_eq!(r.status, 403, "{}", r.body);
            r.json()["code"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    (signed, refused)
}

#[test]
fn a_grants_limits_hold_across_every_instance_together() {
    // Each instance counting its own would let 5 per minute through on each of three: 15.
    let Some((_dir, servers)) = instances(3) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "limited@example.com", None);
    let token = limited_token(&servers[1], &cookie, &[("per_minute", "5")]);
    let (signed, refused) = sign_everywhere_at_once(&servers, &token, 6);
    assert_eq!(
        signed, 5,
        "a limit of 5 per minute let {signed} of 18 through: {refused:?}"
    );
    assert!(refused.iter().all(|c| c == "grant_rate_limited"), "{refused:?}");
    let r = sign(&servers[2], &token);
    assert_eq!(r.status, 403, "{}", r.body);
    let says = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        says.contains("5 signatures per minute") && says.contains("retry in "),
        "{says}"
    );

    let token = limited_token(&servers[2], &cookie, &[("max_signatures", "4")]);
    let (signed, refused) = sign_everywhere_at_once(&servers, &token, 4);
    assert_eq!(signed, 4, "a total of 4 let {signed} of 12 through: {refused:?}");
    assert!(refused.iter().all(|c| c == "grant_exhausted"), "{refused:?}");
}

#[test]
fn the_login_limit_counts_every_instances_attempts_together() {
    // 10 logins per client, then one per 6 s (`LOGIN_PER_IP`). Spread over three instances
    // each sees at most 5 of 15 attempts: only a shared count refuses any.
    let Some((_dir, servers)) = instances(3) else {
        return;
    };
    let started = Instant::now();
    let statuses: Vec<u16> = (0..15)
        .map(|n| login(&servers[n % 3], &format!("nobody-{n}@example.org"), "wrong password").status)
        .collect();
    let refills = started.elapsed().as_secs() / 6 + 1;
    let let_through = statuses.iter().filter(|s| **s != 429).count() as u64;
    assert!(
        let_through <= 10 + refills,
        "{let_through} of 15 attempts got through in {:?}: {statuses:?}",
        started.elapsed()
    );
    assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
}

#[test]
fn wrong_passwords_on_every_instance_add_up_to_one_backoff() {
    // Five wrong passwords for one account from one client, spread over three instances,
    // start the wait (`FREE_FAILURES`): the next try, on yet another instance, is refused
    // even with the right password. Then a right password clears the count everywhere.
    let Some((_dir, servers)) = instances(3) else {
        return;
    };
    register(&servers[0], "carol@example.com", None);
    for n in 0..5 {
        let r = login(&servers[n % 3], "carol@example.com", "not the password");
        assert_eq!(r.status, 401, "attempt {n}: {}", r.body);
    }
    let refused = login(&servers[2], "carol@example.com", harness::api::PASSWORD);
    assert_eq!(
        refused.status, 429,
        "the fifth failure elsewhere did not count: {}",
        refused.body
    );
    let retry: u64 = refused.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "retry after {retry}");
    // Then the owner's right password works on any instance. (Each try also takes from
    // the client's login bucket, so wait out each Retry-After instead of polling.)
    let mut wait = retry;
    let mut tries = 0;
    loop {
        std::thread::sleep(Duration::from_secs(wait));
        let r = login(&servers[1], "carol@example.com", harness::api::PASSWORD);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.body);
        tries += 1;
        assert!(tries < 3, "never let in again: {}", r.body);
        wait = r.retry_after.as_deref().unwrap().parse().unwrap();
    }
    let r = login(&servers[0], "carol@example.com", "not the password");
    assert_eq!(r.status, 401, "a right password cleared the count: {}", r.body);
}

// ---------------------------------------------------------------------------------------
// NIP-46: every instance hears every request, one answers it.
// ---------------------------------------------------------------------------------------

/// How long an instance may be silent before the others take its bunkers, in the test.
const INSTANCE_TTL_SECS: u64 = 2;

/// A client of one bunker: its key and the bunker's.
struct Session {
    bunker_url: String,
    bunker: PublicKey,
    client: Keys,
}

/// The request ids the clients sent and how many replies each got, read from the relay
/// (decrypted with the clients' keys, as only they can).
fn requests_and_replies(relay: &str, sessions: &[Session]) -> (Vec<String>, HashMap<String, usize>) {
    let mut authors: Vec<PublicKey> = sessions.iter().map(|s| s.client.public_key()).collect();
    authors.extend(sessions.iter().map(|s| s.bunker));
    let mut requests = Vec::new();
    let mut replies: HashMap<String, usize> = HashMap::new();
    for event in stored(relay, authors) {
        let Some(session) = sessions
            .iter()
            .find(|s| event.pubkey == s.client.public_key() || event.pubkey == s.bunker)
        else {
            continue;
        };
        // One conversation key both ways: the client's secret and the bunker's public key.
        let Ok(text) = nip44::decrypt(session.client.secret_key(), &session.bunker, &event.content) else {
            continue;
        };
        let message: Value = serde_json::from_str(&text).unwrap();
        let id = message["id"].as_str().unwrap().to_owned();
        if event.pubkey == session.bunker {
            *replies.entry(id).or_default() += 1;
        } else {
            requests.push(id);
        }
    }
    (requests, replies)
}

fn sign_through(app: &mut BunkerClient, session: &Session, content: &str, timeout_ms: u64) -> Value {
    app.call_ok(json!({"op": "connect", "bunker": session.bunker_url,
        "client_sk": session.client.secret_key().to_secret_hex(), "handshake": false}));
    app.call(json!({"op": "sign_event", "event": {"kind": 1, "content": content}, "timeout_ms": timeout_ms}))
}

/// An app's bound client connecting again (a restart, a loop) changes nothing, so it waits
/// for no other instance. Before, each `connect` dropped the grant from every cache and waited
/// for every other instance to acknowledge that: with instances that do not (here they ignore
/// every notice), each reconnect waited out the 3 s sync timeout, and a loop of them filled
/// the requests in flight for everyone.
#[test]
fn a_bound_client_connecting_again_waits_for_no_other_instance() {
    let Some(relay) = Relay::start() else { return };
    let Some(mut app) = BunkerClient::spawn() else { return };
    let env = [("BUNKER_RELAYS", relay.url()), ("KEYCAST_TEST_ROUTES", "true")];
    let Some((_dir, servers)) = instances_with(2, &env) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "again@example.com", None);
    let token = grant(&servers[0], &cookie, "policy:social");
    let bunker_url = token["bunker_url"].as_str().unwrap().to_owned();
    let (client_sk, _) = keypair();
    let connected = app.connect_as(&bunker_url, &client_sk);
    assert_eq!(connected["ok"], true, "{connected}");
    if !listeners_held_behind(&servers) {
        return;
    }
    let timeouts = || sync_timeouts(&servers);
    let before = timeouts();
    for _ in 0..3 {
        let again = app.connect_as(&bunker_url, &client_sk);
        assert_eq!(again["ok"], true, "{again}");
    }
    assert_eq!(timeouts(), before, "reconnects waited for the other instance");
}

/// A signature under way on an instance that stopped hearing the others (its listener fell
/// behind), when the grant is revoked on another: that one waits for its acknowledgement
/// until the sync timeout, then answers. Before, the signature went out after that answer:
/// nothing had been dropped from the silent instance's caches, so nothing was looked at
/// again. Now a result whose instance cannot trust its caches reads the grant again.
#[test]
fn a_signature_under_way_on_an_instance_that_stopped_hearing_is_not_handed_out_after_a_revocation() {
    let ttl = INSTANCE_TTL_SECS.to_string();
    let env = [
        ("KEYCAST_TEST_ROUTES", "true"),
        ("KEYCAST_INSTANCE_TTL_SECS", ttl.as_str()),
    ];
    let Some((_dir, servers)) = instances_with(2, &env) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "unheard@example.com", None);
    let token = access_token(&servers[0], &cookie);
    assert_eq!(sign(&servers[1], &token).status, 200, "cached on the second instance");
    let list = get(&servers[0], "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    if !harness::arm_failpoint(&servers[1], "cluster-listen-behind", "return")
        || !harness::arm_failpoint(&servers[1], "signer-before-record", "1*return(6000)")
    {
        return;
    }
    let handed_out = std::thread::scope(|scope| {
        let signing = scope.spawn(|| sign(&servers[1], &token));
        std::thread::sleep(Duration::from_millis(300));
        let revoked = delete(&servers[0], &format!("/api/user/authorizations/{id}"), &cookie);
        assert_eq!(revoked.status, 204, "{}", revoked.body);
        signing.join().unwrap()
    });
    assert_eq!(handed_out.status, 401, "{}", handed_out.body);
}

/// Every instance's listener held behind (notices heard, never applied): a change then waits
/// for their acknowledgements until the sync timeout. False when fault injection is off.
fn listeners_held_behind(servers: &[Keycast]) -> bool {
    servers
        .iter()
        .all(|server| harness::arm_failpoint(server, "cluster-listen-behind", "return"))
}

/// How many times, on all `servers` together, a change gave up waiting for the others.
fn sync_timeouts(servers: &[Keycast]) -> f64 {
    servers
        .iter()
        .map(|s| metric_sum(&s.get("/metrics").1, "keycast_cluster_sync_timeouts_total"))
        .sum()
}

/// A token request with a made-up code, from anyone, logged in or not. Before, every code
/// exchange told every instance the bunkers had changed, whatever became of it: each re-read
/// every grant, and a change's wait for the others' acknowledgements queued behind those
/// re-reads (3 s each here, with the listeners held behind). Now only an exchange that made
/// or revoked a grant says so.
#[test]
fn a_made_up_code_makes_no_instance_wait() {
    let Some((_dir, servers)) = instances_with(2, &[("KEYCAST_TEST_ROUTES", "true")]) else {
        return;
    };
    if !listeners_held_behind(&servers) {
        return;
    }
    let timeouts = || sync_timeouts(&servers);
    let before = timeouts();
    let junk = [
        ("grant_type", "authorization_code"),
        ("code", "made-up"),
        ("client_id", "https://anyone.example"),
        ("redirect_uri", "https://anyone.example/cb"),
        ("code_verifier", "x"),
    ];
    let refused = post_form(&servers[0], "/api/oauth/token", None, &junk);
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(timeouts(), before, "a made-up code waited for the other instance");
}

#[test]
fn each_nip46_request_is_answered_once_and_a_dead_instances_bunkers_answer_again() {
    let Some(relay) = Relay::start() else { return };
    let Some(mut app) = BunkerClient::spawn() else { return };
    let ttl = INSTANCE_TTL_SECS.to_string();
    let Some((_dir, mut servers)) = instances_with(
        3,
        &[
            ("BUNKER_RELAYS", relay.url()),
            ("KEYCAST_INSTANCE_TTL_SECS", ttl.as_str()),
        ],
    ) else {
        return;
    };
    let (cookie, account) = register(&servers[0], "dora@example.com", None);
    let user = account["pubkey"].as_str().unwrap().to_owned();

    // Nine bunkers, granted on every instance in turn; each app connects (the secret) and
    // signs twice.
    let sessions: Vec<Session> = (0..9)
        .map(|n| {
            let token = grant(&servers[n % 3], &cookie, "policy:social");
            let bunker_url = token["bunker_url"].as_str().unwrap().to_owned();
            let bunker = PublicKey::from_hex(&bunker_url["bunker://".len()..][..64]).unwrap();
            let (client_sk, _) = keypair();
            let client = Keys::new(SecretKey::from_hex(&client_sk).unwrap());
            let connected = app.connect_as(&bunker_url, &client_sk);
            assert_eq!(connected["ok"], true, "bunker {n}: {connected}; stderr:\n{}", app.log());
            Session {
                bunker_url,
                bunker,
                client,
            }
        })
        .collect();
    for (n, session) in sessions.iter().enumerate() {
        for k in 0..2 {
            let signed = sign_through(&mut app, session, &format!("note {n}.{k}"), 5000);
            assert_eq!(signed["ok"], true, "bunker {n}: {signed}");
            assert_eq!(signed["event"]["pubkey"], user.as_str());
        }
    }

    // Every request answered exactly once: counted on the relay…
    let (requests, replies) = requests_and_replies(relay.url(), &sessions);
    assert_eq!(requests.len(), 9 * 3, "9 connects and 18 sign_events reached the relay");
    for id in &requests {
        assert_eq!(replies.get(id), Some(&1), "request {id}: replies {replies:?}");
    }
    // …and by the instances, which shared the bunkers out.
    let answered: Vec<f64> = servers
        .iter()
        .map(|s| metric_sum(&s.get("/metrics").1, "keycast_nip46_requests_total"))
        .collect();
    assert_eq!(
        answered.iter().sum::<f64>(),
        27.0,
        "answered per instance: {answered:?}"
    );
    assert!(
        answered.iter().filter(|n| **n > 0.0).count() >= 2,
        "one instance answered everything: {answered:?}"
    );

    // Kill the busiest instance without warning: its bunkers go silent until the others
    // see its heartbeat lapse, then answer again.
    let busiest = (0..3).max_by(|a, b| answered[*a].total_cmp(&answered[*b])).unwrap();
    let mut dead = servers.remove(busiest);
    dead.signal(libc::SIGKILL);
    dead.wait_exit(Duration::from_secs(10));
    let killed = Instant::now();
    let bound = Duration::from_secs(INSTANCE_TTL_SECS) + Duration::from_secs(INSTANCE_TTL_SECS) / 5;
    let mut slowest = Duration::ZERO;
    for (n, session) in sessions.iter().enumerate() {
        loop {
            let signed = sign_through(&mut app, session, &format!("after the kill {n}"), 1000);
            if signed["ok"] == true {
                break;
            }
            assert_eq!(signed["error"], "timeout", "bunker {n}: {signed}");
            assert!(
                killed.elapsed() < bound + Duration::from_secs(10),
                "bunker {n} still silent {:?} after the kill",
                killed.elapsed()
            );
        }
        slowest = slowest.max(killed.elapsed());
    }
    eprintln!("every bunker answered again {slowest:?} after the kill (stated bound {bound:?} + a client timeout)");
    // Still never twice, though requests to the dead instance's bunkers went unanswered.
    let (_, replies) = requests_and_replies(relay.url(), &sessions);
    assert!(replies.values().all(|n| *n == 1), "{replies:?}");

    // Revoked on one instance, refused over NIP-46 by whichever instance answers the
    // bunker, on the very next request.
    let list = get(&servers[0], "/api/user/authorizations", Some(&cookie)).json();
    for authz in list["authorizations"].as_array().unwrap() {
        let id = authz["id"].as_str().unwrap();
        let revoked = delete(&servers[0], &format!("/api/user/authorizations/{id}"), &cookie);
        assert_eq!(revoked.status, 204, "{}", revoked.body);
    }
    for (n, session) in sessions.iter().enumerate() {
        let refused = sign_through(&mut app, session, "after the revocation", 5000);
        assert_eq!(
            refused["ok"], false,
            "bunker {n} signed after its revocation: {refused}"
        );
        let error = refused["error"].as_str().unwrap();
        assert!(error.contains("revoked"), "bunker {n}: {error}");
    }
}

/// The bunkers are shared out among the instances that can answer them. Before, every live
/// instance got a share: one started with `KEYCAST_NIP46=false` (a supported split, HTTP on
/// some instances) or one cut off from the relay owned bunkers nobody answered, while every
/// probe passed — about a third of the apps here went silent for as long as it ran.
#[test]
fn only_instances_that_can_answer_nip46_are_given_bunkers() {
    let Some(relay) = Relay::start() else { return };
    let Some(mut app) = BunkerClient::spawn() else { return };
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("shares");
    let dir = tempfile::tempdir().unwrap();
    let ttl = INSTANCE_TTL_SECS.to_string();
    let launch = |i: usize| member(dir.path(), &database, i).env("KEYCAST_INSTANCE_TTL_SECS", &ttl);
    let direct = launch(0).env("BUNKER_RELAYS", relay.url()).start();
    let _http_only = launch(1).env("KEYCAST_NIP46", "false").start();
    // The third reaches the relay through a link that can go silent.
    let link = SilentLink::start(relay.url().trim_start_matches("ws://").to_owned());
    let linked = launch(2)
        .env("BUNKER_RELAYS", &format!("ws://127.0.0.1:{}", link.port))
        .start();
    let (cookie, _) = register(&direct, "shares@example.com", None);
    // Enough that the linked instance owns some (each is its with even odds).
    let sessions: Vec<Session> = (0..14)
        .map(|n| {
            let token = grant(&direct, &cookie, "policy:social");
            let bunker_url = token["bunker_url"].as_str().unwrap().to_owned();
            let bunker = PublicKey::from_hex(&bunker_url["bunker://".len()..][..64]).unwrap();
            let (client_sk, _) = keypair();
            let connected = app.connect_as(&bunker_url, &client_sk);
            assert_eq!(connected["ok"], true, "bunker {n}: {connected}");
            Session {
                bunker_url,
                bunker,
                client: Keys::new(SecretKey::from_hex(&client_sk).unwrap()),
            }
        })
        .collect();
    let sign_all = |app: &mut BunkerClient, what: &str| {
        for (n, session) in sessions.iter().enumerate() {
            let signed = sign_through(app, session, &format!("{what} {n}"), 5000);
            assert_eq!(signed["ok"], true, "bunker {n} ({what}): {signed}");
        }
    };
    sign_all(&mut app, "shared");
    let answered = |server: &Keycast| metric_sum(&server.get("/metrics").1, "keycast_nip46_requests_total");
    assert!(
        answered(&linked) > 0.0,
        "the linked instance took its share: {} / {}",
        answered(&direct),
        answered(&linked)
    );

    // Cut off from the relay without a word: once its keepalive gives the relay up, its
    // share goes to the instance that still hears it.
    link.freeze();
    let cut = Instant::now();
    while !linked
        .log()
        .lines()
        .any(|l| l.contains("share of the bunkers changes") && l.contains("answers=false"))
    {
        assert!(
            cut.elapsed() < Duration::from_secs(60),
            "never gave its share up:\n{}",
            linked.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sign_all(&mut app, "cut off");
    let (_, replies) = requests_and_replies(relay.url(), &sessions);
    assert!(
        replies.values().all(|n| *n == 1),
        "each request answered once: {replies:?}"
    );
}

/// A client that sends a request again in a new event (re-encrypted, the same id) while its
/// bunker changes hands: the owner was paused with the first event in its socket, the other
/// instance took the bunker over and answered the second, and the paused one, back, answered
/// the first too — two signatures, counted twice against the grant. Claims were per event;
/// now they are per (client, request id), so only the first claimant answers.
#[test]
fn a_request_sent_again_while_its_bunker_changes_hands_is_answered_once() {
    let Some(relay) = Relay::start() else { return };
    let ttl = INSTANCE_TTL_SECS.to_string();
    let env = [
        ("BUNKER_RELAYS", relay.url()),
        ("KEYCAST_INSTANCE_TTL_SECS", ttl.as_str()),
    ];
    let Some((_dir, servers)) = instances_with(2, &env) else {
        return;
    };
    let (cookie, _) = register(&servers[0], "again-elsewhere@example.com", None);
    let token = grant(&servers[0], &cookie, "policy:social");
    let url = token["bunker_url"].as_str().unwrap();
    let bunker = PublicKey::from_hex(&url["bunker://".len()..][..64]).unwrap();
    let secret = query_param(url, "secret").unwrap();
    let mut client = NativeClient::connect(relay.url(), bunker);
    client.send(&[("c".into(), "connect", json!(["", secret]))], Cipher::Nip44);
    assert_eq!(client.replies(1, Duration::from_secs(5))[0].json["result"], "ack");
    let answered = |server: &Keycast| metric_sum(&server.get("/metrics").1, "keycast_nip46_requests_total");
    let owner = if answered(&servers[0]) > 0.0 { 0 } else { 1 };
    let other = 1 - owner;

    servers[owner].signal(libc::SIGSTOP);
    let sign = json!([json!({"kind": 1, "content": "once", "tags": [], "created_at": 1_700_000_000}).to_string()]);
    client.send(&[("r".into(), "sign_event", sign.clone())], Cipher::Nip44);
    // The other instance takes the bunker once the paused one's heartbeat lapses.
    std::thread::sleep(Duration::from_secs(INSTANCE_TTL_SECS + 2));
    client.send(&[("r".into(), "sign_event", sign)], Cipher::Nip44);
    let first = client.replies(1, Duration::from_secs(5));
    assert_eq!(first.len(), 1, "the other instance answers the request sent again");
    assert!(answered(&servers[other]) > 0.0);
    servers[owner].signal(libc::SIGCONT);
    let more = client.replies(1, Duration::from_secs(4));
    assert!(
        more.is_empty(),
        "the paused instance, back, answered the request again: {:?}",
        more.iter().map(|r| &r.json).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// Start-up and schema changes.
// ---------------------------------------------------------------------------------------

/// A start waiting for another's migrations (an advisory lock) waited in silence: a holder
/// stuck for good (a migration waiting on an old transaction, a session a dead client left)
/// meant a start that hung with nothing in its log. Now it says so every 10 s, naming the
/// holder's session.
#[test]
fn a_start_waiting_for_the_migration_lock_says_who_holds_it() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("lockwait");
    let dir = tempfile::tempdir().unwrap();
    // keycast's migration lock (`migrate::MIGRATION_LOCK`), held as a stuck migration would.
    let holder = LockingSession::holding(
        &database,
        "DO $$ BEGIN PERFORM pg_advisory_lock(30229394540819316); END $$;",
    );
    let waiting = member(dir.path(), &database, 0).spawn_started_later().into_keycast();
    waiting.wait_for_log("waiting for another keycast's migrations", Duration::from_secs(30));
    let log = waiting.log();
    assert!(log.contains("application \\\"psql\\\""), "names the holder:\n{log}");
    assert_eq!(waiting.get("/healthz/startup").0, 503, "not started meanwhile");
    drop(holder);
    waiting.wait_for_status("/healthz/startup", 200, Duration::from_secs(30));
}

/// sqlx's own migration lock (`pg_advisory_lock` of a key made from the database's name),
/// held by any other session — a co-tenant role, another sqlx application migrating in the
/// same database: keycast's start waited in it inside its own lock, with no time limit and no
/// word. keycast serializes migrations under its own lock alone now, and starts.
#[test]
fn a_session_holding_sqlxs_migration_lock_does_not_hold_up_a_start() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("sqlxlock");
    let dir = tempfile::tempdir().unwrap();
    // sqlx's key: 0x3d32ad9e × CRC-32 (ISO-HDLC) of the database's name.
    let key = 0x3d32_ad9e_i64 * i64::from(crc32(database.name().as_bytes()));
    let holder = LockingSession::holding(
        &database,
        &format!("DO $$ BEGIN PERFORM pg_advisory_lock({key}); END $$;"),
    );
    let starting = member(dir.path(), &database, 0).spawn_started_later().into_keycast();
    starting.wait_for_status("/healthz/startup", 200, Duration::from_secs(30));
    drop(holder);
}

/// CRC-32 (ISO-HDLC, zlib's), as sqlx uses it for its lock key.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// PostgreSQL reads a statement's subqueries in the snapshot it started with. An export's
/// record ("exported, if the password it checked is still the account's") that waited for the
/// key's row past a password reset still saw the old password, and went through: the export
/// handed the key out, and the reset's take-over — which had already looked — never marked it
/// exposed, so the mailbox owner kept a key the password holder had. Under the account's lock
/// (which the reset's password write takes too) either the export comes first and the reset
/// sees it, or the export finds the new password and refuses.
#[test]
fn an_export_held_up_across_a_password_reset_is_seen_by_the_reset() {
    let Some((_dir, servers)) = instances(1) else {
        return;
    };
    let server = &servers[0];
    let database = server.database.clone().unwrap();
    let email = "held-export@example.com";
    let (holder, _) = register(server, email, None);
    let user = database.query(&format!("SELECT id FROM users WHERE email = '{email}'"));
    // The owner's link, asked for first: asking writes a token under the account's row.
    let asked = post_json(server, "/api/auth/forgot-password", None, &json!({ "email": email }));
    assert_eq!(asked.status, 202, "{}", asked.body);
    let token = harness::flow::mailed_token(server, email, "reset_password");
    let lock = LockingSession::holding(
        &database,
        &format!("BEGIN; DO $$ BEGIN PERFORM 1 FROM keys WHERE user_id = '{user}' FOR UPDATE; END $$;"),
    );
    let waiting = || {
        database.query(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
    };
    let (exported, reset) = std::thread::scope(|scope| {
        let exporting = scope.spawn(|| {
            post_json(
                server,
                "/api/user/key/export",
                Some(&holder),
                &json!({ "password": PASSWORD, "format": "nsec" }),
            )
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while waiting() == "0" {
            assert!(Instant::now() < deadline, "the export never waited on the key's row");
            std::thread::sleep(Duration::from_millis(20));
        }
        let resetting = scope.spawn(|| {
            let body = json!({ "token": token, "password": "the mailbox owner's own" });
            post_json(server, "/api/auth/reset-password", None, &body)
        });
        // The reset runs as far as it can before the key's row is let go: to its end (the
        // code before the fix), or until it waits for the export's lock on the account.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !resetting.is_finished() && waiting() != "2" {
            assert!(Instant::now() < deadline, "the reset neither finished nor waited");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(lock);
        (exporting.join().unwrap(), resetting.join().unwrap())
    });
    assert_eq!(reset.status, 200, "{}", reset.body);
    let exposed = database.query(&format!(
        "SELECT COALESCE(exposure, '') FROM keys WHERE user_id = '{user}'"
    ));
    if exported.status == 200 {
        assert!(
            !exposed.is_empty(),
            "the key was exported across the reset and is not marked exposed: {}",
            exported.body
        );
    } else {
        assert_eq!(exported.status, 401, "{}", exported.body);
    }
}

#[test]
fn instances_starting_together_migrate_once() {
    let Some(_) = harness::engine::postgres_server() else {
        return;
    };
    let database = PgDatabase::create("together");
    let dir = tempfile::tempdir().unwrap();
    // Spawned at once, before any has started: all race for the empty database.
    let starting: Vec<_> = (0..3)
        .map(|i| {
            Launch::new(&dir.path().join(format!("data{i}")))
                .postgres(&database)
                .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
                .spawn_started_later()
        })
        .collect();
    let servers: Vec<Keycast> = starting
        .into_iter()
        .map(|mut s| {
            s.wait_started(harness::START_TIMEOUT);
            s.into_keycast()
        })
        .collect();
    let applied = database.query("SELECT version, count(*) FROM _sqlx_migrations GROUP BY version ORDER BY version");
    let versions: Vec<&str> = applied.lines().collect();
    assert!(versions.len() >= 4, "{applied}");
    for line in &versions {
        assert!(line.ends_with("|1"), "a migration applied twice or more: {applied}");
    }
    let (cookie, _) = register(&servers[1], "erin@example.com", None);
    let token = access_token(&servers[2], &cookie);
    assert_eq!(sign(&servers[0], &token).status, 200);
}

#[test]
fn during_a_rolling_deploy_the_older_keycast_still_starts_on_the_newer_schema() {
    // A newer keycast migrated the database (stamped here as version 9999, expand only:
    // `oldest_reader` unchanged); an instance of this, older, keycast starts next to it and
    // serves. Once the newer one declares a contract step, the older one is refused.
    let Some((dir, servers)) = instances(1) else { return };
    let database = servers[0].database.clone().unwrap();
    let (cookie, _) = register(&servers[0], "fred@example.com", None);
    let token = access_token(&servers[0], &cookie);
    database.query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'a newer keycast', TRUE, '\\x00', 0)",
    );
    let launch = Launch::new(&dir.path().join("old"))
        .postgres(&database)
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY);
    let old = launch.start();
    assert_eq!(sign(&old, &token).status, 200);
    assert!(old.log().contains("running without migrating"), "{}", old.log());
    drop(old);
    database.query("UPDATE keycast_schema SET oldest_reader = 9999");
    let refused = launch.start_or_exit().err().expect("refused after a contract step");
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("run version 9999 or newer"),
        "{}",
        refused.stderr
    );
}

/// A `psql` session holding a lock until dropped: a table's (`LOCK TABLE activity IN
/// EXCLUSIVE MODE`: reads pass, every INSERT waits — PostgreSQL made slow for real on the
/// activity flush) or an advisory one.
struct LockingSession(std::process::Child);

impl LockingSession {
    /// `activity`, locked against writes.
    fn take(database: &PgDatabase) -> LockingSession {
        LockingSession::of(database, "activity", "EXCLUSIVE")
    }

    /// `table` locked in `mode` by a psql session, until dropped.
    fn of(database: &PgDatabase, table: &str, mode: &str) -> LockingSession {
        LockingSession::holding(database, &format!("BEGIN; LOCK TABLE {table} IN {mode} MODE;"))
    }

    /// A psql session that ran `sql` (which takes a lock), until dropped.
    fn holding(database: &PgDatabase, sql: &str) -> LockingSession {
        use std::io::{BufRead, Write};
        let mut child = std::process::Command::new("psql")
            .args(["-AtqX", "-v", "ON_ERROR_STOP=1", &database.url])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "{sql} SELECT 'locked';").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        LockingSession(child)
    }
}

impl Drop for LockingSession {
    fn drop(&mut self) {
        use std::io::Write;
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = writeln!(stdin, "COMMIT;");
        }
        if harness::wait_within(&mut self.0, Duration::from_secs(10)).is_none() {
            harness::reap(&mut self.0);
        }
    }
}

/// The two-instance stall of BENCHMARKS.md (issue 13): an activity flush that PostgreSQL
/// takes seconds over must not hold what signing and the heartbeat need. Here the flush
/// cannot finish at all (the activity table is locked from another session) while each
/// instance has one pooled connection and caches that expire every second, so every few
/// requests must read the database: signing keeps answering at once on both instances,
/// both keep heartbeating (neither drops out of the live set), and once the lock goes
/// every signature's activity record is written.
#[test]
fn signing_and_the_heartbeat_carry_on_while_the_activity_flush_is_stuck() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("stuckflush");
    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<Keycast> = (0..2)
        .map(|i| {
            Launch::new(&dir.path().join(format!("data{i}")))
                .postgres(&database)
                .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
                .env("KEYCAST_DATABASE_MAX_CONNECTIONS", "1")
                .env("KEYCAST_CACHE_TTL_SECS", "1")
                .env("KEYCAST_INSTANCE_TTL_SECS", "2")
                .start()
        })
        .collect();
    let (cookie, _) = register(&servers[0], "alice@example.com", None);
    let token = access_token(&servers[0], &cookie);
    let signed_before: usize = database.query("SELECT COUNT(*) FROM activity").parse().unwrap();

    let lock = LockingSession::take(&database);
    let mut signed = 0;
    let started = Instant::now();
    // Three instance TTLs: long enough for a starved heartbeat to lapse, and for the
    // caches to expire several times over.
    while started.elapsed() < Duration::from_secs(6) {
        for (i, server) in servers.iter().enumerate() {
            let at = Instant::now();
            let r = sign(server, &token);
            assert_eq!(
                r.status, 200,
                "instance {i} refused to sign while the activity flush was stuck: {}",
                r.body
            );
            assert!(
                at.elapsed() < Duration::from_secs(2),
                "instance {i} took {:?} to sign while the activity flush was stuck",
                at.elapsed()
            );
            signed += 1;
        }
        let fresh: i64 = database
            .query(
                "SELECT COUNT(*) FROM keycast_instances \
                 WHERE heartbeat_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) - 2000",
            )
            .parse()
            .unwrap();
        assert_eq!(
            fresh,
            2,
            "an instance stopped heartbeating ({:?} into the stuck flush)",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let written: usize = database.query("SELECT COUNT(*) FROM activity").parse().unwrap();
    assert_eq!(written, signed_before, "the lock held every flush back");

    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let written: usize = database.query("SELECT COUNT(*) FROM activity").parse().unwrap();
        if written == signed_before + signed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{written} activity records after the lock went, expected {}",
            signed_before + signed
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// PostgreSQL restarted under keycast (a Cloud SQL maintenance window, a failover, a proxy
/// that drops its connections) — here every backend of keycast's database is terminated at
/// once. The requests right after must not pay for it: a dead pooled connection is replaced
/// before a statement is sent on it, so nobody gets a 500 for a connection that died idle.
#[test]
fn a_server_that_dropped_every_connection_costs_no_request() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("dropped");
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .postgres(&database)
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
        .env("KEYCAST_DATABASE_MAX_CONNECTIONS", "4")
        .env("KEYCAST_CACHE_TTL_SECS", "1")
        .start();
    let (cookie, _) = register(&server, "alice@example.com", None);
    let token = access_token(&server, &cookie);
    // Open the whole pool: requests at once, each holding a connection.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| assert_eq!(get(&server, "/api/user/authorizations", Some(&cookie)).status, 200));
        }
    });

    let dropped: usize = database
        .query(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .parse()
        .unwrap();
    assert!(dropped >= 2, "only {dropped} connections to drop");
    // Past the cache's lifetime, so signing reads the authorization again.
    std::thread::sleep(Duration::from_millis(1100));

    let failed: Vec<String> = (0..12)
        .flat_map(|_| {
            let page = get(&server, "/api/user/authorizations", Some(&cookie));
            let signed = sign(&server, &token);
            [page, signed]
        })
        .filter(|r| r.status != 200)
        .map(|r| format!("{}: {}", r.status, r.body))
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed after the connections dropped: {failed:?}"
    );
}

/// The session that hears the other instances' changes (`LISTEN`) can die without a word:
/// an idle TCP connection whose NAT mapping expired, a partition. The instance must notice
/// by itself. Before, it never did: it went on trusting its caches (for an hour here) and
/// signed with a token revoked on another instance, and every change on the others waited
/// out the sync timeout for its acknowledgement, for good.
#[test]
fn an_instance_whose_notice_session_silently_died_stops_trusting_its_caches() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("deaf");
    let (link, through_link) = link_to(&database);
    let dir = tempfile::tempdir().unwrap();
    let launch = |i: usize| member(dir.path(), &database, i);
    let a = launch(0).start();
    let b = launch(1).env("KEYCAST_DATABASE_DIRECT_URL", &through_link).start();
    let (cookie, _) = register(&a, "alice@example.com", None);
    let token = access_token(&a, &cookie);
    // Once the grant's announcements have settled (a read racing an invalidation is not
    // cached), b holds the grant in its caches. Idle past the silence limit (10 s) first:
    // a session that hears must not be taken for dead for being quiet.
    std::thread::sleep(Duration::from_secs(11));
    for _ in 0..2 {
        assert_eq!(sign(&b, &token).status, 200);
    }

    link.freeze();
    revoke_then_refused_by(&a, &b, &cookie, &token, Duration::from_secs(20));

    // And the others stop waiting for an acknowledgement that cannot come: a change (a new
    // grant, then its revocation) is answered without the 3 s sync timeout again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let started = Instant::now();
        access_token(&a, &cookie);
        let list = get(&a, "/api/user/authorizations", Some(&cookie)).json();
        let live = list["authorizations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["revoked_at"].is_null())
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .unwrap();
        let r = delete(&a, &format!("/api/user/authorizations/{live}"), &cookie);
        assert_eq!(r.status, 204, "{}", r.body);
        if started.elapsed() < Duration::from_secs(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "changes on the instance that can hear still wait for the deaf one ({:?} for a grant and its revocation)",
            started.elapsed()
        );
    }
    assert!(b.log().contains("taking it for dead"), "{}", b.log());
    // The heartbeats' notices keep a session that hears alive: the healthy instance, idle
    // well past the silence limit before the link froze and since, never took its for dead.
    assert!(!a.log().contains("taking it for dead"), "{}", a.log());
}

/// Revokes the first of `cookie`'s grants on `on`, then waits up to `within` for `other` to
/// refuse `token` (the grant's access token).
fn revoke_then_refused_by(on: &Keycast, other: &Keycast, cookie: &str, token: &str, within: Duration) {
    let list = get(on, "/api/user/authorizations", Some(cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let revoked = delete(on, &format!("/api/user/authorizations/{id}"), cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let deadline = Instant::now() + within;
    loop {
        let r = sign(other, token);
        if r.status == 401 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{within:?} after the revocation the other instance still signs: {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A relay to `database`'s server that can go silent, and the database's URL through it.
fn link_to(database: &PgDatabase) -> (SilentLink, String) {
    let host_port = database
        .url
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let link = SilentLink::start(host_port.clone());
    let through_link = database.url.replace(&host_port, &format!("127.0.0.1:{}", link.port));
    (link, through_link)
}

/// A NAT, a proxy or a failover behind one address can forget every connection an instance
/// has to PostgreSQL at once: each goes silent, with no close and no reset, while new
/// connections work. The instance must carry on with new ones. Before, its heartbeat and its
/// change notices each waited on their dead connection for good while every probe said it was
/// well: it dropped out of the live set, its revocations never reached the other instance
/// (which signed with the revoked token for its caches' hour), and a request that drew a dead
/// pooled connection failed after the acquire timeout.
#[test]
fn an_instance_whose_database_connections_were_all_forgotten_carries_on_with_new_ones() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let database = PgDatabase::create("forgotten");
    let (link, through_link) = link_to(&database);
    let dir = tempfile::tempdir().unwrap();
    let launch = |i: usize| member(dir.path(), &database, i);
    let a = launch(0).env("DATABASE_URL", &through_link).start();
    let b = launch(1).start();
    let (cookie, _) = register(&a, "alice@example.com", None);
    let token = access_token(&a, &cookie);
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..2 {
        assert_eq!(sign(&b, &token).status, 200);
    }

    // A heartbeat under way when the connections are forgotten never hears its answer: it
    // waits on a lock meanwhile (as a slow statement would), and the answer comes after.
    let locker = {
        let database = database.clone();
        std::thread::spawn(move || {
            database.query("BEGIN; LOCK TABLE keycast_instances IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); ROLLBACK")
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    link.forget();
    let forgotten = Instant::now();
    locker.join().unwrap();
    for _ in 0..4 {
        let r = get(&a, "/api/user/authorizations", Some(&cookie));
        assert_eq!(r.status, 200, "after the connections were forgotten: {}", r.body);
    }
    revoke_then_refused_by(&a, &b, &cookie, &token, Duration::from_secs(10));

    // Still a live instance, well past the instance TTL (5 s) since it was forgotten.
    let deadline = forgotten + Duration::from_secs(25);
    loop {
        let live = metric_sum(&b.get("/metrics").1, "keycast_cluster_instances");
        if live == 2.0 && forgotten.elapsed() > Duration::from_secs(10) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other instance counts {live} live instances: the forgotten one's heartbeat never came back"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An instance whose listener falls behind (a paused process, a starved one) must not serve
/// from its caches what it has not caught up on: someone may already have been told that
/// the grant is revoked. Simulated with a failpoint that makes one instance ignore every
/// notice it hears, its own heartbeats' included, while its session stays healthy (so the
/// silence limit never fires). Before, it trusted its caches for their whole TTL (an hour
/// here) and signed with the revoked token; now only until the sync timeout after the last
/// beat of its own it applied.
#[test]
fn an_instance_whose_listener_fell_behind_stops_trusting_its_caches() {
    let Some((_dir, servers)) = instances_with(2, &[("KEYCAST_TEST_ROUTES", "true")]) else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let (cookie, _) = register(a, "alice@example.com", None);
    let token = access_token(a, &cookie);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        assert_eq!(sign(b, &token).status, 200);
    }
    let (status, body) = b.post("/api/test/failpoint?name=cluster-listen-behind&actions=return");
    assert_eq!(status, 200, "arming the failpoint: {body}");
    let list = get(a, "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let revoked_at = Instant::now();
    let revoked = delete(a, &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    // The revocation is answered once b fails to acknowledge it (3 s); by then b has stopped
    // trusting its caches.
    let r = sign(b, &token);
    assert_eq!(
        r.status,
        401,
        "{:?} after the revocation, the instance that fell behind signed with the revoked token: {}",
        revoked_at.elapsed(),
        r.body
    );
    assert!(
        !b.log().contains("taking it for dead"),
        "the session itself stayed healthy"
    );
}
