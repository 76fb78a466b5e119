//! The binary's command-line contract: `sources create`, `collect`, `status`, `health`,
//! in local mode (state file, no AWS), against the simulator and a recording sink.

use std::process::Command;

use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};

use crate::helpers::source_json;

struct Cli {
    dir: tempfile::TempDir,
    forward_url: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_knowbe4-source"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("STATE_TABLE")
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .env("STATE_FILE", self.dir.path().join("state.json"))
            .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
            .env("FORWARD_URL", &self.forward_url)
            .env("FORWARD_FORMAT", "ndjson")
            .env("RUST_LOG", "debug")
            .output()
            .expect("the binary runs")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_collect_status_through_the_binary() {
    let key = "cli-canary-key-99";
    let sim = Simulator::spawn(SimConfig {
        api_key: key.into(),
        events: 230,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let sink = RecordingSink::spawn().await.unwrap();
    let cli = Cli {
        dir: tempfile::tempdir().unwrap(),
        forward_url: sink.url(),
    };
    let file = cli.dir.path().join("source.json");
    std::fs::write(
        &file,
        source_json(&sim.base_url(), key, serde_json::json!({})).to_string(),
    )
    .unwrap();

    let out = cli.run(&[
        "sources",
        "create",
        "--file",
        file.to_str().unwrap(),
        "--id",
        "acme-kb4",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "acme-kb4");

    let out = cli.run(&["collect"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Nothing new: still a successful run.
    let again = cli.run(&["collect", "--source", "acme-kb4"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(sink.event_ids().len(), 230);

    let out = cli.run(&["status", "acme-kb4", "--json"]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status[0]["state"], "Collecting");
    assert_eq!(status[0]["forwarded_total"], 230);
    let human = cli.run(&["status", "acme-kb4"]);
    assert!(text(&human.stdout).contains("Collecting"));

    let out = cli.run(&["health", "acme-kb4", "--json"]);
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );

    // Debug logs of every command and the forwarded data never carry the key or the
    // destination's token.
    for output in [&out, &again, &human] {
        for stream in [&output.stdout, &output.stderr] {
            assert!(!text(stream).contains(key));
            assert!(!text(stream).contains(sink.token()));
        }
    }
    assert!(sink.raw_events().iter().all(|e| !e.contains(key)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_source_file_exits_non_zero_naming_the_field() {
    let sink = RecordingSink::spawn().await.unwrap();
    let cli = Cli {
        dir: tempfile::tempdir().unwrap(),
        forward_url: sink.url(),
    };
    let file = cli.dir.path().join("source.json");
    std::fs::write(
        &file,
        r#"{"source":{"config":{"name":"x","apiKey":"k","region":"MOON"}}}"#,
    )
    .unwrap();
    let out = cli.run(&["sources", "create", "--file", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("source.config.region"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !cli.dir.path().join("state.json").exists(),
        "a rejected source was stored"
    );
    let out = cli.run(&["collect", "--source", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not found"));
}
