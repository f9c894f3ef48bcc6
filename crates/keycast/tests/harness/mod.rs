//! The black-box harness: starts the real `keycast` binary on a free port with a temporary
//! data directory, talks HTTP to it, and stops it with signals — the way Cloud Run does.
//!
//! Every end-to-end test builds on [`Keycast`].

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod api;
pub mod engine;
pub mod flow;
pub mod link;
pub mod native;
pub mod nostr;
pub mod proxy;
pub mod rust_connect;
pub mod s3proxy;
pub mod scripted_relay;
pub mod stores;
pub mod tmpfs;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[allow(unused_imports)] // each test binary uses a different part of the harness
pub use engine::{Engine, PgDatabase};

/// A fixed master key (32 bytes, base64) for tests that restart on a wiped data directory.
pub const TEST_MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// How long a start-up may take before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or exited) keycast process.
pub struct Keycast {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The data directory it was started with.
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// Everything printed on stdout (the address line and anything else).
    stdout: Arc<Mutex<String>>,
    /// The PostgreSQL test database it runs on, kept until the process is gone.
    pub database: Option<Arc<PgDatabase>>,
}

/// How to start keycast: extra environment on top of a clean, test-friendly base.
pub struct Launch {
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// A command keycast is run under (e.g. `unshare … sh -c 'hostname …; exec "$0" "$@"'`).
    pub wrapper: Vec<String>,
    /// The PostgreSQL test database (`Launch::on`, `Launch::postgres`), `None` on SQLite.
    pub database: Option<Arc<PgDatabase>>,
}

impl Launch {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            env: Vec::new(),
            args: vec!["serve".into()],
            wrapper: Vec::new(),
            database: None,
        }
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs keycast as a container would: PID 1 in its own PID namespace, under the host name
    /// `host` in its own UTS namespace (needs root, as CI has). Signals go to keycast itself.
    pub fn in_namespaces(mut self, host: &str) -> Self {
        self.wrapper = [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--uts",
            "--kill-child",
            "sh",
            "-c",
            &format!("hostname {host} && exec \"$0\" \"$@\""),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self
    }

    /// Runs keycast with `hosts` as its `/etc/hosts`, bind-mounted in a mount namespace of
    /// its own: the test decides what names resolve to (glibc reads the file on every
    /// lookup) without touching the machine's files. Needs root or unprivileged user
    /// namespaces; CI runs as root.
    pub fn with_hosts(mut self, hosts: &Path) -> Self {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut wrapper = vec!["unshare".to_owned()];
        if !root {
            wrapper.extend(["--user".to_owned(), "--map-root-user".to_owned()]);
        }
        wrapper.extend([
            "--mount".to_owned(),
            "sh".to_owned(),
            "-c".to_owned(),
            format!("mount --bind '{}' /etc/hosts && exec \"$0\" \"$@\"", hosts.display()),
        ]);
        self.wrapper = wrapper;
        self
    }

    /// Replicates to `replica` (a directory) under a fixed master key: what a redeploy
    /// drill needs, since the instance after the wipe must decrypt the restored keys.
    pub fn redeployable(self, replica: &Path) -> Self {
        self.env("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display()))
            .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
    }

    /// Spawns the binary without waiting for anything.
    pub fn spawn(&self) -> Child {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(env!("CARGO_BIN_EXE_keycast"));
                cmd
            }
            None => Command::new(env!("CARGO_BIN_EXE_keycast")),
        };
        cmd.args(&self.args);
        // Keep the developer's own keycast settings out of the test.
        for (name, _) in std::env::vars() {
            if name.starts_with("KEYCAST_") || name == "PORT" || name == "DATABASE_URL" {
                cmd.env_remove(name);
            }
        }
        cmd.env("PORT", "0")
            .env("KEYCAST_BIND", "127.0.0.1")
            .env("KEYCAST_DATA_DIR", &self.data_dir)
            .env("KEYCAST_LOG", "info")
            // Tests run side by side: the embedded relay takes a free port.
            .env("KEYCAST_EMBEDDED_RELAY_ADDR", "127.0.0.1:0")
            // Test relays live on loopback; production refuses such nostrconnect:// relays.
            .env("KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS", "true")
            // The development outbox is how the harness confirms the emails it registers
            // (`flow::register`); a test may turn the routes off again with `.env(…)`.
            .env("KEYCAST_TEST_ROUTES", "true")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().expect("cannot start the keycast binary")
    }

    /// Spawns keycast and reads its address, without waiting for start-up to finish (it may
    /// be waiting for a lease or restoring).
    pub fn spawn_started_later(&self) -> Starting {
        let mut child = self.spawn();
        let stderr = collect(child.stderr.take().unwrap());
        let (base, stdout) = read_listen_address(&mut child, &stderr);
        Starting {
            server: Keycast {
                child,
                base,
                data_dir: self.data_dir.clone(),
                stderr,
                stdout,
                database: self.database.clone(),
            },
        }
    }

    /// Starts keycast and waits until `/healthz/startup` answers 200.
    pub fn start(&self) -> Keycast {
        let mut child = self.spawn();
        let stderr = collect(child.stderr.take().unwrap());
        let (base, stdout) = read_listen_address(&mut child, &stderr);
        let server = Keycast {
            child,
            base,
            data_dir: self.data_dir.clone(),
            stderr,
            stdout,
            database: self.database.clone(),
        };
        server.wait_for_status("/healthz/startup", 200, START_TIMEOUT);
        server
    }
}

impl Launch {
    /// Starts keycast and waits until either `/healthz/startup` answers 200 (`Ok`) or the
    /// process exits on its own (`Err`, with what it printed): for start-ups that may
    /// legitimately be refused.
    pub fn start_or_exit(&self) -> Result<Keycast, Finished> {
        let mut child = self.spawn();
        let (stderr, stderr_reader) = collect_joinable(child.stderr.take().unwrap());
        let (stdout, stdout_reader) = collect_joinable(child.stdout.take().unwrap());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let printed = stdout.lock().unwrap().clone();
            let base = printed
                .lines()
                .find_map(|l| l.strip_prefix("keycast listening on "))
                .map(|b| b.trim().to_owned());
            if let Some(base) = &base {
                if request(&format!("{base}/healthz/startup")).0 == 200 {
                    return Ok(Keycast {
                        child,
                        base: base.clone(),
                        data_dir: self.data_dir.clone(),
                        stderr,
                        stdout,
                        database: self.database.clone(),
                    });
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                // The pipes close with the process: read them to the end.
                let _ = stderr_reader.join();
                let _ = stdout_reader.join();
                return Err(Finished {
                    status,
                    stdout: stdout.lock().unwrap().clone(),
                    stderr: stderr.lock().unwrap().clone(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "keycast neither started nor exited within {START_TIMEOUT:?}; log:\n{}",
                    stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A keycast process that printed its address but may not have finished starting.
pub struct Starting {
    server: Keycast,
}

impl Starting {
    /// The status `path` answers now (0 when unreachable).
    pub fn status(&self, path: &str) -> u16 {
        self.server.get(path).0
    }

    /// Waits for `/healthz/startup` to answer 200.
    pub fn wait_started(&mut self, timeout: Duration) {
        self.server.wait_for_status("/healthz/startup", 200, timeout);
    }

    /// The running server.
    pub fn into_keycast(self) -> Keycast {
        self.server
    }
}

impl Keycast {
    /// Starts keycast with defaults on `data_dir`.
    pub fn start(data_dir: &Path) -> Keycast {
        Launch::new(data_dir).start()
    }

    /// GET `path`, returning status and body text.
    pub fn get(&self, path: &str) -> (u16, String) {
        request(&format!("{}{path}", self.base))
    }

    /// GET `path` and parse JSON.
    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path);
        (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    /// Polls `path` until it answers `status`, failing the test after `timeout` — or at once
    /// when the process has exited (a refused start-up says why in its log).
    pub fn wait_for_status(&self, path: &str, status: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.get(path).0 == status {
                return;
            }
            assert!(
                !self.has_exited(),
                "keycast exited before {path} answered {status}; log:\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "{path} never answered {status}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process has exited (a zombie not yet reaped: this handle reaps it).
    pub fn has_exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map(|stat| {
                // The state follows the parenthesised command name, which may hold spaces.
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    /// Waits until the log contains `needle` (it is read from a pipe and may trail the
    /// answers the process already gave), failing the test after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the log never said {needle:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many requests have been held at `fail_point` so far (each logs `held at fail point
    /// <name>`: see `keycast_core::held_at_fail_point`). Read before starting the request to
    /// hold, then [`Keycast::wait_until_held`] with one more.
    pub fn held_count(&self, fail_point: &str) -> usize {
        self.log().matches(&format!("held at fail point {fail_point} ")).count()
    }

    /// Waits until `count` requests have been held at `fail_point`: the race a test sets up
    /// begins once the request is held, however long getting there took on a loaded machine.
    pub fn wait_until_held(&self, fail_point: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.held_count(fail_point) < count {
            assert!(
                Instant::now() < deadline,
                "no request was held at fail point {fail_point} within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (`libc::SIGTERM`, `SIGKILL`, `SIGSTOP`, …).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < timeout,
                "keycast did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for a clean exit (status 0) within Cloud Run's 10 s.
    pub fn stop(self) -> String {
        // Read to the end: the last lines (the clean stop's TXID) may still be on their way
        // from the pipe when the process has exited.
        self.stop_with_output().1
    }

    /// SIGTERM and a clean exit, like [`Keycast::stop`]; returns what the process printed
    /// on (stdout, stderr), both read to their end.
    pub fn stop_with_output(mut self) -> (String, String) {
        self.signal(libc::SIGTERM);
        let (status, _) = self.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "keycast exited with {status}; log:\n{}", self.log());
        // The pipes reach end of file at exit, and each reader thread drops its handle on
        // the buffer when it has appended the last bytes: wait for that (at most 5 s).
        let deadline = Instant::now() + Duration::from_secs(5);
        while (Arc::strong_count(&self.stdout) > 1 || Arc::strong_count(&self.stderr) > 1) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        (self.stdout.lock().unwrap().clone(), self.log())
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Keycast {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// One GET with no error mapping: 4xx/5xx come back as statuses, connection errors as 0.
pub fn request(url: &str) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    match agent.get(url).call() {
        Ok(mut response) => {
            let status = response.status().as_u16();
            (status, response.body_mut().read_to_string().unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Reads stdout until the "listening on" line and returns the base URL, and everything
/// stdout prints (then and later).
fn read_listen_address(child: &mut Child, stderr: &Arc<Mutex<String>>) -> (String, Arc<Mutex<String>>) {
    let stdout = child.stdout.take().unwrap();
    let printed = Arc::new(Mutex::new(String::new()));
    let sink = printed.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(base) = line.strip_prefix("keycast listening on ") {
                let _ = tx.send(base.trim().to_owned());
            }
            let mut sink = sink.lock().unwrap();
            sink.push_str(&line);
            sink.push('\n');
        }
    });
    let base = rx
        .recv_timeout(START_TIMEOUT)
        .unwrap_or_else(|_| panic!("keycast never printed its address; log:\n{}", stderr.lock().unwrap()));
    (base, printed)
}

/// Collects a pipe into a shared string on a background thread.
fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    collect_joinable(pipe).0
}

/// [`collect`], also returning the reader thread, which ends at the pipe's end of file.
fn collect_joinable(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (out, reader)
}

/// Waits (at most 10 s) for pipe readers to reach end of file, which they do as soon as
/// the process that wrote to them has exited, unless something it started holds them.
fn drain(readers: &[&std::thread::JoinHandle<()>]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !readers.iter().all(|r| r.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// Replication helpers: POST, peers, the CLI, object stores, sqlite3 and metrics.
// ---------------------------------------------------------------------------------------

/// One POST with an empty body and no error mapping: 4xx/5xx come back as statuses,
/// connection errors as 0.
pub fn post(url: &str) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    match agent.post(url).send_empty() {
        Ok(mut response) => {
            let status = response.status().as_u16();
            (status, response.body_mut().read_to_string().unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

impl Keycast {
    /// POST `path`, returning status and body text.
    pub fn post(&self, path: &str) -> (u16, String) {
        post(&format!("{}{path}", self.base))
    }

    /// Inserts the test row `test:<key>` through `/api/test/write` (needs
    /// `KEYCAST_TEST_ROUTES=true`) and fails the test unless it answers 200.
    pub fn write(&self, key: &str, durable: bool) {
        let (status, body) = self.post(&format!("/api/test/write?key={key}&durable={durable}"));
        assert_eq!(
            status,
            200,
            "writing {key} (durable={durable}) failed: {body}; log:\n{}",
            self.log()
        );
    }

    /// The process id of keycast itself, to watch or signal it from outside (under a
    /// namespace wrapper, the wrapper's child).
    pub fn pid(&self) -> u32 {
        let wrapper = self.child.id();
        let comm = std::fs::read_to_string(format!("/proc/{wrapper}/comm")).unwrap_or_default();
        if comm.trim() != "unshare" {
            return wrapper;
        }
        let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .unwrap_or(wrapper)
    }
}

/// Requires a peer's environment variable: fails under scripts/test.sh (which sets
/// `KEYCAST_REQUIRE_PEERS=1` and provides the peer), skips loudly elsewhere.
pub fn peer(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("KEYCAST_REQUIRE_PEERS").as_deref() == Ok("1") => {
            panic!("{var} is not set: run the suite through scripts/test.sh, which starts the peer")
        }
        _ => {
            eprintln!("SKIPPED: {var} is not set (run scripts/test.sh to start the peer)");
            None
        }
    }
}

/// What a finished command printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Fails the test unless the command exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed with {}:\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to its end with output captured, failing the test after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Finished {
    let output = cmd.output_within(timeout);
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `keycast <args>` (a CLI command such as `restore` or `replica ls`) with the
/// developer's keycast settings removed and `env` added, to its end.
pub fn keycast_cli(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycast"));
    cmd.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("KEYCAST_") || name == "PORT" || name == "DATABASE_URL" {
            cmd.env_remove(name);
        }
    }
    cmd.env("KEYCAST_LOG", "info").envs(env.iter().copied());
    run_with_timeout(cmd, Duration::from_secs(120))
}

impl Launch {
    /// Starts keycast and waits for it to exit on its own (a start-up it must refuse),
    /// failing the test if it is still running after `timeout`.
    pub fn run_to_exit(&self, timeout: Duration) -> Finished {
        let mut child = self.spawn();
        let (stdout, out_reader) = collect_joinable(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect_joinable(child.stderr.take().unwrap());
        let Some(status) = wait_within(&mut child, timeout) else {
            reap(&mut child);
            panic!(
                "keycast kept running for {timeout:?} (it should have refused to start); log:\n{}",
                stderr.lock().unwrap()
            );
        };
        drain(&[&out_reader, &err_reader]);
        let stdout = stdout.lock().unwrap().clone();
        let stderr = stderr.lock().unwrap().clone();
        Finished { status, stdout, stderr }
    }
}

/// The environment that points keycast (server or CLI) at an S3 replica on `endpoint`
/// with moto's credentials.
pub fn s3_env(endpoint: &str, bucket: &str, prefix: &str) -> Vec<(String, String)> {
    vec![
        ("KEYCAST_REPLICA_URL".into(), format!("s3://{bucket}/{prefix}")),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_ENDPOINT_URL".into(), endpoint.into()),
    ]
}

/// Creates a bucket with a fresh, unique name on the S3 server at `endpoint` (moto accepts
/// an unsigned `PUT /bucket`) and returns its name.
pub fn new_bucket(endpoint: &str, hint: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let bucket = format!("{hint}-{}-{n}-{nanos}", std::process::id())
        .to_lowercase()
        .replace('_', "-");
    let bucket: String = bucket.chars().take(63).collect();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let response = agent
        .put(&format!("{}/{bucket}", endpoint.trim_end_matches('/')))
        .send_empty()
        .unwrap_or_else(|e| panic!("cannot reach the S3 server at {endpoint}: {e}"));
    assert_eq!(
        response.status().as_u16(),
        200,
        "creating bucket {bucket} on {endpoint} failed"
    );
    bucket
}

/// Runs `sqlite3 -readonly <db> <sql>` and returns its trimmed output, failing the test if
/// sqlite3 fails.
pub fn sqlite_query(db: &Path, sql: &str) -> String {
    let mut cmd = Command::new("sqlite3");
    cmd.arg("-readonly").arg(db).arg(sql);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    out.assert_success(&format!("sqlite3 {} {sql:?}", db.display()));
    out.stdout.trim().to_owned()
}

/// Runs `sqlite3 <db> <sql>` read-write (for preparing databases that are not keycast's).
/// It waits up to 10 s for SQLite's locks, as an application would: Litestream replicating
/// the same database holds the write lock while it syncs and checkpoints, and a writer
/// without a busy timeout fails at once with "database is locked".
pub fn sqlite_exec(db: &Path, sql: &str) -> String {
    let mut cmd = Command::new("sqlite3");
    cmd.arg("-cmd").arg(".timeout 10000").arg(db).arg(sql);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    out.assert_success(&format!("sqlite3 {} {sql:?}", db.display()));
    out.stdout.trim().to_owned()
}

/// The test keys (`test:<key>` rows of `keycast_meta`, without the prefix) in a keycast
/// database, sorted.
pub fn test_keys(db: &Path) -> Vec<String> {
    let out = sqlite_query(
        db,
        "SELECT substr(key, 6) FROM keycast_meta WHERE key LIKE 'test:%' ORDER BY key",
    );
    out.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// `PRAGMA integrity_check` of a database file, as sqlite3 prints it (`ok` when sound).
pub fn integrity_check(db: &Path) -> String {
    sqlite_query(db, "PRAGMA integrity_check")
}

/// The sum of every sample of the Prometheus metric `name` (all label sets) in `text`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // Exactly this metric: a label set or a space follows, not `_bucket` etc.
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            rest.rsplit(' ').next()?.trim().parse::<f64>().ok()
        })
        .sum()
}

/// What [`history_with_compaction`] wrote.
pub struct History {
    /// A moment after the first batch was acknowledged and before the second was written.
    pub between: chrono::DateTime<chrono::Utc>,
    /// Keys written before `between`, sorted.
    pub before: Vec<String>,
    /// Every key written, sorted.
    pub all: Vec<String>,
}

/// Runs keycast on `data` with the replica settings `env`, L1 compaction every second and
/// no level-0 retention, and writes two batches of durable rows a second and a half apart,
/// noting a moment between them. Returns once level 1 covers everything and the first
/// batch's level-0 files are pruned (so a restore to `between` must use compacted files),
/// with keycast stopped.
pub fn history_with_compaction(data: &Path, env: &[(String, String)]) -> History {
    let mut launch = Launch::new(data)
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_COMPACTION_LEVELS", "1")
        .env("KEYCAST_REPLICA_L0_RETENTION_SECS", "0");
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    let cli_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let files = || -> Vec<Value> {
        let out = keycast_cli(&["replica", "ls", "--json"], &cli_env);
        out.assert_success("keycast replica ls --json");
        let doc: Value = serde_json::from_str(out.stdout.trim()).unwrap();
        doc["files"].as_array().unwrap().clone()
    };
    let max_at = |files: &[Value], level: Option<u64>| {
        files
            .iter()
            .filter(|f| level.is_none_or(|l| f["level"].as_u64() == Some(l)))
            .map(|f| f["max_txid"].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    };
    let wait_until = |what: &str, done: &dyn Fn(&[Value]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = files();
            if done(&now) {
                return;
            }
            assert!(Instant::now() < deadline, "{what} never happened: {now:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let server = launch.start();
    // A compacted file that predates everything below, so the replica's history starts
    // before `between` in every tool's eyes.
    server.write("a0", true);
    let first = max_at(&files(), None);
    wait_until("the first compaction", &|f| max_at(f, Some(1)) >= first);
    for key in ["a1", "a2", "a3"] {
        server.write(key, true);
    }
    let txid_a = max_at(&files(), None);
    let between = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(1500));
    for key in ["b1", "b2"] {
        server.write(key, true);
    }
    let txid_b = max_at(&files(), None);
    wait_until(
        "compaction of the second batch and pruning of the first batch's level 0",
        &|f| {
            max_at(f, Some(1)) >= txid_b
                && !f
                    .iter()
                    .any(|x| x["level"].as_u64() == Some(0) && x["max_txid"].as_u64() == Some(txid_a))
        },
    );
    server.stop();
    History {
        between,
        before: vec!["a0".into(), "a1".into(), "a2".into(), "a3".into()],
        all: vec![
            "a0".into(),
            "a1".into(),
            "a2".into(),
            "a3".into(),
            "b1".into(),
            "b2".into(),
        ],
    }
}

// ---------------------------------------------------------------------------------------
// Child processes with a deadline: a peer or a keycast command that hangs fails its test
// (naming the command) instead of hanging the suite.
// ---------------------------------------------------------------------------------------

/// How long a one-shot command (a CLI call, sqlite3, cp, node -e) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// `Command::output` and `Command::status` with a deadline.
pub trait CommandExt {
    /// Runs to the end with stdout and stderr captured (stdin closed), like
    /// `Command::output`; kills the process and fails the test after `timeout`.
    fn output_within(&mut self, timeout: Duration) -> std::process::Output;
}

impl CommandExt for Command {
    fn output_within(&mut self, timeout: Duration) -> std::process::Output {
        self.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.spawn().unwrap_or_else(|e| panic!("cannot start {self:?}: {e}"));
        let (stdout, out_reader) = collect_joinable(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect_joinable(child.stderr.take().unwrap());
        let Some(status) = wait_within(&mut child, timeout) else {
            reap(&mut child);
            panic!(
                "{self:?} did not finish within {timeout:?}; stderr:\n{}",
                stderr.lock().unwrap()
            );
        };
        drain(&[&out_reader, &err_reader]);
        let take = |pipe: &Arc<Mutex<String>>| pipe.lock().unwrap().clone().into_bytes();
        std::process::Output {
            status,
            stdout: take(&stdout),
            stderr: take(&stderr),
        }
    }
}

/// Waits for `child` to exit, at most `timeout`; `None` if it is still running.
pub fn wait_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child") {
            return Some(status);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `child` and reaps it, waiting at most 10 s (a process stuck in the kernel is
/// reported and left behind rather than hanging the test).
pub fn reap(child: &mut Child) {
    let _ = child.kill();
    if wait_within(child, Duration::from_secs(10)).is_none() {
        eprintln!("process {} did not exit 10 s after SIGKILL; leaving it", child.id());
    }
}

/// Arms `server`'s fail point `name` with `actions` (the `fail` crate's syntax) through
/// `/api/test/failpoint`. `false`: this binary has no fault injection (built without the
/// `failpoints` feature), which fails the test under scripts/test.sh and skips it elsewhere.
pub fn arm_failpoint(server: &Keycast, name: &str, actions: &str) -> bool {
    let (status, body) = server.post(&format!("/api/test/failpoint?name={name}&actions={actions}"));
    if status == 404 && std::env::var("KEYCAST_REQUIRE_PEERS").as_deref() != Ok("1") {
        eprintln!("SKIPPED: {body}");
        return false;
    }
    assert_eq!(status, 200, "arming {name}: {body}");
    true
}

/// A loopback port free at the time of asking (for a peer the test starts itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
