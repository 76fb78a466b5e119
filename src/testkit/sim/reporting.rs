//! The Reporting API side of the simulator: phishing security tests and each test's
//! recipients, without I/O (the server calls [`Reporting::handle`] under the state lock).
//!
//! What it plays, from the public record (`shared/reference/knowbe4-api.md`): bare JSON
//! arrays paged by `page` / `per_page` (default 100, at most 500), an empty array after
//! the last item; `&` escaped as `\u0026`; a test in status `Error` with `started_at` and
//! `scheduled_count` null and a template whose members are null; a bad token answered
//! `200 {"message": "Invalid Token"}`; the account's limits (4 requests in any second,
//! 50 in any minute, a daily quota), over which it answers 429. Recipients' results move
//! on when a test asks ([`Reporting::progress`]), and tests can be added and closed.
//!
//! What the record leaves open is played per simulator by a [`ReportingReading`]: how
//! large a page it serves, whether it honours `page` and ends a list, whether the order
//! holds still between requests, what a 429 looks like, how large records are. Tests run
//! across [`ReportingReading::matrix`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::RequestRecord;

/// Requests the Reporting API allows in any second.
pub const BURST_PER_SECOND: usize = 4;
/// Requests the Reporting API allows in any minute.
pub const BURST_PER_MINUTE: usize = 50;
const RATE_BODY: &str = r#"{"message":"Rate limit exceeded"}"#;
const QUOTA_BODY: &str = r#"{"message":"API Limit Exceeded"}"#;
const INVALID_TOKEN_BODY: &str = r#"{"message":"Invalid Token"}"#;

/// How the server pages past the end of a list, or at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Paging {
    /// `page` is honoured; past the last item, `[]` [REC].
    Honoured,
    /// `page` is ignored: every request answers page 1, so a list longer than a page
    /// cannot be read past it, and no list ever reaches an empty page.
    PageIgnored,
    /// `page` is honoured up to the last non-empty page; past it, that page again (a list
    /// that never ends with `[]`). An empty list is still `[]`.
    RepeatLast,
    /// `page` is honoured, but pages are counted by the `per_page` asked for while at
    /// most `max_per_page` records are served: asked for 500 and capped at 100, page 2
    /// starts at record 500, so records 100–499 are served only to a reader that asks for
    /// what the server serves.
    OffsetByRequested,
    /// `page` is honoured; past the last non-empty page, `404 {"message":"Not Found"}`
    /// instead of `[]` (an empty list is still `[]`).
    NotFoundPastEnd,
}

/// Whether a list holds still between two requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shift {
    /// The same order on every request (by `pst_id`, by recipient).
    Stable,
    /// Tests are served newest first, and before each request for a page after the first
    /// a new test (one recipient) is created: every later record moves one place down,
    /// across the page boundary (the last record of page N is read again on page N+1).
    /// Recipients lists are served newest first too, without growing.
    InsertFront,
    /// Re-sorted on every list request: the order is rotated one place further each time
    /// (the last record moves to the front), for both lists; the oracle's order does not
    /// change. Between two page reads a record moves across each page boundary.
    Rotate,
}

/// What a 429 says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TooManyWording {
    /// `{"message":"Rate limit exceeded"}` over the burst limits and when throttled,
    /// `{"message":"API Limit Exceeded"}` over the daily quota.
    ByCause,
    /// Always `{"message":"Rate limit exceeded"}`.
    RateLimitExceeded,
    /// Always `{"message":"API Limit Exceeded"}`: the User Event API's daily-limit
    /// wording, here on every 429 (burst ones included), so a client that reads it as
    /// "the day is over" is caught.
    LimitExceeded,
    /// Always `Too Many Requests` as `text/plain` (a gateway's answer).
    TooManyRequests,
}

/// One reading of what the public record leaves open about the Reporting API
/// (`shared/reference/knowbe4-api.md`: only `per_page=500` accepted, `page=2` → `[]`,
/// `429` over a limit and no rate-limit headers on 200s are recorded or documented).
/// The default is today's: `per_page` honoured up to 500, `page` honoured, a stable
/// order, 429 bodies by cause without `Retry-After`, records of realistic size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportingReading {
    /// Largest `per_page` served (500 accepted [REC]; 100 is the documented default, and
    /// a tenant capped lower is not excluded). A request naming none gets
    /// `min(100, max_per_page)`.
    pub max_per_page: u32,
    /// Whether `page` is honoured and a list ends with `[]`.
    pub paging: Paging,
    /// Whether the order holds still between requests.
    pub shift: Shift,
    /// What a 429 says.
    pub wording: TooManyWording,
    /// `Retry-After` (seconds) on every 429; `None` sends none.
    pub retry_after_secs: Option<u64>,
    /// Every this many Reporting requests (counting all, 0 = never), one is answered 429
    /// although this client kept the limits: other integrations share the account's.
    pub throttle_every: u32,
    /// Bytes of filler (`"sim_padding":"xxx…"`, an unknown field) added to every record
    /// served, to play tenants whose records are large.
    pub record_padding: usize,
}

impl Default for ReportingReading {
    fn default() -> Self {
        ReportingReading {
            max_per_page: 500,
            paging: Paging::Honoured,
            shift: Shift::Stable,
            wording: TooManyWording::ByCause,
            retry_after_secs: None,
            throttle_every: 0,
            record_padding: 0,
        }
    }
}

/// Padding per record of the `large-records` reading: a page of 500 is twice the
/// client's body cap, a page of 100 is 40% of it.
pub const LARGE_RECORD_PADDING: usize = crate::knowbe4::reporting::REPORTING_MAX_BODY_BYTES / 250;

impl ReportingReading {
    /// The readings tests run across, each with a short name (also accepted by
    /// [`by_name`](Self::by_name), the control API and `knowbe4-sim --reporting-reading`):
    ///
    /// - `honoured-500`: the default (`per_page` up to 500, `page` honoured, stable).
    /// - `cap-100`, `cap-50`: pages capped at 100 (the documented default) and at 50.
    /// - `page-ignored`: every request answers page 1 (capped at 100).
    /// - `repeat-last`: past the end, the last non-empty page again (capped at 100).
    /// - `404-past-end`: past the end, a 404 instead of `[]` (capped at 100).
    /// - `insert-front`: a new test is created before each page after the first; newest
    ///   first (capped at 100).
    /// - `rotate`: the order rotates by one on each request (capped at 100).
    /// - `throttled-retry-after`: every 3rd request 429 `Too Many Requests` with
    ///   `Retry-After: 1`.
    /// - `throttled-limit-wording`: every 3rd request 429 with the events API's
    ///   "API Limit Exceeded" wording and no `Retry-After`.
    /// - `large-records`: each record padded by [`LARGE_RECORD_PADDING`] bytes: a page of
    ///   500 is over the client's cap, one of 100 is not.
    ///
    /// Under `page-ignored` and `repeat-last` a list never reaches an empty page, and
    /// under `page-ignored` a list longer than one page cannot be read past its first;
    /// under `insert-front` and `rotate` one walk can miss or repeat records. What a
    /// collector must achieve under each is for its tests to say. A reading whose 429s
    /// ask for an hour is in [`all`](Self::all), not here: nothing completes under it.
    pub fn matrix() -> Vec<(&'static str, ReportingReading)> {
        let base = ReportingReading::default();
        let capped = ReportingReading {
            max_per_page: 100,
            ..base
        };
        vec![
            ("honoured-500", base),
            ("cap-100", capped),
            (
                "cap-50",
                ReportingReading {
                    max_per_page: 50,
                    ..base
                },
            ),
            (
                "page-ignored",
                ReportingReading {
                    paging: Paging::PageIgnored,
                    ..capped
                },
            ),
            (
                "repeat-last",
                ReportingReading {
                    paging: Paging::RepeatLast,
                    ..capped
                },
            ),
            (
                "404-past-end",
                ReportingReading {
                    paging: Paging::NotFoundPastEnd,
                    ..capped
                },
            ),
            (
                "insert-front",
                ReportingReading {
                    shift: Shift::InsertFront,
                    ..capped
                },
            ),
            (
                "rotate",
                ReportingReading {
                    shift: Shift::Rotate,
                    ..capped
                },
            ),
            (
                "cap-100-offset-by-asked",
                ReportingReading {
                    paging: Paging::OffsetByRequested,
                    ..capped
                },
            ),
            (
                "throttled-retry-after",
                ReportingReading {
                    wording: TooManyWording::TooManyRequests,
                    retry_after_secs: Some(1),
                    throttle_every: 3,
                    ..base
                },
            ),
            (
                "throttled-limit-wording",
                ReportingReading {
                    wording: TooManyWording::LimitExceeded,
                    retry_after_secs: None,
                    throttle_every: 3,
                    ..base
                },
            ),
            (
                "large-records",
                ReportingReading {
                    record_padding: LARGE_RECORD_PADDING,
                    ..base
                },
            ),
        ]
    }

    /// [`matrix`](Self::matrix) and the readings nothing completes under:
    /// `throttled-long-retry-after` (every 3rd request 429 with `Retry-After: 3600`).
    pub fn all() -> Vec<(&'static str, ReportingReading)> {
        let mut all = Self::matrix();
        all.push((
            "throttled-long-retry-after",
            ReportingReading {
                wording: TooManyWording::RateLimitExceeded,
                retry_after_secs: Some(3600),
                throttle_every: 3,
                ..ReportingReading::default()
            },
        ));
        all
    }

    /// The reading of [`all`](Self::all) with this name.
    pub fn by_name(name: &str) -> Option<ReportingReading> {
        Self::all()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, reading)| reading)
    }
}

/// How the Reporting side starts.
#[derive(Clone)]
pub struct ReportingConfig {
    /// The token clients must send as `Authorization: Bearer <token>`.
    pub token: String,
    /// Reporting calls allowed per UTC day; `None` is unlimited. Refused calls count too.
    pub daily_quota: Option<u32>,
    /// Whether requests over 4 a second or 50 a minute are answered 429 (they are counted
    /// as violations either way).
    pub enforce_limits: bool,
    /// The reading of the API's open details to play.
    pub reading: ReportingReading,
}

impl Default for ReportingConfig {
    fn default() -> Self {
        ReportingConfig {
            token: "sim-reporting-token".into(),
            daily_quota: None,
            enforce_limits: true,
            reading: ReportingReading::default(),
        }
    }
}

impl std::fmt::Debug for ReportingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportingConfig")
            .field("token", &"[redacted]")
            .field("daily_quota", &self.daily_quota)
            .field("enforce_limits", &self.enforce_limits)
            .field("reading", &self.reading)
            .finish()
    }
}

/// Counters of the Reporting side.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportingStats {
    /// Reporting requests received.
    pub requests: u64,
    /// Requests that arrived with 4 already in the trailing second.
    pub second_violations: u64,
    /// Requests that arrived with 50 already in the trailing minute.
    pub minute_violations: u64,
    /// Calls counted against today's quota, refused ones included.
    pub quota_used_today: u64,
    /// Requests answered 429.
    pub answered_429: u64,
}

/// A recipient's progress through a test, in the order results arrive.
const STAGES: [&str; 5] = [
    "delivered_at",
    "opened_at",
    "clicked_at",
    "data_entered_at",
    "reported_at",
];

struct Recipient {
    recipient_id: u64,
    user_id: u64,
    /// Timestamps of the stages reached, in [`STAGES`] order.
    reached: Vec<String>,
}

struct Test {
    campaign_id: u64,
    pst_id: u64,
    name: String,
    status: String,
    started_at: Option<String>,
    errored: bool,
    recipients: Vec<Recipient>,
}

/// The Reporting API's tests, recipients, accounting and request log.
pub(crate) struct Reporting {
    config: ReportingConfig,
    /// Tests by `pst_id`, served in that order.
    tests: BTreeMap<u64, Test>,
    next_pst_id: u64,
    next_recipient_id: u64,
    /// Arrival times in the trailing minute (the second's window is its tail).
    minute: VecDeque<Instant>,
    log: Vec<RequestRecord>,
    stats: ReportingStats,
    quota_day: time::Date,
    /// Which recipient `progress` moves next, per test (round robin).
    cursor: BTreeMap<u64, usize>,
    /// List answers served so far (the `rotate` reading's clock).
    lists_served: u64,
    /// Requests still to be answered 429 whatever the limits ([`Reporting::throttle`]).
    throttle_next: u32,
    /// Scheduled failures ([`Reporting::fail_after`]): requests to let through first,
    /// then the status to answer and how many times.
    fail: Option<(u32, u16, u32)>,
    /// Tests whose recipients are answered with a status, every time
    /// ([`Reporting::fail_recipients`]).
    failing_tests: BTreeMap<u64, u16>,
}

fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&Rfc3339).unwrap_or_default()
}

/// A decided answer: status, body and headers.
pub(crate) struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The body (JSON unless `content_type` says otherwise).
    pub body: String,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// `Retry-After` in seconds, when sent.
    pub retry_after: Option<u64>,
}

impl Answer {
    fn json(status: u16, body: String) -> Self {
        Answer {
            status,
            body,
            content_type: "application/json; charset=utf-8",
            retry_after: None,
        }
    }
}

/// Why a request is answered 429.
#[derive(Clone, Copy)]
enum TooMany {
    /// Over 4 in a second or 50 in a minute, or throttled by the reading.
    Rate,
    /// Over the daily quota.
    Quota,
}

impl Reporting {
    pub fn new(config: ReportingConfig) -> Self {
        Reporting {
            config,
            tests: BTreeMap::new(),
            next_pst_id: 509_579,
            next_recipient_id: 81_000_000,
            minute: VecDeque::new(),
            log: Vec::new(),
            stats: ReportingStats::default(),
            quota_day: OffsetDateTime::now_utc().date(),
            cursor: BTreeMap::new(),
            lists_served: 0,
            throttle_next: 0,
            fail: None,
            failing_tests: BTreeMap::new(),
        }
    }

    /// Answers every request for test `pst_id`'s recipients with `status` (a JSON error
    /// body) until called again with `None`.
    pub fn fail_recipients(&mut self, pst_id: u64, status: Option<u16>) {
        match status {
            Some(status) => self.failing_tests.insert(pst_id, status),
            None => self.failing_tests.remove(&pst_id),
        };
    }

    /// The status test `path`'s recipients are failed with, if any.
    fn failing_recipients(&self, path: &str) -> Option<u16> {
        let id = path
            .strip_prefix("/v1/phishing/security_tests/")?
            .strip_suffix("/recipients")?
            .parse::<u64>()
            .ok()?;
        self.failing_tests.get(&id).copied()
    }

    /// After the next `skip` requests, answers `count` requests with `status` (a JSON
    /// error body), whatever they ask.
    pub fn fail_after(&mut self, skip: u32, status: u16, count: u32) {
        self.fail = Some((skip, status, count));
    }

    /// The scheduled failure's status for this request, if it is one.
    fn scheduled_failure(&mut self) -> Option<u16> {
        let (skip, status, count) = self.fail?;
        if skip > 0 {
            self.fail = Some((skip - 1, status, count));
            return None;
        }
        self.fail = (count > 1).then_some((0, status, count - 1));
        Some(status)
    }

    /// The reading played.
    pub fn reading(&self) -> ReportingReading {
        self.config.reading
    }

    /// Plays another reading from the next request on.
    pub fn set_reading(&mut self, reading: ReportingReading) {
        self.config.reading = reading;
    }

    /// Answers the next `count` requests 429 (in the reading's wording, with its
    /// `Retry-After`), as when other integrations used the account's limits.
    pub fn throttle(&mut self, count: u32) {
        self.throttle_next = self.throttle_next.saturating_add(count);
    }

    /// A 429 as the reading words it.
    fn too_many(&self, cause: TooMany) -> Answer {
        let reading = &self.config.reading;
        let mut answer = match (reading.wording, cause) {
            (TooManyWording::ByCause, TooMany::Rate) | (TooManyWording::RateLimitExceeded, _) => {
                Answer::json(429, RATE_BODY.to_string())
            }
            (TooManyWording::ByCause, TooMany::Quota) | (TooManyWording::LimitExceeded, _) => {
                Answer::json(429, QUOTA_BODY.to_string())
            }
            (TooManyWording::TooManyRequests, _) => Answer {
                content_type: "text/plain; charset=utf-8",
                ..Answer::json(429, "Too Many Requests".to_string())
            },
        };
        answer.retry_after = reading.retry_after_secs;
        answer
    }

    /// Adds a test in progress with `recipients` recipients (results still empty); returns
    /// its `pst_id`. Its name holds `&`, which the API sends as `\u0026`.
    pub fn add_test(&mut self, recipients: usize) -> u64 {
        let pst_id = self.next_pst_id;
        self.next_pst_id += 1;
        let recipients = (0..recipients)
            .map(|i| {
                let recipient_id = self.next_recipient_id;
                self.next_recipient_id += 1;
                Recipient {
                    recipient_id,
                    user_id: 33_000_000 + i as u64,
                    reached: Vec::new(),
                }
            })
            .collect();
        self.tests.insert(
            pst_id,
            Test {
                campaign_id: 229_000 + pst_id % 1000,
                pst_id,
                name: format!("Q&A test {pst_id}"),
                status: "In Progress".into(),
                started_at: Some(now_rfc3339()),
                errored: false,
                recipients,
            },
        );
        pst_id
    }

    /// Adds a test in status `Error` that never started: `started_at`, `scheduled_count`
    /// and its template's members null, no recipients.
    pub fn add_errored_test(&mut self) -> u64 {
        let pst_id = self.add_test(0);
        let test = self.tests.get_mut(&pst_id).expect("just added");
        test.status = "Error".into();
        test.started_at = None;
        test.errored = true;
        pst_id
    }

    /// Moves `count` recipients (of `pst_id`, or of every open test in turn) one result
    /// further, stamped now; returns their `recipient_id`s. Closed tests change too: a
    /// late click after the test closed is what KnowBe4 can report.
    pub fn progress(&mut self, pst_id: Option<u64>, count: usize) -> Vec<u64> {
        let ids: Vec<u64> = match pst_id {
            Some(id) => vec![id],
            None => self.tests.keys().copied().collect(),
        };
        let mut moved = Vec::new();
        let now = now_rfc3339();
        for _ in 0..count {
            let mut progressed = false;
            for id in &ids {
                if moved.len() >= count {
                    break;
                }
                let Some(test) = self.tests.get_mut(id) else {
                    continue;
                };
                let n = test.recipients.len();
                if n == 0 {
                    continue;
                }
                let cursor = self.cursor.entry(*id).or_insert(0);
                for _ in 0..n {
                    let r = &mut test.recipients[*cursor % n];
                    *cursor = (*cursor + 1) % n;
                    if r.reached.len() < STAGES.len() {
                        r.reached.push(now.clone());
                        moved.push(r.recipient_id);
                        progressed = true;
                        break;
                    }
                }
            }
            if !progressed || moved.len() >= count {
                break;
            }
        }
        moved
    }

    /// Closes a test (results can still move: see [`progress`](Self::progress)).
    pub fn close(&mut self, pst_id: u64) -> bool {
        match self.tests.get_mut(&pst_id) {
            Some(test) => {
                test.status = "Closed".into();
                true
            }
            None => false,
        }
    }

    /// Replaces the token, as resetting it in the console does.
    pub fn set_token(&mut self, token: &str) {
        self.config.token = token.to_string();
    }

    /// Every test as the API serves it.
    pub fn tests_json(&self) -> Vec<Value> {
        self.tests.values().map(test_json).collect()
    }

    /// Every recipient of `pst_id` as the API serves it.
    pub fn recipients_json(&self, pst_id: u64) -> Vec<Value> {
        self.tests
            .get(&pst_id)
            .map(|t| t.recipients.iter().map(|r| recipient_json(t, r)).collect())
            .unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.log.clone()
    }

    pub fn stats(&mut self) -> ReportingStats {
        self.roll_quota_day();
        self.stats.clone()
    }

    fn roll_quota_day(&mut self) {
        let today = OffsetDateTime::now_utc().date();
        if today != self.quota_day {
            self.quota_day = today;
            self.stats.quota_used_today = 0;
        }
    }

    /// Accounts for and answers one Reporting API request.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        arrived: Instant,
        at_ms: u64,
        method: &str,
        path: &str,
        query: &str,
        authorization: Option<&str>,
        run_id: Option<String>,
    ) -> Answer {
        while let Some(first) = self.minute.front() {
            if arrived.saturating_duration_since(*first) >= Duration::from_secs(60) {
                self.minute.pop_front();
            } else {
                break;
            }
        }
        let in_second = self
            .minute
            .iter()
            .rev()
            .take_while(|t| arrived.saturating_duration_since(**t) < Duration::from_secs(1))
            .count();
        let over_second = in_second >= BURST_PER_SECOND;
        let over_minute = self.minute.len() >= BURST_PER_MINUTE;
        self.minute.push_back(arrived);
        self.roll_quota_day();
        let used_before = self.stats.quota_used_today;
        self.stats.quota_used_today += 1;
        self.stats.requests += 1;
        if over_second {
            self.stats.second_violations += 1;
        }
        if over_minute {
            self.stats.minute_violations += 1;
        }
        let authorized = authorization
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                Some(scheme.eq_ignore_ascii_case("bearer") && token.trim() == self.config.token)
            })
            .unwrap_or(false);
        let every = self.config.reading.throttle_every;
        let throttled = self.throttle_next > 0
            || (every > 0 && self.stats.requests.is_multiple_of(u64::from(every)));
        let reply = if (over_second || over_minute) && self.config.enforce_limits {
            self.too_many(TooMany::Rate)
        } else if self
            .config
            .daily_quota
            .is_some_and(|quota| used_before >= u64::from(quota))
        {
            self.too_many(TooMany::Quota)
        } else if throttled {
            self.throttle_next = self.throttle_next.saturating_sub(1);
            self.too_many(TooMany::Rate)
        } else if let Some(status) = self
            .scheduled_failure()
            .or_else(|| self.failing_recipients(path))
        {
            Answer::json(status, format!(r#"{{"message":"HTTP {status}"}}"#))
        } else if !authorized {
            // What KnowBe4 has been seen to answer: a 200 that is not a list.
            Answer::json(200, INVALID_TOKEN_BODY.to_string())
        } else {
            self.route(method, path, query)
        };
        if reply.status == 429 {
            self.stats.answered_429 += 1;
        }
        self.log.push(RequestRecord {
            at_ms,
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            status: reply.status,
            run_id,
            authorized,
        });
        reply
    }

    fn route(&mut self, method: &str, path: &str, query: &str) -> Answer {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let reading = self.config.reading;
        let (page, asked) = paging(query, usize::MAX);
        let per_page = asked.min((reading.max_per_page as usize).max(1));
        let mut items: Vec<Value> = match (method, segments.as_slice()) {
            ("GET", ["v1", "phishing", "security_tests"]) => {
                if reading.shift == Shift::InsertFront && page > 1 {
                    self.add_test(1);
                }
                self.tests_json()
            }
            ("GET", ["v1", "phishing", "security_tests", id, "recipients"]) => {
                match id
                    .parse::<u64>()
                    .ok()
                    .filter(|id| self.tests.contains_key(id))
                {
                    Some(id) => self.recipients_json(id),
                    None => return Answer::json(404, r#"{"message":"Not Found"}"#.into()),
                }
            }
            _ => return Answer::json(404, r#"{"message":"Not Found"}"#.into()),
        };
        match reading.shift {
            Shift::Stable => {}
            Shift::InsertFront => items.reverse(),
            Shift::Rotate => {
                if !items.is_empty() {
                    let by = (self.lists_served % items.len() as u64) as usize;
                    items.rotate_right(by);
                }
            }
        }
        self.lists_served += 1;
        let last_page = items.len().div_ceil(per_page).max(1);
        let page = match reading.paging {
            Paging::NotFoundPastEnd if page > last_page => {
                return Answer::json(404, r#"{"message":"Not Found"}"#.into());
            }
            Paging::Honoured | Paging::OffsetByRequested | Paging::NotFoundPastEnd => page,
            Paging::PageIgnored => 1,
            Paging::RepeatLast => page.min(last_page),
        };
        let start = match reading.paging {
            Paging::OffsetByRequested => (page - 1).saturating_mul(asked),
            _ => (page - 1).saturating_mul(per_page),
        };
        let mut on_page: Vec<Value> = items.into_iter().skip(start).take(per_page).collect();
        if reading.record_padding > 0 {
            let padding = Value::String("x".repeat(reading.record_padding));
            for item in &mut on_page {
                if let Value::Object(fields) = item {
                    fields.insert("sim_padding".into(), padding.clone());
                }
            }
        }
        let body = serde_json::to_string(&on_page).unwrap_or_else(|_| "[]".into());
        // Rails escapes `&` in JSON; outside strings JSON has no `&`, so this only
        // touches string contents.
        Answer::json(200, body.replace('&', "\\u0026"))
    }
}

/// `page` (1-based, default 1) and `per_page` (default 100, at most `max`).
fn paging(query: &str, max: usize) -> (usize, usize) {
    let max = max.max(1);
    let mut page = 1usize;
    let mut per_page = 100usize;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("page", v)) => page = v.parse().unwrap_or(1).max(1),
            Some(("per_page", v)) => per_page = v.parse().unwrap_or(100).max(1),
            _ => {}
        }
    }
    (page, per_page.min(max))
}

fn test_json(test: &Test) -> Value {
    let count = |stage: &str| -> Value {
        if test.errored {
            return Value::Null;
        }
        let i = STAGES.iter().position(|s| *s == stage).expect("a stage");
        json!(
            test.recipients
                .iter()
                .filter(|r| r.reached.len() > i)
                .count()
        )
    };
    let template = if test.errored {
        json!({"id": null, "name": null})
    } else {
        json!({"id": 4_000_000 + test.pst_id % 1000, "name": "Password reset & verify",
            "difficulty": 2, "type": "USER"})
    };
    json!({
        "campaign_id": test.campaign_id,
        "pst_id": test.pst_id,
        "status": test.status,
        "name": test.name,
        "groups": [{"group_id": 0, "name": "All Users"}],
        "phish_prone_percentage": 0.0,
        "started_at": test.started_at,
        "duration": 7,
        "categories": [],
        "template": template,
        "landing_page": {"id": null, "name": null},
        "scheduled_count": if test.errored { Value::Null } else { json!(test.recipients.len()) },
        "delivered_count": count("delivered_at"),
        "opened_count": count("opened_at"),
        "clicked_count": count("clicked_at"),
        "replied_count": 0,
        "attachment_open_count": 0,
        "macro_enabled_count": 0,
        "data_entered_count": count("data_entered_at"),
        "qr_code_scanned_count": 0,
        "reported_count": count("reported_at"),
        "bounced_count": 0,
    })
}

fn recipient_json(test: &Test, r: &Recipient) -> Value {
    let at = |i: usize| r.reached.get(i).cloned();
    json!({
        "recipient_id": r.recipient_id,
        "pst_id": test.pst_id,
        "user": {"id": r.user_id, "provisioning_guid": format!("usr-{}", r.user_id),
            "first_name": "Sim", "last_name": format!("User {}", r.user_id),
            "email": format!("user{}@example.com", r.user_id)},
        "template": {"id": 4_000_000 + test.pst_id % 1000, "name": "Password reset & verify",
            "difficulty": 2, "type": "USER"},
        "scheduled_at": test.started_at,
        "delivered_at": at(0),
        "opened_at": at(1),
        "clicked_at": at(2),
        "replied_at": null,
        "attachment_opened_at": null,
        "macro_enabled_at": null,
        "data_entered_at": at(3),
        "qr_code_scanned": null,
        "reported_at": at(4),
        "bounced_at": null,
        "ip": at(1).map(|_| "192.0.2.10"),
        "ip_location": null,
        "browser": at(1).map(|_| "Chrome"),
        "browser_version": at(1).map(|_| "120"),
        "os": at(1).map(|_| "mac"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(r: &mut Reporting, path: &str, query: &str, token: &str) -> Answer {
        r.handle(
            Instant::now(),
            0,
            "GET",
            path,
            query,
            Some(&format!("Bearer {token}")),
            None,
        )
    }

    #[test]
    fn lists_page_until_an_empty_page_with_escaped_ampersands() {
        let mut r = Reporting::new(ReportingConfig {
            enforce_limits: false,
            ..Default::default()
        });
        let pst = r.add_test(700);
        r.add_errored_test();
        let page1 = get(
            &mut r,
            "/v1/phishing/security_tests",
            "page=1&per_page=500",
            "sim-reporting-token",
        );
        assert_eq!(page1.status, 200);
        assert!(page1.body.contains(r"Q\u0026A test"), "{}", page1.body);
        assert!(!page1.body.contains('&'));
        let tests: Vec<Value> = serde_json::from_str(&page1.body).unwrap();
        assert_eq!(tests.len(), 2);
        assert_eq!(tests[1]["status"], "Error");
        assert!(tests[1]["started_at"].is_null() && tests[1]["scheduled_count"].is_null());
        let page2 = get(
            &mut r,
            "/v1/phishing/security_tests",
            "page=2&per_page=500",
            "sim-reporting-token",
        );
        assert_eq!(page2.body, "[]");
        let path = format!("/v1/phishing/security_tests/{pst}/recipients");
        let first: Vec<Value> = serde_json::from_str(
            &get(&mut r, &path, "page=1&per_page=500", "sim-reporting-token").body,
        )
        .unwrap();
        let second: Vec<Value> = serde_json::from_str(
            &get(&mut r, &path, "page=2&per_page=500", "sim-reporting-token").body,
        )
        .unwrap();
        let third = get(&mut r, &path, "page=3&per_page=500", "sim-reporting-token");
        assert_eq!(
            (first.len(), second.len(), third.body.as_str()),
            (500, 200, "[]")
        );
    }

    #[test]
    fn results_progress_and_a_bad_token_is_a_200_message() {
        let mut r = Reporting::new(ReportingConfig {
            enforce_limits: false,
            ..Default::default()
        });
        let pst = r.add_test(40);
        assert_eq!(r.progress(Some(pst), 10).len(), 10);
        let delivered = r
            .recipients_json(pst)
            .iter()
            .filter(|v| !v["delivered_at"].is_null())
            .count();
        assert_eq!(delivered, 10);
        r.close(pst);
        assert_eq!(r.tests_json()[0]["status"], "Closed");
        let refused = get(&mut r, "/v1/phishing/security_tests", "", "wrong");
        assert_eq!(
            (refused.status, refused.body.as_str()),
            (200, INVALID_TOKEN_BODY)
        );
    }

    const TOKEN: &str = "sim-reporting-token";

    /// A Reporting side playing `reading` with `tests` tests (none with recipients) and a
    /// test with `recipients` recipients, whose `pst_id` is returned.
    fn playing(reading: ReportingReading, tests: usize, recipients: usize) -> (Reporting, u64) {
        let mut r = Reporting::new(ReportingConfig {
            enforce_limits: false,
            reading,
            ..Default::default()
        });
        let pst = r.add_test(recipients);
        for _ in 0..tests {
            r.add_test(0);
        }
        (r, pst)
    }

    /// The ids (`pst_id` or `recipient_id`) on a page.
    fn ids(r: &mut Reporting, path: &str, query: &str) -> Vec<u64> {
        let answer = get(r, path, query, TOKEN);
        assert_eq!(answer.status, 200, "{}", answer.body);
        let key = if path.ends_with("recipients") {
            "recipient_id"
        } else {
            "pst_id"
        };
        serde_json::from_str::<Vec<Value>>(&answer.body)
            .unwrap()
            .iter()
            .map(|v| v[key].as_u64().unwrap())
            .collect()
    }

    const TESTS: &str = "/v1/phishing/security_tests";

    fn recipients(pst: u64) -> String {
        format!("/v1/phishing/security_tests/{pst}/recipients")
    }

    #[test]
    fn the_matrix_names_each_reading_once_and_by_name_finds_them() {
        let all = ReportingReading::all();
        let names: std::collections::BTreeSet<&str> = all.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), all.len(), "names are unique");
        assert!(all.len() > ReportingReading::matrix().len());
        for (name, reading) in &all {
            assert_eq!(ReportingReading::by_name(name), Some(*reading));
        }
        assert_eq!(
            ReportingReading::by_name("honoured-500"),
            Some(ReportingReading::default())
        );
        assert_eq!(ReportingReading::by_name("no-such-reading"), None);
        // Serde: missing members take the default's.
        let parsed: ReportingReading =
            serde_json::from_str(r#"{"max_per_page":100,"paging":"page_ignored"}"#).unwrap();
        assert_eq!(parsed, ReportingReading::by_name("page-ignored").unwrap());
    }

    #[test]
    fn per_page_is_honoured_up_to_the_readings_cap() {
        for (cap, asked, served) in [
            (500, 500, 500),
            (500, 700, 500),
            (100, 500, 100),
            (50, 500, 50),
            (50, 20, 20),
        ] {
            let reading = ReportingReading {
                max_per_page: cap,
                ..Default::default()
            };
            let (mut r, pst) = playing(reading, 0, 600);
            let page = ids(
                &mut r,
                &recipients(pst),
                &format!("page=1&per_page={asked}"),
            );
            assert_eq!(page.len(), served, "cap {cap}, asked {asked}");
            // Page 2 follows on from page 1 at the size served.
            let next = ids(
                &mut r,
                &recipients(pst),
                &format!("page=2&per_page={asked}"),
            );
            assert_eq!(next[0], page[served - 1] + 1);
        }
        // No per_page: the documented default of 100, within the cap.
        let (mut r, pst) = playing(ReportingReading::by_name("cap-50").unwrap(), 0, 600);
        assert_eq!(ids(&mut r, &recipients(pst), "page=1").len(), 50);
        let (mut r, pst) = playing(ReportingReading::default(), 0, 600);
        assert_eq!(ids(&mut r, &recipients(pst), "").len(), 100);
    }

    #[test]
    fn page_ignored_answers_page_one_to_every_page() {
        let (mut r, pst) = playing(ReportingReading::by_name("page-ignored").unwrap(), 0, 250);
        let first = ids(&mut r, &recipients(pst), "page=1&per_page=500");
        assert_eq!(first.len(), 100);
        for page in [2, 3, 9] {
            let again = ids(
                &mut r,
                &recipients(pst),
                &format!("page={page}&per_page=500"),
            );
            assert_eq!(again, first, "page {page}");
        }
        // Even a list shorter than a page never answers `[]`.
        let (mut r, _) = playing(ReportingReading::by_name("page-ignored").unwrap(), 2, 0);
        assert_eq!(ids(&mut r, TESTS, "page=2&per_page=500").len(), 3);
    }

    #[test]
    fn repeat_last_answers_the_last_page_past_the_end() {
        let (mut r, pst) = playing(ReportingReading::by_name("repeat-last").unwrap(), 0, 250);
        let pages: Vec<Vec<u64>> = (1..=5)
            .map(|page| {
                ids(
                    &mut r,
                    &recipients(pst),
                    &format!("page={page}&per_page=500"),
                )
            })
            .collect();
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            [100, 100, 50, 50, 50]
        );
        assert_eq!(pages[3], pages[2]);
        assert_eq!(pages[4], pages[2]);
        // An empty list is still `[]`.
        let mut empty = Reporting::new(ReportingConfig {
            enforce_limits: false,
            reading: ReportingReading::by_name("repeat-last").unwrap(),
            ..Default::default()
        });
        assert_eq!(get(&mut empty, TESTS, "page=3", TOKEN).body, "[]");
    }

    #[test]
    fn insert_front_moves_the_last_record_of_a_page_onto_the_next() {
        let (mut r, pst) = playing(ReportingReading::by_name("insert-front").unwrap(), 149, 5);
        let first = ids(&mut r, TESTS, "page=1&per_page=500");
        assert_eq!(first.len(), 100);
        assert!(first.windows(2).all(|w| w[0] > w[1]), "newest first");
        assert_eq!(r.tests.len(), 150, "page 1 adds nothing");
        let second = ids(&mut r, TESTS, "page=2&per_page=500");
        assert_eq!(r.tests.len(), 151, "a test was created before page 2");
        assert_eq!(second[0], first[99], "moved across the boundary");
        assert_eq!(second.len(), 51);
        // Recipients: newest first, the list does not grow.
        let people = ids(&mut r, &recipients(pst), "page=2&per_page=2");
        assert_eq!(people.len(), 2);
        assert!(people[0] > people[1]);
        assert_eq!(r.tests.len(), 151);
    }

    #[test]
    fn rotate_moves_records_across_page_boundaries_between_requests() {
        let (mut r, pst) = playing(ReportingReading::by_name("rotate").unwrap(), 0, 250);
        let stable = r
            .recipients_json(pst)
            .iter()
            .map(|v| v["recipient_id"].as_u64().unwrap())
            .collect::<Vec<_>>();
        let first = ids(&mut r, &recipients(pst), "page=1&per_page=100");
        let second = ids(&mut r, &recipients(pst), "page=2&per_page=100");
        assert_eq!(first, stable[..100], "the first request is in order");
        assert_eq!(second[0], first[99], "the last of page 1 is now on page 2");
        assert_eq!(second[1..], stable[100..199]);
        let first_again = ids(&mut r, &recipients(pst), "page=1&per_page=100");
        assert_ne!(first_again, first, "re-sorted again");
        assert_eq!(first_again[0], stable[248]);
        let oracle = r
            .recipients_json(pst)
            .iter()
            .map(|v| v["recipient_id"].as_u64().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(oracle, stable, "the oracle's order does not move");
    }

    #[test]
    fn throttled_readings_answer_429_as_they_say() {
        let reading = ReportingReading::by_name("throttled-retry-after").unwrap();
        let (mut r, _) = playing(reading, 1, 0);
        let answers: Vec<Answer> = (0..6).map(|_| get(&mut r, TESTS, "", TOKEN)).collect();
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert_eq!(statuses, [200, 200, 429, 200, 200, 429]);
        let refused = &answers[2];
        assert_eq!(
            (
                refused.body.as_str(),
                refused.content_type,
                refused.retry_after
            ),
            ("Too Many Requests", "text/plain; charset=utf-8", Some(1))
        );
        assert_eq!(answers[0].retry_after, None, "no Retry-After on a 200");
        assert_eq!(r.stats().answered_429, 2);

        let reading = ReportingReading::by_name("throttled-limit-wording").unwrap();
        let (mut r, _) = playing(reading, 1, 0);
        let refused = (0..3)
            .map(|_| get(&mut r, TESTS, "", TOKEN))
            .last()
            .unwrap();
        assert_eq!(
            (refused.status, refused.body.as_str(), refused.retry_after),
            (429, QUOTA_BODY, None)
        );

        let reading = ReportingReading::by_name("throttled-long-retry-after").unwrap();
        let (mut r, _) = playing(reading, 1, 0);
        let refused = (0..3)
            .map(|_| get(&mut r, TESTS, "", TOKEN))
            .last()
            .unwrap();
        assert_eq!(
            (refused.status, refused.body.as_str(), refused.retry_after),
            (429, RATE_BODY, Some(3600))
        );
    }

    #[test]
    fn throttle_answers_the_next_requests_429_in_the_readings_words() {
        let (mut r, _) = playing(ReportingReading::default(), 1, 0);
        r.throttle(2);
        let statuses: Vec<(u16, String, Option<u64>)> = (0..3)
            .map(|_| get(&mut r, TESTS, "", TOKEN))
            .map(|a| (a.status, a.body, a.retry_after))
            .collect();
        assert_eq!(statuses[0], (429, RATE_BODY.to_string(), None));
        assert_eq!(statuses[1].0, 429);
        assert_eq!(statuses[2].0, 200);
        // The daily quota's 429 is worded by cause by default, and as the reading says
        // otherwise, with the reading's Retry-After.
        let mut r = Reporting::new(ReportingConfig {
            enforce_limits: false,
            daily_quota: Some(0),
            ..Default::default()
        });
        assert_eq!(get(&mut r, TESTS, "", TOKEN).body, QUOTA_BODY);
        r.set_reading(ReportingReading {
            wording: TooManyWording::RateLimitExceeded,
            retry_after_secs: Some(7),
            ..Default::default()
        });
        let answer = get(&mut r, TESTS, "", TOKEN);
        assert_eq!(
            (answer.status, answer.body.as_str(), answer.retry_after),
            (429, RATE_BODY, Some(7))
        );
    }

    #[test]
    fn large_records_put_a_page_of_500_over_the_clients_cap_and_100_under() {
        let cap = crate::knowbe4::reporting::REPORTING_MAX_BODY_BYTES;
        let (mut r, pst) = playing(ReportingReading::by_name("large-records").unwrap(), 0, 500);
        let big = get(&mut r, &recipients(pst), "page=1&per_page=500", TOKEN);
        assert!(big.body.len() > cap, "{} bytes", big.body.len());
        let small = get(&mut r, &recipients(pst), "page=1&per_page=100", TOKEN);
        assert!(small.body.len() < cap / 2, "{} bytes", small.body.len());
        let items: Vec<Value> = serde_json::from_str(&small.body).unwrap();
        assert_eq!(items.len(), 100);
        assert_eq!(
            items[0]["sim_padding"].as_str().map(str::len),
            Some(LARGE_RECORD_PADDING)
        );
        assert!(small.body.contains(r"\u0026"), "still escaped");
        // Without padding, a page of 500 is far under the cap.
        let (mut r, pst) = playing(ReportingReading::default(), 0, 500);
        let plain = get(&mut r, &recipients(pst), "page=1&per_page=500", TOKEN);
        assert!(plain.body.len() < cap / 8);
        assert!(!plain.body.contains("sim_padding"));
    }

    #[test]
    fn over_four_a_second_or_fifty_a_minute_is_429() {
        let mut r = Reporting::new(ReportingConfig::default());
        let start = Instant::now();
        let mut statuses = Vec::new();
        for i in 0..5u64 {
            let reply = r.handle(
                start + Duration::from_millis(i * 10),
                0,
                "GET",
                "/v1/phishing/security_tests",
                "",
                Some("Bearer sim-reporting-token"),
                None,
            );
            statuses.push(reply.status);
        }
        assert_eq!(statuses, [200, 200, 200, 200, 429]);
        let mut r = Reporting::new(ReportingConfig::default());
        let mut last = 0;
        for i in 0..51u64 {
            last = r
                .handle(
                    start + Duration::from_millis(i * 1000),
                    0,
                    "GET",
                    "/v1/phishing/security_tests",
                    "",
                    Some("Bearer sim-reporting-token"),
                    None,
                )
                .status;
        }
        assert_eq!(last, 429);
        assert_eq!(r.stats().minute_violations, 1);
    }
}
