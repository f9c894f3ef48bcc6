//! An instance that can no longer serve says so by exiting, so the platform starts a
//! replacement. Tokio keeps a process running when one of its tasks panics or returns:
//! before, a panicking replication worker left an instance that took writes nobody
//! shipped, a dead NIP-46 listener one that never answered a bunker again, and each kept
//! answering its liveness probe. Each task's `fail_point!` is armed through
//! `/api/test/failpoint` (the `failpoints` feature, which scripts/test.sh builds with).

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::flow::{grant, register};
use harness::{Engine, Keycast, Launch};

/// Waits for `server` to exit by itself, and checks it failed and said why.
fn assert_exits_saying(mut server: Keycast, why: &str) {
    let (status, _) = server.wait_exit(Duration::from_secs(30));
    let log = server.log();
    assert!(!status.success(), "keycast exited with {status}; log:\n{log}");
    assert!(log.contains(why), "the log does not say {why:?}:\n{log}");
}

/// The test rows in the replica at `replica`, restored to a scratch file.
fn replicated_keys(scratch: &Path, replica: &Path) -> Vec<String> {
    let out = scratch.join("restored.db");
    let _ = std::fs::remove_file(&out);
    let url = format!("file://{}", replica.display());
    harness::keycast_cli(
        &["restore", "-o", out.to_str().unwrap()],
        &[("KEYCAST_REPLICA_URL", url.as_str())],
    )
    .assert_success("keycast restore");
    assert_eq!(harness::integrity_check(&out), "ok");
    harness::test_keys(&out)
}

/// Whether it panics or returns an error it did not fence for, a replication worker that
/// ends while the instance serves fences it: writes are refused from then on, and the
/// instance exits non-zero. Every write acknowledged as durable before is in the replica.
#[test]
fn an_instance_whose_replication_worker_ends_exits_and_loses_no_durable_write() {
    for (actions, why) in [
        ("panic(injected)", "the replication worker panicked: injected"),
        ("return", "the replication worker stopped: the replicator has stopped"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let replica = dir.path().join("replica");
        let server = Launch::new(&dir.path().join("data"))
            .redeployable(&replica)
            .env("KEYCAST_TEST_ROUTES", "true")
            .start();
        for n in 0..3 {
            server.write(&format!("before-{n}"), true);
        }
        if !harness::arm_failpoint(&server, "replica-worker", actions) {
            return;
        }
        // A commit wakes the worker; what it answers does not matter here.
        let _ = server.post("/api/test/write?key=waking&durable=false");
        assert_exits_saying(server, why);
        let present = replicated_keys(dir.path(), &replica);
        for n in 0..3 {
            assert!(
                present.contains(&format!("before-{n}")),
                "{actions}: durable write before-{n} is not in the replica: {present:?}"
            );
        }
    }
}

/// The activity flusher writes what apps signed and sweeps expired sessions; without it
/// the record stops and memory grows. Its end is an exit, after the usual shutdown (which
/// flushes once more).
#[test]
fn an_instance_whose_activity_flusher_ends_exits() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    if !harness::arm_failpoint(&server, "activity-flusher", "return") {
        return;
    }
    assert_exits_saying(
        server,
        "the activity flusher returned; exiting so that the platform starts a replacement",
    );
}

/// Without the NIP-46 listener no bunker request is ever answered again, while HTTP (and
/// every probe) carries on. It panics at its next relay message: the one that confirms
/// the subscription of a new grant's bunker.
#[test]
fn an_instance_whose_nip46_listener_panics_exits() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    let (cookie, _) = register(&server, "vital@example.com", None);
    if !harness::arm_failpoint(&server, "nip46-listener", "panic(injected)") {
        return;
    }
    grant(&server, &cookie, "policy:social");
    assert_exits_saying(server, "the NIP-46 listener ended: task");
}

/// On PostgreSQL an instance whose heartbeat stopped is taken for dead by the others, which
/// answer its bunkers, while it would go on answering them too.
#[test]
fn an_instance_whose_heartbeat_panics_exits() {
    let dir = tempfile::tempdir().unwrap();
    if harness::engine::postgres_server().is_none() {
        return;
    }
    let server = Launch::on(Engine::Postgres, &dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    if !harness::arm_failpoint(&server, "cluster-heartbeat", "panic(injected)") {
        return;
    }
    assert_exits_saying(server, "the instance heartbeat ended: task");
}
