//! The work queue: the SQS calls of dispatch and of the local worker, nothing else.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};

use crate::error::{Error, Result};

/// The environment variable naming the queue; set, the schedule dispatches.
pub const WORK_QUEUE_URL: &str = "WORK_QUEUE_URL";
/// `SendMessageBatch` takes at most ten messages.
pub const SEND_BATCH: usize = 10;
/// `ReceiveMessage` returns at most ten messages.
pub const RECEIVE_BATCH: i32 = 10;
/// The environment variable overriding [`RETRY_DELAY_SECS`].
pub const WORK_RETRY_DELAY_SECS: &str = "WORK_RETRY_DELAY_SECS";
/// How long a message whose run could not start stays invisible before SQS offers it
/// again (`ChangeMessageVisibility`), instead of the queue's visibility timeout (which
/// is long, so that a killed run is not re-run while its lease may be held). The
/// template's retention covers `maxReceiveCount` receives at the visibility timeout,
/// so a failing message reaches the dead-letter queue rather than expiring.
pub const RETRY_DELAY_SECS: i32 = 60;

/// An SQS queue of work messages.
#[derive(Clone, Debug)]
pub struct WorkQueue {
    /// The SDK client, built once per process.
    client: Client,
    /// The queue's URL.
    url: String,
    /// Seconds before a message left for retry is offered again.
    retry_delay_secs: i32,
}

/// One received message.
#[derive(Clone, Debug)]
pub struct Received {
    /// SQS's id of the message (the Lambda batch item identifier).
    pub message_id: String,
    /// The handle that deletes this receipt.
    pub receipt_handle: String,
    /// The body.
    pub body: String,
    /// How many times SQS has handed the message out, this time included.
    pub receive_count: u32,
}

/// The queue's approximate message counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Messages waiting.
    pub visible: u64,
    /// Messages received and neither deleted nor back yet.
    pub in_flight: u64,
    /// Messages not yet visible (delay).
    pub delayed: u64,
}

impl Depth {
    /// Nothing waiting, nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.visible == 0 && self.in_flight == 0 && self.delayed == 0
    }
}

impl WorkQueue {
    /// A queue at `url`.
    pub fn new(client: Client, url: impl Into<String>) -> Self {
        WorkQueue {
            client,
            url: url.into(),
            retry_delay_secs: RETRY_DELAY_SECS,
        }
    }

    /// The same queue with another retry delay (0..=900 s; see [`RETRY_DELAY_SECS`]).
    pub fn with_retry_delay(mut self, secs: i32) -> Self {
        self.retry_delay_secs = secs.clamp(0, 900);
        self
    }

    /// The queue named by `WORK_QUEUE_URL`, or `None` when it is unset (the schedule then
    /// collects every source itself). Fan-out needs the shared state of DynamoDB.
    pub async fn from_env() -> Result<Option<WorkQueue>> {
        let url = match std::env::var(WORK_QUEUE_URL) {
            Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
            _ => return Ok(None),
        };
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(Error::config(
                WORK_QUEUE_URL,
                "must be the queue's URL (https://sqs.<region>.amazonaws.com/<account>/<name>)",
            ));
        }
        if std::env::var("STATE_TABLE").map_or(true, |t| t.trim().is_empty()) {
            return Err(Error::config(
                WORK_QUEUE_URL,
                "needs STATE_TABLE: the processes working the queue share leases, quotas and checkpoints through DynamoDB; unset WORK_QUEUE_URL to collect from one process with a local state file",
            ));
        }
        let retry_delay = match std::env::var(WORK_RETRY_DELAY_SECS) {
            Ok(v) if !v.trim().is_empty() => match v.trim().parse::<i32>() {
                Ok(secs) if (0..=900).contains(&secs) => secs,
                _ => {
                    return Err(Error::config(
                        WORK_RETRY_DELAY_SECS,
                        "must be a whole number of seconds from 0 to 900",
                    ));
                }
            },
            _ => RETRY_DELAY_SECS,
        };
        let aws = crate::store::aws_env::load_checked().await?;
        Ok(Some(
            WorkQueue::new(Client::new(&aws), url).with_retry_delay(retry_delay),
        ))
    }

    /// The queue's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends up to ten `(id, body)` messages in one call; returns the ids SQS refused.
    pub async fn send_batch(&self, messages: &[(String, String)]) -> Result<Vec<String>> {
        let entries = messages
            .iter()
            .map(|(id, body)| {
                SendMessageBatchRequestEntry::builder()
                    .id(id)
                    .message_body(body)
                    .build()
                    .map_err(|e| Error::store("building an SQS message", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| Error::store("SQS SendMessageBatch to the work queue", e))?;
        for failed in out.failed() {
            tracing::warn!(
                entry = failed.id(),
                code = failed.code(),
                sender_fault = failed.sender_fault(),
                "SQS refused a work message."
            );
        }
        Ok(out.failed().iter().map(|f| f.id().to_string()).collect())
    }

    /// Receives up to `max` messages, waiting up to `wait_secs` for the first (long poll).
    pub async fn receive(&self, max: i32, wait_secs: i32) -> Result<Vec<Received>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, RECEIVE_BATCH))
            .wait_time_seconds(wait_secs.clamp(0, 20))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| Error::store("SQS ReceiveMessage from the work queue", e))?;
        Ok(out
            .messages()
            .iter()
            .map(|m| Received {
                message_id: m.message_id().unwrap_or_default().to_string(),
                receipt_handle: m.receipt_handle().unwrap_or_default().to_string(),
                body: m.body().unwrap_or_default().to_string(),
                receive_count: m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1),
            })
            .collect())
    }

    /// Deletes a received message (its work is done).
    pub async fn delete(&self, receipt_handle: &str) -> Result<()> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map_err(|e| Error::store("SQS DeleteMessage from the work queue", e))?;
        Ok(())
    }

    /// Makes a received message visible again after the retry delay (its run could not
    /// start). Failing to is logged: the message then comes back after the queue's
    /// visibility timeout instead.
    pub async fn retry_later(&self, receipt_handle: &str) {
        if let Err(err) = self
            .client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(self.retry_delay_secs)
            .send()
            .await
        {
            tracing::warn!(error = %Error::store("SQS ChangeMessageVisibility on the work queue", err).chain(), "Could not shorten a message's visibility; it is retried after the queue's visibility timeout.");
        }
    }

    /// The queue's approximate counts.
    pub async fn depth(&self) -> Result<Depth> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| Error::store("SQS GetQueueAttributes of the work queue", e))?;
        let get = |name: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Depth {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        })
    }
}
