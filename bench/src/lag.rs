//! Replication lag: how long after a commit returns a replica file holding it is visible.
//!
//! The workload commits one small transaction every 1/rate s on an absolute schedule. Right
//! after each commit it records the time and the commit's WAL position (generation salts and
//! end offset, from the wal-index header: see [`crate::pools::WalProbe`]). The observer
//! (see [`crate::observe`]) records when each new level-0 LTX file became visible and the WAL
//! range `[wal_offset, wal_offset + wal_size)` its header says it covers. A commit's lag is
//! the first time a file of the same generation ending at or after the commit's end offset was
//! seen, minus the commit time. A full-image file (no WAL fields) covers every commit made
//! before its header timestamp (it is built under the write lock). Both tools are measured by
//! exactly this code; only the replicating side differs.
//!
//! On S3 keycast is measured a second way too, with no poll interval in it: to the moment the
//! store answered the upload of the file holding the commit (see [`crate::acks`]). The observer
//! costs a store that serves one request at a time (moto) one GET per file on top of the
//! writer's PUT, so `--no-observer` measures keycast that way alone, with the store to itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::ValueEnum;
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};
use serde_json::json;

use crate::acks::AckLog;
use crate::litestream::{self, Replica};
use crate::observe::{Obs, Observer, Target};
use crate::pools::{self, WalProbe};
use crate::stats::summary_ms;
use crate::{emit, note};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Tool {
    Keycast,
    Litestream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    File,
    S3,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which replicator ships the workload's commits.
    #[arg(long, value_enum)]
    tool: Tool,
    /// Replica backend: a local directory, or S3 at AWS_ENDPOINT_URL (see --s3-url).
    #[arg(long, value_enum, default_value = "file")]
    store: StoreKind,
    /// Commits per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Measured seconds of workload (after the warm-up).
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Seconds of workload at the same rate before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Litestream's monitor-interval and sync-interval, e.g. 100ms; omit for its shipped
    /// defaults (1 s each).
    #[arg(long)]
    ls_interval: Option<String>,
    /// s3://bucket/prefix for --store s3 (a fresh prefix per run); the bucket must exist.
    #[arg(long)]
    s3_url: Option<String>,
    /// Directory for the run's temporary files (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// keycast only: segment uploads in flight at once (default: `ReplicaOptions`' default;
    /// 1 ships one at a time, as before the shipping pipeline).
    #[arg(long)]
    uploads_in_flight: Option<usize>,
    /// Observer poll interval in ms (default 1 on file, 10 on S3).
    #[arg(long)]
    poll_ms: Option<f64>,
    /// keycast on S3 only: no observer; lag is measured only to the store's answer to each
    /// upload (see the module docs).
    #[arg(long)]
    no_observer: bool,
    /// Free text copied into the result, e.g. which server answered at the S3 URL.
    #[arg(long)]
    label: Option<String>,
    /// Give up waiting for the last commits to appear after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Keep the run's directory (database, replica, litestream.log).
    #[arg(long)]
    keep: bool,
    /// Write one CSV line per commit (ms since start, WAL generation number, end offset,
    /// lag ms) and one per file seen, for looking at outliers.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Every this many milliseconds during the measured window, a create-only 512-byte PUT
    /// through the same store client (keycast only): the store's own latency in the same
    /// seconds, to tell the replicator's tail from the store's. 0: none.
    #[arg(long, default_value_t = 20.0)]
    put_probe_ms: f64,
}

/// One commit of the workload.
#[derive(Debug, Clone, Copy)]
struct Commit {
    /// When `execute` returned.
    t: Instant,
    /// The same moment, milliseconds since the Unix epoch (for full-image files).
    wall_ms: f64,
    salts: (u32, u32),
    end: u64,
    measured: bool,
}

enum Side {
    Keycast { replicator: Replicator, store: Store },
    Litestream { process: litestream::Process },
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new().prefix("lag-").tempdir_in(&base)?;
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let url = match args.store {
        StoreKind::File => format!("file://{}", replica_dir.display()),
        StoreKind::S3 => args
            .s3_url
            .clone()
            .context("--store s3 needs --s3-url s3://bucket/prefix")?,
    };
    let env = |name: &str| std::env::var(name).ok();
    let observe_store = Store::from_url(&url, &env)?.context("replica url is none")?;
    if args.no_observer && (args.tool, args.store) != (Tool::Keycast, StoreKind::S3) {
        bail!("--no-observer measures keycast on S3 only: lag to the store's answer needs keycast's store client");
    }
    let poll = Duration::from_secs_f64(
        args.poll_ms.unwrap_or(match args.store {
            StoreKind::File => 1.0,
            StoreKind::S3 => 10.0,
        }) / 1000.0,
    );
    let config = match (args.tool, &args.ls_interval) {
        (Tool::Keycast, _) => {
            let uploads = match args.uploads_in_flight {
                None => "default options".to_owned(),
                Some(n) => format!("{n} upload{} in flight", if n == 1 { "" } else { "s" }),
            };
            if args.no_observer {
                format!("{uploads}, no observer")
            } else {
                uploads
            }
        }
        (Tool::Litestream, None) => "1s (shipped default)".to_owned(),
        (Tool::Litestream, Some(i)) => format!("{i} monitor+sync"),
    };
    note!(
        "lag: {:?} ({config}) on {:?}, {} commits/s for {} s",
        args.tool,
        args.store,
        args.rate,
        args.seconds
    );

    // Set up the database and the replicating side.
    let acks = AckLog::default();
    let (pool, mut side) = match args.tool {
        Tool::Keycast => {
            let signal = CommitSignal::new();
            let pool = pools::keycast_pool(&db, &signal).await?;
            pools::create_table(&pool).await?;
            // On the file backend a layer would turn off its direct file access, so what
            // is measured would not be what ships.
            let store = match args.store {
                StoreKind::File => observe_store.clone(),
                StoreKind::S3 => acks.layer(Store::from_url(&url, &env)?.context("replica url is none")?),
            };
            let replicator = Replicator::start(
                &db,
                store.clone(),
                signal,
                "keycast-bench",
                ReplicaOptions {
                    uploads_in_flight: args
                        .uploads_in_flight
                        .unwrap_or(ReplicaOptions::default().uploads_in_flight),
                    ..ReplicaOptions::default()
                },
            )
            .await?;
            (pool, Side::Keycast { replicator, store })
        }
        Tool::Litestream => {
            let pool = pools::plain_pool(&db).await?;
            pools::create_table(&pool).await?;
            let replica = match args.store {
                StoreKind::File => Replica::File(replica_dir.clone()),
                StoreKind::S3 => {
                    let (bucket, prefix) = litestream::split_s3_url(&url)?;
                    Replica::S3 { bucket, prefix }
                }
            };
            let cfg = litestream::write_config(dir.path(), &db, &replica, &args.ls_interval)?;
            let mut process = litestream::start(dir.path(), &cfg)?;
            // Litestream's first sync (a full-database L0 file) must be in the replica
            // before the workload starts.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                process.check_running()?;
                if !observe_store.list_level(0).await?.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("litestream shipped nothing in 30 s; see {}", process.log.display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (pool, Side::Litestream { process })
        }
    };
    let target = match args.store {
        StoreKind::File => Target::File(replica_dir.clone()),
        StoreKind::S3 => Target::S3(observe_store.clone()),
    };
    let observer = if args.no_observer {
        None
    } else {
        Some(Observer::start(target, poll)?)
    };

    // The paced workload.
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let total = ((args.warmup + args.seconds) * f64::from(args.rate)).round() as u64;
    let warm = (args.warmup * f64::from(args.rate)).round() as u64;
    let mut probe = WalProbe::new(&db);
    let mut commits = Vec::with_capacity(total as usize);
    let mut commit_ms = Vec::with_capacity(total as usize);
    let mut behind = 0u64;
    let start = Instant::now() + Duration::from_millis(20);
    let put_probe = match &side {
        Side::Keycast { store, .. } if args.put_probe_ms > 0.0 => Some(spawn_put_probe(
            store.clone(),
            start + Duration::from_secs_f64(args.warmup),
            start + Duration::from_secs_f64(args.warmup + args.seconds),
            Duration::from_secs_f64(args.put_probe_ms / 1000.0),
        )),
        _ => None,
    };
    for i in 0..total {
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        } else if now - due > interval {
            behind += 1;
        }
        let before = Instant::now();
        sqlx::query(pools::INSERT_SMALL).execute(&pool).await?;
        let t = Instant::now();
        let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
        let pos = probe.read()?;
        if i == 0 {
            let salts = pools::wal_file_salts(&db)?;
            if salts != (pos.salt1, pos.salt2) {
                bail!(
                    "wal-index salts {:?} differ from the WAL header's {salts:?}",
                    (pos.salt1, pos.salt2)
                );
            }
        }
        commit_ms.push((t - before).as_secs_f64() * 1000.0);
        commits.push(Commit {
            t,
            wall_ms,
            salts: (pos.salt1, pos.salt2),
            end: pos.end,
            measured: i >= warm,
        });
    }
    let workload_secs = (Instant::now() - start).as_secs_f64();
    let put_samples = match put_probe {
        Some(task) => task.await?,
        None => Vec::new(),
    };
    let mut put_ms: Vec<f64> = put_samples.iter().map(|(_, ms)| *ms).collect();
    put_ms.sort_by(f64::total_cmp);

    // Wait until the last commit is visible in the replica (or give up).
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
    let last = *commits.last().context("no commits")?;
    loop {
        let seen = match &observer {
            Some(observer) => observer.snapshot(),
            None => acks.observations(&observe_store).await?,
        };
        if lags(&[last], &seen)[0].is_some() {
            break;
        }
        if Instant::now() > drain_deadline {
            note!("lag: the last commit was not seen in the replica within the drain timeout");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (seen, probe_errors) = observer.map_or((Vec::new(), 0), Observer::stop);

    // Stop the replicating side.
    pool.close().await;
    let side_report = match &mut side {
        Side::Litestream { process } => {
            process.check_running()?;
            json!({})
        }
        Side::Keycast { replicator, .. } => {
            let s = replicator.status();
            json!({
                "segments": s.segments,
                "checkpoints": s.checkpoints,
                "last_error": s.last_error,
                "fenced": s.fenced,
            })
        }
    };
    let clean_stop = match side {
        Side::Keycast { replicator, store } => {
            let r = replicator.shutdown(Instant::now() + Duration::from_secs(20)).await;
            drop(store);
            r.is_ok()
        }
        Side::Litestream { process } => process.stop()?,
    };

    // Attribute commits to files.
    let results = lags(&commits, &seen);
    let (measured, unmatched, negative) = measured_lags(&commits, &results);
    let acked = acks.observations(&observe_store).await?;
    let ack_results = lags(&commits, &acked);
    let (ack_measured, ack_unmatched, _) = measured_lags(&commits, &ack_results);
    let full_images = seen.iter().filter(|o| o.header.wal_offset == 0).count();
    let generations: std::collections::HashSet<_> = commits.iter().map(|c| c.salts).collect();
    let files_measured = seen.len();
    let commits_per_file = if files_measured > 0 {
        commits.len() as f64 / files_measured as f64
    } else {
        0.0
    };
    emit(&json!({
        "bench": "lag",
        "tool": format!("{:?}", args.tool).to_lowercase(),
        "config": config,
        "store": format!("{:?}", args.store).to_lowercase(),
        "label": args.label,
        "rate": args.rate,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "poll_ms": poll.as_secs_f64() * 1000.0,
        "commits": commits.len(),
        "achieved_rate": (commits.len() as f64 / workload_secs * 10.0).round() / 10.0,
        "commits_behind_schedule": behind,
        "observer": !args.no_observer,
        "lag_ms": (!args.no_observer).then(|| summary_ms(&measured)),
        "unmatched": unmatched,
        "negative": negative,
        "lag_ack_ms": (!acked.is_empty()).then(|| summary_ms(&ack_measured)),
        "ack_unmatched": (!acked.is_empty()).then_some(ack_unmatched),
        "files_acked": acked.len(),
        "commit_ms": summary_ms(&commit_ms),
        "put_probe_ms": args.put_probe_ms,
        "store_put_ms": summary_ms(&put_ms),
        "files_seen": files_measured,
        "txids_seen": [seen.first().map(|o| o.txid), seen.last().map(|o| o.txid)],
        "full_image_files": full_images,
        "commits_per_file": (commits_per_file * 100.0).round() / 100.0,
        "wal_generations": generations.len(),
        "probe_errors": probe_errors,
        "clean_stop": clean_stop,
        "replicator": side_report,
    }));
    if let Some(path) = &args.dump {
        use std::fmt::Write as _;
        let mut gens: Vec<(u32, u32)> = Vec::new();
        let mut out = String::from("kind,ms,generation,wal_end,lag_ms,txid,wall_ms,ack_lag_ms\n");
        let mut gen_of = |salts: (u32, u32)| match gens.iter().position(|g| *g == salts) {
            Some(i) => i,
            None => {
                gens.push(salts);
                gens.len() - 1
            }
        };
        for ((c, lag), ack) in commits.iter().zip(&results).zip(&ack_results) {
            let ms = (c.t - start).as_secs_f64() * 1000.0;
            let lag = lag.map_or(String::new(), |l| format!("{l:.3}"));
            let ack = ack.map_or(String::new(), |l| format!("{l:.3}"));
            let _ = writeln!(
                out,
                "commit,{ms:.3},{},{},{lag},,{:.3},{ack}",
                gen_of(c.salts),
                c.end,
                c.wall_ms
            );
        }
        for (at, took) in &put_samples {
            let ms = (*at - start).as_secs_f64() * 1000.0;
            let _ = writeln!(out, "put,{ms:.3},,,{took:.3},,,");
        }
        let since_start = |t: Instant| {
            if t >= start {
                (t - start).as_secs_f64() * 1000.0
            } else {
                -((start - t).as_secs_f64() * 1000.0)
            }
        };
        for o in &seen {
            let ms = since_start(o.t);
            let h = &o.header;
            let g = gen_of((h.wal_salt1, h.wal_salt2));
            let _ = writeln!(
                out,
                "file,{ms:.3},{g},{},,{},{},",
                h.wal_offset + h.wal_size,
                o.txid,
                h.timestamp_ms
            );
        }
        for o in &acked {
            let ms = since_start(o.t);
            let _ = writeln!(out, "ack,{ms:.3},,,,{},,", o.txid);
        }
        std::fs::write(path, out)?;
    }
    if args.keep {
        let kept = dir.keep();
        note!("lag: kept {}", kept.display());
    }
    Ok(())
}

/// Sends a create-only 512-byte PUT every `every` from `from` until `until` (each after the
/// one before it was answered, on the schedule's next tick); returns when each was sent and
/// how long it took, in milliseconds.
fn spawn_put_probe(
    store: Store,
    from: Instant,
    until: Instant,
    every: Duration,
) -> tokio::task::JoinHandle<Vec<(Instant, f64)>> {
    tokio::spawn(async move {
        let body = bytes::Bytes::from(vec![0x5a_u8; 512]);
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval_at(from.into(), every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let at: Instant = tick.tick().await.into();
            if at >= until {
                return samples;
            }
            let name = format!("keycast/bench-put-probe/{}", samples.len());
            let sent = Instant::now();
            if store.put_object_create(&name, body.clone()).await.is_ok() {
                samples.push((sent, sent.elapsed().as_secs_f64() * 1000.0));
            }
        }
    })
}

/// The measured commits' lags (a negative one, a file seen before its commit returned, counts
/// as 0), how many measured commits no file held, and how many lags were negative.
fn measured_lags(commits: &[Commit], results: &[Option<f64>]) -> (Vec<f64>, u64, u64) {
    let mut measured = Vec::new();
    let (mut unmatched, mut negative) = (0u64, 0u64);
    for (c, lag) in commits.iter().zip(results) {
        if !c.measured {
            continue;
        }
        match lag {
            Some(ms) if *ms < 0.0 => {
                negative += 1;
                measured.push(0.0);
            }
            Some(ms) => measured.push(*ms),
            None => unmatched += 1,
        }
    }
    (measured, unmatched, negative)
}

/// For each commit, milliseconds from the commit to the first observation of a file that
/// holds it; `None` if no file seen holds it.
fn lags(commits: &[Commit], seen: &[Obs]) -> Vec<Option<f64>> {
    // Per generation: observations in the order seen, with the running maximum end offset.
    let mut by_gen: HashMap<(u32, u32), Vec<(Instant, u64)>> = HashMap::new();
    let mut images: Vec<(Instant, f64)> = Vec::new();
    for o in seen {
        let h = &o.header;
        if h.wal_offset > 0 {
            let end = (h.wal_offset + h.wal_size) as u64;
            let v = by_gen.entry((h.wal_salt1, h.wal_salt2)).or_default();
            let running = v.last().map_or(end, |(_, m)| (*m).max(end));
            v.push((o.t, running));
        } else {
            images.push((o.t, h.timestamp_ms as f64));
        }
    }
    commits
        .iter()
        .map(|c| {
            let mut first: Option<Instant> = by_gen.get(&c.salts).and_then(|v| {
                let i = v.partition_point(|(_, m)| *m < c.end);
                v.get(i).map(|(t, _)| *t)
            });
            for (t, ts) in &images {
                if c.wall_ms < *ts && first.is_none_or(|f| *t < f) {
                    first = Some(*t);
                }
            }
            first.map(|t| {
                if t >= c.t {
                    (t - c.t).as_secs_f64() * 1000.0
                } else {
                    -((c.t - t).as_secs_f64() * 1000.0)
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keycast_replica::ltx::Header;

    fn obs(t: Instant, off: i64, size: i64, salts: (u32, u32)) -> Obs {
        Obs {
            t,
            txid: 0,
            header: Header {
                wal_offset: off,
                wal_size: size,
                wal_salt1: salts.0,
                wal_salt2: salts.1,
                ..Header::default()
            },
        }
    }

    #[test]
    fn a_commit_is_attributed_to_the_first_file_reaching_its_end() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let c = |t: u64, end: u64, salts| Commit {
            t: ms(t),
            wall_ms: 0.0,
            salts,
            end,
            measured: true,
        };
        let commits = [
            c(0, 100, (1, 1)),
            c(5, 200, (1, 1)),
            c(6, 64, (2, 2)),
            c(7, 300, (1, 1)),
        ];
        let seen = [
            obs(ms(10), 32, 68, (1, 1)),
            obs(ms(20), 100, 100, (1, 1)),
            obs(ms(30), 32, 32, (2, 2)),
        ];
        let got = lags(&commits, &seen);
        assert_eq!(got[0], Some(10.0));
        assert_eq!(got[1], Some(15.0));
        assert_eq!(got[2], Some(24.0));
        assert_eq!(got[3], None);
    }
}
