//! The KnowBe4 User Event API client: `GET /events`, paced at the API's rate limit.
//!
//! One concrete client with an injected base URL (the region's API host, or the
//! simulator under `KNOWBE4_ALLOW_CUSTOM_BASE_URL`). Every request, retries included,
//! first waits for the account's rate limiter, so no one-second window ever holds more
//! than four requests from this process. Responses are classified into what the caller
//! must do ([`ApiError`]); nothing here panics on a hostile body.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::checkpoint::{PER_PAGE, Page};
use crate::domain::event::RawEvent;
use crate::error::Error;

/// Spacing between requests to one account: 4 per second with a 20 ms margin per
/// request (80 ms per window) for scheduling and network jitter, so the server never
/// counts five in one second.
pub const REQUEST_SPACING: Duration = Duration::from_millis(270);
/// Largest response body accepted: a real 100-event page is ~55 KB, so 2 MiB is ample
/// and bounds what a hostile or broken server can make a 128 MB Lambda hold.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Longest event id accepted (KnowBe4's are 36-byte UUIDs); longer ids make the page
/// malformed rather than bloat the checkpoint.
pub const MAX_ID_BYTES: usize = 128;

/// Why a request did not yield a page.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401 or 403: the key (or the subscription) is not accepted.
    #[error("KnowBe4 refused the API key (HTTP {0})")]
    Unauthorized(u16),
    /// 404 on `/events`: the host is not the User Event API (wrong region or URL).
    #[error("the base URL does not answer as the KnowBe4 User Event API (HTTP 404)")]
    NotKnowBe4,
    /// 429 with `Limit Exceeded`: the daily quota is used up.
    #[error("KnowBe4's daily request quota is used up")]
    QuotaExhausted,
    /// Another 429: slow down, retry later.
    #[error("KnowBe4 rate-limited the request (HTTP 429)")]
    RateLimited {
        /// `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// Any other unexpected status.
    #[error("KnowBe4 answered HTTP {status}")]
    Status {
        /// The status.
        status: u16,
    },
    /// Could not connect, timed out, TLS or DNS failure, reset.
    #[error("KnowBe4 could not be reached: {0}")]
    Transport(String),
    /// The request provably never left this process (DNS failure, connection refused):
    /// KnowBe4 did not see it, so it did not spend the account's quota.
    #[error("KnowBe4 could not be reached: {0}")]
    NotSent(String),
    /// A complete body that is not the documented shape. Deterministic: asking again
    /// gets the same answer, so it is never retried (see [`ApiError::retriable`]).
    #[error("KnowBe4 sent a malformed response: {0}")]
    Malformed(String),
    /// A page that parses but does not fit the list it claims to be part of: no events (or
    /// fewer than a full page) while more pages follow, or none while `count` says this
    /// page holds some. A live list shrinking between KnowBe4 counting it and serving the
    /// page answers this way, so asking again may get a consistent page: retriable.
    #[error("KnowBe4 sent an inconsistent page: {0}")]
    Inconsistent(String),
    /// The body is larger than the client accepts (`limit` bytes); nothing was parsed.
    /// Deterministic for the same request: the caller may ask for a smaller page instead
    /// (the Reporting stream falls back from `per_page` 500 to 100).
    #[error("KnowBe4 sent a response larger than {limit} bytes")]
    TooLarge {
        /// The cap the body went over, in bytes.
        limit: usize,
    },
}

impl ApiError {
    /// Whether retrying the same request later in this run may succeed.
    ///
    /// Never for a deterministic answer: a complete body that does not parse
    /// ([`Malformed`](ApiError::Malformed), e.g. a `200` that is not a list) or one over the
    /// size cap ([`TooLarge`](ApiError::TooLarge)) would come back the same, and each
    /// retry spends the account's shared quota. A body that broke off (the connection
    /// closed early, or the JSON ends mid-value) is a [`Transport`](ApiError::Transport)
    /// failure, and is retried.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited { .. }
                | ApiError::Transport(_)
                | ApiError::NotSent(_)
                | ApiError::Inconsistent(_)
                | ApiError::Status {
                    status: 408 | 500..=599
                }
        )
    }

    /// A short machine-readable kind for health events and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotKnowBe4 => "not_knowbe4",
            ApiError::QuotaExhausted => "quota_exhausted",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Status { .. } => "http_status",
            ApiError::Transport(_) | ApiError::NotSent(_) => "transport",
            ApiError::Malformed(_) => "malformed",
            ApiError::Inconsistent(_) => "inconsistent",
            ApiError::TooLarge { .. } => "too_large",
        }
    }

    /// The HTTP status, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Unauthorized(s) => Some(*s),
            ApiError::NotKnowBe4 => Some(404),
            ApiError::QuotaExhausted | ApiError::RateLimited { .. } => Some(429),
            ApiError::Status { status } => Some(*status),
            _ => None,
        }
    }

    /// As the collector's error (a generic third-party failure, or a config error).
    pub fn into_error(self) -> Error {
        match self {
            ApiError::Unauthorized(status) => Error::ThirdPartyConfig {
                system: "KnowBe4",
                message: format!(
                    "KnowBe4 refused the API key (HTTP {status}); check the key, the region and the subscription (Platinum or Diamond)"
                ),
                status: Some(status),
            },
            ApiError::NotKnowBe4 => Error::ThirdPartyConfig {
                system: "KnowBe4",
                message: "the base URL does not answer as the KnowBe4 User Event API (HTTP 404); check baseURL or region".into(),
                status: Some(404),
            },
            other => Error::KnowBe4 {
                status: other.status(),
                message: other.to_string(),
                source: None,
            },
        }
    }
}

#[derive(Deserialize)]
struct EventsBody {
    data: Vec<Box<RawValue>>,
    meta: Option<Meta>,
}

/// Kaminari's pagination block. Every member is optional: which ones KnowBe4 sends, and
/// what `count` counts, is not publicly confirmed (see `checkpoint`'s design doc).
#[derive(Deserialize)]
struct Meta {
    count: Option<u64>,
    limit_value: Option<u64>,
    total_pages: Option<u64>,
    current_page: Option<u64>,
    is_out_of_range: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    next_page: Option<serde_json::Value>,
    is_last_page: Option<bool>,
}

/// Tells a present `null` (`Some(Null)`) from an absent member (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Request spacing for `base`: [`REQUEST_SPACING`], except that a loopback base URL (the
/// simulator) may set `KNOWBE4_SIM_REQUEST_SPACING_MS` so benchmarks can measure CPU and
/// memory without waiting on the real API's rate. It never applies to a KnowBe4 host.
pub fn spacing_for(base: &str) -> Duration {
    let loopback = reqwest::Url::parse(base)
        .is_ok_and(|u| matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")));
    let custom = std::env::var("KNOWBE4_SIM_REQUEST_SPACING_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0);
    match custom {
        Some(ms) if loopback => Duration::from_millis(ms),
        _ => REQUEST_SPACING,
    }
}

/// The rate limiter of one KnowBe4 account (API host + key), shared by every source
/// of this process that uses it.
fn limiter_for(base: &str, account: &str) -> Arc<DefaultDirectRateLimiter> {
    static LIMITERS: OnceLock<Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>> =
        OnceLock::new();
    let quota = Quota::with_period(spacing_for(base))
        .expect("non-zero period")
        .allow_burst(NonZeroU32::MIN);
    LIMITERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(account.to_string())
        .or_insert_with(|| Arc::new(RateLimiter::direct(quota)))
        .clone()
}

/// A client for one source's KnowBe4 account.
#[derive(Clone)]
pub struct KnowBe4Client {
    /// Shared HTTP client (connection pool built once per process).
    http: reqwest::Client,
    /// The API base URL, e.g. `https://api.events.knowbe4.com`.
    base: String,
    /// The User Event API key.
    key: SecretString,
    /// The account (API host + key) the limits belong to: [`crate::domain::account::account_id`].
    account: String,
    /// Paces requests to the account's rate limit.
    limiter: Arc<DefaultDirectRateLimiter>,
    /// Sent as `x-run-id` so a request log can tell runs apart.
    run_id: String,
    /// Timeout of one request, headers and body.
    timeout: Duration,
}

impl std::fmt::Debug for KnowBe4Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowBe4Client")
            .field("base", &self.base)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl KnowBe4Client {
    /// A client for `base` with `key`; requests carry `run_id`.
    pub fn new(
        http: reqwest::Client,
        base: &str,
        key: SecretString,
        run_id: &str,
        timeout: Duration,
    ) -> Self {
        let base = base.trim_end_matches('/').to_string();
        let account = crate::domain::account::account_id(&base, &key);
        KnowBe4Client {
            limiter: limiter_for(&base, &account),
            account,
            http,
            base,
            key,
            run_id: run_id.to_string(),
            timeout,
        }
    }

    /// Replaces the key (after a forced re-read of the secret).
    pub fn set_key(&mut self, key: SecretString) {
        self.account = crate::domain::account::account_id(&self.base, &key);
        self.limiter = limiter_for(&self.base, &self.account);
        self.key = key;
    }

    /// The account id the limits (ledger, send slot, pacing) are kept under.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// Waits until the rate limiter allows one more request.
    pub async fn pace(&self) {
        self.limiter.until_ready().await;
    }

    /// `GET /events?page=N&per_page=100`, newest first. The caller has already reserved
    /// the request in the quota ledger and waited for [`pace`](Self::pace).
    pub async fn events_page(&self, page: u32) -> Result<Page, ApiError> {
        let url = format!("{}/events", self.base);
        let response = self
            .http
            .get(&url)
            .query(&[
                ("page", page.to_string()),
                ("per_page", PER_PAGE.to_string()),
                ("order_by", "occurred_date".into()),
                ("order_direction", "desc".into()),
            ])
            .bearer_auth(self.key.expose_secret())
            .header("accept", "application/json")
            .header("x-run-id", &self.run_id)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    // reqwest reports DNS and refused/unreachable connections as connect
                    // errors: nothing reached KnowBe4.
                    not_sent(e)
                } else {
                    transport(e)
                }
            })?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let body = read_capped(response, MAX_BODY_BYTES).await?;
        match status {
            200 => parse_page(&body, page),
            // No evidence that KnowBe4 answers 204 (it came from a template in one client):
            // an empty body is not a page.
            204 => Err(ApiError::Malformed("HTTP 204 with no body".into())),
            401 | 403 => Err(ApiError::Unauthorized(status)),
            404 => Err(ApiError::NotKnowBe4),
            429 if String::from_utf8_lossy(&body).contains("Limit Exceeded") => {
                Err(ApiError::QuotaExhausted)
            }
            429 => Err(ApiError::RateLimited { retry_after }),
            _ => Err(ApiError::Status { status }),
        }
    }
}

fn not_sent(err: reqwest::Error) -> ApiError {
    match transport(err) {
        ApiError::Transport(detail) => ApiError::NotSent(detail),
        other => other,
    }
}

fn transport(err: reqwest::Error) -> ApiError {
    // reqwest's Display names the URL; ours has no secret in it, but keep messages
    // uniform and short.
    let err = err.without_url();
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else if err.is_body() || err.is_decode() {
        "the response body broke off"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        ApiError::Transport(kind.to_string())
    } else {
        ApiError::Transport(format!("{kind} ({detail})"))
    }
}

/// Reads the body, refusing one larger than `limit` bytes with [`ApiError::TooLarge`]:
/// at once when `Content-Length` says so, else as soon as the bytes read pass it. A body
/// that breaks off is [`ApiError::Transport`].
pub(crate) async fn read_capped(
    response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` as a duration: delay-seconds, or an HTTP-date (time from now, zero when
/// past). Not capped here: the caller decides what to do with a long one.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, time::OffsetDateTime::now_utc())
}

/// Parses a `Retry-After` value at `now`: seconds, or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_retry_after(value: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let value = value
        .strip_suffix("GMT")
        .map_or_else(|| value.to_string(), |v| format!("{v}+0000"));
    let at =
        time::OffsetDateTime::parse(&value, &time::format_description::well_known::Rfc2822).ok()?;
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

/// The error for a complete `200` body that did not parse as JSON: one that ends in the
/// middle of a value broke off on the way (a proxy or a connection closed early, without
/// a length to tell), which asking again can mend; any other is malformed.
pub(crate) fn unparsable(body: &[u8], error: &serde_json::Error) -> ApiError {
    if error.is_eof() && !body.iter().all(u8::is_ascii_whitespace) {
        return ApiError::Transport(format!(
            "the response body broke off (the JSON ends after {} bytes)",
            body.len()
        ));
    }
    let head: String = String::from_utf8_lossy(&body[..body.len().min(40)])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    ApiError::Malformed(format!("{error} (body starts {head:?})"))
}

/// Parses the `GET /events` body of page `page_no` into a page; a deviation is
/// `Malformed` (not retried), a page at odds with the list it belongs to `Inconsistent`
/// (a live list can answer so once: retried), a body that ends mid-JSON `Transport`.
///
/// Nothing here assumes a page size or what `meta.count` counts: whether more pages
/// follow is read from `next_page`, `is_last_page` and `total_pages` / `current_page`,
/// whichever are present, and the page is malformed only when they contradict each
/// other or the events on the page under every reading (a page with more events than
/// `limit_value`; fewer than `limit_value`, or none, while more pages follow; a
/// `current_page` that is not the page asked for).
///
/// An event whose `occurred_date` is missing or out of range does not fail the page: it
/// takes the time of its nearest dated neighbour on the page (so the walk keeps its
/// place) and its id is listed in [`Page::undated`]; it is forwarded as sent.
pub fn parse_page(body: &[u8], page_no: u32) -> Result<Page, ApiError> {
    let parsed: EventsBody = serde_json::from_slice(body).map_err(|e| unparsable(body, &e))?;
    let meta = parsed
        .meta
        .ok_or_else(|| ApiError::Malformed("the response has no `meta`".into()))?;
    let malformed = |what: String| Err(ApiError::Malformed(format!("page {page_no}: {what}")));
    let inconsistent =
        |what: String| Err(ApiError::Inconsistent(format!("page {page_no}: {what}")));
    if let Some(current) = meta.current_page
        && current != u64::from(page_no)
    {
        return malformed(format!("`current_page` is {current}"));
    }
    let limit = match meta.limit_value {
        Some(0) => return malformed("`limit_value` is 0".into()),
        Some(limit) => Some(u32::try_from(limit).unwrap_or(u32::MAX)),
        None => None,
    };
    if let Some(limit) = limit
        && parsed.data.len() > limit as usize
    {
        return malformed(format!(
            "{} events, more than `limit_value` {limit}",
            parsed.data.len()
        ));
    }
    let mut events = Vec::with_capacity(parsed.data.len());
    let mut undated = Vec::new();
    for raw in parsed.data {
        match RawEvent::parse(raw) {
            Ok(event) => events.push(Some(event)),
            Err((crate::domain::event::EventParseError::BadOccurredDate { id }, raw)) => {
                undated.push((events.len(), id, raw));
                events.push(None);
            }
            Err((err, _)) => return malformed(err.to_string()),
        }
    }
    let events = impute_dates(events, &undated);
    if let Some(event) = events.iter().find(|e| e.id.len() > MAX_ID_BYTES) {
        return malformed(format!(
            "an event id is {} bytes long (at most {MAX_ID_BYTES})",
            event.id.len()
        ));
    }
    let more = more_pages(&meta, page_no)
        .map_err(|what| ApiError::Malformed(format!("page {page_no}: {what}")))?;
    if more == Some(true) {
        if events.is_empty() {
            return inconsistent("no events, but the response says more pages follow".into());
        }
        if let Some(limit) = limit
            && events.len() < limit as usize
        {
            return inconsistent(format!(
                "{} events, fewer than `limit_value` {limit}, but the response says more pages follow",
                events.len()
            ));
        }
    }
    if let (true, Some(count), Some(limit)) = (events.is_empty(), meta.count, limit)
        && meta.is_out_of_range != Some(true)
        && count > u64::from(page_no.saturating_sub(1)) * u64::from(limit)
    {
        // Per page it would be 0; per list, this page would hold events.
        return inconsistent(format!("no events, but `count` is {count}"));
    }
    Ok(Page {
        events,
        count: meta.count,
        limit,
        total_pages: meta.total_pages,
        more,
        undated: undated.into_iter().map(|(_, id, _)| id).collect(),
    })
}

/// Whether more pages follow page `page_no`, from whichever of `next_page`,
/// `is_last_page` and `total_pages` the response has; `None` when none says. Fields that
/// disagree are an error.
fn more_pages(meta: &Meta, page_no: u32) -> Result<Option<bool>, String> {
    let out_of_range = meta.is_out_of_range == Some(true);
    let mut claims: Vec<(&str, bool)> = Vec::new();
    if let Some(next) = &meta.next_page {
        claims.push(("next_page", !next.is_null()));
    }
    // Past the end Kaminari says `is_last_page: false` and `is_out_of_range: true`.
    match meta.is_last_page {
        Some(last) if !out_of_range || last => claims.push(("is_last_page", !last)),
        _ => {}
    }
    if let Some(total) = meta.total_pages {
        claims.push(("total_pages", u64::from(page_no) < total));
    }
    match claims.split_first() {
        None => Ok(None),
        Some(((_, first), rest)) => match rest.iter().find(|(_, more)| more != first) {
            None => Ok(Some(*first)),
            Some((name, _)) => Err(format!(
                "`{}` and `{name}` disagree on whether more pages follow",
                claims[0].0
            )),
        },
    }
}

/// Gives each undated event the time of its nearest dated neighbour (the one before it,
/// else the one after), keeping the page's order; a page with no dated event at all gets
/// [`UNDATED`], which the walker replaces with its position.
fn impute_dates(
    events: Vec<Option<RawEvent>>,
    undated: &[(usize, String, Box<RawValue>)],
) -> Vec<RawEvent> {
    if undated.is_empty() {
        return events.into_iter().flatten().collect();
    }
    let times: Vec<Option<crate::domain::event::EventTime>> = events
        .iter()
        .map(|e| e.as_ref().map(|e| e.occurred))
        .collect();
    let mut raws: HashMap<usize, (String, Box<RawValue>)> = undated
        .iter()
        .map(|(i, id, raw)| (*i, (id.clone(), raw.clone())))
        .collect();
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| match event {
            Some(event) => event,
            None => {
                let (id, json) = raws.remove(&i).expect("every undated slot is listed");
                let occurred = times[..i]
                    .iter()
                    .rev()
                    .flatten()
                    .chain(times[i..].iter().flatten())
                    .next()
                    .copied()
                    .unwrap_or(crate::domain::checkpoint::UNDATED);
                RawEvent { id, occurred, json }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_page_and_flags_the_last_one() {
        let body = br#"{"data":[{"id":"a","occurred_date":"2024-01-02T03:04:05.678Z","extra":1}],
            "meta":{"count":1,"next_page":null,"is_last_page":true}}"#;
        let page = parse_page(body, 1).unwrap();
        assert_eq!(page.events.len(), 1);
        assert!(page.is_last(50));
        assert_eq!(page.more, Some(false));
        assert_eq!(page.count, Some(1));
        assert!(page.events[0].as_json().contains("\"extra\":1"));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b"<html>Service Unavailable</html>"[..],
            br#"{"data":{"id":"a"},"meta":{}}"#,
            br#"{"data":[]}"#,
            br#"{"data":[{"occurred_date":"2024-01-02T03:04:05Z"}],"meta":{}}"#,
            b"",
            b"  ",
        ] {
            let error = parse_page(body, 1).unwrap_err();
            assert!(matches!(error, ApiError::Malformed(_)), "{body:?}");
            assert!(!error.retriable(), "a complete answer is not asked again");
        }
    }

    #[test]
    fn a_body_that_breaks_off_mid_json_is_a_transport_failure_and_retried() {
        for body in [
            &br#"{"data":[{"id":"a","occurred_date":"2024-01-0"#[..],
            br#"{"data":["#,
            b"{",
        ] {
            let error = parse_page(body, 1).unwrap_err();
            assert!(matches!(error, ApiError::Transport(_)), "{body:?}: {error}");
            assert!(error.retriable());
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date_and_never_capped() {
        let now = time::macros::datetime!(1994-11-06 08:49:00 UTC);
        assert_eq!(
            parse_retry_after("3600", now),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_retry_after(" 86400 ", now),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(37))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:48:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn the_spacing_override_never_applies_to_knowbe4() {
        // SAFETY: this test is the only one reading or writing this variable.
        unsafe { std::env::set_var("KNOWBE4_SIM_REQUEST_SPACING_MS", "1") };
        assert_eq!(
            spacing_for("https://api.events.knowbe4.com"),
            REQUEST_SPACING
        );
        assert_eq!(
            spacing_for("http://127.0.0.1:8787"),
            Duration::from_millis(1)
        );
        unsafe { std::env::remove_var("KNOWBE4_SIM_REQUEST_SPACING_MS") };
    }

    fn events(n: usize) -> String {
        let event = r#"{"id":"a","occurred_date":"2024-01-02T03:04:05Z"}"#;
        vec![event; n].join(",")
    }

    #[test]
    fn a_short_page_that_claims_more_is_refused_not_taken_as_the_end() {
        let empty_middle =
            br#"{"data":[],"meta":{"count":500,"next_page":3,"is_last_page":false}}"#;
        assert!(matches!(
            parse_page(empty_middle, 2),
            Err(ApiError::Inconsistent(_))
        ));
        assert!(
            parse_page(empty_middle, 2).unwrap_err().retriable(),
            "asked again"
        );
        let counted = br#"{"data":[],"meta":{"count":500,"limit_value":50}}"#;
        assert!(matches!(
            parse_page(counted, 2),
            Err(ApiError::Inconsistent(_))
        ));
        let short = format!(
            r#"{{"data":[{}],"meta":{{"limit_value":50,"next_page":3}}}}"#,
            events(49)
        );
        assert!(matches!(
            parse_page(short.as_bytes(), 2),
            Err(ApiError::Inconsistent(_))
        ));
        let end = br#"{"data":[],"meta":{"count":100,"next_page":null}}"#;
        assert!(parse_page(end, 2).unwrap().is_last(100));
        let beyond = br#"{"data":[],"meta":{"count":100,"next_page":null,"is_last_page":false,"is_out_of_range":true}}"#;
        assert!(parse_page(beyond, 9).unwrap().is_last(100));
    }

    #[test]
    fn the_page_size_comes_from_the_response_not_the_request() {
        // Asked for 100, served 50 with more to follow: a full page, not a malformed one.
        let capped = format!(
            r#"{{"data":[{}],"meta":{{"count":50,"limit_value":50,"total_pages":69,"current_page":1,"next_page":2,"is_last_page":false}}}}"#,
            events(50)
        );
        let page = parse_page(capped.as_bytes(), 1).unwrap();
        assert_eq!(page.limit, Some(50));
        assert_eq!(page.more, Some(true));
        // More events than `limit_value` is malformed under every reading.
        let over = format!(
            r#"{{"data":[{}],"meta":{{"limit_value":50,"next_page":null}}}}"#,
            events(51)
        );
        assert!(matches!(
            parse_page(over.as_bytes(), 1),
            Err(ApiError::Malformed(_))
        ));
        // A partly filled last page whose `count` counts the page ends the list.
        let last = format!(
            r#"{{"data":[{}],"meta":{{"count":7,"limit_value":50,"total_pages":5,"current_page":5,"next_page":null,"is_last_page":true}}}}"#,
            events(7)
        );
        assert_eq!(parse_page(last.as_bytes(), 5).unwrap().more, Some(false));
        // Without any "more" field, the walker decides from the page's fullness.
        let bare = format!(r#"{{"data":[{}],"meta":{{}}}}"#, events(50));
        let page = parse_page(bare.as_bytes(), 1).unwrap();
        assert_eq!(page.more, None);
        assert!(!page.is_last(50));
        assert!(page.is_last(100));
    }

    #[test]
    fn fields_that_disagree_are_malformed() {
        for meta in [
            r#"{"next_page":2,"is_last_page":true}"#,
            r#"{"next_page":null,"total_pages":3}"#,
            r#"{"current_page":2}"#,
            r#"{"limit_value":0}"#,
        ] {
            let body = format!(r#"{{"data":[{}],"meta":{meta}}}"#, events(1));
            assert!(
                matches!(parse_page(body.as_bytes(), 1), Err(ApiError::Malformed(_))),
                "{meta}"
            );
        }
    }

    #[test]
    fn undated_events_are_kept_in_place_and_long_ids_refused() {
        let body = br#"{"data":[
            {"id":"a","occurred_date":"2024-01-02T03:04:05Z"},
            {"id":"b"},
            {"id":"c","occurred_date":"99999-01-01T00:00:00Z"},
            {"id":"d","occurred_date":"2024-01-01T00:00:00Z"}],"meta":{"next_page":null}}"#;
        let page = parse_page(body, 1).unwrap();
        assert_eq!(page.undated, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(page.events[1].occurred, page.events[0].occurred);
        assert_eq!(page.events[1].as_json(), r#"{"id":"b"}"#);
        let alone = br#"{"data":[{"id":"b","occurred_date":null}],"meta":{}}"#;
        assert_eq!(
            parse_page(alone, 1).unwrap().events[0].occurred,
            crate::domain::checkpoint::UNDATED
        );
        let long = format!(
            r#"{{"data":[{{"id":"{}","occurred_date":"2024-01-02T03:04:05Z"}}],"meta":{{}}}}"#,
            "x".repeat(129)
        );
        assert!(matches!(
            parse_page(long.as_bytes(), 1),
            Err(ApiError::Malformed(_))
        ));
    }

    #[test]
    fn error_classes() {
        assert!(ApiError::Status { status: 503 }.retriable());
        assert!(!ApiError::Status { status: 404 }.retriable());
        assert!(!ApiError::Unauthorized(401).retriable());
        assert!(!ApiError::QuotaExhausted.retriable());
        assert!(!ApiError::Malformed("x".into()).retriable());
        assert!(!ApiError::TooLarge { limit: 1 }.retriable());
        assert!(ApiError::Transport("x".into()).retriable());
        assert!(
            ApiError::RateLimited {
                retry_after: Some(Duration::from_secs(3600))
            }
            .retriable()
        );
        assert_eq!(
            ApiError::Unauthorized(401).into_error().health_kind(),
            crate::HealthKind::ThirdPartyConfigError
        );
        assert_eq!(
            ApiError::Transport("x".into()).into_error().health_kind(),
            crate::HealthKind::ThirdPartyGenericError
        );
    }
}
