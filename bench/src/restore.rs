//! Restore time: a large database is built and replicated by keycast, then `keycast restore`
//! and `litestream restore` (which reads keycast's replicas) restore that same replica in
//! turn, several times each. Every output is checked against the source's database checksum
//! (outside the timed part).
//!
//! keycast's restore always runs SQLite's full `integrity_check` before the output appears;
//! Litestream's does not by default (`-integrity-check none`), so Litestream is timed both
//! as shipped and with `-integrity-check full`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use keycast_replica::checksum::database_checksum_path;
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};
use serde_json::{json, Value};
use sqlx::SqlitePool;

use crate::litestream;
use crate::pools;
use crate::stats::median;
use crate::{emit, note};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The database grows while the replicator runs: many L0 files (and whatever the
    /// compactor made of them).
    Incremental,
    /// The database is built first, then the replicator starts and ships one full image.
    Snapshot,
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Target database size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mb: u64,
    /// Path of the database to build (its directory is created; the file must not exist).
    #[arg(long)]
    db: PathBuf,
    /// Replica URL (file:///dir or s3://bucket/prefix with AWS_ENDPOINT_URL); must be empty.
    #[arg(long)]
    replica: String,
    #[arg(long, value_enum, default_value = "incremental")]
    mode: Mode,
    /// Bytes of random blob per row (4000 fills one 4 KiB page without overflow).
    #[arg(long, default_value_t = 4000)]
    blob: u32,
    /// Rows per transaction.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Where to write the build's facts (checksum, rows, files) for `restore-time`.
    #[arg(long)]
    info: PathBuf,
}

#[derive(clap::Args)]
pub struct TimeArgs {
    /// The keycast binary (`cargo build --release -p keycast`).
    #[arg(long)]
    keycast_bin: PathBuf,
    /// The `--info` file written by `restore-db`.
    #[arg(long)]
    info: PathBuf,
    /// Restores per tool.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Where restored files are written (and deleted).
    #[arg(long)]
    work_dir: PathBuf,
    /// Also time `litestream restore -integrity-check full`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    with_integrity: bool,
}

async fn batch_insert(pool: &SqlitePool, batch: u32, blob: u32) -> anyhow::Result<()> {
    sqlx::query(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1) \
         INSERT INTO t (v) SELECT randomblob(?2) FROM c",
    )
    .bind(i64::from(batch))
    .bind(i64::from(blob))
    .execute(pool)
    .await?;
    Ok(())
}

async fn db_bytes(pool: &SqlitePool) -> anyhow::Result<u64> {
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count").fetch_one(pool).await?;
    let size: i64 = sqlx::query_scalar("PRAGMA page_size").fetch_one(pool).await?;
    Ok((pages * size) as u64)
}

async fn fill(pool: &SqlitePool, target: u64, batch: u32, blob: u32) -> anyhow::Result<()> {
    let mut last_note = Instant::now();
    while db_bytes(pool).await? < target {
        batch_insert(pool, batch, blob).await?;
        if last_note.elapsed() > Duration::from_secs(10) {
            note!("restore-db: {} MiB", db_bytes(pool).await? >> 20);
            last_note = Instant::now();
        }
    }
    Ok(())
}

pub async fn build(args: BuildArgs) -> anyhow::Result<()> {
    if args.db.exists() {
        bail!("{} exists", args.db.display());
    }
    if let Some(parent) = args.db.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let store = Store::from_url(&args.replica, &|n| std::env::var(n).ok())?.context("replica is none")?;
    if !store.is_empty().await? {
        bail!("replica {} is not empty", args.replica);
    }
    let target = args.size_mb << 20;
    let started = Instant::now();
    let signal = CommitSignal::new();
    let replicated_txid = match args.mode {
        Mode::Incremental => {
            let pool = pools::keycast_pool(&args.db, &signal).await?;
            pools::create_table(&pool).await?;
            let replicator = Replicator::start(
                &args.db,
                store.clone(),
                signal.clone(),
                "keycast-bench",
                ReplicaOptions::default(),
            )
            .await?;
            fill(&pool, target, args.batch, args.blob).await?;
            replicator.wait_durable(Duration::from_secs(600)).await?;
            pool.close().await;
            replicator.shutdown(Instant::now() + Duration::from_secs(120)).await?
        }
        Mode::Snapshot => {
            let plain = pools::plain_pool(&args.db).await?;
            pools::create_table(&plain).await?;
            fill(&plain, target, args.batch, args.blob).await?;
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&plain).await?;
            plain.close().await;
            let pool = pools::keycast_pool(&args.db, &signal).await?;
            let replicator = Replicator::start(
                &args.db,
                store.clone(),
                signal.clone(),
                "keycast-bench",
                ReplicaOptions::default(),
            )
            .await?;
            replicator.wait_durable(Duration::from_secs(600)).await?;
            pool.close().await;
            replicator.shutdown(Instant::now() + Duration::from_secs(120)).await?
        }
    };
    let build_s = started.elapsed().as_secs_f64();

    // The source's final state, folded into the file, as the restores must reproduce it.
    let pool = pools::plain_pool(&args.db).await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await?;
    let page_size: i64 = sqlx::query_scalar("PRAGMA page_size").fetch_one(&pool).await?;
    let bytes = db_bytes(&pool).await?;
    pool.close().await;
    let checksum = database_checksum_path(&args.db, page_size as u32)?;

    let files = store.list_all().await?;
    let mut per_level = serde_json::Map::new();
    for f in &files {
        let e = per_level
            .entry(f.level.to_string())
            .or_insert_with(|| json!({"files": 0, "bytes": 0}));
        e["files"] = json!(e["files"].as_u64().unwrap_or(0) + 1);
        e["bytes"] = json!(e["bytes"].as_u64().unwrap_or(0) + f.size);
    }
    let info = json!({
        "bench": "restore-build",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "replica": args.replica,
        "store": args.replica.split("://").next().unwrap_or(""),
        "db_bytes": bytes,
        "rows": rows,
        "page_size": page_size,
        "checksum": format!("{checksum:016x}"),
        "replicated_txid": replicated_txid,
        "replica_files": files.len(),
        "replica_bytes": files.iter().map(|f| f.size).sum::<u64>(),
        "levels": per_level,
        "build_s": (build_s * 10.0).round() / 10.0,
    });
    std::fs::write(&args.info, info.to_string())?;
    emit(&info);
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restorer {
    Keycast,
    Litestream,
    LitestreamFull,
}

impl Restorer {
    fn name(self) -> &'static str {
        match self {
            Restorer::Keycast => "keycast",
            Restorer::Litestream => "litestream",
            Restorer::LitestreamFull => "litestream-integrity-full",
        }
    }
}

pub async fn time(args: TimeArgs) -> anyhow::Result<()> {
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.info).with_context(|| format!("read {}", args.info.display()))?,
    )?;
    let replica = info["replica"].as_str().context("info: replica")?.to_owned();
    let expected = info["checksum"].as_str().context("info: checksum")?.to_owned();
    let page_size = info["page_size"].as_u64().context("info: page_size")? as u32;
    std::fs::create_dir_all(&args.work_dir)?;
    let mut tools = vec![Restorer::Keycast, Restorer::Litestream];
    if args.with_integrity {
        tools.push(Restorer::LitestreamFull);
    }
    let mut times: Vec<(Restorer, f64)> = Vec::new();
    let mut all_verified = true;
    for run in 0..args.runs {
        let mut order = tools.clone();
        order.rotate_left(run as usize % tools.len());
        for tool in order {
            let out = args.work_dir.join(format!("restored-{}.db", tool.name()));
            clean(&out);
            let mut cmd = match tool {
                Restorer::Keycast => {
                    let mut c = Command::new(&args.keycast_bin);
                    c.args(["restore", "--replica", &replica, "-o"]).arg(&out);
                    c
                }
                Restorer::Litestream | Restorer::LitestreamFull => {
                    let mut c = litestream::command();
                    c.arg("restore").arg("-o").arg(&out);
                    if tool == Restorer::LitestreamFull {
                        c.args(["-integrity-check", "full"]);
                    }
                    c.arg(litestream::restore_url(&replica)?);
                    c
                }
            };
            note!("restore-time: run {} {}", run + 1, tool.name());
            let started = Instant::now();
            let output = cmd.stdin(Stdio::null()).output()?;
            let secs = started.elapsed().as_secs_f64();
            if !output.status.success() {
                bail!(
                    "{} restore failed ({}): {}{}",
                    tool.name(),
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let got = database_checksum_path(&out, page_size)
                .map(|c| format!("{c:016x}"))
                .unwrap_or_else(|e| format!("error: {e}"));
            let verified = got == expected;
            all_verified &= verified;
            emit(&json!({
                "bench": "restore-run",
                "tool": tool.name(),
                "replica": replica,
                "mode": info["mode"],
                "run": run + 1,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "verified": verified,
                "checksum": got,
            }));
            times.push((tool, secs));
            clean(&out);
        }
    }
    let med = |t: Restorer| {
        median(
            &times
                .iter()
                .filter(|(x, _)| *x == t)
                .map(|(_, s)| *s)
                .collect::<Vec<_>>(),
        )
    };
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let k = med(Restorer::Keycast).context("no keycast runs")?;
    let l = med(Restorer::Litestream).context("no litestream runs")?;
    let lf = med(Restorer::LitestreamFull);
    emit(&json!({
        "bench": "restore",
        "replica": replica,
        "store": info["store"],
        "mode": info["mode"],
        "db_bytes": info["db_bytes"],
        "replica_files": info["replica_files"],
        "levels": info["levels"],
        "runs": args.runs,
        "keycast_s": r3(k),
        "litestream_s": r3(l),
        "litestream_integrity_s": lf.map(r3),
        "keycast_vs_litestream": r3(k / l),
        "keycast_vs_litestream_integrity": lf.map(|lf| r3(k / lf)),
        "all_runs": times.iter().map(|(t, s)| json!([t.name(), r3(*s)])).collect::<Vec<_>>(),
        "verified": all_verified,
    }));
    Ok(())
}

fn clean(out: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal", ".tmp", ".tmp-wal", ".tmp-shm"] {
        let mut p = out.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}
