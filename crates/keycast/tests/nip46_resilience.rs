//! NIP-46 when a relay drops: keycast's connection to its relay goes through a TCP proxy
//! that the test cuts (every open connection closed, new ones refused) and later restores,
//! while the client (nostr-tools `BunkerSigner`) stays connected to the relay directly.
//! Nothing is signed while keycast cannot reach the relay; once the relay is reachable
//! again keycast reconnects with backoff, re-sends its subscription, and answers. A
//! connection that goes silent instead (no close, no reset: a NAT that forgot it) is
//! noticed by keycast's own pings, and replaced.

mod harness;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::flow::{grant, register};
use harness::link::{pipe_until_silenced, silence};
use harness::nostr::{BunkerClient, Relay};
use harness::{Keycast, Launch};
use serde_json::{json, Value};

/// The outage lasts at least this long, and until keycast has had a reconnect refused.
const OUTAGE: Duration = Duration::from_secs(3);
/// Longest wait for keycast's first reconnect attempt during the outage (nostr-sdk waits
/// 2 s ± 3 s jitter after a drop with keycast's options).
const FIRST_ATTEMPT_WITHIN: Duration = Duration::from_secs(20);
/// How long keycast may take to answer again once the relay is reachable.
const RECOVERY_WITHIN: Duration = Duration::from_secs(30);
/// The client's timeout for a request during the outage (milliseconds).
const OUTAGE_TIMEOUT_MS: u64 = 1500;
/// The client's timeout for each request after the outage (milliseconds).
const RETRY_TIMEOUT_MS: u64 = 3000;
/// How long a silent relay connection may go unnoticed, with the reconnection and the
/// client's next try: keycast pings every 10 s and gives up on a ping unanswered for 10 s.
const SILENCE_NOTICED_WITHIN: Duration = Duration::from_secs(30);

/// A loopback TCP proxy in front of one upstream address that can be cut and restored.
/// Records every connection attempt it sees, with whether it was let through.
struct RelayProxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    down: bool,
    /// Both ends of every connection piped so far (closed ones are harmless to shut down).
    open: Vec<TcpStream>,
    /// Per connection piped so far: set, it carries no more bytes either way.
    silenced: Vec<Arc<AtomicBool>>,
    /// (when, let through) for every incoming connection.
    attempts: Vec<(Instant, bool)>,
}

impl RelayProxy {
    /// Proxies `ws://127.0.0.1:PORT` (`upstream`, the real relay).
    fn start(upstream: &str) -> RelayProxy {
        let upstream = upstream.trim_start_matches("ws://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<Mutex<ProxyState>> = Arc::default();
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let mut state = shared.lock().unwrap();
                let down = state.down;
                state.attempts.push((Instant::now(), !down));
                if down {
                    // Accepted and closed at once: the WebSocket handshake fails.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                state.open.push(client.try_clone().unwrap());
                state.open.push(server.try_clone().unwrap());
                let silenced = Arc::new(AtomicBool::new(false));
                state.silenced.push(silenced.clone());
                std::thread::spawn(move || pipe_until_silenced(client, server, silenced));
            }
        });
        RelayProxy { port, state }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Closes every open connection (both ends) and refuses new ones until
    /// [`restore`](Self::restore). Returns how many connections were open.
    fn cut(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        state.down = true;
        let open = state.open.len() / 2;
        for stream in state.open.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        open
    }

    /// Every open connection stops carrying bytes, with no close and no reset, as when a
    /// NAT forgets a connection; new connections are let through. Returns how many went
    /// silent.
    fn silence(&self) -> usize {
        let state = self.state.lock().unwrap();
        silence(&state.silenced);
        state.silenced.len()
    }

    fn restore(&self) {
        self.state.lock().unwrap().down = false;
    }

    /// Every connection attempt so far: (when, let through).
    fn attempts(&self) -> Vec<(Instant, bool)> {
        self.state.lock().unwrap().attempts.clone()
    }
}

fn url_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The token's bunker URL with its relay (`via`, the proxy keycast was told about)
/// replaced by `direct`, so the client bypasses the proxy.
fn bunker_url_via(token: &Value, via: &str, direct: &str) -> String {
    let bunker = token["bunker_url"].as_str().expect("bunker_url");
    let (via, direct) = (url_encode(via), url_encode(direct));
    assert!(
        bunker.contains(&format!("relay={via}")),
        "{bunker} names the configured relay"
    );
    bunker.replace(&format!("relay={via}"), &format!("relay={direct}"))
}

fn sign(client: &mut BunkerClient, content: &str, timeout_ms: u64) -> Value {
    client.call(json!({"op": "sign_event", "event": {"kind": 1, "content": content}, "timeout_ms": timeout_ms}))
}

/// Connection attempts relative to `zero`, e.g. `+2.31s refused`.
fn schedule(attempts: &[(Instant, bool)], zero: Instant) -> String {
    attempts
        .iter()
        .filter(|(at, _)| *at >= zero)
        .map(|(at, through)| {
            let outcome = if *through { "let through" } else { "refused" };
            format!("+{:.2}s {outcome}", at.duration_since(zero).as_secs_f64())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// keycast, whose connection to the relay goes through a [`RelayProxy`], and a nostr-tools
/// client connected to the relay directly with a fresh grant's bunker, which has signed
/// once. `None` outside scripts/test.sh when a peer is missing.
struct Connected {
    proxy: RelayProxy,
    server: Keycast,
    client: BunkerClient,
    _relay: Relay,
    _dir: tempfile::TempDir,
}

fn connected(email: &str) -> Option<Connected> {
    let relay = Relay::start()?;
    let mut client = BunkerClient::spawn()?;
    let proxy = RelayProxy::start(relay.url());
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("BUNKER_RELAYS", &proxy.url())
        .start();
    let (cookie, _) = register(&server, email, None);
    let token = grant(&server, &cookie, "policy:social");
    let bunker = bunker_url_via(&token, &proxy.url(), relay.url());
    let connected = client.connect(&bunker);
    assert_eq!(connected["ok"], true, "connect: {connected}");
    let before = sign(&mut client, "before the fault", 5000);
    assert_eq!(before["ok"], true, "signing before the fault: {before}");
    Some(Connected {
        proxy,
        server,
        client,
        _relay: relay,
        _dir: dir,
    })
}

/// Signs again and again (each try waiting [`RETRY_TIMEOUT_MS`]) until an answer, failing
/// the test if none came `within` of now (`since`, what happened just before). Returns the
/// answer and the failed tries' errors.
fn sign_within(
    client: &mut BunkerClient,
    server: &Keycast,
    proxy: &RelayProxy,
    since: &str,
    within: Duration,
) -> (Value, Vec<String>) {
    let started = Instant::now();
    let mut tries = Vec::new();
    loop {
        let reply = sign(
            client,
            &format!("after {since}, try {}", tries.len() + 1),
            RETRY_TIMEOUT_MS,
        );
        if reply["ok"] == true {
            return (reply, tries);
        }
        tries.push(reply["error"].to_string());
        assert!(
            started.elapsed() < within,
            "no answer {within:?} after {since} ({} tries: {tries:?}); connections since: {}; log:\n{}",
            tries.len(),
            schedule(&proxy.attempts(), started),
            server.log()
        );
    }
}

#[test]
fn signing_resumes_after_the_relay_connection_drops() {
    let Some(Connected {
        proxy,
        server,
        mut client,
        _relay,
        _dir,
    }) = connected("resilience@example.com")
    else {
        return;
    };

    // The relay drops: keycast's connection is cut and its reconnects refused.
    let cut_at = Instant::now();
    let cut = proxy.cut();
    assert!(cut >= 1, "keycast's relay connection went through the proxy");
    let during = sign(&mut client, "during the outage", OUTAGE_TIMEOUT_MS);
    assert_ne!(
        during["ok"], true,
        "nothing can sign while keycast cannot reach the relay: {during}"
    );
    while cut_at.elapsed() < OUTAGE || !proxy.attempts().iter().any(|(at, through)| *at > cut_at && !through) {
        assert!(
            cut_at.elapsed() < FIRST_ATTEMPT_WITHIN,
            "keycast never tried to reconnect within {FIRST_ATTEMPT_WITHIN:?}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The relay is back: keycast must reconnect, resubscribe and answer. (The relay keeps
    // the requests the client gave up on, and keycast signs them too once resubscribed:
    // it answers requests up to 120 s old.)
    proxy.restore();
    let back_at = Instant::now();
    let (after, tries) = sign_within(&mut client, &server, &proxy, "the relay came back", RECOVERY_WITHIN);
    let recovered = back_at.elapsed();
    assert_eq!(after["verified"], true, "the signature verifies: {after}");
    eprintln!(
        "outage {:.2}s; signing answered {:.2}s after the relay came back ({} failed tries); \
         connections since the cut: {}",
        back_at.duration_since(cut_at).as_secs_f64(),
        recovered.as_secs_f64(),
        tries.len(),
        schedule(&proxy.attempts(), cut_at)
    );
    // The reconnects are counted (the count other tests hold at zero to show a connection held).
    let (_, metrics) = server.get("/metrics");
    assert!(
        harness::metric_sum(&metrics, "keycast_nip46_reconnects_total") >= 1.0,
        "keycast reconnected without counting it"
    );
    let log = server.log();
    assert!(!log.contains("panicked"), "keycast panicked; log:\n{log}");
}

/// keycast's connection to its relay goes silent (no close, no reset: a NAT that forgot an
/// idle connection, a relay host that vanished). Nothing on the connection ever fails, so
/// only a ping can tell. Before, keycast relied on nostr-sdk's (every 55 s, a miss noticed at
/// the next one): NIP-46 went unanswered for one to two minutes.
#[test]
fn signing_resumes_soon_after_the_relay_connection_goes_silent() {
    let Some(Connected {
        proxy,
        server,
        mut client,
        _relay,
        _dir,
    }) = connected("silence@example.com")
    else {
        return;
    };

    let silent_at = Instant::now();
    assert!(
        proxy.silence() >= 1,
        "keycast's relay connection went through the proxy"
    );
    let (after, tries) = sign_within(
        &mut client,
        &server,
        &proxy,
        "keycast's relay connection went silent",
        SILENCE_NOTICED_WITHIN,
    );
    assert_eq!(after["verified"], true, "the signature verifies: {after}");
    eprintln!(
        "signing answered {:.2}s after the connection went silent ({} failed tries); connections since: {}",
        silent_at.elapsed().as_secs_f64(),
        tries.len(),
        schedule(&proxy.attempts(), silent_at)
    );
}
