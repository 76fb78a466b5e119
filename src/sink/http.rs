//! The HTTP delivery shared by Sumo Logic, Splunk HEC and the generic NDJSON endpoint:
//! batching, gzip, retries and batch splitting.
//!
//! A `send` keeps a stack of event ranges still to deliver. Each step encodes as many
//! events of the top range as fit in [`MAX_BATCH_BYTES`] into one reused buffer, gzips
//! it, and posts it with retries (see [`super::retry`]). A batch the destination refuses
//! for its content (`413`, and `400` from Splunk) is split in halves that go back on the
//! stack, so order is kept and a refused batch is never sent again as is. A single event
//! refused that way cannot be delivered by waiting: it is counted, the other events are
//! still delivered, and the send fails at the end naming it. Every other failure (bad
//! credentials, a redirect, retries exhausted by the deadline) stops the send at once.
//! Of a reply, at most [`MAX_REPLY_BYTES`] are read, as sent (no decompression).
//!
//! Compression uses `Compression::fast()` (level 1): the collector runs in Lambda where CPU
//! time is what is paid for, and KnowBe4 events (the same keys on every line) already
//! shrink several-fold at level 1; higher levels cost two to three times the CPU for a
//! body only slightly smaller.

use std::io::Write;
use std::ops::Range;

use axum::body::Bytes; // the `bytes` crate's type: cloned per retry without copying
use flate2::Compression;
use flate2::write::GzEncoder;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Client, Url};
use tokio::time::Instant;

use super::retry::{self, RetryPolicy};
use super::splunk::EnvelopeEncoder;
use super::{
    Format, MAX_BATCH_BYTES, MAX_REPLY_BYTES, SendReport, SourceMeta, ndjson, splunk, sumo,
};
use crate::domain::event::RawEvent;
use crate::error::Error;

/// Event ids named in an error about undeliverable events, at most.
const MAX_IDS_IN_ERROR: usize = 5;

/// An HTTP destination, ready to send.
pub(crate) struct HttpDestination {
    /// Which body and headers to build, and which status codes mean "bad data".
    pub(crate) format: Format,
    /// The full request URL. Secret: it can carry the token (Sumo); never formatted.
    pub(crate) url: Url,
    /// `Authorization` value (`Splunk …` or `Bearer …`), marked sensitive.
    pub(crate) authorization: Option<HeaderValue>,
    /// Shared client, so connections are pooled across sends.
    pub(crate) client: Client,
    /// Waits and timeouts.
    pub(crate) policy: RetryPolicy,
}

/// How a body is encoded for the destination.
enum Encoder {
    /// One event per line (Sumo Logic, generic NDJSON).
    Lines,
    /// One HEC envelope per event.
    Splunk(EnvelopeEncoder),
}

impl Encoder {
    /// Encodes events from the start of `events` into `out` while the body stays within
    /// `limit` bytes; always takes at least one event. Returns how many it took.
    fn fill(&self, events: &[RawEvent], out: &mut Vec<u8>, limit: usize) -> usize {
        let mut taken = 0;
        for event in events {
            let before = out.len();
            match self {
                Encoder::Lines => ndjson::write_line(event, out),
                Encoder::Splunk(envelope) => envelope.write(event, out),
            }
            if out.len() > limit && taken > 0 {
                out.truncate(before);
                break;
            }
            taken += 1;
        }
        taken
    }
}

/// What became of one batch.
enum Outcome {
    /// The destination accepted every event of it.
    Accepted,
    /// The destination refused the batch's content (`413`, or `400` from Splunk).
    Refused {
        /// The status it answered.
        status: u16,
        /// The destination's explanation, when it gave one worth quoting.
        detail: Option<String>,
    },
}

/// Events the destination refused one by one, reported when the send ends.
#[derive(Default)]
struct Undeliverable {
    /// How many events were refused alone.
    count: usize,
    /// The status of the first refusal.
    status: Option<u16>,
    /// The destination's explanation of the first refusal.
    detail: Option<String>,
    /// The first few refused ids, to find the events in KnowBe4.
    ids: Vec<String>,
}

impl HttpDestination {
    /// Sends all events; see [`super::Destination::send`].
    pub(crate) async fn send(
        &self,
        meta: &SourceMeta,
        events: &[RawEvent],
        deadline: Instant,
    ) -> Result<SendReport, Error> {
        let mut report = SendReport::default();
        if events.is_empty() {
            return Ok(report);
        }
        let (headers, encoder) = match self.format {
            Format::SplunkHec => (
                splunk::headers(self.authorization.as_ref()),
                Encoder::Splunk(EnvelopeEncoder::new(meta)),
            ),
            Format::Sumo => (sumo::headers(meta), Encoder::Lines),
            Format::Ndjson | Format::Stdout => {
                (ndjson::headers(self.authorization.as_ref()), Encoder::Lines)
            }
        };
        let estimate: usize = events.iter().map(ndjson::line_len).sum();
        let mut body = Vec::with_capacity(estimate.min(MAX_BATCH_BYTES) + 64 * 1024);
        // Ranges still to deliver; the top is next. Splits push the right half first.
        let mut pending: Vec<Range<usize>> = Vec::with_capacity(16);
        pending.push(0..events.len());
        let mut undeliverable = Undeliverable::default();

        while let Some(range) = pending.pop() {
            body.clear();
            let taken = encoder.fill(&events[range.clone()], &mut body, MAX_BATCH_BYTES);
            let batch = range.start..range.start + taken;
            if batch.end < range.end {
                pending.push(batch.end..range.end);
            }
            match self.post(&headers, &body, deadline, &mut report).await? {
                Outcome::Accepted => {
                    report.events += batch.len();
                    report.bytes += body.len();
                }
                Outcome::Refused { status, .. } if batch.len() > 1 => {
                    let middle = batch.start + batch.len() / 2;
                    tracing::warn!(
                        destination = self.format.as_str(),
                        status,
                        events = batch.len(),
                        "Destination refused the batch; splitting it in halves."
                    );
                    pending.push(middle..batch.end);
                    pending.push(batch.start..middle);
                }
                Outcome::Refused { status, detail } => {
                    let id = &events[batch.start].id;
                    tracing::error!(
                        destination = self.format.as_str(),
                        status,
                        event_id = %id,
                        "Destination refused a single event; it cannot be delivered."
                    );
                    undeliverable.count += 1;
                    undeliverable.status.get_or_insert(status);
                    if undeliverable.detail.is_none() {
                        undeliverable.detail = detail;
                    }
                    if undeliverable.ids.len() < MAX_IDS_IN_ERROR {
                        undeliverable.ids.push(id.clone());
                    }
                }
            }
        }

        if undeliverable.count == 0 {
            return Ok(report);
        }
        let more = undeliverable.count - undeliverable.ids.len();
        let detail = undeliverable
            .detail
            .map(|text| format!(": {text}"))
            .unwrap_or_default();
        Err(Error::Destination {
            message: format!(
                "{} refused {} of {} events (HTTP {}{detail}; event ids: {}{}); the other {} \
                 were accepted",
                self.format.label(),
                undeliverable.count,
                events.len(),
                undeliverable.status.unwrap_or_default(),
                undeliverable.ids.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                },
                report.events,
            ),
            status: undeliverable.status,
        })
    }

    /// Posts one encoded batch until it is accepted or refused, retrying transient
    /// failures while the deadline allows.
    async fn post(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        deadline: Instant,
        report: &mut SendReport,
    ) -> Result<Outcome, Error> {
        let compressed = gzip(body)?;
        let label = self.format.label();
        let mut attempt: u32 = 0;
        loop {
            let Some(timeout) = self.policy.request_timeout(Instant::now(), deadline) else {
                return Err(Error::Destination {
                    message: format!("no time left before the deadline to send to {label}"),
                    status: None,
                });
            };
            report.requests += 1;
            let sent = self
                .client
                .post(self.url.clone())
                .headers(headers.clone())
                .header(
                    reqwest::header::CONTENT_ENCODING,
                    HeaderValue::from_static("gzip"),
                )
                .timeout(timeout)
                .body(compressed.clone())
                .send()
                .await;

            // (status, Retry-After, what happened) of a failure worth retrying.
            let (status, retry_after, failure) = match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = retry::retry_after(response.headers());
                    // Read (a bounded part of) the answer so the connection can go back
                    // to the pool and an error text can be quoted.
                    let answer = read_bounded(response, MAX_REPLY_BYTES).await;
                    if (200..300).contains(&status) {
                        return Ok(Outcome::Accepted);
                    }
                    if (300..400).contains(&status) {
                        // Never followed: the events would go to another host (with the
                        // Sumo URL, a secret, in `Referer`), or a 302 would turn the POST
                        // into a GET without a body that "succeeds".
                        return Err(Error::Destination {
                            message: format!(
                                "{label} answered HTTP {status}, a redirect; redirects are not \
                                 followed (check the destination URL)"
                            ),
                            status: Some(status),
                        });
                    }
                    let detail = match self.format {
                        Format::SplunkHec => splunk::error_text(&answer),
                        _ => None,
                    };
                    let described = match &detail {
                        Some(text) => format!("{label} answered HTTP {status}: {text}"),
                        None => format!("{label} answered HTTP {status}"),
                    };
                    match status {
                        401 | 403 => {
                            return Err(Error::ThirdPartyConfig {
                                system: "destination",
                                message: format!(
                                    "{described}; check the destination's URL and token"
                                ),
                                status: Some(status),
                            });
                        }
                        413 => return Ok(Outcome::Refused { status, detail }),
                        400 if self.format == Format::SplunkHec => {
                            return Ok(Outcome::Refused { status, detail });
                        }
                        _ if retry::is_retriable(status) => {}
                        _ => {
                            return Err(Error::Destination {
                                message: described,
                                status: Some(status),
                            });
                        }
                    }
                    (Some(status), retry_after, described)
                }
                Err(err) => {
                    let described = format!("{label}: {}", retry::describe_transport(&err));
                    if !retry::is_retriable_transport(&err) {
                        return Err(Error::Destination {
                            message: described,
                            status: None,
                        });
                    }
                    (None, None, described)
                }
            };

            let delay = self.policy.delay(attempt, retry_after);
            attempt += 1;
            let gave_up = || Error::Destination {
                message: format!(
                    "{failure} (attempt {attempt}); no time left before the deadline to retry"
                ),
                status,
            };
            if !retry::fits_before(Instant::now(), delay, deadline) {
                return Err(gave_up());
            }
            tracing::warn!(
                destination = self.format.as_str(),
                status,
                attempt,
                delay_ms = delay.as_millis() as u64,
                failure = %failure,
                "Destination request failed; retrying."
            );
            tokio::time::sleep(delay).await;
            // Timers round up: the wake-up can land on the deadline itself.
            if self
                .policy
                .request_timeout(Instant::now(), deadline)
                .is_none()
            {
                return Err(gave_up());
            }
            report.retries += 1;
        }
    }
}

/// Reads at most `limit` bytes of a reply's body (as sent: the destination client does
/// not decompress). A failure while reading ends the read: the status already decided
/// what happened, the body only adds detail.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - out.len();
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// Gzips a body in one pass into a buffer sized for typical JSON compression.
pub(crate) fn gzip(body: &[u8]) -> Result<Bytes, Error> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), Compression::fast());
    encoder
        .write_all(body)
        .and_then(|()| encoder.finish())
        .map(Bytes::from)
        .map_err(|err| Error::Destination {
            message: format!("compressing the batch failed ({:?})", err.kind()),
            status: None,
        })
}
