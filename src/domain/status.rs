//! What `status` and `health` show beyond the stored records: times in RFC 3339, health
//! events marked resolved, and the backlog as time and events still to collect with an
//! estimate of when it will be caught up.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::domain::checkpoint::{Checkpoint, DEFAULT_PAGE_SIZE};
use crate::domain::event::EventTime;
use crate::domain::state::{HealthEvent, Lifecycle, Millis, Transition};
use crate::error::HealthKind;

/// An instant in epoch milliseconds as RFC 3339 with milliseconds (`…T10:05:13.890Z`):
/// one fixed width, so the strings also sort in time order.
pub fn rfc3339_ms(ms: Millis) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_else(|_| ms.to_string())
}

/// One lifecycle change, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionView {
    /// The state entered.
    pub state: Lifecycle,
    /// When it was entered (RFC 3339).
    pub at: String,
    /// Why.
    pub reason: String,
}

impl From<&Transition> for TransitionView {
    fn from(t: &Transition) -> Self {
        TransitionView {
            state: t.state,
            at: rfc3339_ms(t.at),
            reason: t.reason.clone(),
        }
    }
}

/// A health event as `status` and `health` show it: times in RFC 3339, and whether a
/// later run succeeded (the problem is over).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    /// The source it concerns.
    pub source_id: String,
    /// One of the three documented types.
    pub kind: HealthKind,
    /// What happened, with its causes, without secrets.
    pub message: String,
    /// HTTP status, if there was one.
    pub status: Option<u16>,
    /// A short machine-readable error kind.
    pub error_kind: String,
    /// First occurrence within the streak (RFC 3339).
    pub first_seen: String,
    /// Latest occurrence (RFC 3339).
    pub last_seen: String,
    /// Occurrences within the streak.
    pub count: u32,
    /// When collection retries (RFC 3339), if it does.
    pub retry_at: Option<String>,
    /// The retry deadline (RFC 3339), past which the source quits.
    pub retry_deadline: Option<String>,
    /// The data type whose collection failed (`events`, `phishing`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<String>,
    /// Whether a run succeeded after the latest occurrence.
    pub resolved: bool,
}

impl HealthView {
    /// The view of `event`, resolved when `last_success` is after it.
    pub fn new(event: &HealthEvent, last_success: Option<Millis>) -> Self {
        HealthView {
            source_id: event.source_id.clone(),
            kind: event.kind,
            message: event.message.clone(),
            status: event.status,
            error_kind: event.error_kind.clone(),
            first_seen: rfc3339_ms(event.first_seen),
            last_seen: rfc3339_ms(event.last_seen),
            count: event.count,
            retry_at: event.retry_at.map(rfc3339_ms),
            retry_deadline: event.retry_deadline.map(rfc3339_ms),
            data_type: event.data_type.clone(),
            resolved: last_success.is_some_and(|ok| ok > event.last_seen),
        }
    }
}

/// Events and time still to collect, and when that should be done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backlog {
    /// Unfinished ranges.
    pub ranges: usize,
    /// Time they span, in seconds of `occurred_date`.
    pub seconds: u64,
    /// Oldest `occurred_date` still to collect (RFC 3339).
    pub oldest: String,
    /// Events in them, estimated from the density of what was collected so far.
    pub events_estimate: Option<u64>,
    /// KnowBe4 requests needed, at 50 events per page.
    pub requests_estimate: Option<u64>,
    /// When it should be caught up at the source's daily quota (RFC 3339), ignoring
    /// what steady-state runs spend.
    pub caught_up_estimate: Option<String>,
}

/// The backlog of `checkpoint`, or `None` when there is none. `forwarded_total` events
/// were collected over the part of the checkpoint's span that is not a gap; requests come
/// out of `quota_left_today`, then `daily_limit` a day from the next 00:00 UTC.
pub fn backlog(
    checkpoint: &Checkpoint,
    forwarded_total: u64,
    quota_left_today: u32,
    daily_limit: u32,
    now: OffsetDateTime,
) -> Option<Backlog> {
    if checkpoint.gaps.is_empty() {
        return None;
    }
    let secs = |newest: EventTime, oldest: EventTime| oldest.secs_until(newest);
    let seconds: u64 = checkpoint
        .gaps
        .iter()
        .map(|g| secs(g.newest, g.oldest))
        .sum();
    let oldest = checkpoint.gaps.iter().map(|g| g.oldest).min()?;
    let covered = match (checkpoint.high, checkpoint.floor) {
        (Some(high), Some(floor)) => secs(high, floor).saturating_sub(seconds),
        _ => 0,
    };
    let events_estimate = (covered > 0 && forwarded_total > 0)
        .then(|| (forwarded_total as f64 / covered as f64 * seconds as f64).ceil() as u64);
    let requests_estimate = events_estimate.map(|e| e.div_ceil(u64::from(DEFAULT_PAGE_SIZE)));
    let caught_up_estimate = requests_estimate.map(|needed| {
        let left_today = u64::from(quota_left_today);
        if needed <= left_today {
            return rfc3339_ms((now.unix_timestamp_nanos() / 1_000_000) as i64);
        }
        let days = (needed - left_today).div_ceil(u64::from(daily_limit.max(1)));
        let midnight = now.date().midnight().assume_utc();
        rfc3339_ms((midnight.unix_timestamp() + days as i64 * 86_400) * 1000)
    });
    Some(Backlog {
        ranges: checkpoint.gaps.len(),
        seconds,
        oldest: oldest.to_rfc3339(),
        events_estimate,
        requests_estimate,
        caught_up_estimate,
    })
}

/// `seconds` in words: `3 h 20 min`, `2 days 4 h`, `45 s`.
///
/// ```
/// use knowbe4_source::domain::status::duration_words;
///
/// assert_eq!(duration_words(45), "45 s");
/// assert_eq!(duration_words(3 * 3600 + 20 * 60), "3 h 20 min");
/// assert_eq!(duration_words(2 * 86_400 + 4 * 3600), "2 days 4 h");
/// ```
pub fn duration_words(seconds: u64) -> String {
    let (d, h, m) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{seconds} s"),
        (0, 0, m) => format!("{m} min"),
        (0, h, m) => format!("{h} h {m} min"),
        (1, h, _) => format!("1 day {h} h"),
        (d, h, _) => format!("{d} days {h} h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::checkpoint::Gap;

    const HOUR_NS: i64 = 3_600_000_000_000;

    #[test]
    fn times_are_fixed_width_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_500), "1970-01-01T00:00:01.500Z");
    }

    #[test]
    fn a_backlog_is_time_events_and_an_estimate() {
        let now = OffsetDateTime::from_unix_timestamp(10 * 86_400 + 3600).unwrap();
        let base = 9 * 86_400 * 1_000_000_000i64;
        let checkpoint = Checkpoint {
            high: Some(EventTime(base + 24 * HOUR_NS)),
            floor: Some(EventTime(base)),
            gaps: vec![Gap {
                newest: EventTime(base + 12 * HOUR_NS),
                skip: vec![],
                oldest: EventTime(base),
                above_hint: 0,
            }],
            ..Checkpoint::default()
        };
        assert!(backlog(&Checkpoint::default(), 0, 1, 1, now).is_none());
        // 12 collected hours held 6,000 events: the 12 missing hours hold about as many,
        // 120 requests; 20 are left today and 50 a day after: caught up in two days.
        let b = backlog(&checkpoint, 6_000, 20, 50, now).unwrap();
        assert_eq!(b.seconds, 12 * 3600);
        assert_eq!(b.events_estimate, Some(6_000));
        assert_eq!(b.requests_estimate, Some(120));
        assert_eq!(
            b.caught_up_estimate.as_deref(),
            Some("1970-01-13T00:00:00.000Z")
        );
        assert_eq!(duration_words(b.seconds), "12 h 0 min");
        // Enough quota today: caught up now (by the next runs).
        let b = backlog(&checkpoint, 6_000, 500, 500, now).unwrap();
        assert_eq!(
            b.caught_up_estimate.as_deref(),
            Some("1970-01-11T01:00:00.000Z")
        );
    }

    #[test]
    fn health_events_after_a_success_are_resolved() {
        let event = HealthEvent {
            source_id: "s".into(),
            source_name: "n".into(),
            kind: HealthKind::ThirdPartyGenericError,
            message: "m".into(),
            status: Some(503),
            error_kind: "http_status".into(),
            first_seen: 1_000,
            last_seen: 2_000,
            count: 2,
            retry_at: Some(3_000),
            retry_deadline: None,
            data_type: None,
        };
        assert!(!HealthView::new(&event, None).resolved);
        assert!(!HealthView::new(&event, Some(1_500)).resolved);
        let view = HealthView::new(&event, Some(2_500));
        assert!(view.resolved);
        assert_eq!(view.last_seen, "1970-01-01T00:00:02.000Z");
    }
}
