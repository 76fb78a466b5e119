//! Work: one message, one scheduled run of one source; and the Lambda SQS event of them.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use futures::StreamExt;
use tokio::time::Instant;

use super::WorkMessage;
use super::emf::{MessageOutcome, message_line};
use super::queue::WorkQueue;
use crate::app::App;
use crate::error::{Error, Result};
use crate::run::{NotStarted, RunReport, Trigger, collect_queued};

/// What to do with a message after its run.
#[derive(Clone, Debug)]
pub enum Disposition {
    /// Done: delete it. The run started (the report says how it went; a failure is the
    /// source's health event and retry streak, not SQS's).
    Done(Box<RunReport>),
    /// A duplicate delivery: another run holds the lease. Delete it.
    Leased(Box<RunReport>),
    /// Nothing to do: a run of the source succeeded after the message was dispatched
    /// (stale: an older copy from a backlog). Delete it.
    Gone(String),
    /// The run could not start for a reason worth retrying soon (the state store failed
    /// before any KnowBe4 request), or the message is poison: an unreadable body, or a
    /// source id the table does not know (never created, or deleted since dispatch — the
    /// store keeps no tombstone to tell them apart). Leave the message for SQS,
    /// visible again after the queue's retry delay (which moves it to the dead-letter
    /// queue after `maxReceiveCount` receives).
    Retry(String),
}

impl Disposition {
    /// The metric outcome.
    pub fn outcome(&self) -> MessageOutcome {
        match self {
            Disposition::Done(_) => MessageOutcome::Started,
            Disposition::Leased(_) => MessageOutcome::SkippedLeased,
            Disposition::Gone(_) => MessageOutcome::SkippedGone,
            Disposition::Retry(_) => MessageOutcome::FailedToStart,
        }
    }

    /// Whether the message is deleted.
    pub fn delete(&self) -> bool {
        !matches!(self, Disposition::Retry(_))
    }
}

/// Reads a message body.
pub fn parse_body(body: &str) -> Result<WorkMessage> {
    let message: WorkMessage = serde_json::from_str(body).map_err(|e| {
        Error::config(
            "body",
            format!("a work message is {{\"sourceId\": ..., \"dispatchedAt\": ...}}: {e}"),
        )
    })?;
    if message.source_id.is_empty() {
        return Err(Error::config("sourceId", "must not be empty"));
    }
    Ok(message)
}

/// Classifies a run's report (see [`Disposition`]) by its typed
/// [`RunReport::not_started`], never by its wording.
pub fn disposition(report: RunReport) -> Disposition {
    match report.not_started {
        // A poison message: offered again up to the redrive count, then it waits in the
        // dead-letter queue (as the issue asks), never in a loop. No KnowBe4 request.
        Some(NotStarted::NoSource) => {
            Disposition::Retry(format!("no source {} (deleted?)", report.source_id))
        }
        Some(NotStarted::Stale) => Disposition::Gone(report.detail),
        Some(NotStarted::Leased) => Disposition::Leased(Box::new(report)),
        // The state store failed before any KnowBe4 request; nothing was counted
        // against the source, so SQS retries it.
        Some(NotStarted::StoreFailed) => Disposition::Retry(report.detail),
        None => Disposition::Done(Box::new(report)),
    }
}

/// Runs the message's source as a scheduled run would, until `deadline`; logs the run and
/// emits its metrics.
pub async fn run_message(
    app: &App,
    body: &str,
    receive_count: u32,
    deadline: Instant,
) -> Disposition {
    let message = match parse_body(body) {
        Ok(message) => message,
        Err(err) => {
            let d = Disposition::Retry(err.chain());
            emit(app, &d);
            tracing::warn!(error = %err.chain(), receive_count, "Work message is not readable; it goes to the dead-letter queue after the redrive count.");
            return d;
        }
    };
    // A message whose source was collected since it was dispatched is stale (a backlog
    // holds several copies per source): dropped after the state read.
    let dispatched_at = message.dispatched_at.as_deref().and_then(|at| {
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
    });
    let report = collect_queued(
        app.run_context(),
        &message.source_id,
        deadline,
        Trigger::Schedule,
        dispatched_at,
    )
    .await;
    crate::app::log_run(&report);
    let d = disposition(report);
    match &d {
        Disposition::Done(report) => app
            .settings
            .metrics
            .emit(&crate::metrics::run_line(report, now_ms())),
        Disposition::Leased(_) => {
            tracing::info!(source_id = %message.source_id, "Another run holds the lease: duplicate delivery dropped.");
        }
        Disposition::Gone(reason) => {
            tracing::info!(source_id = %message.source_id, reason = %reason, "Nothing to do for the message (source deleted, or collected since): dropped.");
        }
        Disposition::Retry(reason) => {
            tracing::warn!(source_id = %message.source_id, receive_count, reason = %reason, dispatched_at = ?message.dispatched_at, "Run could not start; the message is left for SQS to retry.");
        }
    }
    emit(app, &d);
    d
}

fn emit(app: &App, d: &Disposition) {
    app.settings
        .metrics
        .emit(&message_line(d.outcome(), now_ms()));
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Handles a Lambda SQS event: runs its records (at most `COLLECT_CONCURRENCY` at once)
/// and names, as batch item failures, the records whose run could not start. With the
/// work queue (`WORK_QUEUE_URL`, set by the template), such a record is made visible
/// again after the queue's retry delay rather than the (long) visibility timeout, so
/// SQS retries it soon and, after `maxReceiveCount` receives, dead-letters it.
pub async fn handle_sqs_event(
    app: &App,
    queue: Option<&WorkQueue>,
    event: SqsEvent,
    deadline: Instant,
) -> SqsBatchResponse {
    let failures: Vec<String> = futures::stream::iter(event.records)
        .map(|record| async move {
            let id = record.message_id.clone().unwrap_or_default();
            let count = record
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            let body = record.body.unwrap_or_default();
            let d = run_message(app, &body, count, deadline).await;
            if d.delete() {
                return None;
            }
            if let (Some(queue), Some(handle)) = (queue, record.receipt_handle.as_deref()) {
                queue.retry_later(handle).await;
            }
            Some(id)
        })
        .buffer_unordered(app.settings.concurrency)
        .filter_map(|id| async move { id })
        .collect()
        .await;
    let mut response = SqsBatchResponse::default();
    response.set_failures(failures);
    response
}

/// Handles a Lambda payload that [`super::is_sqs_event`] recognised.
pub async fn handle_sqs_payload(
    app: &App,
    queue: Option<&WorkQueue>,
    payload: serde_json::Value,
    deadline: Instant,
) -> Result<serde_json::Value> {
    let event: SqsEvent = serde_json::from_value(payload)
        .map_err(|e| Error::config("Records", format!("not an SQS event: {e}")))?;
    let response = handle_sqs_event(app, queue, event, deadline).await;
    serde_json::to_value(response).map_err(|e| Error::store("serialising the batch response", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::run::Outcome;

    fn report(outcome: Outcome, not_started: Option<NotStarted>, state: bool) -> RunReport {
        let mut r: RunReport = serde_json::from_value(serde_json::json!({
            "source_id": "acme", "outcome": "skipped", "detail": "", "health": null,
            "fetched": 0, "forwarded": 0, "duplicates_dropped": 0, "requests": 0,
            "quota_used": 0, "quota_left": 0, "checkpoint": null, "backlog": false,
            "duration_ms": 1, "state": null, "lag_seconds": null
        }))
        .unwrap();
        r.outcome = outcome;
        r.detail = "whatever the collector says".into();
        r.not_started = not_started;
        r.state = state.then_some(crate::domain::state::Lifecycle::Collecting);
        r
    }

    #[test]
    fn only_runs_that_could_not_start_are_retried() {
        // The state store failed before any KnowBe4 request, before or after the state
        // loaded: retried by SQS.
        for state in [false, true] {
            let d = disposition(report(
                Outcome::Failed,
                Some(NotStarted::StoreFailed),
                state,
            ));
            assert!(matches!(d, Disposition::Retry(_)) && !d.delete());
        }
        let unknown = disposition(report(Outcome::Skipped, Some(NotStarted::NoSource), false));
        assert!(matches!(unknown, Disposition::Retry(_)) && !unknown.delete());
        let stale = disposition(report(Outcome::Skipped, Some(NotStarted::Stale), false));
        assert!(matches!(stale, Disposition::Gone(_)) && stale.delete());
        let leased = disposition(report(Outcome::Skipped, Some(NotStarted::Leased), true));
        assert!(matches!(leased, Disposition::Leased(_)) && leased.delete());
        // KnowBe4 or the destination failed (or the store, after requests were sent):
        // the source's own streak retries it.
        for state in [false, true] {
            let failed = disposition(report(Outcome::Failed, None, state));
            assert!(matches!(failed, Disposition::Done(_)) && failed.delete());
        }
        assert!(disposition(report(Outcome::Collected, None, true)).delete());
        assert!(disposition(report(Outcome::Skipped, None, true)).delete());
    }

    #[test]
    fn bodies_name_their_source() {
        assert_eq!(parse_body(r#"{"sourceId":"a"}"#).unwrap().source_id, "a");
        let err = parse_body("not json").unwrap_err();
        assert!(err.chain().contains("body"), "{}", err.chain());
        assert!(parse_body(r#"{"sourceId":""}"#).is_err());
        assert!(parse_body(r#"{"dispatchedAt":"x"}"#).is_err());
    }

    #[test]
    fn the_sample_sqs_event_is_an_sqs_event_of_work_messages() {
        let text = include_str!("../../events/sqs.json");
        let payload: serde_json::Value = serde_json::from_str(text).unwrap();
        assert!(super::super::is_sqs_event(&payload));
        let event: SqsEvent = serde_json::from_value(payload).unwrap();
        let bodies: Vec<_> = event
            .records
            .iter()
            .map(|r| parse_body(r.body.as_deref().unwrap()))
            .collect();
        assert_eq!(bodies[0].as_ref().unwrap().source_id, "knowbe4-prod");
        assert!(bodies[1].is_err(), "the second record is unreadable");
    }
}
