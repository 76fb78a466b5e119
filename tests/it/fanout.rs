//! Fan-out over SQS, against moto (DynamoDB, Secrets Manager, SQS), simulators and a
//! recording destination: dispatch, workers as separate processes (the real binary),
//! a killed worker, a poison message, and the Lambda SQS event's batch item failures.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use knowbe4_source::app::{App, Vault};
use knowbe4_source::fanout::WorkQueue;
use knowbe4_source::fanout::dispatch::dispatch;
use knowbe4_source::fanout::work::handle_sqs_payload;
use knowbe4_source::fanout::worker::WorkerReport;
use knowbe4_source::sink::{DestinationConfig, Format};
use knowbe4_source::store::dynamo::DynamoStore;
use knowbe4_source::store::secrets_manager::SecretsManagerVault;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};
use secrecy::SecretString;

use crate::helpers::*;

/// A work queue and its dead-letter queue in moto; returns (queue, its URL, DLQ URL).
async fn queues(visibility_secs: u32, max_receive: u32) -> (WorkQueue, String, String) {
    let sqs = aws_sdk_sqs::Client::new(&aws_config().await);
    let name = unique("work");
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await
        .expect("DLQ created in moto")
        .queue_url()
        .unwrap()
        .to_string();
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    let redrive = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": max_receive.to_string(),
    });
    let url = sqs
        .create_queue()
        .queue_name(&name)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            visibility_secs.to_string(),
        )
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
            redrive.to_string(),
        )
        .send()
        .await
        .expect("queue created in moto")
        .queue_url()
        .unwrap()
        .to_string();
    (WorkQueue::new(sqs, url.clone()), url, dlq_url)
}

/// The bodies waiting in a queue (received with a zero visibility timeout, so they stay).
async fn bodies(url: &str) -> Vec<String> {
    let sqs = aws_sdk_sqs::Client::new(&aws_config().await);
    let out = sqs
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();
    out.messages()
        .iter()
        .map(|m| m.body().unwrap_or_default().to_string())
        .collect()
}

/// The real binary as a worker on `queue_url`, sharing the harness's table and secrets,
/// forwarding to the harness's sink by default.
fn worker(h: &Harness, queue_url: &str, extra_env: &[(&str, &str)]) -> tokio::process::Command {
    worker_with(h, queue_url, extra_env, true)
}

/// [`worker`], with or without `--once`.
fn worker_with(
    h: &Harness,
    queue_url: &str,
    extra_env: &[(&str, &str)],
    once: bool,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_knowbe4-source"));
    command
        .args(["worker", "--concurrency", "4", "--wait-seconds", "0"])
        .args(once.then_some("--once"))
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env_remove("STATE_FILE")
        .env("STATE_TABLE", &h.table)
        .env("SECRET_PREFIX", &h.prefix)
        .env("WORK_QUEUE_URL", queue_url)
        .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
        .env("FORWARD_FORMAT", "sumo")
        .env("FORWARD_URL", h.sink.url())
        .env("RUN_TIMEOUT_SECS", "60")
        .env("DEADLINE_MARGIN_SECS", "2")
        .env("KNOWBE4_REQUEST_TIMEOUT_SECS", "10")
        .env("EMF_METRICS", "off")
        .env(
            "RUST_LOG",
            std::env::var("FANOUT_TEST_LOG").unwrap_or("warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(if std::env::var_os("FANOUT_TEST_STDERR").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::piped()
        });
    for (name, value) in extra_env {
        command.env(name, value);
    }
    command
}

/// Waits (up to 4 minutes) for a worker; returns its report (asserting it exited 0).
async fn finished(child: tokio::process::Child) -> WorkerReport {
    finished_within(child, Duration::from_secs(240)).await
}

/// Waits up to `limit` for a worker; returns its report (asserting it exited 0).
async fn finished_within(child: tokio::process::Child, limit: Duration) -> WorkerReport {
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the worker finished within {limit:?}"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "worker failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("worker report {last:?}: {e}; stderr: {stderr}"));
    WorkerReport {
        received: report["received"].as_u64().unwrap(),
        started: report["started"].as_u64().unwrap(),
        skipped_leased: report["skippedLeased"].as_u64().unwrap(),
        skipped_gone: report["skippedGone"].as_u64().unwrap(),
        failed_to_start: report["failedToStart"].as_u64().unwrap(),
        delete_failures: report["deleteFailures"].as_u64().unwrap(),
        ..WorkerReport::default()
    }
}

/// Creates `per_account` sources on each simulator (ids `a<account>-s<n>`).
async fn create_sources(h: &Harness, sims: &[(Simulator, String)], per_account: usize) {
    let specs: Vec<(String, serde_json::Value)> = sims
        .iter()
        .enumerate()
        .flat_map(|(a, (sim, key))| {
            (0..per_account).map(move |s| {
                (
                    format!("a{a}-s{s}"),
                    source_json(
                        &sim.base_url(),
                        key,
                        serde_json::json!({"name": format!("account {a} source {s}")}),
                    ),
                )
            })
        })
        .collect();
    let results: Vec<_> = futures::stream::iter(specs)
        .map(|(id, json)| async move { h.app.create_with(json, Some(id), true).await })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r.expect("source created");
    }
}

/// 30 accounts with `FANOUT_TEST_SOURCES_PER_ACCOUNT` sources each (default 10: the issue's
/// 300 sources, about 2 minutes against moto; 4 gives 120 sources in about 50 s),
/// one dispatch, 4 worker processes of 4 runs each: every source is run exactly once,
/// nothing is lost, and no account sees more than 4 requests in a second.
///
/// `scripts/test.sh` runs it on its own after the rest (`--ignored`): its thousands of calls
/// to the one-request-at-a-time moto would otherwise delay the other tests' calls by
/// seconds, and several of them check deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone by scripts/test.sh (it loads the shared moto for minutes)"]
async fn dispatch_and_four_workers_collect_every_source_once_within_each_accounts_rate() {
    const ACCOUNTS: usize = 30;
    const EVENTS: usize = 3;
    let per_account: usize = std::env::var("FANOUT_TEST_SOURCES_PER_ACCOUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let h = harness(SimConfig::default()).await;
    let mut sims = Vec::new();
    for a in 0..ACCOUNTS {
        let key = canary(&format!("acct{a}"));
        let sim = Simulator::spawn(SimConfig {
            api_key: key.clone(),
            events: EVENTS,
            seed: a as u64 + 1,
            ..SimConfig::default()
        })
        .await
        .unwrap();
        sims.push((sim, key));
    }
    create_sources(&h, &sims, per_account).await;
    let (queue, url, dlq) = queues(120, 3).await;

    let report = dispatch(&h.app, &queue).await.expect("dispatch");
    assert_eq!(report.sources, ACCOUNTS * per_account);
    assert_eq!(report.queued, ACCOUNTS * per_account, "{report:?}");
    assert!(report.not_due.is_empty(), "{report:?}");
    assert_eq!(report.send_calls, (ACCOUNTS * per_account).div_ceil(10));

    let children: Vec<_> = (0..4)
        .map(|_| worker(&h, &url, &[]).spawn().expect("worker started"))
        .collect();
    // A bound, not a measure (benches/fanout.rs measures): 300 sources take about two
    // minutes here; a loaded 2-core machine gets several times that.
    let limit = Duration::from_secs(180 + 3 * (ACCOUNTS * per_account) as u64);
    let mut total = WorkerReport::default();
    for child in children {
        let r = finished_within(child, limit).await;
        total.received += r.received;
        total.started += r.started;
        total.skipped_leased += r.skipped_leased;
        total.failed_to_start += r.failed_to_start;
        total.delete_failures += r.delete_failures;
    }
    let sources = (ACCOUNTS * per_account) as u64;
    assert_eq!(total.received, sources, "{total:?}");
    assert_eq!(total.started, sources, "{total:?}");
    assert_eq!(
        (
            total.skipped_leased,
            total.failed_to_start,
            total.delete_failures
        ),
        (0, 0, 0)
    );
    assert!(bodies(&url).await.is_empty());
    assert!(bodies(&dlq).await.is_empty());

    for (a, (sim, _)) in sims.iter().enumerate() {
        // Exactly one run per source of the account: each run has its own id.
        let runs: HashSet<Option<String>> =
            sim.requests().iter().map(|r| r.run_id.clone()).collect();
        assert_eq!(runs.len(), per_account, "account {a}: {runs:?}");
        assert!(runs.iter().all(Option::is_some));
        assert_rate_respected(sim);
        for s in 0..per_account {
            let id = format!("a{a}-s{s}");
            let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
            assert_eq!(
                state.counters.forwarded_total, EVENTS as u64,
                "{id} forwarded every event of its account once"
            );
        }
    }
    // Nothing lost, nothing twice: every source's copy of its account's events arrived.
    let ids = h.sink.event_ids();
    assert_eq!(ids.len(), ACCOUNTS * per_account * EVENTS);
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        ACCOUNTS * EVENTS,
        "each account's events, by id"
    );

    // Right after the runs, a source whose lease is held is not dispatched.
    let lease = h
        .app
        .store
        .acquire_lease("a0-s0", "someone-else", now_ms(), 60_000)
        .await
        .unwrap()
        .expect("the lease is free");
    let again = dispatch(&h.app, &queue).await.expect("second dispatch");
    assert_eq!(
        again
            .not_due
            .get(&knowbe4_source::fanout::dispatch::NotDue::Leased),
        Some(&1),
        "{again:?}"
    );
    assert_eq!(again.queued, ACCOUNTS * per_account - 1);
    h.app.store.release_lease(&lease, now_ms()).await.unwrap();
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A worker killed mid-run (after fetching, before forwarding) leaves its message; it
/// reappears after the visibility timeout, when the dead run's lease has lapsed, and
/// another worker collects the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_message_reappears_and_another_worker_collects_the_source() {
    let (key, h) = harness_with_canary_key(40).await;
    h.app
        .create_with(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("victim".into()),
            false,
        )
        .await
        .unwrap();
    // The dead run's lease (10 s) lapses well before its message reappears (20 s), and
    // the takeover run (one to three requests) ends well before the message could
    // reappear again; the second worker polls until the message is back.
    let (queue, url, dlq) = queues(20, 5).await;
    assert_eq!(dispatch(&h.app, &queue).await.unwrap().queued, 1);

    let lease = [("LEASE_TTL_SECS", "10")];
    let out = worker(
        &h,
        &url,
        &[
            lease[0],
            ("KNOWBE4_SOURCE_FAILPOINT", "after_fetch_before_forward:1"),
        ],
    )
    .spawn()
    .unwrap()
    .wait_with_output()
    .await
    .unwrap();
    assert!(!out.status.success(), "the failpoint aborted the worker");
    assert!(h.sink.event_ids().is_empty(), "killed before forwarding");
    assert_eq!(
        h.app
            .store
            .load_state("victim")
            .await
            .unwrap()
            .unwrap()
            .value
            .counters
            .forwarded_total,
        0
    );

    let report = finished(worker(&h, &url, &lease).spawn().unwrap()).await;
    assert_eq!(report.started, 1, "{report:?}");
    assert_eq!(report.received, 1, "{report:?}");
    assert_eq!(report.failed_to_start, 0, "{report:?}");
    let ids = h.sink.event_ids();
    assert_eq!(ids.len(), 40, "every event, once");
    assert!(duplicates(&ids).is_empty());
    assert!(bodies(&url).await.is_empty());
    assert!(bodies(&dlq).await.is_empty());
    assert_rate_respected(&h.sim);
}

/// Poison messages — one that is not a work message, one naming a source id the table does
/// not know — are offered again after the retry delay (not the queue's long visibility
/// timeout), up to the redrive count, then wait in the dead-letter queue, not in a loop,
/// and never reach KnowBe4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_queue_after_the_redrive_count() {
    let h = harness(SimConfig::default()).await;
    // Ten minutes of visibility: only ChangeMessageVisibility (1 s here) brings a message
    // back within the worker's time limit.
    let (queue, url, dlq) = queues(600, 2).await;
    let gone = r#"{"sourceId":"no-such-source","dispatchedAt":"2026-12-06T00:00:00.000Z"}"#;
    let poison = [
        ("0".to_string(), gone.to_string()),
        ("1".to_string(), "not a work message".to_string()),
    ];
    assert!(queue.send_batch(&poison).await.unwrap().is_empty());
    let report = finished(
        worker(&h, &url, &[("WORK_RETRY_DELAY_SECS", "1")])
            .spawn()
            .unwrap(),
    )
    .await;
    // Each was received twice (the redrive count) and failed to start each time.
    assert_eq!(report.received, 4, "{report:?}");
    assert_eq!(report.failed_to_start, 4, "{report:?}");
    assert_eq!(report.skipped_gone, 0, "{report:?}");
    assert_eq!(report.started, 0);
    assert!(h.sim.requests().is_empty(), "poison never reaches KnowBe4");
    assert!(bodies(&url).await.is_empty());
    let mut dead = bodies(&dlq).await;
    dead.sort();
    assert_eq!(dead, ["not a work message".to_string(), gone.to_string()]);
}

/// The Lambda SQS event: the response names only the records whose run could not start
/// (the state store failing, or a poison message naming an unknown source), not a
/// duplicate delivery (lease held), nor a source whose KnowBe4 refused the key (its health event and streak govern it);
/// with the work queue, a named record is offered again after the retry delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqs_event_reports_only_runs_that_could_not_start() {
    let (key, h) = harness_with_canary_key(5).await;
    let create = |id: &str, key: &str| {
        h.app.create_with(
            source_json(&h.sim.base_url(), key, serde_json::json!({})),
            Some(id.to_string()),
            true,
        )
    };
    create("good", &key).await.unwrap();
    create("leased", &key).await.unwrap();
    // Before any run (seconds, rounded down).
    let before = now_ms() - 1000;
    create("wrong-key", "not-the-key").await.unwrap();
    let held = h
        .app
        .store
        .acquire_lease("leased", "another-run", now_ms(), 60_000)
        .await
        .unwrap()
        .unwrap();
    let record = |id: &str, source: &str| {
        serde_json::json!({
            "messageId": id,
            "receiptHandle": format!("handle-{id}"),
            "body": serde_json::json!({"sourceId": source, "dispatchedAt": "2026-12-06T00:00:00.000Z"}).to_string(),
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {},
            "md5OfBody": "",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:work",
            "awsRegion": "us-east-1"
        })
    };
    let event = serde_json::json!({"Records": [
        record("m1", "good"),
        record("m2", "leased"),
        record("m3", "wrong-key"),
        record("m4", "gone"),
    ]});
    assert!(knowbe4_source::fanout::is_sqs_event(&event));
    let response = handle_sqs_payload(&h.app, None, event.clone(), deadline(60))
        .await
        .unwrap();
    assert_eq!(
        response,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m4"}]}),
        "only the unknown source's record (poison: to the dead-letter queue after the redrive count)"
    );
    assert_eq!(h.sink.event_ids().len(), 5, "good was collected");

    // A copy of good's message dispatched before that run is stale: dropped after the
    // state read, nothing sent.
    let requests = h.sim.requests().len();
    let mut stale = record("m6", "good");
    stale["body"] = serde_json::json!({
        "sourceId": "good",
        "dispatchedAt": time::OffsetDateTime::from_unix_timestamp(before / 1000)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
    })
    .to_string()
    .into();
    let d = knowbe4_source::fanout::work::run_message(
        &h.app,
        stale["body"].as_str().unwrap(),
        1,
        deadline(60),
    )
    .await;
    assert!(
        matches!(d, knowbe4_source::fanout::work::Disposition::Gone(_)) && d.delete(),
        "{d:?}"
    );
    assert_eq!(
        h.sim.requests().len(),
        requests,
        "a stale message sends nothing"
    );
    assert_eq!(h.sink.event_ids().len(), 5);
    let leased = h
        .app
        .store
        .load_state("leased")
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(
        leased.counters.forwarded_total, 0,
        "the lease holder's to collect"
    );
    let health = h.app.store.list_health("wrong-key", 10).await.unwrap();
    assert_eq!(health.len(), 1, "the refused key is a health event");
    h.app.store.release_lease(&held, now_ms()).await.unwrap();

    // The state store failing: every record is retried.
    let config = aws_config().await;
    let broken = App::new(
        Arc::new(DynamoStore::new(
            aws_sdk_dynamodb::Client::new(&config),
            "no-such-table",
        )),
        Vault::SecretsManager(SecretsManagerVault::new(
            aws_sdk_secretsmanager::Client::new(&config),
            h.prefix.clone(),
        )),
        knowbe4_source::app::knowbe4_http_client().unwrap(),
        DestinationConfig {
            format: Format::Sumo,
            url: Some(SecretString::from(h.sink.url())),
            token: None,
        },
        test_settings(&h.prefix),
    );
    let response = handle_sqs_payload(&broken, None, event, deadline(60))
        .await
        .unwrap();
    let mut failed: Vec<String> = response["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_string())
        .collect();
    failed.sort();
    assert_eq!(failed, ["m1", "m2", "m3", "m4"]);

    // Through a real queue (ten minutes of visibility): the failed record's message is
    // made visible again after the retry delay, so SQS offers it again soon.
    let (queue, url, _dlq) = queues(600, 5).await;
    let queue = queue.with_retry_delay(1);
    let body = serde_json::json!({"sourceId": "good"}).to_string();
    assert!(
        queue
            .send_batch(&[("0".into(), body.clone())])
            .await
            .unwrap()
            .is_empty()
    );
    let received = queue.receive(1, 1).await.unwrap();
    assert_eq!(received.len(), 1);
    let mut live = record("m5", "good");
    live["receiptHandle"] = received[0].receipt_handle.clone().into();
    let response = handle_sqs_payload(
        &broken,
        Some(&queue),
        serde_json::json!({"Records": [live]}),
        deadline(60),
    )
    .await
    .unwrap();
    assert_eq!(
        response,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m5"}]})
    );
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if bodies(&url).await == [body.clone()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the message was offered again within a minute, not after the visibility timeout"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `events/sqs.json` (the Lambda smoke test's payload) in local mode: the known source's
/// run starts, the unreadable record is the one batch item failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_sqs_event_runs_its_source_and_reports_the_unreadable_one() {
    let key = canary("key");
    let sim = Simulator::spawn(SimConfig {
        api_key: key.clone(),
        events: 7,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let sink = knowbe4_source::testkit::recording_sink::RecordingSink::spawn()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = local_app(dir.path(), &sink);
    app.create_with(
        source_json(&sim.base_url(), &key, serde_json::json!({})),
        Some("knowbe4-prod".into()),
        false,
    )
    .await
    .unwrap();
    let event: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/events/sqs.json")).unwrap(),
    )
    .unwrap();
    let response = handle_sqs_payload(&app, None, event, deadline(60))
        .await
        .unwrap();
    assert_eq!(
        response,
        serde_json::json!({"batchItemFailures": [
            {"itemIdentifier": "9d0a4ae6-0c1e-4a3c-9d64-5f1b2c3d4e02"}
        ]})
    );
    assert_eq!(sink.event_ids().len(), 7);
}

/// A worker without `--once` runs until SIGTERM (or Ctrl-C), then finishes its runs in
/// progress and exits 0 with its report. The test signals once the worker said it is
/// ready and its message is in flight (a slow KnowBe4: the run is most likely still in
/// progress; if it already ended, the assertions hold all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_cleanly_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let key = canary("key");
    let h = harness(SimConfig {
        api_key: key.clone(),
        events: 5,
        latency_ms: 1500,
        ..SimConfig::default()
    })
    .await;
    h.app
        .create_with(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("slow".into()),
            false,
        )
        .await
        .unwrap();
    let (queue, url, _dlq) = queues(120, 3).await;
    let mut command = worker_with(&h, &url, &[], false);
    command.stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.starts_with("worker ready") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the worker said it is ready within 2 minutes");
    assert!(ready, "the worker exited before it was ready");
    // Keep reading its stderr so that the pipe never fills.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });

    assert_eq!(dispatch(&h.app, &queue).await.unwrap().queued, 1);
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    while queue.depth().await.unwrap().visible > 0 || h.sim.requests().is_empty() {
        assert!(
            tokio::time::Instant::now() < until,
            "the worker took the message and asked KnowBe4 within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: signals the worker this test started, by its id.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let report = finished(child).await;
    drain.abort();
    assert_eq!((report.received, report.started), (1, 1), "{report:?}");
    assert_eq!(h.sink.event_ids().len(), 5, "the run in progress finished");
    assert!(bodies(&url).await.is_empty(), "its message was deleted");
}

/// A malformed item leaves its source out of the dispatch (counted as unreadable), not
/// the whole dispatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_item_leaves_its_source_out_of_the_dispatch() {
    let (key, h) = harness_with_canary_key(1).await;
    h.app
        .create_with(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("fine".into()),
            false,
        )
        .await
        .unwrap();
    use aws_sdk_dynamodb::types::AttributeValue;
    for (sk, doc) in [("CONFIG", "{not json"), ("STATE", "{}")] {
        h.dynamo
            .put_item()
            .table_name(&h.table)
            .item("pk", AttributeValue::S("SOURCE#broken".into()))
            .item("sk", AttributeValue::S(sk.into()))
            .item("doc", AttributeValue::S(doc.into()))
            .send()
            .await
            .unwrap();
    }
    let (queue, url, _dlq) = queues(60, 3).await;
    let report = dispatch(&h.app, &queue).await.expect("dispatch");
    assert_eq!((report.sources, report.queued), (2, 1), "{report:?}");
    assert_eq!(
        report
            .not_due
            .get(&knowbe4_source::fanout::dispatch::NotDue::Unreadable),
        Some(&1),
        "{report:?}"
    );
    assert_eq!(bodies(&url).await.len(), 1);
}

/// The state store failing after the run loaded its state but before any KnowBe4 request
/// (here: the account's quota item is unreadable, so the reservation fails): the record is
/// a batch item failure, and nothing is counted against the source (no retry streak, no
/// health event, no request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_before_any_request_is_retried_and_not_counted_against_the_source() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let (key, h) = harness_with_canary_key(3).await;
    h.app
        .create_with(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("acme".into()),
            true,
        )
        .await
        .unwrap();
    let record = |id: &str| {
        serde_json::json!({"Records": [{
            "messageId": id,
            "receiptHandle": format!("handle-{id}"),
            "body": serde_json::json!({"sourceId": "acme"}).to_string(),
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {},
            "md5OfBody": "",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:work",
            "awsRegion": "us-east-1"
        }]})
    };
    let response = handle_sqs_payload(&h.app, None, record("m1"), deadline(60))
        .await
        .unwrap();
    assert_eq!(response, serde_json::json!({"batchItemFailures": []}));
    assert_eq!(h.sink.event_ids().len(), 3);
    let state = h.app.store.load_state("acme").await.unwrap().unwrap().value;
    let account = state.account.clone().expect("the run joined its account");
    let requests = h.sim.requests().len();

    // Today's and tomorrow's ledger items hold a string count: ADD fails (not a
    // condition), so the reservation before the first request fails.
    let today = time::OffsetDateTime::now_utc();
    for day in [today, today + time::Duration::days(1)] {
        h.dynamo
            .put_item()
            .table_name(&h.table)
            .item("pk", AttributeValue::S(format!("ACCOUNT#{account}")))
            .item(
                "sk",
                AttributeValue::S(format!(
                    "QUOTA#{}",
                    knowbe4_source::domain::quota::utc_day(day)
                )),
            )
            .item("used", AttributeValue::S("not a number".into()))
            .send()
            .await
            .unwrap();
    }
    let response = handle_sqs_payload(&h.app, None, record("m2"), deadline(60))
        .await
        .unwrap();
    assert_eq!(
        response,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m2"}]})
    );
    assert_eq!(h.sim.requests().len(), requests, "no KnowBe4 request");
    let after = h.app.store.load_state("acme").await.unwrap().unwrap().value;
    assert!(
        after.streak.is_none(),
        "no retry streak: {:?}",
        after.streak
    );
    assert_eq!(after.lifecycle, state.lifecycle);
    assert!(
        h.app
            .store
            .list_health("acme", 10)
            .await
            .unwrap()
            .is_empty()
    );
}
