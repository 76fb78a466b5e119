//! One KnowBe4 user event as the API sent it.
//!
//! The collector only needs two fields to do its job (`id` to dedupe, `occurred_date`
//! to order), so it parses those and keeps the rest as the exact JSON text KnowBe4
//! returned: events are forwarded byte-for-byte, unknown fields included.

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A point on KnowBe4's `occurred_date` axis, in nanoseconds since the Unix epoch.
///
/// Integer nanoseconds order exactly and store compactly in checkpoints; `i64`
/// covers the years 1677 to 2262.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct EventTime(pub i64);

impl EventTime {
    /// Parses an RFC 3339 timestamp such as `2022-08-09T10:05:13.890Z`.
    pub fn parse(text: &str) -> Option<Self> {
        let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
        i64::try_from(at.unix_timestamp_nanos()).ok().map(EventTime)
    }

    /// The time as an `OffsetDateTime`.
    pub fn to_datetime(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The time as an RFC 3339 string (for logs and `status`).
    pub fn to_rfc3339(self) -> String {
        self.to_datetime()
            .format(&Rfc3339)
            .unwrap_or_else(|_| self.0.to_string())
    }

    /// From an `OffsetDateTime` (saturating outside the representable range).
    pub fn from_datetime(at: OffsetDateTime) -> Self {
        EventTime(
            at.unix_timestamp_nanos()
                .clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        )
    }

    /// This time moved back by `seconds` (saturating).
    pub fn minus_secs(self, seconds: u64) -> Self {
        EventTime(
            self.0
                .saturating_sub((seconds as i64).saturating_mul(1_000_000_000)),
        )
    }

    /// Seconds from `self` to `later` (0 when `later` is earlier).
    pub fn secs_until(self, later: EventTime) -> u64 {
        (later.0.saturating_sub(self.0).max(0) / 1_000_000_000) as u64
    }
}

/// One event: the two fields the collector reasons about, and the untouched original.
#[derive(Debug, Clone)]
pub struct RawEvent {
    /// KnowBe4's event id (a UUID string): identifies an event, does not order it.
    pub id: String,
    /// Parsed `occurred_date`, the order KnowBe4 lists events in.
    pub occurred: EventTime,
    /// The event object exactly as KnowBe4 sent it.
    pub json: Box<RawValue>,
}

/// Why an event object from KnowBe4 could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventParseError {
    /// The object is not a JSON object with a string `id`.
    #[error("event has no string `id`")]
    MissingId,
    /// `occurred_date` is missing or not an RFC 3339 timestamp.
    #[error("event {id} has no valid `occurred_date`")]
    BadOccurredDate {
        /// The event's id, to find it in KnowBe4.
        id: String,
    },
}

#[derive(Deserialize)]
struct Keys<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    occurred_date: Option<std::borrow::Cow<'a, str>>,
}

impl RawEvent {
    /// Reads `id` and `occurred_date` out of one event object, keeping the original text.
    pub fn from_raw(json: Box<RawValue>) -> Result<Self, EventParseError> {
        Self::parse(json).map_err(|(err, _)| err)
    }

    /// As [`from_raw`](Self::from_raw), giving the object back on failure (so an event
    /// without a usable date can still be forwarded as sent).
    pub fn parse(json: Box<RawValue>) -> Result<Self, (EventParseError, Box<RawValue>)> {
        match Self::keys(&json) {
            Ok((id, occurred)) => Ok(RawEvent { id, occurred, json }),
            Err(err) => Err((err, json)),
        }
    }

    fn keys(json: &RawValue) -> Result<(String, EventTime), EventParseError> {
        let keys: Keys<'_> = match serde_json::from_str(json.get()) {
            Ok(keys) => keys,
            // A key of the wrong type: find out which, for a clear health event.
            Err(_) => {
                let value: serde_json::Value =
                    serde_json::from_str(json.get()).map_err(|_| EventParseError::MissingId)?;
                return Err(match value.get("id").and_then(|v| v.as_str()) {
                    Some(id) => EventParseError::BadOccurredDate { id: id.to_string() },
                    None => EventParseError::MissingId,
                });
            }
        };
        let id = keys.id.ok_or(EventParseError::MissingId)?.into_owned();
        let occurred = keys
            .occurred_date
            .as_deref()
            .and_then(EventTime::parse)
            .ok_or_else(|| EventParseError::BadOccurredDate { id: id.clone() })?;
        Ok((id, occurred))
    }

    /// The event's JSON text as KnowBe4 sent it.
    pub fn as_json(&self) -> &str {
        self.json.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn keeps_the_original_text_and_reads_the_keys() {
        let text = r#"{"id":"a-1","occurred_date":"2022-08-09T10:05:13.890Z","x":{"y":[1,2]}}"#;
        let event = RawEvent::from_raw(raw(text)).unwrap();
        assert_eq!(event.id, "a-1");
        assert_eq!(event.as_json(), text);
        assert_eq!(event.occurred.to_rfc3339(), "2022-08-09T10:05:13.89Z");
    }

    #[test]
    fn rejects_events_without_id_or_date() {
        assert_eq!(
            RawEvent::from_raw(raw(r#"{"occurred_date":"2022-08-09T10:05:13Z"}"#)).unwrap_err(),
            EventParseError::MissingId
        );
        assert!(matches!(
            RawEvent::from_raw(raw(r#"{"id":"x","occurred_date":"yesterday"}"#)).unwrap_err(),
            EventParseError::BadOccurredDate { .. }
        ));
    }

    #[test]
    fn time_arithmetic_saturates() {
        let t = EventTime(5_000_000_000);
        assert_eq!(t.minus_secs(2).0, 3_000_000_000);
        assert_eq!(EventTime(i64::MIN).minus_secs(1).0, i64::MIN);
        assert_eq!(t.secs_until(EventTime(9_000_000_000)), 4);
        assert_eq!(t.secs_until(EventTime(0)), 0);
    }
}
