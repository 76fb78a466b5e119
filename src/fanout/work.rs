//! Work: one message, one scheduled run of one source; and the Lambda SQS event of them.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use futures::StreamExt;
use tokio::time::Instant;

use super::WorkMessage;
use super::emf::{MessageOutcome, message_line};
use crate::app::App;
use crate::error::{Error, Result};
use crate::run::{Outcome, RunReport, Trigger, collect_source_with};

/// What the collector says when the message's source does not exist.
const NOT_FOUND: &str = "source not found";
/// What the collector says when another run holds the lease.
const LEASED: &str = "another run holds the lease";

/// What to do with a message after its run.
#[derive(Clone, Debug)]
pub enum Disposition {
    /// Done: delete it. The run started (the report says how it went; a failure is the
    /// source's health event and retry streak, not SQS's).
    Done(Box<RunReport>),
    /// A duplicate delivery: another run holds the lease. Delete it.
    Leased(Box<RunReport>),
    /// The run could not start for a reason worth retrying soon (the state store, or no
    /// such source): leave the message for SQS (which moves it to the dead-letter queue
    /// after `maxReceiveCount` receives).
    Retry(String),
}

impl Disposition {
    /// The metric outcome.
    pub fn outcome(&self) -> MessageOutcome {
        match self {
            Disposition::Done(_) => MessageOutcome::Started,
            Disposition::Leased(_) => MessageOutcome::SkippedLeased,
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

/// Classifies a run's report (see [`Disposition`]).
pub fn disposition(report: RunReport) -> Disposition {
    if report.outcome == Outcome::Skipped && report.detail == NOT_FOUND {
        return Disposition::Retry(format!("no source {} (deleted?)", report.source_id));
    }
    if report.outcome == Outcome::Skipped && report.detail == LEASED {
        return Disposition::Leased(Box::new(report));
    }
    // Failed before its state was read: the store failed reading the source or taking
    // the lease; nothing was recorded, so SQS retries it.
    if report.outcome == Outcome::Failed && report.state.is_none() {
        return Disposition::Retry(report.detail);
    }
    Disposition::Done(Box::new(report))
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
    let report = collect_source_with(
        app.run_context(),
        &message.source_id,
        deadline,
        Trigger::Schedule,
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
/// and names, as batch item failures, the records whose run could not start.
pub async fn handle_sqs_event(app: &App, event: SqsEvent, deadline: Instant) -> SqsBatchResponse {
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
            (!d.delete()).then_some(id)
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
    payload: serde_json::Value,
    deadline: Instant,
) -> Result<serde_json::Value> {
    let event: SqsEvent = serde_json::from_value(payload)
        .map_err(|e| Error::config("Records", format!("not an SQS event: {e}")))?;
    let response = handle_sqs_event(app, event, deadline).await;
    serde_json::to_value(response).map_err(|e| Error::store("serialising the batch response", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: Outcome, detail: &str, state: bool) -> RunReport {
        let mut r: RunReport = serde_json::from_value(serde_json::json!({
            "source_id": "acme", "outcome": "skipped", "detail": "", "health": null,
            "fetched": 0, "forwarded": 0, "duplicates_dropped": 0, "requests": 0,
            "quota_used": 0, "quota_left": 0, "checkpoint": null, "backlog": false,
            "duration_ms": 1, "state": null, "lag_seconds": null
        }))
        .unwrap();
        r.outcome = outcome;
        r.detail = detail.into();
        r.state = state.then_some(crate::domain::state::Lifecycle::Collecting);
        r
    }

    #[test]
    fn only_runs_that_could_not_start_are_retried() {
        assert!(matches!(
            disposition(report(Outcome::Skipped, NOT_FOUND, false)),
            Disposition::Retry(_)
        ));
        assert!(matches!(
            disposition(report(Outcome::Failed, "DynamoDB throttled", false)),
            Disposition::Retry(_)
        ));
        let leased = disposition(report(Outcome::Skipped, LEASED, true));
        assert!(matches!(leased, Disposition::Leased(_)) && leased.delete());
        // KnowBe4 or the destination failed: the source's own streak retries it.
        let failed = disposition(report(Outcome::Failed, "KnowBe4 answered 503", true));
        assert!(matches!(failed, Disposition::Done(_)) && failed.delete());
        assert!(disposition(report(Outcome::Collected, "caught up", true)).delete());
        assert!(disposition(report(Outcome::Skipped, "source is in Error", true)).delete());
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
        let ids: Vec<String> = event
            .records
            .iter()
            .map(|r| parse_body(r.body.as_deref().unwrap()).unwrap().source_id)
            .collect();
        assert_eq!(ids, ["knowbe4-prod", "no-such-source"]);
    }
}
