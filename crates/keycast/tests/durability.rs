//! Durable commit under failure: a write acknowledged as durable is never lost — not when the
//! process is killed, and not when the object store misbehaves (errors, delays, an outage).
//! During an outage durable writes get 503 (never a false success), non-durable writes keep
//! working, and everything ships once the store is back.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Keycast, Launch};

fn post(url: &str) -> u16 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(15)))
        .build()
        .new_agent();
    agent.post(url).send_empty().map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Keys in the replica (restored with `keycast restore`, integrity-checked).
fn replicated(dir: &std::path::Path, env: &[(String, String)]) -> Vec<String> {
    let out = dir.join(format!("restored-{}.db", Instant::now().elapsed().as_nanos()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    harness::keycast_cli(&["restore", "-o", out.to_str().unwrap()], &env).assert_success("keycast restore");
    assert_eq!(harness::integrity_check(&out), "ok");
    harness::test_keys(&out)
}

#[test]
fn sigkill_under_durable_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![(
        "KEYCAST_REPLICA_URL".to_owned(),
        format!("file://{}", dir.path().join("replica").display()),
    )];
    let server = env
        .iter()
        .fold(Launch::new(&dir.path().join("data")), |l, (k, v)| l.env(k, v))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (base, stop, acked) = (server.base.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("w{w}-{n:06}");
                    if post(&format!("{base}/api/test/write?key={key}&durable=true")) == 200 {
                        acked.lock().unwrap().push(key);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    server.signal(libc::SIGKILL);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "the writers got going ({} acknowledged)", acked.len());
    let present = replicated(dir.path(), &env);
    let lost: Vec<&String> = acked
        .iter()
        .filter(|k| !present.contains(&format!("test:{k}")) && !present.contains(k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} durable-acknowledged writes lost after SIGKILL, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(3)]
    );
}

/// A TCP proxy in front of the S3 server that can pass traffic, answer every request with a
/// 500, or be down (every connection reset at once).
struct FaultProxy {
    port: u16,
    mode: Arc<AtomicU8>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

const PASS: u8 = 0;
const ERRORS: u8 = 1;
const DOWN: u8 = 2;

impl FaultProxy {
    fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, o) = (mode.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                match m.load(Ordering::SeqCst) {
                    DOWN => drop(client),
                    ERRORS => {
                        std::thread::spawn(move || answer_500(client));
                    }
                    _ => {
                        o.lock().unwrap().push(client.try_clone().unwrap());
                        let upstream = upstream.clone();
                        std::thread::spawn(move || pipe(client, &upstream));
                    }
                }
            }
        });
        FaultProxy { port, mode, open }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Switches mode; kept-alive connections are cut so the new mode applies at once.
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(client: TcpStream, upstream: &str) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let mut client = client;
        let mut server = server;
        let _ = std::io::copy(&mut client, &mut server);
        let _ = server.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut s2, &mut c2);
    let _ = c2.shutdown(Shutdown::Both);
    let _ = up.join();
}

/// Reads one request (headers and a Content-Length body) and answers 500.
fn answer_500(client: TcpStream) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut length = 0usize;
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    let mut body = vec![0u8; length];
    let _ = reader.read_exact(&mut body);
    let mut client = client;
    let _ = client.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

#[test]
fn store_errors_and_an_outage_never_produce_a_false_durable_acknowledgement() {
    let Some(endpoint) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let proxy = FaultProxy::start(&endpoint);
    let bucket = harness::new_bucket(&endpoint, "faults");
    let env = harness::s3_env(&proxy.endpoint(), &bucket, "kc");
    let dir = tempfile::tempdir().unwrap();
    let server: Keycast = env
        .iter()
        .fold(Launch::new(&dir.path().join("data")), |l, (k, v)| l.env(k, v))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_UNHEALTHY_AFTER_SECS", "2")
        .start();
    let mut durable_acked = Vec::new();
    let mut async_acked = Vec::new();
    let mut write = |phase: &str, n: usize, durable: bool| {
        let key = format!("{phase}-{n:04}");
        let status = post(&format!("{}/api/test/write?key={key}&durable={durable}", server.base));
        if status == 200 {
            if durable {
                durable_acked.push(key)
            } else {
                async_acked.push(key)
            }
        }
        status
    };
    for n in 0..10 {
        assert_eq!(write("before", n, true), 200);
    }

    // 5xx from the store, then a full outage (connections reset): durable writes are never
    // acknowledged. Async writes are accepted only while the lease is still valid by the
    // clocks (nobody else can take the replica before it runs out); once it has run out
    // unconfirmed they are refused too — fail closed, since another instance may be writing.
    proxy.set(ERRORS);
    let failing = Instant::now();
    let mut async_statuses = Vec::new();
    for n in 0..3 {
        assert_eq!(
            write("errors", n, true),
            503,
            "a durable write cannot be confirmed while the store fails"
        );
        async_statuses.push((failing.elapsed(), write("errors-async", n, false)));
    }
    proxy.set(DOWN);
    let mut n = 0;
    while failing.elapsed() < Duration::from_secs(30) {
        assert_ne!(
            write("outage", n, true),
            200,
            "no durable acknowledgement during the outage"
        );
        async_statuses.push((failing.elapsed(), write("outage-async", n, false)));
        n += 1;
    }
    // The default lease lives 15 s: past it, nothing may be accepted.
    for (at, status) in &async_statuses {
        assert!(
            *status == 200 || *status == 503,
            "an async write is accepted or refused, nothing else: {status} at {at:?}"
        );
        if *at > Duration::from_secs(16) {
            assert_eq!(
                *status, 503,
                "an async write {at:?} into the outage is refused (fail closed)"
            );
        }
    }
    let (ready, body) = server.get_json("/healthz/ready");
    assert_eq!(ready, 503, "readiness reports the failing replica: {body}");

    // The store comes back: the backlog ships, durable writes work again.
    proxy.set(PASS);
    server.wait_for_status("/healthz/ready", 200, Duration::from_secs(30));
    for n in 0..10 {
        assert_eq!(write("after", n, true), 200);
    }
    server.stop();

    let direct = harness::s3_env(&endpoint, &bucket, "kc");
    let present = replicated(dir.path(), &direct);
    for key in durable_acked.iter().chain(async_acked.iter()) {
        assert!(
            present.contains(key) || present.contains(&format!("test:{key}")),
            "{key} is in the replica"
        );
    }
}
