//! Splunk HTTP Event Collector: one JSON envelope per event, placed one after another.
//!
//! Each envelope is
//! `{"time":<seconds.micros>,"host":"knowbe4","source":<meta.name>,"sourcetype":"knowbe4:user_event","event":<raw event>,"fields":{...}}`
//! with the raw event embedded verbatim and `fields` left out when there are none. The
//! parts that do not depend on the event are serialised once per `send`, so encoding an
//! event is two copies and one number format, with no allocation.
//!
//! HEC answers `400` for bad data. The batch is then split in halves until the bad
//! event(s) are isolated; the others are delivered and the send fails naming the rejected
//! ids (see [`super::Destination::send`]). HEC may have indexed the envelopes before the
//! bad one in a rejected request, so isolation can duplicate a few events: duplicates are
//! preferred to losses.

use std::io::Write;

use reqwest::Url;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};

use super::SourceMeta;
use crate::domain::event::RawEvent;

/// The HEC path events are posted to.
pub const EVENT_PATH: &str = "/services/collector/event";

/// The `host` of every envelope.
pub const HOST: &str = "knowbe4";

/// The `sourcetype` of every envelope.
pub const SOURCETYPE: &str = "knowbe4:user_event";

/// The `sourcetype` of phishing security tests (Reporting API).
pub const SOURCETYPE_PHISHING_TEST: &str = "knowbe4:phishing:test";

/// The `sourcetype` of phishing security test recipients (Reporting API).
pub const SOURCETYPE_PHISHING_RECIPIENT: &str = "knowbe4:phishing:recipient";

/// Serialised constant parts of the envelopes of one `send`.
pub(crate) struct EnvelopeEncoder {
    /// Everything between the time and the event: host, source, sourcetype, `"event":`.
    after_time: Vec<u8>,
    /// Everything after the event: the indexed fields, and the closing brace.
    after_event: Vec<u8>,
}

impl EnvelopeEncoder {
    /// Prepares the envelope parts for `meta`.
    pub(crate) fn new(meta: &SourceMeta) -> Self {
        let mut after_time = Vec::with_capacity(96 + meta.name.len());
        after_time.extend_from_slice(br#","host":"#);
        write_json(&mut after_time, HOST);
        after_time.extend_from_slice(br#","source":"#);
        write_json(&mut after_time, &meta.name);
        after_time.extend_from_slice(br#","sourcetype":"#);
        write_json(&mut after_time, meta.sourcetype.unwrap_or(SOURCETYPE));
        after_time.extend_from_slice(br#","event":"#);

        let mut after_event = Vec::new();
        if !meta.fields.is_empty() {
            after_event.extend_from_slice(br#","fields":"#);
            write_json(&mut after_event, &meta.fields);
        }
        after_event.push(b'}');
        EnvelopeEncoder {
            after_time,
            after_event,
        }
    }

    /// Appends the envelope of `event` to `out`.
    pub(crate) fn write(&self, event: &RawEvent, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"time":"#);
        write_epoch_seconds(out, event.occurred.0);
        out.extend_from_slice(&self.after_time);
        out.extend_from_slice(event.as_json().as_bytes());
        out.extend_from_slice(&self.after_event);
    }
}

/// Serialises strings and string maps, which cannot fail.
fn write_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    // Serialising a `str` or a `BTreeMap<String, String>` into a Vec has no failure mode.
    let _ = serde_json::to_writer(out, value);
}

/// Writes nanoseconds since the epoch as decimal seconds with microseconds, the finest
/// precision Splunk keeps (`1660039513.890000`).
fn write_epoch_seconds(out: &mut Vec<u8>, nanos: i64) {
    let magnitude = nanos.unsigned_abs();
    let sign = if nanos < 0 { "-" } else { "" };
    let seconds = magnitude / 1_000_000_000;
    let micros = magnitude % 1_000_000_000 / 1_000;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{sign}{seconds}.{micros:06}");
}

/// The HEC event endpoint for a configured URL: the URL itself when its path already
/// ends with [`EVENT_PATH`], otherwise the path with [`EVENT_PATH`] appended (the query,
/// if any, is kept).
pub(crate) fn endpoint(base: &Url) -> Url {
    let path = base.path().trim_end_matches('/');
    if path.ends_with(EVENT_PATH) {
        return base.clone();
    }
    let mut url = base.clone();
    url.set_path(&format!("{path}{EVENT_PATH}"));
    url
}

/// Headers for HEC: JSON content and the `Splunk <token>` authorization.
pub(crate) fn headers(authorization: Option<&HeaderValue>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(value) = authorization {
        headers.insert(AUTHORIZATION, value.clone());
    }
    headers
}

/// HEC's explanation in an error answer (`{"text":"Invalid data format","code":6}`),
/// shortened; `None` when the body is not HEC's JSON.
pub(crate) fn error_text(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        text: String,
        code: Option<i64>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    let mut text: String = answer.text.chars().take(200).collect();
    if let Some(code) = answer.code {
        text.push_str(&format!(" (code {code})"));
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use secrecy::SecretString;
    use serde_json::Value;

    use super::*;
    use crate::Error;
    use crate::sink::tests::{event, events, fast};
    use crate::sink::{Destination, DestinationConfig, Format};
    use crate::testkit::recording_sink::RecordingSink;

    const TOKEN: &str = "11111111-2222-3333-4444-555555555555";

    fn splunk(url: String) -> Destination {
        let config = DestinationConfig {
            format: Format::SplunkHec,
            url: Some(SecretString::from(url)),
            token: Some(SecretString::from(TOKEN)),
        };
        fast(Destination::new(config, reqwest::Client::new()).unwrap())
    }

    fn meta() -> SourceMeta {
        SourceMeta {
            name: "kb4 \"prod\"".into(),
            category: None,
            fields: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            siem_forward: true,
            sourcetype: None,
        }
    }

    fn deadline() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn finds_the_event_endpoint() {
        for (base, expected) in [
            ("https://hec.example:8088", "/services/collector/event"),
            ("https://hec.example:8088/", "/services/collector/event"),
            (
                "https://hec.example/splunk/",
                "/splunk/services/collector/event",
            ),
            (
                "https://hec.example/services/collector/event",
                "/services/collector/event",
            ),
        ] {
            assert_eq!(endpoint(&Url::parse(base).unwrap()).path(), expected);
        }
        let with_query = endpoint(&Url::parse("https://h/?channel=abc").unwrap());
        assert_eq!(with_query.query(), Some("channel=abc"));
    }

    #[test]
    fn formats_time_as_seconds_with_microseconds() {
        let mut out = Vec::new();
        write_epoch_seconds(&mut out, 1_660_039_513_890_000_000);
        out.push(b' ');
        write_epoch_seconds(&mut out, -1_500_000_000);
        out.push(b' ');
        write_epoch_seconds(&mut out, 7);
        assert_eq!(out, b"1660039513.890000 -1.500000 0.000000");
    }

    #[test]
    fn reads_hec_error_answers() {
        assert_eq!(
            error_text(br#"{"text":"Invalid data format","code":6,"invalid-event-number":2}"#)
                .as_deref(),
            Some("Invalid data format (code 6)")
        );
        assert_eq!(error_text(b"<html>"), None);
    }

    /// Phishing records carry their kind's `sourcetype`; the raw object is the `event`.
    #[tokio::test]
    async fn phishing_records_carry_their_kinds_sourcetype() {
        let sink = RecordingSink::spawn().await.unwrap();
        let text = r#"{"recipient_id":7,"pst_id":1,"template":{"name":"A \u0026 B"}}"#;
        let mut batch = vec![event(
            r#"{"id":"x","occurred_date":"2022-08-09T10:05:13.890Z"}"#,
        )];
        batch[0].json = serde_json::value::RawValue::from_string(text.into()).unwrap();
        for kind in [SOURCETYPE_PHISHING_TEST, SOURCETYPE_PHISHING_RECIPIENT] {
            let mut meta = meta();
            meta.sourcetype = Some(kind);
            splunk(sink.url())
                .send(&meta, &batch, deadline())
                .await
                .unwrap();
        }
        let sourcetypes: Vec<Value> = sink
            .requests()
            .iter()
            .flat_map(|r| {
                serde_json::Deserializer::from_slice(&r.body)
                    .into_iter::<Value>()
                    .map(|e| e.unwrap()["sourcetype"].clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            sourcetypes,
            ["knowbe4:phishing:test", "knowbe4:phishing:recipient"]
        );
        assert_eq!(sink.raw_events()[0], text, "the object as KnowBe4 sent it");
    }

    #[tokio::test]
    async fn envelopes_carry_time_source_and_the_verbatim_event() {
        let sink = RecordingSink::spawn().await.unwrap();
        let text = r#"{"id":"s-1", "occurred_date":"2022-08-09T10:05:13.890Z","n":1.0E2}"#;
        let batch = vec![event(text), events(1, 10).remove(0)];
        let report = splunk(sink.url())
            .send(&meta(), &batch, deadline())
            .await
            .unwrap();
        assert_eq!(report.events, 2);

        let requests = sink.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert!(request.path.ends_with(EVENT_PATH), "{}", request.path);
        assert_eq!(
            request.header("authorization"),
            Some(format!("Splunk {TOKEN}").as_str())
        );
        assert_eq!(request.header("content-encoding"), Some("gzip"));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.response, r#"{"text":"Success","code":0}"#);

        let envelopes: Vec<Value> = serde_json::Deserializer::from_slice(&request.body)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(envelopes.len(), 2);
        let first = &envelopes[0];
        assert!((first["time"].as_f64().unwrap() - 1_660_039_513.89).abs() < 1e-3);
        assert_eq!(first["host"], HOST);
        assert_eq!(first["source"], "kb4 \"prod\"");
        assert_eq!(first["sourcetype"], SOURCETYPE);
        assert_eq!(first["fields"], serde_json::json!({"env": "prod"}));
        assert_eq!(first["event"]["id"], "s-1");
        // The event's text is embedded as is, number formatting included.
        assert_eq!(sink.raw_events()[0], text);
        assert_eq!(sink.event_ids(), ["s-1", "e-0"]);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn an_existing_event_path_is_used_as_is() {
        let sink = RecordingSink::spawn().await.unwrap();
        let url = format!("{}{EVENT_PATH}", sink.url());
        splunk(url)
            .send(&SourceMeta::default(), &events(1, 10), deadline())
            .await
            .unwrap();
        let path = &sink.requests()[0].path;
        assert!(path.ends_with(EVENT_PATH));
        assert_eq!(path.matches("/services/").count(), 1);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn bad_data_is_isolated_and_the_rest_delivered() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.reject_events_with_id("e-5");
        let batch = events(8, 10);
        let err = splunk(sink.url())
            .send(&meta(), &batch, deadline())
            .await
            .unwrap_err();
        match &err {
            Error::Destination { message, status } => {
                assert_eq!(*status, Some(400));
                assert!(message.contains("e-5"), "{message}");
                assert!(message.contains("1 of 8"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Every other event arrived exactly once, in order; the bad one never did.
        assert_eq!(
            sink.event_ids(),
            ["e-0", "e-1", "e-2", "e-3", "e-4", "e-6", "e-7"]
        );
        // 8 -> 4 ok + 4 rejected -> 2 rejected + 2 ok -> 1 ok + 1 rejected: never the same
        // batch twice.
        let statuses: Vec<u16> = sink.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [400, 200, 400, 400, 200, 400, 200]);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn a_rejected_token_is_a_configuration_error() {
        let sink = RecordingSink::spawn().await.unwrap();
        sink.fail_next(403, 1);
        let err = splunk(sink.url())
            .send(&meta(), &events(2, 10), deadline())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::ThirdPartyConfig {
                system: "destination",
                status: Some(403),
                ..
            }
        ));
        assert!(!format!("{err} {err:?}").contains(TOKEN));
        assert_eq!(sink.requests().len(), 1);
        sink.shutdown().await;
    }
}
