//! Replication as a user relies on it, end to end through the real binary: redeploys on a
//! wiped disk lose nothing, a crash leaves a consistent prefix, point-in-time restore, a
//! damaged replica is refused by name, an idle server costs nothing, stale local copies are
//! never served, and `replica status` tells the truth.

mod harness;

use harness::CommandExt as _;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{keycast_cli, metric_sum, peer, post, Finished, Launch};
use serde_json::Value;

/// `file://<dir>`: the replica URL of a local directory.
fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// A launch on `data` with the test routes on and `env` (the replica settings) added.
fn launch(data: &Path, env: &[(String, String)]) -> Launch {
    let mut launch = Launch::new(data).env("KEYCAST_TEST_ROUTES", "true");
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    launch
}

/// The replica settings for a local directory replica.
fn file_env(replica: &Path) -> Vec<(String, String)> {
    vec![("KEYCAST_REPLICA_URL".into(), file_url(replica))]
}

/// Runs a keycast CLI command with the replica settings `env`.
fn cli(args: &[&str], env: &[(String, String)]) -> Finished {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    keycast_cli(args, &env)
}

/// `keycast restore -o <out> [extra…]` against the replica in `env`; fails the test unless
/// it succeeds.
fn restore(out: &Path, extra: &[&str], env: &[(String, String)]) -> Finished {
    let mut args = vec!["restore", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let finished = cli(&args, env);
    finished.assert_success(&format!("keycast {}", args.join(" ")));
    finished
}

/// `keycast replica ls --json`: the replica's files.
fn replica_files(env: &[(String, String)]) -> Vec<Value> {
    let out = cli(&["replica", "ls", "--json"], env);
    out.assert_success("keycast replica ls --json");
    let doc: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("replica ls --json is not JSON ({e}): {}", out.stdout));
    doc["files"].as_array().expect("a files array").clone()
}

/// The highest TXID in the replica, as `replica ls --json` reports it.
fn replica_max_txid(env: &[(String, String)]) -> u64 {
    replica_files(env)
        .iter()
        .map(|f| f["max_txid"].as_u64().unwrap())
        .max()
        .unwrap_or(0)
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The drill Cloud Run performs on every deploy: stop with SIGTERM, lose the disk, start
/// on an empty one. Every row from every earlier cycle must be there the moment the new
/// instance reports started, and the replica must hold all of them at the end.
fn redeploy_drill(dir: &Path, env: &[(String, String)], cycles: usize) {
    let data = dir.join("data");
    let db = data.join("keycast.db");
    let mut written: Vec<String> = Vec::new();
    for cycle in 0..cycles {
        assert!(!data.exists(), "each cycle starts on an empty disk");
        let server = launch(&data, env).start();
        // `/healthz/startup` is 200 now: restore-before-serve must already have put every
        // earlier row into the database the server is about to serve.
        let present = harness::test_keys(&db);
        assert_eq!(
            present,
            sorted(written.clone()),
            "cycle {cycle}: rows missing right after /healthz/startup answered 200; log:\n{}",
            server.log()
        );
        if cycle > 0 {
            assert!(
                server.log().contains("restored the database from the replica"),
                "cycle {cycle}: an empty data dir must be restored from the replica; log:\n{}",
                server.log()
            );
        }
        for i in 0..4 {
            let key = format!("c{cycle:02}-{i}");
            server.write(&key, i % 2 == 0);
            written.push(key);
        }
        let log = server.stop();
        assert!(log.contains("replicated_txid"), "cycle {cycle}: {log}");
        std::fs::remove_dir_all(&data).unwrap();
    }
    let out = dir.join("final.db");
    restore(&out, &[], env);
    assert_eq!(harness::integrity_check(&out), "ok");
    assert_eq!(harness::test_keys(&out), sorted(written));
}

#[test]
fn redeploy_drill_keeps_every_write() {
    let dir = tempfile::tempdir().unwrap();
    redeploy_drill(dir.path(), &file_env(&dir.path().join("replica")), 10);
}

#[test]
fn redeploy_drill_keeps_every_write_on_s3() {
    let Some(replica) = harness::stores::s3("drill") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    redeploy_drill(dir.path(), &replica.full_env(), 3);
}

#[test]
fn redeploy_drill_keeps_every_write_on_gcs() {
    let Some(replica) = harness::stores::gcs("drill") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    redeploy_drill(dir.path(), &replica.full_env(), 3);
}

#[test]
fn redeploy_drill_keeps_every_write_on_azure() {
    let Some(replica) = harness::stores::azure("drill") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    redeploy_drill(dir.path(), &replica.full_env(), 3);
}

/// What the writer thread of the crash test saw.
#[derive(Debug, Default)]
struct WriterReport {
    /// Highest key sent (acknowledged or not).
    attempted: u64,
    /// Highest key acknowledged with 200.
    acked: u64,
    /// Highest durable key acknowledged with 200.
    acked_durable: u64,
    /// Statuses other than 200 before the connection broke.
    unexpected: Vec<(u64, u16, String)>,
}

fn crash_key(n: u64) -> String {
    format!("{n:06}")
}

#[test]
fn crash_under_writes_restores_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let env = file_env(&replica);
    let mut server = launch(&dir.path().join("data"), &env).start();
    let base = server.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let durable_acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, durable_acked) = (stop.clone(), durable_acked.clone());
        std::thread::spawn(move || {
            let mut report = WriterReport::default();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let durable = n.is_multiple_of(50);
                report.attempted = n;
                let (status, body) = post(&format!("{base}/api/test/write?key={}&durable={durable}", crash_key(n)));
                match status {
                    200 => {
                        report.acked = n;
                        if durable {
                            report.acked_durable = n;
                            durable_acked.store(n, Ordering::SeqCst);
                        }
                    }
                    0 => break, // the server is gone
                    other => report.unexpected.push((n, other, body)),
                }
            }
            report
        })
    };
    // Let the writes run for a while, and until at least two durable ones were acknowledged.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) || durable_acked.load(Ordering::SeqCst) < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(60) && !writer.is_finished(),
            "the writer did not get 100 writes through; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal(libc::SIGKILL);
    let (status, _) = server.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "SIGKILL ends the process: {status}");
    stop.store(true, Ordering::SeqCst);
    let report = writer.join().unwrap();
    assert!(
        report.unexpected.is_empty(),
        "writes failed before the crash: {:?}",
        report.unexpected
    );
    assert!(
        report.acked_durable >= 100,
        "too few writes to mean anything: {report:?}"
    );

    let out = dir.path().join("restored.db");
    restore(&out, &[], &env);
    eprintln!("crash test: {report:?}");
    assert_eq!(harness::integrity_check(&out), "ok");
    let present = harness::test_keys(&out);
    let m = present.len() as u64;
    eprintln!("crash test: the replica holds writes 1..={m}");
    let prefix: Vec<String> = (1..=m).map(crash_key).collect();
    assert_eq!(
        present, prefix,
        "the restored database must hold exactly writes 1..=m, with no holes"
    );
    assert!(
        m >= report.acked_durable,
        "write {} was acknowledged as durable but the replica stops at {m}: {report:?}",
        report.acked_durable
    );
    assert!(
        m <= report.attempted,
        "the replica holds writes that were never sent: m={m}, {report:?}"
    );
}

/// Parses `replica ls --json`'s `created_at`.
fn created_at(file: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(file["created_at"].as_str().unwrap()).unwrap()
}

#[test]
fn restore_cli_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let env = file_env(&dir.path().join("replica"));
    let server = launch(&dir.path().join("data"), &env).start();
    // Durable writes: each is in the replica, in its own TXID, before the next one starts.
    server.write("a1", true);
    let txid_a1 = replica_max_txid(&env);
    server.write("a2", true);
    server.write("a3", true);
    let txid_a = replica_max_txid(&env);
    assert!(txid_a > txid_a1, "durable writes ship as new TXIDs");
    std::thread::sleep(Duration::from_millis(1200));
    server.write("b1", true);
    server.write("b2", true);
    server.stop();

    let files = replica_files(&env);
    let last_a = files
        .iter()
        .filter(|f| f["max_txid"].as_u64().unwrap() <= txid_a)
        .map(created_at)
        .max()
        .unwrap();
    let first_b = files
        .iter()
        .filter(|f| f["min_txid"].as_u64().unwrap() > txid_a)
        .map(created_at)
        .min()
        .expect("the b writes made new files");
    assert!(
        first_b - last_a >= chrono::Duration::milliseconds(1000),
        "the batches are a second apart: {last_a} .. {first_b}"
    );
    let between = last_a + (first_b - last_a) / 2;

    // --txid, in both spellings: decimal and the 16 hex digits `replica ls` prints.
    let by_txid = dir.path().join("by-txid.db");
    restore(&by_txid, &["--txid", &txid_a1.to_string()], &env);
    assert_eq!(harness::test_keys(&by_txid), keys(&["a1"]));
    let by_hex = dir.path().join("by-hex.db");
    restore(&by_hex, &["--txid", &format!("{txid_a:016x}")], &env);
    assert_eq!(harness::test_keys(&by_hex), keys(&["a1", "a2", "a3"]));
    assert_eq!(harness::integrity_check(&by_hex), "ok");

    // --timestamp between the batches.
    let by_time = dir.path().join("by-time.db");
    let stamp = between.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let restored = restore(&by_time, &["--timestamp", &stamp, "--json"], &env);
    assert_eq!(
        harness::test_keys(&by_time),
        keys(&["a1", "a2", "a3"]),
        "restored as of {stamp}"
    );
    // It says when the state it reached was written: the newest before the time asked for.
    let doc: Value = serde_json::from_str(restored.stdout.trim()).unwrap();
    let written = chrono::DateTime::parse_from_rfc3339(doc["written_at"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("restore --json names the state's time ({e}): {doc}"));
    assert!(
        written <= between && written >= last_a - chrono::Duration::seconds(1),
        "written at {written}, asked for {between}, last file before it {last_a}"
    );

    // An existing output is not overwritten without --force.
    let refused = cli(&["restore", "-o", by_txid.to_str().unwrap()], &env);
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("already exists") && refused.stderr.contains("--force"),
        "the refusal says why and what to do: {}",
        refused.stderr
    );
    assert_eq!(
        harness::test_keys(&by_txid),
        keys(&["a1"]),
        "the refused restore left the existing file alone"
    );

    // --force with a restore that fails (a TXID past the replica): the existing database
    // stays as it was. Before, it was deleted before the restore began.
    let beyond = (replica_max_txid(&env) + 100).to_string();
    let failed = cli(
        &["restore", "-o", by_txid.to_str().unwrap(), "--force", "--txid", &beyond],
        &env,
    );
    assert!(!failed.status.success(), "{}", failed.stdout);
    assert!(failed.stderr.contains("cannot reach TXID"), "{}", failed.stderr);
    assert_eq!(
        harness::test_keys(&by_txid),
        keys(&["a1"]),
        "the failed restore left the existing file alone"
    );

    // --force replaces it; --json reports what was restored. The replication record left
    // beside it goes too: with it, `serve` resumed shipping the restored file as the replaced
    // database's continuation.
    let record = dir.path().join("by-txid.db-replica.json");
    std::fs::write(&record, "{}").unwrap();
    let forced = restore(&by_txid, &["--force", "--json"], &env);
    assert!(!record.exists(), "the replaced database's replication record is gone");
    let doc: Value = serde_json::from_str(forced.stdout.trim())
        .unwrap_or_else(|e| panic!("restore --json is not JSON ({e}): {}", forced.stdout));
    assert_eq!(doc["txid"].as_u64(), Some(replica_max_txid(&env)), "{doc}");
    assert!(doc["files"].as_u64().unwrap() >= 1, "{doc}");
    assert_eq!(harness::test_keys(&by_txid), keys(&["a1", "a2", "a3", "b1", "b2"]));

    // A WAL left where its database was moved away from is refused, named (SQLite would
    // apply it over the restore); --force removes it.
    let moved = dir.path().join("moved.db");
    let orphan = dir.path().join("moved.db-wal");
    std::fs::write(&orphan, b"another database's commits").unwrap();
    let refused = cli(&["restore", "-o", moved.to_str().unwrap()], &env);
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(refused.stderr.contains("moved.db-wal"), "{}", refused.stderr);
    assert!(!moved.exists());
    restore(&moved, &["--force"], &env);
    assert!(!orphan.exists());
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("moved.db-wal.orphan-"));
    assert!(
        kept,
        "the leftover is kept beside, renamed: it may hold the moved database's last commits"
    );
    assert_eq!(harness::test_keys(&moved), keys(&["a1", "a2", "a3", "b1", "b2"]));

    // A time before the first file cannot be restored, and says so.
    let too_early = dir.path().join("too-early.db");
    let before =
        (created_at(&files[0]) - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let failed = cli(
        &["restore", "-o", too_early.to_str().unwrap(), "--timestamp", &before],
        &env,
    );
    assert!(!failed.status.success());
    assert!(failed.stderr.contains("before the requested time"), "{}", failed.stderr);
    assert!(!too_early.exists());
}

/// `KEYCAST_REPLICA_URL=none`: nothing replicates, so nothing checkpointed the WAL either (the
/// application leaves that to the replicator): it grew by every commit for as long as the
/// process ran, on a disk that may be memory. SQLite's own checkpoint now keeps it bounded,
/// and every commit is fsynced before it is answered (the disk is the only copy).
#[test]
fn without_a_replica_the_wal_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = launch(&data, &[("KEYCAST_REPLICA_URL".into(), "none".into())]).start();
    let wal = data.join("keycast.db-wal");
    let mut largest = 0;
    for n in 0..3000 {
        server.write(&format!("w{n}"), false);
        if n % 100 == 99 {
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
    }
    // 1,000 pages of 4 KiB between checkpoints, and what a reader may hold up.
    assert!(
        largest <= 6 << 20,
        "the WAL reached {largest} bytes over 3,000 small commits"
    );
    server.stop();
    assert_eq!(harness::test_keys(&data.join("keycast.db")).len(), 3000);
}

/// `keycast restore --force` killed outright (SIGKILL, out of memory) leaves a copy of the
/// database beside its output, under names of that run's own (`<output>.restoring-<pid>-<ns>`,
/// and the restore's temporary file beside that): before, nothing ever removed them, and a
/// disk that is memory filled with them. The next `--force` removes those unwritten for an
/// hour; one still being written, and names that are not a restore's, are left alone.
#[test]
fn restore_force_removes_what_killed_runs_left_beside_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let env = file_env(&dir.path().join("replica"));
    let server = launch(&dir.path().join("data"), &env).start();
    server.write("a1", true);
    server.stop();
    let out = dir.path().join("keycast.db");
    restore(&out, &[], &env);

    let beside = |name: &str| dir.path().join(name);
    let killed = [
        beside("keycast.db.restoring-1-1764000000000000000"),
        beside("keycast.db.restoring-1-1764000000000000000.restore-1-0badf00d.tmp"),
    ];
    let kept = [
        beside("keycast.db.restoring-1-1765000000000000000"),
        beside("keycast.db.restoring-notes"),
        beside("other.db.restoring-1-1764000000000000000"),
    ];
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for (n, path) in killed.iter().chain(&kept).enumerate() {
        std::fs::write(path, vec![0u8; 4096]).unwrap();
        // The first of `kept` is being written now; every other one is old.
        if n != killed.len() {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
    }
    restore(&out, &["--force"], &env);
    for path in &killed {
        assert!(!path.exists(), "{} is left", path.display());
    }
    for path in &kept {
        assert!(path.exists(), "{} was removed", path.display());
    }
    assert_eq!(harness::test_keys(&out), keys(&["a1"]));
}

/// `keycast restore --force` pointed at the database a running instance has open (a mistyped
/// path, or a runbook followed without stopping the service first). Before, it removed the
/// live WAL and renamed the restore over the file: the instance went on committing into
/// unlinked files, answering writes as made that no later start would see. Now it refuses,
/// naming the process, and changes nothing.
#[test]
fn restore_refuses_to_replace_the_database_a_running_instance_has_open() {
    let dir = tempfile::tempdir().unwrap();
    let env = file_env(&dir.path().join("replica"));
    let data = dir.path().join("data");
    let server = launch(&data, &env).start();
    server.write("before", true);
    let live = data.join("keycast.db");
    let wal = data.join("keycast.db-wal");
    assert!(wal.exists(), "the running instance's WAL");

    let refused = cli(&["restore", "-o", live.to_str().unwrap(), "--force"], &env);
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains(&format!("process {}", server.pid())),
        "the refusal names the process that has it open: {}",
        refused.stderr
    );
    assert!(wal.exists(), "the running instance's WAL is left alone");

    // The instance goes on as before: what it writes next is in its database and replica.
    server.write("after", true);
    server.stop();
    let out = dir.path().join("check.db");
    restore(&out, &[], &env);
    assert_eq!(harness::test_keys(&out), keys(&["after", "before"]));
    assert_eq!(harness::test_keys(&live), keys(&["after", "before"]));

    // Stopped, it may be replaced.
    restore(&live, &["--force"], &env);
}

/// The same, when the instance starts while the restore runs (a supervisor restarting it, a
/// second operator): the check before the restore passed, and the rename then went over the
/// file the instance had opened since. The restore now asks again just before it replaces
/// anything, and leaves the database to the instance.
#[test]
fn restore_refuses_to_replace_a_database_an_instance_opened_while_it_ran() {
    let dir = tempfile::tempdir().unwrap();
    let env = file_env(&dir.path().join("replica"));
    let data = dir.path().join("data");
    let server = launch(&data, &env).start();
    server.write("before", true);
    server.stop();
    let live = data.join("keycast.db");

    let restoring = std::thread::spawn({
        let (live, mut env) = (live.clone(), env.clone());
        env.push(("FAILPOINTS".into(), "restore-before-replacing=return(5000)".into()));
        move || cli(&["restore", "-o", live.to_str().unwrap(), "--force"], &env)
    });
    // While the restore waits to replace the file, keycast starts on it.
    std::thread::sleep(Duration::from_millis(500));
    let server = launch(&data, &env).start();
    server.write("during", true);
    let refused = restoring.join().unwrap();
    assert!(
        !refused.status.success(),
        "the restore replaced a database keycast had opened: {}",
        refused.stdout
    );
    assert!(
        refused.stderr.contains(&format!("process {}", server.pid())),
        "the refusal names the process: {}",
        refused.stderr
    );
    server.write("after", true);
    server.stop();
    assert_eq!(harness::test_keys(&live), keys(&["after", "before", "during"]));
}

/// How to damage an object.
#[derive(Debug, Clone, Copy)]
enum Damage {
    FlipBytes,
    Truncate,
    /// Gone: the objects after it look like uploads that were never acknowledged.
    Missing,
}

fn damage(path: &Path, how: Damage) {
    let mut bytes = std::fs::read(path).unwrap();
    match how {
        // Sixteen bytes, not one: a single bit in an LZ4 block can be redundant (a match
        // copying zeros from a slightly different offset inflates to the same page).
        Damage::FlipBytes => {
            let middle = bytes.len() / 2;
            for b in &mut bytes[middle - 8..middle + 8] {
                *b ^= 0xff;
            }
        }
        Damage::Truncate => bytes.truncate(bytes.len() * 2 / 3),
        Damage::Missing => return std::fs::remove_file(path).unwrap(),
    }
    std::fs::write(path, bytes).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output_within(harness::COMMAND_TIMEOUT)
        .status;
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

fn level0_files(replica: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(replica.join("ltx/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ltx"))
        .collect();
    files.sort();
    files
}

#[test]
fn corrupt_or_truncated_object_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    // No compaction during the test: restore must need every level-0 file.
    let env = vec![
        ("KEYCAST_REPLICA_URL".to_owned(), file_url(&replica)),
        ("KEYCAST_REPLICA_COMPACTION_LEVELS".to_owned(), "3600".to_owned()),
    ];
    let server = launch(&dir.path().join("data"), &env).start();
    for i in 0..5 {
        server.write(&format!("k{i}"), true);
    }
    server.stop();
    let files = level0_files(&replica);
    assert!(files.len() >= 5, "{files:?}");

    for how in [Damage::FlipBytes, Damage::Truncate, Damage::Missing] {
        let case = dir.path().join(format!("{how:?}"));
        std::fs::create_dir(&case).unwrap();
        let broken = case.join("replica");
        copy_dir(&replica, &broken);
        let victim = level0_files(&broken)[files.len() / 2].clone();
        let name = victim.file_name().unwrap().to_str().unwrap().to_owned();
        damage(&victim, how);
        let broken_env = file_env(&broken);

        let out_dir = case.join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("restored.db");
        let failed = cli(&["restore", "-o", out.to_str().unwrap()], &broken_env);
        assert!(
            !failed.status.success(),
            "{how:?}: restore must fail: {}",
            failed.stdout
        );
        assert!(
            matches!(how, Damage::Missing) || failed.stderr.contains(&name),
            "{how:?}: the error names the damaged object {name}: {}",
            failed.stderr
        );
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(
            left.is_empty(),
            "{how:?}: a failed restore leaves nothing behind: {left:?}"
        );
        if matches!(how, Damage::Missing) {
            // Nothing names a file that is not there: the refusal names the TXIDs instead.
            assert!(failed.stderr.contains("short of TXID"), "{}", failed.stderr);
        }

        let verified = cli(&["replica", "verify"], &broken_env);
        assert!(
            !verified.status.success(),
            "{how:?}: replica verify must fail: {}",
            verified.stdout
        );

        let data = case.join("data");
        let refused = launch(&data, &broken_env).run_to_exit(Duration::from_secs(60));
        assert!(
            !refused.status.success(),
            "{how:?}: keycast must not serve from a damaged replica; log:\n{}",
            refused.stderr
        );
        assert!(
            matches!(how, Damage::Missing) || refused.stderr.contains(&name),
            "{how:?}: the start-up error names the damaged object {name}: {}",
            refused.stderr
        );
        assert!(
            !data.join("keycast.db").exists(),
            "{how:?}: no half-restored database is left for the next start to pick up"
        );
    }
}

/// After a durable write and the compaction it calls for, an idle server must not touch
/// the object store: on a serverless platform every request is billed.
fn idle_makes_no_requests(dir: &Path, replica_env: &[(String, String)]) {
    let mut env = replica_env.to_vec();
    // L1 every second, so the compaction the write calls for is done before we measure,
    // and many compaction periods pass while idle.
    env.push(("KEYCAST_REPLICA_COMPACTION_LEVELS".into(), "1".into()));
    let server = launch(&dir.join("data"), &env).start();
    server.write("once", true);
    // The round that compacted ends with a retention pass: wait for both.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = server.get("/metrics");
        if metric_sum(&metrics, "keycast_replica_compactions_total") >= 1.0
            && metric_sum(&metrics, "keycast_replica_retention_passes_total") >= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no compaction and retention pass after the write: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, before) = server.get("/metrics");
    assert_eq!(status, 200);
    let requests_before = metric_sum(&before, "keycast_replica_requests_total");
    assert!(
        requests_before > 0.0,
        "the write was shipped, so requests were counted: {before}"
    );
    std::thread::sleep(Duration::from_secs(10));
    let (_, after) = server.get("/metrics");
    let requests_after = metric_sum(&after, "keycast_replica_requests_total");
    let lines = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("keycast_replica_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        requests_after,
        requests_before,
        "an idle server made object-store requests:\nbefore:\n{}\nafter:\n{}",
        lines(&before),
        lines(&after)
    );
    server.stop();
}

#[test]
fn idle_server_makes_no_object_store_requests() {
    let dir = tempfile::tempdir().unwrap();
    idle_makes_no_requests(dir.path(), &file_env(&dir.path().join("replica")));
}

#[test]
fn idle_server_makes_no_object_store_requests_on_s3() {
    let Some(endpoint) = peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bucket = harness::new_bucket(&endpoint, "idle");
    idle_makes_no_requests(dir.path(), &harness::s3_env(&endpoint, &bucket, "keycast"));
}

#[test]
fn a_local_database_behind_the_replica_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let env = file_env(&dir.path().join("replica"));
    let a = dir.path().join("a");
    let b = dir.path().join("b");

    let server = launch(&a, &env).start();
    server.write("old", true);
    server.stop();
    copy_dir(&a, &b);

    let server = launch(&a, &env).start();
    server.write("new1", false);
    server.write("new2", true);
    server.stop();

    let server = launch(&b, &env).start();
    let db = b.join("keycast.db");
    assert_eq!(
        harness::test_keys(&db),
        keys(&["new1", "new2", "old"]),
        "the stale copy must be replaced by the replica's latest before serving; log:\n{}",
        server.log()
    );
    let aside: Vec<PathBuf> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("keycast.db.behind-") && !name.ends_with("-wal") && !name.ends_with("-shm")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the stale database is kept aside: {aside:?}");
    assert_eq!(
        harness::test_keys(&aside[0]),
        keys(&["old"]),
        "the file moved aside is the stale copy, untouched"
    );
    server.write("after", true);
    server.stop();
    let out = dir.path().join("latest.db");
    restore(&out, &[], &env);
    assert_eq!(
        harness::test_keys(&out),
        keys(&["after", "new1", "new2", "old"]),
        "the instance that restored keeps replicating"
    );

    // A database with no replication record: keycast cannot tell which copy is newer.
    let c = dir.path().join("c");
    copy_dir(&a, &c);
    std::fs::remove_file(c.join("keycast.db-replica.json")).unwrap();
    let refused = launch(&c, &env).run_to_exit(Duration::from_secs(60));
    assert!(
        !refused.status.success(),
        "a database of unknown provenance next to a non-empty replica must not be served"
    );
    assert!(
        refused.stderr.contains("replica") && refused.stderr.contains("no replication record"),
        "the refusal explains itself: {}",
        refused.stderr
    );
    assert!(
        c.join("keycast.db").exists(),
        "the unknown database is left where it was"
    );
}

#[test]
fn replica_status_reports_local_and_replicated_txid() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = file_env(&dir.path().join("replica"));
    let server = launch(&data, &env).start();
    server.write("s1", false);
    server.write("s2", true);
    server.write("s3", false);
    let log = server.stop();

    let mut status_env = env.clone();
    status_env.push(("KEYCAST_DATA_DIR".into(), data.display().to_string()));
    let out = cli(&["replica", "status", "--json"], &status_env);
    out.assert_success("keycast replica status --json");
    let doc: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("replica status --json is not JSON ({e}): {}", out.stdout));
    let replicated = doc["replicated_txid"].as_u64().expect("replicated_txid");
    assert!(replicated >= 2, "{doc}");
    assert_eq!(doc["local_txid"].as_u64(), Some(replicated), "{doc}");
    assert_eq!(doc["in_sync"], Value::Bool(true), "{doc}");
    assert_eq!(doc["clean_shutdown"], Value::Bool(true), "{doc}");
    assert_eq!(doc["unshipped_wal_bytes"].as_u64(), Some(0), "{doc}");
    assert_eq!(replicated, replica_max_txid(&env), "{doc}");
    assert!(
        strip_ansi(&log).contains(&format!("replicated_txid={replicated}")),
        "the exit line and the status agree on TXID {replicated}: {log}"
    );
}

/// `keycast replica status` on the host of a running instance, after a checkpoint restarted
/// its WAL in place: it measured unshipped bytes to the file's end, so the old generation's
/// frames past the new ones made a shipped WAL look behind (and `in_sync` false, ever older);
/// and it named no lease holder, which OPERATIONS.md promised.
#[test]
fn replica_status_beside_a_running_instance_says_what_is_shipped_and_who_holds_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let env = file_env(&dir.path().join("replica"));
    let data = dir.path().join("data");
    let server = launch(&data, &env)
        .env("KEYCAST_REPLICA_CHECKPOINT_PAGES", "20")
        .start();
    let wal = data.join("keycast.db-wal");
    let mut longest = 0;
    for n in 0..60 {
        server.write(&format!("w{n}"), true);
        longest = longest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    // A checkpoint restarted the WAL: it is shorter than at its longest, in a new generation.
    server.write("last", true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status_env = env.clone();
    status_env.push(("KEYCAST_DATA_DIR".into(), data.display().to_string()));
    let doc = loop {
        let out = cli(&["replica", "status", "--json"], &status_env);
        out.assert_success("keycast replica status --json");
        let doc: Value = serde_json::from_str(out.stdout.trim()).unwrap();
        if doc["in_sync"] == Value::Bool(true) || Instant::now() > deadline {
            break doc;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(longest > 20 * 4096, "the WAL grew past a checkpoint's worth: {longest}");
    assert_eq!(doc["unshipped_wal_bytes"].as_u64(), Some(0), "{doc}");
    assert_eq!(doc["in_sync"], Value::Bool(true), "{doc}");
    assert_eq!(doc["lease"]["released"], Value::Bool(false), "{doc}");
    assert!(
        doc["lease"]["owner"].as_str().is_some_and(|o| !o.is_empty()),
        "names the holder: {doc}"
    );
    server.stop();
}

/// `text` without ANSI escape sequences (the text log colours its field names).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters… final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Restoring to a moment whose level-0 files were already compacted and pruned: the
/// compacted files carry the time of their newest content (the header timestamp, which
/// keycast also stores as the object's CreatedAt), so they still serve that moment.
fn point_in_time_after_compaction(dir: &Path, env: &[(String, String)]) {
    let history = harness::history_with_compaction(&dir.join("data"), env);
    let stamp = history.between.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let out = dir.join("as-of.db");
    let result = cli(&["restore", "-o", out.to_str().unwrap(), "--timestamp", &stamp], env);
    result.assert_success(&format!("keycast restore --timestamp {stamp}"));
    assert_eq!(
        harness::test_keys(&out),
        history.before,
        "restored as of {stamp}; replica: {:?}",
        replica_files(env)
    );
    let latest = dir.join("latest.db");
    restore(&latest, &[], env);
    assert_eq!(harness::test_keys(&latest), history.all);
}

#[test]
fn point_in_time_restore_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    point_in_time_after_compaction(dir.path(), &file_env(&dir.path().join("replica")));
}

#[test]
fn point_in_time_restore_after_compaction_on_s3() {
    let Some(endpoint) = peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bucket = harness::new_bucket(&endpoint, "pitr");
    point_in_time_after_compaction(dir.path(), &harness::s3_env(&endpoint, &bucket, "keycast"));
}

/// Writes `a1`, notes a moment, and writes `b1` a few milliseconds later, all inside one
/// wall-clock second (retrying on a slow machine with a fresh replica from `fresh_env`),
/// then stops. Returns the replica settings used and the moment.
fn two_writes_within_one_second(
    dir: &Path,
    fresh_env: &dyn Fn(usize) -> Vec<(String, String)>,
) -> (Vec<(String, String)>, chrono::DateTime<chrono::Utc>) {
    use chrono::Timelike;
    for attempt in 0..5 {
        let env = fresh_env(attempt);
        let data = dir.join(format!("data-{attempt}"));
        let server = launch(&data, &env).start();
        // Start early in a second so everything below fits before the next one.
        while !(100..300).contains(&(chrono::Utc::now().nanosecond() / 1_000_000)) {
            std::thread::sleep(Duration::from_millis(5));
        }
        server.write("a1", true);
        let between = chrono::Utc::now();
        std::thread::sleep(Duration::from_millis(30));
        server.write("b1", true);
        let done = chrono::Utc::now();
        server.stop();
        if done.timestamp() == between.timestamp() {
            return (env, between);
        }
        eprintln!("attempt {attempt}: the writes spanned a second boundary; again");
    }
    panic!("could not fit two writes into one second in five attempts");
}

/// A restore "as of T" must never contain a commit made after T, even when the commit
/// came only milliseconds later.
fn timestamp_restore_excludes_later_commits(dir: &Path, fresh_env: &dyn Fn(usize) -> Vec<(String, String)>) {
    let (env, between) = two_writes_within_one_second(dir, fresh_env);
    let stamp = between.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let out = dir.join("as-of.db");
    restore(&out, &["--timestamp", &stamp], &env);
    assert_eq!(
        harness::test_keys(&out),
        keys(&["a1"]),
        "b1 was committed after {stamp}; replica: {:?}",
        replica_files(&env)
    );
}

#[test]
fn timestamp_restore_excludes_commits_made_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    timestamp_restore_excludes_later_commits(dir.path(), &|attempt| {
        file_env(&root.join(format!("replica-{attempt}")))
    });
}

#[test]
fn timestamp_restore_excludes_commits_made_after_it_on_s3() {
    let Some(endpoint) = peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    timestamp_restore_excludes_later_commits(dir.path(), &|_| {
        let bucket = harness::new_bucket(&endpoint, "pitr-ms");
        harness::s3_env(&endpoint, &bucket, "keycast")
    });
}

/// An acknowledged object gone from the middle of the replica, with more than a pipeline's
/// worth of objects after it: `keycast replica accept-loss` recorded the newest TXID and said
/// "the next start restores that state", and the next start still stopped at the hole. It
/// now refuses, naming the hole and the way out.
#[test]
fn accept_loss_refuses_a_replica_with_a_hole_in_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let env = file_env(&replica);
    let server = launch(&dir.path().join("data"), &env)
        .env("KEYCAST_REPLICA_COMPACTION_LEVELS", "3600")
        .start();
    for n in 0..10 {
        server.write(&format!("w{n}"), true);
    }
    server.stop();
    let level0: Vec<std::path::PathBuf> = {
        let mut files: Vec<_> = std::fs::read_dir(replica.join("ltx").join("0"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    };
    assert!(level0.len() >= 10, "{level0:?}");
    let hole = &level0[level0.len() - 7];
    let kept = std::fs::read(hole).unwrap();
    std::fs::remove_file(hole).unwrap();

    let refused = cli(&["replica", "accept-loss"], &env);
    assert!(
        !refused.status.success(),
        "accepted a loss that leaves the replica unrestorable: {}",
        refused.stdout
    );
    assert!(
        refused.stderr.contains("gap after TXID") && refused.stderr.contains("--txid"),
        "{}",
        refused.stderr
    );

    // Nor one whose first object (the full image every restore starts from) is gone.
    std::fs::write(hole, kept).unwrap();
    std::fs::remove_file(&level0[0]).unwrap();
    let refused = cli(&["replica", "accept-loss"], &env);
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(refused.stderr.contains("no snapshot"), "{}", refused.stderr);
}

/// `accept-loss` gives up the TXIDs past the state it accepts, and the next writer writes
/// them again with other contents. A checksum a verification had recorded for the lost
/// history stayed, and refused the new history as corrupt: `restore --txid` of that TXID,
/// `replica verify` at it, and every start that restored to it.
#[test]
fn after_accept_loss_a_checksum_recorded_for_the_lost_history_refuses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let env = file_env(&replica);
    let quiet = |data: &str| launch(&dir.path().join(data), &env).env("KEYCAST_REPLICA_COMPACTION_LEVELS", "3600");
    let server = quiet("data").env("KEYCAST_REPLICA_VERIFY_INTERVAL_SECS", "1").start();
    for n in 0..5 {
        server.write(&format!("lost-{n}"), true);
    }
    let lineages = replica.join("keycast").join("checksum");
    let recorded = |lineages: &Path| -> Vec<u64> {
        std::fs::read_dir(lineages)
            .into_iter()
            .flatten()
            .flat_map(|lineage| std::fs::read_dir(lineage.unwrap().path()).unwrap())
            .filter_map(|record| {
                let name = record.unwrap().file_name().to_string_lossy().into_owned();
                u64::from_str_radix(name.strip_suffix(".json")?, 16).ok()
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorded(&lineages).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no checksum recorded; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop();
    let record = recorded(&lineages).into_iter().max().unwrap();

    // The level-0 objects of the last writes (the recorded TXID among them) are lost, and
    // the operator accepts it. (Each durable write is a level-0 object of its own; the first
    // object, the database's start, stays.)
    let level0 = replica.join("ltx").join("0");
    let ends = |level0: &Path| -> Vec<(u64, PathBuf)> {
        let mut ends: Vec<(u64, PathBuf)> = std::fs::read_dir(level0)
            .unwrap()
            .filter_map(|file| {
                let path = file.unwrap().path();
                let name = path.file_stem()?.to_string_lossy().into_owned();
                let max = u64::from_str_radix(name.split_once('-')?.1, 16).ok()?;
                Some((max, path))
            })
            .collect();
        ends.sort();
        ends
    };
    let before = ends(&level0);
    let first_lost = before
        .iter()
        .position(|(max, _)| *max >= record.saturating_sub(2))
        .unwrap();
    assert!(first_lost > 0, "TXID {record} is in the first object: {before:?}");
    for (_, path) in &before[first_lost..] {
        std::fs::remove_file(path).unwrap();
    }
    cli(&["replica", "accept-loss"], &env).assert_success("keycast replica accept-loss");

    // The next instance writes the same TXIDs again, other rows in them.
    let server = quiet("data-after").start();
    let mut n = 0;
    while replica_max_txid(&env) < record {
        server.write(&format!("new-{n}"), true);
        n += 1;
    }
    server.stop();
    assert!(
        ends(&level0).iter().any(|(max, _)| *max == record),
        "no object of the new history ends at TXID {record}: {:?}",
        ends(&level0)
    );

    restore(&dir.path().join("at-record.db"), &["--txid", &record.to_string()], &env);
    cli(&["replica", "verify"], &env).assert_success("keycast replica verify");
    let server = quiet("data-again").start();
    server.write("after", true);
    server.stop();
}
