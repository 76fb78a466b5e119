//! `knowbe4-source demo`: the product end to end on this machine, no AWS needed.
//!
//! Starts the KnowBe4 simulator on loopback, creates a source in a fresh local state
//! file (`./.knowbe4-source/demo/state.json`), collects twice (with new and backdated
//! events in between) to stdout, explains what the runs did, prints the source's status
//! and the commands that inspect what the demo made.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::app::{App, Settings, Vault};
use crate::cli::{count, format_status};
use crate::run::{Outcome, RunReport};
use crate::sink::{DestinationConfig, Format};
use crate::store::file::FileStore;
use crate::testkit::sim::{SimConfig, Simulator};

/// Runs the demo with `events` initial simulator events.
pub async fn run(events: usize) -> ExitCode {
    match demo(events).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(events: usize) -> Result<(), Box<dyn std::error::Error>> {
    let sim = Simulator::spawn(SimConfig {
        api_key: "demo-key".into(),
        events,
        span_hours: 12,
        ..SimConfig::default()
    })
    .await?;
    eprintln!("Simulator with {events} events on {}", sim.base_url());
    let dir = std::path::Path::new("./.knowbe4-source/demo");
    let _ = std::fs::remove_dir_all(dir);
    let file = FileStore::new(dir.join("state.json"));
    let mut settings = Settings::from_env();
    settings.validation.allow_custom_base_url = true;
    let app = App::new(
        Arc::new(file.clone()),
        Vault::Local(file),
        reqwest::Client::new(),
        DestinationConfig {
            format: Format::Stdout,
            url: None,
            token: None,
        },
        settings,
    );
    let source = serde_json::json!({
        "api.version": "v1",
        "source": {
            "config": {
                "name": "KnowBe4 demo",
                "category": "security/knowbe4",
                "fields": {"_siemForward": false},
                "baseURL": sim.base_url(),
                "apiKey": "demo-key",
                "licensedUsers": 50
            },
            "schemaRef": {"type": "KnowBe4"},
            "sourceType": "Universal"
        }
    });
    let id = app.create(source, Some("demo".into())).await?;
    let state_file = dir.join("state.json");
    eprintln!(
        "Created source {id} in {}; collecting (events go to stdout)...",
        state_file.display()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let first = app.collect(Some(&id), deadline).await?;
    for r in &first {
        eprintln!("First run: {}", run_in_words(r));
    }
    sim.add_events(5, 0);
    sim.add_events(3, 600);
    eprintln!("Added 5 new events and 3 backdated by 10 minutes; collecting again...");
    let second = app.collect(Some(&id), deadline).await?;
    for r in &second {
        eprintln!("Second run: {}", run_in_words(r));
        eprint!("{}", explain_second_run(r));
    }
    // stdout carries the events; the status goes with the other human output.
    for status in app.status(Some(&id)).await? {
        eprint!("\n{}", format_status(&status));
    }
    eprint!("{}", next_steps(&state_file));
    sim.shutdown().await;
    Ok(())
}

/// A run's outcome and counters in a sentence.
fn run_in_words(r: &RunReport) -> String {
    match r.outcome {
        Outcome::Collected => format!(
            "{} ({}): forwarded {} with {} to KnowBe4.",
            "collected",
            r.detail,
            count(r.forwarded, "event"),
            count(u64::from(r.requests), "request")
        ),
        Outcome::Skipped => format!("skipped: {}.", r.detail),
        Outcome::Failed => format!("FAILED: {}.", r.detail),
    }
}

/// What the second run's counters mean. Between the runs the simulator gained exactly
/// the 5 new and 3 backdated events, and nothing is forwarded twice, so 8 forwarded
/// events are those 8.
fn explain_second_run(r: &RunReport) -> String {
    let mut out = String::new();
    if r.forwarded == 8 {
        out.push_str(
            "  The 3 backdated events were caught: they occurred before the first run's \
             checkpoint but were listed only after it. Each run re-reads the last \
             latenessWindowMinutes (60 by default) to find such late arrivals.\n",
        );
    } else {
        out.push_str(&format!(
            "  Expected the 5 new and 3 backdated events; {} were forwarded.\n",
            count(r.forwarded, "event")
        ));
    }
    if r.duplicates_dropped > 0 {
        out.push_str(&format!(
            "  {} on the re-read pages had been delivered by the first run: recognised by id \
             and dropped (duplicates_dropped), not sent twice.\n",
            count(r.duplicates_dropped, "event")
        ));
    }
    out.push_str(&format!(
        "  {} left of today's quota: 50 licensed users x 10 requests a day.\n",
        count(u64::from(r.quota_left), "request")
    ));
    out
}

/// The commands that inspect what the demo made, naming its state file.
fn next_steps(state_file: &std::path::Path) -> String {
    let exe = std::env::current_exe()
        .ok()
        .map(|exe| {
            let cwd = std::env::current_dir().unwrap_or_default();
            exe.strip_prefix(&cwd)
                .map(|p| p.to_path_buf())
                .unwrap_or(exe)
        })
        .map_or("knowbe4-source".to_string(), |p| p.display().to_string());
    let env = format!("STATE_FILE={}", state_file.display());
    format!(
        "What next: the simulator has stopped; the demo's state stays in {file}.\n\
         Inspect it (every command reads state from STATE_FILE):\n\
         \x20 {env} {exe} status demo\n\
         \x20 {env} {exe} health demo\n\
         \x20 {env} {exe} sources list\n\
         Collect your own account: write source.json (README, \"A source\"), then\n\
         \x20 {exe} sources create --file source.json\n\
         \x20 {exe} collect\n",
        file = state_file.display()
    )
}
