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
    /// Run only this variant (keycast, pool, plain, litestream); repeatable. For profiling:
    /// the ratios need `pool` and `plain`.
    #[arg(long = "only")]
    only: Vec<String>,
    /// Directory for the runs' temporary files (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The keycast replicator's checkpoint threshold in WAL pages (default: keycast's).
    #[arg(long)]
    checkpoint_pages: Option<u32>,
    /// The keycast replicator's segment uploads in flight at once (default: keycast's).
    #[arg(long)]
    uploads_in_flight: Option<usize>,
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
    if !args.only.is_empty() {
        variants.retain(|v| args.only.iter().any(|o| o == v.name()));
    }
    // Per run: the variant, its commits/s and its CPU microseconds per commit.
    let mut results: Vec<(Variant, f64, f64)> = Vec::new();
    for round in 0..args.rounds {
        // Rotate the order so no variant always runs first (or right after another).
        let mut order = variants.clone();
        order.rotate_left(round as usize % variants.len());
        if round % 2 == 1 {
            order.reverse();
        }
        for v in order {
            let dir = tempfile::Builder::new().prefix("throughput-").tempdir_in(&base)?;
            // Write back what the last runs left, so that no run pays for it in its own
            // fsyncs or file creation. On ext4 without a journal (these machines), a freed
            // inode is not reused for 60 s, or 360 s while its inode table block is dirty,
            // and every file created meanwhile scans past it: after a deleted replica of
            // thousands of files, that slowed each segment keycast creates.
            std::process::Command::new("sync").status()?;
            note!("throughput: round {} {}", round + 1, v.name());
            let r = one_run(v, dir.path(), &args).await?;
            let rate = r["commits_per_s"].as_f64().unwrap_or(0.0);
            let cpu = r["cpu_us_per_commit"].as_f64().unwrap_or(0.0);
            results.push((v, rate, cpu));
            let mut line = r;
            line["bench"] = json!("throughput-run");
            line["round"] = json!(round + 1);
            emit(&line);
        }
    }
    let median_of = |v: Variant, pick: fn(&(Variant, f64, f64)) -> f64| {
        median(&results.iter().filter(|r| r.0 == v).map(pick).collect::<Vec<_>>())
    };
    let med = |v: Variant| median_of(v, |r| r.1);
    let med_cpu = |v: Variant| median_of(v, |r| r.2);
    let runs = |v: Variant| -> Vec<f64> {
        results
            .iter()
            .filter(|(x, ..)| *x == v)
            .map(|(_, r, _)| r.round())
            .collect()
    };
    let (Some(pool), Some(plain), Some(keycast)) = (med(Variant::Pool), med(Variant::Plain), med(Variant::Keycast))
    else {
        return Ok(()); // not every variant ran (--only): the runs are the result
    };
    let ls = med(Variant::Litestream);
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    emit(&json!({
        "bench": "throughput",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "checkpoint_pages": args.checkpoint_pages.unwrap_or(keycast_replica::replicator::DEFAULT_CHECKPOINT_PAGES),
        "median": {
            "keycast": keycast.round(),
            "pool": pool.round(),
            "plain": plain.round(),
            "litestream": ls.map(f64::round),
        },
        "cpu_us_per_commit": {
            "keycast": med_cpu(Variant::Keycast),
            "pool": med_cpu(Variant::Pool),
            "plain": med_cpu(Variant::Plain),
            "litestream": med_cpu(Variant::Litestream),
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

async fn one_run(v: Variant, dir: &std::path::Path, args: &Args) -> anyhow::Result<serde_json::Value> {
    let seconds = args.seconds;
    let db = dir.join("app.db");
    let replica = dir.join("replica");
    match v {
        Variant::Pool => {
            let signal = CommitSignal::new();
            let pool = pools::keycast_pool(&db, &signal).await?;
            pools::create_table(&pool).await?;
            let h = hammer(&pool, seconds, &db, None).await?;
            pool.close().await;
            Ok(h.json(v))
        }
        Variant::Plain => {
            let pool = pools::plain_pool(&db).await?;
            pools::create_table(&pool).await?;
            let h = hammer(&pool, seconds, &db, None).await?;
            pool.close().await;
            Ok(h.json(v))
        }
        Variant::Keycast => {
            let signal = CommitSignal::new();
            let pool = pools::keycast_pool(&db, &signal).await?;
            pools::create_table(&pool).await?;
            let store = Store::from_url(&format!("file://{}", replica.display()), &|_| None)?.context("store")?;
            let mut options = ReplicaOptions::default();
            if let Some(pages) = args.checkpoint_pages {
                options.checkpoint_pages = pages;
            }
            if let Some(n) = args.uploads_in_flight {
                options.uploads_in_flight = n;
            }
            let replicator = Replicator::start(&db, store, signal, "keycast-bench", options).await?;
            let h = hammer(&pool, seconds, &db, None).await?;
            let n = h.commits;
            // How far behind the replicator was when the writer stopped.
            let t = Instant::now();
            replicator.wait_durable(Duration::from_secs(60)).await?;
            let catch_up_ms = t.elapsed().as_secs_f64() * 1000.0;
            let status = replicator.status();
            pool.close().await;
            replicator.shutdown(Instant::now() + Duration::from_secs(20)).await?;
            let mut line = h.json(v);
            line.as_object_mut().expect("an object").extend(
                json!({
                "catch_up_ms": (catch_up_ms * 10.0).round() / 10.0,
                "segments": status.segments,
                "checkpoints": status.checkpoints,
                "commits_per_segment": (n as f64 / status.segments.max(1) as f64 * 10.0).round() / 10.0,
                "last_error": status.last_error,
                })
                .as_object()
                .expect("an object")
                .clone(),
            );
            Ok(line)
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
            let h = hammer(&pool, seconds, &db, Some(process.pid())).await?;
            pool.close().await;
            process.check_running()?;
            let clean = process.stop()?;
            let mut line = h.json(v);
            line["clean_stop"] = json!(clean);
            Ok(line)
        }
    }
}

/// Commits small transactions back to back for `seconds`. The WAL's size is sampled every
/// 2 ms by a thread, and at the end, since a WAL can be truncated after it restarts. The CPU
/// time the work took is that of this process (writer, replicator, sampler) plus that of the
/// replicating `child` process, if any, over the timed window.
async fn hammer(pool: &SqlitePool, seconds: f64, db: &std::path::Path, child: Option<u32>) -> anyhow::Result<Hammered> {
    // A short warm-up so every variant starts with an open connection and a hot cache.
    for _ in 0..200 {
        sqlx::query(pools::INSERT_SMALL).execute(pool).await?;
    }
    let wal_path = db.with_file_name("app.db-wal");
    let size = move || std::fs::metadata(&wal_path).map_or(0, |m| m.len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, size) = (stop.clone(), size.clone());
        std::thread::spawn(move || {
            let mut largest = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                largest = largest.max(size());
                std::thread::sleep(Duration::from_millis(2));
            }
            largest
        })
    };
    let cpu = || -> anyhow::Result<Duration> {
        let mut total = cpu_time("self")?;
        if let Some(pid) = child {
            total += cpu_time(&pid.to_string())?;
        }
        Ok(total)
    };
    let cpu_start = cpu()?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let (mut n, mut stalls, mut stalled) = (0u64, 0u64, Duration::ZERO);
    while Instant::now() < end {
        let t = Instant::now();
        sqlx::query(pools::INSERT_SMALL).execute(pool).await?;
        let took = t.elapsed();
        if took >= STALL {
            stalls += 1;
            stalled += took;
        }
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_used = cpu()?.saturating_sub(cpu_start);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let wal = sampler.join().unwrap_or(0).max(size());
    Ok(Hammered {
        commits: n,
        secs,
        wal,
        stalls,
        stalled_ms: (stalled.as_secs_f64() * 10_000.0).round() / 10.0,
        cpu: cpu_used,
    })
}

/// User + system CPU time of a process so far (`self` or a PID), from `/proc/<pid>/stat`.
fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // the first, utime and stime the 12th and 13th (fields 14 and 15 of proc(5)).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()?) };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(Duration::from_secs_f64((ticks(11)? + ticks(12)?) as f64 / per_second))
}

impl Hammered {
    fn json(&self, v: Variant) -> serde_json::Value {
        json!({
            "variant": v.name(),
            "commits": self.commits,
            "wal_bytes": self.wal,
            "commits_per_s": self.commits as f64 / self.secs,
            "stalls": self.stalls,
            "stalled_ms": self.stalled_ms,
            "cpu_s": (self.cpu.as_secs_f64() * 100.0).round() / 100.0,
            "cpu_us_per_commit": (self.cpu.as_secs_f64() * 1e6 / self.commits.max(1) as f64 * 10.0).round() / 10.0,
        })
    }
}

/// A commit that took at least this long counts as a stall (waiting for a lock or a
/// checkpoint rather than committing).
const STALL: Duration = Duration::from_millis(2);

/// What [`hammer`] measured.
struct Hammered {
    commits: u64,
    secs: f64,
    /// The largest size of the WAL file seen.
    wal: u64,
    /// Commits that took at least [`STALL`], and the time spent in them.
    stalls: u64,
    stalled_ms: f64,
    /// CPU time of the work over the timed window (see [`hammer`]).
    cpu: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_this_process_spinning() {
        let before = cpu_time("self").unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = cpu_time("self").unwrap() - before;
        // 200 ms of wall time spinning; the scheduler may take some of it away on a busy
        // machine, and the clock counts in ticks of 10 ms.
        assert!(
            spent >= Duration::from_millis(50),
            "{spent:?} of CPU for 200 ms of spinning"
        );
        assert!(spent < Duration::from_secs(5), "{spent:?}");
    }
}
