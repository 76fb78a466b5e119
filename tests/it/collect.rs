//! Collection end to end against moto + the simulator + a recording sink.

use std::collections::HashSet;

use knowbe4_source::HealthKind;
use knowbe4_source::domain::state::Lifecycle;
use knowbe4_source::run::{Outcome, collect_source};
use knowbe4_source::testkit::sim::{Fault, SimConfig};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_events_over_several_runs_arrive_once_each() {
    let h = harness(SimConfig {
        api_key: "key-5000".into(),
        events: 5000,
        span_hours: 72,
        seed: 42,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), "key-5000", serde_json::json!({})),
            Some("acme".into()),
        )
        .await
        .unwrap();

    // A first run cut short by the deadline leaves a backlog...
    let first = collect_source(h.app.run_context(), &id, deadline(10)).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    assert!(first.backlog, "a 10 s run cannot drain 50 pages: {first:?}");
    let mut deleted_after_delivery = HashSet::new();
    // ...then runs with new, backdated and deleted events in between.
    for round in 0..4 {
        h.sim.add_events(120 + round * 40, 0);
        h.sim.add_events(15, 1200); // backdated 20 minutes, inside the 60-minute window
        for gone in h.sim.delete_events(25) {
            deleted_after_delivery.insert(gone);
        }
        let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
        assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    }
    let last = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(last.outcome, Outcome::Collected);
    assert!(!last.backlog, "{last:?}");

    let received = h.sink.event_ids();
    let dups = duplicates(&received);
    assert!(
        dups.is_empty(),
        "{} duplicates, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(3)]
    );
    let received: HashSet<String> = received.into_iter().collect();
    let present = h.sim.event_ids();
    let lost: Vec<&String> = present
        .iter()
        .filter(|id| !received.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} events lost",
        lost.len(),
        present.len()
    );
    assert!(received.len() >= 5000);
    assert_rate_respected(&h.sim);

    // Events are forwarded as KnowBe4 sent them, with the Sumo metadata.
    let request = h
        .sink
        .requests()
        .into_iter()
        .find(|r| r.status == 200)
        .unwrap();
    assert_eq!(request.header("x-sumo-name"), Some("KnowBe4 test"));
    assert_eq!(request.header("x-sumo-category"), Some("security/knowbe4"));
    let fields = request.header("x-sumo-fields").unwrap();
    assert!(
        fields.contains("_siemparser=/Parsers/System/KnowBe4/KnowBe4 KMSAT"),
        "{fields}"
    );
    assert!(fields.contains("team=secops"), "{fields}");

    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(status.state, Lifecycle::Collecting);
    assert_eq!(status.forwarded_total as usize, h.sink.event_ids().len());
    assert_eq!(status.backlog_ranges, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_runs_of_one_source_never_collect_at_once() {
    let h = harness(SimConfig {
        api_key: "k".into(),
        events: 600,
        latency_ms: 50,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), "k", serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
    let app = &h.app;
    let runs = futures::future::join_all(
        (0..8).map(|_| collect_source(app.run_context(), &id, deadline(60))),
    )
    .await;
    let collected = runs
        .iter()
        .filter(|r| r.outcome == Outcome::Collected)
        .count();
    let skipped = runs.iter().filter(|r| r.detail.contains("lease")).count();
    assert_eq!(collected, 1, "{runs:#?}");
    assert_eq!(skipped, 7);
    let run_ids: HashSet<Option<String>> = h.sim.requests().into_iter().map(|r| r.run_id).collect();
    assert_eq!(
        run_ids.len(),
        1,
        "requests from more than one run: {run_ids:?}"
    );
    assert!(duplicates(&h.sink.event_ids()).is_empty());
    assert_eq!(h.sink.event_ids().len(), 600);
    assert_rate_respected(&h.sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_rejected_by_field_and_stores_nothing() {
    let h = harness(SimConfig::default()).await;
    // Even with custom base URLs allowed (as in tests), plain http leaves only to loopback.
    let bad = source_json(
        "http://10.1.2.3:8080",
        "canary-key-1",
        serde_json::json!({}),
    );
    let err = h.app.create(bad, None).await.unwrap_err();
    assert!(err.to_string().contains("source.config.baseURL"), "{err}");
    assert!(!err.to_string().contains("canary-key-1"));
    let bad = source_json(&h.sim.base_url(), "k", serde_json::json!({"quotaShare": 0}));
    let err = h.app.create(bad, None).await.unwrap_err();
    assert!(
        err.to_string().contains("source.config.quotaShare"),
        "{err}"
    );
    assert!(table_dump(&h).await.is_empty());
    let secrets = h.secrets.list_secrets().send().await.unwrap();
    assert!(
        secrets
            .secret_list()
            .iter()
            .all(|s| !s.name().unwrap_or_default().starts_with(&h.prefix)),
        "a secret was stored for a rejected config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_lives_only_in_secrets_manager() {
    let key = "canary-7f3a-key";
    let h = harness(SimConfig {
        api_key: key.into(),
        events: 150,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), key, serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
    let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    let items = table_dump(&h).await;
    assert!(!items.is_empty());
    for item in items {
        assert!(
            !item.contains(key),
            "the key leaked into a state item: {item}"
        );
        assert!(
            !item.contains(h.sink.token()),
            "the destination URL leaked: {item}"
        );
    }
    for raw in h.sink.raw_events() {
        assert!(!raw.contains(key));
    }
    assert!(!format!("{report:?}").contains(key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_quota_is_a_hard_limit_and_not_a_failure() {
    let h = harness(SimConfig {
        api_key: "k".into(),
        events: 1000,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(
                &h.sim.base_url(),
                "k",
                serde_json::json!({"dailyRequestLimit": 3}),
            ),
            None,
        )
        .await
        .unwrap();
    let first = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    assert!(first.requests <= 3);
    // Later runs today never go past the limit (how much of it a run may spend depends
    // on the time of day: the allowance grows through the UTC day).
    for _ in 0..3 {
        let again = collect_source(h.app.run_context(), &id, deadline(60)).await;
        assert_ne!(again.outcome, Outcome::Failed, "{again:?}");
    }
    let sent = h.sim.stats().requests;
    assert!((1..=3).contains(&sent), "{sent} requests");
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(u64::from(status.quota_used_today), sent);

    // Whatever the time: once the account's ledger holds the limit, nothing is sent and
    // reaching it is not a failure.
    let account = status
        .account
        .clone()
        .expect("the run recorded its account");
    let day = knowbe4_source::domain::quota::utc_day(time::OffsetDateTime::now_utc());
    while let knowbe4_source::store::Reservation::Granted(_) = h
        .app
        .store
        .reserve_request(&account, &day, 3)
        .await
        .unwrap()
    {}
    let capped = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(capped.outcome, Outcome::Collected, "{capped:?}");
    assert_eq!(capped.requests, 0);
    assert_eq!(h.sim.stats().requests, sent, "no request past the limit");
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(status.quota_used_today, 3);
    assert!(status.quota_reached);
    assert!(
        status.health.is_empty(),
        "reaching the quota is not a health event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowbe4_limit_exceeded_stops_until_tomorrow_without_failing() {
    let h = harness(SimConfig {
        api_key: "k".into(),
        events: 1000,
        daily_quota: Some(2),
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), "k", serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
    let first = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    assert!(first.detail.contains("quota"), "{first:?}");
    // The default reading serves 50 events a page (asked for 100).
    assert_eq!(first.forwarded, 100, "the two pages served are delivered");
    let before = h.sim.stats().requests;
    let second = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(second.outcome, Outcome::Skipped, "{second:?}");
    assert_eq!(
        h.sim.stats().requests,
        before,
        "no request after Limit Exceeded today"
    );
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert!(status.quota_reached);
    assert!(status.health.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outage_keeps_the_checkpoint_and_delivers_later() {
    let h = harness(SimConfig {
        api_key: "k".into(),
        events: 300,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), "k", serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
    h.sink.set_down(Some(503));
    let failed = collect_source(h.app.run_context(), &id, deadline(8)).await;
    assert_eq!(failed.outcome, Outcome::Failed, "{failed:?}");
    assert_eq!(failed.health, Some(HealthKind::FirstPartyGenericError));
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(
        status.checkpoint, None,
        "the checkpoint moved without delivery"
    );
    assert_eq!(status.health[0].kind, HealthKind::FirstPartyGenericError);
    assert!(status.retry_deadline.is_some());
    h.sink.set_down(None);
    let ok = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(ok.outcome, Outcome::Collected, "{ok:?}");
    let ids = h.sink.event_ids();
    assert_eq!(ids.len(), 300);
    assert!(duplicates(&ids).is_empty());
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert!(status.retry_deadline.is_none(), "success clears the streak");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_a_config_error_and_blocks_until_updated() {
    let h = harness(SimConfig {
        api_key: "right".into(),
        events: 120,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), "wrong", serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
    let failed = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(
        failed.health,
        Some(HealthKind::ThirdPartyConfigError),
        "{failed:?}"
    );
    // One request, then one more after the forced re-read of the secret.
    assert_eq!(h.sim.stats().requests, 2);
    for _ in 0..2 {
        let skipped = collect_source(h.app.run_context(), &id, deadline(30)).await;
        assert_eq!(skipped.outcome, Outcome::Skipped, "{skipped:?}");
    }
    assert_eq!(h.sim.stats().requests, 2, "blocked runs call KnowBe4");
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(status.state, Lifecycle::Error);
    assert!(status.blocked_until_update);
    h.app
        .update(
            &id,
            source_json(&h.sim.base_url(), "right", serde_json::json!({})),
        )
        .await
        .unwrap();
    let ok = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(ok.outcome, Outcome::Collected, "{ok:?}");
    assert_eq!(h.sink.event_ids().len(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_within_the_run() {
    let h = harness(SimConfig {
        api_key: "k".into(),
        events: 250,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), "k", serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
    h.sim.inject(Fault::Status(503), 2);
    let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert_eq!(h.sink.event_ids().len(), 250);
    assert_rate_respected(&h.sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_page_is_a_health_event_and_moves_nothing() {
    let h = harness(SimConfig {
        api_key: "k".into(),
        events: 250,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), "k", serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
    h.sim.inject(Fault::Html, 10);
    let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(report.outcome, Outcome::Failed, "{report:?}");
    assert_eq!(report.health, Some(HealthKind::ThirdPartyGenericError));
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(status.checkpoint, None);
    assert!(
        status.health[0].message.contains("malformed"),
        "{:?}",
        status.health[0]
    );
    h.sim.clear_faults();
    let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert_eq!(h.sink.event_ids().len(), 250);
}
