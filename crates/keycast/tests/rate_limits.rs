//! Rate limits an attacker can neither step around nor turn against users (issue 12,
//! item 5), against the real binary: a spoofed `X-Forwarded-For` buys nothing without a
//! trusted proxy, an IPv6 client's whole /64 shares one bucket, guessing at an account slows
//! only the guesser, and a burst of 1,000 wrong-password logins from 1,000 clients leaves
//! keycast's memory bounded and keycast serving.

mod harness;

use std::time::Duration;

use harness::api::*;
use harness::flow::{login_from, register};
use harness::{Keycast, Launch};
use serde_json::json;

fn start(env: &[(&str, &str)]) -> (tempfile::TempDir, Keycast) {
    let dir = tempfile::tempdir().unwrap();
    let mut launch = Launch::new(&dir.path().join("data"));
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    (dir, launch.start())
}

/// The peak resident memory of a process (`VmHWM`), KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[test]
fn a_spoofed_forwarded_for_buys_nothing_without_a_trusted_proxy() {
    let (_dir, server) = start(&[]);
    let statuses: Vec<u16> = (0..12)
        .map(|n| {
            let email = format!("nobody-{n}@example.org");
            login_from(&server, &email, "wrong password", &format!("198.51.100.{n}")).status
        })
        .collect();
    assert!(
        statuses.contains(&429),
        "each spoofed address got its own bucket: {statuses:?}"
    );
}

#[test]
fn behind_a_trusted_proxy_an_ipv6_clients_whole_64_shares_one_bucket() {
    let (_dir, server) = start(&[("KEYCAST_TRUSTED_PROXY_HOPS", "1")]);
    let statuses: Vec<u16> = (1..=12)
        .map(|n| {
            let addr = format!("2001:db8:7:7::{n:x}");
            login_from(&server, &format!("nobody-{n}@example.org"), "wrong password", &addr).status
        })
        .collect();
    assert!(
        statuses.contains(&429),
        "every address of one /64 had its own bucket: {statuses:?}"
    );
    // Another network is another client.
    let other = login_from(&server, "nobody@example.org", "wrong password", "2001:db8:8::1");
    assert_eq!(other.status, 401, "{}", other.body);
}

#[test]
fn guessing_at_an_account_slows_the_guesser_not_the_owner() {
    let (_dir, server) = start(&[("KEYCAST_TRUSTED_PROXY_HOPS", "1")]);
    let email = "target@example.org";
    register(&server, email, None);
    let guesses: Vec<u16> = (0..10)
        .map(|_| login_from(&server, email, "guess guess guess", "203.0.113.66").status)
        .collect();
    assert!(guesses.contains(&429), "the guesser is never slowed down: {guesses:?}");
    let owner = login_from(&server, email, PASSWORD, "192.0.2.10");
    assert_eq!(
        owner.status, 200,
        "the owner is locked out by someone else: {}",
        owner.body
    );
}

#[test]
fn a_burst_of_wrong_password_logins_from_many_clients_keeps_memory_bounded_and_keycast_serving() {
    /// The bound documented in docs/SECURITY.md and docs/CONFIGURATION.md.
    const BOUND_MIB: u64 = 256;
    let burst: usize = std::env::var("KEYCAST_TEST_LOGIN_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (_dir, server) = start(&[("KEYCAST_TRUSTED_PROXY_HOPS", "1")]);
    let email = "burst@example.org";
    register(&server, email, None);
    let before = peak_rss_kib(server.pid());

    let base = server.base.clone();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(burst));
    let threads: Vec<_> = (0..burst)
        .map(|n| {
            let (base, barrier) = (base.clone(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(120)))
                        .build()
                        .new_agent();
                    // Each client tries its own (unknown) account, as in the measurement in
                    // issue 12: nothing but the per-client limits and the queue stand in the way.
                    let body = json!({ "email": format!("burst-{n}@example.org"), "password": "not the password" })
                        .to_string();
                    barrier.wait();
                    let response = agent
                        .post(format!("{base}/api/auth/login"))
                        .header("Content-Type", "application/json")
                        .header(
                            "X-Forwarded-For",
                            &format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256),
                        )
                        .send(&body);
                    match response {
                        Ok(r) => (r.status().as_u16(), r.headers().contains_key("retry-after"), None),
                        Err(e) => (0, false, Some(e.to_string())),
                    }
                })
                .unwrap()
        })
        .collect();
    let answers: Vec<(u16, bool, Option<String>)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let count = |status| answers.iter().filter(|(s, ..)| *s == status).count();
    let errors: Vec<&String> = answers.iter().filter_map(|(_, _, e)| e.as_ref()).collect();
    let (wrong, busy, unanswered) = (count(401), count(503), count(0));
    let peak = peak_rss_kib(server.pid());
    eprintln!(
        "{burst} logins: {wrong} × 401, {busy} × 503, {unanswered} unanswered; peak RSS {} MiB (before {} MiB)",
        peak / 1024,
        before / 1024
    );
    // Every HTTP answer is a 401 or a 503. A connection the kernel drops before keycast could
    // accept it (a thousand SYNs at once against a listen backlog, on a loaded 2-core runner; CI
    // once saw 23) is not an answer keycast gave, so a few are tolerated and printed; many mean
    // keycast stopped accepting.
    assert_eq!(
        wrong + busy + unanswered,
        burst,
        "every answer is a 401 or a 503: {:?}",
        answers.iter().map(|(s, ..)| s).collect::<Vec<_>>()
    );
    assert!(
        unanswered <= burst / 20,
        "{unanswered} of {burst} logins got no answer at all: {errors:?}"
    );
    assert!(
        answers.iter().filter(|(s, ..)| *s == 503).all(|(_, retry, _)| *retry),
        "a 503 without Retry-After"
    );
    assert!(
        peak < BOUND_MIB * 1024,
        "peak RSS {} MiB is over the {BOUND_MIB} MiB bound",
        peak / 1024
    );
    // Still serving: ready, and the owner logs in.
    assert_eq!(server.get("/healthz/ready").0, 200, "{}", server.log());
    let owner = login_from(&server, email, PASSWORD, "192.0.2.1");
    assert_eq!(owner.status, 200, "{}", owner.body);
}

/// Sends a JSON `POST` to `path` with `headers` and hangs up `after` it, without reading the
/// answer: a client that gives up, or an attacker who never waits.
fn post_and_hang_up(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)], body: &str, after: Duration) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let headers: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: keycast\r\nContent-Type: application/json\r\n{headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(after);
    drop(stream);
}

/// A wrong-password login from `forwarded_for`, hung up `after` it was sent.
fn login_and_hang_up(addr: std::net::SocketAddr, forwarded_for: &str, after: Duration) {
    let body =
        json!({ "email": format!("gone-{forwarded_for}@example.org"), "password": "not the password" }).to_string();
    post_and_hang_up(
        addr,
        "/api/auth/login",
        &[("X-Forwarded-For", forwarded_for)],
        &body,
        after,
    );
}

/// Clients that hang up while their password waits for the hashing queue. A request cancelled
/// while it waited was never taken off the queue's count of waiting jobs, so after a few such
/// hang-ups the queue refused everyone (503) whenever a hash was running, for good. (One
/// cancelled while its hash ran also gave its memory back before the hash ended: see
/// `hashing_queue::tests::work_whose_caller_gave_up_keeps_its_memory_until_it_ends`.)
#[test]
fn logins_whose_clients_hang_up_do_not_jam_the_hashing_queue() {
    let (_dir, server) = start(&[
        ("KEYCAST_TRUSTED_PROXY_HOPS", "1"),
        ("KEYCAST_HASH_MEMORY_MIB", "64"),
        ("KEYCAST_HASH_QUEUE", "4"),
    ]);
    let email = "stays@example.org";
    register(&server, email, None);
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let hang_ups: Vec<_> = (0..120)
        .map(|n| {
            std::thread::spawn(move || {
                login_and_hang_up(
                    addr,
                    &format!("10.9.{}.{}", n / 256, n % 256),
                    Duration::from_millis(15),
                );
            })
        })
        .collect();
    for h in hang_ups {
        h.join().unwrap();
    }
    // Whatever the hang-ups started has finished by now (a hash takes well under a second).
    std::thread::sleep(Duration::from_secs(3));

    // Eight logins at once from eight clients: three hash at a time, four wait, and at most
    // one is asked to come back — not every one that finds a hash running.
    let threads: Vec<_> = (0..8)
        .map(|n| {
            let base = server.base.clone();
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .new_agent();
                agent
                    .post(format!("{base}/api/auth/login"))
                    .header("Content-Type", "application/json")
                    .header("X-Forwarded-For", &format!("192.0.2.{}", n + 1))
                    .send(&json!({ "email": format!("fresh-{n}@example.org"), "password": "wrong" }).to_string())
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        statuses.iter().filter(|s| **s == 503).count() <= 1,
        "the queue still counts the clients that hung up as waiting: {statuses:?}"
    );
    let owner = login_from(&server, email, PASSWORD, "192.0.2.100");
    assert_eq!(owner.status, 200, "{}", owner.body);
}

/// A login answered "busy" (the hashing queue full) was counted as a wrong password: a flood
/// of strangers' logins made the owner's own tries back the owner off their account, for
/// longer than the flood. Such an answer says nothing about the password, and counts for
/// nothing now.
#[test]
fn logins_answered_busy_do_not_back_the_owner_off() {
    let (_dir, server) = start(&[
        ("KEYCAST_TRUSTED_PROXY_HOPS", "1"),
        ("KEYCAST_HASH_MEMORY_MIB", "64"),
        ("KEYCAST_HASH_QUEUE", "0"),
    ]);
    let email = "owner@example.org";
    register(&server, email, None);
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flood: Vec<_> = (0..24)
        .map(|t| {
            let (base, flooding) = (server.base.clone(), flooding.clone());
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .new_agent();
                let mut n = 0u32;
                while flooding.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    let _ = agent
                        .post(format!("{base}/api/auth/login"))
                        .header("Content-Type", "application/json")
                        .header("X-Forwarded-For", &format!("10.{t}.{}.{}", n / 256 % 256, n % 256))
                        .send(&json!({ "email": "stranger@example.org", "password": "guess" }).to_string());
                }
            })
        })
        .collect();
    // The owner tries the right password during the flood, and is told to come back.
    let mut busy = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while busy < 7 && std::time::Instant::now() < deadline {
        let tried = login_from(&server, email, PASSWORD, "192.0.2.50");
        match tried.status {
            503 => busy += 1,
            200 => {}
            other => panic!("the owner's login during the flood: {other} {}", tried.body),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    flooding.store(false, std::sync::atomic::Ordering::SeqCst);
    for f in flood {
        f.join().unwrap();
    }
    assert!(busy >= 7, "the flood never filled the hashing queue");
    let owner = login_from(&server, email, PASSWORD, "192.0.2.50");
    assert_eq!(
        owner.status, 200,
        "the owner, answered busy {busy} times, is backed off: {}",
        owner.body
    );
}

/// Confirming an email takes the account's password with the mailed token. Those tries had
/// only a per-client limit (ten, then one a minute), none of login's backoff per account: a
/// confirmation link read from a log guessed at the password several times faster than a
/// login could, and every other confirmation link stayed usable for its day after the address
/// was confirmed. Now a guess there counts as at login, and confirming spends every link.
#[test]
fn a_confirmation_link_is_no_way_around_the_password_backoff() {
    let (_dir, server) = start(&[("KEYCAST_TRUSTED_PROXY_HOPS", "1")]);
    let email = "confirm@example.org";
    harness::flow::register_unverified(&server, email, None);
    let first = harness::flow::mailed_token(&server, email, "verify_email");
    let confirm = |token: &str, password: &str, from: &str| {
        post(
            &server,
            "/api/auth/verify-email",
            None,
            "application/json",
            &json!({ "token": token, "password": password }).to_string(),
            &[("X-Forwarded-For", from)],
        )
    };
    let guesses: Vec<u16> = (0..7)
        .map(|n| confirm(&first, &format!("guess {n}"), "203.0.113.77").status)
        .collect();
    assert!(
        guesses.contains(&429),
        "guesses through the link are not slowed down like logins: {guesses:?}"
    );
    assert_eq!(
        login_from(&server, email, "another guess", "203.0.113.77").status,
        429,
        "the link's guesses count as the login's"
    );

    // A second link; the owner confirms with it, from elsewhere.
    let resent = post_json(
        &server,
        "/api/auth/resend-verification",
        None,
        &json!({ "email": email }),
    );
    assert_eq!(resent.status, 202, "{}", resent.body);
    let second = harness::flow::mailed_token(&server, email, "verify_email");
    assert_ne!(first, second);
    let owner = confirm(&second, PASSWORD, "192.0.2.5");
    assert_eq!(owner.status, 200, "{}", owner.body);
    let stale = confirm(&first, "yet another guess", "198.51.100.5");
    assert_eq!(
        stale.status, 400,
        "the first link still checks passwords after the address was confirmed: {}",
        stale.body
    );
}

/// Whoever holds the owner's session but not the password sends exports with wrong passwords
/// and hangs up while they wait for the hashing queue. The account's budget of changes was
/// taken before the hash and given back after a wrong one — never, for a request dropped in
/// between: ten such requests spent it, and the owner's own export, password change and new
/// key were refused for an hour. The budget is now asked before the hash and spent after a
/// right password only.
#[test]
fn abandoned_wrong_passwords_do_not_spend_the_owners_budget() {
    let (_dir, server) = start(&[("KEYCAST_TRUSTED_PROXY_HOPS", "1"), ("KEYCAST_HASH_MEMORY_MIB", "64")]);
    let email = "owner@example.org";
    let (cookie, _) = register(&server, email, None);
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let body = json!({ "password": "not the password", "format": "nsec" }).to_string();
    let abandoned: Vec<_> = (0..12)
        .map(|n| {
            let (cookie, body) = (cookie.clone(), body.clone());
            std::thread::spawn(move || {
                // Three addresses: each may try five wrong passwords before its backoff.
                let from = format!("198.51.100.{}", n % 3);
                post_and_hang_up(
                    addr,
                    "/api/user/key/export",
                    &[("Cookie", &cookie), ("X-Forwarded-For", &from)],
                    &body,
                    Duration::from_millis(10),
                );
            })
        })
        .collect();
    for a in abandoned {
        a.join().unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let export = post(
        &server,
        "/api/user/key/export",
        Some(&cookie),
        "application/json",
        &json!({ "password": PASSWORD, "format": "nsec" }).to_string(),
        &[("X-Forwarded-For", "192.0.2.200")],
    );
    assert_eq!(
        export.status, 200,
        "abandoned wrong passwords spent the owner's budget: {}",
        export.body
    );
}
