//! What a client without an account can make keycast hold, against the real binary: a body is
//! read whole before any rate limit or credential check, so its size is capped (64 KiB; a
//! signing request 512 KiB) and a larger one is a JSON 413; and every new label set of a
//! metric is a series kept for good, so a request's method is labelled from a fixed set.
//!
//! Before, axum's default let every endpoint read 2 MB, and a method made up per request
//! (hyper accepts any token) grew `/metrics` by a series per request.

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;

use harness::api::*;
use harness::flow::{access_token, register};
use harness::Launch;
use serde_json::json;

#[test]
fn a_body_past_its_endpoints_limit_is_refused_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();

    let email = format!("{}@example.org", "a".repeat(100 * 1024));
    let r = post_json(
        &server,
        "/api/auth/login",
        None,
        &json!({ "email": email, "password": "x" }),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"], "payload_too_large", "{}", r.body);
    let r = post(
        &server,
        "/api/oauth/token",
        None,
        "application/x-www-form-urlencoded",
        &format!("grant_type=refresh_token&{}", "a=&".repeat(30_000)),
        &[],
    );
    assert_eq!(r.status, 413, "{}", r.body);

    // A signing request may carry an event as large as a relay takes (128 KiB), not more
    // than its own limit.
    let (cookie, _) = register(&server, "big@example.org", None);
    let token = access_token(&server, &cookie);
    let event = |bytes: usize| json!([{ "kind": 1, "content": "x".repeat(bytes), "tags": [] }]);
    let signed = rpc(&server, &token, "sign_event", event(128 * 1024));
    assert_eq!(signed.status, 200, "{}", &signed.body[..signed.body.len().min(300)]);
    let refused = rpc(&server, &token, "sign_event", event(600 * 1024));
    assert_eq!(refused.status, 413, "{}", refused.body);
    assert_eq!(refused.json()["code"], "payload_too_large", "{}", refused.body);
}

/// The routes that carry permissions take more: a custom policy at its caps, its words in a
/// script JSON writers escape (six characters a character), is past the general limit.
#[test]
fn a_policy_at_its_caps_fits_its_routes_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    let (cookie, _) = register(&server, "policies@example.org", None);
    let words: Vec<String> = (0..100)
        .map(|n| format!("\"{}{n:03}\"", "\\u4e2d".repeat(97)))
        .collect();
    let kinds = |from: u32| (from..from + 1000).map(|k| k.to_string()).collect::<Vec<_>>().join(",");
    let body = format!(
        r#"{{"name":"at the caps","permissions":{{"allowed_kinds":[{}],"denied_kinds":[{}],"blocked_words":[{}]}}}}"#,
        kinds(20_000),
        kinds(30_000),
        words.join(",")
    );
    assert!(body.len() > keycast_http::BODY_LIMIT, "{}", body.len());
    let created = post(
        &server,
        "/api/user/policies",
        Some(&cookie),
        "application/json",
        &body,
        &[],
    );
    assert_eq!(created.status, 201, "{}", &created.body[..created.body.len().min(300)]);
}

/// One request with `method`, the answer's status line.
fn send_with_method(base: &str, method: &str) -> String {
    let mut stream = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    write!(
        stream,
        "{method} /healthz/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn made_up_request_methods_share_one_metrics_label() {
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data")).start();
    for n in 0..20 {
        let status = send_with_method(&server.base, &format!("PROBE{n}"));
        assert!(status.starts_with("HTTP/1.1 "), "{status}");
    }
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("keycast_http_requests_total{"))
        .collect();
    assert!(
        !metrics.contains("method=\"PROBE"),
        "a series per made-up method:\n{}",
        requests.join("\n")
    );
    let other = requests.iter().filter(|l| l.contains("method=\"other\"")).count();
    assert!(other >= 1, "{}", requests.join("\n"));
}
