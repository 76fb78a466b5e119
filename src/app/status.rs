//! What `status` and `health` show for a source.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::domain::event::EventTime;
use crate::domain::quota::utc_day;
use crate::domain::state::{HealthEvent, Lifecycle, SourceState};
use crate::domain::status::{HealthView, TransitionView, rfc3339_ms};
use crate::error::{Error, Result};

use super::{App, now_ms};

/// What `status` shows for one source.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The source id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Lifecycle state.
    pub state: Lifecycle,
    /// When the state was entered (RFC 3339).
    pub since: Option<String>,
    /// Last run that completed without error.
    pub last_success: Option<String>,
    /// Newest occurred_date covered (the checkpoint's high-water mark).
    pub checkpoint: Option<String>,
    /// Unfinished ranges still to collect (a backlog).
    pub backlog_ranges: usize,
    /// The backlog as time and events still to collect, and when it should be caught up.
    pub backlog: Option<crate::domain::status::Backlog>,
    /// Whether the dedupe window overflowed and narrowed (see the checkpoint docs).
    pub lateness_window_narrowed: bool,
    /// Requests used today (UTC) by every source of the KnowBe4 account.
    pub quota_used_today: u32,
    /// Requests left today for the account's sources.
    pub quota_left_today: u32,
    /// The account's daily limit for this deployment: the smallest `dailyRequestLimit`
    /// (after `quotaShare`) among the sources sharing the account.
    pub daily_request_limit: u32,
    /// The KnowBe4 account id (a hash of API host and key; see `account`), once a run
    /// has read the key.
    pub account: Option<String>,
    /// The sources (this one included) sharing the account's quota and rate.
    pub account_sources: Vec<String>,
    /// Set when those sources were configured with different limits.
    pub account_note: Option<String>,
    /// What the account's quota buys at this schedule: expected lag for new and for
    /// backdated events, how often the lateness window is re-read, and a warning when
    /// the schedule asks for more than the quota pays.
    pub freshness: crate::domain::planner::Freshness,
    /// Whether the daily quota is used up (not an error).
    pub quota_reached: bool,
    /// Events forwarded by the last run.
    pub forwarded_last_run: u64,
    /// Events forwarded today (UTC).
    pub forwarded_today: u64,
    /// Events forwarded since creation.
    pub forwarded_total: u64,
    /// Seconds between now and the newest forwarded event.
    pub lag_seconds: Option<u64>,
    /// Retry deadline of the current failure streak.
    pub retry_deadline: Option<String>,
    /// Blocked by a ThirdPartyConfigError until updated.
    pub blocked_until_update: bool,
    /// Recent lifecycle transitions, oldest first.
    pub history: Vec<TransitionView>,
    /// The latest health events, newest first, each marked resolved or not.
    pub health: Vec<HealthView>,
    /// The phishing stream (security tests and recipients), when the source collects it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phishing: Option<PhishingStatus>,
}

/// The phishing stream of a source, as `status` shows it: its checkpoint (the tests it
/// tracks), last and next poll, and the Reporting account's budget today.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhishingStatus {
    /// Hours between polls (`phishingPollInterval`).
    pub poll_interval_hours: u32,
    /// When the last complete poll started (RFC 3339).
    pub last_poll: Option<String>,
    /// When the next poll is due (RFC 3339); `None`: at the next run.
    pub next_poll: Option<String>,
    /// Security tests tracked (the change state covers each one's recipients).
    pub tests_tracked: usize,
    /// Tests whose recipients the last complete poll read (open, changed, final for < 7
    /// days, or due for their weekly re-read).
    pub tests_live: usize,
    /// Requests of the last poll.
    pub last_poll_requests: u32,
    /// Records forwarded by the last poll.
    pub last_poll_forwarded: u64,
    /// Records forwarded since the source was created.
    pub forwarded_total: u64,
    /// The Reporting account's requests today.
    pub requests_today: u32,
    /// The Reporting daily limit this source works within.
    pub daily_request_limit: u32,
    /// Whether the stream is stopped until an update or restart.
    pub stopped: bool,
    /// The retry deadline of a streak of failed polls (RFC 3339).
    pub retry_deadline: Option<String>,
}

impl App {
    /// Status of one source or all.
    pub async fn status(&self, id: Option<&str>) -> Result<Vec<SourceStatus>> {
        let records = match id {
            Some(id) => vec![
                self.store
                    .get_source(id)
                    .await?
                    .ok_or_else(|| Error::NotFound(id.to_string()))?,
            ],
            None => self.store.list_sources().await?,
        };
        let mut out = Vec::with_capacity(records.len());
        let now = OffsetDateTime::now_utc();
        let today = utc_day(now);
        for record in records {
            let state = self.store.load_state(&record.id).await?.map(|s| s.value);
            let state = state.unwrap_or_else(|| SourceState::new(record.created_at));
            let (used, members) = match &state.account {
                Some(account) => (
                    self.store.quota_used(account, &today).await?,
                    self.store.account_members(account, now_ms()).await?,
                ),
                None => (0, Default::default()),
            };
            let health = self.store.list_health(&record.id, 5).await?;
            let limit = members.limit().unwrap_or(record.spec.daily_request_limit);
            let account_note = members.disagree().then(|| {
                let limits: Vec<String> = members
                    .members
                    .iter()
                    .map(|(id, limit)| format!("{id}: {limit}"))
                    .collect();
                format!(
                    "the sources sharing this account give different daily limits ({}); the smallest applies",
                    limits.join(", ")
                )
            });
            let now_ns = EventTime::from_datetime(now);
            out.push(SourceStatus {
                id: record.id.clone(),
                name: record.spec.name.clone(),
                state: state.lifecycle,
                since: state.since().map(rfc3339_ms),
                last_success: state.last_success.map(rfc3339_ms),
                checkpoint: state.checkpoint.high.map(EventTime::to_rfc3339),
                backlog_ranges: state.checkpoint.gaps.len(),
                backlog: crate::domain::status::backlog(
                    &state.checkpoint,
                    state.counters.forwarded_total,
                    limit.saturating_sub(used),
                    limit,
                    now,
                ),
                lateness_window_narrowed: state.checkpoint.recent_floor.is_some(),
                quota_used_today: used,
                quota_left_today: limit.saturating_sub(used),
                daily_request_limit: limit,
                account: state.account.clone(),
                account_sources: members.members.iter().map(|(id, _)| id.clone()).collect(),
                account_note,
                freshness: crate::domain::planner::freshness(&crate::domain::planner::PlanInput {
                    daily_limit: limit,
                    used_today: used,
                    now,
                    interval_secs: self.settings.schedule_interval_secs,
                    sources: members.count(),
                    page_size: state
                        .counters
                        .page_size
                        .unwrap_or(crate::domain::checkpoint::DEFAULT_PAGE_SIZE),
                    window_events: state.checkpoint.recent.len() as u64,
                    reread_at: state.checkpoint.reread_at,
                    head_at: state.checkpoint.head_at,
                    gaps: state.checkpoint.gaps.len(),
                    lateness_secs: record.spec.lateness_window_secs,
                }),
                quota_reached: state.counters.quota_exhausted_day.as_deref()
                    == Some(today.as_str())
                    || used >= limit,
                forwarded_last_run: state.counters.last_run_forwarded,
                forwarded_today: if state.counters.day == today {
                    state.counters.forwarded_today
                } else {
                    0
                },
                forwarded_total: state.counters.forwarded_total,
                lag_seconds: state
                    .counters
                    .newest_forwarded
                    .map(|n| EventTime(n).secs_until(now_ns)),
                retry_deadline: state.streak.as_ref().map(|s| rfc3339_ms(s.deadline)),
                blocked_until_update: state.blocked_config_version == Some(record.config_version),
                history: state.history.iter().map(TransitionView::from).collect(),
                health: health
                    .iter()
                    .map(|e| HealthView::new(e, state.last_success_of(e.data_type.as_deref())))
                    .collect(),
                phishing: match &record.spec.phishing {
                    None => None,
                    Some(spec) => {
                        let ps = state.phishing.clone().unwrap_or_default();
                        let requests_today = match &ps.account {
                            Some(account) => self.store.quota_used(account, &today).await?,
                            None => 0,
                        };
                        Some(PhishingStatus {
                            poll_interval_hours: spec.poll_interval_hours,
                            last_poll: ps.last_poll.map(rfc3339_ms),
                            next_poll: ps.next_poll.map(rfc3339_ms),
                            tests_tracked: ps.tests_tracked as usize,
                            tests_live: ps.tests_live as usize,
                            last_poll_requests: ps.last_poll_requests,
                            last_poll_forwarded: ps.last_poll_forwarded,
                            forwarded_total: ps.forwarded_total,
                            requests_today,
                            daily_request_limit: spec.daily_request_limit,
                            stopped: ps.stopped_config_version == Some(record.config_version),
                            retry_deadline: ps.streak.as_ref().map(|s| rfc3339_ms(s.deadline)),
                        })
                    }
                },
            });
        }
        Ok(out)
    }

    /// Health events of a source, newest first.
    pub async fn health(&self, id: &str) -> Result<Vec<HealthEvent>> {
        if self.store.get_source(id).await?.is_none() {
            return Err(Error::NotFound(id.to_string()));
        }
        self.store.list_health(id, 100).await
    }
}
