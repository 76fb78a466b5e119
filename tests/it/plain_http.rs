//! Issue 10, finding 8: destinations need https; plain http only to loopback behind
//! `KNOWBE4_ALLOW_CUSTOM_BASE_URL=1`.

use crate::helpers::{canary, source_json};
use crate::loopback::*;

/// Plain-http destinations are refused unless loopback behind the switch: the
/// deployment's (`FORWARD_URL`) at start, a source's at create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_destinations_are_refused() {
    let loopback = Server::ok().await;
    let loopback_url = format!("{}/receiver", loopback.base);
    for (allow, url) in [
        (false, loopback_url.as_str()),
        (true, "http://192.0.2.1/receiver"),
    ] {
        let cli = Cli::new(allow, &[("FORWARD_FORMAT", "ndjson"), ("FORWARD_URL", url)]);
        let ran = cli.run(&["sources", "list"]).await;
        assert_eq!(ran.code, Some(2), "{url} (switch {allow}): {ran:?}");
        assert!(ran.stderr.contains("FORWARD_URL"), "{ran:?}");
    }
    let token = canary("bearer");
    for (allow, url) in [
        (false, loopback_url.as_str()),
        (true, "http://192.0.2.1/receiver"),
    ] {
        let cli = Cli::new(allow, &[("FORWARD_FORMAT", "stdout")]);
        let ran = cli
            .create(
                "p",
                &source_json(
                    "https://training.knowbe4.com",
                    "k",
                    serde_json::json!({"destination": {"format": "ndjson", "url": url, "token": token}}),
                ),
            )
            .await;
        assert_eq!(ran.code, Some(2), "{url} (switch {allow}): {ran:?}");
        assert!(
            ran.stderr.contains("source.config.destination.url"),
            "{ran:?}"
        );
        assert!(!ran.stderr.contains(&token), "{ran:?}");
    }
    assert!(loopback.seen().is_empty());
    // Loopback behind the switch, and https, are accepted.
    let cli = Cli::new(
        true,
        &[("FORWARD_FORMAT", "ndjson"), ("FORWARD_URL", &loopback_url)],
    );
    let ran = cli.run(&["sources", "list"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
}
