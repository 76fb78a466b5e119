//! The Lambda entry point: one handler for scheduled events and action payloads.
//!
//! Clients are built once per cold start (`App::from_env`) and borrowed by every
//! invocation. A scheduled collection returns its run reports even when a source failed:
//! failures are recorded as health events and retried by later schedules, and an error
//! here would only make Lambda re-deliver the invocation (duplicate runs, spent quota).

use std::time::Duration;

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use tokio::time::Instant;

use crate::app::{Action, App};
use crate::error::Error;

impl From<Error> for Diagnostic {
    fn from(err: Error) -> Diagnostic {
        let error_type = match &err {
            Error::InvalidConfig { .. } => "InvalidConfig".to_string(),
            Error::NotFound(_) => "NotFound".to_string(),
            other => other.health_kind().as_str().to_string(),
        };
        Diagnostic {
            error_type,
            error_message: err.chain(),
        }
    }
}

/// The invocation's deadline as an `Instant`.
///
/// Lambda sends epoch milliseconds. `cargo lambda watch` sends a constant duration
/// (600000) instead; a value that small cannot be an epoch time, so it is read as the
/// milliseconds left.
fn deadline_of(deadline_epoch_ms: u64) -> Instant {
    if deadline_epoch_ms < 1_000_000_000_000 {
        return Instant::now() + Duration::from_millis(deadline_epoch_ms);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Instant::now() + Duration::from_millis(deadline_epoch_ms.saturating_sub(now_ms))
}

/// Handles one invocation. With a work queue, the schedule dispatches instead of
/// collecting; SQS events (work messages) are handled whether or not one is set.
pub async fn handle(
    app: &App,
    queue: Option<&crate::fanout::WorkQueue>,
    event: LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, Error> {
    let deadline = deadline_of(event.context.deadline);
    if crate::fanout::is_sqs_event(&event.payload) {
        return crate::fanout::work::handle_sqs_payload(app, queue, event.payload, deadline).await;
    }
    let action = Action::from_payload(event.payload)?;
    if let (
        Some(queue),
        Action::Collect {
            source_id: None,
            scheduled: true,
            data_type: None,
        },
    ) = (queue, &action)
    {
        let report = crate::fanout::dispatch::dispatch(app, queue).await?;
        return serde_json::to_value(report).map_err(|e| Error::store("serialising the result", e));
    }
    app.handle(action, deadline).await
}

/// Runs the Lambda runtime loop.
pub async fn run() -> Result<(), lambda_runtime::Error> {
    crate::logging::init_lambda();
    let app = App::from_env().await?;
    let app = &app;
    let queue = crate::fanout::WorkQueue::from_env().await?;
    let queue = queue.as_ref();
    lambda_runtime::run(service_fn(move |event| async move {
        handle(app, queue, event).await
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_from_lambda_and_from_cargo_lambda_watch() {
        let in_a_minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 60_000;
        let left = deadline_of(in_a_minute).saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(55) && left <= Duration::from_secs(60));
        let left = deadline_of(600_000).saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(590));
        let past = deadline_of(1_600_000_000_000);
        assert!(past <= Instant::now());
    }

    #[test]
    fn errors_become_lambda_diagnostics_named_by_kind() {
        let d: Diagnostic = Error::config("action", "is required").into();
        assert_eq!(d.error_type, "InvalidConfig");
        let d: Diagnostic = Error::Destination {
            message: "down".into(),
            status: Some(503),
        }
        .into();
        assert_eq!(d.error_type, "FirstPartyGenericError");
    }
}
