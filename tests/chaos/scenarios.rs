//! The scenario classes. Each runs seeded scenarios, writes its report row, then fails if
//! any scenario broke a promise.

use std::sync::Arc;
use std::time::Duration;

use knowbe4_source::app::{App, Vault};
use knowbe4_source::failpoint::POINTS;
use knowbe4_source::run::{FLUSH_EVENTS, Outcome, collect_source};
use knowbe4_source::sink::{DestinationConfig, Format};
use knowbe4_source::store::StateStore;
use knowbe4_source::store::file::FileStore;
use knowbe4_source::store::secrets_manager::SecretsManagerVault;
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{Fault, Reading, SimConfig, Simulator};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use secrecy::SecretString;

use crate::faulty_store::FaultyStore;
use crate::helpers::{Harness, deadline, harness, source_json, test_settings};
use crate::oracle::{CheckpointWatch, Verdict, judge, runs_never_interleave, seeds_of, write_row};

const KEY: &str = "chaos-key";

/// The simulator of seed `seed`: each seed plays the next reading of the API's
/// unconfirmed details ({count per page, per list} × {cap 50, cap 100}), so
/// `CHAOS_SEEDS=4` (the suite's default in `scripts/test.sh`) runs every class under
/// every reading. Event counts are not multiples of either page size.
fn sim_config(seed: u64, events: usize) -> SimConfig {
    let readings = Reading::core();
    SimConfig {
        api_key: KEY.into(),
        events: events + 13,
        seed,
        span_hours: 48,
        reading: readings[(seed as usize) % readings.len()],
        ..SimConfig::default()
    }
}

fn source(sim: &Simulator, extra: serde_json::Value) -> serde_json::Value {
    source_json(&sim.base_url(), KEY, extra)
}

/// New, backdated (inside the 60-minute window) and deleted events.
fn mutate(sim: &Simulator, rng: &mut StdRng) {
    sim.add_events(rng.random_range(0..180), 0);
    sim.add_events(rng.random_range(0..20), rng.random_range(1..1800));
    sim.delete_events(rng.random_range(0..15));
}

async fn observe(
    watch: &mut CheckpointWatch,
    store: &dyn StateStore,
    id: &str,
    sink: &RecordingSink,
) {
    if let Ok(state) = store.load_state(id).await {
        watch.observe(state.as_ref().map(|s| &s.value), sink);
    }
}

/// Clean runs until the source has caught up (bounded).
async fn settle(
    app: &App,
    id: &str,
    watch: &mut CheckpointWatch,
    store: &dyn StateStore,
    sink: &RecordingSink,
) {
    for _ in 0..12 {
        let report = collect_source(app.run_context(), id, deadline(60)).await;
        observe(watch, store, id, sink).await;
        if report.outcome == Outcome::Collected && !report.backlog {
            return;
        }
        if report.detail.contains("Error") {
            app.restart(id).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}

/// The source's status, attached to a failed verdict to explain it.
async fn explain(app: &App, id: &str, verdict: &mut Verdict) {
    if !verdict.passed() {
        let status = app
            .status(Some(id))
            .await
            .map(|s| serde_json::to_string(&s[0]).unwrap_or_default());
        verdict.problems.push(format!("final status: {status:?}"));
    }
}

async fn ledger(app: &App, id: &str) -> u64 {
    app.status(Some(id))
        .await
        .map(|s| u64::from(s[0].quota_used_today))
        .unwrap_or(0)
}

fn finish(class: &str, description: &str, verdicts: Vec<Verdict>) {
    write_row(class, description, &verdicts);
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| !v.passed()).collect();
    assert!(failed.is_empty(), "{class}: {failed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowbe4_faults() {
    let mut verdicts = Vec::new();
    for seed in seeds_of("knowbe4-faults") {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut h = harness(sim_config(seed, 1200)).await;
        h.app.settings.request_timeout = Duration::from_secs(2);
        let id = h
            .app
            .create(source(&h.sim, serde_json::json!({})), None)
            .await
            .unwrap();
        let faults = [
            Fault::Status(500),
            Fault::Status(503),
            Fault::StatusRetryAfter(429, 1),
            Fault::Malformed,
            Fault::Html,
            Fault::WrongTypes,
            Fault::MissingMeta,
            Fault::EmptyPage,
            Fault::Reset,
            Fault::Slow(2500),
            Fault::Drip,
        ];
        let mut watch = CheckpointWatch::new();
        let mut verdict = Verdict {
            seed,
            ..Verdict::default()
        };
        for _ in 0..6 {
            mutate(&h.sim, &mut rng);
            let fault = faults[rng.random_range(0..faults.len())].clone();
            let count = rng.random_range(1..4);
            h.sim.inject(fault, count);
            verdict.faults += count as usize;
            collect_source(h.app.run_context(), &id, deadline(25)).await;
            observe(&mut watch, h.app.store.as_ref(), &id, &h.sink).await;
        }
        h.sim.clear_faults();
        settle(&h.app, &id, &mut watch, h.app.store.as_ref(), &h.sink).await;
        verdict.checkpoint_ok = watch.ok;
        verdict.quota_ledger = ledger(&h.app, &id).await;
        judge(&h.sim, &h.sink, &mut verdict);
        explain(&h.app, &id, &mut verdict).await;
        verdicts.push(verdict);
    }
    finish(
        "knowbe4-faults",
        "KnowBe4 answers 5xx, 429 with Retry-After, malformed/HTML/wrong-type/no-meta bodies, an empty page mid-list, resets, slow and drip-fed bodies; events added, backdated and deleted between runs",
        verdicts,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_faults() {
    let mut verdicts = Vec::new();
    for seed in seeds_of("destination-faults") {
        let mut rng = StdRng::seed_from_u64(seed);
        let h = harness(sim_config(seed, 1500)).await;
        let id = h
            .app
            .create(source(&h.sim, serde_json::json!({})), None)
            .await
            .unwrap();
        let mut watch = CheckpointWatch::new();
        let mut verdict = Verdict {
            seed,
            ..Verdict::default()
        };
        let mut failed_runs = 0;
        for _ in 0..6 {
            mutate(&h.sim, &mut rng);
            let down = rng.random_bool(0.3);
            if down {
                h.sink.set_down(Some(503));
            } else {
                let status = [500, 502, 503, 429, 408][rng.random_range(0..5)];
                h.sink.fail_next(status, rng.random_range(1..4));
            }
            verdict.faults += 1;
            let report = collect_source(h.app.run_context(), &id, deadline(8)).await;
            if report.outcome == Outcome::Failed {
                failed_runs += 1;
            }
            h.sink.set_down(None);
            observe(&mut watch, h.app.store.as_ref(), &id, &h.sink).await;
        }
        settle(&h.app, &id, &mut watch, h.app.store.as_ref(), &h.sink).await;
        // A flush larger than one request can fail after its first batch was accepted;
        // the whole flush is sent again.
        verdict.duplicate_bound = failed_runs * FLUSH_EVENTS;
        verdict.checkpoint_ok = watch.ok;
        verdict.quota_ledger = ledger(&h.app, &id).await;
        judge(&h.sim, &h.sink, &mut verdict);
        explain(&h.app, &id, &mut verdict).await;
        verdicts.push(verdict);
    }
    finish(
        "destination-faults",
        "the destination answers 500/502/503/429/408 for a few requests or is down for a whole run",
        verdicts,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_store_faults() {
    let mut verdicts = Vec::new();
    for seed in seeds_of("state-store-faults") {
        let mut rng = StdRng::seed_from_u64(seed);
        let Harness {
            app,
            sim,
            sink,
            dynamo,
            secrets,
            prefix,
            ..
        } = harness(sim_config(seed, 1500)).await;
        let id = app
            .create(source(&sim, serde_json::json!({})), None)
            .await
            .unwrap();
        let real = Arc::clone(&app.store);
        let faulty = Arc::new(FaultyStore::new(Arc::clone(&real), seed, 0.06));
        let mut settings = test_settings(&prefix);
        settings.lease_ttl = Duration::from_secs(2);
        let chaotic = App::new(
            faulty.clone(),
            Vault::SecretsManager(SecretsManagerVault::new(secrets.clone(), prefix.clone())),
            reqwest::Client::new(),
            DestinationConfig {
                format: Format::Sumo,
                url: Some(SecretString::from(sink.url())),
                token: None,
            },
            settings,
        );
        let _ = dynamo;
        let mut watch = CheckpointWatch::new();
        let mut verdict = Verdict {
            seed,
            ..Verdict::default()
        };
        for _ in 0..8 {
            mutate(&sim, &mut rng);
            collect_source(chaotic.run_context(), &id, deadline(20)).await;
            observe(&mut watch, real.as_ref(), &id, &sink).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        verdict.faults = faulty.injected();
        tokio::time::sleep(Duration::from_secs(2)).await; // a lease whose answer was lost expires
        settle(&app, &id, &mut watch, real.as_ref(), &sink).await;
        // A checkpoint write applied but reported failed (or refused) after its events
        // were accepted repeats that flush.
        verdict.duplicate_bound = verdict.faults * FLUSH_EVENTS;
        verdict.checkpoint_ok = watch.ok;
        verdict.quota_ledger = ledger(&app, &id).await;
        judge(&sim, &sink, &mut verdict);
        explain(&app, &id, &mut verdict).await;
        verdicts.push(verdict);
    }
    finish(
        "state-store-faults",
        "6% of DynamoDB calls fail: throttled or timed out before the write, or applied with the answer lost (leases, checkpoints, quota ledger, health events)",
        verdicts,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_kills() {
    let mut verdicts = Vec::new();
    for seed in seeds_of("process-kills") {
        let mut rng = StdRng::seed_from_u64(seed);
        let sim = Simulator::spawn(sim_config(seed, 1500)).await.unwrap();
        let sink = RecordingSink::spawn().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("state.json");
        let sink_url = sink.url();
        let run = {
            let state_file = state_file.clone();
            move |failpoint: Option<String>| {
                let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_knowbe4-source"));
                cmd.args(["collect", "--source", "chaos"])
                    .env_remove("STATE_TABLE")
                    .env_remove("AWS_LAMBDA_RUNTIME_API")
                    .env("STATE_FILE", &state_file)
                    .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
                    .env("FORWARD_URL", &sink_url)
                    .env("FORWARD_FORMAT", "ndjson")
                    .env("LEASE_TTL_SECS", "1")
                    .env("RUN_TIMEOUT_SECS", "40")
                    .env("DEADLINE_MARGIN_SECS", "1")
                    .env("KNOWBE4_REQUEST_TIMEOUT_SECS", "5")
                    .env("RUST_LOG", "warn")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                if let Some(point) = failpoint {
                    cmd.env("KNOWBE4_SOURCE_FAILPOINT", point);
                }
                cmd.status().expect("the binary runs")
            }
        };
        let file = FileStore::new(&state_file);
        let local = App::new(
            Arc::new(file.clone()),
            Vault::Local(file.clone()),
            reqwest::Client::new(),
            DestinationConfig {
                format: Format::Ndjson,
                url: Some(SecretString::from(sink.url())),
                token: None,
            },
            test_settings("unused/"),
        );
        local
            .create(source(&sim, serde_json::json!({})), Some("chaos".into()))
            .await
            .unwrap();
        let mut watch = CheckpointWatch::new();
        let mut verdict = Verdict {
            seed,
            ..Verdict::default()
        };
        for _ in 0..8 {
            mutate(&sim, &mut rng);
            let point = POINTS[rng.random_range(0..POINTS.len())];
            let nth = rng.random_range(1..4);
            let status = tokio::task::spawn_blocking({
                let run = run.clone();
                let failpoint = format!("{point}:{nth}");
                move || run(Some(failpoint))
            })
            .await
            .unwrap();
            if status.code().is_none() {
                verdict.faults += 1; // killed (SIGABRT)
            }
            observe(&mut watch, &file, "chaos", &sink).await;
            tokio::time::sleep(Duration::from_millis(1100)).await; // the dead run's lease lapses
        }
        for _ in 0..6 {
            let status = tokio::task::spawn_blocking({
                let run = run.clone();
                move || run(None)
            })
            .await
            .unwrap();
            observe(&mut watch, &file, "chaos", &sink).await;
            let caught_up = local
                .status(Some("chaos"))
                .await
                .is_ok_and(|s| s[0].backlog_ranges == 0 && s[0].last_success.is_some());
            if status.success() && caught_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        // A kill after forwarding and before the checkpoint repeats that flush.
        verdict.duplicate_bound = verdict.faults * FLUSH_EVENTS;
        verdict.checkpoint_ok = watch.ok;
        verdict.quota_ledger = ledger(&local, "chaos").await;
        judge(&sim, &sink, &mut verdict);
        explain(&local, "chaos", &mut verdict).await;
        verdicts.push(verdict);
    }
    finish(
        "process-kills",
        "the collector process is aborted before a KnowBe4 request, between fetch and forward, between forward and checkpoint, and mid-write of the state file",
        verdicts,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_runs() {
    let mut verdicts = Vec::new();
    for seed in seeds_of("overlapping-runs") {
        let mut rng = StdRng::seed_from_u64(seed);
        let h = harness(SimConfig {
            latency_ms: 30,
            ..sim_config(seed, 900)
        })
        .await;
        let id = h
            .app
            .create(source(&h.sim, serde_json::json!({})), None)
            .await
            .unwrap();
        let mut watch = CheckpointWatch::new();
        let mut verdict = Verdict {
            seed,
            ..Verdict::default()
        };
        for _ in 0..4 {
            mutate(&h.sim, &mut rng);
            let app = &h.app;
            let runs = futures::future::join_all(
                (0..8).map(|_| collect_source(app.run_context(), &id, deadline(30))),
            )
            .await;
            verdict.faults += runs.iter().filter(|r| r.detail.contains("lease")).count();
            observe(&mut watch, h.app.store.as_ref(), &id, &h.sink).await;
        }
        settle(&h.app, &id, &mut watch, h.app.store.as_ref(), &h.sink).await;
        verdict.checkpoint_ok = watch.ok;
        verdict.quota_ledger = ledger(&h.app, &id).await;
        judge(&h.sim, &h.sink, &mut verdict);
        if !runs_never_interleave(&h.sim) {
            verdict
                .problems
                .push("two runs' requests interleaved".into());
        }
        verdicts.push(verdict);
    }
    finish(
        "overlapping-runs",
        "8 collections of one source started at once, 4 times, with new events in between",
        verdicts,
    );
}
