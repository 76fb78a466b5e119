//! Issue 10, finding 5: per-source secrets live under the stack's own prefix, are only
//! written when tagged as the source's, and are deleted with a recovery window.

use std::path::Path;
use std::sync::Arc;

use knowbe4_source::app::App;
use knowbe4_source::run::{Outcome, collect_source};
use knowbe4_source::store::secrets_manager::SecretsManagerVault;

use crate::helpers::*;

/// `SECRET_PREFIX` as the template sets it, for a stack named `stack`.
fn template_secret_prefix(stack: &str) -> String {
    let template =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/template.yaml"))
            .unwrap();
    let value = template
        .lines()
        .find_map(|l| l.trim().strip_prefix("SECRET_PREFIX:"))
        .expect("SECRET_PREFIX in the template")
        .trim();
    value
        .trim_start_matches("!Sub ")
        .replace("${AWS::StackName}", stack)
}

/// With the documented stack name, a source id equal to the stack's own secret's name
/// (`forward-url`) neither overwrites nor deletes it; a secret under the prefix that is
/// not the source's is left alone; a deleted source's secret can be restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_secrets_never_touch_the_stacks_or_foreign_secrets() {
    let (key, h) = harness_with_canary_key(5).await;
    let stack = "knowbe4-source";
    let stack_secret = format!("{stack}/forward-url");
    let stack_value = canary("stack-destination");
    // Re-runs against the same moto start clean.
    let _ = h
        .secrets
        .delete_secret()
        .secret_id(&stack_secret)
        .force_delete_without_recovery(true)
        .send()
        .await;
    h.secrets
        .create_secret()
        .name(&stack_secret)
        .secret_string(&stack_value)
        .send()
        .await
        .unwrap();
    let prefix = template_secret_prefix(stack);
    let app = App::new(
        Arc::clone(&h.app.store),
        knowbe4_source::app::Vault::SecretsManager(SecretsManagerVault::new(
            h.secrets.clone(),
            prefix.clone(),
        )),
        knowbe4_source::app::knowbe4_http_client().unwrap(),
        h.app.default_destination.clone(),
        test_settings(&prefix),
    );
    let stack_secret_value = || async {
        h.secrets
            .get_secret_value()
            .secret_id(&stack_secret)
            .send()
            .await
            .map(|v| v.secret_string().unwrap_or_default().to_string())
    };
    let created = app
        .create(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("forward-url".into()),
        )
        .await;
    assert_eq!(stack_secret_value().await.unwrap(), stack_value);
    if created.is_ok() {
        app.delete("forward-url").await.unwrap();
    }
    assert_eq!(
        stack_secret_value()
            .await
            .expect("the stack's secret survives"),
        stack_value
    );

    // A secret under the prefix that is not this source's (planted, or another
    // deployment's): create refuses and leaves it as it was.
    let planted = format!("{prefix}{}", unique("planted"));
    let planted_id = planted.trim_start_matches(&prefix).to_string();
    h.secrets
        .create_secret()
        .name(&planted)
        .secret_string("someone else's")
        .send()
        .await
        .unwrap();
    let err = app
        .create(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some(planted_id.clone()),
        )
        .await
        .expect_err("not this source's secret");
    assert!(err.to_string().contains("not tagged"), "{err}");
    let value = h
        .secrets
        .get_secret_value()
        .secret_id(&planted)
        .send()
        .await
        .unwrap();
    assert_eq!(value.secret_string(), Some("someone else's"));
    assert!(app.store.get_source(&planted_id).await.unwrap().is_none());

    // A deleted source's secret waits out a recovery window; re-creating the id restores
    // it with the new value.
    let id = unique("recoverable");
    app.create(
        source_json(&h.sim.base_url(), &key, serde_json::json!({})),
        Some(id.clone()),
    )
    .await
    .unwrap();
    app.delete(&id).await.unwrap();
    let described = h
        .secrets
        .describe_secret()
        .secret_id(format!("{prefix}{id}"))
        .send()
        .await
        .expect("the secret still exists, scheduled for deletion");
    assert!(described.deleted_date().is_some(), "{described:?}");
    app.create(
        source_json(&h.sim.base_url(), &key, serde_json::json!({})),
        Some(id.clone()),
    )
    .await
    .unwrap();
    let report = collect_source(app.run_context(), &id, deadline(30)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
}
