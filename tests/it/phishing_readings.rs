//! The phishing stream under every reading of the Reporting API the public record allows
//! (`ReportingReading::matrix()`: page size honoured up to 500 or capped at 100 or 50,
//! `page` ignored, the last page repeated forever, a list whose order shifts between
//! requests, 429s with and without `Retry-After` in two wordings, records so large a page
//! of 500 is over the client's cap). Each reading gets its own simulator, source and
//! Reporting account; they run side by side.
//!
//! For every reading: every poll ends; after results move and the source is polled until
//! nothing changes (at most [`SETTLE_POLLS`] polls), the destination holds every test and
//! every recipient the server can serve in its latest state; nothing unchanged was sent
//! twice; the server saw at most 4 requests a second and 50 a minute; and a 429's
//! `Retry-After` was waited out before the next request.

use std::collections::BTreeSet;

use knowbe4_source::run::{DataType, Outcome, Trigger, collect_source_types};
use knowbe4_source::testkit::sim::{
    BURST_PER_MINUTE, BURST_PER_SECOND, Paging, ReportingReading, Shift, SimConfig, Simulator,
};
use serde_json::Value;

use crate::helpers::*;
use crate::phishing::{Received, middle_example, most_in_window};

/// Polls with nothing changing that a reading may need to deliver everything (a shifting
/// order can hide records from one walk; the next walks find them).
const SETTLE_POLLS: usize = 3;

/// `message` without the filler a large-records reading adds (the oracle has none).
fn unpadded(message: Option<&Value>) -> Option<Value> {
    let mut message = message?.clone();
    if let Value::Object(fields) = &mut message {
        fields.remove("sim_padding");
    }
    Some(message)
}

/// What the destination lacks or holds stale, against what `sim` serves now; tests in
/// `skip` (added by the simulator during the last poll) are left out. `None`: nothing.
fn behind(
    got: &Received,
    sim: &Simulator,
    skip: &BTreeSet<u64>,
    reachable: usize,
) -> Option<String> {
    for test in sim.phishing_tests() {
        let id = test["pst_id"].as_u64().unwrap();
        if skip.contains(&id) {
            continue;
        }
        if unpadded(got.tests.get(&id).and_then(|m| m.last())) != Some(test) {
            return Some(format!("test {id} missing or stale"));
        }
        for r in sim.phishing_recipients(id).into_iter().take(reachable) {
            let rid = r["recipient_id"].as_u64().unwrap();
            if unpadded(got.recipients.get(&rid).and_then(|m| m.last())) != Some(r) {
                return Some(format!("recipient {rid} of test {id} missing or stale"));
            }
        }
    }
    None
}

/// One reading, end to end; `Err` says what went wrong.
async fn one_reading(name: &'static str, mut reading: ReportingReading) -> Result<String, String> {
    if reading.retry_after_secs == Some(1) {
        // Longer than the client's own spacing (1.25 s), so waiting it out is visible.
        reading.retry_after_secs = Some(3);
    }
    let h = harness(SimConfig {
        events: 0,
        ..SimConfig::default()
    })
    .await;
    h.sim.set_reporting_reading(reading);
    // A server ignoring `page` serves only the first page of a list: every list fits.
    let page_ignored = reading.paging == Paging::PageIgnored;
    let tiny_pages = reading.max_per_page <= 5;
    let big_size = if page_ignored {
        90
    } else if tiny_pages {
        7
    } else {
        300
    };
    let reachable = if page_ignored {
        reading.max_per_page as usize
    } else {
        usize::MAX
    };
    let big = h.sim.add_phishing_test(big_size);
    let small = h.sim.add_phishing_test(if tiny_pages { 3 } else { 40 });
    h.sim.add_errored_phishing_test();
    h.sim
        .progress_phishing(None, if tiny_pages { 4 } else { 60 });
    let mut json = middle_example(&h.sim.base_url());
    json["source"]["config"]["reportingDailyRequestLimit"] = 10_000.into();
    let id = h
        .app
        .create(json, Some(format!("reading-{name}")))
        .await
        .map_err(|e| format!("create: {e}"))?;
    let mut polls = 0;
    let mut poll = || {
        polls += 1;
        collect_source_types(
            h.app.run_context(),
            &id,
            deadline(240),
            Trigger::OnDemand,
            Some(DataType::Phishing),
        )
    };
    let check = |report: &knowbe4_source::run::RunReport| {
        if report.outcome == Outcome::Collected && report.detail.contains("phishing: polled") {
            Ok(())
        } else {
            Err(format!("a poll did not complete: {report:?}"))
        }
    };
    check(&poll().await)?;
    h.sim
        .progress_phishing(Some(big), if tiny_pages { 3 } else { 25 });
    h.sim
        .progress_phishing(Some(small), if tiny_pages { 1 } else { 5 });
    h.sim.close_phishing_test(small);
    let mut skip = BTreeSet::new();
    let mut settled = false;
    for _ in 0..=SETTLE_POLLS {
        let before: BTreeSet<u64> = h
            .sim
            .phishing_tests()
            .iter()
            .map(|t| t["pst_id"].as_u64().unwrap())
            .collect();
        check(&poll().await)?;
        // A simulator inserting tests as it is read adds some during the poll: the next
        // poll reads them.
        skip = h
            .sim
            .phishing_tests()
            .iter()
            .map(|t| t["pst_id"].as_u64().unwrap())
            .filter(|id| !before.contains(id))
            .collect();
        if behind(&Received::of(&h.sink), &h.sim, &skip, reachable).is_none() {
            settled = true;
            break;
        }
    }
    let got = Received::of(&h.sink);
    if !settled {
        return Err(format!(
            "not settled after {polls} polls: {}",
            behind(&got, &h.sim, &skip, reachable).unwrap_or_default()
        ));
    }
    for (rid, messages) in got.tests.iter().chain(&got.recipients) {
        let distinct: BTreeSet<String> = messages.iter().map(Value::to_string).collect();
        if distinct.len() != messages.len() {
            return Err(format!("record {rid} sent twice unchanged"));
        }
    }
    // Byte for byte: the `\u0026` escapes KnowBe4 sends reach the destination as sent.
    if !h
        .sink
        .raw_events()
        .iter()
        .any(|raw| raw.contains("\\u0026"))
    {
        return Err("no forwarded record kept its \\u0026 escape".into());
    }
    let log = h.sim.reporting_requests();
    if most_in_window(&log, 1_000) > BURST_PER_SECOND
        || most_in_window(&log, 60_000) > BURST_PER_MINUTE
    {
        return Err(format!("the server saw more than 4/s or 50/min: {log:?}"));
    }
    let throttled = reading.throttle_every > 0;
    let answered_429 = log.iter().filter(|r| r.status == 429).count();
    if !throttled && answered_429 > 0 {
        return Err(format!(
            "{answered_429} answers 429 on an unthrottled reading"
        ));
    }
    if throttled && answered_429 == 0 {
        return Err("the throttled reading never answered 429: the test proves nothing".into());
    }
    // After a 429: its Retry-After, or without one a backoff of 2 s at least.
    let wait_ms = reading.retry_after_secs.map_or(2_000, |s| s * 1_000);
    for pair in log.windows(2) {
        if pair[0].status == 429 && pair[1].at_ms < pair[0].at_ms + wait_ms {
            return Err(format!(
                "a request {} ms after a 429 (wait {wait_ms} ms)",
                pair[1].at_ms - pair[0].at_ms
            ));
        }
    }
    let state = h
        .app
        .store
        .load_state(&id)
        .await
        .map_err(|e| e.to_string())?;
    let phishing = state
        .and_then(|s| s.value.phishing)
        .ok_or("no phishing state")?;
    if reading.record_padding > 0 && phishing.per_page != Some(100) {
        return Err(format!(
            "pages too large did not fall back to 100: {:?}",
            phishing.per_page
        ));
    }
    if reading.shift == Shift::Stable && polls != 2 {
        return Err(format!(
            "a list in a stable order needed {polls} polls to settle, not 2"
        ));
    }
    Ok(format!(
        "{name}: {polls} polls, {} requests, {} messages",
        log.len(),
        got.test_messages() + got.recipient_messages()
    ))
}

/// The matrix, and two readings of pages so small that the tests list itself takes
/// several pages (tracks saved page by page, a list walk that pages through tests): two a
/// page as asked, and two a page while pages are counted by the 500 asked for.
fn readings() -> Vec<(&'static str, ReportingReading)> {
    let mut all = ReportingReading::matrix();
    let tiny = ReportingReading {
        max_per_page: 2,
        ..ReportingReading::default()
    };
    all.push(("cap-2", tiny));
    all.push((
        "cap-2-offset-by-asked",
        ReportingReading {
            paging: Paging::OffsetByRequested,
            ..tiny
        },
    ));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "run on its own by scripts/test.sh: twelve simulators at once load the shared moto for minutes"]
async fn every_reading_delivers_every_record_in_its_latest_state_once() {
    let runs = readings()
        .into_iter()
        .map(|(name, reading)| tokio::spawn(one_reading(name, reading)));
    let mut failures = Vec::new();
    for run in runs {
        match run.await.expect("reading task") {
            Ok(summary) => eprintln!("{summary}"),
            Err(why) => failures.push(why),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
