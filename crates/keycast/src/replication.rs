//! Wiring the replicator into `keycast serve`: open the store, restore before serving,
//! start shipping, report health and metrics, and stop cleanly.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use keycast_http::{BoxFuture, Dependency};
use keycast_replica::bootstrap::{self, Bootstrap};
use keycast_replica::lease::{Lease, LeaseClock};
use keycast_replica::replicator::Monitor;
use keycast_replica::store::{ConditionalWriteError, StoreError};
use keycast_replica::{CommitSignal, Replicator, Store};

use crate::config::ReplicaConfig;

/// Opens the configured store; errors name `KEYCAST_REPLICA_URL`.
///
/// # Errors
/// An unusable URL or missing credentials variable.
pub fn open_store(config: &ReplicaConfig) -> anyhow::Result<Store> {
    let store = Store::from_url(&config.url, &|name| std::env::var(name).ok())
        .with_context(|| {
            format!(
                "invalid configuration: KEYCAST_REPLICA_URL={}",
                keycast_db::pool::redact_url(&config.url)
            )
        })?
        .context("KEYCAST_REPLICA_URL=none was handled before")?;
    Ok(match &config.encryption {
        Some(cipher) => store.with_encryption(cipher.clone()),
        None => store,
    })
}

/// Refuses a store that would let a second writer overwrite the replica: one that accepts
/// a second create-only write or an update from a stale version (some S3-compatible servers
/// ignore those preconditions). Skipped with `KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES=false`.
///
/// # Errors
/// The store ignores a precondition (the message names the store and the setting), or the
/// probe's requests failed.
pub async fn check_conditional_writes(store: &Store, config: &ReplicaConfig) -> anyhow::Result<()> {
    if !config.check_conditional_writes {
        tracing::warn!(replica = %store.describe(), "KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES=false: not checking that the store refuses conflicting writes; if it does not, a second instance can corrupt the replica");
        return Ok(());
    }
    match store.check_conditional_writes().await {
        Ok(()) => Ok(()),
        Err(err @ ConditionalWriteError::Ignored { .. }) => Err(anyhow::anyhow!(
            "{err}. Refusing to start: use a store that honours conditional writes, or set \
             KEYCAST_REPLICA_CHECK_CONDITIONAL_WRITES=false (replica_check_conditional_writes) \
             if no second instance can ever run against this replica"
        )),
        Err(err) => Err(err.into()),
    }
}

/// Reads the replica's newest LTX file with the configured key (or none) before anything is
/// written, so a restart whose `KEYCAST_REPLICA_ENCRYPTION_KEY` is missing, wrong, or newly
/// set on a plaintext replica refuses to start instead of resuming and mixing objects the
/// replica's readers cannot decrypt (a restore needs every object under one key). A restore
/// on an empty disk would read the replica anyway; a resume would not. One list per level
/// and one GET; nothing for an empty replica.
///
/// # Errors
/// The replica's encryption does not match the setting (the message names it), or the
/// store failed.
pub async fn check_encryption_key(store: &Store) -> anyhow::Result<()> {
    let files = store.list_all().await?;
    let Some(newest) = files.iter().max_by_key(|f| (f.max_txid, std::cmp::Reverse(f.size))) else {
        return Ok(());
    };
    match store.get(newest).await {
        Ok(_) => Ok(()),
        Err(StoreError::Crypt(err)) => Err(anyhow::anyhow!(
            "{err}. Refusing to start: the replica {} must be read and written with the key it was written with (nothing was written to it)",
            store.describe()
        )),
        // Gone since the listing (pruned by a previous instance): the next start checks again.
        Err(StoreError::NotFound { .. }) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Takes the single-writer lease, waiting for a live holder to hand it over (a deploy's old
/// instance ships its last frames and releases when asked, or on SIGTERM).
///
/// # Errors
/// The holder did not release within `KEYCAST_REPLICA_LEASE_WAIT_SECS`, or the store failed.
pub async fn acquire_lease(store: &Store, config: &ReplicaConfig) -> anyhow::Result<Lease> {
    let owner = instance_name();
    let lease = Lease::acquire(store, &owner, config.lease).await?;
    tracing::info!(owner = %lease.owner(), epoch = lease.epoch(), "holding the replica lease");
    Ok(lease)
}

/// `<hostname>-<pid>#<random>`: what other instances see as the lease holder. The host name
/// and PID are for people; the random part makes it unique, because in containers every
/// instance may be PID 1 on a host called `localhost`, and a lease held under one's own name
/// counts as one's own.
fn instance_name() -> String {
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).expect("the OS random number generator is unavailable");
    format!(
        "{}{}",
        instance_prefix(std::process::id()),
        random.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// What the lease owner's name of a keycast on this host with process id `pid` starts with
/// (see [`instance_name`]).
pub fn instance_prefix(pid: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{pid}#", if host.is_empty() { "keycast" } else { host })
}

/// Runs the start-up decision (restore, resume, adopt, refuse) and logs it. `recorded` is the
/// high-water mark found in the lease: a replica short of it lost its newest objects. `lease`
/// follows the lease's renewals: nothing is deleted from the replica once it has lapsed.
///
/// # Errors
/// When keycast must not serve: conflicting local and replica state, a truncated replica, a
/// failed restore, or a lease that lapsed before the restore's clean-up.
pub async fn prepare(db: &Path, store: &Store, recorded: Option<u64>, lease: &LeaseClock) -> anyhow::Result<()> {
    match bootstrap::prepare(db, store, recorded, &|| lease.is_valid()).await? {
        Bootstrap::Fresh => {
            tracing::info!(replica = %store.describe(), "no database and an empty replica: starting a new database")
        }
        Bootstrap::Adopt => {
            tracing::info!(replica = %store.describe(), "the replica is empty: the local database seeds it")
        }
        Bootstrap::Resume { txid } => {
            tracing::info!(txid, "the local database matches the replica: resuming")
        }
        Bootstrap::Restored { restored, moved_aside } => tracing::info!(
            txid = restored.txid,
            files = restored.files,
            bytes = restored.bytes,
            moved_aside = moved_aside.as_ref().map(|p| p.display().to_string()),
            "restored the database from the replica"
        ),
    }
    Ok(())
}

/// Starts shipping once the database is open.
///
/// # Errors
/// Store or SQLite errors while aligning with the replica.
pub async fn start(
    db: &Path,
    store: Store,
    signal: Arc<CommitSignal>,
    lineage: &str,
    config: &ReplicaConfig,
    lease: Lease,
) -> anyhow::Result<Replicator> {
    let replicator = Replicator::start_with_lease(db, store, signal, lineage, config.options.clone(), Some(lease))
        .await
        .context("cannot start replication")?;
    tracing::info!(
        replica = %replicator.store().describe(),
        txid = replicator.status().replicated_txid,
        "replicating the database"
    );
    Ok(replicator)
}

/// Final sync within `deadline`, then the exit log line with the replicated TXID.
///
/// # Errors
/// The final sync did not reach the store.
pub async fn stop(replicator: Replicator, deadline: Instant) -> anyhow::Result<()> {
    let txid = replicator
        .shutdown(deadline)
        .await
        .context("the final replication sync failed")?;
    tracing::info!(
        replicated_txid = txid,
        "replication stopped: every committed transaction is in the replica"
    );
    Ok(())
}

/// Durable commit through the replicator: waits up to `timeout` (see
/// `KEYCAST_REPLICA_DURABLE_TIMEOUT_SECS`) before answering 503.
pub struct ReplicaDurability {
    pub monitor: Monitor,
    pub timeout: Duration,
}

/// What a client is told when its change is refused or not confirmed: what happened and that
/// a retry will do, without what the log holds for the operator — the lease holder's host and
/// process, the object store's error (bucket, prefix, service account), TXIDs. Anonymous
/// endpoints (registration, the token endpoint) answer with it.
fn for_clients(e: &keycast_replica::ReplicaError) -> String {
    use keycast_replica::ReplicaError as E;
    match e {
        E::HandingOver { .. } | E::HandedOver { .. } => {
            "this instance is handing the database over to its successor (a deploy or a restart)".into()
        }
        E::Fenced { .. } | E::LeaseLost { .. } | E::ReplicaAhead { .. } | E::ReplicaBehind { .. } | E::Stopped => {
            "this instance no longer holds the database and is being replaced".into()
        }
        E::LeaseUnconfirmed { .. } => {
            "this instance cannot confirm it still holds the database (its object store does not answer)".into()
        }
        E::Timeout(waited) => format!("the object store did not confirm it within {} s", waited.as_secs()),
        _ => "replicating the database is failing".into(),
    }
}

impl keycast_http::Durability for ReplicaDurability {
    fn wait_durable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.monitor
                .wait_durable(self.timeout)
                .await
                .map(|_| ())
                .map_err(|e| for_clients(&e))
        })
    }

    fn check_writable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.monitor.check_writable().await.map_err(|e| for_clients(&e)) })
    }

    fn is_writer(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            !matches!(
                self.monitor.check_writable().await,
                Err(e) if !matches!(e, keycast_replica::ReplicaError::LeaseUnconfirmed { .. })
            )
        })
    }
}

/// Creates, at zero, the counters that deploy/alerts.yaml reads, so that they are on
/// `/metrics` from the start: `increase()` cannot count the first event of a series that did
/// not exist before it.
pub fn register_alerted_counters() {
    for operation in ["put", "get", "list", "delete", "head"] {
        metrics::counter!("keycast_replica_request_errors_total", "operation" => operation).increment(0);
    }
    metrics::counter!("keycast_nip46_dropped_total").increment(0);
    metrics::counter!(keycast_db::DISK_FULL_METRIC).increment(0);
}

/// Replication as a readiness dependency and a metrics source.
pub struct ReplicationHealth {
    pub monitor: Monitor,
    pub unhealthy_after: Duration,
}

impl Dependency for ReplicationHealth {
    fn readiness(&self) -> Result<(), String> {
        let status = self.monitor.status();
        if status.fenced {
            return Err(fenced_message(&status));
        }
        if let Some(to) = status.handing_over_to {
            return Err(match status.handed_over_txid {
                Some(txid) => {
                    format!("the replica was handed over to {to} at TXID {txid}; this instance accepts no writes")
                }
                None => format!("handing the replica over to {to}; this instance accepts no writes"),
            });
        }
        if let Some(since) = status
            .lease_unconfirmed_since
            .filter(|s| s.elapsed() >= self.unhealthy_after)
        {
            return Err(format!(
                "the replica lease has not been confirmed for {} s ({}): writes are refused until the store answers",
                since.elapsed().as_secs(),
                status.lease_error.unwrap_or_default()
            ));
        }
        match status.failing_since {
            Some(since) if since.elapsed() >= self.unhealthy_after => Err(format!(
                "replication has been failing for {} s: {}",
                since.elapsed().as_secs(),
                status.last_error.unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }

    fn liveness(&self) -> Result<(), String> {
        let status = self.monitor.status();
        match status.fenced {
            true => Err(fenced_message(&status)),
            false => Ok(()),
        }
    }

    fn export_metrics(&self) {
        let s = self.monitor.status();
        metrics::gauge!("keycast_replica_txid").set(s.replicated_txid as f64);
        metrics::gauge!("keycast_replica_local_commits").set(s.local_commits as f64);
        metrics::gauge!("keycast_replica_shipped_commits").set(s.shipped_commits as f64);
        metrics::gauge!("keycast_replica_lag_seconds").set(s.lag_seconds);
        let failing = s.failing_since.is_some() || s.lease_unconfirmed_since.is_some();
        metrics::gauge!("keycast_replica_failing").set(if failing { 1.0 } else { 0.0 });
        metrics::gauge!("keycast_replica_fenced").set(if s.fenced { 1.0 } else { 0.0 });
        metrics::gauge!("keycast_replica_handing_over").set(if s.handing_over_to.is_some() { 1.0 } else { 0.0 });
        // This instance is the writer: it holds the lease and accepts writes (the
        // KeycastLeaseLost and KeycastNoWriter alerts of deploy/alerts.yaml).
        let writer = !s.fenced && !s.superseded && s.handing_over_to.is_none() && s.lease_unconfirmed_since.is_none();
        metrics::gauge!("keycast_replica_lease_held").set(if writer { 1.0 } else { 0.0 });
    }
}

fn fenced_message(status: &keycast_replica::Status) -> String {
    format!(
        "replication stopped for good: {} (this instance is fenced and shutting down)",
        status
            .fence_reason
            .as_deref()
            .unwrap_or("another instance took over the replica")
    )
}
