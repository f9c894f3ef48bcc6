//! The NIP-46 requests an instance had seen when it handed the database over (`nip46_seen`,
//! SQLite): the newcomer drops them as seen. Some relays keep ephemeral events for a while and
//! replay the last minute's requests to a new subscription; without this the newcomer would
//! answer every request its predecessor had already answered in that minute — a second
//! signature, counted twice against the grant's limits. The table holds one hand-over's worth
//! (a couple of minutes of requests) and is replaced whole at each.

use crate::pool::on_engine;
use crate::{Db, RepoError};

/// Replaces the table's contents with `seen` (client public key hex, request id), dated `now`
/// (unix seconds), in one transaction.
///
/// # Errors
/// Database errors (then the table is as it was).
pub async fn replace(db: &Db, seen: &[(String, String)], now: i64) -> Result<(), RepoError> {
    on_engine!(db, |pool| {
        let mut tx = pool.begin().await?;
        sqlx::query("DELETE FROM nip46_seen").execute(&mut *tx).await?;
        for (client, request_id) in seen {
            sqlx::query(
                "INSERT INTO nip46_seen (client, request_id, seen_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (client, request_id) DO NOTHING",
            )
            .bind(client)
            .bind(request_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    })
}

/// The requests handed over after `since` (unix seconds): (client public key hex, request id).
///
/// # Errors
/// Database errors.
pub async fn since(db: &Db, since: i64) -> Result<Vec<(String, String)>, RepoError> {
    on_engine!(db, |pool| {
        Ok(
            sqlx::query_as("SELECT client, request_id FROM nip46_seen WHERE seen_at > $1")
                .bind(since)
                .fetch_all(pool)
                .await?,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    #[tokio::test]
    async fn a_hand_over_replaces_what_the_previous_one_left() {
        for (_guard, db) in temp_dbs().await {
            let pair = |c: &str, id: &str| (c.to_owned(), id.to_owned());
            replace(&db, &[pair("a", "1"), pair("a", "2")], 100).await.unwrap();
            replace(&db, &[pair("a", "2"), pair("b", "1"), pair("b", "1")], 200)
                .await
                .unwrap();
            let mut found = since(&db, 150).await.unwrap();
            found.sort();
            assert_eq!(found, vec![pair("a", "2"), pair("b", "1")], "{:?}", db.kind());
            assert!(since(&db, 200).await.unwrap().is_empty(), "older than asked: none");
        }
    }
}
