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
use sha2::{Digest, Sha256};

use crate::checkpoint::{PER_PAGE, Page};
use crate::error::Error;
use crate::event::RawEvent;

/// Spacing between requests to one account: 4 per second with a 20 ms margin per
/// request (80 ms per window) for scheduling and network jitter, so the server never
/// counts five in one second.
pub const REQUEST_SPACING: Duration = Duration::from_millis(270);
/// Largest response body accepted (a full page is ~100 KB; this bounds hostile ones).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

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
    /// The body is not the documented shape.
    #[error("KnowBe4 sent a malformed response: {0}")]
    Malformed(String),
}

impl ApiError {
    /// Whether retrying the same request later in this run may succeed.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited { .. }
                | ApiError::Transport(_)
                | ApiError::Malformed(_)
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
            ApiError::Transport(_) => "transport",
            ApiError::Malformed(_) => "malformed",
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

#[derive(Deserialize)]
struct Meta {
    count: Option<u64>,
    is_out_of_range: Option<bool>,
    next_page: Option<serde_json::Value>,
    is_last_page: Option<bool>,
}

/// Request spacing for `base`: [`REQUEST_SPACING`], except that a loopback base URL (the
/// simulator) may set `KNOWBE4_SIM_REQUEST_SPACING_MS` so benchmarks can measure CPU and
/// memory without waiting on the real API's rate. It never applies to a KnowBe4 host.
fn spacing_for(base: &str) -> Duration {
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
fn limiter_for(base: &str, key: &SecretString) -> Arc<DefaultDirectRateLimiter> {
    static LIMITERS: OnceLock<Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>> =
        OnceLock::new();
    let mut hasher = Sha256::new();
    hasher.update(base.as_bytes());
    hasher.update([0]);
    hasher.update(key.expose_secret().as_bytes());
    let account = hex::encode(hasher.finalize());
    let quota = Quota::with_period(spacing_for(base))
        .expect("non-zero period")
        .allow_burst(NonZeroU32::MIN);
    LIMITERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(account)
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
        KnowBe4Client {
            limiter: limiter_for(&base, &key),
            http,
            base,
            key,
            run_id: run_id.to_string(),
            timeout,
        }
    }

    /// Replaces the key (after a forced re-read of the secret).
    pub fn set_key(&mut self, key: SecretString) {
        self.limiter = limiter_for(&self.base, &key);
        self.key = key;
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
            .map_err(transport)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_capped(response).await?;
        match status {
            200 => parse_page(&body, page),
            204 => Ok(Page {
                events: Vec::new(),
                count: None,
                last: true,
            }),
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

async fn read_capped(response: reqwest::Response) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::Malformed(format!(
                "response body larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Parses the `GET /events` body of page `page_no` into a page; any deviation is
/// `Malformed`.
///
/// A page with fewer than `per_page` events ends the list, so a short page that also
/// claims more pages follow (`next_page`, `is_last_page: false`, or a `count` beyond it)
/// is refused: taking it as the end would skip every event after it.
pub fn parse_page(body: &[u8], page_no: u32) -> Result<Page, ApiError> {
    let parsed: EventsBody = serde_json::from_slice(body).map_err(|e| {
        let head: String = String::from_utf8_lossy(&body[..body.len().min(40)])
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        ApiError::Malformed(format!("{e} (body starts {head:?})"))
    })?;
    let meta = parsed
        .meta
        .ok_or_else(|| ApiError::Malformed("the response has no `meta`".into()))?;
    let mut events = Vec::with_capacity(parsed.data.len());
    for raw in parsed.data {
        events.push(RawEvent::from_raw(raw).map_err(|e| ApiError::Malformed(e.to_string()))?);
    }
    let full = events.len() >= PER_PAGE as usize;
    let next_page = meta.next_page.as_ref().is_some_and(|v| !v.is_null());
    // Past the end, Kaminari-style paging says `is_last_page: false` and
    // `is_out_of_range: true`; only `next_page` and `count` then speak of more pages.
    let out_of_range = meta.is_out_of_range == Some(true);
    let says_more = next_page || (meta.is_last_page == Some(false) && !out_of_range);
    let count_says_more = meta
        .count
        .map(|count| count > u64::from(page_no) * u64::from(PER_PAGE));
    if !full && (says_more || count_says_more == Some(true)) {
        return Err(ApiError::Malformed(format!(
            "page {page_no} holds {} events but the response says more pages follow",
            events.len()
        )));
    }
    Ok(Page {
        last: !full || (!says_more && count_says_more != Some(true)),
        events,
        count: meta.count,
    })
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
        assert!(page.last);
        assert_eq!(page.count, Some(1));
        assert!(page.events[0].as_json().contains("\"extra\":1"));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b"<html>Service Unavailable</html>"[..],
            br#"{"data":{"id":"a"},"meta":{}}"#,
            br#"{"data":[]}"#,
            br#"{"data":[{"id":"a"}],"meta":{}}"#,
            br#"{"data":[{"id":"a","occurred_date":"2024-01-0"#,
            b"",
        ] {
            assert!(
                matches!(parse_page(body, 1), Err(ApiError::Malformed(_))),
                "{body:?}"
            );
        }
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

    #[test]
    fn a_short_page_that_claims_more_is_refused_not_taken_as_the_end() {
        let empty_middle =
            br#"{"data":[],"meta":{"count":500,"next_page":3,"is_last_page":false}}"#;
        assert!(matches!(
            parse_page(empty_middle, 2),
            Err(ApiError::Malformed(_))
        ));
        let counted = br#"{"data":[],"meta":{"count":500}}"#;
        assert!(matches!(
            parse_page(counted, 2),
            Err(ApiError::Malformed(_))
        ));
        let end = br#"{"data":[],"meta":{"count":100,"next_page":null}}"#;
        assert!(parse_page(end, 2).unwrap().last);
        let beyond = br#"{"data":[],"meta":{"count":100,"next_page":null,"is_last_page":false,"is_out_of_range":true}}"#;
        assert!(parse_page(beyond, 9).unwrap().last);
        let event = r#"{"id":"a","occurred_date":"2024-01-02T03:04:05Z"}"#;
        let full = format!(
            r#"{{"data":[{}],"meta":{{"count":250,"next_page":null}}}}"#,
            vec![event; 100].join(",")
        );
        assert!(
            !parse_page(full.as_bytes(), 2).unwrap().last,
            "count says a third page exists"
        );
    }

    #[test]
    fn error_classes() {
        assert!(ApiError::Status { status: 503 }.retriable());
        assert!(!ApiError::Status { status: 404 }.retriable());
        assert!(!ApiError::Unauthorized(401).retriable());
        assert!(!ApiError::QuotaExhausted.retriable());
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
