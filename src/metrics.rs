//! CloudWatch Embedded Metric Format (EMF): metrics as JSON log lines, no API calls.
//!
//! One line per run (namespace `KnowBe4Source`, dimension sets `[SourceId]` and `[]`):
//! `EventsForwarded`, `ApiRequests`, `QuotaRemaining`, `CollectionLagSeconds`,
//! `RunDurationMs`, `SourceInError`; and one line per health event (`HealthEvents`, by
//! `HealthType`, and by `SourceId` + `HealthType`). The SAM template's alarms and
//! dashboard read these.
//!
//! In Lambda the lines go to stdout (CloudWatch Logs turns them into metrics). On the
//! command line they are off unless `EMF_METRICS=stderr` (stdout may carry events).

use std::io::Write;

use serde_json::{Value, json};

use crate::domain::report::RunReport;
use crate::domain::state::Lifecycle;
use crate::error::HealthKind;

/// The metrics namespace.
pub const NAMESPACE: &str = "KnowBe4Source";

/// Where EMF lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsOutput {
    /// Not emitted.
    Off,
    /// stdout (Lambda).
    Stdout,
    /// stderr (command line, on request).
    Stderr,
}

impl MetricsOutput {
    /// `EMF_METRICS` (`off`, `stdout`, `stderr`); default stdout in Lambda, off elsewhere.
    pub fn from_env() -> Self {
        match std::env::var("EMF_METRICS").as_deref() {
            Ok("stdout") => MetricsOutput::Stdout,
            Ok("stderr") => MetricsOutput::Stderr,
            Ok("off") => MetricsOutput::Off,
            _ if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() => MetricsOutput::Stdout,
            _ => MetricsOutput::Off,
        }
    }

    /// Writes one line.
    pub fn emit(self, line: &Value) {
        let text = line.to_string();
        // A failed metrics write must never fail a run.
        let _ = match self {
            MetricsOutput::Off => Ok(()),
            MetricsOutput::Stdout => writeln!(std::io::stdout().lock(), "{text}"),
            MetricsOutput::Stderr => writeln!(std::io::stderr().lock(), "{text}"),
        };
    }
}

fn metric(name: &str, unit: &str) -> Value {
    json!({ "Name": name, "Unit": unit })
}

/// The EMF line summarising one run.
pub fn run_line(report: &RunReport, timestamp_ms: i64) -> Value {
    let mut metrics = vec![
        metric("EventsForwarded", "Count"),
        metric("ApiRequests", "Count"),
        metric("QuotaRemaining", "Count"),
        metric("RunDurationMs", "Milliseconds"),
        metric("SourceInError", "Count"),
    ];
    let mut line = json!({
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [],
        },
        "SourceId": report.source_id,
        "EventsForwarded": report.forwarded,
        "ApiRequests": report.requests,
        "QuotaRemaining": report.quota_left,
        "RunDurationMs": report.duration_ms,
        "SourceInError": u8::from(report.state == Some(Lifecycle::Error)),
        "Outcome": report.outcome,
    });
    if let Some(lag) = report.lag_seconds {
        metrics.push(metric("CollectionLagSeconds", "Seconds"));
        line["CollectionLagSeconds"] = json!(lag);
    }
    line["_aws"]["CloudWatchMetrics"] = json!([{
        "Namespace": NAMESPACE,
        "Dimensions": [["SourceId"], []],
        "Metrics": metrics,
    }]);
    line
}

/// The EMF line for one health event.
pub fn health_line(source_id: &str, kind: HealthKind, timestamp_ms: i64) -> Value {
    json!({
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["HealthType"], ["SourceId", "HealthType"]],
                "Metrics": [metric("HealthEvents", "Count")],
            }],
        },
        "SourceId": source_id,
        "HealthType": kind.as_str(),
        "HealthEvents": 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::report::Outcome;

    /// Checks an EMF document the way CloudWatch does: every dimension and metric named
    /// in the directive is a top-level member, metrics are numbers.
    fn assert_valid_emf(line: &Value) {
        let text = line.to_string();
        let parsed: Value = serde_json::from_str(&text).expect("one JSON line");
        assert!(!text.contains('\n'));
        let aws = &parsed["_aws"];
        assert!(aws["Timestamp"].as_i64().is_some());
        for directive in aws["CloudWatchMetrics"].as_array().unwrap() {
            assert_eq!(directive["Namespace"], NAMESPACE);
            for set in directive["Dimensions"].as_array().unwrap() {
                for dim in set.as_array().unwrap() {
                    let name = dim.as_str().unwrap();
                    assert!(parsed[name].is_string(), "dimension {name} missing");
                }
            }
            for m in directive["Metrics"].as_array().unwrap() {
                let name = m["Name"].as_str().unwrap();
                assert!(parsed[name].is_number(), "metric {name} missing");
                assert!(m["Unit"].is_string());
            }
        }
    }

    #[test]
    fn run_and_health_lines_are_valid_emf_with_their_dimensions() {
        let report = RunReport {
            source_id: "acme".into(),
            outcome: Outcome::Collected,
            detail: String::new(),
            health: None,
            fetched: 120,
            forwarded: 120,
            duplicates_dropped: 0,
            requests: 2,
            pages: 2,
            quota_used: 2,
            quota_left: 98,
            checkpoint: None,
            backlog: false,
            duration_ms: 812,
            state: Some(Lifecycle::Error),
            undated_events: 0,
            full_walk: None,
            not_started: None,
            lag_seconds: Some(42),
        };
        let line = run_line(&report, 1_700_000_000_000);
        assert_valid_emf(&line);
        assert_eq!(line["SourceId"], "acme");
        assert_eq!(line["EventsForwarded"], 120);
        assert_eq!(line["CollectionLagSeconds"], 42);
        assert_eq!(line["SourceInError"], 1);
        let dims = &line["_aws"]["CloudWatchMetrics"][0]["Dimensions"];
        assert_eq!(dims, &json!([["SourceId"], []]));

        let health = health_line("acme", HealthKind::ThirdPartyGenericError, 1);
        assert_valid_emf(&health);
        assert_eq!(health["HealthType"], "ThirdPartyGenericError");
    }

    #[test]
    fn a_run_without_forwarded_events_has_no_lag_metric() {
        let mut report: RunReport = serde_json::from_value(json!({
            "source_id": "s", "outcome": "skipped", "detail": "", "health": null,
            "fetched": 0, "forwarded": 0, "duplicates_dropped": 0, "requests": 0,
            "quota_used": 0, "quota_left": 0, "checkpoint": null, "backlog": false,
            "duration_ms": 1, "state": "Collecting", "lag_seconds": null
        }))
        .unwrap();
        let line = run_line(&report, 0);
        assert_valid_emf(&line);
        assert!(line.get("CollectionLagSeconds").is_none());
        report.state = None;
        assert_eq!(run_line(&report, 0)["SourceInError"], 0);
    }
}
