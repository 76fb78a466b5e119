//! Issue 12, step 3: the Reporting API client against the simulator, each request
//! admitted through the account's ledger and send slot in DynamoDB (moto).

use std::collections::BTreeMap;
use std::time::Duration;

use knowbe4_source::domain::quota::utc_day;
use knowbe4_source::knowbe4::events::ApiError;
use knowbe4_source::knowbe4::reporting::{
    REPORTING_FALLBACK_PER_PAGE, REPORTING_MAX_BODY_BYTES, REPORTING_PER_PAGE, ReportingClient,
};
use knowbe4_source::run::{Admission, admit_reporting_request};
use knowbe4_source::testkit::sim::{
    BURST_PER_MINUTE, BURST_PER_SECOND, ReportingConfig, ReportingReading, SimConfig, Simulator,
    TooManyWording,
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
    assert!(
        crate::phishing::most_in_window(&log, 1_000) <= BURST_PER_SECOND,
        "{log:?}"
    );
    assert!(
        crate::phishing::most_in_window(&log, 60_000) <= BURST_PER_MINUTE,
        "{log:?}"
    );
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

// The client under each reading of what the public record leaves open (the simulator's
// `ReportingReading`). No store here: these read the simulator directly, unpaced, with
// its burst limits off (429s come from the readings' throttling alone).

/// Tests in the list (none with recipients) besides the one with [`RECIPIENTS`].
const TESTS: usize = 150;
/// Recipients of the test whose recipients are walked: a page of 500 of
/// `large-records` is over the client's cap.
const RECIPIENTS: usize = 500;

/// A simulator playing `reading`, with [`TESTS`] + 1 tests; returns it, a client and the
/// `pst_id` of the test with [`RECIPIENTS`] recipients.
async fn reading_sim(reading: ReportingReading) -> (Simulator, ReportingClient, u64) {
    let sim = Simulator::spawn(SimConfig {
        events: 0,
        reporting: ReportingConfig {
            enforce_limits: false,
            reading,
            ..ReportingConfig::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let pst = sim.add_phishing_test(RECIPIENTS);
    for _ in 0..TESTS {
        sim.add_phishing_test(0);
    }
    let client = ReportingClient::new(
        knowbe4_source::app::knowbe4_http_client().unwrap(),
        &sim.base_url(),
        SecretString::from("sim-reporting-token"),
        "readings",
        Duration::from_secs(30),
    );
    (sim, client, pst)
}

/// What one walk of a list saw.
#[derive(Debug, Default)]
struct Walk {
    /// Each non-empty page's record ids (`pst_id` or `recipient_id`), in order.
    pages: Vec<Vec<u64>>,
    /// Whether an empty page (or a 404 past the first page) ended the list.
    ended: bool,
    /// Whether a 404 past the first page ended it.
    not_found: bool,
    /// The `per_page` the walk ended up asking.
    per_page: u32,
    /// `Retry-After` of each 429 met.
    rate_limited: Vec<Option<Duration>>,
}

impl Walk {
    fn ids(&self) -> Vec<u64> {
        self.pages.iter().flatten().copied().collect()
    }
}

/// Walks a list from page 1 asking [`REPORTING_PER_PAGE`], starting over at
/// [`REPORTING_FALLBACK_PER_PAGE`] after a too-large page, retrying a 429 after its
/// `Retry-After` (at most 2 s here), until an empty page or `max_pages` pages.
async fn walk(client: &ReportingClient, pst: Option<u64>, max_pages: usize) -> Walk {
    let mut walk = Walk {
        per_page: REPORTING_PER_PAGE,
        ..Walk::default()
    };
    let key = if pst.is_some() {
        "recipient_id"
    } else {
        "pst_id"
    };
    while walk.pages.len() < max_pages {
        let page = walk.pages.len() as u32 + 1;
        let answer = match pst {
            None => client.security_tests_page(page, walk.per_page).await,
            Some(id) => client.recipients_page(id, page, walk.per_page).await,
        };
        match answer {
            Ok(answer) if answer.ends_list() => {
                walk.ended = true;
                break;
            }
            Err(ApiError::NotKnowBe4) if page > 1 => {
                walk.ended = true;
                walk.not_found = true;
                break;
            }
            Ok(answer) => walk.pages.push(
                answer
                    .items
                    .iter()
                    .map(|item| {
                        let value: serde_json::Value = serde_json::from_str(item.get()).unwrap();
                        value[key].as_u64().unwrap()
                    })
                    .collect(),
            ),
            Err(ApiError::TooLarge { limit }) if walk.per_page == REPORTING_PER_PAGE => {
                assert_eq!(limit, REPORTING_MAX_BODY_BYTES);
                walk.per_page = REPORTING_FALLBACK_PER_PAGE;
                walk.pages.clear();
            }
            Err(ApiError::RateLimited { retry_after }) => {
                assert!(walk.rate_limited.len() < 20, "429 after 429: {walk:?}");
                walk.rate_limited.push(retry_after);
                tokio::time::sleep(retry_after.unwrap_or_default().min(Duration::from_secs(2)))
                    .await;
            }
            Err(err) => panic!("page {page}: {err}"),
        }
    }
    walk
}

fn ids_of(values: &[serde_json::Value], key: &str) -> Vec<u64> {
    values.iter().map(|v| v[key].as_u64().unwrap()).collect()
}

/// Under every reading of the matrix the client reads what the reading serves: every
/// record once up to an empty page where the reading has one, page 1 again where `page`
/// is ignored, the last page again past the end where the list never ends, records
/// moving across page boundaries where the order shifts, 429s as `RateLimited` with the
/// reading's `Retry-After`, and a too-large page of 500 then pages of 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_every_reading_of_the_matrix() {
    let names: Vec<&str> = ReportingReading::matrix().iter().map(|(n, _)| *n).collect();
    assert_eq!(names.len(), 12, "{names:?}");
    for (name, reading) in ReportingReading::matrix() {
        let (sim, client, pst) = reading_sim(reading).await;
        let oracle_tests = ids_of(&sim.phishing_tests(), "pst_id");
        let oracle_recipients = ids_of(&sim.phishing_recipients(pst), "recipient_id");
        let tests = walk(&client, None, 12).await;
        let recipients = walk(&client, Some(pst), 12).await;
        match name {
            "honoured-500"
            | "cap-100"
            | "cap-50"
            | "throttled-retry-after"
            | "throttled-limit-wording"
            | "large-records"
            | "404-past-end" => {
                for (walk, oracle) in [(&tests, &oracle_tests), (&recipients, &oracle_recipients)] {
                    // What the server serves of what the walk asked last.
                    let page = walk.per_page.min(reading.max_per_page) as usize;
                    assert!(walk.ended, "{name}: {walk:?}");
                    assert_eq!(walk.not_found, name == "404-past-end", "{name}: {walk:?}");
                    assert_eq!(&walk.ids(), oracle, "{name}: every record once, in order");
                    assert_eq!(walk.pages.len(), oracle.len().div_ceil(page), "{name}");
                    assert!(walk.pages.iter().all(|p| p.len() <= page), "{name}");
                }
            }
            "page-ignored" => {
                for walk in [&tests, &recipients] {
                    assert!(!walk.ended, "{name}: never an empty page");
                    assert_eq!(walk.pages.len(), 12, "{name}");
                    assert!(walk.pages.iter().all(|p| *p == walk.pages[0]), "{name}");
                    assert_eq!(walk.pages[0].len(), 100, "{name}: capped at 100");
                }
                assert_eq!(tests.pages[0], oracle_tests[..100], "{name}");
            }
            "repeat-last" => {
                for (walk, oracle) in [(&tests, &oracle_tests), (&recipients, &oracle_recipients)] {
                    assert!(!walk.ended, "{name}: never an empty page");
                    let last = oracle.len().div_ceil(100);
                    assert_eq!(walk.ids()[..oracle.len()], oracle[..], "{name}");
                    assert!(
                        walk.pages[last..]
                            .iter()
                            .all(|p| *p == walk.pages[last - 1]),
                        "{name}: the last page again"
                    );
                }
            }
            "insert-front" => {
                // Newest first, and a new test before each page after the first: the last
                // record of page 1 is the first of page 2, nothing present at the start
                // is skipped, and the list still ends.
                assert!(tests.ended, "{name}: {tests:?}");
                assert_eq!(tests.pages[1][0], *tests.pages[0].last().unwrap(), "{name}");
                let seen: std::collections::BTreeSet<u64> = tests.ids().into_iter().collect();
                assert!(oracle_tests.iter().all(|id| seen.contains(id)), "{name}");
                assert!(sim.phishing_tests().len() > oracle_tests.len(), "{name}");
                let mut newest_first = oracle_recipients.clone();
                newest_first.reverse();
                assert_eq!(recipients.ids(), newest_first, "{name}");
            }
            "rotate" => {
                // Rotated by one more on each request: one walk repeats the record at
                // each page boundary and misses as many.
                for (walk, oracle) in [(&tests, &oracle_tests), (&recipients, &oracle_recipients)] {
                    assert!(walk.ended, "{name}: {walk:?}");
                    let ids = walk.ids();
                    let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
                    assert!(distinct.len() < oracle.len(), "{name}: nothing missed?");
                    assert!(distinct.len() < ids.len(), "{name}: nothing repeated?");
                    assert_eq!(walk.pages[1][0], *walk.pages[0].last().unwrap(), "{name}");
                }
                let oracle_now = ids_of(&sim.phishing_tests(), "pst_id");
                assert_eq!(oracle_now, oracle_tests, "{name}: the oracle holds still");
            }
            "cap-100-offset-by-asked" => {
                // Asked for 500, served 100, counted by 500: page k starts at record
                // 500 × (k − 1), so a reader asking 500 never sees records 100–499.
                for (walk, oracle) in [(&tests, &oracle_tests), (&recipients, &oracle_recipients)] {
                    assert!(walk.ended, "{name}: {walk:?}");
                    for (k, page) in walk.pages.iter().enumerate() {
                        assert_eq!(
                            page[..],
                            oracle[k * 500..(k * 500 + 100).min(oracle.len())],
                            "{name}"
                        );
                    }
                    if oracle.len() > 100 {
                        assert!(walk.ids().len() < oracle.len(), "{name}: records skipped");
                    }
                }
            }
            other => panic!("a reading this test does not know: {other}"),
        }
        let throttled: Vec<Option<Duration>> = tests
            .rate_limited
            .iter()
            .chain(&recipients.rate_limited)
            .copied()
            .collect();
        match name {
            "throttled-retry-after" => {
                assert!(!throttled.is_empty(), "{name}");
                assert!(
                    throttled.iter().all(|r| *r == Some(Duration::from_secs(1))),
                    "{name}"
                );
            }
            "throttled-limit-wording" => {
                assert!(!throttled.is_empty(), "{name}");
                assert!(throttled.iter().all(Option::is_none), "{name}");
            }
            _ => assert!(throttled.is_empty(), "{name}: {throttled:?}"),
        }
        let expected = if name == "large-records" {
            REPORTING_FALLBACK_PER_PAGE
        } else {
            REPORTING_PER_PAGE
        };
        assert_eq!(recipients.per_page, expected, "{name}");
        sim.shutdown().await;
    }
}

/// A 429 is `RateLimited` with the full `Retry-After` (or none), whatever its body says:
/// the User Event API's "Limit Exceeded" is not read as the daily limit here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_429_is_rate_limited_with_its_retry_after() {
    let (sim, client, _) = reading_sim(ReportingReading::default()).await;
    for wording in [
        TooManyWording::ByCause,
        TooManyWording::RateLimitExceeded,
        TooManyWording::LimitExceeded,
        TooManyWording::TooManyRequests,
    ] {
        for secs in [None, Some(1), Some(3600), Some(86_400)] {
            sim.set_reporting_reading(ReportingReading {
                wording,
                retry_after_secs: secs,
                ..ReportingReading::default()
            });
            sim.throttle_reporting(1);
            let error = client
                .security_tests_page(1, REPORTING_PER_PAGE)
                .await
                .unwrap_err();
            match error {
                ApiError::RateLimited { retry_after } => {
                    assert_eq!(retry_after, secs.map(Duration::from_secs), "{wording:?}")
                }
                other => panic!("{wording:?} {secs:?}: {other:?}"),
            }
            let next = client.security_tests_page(1, REPORTING_PER_PAGE).await;
            assert!(next.is_ok(), "one 429 only: {next:?}");
        }
    }
    let log = sim.reporting_requests();
    assert_eq!(log.iter().filter(|r| r.status == 429).count(), 16);
    sim.shutdown().await;
}

/// A page of large records over the cap is `TooLarge` (not malformed, not retriable) at
/// 500 a page, and read whole at 100 a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_page_is_too_large_at_500_and_read_at_100() {
    let reading = ReportingReading::by_name("large-records").unwrap();
    let (sim, client, pst) = reading_sim(reading).await;
    let error = client
        .recipients_page(pst, 1, REPORTING_PER_PAGE)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ApiError::TooLarge { limit } if limit == REPORTING_MAX_BODY_BYTES),
        "{error:?}"
    );
    assert!(!error.retriable(), "the same request gets the same answer");
    assert_eq!(error.kind(), "too_large");
    let page = client
        .recipients_page(pst, 1, REPORTING_FALLBACK_PER_PAGE)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 100);
    let bytes: usize = page.items.iter().map(|i| i.get().len()).sum();
    assert!(
        bytes * 5 > REPORTING_MAX_BODY_BYTES,
        "500 of these would not fit: {bytes}"
    );
    assert!(
        page.items[0].get().contains(r"\u0026"),
        "escapes kept as sent"
    );
    sim.shutdown().await;
}
