//! The replica under the schedules real platforms produce (issue 10), against the real binary
//! and a real S3 API (moto), with a proxy that misbehaves on purpose:
//! - two instances that share a host name and PID 1 (containers) hand over, not fence;
//! - an upload whose answer is lost after the store applied it does not fence its writer;
//! - a store that answers every request 2 s late slows writes down but fails none;
//! - three instances started at once end with exactly one writer and nothing lost;
//! - a newcomer that fails start-up after taking the lease gives the replica back;
//! - a split brain with an upload in flight never fences the rightful writer nor corrupts
//!   the replica.
//!
//! Each asserts the promise: no write acknowledged as durable is lost, the replica always
//! restores and passes `integrity_check`, and no instance sits alive but unable to write.

mod harness;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::s3proxy::{Fault, FaultyS3};
use harness::{Keycast, Launch};

/// The status of `POST url` (0 when the instance cannot be reached).
fn post(url: &str) -> u16 {
    harness::post(url).0
}

fn write(server: &Keycast, key: &str, durable: bool) -> u16 {
    post(&format!("{}/api/test/write?key={key}&durable={durable}", server.base))
}

/// A keycast on an S3 replica at `endpoint` (the proxy or moto itself), short lease.
fn launch(data: &Path, endpoint: &str, bucket: &str) -> Launch {
    harness::s3_env(endpoint, bucket, "kc")
        .iter()
        .fold(Launch::new(data), |l, (k, v)| l.env(k, v))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY)
        .env("KEYCAST_REPLICA_LEASE_TTL_SECS", "3")
        .env("KEYCAST_REPLICA_LEASE_WAIT_SECS", "60")
}

/// The test keys in the replica, restored the way an operator would (directly from moto),
/// after checking the restore passes `integrity_check`.
fn replicated(dir: &Path, endpoint: &str, bucket: &str) -> Vec<String> {
    let out = dir.join(format!("restored-{}.db", Instant::now().elapsed().as_nanos()));
    let env = harness::s3_env(endpoint, bucket, "kc");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    harness::keycast_cli(&["restore", "-o", out.to_str().unwrap()], &env).assert_success("keycast restore");
    assert_eq!(harness::integrity_check(&out), "ok", "the replica restores intact");
    harness::test_keys(&out)
}

fn assert_all_present(acknowledged: &[String], present: &[String]) {
    let lost: Vec<&String> = acknowledged.iter().filter(|k| !present.contains(k)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes are not in the replica, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// Writes `<prefix>-<n>` durably until stopped; returns the acknowledged keys.
fn writer(base: String, prefix: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let key = format!("{prefix}-{n:06}");
            match post(&format!("{base}/api/test/write?key={key}&durable=true")) {
                200 => acked.push(key),
                0 => break,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        acked
    })
}

fn s3() -> Option<String> {
    harness::peer("KEYCAST_TEST_S3_ENDPOINT")
}

/// Containers: every instance is PID 1, and several call themselves `localhost`. The second
/// instance must ask the first to hand over — not take its live lease as its own, which
/// fenced the first and made the second exit: an outage of both revisions.
#[test]
fn two_instances_named_alike_hand_over_instead_of_fencing() {
    let Some(endpoint) = s3() else { return };
    let bucket = harness::new_bucket(&endpoint, "samename");
    let dir = tempfile::tempdir().unwrap();
    let mut a = launch(&dir.path().join("a"), &endpoint, &bucket)
        .in_namespaces("localhost")
        .start();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(a.base.clone(), "a", stop.clone());
    std::thread::sleep(Duration::from_secs(2));

    let mut b = launch(&dir.path().join("b"), &endpoint, &bucket)
        .in_namespaces("localhost")
        .spawn_started_later();
    b.wait_started(Duration::from_secs(40));
    let b = b.into_keycast();
    stop.store(true, Ordering::Relaxed);
    let acked = writes.join().unwrap();
    assert!(
        acked.len() >= 5,
        "A served durable writes before the hand-over: {acked:?}"
    );
    assert!(
        a.log().contains("handed the replica over"),
        "A handed over; log:\n{}",
        a.log()
    );
    assert!(
        !a.log().contains("this instance is fenced"),
        "A was never fenced; log:\n{}",
        a.log()
    );
    assert!(
        !b.log().contains("this instance is fenced"),
        "B was never fenced; log:\n{}",
        b.log()
    );
    assert_eq!(write(&b, "b-000", true), 200, "B serves writes");
    a.signal(libc::SIGTERM);
    let (exit, _) = a.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "A exits cleanly; log:\n{}", a.log());
    b.stop();
    let present = replicated(dir.path(), &endpoint, &bucket);
    assert_all_present(&acked, &present);
    assert!(present.contains(&"b-000".to_owned()));
}

/// The store applies an upload but its answer is lost: the retry finds the key taken — by
/// itself. Reading the object back shows its own bytes, so the writer goes on.
#[test]
fn an_upload_whose_answer_is_lost_does_not_fence_its_writer() {
    let Some(endpoint) = s3() else { return };
    let proxy = FaultyS3::start(&endpoint);
    let bucket = harness::new_bucket(&endpoint, "lostanswer");
    let dir = tempfile::tempdir().unwrap();
    let server = launch(&dir.path().join("data"), &proxy.endpoint(), &bucket).start();
    let mut acked = Vec::new();
    for n in 0..3 {
        let key = format!("before-{n}");
        assert_eq!(write(&server, &key, true), 200);
        acked.push(key);
    }
    proxy.add("PUT", ".ltx", Fault::LoseAnswer, 1);
    for n in 0..5 {
        let key = format!("after-{n}");
        assert_eq!(
            write(&server, &key, true),
            200,
            "write {key} after a lost answer; log:\n{}",
            server.log()
        );
        acked.push(key);
    }
    assert_eq!(proxy.faulted(), 1, "the answer of one upload was lost");
    assert_eq!(server.get("/healthz/ready").0, 200);
    assert_eq!(server.get("/healthz/live").0, 200);
    assert!(
        server.log().contains("answer was lost"),
        "the log says what happened; log:\n{}",
        server.log()
    );
    server.stop();
    assert_all_present(&acked, &replicated(dir.path(), &endpoint, &bucket));
}

/// A store that answers every request 2 s late: async writes keep succeeding at once, durable
/// writes wait and then succeed, and no write fails because the replicator held SQLite's
/// write lock across an upload (checkpoints run often here, to prove it).
#[test]
fn a_store_two_seconds_late_slows_durable_writes_but_fails_none() {
    let Some(endpoint) = s3() else { return };
    let proxy = FaultyS3::start(&endpoint);
    let bucket = harness::new_bucket(&endpoint, "slowstore");
    let dir = tempfile::tempdir().unwrap();
    let server = launch(&dir.path().join("data"), &proxy.endpoint(), &bucket)
        .env("KEYCAST_REPLICA_LEASE_TTL_SECS", "15")
        .env("KEYCAST_REPLICA_CHECKPOINT_PAGES", "8")
        .env("KEYCAST_REPLICA_DURABLE_TIMEOUT_SECS", "20")
        .start();
    proxy.set_delay(Duration::from_secs(2));
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Async writes from one thread, durable writes from another, for 25 s.
    let base = server.base.clone();
    let async_writes = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("async-{n:05}");
                let started = Instant::now();
                let status = post(&format!("{base}/api/test/write?key={key}&durable=false"));
                statuses.push((key, status, started.elapsed()));
                std::thread::sleep(Duration::from_millis(25));
            }
            statuses
        })
    };
    let mut durable = Vec::new();
    while started.elapsed() < Duration::from_secs(25) {
        let key = format!("durable-{:03}", durable.len());
        let (status, body) = harness::post(&format!("{}/api/test/write?key={key}&durable=true", server.base));
        assert_eq!(
            status,
            200,
            "durable write {key} waits and succeeds: {body}; log:\n{}",
            server.log()
        );
        durable.push(key);
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = async_writes.join().unwrap();
    let failed: Vec<_> = statuses.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "every async write succeeds: {failed:?}\nlog:\n{}",
        server.log()
    );
    let slowest = statuses.iter().map(|(_, _, t)| *t).max().unwrap();
    assert!(
        slowest < Duration::from_secs(4),
        "async writes never wait for a 2 s store behind SQLite's lock: slowest {slowest:?}"
    );
    let metrics = server.get("/metrics").1;
    assert!(
        harness::metric_sum(&metrics, "keycast_replica_checkpoints_total") >= 1.0,
        "checkpoints ran during the test"
    );
    assert!(!server.log().contains("database is locked"), "log:\n{}", server.log());
    proxy.set_delay(Duration::ZERO);
    server.stop();
    let mut acked = durable;
    acked.extend(statuses.into_iter().map(|(k, _, _)| k));
    assert_all_present(&acked, &replicated(dir.path(), &endpoint, &bucket));
}

/// Three instances started at the same moment (max-instances > 1, or a deploy racing a
/// restart): they hand the replica on until exactly one writes. An instance asked for the
/// replica before it started serving hands it over and exits non-zero without ever reporting
/// itself started (so no traffic reaches an instance that refuses everything; the platform
/// starts another if it wants one); one asked after it served stays, refusing writes as
/// handed over. None is fenced, and nothing acknowledged is lost.
#[test]
fn three_instances_started_at_once_end_with_one_writer() {
    let Some(endpoint) = s3() else { return };
    let bucket = harness::new_bucket(&endpoint, "three");
    let dir = tempfile::tempdir().unwrap();
    let starting: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| launch(&dir.path().join(name), &endpoint, &bucket).spawn_started_later())
        .collect();
    let mut servers: Vec<Keycast> = starting.into_iter().map(|s| s.into_keycast()).collect();
    // Each either reports itself started or exits (displaced before it served).
    let deadline = Instant::now() + Duration::from_secs(90);
    while !servers
        .iter()
        .all(|s| s.has_exited() || s.get("/healthz/startup").0 == 200)
    {
        assert!(Instant::now() < deadline, "an instance neither started nor exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut live, mut gone): (Vec<Keycast>, Vec<Keycast>) = servers.drain(..).partition(|s| !s.has_exited());
    for server in &mut gone {
        let (status, _) = server.wait_exit(Duration::from_secs(10));
        assert!(!status.success(), "{}", server.log());
        assert!(
            server.log().contains("before this one started serving"),
            "a displaced instance says why: {}",
            server.log()
        );
    }
    assert!(!live.is_empty(), "one instance serves");
    // Whoever the writer is, probing it twice must be consistent; the others refuse.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (writers, acked) = loop {
        let mut writers = Vec::new();
        let mut acked = Vec::new();
        for (i, server) in live.iter().enumerate() {
            let key = format!("probe-{i}-{}", Instant::now().elapsed().as_nanos());
            if write(server, &key, true) == 200 {
                writers.push(i);
                acked.push(key);
            }
        }
        if writers.len() == 1 || Instant::now() > deadline {
            break (writers, acked);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(writers.len(), 1, "exactly one instance writes: {writers:?}");
    for (i, server) in live.iter().chain(gone.iter()).enumerate() {
        assert!(
            !server.log().contains("this instance is fenced"),
            "instance {i} was never fenced; log:\n{}",
            server.log()
        );
    }
    for server in &live {
        assert_eq!(server.get("/healthz/live").0, 200, "a started instance is alive");
    }
    for server in live.drain(..) {
        server.stop();
    }
    assert_all_present(&acked, &replicated(dir.path(), &endpoint, &bucket));
}

/// A deploy that fails after taking the lease (here: a wrong master key, found after the
/// restore) must not leave the old instance refusing writes for good: the newcomer gives the
/// lease back, and the old instance takes the replica back and serves writes again.
#[test]
fn a_newcomer_that_fails_start_up_gives_the_replica_back() {
    let Some(endpoint) = s3() else { return };
    let bucket = harness::new_bucket(&endpoint, "faileddeploy");
    let dir = tempfile::tempdir().unwrap();
    let a = launch(&dir.path().join("a"), &endpoint, &bucket).start();
    // A key must exist for the master key to be checked against.
    harness::flow::register(&a, "old@example.org", None);
    let mut acked = Vec::new();
    for n in 0..3 {
        let key = format!("a-{n}");
        assert_eq!(write(&a, &key, true), 200);
        acked.push(key);
    }
    let wrong_key = "HxoZGBcWFRQTEhEQDw4NDAsKCQgHBgUEAwIBAP8AAQI=";
    let b = launch(&dir.path().join("b"), &endpoint, &bucket)
        .env("KEYCAST_MASTER_KEY", wrong_key)
        .start_or_exit();
    let refused = match b {
        Ok(b) => panic!("B must not start with the wrong master key; log:\n{}", b.log()),
        Err(finished) => finished,
    };
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("KEYCAST_MASTER_KEY"),
        "B names the bad setting: {}",
        refused.stderr
    );
    // A, idle, let its lease lapse to B and stepped aside; once B gave the lease back, A takes
    // the replica back and serves writes again.
    let started = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let key = format!("a-after-{n}");
        if write(&a, &key, true) == 200 {
            acked.push(key);
            if a.log().contains("taking it back") {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "A never served writes again; log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !a.log().contains("this instance is fenced"),
        "nothing was lost, so A was not fenced; log:\n{}",
        a.log()
    );
    assert_eq!(a.get("/healthz/ready").0, 200);
    a.stop();
    assert_all_present(&acked, &replicated(dir.path(), &endpoint, &bucket));
}

/// A split brain with an upload in flight: A's upload is stuck in the network while A is
/// paused past its lease; B takes over; then A's stale upload lands at the TXID B is about to
/// use. B must not be fenced by it (A never acknowledged it), the replica must never mix the
/// two histories, and A, waking, must make way.
#[test]
fn a_stale_upload_landing_after_a_takeover_never_fences_the_new_writer() {
    let Some(endpoint) = s3() else { return };
    let proxy = FaultyS3::start(&endpoint);
    let bucket = harness::new_bucket(&endpoint, "splitbrain");
    let dir = tempfile::tempdir().unwrap();
    let mut a = launch(&dir.path().join("a"), &proxy.endpoint(), &bucket).start();
    let mut acked = Vec::new();
    for n in 0..5 {
        let key = format!("a-{n}");
        assert_eq!(write(&a, &key, true), 200);
        acked.push(key);
    }
    // A's next upload is held in the network; A is then paused past its lease.
    proxy.add("PUT", ".ltx", Fault::Hold, 1);
    let stale = {
        let base = a.base.clone();
        std::thread::spawn(move || post(&format!("{base}/api/test/write?key=a-stale&durable=true")))
    };
    proxy.wait_holding(Duration::from_secs(10));
    a.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(5));
    let b = launch(&dir.path().join("b"), &endpoint, &bucket).start();
    // The stale upload lands now, at the TXID B will use next.
    proxy.release();
    proxy.wait_faulted(1, Duration::from_secs(10));
    for n in 0..5 {
        let key = format!("b-{n}");
        assert_eq!(
            write(&b, &key, true),
            200,
            "B writes over the stale object; log:\n{}",
            b.log()
        );
        acked.push(key);
    }
    assert!(
        !b.log().contains("this instance is fenced"),
        "B was not fenced; log:\n{}",
        b.log()
    );
    assert_eq!(b.get("/healthz/ready").0, 200);
    a.signal(libc::SIGCONT);
    assert_ne!(stale.join().unwrap(), 200, "A never acknowledged the stale write");
    let (exit, _) = a.wait_exit(Duration::from_secs(15));
    assert!(!exit.success(), "A, fenced, exits non-zero; log:\n{}", a.log());
    b.stop();
    let present = replicated(dir.path(), &endpoint, &bucket);
    assert_all_present(&acked, &present);
    assert!(
        !present.contains(&"a-stale".to_owned()),
        "the stale write is not in the replica"
    );
}

/// SIGTERM with a request that outlives the grace period: the request is cut off, but the
/// time kept back for the final sync is used — everything committed ships, the lease is
/// released (so the next instance starts at once instead of waiting for it to lapse), and
/// the exit status still says the shutdown was not clean.
#[test]
fn a_request_outliving_the_grace_period_does_not_cost_the_final_sync() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch = |data: &str| {
        Launch::new(&dir.path().join(data))
            .env("KEYCAST_TEST_ROUTES", "true")
            .env("KEYCAST_REPLICA_URL", &replica)
            .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY)
            .env("KEYCAST_REPLICA_LEASE_TTL_SECS", "120")
            .env("KEYCAST_REPLICA_LEASE_WAIT_SECS", "20")
            .env("KEYCAST_SHUTDOWN_GRACE_SECS", "2")
    };
    let mut a = launch("a").start();
    assert_eq!(write(&a, "before-sigterm", false), 200);
    let url = format!("{}/api/test/slow?ms=20000", a.base);
    std::thread::spawn(move || harness::request(&url));
    std::thread::sleep(Duration::from_millis(300));
    a.signal(libc::SIGTERM);
    let (exit, took) = a.wait_exit(Duration::from_secs(10));
    assert!(
        !exit.success(),
        "a cut-off request is an unclean exit; log:\n{}",
        a.log()
    );
    assert!(took < Duration::from_secs(4), "within the grace period: {took:?}");
    assert!(
        a.log().contains("released the replica lease"),
        "the lease was released; log:\n{}",
        a.log()
    );
    let started = Instant::now();
    let b = launch("b").start();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the next instance did not wait for a 120 s lease to lapse"
    );
    let keys = harness::test_keys(&b.data_dir.join("keycast.db"));
    assert!(keys.contains(&"before-sigterm".to_owned()), "{keys:?}");
    b.stop();
}

/// Someone deletes the newest objects of the replica. Restoring "the latest state" would
/// quietly be an older one, undoing acknowledged writes: both `keycast restore` and a
/// starting `keycast serve` refuse, naming the way out.
#[test]
fn a_replica_missing_its_newest_objects_is_refused_not_restored_silently() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let launch = |data: &str| on_file_replica(&dir.path().join(data), &replica);
    let a = launch("a").start();
    for n in 0..3 {
        assert_eq!(write(&a, &format!("k{n}"), true), 200);
    }
    a.stop();
    let max = delete_newest(&replica_dir);
    let out = dir.path().join("out.db");
    let refused = harness::keycast_cli(&["restore", "--replica", &replica, "-o", out.to_str().unwrap()], &[]);
    assert!(!refused.status.success(), "restore refuses: {}", refused.stdout);
    assert!(
        refused.stderr.contains("newest objects are missing") && refused.stderr.contains("--txid"),
        "{}",
        refused.stderr
    );
    assert!(!out.exists(), "nothing was written");
    let older = format!("{}", max - 1);
    harness::keycast_cli(
        &[
            "restore",
            "--replica",
            &replica,
            "--txid",
            &older,
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    )
    .assert_success("restoring the older state knowingly");
    let refused = launch("b").start_or_exit();
    let finished = match refused {
        Ok(b) => panic!("serve must refuse a truncated replica; log:\n{}", b.log()),
        Err(finished) => finished,
    };
    assert!(
        finished.stderr.contains("keycast/lease.json"),
        "serve names the way out: {}",
        finished.stderr
    );
}

/// keycast on `data`, replicating to `replica` (a `file://` URL), with the test routes.
fn on_file_replica(data: &std::path::Path, replica: &str) -> Launch {
    Launch::new(data)
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_URL", replica)
        .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY)
}

/// Deletes the files of a `file://` replica's newest TXID, at every level; returns that TXID.
fn delete_newest(replica_dir: &std::path::Path) -> u64 {
    let mut newest: Option<(u64, Vec<std::path::PathBuf>)> = None;
    for level in std::fs::read_dir(replica_dir.join("ltx")).unwrap() {
        for file in std::fs::read_dir(level.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let max = u64::from_str_radix(name.split('-').nth(1).unwrap(), 16).unwrap();
            match &mut newest {
                Some((m, files)) if *m == max => files.push(path),
                Some((m, _)) if *m > max => {}
                _ => newest = Some((max, vec![path])),
            }
        }
    }
    let (max, files) = newest.unwrap();
    for file in files {
        std::fs::remove_file(file).unwrap();
    }
    max
}

/// Whoever can write the bucket but has no replica key deletes the newest objects and
/// lowers the lease's high-water mark to match, or removes the lease: the replica then looks
/// whole at an older state — a revoked grant live again, an old password back. On an
/// encrypted replica the mark carries a MAC and every object keycast writes says so, so
/// `serve` and `restore` refuse a mark without a valid MAC; `keycast replica accept-loss`
/// takes the older state knowingly.
#[test]
fn an_encrypted_replica_rolled_back_by_whoever_holds_the_bucket_is_refused() {
    const KEY: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let launch =
        |data: &str| on_file_replica(&dir.path().join(data), &replica).env("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY);
    let with_key = [("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY)];
    let a = launch("a").start();
    for n in 0..3 {
        assert_eq!(write(&a, &format!("k{n}"), true), 200);
    }
    a.stop();

    let max = delete_newest(&replica_dir);
    let lease_path = replica_dir.join("keycast/lease.json");
    let mut lease: serde_json::Value = serde_json::from_slice(&std::fs::read(&lease_path).unwrap()).unwrap();
    assert!(lease["txid"].as_u64().unwrap() >= max, "{lease}");
    lease["txid"] = (max - 1).into();
    std::fs::write(&lease_path, lease.to_string()).unwrap();

    let out = dir.path().join("out.db");
    let refused = harness::keycast_cli(
        &["restore", "--replica", &replica, "-o", out.to_str().unwrap()],
        &with_key,
    );
    assert!(
        !refused.status.success(),
        "restore refuses the lowered mark: {}",
        refused.stdout
    );
    assert!(refused.stderr.contains("no valid MAC"), "{}", refused.stderr);
    assert!(!out.exists(), "nothing was written");
    for (attempt, lease) in [
        ("a lowered mark", Some(lease.to_string())),
        ("a mark with a made-up MAC", {
            lease["txid_mac"] = "bm90IGEgcmVhbCBtYWMsIGp1c3QgMzIgYnl0ZXMhISE=".into();
            Some(lease.to_string())
        }),
        ("no lease at all", None),
    ] {
        match lease {
            Some(lease) => std::fs::write(&lease_path, lease).unwrap(),
            None => std::fs::remove_file(&lease_path).unwrap(),
        }
        let finished = match launch(&format!("b-{}", attempt.len())).start_or_exit() {
            Ok(b) => panic!("serve restored {attempt}; log:\n{}", b.log()),
            Err(finished) => finished,
        };
        assert!(
            finished.stderr.contains("no valid MAC") && finished.stderr.contains("keycast replica accept-loss"),
            "{attempt}: {}",
            finished.stderr
        );
    }

    // Under another key the mark would not be believed: refused, naming the variable.
    let wrong_key = [(
        "KEYCAST_REPLICA_ENCRYPTION_KEY",
        "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=",
    )];
    let refused = harness::keycast_cli(&["replica", "accept-loss", "--replica", &replica], &wrong_key);
    assert!(
        !refused.status.success() && refused.stderr.contains("KEYCAST_REPLICA_ENCRYPTION_KEY"),
        "{}",
        refused.stderr
    );
    harness::keycast_cli(&["replica", "accept-loss", "--replica", &replica], &with_key)
        .assert_success("accepting the loss knowingly");
    let c = launch("c").start();
    let keys = harness::test_keys(&c.data_dir.join("keycast.db"));
    assert!(
        keys.contains(&"k0".to_owned()) && keys.contains(&"k1".to_owned()),
        "{keys:?}"
    );
    c.stop();
}

/// Whoever can write the bucket, without the replica key, moves the stored time of the files
/// written after some moment (their timestamp metadata; in a directory replica their mtime)
/// to before it. A `--timestamp` restore to that moment chose files by the stored time alone
/// and so brought back commits made after it, silently. Now the time in each applied file's
/// header, which its checksum and tag cover, is compared with the target: the restore is
/// refused, naming the file, and nothing is written.
#[test]
fn a_timestamp_restore_refuses_files_whose_stored_time_was_moved_before_it() {
    const KEY: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let replica = format!("file://{}", replica_dir.display());
    let with_key = [("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY)];
    let a = on_file_replica(&dir.path().join("a"), &replica)
        .env("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY)
        .start();
    assert_eq!(write(&a, "early", true), 200);
    // Time on each side of the moment restored to: the files' times are in milliseconds, and
    // the check allows a header a second past it (a stored time in whole seconds).
    std::thread::sleep(Duration::from_millis(600));
    let moment = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(write(&a, "late", true), 200);
    a.stop();
    let stamp = chrono::DateTime::<chrono::Utc>::from(moment).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let restore = |name: &str| {
        let out = dir.path().join(name);
        let finished = harness::keycast_cli(
            &[
                "restore",
                "--replica",
                &replica,
                "-o",
                out.to_str().unwrap(),
                "--timestamp",
                &stamp,
            ],
            &with_key,
        );
        (out, finished)
    };

    // Untouched, the restore holds what was written before the moment and nothing after.
    let (out, finished) = restore("untouched.db");
    finished.assert_success("keycast restore --timestamp");
    let keys = harness::test_keys(&out);
    assert!(
        keys.contains(&"early".to_owned()) && !keys.contains(&"late".to_owned()),
        "{keys:?}"
    );

    let mut moved = Vec::new();
    for level in std::fs::read_dir(replica_dir.join("ltx")).unwrap() {
        for file in std::fs::read_dir(level.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
            if modified >= moment {
                let file = std::fs::File::options().write(true).open(&path).unwrap();
                file.set_modified(moment - Duration::from_millis(500)).unwrap();
                moved.push(path);
            }
        }
    }
    assert!(!moved.is_empty(), "the late write made files after the moment");

    let (out, refused) = restore("moved.db");
    assert!(
        !refused.status.success(),
        "the restore took files written after {stamp}: {:?}",
        refused.status.success().then(|| harness::test_keys(&out))
    );
    assert!(
        refused.stderr.contains("its header says it was written at") && refused.stderr.contains("--txid"),
        "the refusal says what is wrong and what to do instead: {}",
        refused.stderr
    );
    assert!(
        moved
            .iter()
            .any(|path| refused.stderr.contains(path.file_name().unwrap().to_str().unwrap())),
        "the refusal names the file: {}",
        refused.stderr
    );
    assert!(!out.exists(), "nothing was written");
}

/// A deploy's newcomer stopped once its restore is done, while replication starts (its
/// first listing of the replica, through a store that now takes 1.5 s a request). It lets
/// start-up finish and stops cleanly, giving the lease back. Before, it was cut off two seconds after the
/// SIGTERM and exited 0 holding the lease, so the next instance waited for it to lapse.
#[test]
fn an_instance_stopped_while_replication_starts_gives_the_lease_back() {
    let Some(endpoint) = s3() else { return };
    let bucket = harness::new_bucket(&endpoint, "stopped-starting");
    let dir = tempfile::tempdir().unwrap();
    let long_lease = |l: Launch| {
        l.env("KEYCAST_REPLICA_LEASE_TTL_SECS", "60")
            .env("KEYCAST_SHUTDOWN_GRACE_SECS", "20")
    };
    let first = long_lease(launch(&dir.path().join("a"), &endpoint, &bucket)).start();
    for n in 0..5 {
        assert_eq!(write(&first, &format!("k{n}"), true), 200);
    }
    first.stop();

    let proxy = FaultyS3::start(&endpoint);
    let mut starting = long_lease(launch(&dir.path().join("b"), &proxy.endpoint(), &bucket))
        .spawn_started_later()
        .into_keycast();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !starting.log().contains("restored the database from the replica") {
        assert!(Instant::now() < deadline, "{}", starting.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.set_delay(Duration::from_millis(1500));
    starting.signal(libc::SIGTERM);
    let (_, took) = starting.wait_exit(Duration::from_secs(30));
    assert!(
        took < Duration::from_secs(20),
        "stopped within the grace period: {took:?}"
    );
    assert!(
        starting.log().contains("released the replica lease"),
        "{}",
        starting.log()
    );

    starts_at_once(long_lease(launch(&dir.path().join("c"), &endpoint, &bucket)), "k4");
}

/// A deploy whose newcomer is stopped while it restores (the deploy cancelled, its startup
/// probe given up): it has taken the replica's lease, and gives it back before it exits.
/// Before, it exited holding it, and the next instance (or the old one taking the replica
/// back) waited for it to lapse.
#[test]
fn an_instance_stopped_while_it_restores_gives_the_lease_back() {
    let Some(endpoint) = s3() else { return };
    let bucket = harness::new_bucket(&endpoint, "stopped-restoring");
    let dir = tempfile::tempdir().unwrap();
    let long_lease = |l: Launch| l.env("KEYCAST_REPLICA_LEASE_TTL_SECS", "60");
    let first = long_lease(launch(&dir.path().join("a"), &endpoint, &bucket)).start();
    for n in 0..20 {
        assert_eq!(write(&first, &format!("k{n}"), true), 200);
    }
    first.stop();

    // The newcomer restores through a store that answers slowly, and is stopped meanwhile.
    let proxy = FaultyS3::start(&endpoint);
    proxy.set_delay(Duration::from_millis(300));
    let mut restoring = long_lease(launch(&dir.path().join("b"), &proxy.endpoint(), &bucket))
        .spawn_started_later()
        .into_keycast();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !restoring.log().contains("restoring the database from the replica") {
        assert!(Instant::now() < deadline, "{}", restoring.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    restoring.signal(libc::SIGTERM);
    let (_, took) = restoring.wait_exit(Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "stopped at once: {took:?}");
    assert!(
        restoring.log().contains("released the replica lease"),
        "{}",
        restoring.log()
    );

    starts_at_once(long_lease(launch(&dir.path().join("c"), &endpoint, &bucket)), "k19");
}

/// The instance started after a newcomer gave the lease back: it does not wait for the
/// 60 s lease to lapse, and serves what was written (`last` among it).
fn starts_at_once(next: Launch, last: &str) {
    let started = Instant::now();
    let next = next.start();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the next instance did not wait for a 60 s lease to lapse: {:?}",
        started.elapsed()
    );
    assert!(harness::test_keys(&next.data_dir.join("keycast.db")).contains(&last.to_owned()));
}
