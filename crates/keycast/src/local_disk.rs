//! Refuses, at start, to keep the database on a network or FUSE filesystem (issue 15).
//!
//! SQLite's locking and its WAL need a local disk: the WAL index is shared memory (`-shm`,
//! mapped by every connection), and the locks that keep two writers apart are POSIX
//! advisory locks. On NFS, SMB, 9p or a FUSE filesystem such as Cloud Storage FUSE those
//! locks are emulated, ignored or per-client, and the shared mapping is not coherent, so two
//! processes can both believe they hold the write lock and corrupt the database — the
//! reason keycast's design rejected GCS FUSE and Filestore NFS in favour of a replica.
//!
//! The filesystem is identified by `statfs(2)`'s magic number (the kernel's own name for
//! it), and the mount that holds the directory is found in `/proc/self/mountinfo` so the
//! refusal can name it. One exception by mount type: `virtiofs` (a VM's shared directory)
//! reports FUSE's magic but is a local filesystem with working locks. This module does not
//! own the decision to go on anyway: `KEYCAST_ALLOW_NETWORK_FILESYSTEM` does, in the caller.

use std::path::{Path, PathBuf};

/// A filesystem kind on which SQLite must not keep a database, with its `statfs` magic.
struct Remote {
    magic: u32,
    name: &'static str,
}

/// Network and user-space filesystems, by `f_type` (linux/magic.h and the filesystems'
/// own headers). Cluster filesystems on shared block devices (GFS2, OCFS2) are not listed:
/// their locks are coherent.
const REMOTE: &[Remote] = &[
    Remote {
        magic: 0x6573_5546,
        name: "FUSE",
    },
    Remote {
        magic: 0x0000_6969,
        name: "NFS",
    },
    Remote {
        magic: 0x0000_517B,
        name: "SMB",
    },
    Remote {
        magic: 0xFF53_4D42,
        name: "CIFS",
    },
    Remote {
        magic: 0xFE53_4D42,
        name: "SMB2/3",
    },
    Remote {
        magic: 0x0102_1997,
        name: "9p",
    },
    Remote {
        magic: 0x5346_414F,
        name: "AFS",
    },
    Remote {
        magic: 0x6B41_4653,
        name: "AFS",
    },
    Remote {
        magic: 0x7375_7245,
        name: "Coda",
    },
    Remote {
        magic: 0x0000_564C,
        name: "NCP",
    },
    Remote {
        magic: 0x00C3_6400,
        name: "Ceph",
    },
    Remote {
        magic: 0x0BD0_0BD0,
        name: "Lustre",
    },
    Remote {
        magic: 0x4750_4653,
        name: "GPFS",
    },
    Remote {
        magic: 0x2003_0528,
        name: "OrangeFS",
    },
    Remote {
        magic: 0x786F_4256,
        name: "VirtualBox shared folder",
    },
];

/// Mount types that carry a remote magic but are local (see the module doc).
const LOCAL_DESPITE_MAGIC: &[&str] = &["virtiofs"];

/// The mount that holds a path, as `/proc/self/mountinfo` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// Its type as the kernel names it (`nfs4`, `fuse.gcsfuse`, `9p`, `ext4`…).
    pub fstype: String,
    /// What is mounted (`server:/export`, a bucket name, a device).
    pub source: String,
}

/// A database directory on a filesystem SQLite cannot lock safely.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database directory {dir} is on a {kind} filesystem (mount {point}, type {fstype}, source {mounted}). \
     SQLite's locking and its WAL index need a local disk: on a network or FUSE filesystem two writers are not \
     kept apart and the database can be corrupted. Put KEYCAST_DATA_DIR (or DATABASE_URL) on a local disk — on \
     Cloud Run the container's own filesystem (second-generation execution environment) — and let the replica \
     (KEYCAST_REPLICA_URL) keep the data; KEYCAST_ALLOW_NETWORK_FILESYSTEM=true starts anyway"
)]
pub struct NetworkFilesystem {
    pub dir: PathBuf,
    /// `FUSE`, `NFS`, `9p`, …
    pub kind: &'static str,
    pub point: String,
    pub fstype: String,
    /// What is mounted there (mountinfo's source field).
    pub mounted: String,
}

/// Checks the filesystem that holds `dir` (or, if it does not exist yet, its nearest
/// existing ancestor, where it would be created).
///
/// # Errors
/// [`NetworkFilesystem`] naming the mount when it is a network or FUSE filesystem; an I/O
/// error if `statfs` fails on an existing directory.
pub fn check(dir: &Path) -> Result<(), CheckError> {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let existing = existing.canonicalize().unwrap_or_else(|_| existing.to_owned());
    let magic = statfs_magic(&existing).map_err(|e| CheckError::Statfs(existing.clone(), e))?;
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| mount_of(&text, &existing));
    let fstype = mount.as_ref().map_or("", |m| m.fstype.as_str());
    match classify(magic, fstype) {
        None => Ok(()),
        Some(kind) => {
            let (point, fstype, mounted) = match mount {
                Some(m) => (m.point.display().to_string(), m.fstype, m.source),
                None => ("unknown".into(), format!("magic {magic:#x}"), "unknown".into()),
            };
            Err(CheckError::Network(NetworkFilesystem {
                dir: dir.to_owned(),
                kind,
                point,
                fstype,
                mounted,
            }))
        }
    }
}

/// Why [`check`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Network(NetworkFilesystem),
    #[error("cannot tell which filesystem holds {0}: statfs failed: {1}")]
    Statfs(PathBuf, std::io::Error),
}

/// The remote kind for a filesystem `magic` mounted as `fstype`, `None` for a local one.
pub fn classify(magic: u32, fstype: &str) -> Option<&'static str> {
    if LOCAL_DESPITE_MAGIC.contains(&fstype) {
        return None;
    }
    if let Some(remote) = REMOTE.iter().find(|r| r.magic == magic) {
        return Some(remote.name);
    }
    // A type the magic table does not know, but whose name says what it is.
    match fstype.split('.').next().unwrap_or_default() {
        "fuse" | "fuseblk" => Some("FUSE"),
        "nfs" | "nfs4" => Some("NFS"),
        "cifs" | "smb3" | "smbfs" => Some("CIFS"),
        "9p" => Some("9p"),
        _ => None,
    }
}

/// `statfs(2)`'s `f_type` for `path`, as the 32-bit magic the kernel defines.
fn statfs_magic(path: &Path) -> std::io::Result<u32> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string and buf points to writable memory of
    // the size statfs expects; buf is read only after statfs reported success.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it initialised buf.
    let f_type = unsafe { buf.assume_init() }.f_type;
    // f_type is signed on some targets (CIFS's 0xFF534D42 is negative as i32): keep the bits.
    Ok(f_type as u32)
}

/// The mount in `mountinfo` (the text of `/proc/self/mountinfo`) with the longest mount
/// point that contains `path` — the one that holds it. `path` must be canonical.
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<Mount> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len())
}

/// One line of mountinfo: `id parent major:minor root point options [optional…] - type source superoptions`.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let point = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fstype = right.next()?;
    let source = right.next().unwrap_or_default();
    Some(Mount {
        point: PathBuf::from(unescape(point)),
        fstype: unescape(fstype),
        source: unescape(source),
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_fuse_filesystems_are_recognised_by_their_magic() {
        for (magic, fstype, kind) in [
            (0x6573_5546, "fuse.gcsfuse", "FUSE"),
            (0x6573_5546, "fuse", "FUSE"),
            (0x6969, "nfs4", "NFS"),
            (0xFF53_4D42, "cifs", "CIFS"),
            (0xFE53_4D42, "smb3", "SMB2/3"),
            (0x0102_1997, "9p", "9p"),
            (0x00C3_6400, "ceph", "Ceph"),
            (0x5346_414F, "afs", "AFS"),
            // The magic decides even when the type string is unfamiliar.
            (0x6969, "", "NFS"),
        ] {
            assert_eq!(classify(magic, fstype), Some(kind), "{magic:#x} {fstype}");
        }
    }

    #[test]
    fn local_filesystems_pass() {
        for (magic, fstype) in [
            (0xEF53, "ext4"),
            (0x0102_1994, "tmpfs"),
            (0x794C_7630, "overlay"),
            (0x5846_5342, "xfs"),
            (0x9123_683E, "btrfs"),
            // virtiofs reports FUSE's magic but is a VM's local shared directory.
            (0x6573_5546, "virtiofs"),
        ] {
            assert_eq!(classify(magic, fstype), None, "{magic:#x} {fstype}");
        }
    }

    #[test]
    fn a_type_name_alone_is_enough_when_the_magic_is_unknown() {
        assert_eq!(classify(0x1234, "fuse.sshfs"), Some("FUSE"));
        assert_eq!(classify(0x1234, "nfs"), Some("NFS"));
        assert_eq!(classify(0x1234, "ext4"), None);
    }

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
45 27 0:40 / /mnt/data rw,nosuid,nodev,relatime shared:5 - fuse.gcsfuse my-bucket rw,user_id=0,group_id=0
46 45 0:41 / /mnt/data/local rw,relatime - tmpfs tmpfs rw
47 27 0:42 / /srv/with\\040space rw,relatime - nfs4 server:/export rw,vers=4.2
";

    #[test]
    fn the_mount_holding_a_path_is_the_longest_prefix() {
        let at = |p: &str| mount_of(MOUNTINFO, Path::new(p)).unwrap();
        assert_eq!(at("/var/lib/keycast").fstype, "ext4");
        let fuse = at("/mnt/data/keycast");
        assert_eq!(
            (fuse.point.to_str().unwrap(), fuse.fstype.as_str(), fuse.source.as_str()),
            ("/mnt/data", "fuse.gcsfuse", "my-bucket")
        );
        assert_eq!(at("/mnt/data/local/db").fstype, "tmpfs");
        // A path component that only starts like the mount point is not under it.
        assert_eq!(at("/mnt/database").fstype, "ext4");
        let nfs = at("/srv/with space/db");
        assert_eq!((nfs.fstype.as_str(), nfs.source.as_str()), ("nfs4", "server:/export"));
    }

    #[test]
    fn a_local_directory_passes_the_real_check() {
        let dir = tempfile::tempdir().unwrap();
        let remote = classify(statfs_magic(dir.path()).unwrap(), "").is_some();
        // Checked where the directory would be created: its nearest existing ancestor.
        assert_eq!(check(&dir.path().join("not/yet/created")).is_ok(), !remote);
    }
}
