//! Fan-out: one SQS message per due source, collected by as many invocations (or local
//! workers) as the queue needs, instead of one invocation collecting every source.
//!
//! ## Design
//!
//! - **Dispatch** ([`dispatch`]): with `WORK_QUEUE_URL` set, the scheduled event (and
//!   `knowbe4-source dispatch`) reads the table once ([`crate::store::StateStore::snapshot`]:
//!   one paginated Scan on DynamoDB), keeps the sources a scheduled run would work on
//!   (not in `Error` or `Stopping`, not blocked by a config error, not out of quota
//!   today, not leased, and due per the freshness plan), and sends one message per source,
//!   ten per `SendMessageBatch`. Its answer is `{"queued": N, ...}`.
//! - **Work** ([`work`]): each message is one scheduled run of one source
//!   ([`crate::run::collect_source_with`]) under the source's lease. A message is
//!   deleted (done) unless its run could not *start* for a reason worth retrying soon
//!   ([`crate::run::NotStarted::StoreFailed`]: the state store failed before any KnowBe4
//!   request, and nothing was counted against the source), or its body is unreadable (a
//!   poison message). Such a message is made visible again after the retry delay
//!   (`ChangeMessageVisibility`, [`queue::RETRY_DELAY_SECS`]); after `maxReceiveCount`
//!   receives SQS moves it to the dead-letter queue. A run whose KnowBe4 or destination
//!   failed recorded its health event and retry streak; SQS does not retry it. A
//!   delivery that finds the lease held is a duplicate (another run is collecting the
//!   source now) and is dropped; a message naming a deleted source, or dispatched before
//!   the source's last successful run (stale: [`crate::run::NotStarted::Stale`]), is
//!   deleted.
//! - **Limits**: the account's rate (send slots) and daily quota (ledger) are items in the
//!   state table that every process conditions its writes on (see [`crate::store`]), so
//!   any number of concurrent invocations keep each account within 4 requests per second
//!   and its quota.
//! - A killed run leaves its message invisible until the visibility timeout, and its lease
//!   until the lease TTL. The queue's visibility timeout is longer than the lease TTL can
//!   be (the TTL is capped at the function timeout plus 30 s; AWS advises a visibility
//!   timeout of six function timeouts), so when the message reappears the lease has
//!   lapsed and the next run takes the source over.
//!
//! [`worker`] is the local equivalent of the event source mapping.

pub mod command;
pub mod dispatch;
pub mod emf;
pub mod queue;
pub mod work;
pub mod worker;

use serde::{Deserialize, Serialize};

pub use queue::WorkQueue;

/// The body of one work message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkMessage {
    /// The source to collect.
    pub source_id: String,
    /// When dispatch listed it (RFC 3339), for the message's age in logs.
    #[serde(default)]
    pub dispatched_at: Option<String>,
}

/// Whether a Lambda payload is an SQS event (its records come from `aws:sqs`).
pub fn is_sqs_event(payload: &serde_json::Value) -> bool {
    payload
        .get("Records")
        .and_then(|r| r.as_array())
        .and_then(|r| r.first())
        .and_then(|r| r.get("eventSource"))
        .and_then(|s| s.as_str())
        == Some("aws:sqs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_and_sqs_events_are_recognised() {
        let body = serde_json::to_string(&WorkMessage {
            source_id: "acme".into(),
            dispatched_at: Some("2026-12-06T00:00:00.000Z".into()),
        })
        .unwrap();
        assert_eq!(
            body,
            r#"{"sourceId":"acme","dispatchedAt":"2026-12-06T00:00:00.000Z"}"#
        );
        let back: WorkMessage = serde_json::from_str(r#"{"sourceId":"x"}"#).unwrap();
        assert_eq!(back.dispatched_at, None);
        assert!(is_sqs_event(&serde_json::json!({
            "Records": [{"eventSource": "aws:sqs", "body": "{}"}]
        })));
        assert!(!is_sqs_event(&serde_json::json!({"Records": []})));
        assert!(!is_sqs_event(&serde_json::json!({"action": "list"})));
        assert!(!is_sqs_event(&serde_json::json!({
            "Records": [{"eventSource": "aws:s3"}]
        })));
    }
}
