//! The recorded `GET /events` pages of the public record, served verbatim on loopback:
//! what the client parses from them and what reaches the destination, byte for byte.

use std::time::Duration;

use knowbe4_source::domain::checkpoint::{Checkpoint, Step, Walker};
use knowbe4_source::domain::event::EventTime;
use knowbe4_source::knowbe4::KnowBe4Client;
use knowbe4_source::sink::{Destination, DestinationConfig, Format, SourceMeta};
use knowbe4_source::testkit::recording_sink::RecordingSink;
use secrecy::SecretString;
use serde_json::value::RawValue;

use crate::helpers::deadline;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/knowbe4-public");

/// Serves `body` for every request, as the recording's server answered.
async fn serve(body: &'static [u8]) -> String {
    let app = axum::Router::new().fallback(move || async move {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )],
            body,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// Each event object's text exactly as it appears in the recorded body.
fn recorded_events(body: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        data: Vec<&'a RawValue>,
    }
    let parsed: Body<'_> = serde_json::from_str(body).unwrap();
    parsed
        .data
        .iter()
        .map(|raw| raw.get().to_string())
        .collect()
}

async fn check(file: &str, expected_ids: &[&str]) {
    let body: &'static str = Box::leak(
        std::fs::read_to_string(format!("{FIXTURES}/{file}"))
            .unwrap()
            .into_boxed_str(),
    );
    let base = serve(body.as_bytes()).await;
    let client = KnowBe4Client::new(
        reqwest::Client::new(),
        &base,
        SecretString::from("recorded-key"),
        "recorded",
        Duration::from_secs(5),
    );
    let page = client.events_page(1).await.expect("a recorded page parses");
    // What the recording says, and what it cannot say (count per page or per list).
    assert_eq!(page.limit, Some(50), "{file}");
    assert_eq!(page.more, Some(false), "{file}");
    assert_eq!(page.total_pages, Some(1), "{file}");
    assert_eq!(page.count, Some(expected_ids.len() as u64), "{file}");
    assert!(page.undated.is_empty());
    let ids: Vec<&str> = page.events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, expected_ids, "{file}");

    // The walk takes the whole page (a short page with `next_page: null` ends the list).
    let newest = page.events[0].occurred;
    let mut walker = Walker::new(
        Checkpoint::default(),
        EventTime(newest.0 + 3_600_000_000_000),
        30 * 86_400,
        3_600,
    );
    assert_eq!(walker.next_step(), Step::Fetch(1));
    let events = walker.on_page(1, page).unwrap();
    assert_eq!(walker.next_step(), Step::Done);
    assert_eq!(walker.page_size(), 50);

    let sink = RecordingSink::spawn().await.unwrap();
    let destination = Destination::new(
        DestinationConfig {
            format: Format::Sumo,
            url: Some(SecretString::from(sink.url())),
            token: None,
        },
        reqwest::Client::new(),
    )
    .unwrap();
    destination
        .send(&SourceMeta::default(), &events, deadline(30))
        .await
        .unwrap();
    // Byte for byte, except that line breaks inside a pretty-printed object become
    // spaces so one event stays one line (the same JSON value).
    let expected: Vec<String> = recorded_events(body)
        .into_iter()
        .map(|text| text.replace(['\n', '\r'], " "))
        .collect();
    assert_eq!(sink.raw_events(), expected, "{file}");
}

#[tokio::test]
async fn recorded_events_pages_are_parsed_and_forwarded_byte_for_byte() {
    check(
        "user_events_response.json",
        &[
            "513f46ac-c3d7-4682-ad0d-0c149c0728a2",
            "b7e087e6-d537-40fc-8b91-4f28ff0160b4",
        ],
    )
    .await;
    let mock: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURES}/mock_event.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<String> = mock["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    check("mock_event.json", &ids).await;
}

/// The recorded Reporting API answers of a real EU tenant (JupiterOne's Polly HAR): each
/// `(path and query, status, content type, body)` as received.
fn har_entries(file: &str) -> Vec<(String, u16, String, String)> {
    let har: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/{file}")).unwrap())
            .unwrap();
    har["log"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let url = reqwest::Url::parse(e["request"]["url"].as_str().unwrap()).unwrap();
            let content_type = e["response"]["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["name"] == "content-type")
                .map(|h| h["value"].as_str().unwrap().to_string())
                .unwrap_or_default();
            (
                format!("{}?{}", url.path(), url.query().unwrap_or("")),
                e["response"]["status"].as_u64().unwrap() as u16,
                content_type,
                e["response"]["content"]["text"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

/// Serves one recorded list at `/v1/phishing/security_tests`: the recorded answer for
/// `recorded_path` with the same `page` and `per_page`, verbatim.
async fn serve_recorded_list(
    entries: Vec<(String, u16, String, String)>,
    recorded_path: &'static str,
) -> String {
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let entries = entries.clone();
        async move {
            let wanted = format!("{recorded_path}?{}", uri.query().unwrap_or(""));
            match entries.iter().find(|(path, ..)| *path == wanted) {
                Some((_, status, content_type, body)) => (
                    axum::http::StatusCode::from_u16(*status).unwrap(),
                    [(axum::http::header::CONTENT_TYPE, content_type.clone())],
                    body.clone(),
                ),
                None => (
                    axum::http::StatusCode::NOT_FOUND,
                    [(axum::http::header::CONTENT_TYPE, "text/plain".to_string())],
                    format!("not recorded: {wanted}"),
                ),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// The Reporting client reads the recorded security-test lists byte for byte: each
/// object's text as sent (`\u0026` kept), the errored test with `started_at: null` kept,
/// and the recorded empty page 2 ends the list.
#[tokio::test]
async fn recorded_security_test_lists_are_read_byte_for_byte() {
    use knowbe4_source::knowbe4::reporting::{REPORTING_PER_PAGE, ReportingClient};
    let entries = har_entries("fetchPhishingSecurityTestCollectData_3507336865.recording.har");
    for (recorded_path, errored) in [
        ("/v1/phishing/campaigns/229584/security_tests", false),
        ("/v1/phishing/campaigns/229823/security_tests", true),
    ] {
        let body = entries
            .iter()
            .find(|(path, ..)| path.starts_with(recorded_path) && path.contains("page=1&"))
            .map(|(.., body)| body.clone())
            .unwrap();
        let base = serve_recorded_list(entries.clone(), recorded_path).await;
        let client = ReportingClient::new(
            reqwest::Client::new(),
            &base,
            SecretString::from("recorded-token"),
            "recorded",
            Duration::from_secs(5),
        );
        let first = client
            .security_tests_page(1, REPORTING_PER_PAGE)
            .await
            .expect("page 1 parses");
        let texts: Vec<&str> = first.items.iter().map(|i| i.get()).collect();
        let recorded: Vec<&RawValue> = serde_json::from_str(&body).unwrap();
        let recorded: Vec<&str> = recorded.iter().map(|r| r.get()).collect();
        assert_eq!(texts, recorded, "{recorded_path}");
        assert!(!first.ends_list());
        if errored {
            assert!(body.contains("\\u0026"), "the recording escapes &");
            assert!(texts.iter().any(|t| t.contains("\\u0026")), "kept as sent");
            let tests: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
            assert!(
                tests
                    .iter()
                    .any(|t| t["status"] == "Error" && t["started_at"].is_null()),
                "the errored test is in the recording"
            );
            assert_eq!(first.items.len(), tests.len(), "nothing dropped");
        }
        let second = client
            .security_tests_page(2, REPORTING_PER_PAGE)
            .await
            .expect("page 2 parses");
        assert!(second.ends_list(), "the recorded empty page ends the list");
    }
}
