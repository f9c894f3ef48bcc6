//! The low-severity hardening of issue 12, item 10, against the real binary: `/metrics` is
//! not public, the test routes cannot be switched on in production, a client that sends its
//! headers a byte at a time is cut off, a password reset kills every other reset link,
//! running out of file descriptors spins no core, and a connection flood on the embedded relay
//! leaves HTTP its descriptors.

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harness::api::*;
use harness::flow::{mailed_token, register};
use harness::Launch;
use serde_json::json;

#[test]
fn metrics_answer_loopback_or_the_bearer_token_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    assert_eq!(server.get("/metrics").0, 200, "a scraper beside keycast");
    let proxied = agent()
        .get(format!("{}/metrics", server.base))
        .header("X-Forwarded-For", "203.0.113.5")
        .call();
    assert_eq!(
        reply(proxied).status,
        403,
        "a request relayed by a proxy on this host is not local"
    );

    let dir = tempfile::tempdir().unwrap();
    let token = "metrics-token-0123456789abcdef";
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_METRICS_TOKEN", token)
        .start();
    assert_eq!(server.get("/metrics").0, 401, "the token is required once set");
    let scraped = agent()
        .get(format!("{}/metrics", server.base))
        .header("Authorization", &format!("Bearer {token}"))
        .call();
    let scraped = reply(scraped);
    assert_eq!(scraped.status, 200);
    assert!(scraped.body.contains("keycast_http_requests_total"), "{}", scraped.body);
    assert!(!server.log().contains(token), "the token reached the log");
}

#[test]
fn the_test_routes_are_refused_with_an_https_public_url_and_announced_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let refused = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_PUBLIC_URL", "https://keycast.example")
        .run_to_exit(Duration::from_secs(30));
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("KEYCAST_TEST_ROUTES=true"),
        "{}",
        refused.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let dev = Launch::new(&dir.path().join("data")).start();
    assert!(
        dev.log().contains("KEYCAST_TEST_ROUTES=true: /api/test/* is mounted"),
        "{}",
        dev.log()
    );
}

/// An instance with an https public URL and no master key configured. Before, it generated a
/// development key beside the database and served: on Cloud Run that key went with the disk at
/// the next deploy, the newcomer made another and refused the restored keys, and every stored
/// Nostr key was unreadable for good once the old instance stopped. Now it refuses to start,
/// naming the variable.
#[test]
fn an_https_instance_without_a_master_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let refused = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "false")
        .env("KEYCAST_PUBLIC_URL", "https://keycast.example")
        .run_to_exit(Duration::from_secs(30));
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("KEYCAST_MASTER_KEY"), "{}", refused.stderr);
    assert!(!dir.path().join("data/master.key").exists(), "no key generated");
    // Commands that never use the master key run with the same settings: an operator
    // restoring holds the replica's key, not the master key.
    let replica = format!("file://{}", dir.path().join("replica").display());
    let data = dir.path().join("data").display().to_string();
    let listed = harness::keycast_cli(
        &["replica", "ls", "--replica", &replica],
        &[
            ("KEYCAST_PUBLIC_URL", "https://keycast.example"),
            ("KEYCAST_DATA_DIR", &data),
        ],
    );
    assert!(listed.status.success(), "{}", listed.stderr);
}

#[test]
fn a_client_that_trickles_its_headers_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_HEADER_READ_TIMEOUT_SECS", "1")
        .start();
    let addr = server.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    stream.write_all(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let closed_after = loop {
        // One more header byte every 200 ms: never a complete request.
        if stream.write_all(b"X").is_err() {
            break started.elapsed();
        }
        match stream.read(&mut buf) {
            Ok(0) => break started.elapsed(),
            Ok(n) => {
                let answer = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
                break started.elapsed();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break started.elapsed(),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "keycast kept a connection with unfinished headers open for 10 s"
        );
    };
    assert!(
        closed_after >= Duration::from_millis(800),
        "cut off too early: {closed_after:?}"
    );
    // Well-behaved clients are unaffected.
    assert_eq!(server.get("/healthz/live").0, 200);
}

/// Reads from `stream` until it ends or `within` passes: `Ok(bytes)` when keycast closed the
/// connection (what it sent first, if anything), `Err(bytes)` when it was still open.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(got);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(got)
            }
            Err(e) => panic!("reading from keycast: {e}"),
        }
    }
}

/// A client that connects and sends nothing, or only the first bytes of HTTP/2's preface.
/// Before, the version-sniffing connection waited for them with no timer (the header timeout
/// starts only once HTTP/1 is chosen): each such connection held a descriptor and a task for
/// as long as the client liked.
#[test]
fn a_connection_that_never_sends_a_request_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_HEADER_READ_TIMEOUT_SECS", "1")
        .start();
    let addr = server.base.trim_start_matches("http://");
    for opening in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r"] {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(opening).unwrap();
        let shown = String::from_utf8_lossy(opening).into_owned();
        assert!(
            read_until_closed(&mut stream, Duration::from_secs(6)).is_ok(),
            "a connection that sent {shown:?} was still open after 6 s"
        );
    }
}

/// Plain-text HTTP/2 (h2c) with prior knowledge. It was served by accident (a dependency
/// turned hyper's HTTP/2 on), with no header timeout; a silent HTTP/2 connection then held up
/// every graceful shutdown until its drain budget ran out. keycast speaks HTTP/1.1 only.
#[test]
fn http2_without_tls_is_not_served_and_cannot_hold_up_a_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_HEADER_READ_TIMEOUT_SECS", "1")
        .start();
    let addr = server.base.trim_start_matches("http://").to_owned();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let mut h2 = TcpStream::connect(&addr).unwrap();
    h2.write_all(preface).unwrap();
    let got = read_until_closed(&mut h2, Duration::from_secs(6))
        .unwrap_or_else(|got| panic!("an HTTP/2 connection was still open after 6 s; it received {got:?}"));
    assert!(
        !(got.len() >= 9 && got[3] == 0x04),
        "keycast answered HTTP/2 with a SETTINGS frame: {got:?}"
    );

    // A second one, left open as keycast is asked to stop.
    let mut h2 = TcpStream::connect(&addr).unwrap();
    h2.write_all(preface).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    server.signal(libc::SIGTERM);
    let (status, took) = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}; log:\n{}", server.log());
    assert!(
        !server.log().contains("did not finish in time"),
        "the stop waited out its drain for a silent connection ({took:?}); log:\n{}",
        server.log()
    );
    drop(h2);
}

/// Descriptors `pid` holds open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// More connections than `KEYCAST_HTTP_MAX_CONNECTIONS`, each past its headers and sending its
/// body never (held until the request timeout, 30 s), under a descriptor limit. Before, keycast took a descriptor for each until none was left for the database,
/// the relays or the object store. Past the cap it now stops accepting (the kernel queues the
/// rest) until one ends, and serves again once the flood is gone.
#[test]
fn a_flood_of_connections_holds_no_more_descriptors_than_the_cap() {
    const CAP: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let mut launch = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_HEADER_READ_TIMEOUT_SECS", "2")
        .env("KEYCAST_HTTP_MAX_CONNECTIONS", &CAP.to_string());
    launch.wrapper = vec!["prlimit".into(), "--nofile=256:256".into()];
    let server = launch.start();
    let pid = server.pid();
    let before = open_descriptors(pid);
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let request = b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                    Content-Length: 4000\r\n\r\n{";
    let flood: Vec<TcpStream> = (0..300)
        .map_while(|_| {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            conn.write_all(request).ok()?;
            Some(conn)
        })
        .collect();
    // The rest of the 300 wait for the listen queue (128) to make room.
    assert!(flood.len() > 2 * CAP, "only {} connections were made", flood.len());
    // Watch while keycast accepts what it will: the count climbs to the cap and stays there.
    let mut most = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        most = most.max(open_descriptors(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most >= before + CAP / 2,
        "the flood reached keycast: {before} descriptors before, at most {most} during"
    );
    assert!(
        most <= before + CAP + 8,
        "keycast held {most} descriptors under the flood ({before} before, cap {CAP})"
    );
    assert!(
        server.log().contains("KEYCAST_HTTP_MAX_CONNECTIONS"),
        "reaching the cap is logged, naming the setting"
    );
    drop(flood);
    let quick = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .new_agent();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match quick.get(format!("{}/healthz/ready", server.base)).call() {
            Ok(r) if r.status() == 200 => break,
            answer => assert!(
                Instant::now() < deadline,
                "keycast did not serve again once the flood was gone: {answer:?}; log:\n{}",
                server.log()
            ),
        }
    }
}

#[test]
fn a_password_reset_kills_every_other_reset_link() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let email = "twice@example.org";
    register(&server, email, None);
    let ask = || post_json(&server, "/api/auth/forgot-password", None, &json!({ "email": email })).status;
    assert_eq!(ask(), 202);
    let older = mailed_token(&server, email, "reset_password");
    assert_eq!(ask(), 202);
    let newer = mailed_token(&server, email, "reset_password");
    assert_ne!(older, newer);
    let reset = |token: &str, password: &str| {
        post_json(
            &server,
            "/api/auth/reset-password",
            None,
            &json!({ "token": token, "password": password }),
        )
        .status
    };
    assert_eq!(reset(&newer, "the owner's new password"), 200);
    assert_eq!(
        reset(&older, "someone else's password"),
        400,
        "an older reset link still worked"
    );
}

/// CPU time (user + system) `pid` has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_sec)
}

/// Connections past the file-descriptor limit: every accept fails (EMFILE) while they wait
/// in the kernel's backlog. An accept loop that retries at once spins a core for as long as
/// that lasts; before, the embedded relay's did. Both loops back off, and keycast serves
/// again once descriptors are free.
#[test]
fn running_out_of_file_descriptors_spins_no_core_and_passes() {
    let dir = tempfile::tempdir().unwrap();
    let relay_port = harness::free_port();
    let mut launch =
        Launch::new(&dir.path().join("data")).env("KEYCAST_EMBEDDED_RELAY_ADDR", &format!("127.0.0.1:{relay_port}"));
    launch.wrapper = vec!["prlimit".into(), "--nofile=128:128".into()];
    let server = launch.start();
    let pid = server.pid();
    let relay: std::net::SocketAddr = ([127, 0, 0, 1], relay_port).into();
    let flood: Vec<TcpStream> = (0..300)
        .map_while(|_| TcpStream::connect_timeout(&relay, Duration::from_millis(500)).ok())
        .collect();
    assert!(flood.len() > 128, "the backlog took {} connections", flood.len());
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(500),
        "keycast used {used:?} of CPU in 2 s while out of file descriptors"
    );
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.get("/healthz/live").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "keycast did not serve again once descriptors were free"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The embedded relay under a connection flood (an operator may bind it beyond loopback):
/// some connections never finish their WebSocket upgrade (slowloris), the rest upgrade and
/// idle. Before, the relay held every one of them for as long as the client liked, until
/// keycast had no descriptor left and HTTP stopped answering. Now an upgrade gets the header
/// timeout, and the relay holds at most `KEYCAST_EMBEDDED_RELAY_MAX_CONNECTIONS`: the
/// connections past it are closed at once.
#[test]
fn a_connection_flood_on_the_embedded_relay_cannot_starve_http() {
    let dir = tempfile::tempdir().unwrap();
    let relay_port = harness::free_port();
    let mut launch = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_EMBEDDED_RELAY_ADDR", &format!("127.0.0.1:{relay_port}"))
        .env("KEYCAST_EMBEDDED_RELAY_MAX_CONNECTIONS", "64")
        .env("KEYCAST_HEADER_READ_TIMEOUT_SECS", "2");
    launch.wrapper = vec!["prlimit".into(), "--nofile=256:256".into()];
    let server = launch.start();
    let relay: std::net::SocketAddr = ([127, 0, 0, 1], relay_port).into();
    let upgrade = "GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let open = |finish: bool| {
        // A burst this fast can fill the listen backlog (128) for a moment: a dropped SYN is
        // sent again after a second.
        let mut conn = TcpStream::connect_timeout(&relay, Duration::from_secs(5)).ok()?;
        // A slowloris stops before the blank line that ends the request.
        let request = if finish {
            format!("{upgrade}\r\n")
        } else {
            upgrade.to_owned()
        };
        // Past the cap the relay may have closed it already: the write may fail.
        let _ = conn.write_all(request.as_bytes());
        Some(conn)
    };
    // The slowloris first, within the cap, so the relay holds them until the header timeout.
    let mut slow: Vec<TcpStream> = (0..40).map_while(|_| open(false)).collect();
    let idle: Vec<TcpStream> = (0..260).map_while(|_| open(true)).collect();
    assert!(
        idle.len() + slow.len() > 256,
        "only {} connections were made to the relay",
        idle.len() + slow.len()
    );

    let quick = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .new_agent();
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        match quick.get(format!("{}/healthz/live", server.base)).call() {
            Ok(r) if r.status() == 200 => break,
            answer => assert!(
                Instant::now() < deadline,
                "HTTP did not answer while the relay was flooded: {answer:?}"
            ),
        }
    }

    // Every unfinished upgrade is cut off once the header timeout has passed, not before.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first = [0u8; 1];
    slow[0].set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(
        slow[0].read(&mut first).is_err(),
        "an upgrade in progress was closed before its time"
    );
    for conn in &mut slow {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        conn.set_read_timeout(Some(left)).unwrap();
        let mut answer = [0u8; 512];
        match conn.read(&mut answer) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an unfinished upgrade was still held after the header timeout: {other:?}"),
        }
    }
    drop((idle, slow));
    // Once the flood is gone (the relay notices each close), it upgrades connections again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = open(true).expect("the relay accepts");
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = [0u8; 512];
        let n = conn.read(&mut answer).unwrap_or(0);
        let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
        if answer.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "the relay did not upgrade again: {answer:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An app's `client_id` and redirect URI are stored with every code and grant, and a revoked
/// grant's row is kept: one account approving its own "app" named by a megabyte, again and
/// again, grew the database (on Cloud Run, memory) by a megabyte a grant. They are capped
/// (256 and 2,048 bytes) with an error naming the field; `state`, echoed in the redirect, too.
#[test]
fn an_app_named_by_a_megabyte_is_refused_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let (cookie, _) = register(&server, "bounds@example.com", None);
    let (challenge, _) = harness::flow::pkce();
    let approve = |field: &str, value: String| {
        let mut approval: serde_json::Value =
            url::form_urlencoded::parse(harness::flow::authorize_query("policy:social", &challenge).as_bytes())
                .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                .collect::<serde_json::Map<_, _>>()
                .into();
        approval["approved"] = json!(true);
        approval[field] = json!(value);
        post(
            &server,
            "/api/oauth/authorize",
            Some(&cookie),
            "application/json",
            &approval.to_string(),
            &[("Origin", &server.base)],
        )
    };
    let cases = [
        // (A megabyte is refused whole now, as any body past 64 KiB: `anonymous_bounds`.)
        ("client_id", "a".repeat(60_000)),
        ("redirect_uri", format!("https://app.example/cb?{}", "x".repeat(5_000))),
        ("state", "s".repeat(5_000)),
    ];
    for (field, value) in cases {
        let refused = approve(field, value);
        assert_eq!(
            refused.status,
            400,
            "{field}: {}",
            refused.body.chars().take(300).collect::<String>()
        );
        assert!(refused.body.contains(field), "{field}: {}", refused.body);
        assert!(refused.body.len() < 1_000, "{field}: the answer does not echo it back");
    }
    let longest = approve("client_id", "a".repeat(256));
    assert_eq!(longest.status, 200, "{}", longest.body);
}

/// The mode bits other local users get on `path`.
fn others_may(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o077
}

/// The database, its WAL and the local replica hold every password hash (argon2id, crackable
/// offline) and every email: created under the usual umask (022) they were readable by every
/// local user. What keycast creates is now its user's alone.
#[test]
fn what_keycast_creates_on_disk_other_local_users_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let replica = dir.path().join("replica");
    let server = Launch::new(&data).redeployable(&replica).start();
    register(&server, "private@example.com", None);
    server.write("on-disk", true);
    let mut created = vec![data.clone(), data.join("keycast.db"), replica.clone()];
    created.extend(
        walkdir(&replica)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "ltx")),
    );
    assert!(created.len() > 3, "the replica holds objects: {created:?}");
    for path in &created {
        assert_eq!(others_may(path), 0, "{} is open to other users", path.display());
    }
    let wal = data.join("keycast.db-wal");
    if wal.exists() {
        assert_eq!(others_may(&wal), 0, "the WAL is open to other users");
    }
    // A database an earlier keycast made under umask 022: SQLite gives its WAL the
    // database's own mode, whatever keycast's umask.
    server.stop();
    {
        use std::os::unix::fs::PermissionsExt;
        let opened = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(data.join("keycast.db"), opened).unwrap();
    }
    let server = Launch::new(&data).redeployable(&replica).start();
    server.write("after-the-upgrade", true);
    assert_eq!(
        others_may(&data.join("keycast.db")),
        0,
        "the database stays open to other users"
    );
    if wal.exists() {
        assert_eq!(others_may(&wal), 0, "the WAL is open to other users");
    }
}

/// Every file under `dir`, recursively.
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walkdir(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// One client of the embedded relay must not take the process. Its relay read messages of
/// up to 64 MiB, kept negentropy sessions without limit, and admitted any subscription: a
/// full-text `search` is matched against every event by scanning its content for the query
/// on the relay's task (a few long ones held the runtime's threads for minutes per event:
/// HTTP, probes and the lease's renewal with them), and `{}` saw every app's requests. Now
/// only NIP-46-shaped subscriptions are admitted, a message past 256 KiB ends the
/// connection as soon as its header announces it, and so does any message NIP-01 does not
/// define for clients.
#[test]
fn one_client_of_the_embedded_relay_cannot_take_the_process() {
    use tungstenite::{Message, WebSocket};
    let dir = tempfile::tempdir().unwrap();
    let relay_port = harness::free_port();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_EMBEDDED_RELAY_ADDR", &format!("127.0.0.1:{relay_port}"))
        .start();
    let connect = || {
        let stream = TcpStream::connect(("127.0.0.1", relay_port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tungstenite::client::client(format!("ws://127.0.0.1:{relay_port}"), stream)
            .unwrap()
            .0
    };
    // The relay's answer to `text`; `None` once the connection is gone.
    let answer = |ws: &mut WebSocket<TcpStream>, text: &str| -> Option<serde_json::Value> {
        ws.send(Message::text(text)).ok()?;
        loop {
            match ws.read() {
                Ok(Message::Text(reply)) => return serde_json::from_str(reply.as_str()).ok(),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    };
    let key = nostr::Keys::generate().public_key().to_hex();
    let nip46 = json!({"kinds": [24133], "#p": [key]});

    let mut ws = connect();
    for (filter, what) in [
        (json!({"kinds": [24133], "#p": [key], "search": "a"}), "a search"),
        (json!({}), "everything"),
        (json!({"kinds": [1], "#p": [key]}), "another kind"),
        (json!({"kinds": [24133]}), "no key named"),
    ] {
        let reply = answer(&mut ws, &json!(["REQ", "s", filter]).to_string()).expect("an answer");
        assert_eq!(reply[0], "CLOSED", "{what}: {reply}");
    }
    let reply = answer(&mut ws, &json!(["REQ", "s", nip46]).to_string()).expect("an answer");
    assert_eq!(reply[0], "EOSE", "a NIP-46 subscription is admitted: {reply}");

    // A subscription of 4 MiB (a NIP-46 one, with one long tag value): the connection ends
    // before the relay reads it (before, it was read, kept, and answered EOSE).
    let huge = json!({"kinds": [24133], "#p": [key], "#t": ["x".repeat(4 << 20)]});
    assert_eq!(
        answer(&mut ws, &json!(["REQ", "big", huge]).to_string()),
        None,
        "the connection that sent 4 MiB is closed"
    );
    // Negentropy: the relay stores nothing to reconcile, and kept each session for good.
    let mut ws = connect();
    assert_eq!(
        answer(&mut ws, r#"["NEG-OPEN","n",{"kinds":[24133]},"6100000200"]"#),
        None,
        "a NEG-OPEN ends its connection"
    );

    assert_eq!(server.get("/healthz/live").0, 200);
    let mut ws = connect();
    let reply = answer(&mut ws, &json!(["REQ", "s", nip46]).to_string()).expect("an answer");
    assert_eq!(reply[0], "EOSE", "the relay goes on serving others: {reply}");
}

/// The embedded relay bound beyond loopback, flooded from elsewhere with idle connections up
/// to its cap: keycast's own connection to its relay (from loopback) was refused like any
/// other when it connected after a restart or a drop, and then no bunker answered while
/// every probe passed. The last few connections are now for loopback peers only: here a
/// local app connects and is answered while the flood holds every other one.
#[test]
fn a_flood_from_elsewhere_leaves_the_embedded_relay_room_for_loopback() {
    use harness::native::{Cipher, NativeClient};
    // This machine's address other than loopback (no packet is sent).
    let Some(external) = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    else {
        assert!(
            std::env::var("KEYCAST_REQUIRE_PEERS").as_deref() != Ok("1"),
            "this machine has no address but loopback, and the suite requires every test to run"
        );
        eprintln!("skipped: this machine has no address but loopback");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay_port = harness::free_port();
    let cap = 16;
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_EMBEDDED_RELAY_ADDR", &format!("0.0.0.0:{relay_port}"))
        .env("KEYCAST_EMBEDDED_RELAY_MAX_CONNECTIONS", &cap.to_string())
        .start();
    let upgraded = |from: std::net::IpAddr| -> Option<TcpStream> {
        let mut conn = TcpStream::connect_timeout(&(from, relay_port).into(), Duration::from_secs(5)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(
            b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .ok()?;
        let mut answer = [0u8; 12];
        conn.read_exact(&mut answer).ok()?;
        (&answer == b"HTTP/1.1 101").then_some(conn)
    };
    let flood: Vec<TcpStream> = (0..cap + 4).filter_map(|_| upgraded(external)).collect();
    assert!(
        !flood.is_empty() && flood.len() <= cap - 4,
        "{} of {} connections from {external} were upgraded, cap {cap}",
        flood.len(),
        cap + 4
    );

    let (cookie, _) = register(&server, "local@example.com", None);
    let grant = harness::flow::grant(&server, &cookie, "policy:social");
    let url = grant["bunker_url"].as_str().unwrap();
    let bunker = nostr::PublicKey::from_hex(url.trim_start_matches("bunker://").split('?').next().unwrap()).unwrap();
    let secret = query_param(url, "secret").unwrap();
    let mut app = NativeClient::connect(&format!("ws://127.0.0.1:{relay_port}"), bunker);
    app.send(
        &[("1".into(), "connect", json!([bunker.to_hex(), secret]))],
        Cipher::Nip44,
    );
    let replies = app.replies(1, Duration::from_secs(10));
    assert_eq!(
        replies.len(),
        1,
        "a local app is answered while the flood holds the relay"
    );
    assert_eq!(replies[0].json["result"], "ack", "{}", replies[0].json);
    drop(flood);
}
