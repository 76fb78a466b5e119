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
}

impl Default for ReportingConfig {
    fn default() -> Self {
        ReportingConfig {
            token: "sim-reporting-token".into(),
            daily_quota: None,
            enforce_limits: true,
        }
    }
}

impl std::fmt::Debug for ReportingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportingConfig")
            .field("token", &"[redacted]")
            .field("daily_quota", &self.daily_quota)
            .field("enforce_limits", &self.enforce_limits)
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
}

fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&Rfc3339).unwrap_or_default()
}

/// A decided answer: status and JSON body.
pub(crate) struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The JSON body.
    pub body: String,
}

impl Answer {
    fn json(status: u16, body: String) -> Self {
        Answer { status, body }
    }
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
        }
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
        let reply = if (over_second || over_minute) && self.config.enforce_limits {
            Answer::json(429, RATE_BODY.to_string())
        } else if self
            .config
            .daily_quota
            .is_some_and(|quota| used_before >= u64::from(quota))
        {
            Answer::json(429, QUOTA_BODY.to_string())
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

    fn route(&self, method: &str, path: &str, query: &str) -> Answer {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (page, per_page) = paging(query);
        let items: Vec<Value> = match (method, segments.as_slice()) {
            ("GET", ["v1", "phishing", "security_tests"]) => self.tests_json(),
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
        let start = (page - 1).saturating_mul(per_page);
        let on_page: Vec<&Value> = items.iter().skip(start).take(per_page).collect();
        let body = serde_json::to_string(&on_page).unwrap_or_else(|_| "[]".into());
        // Rails escapes `&` in JSON; outside strings JSON has no `&`, so this only
        // touches string contents.
        Answer::json(200, body.replace('&', "\\u0026"))
    }
}

/// `page` (1-based, default 1) and `per_page` (default 100, at most 500).
fn paging(query: &str) -> (usize, usize) {
    let mut page = 1usize;
    let mut per_page = 100usize;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("page", v)) => page = v.parse().unwrap_or(1).max(1),
            Some(("per_page", v)) => per_page = v.parse().unwrap_or(100).clamp(1, 500),
            _ => {}
        }
    }
    (page, per_page)
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
