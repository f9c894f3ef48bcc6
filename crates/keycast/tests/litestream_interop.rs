//! keycast and the stock Litestream 0.5.17 binary read each other's replicas, on a local
//! directory and on S3 (moto): keycast's promise that nobody is locked in.

mod harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{keycast_cli, metric_sum, peer, Finished, Launch};
use serde_json::Value;

/// The litestream binary the suite provides (`KEYCAST_TEST_LITESTREAM`).
fn litestream() -> Option<String> {
    peer("KEYCAST_TEST_LITESTREAM")
}

/// A litestream command. `AWS_CA_BUNDLE` breaks its every s3:// replica on this machine.
fn litestream_cmd(bin: &str, args: &[&str], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("AWS_CA_BUNDLE")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd
}

/// Runs `litestream <args>` to its end; fails the test unless it succeeds.
fn run_litestream(bin: &str, args: &[&str], env: &[(String, String)]) -> Finished {
    let finished = harness::run_with_timeout(litestream_cmd(bin, args, env), Duration::from_secs(120));
    finished.assert_success(&format!("litestream {}", args.join(" ")));
    finished
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn cli(args: &[&str], env: &[(String, String)]) -> Finished {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    keycast_cli(args, &env)
}

/// `keycast restore -o <out> [extra…]` with the replica settings `env`; must succeed.
fn keycast_restore(out: &Path, extra: &[&str], env: &[(String, String)]) {
    let mut args = vec!["restore", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    cli(&args, env).assert_success(&format!("keycast {}", args.join(" ")));
}

/// `keycast replica ls --json`: the replica's files.
fn replica_files(env: &[(String, String)]) -> Vec<Value> {
    let out = cli(&["replica", "ls", "--json"], env);
    out.assert_success("keycast replica ls --json");
    let doc: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("replica ls --json is not JSON ({e}): {}", out.stdout));
    doc["files"].as_array().expect("a files array").clone()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// keycast writes, litestream restores
// ---------------------------------------------------------------------------------------

/// How hard keycast works before it stops.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// A handful of writes.
    Light,
    /// Writes for a few seconds with a tiny checkpoint threshold (WAL restarts) and L1
    /// compaction every second, until both have happened.
    CheckpointsAndCompaction,
}

/// Starts keycast with `replica_env`, writes under `load`, stops it, and returns the keys
/// written.
fn keycast_writes(data: &Path, replica_env: &[(String, String)], load: Load) -> Vec<String> {
    let mut launch = Launch::new(data).env("KEYCAST_TEST_ROUTES", "true");
    for (k, v) in replica_env {
        launch = launch.env(k, v);
    }
    if load == Load::CheckpointsAndCompaction {
        launch = launch
            .env("KEYCAST_REPLICA_CHECKPOINT_PAGES", "8")
            .env("KEYCAST_REPLICA_COMPACTION_LEVELS", "1");
    }
    let server = launch.start();
    let mut written = Vec::new();
    let started = Instant::now();
    let mut n = 0u32;
    loop {
        n += 1;
        let key = format!("row{n:05}");
        server.write(&key, n.is_multiple_of(7));
        written.push(key);
        match load {
            Load::Light if n >= 12 => break,
            Load::Light => {}
            Load::CheckpointsAndCompaction => {
                if started.elapsed() < Duration::from_millis(2500) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let (_, metrics) = server.get("/metrics");
                let checkpoints = metric_sum(&metrics, "keycast_replica_checkpoints_total");
                let compactions = metric_sum(&metrics, "keycast_replica_compactions_total");
                if checkpoints >= 2.0 && compactions >= 2.0 {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no checkpoints ({checkpoints}) or compactions ({compactions}) after a minute of writes"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let log = server.stop();
    assert!(log.contains("replicated_txid"), "{log}");
    written
}

/// keycast replicates, then the stock `litestream restore` reads the replica at `ls_url`;
/// the result must be sound and hold every row, and agree with keycast's own restore at an
/// intermediate TXID too.
fn litestream_restores_keycast(
    bin: &str,
    dir: &Path,
    replica_env: &[(String, String)],
    ls_url: &str,
    ls_env: &[(String, String)],
    load: Load,
) {
    let written = keycast_writes(&dir.join("data"), replica_env, load);
    let files = replica_files(replica_env);
    if load == Load::CheckpointsAndCompaction {
        assert!(
            files.iter().any(|f| f["level"].as_u64() == Some(1)),
            "L1 compaction ran: {files:?}"
        );
    }

    let out = dir.join("litestream-restored.db");
    run_litestream(bin, &["restore", "-o", out.to_str().unwrap(), ls_url], ls_env);
    assert_eq!(harness::integrity_check(&out), "ok");
    assert_eq!(harness::test_keys(&out), sorted(written.clone()));

    // An intermediate TXID: litestream and keycast must restore the same state.
    let mut txids: Vec<u64> = files
        .iter()
        .filter(|f| f["level"].as_u64() == Some(0))
        .map(|f| f["max_txid"].as_u64().unwrap())
        .collect();
    txids.sort();
    txids.dedup();
    assert!(txids.len() >= 3, "several TXIDs were shipped: {txids:?}");
    let mid = txids[txids.len() / 2];
    let ls_mid = dir.join("litestream-mid.db");
    run_litestream(
        bin,
        &[
            "restore",
            "-txid",
            &format!("{mid:016x}"),
            "-o",
            ls_mid.to_str().unwrap(),
            ls_url,
        ],
        ls_env,
    );
    let kc_mid = dir.join("keycast-mid.db");
    keycast_restore(&kc_mid, &["--txid", &mid.to_string()], replica_env);
    let mid_keys = harness::test_keys(&ls_mid);
    assert_eq!(mid_keys, harness::test_keys(&kc_mid), "TXID {mid}");
    assert!(mid_keys.len() < written.len(), "TXID {mid} is an earlier state");
    assert_eq!(harness::integrity_check(&ls_mid), "ok");
}

#[test]
fn litestream_restores_a_directory_replica_keycast_wrote() {
    let Some(bin) = litestream() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let env = vec![("KEYCAST_REPLICA_URL".to_owned(), file_url(&replica))];
    litestream_restores_keycast(&bin, dir.path(), &env, &file_url(&replica), &[], Load::Light);
}

#[test]
fn litestream_restores_a_directory_replica_after_checkpoints_and_compaction() {
    let Some(bin) = litestream() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let env = vec![("KEYCAST_REPLICA_URL".to_owned(), file_url(&replica))];
    litestream_restores_keycast(
        &bin,
        dir.path(),
        &env,
        &file_url(&replica),
        &[],
        Load::CheckpointsAndCompaction,
    );
}

/// litestream's URL form of an S3 replica on moto.
fn litestream_s3_url(endpoint: &str, bucket: &str, prefix: &str) -> String {
    format!("s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1&forcePathStyle=true")
}

fn litestream_s3_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
    ]
}

#[test]
fn litestream_restores_an_s3_replica_keycast_wrote() {
    let Some(bin) = litestream() else { return };
    let Some(endpoint) = peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bucket = harness::new_bucket(&endpoint, "kc-to-ls");
    let env = harness::s3_env(&endpoint, &bucket, "keycast");
    litestream_restores_keycast(
        &bin,
        dir.path(),
        &env,
        &litestream_s3_url(&endpoint, &bucket, "keycast"),
        &litestream_s3_env(),
        Load::Light,
    );
}

#[test]
fn litestream_restores_an_s3_replica_after_checkpoints_and_compaction() {
    let Some(bin) = litestream() else { return };
    let Some(endpoint) = peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bucket = harness::new_bucket(&endpoint, "kc-to-ls-busy");
    let env = harness::s3_env(&endpoint, &bucket, "keycast");
    litestream_restores_keycast(
        &bin,
        dir.path(),
        &env,
        &litestream_s3_url(&endpoint, &bucket, "keycast"),
        &litestream_s3_env(),
        Load::CheckpointsAndCompaction,
    );
}

// ---------------------------------------------------------------------------------------
// litestream writes, keycast restores
// ---------------------------------------------------------------------------------------

/// Every row of table `t`, as `id:v`.
fn t_rows(db: &Path) -> Vec<String> {
    harness::sqlite_query(db, "SELECT id || ':' || v FROM t ORDER BY id")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn expected_rows(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{i}:row{i}")).collect()
}

/// A running `litestream replicate`.
struct Replicating {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Replicating {
    fn start(bin: &str, config: &Path) -> Replicating {
        let mut cmd = litestream_cmd(bin, &["replicate", "-config", config.to_str().unwrap()], &[]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start litestream");
        let pipe = child.stderr.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut pipe = pipe;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Replicating { child, stderr }
    }

    /// SIGTERM (a clean shutdown with a final sync) and wait for exit 0.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "litestream did not stop; log:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "litestream exited with {status}; log:\n{}",
            self.stderr.lock().unwrap()
        );
    }
}

impl Drop for Replicating {
    fn drop(&mut self) {
        harness::reap(&mut self.child);
    }
}

/// Builds a WAL database with sqlite3 (not a keycast database), replicates it with
/// `litestream replicate` using the replica section `replica_yaml` while inserting more
/// rows, and returns the number of rows (`t` holds `row1..rowN`).
fn litestream_replicates(bin: &str, dir: &Path, global_yaml: &str, replica_yaml: &str) -> usize {
    let db = dir.join("app.db");
    harness::sqlite_exec(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); \
         INSERT INTO t(v) VALUES ('row1'), ('row2'), ('row3'), ('row4'), ('row5');",
    );
    let config = dir.join("litestream.yml");
    std::fs::write(
        &config,
        format!(
            "{global_yaml}dbs:\n  - path: {}\n    replicas:\n{replica_yaml}",
            db.display()
        ),
    )
    .unwrap();
    let replicating = Replicating::start(bin, &config);
    let total = 16;
    for i in 6..=total {
        harness::sqlite_exec(&db, &format!("INSERT INTO t(v) VALUES ('row{i}')"));
        std::thread::sleep(Duration::from_millis(350));
    }
    // Several sync intervals, so the last inserts are shipped before the stop too.
    std::thread::sleep(Duration::from_secs(3));
    replicating.stop();
    total
}

/// keycast restores what litestream replicated: latest and an intermediate TXID, which
/// must match litestream's own restore of that TXID.
fn keycast_restores_litestream(
    bin: &str,
    dir: &Path,
    total: usize,
    kc_env: &[(String, String)],
    ls_url: &str,
    ls_env: &[(String, String)],
) {
    let out = dir.join("keycast-restored.db");
    keycast_restore(&out, &[], kc_env);
    assert_eq!(harness::integrity_check(&out), "ok");
    assert_eq!(t_rows(&out), expected_rows(total));

    let mut txids: Vec<u64> = replica_files(kc_env)
        .iter()
        .filter(|f| f["level"].as_u64() == Some(0))
        .map(|f| f["max_txid"].as_u64().unwrap())
        .collect();
    txids.sort();
    txids.dedup();
    assert!(txids.len() >= 3, "litestream shipped several TXIDs: {txids:?}");
    let mid = txids[txids.len() / 2];
    let kc_mid = dir.join("keycast-mid.db");
    keycast_restore(&kc_mid, &["--txid", &format!("{mid:016x}")], kc_env);
    assert_eq!(harness::integrity_check(&kc_mid), "ok");
    let ls_mid = dir.join("litestream-mid.db");
    run_litestream(
        bin,
        &[
            "restore",
            "-txid",
            &format!("{mid:016x}"),
            "-o",
            ls_mid.to_str().unwrap(),
            ls_url,
        ],
        ls_env,
    );
    let mid_rows = t_rows(&kc_mid);
    assert_eq!(mid_rows, t_rows(&ls_mid), "TXID {mid}");
    assert!(
        mid_rows.len() >= 5 && mid_rows.len() < total,
        "TXID {mid} is an intermediate state: {mid_rows:?}"
    );
    assert_eq!(mid_rows, expected_rows(mid_rows.len()));
}

#[test]
fn keycast_restores_a_directory_replica_litestream_wrote() {
    let Some(bin) = litestream() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let replica_yaml = format!(
        "      - type: file\n        path: {}\n        sync-interval: 1s\n",
        replica.display()
    );
    let total = litestream_replicates(&bin, dir.path(), "", &replica_yaml);
    let env = vec![("KEYCAST_REPLICA_URL".to_owned(), file_url(&replica))];
    keycast_restores_litestream(&bin, dir.path(), total, &env, &file_url(&replica), &[]);
}

#[test]
fn keycast_restores_an_s3_replica_litestream_wrote() {
    let Some(bin) = litestream() else { return };
    let Some(endpoint) = peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bucket = harness::new_bucket(&endpoint, "ls-to-kc");
    let replica_yaml = format!(
        "      - url: s3://{bucket}/app\n        endpoint: {endpoint}\n        region: us-east-1\n        \
         force-path-style: true\n        sync-interval: 1s\n"
    );
    let total = litestream_replicates(
        &bin,
        dir.path(),
        "access-key-id: test\nsecret-access-key: test\n",
        &replica_yaml,
    );
    keycast_restores_litestream(
        &bin,
        dir.path(),
        total,
        &harness::s3_env(&endpoint, &bucket, "app"),
        &litestream_s3_url(&endpoint, &bucket, "app"),
        &litestream_s3_env(),
    );
}

#[test]
fn keycast_serve_restores_a_litestream_replica_before_serving() {
    let Some(bin) = litestream() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let replica_yaml = format!(
        "      - type: file\n        path: {}\n        sync-interval: 1s\n",
        replica.display()
    );
    let total = litestream_replicates(&bin, dir.path(), "", &replica_yaml);
    let env = vec![("KEYCAST_REPLICA_URL".to_owned(), file_url(&replica))];

    let data = dir.path().join("data");
    let mut launch = Launch::new(&data);
    for (k, v) in &env {
        launch = launch.env(k, v);
    }
    // Decided: keycast restores it. Its replica format is Litestream's so that an operator
    // can move a Litestream-replicated database to keycast by pointing keycast at the
    // replica; refusing would make that migration impossible, and nothing in the replica is
    // unsafe to restore (it passes the same CRC and checksum checks as keycast's own).
    let server = launch.start();
    assert!(
        server.log().contains("restored the database from the replica"),
        "keycast restores the Litestream replica before serving; log:\n{}",
        server.log()
    );
    // Restore-before-serve put litestream's database in place, and keycast migrated it on
    // top.
    let db = data.join("keycast.db");
    assert_eq!(t_rows(&db), expected_rows(total), "log:\n{}", server.log());
    assert_eq!(
        harness::sqlite_query(&db, "SELECT count(*) FROM sqlite_master WHERE name = 'keycast_meta'"),
        "1"
    );
    server.stop();
    // keycast carried on the replica litestream started: litestream still reads it.
    let out = dir.path().join("after-keycast.db");
    run_litestream(
        &bin,
        &["restore", "-o", out.to_str().unwrap(), &file_url(&replica)],
        &[],
    );
    assert_eq!(harness::integrity_check(&out), "ok");
    assert_eq!(t_rows(&out), expected_rows(total));
    assert_eq!(
        harness::sqlite_query(&out, "SELECT count(*) FROM sqlite_master WHERE name = 'keycast_meta'"),
        "1",
        "keycast's own commits (its migrations) are in the replica too"
    );
}

/// Litestream's `-timestamp` restore reads each file's CreatedAt (the mtime on a directory
/// replica, the `litestream-timestamp` metadata on S3). In a replica keycast compacted and
/// pruned, it must still give the state as of that moment.
fn litestream_timestamp_restore_after_compaction(
    bin: &str,
    dir: &Path,
    replica_env: &[(String, String)],
    ls_url: &str,
    ls_env: &[(String, String)],
) {
    let history = harness::history_with_compaction(&dir.join("data"), replica_env);
    let stamp = history.between.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let out = dir.join("litestream-as-of.db");
    run_litestream(
        bin,
        &["restore", "-timestamp", &stamp, "-o", out.to_str().unwrap(), ls_url],
        ls_env,
    );
    assert_eq!(
        harness::test_keys(&out),
        history.before,
        "litestream restored as of {stamp}; replica: {:?}",
        replica_files(replica_env)
    );
}

#[test]
fn litestream_timestamp_restore_of_a_compacted_directory_replica() {
    let Some(bin) = litestream() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let env = vec![("KEYCAST_REPLICA_URL".to_owned(), file_url(&replica))];
    litestream_timestamp_restore_after_compaction(&bin, dir.path(), &env, &file_url(&replica), &[]);
}

#[test]
fn litestream_timestamp_restore_of_a_compacted_s3_replica() {
    let Some(bin) = litestream() else { return };
    let Some(endpoint) = peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bucket = harness::new_bucket(&endpoint, "ls-pitr");
    litestream_timestamp_restore_after_compaction(
        &bin,
        dir.path(),
        &harness::s3_env(&endpoint, &bucket, "keycast"),
        &litestream_s3_url(&endpoint, &bucket, "keycast"),
        &litestream_s3_env(),
    );
}

/// A copy of the directory replica `from` at `to` holding only the LTX files `keep` accepts
/// (as `(level, min_txid, max_txid)`), as a replica whose lower levels were pruned.
fn pruned_copy(from: &Path, to: &Path, keep: &dyn Fn(u64, u64, u64) -> bool) -> usize {
    let mut kept = 0;
    for level in 0..=9u64 {
        let Ok(entries) = std::fs::read_dir(from.join("ltx").join(level.to_string())) else {
            continue;
        };
        for entry in entries.map(Result::unwrap) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((min, max)) = name.strip_suffix(".ltx").and_then(|n| n.split_once('-')) else {
                continue;
            };
            let (min, max) = (
                u64::from_str_radix(min, 16).unwrap(),
                u64::from_str_radix(max, 16).unwrap(),
            );
            if keep(level, min, max) {
                let dir = to.join("ltx").join(level.to_string());
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::copy(entry.path(), dir.join(&name)).unwrap();
                kept += 1;
            }
        }
    }
    kept
}

/// Litestream reads keycast's level-9 snapshots and its level-2 and level-3 compactions, not
/// only level 0/1: keycast snapshots after a first batch and compacts a second batch up to
/// level 3; then Litestream restores copies of the replica pruned down to {the first
/// snapshot + level 2} and {the first snapshot + level 3}, which hold every row only if
/// Litestream applies those files on top of the snapshot.
#[test]
fn litestream_restores_keycast_snapshots_and_level_2_and_3_compactions() {
    let Some(bin) = litestream() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let env = vec![("KEYCAST_REPLICA_URL".to_owned(), file_url(&replica))];
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_URL", &file_url(&replica))
        .env("KEYCAST_REPLICA_COMPACTION_LEVELS", "1,1,1")
        .env("KEYCAST_REPLICA_SNAPSHOT_INTERVAL_SECS", "1")
        .start();
    let max_at = |level: u64| {
        replica_files(&env)
            .iter()
            .filter(|f| f["level"].as_u64() == Some(level))
            .map(|f| f["max_txid"].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    };
    let wait_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what} never happened: {:?}",
                replica_files(&env)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut written = Vec::new();
    for n in 0..5 {
        let key = format!("a{n}");
        server.write(&key, true);
        written.push(key);
    }
    let after_a = max_at(0);
    // The first batch in a snapshot and compacted up to level 3, so the second batch's
    // level-2 and level-3 files start after it.
    wait_until("a snapshot and level 3 covering the first batch", &|| {
        max_at(9) >= after_a && max_at(3) >= after_a
    });
    let snapshot = max_at(9);
    for n in 0..5 {
        let key = format!("b{n}");
        server.write(&key, true);
        written.push(key);
    }
    let last = max_at(0);
    assert!(last > snapshot, "the second batch comes after the snapshot");
    wait_until("level 3 covering the second batch", &|| {
        max_at(3) >= last && max_at(2) >= last
    });
    server.stop();

    for level in [2u64, 3] {
        let copy = dir.path().join(format!("snapshot-and-level-{level}"));
        // The first snapshot (it covers only the first batch) and the files of one
        // compaction level that end after it, none of which starts at TXID 1: the restore
        // needs both the snapshot and that level.
        let kept = pruned_copy(&replica, &copy, &|l, min, max| {
            if l == level && max > snapshot {
                assert!(
                    min > 1,
                    "level {level} file {min}-{max} would make the snapshot unnecessary"
                );
            }
            (l == 9 && max == snapshot) || (l == level && max > snapshot)
        });
        assert!(kept >= 2, "level {level}: the copy holds a snapshot and compactions");
        let out = dir.path().join(format!("litestream-level-{level}.db"));
        run_litestream(&bin, &["restore", "-o", out.to_str().unwrap(), &file_url(&copy)], &[]);
        assert_eq!(harness::integrity_check(&out), "ok", "level {level}");
        assert_eq!(harness::test_keys(&out), sorted(written.clone()), "level {level}");
    }
}

/// On GCS (fake-gcs-server): Litestream's Go client, pointed at the emulator the way
/// Google's tools are (`STORAGE_EMULATOR_HOST`), reads what keycast wrote over the XML API.
#[test]
fn litestream_restores_a_gcs_replica_keycast_wrote() {
    let Some(bin) = litestream() else { return };
    let Some(replica) = harness::stores::gcs("litestream") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    litestream_restores_keycast(
        &bin,
        dir.path(),
        &replica.full_env(),
        &replica.url,
        &replica.env,
        Load::CheckpointsAndCompaction,
    );
}

/// On Azure (Azurite): Litestream's `abs` replica, configured with the same account, key and
/// endpoint keycast's connection string names.
#[test]
fn litestream_restores_an_azure_replica_keycast_wrote() {
    let Some(bin) = litestream() else { return };
    let Some(replica) = harness::stores::azure("litestream") else {
        return;
    };
    let connection = &replica.env[0].1;
    let field = |name: &str| {
        connection
            .split(';')
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {connection}"))
            .to_string()
    };
    let (container, path) = replica.url.strip_prefix("az://").unwrap().split_once('/').unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("litestream-config-db");
    let config = dir.path().join("litestream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - type: abs\n        account-name: {}\n        account-key: {}\n        bucket: {container}\n        path: {path}\n        endpoint: {}\n",
            db_path.display(),
            field("AccountName"),
            field("AccountKey"),
            field("BlobEndpoint"),
        ),
    )
    .unwrap();
    litestream_restores_keycast(
        &bin,
        dir.path(),
        &replica.full_env(),
        db_path.to_str().unwrap(),
        &[("LITESTREAM_CONFIG".into(), config.display().to_string())],
        Load::CheckpointsAndCompaction,
    );
}
