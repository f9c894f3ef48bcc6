//! Two instances, one replica: deploy hand-over loses nothing (whether the old instance hands
//! over on the newcomer's request while it keeps serving, or releases on SIGTERM), and a split
//! brain (the old instance paused past its lease, then resumed) never corrupts the replica nor
//! loses a write that was acknowledged as durable.

mod harness;

use harness::CommandExt as _;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::api::REDIRECT;
use harness::api::{delete, get, rpc};
use harness::flow::{approve_with, authorize_query, grant, pkce, register, token_request};
use harness::nostr::{replies_to, BunkerClient, Relay};
use harness::{Keycast, Launch};
use nostr::{Keys, PublicKey};
use serde_json::{json, Value};

fn post(url: &str) -> u16 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    agent.post(url).send_empty().map(|r| r.status().as_u16()).unwrap_or(0)
}

fn launch(data: &Path, replica: &str) -> Launch {
    Launch::new(data)
        .env("KEYCAST_TEST_ROUTES", "true")
        .env("KEYCAST_REPLICA_URL", replica)
        .env("KEYCAST_REPLICA_LEASE_TTL_SECS", "3")
        .env("KEYCAST_REPLICA_LEASE_WAIT_SECS", "60")
}

/// [`launch`] with a real master key, where signing activity stays buffered: nothing is
/// written by the timer during a test (activity is also written once per lease TTL, so the
/// TTL goes up too).
fn buffering(data: &Path, replica: &str) -> Launch {
    launch(data, replica)
        .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY)
        .env("KEYCAST_ACTIVITY_FLUSH_MS", "30000")
        .env("KEYCAST_REPLICA_LEASE_TTL_SECS", "60")
}

/// Keys present in the replica, read through `keycast restore` like an operator would.
fn replicated_keys(dir: &Path, replica: &str, env: &[(String, String)]) -> Vec<String> {
    let out = dir.join(format!(
        "check-{}.db",
        std::process::id() as u128 + Instant::now().elapsed().as_nanos()
    ));
    let _ = std::fs::remove_file(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_keycast"))
        .args(["restore", "--replica", replica, "-o"])
        .arg(&out)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output_within(harness::COMMAND_TIMEOUT);
    assert!(
        status.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let rows = Command::new("sqlite3")
        .arg(&out)
        .arg("PRAGMA integrity_check; SELECT substr(key, 6) FROM keycast_meta WHERE key LIKE 'test:%' ORDER BY key;")
        .output_within(harness::COMMAND_TIMEOUT);
    let text = String::from_utf8(rows.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ok"), "restored replica passes integrity_check");
    lines.map(str::to_owned).collect()
}

/// Writes keys `<prefix>-<n>` to `base` until stopped; returns the acknowledged ones.
fn writer(base: String, prefix: String, durable: bool, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let key = format!("{prefix}-{n:06}");
            match post(&format!("{base}/api/test/write?key={key}&durable={durable}")) {
                200 => acked.push(key),
                0 => break, // the instance is gone
                // Refused (handing over, fenced): don't spin on an instance that says no.
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        acked
    })
}

/// Starts `new` beside `old` while writes keep `old`'s lease renewed, so that `old` hands the
/// replica over (rather than letting its lease lapse); returns `new` once it serves.
fn hand_over_under_writes(old: &Keycast, new: Launch) -> Keycast {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(old.base.clone(), "w".into(), false, stop.clone());
    let mut new = new.spawn_started_later();
    new.wait_started(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    writes.join().unwrap();
    assert!(
        old.log().contains("handed the replica over"),
        "the old instance handed over"
    );
    new.into_keycast()
}

/// A user of `server` with a grant whose app `app` has connected over NIP-46 as a fresh
/// client key: (session cookie, bunker public key, the client's keys).
fn connected_app(server: &Keycast, app: &mut BunkerClient, email: &str) -> (String, PublicKey, Keys) {
    let (cookie, _) = register(server, email, None);
    let token = grant(server, &cookie, "policy:social");
    let bunker_url = token["bunker_url"].as_str().unwrap();
    let bunker = PublicKey::parse(bunker_url.trim_start_matches("bunker://").split('?').next().unwrap()).unwrap();
    let client = Keys::generate();
    let connected = app.connect_as(bunker_url, &client.secret_key().to_secret_hex());
    assert_eq!(connected["ok"], true, "connect: {connected}");
    (cookie, bunker, client)
}

/// The signatures counted for the user's only grant, and the grant as the dashboard shows it.
fn signatures_counted(server: &Keycast, cookie: &str) -> (u64, Value) {
    let list = get(server, "/api/user/authorizations", Some(cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let shown = get(server, &format!("/api/user/authorizations/{id}"), Some(cookie)).json();
    (shown["usage"]["signatures"].as_u64().unwrap_or_default(), shown)
}

/// Every reply on `relay` from `bunker` to `client` answers a different request (none was
/// answered twice), and `server` counts the two signatures asked for, no more (it writes its
/// activity about once a second: waited for, then a little more for a third that should not
/// come).
fn each_answered_once_and_two_signatures_counted(
    relay: &Relay,
    bunker: &PublicKey,
    client: &Keys,
    server: &Keycast,
    cookie: &str,
) {
    let mut answers: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (_, reply) in replies_to(relay.url(), bunker, client) {
        *answers
            .entry(reply["id"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = answers.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "requests answered more than once: {twice:?} of {answers:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while signatures_counted(server, cookie).0 < 2 {
        assert!(
            Instant::now() < deadline,
            "two signatures asked for: {:?}",
            signatures_counted(server, cookie)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (counted, shown) = signatures_counted(server, cookie);
    assert_eq!(counted, 2, "two signatures asked for: {shown}");
}

fn handover_loop(replica: &str, cycles: usize, extra_env: &[(String, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let launch = |data: &Path, replica: &str| extra_env.iter().fold(launch(data, replica), |l, (k, v)| l.env(k, v));
    let mut current: Keycast = launch(&dir.path().join("data-0"), replica).start();
    let mut acknowledged: Vec<String> = Vec::new();
    for cycle in 1..=cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = writer(current.base.clone(), format!("c{cycle}"), false, stop.clone());
        std::thread::sleep(Duration::from_millis(500));
        // The new revision starts while the old one serves: it asks for the lease, and the
        // old instance hands over at its next write (or releases on SIGTERM, whichever first).
        let mut next = launch(&dir.path().join(format!("data-{cycle}")), replica).spawn_started_later();
        std::thread::sleep(Duration::from_millis(700));
        current.signal(libc::SIGTERM);
        let (exit, _) = current.wait_exit(Duration::from_secs(10));
        assert!(exit.success(), "old instance exits cleanly; log:\n{}", current.log());
        stop.store(true, Ordering::Relaxed);
        let acked = writes.join().unwrap();
        assert!(!acked.is_empty(), "cycle {cycle} acknowledged writes");
        acknowledged.extend(acked);
        next.wait_started(Duration::from_secs(30));
        current = next.into_keycast();
    }
    current.stop();
    let present = replicated_keys(dir.path(), replica, extra_env);
    let missing: Vec<&String> = acknowledged.iter().filter(|k| !present.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost across hand-overs: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn deploy_handover_loses_no_acknowledged_write_file_replica() {
    let dir = tempfile::tempdir().unwrap();
    handover_loop(&format!("file://{}", dir.path().join("replica").display()), 5, &[]);
}

#[test]
fn deploy_handover_loses_no_acknowledged_write_s3_replica() {
    let Some(endpoint) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&endpoint, "handover");
    let mut env = harness::s3_env(&endpoint, &bucket, "kc");
    let replica = env.remove(0).1; // KEYCAST_REPLICA_URL goes through launch()
    handover_loop(&replica, 5, &env);
}

/// The production defect this guards against: on Cloud Run the new revision must become
/// ready *before* the old instance gets SIGTERM, and an old instance that keeps receiving
/// writes keeps renewing its lease. The newcomer therefore asks for a hand-over, and the busy
/// holder ships everything, releases and steps down within seconds.
fn busy_handover(replica: &str, extra_env: &[(String, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let launch = |data: &Path| extra_env.iter().fold(launch(data, replica), |l, (k, v)| l.env(k, v));
    let mut a = launch(&dir.path().join("a")).start();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(a.base.clone(), "a".into(), true, stop.clone());
    // Long enough for A to renew its 3 s lease under the writes.
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    let mut b = launch(&dir.path().join("b")).spawn_started_later();
    // Without a hand-over B would wait for A's SIGTERM (which never comes) until the 60 s
    // lease wait ran out.
    b.wait_started(Duration::from_secs(20));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "B took over within seconds, not after a lapse: {took:?}"
    );
    let b = b.into_keycast();

    assert_eq!(
        post(&format!("{}/api/test/write?key=a-late&durable=true", a.base)),
        503,
        "A refuses writes once it has handed over"
    );
    assert_eq!(
        post(&format!("{}/api/test/write?key=a-later&durable=false", a.base)),
        503
    );
    let (ready, body) = a.get_json("/healthz/ready");
    assert_eq!(ready, 503, "A is not ready after handing over: {body}");
    // The reason names B's host and process: whole on this machine, not to anyone else (a
    // request through a proxy, as every one on Cloud Run).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let holder = format!("{}-{}", host.trim(), b.pid());
    assert!(body.to_string().contains(&holder), "{holder} in {body}");
    let mut far = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .get(format!("{}/healthz/ready", a.base))
        .header("X-Forwarded-For", "203.0.113.9")
        .call()
        .unwrap();
    let far_body = far.body_mut().read_to_string().unwrap();
    assert_eq!(far.status().as_u16(), 503, "{far_body}");
    assert!(
        !far_body.contains(&b.pid().to_string()) && !far_body.contains(host.trim()) && far_body.contains("not ready"),
        "a stranger is told the instance is not ready, not who holds the replica: {far_body}"
    );
    // Nor does a refused change tell anyone who asks (registration needs no credentials).
    let (refused, refusal) = a.post("/api/test/write?key=a-refused&durable=false");
    assert_eq!(refused, 503, "{refusal}");
    assert!(
        refusal.contains("handing the database over") && !refusal.contains(&holder),
        "a refused change says why, not who holds the replica: {refusal}"
    );
    stop.store(true, Ordering::Relaxed);
    let acked = writes.join().unwrap();
    assert!(
        acked.len() >= 5,
        "A served durable writes until the hand-over: {acked:?}"
    );
    eprintln!(
        "B ready {took:?} after it started; A acknowledged {} durable writes",
        acked.len()
    );
    assert!(
        a.log().contains("handed the replica over"),
        "A's log says so: {}",
        a.log()
    );

    a.signal(libc::SIGTERM);
    let (exit, _) = a.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "A exits cleanly after the hand-over; log:\n{}", a.log());

    assert_eq!(post(&format!("{}/api/test/write?key=b-000&durable=true", b.base)), 200);
    b.stop();
    let in_b = harness::test_keys(&dir.path().join("b").join("keycast.db"));
    let missing: Vec<&String> = acked.iter().filter(|k| !in_b.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} durable writes A acknowledged are missing in B: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(in_b.contains(&"b-000".to_owned()), "B serves writes");
    assert!(!in_b.iter().any(|k| k.starts_with("a-late")), "no refused write landed");
    let present = replicated_keys(dir.path(), replica, extra_env);
    assert!(acked.iter().all(|k| present.contains(k)), "the replica has them too");
}

#[test]
fn newcomer_takes_over_from_a_busy_instance_without_waiting_for_a_lapse() {
    let dir = tempfile::tempdir().unwrap();
    busy_handover(&format!("file://{}", dir.path().join("replica").display()), &[]);
}

#[test]
fn newcomer_takes_over_from_a_busy_instance_s3_replica() {
    let Some(endpoint) = harness::peer("KEYCAST_TEST_S3_ENDPOINT") else {
        return;
    };
    let bucket = harness::new_bucket(&endpoint, "busy-handover");
    let mut env = harness::s3_env(&endpoint, &bucket, "kc");
    let replica = env.remove(0).1; // KEYCAST_REPLICA_URL goes through launch()
    busy_handover(&replica, &env);
}

/// Two writers on one replica: A freezes past its lease, B takes over, A wakes up. The
/// lease's compare-and-swap and the create-only uploads (the backend's, not keycast's) are
/// what fence A off; run on every backend.
fn split_brain(replica: &str, extra_env: &[(String, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let launch = |data: &Path| extra_env.iter().fold(launch(data, replica), |l, (k, v)| l.env(k, v));
    let a = launch(&dir.path().join("a")).start();
    let durable: Arc<Mutex<Vec<String>>> = Arc::default();
    for n in 0..20 {
        let key = format!("a-{n:03}");
        assert_eq!(post(&format!("{}/api/test/write?key={key}&durable=true", a.base)), 200);
        durable.lock().unwrap().push(key);
    }
    // A freezes past its lease; B takes over the expired lease and serves.
    a.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(4));
    let b = launch(&dir.path().join("b")).start();
    for n in 0..20 {
        let key = format!("b-{n:03}");
        assert_eq!(post(&format!("{}/api/test/write?key={key}&durable=true", b.base)), 200);
        durable.lock().unwrap().push(key);
    }
    // A wakes up believing nothing happened. It had nothing unreplicated, so nothing is lost:
    // it must refuse to write, say so, and step aside exactly as after a hand-over.
    a.signal(libc::SIGCONT);
    let status = post(&format!("{}/api/test/write?key=a-late&durable=true", a.base));
    assert_eq!(status, 503, "the superseded instance refuses writes");
    assert_eq!(
        post(&format!("{}/api/test/write?key=a-later&durable=false", a.base)),
        503
    );
    let (ready, body) = a.get_json("/healthz/ready");
    assert_eq!(ready, 503, "the superseded instance is not ready: {body}");
    // The log says why (the line may trail the refusals: the renewal that discovers the
    // take-over runs beside the requests).
    a.wait_for_log("stepping aside", Duration::from_secs(15));
    b.stop();
    a.stop();
    let present = replicated_keys(dir.path(), replica, extra_env);
    for key in durable.lock().unwrap().iter() {
        assert!(present.contains(key), "durable write {key} is in the replica");
    }
    assert!(
        !present.iter().any(|k| k.starts_with("a-late")),
        "no write from the fenced instance landed"
    );
}

#[test]
fn split_brain_never_corrupts_the_replica_nor_loses_durable_writes() {
    let dir = tempfile::tempdir().unwrap();
    split_brain(&format!("file://{}", dir.path().join("replica").display()), &[]);
}

#[test]
fn split_brain_is_fenced_on_s3() {
    let Some(replica) = harness::stores::s3("split-brain") else {
        return;
    };
    split_brain(&replica.url, &replica.env);
}

#[test]
fn split_brain_is_fenced_on_gcs() {
    let Some(replica) = harness::stores::gcs("split-brain") else {
        return;
    };
    split_brain(&replica.url, &replica.env);
}

#[test]
fn split_brain_is_fenced_on_azure() {
    let Some(replica) = harness::stores::azure("split-brain") else {
        return;
    };
    split_brain(&replica.url, &replica.env);
}

/// A newcomer that asks for the lease and is then stopped (a cancelled deploy) must not leave
/// the old instance refusing writes for good: a TTL after handing over to nobody, it takes
/// the lease back and serves writes again, with nothing lost.
#[test]
fn a_handover_nobody_takes_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let a = launch(&dir.path().join("a"), &replica).start();
    let write = |key: &str| post(&format!("{}/api/test/write?key={key}&durable=true", a.base));
    let mut acked = Vec::new();
    assert_eq!(write("a-000"), 200);
    acked.push("a-000".to_owned());

    let mut b = launch(&dir.path().join("b"), &replica)
        .spawn_started_later()
        .into_keycast();
    let asked = Instant::now();
    while !b.log().contains("asked the replica lease holder to hand over") {
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "B never asked; log:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.signal(libc::SIGKILL);
    b.wait_exit(Duration::from_secs(10));

    // A's next writes learn of the request and A hands over to nobody...
    let mut n = 0;
    let mut refused = false;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        n += 1;
        let key = format!("a-{n:03}");
        match write(&key) {
            200 if refused => {
                acked.push(key);
                break;
            }
            200 => acked.push(key),
            _ => refused = true,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused, "A handed over when asked; log:\n{}", a.log());
    // ...and a TTL later takes the replica back.
    assert!(
        a.log().contains("taking it back and resuming"),
        "A resumed; log:\n{}",
        a.log()
    );
    assert_eq!(a.get("/healthz/ready").0, 200);
    a.stop();
    let present = replicated_keys(dir.path(), &replica, &[]);
    let missing: Vec<&String> = acked.iter().filter(|k| !present.contains(k)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

/// During a deploy both instances hear every NIP-46 request on the relays. The old one, once
/// it has handed the replica over, knows nothing of what changes since: a revocation made on
/// the newcomer, signatures counted there against a grant's limits. Before, it went on
/// answering until it was stopped, and signed for an app its owner had just revoked; now only
/// the instance that writes answers.
#[test]
fn after_handing_over_the_old_instance_no_longer_answers_nip46() {
    let Some(relay) = Relay::start() else { return };
    let Some(mut app) = BunkerClient::spawn() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch = |name: &str| {
        launch(&dir.path().join(name), &replica)
            .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY)
            .env("BUNKER_RELAYS", relay.url())
    };
    let old = launch("old").start();
    let (cookie, bunker, client) = connected_app(&old, &mut app, "deploy@example.com");
    let sign = |app: &mut BunkerClient, content: &str| {
        app.call(json!({"op": "sign_event", "event": {"kind": 1, "content": content}, "timeout_ms": 3000}))
    };
    let before = sign(&mut app, "before the deploy");
    assert_eq!(before["ok"], true, "signing through the old instance: {before}");

    let mut new = launch("new").spawn_started_later();
    new.wait_started(Duration::from_secs(20));
    let new = new.into_keycast();
    let list = get(&new, "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    // Replies are dated in seconds: the one before the deploy must be older.
    std::thread::sleep(Duration::from_millis(1100));
    let revoked_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let revoked = delete(&new, &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);

    let after = sign(&mut app, "after the revocation");
    assert_ne!(after["ok"], true, "a revoked app got a signature: {after}");
    // Every reply of the bunker's since the revocation, as the relay carried them: the
    // newcomer's refusal, and nothing from the old instance.
    let replies: Vec<Value> = replies_to(relay.url(), &bunker, &client)
        .into_iter()
        .filter(|(at, _)| *at >= revoked_at)
        .map(|(_, reply)| reply)
        .collect();
    assert!(!replies.is_empty(), "the newcomer answered the request");
    // An error reply carries an empty `result` beside its `error`.
    let signed: Vec<&Value> = replies
        .iter()
        .filter(|r| r["result"].as_str().is_some_and(|result| !result.is_empty()))
        .collect();
    assert!(
        signed.is_empty(),
        "an instance signed for the revoked app after the revocation: {signed:?}"
    );
    assert_eq!(replies.len(), 1, "one answer, the writer's: {replies:?}");
}

/// The same over HTTP: Cloud Run keeps sending some requests to the old revision until its
/// traffic has moved, and the old instance, once it has handed over, knows nothing of what
/// changes on the newcomer. Before, it went on signing with a token revoked there, and the
/// signatures it made were counted nowhere (its writes are refused). Now it answers 503, and
/// the client's retry reaches the newcomer.
#[test]
fn after_handing_over_the_old_instance_refuses_http_signing() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch =
        |name: &str| launch(&dir.path().join(name), &replica).env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY);
    let old = launch("old").start();
    let (cookie, _) = register(&old, "rpc-deploy@example.com", None);
    let granted = grant(&old, &cookie, "policy:social");
    let token = granted["access_token"].as_str().unwrap().to_owned();
    let sign = |server: &Keycast| rpc(server, &token, "sign_event", json!([{"kind": 1, "content": "hi"}]));
    assert_eq!(sign(&old).status, 200, "signing through the old instance");

    let mut new = launch("new").spawn_started_later();
    new.wait_started(Duration::from_secs(20));
    let new = new.into_keycast();
    let refused = sign(&old);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["code"], "unavailable", "{}", refused.body);
    assert!(
        refused.json()["error"].as_str().unwrap().contains("retry"),
        "{}",
        refused.body
    );
    assert!(refused.retry_after.is_some(), "a 503 says when to retry");
    assert_eq!(sign(&new).status, 200, "the newcomer signs");

    let list = get(&new, "/api/user/authorizations", Some(&cookie)).json();
    let id = list["authorizations"][0]["id"].as_str().unwrap().to_owned();
    let revoked = delete(&new, &format!("/api/user/authorizations/{id}"), &cookie);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    assert_eq!(sign(&new).status, 401, "revoked on the newcomer");
    let old_answer = sign(&old);
    assert_ne!(
        old_answer.status, 200,
        "the old instance signed for an app revoked on the newcomer: {}",
        old_answer.body
    );
}

/// A user of `server` whose app holds a grant of 3 signatures and has made all 3 (buffered,
/// with a long flush interval): (session cookie, the app's access token).
fn three_signatures_of_three(server: &Keycast, email: &str) -> (String, String) {
    let (cookie, _) = register(server, email, None);
    let (challenge, verifier) = pkce();
    let code = approve_with(
        server,
        &cookie,
        &authorize_query("policy:social", &challenge),
        &[("max_signatures", "3")],
    );
    let token = token_request(server, &code, &verifier, REDIRECT).json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        let signed = rpc(server, &token, "sign_event", json!([{"kind": 1, "content": "hi"}]));
        assert_eq!(signed.status, 200, "{}", signed.body);
    }
    (cookie, token)
}

/// Signing activity is buffered in memory and written about once a second
/// (`KEYCAST_ACTIVITY_FLUSH_MS`). Before, what was still buffered when the old instance handed
/// over was lost: its writes are refused from the hand-over on. The owner's record missed those
/// signatures, and a grant limited to N signatures could sign them again on the newcomer. Now
/// the hand-over writes the buffer before it locks the database.
#[test]
fn a_handover_keeps_the_signatures_still_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch = |name: &str| buffering(&dir.path().join(name), &replica);
    let old = launch("old").start();
    let (cookie, token) = three_signatures_of_three(&old, "buffered@example.com");
    let sign = |server: &Keycast| rpc(server, &token, "sign_event", json!([{"kind": 1, "content": "hi"}]));

    let new = hand_over_under_writes(&old, launch("new"));
    let fourth = sign(&new);
    assert_eq!(
        fourth.status, 403,
        "a 4th signature of a 3-signature grant: {}",
        fourth.body
    );
    assert_eq!(fourth.json()["code"], "grant_exhausted", "{}", fourth.body);
    let (counted, shown) = signatures_counted(&new, &cookie);
    let listed = shown["recent_activity"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["method"] == "sign_event")
        .count();
    assert_eq!(
        (counted, listed),
        (3, 3),
        "the owner's record of the old instance's signatures: {shown}"
    );
}

/// SIGTERM after a starting instance asked for the replica, before the hand-over began: the
/// worker was still in a round (a store slow to answer an upload) when the request came, and
/// the SIGTERM came before that round ended. Before, shutdown skipped its last writes because
/// a hand-over was under way, and the final sync, which then shipped the tail, wrote none:
/// the buffered signatures were lost, and a grant limited to 3 signed a 4th on the newcomer.
/// Now shutdown writes them in the hand-over's stead.
#[test]
fn sigterm_before_a_requested_handover_began_keeps_the_signatures_still_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch = |name: &str| buffering(&dir.path().join(name), &replica);
    let mut old = launch("old").start();
    let (cookie, token) = three_signatures_of_three(&old, "requested@example.com");
    let sign = |server: &Keycast| rpc(server, &token, "sign_event", json!([{"kind": 1, "content": "hi"}]));
    // The next round waits 8 s before it ships, as on a stalled upload.
    if !harness::arm_failpoint(&old, "replica-round", "return(8000)") {
        return;
    }
    old.write("round", false);
    let mut new = launch("new").spawn_started_later();
    old.wait_for_log("a starting instance asked for the replica", Duration::from_secs(10));
    assert!(
        !old.log().contains("handed the replica over"),
        "the hand-over began before the SIGTERM: {}",
        old.log()
    );
    old.signal(libc::SIGTERM);
    let (status, _) = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the old instance's stop: {}", old.log());
    new.wait_started(Duration::from_secs(30));
    let new = new.into_keycast();

    let fourth = sign(&new);
    assert_eq!(
        fourth.status, 403,
        "a 4th signature of a 3-signature grant: {}",
        fourth.body
    );
    let (counted, shown) = signatures_counted(&new, &cookie);
    assert_eq!(counted, 3, "the old instance's signatures, on the newcomer: {shown}");
}

/// Some relays keep ephemeral events for a while, and a new subscription gets the requests of
/// the last minute again (the filter's `since`). Before, the newcomer answered every request
/// the old instance had already answered in that minute: a second signature, counted twice
/// against the grant's limits and listed twice to its owner. Now the old instance hands over
/// the requests it has seen with the database, and the newcomer drops them as seen.
#[test]
fn a_request_answered_before_the_handover_is_not_answered_again_after_it() {
    replayed_to_the_next_instance("replayed@example.com", |old, new| hand_over_under_writes(old, new));
}

/// An app signs once through the first instance; `next` brings up the next one (on an empty
/// disk) from it, and the app signs again, while the relay replays the minute's requests to
/// the newcomer's subscription. Every request is answered once, and the two signatures are
/// counted.
fn replayed_to_the_next_instance(email: &str, next: impl FnOnce(&mut Keycast, Launch) -> Keycast) {
    let Some(relay) = Relay::start() else { return };
    let Some(mut app) = BunkerClient::spawn() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch = |name: &str| {
        launch(&dir.path().join(name), &replica)
            .env("KEYCAST_MASTER_KEY", harness::TEST_MASTER_KEY)
            .env("BUNKER_RELAYS", relay.url())
    };
    let mut old = launch("old").start();
    let (cookie, bunker, client) = connected_app(&old, &mut app, email);
    let signed = app.call(json!({"op": "sign_event", "event": {"kind": 1, "content": "once"}, "timeout_ms": 3000}));
    assert_eq!(signed["ok"], true, "signing through the first instance: {signed}");

    let new = next(&mut old, launch("new"));
    let after = app.call(json!({"op": "sign_event", "event": {"kind": 1, "content": "after"}, "timeout_ms": 10000}));
    assert_eq!(after["ok"], true, "signing through the next instance: {after}");
    each_answered_once_and_two_signatures_counted(&relay, &bunker, &client, &new, &cookie);
}

/// A signature under way when the hand-over begins: it passed the writer check just before,
/// and records its activity just after the hand-over's last write of the buffer. Before, that
/// record was lost (the owner never saw the signature; a limited grant could sign it again on
/// the newcomer). Now the hand-over waits for the requests under way before it writes.
#[test]
fn a_handover_waits_for_the_signature_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch = |name: &str| buffering(&dir.path().join(name), &replica);
    let old = launch("old").start();
    let (cookie, _) = register(&old, "underway@example.com", None);
    let token = grant(&old, &cookie, "policy:social")["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // The signature is made, then held 2 s before its record.
    if !harness::arm_failpoint(&old, "signer-before-record", "return(2000)") {
        return;
    }
    let signing = std::thread::scope(|scope| {
        let signing = scope.spawn(|| rpc(&old, &token, "sign_event", json!([{"kind": 1, "content": "under way"}])));
        std::thread::sleep(Duration::from_millis(300));
        let new = hand_over_under_writes(&old, launch("new"));
        (signing.join().unwrap(), new)
    });
    let (signed, new) = signing;
    assert_eq!(signed.status, 200, "{}", signed.body);
    let (counted, shown) = signatures_counted(&new, &cookie);
    assert_eq!(
        counted, 1,
        "the signature made on the old instance, counted on the newcomer: {shown}"
    );
}

/// SIGTERM (a deploy, a scale-in) while a NIP-46 signature is under way. Before, the
/// listener's tasks were aborted and the relays closed at once: the request went on signing,
/// its reply had no relay to go to, and its record reached the buffer after the last flush —
/// made, unanswered and counted nowhere. Now shutdown lets the requests under way finish and
/// reply, then writes the activity.
#[test]
fn sigterm_lets_a_nip46_signature_under_way_finish_and_be_recorded() {
    let Some(relay) = Relay::start() else { return };
    let Some(mut app) = BunkerClient::spawn() else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let launch = || buffering(&dir.path().join("data"), &replica).env("BUNKER_RELAYS", relay.url());
    let mut server = launch().start();
    let (cookie, _, _) = connected_app(&server, &mut app, "sigterm@example.com");
    // Held 4 s between its signature and its record; SIGTERM comes 2 s into the request, once
    // it is under way (a request that arrives after SIGTERM is not taken at all).
    if !harness::arm_failpoint(&server, "signer-before-record", "return(4000)") {
        return;
    }
    let pid = server.pid() as i32;
    let terminate = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2000));
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    });
    let signed = app.call(json!({"op": "sign_event", "event": {"kind": 1, "content": "late"}, "timeout_ms": 10000}));
    terminate.join().unwrap();
    assert_eq!(signed["ok"], true, "the signature under way was answered: {signed}");
    let (status, _) = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{}", server.log());

    let server = launch().start();
    let (counted, shown) = signatures_counted(&server, &cookie);
    assert_eq!(counted, 1, "the signature is recorded: {shown}");
}

/// The same replay as above, after a SIGTERM instead of a hand-over (a scale-in, a host's
/// maintenance, a deploy whose newcomer waited for the lease): the next instance restores on an
/// empty disk within the minute a relay replays, and must not answer the requests the stopped
/// instance had answered. Before, only a hand-over passed them on.
#[test]
fn a_request_answered_before_sigterm_is_not_answered_again_by_the_next_instance() {
    replayed_to_the_next_instance("restarted@example.com", |old, new| {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(old.pid() as i32, libc::SIGTERM) };
        let (status, _) = old.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{}", old.log());
        new.start()
    });
}

/// A deploy after a deploy: the newest instance (C) asks for the replica while the one before
/// (B) holds it but has not yet started serving. B hands over — and then reported itself
/// started: the platform routed traffic to an instance that refused every write and
/// signature. B now stops (non-zero) without ever reporting started, and C serves.
#[test]
fn an_instance_asked_for_the_replica_before_it_served_never_reports_started() {
    let dir = tempfile::tempdir().unwrap();
    let replica = format!("file://{}", dir.path().join("replica").display());
    let a = launch(&dir.path().join("a"), &replica).start();
    assert_eq!(post(&format!("{}/api/test/write?key=a&durable=true", a.base)), 200);

    let mut b = launch(&dir.path().join("b"), &replica)
        .spawn_started_later()
        .into_keycast();
    if !harness::arm_failpoint(&b, "serve-before-marking", "return(4000)") {
        return;
    }
    b.wait_for_log("holding the replica lease", Duration::from_secs(60));
    // A's part is done (idle, it let its lease lapse to B); gone, it cannot take the replica
    // back meanwhile. It stops cleanly: nothing of its own was lost.
    a.stop();
    let c = launch(&dir.path().join("c"), &replica).spawn_started_later();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.status("/healthz/startup") != 200 {
        assert_ne!(
            b.get("/healthz/startup").0,
            200,
            "B reported itself started:\n{}",
            b.log()
        );
        assert!(Instant::now() < deadline, "C never started; B:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = c.into_keycast();
    let (status, _) = b.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "B exits non-zero so the platform replaces it:\n{}",
        b.log()
    );
    assert!(b.log().contains("before this one started serving"), "{}", b.log());
    assert_eq!(post(&format!("{}/api/test/write?key=c&durable=true", c.base)), 200);
    c.stop();
}
