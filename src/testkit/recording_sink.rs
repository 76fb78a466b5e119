//! An HTTP destination on loopback that records what it receives, for tests and demos.
//!
//! [`RecordingSink::spawn`] starts an axum server on `127.0.0.1:0`. It accepts `POST` on
//! any path, gunzips `Content-Encoding: gzip` bodies, and decodes them the way the real
//! destinations do:
//! - a path ending in `/services/collector/event` is Splunk HEC: the body is JSON
//!   envelopes one after another, the `event` of each is recorded, an
//!   `Authorization: Splunk …` header is required, and success answers
//!   `{"text":"Success","code":0}`;
//! - any other path is Sumo Logic or generic NDJSON: each non-empty line is one event.
//!
//! Tests steer it to misbehave: [`fail_next`](RecordingSink::fail_next) (a few failures),
//! [`set_down`](RecordingSink::set_down) (an outage), [`set_max_body`](RecordingSink::set_max_body)
//! (`413` above a size) and [`reject_events_with_id`](RecordingSink::reject_events_with_id)
//! (`400` bad data). Events of a request answered with anything but `200` are not recorded,
//! exactly as a real destination would not index them.
//!
//! Its URL has a fake token in the path, like a Sumo Logic URL, so tests can check that
//! nothing logs or reports it.

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The path suffix that marks a Splunk HEC request.
const SPLUNK_EVENT_PATH: &str = "/services/collector/event";

/// Largest compressed body accepted, well above any batch (axum's default is 2 MB).
const MAX_WIRE_BODY: usize = 256 * 1024 * 1024;

/// A recording HTTP destination running on loopback.
pub struct RecordingSink {
    /// Where the server listens, to build [`url`](Self::url).
    addr: SocketAddr,
    /// The fake secret in the URL path, so tests can check it never leaks.
    token: String,
    /// What was received and how to answer, shared with the request handler.
    state: Arc<Mutex<SinkState>>,
    /// Tells the server to stop; `None` once used.
    stop: Option<oneshot::Sender<()>>,
    /// The server task, awaited on shutdown and aborted on drop.
    task: Option<JoinHandle<()>>,
}

/// One request as the sink saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The request path (it contains the fake token), to check endpoints.
    pub path: String,
    /// Every header, names lowercased, in arrival order: to check metadata headers.
    pub headers: Vec<(String, String)>,
    /// The body after gunzip, to check exact encodings.
    pub body: Vec<u8>,
    /// `body.len()`: the uncompressed size, to check batch limits.
    pub body_len: usize,
    /// Events decoded from the body (recorded or not), to check batch splitting.
    pub event_count: usize,
    /// The status answered, to check retry sequences.
    pub status: u16,
    /// The body answered (HEC's JSON for Splunk paths), to check HEC answers.
    pub response: String,
}

impl RecordedRequest {
    /// The first value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// One accepted event: its exact text and its decoded value.
#[derive(Clone, Debug)]
struct RecordedEvent {
    /// The bytes the sink received for this event, to check byte-identical forwarding.
    raw: String,
    /// The decoded event, for convenient assertions.
    value: Value,
}

/// A scheduled run of failures.
#[derive(Clone, Copy, Debug)]
struct Failure {
    /// The status to answer.
    status: u16,
    /// How many more requests get it.
    remaining: u32,
    /// A `Retry-After` (seconds) to send along, if any.
    retry_after: Option<u64>,
}

/// Everything the handler reads and writes.
#[derive(Default)]
struct SinkState {
    /// Accepted events in arrival order.
    events: Vec<RecordedEvent>,
    /// Every request in arrival order, accepted or not.
    requests: Vec<RecordedRequest>,
    /// Failures to answer before accepting again, oldest first.
    failures: VecDeque<Failure>,
    /// Status answered to everything while the destination is "down".
    down: Option<u16>,
    /// Largest uncompressed body accepted; larger ones get `413`.
    max_body: Option<usize>,
    /// Event ids that make a request "bad data" (`400`).
    reject_ids: HashSet<String>,
}

type Shared = Arc<Mutex<SinkState>>;

fn lock(state: &Mutex<SinkState>) -> MutexGuard<'_, SinkState> {
    // A panicking test thread must not hide what was recorded from the others.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RecordingSink {
    /// Starts the sink on `127.0.0.1` with a free port.
    pub async fn spawn() -> std::io::Result<RecordingSink> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::default();
        let app = Router::new()
            .fallback(receive)
            .layer(DefaultBodyLimit::max(MAX_WIRE_BODY))
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(err) = server.await {
                tracing::warn!(error = %err, "Recording sink stopped with an error.");
            }
        });
        Ok(RecordingSink {
            addr,
            token: format!("TOKEN{:016X}", rand::random::<u64>()),
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT/receiver/v1/http/TOKEN…`: a path carrying a
    /// fake token, like a Sumo Logic HTTP source URL. Splunk clients append
    /// `/services/collector/event` to it.
    pub fn url(&self) -> String {
        format!("http://{}/receiver/v1/http/{}", self.addr, self.token)
    }

    /// The fake token inside [`url`](Self::url), to assert it appears in no log or error.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Every accepted event in arrival order, decoded (the `event` of each HEC envelope).
    pub fn events(&self) -> Vec<Value> {
        lock(&self.state)
            .events
            .iter()
            .map(|event| event.value.clone())
            .collect()
    }

    /// The exact JSON text of every accepted event, in arrival order.
    pub fn raw_events(&self) -> Vec<String> {
        lock(&self.state)
            .events
            .iter()
            .map(|event| event.raw.clone())
            .collect()
    }

    /// The string `id` of each accepted event (duplicates kept, events without one skipped).
    pub fn event_ids(&self) -> Vec<String> {
        lock(&self.state)
            .events
            .iter()
            .filter_map(|event| event.value.get("id")?.as_str().map(str::to_string))
            .collect()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }

    /// Answers `status` to the next `count` requests without accepting their events.
    pub fn fail_next(&self, status: u16, count: u32) {
        self.schedule(status, count, None);
    }

    /// Like [`fail_next`](Self::fail_next), with a `Retry-After: seconds` header.
    pub fn fail_next_with_retry_after(&self, status: u16, count: u32, seconds: u64) {
        self.schedule(status, count, Some(seconds));
    }

    fn schedule(&self, status: u16, count: u32, retry_after: Option<u64>) {
        if count > 0 {
            lock(&self.state).failures.push_back(Failure {
                status,
                remaining: count,
                retry_after,
            });
        }
    }

    /// Answers `status` to every request until `set_down(None)`.
    pub fn set_down(&self, status: Option<u16>) {
        lock(&self.state).down = status;
    }

    /// Answers `413` to bodies larger than `bytes` (uncompressed); `None` lifts the limit.
    pub fn set_max_body(&self, bytes: Option<usize>) {
        lock(&self.state).max_body = bytes;
    }

    /// Answers `400` (bad data) to any request containing an event with this `id`.
    pub fn reject_events_with_id(&self, id: impl Into<String>) {
        lock(&self.state).reject_ids.insert(id.into());
    }

    /// Stops the server and waits (briefly) for open connections to close.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for RecordingSink {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for RecordingSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingSink")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The events of a body, or why it is bad data.
type Decoded = Result<Vec<RecordedEvent>, &'static str>;

/// Handles every request: decode, decide the answer, record.
async fn receive(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    wire: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let splunk = path.trim_end_matches('/').ends_with(SPLUNK_EVENT_PATH);
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("gzip"));
    let body = if gzip {
        gunzip(&wire)
    } else {
        Some(wire.to_vec())
    };
    let decoded: Decoded = match &body {
        None => Err("body is not valid gzip"),
        Some(body) if splunk => decode_envelopes(body),
        Some(body) => decode_lines(body),
    };
    let authorized = !splunk
        || headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("Splunk ") && value.len() > 7);

    let mut state = lock(&state);
    let body = body.unwrap_or_default();
    let event_count = decoded.as_ref().map_or(0, Vec::len);
    let mut retry_after = None;
    let (status, reason) = if method != Method::POST {
        (405, "only POST is accepted")
    } else if let Some(status) = state.down {
        (status, "the destination is down")
    } else if let Some(failure) = state.failures.front_mut() {
        let status = failure.status;
        retry_after = failure.retry_after;
        failure.remaining -= 1;
        if failure.remaining == 0 {
            state.failures.pop_front();
        }
        (status, "scheduled failure")
    } else if state.max_body.is_some_and(|max| body.len() > max) {
        (413, "request entity too large")
    } else if !authorized {
        (401, "Token is required")
    } else {
        match &decoded {
            Err(reason) => (400, *reason),
            Ok(events)
                if events.iter().any(|event| {
                    event
                        .value
                        .get("id")
                        .and_then(Value::as_str)
                        .is_some_and(|id| state.reject_ids.contains(id))
                }) =>
            {
                (400, "Invalid data format")
            }
            Ok(_) => (200, "Success"),
        }
    };

    if status == 200
        && let Ok(events) = decoded
    {
        state.events.extend(events);
    }
    let answer = match (splunk, status) {
        (true, 200) => r#"{"text":"Success","code":0}"#.to_string(),
        (true, _) => serde_json::json!({ "text": reason, "code": hec_code(status) }).to_string(),
        (false, 200) => String::new(),
        (false, _) => reason.to_string(),
    };
    state.requests.push(RecordedRequest {
        path,
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: body.len(),
        body,
        event_count,
        status,
        response: answer.clone(),
    });
    drop(state);

    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(
            header::CONTENT_TYPE,
            if splunk {
                "application/json"
            } else {
                "text/plain"
            },
        );
    if let Some(seconds) = retry_after {
        response = response.header(header::RETRY_AFTER, seconds.to_string());
    }
    response
        .body(Body::from(answer))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// HEC's error codes for the statuses the sink answers.
fn hec_code(status: u16) -> u16 {
    match status {
        400 => 6,
        401 => 2,
        403 => 4,
        503 => 9,
        _ => 8,
    }
}

/// Gunzips a body (concatenated members included); `None` if it is not gzip.
fn gunzip(wire: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(wire.len() * 8);
    flate2::read::MultiGzDecoder::new(wire)
        .read_to_end(&mut body)
        .ok()?;
    Some(body)
}

/// NDJSON: one event per non-empty line, kept as its exact text.
fn decode_lines(body: &[u8]) -> Decoded {
    body.split(|byte| *byte == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(|line| {
            let raw = std::str::from_utf8(line).map_err(|_| "line is not UTF-8")?;
            let value = serde_json::from_str(raw).map_err(|_| "line is not JSON")?;
            Ok(RecordedEvent {
                raw: raw.to_string(),
                value,
            })
        })
        .collect()
}

/// Splunk HEC: JSON envelopes one after another, each with an `event`.
fn decode_envelopes(body: &[u8]) -> Decoded {
    #[derive(serde::Deserialize)]
    struct Envelope {
        event: Box<RawValue>,
    }
    let mut events = Vec::new();
    for envelope in serde_json::Deserializer::from_slice(body).into_iter::<Envelope>() {
        let envelope = envelope.map_err(|_| "Invalid data format")?;
        let raw = envelope.event.get().to_string();
        let value = serde_json::from_str(&raw).map_err(|_| "Invalid data format")?;
        events.push(RecordedEvent { raw, value });
    }
    if events.is_empty() {
        return Err("No data");
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn gzip(body: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(body).unwrap();
        encoder.finish().unwrap()
    }

    async fn post(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, String) {
        let mut request = reqwest::Client::new().post(url).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    #[tokio::test]
    async fn records_gzip_ndjson_lines() {
        let sink = RecordingSink::spawn().await.unwrap();
        assert!(sink.url().contains(sink.token()));
        assert!(sink.url().starts_with("http://127.0.0.1:"));
        let body = b"{\"id\":\"a\",\"x\":1}\n{\"id\":\"b\"}\n";
        let (status, _) = post(
            &sink.url(),
            gzip(body),
            &[("content-encoding", "gzip"), ("X-Sumo-Name", "kb4")],
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(sink.event_ids(), ["a", "b"]);
        assert_eq!(sink.raw_events(), [r#"{"id":"a","x":1}"#, r#"{"id":"b"}"#]);
        assert_eq!(sink.events()[0]["x"], 1);
        let requests = sink.requests();
        assert_eq!(requests[0].header("x-sumo-name"), Some("kb4"));
        assert_eq!(requests[0].body_len, body.len());
        assert_eq!(requests[0].event_count, 2);

        // Plain bodies are accepted too; broken gzip and non-JSON lines are bad data.
        assert_eq!(
            post(&sink.url(), b"{\"id\":\"c\"}".to_vec(), &[]).await.0,
            200
        );
        let url = sink.url();
        let broken = post(&url, b"nope".to_vec(), &[("content-encoding", "gzip")]);
        assert_eq!(broken.await.0, 400);
        assert_eq!(post(&sink.url(), b"not json\n".to_vec(), &[]).await.0, 400);
        assert_eq!(sink.event_ids(), ["a", "b", "c"]);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn speaks_splunk_hec_on_the_collector_path() {
        let sink = RecordingSink::spawn().await.unwrap();
        let url = format!("{}/services/collector/event", sink.url());
        let body = br#"{"time":1.5,"event":{"id":"h1","n":1.0E2}}{"time":2,"event":{"id":"h2"}}"#;
        let auth = [("authorization", "Splunk abc")];
        let (status, answer) = post(&url, body.to_vec(), &auth).await;
        assert_eq!(
            (status, answer.as_str()),
            (200, r#"{"text":"Success","code":0}"#)
        );
        assert_eq!(sink.event_ids(), ["h1", "h2"]);
        assert_eq!(sink.raw_events()[0], r#"{"id":"h1","n":1.0E2}"#);

        let (status, answer) = post(&url, body.to_vec(), &[]).await;
        assert_eq!(status, 401);
        assert!(answer.contains("Token is required"));
        let (status, _) = post(&url, br#"{"time":1}"#.to_vec(), &auth).await;
        assert_eq!(status, 400);
        assert_eq!(sink.event_ids().len(), 2);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn failures_outages_and_limits_reject_without_recording() {
        let sink = RecordingSink::spawn().await.unwrap();
        let event = || b"{\"id\":\"z\"}\n".to_vec();

        sink.fail_next(500, 2);
        sink.fail_next_with_retry_after(429, 1, 3);
        assert_eq!(post(&sink.url(), event(), &[]).await.0, 500);
        assert_eq!(post(&sink.url(), event(), &[]).await.0, 500);
        let response = reqwest::Client::new()
            .post(sink.url())
            .body(event())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(post(&sink.url(), event(), &[]).await.0, 200);

        sink.set_down(Some(503));
        assert_eq!(post(&sink.url(), event(), &[]).await.0, 503);
        sink.set_down(None);

        sink.set_max_body(Some(5));
        assert_eq!(post(&sink.url(), event(), &[]).await.0, 413);
        sink.set_max_body(None);

        sink.reject_events_with_id("z");
        assert_eq!(post(&sink.url(), event(), &[]).await.0, 400);

        assert_eq!(sink.event_ids(), ["z"]);
        let statuses: Vec<u16> = sink.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [500, 500, 429, 200, 503, 413, 400]);

        let get = reqwest::get(sink.url()).await.unwrap();
        assert_eq!(get.status().as_u16(), 405);
        sink.shutdown().await;
    }
}
