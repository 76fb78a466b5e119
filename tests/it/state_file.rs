//! Issue 10, finding 7: the local state file (which holds the secrets in local mode) is
//! private from its creation and written through an unguessable, exclusively created
//! temp file.

use std::path::Path;

use crate::helpers::*;

/// The state directory is created 0700 and the file 0600; a symlink planted at the temp
/// name the old code used (`state.json.tmp-<pid>`) receives nothing.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_file_is_private_and_planted_links_receive_nothing() {
    use std::os::unix::fs::PermissionsExt;

    let key = canary("key");
    let sink = knowbe4_source::testkit::recording_sink::RecordingSink::spawn()
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    // A fresh directory: created by the store.
    let fresh = root.path().join("fresh");
    let app = local_app(&fresh, &sink);
    app.create(
        source_json("https://training.knowbe4.com", &key, serde_json::json!({})),
        Some("a".into()),
    )
    .await
    .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fresh), 0o700, "state directory");
    assert_eq!(mode(&fresh.join("state.json")), 0o600, "state file");

    // An existing directory with links planted at predictable temp names.
    let planted = root.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    let victim = root.path().join("victim");
    std::fs::write(&victim, "").unwrap();
    for suffix in [
        format!(".tmp-{}", std::process::id()),
        ".tmp".to_string(),
        ".tmp-0".to_string(),
    ] {
        std::os::unix::fs::symlink(&victim, planted.join(format!("state.json{suffix}"))).unwrap();
    }
    let app = local_app(&planted, &sink);
    app.create(
        source_json("https://training.knowbe4.com", &key, serde_json::json!({})),
        Some("b".into()),
    )
    .await
    .unwrap();
    let stolen = std::fs::read_to_string(&victim).unwrap();
    assert!(
        stolen.is_empty(),
        "the planted link received {} bytes",
        stolen.len()
    );
    let state = planted.join("state.json");
    assert!(
        !std::fs::symlink_metadata(&state)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(mode(&state), 0o600);
    assert!(std::fs::read_to_string(&state).unwrap().contains(&key));
}
