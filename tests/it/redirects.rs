//! Issue 10, finding 1: destinations and KnowBe4 follow no redirect. Destinations
//! answering 3xx are failed deliveries (the checkpoint stays) and the host a redirect
//! points at receives nothing, neither events nor the Sumo URL in `Referer`.

use crate::helpers::canary;
use crate::loopback::*;

/// A Sumo URL answering `307` to another host: nothing goes there (neither the events
/// nor the URL, a secret, in `Referer`), the run fails and the checkpoint stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sumo_destination_that_redirects_gets_nothing_moved() {
    let key = canary("key");
    let sim = sim(&key, 40).await;
    let elsewhere = Server::ok().await;
    let token = canary("sumo-token");
    let sumo = Server::redirecting(307, format!("{}/stolen", elsewhere.base)).await;
    let sumo_url = format!("{}/receiver/v1/http/{token}", sumo.base);
    let cli = Cli::new(
        true,
        &[("FORWARD_FORMAT", "sumo"), ("FORWARD_URL", &sumo_url)],
    );
    cli.create_ok("s", &sim.base_url(), &key, serde_json::json!({}))
        .await;
    let ran = cli.run(&["collect", "--source", "s"]).await;
    assert_failed_and_unmoved(&cli, "s", &ran, "FirstPartyGenericError").await;
    let tried = sumo.seen();
    assert!(
        tried[0].method == "POST" && !tried[0].body.is_empty(),
        "{tried:?}"
    );
    assert!(tried[0].headers.get("referer").is_none(), "{tried:?}");
    let stolen = elsewhere.seen();
    assert!(stolen.is_empty(), "the redirect was followed: {stolen:?}");
    for text in [&ran.stdout, &ran.stderr] {
        assert!(!text.contains(&token) && !text.contains(&key), "{ran:?}");
    }
}

/// A Splunk HEC answering `302`: reqwest would turn the POST into a GET without a body
/// that "succeeds". Not followed: the run fails, the checkpoint stays, the other host
/// sees nothing (nor the HEC token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splunk_hec_that_redirects_gets_nothing_moved() {
    let key = canary("key");
    let sim = sim(&key, 40).await;
    let elsewhere = Server::ok().await;
    let hec_token = canary("hec");
    let hec =
        Server::redirecting(302, format!("{}/services/collector/event", elsewhere.base)).await;
    let cli = Cli::new(
        true,
        &[
            ("FORWARD_FORMAT", "splunk-hec"),
            ("FORWARD_URL", &hec.base),
            ("FORWARD_TOKEN", &hec_token),
        ],
    );
    cli.create_ok("h", &sim.base_url(), &key, serde_json::json!({}))
        .await;
    let ran = cli.run(&["collect", "--source", "h"]).await;
    assert_failed_and_unmoved(&cli, "h", &ran, "FirstPartyGenericError").await;
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    for text in [&ran.stdout, &ran.stderr] {
        assert!(
            !text.contains(&hec_token) && !text.contains(&key),
            "{ran:?}"
        );
    }
}

/// A KnowBe4 base URL answering `302` to another host: the request is not repeated
/// there (with or without the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowbe4_redirects_are_not_followed() {
    let key = canary("key");
    let elsewhere = Server::ok().await;
    let knowbe4 = Server::redirecting(302, format!("{}/events", elsewhere.base)).await;
    let sink = Server::ok().await;
    let sink_url = format!("{}/receiver", sink.base);
    let cli = Cli::new(
        true,
        &[("FORWARD_FORMAT", "ndjson"), ("FORWARD_URL", &sink_url)],
    );
    cli.create_ok("k", &knowbe4.base, &key, serde_json::json!({}))
        .await;
    let ran = cli.run(&["collect", "--source", "k"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        knowbe4.seen()[0].uri.starts_with("/events"),
        "{:?}",
        knowbe4.seen()
    );
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    assert!(sink.seen().is_empty(), "{:?}", sink.seen());
}
