//! keycast's configuration: defaults, then an optional TOML file, then environment
//! variables, then command-line flags — each later source overriding the earlier ones.
//!
//! Every setting is declared once in [`SETTINGS`] with its TOML key, environment variable
//! and flag. Values are validated at start; an error names where the bad value came from
//! (`PORT=abc`, `--port abc`, or `port in keycast.toml`) and what a valid one looks like.
//! Nothing here is read from a global: [`Config`] is built once and passed down.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keycast_http::mail::{MailConfigError, SmtpMailer};
use keycast_http::DurabilityMode;
use keycast_replica::compactor::CompactionPolicy;
use keycast_replica::crypt::ObjectCipher;
use keycast_replica::lease::LeaseOptions;
use keycast_replica::ReplicaOptions;

/// Default HTTP port (Cloud Run sets `PORT`).
pub const DEFAULT_PORT: u16 = 3000;
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default shutdown grace period (seconds): inside Cloud Run's 10 s between SIGTERM and SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 8;

/// One configurable value: where it can come from.
pub struct Setting {
    /// Key in the TOML file.
    pub key: &'static str,
    /// Environment variable.
    pub env: &'static str,
    /// Default, as shown in `--help` and docs/CONFIGURATION.md.
    pub default: &'static str,
    /// One line for humans.
    pub help: &'static str,
}

/// Every setting keycast reads. The table in docs/CONFIGURATION.md mirrors this list.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "port",
        env: "PORT",
        default: "3000",
        help: "HTTP port (0 picks a free port)",
    },
    Setting {
        key: "bind",
        env: "KEYCAST_BIND",
        default: "0.0.0.0",
        help: "address to listen on",
    },
    Setting {
        key: "data_dir",
        env: "KEYCAST_DATA_DIR",
        default: "./data",
        help: "directory for the database and local state; created if missing",
    },
    Setting {
        key: "database_url",
        env: "DATABASE_URL",
        default: "sqlite://<data_dir>/keycast.db",
        help: "the database: sqlite://PATH (one instance, replicated), or postgres://user:pass@host:port/db (any number of instances; Cloud SQL: postgres://user:pass@/db?host=/cloudsql/PROJECT:REGION:INSTANCE); the password is never printed",
    },
    Setting {
        key: "database_max_connections",
        env: "KEYCAST_DATABASE_MAX_CONNECTIONS",
        default: "8 (SQLite), 10 (PostgreSQL)",
        help: "pooled connections per instance; on PostgreSQL instances × (this + 4: listener, activity flush, heartbeat, change notices) must stay under the server's max_connections",
    },
    Setting {
        key: "database_direct_url",
        env: "KEYCAST_DATABASE_DIRECT_URL",
        default: "(DATABASE_URL)",
        help: "PostgreSQL: a direct (session) connection to the same database for LISTEN/NOTIFY and the migration lock, when DATABASE_URL goes through a transaction-mode pooler such as PgBouncer",
    },
    Setting {
        key: "cache_ttl_secs",
        env: "KEYCAST_CACHE_TTL_SECS",
        default: "30 (SQLite), 5 (PostgreSQL)",
        help: "how long an instance trusts a cached authorization or key without asking the database: the backstop if a change notice from another instance is lost",
    },
    Setting {
        key: "instance_ttl_secs",
        env: "KEYCAST_INSTANCE_TTL_SECS",
        default: "5",
        help: "PostgreSQL: an instance whose heartbeat is this old is dead and its bunkers are answered by the others",
    },
    Setting {
        key: "log_format",
        env: "KEYCAST_LOG_FORMAT",
        default: "text",
        help: "`text` or `json` (Cloud Logging)",
    },
    Setting {
        key: "log",
        env: "KEYCAST_LOG",
        default: "info",
        help: "log filter, e.g. `info` or `keycast=debug,sqlx=warn`",
    },
    Setting {
        key: "shutdown_grace_secs",
        env: "KEYCAST_SHUTDOWN_GRACE_SECS",
        default: "8",
        help: "seconds to finish in-flight work after SIGTERM",
    },
    Setting {
        key: "request_timeout_secs",
        env: "KEYCAST_REQUEST_TIMEOUT_SECS",
        default: "30",
        help: "per-request timeout in seconds; 0 disables it",
    },
    Setting {
        key: "header_read_timeout_secs",
        env: "KEYCAST_HEADER_READ_TIMEOUT_SECS",
        default: "10",
        help: "seconds a client has to send a request's headers before the connection is closed (slowloris)",
    },
    Setting {
        key: "http_max_connections",
        env: "KEYCAST_HTTP_MAX_CONNECTIONS",
        default: "512",
        help: "HTTP connections open at once; past it new ones wait (in the kernel's queue) until one ends, so a flood cannot take the descriptors the database and relays need",
    },
    Setting {
        key: "metrics_token",
        env: "KEYCAST_METRICS_TOKEN",
        default: "(none: loopback only)",
        help: "bearer token /metrics requires; without it /metrics answers only direct loopback requests; secret",
    },
    Setting {
        key: "admin_token",
        env: "KEYCAST_ADMIN_TOKEN",
        default: "(none: admin API off)",
        help: "bearer token the admin API (/api/admin/*: registered apps, finding and deleting accounts) requires; without it the admin API is off; secret",
    },
    Setting {
        key: "open_registration",
        env: "KEYCAST_OPEN_REGISTRATION",
        default: "true",
        help: "let apps nobody registered ask for authorization (shown as unverified); false accepts registered apps only",
    },
    Setting {
        key: "replica_url",
        env: "KEYCAST_REPLICA_URL",
        default: "file://<data_dir>-replica",
        help: "where the database is replicated: file:///dir, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix (abs://account@container/prefix), or none",
    },
    Setting {
        key: "replica_checkpoint_pages",
        env: "KEYCAST_REPLICA_CHECKPOINT_PAGES",
        default: "4000",
        help: "checkpoint once the WAL holds this many pages (after shipping them)",
    },
    Setting {
        key: "replica_compaction_levels",
        env: "KEYCAST_REPLICA_COMPACTION_LEVELS",
        default: "10,300,3600",
        help: "seconds between compactions of level 1, 2, 3… (comma-separated)",
    },
    Setting {
        key: "replica_snapshot_interval_secs",
        env: "KEYCAST_REPLICA_SNAPSHOT_INTERVAL_SECS",
        default: "86400",
        help: "seconds between full snapshots in the replica",
    },
    Setting {
        key: "replica_snapshot_retention_secs",
        env: "KEYCAST_REPLICA_SNAPSHOT_RETENTION_SECS",
        default: "86400",
        help: "seconds snapshots are kept (the newest always is); bounds point-in-time restore",
    },
    Setting {
        key: "replica_l0_retention_secs",
        env: "KEYCAST_REPLICA_L0_RETENTION_SECS",
        default: "300",
        help: "seconds level-0 files are kept after compaction covers them",
    },
    Setting {
        key: "durability",
        env: "KEYCAST_DURABILITY",
        default: "async",
        help: "`async`: only writes that change who may sign wait for the replica; `sync`: every write does",
    },
    Setting {
        key: "replica_lease_ttl_secs",
        env: "KEYCAST_REPLICA_LEASE_TTL_SECS",
        default: "15",
        help: "lifetime of the single-writer lease after each renewal",
    },
    Setting {
        key: "replica_lease_wait_secs",
        env: "KEYCAST_REPLICA_LEASE_WAIT_SECS",
        default: "60",
        help: "how long a starting instance waits for the lease holder to release it",
    },
    Setting {
        key: "replica_verify_interval_secs",
        env: "KEYCAST_REPLICA_VERIFY_INTERVAL_SECS",
        default: "3600",
        help: "restore the replica in the background this often and compare it with the live database (0 disables)",
    },
    Setting {
        key: "replica_encryption_key",
        env: "KEYCAST_REPLICA_ENCRYPTION_KEY",
        default: "(none)",
        help: "32 bytes, base64: encrypt replica objects client-side (AES-256-GCM); Litestream cannot read such a replica",
    },
    Setting {
        key: "replica_durable_timeout_secs",
        env: "KEYCAST_REPLICA_DURABLE_TIMEOUT_SECS",
        default: "10",
        help: "how long a write that must be durable waits for the replica before it is answered 503",
    },
    Setting {
        key: "replica_check_conditional_writes",
        env: "KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES",
        default: "true",
        help: "at start, refuse a store that ignores create-only and compare-and-swap writes (they fence off a second writer); false skips the check",
    },
    Setting {
        key: "replica_unhealthy_after_secs",
        env: "KEYCAST_REPLICA_UNHEALTHY_AFTER_SECS",
        default: "60",
        help: "/healthz/ready answers 503 once replication has failed for this long",
    },
    Setting {
        key: "master_key",
        env: "KEYCAST_MASTER_KEY",
        default: "(dev key in <data_dir>/master.key)",
        help: "32 random bytes, base64: the key-encryption key of every stored Nostr key; never stored in the database or the replica",
    },
    Setting {
        key: "master_key_path",
        env: "MASTER_KEY_PATH",
        default: "(none)",
        help: "file holding the master key (base64), instead of KEYCAST_MASTER_KEY",
    },
    Setting {
        key: "master_key_previous",
        env: "KEYCAST_MASTER_KEY_PREVIOUS",
        default: "(none)",
        help: "during a master-key rotation only: the other master key (base64). keycast then decrypts under either key and encrypts under KEYCAST_MASTER_KEY; on SQLite `keycast serve` re-encrypts every stored key in the background, on PostgreSQL `keycast master-key rotate` does; remove it once the rotation reports complete",
    },
    Setting {
        key: "public_url",
        env: "KEYCAST_PUBLIC_URL",
        default: "http://localhost:<port>",
        help: "the URL users and apps reach keycast at: OAuth issuer, redirect base; https makes cookies Secure",
    },
    Setting {
        key: "bunker_relays",
        env: "BUNKER_RELAYS",
        default: "(the embedded relay)",
        help: "comma-separated ws:// or wss:// relays bunkers listen on and bunker URLs name; set it in production",
    },
    Setting {
        key: "embedded_relay",
        env: "KEYCAST_EMBEDDED_RELAY",
        default: "true unless BUNKER_RELAYS is set",
        help: "run the small NIP-46-only relay built into keycast (loopback, stores nothing)",
    },
    Setting {
        key: "embedded_relay_addr",
        env: "KEYCAST_EMBEDDED_RELAY_ADDR",
        default: "127.0.0.1:7447",
        help: "where the embedded relay listens (ip:port; port 0 picks a free one)",
    },
    Setting {
        key: "embedded_relay_max_connections",
        env: "KEYCAST_EMBEDDED_RELAY_MAX_CONNECTIONS",
        default: "256",
        help: "connections the embedded relay holds at once; more are closed at once, so a flood cannot take the descriptors HTTP needs",
    },
    Setting {
        key: "nip46",
        env: "KEYCAST_NIP46",
        default: "true",
        help: "answer NIP-46 requests on the relays (false: bunker URLs are issued but not served)",
    },
    Setting {
        key: "nostrconnect_internal_relays",
        env: "KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS",
        default: "true while the embedded relay is on",
        help: "accept nostrconnect:// relays on loopback/private addresses (keycast connects to them)",
    },
    Setting {
        key: "nostrconnect_max_relays_per_account",
        env: "KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT",
        default: "10",
        help: "distinct relays named by nostrconnect:// apps one account may use (BUNKER_RELAYS do not count)",
    },
    Setting {
        key: "nostrconnect_max_relays",
        env: "KEYCAST_NOSTRCONNECT_MAX_RELAYS",
        default: "200",
        help: "distinct relays named by nostrconnect:// apps keycast accepts and connects to, all accounts together",
    },
    Setting {
        key: "nostrconnect_relay_messages_per_sec",
        env: "KEYCAST_NOSTRCONNECT_RELAY_MESSAGES_PER_SEC",
        default: "100",
        help: "messages a second keycast reads from one relay named by an app (burst: twice that)",
    },
    Setting {
        key: "nip46_unbound_requests_per_sec",
        env: "KEYCAST_NIP46_UNBOUND_REQUESTS_PER_SEC",
        default: "20",
        help: "NIP-46 requests a second, per relay, from clients not bound to the bunker (burst: twice that); beyond it they go unanswered",
    },
    Setting {
        key: "nip46_max_in_flight",
        env: "KEYCAST_NIP46_MAX_IN_FLIGHT",
        default: "256",
        help: "NIP-46 requests handled at once; more are answered \"busy\"",
    },
    Setting {
        key: "allowed_origins",
        env: "ALLOWED_ORIGINS",
        default: "(none)",
        help: "comma-separated origins allowed to call the API from browsers (CORS); none sends no CORS headers",
    },
    Setting {
        key: "smtp_url",
        env: "KEYCAST_SMTP_URL",
        default: "(none: development outbox)",
        help: "SMTP server for verification and reset mail: smtps://user:pass@host:465, smtp://user:pass@host:587?tls=required or smtp://host:25; secret",
    },
    Setting {
        key: "smtp_max_waiting",
        env: "KEYCAST_SMTP_MAX_WAITING",
        default: "256",
        help: "mails waiting for the SMTP server, in each lane (sign-up mail; account mail: resets, notices), 1 to 100000; past it a new one is dropped, and asking for a link answers 503",
    },
    Setting {
        key: "mail_from",
        env: "KEYCAST_MAIL_FROM",
        default: "(none)",
        help: "the From address of keycast's mail, e.g. `keycast <noreply@example.org>`; required with KEYCAST_SMTP_URL",
    },
    Setting {
        key: "oauth_code_ttl_secs",
        env: "KEYCAST_OAUTH_CODE_TTL_SECS",
        default: "600",
        help: "life of an OAuth authorization code, 1 to 600 seconds",
    },
    Setting {
        key: "approval_ttl_secs",
        env: "KEYCAST_APPROVAL_TTL_SECS",
        default: "300",
        help: "how long a request its policy does not cover waits for the owner's decision on the approval page, and an HTTP allow-once for the retry, 1 to 3600 seconds",
    },
    Setting {
        key: "access_token_ttl_secs",
        env: "KEYCAST_ACCESS_TOKEN_TTL_SECS",
        default: "3600",
        help: "life of an OAuth access token, 60 to 86400 seconds; apps refresh for another",
    },
    Setting {
        key: "refresh_token_ttl_secs",
        env: "KEYCAST_REFRESH_TOKEN_TTL_SECS",
        default: "2592000",
        help: "life of an OAuth refresh token, 3600 to 31536000 seconds, counted afresh at each refresh",
    },
    Setting {
        key: "trusted_proxy_hops",
        env: "KEYCAST_TRUSTED_PROXY_HOPS",
        default: "0",
        help: "proxies in front of keycast that append to X-Forwarded-For (Cloud Run: 1; a Google load balancer in front of Cloud Run: 2); 0 ignores the header",
    },
    Setting {
        key: "hash_memory_mib",
        env: "KEYCAST_HASH_MEMORY_MIB",
        default: "128",
        help: "memory for password hashing (argon2id, 19 MiB each) and key export (scrypt, 64 MiB) running at once",
    },
    Setting {
        key: "hash_queue",
        env: "KEYCAST_HASH_QUEUE",
        default: "64",
        help: "requests that may wait for that memory; more are answered 503 with Retry-After",
    },
    Setting {
        key: "reserved_usernames",
        env: "KEYCAST_RESERVED_USERNAMES",
        default: "(none)",
        help: "comma-separated NIP-05 names nobody may claim, on top of the built-in ones (_, admin, root, support, keycast, …)",
    },
    Setting {
        key: "activity_flush_ms",
        env: "KEYCAST_ACTIVITY_FLUSH_MS",
        default: "1000",
        help: "milliseconds between writes of the buffered signing activity (10 to 60000; with a replica, at most the lease TTL): each write is one commit and one replica upload; a crash loses at most this much activity",
    },
    Setting {
        key: "activity_per_grant",
        env: "KEYCAST_ACTIVITY_PER_GRANT",
        default: "1000",
        help: "activity records kept per grant (100 to 10000000): older ones are removed as the app signs, its total of signatures still counted, and a grant with a rate limit keeps that window's signatures",
    },
    Setting {
        key: "max_grants_per_account",
        env: "KEYCAST_MAX_GRANTS_PER_ACCOUNT",
        default: "100",
        help: "live (unrevoked, unexpired) apps one account may authorize (1 to 100000); past it a consent or nostrconnect acceptance is refused with 409 saying to revoke one",
    },
    Setting {
        key: "sweep_interval_secs",
        env: "KEYCAST_SWEEP_INTERVAL_SECS",
        default: "3600",
        help: "seconds between removals of expired sessions, mailed tokens, OAuth codes and access tokens, of refresh tokens 30 days past their expiry, and of revoked or expired grants' activity beyond their newest 20 (1 to 86400)",
    },
    Setting {
        key: "allow_network_filesystem",
        env: "KEYCAST_ALLOW_NETWORK_FILESYSTEM",
        default: "false",
        help: "start even when the database directory is on a network or FUSE filesystem (NFS, SMB, 9p, Cloud Storage FUSE…), where SQLite's locks are unreliable",
    },
    Setting {
        key: "test_routes",
        env: "KEYCAST_TEST_ROUTES",
        default: "false",
        help: "mount /api/test/* (for keycast's own tests only)",
    },
];

/// Settings whose values are secrets: redacted from every message.
const SECRET_SETTINGS: &[&str] = &[
    "replica_encryption_key",
    "master_key",
    "master_key_previous",
    "smtp_url",
    "metrics_token",
    "admin_token",
];
/// Settings whose values are URLs that may carry a password: printed with it masked.
const URL_SETTINGS: &[&str] = &["database_url", "database_direct_url", "replica_url"];

/// Where the embedded relay listens by default: loopback, so it is private to the machine.
pub const DEFAULT_EMBEDDED_RELAY_ADDR: &str = "127.0.0.1:7447";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub bind: IpAddr,
    pub data_dir: PathBuf,
    /// The database (`DATABASE_URL`).
    pub database: Database,
    /// Trust cached authorizations and keys this long (`KEYCAST_CACHE_TTL_SECS`).
    pub cache_ttl: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub shutdown_grace: Duration,
    pub request_timeout: Duration,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// HTTP connections open at once (`KEYCAST_HTTP_MAX_CONNECTIONS`).
    pub http_max_connections: usize,
    /// Bearer token `/metrics` requires; `None`: loopback only.
    pub metrics_token: Option<keycast_core::Secret<String>>,
    /// `KEYCAST_ADMIN_TOKEN`: the admin API's bearer token; `None` turns it off.
    pub admin_token: Option<keycast_core::Secret<String>>,
    /// `KEYCAST_OPEN_REGISTRATION`: unregistered apps may ask (as unverified). Default true.
    pub open_registration: bool,
    pub test_routes: bool,
    /// Which writes wait for the replica.
    pub durability: DurabilityMode,
    /// Replication; `None` when `KEYCAST_REPLICA_URL=none`.
    pub replica: Option<ReplicaConfig>,
    /// Where the master key comes from.
    pub master_key: MasterKeySource,
    /// `KEYCAST_MASTER_KEY_PREVIOUS`: the old master key during a rotation, already checked
    /// to be 32 bytes of base64.
    pub master_key_previous: Option<keycast_core::Secret<String>>,
    /// `KEYCAST_PUBLIC_URL` without a trailing slash; `None` → `http://localhost:<bound port>`.
    pub public_url: Option<String>,
    /// `BUNKER_RELAYS`: relays bunkers listen on and bunker URLs name. Empty: the
    /// embedded relay's URL is used.
    pub bunker_relays: Vec<String>,
    /// Where the embedded relay listens; `None` when it is off.
    pub embedded_relay: Option<std::net::SocketAddr>,
    /// Connections the embedded relay holds at once.
    pub embedded_relay_max_connections: usize,
    /// Answer NIP-46 requests.
    pub nip46: bool,
    /// Accept `nostrconnect://` relays on internal addresses.
    pub nostrconnect_internal_relays: bool,
    /// NIP-46 requests handled at once (`KEYCAST_NIP46_MAX_IN_FLIGHT`).
    pub nip46_max_in_flight: usize,
    /// Caps on relays named by `nostrconnect://` apps
    /// (`KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT`, `KEYCAST_NOSTRCONNECT_MAX_RELAYS`).
    pub nostrconnect_relay_caps: keycast_core::nostrconnect::RelayCaps,
    /// `KEYCAST_NOSTRCONNECT_RELAY_MESSAGES_PER_SEC`.
    pub nostrconnect_relay_messages_per_sec: u32,
    /// `KEYCAST_NIP46_UNBOUND_REQUESTS_PER_SEC`.
    pub nip46_unbound_requests_per_sec: u32,
    /// CORS origins; empty disables CORS.
    pub allowed_origins: Vec<String>,
    /// Mail through this SMTP server; `None` → the development outbox.
    pub smtp: Option<SmtpMailer>,
    /// Life of an OAuth authorization code, seconds (1..=600).
    pub oauth_code_ttl_secs: i64,
    /// Life of a pending approval, seconds (1..=3600; `KEYCAST_APPROVAL_TTL_SECS`).
    pub approval_ttl_secs: i64,
    /// Life of OAuth access tokens (60..=86400 s) and refresh tokens (3600..=31536000 s).
    pub token_lifetimes: keycast_core::refresh::TokenLifetimes,
    /// Proxies that append to `X-Forwarded-For` (0: the header is ignored).
    pub trusted_proxy_hops: usize,
    /// Memory budget of password hashing and key export, MiB.
    pub hash_memory_mib: u32,
    /// Hashing jobs that may wait for the budget.
    pub hash_queue: usize,
    /// NIP-05 names reserved by the operator, lowercase.
    pub reserved_usernames: Vec<String>,
    /// Start even with the database on a network or FUSE filesystem.
    pub allow_network_filesystem: bool,
    /// How often buffered signing activity is written (`KEYCAST_ACTIVITY_FLUSH_MS`).
    pub activity_flush: Duration,
    /// How often expired sessions, tokens and codes are removed (`KEYCAST_SWEEP_INTERVAL_SECS`).
    pub sweep_interval: Duration,
    /// Activity records kept per grant (`KEYCAST_ACTIVITY_PER_GRANT`).
    pub activity_per_grant: u32,
    /// Live grants an account may have (`KEYCAST_MAX_GRANTS_PER_ACCOUNT`).
    pub max_grants_per_account: u32,
}

/// Which database keycast runs on.
#[derive(Debug, Clone)]
pub enum Database {
    /// A SQLite file: one instance, replicated by keycast itself.
    Sqlite {
        path: PathBuf,
        /// Pooled connections (`KEYCAST_DATABASE_MAX_CONNECTIONS`).
        max_connections: u32,
    },
    /// A PostgreSQL server: any number of instances, no replicator.
    Postgres(PostgresConfig),
}

impl Config {
    /// How often the signer's buffered activity is written: `KEYCAST_ACTIVITY_FLUSH_MS`, but
    /// at least once per replica lease TTL. An instance that only signs writes nothing else;
    /// its lease is renewed by each signing request and may be taken at a deploy a TTL (and a
    /// margin) after the last one, and what is still buffered then could never be written.
    pub fn activity_flush_every(&self) -> Duration {
        match &self.replica {
            Some(replica) => self.activity_flush.min(replica.lease.ttl),
            None => self.activity_flush,
        }
    }
}

impl Database {
    /// The SQLite file, if that is the engine.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Database::Sqlite { path, .. } => Some(path),
            Database::Postgres(_) => None,
        }
    }

    /// Where the database is, for logs (never a password).
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite { path, .. } => path.display().to_string(),
            Database::Postgres(pg) => pg.options.describe(),
        }
    }
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// `DATABASE_URL` and the pool settings.
    pub options: keycast_db::PgOptions,
    /// `KEYCAST_DATABASE_DIRECT_URL`: a session connection for LISTEN/NOTIFY and the
    /// migration lock; `None`: `DATABASE_URL` is direct.
    pub direct: Option<keycast_db::PgOptions>,
    /// `KEYCAST_INSTANCE_TTL_SECS`: a heartbeat older than this means the instance is dead.
    pub instance_ttl: Duration,
}

impl PostgresConfig {
    /// The options for session-level work (LISTEN, advisory locks).
    pub fn session(&self) -> keycast_db::PgOptions {
        self.direct.clone().unwrap_or_else(|| self.options.clone())
    }
}

/// Where the master key (the key-encryption key of stored Nostr keys) comes from.
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// `KEYCAST_MASTER_KEY` (or `KEYCAST_MASTER_KEY_FILE`), already checked to be 32 bytes.
    Inline(keycast_core::Secret<String>),
    /// `MASTER_KEY_PATH`: read at start.
    File(PathBuf),
    /// Neither: a development key in `<data_dir>/master.key`, generated if missing.
    Development(PathBuf),
}

impl Config {
    /// For the commands that use the master key (`serve`, `master-key rotate`): an https
    /// (production) instance must be given one. The development key generated beside the
    /// database is lost with the disk (on Cloud Run, at the next deploy), and every stored
    /// key with it.
    ///
    /// # Errors
    /// Naming `KEYCAST_MASTER_KEY`, and the existing development key file if there is one.
    pub fn require_master_key_in_production(&self) -> Result<(), ConfigError> {
        let https = self.public_url.as_deref().is_some_and(|u| u.starts_with("https://"));
        let MasterKeySource::Development(path) = &self.master_key else {
            return Ok(());
        };
        if !https {
            return Ok(());
        }
        let existing = match path.exists() {
            true => format!(
                " (this data directory already has a development key: to keep using it, set MASTER_KEY_PATH={})",
                path.display()
            ),
            false => String::new(),
        };
        Err(ConfigError::Invalid {
            origin: "KEYCAST_MASTER_KEY".into(),
            reason: format!(
                "is required while KEYCAST_PUBLIC_URL is https (or MASTER_KEY_PATH): a development key generated \
                 beside the database is lost with the disk (on Cloud Run, at the next deploy), and every stored key \
                 with it; generate one with `openssl rand -base64 32` and keep it in a secret manager{existing}"
            ),
        })
    }
}

/// Where and how the database is replicated.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The replica URL as configured (it may name credentials-free locations only).
    pub url: String,
    pub options: ReplicaOptions,
    /// The single-writer lease.
    pub lease: LeaseOptions,
    /// Client-side encryption of replica objects, if a key was given.
    pub encryption: Option<ObjectCipher>,
    /// Readiness turns 503 after uploads have failed this long.
    pub unhealthy_after: Duration,
    /// How long a durable write waits for the replica before it is refused.
    pub durable_timeout: Duration,
    /// Probe the store at start and refuse one that ignores conditional writes.
    pub check_conditional_writes: bool,
}

/// A configuration value that is missing, malformed or out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error("cannot read configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// Where a raw value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    File(PathBuf),
    Env,
    Flag,
}

/// A raw, not yet validated value and its origin.
#[derive(Debug, Clone)]
struct Raw {
    value: String,
    origin: Origin,
}

/// Values gathered from every source, by setting key; later sources replace earlier ones.
#[derive(Debug, Default)]
pub struct Sources {
    values: BTreeMap<&'static str, Raw>,
    /// Problems found while gathering, reported by [`Sources::build`].
    errors: Vec<ConfigError>,
}

impl Sources {
    /// Reads the TOML file at `path`. Unknown keys are refused: a typo must not be ignored.
    ///
    /// # Errors
    /// [`ConfigError::File`] if the file is unreadable, not TOML, or has an unknown key.
    pub fn with_file(mut self, path: &Path) -> Result<Self, ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_err(e.message().to_owned()))?;
        for (key, value) in table {
            let setting = SETTINGS.iter().find(|s| s.key == key).ok_or_else(|| {
                let known: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
                file_err(format!("unknown setting `{key}` (known: {})", known.join(", ")))
            })?;
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(file_err(format!(
                        "`{key}` must be a string, integer or boolean, not {}",
                        other.type_str()
                    )))
                }
            };
            self.values.insert(
                setting.key,
                Raw {
                    value,
                    origin: Origin::File(path.to_owned()),
                },
            );
        }
        Ok(self)
    }

    /// Reads every setting's environment variable through `lookup` (`std::env::var` in
    /// production, a map in tests).
    ///
    /// Any setting may instead be given as `<VAR>_FILE`, the path of a file holding the value
    /// (how secrets are mounted on Cloud Run and Kubernetes); setting both is an error.
    pub fn with_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        for setting in SETTINGS {
            let file_var = format!("{}_FILE", setting.env);
            let value = match (lookup(setting.env), lookup(&file_var)) {
                (Some(_), Some(_)) => {
                    let reason = format!("{} is set too; use one of them", setting.env);
                    self.errors.push(ConfigError::Invalid {
                        origin: file_var,
                        reason,
                    });
                    continue;
                }
                (Some(value), None) => value,
                (None, Some(path)) => match std::fs::read_to_string(&path) {
                    Ok(text) => text.trim().to_owned(),
                    Err(e) => {
                        let reason = format!("cannot read {path}: {e}");
                        self.errors.push(ConfigError::Invalid {
                            origin: file_var,
                            reason,
                        });
                        continue;
                    }
                },
                (None, None) => continue,
            };
            self.values.insert(
                setting.key,
                Raw {
                    value,
                    origin: Origin::Env,
                },
            );
        }
        self
    }

    /// Applies a command-line flag value for `key` (a key of [`SETTINGS`]).
    pub fn with_flag(mut self, key: &'static str, value: Option<String>) -> Self {
        if let Some(value) = value {
            self.values.insert(
                key,
                Raw {
                    value,
                    origin: Origin::Flag,
                },
            );
        }
        self
    }

    /// Validates every value into a [`Config`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad value and its origin.
    pub fn build(mut self) -> Result<Config, ConfigError> {
        if !self.errors.is_empty() {
            return Err(self.errors.remove(0));
        }
        let data_dir = PathBuf::from(
            self.get("data_dir", non_empty)?
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        );
        let database = self.database(&data_dir)?;
        let postgres = matches!(database, Database::Postgres(_));
        let default_ttl = if postgres {
            5
        } else {
            keycast_core::signer::DEFAULT_CACHE_TTL.as_secs()
        };
        Ok(Config {
            port: self.get("port", parse_port)?.unwrap_or(DEFAULT_PORT),
            bind: self
                .get("bind", |v| {
                    v.parse::<IpAddr>()
                        .map_err(|_| "not an IP address (e.g. 0.0.0.0 or 127.0.0.1)".into())
                })?
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            database,
            cache_ttl: self
                .get("cache_ttl_secs", |v| match v.parse::<u64>() {
                    Ok(n) if (1..=3600).contains(&n) => Ok(Duration::from_secs(n)),
                    _ => Err("expected seconds from 1 to 3600".into()),
                })?
                .unwrap_or(Duration::from_secs(default_ttl)),
            log_format: self.get("log_format", parse_log_format)?.unwrap_or(LogFormat::Text),
            log_filter: self.get("log", parse_log_filter)?.unwrap_or_else(|| "info".into()),
            shutdown_grace: self
                .get("shutdown_grace_secs", parse_secs)?
                .unwrap_or(Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS)),
            request_timeout: self
                .get("request_timeout_secs", parse_secs)?
                .unwrap_or(Duration::from_secs(30)),
            header_read_timeout: self.get("header_read_timeout_secs", parse_positive_secs)?.unwrap_or(
                Duration::from_secs(crate::http_server::DEFAULT_HEADER_READ_TIMEOUT_SECS),
            ),
            http_max_connections: self
                .get("http_max_connections", parse_connections)?
                .unwrap_or(crate::http_server::DEFAULT_MAX_CONNECTIONS),
            metrics_token: self.get("metrics_token", |v| {
                if v.len() < 16 {
                    Err("expected at least 16 characters (e.g. `openssl rand -hex 32`)".into())
                } else {
                    Ok(keycast_core::Secret::new(v.to_owned()))
                }
            })?,
            admin_token: self.get("admin_token", |v| {
                if v.len() < 32 {
                    Err("expected at least 32 characters (e.g. `openssl rand -hex 32`)".into())
                } else {
                    Ok(keycast_core::Secret::new(v.to_owned()))
                }
            })?,
            open_registration: self.get("open_registration", parse_bool)?.unwrap_or(true),
            test_routes: self.test_routes()?,
            durability: self.get("durability", parse_durability)?.unwrap_or_default(),
            replica: if postgres { None } else { self.replica(&data_dir)? },
            master_key: self.master_key(&data_dir)?,
            master_key_previous: self.master_key_previous(&data_dir)?,
            public_url: self.get("public_url", parse_public_url)?,
            bunker_relays: self.get("bunker_relays", parse_relays)?.unwrap_or_default(),
            embedded_relay: self.embedded_relay()?,
            embedded_relay_max_connections: self
                .get("embedded_relay_max_connections", parse_connections)?
                .unwrap_or(keycast_nip46::embedded::DEFAULT_MAX_CONNECTIONS),
            nip46: self.get("nip46", parse_bool)?.unwrap_or(true),
            // A development instance (embedded relay) talks to local clients; a production
            // one must not be steered into its own network.
            nostrconnect_internal_relays: self
                .get("nostrconnect_internal_relays", parse_bool)?
                .unwrap_or(self.embedded_relay()?.is_some()),
            nip46_max_in_flight: self
                .get("nip46_max_in_flight", |v| match v.parse::<usize>() {
                    Ok(n) if (1..=100_000).contains(&n) => Ok(n),
                    _ => Err("expected a number of requests from 1 to 100000".into()),
                })?
                .unwrap_or(256),
            nostrconnect_relay_caps: keycast_core::nostrconnect::RelayCaps {
                per_account: self
                    .get("nostrconnect_max_relays_per_account", |v| parse_count(v, 1000))?
                    .unwrap_or(keycast_core::nostrconnect::DEFAULT_MAX_RELAYS_PER_ACCOUNT),
                total: self
                    .get("nostrconnect_max_relays", |v| parse_count(v, 100_000))?
                    .unwrap_or(keycast_core::nostrconnect::DEFAULT_MAX_RELAYS),
            },
            nostrconnect_relay_messages_per_sec: self
                .get("nostrconnect_relay_messages_per_sec", parse_rate)?
                .unwrap_or(keycast_nip46::service::DEFAULT_APP_RELAY_MESSAGES_PER_SEC),
            nip46_unbound_requests_per_sec: self
                .get("nip46_unbound_requests_per_sec", parse_rate)?
                .unwrap_or(keycast_nip46::service::DEFAULT_UNBOUND_REQUESTS_PER_SEC),
            allowed_origins: self.get("allowed_origins", parse_origins)?.unwrap_or_default(),
            smtp: self.smtp()?,
            oauth_code_ttl_secs: self
                .get("oauth_code_ttl_secs", parse_code_ttl)?
                .unwrap_or(keycast_core::oauth::CODE_TTL_SECS),
            approval_ttl_secs: self
                .get("approval_ttl_secs", |v| parse_secs_between(v, 1, 3600))?
                .unwrap_or(keycast_core::approval::DEFAULT_APPROVAL_TTL_SECS),
            token_lifetimes: keycast_core::refresh::TokenLifetimes {
                access_secs: self
                    .get("access_token_ttl_secs", |v| parse_secs_between(v, 60, 86_400))?
                    .unwrap_or(keycast_core::refresh::DEFAULT_ACCESS_TOKEN_TTL_SECS),
                refresh_secs: self
                    .get("refresh_token_ttl_secs", |v| parse_secs_between(v, 3600, 365 * 86_400))?
                    .unwrap_or(keycast_core::refresh::DEFAULT_REFRESH_TOKEN_TTL_SECS),
            },
            trusted_proxy_hops: self
                .get("trusted_proxy_hops", |v| match v.parse::<usize>() {
                    Ok(n) if n <= 10 => Ok(n),
                    _ => Err("expected the number of proxies in front of keycast, 0 to 10 (Cloud Run: 1)".into()),
                })?
                .unwrap_or(0),
            hash_memory_mib: self
                .get("hash_memory_mib", |v| match v.parse::<u32>() {
                    Ok(n) if (keycast_core::hashing_queue::SCRYPT_MIB..=65_536).contains(&n) => Ok(n),
                    _ => Err("expected MiB from 64 (one key export) to 65536".into()),
                })?
                .unwrap_or(keycast_core::hashing_queue::DEFAULT_BUDGET_MIB),
            hash_queue: self
                .get("hash_queue", |v| match v.parse::<usize>() {
                    Ok(n) if n <= 100_000 => Ok(n),
                    _ => Err("expected a number of waiting requests from 0 to 100000".into()),
                })?
                .unwrap_or(keycast_core::hashing_queue::DEFAULT_MAX_WAITING),
            reserved_usernames: self
                .get("reserved_usernames", parse_reserved_usernames)?
                .unwrap_or_default(),
            allow_network_filesystem: self.get("allow_network_filesystem", parse_bool)?.unwrap_or(false),
            activity_flush: self
                .get("activity_flush_ms", |v| match v.parse::<u64>() {
                    Ok(ms) if (10..=60_000).contains(&ms) => Ok(Duration::from_millis(ms)),
                    _ => Err("expected milliseconds from 10 to 60000".into()),
                })?
                .unwrap_or(Duration::from_secs(1)),
            sweep_interval: self
                .get("sweep_interval_secs", |v| match v.parse::<u64>() {
                    Ok(secs) if (1..=86_400).contains(&secs) => Ok(Duration::from_secs(secs)),
                    _ => Err("expected seconds from 1 to 86400".into()),
                })?
                .unwrap_or(Duration::from_secs(3600)),
            activity_per_grant: self
                .get("activity_per_grant", |v| match v.parse::<u32>() {
                    Ok(n) if (100..=10_000_000).contains(&n) => Ok(n),
                    _ => Err("expected a number of records from 100 to 10000000".into()),
                })?
                .unwrap_or(keycast_core::DEFAULT_KEPT_PER_GRANT),
            max_grants_per_account: self
                .get("max_grants_per_account", |v| match v.parse::<u32>() {
                    Ok(n) if (1..=100_000).contains(&n) => Ok(n),
                    _ => Err("expected a number of apps from 1 to 100000".into()),
                })?
                .unwrap_or(keycast_core::authz::DEFAULT_MAX_LIVE_GRANTS),
            data_dir,
        })
    }

    /// `DATABASE_URL` and the settings that go with it. With PostgreSQL every replica
    /// setting is refused: the server keeps the data, there is no replicator to configure.
    fn database(&self, data_dir: &Path) -> Result<Database, ConfigError> {
        let max_connections = self.get("database_max_connections", |v| match v.parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err("expected a number of connections from 1 to 1000".into()),
        })?;
        let url = self.get("database_url", parse_database_url)?;
        if let (Some(DatabaseUrl::Postgres(pg)), Some(raw)) = (&url, self.values.get("database_url")) {
            if matches!(raw.origin, Origin::Flag) && url_has_password(pg) {
                return Err(ConfigError::Invalid {
                    origin: describe("database_url", raw),
                    reason: "carries a password, which every local user sees on the command line (ps) and shell \
                             history keeps: put the URL in DATABASE_URL, or in a file named by DATABASE_URL_FILE, or \
                             leave the password out of it and use ~/.pgpass"
                        .into(),
                });
            }
        }
        let pg_only = ["database_direct_url", "instance_ttl_secs"];
        let Some(DatabaseUrl::Postgres(url)) = url else {
            if let Some(key) = pg_only.iter().find(|k| self.values.contains_key(*k)) {
                return Err(ConfigError::Invalid {
                    origin: describe(key, &self.values[*key]),
                    reason: "applies to PostgreSQL only, and DATABASE_URL is SQLite".into(),
                });
            }
            let path = match url {
                Some(DatabaseUrl::Sqlite(path)) => path,
                _ => data_dir.join("keycast.db"),
            };
            let max_connections = max_connections.unwrap_or(keycast_db::pool::DEFAULT_MAX_CONNECTIONS);
            return Ok(Database::Sqlite { path, max_connections });
        };
        if let Some((key, raw)) = self
            .values
            .iter()
            .find(|(k, raw)| k.starts_with("replica_") && !(**k == "replica_url" && raw.value.trim() == "none"))
        {
            return Err(ConfigError::Invalid {
                origin: describe(key, raw),
                reason: "DATABASE_URL is PostgreSQL, which keeps the data itself: there is no replicator. \
                         Use the server's backups and point-in-time recovery (Cloud SQL: automated backups with \
                         point-in-time recovery) and remove this setting"
                    .into(),
            });
        }
        let mut options = keycast_db::PgOptions::new(url);
        if let Some(n) = max_connections {
            options.max_connections = n;
        }
        self.refuse_unverified_tls("database_url", &options)?;

        let direct = self
            .get("database_direct_url", |v| match parse_database_url(v)? {
                DatabaseUrl::Postgres(url) => Ok(url),
                DatabaseUrl::Sqlite(_) => Err("expected a postgres:// URL (the same database as DATABASE_URL)".into()),
            })?
            .map(|url| keycast_db::PgOptions {
                url,
                max_connections: 2,
                ..options.clone()
            });
        if let Some(direct) = &direct {
            self.refuse_unverified_tls("database_direct_url", direct)?;
        }
        let instance_ttl = self
            .get("instance_ttl_secs", |v| match v.parse::<u64>() {
                Ok(n) if (2..=300).contains(&n) => Ok(Duration::from_secs(n)),
                _ => Err("expected seconds from 2 to 300".into()),
            })?
            .unwrap_or(Duration::from_secs(5));
        Ok(Database::Postgres(PostgresConfig {
            options,
            direct,
            instance_ttl,
        }))
    }

    /// `test_routes`, refused with an https public URL: the test routes hand out mailed
    /// tokens (the outbox), so a production instance must never mount them by accident.
    fn test_routes(&self) -> Result<bool, ConfigError> {
        let on = self.get("test_routes", parse_bool)?.unwrap_or(false);
        if on && self.serves_https()? {
            return Err(ConfigError::Invalid {
                origin: describe("test_routes", &self.values["test_routes"]),
                reason: "the test routes hand out mailed tokens and must never run in production; \
                         they are refused while KEYCAST_PUBLIC_URL is https"
                    .into(),
            });
        }
        Ok(on)
    }

    /// The SMTP mailer, when `smtp_url` is set (then `mail_from` is required).
    fn smtp(&self) -> Result<Option<SmtpMailer>, ConfigError> {
        let from = self.get("mail_from", non_empty)?;
        let Some(url) = self.get("smtp_url", |v| Ok(keycast_core::Secret::new(v.to_owned())))? else {
            return Ok(None);
        };
        let Some(from) = from else {
            return Err(ConfigError::Invalid {
                origin: "KEYCAST_MAIL_FROM".into(),
                reason: "required when KEYCAST_SMTP_URL is set: the address mail comes from, e.g. \
                         `keycast <noreply@example.org>`"
                    .into(),
            });
        };
        let waiting = self
            .get("smtp_max_waiting", |v| match v.parse::<usize>() {
                Ok(n) if (1..=100_000).contains(&n) => Ok(n),
                _ => Err("expected a number of mails from 1 to 100000".into()),
            })?
            .unwrap_or(keycast_http::mail::MAX_QUEUED);
        let mailer = SmtpMailer::new(&url, &from).map_err(|e| {
            let key = match e {
                MailConfigError::Url(_) => "smtp_url",
                MailConfigError::From(_) => "mail_from",
            };
            ConfigError::Invalid {
                origin: describe(key, &self.values[key]),
                reason: e.to_string(),
            }
        })?;
        Ok(Some(mailer.max_waiting(waiting)))
    }

    fn embedded_relay(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let relays_set = self.get("bunker_relays", parse_relays)?.is_some();
        let enabled = self.get("embedded_relay", parse_bool)?.unwrap_or(!relays_set);
        if !enabled && !relays_set {
            return Err(ConfigError::Invalid {
                origin: "BUNKER_RELAYS".into(),
                reason: "not set and KEYCAST_EMBEDDED_RELAY is false: bunkers need a relay; name one or enable the embedded relay".into(),
            });
        }
        let addr = self
            .get("embedded_relay_addr", |v| {
                v.parse::<std::net::SocketAddr>()
                    .map_err(|_| "not an ip:port address (e.g. 127.0.0.1:7447)".into())
            })?
            .unwrap_or_else(|| DEFAULT_EMBEDDED_RELAY_ADDR.parse().expect("valid default"));
        Ok(enabled.then_some(addr))
    }

    fn master_key(&self, data_dir: &Path) -> Result<MasterKeySource, ConfigError> {
        let inline = self.get("master_key", |v| {
            keycast_core::MasterKey::from_base64(v)
                .map(|_| keycast_core::Secret::new(v.to_owned()))
                .map_err(|e| e.to_string())
        })?;
        let path = self.get("master_key_path", non_empty)?;
        match (inline, path) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid {
                origin: "MASTER_KEY_PATH".into(),
                reason: "KEYCAST_MASTER_KEY is set too; use one of them".into(),
            }),
            (Some(key), None) => Ok(MasterKeySource::Inline(key)),
            (None, Some(path)) => Ok(MasterKeySource::File(PathBuf::from(path))),
            (None, None) => Ok(MasterKeySource::Development(data_dir.join("master.key"))),
        }
    }

    /// Whether the public URL is https: a production instance.
    /// In production (an https public URL), a PostgreSQL server reached over the network must
    /// be verified (see [`keycast_db::PgOptions::unverified_remote_host`]).
    fn refuse_unverified_tls(&self, key: &str, options: &keycast_db::PgOptions) -> Result<(), ConfigError> {
        match (options.unverified_remote_host(), self.values.get(key)) {
            (Some(host), Some(raw)) if self.serves_https()? => Err(ConfigError::Invalid {
                origin: describe(key, raw),
                reason: format!(
                    "{host} is reached over the network without verifying it is the server (sslmode is not \
                     verify-full): whoever sits on the path could ask for the password in clear and then write \
                     the database. Add sslmode=verify-full (with sslrootcert=<the server's CA> unless a public CA \
                     signed it), or connect through a Unix socket (Cloud SQL: host=/cloudsql/PROJECT:REGION:INSTANCE)"
                ),
            }),
            _ => Ok(()),
        }
    }

    fn serves_https(&self) -> Result<bool, ConfigError> {
        Ok(self
            .get("public_url", parse_public_url)?
            .is_some_and(|u| u.starts_with("https://")))
    }

    /// The old key of a rotation. Refused next to the development key: a rotation needs
    /// the new key configured, else it would re-encrypt everything under a key kept next to
    /// the database.
    fn master_key_previous(&self, data_dir: &Path) -> Result<Option<keycast_core::Secret<String>>, ConfigError> {
        let previous = self.get("master_key_previous", |v| {
            keycast_core::MasterKey::from_base64(v)
                .map(|_| keycast_core::Secret::new(v.to_owned()))
                .map_err(|e| e.to_string())
        })?;
        if previous.is_some() && matches!(self.master_key(data_dir)?, MasterKeySource::Development(_)) {
            return Err(ConfigError::Invalid {
                origin: "KEYCAST_MASTER_KEY_PREVIOUS".into(),
                reason: "set, but the new master key is not: set KEYCAST_MASTER_KEY (or MASTER_KEY_PATH) to the new key and this one to the old key".into(),
            });
        }
        Ok(previous)
    }

    fn replica(&self, data_dir: &Path) -> Result<Option<ReplicaConfig>, ConfigError> {
        let default_url = || {
            let mut dir = data_dir.as_os_str().to_owned();
            dir.push("-replica");
            format!("file://{}", absolute(Path::new(&dir)).display())
        };
        let url = self.get("replica_url", parse_replica_url)?.unwrap_or_else(default_url);
        if url == "none" {
            return Ok(None);
        }
        let defaults = ReplicaOptions::default();
        let mut compaction = CompactionPolicy::default();
        if let Some(levels) = self.get("replica_compaction_levels", parse_levels)? {
            compaction.levels = levels;
        }
        let long = |key| self.get(key, parse_long_secs);
        // Zero would snapshot the whole database on every compaction run after any write.
        compaction.snapshot_interval = self
            .get("replica_snapshot_interval_secs", parse_positive_secs)?
            .unwrap_or(compaction.snapshot_interval);
        compaction.snapshot_retention =
            long("replica_snapshot_retention_secs")?.unwrap_or(compaction.snapshot_retention);
        compaction.l0_retention = long("replica_l0_retention_secs")?.unwrap_or(compaction.l0_retention);
        let options = ReplicaOptions {
            checkpoint_pages: self
                .get("replica_checkpoint_pages", parse_pages)?
                .unwrap_or(defaults.checkpoint_pages),
            compaction,
            verify_interval: long("replica_verify_interval_secs")?.unwrap_or(defaults.verify_interval),
            ..defaults
        };
        let lease_defaults = LeaseOptions::default();
        let lease = LeaseOptions {
            ttl: self
                .get("replica_lease_ttl_secs", parse_positive_secs)?
                .unwrap_or(lease_defaults.ttl),
            wait: long("replica_lease_wait_secs")?.unwrap_or(lease_defaults.wait),
            ..lease_defaults
        };
        // The same key pasted into both: whoever is given the replica's key (an operator
        // restoring, a recovery drill) could open every stored Nostr key in it.
        let key_text = |key| self.values.get(key).map(|raw| raw.value.trim().trim_end_matches('='));
        let master_too = ["master_key", "master_key_previous"]
            .into_iter()
            .any(|master| key_text(master).is_some() && key_text(master) == key_text("replica_encryption_key"));
        let encryption = self.get("replica_encryption_key", |v| {
            if master_too {
                return Err(
                    "is the master key: the replica's key must be another, or whoever holds it opens every \
                            stored Nostr key in the replica"
                        .into(),
                );
            }
            ObjectCipher::from_base64(v).map_err(|e| e.to_string())
        })?;
        Ok(Some(ReplicaConfig {
            url,
            options,
            lease,
            encryption,
            unhealthy_after: long("replica_unhealthy_after_secs")?.unwrap_or(Duration::from_secs(60)),
            durable_timeout: self
                .get("replica_durable_timeout_secs", parse_positive_secs)?
                .unwrap_or(Duration::from_secs(10)),
            check_conditional_writes: self
                .get("replica_check_conditional_writes", parse_bool)?
                .unwrap_or(true),
        }))
    }

    /// Parses the value of `key` with `parse`, `None` when no source set it.
    fn get<T>(&self, key: &'static str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, ConfigError> {
        let Some(raw) = self.values.get(key) else {
            return Ok(None);
        };
        parse(raw.value.trim())
            .map(Some)
            .map_err(|reason| ConfigError::Invalid {
                origin: describe(key, raw),
                reason,
            })
    }
}

/// `PORT=abc`, `--port abc` or `port = "abc" in /etc/keycast.toml`.
fn describe(key: &str, raw: &Raw) -> String {
    let setting = SETTINGS.iter().find(|s| s.key == key).expect("key comes from SETTINGS");
    // A secret never goes into an error message (which ends up in logs).
    let value = if SECRET_SETTINGS.contains(&key) {
        "<redacted>".to_owned()
    } else if URL_SETTINGS.contains(&key) {
        keycast_db::pool::redact_url(&raw.value)
    } else {
        raw.value.clone()
    };
    match &raw.origin {
        Origin::Env => format!("{}={value}", setting.env),
        Origin::Flag => format!("--{} {value}", key.replace('_', "-")),
        Origin::File(path) => format!("{key} = {value:?} in {}", path.display()),
    }
}

fn parse_port(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .map_err(|_| "not a port number (expected an integer from 0 to 65535)".into())
}

fn parse_secs(v: &str) -> Result<Duration, String> {
    v.parse::<u64>()
        .ok()
        .filter(|s| *s <= 3600)
        .map(Duration::from_secs)
        .ok_or_else(|| "expected a whole number of seconds from 0 to 3600".into())
}

/// Durations up to 30 days, for intervals and retention.
fn parse_long_secs(v: &str) -> Result<Duration, String> {
    v.parse::<u64>()
        .ok()
        .filter(|s| *s <= 30 * 86400)
        .map(Duration::from_secs)
        .ok_or_else(|| "expected a whole number of seconds from 0 to 2592000 (30 days)".into())
}

fn parse_positive_secs(v: &str) -> Result<Duration, String> {
    parse_long_secs(v).and_then(|d| {
        if d.is_zero() {
            Err("must be at least 1 second".into())
        } else {
            Ok(d)
        }
    })
}

fn parse_secs_between(v: &str, min: i64, max: i64) -> Result<i64, String> {
    v.parse::<i64>()
        .ok()
        .filter(|s| (min..=max).contains(s))
        .ok_or_else(|| format!("expected a whole number of seconds from {min} to {max}"))
}

fn parse_code_ttl(v: &str) -> Result<i64, String> {
    v.parse::<i64>()
        .ok()
        .filter(|s| (1..=keycast_core::oauth::CODE_TTL_SECS).contains(s))
        .ok_or_else(|| "expected a whole number of seconds from 1 to 600 (RFC 6749 allows at most 10 minutes)".into())
}

fn parse_durability(v: &str) -> Result<DurabilityMode, String> {
    match v {
        "async" => Ok(DurabilityMode::Async),
        "sync" => Ok(DurabilityMode::Sync),
        _ => Err("expected `async` or `sync`".into()),
    }
}

/// Up to 100,000 pages (about 400 MiB at 4 KiB): the WAL grows to three times this under
/// sustained writes, and on Cloud Run the disk is memory.
fn parse_pages(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=100_000).contains(n))
        .ok_or_else(|| "expected a number of pages from 1 to 100000".into())
}

/// A number of relays from 0 (none accepted) to `max`.
fn parse_count(v: &str, max: usize) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("expected a number of relays from 0 to {max}"))
}

/// A rate from 1 to 100000 a second.
fn parse_rate(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=100_000).contains(n))
        .ok_or_else(|| "expected a number a second from 1 to 100000".into())
}

fn parse_levels(v: &str) -> Result<Vec<Duration>, String> {
    let levels: Result<Vec<Duration>, String> = v.split(',').map(|p| parse_long_secs(p.trim())).collect();
    let levels = levels.map_err(|_| "expected comma-separated seconds, e.g. 30,300,3600".to_owned())?;
    if levels.is_empty() || levels.len() > 8 || levels.iter().any(|d| d.is_zero()) {
        return Err("expected 1 to 8 non-zero intervals, e.g. 30,300,3600".into());
    }
    Ok(levels)
}

fn parse_replica_url(v: &str) -> Result<String, String> {
    // `abs://` is Litestream's name for Azure (`abs://account@container/prefix`).
    const SCHEMES: [&str; 5] = ["file://", "s3://", "gs://", "az://", "abs://"];
    if v == "none" || SCHEMES.iter().any(|s| v.starts_with(s) && v.len() > s.len()) {
        Ok(v.to_owned())
    } else {
        Err(
            "expected file:///dir, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix \
             (abs://account@container/prefix), or none"
                .into(),
        )
    }
}

/// `path` made absolute against the working directory, so a `file://` URL is unambiguous.
fn absolute(path: &Path) -> PathBuf {
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_owned())
}

fn parse_public_url(v: &str) -> Result<String, String> {
    let url = url::Url::parse(v).map_err(|_| "expected an absolute URL such as https://keycast.example".to_owned())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected an http:// or https:// URL with a host".into());
    }
    Ok(v.trim_end_matches('/').to_owned())
}

fn parse_relays(v: &str) -> Result<Vec<String>, String> {
    let relays: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    let valid = |r: &String| url::Url::parse(r).is_ok_and(|u| matches!(u.scheme(), "ws" | "wss") && u.host().is_some());
    if relays.is_empty() || !relays.iter().all(valid) {
        return Err("expected comma-separated ws:// or wss:// relay URLs".into());
    }
    Ok(relays)
}

fn parse_origins(v: &str) -> Result<Vec<String>, String> {
    let origins: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect();
    for origin in &origins {
        let ok = url::Url::parse(origin).is_ok_and(|u| u.origin().ascii_serialization() == *origin);
        if !ok {
            return Err(format!("{origin:?} is not an origin (scheme://host[:port], no path)"));
        }
    }
    Ok(origins)
}

fn parse_reserved_usernames(v: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = v
        .split(',')
        .map(|n| n.trim().to_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    match names
        .iter()
        .find(|n| !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        Some(bad) => Err(format!("{bad:?} is not a NIP-05 name (a-z, 0-9, '.', '_', '-')")),
        None => Ok(names),
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_log_format(v: &str) -> Result<LogFormat, String> {
    match v {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `text` or `json`".into()),
    }
}

fn non_empty(v: &str) -> Result<String, String> {
    if v.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(v.to_owned())
    }
}

/// A number of connections held at once.
fn parse_connections(v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=1_000_000).contains(n))
        .ok_or_else(|| "expected a number of connections from 1 to 1000000".to_owned())
}

/// A `tracing` filter: comma-separated levels (or their numbers, 0–5), `target=level` and
/// `[span]` directives. A bare word that is not a level would be read as a target logged at
/// every level (`inof` would silence everything else), so it is refused; `target=trace` says
/// that on purpose.
fn parse_log_filter(v: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let directives: Vec<&str> = v.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let v = non_empty(&directives.join(","))?;
    for directive in directives {
        let level = LEVELS.contains(&directive.to_ascii_lowercase().as_str())
            || matches!(directive, "0" | "1" | "2" | "3" | "4" | "5");
        if !level && !directive.contains('=') && !directive.contains('[') {
            return Err(format!(
                "`{directive}` is neither a level ({}) nor `target=level`, e.g. `info` or `keycast=debug,sqlx=warn`",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&v)
        .map_err(|e| format!("{e}; expected e.g. `info` or `keycast=debug,sqlx=warn`"))?;
    Ok(v)
}

/// Accepts `sqlite://PATH`, `sqlite:PATH` (an optional `?query` is ignored).
/// What `DATABASE_URL` names.
enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

/// Whether a PostgreSQL URL carries a password (in its user part, or as `password=`).
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or("");
    let in_user = authority.rsplit_once('@').is_some_and(|(user, _)| user.contains(':'));
    in_user || query.split('&').any(|pair| pair.split('=').next() == Some("password"))
}

/// Checks a `postgres://` URL given elsewhere than `DATABASE_URL` (`keycast migrate --to`) as
/// `DATABASE_URL` is checked: parameters the driver would ignore (printing their values) or
/// cannot honour are refused by name.
///
/// # Errors
/// What is wrong with it, without its password.
pub fn check_postgres_url(v: &str) -> Result<(), String> {
    match parse_database_url(v)? {
        DatabaseUrl::Postgres(_) => Ok(()),
        DatabaseUrl::Sqlite(_) => Err("expected a postgres:// URL".into()),
    }
}

fn parse_database_url(v: &str) -> Result<DatabaseUrl, String> {
    if v.starts_with("postgres://") || v.starts_with("postgresql://") {
        let options = keycast_db::PgOptions::new(v);
        let unknown = options.unknown_parameters();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown query parameter(s) {} (keycast's PostgreSQL driver reads sslmode, sslrootcert, sslcert, sslkey, \
                 host, hostaddr, port, dbname, user, password, application_name, options and statement-cache-capacity; \
                 an encrypted client key is not supported: decrypt it, or use a password): remove them",
                unknown.join(", ")
            ));
        }
        let required = options.unsupported_requirements();
        if !required.is_empty() {
            return Err(format!(
                "{} cannot be honoured by keycast's PostgreSQL driver (it has no channel binding and no GSSAPI \
                 encryption), and leaving it out would weaken the connection silently: use sslmode=verify-full \
                 instead, which stops a man in the middle by the server's certificate",
                required.join(", ")
            ));
        }
        options
            .connect_options()
            .map_err(|e| format!("not a usable PostgreSQL URL: {e}"))?;
        return Ok(DatabaseUrl::Postgres(v.to_owned()));
    }
    let path = v
        .strip_prefix("sqlite://")
        .or_else(|| v.strip_prefix("sqlite:"))
        .ok_or("expected sqlite://PATH or postgres://user:pass@host:port/db")?;
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err("needs a file path: an in-memory database cannot be replicated".into());
    }
    Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Sources {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Sources::default().with_env(move |k| map.get(k).cloned())
    }

    #[test]
    fn no_configuration_gives_the_embedded_defaults() {
        let config = Sources::default().build().unwrap();
        assert_eq!(config.port, 3000);
        assert_eq!(config.database.sqlite_path(), Some(Path::new("./data/keycast.db")));
        assert_eq!(config.shutdown_grace, Duration::from_secs(8));
        assert_eq!(config.embedded_relay, Some("127.0.0.1:7447".parse().unwrap()));
        assert!(config.bunker_relays.is_empty() && config.nip46);
    }

    #[test]
    fn configured_relays_turn_the_embedded_relay_off_unless_asked_for() {
        let relays = ("BUNKER_RELAYS", "wss://a.example");
        assert_eq!(env(&[relays]).build().unwrap().embedded_relay, None);
        let both = env(&[relays, ("KEYCAST_EMBEDDED_RELAY", "true")]).build().unwrap();
        assert!(both.embedded_relay.is_some());
        let err = env(&[("KEYCAST_EMBEDDED_RELAY", "false")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BUNKER_RELAYS") && err.contains("KEYCAST_EMBEDDED_RELAY"),
            "{err}"
        );
        let err = env(&[("KEYCAST_EMBEDDED_RELAY_ADDR", "7447")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEYCAST_EMBEDDED_RELAY_ADDR"), "{err}");
    }

    #[test]
    fn a_bad_port_names_the_variable_and_the_value() {
        let err = env(&[("PORT", "abc")]).build().unwrap_err().to_string();
        assert!(err.contains("PORT=abc") && err.contains("port number"), "{err}");
    }

    #[test]
    fn flags_beat_env_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "port = 1000\ndata_dir = \"/from/file\"\nlog_format = \"json\"\n").unwrap();
        let config = Sources::default()
            .with_file(&file)
            .unwrap()
            .with_env(|k| {
                (k == "PORT" || k == "KEYCAST_DATA_DIR").then(|| {
                    if k == "PORT" {
                        "2000".into()
                    } else {
                        "/from/env".into()
                    }
                })
            })
            .with_flag("port", Some("3001".into()))
            .build()
            .unwrap();
        assert_eq!(
            (config.port, config.data_dir.to_str().unwrap(), config.log_format),
            (3001, "/from/env", LogFormat::Json)
        );
    }

    #[test]
    fn a_bad_value_in_the_file_names_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "shutdown_grace_secs = -1\n").unwrap();
        let err = Sources::default()
            .with_file(&file)
            .unwrap()
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shutdown_grace_secs = \"-1\" in") && err.contains("k.toml"),
            "{err}"
        );
    }

    #[test]
    fn the_conditional_write_check_is_on_by_default_and_validated_by_name() {
        let on = env(&[]).build().unwrap();
        assert!(on.replica.unwrap().check_conditional_writes);
        let off = env(&[("KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES", "false")])
            .build()
            .unwrap();
        assert!(!off.replica.unwrap().check_conditional_writes);
        let err = env(&[("KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES", "maybe")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES"), "{err}");
    }

    #[test]
    fn a_secret_can_come_from_a_file_and_is_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
        let path = file.display().to_string();
        let config = env(&[("KEYCAST_REPLICA_ENCRYPTION_KEY_FILE", &path)]).build().unwrap();
        assert!(config.replica.unwrap().encryption.is_some());
        let err = env(&[("KEYCAST_REPLICA_ENCRYPTION_KEY", "c2VjcmV0LXNob3J0")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KEYCAST_REPLICA_ENCRYPTION_KEY=<redacted>") && !err.contains("c2VjcmV0"),
            "{err}"
        );
        let both = env(&[
            ("KEYCAST_REPLICA_ENCRYPTION_KEY", "x"),
            ("KEYCAST_REPLICA_ENCRYPTION_KEY_FILE", &path),
        ]);
        assert!(both
            .build()
            .unwrap_err()
            .to_string()
            .contains("KEYCAST_REPLICA_ENCRYPTION_KEY_FILE"));
    }

    /// The master key pasted as the replica's key too. Before, it was taken: whoever was
    /// given the replica's key (to restore, for a recovery drill) could open every stored
    /// Nostr key in the replica.
    #[test]
    fn the_replica_key_must_not_be_the_master_key() {
        const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        for master in ["KEYCAST_MASTER_KEY", "KEYCAST_MASTER_KEY_PREVIOUS"] {
            let mut pairs = vec![("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY), (master, KEY)];
            if master == "KEYCAST_MASTER_KEY_PREVIOUS" {
                pairs.push(("KEYCAST_MASTER_KEY", "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="));
            }
            let err = env(&pairs).build().unwrap_err().to_string();
            assert!(
                err.contains("KEYCAST_REPLICA_ENCRYPTION_KEY") && err.contains("master key") && !err.contains("AAEC"),
                "{master}: {err}"
            );
        }
        let distinct = env(&[
            ("KEYCAST_REPLICA_ENCRYPTION_KEY", KEY),
            ("KEYCAST_MASTER_KEY", "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="),
        ]);
        assert!(distinct.build().unwrap().replica.unwrap().encryption.is_some());
        // A key that is not quite base64 says so, without a character of it.
        let near = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh-=";
        let err = env(&[("KEYCAST_REPLICA_ENCRYPTION_KEY", near)])
            .build()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("45") && !err.contains("offset"), "{err}");
    }

    #[test]
    fn master_key_is_validated_redacted_and_exclusive_with_its_path() {
        let err = env(&[("KEYCAST_MASTER_KEY", "c2VjcmV0LXNob3J0")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KEYCAST_MASTER_KEY=<redacted>") && !err.contains("c2VjcmV0"),
            "{err}"
        );
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let config = env(&[("KEYCAST_MASTER_KEY", key)]).build().unwrap();
        assert!(matches!(config.master_key, MasterKeySource::Inline(_)));
        assert!(
            !format!("{config:?}").contains("AAECAwQF"),
            "Debug must not print the key"
        );
        let both = env(&[("KEYCAST_MASTER_KEY", key), ("MASTER_KEY_PATH", "/k")]).build();
        assert!(both.unwrap_err().to_string().contains("MASTER_KEY_PATH"));
        let dev = Sources::default().build().unwrap();
        assert!(matches!(dev.master_key, MasterKeySource::Development(p) if p.ends_with("master.key")));
    }

    /// In production a PostgreSQL server reached over the network must be verified: sqlx's
    /// default (`prefer`) falls back to plain text and, like `require`, takes any certificate,
    /// so whoever sits on the path could ask for the password in clear. A Unix socket (Cloud
    /// SQL), loopback, or `sslmode=verify-full` / `verify-ca` is accepted; so is anything in
    /// development (no https public URL).
    #[test]
    fn production_refuses_a_remote_postgresql_server_it_does_not_verify() {
        let https = ("KEYCAST_PUBLIC_URL", "https://keycast.example.org");
        for url in [
            "postgres://k:hunter2@db.example.org/k",
            "postgres://k:hunter2@db.example.org/k?sslmode=prefer",
            "postgres://k:hunter2@10.0.0.5:5432/k?sslmode=require",
        ] {
            let refused = env(&[https, ("DATABASE_URL", url)]).build().unwrap_err().to_string();
            assert!(
                refused.contains("DATABASE_URL")
                    && refused.contains("sslmode=verify-full")
                    && !refused.contains("hunter2"),
                "{url}: {refused}"
            );
        }
        let direct = env(&[
            https,
            ("DATABASE_URL", "postgres://k:p@db.example.org/k?sslmode=verify-full"),
            ("KEYCAST_DATABASE_DIRECT_URL", "postgres://k:p@db.example.org:5433/k"),
        ])
        .build()
        .unwrap_err()
        .to_string();
        assert!(direct.contains("KEYCAST_DATABASE_DIRECT_URL"), "{direct}");
        for url in [
            "postgres://k:p@db.example.org/k?sslmode=verify-full",
            "postgres://k:p@db.example.org/k?sslmode=verify-ca",
            "postgres://k:p@/k?host=/cloudsql/project:region:instance",
            "postgres://k:p@127.0.0.1:5432/k",
            "postgres://k:p@localhost/k",
            "postgres://k:p@[::1]:5432/k",
        ] {
            let config = env(&[https, ("DATABASE_URL", url)]).build();
            assert!(config.is_ok(), "{url}: {:?}", config.err());
        }
        assert!(env(&[("DATABASE_URL", "postgres://k:p@db.example.org/k")])
            .build()
            .is_ok());
    }

    /// A password on the command line is in `ps` for every local user and in shell history.
    #[test]
    fn a_database_url_flag_with_a_password_is_refused_without_printing_it() {
        for url in [
            "postgres://keycast:hunter2@db.internal:5432/keycast",
            "postgres://keycast:hunter2@/keycast?host=/cloudsql/p:r:i",
            "postgresql://db.internal/keycast?user=keycast&password=hunter2",
        ] {
            let refused = Sources::default()
                .with_flag("database_url", Some(url.into()))
                .build()
                .unwrap_err()
                .to_string();
            assert!(
                refused.contains("--database-url") && refused.contains("DATABASE_URL_FILE"),
                "{refused}"
            );
            assert!(!refused.contains("hunter2"), "{refused}");
        }
        let without = Sources::default()
            .with_flag("database_url", Some("postgres://keycast@db.internal/keycast".into()))
            .build();
        assert!(without.is_ok(), "{:?}", without.err());
        let from_env = env(&[("DATABASE_URL", "postgres://keycast:hunter2@db.internal/keycast")]).build();
        assert!(from_env.is_ok(), "{:?}", from_env.err());
    }

    #[test]
    fn database_url_is_read_from_a_file_with_its_password_kept_out_of_messages() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "postgres://keycast:hunter2@/keycast?host=/cloudsql/p:r:i\n").unwrap();
        let path = file.display().to_string();
        let config = env(&[("DATABASE_URL_FILE", &path)]).build().unwrap();
        assert!(matches!(config.database, Database::Postgres(_)));
        assert!(config.replica.is_none());
        assert!(!format!("{:?}", config.database).contains("hunter2"));
        let both = env(&[("DATABASE_URL_FILE", &path), ("DATABASE_URL", "sqlite:///tmp/x.db")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(both.contains("DATABASE_URL_FILE"), "{both}");
        let missing = env(&[("DATABASE_URL_FILE", "/nonexistent/url")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("DATABASE_URL_FILE") && missing.contains("/nonexistent/url"),
            "{missing}"
        );
    }

    #[test]
    fn previous_master_key_is_validated_redacted_and_needs_a_new_key() {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let old = "HyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4=";
        let config = env(&[("KEYCAST_MASTER_KEY", key), ("KEYCAST_MASTER_KEY_PREVIOUS", old)])
            .build()
            .unwrap();
        assert_eq!(
            config.master_key_previous.as_ref().map(|k| k.expose().as_str()),
            Some(old)
        );
        assert!(
            !format!("{config:?}").contains("HyAhIi"),
            "Debug must not print the key"
        );
        assert!(env(&[("KEYCAST_MASTER_KEY", key)])
            .build()
            .unwrap()
            .master_key_previous
            .is_none());

        let bad = env(&[
            ("KEYCAST_MASTER_KEY", key),
            ("KEYCAST_MASTER_KEY_PREVIOUS", "c2VjcmV0LXNob3J0"),
        ])
        .build()
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("KEYCAST_MASTER_KEY_PREVIOUS=<redacted>") && !bad.contains("c2VjcmV0"),
            "{bad}"
        );
        let alone = env(&[("KEYCAST_MASTER_KEY_PREVIOUS", old)])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            alone.contains("KEYCAST_MASTER_KEY_PREVIOUS") && alone.contains("new master key"),
            "{alone}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("old");
        std::fs::write(&file, format!("{old}\n")).unwrap();
        let path = file.display().to_string();
        let config = env(&[("KEYCAST_MASTER_KEY", key), ("KEYCAST_MASTER_KEY_PREVIOUS_FILE", &path)])
            .build()
            .unwrap();
        assert!(config.master_key_previous.is_some());
    }

    /// Before, a filter tracing could not parse silently became `info`, and a misspelt level
    /// was read as a target name, which logged nothing else.
    #[test]
    fn a_log_filter_that_would_not_filter_as_meant_is_refused_naming_the_variable() {
        for good in [
            "info",
            "WARN",
            "3",
            "keycast=debug,sqlx=warn",
            "info, keycast_replica=trace",
            "[request]=debug",
        ] {
            let config = env(&[("KEYCAST_LOG", good)]).build();
            assert!(config.is_ok(), "{good}: {:?}", config.err());
        }
        for bad in ["inof", "keycast=verbose", "info,debgu"] {
            let refused = env(&[("KEYCAST_LOG", bad)]).build().unwrap_err().to_string();
            assert!(refused.contains("KEYCAST_LOG"), "{bad}: {refused}");
        }
    }

    /// Every scheme the store opens is accepted, Litestream's `abs://` for Azure included
    /// (the store's own error about a missing account suggests it); anything else is refused
    /// naming the variable.
    #[test]
    fn replica_urls_take_every_backend_the_store_opens() {
        for url in [
            "file:///r",
            "s3://b/p",
            "gs://b/p",
            "az://c/p",
            "abs://account@c/p",
            "none",
        ] {
            let config = env(&[("KEYCAST_REPLICA_URL", url)]).build();
            assert!(config.is_ok(), "{url}: {:?}", config.err());
        }
        let refused = env(&[("KEYCAST_REPLICA_URL", "ftp://b/p")]).build().unwrap_err();
        assert!(refused.to_string().contains("KEYCAST_REPLICA_URL"), "{refused}");
    }

    #[test]
    fn relays_and_origins_are_checked() {
        let config = env(&[("BUNKER_RELAYS", "wss://a.example, ws://127.0.0.1:7777")])
            .build()
            .unwrap();
        assert_eq!(config.bunker_relays, ["wss://a.example", "ws://127.0.0.1:7777"]);
        assert!(env(&[("BUNKER_RELAYS", "https://a.example")]).build().is_err());
        assert!(env(&[("ALLOWED_ORIGINS", "https://app.example/path")]).build().is_err());
        assert!(env(&[("KEYCAST_PUBLIC_URL", "ftp://x")]).build().is_err());
    }

    #[test]
    fn smtp_needs_a_from_address_and_its_url_is_never_echoed() {
        let url = "smtps://mailer:hunter2-pw@mail.example:465";
        let config = env(&[("KEYCAST_SMTP_URL", url), ("KEYCAST_MAIL_FROM", "keycast <k@x.org>")])
            .build()
            .unwrap();
        assert!(config.smtp.is_some());
        assert!(
            !format!("{config:?}").contains("hunter2"),
            "Debug must not print the password"
        );
        let err = env(&[("KEYCAST_SMTP_URL", url)]).build().unwrap_err().to_string();
        assert!(err.contains("KEYCAST_MAIL_FROM") && !err.contains("hunter2"), "{err}");
        let bad = "smtpx://mailer:hunter2-pw@mail.example";
        let err = env(&[("KEYCAST_SMTP_URL", bad), ("KEYCAST_MAIL_FROM", "k@x.org")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KEYCAST_SMTP_URL=<redacted>") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(Sources::default().build().unwrap().smtp.is_none());
    }

    #[test]
    fn token_lifetimes_default_to_an_hour_and_30_days_within_bounds() {
        let lifetimes = Sources::default().build().unwrap().token_lifetimes;
        assert_eq!((lifetimes.access_secs, lifetimes.refresh_secs), (3600, 2_592_000));
        let config = env(&[
            ("KEYCAST_ACCESS_TOKEN_TTL_SECS", "60"),
            ("KEYCAST_REFRESH_TOKEN_TTL_SECS", "7200"),
        ])
        .build()
        .unwrap();
        assert_eq!(
            (config.token_lifetimes.access_secs, config.token_lifetimes.refresh_secs),
            (60, 7200)
        );
        for (var, bad) in [
            ("KEYCAST_ACCESS_TOKEN_TTL_SECS", "59"),
            ("KEYCAST_ACCESS_TOKEN_TTL_SECS", "86401"),
            ("KEYCAST_REFRESH_TOKEN_TTL_SECS", "10"),
            ("KEYCAST_REFRESH_TOKEN_TTL_SECS", "x"),
        ] {
            let err = env(&[(var, bad)]).build().unwrap_err().to_string();
            assert!(err.contains(var), "{var}={bad}: {err}");
        }
    }

    #[test]
    fn oauth_code_ttl_can_be_shortened_but_not_lengthened() {
        assert_eq!(Sources::default().build().unwrap().oauth_code_ttl_secs, 600);
        let config = env(&[("KEYCAST_OAUTH_CODE_TTL_SECS", "60")]).build().unwrap();
        assert_eq!(config.oauth_code_ttl_secs, 60);
        for bad in ["0", "601", "x"] {
            assert!(env(&[("KEYCAST_OAUTH_CODE_TTL_SECS", bad)]).build().is_err(), "{bad}");
        }
    }

    #[test]
    fn proxy_hops_and_the_hashing_budget_are_checked_and_name_their_variable() {
        let config = Sources::default().build().unwrap();
        assert_eq!(
            (config.trusted_proxy_hops, config.hash_memory_mib, config.hash_queue),
            (0, 128, 64)
        );
        let config = env(&[("KEYCAST_TRUSTED_PROXY_HOPS", "2"), ("KEYCAST_HASH_MEMORY_MIB", "256")])
            .build()
            .unwrap();
        assert_eq!((config.trusted_proxy_hops, config.hash_memory_mib), (2, 256));
        for (var, bad) in [
            ("KEYCAST_TRUSTED_PROXY_HOPS", "yes"),
            ("KEYCAST_HASH_MEMORY_MIB", "32"),
            ("KEYCAST_HASH_QUEUE", "-1"),
        ] {
            let err = env(&[(var, bad)]).build().unwrap_err().to_string();
            assert!(err.contains(&format!("{var}={bad}")), "{err}");
        }
    }

    #[test]
    fn test_routes_are_refused_with_an_https_public_url_and_timeouts_are_checked() {
        let err = env(&[
            ("KEYCAST_TEST_ROUTES", "true"),
            ("KEYCAST_PUBLIC_URL", "https://k.example"),
        ])
        .build()
        .unwrap_err()
        .to_string();
        assert!(err.contains("KEYCAST_TEST_ROUTES=true"), "{err}");
        assert!(env(&[("KEYCAST_TEST_ROUTES", "true")]).build().unwrap().test_routes);
        assert_eq!(
            Sources::default().build().unwrap().header_read_timeout,
            Duration::from_secs(10)
        );
        let err = env(&[("KEYCAST_HEADER_READ_TIMEOUT_SECS", "0")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEYCAST_HEADER_READ_TIMEOUT_SECS=0"), "{err}");
        let err = env(&[("KEYCAST_METRICS_TOKEN", "short")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KEYCAST_METRICS_TOKEN=<redacted>") && !err.contains("short"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "prot = 1\n").unwrap();
        let err = Sources::default().with_file(&file).unwrap_err().to_string();
        assert!(err.contains("unknown setting `prot`"), "{err}");
    }

    #[test]
    fn expired_rows_are_swept_hourly_by_default_and_the_interval_is_bounded() {
        assert_eq!(
            Sources::default().build().unwrap().sweep_interval,
            Duration::from_secs(3600)
        );
        let config = env(&[("KEYCAST_SWEEP_INTERVAL_SECS", "60")]).build().unwrap();
        assert_eq!(config.sweep_interval, Duration::from_secs(60));
        for bad in ["0", "86401", "1h"] {
            let err = env(&[("KEYCAST_SWEEP_INTERVAL_SECS", bad)])
                .build()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("KEYCAST_SWEEP_INTERVAL_SECS={bad}")), "{err}");
        }
    }

    #[test]
    fn a_thousand_activity_records_are_kept_per_grant_by_default_and_the_number_is_bounded() {
        assert_eq!(Sources::default().build().unwrap().activity_per_grant, 1000);
        let config = env(&[("KEYCAST_ACTIVITY_PER_GRANT", "100")]).build().unwrap();
        assert_eq!(config.activity_per_grant, 100);
        for bad in ["99", "10000001", "-1", "many"] {
            let err = env(&[("KEYCAST_ACTIVITY_PER_GRANT", bad)])
                .build()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("KEYCAST_ACTIVITY_PER_GRANT={bad}")), "{err}");
        }
    }

    #[test]
    fn a_hundred_live_grants_per_account_by_default_and_the_number_is_bounded() {
        assert_eq!(Sources::default().build().unwrap().max_grants_per_account, 100);
        let config = env(&[("KEYCAST_MAX_GRANTS_PER_ACCOUNT", "3")]).build().unwrap();
        assert_eq!(config.max_grants_per_account, 3);
        for bad in ["0", "100001", "lots"] {
            let err = env(&[("KEYCAST_MAX_GRANTS_PER_ACCOUNT", bad)])
                .build()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("KEYCAST_MAX_GRANTS_PER_ACCOUNT={bad}")), "{err}");
        }
    }

    #[test]
    fn the_activity_flush_interval_is_a_second_by_default_and_bounded() {
        assert_eq!(
            Sources::default().build().unwrap().activity_flush,
            Duration::from_secs(1)
        );
        let config = env(&[("KEYCAST_ACTIVITY_FLUSH_MS", "30000")]).build().unwrap();
        assert_eq!(config.activity_flush, Duration::from_secs(30));
        for bad in ["0", "9", "60001", "1s"] {
            let err = env(&[("KEYCAST_ACTIVITY_FLUSH_MS", bad)])
                .build()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("KEYCAST_ACTIVITY_FLUSH_MS={bad}")), "{err}");
        }
    }

    #[test]
    fn allow_network_filesystem_is_off_by_default_and_validated() {
        assert!(!Sources::default().build().unwrap().allow_network_filesystem);
        let config = env(&[("KEYCAST_ALLOW_NETWORK_FILESYSTEM", "true")]).build().unwrap();
        assert!(config.allow_network_filesystem);
        let err = env(&[("KEYCAST_ALLOW_NETWORK_FILESYSTEM", "maybe")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEYCAST_ALLOW_NETWORK_FILESYSTEM=maybe"), "{err}");
    }

    #[test]
    fn database_url_accepts_sqlite_paths_and_postgres_urls() {
        let config = env(&[("DATABASE_URL", "sqlite:///tmp/x.db?mode=rwc")]).build().unwrap();
        assert_eq!(config.database.sqlite_path(), Some(Path::new("/tmp/x.db")));
        let err = env(&[("DATABASE_URL", "mysql://x")]).build().unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL=mysql://x"), "{err}");
        let socket = "postgres://keycast:hunter2@/keycast?host=/cloudsql/p:r:i";
        let config = env(&[("DATABASE_URL", socket), ("KEYCAST_DATABASE_MAX_CONNECTIONS", "4")])
            .build()
            .unwrap();
        let Database::Postgres(pg) = &config.database else {
            panic!("{:?}", config.database)
        };
        assert_eq!(
            (pg.options.max_connections, pg.instance_ttl),
            (4, Duration::from_secs(5))
        );
        assert!(config.replica.is_none(), "no replicator on PostgreSQL");
        assert_eq!(
            config.cache_ttl,
            Duration::from_secs(5),
            "a short backstop with many instances"
        );
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    /// Values that parsed and then hurt: a snapshot interval of 0 snapshotted the whole
    /// database on every compaction run after any write; a checkpoint threshold without a
    /// ceiling let the WAL — memory, on Cloud Run — grow to three times any number.
    #[test]
    fn replica_intervals_and_thresholds_have_bounds_that_name_the_variable() {
        for (var, value, expected) in [
            ("KEYCAST_REPLICA_SNAPSHOT_INTERVAL_SECS", "0", "at least 1 second"),
            ("KEYCAST_REPLICA_CHECKPOINT_PAGES", "100001", "from 1 to 100000"),
        ] {
            let err = env(&[(var, value)]).build().unwrap_err().to_string();
            assert!(err.contains(var) && err.contains(expected), "{err}");
        }
        let config = env(&[
            ("KEYCAST_REPLICA_SNAPSHOT_INTERVAL_SECS", "1"),
            ("KEYCAST_REPLICA_CHECKPOINT_PAGES", "100000"),
        ])
        .build()
        .unwrap();
        let replica = config.replica.unwrap();
        assert_eq!(replica.options.compaction.snapshot_interval, Duration::from_secs(1));
        assert_eq!(replica.options.checkpoint_pages, 100_000);
    }

    #[test]
    fn replica_settings_are_refused_on_postgres_with_the_reason() {
        let url = "postgres://keycast:hunter2@db.internal:5432/keycast";
        for (var, value) in [
            ("KEYCAST_REPLICA_URL", "gs://bucket/keycast"),
            ("KEYCAST_REPLICA_LEASE_TTL_SECS", "20"),
        ] {
            let err = env(&[("DATABASE_URL", url), (var, value)])
                .build()
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{err}");
            assert!(
                err.contains("no replicator") && err.contains("point-in-time recovery"),
                "{err}"
            );
        }
        env(&[("DATABASE_URL", url), ("KEYCAST_REPLICA_URL", "none")])
            .build()
            .unwrap();
        let err = env(&[("DATABASE_URL", "postgres://u:hunter2@h/d?sslmode=bogus")])
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DATABASE_URL=postgres://u:***@h/d") && !err.contains("hunter2"),
            "{err}"
        );
        let err = env(&[("KEYCAST_DATABASE_DIRECT_URL", url)])
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("PostgreSQL only"), "{err}");
        // sqlx ignores a parameter it does not know with a warning that prints its value.
        for (param, secret) in [("sslpassword", "x2secret"), ("pasword", "typo-secret")] {
            let err = env(&[(
                "DATABASE_URL",
                &format!("postgres://u@h/d?sslmode=require&{param}={secret}"),
            )])
            .build()
            .unwrap_err()
            .to_string();
            assert!(err.contains("DATABASE_URL") && err.contains(param), "{err}");
            assert!(!err.contains(secret), "{err}");
        }
        // libpq's harmless ones, which providers' connection strings carry, still start…
        let config = env(&[(
            "DATABASE_URL",
            "postgres://u:p@h/d?sslmode=require&connect_timeout=10&channel_binding=prefer&gssencmode=disable",
        )])
        .build()
        .unwrap();
        assert!(matches!(config.database, Database::Postgres(_)));
        // …but a requirement the driver cannot honour is refused, not dropped.
        for required in ["channel_binding=require", "gssencmode=require"] {
            let err = env(&[(
                "DATABASE_URL",
                &format!("postgres://u:p@h/d?sslmode=require&{required}"),
            )])
            .build()
            .unwrap_err()
            .to_string();
            assert!(err.contains(required) && err.contains("verify-full"), "{err}");
        }
    }

    #[test]
    fn relays_named_by_apps_have_caps_and_rates_with_defaults() {
        let config = env(&[]).build().unwrap();
        assert_eq!(
            config.nostrconnect_relay_caps,
            keycast_core::nostrconnect::RelayCaps::default()
        );
        assert_eq!(
            (
                config.nostrconnect_relay_caps.per_account,
                config.nostrconnect_relay_caps.total
            ),
            (10, 200)
        );
        assert_eq!(
            (
                config.nostrconnect_relay_messages_per_sec,
                config.nip46_unbound_requests_per_sec
            ),
            (100, 20)
        );
        let config = env(&[
            ("KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT", "0"),
            ("KEYCAST_NOSTRCONNECT_MAX_RELAYS", "3"),
            ("KEYCAST_NOSTRCONNECT_RELAY_MESSAGES_PER_SEC", "5"),
            ("KEYCAST_NIP46_UNBOUND_REQUESTS_PER_SEC", "1"),
        ])
        .build()
        .unwrap();
        assert_eq!(
            (
                config.nostrconnect_relay_caps.per_account,
                config.nostrconnect_relay_caps.total
            ),
            (0, 3)
        );
        assert_eq!(
            (
                config.nostrconnect_relay_messages_per_sec,
                config.nip46_unbound_requests_per_sec
            ),
            (5, 1)
        );
        for (var, value) in [
            ("KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT", "-1"),
            ("KEYCAST_NOSTRCONNECT_MAX_RELAYS", "many"),
            ("KEYCAST_NOSTRCONNECT_RELAY_MESSAGES_PER_SEC", "0"),
            ("KEYCAST_NIP46_UNBOUND_REQUESTS_PER_SEC", "1000000"),
        ] {
            let err = env(&[(var, value)]).build().unwrap_err().to_string();
            assert!(err.contains(&format!("{var}={value}")), "{err}");
        }
    }
}

#[cfg(test)]
mod docs_tests {
    use super::SETTINGS;

    #[test]
    fn the_image_runs_keycast_as_an_unprivileged_user() {
        let dockerfile = include_str!("../../../deploy/Dockerfile");
        let user = dockerfile
            .lines()
            .filter_map(|l| l.trim().strip_prefix("USER "))
            .next_back()
            .expect("the Dockerfile names a USER");
        let uid = user.split(':').next().unwrap().trim();
        assert!(uid != "root" && uid != "0", "the image runs as {user}");
        assert!(
            uid.parse::<u32>().is_ok(),
            "a numeric uid, so runAsNonRoot can check it: {user}"
        );
    }

    #[test]
    fn the_configuration_reference_documents_every_setting() {
        let reference = include_str!("../../../docs/CONFIGURATION.md");
        for setting in SETTINGS {
            assert!(
                reference.contains(&format!("`{}`", setting.env)),
                "docs/CONFIGURATION.md lacks {}",
                setting.env
            );
            assert!(
                reference.contains(&format!("`{}`", setting.key)),
                "docs/CONFIGURATION.md lacks TOML key {}",
                setting.key
            );
        }
    }
}
