//! `deploy/alerts.yaml` checked two ways (issue 15): promtool (the real Prometheus tool)
//! validates the rules and runs their unit tests (`deploy/alerts.test.yaml`), and every
//! metric the rules read — with every label they match on — is on a real keycast's
//! `/metrics`, so no alert watches a series that does not exist.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::api::post_json;
use harness::{peer, CommandExt as _, Launch};
use serde_json::{json, Value};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every rule's `expr`, by alert name.
fn expressions() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(deploy().join("alerts.yaml")).unwrap();
    let rules: Value = serde_yaml_ng::from_str(&text).expect("alerts.yaml is YAML");
    let mut exprs = BTreeMap::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("alerting rules only").to_owned();
            exprs.insert(name, rule["expr"].as_str().expect("expr").to_owned());
        }
    }
    exprs
}

/// The keycast metrics an expression selects, each with the label names it matches on.
fn selectors(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("keycast_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut labels = BTreeSet::new();
        if let Some(matchers) = tail[end..].strip_prefix('{') {
            let close = matchers.find('}').expect("a closed label matcher");
            for matcher in matchers[..close].split(',') {
                let key = matcher.split(['=', '!', '~']).next().unwrap().trim();
                if !key.is_empty() {
                    labels.insert(key.to_owned());
                }
            }
        }
        found.push((name, labels));
        rest = &tail[end..];
    }
    found
}

/// Sample names on `/metrics`, each with every label name its series carry.
fn exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = series.entry(line[..name_end].to_owned()).or_default();
        if let Some(inner) = line[name_end..].strip_prefix('{') {
            for pair in inner[..inner.find('}').unwrap()].split(',') {
                if let Some((key, _)) = pair.split_once('=') {
                    labels.insert(key.trim().to_owned());
                }
            }
        }
    }
    series
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let Some(promtool) = peer("KEYCAST_TEST_PROMTOOL") else {
        return;
    };
    for args in [["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(deploy())
            .output_within(harness::COMMAND_TIMEOUT);
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_metric_the_alerts_read_is_on_a_real_keycasts_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // Verification every second (after a write), so its gauge exists: keycast sets it only
    // once a verification has run, since reporting "ok" or "failed" before would be a lie.
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_REPLICA_VERIFY_INTERVAL_SECS", "1")
        .start();
    let registered = post_json(
        &server,
        "/api/auth/register",
        None,
        &json!({"email": "alerts@example.org", "password": "correct horse battery staple"}),
    );
    assert_eq!(registered.status, 201, "{}", registered.body);
    // /metrics answers loopback peers without a token; the harness talks from 127.0.0.1.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (status, text) = server.get("/metrics");
        assert_eq!(status, 200, "{text}");
        if text.contains("keycast_replica_verification_ok") {
            break text;
        }
        assert!(Instant::now() < deadline, "no verification ran; log:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let exposed = exposition(&metrics);
    let mut problems = Vec::new();
    for (alert, expr) in expressions() {
        let used = selectors(&expr);
        assert!(!used.is_empty(), "{alert} reads no keycast metric: {expr}");
        for (name, labels) in used {
            let Some(carried) = exposed.get(&name) else {
                problems.push(format!("{alert}: {name} is not on /metrics"));
                continue;
            };
            for label in labels.difference(carried) {
                problems.push(format!("{alert}: {name} has no label {label} (it has {carried:?})"));
            }
        }
    }
    assert!(problems.is_empty(), "{}\n\n/metrics:\n{metrics}", problems.join("\n"));
    // The gauges report a healthy writer.
    for (name, want) in [
        ("keycast_replica_lease_held", 1.0),
        ("keycast_replica_fenced", 0.0),
        ("keycast_replica_failing", 0.0),
        ("keycast_replica_verification_ok", 1.0),
        ("keycast_nip46_dropped_total", 0.0),
    ] {
        assert_eq!(harness::metric_sum(&metrics, name), want, "{name}");
    }
    server.stop();
}

#[test]
fn selectors_are_read_with_their_label_names() {
    assert_eq!(
        selectors(r#"sum(rate(keycast_http_requests_total{status=~"5..", method!="GET"}[5m])) / keycast_x"#),
        vec![
            (
                "keycast_http_requests_total".to_owned(),
                BTreeSet::from(["method".to_owned(), "status".to_owned()])
            ),
            ("keycast_x".to_owned(), BTreeSet::new()),
        ]
    );
}
