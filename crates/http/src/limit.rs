//! In-memory token buckets for login, registration, mail requests and password reset, keyed by client IP
//! and by email. One process's view only: with several instances each limits on its own,
//! which still bounds guessing per instance.
//!
//! The client IP is the peer address, or, behind a proxy, the last `X-Forwarded-For`
//! entry (the one the nearest proxy — Cloud Run's front end — appended; entries to its
//! left are client-controlled).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;

use crate::AppError;

/// Buckets kept before stale ones are swept.
const MAX_BUCKETS: usize = 100_000;

/// A bucket's shape: `burst` attempts at once, one more every `refill`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub burst: u32,
    pub refill: Duration,
}

/// Login: 10 per IP then one per 6 s; 5 per email then one per minute.
pub const LOGIN_PER_IP: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(6),
};
pub const LOGIN_PER_EMAIL: Rate = Rate {
    burst: 5,
    refill: Duration::from_secs(60),
};
/// Registration: 20 per IP then one per 30 s.
pub const REGISTER_PER_IP: Rate = Rate {
    burst: 20,
    refill: Duration::from_secs(30),
};
/// Mail on request (password reset, verification again), each purpose its own buckets: 3
/// per email then one per 5 minutes; 10 per IP then one per minute.
pub const MAIL_PER_EMAIL: Rate = Rate {
    burst: 3,
    refill: Duration::from_secs(300),
};
pub const MAIL_PER_IP: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(60),
};
/// Submitting a new password with a reset token: 10 per IP then one per minute.
pub const RESET_PER_IP: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(60),
};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// All buckets, by `"<purpose>:<key>"`.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimits {
    /// Takes one attempt from the bucket `key` of shape `rate`.
    ///
    /// # Errors
    /// [`AppError::TooManyRequests`] with the seconds until the next attempt is allowed.
    pub fn check(&self, key: &str, rate: Rate) -> Result<(), AppError> {
        let now = Instant::now();
        let per_sec = 1.0 / rate.refill.as_secs_f64();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, b| now.duration_since(b.updated) < Duration::from_secs(3600));
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: f64::from(rate.burst),
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(f64::from(rate.burst));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - bucket.tokens) / per_sec).ceil() as u64;
        Err(AppError::TooManyRequests {
            retry_after_secs: wait.max(1),
        })
    }
}

/// The client's IP as text (see the module doc), `unknown` when neither is available.
pub fn client_ip(parts: &Parts) -> String {
    let forwarded = parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty());
    forwarded
        .or_else(|| {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_says_when_to_retry() {
        let limits = RateLimits::default();
        let rate = Rate {
            burst: 2,
            refill: Duration::from_secs(60),
        };
        limits.check("k", rate).unwrap();
        limits.check("k", rate).unwrap();
        match limits.check("k", rate) {
            Err(AppError::TooManyRequests { retry_after_secs }) => assert!((59..=60).contains(&retry_after_secs)),
            other => panic!("{other:?}"),
        }
        limits.check("other", rate).unwrap();
    }
}
