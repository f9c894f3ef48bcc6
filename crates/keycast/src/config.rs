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
    /// Default, as shown in `--help` and the README.
    pub default: &'static str,
    /// One line for humans.
    pub help: &'static str,
}

/// Every setting keycast reads. The README's configuration table mirrors this list.
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
        help: "database location",
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
        key: "replica_url",
        env: "KEYCAST_REPLICA_URL",
        default: "file://<data_dir>-replica",
        help: "where the database is replicated: file:///dir, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, or none",
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
        key: "test_routes",
        env: "KEYCAST_TEST_ROUTES",
        default: "false",
        help: "mount /api/test/* (for keycast's own tests only)",
    },
];

/// Settings whose values are secrets: redacted from every message.
const SECRET_SETTINGS: &[&str] = &["replica_encryption_key", "master_key", "smtp_url"];

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
    /// Path of the SQLite database file.
    pub database_path: PathBuf,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub shutdown_grace: Duration,
    pub request_timeout: Duration,
    pub test_routes: bool,
    /// Which writes wait for the replica.
    pub durability: DurabilityMode,
    /// Replication; `None` when `KEYCAST_REPLICA_URL=none`.
    pub replica: Option<ReplicaConfig>,
    /// Where the master key comes from.
    pub master_key: MasterKeySource,
    /// `KEYCAST_PUBLIC_URL` without a trailing slash; `None` → `http://localhost:<bound port>`.
    pub public_url: Option<String>,
    /// `BUNKER_RELAYS`: relays bunkers listen on and bunker URLs name. Empty: the
    /// embedded relay's URL is used.
    pub bunker_relays: Vec<String>,
    /// Where the embedded relay listens; `None` when it is off.
    pub embedded_relay: Option<std::net::SocketAddr>,
    /// Answer NIP-46 requests.
    pub nip46: bool,
    /// Accept `nostrconnect://` relays on internal addresses.
    pub nostrconnect_internal_relays: bool,
    /// NIP-46 requests handled at once (`KEYCAST_NIP46_MAX_IN_FLIGHT`).
    pub nip46_max_in_flight: usize,
    /// CORS origins; empty disables CORS.
    pub allowed_origins: Vec<String>,
    /// Mail through this SMTP server; `None` → the development outbox.
    pub smtp: Option<SmtpMailer>,
    /// Life of an OAuth authorization code, seconds (1..=600).
    pub oauth_code_ttl_secs: i64,
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
        let database_path = match self.get("database_url", parse_database_url)? {
            Some(path) => path,
            None => data_dir.join("keycast.db"),
        };
        Ok(Config {
            port: self.get("port", parse_port)?.unwrap_or(DEFAULT_PORT),
            bind: self
                .get("bind", |v| {
                    v.parse::<IpAddr>()
                        .map_err(|_| "not an IP address (e.g. 0.0.0.0 or 127.0.0.1)".into())
                })?
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            database_path,
            log_format: self.get("log_format", parse_log_format)?.unwrap_or(LogFormat::Text),
            log_filter: self.get("log", non_empty)?.unwrap_or_else(|| "info".into()),
            shutdown_grace: self
                .get("shutdown_grace_secs", parse_secs)?
                .unwrap_or(Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS)),
            request_timeout: self
                .get("request_timeout_secs", parse_secs)?
                .unwrap_or(Duration::from_secs(30)),
            test_routes: self.get("test_routes", parse_bool)?.unwrap_or(false),
            durability: self.get("durability", parse_durability)?.unwrap_or_default(),
            replica: self.replica(&data_dir)?,
            master_key: self.master_key(&data_dir)?,
            public_url: self.get("public_url", parse_public_url)?,
            bunker_relays: self.get("bunker_relays", parse_relays)?.unwrap_or_default(),
            embedded_relay: self.embedded_relay()?,
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
            allowed_origins: self.get("allowed_origins", parse_origins)?.unwrap_or_default(),
            smtp: self.smtp()?,
            oauth_code_ttl_secs: self
                .get("oauth_code_ttl_secs", parse_code_ttl)?
                .unwrap_or(keycast_core::oauth::CODE_TTL_SECS),
            data_dir,
        })
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
        Ok(Some(mailer))
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
        compaction.snapshot_interval = long("replica_snapshot_interval_secs")?.unwrap_or(compaction.snapshot_interval);
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
        let encryption = self.get("replica_encryption_key", |v| {
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

fn parse_pages(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| "expected a number of pages, at least 1".into())
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
    const SCHEMES: [&str; 4] = ["file://", "s3://", "gs://", "az://"];
    if v == "none" || SCHEMES.iter().any(|s| v.starts_with(s) && v.len() > s.len()) {
        Ok(v.to_owned())
    } else {
        Err("expected file:///dir, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, or none".into())
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

/// Accepts `sqlite://PATH`, `sqlite:PATH` (an optional `?query` is ignored).
fn parse_database_url(v: &str) -> Result<PathBuf, String> {
    if v.starts_with("postgres://") || v.starts_with("postgresql://") {
        return Err("PostgreSQL is not supported by this build yet; use sqlite://PATH".into());
    }
    let path = v
        .strip_prefix("sqlite://")
        .or_else(|| v.strip_prefix("sqlite:"))
        .ok_or("expected sqlite://PATH")?;
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err("needs a file path: an in-memory database cannot be replicated".into());
    }
    Ok(PathBuf::from(path))
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
        assert_eq!(config.database_path, PathBuf::from("./data/keycast.db"));
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
    fn oauth_code_ttl_can_be_shortened_but_not_lengthened() {
        assert_eq!(Sources::default().build().unwrap().oauth_code_ttl_secs, 600);
        let config = env(&[("KEYCAST_OAUTH_CODE_TTL_SECS", "60")]).build().unwrap();
        assert_eq!(config.oauth_code_ttl_secs, 60);
        for bad in ["0", "601", "x"] {
            assert!(env(&[("KEYCAST_OAUTH_CODE_TTL_SECS", bad)]).build().is_err(), "{bad}");
        }
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
    fn database_url_accepts_sqlite_paths_only() {
        let config = env(&[("DATABASE_URL", "sqlite:///tmp/x.db?mode=rwc")]).build().unwrap();
        assert_eq!(config.database_path, PathBuf::from("/tmp/x.db"));
        let err = env(&[("DATABASE_URL", "mysql://x")]).build().unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL=mysql://x"), "{err}");
    }
}

#[cfg(test)]
mod docs_tests {
    use super::SETTINGS;

    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!("../../../README.md");
        for setting in SETTINGS {
            assert!(
                readme.contains(&format!("`{}`", setting.env)),
                "README lacks {}",
                setting.env
            );
            assert!(
                readme.contains(&format!("`{}`", setting.key)),
                "README lacks TOML key {}",
                setting.key
            );
        }
    }
}
