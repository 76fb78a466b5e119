//! The local worker: polls the work queue and handles each message as the event source
//! mapping would (delete when done; when the run could not start, leave it for SQS to
//! offer again after the retry delay).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use tokio::time::Instant;

use super::queue::{RECEIVE_BATCH, Received, WorkQueue};
use super::work::{Disposition, run_message};
use crate::app::App;
use crate::error::Result;

/// Receive calls that may fail in a row before the worker gives up.
const RECEIVE_FAILURES: u32 = 5;

/// How a worker runs.
#[derive(Clone, Copy, Debug)]
pub struct WorkerOptions {
    /// Exit once the queue holds nothing, visible or in flight (`--once`).
    pub once: bool,
    /// Messages worked on at once (`--concurrency`).
    pub concurrency: usize,
    /// Long-poll wait of each receive, seconds (0..=20; 0 polls and sleeps `idle`).
    pub wait_secs: i32,
    /// Pause between empty polls when not long-polling.
    pub idle: Duration,
    /// Longest a message's run may take (`RUN_TIMEOUT_SECS`); keep it below the queue's
    /// visibility timeout, or SQS hands the message to another worker mid-run.
    pub run_timeout: Duration,
}

/// What a worker did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    /// Messages received.
    pub received: u64,
    /// Runs started (messages deleted after their run).
    pub started: u64,
    /// Duplicate deliveries dropped (lease held elsewhere).
    pub skipped_leased: u64,
    /// Messages dropped because their source no longer exists.
    pub skipped_gone: u64,
    /// Messages left for SQS to retry.
    pub failed_to_start: u64,
    /// Messages whose delete failed (they come back; the lease makes that harmless).
    pub delete_failures: u64,
    /// Sum of the started runs' durations, milliseconds (for cost estimates).
    pub run_ms_total: u64,
    /// The longest started run, milliseconds.
    pub run_ms_max: u64,
}

/// Polls `queue` until stopped (or, with `once`, until it is empty); see [`run_until`].
pub async fn run(app: &App, queue: &WorkQueue, options: WorkerOptions) -> Result<WorkerReport> {
    run_until(app, queue, options, std::future::pending()).await
}

/// Polls `queue` until `shutdown` completes (then receives no more and returns once the
/// runs in progress ended) or, with `once`, until the queue is empty. Receives and runs
/// progress together: a run is never left waiting while the worker polls the queue.
pub async fn run_until(
    app: &App,
    queue: &WorkQueue,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerReport> {
    type Receiving<'q> = Pin<Box<dyn Future<Output = Result<Vec<Received>>> + Send + 'q>>;
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut report = WorkerReport::default();
    let mut running = FuturesUnordered::new();
    let mut receiving: Option<(Receiving<'_>, i32)> = None;
    let mut receive_failures = 0;
    let concurrency = options.concurrency.max(1);
    loop {
        if stopping && running.is_empty() {
            break;
        }
        if !stopping && receiving.is_none() && running.len() < concurrency {
            let want = ((concurrency - running.len()) as i32).min(RECEIVE_BATCH);
            // Long-poll only when idle; with work running, a quick look.
            let wait = if running.is_empty() {
                options.wait_secs
            } else {
                0
            };
            receiving = Some((Box::pin(queue.receive(want, wait)), wait));
        }
        tokio::select! {
            () = &mut shutdown, if !stopping => {
                // A receive in flight is dropped: what it may have taken comes back after
                // the visibility timeout.
                stopping = true;
                receiving = None;
                tracing::info!(running = running.len(), "Stopping: the runs in progress finish, no more messages are received.");
            }
            Some((d, deleted)) = running.next(), if !running.is_empty() => {
                tally(&mut report, &d, deleted);
            }
            result = async { (&mut receiving.as_mut().expect("checked").0).await }, if receiving.is_some() => {
                let wait = receiving.take().map_or(0, |(_, wait)| wait);
                let messages = match result {
                    Ok(messages) => {
                        receive_failures = 0;
                        messages
                    }
                    Err(err) => {
                        receive_failures += 1;
                        if receive_failures >= RECEIVE_FAILURES && running.is_empty() {
                            return Err(err);
                        }
                        tracing::warn!(error = %err.chain(), "Could not receive from the work queue; trying again.");
                        Vec::new()
                    }
                };
                let idle = messages.is_empty();
                for message in messages {
                    report.received += 1;
                    running.push(handle(app, queue, message, options.run_timeout));
                }
                if idle && running.is_empty() {
                    if options.once && receive_failures == 0 && queue.depth().await?.is_empty() {
                        break;
                    }
                    if wait == 0 || receive_failures > 0 {
                        tokio::time::sleep(options.idle).await;
                    }
                } else if idle {
                    // Work is running and the queue had nothing: look again in a while,
                    // finishing runs meanwhile.
                    let pause = tokio::time::sleep(options.idle);
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            Some((d, deleted)) = running.next(), if !running.is_empty() => {
                                tally(&mut report, &d, deleted);
                            }
                            () = &mut pause => break,
                        }
                    }
                }
            }
        }
    }
    while let Some((d, deleted)) = running.next().await {
        tally(&mut report, &d, deleted);
    }
    Ok(report)
}

fn tally(report: &mut WorkerReport, d: &Disposition, deleted: bool) {
    match d {
        Disposition::Done(run) => {
            report.started += 1;
            report.run_ms_total += run.duration_ms;
            report.run_ms_max = report.run_ms_max.max(run.duration_ms);
        }
        Disposition::Leased(_) => report.skipped_leased += 1,
        Disposition::Gone(_) => report.skipped_gone += 1,
        Disposition::Retry(_) => report.failed_to_start += 1,
    }
    if d.delete() && !deleted {
        report.delete_failures += 1;
    }
}

/// Runs one message; deletes it unless it is to be retried. Returns whether it was.
async fn handle(
    app: &App,
    queue: &WorkQueue,
    message: Received,
    run_timeout: Duration,
) -> (Disposition, bool) {
    let deadline = Instant::now() + run_timeout;
    let d = run_message(app, &message.body, message.receive_count, deadline).await;
    if !d.delete() {
        queue.retry_later(&message.receipt_handle).await;
        return (d, false);
    }
    match queue.delete(&message.receipt_handle).await {
        Ok(()) => (d, true),
        Err(err) => {
            tracing::warn!(message_id = %message.message_id, error = %err.chain(), "Could not delete a finished work message; it will be delivered again and dropped at the lease or run again.");
            (d, false)
        }
    }
}
