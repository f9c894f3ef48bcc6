//! Rate limits (issue 12, item 5): token buckets per client for login, registration, mail
//! requests and password reset, and a failure backoff per account *and* client for
//! passwords.
//!
//! # One instance or many
//! On SQLite (one instance) the buckets live in this process's memory: a write per login
//! attempt would cost a replica upload. On PostgreSQL, where any number of instances serve
//! behind one load balancer, [`RateLimits::share`] moves them into the database
//! (`keycast_db::limits`, one atomic upsert per check), so every instance counts against
//! the same limits — a limit per instance multiplied by N instances is not a limit. Keys
//! are stored hashed (they contain email and client addresses).
//!
//! # Who is the client
//! The peer address of the TCP connection, unless `KEYCAST_TRUSTED_PROXY_HOPS` says how
//! many proxies in front of keycast append to `X-Forwarded-For`: then the entry that many
//! places from the right is the client (entries to its left are whatever the client sent,
//! so they are never trusted). Cloud Run's front end appends one entry (hops = 1); a Google
//! external Application Load Balancer in front of Cloud Run appends the client and its own
//! address (hops = 2). Off by default: exposed directly, the header is the attacker's to
//! write. IPv6 clients are bucketed by their /64 (one subscriber's whole network), IPv4
//! clients by address.
//!
//! # Lockout that others cannot trigger
//! Wrong passwords count per account *and* client: after [`FREE_FAILURES`] a client waits
//! 1 s, then 2 s, 4 s … up to [`MAX_BACKOFF`] before its next try for that account, and a
//! success clears the count. Someone guessing at an account slows down only themselves; the
//! owner, from their own address, logs in as usual. The per-client buckets bound how many
//! accounts one client can try.
//!
//! # Expiry
//! Buckets live in `moka` caches with a time-to-idle and a capacity: expiry is O(1)
//! amortised, and no request ever waits for a sweep of the whole map under one lock.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use keycast_db::limits::{self as shared, Attempt};
use keycast_db::Db;
use moka::sync::Cache;

use crate::session::now_ms;
use crate::AppError;

/// Buckets kept at most (each a few dozen bytes); the least useful go first beyond it.
const MAX_BUCKETS: u64 = 200_000;
/// A bucket unused this long is forgotten (every rate below refills fully within it).
const IDLE: Duration = Duration::from_secs(3600);
/// Wrong passwords per account and client before the backoff starts.
pub const FREE_FAILURES: u32 = 5;
/// The longest wait between two tries of one client at one account.
pub const MAX_BACKOFF: Duration = Duration::from_secs(900);

/// A bucket's shape: `burst` attempts at once, one more every `refill`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub burst: u32,
    pub refill: Duration,
}

/// Login: 10 per client then one per 6 s (any accounts; see [`FREE_FAILURES`] per account).
pub const LOGIN_PER_IP: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(6),
};
/// Registration: 20 per client then one per 30 s.
pub const REGISTER_PER_IP: Rate = Rate {
    burst: 20,
    refill: Duration::from_secs(30),
};
/// Mail on request (password reset, verification again), each purpose its own buckets: 3
/// per email then one per 5 minutes; 10 per client then one per minute. (A mail reaches
/// only the account's own mailbox, so the per-email bucket cannot lock anyone out of
/// anything but more mail.)
pub const MAIL_PER_EMAIL: Rate = Rate {
    burst: 3,
    refill: Duration::from_secs(300),
};
pub const MAIL_PER_IP: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(60),
};
/// Submitting a mailed token (new password, confirming an email): 10 per client then one
/// per minute.
pub const RESET_PER_IP: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(60),
};

/// New grants (OAuth consents, `nostrconnect://` acceptances) per account: 30 then one a
/// minute. With the cap on live grants it bounds the rows one account's script can make
/// (codes live ten minutes, revoked grants stay listed).
pub const GRANTS_PER_ACCOUNT: Rate = Rate {
    burst: 30,
    refill: Duration::from_secs(60),
};

/// Key exports, new keys and password changes per account: 10, then one every 6 minutes. Each is
/// recorded in the account's events and mailed to the account: a loop of them, with the right
/// password, would otherwise grow the database and spend the operator's mail quota (and so
/// every other account's verification and reset mail) without bound.
pub const NOTICED_CHANGES_PER_ACCOUNT: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(360),
};

/// Token refreshes per grant: 5 at once, then one every 5 minutes — an app refreshing as its
/// access token (an hour) expires, or after a restart, fits; a pair stored per refresh stays
/// a month.
pub const REFRESHES_PER_GRANT: Rate = Rate {
    burst: 5,
    refill: Duration::from_secs(300),
};

/// Edits of custom policies and grants per account: 30, then one every 10 s. Each is made
/// durable and (PostgreSQL) makes every instance drop cached grants.
pub const EDITS_PER_ACCOUNT: Rate = Rate {
    burst: 30,
    refill: Duration::from_secs(10),
};

/// New custom policies per account: 30 then one a minute.
pub const POLICIES_PER_ACCOUNT: Rate = Rate {
    burst: 30,
    refill: Duration::from_secs(60),
};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Its tokens at `now`, refilled at `rate` since it was last updated.
    fn refilled(&self, rate: Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed / rate.refill.as_secs_f64()).min(f64::from(rate.burst))
    }
}

/// The refusal of a bucket with `tokens` left: when the next whole one is in.
fn too_many(tokens: f64, rate: Rate) -> AppError {
    let wait = ((1.0 - tokens) * rate.refill.as_secs_f64()).ceil() as u64;
    AppError::TooManyRequests {
        retry_after_secs: wait.max(1),
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Failures {
    count: u32,
    /// No try before this.
    until: Option<Instant>,
}

/// All buckets and failure counts.
pub struct RateLimits {
    buckets: Cache<String, Arc<Mutex<Bucket>>>,
    failures: Cache<String, Arc<Mutex<Failures>>>,
    trusted_proxy_hops: usize,
    /// Set on PostgreSQL: the buckets every instance shares, instead of the two caches.
    shared: OnceLock<Db>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("buckets", &self.buckets.entry_count())
            .field("trusted_proxy_hops", &self.trusted_proxy_hops)
            .finish_non_exhaustive()
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new(0)
    }
}

impl RateLimits {
    /// Limits that take the client from `X-Forwarded-For` behind `trusted_proxy_hops`
    /// proxies (0: the peer address).
    pub fn new(trusted_proxy_hops: usize) -> RateLimits {
        RateLimits {
            buckets: Cache::builder().max_capacity(MAX_BUCKETS).time_to_idle(IDLE).build(),
            failures: Cache::builder().max_capacity(MAX_BUCKETS).time_to_idle(IDLE).build(),
            trusted_proxy_hops,
            shared: OnceLock::new(),
        }
    }

    /// Keeps every bucket and failure count in `db` from now on (PostgreSQL, several
    /// instances). Set once; later calls are ignored.
    pub fn share(&self, db: Db) {
        let _ = self.shared.set(db);
    }

    /// Takes one attempt from the bucket `key` of shape `rate`.
    ///
    /// # Errors
    /// [`AppError::TooManyRequests`] with the seconds until the next attempt is allowed;
    /// [`AppError::Unavailable`] when the shared buckets cannot be read (fails closed: a
    /// limit that guards passwords is not skipped).
    pub async fn check(&self, key: &str, rate: Rate) -> Result<(), AppError> {
        let Some(db) = self.shared.get() else {
            return self.check_local(key, rate);
        };
        let key = &stored_key(key);
        let interval = i64::try_from(rate.refill.as_millis()).unwrap_or(i64::MAX);
        match shared::take(db, key, rate.burst, interval, now_ms())
            .await
            .map_err(unavailable)?
        {
            Attempt::Allowed => Ok(()),
            Attempt::Refused { retry_after_ms } => Err(AppError::TooManyRequests {
                retry_after_secs: secs_ceil(retry_after_ms),
            }),
        }
    }

    /// Starts a password try for `key` (account and client): refused while its backoff runs,
    /// else counted as a failure at once — a right password clears the count
    /// ([`RateLimits::password_succeeded`]). Counted as it starts, not once it is judged:
    /// hashing takes a while, and tries sent all at once would otherwise all pass this check
    /// before the first had failed. Past [`FREE_FAILURES`], the next try waits.
    ///
    /// # Errors
    /// [`AppError::TooManyRequests`] with the seconds left; [`AppError::Unavailable`] as
    /// [`RateLimits::check`].
    pub async fn start_password_try(&self, key: &str) -> Result<(), AppError> {
        let Some(db) = self.shared.get() else {
            return self.start_password_try_local(key);
        };
        match shared::start_try(db, &stored_key(key), now_ms(), backoff_schedule())
            .await
            .map_err(unavailable)?
        {
            None => Ok(()),
            Some(wait_ms) => Err(AppError::TooManyRequests {
                retry_after_secs: secs_ceil(wait_ms),
            }),
        }
    }

    /// Whether the bucket `key` of shape `rate` has an attempt left, taking none: for a budget
    /// spent only by what succeeds (a change its password allows), asked before the work that
    /// decides it (the password's argon2), then taken with [`RateLimits::check`]. Taken before
    /// and given back after, a request cancelled in between (a client that hangs up) kept it.
    ///
    /// # Errors
    /// As [`RateLimits::check`].
    pub async fn peek(&self, key: &str, rate: Rate) -> Result<(), AppError> {
        let Some(db) = self.shared.get() else {
            return self.peek_local(key, rate);
        };
        let interval = i64::try_from(rate.refill.as_millis()).unwrap_or(i64::MAX);
        match shared::peek(db, &stored_key(key), rate.burst, interval, now_ms())
            .await
            .map_err(unavailable)?
        {
            Attempt::Allowed => Ok(()),
            Attempt::Refused { retry_after_ms } => Err(AppError::TooManyRequests {
                retry_after_secs: secs_ceil(retry_after_ms),
            }),
        }
    }

    /// Uncounts a try [`RateLimits::start_password_try`] counted that ended without a verdict
    /// on the password — the hashing queue full, keycast starting, the database failing. Such
    /// an answer tells nothing about the password, so it buys no guess; counted, it would let
    /// a flood of other people's logins back the owner off their own account.
    pub async fn password_unjudged(&self, key: &str) {
        let Some(db) = self.shared.get() else {
            if let Some(entry) = self.failures.get(key) {
                let mut failures = entry.lock().unwrap_or_else(|p| p.into_inner());
                failures.count = failures.count.saturating_sub(1);
                if backoff(failures.count).is_none() {
                    failures.until = None;
                }
            }
            return;
        };
        if let Err(err) = shared::uncount_try(db, &stored_key(key), backoff_schedule()).await {
            tracing::warn!(error = %err, "cannot uncount an unjudged password try in the shared limits");
        }
    }

    /// Clears `key`'s failures after a right password.
    pub async fn password_succeeded(&self, key: &str) {
        let Some(db) = self.shared.get() else {
            return self.password_succeeded_local(key);
        };
        let key = &stored_key(key);
        if let Err(err) = shared::clear_failures(db, key).await {
            tracing::warn!(error = %err, "cannot clear the failures of a right password in the shared limits");
        }
    }

    fn check_local(&self, key: &str, rate: Rate) -> Result<(), AppError> {
        let now = Instant::now();
        let bucket = self.buckets.get_with_by_ref(key, || {
            Arc::new(Mutex::new(Bucket {
                tokens: f64::from(rate.burst),
                updated: now,
            }))
        });
        let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
        bucket.tokens = bucket.refilled(rate, now);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(too_many(bucket.tokens, rate))
    }

    fn peek_local(&self, key: &str, rate: Rate) -> Result<(), AppError> {
        let Some(bucket) = self.buckets.get(key) else {
            return Ok(());
        };
        let bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
        match bucket.refilled(rate, Instant::now()) {
            tokens if tokens >= 1.0 => Ok(()),
            tokens => Err(too_many(tokens, rate)),
        }
    }

    fn start_password_try_local(&self, key: &str) -> Result<(), AppError> {
        let entry = self
            .failures
            .get_with_by_ref(key, || Arc::new(Mutex::new(Failures::default())));
        // The check and the count under one lock: tries at once take turns here.
        let mut failures = entry.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(until) = failures.until.filter(|until| *until > now) {
            return Err(AppError::TooManyRequests {
                retry_after_secs: until.saturating_duration_since(now).as_secs().max(1),
            });
        }
        failures.count = failures.count.saturating_add(1);
        if let Some(wait) = backoff(failures.count) {
            failures.until = Some(now + wait);
        }
        Ok(())
    }

    fn password_succeeded_local(&self, key: &str) {
        self.failures.invalidate(key);
    }

    /// The rate-limit key of the request's client (see the module doc): `v4:1.2.3.4`,
    /// `v6:2001:db8:1:2::/64`, or `unknown`.
    pub fn client_key(&self, parts: &Parts) -> String {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let client = match self.trusted_proxy_hops {
            0 => peer,
            hops => forwarded_client(parts, hops).or(peer),
        };
        client.map(bucket_of).unwrap_or_else(|| "unknown".into())
    }
}

/// The wait before the next try after `count` wrong passwords: none up to
/// [`FREE_FAILURES`], then 1 s, 2 s, 4 s … up to [`MAX_BACKOFF`].
fn backoff(count: u32) -> Option<Duration> {
    let over = count.checked_sub(FREE_FAILURES)?;
    Some(Duration::from_secs(1u64 << over.min(20)).min(MAX_BACKOFF))
}

/// What a shared bucket is stored under: SHA-256 of its key, so the table holds no email
/// address or client address in the clear.
fn stored_key(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn secs_ceil(ms: i64) -> u64 {
    u64::try_from((ms + 999) / 1000).unwrap_or(1).max(1)
}

fn unavailable(err: keycast_db::RepoError) -> AppError {
    if let keycast_db::RepoError::StorageFull(_) = err {
        // Each check writes its bucket: on a full disk say so, as every other write does.
        return err.into();
    }
    tracing::warn!(error = %err, "cannot read the shared rate limits");
    AppError::Unavailable("rate limits cannot be checked right now; retry in a moment".into())
}

/// The `X-Forwarded-For` entry `hops` places from the right, when there are that many.
fn forwarded_client(parts: &Parts, hops: usize) -> Option<IpAddr> {
    let entries: Vec<&str> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let entry = entries.len().checked_sub(hops).map(|i| entries[i])?;
    entry.parse().ok()
}

/// IPv4 by address (an IPv4-mapped IPv6 address counts as IPv4), IPv6 by its /64.
fn bucket_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("v4:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("v4:{v4}"),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("v6:{net}/64")
            }
        },
    }
}

fn backoff_schedule() -> shared::Backoff {
    shared::Backoff {
        free: FREE_FAILURES,
        max_ms: i64::try_from(MAX_BACKOFF.as_millis()).unwrap_or(i64::MAX),
    }
}

/// The key of the password backoff of the account `email` names, for the client `ip`. Keyed
/// by the address as accounts store it: the field as sent may be as long as a body, and the
/// key is kept for an hour; a malformed address names no account, so all of a client's
/// share one key.
pub fn password_key(email: &str, ip: &str) -> String {
    let email = keycast_core::accounts::normalize_email(email).unwrap_or_default();
    format!("password:{email}|{ip}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On PostgreSQL each check writes its bucket: with the disk full the client hears
    /// that (503, `Retry-After`), not that the limits cannot be checked.
    #[test]
    fn a_full_database_disk_under_the_shared_limits_says_so() {
        let full = keycast_db::RepoError::StorageFull(sqlx::Error::Protocol("could not extend file".into()));
        let response = axum::response::IntoResponse::into_response(unavailable(full));
        assert_eq!(response.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        let message = &response.extensions().get::<crate::error::ErrorMessage>().unwrap().0;
        assert!(message.contains("disk is full"), "{message}");
        let other = unavailable(keycast_db::RepoError::Database(sqlx::Error::PoolTimedOut));
        assert!(other.to_string().contains("rate limits cannot be checked"), "{other}");
    }
    use axum::http::Request;

    fn parts(xff: Option<&str>, peer: &str) -> Parts {
        let mut builder = Request::builder();
        if let Some(x) = xff {
            builder = builder.header("x-forwarded-for", x);
        }
        let (mut parts, _) = builder.body(()).unwrap().into_parts();
        parts
            .extensions
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        parts
    }

    /// Each key is kept for an hour, 200,000 of them: before, an anonymous login kept its
    /// email field whole (up to the body limit) in its key.
    #[test]
    fn a_password_backoff_key_holds_the_stored_address_never_the_field_as_sent() {
        assert_eq!(
            password_key("  Owner@Example.org ", "v4:1.2.3.4"),
            password_key("owner@example.org", "v4:1.2.3.4"),
            "the account's own key, however the address is typed"
        );
        let huge = format!("{}@example.org", "a".repeat(60_000));
        assert_eq!(password_key(&huge, "v4:1.2.3.4"), "password:|v4:1.2.3.4");
        assert_eq!(password_key("no at sign", "v4:1.2.3.4"), "password:|v4:1.2.3.4");
    }

    #[test]
    fn a_bucket_allows_its_burst_then_says_when_to_retry() {
        let limits = RateLimits::default();
        let rate = Rate {
            burst: 2,
            refill: Duration::from_secs(60),
        };
        limits.check_local("k", rate).unwrap();
        limits.check_local("k", rate).unwrap();
        match limits.check_local("k", rate) {
            Err(AppError::TooManyRequests { retry_after_secs }) => assert!((59..=60).contains(&retry_after_secs)),
            other => panic!("{other:?}"),
        }
        limits.check_local("other", rate).unwrap();
    }

    #[test]
    fn forwarded_for_counts_only_behind_trusted_proxies_and_only_their_entry() {
        let direct = RateLimits::new(0);
        assert_eq!(
            direct.client_key(&parts(Some("203.0.113.9"), "10.0.0.1:5")),
            "v4:10.0.0.1"
        );
        let cloud_run = RateLimits::new(1);
        let spoofed = parts(Some("198.51.100.1, 203.0.113.9"), "10.0.0.1:5");
        assert_eq!(cloud_run.client_key(&spoofed), "v4:203.0.113.9");
        let load_balancer = RateLimits::new(2);
        let lb = parts(Some("198.51.100.1, 203.0.113.9, 34.1.2.3"), "10.0.0.1:5");
        assert_eq!(load_balancer.client_key(&lb), "v4:203.0.113.9");
        assert_eq!(
            load_balancer.client_key(&parts(Some("203.0.113.9"), "10.0.0.1:5")),
            "v4:10.0.0.1",
            "fewer entries than proxies: not from behind them"
        );
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let limits = RateLimits::new(1);
        let a = limits.client_key(&parts(Some("2001:db8:1:2::1"), "[::1]:5"));
        let b = limits.client_key(&parts(Some("2001:db8:1:2:ffff::9"), "[::1]:5"));
        let c = limits.client_key(&parts(Some("2001:db8:1:3::1"), "[::1]:5"));
        assert_eq!(a, "v6:2001:db8:1:2::/64");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            limits.client_key(&parts(Some("::ffff:192.0.2.1"), "[::1]:5")),
            "v4:192.0.2.1"
        );
    }

    #[test]
    fn failures_back_off_per_key_and_a_success_clears_them() {
        let limits = RateLimits::default();
        for _ in 0..FREE_FAILURES {
            limits.start_password_try_local("acct|a").unwrap();
        }
        assert!(
            limits.start_password_try_local("acct|a").is_err(),
            "the fifth try starts the wait (it counts as it starts, not once judged)"
        );
        limits.start_password_try_local("acct|b").unwrap();
        limits.password_succeeded_local("acct|a");
        limits.start_password_try_local("acct|a").unwrap();
    }
}
