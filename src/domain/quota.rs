//! Daily quota planning: how many KnowBe4 requests a run may spend.
//!
//! The ledger in the state store makes the quota a hard limit (each request is reserved
//! before it is sent). This module decides how much of what is left a run should take,
//! so that the quota lasts the whole UTC day: an allowance that grows evenly through the
//! day, plus a burst for draining backlogs. Unspent allowance carries over to later runs
//! of the same day.

use time::OffsetDateTime;

/// Seconds in a UTC day.
const DAY_SECS: i64 = 86_400;

/// The UTC day of `at`, as the ledger names it (`YYYY-MM-DD`).
pub fn utc_day(at: OffsetDateTime) -> String {
    let d = at.to_offset(time::UtcOffset::UTC).date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Milliseconds until the next UTC midnight.
pub fn ms_until_next_day(at: OffsetDateTime) -> i64 {
    let at = at.to_offset(time::UtcOffset::UTC);
    let elapsed =
        i64::from(at.hour()) * 3600 + i64::from(at.minute()) * 60 + i64::from(at.second());
    (DAY_SECS - elapsed) * 1000 - i64::from(at.millisecond())
}

/// Requests this run may spend: the day's allowance up to the end of this run's
/// interval, plus a tenth of the limit as burst, minus what was used; never more than
/// what is left.
pub fn run_budget(limit: u32, used: u32, now: OffsetDateTime, interval_secs: u64) -> u32 {
    let remaining = limit.saturating_sub(used);
    let at = now.to_offset(time::UtcOffset::UTC);
    let elapsed =
        i64::from(at.hour()) * 3600 + i64::from(at.minute()) * 60 + i64::from(at.second());
    let horizon = (elapsed + interval_secs as i64).min(DAY_SECS);
    let allowance = (u64::from(limit) * horizon as u64 / DAY_SECS as u64) as u32;
    let burst = (limit / 10).max(1);
    allowance
        .saturating_add(burst)
        .saturating_sub(used)
        .min(remaining)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn days_and_midnight() {
        let at = datetime!(2026-11-29 23:59:59.500 UTC);
        assert_eq!(utc_day(at), "2026-11-29");
        assert_eq!(ms_until_next_day(at), 500);
    }

    #[test]
    fn budget_spreads_the_quota_over_the_day() {
        let midnight = datetime!(2026-11-29 00:00 UTC);
        // 500 requests a day, a run every 5 minutes: the first run may burst.
        assert_eq!(run_budget(500, 0, midnight, 300), 51);
        // Noon, nothing used yet: half the day's allowance is banked.
        assert_eq!(
            run_budget(500, 0, datetime!(2026-11-29 12:00 UTC), 300),
            301
        );
        // Spent ahead of schedule: nothing until the allowance catches up.
        assert_eq!(
            run_budget(500, 300, datetime!(2026-11-29 06:00 UTC), 300),
            0
        );
        // Never more than what is left.
        assert_eq!(
            run_budget(500, 495, datetime!(2026-11-29 23:59 UTC), 300),
            5
        );
        assert_eq!(
            run_budget(500, 500, datetime!(2026-11-29 23:59 UTC), 300),
            0
        );
        // Over a whole day of 5-minute runs, the sum of budgets stays within the limit.
        let mut used = 0;
        for i in 0..288 {
            let at = midnight + time::Duration::seconds(i * 300);
            used += run_budget(500, used, at, 300);
        }
        assert!((490..=500).contains(&used), "{used}");
    }
}
