//! The one error type of the repositories.

/// Writes the database refused because its disk is full (`KeycastDatabaseDiskFull`).
pub const DISK_FULL_METRIC: &str = "keycast_database_disk_full_total";

/// Why a repository call failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A unique constraint refused the row: the email, username, pubkey or id is taken.
    /// `constraint` names what collided as the engine reported it (for example
    /// `users.email` on SQLite, `users_email_key` on PostgreSQL).
    #[error("already exists: {constraint}")]
    AlreadyExists { constraint: String },
    /// A row referenced by this one does not exist (unknown user, policy, authorization).
    #[error("a referenced row does not exist")]
    MissingReference,
    /// A stored value could not be read back (for example an unknown enum text).
    #[error("stored value is invalid: {0}")]
    Corrupt(String),
    /// A per-account bound refused the row: the account already has the most of these
    /// (`live authorizations`) it may have.
    #[error("the account already has the most {0} it may have")]
    TooMany(&'static str),
    /// The session that asked for the row ended before it was written (signed out, or a
    /// password change or reset ended every session): nothing was written.
    #[error(
        "your session ended while this was under way (signed out, or the password was changed or reset); \
         nothing was authorized. Log in again"
    )]
    SessionEnded,
    /// The operation exists on the other engine only (instance membership on SQLite).
    #[error("not available on this database engine: {0}")]
    Unsupported(&'static str),
    /// The database's disk is full (SQLite `SQLITE_FULL`, PostgreSQL `disk_full`): the write
    /// was not made. It works again once space is freed, without a restart.
    #[error("the database's disk is full, so the write was not made: {0}")]
    StorageFull(#[source] sqlx::Error),
    /// The database stayed busy past the wait (SQLite's busy timeout, PostgreSQL's lock
    /// wait, a serialization failure or deadlock, or no pooled connection in time): nothing
    /// is wrong, and the same request may succeed in a moment.
    #[error("the database is busy: {0}")]
    Busy(#[source] sqlx::Error),
    /// Any other database failure (with a hint when it is a pooler's doing, see
    /// [`pooler_hint`]).
    #[error("database error: {0}{hint}", hint = pooler_hint(.0))]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for RepoError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::PoolTimedOut = err {
            return RepoError::Busy(err);
        }
        if let sqlx::Error::Database(db) = &err {
            if db.is_unique_violation() {
                let constraint = db
                    .constraint()
                    .map(str::to_owned)
                    .unwrap_or_else(|| db.message().trim_start_matches("UNIQUE constraint failed: ").to_owned());
                return RepoError::AlreadyExists { constraint };
            }
            if db.is_foreign_key_violation() {
                return RepoError::MissingReference;
            }
            // SQLITE_FULL (13, no extended codes); PostgreSQL's SQLSTATE 53100.
            if matches!(db.code().as_deref(), Some("13" | "53100")) {
                // Counted here, where every refused write passes: the alert must not depend
                // on which caller met it (signing goes on, so the 5xx rate may stay low).
                metrics::counter!(DISK_FULL_METRIC).increment(1);
                return RepoError::StorageFull(err);
            }
            // SQLITE_BUSY and SQLITE_LOCKED with their extended codes; PostgreSQL's
            // lock_not_available, serialization_failure and deadlock_detected.
            let busy = ["5", "6", "261", "262", "517", "773", "55P03", "40001", "40P01"];
            if db.code().is_some_and(|code| busy.contains(&code.as_ref())) {
                return RepoError::Busy(err);
            }
        }
        RepoError::Database(err)
    }
}

/// What to do when PostgreSQL refuses one of sqlx's named prepared statements (`sqlx_s_N`
/// "already exists" or "does not exist"): sqlx prepares each query once per connection and
/// reuses it by name, so a pooler in transaction mode that hands one client's statements to
/// another client's server connection (PgBouncer before 1.21, or 1.21+ with
/// `max_prepared_statements = 0`) breaks every query. The raw message names none of that.
pub(crate) fn pooler_hint(err: &sqlx::Error) -> &'static str {
    let sqlx::Error::Database(db) = err else {
        return "";
    };
    // 42P05 duplicate_prepared_statement, 26000 invalid_sql_statement_name.
    let clash = matches!(db.code().as_deref(), Some("42P05" | "26000")) && db.message().contains("sqlx_s_");
    if clash {
        " (DATABASE_URL seems to go through a connection pooler in transaction mode that does not \
         keep prepared statements apart: use PgBouncer 1.21 or newer with max_prepared_statements \
         set, session mode, or a direct connection; see docs/POSTGRESQL.md)"
    } else {
        ""
    }
}

impl RepoError {
    /// True when a unique constraint on something named `what` (a column such as
    /// `email`, `username`, `pubkey`) refused the row.
    pub fn is_duplicate_of(&self, what: &str) -> bool {
        matches!(self, RepoError::AlreadyExists { constraint } if constraint.contains(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that waits out SQLite's busy timeout behind another writer is `Busy`.
    #[tokio::test]
    async fn a_write_that_outwaits_the_busy_timeout_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let options = crate::DbOptions {
            busy_timeout: std::time::Duration::from_millis(50),
            ..crate::DbOptions::new(dir.path().join("k.db"))
        };
        let db = crate::Db::open_sqlite(&options).await.unwrap();
        let pool = db.as_sqlite().unwrap();
        let mut holder = pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *holder).await.unwrap();
        let err: RepoError = sqlx::query("CREATE TABLE t (x)")
            .execute(pool)
            .await
            .unwrap_err()
            .into();
        assert!(matches!(err, RepoError::Busy(_)), "{err:?}");
        sqlx::query("ROLLBACK").execute(&mut *holder).await.unwrap();
    }
}
