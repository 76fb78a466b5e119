//! One KnowBe4 account, one budget: sources that share a key share the 4 requests per
//! second and the daily quota, whichever process or invocation collects them.

use std::collections::HashSet;
use std::process::Command;

use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{Reading, SimConfig, Simulator};

use crate::helpers::*;

/// Runs the binary in local mode on `state`, or against moto's DynamoDB + Secrets
/// Manager when `table` is given.
fn binary(state: &std::path::Path, table: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_knowbe4-source"));
    command
        .args(args)
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
        .env("FORWARD_FORMAT", "ndjson")
        .env("FORWARD_URL", "http://127.0.0.1:9/unused")
        .env("RUST_LOG", "warn");
    match table {
        Some(table) => {
            command
                .env("STATE_TABLE", table)
                .env("SECRET_PREFIX", format!("{table}/sources/"))
                .env_remove("STATE_FILE");
        }
        None => {
            command.env_remove("STATE_TABLE").env("STATE_FILE", state);
        }
    }
    command
}

/// A source of the simulator's account forwarding to `sink`, with `limit` requests a day.
fn source(sim: &Simulator, key: &str, sink: &RecordingSink, limit: u32) -> serde_json::Value {
    source_json(
        &sim.base_url(),
        key,
        serde_json::json!({
            "dailyRequestLimit": limit,
            "destination": {"format": "ndjson", "url": sink.url()},
        }),
    )
}

fn create(state: &std::path::Path, table: Option<&str>, id: &str, json: &serde_json::Value) {
    let file = state.with_file_name(format!("{id}.json"));
    std::fs::write(&file, json.to_string()).unwrap();
    let out = binary(
        state,
        table,
        &[
            "sources",
            "create",
            "--file",
            file.to_str().unwrap(),
            "--id",
            id,
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One round: every source collected at once, each by its own process.
async fn collect_all_at_once(state: &std::path::Path, table: Option<&str>, sources: usize) {
    let children: Vec<_> = (0..sources)
        .map(|i| {
            binary(state, table, &["collect", "--source", &format!("src-{i}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(status.success());
    }
}

/// `sources` sources on one account, collected three times by as many concurrent
/// processes, then once more after their limit was lowered to what the account already
/// used today; checks the account's limits as KnowBe4 (the simulator) saw them. The
/// limits are chosen so that nothing depends on the time of day (a run's allowance grows
/// through the UTC day).
///
/// Each call plays one reading of the API's unconfirmed paging details, so the four cases
/// cover {count per page, per list} × {pages of 50, 100}; 1,013 events fill neither.
async fn shared_account(table: Option<&str>, sources: usize, reading: Reading) {
    let key = "shared-account-key";
    let sim = Simulator::spawn(SimConfig {
        api_key: key.into(),
        events: 1_013,
        span_hours: 48,
        reading,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let mut sinks = Vec::new();
    for i in 0..sources {
        let sink = RecordingSink::spawn().await.unwrap();
        create(
            &state,
            table,
            &format!("src-{i}"),
            &source(&sim, key, &sink, 100_000),
        );
        sinks.push(sink);
    }
    for _ in 0..3 {
        collect_all_at_once(&state, table, sources).await;
    }
    let context = format!("{sources} sources, table {table:?}, {reading}");
    // The account's rate, as the server counted it: never more than 4 in any second.
    assert_rate_respected(&sim);
    let refused = sim.requests().iter().filter(|r| r.status == 429).count();
    assert_eq!(refused, 0, "{context}: 429s");
    // Sharing is fair: every source's processes got requests.
    let runs: HashSet<String> = sim
        .requests()
        .into_iter()
        .filter_map(|r| r.run_id)
        .collect();
    assert!(runs.len() >= sources, "{context}: {runs:?}");
    // Nothing lost: every source forwarded every event, once.
    for (i, sink) in sinks.iter().enumerate() {
        let ids = sink.event_ids();
        assert!(duplicates(&ids).is_empty(), "{context}: src-{i} duplicates");
        assert_eq!(ids.len(), 1_013, "{context}: src-{i}");
    }

    // The account's quota: lower every source's limit to what the account used today
    // (the smallest member's limit is the account's); new events wait, and no process
    // sends a single request more.
    let calls = sim.stats().quota_used_today;
    let limit = u32::try_from(calls).unwrap();
    for (i, sink) in sinks.iter().enumerate() {
        let file = state.with_file_name(format!("src-{i}.json"));
        std::fs::write(&file, source(&sim, key, sink, limit).to_string()).unwrap();
        let out = binary(
            &state,
            table,
            &[
                "sources",
                "update",
                &format!("src-{i}"),
                "--file",
                file.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    sim.add_events(60, 0);
    collect_all_at_once(&state, table, sources).await;
    assert_eq!(
        sim.stats().quota_used_today,
        calls,
        "{context}: a request past the account's limit of {limit}"
    );
    assert_rate_respected(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_sharing_a_key_share_the_rate_and_the_quota_across_processes_local_file() {
    let readings = Reading::core();
    shared_account(None, 2, readings[0]).await;
    shared_account(None, 4, readings[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_sharing_a_key_share_the_rate_and_the_quota_across_invocations_dynamodb() {
    let config = aws_config().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&config);
    let readings = Reading::core();
    for (sources, reading) in [(2, readings[2]), (4, readings[3])] {
        let table = unique("kb4-accounts");
        knowbe4_source::store::dynamo::DynamoStore::create_table(&dynamo, &table)
            .await
            .unwrap();
        shared_account(Some(&table), sources, reading).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_source_for_the_same_account_and_destination_is_refused() {
    let h = harness(SimConfig::default()).await;
    let key = "sim-key";
    let other = RecordingSink::spawn().await.unwrap();
    let json = source(&h.sim, key, &h.sink, 100);
    let first = h
        .app
        .create(json.clone(), Some("first".into()))
        .await
        .unwrap();
    let err = h
        .app
        .create(json.clone(), Some("second".into()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("source first already collects"), "{err}");
    assert!(err.contains("--allow-duplicate"), "{err}");
    assert!(
        h.app.status(Some("second")).await.is_err(),
        "nothing stored"
    );
    // Insisting works; so does the same account into another destination.
    h.app
        .create_with(json, Some("second".into()), true)
        .await
        .unwrap();
    h.app
        .create(source(&h.sim, key, &other, 50), Some("third".into()))
        .await
        .unwrap();
    // After a run of each, status shows the shared budget and that the limits differ.
    for id in [&first, "second", "third"] {
        knowbe4_source::run::collect_source(h.app.run_context(), id, deadline(60)).await;
    }
    let status = h.app.status(Some("third")).await.unwrap().remove(0);
    assert_eq!(status.account_sources, vec!["first", "second", "third"]);
    assert_eq!(status.daily_request_limit, 50, "the smallest limit wins");
    let note = status.account_note.unwrap();
    assert!(
        note.contains("first: 100") && note.contains("third: 50"),
        "{note}"
    );
    let first_status = h.app.status(Some("first")).await.unwrap().remove(0);
    assert_eq!(first_status.quota_used_today, status.quota_used_today);
    assert_eq!(first_status.account, status.account);
    let account = status.account.unwrap();
    assert!(!account.contains(key));
}
