//! The command line: the same actions as the Lambda payloads, plus `demo`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app::{Action, SourceStatus};
use crate::domain::status::{HealthView, duration_words};
use crate::error::{Error, Result};
use crate::run::{Outcome, RunReport};

/// knowbe4-source: collect KnowBe4 user events into a SIEM.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage sources.
    Sources {
        /// What to do with sources.
        #[command(subcommand)]
        command: SourcesCommand,
    },
    /// Run one scheduled collection (every source, or one), as the Lambda would.
    ///
    /// Events of the `stdout` destination go to stdout and the run reports to stderr; with
    /// `--json`, stdout holds only the reports (one JSON document) and those events go to
    /// stderr, or to `--events-file`.
    Collect {
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Follow the freshness plan, as the Lambda schedule does (for a `collect` run by
        /// cron): with a scarce quota a run may read new events only, or nothing when
        /// nothing is due. Without it, `collect` collects all its budget pays for now.
        #[arg(long)]
        scheduled: bool,
        /// Only this data type (`events` or `phishing`), now, ignoring its poll interval.
        /// Without it, a run collects every data type of the source that is due.
        #[arg(long, value_name = "TYPE")]
        data_type: Option<crate::run::DataType>,
        /// Print the run reports as one JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// Write the events of the `stdout` destination to this file (NDJSON, replaced)
        /// instead of stdout (or stderr with `--json`).
        #[arg(long, value_name = "PATH")]
        events_file: Option<PathBuf>,
    },
    /// Show a source's status (all sources without an id).
    Status {
        /// The source.
        id: Option<String>,
        /// JSON output for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List a source's health events.
    Health {
        /// The source.
        id: String,
        /// JSON output for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Queue one work message per due source on WORK_QUEUE_URL (fan-out), as the
    /// schedule does when the queue is set; prints `{"queued": N, ...}`.
    Dispatch,
    /// Work the queue at WORK_QUEUE_URL as the Lambda event source mapping would: each
    /// message is one scheduled run of its source; deleted when done, left for SQS to
    /// retry when the run could not start.
    Worker {
        /// Exit once the queue holds nothing, visible or in flight.
        #[arg(long)]
        once: bool,
        /// Messages worked on at once.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        concurrency: u16,
        /// Long-poll wait of each receive, seconds (0 to 20; 0 polls every 200 ms).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i32).range(0..=20))]
        wait_seconds: i32,
    },
    /// Run the whole product locally: a simulator, a local state file and stdout.
    Demo {
        /// Events the simulator starts with.
        #[arg(long, default_value_t = 250)]
        events: usize,
    },
}

/// `sources` subcommands.
#[derive(Debug, Subcommand)]
pub enum SourcesCommand {
    /// Create a source from the hosted source's JSON; prints its id.
    Create {
        /// The JSON file.
        #[arg(long)]
        file: PathBuf,
        /// The id to use (default: derived from the name).
        #[arg(long)]
        id: Option<String>,
        /// Create it even if a source with the same KnowBe4 account and destination
        /// exists (every event would be forwarded twice and the account's budget shared).
        #[arg(long)]
        allow_duplicate: bool,
    },
    /// Replace a source's configuration (the API key may be omitted to keep it).
    Update {
        /// The source.
        id: String,
        /// The JSON file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Clear Error and the retry streak.
    Restart {
        /// The source.
        id: String,
    },
    /// Remove a source, its state and its secret.
    Delete {
        /// The source.
        id: String,
    },
    /// One line per source.
    List {
        /// JSON output for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// Reads a JSON file for `create`/`update`, naming the file on error.
pub fn read_json(path: &PathBuf) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config("--file", format!("cannot read {}: {e}", path.display())))?;
    // Editors on Windows save UTF-8 with a byte order mark; JSON parsers refuse it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    serde_json::from_str(text).map_err(|e| {
        Error::config(
            "--file",
            format!("{} is not valid JSON: {e}", path.display()),
        )
    })
}

impl Command {
    /// The action this command performs (`demo` has none), and whether to print JSON.
    pub fn action(&self) -> Result<Option<(Action, bool)>> {
        Ok(Some(match self {
            Command::Sources { command } => match command {
                SourcesCommand::Create {
                    file,
                    id,
                    allow_duplicate,
                } => (
                    Action::Create {
                        source: read_json(file)?,
                        id: id.clone(),
                        allow_duplicate: *allow_duplicate,
                    },
                    false,
                ),
                SourcesCommand::Update { id, file } => (
                    Action::Update {
                        source_id: id.clone(),
                        source: read_json(file)?,
                    },
                    false,
                ),
                SourcesCommand::Restart { id } => (
                    Action::Restart {
                        source_id: id.clone(),
                    },
                    false,
                ),
                SourcesCommand::Delete { id } => (
                    Action::Delete {
                        source_id: id.clone(),
                    },
                    false,
                ),
                SourcesCommand::List { json } => (Action::List {}, *json),
            },
            Command::Collect {
                source,
                json,
                scheduled,
                data_type,
                ..
            } => (
                Action::Collect {
                    source_id: source.clone(),
                    scheduled: *scheduled,
                    data_type: *data_type,
                },
                *json,
            ),
            Command::Status { id, json } => (
                Action::Status {
                    source_id: id.clone(),
                },
                *json,
            ),
            Command::Health { id, json } => (
                Action::Health {
                    source_id: id.clone(),
                },
                *json,
            ),
            Command::Demo { .. } | Command::Dispatch | Command::Worker { .. } => return Ok(None),
        }))
    }
}

/// Prints an action's result for humans (or as JSON), and returns the exit code.
pub fn print_result(command: &Command, result: &serde_json::Value, json: bool) -> i32 {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(result).unwrap_or_default()
        );
        return exit_code(command, result);
    }
    match command {
        Command::Sources {
            command: SourcesCommand::Create { .. },
        } => {
            println!("{}", result["sourceId"].as_str().unwrap_or_default());
        }
        Command::Sources {
            command: SourcesCommand::List { .. },
        } => {
            let list: Vec<SourceStatus> =
                serde_json::from_value(result.clone()).unwrap_or_default();
            if list.is_empty() {
                println!("{NO_SOURCES}");
                return exit_code(command, result);
            }
            println!("{:<32} {:<14} {:<26} NAME", "ID", "STATE", "CHECKPOINT");
            for s in list {
                println!(
                    "{:<32} {:<14} {:<26} {}",
                    s.id,
                    s.state.as_str(),
                    s.checkpoint.as_deref().unwrap_or("-"),
                    s.name
                );
            }
        }
        Command::Status { .. } => {
            let list: Vec<SourceStatus> =
                serde_json::from_value(result.clone()).unwrap_or_default();
            if list.is_empty() {
                println!("{NO_SOURCES}");
            }
            for s in list {
                print_status(&s);
            }
        }
        Command::Health { .. } => {
            let events: Vec<HealthView> =
                serde_json::from_value(result.clone()).unwrap_or_default();
            if events.is_empty() {
                println!("No health events: no run of this source has failed in the last 30 days.");
            }
            for e in events {
                println!(
                    "{}  {:<24} count={:<4} status={:<5} {}{}",
                    e.last_seen,
                    e.kind.as_str(),
                    e.count,
                    e.status.map_or("-".into(), |s| s.to_string()),
                    if e.resolved { "[resolved] " } else { "" },
                    e.message
                );
            }
        }
        Command::Collect { .. } => {
            let runs: Vec<RunReport> =
                serde_json::from_value(result["runs"].clone()).unwrap_or_default();
            if runs.is_empty() {
                eprintln!("Nothing to collect. {NO_SOURCES}");
            }
            for r in &runs {
                eprintln!("{}", format_run(r));
            }
        }
        _ => println!("{}", serde_json::to_string(result).unwrap_or_default()),
    }
    exit_code(command, result)
}

/// What to say when there are no sources, and what to do about it.
const NO_SOURCES: &str = "No sources yet. Create one from the hosted source's JSON: \
knowbe4-source sources create --file source.json (README, \"A source\"). \
State is read from STATE_FILE (default ./.knowbe4-source/state.json), or from DynamoDB when STATE_TABLE is set.";

/// `n word(s)`, with the plural only when `n` is not 1.
pub fn count(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// One run report in a sentence, for people; fields the run could not know are left out.
pub fn format_run(r: &RunReport) -> String {
    let outcome = match r.outcome {
        Outcome::Collected => "collected",
        Outcome::Skipped => "skipped",
        Outcome::Failed => "FAILED",
    };
    let mut line = format!("{}: {outcome} ({})", r.source_id, r.detail);
    if r.state.is_none() {
        // Not even the state was read (source gone, store down): nothing else is known.
        return line;
    }
    if r.outcome != Outcome::Skipped {
        line.push_str(&format!(
            "; {} forwarded, {} dropped as already delivered, {}",
            count(r.forwarded, "event"),
            r.duplicates_dropped,
            count(u64::from(r.requests), "request"),
        ));
    }
    line.push_str(&format!(
        "; {} left today",
        count(u64::from(r.quota_left), "request")
    ));
    match &r.checkpoint {
        Some(cp) => line.push_str(&format!("; checkpoint {cp}")),
        None => line.push_str("; no checkpoint yet"),
    }
    if r.backlog {
        line.push_str(" (backlog remains)");
    }
    line
}

fn exit_code(command: &Command, result: &serde_json::Value) -> i32 {
    // `collect` exits 0 when the run itself worked, even with no events; a source whose
    // run failed makes it exit 1 (the health event says why).
    if let Command::Collect { .. } = command {
        let runs: Vec<RunReport> =
            serde_json::from_value(result["runs"].clone()).unwrap_or_default();
        if runs.iter().any(|r| r.outcome == Outcome::Failed) {
            return 1;
        }
    }
    0
}

/// Prints one source's status as a small table.
pub fn print_status(s: &SourceStatus) {
    print!("{}", format_status(s));
}

/// One source's status as a small table, for people.
pub fn format_status(s: &SourceStatus) -> String {
    use std::fmt::Write;
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let _ = writeln!(out, "Source        {} ({})", s.id, s.name);
    let _ = writeln!(
        out,
        "State         {} since {}",
        s.state.as_str(),
        dash(&s.since)
    );
    let _ = writeln!(out, "Last success  {}", dash(&s.last_success));
    let _ = writeln!(out, "Checkpoint    {}", dash(&s.checkpoint));
    if let Some(b) = &s.backlog {
        let events = b
            .events_estimate
            .map_or("an unknown number of".into(), |e| format!("about {e}"));
        let _ = writeln!(
            out,
            "Backlog       {} of events still to collect ({events} events, back to {}, {})",
            duration_words(b.seconds),
            b.oldest,
            count(b.ranges as u64, "range")
        );
        if let (Some(requests), Some(at)) = (b.requests_estimate, &b.caught_up_estimate) {
            let _ = writeln!(
                out,
                "              about {requests} requests: caught up by {at} at this quota"
            );
        }
    }
    let reached = if s.quota_reached {
        " (reached: resumes after 00:00 UTC)"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "Quota today   {} used, {} left of {}{reached}",
        s.quota_used_today, s.quota_left_today, s.daily_request_limit
    );
    if s.account_sources.len() > 1 {
        let _ = writeln!(
            out,
            "Account       shared with {} (one quota, one 4/s rate)",
            s.account_sources
                .iter()
                .filter(|id| **id != s.id)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(note) = &s.account_note {
        let _ = writeln!(out, "Account       {note}");
    }
    let f = &s.freshness;
    let _ = writeln!(
        out,
        "Freshness     new events ~{} min, backdated within {} min (window re-read every {} min)",
        f.new_events_lag_secs.div_ceil(60),
        f.backdated_lag_secs.div_ceil(60),
        f.window_reread_every_secs.div_ceil(60)
    );
    if let Some(warning) = &f.warning {
        let _ = writeln!(out, "Warning       {warning}");
    }
    let _ = writeln!(
        out,
        "Forwarded     last run {}, today {}, total {}",
        s.forwarded_last_run, s.forwarded_today, s.forwarded_total
    );
    if let Some(lag) = s.lag_seconds {
        let _ = writeln!(
            out,
            "Lag           {lag} s behind the newest forwarded event"
        );
    }
    if let Some(deadline) = &s.retry_deadline {
        let _ = writeln!(out, "Retrying      until {deadline}");
    }
    if s.blocked_until_update {
        let _ = writeln!(
            out,
            "Blocked       ThirdPartyConfigError: fix and update the source, or restart it, to retry"
        );
    }
    for t in &s.history {
        let _ = writeln!(
            out,
            "Transition    {}  {:<13} {}",
            t.at,
            t.state.as_str(),
            t.reason
        );
    }
    for e in &s.health {
        let _ = writeln!(
            out,
            "Health        {} {} x{}{}: {}",
            e.last_seen,
            e.kind.as_str(),
            e.count,
            if e.resolved { " [resolved]" } else { "" },
            e.message
        );
    }
    out.push('\n');
    if let Some(p) = &s.phishing {
        let _ = writeln!(
            out,
            "Phishing      every {} h; last poll {}, next {}; {} tests tracked, {} live",
            p.poll_interval_hours,
            dash(&p.last_poll),
            p.next_poll
                .clone()
                .unwrap_or_else(|| "at the next run".into()),
            p.tests_tracked,
            p.tests_live
        );
        let _ = writeln!(
            out,
            "Phishing      last poll {} requests, {} records; {} forwarded in total; Reporting API {} used of {} today{}",
            p.last_poll_requests,
            p.last_poll_forwarded,
            p.forwarded_total,
            p.requests_today,
            p.daily_request_limit,
            if p.stopped {
                "; stopped until the source is updated or restarted"
            } else {
                ""
            }
        );
    }
    out
}

/// Runs a (non-demo) command against `app`; returns the exit code.
pub async fn run_command(app: &crate::app::App, command: &Command) -> Result<i32> {
    if let Some(code) = crate::fanout::command::run(app, command).await? {
        return Ok(code);
    }
    let Some((action, json)) = command.action()? else {
        return Ok(0);
    };
    if let Command::Collect {
        json, events_file, ..
    } = command
    {
        // stdout carries one thing: the reports with --json, else the events.
        let target: Option<Box<dyn std::io::Write + Send>> = match events_file {
            Some(path) => Some(Box::new(std::fs::File::create(path).map_err(|e| {
                Error::config(
                    "--events-file",
                    format!("cannot create {}: {e}", path.display()),
                )
            })?)),
            None if *json => Some(Box::new(std::io::stderr())),
            None => None,
        };
        if let Some(target) = target {
            crate::sink::stdout::redirect(target);
        }
    }
    let deadline = tokio::time::Instant::now() + app.settings.cli_run_timeout;
    let result = app.handle(action, deadline).await?;
    Ok(print_result(command, &result, json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::state::Lifecycle;
    use crate::domain::status::{Backlog, TransitionView};

    fn status() -> SourceStatus {
        serde_json::from_value(serde_json::json!({
            "id": "acme", "name": "Acme", "state": "Collecting",
            "since": "2026-01-01T00:00:00.000Z", "last_success": null,
            "checkpoint": "2026-01-02T00:00:00Z", "backlog_ranges": 1, "backlog": null,
            "lateness_window_narrowed": false, "quota_used_today": 30,
            "quota_left_today": 4970, "daily_request_limit": 5000, "quota_reached": false,
            "forwarded_last_run": 0, "forwarded_today": 0, "forwarded_total": 0,
            "lag_seconds": null, "retry_deadline": null, "blocked_until_update": false,
            "history": [], "health": [],
            "account": "0123abcd", "account_sources": ["acme"], "account_note": null,
            "freshness": {"new_events_lag_secs": 150, "backdated_lag_secs": 2100,
                "window_reread_every_secs": 1800, "warning": null}
        }))
        .unwrap()
    }

    #[test]
    fn status_shows_the_backlog_transitions_and_resolved_health() {
        let mut s = status();
        s.backlog = Some(Backlog {
            ranges: 2,
            seconds: 5 * 3600,
            oldest: "2026-01-01T19:00:00Z".into(),
            events_estimate: Some(12_000),
            requests_estimate: Some(240),
            caught_up_estimate: Some("2026-01-03T00:00:00.000Z".into()),
        });
        s.history.push(TransitionView {
            state: Lifecycle::Collecting,
            at: "2026-01-01T00:00:00.000Z".into(),
            reason: "Collecting events.".into(),
        });
        s.health.push(crate::domain::status::HealthView {
            source_id: "acme".into(),
            kind: crate::HealthKind::ThirdPartyGenericError,
            message: "KnowBe4 request failed: 503".into(),
            status: Some(503),
            error_kind: "http_status".into(),
            first_seen: "2026-01-01T00:00:00.000Z".into(),
            last_seen: "2026-01-01T00:05:00.000Z".into(),
            count: 2,
            retry_at: None,
            retry_deadline: None,
            data_type: None,
            resolved: true,
        });
        let text = format_status(&s);
        assert!(
            text.contains("Backlog       5 h 0 min of events still to collect (about 12000 events, back to 2026-01-01T19:00:00Z, 2 ranges)"),
            "{text}"
        );
        assert!(text.contains("about 240 requests: caught up by 2026-01-03T00:00:00.000Z"));
        assert!(
            text.contains(
                "Transition    2026-01-01T00:00:00.000Z  Collecting    Collecting events."
            )
        );
        assert!(text.contains("ThirdPartyGenericError x2 [resolved]: KnowBe4 request failed: 503"));
        assert!(!format_status(&status()).contains("Backlog"));
    }

    #[test]
    fn a_run_report_leaves_out_what_the_run_could_not_know() {
        let mut r: RunReport = serde_json::from_value(serde_json::json!({
            "source_id": "acme", "outcome": "skipped", "detail": "source not found",
            "health": null, "fetched": 0, "forwarded": 0, "duplicates_dropped": 0,
            "requests": 0, "quota_used": 0, "quota_left": 0, "checkpoint": null,
            "backlog": false, "duration_ms": 1, "state": null, "lag_seconds": null
        }))
        .unwrap();
        assert_eq!(format_run(&r), "acme: skipped (source not found)");
        r.outcome = Outcome::Collected;
        r.detail = "caught up".into();
        r.state = Some(Lifecycle::Collecting);
        r.forwarded = 1;
        r.requests = 1;
        r.quota_left = 4970;
        r.checkpoint = Some("2026-01-02T00:00:00Z".into());
        assert_eq!(
            format_run(&r),
            "acme: collected (caught up); 1 event forwarded, 0 dropped as already delivered, 1 request; 4970 requests left today; checkpoint 2026-01-02T00:00:00Z"
        );
    }
}
