//! Hostile and broken answers, from KnowBe4 and from the destination.
//!
//! Every scenario checks the same promises: the run ends within its deadline without
//! panicking, a failure leaves a health event that says what went wrong, the checkpoint
//! never moves backwards, and once the fault is gone a normal run delivers every
//! simulator event exactly once (nothing lost, nothing repeated).
//!
//! Scenarios of the same shape run concurrently inside one test, each with its own
//! table, simulator and sink, so that the retries they wait out overlap instead of adding
//! up.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use knowbe4_source::HealthKind;
use knowbe4_source::app::App;
use knowbe4_source::run::{Outcome, RunReport, collect_source};
use knowbe4_source::testkit::sim::{Fault, SimConfig};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use crate::helpers::*;

const KEY: &str = "hostile-key";
/// How far past its deadline a run may end: the lease release and state writes.
const SLACK: Duration = Duration::from_secs(3);
/// Queued faults that outlast any run.
const FOREVER: u32 = 100_000;

/// A harness over `events` simulator events and a source created on it.
async fn source_on(events: usize, extra: serde_json::Value) -> (Harness, String) {
    let h = harness(SimConfig {
        api_key: KEY.into(),
        events,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), KEY, extra),
            Some("hostile".into()),
        )
        .await
        .unwrap();
    (h, id)
}

/// A source's checkpoint, seen after each run: it may only move forward.
struct CheckpointWatch {
    /// The source watched.
    id: String,
    /// The newest high-water mark seen so far.
    last: Option<OffsetDateTime>,
}

impl CheckpointWatch {
    fn new(id: &str) -> Self {
        CheckpointWatch {
            id: id.to_string(),
            last: None,
        }
    }

    /// Reads the checkpoint and fails the test if it went backwards or vanished.
    async fn check(&mut self, app: &App, context: &str) -> Option<OffsetDateTime> {
        let status = app.status(Some(&self.id)).await.unwrap().remove(0);
        let now = status
            .checkpoint
            .as_deref()
            .map(|text| OffsetDateTime::parse(text, &Rfc3339).expect("an RFC 3339 checkpoint"));
        match (self.last, now) {
            (Some(before), None) => panic!("{context}: the checkpoint {before} was dropped"),
            (Some(before), Some(after)) => assert!(
                after >= before,
                "{context}: the checkpoint went back from {before} to {after}"
            ),
            _ => {}
        }
        self.last = now.or(self.last);
        now
    }
}

/// Runs one collection with a deadline `secs` away; checks it ended in time and that the
/// checkpoint did not go backwards.
async fn run(h: &Harness, watch: &mut CheckpointWatch, secs: u64, context: &str) -> RunReport {
    let started = Instant::now();
    let report = collect_source(h.app.run_context(), &watch.id, deadline(secs)).await;
    let took = started.elapsed();
    assert!(
        took <= Duration::from_secs(secs) + SLACK,
        "{context}: a {secs} s run took {took:?}: {report:?}"
    );
    watch.check(&h.app, context).await;
    report
}

/// Checks a failed run: the report's and the stored health event's type, and that the
/// event's message contains `needle`.
async fn assert_failed(
    h: &Harness,
    report: &RunReport,
    kind: HealthKind,
    needle: &str,
    context: &str,
) {
    assert_eq!(report.outcome, Outcome::Failed, "{context}: {report:?}");
    assert_eq!(report.health, Some(kind), "{context}: {report:?}");
    let events = h.app.health(&report.source_id).await.unwrap();
    let latest = events
        .first()
        .unwrap_or_else(|| panic!("{context}: no health event was recorded"));
    assert_eq!(latest.kind, kind, "{context}: {latest:?}");
    assert!(
        latest.message.contains(needle),
        "{context}: the health event does not say {needle:?}: {:?}",
        latest.message
    );
}

/// Clears the simulator's faults, collects until caught up, and checks that the sink
/// holds every simulator event exactly once.
async fn assert_recovers_everything(h: &Harness, watch: &mut CheckpointWatch, context: &str) {
    h.sim.clear_faults();
    for attempt in 1..=3 {
        let report = run(h, watch, 30, context).await;
        assert_eq!(
            report.outcome,
            Outcome::Collected,
            "{context}: clean run {attempt}: {report:?}"
        );
        if report.detail == "caught up" && !report.backlog {
            break;
        }
    }
    assert_exactly_once(h, context);
}

/// Every simulator event is in the sink, once.
fn assert_exactly_once(h: &Harness, context: &str) {
    let received = h.sink.event_ids();
    let dups = duplicates(&received);
    assert!(
        dups.is_empty(),
        "{context}: {} events delivered twice, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(3)]
    );
    let received: HashSet<String> = received.into_iter().collect();
    let present = h.sim.event_ids();
    let lost = present.iter().filter(|id| !received.contains(*id)).count();
    assert_eq!(
        lost,
        0,
        "{context}: {lost} of {} events never delivered",
        present.len()
    );
    assert_eq!(received.len(), present.len(), "{context}: unknown events");
}

/// Where a scenario's source points.
#[derive(Clone, Copy, Debug)]
enum Base {
    /// The simulator.
    Sim,
    /// A host that does not resolve.
    UnresolvableHost,
    /// `https://` to the simulator's plain-HTTP port: the TLS handshake fails.
    TlsToPlainHttp,
}

/// One KnowBe4 misbehaviour and what the first run must report.
struct Case {
    /// Shown in failures.
    name: &'static str,
    /// Faults queued before the first run, in order.
    faults: Vec<(Fault, u32)>,
    /// Where the source points for the first run.
    base: Base,
    /// The first run's deadline.
    deadline_secs: u64,
    /// `None`: the first run must collect. `Some(needle)`: it must fail with a
    /// ThirdPartyGenericError whose message contains `needle`.
    fails_with: Option<&'static str>,
    /// Events the first run must have forwarded (and checkpointed) before it stopped.
    min_forwarded: u64,
}

impl Case {
    /// The fault on every request from the second on: page 1 is served, the walk breaks
    /// in its middle, after a first batch was forwarded.
    fn mid_walk(name: &'static str, fault: Fault, needle: &'static str) -> Self {
        Case {
            name,
            faults: vec![(Fault::Pass, 1), (fault, FOREVER)],
            base: Base::Sim,
            deadline_secs: 30,
            fails_with: Some(needle),
            // Page 1 of the default reading: 50 events (asked for 100).
            min_forwarded: 50,
        }
    }
}

/// Runs one case end to end: first run as the case says, then a clean recovery.
async fn scenario(case: Case) {
    let context = case.name;
    let (h, id) = source_on(250, serde_json::json!({})).await;
    let base = match case.base {
        Base::Sim => None,
        Base::UnresolvableHost => Some("https://no-such-host.invalid".to_string()),
        Base::TlsToPlainHttp => Some(format!("https://127.0.0.1:{}", h.sim.addr().port())),
    };
    if let Some(base) = &base {
        h.app
            .update(&id, source_json(base, KEY, serde_json::json!({})))
            .await
            .unwrap();
    }
    for (fault, count) in &case.faults {
        h.sim.inject(fault.clone(), *count);
    }
    let mut watch = CheckpointWatch::new(&id);
    let first = run(&h, &mut watch, case.deadline_secs, context).await;
    match case.fails_with {
        Some(needle) => {
            assert_failed(
                &h,
                &first,
                HealthKind::ThirdPartyGenericError,
                needle,
                context,
            )
            .await;
            let status = h.app.status(Some(&id)).await.unwrap().remove(0);
            assert!(
                status.retry_deadline.is_some(),
                "{context}: a generic error is retried"
            );
        }
        None => assert_eq!(first.outcome, Outcome::Collected, "{context}: {first:?}"),
    }
    assert!(
        first.forwarded >= case.min_forwarded,
        "{context}: the events read before the fault were not forwarded: {first:?}"
    );
    // Whatever reached the sink so far is exactly what the checkpoint covers.
    let status = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(
        status.forwarded_total as usize,
        h.sink.event_ids().len(),
        "{context}: the checkpoint and the destination disagree"
    );
    if base.is_some() {
        h.app
            .update(
                &id,
                source_json(&h.sim.base_url(), KEY, serde_json::json!({})),
            )
            .await
            .unwrap();
    }
    assert_recovers_everything(&h, &mut watch, context).await;
    assert_rate_respected(&h.sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_knowbe4_pages_fail_the_run_and_lose_nothing() {
    let cases = vec![
        Case::mid_walk("gigantic body", Fault::Gigantic, "larger than"),
        // A 200 whose JSON ends mid-value broke off on the way: retried, as a transport
        // failure, not refused as a malformed (deterministic) answer.
        Case::mid_walk("truncated JSON", Fault::Malformed, "broke off"),
        Case::mid_walk("HTML instead of JSON", Fault::Html, "malformed"),
        Case::mid_walk("data is an object", Fault::WrongTypes, "malformed"),
        Case::mid_walk("no meta", Fault::MissingMeta, "no `meta`"),
        // An unreadable occurred_date no longer fails the page (it is forwarded as sent):
        // see a_wrongly_typed_occurred_date_is_forwarded_as_sent_and_reported.
        Case::mid_walk("event without id", Fault::EventWithoutId, "`id`"),
        // The empty page claims more pages follow: taking it as the end was a loss bug.
        Case::mid_walk("empty page mid-list", Fault::EmptyPage, "more pages follow"),
        // `next_page` is never followed, but on the short last page it contradicts the
        // page's size: refused rather than guessed at.
        Case::mid_walk(
            "next_page back to 1",
            Fault::NextPageBackwards,
            "more pages follow",
        ),
        Case::mid_walk(
            "next_page the same page",
            Fault::NextPageSame,
            "more pages follow",
        ),
        Case::mid_walk("HTTP 500", Fault::Status(500), "HTTP 500"),
    ];
    futures::future::join_all(cases.into_iter().map(scenario)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_slow_and_cut_off_knowbe4_is_bounded_and_loses_nothing() {
    let cases = vec![
        Case::mid_walk("connection reset", Fault::Reset, "could not be reached"),
        Case {
            name: "DNS failure",
            faults: vec![],
            base: Base::UnresolvableHost,
            deadline_secs: 30,
            fails_with: Some("could not be reached"),
            min_forwarded: 0,
        },
        Case {
            name: "TLS to a plain-HTTP port",
            faults: vec![],
            base: Base::TlsToPlainHttp,
            deadline_secs: 30,
            fails_with: Some("could not be reached"),
            min_forwarded: 0,
        },
        // Headers never come: every attempt times out (5 s) and the run gives up before
        // its deadline instead of starting an attempt it cannot finish.
        Case {
            name: "no answer at all",
            faults: vec![(Fault::Slow(120_000), FOREVER)],
            base: Base::Sim,
            deadline_secs: 20,
            fails_with: Some("timed out"),
            min_forwarded: 0,
        },
        // Once each: cut at the 5 s timeout, retried, and the run completes.
        Case {
            name: "a body dripping past the timeout",
            faults: vec![(Fault::Drip, 1)],
            base: Base::Sim,
            deadline_secs: 30,
            fails_with: None,
            min_forwarded: 0,
        },
        Case {
            name: "headers later than the timeout",
            faults: vec![(Fault::Slow(6_000), 1)],
            base: Base::Sim,
            deadline_secs: 30,
            fails_with: None,
            min_forwarded: 0,
        },
        Case {
            name: "resets, then fine",
            faults: vec![(Fault::Reset, 2)],
            base: Base::Sim,
            deadline_secs: 30,
            fails_with: None,
            min_forwarded: 0,
        },
    ];
    futures::future::join_all(cases.into_iter().map(scenario)).await;
}

/// Regression: an empty page in the middle of the list used to end the walk, and every
/// event after it was never collected. Now it is refused and re-read within the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_page_in_the_middle_does_not_end_the_walk() {
    let (h, id) = source_on(450, serde_json::json!({})).await;
    h.sim.inject(Fault::Pass, 1);
    h.sim.inject(Fault::EmptyPage, 1);
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 30, "empty page").await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert_eq!(report.detail, "caught up");
    assert!(!report.backlog, "{report:?}");
    assert_exactly_once(&h, "empty page, in the same run");
    // Pipelined requests can arrive out of order: the empty answer went to whichever
    // request came second, and that page was read again.
    let log = h.sim.requests();
    let emptied = &log[1].query;
    let reads = log.iter().filter(|r| r.query == *emptied).count();
    assert!(reads >= 2, "{emptied} was not read again: {log:#?}");
    assert_rate_respected(&h.sim);
}

/// `429` without `Limit Exceeded` is throttling: retried within the run, and the retries
/// still keep to four requests in every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_answers_are_retried_within_the_rate_limit() {
    let (h, id) = source_on(450, serde_json::json!({})).await;
    h.sim.inject(Fault::StatusRetryAfter(429, 1), 2);
    h.sim.inject(Fault::Pass, 2);
    h.sim.inject(Fault::StatusRetryAfter(429, 1), 3);
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 30, "429").await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert!(report.health.is_none());
    assert!(h.app.health(&id).await.unwrap().is_empty());
    assert_exactly_once(&h, "429");
    let throttled = h.sim.requests().iter().filter(|r| r.status == 429).count();
    assert_eq!(throttled, 5);
    assert_rate_respected(&h.sim);
}

/// After a `429` with `Retry-After: 2`, no request may reach KnowBe4 for two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_on_every_retry() {
    let (h, id) = source_on(150, serde_json::json!({})).await;
    // Page 1 is the first request of the walk: nothing else is in flight.
    h.sim.inject(Fault::StatusRetryAfter(429, 2), 2);
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 30, "Retry-After").await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    let log = h.sim.requests();
    for (n, pair) in log.windows(2).enumerate() {
        if pair[0].status == 429 {
            let waited = pair[1].at_ms - pair[0].at_ms;
            assert!(
                waited >= 1_950,
                "request {} came {waited} ms after a 429 asking for 2 s",
                n + 1
            );
        }
    }
    assert_exactly_once(&h, "Retry-After");
}

/// A server stuck on page 1 (or a cache that ignores the query string), for good: the run
/// is bounded by its deadline, and once the server pages again nothing is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stuck_on_page_one_is_bounded_and_loses_nothing() {
    let (h, id) = source_on(250, serde_json::json!({})).await;
    h.sim.inject(Fault::Pass, 1);
    h.sim.inject(Fault::Loop, FOREVER);
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 10, "stuck on page 1").await;
    assert_ne!(report.outcome, Outcome::Skipped, "{report:?}");
    assert_recovers_everything(&h, &mut watch, "stuck on page 1").await;
    assert_rate_respected(&h.sim);
}

/// A full page of events the walk has already passed, while `meta.count` did not grow,
/// cannot come from inserts above the walk: the server is not paging. It should be a
/// health event, not a run that spends its whole budget re-reading page 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stuck_on_page_one_is_reported() {
    let (h, id) = source_on(250, serde_json::json!({})).await;
    h.sim.inject(Fault::Pass, 1);
    h.sim.inject(Fault::Loop, FOREVER);
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 10, "stuck on page 1").await;
    assert_failed(
        &h,
        &report,
        HealthKind::ThirdPartyGenericError,
        "malformed",
        "stuck on page 1",
    )
    .await;
    assert!(report.requests <= 8, "{report:?}");
}

/// The same server, stuck for three requests only, then paging normally again: the walk
/// must not take pages 2 to 4 as read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stuck_on_page_one_for_a_moment_loses_nothing() {
    let (h, id) = source_on(1000, serde_json::json!({})).await;
    h.sim.inject(Fault::Pass, 1);
    h.sim.inject(Fault::Loop, 3);
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 30, "stuck for a moment").await;
    assert_ne!(report.outcome, Outcome::Skipped, "{report:?}");
    assert_recovers_everything(&h, &mut watch, "stuck for a moment").await;
}

/// A request that failed, followed by no time left for another, is still a failure: if
/// KnowBe4 never answers and each run's deadline leaves room for one attempt only, every
/// run must say so, not report a successful collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_near_the_deadline_is_a_failure() {
    let (h, id) = source_on(150, serde_json::json!({})).await;
    h.sim.inject(Fault::Slow(120_000), FOREVER);
    let mut watch = CheckpointWatch::new(&id);
    // Room for one 5 s attempt (the run stops sending with less than 6 s left), not two.
    let report = run(&h, &mut watch, 11, "one attempt, timed out").await;
    assert_failed(
        &h,
        &report,
        HealthKind::ThirdPartyGenericError,
        "timed out",
        "one attempt, timed out",
    )
    .await;
}

/// The health event of an event whose `occurred_date` is not a string must say so, not
/// send the reader looking for a missing `id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrongly_typed_occurred_date_is_forwarded_as_sent_and_reported() {
    // The first release failed the page on every run: the source stopped for good.
    let (h, id) = source_on(150, serde_json::json!({})).await;
    h.sim.inject(Fault::OccurredDateNumber, FOREVER);
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 30, "occurred_date a number").await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert_eq!(report.undated_events, 3, "one per page: {report:?}");
    let events = h.sink.events();
    let numeric = events
        .iter()
        .filter(|e| e["occurred_date"].is_number())
        .count();
    assert_eq!(numeric, 3, "forwarded as KnowBe4 sent them");
    let ids = h.sink.event_ids();
    assert!(duplicates(&ids).is_empty());
    let present: HashSet<String> = h.sim.event_ids().into_iter().collect();
    let received: HashSet<String> = ids.into_iter().collect();
    assert_eq!(received, present, "nothing lost");
}

// ---- Hostile destinations ------------------------------------------------------------

/// A destination that answers every request with an nginx-style HTML page (`200`), or
/// never answers at all; counts the requests it got.
struct OddDestination {
    /// Its URL (a fake token in the path, like a Sumo URL).
    url: String,
    /// Requests received.
    hits: Arc<AtomicUsize>,
    /// The server, aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

impl OddDestination {
    async fn spawn(hang: bool) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move |_body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                if hang {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                (
                    [("content-type", "text/html")],
                    "<html><body><h1>Welcome to nginx!</h1></body></html>",
                )
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OddDestination {
            url: format!("http://{addr}/receiver/v1/http/ODD"),
            hits,
            task,
        }
    }
}

impl Drop for OddDestination {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `200` is success whatever its body says: nothing there can be told apart from an
/// accepting endpoint, so the events count as delivered and the checkpoint moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_answering_html_200_counts_as_accepted() {
    let odd = OddDestination::spawn(false).await;
    let (h, id) = source_on(
        250,
        serde_json::json!({"destination": {"format": "ndjson", "url": odd.url}}),
    )
    .await;
    let mut watch = CheckpointWatch::new(&id);
    let report = run(&h, &mut watch, 30, "HTML 200").await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert_eq!(report.forwarded, 250);
    assert!(odd.hits.load(Ordering::SeqCst) >= 1);
    assert!(watch.last.is_some(), "the checkpoint moved");
}

/// `500` forever: a FirstPartyGenericError, the checkpoint exactly where it was, and the
/// events delivered once the destination is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_failing_forever_keeps_the_checkpoint() {
    let (h, id) = source_on(250, serde_json::json!({})).await;
    let mut watch = CheckpointWatch::new(&id);
    let first = run(&h, &mut watch, 30, "before the outage").await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    let before = h.app.status(Some(&id)).await.unwrap().remove(0);
    h.sim.add_events(40, 0);
    h.sink.set_down(Some(500));
    let failed = run(&h, &mut watch, 20, "500 forever").await;
    assert_failed(
        &h,
        &failed,
        HealthKind::FirstPartyGenericError,
        "HTTP 500",
        "500 forever",
    )
    .await;
    let after = h.app.status(Some(&id)).await.unwrap().remove(0);
    assert_eq!(after.checkpoint, before.checkpoint);
    assert_eq!(after.forwarded_total, before.forwarded_total);
    h.sink.set_down(None);
    assert_recovers_everything(&h, &mut watch, "after the outage").await;
}

/// `401` from the destination is a configuration problem: ThirdPartyConfigError, the
/// source blocked (no retries), nothing moved; a restart after the fix delivers it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_refusing_its_credentials_is_a_config_error() {
    let (h, id) = source_on(250, serde_json::json!({})).await;
    h.sink.set_down(Some(401));
    let mut watch = CheckpointWatch::new(&id);
    let failed = run(&h, &mut watch, 30, "destination 401").await;
    assert_failed(
        &h,
        &failed,
        HealthKind::ThirdPartyConfigError,
        "401",
        "destination 401",
    )
    .await;
    assert_eq!(watch.last, None, "the checkpoint moved without delivery");
    let requests = h.sink.requests().len();
    let skipped = run(&h, &mut watch, 30, "blocked").await;
    assert_eq!(skipped.outcome, Outcome::Skipped, "{skipped:?}");
    assert_eq!(h.sink.requests().len(), requests, "a blocked source sent");
    h.sink.set_down(None);
    h.app.restart(&id).await.unwrap();
    assert_recovers_everything(&h, &mut watch, "after the fix").await;
}

/// A destination that never answers cannot hold the run past its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_slower_than_the_deadline_fails_in_time() {
    let odd = OddDestination::spawn(true).await;
    let (h, id) = source_on(
        250,
        serde_json::json!({"destination": {"format": "ndjson", "url": odd.url}}),
    )
    .await;
    let mut watch = CheckpointWatch::new(&id);
    let failed = run(&h, &mut watch, 20, "hanging destination").await;
    assert_failed(
        &h,
        &failed,
        HealthKind::FirstPartyGenericError,
        "destination",
        "hanging destination",
    )
    .await;
    assert_eq!(watch.last, None, "the checkpoint moved without delivery");
    assert!(odd.hits.load(Ordering::SeqCst) >= 1);
    h.app
        .update(
            &id,
            source_json(
                &h.sim.base_url(),
                KEY,
                serde_json::json!({"destination": {"format": "ndjson", "url": h.sink.url()}}),
            ),
        )
        .await
        .unwrap();
    assert_recovers_everything(&h, &mut watch, "after switching destination").await;
}
