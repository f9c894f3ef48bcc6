//! `keycast master-key rotate` and the background rotation of `keycast serve`, against the
//! real binary: an interrupted rotation resumes and completes; afterwards a restore from the
//! replica works with the new key alone, holds none of the old ciphertexts, and the old key
//! alone opens nothing; no key or secret reaches the logs.

mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::api::*;
use harness::flow::{approve, authorize_query, pkce, register, token_request};
use harness::{keycast_cli, sqlite_query, Keycast, Launch, TEST_MASTER_KEY};
use nostr::nips::nip19::ToBech32;
use nostr::Keys;
use serde_json::{json, Value};

/// The old master key is the harness's fixed key; this is the new one.
const NEW_MASTER_KEY: &str = "HyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4=";

/// A user with their own key and one authorization: (nsec, pubkey hex, access token).
fn user_with_grant(server: &Keycast, email: &str) -> (String, String, String) {
    let keys = Keys::generate();
    let nsec = keys.secret_key().to_bech32().unwrap();
    let (cookie, _) = register(server, email, Some(&nsec));
    let (challenge, verifier) = pkce();
    let code = approve(server, &cookie, &authorize_query("policy:social", &challenge));
    let r = token_request(server, &code, &verifier, REDIRECT);
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.json()["access_token"].as_str().unwrap().to_owned();
    (nsec, keys.public_key().to_hex(), token)
}

/// Signs a note over HTTP with `token` and checks it is `pubkey`'s.
fn signs_as(server: &Keycast, token: &str, pubkey: &str) {
    let signed = rpc(
        server,
        token,
        "sign_event",
        json!([{ "kind": 1, "content": "after rotation" }]),
    );
    assert_eq!(signed.status, 200, "{}", signed.body);
    assert_eq!(signed.json()["result"]["pubkey"], pubkey, "{}", signed.body);
}

/// Every ciphertext under the master key in the database file, hex.
fn ciphertexts(db: &Path) -> Vec<String> {
    sqlite_query(
        db,
        "SELECT hex(encrypted_secret) FROM keys UNION ALL SELECT hex(bunker_secret_encrypted) FROM authorizations",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The replica's level of snapshots (as Litestream lays them out).
const SNAPSHOT_LEVEL: u64 = 9;

/// The objects in the replica at `url`, as `keycast replica ls --json` lists them.
fn replica_files(url: &str) -> Vec<Value> {
    let out = keycast_cli(&["replica", "ls", "--json", "--replica", url], &[]);
    out.assert_success("keycast replica ls");
    let doc: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    doc["files"].as_array().unwrap().clone()
}

/// Whether `bytes` holds `needle` anywhere.
fn holds(bytes: &[u8], needle: &[u8]) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that the database file at `db` (checkpointed first) holds none of `old`.
fn no_old_ciphertext_in(db: &Path, old: &[String]) {
    harness::sqlite_exec(db, "PRAGMA wal_checkpoint(TRUNCATE)");
    let bytes = std::fs::read(db).unwrap();
    let survivors = old.iter().filter(|c| holds(&bytes, &hex::decode(c).unwrap())).count();
    assert_eq!(
        survivors,
        0,
        "old ciphertexts survived the rotation in {}",
        db.display()
    );
}

/// Asserts that nothing secret appears in `text`: neither master key, no user's nsec or
/// hex secret.
fn no_secret_in(text: &str, secrets: &[String]) {
    for secret in [TEST_MASTER_KEY, NEW_MASTER_KEY]
        .iter()
        .map(|s| s.to_string())
        .chain(secrets.iter().cloned())
    {
        assert!(!text.contains(&secret), "a secret reached the output:\n{text}");
    }
}

fn secrets_of(users: &[(String, String, String)]) -> Vec<String> {
    users
        .iter()
        .flat_map(|(nsec, _, token)| {
            let hex = Keys::parse(nsec).unwrap().secret_key().to_secret_hex();
            [nsec.clone(), hex, token.clone()]
        })
        .collect()
}

fn rotate(data: &Path, replica: &Path, extra: &[&str]) -> (bool, Value, String) {
    let url = format!("file://{}", replica.display());
    let data_dir = data.display().to_string();
    let mut args = vec!["master-key", "rotate", "--json"];
    args.extend_from_slice(extra);
    let out = keycast_cli(
        &args,
        &[
            ("KEYCAST_DATA_DIR", &data_dir),
            ("KEYCAST_REPLICA_URL", &url),
            ("KEYCAST_MASTER_KEY", NEW_MASTER_KEY),
            ("KEYCAST_MASTER_KEY_PREVIOUS", TEST_MASTER_KEY),
        ],
    );
    let report: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}\n{}", out.stdout, out.stderr));
    (out.status.success(), report, format!("{}{}", out.stdout, out.stderr))
}

/// Enough users that the rows rewritten by the rotation share pages with rows not yet
/// rewritten: freed space then outlives the update unless SQLite zeroes it.
const USERS: u64 = 12;

#[test]
fn interrupted_rotation_resumes_and_a_restore_opens_with_the_new_key_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, replica) = (tmp.path().join("data"), tmp.path().join("replica"));
    // Registered over two runs: the mail-confirmation rate limit is per process and client.
    let mut users = Vec::new();
    for batch in [0..USERS / 2, USERS / 2..USERS] {
        let server = Launch::new(&data).redeployable(&replica).start();
        users.extend(batch.map(|n| user_with_grant(&server, &format!("rot{n}@example.com"))));
        server.stop();
    }
    let old = ciphertexts(&data.join("keycast.db"));
    assert_eq!(old.len() as u64, 2 * USERS, "a user key and a bunker key per user");

    // Stopped after two keys, as an interruption would leave it: non-zero exit, progress kept.
    let (ok, first, log_first) = rotate(&data, &replica, &["--limit", "2"]);
    assert!(!ok, "an incomplete rotation must fail: {first}");
    // Dropping the old key before the rotation completes is refused at start, naming why.
    let early = Launch::new(&data)
        .env("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display()))
        .env("KEYCAST_MASTER_KEY", NEW_MASTER_KEY)
        .run_to_exit(Duration::from_secs(60));
    assert!(!early.status.success());
    assert!(
        early.stderr.contains(&format!(
            "{} stored keys were encrypted under another master key",
            2 * USERS - 2
        )) && early.stderr.contains("KEYCAST_MASTER_KEY_PREVIOUS"),
        "{}",
        early.stderr
    );
    assert_eq!(
        (first["reencrypted"].as_u64(), first["remaining"].as_u64()),
        (Some(2), Some(2 * USERS - 2)),
        "{first}"
    );
    assert_eq!(first["complete"], false);
    // The re-run continues where it stopped and verifies everything under the new key.
    let (ok, second, log_second) = rotate(&data, &replica, &[]);
    assert!(ok, "{second}\n{log_second}");
    assert_eq!(
        (
            second["reencrypted"].as_u64(),
            second["already_current"].as_u64(),
            second["verified"].as_u64()
        ),
        (Some(2 * USERS - 2), Some(2), Some(2 * USERS)),
        "{second}"
    );
    assert_eq!(second["remaining"], 0);
    let secrets = secrets_of(&users);
    no_secret_in(&log_first, &secrets);
    no_secret_in(&log_second, &secrets);
    // The rewritten database file keeps no old ciphertext, not even in free space: the
    // replica's next snapshot is taken from it.
    no_old_ciphertext_in(&data.join("keycast.db"), &old);

    let url = format!("file://{}", replica.display());
    let rotated_at = replica_files(&url)
        .iter()
        .map(|f| f["max_txid"].as_u64().unwrap())
        .max()
        .unwrap();

    // A redeploy on an empty disk restores from the replica and opens with the new key alone.
    // It snapshots every second and keeps snapshots a second, so the objects from before the
    // rotation pass retention while the test watches.
    std::fs::remove_dir_all(&data).unwrap();
    let server = Launch::new(&data)
        .env("KEYCAST_REPLICA_URL", &url)
        .env("KEYCAST_MASTER_KEY", NEW_MASTER_KEY)
        .env("KEYCAST_REPLICA_COMPACTION_LEVELS", "1")
        .env("KEYCAST_REPLICA_SNAPSHOT_INTERVAL_SECS", "1")
        .env("KEYCAST_REPLICA_SNAPSHOT_RETENTION_SECS", "1")
        .env("KEYCAST_REPLICA_L0_RETENTION_SECS", "0")
        .start();
    for (_, pubkey, token) in &users {
        signs_as(&server, token, pubkey);
    }
    // Compaction and retention run when something new was shipped: keep writing until every
    // object left is a snapshot taken after the rotation or holds only later transactions.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut writes = 0;
    loop {
        let files = replica_files(&url);
        let after_rotation = |f: &Value| {
            let (level, min, max) = (
                f["level"].as_u64().unwrap(),
                f["min_txid"].as_u64().unwrap(),
                f["max_txid"].as_u64().unwrap(),
            );
            if level == SNAPSHOT_LEVEL {
                max >= rotated_at
            } else {
                min > rotated_at
            }
        };
        let snapshots: Vec<u64> = files
            .iter()
            .filter(|f| f["level"].as_u64() == Some(SNAPSHOT_LEVEL))
            .map(|f| f["max_txid"].as_u64().unwrap())
            .collect();
        if !snapshots.is_empty() && files.iter().all(after_rotation) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "objects from before the rotation never passed retention: {files:?}"
        );
        server.write(&format!("w{writes}"), true);
        writes += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = server.stop();
    no_secret_in(&log, &secrets);
    // The oldest snapshot, listed once the server has stopped: with a second's retention, the
    // one listed while it ran may have gone before the restore below asked for it.
    let oldest_snapshot = replica_files(&url)
        .iter()
        .filter(|f| f["level"].as_u64() == Some(SNAPSHOT_LEVEL))
        .map(|f| f["max_txid"].as_u64().unwrap())
        .min()
        .expect("a snapshot is left");

    // Neither the oldest state the replica can still restore nor the latest holds any of the
    // old ciphertexts, not even in free space.
    for (name, txid) in [("oldest.db", Some(oldest_snapshot)), ("latest.db", None)] {
        let restored = tmp.path().join(name);
        let mut args = vec![
            "restore".to_owned(),
            "--replica".into(),
            url.clone(),
            "-o".into(),
            restored.display().to_string(),
        ];
        if let Some(txid) = txid {
            args.extend(["--txid".into(), txid.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keycast_cli(&args, &[]).assert_success("keycast restore");
        no_old_ciphertext_in(&restored, &old);
        assert_eq!(ciphertexts(&restored).len() as u64, 2 * USERS);
    }

    // The old key alone opens nothing: keycast refuses to start with it.
    let wiped = tmp.path().join("with-old-key");
    let refused = Launch::new(&wiped)
        .redeployable(&replica)
        .run_to_exit(Duration::from_secs(60));
    assert!(!refused.status.success());
    assert!(
        refused
            .stderr
            .contains("stored keys were encrypted under another master key"),
        "{}",
        refused.stderr
    );
}

#[test]
fn a_serving_instance_with_both_keys_rotates_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, replica) = (tmp.path().join("data"), tmp.path().join("replica"));
    let server = Launch::new(&data).redeployable(&replica).start();
    let users: Vec<_> = (0..2)
        .map(|n| user_with_grant(&server, &format!("bg{n}@example.com")))
        .collect();
    server.stop();

    let url = format!("file://{}", replica.display());
    let server = Launch::new(&data)
        .env("KEYCAST_REPLICA_URL", &url)
        .env("KEYCAST_MASTER_KEY", NEW_MASTER_KEY)
        .env("KEYCAST_MASTER_KEY_PREVIOUS", TEST_MASTER_KEY)
        .start();
    // Serving goes on during the rotation, whichever key a row is under.
    for (_, pubkey, token) in &users {
        signs_as(&server, token, pubkey);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.log().contains("master-key rotation complete") {
        assert!(
            Instant::now() < deadline,
            "the rotation never completed:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, metrics) = server.get("/metrics");
    assert_eq!(
        harness::metric_sum(&metrics, "keycast_master_key_rotation_remaining"),
        0.0,
        "{metrics}"
    );
    // A key made during the rotation is under the new key.
    let late = user_with_grant(&server, "late@example.com");
    let log = server.stop();
    no_secret_in(&log, &secrets_of(&users));

    let server = Launch::new(&data)
        .env("KEYCAST_REPLICA_URL", &url)
        .env("KEYCAST_MASTER_KEY", NEW_MASTER_KEY)
        .start();
    for (_, pubkey, token) in users.iter().chain([&late]) {
        signs_as(&server, token, pubkey);
    }
    server.stop();
}

#[test]
fn on_postgres_the_command_rotates_beside_a_serving_instance_and_resumes() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let database = harness::engine::PgDatabase::create("rotation");
    let launch = |dir: &str| Launch::new(&tmp.path().join(dir)).postgres(&database);
    let server = launch("a").env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY).start();
    let users: Vec<_> = (0..3)
        .map(|n| user_with_grant(&server, &format!("pg{n}@example.com")))
        .collect();
    server.stop();

    // An instance that reads both keys serves throughout; on PostgreSQL it does not rotate by
    // itself, the command does.
    let serving = launch("b")
        .env("KEYCAST_MASTER_KEY", NEW_MASTER_KEY)
        .env("KEYCAST_MASTER_KEY_PREVIOUS", TEST_MASTER_KEY)
        .start();
    let rotate = |extra: &[&str]| {
        let mut args = vec!["master-key", "rotate", "--json"];
        args.extend_from_slice(extra);
        let data_dir = tmp.path().join("job").display().to_string();
        let out = keycast_cli(
            &args,
            &[
                ("KEYCAST_DATA_DIR", data_dir.as_str()),
                ("DATABASE_URL", database.url.as_str()),
                ("KEYCAST_MASTER_KEY", NEW_MASTER_KEY),
                ("KEYCAST_MASTER_KEY_PREVIOUS", TEST_MASTER_KEY),
            ],
        );
        let report: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("no JSON report ({e}): {}\n{}", out.stdout, out.stderr));
        (out.status.success(), report, format!("{}{}", out.stdout, out.stderr))
    };
    // Each stored key's id and header (format and key id, not the ciphertext), for a failure
    // message: which rows are under which key.
    let headers = || {
        database.query(
            "SELECT 'key', id, encode(substr(encrypted_secret, 1, 9), 'hex') FROM keys UNION ALL \
             SELECT 'bunker', id, encode(substr(bunker_secret_encrypted, 1, 9), 'hex') FROM authorizations ORDER BY 1, 2",
        )
    };
    // The serving instance is the only member of the cluster: a command that joined it would
    // own bunkers it never answers, and every change would wait for its acknowledgement.
    let members = || database.query("SELECT count(*) FROM keycast_instances");
    assert_eq!(members().trim(), "1");
    let (ok, first, log_first) = rotate(&["--limit", "3"]);
    assert!(!ok, "{first}");
    assert_eq!(members().trim(), "1", "the command joined the instances and never left");
    assert_eq!(
        (first["reencrypted"].as_u64(), first["remaining"].as_u64()),
        (Some(3), Some(3)),
        "{first}\nstored keys:\n{}\n{log_first}",
        headers()
    );
    for (_, pubkey, token) in &users {
        signs_as(&serving, token, pubkey);
    }
    let (ok, second, log_second) = rotate(&[]);
    assert!(ok, "{second}\n{log_second}");
    assert_eq!(
        (second["reencrypted"].as_u64(), second["verified"].as_u64()),
        (Some(3), Some(6)),
        "{second}"
    );
    for (_, pubkey, token) in &users {
        signs_as(&serving, token, pubkey);
    }
    let log = serving.stop();
    let secrets = secrets_of(&users);
    for text in [&log, &log_first, &log_second] {
        no_secret_in(text, &secrets);
    }
    // Every stored key under the new master key (one header for all), before an instance
    // that reads only that key starts: a failure here names the rows and what wrote them.
    let stored = headers();
    let distinct: std::collections::BTreeSet<&str> = stored.lines().filter_map(|row| row.split('|').nth(2)).collect();
    assert_eq!(
        distinct.len(),
        1,
        "stored keys under more than one master key after the rotation:\n{stored}\n{second}\nserving instance:\n{log}"
    );

    let server = launch("c").env("KEYCAST_MASTER_KEY", NEW_MASTER_KEY).start();
    for (_, pubkey, token) in &users {
        signs_as(&server, token, pubkey);
    }
    server.stop();
    let refused = launch("d")
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
        .run_to_exit(Duration::from_secs(60));
    assert!(!refused.status.success());
    assert!(
        refused
            .stderr
            .contains("stored keys were encrypted under another master key"),
        "{}",
        refused.stderr
    );
}

/// On PostgreSQL the command runs beside serving instances. One that holds only the old key
/// (the first of the two deploys skipped) would fail every signature once the stored keys
/// were under the new key and its cache expired; one that has the new key only as its
/// previous key (the second skipped) would go on sealing new keys under the old one. Before,
/// the command rotated regardless; now it refuses, names the instance and the keys it
/// holds, and rewrites nothing, unless told `--force`.
#[test]
fn on_postgres_the_command_refuses_while_an_instance_does_not_write_under_the_new_key() {
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let database = harness::engine::PgDatabase::create("rotation_guard");
    let serving = Launch::new(&tmp.path().join("a"))
        .postgres(&database)
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
        .start();
    let (_, pubkey, token) = user_with_grant(&serving, "guard@example.com");
    let headers = || database.query("SELECT encode(substr(encrypted_secret, 1, 9), 'hex') FROM keys ORDER BY id");
    let before = headers();
    let rotate = |extra: &[&str]| {
        let mut args = vec!["master-key", "rotate", "--json"];
        args.extend_from_slice(extra);
        let data_dir = tmp.path().join("job").display().to_string();
        keycast_cli(
            &args,
            &[
                ("KEYCAST_DATA_DIR", data_dir.as_str()),
                ("DATABASE_URL", database.url.as_str()),
                ("KEYCAST_MASTER_KEY", NEW_MASTER_KEY),
                ("KEYCAST_MASTER_KEY_PREVIOUS", TEST_MASTER_KEY),
            ],
        )
    };
    let refused = rotate(&[]);
    assert!(!refused.status.success(), "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("rotation refused") && refused.stderr.contains("KEYCAST_MASTER_KEY_PREVIOUS"),
        "{}",
        refused.stderr
    );
    let instance = database.query("SELECT id FROM keycast_instances");
    assert!(
        refused.stderr.contains(instance.trim()),
        "names the instance: {}",
        refused.stderr
    );
    assert_eq!(headers(), before, "nothing was re-encrypted");
    signs_as(&serving, &token, &pubkey);
    serving.stop();

    // After the first deploy only (the new key as the previous one): it reads both keys, but
    // would go on sealing new keys under the old one. Refused too.
    let first_deploy = Launch::new(&tmp.path().join("b"))
        .postgres(&database)
        .env("KEYCAST_MASTER_KEY", TEST_MASTER_KEY)
        .env("KEYCAST_MASTER_KEY_PREVIOUS", NEW_MASTER_KEY)
        .start();
    let refused = rotate(&[]);
    assert!(!refused.status.success(), "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stderr.contains("as their"), "{}", refused.stderr);
    assert_eq!(headers(), before, "nothing was re-encrypted");
    signs_as(&first_deploy, &token, &pubkey);

    let forced = rotate(&["--force"]);
    assert!(forced.status.success(), "{}{}", forced.stdout, forced.stderr);
    assert_ne!(headers(), before, "--force rotates");
    first_deploy.stop();
}
