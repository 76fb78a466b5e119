//! `knowbe4-sim`: runs the KnowBe4 User Event API simulator on 127.0.0.1 until Ctrl-C
//! or SIGTERM, optionally adding and deleting events as it runs.
//!
//! Prints `knowbe4-sim listening on http://127.0.0.1:PORT` on start; the control API
//! is described in the `knowbe4_source::testkit::sim` module docs.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use knowbe4_source::testkit::sim::{
    CountMode, Reading, ReportingConfig, ReportingReading, SimConfig, Simulator,
};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    name = "knowbe4-sim",
    about = "A KnowBe4 User Event API simulator on loopback"
)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8787)]
    port: u16,
    /// The key clients must send as `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "KNOWBE4_SIM_API_KEY",
        default_value = "sim-key",
        hide_env_values = true
    )]
    api_key: String,
    /// Events present at start.
    #[arg(long, default_value_t = 1000)]
    events: usize,
    /// Seed for ids and every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Initial events occurred within this many hours before now.
    #[arg(long, default_value_t = 72)]
    span_hours: u64,
    /// Delay before answering each API request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// API calls allowed per UTC day (unlimited when absent).
    #[arg(long)]
    daily_quota: Option<u32>,
    /// Status for a missing or wrong key (KnowBe4 has answered 500 as well as 401).
    #[arg(long, default_value_t = 401)]
    wrong_key_status: u16,
    /// Serve requests over 4 per second instead of answering 429 (still counted).
    #[arg(long)]
    no_rate_limit: bool,
    /// Add `--add-count` events every this many seconds.
    #[arg(long)]
    add_every_secs: Option<u64>,
    /// Events added each `--add-every-secs`.
    #[arg(long, default_value_t = 1)]
    add_count: usize,
    /// Added events occurred this many seconds before they are added.
    #[arg(long, default_value_t = 0)]
    backdate_secs: u64,
    /// Delete `--delete-count` random events every this many seconds.
    #[arg(long)]
    delete_every_secs: Option<u64>,
    /// Events deleted each `--delete-every-secs`.
    #[arg(long, default_value_t = 1)]
    delete_count: usize,
    /// Largest `per_page` honoured (KnowBe4's cap is unconfirmed: 50 or 100).
    #[arg(long, default_value_t = 50)]
    max_per_page: u64,
    /// `per_page` when a request names none.
    #[arg(long, default_value_t = 50)]
    default_per_page: u64,
    /// What `meta.count` counts: `page` (the events on the page), `total` (the list), or
    /// `absent`.
    #[arg(long, default_value = "page", value_parser = ["page", "total", "absent"])]
    count_mode: String,
    /// Leave `meta.total_pages` out.
    #[arg(long)]
    no_total_pages: bool,
    /// Leave `meta.limit_value` out.
    #[arg(long)]
    no_limit_value: bool,
    /// The Reporting API token clients must send as `Authorization: Bearer <token>`.
    #[arg(
        long,
        env = "KNOWBE4_SIM_REPORTING_TOKEN",
        default_value = "sim-reporting-token",
        hide_env_values = true
    )]
    reporting_token: String,
    /// Phishing security tests in progress at start.
    #[arg(long, default_value_t = 0)]
    phishing_tests: usize,
    /// Recipients of each of those tests.
    #[arg(long, default_value_t = 100)]
    phishing_recipients: usize,
    /// Reporting API calls allowed per UTC day (unlimited when absent).
    #[arg(long)]
    reporting_daily_quota: Option<u32>,
    /// The reading of the Reporting API's open details to play, by name: one of
    /// `ReportingReading::all()` (honoured-500, cap-100, cap-50, page-ignored,
    /// repeat-last, insert-front, rotate, throttled-retry-after, throttled-limit-wording,
    /// large-records, throttled-long-retry-after).
    #[arg(long, default_value = "honoured-500", value_parser = parse_reporting_reading)]
    reporting_reading: ReportingReading,
    /// Bytes of filler added to every Reporting record (overrides the reading's).
    #[arg(long)]
    reporting_record_padding: Option<usize>,
}

fn parse_reporting_reading(name: &str) -> Result<ReportingReading, String> {
    ReportingReading::by_name(name).ok_or_else(|| {
        let names: Vec<&str> = ReportingReading::all().iter().map(|(n, _)| *n).collect();
        format!("unknown reading; one of: {}", names.join(", "))
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = SimConfig {
        api_key: args.api_key.clone(),
        events: args.events,
        seed: args.seed,
        span_hours: args.span_hours,
        latency_ms: args.latency_ms,
        daily_quota: args.daily_quota,
        wrong_key_status: args.wrong_key_status,
        enforce_rate_limit: !args.no_rate_limit,
        reading: Reading {
            max_per_page: args.max_per_page.max(1),
            default_per_page: args.default_per_page.max(1),
            count_mode: match args.count_mode.as_str() {
                "total" => CountMode::Total,
                "absent" => CountMode::Absent,
                _ => CountMode::Page,
            },
            total_pages: !args.no_total_pages,
            limit_value: !args.no_limit_value,
        },
        reporting: ReportingConfig {
            token: args.reporting_token.clone(),
            daily_quota: args.reporting_daily_quota,
            enforce_limits: !args.no_rate_limit,
            reading: ReportingReading {
                record_padding: args
                    .reporting_record_padding
                    .unwrap_or(args.reporting_reading.record_padding),
                ..args.reporting_reading
            },
        },
    };
    let sim = std::sync::Arc::new(Simulator::spawn_on(config, args.port).await?);
    for _ in 0..args.phishing_tests {
        sim.add_phishing_test(args.phishing_recipients);
    }
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "knowbe4-sim listening on {}", sim.base_url())?;
        stdout.flush()?;
    }

    let mut chores = Vec::new();
    if let Some(secs) = args.add_every_secs.filter(|s| *s > 0) {
        let sim = sim.clone();
        let (count, backdate) = (args.add_count, args.backdate_secs);
        chores.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            tick.tick().await;
            loop {
                tick.tick().await;
                let ids = sim.add_events(count, backdate);
                tracing::info!(added = ids.len(), backdate_secs = backdate, "Added events.");
            }
        }));
    }
    if let Some(secs) = args.delete_every_secs.filter(|s| *s > 0) {
        let sim = sim.clone();
        let count = args.delete_count;
        chores.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            tick.tick().await;
            loop {
                tick.tick().await;
                let ids = sim.delete_events(count);
                tracing::info!(deleted = ids.len(), "Deleted events.");
            }
        }));
    }

    stop_signal().await;
    for chore in &chores {
        chore.abort();
    }
    for chore in chores {
        let _ = chore.await;
    }
    let stats = sim.stats();
    tracing::info!(
        requests = stats.requests,
        rate_violations = stats.rate_violations,
        served_ok = stats.served_ok,
        "Simulator stopping."
    );
    if let Ok(sim) = std::sync::Arc::try_unwrap(sim) {
        sim.shutdown().await;
    }
    Ok(())
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
