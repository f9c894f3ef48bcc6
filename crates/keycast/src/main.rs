//! The `keycast` command line. Parses arguments and configuration, then hands over to the
//! library (`keycast::run`); all behaviour lives there.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use keycast::cli;
use keycast::config::{Config, Sources};
use keycast_replica::Target;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Nostr key custody and remote signing, with its SQLite database replicated to object storage.
#[derive(Parser)]
#[command(name = "keycast", version, about, long_about = None)]
struct Cli {
    /// TOML configuration file (also KEYCAST_CONFIG). Environment variables and flags override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (the default way to run keycast).
    Serve(ServeArgs),
    /// Open the database, apply pending migrations, and exit; with --to, copy the SQLite
    /// database into an empty PostgreSQL database and verify it.
    Migrate(MigrateArgs),
    /// Restore the database from the replica into a new file (verified before it appears).
    Restore(RestoreArgs),
    /// Inspect the replica.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Manage the master key (the key-encryption key of every stored Nostr key).
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
    /// Registered apps: shown as verified on the consent page, exact redirect URIs.
    #[command(subcommand)]
    Clients(ClientsCommand),
}

#[derive(Subcommand)]
enum MasterKeyCommand {
    /// Re-encrypt every stored key under KEYCAST_MASTER_KEY (decrypting with
    /// KEYCAST_MASTER_KEY_PREVIOUS), then check each opens under the new key alone. Resumable:
    /// a re-run continues where an interrupted one stopped. Exits non-zero until complete.
    Rotate(RotateArgs),
}

#[derive(Args)]
struct RotateArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Re-encrypt at most this many keys in this run (spreads a large rotation over runs)
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
    /// On PostgreSQL, rotate even while instances heard from in the last 10 minutes do not
    /// say they hold the new key (an older version, or instances you know are gone)
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum ClientsCommand {
    /// Register an app and print its new client_id.
    Add {
        /// The app's name, as the consent page shows it
        #[arg(long)]
        name: String,
        /// A redirect URI the app may use, matched exactly (repeat for several)
        #[arg(long = "redirect-uri", value_name = "URI", required = true)]
        redirect_uris: Vec<String>,
        /// An https URL of the app's logo
        #[arg(long, value_name = "URL")]
        logo_url: Option<String>,
        /// Print the registration as JSON
        #[arg(long)]
        json: bool,
    },
    /// List registered apps.
    List {
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Remove an app's registration (its existing grants stay until revoked).
    Remove {
        /// The client_id to remove
        client_id: String,
    },
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    common: ServeArgs,
    /// Copy everything from the SQLite database (DATABASE_URL) into this empty PostgreSQL
    /// database (postgres://…), verifying row counts and per-table checksums. `env:NAME`
    /// reads the URL from the environment variable NAME instead: on the command line the URL,
    /// password included, is shown to every user of the machine (ps) and kept in shell history
    #[arg(long, value_name = "URL")]
    to: Option<String>,
    /// With --to: copy the latest state of this replica (s3://, gs://, az://, file://)
    /// instead of the local database; it is restored into a temporary file first
    #[arg(long, value_name = "URL", requires = "to")]
    from_replica: Option<String>,
}

/// The `--to` of `keycast migrate`: the URL itself, or `env:NAME` for the URL in the
/// environment variable NAME (kept out of `ps` and shell history).
fn target_url(to: &str) -> anyhow::Result<String> {
    match to.strip_prefix("env:") {
        Some(name) => std::env::var(name)
            .with_context(|| format!("--to {to}: the environment variable {name} is not set (or not UTF-8)")),
        None => Ok(to.to_owned()),
    }
}

#[derive(Args)]
struct RestoreArgs {
    /// Replica URL [default: KEYCAST_REPLICA_URL]
    #[arg(long, value_name = "URL")]
    replica: Option<String>,
    /// Where to write the restored database (must not exist unless --force)
    #[arg(short = 'o', long, value_name = "PATH")]
    output: PathBuf,
    /// Restore the state as of this time (RFC 3339), using only files created before it
    #[arg(long, value_name = "TIME", conflicts_with = "txid")]
    timestamp: Option<String>,
    /// Restore the state right after this TXID (16 hex digits, as `replica ls` shows, or decimal)
    #[arg(long, value_name = "TXID")]
    txid: Option<String>,
    /// Replace an existing output file
    #[arg(long)]
    force: bool,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Local vs replicated TXID, unshipped WAL, last error.
    Status(ReplicaArgs),
    /// Snapshots and LTX files in the replica, with TXID ranges, sizes and times.
    Ls(ReplicaArgs),
    /// Check every object's checksum and restore the replica in full; non-zero exit naming
    /// the first bad object.
    Verify(ReplicaArgs),
    /// Accept that the replica lost its newest objects, or that its high-water mark cannot be
    /// believed: record the TXID it reaches now as its mark, so the next start restores that
    /// state. For a replica no instance serves; refused while one holds its lease.
    AcceptLoss(ReplicaArgs),
}

#[derive(Args)]
struct ReplicaArgs {
    /// Replica URL [default: KEYCAST_REPLICA_URL]
    #[arg(long, value_name = "URL")]
    replica: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

/// Flags that override the environment and the configuration file.
#[derive(Args)]
struct ServeArgs {
    /// HTTP port [env: PORT] [default: 3000]
    #[arg(long)]
    port: Option<String>,
    /// Address to listen on [env: KEYCAST_BIND] [default: 0.0.0.0]
    #[arg(long)]
    bind: Option<String>,
    /// Directory for the database and local state [env: KEYCAST_DATA_DIR] [default: ./data]
    #[arg(long)]
    data_dir: Option<String>,
    /// Database URL, sqlite://PATH [env: DATABASE_URL] [default: sqlite://<data-dir>/keycast.db]
    #[arg(long)]
    database_url: Option<String>,
    /// `text` or `json` [env: KEYCAST_LOG_FORMAT] [default: text]
    #[arg(long)]
    log_format: Option<String>,
}

fn main() -> ExitCode {
    return_big_buffers_to_the_os();
    keep_new_files_private();
    // Tests arm fail points on the paths before the HTTP endpoint exists (start-up) through
    // the `FAILPOINTS` variable; a build without fault injection has none to arm.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let no_flags = ServeArgs {
        port: None,
        bind: None,
        data_dir: None,
        database_url: None,
        log_format: None,
    };
    let args = match &cli.command {
        Command::Serve(args) | Command::Migrate(MigrateArgs { common: args, .. }) => args,
        Command::MasterKey(MasterKeyCommand::Rotate(a)) => &a.serve,
        _ => &no_flags,
    };
    let uses_the_master_key = matches!(
        cli.command,
        Command::Serve(_) | Command::MasterKey(MasterKeyCommand::Rotate(_))
    );
    let config = match load_config(cli.config.clone(), args).and_then(|config| {
        if uses_the_master_key {
            config.require_master_key_in_production()?;
        }
        Ok(config)
    }) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("keycast: {e:#}");
            return ExitCode::from(2);
        }
    };
    keycast::logging::init(config.log_format, &config.log_filter);
    let runtime = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(_) => serve(config).await,
            Command::Migrate(MigrateArgs { to: None, .. }) => keycast::serve::migrate(&config).await,
            Command::Migrate(MigrateArgs {
                to: Some(to),
                from_replica: None,
                ..
            }) => keycast::serve::copy_to_postgres(&config, &target_url(&to)?, None).await,
            Command::Migrate(MigrateArgs {
                to: Some(to),
                from_replica: Some(url),
                ..
            }) => {
                let store = replica(&config, Some(url.as_str()))?;
                let scratch = tempfile::tempdir().context("a temporary directory for the restored database")?;
                let restored = scratch.path().join("keycast.db");
                let to = target_url(&to)?;
                cli::restore_cmd(&store, &restored, Target::Latest, false, false).await?;
                keycast::serve::copy_to_postgres(&config, &to, Some(&restored)).await
            }
            Command::MasterKey(MasterKeyCommand::Rotate(a)) => {
                keycast::serve::rotate_master_key(&config, a.limit, a.json, a.force).await
            }
            Command::Restore(a) => restore(&config, a).await,
            Command::Replica(ReplicaCommand::Verify(a)) => {
                cli::verify_cmd(&replica(&config, a.replica.as_deref())?, &std::env::temp_dir(), a.json).await
            }
            Command::Replica(ReplicaCommand::Ls(a)) => {
                cli::ls_cmd(&replica(&config, a.replica.as_deref())?, a.json).await
            }
            Command::Replica(ReplicaCommand::AcceptLoss(a)) => {
                let lease = config.replica.as_ref().map(|r| r.lease).unwrap_or_default();
                cli::accept_loss_cmd(&replica(&config, a.replica.as_deref())?, lease, a.json).await
            }
            Command::Clients(ClientsCommand::Add {
                name,
                redirect_uris,
                logo_url,
                json,
            }) => {
                let new = keycast_core::clients::NewClient {
                    name,
                    redirect_uris,
                    logo_url,
                };
                keycast::clients_cmd::add(&config, new, json).await
            }
            Command::Clients(ClientsCommand::List { json }) => keycast::clients_cmd::list(&config, json).await,
            Command::Clients(ClientsCommand::Remove { client_id }) => {
                keycast::clients_cmd::remove(&config, &client_id).await
            }
            Command::Replica(ReplicaCommand::Status(a)) => {
                let path = config
                    .database
                    .sqlite_path()
                    .context("DATABASE_URL is PostgreSQL: there is no local database and no replica")?;
                cli::status_cmd(&replica(&config, a.replica.as_deref())?, path, a.json).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A log filter that leaves keycast's errors out (`KEYCAST_LOG=sqlx=debug`) must not
            // make a failed command silent.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{}", error_chain(&e));
            } else {
                eprintln!("error: {}", error_chain(&e));
            }
            ExitCode::FAILURE
        }
    }
}

/// The replica named by `--replica`, else by the configuration (`KEYCAST_REPLICA_URL`).
fn replica(config: &Config, flag: Option<&str>) -> anyhow::Result<keycast_replica::Store> {
    let configured = config.replica.as_ref().map(|r| r.url.as_str());
    let encryption = config.replica.as_ref().and_then(|r| r.encryption.clone());
    cli::open(flag.or(configured).or(Some("none")), encryption)
}

async fn restore(config: &Config, args: RestoreArgs) -> anyhow::Result<()> {
    let target = match (&args.txid, &args.timestamp) {
        (Some(t), _) => Target::Txid(cli::parse_txid(t)?),
        (None, Some(t)) => Target::Time(cli::parse_time(t)?),
        (None, None) => Target::Latest,
    };
    // An explicit --replica wins; otherwise the configured one (KEYCAST_REPLICA_URL).
    let store = replica(config, args.replica.as_deref())?;
    cli::restore_cmd(&store, &args.output, target, args.force, args.json).await
}

fn load_config(file: Option<PathBuf>, args: &ServeArgs) -> anyhow::Result<Config> {
    let mut sources = Sources::default();
    if let Some(file) = file.or_else(|| std::env::var_os("KEYCAST_CONFIG").map(PathBuf::from)) {
        sources = sources.with_file(&file)?;
    }
    let sources = sources
        .with_env(|name| std::env::var(name).ok())
        .with_flag("port", args.port.clone())
        .with_flag("bind", args.bind.clone())
        .with_flag("data_dir", args.data_dir.clone())
        .with_flag("database_url", args.database_url.clone())
        .with_flag("log_format", args.log_format.clone());
    Ok(sources.build()?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0])?
        .install_recorder()?;
    let addr = std::net::SocketAddr::new(config.bind, config.port);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} (PORT={}, KEYCAST_BIND={}): {e}",
            config.port,
            config.bind
        )
    })?;
    let local = listener.local_addr()?;
    // The one line on stdout: tests and scripts read the bound address from it.
    println!("keycast listening on http://{local}");
    tracing::info!(%local, "listening");
    keycast::run(listener, config, metrics, keycast::serve::shutdown_signal()).await
}

/// The error and its causes, each once: many errors already spell out their cause, and
/// printing the chain naively (`{:#}`) would repeat it.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// Files and directories keycast creates are its user's alone (mode 0600, 0700): the
/// database holds every password hash (and the WAL and the local replica its pages), which
/// under the usual umask (022) any local user could read and crack offline. Only the
/// permissions of what keycast creates change; an existing data directory keeps its own.
fn keep_new_files_private() {
    #[cfg(unix)]
    // SAFETY: umask(2) only sets the process's file-mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Makes glibc serve every allocation of 1 MiB or more with its own mapping, returned to the
/// OS when freed. By default glibc raises that threshold to the size of the last such block
/// freed (up to 32 MiB), after which each thread's arena keeps argon2's 19 MiB buffers
/// (issue 12, item 5): a burst of 1,000 logins then peaked at 817 MiB instead of 146 MiB
/// with the hashing queue alone.
fn return_big_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called first thing, before any
    // thread is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
