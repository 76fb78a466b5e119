//! The DynamoDB state store and the Secrets Manager vault against moto.
//!
//! CI starts moto and exports `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`. Without `AWS_ENDPOINT_URL` every test fails: they must never
//! pass silently, nor talk to real AWS. Each test uses its own table, so they run in
//! parallel.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use knowbe4_source::config::SourceSpec;
use knowbe4_source::domain::secrets::SourceSecrets;
use knowbe4_source::domain::state::{HealthEvent, Lifecycle, SecretRef, SourceRecord, SourceState};
use knowbe4_source::error::{Error, HealthKind};
use knowbe4_source::store::dynamo::DynamoStore;
use knowbe4_source::store::secrets_manager::SecretsManagerVault;
use knowbe4_source::store::{Reservation, StateStore};
use secrecy::{ExposeSecret, SecretString};

/// The SDK configuration, pointed at moto.
async fn aws_config() -> aws_config::SdkConfig {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        !endpoint.is_empty(),
        "AWS_ENDPOINT_URL is not set: these tests need moto, e.g. \
         `.venv/bin/moto_server -H 127.0.0.1 -p 5055` and \
         AWS_ENDPOINT_URL=http://127.0.0.1:5055 AWS_REGION=us-east-1 \
         AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
    );
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}

/// A store over a fresh table, and the raw client for checks.
async fn store() -> (DynamoStore, aws_sdk_dynamodb::Client, String) {
    let client = aws_sdk_dynamodb::Client::new(&aws_config().await);
    let table = format!("knowbe4-test-{}", uuid::Uuid::new_v4());
    DynamoStore::create_table(&client, &table)
        .await
        .expect("create table");
    // Idempotent.
    DynamoStore::create_table(&client, &table)
        .await
        .expect("create table again");
    (DynamoStore::new(client.clone(), &table), client, table)
}

fn record(id: &str) -> SourceRecord {
    SourceRecord {
        id: id.to_string(),
        spec: SourceSpec {
            name: format!("source {id}"),
            description: None,
            category: Some("knowbe4".into()),
            fields: BTreeMap::new(),
            siem_forward: false,
            region: None,
            api_base: "https://api.events.knowbe4.com".into(),
            daily_request_limit: 100,
            account_daily_quota: 100,
            first_fetch_lookback_secs: 86_400,
            retry_window_secs: 5_400,
            lateness_window_secs: 3_600,
            destination: None,
            generation: Default::default(),
            collect_events: true,
            phishing: None,
        },
        secret_ref: SecretRef::SecretsManager {
            secret_id: format!("knowbe4-source/{id}"),
        },
        config_version: 1,
        created_at: 1_000,
        updated_at: 1_000,
        account: None,
        destination: None,
    }
}

/// Creates source `id` with a fresh state.
async fn create(store: &DynamoStore, id: &str) {
    store
        .create_source(&record(id), &SourceState::new(1_000))
        .await
        .expect("create source");
}

fn health(id: &str, first_seen: i64, last_seen: i64, count: u32) -> HealthEvent {
    HealthEvent {
        source_id: id.to_string(),
        source_name: format!("source {id}"),
        kind: HealthKind::ThirdPartyGenericError,
        message: "KnowBe4 answered 503.".into(),
        status: Some(503),
        error_kind: "http_status".into(),
        first_seen,
        last_seen,
        count,
        retry_at: Some(last_seen + 60_000),
        retry_deadline: Some(first_seen + 5_400_000),
        data_type: Some("events".into()),
    }
}

/// Asserts a lost race whose message names what was lost.
fn assert_conflict<T: std::fmt::Debug>(result: knowbe4_source::Result<T>, names: &str) {
    match result {
        Err(Error::Conflict(message)) => {
            assert!(
                message.contains(names),
                "{message:?} should mention {names:?}"
            )
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn created_sources_are_read_back_and_listed_in_id_order() {
    let (store, _, _) = store().await;
    assert!(store.get_source("b").await.unwrap().is_none());
    assert!(store.load_state("b").await.unwrap().is_none());
    create(&store, "b").await;
    create(&store, "a").await;

    let got = store.get_source("b").await.unwrap().expect("source b");
    assert_eq!(got.id, "b");
    assert_eq!(got.spec, record("b").spec);
    let state = store.load_state("b").await.unwrap().expect("state of b");
    assert_eq!(state.version, 1);
    assert_eq!(state.value.lifecycle, Lifecycle::Pending);

    // Other items of the partition (state, lease, quota) are not listed.
    store.acquire_lease("a", "run-1", 10, 1_000).await.unwrap();
    store.reserve_request("a", "2024-01-01", 5).await.unwrap();
    let ids: Vec<String> = store
        .list_sources()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
}

#[tokio::test]
async fn creating_an_existing_source_is_a_conflict() {
    let (store, _, _) = store().await;
    create(&store, "dup").await;
    assert_conflict(
        store
            .create_source(&record("dup"), &SourceState::new(2_000))
            .await,
        "already exists",
    );
    // The first creation is untouched.
    let state = store.load_state("dup").await.unwrap().unwrap();
    assert_eq!(state.version, 1);
    assert_eq!(state.value.since(), Some(1_000));
}

#[tokio::test]
async fn updates_need_an_existing_source_and_a_newer_config_version() {
    let (store, _, _) = store().await;
    match store.update_source(&record("ghost")).await {
        Err(Error::NotFound(id)) => assert_eq!(id, "ghost"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    create(&store, "u").await;
    let mut updated = record("u");
    updated.config_version = 2;
    updated.spec.name = "renamed".into();
    store.update_source(&updated).await.unwrap();
    assert_eq!(
        store.get_source("u").await.unwrap().unwrap().spec.name,
        "renamed"
    );
    // A replay of version 2 (or an older writer) does not overwrite it.
    assert_conflict(store.update_source(&updated).await, "configuration version");
}

#[tokio::test]
async fn saving_state_from_a_stale_version_is_a_conflict() {
    let (store, _, _) = store().await;
    create(&store, "v").await;
    let mut state = store.load_state("v").await.unwrap().unwrap();
    state
        .value
        .transition(Lifecycle::Started, 2_000, "picked up");
    let v2 = store.save_state("v", &state.value, 1, None).await.unwrap();
    assert_eq!(v2, 2);
    assert_conflict(
        store.save_state("v", &state.value, 1, None).await,
        "no longer at version 1",
    );
    let v3 = store.save_state("v", &state.value, 2, None).await.unwrap();
    assert_eq!(v3, 3);
    let stored = store.load_state("v").await.unwrap().unwrap();
    assert_eq!(stored.version, 3);
    assert_eq!(stored.value.lifecycle, Lifecycle::Started);
}

#[tokio::test]
async fn a_stale_lease_cannot_save_state_or_renew() {
    let (store, _, _) = store().await;
    create(&store, "f").await;
    let old = store
        .acquire_lease("f", "run-old", 1_000, 100)
        .await
        .unwrap()
        .expect("free lease");
    let state = SourceState::new(1_000);
    assert_eq!(
        store.save_state("f", &state, 1, Some(&old)).await.unwrap(),
        2
    );

    // The old run pauses past its lease; a new run takes over.
    let new = store
        .acquire_lease("f", "run-new", 2_000, 100)
        .await
        .unwrap()
        .expect("expired lease");
    assert!(new.fence > old.fence);
    assert_conflict(store.save_state("f", &state, 2, Some(&old)).await, "lease");
    assert_conflict(store.renew_lease(&old, 2_010, 100).await, "lease");
    // The same owner name with the old fence is still stale.
    let mut forged = new.clone();
    forged.fence = old.fence;
    assert_conflict(
        store.save_state("f", &state, 2, Some(&forged)).await,
        "lease",
    );

    assert_eq!(
        store.save_state("f", &state, 2, Some(&new)).await.unwrap(),
        3
    );
    let renewed = store.renew_lease(&new, 2_050, 100).await.unwrap();
    assert_eq!(renewed.fence, new.fence);
    assert_eq!(renewed.expires_at, 2_150);
}

#[tokio::test]
async fn a_held_lease_is_not_acquired_until_it_expires() {
    let (store, _, _) = store().await;
    let first = store
        .acquire_lease("l", "run-1", 1_000, 500)
        .await
        .unwrap()
        .expect("free lease");
    assert_eq!(first.owner, "run-1");
    assert_eq!(first.expires_at, 1_500);
    assert_eq!(first.quiet_until, 0);

    assert!(
        store
            .acquire_lease("l", "run-2", 1_200, 500)
            .await
            .unwrap()
            .is_none()
    );
    // Expiry is exclusive: at exactly `expires_at` the lease is still held.
    assert!(
        store
            .acquire_lease("l", "run-2", 1_500, 500)
            .await
            .unwrap()
            .is_none()
    );
    let second = store
        .acquire_lease("l", "run-2", 1_501, 500)
        .await
        .unwrap()
        .expect("expired lease");
    assert_eq!(second.owner, "run-2");
    assert!(second.fence > first.fence);
}

#[tokio::test]
async fn release_frees_the_lease_keeps_the_fence_and_records_quiet_until() {
    let (store, _, _) = store().await;
    let mut fences = Vec::new();
    let mut now = 1_000;
    for run in 0..3 {
        let lease = store
            .acquire_lease("r", &format!("run-{run}"), now, 60_000)
            .await
            .unwrap()
            .expect("released lease is free");
        if run > 0 {
            assert_eq!(lease.quiet_until, now - 10 + 1_000, "previous quiet_until");
        }
        fences.push(lease.fence);
        store.release_lease(&lease, now + 1_000).await.unwrap();
        // A second release (a duplicate run's cleanup) is harmless.
        store.release_lease(&lease, now + 1_000).await.unwrap();
        now += 10;
    }
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");

    // Releasing a lease someone else now holds changes nothing.
    let current = store
        .acquire_lease("r", "run-x", now, 60_000)
        .await
        .unwrap()
        .unwrap();
    let mut stale = current.clone();
    stale.owner = "run-0".into();
    store.release_lease(&stale, 0).await.unwrap();
    assert!(
        store
            .acquire_lease("r", "run-y", now + 1, 60_000)
            .await
            .unwrap()
            .is_none()
    );
}

/// Twenty runs race for a limit of seven; the condition alone must stop them at seven.
///
/// moto (5.2) applies a conditional `UpdateItem` without a lock when it serves requests in
/// parallel threads, so `scripts/test.sh` runs it one request at a time
/// (`scripts/moto_serial.py`), as DynamoDB serialises writes to one item.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_stop_exactly_at_the_limit() {
    let (store, _, _) = store().await;
    let store = Arc::new(store);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.reserve_request("q", "2024-05-01", 7).await })
        })
        .collect();
    let mut granted = Vec::new();
    let mut exhausted = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            Reservation::Granted(n) => granted.push(n),
            Reservation::Exhausted => exhausted += 1,
        }
    }
    granted.sort_unstable();
    assert_eq!(granted, [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(exhausted, 13);
    assert_eq!(store.quota_used("q", "2024-05-01").await.unwrap(), 7);
    assert_eq!(
        store.reserve_request("q", "2024-05-01", 0).await.unwrap(),
        Reservation::Exhausted
    );
}

#[tokio::test]
async fn each_day_has_its_own_quota() {
    let (store, client, table) = store().await;
    for expected in 1..=2 {
        assert_eq!(
            store.reserve_request("d", "2024-05-01", 2).await.unwrap(),
            Reservation::Granted(expected)
        );
    }
    assert_eq!(
        store.reserve_request("d", "2024-05-01", 2).await.unwrap(),
        Reservation::Exhausted
    );
    assert_eq!(
        store.reserve_request("d", "2024-05-02", 2).await.unwrap(),
        Reservation::Granted(1)
    );
    // Another account's ledger is separate too.
    assert_eq!(
        store.reserve_request("e", "2024-05-01", 2).await.unwrap(),
        Reservation::Granted(1)
    );
    assert_eq!(store.quota_used("d", "2024-05-01").await.unwrap(), 2);
    assert_eq!(store.quota_used("d", "2024-05-02").await.unwrap(), 1);
    assert_eq!(store.quota_used("d", "2024-05-03").await.unwrap(), 0);

    // The ledger item expires three days after the end of its day.
    let item = client
        .get_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("ACCOUNT#d".into()))
        .key("sk", AttributeValue::S("QUOTA#2024-05-01".into()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let day_end = 1_714_608_000; // 2024-05-02T00:00:00Z
    assert_eq!(
        item["expires_at"],
        AttributeValue::N((day_end + 3 * 86_400).to_string())
    );
}

#[tokio::test]
async fn health_events_list_newest_first_and_repeats_overwrite() {
    let (store, _, _) = store().await;
    assert!(store.list_health("h", 10).await.unwrap().is_empty());
    store
        .put_health(&health("h", 1_000, 1_000, 1), 9_999_999_999)
        .await
        .unwrap();
    store
        .put_health(&health("h", 5_000, 5_000, 1), 9_999_999_999)
        .await
        .unwrap();
    store
        .put_health(&health("h", 3_000, 3_000, 1), 9_999_999_999)
        .await
        .unwrap();
    // A repeat within the first streak updates that event (same streak key).
    store
        .put_health(&health("h", 1_000, 7_000, 4), 9_999_999_999)
        .await
        .unwrap();
    store
        .put_health(&health("other", 1_000, 8_000, 1), 9_999_999_999)
        .await
        .unwrap();

    let events = store.list_health("h", 10).await.unwrap();
    let seen: Vec<(i64, i64, u32)> = events
        .iter()
        .map(|e| (e.first_seen, e.last_seen, e.count))
        .collect();
    assert_eq!(
        seen,
        [(1_000, 7_000, 4), (5_000, 5_000, 1), (3_000, 3_000, 1)]
    );
    assert_eq!(events[0], health("h", 1_000, 7_000, 4));

    let newest_two = store.list_health("h", 2).await.unwrap();
    assert_eq!(newest_two.len(), 2);
    assert_eq!(newest_two[1].last_seen, 5_000);
}

#[tokio::test]
async fn deleting_a_source_removes_every_item_and_blocks_later_writes() {
    let (store, client, table) = store().await;
    create(&store, "x").await;
    create(&store, "keep").await;
    let lease = store
        .acquire_lease("x", "run-1", 1_000, 60_000)
        .await
        .unwrap()
        .unwrap();
    store.reserve_request("x", "2024-05-01", 5).await.unwrap();
    store.reserve_request("x", "2024-05-02", 5).await.unwrap();
    // Enough health events to need several BatchWriteItem calls.
    for i in 0..60 {
        store
            .put_health(&health("x", i, i, 1), 9_999_999_999)
            .await
            .unwrap();
    }

    store.delete_source("x").await.unwrap();
    let left = client
        .query()
        .table_name(&table)
        .consistent_read(true)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("SOURCE#x".into()))
        .send()
        .await
        .unwrap();
    assert_eq!(left.count(), 0, "left over: {:?}", left.items());
    assert!(store.get_source("x").await.unwrap().is_none());
    assert!(store.list_health("x", 100).await.unwrap().is_empty());

    // A run still going cannot resurrect the source, with or without its old lease.
    let state = SourceState::new(1_000);
    assert_conflict(
        store.save_state("x", &state, 1, Some(&lease)).await,
        "deleted",
    );
    assert_conflict(store.save_state("x", &state, 1, None).await, "deleted");
    assert!(store.load_state("x").await.unwrap().is_none());

    // Deleting again is a no-op; the other source is untouched.
    store.delete_source("x").await.unwrap();
    let ids: Vec<String> = store
        .list_sources()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["keep"]);
    assert_eq!(store.load_state("keep").await.unwrap().unwrap().version, 1);

    // The id can be used again.
    create(&store, "x").await;
    assert_eq!(store.load_state("x").await.unwrap().unwrap().version, 1);
}

#[tokio::test]
async fn secrets_roundtrip_through_secrets_manager() {
    let client = aws_sdk_secretsmanager::Client::new(&aws_config().await);
    let prefix = format!("knowbe4-source-test-{}/", uuid::Uuid::new_v4());
    let vault = SecretsManagerVault::new(client.clone(), &prefix);
    let secrets = SourceSecrets {
        api_key: Some(SecretString::from("canary-api-key-1")),
        api_key_phishing: None,
        destination_url: Some(SecretString::from("https://sumo/receiver/canary-url")),
        destination_token: None,
    };

    let arn = vault.put("s1", &secrets).await.unwrap();
    assert!(arn.starts_with("arn:"), "{arn}");
    let got = vault.get(&arn).await.unwrap();
    assert_eq!(
        got.api_key.as_ref().unwrap().expose_secret(),
        "canary-api-key-1"
    );
    assert!(got.api_key_phishing.is_none());
    assert_eq!(
        got.destination_url.unwrap().expose_secret(),
        "https://sumo/receiver/canary-url"
    );
    assert!(got.destination_token.is_none());

    // Putting again replaces the value of the same secret.
    let rotated = SourceSecrets {
        api_key: Some(SecretString::from("canary-api-key-2")),
        api_key_phishing: Some(SecretString::from("canary-reporting-token")),
        destination_url: None,
        destination_token: Some(SecretString::from("canary-token")),
    };
    let arn2 = vault.put("s1", &rotated).await.unwrap();
    assert_eq!(arn2, arn);
    let got = vault.get(&format!("{prefix}s1")).await.unwrap();
    assert_eq!(
        got.api_key.as_ref().unwrap().expose_secret(),
        "canary-api-key-2"
    );
    assert_eq!(
        got.api_key_phishing.as_ref().unwrap().expose_secret(),
        "canary-reporting-token"
    );
    assert_eq!(
        got.destination_token.unwrap().expose_secret(),
        "canary-token"
    );

    // Single-valued secrets: plain, {"url"}, {"token"}.
    for (name, value, expected) in [
        (
            "plain",
            " https://sumo/receiver/plain-canary\n",
            "https://sumo/receiver/plain-canary",
        ),
        (
            "url",
            r#"{"url": "https://sumo/receiver/json-canary"}"#,
            "https://sumo/receiver/json-canary",
        ),
        ("token", r#"{"token": "hec-canary"}"#, "hec-canary"),
    ] {
        let id = format!("{prefix}{name}");
        client
            .create_secret()
            .name(&id)
            .secret_string(value)
            .send()
            .await
            .unwrap();
        assert_eq!(
            vault.get_string(&id).await.unwrap().expose_secret(),
            expected
        );
    }
    let bad_json = format!("{prefix}no-key");
    client
        .create_secret()
        .name(&bad_json)
        .secret_string(r#"{"password": "canary-password"}"#)
        .send()
        .await
        .unwrap();
    let err = vault.get_string(&bad_json).await.unwrap_err();
    assert!(matches!(err, Error::Secret { config: true, .. }), "{err:?}");
    assert!(!err.to_string().contains("canary"), "{err}");
    // Not a SecretDocument: a config error that does not quote the value.
    let err = vault.get(&format!("{prefix}plain")).await.unwrap_err();
    assert!(matches!(err, Error::Secret { config: true, .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("canary"), "{err}");
    let err = vault.get(&bad_json).await.unwrap_err();
    assert!(matches!(err, Error::Secret { config: true, .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("canary"), "{err}");

    vault.delete(&arn).await.unwrap();
    vault.delete(&arn).await.unwrap();
    let err = vault.get(&arn).await.unwrap_err();
    match &err {
        Error::Secret { name, config, .. } => {
            assert!(*config, "a missing secret is a config error: {err:?}");
            assert_eq!(name, &arn);
        }
        other => panic!("expected a secret error, got {other:?}"),
    }
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("canary"), "{shown}");
    assert_eq!(err.health_kind(), HealthKind::ThirdPartyConfigError);

    let missing = vault.get_string(&format!("{prefix}never-created")).await;
    assert!(
        matches!(missing, Err(Error::Secret { config: true, .. })),
        "{missing:?}"
    );
    for name in ["plain", "url", "token", "no-key"] {
        vault.delete(&format!("{prefix}{name}")).await.unwrap();
    }
}

#[tokio::test]
async fn an_unreachable_secrets_manager_is_a_transient_error() {
    let config = aws_config().await;
    // Nothing listens on port 1; one attempt keeps the test fast.
    let unreachable = aws_sdk_secretsmanager::config::Builder::from(&config)
        .endpoint_url("http://127.0.0.1:1")
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .build();
    let vault = SecretsManagerVault::new(
        aws_sdk_secretsmanager::Client::from_conf(unreachable),
        "knowbe4-source/",
    );
    let err = vault.get("knowbe4-source/any").await.unwrap_err();
    assert!(
        matches!(err, Error::Secret { config: false, .. }),
        "{err:?}"
    );
    assert_eq!(err.health_kind(), HealthKind::FirstPartyGenericError);
}

/// Issue 12: the change-detection digests of a 50,000-recipient test are 100 items of at
/// most 10,668 bytes of digests each (within DynamoDB's 400 KB), read back in page
/// order; writes are fenced by the lease and the source like `save_state`; deleting the
/// source removes them.
#[tokio::test]
async fn digest_shards_of_fifty_thousand_recipients_round_trip_fenced() {
    use knowbe4_source::domain::changes::{DigestShard, KnownDigests, page_changes};
    let (store, client, table) = store().await;
    create(&store, "p").await;
    let lease = store
        .acquire_lease("p", "run-1", 1_000, 600_000)
        .await
        .unwrap()
        .unwrap();
    let known = KnownDigests::default();
    let mut saved = Vec::new();
    for page in 1..=100u32 {
        let texts: Vec<String> = (0..500u64)
            .map(|i| {
                let id = u64::from(page) * 1_000 + i;
                format!(r#"{{"recipient_id":{id},"pst_id":509579,"opened_at":null}}"#)
            })
            .collect();
        let changes = page_changes(
            &known,
            &mut Default::default(),
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| (u64::from(page) * 1_000 + i as u64, t.as_str())),
        );
        let encoded = changes.delta.encode();
        assert!(encoded.len() <= 10_668);
        store
            .save_digest_shard("p", "509579", page, &encoded, &lease)
            .await
            .unwrap();
        saved.push((page, encoded));
    }
    let loaded = store.load_digest_shards("p", "509579").await.unwrap();
    assert_eq!(loaded, saved, "every shard back, in page order");
    let shards: Vec<(u32, DigestShard)> = loaded
        .iter()
        .map(|(seq, s)| (*seq, DigestShard::decode(s).unwrap()))
        .collect();
    assert_eq!(KnownDigests::from_log(shards).len(), 50_000);
    // Another list of the same source is separate (the tests list, another test).
    assert!(
        store
            .load_digest_shards("p", "tests")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .load_digest_shards("p", "50957")
            .await
            .unwrap()
            .is_empty()
    );

    // A run that lost its lease cannot write digests.
    let stale = lease.clone();
    store.release_lease(&lease, 0).await.unwrap();
    let _newer = store
        .acquire_lease("p", "run-2", 2_000, 600_000)
        .await
        .unwrap()
        .unwrap();
    assert_conflict(
        store
            .save_digest_shard("p", "509579", 1, &saved[0].1, &stale)
            .await,
        "lease",
    );

    store.delete_source("p").await.unwrap();
    let left = client
        .query()
        .table_name(&table)
        .consistent_read(true)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("SOURCE#p".into()))
        .send()
        .await
        .unwrap();
    assert_eq!(left.count(), 0, "digest items left over");
}
