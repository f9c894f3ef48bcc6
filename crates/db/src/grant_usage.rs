//! A limited grant's signatures counted in the database (`grant_usage`, and `grant_seconds`:
//! the last day's signatures per second, at most 86,400 rows a grant however fast it signs),
//! so that every instance on one PostgreSQL server admits against the same count: a limit
//! each instance counted alone would be exceeded up to N-fold. One instance on SQLite
//! counts in memory instead (`keycast-core`'s `terms` module) — a write per signature would
//! cost a replica upload.
//!
//! [`admit`] is one short transaction per signature. Its first statement upserts the
//! authorization's `grant_usage` row, which locks it until commit (a row lock on
//! PostgreSQL, the write lock on SQLite): admissions of one authorization run one after
//! another on every instance, those of different authorizations side by side.

use crate::pool::on_engine;
use crate::returning::Returned;
use crate::{AuthorizationId, Db, RepoError};

/// What the database knows of one authorization's signatures when it is asked to admit one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Signatures in all (seeded from `activity` when the row was made).
    pub total: i64,
    /// Those after `now − window`, per second: `(unix second, count)`, oldest first.
    pub recent: Vec<(i64, i64)>,
}

/// A made row holds this total until it is seeded (in the same transaction).
const UNSEEDED: i64 = -1;

/// Admits one signature of `authz` at `now` if `decide` accepts what is counted: the total,
/// and the times after `now − window` (older ones are pruned). Accepted, the signature is
/// counted; either way the transaction commits. The authorization must exist.
///
/// # Errors
/// Database errors (then nothing is counted); `decide`'s refusal is the inner `Err`.
pub async fn admit<E>(
    db: &Db,
    authz: &AuthorizationId,
    now: i64,
    window: i64,
    decide: impl FnOnce(&Usage) -> Result<(), E>,
) -> Result<Result<(), E>, RepoError> {
    judge(db, authz, now, window, decide, true).await
}

/// As [`admit`], without counting a signature: whether one would be admitted now.
///
/// # Errors
/// Database errors.
pub async fn would_admit<E>(
    db: &Db,
    authz: &AuthorizationId,
    now: i64,
    window: i64,
    decide: impl FnOnce(&Usage) -> Result<(), E>,
) -> Result<Result<(), E>, RepoError> {
    judge(db, authz, now, window, decide, false).await
}

async fn judge<E>(
    db: &Db,
    authz: &AuthorizationId,
    now: i64,
    window: i64,
    decide: impl FnOnce(&Usage) -> Result<(), E>,
    count: bool,
) -> Result<Result<(), E>, RepoError> {
    let since = now - window;
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        let mut total: i64 = sqlx::query_scalar(
            "INSERT INTO grant_usage (authorization_id, total) VALUES ($1, $2) \
             ON CONFLICT (authorization_id) DO UPDATE SET total = grant_usage.total RETURNING total",
        )
        .bind(authz)
        .bind(UNSEEDED)
        .fetch_all(&mut *tx)
        .await?
        .into_one()?;
        if total == UNSEEDED {
            // First met (or its terms changed): its earlier signatures count.
            let seed = format!(
                "UPDATE grant_usage SET total = ({}) WHERE authorization_id = $1 RETURNING total",
                crate::activity::SIGNATURES_IN_ALL
            );
            total = sqlx::query_scalar(sqlx::AssertSqlSafe(seed))
                .bind(authz)
                .fetch_all(&mut *tx)
                .await?
                .into_one()?;
            sqlx::query(
                "INSERT INTO grant_seconds (authorization_id, signed_at, signatures) \
                 SELECT authorization_id, created_at, COUNT(*) FROM activity WHERE authorization_id = $1 \
                 AND method = 'sign_event' AND result IS NULL AND created_at > $2 GROUP BY authorization_id, created_at",
            )
            .bind(authz)
            .bind(since)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("DELETE FROM grant_seconds WHERE authorization_id = $1 AND signed_at <= $2")
                .bind(authz)
                .bind(since)
                .execute(&mut *tx)
                .await?;
        }
        let recent: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT signed_at, signatures FROM grant_seconds WHERE authorization_id = $1 ORDER BY signed_at",
        )
        .bind(authz)
        .fetch_all(&mut *tx)
        .await?;
        let decision = decide(&Usage { total, recent });
        if count && decision.is_ok() {
            sqlx::query("UPDATE grant_usage SET total = total + 1 WHERE authorization_id = $1")
                .bind(authz)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO grant_seconds (authorization_id, signed_at, signatures) VALUES ($1, $2, 1) \
                 ON CONFLICT (authorization_id, signed_at) DO UPDATE SET signatures = grant_seconds.signatures + 1",
            )
            .bind(authz)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(decision)
    })
}

/// Forgets what is counted for `authz` (its terms changed): the next [`admit`] seeds it from
/// `activity` again.
///
/// # Errors
/// Database errors.
pub async fn forget(db: &Db, authz: &AuthorizationId) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        sqlx::query("DELETE FROM grant_usage WHERE authorization_id = $1")
            .bind(authz)
            .execute(pool)
            .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::{self, NewActivity};
    use crate::testing::{temp_dbs, test_authorization, test_user};

    /// Admits under "at most `max` in all and 2 per 60 s", as the core's decision would.
    async fn take(db: &Db, authz: &AuthorizationId, now: i64, max: i64) -> Result<(), String> {
        admit(db, authz, now, 60, |u: &Usage| {
            if u.total >= max {
                Err(format!("exhausted at {}", u.total))
            } else if u.recent.iter().map(|(_, n)| n).sum::<i64>() >= 2 {
                Err(format!("rate: {:?}", u.recent))
            } else {
                Ok(())
            }
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn admissions_are_counted_seeded_from_activity_and_pruned_on_every_engine() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "u@example.com").await;
            let authz = test_authorization(&db, &user, "b1").await.id;
            let earlier = |at: i64, result: Option<&'static str>| NewActivity {
                id: crate::ActivityId::generate(),
                authorization_id: authz.clone(),
                method: "sign_event",
                kind: Some(1),
                transport: activity::Transport::Http,
                created_at: at,
                result,
            };
            // Two done signatures (one within the window) and a refused one.
            activity::insert_batch(&db, &[earlier(100, None), earlier(950, None), earlier(960, Some("x"))])
                .await
                .unwrap();
            assert_eq!(take(&db, &authz, 1000, 5).await, Ok(()), "{:?}", db.kind());
            assert_eq!(
                take(&db, &authz, 1001, 5).await.unwrap_err(),
                "rate: [(950, 1), (1000, 1)]"
            );
            assert_eq!(take(&db, &authz, 1011, 5).await, Ok(()), "950 left the window");
            assert_eq!(take(&db, &authz, 1100, 5).await, Ok(()));
            assert_eq!(take(&db, &authz, 1200, 5).await.unwrap_err(), "exhausted at 5");
            // Forgotten, it counts what activity holds again (nothing new was flushed).
            forget(&db, &authz).await.unwrap();
            assert_eq!(take(&db, &authz, 1200, 5).await, Ok(()));
            assert_eq!(take(&db, &authz, 1201, 5).await, Ok(()));
            assert_eq!(
                take(&db, &authz, 1202, 5).await.unwrap_err(),
                "rate: [(1200, 1), (1201, 1)]"
            );
        }
    }

    /// However fast a grant signs, one row per second is kept and read back.
    #[tokio::test]
    async fn signatures_of_one_second_are_one_row_on_every_engine() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "u@example.com").await;
            let authz = test_authorization(&db, &user, "b1").await.id;
            for _ in 0..50 {
                admit(&db, &authz, 1000, 60, |_: &Usage| Ok::<(), ()>(()))
                    .await
                    .unwrap()
                    .unwrap();
            }
            admit(&db, &authz, 1001, 60, |_: &Usage| Ok::<(), ()>(()))
                .await
                .unwrap()
                .unwrap();
            let mut seen = None;
            admit(&db, &authz, 1002, 60, |u: &Usage| {
                seen = Some(u.clone());
                Err(())
            })
            .await
            .unwrap()
            .unwrap_err();
            assert_eq!(
                seen,
                Some(Usage {
                    total: 51,
                    recent: vec![(1000, 50), (1001, 1)]
                }),
                "{:?}",
                db.kind()
            );
        }
    }
}
