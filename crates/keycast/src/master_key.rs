//! Loading the master key (the key-encryption key of every stored Nostr key) at start.
//!
//! From `KEYCAST_MASTER_KEY`, or the file at `MASTER_KEY_PATH`; with neither, a
//! development key in `<data_dir>/master.key` (created 0600 if missing) and a loud
//! warning. The key is never logged and never written to the database or the replica.
//!
//! During a master-key rotation `KEYCAST_MASTER_KEY_PREVIOUS` holds the old key too: the
//! [`Keyring`] decrypts under either and encrypts under the new one. Only key ids (one-way
//! digests, see `MasterKey::id`) are logged.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use keycast_core::{keys, Keyring, MasterKey, Secret};
use keycast_db::Db;

use crate::config::MasterKeySource;
use keycast_replica::crypt::ObjectCipher;

/// Loads the configured master key (and the previous one during a rotation) and checks the
/// keyring decrypts the keys already stored.
///
/// # Errors
/// An unreadable or malformed key, or one that cannot decrypt the stored keys; the message
/// names the variable (or file) it came from, never the key.
pub async fn load(
    source: &MasterKeySource,
    previous: Option<&Secret<String>>,
    db: &Db,
) -> anyhow::Result<Arc<Keyring>> {
    let origin = origin(source);
    let key = match source {
        MasterKeySource::Development(path) => development(path)?,
        given => read_given(given)?.expect("only a development key may be missing"),
    };
    let previous = previous_key(previous)?;
    let current_id = key.id();
    let ring = Arc::new(Keyring::new(key, previous));
    match ring.previous_id() {
        Some(previous) => tracing::info!(
            key_id = %current_id, previous_key_id = %previous,
            "master key loaded, with the previous key of a rotation (KEYCAST_MASTER_KEY_PREVIOUS): stored keys open under either"
        ),
        None => tracing::info!(key_id = %current_id, "master key loaded"),
    }
    let with_previous = if ring.previous_id().is_some() {
        " or KEYCAST_MASTER_KEY_PREVIOUS"
    } else {
        ""
    };
    // Every key's header names its master key: one the keyring lacks is the wrong key, or a
    // rotation left unfinished (its previous key dropped too early), caught here before any
    // user meets it. Cheap: the headers are compared in SQL, nothing is decrypted.
    let foreign = keycast_core::rotation::count_under_other_keys(db, &ring).await?;
    if foreign > 0 {
        anyhow::bail!(
            "refusing to start: {foreign} stored keys were encrypted under another master key than \
             the one from {origin}{with_previous}: either that is not this database's master key, or a \
             master-key rotation has not finished (then set KEYCAST_MASTER_KEY_PREVIOUS to the old key \
             until the rotation reports complete)"
        );
    }
    keys::verify_can_decrypt(db, ring.as_ref()).await.with_context(|| {
        format!("refusing to start: the master key from {origin}{with_previous} does not match this database")
    })?;
    Ok(ring)
}

/// Refuses a replica key that is the master key (or the previous one). The configuration
/// compares the variables' texts; a key from `MASTER_KEY_PATH` (or the development key) is
/// read here, before the lease is taken: a deploy refused later would have made the serving
/// instance hand over for nothing.
///
/// # Errors
/// The keys are the same; an unreadable key file.
pub fn refuse_replica_key(
    source: &MasterKeySource,
    previous: Option<&Secret<String>>,
    replica_key: &ObjectCipher,
) -> anyhow::Result<()> {
    // A development key not generated yet cannot be the replica's.
    let current = read_given(source)?;
    let previous = previous_key(previous)?;
    if current
        .iter()
        .chain(previous.iter())
        .any(|master| replica_key.is_key(master.to_base64().expose()))
    {
        anyhow::bail!(
            "refusing to start: KEYCAST_REPLICA_ENCRYPTION_KEY is the master key from {origin} (or \
             KEYCAST_MASTER_KEY_PREVIOUS): the replica's key must be another, or whoever holds it opens every \
             stored Nostr key in the replica",
            origin = origin(source)
        );
    }
    Ok(())
}

/// Where the configured key comes from, for messages (never the key itself).
fn origin(source: &MasterKeySource) -> String {
    match source {
        MasterKeySource::Inline(_) => "KEYCAST_MASTER_KEY".to_owned(),
        MasterKeySource::File(path) => format!("MASTER_KEY_PATH={}", path.display()),
        MasterKeySource::Development(path) => format!(
            "the development master key {} (neither KEYCAST_MASTER_KEY nor MASTER_KEY_PATH is set)",
            path.display()
        ),
    }
}

/// The configured key as it is now, without creating one: `None` for a development key not
/// generated yet.
fn read_given(source: &MasterKeySource) -> anyhow::Result<Option<MasterKey>> {
    Ok(match source {
        MasterKeySource::Inline(text) => Some(MasterKey::from_base64(text.expose())?),
        MasterKeySource::File(path) => Some(read(path).with_context(|| origin(source))?),
        MasterKeySource::Development(path) if !path.exists() => None,
        MasterKeySource::Development(path) => Some(read(path).with_context(|| origin(source))?),
    })
}

fn previous_key(previous: Option<&Secret<String>>) -> anyhow::Result<Option<MasterKey>> {
    previous
        .map(|text| MasterKey::from_base64(text.expose()))
        .transpose()
        .context("KEYCAST_MASTER_KEY_PREVIOUS")
}

fn read(path: &Path) -> anyhow::Result<MasterKey> {
    let text = std::fs::read_to_string(path).context("cannot read the master key file")?;
    Ok(MasterKey::from_base64(&text)?)
}

/// Reads or creates the development key, warning loudly either way.
fn development(path: &Path) -> anyhow::Result<MasterKey> {
    // At every start: a write killed after linking its key into place left a second copy, and
    // no later start writes the key again.
    remove_abandoned_new_keys(path);
    let existing = || read(path).with_context(|| format!("the development master key {}", path.display()));
    let key = if path.exists() {
        existing()?
    } else {
        let key = MasterKey::generate();
        match write_private(path, key.to_base64().expose().as_bytes()) {
            Ok(()) => key,
            // Another first start made one in the meantime: that one is the key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => existing()?,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot write the development master key {}", path.display()))
            }
        }
    };
    tracing::warn!(
        path = %path.display(),
        "USING A DEVELOPMENT MASTER KEY stored next to the database: NOT FIT FOR PRODUCTION. \
         Whoever has the data directory can decrypt every key, and losing it (a redeploy wipes the disk) \
         makes every stored key unreadable. Set KEYCAST_MASTER_KEY or MASTER_KEY_PATH (32 random bytes, base64: \
         `openssl rand -base64 32`) and keep it outside the database and the replica."
    );
    Ok(key)
}

/// Removes the temporary files of key writes killed before they removed them (each holds a key
/// in plain text: the one linked into place, or one never used), once they have gone unwritten
/// for an hour, so another process's write under way is left alone.
fn remove_abandoned_new_keys(path: &Path) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let prefix = format!("{name}.new-");
    let ours = |file: &std::ffi::OsStr| file.to_str().is_some_and(|n| n.starts_with(&prefix));
    for leftover in keycast_replica::restore::abandoned_beside(path, ours) {
        let _ = std::fs::remove_file(leftover);
    }
}

/// Writes a new key file, never replacing one: the key is written whole and made durable
/// under a temporary name, then linked into place (refused if a key is already there: another
/// process created one first) and the directory entry made durable. Written in place, a power
/// cut could leave an empty or partial file that refused every later start, or lose the entry
/// while the keys encrypted under the key it named were kept.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".new-{}-{nanos}", std::process::id()));
    let temp = std::path::PathBuf::from(temp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let write = |at: &Path| -> std::io::Result<()> {
        let mut file = options.open(at)?;
        file.write_all(bytes)?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    let written = write(&temp).and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    match written {
        // A filesystem without hard links: written in place, create-only, as before.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            write(path)?
        }
        written => written?,
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_written_whole_private_and_never_over_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        write_private(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first\n");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        // A key already there (another process made it first) is kept, and the write fails.
        let second = write_private(&path, b"second").unwrap_err();
        assert_eq!(second.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["master.key"], "no temporary file is left behind");
    }

    /// A write killed between its temporary file and removing it left a key in plain text
    /// beside the real one (a second copy, if it was linked into place already); the next
    /// start removes such files once they have gone unwritten for an hour.
    #[test]
    fn a_killed_writes_temporary_key_is_removed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        write_private(&path, MasterKey::generate().to_base64().expose().as_bytes()).unwrap();
        let old = dir.path().join("master.key.new-1-1764000000000000000");
        let young = dir.path().join("master.key.new-2-1765000000000000000");
        for leftover in [&old, &young] {
            std::fs::write(leftover, "a key\n").unwrap();
        }
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap();
        development(&path).unwrap();
        assert!(!old.exists(), "the abandoned temporary key is left");
        assert!(young.exists(), "a write under way had its file removed");
    }
}
