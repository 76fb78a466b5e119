//! The collector end to end under every reading of the API's unconfirmed details
//! (`meta.count` per page / per list / absent, pages capped at 50 / 100, `total_pages`
//! and `limit_value` sent or not): first run cut by the deadline, churn (new, backdated
//! and deleted events) between runs, a malformed page mid-walk, resume. Every cell:
//! nothing lost, no duplicates, at most 4 requests in any second, every run within the
//! walk's request bound.

use std::collections::HashSet;

use knowbe4_source::run::{Outcome, RunReport, collect_source};
use knowbe4_source::testkit::sim::{Fault, Reading, SimConfig};

use crate::helpers::*;

/// A run's request bound: every page of the list once, plus the probes and boundary page
/// of each gap (at most 32 gaps are kept, but a run walks few), the step-backs and one
/// malformed page asked again (see `checkpoint`'s design doc).
fn assert_within_bound(report: &RunReport, events: usize, reading: &Reading, context: &str) {
    let page = reading.max_per_page.min(100) as usize;
    let bound = events.div_ceil(page) + 14 * 3 + 12 + 2;
    assert!(
        (report.requests as usize) <= bound,
        "{context}: {} requests, bound {bound}: {report:?}",
        report.requests
    );
}

async fn cell(reading: Reading, events: usize) {
    let context = format!("{reading}, {events} events");
    let key = "reading-key";
    let h = harness(SimConfig {
        api_key: key.into(),
        events,
        span_hours: 48,
        seed: 7 + events as u64,
        reading,
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

    // A first run cut short by the deadline leaves a backlog (when the list is long).
    let first = collect_source(h.app.run_context(), &id, deadline(8)).await;
    assert_eq!(first.outcome, Outcome::Collected, "{context}: {first:?}");
    assert_within_bound(&first, events, &reading, &context);

    // Churn between runs, and one malformed page in the middle of a walk.
    for round in 0..3u64 {
        h.sim.add_events(37 + round as usize * 20, 0);
        h.sim.add_events(7, 1200); // backdated 20 minutes, inside the 60-minute window
        h.sim.delete_events(5);
        if round == 1 {
            h.sim.inject(Fault::Pass, 1);
            h.sim.inject(Fault::Malformed, 1);
        }
        let report = collect_source(h.app.run_context(), &id, deadline(60)).await;
        assert_eq!(report.outcome, Outcome::Collected, "{context}: {report:?}");
        assert_within_bound(&report, h.sim.event_ids().len(), &reading, &context);
    }
    let last = collect_source(h.app.run_context(), &id, deadline(60)).await;
    assert_eq!(last.outcome, Outcome::Collected, "{context}: {last:?}");
    assert!(!last.backlog, "{context}: {last:?}");

    let received = h.sink.event_ids();
    let dups = duplicates(&received);
    assert!(dups.is_empty(), "{context}: {} duplicates", dups.len());
    let received: HashSet<String> = received.into_iter().collect();
    let lost = h
        .sim
        .event_ids()
        .into_iter()
        .filter(|id| !received.contains(id))
        .count();
    assert_eq!(lost, 0, "{context}: events lost");
    assert_rate_respected(&h.sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_reading_delivers_everything_once_within_the_bound() {
    let cells = Reading::matrix()
        .into_iter()
        .flat_map(|reading| [(reading, 250), (reading, 1_253)]);
    futures::future::join_all(cells.map(|(reading, events)| cell(reading, events))).await;
}
