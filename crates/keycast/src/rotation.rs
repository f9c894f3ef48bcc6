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

/// How far back `keycast master-key rotate` looks for instances on PostgreSQL: longer than
/// any TTL, so an instance the platform paused for a while still counts; a cleanly stopped
/// one removed its row.
pub const INSTANCES_HEARD_WITHIN: std::time::Duration = std::time::Duration::from_secs(600);

/// On PostgreSQL, refuses a rotation to `ring`'s current key while an instance heard from
/// lately does not have it as its own current key (`KEYCAST_MASTER_KEY`). One without it
/// would fail every signature once the stored keys are under it and its cache expired; one
/// holding it only as the previous key (the second of the two deploys skipped) would go on
/// sealing new keys under the old one, which the last deploy, without the previous key,
/// then refuses to start on (docs/OPERATIONS.md).
///
/// # Errors
/// Such an instance (named, with the keys it holds), or a database error.
pub async fn refuse_instances_without_the_key(db: &Db, ring: &Keyring) -> anyhow::Result<()> {
    let within = i64::try_from(INSTANCES_HEARD_WITHIN.as_millis()).unwrap_or(i64::MAX);
    let new = ring.current().key_id().to_string();
    // Their ids come current key first (`Keyring::ids`).
    let lacking: Vec<String> = keycast_db::cluster::recent_master_keys(db, within)
        .await?
        .into_iter()
        .filter(|i| i.master_key_ids.as_deref().and_then(|ids| ids.split(',').next()) != Some(new.as_str()))
        .map(|i| {
            let holds = i.master_key_ids.map_or(
                "does not say which keys it holds (an older version)".to_owned(),
                |ids| match ids.split_once(',') {
                    Some((current, previous)) => format!("current key {current}, previous {previous}"),
                    None => format!("current key {ids}"),
                },
            );
            format!("{} ({holds}; last heard {} s ago)", i.id, i.silent_ms / 1000)
        })
        .collect();
    if lacking.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "master-key rotation refused: {} instance(s) on this database do not have the new master key {new} as their \
         current key: {}. Without it they fail every signature once the stored keys are under it; with it only as \
         the previous key they go on writing new keys under the old one. Deploy first with \
         KEYCAST_MASTER_KEY_PREVIOUS(_FILE) set to the new key, then with the two swapped (docs/OPERATIONS.md, \
         \"Rotating the master key\"), and run this again; --force rotates anyway (instances you know are gone)",
        lacking.len(),
        lacking.join(", ")
    )
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
