//! Dispatch: one work message per source a scheduled run would work on now.

use std::collections::BTreeMap;

use futures::StreamExt;
use serde::Serialize;
use time::OffsetDateTime;

use super::WorkMessage;
use super::queue::{SEND_BATCH, WorkQueue};
use crate::app::App;
use crate::domain::checkpoint::DEFAULT_PAGE_SIZE;
use crate::domain::planner::{self, PlanInput};
use crate::domain::quota::utc_day;
use crate::domain::state::{Lifecycle, Millis};
use crate::error::{Error, Result};
use crate::store::{SourceSnapshot, StoreSnapshot};

/// `SendMessageBatch` calls in flight at once.
const SEND_CONCURRENCY: usize = 8;
/// Attempts at sending the messages SQS refused in a batch.
const SEND_ATTEMPTS: u32 = 3;

/// Why dispatch left a source out; the same reasons a scheduled run would skip it for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NotDue {
    /// No state item (being created or deleted).
    NoState,
    /// In `Error`: waits for `restart` or `update`.
    InError,
    /// Being deleted.
    Stopping,
    /// Blocked by a ThirdPartyConfigError until updated or restarted.
    Blocked,
    /// The account's daily quota is used up.
    QuotaReached,
    /// A run holds the lease now.
    Leased,
    /// The freshness plan saves this interval's budget (nothing due), or the interval's
    /// allowance is spent.
    NothingDue,
    /// An item of the source could not be read (logged by id): left out, not failing the
    /// dispatch of the others.
    Unreadable,
}

/// What one dispatch did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DispatchReport {
    /// Messages sent (one per due source).
    pub queued: usize,
    /// Sources in the table.
    pub sources: usize,
    /// Sources left out, by reason.
    pub not_due: BTreeMap<NotDue, usize>,
    /// `SendMessageBatch` calls made.
    pub send_calls: usize,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
}

/// Whether a scheduled run of `source` would work now; the reason when not. Mirrors the
/// run's own checks (`collector`) and its freshness plan, from the snapshot's figures.
pub fn due(
    source: &SourceSnapshot,
    snapshot: &StoreSnapshot,
    now: OffsetDateTime,
    interval_secs: u64,
) -> std::result::Result<(), NotDue> {
    let Some(state) = &source.state else {
        return Err(NotDue::NoState);
    };
    let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as Millis;
    let today = utc_day(now);
    // The phishing stream is due on its own clock, whatever the user events' state.
    let phishing_only = !source.record.spec.collect_events;
    let phishing_due = source.record.spec.phishing.is_some()
        && state.lifecycle != Lifecycle::Stopping
        && !(phishing_only && state.lifecycle == Lifecycle::Error)
        && state.phishing.clone().unwrap_or_default().ready(
            source.record.config_version,
            &today,
            now_ms,
        );
    let leased = source.lease_expires_at.is_some_and(|exp| exp > now_ms);
    if phishing_due && !leased {
        return Ok(());
    }
    match state.lifecycle {
        Lifecycle::Error => return Err(NotDue::InError),
        Lifecycle::Stopping => return Err(NotDue::Stopping),
        _ => {}
    }
    if state.blocked_config_version == Some(source.record.config_version) {
        return Err(NotDue::Blocked);
    }
    if state.counters.quota_exhausted_day.as_deref() == Some(today.as_str()) {
        return Err(NotDue::QuotaReached);
    }
    if leased {
        return Err(NotDue::Leased);
    }
    if phishing_only {
        return Err(NotDue::NothingDue);
    }
    // A source that never reached KnowBe4 has no account yet: its first run is due.
    let Some(account) = &state.account else {
        return Ok(());
    };
    let members = snapshot.members.get(account).cloned().unwrap_or_default();
    let checkpoint = &state.checkpoint;
    let plan = planner::plan(&PlanInput {
        daily_limit: members
            .limit()
            .unwrap_or(source.record.spec.daily_request_limit),
        used_today: snapshot.quota_used.get(account).copied().unwrap_or(0),
        now,
        interval_secs,
        sources: members.count(),
        page_size: state.counters.page_size.unwrap_or(DEFAULT_PAGE_SIZE),
        window_events: checkpoint.recent.len() as u64,
        reread_at: checkpoint.reread_at,
        head_at: checkpoint.head_at,
        gaps: checkpoint.gaps.len(),
        lateness_secs: source.record.spec.lateness_window_secs,
    });
    if plan.budget == 0 {
        return Err(NotDue::NothingDue);
    }
    Ok(())
}

/// Lists the due sources and queues one message for each; fails when some could not be
/// queued (the others were: a retried dispatch only repeats harmless duplicates).
pub async fn dispatch(app: &App, queue: &WorkQueue) -> Result<DispatchReport> {
    let started = std::time::Instant::now();
    let now = OffsetDateTime::now_utc();
    let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as Millis;
    let snapshot = app.store.snapshot(&utc_day(now), now_ms).await?;
    let mut report = DispatchReport {
        sources: snapshot.sources.len() + snapshot.unreadable,
        ..DispatchReport::default()
    };
    if snapshot.unreadable > 0 {
        report
            .not_due
            .insert(NotDue::Unreadable, snapshot.unreadable);
    }
    let dispatched_at = crate::domain::status::rfc3339_ms(now_ms);
    let mut messages = Vec::new();
    for source in &snapshot.sources {
        match due(source, &snapshot, now, app.settings.schedule_interval_secs) {
            Ok(()) => {
                let body = serde_json::to_string(&WorkMessage {
                    source_id: source.record.id.clone(),
                    dispatched_at: Some(dispatched_at.clone()),
                })
                .map_err(|e| Error::store("serialising a work message", e))?;
                // Batch entry ids must be unique within a batch: the position is.
                messages.push((messages.len().to_string(), body));
            }
            Err(reason) => *report.not_due.entry(reason).or_default() += 1,
        }
    }
    let batches: Vec<Vec<(String, String)>> =
        messages.chunks(SEND_BATCH).map(<[_]>::to_vec).collect();
    let results: Vec<(usize, usize, Option<Error>)> = futures::stream::iter(batches)
        .map(|batch| async move {
            let mut pending = batch;
            let mut calls = 0;
            for _ in 0..SEND_ATTEMPTS {
                calls += 1;
                match queue.send_batch(&pending).await {
                    Ok(refused) if refused.is_empty() => return (calls, 0, None),
                    Ok(refused) => pending.retain(|(id, _)| refused.contains(id)),
                    Err(err) => return (calls, pending.len(), Some(err)),
                }
            }
            (calls, pending.len(), None)
        })
        .buffer_unordered(SEND_CONCURRENCY)
        .collect()
        .await;
    let mut unsent = 0;
    let mut first_error = None;
    for (calls, failed, err) in results {
        report.send_calls += calls;
        unsent += failed;
        if first_error.is_none() {
            first_error = err;
        }
    }
    report.queued = messages.len() - unsent;
    report.duration_ms = started.elapsed().as_millis() as u64;
    app.settings
        .metrics
        .emit(&super::emf::queued_line(report.queued as u64, now_ms));
    tracing::info!(
        queued = report.queued,
        sources = report.sources,
        not_due = ?report.not_due,
        duration_ms = report.duration_ms,
        "Dispatch finished."
    );
    if unsent > 0 {
        let message = format!(
            "{unsent} of {} work messages could not be queued (the other {} were); the next schedule lists their sources again",
            messages.len(),
            report.queued
        );
        return Err(match first_error {
            Some(Error::Store { source, .. }) => Error::Store { message, source },
            _ => Error::Store {
                message,
                source: None,
            },
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::state::{SecretRef, SourceRecord, SourceState};
    use crate::store::AccountMembers;

    fn record() -> SourceRecord {
        let parsed = crate::config::parse_source_value(
            serde_json::json!({"api.version": "v1", "source": {"config": {
                "name": "Acme", "category": "security/knowbe4",
                "baseURL": "https://training.knowbe4.com", "apiKey": "k",
                "dailyRequestLimit": 2000
            }, "schemaRef": {"type": "KnowBe4"}, "sourceType": "Universal"}}),
            crate::config::ValidationOptions::default(),
        )
        .unwrap();
        SourceRecord {
            id: "acme".into(),
            spec: parsed.spec,
            secret_ref: SecretRef::LocalFile,
            config_version: 3,
            created_at: 0,
            updated_at: 0,
            account: None,
            destination: None,
        }
    }

    #[test]
    fn dispatch_skips_what_a_scheduled_run_would_skip() {
        let now = time::macros::datetime!(2026-12-06 12:00 UTC);
        let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as Millis;
        let snapshot = StoreSnapshot::default();
        let mut source = SourceSnapshot {
            record: record(),
            state: None,
            lease_expires_at: Some(0),
        };
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::NoState));
        let mut state = SourceState::new(0);
        source.state = Some(state.clone());
        // Never ran: no account yet, due.
        assert_eq!(due(&source, &snapshot, now, 300), Ok(()));
        source.lease_expires_at = Some(now_ms + 1);
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::Leased));
        source.lease_expires_at = Some(now_ms - 1);
        assert_eq!(due(&source, &snapshot, now, 300), Ok(()));
        state.blocked_config_version = Some(3);
        source.state = Some(state.clone());
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::Blocked));
        state.blocked_config_version = Some(2);
        state.counters.quota_exhausted_day = Some("2026-12-06".into());
        source.state = Some(state.clone());
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::QuotaReached));
        state.counters.quota_exhausted_day = Some("2026-12-05".into());
        state.transition(Lifecycle::Error, 1, "x");
        source.state = Some(state.clone());
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::InError));
        state.transition(Lifecycle::Stopping, 2, "x");
        source.state = Some(state.clone());
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::Stopping));
    }

    #[test]
    fn dispatch_follows_the_freshness_plan_of_the_account() {
        let now = time::macros::datetime!(2026-12-06 12:00 UTC);
        let mut state = SourceState::new(0);
        state.transition(Lifecycle::Collecting, 1, "x");
        state.account = Some("acct".into());
        let source = SourceSnapshot {
            record: record(),
            state: Some(state),
            lease_expires_at: Some(0),
        };
        let mut snapshot = StoreSnapshot::default();
        snapshot.members.insert(
            "acct".into(),
            AccountMembers {
                members: vec![("acme".into(), 2000)],
            },
        );
        // Ample quota, nothing used: due.
        assert_eq!(due(&source, &snapshot, now, 300), Ok(()));
        // The whole day's quota used: the interval's allowance is zero.
        snapshot.quota_used.insert("acct".into(), 2000);
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::NothingDue));
    }

    /// A source's phishing stream is due on its own clock: a source whose user events
    /// are in Error (or out of quota) is still dispatched when its poll is due, and one
    /// that collects only phishing tests is not dispatched between polls.
    #[test]
    fn the_phishing_stream_is_due_on_its_own_clock() {
        use crate::domain::phishing_poll::PhishingState;
        let now = time::macros::datetime!(2026-12-06 12:00 UTC);
        let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as Millis;
        let parsed = crate::config::parse_source_value(
            serde_json::json!({"api.version": "v1", "source": {"config": {
                "name": "Acme", "region": "US", "collectPhishingTests": true,
                "apiKeyPhishing": "t", "collectExternalEvents": true, "apiKeyEvent": "k"
            }, "schemaRef": {"type": "KnowBe4 KMSAT"}}}),
            crate::config::ValidationOptions::default(),
        )
        .unwrap();
        let mut source = SourceSnapshot {
            record: SourceRecord {
                spec: parsed.spec,
                ..record()
            },
            state: None,
            lease_expires_at: Some(0),
        };
        let mut state = SourceState::new(0);
        state.lifecycle = Lifecycle::Error;
        state.phishing = Some(PhishingState {
            next_poll: Some(now_ms - 1),
            ..PhishingState::default()
        });
        source.state = Some(state.clone());
        let snapshot = StoreSnapshot::default();
        assert_eq!(due(&source, &snapshot, now, 300), Ok(()));
        state.phishing.as_mut().unwrap().next_poll = Some(now_ms + 60_000);
        source.state = Some(state.clone());
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::InError));

        source.record.spec.collect_events = false;
        state.lifecycle = Lifecycle::Collecting;
        source.state = Some(state.clone());
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::NothingDue));
        state.phishing.as_mut().unwrap().next_poll = None;
        source.state = Some(state);
        assert_eq!(due(&source, &snapshot, now, 300), Ok(()));
        source.lease_expires_at = Some(now_ms + 1_000);
        assert_eq!(due(&source, &snapshot, now, 300), Err(NotDue::Leased));
    }
}
