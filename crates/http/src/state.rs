//! State shared by every handler.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keycast_core::{KeyManager, PasswordHasher, Signer};
use keycast_db::Db;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::limit::RateLimits;
use crate::mail::{Mail, Outbox, SmtpMailer};

/// Default per-request timeout (seconds); a request still running then gets a 503.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;

/// Options for the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Per-request timeout. Default [`DEFAULT_REQUEST_TIMEOUT_SECS`]; zero disables it.
    pub request_timeout: Duration,
    /// Mounts `/api/test/*` routes used by the black-box tests (e.g. a deliberately slow
    /// request for the graceful-shutdown test). Never enable in production. Default off.
    pub test_routes: bool,
    /// Which writes wait for the replica before they are acknowledged. Default
    /// [`DurabilityMode::Async`].
    pub durability: DurabilityMode,
    /// The server's public base URL (`KEYCAST_PUBLIC_URL`): the OAuth issuer, the origin
    /// first-party pages post from, and whether cookies are `Secure` (when it is https).
    /// Default `http://localhost:3000`.
    pub public_url: String,
    /// Relays named in bunker URLs (`BUNKER_RELAYS`).
    pub relays: Vec<String>,
    /// Life of OAuth access and refresh tokens (`KEYCAST_ACCESS_TOKEN_TTL_SECS`,
    /// `KEYCAST_REFRESH_TOKEN_TTL_SECS`). Default an hour and 30 days.
    pub token_lifetimes: keycast_core::refresh::TokenLifetimes,
    /// Origins allowed to call the API from a browser (CORS, `ALLOWED_ORIGINS`). Empty (the
    /// default) sends no CORS headers.
    pub allowed_origins: Vec<String>,
    /// Life of an OAuth authorization code, seconds (`KEYCAST_OAUTH_CODE_TTL_SECS`). Default
    /// and maximum [`keycast_core::oauth::CODE_TTL_SECS`] (10 minutes).
    pub code_ttl_secs: i64,
    /// Accept `nostrconnect://` relays on internal addresses
    /// (`KEYCAST_NOSTRCONNECT_INTERNAL_RELAYS`). Default false.
    pub nostrconnect_internal_relays: bool,
    /// Caps on relays named by apps (`KEYCAST_NOSTRCONNECT_MAX_RELAYS_PER_ACCOUNT`,
    /// `KEYCAST_NOSTRCONNECT_MAX_RELAYS`); [`HttpOptions::relays`] never count.
    pub nostrconnect_relay_caps: keycast_core::nostrconnect::RelayCaps,
    /// Where mail goes: this SMTP server (`KEYCAST_SMTP_URL`), or, when `None` (the
    /// default), the development outbox.
    pub smtp: Option<SmtpMailer>,
    /// Proxies in front of keycast that append to `X-Forwarded-For`
    /// (`KEYCAST_TRUSTED_PROXY_HOPS`); 0 (the default) ignores the header. See
    /// [`crate::limit`].
    pub trusted_proxy_hops: usize,
    /// NIP-05 names reserved by the operator (`KEYCAST_RESERVED_USERNAMES`, lowercase), on
    /// top of [`keycast_core::accounts::RESERVED_USERNAMES`].
    pub reserved_usernames: Vec<String>,
    /// Bearer token `/metrics` requires (`KEYCAST_METRICS_TOKEN`); `None` (the default)
    /// answers only direct requests from loopback (a scraper beside keycast, such as Cloud
    /// Run's Managed Prometheus sidecar).
    pub metrics_token: Option<keycast_core::Secret<String>>,
    /// Whether apps nobody registered may ask for authorization (`KEYCAST_OPEN_REGISTRATION`);
    /// they are shown as unverified. Default true.
    pub open_registration: bool,
    /// Bearer token the admin API (`/api/admin/*`) requires (`KEYCAST_ADMIN_TOKEN`); `None`
    /// (the default) turns the admin API off.
    pub admin_token: Option<keycast_core::Secret<String>>,
}

/// Which writes are acknowledged only once they are in the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DurabilityMode {
    /// Writes that change who may sign (accounts, keys, authorizations, revocations) wait;
    /// everything else is acknowledged once committed locally and ships within milliseconds.
    #[default]
    Async,
    /// Every write waits for the replica.
    Sync,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS),
            test_routes: false,
            durability: DurabilityMode::Async,
            public_url: "http://localhost:3000".into(),
            relays: Vec::new(),
            token_lifetimes: keycast_core::refresh::TokenLifetimes::default(),
            allowed_origins: Vec::new(),
            code_ttl_secs: keycast_core::oauth::CODE_TTL_SECS,
            nostrconnect_internal_relays: false,
            nostrconnect_relay_caps: keycast_core::nostrconnect::RelayCaps::default(),
            smtp: None,
            trusted_proxy_hops: 0,
            reserved_usernames: Vec::new(),
            metrics_token: None,
            open_registration: true,
            admin_token: None,
        }
    }
}

/// Handlers' shared state. Cheap to clone.
///
/// The server starts answering probes before the database is open (a restore may take a
/// while), so the database is set once, later, by [`AppState::set_db`].
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// Something besides the database that readiness depends on (e.g. replication).
pub trait Dependency: Send + Sync {
    /// `Err(reason)` makes `/healthz/ready` answer 503 with that reason.
    fn readiness(&self) -> Result<(), String>;
    /// `Err(reason)` makes `/healthz/live` answer 503: the process can never serve properly
    /// again and the platform should replace it. Healthy by default.
    fn liveness(&self) -> Result<(), String> {
        Ok(())
    }
    /// Refreshes this dependency's gauges just before `/metrics` renders.
    fn export_metrics(&self) {}
}

pub use keycast_core::durability::{BoxFuture, Durability};

/// The domain services handlers call, built by the binary once the database is open
/// (see [`AppState::set_services`]).
#[derive(Clone)]
pub struct Services {
    /// The one signing path (RPC, revocation, caches).
    pub signer: Arc<Signer>,
    /// Encrypts and decrypts stored keys.
    pub keys: Arc<dyn KeyManager>,
    /// argon2id.
    pub hasher: PasswordHasher,
}

struct Inner {
    db: OnceLock<Db>,
    services: OnceLock<Services>,
    outbox: Outbox,
    limits: RateLimits,
    dependencies: OnceLock<Vec<Arc<dyn Dependency>>>,
    durability: OnceLock<Arc<dyn Durability>>,
    metrics: PrometheusHandle,
    options: HttpOptions,
}

impl AppState {
    /// State with no database yet; probes answer "starting" until [`AppState::set_db`].
    pub fn new(metrics: PrometheusHandle, options: HttpOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                db: OnceLock::new(),
                services: OnceLock::new(),
                outbox: Outbox::default(),
                limits: RateLimits::new(options.trusted_proxy_hops),
                dependencies: OnceLock::new(),
                durability: OnceLock::new(),
                metrics,
                options,
            }),
        }
    }

    /// Marks start-up done: the database is open and migrated. Later calls are ignored.
    pub fn set_db(&self, db: Db) {
        let _ = self.inner.db.set(db);
    }

    /// Installs the domain services. Call before [`AppState::set_db`] so the API never
    /// sees a database without them; later calls are ignored.
    pub fn set_services(&self, services: Services) {
        let _ = self.inner.services.set(services);
    }

    /// The database and the services, or 503 while keycast is starting.
    ///
    /// # Errors
    /// [`crate::AppError::Unavailable`] until both are set.
    pub fn api(&self) -> Result<(&Db, &Services), crate::AppError> {
        match (self.inner.db.get(), self.inner.services.get()) {
            (Some(db), Some(services)) => Ok((db, services)),
            _ => Err(crate::AppError::Unavailable(
                "keycast is starting; retry in a moment".into(),
            )),
        }
    }

    /// Mail waiting in the development outbox (empty when SMTP is configured).
    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// Logs where mail goes: the SMTP server, or a warning that it only reaches the
    /// development outbox. Call once at start, after logging is set up.
    pub fn log_mail_setup(&self) {
        match &self.inner.options.smtp {
            Some(smtp) => smtp.log_setup(),
            None => tracing::warn!("KEYCAST_SMTP_URL is not set: verification and reset mail goes to the development outbox and reaches nobody; set it (and KEYCAST_MAIL_FROM) in production"),
        }
    }

    /// Whether a mail in `lane` would be taken now (the development outbox always has room).
    pub fn mail_has_room(&self, lane: crate::mail::Lane) -> bool {
        self.inner.options.smtp.as_ref().is_none_or(|smtp| smtp.has_room(lane))
    }

    /// Sends `mail` through SMTP when configured, else into the development outbox;
    /// returns at once (see [`crate::mail`]).
    pub fn send_mail(&self, mail: Mail) {
        match &self.inner.options.smtp {
            Some(smtp) => smtp.send(mail),
            None => self.inner.outbox.send(mail),
        }
    }

    /// Keeps the rate limits in `db`, shared by every instance on it (PostgreSQL).
    pub fn share_limits(&self, db: Db) {
        self.inner.limits.share(db);
    }

    /// The rate limiters of login, registration and password reset.
    pub(crate) fn limits(&self) -> &RateLimits {
        &self.inner.limits
    }

    /// Registers what readiness depends on besides the database. Call before
    /// [`AppState::set_db`]; later calls are ignored.
    pub fn set_dependencies(&self, dependencies: Vec<Arc<dyn Dependency>>) {
        let _ = self.inner.dependencies.set(dependencies);
    }

    /// The registered dependencies (empty until set).
    pub fn dependencies(&self) -> &[Arc<dyn Dependency>] {
        self.inner.dependencies.get().map(Vec::as_slice).unwrap_or(&[])
    }

    /// Registers how to wait for durability (the replicator). Without it, a commit is as
    /// durable as the local disk and [`AppState::wait_durable`] returns at once.
    pub fn set_durability(&self, durability: Arc<dyn Durability>) {
        let _ = self.inner.durability.set(durability);
    }

    /// Call before a write: refuses it (503) on an instance that may no longer write.
    ///
    /// # Errors
    /// [`crate::AppError::Unavailable`] naming the reason.
    pub async fn ensure_writable(&self) -> Result<(), crate::AppError> {
        match self.inner.durability.get() {
            Some(d) => d.check_writable().await.map_err(|reason| {
                crate::AppError::Unavailable(format!("this instance cannot accept changes now: {reason}"))
            }),
            None => Ok(()),
        }
    }

    /// Whether this instance still speaks for the database (see [`Durability::is_writer`]):
    /// false once it handed the replica over, stepped aside or was fenced, when what it knows
    /// of grants (a revocation on the newcomer, signatures counted against a limit) is stale
    /// and what it would record is refused. True without a replicator.
    pub async fn is_writer(&self) -> bool {
        match self.inner.durability.get() {
            Some(d) => d.is_writer().await,
            None => true,
        }
    }

    /// Call after a write commits: waits for the replica when the write is `critical` (it
    /// changes who may sign) or when the durability mode is [`DurabilityMode::Sync`].
    ///
    /// # Errors
    /// As [`AppState::wait_durable`].
    pub async fn confirm_write(&self, critical: bool) -> Result<(), crate::AppError> {
        if critical || self.inner.options.durability == DurabilityMode::Sync {
            self.wait_durable().await
        } else {
            Ok(())
        }
    }

    /// Waits until every commit made so far is in the replica.
    ///
    /// # Errors
    /// [`crate::AppError::Unavailable`] (503) with the reason when durability was not reached;
    /// the caller must not report the write as saved.
    pub async fn wait_durable(&self) -> Result<(), crate::AppError> {
        match self.inner.durability.get() {
            Some(d) => d.wait_durable().await.map_err(|reason| {
                crate::AppError::Unavailable(format!("the change was not confirmed durable: {reason}; retry it"))
            }),
            None => Ok(()),
        }
    }

    /// The database, `None` while keycast is still starting.
    pub fn db(&self) -> Option<&Db> {
        self.inner.db.get()
    }

    /// The Prometheus handle that renders `/metrics`.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    /// The options the app was built with.
    pub fn options(&self) -> &HttpOptions {
        &self.inner.options
    }
}
