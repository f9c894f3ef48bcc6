//! State shared by every handler.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keycast_db::Db;
use metrics_exporter_prometheus::PrometheusHandle;

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
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS),
            test_routes: false,
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

struct Inner {
    db: OnceLock<Db>,
    metrics: PrometheusHandle,
    options: HttpOptions,
}

impl AppState {
    /// State with no database yet; probes answer "starting" until [`AppState::set_db`].
    pub fn new(metrics: PrometheusHandle, options: HttpOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                db: OnceLock::new(),
                metrics,
                options,
            }),
        }
    }

    /// Marks start-up done: the database is open and migrated. Later calls are ignored.
    pub fn set_db(&self, db: Db) {
        let _ = self.inner.db.set(db);
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
