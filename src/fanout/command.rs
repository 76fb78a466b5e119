//! `knowbe4-source dispatch` and `knowbe4-source worker`.

use std::time::Duration;

use super::WorkQueue;
use super::queue::WORK_QUEUE_URL;
use super::worker::{self, WorkerOptions};
use crate::app::App;
use crate::cli::Command;
use crate::error::{Error, Result};

/// Runs `command` if it is a fan-out command; `None` otherwise.
pub async fn run(app: &App, command: &Command) -> Result<Option<i32>> {
    let (once, concurrency, wait_secs) = match command {
        Command::Dispatch => {
            let queue = queue().await?;
            let report = super::dispatch::dispatch(app, &queue).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            return Ok(Some(0));
        }
        Command::Worker {
            once,
            concurrency,
            wait_seconds,
        } => (*once, usize::from(*concurrency), *wait_seconds),
        _ => return Ok(None),
    };
    let queue = queue().await?;
    let options = WorkerOptions {
        once,
        concurrency,
        wait_secs,
        idle: Duration::from_millis(200),
        run_timeout: app.settings.cli_run_timeout,
    };
    let report = worker::run_until(app, &queue, options, stop_signal()).await?;
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(Some(0))
}

async fn queue() -> Result<WorkQueue> {
    WorkQueue::from_env().await?.ok_or_else(|| {
        Error::config(
            WORK_QUEUE_URL,
            "is not set: dispatch and worker need the work queue's URL (the stack's WorkQueueUrl output)",
        )
    })
}

/// Completes at the first SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(term) => {
                term.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
}
