//! Rate limits kept in the database (`rate_buckets`, `password_failures`), so that every
//! instance on one PostgreSQL server counts against the same limits: a limit per instance
//! multiplied by N instances is not a limit. One instance on SQLite keeps its limits in
//! memory instead (`keycast-http`'s `limit` module) — a write per login attempt would cost
//! a replica upload.
//!
//! Buckets use GCRA (the generic cell rate algorithm): one number per key, the theoretical
//! arrival time (TAT) of the next request, moved forward by one interval per allowed
//! request. A request is allowed when `max(TAT, now) − now ≤ (burst − 1) × interval`.
//! The check and the update are one `INSERT … ON CONFLICT DO UPDATE`, so concurrent
//! requests on any number of instances are counted exactly.

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::{Db, RepoError};

/// What [`take`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Allowed,
    /// Refused; the next attempt is allowed after this many milliseconds.
    Refused {
        retry_after_ms: i64,
    },
}

/// Takes one attempt from the bucket `key` that allows `burst` attempts at once and one
/// more every `interval_ms`, at `now_ms` (unix milliseconds).
///
/// # Errors
/// Database errors.
pub async fn take(db: &Db, key: &str, burst: u32, interval_ms: i64, now_ms: i64) -> Result<Attempt, RepoError> {
    let tolerance = i64::from(burst.max(1) - 1) * interval_ms;
    // `later` is max(TAT, now): the SET expressions all read the row as it was before.
    let sql = "INSERT INTO rate_buckets (key, tat_ms, allowed, touched_ms) VALUES ($1, $2 + $3, 1, $2) \
               ON CONFLICT (key) DO UPDATE SET \
                 allowed = CASE WHEN (CASE WHEN rate_buckets.tat_ms > $2 THEN rate_buckets.tat_ms ELSE $2 END) - $2 <= $4 \
                           THEN 1 ELSE 0 END, \
                 tat_ms = CASE WHEN (CASE WHEN rate_buckets.tat_ms > $2 THEN rate_buckets.tat_ms ELSE $2 END) - $2 <= $4 \
                          THEN (CASE WHEN rate_buckets.tat_ms > $2 THEN rate_buckets.tat_ms ELSE $2 END) + $3 \
                          ELSE rate_buckets.tat_ms END, \
                 touched_ms = $2 \
               RETURNING tat_ms, allowed";
    let (tat, allowed): (i64, i64) = on_engine!(db, |pool| {
        sqlx::query_as(sql)
            .bind(key)
            .bind(now_ms)
            .bind(interval_ms)
            .bind(tolerance)
            .fetch_all(pool)
            .await?
            .into_one()?
    });
    Ok(if allowed == 1 {
        Attempt::Allowed
    } else {
        Attempt::Refused {
            retry_after_ms: (tat - now_ms - tolerance).max(1),
        }
    })
}

/// What [`take`] would decide for the bucket `key` at `now_ms`, taking nothing.
///
/// # Errors
/// Database errors.
pub async fn peek(db: &Db, key: &str, burst: u32, interval_ms: i64, now_ms: i64) -> Result<Attempt, RepoError> {
    let tolerance = i64::from(burst.max(1) - 1) * interval_ms;
    let tat: Option<i64> = on_engine!(db, |pool| {
        sqlx::query_scalar("SELECT tat_ms FROM rate_buckets WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?
    });
    Ok(match tat {
        Some(tat) if tat.max(now_ms) - now_ms > tolerance => Attempt::Refused {
            retry_after_ms: (tat - now_ms - tolerance).max(1),
        },
        _ => Attempt::Allowed,
    })
}

/// How long wrong passwords make a key wait: nothing for the first `free` tries, then 1 s
/// after the `free`th, doubling with each further try, up to `max_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub free: u32,
    pub max_ms: i64,
}

/// Starts a password try for `key` at `now_ms`: `Some(ms)` to wait when its backoff runs
/// (nothing is counted), else `None`, and the try is counted as a failure already (a right
/// password clears the count: [`clear_failures`]), the wait for the next one set as
/// `backoff` says. The decision and the count are one conditional `UPDATE`, so tries at once
/// on any number of instances take turns: no more than `backoff.free` pass before the wait.
///
/// # Errors
/// Database errors.
pub async fn start_try(db: &Db, key: &str, now_ms: i64, backoff: Backoff) -> Result<Option<i64>, RepoError> {
    // Doublings past which the wait is `max_ms` (and the shift stays small).
    let cap = (0..62).find(|k| 1000i64 << k >= backoff.max_ms).unwrap_or(62);
    let counted: Option<i64> = on_engine!(db, |pool| {
        sqlx::query(
            "INSERT INTO password_failures (key, failures, blocked_until_ms, touched_ms) VALUES ($1, 0, 0, $2) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(now_ms)
        .execute(pool)
        .await?;
        sqlx::query_scalar(
            "UPDATE password_failures SET failures = failures + 1, touched_ms = $2, blocked_until_ms = CASE \
               WHEN failures + 1 < $3 THEN 0 \
               WHEN failures + 1 - $3 >= $4 THEN $2 + $5 \
               ELSE $2 + 1000 * (CAST(1 AS BIGINT) << CAST(failures + 1 - $3 AS INTEGER)) END \
             WHERE key = $1 AND blocked_until_ms <= $2 RETURNING failures",
        )
        .bind(key)
        .bind(now_ms)
        .bind(i64::from(backoff.free))
        .bind(cap)
        .bind(backoff.max_ms)
        .fetch_all(pool)
        .await?
        .into_first()
    });
    if counted.is_some() {
        return Ok(None);
    }
    let until: Option<i64> = on_engine!(db, |pool| {
        sqlx::query_scalar("SELECT blocked_until_ms FROM password_failures WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?
    });
    // Cleared in between (a right password): the next try is not refused.
    Ok(Some(until.map_or(1, |until| (until - now_ms).max(1))))
}

/// Uncounts a try [`start_try`] counted that ended without a verdict on the password (the
/// hashing queue was full, the database failed): one failure fewer, and no wait while the
/// count is within `backoff.free`.
///
/// # Errors
/// Database errors.
pub async fn uncount_try(db: &Db, key: &str, backoff: Backoff) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query(
            "UPDATE password_failures SET failures = failures - 1, blocked_until_ms = CASE \
               WHEN failures - 1 < $2 THEN 0 ELSE blocked_until_ms END \
             WHERE key = $1 AND failures > 0",
        )
        .bind(key)
        .bind(i64::from(backoff.free))
        .execute(pool)
        .await?;
    });
    Ok(())
}

/// Forgets `key`'s failures (a right password).
///
/// # Errors
/// Database errors.
pub async fn clear_failures(db: &Db, key: &str) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query("DELETE FROM password_failures WHERE key = $1")
            .bind(key)
            .execute(pool)
            .await?;
    });
    Ok(())
}

/// Removes buckets and failure counts untouched since `before_ms`; returns how many.
///
/// # Errors
/// Database errors.
pub async fn purge(db: &Db, before_ms: i64) -> Result<u64, RepoError> {
    Ok(on_engine!(db, |pool| {
        let buckets = sqlx::query("DELETE FROM rate_buckets WHERE touched_ms < $1 AND tat_ms < $1")
            .bind(before_ms)
            .execute(pool)
            .await?;
        let failures = sqlx::query("DELETE FROM password_failures WHERE touched_ms < $1 AND blocked_until_ms < $1")
            .bind(before_ms)
            .execute(pool)
            .await?;
        buckets.rows_affected() + failures.rows_affected()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    #[tokio::test]
    async fn a_bucket_allows_its_burst_then_one_per_interval() {
        for (_guard, db) in temp_dbs().await {
            for _ in 0..3 {
                assert_eq!(take(&db, "k", 3, 1000, 10_000).await.unwrap(), Attempt::Allowed);
            }
            assert_eq!(
                take(&db, "k", 3, 1000, 10_000).await.unwrap(),
                Attempt::Refused { retry_after_ms: 1000 }
            );
            assert_eq!(
                take(&db, "k", 3, 1000, 10_400).await.unwrap(),
                Attempt::Refused { retry_after_ms: 600 },
                "a refusal takes nothing"
            );
            assert_eq!(take(&db, "k", 3, 1000, 11_000).await.unwrap(), Attempt::Allowed);
            assert_eq!(take(&db, "other", 3, 1000, 11_000).await.unwrap(), Attempt::Allowed);
            assert_eq!(purge(&db, 50_000).await.unwrap(), 2);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_attempts_are_counted_exactly() {
        for (_guard, db) in temp_dbs().await {
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let db = db.clone();
                    tokio::spawn(async move { take(&db, "k", 5, 60_000, 1_000).await.unwrap() })
                })
                .collect();
            let mut allowed = 0;
            for task in tasks {
                allowed += usize::from(task.await.unwrap() == Attempt::Allowed);
            }
            assert_eq!(allowed, 5, "{:?}", db.kind());
        }
    }

    #[tokio::test]
    async fn tries_past_the_free_ones_wait_longer_each_time_and_a_success_clears_them() {
        const BACKOFF: Backoff = Backoff { free: 2, max_ms: 5_000 };
        for (_guard, db) in temp_dbs().await {
            let kind = db.kind();
            let start = |key: &'static str, at: i64| {
                let db = db.clone();
                async move { start_try(&db, key, at, BACKOFF).await.unwrap() }
            };
            assert_eq!(start("a", 0).await, None, "{kind:?}");
            assert_eq!(start("a", 10).await, None, "the second free try");
            assert_eq!(start("a", 500).await, Some(510), "1 s after the second");
            assert_eq!(start("b", 500).await, None, "another key");
            assert_eq!(start("a", 1_010).await, None);
            assert_eq!(start("a", 1_010).await, Some(2_000), "then 2 s");
            assert_eq!(start("a", 3_010).await, None);
            assert_eq!(start("a", 3_011).await, Some(3_999), "then 4 s");
            assert_eq!(start("a", 7_010).await, None);
            assert_eq!(start("a", 7_010).await, Some(5_000), "8 s, at most 5");
            clear_failures(&db, "a").await.unwrap();
            assert_eq!(start("a", 7_010).await, None, "a right password clears them");
            assert_eq!(start("a", 7_010).await, None);
            assert_eq!(purge(&db, 50_000).await.unwrap(), 2);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn tries_at_once_pass_no_more_than_the_free_ones() {
        for (_guard, db) in temp_dbs().await {
            let tasks: Vec<_> = (0..40)
                .map(|_| {
                    let db = db.clone();
                    tokio::spawn(async move {
                        start_try(
                            &db,
                            "k",
                            1_000,
                            Backoff {
                                free: 5,
                                max_ms: 900_000,
                            },
                        )
                        .await
                        .unwrap()
                    })
                })
                .collect();
            let mut passed = 0;
            for task in tasks {
                passed += usize::from(task.await.unwrap().is_none());
            }
            assert_eq!(passed, 5, "{:?}", db.kind());
        }
    }
}
