//! Statements with `RETURNING`, run to their end.
//!
//! On SQLite, a statement outside a transaction commits when it finishes, and an immediate
//! foreign key is checked when the statement ends too. sqlx's `fetch_one` and
//! `fetch_optional` stop at the first row and reset the statement, dropping whatever error
//! its end returns (sqlx issues #2099 and #3430; rusqlite #995 is the same in another
//! driver). The caller is handed a row that was rolled back: on a full disk, an I/O error,
//! or a reference to a row deleted meanwhile. So every repository statement with
//! `RETURNING` uses `fetch_all`, which steps it to the end, and takes its row here. A test
//! below holds every `RETURNING` in this crate to that.

use crate::RepoError;

/// The row a `fetch_all` of a statement with `RETURNING` gave back.
pub(crate) trait Returned<T> {
    /// The first row; `RowNotFound` when there was none (as `fetch_one`).
    fn into_one(self) -> Result<T, RepoError>;
    /// The first row, if any (as `fetch_optional`).
    fn into_first(self) -> Option<T>;
}

impl<T> Returned<T> for Vec<T> {
    fn into_one(self) -> Result<T, RepoError> {
        self.into_first().ok_or(RepoError::Database(sqlx::Error::RowNotFound))
    }

    fn into_first(self) -> Option<T> {
        self.into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::Returned;
    use crate::testing::temp_db;
    use crate::RepoError;

    /// A statement whose first row is produced and whose end fails: a foreign key checked
    /// at commit, standing in for a full disk or an I/O error there (`disk_full.rs` has
    /// the real thing against the binary).
    #[tokio::test]
    async fn a_commit_that_fails_at_the_statements_end_is_reported() {
        let (_dir, db) = temp_db().await;
        let pool = db.as_sqlite().unwrap();
        sqlx::query("CREATE TABLE t (user_id TEXT REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED)")
            .execute(pool)
            .await
            .unwrap();
        let insert = "INSERT INTO t (user_id) VALUES ('nobody') RETURNING user_id";
        let dropped: Option<String> = sqlx::query_scalar(insert).fetch_optional(pool).await.unwrap();
        assert_eq!(
            dropped.as_deref(),
            Some("nobody"),
            "sqlx still drops it: this module may go"
        );
        let reported = sqlx::query_scalar::<_, String>(insert)
            .fetch_all(pool)
            .await
            .map_err(RepoError::from)
            .map(Returned::into_first);
        assert!(matches!(reported, Err(RepoError::MissingReference)), "{reported:?}");
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(rows, 0);
    }

    /// Every `RETURNING` in this crate's SQL is followed by `fetch_all`, never by
    /// `fetch_one` or `fetch_optional` (see the module's documentation).
    #[test]
    fn every_returning_statement_runs_to_its_end() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut checked = 0;
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.ends_with("returning.rs") {
                continue;
            }
            let code = std::fs::read_to_string(&path).unwrap();
            for (at, _) in code.match_indices("RETURNING") {
                let line_start = code[..at].rfind('\n').map_or(0, |i| i + 1);
                if code[line_start..at].trim_start().starts_with("//") {
                    continue;
                }
                let rest = &code[at..];
                let Some(fetch) = rest.find(".fetch_") else { continue };
                let call: String = rest[fetch..].chars().take_while(|c| *c != '(').collect();
                let line = code[..at].lines().count();
                assert_eq!(call, ".fetch_all", "{}:{line}: a RETURNING statement", path.display());
                checked += 1;
            }
        }
        assert!(checked >= 13, "the scan found only {checked} RETURNING statements");
    }
}
