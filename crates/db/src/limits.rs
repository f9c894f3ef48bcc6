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

/// Milliseconds `key` must still wait before its next password try, `None` when it may try.
///
/// # Errors
/// Database errors.
pub async fn blocked_for(db: &Db, key: &str, now_ms: i64) -> Result<Option<i64>, RepoError> {
    let until: Option<i64> = on_engine!(db, |pool| {
        sqlx::query_scalar("SELECT blocked_until_ms FROM password_failures WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?
    });
    Ok(until.filter(|until| *until > now_ms).map(|until| until - now_ms))
}

/// Counts one more wrong password for `key`; returns the count.
///
/// # Errors
/// Database errors.
pub async fn add_failure(db: &Db, key: &str, now_ms: i64) -> Result<i64, RepoError> {
    Ok(on_engine!(db, |pool| {
        sqlx::query_scalar(
            "INSERT INTO password_failures (key, failures, blocked_until_ms, touched_ms) VALUES ($1, 1, 0, $2) \
             ON CONFLICT (key) DO UPDATE SET failures = password_failures.failures + 1, touched_ms = $2 \
             RETURNING failures",
        )
        .bind(key)
        .bind(now_ms)
        .fetch_all(pool)
        .await?
        .into_one()?
    }))
}

/// Blocks `key` until `until_ms` (never shortening a block already further out).
///
/// # Errors
/// Database errors.
pub async fn block_until(db: &Db, key: &str, until_ms: i64) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query("UPDATE password_failures SET blocked_until_ms = $2 WHERE key = $1 AND blocked_until_ms < $2")
            .bind(key)
            .bind(until_ms)
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
    async fn failures_count_block_and_clear() {
        for (_guard, db) in temp_dbs().await {
            assert_eq!(blocked_for(&db, "a", 0).await.unwrap(), None);
            assert_eq!(add_failure(&db, "a", 1).await.unwrap(), 1);
            assert_eq!(add_failure(&db, "a", 2).await.unwrap(), 2);
            block_until(&db, "a", 5_000).await.unwrap();
            block_until(&db, "a", 3_000).await.unwrap();
            assert_eq!(
                blocked_for(&db, "a", 1_000).await.unwrap(),
                Some(4_000),
                "never shortened"
            );
            assert_eq!(blocked_for(&db, "a", 5_000).await.unwrap(), None);
            clear_failures(&db, "a").await.unwrap();
            assert_eq!(add_failure(&db, "a", 6).await.unwrap(), 1);
        }
    }
}
