//! Issue 10, finding 9: a source's `fields` are bounded in count, name, value and
//! header size, with errors naming the field.

use knowbe4_source::error::Error;

use crate::helpers::*;

/// 20,000 fields (2.4 MB of state), 31 fields, an oversized value or header: refused,
/// naming the field, and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_fields_are_bounded() {
    let (key, h) = harness_with_canary_key(5).await;
    let many = |n: usize, value: &str| -> serde_json::Value {
        (0..n)
            .map(|i| (format!("field{i}"), serde_json::Value::from(value)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    for (fields, field) in [
        (many(20_000, "v"), "source.config.fields"),
        (many(31, "v"), "source.config.fields"),
        (many(30, &"v".repeat(200)), "source.config.fields"),
        (
            serde_json::json!({"team": "v".repeat(257)}),
            "source.config.fields.team",
        ),
    ] {
        let err = h
            .app
            .create(
                source_json(
                    &h.sim.base_url(),
                    &key,
                    serde_json::json!({ "fields": fields }),
                ),
                None,
            )
            .await
            .expect_err("too many or too long fields");
        assert!(
            matches!(&err, Error::InvalidConfig { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }
    assert!(h.app.store.list_sources().await.unwrap().is_empty());
    h.app
        .create(
            source_json(
                &h.sim.base_url(),
                &key,
                serde_json::json!({"fields": many(30, "value")}),
            ),
            None,
        )
        .await
        .expect("30 short fields are fine");
}
