//! Newline-delimited JSON bodies, shared by Sumo Logic, the generic NDJSON endpoint and
//! stdout, plus the generic endpoint's headers.
//!
//! Each event is written as the exact JSON text KnowBe4 sent, followed by `\n`. The one
//! exception: a raw event that itself contains CR or LF (possible only as insignificant
//! whitespace, since JSON strings cannot hold raw control characters) has them replaced
//! by spaces, so that one event stays one line and remains the same JSON value.

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};

use crate::domain::event::RawEvent;

/// Appends one event as one NDJSON line to `out`.
pub(crate) fn write_line(event: &RawEvent, out: &mut Vec<u8>) {
    let json = event.as_json().as_bytes();
    let start = out.len();
    out.extend_from_slice(json);
    // Rare slow path: pretty-printed input would otherwise split one event over lines.
    if json.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        for byte in &mut out[start..] {
            if matches!(byte, b'\n' | b'\r') {
                *byte = b' ';
            }
        }
    }
    out.push(b'\n');
}

/// The size in bytes of `event` as an NDJSON line.
pub(crate) fn line_len(event: &RawEvent) -> usize {
    event.as_json().len() + 1
}

/// Headers of the generic NDJSON destination: the content type, and the bearer token
/// (marked sensitive so no `Debug` of the request prints it) when one is configured.
pub(crate) fn headers(authorization: Option<&HeaderValue>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if let Some(value) = authorization {
        headers.insert(AUTHORIZATION, value.clone());
    }
    headers
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::SecretString;

    use super::*;
    use crate::sink::tests::{event, events, fast};
    use crate::sink::{Destination, DestinationConfig, Format, SourceMeta};
    use crate::testkit::recording_sink::RecordingSink;

    #[test]
    fn one_event_per_line_even_when_the_input_was_pretty_printed() {
        let compact = event(r#"{"id":"a","occurred_date":"2022-08-09T10:05:13.890Z"}"#);
        let pretty =
            event("{\r\n  \"id\": \"b\",\n  \"occurred_date\": \"2022-08-09T10:05:13Z\"\n}");
        let mut out = Vec::new();
        write_line(&compact, &mut out);
        write_line(&pretty, &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], compact.as_json());
        let value: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(value["id"], "b");
        assert_eq!(line_len(&compact), lines[0].len() + 1);
    }

    #[tokio::test]
    async fn posts_gzip_ndjson_with_the_bearer_token() {
        let sink = RecordingSink::spawn().await.unwrap();
        let config = DestinationConfig {
            format: Format::Ndjson,
            url: Some(SecretString::from(sink.url())),
            token: Some(SecretString::from("bearer-secret-42")),
        };
        let destination = fast(Destination::new(config, reqwest::Client::new()).unwrap());
        let batch = events(20, 100);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let report = destination
            .send(&SourceMeta::default(), &batch, deadline)
            .await
            .unwrap();
        assert_eq!(report.events, 20);
        let requests = sink.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            requests[0].header("content-type"),
            Some("application/x-ndjson")
        );
        assert_eq!(requests[0].header("content-encoding"), Some("gzip"));
        assert_eq!(
            requests[0].header("authorization"),
            Some("Bearer bearer-secret-42")
        );
        let sent: Vec<&str> = batch.iter().map(RawEvent::as_json).collect();
        assert_eq!(sink.raw_events(), sent);
        sink.shutdown().await;
    }
}
