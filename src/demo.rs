//! `knowbe4-source demo`: the product end to end on this machine, no AWS needed.
//!
//! Starts the KnowBe4 simulator on loopback, creates a source in a fresh local state
//! file (`./.knowbe4-source/demo/state.json`), collects twice (with new and backdated
//! events in between) to stdout, and prints the source's status.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::app::{App, Settings, Vault};
use crate::cli::format_status;
use crate::sim::{SimConfig, Simulator};
use crate::sink::{DestinationConfig, Format};
use crate::store::file::FileStore;

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
    eprintln!("Created source {id}; collecting (events go to stdout)...");
    let deadline = Instant::now() + Duration::from_secs(120);
    let first = app.collect(Some(&id), deadline).await?;
    sim.add_events(5, 0);
    sim.add_events(3, 600);
    eprintln!("Added 5 new and 3 backdated events; collecting again...");
    let second = app.collect(Some(&id), deadline).await?;
    for r in first.iter().chain(&second) {
        eprintln!(
            "run: {:?} ({}), forwarded {} events with {} requests",
            r.outcome, r.detail, r.forwarded, r.requests
        );
    }
    // stdout carries the events; the status goes with the other human output.
    for status in app.status(Some(&id)).await? {
        eprint!("\n{}", format_status(&status));
    }
    sim.shutdown().await;
    Ok(())
}
