//! Several `keycast serve` processes on one PostgreSQL database, as behind a load balancer
//! with no sticky sessions (issue 13): a revocation made on one instance is refused by
//! every other on the very next request, and the rate limits that guard passwords count
//! every instance's attempts together.

mod harness;

use std::time::{Duration, Instant};

use harness::api::*;
use harness::flow::{approve, authorize_query, pkce, register, token_request};
use harness::{Keycast, Launch, PgDatabase, TEST_MASTER_KEY};
use serde_json::json;

/// `n` instances on one fresh database, sharing the master key (as every instance of one
/// service must). Caches are trusted for an hour, so nothing below passes by a cache
/// merely expiring: only the instances telling each other makes it pass.
fn instances(n: usize) -> Option<(tempfile::TempDir, Vec<Keycast>)> {
    harness::engine::postgres_server()?;
    let database = PgDatabase::create("many");
    let dir = tempfile::tempdir().unwrap();
    let servers = (0..n)
        .map(|i| {
            Launch::new(&dir.path().join(format!("data{i}")))
                .postgres(&database)
                .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
                .env("KEYCAST_CACHE_TTL_SECS", "3600")
                .start()
        })
        .collect();
    Some((dir, servers))
}

/// Consent on `server` → an access token for the signed-in `cookie`.
fn access_token(server: &Keycast, cookie: &str) -> String {
    let (challenge, verifier) = pkce();
    let code = approve(server, cookie, &authorize_query("policy:social", &challenge));
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["access_token"].as_str().unwrap().to_owned()
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

fn login(server: &Keycast, email: &str, password: &str) -> Reply {
    post_json(
        server,
        "/api/auth/login",
        None,
        &json!({ "email": email, "password": password }),
    )
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
