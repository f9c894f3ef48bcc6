//! keycast refuses to keep its database on a FUSE filesystem — tried on a real one: a bindfs
//! mount (Debian's `bindfs`, through the kernel's FUSE), as Cloud Storage FUSE would be
//! mounted under a Cloud Run service. The detection of every other kind by its `statfs`
//! magic is unit-tested in `src/local_disk.rs`.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{peer, CommandExt as _, Launch};

/// A bindfs mount, unmounted on drop.
struct FuseMount {
    point: PathBuf,
}

impl FuseMount {
    /// Mounts `source` at `point` with the `bindfs` binary named by `KEYCAST_TEST_BINDFS`;
    /// `None` (skipped) when the peer is not installed and the suite does not require it.
    fn bind(source: &Path, point: &Path) -> Option<FuseMount> {
        let bindfs = peer("KEYCAST_TEST_BINDFS")?;
        std::fs::create_dir_all(source).unwrap();
        std::fs::create_dir_all(point).unwrap();
        let out = Command::new(bindfs)
            .arg(source)
            .arg(point)
            .output_within(harness::COMMAND_TIMEOUT);
        assert!(
            out.status.success(),
            "bindfs could not mount (is /dev/fuse there?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(FuseMount {
            point: point.to_owned(),
        })
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let out = Command::new("fusermount")
            .arg("-u")
            .arg(&self.point)
            .output_within(harness::COMMAND_TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "fusermount -u {} failed: {}",
                self.point.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn a_database_on_a_fuse_mount_is_refused_naming_the_mount_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, point) = (dir.path().join("backing"), dir.path().join("fuse"));
    let Some(mount) = FuseMount::bind(&backing, &point) else {
        return;
    };
    let data = mount.point.join("data");
    let replica = dir.path().join("replica");
    let launch = |extra: &[(&str, &str)]| {
        extra.iter().fold(
            Launch::new(&data).env("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display())),
            |l, (k, v)| l.env(k, v),
        )
    };

    let refused = launch(&[]).run_to_exit(Duration::from_secs(60));
    assert!(!refused.status.success(), "started on FUSE:\n{}", refused.stderr);
    for needle in [
        format!("mount {}", mount.point.display()),
        "FUSE".to_owned(),
        "KEYCAST_ALLOW_NETWORK_FILESYSTEM=true".to_owned(),
    ] {
        assert!(
            refused.stderr.contains(&needle),
            "the refusal lacks {needle:?}:\n{}",
            refused.stderr
        );
    }
    assert!(
        !backing.join("data").exists(),
        "nothing is created on the refused mount"
    );

    // DATABASE_URL into the mount is refused the same way, with the data directory local.
    let local = dir.path().join("local");
    let via_url = Launch::new(&local)
        .env("KEYCAST_REPLICA_URL", &format!("file://{}", replica.display()))
        .env(
            "DATABASE_URL",
            &format!("sqlite://{}/db/keycast.db", mount.point.display()),
        )
        .run_to_exit(Duration::from_secs(60));
    assert!(!via_url.status.success());
    assert!(via_url.stderr.contains("FUSE"), "{}", via_url.stderr);

    // Forced: it starts, says where the database is and why that is risky, and serves.
    let server = launch(&[("KEYCAST_ALLOW_NETWORK_FILESYSTEM", "true")]).start();
    assert_eq!(server.get("/healthz/ready").0, 200, "{}", server.log());
    let log = server.stop();
    assert!(
        log.contains("KEYCAST_ALLOW_NETWORK_FILESYSTEM=true") && log.contains(&mount.point.display().to_string()),
        "{log}"
    );
    assert!(
        backing.join("data/keycast.db").exists(),
        "the database went through the FUSE mount"
    );
}
