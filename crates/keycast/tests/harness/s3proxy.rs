//! An HTTP proxy in front of the S3 server (moto) that misbehaves on purpose, one request at a
//! time: it can answer every request late, forward a request and then lose its answer (the
//! store applied it; the client never hears), or hold a request until told to let it go (an
//! upload in flight while its sender is paused).
//!
//! Each client request is read whole, forwarded on a fresh upstream connection, and the whole
//! answer read back before the proxy decides what the client gets; every answer closes the
//! client connection (clients simply open a new one).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What happens to requests matching a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded and applied; the answer never reaches the client (the connection is closed).
    LoseAnswer,
    /// Held before forwarding until [`FaultyS3::release`].
    Hold,
}

#[derive(Debug)]
struct Rule {
    method: &'static str,
    path_contains: String,
    fault: Fault,
    remaining: usize,
}

#[derive(Default)]
struct State {
    delay: Duration,
    rules: Vec<Rule>,
    released: bool,
}

/// The proxy. Dropping it leaves its thread serving until the test process ends.
pub struct FaultyS3 {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
    /// Requests that hit a rule and were then forwarded (held ones once released).
    faulted: Arc<AtomicUsize>,
    /// Requests held right now.
    holding: Arc<AtomicUsize>,
}

impl FaultyS3 {
    /// Starts a proxy for the S3 server at `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> FaultyS3 {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let faulted = Arc::new(AtomicUsize::new(0));
        let holding = Arc::new(AtomicUsize::new(0));
        let (s, f, h) = (state.clone(), faulted.clone(), holding.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (upstream, s, f, h) = (upstream.clone(), s.clone(), f.clone(), h.clone());
                std::thread::spawn(move || serve(client, &upstream, &s, &f, &h));
            }
        });
        FaultyS3 {
            port,
            state,
            faulted,
            holding,
        }
    }

    /// `http://127.0.0.1:PORT`, to use as `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request is forwarded only after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.state.0.lock().unwrap().delay = delay;
    }

    /// The next `times` requests with `method` whose path contains `path_contains` meet
    /// `fault`.
    pub fn add(&self, method: &'static str, path_contains: &str, fault: Fault, times: usize) {
        let mut state = self.state.0.lock().unwrap();
        if fault == Fault::Hold {
            state.released = false;
        }
        state.rules.push(Rule {
            method,
            path_contains: path_contains.to_owned(),
            fault,
            remaining: times,
        });
    }

    /// Lets every held request (and every later one) through.
    pub fn release(&self) {
        let (lock, wake) = &*self.state;
        lock.lock().unwrap().released = true;
        wake.notify_all();
    }

    /// How many requests met a fault and were forwarded.
    pub fn faulted(&self) -> usize {
        self.faulted.load(Ordering::SeqCst)
    }

    /// Waits (up to `timeout`) until at least one request is being held.
    pub fn wait_holding(&self, timeout: Duration) {
        let started = Instant::now();
        while self.holding.load(Ordering::SeqCst) == 0 {
            assert!(started.elapsed() < timeout, "no request reached the hold");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to `timeout`) until `n` faulted requests were forwarded.
    pub fn wait_faulted(&self, n: usize, timeout: Duration) {
        let started = Instant::now();
        while self.faulted() < n {
            assert!(
                started.elapsed() < timeout,
                "only {} of {n} faulted requests went through",
                self.faulted()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    state: &(Mutex<State>, Condvar),
    faulted: &AtomicUsize,
    holding: &AtomicUsize,
) {
    let Some((head, body)) = read_request(&client) else {
        return;
    };
    let mut words = head.split_whitespace();
    let (method, path) = (
        words.next().unwrap_or("").to_owned(),
        words.next().unwrap_or("").to_owned(),
    );
    let (delay, fault) = {
        let mut s = state.0.lock().unwrap();
        let index = s
            .rules
            .iter()
            .position(|r| r.method == method && path.contains(&r.path_contains));
        let fault = index.map(|i| {
            let rule = &mut s.rules[i];
            rule.remaining -= 1;
            let fault = rule.fault;
            if rule.remaining == 0 {
                s.rules.remove(i);
            }
            fault
        });
        (s.delay, fault)
    };
    if fault == Some(Fault::Hold) {
        holding.fetch_add(1, Ordering::SeqCst);
        let (lock, wake) = state;
        let mut s = lock.lock().unwrap();
        while !s.released {
            s = wake.wait(s).unwrap();
        }
        drop(s);
        holding.fetch_sub(1, Ordering::SeqCst);
    }
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let Some(answer) = forward(upstream, &head, &body) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    if fault.is_some() {
        faulted.fetch_add(1, Ordering::SeqCst);
    }
    if fault == Some(Fault::LoseAnswer) {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let mut client = client;
    let _ = client.write_all(&answer);
    let _ = client.shutdown(Shutdown::Both);
}

/// Reads one request: its head (request line and headers, `Connection` rewritten to close)
/// and its body (by `Content-Length`).
fn read_request(client: &TcpStream) -> Option<(String, Vec<u8>)> {
    let mut reader = BufReader::new(client.try_clone().ok()?);
    let mut head = String::new();
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if lower.starts_with("connection:") {
            continue;
        }
        head.push_str(&line);
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// Sends the request upstream and reads the whole answer (the upstream closes after it).
fn forward(upstream: &str, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut server = TcpStream::connect(upstream).ok()?;
    server.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    server.write_all(head.as_bytes()).ok()?;
    server.write_all(body).ok()?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}
