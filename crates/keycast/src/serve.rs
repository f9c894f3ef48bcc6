//! `keycast serve`: the process lifecycle.
//!
//! Start-up order: bind the port first (so probes answer while the database is prepared),
//! then open and migrate the database, then report ready on `/healthz/startup`.
//!
//! Shutdown order, on SIGTERM or SIGINT:
//! 1. stop accepting connections;
//! 2. let in-flight requests finish, within the grace period (`KEYCAST_SHUTDOWN_GRACE_SECS`);
//! 3. close the database pool (with a replica, the final sync happens here too).
//!
//! Exit status is 0 when all of that finished inside the grace period, non-zero otherwise.

use std::future::{Future, IntoFuture};
use std::time::Instant;

use anyhow::Context;
use keycast_db::{Db, DbOptions};
use keycast_http::{AppState, HttpOptions};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::Config;

/// Serves HTTP on `listener` until `shutdown` completes, then shuts down in order.
///
/// # Errors
/// Start-up failures (data directory, database, migrations) and a shutdown that did not
/// finish inside the grace period.
pub async fn run(
    listener: TcpListener,
    config: Config,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let options = HttpOptions {
        request_timeout: config.request_timeout,
        test_routes: config.test_routes,
    };
    let state = AppState::new(metrics, options);
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let server = axum::serve(listener, keycast_http::app(state.clone()))
        .with_graceful_shutdown(async move {
            let _ = http_stopped.await;
        })
        .into_future();
    let mut server = tokio::spawn(server);

    tokio::pin!(shutdown);
    let db = tokio::select! {
        opened = open_database(&config) => opened?,
        () = &mut shutdown => {
            tracing::info!("shutdown requested before start-up finished");
            return Ok(());
        }
        result = &mut server => return result.context("HTTP server task failed")?.context("HTTP server failed"),
    };
    state.set_db(db.clone());
    tracing::info!(database = %config.database_path.display(), "keycast is ready");

    tokio::select! {
        () = &mut shutdown => {}
        result = &mut server => return result.context("HTTP server task failed")?.context("HTTP server failed"),
    }
    shut_down(config, stop_http, server, db).await
}

async fn open_database(config: &Config) -> anyhow::Result<Db> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {} (KEYCAST_DATA_DIR)",
            config.data_dir.display()
        )
    })?;
    if let Some(parent) = config.database_path.parent() {
        std::fs::create_dir_all(parent).with_context(|| {
            format!("cannot create the database directory {}", parent.display())
        })?;
    }
    Ok(Db::open_sqlite(&DbOptions::new(&config.database_path)).await?)
}

async fn shut_down(
    config: Config,
    stop_http: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    db: Db,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let grace = config.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: no new connections, finishing in-flight requests"
    );
    let _ = stop_http.send(());
    if tokio::time::timeout(grace, server).await.is_err() {
        anyhow::bail!(
            "in-flight requests did not finish within the {} s grace period",
            grace.as_secs_f64()
        );
    }
    let remaining = grace.saturating_sub(started.elapsed());
    if tokio::time::timeout(remaining, db.close()).await.is_err() {
        anyhow::bail!("the database did not close within the grace period");
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "keycast stopped cleanly"
    );
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = term => tracing::info!("received SIGTERM"),
    }
}

/// `keycast migrate`: open the database, apply pending migrations, close it.
///
/// # Errors
/// As for start-up.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let db = open_database(config).await?;
    tracing::info!(
        version = keycast_db::migrate::latest_version(),
        "database is migrated"
    );
    db.close().await;
    Ok(())
}
