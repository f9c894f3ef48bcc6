//! Opening keycast's database — SQLite (one instance, replicated) or PostgreSQL (many
//! instances) — and the one seam between the engines.
//!
//! # The seam
//! [`Db`] holds an [`Engine`]: one sqlx pool per engine, in an enum. Every repository
//! function has **one** query body, written against sqlx's generic API with portable SQL,
//! and the crate-internal [`on_engine!`] macro runs it on whichever pool `Db` holds
//! (vaultwarden's `db_run!`, without per-engine SQL). Why this and not the alternatives:
//! - sqlx's `Any` driver decodes every row through a type-erased value and has no
//!   `after_connect` raw handle, so the SQLite WAL commit hook the replicator depends on
//!   could not be installed; it would also pay a conversion on the hot path.
//! - A repository trait with one implementation per engine would double every query for
//!   no gain: the SQL is the same text on both.
//!
//! The enum costs one `match` per query, and the compiler sees each arm's concrete
//! pool type, so the code it generates is what a single-engine build would produce. A
//! third engine is a third variant: for sqlx to run the shared bodies on it, it must be a
//! sqlx driver (Turso/libSQL over Hrana HTTP would implement `sqlx::Database` over its
//! `/v2/pipeline` requests); the SQL already keeps to what libSQL accepts.
//!
//! # SQLite
//! Every pooled connection runs with:
//! - `journal_mode=WAL`: readers never block the writer, and committed pages land in the
//!   `-wal` file where the replicator reads them;
//! - `wal_autocheckpoint=0` when a replicator ships the WAL (a commit signal) or will
//!   (`keep_wal_on_close`): the application never checkpoints; only the replicator does,
//!   and only over frames already in the object store (otherwise frames could be folded
//!   into the database file before they were shipped). Without a replica SQLite's own
//!   automatic checkpoint (every 1,000 pages) keeps the WAL bounded: nothing else would;
//! - `synchronous=NORMAL` under a replicator: in WAL mode a crash or power loss can drop the
//!   last commits from the local disk but never corrupts the database. keycast's durability
//!   boundary is then the replica, not the local disk (on Cloud Run that disk is memory and
//!   is wiped on every deploy), so an fsync per commit would cost throughput and buy
//!   nothing. Without one (`KEYCAST_REPLICA_URL=none`, and the operator's commands, whose
//!   commits `serve` ships later) the local disk is the only boundary, and every commit is
//!   fsynced before it is answered (`synchronous=FULL`);
//! - `secure_delete=ON`: overwritten and deleted content is zeroed, so an old ciphertext
//!   (after a master-key rotation, or a deleted account's key) does not survive in free
//!   space and reach the replica's snapshots; in WAL mode the page is rewritten anyway;
//! - `busy_timeout` and `foreign_keys=ON`. With replication on, the busy timeout is kept by
//!   keycast's own busy handler (`capture::install_busy_handler`), which retries a locked
//!   database within a millisecond instead of backing off to 100 ms.
//!
//! # PostgreSQL
//! The server keeps the data (no replicator). Connections are plain sqlx `PgPool`
//! connections named `keycast` (`application_name`), at most
//! [`PgOptions::max_connections`] per instance: with N instances the server sees up to
//! N × (that + [`CONNECTIONS_BESIDE_THE_POOL`]), which must stay under the server's
//! `max_connections` (Cloud SQL's depends on the machine tier).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use keycast_replica::CommitSignal;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

/// How long a connection waits on a locked database before failing (milliseconds).
pub const DEFAULT_BUSY_TIMEOUT_MS: u64 = 5_000;
/// Upper bound on pooled connections. SQLite has one writer at a time; a few readers suffice.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// Upper bound on pooled PostgreSQL connections per instance. Cloud SQL's smallest tiers
/// allow 25–50 connections in all, so a handful of instances fit with room for tools.
pub const DEFAULT_PG_MAX_CONNECTIONS: u32 = 10;
/// How long a request waits for a free pooled connection (milliseconds).
pub const DEFAULT_ACQUIRE_TIMEOUT_MS: u64 = 5_000;

/// Options for [`Db::open_sqlite`].
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// Path of the SQLite database file; created if missing.
    pub path: PathBuf,
    /// Maximum pooled connections. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: u32,
    /// Busy timeout per connection. Default [`DEFAULT_BUSY_TIMEOUT_MS`].
    pub busy_timeout: Duration,
    /// Wait for a pooled connection. Default [`DEFAULT_ACQUIRE_TIMEOUT_MS`].
    pub acquire_timeout: Duration,
    /// When set, every connection gets a WAL commit hook that reports to this signal, which
    /// the replicator waits on. Default none (no replication).
    pub commit_signal: Option<Arc<CommitSignal>>,
    /// Leave the WAL in place when the last connection closes (see
    /// `keycast_replica::capture::keep_wal_on_close`): for the operator's commands, whose
    /// commits `serve` ships from the WAL later. Default false (`serve` folds it on a clean
    /// stop, so that the file alone is the state it records).
    pub keep_wal_on_close: bool,
}

impl DbOptions {
    /// Defaults for a database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            busy_timeout: Duration::from_millis(DEFAULT_BUSY_TIMEOUT_MS),
            acquire_timeout: Duration::from_millis(DEFAULT_ACQUIRE_TIMEOUT_MS),
            commit_signal: None,
            keep_wal_on_close: false,
        }
    }
}

/// Options for [`Db::open_postgres`].
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user:pass@host:port/db?…`, including Cloud SQL's socket form
    /// `postgres://user:pass@/db?host=/cloudsql/PROJECT:REGION:INSTANCE`. Holds a password:
    /// never logged (see [`PgOptions::describe`]).
    pub url: String,
    /// Maximum pooled connections of this instance. Default [`DEFAULT_PG_MAX_CONNECTIONS`].
    pub max_connections: u32,
    /// Wait for a pooled connection. Default [`DEFAULT_ACQUIRE_TIMEOUT_MS`].
    pub acquire_timeout: Duration,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.describe())
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

impl PgOptions {
    /// Defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            max_connections: DEFAULT_PG_MAX_CONNECTIONS,
            acquire_timeout: Duration::from_millis(DEFAULT_ACQUIRE_TIMEOUT_MS),
        }
    }

    /// The URL without its password, for messages.
    pub fn describe(&self) -> String {
        redact_url(&self.url)
    }

    /// The sqlx connect options this URL means.
    ///
    /// # Errors
    /// A URL sqlx cannot parse.
    pub fn connect_options(&self) -> Result<PgConnectOptions, sqlx::Error> {
        let url = without_parameters(&normalize_socket_url(&self.url), LIBPQ_IGNORED);
        Ok(PgConnectOptions::from_str(&url)?.application_name("keycast"))
    }

    /// The host this URL reaches over the network without verifying the server: not a Unix
    /// socket (Cloud SQL's `/cloudsql/…`), not loopback, and `sslmode` short of `verify-ca` /
    /// `verify-full`. sqlx's default (`prefer`) falls back to plain text when the server
    /// declines TLS and, like `require`, takes any certificate: whoever sits on the path can
    /// ask for the password in clear and then write the database (a session row, a password
    /// hash), no master key needed. `None` for a URL sqlx cannot parse (refused elsewhere).
    pub fn unverified_remote_host(&self) -> Option<String> {
        use sqlx::postgres::PgSslMode;
        let options = self.connect_options().ok()?;
        let host = options.get_host();
        let local = options.get_socket().is_some()
            || host.starts_with('/')
            || host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let verified = matches!(options.get_ssl_mode(), PgSslMode::VerifyCa | PgSslMode::VerifyFull);
        (!local && !verified).then(|| host.to_owned())
    }

    /// What the URL requires that keycast's driver cannot do, which leaving out as harmless
    /// would turn into a weaker connection without a word: `channel_binding=require` (libpq's
    /// defence against a man in the middle when the certificate is not verified; sqlx cannot
    /// bind the channel) and `gssencmode=require` (sqlx has no GSSAPI encryption).
    pub fn unsupported_requirements(&self) -> Vec<String> {
        let Some((_, query)) = self.url.split_once('?') else {
            return Vec::new();
        };
        url::form_urlencoded::parse(query.as_bytes())
            .filter(|(key, value)| matches!(key.as_ref(), "channel_binding" | "gssencmode") && value == "require")
            .map(|(key, value)| format!("{key}={value}"))
            .collect()
    }

    /// The URL's query parameters sqlx does not know. It ignores them with a warning that
    /// prints each value — `sslpassword` (libpq's, not sqlx's) or a mistyped `pasword` would
    /// put a password in the log — so configuration refuses them by name first.
    pub fn unknown_parameters(&self) -> Vec<String> {
        let Some((_, query)) = self.url.split_once('?') else {
            return Vec::new();
        };
        url::form_urlencoded::parse(query.as_bytes())
            .map(|(key, _)| key.into_owned())
            .filter(|key| !known_parameter(key))
            .collect()
    }
}

/// libpq parameters that hold no secret, which connection strings from hosting providers
/// carry and sqlx does not read: left out before sqlx sees the URL (keycast has its own
/// timeouts), so a URL that worked before keeps working and nothing is printed.
const LIBPQ_IGNORED: &[&str] = &[
    "connect_timeout",
    "target_session_attrs",
    "channel_binding",
    "sslnegotiation",
    "sslcompression",
    "gssencmode",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "pgbouncer",
];

/// Whether sqlx reads `name`, or keycast leaves it out as harmless ([`LIBPQ_IGNORED`]).
fn known_parameter(name: &str) -> bool {
    SQLX_PG_PARAMETERS.contains(&name) || LIBPQ_IGNORED.contains(&name) || name.starts_with("options[")
}

/// `url` without the query parameters named in `names`.
fn without_parameters(url: &str, names: &[&str]) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name);
            !names.contains(&name)
        })
        .collect();
    if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// The query parameters sqlx-postgres reads from a URL (`PgConnectOptions::parse_from_url`).
const SQLX_PG_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Cloud SQL documents `postgres://user:pass@/db?host=/cloudsql/…`: a URL with credentials
/// but no host, which URL parsers refuse ("empty host"). The socket directory in `host=`
/// is what counts, so a placeholder host is put in and the `host` parameter overrides it.
fn normalize_socket_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once("@/") {
        Some((credentials, tail)) if !credentials.contains('/') => {
            format!("{scheme}://{credentials}@localhost/{tail}")
        }
        _ => url.to_owned(),
    }
}

/// `scheme://user:***@host/db?…&password=***`: a database URL safe to print. A password may
/// also come as a query parameter (`?password=`, which sqlx accepts: handy with a Cloud SQL
/// socket, whose URL has no host to put credentials before).
pub fn redact_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return redact_unparsed(text);
    };
    // A password starting with digits and `/` (a port and a path), or with `/`, `?` or `#`,
    // parses — with the credentials in the path, query or fragment. No user, but an `@`
    // after the host: masked as text (an `@` only in a query is then masked whole).
    let hides_credentials = |part: Option<&str>| part.is_some_and(|p| p.contains('@'));
    if url.username().is_empty()
        && [Some(url.path()), url.query(), url.fragment()]
            .into_iter()
            .any(hides_credentials)
    {
        return redact_unparsed(text);
    }
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if let Some(query) = url.query().map(redact_query) {
        url.set_query(Some(&query));
    }
    url.to_string()
}

/// [`redact_url`] for what the `url` crate does not parse: a Cloud SQL socket's URL
/// (credentials, no host), or a password with an unescaped `/`, `?` or `#` — what an error
/// about the URL prints. Credentials end at the last `@` before the query; an `@` only past a
/// `?` could end a password holding `?` or start a query value: then all but the scheme is
/// masked.
fn redact_unparsed(text: &str) -> String {
    const MASKED: &str = "*** (not a valid URL; shown masked)";
    let Some((scheme, rest)) = text.split_once("://") else {
        return MASKED.to_owned();
    };
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    let base = match base.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{credentials}@{host}"),
        },
        None if query.is_some_and(|q| q.contains('@')) => return format!("{scheme}://{MASKED}"),
        None => base.to_owned(),
    };
    match query {
        Some(query) => format!("{scheme}://{base}?{}", redact_query(query)),
        None => format!("{scheme}://{base}"),
    }
}

/// The query with every value masked but those of the driver's parameters that hold no
/// secret: a password parameter, and any parameter keycast does not know (a mistyped
/// `pasword`, libpq's `sslpassword`), may.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name == "password" || !known_parameter(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Connections each PostgreSQL instance holds beside its pool: the change listener (see
/// [`crate::notify`]) and the [`Db::dedicated`] ones of the activity flush, the heartbeat and
/// the change-notice publisher. A deployment's instances × (pool + this) must stay under the
/// server's `max_connections`.
pub const CONNECTIONS_BESIDE_THE_POOL: u32 = 4;

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open database {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}

/// The pool of one engine. Repositories reach it through [`on_engine!`] only.
#[derive(Debug, Clone)]
pub(crate) enum Engine {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Which engine a [`Db`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// One instance, a local file replicated to object storage.
    Sqlite,
    /// A PostgreSQL server; any number of instances.
    Postgres,
}

impl EngineKind {
    /// `sqlite` or `postgres`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Sqlite => "sqlite",
            EngineKind::Postgres => "postgres",
        }
    }
}

/// `on_engine!(db, |pool| body)` runs one query body on whichever pool `db` holds, with
/// `pool` bound to it (closure syntax so rustfmt formats the body; it is not a closure). The body
/// is compiled once per engine against that engine's concrete types, so it must be
/// portable SQL through sqlx's generic API; anything engine-specific is a `match` on
/// [`Db::kind`] instead.
macro_rules! on_engine {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db.engine() {
            $crate::pool::Engine::Sqlite($pool) => $body,
            $crate::pool::Engine::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_engine;

/// A handle on keycast's database: a connection pool, cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    engine: Engine,
    /// The file path (SQLite) or the URL without password (PostgreSQL), for messages.
    location: Arc<str>,
    path: Option<PathBuf>,
}

impl Db {
    /// Opens (creating if missing) the SQLite database and applies pending migrations.
    ///
    /// # Errors
    /// [`OpenError::Open`] if the file cannot be opened as a database;
    /// [`OpenError::Migrate`] if migrations fail or the schema is newer than this binary.
    pub async fn open_sqlite(options: &DbOptions) -> Result<Db, OpenError> {
        let db = Db::connect_sqlite_file(options).await?;
        crate::migrate::run(&db).await?;
        Ok(db)
    }

    /// Opens (creating if missing) the SQLite database, migrating nothing.
    async fn connect_sqlite_file(options: &DbOptions) -> Result<Db, OpenError> {
        let location = options.path.display().to_string();
        let pool = connect_sqlite(options).await.map_err(|source| OpenError::Open {
            location: location.clone(),
            source,
        })?;
        Ok(Db {
            engine: Engine::Sqlite(pool),
            location: location.into(),
            path: Some(options.path.clone()),
        })
    }

    /// Opens the SQLite database as it is, for a command that only reads: nothing is
    /// migrated, and a schema this binary cannot read as it is refused
    /// ([`crate::migrate::check_readable`]).
    ///
    /// # Errors
    /// [`OpenError::Open`]; [`OpenError::Migrate`] for a schema this binary cannot read.
    pub async fn open_sqlite_as_is(options: &DbOptions) -> Result<Db, OpenError> {
        Db::connect_sqlite_file(options).await?.readable_as_is().await
    }

    /// [`Db::open_sqlite_as_is`] on PostgreSQL.
    ///
    /// # Errors
    /// As [`Db::open_sqlite_as_is`].
    pub async fn open_postgres_as_is(options: &PgOptions) -> Result<Db, OpenError> {
        Db::connect_postgres(options).await?.readable_as_is().await
    }

    /// This handle, if its schema can be read as it is; closed otherwise.
    async fn readable_as_is(self) -> Result<Db, OpenError> {
        if let Err(e) = crate::migrate::check_readable(&self).await {
            self.close().await;
            return Err(e.into());
        }
        Ok(self)
    }

    /// Opens the SQLite database without migrating (tests that walk the migrations).
    #[cfg(test)]
    pub(crate) async fn open_sqlite_unmigrated(options: &DbOptions) -> Db {
        Db::connect_sqlite_file(options).await.unwrap()
    }

    /// Connects to the PostgreSQL server and applies pending migrations, under an advisory
    /// lock so that instances starting together migrate once (see [`crate::migrate`]).
    ///
    /// # Errors
    /// [`OpenError::Open`] if the server cannot be reached or refuses the credentials;
    /// [`OpenError::Migrate`] as for SQLite.
    pub async fn open_postgres(options: &PgOptions) -> Result<Db, OpenError> {
        let db = Db::connect_postgres(options).await?;
        crate::migrate::run(&db).await?;
        Ok(db)
    }

    /// Connects to the PostgreSQL server without migrating (for `keycast migrate --to`,
    /// which looks at the target before it changes anything).
    ///
    /// # Errors
    /// [`OpenError::Open`].
    pub async fn connect_postgres(options: &PgOptions) -> Result<Db, OpenError> {
        let location = options.describe();
        let open_err = |source| OpenError::Open {
            location: location.clone(),
            source,
        };
        let connect = options.connect_options().map_err(open_err)?;
        let pool = pg_pool_options(options.max_connections, options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(open_err)?;
        Ok(Db {
            engine: Engine::Postgres(pool),
            location: location.clone().into(),
            path: None,
        })
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        match self.engine {
            Engine::Sqlite(_) => EngineKind::Sqlite,
            Engine::Postgres(_) => EngineKind::Postgres,
        }
    }

    /// The SQLite pool, for what only exists on SQLite (the replicator, SQLite-only tests).
    pub fn as_sqlite(&self) -> Option<&SqlitePool> {
        match &self.engine {
            Engine::Sqlite(pool) => Some(pool),
            Engine::Postgres(_) => None,
        }
    }

    /// The PostgreSQL pool, for what only exists on PostgreSQL (the change listener,
    /// instance membership, PostgreSQL-only tests).
    pub fn as_postgres(&self) -> Option<&PgPool> {
        match &self.engine {
            Engine::Postgres(pool) => Some(pool),
            Engine::Sqlite(_) => None,
        }
    }

    /// Path of the database file (SQLite only).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Where the database is, for messages: a file path, or the URL without password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Runs a trivial query: the readiness probe's proof that the database answers.
    ///
    /// # Errors
    /// Whatever the pool or the engine returned.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_engine!(self, |pool| sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
    }

    /// A handle on the same database through `connections` connections of its own
    /// (PostgreSQL; opened on first use), for background work that must neither wait for
    /// the requests' pool nor hold it: the activity flush and the cluster heartbeat. A
    /// multi-second flush on the shared pool once held connections that signing and the
    /// heartbeat then queued for until the pool ran dry (BENCHMARKS.md, issue 13). On
    /// SQLite the same pool (one writer in all, and its connections carry the replicator's
    /// commit hook).
    pub fn dedicated(&self, connections: u32) -> Db {
        match &self.engine {
            Engine::Sqlite(_) => self.clone(),
            Engine::Postgres(pool) => {
                let pool = pg_pool_options(connections.max(1), pool.options().get_acquire_timeout())
                    .connect_lazy_with((*pool.connect_options()).clone());
                Db {
                    engine: Engine::Postgres(pool),
                    location: self.location.clone(),
                    path: None,
                }
            }
        }
    }

    /// Pool statistics for metrics: (open connections, idle connections).
    pub fn pool_stats(&self) -> (u32, usize) {
        on_engine!(self, |pool| (pool.size(), pool.num_idle()))
    }

    /// Waits for in-use connections to return, then closes the pool.
    pub async fn close(&self) {
        on_engine!(self, |pool| pool.close().await)
    }
}

/// PostgreSQL pool settings. Before an idle connection is handed out it is asked one
/// question ([`pg_left_in_a_transaction`], in place of sqlx's ping: one round trip either
/// way, part of a NIP-46 claim's time, BENCHMARKS.md). Its answer proves the connection alive,
/// so that a failover costs no request: a Cloud SQL maintenance restart or a proxy closes every
/// connection at once, and sqlx replaces a dead connection before any statement is sent on it,
/// where each connection of the pool would otherwise fail one request with a 500 first.
///
/// That question is bounded by [`PG_CHECK_WITHIN`], and a connection that comes back gets
/// [`PG_RELEASE_WITHIN`] to answer a ping (a statement cut off by a timeout included): a
/// connection that a NAT, a proxy or a failover dropped without a word never
/// answers and never fails (sqlx sets no TCP keepalive), and without the bounds it failed the
/// acquire that drew it (idle), or held its pool slot for as long as the kernel took to give
/// up on it, for good in the one-connection pools of the heartbeat and the change notices.
fn pg_pool_options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, _meta| {
            Box::pin(async move { Ok(!answered_within(PG_CHECK_WITHIN, pg_left_in_a_transaction(conn)).await?) })
        })
        .after_release(|conn, _meta| {
            Box::pin(async move {
                use sqlx::Connection as _;
                // sqlx pings every connection that comes back, without a bound, right after
                // this: one that died since its last statement held its slot for good. Pinged
                // here first, bounded (one more round trip per release, off the request's
                // path: the release runs in a task of its own).
                answered_within(PG_RELEASE_WITHIN, conn.ping()).await.map(|()| true)
            })
        })
}

/// How long an idle pooled PostgreSQL connection has to answer its check before it is taken
/// for dead and closed (a healthy server answers in a millisecond; the pool replaces the
/// connection with a new one).
pub const PG_CHECK_WITHIN: Duration = Duration::from_secs(1);

/// How long a connection coming back to the pool has to answer a ping, a statement cut off
/// by a timeout included, before it is closed: a healthy server finishes a slow statement, a
/// dropped connection never answers. Shorter than the acquire timeout, so that a request
/// waiting for that slot gets a new connection instead (a statement still running on the
/// server then finishes there by itself).
pub const PG_RELEASE_WITHIN: Duration = Duration::from_secs(2);

/// `check`, failed as a dead connection's if it has no answer `within`.
async fn answered_within<T>(
    within: Duration,
    check: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(within, check).await {
        Ok(answer) => answer,
        Err(_) => {
            metrics::counter!("keycast_database_connections_discarded_total").increment(1);
            tracing::warn!(
                within_ms = within.as_millis() as u64,
                "a pooled database connection did not answer its check in time (dropped by the network?); closing it"
            );
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to the connection check",
            )))
        }
    }
}

/// Whether an idle pooled PostgreSQL connection is inside a transaction sqlx does not count.
///
/// sqlx 0.9 counts a transaction only once the server has answered its `BEGIN`: a `begin()`
/// cancelled while it waits (a request cut off by its timeout or its client, a task aborted)
/// returns the connection to the pool inside a transaction nobody will end. Every statement
/// later run on it is answered as done and never committed: a user's new key, a swap of master
/// key rotation — gone when the connection closes. An error here (a dead connection, or a
/// transaction aborted by an error) closes it too.
async fn pg_left_in_a_transaction(conn: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
    // The first statement of a transaction starts it: the two times differ only inside one
    // begun earlier. The simple protocol needs no prepared statement (transaction-mode poolers).
    let idle = match sqlx::raw_sql("SELECT 1 WHERE statement_timestamp() = transaction_timestamp()")
        .fetch_optional(&mut *conn)
        .await
    {
        Ok(row) => row.is_some(),
        Err(e) => {
            // Dead (a failover closed it) or inside a transaction an error aborted.
            metrics::counter!("keycast_database_connections_discarded_total").increment(1);
            return Err(e);
        }
    };
    if !idle {
        metrics::counter!("keycast_database_connections_discarded_total").increment(1);
        tracing::warn!("a pooled database connection was left inside a transaction (a cancelled BEGIN?); closing it");
    }
    Ok(!idle)
}

/// Whether an idle pooled connection is inside a transaction, by sqlx's count or by SQLite's
/// own state; such a connection is closed instead of handed out.
///
/// A COMMIT that SQLite refuses with `SQLITE_FULL` rolls the transaction back by itself; sqlx's
/// ROLLBACK after it then fails ("no transaction is active") and sqlx goes on counting the
/// connection as inside one. Its next `begin()` is then a SAVEPOINT that an error rolls back
/// *to*, leaving SQLite's transaction open: the write lock is held for good (every other
/// write waits out the busy timeout and fails), and what that connection writes afterwards
/// is answered as made yet never committed. (`crates/keycast/tests/refused_commit.rs` and
/// `disk_full.rs` walk into it.)
async fn left_in_a_transaction(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection as _;
    let counted = conn.is_in_transaction();
    let mut handle = conn.lock_handle().await?;
    // SAFETY: a live connection owned by the pool; `sqlite3_get_autocommit` only reads it.
    let open = unsafe { libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) == 0 };
    if counted || open {
        metrics::counter!("keycast_database_connections_discarded_total").increment(1);
        tracing::warn!(
            counted,
            open,
            "a pooled database connection was left inside a transaction (a commit the disk refused?); closing it"
        );
        return Ok(true);
    }
    Ok(false)
}

async fn connect_sqlite(options: &DbOptions) -> Result<SqlitePool, sqlx::Error> {
    let replicated = options.commit_signal.is_some();
    let shipped_later = replicated || options.keep_wal_on_close;
    let connect = SqliteConnectOptions::new()
        .filename(&options.path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if replicated {
            SqliteSynchronous::Normal
        } else {
            SqliteSynchronous::Full
        })
        .busy_timeout(options.busy_timeout)
        .foreign_keys(true)
        .pragma("wal_autocheckpoint", if shipped_later { "0" } else { "1000" })
        // Deleted and overwritten content is zeroed, not left in free space: a ciphertext
        // replaced by master-key rotation (or a deleted account's key) must not live on in
        // the file, and so in the replica's next snapshot.
        .pragma("secure_delete", "ON");
    let mut pool = SqlitePoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        .before_acquire(|conn, _meta| Box::pin(async move { Ok(!left_in_a_transaction(conn).await?) }));
    let (signal, keep_wal) = (options.commit_signal.clone(), options.keep_wal_on_close);
    if signal.is_some() || keep_wal {
        let busy_timeout = options.busy_timeout;
        pool = pool.after_connect(move |conn, _meta| {
            let signal = signal.clone();
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                // SAFETY: the handle is a live connection owned by the pool; the hook and
                // the busy handler live as long as the connection does.
                unsafe {
                    if let Some(signal) = &signal {
                        keycast_replica::capture::install_wal_hook(handle.as_raw_handle(), signal);
                        // The replicator's checkpoints take the write lock for milliseconds:
                        // retry promptly instead of SQLite's back-off (same timeout).
                        keycast_replica::capture::install_busy_handler(handle.as_raw_handle(), busy_timeout);
                    }
                    if keep_wal {
                        keycast_replica::capture::keep_wal_on_close(handle.as_raw_handle());
                    }
                }
                Ok(())
            })
        });
    }
    pool.connect_with(connect).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(journal_mode, wal_autocheckpoint, foreign_keys, synchronous)` of a pooled connection.
    async fn pragmas(options: &DbOptions) -> (String, i64, i64, i64) {
        let db = Db::open_sqlite(options).await.unwrap();
        let pool = db.as_sqlite().unwrap();
        let one =
            |pragma: &'static str| async move { sqlx::query_scalar::<_, i64>(pragma).fetch_one(pool).await.unwrap() };
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(pool).await.unwrap();
        (
            mode,
            one("PRAGMA wal_autocheckpoint").await,
            one("PRAGMA foreign_keys").await,
            one("PRAGMA synchronous").await,
        )
    }

    #[tokio::test]
    async fn under_a_replicator_connections_never_checkpoint_and_leave_durability_to_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        let replicated = DbOptions {
            commit_signal: Some(CommitSignal::new()),
            ..DbOptions::new(dir.path().join("k.db"))
        };
        assert_eq!(pragmas(&replicated).await, ("wal".into(), 0, 1, 1));
        // An operator's command: `serve` ships its commits later, so nothing folds them
        // away first; until then this disk is all they have.
        let command = DbOptions {
            keep_wal_on_close: true,
            ..DbOptions::new(dir.path().join("c.db"))
        };
        assert_eq!(pragmas(&command).await, ("wal".into(), 0, 1, 2));
    }

    /// `KEYCAST_REPLICA_URL=none`: before, the WAL was never checkpointed (it grew for as
    /// long as the process ran) nor fsynced (a power cut took back commits already answered).
    #[tokio::test]
    async fn without_a_replica_every_commit_is_fsynced_and_the_wal_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            pragmas(&DbOptions::new(dir.path().join("k.db"))).await,
            ("wal".into(), 1000, 1, 2)
        );
    }

    #[tokio::test]
    async fn every_commit_reaches_the_commit_signal() {
        let dir = tempfile::tempdir().unwrap();
        let signal = CommitSignal::new();
        let options = DbOptions {
            commit_signal: Some(signal.clone()),
            ..DbOptions::new(dir.path().join("k.db"))
        };
        let db = Db::open_sqlite(&options).await.unwrap();
        let pool = db.as_sqlite().unwrap();
        let before = signal.commits();
        for i in 0..3 {
            sqlx::query("INSERT INTO keycast_meta (key, value) VALUES ($1, 'v')")
                .bind(format!("k{i}"))
                .execute(pool)
                .await
                .unwrap();
        }
        sqlx::query("SELECT COUNT(*) FROM keycast_meta")
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(
            signal.commits() - before,
            3,
            "one signal per write transaction, none for reads"
        );
    }

    /// What a `begin()` cancelled while its `BEGIN` is in flight leaves behind: the server
    /// inside a transaction, sqlx counting none. Without the check, the write below went out
    /// on that connection, was answered, and was rolled back when the pool closed.
    #[tokio::test]
    async fn a_postgres_connection_left_inside_a_transaction_is_never_handed_out_again() {
        let Some(server) = crate::scratch::test_server() else {
            return;
        };
        let scratch = crate::scratch::create_database(&server, "left_in_txn").await.unwrap();
        let options = PgOptions {
            max_connections: 1,
            ..PgOptions::new(&scratch.url)
        };
        let db = Db::open_postgres(&options).await.unwrap();
        let pool = db.as_postgres().unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
        drop(conn);
        sqlx::query("INSERT INTO keycast_meta (key, value) VALUES ('answered', 'kept')")
            .execute(pool)
            .await
            .unwrap();
        db.close().await;
        let db = Db::open_postgres(&options).await.unwrap();
        let kept: Option<String> = sqlx::query_scalar("SELECT value FROM keycast_meta WHERE key = 'answered'")
            .fetch_optional(db.as_postgres().unwrap())
            .await
            .unwrap();
        assert_eq!(kept.as_deref(), Some("kept"), "a write answered as done was committed");
        db.close().await;
    }

    /// A NAT, a proxy or a failover that forgets a connection leaves it silent: no answer,
    /// no error, ever. Before the pool's checks were bounded, its one connection so dropped
    /// made every later statement fail: the idle connection's check failed each acquire that
    /// drew it, and a statement cut off on it (a request's timeout) kept its slot for good
    /// while sqlx waited on its ping.
    #[tokio::test]
    async fn a_postgres_pool_replaces_connections_the_network_silently_dropped() {
        let Some(server) = crate::scratch::test_server() else {
            return;
        };
        let scratch = crate::scratch::create_database(&server, "forgotten").await.unwrap();
        let upstream = url::Url::parse(&scratch.url).unwrap();
        let upstream_at = format!("{}:{}", upstream.host_str().unwrap(), upstream.port().unwrap());
        let link = ForgetfulLink::start(upstream_at.clone()).await;
        let options = PgOptions {
            max_connections: 1,
            ..PgOptions::new(scratch.url.replace(&upstream_at, &format!("127.0.0.1:{}", link.port)))
        };
        let db = Db::open_postgres(&options).await.unwrap();
        let pool = db.as_postgres().unwrap();

        link.forget();
        let started = std::time::Instant::now();
        sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .expect("a new connection in place of the idle one the network dropped");
        assert!(
            started.elapsed() < PG_RELEASE_WITHIN + Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        let cut_off = tokio::time::timeout(Duration::from_millis(600), async {
            let sleeping = sqlx::query("SELECT pg_sleep(5)").execute(pool);
            let forget = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                link.forget();
                std::future::pending::<()>().await
            };
            tokio::select! { _ = sleeping => {}, () = forget => {} }
        })
        .await;
        assert!(cut_off.is_err(), "the statement was meant to be cut off");
        let started = std::time::Instant::now();
        sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .expect("a new connection in place of the one cut off while the network dropped it");
        assert!(
            started.elapsed() < PG_RELEASE_WITHIN + Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        db.close().await;
    }

    /// A loopback relay to one address whose connections so far can all go silent at once
    /// ([`ForgetfulLink::forget`]: no close, no reset) while new ones carry bytes.
    struct ForgetfulLink {
        port: u16,
        silenced: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    }

    impl ForgetfulLink {
        async fn start(upstream: String) -> ForgetfulLink {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let silenced = Arc::new(std::sync::Mutex::new(Vec::new()));
            let registry = silenced.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    registry.lock().unwrap().push(flag.clone());
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(Self::carry(client_read, server_write, flag.clone()));
                    tokio::spawn(Self::carry(server_read, client_write, flag));
                }
            });
            ForgetfulLink { port, silenced }
        }

        /// Copies bytes until either side closes, or never again once `silenced` is set
        /// (holding both sockets open).
        async fn carry(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            silenced: Arc<std::sync::atomic::AtomicBool>,
        ) {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let read = tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await;
                if silenced.load(std::sync::atomic::Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                match read {
                    Err(_) => {}
                    Ok(Ok(0) | Err(_)) => return,
                    Ok(Ok(n)) => {
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }

        fn forget(&self) {
            for flag in self.silenced.lock().unwrap().iter() {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn cloud_sql_socket_urls_parse_and_passwords_never_print() {
        let url = "postgres://keycast:s3cr%40t@/keycast?host=/cloudsql/proj:europe-west1:db";
        let options = PgOptions::new(url);
        let connect = options.connect_options().unwrap();
        assert_eq!(
            connect.get_socket(),
            Some(&PathBuf::from("/cloudsql/proj:europe-west1:db"))
        );
        assert_eq!(connect.get_database(), Some("keycast"));
        assert_eq!(connect.get_username(), "keycast");
        let shown = format!("{options:?} {}", options.describe());
        assert!(!shown.contains("s3cr"), "{shown}");
        assert_eq!(
            redact_url("postgres://u:p@h:5/d?sslmode=require"),
            "postgres://u:***@h:5/d?sslmode=require"
        );
        // The password as a query parameter (sqlx takes it): the Cloud SQL socket's form.
        let url = "postgres://keycast@/keycast?host=/cloudsql/p:r:i&password=hunter2&sslpassword=x2";
        assert_eq!(PgOptions::new(url).connect_options().unwrap().get_username(), "keycast");
        assert_eq!(
            redact_url(url),
            "postgres://keycast@/keycast?host=/cloudsql/p:r:i&password=***&sslpassword=***"
        );
        assert!(!PgOptions::new(url).describe().contains("hunter2"));
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        // A password with an unescaped `/`, `?` or `#` is not a URL (sqlx refuses it, and the
        // refusal prints it): before, it was printed whole.
        for leaky in [
            "postgres://keycast:Xy/9q@db/keycast",
            "postgres://keycast:ab?cd@db/keycast",
            "postgres://keycast:a#9q@db/keycast",
            "postgres://keycast:123/9q@db/keycast",
            "postgres://keycast:/9q@db/keycast",
            "postgres://keycast:#9q@db/keycast",
            "postgres://keycast:?9q@db/keycast",
        ] {
            let shown = redact_url(leaky);
            assert!(!shown.contains("9q") && !shown.contains("cd@"), "{shown}");
        }
        for parsed in ["postgres://h/d?password=p@ss", "postgres://u:p@h/d?x=a@b"] {
            let shown = redact_url(parsed);
            assert!(!shown.contains(":p@") && !shown.contains("=p@"), "{shown}");
        }
    }
}
