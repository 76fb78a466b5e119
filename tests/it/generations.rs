//! Issue 12: the hosted source's three configuration generations, as users write them,
//! against moto, the simulator and the recording sink: each example collects what it
//! names (the oldest generation, `baseURL` + `apiKey`, is every other test's source).

use knowbe4_source::error::Error;
use knowbe4_source::run::{Outcome, collect_source};
use secrecy::ExposeSecret;

use crate::helpers::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/knowbe4-public");

/// The newest generation's example (`example.json`), with `extra` merged into its config
/// and the masked keys replaced.
fn newest_example(extra: serde_json::Value) -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}/example.json")).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let config = &mut doc["source"]["config"];
    config["apiKeyPhishing"] = "reporting-token-for-this-test".into();
    config["apiKeyEvent"] = "event-key-for-this-test".into();
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            config.as_object_mut().unwrap().remove(k);
        } else {
            config[k] = v.clone();
        }
    }
    doc
}

fn config_field(err: &Error) -> &str {
    match err {
        Error::InvalidConfig { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

/// Nothing of a refused configuration is stored: no item, no secret.
async fn nothing_stored(h: &Harness) {
    assert!(table_dump(h).await.is_empty());
    let secrets = h.secrets.list_secrets().send().await.unwrap();
    assert!(
        secrets
            .secret_list()
            .iter()
            .all(|s| !s.name().unwrap_or_default().starts_with(&h.prefix)),
        "a secret was stored for a refused config"
    );
}

/// The newest generation with user events only (the example with `collectPhishingTests`
/// false, its User Event host pointed at the simulator) collects user events with
/// `apiKeyEvent`; the Reporting token it no longer needs is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_generation_collects_user_events_with_api_key_event() {
    let h = harness(knowbe4_source::testkit::sim::SimConfig {
        api_key: "event-key-for-this-test".into(),
        events: 120,
        ..Default::default()
    })
    .await;
    let json = newest_example(serde_json::json!({
        "collectPhishingTests": false,
        "baseURL": h.sim.base_url(),
        "dailyRequestLimit": 100000,
        "firstFetchLookbackHours": 200,
    }));
    let id = h.app.create(json, Some("newest".into())).await.unwrap();
    let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert_eq!(h.sink.event_ids().len(), 120, "{report:?}");

    let record = h.app.store.get_source(&id).await.unwrap().unwrap();
    assert_eq!(
        record.spec.generation,
        knowbe4_source::config::Generation::Newest
    );
    assert!(record.spec.collect_events && record.spec.phishing.is_none());
    let secrets = h.app.source_secrets(&record, true).await.unwrap();
    assert_eq!(
        secrets.api_key.unwrap().expose_secret(),
        "event-key-for-this-test"
    );
    assert!(secrets.api_key_phishing.is_none());
    for item in table_dump(&h).await {
        assert!(
            !item.contains("for-this-test"),
            "a key in a state item: {item}"
        );
    }
}

/// The config of a Terraform example (`config = jsonencode({...})`).
fn tf_config(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{file}")).unwrap();
    let start = text.find("jsonencode(").unwrap() + "jsonencode(".len();
    let end = start + text[start..].find("})").unwrap() + 1;
    serde_json::from_str(&text[start..end]).unwrap()
}

/// Creates the example `doc` (its hosts pointed at the simulator, its masked keys
/// replaced) and runs it once: what arrives is what the example names.
async fn collects_what_it_names(doc: serde_json::Value, events: bool) {
    use crate::phishing::{REPORTING_TOKEN, Received, assert_reporting_limits};
    let h = harness(knowbe4_source::testkit::sim::SimConfig {
        api_key: "event-key-for-this-test".into(),
        events: 20,
        ..Default::default()
    })
    .await;
    h.sim.add_phishing_test(5);
    h.sim.add_errored_phishing_test();
    h.sim.progress_phishing(None, 3);
    let mut doc = doc;
    let config = &mut doc["source"]["config"];
    for key in ["apiKey", "apiKeyPhishing"] {
        if config.get(key).is_some() {
            config[key] = REPORTING_TOKEN.into();
        }
    }
    if config.get("apiKeyEvent").is_some() {
        config["apiKeyEvent"] = "event-key-for-this-test".into();
        config["baseURL"] = h.sim.base_url().into();
        config["dailyRequestLimit"] = 100000.into();
        config["firstFetchLookbackHours"] = 200.into();
    }
    config["reportingBaseURL"] = h.sim.base_url().into();
    let id = h.app.create(doc, None).await.unwrap();
    let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    let got = Received::of(&h.sink);
    got.assert_latest(&h.sim);
    assert_eq!(got.tests.len(), 2);
    assert_eq!(got.recipient_messages(), 5);
    if events {
        assert_eq!(got.events.len(), 20, "{report:?}");
    } else {
        assert!(got.events.is_empty());
        assert!(h.sim.requests().is_empty(), "no User Event API request");
    }
    assert_reporting_limits(&h.sim);
    let state = h.app.store.load_state(&id).await.unwrap().unwrap().value;
    assert_eq!(
        state.lifecycle,
        knowbe4_source::domain::state::Lifecycle::Collecting
    );
    for item in table_dump(&h).await {
        assert!(
            !item.contains("for-this-test") && !item.contains(REPORTING_TOKEN),
            "a key in a state item: {item}"
        );
    }
}

/// The newest generation's JSON example as written (phishing tests and user events)
/// collects both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_json_example_collects_phishing_tests_and_user_events() {
    collects_what_it_names(newest_example(serde_json::json!({})), true).await;
}

/// The newest generation's Terraform example (`example.tf`) collects both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_terraform_example_collects_phishing_tests_and_user_events() {
    let doc = serde_json::json!({"api.version": "v1", "source": {"config": tf_config("example.tf"),
        "schemaRef": {"type": "KnowBe4 KMSAT"}}});
    collects_what_it_names(doc, true).await;
}

/// The middle generation's example (`dataTypes: ["phishingTests"]`, `apiKey` a Reporting
/// token) collects phishing tests and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_middle_generation_example_collects_phishing_tests_only() {
    let doc = serde_json::json!({"api.version": "v1", "source": {
        "config": tf_config("example.older-dataTypes.tf"),
        "schemaRef": {"type": "KnowBe4 KMSAT"}}});
    collects_what_it_names(doc, false).await;
}

/// A mix of two generations is refused naming both, through the Lambda payload too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_generations_is_refused_through_the_payload() {
    let (key, h) = harness_with_canary_key(0).await;
    let mixed = source_json(
        &h.sim.base_url(),
        &key,
        serde_json::json!({"apiKeyEvent": "e", "collectExternalEvents": true}),
    );
    let action = knowbe4_source::app::Action::from_payload(
        serde_json::json!({"action": "create", "source": mixed}),
    )
    .unwrap();
    let err = h.app.handle(action, deadline(30)).await.unwrap_err();
    assert_eq!(config_field(&err), "source.config.apiKey");
    assert!(err.to_string().contains("apiKeyEvent"), "{err}");
    assert!(!err.to_string().contains(&key), "{err}");
    nothing_stored(&h).await;
}

/// An oldest-generation source updated to the newest generation (user events only, the
/// same User Event host, `apiKeyEvent` left out) keeps its key and goes on collecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_to_the_newest_generation_keeps_the_events_key() {
    let (key, h) = harness_with_canary_key(30).await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("moving-up".into()),
        )
        .await
        .unwrap();
    let first = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");

    let newest = newest_example(serde_json::json!({
        "collectPhishingTests": false,
        "apiKeyPhishing": null,
        "apiKeyEvent": null,
        "baseURL": h.sim.base_url(),
        "dailyRequestLimit": 100000,
    }));
    h.app.update(&id, newest).await.unwrap();
    h.sim.add_events(5, 0);
    let second = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(second.outcome, Outcome::Collected, "{second:?}");
    assert_eq!(h.sink.event_ids().len(), 35, "{second:?}");
    let record = h.app.store.get_source(&id).await.unwrap().unwrap();
    let secrets = h.app.source_secrets(&record, true).await.unwrap();
    assert_eq!(secrets.api_key.unwrap().expose_secret(), key);
}
