//! A KnowBe4 User Event API simulator: a real HTTP server on loopback.
//!
//! It encodes what is known about the real API (see `shared/reference/knowbe4-api.md`):
//! bearer-key auth (a wrong key answers 401, or 500 as KnowBe4 has been seen to), page
//! number paging with Kaminari's `meta`, newest `occurred_date` first, at most 4 requests
//! in any second (429 `Rate limit exceeded`), a daily quota where every call counts
//! (429 `API Limit Exceeded`), events that can be added with old `occurred_date`s or
//! deleted while a client pages, and ties in `occurred_date`. Faults can be injected
//! into the next requests to `GET /events`.
//!
//! Tests use it in-process through [`Simulator`]; the `knowbe4-sim` binary runs it for
//! demos and benchmarks. The same port serves a control API under `/_sim/` (no auth, not
//! logged, not rate limited):
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /_sim/events` | `{"count":n,"backdate_secs":s}` or `{"count":n,"oldest":t,"newest":t}` | `{"ids":[...]}` |
//! | `POST /_sim/delete` | `{"count":n}` or `{"ids":[...]}` | `{"ids":[deleted...]}` |
//! | `POST /_sim/faults` | `{"fault":<Fault>,"count":n}` | 204 |
//! | `DELETE /_sim/faults` | | 204 (clears queued faults) |
//! | `PUT /_sim/latency` | `{"ms":n}` | 204 |
//! | `GET /_sim/events` | | `{"ids":[...]}` newest first |
//! | `GET /_sim/requests` | | `[RequestRecord...]` |
//! | `GET /_sim/stats` | | `SimStats` |
//! | `GET /_sim/phishing/tests` | | the security tests as the API serves them |
//! | `POST /_sim/phishing/tests` | `{"recipients":n}` or `{"error":true}` | `{"pst_id":id}` |
//! | `POST /_sim/phishing/progress` | `{"count":n}` or `{"pst_id":id,"count":n}` | `{"recipient_ids":[...]}` |
//! | `POST /_sim/phishing/close` | `{"pst_id":id}` | 204, or 404 |
//! | `GET /_sim/phishing/requests` | | `[RequestRecord...]` of the Reporting API |
//! | `GET /_sim/phishing/reading` | | the `ReportingReading` played |
//! | `PUT /_sim/phishing/reading` | `{"name":"cap-100"}` (see `ReportingReading::all`) or a `ReportingReading` | 204, or 404 for an unknown name |
//! | `POST /_sim/phishing/throttle` | `{"count":n}` | 204 (the next n Reporting requests answer 429) |
//!
//! The Reporting API (`/v1/phishing/security_tests`, `.../{pst_id}/recipients`) is served
//! on the same port with its own token, limits and log: see `reporting`.
//!
//! Layout:
//! - `events`: compact event storage and the JSON each event is served as.
//! - `state`: accounting and every API decision, without I/O.
//! - `reporting`: the Reporting API's tests, recipients, limits and answers.
//! - `server`: the listener (whose connections can be cut), the handlers, control routes.

mod events;
mod reporting;
mod server;
mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use reporting::{
    BURST_PER_MINUTE, BURST_PER_SECOND, LARGE_RECORD_PADDING, Paging, ReportingConfig,
    ReportingReading, ReportingStats, Shift, TooManyWording,
};
use server::{Shared, lock};
use state::State;

/// How a [`Simulator`] starts.
#[derive(Clone)]
pub struct SimConfig {
    /// The key clients must send as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// How many events exist at start.
    pub events: usize,
    /// Seeds the ids and every random choice, so runs are reproducible.
    pub seed: u64,
    /// The initial events' `occurred_date`s are spread over this many hours before now.
    pub span_hours: u64,
    /// Delay before answering each API request (rate accounting uses arrival time).
    pub latency_ms: u64,
    /// API calls allowed per UTC day; `None` is unlimited. Failed calls count too.
    pub daily_quota: Option<u32>,
    /// Status for a missing or wrong key: 401, though KnowBe4 has been seen to answer 500.
    pub wrong_key_status: u16,
    /// Whether the 5th request within a second is answered 429 (it is counted either way).
    pub enforce_rate_limit: bool,
    /// Which reading of the API's unconfirmed details to play.
    pub reading: Reading,
    /// The Reporting API (phishing security tests and recipients) on the same port.
    pub reporting: ReportingConfig,
}

/// What `meta.count` counts: the public record cannot tell (every recorded page is a
/// single page, where both readings give the same number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountMode {
    /// The events on this page (Kaminari's `count` on a paged relation).
    Page,
    /// The events in the whole list.
    Total,
    /// No `count` at all.
    Absent,
}

/// One reading of the User Event API's details that nobody public can confirm (see
/// `shared/reference/knowbe4-api.md`, facts tagged UNKNOWN or DOC-only). The default is
/// the least convenient reading the recordings allow: `count` per page, pages capped at
/// 50 (both recorded pages say `limit_value: 50`), `total_pages` sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// Largest `per_page` the server honours (50 or 100: UNKNOWN).
    pub max_per_page: u64,
    /// `per_page` when the request names none (50 recorded).
    pub default_per_page: u64,
    /// What `meta.count` counts.
    pub count_mode: CountMode,
    /// Whether `meta.total_pages` is sent (it is on recorded pages).
    pub total_pages: bool,
    /// Whether `meta.limit_value` is sent (it is on recorded pages).
    pub limit_value: bool,
}

impl Default for Reading {
    fn default() -> Self {
        Reading {
            max_per_page: 50,
            default_per_page: 50,
            count_mode: CountMode::Page,
            total_pages: true,
            limit_value: true,
        }
    }
}

impl Reading {
    /// The readings every important test runs under: {count per page, count per list} ×
    /// {cap 50, cap 100}, then the sparser ones (no `total_pages`; no `count`; no
    /// `limit_value`).
    pub fn matrix() -> Vec<Reading> {
        let base = Reading::default();
        vec![
            base,
            Reading {
                count_mode: CountMode::Total,
                ..base
            },
            Reading {
                max_per_page: 100,
                ..base
            },
            Reading {
                max_per_page: 100,
                count_mode: CountMode::Total,
                ..base
            },
            Reading {
                total_pages: false,
                ..base
            },
            Reading {
                count_mode: CountMode::Absent,
                total_pages: false,
                limit_value: false,
                max_per_page: 100,
                ..base
            },
        ]
    }

    /// The first four cells of [`matrix`](Self::matrix): the readings the issue's
    /// acceptance names, for the slower scenario tests.
    pub fn core() -> Vec<Reading> {
        Reading::matrix().into_iter().take(4).collect()
    }
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = match self.count_mode {
            CountMode::Page => "count=page",
            CountMode::Total => "count=total",
            CountMode::Absent => "count=absent",
        };
        write!(f, "{count} cap={}", self.max_per_page)?;
        if !self.total_pages {
            write!(f, " no-total-pages")?;
        }
        if !self.limit_value {
            write!(f, " no-limit-value")?;
        }
        Ok(())
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            api_key: "sim-key".to_string(),
            events: 1000,
            seed: 1,
            span_hours: 72,
            latency_ms: 0,
            daily_quota: None,
            wrong_key_status: 401,
            enforce_rate_limit: true,
            reading: Reading::default(),
            reporting: ReportingConfig::default(),
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("api_key", &"[redacted]")
            .field("events", &self.events)
            .field("seed", &self.seed)
            .field("span_hours", &self.span_hours)
            .field("latency_ms", &self.latency_ms)
            .field("daily_quota", &self.daily_quota)
            .field("wrong_key_status", &self.wrong_key_status)
            .field("enforce_rate_limit", &self.enforce_rate_limit)
            .field("reading", &self.reading)
            .field("reporting", &self.reporting)
            .finish()
    }
}

/// Something that goes wrong on a request to `GET /events`.
///
/// Queued with [`Simulator::inject`]; consumed only by requests that passed the rate
/// limit, the quota and auth (so a fault count is exactly the number of answers that would
/// otherwise have been good pages). Serde form is externally tagged, e.g. `{"Status":503}`,
/// `{"StatusRetryAfter":[429,2]}`, `"Malformed"`; snake_case names are accepted too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// Answer this status with a JSON error body.
    #[serde(alias = "status")]
    Status(u16),
    /// Answer this status with a JSON error body and `Retry-After: <secs>`.
    #[serde(alias = "status_retry_after")]
    StatusRetryAfter(u16, u64),
    /// 200 with the page's JSON cut off halfway.
    #[serde(alias = "malformed")]
    Malformed,
    /// 200 with a `text/html` error page (a proxy or the Rails error page).
    #[serde(alias = "html")]
    Html,
    /// 200 where `data` is an object, not an array.
    #[serde(alias = "wrong_types")]
    WrongTypes,
    /// 200 with `data` but no `meta`.
    #[serde(alias = "missing_meta")]
    MissingMeta,
    /// 200 with `data: []` while `meta` claims more pages follow.
    #[serde(alias = "empty_page")]
    EmptyPage,
    /// The right page, after this many milliseconds before the headers.
    #[serde(alias = "slow")]
    Slow(u64),
    /// The right page, its body sent 8 bytes every 200 ms.
    #[serde(alias = "drip")]
    Drip,
    /// The connection is reset without an answer.
    #[serde(alias = "reset")]
    Reset,
    /// 200 with the right page padded by one huge field to more than [`GIGANTIC_BYTES`]:
    /// a client must cap what it reads instead of buffering whatever it is sent.
    #[serde(alias = "gigantic")]
    Gigantic,
    /// The right page, but `meta.next_page` points back to page 1: a client that follows
    /// `next_page` would walk in circles.
    #[serde(alias = "next_page_backwards")]
    NextPageBackwards,
    /// The right page, but `meta.next_page` names the page just served.
    #[serde(alias = "next_page_same")]
    NextPageSame,
    /// Page 1 (events and `meta`) whatever page was asked: a server stuck on one page, or
    /// a cache in front of it that ignores the query string.
    #[serde(alias = "loop")]
    Loop,
    /// The right page, its first event's `occurred_date` a number (Unix milliseconds)
    /// instead of a string.
    #[serde(alias = "occurred_date_number")]
    OccurredDateNumber,
    /// The right page, its first event without `id`.
    #[serde(alias = "event_without_id")]
    EventWithoutId,
    /// No fault: the right page. Queued before another fault, it lets that many requests
    /// through first (e.g. to break a walk in its middle).
    #[serde(alias = "pass")]
    Pass,
}

/// The smallest body [`Fault::Gigantic`] sends: 1 MiB over the collector's 16 MiB cap.
pub const GIGANTIC_BYTES: usize = 17 * 1024 * 1024;

/// One API request as the simulator saw it (control requests are not recorded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Unix milliseconds at arrival, to check pacing.
    pub at_ms: u64,
    /// HTTP method.
    pub method: String,
    /// Path without the query, e.g. `/events`.
    pub path: String,
    /// The raw query string (`""` when none), to check paging parameters.
    pub query: String,
    /// Status answered; 0 when the connection was reset instead.
    pub status: u16,
    /// The `x-run-id` request header, so a test can tell its runs apart.
    pub run_id: Option<String>,
    /// Whether the request carried the right key (even if it was refused for rate/quota).
    pub authorized: bool,
}

/// Counters over the simulator's lifetime.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// API requests received (control requests excluded).
    pub requests: u64,
    /// Requests that arrived when 4 had already arrived in the trailing second (answered
    /// 429 unless `enforce_rate_limit` is off): a compliant client keeps this at 0.
    pub rate_violations: u64,
    /// Calls counted against today's (UTC) quota, refused ones included.
    pub quota_used_today: u64,
    /// Requests answered 2xx without an injected fault.
    pub served_ok: u64,
}

/// A running simulator; dropping it stops the server.
pub struct Simulator {
    /// State shared with the server's handlers.
    shared: Shared,
    /// Where the server listens.
    addr: SocketAddr,
    /// Tells the server to stop accepting and finish.
    stop: Option<oneshot::Sender<()>>,
    /// The server task, awaited (or aborted) on shutdown.
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Starts a simulator on a free port of 127.0.0.1.
    pub async fn spawn(config: SimConfig) -> std::io::Result<Simulator> {
        Self::spawn_on(config, 0).await
    }

    /// Starts a simulator on `127.0.0.1:port` (0 picks a free port).
    pub async fn spawn_on(config: SimConfig, port: u16) -> std::io::Result<Simulator> {
        let (listener, addr) = server::bind(port).await?;
        let shared: Shared = std::sync::Arc::new(std::sync::Mutex::new(State::new(&config)));
        let app = server::router(shared.clone())
            .into_make_service_with_connect_info::<server::ConnHandle>();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(error) = serve.await {
                tracing::error!(%error, "Simulator server failed.");
            }
        });
        Ok(Simulator {
            shared,
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The base URL clients use, e.g. `http://127.0.0.1:8787`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds `count` events that occurred `backdate_secs` ago (minus up to 1 s of jitter);
    /// returns their ids.
    pub fn add_events(&self, count: usize, backdate_secs: u64) -> Vec<String> {
        lock(&self.shared).add_events(count, backdate_secs)
    }

    /// Adds `count` events with `occurred_date`s spread over `oldest..=newest`.
    pub fn add_events_between(
        &self,
        count: usize,
        oldest: OffsetDateTime,
        newest: OffsetDateTime,
    ) -> Vec<String> {
        lock(&self.shared).add_events_between(
            count,
            events::millis_of(oldest),
            events::millis_of(newest),
        )
    }

    /// Deletes `count` existing events chosen at random (seeded); returns their ids.
    pub fn delete_events(&self, count: usize) -> Vec<String> {
        lock(&self.shared).delete_random(count)
    }

    /// Deletes these events; unknown ids are ignored.
    pub fn delete_ids(&self, ids: &[String]) {
        lock(&self.shared).delete_ids(ids);
    }

    /// Ids of every event present now, newest first: the oracle a collector is checked
    /// against.
    pub fn event_ids(&self) -> Vec<String> {
        lock(&self.shared).event_ids()
    }

    /// Makes the next `count` admitted requests to `GET /events` suffer `fault`
    /// (queued after any faults already injected).
    pub fn inject(&self, fault: Fault, count: u32) {
        lock(&self.shared).inject(fault, count);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        lock(&self.shared).clear_faults();
    }

    /// Replaces the key requests must present, as resetting it in KnowBe4's console does:
    /// the old key is refused from the next request on.
    pub fn set_api_key(&self, key: &str) {
        lock(&self.shared).set_api_key(key);
    }

    /// Sets the delay before each API answer.
    pub fn set_latency_ms(&self, ms: u64) {
        lock(&self.shared).latency_ms = ms;
    }

    /// Every API request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared).requests()
    }

    /// The counters.
    pub fn stats(&self) -> SimStats {
        lock(&self.shared).stats()
    }

    /// Adds a phishing security test in progress with `recipients` recipients; returns
    /// its `pst_id`.
    pub fn add_phishing_test(&self, recipients: usize) -> u64 {
        lock(&self.shared).reporting.add_test(recipients)
    }

    /// Adds a phishing security test in status `Error` with `started_at: null`.
    pub fn add_errored_phishing_test(&self) -> u64 {
        lock(&self.shared).reporting.add_errored_test()
    }

    /// Moves `count` recipients (of `pst_id`, or of every test in turn) one result
    /// further; returns their `recipient_id`s.
    pub fn progress_phishing(&self, pst_id: Option<u64>, count: usize) -> Vec<u64> {
        lock(&self.shared).reporting.progress(pst_id, count)
    }

    /// Closes a phishing security test; `false` when there is none with this id.
    pub fn close_phishing_test(&self, pst_id: u64) -> bool {
        lock(&self.shared).reporting.close(pst_id)
    }

    /// The reading of the Reporting API's open details played now.
    pub fn reporting_reading(&self) -> ReportingReading {
        lock(&self.shared).reporting.reading()
    }

    /// Plays another reading of the Reporting API from the next request on (tests pick
    /// one at construction through [`ReportingConfig::reading`]).
    pub fn set_reporting_reading(&self, reading: ReportingReading) {
        lock(&self.shared).reporting.set_reading(reading);
    }

    /// Answers the next `count` Reporting API requests 429, worded as the reading says
    /// and with its `Retry-After`, whatever the limits.
    pub fn throttle_reporting(&self, count: u32) {
        lock(&self.shared).reporting.throttle(count);
    }

    /// After the next `skip` Reporting API requests, answers `count` with `status`.
    pub fn fail_reporting_after(&self, skip: u32, status: u16, count: u32) {
        lock(&self.shared).reporting.fail_after(skip, status, count);
    }

    /// Answers every request for test `pst_id`'s recipients with `status` until called
    /// again with `None`.
    pub fn fail_phishing_recipients(&self, pst_id: u64, status: Option<u16>) {
        lock(&self.shared).reporting.fail_recipients(pst_id, status);
    }

    /// Replaces the Reporting API token.
    pub fn set_reporting_token(&self, token: &str) {
        lock(&self.shared).reporting.set_token(token);
    }

    /// Every phishing security test as the API serves it now: the oracle.
    pub fn phishing_tests(&self) -> Vec<serde_json::Value> {
        lock(&self.shared).reporting.tests_json()
    }

    /// Every recipient of `pst_id` as the API serves it now: the oracle.
    pub fn phishing_recipients(&self, pst_id: u64) -> Vec<serde_json::Value> {
        lock(&self.shared).reporting.recipients_json(pst_id)
    }

    /// Every Reporting API request so far, in arrival order.
    pub fn reporting_requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared).reporting.requests()
    }

    /// The Reporting API's counters.
    pub fn reporting_stats(&self) -> ReportingStats {
        lock(&self.shared).reporting.stats()
    }

    /// Stops the server: lets in-flight answers finish for up to a second, then cuts them.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
