//! Write throughput: how many small sequential commits per second one writer gets
//!
//! - `keycast`: the keycast pool (commit hook, no autocheckpoint) with a `Replicator` shipping
//!   to a `file://` replica;
//! - `pool`: the same keycast pool, hook installed, without a replicator — the issue's "same
//!   pool without replication" (nothing checkpoints, so the WAL only grows: an upper bound);
//! - `plain`: a plain SQLite WAL pool with SQLite's default autocheckpoint (1000 pages), no
//!   replication — how a database runs without any replicator;
//! - `litestream`: the plain pool with `litestream replicate` (shipped defaults, file replica).
//!
//! The variants run in turn, in a rotating order, for several rounds; medians per variant and
//! the ratios of each replicated variant to both baselines are reported.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};
use serde_json::json;
use sqlx::SqlitePool;

use crate::litestream::{self, Replica};
use crate::pools;
use crate::stats::median;
use crate::{emit, note};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of committing per run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Rounds; each round runs every variant once.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Skip the Litestream variant.
    #[arg(long)]
    no_litestream: bool,
    /// Directory for the runs' temporary files (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Keycast,
    Pool,
    Plain,
    Litestream,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Keycast => "keycast",
            Variant::Pool => "pool",
            Variant::Plain => "plain",
            Variant::Litestream => "litestream",
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let mut variants = vec![Variant::Keycast, Variant::Pool, Variant::Plain];
    if !args.no_litestream {
        variants.push(Variant::Litestream);
    }
    let mut results: Vec<(Variant, f64)> = Vec::new();
    for round in 0..args.rounds {
        // Rotate the order so no variant always runs first (or right after another).
        let mut order = variants.clone();
        order.rotate_left(round as usize % variants.len());
        if round % 2 == 1 {
            order.reverse();
        }
        for v in order {
            let dir = tempfile::Builder::new().prefix("throughput-").tempdir_in(&base)?;
            note!("throughput: round {} {}", round + 1, v.name());
            let r = one_run(v, dir.path(), args.seconds).await?;
            let rate = r["commits_per_s"].as_f64().unwrap_or(0.0);
            results.push((v, rate));
            let mut line = r;
            line["bench"] = json!("throughput-run");
            line["round"] = json!(round + 1);
            emit(&line);
        }
    }
    let med = |v: Variant| {
        median(
            &results
                .iter()
                .filter(|(x, _)| *x == v)
                .map(|(_, r)| *r)
                .collect::<Vec<_>>(),
        )
    };
    let runs = |v: Variant| -> Vec<f64> {
        results
            .iter()
            .filter(|(x, _)| *x == v)
            .map(|(_, r)| r.round())
            .collect()
    };
    let pool = med(Variant::Pool).context("no pool runs")?;
    let plain = med(Variant::Plain).context("no plain runs")?;
    let keycast = med(Variant::Keycast).context("no keycast runs")?;
    let ls = med(Variant::Litestream);
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    emit(&json!({
        "bench": "throughput",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "median": {
            "keycast": keycast.round(),
            "pool": pool.round(),
            "plain": plain.round(),
            "litestream": ls.map(f64::round),
        },
        "keycast_vs_pool": r3(keycast / pool),
        "keycast_vs_plain": r3(keycast / plain),
        "litestream_vs_pool": ls.map(|l| r3(l / pool)),
        "litestream_vs_plain": ls.map(|l| r3(l / plain)),
        "runs": {
            "keycast": runs(Variant::Keycast),
            "pool": runs(Variant::Pool),
            "plain": runs(Variant::Plain),
            "litestream": runs(Variant::Litestream),
        },
    }));
    Ok(())
}

async fn one_run(v: Variant, dir: &std::path::Path, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let db = dir.join("app.db");
    let replica = dir.join("replica");
    match v {
        Variant::Pool => {
            let signal = CommitSignal::new();
            let pool = pools::keycast_pool(&db, &signal).await?;
            pools::create_table(&pool).await?;
            let (n, secs, wal) = hammer(&pool, seconds, &db).await?;
            pool.close().await;
            Ok(json!({ "variant": v.name(), "commits": n,
                "wal_bytes": wal, "commits_per_s": n as f64 / secs }))
        }
        Variant::Plain => {
            let pool = pools::plain_pool(&db).await?;
            pools::create_table(&pool).await?;
            let (n, secs, wal) = hammer(&pool, seconds, &db).await?;
            pool.close().await;
            Ok(json!({ "variant": v.name(), "commits": n,
                "wal_bytes": wal, "commits_per_s": n as f64 / secs }))
        }
        Variant::Keycast => {
            let signal = CommitSignal::new();
            let pool = pools::keycast_pool(&db, &signal).await?;
            pools::create_table(&pool).await?;
            let store = Store::from_url(&format!("file://{}", replica.display()), &|_| None)?.context("store")?;
            let replicator = Replicator::start(&db, store, signal, "keycast-bench", ReplicaOptions::default()).await?;
            let (n, secs, wal) = hammer(&pool, seconds, &db).await?;
            // How far behind the replicator was when the writer stopped.
            let t = Instant::now();
            replicator.wait_durable(Duration::from_secs(60)).await?;
            let catch_up_ms = t.elapsed().as_secs_f64() * 1000.0;
            let status = replicator.status();
            pool.close().await;
            replicator.shutdown(Instant::now() + Duration::from_secs(20)).await?;
            Ok(json!({
                "variant": v.name(),
                "commits": n,
                "wal_bytes": wal,
                "commits_per_s": n as f64 / secs,
                "catch_up_ms": (catch_up_ms * 10.0).round() / 10.0,
                "segments": status.segments,
                "checkpoints": status.checkpoints,
                "commits_per_segment": (n as f64 / status.segments.max(1) as f64 * 10.0).round() / 10.0,
                "last_error": status.last_error,
            }))
        }
        Variant::Litestream => {
            let pool = pools::plain_pool(&db).await?;
            pools::create_table(&pool).await?;
            let cfg = litestream::write_config(dir, &db, &Replica::File(replica.clone()), &None)?;
            let mut process = litestream::start(dir, &cfg)?;
            let level0 = replica.join("ltx").join("0");
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::fs::read_dir(&level0).map_or(true, |mut d| d.next().is_none()) {
                process.check_running()?;
                if Instant::now() > deadline {
                    bail!("litestream shipped nothing in 30 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (n, secs, wal) = hammer(&pool, seconds, &db).await?;
            pool.close().await;
            process.check_running()?;
            let clean = process.stop()?;
            Ok(json!({
                "variant": v.name(),
                "commits": n,
                "wal_bytes": wal,
                "commits_per_s": n as f64 / secs,
                "clean_stop": clean,
            }))
        }
    }
}

/// Commits small transactions back to back for `seconds`; returns (commits, elapsed s, size
/// of the WAL file at the end — SQLite never shrinks it, so this is the largest it grew).
async fn hammer(pool: &SqlitePool, seconds: f64, db: &std::path::Path) -> anyhow::Result<(u64, f64, u64)> {
    // A short warm-up so every variant starts with an open connection and a hot cache.
    for _ in 0..200 {
        sqlx::query(pools::INSERT_SMALL).execute(pool).await?;
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut n = 0u64;
    while Instant::now() < end {
        sqlx::query(pools::INSERT_SMALL).execute(pool).await?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let wal = std::fs::metadata(db.with_file_name("app.db-wal")).map_or(0, |m| m.len());
    Ok((n, secs, wal))
}
