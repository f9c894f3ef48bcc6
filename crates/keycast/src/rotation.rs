//! Master-key rotation from the binary: `keycast master-key rotate`, and the background
//! rotation `keycast serve` runs on SQLite while `KEYCAST_MASTER_KEY_PREVIOUS` is set (on
//! PostgreSQL serving instances only read under both keys: several of them, some still on an
//! older configuration during a deploy, could undo each other's work).
//!
//! Both call `keycast_core::rotation::rotate` on the database the service uses. On SQLite
//! with a replica the command goes through the same start-up as `serve` (restore if the disk
//! is empty, take the replica's lease, replicate), so what it rewrites reaches the replica,
//! and stops the same way (final sync); on PostgreSQL it connects like any instance and may
//! run beside serving instances. See docs/OPERATIONS.md, "Rotating the master key".

use std::sync::Arc;

use keycast_core::rotation::{self, RotationReport};
use keycast_core::{Durability, Keyring};
use keycast_db::Db;

/// How long the background rotation waits between attempts after a failure (a database
/// error, a key neither master key opens, or a replica that did not take the writes).
const RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// Publishes how many stored keys are still not under the current master key.
fn record(report: &RotationReport) {
    metrics::gauge!("keycast_master_key_rotation_remaining").set(report.remaining as f64);
}

/// The background rotation of `keycast serve` with a previous key configured: rotates
/// everything, waits until the rewritten keys are in the replica (`durability`, on SQLite
/// with a replica), then logs that the previous key can go — so an operator who removes it
/// on that word never meets a restore that still needs it. Retries after a failure (logged
/// without any secret), so a transient error does not end it.
pub async fn in_background(db: Db, ring: Arc<Keyring>, durability: Option<Arc<dyn Durability>>) {
    loop {
        match rotation::rotate(&db, &ring, None).await {
            Ok(report) if report.complete() => {
                if let Some(durability) = &durability {
                    if let Err(reason) = durability.wait_durable().await {
                        tracing::warn!(%reason, "master-key rotation: the re-encrypted keys are not in the replica yet; trying again");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
                record(&report);
                tracing::info!(
                    key_id = %ring.current().key_id(),
                    reencrypted = report.reencrypted,
                    verified = report.verified,
                    "master-key rotation complete: every stored key opens under the current master key alone; \
                     remove KEYCAST_MASTER_KEY_PREVIOUS (and, once old replica objects have passed retention, destroy the old key)"
                );
                return;
            }
            Ok(report) => {
                record(&report);
                tracing::warn!(
                    remaining = report.remaining,
                    changed_meanwhile = report.changed_meanwhile,
                    "master-key rotation: some keys were written under the old master key meanwhile (an instance without the new key?); trying again"
                );
            }
            Err(e) => tracing::error!(error = %e, "master-key rotation failed; trying again"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Prints a rotation's outcome (JSON with `--json`) and fails when it is incomplete.
///
/// # Errors
/// An incomplete rotation (stopped by `--limit`, or rows written under the old key meanwhile).
pub fn report(report: &RotationReport, ring: &Keyring, as_json: bool) -> anyhow::Result<()> {
    record(report);
    if as_json {
        let mut value = serde_json::to_value(report)?;
        value["key_id"] = ring.current().key_id().to_string().into();
        value["complete"] = report.complete().into();
        println!("{value}");
    } else {
        println!(
            "re-encrypted {} keys, {} already under the new master key {}, {} changed meanwhile; verified {} under the new key alone; {} remaining",
            report.reencrypted,
            report.already_current,
            ring.current().key_id(),
            report.changed_meanwhile,
            report.verified,
            report.remaining
        );
    }
    if !report.complete() {
        anyhow::bail!(
            "master-key rotation incomplete: {} keys are still under the previous master key; run `keycast master-key rotate` again (it continues where this run stopped)",
            report.remaining
        );
    }
    if !as_json {
        println!("rotation complete: every stored key opens under the new master key alone; remove KEYCAST_MASTER_KEY_PREVIOUS");
    }
    Ok(())
}
