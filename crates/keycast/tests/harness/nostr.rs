//! Real Nostr peers for the NIP-46 tests: external relay processes (PyPI `nostr-relay`, and
//! nostr-rs-relay, which sends no `OK` for ephemeral events) and a real NIP-46 client
//! (nostr-tools' `BunkerSigner`, driven through `tests/js/bunker-client.mjs`).
//!
//! All come from scripts/install-peers.sh and follow [`peer`] semantics: a missing peer
//! skips the test outside scripts/test.sh and fails it inside. This module knows nothing of
//! keycast; tests point the client at whatever `bunker://` URL they obtained.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{collect, peer};

/// Every kind-24133 event the relay stored with an author in `authors` (nostr-relay keeps
/// ephemeral events for a few minutes, so a test can count what was published).
pub fn stored(relay: &str, authors: Vec<nostr::PublicKey>) -> Vec<nostr::Event> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = nostr_sdk::Client::default();
        client.add_relay(relay).await.unwrap();
        client.connect().await;
        let filter = nostr::Filter::new()
            .kind(nostr::Kind::NostrConnect)
            .authors(authors)
            .limit(10_000);
        let events = client.fetch_events(filter, Duration::from_secs(10)).await.unwrap();
        client.shutdown().await;
        events.into_iter().collect()
    })
}

/// What `bunker` replied to `client` through `relay` (as stored there, decrypted as only the
/// client can): each reply's date and its JSON (`id`, and `result` or `error`).
pub fn replies_to(relay: &str, bunker: &nostr::PublicKey, client: &nostr::Keys) -> Vec<(u64, Value)> {
    stored(relay, vec![*bunker])
        .into_iter()
        .filter_map(|event| {
            let text = nostr::nips::nip44::decrypt(client.secret_key(), bunker, &event.content).ok()?;
            Some((event.created_at.as_secs(), serde_json::from_str(&text).ok()?))
        })
        .collect()
}

/// How long the relay may take to accept connections (it runs its migrations first).
pub const RELAY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the relay gets to exit after SIGTERM before it is killed (it takes about 1 s).
const RELAY_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver's per-command timeout when a command sets no `timeout_ms` (milliseconds).
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 5000;

/// How much longer than a command's own timeout [`BunkerClient::call`] waits for the reply
/// line before deciding the driver is stuck.
const CALL_SLACK: Duration = Duration::from_secs(10);

/// A `node` command running `tests/js/<script>` with `KEYCAST_NOSTR_TOOLS_DIR` set to
/// `nostr_tools_dir`, where the scripts resolve nostr-tools and ws from.
pub fn node_script(script: &str, nostr_tools_dir: &str) -> Command {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js").join(script);
    let mut cmd = Command::new("node");
    cmd.arg(path).env("KEYCAST_NOSTR_TOOLS_DIR", nostr_tools_dir);
    cmd
}

/// A fresh Nostr keypair as hex: `(secret key, x-only public key)`.
pub fn keypair() -> (String, String) {
    let keys = ::nostr::Keys::generate();
    (keys.secret_key().to_secret_hex(), keys.public_key().to_hex())
}

// ---------------------------------------------------------------------------------------
// The relay.
// ---------------------------------------------------------------------------------------

/// A running PyPI `nostr-relay` on a free loopback port, with its own temporary sqlite
/// database and config. Stopped on drop.
///
/// It answers `OK` for ephemeral kind 24133, unlike nostr-rs-relay. It does store ephemeral
/// events (its garbage collector deletes them every 5 minutes) and treats `limit: 0` as
/// "the default limit", so a subscription without `since` is sent recent 24133 events again.
pub struct Relay {
    child: Child,
    url: String,
    stderr: Arc<Mutex<String>>,
    /// Holds the config and the database; removed on drop, after the process stopped.
    _dir: tempfile::TempDir,
}

impl Relay {
    /// Starts the relay named by `KEYCAST_TEST_NOSTR_RELAY` (the `nostr-relay` executable)
    /// and waits until it serves its NIP-11 document. `None` when the peer is not
    /// installed and the suite does not require it.
    ///
    /// # Panics
    /// If the relay cannot start or does not answer within [`RELAY_START_TIMEOUT`].
    pub fn start() -> Option<Relay> {
        let binary = PathBuf::from(peer("KEYCAST_TEST_NOSTR_RELAY")?);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, relay_config(&binary, dir.path())).unwrap();
        let mut cmd = Command::new(&binary);
        cmd.arg("-c")
            .arg(&config)
            .arg("serve")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        // Its Python logging goes to stdout and gunicorn's to stderr; keep both for failures.
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let mut relay = Relay {
            child,
            url: String::new(),
            stderr,
            _dir: dir,
        };
        let port = relay.wait_for_port(&stdout);
        relay.url = format!("ws://127.0.0.1:{port}");
        relay.wait_for_nip11(port);
        Some(relay)
    }

    /// `ws://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the relay (gunicorn) wrote to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Reads the port gunicorn bound (`bind: 127.0.0.1:0`) from its "Listening at" line.
    fn wait_for_port(&mut self, stdout: &Arc<Mutex<String>>) -> u16 {
        let deadline = Instant::now() + RELAY_START_TIMEOUT;
        loop {
            let text = self.log();
            if let Some(port) = text
                .split("Listening at: http://127.0.0.1:")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse().ok())
            {
                return port;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "nostr-relay did not start (exit: {exited:?}); stderr:\n{text}\nstdout:\n{}",
                stdout.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls the NIP-11 document until the worker answers it.
    fn wait_for_nip11(&self, port: u16) {
        let deadline = Instant::now() + RELAY_START_TIMEOUT;
        loop {
            if serves_nip11(port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nostr-relay never served NIP-11 on port {port}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Relay {
    /// SIGTERM to gunicorn's master, which stops its worker (about 1 s). If it hangs, SIGKILL
    /// to the worker and the master: a worker does not notice its master's death. The relay
    /// stays in the test's process group so that nextest's group kill on a timeout reaches it.
    fn drop(&mut self) {
        let pid = self.child.id();
        let workers = children(pid);
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + RELAY_STOP_TIMEOUT;
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                for worker in workers {
                    // SAFETY: as above, on the master's children (a reused pid is unlikely in 5 s).
                    unsafe { libc::kill(worker, libc::SIGKILL) };
                }
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        super::reap(&mut self.child);
    }
}

/// Whether a relay on `port` answers its NIP-11 document (`Accept: application/nostr+json`).
fn serves_nip11(port: u16) -> bool {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .new_agent();
    let answer = agent
        .get(&format!("http://127.0.0.1:{port}/"))
        .header("Accept", "application/nostr+json")
        .call();
    match answer {
        Ok(mut response) => {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            response.status() == 200 && body.contains("supported_nips")
        }
        Err(_) => false,
    }
}

/// The pids of `pid`'s child processes (Linux `/proc/PID/task/PID/children`).
fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The packaged `nostr_relay/config.yaml`, adapted: a database in `dir`, port 0, and no
/// gunicorn control socket (which would otherwise be created under `~/.gunicorn/`).
///
/// # Panics
/// If the packaged config cannot be found next to `binary` or no longer has the lines
/// adapted here (a different nostr-relay version).
fn relay_config(binary: &Path, dir: &Path) -> String {
    let packaged = packaged_relay_config(binary);
    let text = std::fs::read_to_string(&packaged).unwrap();
    let db = dir.join("relay.sqlite3");
    let replacements = [
        (
            "  sqlalchemy.url: sqlite+aiosqlite:///nostr.sqlite3",
            format!("  sqlalchemy.url: sqlite+aiosqlite:///{}", db.display()),
        ),
        (
            "  bind: 127.0.0.1:6969",
            "  bind: 127.0.0.1:0\n  control_socket_disable: true".to_owned(),
        ),
    ];
    let mut adapted = text.clone();
    for (from, to) in replacements {
        assert!(
            adapted.contains(from),
            "{} has no line {from:?}: adapt harness/nostr.rs to this nostr-relay version",
            packaged.display()
        );
        adapted = adapted.replacen(from, &to, 1);
    }
    adapted
}

/// Finds `lib/python3.*/site-packages/nostr_relay/config.yaml` in the venv that holds
/// `binary` (`<venv>/bin/nostr-relay`).
fn packaged_relay_config(binary: &Path) -> PathBuf {
    let venv = binary.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages/nostr_relay/config.yaml"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no nostr_relay/config.yaml under {}", lib.display()))
}

/// A running nostr-rs-relay on a free loopback port, with its own temporary sqlite database
/// and config. Killed on drop.
///
/// Unlike [`Relay`] it sends **no `OK`** for ephemeral events, kind 24133 included (it
/// broadcasts them to subscribers and says nothing to the publisher), so a NIP-46 signer
/// that waited for an `OK` before going on would stall on it.
pub struct RsRelay {
    child: Child,
    url: String,
    output: Arc<Mutex<String>>,
    /// Holds the config and the database; removed on drop, after the process stopped.
    _dir: tempfile::TempDir,
}

impl RsRelay {
    /// Starts the relay named by `KEYCAST_TEST_NOSTR_RS_RELAY` (the `nostr-rs-relay`
    /// executable) and waits until it serves its NIP-11 document. `None` when the peer is
    /// not installed and the suite does not require it.
    ///
    /// # Panics
    /// If the relay cannot start or does not answer within [`RELAY_START_TIMEOUT`].
    pub fn start() -> Option<RsRelay> {
        let binary = PathBuf::from(peer("KEYCAST_TEST_NOSTR_RS_RELAY")?);
        let dir = tempfile::tempdir().unwrap();
        // It has no "port 0": take a free port and hand it over (a race only with another
        // process binding the same port in between, which the start-up check reports).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, rs_relay_config(port, &data)).unwrap();
        let mut cmd = Command::new(&binary);
        cmd.arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        // Its tracing log goes to stdout; stderr only has config errors. Keep both, merged.
        let output = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let mut relay = RsRelay {
            child,
            url: format!("ws://127.0.0.1:{port}"),
            output,
            _dir: dir,
        };
        let deadline = Instant::now() + RELAY_START_TIMEOUT;
        while !serves_nip11(port) {
            let exited = relay.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "nostr-rs-relay did not serve NIP-11 on port {port} (exit: {exited:?}); stdout:\n{}\nstderr:\n{}",
                relay.log(),
                stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(relay)
    }

    /// `ws://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the relay logged (stdout) so far.
    pub fn log(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for RsRelay {
    /// SIGKILL: one process, and nothing in its temporary database is worth a clean stop.
    fn drop(&mut self) {
        super::reap(&mut self.child);
    }
}

/// A minimal nostr-rs-relay config: sqlite in `data`, loopback on `port`, no rate limit on
/// event writes (`messages_per_sec = 0` turns it off).
fn rs_relay_config(port: u16, data: &Path) -> String {
    format!(
        r#"[info]
relay_url = "ws://127.0.0.1:{port}/"
name = "keycast test relay"

[database]
engine = "sqlite"
data_directory = "{data}"

[network]
address = "127.0.0.1"
port = {port}

[limits]
messages_per_sec = 0
"#,
        data = data.display()
    )
}

// ---------------------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------------------

/// nostr-tools' `BunkerSigner` in a long-lived Node process (`tests/js/bunker-client.mjs`),
/// one JSON command per line. Killed on drop.
///
/// Every reply is a JSON object with `ok`, `ms` (the round trip in milliseconds) and either
/// the op's fields or `error` (the remote signer's error string, or `"timeout"`). See the
/// script's header for the ops.
pub struct BunkerClient {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl BunkerClient {
    /// Starts the driver with nostr-tools from `KEYCAST_NOSTR_TOOLS_DIR`. `None` when the
    /// peer is not installed and the suite does not require it.
    pub fn spawn() -> Option<BunkerClient> {
        let dir = peer("KEYCAST_NOSTR_TOOLS_DIR")?;
        Some(BunkerClient::start(node_script("bunker-client.mjs", &dir)))
    }

    /// The same protocol driven by NDK's `NDKNip46Signer` (`tests/js/ndk-client.mjs`), with
    /// NDK from `KEYCAST_NDK_DIR`. `None` when the peer is not installed and the suite does
    /// not require it.
    pub fn spawn_ndk() -> Option<BunkerClient> {
        let dir = peer("KEYCAST_NDK_DIR")?;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/ndk-client.mjs");
        let mut cmd = Command::new("node");
        cmd.arg(path).env("KEYCAST_NDK_DIR", dir);
        Some(BunkerClient::start(cmd))
    }

    fn start(mut cmd: Command) -> BunkerClient {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start node: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stderr = collect(child.stderr.take().unwrap());
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        BunkerClient {
            child,
            stdin,
            replies,
            stderr,
        }
    }

    /// Sends one command (`{"op": …, …}`) and returns its reply, whether `ok` or not.
    ///
    /// # Panics
    /// If the driver exits or sends no reply within the command's `timeout_ms` (default
    /// [`DEFAULT_CALL_TIMEOUT_MS`]) plus a margin: the driver itself answers `"timeout"`
    /// before then, so this means it is broken.
    pub fn call(&mut self, cmd: Value) -> Value {
        let timeout = Duration::from_millis(cmd["timeout_ms"].as_u64().unwrap_or(DEFAULT_CALL_TIMEOUT_MS)) + CALL_SLACK;
        writeln!(self.stdin, "{cmd}")
            .unwrap_or_else(|e| panic!("bunker-client.mjs is gone ({e}); stderr:\n{}", self.log()));
        match self.replies.recv_timeout(timeout) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bunker-client.mjs replied {line:?} ({e}); stderr:\n{}", self.log())),
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "bunker-client.mjs did not answer {cmd} within {timeout:?}; stderr:\n{}",
                    self.log()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("bunker-client.mjs exited while running {cmd}; stderr:\n{}", self.log())
            }
        }
    }

    /// [`call`](Self::call), failing the test unless the reply is `ok`.
    pub fn call_ok(&mut self, cmd: Value) -> Value {
        let reply = self.call(cmd.clone());
        assert_eq!(reply["ok"], true, "{cmd} failed: {reply}; stderr:\n{}", self.log());
        reply
    }

    /// `connect` with a fresh client key: parses the `bunker://` URL, subscribes on its
    /// relays and sends NIP-46 `connect` with its secret. Replaces any previous session.
    pub fn connect(&mut self, bunker: &str) -> Value {
        self.call(json!({ "op": "connect", "bunker": bunker }))
    }

    /// `connect` as the client whose secret key is `client_sk` (hex), e.g. to reuse a secret
    /// from a second client identity.
    pub fn connect_as(&mut self, bunker: &str, client_sk: &str) -> Value {
        self.call(json!({ "op": "connect", "bunker": bunker, "client_sk": client_sk }))
    }

    /// `get_public_key`, always a round trip (nostr-tools' cache is cleared): `pubkey`.
    pub fn get_public_key(&mut self) -> Value {
        self.call(json!({ "op": "get_public_key" }))
    }

    /// `sign_event` of `event` (`kind`, `content`, `tags`, `created_at`; missing fields get
    /// kind 1, "", [] and now): `event` as returned and `verified` by nostr-tools.
    pub fn sign_event(&mut self, event: Value) -> Value {
        self.call(json!({ "op": "sign_event", "event": event }))
    }

    /// `nip44_encrypt` of `text` for `peer` (hex pubkey): `result`.
    pub fn nip44_encrypt(&mut self, peer: &str, text: &str) -> Value {
        self.call(json!({ "op": "nip44_encrypt", "peer": peer, "text": text }))
    }

    /// `nip44_decrypt` of `text` from `peer`: `result`.
    pub fn nip44_decrypt(&mut self, peer: &str, text: &str) -> Value {
        self.call(json!({ "op": "nip44_decrypt", "peer": peer, "text": text }))
    }

    /// `nip04_encrypt` of `text` for `peer`: `result`.
    pub fn nip04_encrypt(&mut self, peer: &str, text: &str) -> Value {
        self.call(json!({ "op": "nip04_encrypt", "peer": peer, "text": text }))
    }

    /// `nip04_decrypt` of `text` from `peer`: `result`.
    pub fn nip04_decrypt(&mut self, peer: &str, text: &str) -> Value {
        self.call(json!({ "op": "nip04_decrypt", "peer": peer, "text": text }))
    }

    /// `ping`: `result` is "pong" when ok.
    pub fn ping(&mut self) -> Value {
        self.call(json!({ "op": "ping" }))
    }

    /// Any NIP-46 `method` with `params` (a JSON array) through `sendRequest`: `result`.
    pub fn raw(&mut self, method: &str, params: Value) -> Value {
        self.call(json!({ "op": "raw", "method": method, "params": params }))
    }

    /// `n` sequential `sign_event`s after `warmup` unmeasured ones: `p50`, `p99`, `mean`,
    /// `min`, `max` in milliseconds as the app sees them, and the same under `wire` from the
    /// signed request's publication to the answer's arrival (nostr-tools signs and verifies
    /// in pure JS, several ms per operation, which `wire` leaves out). The whole run gets 100 ms per event plus 5 s before the
    /// driver answers `"timeout"`.
    pub fn bench(&mut self, n: u64, warmup: u64) -> Value {
        let timeout_ms = (n + warmup) * 100 + DEFAULT_CALL_TIMEOUT_MS;
        self.call(json!({ "op": "bench", "n": n, "warmup": warmup, "timeout_ms": timeout_ms }))
    }

    /// Everything the driver wrote to stderr so far (nostr-tools warnings, Node errors).
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for BunkerClient {
    fn drop(&mut self) {
        super::reap(&mut self.child);
    }
}
