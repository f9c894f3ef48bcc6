//! The API fuzzer (issue 11): schemathesis generates requests from keycast's own OpenAPI
//! document (`/api/openapi.json`) and runs them against the real binary, with a session
//! cookie and a bearer token so that every operation is reached. It checks what a client
//! relies on: no 5xx, every status and content type the document promises, every body in the
//! documented shape, and schema-valid requests accepted. A bounded number of cases per
//! operation runs in the suite; raise `KEYCAST_FUZZ_EXAMPLES` for a longer campaign.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{flow, Launch};

#[test]
fn the_api_keeps_its_documented_contract_under_generated_requests() {
    let Some(schemathesis) = harness::peer("KEYCAST_TEST_SCHEMATHESIS") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Launch::new(&dir.path().join("data"))
        .env("KEYCAST_TEST_ROUTES", "true")
        .start();
    let (cookie, _) = flow::register(&server, "fuzz@example.org", None);
    let grant = flow::grant(&server, &cookie, "policy:full");
    let token = grant["access_token"].as_str().unwrap().to_owned();
    let examples = std::env::var("KEYCAST_FUZZ_EXAMPLES").unwrap_or_else(|_| "15".into());
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/schemathesis.toml");
    // Logging out ends the session the other operations need: everything else first, then
    // logout on its own.
    for (pass, filter) in [("all but logout", "--exclude-path"), ("logout", "--include-path")] {
        let mut cmd = Command::new(&schemathesis);
        cmd.args(["--config-file", config])
            .arg("run")
            .arg(format!("{}/api/openapi.json", server.base))
            .args(["--url", &server.base])
            .args([filter, "/api/auth/logout"])
            .args(["--max-examples", &examples])
            .args(["--seed", "20261204"])
            // One worker: CPython 3.11's `ast` is not thread-safe, and hypothesis parses lambdas.
            .args(["--workers", "1"])
            .args(["--request-timeout", "10"])
            .args(["--header", &format!("Cookie: {cookie}")])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            // A browser on keycast's own pages sends these; without them every cookie-carrying
            // state change is (rightly) refused as cross-site.
            .args(["--header", &format!("Origin: {}", server.base)])
            .args(["--header", "Sec-Fetch-Site: same-origin"])
            .args(["--generation-database", "none"])
            .arg("--no-color");
        let run = harness::run_with_timeout(cmd, Duration::from_secs(600));
        assert!(
            run.status.success(),
            "schemathesis ({pass}) found contract breaks:\n{}\n{}\nkeycast log:\n{}",
            run.stdout,
            run.stderr,
            server.log()
        );
    }
    assert!(
        !server.log().contains("panicked"),
        "keycast panicked under the fuzzer:\n{}",
        server.log()
    );
    server.stop();
}
