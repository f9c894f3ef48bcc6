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
use std::collections::hash_map::Entry;
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
    recent: Recent,
    /// When the grant last asked to sign (see [`UsageMeter::forget_idle`]).
    last_used: i64,
    /// Its terms changed: the recent history is read again from the stored activity (a
    /// longer window needs more of it than was kept) before the next decision.
    reread: bool,
}

pub(crate) const DAY: i64 = 86_400;

/// A grant's recent signatures, one entry per second however many were made in it, each
/// entry with the running count up to it. Memory is bounded by the seconds in the longest
/// window (a day: 86,400 entries) rather than by how fast an app signs, and a window's count
/// is a binary search rather than a scan of every signature.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    /// `(second, signatures counted up to and including it)`, oldest first.
    seconds: VecDeque<(i64, u64)>,
    /// The running count of the entries already let go.
    before: u64,
}

impl Recent {
    /// From `(second, signatures in it)`, oldest first.
    pub(crate) fn from_counts(counts: impl IntoIterator<Item = (i64, i64)>) -> Recent {
        let mut recent = Recent::default();
        for (at, n) in counts {
            recent.add(at, u64::try_from(n).unwrap_or(0));
        }
        recent
    }

    fn last(&self) -> u64 {
        self.seconds.back().map_or(self.before, |e| e.1)
    }

    /// The stored `(second, signatures in it)` with, for each second this still holds, the
    /// larger of the two counts: a signature counted here but not yet recorded stays in the
    /// windows.
    fn merged_with(&self, stored: Vec<(i64, i64)>) -> Recent {
        let mut counts: std::collections::BTreeMap<i64, u64> = stored
            .into_iter()
            .map(|(at, n)| (at, u64::try_from(n).unwrap_or(0)))
            .collect();
        let mut previous = self.before;
        for &(at, running) in &self.seconds {
            let n = running - previous;
            previous = running;
            let count = counts.entry(at).or_default();
            *count = (*count).max(n);
        }
        let mut recent = Recent::default();
        for (at, n) in counts {
            recent.add(at, n);
        }
        recent
    }

    /// Counts `n` signatures at `at`. A clock that stepped back: the seconds stamped after
    /// `at` are counted as at `at` from now on, so the entries stay in order and leave the
    /// windows as time goes on. (Counted in the newest, future, second instead, every
    /// signature since stayed in every window until the clock caught up: one signature
    /// stamped two hours ahead made a per-minute limit a limit per two hours.)
    fn add(&mut self, at: i64, n: u64) {
        let count = self.last() + n;
        while self.seconds.back().is_some_and(|newest| newest.0 > at) {
            self.seconds.pop_back();
        }
        match self.seconds.back_mut() {
            Some(newest) if newest.0 == at => newest.1 = count,
            _ => self.seconds.push_back((at, count)),
        }
    }

    /// Lets go of the seconds at or before `cutoff`.
    fn forget_up_to(&mut self, cutoff: i64) {
        while let Some(&(at, count)) = self.seconds.front() {
            if at > cutoff {
                break;
            }
            self.before = count;
            self.seconds.pop_front();
        }
    }

    /// How many signatures were made after `since`, and when the oldest of them was.
    fn after(&self, since: i64) -> (u64, Option<i64>) {
        let first = self.seconds.partition_point(|e| e.0 <= since);
        let before = first.checked_sub(1).map_or(self.before, |i| self.seconds[i].1);
        (self.last() - before, self.seconds.get(first).map(|e| e.0))
    }
}

/// The longest window `limits` has a rate for: how far back the meter must remember.
/// The longest rate window of `limits` in seconds (a day, an hour, a minute), if any.
pub(crate) fn longest_window(limits: &Limits) -> Option<i64> {
    [(limits.per_day, DAY), (limits.per_hour, 3600), (limits.per_minute, 60)]
        .into_iter()
        .find_map(|(limit, window)| limit.map(|_| window))
}

/// Whether one more signature fits `limits`, given `total` signatures so far and the
/// `recent` ones.
fn decide(limits: &Limits, total: u64, recent: &Recent, now: i64) -> Result<(), SignError> {
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
        let (in_window, oldest) = recent.after(now - window);
        if in_window >= u64::from(limit) {
            // The oldest signature in the window leaves it first.
            let retry = oldest.map_or(window, |oldest| oldest + window - now).max(1);
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
        self.judge(db, authz, limits, now, true).await
    }

    /// Whether [`UsageMeter::admit`] would admit a signature now, counting none: a request
    /// its terms refuse anyway is refused for that before an approval is asked for or an
    /// "allow once" spent on it.
    ///
    /// # Errors
    /// As [`UsageMeter::admit`].
    pub async fn would_admit(
        &self,
        db: &Db,
        authz: &AuthorizationId,
        limits: &Limits,
        now: i64,
    ) -> Result<(), SignError> {
        self.judge(db, authz, limits, now, false).await
    }

    async fn judge(
        &self,
        db: &Db,
        authz: &AuthorizationId,
        limits: &Limits,
        now: i64,
        count: bool,
    ) -> Result<(), SignError> {
        if limits.is_unlimited() {
            return Ok(());
        }
        if db.kind() == EngineKind::Postgres {
            let decision = |usage: &grant_usage::Usage| {
                let recent = Recent::from_counts(usage.recent.iter().copied());
                decide(limits, u64::try_from(usage.total).unwrap_or(0), &recent, now)
            };
            return match count {
                true => grant_usage::admit(db, authz, now, DAY, decision).await?,
                false => grant_usage::would_admit(db, authz, now, DAY, decision).await?,
            };
        }
        let mut all = loop {
            if self.lock().get(authz).is_none_or(|usage| usage.reread) {
                let (total, recent) = activity_repo::signatures(db, authz, now - DAY).await?;
                let stored = u64::try_from(total).unwrap_or(0);
                match self.lock().entry(authz.clone()) {
                    Entry::Occupied(mut entry) => {
                        let usage = entry.get_mut();
                        if usage.reread {
                            // What is counted here stays when it is more: signatures under
                            // way when the terms changed are counted, not yet stored.
                            usage.total = usage.total.max(stored);
                            usage.recent = usage.recent.merged_with(recent);
                            usage.reread = false;
                        }
                    }
                    Entry::Vacant(entry) => {
                        entry.insert(Usage {
                            total: stored,
                            recent: Recent::from_counts(recent),
                            last_used: now,
                            reread: false,
                        });
                    }
                }
            }
            let all = self.lock();
            // Dropped between the two locks (idle): counted again from
            // the stored activity, never from zero.
            if all.contains_key(authz) {
                break all;
            }
        };
        let usage = all.get_mut(authz).expect("present under this lock");
        usage.last_used = usage.last_used.max(now);
        let remember = longest_window(limits);
        usage.recent.forget_up_to(now - remember.unwrap_or(0));
        decide(limits, usage.total, &usage.recent, now)?;
        if !count {
            return Ok(());
        }
        usage.total += 1;
        if remember.is_some() {
            usage.recent.add(now, 1);
        }
        Ok(())
    }

    /// An authorization's terms changed to `limits`. Here (SQLite) its recent history is read
    /// again from the stored activity, which holds what a longer window needs (the caller
    /// writes what it buffers first), and what is counted here stays where it is more:
    /// dropped and counted again from the store, it missed the signatures under way
    /// (counted, not yet recorded), and an app signing while its owner tightened the grant
    /// went past its limits by them. The shared count (PostgreSQL) is exact and keeps a day
    /// of history, so it stays — unless the grant goes unlimited: it is not metered then, and
    /// a limit set later counts from the stored activity.
    ///
    /// # Errors
    /// Storage errors (PostgreSQL).
    pub async fn terms_changed(&self, db: &Db, authz: &AuthorizationId, limits: &Limits) -> Result<(), RepoError> {
        if let Some(usage) = self.lock().get_mut(authz) {
            usage.reread = true;
        }
        if db.kind() == EngineKind::Postgres && limits.is_unlimited() {
            grant_usage::forget(db, authz).await?;
        }
        Ok(())
    }

    /// Drops a revoked authorization's count: it never signs again, and its history of up to
    /// a day of seconds would otherwise stay in memory until the process ends.
    pub fn revoked(&self, authz: &AuthorizationId) {
        // Freed once the lock is released (the guard is a temporary of this statement).
        let removed = self.lock().remove(authz);
        drop(removed);
    }

    /// Drops the counts of grants that have not asked to sign for a day: grants that ended
    /// by their duration (nothing revokes them, so [`UsageMeter::revoked`] never ran) and
    /// grants no longer used, each of which held up to a day of seconds until the process
    /// ended. A grant that signs again is counted from the stored activity, which by then
    /// holds every signature it made (the caller makes sure nothing is still buffered).
    /// Returns how many were dropped.
    pub fn forget_idle(&self, now: i64) -> usize {
        let mut usage = self.lock();
        let before = usage.len();
        usage.retain(|_, u| u.last_used > now - DAY);
        before - usage.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AuthorizationId, Usage>> {
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {

    /// One signature stamped two hours ahead (a clock set wrong, then fixed): the ones made
    /// after the fix are counted in their own minutes, not held in that future second.
    #[test]
    fn a_signature_stamped_ahead_does_not_hold_the_windows_after_the_clock_is_fixed() {
        let now = 1_000_000;
        let mut recent = Recent::default();
        recent.add(now + 7200, 1);
        for i in 0..8 {
            recent.add(now + i, 1);
        }
        let limits = Limits {
            per_minute: Some(10),
            ..Limits::default()
        };
        assert!(
            decide(&limits, 9, &recent, now + 10).is_ok(),
            "nine in the minute: a tenth fits"
        );
        assert_eq!(
            recent.after(now + 130 - 60).0,
            0,
            "two minutes on, none is in the minute"
        );
        assert_eq!(recent.after(now - 1).0, 9, "all nine are still counted");
    }

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

    #[test]
    fn recent_signatures_count_per_window_in_one_entry_per_second() {
        let mut recent = Recent::from_counts([(100, 2), (130, 1)]);
        for at in [150, 150, 150, 149] {
            recent.add(at, 1); // 149: a clock stepping back brings the newer seconds back to it
        }
        assert_eq!(recent.seconds.len(), 3);
        assert_eq!(recent.after(99), (7, Some(100)));
        assert_eq!(recent.after(100), (5, Some(130)));
        assert_eq!(recent.after(150), (0, None));
        recent.forget_up_to(129);
        assert_eq!(recent.after(0), (5, Some(130)), "forgotten seconds no longer count");
        assert_eq!(recent.after(130), (4, Some(149)));
    }

    /// A grant with limits signing fast all day (here 3 a second for a day): the meter
    /// remembers one entry per second of its longest window, never one per signature, and
    /// still counts the windows exactly.
    #[tokio::test]
    async fn a_busy_limited_grant_is_remembered_per_second_and_counted_exactly() {
        let fx = crate::testing::fixture().await;
        let db = fx.pool();
        let meter = UsageMeter::default();
        let id = AuthorizationId::generate();
        let limits = Limits {
            per_minute: Some(180),
            per_day: Some(259_200),
            ..Limits::default()
        };
        let start = 1_000_000;
        for second in 0..DAY {
            for _ in 0..3 {
                meter.admit(db, &id, &limits, start + second).await.unwrap();
            }
        }
        {
            let usage = meter.lock();
            let usage = &usage[&id];
            assert_eq!(usage.total, 259_200);
            assert_eq!(
                usage.recent.seconds.len(),
                86_400,
                "one entry per second, not per signature"
            );
        }
        let last = start + DAY - 1;
        let err = meter.admit(db, &id, &limits, last).await.unwrap_err().to_string();
        assert!(
            err.contains("180 signatures per minute") && err.contains("retry in 1 s"),
            "{err}"
        );
        // A second later three of the minute's and three of the day's have left their windows.
        for _ in 0..3 {
            meter.admit(db, &id, &limits, last + 1).await.unwrap();
        }
        let err = meter.admit(db, &id, &limits, last + 1).await.unwrap_err().to_string();
        assert!(err.contains("signatures per"), "{err}");
        assert_eq!(meter.lock()[&id].recent.seconds.len(), 86_400);
        // Revoked, it is dropped: its day of seconds is not kept until the process ends.
        meter.revoked(&id);
        assert!(meter.lock().is_empty());
    }

    /// A grant that ended by its duration is never revoked: its count (up to a day of
    /// seconds) stayed in memory until the process ended. Counts idle for a day are dropped,
    /// and a grant that signs again is counted from the stored activity.
    #[tokio::test]
    async fn the_counts_of_grants_idle_for_a_day_are_dropped_and_rebuilt_when_needed() {
        let fx = crate::testing::fixture().await;
        let db = fx.pool();
        let meter = UsageMeter::default();
        let (idle, busy) = (AuthorizationId::generate(), AuthorizationId::generate());
        let limits = Limits {
            per_day: Some(1000),
            ..Limits::default()
        };
        let start = 1_000_000;
        for second in 0..100 {
            meter.admit(db, &idle, &limits, start + second).await.unwrap();
        }
        meter.admit(db, &busy, &limits, start + DAY).await.unwrap();
        assert_eq!(meter.forget_idle(start + DAY), 0, "idle for less than a day");
        assert_eq!(meter.forget_idle(start + 99 + DAY), 1);
        let left: Vec<AuthorizationId> = meter.lock().keys().cloned().collect();
        assert_eq!(left, [busy]);
        meter.admit(db, &idle, &limits, start + 2 * DAY).await.unwrap();
        assert_eq!(meter.lock().len(), 2, "counted again when it signs");
    }

    /// The cost of one admission as a limited grant's day fills up: `bench/meter.sh` runs
    /// it in release and prints one JSON line per size (`KEYCAST_METER_SIZES`, signatures
    /// already counted, 10 a second).
    #[tokio::test]
    #[ignore = "a benchmark: bench/meter.sh"]
    async fn meter_admission_cost() {
        let fx = crate::testing::fixture().await;
        let db = fx.pool();
        let limits = Limits {
            per_day: Some(u32::MAX),
            ..Limits::default()
        };
        let sizes = std::env::var("KEYCAST_METER_SIZES").unwrap_or_else(|_| "10000 100000 864000".into());
        for size in sizes.split_whitespace().map(|s| s.parse::<i64>().unwrap()) {
            let (meter, id, start) = (UsageMeter::default(), AuthorizationId::generate(), 1_000_000);
            for i in 0..size {
                meter.admit(db, &id, &limits, start + i / 10).await.unwrap();
            }
            let (probes, now) = (1000, start + size / 10);
            let began = std::time::Instant::now();
            for _ in 0..probes {
                meter.admit(db, &id, &limits, now).await.unwrap();
            }
            let per = began.elapsed() / probes;
            let entries = meter.lock()[&id].recent.seconds.len();
            println!(
                "{}",
                serde_json::json!({"bench": "meter", "counted": size, "admit_ns": per.as_nanos() as u64, "entries": entries})
            );
        }
    }

    #[test]
    fn only_the_longest_window_with_a_rate_is_remembered() {
        let minute = Limits {
            per_minute: Some(1),
            ..Limits::default()
        };
        let total = Limits {
            max_signatures: Some(10),
            ..Limits::default()
        };
        let all = Limits {
            per_minute: Some(1),
            per_hour: Some(2),
            per_day: Some(3),
            ..Limits::default()
        };
        assert_eq!(longest_window(&minute), Some(60));
        assert_eq!(longest_window(&total), None);
        assert_eq!(longest_window(&all), Some(DAY));
    }
}
