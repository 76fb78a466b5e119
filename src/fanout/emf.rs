//! EMF lines of the fan-out (namespace [`crate::metrics::NAMESPACE`], no dimension):
//! `SourcesQueued` per dispatch, and per message one of `RunsStarted`,
//! `RunsSkippedLeased`, `RunsSkippedGone` and `RunsFailedToStart`. The dashboard and alarms read these.

use serde_json::{Value, json};

use crate::metrics::NAMESPACE;

/// What happened to one work message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageOutcome {
    /// A run started (whatever it then did).
    Started,
    /// Another run held the source's lease: a duplicate delivery, dropped.
    SkippedLeased,
    /// The message's source does not exist (deleted since dispatch): dropped.
    SkippedGone,
    /// The run could not start; the message is left for SQS to retry.
    FailedToStart,
}

impl MessageOutcome {
    /// The metric's name.
    pub fn metric(self) -> &'static str {
        match self {
            MessageOutcome::Started => "RunsStarted",
            MessageOutcome::SkippedLeased => "RunsSkippedLeased",
            MessageOutcome::SkippedGone => "RunsSkippedGone",
            MessageOutcome::FailedToStart => "RunsFailedToStart",
        }
    }
}

fn line(name: &str, value: u64, timestamp_ms: i64) -> Value {
    let mut line = json!({
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [[]],
                "Metrics": [{"Name": name, "Unit": "Count"}],
            }],
        },
    });
    line[name] = json!(value);
    line
}

/// The line of one dispatch: sources queued.
pub fn queued_line(queued: u64, timestamp_ms: i64) -> Value {
    line("SourcesQueued", queued, timestamp_ms)
}

/// The line of one message's outcome.
pub fn message_line(outcome: MessageOutcome, timestamp_ms: i64) -> Value {
    line(outcome.metric(), 1, timestamp_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_emf_with_their_metric_at_the_top_level() {
        for (line, name, value) in [
            (queued_line(12, 5), "SourcesQueued", 12),
            (message_line(MessageOutcome::Started, 5), "RunsStarted", 1),
            (
                message_line(MessageOutcome::SkippedLeased, 5),
                "RunsSkippedLeased",
                1,
            ),
            (
                message_line(MessageOutcome::FailedToStart, 5),
                "RunsFailedToStart",
                1,
            ),
        ] {
            let text = line.to_string();
            assert!(!text.contains('\n'));
            assert_eq!(line["_aws"]["Timestamp"], 5);
            let directive = &line["_aws"]["CloudWatchMetrics"][0];
            assert_eq!(directive["Namespace"], NAMESPACE);
            assert_eq!(directive["Metrics"][0]["Name"], name);
            assert_eq!(line[name], value);
        }
    }
}
