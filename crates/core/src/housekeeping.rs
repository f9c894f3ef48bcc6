//! Rows whose time is over: expired sessions, mailed tokens, OAuth codes, access tokens,
//! refresh tokens and approvals, and the older activity of revoked grants. Each is refused once expired
//! anyway; removing them keeps the database (on Cloud Run, memory) from growing by every
//! login and every hourly token refresh for good.
//!
//! Spent refresh tokens are kept for [`SPENT_REFRESH_MEMORY_SECS`] past their expiry: one
//! presented again is reuse, which revokes its authorization (RFC 9700 §4.14), and that
//! detection should outlive the token's own life by a margin. After that it is unknown.
//!
//! A deleted custom policy goes once nothing names it (a revoked grant's page shows its
//! policy, so a policy a grant names stays).
//!
//! A grant that is over (revoked, or past its chosen duration) keeps its newest
//! [`KEPT_PER_REVOKED_GRANT`] signatures and as many other activity records (what its page
//! shows), its total of signatures still counted: an account may start a grant a minute, and
//! each could otherwise keep a live grant's whole record for good.

use keycast_db::activity::{self, Prune};
use keycast_db::{approvals, oauth, policies, refresh, sessions, Db, RepoError};

/// Activity records of each class (signatures, the rest) a revoked or expired grant keeps.
pub const KEPT_PER_REVOKED_GRANT: u32 = 20;

/// Revoked grants trimmed per transaction.
const TRIM_BATCH: i64 = 500;

/// How long past its expiry a refresh token is remembered, for reuse detection: 30 days.
pub const SPENT_REFRESH_MEMORY_SECS: i64 = 30 * 24 * 3600;

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub sessions: u64,
    pub mailed_tokens: u64,
    pub codes: u64,
    pub access_tokens: u64,
    pub refresh_tokens: u64,
    /// Approvals past their time, decided or not (each holds its request, up to ~90 KB
    /// sealed; before, only the grant's next request removed them — a revoked grant's never).
    pub approvals: u64,
    /// Activity records of revoked or expired grants beyond their newest
    /// [`KEPT_PER_REVOKED_GRANT`].
    pub revoked_activity: u64,
    /// Deleted custom policies nothing names any more.
    pub deleted_policies: u64,
}

impl Swept {
    /// Rows removed in all.
    pub fn total(&self) -> u64 {
        self.sessions
            + self.mailed_tokens
            + self.codes
            + self.access_tokens
            + self.refresh_tokens
            + self.approvals
            + self.revoked_activity
            + self.deleted_policies
    }
}

/// Removes what expired by `now` (refresh tokens: by `now` minus
/// [`SPENT_REFRESH_MEMORY_SECS`]).
///
/// # Errors
/// Storage errors (what was removed before the failing statement stays removed).
pub async fn sweep_expired(db: &Db, now: i64) -> Result<Swept, RepoError> {
    Ok(Swept {
        sessions: sessions::delete_expired(db, now).await?,
        mailed_tokens: sessions::delete_expired_user_tokens(db, now).await?,
        codes: oauth::delete_expired_codes(db, now).await?,
        access_tokens: oauth::delete_expired_tokens(db, now).await?,
        refresh_tokens: refresh::delete_expired(db, now - SPENT_REFRESH_MEMORY_SECS).await?,
        approvals: approvals::delete_expired(db, now).await?,
        revoked_activity: trim_over(db, now).await?,
        deleted_policies: policies::purge_deleted(db).await?,
    })
}

/// Trims the record of every grant that is over (revoked, or past its duration) to its
/// newest [`KEPT_PER_REVOKED_GRANT`], a batch of grants per transaction.
async fn trim_over(db: &Db, now: i64) -> Result<u64, RepoError> {
    let mut removed = 0;
    loop {
        let ids = activity::over_with_more_than(db, KEPT_PER_REVOKED_GRANT, TRIM_BATCH, now).await?;
        let grants: Vec<Prune> = ids
            .into_iter()
            .map(|authorization_id| Prune {
                authorization_id,
                protect_since: None,
            })
            .collect();
        removed += activity::prune(db, KEPT_PER_REVOKED_GRANT, &grants).await?;
        if (grants.len() as i64) < TRIM_BATCH {
            return Ok(removed);
        }
    }
}
