//! Destinations: where collected events go.
//!
//! Layout:
//! - this module: the configuration ([`DestinationConfig`], [`Format`]), the source
//!   metadata sent along ([`SourceMeta`]) and the [`Destination`] that sends a slice of
//!   events and reports what it did ([`SendReport`]);
//! - `http`: batching (at most [`MAX_BATCH_BYTES`] uncompressed per request), gzip,
//!   retries and batch splitting, shared by the HTTP formats;
//! - [`retry`]: which failures are retried and how long to wait;
//! - `sumo`, `splunk`, `ndjson`, `stdout`: each format's body and headers.
//!
//! Destination URLs and tokens are secrets (a Sumo URL carries its token): they are held
//! as [`SecretString`] or in private fields, never logged, never put in an error, and the
//! `Debug` of every type here redacts them.

mod http;
mod ndjson;
pub mod retry;
mod splunk;
pub mod stdout;
mod sumo;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

pub use retry::{RetryPolicy, is_retriable};
pub use splunk::{
    EVENT_PATH as SPLUNK_EVENT_PATH, HOST as SPLUNK_HOST, SOURCETYPE as SPLUNK_SOURCETYPE,
    SOURCETYPE_PHISHING_RECIPIENT, SOURCETYPE_PHISHING_TEST,
};
pub use sumo::SIEM_PARSER;
pub(crate) use sumo::fields_header;

use crate::domain::event::RawEvent;
use crate::error::Error;
use http::HttpDestination;

/// Largest request body before compression. Sumo Logic recommends 100 KB to 1 MB per
/// request; Splunk HEC accepts this size with its default limits. One event larger than
/// this is sent alone.
pub const MAX_BATCH_BYTES: usize = 1_000_000;

/// Most bytes of a destination's reply that are read. A reply is only inspected for an
/// error text (Splunk's `{"text": ...}`), which is short; reading more would let a
/// destination (or whoever answers in its name) fill the collector's memory.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The HTTP client for destinations, separate from the KnowBe4 one: it follows no
/// redirect (a `3xx` is a failed delivery, never a delivery somewhere else, and a Sumo URL
/// is itself a secret that a redirect would carry away in `Referer`), sends no `Referer`,
/// and does not decompress replies (a small gzip reply can expand to gigabytes).
pub fn http_client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .no_gzip()
        .connect_timeout(std::time::Duration::from_secs(10))
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .user_agent(concat!("knowbe4-source/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Destination {
            message: format!("building the destination HTTP client failed: {e}"),
            status: None,
        })
}

/// Whether `host` (as `Url::host_str` gives it) is this machine.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Metadata of the source, for headers and envelopes.
#[derive(Clone, Debug, Default)]
pub struct SourceMeta {
    /// The source's name: Sumo's `X-Sumo-Name` and Splunk's `source`, so events can be
    /// traced back to the source that collected them.
    pub name: String,
    /// Sumo's `X-Sumo-Category` (`_sourceCategory`), which users search and route on.
    pub category: Option<String>,
    /// The user's `fields`, stringified: Sumo's `X-Sumo-Fields`, Splunk's indexed `fields`.
    pub fields: BTreeMap<String, String>,
    /// Whether Sumo should forward the events to Cloud SIEM (adds `_siemForward=true`
    /// and the KnowBe4 parser to the fields).
    pub siem_forward: bool,
    /// Splunk's `sourcetype` for this batch; `None` is user events
    /// ([`SPLUNK_SOURCETYPE`]). Phishing records use [`splunk::SOURCETYPE_PHISHING_TEST`] and
    /// [`splunk::SOURCETYPE_PHISHING_RECIPIENT`].
    pub sourcetype: Option<&'static str>,
}

/// The kind of destination, which decides the body, the headers and the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A Sumo Logic HTTP Logs source: NDJSON with `X-Sumo-*` headers.
    Sumo,
    /// Splunk HTTP Event Collector: JSON envelopes with `Authorization: Splunk <token>`.
    SplunkHec,
    /// Any endpoint taking NDJSON over HTTP, with an optional bearer token.
    Ndjson,
    /// NDJSON lines on the process's standard output.
    Stdout,
}

impl Format {
    /// The name used in configuration (`sumo`, `splunk-hec`, `ndjson`, `stdout`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Sumo => "sumo",
            Format::SplunkHec => "splunk-hec",
            Format::Ndjson => "ndjson",
            Format::Stdout => "stdout",
        }
    }

    /// Whether this format posts to a URL.
    pub fn is_http(self) -> bool {
        !matches!(self, Format::Stdout)
    }

    /// A human name for messages.
    fn label(self) -> &'static str {
        match self {
            Format::Sumo => "Sumo Logic",
            Format::SplunkHec => "Splunk HEC",
            Format::Ndjson => "the NDJSON endpoint",
            Format::Stdout => "stdout",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        match text {
            "sumo" => Ok(Format::Sumo),
            "splunk-hec" => Ok(Format::SplunkHec),
            "ndjson" => Ok(Format::Ndjson),
            "stdout" => Ok(Format::Stdout),
            _ => Err(Error::config(
                "destination.format",
                "must be one of sumo, splunk-hec, ndjson, stdout",
            )),
        }
    }
}

/// Where and how to deliver events.
#[derive(Clone)]
pub struct DestinationConfig {
    /// The kind of destination.
    pub format: Format,
    /// The endpoint (required for HTTP formats). Secret: a Sumo URL contains its token.
    pub url: Option<SecretString>,
    /// Splunk's HEC token (required for Splunk), or a bearer token for NDJSON.
    pub token: Option<SecretString>,
}

impl fmt::Debug for DestinationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestinationConfig")
            .field("format", &self.format)
            .field("url", &self.url.as_ref().map(|_| "[redacted]"))
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl DestinationConfig {
    /// Checks the configuration without echoing the URL or token in any error: HTTP
    /// formats need an `http(s)://` URL, Splunk needs a token, and a token must be usable
    /// in an HTTP header.
    pub fn validate(&self) -> Result<(), Error> {
        self.parsed_url()?;
        self.authorization()?;
        Ok(())
    }

    /// Checks the transport rule on top of [`validate`](Self::validate): `https://`
    /// only, except plain `http://` to a loopback address when `allow_plain_http_loopback`
    /// (`KNOWBE4_ALLOW_CUSTOM_BASE_URL=1`, the switch for the simulator and tests). A token
    /// or a Sumo URL sent over plain http to another host could be read on the way.
    pub fn check_transport(&self, allow_plain_http_loopback: bool) -> Result<(), Error> {
        let Some(url) = self.parsed_url()? else {
            return Ok(());
        };
        match url.scheme() {
            "https" => Ok(()),
            _ if allow_plain_http_loopback && url.host_str().is_some_and(is_loopback_host) => {
                Ok(())
            }
            _ if allow_plain_http_loopback => Err(Error::config(
                "destination.url",
                "must use https (plain http is only allowed to a loopback address)",
            )),
            _ => Err(Error::config(
                "destination.url",
                format!(
                    "must use https (plain http to a loopback address needs {}=1)",
                    ALLOW_CUSTOM_BASE_URL_ENV
                ),
            )),
        }
    }

    /// The URL, parsed and checked (`None` for stdout).
    fn parsed_url(&self) -> Result<Option<reqwest::Url>, Error> {
        if !self.format.is_http() {
            return Ok(None);
        }
        let Some(url) = &self.url else {
            return Err(Error::config(
                "destination.url",
                format!("is required for the {} format", self.format),
            ));
        };
        let url = reqwest::Url::parse(url.expose_secret().trim())
            .map_err(|_| Error::config("destination.url", "is not a valid URL"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::config(
                "destination.url",
                "must be an http:// or https:// URL with a host",
            ));
        }
        Ok(Some(url))
    }

    /// The `Authorization` header value, marked sensitive (`None` when not used).
    fn authorization(&self) -> Result<Option<HeaderValue>, Error> {
        let token = self
            .token
            .as_ref()
            .map(|token| token.expose_secret().trim())
            .filter(|token| !token.is_empty());
        let scheme = match (self.format, token) {
            (Format::SplunkHec, None) => {
                return Err(Error::config(
                    "destination.token",
                    "is required for the splunk-hec format",
                ));
            }
            (Format::SplunkHec, Some(_)) => "Splunk",
            (Format::Ndjson, Some(_)) => "Bearer",
            // Sumo authenticates by URL; stdout has nothing to authenticate.
            _ => return Ok(None),
        };
        let Some(token) = token else {
            return Ok(None);
        };
        let mut value = HeaderValue::from_str(&format!("{scheme} {token}")).map_err(|_| {
            Error::config(
                "destination.token",
                "contains characters not allowed in an HTTP header",
            )
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

/// What one [`Destination::send`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Events the destination accepted (all of them when `send` returns `Ok`).
    pub events: usize,
    /// HTTP requests made, retries and refused batches included (0 for stdout).
    pub requests: usize,
    /// Uncompressed bytes of the accepted bodies (or written to stdout).
    pub bytes: usize,
    /// Requests repeated after a transient failure (splits of refused batches are not
    /// retries: they are new, smaller batches).
    pub retries: usize,
}

/// A configured destination, ready to send events.
pub struct Destination {
    /// The format, kept for `format()` and logs.
    format: Format,
    /// How events are delivered.
    target: Target,
}

/// The delivery mechanism behind a [`Destination`].
enum Target {
    /// Posting to an HTTP endpoint.
    Http(Box<HttpDestination>),
    /// Writing to this process's stdout.
    Stdout,
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("Destination");
        out.field("format", &self.format);
        if let Target::Http(http) = &self.target {
            out.field("url", &"[redacted]")
                .field("token", &http.authorization.as_ref().map(|_| "[redacted]"))
                .field("policy", &http.policy);
        }
        out.finish()
    }
}

impl Destination {
    /// Validates `config` and prepares the destination; `http` is shared so connections
    /// are pooled across sends. It should come from [`http_client`]: with another client
    /// a redirect may be followed before the send sees it.
    pub fn new(config: DestinationConfig, http: reqwest::Client) -> Result<Self, Error> {
        let url = config.parsed_url()?;
        let authorization = config.authorization()?;
        let target = match (config.format, url) {
            (Format::Stdout, _) | (_, None) => Target::Stdout,
            (format, Some(url)) => Target::Http(Box::new(HttpDestination {
                format,
                url: match format {
                    Format::SplunkHec => splunk::endpoint(&url),
                    _ => url,
                },
                authorization,
                client: http,
                policy: RetryPolicy::default(),
            })),
        };
        Ok(Destination {
            format: config.format,
            target,
        })
    }

    /// Replaces the retry waits and timeouts (tests use short ones).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        if let Target::Http(http) = &mut self.target {
            http.policy = policy;
        }
        self
    }

    /// The kind of destination.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Sends all events; returns Ok only when the destination accepted every one of them.
    ///
    /// Events go in order, in batches of at most [`MAX_BATCH_BYTES`] uncompressed.
    /// Transient failures (`408`, `429`, `5xx` but `501`, connect errors, timeouts) are
    /// retried with jittered backoff while `deadline` allows; after that the last failure
    /// is returned as [`Error::Destination`]. `401`/`403` give
    /// [`Error::ThirdPartyConfig`] at once. A batch refused for its content (`413`, or
    /// `400` from Splunk) is split in halves; an event refused alone is reported in an
    /// [`Error::Destination`] after the other events have been delivered. On error some
    /// events may already be delivered: callers re-send, and duplicates are possible.
    pub async fn send(
        &self,
        meta: &SourceMeta,
        events: &[RawEvent],
        deadline: Instant,
    ) -> Result<SendReport, Error> {
        match &self.target {
            Target::Http(http) => http.send(meta, events, deadline).await,
            Target::Stdout => stdout::send(events),
        }
    }
}

/// Environment switch that allows plain-http destinations on loopback and, for the
/// KnowBe4 APIs, base URLs outside KnowBe4 (the simulator, tests); never set in a
/// deployment.
pub const ALLOW_CUSTOM_BASE_URL_ENV: &str = "KNOWBE4_ALLOW_CUSTOM_BASE_URL";

/// The destination for a source: its own (in format `own`, with its URL and token from
/// `secrets`), or the deployment's `default`. Its URL is checked again (https, or http to loopback
/// behind the switch) every time, because the stored one may predate the rule or have
/// been edited.
pub fn resolve(
    own: Option<Format>,
    secrets: &crate::domain::secrets::SourceSecrets,
    default: &DestinationConfig,
    http: &reqwest::Client,
    allow_custom_base_url: bool,
) -> Result<Destination, Error> {
    let (config, prefix) = match own {
        Some(format) => (
            DestinationConfig {
                format,
                url: secrets.destination_url.clone(),
                token: secrets.destination_token.clone(),
            },
            "source.config.",
        ),
        None => (default.clone(), "FORWARD_"),
    };
    config
        .check_transport(allow_custom_base_url)
        .map_err(|e| rename_destination_field(e, prefix))?;
    Destination::new(config, http.clone())
}

/// Names a destination error's field as the user wrote it: `source.config.destination.url`
/// for a source's own destination, `FORWARD_URL` for the deployment's.
pub fn rename_destination_field(err: Error, prefix: &str) -> Error {
    match err {
        Error::InvalidConfig { field, message } if prefix == "FORWARD_" => Error::InvalidConfig {
            field: format!(
                "FORWARD_{}",
                field
                    .trim_start_matches("destination.")
                    .to_ascii_uppercase()
            ),
            message,
        },
        Error::InvalidConfig { field, message } => Error::InvalidConfig {
            field: format!("{prefix}{field}"),
            message,
        },
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use serde_json::value::RawValue;

    use super::*;
    use crate::testkit::recording_sink::RecordingSink;

    /// One event from its JSON text.
    pub(crate) fn event(text: &str) -> RawEvent {
        RawEvent::from_raw(RawValue::from_string(text.to_string()).unwrap()).unwrap()
    }

    /// `count` events `e-0`, `e-1`, ... of about `size` bytes each.
    pub(crate) fn events(count: usize, size: usize) -> Vec<RawEvent> {
        (0..count)
            .map(|i| {
                let head =
                    format!(r#"{{"id":"e-{i}","occurred_date":"2022-08-09T10:05:13.890Z","pad":""#);
                let pad = "k".repeat(size.saturating_sub(head.len() + 2));
                event(&format!("{head}{pad}\"}}"))
            })
            .collect()
    }

    /// A retry policy that keeps tests fast.
    pub(crate) fn fast(destination: Destination) -> Destination {
        destination.with_retry_policy(RetryPolicy {
            base: Duration::from_millis(5),
            cap: Duration::from_millis(20),
            retry_after_cap: Duration::from_millis(50),
            request_timeout: Duration::from_secs(5),
        })
    }

    const BEARER: &str = "bearer-token-do-not-leak";

    fn ndjson(url: String) -> Destination {
        let config = DestinationConfig {
            format: Format::Ndjson,
            url: Some(SecretString::from(url)),
            token: Some(SecretString::from(BEARER)),
        };
        fast(Destination::new(config, reqwest::Client::new()).unwrap())
    }

    fn soon(millis: u64) -> Instant {
        Instant::now() + Duration::from_millis(millis)
    }

    fn ids(events: &[RawEvent]) -> Vec<String> {
        events.iter().map(|e| e.id.clone()).collect()
    }

    #[test]
    fn formats_parse_from_their_configuration_names() {
        for format in [
            Format::Sumo,
            Format::SplunkHec,
            Format::Ndjson,
            Format::Stdout,
        ] {
            assert_eq!(format.as_str().parse::<Format>().unwrap(), format);
            let json = serde_json::to_string(&format).unwrap();
            assert_eq!(json, format!("\"{format}\""));
        }
        assert!("splunk".parse::<Format>().is_err());
    }

    #[test]
    fn validation_explains_without_echoing_secrets() {
        let config = |format, url: Option<&str>, token: Option<&str>| DestinationConfig {
            format,
            url: url.map(SecretString::from),
            token: token.map(SecretString::from),
        };
        let secret_url = "ftp://collectors.example/receiver/SECRET-URL-TOKEN";
        for (bad, field) in [
            (config(Format::Sumo, None, None), "destination.url"),
            (
                config(Format::Sumo, Some(secret_url), None),
                "destination.url",
            ),
            (
                config(Format::Ndjson, Some("not a url SECRET-URL-TOKEN"), None),
                "destination.url",
            ),
            (
                config(Format::SplunkHec, Some("https://hec.example"), None),
                "destination.token",
            ),
            (
                config(
                    Format::SplunkHec,
                    Some("https://hec.example"),
                    Some("SECRET\nURL-TOKEN"),
                ),
                "destination.token",
            ),
        ] {
            let err = bad.validate().unwrap_err();
            let text = format!("{err} {err:?} {bad:?}");
            assert!(
                matches!(&err, Error::InvalidConfig { field: f, .. } if f == field),
                "{text}"
            );
            assert!(!text.contains("SECRET"), "{text}");
        }
        // A trailing newline on a token is trimmed, not an error.
        let ok = config(
            Format::SplunkHec,
            Some("https://hec.example"),
            Some("tok\n"),
        );
        assert!(ok.validate().is_ok());
        assert!(config(Format::Stdout, None, None).validate().is_ok());
        assert!(
            config(
                Format::Sumo,
                Some("https://c.example/receiver/v1/http/x"),
                None
            )
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn debug_redacts_url_and_token() {
        let config = DestinationConfig {
            format: Format::Ndjson,
            url: Some(SecretString::from("https://h.example/receiver/URLSECRET")),
            token: Some(SecretString::from("TOKENSECRET")),
        };
        let destination = Destination::new(config.clone(), reqwest::Client::new()).unwrap();
        for text in [format!("{config:?}"), format!("{destination:?}")] {
            assert!(!text.contains("URLSECRET"), "{text}");
            assert!(!text.contains("TOKENSECRET"), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }

    #[tokio::test]
    async fn nothing_to_send_makes_no_request() {
        let sink = RecordingSink::spawn().await.unwrap();
        let report = ndjson(sink.url())
            .send(&SourceMeta::default(), &[], soon(1_000))
            .await
            .unwrap();
        assert_eq!(report, SendReport::default());
        assert!(sink.requests().is_empty());
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn server_errors_are_retried_and_delivered_once() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.fail_next(500, 2);
        let batch = events(10, 200);
        let report = ndjson(sink.url())
            .send(&SourceMeta::default(), &batch, soon(5_000))
            .await
            .unwrap();
        assert_eq!(report.events, 10);
        assert_eq!(report.retries, 2);
        assert_eq!(report.requests, 3);
        let statuses: Vec<u16> = sink.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [500, 500, 200]);
        assert_eq!(sink.event_ids(), ids(&batch));
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn throttling_is_retried_and_501_is_not() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.fail_next(429, 1);
        let destination = ndjson(sink.url());
        let report = destination
            .send(&SourceMeta::default(), &events(2, 50), soon(5_000))
            .await
            .unwrap();
        assert_eq!(report.retries, 1);

        sink.fail_next(501, 1);
        let err = destination
            .send(&SourceMeta::default(), &events(2, 50), soon(5_000))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Destination {
                status: Some(501),
                ..
            }
        ));
        assert_eq!(sink.requests().len(), 3);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn too_large_batches_are_split_until_they_fit() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.set_max_body(Some(10_000));
        let batch = events(100, 1_000);
        let report = ndjson(sink.url())
            .send(&SourceMeta::default(), &batch, soon(5_000))
            .await
            .unwrap();
        assert_eq!(report.events, 100);
        assert_eq!(report.retries, 0);
        assert_eq!(sink.event_ids(), ids(&batch));
        let requests = sink.requests();
        assert!(requests.iter().any(|r| r.status == 413));
        assert!(
            requests
                .iter()
                .filter(|r| r.status == 200)
                .all(|r| r.body_len <= 10_000)
        );
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn a_single_event_too_large_fails_after_the_others_are_delivered() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.set_max_body(Some(5_000));
        let mut batch = events(4, 500);
        batch.insert(2, events(1, 8_000).remove(0));
        batch[2].id = "huge".into();
        let err = ndjson(sink.url())
            .send(&SourceMeta::default(), &batch, soon(5_000))
            .await
            .unwrap_err();
        match err {
            Error::Destination { status, message } => {
                assert_eq!(status, Some(413));
                assert!(
                    message.contains("huge") && message.contains("1 of 5"),
                    "{message}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(sink.event_ids(), ["e-0", "e-1", "e-2", "e-3"]);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn rejected_credentials_are_a_config_error_without_retry() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.fail_next(401, 1);
        let err = ndjson(sink.url())
            .send(&SourceMeta::default(), &events(3, 50), soon(5_000))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::ThirdPartyConfig {
                system: "destination",
                status: Some(401),
                ..
            }
        ));
        assert_eq!(sink.requests().len(), 1);
        assert!(sink.events().is_empty());
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn other_client_errors_are_not_retried() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.fail_next(404, 1);
        let err = ndjson(sink.url())
            .send(&SourceMeta::default(), &events(3, 50), soon(5_000))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Destination {
                status: Some(404),
                ..
            }
        ));
        assert_eq!(sink.requests().len(), 1);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn a_destination_down_past_the_deadline_fails_without_leaking_secrets() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.set_down(Some(503));
        let destination = ndjson(sink.url());
        let started = std::time::Instant::now();
        let err = destination
            .send(&SourceMeta::default(), &events(3, 50), soon(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            err,
            Error::Destination {
                status: Some(503),
                ..
            }
        ));
        assert!(sink.requests().len() > 1, "retried until the deadline");
        assert!(sink.events().is_empty());
        let text = format!("{err} {err:?} {destination:?}");
        assert!(!text.contains(sink.token()), "{text}");
        assert!(!text.contains(BEARER), "{text}");
        assert!(!text.contains("127.0.0.1"), "{text}");

        // After the outage, the same events go through.
        sink.set_down(None);
        destination
            .send(&SourceMeta::default(), &events(3, 50), soon(5_000))
            .await
            .unwrap();
        assert_eq!(sink.event_ids().len(), 3);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn an_unreachable_destination_fails_without_leaking_secrets() {
        let sink = RecordingSink::spawn().await.unwrap();
        let url = sink.url();
        let token = sink.token().to_string();
        sink.shutdown().await;
        let err = ndjson(url)
            .send(&SourceMeta::default(), &events(1, 50), soon(200))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Destination { status: None, .. }),
            "{err:?}"
        );
        let text = format!("{err} {err:?}");
        assert!(text.contains("connect"), "{text}");
        assert!(!text.contains(&token), "{text}");
        assert!(!text.contains(BEARER), "{text}");
    }

    #[tokio::test]
    async fn a_passed_deadline_sends_nothing() {
        let sink = RecordingSink::spawn().await.unwrap();
        let err = ndjson(sink.url())
            .send(&SourceMeta::default(), &events(1, 50), Instant::now())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Destination { status: None, .. }));
        assert!(sink.requests().is_empty());
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn retry_after_is_honoured_capped_and_within_the_deadline() {
        let sink = RecordingSink::spawn().await.unwrap();
        let policy = RetryPolicy {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            retry_after_cap: Duration::from_millis(200),
            request_timeout: Duration::from_secs(5),
        };
        let destination = ndjson(sink.url()).with_retry_policy(policy);

        // Retry-After: 5 is capped to 200 ms, far above the 2 ms backoff.
        sink.fail_next_with_retry_after(503, 1, 5);
        let started = Instant::now();
        let report = destination
            .send(&SourceMeta::default(), &events(1, 50), soon(5_000))
            .await
            .unwrap();
        assert_eq!(report.retries, 1);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");

        // A wait that would end past the deadline returns the error instead of sleeping.
        sink.fail_next_with_retry_after(429, 1, 5);
        let started = Instant::now();
        let err = destination
            .send(&SourceMeta::default(), &events(1, 50), soon(190))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Destination {
                    status: Some(429),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(190));
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn stdout_needs_no_url() {
        let config = DestinationConfig {
            format: Format::Stdout,
            url: None,
            token: None,
        };
        let destination = Destination::new(config, reqwest::Client::new()).unwrap();
        assert_eq!(destination.format(), Format::Stdout);
        let report = destination
            .send(&SourceMeta::default(), &[], soon(1_000))
            .await
            .unwrap();
        assert_eq!(report.events, 0);
    }
}
