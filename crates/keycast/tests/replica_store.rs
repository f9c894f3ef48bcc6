//! The replica store is checked before keycast writes to it: a store that ignores
//! conditional writes (some S3-compatible servers accept `If-None-Match` / `If-Match` and
//! overwrite anyway) would let a second instance overwrite the replica and would make the
//! single-writer lease fence nobody off. keycast refuses to start on such a store, naming it
//! and the setting that overrides the check. The bad store is moto behind a proxy that
//! drops those headers.

mod harness;

use std::time::Duration;

use harness::proxy::HeaderStrippingProxy;
use harness::{keycast_cli, Finished, Launch};

/// keycast on `data` replicating to `s3://<bucket>/keycast` through `endpoint`.
fn launch(data: &std::path::Path, endpoint: &str, bucket: &str) -> Launch {
    harness::s3_env(endpoint, bucket, "keycast")
        .iter()
        .fold(Launch::new(data).env("KEYCAST_TEST_ROUTES", "true"), |l, (k, v)| {
            l.env(k, v)
        })
}

/// The LTX files in the replica, read straight from moto (not through the proxy).
fn replica_files(endpoint: &str, bucket: &str) -> usize {
    let env = harness::s3_env(endpoint, bucket, "keycast");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = keycast_cli(&["replica", "ls", "--json"], &env);
    out.assert_success("keycast replica ls --json");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    doc["files"].as_array().unwrap().len()
}

fn assert_refused(finished: &Finished, bucket: &str, header: &str) {
    assert!(
        !finished.status.success(),
        "keycast must refuse to start: {}",
        finished.stderr
    );
    for needle in [
        &format!("s3://{bucket}/keycast") as &str,
        header,
        "KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES=false",
    ] {
        assert!(
            finished.stderr.contains(needle),
            "the error names {needle:?}:\n{}",
            finished.stderr
        );
    }
}

#[test]
fn a_store_that_ignores_create_only_writes_is_refused_at_start() {
    let Some(moto) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&moto, "ignores-if-none-match");
    let proxy = HeaderStrippingProxy::start(&moto, &["If-None-Match", "If-Match"]);
    let dir = tempfile::tempdir().unwrap();
    let finished = launch(&dir.path().join("data"), &proxy.url, &bucket).run_to_exit(Duration::from_secs(60));
    assert_refused(&finished, &bucket, "If-None-Match");
    assert_eq!(replica_files(&moto, &bucket), 0, "nothing was replicated");
}

/// A store that honours `If-None-Match` on a plain upload but not where a multipart upload
/// completes: objects over 8 MiB (full images, snapshots, large compactions) are written in
/// parts and copied into place create-only, so there a stale writer could overwrite. Before,
/// the check tried plain uploads only and let keycast start.
#[test]
fn a_store_that_ignores_create_only_on_large_objects_is_refused_at_start() {
    let Some(moto) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&moto, "ignores-on-completion");
    let proxy = HeaderStrippingProxy::start_when(&moto, &["If-None-Match"], "uploadId=");
    let dir = tempfile::tempdir().unwrap();
    let finished = launch(&dir.path().join("data"), &proxy.url, &bucket).run_to_exit(Duration::from_secs(60));
    assert_refused(&finished, &bucket, "If-None-Match");
    assert!(finished.stderr.contains("8 MiB"), "{}", finished.stderr);
    assert_eq!(replica_files(&moto, &bucket), 0, "nothing was replicated");
}

#[test]
fn a_store_that_ignores_compare_and_swap_is_refused_at_start() {
    let Some(moto) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&moto, "ignores-if-match");
    let proxy = HeaderStrippingProxy::start(&moto, &["If-Match"]);
    let dir = tempfile::tempdir().unwrap();
    let finished = launch(&dir.path().join("data"), &proxy.url, &bucket).run_to_exit(Duration::from_secs(60));
    assert_refused(&finished, &bucket, "If-Match");
    assert!(
        !finished.stderr.contains("ignores If-None-Match"),
        "{}",
        finished.stderr
    );
}

/// The override works, and shows what the check prevents: without it keycast starts and
/// replicates to a store that cannot fence a second writer.
#[test]
fn the_check_can_be_switched_off_and_keycast_then_serves_on_such_a_store() {
    let Some(moto) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&moto, "check-off");
    let proxy = HeaderStrippingProxy::start(&moto, &["If-None-Match", "If-Match"]);
    let dir = tempfile::tempdir().unwrap();
    let server = launch(&dir.path().join("data"), &proxy.url, &bucket)
        .env("KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES", "false")
        .start();
    server.write("k1", true);
    let log = server.stop();
    assert!(
        log.contains("KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES=false"),
        "the skipped check is logged: {log}"
    );
    assert!(replica_files(&moto, &bucket) > 0, "it replicated");
}

/// A store that honours conditional writes passes the check (moto itself, and the other
/// backends in every other replication test).
#[test]
fn a_store_that_honours_conditional_writes_passes_the_check() {
    let Some(moto) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&moto, "honours");
    let dir = tempfile::tempdir().unwrap();
    let server = launch(&dir.path().join("data"), &moto, &bucket).start();
    server.write("k1", true);
    server.stop();
}
