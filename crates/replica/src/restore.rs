//! Restoring a database from the replica: latest, or as of a TXID or a time.
//!
//! The plan follows Litestream 0.5 so that either tool restores the other's replicas: start
//! from the newest snapshot (level 9) at or before the target, then repeatedly take, across
//! levels 8…0, the file that extends the contiguous TXID chain furthest. Files whose
//! `created_at` is not before a target time, or whose max TXID is past a target TXID, are
//! never used.
//!
//! Nothing is trusted: every file's CRC is checked while decoding, headers must agree with
//! file names and chain without gaps, every page up to the final size must be present, and
//! the result must pass `PRAGMA integrity_check` — all in a temporary file next to the
//! output, which is renamed into place only at the end. A failure names the object at fault
//! and leaves no output behind.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};

use crate::ltx::LtxError;
use crate::store::{LtxObject, Store, StoreError};

/// How many objects are fetched ahead of the one being applied.
pub const DEFAULT_FETCH_CONCURRENCY: usize = crate::apply::FETCH_CONCURRENCY;

/// Which state to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Everything in the replica.
    Latest,
    /// The state right after this TXID (inclusive).
    Txid(u64),
    /// The newest state whose files were all created before this time.
    Time(SystemTime),
}

/// Progress reports while applying files: `(files done, files total, bytes fetched)`.
pub type Progress<'a> = &'a (dyn Fn(usize, usize, u64) + Send + Sync);

/// What a successful restore produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// TXID of the restored state.
    pub txid: u64,
    /// Database size in pages.
    pub pages: u32,
    /// Page size in bytes.
    pub page_size: u32,
    /// LTX files applied.
    pub files: usize,
    /// Bytes fetched from the store.
    pub bytes: u64,
    /// The newest writer stamp in the restored history (see `apply::Applied::check_writer`).
    pub newest_writer: u64,
    /// When the restored state was written (ms since the Unix epoch): the time in the last
    /// applied file's header, by its writer's clock. What a `--timestamp` restore reached.
    pub written_at_ms: Option<i64>,
    /// The object the restore stopped at, left out with everything after it: stored late by
    /// a writer that had lost the replica to a newer one, after that one's last TXID.
    pub stale: Option<String>,
}

/// Why a restore failed. Every variant names what to look at.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the replica at {0} holds no backup")]
    Empty(String),
    #[error("no snapshot in the replica covers the requested point (the earliest files start at TXID {first_min}); nothing to restore from")]
    NoSnapshot { first_min: u64 },
    #[error("the replica has a gap after TXID {after}: no file starts at TXID {next} (next available file: {found})")]
    Gap { after: u64, next: u64, found: String },
    #[error("the replica cannot reach TXID {wanted}: {}", reachable_around(*reached, *next))]
    TxidUnreachable {
        wanted: u64,
        /// The newest TXID before it that restores.
        reached: u64,
        /// The first TXID after it at which a file ends, when compaction merged `wanted`
        /// into a file that starts before it: a restore can reach that one.
        next: Option<u64>,
    },
    #[error("no backup file in the replica was created before the requested time")]
    TimeUnreachable,
    #[error("object {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: LtxError,
    },
    #[error("object {key} does not match its name: {reason}")]
    Mismatch { key: String, reason: String },
    #[error(
        "object {key} is listed as created at {listed}, before the requested time {target}, but its header says it \
         was written at {written}: its stored time was altered or its clock was wrong, so a restore to that time \
         cannot be trusted. Nothing was restored; restore by --txid (`keycast replica ls` lists each file's TXIDs) \
         or to another time"
    )]
    WrittenAfterTarget {
        key: String,
        listed: String,
        written: String,
        target: String,
    },
    #[error("object {key} was stored by an instance that had lost the replica to a newer writer (its writer stamp is older than one before it)")]
    StaleWriter { key: String },
    #[error("the restored database is incomplete: page {pgno} of {pages} is in no backup file")]
    MissingPage { pgno: u32, pages: u32 },
    #[error("the restored database fails SQLite's integrity check: {0}")]
    Integrity(String),
    #[error("the restored database at TXID {txid} has checksum {restored:016x}, but keycast recorded {recorded:016x} for that TXID when it verified the live database")]
    ChecksumMismatch { txid: u64, restored: u64, recorded: u64 },
    #[error("output {0} already exists; remove it or restore elsewhere")]
    OutputExists(PathBuf),
    #[error(
        "{0} is left beside the output from a database that was there before: SQLite would apply it over the \
         restored database. Move it away with the database it belongs to, or restore elsewhere"
    )]
    LeftoverBeside(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Chooses the files to apply, in order.
///
/// # Errors
/// [`RestoreError::Empty`], [`RestoreError::NoSnapshot`], [`RestoreError::Gap`],
/// [`RestoreError::TxidUnreachable`], [`RestoreError::TimeUnreachable`].
pub fn plan(files: &[LtxObject], target: Target, describe: &str) -> Result<Vec<LtxObject>, RestoreError> {
    if files.is_empty() {
        return Err(RestoreError::Empty(describe.to_owned()));
    }
    let usable: Vec<&LtxObject> = files.iter().filter(|f| admits(f, target)).collect();
    if usable.is_empty() {
        return Err(match target {
            Target::Time(_) => RestoreError::TimeUnreachable,
            _ => RestoreError::NoSnapshot {
                first_min: first_min(files),
            },
        });
    }
    let mut chosen: Vec<LtxObject> = Vec::new();
    let mut cur = 0u64;
    if let Some(snapshot) = usable
        .iter()
        .filter(|f| f.level == 9)
        .max_by_key(|f| (f.max_txid, f.min_txid))
    {
        cur = snapshot.max_txid;
        chosen.push((*snapshot).clone());
    }
    while let Some(next) = best_extension(&usable, cur) {
        cur = next.max_txid;
        chosen.push(next.clone());
    }
    check_reached(&chosen, files, &usable, cur, target)?;
    Ok(chosen)
}

fn reachable_around(reached: u64, next: Option<u64>) -> String {
    match next {
        Some(next) => format!(
            "compaction merged it into a file with its neighbours; the nearest TXIDs that restore are {reached} and {next}"
        ),
        None => format!("the newest restorable TXID is {reached}"),
    }
}

/// Whether a file may be used for `target` at all.
fn admits(file: &LtxObject, target: Target) -> bool {
    match target {
        Target::Latest => true,
        Target::Txid(txid) => file.max_txid <= txid,
        Target::Time(time) => file.created_at < time,
    }
}

/// Among files that start at or before `cur + 1` and end after `cur`, the one reaching
/// furthest; ties go to the smaller min TXID, then the higher level (fewer, larger files).
fn best_extension<'a>(files: &[&'a LtxObject], cur: u64) -> Option<&'a LtxObject> {
    files
        .iter()
        .filter(|f| f.level < 9 && f.min_txid <= cur + 1 && f.max_txid > cur)
        .max_by(|a, b| {
            (a.max_txid, std::cmp::Reverse(a.min_txid), a.level).cmp(&(
                b.max_txid,
                std::cmp::Reverse(b.min_txid),
                b.level,
            ))
        })
        .copied()
}

fn first_min(files: &[LtxObject]) -> u64 {
    files.iter().map(|f| f.min_txid).min().unwrap_or(0)
}

/// Turns "the chain stopped at `cur`" into the right error, or accepts it.
fn check_reached(
    chosen: &[LtxObject],
    all: &[LtxObject],
    usable: &[&LtxObject],
    cur: u64,
    target: Target,
) -> Result<(), RestoreError> {
    if chosen.first().is_none_or(|f| f.min_txid != 1) {
        return Err(RestoreError::NoSnapshot {
            first_min: first_min(all),
        });
    }
    match target {
        Target::Txid(wanted) if cur != wanted => Err(RestoreError::TxidUnreachable {
            wanted,
            reached: cur,
            // A file that goes past `wanted` from within the chain (`cur + 1` on): the chain
            // reaches its end.
            next: all
                .iter()
                .filter(|f| f.level < 9 && f.min_txid <= cur + 1 && f.max_txid > wanted)
                .map(|f| f.max_txid)
                .min(),
        }),
        Target::Txid(_) => Ok(()),
        // Latest must reach the newest file, and a time target the newest stored before that
        // time (`usable` holds only those: a gap after it does not matter). Stopping short at
        // a gap, a time target restored an older state than asked for, and said nothing.
        // Past a gap, a pipelined writer's unacknowledged tail (see
        // `store::unacknowledged_tail`) is left out: nothing acknowledged is in it. Whether
        // it is one is judged on every object past the gap, those stored after a time
        // target too: a few before the time can look like a tail when more follow.
        Target::Latest | Target::Time(_) => match usable.iter().filter(|f| f.max_txid > cur).min_by_key(|f| f.min_txid)
        {
            Some(next) if crate::store::unacknowledged_tail(all.iter().filter(|f| f.max_txid > cur), cur) => {
                tracing::warn!(
                    txid = cur,
                    first_left_out = %next.key,
                    "restoring up to a gap: the objects past it were stored ahead of an upload that never landed, and were never acknowledged"
                );
                Ok(())
            }
            Some(next) => Err(RestoreError::Gap {
                after: cur,
                next: cur + 1,
                found: next.key.to_string(),
            }),
            None => Ok(()),
        },
    }
}

/// Restores `target` from `store` into `output`, which must not exist. A live replica's
/// retention deletes objects a compacted file has covered: one deleted between the listing
/// and its fetch makes the restore list and plan again (a few times), not fail.
///
/// # Errors
/// See [`RestoreError`]; on any error no file is left at `output`.
pub async fn restore(
    store: &Store,
    output: &Path,
    target: Target,
    progress: Option<Progress<'_>>,
) -> Result<Restored, RestoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match restore_from(store, output, target, None, progress).await {
            Err(RestoreError::Store(StoreError::NotFound { key })) if attempt < REPLANS => {
                tracing::info!(%key, "an object was deleted since the listing (retention on a live replica); listing and planning again");
            }
            other => return other,
        }
    }
}

/// How many times [`restore`] plans, when objects keep disappearing under it.
const REPLANS: usize = 3;

/// [`restore`] from one listing and one plan: an object deleted since the listing fails it
/// with [`StoreError::NotFound`], for callers that plan again themselves and must know that
/// they did (a verification, for which a TXID compacted away meanwhile is no verdict).
///
/// # Errors
/// See [`RestoreError`]; on any error no file is left at `output`.
pub async fn restore_planned_once(store: &Store, output: &Path, target: Target) -> Result<Restored, RestoreError> {
    restore_from(store, output, target, None, None).await
}

/// [`restore`] of the latest state, planned from `recent`: a [`Store::list_recent`] listing
/// the caller has just made (start-up lists once, both to decide whether to restore and to
/// restore, rather than paying the listing's round trips twice).
///
/// # Errors
/// See [`RestoreError`]; on any error no file is left at `output`.
pub async fn restore_latest_listed(
    store: &Store,
    output: &Path,
    recent: &[LtxObject],
) -> Result<Restored, RestoreError> {
    restore_from(store, output, Target::Latest, Some(recent), None).await
}

/// The suffixes of the files SQLite keeps beside a database: its WAL, shared memory and
/// rollback journal.
pub const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// The files SQLite would read with a database at `db` (its WAL, shared memory, rollback
/// journal) that exist.
pub fn leftovers(db: &Path) -> Vec<PathBuf> {
    SIDE_FILES
        .into_iter()
        .map(|suffix| {
            let mut path = db.as_os_str().to_owned();
            path.push(suffix);
            PathBuf::from(path)
        })
        .filter(|path| path.exists())
        .collect()
}

async fn restore_from(
    store: &Store,
    output: &Path,
    target: Target,
    recent: Option<&[LtxObject]>,
    progress: Option<Progress<'_>>,
) -> Result<Restored, RestoreError> {
    if output.exists() {
        return Err(RestoreError::OutputExists(output.to_owned()));
    }
    // SQLite ties no WAL to its database file: one left beside the output (its database moved
    // away, the WAL not) would be applied over the restored pages when it is first opened, and
    // the replicator would ship that mix as the next TXID.
    if let Some(leftover) = leftovers(output).into_iter().next() {
        return Err(RestoreError::LeftoverBeside(leftover));
    }
    let started = std::time::Instant::now();
    let recent = match (target, recent) {
        (Target::Latest, Some(recent)) => Some(recent.to_vec()),
        (Target::Latest, None) => Some(store.list_recent().await?),
        _ => None,
    };
    let files = match recent {
        // The tail past the compacted levels, not the whole history (see
        // `Store::list_recent`); the whole listing if that holds no chain.
        Some(recent) => match plan(&recent, target, &store.describe()) {
            Ok(files) => files,
            Err(e) => {
                tracing::debug!(error = %e, "no chain in the recent files; listing the whole replica");
                plan(&store.list_all().await?, target, &store.describe())?
            }
        },
        None => {
            let mut files = store.list_all().await?;
            if let Target::Time(_) = target {
                // An object deleted since the listing (retention, on a live replica) may
                // have been replaced by a cover the listing missed: list again, and only
                // then plan (a plan without it could stop short at a gap, silently).
                let mut attempts = 0;
                files = loop {
                    attempts += 1;
                    match stamp_creation_times(store, files).await {
                        Ok(stamped) => break stamped,
                        Err(StoreError::NotFound { .. }) if attempts < 3 => files = store.list_all().await?,
                        Err(e) => return Err(e.into()),
                    }
                };
            }
            plan(&files, target, &store.describe())?
        }
    };
    let listed = started.elapsed();
    remove_abandoned_temps(output);
    let temp = temp_path(output);
    // The checksum recorded for the TXID the plan reaches (two round trips on a cloud store)
    // is fetched while the files are applied, not after.
    let reached = files.last().map_or(0, |f| f.max_txid);
    let (result, recorded) = tokio::join!(
        apply_all(store, &files, &temp, target, progress),
        crate::verify::recorded_checksum(store, reached)
    );
    let applied = started.elapsed();
    let result = match result {
        Ok((restored, file)) => match sync_and_check(file, &temp).await {
            Ok(()) => {
                // The chain check makes the TXID reached the plan's; should it ever differ,
                // the record of the TXID actually restored is the one that counts.
                let recorded = match restored.txid == reached {
                    true => recorded,
                    false => crate::verify::recorded_checksum(store, restored.txid).await,
                };
                compare_recorded_checksum(recorded, &temp, restored).await
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    // Where a restore's time goes, for operators and the cold-start benchmark.
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    tracing::info!(
        files = files.len(),
        list_ms = ms(listed),
        apply_ms = ms(applied - listed),
        check_ms = ms(started.elapsed() - applied),
        "restore phases"
    );
    match result {
        Ok(restored) => {
            if let Err(source) = rename_no_replace(&temp, output) {
                let _ = std::fs::remove_file(&temp);
                return Err(match source.kind() {
                    std::io::ErrorKind::AlreadyExists => RestoreError::OutputExists(output.to_owned()),
                    _ => RestoreError::Io {
                        path: output.to_owned(),
                        source,
                    },
                });
            }
            sync_dir(output);
            Ok(restored)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Replaces each file's listed time (on S3, the upload time rounded to the second) with its
/// CreatedAt — the header timestamp keycast and Litestream record with every object — which
/// is what a point-in-time restore must compare. Costs one HEAD per object on cloud stores.
///
/// # Errors
/// `NotFound` for an object gone since the listing: on a live replica retention deletes the
/// oldest level-0 files every few seconds, and a HEAD per object takes long enough to meet
/// one (the caller lists again).
async fn stamp_creation_times(store: &Store, files: Vec<LtxObject>) -> Result<Vec<LtxObject>, StoreError> {
    futures::stream::iter(files.into_iter().map(|mut file| {
        let store = store.clone();
        async move {
            file.created_at = store.created_at(&file).await?;
            Ok(file)
        }
    }))
    .buffered(DEFAULT_FETCH_CONCURRENCY)
    .try_collect()
    .await
}

/// Renames `from` to `to` unless `to` exists (`AlreadyExists` then), in one step: the output
/// was checked to be absent before the restore, which may take minutes, and something may
/// have appeared there since — a keycast that restored and opened its own database there.
/// A plain rename would replace it under the running process.
pub(crate) fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if done == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // A file system, kernel or sandbox without it: a hard link fails on an existing name
        // too; where links are not supported either, a check just before a plain rename.
        Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP) => match std::fs::hard_link(from, to) {
            Ok(()) => {
                // In place now: a leftover temporary name is no reason to fail the restore.
                let _ = std::fs::remove_file(from);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
            Err(_) if to.exists() => Err(std::io::ErrorKind::AlreadyExists.into()),
            Err(_) => std::fs::rename(from, to),
        },
        _ => Err(err),
    }
}

/// Where a restore to `output` is built: `<output>.restore-<pid>-<random>.tmp`, beside it.
/// The random part because a restore killed outright (SIGKILL, out of memory) leaves its
/// file behind, and in a container keycast is always process 1: a name from the pid alone
/// made every later restore to that output fail on the leftover.
fn temp_path(output: &Path) -> PathBuf {
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).expect("the OS random number generator is unavailable");
    let mut name = temp_prefix(output);
    name.push(format!("{}-{:08x}.tmp", std::process::id(), u32::from_le_bytes(random)));
    output.with_file_name(name)
}

fn temp_prefix(output: &Path) -> std::ffi::OsString {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".restore-");
    name
}

/// How long a restore's temporary file goes unwritten before it counts as a killed
/// restore's: far longer than a restore spends between writes (its final check reads a large
/// database for seconds).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether `path` — a file, or a directory and the entries directly in it — has gone
/// unwritten for longer than [`ABANDONED_AFTER`]: left by a process killed outright.
pub fn abandoned(path: &Path) -> bool {
    let old = |path: &Path| {
        std::fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > ABANDONED_AFTER))
    };
    old(path)
        && std::fs::read_dir(path)
            .map(|entries| entries.flatten().all(|entry| old(&entry.path())))
            .unwrap_or(true)
}

/// Removes what killed restores to `output` left behind (each as large as the database, on a
/// disk that may be memory); a restore still under way writes its file and is left alone.
fn remove_abandoned_temps(output: &Path) {
    let prefix = temp_prefix(output);
    let prefix = prefix.as_encoded_bytes();
    for path in abandoned_beside(output, |name| {
        // `<pid>.tmp` (before the random part) or `<pid>-<8 hex>.tmp`: not another output's
        // temporary file whose name happens to start the same (`a.db.restore-x.db`).
        name.as_encoded_bytes()
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(b".tmp"))
            .is_some_and(|id| {
                let (pid, random) = id.split_at(id.iter().position(|b| *b == b'-').unwrap_or(id.len()));
                !pid.is_empty()
                    && pid.iter().all(u8::is_ascii_digit)
                    && (random.is_empty() || random.len() == 9 && random[1..].iter().all(u8::is_ascii_hexdigit))
            })
    }) {
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed a restore's temporary file left by a restore that was killed");
        }
    }
}

/// The entries beside `output` (in its directory) whose names `ours` accepts and that are
/// [`abandoned`]: see [`abandoned_in`].
pub fn abandoned_beside(output: &Path, ours: impl Fn(&std::ffi::OsStr) -> bool) -> Vec<PathBuf> {
    let dir = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    abandoned_in(dir, ours)
}

/// The files and directories in `dir` (never a symbolic link) whose names `ours` accepts and
/// that are [`abandoned`].
pub fn abandoned_in(dir: &Path, ours: impl Fn(&std::ffi::OsStr) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| ours(&entry.file_name()) && entry.file_type().is_ok_and(|t| !t.is_symlink()))
        .map(|entry| entry.path())
        .filter(|path| abandoned(path))
        .collect()
}

/// Fetches files (several ahead, in parallel) and applies them in plan order into `temp`,
/// then trims it to the final size and checks every page is there. Returns the file, not
/// yet flushed to disk.
async fn apply_all(
    store: &Store,
    files: &[LtxObject],
    temp: &Path,
    target: Target,
    progress: Option<Progress<'_>>,
) -> Result<(Restored, File), RestoreError> {
    let io_err = |source| RestoreError::Io {
        path: temp.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(io_err)?;
    let (applied, file) = crate::apply::apply_files(
        store,
        files,
        file,
        temp,
        0,
        progress,
        crate::apply::Fetching::from_store(DEFAULT_FETCH_CONCURRENCY),
    )
    .await?;
    if let Some(stale) = &applied.stale {
        // What follows the newer writer's last TXID is not part of its history: the latest
        // state (or the newest before a time) is the one before it; a TXID past it is not
        // in the replica at all.
        if let Target::Txid(wanted) = target {
            return Err(RestoreError::TxidUnreachable {
                wanted,
                reached: applied.txid,
                next: None,
            });
        }
        tracing::warn!(
            txid = applied.txid,
            left_out = %stale.key,
            "restoring up to an object stored late by an instance that had lost the replica: it and what follows it are left out"
        );
    }
    if let (Target::Time(time), Some((written_ms, object))) = (target, &applied.latest_written) {
        // The plan chose files by the time the store lists them with (metadata, or the
        // mtime), which whoever can write the bucket may change without the replica key; on
        // an encrypted replica the header's time is covered by the file's tag. A second of
        // slack: an object without timestamp metadata (Litestream 0.5.0's, or copied by a
        // tool that drops it) lists with its upload time in whole seconds, which may read
        // before a header written in the same second.
        let written = header_time(*written_ms);
        if written >= time + Duration::from_secs(1) {
            return Err(RestoreError::WrittenAfterTarget {
                key: object.key.to_string(),
                listed: rfc3339(object.created_at),
                written: rfc3339(written),
                target: rfc3339(time),
            });
        }
    }
    let (commit, page_size) = (applied.commit, applied.page_size);
    let finished = tokio::task::spawn_blocking(move || -> Result<File, RestoreError> {
        file.set_len(u64::from(commit) * u64::from(page_size))
            .map_err(|source| RestoreError::Io {
                path: PathBuf::new(),
                source,
            })?;
        missing_page(&applied.written, commit, page_size)
            .map_or(Ok(file), |pgno| Err(RestoreError::MissingPage { pgno, pages: commit }))
    })
    .await
    .map_err(|e| io_err(std::io::Error::other(e.to_string())))?;
    let file = finished.map_err(|e| match e {
        RestoreError::Io { source, .. } => io_err(source),
        e => e,
    })?;
    let restored = Restored {
        txid: applied.txid,
        pages: commit,
        page_size,
        files: files.len(),
        bytes: applied.bytes,
        newest_writer: applied.newest_writer,
        written_at_ms: applied.last.as_ref().map(|h| h.timestamp_ms),
        stale: applied.stale.map(|f| f.key.to_string()),
    };
    Ok((restored, file))
}

/// A header's time (ms since the Unix epoch) as a `SystemTime`.
fn header_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// `time` the way `replica ls` and `--timestamp` spell it.
fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Flushes the complete temporary file to disk while SQLite checks it (both only read it),
/// instead of one after the other; the file is renamed into place only once both succeed.
async fn sync_and_check(file: File, temp: &Path) -> Result<(), RestoreError> {
    let sync = tokio::task::spawn_blocking(move || file.sync_all());
    let (synced, checked) = tokio::join!(sync, verify_integrity(temp));
    joined_io(synced, temp)?;
    checked
}

/// A blocking task's I/O result (its panic as an I/O error too), as an error naming `path`.
fn joined_io<T>(joined: Result<std::io::Result<T>, tokio::task::JoinError>, path: &Path) -> Result<T, RestoreError> {
    joined
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| RestoreError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The first page in 1..=commit (the lock page aside) that no file wrote.
pub(crate) fn missing_page(written: &crate::apply::PageSet, commit: u32, page_size: u32) -> Option<u32> {
    let lock = crate::checksum::lock_page(page_size);
    (1..=commit).find(|pgno| *pgno != lock && !written.contains(*pgno))
}

/// Where keycast recorded the live database's checksum for the restored TXID (its background
/// verification does; `recorded` is what was found for it), the restored file must have
/// exactly that checksum.
async fn compare_recorded_checksum(
    recorded: Result<Option<u64>, RestoreError>,
    temp: &Path,
    restored: Restored,
) -> Result<Restored, RestoreError> {
    let Some(recorded) = recorded? else {
        return Ok(restored);
    };
    let (path, page_size) = (temp.to_owned(), restored.page_size);
    let actual = joined_io(
        tokio::task::spawn_blocking(move || crate::checksum::copy_checksum_path(&path, page_size)).await,
        temp,
    )?;
    if actual != recorded {
        return Err(RestoreError::ChecksumMismatch {
            txid: restored.txid,
            restored: actual,
            recorded,
        });
    }
    Ok(restored)
}

/// Opens the restored file read-only and immutable (so no `-wal`/`-shm` appear) and runs
/// SQLite's full integrity check.
async fn verify_integrity(path: &Path) -> Result<(), RestoreError> {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true);
    let mut conn = options
        .connect()
        .await
        .map_err(|e| RestoreError::Integrity(e.to_string()))?;
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| RestoreError::Integrity(e.to_string()))?;
    let _ = conn.close().await;
    if rows == ["ok"] {
        Ok(())
    } else {
        Err(RestoreError::Integrity(
            rows.into_iter().take(5).collect::<Vec<_>>().join("; "),
        ))
    }
}

/// Makes a rename or removal of `path` durable. Best effort: some filesystems refuse to
/// fsync a directory.
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx;

    fn obj(level: u8, min: u64, max: u64, secs: u64) -> LtxObject {
        LtxObject {
            level,
            min_txid: min,
            max_txid: max,
            size: 1,
            created_at: UNIX_EPOCH + Duration::from_secs(secs),
            key: format!("ltx/{level}/{}", ltx::file_name(min, max)).into(),
        }
    }

    fn ranges(plan: &[LtxObject]) -> Vec<(u8, u64, u64)> {
        plan.iter().map(|f| (f.level, f.min_txid, f.max_txid)).collect()
    }

    #[test]
    fn latest_prefers_snapshot_then_compactions_then_l0() {
        let files = vec![
            obj(0, 1, 1, 1),
            obj(0, 2, 2, 2),
            obj(0, 3, 3, 3),
            obj(0, 4, 4, 4),
            obj(1, 1, 3, 3),
            obj(9, 1, 2, 5),
        ];
        let p = plan(&files, Target::Latest, "r").unwrap();
        assert_eq!(ranges(&p), vec![(9, 1, 2), (1, 1, 3), (0, 4, 4)]);
    }

    #[test]
    fn a_gap_is_an_error_naming_the_missing_txid() {
        // Further past the gap than a pipeline reaches, or compacted: a damaged replica.
        for past in [obj(0, 7, 7, 7), obj(1, 3, 4, 4), obj(0, 3, 4, 4)] {
            let files = vec![obj(0, 1, 1, 1), obj(0, 3, 3, 3), past];
            let err = plan(&files, Target::Latest, "r").unwrap_err();
            assert!(matches!(err, RestoreError::Gap { after: 1, next: 2, .. }), "{err}");
            assert_eq!(
                crate::store::tip(&files),
                files.iter().map(|f| f.max_txid).max().unwrap()
            );
        }
    }

    #[test]
    fn a_pipelined_tail_past_a_gap_is_left_out_and_is_not_the_tip() {
        // TXID 3 never landed; 4 and 5 were uploaded beside it and never acknowledged.
        let files = vec![obj(0, 1, 1, 1), obj(0, 2, 2, 2), obj(0, 4, 4, 4), obj(0, 5, 5, 5)];
        assert_eq!(
            ranges(&plan(&files, Target::Latest, "r").unwrap()),
            vec![(0, 1, 1), (0, 2, 2)]
        );
        assert_eq!(crate::store::tip(&files), 2);
        // Without a gap the tip is the newest file.
        let whole = vec![obj(0, 1, 1, 1), obj(0, 2, 2, 2), obj(0, 3, 3, 3)];
        assert_eq!(crate::store::tip(&whole), 3);
        assert_eq!(crate::store::tip(&[]), 0);
    }

    #[test]
    fn txid_target_stops_exactly_there_or_fails() {
        let files = vec![obj(0, 1, 1, 1), obj(0, 2, 2, 2), obj(0, 3, 3, 3), obj(1, 1, 3, 3)];
        assert_eq!(
            ranges(&plan(&files, Target::Txid(2), "r").unwrap()),
            vec![(0, 1, 1), (0, 2, 2)]
        );
        let only_compacted = vec![obj(1, 1, 3, 3)];
        assert!(matches!(
            plan(&only_compacted, Target::Txid(2), "r"),
            Err(RestoreError::NoSnapshot { .. })
        ));
        assert!(matches!(
            plan(&files, Target::Txid(9), "r"),
            Err(RestoreError::TxidUnreachable {
                wanted: 9,
                reached: 3,
                next: None
            })
        ));
    }

    /// Past level-0 retention only compacted files' ends restore. A TXID inside one said
    /// "the newest restorable TXID is" the one before the file, as if nothing after it did;
    /// the error now names the nearest ones on both sides.
    #[test]
    fn a_txid_inside_a_compacted_file_names_the_nearest_that_restore() {
        let files = vec![obj(1, 1, 10, 10), obj(1, 11, 20, 20), obj(0, 20, 20, 20)];
        let err = plan(&files, Target::Txid(15), "r").unwrap_err();
        assert!(
            matches!(
                err,
                RestoreError::TxidUnreachable {
                    wanted: 15,
                    reached: 10,
                    next: Some(20)
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("the nearest TXIDs that restore are 10 and 20"),
            "{err}"
        );
    }

    #[test]
    fn time_target_uses_only_files_created_before_it() {
        let files = vec![obj(0, 1, 1, 10), obj(0, 2, 2, 20), obj(0, 3, 3, 30)];
        let at = |s| Target::Time(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(ranges(&plan(&files, at(25), "r").unwrap()), vec![(0, 1, 1), (0, 2, 2)]);
        assert!(matches!(plan(&files, at(5), "r"), Err(RestoreError::TimeUnreachable)));
    }

    /// An object lost before the time asked for: the restore stopped at the gap and
    /// restored an older state than asked for, hours short perhaps, and said nothing (the
    /// latest restore of the same replica is refused). A gap after the time does not matter.
    #[test]
    fn a_time_target_refuses_a_gap_before_it_but_not_one_after() {
        // (More objects past the gap than uploads are ever in flight together: not the
        // unacknowledged tail of a pipelined writer, which a restore leaves out.)
        let mut files = vec![obj(0, 1, 1, 10)];
        files.extend((3..=9).map(|txid| obj(0, txid, txid, 10 * txid)));
        let at = |s| Target::Time(UNIX_EPOCH + Duration::from_secs(s));
        // Only two objects past the gap before the time: they looked like a pipelined
        // writer's unacknowledged tail, though five more follow.
        assert!(
            matches!(
                plan(&files, at(45), "r"),
                Err(RestoreError::Gap { after: 1, next: 2, .. })
            ),
            "{:?}",
            plan(&files, at(45), "r")
        );
        assert!(
            matches!(
                plan(&files, at(95), "r"),
                Err(RestoreError::Gap { after: 1, next: 2, .. })
            ),
            "{:?}",
            plan(&files, at(95), "r")
        );
        assert_eq!(ranges(&plan(&files, at(25), "r").unwrap()), vec![(0, 1, 1)]);
    }

    #[test]
    fn without_a_full_first_file_there_is_nothing_to_restore() {
        let files = vec![obj(0, 2, 2, 1)];
        assert!(matches!(
            plan(&files, Target::Latest, "r"),
            Err(RestoreError::NoSnapshot { first_min: 2 })
        ));
        assert!(matches!(plan(&[], Target::Latest, "r"), Err(RestoreError::Empty(_))));
    }
}
