//! Instances sharing one PostgreSQL database: membership by heartbeat
//! (`keycast_instances`) and NIP-46 request claims (`nip46_claims`).
//!
//! Liveness is judged by the **database server's clock** (heartbeats are stamped with
//! it), so instances whose own clocks disagree still agree on who is alive. That makes
//! the membership statements PostgreSQL's own SQL: this module is the one place that
//! uses it, and it refuses to run on SQLite (one instance needs no membership).

use crate::pool::Engine;
use crate::{Db, RepoError};

/// The database server's clock in unix milliseconds (PostgreSQL).
const NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

fn postgres(db: &Db) -> Result<&sqlx::PgPool, RepoError> {
    match db.engine() {
        Engine::Postgres(pool) => Ok(pool),
        Engine::Sqlite(_) => Err(RepoError::Unsupported("instance membership exists on PostgreSQL only")),
    }
}

/// What an instance says of itself with each heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct Abilities<'a> {
    /// The ids of the master keys it can open, comma-separated.
    pub master_key_ids: &'a str,
    /// Whether it answers NIP-46 requests now.
    pub answers_nip46: bool,
}

/// A live instance, as a heartbeat reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// Whether it answers NIP-46 requests (true for a version that does not say).
    pub answers_nip46: bool,
}

/// Records a heartbeat of instance `id` (registering it if new), with what it can do
/// (`abilities`), and returns the instances whose heartbeat is younger than `ttl_ms`, this
/// one included, sorted. It also sends
/// `beat` as a notice ([`crate::notify`]), by which every listener knows its session still
/// hears, and this instance how far its own listening has caught up. One round trip.
///
/// # Errors
/// [`RepoError::Unsupported`] on SQLite; database errors.
pub async fn heartbeat(
    db: &Db,
    id: &str,
    ttl_ms: i64,
    beat: &str,
    abilities: Abilities<'_>,
) -> Result<Vec<Member>, RepoError> {
    // The statement's snapshot does not see its own insert: this instance is added by hand.
    let sql = format!(
        "WITH beat AS (INSERT INTO keycast_instances (id, started_at, heartbeat_at, master_key_ids, answers_nip46) \
                       VALUES ($1, {NOW_MS}, {NOW_MS}, $5, $6) \
                       ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, \
                                                      master_key_ids = EXCLUDED.master_key_ids, \
                                                      answers_nip46 = EXCLUDED.answers_nip46), \
              heard AS (SELECT pg_notify($3, $4)) \
         SELECT id, answers FROM \
             (SELECT id, COALESCE(answers_nip46, 1) AS answers FROM keycast_instances \
               WHERE heartbeat_at > {NOW_MS} - $2 AND id <> $1 \
              UNION ALL SELECT CAST($1 AS TEXT), CAST($6 AS BIGINT)) AS live \
         CROSS JOIN heard ORDER BY id"
    );
    // Built from constants only; the values are bound.
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(ttl_ms)
        .bind(crate::notify::CHANNEL)
        .bind(beat)
        .bind(abilities.master_key_ids)
        .bind(i64::from(abilities.answers_nip46))
        .fetch_all(postgres(db)?)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, answers)| Member {
            id,
            answers_nip46: answers != 0,
        })
        .collect())
}

/// An instance heard from lately and the master keys it said it can open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceKeys {
    pub id: String,
    /// Comma-separated key ids; `None` from a version that does not say.
    pub master_key_ids: Option<String>,
    /// How long ago its last heartbeat was, by the database server's clock.
    pub silent_ms: i64,
}

/// The instances whose heartbeat is younger than `within_ms`, with their master keys, sorted.
///
/// # Errors
/// [`RepoError::Unsupported`] on SQLite; database errors.
pub async fn recent_master_keys(db: &Db, within_ms: i64) -> Result<Vec<InstanceKeys>, RepoError> {
    let sql = format!(
        "SELECT id, master_key_ids, {NOW_MS} - heartbeat_at FROM keycast_instances \
         WHERE heartbeat_at > {NOW_MS} - $1 ORDER BY id"
    );
    let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(within_ms)
        .fetch_all(postgres(db)?)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, master_key_ids, silent_ms)| InstanceKeys {
            id,
            master_key_ids,
            silent_ms,
        })
        .collect())
}

/// Removes instance `id` (a clean shutdown), so the others take its bunkers at once.
///
/// # Errors
/// [`RepoError::Unsupported`] on SQLite; database errors.
pub async fn leave(db: &Db, id: &str) -> Result<(), RepoError> {
    sqlx::query("DELETE FROM keycast_instances WHERE id = $1")
        .bind(id)
        .execute(postgres(db)?)
        .await?;
    Ok(())
}

/// Forgets instances silent for `older_than_ms` and claims older than that; returns how
/// many rows went.
///
/// # Errors
/// [`RepoError::Unsupported`] on SQLite; database errors.
pub async fn purge(db: &Db, older_than_ms: i64) -> Result<u64, RepoError> {
    let pool = postgres(db)?;
    let instances = format!("DELETE FROM keycast_instances WHERE heartbeat_at < {NOW_MS} - $1");
    let claims = format!("DELETE FROM nip46_claims WHERE claimed_at < {NOW_MS} - $1");
    let mut removed = 0;
    for sql in [instances, claims] {
        removed += sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(older_than_ms)
            .execute(pool)
            .await?
            .rows_affected();
    }
    Ok(removed)
}

/// Claims NIP-46 request `event_id` (a request's key: its client and id, or an event id) for
/// instance `id`: true for the one caller that claims it first, false for every other (the
/// request is someone else's to answer).
///
/// # Errors
/// [`RepoError::Unsupported`] on SQLite; database errors.
pub async fn claim(db: &Db, event_id: &str, id: &str) -> Result<bool, RepoError> {
    let sql = format!(
        "INSERT INTO nip46_claims (event_id, instance_id, claimed_at) VALUES ($1, $2, {NOW_MS}) \
         ON CONFLICT (event_id) DO NOTHING"
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(event_id)
        .bind(id)
        .execute(postgres(db)?)
        .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    fn abilities(keys: &str, answers_nip46: bool) -> Abilities<'_> {
        Abilities {
            master_key_ids: keys,
            answers_nip46,
        }
    }

    async fn beat(db: &Db, id: &str, ttl_ms: i64, keys: &str) -> Result<Vec<String>, RepoError> {
        let members = heartbeat(db, id, ttl_ms, "beat", abilities(keys, true)).await?;
        Ok(members.into_iter().map(|m| m.id).collect())
    }

    #[tokio::test]
    async fn live_instances_are_those_with_a_fresh_heartbeat() {
        for (_guard, db) in temp_dbs().await {
            if db.kind() == crate::EngineKind::Sqlite {
                assert!(matches!(
                    beat(&db, "a", 1000, "k1").await,
                    Err(RepoError::Unsupported(_))
                ));
                continue;
            }
            assert_eq!(beat(&db, "b", 60_000, "k1").await.unwrap(), ["b"]);
            assert_eq!(beat(&db, "a", 60_000, "k1,k2").await.unwrap(), ["a", "b"]);
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            beat(&db, "a", 60_000, "k1,k2").await.unwrap();
            assert_eq!(
                beat(&db, "a", 20, "k1,k2").await.unwrap(),
                ["a"],
                "b is silent longer than 20 ms"
            );
            let keys: Vec<_> = recent_master_keys(&db, 60_000)
                .await
                .unwrap()
                .into_iter()
                .map(|i| (i.id, i.master_key_ids))
                .collect();
            assert_eq!(
                keys,
                [("a".into(), Some("k1,k2".into())), ("b".into(), Some("k1".into()))]
            );
            leave(&db, "a").await.unwrap();
            assert_eq!(beat(&db, "b", 60_000, "k1").await.unwrap(), ["b"]);
            assert_eq!(purge(&db, 60_000).await.unwrap(), 0, "b beat just now");
            // Past the millisecond of b's beat (times are in ms: within it, b is not older).
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(purge(&db, 0).await.unwrap(), 1, "and is gone once older than nothing");
        }
    }

    #[tokio::test]
    async fn a_heartbeat_reads_back_who_answers_nip46() {
        for (_guard, db) in temp_dbs().await {
            if db.kind() == crate::EngineKind::Sqlite {
                continue;
            }
            let member = |id: &str, answers_nip46| Member {
                id: id.into(),
                answers_nip46,
            };
            heartbeat(&db, "a", 60_000, "beat", abilities("k", false))
                .await
                .unwrap();
            // A version before the column says nothing: it is taken to answer.
            heartbeat(&db, "old", 60_000, "beat", abilities("k", true))
                .await
                .unwrap();
            crate::pool::on_engine!(&db, |pool| {
                sqlx::query("UPDATE keycast_instances SET answers_nip46 = NULL WHERE id = 'old'")
                    .execute(pool)
                    .await
                    .unwrap();
            });
            assert_eq!(
                heartbeat(&db, "b", 60_000, "beat", abilities("k", true)).await.unwrap(),
                [member("a", false), member("b", true), member("old", true)]
            );
            assert_eq!(
                heartbeat(&db, "b", 60_000, "beat", abilities("k", false))
                    .await
                    .unwrap(),
                [member("a", false), member("b", false), member("old", true)]
            );
        }
    }

    #[tokio::test]
    async fn a_request_is_claimed_once() {
        for (_guard, db) in temp_dbs().await {
            if db.kind() == crate::EngineKind::Sqlite {
                continue;
            }
            assert!(claim(&db, "e1", "a").await.unwrap());
            assert!(!claim(&db, "e1", "b").await.unwrap());
            assert!(!claim(&db, "e1", "a").await.unwrap());
            assert!(claim(&db, "e2", "b").await.unwrap());
        }
    }
}
