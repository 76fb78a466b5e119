//! Issue 12, step 4: the phishing stream end to end — security tests and recipients from
//! the simulator's Reporting API, through the run loop, into the recording sink, with the
//! change state in DynamoDB (moto) or the local state file (the crash test).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use knowbe4_source::run::{DataType, Outcome, Trigger, collect_source_types};
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{
    BURST_PER_MINUTE, BURST_PER_SECOND, RequestRecord, SimConfig, Simulator,
};
use serde_json::Value;

use crate::helpers::*;

pub const EVENT_KEY: &str = "phishing-it-event-key";
pub const REPORTING_TOKEN: &str = "sim-reporting-token";

/// The most requests the server saw in any window of `window_ms`.
pub fn most_in_window(log: &[RequestRecord], window_ms: u64) -> usize {
    let mut times: Vec<u64> = log.iter().map(|r| r.at_ms).collect();
    times.sort_unstable();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + window_ms)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Asserts the Reporting API's limits as the server observed them: ≤ 4 a second, ≤ 50 a
/// minute, no 429.
pub fn assert_reporting_limits(sim: &Simulator) {
    let log = sim.reporting_requests();
    assert!(most_in_window(&log, 1_000) <= BURST_PER_SECOND, "{log:?}");
    assert!(most_in_window(&log, 60_000) <= BURST_PER_MINUTE, "{log:?}");
    let stats = sim.reporting_stats();
    assert_eq!(stats.answered_429, 0, "{stats:?}");
    assert_eq!(stats.second_violations + stats.minute_violations, 0);
}

/// What the destination holds, by kind: tests by `pst_id` and recipients by
/// `recipient_id` (every message, in arrival order), and user event ids.
#[derive(Default)]
pub struct Received {
    pub tests: BTreeMap<u64, Vec<Value>>,
    pub recipients: BTreeMap<u64, Vec<Value>>,
    pub events: Vec<String>,
}

impl Received {
    pub fn of(sink: &RecordingSink) -> Received {
        let mut received = Received::default();
        for message in sink.events() {
            if let Some(id) = message.get("recipient_id").and_then(Value::as_u64) {
                received.recipients.entry(id).or_default().push(message);
            } else if let Some(id) = message.get("pst_id").and_then(Value::as_u64) {
                received.tests.entry(id).or_default().push(message);
            } else if let Some(id) = message.get("id").and_then(Value::as_str) {
                received.events.push(id.to_string());
            } else {
                panic!("a message of no known kind: {message}");
            }
        }
        received
    }

    pub fn recipient_messages(&self) -> usize {
        self.recipients.values().map(Vec::len).sum()
    }

    pub fn test_messages(&self) -> usize {
        self.tests.values().map(Vec::len).sum()
    }

    /// Asserts the latest message of every test and recipient is what the simulator
    /// serves now, and no test or recipient is missing or extra.
    pub fn assert_latest(&self, sim: &Simulator) {
        let tests = sim.phishing_tests();
        let ids: BTreeSet<u64> = tests
            .iter()
            .map(|t| t["pst_id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, self.tests.keys().copied().collect::<BTreeSet<_>>());
        let mut expected_recipients = BTreeSet::new();
        for test in &tests {
            let id = test["pst_id"].as_u64().unwrap();
            assert_eq!(self.tests[&id].last().unwrap(), test, "test {id}");
            for r in sim.phishing_recipients(id) {
                let rid = r["recipient_id"].as_u64().unwrap();
                expected_recipients.insert(rid);
                let got = self
                    .recipients
                    .get(&rid)
                    .unwrap_or_else(|| panic!("recipient {rid} of test {id} never forwarded"));
                assert_eq!(got.last().unwrap(), &r, "recipient {rid}");
            }
        }
        assert_eq!(
            expected_recipients,
            self.recipients.keys().copied().collect::<BTreeSet<_>>()
        );
    }

    /// Asserts no record was forwarded twice in the same state (`except`: ids allowed to).
    pub fn assert_no_unchanged_resent(&self) {
        for (id, messages) in self.tests.iter().chain(&self.recipients) {
            let distinct: BTreeSet<String> = messages.iter().map(Value::to_string).collect();
            assert_eq!(
                distinct.len(),
                messages.len(),
                "record {id} re-sent unchanged"
            );
        }
    }
}

/// A harness whose simulator has no user events: the phishing stream alone.
async fn phishing_harness() -> Harness {
    harness(SimConfig {
        events: 0,
        ..SimConfig::default()
    })
    .await
}

/// One run of source `id` (a 60 s invocation).
async fn run_once(
    h: &Harness,
    id: &str,
    trigger: Trigger,
    only: Option<DataType>,
) -> knowbe4_source::run::RunReport {
    collect_source_types(h.app.run_context(), id, deadline(60), trigger, only).await
}

/// The newest generation's example (`example.json`): both data types, hosts pointed at
/// the simulator.
fn both_types(sim: &Simulator) -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/knowbe4-public/example.json"
    ))
    .unwrap();
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    let config = &mut doc["source"]["config"];
    config["apiKeyPhishing"] = REPORTING_TOKEN.into();
    config["apiKeyEvent"] = EVENT_KEY.into();
    config["baseURL"] = sim.base_url().into();
    config["reportingBaseURL"] = sim.base_url().into();
    config["phishingPollInterval"] = 1.into();
    config["dailyRequestLimit"] = 100_000.into();
    config["firstFetchLookbackHours"] = 200.into();
    doc
}

/// 700- and 40-recipient tests, an errored test, results progressing, a test added later
/// and one closed: after the final poll the destination holds every test and recipient
/// in its latest state, nothing unchanged was re-sent, the Reporting limits held as the
/// server saw them, and the same source's user events were neither lost nor delayed (a
/// scheduled run while phishing is not due still collects them at once, without one
/// Reporting request).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tests_and_recipients_arrive_in_their_latest_state_and_unchanged_ones_are_not_resent() {
    clear_of_midnight(180).await;
    let h = harness(SimConfig {
        api_key: EVENT_KEY.into(),
        events: 50,
        ..SimConfig::default()
    })
    .await;
    let big = h.sim.add_phishing_test(700);
    let small = h.sim.add_phishing_test(40);
    let errored = h.sim.add_errored_phishing_test();
    h.sim.progress_phishing(None, 300);
    let id = h
        .app
        .create(both_types(&h.sim), Some("both".into()))
        .await
        .unwrap();

    // First run: both streams (the phishing poll is due at once).
    let first = collect_source_types(
        h.app.run_context(),
        &id,
        deadline(120),
        Trigger::Schedule,
        None,
    )
    .await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    assert!(first.detail.contains("phishing: polled"), "{first:?}");
    let got = Received::of(&h.sink);
    assert_eq!(got.events.len(), 50, "{first:?}");
    got.assert_latest(&h.sim);
    assert_eq!(got.recipient_messages(), 740);
    assert_eq!(got.test_messages(), 3);
    let error = &got.tests[&errored][0];
    assert!(error["started_at"].is_null() && error["status"] == "Error");
    // tests 1 page + the empty one; 700 recipients 2 + 1; 40 recipients 1 + 1; none 1.
    assert_eq!(h.sim.reporting_requests().len(), 8);

    // Results move, a test closes, another is added, user events keep coming.
    let moved = h.sim.progress_phishing(Some(big), 30);
    let moved_small = h.sim.progress_phishing(Some(small), 10);
    assert_eq!((moved.len(), moved_small.len()), (30, 10));
    assert!(h.sim.close_phishing_test(small));
    let later = h.sim.add_phishing_test(40);
    h.sim.add_events(20, 0);

    // A scheduled run an instant later: user events at once, phishing not due.
    let second = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(second.outcome, Outcome::Collected, "{second:?}");
    assert!(second.detail.contains("phishing: not due"), "{second:?}");
    assert_eq!(Received::of(&h.sink).events.len(), 70, "{second:?}");
    assert_eq!(h.sim.reporting_requests().len(), 8, "no Reporting request");

    // `collect --data-type phishing`: now, ignoring the interval; no user-event request.
    let events_requests = h.sim.requests().len();
    let third = collect_source_types(
        h.app.run_context(),
        &id,
        deadline(120),
        Trigger::OnDemand,
        Some(DataType::Phishing),
    )
    .await;
    assert_eq!(third.outcome, Outcome::Collected, "{third:?}");
    assert_eq!(
        h.sim.requests().len(),
        events_requests,
        "no User Event request"
    );
    let got = Received::of(&h.sink);
    got.assert_latest(&h.sim);
    got.assert_no_unchanged_resent();
    assert_eq!(got.recipient_messages(), 740 + 30 + 10 + 40);
    // The two tests whose counts moved, the closed one among them, and the new one; the
    // errored test did not change and was not re-sent.
    assert_eq!(got.tests[&big].len(), 2);
    assert_eq!(got.tests[&small].len(), 2);
    assert_eq!(got.tests[&errored].len(), 1);
    assert_eq!(got.tests[&later].len(), 1);
    assert_eq!(got.events.len(), 70, "user events not re-sent");
    // tests 2; big 3; small 2 (closed now, still read); errored 1; the new one 2.
    assert_eq!(h.sim.reporting_requests().len(), 8 + 10);
    assert_reporting_limits(&h.sim);

    // Every request was reserved in the Reporting account's ledger, none in the events'.
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let phishing = state.phishing.expect("phishing state");
    let day = knowbe4_source::domain::quota::utc_day(time::OffsetDateTime::now_utc());
    let used = h
        .app
        .store
        .quota_used(phishing.account.as_deref().unwrap(), &day)
        .await
        .unwrap();
    assert_eq!(used, 18);
    assert_eq!(phishing.tests_tracked, 4);
    assert!(phishing.next_poll.unwrap() > phishing.last_poll.unwrap());
    assert_eq!(
        state.lifecycle,
        knowbe4_source::domain::state::Lifecycle::Collecting
    );

    // `status` shows the phishing stream next to the events' checkpoint.
    let status = h.app.status(Some(&id)).await.unwrap();
    let shown = status[0].phishing.as_ref().expect("phishing status");
    assert_eq!((shown.tests_tracked, shown.tests_live), (4, 4));
    assert_eq!((shown.requests_today, shown.last_poll_requests), (18, 10));
    assert_eq!(shown.poll_interval_hours, 1);
    assert!(shown.next_poll.is_some() && !shown.stopped);
    assert!(status[0].checkpoint.is_some());
    let text = knowbe4_source::cli::format_status(&status[0]);
    assert!(text.contains("Phishing      every 1 h"), "{text}");
}

/// A failing phishing poll (the Reporting token refused) does not stop the user events of
/// the same source; its health event names the data type, and the events stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_phishing_poll_does_not_stop_user_events() {
    let h = harness(SimConfig {
        api_key: EVENT_KEY.into(),
        events: 30,
        ..SimConfig::default()
    })
    .await;
    h.sim.add_phishing_test(3);
    let mut json = both_types(&h.sim);
    json["source"]["config"]["apiKeyPhishing"] = "a-wrong-reporting-token".into();
    let id = h.app.create(json, Some("half".into())).await.unwrap();
    let first = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(first.outcome, Outcome::Failed, "{first:?}");
    assert_eq!(
        Received::of(&h.sink).events.len(),
        30,
        "events collected anyway"
    );
    let health = h.app.health(&id).await.unwrap();
    assert_eq!(health.len(), 1, "{health:?}");
    assert_eq!(health[0].data_type.as_deref(), Some("phishing"));
    assert!(
        health[0].message.contains("Reporting API token"),
        "{health:?}"
    );
    assert!(!health[0].message.contains("a-wrong"), "{health:?}");

    // The phishing stream is stopped until an update; user events go on.
    h.sim.add_events(10, 0);
    let requests = h.sim.reporting_requests().len();
    let second = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(Received::of(&h.sink).events.len(), 40, "{second:?}");
    assert_eq!(h.sim.reporting_requests().len(), requests, "{second:?}");
    assert!(second.detail.contains("phishing: stopped"), "{second:?}");
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    assert_eq!(
        state.lifecycle,
        knowbe4_source::domain::state::Lifecycle::Collecting
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A crash between forwarding a page of recipients and saving its digests repeats that
/// page's batch and nothing else: the binary is killed by a failpoint after its second
/// forwarded batch (the first 500 recipients of the 700-recipient test), then run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_forwarding_and_saving_digests_repeats_at_most_that_batch() {
    let sim = Simulator::spawn(SimConfig {
        events: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let big = sim.add_phishing_test(700);
    sim.add_phishing_test(40);
    sim.progress_phishing(None, 100);
    let sink = RecordingSink::spawn().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], failpoint: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_knowbe4-source"));
        command
            .args(args)
            .current_dir(dir.path())
            .env_remove("STATE_TABLE")
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .env_remove("KNOWBE4_SOURCE_FAILPOINT")
            .env("STATE_FILE", dir.path().join("state.json"))
            .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
            .env("FORWARD_URL", sink.url())
            .env("FORWARD_FORMAT", "ndjson")
            .env("LEASE_TTL_SECS", "3");
        if let Some(point) = failpoint {
            command.env("KNOWBE4_SOURCE_FAILPOINT", point);
        }
        command.output().expect("the binary runs")
    };
    // The middle generation, as its example writes it, pointed at the simulator.
    let source = dir.path().join("source.json");
    std::fs::write(&source, middle_example(&sim.base_url()).to_string()).unwrap();
    let out = run(
        &[
            "sources",
            "create",
            "--file",
            source.to_str().unwrap(),
            "--id",
            "pst",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = run(
        &["collect", "--source", "pst", "--data-type", "phishing"],
        Some("phishing_after_forward_before_digests:2"),
    );
    assert!(!out.status.success(), "the failpoint aborted the run");
    let crashed = Received::of(&sink);
    assert_eq!(crashed.test_messages(), 2);
    assert_eq!(
        crashed.recipient_messages(),
        500,
        "the first recipient page"
    );

    // The lease of the killed run lapses; the next run repeats that one batch only.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let out = run(
        &["collect", "--source", "pst", "--data-type", "phishing"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = Received::of(&sink);
    got.assert_latest(&sim);
    assert_eq!(got.test_messages(), 2, "tests were saved before the crash");
    assert_eq!(
        got.recipient_messages(),
        740 + 500,
        "the one batch, repeated once"
    );
    let repeated: Vec<u64> = got
        .recipients
        .iter()
        .filter(|(_, m)| m.len() > 1)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(repeated.len(), 500);
    let big_ids: BTreeSet<u64> = sim
        .phishing_recipients(big)
        .iter()
        .map(|r| r["recipient_id"].as_u64().unwrap())
        .collect();
    assert!(repeated.iter().all(|id| big_ids.contains(id)));
    assert_reporting_limits(&sim);
}

/// A poll stopped early (here by the Reporting daily limit, reserved before each request)
/// is continued by the next run, not started over: the test whose recipients it already
/// read is not read again, and nothing is forwarded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_stopped_early_is_continued_not_started_over() {
    clear_of_midnight(120).await;
    let h = phishing_harness().await;
    let first_test = h.sim.add_phishing_test(30);
    let second_test = h.sim.add_phishing_test(20);
    let mut json = middle_example(&h.sim.base_url());
    json["source"]["config"]["reportingDailyRequestLimit"] = 4.into();
    let id = h
        .app
        .create(json.clone(), Some("limited".into()))
        .await
        .unwrap();
    let first = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    assert!(first.detail.contains("daily limit"), "{first:?}");
    // The tests list (2) and the first test's recipients (2): the limit.
    assert_eq!(h.sim.reporting_requests().len(), 4);
    assert_eq!(Received::of(&h.sink).recipient_messages(), 30);

    // A higher limit (the update keeps the token: same Reporting host).
    json["source"]["config"]["reportingDailyRequestLimit"] = 100.into();
    json["source"]["config"]
        .as_object_mut()
        .unwrap()
        .remove("apiKey");
    h.app.update(&id, json).await.unwrap();
    let second = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(second.outcome, Outcome::Collected, "{second:?}");
    assert!(second.detail.contains("phishing: polled"), "{second:?}");
    let paths: Vec<String> = h
        .sim
        .reporting_requests()
        .iter()
        .skip(4)
        .map(|r| r.path.clone())
        .collect();
    // The tests list was read to its end by the first run: not asked for again; only
    // the second test's recipients (a page and the empty page that ends them).
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(
        paths
            .iter()
            .all(|p| !p.contains(&format!("/{first_test}/")) && p.contains("/recipients")),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p.contains(&format!("/{second_test}/"))),
        "{paths:?}"
    );
    let got = Received::of(&h.sink);
    got.assert_latest(&h.sim);
    got.assert_no_unchanged_resent();
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let phishing = state.phishing.unwrap();
    assert!(phishing.poll_started.is_none() && phishing.next_poll.is_some());
}

/// The middle generation's example (`example.older-dataTypes.tf`), its Reporting host
/// pointed at `base`.
pub fn middle_example(base: &str) -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/knowbe4-public/example.older-dataTypes.tf"
    ))
    .unwrap();
    let start = text.find("jsonencode(").unwrap() + "jsonencode(".len();
    let end = start + text[start..].find("})").unwrap() + 1;
    let mut config: Value = serde_json::from_str(&text[start..end]).unwrap();
    config["apiKey"] = REPORTING_TOKEN.into();
    config["reportingBaseURL"] = base.into();
    serde_json::json!({"api.version": "v1", "source": {"config": config,
        "schemaRef": {"type": "KnowBe4 KMSAT"}}})
}

/// The Lambda payload names the data type as `dataType`; anything but `events` or
/// `phishing` is refused.
#[test]
fn the_collect_payload_names_the_data_type() {
    use knowbe4_source::app::Action;
    let action = Action::from_payload(
        serde_json::json!({"action": "collect", "sourceId": "s", "dataType": "phishing"}),
    )
    .unwrap();
    assert!(matches!(
        action,
        Action::Collect {
            data_type: Some(DataType::Phishing),
            ..
        }
    ));
    let action =
        Action::from_payload(serde_json::json!({"action": "collect", "sourceId": "s"})).unwrap();
    assert!(matches!(
        action,
        Action::Collect {
            data_type: None,
            ..
        }
    ));
    assert!(
        Action::from_payload(
            serde_json::json!({"action": "collect", "sourceId": "s", "dataType": "audit"})
        )
        .is_err()
    );
}

/// BENCHMARKS.md's figures (a scripted run, not a test): requests per poll and per 1,000
/// recipient changes for a 10,000-seat account with 12 live tests, through the real
/// stream, the simulator and moto. Run alone, with the spacing shortened on loopback (the
/// simulator then counts but does not refuse bursts; the count is what is measured):
/// `KNOWBE4_SIM_REPORTING_SPACING_MS=30 BENCH_RECIPIENTS_PER_TEST=834 BENCH_READING=cap-100
/// VENV=/work/main/.venv scripts/with-moto.sh cargo test --test it bench_phishing --
/// --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a scripted benchmark run: see BENCHMARKS.md"]
async fn bench_phishing_requests_per_poll() {
    let per_test: usize = std::env::var("BENCH_RECIPIENTS_PER_TEST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(834);
    // `BENCH_READING`: a reading of `ReportingReading::all()` (default `honoured-500`).
    let reading_name = std::env::var("BENCH_READING").unwrap_or_else(|_| "honoured-500".into());
    let reading = knowbe4_source::testkit::sim::ReportingReading::by_name(&reading_name)
        .expect("BENCH_READING names a reading");
    let h = harness(SimConfig {
        events: 0,
        reporting: knowbe4_source::testkit::sim::ReportingConfig {
            enforce_limits: false,
            reading,
            ..Default::default()
        },
        ..SimConfig::default()
    })
    .await;
    let tests: Vec<u64> = (0..12).map(|_| h.sim.add_phishing_test(per_test)).collect();
    h.sim.progress_phishing(None, 12 * per_test / 2);
    let mut json = middle_example(&h.sim.base_url());
    json["source"]["config"]["licensedUsers"] = 10_000.into();
    let id = h.app.create(json, Some("bench".into())).await.unwrap();
    let mut polls = Vec::new();
    for round in 0..3 {
        if round == 2 {
            // 1,000 recipient changes, spread over the 12 tests.
            let moved = h.sim.progress_phishing(None, 1_000);
            assert_eq!(moved.len(), 1_000);
        }
        let before = h.sim.reporting_requests().len();
        let sent_before = h.sink.events().len();
        let started = std::time::Instant::now();
        let report = collect_source_types(
            h.app.run_context(),
            &id,
            deadline(900),
            Trigger::OnDemand,
            Some(DataType::Phishing),
        )
        .await;
        assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
        polls.push(serde_json::json!({
            "poll": round + 1,
            "changes_before": if round == 2 { 1000 } else { 0 },
            "requests": h.sim.reporting_requests().len() - before,
            "records_forwarded": h.sink.events().len() - sent_before,
            "seconds": started.elapsed().as_secs_f64(),
        }));
    }
    Received::of(&h.sink).assert_latest(&h.sim);
    let shards: usize = futures::future::join_all(tests.iter().map(|t| {
        let store = h.app.store.clone();
        let id = id.clone();
        async move {
            store
                .load_digest_shards(&id, &t.to_string())
                .await
                .unwrap()
                .len()
        }
    }))
    .await
    .into_iter()
    .sum();
    println!(
        "BENCH {}",
        serde_json::json!({"reading": reading_name, "tests": 12, "recipients_per_test": per_test,
            "spacing_ms": knowbe4_source::knowbe4::reporting::reporting_spacing_for(&h.sim.base_url()).as_millis() as u64,
            "recipient_digest_items": shards, "polls": polls})
    );
}

/// The `page` parameter of a recorded request.
fn page_of(record: &RequestRecord) -> u32 {
    record
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("page="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// The review's defect 2: a test whose recipients take more than one run restarted at
/// page 1 every run and never finished. Here each run may send 3 Reporting requests (the
/// daily limit, raised by an update after each run): the tests list (2) and one page of
/// recipients. The 1,200-recipient test's pages are asked for 1, 2, 3, then the empty 4 —
/// each once — and every recipient arrives exactly once. The stream's state item stays
/// the same size whatever the number of tests (tracks and digests are in the change
/// store, review defect 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_larger_than_one_run_goes_on_where_it_stopped() {
    clear_of_midnight(180).await;
    let h = phishing_harness().await;
    let big = h.sim.add_phishing_test(1_200);
    let mut json = middle_example(&h.sim.base_url());
    json["source"]["config"]
        .as_object_mut()
        .unwrap()
        .remove("apiKey");
    let mut limit = 3;
    let mut create = middle_example(&h.sim.base_url());
    create["source"]["config"]["reportingDailyRequestLimit"] = limit.into();
    let id = h.app.create(create, Some("resume".into())).await.unwrap();
    let mut state_sizes = Vec::new();
    for run in 0..4 {
        if run > 0 {
            limit += 1;
            json["source"]["config"]["reportingDailyRequestLimit"] = limit.into();
            h.app.update(&id, json.clone()).await.unwrap();
        }
        let report = run_once(&h, &id, Trigger::Schedule, None).await;
        assert_eq!(report.outcome, Outcome::Collected, "run {run}: {report:?}");
        let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
        let phishing = state.phishing.expect("phishing state");
        state_sizes.push(serde_json::to_string(&phishing).unwrap().len());
        if run < 3 {
            assert!(
                report.detail.contains("daily limit"),
                "run {run}: {report:?}"
            );
            assert_eq!(
                phishing.resume.map(|r| (r.pst_id, r.page)),
                Some((big, run + 2)),
                "run {run}"
            );
        } else {
            assert!(report.detail.contains("phishing: polled"), "{report:?}");
            assert!(phishing.resume.is_none() && phishing.poll_started.is_none());
        }
    }
    let pages: Vec<u32> = h
        .sim
        .reporting_requests()
        .iter()
        .filter(|r| r.path.contains(&format!("/{big}/")))
        .map(page_of)
        .collect();
    assert_eq!(pages, [1, 2, 3, 4], "each page once, in order");
    let lists = h
        .sim
        .reporting_requests()
        .iter()
        .filter(|r| !r.path.contains("/recipients"))
        .count();
    assert_eq!(
        lists, 2,
        "the tests list is read once a poll, not once a run"
    );
    let got = Received::of(&h.sink);
    got.assert_latest(&h.sim);
    got.assert_no_unchanged_resent();
    assert_eq!(got.recipient_messages(), 1_200, "each recipient once");

    // More tests: the state item does not grow with them.
    for _ in 0..5 {
        h.sim.add_phishing_test(2);
    }
    json["source"]["config"]["reportingDailyRequestLimit"] = 1_000.into();
    h.app.update(&id, json).await.unwrap();
    let report = run_once(&h, &id, Trigger::OnDemand, Some(DataType::Phishing)).await;
    assert!(report.detail.contains("phishing: polled"), "{report:?}");
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let phishing = state.phishing.unwrap();
    assert_eq!(phishing.tests_tracked, 6);
    let size = serde_json::to_string(&phishing).unwrap().len();
    let before = *state_sizes.last().unwrap();
    assert!(
        size <= before + 16,
        "the state grew from {before} to {size} bytes with 5 more tests"
    );
    let tracks = h.app.store.load_digest_shards(&id, "tracks").await.unwrap();
    assert!(!tracks.is_empty(), "tracks live in the change store");
    Received::of(&h.sink).assert_latest(&h.sim);
}

/// Review defect 3: page-indexed shards were never cleaned and a record that moved pages
/// was compared with a stale digest. Now a page's changes are appended to the list's log
/// and a complete walk compacts it: by the fourth poll with results moving each time, the
/// test's change state is back to the one shard its 40 recipients need (the old ones
/// deleted), it never holds more than that plus the slack, and each change was forwarded
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_is_compacted_and_every_change_forwarded_once() {
    let h = phishing_harness().await;
    let test = h.sim.add_phishing_test(40);
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("compact".into()))
        .await
        .unwrap();
    let mut moved = 0;
    let mut most_shards = 0;
    for poll in 0..5 {
        if poll > 0 {
            moved += h.sim.progress_phishing(Some(test), 3).len();
        }
        let report = run_once(&h, &id, Trigger::OnDemand, Some(DataType::Phishing)).await;
        assert!(report.detail.contains("phishing: polled"), "{report:?}");
        let shards = h
            .app
            .store
            .load_digest_shards(&id, &test.to_string())
            .await
            .unwrap();
        most_shards = most_shards.max(shards.len());
        let seqs: Vec<u32> = shards.iter().map(|s| s.0).collect();
        if poll == 3 {
            // Four shards (one a poll) for 40 entries: compacted to one, past them.
            assert_eq!(seqs, [5], "compacted");
        }
    }
    assert!(most_shards <= 1 + knowbe4_source::domain::changes::COMPACT_SLACK);
    let got = Received::of(&h.sink);
    got.assert_latest(&h.sim);
    got.assert_no_unchanged_resent();
    assert_eq!(got.recipient_messages(), 40 + moved);
    assert_eq!(
        got.tests[&test].len(),
        5,
        "the test's counts moved every poll"
    );
}

/// Review defect 6: a `Retry-After` longer than a run may wait is saved, and no
/// Reporting request is sent before it passes — not by a scheduled run, not on demand —
/// while the same source's user events go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_holds_every_reporting_request_until_it_passes() {
    let h = harness(SimConfig {
        api_key: EVENT_KEY.into(),
        events: 10,
        ..SimConfig::default()
    })
    .await;
    h.sim.add_phishing_test(5);
    let mut reading = h.sim.reporting_reading();
    reading.retry_after_secs = Some(3_600);
    h.sim.set_reporting_reading(reading);
    h.sim.throttle_reporting(1);
    let id = h
        .app
        .create(both_types(&h.sim), Some("held".into()))
        .await
        .unwrap();
    let first = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(
        first.outcome,
        Outcome::Collected,
        "a 429 is no failure: {first:?}"
    );
    assert!(first.detail.contains("rate-limited"), "{first:?}");
    assert_eq!(h.sim.reporting_requests().len(), 1);
    assert_eq!(
        Received::of(&h.sink).events.len(),
        10,
        "user events collected"
    );
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let not_before = state
        .phishing
        .unwrap()
        .not_before
        .expect("Retry-After saved");
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let waited = not_before - now_ms;
    assert!((3_500_000..=3_600_000).contains(&waited), "{waited} ms");

    h.sim.add_events(5, 0);
    for only in [None, Some(DataType::Phishing)] {
        let report = run_once(&h, &id, Trigger::OnDemand, only).await;
        assert!(report.detail.contains("no request before"), "{report:?}");
    }
    assert_eq!(
        h.sim.reporting_requests().len(),
        1,
        "nothing sent before the time"
    );
    assert_eq!(Received::of(&h.sink).events.len(), 15);

    // An update naming the same Reporting account keeps the wait; one naming another
    // (a new token) drops it: that account never asked for it.
    let mut json = both_types(&h.sim);
    let config = json["source"]["config"].as_object_mut().unwrap();
    config.remove("apiKeyPhishing");
    config.remove("apiKeyEvent");
    h.app.update(&id, json.clone()).await.unwrap();
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    assert_eq!(state.phishing.unwrap().not_before, Some(not_before));
    h.sim.set_reporting_token("another-reporting-token");
    json["source"]["config"]["apiKeyPhishing"] = "another-reporting-token".into();
    h.app.update(&id, json).await.unwrap();
    let report = run_once(&h, &id, Trigger::OnDemand, Some(DataType::Phishing)).await;
    assert!(report.detail.contains("phishing: polled"), "{report:?}");
    assert!(h.sim.reporting_requests().len() > 1);
}

/// Review (second) defect 3: a transient failure in the middle of a test's recipients
/// (here 503 on every try of its second page) fails the poll — retried by the next run —
/// and the next run goes on at that page: the first page is not asked for again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_the_middle_of_a_test_goes_on_at_that_page() {
    let h = phishing_harness().await;
    let big = h.sim.add_phishing_test(1_200);
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("mid-fail".into()))
        .await
        .unwrap();
    // The tests list (2 requests) and the first page of recipients pass; every try of
    // the second page answers 503.
    h.sim.fail_reporting_after(3, 503, 4);
    let first = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(first.outcome, Outcome::Failed, "{first:?}");
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let phishing = state.phishing.unwrap();
    assert_eq!(phishing.resume.map(|r| (r.pst_id, r.page)), Some((big, 2)));
    assert!(
        phishing.streak.is_some(),
        "a failure of the stream, retried"
    );
    assert_eq!(Received::of(&h.sink).recipient_messages(), 500);

    let second = run_once(&h, &id, Trigger::Schedule, None).await;
    assert!(second.detail.contains("phishing: polled"), "{second:?}");
    let pages: Vec<u32> = h
        .sim
        .reporting_requests()
        .iter()
        .filter(|r| r.path.contains(&format!("/{big}/")) && r.status == 200)
        .map(page_of)
        .collect();
    assert_eq!(pages, [1, 2, 3, 4], "page 1 not asked for again");
    let got = Received::of(&h.sink);
    got.assert_latest(&h.sim);
    got.assert_no_unchanged_resent();
}

/// Review (second) defects 4 and 5: a 4xx on one test's recipients stays with that test
/// — a health event names it, the other test is read, the poll completes — and the test
/// is not asked for again while its object is unchanged (the next day at the latest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_whose_recipients_are_refused_does_not_stop_the_others() {
    let h = phishing_harness().await;
    let refused = h.sim.add_phishing_test(5);
    let fine = h.sim.add_phishing_test(5);
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("refused".into()))
        .await
        .unwrap();
    // The tests list passes (2 requests); the first test's recipients answer 403 (the
    // tests list, asked again for one record, is still served: the test's answer).
    h.sim.fail_reporting_after(2, 403, 1);
    let first = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    assert!(first.detail.contains("phishing: polled"), "{first:?}");
    assert!(
        first.detail.contains(&format!("test {refused}")),
        "{first:?}"
    );
    let health = h.app.health(&id).await.unwrap();
    assert_eq!(health.len(), 1, "{health:?}");
    assert!(health[0].message.contains(&format!("test {refused}")));
    let got = Received::of(&h.sink);
    assert_eq!(got.recipient_messages(), 5, "the other test's recipients");
    assert!(
        got.recipients
            .values()
            .all(|m| m[0]["pst_id"].as_u64() == Some(fine))
    );

    let requests = h.sim.reporting_requests().len();
    let second = run_once(&h, &id, Trigger::OnDemand, Some(DataType::Phishing)).await;
    assert!(second.detail.contains("phishing: polled"), "{second:?}");
    let asked: Vec<String> = h.sim.reporting_requests()[requests..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        asked.iter().all(|p| !p.contains(&format!("/{refused}/"))),
        "{asked:?}"
    );
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    assert_eq!(
        state.lifecycle,
        knowbe4_source::domain::state::Lifecycle::Collecting
    );
}

/// Third and fourth reviews: a 401 on one test's recipients, with the tests list refused
/// too when asked again (one record), is a refused token — the source's answer: the poll
/// fails as a configuration error where it is (the test and its page kept), the stream
/// stops until the source is updated, and nothing is asked again meanwhile (a
/// deterministic answer is not retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_on_a_tests_recipients_stops_the_poll_where_it_is() {
    let h = phishing_harness().await;
    let first_test = h.sim.add_phishing_test(5);
    h.sim.add_phishing_test(5);
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("revoked".into()))
        .await
        .unwrap();
    h.sim.fail_reporting_after(2, 401, 2);
    let first = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(first.outcome, Outcome::Failed, "{first:?}");
    assert_eq!(
        first.health,
        Some(knowbe4_source::HealthKind::ThirdPartyConfigError),
        "{first:?}"
    );
    let asked: Vec<(String, u16)> = h
        .sim
        .reporting_requests()
        .iter()
        .map(|r| (r.path.clone(), r.status))
        .collect();
    assert_eq!(asked.len(), 4, "no retry of a 401: {asked:?}");
    assert_eq!(asked[3], ("/v1/phishing/security_tests".into(), 401));
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let phishing = state.phishing.unwrap();
    assert_eq!(
        phishing.resume.map(|r| (r.pst_id, r.page)),
        Some((first_test, 1))
    );
    assert!(phishing.stopped_config_version.is_some());
    assert_eq!(Received::of(&h.sink).recipient_messages(), 0);

    let second = run_once(&h, &id, Trigger::Schedule, None).await;
    // A source collecting only phishing tests is in Error (its only stream stopped).
    assert_eq!(second.outcome, Outcome::Skipped, "{second:?}");
    assert!(second.detail.contains("restart or update"), "{second:?}");
    assert_eq!(
        h.sim.reporting_requests().len(),
        4,
        "nothing asked while stopped"
    );
}

/// Fourth review: a tests-list page past the first that cannot be read (here a 400) ends
/// the list for that poll with a health event; the tests listed before it have their
/// recipients read (every poll failing on that page would read none), and the next poll
/// asks the page again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_tests_page_past_the_first_ends_the_list_and_the_recipients_are_read() {
    let h = phishing_harness().await;
    h.sim.add_phishing_test(5);
    h.sim.add_phishing_test(5);
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("cut".into()))
        .await
        .unwrap();
    h.sim.fail_reporting_after(1, 400, 1);
    let first = run_once(&h, &id, Trigger::Schedule, None).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    assert!(first.detail.contains("phishing: polled"), "{first:?}");
    let health = h.app.health(&id).await.unwrap();
    assert_eq!(health.len(), 1, "{health:?}");
    assert!(
        health[0].message.contains("page 2 could not be read"),
        "{health:?}"
    );
    let got = Received::of(&h.sink);
    assert_eq!(got.recipient_messages(), 10);
    got.assert_latest(&h.sim);

    let asked = h.sim.reporting_requests().len();
    let second = run_once(&h, &id, Trigger::OnDemand, Some(DataType::Phishing)).await;
    assert!(second.detail.contains("phishing: polled"), "{second:?}");
    let pages: Vec<u32> = h.sim.reporting_requests()[asked..]
        .iter()
        .filter(|r| !r.path.contains("/recipients"))
        .map(page_of)
        .collect();
    assert_eq!(pages, [1, 2], "the next poll asks page 2 again");
}

/// Fourth and fifth reviews: one test answering 503 run after run (each run's 4 tries)
/// cannot keep the others from being read, and is not blamed for an outage: after its
/// tries, one request for the tests list's first record tells the test's failure from
/// the account's. Its own failure: the poll reads the other tests, then fails (the test is
/// read again next run, after the others); an outage (the list refused too) counts
/// nothing. After 3 runs of its own failures it is set aside like a stuck test (a health
/// event; asked again when it changes, or in a day) and the poll completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_failing_run_after_run_is_read_last_then_set_aside() {
    let h = phishing_harness().await;
    let failing = h.sim.add_phishing_test(5);
    let fine = h.sim.add_phishing_test(5);
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("flaky".into()))
        .await
        .unwrap();
    let run = || {
        collect_source_types(
            h.app.run_context(),
            &id,
            deadline(60),
            Trigger::Schedule,
            None,
        )
    };
    let paths_since = |from: usize| -> Vec<String> {
        h.sim.reporting_requests()[from..]
            .iter()
            .map(|r| r.path.clone())
            .collect()
    };
    // Run 1: the list (2); every try of the first test's recipients fails (4); the list
    // answers the probe; the other test is read (2); the poll fails.
    h.sim.fail_reporting_after(2, 503, 4);
    let first = run().await;
    assert_eq!(first.outcome, Outcome::Failed, "{first:?}");
    let paths = paths_since(0);
    assert_eq!(paths.len(), 9, "{paths:?}");
    assert!(
        paths[2..6]
            .iter()
            .all(|p| p.contains(&format!("/{failing}/")))
    );
    assert_eq!(paths[6], "/v1/phishing/security_tests", "the probe");
    assert!(paths[7..].iter().all(|p| p.contains(&format!("/{fine}/"))));
    assert_eq!(Received::of(&h.sink).recipient_messages(), 5);
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let resume = state.phishing.unwrap().resume.unwrap();
    assert_eq!((resume.pst_id, resume.page), (failing, 1));

    // Runs 2 and 3: an outage (the probe fails too) counts nothing; then the test's own
    // second failure. The list is not asked again (the poll read it).
    for (outage, failures) in [(true, 5), (false, 4)] {
        let asked = h.sim.reporting_requests().len();
        h.sim.fail_reporting_after(0, 503, failures);
        let report = run().await;
        assert_eq!(
            report.outcome,
            Outcome::Failed,
            "outage {outage}: {report:?}"
        );
        let paths = paths_since(asked);
        assert_eq!(paths.len(), 5, "{paths:?}");
        assert!(
            paths[..4]
                .iter()
                .all(|p| p.contains(&format!("/{failing}/")))
        );
    }

    // Run 4: the third of its own failures sets the test aside; the poll completes.
    h.sim.fail_reporting_after(0, 503, 4);
    let fourth = run().await;
    assert_eq!(fourth.outcome, Outcome::Collected, "{fourth:?}");
    assert!(fourth.detail.contains("phishing: polled"), "{fourth:?}");
    assert!(fourth.detail.contains("1 tests unreadable"), "{fourth:?}");
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    let phishing = state.phishing.unwrap();
    assert!(phishing.resume.is_none() && phishing.poll_started.is_none());
    let health = h.app.health(&id).await.unwrap();
    assert!(
        health
            .iter()
            .any(|e| e.message.contains(&format!("test {failing}"))),
        "{health:?}"
    );
}

/// Fifth review: two tests answering 503 every time, and a third that answers: the
/// first run reads the third (each failing test costs its 4 tries and one request for the
/// tests list's first record), and after 3 runs both failing tests are set aside; the
/// poll completes. No run is stopped by one test's failure before the others are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failing_tests_do_not_keep_a_third_from_being_read() {
    let h = phishing_harness().await;
    let a = h.sim.add_phishing_test(3);
    let b = h.sim.add_phishing_test(3);
    let fine = h.sim.add_phishing_test(5);
    h.sim.fail_phishing_recipients(a, Some(503));
    h.sim.fail_phishing_recipients(b, Some(503));
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("two-flaky".into()))
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let report = collect_source_types(
            h.app.run_context(),
            &id,
            deadline(90),
            Trigger::Schedule,
            None,
        )
        .await;
        outcomes.push(report.outcome.clone());
        if outcomes.len() == 1 {
            let got = Received::of(&h.sink);
            assert_eq!(
                got.recipient_messages(),
                5,
                "the third test, in the first run"
            );
            assert!(
                got.recipients
                    .values()
                    .all(|m| m[0]["pst_id"].as_u64() == Some(fine))
            );
        }
        if outcomes.len() == 3 {
            assert!(report.detail.contains("2 tests unreadable"), "{report:?}");
        }
    }
    assert_eq!(
        outcomes,
        [Outcome::Failed, Outcome::Failed, Outcome::Collected]
    );
    let log = h.sim.reporting_requests();
    let on = |id: u64| {
        log.iter()
            .filter(|r| r.path.contains(&format!("/{id}/")))
            .count()
    };
    assert_eq!((on(a), on(b)), (12, 12), "4 tries a run, 3 runs");
    assert_eq!(on(fine), 2, "read once");
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    assert!(state.phishing.unwrap().poll_started.is_none());
}

/// A server ignoring `page` repeats a full page: the walk ends (what it read is
/// forwarded) and a health event says the rest of the list cannot be read this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_full_page_ends_the_walk_with_a_health_event() {
    let h = phishing_harness().await;
    h.sim.set_reporting_reading(
        knowbe4_source::testkit::sim::ReportingReading::by_name("page-ignored").unwrap(),
    );
    let test = h.sim.add_phishing_test(150);
    let id = h
        .app
        .create(middle_example(&h.sim.base_url()), Some("ignored".into()))
        .await
        .unwrap();
    let report = run_once(&h, &id, Trigger::Schedule, None).await;
    assert!(report.detail.contains("phishing: polled"), "{report:?}");
    // The tests list (one test: a short page, then the same again) and the recipients'
    // first page, then that page again.
    assert_eq!(h.sim.reporting_requests().len(), 4);
    assert_eq!(Received::of(&h.sink).recipient_messages(), 100);
    let health = h.app.health(&id).await.unwrap();
    assert_eq!(health.len(), 1, "{health:?}");
    assert_eq!(health[0].error_kind, "repeated_page");
    assert!(
        health[0]
            .message
            .contains(&format!("the recipients of test {test}")),
        "{health:?}"
    );
}
