//! A small filesystem the test can fill: a tmpfs of a given size, for what a full disk does
//! (a Cloud Run in-memory volume has a size limit; a VM's disk fills up).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::CommandExt as _;

/// A tmpfs of `size`, unmounted on drop. Mounting needs root (CI runs as root); elsewhere
/// the test is skipped unless the suite requires every peer.
pub struct Tmpfs {
    pub point: PathBuf,
}

impl Tmpfs {
    pub fn mount(point: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(point).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(point)
            .output_within(super::COMMAND_TIMEOUT);
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
    pub fn fill(&self) {
        let mut filler = std::fs::File::create(self.point.join("filler")).unwrap();
        for chunk in [1 << 20, 4096, 512] {
            let bytes = vec![0x5a_u8; chunk];
            while filler.write_all(&bytes).and_then(|()| filler.sync_all()).is_ok() {}
        }
    }

    pub fn free(&self) {
        std::fs::remove_file(self.point.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount")
            .arg("-l")
            .arg(&self.point)
            .output_within(super::COMMAND_TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "umount {} failed: {}",
                self.point.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
