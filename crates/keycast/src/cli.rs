//! The replica commands of the CLI: `keycast restore`, `keycast replica status`,
//! `keycast replica ls`. Each prints for people by default and JSON with `--json`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use keycast_replica::crypt::ObjectCipher;
use keycast_replica::lease::LeaseOptions;
use keycast_replica::local_state;
use keycast_replica::restore::{self, Target};
use keycast_replica::Store;
use serde_json::json;

/// Opens the replica at `url` (`--replica`, else `KEYCAST_REPLICA_URL`), decrypting with
/// `encryption` (`KEYCAST_REPLICA_ENCRYPTION_KEY`) when given.
///
/// # Errors
/// A missing or unusable URL, naming where it came from.
pub fn open(url: Option<&str>, encryption: Option<ObjectCipher>) -> anyhow::Result<Store> {
    let (url, origin) = match url {
        Some(u) => (u.to_owned(), "--replica"),
        None => (
            std::env::var("KEYCAST_REPLICA_URL")
                .context("no replica given: pass --replica URL or set KEYCAST_REPLICA_URL")?,
            "KEYCAST_REPLICA_URL",
        ),
    };
    let store = Store::from_url(&url, &|name| std::env::var(name).ok())
        .with_context(|| format!("invalid {origin}={}", keycast_db::pool::redact_url(&url)))?
        .with_context(|| format!("{origin}=none: there is no replica to read"))?;
    Ok(match encryption {
        Some(cipher) => store.with_encryption(cipher),
        None => store,
    })
}

/// Parses `--txid`: 16 hex digits (as Litestream prints them) or a decimal number.
///
/// # Errors
/// Anything else.
pub fn parse_txid(v: &str) -> anyhow::Result<u64> {
    let parsed = if v.len() == 16 {
        u64::from_str_radix(v, 16).ok()
    } else {
        v.parse().ok()
    };
    parsed
        .filter(|t| *t > 0)
        .with_context(|| format!("--txid {v}: expected a TXID, as 16 hex digits or a decimal number ≥ 1"))
}

/// Parses `--timestamp` (RFC 3339).
///
/// # Errors
/// A malformed time.
pub fn parse_time(v: &str) -> anyhow::Result<SystemTime> {
    let t = chrono::DateTime::parse_from_rfc3339(v)
        .with_context(|| format!("--timestamp {v}: expected RFC 3339, e.g. 2026-11-28T07:00:00Z"))?;
    Ok(SystemTime::from(t))
}

/// `keycast restore`.
///
/// # Errors
/// Restore errors, naming the object at fault.
/// A restore of "the latest state" from a replica whose newest objects are gone would quietly
/// be an older state: the lease's high-water mark says how far the replica reached.
///
/// Returns the mark, which the restore must then reach too.
async fn refuse_truncated(store: &Store) -> anyhow::Result<Option<u64>> {
    let Some(recorded) = keycast_replica::lease::recorded_txid(store).await? else {
        return Ok(None);
    };
    let reached = store.list_all().await?.iter().map(|f| f.max_txid).max().unwrap_or(0);
    if reached < recorded {
        bail!(
            "the replica {} reaches only TXID {reached} ({reached:016x}), but its lease records TXID {recorded} as \
             replicated: its newest objects are missing. Restore them, or pass --txid {reached} to restore the older \
             state knowingly",
            store.describe()
        );
    }
    Ok(Some(recorded))
}

pub async fn restore_cmd(
    store: &Store,
    output: &Path,
    target: Target,
    force: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let replacing = output.exists();
    if replacing && !force {
        bail!("{} already exists; pass --force to replace it", output.display());
    }
    if replacing {
        if let Some(pid) = keycast_replica::db_file::opened_elsewhere(output)
            .with_context(|| format!("cannot tell whether {} is in use", output.display()))?
        {
            bail!(
                "{} is open in process {pid} (a running keycast?): replacing a database in use loses what it \
                 commits next. Stop that process first",
                output.display()
            );
        }
    }
    // A database being replaced stays as it is until the restore has succeeded: the restore
    // is written beside it and renamed over it only then.
    if replacing {
        remove_abandoned_restorings(output);
    }
    let restoring = if replacing {
        // Not from the pid alone: a restore killed outright leaves this name behind, and in a
        // container every run is process 1.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        sibling(output, &format!(".restoring-{}-{nanos}", std::process::id()))
    } else {
        if force {
            // A WAL left without its database would be applied over the restore: kept beside,
            // renamed, since it may hold the moved database's last commits.
            keycast_replica::bootstrap::move_leftovers_aside(output)
                .with_context(|| format!("cannot move aside what is left beside {}", output.display()))?;
        }
        output.to_owned()
    };
    let recorded = match target {
        Target::Latest => refuse_truncated(store).await?,
        _ => None,
    };
    let bar = progress_bar(as_json);
    let report = |done: usize, total: usize, bytes: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(format!("{:.1} MiB", bytes as f64 / 1048576.0));
        }
    };
    let started = std::time::Instant::now();
    let restored = restore::restore(store, &restoring, target, Some(&report)).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Objects past a missing one look like uploads that were never acknowledged, and the
    // restore stops before the gap: short of the mark, that was acknowledged state.
    if let Some(recorded) = recorded.filter(|r| *r > restored.txid) {
        let _ = std::fs::remove_file(&restoring);
        bail!(
            "the restore of {} stopped at TXID {} ({:016x}), short of TXID {recorded} that its lease records as \
             replicated: an object in between is missing or could not be applied. Restore it, or pass --txid {} to \
             restore the older state knowingly",
            store.describe(),
            restored.txid,
            restored.txid,
            restored.txid
        );
    }
    if let Some(ms) = pause_before_replacing() {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if replacing {
        // Asked again: a keycast started during the restore (minutes, on a large database)
        // would have the file renamed from under it, and write its next commits to the old one.
        let in_use = keycast_replica::db_file::opened_elsewhere(output)
            .with_context(|| format!("cannot tell whether {} is in use", output.display()));
        if in_use.is_err() {
            let _ = std::fs::remove_file(&restoring);
        }
        if let Some(pid) = in_use? {
            let _ = std::fs::remove_file(&restoring);
            bail!(
                "{} was opened by process {pid} (a keycast started?) while the restore ran: it is left as it was. \
                 Stop that process and restore again",
                output.display()
            );
        }
    }
    // Before the rename: a replication record left from the database that was there would let
    // `serve` resume shipping this one as that one's continuation. Interrupted between the two,
    // the old database without its record is refused at the next start, never shipped.
    keycast_replica::local_state::remove(output);
    if replacing {
        // The old database's WAL would be applied to the new file on its next open.
        for leftover in restore::leftovers(output) {
            let _ = std::fs::remove_file(leftover);
        }
        // Each step durable before the next: after a power cut the old database must not
        // come back with its record (resumed as if nothing happened) or its WAL.
        restore::sync_dir(output);
        std::fs::rename(&restoring, output)
            .with_context(|| format!("cannot move the restored database over {}", output.display()))?;
        restore::sync_dir(output);
    }
    // The state's own time: a `--timestamp` restore reaches the newest state before the time
    // asked for, which may be well before it.
    let written_at = restored
        .written_at_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    if as_json {
        println!(
            "{}",
            json!({ "output": output, "txid": restored.txid, "written_at": written_at, "files": restored.files,
                    "bytes": restored.bytes, "pages": restored.pages, "page_size": restored.page_size,
                    "seconds": started.elapsed().as_secs_f64() })
        );
    } else {
        println!(
            "restored {} at TXID {} ({:016x}, written {}) from {} files, {} bytes, in {:.2} s; integrity check ok",
            output.display(),
            restored.txid,
            restored.txid,
            written_at.as_deref().unwrap_or("at an unknown time"),
            restored.files,
            restored.bytes,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Fault injection: a pause (ms) after a restore, before it replaces the database (fail
/// point `restore-before-replacing`): the window in which a keycast may start on it.
fn pause_before_replacing() -> Option<u64> {
    fail::fail_point!("restore-before-replacing", |ms: Option<String>| ms
        .and_then(|m| m.parse().ok()));
    None
}

/// `path` with `suffix` appended to its file name.
/// Removes what `restore --force` runs killed outright (SIGKILL, out of memory) left beside
/// `output`: `<output>.restoring-<pid>-<nanos>`, and the restore's own temporary file beside
/// that (`….restore-<pid>-<hex>.tmp`), each as large as the database. Their names change with
/// every run, so the restore's own clean-up, which looks for its output's name, never met
/// them. One still being written (another restore under way) is left alone.
fn remove_abandoned_restorings(output: &Path) {
    let Some(name) = output.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let prefix = format!("{name}.restoring-");
    let ours = |file: &std::ffi::OsStr| {
        file.to_str().is_some_and(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
    };
    for path in keycast_replica::restore::abandoned_beside(output, ours) {
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed what a restore --force that was killed left behind");
        }
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A progress bar on a terminal only (never in JSON mode or in logs).
fn progress_bar(as_json: bool) -> Option<indicatif::ProgressBar> {
    if as_json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template("restoring [{bar:30}] {pos}/{len} files, {msg}") {
        bar.set_style(style);
    }
    Some(bar)
}

/// `keycast replica ls`.
///
/// # Errors
/// Store errors.
pub async fn ls_cmd(store: &Store, as_json: bool) -> anyhow::Result<()> {
    let files = store.list_all().await?;
    if as_json {
        let rows: Vec<_> = files
            .iter()
            .map(|f| {
                json!({ "level": f.level, "min_txid": f.min_txid, "max_txid": f.max_txid, "size": f.size,
                             "created_at": rfc3339(f.created_at), "key": f.key.to_string() })
            })
            .collect();
        println!("{}", json!({ "replica": store.describe(), "files": rows }));
        return Ok(());
    }
    println!("replica: {}", store.describe());
    println!("{:<6} {:<35} {:>12}  created", "level", "txids", "bytes");
    for f in &files {
        let kind = if f.level == 9 {
            "9 snap".to_owned()
        } else {
            f.level.to_string()
        };
        println!(
            "{kind:<6} {:<35} {:>12}  {}",
            format!("{:016x}-{:016x}", f.min_txid, f.max_txid),
            f.size,
            rfc3339(f.created_at)
        );
    }
    println!("{} files", files.len());
    Ok(())
}

/// `keycast replica status`: the local record (what this machine shipped) against the replica.
///
/// # Errors
/// Store or local-record errors.
pub async fn status_cmd(store: &Store, db: &Path, as_json: bool) -> anyhow::Result<()> {
    let replicated = store.list_all().await?.iter().map(|f| f.max_txid).max().unwrap_or(0);
    // A lease object nobody can read is worth saying, not a reason to say nothing else.
    let holder = keycast_replica::lease::holder(store).await.map_err(|e| e.to_string());
    let record = local_state::load(db)?;
    let pending = unshipped_wal_bytes(db, record.as_ref());
    let lag = match (&record, pending) {
        (Some(r), p) if p > 0 => Some(age(r.updated_at_ms)),
        _ => None,
    };
    let doc = json!({
        "replica": store.describe(),
        "database": db,
        "replicated_txid": replicated,
        "lease": match &holder {
            Ok(h) => json!(h.as_ref().map(|h| json!({
                "owner": h.owner, "epoch": h.epoch, "released": h.released, "expires_at_ms": h.expires_at_ms,
                "handover_requested_by": h.handover_requested_by }))),
            Err(e) => json!({ "unreadable": e }),
        },
        "local_txid": record.as_ref().map(|r| r.txid),
        "unshipped_wal_bytes": pending,
        "lag_seconds": lag.map(|d| d.as_secs_f64()),
        "clean_shutdown": record.as_ref().map(|r| r.clean),
        "last_error": record.as_ref().and_then(|r| r.last_error.clone()),
        "in_sync": record.as_ref().is_some_and(|r| r.txid == replicated && pending == 0),
        "verification": record.as_ref().and_then(|r| r.verification.as_ref()).map(|v| json!({
            "txid": v.txid, "ok": v.error.is_none(), "error": v.error, "at_ms": v.at_ms })),
    });
    if as_json {
        println!("{doc}");
        return Ok(());
    }
    println!("replica:          {}", store.describe());
    println!("replicated TXID:  {replicated}");
    match &holder {
        Err(e) => println!("lease:            unreadable ({e})"),
        Ok(None) => println!("lease:            none (no instance has written this replica)"),
        Ok(Some(h)) if h.released => println!("lease:            free (given back by {}, epoch {})", h.owner, h.epoch),
        Ok(Some(h)) => {
            let left_ms = h.expires_at_ms - now_unix_ms();
            let when = if left_ms > 0 {
                format!("renewed, runs out in {} s", left_ms / 1000)
            } else {
                format!("not renewed for {} s (idle, or gone)", -left_ms / 1000)
            };
            println!("lease:            {} (epoch {}), {when}", h.owner, h.epoch);
            if let Some(by) = &h.handover_requested_by {
                println!("                  asked for by {by}");
            }
        }
    }
    match &record {
        Some(r) => {
            println!("local TXID:       {} ({})", r.txid, db.display());
            println!(
                "unshipped WAL:    {pending} bytes{}",
                lag.map(|d| format!(", oldest about {} s", d.as_secs()))
                    .unwrap_or_default()
            );
            println!(
                "last stop:        {}",
                if r.clean { "clean" } else { "running or crashed" }
            );
            println!("last error:       {}", r.last_error.as_deref().unwrap_or("none"));
            match &r.verification {
                Some(v) => println!(
                    "last verification: TXID {} {}",
                    v.txid,
                    v.error.as_deref().map_or("ok".to_owned(), |e| format!("FAILED: {e}"))
                ),
                None => println!("last verification: none yet"),
            }
        }
        None => println!(
            "local TXID:       unknown (no replication record next to {})",
            db.display()
        ),
    }
    Ok(())
}

/// Bytes of committed WAL frames past the shipped position (0 if the WAL is gone or fully
/// shipped). Measured to the last commit of the WAL's current generation, not to the file's
/// end: SQLite restarts the WAL in place after a checkpoint without shrinking it, and the old
/// generation's frames past the new ones are nobody's (the file's length made a shipped WAL
/// look tens of kilobytes behind, and ever older).
fn unshipped_wal_bytes(db: &Path, record: Option<&local_state::LocalState>) -> u64 {
    let Ok(Some(end)) = keycast_replica::segment::wal_end(db) else {
        return 0;
    };
    match record.and_then(|r| r.wal) {
        Some(cursor) if (cursor.salt1, cursor.salt2) == (end.salt1, end.salt2) => {
            end.offset.saturating_sub(cursor.offset)
        }
        // A generation the record does not know: whatever it holds was committed since.
        _ => end.offset.saturating_sub(keycast_replica::wal::WAL_HEADER_SIZE),
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn age(ms: i64) -> Duration {
    let then = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    SystemTime::now().duration_since(then).unwrap_or_default()
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `keycast replica verify`: every object's CRC, a full restore with `integrity_check`, and the
/// recorded checksum of the restored TXID where keycast recorded one.
///
/// # Errors
/// The first bad object (named), a failed restore, or a checksum mismatch.
/// `keycast replica accept-loss`.
///
/// # Errors
/// An instance holds the lease; store errors.
pub async fn accept_loss_cmd(store: &Store, lease: LeaseOptions, as_json: bool) -> anyhow::Result<()> {
    // A mark made under another key would be refused at the next start all the same.
    crate::replication::check_encryption_key(store).await?;
    // Recording a mark does not make a replica with a hole in its chain, or without its
    // beginning, restorable: the next start would still stop there (and before, it was told it
    // would not).
    match restore::plan(&store.list_all().await?, Target::Latest, &store.describe()) {
        Err(gap @ restore::RestoreError::Gap { after, .. }) => bail!(
            "{gap}: accepting the loss would not make the latest state restorable. Restore the missing object, or \
             restore TXID {after} (`keycast restore --txid {after}`) and start keycast from it on a new replica \
             location (OPERATIONS.md, point-in-time recovery into a new prefix)"
        ),
        Err(start @ restore::RestoreError::NoSnapshot { .. }) => bail!(
            "{start}: accepting the loss would not make any state restorable. Restore the missing objects (the \
             first level-0 object, or a snapshot under ltx/9/)"
        ),
        _ => {}
    }
    let owner = format!("keycast-replica-accept-loss-{}", std::process::id());
    let txid = keycast_replica::lease::accept_loss(store, &owner, lease).await?;
    if as_json {
        println!("{}", json!({ "replica": store.describe(), "txid": txid }));
    } else {
        println!(
            "the replica {} reaches TXID {txid}: recorded as its high-water mark. The next start restores that state; \
             anything acknowledged after it is lost",
            store.describe()
        );
    }
    Ok(())
}

pub async fn verify_cmd(store: &Store, scratch: &Path, as_json: bool) -> anyhow::Result<()> {
    let verified = keycast_replica::verify::verify_replica(store, scratch).await?;
    if as_json {
        println!(
            "{}",
            json!({ "replica": store.describe(), "objects": verified.objects, "bytes": verified.bytes,
                    "txid": verified.txid, "checksum": format!("{:016x}", verified.checksum), "ok": true })
        );
    } else {
        println!(
            "ok: {} objects ({} bytes) pass their checksums; the replica restores to TXID {} with checksum {:016x} and passes integrity_check",
            verified.objects, verified.bytes, verified.txid, verified.checksum
        );
    }
    Ok(())
}
