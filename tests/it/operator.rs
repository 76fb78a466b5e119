//! What an operator sees from the binary: machine-readable output that `jq` can read,
//! no colour off a terminal, errors with their causes, validation in plain words, empty
//! results explained, progress at the documented cadence, and a demo that says what it did.

use std::path::Path;
use std::process::{Command, Output};

use knowbe4_source::run::{Outcome, collect_source};
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};

use crate::helpers::{deadline, local_app, source_json};

const BIN: &str = env!("CARGO_BIN_EXE_knowbe4-source");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The binary in local mode in `dir`, with nothing from the caller's AWS or log setup.
fn binary(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("STATE_FILE", dir.join("state.json"))
        .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the binary runs")
}

/// A simulator with `events` events and a source for it created in `dir`.
async fn source_in(dir: &Path, events: usize) -> Simulator {
    let sim = Simulator::spawn(SimConfig {
        api_key: "op-key".into(),
        events,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let file = dir.join("source.json");
    std::fs::write(
        &file,
        source_json(&sim.base_url(), "op-key", serde_json::json!({})).to_string(),
    )
    .unwrap();
    let out = run(binary(dir).args(["sources", "create", "--file", "source.json", "--id", "op"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    sim
}

/// Ids of the NDJSON event lines in `stream` (other lines are logs).
fn event_ids(stream: &[u8]) -> Vec<String> {
    text(stream)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("id").map(|id| id.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_json_is_one_document_on_stdout_with_the_events_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let sim = source_in(dir.path(), 120).await;

    // The default destination is stdout: with --json the events go to stderr.
    let out = run(binary(dir.path()).args(["collect", "--json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            text(&out.stdout)
        )
    });
    assert_eq!(report["runs"][0]["forwarded"], 120, "{report}");
    assert_eq!(event_ids(&out.stderr).len(), 120);

    // --events-file takes them instead; stdout is still the report alone.
    sim.add_events(7, 0);
    let out = run(binary(dir.path()).args(["collect", "--json", "--events-file", "events.ndjson"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["runs"][0]["forwarded"], 7);
    let file = std::fs::read(dir.path().join("events.ndjson")).unwrap();
    assert_eq!(event_ids(&file).len(), 7);
    assert!(event_ids(&out.stderr).is_empty());

    // Without --json, stdout is the events alone and the report goes to stderr.
    sim.add_events(3, 0);
    let out = run(binary(dir.path()).arg("collect"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(event_ids(&out.stdout).len(), 3);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("op: collected (caught up); 3 events forwarded"),
        "{stderr}"
    );

    // `status --json` is one document too, with RFC 3339 times only.
    let out = run(binary(dir.path()).args(["status", "op", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = status[0]["history"][0]["at"].as_str().unwrap();
    assert!(at.ends_with('Z') && at.len() == 24, "{at}");
    let human = text(&run(binary(dir.path()).args(["status", "op"])).stdout);
    assert!(
        human.contains("Transition") && human.contains("Collecting"),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_colour_off_a_terminal_nor_under_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let _sim = source_in(dir.path(), 5).await;
    // Off a terminal (a pipe): no ANSI codes, whatever the log level.
    let out = run(binary(dir.path()).arg("collect").env("RUST_LOG", "debug"));
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("Run finished."));
    assert!(
        !text(&out.stderr).contains('\u{1b}'),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains('\u{1b}'));

    // On a terminal (a pseudo-terminal from util-linux `script`): colour, unless NO_COLOR.
    let script = |no_color: bool| {
        let mut cmd = Command::new("script");
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("STATE_FILE", dir.path().join("state.json"))
            .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
            .env("RUST_LOG", "debug")
            .env("TERM", "xterm");
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let shell = format!("{BIN} sources create --file source.json --id op2 --allow-duplicate");
        let out = cmd
            .args(["-q", "-e", "-c", &shell, "/dev/null"])
            .output()
            .expect("util-linux `script` runs (it gives the test a terminal)");
        assert!(out.status.success(), "{}", text(&out.stdout));
        text(&out.stdout)
    };
    let coloured = script(false);
    assert!(coloured.contains("Source created."), "{coloured}");
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal: {coloured:?}"
    );
    let out = run(binary(dir.path()).args(["sources", "delete", "op2"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plain = script(true);
    assert!(plain.contains("Source created."), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "colour despite NO_COLOR: {plain:?}"
    );
}

#[test]
fn errors_carry_their_causes_and_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // STATE_FILE naming a directory: the OS error is part of the message.
    let out = run(binary(dir.path())
        .arg("status")
        .env("STATE_FILE", dir.path()));
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("state store failed: reading"), "{stderr}");
    assert!(stderr.contains("Is a directory (os error 21)"), "{stderr}");

    // STATE_TABLE without a region: says which variable, and the way back to local mode.
    let out = run(binary(dir.path()).arg("status").env("STATE_TABLE", "t"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("AWS_REGION"), "{stderr}");
    assert!(stderr.contains("unset STATE_TABLE"), "{stderr}");

    // With a region but no credentials: what is missing, how to provide it, and the SDK's
    // own account of the chain it tried, without its multi-kilobyte warnings.
    let out = run(binary(dir.path())
        .arg("status")
        .env("STATE_TABLE", "t")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none")));
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no AWS credentials were found"), "{stderr}");
    assert!(stderr.contains("AWS_ACCESS_KEY_ID"), "{stderr}");
    assert!(stderr.contains("no credentials found in chain"), "{stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
}

#[test]
fn validation_speaks_the_users_terms() {
    let dir = tempfile::tempdir().unwrap();
    let create = |name: &str, body: &[u8]| {
        std::fs::write(dir.path().join(name), body).unwrap();
        run(binary(dir.path()).args(["sources", "create", "--file", name]))
    };
    let config = |extra: serde_json::Value| {
        source_json("http://127.0.0.1:9", "k", extra)
            .to_string()
            .into_bytes()
    };
    for bad in [
        serde_json::json!(-5),
        serde_json::json!(2.5),
        serde_json::json!("50"),
    ] {
        let out = create("s.json", &config(serde_json::json!({"licensedUsers": bad})));
        assert_eq!(out.status.code(), Some(2));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(
                "source.config.licensedUsers: must be a whole number from 1 to 4294967295"
            ),
            "{bad}: {stderr}"
        );
    }
    let out = create("array.json", b"[]");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("expected the hosted source's JSON object"),
        "{stderr}"
    );
    assert!(!stderr.contains("HostedDocument"), "{stderr}");

    let payload =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("events/create.json")).unwrap();
    let out = create("payload.json", &payload);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("this looks like a Lambda payload"),
        "{stderr}"
    );
    assert!(stderr.contains("\"source\" value"), "{stderr}");

    // A byte order mark is accepted.
    let mut bom = "\u{feff}".as_bytes().to_vec();
    bom.extend(config(serde_json::json!({})));
    let out = create("bom.json", &bom);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn empty_results_say_so_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(binary(dir.path()).arg("status"));
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("No sources yet. Create one"));
    assert!(text(&out.stdout).contains("sources create --file"));
    let out = run(binary(dir.path()).arg("collect"));
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("Nothing to collect. No sources yet."));
    let out = run(binary(dir.path()).args(["sources", "list"]));
    assert!(text(&out.stdout).contains("No sources yet."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_collect_reports_progress_every_n_pages() {
    let dir = tempfile::tempdir().unwrap();
    // 1,000 events in pages of 50: 20 pages, a record after every 3rd.
    let _sim = source_in(dir.path(), 1000).await;
    let out = run(binary(dir.path())
        .args(["collect", "--json", "--events-file", "events.ndjson"])
        .env("LOG_FORMAT", "json")
        .env("PROGRESS_EVERY_PAGES", "3"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run_report = &report["runs"][0];
    assert_eq!(run_report["forwarded"], 1000, "{report}");
    let pages = run_report["pages"].as_u64().unwrap();
    assert!(pages >= 20, "{report}");
    let records: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "Collection in progress.")
        .collect();
    let seen: Vec<u64> = records
        .iter()
        .map(|r| r["fields"]["pages"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=pages / 3).map(|n| n * 3).collect();
    assert_eq!(seen, expected, "one record per 3 pages");
    let last = &records.last().unwrap()["fields"];
    assert_eq!(last["source_id"], "op");
    assert!(last["requests"].as_u64().unwrap() >= seen[seen.len() - 1]);
    assert!(last["quota_left"].as_u64().is_some() && last["fetched"].as_u64().is_some());
    // The run summary is logged once, as one JSON field.
    let finished: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "Run finished.")
        .collect();
    assert_eq!(finished.len(), 1);
    let fields = finished[0]["fields"].as_object().unwrap();
    assert_eq!(
        fields.keys().map(String::as_str).collect::<Vec<_>>(),
        ["message", "run_summary"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_run_reports_the_quota_and_checkpoint_that_status_shows() {
    let dir = tempfile::tempdir().unwrap();
    let sink = RecordingSink::spawn().await.unwrap();
    let sim = Simulator::spawn(SimConfig {
        api_key: "skip-key".into(),
        events: 60,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let app = local_app(dir.path(), &sink);
    let id = app
        .create(
            source_json(&sim.base_url(), "skip-key", serde_json::json!({})),
            Some("skip".into()),
        )
        .await
        .unwrap();
    let first = collect_source(app.run_context(), &id, deadline(60)).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    // Another run holds the lease: this one is skipped.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let held = app
        .store
        .acquire_lease(&id, "someone-else", now, 60_000)
        .await
        .unwrap();
    assert!(held.is_some());
    let skipped = collect_source(app.run_context(), &id, deadline(60)).await;
    assert_eq!(skipped.outcome, Outcome::Skipped, "{skipped:?}");
    let status = &app.status(Some(&id)).await.unwrap()[0];
    assert_eq!(skipped.quota_left, status.quota_left_today, "{skipped:?}");
    assert!(skipped.quota_left > 0);
    assert_eq!(skipped.checkpoint, status.checkpoint);
    assert!(skipped.checkpoint.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_explains_itself_as_the_readme_shows() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(binary(dir.path()).arg("demo"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr).replace(BIN, "target/release/knowbe4-source");
    assert_eq!(event_ids(&out.stdout).len(), 258);
    assert!(
        stderr.contains("The 3 backdated events were caught"),
        "{stderr}"
    );
    assert!(stderr.contains("not sent twice"), "{stderr}");
    assert!(!stderr.contains(" 1 requests"), "{stderr}");

    // The README's "What you will see" block is what the demo prints, up to digits, log
    // lines, the lag and the checkpoint (which depend on the clock).
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## What you will see")
        .nth(1)
        .expect("README has a \"What you will see\" section");
    let block = section.split("```").nth(1).expect("a code block");
    let digits = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect()
    };
    let printed = digits(&stderr);
    let mut checked = 0;
    for line in block.lines().skip(1) {
        // The checkpoint is an event's own time, printed at its own precision.
        let clock = ["Lag ", "Checkpoint "];
        if line.trim().is_empty()
            || line.contains(" INFO ")
            || clock.iter().any(|c| line.starts_with(c))
        {
            continue;
        }
        assert!(
            printed.contains(&digits(line)),
            "README line not printed by the demo: {line}\n---\n{stderr}"
        );
        checked += 1;
    }
    assert!(checked > 15, "only {checked} lines checked");

    // The commands it ends with work, with the state file it names.
    let out = run(binary(dir.path())
        .args(["status", "demo"])
        .env("STATE_FILE", ".knowbe4-source/demo/state.json"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("forwarded"));
    assert!(
        stderr.contains(
            "STATE_FILE=./.knowbe4-source/demo/state.json target/release/knowbe4-source status demo"
        ),
        "{stderr}"
    );
}
