//! Source configuration: the hosted KnowBe4 API Source's JSON, as users already write it,
//! plus this collector's optional extensions; validated into a [`SourceSpec`] (stored,
//! no secrets) and [`SourceSecrets`] (kept in Secrets Manager or the local file).
//!
//! Every rejection names the field as the user wrote it, e.g.
//! `source.config.baseURL: ...`.

use std::collections::BTreeMap;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::domain::secrets::SourceSecrets;
use crate::error::{Error, Result};
use crate::sink::Format;

pub mod generations;

pub use generations::Generation;

/// Environment switch that allows a `baseURL` outside KnowBe4 (the simulator, tests);
/// defined beside the destinations' transport rule, which it also relaxes.
pub use crate::sink::ALLOW_CUSTOM_BASE_URL_ENV;

/// Daily request quota assumed when neither `licensedUsers` nor `dailyRequestLimit` is
/// given: the quota of a 10-seat account. Conservative on purpose: exceeding the real
/// quota locks every integration sharing the key out until the next UTC day.
pub const DEFAULT_DAILY_REQUESTS: u32 = 100;
/// KnowBe4 grants ten requests per licensed seat per day.
pub const REQUESTS_PER_SEAT: u32 = 10;
/// Default `firstFetchLookbackHours`: how far back the first run collects.
pub const DEFAULT_LOOKBACK_HOURS: f64 = 24.0;
/// Default `retryWindowMinutes`, the hosted source's 90 minutes.
pub const DEFAULT_RETRY_WINDOW_MINUTES: f64 = 90.0;
/// Reporting API requests per day before the seats are added: KnowBe4 documents 1,000
/// plus the number of seats (another of its docs says 2,000 plus seats; the smaller is
/// assumed).
pub const REPORTING_BASE_DAILY_REQUESTS: u32 = 1000;
/// Default `latenessWindowMinutes`: how late (backdated) an event may arrive and still be
/// collected. Every run re-reads this window, which costs one request per 100 events in it.
pub const DEFAULT_LATENESS_MINUTES: f64 = 60.0;

/// Most metadata fields a source may have: they travel as one `X-Sumo-Fields` header on
/// every batch, and live in the source's state item (DynamoDB items are at most 400 KB).
pub const MAX_FIELDS: usize = 30;
/// Longest field name, in bytes.
pub const MAX_FIELD_NAME_BYTES: usize = 128;
/// Longest field value, in bytes.
pub const MAX_FIELD_VALUE_BYTES: usize = 256;
/// Longest `X-Sumo-Fields` header the fields may make (`k=v,...`, the SIEM fields that
/// `_siemForward` adds included), in bytes: proxies and servers commonly cap one header
/// at 4 to 8 KiB.
pub const MAX_FIELDS_HEADER_BYTES: usize = 4096;

/// The KnowBe4 regions: console host (what users copy from the browser) and API host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Region {
    /// training.knowbe4.com
    US,
    /// eu.knowbe4.com
    EU,
    /// ca.knowbe4.com
    CA,
    /// uk.knowbe4.com
    UK,
    /// de.knowbe4.com
    DE,
}

impl Region {
    /// Every region, for lookups.
    pub const ALL: [Region; 5] = [Region::US, Region::EU, Region::CA, Region::UK, Region::DE];

    /// The console host an administrator logs into.
    pub fn console_host(self) -> &'static str {
        match self {
            Region::US => "training.knowbe4.com",
            Region::EU => "eu.knowbe4.com",
            Region::CA => "ca.knowbe4.com",
            Region::UK => "uk.knowbe4.com",
            Region::DE => "de.knowbe4.com",
        }
    }

    /// The User Event API host.
    pub fn api_host(self) -> &'static str {
        match self {
            Region::US => "api.events.knowbe4.com",
            Region::EU => "api-eu.events.knowbe4.com",
            Region::CA => "api-ca.events.knowbe4.com",
            Region::UK => "api-uk.events.knowbe4.com",
            Region::DE => "api-de.events.knowbe4.com",
        }
    }

    /// The Reporting API host.
    pub fn reporting_host(self) -> &'static str {
        match self {
            Region::US => "us.api.knowbe4.com",
            Region::EU => "eu.api.knowbe4.com",
            Region::CA => "ca.api.knowbe4.com",
            Region::UK => "uk.api.knowbe4.com",
            Region::DE => "de.api.knowbe4.com",
        }
    }

    fn parse(code: &str) -> Option<Region> {
        Region::ALL
            .into_iter()
            .find(|r| r.code().eq_ignore_ascii_case(code.trim()))
    }

    fn code(self) -> &'static str {
        match self {
            Region::US => "US",
            Region::EU => "EU",
            Region::CA => "CA",
            Region::UK => "UK",
            Region::DE => "DE",
        }
    }
}

// ---- The JSON as written by users ---------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostedDocument {
    #[serde(rename = "api.version")]
    api_version: Option<String>,
    source: HostedSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HostedSource {
    config: HostedConfig,
    schema_ref: Option<SchemaRef>,
    source_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaRef {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HostedConfig {
    name: Option<String>,
    description: Option<String>,
    category: Option<String>,
    fields: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(rename = "baseURL")]
    base_url: Option<String>,
    region: Option<String>,
    api_key: Option<String>,
    licensed_users: Option<u32>,
    daily_request_limit: Option<u32>,
    quota_share: Option<f64>,
    first_fetch_lookback_hours: Option<f64>,
    retry_window_minutes: Option<f64>,
    lateness_window_minutes: Option<f64>,
    destination: Option<HostedDestination>,
    // The middle generation.
    data_types: Option<Vec<String>>,
    phishing_poll_interval: Option<f64>,
    // The newest generation.
    collect_phishing_tests: Option<bool>,
    api_key_phishing: Option<String>,
    collect_external_events: Option<bool>,
    api_key_event: Option<String>,
    // Our extensions for phishing security tests.
    #[serde(rename = "reportingBaseURL")]
    reporting_base_url: Option<String>,
    reporting_daily_request_limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostedDestination {
    format: String,
    url: Option<String>,
    token: Option<String>,
}

// ---- The validated form --------------------------------------------------------------

/// A per-source destination override (its URL and token are in [`SourceSecrets`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestinationSpec {
    /// How events are encoded and sent.
    pub format: Format,
}

/// What a source collects of phishing security tests (the Reporting API).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhishingSpec {
    /// The Reporting API base URL the Reporting token is sent to.
    pub reporting_base: String,
    /// Hours between polls (`phishingPollInterval`, 1 to 24).
    pub poll_interval_hours: u32,
    /// Reporting API requests this source may make per UTC day (quota × share, at least 1).
    pub daily_request_limit: u32,
    /// The whole account's Reporting API quota, before `quotaShare`, for `status`.
    pub account_daily_quota: u32,
}

fn yes() -> bool {
    true
}

/// A validated source configuration, without secrets: what the state store keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// `_sourceName` at the destination.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// `_sourceCategory` at the destination.
    pub category: Option<String>,
    /// Metadata fields, stringified (`_siemForward` included as the user set it).
    pub fields: BTreeMap<String, String>,
    /// Whether `fields._siemForward` is true (adds the KnowBe4 SIEM parser field).
    pub siem_forward: bool,
    /// The region, when known (from `region` or a KnowBe4 host).
    pub region: Option<Region>,
    /// The User Event API base URL the key is sent to (resolved from the region when the
    /// source collects no user events).
    pub api_base: String,
    /// The generation of the hosted source's JSON the source was written in: it decides
    /// how fields are named in messages (`apiKey` or `apiKeyEvent`, ...).
    #[serde(default)]
    pub generation: Generation,
    /// Whether user events are collected (sources stored before the newer generations
    /// collect them).
    #[serde(default = "yes")]
    pub collect_events: bool,
    /// Phishing security tests and their recipients, when collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phishing: Option<PhishingSpec>,
    /// Requests this source may make per UTC day (quota × share, at least 1).
    pub daily_request_limit: u32,
    /// The whole account's quota, before `quotaShare`, for `status`.
    pub account_daily_quota: u32,
    /// How far back the first run collects, in seconds.
    pub first_fetch_lookback_secs: u64,
    /// How long retryable failures are retried before the source quits, in seconds.
    pub retry_window_secs: u64,
    /// How late a backdated event may arrive and still be collected, in seconds.
    pub lateness_window_secs: u64,
    /// A destination for this source instead of the deployment's default.
    pub destination: Option<DestinationSpec>,
}

impl ParsedSource {
    /// The secrets to store. `previous` is what is stored for the source being updated
    /// (its configuration and secrets); it fills what this configuration left out, but a
    /// stored secret is only kept while the endpoint it authenticates to is unchanged:
    /// the User Event API key while the API base URL is the same, the Reporting API token
    /// while the Reporting base URL is the same, the destination token while the
    /// destination's format and URL are the same. Otherwise the secret must be given
    /// again, and the error names its field as this configuration's generation spells it.
    /// A key for a data type the source no longer collects is not kept.
    pub fn secrets(
        &self,
        previous: Option<(&SourceSpec, &SourceSecrets)>,
    ) -> Result<SourceSecrets> {
        let generation = self.spec.generation;
        let api_key = if self.spec.collect_events {
            let name = generation.events_key_field();
            match (&self.api_key, previous) {
                (Some(key), _) => Some(key.clone()),
                (None, Some((spec, stored)))
                    if spec.collect_events
                        && spec.api_base == self.spec.api_base
                        && stored.api_key.is_some() =>
                {
                    stored.api_key.clone()
                }
                (None, Some((spec, _))) if spec.collect_events => {
                    return Err(Error::config(
                        field(name),
                        "is required because baseURL (or region) changed: the stored key is only \
                         sent to the host it was given for",
                    ));
                }
                (None, _) => return Err(Error::config(field(name), "is required")),
            }
        } else {
            None
        };
        let api_key_phishing = match &self.spec.phishing {
            None => None,
            Some(phishing) => {
                let name = generation.phishing_key_field();
                let stored_base =
                    previous.and_then(|(spec, stored)| Some((spec.phishing.as_ref()?, stored)));
                match (&self.api_key_phishing, stored_base) {
                    (Some(key), _) => Some(key.clone()),
                    (None, Some((old, stored)))
                        if old.reporting_base == phishing.reporting_base
                            && stored.api_key_phishing.is_some() =>
                    {
                        stored.api_key_phishing.clone()
                    }
                    (None, Some(_)) => {
                        return Err(Error::config(
                            field(name),
                            "is required because reportingBaseURL (or region) changed: the \
                             stored token is only sent to the host it was given for",
                        ));
                    }
                    (None, None) => return Err(Error::config(field(name), "is required")),
                }
            }
        };
        let Some(destination) = &self.spec.destination else {
            return Ok(SourceSecrets {
                api_key,
                api_key_phishing,
                destination_url: None,
                destination_token: None,
            });
        };
        // The stored destination, when the source had one of the same format.
        let stored = previous.and_then(|(spec, stored)| {
            spec.destination
                .as_ref()
                .filter(|d| d.format == destination.format)
                .map(|_| stored)
        });
        let destination_url = self
            .destination_url
            .clone()
            .or_else(|| stored.and_then(|s| s.destination_url.clone()));
        let same_url = |old: &SourceSecrets| match (&destination_url, &old.destination_url) {
            (Some(new), Some(old)) => new.expose_secret().trim() == old.expose_secret().trim(),
            (None, None) => true,
            _ => false,
        };
        let destination_token = match (&self.destination_token, stored) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(old)) if old.destination_token.is_none() => None,
            (None, Some(old)) if same_url(old) => old.destination_token.clone(),
            (None, Some(_)) => {
                return Err(Error::config(
                    field("destination.token"),
                    "is required because destination.url changed: the stored token is only \
                     sent to the URL it was given for",
                ));
            }
            (None, None) => None,
        };
        Ok(SourceSecrets {
            api_key,
            api_key_phishing,
            destination_url,
            destination_token,
        })
    }
}

impl SourceSpec {
    /// Metadata for the destination.
    pub fn sink_meta(&self) -> crate::sink::SourceMeta {
        crate::sink::SourceMeta {
            name: self.name.clone(),
            category: self.category.clone(),
            fields: self.fields.clone(),
            siem_forward: self.siem_forward,
            sourcetype: None,
        }
    }
}

/// What `parse_source` returns: the stored part and the secret part.
pub struct ParsedSource {
    /// Validated configuration.
    pub spec: SourceSpec,
    /// The User Event API key; `None` when user events are not collected, or for an
    /// update that keeps the stored one.
    pub api_key: Option<SecretString>,
    /// The Reporting API token; `None` when phishing tests are not collected, or for an
    /// update that keeps the stored one.
    pub api_key_phishing: Option<SecretString>,
    /// A per-source destination URL (a secret: Sumo URLs carry their token).
    pub destination_url: Option<SecretString>,
    /// A per-source destination token.
    pub destination_token: Option<SecretString>,
}

/// Options of validation that come from the deployment, not the JSON.
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidationOptions {
    /// `KNOWBE4_ALLOW_CUSTOM_BASE_URL=1`: any https base URL, and http to loopback.
    pub allow_custom_base_url: bool,
    /// An update may omit the API key (or send `****`) to keep the stored one.
    pub key_optional: bool,
}

impl ValidationOptions {
    /// Reads the custom-base-URL switch from the environment.
    pub fn from_env() -> Self {
        ValidationOptions {
            allow_custom_base_url: std::env::var(ALLOW_CUSTOM_BASE_URL_ENV)
                .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
                .unwrap_or(false),
            key_optional: false,
        }
    }
}

const CONFIG: &str = "source.config";

/// Parses and validates the hosted source's JSON (a document with `api.version` and
/// `source`, or just the `source` object).
///
/// ```
/// use knowbe4_source::config::{ValidationOptions, parse_source};
///
/// let json = r#"{"api.version": "v1", "source": {"config": {
///     "name": "KnowBe4", "baseURL": "https://eu.knowbe4.com", "apiKey": "key",
///     "licensedUsers": 50}}}"#;
/// let parsed = parse_source(json, ValidationOptions::default()).unwrap();
/// assert_eq!(parsed.spec.api_base, "https://api-eu.events.knowbe4.com");
/// assert_eq!(parsed.spec.daily_request_limit, 500);
///
/// // Rejections name the field and say what it must be.
/// let bad = json.replace("50", "-5");
/// let err = parse_source(&bad, ValidationOptions::default()).err().unwrap();
/// assert_eq!(
///     err.to_string(),
///     "invalid configuration: source.config.licensedUsers: must be a whole number from 1 to 4294967295"
/// );
/// ```
pub fn parse_source(json: &str, options: ValidationOptions) -> Result<ParsedSource> {
    // A UTF-8 byte order mark (Windows editors) is not JSON but harmless.
    let json = json.strip_prefix('\u{feff}').unwrap_or(json);
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Error::config("source", format!("not valid JSON: {e}")))?;
    parse_source_value(value, options)
}

/// As [`parse_source`], from an already parsed JSON value.
pub fn parse_source_value(
    value: serde_json::Value,
    options: ValidationOptions,
) -> Result<ParsedSource> {
    check_document_shape(&value)?;
    // A bare `source` object (with `config`) is accepted as well as the whole document.
    let value = match value {
        serde_json::Value::Object(map)
            if map.contains_key("config") && !map.contains_key("source") =>
        {
            serde_json::json!({ "source": map })
        }
        other => other,
    };
    let doc: HostedDocument = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = scrub_serde_message(&e.inner().to_string());
        let field = match path.as_str() {
            "." | "" => "source".to_string(),
            // serde names an unknown empty key by its parent's path plus a dot.
            p if p.ends_with('.') => p.trim_end_matches('.').to_string(),
            p => p.to_string(),
        };
        Error::config(
            if field.is_empty() {
                "source".into()
            } else {
                field
            },
            message,
        )
    })?;
    if let Some(version) = &doc.api_version
        && version != "v1"
    {
        return Err(Error::config("api.version", "must be \"v1\""));
    }
    if let Some(schema) = &doc.source.schema_ref
        && schema.kind != generations::SCHEMA_OLDEST
        && schema.kind != generations::SCHEMA_KMSAT
    {
        return Err(Error::config(
            "source.schemaRef.type",
            "must be \"KnowBe4\" (the oldest generation) or \"KnowBe4 KMSAT\" (the middle and newest)",
        ));
    }
    if let Some(kind) = &doc.source.source_type
        && kind != "Universal"
    {
        return Err(Error::config("source.sourceType", "must be \"Universal\""));
    }
    let schema = doc.source.schema_ref.as_ref().map(|s| s.kind.as_str());
    validate_config(doc.source.config, schema, options)
}

/// Refuses, in the user's terms, documents that are not the hosted source's JSON object:
/// another JSON type, or a Lambda payload (`{"action": ...}`) given where its `source` goes.
fn check_document_shape(value: &serde_json::Value) -> Result<()> {
    const EXPECTED: &str = "expected the hosted source's JSON object, \
        {\"api.version\": \"v1\", \"source\": {\"config\": {...}}} (README, \"A source\")";
    let kind = match value {
        serde_json::Value::Object(map) if map.contains_key("action") => {
            return Err(Error::config(
                "source",
                "this looks like a Lambda payload ({\"action\": ...}); the command line takes \
                 the hosted source's JSON, which is the payload's \"source\" value. Save that \
                 value to a file, or send the whole payload to the function \
                 (aws lambda invoke --payload fileb://FILE)",
            ));
        }
        serde_json::Value::Object(_) => return Ok(()),
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Null => "null",
    };
    Err(Error::config("source", format!("{EXPECTED}, not {kind}")))
}

/// serde's messages quote the offending value (which could be a key) and name Rust types;
/// keep only what was expected, in the user's terms.
fn scrub_serde_message(message: &str) -> String {
    if message.starts_with("invalid type") || message.starts_with("invalid value") {
        return match message.split_once(", expected ") {
            Some((_, expected)) => expected_in_words(expected),
            None => "invalid value".into(),
        };
    }
    message.to_string()
}

/// serde's "expected ..." (a Rust type) as what the value must be.
fn expected_in_words(expected: &str) -> String {
    match expected {
        "u32" => format!("must be a whole number from 1 to {}", u32::MAX),
        "f64" => "must be a number".into(),
        "a string" => "must be a string (in double quotes)".into(),
        "a boolean" => "must be true or false".into(),
        "a map" => "must be a JSON object".into(),
        e if e.starts_with("struct ") => "must be a JSON object".into(),
        other => format!("invalid value, expected {other}"),
    }
}

fn field(name: &str) -> String {
    format!("{CONFIG}.{name}")
}

fn non_empty(name: &str, value: Option<String>, max: usize) -> Result<Option<String>> {
    match value.map(|v| v.trim().to_string()) {
        Some(v) if v.is_empty() => Err(Error::config(field(name), "must not be empty")),
        Some(v) if v.chars().count() > max => Err(Error::config(
            field(name),
            format!("must be at most {max} characters"),
        )),
        Some(v) if v.chars().any(char::is_control) => Err(Error::config(
            field(name),
            "must not contain control characters",
        )),
        other => Ok(other),
    }
}

fn number_in(name: &str, value: Option<f64>, default: f64, lo: f64, hi: f64) -> Result<f64> {
    let v = value.unwrap_or(default);
    if !v.is_finite() || v < lo || v > hi {
        return Err(Error::config(
            field(name),
            format!("must be a number from {lo} to {hi}"),
        ));
    }
    Ok(v)
}

fn validate_config(
    mut config: HostedConfig,
    schema: Option<&str>,
    options: ValidationOptions,
) -> Result<ParsedSource> {
    let generation = generations::detect(&config, schema)?;
    let name = non_empty("name", config.name.take(), 128)?
        .ok_or_else(|| Error::config(field("name"), "is required"))?;
    let description = non_empty("description", config.description.take(), 1024)?;
    let category = non_empty("category", config.category.take(), 1024)?;

    let mut fields = BTreeMap::new();
    let mut siem_forward = false;
    let given = config.fields.take().unwrap_or_default();
    if given.len() > MAX_FIELDS {
        return Err(Error::config(
            field("fields"),
            format!(
                "has {} fields; at most {MAX_FIELDS} are allowed",
                given.len()
            ),
        ));
    }
    for (key, value) in given {
        // Long keys are not quoted back in full: the path would be as long as they are.
        let shown: String = key.chars().take(MAX_FIELD_NAME_BYTES).collect();
        let path = field(&format!("fields.{shown}"));
        if key.is_empty()
            || key.len() > MAX_FIELD_NAME_BYTES
            || key.chars().any(|c| c.is_control() || c == ',' || c == '=')
        {
            return Err(Error::config(
                path,
                format!(
                    "field names must be 1 to {MAX_FIELD_NAME_BYTES} bytes without ',', '=' or \
                     control characters"
                ),
            ));
        }
        let text = match &value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(Error::config(path, "must be a string, number or boolean")),
        };
        if text.chars().any(char::is_control) {
            return Err(Error::config(path, "must not contain control characters"));
        }
        if text.len() > MAX_FIELD_VALUE_BYTES {
            return Err(Error::config(
                path,
                format!("must be at most {MAX_FIELD_VALUE_BYTES} bytes"),
            ));
        }
        if key == "_siemForward" {
            siem_forward = match text.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(Error::config(path, "must be true or false")),
            };
        }
        fields.insert(key, text);
    }

    let header = crate::sink::fields_header(&crate::sink::SourceMeta {
        fields: fields.clone(),
        siem_forward,
        ..Default::default()
    });
    if header.len() > MAX_FIELDS_HEADER_BYTES {
        return Err(Error::config(
            field("fields"),
            format!(
                "make a {}-byte X-Sumo-Fields header; at most {MAX_FIELDS_HEADER_BYTES} bytes \
                 are allowed",
                header.len()
            ),
        ));
    }

    let collection = generations::collection(&mut config, generation, options)?;

    let account_daily_quota = match (config.licensed_users, config.daily_request_limit) {
        (_, Some(0)) => {
            return Err(Error::config(
                field("dailyRequestLimit"),
                "must be at least 1",
            ));
        }
        (Some(0), _) => {
            return Err(Error::config(field("licensedUsers"), "must be at least 1"));
        }
        (_, Some(limit)) => limit,
        (Some(seats), None) => seats.saturating_mul(REQUESTS_PER_SEAT),
        (None, None) => DEFAULT_DAILY_REQUESTS,
    };
    let share = number_in("quotaShare", config.quota_share, 1.0, 0.0, 1.0)?;
    if share <= 0.0 {
        return Err(Error::config(field("quotaShare"), "must be greater than 0"));
    }
    let daily_request_limit = ((f64::from(account_daily_quota) * share).floor() as u32).max(1);
    let phishing = match collection.phishing {
        None => None,
        Some((reporting_base, poll_interval_hours)) => {
            let account_daily_quota = match config.reporting_daily_request_limit {
                Some(0) => {
                    return Err(Error::config(
                        field("reportingDailyRequestLimit"),
                        "must be at least 1",
                    ));
                }
                Some(limit) => limit,
                None => {
                    REPORTING_BASE_DAILY_REQUESTS.saturating_add(config.licensed_users.unwrap_or(0))
                }
            };
            Some(PhishingSpec {
                reporting_base,
                poll_interval_hours,
                daily_request_limit: ((f64::from(account_daily_quota) * share).floor() as u32)
                    .max(1),
                account_daily_quota,
            })
        }
    };

    let lookback_hours = number_in(
        "firstFetchLookbackHours",
        config.first_fetch_lookback_hours,
        DEFAULT_LOOKBACK_HOURS,
        0.0,
        24.0 * 366.0,
    )?;
    let retry_minutes = number_in(
        "retryWindowMinutes",
        config.retry_window_minutes,
        DEFAULT_RETRY_WINDOW_MINUTES,
        0.0,
        7.0 * 24.0 * 60.0,
    )?;
    if retry_minutes <= 0.0 {
        return Err(Error::config(
            field("retryWindowMinutes"),
            "must be greater than 0",
        ));
    }
    let lateness_minutes = number_in(
        "latenessWindowMinutes",
        config.lateness_window_minutes,
        DEFAULT_LATENESS_MINUTES,
        0.0,
        7.0 * 24.0 * 60.0,
    )?;

    let (destination, destination_url, destination_token) = match config.destination {
        None => (None, None, None),
        Some(d) => {
            let format: Format = d.format.parse().map_err(|_| {
                Error::config(
                    field("destination.format"),
                    "must be one of sumo, splunk-hec, ndjson, stdout",
                )
            })?;
            let url = d
                .url
                .filter(|u| !u.trim().is_empty())
                .map(SecretString::from);
            let token = d
                .token
                .filter(|t| !t.trim().is_empty())
                .map(SecretString::from);
            let check = crate::sink::DestinationConfig {
                format,
                url: url.clone(),
                token: token.clone(),
            };
            check
                .validate()
                .and_then(|()| check.check_transport(options.allow_custom_base_url))
                .map_err(|e| match e {
                    Error::InvalidConfig { field: f, message } => Error::InvalidConfig {
                        field: format!("{CONFIG}.{f}"),
                        message,
                    },
                    other => other,
                })?;
            (Some(DestinationSpec { format }), url, token)
        }
    };

    Ok(ParsedSource {
        spec: SourceSpec {
            name,
            description,
            category,
            fields,
            siem_forward,
            region: collection.region,
            api_base: collection.api_base,
            generation,
            collect_events: collection.collect_events,
            phishing,
            daily_request_limit,
            account_daily_quota,
            first_fetch_lookback_secs: (lookback_hours * 3600.0).round() as u64,
            retry_window_secs: ((retry_minutes * 60.0).round() as u64).max(1),
            lateness_window_secs: (lateness_minutes * 60.0).round() as u64,
            destination,
        },
        api_key: collection.events_key,
        api_key_phishing: collection.phishing_key,
        destination_url,
        destination_token,
    })
}

/// Which KnowBe4 API a base URL is for: the hosts it may name and the field that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// The User Event API (`baseURL`): a console or User Event API host.
    Events,
    /// The Reporting API (`reportingBaseURL`): a console or Reporting API host.
    Reporting,
}

impl Api {
    fn field(self) -> &'static str {
        match self {
            Api::Events => "baseURL",
            Api::Reporting => "reportingBaseURL",
        }
    }

    fn host(self, region: Region) -> &'static str {
        match self {
            Api::Events => region.api_host(),
            Api::Reporting => region.reporting_host(),
        }
    }
}

/// Checks a stored API base URL against the same rules as a new configuration, before a
/// run sends the key to it: the stored value may predate the rules (a source created
/// while `KNOWBE4_ALLOW_CUSTOM_BASE_URL=1`) or have been edited in the state store.
pub fn check_stored_base(api_base: &str, options: ValidationOptions) -> Result<()> {
    check_stored(Api::Events, api_base, options)
}

/// As [`check_stored_base`], for the Reporting API base URL a Reporting token is sent to.
pub fn check_stored_reporting_base(reporting_base: &str, options: ValidationOptions) -> Result<()> {
    check_stored(Api::Reporting, reporting_base, options)
}

fn check_stored(api: Api, base: &str, options: ValidationOptions) -> Result<()> {
    let (_, resolved) =
        resolve_host(api, Some(base.to_string()), None, options).map_err(|e| match e {
            Error::InvalidConfig { field, message } => Error::InvalidConfig {
                field,
                message: format!(
                    "the stored API base URL is refused: {message}; update the source"
                ),
            },
            other => other,
        })?;
    if resolved != base {
        return Err(Error::config(
            field(api.field()),
            "the stored API base URL is not in the form validation gives it; update the source",
        ));
    }
    Ok(())
}

/// Resolves `baseURL` / `region` to the API base URL the key will be sent to.
fn resolve_base(
    base_url: Option<String>,
    region: Option<String>,
    options: ValidationOptions,
) -> Result<(Option<Region>, String)> {
    resolve_host(Api::Events, base_url, region, options)
}

/// Resolves `reportingBaseURL` (or the already resolved `region`) to the Reporting API
/// base URL the Reporting token will be sent to.
fn resolve_reporting_base(
    reporting_base_url: Option<String>,
    region: Option<Region>,
    options: ValidationOptions,
) -> Result<String> {
    let region = region.map(|r| r.code().to_string());
    resolve_host(Api::Reporting, reporting_base_url, region, options).map(|(_, base)| base)
}

/// Resolves the base URL of `api` from its field (a KnowBe4 console or API host, or any
/// host behind the switch) or the region.
fn resolve_host(
    api: Api,
    base_url: Option<String>,
    region: Option<String>,
    options: ValidationOptions,
) -> Result<(Option<Region>, String)> {
    let region =
        match region {
            Some(code) => Some(Region::parse(&code).ok_or_else(|| {
                Error::config(field("region"), "must be one of US, EU, CA, UK, DE")
            })?),
            None => None,
        };
    let Some(raw) = base_url
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
    else {
        return match region {
            Some(r) => Ok((Some(r), format!("https://{}", api.host(r)))),
            None => Err(Error::config(
                field(api.field()),
                "is required (or set region)",
            )),
        };
    };
    let with_scheme = if raw.contains("://") {
        raw.clone()
    } else {
        format!("https://{raw}")
    };
    let url = Url::parse(&with_scheme)
        .map_err(|_| Error::config(field(api.field()), "is not a valid URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::config(
            field(api.field()),
            "must not contain credentials",
        ));
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let known = Region::ALL
        .into_iter()
        .find(|r| host == r.console_host() || host == api.host(*r));
    if let Some(found) = known {
        if url.scheme() != "https" {
            return Err(Error::config(field(api.field()), "must use https"));
        }
        if let Some(r) = region
            && r != found
        {
            return Err(Error::config(
                field("region"),
                format!(
                    "{} does not match {}'s region {}",
                    r.code(),
                    api.field(),
                    found.code()
                ),
            ));
        }
        return Ok((Some(found), format!("https://{}", api.host(found))));
    }
    if !options.allow_custom_base_url {
        return Err(Error::config(
            field(api.field()),
            format!(
                "{host} is not a KnowBe4 host (expected one of {}); the API key is only sent to KnowBe4 unless {ALLOW_CUSTOM_BASE_URL_ENV}=1",
                match api {
                    Api::Events => Region::ALL.map(Region::console_host).join(", "),
                    Api::Reporting => Region::ALL.map(Region::reporting_host).join(", "),
                }
            ),
        ));
    }
    let loopback = crate::sink::is_loopback_host(&host);
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(Error::config(
                field(api.field()),
                "plain http is only allowed to a loopback address",
            ));
        }
        _ => return Err(Error::config(field(api.field()), "must be an http(s) URL")),
    }
    let mut base = url.as_str().trim_end_matches('/').to_string();
    if url.query().is_some() || url.fragment().is_some() {
        base = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        );
    }
    Ok((region, base))
}

/// Whether the secret `api_key` appears in `text` (used by tests and log scrubbing checks).
pub fn contains_secret(text: &str, secret: &SecretString) -> bool {
    let s = secret.expose_secret();
    !s.is_empty() && text.contains(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<ParsedSource> {
        parse_source_value(json, ValidationOptions::default())
    }

    fn hosted(config: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"api.version":"v1","source":{"config":config,"schemaRef":{"type":"KnowBe4"},"sourceType":"Universal"}})
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidConfig { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn accepts_the_hosted_example_with_a_console_host() {
        let parsed = parse(hosted(serde_json::json!({
            "name":"KnowBe4","description":"Test Source","category":"source_category",
            "fields":{"_siemForward":true,"team":"sec"},
            "baseURL":"https://training.knowbe4.com/ui/dashboard","apiKey":"k-123"
        })))
        .unwrap();
        assert_eq!(parsed.spec.api_base, "https://api.events.knowbe4.com");
        assert_eq!(parsed.spec.region, Some(Region::US));
        assert!(parsed.spec.siem_forward);
        assert_eq!(parsed.spec.fields["team"], "sec");
        assert_eq!(parsed.spec.daily_request_limit, DEFAULT_DAILY_REQUESTS);
        assert_eq!(parsed.spec.retry_window_secs, 90 * 60);
    }

    #[test]
    fn region_and_api_hosts_resolve() {
        for (input, api) in [
            (
                serde_json::json!({"region":"eu"}),
                "https://api-eu.events.knowbe4.com",
            ),
            (
                serde_json::json!({"baseURL":"ca.knowbe4.com"}),
                "https://api-ca.events.knowbe4.com",
            ),
            (
                serde_json::json!({"baseURL":"https://api-de.events.knowbe4.com/"}),
                "https://api-de.events.knowbe4.com",
            ),
        ] {
            let mut config = input.as_object().unwrap().clone();
            config.insert("name".into(), "n".into());
            config.insert("apiKey".into(), "k".into());
            let parsed = parse(hosted(config.into())).unwrap();
            assert_eq!(parsed.spec.api_base, api);
        }
    }

    #[test]
    fn quota_extensions() {
        let parsed = parse(hosted(serde_json::json!({
            "name":"n","apiKey":"k","region":"US","licensedUsers":50,"quotaShare":0.5
        })))
        .unwrap();
        assert_eq!(parsed.spec.account_daily_quota, 500);
        assert_eq!(parsed.spec.daily_request_limit, 250);
        let parsed = parse(hosted(serde_json::json!({
            "name":"n","apiKey":"k","region":"US","licensedUsers":50,"dailyRequestLimit":42
        })))
        .unwrap();
        assert_eq!(parsed.spec.daily_request_limit, 42);
    }

    #[test]
    fn every_rejection_names_its_field() {
        let cases = [
            (
                serde_json::json!({"apiKey":"k","region":"US"}),
                "source.config.name",
            ),
            (
                serde_json::json!({"name":"n","region":"US"}),
                "source.config.apiKey",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k"}),
                "source.config.baseURL",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"MARS"}),
                "source.config.region",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","baseURL":"https://evil.example.com"}),
                "source.config.baseURL",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","baseURL":"http://training.knowbe4.com"}),
                "source.config.baseURL",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"US","quotaShare":1.5}),
                "source.config.quotaShare",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"US","licensedUsers":"many"}),
                "source.config.licensedUsers",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"US","bogus":1}),
                "source.config.bogus",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"US","fields":{"a":[1]}}),
                "source.config.fields.a",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"US","retryWindowMinutes":0}),
                "source.config.retryWindowMinutes",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"US","destination":{"format":"carrier-pigeon"}}),
                "source.config.destination.format",
            ),
            (
                serde_json::json!({"name":"n","apiKey":"k","region":"EU","baseURL":"training.knowbe4.com"}),
                "source.config.region",
            ),
        ];
        for (config, expected) in cases {
            let err = parse(hosted(config.clone()))
                .err()
                .unwrap_or_else(|| panic!("{config} was accepted"));
            assert_eq!(field_of(err), expected, "{config}");
        }
        let err = parse(serde_json::json!({"api.version":"v2","source":{"config":{}}}))
            .err()
            .unwrap();
        assert_eq!(field_of(err), "api.version");
        let err = parse(serde_json::json!({"source":{"config":{"name":"n","apiKey":"k","region":"US"},"schemaRef":{"type":"Okta"}}})).err().unwrap();
        assert_eq!(field_of(err), "source.schemaRef.type");
    }

    fn message_of(err: Error) -> String {
        match err {
            Error::InvalidConfig { message, .. } => message,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn rejections_are_in_the_users_terms() {
        for bad in [
            serde_json::json!(-5),
            serde_json::json!(2.5),
            serde_json::json!("50"),
        ] {
            let config = hosted(
                serde_json::json!({"name":"n","apiKey":"k","region":"US","licensedUsers":bad}),
            );
            let err = parse(config).err().unwrap();
            assert_eq!(
                err.to_string(),
                "invalid configuration: source.config.licensedUsers: must be a whole number from 1 to 4294967295",
                "{bad}"
            );
        }
        let err = parse(serde_json::json!([])).err().unwrap();
        assert_eq!(
            field_of(parse(serde_json::json!([])).err().unwrap()),
            "source"
        );
        let message = message_of(err);
        assert!(
            message.starts_with("expected the hosted source's JSON object")
                && message.ends_with("not an array"),
            "{message}"
        );
        let payload = serde_json::json!({"action":"create","id":"x","source":hosted(serde_json::json!({"name":"n"}))});
        let message = message_of(parse(payload).err().unwrap());
        assert!(
            message.starts_with("this looks like a Lambda payload"),
            "{message}"
        );
        let config =
            hosted(serde_json::json!({"name":"n","apiKey":"k","region":"US","quotaShare":"half"}));
        assert_eq!(message_of(parse(config).err().unwrap()), "must be a number");
        let config = hosted(serde_json::json!({"name":"n","apiKey":"k","region":"US","fields":[]}));
        assert_eq!(
            message_of(parse(config).err().unwrap()),
            "must be a JSON object"
        );
        for text in [
            "invalid type: integer `1`, expected u32",
            "invalid type: map, expected struct HostedDocument with 2 elements",
        ] {
            assert!(!scrub_serde_message(text).contains("expected"), "{text}");
        }
    }

    #[test]
    fn custom_base_urls_need_the_switch_and_loopback_for_http() {
        let config =
            hosted(serde_json::json!({"name":"n","apiKey":"k","baseURL":"http://127.0.0.1:8787"}));
        assert!(parse(config.clone()).is_err());
        let allow = ValidationOptions {
            allow_custom_base_url: true,
            key_optional: false,
        };
        let parsed = parse_source_value(config, allow).unwrap();
        assert_eq!(parsed.spec.api_base, "http://127.0.0.1:8787");
        let remote =
            hosted(serde_json::json!({"name":"n","apiKey":"k","baseURL":"http://10.0.0.1:8787"}));
        assert_eq!(
            field_of(parse_source_value(remote, allow).err().unwrap()),
            "source.config.baseURL"
        );
    }

    #[test]
    fn rejections_never_echo_the_key() {
        let config = hosted(serde_json::json!({"name":"n","apiKey":12345,"region":"US"}));
        let err = parse(config).err().unwrap();
        assert!(!err.to_string().contains("12345"), "{err}");
        let config = hosted(serde_json::json!({"name":"n","apiKey":"canary secret","region":"US"}));
        let err = parse(config).err().unwrap();
        assert!(!err.to_string().contains("canary"), "{err}");
    }

    #[test]
    fn updates_may_keep_the_key() {
        let opts = ValidationOptions {
            allow_custom_base_url: false,
            key_optional: true,
        };
        let parsed = parse_source_value(
            hosted(serde_json::json!({"name":"n","apiKey":"********","region":"US"})),
            opts,
        )
        .unwrap();
        assert!(parsed.api_key.is_none());
    }

    fn update_options() -> ValidationOptions {
        ValidationOptions {
            allow_custom_base_url: false,
            key_optional: true,
        }
    }

    /// A stored source (US region, an ndjson destination with a token) to update.
    fn stored_source() -> (SourceSpec, SourceSecrets) {
        let parsed = parse(hosted(serde_json::json!({"name":"n","region":"US","apiKey":"old-key",
            "destination":{"format":"ndjson","url":"https://logs.example/old","token":"old-token"}})))
        .unwrap();
        let secrets = parsed.secrets(None).unwrap();
        (parsed.spec, secrets)
    }

    #[test]
    fn an_update_keeps_stored_secrets_it_does_not_replace() {
        let (spec, stored) = stored_source();
        let with_destination = parse_source_value(
            hosted(serde_json::json!({"name":"n","region":"US",
                "destination":{"format":"ndjson","url":"https://logs.example/new","token":"t"}})),
            update_options(),
        )
        .unwrap();
        let merged = with_destination.secrets(Some((&spec, &stored))).unwrap();
        assert_eq!(merged.api_key.as_ref().unwrap().expose_secret(), "old-key");
        assert_eq!(
            merged.destination_url.unwrap().expose_secret(),
            "https://logs.example/new"
        );
        let same_url = parse_source_value(
            hosted(serde_json::json!({"name":"renamed","region":"US",
                "destination":{"format":"ndjson","url":"https://logs.example/old"}})),
            update_options(),
        )
        .unwrap();
        let merged = same_url.secrets(Some((&spec, &stored))).unwrap();
        assert_eq!(
            merged.destination_token.unwrap().expose_secret(),
            "old-token"
        );
        let without = parse_source_value(
            hosted(serde_json::json!({"name":"n","region":"US"})),
            update_options(),
        )
        .unwrap();
        let merged = without.secrets(Some((&spec, &stored))).unwrap();
        assert!(
            merged.destination_url.is_none(),
            "no per-source destination any more"
        );
        assert_eq!(
            field_of(without.secrets(None).err().unwrap()),
            "source.config.apiKey",
            "no key at all"
        );
    }

    #[test]
    fn a_stored_secret_is_not_kept_for_a_new_endpoint() {
        let (spec, stored) = stored_source();
        let moved_api = parse_source_value(
            hosted(serde_json::json!({"name":"n","region":"EU",
                "destination":{"format":"ndjson","url":"https://logs.example/old"}})),
            update_options(),
        )
        .unwrap();
        let err = moved_api.secrets(Some((&spec, &stored))).err().unwrap();
        assert_eq!(field_of(err), "source.config.apiKey");
        let moved_destination = parse_source_value(
            hosted(serde_json::json!({"name":"n","region":"US",
                "destination":{"format":"ndjson","url":"https://elsewhere.example/new"}})),
            update_options(),
        )
        .unwrap();
        let err = moved_destination
            .secrets(Some((&spec, &stored)))
            .err()
            .unwrap();
        assert_eq!(field_of(err), "source.config.destination.token");
        // The console host and the API host of one region are the same endpoint.
        let same_region = parse_source_value(
            hosted(serde_json::json!({"name":"n","baseURL":"training.knowbe4.com"})),
            update_options(),
        )
        .unwrap();
        assert!(same_region.secrets(Some((&spec, &stored))).is_ok());
    }

    #[test]
    fn destinations_need_https_except_loopback_behind_the_switch() {
        let with_url = |url: &str, allow: bool| {
            parse_source_value(
                hosted(serde_json::json!({"name":"n","apiKey":"k","region":"US",
                    "destination":{"format":"ndjson","url":url,"token":"t"}})),
                ValidationOptions {
                    allow_custom_base_url: allow,
                    key_optional: false,
                },
            )
        };
        for (url, allow) in [
            ("http://logs.example/x", false),
            ("http://logs.example/x", true),
            ("http://127.0.0.1:9/x", false),
            ("http://10.0.0.1/x", true),
        ] {
            let err = with_url(url, allow)
                .err()
                .unwrap_or_else(|| panic!("{url} {allow}"));
            assert_eq!(
                field_of(err),
                "source.config.destination.url",
                "{url} {allow}"
            );
        }
        assert!(with_url("https://logs.example/x", false).is_ok());
        assert!(with_url("http://127.0.0.1:9/x", true).is_ok());
        assert!(with_url("http://localhost:9/x", true).is_ok());
    }

    #[test]
    fn stored_base_urls_are_checked_like_new_ones() {
        let deployed = ValidationOptions::default();
        let allow = ValidationOptions {
            allow_custom_base_url: true,
            key_optional: false,
        };
        assert!(check_stored_base("https://api.events.knowbe4.com", deployed).is_ok());
        assert!(check_stored_base("http://127.0.0.1:8787", allow).is_ok());
        for (base, options) in [
            ("http://127.0.0.1:8787", deployed),
            ("https://evil.example", deployed),
            ("http://api.events.knowbe4.com", deployed),
            ("http://10.0.0.1:8787", allow),
            ("https://training.knowbe4.com", deployed),
        ] {
            let err = check_stored_base(base, options)
                .err()
                .unwrap_or_else(|| panic!("{base}"));
            assert_eq!(field_of(err), "source.config.baseURL", "{base}");
        }
    }

    #[test]
    fn fields_are_bounded_and_rejections_name_the_field() {
        let with_fields = |fields: serde_json::Value| {
            parse(hosted(
                serde_json::json!({"name":"n","apiKey":"k","region":"US","fields":fields}),
            ))
        };
        let many: serde_json::Map<_, _> = (0..=MAX_FIELDS)
            .map(|i| (format!("f{i}"), serde_json::Value::from("v")))
            .collect();
        assert_eq!(
            field_of(with_fields(many.into()).err().unwrap()),
            "source.config.fields"
        );
        let long_key = "k".repeat(MAX_FIELD_NAME_BYTES + 1);
        let err = with_fields(serde_json::json!({ long_key: "v" }))
            .err()
            .unwrap();
        assert!(field_of(err).starts_with("source.config.fields.kkk"));
        let err = with_fields(serde_json::json!({"team": "v".repeat(MAX_FIELD_VALUE_BYTES + 1)}))
            .err()
            .unwrap();
        assert_eq!(field_of(err), "source.config.fields.team");
        // Each field within its limits, but together too long for one header.
        let wide: serde_json::Map<_, _> = (0..20)
            .map(|i| {
                (
                    format!("{i:0>100}"),
                    serde_json::Value::from("v".repeat(MAX_FIELD_VALUE_BYTES)),
                )
            })
            .collect();
        assert_eq!(
            field_of(with_fields(wide.into()).err().unwrap()),
            "source.config.fields"
        );
        let fine: serde_json::Map<_, _> = (0..MAX_FIELDS)
            .map(|i| (format!("f{i}"), serde_json::Value::from("value")))
            .collect();
        assert!(with_fields(fine.into()).is_ok());
    }
}
