//! Client-side encryption of the replica: objects are unreadable without the key, restore
//! works with it and fails clearly with a wrong or missing key, and Litestream (which cannot
//! read such a replica) fails rather than restoring garbage.

mod harness;

use harness::CommandExt as _;

use std::process::Command;

use harness::Launch;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const WRONG: &str = "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";

fn restore(replica: &str, out: &std::path::Path, key: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycast"));
    cmd.args(["restore", "--replica", replica, "-o"])
        .arg(out)
        .env_remove("KEYCAST_REPLICA_ENCRYPTION_KEY");
    if let Some(key) = key {
        cmd.env("KEYCAST_REPLICA_ENCRYPTION_KEY", key);
    }
    cmd.output_within(harness::COMMAND_TIMEOUT)
}

#[test]
fn an_encrypted_replica_round_trips_and_refuses_wrong_or_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_URL", &replica)
        .env("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY)
        .start();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let status = agent
        .post(format!(
            "{}/api/test/write?key=plaintext-marker-4711&durable=true",
            server.base
        ))
        .send_empty()
        .unwrap()
        .status();
    assert_eq!(status, 200);
    server.stop();

    // Nothing in the replica is readable: no LTX magic, no row content.
    for entry in walk(&replica_dir) {
        let bytes = std::fs::read(&entry).unwrap();
        if entry.extension().is_some_and(|e| e == "ltx") {
            assert!(!bytes.starts_with(b"LTX1"), "{} is not plaintext LTX", entry.display());
            assert!(
                !bytes.windows(20).any(|w| w == b"plaintext-marker-471".as_slice()),
                "{}",
                entry.display()
            );
        }
    }

    let out = dir.path().join("ok.db");
    let ok = restore(&replica, &out, Some(KEY));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let rows = Command::new("sqlite3")
        .arg(&out)
        .arg("SELECT key FROM keycast_meta WHERE key LIKE 'test:%'")
        .output_within(harness::COMMAND_TIMEOUT);
    assert_eq!(String::from_utf8_lossy(&rows.stdout), "test:plaintext-marker-4711\n");

    let wrong = restore(&replica, &dir.path().join("wrong.db"), Some(WRONG));
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("wrong KEYCAST_REPLICA_ENCRYPTION_KEY"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert!(!dir.path().join("wrong.db").exists());

    let missing = restore(&replica, &dir.path().join("missing.db"), None);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("is encrypted: set KEYCAST_REPLICA_ENCRYPTION_KEY"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    if let Some(litestream) = harness::peer("KEYCAST_TEST_LITESTREAM") {
        let out = dir.path().join("litestream.db");
        let result = Command::new(litestream)
            .env_remove("AWS_CA_BUNDLE")
            .args(["restore", "-o"])
            .arg(&out)
            .arg(&replica)
            .output_within(harness::COMMAND_TIMEOUT);
        assert!(
            !result.status.success(),
            "Litestream must not restore an encrypted replica"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
