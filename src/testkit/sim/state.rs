//! The simulator's state and the API's decisions, with no I/O.
//!
//! Everything a request needs is decided here, in one short critical section at arrival:
//! rate-limit and quota accounting, authentication, fault injection and the page body. The
//! HTTP layer then only waits (latency, `Slow`) and delivers the [`Reply`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use time::{Date, OffsetDateTime};

use super::events::{self, EVENT_TYPES};
use super::reporting::Reporting;
use super::{CountMode, Fault, Reading, RequestRecord, SimConfig, SimStats};

/// Requests allowed in any trailing [`RATE_WINDOW`]; the next one is answered 429.
pub(crate) const RATE_LIMIT: usize = 4;
/// The window the rate limit is counted over.
pub(crate) const RATE_WINDOW: Duration = Duration::from_millis(1000);
/// Body of a 429 for going over the per-second rate.
pub(crate) const RATE_BODY: &str = r#"{"message":"Rate limit exceeded"}"#;
/// Body of a 429 for going over the daily quota (KnowBe4 says "Limit Exceeded").
pub(crate) const QUOTA_BODY: &str = r#"{"message":"API Limit Exceeded"}"#;

/// How the HTTP layer must deliver a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Send it as usual.
    Whole,
    /// Wait this many milliseconds before sending the headers.
    Slow(u64),
    /// Send the headers, then the body a few bytes at a time.
    Drip,
    /// Close the connection without answering.
    Reset,
}

/// A decided answer to one API request.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` of the body (ignored when the body is empty).
    pub content_type: &'static str,
    /// The body text.
    pub body: String,
    /// A `Retry-After` header to add, in seconds.
    pub retry_after: Option<u64>,
    /// How to send it.
    pub delivery: Delivery,
}

impl Reply {
    pub(crate) fn json(status: u16, body: String) -> Self {
        Reply {
            status,
            content_type: "application/json; charset=utf-8",
            body,
            retry_after: None,
            delivery: Delivery::Whole,
        }
    }

    fn error(status: u16, message: &str) -> Self {
        if matches!(status, 204 | 304) || (100..200).contains(&status) {
            return Reply::json(status, String::new());
        }
        Reply::json(
            status,
            serde_json::json!({ "message": message }).to_string(),
        )
    }
}

/// The reason phrase of a status code, for JSON error bodies.
fn reason(status: u16) -> &'static str {
    axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// The pagination block of a list response (Kaminari's names, as KnowBe4 sends them).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Meta {
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_value: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_pages: Option<u64>,
    current_page: u64,
    next_page: Option<u64>,
    prev_page: Option<u64>,
    is_first_page: bool,
    is_last_page: bool,
    is_out_of_range: bool,
}

impl Meta {
    /// The block for page `page` of a `per_page` listing of `count` events, which holds
    /// `on_page` of them, as `reading` says the server fills it in.
    fn new(count: u64, per_page: u64, page: u64, on_page: u64, reading: &Reading) -> Self {
        let total_pages = count.div_ceil(per_page);
        let is_out_of_range = page > total_pages;
        Meta {
            count: match reading.count_mode {
                CountMode::Page => Some(on_page),
                CountMode::Total => Some(count),
                CountMode::Absent => None,
            },
            limit_value: reading.limit_value.then_some(per_page),
            total_pages: reading.total_pages.then_some(total_pages),
            current_page: page,
            next_page: (page < total_pages).then_some(page + 1),
            prev_page: (page > 1 && !is_out_of_range).then(|| page - 1),
            is_first_page: page == 1,
            is_last_page: page == total_pages,
            is_out_of_range,
        }
    }
}

/// The sort key `GET /events` was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OrderBy {
    OccurredDate,
    Id,
    EventType,
}

/// A parsed `GET /events` query.
#[derive(Debug, Clone, Copy)]
struct ListQuery {
    page: u64,
    per_page: u64,
    order_by: OrderBy,
    descending: bool,
}

impl ListQuery {
    /// Reads the query leniently, as Rails would: unknown or malformed values fall back
    /// to the defaults; `per_page` is capped at the reading's maximum.
    fn parse(query: &str, reading: &Reading) -> Self {
        let mut page = 1;
        let mut per_page = reading.default_per_page;
        let mut order_by = OrderBy::OccurredDate;
        let mut direction = None;
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "page" => page = value.parse::<u64>().unwrap_or(1).max(1),
                "per_page" => {
                    per_page = value
                        .parse::<u64>()
                        .unwrap_or(reading.default_per_page)
                        .clamp(1, reading.max_per_page.max(1))
                }
                "order_by" => {
                    order_by = match value {
                        "id" => OrderBy::Id,
                        "event_type" => OrderBy::EventType,
                        _ => OrderBy::OccurredDate,
                    }
                }
                "order_direction" => {
                    direction = match value.to_ascii_lowercase().as_str() {
                        "asc" => Some(false),
                        "desc" => Some(true),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        let descending = direction.unwrap_or(order_by == OrderBy::OccurredDate);
        ListQuery {
            page,
            per_page,
            order_by,
            descending,
        }
    }
}

/// Everything the simulator knows; lives behind one `std::sync::Mutex`.
pub(crate) struct State {
    /// The key requests must present.
    api_key: String,
    /// Calls allowed per UTC day; `None` is unlimited.
    daily_quota: Option<u32>,
    /// Status for a missing or wrong key (KnowBe4 has answered 500 as well as 401).
    wrong_key_status: u16,
    /// Whether requests over the rate get 429 (they are counted either way).
    enforce_rate_limit: bool,
    /// The reading of the API's unconfirmed details this server plays.
    reading: Reading,
    /// Delay before answering each API request.
    pub latency_ms: u64,
    /// The `account_id` every event carries.
    account_id: u64,
    /// Seeded so ids and the choice of deleted events are reproducible.
    rng: StdRng,
    /// Events keyed by (occurred ms, id) → seed: the default order, cheap to page.
    by_time: BTreeMap<(i64, u128), u64>,
    /// Events keyed by id → (occurred ms, seed): lookups and `order_by=id`.
    by_id: BTreeMap<u128, (i64, u64)>,
    /// Injected faults, consumed front first by requests to `GET /events`.
    faults: VecDeque<(Fault, u32)>,
    /// Arrival times of API requests in the trailing rate window.
    window: VecDeque<Instant>,
    /// Every API request, in arrival order.
    log: Vec<RequestRecord>,
    /// Counters reported by `stats`.
    stats: SimStats,
    /// The UTC day `stats.quota_used_today` counts for.
    quota_day: Date,
    /// The Reporting API (`/v1/...`): its own token, tests, limits and log.
    pub reporting: Reporting,
}

/// Unix milliseconds now.
pub(crate) fn now_millis() -> i64 {
    events::millis_of(OffsetDateTime::now_utc())
}

impl State {
    /// A simulator state with `config.events` events spread over the last
    /// `config.span_hours`.
    pub fn new(config: &SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let account_id = 10_000 + rng.random_range(0..90_000u64);
        let mut state = State {
            api_key: config.api_key.clone(),
            daily_quota: config.daily_quota,
            wrong_key_status: config.wrong_key_status,
            enforce_rate_limit: config.enforce_rate_limit,
            reading: config.reading,
            latency_ms: config.latency_ms,
            account_id,
            rng,
            by_time: BTreeMap::new(),
            by_id: BTreeMap::new(),
            faults: VecDeque::new(),
            window: VecDeque::new(),
            log: Vec::new(),
            stats: SimStats::default(),
            quota_day: OffsetDateTime::now_utc().date(),
            reporting: Reporting::new(config.reporting.clone()),
        };
        let now = now_millis();
        let span_ms = (config.span_hours.max(1) * 3_600_000) as i64;
        let mut previous = None;
        for _ in 0..config.events {
            // About 1.5% of events copy the previous one's time, so about 3% of events
            // share their occurred_date with another: ties are real in KnowBe4.
            let occurred = match previous {
                Some(p) if state.rng.random_bool(0.015) => p,
                _ => now - state.rng.random_range(0..span_ms),
            };
            state.insert(occurred);
            previous = Some(occurred);
        }
        state
    }

    /// Adds one event at `occurred_ms`, returning its id.
    fn insert(&mut self, occurred_ms: i64) -> String {
        let id = loop {
            let bytes: [u8; 16] = self.rng.random();
            let id = uuid::Builder::from_random_bytes(bytes)
                .into_uuid()
                .as_u128();
            if !self.by_id.contains_key(&id) {
                break id;
            }
        };
        let seed: u64 = self.rng.random();
        self.by_time.insert((occurred_ms, id), seed);
        self.by_id.insert(id, (occurred_ms, seed));
        events::id_string(id)
    }

    /// Adds `count` events `backdate_secs` before now, each with up to 1 s of jitter.
    pub fn add_events(&mut self, count: usize, backdate_secs: u64) -> Vec<String> {
        let newest = now_millis() - (backdate_secs as i64).saturating_mul(1000);
        (0..count)
            .map(|_| {
                let jitter = self.rng.random_range(0..1000);
                self.insert(newest - jitter)
            })
            .collect()
    }

    /// Adds `count` events with times spread uniformly over `oldest..=newest`.
    pub fn add_events_between(&mut self, count: usize, oldest: i64, newest: i64) -> Vec<String> {
        let (oldest, newest) = (oldest.min(newest), oldest.max(newest));
        (0..count)
            .map(|_| {
                let at = self.rng.random_range(oldest..=newest);
                self.insert(at)
            })
            .collect()
    }

    /// Deletes `count` events chosen at random (seeded), returning their ids.
    pub fn delete_random(&mut self, count: usize) -> Vec<String> {
        let mut keys: Vec<u128> = self.by_id.keys().copied().collect();
        let count = count.min(keys.len());
        for i in 0..count {
            let j = self.rng.random_range(i..keys.len());
            keys.swap(i, j);
        }
        keys.truncate(count);
        for id in &keys {
            self.remove(*id);
        }
        keys.into_iter().map(events::id_string).collect()
    }

    /// Deletes the events with these ids, returning the ids that existed.
    pub fn delete_ids(&mut self, ids: &[String]) -> Vec<String> {
        ids.iter()
            .filter(|text| events::parse_id(text).is_some_and(|id| self.remove(id)))
            .cloned()
            .collect()
    }

    fn remove(&mut self, id: u128) -> bool {
        match self.by_id.remove(&id) {
            Some((occurred, _)) => {
                self.by_time.remove(&(occurred, id));
                true
            }
            None => false,
        }
    }

    /// Ids of all events, newest first (the API's default order).
    pub fn event_ids(&self) -> Vec<String> {
        self.by_time
            .keys()
            .rev()
            .map(|(_, id)| events::id_string(*id))
            .collect()
    }

    /// The (occurred ms, id) keys of all events, oldest first.
    #[cfg(test)]
    pub fn by_time_keys(&self) -> impl Iterator<Item = (i64, u128)> + '_ {
        self.by_time.keys().copied()
    }

    /// Queues a fault for the next `count` requests to `GET /events`.
    pub fn inject(&mut self, fault: Fault, count: u32) {
        if count > 0 {
            self.faults.push_back((fault, count));
        }
    }

    /// Drops all queued faults.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Replaces the key requests must present.
    pub fn set_api_key(&mut self, key: &str) {
        self.api_key = key.to_string();
    }

    /// The request log.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.log.clone()
    }

    /// The counters, with the quota rolled over to today if the UTC day changed.
    pub fn stats(&mut self) -> SimStats {
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

    fn take_fault(&mut self) -> Option<Fault> {
        let (fault, remaining) = self.faults.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            self.faults.pop_front();
        }
        Some(fault)
    }

    /// Accounts for and answers one API request that arrived at `arrived`.
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
    ) -> Reply {
        if path.starts_with("/v1/") {
            // The Reporting API: another API, with its own token and limits.
            let answer =
                self.reporting
                    .handle(arrived, at_ms, method, path, query, authorization, run_id);
            return Reply {
                content_type: answer.content_type,
                retry_after: answer.retry_after,
                ..Reply::json(answer.status, answer.body)
            };
        }
        while let Some(first) = self.window.front() {
            if arrived.saturating_duration_since(*first) >= RATE_WINDOW {
                self.window.pop_front();
            } else {
                break;
            }
        }
        let over_rate = self.window.len() >= RATE_LIMIT;
        self.window.push_back(arrived);
        self.roll_quota_day();
        let used_before = self.stats.quota_used_today;
        self.stats.quota_used_today += 1;
        self.stats.requests += 1;
        let authorized = authorization
            .and_then(|value| {
                let (scheme, key) = value.split_once(' ')?;
                Some(scheme.eq_ignore_ascii_case("bearer") && key.trim() == self.api_key)
            })
            .unwrap_or(false);

        let (reply, faulted) = if over_rate && {
            self.stats.rate_violations += 1;
            self.enforce_rate_limit
        } {
            (Reply::json(429, RATE_BODY.to_string()), false)
        } else if self
            .daily_quota
            .is_some_and(|quota| used_before >= u64::from(quota))
        {
            (Reply::json(429, QUOTA_BODY.to_string()), false)
        } else if !authorized {
            let message = if self.wrong_key_status == 401 {
                "Invalid API key"
            } else {
                reason(self.wrong_key_status)
            };
            (Reply::error(self.wrong_key_status, message), false)
        } else {
            self.route(method, path, query)
        };

        if !faulted && (200..300).contains(&reply.status) {
            self.stats.served_ok += 1;
        }
        self.log.push(RequestRecord {
            at_ms,
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            status: if reply.delivery == Delivery::Reset {
                0
            } else {
                reply.status
            },
            run_id,
            authorized,
        });
        reply
    }

    /// Answers an authenticated, admitted request; the flag says a fault was injected.
    fn route(&mut self, method: &str, path: &str, query: &str) -> (Reply, bool) {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            ("GET", ["events"]) => {
                let query = ListQuery::parse(query, &self.reading);
                match self.take_fault() {
                    Some(fault) => {
                        let faulted = fault != Fault::Pass;
                        (self.faulty_list(&query, fault), faulted)
                    }
                    None => {
                        let (items, meta) = self.page(&query);
                        (Reply::json(200, page_body(&items, &meta)), false)
                    }
                }
            }
            ("GET", ["events", id]) => {
                let found = events::parse_id(id)
                    .and_then(|id| self.by_id.get(&id).map(|(at, seed)| (id, *at, *seed)));
                match found {
                    Some((id, at, seed)) => {
                        let event = events::event_json(self.account_id, id, at, seed);
                        (Reply::json(200, format!(r#"{{"data":{event}}}"#)), false)
                    }
                    None => (Reply::error(404, "Not Found"), false),
                }
            }
            ("DELETE", ["events", id]) => {
                if events::parse_id(id).is_some_and(|id| self.remove(id)) {
                    (Reply::json(204, String::new()), false)
                } else {
                    (Reply::error(404, "Not Found"), false)
                }
            }
            ("GET", ["event_types"]) => {
                let data: Vec<_> = (0..EVENT_TYPES.len())
                    .map(events::event_type_json)
                    .collect();
                // `GET /event_types` answers `meta: {"count": N}` only [REC].
                let meta = serde_json::json!({ "count": data.len() });
                let body = serde_json::json!({ "data": data, "meta": meta }).to_string();
                (Reply::json(200, body), false)
            }
            (_, ["events"] | ["events", _] | ["event_types"]) => {
                (Reply::error(405, "Method Not Allowed"), false)
            }
            _ => (Reply::error(404, "Not Found"), false),
        }
    }

    /// The events of one page, serialised, and the page's `meta`.
    fn page(&self, query: &ListQuery) -> (Vec<String>, Meta) {
        let count = self.by_id.len() as u64;
        let skip =
            usize::try_from((query.page - 1).saturating_mul(query.per_page)).unwrap_or(usize::MAX);
        let take = query.per_page as usize;
        let keys: Vec<(i64, u128, u64)> = match (query.order_by, query.descending) {
            (OrderBy::OccurredDate, true) => self
                .by_time
                .iter()
                .rev()
                .skip(skip)
                .take(take)
                .map(|(&(at, id), &seed)| (at, id, seed))
                .collect(),
            (OrderBy::OccurredDate, false) => self
                .by_time
                .iter()
                .skip(skip)
                .take(take)
                .map(|(&(at, id), &seed)| (at, id, seed))
                .collect(),
            (OrderBy::Id, true) => self
                .by_id
                .iter()
                .rev()
                .skip(skip)
                .take(take)
                .map(|(&id, &(at, seed))| (at, id, seed))
                .collect(),
            (OrderBy::Id, false) => self
                .by_id
                .iter()
                .skip(skip)
                .take(take)
                .map(|(&id, &(at, seed))| (at, id, seed))
                .collect(),
            (OrderBy::EventType, descending) => {
                // Rarely used, so sorted on demand: by type name, then newest first, then id.
                let mut all: Vec<(&str, i64, u128, u64)> = self
                    .by_time
                    .iter()
                    .rev()
                    .map(|(&(at, id), &seed)| {
                        (EVENT_TYPES[events::event_type_index(seed)].1, at, id, seed)
                    })
                    .collect();
                all.sort_by(|a, b| {
                    let by_name = if descending {
                        b.0.cmp(a.0)
                    } else {
                        a.0.cmp(b.0)
                    };
                    by_name.then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2))
                });
                all.into_iter()
                    .skip(skip)
                    .take(take)
                    .map(|(_, at, id, seed)| (at, id, seed))
                    .collect()
            }
        };
        let items: Vec<String> = keys
            .into_iter()
            .map(|(at, id, seed)| events::event_json(self.account_id, id, at, seed))
            .collect();
        let meta = Meta::new(
            count,
            query.per_page,
            query.page,
            items.len() as u64,
            &self.reading,
        );
        (items, meta)
    }

    /// The answer to a `GET /events` that drew an injected fault.
    fn faulty_list(&self, query: &ListQuery, fault: Fault) -> Reply {
        match fault {
            Fault::Status(status) => Reply::error(status, reason(status)),
            Fault::StatusRetryAfter(status, secs) => Reply {
                retry_after: Some(secs),
                ..Reply::error(status, reason(status))
            },
            Fault::Malformed => {
                let (items, meta) = self.page(query);
                let mut body = page_body(&items, &meta);
                let mut cut = body.len() / 2;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
                Reply::json(200, body)
            }
            Fault::Html => Reply {
                content_type: "text/html; charset=utf-8",
                ..Reply::json(200, HTML_ERROR_PAGE.to_string())
            },
            Fault::WrongTypes => {
                let (items, meta) = self.page(query);
                let meta = serde_json::to_string(&meta).unwrap_or_default();
                let body = format!(
                    r#"{{"data":{{"events":[{}]}},"meta":{meta}}}"#,
                    items.join(",")
                );
                Reply::json(200, body)
            }
            Fault::MissingMeta => {
                let (items, _) = self.page(query);
                Reply::json(200, format!(r#"{{"data":[{}]}}"#, items.join(",")))
            }
            Fault::EmptyPage => {
                let page = query.page;
                let mut meta = Meta::new(
                    self.by_id.len() as u64,
                    query.per_page,
                    page,
                    0,
                    &self.reading,
                );
                meta.count = meta.count.map(|c| c.max(query.per_page * page + 1));
                meta.total_pages = meta.total_pages.map(|t| t.max(page + 1));
                meta.next_page = Some(page + 1);
                meta.is_last_page = false;
                meta.is_out_of_range = false;
                meta.prev_page = (page > 1).then(|| page - 1);
                Reply::json(200, page_body(&[], &meta))
            }
            Fault::Slow(ms) => {
                let (items, meta) = self.page(query);
                Reply {
                    delivery: Delivery::Slow(ms),
                    ..Reply::json(200, page_body(&items, &meta))
                }
            }
            Fault::Drip => {
                let (items, meta) = self.page(query);
                Reply {
                    delivery: Delivery::Drip,
                    ..Reply::json(200, page_body(&items, &meta))
                }
            }
            Fault::Reset => Reply {
                delivery: Delivery::Reset,
                ..Reply::json(200, String::new())
            },
            Fault::Gigantic => {
                let (items, meta) = self.page(query);
                let meta = serde_json::to_string(&meta).unwrap_or_default();
                let padding = "x".repeat(super::GIGANTIC_BYTES);
                let body = format!(
                    r#"{{"data":[{}],"meta":{meta},"padding":"{padding}"}}"#,
                    items.join(",")
                );
                Reply::json(200, body)
            }
            Fault::NextPageBackwards | Fault::NextPageSame => {
                let (items, mut meta) = self.page(query);
                meta.next_page = Some(if fault == Fault::NextPageSame {
                    query.page
                } else {
                    1
                });
                Reply::json(200, page_body(&items, &meta))
            }
            Fault::Loop => {
                let first = ListQuery { page: 1, ..*query };
                let (items, meta) = self.page(&first);
                Reply::json(200, page_body(&items, &meta))
            }
            Fault::OccurredDateNumber | Fault::EventWithoutId => {
                let (mut items, meta) = self.page(query);
                if let Some(first) = items.first_mut() {
                    *first = break_event(first, &fault);
                }
                Reply::json(200, page_body(&items, &meta))
            }
            Fault::Pass => {
                let (items, meta) = self.page(query);
                Reply::json(200, page_body(&items, &meta))
            }
        }
    }
}

/// An event's JSON with `occurred_date` turned into a number, or without `id`.
fn break_event(event: &str, fault: &Fault) -> String {
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str(event) else {
        return event.to_string();
    };
    if *fault == Fault::EventWithoutId {
        object.remove("id");
    } else {
        let millis = object
            .get("occurred_date")
            .and_then(|v| v.as_str())
            .and_then(|text| {
                OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
            })
            .map_or(0, events::millis_of);
        object.insert("occurred_date".into(), millis.into());
    }
    serde_json::Value::Object(object).to_string()
}

/// What a Rails app behind a proxy shows when it breaks.
const HTML_ERROR_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>We're sorry, but something \
went wrong (500)</title></head>\n<body><h1>We're sorry, but something went wrong.</h1>\n\
<p>If you are the application owner check the logs for more information.</p></body></html>\n";

/// A list response body: `{"data":[...],"meta":{...}}`.
fn page_body(items: &[String], meta: &Meta) -> String {
    let meta = serde_json::to_string(meta).unwrap_or_default();
    format!(r#"{{"data":[{}],"meta":{meta}}}"#, items.join(","))
}
