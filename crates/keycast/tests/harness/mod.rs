//! The black-box harness: starts the real `keycast` binary on a free port with a temporary
//! data directory, talks HTTP to it, and stops it with signals — the way Cloud Run does.
//!
//! Every end-to-end test builds on [`Keycast`].

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

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
}

/// How to start keycast: extra environment on top of a clean, test-friendly base.
pub struct Launch {
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl Launch {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            env: Vec::new(),
            args: vec!["serve".into()],
        }
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Spawns the binary without waiting for anything.
    pub fn spawn(&self) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycast"));
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
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().expect("cannot start the keycast binary")
    }

    /// Starts keycast and waits until `/healthz/startup` answers 200.
    pub fn start(&self) -> Keycast {
        let mut child = self.spawn();
        let stderr = collect(child.stderr.take().unwrap());
        let base = read_listen_address(&mut child, &stderr);
        let server = Keycast {
            child,
            base,
            data_dir: self.data_dir.clone(),
            stderr,
        };
        server.wait_for_status("/healthz/startup", 200, START_TIMEOUT);
        server
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
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// Polls `path` until it answers `status`, failing the test after `timeout`.
    pub fn wait_for_status(&self, path: &str, status: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.get(path).0 == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never answered {status}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (`libc::SIGTERM`, `SIGKILL`, `SIGSTOP`, …).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
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
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let (status, _) = self.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "keycast exited with {status}; log:\n{}",
            self.log()
        );
        self.log()
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Keycast {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
            (
                status,
                response.body_mut().read_to_string().unwrap_or_default(),
            )
        }
        Err(_) => (0, String::new()),
    }
}

/// Reads stdout until the "listening on" line and returns the base URL.
fn read_listen_address(child: &mut Child, stderr: &Arc<Mutex<String>>) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(base) = line.strip_prefix("keycast listening on ") {
                let _ = tx.send(base.trim().to_owned());
            }
        }
    });
    rx.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
        panic!(
            "keycast never printed its address; log:\n{}",
            stderr.lock().unwrap()
        )
    })
}

/// Collects a pipe into a shared string on a background thread.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}
