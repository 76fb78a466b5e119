//! The three generations of the hosted source's configuration, as users write them, and
//! what each collects with which key:
//!
//! | generation | written as | collects |
//! |---|---|---|
//! | oldest | `baseURL` (or `region`) + `apiKey`; `schemaRef.type` `"KnowBe4"` | user events, with `apiKey` |
//! | middle | `region`, `apiKey` (a Reporting API token), `dataTypes` (`["phishingTests"]`), `phishingPollInterval`; `schemaRef.type` `"KnowBe4 KMSAT"` | phishing security tests, with `apiKey` |
//! | newest | `region`, `collectPhishingTests` (default true) + `apiKeyPhishing` + `phishingPollInterval` (default 1), `collectExternalEvents` (default false) + `apiKeyEvent` | either or both |
//!
//! A configuration is read in the generation its fields name; one that mixes fields of two
//! generations is refused with a message that names both. Our extensions (`licensedUsers`,
//! `dailyRequestLimit`, lateness, destination, `reportingBaseURL`,
//! `reportingDailyRequestLimit`, ...) go with any generation that collects what they tune.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::{HostedConfig, Region, ValidationOptions, field, resolve_base, resolve_reporting_base};
use crate::error::{Error, Result};

/// The `schemaRef.type` of the oldest generation.
pub const SCHEMA_OLDEST: &str = "KnowBe4";
/// The `schemaRef.type` of the middle and newest generations.
pub const SCHEMA_KMSAT: &str = "KnowBe4 KMSAT";
/// The only `dataTypes` value of the middle generation.
pub const PHISHING_TESTS: &str = "phishingTests";
/// Hours between phishing polls, at least and at most (the hosted source's range).
pub const POLL_INTERVAL_HOURS: (u32, u32) = (1, 24);

/// The generation of the hosted source's JSON a configuration is written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Generation {
    /// `baseURL` + `apiKey`: user events only (and every source stored before the others
    /// were read).
    #[default]
    Oldest,
    /// `region`, `apiKey` (a Reporting API token), `dataTypes`, `phishingPollInterval`.
    Middle,
    /// `region`, `collectPhishingTests` + `apiKeyPhishing`, `collectExternalEvents` +
    /// `apiKeyEvent`, `phishingPollInterval`.
    Newest,
}

impl Generation {
    /// The field that holds the User Event API key, as this generation spells it.
    pub fn events_key_field(self) -> &'static str {
        match self {
            Generation::Newest => "apiKeyEvent",
            Generation::Oldest | Generation::Middle => "apiKey",
        }
    }

    /// The field that holds the Reporting API token, as this generation spells it.
    pub fn phishing_key_field(self) -> &'static str {
        match self {
            Generation::Newest => "apiKeyPhishing",
            Generation::Oldest | Generation::Middle => "apiKey",
        }
    }

    /// The generation's name, as messages say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Generation::Oldest => "oldest",
            Generation::Middle => "middle",
            Generation::Newest => "newest",
        }
    }
}

/// What a configuration collects, with which hosts and keys.
pub(super) struct Collection {
    /// The region, when known (from `region` or a KnowBe4 host).
    pub region: Option<Region>,
    /// The User Event API base URL (resolved from `region` when user events are not
    /// collected, so the stored spec always names a checked host).
    pub api_base: String,
    /// Whether user events are collected.
    pub collect_events: bool,
    /// The User Event API key; `None` when not collected, or kept on update.
    pub events_key: Option<SecretString>,
    /// The Reporting API base URL and poll interval, when phishing tests are collected.
    pub phishing: Option<(String, u32)>,
    /// The Reporting API token; `None` when not collected, or kept on update.
    pub phishing_key: Option<SecretString>,
}

/// The newest generation's own fields that `config` sets, in the order users write them.
fn newest_fields(config: &HostedConfig) -> Vec<&'static str> {
    [
        (
            "collectPhishingTests",
            config.collect_phishing_tests.is_some(),
        ),
        ("apiKeyPhishing", config.api_key_phishing.is_some()),
        (
            "collectExternalEvents",
            config.collect_external_events.is_some(),
        ),
        ("apiKeyEvent", config.api_key_event.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect()
}

/// Which generation `config` (with `schemaRef.type` `schema`) is written in; a mix of two
/// generations' fields is an error naming both.
pub(super) fn detect(config: &HostedConfig, schema: Option<&str>) -> Result<Generation> {
    let newest = newest_fields(config);
    if let Some(&first) = newest.first() {
        if config.api_key.is_some() {
            return Err(Error::config(
                field("apiKey"),
                format!(
                    "belongs to the oldest and middle generations, but {first} belongs to the \
                     newest; write one generation's fields (newest: apiKeyEvent for user events, \
                     apiKeyPhishing for phishing security tests)"
                ),
            ));
        }
        if config.data_types.is_some() {
            return Err(Error::config(
                field("dataTypes"),
                format!(
                    "belongs to the middle generation, but {first} belongs to the newest, which \
                     chooses with collectPhishingTests and collectExternalEvents; write one \
                     generation's fields"
                ),
            ));
        }
        if schema == Some(SCHEMA_OLDEST) {
            return Err(Error::config(
                "source.schemaRef.type",
                format!(
                    "\"{SCHEMA_OLDEST}\" is the oldest generation's, but {first} belongs to the \
                     newest, whose schemaRef.type is \"{SCHEMA_KMSAT}\""
                ),
            ));
        }
        return Ok(Generation::Newest);
    }
    let middle = if config.data_types.is_some() {
        Some("dataTypes")
    } else if config.phishing_poll_interval.is_some() {
        Some("phishingPollInterval")
    } else if schema == Some(SCHEMA_KMSAT) {
        Some("schemaRef.type \"KnowBe4 KMSAT\"")
    } else {
        None
    };
    let Some(marker) = middle else {
        return Ok(Generation::Oldest);
    };
    if config.base_url.is_some() {
        return Err(Error::config(
            field("baseURL"),
            format!(
                "belongs to the oldest generation (the User Event API host for apiKey), but \
                 {marker} belongs to the middle generation, whose apiKey is a Reporting API \
                 token; name the region instead (and reportingBaseURL for another Reporting \
                 host)"
            ),
        ));
    }
    if schema == Some(SCHEMA_OLDEST) {
        return Err(Error::config(
            "source.schemaRef.type",
            format!(
                "\"{SCHEMA_OLDEST}\" is the oldest generation's, but {marker} belongs to the \
                 middle generation, whose schemaRef.type is \"{SCHEMA_KMSAT}\""
            ),
        ));
    }
    Ok(Generation::Middle)
}

/// Reads a key field: a single token, or `None` when absent (or `****`, an update's
/// "keep the stored one").
pub(super) fn key(name: &str, value: Option<String>) -> Result<Option<SecretString>> {
    match value.map(|k| k.trim().to_string()) {
        Some(k) if !k.is_empty() && !k.chars().all(|c| c == '*') => {
            if k.len() > 4096 || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::config(
                    field(name),
                    "must be a single token without spaces or control characters",
                ));
            }
            Ok(Some(SecretString::from(k)))
        }
        _ => Ok(None),
    }
}

/// `key`, required unless an update may keep the stored one.
fn required_key(
    name: &str,
    value: Option<String>,
    options: ValidationOptions,
    why: &str,
) -> Result<Option<SecretString>> {
    match key(name, value)? {
        Some(k) => Ok(Some(k)),
        None if options.key_optional => Ok(None),
        None => Err(Error::config(field(name), format!("is required{why}"))),
    }
}

/// `phishingPollInterval`: whole hours from 1 to 24, default 1.
fn poll_interval(value: Option<f64>) -> Result<u32> {
    let (lo, hi) = POLL_INTERVAL_HOURS;
    match value {
        None => Ok(lo),
        Some(h) if h.fract() == 0.0 && h >= f64::from(lo) && h <= f64::from(hi) => Ok(h as u32),
        Some(_) => Err(Error::config(
            field("phishingPollInterval"),
            format!("must be a whole number of hours from {lo} to {hi}"),
        )),
    }
}

/// The region, required by the middle and newest generations (the hosted source asks for
/// it; every host of theirs follows from it).
fn required_region(config: &HostedConfig, generation: Generation) -> Result<()> {
    if config.region.is_none() {
        return Err(Error::config(
            field("region"),
            format!(
                "is required (one of US, EU, CA, UK, DE): the {} generation names the \
                 account's region",
                generation.as_str()
            ),
        ));
    }
    Ok(())
}

/// Refuses the phishing-only extensions in the oldest generation, which collects user
/// events only.
fn no_phishing_fields(config: &HostedConfig) -> Result<()> {
    for (name, set) in [
        ("reportingBaseURL", config.reporting_base_url.is_some()),
        (
            "reportingDailyRequestLimit",
            config.reporting_daily_request_limit.is_some(),
        ),
    ] {
        if set {
            return Err(Error::config(
                field(name),
                "is for phishing security tests, which the oldest generation (baseURL + apiKey: \
                 user events) does not collect; the newest generation collects both \
                 (collectPhishingTests + apiKeyPhishing, collectExternalEvents + apiKeyEvent)",
            ));
        }
    }
    Ok(())
}

/// What `config`, written in `generation`, collects.
pub(super) fn collection(
    config: &mut HostedConfig,
    generation: Generation,
    options: ValidationOptions,
) -> Result<Collection> {
    match generation {
        Generation::Oldest => {
            no_phishing_fields(config)?;
            let (region, api_base) =
                resolve_base(config.base_url.take(), config.region.take(), options)?;
            let events_key = required_key("apiKey", config.api_key.take(), options, "")?;
            Ok(Collection {
                region,
                api_base,
                collect_events: true,
                events_key,
                phishing: None,
                phishing_key: None,
            })
        }
        Generation::Middle => {
            required_region(config, generation)?;
            let types = config
                .data_types
                .take()
                .unwrap_or_else(|| vec![PHISHING_TESTS.to_string()]);
            if types.is_empty() {
                return Err(Error::config(
                    field("dataTypes"),
                    format!("must name at least one data type (\"{PHISHING_TESTS}\")"),
                ));
            }
            for (i, kind) in types.iter().enumerate() {
                if kind != PHISHING_TESTS {
                    return Err(Error::config(
                        field(&format!("dataTypes[{i}]")),
                        format!(
                            "must be \"{PHISHING_TESTS}\", the one data type the middle \
                             generation's Reporting API token collects (user events need the \
                             newest generation's collectExternalEvents and apiKeyEvent)"
                        ),
                    ));
                }
            }
            let interval = poll_interval(config.phishing_poll_interval)?;
            let (region, api_base) = resolve_base(None, config.region.take(), options)?;
            let reporting =
                resolve_reporting_base(config.reporting_base_url.take(), region, options)?;
            let phishing_key = required_key(
                "apiKey",
                config.api_key.take(),
                options,
                " (the Reporting API token)",
            )?;
            Ok(Collection {
                region,
                api_base,
                collect_events: false,
                events_key: None,
                phishing: Some((reporting, interval)),
                phishing_key,
            })
        }
        Generation::Newest => {
            required_region(config, generation)?;
            let collect_phishing = config.collect_phishing_tests.unwrap_or(true);
            let collect_events = config.collect_external_events.unwrap_or(false);
            if !collect_phishing && !collect_events {
                return Err(Error::config(
                    field("collectPhishingTests"),
                    "and collectExternalEvents are both false: the source would collect nothing",
                ));
            }
            let interval = poll_interval(config.phishing_poll_interval)?;
            let (region, api_base) =
                resolve_base(config.base_url.take(), config.region.take(), options)?;
            // A key for a data type that is not collected is checked but not kept.
            let events_key = if collect_events {
                required_key(
                    "apiKeyEvent",
                    config.api_key_event.take(),
                    options,
                    " when collectExternalEvents is true",
                )?
            } else {
                key("apiKeyEvent", config.api_key_event.take())?;
                None
            };
            let reporting =
                resolve_reporting_base(config.reporting_base_url.take(), region, options)?;
            let phishing_key = if collect_phishing {
                required_key(
                    "apiKeyPhishing",
                    config.api_key_phishing.take(),
                    options,
                    " when collectPhishingTests is true (its default)",
                )?
            } else {
                key("apiKeyPhishing", config.api_key_phishing.take())?;
                None
            };
            Ok(Collection {
                region,
                api_base,
                collect_events,
                events_key,
                phishing: collect_phishing.then_some((reporting, interval)),
                phishing_key,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::config::{ParsedSource, parse_source, parse_source_value};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/knowbe4-public");

    fn strict() -> ValidationOptions {
        ValidationOptions::default()
    }

    fn parse(json: serde_json::Value) -> Result<ParsedSource> {
        parse_source_value(json, strict())
    }

    fn doc(config: serde_json::Value, schema: &str) -> serde_json::Value {
        serde_json::json!({"api.version": "v1", "source": {"config": config,
            "schemaRef": {"type": schema}, "sourceType": "Universal"}})
    }

    fn field_and_message(err: Error) -> (String, String) {
        match err {
            Error::InvalidConfig { field, message } => (field, message),
            other => panic!("expected a config error, got {other}"),
        }
    }

    /// The `config = jsonencode({...})` object of a Terraform example, as JSON.
    fn terraform_config(path: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("jsonencode(").unwrap() + "jsonencode(".len();
        let end = start + text[start..].find("})").unwrap() + 1;
        serde_json::from_str(&text[start..end]).unwrap()
    }

    #[test]
    fn the_newest_example_reads_as_the_newest_generation() {
        let text = std::fs::read_to_string(format!("{FIXTURES}/example.json")).unwrap();
        let text = text.replace("************", "token-for-this-test");
        let parsed = parse_source(&text, strict()).unwrap();
        let spec = &parsed.spec;
        assert_eq!(spec.generation, Generation::Newest);
        assert!(spec.collect_events, "collectExternalEvents: true");
        assert_eq!(spec.api_base, "https://api.events.knowbe4.com");
        let phishing = spec.phishing.as_ref().unwrap();
        assert_eq!(phishing.reporting_base, "https://us.api.knowbe4.com");
        assert_eq!(phishing.poll_interval_hours, 24);
        assert_eq!(phishing.account_daily_quota, 1000);
        let secrets = parsed.secrets(None).unwrap();
        assert!(secrets.api_key.is_some() && secrets.api_key_phishing.is_some());
    }

    #[test]
    fn the_newest_terraform_example_reads_like_the_json_one() {
        let config = terraform_config(&format!("{FIXTURES}/example.tf"));
        let config: serde_json::Value = serde_json::from_str(
            &config
                .to_string()
                .replace("************", "token-for-this-test"),
        )
        .unwrap();
        let parsed = parse(doc(config, SCHEMA_KMSAT)).unwrap();
        assert_eq!(parsed.spec.generation, Generation::Newest);
        assert!(parsed.spec.collect_events && parsed.spec.phishing.is_some());
    }

    #[test]
    fn the_middle_example_reads_as_phishing_tests_with_one_reporting_token() {
        let config = terraform_config(&format!("{FIXTURES}/example.older-dataTypes.tf"));
        let config: serde_json::Value = serde_json::from_str(
            &config
                .to_string()
                .replace("************", "reporting-token"),
        )
        .unwrap();
        let parsed = parse(doc(config, SCHEMA_KMSAT)).unwrap();
        let spec = &parsed.spec;
        assert_eq!(spec.generation, Generation::Middle);
        assert!(!spec.collect_events);
        let phishing = spec.phishing.as_ref().unwrap();
        assert_eq!(phishing.reporting_base, "https://us.api.knowbe4.com");
        assert_eq!(phishing.poll_interval_hours, 1);
        let secrets = parsed.secrets(None).unwrap();
        assert!(
            secrets.api_key.is_none(),
            "apiKey is the Reporting token here"
        );
        assert_eq!(
            secrets.api_key_phishing.unwrap().expose_secret(),
            "reporting-token"
        );
    }

    #[test]
    fn the_oldest_generation_collects_user_events_with_api_key() {
        let parsed = parse(doc(
            serde_json::json!({"name": "n", "baseURL": "https://eu.knowbe4.com", "apiKey": "k"}),
            SCHEMA_OLDEST,
        ))
        .unwrap();
        assert_eq!(parsed.spec.generation, Generation::Oldest);
        assert!(parsed.spec.collect_events && parsed.spec.phishing.is_none());
        let secrets = parsed.secrets(None).unwrap();
        assert_eq!(secrets.api_key.unwrap().expose_secret(), "k");
        assert!(secrets.api_key_phishing.is_none());
    }

    #[test]
    fn a_mix_of_generations_names_both() {
        let cases = [
            (
                serde_json::json!({"name": "n", "region": "US", "apiKey": "k", "apiKeyEvent": "e"}),
                SCHEMA_KMSAT,
                "source.config.apiKey",
                "apiKeyEvent belongs to the newest",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "dataTypes": ["phishingTests"],
                    "collectPhishingTests": true, "apiKeyPhishing": "p"}),
                SCHEMA_KMSAT,
                "source.config.dataTypes",
                "collectPhishingTests belongs to the newest",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "p"}),
                SCHEMA_OLDEST,
                "source.schemaRef.type",
                "apiKeyPhishing belongs to the newest",
            ),
            (
                serde_json::json!({"name": "n", "baseURL": "https://training.knowbe4.com",
                    "apiKey": "k", "dataTypes": ["phishingTests"]}),
                SCHEMA_KMSAT,
                "source.config.baseURL",
                "dataTypes belongs to the middle generation",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKey": "k",
                    "phishingPollInterval": 2}),
                SCHEMA_OLDEST,
                "source.schemaRef.type",
                "phishingPollInterval belongs to the middle generation",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKey": "k",
                    "reportingBaseURL": "https://us.api.knowbe4.com"}),
                SCHEMA_OLDEST,
                "source.config.reportingBaseURL",
                "the oldest generation",
            ),
        ];
        for (config, schema, field, says) in cases {
            let err = parse(doc(config.clone(), schema))
                .err()
                .unwrap_or_else(|| panic!("{config} was accepted"));
            let (got, message) = field_and_message(err);
            assert_eq!(got, field, "{config}");
            assert!(message.contains(says), "{config}: {message}");
        }
    }

    #[test]
    fn every_newer_rule_names_its_field() {
        let cases = [
            (
                serde_json::json!({"name": "n", "apiKey": "k", "dataTypes": ["phishingTests"]}),
                "source.config.region",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKey": "k",
                    "dataTypes": ["phishingTests", "userEvents"]}),
                "source.config.dataTypes[1]",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKey": "k", "dataTypes": []}),
                "source.config.dataTypes",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKey": "k",
                    "dataTypes": ["phishingTests"], "phishingPollInterval": 25}),
                "source.config.phishingPollInterval",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKey": "k",
                    "dataTypes": ["phishingTests"], "phishingPollInterval": 1.5}),
                "source.config.phishingPollInterval",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "dataTypes": ["phishingTests"]}),
                "source.config.apiKey",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "collectPhishingTests": true}),
                "source.config.apiKeyPhishing",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "collectPhishingTests": false,
                    "collectExternalEvents": true}),
                "source.config.apiKeyEvent",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "collectPhishingTests": false,
                    "collectExternalEvents": false, "apiKeyEvent": "e"}),
                "source.config.collectPhishingTests",
            ),
            (
                serde_json::json!({"name": "n", "region": "EU", "apiKeyPhishing": "p",
                    "reportingBaseURL": "https://us.api.knowbe4.com"}),
                "source.config.region",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "p",
                    "reportingBaseURL": "https://api.events.knowbe4.com"}),
                "source.config.reportingBaseURL",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "p",
                    "reportingBaseURL": "http://127.0.0.1:9"}),
                "source.config.reportingBaseURL",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "p",
                    "reportingDailyRequestLimit": 0}),
                "source.config.reportingDailyRequestLimit",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "p q"}),
                "source.config.apiKeyPhishing",
            ),
            (
                serde_json::json!({"name": "n", "region": "US", "collectPhishingTests": "yes",
                    "apiKeyPhishing": "p"}),
                "source.config.collectPhishingTests",
            ),
        ];
        for (config, expected) in cases {
            let err = parse(doc(config.clone(), SCHEMA_KMSAT))
                .err()
                .unwrap_or_else(|| panic!("{config} was accepted"));
            assert_eq!(field_and_message(err).0, expected, "{config}");
        }
    }

    #[test]
    fn reporting_hosts_resolve_from_the_region_or_a_console_or_reporting_host() {
        for (given, expected) in [
            (None, "https://eu.api.knowbe4.com"),
            (
                Some("https://eu.knowbe4.com/ui"),
                "https://eu.api.knowbe4.com",
            ),
            (Some("eu.api.knowbe4.com"), "https://eu.api.knowbe4.com"),
        ] {
            let mut config =
                serde_json::json!({"name": "n", "region": "EU", "apiKeyPhishing": "p"});
            if let Some(url) = given {
                config["reportingBaseURL"] = url.into();
            }
            let parsed = parse(doc(config, SCHEMA_KMSAT)).unwrap();
            assert_eq!(parsed.spec.phishing.unwrap().reporting_base, expected);
        }
        // Another host only behind the switch (the simulator's case), http only to loopback.
        let config = serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "p",
            "reportingBaseURL": "http://127.0.0.1:8787"});
        let allow = ValidationOptions {
            allow_custom_base_url: true,
            key_optional: false,
        };
        let parsed = parse_source_value(doc(config, SCHEMA_KMSAT), allow).unwrap();
        assert_eq!(
            parsed.spec.phishing.unwrap().reporting_base,
            "http://127.0.0.1:8787"
        );
        assert!(
            crate::config::check_stored_reporting_base("http://127.0.0.1:8787", strict()).is_err()
        );
        assert!(crate::config::check_stored_reporting_base("http://127.0.0.1:8787", allow).is_ok());
        assert!(
            crate::config::check_stored_reporting_base("https://de.api.knowbe4.com", strict())
                .is_ok()
        );
    }

    #[test]
    fn the_reporting_limit_is_a_thousand_plus_seats_unless_given() {
        let limit = |extra: serde_json::Value| {
            let mut config =
                serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "p"});
            for (k, v) in extra.as_object().unwrap() {
                config[k] = v.clone();
            }
            let phishing = parse(doc(config, SCHEMA_KMSAT))
                .unwrap()
                .spec
                .phishing
                .unwrap();
            (phishing.account_daily_quota, phishing.daily_request_limit)
        };
        assert_eq!(limit(serde_json::json!({})), (1000, 1000));
        assert_eq!(
            limit(serde_json::json!({"licensedUsers": 250})),
            (1250, 1250)
        );
        assert_eq!(
            limit(serde_json::json!({"licensedUsers": 250, "quotaShare": 0.5})),
            (1250, 625)
        );
        assert_eq!(
            limit(serde_json::json!({"reportingDailyRequestLimit": 2100})),
            (2100, 2100)
        );
    }

    #[test]
    fn a_key_for_a_data_type_not_collected_is_not_kept() {
        let parsed = parse(doc(
            serde_json::json!({"name": "n", "region": "US", "collectPhishingTests": false,
                "apiKeyPhishing": "p", "collectExternalEvents": true, "apiKeyEvent": "e"}),
            SCHEMA_KMSAT,
        ))
        .unwrap();
        assert!(parsed.spec.phishing.is_none());
        let secrets = parsed.secrets(None).unwrap();
        assert!(secrets.api_key_phishing.is_none());
        assert_eq!(secrets.api_key.unwrap().expose_secret(), "e");
    }

    fn update_options() -> ValidationOptions {
        ValidationOptions {
            allow_custom_base_url: false,
            key_optional: true,
        }
    }

    #[test]
    fn an_update_keeps_each_key_while_its_host_is_unchanged() {
        let stored = parse(doc(
            serde_json::json!({"name": "n", "region": "US", "apiKeyPhishing": "old-token",
                "collectExternalEvents": true, "apiKeyEvent": "old-key"}),
            SCHEMA_KMSAT,
        ))
        .unwrap();
        let stored_secrets = stored.secrets(None).unwrap();
        let previous = Some((&stored.spec, &stored_secrets));

        // Both omitted (or masked), same region: both kept.
        let same = parse_source_value(
            doc(
                serde_json::json!({"name": "n2", "region": "US", "apiKeyPhishing": "****",
                    "collectExternalEvents": true}),
                SCHEMA_KMSAT,
            ),
            update_options(),
        )
        .unwrap();
        let kept = same.secrets(previous).unwrap();
        assert_eq!(kept.api_key.unwrap().expose_secret(), "old-key");
        assert_eq!(kept.api_key_phishing.unwrap().expose_secret(), "old-token");

        // A new Reporting host needs the token again, named as the newest generation does.
        let moved = parse_source_value(
            doc(
                serde_json::json!({"name": "n", "region": "US", "collectExternalEvents": true,
                    "reportingBaseURL": "https://eu.api.knowbe4.com"}),
                SCHEMA_KMSAT,
            ),
            update_options(),
        );
        // (region US against an EU host is itself refused; use EU throughout.)
        assert!(moved.is_err());
        let moved = parse_source_value(
            doc(
                serde_json::json!({"name": "n", "region": "EU", "collectExternalEvents": true,
                    "apiKeyEvent": "new-key"}),
                SCHEMA_KMSAT,
            ),
            update_options(),
        )
        .unwrap();
        let (field, message) = field_and_message(moved.secrets(previous).err().unwrap());
        assert_eq!(field, "source.config.apiKeyPhishing");
        assert!(
            message.contains("reportingBaseURL (or region) changed"),
            "{message}"
        );

        // The middle generation's apiKey is the Reporting token: an update from the middle
        // to the newest generation keeps it for the same host.
        let middle = parse(doc(
            serde_json::json!({"name": "n", "region": "US", "apiKey": "mid-token",
                "dataTypes": ["phishingTests"]}),
            SCHEMA_KMSAT,
        ))
        .unwrap();
        let middle_secrets = middle.secrets(None).unwrap();
        let newest = parse_source_value(
            doc(
                serde_json::json!({"name": "n", "region": "US", "collectPhishingTests": true}),
                SCHEMA_KMSAT,
            ),
            update_options(),
        )
        .unwrap();
        let kept = newest
            .secrets(Some((&middle.spec, &middle_secrets)))
            .unwrap();
        assert_eq!(kept.api_key_phishing.unwrap().expose_secret(), "mid-token");
        assert!(kept.api_key.is_none());

        // Turning user events on for a source that had none needs apiKeyEvent.
        let events_on = parse_source_value(
            doc(
                serde_json::json!({"name": "n", "region": "US", "collectExternalEvents": true}),
                SCHEMA_KMSAT,
            ),
            update_options(),
        )
        .unwrap();
        let (field, _) = field_and_message(
            events_on
                .secrets(Some((&middle.spec, &middle_secrets)))
                .err()
                .unwrap(),
        );
        assert_eq!(field, "source.config.apiKeyEvent");
    }

    #[test]
    fn stored_specs_from_before_the_newer_generations_read_as_the_oldest() {
        let parsed = parse(doc(
            serde_json::json!({"name": "n", "region": "US", "apiKey": "k"}),
            SCHEMA_OLDEST,
        ))
        .unwrap();
        let mut stored = serde_json::to_value(&parsed.spec).unwrap();
        for newer in ["generation", "collect_events", "phishing"] {
            stored.as_object_mut().unwrap().remove(newer);
        }
        let back: crate::config::SourceSpec = serde_json::from_value(stored).unwrap();
        assert_eq!(back, parsed.spec);
    }
}
