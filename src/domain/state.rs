//! What the state store keeps per source: its configuration record, its run state
//! (lifecycle, checkpoint, retry streak, counters), its lease and its health events.
//!
//! These are plain serde types; both stores (DynamoDB and the local file) persist them
//! as JSON documents next to the few attributes they condition writes on.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::SourceSpec;
use crate::domain::checkpoint::Checkpoint;
use crate::error::HealthKind;

/// Unix time in milliseconds: every stored instant uses it.
pub type Millis = i64;

/// Where a source's secrets (API key, destination URL/token) are kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SecretRef {
    /// A Secrets Manager secret (name or ARN) holding a JSON object of secrets.
    SecretsManager {
        /// The secret's id; never its value.
        secret_id: String,
    },
    /// Kept in the local state file (local mode only).
    LocalFile,
}

/// A source as created by the user: validated configuration, no secrets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Stable id, chosen by the user or generated.
    pub id: String,
    /// The validated configuration.
    pub spec: SourceSpec,
    /// Where the API key (and destination secrets) live.
    pub secret_ref: SecretRef,
    /// Bumped by every `update`; a config-error block names the version it applies to.
    pub config_version: u64,
    /// When the source was created.
    pub created_at: Millis,
    /// When the configuration last changed.
    pub updated_at: Millis,
    /// The KnowBe4 account id (hash of API host and key, see [`crate::domain::account`]), for the
    /// duplicate guard; absent on sources stored before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The destination id (hash of format and URL), for the duplicate guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

/// The lifecycle states of the hosted source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Lifecycle {
    /// Submitted, validated and stored; no run has picked it up yet.
    Pending,
    /// A run picked the source up.
    Started,
    /// Configuration and secrets loaded.
    Initialized,
    /// KnowBe4 accepted the key.
    Authenticated,
    /// Events are being collected.
    Collecting,
    /// Stopped by an error; see the health events.
    Error,
    /// Being deleted.
    Stopping,
}

impl Lifecycle {
    /// The state's name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Pending => "Pending",
            Lifecycle::Started => "Started",
            Lifecycle::Initialized => "Initialized",
            Lifecycle::Authenticated => "Authenticated",
            Lifecycle::Collecting => "Collecting",
            Lifecycle::Error => "Error",
            Lifecycle::Stopping => "Stopping",
        }
    }
}

/// One lifecycle change, kept so `status` can show how the source got where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The state entered.
    pub state: Lifecycle,
    /// When it was entered.
    pub at: Millis,
    /// Why, in a sentence without secrets.
    pub reason: String,
}

/// How many transitions are kept: enough to see a first run, bounded for the item size.
pub const HISTORY_LEN: usize = 32;

/// A run of consecutive retryable failures, and the deadline after which the source quits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryStreak {
    /// The kind of the latest failure.
    pub kind: HealthKind,
    /// When the first failure of the streak happened.
    pub first_failure: Millis,
    /// `first_failure` + the retry window: past it the source goes to `Error`.
    pub deadline: Millis,
    /// Failures in the streak.
    pub failures: u32,
}

impl RetryStreak {
    /// Counts one more retryable failure of `kind` at `now` in `streak` (a new streak
    /// with a retry window of `window_ms` when there is none); returns the streak's
    /// deadline and whether it has passed.
    pub fn count(
        streak: &mut Option<RetryStreak>,
        kind: HealthKind,
        now: Millis,
        window_ms: Millis,
    ) -> (Millis, bool) {
        let streak = streak.get_or_insert(RetryStreak {
            kind,
            first_failure: now,
            deadline: now + window_ms,
            failures: 0,
        });
        streak.kind = kind;
        streak.failures += 1;
        (streak.deadline, now >= streak.deadline)
    }
}

/// Counters shown by `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounters {
    /// Events forwarded by the last run.
    pub last_run_forwarded: u64,
    /// Events per page KnowBe4 served the last run (`limit_value`), for the planner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// UTC day (`YYYY-MM-DD`) that `forwarded_today` counts.
    pub day: String,
    /// Events forwarded on `day`.
    pub forwarded_today: u64,
    /// Total events forwarded since the source was created.
    pub forwarded_total: u64,
    /// Newest `occurred_date` forwarded (ns), for the collection lag.
    pub newest_forwarded: Option<i64>,
    /// Set while the daily quota is used up: the UTC day it applies to.
    pub quota_exhausted_day: Option<String>,
}

/// The mutable state of a source: one document, written with optimistic versioning.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceState {
    /// Current lifecycle state.
    pub lifecycle: Lifecycle,
    /// Recent transitions, newest last, at most [`HISTORY_LEN`].
    pub history: VecDeque<Transition>,
    /// What has been delivered, and what is left to walk.
    pub checkpoint: Checkpoint,
    /// The current failure streak, if the last run failed with a retryable error.
    pub streak: Option<RetryStreak>,
    /// Set by a `ThirdPartyConfigError`: scheduled runs skip the source until the
    /// configuration version differs from this one.
    pub blocked_config_version: Option<u64>,
    /// When a run last completed without error.
    pub last_success: Option<Millis>,
    /// Counters for `status` and metrics.
    pub counters: RunCounters,
    /// The KnowBe4 account id (see [`crate::domain::account`]) the last run collected from, so
    /// `status` can show the account's shared budget without reading the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The phishing stream's state, once it ran (see [`crate::domain::phishing_poll`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phishing: Option<crate::domain::phishing_poll::PhishingState>,
}

impl SourceState {
    /// When the stream a health event of `data_type` belongs to last succeeded: the
    /// phishing stream's own success for `phishing`, the source's otherwise (a user-event
    /// success does not resolve a phishing failure).
    pub fn last_success_of(&self, data_type: Option<&str>) -> Option<i64> {
        match data_type {
            Some("phishing") => self.phishing.as_ref().and_then(|p| p.last_success),
            _ => self.last_success,
        }
    }

    /// The state of a freshly created source.
    pub fn new(now: Millis) -> Self {
        let mut state = SourceState {
            lifecycle: Lifecycle::Pending,
            history: VecDeque::new(),
            checkpoint: Checkpoint::default(),
            streak: None,
            blocked_config_version: None,
            last_success: None,
            counters: RunCounters::default(),
            account: None,
            phishing: None,
        };
        state.history.push_back(Transition {
            state: Lifecycle::Pending,
            at: now,
            reason: "Source validated and stored.".into(),
        });
        state
    }

    /// Moves to `next`, recording when and why; a repeat of the current state is a no-op.
    pub fn transition(&mut self, next: Lifecycle, now: Millis, reason: impl Into<String>) {
        if self.lifecycle == next {
            return;
        }
        self.lifecycle = next;
        self.history.push_back(Transition {
            state: next,
            at: now,
            reason: reason.into(),
        });
        while self.history.len() > HISTORY_LEN {
            self.history.pop_front();
        }
    }

    /// When the current state was entered.
    pub fn since(&self) -> Option<Millis> {
        self.history.back().map(|t| t.at)
    }
}

/// A state document with the version it was read at.
#[derive(Clone, Debug)]
pub struct Versioned<T> {
    /// The document.
    pub value: T,
    /// Its version; a write must name it and bumps it by one.
    pub version: u64,
}

/// Proof of holding a source's lease; every progress write is conditioned on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The source the lease is for.
    pub source_id: String,
    /// Who holds it (a run id).
    pub owner: String,
    /// Fencing token: strictly increases with every acquisition, so a paused old holder
    /// cannot write after a newer one took over.
    pub fence: u64,
    /// When the lease lapses unless renewed.
    pub expires_at: Millis,
    /// KnowBe4 requests must not be sent before this time: the previous holder's last
    /// requests may still be inside the current one-second rate window.
    pub quiet_until: Millis,
}

/// A health event, as stored and listed by `health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthEvent {
    /// The source it concerns.
    pub source_id: String,
    /// The source's name, for humans reading alerts.
    pub source_name: String,
    /// One of the three documented types.
    pub kind: HealthKind,
    /// What happened, without secrets.
    pub message: String,
    /// HTTP status if there was one, else the error kind.
    pub status: Option<u16>,
    /// A short machine-readable error kind (`http_status`, `timeout`, `malformed`, ...).
    pub error_kind: String,
    /// First occurrence within the streak.
    pub first_seen: Millis,
    /// Latest occurrence.
    pub last_seen: Millis,
    /// Occurrences within the streak (repeats update one event).
    pub count: u32,
    /// Whether collection will retry, and from when.
    pub retry_at: Option<Millis>,
    /// The retry deadline, past which the source quits.
    pub retry_deadline: Option<Millis>,
    /// The data type whose collection failed (`events`, `phishing`); absent on events
    /// stored before sources collected more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<String>,
}

impl HealthEvent {
    /// The key that makes repeats of one error within a streak update one event.
    pub fn streak_key(&self) -> String {
        format!("{}#{}", self.first_seen, self.kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_streak_counts_from_its_first_failure_until_its_deadline() {
        let mut streak = None;
        let kind = HealthKind::ThirdPartyGenericError;
        assert_eq!(
            RetryStreak::count(&mut streak, kind, 1_000, 500),
            (1_500, false)
        );
        assert_eq!(
            RetryStreak::count(&mut streak, HealthKind::FirstPartyGenericError, 1_499, 500),
            (1_500, false)
        );
        assert_eq!(
            RetryStreak::count(&mut streak, kind, 1_500, 500),
            (1_500, true)
        );
        let streak = streak.unwrap();
        assert_eq!(
            (streak.failures, streak.first_failure, streak.kind),
            (3, 1_000, kind)
        );
    }

    #[test]
    fn transitions_are_recorded_and_bounded() {
        let mut state = SourceState::new(1);
        state.transition(Lifecycle::Started, 2, "picked up");
        state.transition(Lifecycle::Started, 3, "again");
        assert_eq!(state.history.len(), 2);
        assert_eq!(state.since(), Some(2));
        for i in 0..100 {
            let next = if i % 2 == 0 {
                Lifecycle::Collecting
            } else {
                Lifecycle::Authenticated
            };
            state.transition(next, 10 + i, "flip");
        }
        assert_eq!(state.history.len(), HISTORY_LEN);
    }
}
