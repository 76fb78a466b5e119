//! Fan-out at scale, against moto (DynamoDB, Secrets Manager, SQS: `AWS_ENDPOINT_URL`),
//! simulators (one per KnowBe4 account, ten sources each, 300 ms per answer) and one
//! recording destination. Every AWS call is counted by an SDK interceptor.
//!
//! Measures: dispatch of every source, its time and its DynamoDB/SQS calls; collection
//! of a sample of them (`FANOUT_BENCH_RUNS`, default 160) with 1, 4 and 16 workers (each
//! worker one message at a time, like one Lambda invocation per message): wall time, runs
//! per second, store calls per steady-state run, run durations, and from them the Lambda
//! cost per source and month at 128 MB.
//!
//! - `scripts/with-moto.sh cargo bench --bench fanout` (1,000 sources; release build), or
//!   `FANOUT_BENCH_SOURCES=1000 scripts/with-moto.sh cargo test --bench fanout` (the same in
//!   the test profile, no release build needed).
//! - As a test (`cargo test --all-targets`) it runs 10 sources and 1 and 4 workers only
//!   (about 10 s).
//!
//! moto answers one request at a time (scripts/moto_serial.py), about 120 a second here:
//! wall times with many workers measure moto's throughput, not DynamoDB's. moto also
//! copies the whole table for every TransactWriteItems (memory and time grow with the
//! table), so the collection passes are measured on a table holding only the collected
//! sources: `FANOUT_BENCH_SOURCES=1000 FANOUT_BENCH_RUNS=0` measures dispatch alone,
//! `FANOUT_BENCH_SOURCES=160 FANOUT_BENCH_RUNS=160` the collection passes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use futures::StreamExt;
use knowbe4_source::app::{App, Settings, Vault};
use knowbe4_source::fanout::WorkQueue;
use knowbe4_source::fanout::dispatch::dispatch;
use knowbe4_source::fanout::worker::{self, WorkerOptions, WorkerReport};
use knowbe4_source::sink::{DestinationConfig, Format};
use knowbe4_source::store::dynamo::DynamoStore;
use knowbe4_source::store::secrets_manager::SecretsManagerVault;
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};
use secrecy::SecretString;

/// Sources per simulated account.
const PER_ACCOUNT: usize = 10;
/// Events each account holds (a steady-state run reads one page).
const EVENTS: usize = 3;

/// AWS calls by `Service.Operation`.
#[derive(Debug, Default)]
struct Calls(Mutex<BTreeMap<String, u64>>);

impl Calls {
    fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[derive(Debug)]
struct Counting(Arc<Calls>);

impl Intercept for Counting {
    fn name(&self) -> &'static str {
        "Counting"
    }

    /// Once per attempt (a retried call counts twice, as AWS bills it).
    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(m) = cfg.load::<Metadata>() {
            *self
                .0
                .0
                .lock()
                .unwrap()
                .entry(format!("{}.{}", m.service(), m.name()))
                .or_default() += 1;
        }
        Ok(())
    }
}

struct Clients {
    dynamo: aws_sdk_dynamodb::Client,
    secrets: aws_sdk_secretsmanager::Client,
    sqs: aws_sdk_sqs::Client,
}

fn clients(config: &aws_config::SdkConfig, calls: &Arc<Calls>) -> Clients {
    Clients {
        dynamo: aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(config)
                .interceptor(Counting(calls.clone()))
                .build(),
        ),
        secrets: aws_sdk_secretsmanager::Client::from_conf(
            aws_sdk_secretsmanager::config::Builder::from(config)
                .interceptor(Counting(calls.clone()))
                .build(),
        ),
        sqs: aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(config)
                .interceptor(Counting(calls.clone()))
                .build(),
        ),
    }
}

/// One worker process's app: its own clients, pacer and secrets cache.
fn app(c: &Clients, table: &str, prefix: &str, sink: &RecordingSink) -> App {
    let mut settings = Settings::from_env();
    settings.validation.allow_custom_base_url = true;
    settings.secret_prefix = prefix.to_string();
    settings.metrics = knowbe4_source::metrics::MetricsOutput::Off;
    settings.deadline_margin = Duration::from_secs(2);
    settings.request_timeout = Duration::from_secs(10);
    settings.cli_run_timeout = Duration::from_secs(120);
    App::new(
        Arc::new(DynamoStore::new(c.dynamo.clone(), table)),
        Vault::SecretsManager(SecretsManagerVault::new(
            c.secrets.clone(),
            prefix.to_string(),
        )),
        knowbe4_source::app::knowbe4_http_client().unwrap(),
        DestinationConfig {
            format: Format::Sumo,
            url: Some(SecretString::from(sink.url())),
            token: None,
        },
        settings,
    )
}

fn calls_line(calls: &BTreeMap<String, u64>) -> String {
    calls
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sum(calls: &BTreeMap<String, u64>, service: &str) -> u64 {
    calls
        .iter()
        .filter(|(op, _)| op.starts_with(service))
        .map(|(_, n)| n)
        .sum()
}

/// Queues one message for each of `ids`, then works the queue with `workers` workers
/// (one message at a time each); prints one table row and returns (the runs' summed
/// duration, state-store calls per run).
async fn pass(
    label: &str,
    workers: usize,
    apps: &[App],
    queue: &WorkQueue,
    calls: &Calls,
    ids: &[String],
) -> (u64, f64) {
    let bodies: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (i.to_string(), format!(r#"{{"sourceId":"{id}"}}"#)))
        .collect();
    for chunk in bodies.chunks(10) {
        assert!(queue.send_batch(chunk).await.unwrap().is_empty());
    }
    calls.take();
    let started = Instant::now();
    let options = WorkerOptions {
        once: true,
        concurrency: 1,
        wait_secs: 0,
        idle: Duration::from_millis(100),
        run_timeout: Duration::from_secs(120),
    };
    let reports: Vec<WorkerReport> = futures::stream::iter(&apps[..workers])
        .map(|app| async move { worker::run(app, queue, options).await.expect("worker") })
        .buffer_unordered(workers)
        .collect()
        .await;
    let wall_s = started.elapsed().as_secs_f64();
    let work_calls = calls.take();
    let started_runs: u64 = reports.iter().map(|r| r.started).sum();
    let run_ms: u64 = reports.iter().map(|r| r.run_ms_total).sum();
    let run_max = reports.iter().map(|r| r.run_ms_max).max().unwrap_or(0);
    assert_eq!(started_runs, ids.len() as u64, "{reports:?}");
    let runs = started_runs as f64;
    let store_per_run =
        (sum(&work_calls, "DynamoDB") + sum(&work_calls, "Secrets Manager")) as f64 / runs;
    let mean_ms = run_ms as f64 / runs;
    println!(
        "| {label} | {} | {workers} | {wall_s:.1} s ({:.1} runs/s) | {mean_ms:.0} ms (max {run_max}) | {store_per_run:.2} ({:.2} DynamoDB) | {:.2} |",
        ids.len(),
        runs / wall_s,
        sum(&work_calls, "DynamoDB") as f64 / runs,
        sum(&work_calls, "SQS") as f64 / runs,
    );
    eprintln!("  {label}, {workers} workers: {}", calls_line(&work_calls));
    (run_ms, store_per_run)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sources: usize = std::env::var("FANOUT_BENCH_SOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1000 } else { 10 });
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        eprintln!(
            "fanout bench: AWS_ENDPOINT_URL is not set; run it under scripts/with-moto.sh. Skipped."
        );
        return;
    }
    // Sources collected in each pass (the first this many of them).
    let collected: usize = std::env::var("FANOUT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 160 } else { 10 })
        .min(sources);
    let worker_counts: Vec<usize> = if full || collected >= 100 {
        vec![1, 4, 16]
    } else {
        vec![1, 4]
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .load()
            .await;
        let calls = Arc::new(Calls::default());
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let table = format!("fanout-bench-{suffix}");
        let prefix = format!("fanout-bench-{suffix}/");
        let base = clients(&config, &calls);
        DynamoStore::create_table(&base.dynamo, &table).await.unwrap();
        let queue_url = base
            .sqs
            .create_queue()
            .queue_name(format!("fanout-bench-{suffix}"))
            .attributes(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout, "600")
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_string();
        let queue = WorkQueue::new(base.sqs.clone(), queue_url);
        let sink = RecordingSink::spawn().await.unwrap();
        let accounts = sources.div_ceil(PER_ACCOUNT);
        let mut sims = Vec::new();
        for a in 0..accounts {
            let key = format!("bench-key-{a}-{suffix}");
            let sim = Simulator::spawn(SimConfig {
                api_key: key.clone(),
                events: EVENTS,
                seed: a as u64 + 1,
                latency_ms: 300,
                ..SimConfig::default()
            })
            .await
            .unwrap();
            sims.push((sim, key));
        }
        let apps: Vec<App> = (0..16)
            .map(|_| app(&clients(&config, &calls), &table, &prefix, &sink))
            .collect();
        let started = Instant::now();
        let specs: Vec<(String, serde_json::Value)> = (0..sources)
            .map(|i| {
                let (sim, key) = &sims[i / PER_ACCOUNT];
                let config = serde_json::json!({
                    "name": format!("bench {i}"), "category": "security/knowbe4",
                    "baseURL": sim.base_url(), "apiKey": key,
                    "dailyRequestLimit": 100000, "firstFetchLookbackHours": 200
                });
                (
                    format!("s{i:04}"),
                    serde_json::json!({"api.version": "v1", "source": {"config": config,
                        "schemaRef": {"type": "KnowBe4"}, "sourceType": "Universal"}}),
                )
            })
            .collect();
        let app0 = &apps[0];
        let created: Vec<_> = futures::stream::iter(specs)
            .map(|(id, json)| async move { app0.create_with(json, Some(id), true).await })
            .buffer_unordered(8)
            .collect()
            .await;
        for c in created {
            c.expect("source created");
        }
        eprintln!(
            "fanout bench: {sources} sources over {accounts} accounts created in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        // Dispatch of every source (all due: none has run yet).
        calls.take();
        let started = Instant::now();
        let report = dispatch(&apps[0], &queue).await.expect("dispatch");
        let dispatch_s = started.elapsed().as_secs_f64();
        let dispatch_calls = calls.take();
        assert_eq!(report.queued, sources, "{report:?}");
        println!(
            "Dispatch of {sources} sources: {dispatch_s:.2} s; {}",
            calls_line(&dispatch_calls)
        );
        if collected == 0 {
            return;
        }
        // Collection: a sample of the sources (moto's transactions copy every table, so
        // each call slows as the table grows; the sample's runs see the full table).
        let sample: Vec<String> = (0..collected).map(|i| format!("s{i:04}")).collect();
        let pass_queue = WorkQueue::new(
            base.sqs.clone(),
            base.sqs
                .create_queue()
                .queue_name(format!("fanout-bench-pass-{suffix}"))
                .attributes(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout, "600")
                .send()
                .await
                .unwrap()
                .queue_url()
                .unwrap()
                .to_string(),
        );
        println!();
        println!("| pass | runs | workers | collection wall time | run duration (mean) | state-store calls per run | SQS calls per run |");
        println!("|---|---|---|---|---|---|---|");
        let first = *worker_counts.last().unwrap();
        pass("first runs", first, &apps, &pass_queue, &calls, &sample).await;
        let mut steady = Vec::new();
        for &workers in &worker_counts {
            steady.push(pass("steady state", workers, &apps, &pass_queue, &calls, &sample).await);
        }
        // Lambda cost of one source a month: a run every 5 minutes at 128 MB (x86 price,
        // us-east-1: $0.0000166667 per GB-s, $0.20 per million requests; one invocation per
        // run at batch size 1).
        let (run_ms, _) = steady[0];
        let mean_s = run_ms as f64 / collected as f64 / 1000.0;
        let runs_per_month = 12.0 * 24.0 * 30.0;
        let compute = mean_s * 0.125 * 0.0000166667 * runs_per_month;
        let requests = 0.20 / 1e6 * runs_per_month;
        println!();
        println!(
            "Lambda per source and month (128 MB, {runs_per_month} runs, mean run {:.0} ms with 1 worker): ${:.5} compute + ${:.5} requests = ${:.5}",
            mean_s * 1000.0,
            compute,
            requests,
            compute + requests
        );
        for (sim, _) in &sims {
            assert_eq!(sim.stats().rate_violations, 0);
        }
    });
}
