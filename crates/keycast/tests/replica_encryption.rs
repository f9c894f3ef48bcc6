//! Client-side encryption of the replica: objects are unreadable without the key, restore
//! works with it and fails clearly with a wrong or missing key, and Litestream (which cannot
//! read such a replica) fails rather than restoring garbage.

mod harness;

use harness::CommandExt as _;

use std::process::Command;

use harness::Launch;

const KEY: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
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

/// Every LTX file of a directory replica with its bytes, to prove nothing was rewritten.
fn ltx_files(replica: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = walk(&replica.join("ltx"))
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

/// `keycast serve` against an encrypted replica without the key, or with another one: on
/// an empty disk (a redeploy) and on the disk that wrote the replica (a restart). Each
/// refuses to start with an error naming the variable (never echoing a key), leaves no
/// database behind on the empty disk, and leaves every replica file as it was.
#[test]
fn serve_without_or_with_the_wrong_key_refuses_naming_the_variable_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let data = dir.path().join("data");
    let launch = |data: &std::path::Path, key: Option<&str>| {
        let launch = Launch::new(data)
            .env("KEYCAST_TEST_ROUTES", "true")
            .env("KEYCAST_REPLICA_URL", &replica)
            .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY);
        match key {
            Some(key) => launch.env("KEYCAST_REPLICA_ENCRYPTION_KEY", key),
            None => launch,
        }
    };
    let server = launch(&data, Some(KEY)).start();
    server.write("kept", true);
    server.stop();
    let before = ltx_files(&replica_dir);
    assert!(!before.is_empty());

    for (disk, how, key) in [
        ("empty", "missing", None),
        ("empty", "wrong", Some(WRONG)),
        ("same", "missing", None),
        ("same", "wrong", Some(WRONG)),
    ] {
        let data_dir = match disk {
            "empty" => dir.path().join(format!("data-{how}")),
            _ => data.clone(),
        };
        let case = format!("{how} key, {disk} disk");
        eprintln!("case: {case}");
        let refused = launch(&data_dir, key).run_to_exit(harness::START_TIMEOUT);
        assert!(
            !refused.status.success(),
            "{case}: keycast must not start:\n{}",
            refused.stderr
        );
        assert!(
            refused.stderr.contains("KEYCAST_REPLICA_ENCRYPTION_KEY"),
            "{case}: the error names the variable:\n{}",
            refused.stderr
        );
        assert!(
            !refused.stderr.contains(WRONG) && !refused.stderr.contains(KEY),
            "{case}: no key is echoed"
        );
        if disk == "empty" {
            assert!(
                !data_dir.join("keycast.db").exists(),
                "{case}: no database is left for the next start"
            );
        }
        assert!(ltx_files(&replica_dir) == before, "{case}: the replica was changed");
    }
    // And with the right key everything is still there.
    let server = launch(&dir.path().join("data-right"), Some(KEY)).start();
    assert_eq!(harness::test_keys(&server.data_dir.join("keycast.db")), ["kept"]);
    server.stop();
}

/// A key set on a restart over a replica written without one would mix encrypted and
/// plaintext objects (no restore reads both): refused, naming the variable.
#[test]
fn serve_with_a_key_over_a_plaintext_replica_refuses_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let data = dir.path().join("data");
    let launch = || {
        Launch::new(&data)
            .env("KEYCAST_TEST_ROUTES", "true")
            .env("KEYCAST_REPLICA_URL", &replica)
    };
    let server = launch().start();
    server.write("plain", true);
    server.stop();
    let before = ltx_files(&replica_dir);
    let refused = launch()
        .env("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY)
        .run_to_exit(harness::START_TIMEOUT);
    assert!(!refused.status.success(), "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("is not encrypted but KEYCAST_REPLICA_ENCRYPTION_KEY is set"),
        "{}",
        refused.stderr
    );
    assert!(ltx_files(&replica_dir) == before, "the replica was changed");
}

/// Signed `GET <endpoint>/<bucket><path>` through curl (moto refuses anonymous reads),
/// independent of keycast's S3 client.
fn s3_get(endpoint: &str, bucket: &str, path: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args([
            "-fsS",
            "--max-time",
            "60",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            "test:test",
        ])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg(format!("{endpoint}/{bucket}{path}"))
        .output_within(harness::COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An encrypted replica on S3 (moto), end to end: every object in the bucket is sealed and
/// holds no row content, a redeploy on an empty disk restores from it with the key, and
/// `keycast restore` needs the key.
#[test]
fn an_encrypted_s3_replica_survives_a_redeploy_and_holds_nothing_readable() {
    let Some(endpoint) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&endpoint, "encrypted");
    let mut env = harness::s3_env(&endpoint, &bucket, "keycast");
    env.push(("KEYCAST_MASTER_KEY".into(), harness::TEST_MASTER_KEY.into()));
    env.push(("KEYCAST_REPLICA_ENCRYPTION_KEY".into(), KEY.into()));
    let dir = tempfile::tempdir().unwrap();
    let launch = |data: &std::path::Path| {
        env.iter()
            .fold(Launch::new(data).env("KEYCAST_TEST_ROUTES", "true"), |l, (k, v)| {
                l.env(k, v)
            })
    };
    let server = launch(&dir.path().join("first")).start();
    server.write("secret-row-first", true);
    server.stop();

    let listing = String::from_utf8(s3_get(&endpoint, &bucket, "?list-type=2")).unwrap();
    let keys: Vec<&str> = listing
        .split("<Key>")
        .skip(1)
        .map(|rest| rest.split("</Key>").next().unwrap())
        .collect();
    let ltx: Vec<&&str> = keys.iter().filter(|k| k.ends_with(".ltx")).collect();
    assert!(!ltx.is_empty(), "the replica has LTX objects: {keys:?}");
    for key in &ltx {
        let bytes = s3_get(&endpoint, &bucket, &format!("/{key}"));
        assert!(bytes.starts_with(b"KCENC1"), "{key} is sealed");
        assert!(
            !bytes.windows(10).any(|w| w == b"secret-row"),
            "{key} holds row content in the clear"
        );
    }

    // A redeploy: a new instance on an empty disk restores from the encrypted replica.
    let server = launch(&dir.path().join("second")).start();
    assert!(
        server.log().contains("restored the database from the replica"),
        "{}",
        server.log()
    );
    assert_eq!(
        harness::test_keys(&server.data_dir.join("keycast.db")),
        ["secret-row-first"]
    );
    server.write("secret-row-second", true);
    server.stop();

    let cli_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = dir.path().join("restored.db");
    harness::keycast_cli(&["restore", "-o", out.to_str().unwrap()], &cli_env).assert_success("keycast restore");
    assert_eq!(harness::test_keys(&out), ["secret-row-first", "secret-row-second"]);
    let without: Vec<(&str, &str)> = cli_env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "KEYCAST_REPLICA_ENCRYPTION_KEY")
        .collect();
    let refused = harness::keycast_cli(
        &["restore", "-o", dir.path().join("no-key.db").to_str().unwrap()],
        &without,
    );
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("set KEYCAST_REPLICA_ENCRYPTION_KEY"),
        "{}",
        refused.stderr
    );
}

/// The master key given as a file (`MASTER_KEY_PATH`, as a mounted secret is) and the same
/// key as the replica's: the configuration compared only the variables' texts, and keycast
/// served — whoever was given the replica's key to restore it opened every stored Nostr key
/// in it. Now refused once the file is read, naming both.
#[test]
fn a_master_key_file_that_is_also_the_replica_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let finished = Launch::new(&dir.path().join("data"))
        .env(
            "KEYCAST_REPLICA_URL",
            &format!("file://{}", dir.path().join("replica").display()),
        )
        .env("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY)
        .env("MASTER_KEY_PATH", key_file.to_str().unwrap())
        .run_to_exit(harness::COMMAND_TIMEOUT);
    assert!(!finished.status.success(), "{}", finished.stdout);
    assert!(
        finished
            .stderr
            .contains("KEYCAST_REPLICA_ENCRYPTION_KEY is the master key from MASTER_KEY_PATH"),
        "{}",
        finished.stderr
    );
    assert!(!finished.stderr.contains(&KEY[..12]), "the key is never printed");
    assert!(
        !dir.path().join("replica").join("keycast").exists(),
        "refused before the lease was taken (a serving instance would have handed over)"
    );
    // Another key in the file: served.
    std::fs::write(&key_file, format!("{WRONG}\n")).unwrap();
    Launch::new(&dir.path().join("data"))
        .env(
            "KEYCAST_REPLICA_URL",
            &format!("file://{}", dir.path().join("replica").display()),
        )
        .env("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY)
        .env("MASTER_KEY_PATH", key_file.to_str().unwrap())
        .start()
        .stop();
}
