//! The one error type of the repositories.

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
    /// The operation exists on the other engine only (instance membership on SQLite).
    #[error("not available on this database engine: {0}")]
    Unsupported(&'static str),
    /// Any other database failure.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for RepoError {
    fn from(err: sqlx::Error) -> Self {
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
        }
        RepoError::Database(err)
    }
}

impl RepoError {
    /// True when a unique constraint on something named `what` (a column such as
    /// `email`, `username`, `pubkey`) refused the row.
    pub fn is_duplicate_of(&self, what: &str) -> bool {
        matches!(self, RepoError::AlreadyExists { constraint } if constraint.contains(what))
    }
}
