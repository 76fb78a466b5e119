//! The command line: the same actions as the Lambda payloads, plus `demo`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app::{Action, SourceStatus};
use crate::collector::{Outcome, RunReport};
use crate::error::{Error, Result};
use crate::state::HealthEvent;

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
    Collect {
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Print the run reports as JSON.
        #[arg(long)]
        json: bool,
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
    serde_json::from_str(&text).map_err(|e| {
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
            Command::Collect { source, json } => (
                Action::Collect {
                    source_id: source.clone(),
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
            Command::Demo { .. } => return Ok(None),
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
            for s in list {
                print_status(&s);
            }
        }
        Command::Health { .. } => {
            let events: Vec<HealthEvent> =
                serde_json::from_value(result.clone()).unwrap_or_default();
            if events.is_empty() {
                println!("No health events.");
            }
            for e in events {
                println!(
                    "{}  {:<24} count={:<4} status={:<5} {}",
                    crate::event::EventTime(e.last_seen * 1_000_000).to_rfc3339(),
                    e.kind.as_str(),
                    e.count,
                    e.status.map_or("-".into(), |s| s.to_string()),
                    e.message
                );
            }
        }
        Command::Collect { .. } => {
            let runs: Vec<RunReport> =
                serde_json::from_value(result["runs"].clone()).unwrap_or_default();
            for r in &runs {
                eprintln!(
                    "{}: {:?} ({}) forwarded={} requests={} quota_left={} checkpoint={}",
                    r.source_id,
                    r.outcome,
                    r.detail,
                    r.forwarded,
                    r.requests,
                    r.quota_left,
                    r.checkpoint.as_deref().unwrap_or("-")
                );
            }
        }
        _ => println!("{}", serde_json::to_string(result).unwrap_or_default()),
    }
    exit_code(command, result)
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
    let backlog = if s.backlog_ranges > 0 {
        format!(" (+{} backlog range(s))", s.backlog_ranges)
    } else {
        String::new()
    };
    let _ = writeln!(out, "Checkpoint    {}{backlog}", dash(&s.checkpoint));
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
            "Blocked       ThirdPartyConfigError: update the source to retry"
        );
    }
    for e in &s.health {
        let _ = writeln!(
            out,
            "Health        {} x{}: {}",
            e.kind.as_str(),
            e.count,
            e.message
        );
    }
    out.push('\n');
    out
}

/// Runs a (non-demo) command against `app`; returns the exit code.
pub async fn run_command(app: &crate::app::App, command: &Command) -> Result<i32> {
    let Some((action, json)) = command.action()? else {
        return Ok(0);
    };
    let deadline = tokio::time::Instant::now() + app.settings.cli_run_timeout;
    let result = app.handle(action, deadline).await?;
    Ok(print_result(command, &result, json))
}
