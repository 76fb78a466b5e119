//! Every payload in `events/` goes through the Lambda handler's parsing and the same
//! actions, in local mode, against the simulator.

use knowbe4_source::app::Action;
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};

use crate::helpers::{deadline, local_app};

fn payload(name: &str) -> serde_json::Value {
    let path = format!("{}/events/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payload_in_events_runs() {
    let sim = Simulator::spawn(SimConfig {
        api_key: "payload-key".into(),
        events: 120,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let sink = RecordingSink::spawn().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = local_app(dir.path(), &sink);

    // create.json names the real US region; point it at the simulator for the test.
    let mut create = payload("create.json");
    let config = &mut create["source"]["source"]["config"];
    config.as_object_mut().unwrap().remove("region");
    config["baseURL"] = sim.base_url().into();
    config["apiKey"] = "payload-key".into();
    config["firstFetchLookbackHours"] = 100.into();
    let created = app
        .handle(Action::from_payload(create).unwrap(), deadline(60))
        .await
        .unwrap();
    let id = created["sourceId"].as_str().unwrap().to_string();
    assert_eq!(id, "knowbe4-prod");

    let collected = app
        .handle(
            Action::from_payload(payload("collect.json")).unwrap(),
            deadline(60),
        )
        .await
        .unwrap();
    assert_eq!(collected["runs"][0]["outcome"], "collected", "{collected}");
    assert_eq!(sink.event_ids().len(), 120);

    sim.add_events(7, 0);
    let scheduled = app
        .handle(
            Action::from_payload(payload("scheduled.json")).unwrap(),
            deadline(60),
        )
        .await
        .unwrap();
    // The example's quota (50 seats, half of it) is scarce: a scheduled run right after
    // a head read has nothing due and saves its budget, and says so.
    assert_eq!(scheduled["runs"][0]["outcome"], "collected", "{scheduled}");
    assert_eq!(scheduled["runs"][0]["requests"], 0, "{scheduled}");
    assert!(
        scheduled["runs"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("nothing due"),
        "{scheduled}"
    );
    let again = app
        .handle(
            Action::from_payload(payload("collect.json")).unwrap(),
            deadline(60),
        )
        .await
        .unwrap();
    assert_eq!(again["runs"][0]["forwarded"], 7, "{again}");

    let status = app
        .handle(
            Action::from_payload(payload("status.json")).unwrap(),
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(status[0]["state"], "Collecting");
    let listed = app
        .handle(
            Action::from_payload(payload("list.json")).unwrap(),
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let health = app
        .handle(
            Action::from_payload(payload("health.json")).unwrap(),
            deadline(10),
        )
        .await
        .unwrap();
    assert!(health.as_array().unwrap().is_empty());

    let mut update = payload("update.json");
    update["source"]["source"]["config"]["baseURL"] = sim.base_url().into();
    update["source"]["source"]["config"]
        .as_object_mut()
        .unwrap()
        .remove("region");
    let updated = app
        .handle(Action::from_payload(update).unwrap(), deadline(10))
        .await
        .unwrap();
    assert_eq!(updated["updated"], true);
    let restarted = app
        .handle(
            Action::from_payload(payload("restart.json")).unwrap(),
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(restarted["restarted"], true);
    // After update (key kept) and restart the source still collects.
    sim.add_events(3, 0);
    let collected = app
        .handle(
            Action::from_payload(payload("collect.json")).unwrap(),
            deadline(60),
        )
        .await
        .unwrap();
    assert_eq!(collected["runs"][0]["forwarded"], 3, "{collected}");

    let deleted = app
        .handle(
            Action::from_payload(payload("delete.json")).unwrap(),
            deadline(10),
        )
        .await
        .unwrap();
    assert_eq!(deleted["deleted"], true);
    let listed = app
        .handle(
            Action::from_payload(payload("list.json")).unwrap(),
            deadline(10),
        )
        .await
        .unwrap();
    assert!(listed.as_array().unwrap().is_empty());
}

#[test]
fn unknown_or_incomplete_payloads_are_rejected_by_field() {
    for (payload, field) in [
        (serde_json::json!({"action": "explode"}), "action"),
        (serde_json::json!({"hello": 1}), "action"),
        (serde_json::json!({"action": "restart"}), "sourceId"),
        (
            serde_json::json!({"action": "collect", "sourceId": 5}),
            "sourceId",
        ),
        (serde_json::json!([1, 2]), "payload"),
    ] {
        let err = Action::from_payload(payload.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{payload}: {err}");
    }
}
