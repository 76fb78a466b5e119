//! Issue 10, finding 3: a stored KnowBe4 base URL is checked again at the start of every
//! run, and a stored destination URL whenever it is used, with the rules of a new
//! configuration: a tampered state item (in DynamoDB or the local file) or a source
//! created while `KNOWBE4_ALLOW_CUSTOM_BASE_URL=1` never sends the key elsewhere.

use std::sync::Arc;

use knowbe4_source::HealthKind;
use knowbe4_source::app::App;
use knowbe4_source::run::{Outcome, collect_source};
use knowbe4_source::store::secrets_manager::SecretsManagerVault;

use crate::helpers::*;
use crate::loopback::*;

/// Replaces the `api_base` of a source's `CONFIG` item in DynamoDB (as anyone with
/// write access to the table could).
async fn tamper_api_base(h: &Harness, id: &str, api_base: &str) {
    let key = |v: &str| aws_sdk_dynamodb::types::AttributeValue::S(v.to_string());
    let item = h
        .dynamo
        .get_item()
        .table_name(&h.table)
        .key("pk", key(&format!("SOURCE#{id}")))
        .key("sk", key("CONFIG"))
        .send()
        .await
        .unwrap();
    let doc = item.item().unwrap()["doc"].as_s().unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(doc).unwrap();
    doc["spec"]["api_base"] = api_base.into();
    h.dynamo
        .update_item()
        .table_name(&h.table)
        .key("pk", key(&format!("SOURCE#{id}")))
        .key("sk", key("CONFIG"))
        .update_expression("SET #d = :d")
        .expression_attribute_names("#d", "doc")
        .expression_attribute_values(":d", key(&doc.to_string()))
        .send()
        .await
        .unwrap();
}

/// The deployed function's app (no `KNOWBE4_ALLOW_CUSTOM_BASE_URL`) on the harness's
/// table and secrets.
fn deployed_app(h: &Harness) -> App {
    let mut settings = test_settings(&h.prefix);
    settings.validation.allow_custom_base_url = false;
    App::new(
        Arc::clone(&h.app.store),
        knowbe4_source::app::Vault::SecretsManager(SecretsManagerVault::new(
            h.secrets.clone(),
            h.prefix.clone(),
        )),
        knowbe4_source::app::knowbe4_http_client().unwrap(),
        knowbe4_source::sink::DestinationConfig {
            format: knowbe4_source::sink::Format::Stdout,
            url: None,
            token: None,
        },
        settings,
    )
}

/// A state item whose `api_base` was edited to another host: the run refuses before the
/// key is sent (ThirdPartyConfigError), in DynamoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_base_url_in_dynamodb_is_refused_before_the_key_is_sent() {
    let (key, h) = harness_with_canary_key(10).await;
    let attacker = Server::ok().await;
    let id = h
        .app
        .create(
            source_json("https://training.knowbe4.com", &key, serde_json::json!({})),
            Some("tampered".into()),
        )
        .await
        .unwrap();
    tamper_api_base(&h, &id, &attacker.base).await;
    let report = collect_source(deployed_app(&h).run_context(), &id, deadline(20)).await;
    assert_eq!(report.outcome, Outcome::Failed, "{report:?}");
    assert_eq!(
        report.health,
        Some(HealthKind::ThirdPartyConfigError),
        "{report:?}"
    );
    assert!(report.detail.contains("baseURL"), "{report:?}");
    assert!(
        attacker.seen().is_empty(),
        "the key went to {:?}",
        attacker.seen()
    );
    // A source created while the switch was on (a loopback simulator) is refused too
    // once the switch is off.
    let sim_source = h
        .app
        .create(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("created-with-switch".into()),
        )
        .await
        .unwrap();
    let report = collect_source(deployed_app(&h).run_context(), &sim_source, deadline(20)).await;
    assert_eq!(
        report.health,
        Some(HealthKind::ThirdPartyConfigError),
        "{report:?}"
    );
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests().len());
}

/// The same in the local state file, with the real binary run as a deployment would
/// (no switch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_base_url_in_the_state_file_is_refused_before_the_key_is_sent() {
    let key = canary("key");
    let attacker = Server::ok().await;
    let cli = Cli::new(false, &[("FORWARD_FORMAT", "stdout")]);
    cli.create_ok(
        "t",
        "https://training.knowbe4.com",
        &key,
        serde_json::json!({}),
    )
    .await;
    let attacker_base = attacker.base.clone();
    cli.edit_state(|doc| doc["sources"]["t"]["spec"]["api_base"] = attacker_base.into());
    let ran = cli.run(&["collect", "--source", "t"]).await;
    assert_failed_and_unmoved(&cli, "t", &ran, "ThirdPartyConfigError").await;
    assert!(
        attacker.seen().is_empty(),
        "the key went to {:?}",
        attacker.seen()
    );
    assert!(!ran.stderr.contains(&key), "{ran:?}");
}

/// A stored destination URL edited to plain http: refused when used, before anything
/// is fetched or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_destination_url_is_refused_when_used() {
    let key = canary("key");
    let bearer = canary("bearer");
    let sim = sim(&key, 20).await;
    let cli = Cli::new(true, &[("FORWARD_FORMAT", "stdout")]);
    let created = cli
        .create(
            "dest",
            &source_json(
                &sim.base_url(),
                &key,
                serde_json::json!({"destination": {
                    "format": "ndjson", "url": "https://logs.example/in", "token": bearer}}),
            ),
        )
        .await;
    assert_eq!(created.code, Some(0), "{created:?}");
    // TEST-NET-1: unroutable, so nothing could arrive anyway; what counts is that the
    // run refuses before fetching.
    cli.edit_state(|doc| {
        doc["secrets"]["dest"]["destinationUrl"] = "http://192.0.2.1/in".into();
    });
    let ran = cli.run(&["collect", "--source", "dest"]).await;
    assert_failed_and_unmoved(&cli, "dest", &ran, "ThirdPartyConfigError").await;
    assert!(
        ran.stdout.contains("destination.url") || ran.stderr.contains("destination.url"),
        "{ran:?}"
    );
    assert!(sim.requests().is_empty(), "KnowBe4 was asked first");
}
