//! `keycast-bench`: replication benchmarks of keycast's replicator against Litestream 0.5,
//! each measured the same way for both tools in the same run, so the figures that matter are
//! the keycast ÷ Litestream ratios (the machine is shared and absolute numbers drift).
//!
//! Every subcommand prints one JSON object per line on stdout (progress goes to stderr);
//! `report` turns a file of such lines into the Markdown tables of `BENCHMARKS.md`.
//!
//! - `lag`: replication lag of a paced workload, observed from the replica's level-0 LTX
//!   headers (see [`lag`]); for keycast on S3 also to the store's answer to each upload (see
//!   [`acks`]).
//! - `throughput`: sequential commits/s with and without replication (see [`throughput`]).
//! - `durable`: commit latency with and without waiting for the object store (see [`durable`]).
//! - `restore-db` / `restore-time`: build a replica of a large database with keycast, then
//!   time `keycast restore` and `litestream restore` of that same replica (see [`restore`]).
//! - `nip46`: the NIP-46 `sign_event` round trip through a relay, next to that relay's own
//!   echo time (see [`nip46`]; driven by `bench/nip46.sh`).
//! - `nip46-connect`: the same round trip with rust-nostr's `NostrConnect` client.
//! - `coldstart`: empty disk → ready after a long history, every store request slowed by a
//!   cloud store's latency (see [`coldstart`]).
//! - `memory` / `full-image`: peak resident memory of shipping a full image of a large
//!   database and of restoring it (see [`memory`]).

mod acks;
mod coldstart;
mod durable;
mod lag;
mod latency_proxy;
mod litestream;
mod memory;
mod nip46;
mod nip46_connect;
mod observe;
mod pools;
mod report;
mod restore;
mod stats;
mod throughput;

use clap::{Parser, Subcommand};

/// Replication benchmarks: keycast vs Litestream 0.5 on the same workload.
#[derive(Parser)]
#[command(name = "keycast-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replication lag of commits made at a fixed rate (one JSON line).
    Lag(lag::Args),
    /// Sequential commits/s with keycast's replicator, with Litestream, and without
    /// replication, interleaved over several rounds (one JSON line per run, then a summary).
    Throughput(throughput::Args),
    /// Builds a database of about --size-mb with keycast replicating it to --replica.
    RestoreDb(restore::BuildArgs),
    /// Times `keycast restore` and `litestream restore` of the same replica.
    RestoreTime(restore::TimeArgs),
    /// Latency of a plain commit vs a commit confirmed durable in the object store.
    Durable(durable::Args),
    /// NIP-46 `sign_event` round trip through a relay, next to the relay's own echo.
    Nip46(nip46::Args),
    /// NIP-46 `sign_event` round trip with rust-nostr's `NostrConnect` client.
    Nip46Connect(nip46_connect::Args),
    /// Peak resident memory of a full-image upload and of `keycast restore` of a large database.
    Memory(memory::Args),
    /// Ships one full image of --db to an empty --replica and reports this process's VmHWM.
    FullImage(memory::FullImageArgs),
    /// Cold start (empty disk → ready) after --seconds of writes, every store request
    /// slowed by --latency-ms.
    Coldstart(coldstart::Args),
    /// Turns JSON result lines into Markdown tables.
    Report(report::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The replicator's own warnings (failed uploads, full images, fencing) go to stderr;
    // RUST_LOG widens or narrows them.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Lag(a) => lag::run(a).await,
            Command::Throughput(a) => throughput::run(a).await,
            Command::RestoreDb(a) => restore::build(a).await,
            Command::RestoreTime(a) => restore::time(a).await,
            Command::Durable(a) => durable::run(a).await,
            Command::Nip46(a) => nip46::run(a).await,
            Command::Nip46Connect(a) => nip46_connect::run(a).await,
            Command::Memory(a) => memory::run(a).await,
            Command::FullImage(a) => memory::full_image(a).await,
            Command::Coldstart(a) => coldstart::run(a).await,
            Command::Report(a) => report::run(a),
        }
    })
}

/// Prints one result line.
pub fn emit(value: &serde_json::Value) {
    println!("{value}");
}

/// Progress for people, on stderr.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => { eprintln!("keycast-bench: {}", format!($($arg)*)) };
}
