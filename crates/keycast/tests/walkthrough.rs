//! The README's five-minute walk-through, `scripts/walkthrough.sh`, run as a newcomer runs
//! it against a real `keycast serve` on its defaults (embedded relay, development outbox):
//! register, confirm the email from the logged link, authorize an app with PKCE, sign over
//! HTTP, sign over NIP-46 with nostr-tools' `BunkerSigner`. If the front page's commands
//! stop working, this fails.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{CommandExt as _, Launch};
use nostr::{Event, JsonUtil as _};
use serde_json::Value;

/// The line of the script's output that is a JSON object with `key`.
fn line_with(stdout: &str, key: &str) -> Value {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get(key).is_some())
        .unwrap_or_else(|| panic!("no {key} in the walk-through's output:\n{stdout}"))
}

#[test]
fn the_readme_walkthrough_signs_over_http_and_nip46() {
    let Some(tools) = harness::peer("KEYCAST_NOSTR_TOOLS_DIR") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("keycast.log");
    // The walk-through reads the verification link from keycast's log, as a newcomer
    // would from the terminal: keep a copy of stderr in a file, as `| tee` does.
    let mut launch = Launch::new(&dir.path().join("data"));
    launch.wrapper = vec![
        "bash".into(),
        "-c".into(),
        format!("exec \"$0\" \"$@\" 2> >(tee -a '{}' >&2)", log.display()),
    ];
    let server = launch.start();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/walkthrough.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&log)
        .env("KEYCAST_URL", &server.base)
        .env("NOSTR_TOOLS_DIR", &tools)
        .output_within(Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walk-through failed:\n{stdout}\n{stderr}\nkeycast:\n{}",
        server.log()
    );

    let http = Event::from_json(line_with(&stdout, "http_signed")["http_signed"].to_string()).unwrap();
    http.verify().expect("the HTTP RPC's event verifies");
    assert_eq!(http.content, "hello from the HTTP RPC");
    let nip46 = line_with(&stdout, "nip46_signed");
    assert_eq!(
        nip46["verified"], true,
        "nostr-tools verified the NIP-46 signature: {nip46}"
    );
    let nip46 = Event::from_json(nip46["nip46_signed"].to_string()).unwrap();
    nip46.verify().expect("the NIP-46 event verifies");
    assert_eq!(
        nip46.pubkey, http.pubkey,
        "both transports sign with the account's one key"
    );
    assert!(
        stderr.contains("5. Sign over NIP-46") && stderr.contains("Done."),
        "every step ran: {stderr}"
    );
}
