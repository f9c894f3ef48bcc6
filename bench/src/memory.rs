//! Memory of the two operations that touch the whole database at once: shipping a full
//! image of it, and restoring it. Each runs in its own process, whose peak resident set
//! (VmHWM, from `/proc/self/status` or the kernel's `ru_maxrss` for a child) is reported, so
//! the figure is the whole process — runtime, TLS, SQLite and all — not an estimate.
//!
//! - `memory`: builds a database of `--size-mb` (random 4,000-byte rows, incompressible, so
//!   the image is as large as the database), then runs `keycast-bench full-image` (a
//!   replicator starting on an empty replica ships one full image) and `keycast restore` of
//!   that replica, each as a child, and checks the restored file against the source.
//! - `full-image`: the child: ships a full image of `--db` to `--replica` and reports its own
//!   VmHWM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keycast_replica::checksum::database_checksum_path;
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};
use serde_json::{json, Value};

use crate::{emit, note, pools};

#[derive(clap::Args)]
pub struct Args {
    /// Database size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mb: u64,
    /// Directory for the database, the file replica and the restored copy.
    #[arg(long)]
    work_dir: PathBuf,
    /// Replica URL; default a `file://` directory under --work-dir. Must be empty.
    #[arg(long)]
    replica: Option<String>,
    /// The keycast binary (`cargo build --release -p keycast`).
    #[arg(long)]
    keycast_bin: PathBuf,
    /// Keep the database between runs (built once per size).
    #[arg(long)]
    reuse_db: bool,
}

#[derive(clap::Args)]
pub struct FullImageArgs {
    /// The database to ship (WAL mode, not in use by anyone else).
    #[arg(long)]
    db: PathBuf,
    /// An empty replica.
    #[arg(long)]
    replica: String,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.work_dir)?;
    let db = args.work_dir.join(format!("memory-{}.db", args.size_mb));
    if !(args.reuse_db && db.exists()) {
        build(&db, args.size_mb << 20).await?;
    }
    let page_size = keycast_replica::segment::page_size_of(&db)?;
    let expected = database_checksum_path(&db, page_size)?;
    let db_bytes = std::fs::metadata(&db)?.len();
    let replica = match &args.replica {
        Some(url) => url.clone(),
        None => {
            let dir = args.work_dir.join("memory-replica");
            let _ = std::fs::remove_dir_all(&dir);
            format!("file://{}", dir.display())
        }
    };

    note!("memory: full image of {} MiB to {replica}", db_bytes >> 20);
    let exe = std::env::current_exe()?;
    let mut upload = Command::new(exe);
    upload
        .arg("full-image")
        .arg("--db")
        .arg(&db)
        .args(["--replica", &replica]);
    let upload = measure(upload)?;
    let upload_line: Value = serde_json::from_str(upload.stdout.lines().last().unwrap_or(""))
        .with_context(|| format!("full-image printed no result: {}", upload.stderr))?;

    note!("memory: keycast restore of {replica}");
    let out = args.work_dir.join("memory-restored.db");
    let _ = std::fs::remove_file(&out);
    let mut restore = Command::new(&args.keycast_bin);
    restore.args(["restore", "--replica", &replica, "-o"]).arg(&out);
    let restore = measure(restore)?;
    let verified = database_checksum_path(&out, page_size)? == expected;
    let _ = std::fs::remove_file(&out);
    if let Some(dir) = replica.strip_prefix("file://") {
        let _ = std::fs::remove_dir_all(dir);
    }
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    emit(&json!({
        "bench": "memory",
        "replica": replica,
        "store": replica.split("://").next().unwrap_or(""),
        "db_bytes": db_bytes,
        "full_image": {
            "seconds": upload_line["seconds"],
            "vmhwm_mib": upload_line["vmhwm_mib"],
            "child_max_rss_mib": mib(upload.max_rss_kib),
            "image_bytes": upload_line["image_bytes"],
        },
        "restore": {
            "seconds": (restore.seconds * 1000.0).round() / 1000.0,
            "max_rss_mib": mib(restore.max_rss_kib),
            "verified": verified,
        },
    }));
    if !verified {
        bail!("the restored database does not match the source");
    }
    Ok(())
}

/// A database of about `target` bytes of incompressible rows, checkpointed into the file.
async fn build(db: &Path, target: u64) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm", "-replica.json"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    note!("memory: building a {} MiB database at {}", target >> 20, db.display());
    let pool = pools::plain_pool(db).await?;
    pools::create_table(&pool).await?;
    loop {
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count").fetch_one(&pool).await?;
        if pages as u64 * 4096 >= target {
            break;
        }
        sqlx::query(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 256) \
             INSERT INTO t (v) SELECT randomblob(4000) FROM c",
        )
        .execute(&pool)
        .await?;
    }
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await?;
    pool.close().await;
    Ok(())
}

/// The child: one full image, then this process's peak resident set.
pub async fn full_image(args: FullImageArgs) -> anyhow::Result<()> {
    let store = Store::from_url(&args.replica, &|n| std::env::var(n).ok())?.context("replica is none")?;
    if !store.is_empty().await? {
        bail!("replica {} is not empty", args.replica);
    }
    let _ = std::fs::remove_file(format!("{}-replica.json", args.db.display()));
    let started = Instant::now();
    let signal = CommitSignal::new();
    // Starting on an empty replica ships the whole database as TXID 1.
    let replicator = Replicator::start(
        &args.db,
        store.clone(),
        signal,
        "keycast-bench",
        ReplicaOptions::default(),
    )
    .await?;
    replicator.shutdown(Instant::now() + Duration::from_secs(600)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let image_bytes: u64 = store.list_all().await?.iter().map(|f| f.size).sum();
    emit(&json!({
        "bench": "full-image",
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "vmhwm_mib": vmhwm_mib()?,
        "image_bytes": image_bytes,
    }));
    Ok(())
}

/// This process's peak resident set (VmHWM) in MiB.
pub fn vmhwm_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmHWM in /proc/self/status")?
        .parse()?;
    Ok((kib / 1024.0 * 10.0).round() / 10.0)
}

/// What a measured child did.
pub struct Measured {
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
    /// The child's peak resident set, from `wait4`'s `ru_maxrss`.
    pub max_rss_kib: u64,
}

/// Runs `cmd` to completion and measures its time and peak resident set.
///
/// # Errors
/// The command could not run or exited unsuccessfully.
pub fn measure(mut cmd: Command) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {cmd:?}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (status, rusage) = wait4(child.id() as libc::pid_t)?;
    let seconds = started.elapsed().as_secs_f64();
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed (wait status {status}): {stdout}{stderr}");
    }
    Ok(Measured {
        stdout,
        stderr,
        seconds,
        max_rss_kib: rusage.ru_maxrss as u64,
    })
}

/// Waits for `pid` and returns its wait status and resource usage.
fn wait4(pid: libc::pid_t) -> anyhow::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter; `pid` is our own child.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals, as wait4(2) requires.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((status, rusage));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("wait4");
        }
    }
}
