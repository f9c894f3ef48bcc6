//! Durable-commit latency: what a write that must not be lost costs on top of a plain commit.
//!
//! One writer commits small transactions back to back through the keycast pool with a
//! replicator running. Each round alternates the two modes commit by commit, so both see the
//! same machine noise:
//! - `async`: the commit alone (replication follows within milliseconds);
//! - `durable`: the commit, then `wait_durable` — it returns only once the segment holding the
//!   commit is in the object store. It comes right after the `async` commit, whose upload is
//!   still under way: the durable write's upload goes out beside it and is acknowledged after it;
//! - `durable alone`: the same, with nothing else in flight (after the two PUTs below have
//!   been answered): what a durable write costs on its own;
//! - `put`: the store's own create-only PUT of a 512-byte object through the same client
//!   (`Store::put_object_create`: signed, `If-None-Match: *` on S3), the floor any durable
//!   commit pays, measured in the same loop so that it sees the same minute;
//! - `put pair`: two such PUTs sent at once, timed until both are answered — what a store
//!   that serves one request at a time (moto is one Python process) charges a durable commit
//!   whose upload goes out beside an ordinary commit's upload already under way.
//!
//! Reported: p50/p99 of each, the added latency (durable − async) at p50 and p99, and the
//! added p50 over the PUT's p50, for both durable modes. `--latency-ms` adds a delay to every
//! store request (a TCP proxy in front of S3, as `coldstart` does), so that a store that serves
//! requests in parallel with a cloud's round trip can be measured on loopback.

use std::time::{Duration, Instant};

use anyhow::Context;
use keycast_replica::{CommitSignal, ReplicaOptions, Replicator, Store};
use serde_json::json;

use crate::stats::{percentile, summary_ms};
use crate::{emit, note, pools};

#[derive(clap::Args)]
pub struct Args {
    /// Replica: `file` (a temporary directory) or `s3` (needs --s3-url and AWS_* variables).
    #[arg(long, default_value = "file")]
    store: String,
    /// s3://bucket/prefix for --store s3; the bucket must exist.
    #[arg(long)]
    s3_url: Option<String>,
    /// Commits per mode.
    #[arg(long, default_value_t = 2000)]
    commits: usize,
    /// Segment uploads in flight at once (default: `ReplicaOptions`' default).
    #[arg(long)]
    uploads_in_flight: Option<usize>,
    /// Milliseconds added to every store request (see the module docs); 0: none.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = match args.store.as_str() {
        "file" => format!("file://{}", dir.path().join("replica").display()),
        "s3" => args.s3_url.clone().context("--store s3 needs --s3-url")?,
        other => anyhow::bail!("--store {other}: expected file or s3"),
    };
    let store = if args.latency_ms > 0 {
        crate::coldstart::slow_store(&url, args.latency_ms).await?
    } else {
        Store::from_url(&url, &|name| std::env::var(name).ok())?.context("replica url is none")?
    };
    let db = dir.path().join("bench.db");
    let signal = CommitSignal::new();
    let pool = pools::keycast_pool(&db, &signal).await?;
    pools::create_table(&pool).await?;
    let options = ReplicaOptions {
        uploads_in_flight: args
            .uploads_in_flight
            .unwrap_or(ReplicaOptions::default().uploads_in_flight),
        ..ReplicaOptions::default()
    };
    let uploads_in_flight = options.uploads_in_flight;
    let replicator = Replicator::start(&db, store.clone(), signal, "bench", options).await?;
    let (mut fast, mut durable) = (Vec::with_capacity(args.commits), Vec::with_capacity(args.commits));
    let (mut put, mut pair) = (Vec::with_capacity(args.commits), Vec::with_capacity(args.commits));
    let mut alone = Vec::with_capacity(args.commits);
    let body = bytes::Bytes::from(vec![0x5a_u8; 512]);
    note!("durable: {} commits per mode on {}", args.commits, args.store);
    for _ in 0..args.commits {
        let started = Instant::now();
        sqlx::query("INSERT INTO t (v) VALUES (randomblob(100))")
            .execute(&pool)
            .await?;
        fast.push(started.elapsed().as_secs_f64() * 1e3);
        durable.push(durable_commit(&pool, &replicator).await?);
        let (started, name) = (Instant::now(), format!("keycast/bench-put/{}", put.len()));
        let _ = store.put_object_create(&name, body.clone()).await?;
        put.push(started.elapsed().as_secs_f64() * 1e3);
        let (started, a, b) = (
            Instant::now(),
            format!("keycast/bench-pair/{}a", pair.len()),
            format!("keycast/bench-pair/{}b", pair.len()),
        );
        let (ra, rb) = tokio::join!(
            store.put_object_create(&a, body.clone()),
            store.put_object_create(&b, body.clone())
        );
        let _ = (ra?, rb?);
        pair.push(started.elapsed().as_secs_f64() * 1e3);
        alone.push(durable_commit(&pool, &replicator).await?);
    }
    pool.close().await;
    replicator.shutdown(Instant::now() + Duration::from_secs(10)).await?;
    fast.sort_by(f64::total_cmp);
    durable.sort_by(f64::total_cmp);
    put.sort_by(f64::total_cmp);
    pair.sort_by(f64::total_cmp);
    alone.sort_by(f64::total_cmp);
    let added_to =
        |durable: &[f64], p| Some(((percentile(durable, p)? - percentile(&fast, p)?) * 100.0).round() / 100.0);
    let added = |p| added_to(&durable, p);
    let over_put = |added: Option<f64>| {
        added
            .zip(percentile(&put, 50.0))
            .map(|(a, p)| (a / p * 1000.0).round() / 1000.0)
    };
    emit(&json!({
        "bench": "durable",
        "store": args.store,
        "uploads_in_flight": uploads_in_flight,
        "async_ms": summary_ms(&fast),
        "durable_ms": summary_ms(&durable),
        "added_p50_ms": added(50.0),
        "added_p99_ms": added(99.0),
        "latency_ms": args.latency_ms,
        "put_ms": summary_ms(&put),
        "put_pair_ms": summary_ms(&pair),
        "added_p50_over_put_p50": over_put(added(50.0)),
        "durable_alone_ms": summary_ms(&alone),
        "alone_added_p50_ms": added_to(&alone, 50.0),
        "alone_added_p99_ms": added_to(&alone, 99.0),
        "alone_added_p50_over_put_p50": over_put(added_to(&alone, 50.0)),
    }));
    Ok(())
}

/// One commit and its wait for the replica, in milliseconds.
async fn durable_commit(pool: &sqlx::SqlitePool, replicator: &Replicator) -> anyhow::Result<f64> {
    let started = Instant::now();
    sqlx::query("INSERT INTO t (v) VALUES (randomblob(100))")
        .execute(pool)
        .await?;
    replicator.wait_durable(Duration::from_secs(10)).await?;
    Ok(started.elapsed().as_secs_f64() * 1e3)
}
