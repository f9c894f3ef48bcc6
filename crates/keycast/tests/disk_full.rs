//! A full disk under the database, against the real binary. keycast's data directory sits on
//! a small tmpfs (a Cloud Run in-memory volume has a size limit; a VM's disk fills up), which
//! the test fills. While it is full, every write either fails with a JSON error (503 saying
//! the disk is full, where the write is an account's) or is made;
//! none is answered as made and then missing. Once space is freed, keycast writes again
//! without a restart, and every write it acknowledged is restored from the replica.
//!
//! The case that failed before: SQLite commits a statement outside a transaction when the
//! statement ends, and a full disk refuses that commit; sqlx's `fetch_optional` stops at the
//! first `RETURNING` row and drops the error of the statement's end. A token revocation
//! (`DELETE … RETURNING`) answered 200 and the token kept working.

mod harness;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::api::*;
use harness::flow::{approve_with, authorize_query, grant, pkce, register, token_request};
use harness::{CommandExt as _, Launch};
use serde_json::json;

/// A tmpfs of `size`, unmounted on drop. Mounting needs root (CI runs as root); elsewhere
/// the test is skipped unless the suite requires every peer.
struct Tmpfs {
    point: PathBuf,
}

impl Tmpfs {
    fn mount(point: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(point).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(point)
            .output_within(harness::COMMAND_TIMEOUT);
        if out.status.success() {
            return Some(Tmpfs {
                point: point.to_owned(),
            });
        }
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var("KEYCAST_REQUIRE_PEERS").as_deref() != Ok("1"),
            "cannot mount a tmpfs (the suite runs as root): {why}"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs: {why}");
        None
    }

    /// Writes a file until the filesystem refuses more.
    fn fill(&self) {
        let mut filler = std::fs::File::create(self.point.join("filler")).unwrap();
        for chunk in [1 << 20, 4096, 512] {
            let bytes = vec![0x5a_u8; chunk];
            while filler.write_all(&bytes).and_then(|()| filler.sync_all()).is_ok() {}
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.point.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount")
            .arg("-l")
            .arg(&self.point)
            .output_within(harness::COMMAND_TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "umount {} failed: {}",
                self.point.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn registration(server: &harness::Keycast, email: &str) -> Reply {
    post_json(
        server,
        "/api/auth/register",
        None,
        &json!({ "email": email, "password": PASSWORD }),
    )
}

fn revoke(server: &harness::Keycast, token: &str) -> Reply {
    post(server, "/api/oauth/revoke", None, FORM, &form(&[("token", token)]), &[])
}

fn signs(server: &harness::Keycast, token: &str) -> u16 {
    rpc(server, token, "sign_event", json!([{ "kind": 1, "content": "hi" }])).status
}

#[test]
fn a_full_disk_fails_writes_clearly_and_loses_none_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "24m") else {
        return;
    };
    let replica = dir.path().join("replica");
    let server = Launch::new(&disk.point.join("data")).redeployable(&replica).start();
    let (cookie, _) = register(&server, "alice@example.com", None);
    let app = grant(&server, &cookie, "policy:social");
    let access = app["access_token"].as_str().unwrap().to_owned();
    assert_eq!(signs(&server, &access), 200);
    // A grant with limits: its count lives in memory on SQLite, so it signs on too.
    let (challenge, verifier) = pkce();
    let query = authorize_query("policy:social", &challenge);
    let code = approve_with(&server, &cookie, &query, &[("per_day", "100")]);
    let limited = token_request(&server, &code, &verifier, REDIRECT).json();
    let counted = limited["access_token"].as_str().unwrap().to_owned();
    assert_eq!(signs(&server, &counted), 200);

    disk.fill();
    let mut acknowledged = vec!["alice@example.com".to_owned()];
    let mut refused = None;
    for i in 0..200 {
        let email = format!("while-full-{i}@example.com");
        let r = registration(&server, &email);
        if r.status == 201 {
            acknowledged.push(email);
        } else {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("no registration failed on the full disk");
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("disk is full")),
        "a JSON error saying why: {}",
        refused.body
    );
    assert!(refused.retry_after.is_some(), "with Retry-After");
    assert_eq!(signs(&server, &access), 200, "signing only reads: it goes on");
    assert_eq!(
        signs(&server, &counted),
        200,
        "a grant's count is kept in memory on SQLite"
    );

    // The owner's revocation of the app fails whole, saying why.
    let authorization = format!("/api/user/authorizations/{}", app["authorization_id"].as_str().unwrap());
    let r = delete(&server, &authorization, &cookie);
    assert_eq!(r.status, 503, "{}", r.body);

    // The app's own revocation of its token either fails or holds; it is never answered
    // and then undone.
    let revoked = revoke(&server, &access);
    disk.free();
    if revoked.status == 200 {
        assert_eq!(
            signs(&server, &access),
            401,
            "revoked with 200, yet the token still signs"
        );
    } else {
        // RFC 7009 §2.2.1: 503 while the server cannot revoke for now.
        assert_eq!(revoked.status, 503, "{}", revoked.body);
        assert_eq!(signs(&server, &access), 200, "a failed revocation changed nothing");
        assert_eq!(revoke(&server, &access).status, 200);
        assert_eq!(signs(&server, &access), 401);
    }

    // Space is back: writes work again without a restart.
    assert_eq!(delete(&server, &authorization, &cookie).status, 204);
    let after = registration(&server, "after@example.com");
    assert_eq!(after.status, 201, "{}", after.body);
    acknowledged.push("after@example.com".to_owned());
    server.stop();

    // Every acknowledged account is in the replica.
    let restored = Launch::new(&dir.path().join("elsewhere"))
        .redeployable(&replica)
        .start();
    for email in &acknowledged {
        let r = post_json(
            &restored,
            "/api/auth/login",
            None,
            &json!({ "email": email, "password": PASSWORD }),
        );
        assert_eq!(
            r.status, 200,
            "{email} was acknowledged but is not in the replica: {}",
            r.body
        );
    }
    restored.stop();
}
