//! Shared fixtures: moto (DynamoDB + Secrets Manager), the simulator, a recording sink,
//! and an `App` wired to them.

use std::sync::Arc;
use std::time::Duration;

use knowbe4_source::app::{App, Settings, Vault};
use knowbe4_source::config::ValidationOptions;
use knowbe4_source::sink::{DestinationConfig, Format};
use knowbe4_source::store::dynamo::DynamoStore;
use knowbe4_source::store::file::FileStore;
use knowbe4_source::store::secrets_manager::SecretsManagerVault;
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};
use secrecy::SecretString;
use tokio::time::Instant;

/// The moto endpoint; the suite refuses to run without it rather than skip.
pub fn aws_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: these tests need moto's server. Run ./scripts/test.sh")
    })
}

/// An SDK config pointed at moto.
pub async fn aws_config() -> aws_config::SdkConfig {
    aws_endpoint();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await
}

/// Settings suited to tests: short margins and timeouts, custom base URLs allowed.
pub fn test_settings(prefix: &str) -> Settings {
    Settings {
        deadline_margin: Duration::from_secs(1),
        schedule_interval_secs: 300,
        concurrency: 4,
        cli_run_timeout: Duration::from_secs(120),
        request_timeout: Duration::from_secs(5),
        validation: ValidationOptions {
            allow_custom_base_url: true,
            key_optional: false,
        },
        secret_prefix: prefix.to_string(),
        max_in_flight: 6,
        lease_ttl: Duration::from_secs(120),
        metrics: knowbe4_source::metrics::MetricsOutput::Off,
    }
}

/// Everything one test needs, against moto.
pub struct Harness {
    /// The app under test (DynamoDB + Secrets Manager mode).
    pub app: App,
    /// The KnowBe4 simulator.
    pub sim: Simulator,
    /// The destination.
    pub sink: RecordingSink,
    /// The table this test created.
    pub table: String,
    /// Direct DynamoDB access, to inspect items.
    pub dynamo: aws_sdk_dynamodb::Client,
    /// Direct Secrets Manager access.
    pub secrets: aws_sdk_secretsmanager::Client,
    /// This test's secret name prefix.
    pub prefix: String,
}

/// A unique name for tables and secret prefixes.
pub fn unique(name: &str) -> String {
    format!(
        "{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A fresh canary secret: `canary-<label>-<random>`, unlikely to appear by accident.
pub fn canary(label: &str) -> String {
    format!("canary-{label}-{}", uuid::Uuid::new_v4().simple())
}

/// A [`harness`] whose simulator holds `events` events and accepts a fresh canary key;
/// returns the key with it.
pub async fn harness_with_canary_key(events: usize) -> (String, Harness) {
    let key = canary("key");
    let h = harness(SimConfig {
        api_key: key.clone(),
        events,
        ..SimConfig::default()
    })
    .await;
    (key, h)
}

/// Starts the simulator and sink, creates a table in moto, builds the app.
pub async fn harness(sim: SimConfig) -> Harness {
    let config = aws_config().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&config);
    let secrets = aws_sdk_secretsmanager::Client::new(&config);
    let table = unique("knowbe4-test");
    DynamoStore::create_table(&dynamo, &table)
        .await
        .expect("table created in moto");
    let prefix = format!("{}/", unique("kb4"));
    let sim = Simulator::spawn(sim).await.expect("simulator");
    let sink = RecordingSink::spawn().await.expect("sink");
    let app = App::new(
        Arc::new(DynamoStore::new(dynamo.clone(), table.clone())),
        Vault::SecretsManager(SecretsManagerVault::new(secrets.clone(), prefix.clone())),
        knowbe4_source::app::knowbe4_http_client().expect("a client"),
        DestinationConfig {
            format: Format::Sumo,
            url: Some(SecretString::from(sink.url())),
            token: None,
        },
        test_settings(&prefix),
    );
    Harness {
        app,
        sim,
        sink,
        table,
        dynamo,
        secrets,
        prefix,
    }
}

/// An app in local mode (state file), for the same simulator and sink.
pub fn local_app(dir: &std::path::Path, sink: &RecordingSink) -> App {
    let file = FileStore::new(dir.join("state.json"));
    App::new(
        Arc::new(file.clone()),
        Vault::Local(file),
        knowbe4_source::app::knowbe4_http_client().expect("a client"),
        DestinationConfig {
            format: Format::Ndjson,
            url: Some(SecretString::from(sink.url())),
            token: None,
        },
        test_settings("unused/"),
    )
}

/// The hosted source JSON for the simulator, with `extra` merged into `config`.
pub fn source_json(base_url: &str, key: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut config = serde_json::json!({
        "name": "KnowBe4 test",
        "category": "security/knowbe4",
        "fields": {"_siemForward": true, "team": "secops"},
        "baseURL": base_url,
        "apiKey": key,
        "dailyRequestLimit": 100000,
        "firstFetchLookbackHours": 200
    });
    if let serde_json::Value::Object(extra) = extra {
        for (k, v) in extra {
            config[k] = v;
        }
    }
    serde_json::json!({
        "api.version": "v1",
        "source": {"config": config, "schemaRef": {"type": "KnowBe4"}, "sourceType": "Universal"}
    })
}

/// A deadline `secs` from now.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Every item of the table, each rendered as text (to look for secrets).
pub async fn table_dump(h: &Harness) -> Vec<String> {
    let out = h
        .dynamo
        .scan()
        .table_name(&h.table)
        .send()
        .await
        .expect("scan");
    out.items().iter().map(|item| format!("{item:?}")).collect()
}

/// Ids in `sink` that appear more than once.
pub fn duplicates(ids: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.iter()
        .filter(|id| !seen.insert(id.as_str()))
        .cloned()
        .collect()
}

/// Asserts no one-second window of the simulator's log holds more than four requests.
pub fn assert_rate_respected(sim: &Simulator) {
    let mut times: Vec<u64> = sim.requests().iter().map(|r| r.at_ms).collect();
    times.sort_unstable();
    for w in times.windows(5) {
        assert!(
            w[4] - w[0] >= 1000,
            "five requests within {} ms: {w:?}",
            w[4] - w[0]
        );
    }
    assert_eq!(sim.stats().rate_violations, 0);
}

/// Waits, when fewer than `needed_secs` remain of the UTC day, until the next day has
/// begun: a test that counts a daily ledger or relies on a daily limit must not straddle
/// 00:00 UTC, whatever time CI runs it.
pub async fn clear_of_midnight(needed_secs: u64) {
    let now = time::OffsetDateTime::now_utc();
    let into_day =
        u64::from(now.hour()) * 3_600 + u64::from(now.minute()) * 60 + u64::from(now.second());
    let left = 86_400 - into_day;
    if left < needed_secs {
        tokio::time::sleep(std::time::Duration::from_secs(left + 1)).await;
    }
}
