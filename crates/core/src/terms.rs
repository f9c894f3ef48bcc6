//! The terms of a grant, chosen by its owner at consent: how long it lasts (an hour, a day,
//! a week, until revoked) and optional limits on signatures (in all, and per minute, hour
//! and day). [`crate::Signer::execute`] enforces them on every transport through
//! [`UsageMeter`]; a refusal says why in words an app can show.
//!
//! Signatures are `sign_event` requests; a grant's earlier signatures (from the activity the
//! database holds when the meter first meets it) count against its total. Where the count
//! lives depends on the engine:
//! - SQLite (one instance): in memory, exact — a database write per signature would cost a
//!   replica upload.
//! - PostgreSQL (any number of instances): in the database ([`keycast_db::grant_usage`]),
//!   one short transaction per signature that locks the authorization's row, so every
//!   instance admits against the same count and a limit holds exactly across them.
//!
//! When a grant's terms change the meter forgets it and counts again from the stored
//! activity (which is written in batches, so signatures of the last moments may be missed).
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use keycast_db::activity as activity_repo;
use keycast_db::grant_usage;
use keycast_db::{AuthorizationId, Db, EngineKind, RepoError};
use serde::{Deserialize, Serialize};

use crate::error::SignError;

/// How long a grant lasts, as offered at consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantDuration {
    Hour,
    Day,
    Week,
    UntilRevoked,
}

impl GrantDuration {
    /// Parses the consent form's value: `hour`, `day`, `week`, `forever` (or empty).
    ///
    /// # Errors
    /// Anything else, with the accepted values.
    pub fn parse(v: &str) -> Result<GrantDuration, String> {
        match v {
            "hour" => Ok(GrantDuration::Hour),
            "day" => Ok(GrantDuration::Day),
            "week" => Ok(GrantDuration::Week),
            "" | "forever" => Ok(GrantDuration::UntilRevoked),
            other => Err(format!("duration {other:?}: expected hour, day, week or forever")),
        }
    }

    /// Seconds, `None` until revoked.
    pub fn secs(self) -> Option<i64> {
        match self {
            GrantDuration::Hour => Some(3600),
            GrantDuration::Day => Some(86_400),
            GrantDuration::Week => Some(7 * 86_400),
            GrantDuration::UntilRevoked => None,
        }
    }
}

/// Limits on a grant's signatures; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_signatures: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u32>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }
}

/// What the owner chose at consent, carried by the code (the clock starts at the exchange).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<i64>,
    #[serde(flatten)]
    pub limits: Limits,
}

impl Choice {
    /// JSON for the code's row; `None` for the default (until revoked, no limits).
    pub fn to_json(&self) -> Option<String> {
        (*self != Choice::default()).then(|| serde_json::to_string(self).unwrap_or_default())
    }

    /// The grant's terms when the code is exchanged at `now`.
    pub fn terms_from(&self, now: i64) -> GrantTerms {
        GrantTerms {
            expires_at: self.duration_secs.map(|d| now + d),
            limits: self.limits,
        }
    }
}

/// A grant's terms as stored on the authorization.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantTerms {
    /// Unix seconds; `None` until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(flatten)]
    pub limits: Limits,
}

impl GrantTerms {
    /// Reads the stored JSON; `None` is the default. An unreadable document is the default
    /// too only if it is empty; otherwise an error (the caller refuses to sign).
    ///
    /// # Errors
    /// Malformed JSON.
    pub fn from_json(json: Option<&str>) -> Result<GrantTerms, serde_json::Error> {
        match json {
            None => Ok(GrantTerms::default()),
            Some(text) => serde_json::from_str(text),
        }
    }

    /// JSON for the authorization's row; `None` for the default.
    pub fn to_json(&self) -> Option<String> {
        (*self != GrantTerms::default()).then(|| serde_json::to_string(self).unwrap_or_default())
    }

    /// Refuses a grant past its expiry.
    ///
    /// # Errors
    /// [`SignError::GrantRefused`] with code `grant_expired`.
    pub fn check_expiry(&self, now: i64) -> Result<(), SignError> {
        match self.expires_at {
            Some(at) if now >= at => Err(SignError::GrantRefused {
                code: "grant_expired",
                reason: format!(
                    "this grant expired at {} (the duration its owner chose); ask them to authorize the app again",
                    rfc3339(at)
                ),
            }),
            _ => Ok(()),
        }
    }
}

fn rfc3339(at: i64) -> String {
    chrono::DateTime::from_timestamp(at, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| at.to_string())
}

/// One authorization's signatures as the meter knows them.
#[derive(Debug, Default)]
struct Usage {
    total: u64,
    /// Times of the signatures of the last day, oldest first.
    recent: VecDeque<i64>,
}

const DAY: i64 = 86_400;

/// Whether one more signature fits `limits`, given `total` signatures so far and the times
/// of those of the last day (`recent`, oldest first).
fn decide(limits: &Limits, total: u64, recent: &[i64], now: i64) -> Result<(), SignError> {
    if let Some(max) = limits.max_signatures {
        if total >= max {
            return Err(SignError::GrantRefused {
                code: "grant_exhausted",
                reason: format!(
                    "this grant's {max} signatures are used up (the limit its owner chose); ask them for a new grant"
                ),
            });
        }
    }
    for (limit, window, per) in [
        (limits.per_minute, 60, "minute"),
        (limits.per_hour, 3600, "hour"),
        (limits.per_day, DAY, "day"),
    ] {
        let Some(limit) = limit else { continue };
        let in_window: Vec<i64> = recent.iter().copied().filter(|t| *t > now - window).collect();
        if in_window.len() >= limit as usize {
            // The oldest signature in the window leaves it first.
            let retry = in_window.first().map_or(window, |oldest| oldest + window - now).max(1);
            return Err(SignError::GrantRefused {
                code: "grant_rate_limited",
                reason: format!(
                    "this grant allows {limit} signatures per {per} (the limit its owner chose); retry in {retry} s"
                ),
            });
        }
    }
    Ok(())
}

/// Counts signatures per limited authorization and refuses those over its limits.
#[derive(Debug, Default)]
pub struct UsageMeter {
    usage: Mutex<HashMap<AuthorizationId, Usage>>,
}

impl UsageMeter {
    /// Admits one signature of `authz` at `now` under `limits`, counting it, or refuses it.
    ///
    /// # Errors
    /// [`SignError::GrantRefused`] (`grant_exhausted`: the total is used up;
    /// `grant_rate_limited`: a rate, with when to retry); storage errors.
    pub async fn admit(&self, db: &Db, authz: &AuthorizationId, limits: &Limits, now: i64) -> Result<(), SignError> {
        if limits.is_unlimited() {
            return Ok(());
        }
        if db.kind() == EngineKind::Postgres {
            return grant_usage::admit(db, authz, now, DAY, |usage| {
                decide(limits, u64::try_from(usage.total).unwrap_or(0), &usage.recent, now)
            })
            .await?;
        }
        let known = self.lock().contains_key(authz);
        if !known {
            let (total, recent) = activity_repo::signatures(db, authz, now - DAY).await?;
            self.lock().entry(authz.clone()).or_insert_with(|| Usage {
                total: u64::try_from(total).unwrap_or(0),
                recent: recent.into(),
            });
        }
        let mut usage = self.lock();
        let usage = usage.entry(authz.clone()).or_default();
        while usage.recent.front().is_some_and(|t| *t <= now - DAY) {
            usage.recent.pop_front();
        }
        decide(limits, usage.total, usage.recent.make_contiguous(), now)?;
        usage.total += 1;
        usage.recent.push_back(now);
        Ok(())
    }

    /// Forgets an authorization's count (its terms changed): the next signature counts from
    /// the stored activity again.
    ///
    /// # Errors
    /// Storage errors (PostgreSQL).
    pub async fn forget(&self, db: &Db, authz: &AuthorizationId) -> Result<(), RepoError> {
        self.lock().remove(authz);
        if db.kind() == EngineKind::Postgres {
            grant_usage::forget(db, authz).await?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AuthorizationId, Usage>> {
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_from_the_consent_form() {
        assert_eq!(GrantDuration::parse("hour").unwrap().secs(), Some(3600));
        assert_eq!(GrantDuration::parse("week").unwrap().secs(), Some(604_800));
        assert_eq!(GrantDuration::parse("forever").unwrap().secs(), None);
        assert_eq!(GrantDuration::parse("").unwrap(), GrantDuration::UntilRevoked);
        assert!(GrantDuration::parse("month")
            .unwrap_err()
            .contains("hour, day, week or forever"));
    }

    #[test]
    fn terms_round_trip_and_default_to_none() {
        assert_eq!(GrantTerms::default().to_json(), None);
        assert_eq!(GrantTerms::from_json(None).unwrap(), GrantTerms::default());
        let choice = Choice {
            duration_secs: Some(3600),
            limits: Limits {
                per_minute: Some(2),
                ..Limits::default()
            },
        };
        let terms = choice.terms_from(100);
        assert_eq!(terms.expires_at, Some(3700));
        let json = terms.to_json().unwrap();
        assert_eq!(GrantTerms::from_json(Some(&json)).unwrap(), terms);
        assert!(terms.check_expiry(3699).is_ok());
        let err = terms.check_expiry(3700).unwrap_err().to_string();
        assert!(err.contains("expired at 1970-01-01T01:01:40Z"), "{err}");
    }

    #[tokio::test]
    async fn the_meter_refuses_past_the_total_and_each_rate_with_a_retry_time() {
        let fx = crate::testing::fixture().await;
        let db = fx.pool();
        let meter = UsageMeter::default();
        let id = AuthorizationId::generate();
        let limits = Limits {
            max_signatures: Some(5),
            per_minute: Some(2),
            ..Limits::default()
        };
        meter.admit(db, &id, &limits, 1000).await.unwrap();
        meter.admit(db, &id, &limits, 1010).await.unwrap();
        let err = meter.admit(db, &id, &limits, 1020).await.unwrap_err();
        assert!(
            err.to_string().contains("2 signatures per minute") && err.to_string().contains("retry in 40 s"),
            "{err}"
        );
        meter.admit(db, &id, &limits, 1060).await.unwrap();
        meter.admit(db, &id, &limits, 1071).await.unwrap();
        meter.admit(db, &id, &limits, 1200).await.unwrap();
        let err = meter.admit(db, &id, &limits, 1300).await.unwrap_err();
        assert!(err.to_string().contains("5 signatures are used up"), "{err}");
        meter.admit(db, &id, &Limits::default(), 1300).await.unwrap();
    }
}
