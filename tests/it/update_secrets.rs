//! Issue 10, finding 4: on `update`, a stored secret is kept only while the endpoint it
//! authenticates to is unchanged.

use knowbe4_source::error::Error;
use knowbe4_source::run::{Outcome, collect_source};

use crate::helpers::*;
use crate::loopback::*;

/// Updating `baseURL` without `apiKey`, or a destination URL without its token, does not
/// send the stored secret to the new endpoint: the update is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_does_not_carry_stored_secrets_to_a_new_endpoint() {
    let (key, h) = harness_with_canary_key(20).await;
    let bearer = canary("bearer");
    let new_host = Server::ok().await;
    let old_destination = Server::ok().await;
    let new_destination = Server::ok().await;
    let old_url = format!("{}/in", old_destination.base);
    let id = h
        .app
        .create(
            source_json(
                &h.sim.base_url(),
                &key,
                serde_json::json!({"destination": {
                    "format": "ndjson", "url": old_url, "token": bearer}}),
            ),
            Some("moving".into()),
        )
        .await
        .unwrap();

    let err = h
        .app
        .update(
            &id,
            source_json(
                &new_host.base,
                "****",
                serde_json::json!({"destination": {"format": "ndjson", "url": old_url}}),
            ),
        )
        .await
        .expect_err("a new host needs the key again");
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "source.config.apiKey"),
        "{err}"
    );
    let err = h
        .app
        .update(
            &id,
            source_json(
                &h.sim.base_url(),
                "****",
                serde_json::json!({"destination": {
                    "format": "ndjson", "url": format!("{}/in", new_destination.base)}}),
            ),
        )
        .await
        .expect_err("a new destination needs its token again");
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "source.config.destination.token"),
        "{err}"
    );
    // Nothing changed: the next run goes where the secrets belong.
    let report = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert!(new_host.seen().is_empty(), "{:?}", new_host.seen());
    assert!(new_destination.seen().is_empty());
    assert!(!old_destination.seen().is_empty());
    // Same endpoints: the stored secrets are kept (a rename needs no secret).
    h.app
        .update(
            &id,
            source_json(
                &h.sim.base_url(),
                "****",
                serde_json::json!({"name": "renamed",
                    "destination": {"format": "ndjson", "url": old_url}}),
            ),
        )
        .await
        .unwrap();
    h.sim.add_events(5, 0);
    let report = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    let seen = old_destination.seen();
    let auth = seen.last().unwrap().headers.get("authorization").unwrap();
    assert_eq!(auth.to_str().unwrap(), format!("Bearer {bearer}"));
}
