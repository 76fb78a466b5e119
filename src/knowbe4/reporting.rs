//! The KnowBe4 Reporting API client: phishing security tests and their recipients.
//!
//! What the public record says (`shared/reference/knowbe4-api.md`, Reporting API):
//! bodies are bare JSON arrays, paged with `page` (1-based) and `per_page` (500 accepted);
//! **an empty array ends a list**; `&` is escaped as `\u0026`; a bad token has been seen
//! to answer `200` with `{"message": "Invalid Token"}`. Limits are the account's: 4
//! requests per second, 50 per minute, 1,000 (+ seats) per day; over them, `429`.
//!
//! What it does not say, so the client assumes none of it: whether a server honours
//! `per_page` 500 on every tenant, whether it honours `page` at all, whether the order is
//! stable between requests, what a `429`'s body says, whether `Retry-After` is sent. So
//! the page size is the caller's choice ([`REPORTING_PER_PAGE`], falling back to
//! [`REPORTING_FALLBACK_PER_PAGE`] when a page is [too large](ApiError::TooLarge)), and
//! every `429` is [`ApiError::RateLimited`] with the full `Retry-After`: the "daily
//! limit" wording is documented for the User Event API only, never inferred here.
//!
//! Like the User Event client: one concrete client with an injected base URL, every
//! request first waits for the account's limiter, and answers are classified into what
//! the caller must do ([`ApiError`]). Items are kept as the exact text KnowBe4 sent, so
//! forwarding them keeps every escape and unknown field.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use serde_json::value::RawValue;

use super::events::{ApiError, read_capped, retry_after, unparsable};

/// Items asked for per page: the most the API is recorded to accept.
pub const REPORTING_PER_PAGE: u32 = 500;
/// Items asked for per page after a page of [`REPORTING_PER_PAGE`] was
/// [too large](ApiError::TooLarge): the API's documented default.
pub const REPORTING_FALLBACK_PER_PAGE: u32 = 100;
/// Largest Reporting API body read, in bytes (the User Event client keeps 2 MiB).
///
/// Why 8 MiB: a real security test is ~1.5 KB and a recipient ~1 KB, but both carry
/// free text (names, templates) and fields the docs lack, and 2 MiB at 500 per page left
/// only ~4 KB per record: a tenant over that could never be read. 8 MiB takes ~16 KB per
/// record at 500 per page and ~80 KB at the fallback of 100, while bounding what a broken
/// server can make the process hold: a page is held twice at most (the body, then its
/// items), ~16 MiB, well inside a 128–256 MB Lambda. A page over it is
/// [`ApiError::TooLarge`], which the caller meets by asking
/// [`REPORTING_FALLBACK_PER_PAGE`].
pub const REPORTING_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
// What the cap is for, checked at compile time: above the User Event client's, records of
// 16 KB at 500 a page and of 80 KB at the fallback's 100 fit.
const _: () = {
    assert!(REPORTING_MAX_BODY_BYTES >= 4 * super::events::MAX_BODY_BYTES);
    assert!(REPORTING_FALLBACK_PER_PAGE < REPORTING_PER_PAGE);
    assert!(REPORTING_PER_PAGE as usize * 16_000 < REPORTING_MAX_BODY_BYTES);
    assert!(REPORTING_FALLBACK_PER_PAGE as usize * 80_000 < REPORTING_MAX_BODY_BYTES);
};
/// Spacing between two requests to one account's Reporting API: 60 s / 50 requests =
/// 1.2 s keeps any minute at 50 or fewer, and any second far below 4; 50 ms more absorbs
/// scheduling jitter. One spacing satisfies both documented limits, whichever window
/// KnowBe4 counts in.
pub const REPORTING_SPACING: Duration = Duration::from_millis(1250);

/// A stable, non-reversible id for the Reporting API account behind (`base`, `token`):
/// like [`crate::domain::account::account_id`], under another domain tag, so the
/// Reporting API's ledger and send slot never share the User Event API's, even for one
/// host and one secret (the simulator's case).
pub fn reporting_account_id(base: &str, token: &SecretString) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"knowbe4-source reporting account v1\0");
    hasher.update(base.trim_end_matches('/').to_ascii_lowercase().as_bytes());
    hasher.update([0]);
    hasher.update(token.expose_secret().trim().as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// Request spacing for `base`: [`REPORTING_SPACING`], or on loopback (the simulator)
/// `KNOWBE4_SIM_REPORTING_SPACING_MS` when set, so tests need not wait on the real rate.
pub fn reporting_spacing_for(base: &str) -> Duration {
    let loopback = reqwest::Url::parse(base)
        .is_ok_and(|u| matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")));
    let custom = std::env::var("KNOWBE4_SIM_REPORTING_SPACING_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0);
    match custom {
        Some(ms) if loopback => Duration::from_millis(ms),
        _ => REPORTING_SPACING,
    }
}

/// The in-process limiter of one Reporting API account.
fn limiter_for(base: &str, account: &str) -> Arc<DefaultDirectRateLimiter> {
    static LIMITERS: OnceLock<Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>> =
        OnceLock::new();
    let quota = Quota::with_period(reporting_spacing_for(base))
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

/// One page of a Reporting API list: each item's exact text. Empty: the list ended.
#[derive(Debug, Default)]
pub struct ReportingPage {
    /// The objects on the page, as sent.
    pub items: Vec<Box<RawValue>>,
}

impl ReportingPage {
    /// Whether this page ends the list (the API's end is an empty page).
    pub fn ends_list(&self) -> bool {
        self.items.is_empty()
    }
}

/// A client for one source's Reporting API account.
#[derive(Clone)]
pub struct ReportingClient {
    /// Shared HTTP client (no redirects, no `Referer`).
    http: reqwest::Client,
    /// The Reporting API base URL, e.g. `https://eu.api.knowbe4.com`.
    base: String,
    /// The Reporting API token.
    token: SecretString,
    /// The account the limits belong to: [`reporting_account_id`].
    account: String,
    /// Paces this process's requests to the account.
    limiter: Arc<DefaultDirectRateLimiter>,
    /// Sent as `x-run-id` so a request log can tell runs apart.
    run_id: String,
    /// Timeout of one request, headers and body.
    timeout: Duration,
}

impl std::fmt::Debug for ReportingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportingClient")
            .field("base", &self.base)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl ReportingClient {
    /// A client for `base` with `token`; requests carry `run_id`.
    pub fn new(
        http: reqwest::Client,
        base: &str,
        token: SecretString,
        run_id: &str,
        timeout: Duration,
    ) -> Self {
        let base = base.trim_end_matches('/').to_string();
        let account = reporting_account_id(&base, &token);
        ReportingClient {
            limiter: limiter_for(&base, &account),
            account,
            http,
            base,
            token,
            run_id: run_id.to_string(),
            timeout,
        }
    }

    /// The account id the limits (ledger, send slot, pacing) are kept under.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The spacing the account's send slot keeps between two requests.
    pub fn spacing(&self) -> Duration {
        reporting_spacing_for(&self.base)
    }

    /// Waits until this process's limiter allows one more request.
    pub async fn pace(&self) {
        self.limiter.until_ready().await;
    }

    /// `GET /v1/phishing/security_tests?page=N&per_page=M`. The caller has reserved
    /// the request in the account's ledger and waited for [`pace`](Self::pace); it asks
    /// [`REPORTING_PER_PAGE`], and [`REPORTING_FALLBACK_PER_PAGE`] after
    /// [`ApiError::TooLarge`]. The server may serve fewer per page than asked.
    pub async fn security_tests_page(
        &self,
        page: u32,
        per_page: u32,
    ) -> Result<ReportingPage, ApiError> {
        self.list("/v1/phishing/security_tests".to_string(), page, per_page)
            .await
    }

    /// `GET /v1/phishing/security_tests/{pst_id}/recipients?page=N&per_page=M`: as
    /// [`security_tests_page`](Self::security_tests_page).
    pub async fn recipients_page(
        &self,
        pst_id: u64,
        page: u32,
        per_page: u32,
    ) -> Result<ReportingPage, ApiError> {
        self.list(
            format!("/v1/phishing/security_tests/{pst_id}/recipients"),
            page,
            per_page,
        )
        .await
    }

    async fn list(
        &self,
        path: String,
        page: u32,
        per_page: u32,
    ) -> Result<ReportingPage, ApiError> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .query(&[
                ("page", page.to_string()),
                ("per_page", per_page.to_string()),
            ])
            .bearer_auth(self.token.expose_secret())
            .header("accept", "application/json")
            .header("x-run-id", &self.run_id)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| {
                let connect = e.is_connect();
                let detail = e.without_url().to_string();
                if connect {
                    ApiError::NotSent(format!("connection failed ({detail})"))
                } else {
                    ApiError::Transport(detail)
                }
            })?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        if status == 429 {
            // The body says nothing the client acts on: don't read a large one.
            return classify(status, b"", retry_after);
        }
        let body = read_capped(response, REPORTING_MAX_BODY_BYTES).await?;
        classify(status, &body, retry_after)
    }
}

/// What an answer means: a page, or what the caller must do. Every `429` is
/// [`ApiError::RateLimited`] with `retry_after` as sent, whatever its body says: only the
/// User Event API is documented to say "Limit Exceeded" for its daily limit, so no
/// wording is read as the daily limit here (the account's ledger keeps that count).
pub fn classify(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<ReportingPage, ApiError> {
    match status {
        200 => parse_list(body),
        401 | 403 => Err(ApiError::Unauthorized(status)),
        404 => Err(ApiError::NotKnowBe4),
        429 => Err(ApiError::RateLimited { retry_after }),
        _ => Err(ApiError::Status { status }),
    }
}

/// A `200` body: a JSON array of objects is a page; `{"message": "Invalid Token"}` (seen
/// from KnowBe4 for a bad token) is a refused token; a body that ends mid-JSON broke off
/// ([`ApiError::Transport`], retriable); anything else is malformed (not retriable), never
/// data.
fn parse_list(body: &[u8]) -> Result<ReportingPage, ApiError> {
    let error = match serde_json::from_slice::<Vec<Box<RawValue>>>(body) {
        Ok(items) => {
            if let Some(bad) = items.iter().position(|i| !i.get().starts_with('{')) {
                return Err(ApiError::Malformed(format!(
                    "item {bad} of the list is not a JSON object"
                )));
            }
            return Ok(ReportingPage { items });
        }
        Err(error) => error,
    };
    if let err @ ApiError::Transport(_) = unparsable(body, &error) {
        return Err(err);
    }
    #[derive(serde::Deserialize)]
    struct Message {
        message: String,
    }
    match serde_json::from_slice::<Message>(body) {
        Ok(m) if m.message.to_ascii_lowercase().contains("token") => {
            // A 200 that refuses the token: no status to report, 401 is what it means.
            Err(ApiError::Unauthorized(401))
        }
        Ok(_) => Err(ApiError::Malformed(
            "a 200 whose body is a message, not a list".into(),
        )),
        Err(_) => Err(ApiError::Malformed(
            "a 200 whose body is not a JSON array".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_pages_and_an_empty_one_ends_the_list() {
        let page = classify(
            200,
            br#"[{"pst_id":1,"name":"Q\u0026A"},{"pst_id":2}]"#,
            None,
        )
        .unwrap();
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.items[0].get(), r#"{"pst_id":1,"name":"Q\u0026A"}"#);
        assert!(!page.ends_list());
        assert!(classify(200, b"[]", None).unwrap().ends_list());
    }

    #[test]
    fn a_200_that_is_not_an_array_is_an_error_not_data() {
        assert!(matches!(
            classify(200, br#"{"message": "Invalid Token"}"#, None),
            Err(ApiError::Unauthorized(401))
        ));
        for body in [
            &br#"{"message": "Something else"}"#[..],
            b"{\"data\": []}",
            b"",
            b"<html>",
            b"[1, 2]",
            b"null",
            b"[{\"a\":1}] trailing",
            b"[{\"name\":\"\xff\"}]",
        ] {
            let error = classify(200, body, None).unwrap_err();
            assert!(
                matches!(error, ApiError::Malformed(_)),
                "{}: {error}",
                String::from_utf8_lossy(body)
            );
            assert!(!error.retriable(), "a complete answer is never asked again");
        }
        // The bad token's answer is not retried either.
        assert!(
            !classify(200, br#"{"message": "Invalid Token"}"#, None)
                .unwrap_err()
                .retriable()
        );
    }

    #[test]
    fn a_list_that_breaks_off_is_a_transport_failure_and_retried() {
        for body in [
            &br#"[{"pst_id":1,"name":"Q\u0026A"},{"pst_"#[..],
            b"[",
            b"[{\"name\":\"M\xc3",
        ] {
            let error = classify(200, body, None).unwrap_err();
            assert!(matches!(error, ApiError::Transport(_)), "{error}");
            assert!(error.retriable());
        }
    }

    #[test]
    fn every_429_is_rate_limited_with_the_full_retry_after_whatever_it_says() {
        for body in [
            &br#"{"message":"API Limit Exceeded"}"#[..],
            br#"{"message":"Rate limit exceeded"}"#,
            b"Too Many Requests",
            b"",
        ] {
            for retry_after in [
                None,
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(86_400)),
            ] {
                let error = classify(429, body, retry_after).unwrap_err();
                assert!(
                    matches!(error, ApiError::RateLimited { retry_after: r } if r == retry_after),
                    "{}: {error:?}",
                    String::from_utf8_lossy(body)
                );
                assert!(error.retriable());
            }
        }
    }

    #[test]
    fn limits_and_refusals_are_told_apart() {
        assert!(matches!(
            classify(429, b"Rate limit exceeded", Some(Duration::from_secs(2))),
            Err(ApiError::RateLimited {
                retry_after: Some(_)
            })
        ));
        assert!(matches!(
            classify(401, b"", None),
            Err(ApiError::Unauthorized(401))
        ));
        assert!(matches!(
            classify(503, b"", None),
            Err(ApiError::Status { status: 503 })
        ));
    }

    #[test]
    fn the_reporting_account_is_not_the_event_account_of_the_same_host_and_key() {
        let key = SecretString::from("same-secret");
        let base = "http://127.0.0.1:8787";
        assert_ne!(
            reporting_account_id(base, &key),
            crate::domain::account::account_id(base, &key)
        );
        assert_eq!(
            reporting_account_id("https://eu.api.knowbe4.com/", &key),
            reporting_account_id("https://EU.api.knowbe4.com", &key)
        );
    }

    #[test]
    fn the_spacing_keeps_any_minute_within_fifty_and_any_second_within_four() {
        let per_minute = 60_000 / REPORTING_SPACING.as_millis() + 1;
        assert!(per_minute <= 50, "{per_minute}");
        let per_second = 1_000 / REPORTING_SPACING.as_millis() + 1;
        assert!(per_second <= 4, "{per_second}");
    }
}
