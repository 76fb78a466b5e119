//! Issue 12, step 3: the Reporting API client against the simulator, each request
//! admitted through the account's ledger and send slot in DynamoDB (moto).

use std::collections::BTreeMap;
use std::time::Duration;

use knowbe4_source::domain::quota::utc_day;
use knowbe4_source::knowbe4::events::ApiError;
use knowbe4_source::knowbe4::reporting::{REPORTING_PER_PAGE, ReportingClient};
use knowbe4_source::run::{Admission, admit_reporting_request};
use knowbe4_source::testkit::sim::{
    BURST_PER_MINUTE, BURST_PER_SECOND, ReportingConfig, RequestRecord, SimConfig,
};
use secrecy::SecretString;

use crate::helpers::*;

fn client(h: &Harness, token: &str, run: &str) -> ReportingClient {
    ReportingClient::new(
        knowbe4_source::app::knowbe4_http_client().unwrap(),
        &h.sim.base_url(),
        SecretString::from(token.to_string()),
        run,
        Duration::from_secs(5),
    )
}

/// Reads a whole list (pages until the empty one), admitting each request; `None` when
/// the daily limit stopped it.
async fn read_all(
    h: &Harness,
    client: &ReportingClient,
    limit: u32,
    pst_id: Option<u64>,
) -> Option<Vec<serde_json::Value>> {
    let day = utc_day(time::OffsetDateTime::now_utc());
    let mut items = Vec::new();
    for page in 1..=100 {
        match admit_reporting_request(&h.app.store, client, &day, limit)
            .await
            .unwrap()
        {
            Admission::Granted => {}
            Admission::QuotaExhausted => return None,
        }
        let answer = match pst_id {
            None => client.security_tests_page(page, REPORTING_PER_PAGE).await,
            Some(id) => client.recipients_page(id, page, REPORTING_PER_PAGE).await,
        }
        .unwrap();
        if answer.ends_list() {
            return Some(items);
        }
        items.extend(
            answer
                .items
                .iter()
                .map(|i| serde_json::from_str::<serde_json::Value>(i.get()).unwrap()),
        );
    }
    panic!("a list did not end within 100 pages");
}

/// The most requests the server saw in any window of `window_ms`.
fn most_in_window(log: &[RequestRecord], window_ms: u64) -> usize {
    let times: Vec<u64> = log.iter().map(|r| r.at_ms).collect();
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

/// Two readers of one Reporting account (two sources sharing the token) read every test
/// and every recipient, as the simulator serves them, within the account's limits as the
/// server observed them, with no 429; every request was reserved in the ledger first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_test_and_recipient_is_read_within_the_account_limits() {
    let h = harness(SimConfig {
        events: 0,
        ..SimConfig::default()
    })
    .await;
    let big = h.sim.add_phishing_test(700);
    let small = h.sim.add_phishing_test(40);
    let errored = h.sim.add_errored_phishing_test();
    h.sim.progress_phishing(None, 300);

    let readers = ["reader-a", "reader-b"].map(|run| client(&h, "sim-reporting-token", run));
    let results = futures::future::join_all(readers.iter().map(|c| async {
        let tests = read_all(&h, c, 1000, None).await.unwrap();
        let mut recipients = BTreeMap::new();
        for test in &tests {
            let id = test["pst_id"].as_u64().unwrap();
            recipients.insert(id, read_all(&h, c, 1000, Some(id)).await.unwrap());
        }
        (tests, recipients)
    }))
    .await;

    for (tests, recipients) in &results {
        assert_eq!(tests, &h.sim.phishing_tests());
        for id in [big, small, errored] {
            assert_eq!(recipients[&id], h.sim.phishing_recipients(id), "test {id}");
        }
        assert_eq!(recipients[&big].len(), 700);
        let error = tests.iter().find(|t| t["pst_id"] == errored).unwrap();
        assert!(error["started_at"].is_null() && error["status"] == "Error");
    }
    let log = h.sim.reporting_requests();
    // Per reader: tests 2 pages, 700 recipients 3, 40 recipients 2, none 1.
    assert_eq!(log.len(), 16, "{log:?}");
    assert!(most_in_window(&log, 1_000) <= BURST_PER_SECOND, "{log:?}");
    assert!(most_in_window(&log, 60_000) <= BURST_PER_MINUTE, "{log:?}");
    let stats = h.sim.reporting_stats();
    assert_eq!(stats.answered_429, 0, "{stats:?}");
    assert_eq!(stats.second_violations + stats.minute_violations, 0);
    let day = utc_day(time::OffsetDateTime::now_utc());
    let used = h
        .app
        .store
        .quota_used(readers[0].account(), &day)
        .await
        .unwrap();
    assert_eq!(used as usize, log.len(), "every request reserved, once");
    // The User Event API's ledger of the same host is another account: untouched.
    assert!(h.sim.requests().is_empty());
}

/// The daily limit is reserved before each request: once it is reached, nothing more is
/// sent. A bad token's `200 {"message": "Invalid Token"}` is a refusal, not data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_limit_stops_requests_before_they_are_sent_and_a_bad_token_is_refused() {
    let h = harness(SimConfig {
        events: 0,
        reporting: ReportingConfig {
            token: "right-token".into(),
            ..ReportingConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    let id = h.sim.add_phishing_test(1200);
    let reader = client(&h, "right-token", "limited");
    assert!(read_all(&h, &reader, 2, Some(id)).await.is_none());
    assert_eq!(h.sim.reporting_requests().len(), 2, "the limit was 2");

    let wrong = client(&h, "wrong-token", "refused");
    let day = utc_day(time::OffsetDateTime::now_utc());
    assert_eq!(
        admit_reporting_request(&h.app.store, &wrong, &day, 10)
            .await
            .unwrap(),
        Admission::Granted
    );
    let refused = wrong
        .security_tests_page(1, REPORTING_PER_PAGE)
        .await
        .unwrap_err();
    assert!(matches!(refused, ApiError::Unauthorized(_)), "{refused}");
    assert!(!refused.retriable(), "a refusal is not asked again");
    let last = h.sim.reporting_requests().pop().unwrap();
    assert_eq!((last.status, last.authorized), (200, false));
}
