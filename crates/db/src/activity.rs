//! The `activity` table: what each authorization did (method, event kind, transport, time).
//!
//! Rows arrive in batches from `keycast-core`'s in-memory buffer, never one per signature:
//! a signature must not cost a commit (and so an object-store PUT). A row whose
//! authorization has meanwhile been deleted (its user deleted the account) is dropped
//! silently instead of failing the whole batch.

use crate::pool::{on_engine, EngineKind};
use crate::Db;

use crate::{ActivityId, AuthorizationId, RepoError, UserId};

/// Rows per `INSERT` statement on SQLite (7 parameters each, far below SQLite's 32766 limit).
pub const BATCH_ROWS: usize = 200;

/// Which transport a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `POST /api/nostr` with a bearer token.
    Http,
    /// NIP-46 over relays.
    Nip46,
}

impl Transport {
    /// The stored text (`activity.transport`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Nip46 => "nip46",
        }
    }
}

/// One thing an authorization did, to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewActivity {
    /// Given when the record is made, not when it is written: a batch written again after
    /// its first write's answer was lost (a timeout) is then stored once.
    pub id: ActivityId,
    pub authorization_id: AuthorizationId,
    /// The NIP-46 method name (`sign_event`, `nip44_encrypt`, …).
    pub method: &'static str,
    /// The event kind, for `sign_event`.
    pub kind: Option<i64>,
    pub transport: Transport,
    pub created_at: i64,
    /// `None`: done. A refusal's code (`policy_denied`, `grant_expired`, `grant_exhausted`,
    /// `grant_rate_limited`), so the owner sees what an app tried (migration 0009).
    pub result: Option<&'static str>,
}

/// A stored activity record.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Activity {
    pub id: ActivityId,
    pub authorization_id: AuthorizationId,
    pub method: String,
    pub kind: Option<i64>,
    /// `http` or `nip46`.
    pub transport: String,
    pub created_at: i64,
    /// `None`: done; else the refusal's code.
    pub result: Option<String>,
}

/// Stores a batch in one transaction and returns how many rows were stored: fewer than
/// given when some authorizations no longer exist. On SQLite [`BATCH_ROWS`] rows per
/// `INSERT … VALUES`; on PostgreSQL one `INSERT … SELECT FROM UNNEST(arrays)` for the whole
/// batch: seven array parameters, one statement prepared once per connection, instead of
/// a 1,400-parameter statement per 200 rows. The caller bounds the batch
/// ([`MAX_BATCH_ROWS`] per transaction), so no flush holds a transaction open for long.
///
/// # Errors
/// Database errors; then nothing of the batch is stored.
pub async fn insert_batch(db: &Db, rows: &[NewActivity]) -> Result<u64, RepoError> {
    if rows.is_empty() {
        return Ok(0);
    }
    if let Some(pool) = db.as_postgres() {
        return insert_unnest(pool, rows).await;
    }
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        let mut stored = 0;
        for chunk in rows.chunks(BATCH_ROWS) {
            let sql = chunk_sql(chunk.len());
            // Built only from placeholders; no value is ever spliced into the text.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for row in chunk {
                query = query
                    .bind(&row.id)
                    .bind(&row.authorization_id)
                    .bind(row.method)
                    .bind(row.kind)
                    .bind(row.transport.as_str())
                    .bind(row.created_at)
                    .bind(row.result);
            }
            stored += query.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(stored)
    })
}

/// Rows per flush transaction (the signer takes at most this many from its buffer at a
/// time): a backlog is written in several short transactions, not one long one.
pub const MAX_BATCH_ROWS: usize = 5_000;

/// PostgreSQL: the batch as seven column arrays, one statement (one implicit transaction).
async fn insert_unnest(pool: &sqlx::PgPool, rows: &[NewActivity]) -> Result<u64, RepoError> {
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let authz: Vec<&str> = rows.iter().map(|r| r.authorization_id.as_str()).collect();
    let methods: Vec<&str> = rows.iter().map(|r| r.method).collect();
    let kinds: Vec<Option<i64>> = rows.iter().map(|r| r.kind).collect();
    let transports: Vec<&str> = rows.iter().map(|r| r.transport.as_str()).collect();
    let times: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
    let results: Vec<Option<&str>> = rows.iter().map(|r| r.result).collect();
    let done = sqlx::query(
        "INSERT INTO activity (id, authorization_id, method, kind, transport, created_at, result) \
         SELECT v.id, v.authorization_id, v.method, v.kind, v.transport, v.created_at, v.result \
         FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::BIGINT[], $7::TEXT[]) \
              AS v(id, authorization_id, method, kind, transport, created_at, result) \
         WHERE EXISTS (SELECT 1 FROM authorizations a WHERE a.id = v.authorization_id) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(authz)
    .bind(methods)
    .bind(kinds)
    .bind(transports)
    .bind(times)
    .bind(results)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// `INSERT … SELECT … FROM (VALUES …)`: VALUES columns are named `column1…` on both
/// SQLite and PostgreSQL, and the `EXISTS` guard skips rows of deleted authorizations.
fn chunk_sql(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let p = r * 7;
            format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5,
                p + 6,
                p + 7
            )
        })
        .collect();
    format!(
        "INSERT INTO activity (id, authorization_id, method, kind, transport, created_at, result) \
         SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7 FROM (VALUES {}) AS v \
         WHERE EXISTS (SELECT 1 FROM authorizations a WHERE a.id = v.column2) ON CONFLICT (id) DO NOTHING",
        values.join(", ")
    )
}

macro_rules! columns {
    () => {
        "id, authorization_id, method, kind, transport, created_at, result"
    };
}

/// The newest `limit` records of one authorization, newest first.
///
/// # Errors
/// Database errors.
pub async fn list_for_authorization(
    db: &Db,
    authorization: &AuthorizationId,
    limit: i64,
) -> Result<Vec<Activity>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM activity WHERE authorization_id = $1 ORDER BY created_at DESC, id LIMIT $2"
        );
        Ok(sqlx::query_as(sql)
            .bind(authorization)
            .bind(limit)
            .fetch_all(pool)
            .await?)
    })
}

/// An authorization's signatures in all, as a scalar subquery with its id as `$1`: the
/// `sign_event` records done, and those already pruned (see [`prune`]).
pub const SIGNATURES_IN_ALL: &str = "SELECT (SELECT COUNT(*) FROM activity WHERE authorization_id = $1 \
     AND method = 'sign_event' AND result IS NULL) \
     + COALESCE((SELECT signatures_pruned FROM authorizations WHERE id = $1), 0)";

/// Adds signatures that were made but never recorded (their records were dropped while
/// the database could not be written) to their grants' totals, as [`prune`] does for the
/// records it removes: `(grant, signatures)`, in one transaction. Unknown grants (deleted
/// since) are skipped.
///
/// # Errors
/// Database errors; then nothing is added.
pub async fn add_unrecorded_signatures(db: &Db, counts: &[(AuthorizationId, i64)]) -> Result<(), RepoError> {
    if counts.is_empty() {
        return Ok(());
    }
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        for (authz, signatures) in counts {
            sqlx::query("UPDATE authorizations SET signatures_pruned = signatures_pruned + $2 WHERE id = $1")
                .bind(authz)
                .bind(signatures)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    })
}

/// One grant for [`prune`]: its id, and the time from which its signatures (`sign_event`
/// done) stay whatever their number — a grant with a rate limit counts that window from
/// them after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prune {
    pub authorization_id: AuthorizationId,
    pub protect_since: Option<i64>,
}

/// The two classes of a grant's records, each kept to its newest `keep` by [`prune`]: its
/// signatures (`sign_event` done), and everything else (other methods, refusals). Kept
/// apart because an app could erase what it signed from its owner's view: with one newest
/// `keep` for every record, a thousand `get_public_key` calls (always allowed, never
/// limited) or refused requests pushed its every signature out, and with them the grant's
/// counts of the last minute, hour and day.
const CLASSES: [&str; 2] = [
    "(method = 'sign_event' AND result IS NULL)",
    "NOT (method = 'sign_event' AND result IS NULL)",
];

/// Removes each grant's records older than the newest `keep` of their class (see
/// [`CLASSES`]), except its protected signatures, in one transaction (on SQLite one commit,
/// hence one replica upload, for all of them). The signatures removed are added to the
/// grant's `signatures_pruned` first, so [`signatures`] still counts every one. Returns the
/// rows removed.
///
/// # Errors
/// Database errors; then nothing is removed.
pub async fn prune(db: &Db, keep: u32, grants: &[Prune]) -> Result<u64, RepoError> {
    if grants.is_empty() {
        return Ok(0);
    }
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        let mut removed = 0;
        for grant in grants {
            let authz = &grant.authorization_id;
            let protect_since = grant.protect_since.unwrap_or(i64::MAX);
            for class in CLASSES {
                // The newest row of the class to go: the first past its `keep` newest.
                let edge: Option<(i64, ActivityId)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT created_at, id FROM activity WHERE authorization_id = $1 AND {class} \
                     ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET $2"
                )))
                .bind(authz)
                .bind(i64::from(keep))
                .fetch_optional(&mut *tx)
                .await?;
                let Some((at, id)) = edge else {
                    continue;
                };
                let doomed = format!(
                    "authorization_id = $1 AND {class} AND (created_at < $2 OR (created_at = $2 AND id <= $3)) \
                     AND NOT (method = 'sign_event' AND result IS NULL AND created_at >= $4)"
                );
                // On PostgreSQL each statement reads the snapshot it began with: a count taken
                // apart from the delete, by an instance that then waited for another pruning the
                // same grant, counted that one's signatures again (and missed rows another
                // instance's flush wrote in between). So the delete says what it removed, and
                // that is what is counted. SQLite writes one transaction at a time.
                removed += match db.kind() {
                    EngineKind::Postgres => {
                        // The grant's row first, as an account's deletion takes it before its
                        // records (the cascade): in the other order the two could deadlock.
                        sqlx::query("SELECT 1 FROM authorizations WHERE id = $1 FOR NO KEY UPDATE")
                            .bind(authz)
                            .execute(&mut *tx)
                            .await?;
                        let removed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                            "WITH gone AS (DELETE FROM activity WHERE {doomed} RETURNING method, result) \
                             UPDATE authorizations SET signatures_pruned = signatures_pruned + (SELECT COUNT(*) \
                             FROM gone WHERE method = 'sign_event' AND result IS NULL) WHERE id = $1 \
                             RETURNING (SELECT COUNT(*) FROM gone)"
                        )))
                        .bind(authz)
                        .bind(at)
                        .bind(&id)
                        .bind(protect_since)
                        .fetch_all(&mut *tx)
                        .await?
                        .into_iter()
                        .next()
                        .unwrap_or(0);
                        u64::try_from(removed).unwrap_or(0)
                    }
                    EngineKind::Sqlite => {
                        let counted = format!(
                            "UPDATE authorizations SET signatures_pruned = signatures_pruned + (SELECT COUNT(*) FROM \
                             activity WHERE {doomed} AND method = 'sign_event' AND result IS NULL) WHERE id = $1"
                        );
                        sqlx::query(sqlx::AssertSqlSafe(counted))
                            .bind(authz)
                            .bind(at)
                            .bind(&id)
                            .bind(protect_since)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM activity WHERE {doomed}")))
                            .bind(authz)
                            .bind(at)
                            .bind(&id)
                            .bind(protect_since)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected()
                    }
                };
            }
        }
        tx.commit().await?;
        Ok(removed)
    })
}

/// Up to `most` authorizations over by `now` (revoked, or past the `expires_at` of their
/// terms) with more than `keep` activity records, for [`prune`] to trim.
///
/// # Errors
/// Database errors.
pub async fn over_with_more_than(db: &Db, keep: u32, most: i64, now: i64) -> Result<Vec<AuthorizationId>, RepoError> {
    macro_rules! over_sql {
        ($expires:expr) => {
            concat!(
                "SELECT id FROM authorizations a WHERE (revoked_at IS NOT NULL OR COALESCE(",
                $expires,
                // More than `keep` in either class (see `CLASSES`): one with more in all but
                // not in a class loses nothing, and the sweep would pick it again for good.
                ", $3 + 1) <= $3) AND (EXISTS (SELECT 1 FROM activity v WHERE v.authorization_id = a.id \
                 AND (v.method = 'sign_event' AND v.result IS NULL) LIMIT 1 OFFSET $1) \
                 OR EXISTS (SELECT 1 FROM activity v WHERE v.authorization_id = a.id \
                 AND NOT (v.method = 'sign_event' AND v.result IS NULL) LIMIT 1 OFFSET $1)) LIMIT $2"
            )
        };
    }
    let sql = match db.kind() {
        EngineKind::Sqlite => over_sql!(crate::authz::sqlite_expires!()),
        EngineKind::Postgres => over_sql!(crate::authz::postgres_expires!()),
    };
    on_engine!(db, |pool| {
        Ok(sqlx::query_scalar(sql)
            .bind(i64::from(keep))
            .bind(most)
            .bind(now)
            .fetch_all(pool)
            .await?)
    })
}

/// An authorization's signatures (`sign_event` records): how many in all, and how many in
/// each second at or after `since` (`(second, count)`, oldest first: one row per second
/// however fast the app signs), for the usage limits of its grant.
///
/// # Errors
/// Database errors.
pub async fn signatures(db: &Db, authz: &AuthorizationId, since: i64) -> Result<(i64, Vec<(i64, i64)>), RepoError> {
    on_engine!(db, |pool| {
        let total: i64 = sqlx::query_scalar(SIGNATURES_IN_ALL)
            .bind(authz)
            .fetch_one(pool)
            .await?;
        let recent: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT created_at, COUNT(*) FROM activity WHERE authorization_id = $1 AND method = 'sign_event' \
             AND result IS NULL AND created_at >= $2 GROUP BY created_at ORDER BY created_at",
        )
        .bind(authz)
        .bind(since)
        .fetch_all(pool)
        .await?;
        Ok((total, recent))
    })
}

/// The newest `limit` records across all of a user's authorizations, newest first.
///
/// # Errors
/// Database errors.
pub async fn list_for_user(db: &Db, user: &UserId, limit: i64) -> Result<Vec<Activity>, RepoError> {
    on_engine!(db, |pool| {
        let sql = "SELECT v.id, v.authorization_id, v.method, v.kind, v.transport, v.created_at, v.result \
               FROM activity v JOIN authorizations a ON a.id = v.authorization_id \
               WHERE a.user_id = $1 ORDER BY v.created_at DESC, v.id LIMIT $2";
        Ok(sqlx::query_as(sql).bind(user).bind(limit).fetch_all(pool).await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{temp_dbs, test_authorization, test_user};

    fn record(authz: &AuthorizationId, at: i64) -> NewActivity {
        NewActivity {
            id: ActivityId::generate(),
            authorization_id: authz.clone(),
            method: "sign_event",
            kind: Some(1),
            transport: Transport::Http,
            created_at: at,
            result: None,
        }
    }

    /// A batch written again after its first write's answer was lost (a write past its time
    /// limit that the server finished anyway). Before, each write gave the rows new ids: the
    /// signatures were stored twice, listed twice, and counted twice against the grant's
    /// limits once the buffer's counts were gone (a restart).
    #[tokio::test]
    async fn a_batch_written_twice_is_stored_once() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let rows: Vec<_> = (0..3).map(|i| record(&authz.id, i)).collect();
            assert_eq!(insert_batch(&db, &rows).await.unwrap(), 3);
            assert_eq!(insert_batch(&db, &rows).await.unwrap(), 0, "{:?}", db.kind());
            assert_eq!(list_for_authorization(&db, &authz.id, 10).await.unwrap().len(), 3);
        }
    }

    #[tokio::test]
    async fn batch_larger_than_one_statement_is_stored_whole() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let rows: Vec<_> = (0..(BATCH_ROWS as i64 * 2 + 7)).map(|i| record(&authz.id, i)).collect();
            assert_eq!(insert_batch(&db, &rows).await.unwrap(), rows.len() as u64);
            let newest = list_for_authorization(&db, &authz.id, 3).await.unwrap();
            let times: Vec<i64> = newest.iter().map(|a| a.created_at).collect();
            assert_eq!(times, [406, 405, 404]);
            assert_eq!(
                (newest[0].method.as_str(), newest[0].transport.as_str(), newest[0].kind),
                ("sign_event", "http", Some(1))
            );
        }
    }

    /// Two instances pruning one grant at once, on PostgreSQL: each counted the signatures it
    /// was about to remove in the snapshot its statement began with, so the one that waited for
    /// the other's commit counted the other's signatures again — the owner's page showed more
    /// signatures than were made, and a grant's limits re-seeded from that total ran out early.
    /// Each now counts exactly what its own delete removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_prunes_of_one_grant_at_once_count_each_signature_once() {
        for (_guard, db) in temp_dbs().await {
            let crate::pool::Engine::Postgres(pool) = db.engine() else {
                continue;
            };
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let rows: Vec<_> = (1..=300).map(|t| record(&authz.id, t)).collect();
            insert_batch(&db, &rows).await.unwrap();
            // A third session holds the grant's row, so that both prunes are under way before
            // either can finish.
            let mut holder = pool.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM authorizations WHERE id = $1 FOR UPDATE")
                .bind(&authz.id)
                .execute(&mut *holder)
                .await
                .unwrap();
            let pruning: Vec<_> = (0..2)
                .map(|_| {
                    let (db, grant) = (
                        db.clone(),
                        Prune {
                            authorization_id: authz.id.clone(),
                            protect_since: None,
                        },
                    );
                    tokio::spawn(async move { prune(&db, 100, &[grant]).await })
                })
                .collect();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock'",
                )
                .fetch_one(pool)
                .await
                .unwrap();
                if waiting >= 2 {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "the prunes never both waited");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            holder.rollback().await.unwrap();
            for pruned in pruning {
                pruned.await.unwrap().unwrap();
            }
            assert_eq!(signatures(&db, &authz.id, 0).await.unwrap().0, 300);
            assert_eq!(list_for_authorization(&db, &authz.id, 1000).await.unwrap().len(), 100);
        }
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_and_the_protected_and_counts_every_signature_on_every_engine() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let other = test_authorization(&db, &user, "b2").await;
            // Seconds 1..=60: signatures, every third one refused, every fifth an encryption.
            let rows: Vec<_> = (1..=60)
                .map(|t| match t {
                    t if t % 5 == 0 => NewActivity {
                        method: "nip44_encrypt",
                        kind: None,
                        ..record(&authz.id, t)
                    },
                    t if t % 3 == 0 => NewActivity {
                        result: Some("grant_rate_limited"),
                        ..record(&authz.id, t)
                    },
                    t => record(&authz.id, t),
                })
                .collect();
            insert_batch(&db, &rows).await.unwrap();
            insert_batch(&db, &[record(&other.id, 1)]).await.unwrap();
            let done = |rows: &[NewActivity]| {
                rows.iter()
                    .filter(|r| r.method == "sign_event" && r.result.is_none())
                    .count() as i64
            };
            let before = signatures(&db, &authz.id, 0).await.unwrap().0;
            assert_eq!(before, done(&rows));
            let grant = |protect_since| Prune {
                authorization_id: authz.id.clone(),
                protect_since,
            };

            // Nothing past the newest 100: nothing goes.
            assert_eq!(prune(&db, 100, &[grant(None)]).await.unwrap(), 0);
            // Keep 10 of each class (signatures; the rest: other methods and refusals), and
            // every signature from second 41 on (a rate window).
            let removed = prune(&db, 10, &[grant(Some(41))]).await.unwrap();
            let left = list_for_authorization(&db, &authz.id, 1000).await.unwrap();
            assert_eq!(left.len() as u64, 60 - removed);
            let (signing, rest): (Vec<_>, Vec<_>) = left
                .iter()
                .partition(|a| a.method == "sign_event" && a.result.is_none());
            let seconds = |rows: &[&Activity]| rows.iter().take(10).map(|a| a.created_at).collect::<Vec<_>>();
            let signature = |t: &i64| t % 5 != 0 && t % 3 != 0;
            let newest_signing: Vec<i64> = (1..=60).rev().filter(signature).take(10).collect();
            assert_eq!(seconds(&signing), newest_signing, "the newest 10 signatures stay");
            let newest_rest: Vec<i64> = (1..=60).rev().filter(|t| !signature(t)).take(10).collect();
            assert_eq!(seconds(&rest), newest_rest, "and the newest 10 others");
            assert_eq!(rest.len(), 10);
            let protected = rows.iter().filter(|r| r.created_at >= 41 && r.created_at <= 50);
            for r in protected.filter(|r| r.method == "sign_event" && r.result.is_none()) {
                assert!(
                    left.iter().any(|a| a.created_at == r.created_at),
                    "second {} kept",
                    r.created_at
                );
            }
            assert!(
                signing.iter().all(|a| a.created_at >= 41),
                "no signature older than the window stays"
            );
            let (total, recent) = signatures(&db, &authz.id, 41).await.unwrap();
            assert_eq!(total, before, "pruned signatures still count");
            let window: i64 = recent.iter().map(|(_, n)| n).sum();
            assert_eq!(window, done(&rows[40..]), "the window's signatures are all there");

            // Without a window: only the newest 10 of each stay, and the total holds again.
            prune(&db, 10, &[grant(None)]).await.unwrap();
            assert_eq!(list_for_authorization(&db, &authz.id, 1000).await.unwrap().len(), 20);
            assert_eq!(signatures(&db, &authz.id, 0).await.unwrap().0, before);
            assert_eq!(
                list_for_authorization(&db, &other.id, 10).await.unwrap().len(),
                1,
                "other grants untouched"
            );
        }
    }

    /// The sweep trims revoked grants picked by [`over_with_more_than`] until it finds none:
    /// one with more records than kept in all, but not in either class, would lose nothing
    /// to [`prune`] and be picked again for good (the sweep ran until its time limit).
    #[tokio::test]
    async fn grants_are_picked_for_trimming_only_with_more_than_kept_in_a_class() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let mut rows: Vec<NewActivity> = (1..=19).map(|t| record(&authz.id, t)).collect();
            rows.extend((20..=21).map(|t| NewActivity {
                method: "get_public_key",
                kind: None,
                ..record(&authz.id, t)
            }));
            insert_batch(&db, &rows).await.unwrap();
            crate::authz::revoke(&db, &authz.id, &user, 30).await.unwrap();
            assert_eq!(
                over_with_more_than(&db, 20, 500, 40).await.unwrap(),
                Vec::<AuthorizationId>::new()
            );
            prune(
                &db,
                20,
                &[Prune {
                    authorization_id: authz.id.clone(),
                    protect_since: None,
                }],
            )
            .await
            .unwrap();
            insert_batch(&db, &[record(&authz.id, 22), record(&authz.id, 23)])
                .await
                .unwrap();
            assert_eq!(
                over_with_more_than(&db, 20, 500, 40).await.unwrap(),
                vec![authz.id.clone()]
            );
            assert_eq!(
                prune(
                    &db,
                    20,
                    &[Prune {
                        authorization_id: authz.id.clone(),
                        protect_since: None
                    }]
                )
                .await
                .unwrap(),
                1,
                "the oldest signature goes"
            );
            assert_eq!(
                over_with_more_than(&db, 20, 500, 40).await.unwrap(),
                Vec::<AuthorizationId>::new()
            );
        }
    }

    #[tokio::test]
    async fn missing_kinds_and_refusal_codes_round_trip_on_every_engine() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let refused = NewActivity {
                method: "nip44_encrypt",
                kind: None,
                transport: Transport::Nip46,
                result: Some("policy_denied"),
                ..record(&authz.id, 5)
            };
            assert_eq!(insert_batch(&db, &[record(&authz.id, 4), refused]).await.unwrap(), 2);
            let stored = list_for_authorization(&db, &authz.id, 2).await.unwrap();
            let seen: Vec<_> = stored
                .iter()
                .map(|a| (a.method.as_str(), a.kind, a.transport.as_str(), a.result.as_deref()))
                .collect();
            assert_eq!(
                seen,
                [
                    ("nip44_encrypt", None, "nip46", Some("policy_denied")),
                    ("sign_event", Some(1), "http", None)
                ],
                "{:?}",
                db.kind()
            );
        }
    }

    #[tokio::test]
    async fn rows_of_deleted_authorizations_are_skipped_not_fatal() {
        for (_guard, db) in temp_dbs().await {
            let user = test_user(&db, "a@x.org").await;
            let authz = test_authorization(&db, &user, "b1").await;
            let gone = AuthorizationId::generate();
            let rows = [record(&authz.id, 1), record(&gone, 2), record(&authz.id, 3)];
            assert_eq!(insert_batch(&db, &rows).await.unwrap(), 2);
        }
    }

    #[tokio::test]
    async fn user_listing_spans_their_authorizations_only() {
        for (_guard, db) in temp_dbs().await {
            let alice = test_user(&db, "a@x.org").await;
            let bob = test_user(&db, "b@x.org").await;
            let a1 = test_authorization(&db, &alice, "b1").await;
            let a2 = test_authorization(&db, &alice, "b2").await;
            let b1 = test_authorization(&db, &bob, "b3").await;
            let rows = [record(&a1.id, 1), record(&a2.id, 2), record(&b1.id, 3)];
            insert_batch(&db, &rows).await.unwrap();
            let listed = list_for_user(&db, &alice, 10).await.unwrap();
            let ids: Vec<_> = listed.iter().map(|a| a.authorization_id.clone()).collect();
            assert_eq!(ids, [a2.id, a1.id]);
        }
    }

    #[tokio::test]
    async fn empty_batch_touches_nothing() {
        for (_guard, db) in temp_dbs().await {
            assert_eq!(insert_batch(&db, &[]).await.unwrap(), 0);
        }
    }
}
