//! `keycast serve`: the process lifecycle.
//!
//! Start-up order: bind the port first (so probes answer while the database is prepared),
//! then restore from the replica if needed, open and migrate the database, start
//! replicating, load the master key and check it decrypts the stored keys, build the
//! signer, and only then report ready on `/healthz/startup`. Buffered signing activity is
//! flushed about once a second.
//!
//! Shutdown order, on SIGTERM or SIGINT:
//! 1. stop accepting connections;
//! 2. let in-flight requests finish, HTTP and NIP-46, within the grace period
//!    (`KEYCAST_SHUTDOWN_GRACE_SECS`);
//! 3. flush the signer's buffered activity, then close the database pool, so no commit can
//!    land after the final sync;
//! 4. ship the last committed frames and record a clean stop (the exit line names the TXID).
//!
//! A quarter of the grace period (at least a second) is kept for step 4: requests that
//! outlive the rest are cut off, but what was committed still ships.
//!
//! Exit status is 0 when all of that finished inside the grace period, non-zero otherwise.
//! An instance that is *fenced* (it lost the replica for good) goes through the same steps
//! and exits non-zero, so the platform replaces it instead of keeping a process that can no
//! longer write.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use std::sync::Arc;

use keycast_core::cluster::{Cluster, ClusterDurability, ClusterOptions};
use keycast_core::vital::Vitals;
use keycast_core::{KeyManager, Keyring, PasswordHasher, PasswordParams, Signer, SignerOptions};
use keycast_db::{Db, DbOptions};
use keycast_http::{AppState, Dependency, HttpOptions, Services};
use keycast_replica::lease::{keep_alive_while, LeaseClock};
use keycast_replica::replicator::Monitor;
use keycast_replica::{CommitSignal, Replicator};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::config::{Config, Database, PostgresConfig, ReplicaConfig};

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
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(config.port);
    // Fixed once: the approval URLs the signer makes live under it, as the pages do.
    let mut config = config;
    config.public_url = Some(
        config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://localhost:{port}")),
    );
    // Before anything else binds: bunker URLs name the embedded relay when no relays are
    // configured, so its address must be known before the first grant.
    // The background tasks this instance cannot serve without report here if one ends.
    let vitals = Vitals::default();
    let embedded = match config.embedded_relay {
        Some(addr) => {
            let limits = keycast_nip46::RelayLimits {
                upgrade_timeout: config.header_read_timeout,
                max_connections: config.embedded_relay_max_connections,
            };
            let relay = keycast_nip46::EmbeddedRelay::start(addr, limits, &vitals)
                .await
                .map_err(|e| anyhow::anyhow!("{e} (KEYCAST_EMBEDDED_RELAY_ADDR)"))?;
            tracing::info!(url = relay.url(), "embedded relay listening");
            Some(relay)
        }
        None => None,
    };
    let relays = match &embedded {
        Some(relay) if config.bunker_relays.is_empty() => vec![relay.url().to_owned()],
        _ => config.bunker_relays.clone(),
    };
    let options = HttpOptions {
        request_timeout: config.request_timeout,
        test_routes: config.test_routes,
        durability: config.durability,
        public_url: config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://localhost:{port}")),
        relays: relays.clone(),
        token_lifetimes: config.token_lifetimes,
        allowed_origins: config.allowed_origins.clone(),
        code_ttl_secs: config.oauth_code_ttl_secs,
        nostrconnect_internal_relays: config.nostrconnect_internal_relays,
        nostrconnect_relay_caps: config.nostrconnect_relay_caps,
        smtp: config.smtp.clone(),
        trusted_proxy_hops: config.trusted_proxy_hops,
        reserved_usernames: config.reserved_usernames.clone(),
        metrics_token: config.metrics_token.clone(),
        open_registration: config.open_registration,
        admin_token: config.admin_token.clone(),
    };
    // `install_recorder` leaves the upkeep to its caller: without it every histogram sample
    // stays in memory until a scrape, and a platform that never scrapes leaks by the request.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let state = AppState::new(metrics, options);
    crate::replication::register_alerted_counters();
    state.log_mail_setup();
    if config.test_routes {
        tracing::warn!("KEYCAST_TEST_ROUTES=true: /api/test/* is mounted and GET /api/test/outbox hands out every mailed token to anyone who asks; this is for keycast's own tests, never for an instance people use");
    }
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let app = keycast_http::app(state.clone());
    let server = crate::http_server::serve(
        listener,
        app,
        config.header_read_timeout,
        config.http_max_connections,
        async move {
            let _ = http_stopped.await;
        },
    );
    let mut server = tokio::spawn(server);

    tokio::pin!(shutdown);
    // A SIGTERM during start-up (a deploy cancelled, a startup probe given up) is passed to
    // it: holding the replica's lease, it gives the lease back before it stops, so the
    // instance it took it from need not wait for it to lapse.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut starting = Box::pin(start(&config, &vitals, stop_rx, Purpose::Serve));
    let mut running = tokio::select! {
        started = &mut starting => match started {
            Ok(running) => running,
            Err(e) if e.is::<StoppedDuringStartup>() => return Ok(()),
            Err(e) => return Err(e),
        },
        () = &mut shutdown => {
            tracing::info!("shutdown requested before start-up finished");
            let asked = Instant::now();
            let _ = stop_tx.send(true);
            // Start-up notices the stop where it holds the lease before replicating (the
            // restore). Past that it is let finish, within half the grace period (the other
            // half stops it cleanly): cut off while replication starts, it exited holding the
            // lease, and the next instance waited for it to lapse.
            match tokio::time::timeout(config.shutdown_grace / 2, &mut starting).await {
                Ok(Ok(running)) => {
                    drop(starting);
                    leave_cluster(&running).await;
                    return shut_down(config, asked, stop_http, server, running, None).await;
                }
                Ok(Err(e)) if !e.is::<StoppedDuringStartup>() => return Err(e),
                Ok(Err(_)) => return Ok(()),
                Err(_) => anyhow::bail!(
                    "start-up did not finish within half the {} s grace period after the SIGTERM; stopped where it was (a replica lease it held lapses instead of being given back)",
                    config.shutdown_grace.as_secs_f64()
                ),
            }
        }
        result = &mut server => return result.context("HTTP server task failed")?.context("HTTP server failed"),
    };
    drop(starting);
    if let (Some(replicator), Some(replica)) = (&running.replicator, &config.replica) {
        let health = crate::replication::ReplicationHealth {
            monitor: replicator.monitor(),
            unhealthy_after: replica.unhealthy_after,
        };
        state.set_dependencies(vec![Arc::new(health) as Arc<dyn Dependency>]);
        state.set_durability(Arc::new(crate::replication::ReplicaDurability {
            monitor: replicator.monitor(),
            timeout: replica.durable_timeout,
        }));
    }
    let mut durability: Option<Arc<dyn keycast_core::Durability>> = running
        .replicator
        .as_ref()
        .zip(config.replica.as_ref())
        .map(|(r, replica)| {
            Arc::new(crate::replication::ReplicaDurability {
                monitor: r.monitor(),
                timeout: replica.durable_timeout,
            }) as Arc<dyn keycast_core::Durability>
        });
    if let Some(cluster) = &running.cluster {
        // On PostgreSQL a change that decides who may sign is answered once every other
        // instance has dropped what it cached (see keycast_core::cluster).
        let synced = Arc::new(ClusterDurability(cluster.clone())) as Arc<dyn keycast_core::Durability>;
        state.set_durability(synced.clone());
        state.share_limits(running.db.clone());
        durability = Some(synced);
    }
    let nip46 = if config.nip46 {
        let options = keycast_nip46::Nip46Options {
            relays,
            max_in_flight: config.nip46_max_in_flight,
            allow_internal_relays: config.nostrconnect_internal_relays,
            max_app_relays: config.nostrconnect_relay_caps.total,
            app_relay_messages_per_sec: config.nostrconnect_relay_messages_per_sec,
            unbound_requests_per_sec: config.nip46_unbound_requests_per_sec,
            cluster: running.cluster.clone(),
            vitals: vitals.clone(),
            seen_before: crate::last_writes::seen_before(&running.db).await,
            ..Default::default()
        };
        let service = keycast_nip46::Nip46Service::start(running.services.signer.clone(), durability.clone(), options)
            .await
            .context("cannot start the NIP-46 signer")?;
        if let Some(replicator) = &running.replicator {
            crate::last_writes::hand_over_seen_requests(&replicator.monitor(), &service, &running.db);
        }
        Some(service)
    } else {
        tracing::warn!("KEYCAST_NIP46=false: bunker URLs are issued but nobody answers them");
        None
    };
    if let Some(replicator) = &running.replicator {
        if let Some(ms) = pause_before_serving() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        mark_serving(replicator).await?;
    }
    // Asked for the replica (or its lease taken back) before it served: it would report
    // itself started, be routed traffic, and refuse every write and signature. It stops
    // instead, handing over; the platform starts another, which asks for the replica again.
    let displaced = running
        .replicator
        .as_ref()
        .map(Replicator::monitor)
        .filter(|m| !accepts_writes(m))
        .map(|m| m.status())
        .map(|status| match status.handing_over_to {
            Some(to) if !status.fenced => Ended::Displaced(to),
            _ => Ended::Fenced,
        });
    if displaced.is_none() {
        state.set_services(running.services.clone());
        state.set_db(running.db.clone());
        tracing::info!(database = %config.database.describe(), "keycast is ready");
    }
    match (&config.database, running.keyring.previous_id()) {
        (_, None) => {}
        // Stopping at once: nothing to rotate.
        (_, Some(_)) if displaced.is_some() => {}
        // One instance writes a SQLite database: it may rotate while it serves.
        (Database::Sqlite { .. }, Some(_)) => {
            tracing::info!("KEYCAST_MASTER_KEY_PREVIOUS is set: re-encrypting every stored key under the current master key in the background");
            running.rotation = Some(tokio::spawn(crate::rotation::in_background(
                running.db.clone(),
                running.keyring.clone(),
                durability.clone(),
            )));
        }
        // Several instances share PostgreSQL, some possibly still on an older configuration
        // during a deploy: none rotates by itself (they could undo each other's work); the
        // operator runs `keycast master-key rotate` once every instance reads both keys.
        (Database::Postgres(_), Some(_)) => tracing::info!(
            "KEYCAST_MASTER_KEY_PREVIOUS is set: stored keys open under either master key; on PostgreSQL run `keycast master-key rotate` to re-encrypt them"
        ),
    }

    let monitor = running.replicator.as_ref().map(Replicator::monitor);
    let fenced = async {
        match &monitor {
            Some(monitor) => monitor.fenced().await,
            None => std::future::pending().await,
        }
    };
    let ended = match displaced {
        Some(ended) => Some(ended),
        None => tokio::select! {
            () = &mut shutdown => None,
            () = fenced => Some(Ended::Fenced),
            why = vitals.stopped() => Some(Ended::Vital(why)),
            result = &mut server => return result.context("HTTP server task failed")?.context("HTTP server failed"),
        },
    };
    let asked = Instant::now();
    match &ended {
        Some(Ended::Fenced) => tracing::error!("this instance was fenced and can never write the replica again: shutting down so the platform starts a replacement"),
        Some(Ended::Vital(why)) => tracing::error!(reason = %why, "this instance can no longer serve: shutting down so the platform starts a replacement"),
        Some(Ended::Displaced(to)) => tracing::error!(%to, "another instance asked for the replica before this one started serving: handing it over and stopping, never reported started"),
        None => {}
    }
    // The others take this instance's bunkers before it stops hearing them: for a moment
    // both answer (claims keep each request to one answer), rather than neither. They beat
    // at once on the notice of its leaving, or at their next beat at the latest.
    leave_cluster(&running).await;
    if let (Some(cluster), Some(_)) = (&running.cluster, &nip46) {
        tokio::time::sleep(cluster.beat_interval()).await;
    }
    // No new NIP-46 request from here; those under way finish (and reply) in `shut_down`,
    // before the last flush and before the database closes, so no commit lands after the
    // final sync.
    if let Some(nip46) = &nip46 {
        nip46.stop_listening();
    }
    drop(embedded);
    let reason = monitor.as_ref().and_then(|m| m.status().fence_reason);
    shut_down(config, asked, stop_http, server, running, nip46).await?;
    match ended {
        Some(Ended::Fenced) => anyhow::bail!(
            "fenced: {}; exiting so that a new instance (which restores first) takes over",
            reason.unwrap_or_else(|| "another instance owns the replica".into())
        ),
        Some(Ended::Vital(why)) => {
            anyhow::bail!("{why}; exiting so that the platform starts a replacement")
        }
        Some(Ended::Displaced(to)) => {
            anyhow::bail!("handed the replica over to {to} before serving; exiting so that the platform starts an instance that asks for it again")
        }
        None => Ok(()),
    }
}

/// On PostgreSQL, leaves the other instances (they take this one's bunkers at once instead of
/// after its heartbeat lapses). Bounded: a stalled database must not eat the grace period.
async fn leave_cluster(running: &Running) {
    if let Some(cluster) = &running.cluster {
        if tokio::time::timeout(LEAVE_LIMIT, cluster.leave()).await.is_err() {
            tracing::warn!("could not leave the instances in time; the others notice when this heartbeat lapses");
        }
    }
}

/// Why `serve` stopped serving, other than being asked to.
enum Ended {
    /// Another instance owns the replica for good (or the replicator stopped: it fences).
    Fenced,
    /// A task this instance cannot serve without ended (see [`keycast_core::vital`]).
    Vital(String),
    /// Another instance (named) asked for the replica before this one served.
    Displaced(String),
}

/// Fault injection: a pause (ms) between taking the replica and marking it served, the window
/// in which another instance may ask for it (fail point `serve-before-marking`).
fn pause_before_serving() -> Option<u64> {
    fail::fail_point!("serve-before-marking", |ms: Option<String>| ms
        .and_then(|m| m.parse().ok()));
    None
}

/// What start-up produced.
struct Running {
    db: Db,
    replicator: Option<Replicator>,
    /// This instance among the others on one PostgreSQL database; `None` on SQLite.
    cluster: Option<Arc<Cluster>>,
    services: Services,
    /// Writes the signer's buffered activity about once a second; `None` for a one-off command.
    flusher: Option<AbortHandle>,
    /// The master key, and the previous one during a rotation.
    keyring: Arc<Keyring>,
    /// The background master-key rotation, while `KEYCAST_MASTER_KEY_PREVIOUS` is set.
    rotation: Option<tokio::task::JoinHandle<()>>,
}

/// What [`start`] starts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// `keycast serve`: the background writes, and on PostgreSQL a member of the cluster.
    Serve,
    /// A command that works on the database and stops (`master-key rotate`): neither. It
    /// answers no request, so it caches nothing another instance must hear of; as a member it
    /// would own bunkers it never answers and be waited for on every change.
    OneOff,
}

impl Running {
    /// Serving with no replicator and no other instances: SQLite without a replica, or a
    /// one-off command.
    fn alone(db: Db, services: Services, flusher: Option<AbortHandle>, keyring: Arc<Keyring>) -> Running {
        Running {
            db,
            replicator: None,
            cluster: None,
            services,
            flusher,
            keyring,
            rotation: None,
        }
    }
}

/// Builds the domain services over the open database: the master key (checked against
/// the stored keys), the password hasher and the signer, and, to serve, starts the
/// background writes.
async fn services(
    config: &Config,
    db: &Db,
    replica: Option<Monitor>,
    vitals: &Vitals,
    purpose: Purpose,
) -> anyhow::Result<(Services, Option<AbortHandle>, Arc<Keyring>)> {
    let keyring = crate::master_key::load(&config.master_key, config.master_key_previous.as_ref(), db).await?;
    let km: Arc<dyn KeyManager> = keyring.clone();
    let queue = keycast_core::HashingQueue::new(config.hash_memory_mib, config.hash_queue);
    let hasher = PasswordHasher::with_queue(PasswordParams::default(), queue).context("password hashing parameters")?;
    let options = SignerOptions {
        cache_ttl: config.cache_ttl,
        activity_kept_per_grant: config.activity_per_grant,
        max_live_grants: config.max_grants_per_account,
        approvals: keycast_core::approval::ApprovalOptions {
            ttl_secs: config.approval_ttl_secs,
            public_url: config.public_url.clone().unwrap_or_default(),
        },
        ..SignerOptions::default()
    };
    let signer = Arc::new(Signer::new(db.clone(), km.clone(), options));
    if let Some(monitor) = &replica {
        crate::last_writes::hand_over_activity(monitor, &signer);
    }
    let flusher = (purpose == Purpose::Serve).then(|| {
        vitals.spawn(
            "the activity flusher",
            background_writes(
                signer.clone(),
                db.clone(),
                replica,
                config.activity_flush_every(),
                config.sweep_interval,
            ),
        )
    });
    Ok((
        Services {
            signer,
            keys: km,
            hasher,
        },
        flusher,
        keyring,
    ))
}

/// The writes no request makes, forever (aborted at shutdown, which then flushes once
/// more), and only while this instance may write:
/// - flushes the signer's activity buffer every `flush_every` (`KEYCAST_ACTIVITY_FLUSH_MS`,
///   a second by default). Each flush with records is one commit, hence one upload to the
///   replica: the interval trades the records' loss window for object-store requests;
/// - removes expired sessions, tokens and codes every `sweep_every`
///   (`KEYCAST_SWEEP_INTERVAL_SECS`, an hour), so the database does not grow by every login
///   and token refresh for good.
async fn background_writes(
    signer: Arc<Signer>,
    db: Db,
    replica: Option<Monitor>,
    flush_every: Duration,
    sweep_every: Duration,
) {
    let mut tick = tokio::time::interval(flush_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        fail::fail_point!("activity-flusher", |_| ());
        if let Some(monitor) = &replica {
            // While the lease cannot be confirmed (the store unreachable) a commit would
            // never ship, and the WAL, in memory on Cloud Run, would grow by one a second for
            // as long as the outage lasts; the buffer is bounded and counts what it drops.
            // Asked only with records to write: asking renews an idle lease.
            let idle = signer.pending_activity() == 0 && last_sweep.is_some_and(|at| at.elapsed() < sweep_every);
            if !accepts_writes(monitor) || (!idle && monitor.check_writable().await.is_err()) {
                continue;
            }
        }
        // Each step bounded: on a database connection the network dropped without a word a
        // statement waits for good, and this task with it while nothing reports it ended.
        match tokio::time::timeout(FLUSH_WITHIN, signer.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, pending = signer.pending_activity(), "could not write signing activity; will retry")
            }
            Err(_) => tracing::warn!(
                pending = signer.pending_activity(),
                "writing signing activity did not finish in time; will retry"
            ),
        }
        if last_sweep.is_none_or(|at| at.elapsed() >= sweep_every) {
            last_sweep = Some(std::time::Instant::now());
            let forgotten = signer.forget_idle_usage(keycast_db::now_unix());
            if forgotten > 0 {
                tracing::debug!(forgotten, "let go of the usage counts of grants idle for a day");
            }
            let swept = keycast_db::within(
                SWEEP_WITHIN,
                keycast_core::housekeeping::sweep_expired(&db, keycast_db::now_unix()),
            )
            .await;
            match swept {
                Ok(swept) if swept.total() > 0 => tracing::info!(?swept, "removed expired sessions, tokens and codes"),
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "could not remove expired sessions and tokens; will retry"),
            }
        }
    }
}

/// Tells the lease this instance finished starting, so the instance it took over from never
/// takes the replica back from under it (see `Lease::mark_serving`). Retried briefly: without
/// it a healthy instance could lose the lease to its predecessor while idle.
///
/// # Errors
/// The lease was lost meanwhile (fenced).
async fn mark_serving(replicator: &Replicator) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match replicator.mark_serving().await {
            Ok(()) => return Ok(()),
            Err(e @ keycast_replica::ReplicaError::LeaseLost { .. }) => return Err(e.into()),
            Err(e) if attempt >= 5 => {
                tracing::warn!(error = %e, "cannot mark the replica lease as serving; going on (the next write renews it)");
                return Ok(());
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await,
        }
    }
}

/// Restore-before-serve, open the database, start replication. A start-up that fails after
/// taking the lease gives it back, so the instance it was taken from can take it again at
/// once (a deploy that fails must not leave nobody writing).
async fn start(
    config: &Config,
    vitals: &Vitals,
    mut stop: tokio::sync::watch::Receiver<bool>,
    purpose: Purpose,
) -> anyhow::Result<Running> {
    prepare_directories(config)?;
    let database_path = match &config.database {
        Database::Postgres(pg) => return start_postgres(config, pg, vitals, purpose).await,
        Database::Sqlite { path, .. } => path.as_path(),
    };
    let Some(replica) = &config.replica else {
        tracing::warn!("KEYCAST_REPLICA_URL=none: the database is not replicated and is lost with this disk");
        let db = Db::open_sqlite(&sqlite_options(config, database_path)).await?;
        let (services, flusher, keyring) = services(config, &db, None, vitals, purpose).await?;
        return Ok(Running::alone(db, services, flusher, keyring));
    };
    if let Some(replica_key) = &replica.encryption {
        crate::master_key::refuse_replica_key(&config.master_key, config.master_key_previous.as_ref(), replica_key)?;
    }
    let store = crate::replication::open_store(replica)?;
    if store.backend() == keycast_replica::store::Backend::File {
        tracing::warn!(replica = %store.describe(), "replicating to a local directory: fine for development, but it does not survive losing this machine; set KEYCAST_REPLICA_URL to object storage (s3://, gs://, az://) in production");
    }
    // Both only read or touch objects of their own, so they run side by side: six requests
    // (of nine) and two, one after another, on a cold start's critical path.
    tokio::try_join!(
        crate::replication::check_conditional_writes(&store, replica),
        crate::replication::check_encryption_key(&store),
    )?;
    if replica.lease.wait <= replica.lease.ttl + replica.lease.margin() {
        // An idle holder renews nothing, so it never sees a newcomer's request: the newcomer
        // waits its lease out (TTL and margin) and gives up first.
        tracing::warn!(
            wait_secs = replica.lease.wait.as_secs(),
            ttl_secs = replica.lease.ttl.as_secs(),
            "KEYCAST_REPLICA_LEASE_WAIT_SECS is not longer than KEYCAST_REPLICA_LEASE_TTL_SECS plus a fifth: a deploy onto an idle instance gives up before its lease lapses"
        );
    }
    let mut lease = crate::replication::acquire_lease(&store, replica).await?;
    // How far the replica must reach, once the mark is believed: a mark that whoever holds the
    // bucket could have lowered (no valid MAC on an encrypted replica) is refused.
    let recorded = match lease.confirm_mark().await {
        Ok(recorded) => recorded,
        Err(e) => {
            give_back(lease).await;
            return Err(e.into());
        }
    };
    // A large restore may outlast the lease: keep it renewed meanwhile.
    let clock = lease.clock();
    let opened = tokio::select! {
        opened = keep_alive_while(&mut lease, open_replicated(config, database_path, &store, recorded, &clock)) => opened?,
        // (A dropped sender is no stop: the branch is then disabled.)
        Ok(_) = stop.wait_for(|stop| *stop) => Err(StoppedDuringStartup.into()),
    };
    let (db, signal, lineage) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            give_back(lease).await;
            return Err(e);
        }
    };
    let replicator = match crate::replication::start(database_path, store, signal, &lineage, replica, lease).await {
        Ok(replicator) => replicator,
        Err(e) => {
            db.close().await;
            return Err(e);
        }
    };
    match services(config, &db, Some(replicator.monitor()), vitals, purpose).await {
        Ok((services, flusher, keyring)) => Ok(Running {
            db,
            replicator: Some(replicator),
            cluster: None,
            services,
            flusher,
            keyring,
            rotation: None,
        }),
        Err(e) => {
            db.close().await;
            let deadline = Instant::now() + config.shutdown_grace;
            if let Err(stop) = replicator.shutdown(deadline).await {
                tracing::warn!(error = %stop, "could not stop replication cleanly after the failed start-up");
            }
            Err(e)
        }
    }
}

/// The part of start-up done under the lease before replication starts: decide what to serve
/// (restoring if needed), open and migrate the database, and read or set its lineage.
async fn open_replicated(
    config: &Config,
    database_path: &Path,
    store: &keycast_replica::Store,
    recorded: Option<u64>,
    lease: &LeaseClock,
) -> anyhow::Result<(Db, Arc<CommitSignal>, String)> {
    crate::replication::prepare(database_path, store, recorded, lease).await?;
    let signal = CommitSignal::new();
    // Unshipped commits (a crash's, an operator command's, these migrations') are in the WAL
    // only, and SQLite folds it into the file when the last connection closes. On a clean stop
    // the replicator's connections close last, after its final sync, and fold it then; a
    // start that fails before that must leave the WAL for the next start to ship, which
    // otherwise finds it gone under its record, takes that for a power loss, and restores
    // over the commits.
    let options = DbOptions {
        commit_signal: Some(signal.clone()),
        keep_wal_on_close: true,
        ..sqlite_options(config, database_path)
    };
    let db = Db::open_sqlite(&options).await?;
    match keycast_db::meta::ensure_lineage(&db, &random_id()).await {
        Ok(lineage) => Ok((db, signal, lineage)),
        Err(e) => {
            db.close().await;
            Err(e.into())
        }
    }
}

/// The SQLite pool settings from the configuration.
fn sqlite_options(config: &Config, path: &Path) -> DbOptions {
    let mut options = DbOptions::new(path);
    if let Database::Sqlite { max_connections, .. } = &config.database {
        options.max_connections = *max_connections;
    }
    options
}

/// Start-up on PostgreSQL: no replicator and no lease (the server keeps the data and any
/// number of instances write it); migrations run once however many instances start
/// together (see [`open_postgres`]).
async fn start_postgres(
    config: &Config,
    pg: &PostgresConfig,
    vitals: &Vitals,
    purpose: Purpose,
) -> anyhow::Result<Running> {
    let db = open_postgres(pg).await?;
    tracing::info!(database = %pg.options.describe(), pool = pg.options.max_connections, "connected to PostgreSQL");
    let (services, flusher, keyring) = match services(config, &db, None, vitals, purpose).await {
        Ok(started) => started,
        Err(e) => {
            db.close().await;
            return Err(e);
        }
    };
    if purpose == Purpose::OneOff {
        return Ok(Running::alone(db, services, flusher, keyring));
    }
    let options = ClusterOptions {
        instance_ttl: pg.instance_ttl,
        vitals: vitals.clone(),
        master_key_ids: keyring.ids(),
        ..ClusterOptions::default()
    };
    match Cluster::start(db.clone(), &pg.session(), services.signer.clone(), options).await {
        Ok(cluster) => Ok(Running {
            db,
            replicator: None,
            cluster: Some(cluster),
            services,
            flusher,
            keyring,
            rotation: None,
        }),
        Err(e) => {
            if let Some(flusher) = flusher {
                flusher.abort();
            }
            db.close().await;
            Err(anyhow::Error::new(e).context("cannot join the other instances on this database (LISTEN needs a session: KEYCAST_DATABASE_DIRECT_URL)"))
        }
    }
}

/// Connects the pool and migrates. Migrations hold a session advisory lock, so behind a
/// transaction-mode pooler they go through `KEYCAST_DATABASE_DIRECT_URL` instead.
async fn open_postgres(pg: &PostgresConfig) -> anyhow::Result<Db> {
    match &pg.direct {
        None => Ok(Db::open_postgres(&pg.options).await?),
        Some(direct) => {
            let session = Db::open_postgres(direct).await.context("KEYCAST_DATABASE_DIRECT_URL")?;
            session.close().await;
            Ok(Db::connect_postgres(&pg.options).await?)
        }
    }
}

/// Start-up stopped by a SIGTERM before it finished (the lease given back).
#[derive(Debug, thiserror::Error)]
#[error("stopped before start-up finished")]
struct StoppedDuringStartup;

/// Releases the lease after a start-up that failed before replication started.
async fn give_back(lease: keycast_replica::lease::Lease) {
    match lease.release().await {
        Ok(()) => tracing::info!("start-up failed: released the replica lease"),
        Err(e) => tracing::warn!(error = %e, "start-up failed and the replica lease could not be released; it lapses"),
    }
}

/// 128 random bits, hex: a new database's lineage.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn prepare_directories(config: &Config) -> anyhow::Result<()> {
    check_local_disk(config)?;
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {} (KEYCAST_DATA_DIR)",
            config.data_dir.display()
        )
    })?;
    if let Some(parent) = config.database.sqlite_path().and_then(Path::parent) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the database directory {}", parent.display()))?;
    }
    if let Some(db) = config.database.sqlite_path() {
        keep_private(db)?;
    }
    Ok(())
}

/// A database an earlier keycast created under the usual umask (0644) stays readable by
/// every local user, and SQLite gives its WAL, shared memory and journal the database's own
/// mode whatever keycast's umask: its mode, and theirs, lose the bits other users had.
fn keep_private(db: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in std::iter::once("").chain(keycast_replica::restore::SIDE_FILES) {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        let path = std::path::PathBuf::from(path);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                .with_context(|| format!("cannot make {} private to keycast's user", path.display()))?;
            tracing::info!(file = %path.display(), was = format!("{:o}", mode & 0o777), "made the database private to keycast's user");
        }
    }
    Ok(())
}

/// Refuses a database directory on a network or FUSE filesystem (before anything is
/// created there), unless `KEYCAST_ALLOW_NETWORK_FILESYSTEM` says to go on. PostgreSQL
/// keeps no file here.
fn check_local_disk(config: &Config) -> anyhow::Result<()> {
    let Some(path) = config.database.sqlite_path() else {
        return Ok(());
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    match crate::local_disk::check(dir) {
        Ok(()) => Ok(()),
        Err(crate::local_disk::CheckError::Network(e)) if config.allow_network_filesystem => {
            tracing::warn!(
                dir = %e.dir.display(), kind = e.kind, mount = %e.point, fstype = %e.fstype,
                "KEYCAST_ALLOW_NETWORK_FILESYSTEM=true: keeping the database on a {} filesystem; SQLite's locks are not reliable there, so never let a second process open it",
                e.kind
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The longest one flush of signing activity may take (its batches' writes are bounded by
/// half that). What it had not taken stays buffered; a batch whose write was under way still
/// lands, unless that write fails too (then those records are lost: activity only).
const FLUSH_WITHIN: Duration = Duration::from_secs(60);

/// The longest one sweep of expired rows may take (the next sweep goes on where it stopped).
const SWEEP_WITHIN: Duration = Duration::from_secs(300);

/// How long a stopping instance tries to deregister from the others (PostgreSQL).
const LEAVE_LIMIT: Duration = Duration::from_secs(1);

/// How long shutdown leaves the relay connections open after the last NIP-46 request
/// finished, for the replies still queued to them.
const REPLIES_SETTLE: Duration = Duration::from_millis(300);

async fn shut_down(
    config: Config,
    asked: Instant,
    stop_http: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    running: Running,
    nip46: Option<keycast_nip46::Nip46Service>,
) -> anyhow::Result<()> {
    let grace = config.shutdown_grace;
    let deadline = asked + grace;
    // The final sync must not be starved by slow requests: they get the grace period minus
    // this reserve, and are cut off after it.
    let reserve = (grace / 4).max(Duration::from_secs(1)).min(grace / 2);
    let drain_until = deadline - reserve;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: no new connections, finishing in-flight requests"
    );
    let _ = stop_http.send(());
    let abort = server.abort_handle();
    let cut_short = tokio::time::timeout_at(drain_until.into(), server).await.is_err();
    if cut_short {
        abort.abort();
        tracing::error!(
            reserve_ms = reserve.as_millis() as u64,
            "in-flight requests did not finish in time: cut off, keeping the rest of the grace period for the final sync"
        );
    }
    // NIP-46 requests under way (the listener stopped taking new ones) record their activity
    // before the last flush, and reply while the relays are still connected.
    let signer = &running.services.signer;
    if !signer
        .drain(drain_until.saturating_duration_since(Instant::now()))
        .await
    {
        tracing::warn!("NIP-46 requests under way did not finish in time; their activity may be missing");
    }
    let seen = nip46.as_ref().map(|nip46| nip46.seen());
    if let Some(nip46) = nip46 {
        // Replies are queued to the relays' connections without waiting for the relays'
        // `OK`; closing the connections drops what is still queued, so they get a moment.
        tokio::time::sleep(REPLIES_SETTLE.min(drain_until.saturating_duration_since(Instant::now()))).await;
        // Closing each relay's connection waits on the relay: one that stopped answering must
        // not eat the time the final sync and the lease's release need.
        let close_by = drain_until.max(Instant::now() + REPLIES_SETTLE);
        if tokio::time::timeout_at(close_by.into(), nip46.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the NIP-46 relays did not close in time; going on with the final sync");
        }
    }
    if let Some(flusher) = &running.flusher {
        flusher.abort();
    }
    // Each re-encrypted key is one atomic swap: stopping between two loses nothing, and the
    // next start continues.
    if let Some(rotation) = &running.rotation {
        rotation.abort();
    }
    // The lease is confirmed first (renewed if due, within the drain deadline): an idle instance whose lease
    // lapsed and was taken (a deploy's newcomer waits that out when nobody writes here) learns
    // it now and steps aside. Before, it wrote its last rows, found at the final sync that
    // they could never ship, and was fenced: an exit as if writes had been lost, and a page.
    let writable = match &running.replicator {
        None => true,
        Some(r) => {
            let monitor = r.monitor();
            let by = drain_until.max(Instant::now() + reserve / 4);
            accepts_writes(&monitor)
                && matches!(
                    tokio::time::timeout_at(by.into(), monitor.check_writable()).await,
                    Ok(Ok(()))
                )
        }
    };
    let handing_over = running.replicator.as_ref().map(Replicator::monitor).filter(|m| {
        let status = m.status();
        status.handing_over_to.is_some() && !status.fenced && !status.superseded
    });
    if let Some(monitor) = handing_over {
        // The hand-over writes these same rows before it locks the database, unless the
        // SIGTERM came first (asked for while the worker was busy with a round): the final
        // sync, which then ships the tail to the newcomer, writes nothing. Written here once.
        let by = drain_until.max(Instant::now() + reserve / 4);
        if tokio::time::timeout_at(by.into(), monitor.write_before_handover())
            .await
            .is_err()
        {
            tracing::warn!("writing the last signing activity before the hand-over took too long; it is not recorded");
        }
    } else if !writable {
        // Handed over, superseded, fenced or unconfirmed: no commit made now would ship.
        tracing::warn!(
            records = running.services.signer.pending_activity(),
            "signing activity since the replica was handed over is not recorded"
        );
    } else {
        // The activity first: it is what a grant's limits count. Then the NIP-46 requests
        // seen, which the next instance drops if a relay replays them.
        let last_writes = async {
            let flushed = running.services.signer.flush().await;
            if let Some(seen) = &seen {
                crate::last_writes::write_seen_requests(seen, &running.db).await;
            }
            flushed
        };
        match tokio::time::timeout_at(drain_until.max(Instant::now() + reserve / 4).into(), last_writes).await {
            Ok(Ok(rows)) => tracing::info!(rows, "flushed buffered signing activity"),
            Ok(Err(err)) => tracing::warn!(error = %err, "could not write the last signing activity"),
            Err(_) => tracing::warn!("writing the last signing activity took too long; it is not recorded"),
        }
    }
    // Everything this instance changed is written and announced.
    if let Some(cluster) = &running.cluster {
        cluster.close();
    }
    let close_until = drain_until.max(Instant::now()) + reserve / 2;
    let closed = tokio::time::timeout_at(close_until.into(), running.db.close())
        .await
        .is_ok();
    if !closed {
        tracing::error!("the database pool did not close in time; shipping what is committed anyway");
    }
    if let Some(replicator) = running.replicator {
        crate::replication::stop(replicator, deadline).await?;
    }
    if cut_short || !closed {
        anyhow::bail!(
            "in-flight requests did not finish within the {} s grace period (everything committed was replicated)",
            grace.as_secs_f64()
        );
    }
    tracing::info!(
        elapsed_ms = asked.elapsed().as_millis() as u64,
        "keycast stopped cleanly"
    );
    Ok(())
}

/// False once the replicator refuses writes (handing the replica over, or fenced): writing
/// then would only wait on the write lock the hand-over holds, or never ship.
fn accepts_writes(monitor: &Monitor) -> bool {
    let status = monitor.status();
    !status.fenced && status.handing_over_to.is_none()
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

/// Opens the configured database (migrating it), for commands that run beside or before
/// `serve` (`migrate`, `clients`). On SQLite the writes land in the WAL, which a running
/// keycast's replicator ships within a second or two, or the next start does. A replicated
/// SQLite database is opened only when what it writes will reach the replica (see
/// [`refuse_unreplicated_writes`]).
///
/// # Errors
/// As for start-up.
pub async fn open_database(config: &Config, access: Access) -> anyhow::Result<Db> {
    if let (Database::Sqlite { path, .. }, Some(replica)) = (&config.database, &config.replica) {
        refuse_unreplicated_writes(path, replica, access).await?;
    }
    prepare_directories(config)?;
    Ok(match (&config.database, access) {
        (Database::Sqlite { path, .. }, Access::Read) if !path.exists() => {
            anyhow::bail!(
                "no keycast database at {} (DATABASE_URL, KEYCAST_DATA_DIR)",
                path.display()
            )
        }
        (Database::Sqlite { path, .. }, _) => {
            // Whether or not this command was told of the replica: `serve` ships from the WAL
            // what this commits, also after a crash left commits in it unshipped.
            let mut options = sqlite_options(config, path);
            options.keep_wal_on_close = true;
            match access {
                // A command that only reads migrates nothing (a newer binary run against a
                // database another revision serves would change its schema under it).
                Access::Read => Db::open_sqlite_as_is(&options).await?,
                Access::Write => Db::open_sqlite(&options).await?,
            }
        }
        (Database::Postgres(pg), Access::Read) => Db::open_postgres_as_is(&pg.options).await?,
        (Database::Postgres(pg), Access::Write) => open_postgres(pg).await?,
    })
}

/// Refuses a command's writes to the replicated SQLite database at `path` that would not
/// reach the replica:
/// - no file, beside a replica with data: a new database the replica knows nothing of,
///   which `serve` refuses to start on. (Beside an empty replica `serve` adopts it: a first
///   start.)
/// - unless the keycast holding the replica has it open, a copy start-up would not resume
///   (as `bootstrap` judges it): of another lineage, ahead of the replica, behind it (another
///   instance wrote since), without a replication record, or whose WAL lost what was shipped.
///   The next start refuses it or restores over it, and the change is gone.
async fn refuse_unreplicated_writes(path: &Path, replica: &ReplicaConfig, access: Access) -> anyhow::Result<()> {
    use keycast_replica::bootstrap::{judge, Verdict};
    let store = crate::replication::open_store(replica)?;
    let shown = keycast_db::pool::redact_url(&replica.url);
    if !path.exists() {
        if store.max_txid().await? > 0 {
            anyhow::bail!(
                "there is no database at {} and KEYCAST_REPLICA_URL ({shown}) is set: `keycast serve` restores it from the replica before anything else may use it; run this where keycast serves, or `keycast restore` the replica here first",
                path.display()
            );
        }
        return Ok(());
    }
    // Reading an existing copy writes nothing the replica could miss (and needs no store).
    if access == Access::Read {
        return Ok(());
    }
    // Beside the keycast that holds the replica, its replicator ships what this commits (it
    // looks for commits it did not make every second), and its record is a moment behind each
    // upload. Any other process with the file open (an `sqlite3` session, an instance that
    // handed over) ships nothing: the copy is judged as if nobody had it open.
    let opened_by = keycast_replica::db_file::opened_elsewhere(path)
        .with_context(|| format!("cannot tell whether {} is in use", path.display()))?;
    if let Some(pid) = opened_by {
        let holder = keycast_replica::lease::holder(&store).await?;
        let prefix = crate::replication::instance_prefix(pid);
        if holder.is_some_and(|h| !h.released && h.owner.starts_with(&prefix)) {
            return Ok(());
        }
    }
    let remote = keycast_replica::store::tip(&store.list_recent().await?);
    if remote == 0 {
        // An empty replica adopts the copy at the next start.
        return Ok(());
    }
    let at = path.display();
    let Some(record) = keycast_replica::local_state::load(path).with_context(|| {
        format!("cannot read the replication record of {at}: the next start restores over this copy")
    })?
    else {
        anyhow::bail!(
            "the database at {at} has no replication record, and the replica ({shown}) holds data: `keycast serve` \
             refuses to start on it, so a change made here would never reach the replica"
        );
    };
    // What start-up will make of this copy (`bootstrap::judge`, the same function).
    match judge(path, &record, &store, remote).await? {
        Verdict::Resume => Ok(()),
        Verdict::OtherLineage { .. } => anyhow::bail!(
            "the database at {at} is not the one the replica ({shown}) holds (another lineage): `keycast serve` \
             refuses it, so a change made here would never reach the replica"
        ),
        Verdict::Ahead => anyhow::bail!(
            "the database at {at} is at TXID {} but the replica ({shown}) reaches only TXID {remote}: objects are \
             missing from the replica, and `keycast serve` refuses this copy until that is settled",
            record.txid
        ),
        Verdict::Behind => anyhow::bail!(
            "the database at {at} is at TXID {} but the replica ({shown}) has reached TXID {remote}: another instance \
             has written since, and the next `keycast serve` here restores over this copy, taking any change made \
             here with it. Run this where keycast serves (or through its admin API), or let `keycast serve` restore \
             here first",
            record.txid
        ),
        Verdict::WalLost => anyhow::bail!(
            "the WAL beside the database at {at} no longer holds commits its replication record says were shipped \
             (a power loss, or another program closing it): the next `keycast serve` here restores over this \
             copy, taking any change made here with it. Let `keycast serve` start here first"
        ),
    }
}

/// What a command does with the database [`open_database`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only (`keycast clients list`).
    Read,
    /// Writes (`keycast migrate`, `clients add`, `clients remove`).
    Write,
}

/// `keycast migrate`: open the database, apply pending migrations, close it.
///
/// # Errors
/// As for start-up.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let db = open_database(config, Access::Write).await?;
    tracing::info!(version = keycast_db::migrate::latest_version(), "database is migrated");
    db.close().await;
    Ok(())
}

/// `keycast migrate --to postgres://…`: copies the SQLite database (`DATABASE_URL`, or
/// `restored`: a replica restored by `--from-replica`) into an empty PostgreSQL database
/// in one verified transaction (`keycast_db::copy`) and prints each table's row count and
/// checksum. Stop keycast first: writes made during the copy would stay behind. Start keycast on PostgreSQL afterwards with the same master key.
///
/// # Errors
/// The source is not SQLite or does not exist, the target is not PostgreSQL, cannot be
/// reached or is not empty, or verification failed (then the target is left as it was).
pub async fn copy_to_postgres(config: &Config, to: &str, restored: Option<&Path>) -> anyhow::Result<()> {
    let path = match (restored, &config.database) {
        (Some(restored), _) => restored,
        (None, Database::Sqlite { path, .. }) => path.as_path(),
        (None, Database::Postgres(_)) => {
            anyhow::bail!("keycast migrate --to copies from SQLite, but DATABASE_URL is already PostgreSQL")
        }
    };
    crate::config::check_postgres_url(to).map_err(|reason| anyhow::anyhow!("--to: {reason}"))?;
    if !path.exists() {
        anyhow::bail!(
            "no SQLite database at {} to copy (DATABASE_URL, KEYCAST_DATA_DIR)",
            path.display()
        );
    }
    // A keycast serving the file would go on writing after the copy began, and those writes
    // would stay behind (and the copy would migrate the file under it).
    if restored.is_none() {
        let opened_by = keycast_replica::db_file::opened_elsewhere(path)
            .with_context(|| format!("checking whether a keycast has {} open", path.display()))?;
        if let Some(pid) = opened_by {
            anyhow::bail!(
                "a process (pid {pid}) has {} open, a keycast still serving it? stop keycast before moving: \
                 what it writes after the copy starts would stay behind; nothing was copied",
                path.display()
            );
        }
    }
    // The live database, perhaps with commits a crash left unshipped in its WAL: closing the
    // copy's connections must not fold them in behind `serve`'s back.
    let source = Db::open_sqlite(&DbOptions {
        keep_wal_on_close: true,
        ..sqlite_options(config, path)
    })
    .await?;
    let target_options = keycast_db::PgOptions::new(to);
    // Looked at before anything is created there: a database with tables keycast does not
    // make is another application's (a wrong --to), and keycast's schema is not written in.
    let target = Db::connect_postgres(&target_options).await.context("--to")?;
    let foreign = keycast_db::copy::foreign_tables(&source, &target).await;
    let foreign = match foreign {
        Ok(foreign) if foreign.is_empty() => Ok(()),
        Ok(foreign) => Err(anyhow::anyhow!(
            "--to {}: the database holds tables keycast does not make ({}); it is not an empty database for keycast, and nothing was written to it",
            target_options.describe(),
            foreign.join(", ")
        )),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = foreign {
        source.close().await;
        target.close().await;
        return Err(e);
    }
    if let Err(e) = keycast_db::migrate::run(&target).await {
        source.close().await;
        target.close().await;
        return Err(anyhow::Error::new(e).context("--to"));
    }
    let copied = keycast_db::copy::sqlite_to_postgres(&source, &target).await;
    source.close().await;
    target.close().await;
    let reports = copied?;
    let rows: u64 = reports.iter().map(|r| r.rows).sum();
    for report in &reports {
        println!(
            "{:<24} {:>10} rows  checksum {}",
            report.table, report.rows, report.checksum
        );
    }
    println!(
        "copied {rows} rows in {} tables from {} to {}; counts and checksums match. Start keycast with DATABASE_URL set to it and the same master key.",
        reports.len(),
        path.display(),
        target_options.describe()
    );
    Ok(())
}

/// `keycast master-key rotate`: start as `serve` does (on SQLite with a replica: restore if
/// needed, take the lease, replicate), re-encrypt up to `limit` stored keys under the
/// current master key and verify them all, then stop as `serve` does, so everything
/// rewritten is in the replica before the outcome is printed. On PostgreSQL, unless
/// `force`, first refuses while a serving instance cannot open the new key
/// ([`crate::rotation::refuse_instances_without_the_key`]).
///
/// # Errors
/// As for start-up; a rotation error; an incomplete rotation (see
/// [`crate::rotation::report`]).
pub async fn rotate_master_key(config: &Config, limit: Option<u64>, as_json: bool, force: bool) -> anyhow::Result<()> {
    let (_never, no_stop) = tokio::sync::watch::channel(false);
    let running = start(config, &Vitals::default(), no_stop, Purpose::OneOff).await?;
    if matches!(config.database, Database::Postgres(_)) && !force {
        if let Err(refused) = crate::rotation::refuse_instances_without_the_key(&running.db, &running.keyring).await {
            running.db.close().await;
            return Err(refused);
        }
    }
    let outcome = keycast_core::rotation::rotate(&running.db, &running.keyring, limit).await;
    running.db.close().await;
    if let Some(replicator) = running.replicator {
        crate::replication::stop(replicator, Instant::now() + config.shutdown_grace).await?;
    }
    crate::rotation::report(&outcome?, &running.keyring, as_json)
}
