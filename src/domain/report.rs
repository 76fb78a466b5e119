//! What one run did: the one-line summary that is logged, returned to the caller and turned
//! into metrics.

use serde::{Deserialize, Serialize};

use crate::domain::state::Lifecycle;
use crate::error::HealthKind;

/// How a run for one source ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The walk ran (possibly cut short by budget or deadline) and progress was saved.
    Collected,
    /// Nothing to do or not allowed now; the reason says which.
    Skipped,
    /// The run failed; a health event was recorded.
    Failed,
}

/// Why a run did not start its work, when it did not: typed, so callers (the fan-out's
/// message handling) act on it without reading the report's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotStarted {
    /// The source does not exist (deleted, or never was).
    NoSource,
    /// Another run holds the source's lease (it is being collected now).
    Leased,
    /// The state store failed (unavailable, throttled, timed out) before the run sent any
    /// KnowBe4 request. Nothing was counted against the source (no health event, no retry
    /// streak): the store, not the source, failed, and retrying soon is right.
    StoreFailed,
    /// A queued run whose work was already done: a run of the source succeeded after the
    /// message was dispatched (a backlog's older copy). Nothing was sent.
    Stale,
}

/// The one-line summary of a run, logged and returned to the caller.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// The source.
    pub source_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was skipped or failed, or how the walk ended.
    pub detail: String,
    /// The health event type, when it failed.
    pub health: Option<HealthKind>,
    /// Events received from KnowBe4 (after dedupe: those forwarded or to forward).
    pub fetched: u64,
    /// Events the destination accepted.
    pub forwarded: u64,
    /// Events on fetched pages that were already delivered (dropped as duplicates).
    pub duplicates_dropped: u64,
    /// KnowBe4 requests sent by this run.
    pub requests: u32,
    /// KnowBe4 pages the walk read (progress records come every so many of these).
    #[serde(default)]
    pub pages: u64,
    /// Requests reserved today, after this run.
    pub quota_used: u32,
    /// Requests left today for this source.
    pub quota_left: u32,
    /// The checkpoint's high-water mark after the run.
    pub checkpoint: Option<String>,
    /// Whether a backlog (gaps) remains.
    pub backlog: bool,
    /// Wall time of the run.
    pub duration_ms: u64,
    /// Lifecycle state after the run.
    pub state: Option<Lifecycle>,
    /// Seconds from the newest forwarded `occurred_date` to the end of the run.
    pub lag_seconds: Option<u64>,
    /// Events whose `occurred_date` was missing or unreadable: forwarded as KnowBe4 sent
    /// them, placed in the walk at their neighbour's time (their ids are logged).
    #[serde(default)]
    pub undated_events: u64,
    /// Whether the run re-read the whole lateness window (`false`: new events only, as
    /// the freshness planner decided); `None` when no walk started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_walk: Option<bool>,
    /// Set when the run did not start its work, saying why (see [`NotStarted`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_started: Option<NotStarted>,
}

impl RunReport {
    /// An empty report for `source_id`: skipped, nothing done, until the run says more.
    pub fn new(source_id: &str) -> Self {
        RunReport {
            source_id: source_id.to_string(),
            outcome: Outcome::Skipped,
            detail: String::new(),
            health: None,
            fetched: 0,
            forwarded: 0,
            duplicates_dropped: 0,
            requests: 0,
            pages: 0,
            quota_used: 0,
            quota_left: 0,
            checkpoint: None,
            backlog: false,
            duration_ms: 0,
            state: None,
            lag_seconds: None,
            undated_events: 0,
            full_walk: None,
            not_started: None,
        }
    }
}
