//! Retry decisions for every HTTP destination, in one place.
//!
//! Follows vector's rules: retry `408`, `429` and `5xx` except `501` (a server that does
//! not implement `POST` will not learn it), plus transport failures (connect, timeout, a
//! connection dropped mid-request). Waits grow exponentially with *full jitter* (a random
//! wait between zero and the exponential bound) so that many collectors hitting the same
//! throttled endpoint do not retry in lock-step. A `Retry-After` in seconds is honoured,
//! capped. No wait may run past the caller's deadline: the last error is returned instead.

use std::time::Duration;

use tokio::time::Instant;

/// How long to wait between attempts and how long one attempt may take.
///
/// [`RetryPolicy::default`] is what production uses; tests shrink it so nothing sleeps long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Upper bound of the first wait; doubles with each further attempt (before jitter).
    pub base: Duration,
    /// Largest exponential bound, so a long outage is probed every few seconds, not hours.
    pub cap: Duration,
    /// Largest `Retry-After` honoured: a destination asking for minutes would otherwise
    /// hold the run until its deadline without a single further attempt.
    pub retry_after_cap: Duration,
    /// Longest a single request may take; shortened to what is left before the deadline.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(10),
            retry_after_cap: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The exponential bound for the wait after failed attempt number `attempt`
    /// (0 for the first failure): `min(cap, base * 2^attempt)`.
    pub fn bound(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before the next attempt: `Retry-After` (capped) when the destination sent
    /// one, otherwise a uniformly random duration in `[0, bound(attempt)]` (full jitter).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(self.retry_after_cap);
        }
        let bound = self.bound(attempt).as_millis() as u64;
        Duration::from_millis(rand::random_range(0..=bound))
    }

    /// The timeout for a request started at `now`: the per-request timeout, or what is
    /// left before `deadline` when that is shorter. `None` when the deadline has passed.
    pub fn request_timeout(&self, now: Instant, deadline: Instant) -> Option<Duration> {
        let left = deadline.saturating_duration_since(now);
        (!left.is_zero()).then(|| left.min(self.request_timeout))
    }
}

/// Whether an HTTP status means "try the same request again later".
///
/// `408` (request timeout), `429` (throttled) and every `5xx` except `501` (not
/// implemented, which will not change by waiting).
pub fn is_retriable(status: u16) -> bool {
    matches!(status, 408 | 429) || ((500..600).contains(&status) && status != 501)
}

/// Reads a `Retry-After` header given in seconds. The HTTP-date form is ignored (the
/// jittered backoff applies instead): destinations we talk to send seconds.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Whether waiting `delay` from `now` would still leave time for another attempt before
/// `deadline`. A wait that ends exactly at the deadline leaves none.
pub fn fits_before(now: Instant, delay: Duration, deadline: Instant) -> bool {
    now.checked_add(delay).is_some_and(|wake| wake < deadline)
}

/// Whether a transport-level failure (no HTTP status) is worth another attempt: connect
/// failures, timeouts, and requests that broke in flight (e.g. a pooled keep-alive
/// connection the server had just closed). Builder, redirect and decode errors are not.
pub fn is_retriable_transport(err: &reqwest::Error) -> bool {
    err.is_connect() || err.is_timeout() || err.is_request() || err.is_body()
}

/// Describes a transport failure without its URL (reqwest's `Display` includes the URL,
/// and destination URLs carry tokens): the kind of failure, and the I/O error kind found
/// in its source chain when there is one (`ConnectionRefused`, `TimedOut`, ...).
pub fn describe_transport(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "the request timed out"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_body() {
        "sending the request body failed"
    } else if err.is_request() {
        "the request failed"
    } else if err.is_decode() {
        "the response could not be read"
    } else {
        "the HTTP client failed"
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return format!("{kind} ({:?})", io.kind());
        }
        source = cause.source();
    }
    kind.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_throttling_timeouts_and_server_errors_but_not_501() {
        for status in [408, 429, 500, 502, 503, 504, 599] {
            assert!(is_retriable(status), "{status}");
        }
        for status in [200, 400, 401, 403, 404, 413, 501, 600] {
            assert!(!is_retriable(status), "{status}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.bound(0), Duration::from_millis(200));
        assert_eq!(policy.bound(1), Duration::from_millis(400));
        assert_eq!(policy.bound(5), Duration::from_millis(6400));
        assert_eq!(policy.bound(6), Duration::from_secs(10));
        assert_eq!(policy.bound(1000), Duration::from_secs(10));
        for attempt in 0..40 {
            assert!(policy.delay(attempt, None) <= policy.bound(attempt));
        }
        // Full jitter: over many draws, waits spread across the range instead of sitting at it.
        let draws: Vec<_> = (0..200).map(|_| policy.delay(6, None)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(5)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(5)));
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let policy = RetryPolicy::default();
        assert_eq!(
            policy.delay(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            policy.delay(0, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, " 7 ".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn never_waits_or_sends_past_the_deadline() {
        let policy = RetryPolicy::default();
        let now = Instant::now();
        let deadline = now + Duration::from_secs(5);
        assert!(fits_before(now, Duration::from_secs(4), deadline));
        assert!(!fits_before(now, Duration::from_secs(5), deadline));
        assert_eq!(
            policy.request_timeout(now, deadline),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            policy.request_timeout(now, now + Duration::from_secs(90)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(policy.request_timeout(deadline, deadline), None);
    }
}
