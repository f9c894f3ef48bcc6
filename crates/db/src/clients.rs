//! Registered OAuth clients (`oauth_clients`): the apps an operator vouches for. Validating
//! names and URIs is `keycast-core`'s job; this module stores and finds rows.

use crate::pool::on_engine;
use crate::{Db, RepoError};

/// A registered client as stored. `redirect_uris` is a JSON array of strings.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ClientRow {
    pub client_id: String,
    pub name: String,
    pub redirect_uris: String,
    pub logo_url: Option<String>,
    pub created_at: i64,
}

macro_rules! columns {
    () => {
        "client_id, name, redirect_uris, logo_url, created_at"
    };
}

/// Stores a client. Returns `false` (nothing stored) when `client_id` is taken.
///
/// # Errors
/// Database errors.
pub async fn insert(db: &Db, row: &ClientRow) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query(
            "INSERT INTO oauth_clients (client_id, name, redirect_uris, logo_url, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id) DO NOTHING",
        )
        .bind(&row.client_id)
        .bind(&row.name)
        .bind(&row.redirect_uris)
        .bind(&row.logo_url)
        .bind(row.created_at)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// The client registered as `client_id`, if any.
///
/// # Errors
/// Database errors.
pub async fn find_by_id(db: &Db, client_id: &str) -> Result<Option<ClientRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!("SELECT ", columns!(), " FROM oauth_clients WHERE client_id = $1");
        Ok(sqlx::query_as(sql).bind(client_id).fetch_optional(pool).await?)
    })
}

/// Every registered client, oldest first.
///
/// # Errors
/// Database errors.
pub async fn list(db: &Db) -> Result<Vec<ClientRow>, RepoError> {
    on_engine!(db, |pool| {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM oauth_clients ORDER BY created_at, client_id"
        );
        Ok(sqlx::query_as(sql).fetch_all(pool).await?)
    })
}

/// Removes a client's registration (its grants stay until their owners revoke them).
/// Returns whether there was one.
///
/// # Errors
/// Database errors.
pub async fn delete(db: &Db, client_id: &str) -> Result<bool, RepoError> {
    on_engine!(db, |pool| {
        let done = sqlx::query("DELETE FROM oauth_clients WHERE client_id = $1")
            .bind(client_id)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    fn row(id: &str, at: i64) -> ClientRow {
        ClientRow {
            client_id: id.into(),
            name: "Damus Web".into(),
            redirect_uris: r#"["https://damus.example/cb"]"#.into(),
            logo_url: None,
            created_at: at,
        }
    }

    #[tokio::test]
    async fn clients_are_stored_listed_found_and_deleted() {
        for (_guard, db) in temp_dbs().await {
            assert!(insert(&db, &row("app_b", 2)).await.unwrap());
            assert!(insert(&db, &row("app_a", 1)).await.unwrap());
            assert!(
                !insert(&db, &row("app_a", 3)).await.unwrap(),
                "an id is registered once"
            );
            let ids: Vec<_> = list(&db).await.unwrap().into_iter().map(|c| c.client_id).collect();
            assert_eq!(ids, ["app_a", "app_b"]);
            assert_eq!(find_by_id(&db, "app_a").await.unwrap(), Some(row("app_a", 1)));
            assert!(delete(&db, "app_a").await.unwrap());
            assert!(!delete(&db, "app_a").await.unwrap());
            assert_eq!(find_by_id(&db, "app_a").await.unwrap(), None);
        }
    }
}
