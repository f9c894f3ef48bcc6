//! Helpers shared by unit tests: driving the real `sqlite3` CLI.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `script` through `sqlite3 x.db` with `dir` as the working directory
/// and returns its standard output. Panics (failing the test) if the CLI is
/// missing or reports an error, so tests never pass vacuously.
pub fn sqlite(dir: &Path, script: &str) -> String {
    let mut child = Command::new("sqlite3")
        .arg("-bail")
        .arg("x.db")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sqlite3 CLI must be installed to run these tests");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .expect("write script to sqlite3");
    let out = child.wait_with_output().expect("wait for sqlite3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "sqlite3 failed: {stderr}");
    String::from_utf8(out.stdout).expect("sqlite3 output is utf-8")
}
