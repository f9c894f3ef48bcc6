//! Replication failures are visible: readiness turns 503 with the reason once uploads have
//! failed longer than the threshold, durable writes are refused (never falsely acknowledged),
//! and everything catches up once the store works again.

mod harness;

use harness::CommandExt as _;

use std::time::{Duration, Instant};

use harness::Launch;

fn post(url: &str) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    match agent.post(url).send_empty() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

/// Polls `/healthz/ready` (running `between` after each 200) until it answers 503 within
/// `timeout`; returns the reason it gave.
fn not_ready_within(server: &harness::Keycast, timeout: Duration, mut between: impl FnMut()) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = server.get_json("/healthz/ready");
        if status == 503 {
            return body;
        }
        assert!(Instant::now() < deadline, "readiness never turned 503: {body}");
        between();
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn failing_uploads_turn_readiness_503_and_refuse_durable_writes_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display()))
        .env("KEYCAST_REPLICA_UNHEALTHY_AFTER_SECS", "1")
        .start();
    assert_eq!(
        post(&format!("{}/api/test/write?key=before&durable=true", server.base)).0,
        200
    );

    // Break the store: level 0 becomes a plain file, so no LTX file can be created under it.
    let level0 = replica.join("ltx/0");
    std::fs::rename(&level0, dir.path().join("level0-aside")).unwrap();
    std::fs::write(&level0, b"not a directory").unwrap();

    let (status, body) = post(&format!("{}/api/test/write?key=during&durable=true", server.base));
    assert_eq!(status, 503, "a durable write is refused while the store fails: {body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["message"].as_str().unwrap().contains("not confirmed durable"),
        "{body}"
    );

    let reason = not_ready_within(&server, Duration::from_secs(10), || {});
    assert!(
        reason["message"]
            .as_str()
            .unwrap()
            .contains("replication has been failing"),
        "{reason}"
    );
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keycast_replica_failing") && l.ends_with(" 1")),
        "{metrics}"
    );

    // Repair: the pending commit ships, readiness recovers, durable writes work again.
    std::fs::remove_file(&level0).unwrap();
    std::fs::rename(dir.path().join("level0-aside"), &level0).unwrap();
    server.wait_for_status("/healthz/ready", 200, Duration::from_secs(15));
    assert_eq!(
        post(&format!("{}/api/test/write?key=after&durable=true", server.base)).0,
        200
    );
    server.stop();

    let restored = dir.path().join("restored.db");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keycast"))
        .args(["restore", "--replica", &format!("file://{}", replica.display()), "-o"])
        .arg(&restored)
        .output_within(harness::COMMAND_TIMEOUT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = std::process::Command::new("sqlite3")
        .arg(&restored)
        .arg("SELECT key FROM keycast_meta WHERE key LIKE 'test:%' ORDER BY key")
        .output_within(harness::COMMAND_TIMEOUT);
    assert_eq!(
        String::from_utf8_lossy(&rows.stdout),
        "test:after\ntest:before\ntest:during\n"
    );
}

/// keycast on an S3 replica (moto) reached through a link the test can silence, with a
/// 2 s lease and `env`; `None` without moto.
fn behind_a_silent_link(
    hint: &str,
    env: &[(&str, &str)],
) -> Option<(tempfile::TempDir, harness::link::SilentLink, harness::Keycast)> {
    let endpoint = harness::peer("KEYCAST_TEST_S3_ENDPOINT")?;
    let bucket = harness::new_bucket(&endpoint, hint);
    let link = harness::link::SilentLink::start(endpoint.trim_start_matches("http://").to_owned());
    let dir = tempfile::tempdir().unwrap();
    let launch = harness::s3_env(&format!("http://127.0.0.1:{}", link.port), &bucket, "kc")
        .iter()
        .fold(Launch::new(&dir.path().join("data")), |l, (k, v)| l.env(k, v))
        .env("KEYCAST_REPLICA_LEASE_TTL_SECS", "2");
    let server = env.iter().fold(launch, |l, (k, v)| l.env(k, v)).start();
    Some((dir, link, server))
}

/// A store that stops answering just as the instance is told to stop: the exit must come
/// within the grace period (plus the moment the lease's release gets), saying what is left
/// unshipped, before the platform's SIGKILL. Before, the final sync's upload waited out the
/// store client's own timeout (30 s), and Cloud Run killed the process without a word at 10.
#[test]
fn a_store_that_stops_answering_does_not_hold_shutdown_past_the_grace_period() {
    let env = [("KEYCAST_TEST_ROUTES", "true"), ("KEYCAST_SHUTDOWN_GRACE_SECS", "3")];
    let Some((_dir, link, mut server)) = behind_a_silent_link("stalled-stop", &env) else {
        return;
    };
    server.write("shipped", true);
    link.freeze();
    // Committed here (the lease is still trusted by the clocks); its upload never lands.
    server.write("unshipped", false);
    server.signal(libc::SIGTERM);
    let (status, took) = server.wait_exit(Duration::from_secs(45));
    assert!(
        took < Duration::from_secs(6),
        "stopping took {took:?} with a 3 s grace period; log:\n{}",
        server.log()
    );
    assert!(!status.success(), "a stop that left a commit unshipped exited 0");
    assert!(
        server.log().contains("the final sync did not finish in time"),
        "{}",
        server.log()
    );
}

/// `keycast_replica_local_commits` from `/metrics`.
fn local_commits(server: &harness::Keycast) -> f64 {
    harness::metric_sum(&server.get("/metrics").1, "keycast_replica_local_commits")
}

/// The store out of reach for good (every connection silent): signing goes on, but nothing
/// is written that could never ship. Before, the activity flusher committed every record
/// batch into a WAL that could not be checkpointed — on Cloud Run, memory — for as long as
/// the outage lasted.
#[test]
fn an_unreachable_store_stops_the_activity_writes_while_signing_goes_on() {
    let Some((_dir, link, server)) = behind_a_silent_link("outage", &[("KEYCAST_ACTIVITY_FLUSH_MS", "100")]) else {
        return;
    };
    let (cookie, _) = harness::flow::register(&server, "outage@example.org", None);
    let token = harness::flow::access_token(&server, &cookie);
    let sign = |n: usize| {
        let r = harness::api::rpc(
            &server,
            &token,
            "sign_event",
            serde_json::json!([{ "kind": 1, "content": format!("note {n}") }]),
        );
        assert_eq!(r.status, 200, "signing goes on: {}", r.body);
    };
    sign(0);

    link.freeze();
    // Past the lease's time: from here on no write can be confirmed.
    let lapsed = Instant::now() + Duration::from_secs(5);
    let mut n = 1;
    while Instant::now() < lapsed {
        sign(n);
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = local_commits(&server);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        sign(n);
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = local_commits(&server);
    assert_eq!(
        after,
        before,
        "{} commits made that could never ship, in 5 s of signing",
        after - before
    );
}

/// An idle writer whose store stopped answering: its lease lapses by the clocks, and the next
/// write cannot renew it, so writes are refused. Before, readiness said 200 and the metrics
/// said everything was fine (a renewal's failure was logged at debug level only): no alert
/// fired while every write failed.
#[test]
fn a_writer_that_cannot_confirm_its_lease_says_so_in_readiness_and_metrics() {
    let env = [
        ("KEYCAST_TEST_ROUTES", "true"),
        ("KEYCAST_REPLICA_UNHEALTHY_AFTER_SECS", "1"),
    ];
    let Some((_dir, link, server)) = behind_a_silent_link("unconfirmed", &env) else {
        return;
    };
    let write = |key: &str| post(&format!("{}/api/test/write?key={key}&durable=true", server.base));
    assert_eq!(write("before").0, 200);
    link.freeze();
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = write("during");
    assert_eq!(status, 503, "{body}");

    // Each refused write is one more failed renewal.
    let reason = not_ready_within(&server, Duration::from_secs(15), || {
        write("again");
    });
    assert!(reason["message"].as_str().unwrap().contains("lease"), "{reason}");
    let metrics = server.get("/metrics").1;
    assert_eq!(
        harness::metric_sum(&metrics, "keycast_replica_failing"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        harness::metric_sum(&metrics, "keycast_replica_lease_held"),
        0.0,
        "{metrics}"
    );
}
