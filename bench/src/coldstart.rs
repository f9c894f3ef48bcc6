//! Cold start after a long history: how long an instance with an empty disk takes to be
//! ready (lease taken, database restored, replication resumed) when every store request
//! costs `--latency-ms` more — the round trip of a cloud store, which loopback hides.
//!
//! 1. History: a keycast pool and replicator (keycast's defaults, compaction included) take
//!    `--rate` small writes a second for `--seconds`, one in every `--rate` waiting until it is
//!    durable (as `keycast serve` under the soak's load), then stop cleanly.
//! 2. Cold starts, `--runs` times: a fresh directory, the same replica behind a store whose
//!    every request (LIST, GET, HEAD, PUT, DELETE) is delayed by `--latency-ms`; timed from
//!    nothing to a running replicator — what `keycast serve` does before `/healthz/ready`
//!    answers (it also runs migrations and binds its ports, which the latency does not touch).
//!    Every restored database is checked against the history's row count.
//!
//! On S3 the cold starts go through [`latency_proxy`](crate::latency_proxy) in front of the
//! server (`AWS_ENDPOINT_URL`): one delay per HTTP request, every page of a listing
//! included. On a file replica the delay is injected in-process around the backend
//! (`keycast_replica::faults`, the wrapper the failure tests use): once per request, and a
//! file listing has no pages.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keycast_replica::bootstrap::{self, Bootstrap};
use keycast_replica::faults::{Action, Faults, Op, Rule};
use keycast_replica::lease::{Lease, LeaseOptions};
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};
use serde_json::json;

use crate::pools;
use crate::stats::median;
use crate::{emit, note};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of history before the cold starts.
    #[arg(long, default_value_t = 600.0)]
    seconds: f64,
    /// Writes per second during the history.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Milliseconds added to every store request during the cold starts.
    #[arg(long, default_value_t = 30)]
    latency_ms: u64,
    /// Cold starts.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Replica URL (file:///dir, or s3://bucket/prefix with AWS_ENDPOINT_URL); must be
    /// empty. Default: a file replica in the work directory.
    #[arg(long)]
    replica: Option<String>,
    /// Directory for the databases (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// End the history at the worst phase of compaction instead of after exactly --seconds:
    /// 2 s before the level-2 run due at --seconds (598 s for 600), when level 2 is a whole
    /// period behind, level 1 holds a period of files and level 0 almost a level-1 interval.
    #[arg(long)]
    worst_phase: bool,
    /// The replica already holds a history (an earlier run's, kept with --keep): skip step 1
    /// and cold-start from it; the row count every cold start must restore is the first's.
    #[arg(long)]
    existing: bool,
}

/// The replica as a cold start sees it: every request `latency_ms` later.
pub(crate) async fn slow_store(url: &str, latency_ms: u64) -> anyhow::Result<Store> {
    let delay = Duration::from_millis(latency_ms);
    if url.starts_with("s3://") {
        let endpoint = std::env::var("AWS_ENDPOINT_URL").context("an s3:// replica needs AWS_ENDPOINT_URL")?;
        let endpoint = url::Url::parse(&endpoint)?;
        let upstream = endpoint
            .socket_addrs(|| None)?
            .into_iter()
            .next()
            .context("AWS_ENDPOINT_URL has no address")?;
        let proxy = crate::latency_proxy::start(upstream, delay).await?;
        let env = move |n: &str| match n {
            "AWS_ENDPOINT_URL" => Some(format!("http://{proxy}")),
            _ => std::env::var(n).ok(),
        };
        return Store::from_url(url, &env)?.context("the replica URL is none");
    }
    let faults = Faults::new();
    for op in [Op::Get, Op::List, Op::Put, Op::Delete] {
        faults.add(Rule::new(op, Action::Delay(delay)));
    }
    let env = |n: &str| std::env::var(n).ok();
    Ok(Store::from_url(url, &env)?
        .context("the replica URL is none")?
        .with_faults(&faults))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new().prefix("coldstart-").tempdir_in(&base)?;
    let url = match &args.replica {
        Some(url) => url.clone(),
        None => format!("file://{}", dir.path().join("replica").display()),
    };
    let env = |n: &str| std::env::var(n).ok();
    let open = || -> anyhow::Result<Store> { Store::from_url(&url, &env)?.context("the replica URL is none") };
    let store = open()?;
    if !args.existing && !store.is_empty().await? {
        bail!("replica {url} is not empty");
    }

    if args.existing {
        if store.is_empty().await? {
            bail!("--existing: replica {url} holds no history");
        }
        let history = json!({ "existing": true, "plan": plan_shape(&store).await? });
        return cold_starts(&args, &url, &store, &dir, history, None).await;
    }

    // 1. History.
    let seconds = history_seconds(&args);
    let db = dir.path().join("history").join("app.db");
    std::fs::create_dir_all(db.parent().expect("a parent"))?;
    let signal = CommitSignal::new();
    let pool = pools::keycast_pool(&db, &signal).await?;
    pools::create_table(&pool).await?;
    let replicator = Replicator::start(&db, store.clone(), signal, "keycast-bench", ReplicaOptions::default()).await?;
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / args.rate);
    let durable_every = (args.rate.round() as u64).max(1);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut writes, mut last_note) = (0u64, Instant::now());
    while started.elapsed().as_secs_f64() < seconds {
        ticks.tick().await;
        sqlx::query("INSERT INTO t (v) VALUES (randomblob(200))")
            .execute(&pool)
            .await?;
        writes += 1;
        if writes.is_multiple_of(durable_every) {
            replicator.wait_durable(Duration::from_secs(10)).await?;
        }
        if last_note.elapsed() > Duration::from_secs(60) {
            note!(
                "coldstart: history {writes} writes, {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last_note = Instant::now();
        }
    }
    replicator.wait_durable(Duration::from_secs(60)).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await?;
    pool.close().await;
    let txid = replicator.shutdown(Instant::now() + Duration::from_secs(60)).await?;
    let files = store.list_all().await?;
    let per_level: Vec<serde_json::Value> = (0..=9u8)
        .filter_map(|level| {
            let n = files.iter().filter(|f| f.level == level).count();
            (n > 0).then(|| json!({ "level": level, "objects": n }))
        })
        .collect();
    let history = json!({
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "writes": writes,
        "txid": txid,
        "objects": files.len(),
        "per_level": per_level,
        "worst_phase": args.worst_phase,
        "plan": plan_shape(&store).await?,
    });
    note!("coldstart: history done: {history}");
    cold_starts(&args, &url, &store, &dir, history, Some(rows)).await
}

/// How long the history runs: --seconds, or with --worst-phase until 2 s before the level-2
/// compaction due then (levels run every interval from the replicator's start).
fn history_seconds(args: &Args) -> f64 {
    if !args.worst_phase {
        return args.seconds;
    }
    let l2 = keycast_replica::compactor::CompactionPolicy::default().levels[1].as_secs_f64();
    (args.seconds / l2).ceil().max(1.0) * l2 - 2.0
}

/// Files per level in the plan a restore of the latest state follows.
async fn plan_shape(store: &Store) -> anyhow::Result<serde_json::Value> {
    let files = store.list_recent().await?;
    let plan = keycast_replica::restore::plan(&files, keycast_replica::restore::Target::Latest, "replica")?;
    let mut shape = serde_json::Map::new();
    for level in 0..=9u8 {
        let n = plan.iter().filter(|f| f.level == level).count();
        if n > 0 {
            shape.insert(format!("L{level}"), json!(n));
        }
    }
    Ok(serde_json::Value::Object(shape))
}

/// Step 2: `--runs` cold starts from the replica at `url`, each checked against `rows` (the
/// first run's count when the history was not written by this process).
async fn cold_starts(
    args: &Args,
    url: &str,
    store: &Store,
    dir: &tempfile::TempDir,
    history: serde_json::Value,
    mut rows: Option<i64>,
) -> anyhow::Result<()> {
    let mut ready_ms = Vec::new();
    for run in 1..=args.runs {
        let slow = slow_store(url, args.latency_ms).await?;
        let db = dir.path().join(format!("cold-{run}")).join("app.db");
        std::fs::create_dir_all(db.parent().expect("a parent"))?;
        let requests_before = slow.request_count();
        let t0 = Instant::now();
        let lease = Lease::acquire(&slow, &format!("coldstart-{run}"), LeaseOptions::default()).await?;
        let leased_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let prepared = bootstrap::prepare(&db, &slow, lease.previous_txid(), &|| lease.is_valid()).await?;
        let restored_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let Bootstrap::Restored { restored, .. } = prepared else {
            bail!("expected a restore, got {prepared:?}");
        };
        let signal = CommitSignal::new();
        let pool = pools::keycast_pool(&db, &signal).await?;
        let replicator = Replicator::start_with_lease(
            &db,
            slow.clone(),
            signal,
            "keycast-bench",
            ReplicaOptions::default(),
            Some(lease),
        )
        .await?;
        let ready = t0.elapsed().as_secs_f64() * 1000.0;
        let requests = slow.request_count() - requests_before;
        let got: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await?;
        let want = *rows.get_or_insert(got);
        if got != want {
            bail!("cold start {run} restored {got} rows, expected {want}");
        }
        pool.close().await;
        replicator.shutdown(Instant::now() + Duration::from_secs(60)).await?;
        let r1 = |x: f64| (x * 10.0).round() / 10.0;
        emit(&json!({
            "bench": "coldstart-run",
            "run": run,
            "latency_ms": args.latency_ms,
            "lease_ms": r1(leased_ms),
            "restore_ms": r1(restored_ms - leased_ms),
            "start_ms": r1(ready - restored_ms),
            "ready_ms": r1(ready),
            "files_applied": restored.files,
            "bytes_fetched": restored.bytes,
            "requests": requests,
        }));
        ready_ms.push(ready);
    }
    emit(&json!({
        "bench": "coldstart",
        "replica": store.describe(),
        "latency_ms": args.latency_ms,
        "history": history,
        "rows": rows,
        "ready_ms_median": median(&ready_ms).map(|m| (m * 10.0).round() / 10.0),
        "ready_ms": ready_ms.iter().map(|m| (m * 10.0).round() / 10.0).collect::<Vec<_>>(),
    }));
    Ok(())
}
