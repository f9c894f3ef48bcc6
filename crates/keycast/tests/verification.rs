//! Verification: the background check proves the replica restores to the live database,
//! `keycast replica verify` names a corrupted object, and a restore refuses a state whose
//! checksum differs from the one keycast recorded.

mod harness;

use harness::CommandExt as _;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::Launch;

fn keycast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keycast"))
        .args(args)
        .env_remove("KEYCAST_REPLICA_ENCRYPTION_KEY")
        .output_within(harness::COMMAND_TIMEOUT)
}

fn post(url: &str) -> u16 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    agent.post(url).send_empty().map(|r| r.status().as_u16()).unwrap_or(0)
}

fn ltx_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("ltx/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn background_verification_passes_and_records_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let data = dir.path().join("data");
    // What a verification killed outright two hours ago left (a copy of the database), and
    // what one still under way writes: the first goes, the second stays.
    let killed = data.join(".keycast-verify-Kd93xA");
    let busy = data.join(".keycast-verify-q7TbW2");
    for scratch in [&killed, &busy] {
        std::fs::create_dir_all(scratch).unwrap();
        std::fs::write(scratch.join("verify.db"), vec![0u8; 64 << 10]).unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for path in [killed.join("verify.db"), killed.clone()] {
        std::fs::File::open(&path).unwrap().set_modified(two_hours_ago).unwrap();
    }
    let server = Launch::new(&data)
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_URL", &replica)
        .env("KEYCAST_REPLICA_VERIFY_INTERVAL_SECS", "1")
        .start();
    for n in 0..20 {
        assert_eq!(
            post(&format!("{}/api/test/write?key=v{n}&durable=true", server.base)),
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = server.get("/metrics");
        if metrics.lines().any(|l| l == "keycast_replica_verification_ok 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no successful verification reported; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server
        .log()
        .contains("verified: the replica restores to exactly the live database"));
    assert!(!killed.exists(), "what a killed verification left is removed");
    assert!(busy.join("verify.db").exists(), "one still being written is left alone");
    let scratch: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".keycast-verify-"))
        .collect();
    assert_eq!(
        scratch,
        [".keycast-verify-q7TbW2"],
        "a verification removes its own copy when done"
    );
    // One more write so the record of the verification reaches the local state file.
    assert_eq!(
        post(&format!("{}/api/test/write?key=last&durable=true", server.base)),
        200
    );
    server.stop();
    let records = std::fs::read_dir(replica_dir.join("keycast/checksum")).unwrap().count();
    assert!(records >= 1, "a checksum record is kept in the replica");

    let status = Command::new(env!("CARGO_BIN_EXE_keycast"))
        .args(["replica", "status", "--json", "--replica", &replica])
        .env("KEYCAST_DATA_DIR", &data)
        .output_within(harness::COMMAND_TIMEOUT);
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(doc["verification"]["ok"], true, "{doc}");
}

#[test]
fn replica_verify_names_a_corrupted_object_and_restore_refuses_a_wrong_recorded_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_URL", &replica)
        .env("KEYCAST_REPLICA_VERIFY_INTERVAL_SECS", "1")
        .start();
    for n in 0..5 {
        assert_eq!(
            post(&format!("{}/api/test/write?key=c{n}&durable=true", server.base)),
            200
        );
    }
    // A background verification records the checksum this test tampers with.
    let checksums = replica_dir.join("keycast/checksum");
    let deadline = Instant::now() + Duration::from_secs(30);
    // (object_store stages a file as `<name>#<n>` before renaming it into place.)
    let records = || {
        std::fs::read_dir(&checksums).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().contains('#'))
                .count()
        })
    };
    while records() == 0 {
        assert!(
            Instant::now() < deadline,
            "no checksum record after 30 s; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop();

    let ok = keycast(&["replica", "verify", "--replica", &replica]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok:"));

    // A checksum record that disagrees with the data: restore of that TXID is refused.
    // Records sit under the database's lineage: keycast/checksum/<lineage>/<txid>.json.
    let first = |dir: &std::path::Path| std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path();
    let record = first(&first(&replica_dir.join("keycast/checksum")));
    let original = std::fs::read_to_string(&record).unwrap();
    let txid = u64::from_str_radix(record.file_stem().unwrap().to_str().unwrap(), 16).unwrap();
    let at = original.find("\"checksum\":\"").unwrap() + "\"checksum\":\"".len();
    let mut tampered = original.clone();
    let digit = if &original[at..at + 1] == "0" { "1" } else { "0" };
    tampered.replace_range(at..at + 1, digit);
    std::fs::write(&record, tampered).unwrap();
    let out = dir.path().join("at.db");
    let restored = keycast(&[
        "restore",
        "--replica",
        &replica,
        "--txid",
        &txid.to_string(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!restored.status.success());
    assert!(
        String::from_utf8_lossy(&restored.stderr).contains("keycast recorded"),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert!(!out.exists());
    std::fs::write(&record, original).unwrap();

    // Flip one byte in the middle of an LTX object.
    let victim = ltx_files(&replica_dir).pop().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let bad = keycast(&["replica", "verify", "--replica", &replica]);
    assert!(!bad.status.success(), "verify must fail on a corrupted object");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(victim.file_name().unwrap().to_str().unwrap()),
        "names the object: {stderr}"
    );
}
