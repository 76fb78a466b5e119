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
    // Handlers first: from here on, SIGINT or SIGTERM stops the worker cleanly.
    let stop = stop_signal();
    let queue = queue().await?;
    let options = WorkerOptions {
        once,
        concurrency,
        wait_secs,
        idle: Duration::from_millis(200),
        run_timeout: app.settings.cli_run_timeout,
    };
    // One line on stderr when the worker polls and a signal stops it cleanly (scripts and
    // tests wait for it before signalling).
    eprintln!("worker ready: polling the work queue; SIGINT or SIGTERM stops it cleanly");
    let report = worker::run_until(app, &queue, options, stop).await?;
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

/// Completes at the first SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when
/// this is called, not when the future is first polled.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            () = wait(term.as_mut()) => {}
            () = wait(interrupt.as_mut()) => {}
        }
    }
}

/// Waits for a signal; forever when its handler could not be installed.
async fn wait(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
