//! The HTTP side of the simulator: a loopback listener whose connections can be cut,
//! the API handler and the `/_sim/` control routes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::{IncomingStream, Listener};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::events::millis_of;
use super::state::{Delivery, Reply, State};
use super::{Fault, ReportingReading};

/// The state shared by the handlers and the [`super::Simulator`] handle.
pub(crate) type Shared = Arc<Mutex<State>>;

/// Locks the state; a panic elsewhere must not take the simulator down with it.
pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes per chunk when a body is dripped.
const DRIP_CHUNK: usize = 8;
/// Pause between dripped chunks.
const DRIP_EVERY: Duration = Duration::from_millis(200);

/// A TCP listener whose connections can be cut from inside a handler (the `Reset` fault).
pub(crate) struct SimListener(pub TcpListener);

/// Identifies one accepted connection to the handlers that serve it.
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle {
    /// Set to make the connection fail its next read or write, closing it unanswered.
    kill: Arc<AtomicBool>,
}

impl Listener for SimListener {
    type Io = CuttableStream;
    type Addr = ConnHandle;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let kill = Arc::new(AtomicBool::new(false));
                    let handle = ConnHandle { kill: kill.clone() };
                    return (
                        CuttableStream {
                            inner: stream,
                            kill,
                        },
                        handle,
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "Simulator failed to accept a connection.");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()?;
        Ok(ConnHandle {
            kill: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Connected<IncomingStream<'_, SimListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TCP stream that fails (and resets the connection) once its kill flag is set.
pub(crate) struct CuttableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl CuttableStream {
    fn cut(&self) -> Option<io::Error> {
        if self.kill.load(Ordering::Relaxed) {
            // Zero linger turns the close into a TCP RST, as a crashed proxy would.
            let _ = self.inner.set_zero_linger();
            Some(io::ErrorKind::ConnectionReset.into())
        } else {
            None
        }
    }
}

impl AsyncRead for CuttableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(error) = self.cut() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.cut() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.cut() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(error) = self.cut() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The simulator's routes: `/_sim/` control routes, everything else is the API.
pub(crate) fn router(shared: Shared) -> Router {
    Router::new()
        .route("/_sim/events", get(control_list).post(control_add))
        .route("/_sim/delete", post(control_delete))
        .route(
            "/_sim/faults",
            post(control_fault).delete(control_clear_faults),
        )
        .route("/_sim/latency", put(control_latency))
        .route("/_sim/requests", get(control_requests))
        .route(
            "/_sim/phishing/tests",
            get(control_phishing_tests).post(control_phishing_add),
        )
        .route("/_sim/phishing/progress", post(control_phishing_progress))
        .route("/_sim/phishing/close", post(control_phishing_close))
        .route("/_sim/phishing/requests", get(control_phishing_requests))
        .route(
            "/_sim/phishing/reading",
            get(control_phishing_reading).put(control_phishing_set_reading),
        )
        .route("/_sim/phishing/throttle", post(control_phishing_throttle))
        .route("/_sim/stats", get(control_stats))
        .fallback(api)
        .with_state(shared)
}

/// Binds `127.0.0.1:port` (0 picks a free port).
pub(crate) async fn bind(port: u16) -> io::Result<(SimListener, SocketAddr)> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    Ok((SimListener(listener), addr))
}

/// Every request outside `/_sim/`: accounted and decided at arrival, then delivered.
async fn api(
    AxumState(shared): AxumState<Shared>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let arrived = Instant::now();
    let at_ms = millis_of(OffsetDateTime::now_utc()).max(0) as u64;
    if uri.path().starts_with("/_sim/") {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "no such control route"})),
        )
            .into_response();
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let run_id = headers
        .get("x-run-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (reply, latency_ms) = {
        let mut state = lock(&shared);
        let reply = state.handle(
            arrived,
            at_ms,
            method.as_str(),
            uri.path(),
            uri.query().unwrap_or(""),
            authorization,
            run_id,
        );
        (reply, state.latency_ms)
    };
    let mut wait = latency_ms;
    if let Delivery::Slow(ms) = reply.delivery {
        wait += ms;
    }
    if wait > 0 {
        // Sleep relative to arrival, so the lock and page building do not add up.
        tokio::time::sleep_until((arrived + Duration::from_millis(wait)).into()).await;
    }
    deliver(reply, &conn)
}

/// Turns a decided reply into an HTTP response.
fn deliver(reply: Reply, conn: &ConnHandle) -> Response {
    if reply.delivery == Delivery::Reset {
        conn.kill.store(true, Ordering::Relaxed);
        // Never reaches the client: the connection fails on the first write.
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let has_body = !reply.body.is_empty();
    let body = if reply.delivery == Delivery::Drip {
        drip(reply.body)
    } else {
        Body::from(reply.body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if has_body {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(reply.content_type),
        );
    }
    if let Some(secs) = reply.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A body that sends `text` [`DRIP_CHUNK`] bytes at a time, every [`DRIP_EVERY`].
fn drip(text: String) -> Body {
    let bytes = Bytes::from(text);
    let stream = futures::stream::unfold((bytes, 0usize), |(bytes, sent)| async move {
        if sent >= bytes.len() {
            return None;
        }
        if sent > 0 {
            tokio::time::sleep(DRIP_EVERY).await;
        }
        let end = (sent + DRIP_CHUNK).min(bytes.len());
        let chunk = bytes.slice(sent..end);
        Some((Ok::<_, io::Error>(chunk), (bytes, end)))
    });
    Body::from_stream(stream)
}

/// `POST /_sim/events` body.
#[derive(Deserialize)]
struct AddRequest {
    /// How many events to add.
    count: usize,
    /// How far before now the new events occurred.
    #[serde(default)]
    backdate_secs: u64,
    /// With `newest`: spread the events over this range instead (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    oldest: Option<OffsetDateTime>,
    /// With `oldest`: the newest time of the range (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    newest: Option<OffsetDateTime>,
}

/// `POST /_sim/delete` body: a number of random events, or exact ids.
#[derive(Deserialize)]
struct DeleteRequest {
    /// How many random events to delete.
    #[serde(default)]
    count: Option<usize>,
    /// Exactly these events.
    #[serde(default)]
    ids: Option<Vec<String>>,
}

/// `POST /_sim/faults` body.
#[derive(Deserialize)]
struct FaultRequest {
    /// What goes wrong.
    fault: Fault,
    /// For how many `GET /events` requests.
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

/// `PUT /_sim/latency` body.
#[derive(Deserialize)]
struct LatencyRequest {
    /// Delay before each API answer.
    ms: u64,
}

async fn control_list(AxumState(shared): AxumState<Shared>) -> Response {
    let ids = lock(&shared).event_ids();
    Json(json!({ "ids": ids })).into_response()
}

async fn control_add(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<AddRequest>,
) -> Response {
    let mut state = lock(&shared);
    let ids = match (request.oldest, request.newest) {
        (Some(oldest), Some(newest)) => {
            state.add_events_between(request.count, millis_of(oldest), millis_of(newest))
        }
        _ => state.add_events(request.count, request.backdate_secs),
    };
    drop(state);
    Json(json!({ "ids": ids })).into_response()
}

async fn control_delete(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<DeleteRequest>,
) -> Response {
    let mut state = lock(&shared);
    let ids = match (request.ids, request.count) {
        (Some(ids), _) => state.delete_ids(&ids),
        (None, Some(count)) => state.delete_random(count),
        (None, None) => Vec::new(),
    };
    drop(state);
    Json(json!({ "ids": ids })).into_response()
}

async fn control_fault(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<FaultRequest>,
) -> StatusCode {
    lock(&shared).inject(request.fault, request.count);
    StatusCode::NO_CONTENT
}

async fn control_clear_faults(AxumState(shared): AxumState<Shared>) -> StatusCode {
    lock(&shared).clear_faults();
    StatusCode::NO_CONTENT
}

async fn control_latency(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<LatencyRequest>,
) -> StatusCode {
    lock(&shared).latency_ms = request.ms;
    StatusCode::NO_CONTENT
}

async fn control_requests(AxumState(shared): AxumState<Shared>) -> Response {
    let log = lock(&shared).requests();
    Json(log).into_response()
}

async fn control_stats(AxumState(shared): AxumState<Shared>) -> Response {
    let stats = lock(&shared).stats();
    Json(stats).into_response()
}

/// `POST /_sim/phishing/tests` body.
#[derive(Deserialize)]
struct PhishingAddRequest {
    /// Recipients of the new test.
    #[serde(default)]
    recipients: usize,
    /// A test in status `Error` (no recipients, `started_at: null`) instead.
    #[serde(default)]
    error: bool,
}

async fn control_phishing_tests(AxumState(shared): AxumState<Shared>) -> Response {
    Json(lock(&shared).reporting.tests_json()).into_response()
}

async fn control_phishing_add(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<PhishingAddRequest>,
) -> Response {
    let mut state = lock(&shared);
    let pst_id = if request.error {
        state.reporting.add_errored_test()
    } else {
        state.reporting.add_test(request.recipients)
    };
    Json(json!({ "pst_id": pst_id })).into_response()
}

/// `POST /_sim/phishing/progress` body.
#[derive(Deserialize)]
struct PhishingProgressRequest {
    /// Only this test (every test in turn when absent).
    #[serde(default)]
    pst_id: Option<u64>,
    /// Recipients to move one result further.
    count: usize,
}

async fn control_phishing_progress(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<PhishingProgressRequest>,
) -> Response {
    let moved = lock(&shared)
        .reporting
        .progress(request.pst_id, request.count);
    Json(json!({ "recipient_ids": moved })).into_response()
}

/// `POST /_sim/phishing/close` body.
#[derive(Deserialize)]
struct PhishingCloseRequest {
    /// The test to close.
    pst_id: u64,
}

async fn control_phishing_close(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<PhishingCloseRequest>,
) -> StatusCode {
    if lock(&shared).reporting.close(request.pst_id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn control_phishing_requests(AxumState(shared): AxumState<Shared>) -> Response {
    Json(lock(&shared).reporting.requests()).into_response()
}

/// `PUT /_sim/phishing/reading` body: a reading by name, or in full.
#[derive(Deserialize)]
#[serde(untagged)]
enum ReadingRequest {
    /// One of `ReportingReading::all()` by name.
    Named {
        /// Its short name, e.g. `cap-100`.
        name: String,
    },
    /// A reading in full (missing members take the default's).
    Full(ReportingReading),
}

async fn control_phishing_reading(AxumState(shared): AxumState<Shared>) -> Response {
    Json(lock(&shared).reporting.reading()).into_response()
}

async fn control_phishing_set_reading(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<ReadingRequest>,
) -> Response {
    let reading = match request {
        ReadingRequest::Full(reading) => reading,
        ReadingRequest::Named { name } => match ReportingReading::by_name(&name) {
            Some(reading) => reading,
            None => {
                return (
                    StatusCode::NOT_FOUND,
                    Json(json!({"message": format!("no reading named {name:?}")})),
                )
                    .into_response();
            }
        },
    };
    lock(&shared).reporting.set_reading(reading);
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /_sim/phishing/throttle` body.
#[derive(Deserialize)]
struct ThrottleRequest {
    /// Reporting requests to answer 429.
    #[serde(default = "one")]
    count: u32,
}

async fn control_phishing_throttle(
    AxumState(shared): AxumState<Shared>,
    Json(request): Json<ThrottleRequest>,
) -> StatusCode {
    lock(&shared).reporting.throttle(request.count);
    StatusCode::NO_CONTENT
}
