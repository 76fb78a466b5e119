//! Sumo Logic HTTP Logs source: NDJSON bodies with the `X-Sumo-*` metadata headers.
//!
//! The body is the same NDJSON as the generic destination (see [`super::ndjson`]); what
//! is Sumo-specific is the metadata:
//! - `X-Sumo-Name` = the source name (becomes `_sourceName`);
//! - `X-Sumo-Category` = the source category, when set (`_sourceCategory`);
//! - `X-Sumo-Fields` = `k1=v1,k2=v2` from the user's fields; when Cloud SIEM forwarding
//!   is on, `_siemForward=true` and `_siemparser=/Parsers/System/KnowBe4/KnowBe4 KMSAT`
//!   are set too (replacing user values for those two keys, which must be exact).
//!
//! Header sanitising: a header value cannot carry CR, LF or other control characters, so
//! those are removed from every value (this also rules out header injection). Inside
//! `X-Sumo-Fields`, `,` and `=` are the separators, so they are removed from field keys
//! and values as well; a field whose key is empty afterwards is skipped. Non-ASCII text
//! is sent as UTF-8 bytes, which HTTP allows in values.

use std::borrow::Cow;
use std::collections::BTreeMap;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::SourceMeta;

/// The Cloud SIEM parser for KnowBe4 KMSAT events.
pub const SIEM_PARSER: &str = "/Parsers/System/KnowBe4/KnowBe4 KMSAT";

const NAME: HeaderName = HeaderName::from_static("x-sumo-name");
const CATEGORY: HeaderName = HeaderName::from_static("x-sumo-category");
const FIELDS: HeaderName = HeaderName::from_static("x-sumo-fields");

/// The metadata headers for one `send`.
pub(crate) fn headers(meta: &SourceMeta) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(value) = header_value(&clean_text(&meta.name)) {
        headers.insert(NAME, value);
    }
    if let Some(category) = &meta.category
        && let Some(value) = header_value(&clean_text(category))
    {
        headers.insert(CATEGORY, value);
    }
    if let Some(value) = header_value(&fields_header(meta)) {
        headers.insert(FIELDS, value);
    }
    headers
}

/// The `X-Sumo-Fields` value: sanitised `key=value` pairs joined by `,`, in key order.
pub(crate) fn fields_header(meta: &SourceMeta) -> String {
    let mut fields: BTreeMap<Cow<'_, str>, Cow<'_, str>> = BTreeMap::new();
    for (key, value) in &meta.fields {
        let key = clean_field(key);
        if !key.is_empty() {
            fields.insert(key, clean_field(value));
        }
    }
    if meta.siem_forward {
        fields.insert(Cow::Borrowed("_siemForward"), Cow::Borrowed("true"));
        fields.insert(Cow::Borrowed("_siemparser"), Cow::Borrowed(SIEM_PARSER));
    }
    let mut header = String::new();
    for (key, value) in &fields {
        if !header.is_empty() {
            header.push(',');
        }
        header.push_str(key);
        header.push('=');
        header.push_str(value);
    }
    header
}

/// A header value, or `None` for an empty one (Sumo would ignore it anyway).
fn header_value(text: &str) -> Option<HeaderValue> {
    if text.is_empty() {
        return None;
    }
    // Cannot fail once control characters are gone; skip the header rather than panic.
    HeaderValue::from_str(text).ok()
}

/// Removes control characters (CR, LF, TAB, DEL, ...) and surrounding spaces.
fn clean_text(text: &str) -> Cow<'_, str> {
    clean(text, |c| c.is_control())
}

/// Like [`clean_text`], and also removes the `X-Sumo-Fields` separators `,` and `=`.
fn clean_field(text: &str) -> Cow<'_, str> {
    clean(text, |c| c.is_control() || c == ',' || c == '=')
}

fn clean(text: &str, drop: impl Fn(char) -> bool) -> Cow<'_, str> {
    let trimmed = text.trim();
    if trimmed.chars().any(&drop) {
        Cow::Owned(
            trimmed
                .chars()
                .filter(|c| !drop(*c))
                .collect::<String>()
                .trim()
                .to_string(),
        )
    } else {
        Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Duration;

    use secrecy::SecretString;

    use super::*;
    use crate::domain::event::RawEvent;
    use crate::sink::tests::{event, events, fast};
    use crate::sink::{Destination, DestinationConfig, Format, MAX_BATCH_BYTES};
    use crate::testkit::recording_sink::RecordingSink;

    fn sumo(sink: &RecordingSink) -> Destination {
        let config = DestinationConfig {
            format: Format::Sumo,
            url: Some(SecretString::from(sink.url())),
            token: None,
        };
        fast(Destination::new(config, reqwest::Client::new()).unwrap())
    }

    fn meta(siem_forward: bool) -> SourceMeta {
        SourceMeta {
            name: "KnowBe4\r\nX-Injected: 1".into(),
            category: Some("security/knowbe4".into()),
            fields: BTreeMap::from([
                ("team".to_string(), "sec ops".to_string()),
                ("bad,key=".to_string(), "v=1,\r\n2".to_string()),
                ("=,".to_string(), "dropped".to_string()),
            ]),
            siem_forward,
            sourcetype: None,
        }
    }

    fn deadline() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn fields_are_sanitised_and_siem_forwarding_adds_the_parser() {
        assert_eq!(fields_header(&meta(false)), "badkey=v12,team=sec ops");
        assert_eq!(
            fields_header(&meta(true)),
            "_siemForward=true,_siemparser=/Parsers/System/KnowBe4/KnowBe4 KMSAT,\
             badkey=v12,team=sec ops"
        );
        let mut forced = meta(true);
        forced.fields.insert("_siemForward".into(), "false".into());
        assert!(fields_header(&forced).starts_with("_siemForward=true,"));
        assert_eq!(fields_header(&SourceMeta::default()), "");
        assert!(headers(&SourceMeta::default()).is_empty());
    }

    #[tokio::test]
    async fn sends_gzip_ndjson_with_the_sumo_headers() {
        let sink = RecordingSink::spawn().await.unwrap();
        let batch = events(3, 50);
        let report = sumo(&sink)
            .send(&meta(true), &batch, deadline())
            .await
            .unwrap();
        assert_eq!((report.events, report.requests, report.retries), (3, 1, 0));

        let requests = sink.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.status, 200);
        assert!(request.path.starts_with("/receiver/"));
        assert_eq!(request.header("content-encoding"), Some("gzip"));
        assert_eq!(request.header("x-sumo-name"), Some("KnowBe4X-Injected: 1"));
        assert_eq!(request.header("x-injected"), None);
        assert_eq!(request.header("x-sumo-category"), Some("security/knowbe4"));
        let fields = request.header("x-sumo-fields").unwrap();
        assert!(fields.contains("_siemForward=true"), "{fields}");
        assert!(fields.contains("_siemparser=/Parsers/System/KnowBe4/KnowBe4 KMSAT"));
        assert!(fields.contains("team=sec ops"));

        let expected: String = batch.iter().map(|e| format!("{}\n", e.as_json())).collect();
        assert_eq!(request.body, expected.as_bytes());
        assert_eq!(request.body_len, expected.len());
        assert_eq!(report.bytes, expected.len());
        sink.shutdown().await;
    }

    #[test]
    fn the_body_is_really_gzip() {
        // The recording sink gunzips transparently; check the wire format directly once.
        let batch = events(2, 10);
        let mut body = Vec::new();
        for event in &batch {
            super::super::ndjson::write_line(event, &mut body);
        }
        let compressed = crate::sink::http::gzip(&body).unwrap();
        assert_eq!(&compressed[..2], &[0x1f, 0x8b]);
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, body);
    }

    #[tokio::test]
    async fn batches_stay_under_one_megabyte() {
        let sink = RecordingSink::spawn().await.unwrap();
        let batch = events(5_000, 1_000);
        let total: usize = batch.iter().map(|e| e.as_json().len() + 1).sum();
        let report = sumo(&sink)
            .send(&meta(false), &batch, deadline())
            .await
            .unwrap();
        assert_eq!(report.events, 5_000);
        assert_eq!(report.bytes, total);
        let requests = sink.requests();
        assert!(requests.len() >= total.div_ceil(MAX_BATCH_BYTES));
        assert_eq!(report.requests, requests.len());
        for request in &requests {
            assert!(request.body_len <= MAX_BATCH_BYTES, "{}", request.body_len);
            // Batches are filled, not cut short: each but the last is close to the limit.
        }
        for request in &requests[..requests.len() - 1] {
            assert!(request.body_len > MAX_BATCH_BYTES - 2_000);
        }
        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
        assert_eq!(sink.event_ids(), ids);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn an_event_over_the_batch_limit_goes_alone() {
        let sink = RecordingSink::spawn().await.unwrap();
        let mut batch = events(3, 10);
        let big = format!(
            r#"{{"id":"big","occurred_date":"2022-08-09T10:05:13Z","pad":"{}"}}"#,
            "x".repeat(MAX_BATCH_BYTES + 10)
        );
        batch.insert(1, event(&big));
        let report = sumo(&sink)
            .send(&meta(false), &batch, deadline())
            .await
            .unwrap();
        assert_eq!(report.events, 4);
        let sizes: Vec<usize> = sink.requests().iter().map(|r| r.event_count).collect();
        assert_eq!(sizes, vec![1, 1, 2]);
        assert_eq!(sink.event_ids(), ["e-0", "big", "e-1", "e-2"]);
        sink.shutdown().await;
    }

    #[tokio::test]
    async fn events_are_forwarded_byte_identical() {
        let sink = RecordingSink::spawn().await.unwrap();
        let odd = [
            r#"{"occurred_date":"2022-08-09T10:05:13.890Z", "id" : "odd-1","n":1.50E+3,"u":"\u00e9\ud83d\ude00","z":null}"#,
            r#"{"id":"odd-2","occurred_date":"2022-08-09T10:05:14Z","s":"caf\u00e9 ☕","k":{"b":[ ],"a":{}}}"#,
        ];
        let batch: Vec<RawEvent> = odd.iter().map(|text| event(text)).collect();
        sumo(&sink)
            .send(&meta(false), &batch, deadline())
            .await
            .unwrap();
        assert_eq!(sink.raw_events(), odd);
        sink.shutdown().await;
    }
}
