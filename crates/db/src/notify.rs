//! Change notices between instances on one PostgreSQL database: `NOTIFY` on
//! [`CHANNEL`], heard by every instance's [`Listener`] (`LISTEN`).
//!
//! A notice is delivered to every listening session when the sending transaction
//! commits, in commit order; notices from one sender therefore arrive in the order sent.
//! They are not stored: a listener that loses its connection misses what was sent
//! meanwhile, and [`Heard::Lost`] says so, so the caller can stop trusting what it cached.
//!
//! `LISTEN` belongs to a session: behind a transaction-mode pooler the listener must
//! connect directly (`KEYCAST_DATABASE_DIRECT_URL`).
//!
//! A session can also die without a word: an idle TCP connection whose NAT mapping
//! expired, a partition. Nothing is sent on a listening session, so nothing would ever
//! fail, and the instance would trust its caches for good while missing every change.
//! Every instance's heartbeat therefore also sends a notice (see `crate::cluster`), which
//! every listener hears, its own included; a listener that hears nothing at all for its
//! silence limit takes its session for dead ([`Heard::Lost`]) and reconnects.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::pool::Engine;
use crate::{Db, PgOptions, RepoError};

/// The channel keycast's instances talk on.
pub const CHANNEL: &str = "keycast_changes";

/// Sends `payload` (at most 7999 bytes) to every listening instance, this one included.
///
/// # Errors
/// [`RepoError::Unsupported`] on SQLite; database errors.
pub async fn notify(db: &Db, payload: &str) -> Result<(), RepoError> {
    let Engine::Postgres(pool) = db.engine() else {
        return Err(RepoError::Unsupported("change notices exist on PostgreSQL only"));
    };
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(pool)
        .await?;
    Ok(())
}

/// What [`Listener::next`] heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A notice's payload.
    Notice(String),
    /// The connection was lost (notices may have been missed); the listener reconnects on
    /// the next call.
    Lost,
    /// Listening again after [`Heard::Lost`] (or for the first time).
    Listening,
}

/// A session that `LISTEN`s on [`CHANNEL`], reconnecting when its connection drops or
/// falls silent.
pub struct Listener {
    options: PgOptions,
    inner: Option<PgListener>,
    /// Hearing nothing (not even a heartbeat's notice) for this long means the session is
    /// dead.
    silence_limit: Duration,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("server", &self.options.describe())
            .field("listening", &self.inner.is_some())
            .finish()
    }
}

impl Listener {
    /// Connects and listens. A session that hears nothing for `silence_limit` is taken for
    /// dead: the heartbeats of the instances on the database must come more often.
    ///
    /// # Errors
    /// The server cannot be reached or refuses the session.
    pub async fn connect(options: &PgOptions, silence_limit: Duration) -> Result<Listener, RepoError> {
        let mut listener = Listener {
            options: options.clone(),
            inner: None,
            silence_limit,
        };
        listener.inner = Some(listener.open_within().await?);
        Ok(listener)
    }

    /// [`Listener::open`], given up after the silence limit: a server behind a dead link
    /// may accept the connection and never answer.
    async fn open_within(&self) -> Result<PgListener, RepoError> {
        match tokio::time::timeout(self.silence_limit, self.open()).await {
            Ok(opened) => opened,
            // What sqlx says of a connection that did not come in time.
            Err(_) => Err(RepoError::Busy(sqlx::Error::PoolTimedOut)),
        }
    }

    async fn open(&self) -> Result<PgListener, RepoError> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.options.acquire_timeout)
            .connect_lazy_with(self.options.connect_options()?);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    /// The next thing heard. After [`Heard::Lost`], reconnects (retrying every second
    /// while the server is unreachable) and returns [`Heard::Listening`] once it listens.
    pub async fn next(&mut self) -> Heard {
        loop {
            let Some(listener) = self.inner.as_mut() else {
                match self.open_within().await {
                    Ok(listener) => {
                        self.inner = Some(listener);
                        return Heard::Listening;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot listen for other instances' changes; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            };
            // Cancelling a read can leave the session mid-message: it is dropped then anyway.
            match tokio::time::timeout(self.silence_limit, listener.try_recv()).await {
                Ok(Ok(Some(notice))) => return Heard::Notice(notice.payload().to_owned()),
                Ok(Ok(None) | Err(_)) => {
                    self.inner = None;
                    return Heard::Lost;
                }
                Err(_) => {
                    tracing::warn!(
                        silence_ms = self.silence_limit.as_millis() as u64,
                        "heard nothing on the session that listens for other instances' changes, not even a heartbeat: taking it for dead"
                    );
                    self.inner = None;
                    return Heard::Lost;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dbs;

    #[tokio::test]
    async fn notices_reach_listeners_in_the_order_sent() {
        for (guard, db) in temp_dbs().await {
            let crate::testing::Guard::Postgres(scratch) = &guard else {
                assert!(notify(&db, "x").await.is_err());
                continue;
            };
            let mut listener = Listener::connect(&PgOptions::new(&scratch.url), Duration::from_secs(30))
                .await
                .unwrap();
            for n in 0..5 {
                notify(&db, &format!("n{n}")).await.unwrap();
            }
            for n in 0..5 {
                assert_eq!(listener.next().await, Heard::Notice(format!("n{n}")));
            }
        }
    }
}
