//! Tests of the simulator over real HTTP on loopback.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

const KEY: &str = "sim-key";

/// A config without rate enforcement, for tests that are not about the rate, playing the
/// reading where `per_page=100` is honoured and `count` is the list total (the tests of
/// the other readings say so).
fn config(events: usize) -> SimConfig {
    SimConfig {
        events,
        enforce_rate_limit: false,
        reading: Reading {
            max_per_page: 100,
            count_mode: CountMode::Total,
            ..Reading::default()
        },
        ..SimConfig::default()
    }
}

async fn start(config: SimConfig) -> Simulator {
    Simulator::spawn(config).await.expect("simulator starts")
}

/// `GET /events?<query>` with the right key: (status, parsed body or Null).
async fn list(client: &reqwest::Client, sim: &Simulator, query: &str) -> (u16, Value) {
    let response = client
        .get(format!("{}/events?{query}", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn ids_of(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .expect("data is an array")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

/// Walks every page of the default order and returns the ids in order.
async fn walk(client: &reqwest::Client, sim: &Simulator, per_page: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page = 1;
    loop {
        let (status, body) = list(client, sim, &format!("page={page}&per_page={per_page}")).await;
        assert_eq!(status, 200);
        ids.extend(ids_of(&body));
        match body["meta"]["next_page"].as_u64() {
            Some(next) => page = next,
            None => return ids,
        }
    }
}

#[tokio::test]
async fn paging_covers_every_event_once_newest_first() {
    let sim = start(config(253)).await;
    let client = reqwest::Client::new();
    let ids = walk(&client, &sim, 100).await;
    assert_eq!(ids.len(), 253);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 253, "no repeats");
    assert_eq!(ids, sim.event_ids(), "the oracle lists the same order");

    let (_, body) = list(&client, &sim, "page=1&per_page=100").await;
    let times: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["occurred_date"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let meta = &body["meta"];
    assert_eq!(meta["count"], 253);
    assert_eq!(meta["total_pages"], 3);
    assert_eq!(meta["current_page"], 1);
    assert_eq!(meta["next_page"], 2);
    assert_eq!(meta["prev_page"], Value::Null);
    assert_eq!(meta["is_first_page"], true);
    assert_eq!(meta["is_last_page"], false);

    let (_, last) = list(&client, &sim, "page=3&per_page=100").await;
    assert_eq!(last["data"].as_array().unwrap().len(), 53);
    assert_eq!(last["meta"]["next_page"], Value::Null);
    assert_eq!(last["meta"]["prev_page"], 2);
    assert_eq!(last["meta"]["is_last_page"], true);

    let (status, beyond) = list(&client, &sim, "page=4&per_page=100").await;
    assert_eq!(status, 200);
    assert_eq!(beyond["data"], Value::Array(vec![]));
    assert_eq!(beyond["meta"]["is_out_of_range"], true);
    sim.shutdown().await;
}

#[tokio::test]
async fn per_page_defaults_to_50_and_clamps_at_100_when_100_is_honoured() {
    let sim = start(config(300)).await;
    let client = reqwest::Client::new();
    let (_, body) = list(&client, &sim, "").await;
    assert_eq!(body["data"].as_array().unwrap().len(), 50);
    assert_eq!(body["meta"]["limit_value"], 50);
    let (_, body) = list(&client, &sim, "per_page=500").await;
    assert_eq!(body["data"].as_array().unwrap().len(), 100);
    assert_eq!(body["meta"]["limit_value"], 100);
    assert_eq!(body["meta"]["total_pages"], 3);
}

#[tokio::test]
async fn other_orders_are_deterministic() {
    let sim = start(config(120)).await;
    let client = reqwest::Client::new();
    let (_, asc) = list(
        &client,
        &sim,
        "per_page=100&order_by=occurred_date&order_direction=asc",
    )
    .await;
    let mut expected = sim.event_ids();
    expected.reverse();
    assert_eq!(ids_of(&asc), expected[..100]);

    let (_, by_id) = list(
        &client,
        &sim,
        "per_page=100&order_by=id&order_direction=asc",
    )
    .await;
    let ids = ids_of(&by_id);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let (_, by_type) = list(&client, &sim, "per_page=100&order_by=event_type").await;
    let names: Vec<&str> = by_type["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"]["name"].as_str().unwrap())
        .collect();
    assert!(names.windows(2).all(|w| w[0] <= w[1]));
}

#[tokio::test]
async fn events_look_like_knowbe4_events() {
    let sim = start(config(60)).await;
    let client = reqwest::Client::new();
    let (_, body) = list(&client, &sim, "per_page=60").await;
    for event in body["data"].as_array().unwrap() {
        assert_eq!(event["id"].as_str().unwrap().len(), 36);
        assert!(event["account_id"].is_u64());
        assert!(event["user"]["email"].as_str().unwrap().contains('@'));
        assert!(event["user"]["id"].is_u64());
        assert!(event["user"]["archived"].is_boolean());
        for key in ["external_id", "source", "description"] {
            assert!(event[key].is_string() || event[key].is_null(), "{key}");
        }
        let at = event["occurred_date"].as_str().unwrap();
        assert_eq!(at.len(), 24, "{at}");
        assert_eq!(&at[19..20], ".");
        assert!(at.ends_with('Z'));
        assert!(crate::domain::event::EventTime::parse(at).is_some());
        assert!(event["risk"]["level"].as_i64().unwrap().abs() <= 10);
        assert!(event["metadata"].is_object() || event["metadata"].is_null());
        assert!(event["event_type"]["name"].is_string());
    }

    let id = sim.event_ids()[7].clone();
    let one: Value = client
        .get(format!("{}/events/{id}", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["data"]["id"], id.as_str());
    assert_eq!(
        one["data"], body["data"][7],
        "the same event serialises the same way"
    );

    let types: Value = client
        .get(format!("{}/event_types", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(types["data"].as_array().unwrap().len() >= 5);
}

#[tokio::test]
async fn same_seed_same_ids_and_some_ties() {
    let a = start(config(2000)).await;
    let b = start(config(2000)).await;
    let (mut ids_a, mut ids_b) = (a.event_ids(), b.event_ids());
    ids_a.sort();
    ids_b.sort();
    assert_eq!(ids_a, ids_b);

    let state = server::lock(&a.shared);
    let mut seen = std::collections::HashMap::new();
    for (at, _) in state.by_time_keys() {
        *seen.entry(at).or_insert(0) += 1;
    }
    let tied: usize = seen.values().filter(|n| **n > 1).sum();
    assert!(
        (20..=120).contains(&tied),
        "{tied} of 2000 events share a time"
    );
}

#[tokio::test]
async fn wrong_or_missing_key_is_refused() {
    let sim = start(config(10)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/events", sim.base_url());
    let wrong = client.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert!(body["message"].is_string());
    let missing = client.get(&url).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 401);
    let records = sim.requests();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| !r.authorized && r.status == 401));

    let sim500 = start(SimConfig {
        wrong_key_status: 500,
        ..config(10)
    })
    .await;
    let url = format!("{}/events", sim500.base_url());
    let wrong = client.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 500);
}

#[tokio::test]
async fn fifth_request_within_a_second_is_rate_limited() {
    let sim = start(SimConfig {
        events: 10,
        ..SimConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    for _ in 0..4 {
        assert_eq!(list(&client, &sim, "").await.0, 200);
    }
    let response = client
        .get(format!("{}/events", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(response.status().as_u16(), 429);
    let text = response.text().await.unwrap();
    assert!(text.contains("Rate limit exceeded"), "{text}");
    assert!(!text.contains("Limit Exceeded"), "not the quota answer");
    assert_eq!(sim.stats().rate_violations, 1);

    // Every arrival counts in the window, the refused one too: wait it out.
    tokio::time::sleep_until((started + Duration::from_millis(1150)).into()).await;
    assert_eq!(list(&client, &sim, "").await.0, 200);
    let stats = sim.stats();
    assert_eq!(stats.requests, 6);
    assert_eq!(stats.served_ok, 5);
    assert_eq!(stats.rate_violations, 1);
}

#[tokio::test]
async fn unenforced_rate_still_counts_violations() {
    let sim = start(config(10)).await;
    let client = reqwest::Client::new();
    for _ in 0..6 {
        assert_eq!(list(&client, &sim, "").await.0, 200);
    }
    assert_eq!(sim.stats().rate_violations, 2);
}

#[tokio::test]
async fn daily_quota_counts_every_call() {
    let sim = start(SimConfig {
        daily_quota: Some(3),
        ..config(10)
    })
    .await;
    let client = reqwest::Client::new();
    let url = format!("{}/events", sim.base_url());
    assert_eq!(list(&client, &sim, "").await.0, 200);
    let wrong = client.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401, "failed calls count too");
    assert_eq!(list(&client, &sim, "").await.0, 200);
    let over = client.get(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(over.status().as_u16(), 429);
    assert!(over.text().await.unwrap().contains("Limit Exceeded"));
    assert_eq!(sim.stats().quota_used_today, 4);
}

#[tokio::test]
async fn added_deleted_and_backdated_events_show_in_pages() {
    let sim = start(config(150)).await;
    let client = reqwest::Client::new();
    let before = sim.event_ids();

    let fresh = sim.add_events(3, 0);
    let (_, first) = list(&client, &sim, "per_page=100").await;
    let top: HashSet<String> = ids_of(&first)[..3].iter().cloned().collect();
    assert_eq!(
        top,
        fresh.iter().cloned().collect(),
        "new events come first"
    );

    let old = sim.add_events(2, 365 * 86_400);
    let (_, last) = list(&client, &sim, "page=2&per_page=100").await;
    let tail = ids_of(&last);
    let bottom: HashSet<String> = tail[tail.len() - 2..].iter().cloned().collect();
    assert_eq!(
        bottom,
        old.iter().cloned().collect(),
        "backdated events go last"
    );

    let oldest = OffsetDateTime::now_utc() - time::Duration::days(400);
    let between = sim.add_events_between(4, oldest, oldest + time::Duration::hours(1));
    let all = sim.event_ids();
    let oldest_four: HashSet<&String> = all[all.len() - 4..].iter().collect();
    assert_eq!(
        oldest_four,
        between.iter().collect(),
        "oldest events list last"
    );

    let gone = sim.delete_events(5);
    assert_eq!(gone.len(), 5);
    let walked = walk(&client, &sim, 100).await;
    assert_eq!(walked.len(), 150 + 3 + 2 + 4 - 5);
    assert!(gone.iter().all(|id| !walked.contains(id)));
    assert_eq!(walked, sim.event_ids());

    sim.delete_ids(&before[..2]);
    let url = format!("{}/events/{}", sim.base_url(), before[0]);
    let missing = client.get(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    let url = format!("{}/events/{}", sim.base_url(), before[3]);
    let deleted = client.delete(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    assert!(!sim.event_ids().contains(&before[3]));
    let unauthorized = client.delete(&url).send().await.unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);
}

#[tokio::test]
async fn status_faults_are_served_then_cleared() {
    let sim = start(config(20)).await;
    let client = reqwest::Client::new();
    sim.inject(Fault::Status(503), 2);
    sim.inject(Fault::StatusRetryAfter(429, 7), 1);
    assert_eq!(list(&client, &sim, "").await.0, 503);
    let (status, body) = list(&client, &sim, "").await;
    assert_eq!(status, 503);
    assert!(body["message"].is_string(), "JSON error body");
    let response = client
        .get(format!("{}/events", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(list(&client, &sim, "").await.0, 200);
    let statuses: Vec<u16> = sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 429, 200]);
    assert_eq!(sim.stats().served_ok, 1);
}

#[tokio::test]
async fn body_faults_break_the_page_as_described() {
    let sim = start(config(120)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/events?per_page=10", sim.base_url());
    let get = || client.get(&url).bearer_auth(KEY).send();

    sim.inject(Fault::Malformed, 1);
    let response = get().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    assert!(text.starts_with(r#"{"data":["#));
    assert!(serde_json::from_str::<Value>(&text).is_err());

    sim.inject(Fault::Html, 1);
    let response = get().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(response.text().await.unwrap().contains("<html>"));

    sim.inject(Fault::WrongTypes, 1);
    let body: Value = get().await.unwrap().json().await.unwrap();
    assert!(body["data"].is_object());

    sim.inject(Fault::MissingMeta, 1);
    let body: Value = get().await.unwrap().json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 10);
    assert!(body.get("meta").is_none());

    sim.inject(Fault::EmptyPage, 1);
    let body: Value = get().await.unwrap().json().await.unwrap();
    assert_eq!(body["data"], Value::Array(vec![]));
    assert_eq!(body["meta"]["next_page"], 2);
    assert_eq!(body["meta"]["is_last_page"], false);

    let body: Value = get().await.unwrap().json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 10, "faults used up");
}

#[tokio::test]
async fn timing_faults_delay_drip_and_reset() {
    let sim = start(config(50)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/events?per_page=1", sim.base_url());

    sim.inject(Fault::Slow(300), 1);
    let started = Instant::now();
    let response = client.get(&url).bearer_auth(KEY).send().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1);

    sim.inject(Fault::Drip, 1);
    let mut response = client.get(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    let at_first = Instant::now();
    let second = response.chunk().await.unwrap().unwrap();
    assert!(first.len() <= 8 && second.len() <= 8);
    assert!(at_first.elapsed() >= Duration::from_millis(150));
    drop(response);

    sim.inject(Fault::Reset, 1);
    let result = client.get(&url).bearer_auth(KEY).send().await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(sim.requests().last().unwrap().status, 0);

    // The server still answers afterwards.
    assert_eq!(list(&client, &sim, "").await.0, 200);
}

#[tokio::test]
async fn latency_delays_answers() {
    let sim = start(config(5)).await;
    let client = reqwest::Client::new();
    sim.set_latency_ms(200);
    let started = Instant::now();
    assert_eq!(list(&client, &sim, "").await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn control_api_drives_the_simulator() {
    let sim = start(config(30)).await;
    let client = reqwest::Client::new();
    let base = sim.base_url();

    let added: Value = client
        .post(format!("{base}/_sim/events"))
        .json(&serde_json::json!({"count": 4, "backdate_secs": 60}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(added["ids"].as_array().unwrap().len(), 4);
    let listed: Value = client
        .get(format!("{base}/_sim/events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["ids"].as_array().unwrap().len(), 34);

    let deleted: Value = client
        .post(format!("{base}/_sim/delete"))
        .json(&serde_json::json!({"ids": [added["ids"][0]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(deleted["ids"], serde_json::json!([added["ids"][0]]));
    let deleted: Value = client
        .post(format!("{base}/_sim/delete"))
        .json(&serde_json::json!({"count": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(deleted["ids"].as_array().unwrap().len(), 3);
    assert_eq!(sim.event_ids().len(), 30);

    for fault in [
        serde_json::json!({"fault": {"Status": 502}, "count": 1}),
        serde_json::json!({"fault": {"status_retry_after": [503, 1]}, "count": 1}),
        serde_json::json!({"fault": "Html", "count": 1}),
    ] {
        let response = client
            .post(format!("{base}/_sim/faults"))
            .json(&fault)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 204, "{fault}");
    }
    let response = client
        .put(format!("{base}/_sim/latency"))
        .json(&serde_json::json!({"ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);

    let response = client
        .get(format!("{base}/events"))
        .bearer_auth(KEY)
        .header("x-run-id", "run-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 502);
    assert_eq!(list(&client, &sim, "").await.0, 503);
    let response = client
        .get(format!("{base}/events"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );

    let log: Vec<RequestRecord> = client
        .get(format!("{base}/_sim/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log.len(), 3, "control requests are not logged");
    assert_eq!(log[0].run_id.as_deref(), Some("run-42"));
    assert_eq!(log[0].path, "/events");
    assert!(log[0].authorized);
    let stats: SimStats = client
        .get(format!("{base}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.requests, 3);
    assert_eq!(stats, sim.stats());
}

#[tokio::test]
async fn control_requests_are_not_rate_limited() {
    let sim = start(SimConfig {
        events: 5,
        ..SimConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    for _ in 0..10 {
        let response = client
            .get(format!("{}/_sim/stats", sim.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    assert_eq!(list(&client, &sim, "").await.0, 200);
    assert_eq!(sim.stats().rate_violations, 0);
}

#[tokio::test]
async fn paging_stays_cheap_with_many_events() {
    let sim = start(config(200_000)).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let (status, body) = list(&client, &sim, "page=2000&per_page=100").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().unwrap().len(), 100);
    assert_eq!(body["meta"]["is_last_page"], true);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn fault_serde_form_is_stable() {
    assert_eq!(
        serde_json::to_string(&Fault::Status(503)).unwrap(),
        r#"{"Status":503}"#
    );
    assert_eq!(serde_json::to_string(&Fault::Reset).unwrap(), r#""Reset""#);
    let parsed: Fault = serde_json::from_str(r#"{"slow":250}"#).unwrap();
    assert_eq!(parsed, Fault::Slow(250));
}

#[test]
fn debug_hides_the_key() {
    let text = format!("{:?}", SimConfig::default());
    assert!(!text.contains("sim-key"));
}

#[tokio::test]
async fn hostile_faults_serve_what_they_promise() {
    let sim = start(config(250)).await;
    let client = reqwest::Client::new();
    let query = "page=2&per_page=100";
    let (_, good) = list(&client, &sim, query).await;
    let (_, first) = list(&client, &sim, "page=1&per_page=100").await;

    sim.inject(Fault::Gigantic, 1);
    let response = client
        .get(format!("{}/events?{query}", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["padding"].as_str().unwrap().len() >= GIGANTIC_BYTES);
    assert_eq!(ids_of(&body), ids_of(&good));

    sim.inject(Fault::NextPageBackwards, 1);
    sim.inject(Fault::NextPageSame, 1);
    let (_, body) = list(&client, &sim, query).await;
    assert_eq!(
        (ids_of(&body), &body["meta"]["next_page"]),
        (ids_of(&good), &1.into())
    );
    let (_, body) = list(&client, &sim, query).await;
    assert_eq!(
        (ids_of(&body), &body["meta"]["next_page"]),
        (ids_of(&good), &2.into())
    );

    sim.inject(Fault::Loop, 2);
    for page in ["page=2&per_page=100", "page=3&per_page=100"] {
        let (_, body) = list(&client, &sim, page).await;
        assert_eq!(body, first, "{page} serves page 1");
    }

    sim.inject(Fault::OccurredDateNumber, 1);
    sim.inject(Fault::EventWithoutId, 1);
    let (_, body) = list(&client, &sim, query).await;
    assert!(body["data"][0]["occurred_date"].as_i64().unwrap() > 0);
    assert_eq!(body["data"][0]["id"], good["data"][0]["id"]);
    assert_eq!(body["data"][1], good["data"][1]);
    let (_, body) = list(&client, &sim, query).await;
    assert!(body["data"][0].get("id").is_none());
    assert_eq!(
        body["data"][0]["occurred_date"],
        good["data"][0]["occurred_date"]
    );

    sim.inject(Fault::Pass, 1);
    sim.inject(Fault::Status(503), 1);
    assert_eq!(list(&client, &sim, query).await, (200, good.clone()));
    assert_eq!(list(&client, &sim, query).await.0, 503);
    assert_eq!(list(&client, &sim, query).await, (200, good));
}

#[tokio::test]
async fn a_new_key_refuses_the_old_one() {
    let sim = start(config(5)).await;
    let client = reqwest::Client::new();
    assert_eq!(list(&client, &sim, "").await.0, 200);
    sim.set_api_key("rotated-key");
    assert_eq!(list(&client, &sim, "").await.0, 401);
    let response = client
        .get(format!("{}/events", sim.base_url()))
        .bearer_auth("rotated-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let authorized: Vec<bool> = sim.requests().iter().map(|r| r.authorized).collect();
    assert_eq!(authorized, [true, false, true]);
}

/// Each reading of the unconfirmed details is played as named.
#[tokio::test]
async fn every_reading_is_played() {
    let client = reqwest::Client::new();
    for reading in Reading::matrix() {
        let sim = start(SimConfig {
            events: 120,
            enforce_rate_limit: false,
            reading,
            ..SimConfig::default()
        })
        .await;
        let size = reading.max_per_page.min(100);
        let last = 120u64.div_ceil(size);
        let (status, body) = list(&client, &sim, &format!("page={last}&per_page=100")).await;
        assert_eq!(status, 200);
        let on_last = 120 - (last - 1) * size;
        assert_eq!(body["data"].as_array().unwrap().len() as u64, on_last);
        let meta = &body["meta"];
        match reading.count_mode {
            CountMode::Page => assert_eq!(meta["count"], on_last, "{reading}"),
            CountMode::Total => assert_eq!(meta["count"], 120, "{reading}"),
            CountMode::Absent => assert!(meta.get("count").is_none(), "{reading}"),
        }
        assert_eq!(
            meta.get("total_pages").is_some(),
            reading.total_pages,
            "{reading}"
        );
        assert_eq!(
            meta.get("limit_value").is_some(),
            reading.limit_value,
            "{reading}"
        );
        assert_eq!(meta["next_page"], Value::Null, "{reading}");
        assert_eq!(meta["current_page"], last, "{reading}");
    }
}

#[tokio::test]
async fn the_reporting_reading_is_set_at_construction_and_through_the_control_api() {
    let sim = start(SimConfig {
        reporting: ReportingConfig {
            enforce_limits: false,
            reading: ReportingReading::by_name("cap-50").unwrap(),
            ..ReportingConfig::default()
        },
        ..config(0)
    })
    .await;
    let pst = sim.add_phishing_test(120);
    let client = reqwest::Client::new();
    let base = sim.base_url();
    let recipients = format!("{base}/v1/phishing/security_tests/{pst}/recipients");
    let page = |query: &'static str| {
        client
            .get(format!("{recipients}?{query}"))
            .bearer_auth("sim-reporting-token")
            .send()
    };
    let served: Vec<Value> = page("page=1&per_page=500")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served.len(), 50, "capped at 50 from construction");

    let reading: ReportingReading = client
        .get(format!("{base}/_sim/phishing/reading"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reading, ReportingReading::by_name("cap-50").unwrap());
    let set = client
        .put(format!("{base}/_sim/phishing/reading"))
        .json(&serde_json::json!({"name": "page-ignored"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 204);
    assert_eq!(
        sim.reporting_reading(),
        ReportingReading::by_name("page-ignored").unwrap()
    );
    let unknown = client
        .put(format!("{base}/_sim/phishing/reading"))
        .json(&serde_json::json!({"name": "no-such-reading"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let first: Vec<Value> = page("page=1&per_page=500")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let again: Vec<Value> = page("page=2&per_page=500")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((first.len(), &first), (100, &again), "page ignored");

    // A full reading, and a throttled request: 429 over HTTP with its headers.
    let set = client
        .put(format!("{base}/_sim/phishing/reading"))
        .json(&serde_json::json!({"wording": "too_many_requests", "retry_after_secs": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 204);
    let throttle = client
        .post(format!("{base}/_sim/phishing/throttle"))
        .json(&serde_json::json!({"count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(throttle.status(), 204);
    let refused = page("page=1").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "3600");
    assert!(
        refused.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(refused.text().await.unwrap(), "Too Many Requests");
    assert_eq!(page("page=1").await.unwrap().status(), 200, "one only");
    sim.shutdown().await;
}
