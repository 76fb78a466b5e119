//! Secret canaries: an API key, destination URLs carrying random tokens, a bearer and a
//! Splunk HEC token, followed
//! through everything the collector writes — logs at trace level from the real binary in
//! both modes, `Debug` output, health events, state items, the local state file and the
//! forwarded data — plus the rotation of a key.
//!
//! By design the secrets live in exactly one place: the source's Secrets Manager secret
//! (AWS mode) or the `secrets` section of the state file (local mode, mode 0600).

use std::path::Path;
use std::process::Output;

use knowbe4_source::app::Action;
use knowbe4_source::run::{Outcome, collect_source};
use knowbe4_source::store::dynamo::DynamoStore;
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};

use crate::helpers::*;

/// The secrets of one test, and where each was seen.
struct Canaries {
    /// (what it is, its value).
    secrets: Vec<(&'static str, String)>,
}

impl Canaries {
    /// Fails the test, naming the secret and the place, if `text` holds any canary.
    fn assert_absent(&self, place: &str, text: &str) {
        for (what, value) in &self.secrets {
            if let Some(at) = text.find(value.as_str()) {
                let line = text[..at].rfind('\n').map_or(0, |n| n + 1);
                let end = text[at..].find('\n').map_or(text.len(), |n| at + n);
                panic!(
                    "the {what} leaked into {place}:\n{}",
                    &text[line..end.min(line + 2_000)]
                );
            }
        }
    }
}

/// The binary, run as a command-line tool in one mode.
struct Binary {
    /// Working directory (and the state file's home in local mode).
    dir: tempfile::TempDir,
    /// Environment of every invocation.
    env: Vec<(String, String)>,
    /// Every invocation so far: (arguments, stdout, stderr, exit code).
    runs: Vec<(String, String, String, Option<i32>)>,
}

impl Binary {
    fn new(env: Vec<(&str, String)>) -> Self {
        Binary {
            dir: tempfile::tempdir().unwrap(),
            env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            runs: Vec::new(),
        }
    }

    /// Runs the binary with `args`; returns its exit code.
    async fn run(&mut self, args: &[&str]) -> Option<i32> {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_knowbe4-source"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("STATE_TABLE")
            .env_remove("STATE_FILE")
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .env_remove("LOG_FORMAT")
            .env("RUST_LOG", "trace")
            .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
            .env("KNOWBE4_REQUEST_TIMEOUT_SECS", "5")
            .env("DEADLINE_MARGIN_SECS", "1")
            .env("RUN_TIMEOUT_SECS", "10")
            .env("EMF_METRICS", "stderr");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let Output {
            status,
            stdout,
            stderr,
        } = command.output().await.expect("the binary runs");
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        self.runs
            .push((args.join(" "), text(stdout), text(stderr), status.code()));
        status.code()
    }

    /// Writes a JSON file in the working directory; returns its path.
    fn file(&self, name: &str, json: &serde_json::Value) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, json.to_string()).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// The output of the last invocation.
    fn last(&self) -> &(String, String, String, Option<i32>) {
        self.runs.last().expect("a run")
    }

    /// Checks every invocation's stdout and stderr.
    fn assert_no_leak(&self, canaries: &Canaries, mode: &str) {
        let mut traced = false;
        for (args, stdout, stderr, _) in &self.runs {
            canaries.assert_absent(&format!("stdout of `{args}` ({mode})"), stdout);
            canaries.assert_absent(&format!("stderr of `{args}` ({mode})"), stderr);
            traced |= stderr.contains("TRACE") || stderr.contains(r#""level":"TRACE""#);
        }
        assert!(traced, "{mode}: no trace-level line was logged at all");
    }
}

/// The command sequence both modes go through: create, collect, status, health, a
/// failing collect (wrong key: 401), a destination outage, update, list.
async fn drive(
    bin: &mut Binary,
    sim: &Simulator,
    sink: &RecordingSink,
    own_sink: &RecordingSink,
    hec_sink: &RecordingSink,
    canaries: &Canaries,
) {
    let secret = |what: &str| {
        canaries
            .secrets
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let key = secret("API key");
    let good = bin.file(
        "good.json",
        &source_json(&sim.base_url(), &key, serde_json::json!({})),
    );
    let wrong = bin.file(
        "wrong.json",
        &source_json(
            &sim.base_url(),
            &secret("wrong API key"),
            serde_json::json!({}),
        ),
    );
    let own = bin.file(
        "own.json",
        &source_json(
            &sim.base_url(),
            &key,
            serde_json::json!({"destination": {
                "format": "ndjson",
                "url": own_sink.url(),
                "token": secret("destination bearer token"),
            }}),
        ),
    );
    let hec = bin.file(
        "hec.json",
        &source_json(
            &sim.base_url(),
            &key,
            serde_json::json!({"destination": {
                "format": "splunk-hec",
                "url": hec_sink.url(),
                "token": secret("HEC token"),
            }}),
        ),
    );
    for (file, id) in [
        (&good, "good"),
        (&wrong, "wrong"),
        (&own, "own"),
        (&hec, "hec"),
    ] {
        let code = bin
            .run(&["sources", "create", "--file", file, "--id", id])
            .await;
        assert_eq!(code, Some(0), "create {id}: {:?}", bin.last());
    }
    assert_eq!(
        bin.run(&["collect", "--source", "good"]).await,
        Some(0),
        "{:?}",
        bin.last()
    );
    assert_eq!(
        bin.run(&["collect", "--source", "own", "--json"]).await,
        Some(0),
        "{:?}",
        bin.last()
    );
    assert_eq!(
        bin.run(&["collect", "--source", "hec"]).await,
        Some(0),
        "{:?}",
        bin.last()
    );
    assert_eq!(sink.event_ids().len(), sim.event_ids().len());
    assert_eq!(own_sink.event_ids().len(), sim.event_ids().len());
    assert_eq!(hec_sink.event_ids().len(), sim.event_ids().len());
    // 401, then the forced re-read of the secret, then a ThirdPartyConfigError.
    assert_eq!(
        bin.run(&["collect", "--source", "wrong"]).await,
        Some(1),
        "{:?}",
        bin.last()
    );
    // The destination is down: a FirstPartyGenericError after retries.
    sim.add_events(30, 0);
    sink.set_down(Some(503));
    assert_eq!(
        bin.run(&["collect", "--source", "good"]).await,
        Some(1),
        "{:?}",
        bin.last()
    );
    sink.set_down(None);
    assert_eq!(
        bin.run(&["sources", "update", "good", "--file", &good])
            .await,
        Some(0),
        "{:?}",
        bin.last()
    );
    // `wrong` is blocked until updated (skipped, not failed): the run succeeds.
    assert_eq!(bin.run(&["collect"]).await, Some(0), "{:?}", bin.last());
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["sources", "list", "--json"],
        &["sources", "list"],
        &["health", "good"],
        &["health", "own", "--json"],
        &["health", "wrong"],
    ] {
        assert_eq!(bin.run(args).await, Some(0), "{:?}", bin.last());
    }
    // The failures left health events that say what happened, without the secrets.
    assert_eq!(bin.run(&["health", "wrong", "--json"]).await, Some(0));
    let wrong_health: serde_json::Value = serde_json::from_str(&bin.last().1).unwrap();
    assert_eq!(wrong_health[0]["kind"], "ThirdPartyConfigError");
    assert_eq!(bin.run(&["health", "good", "--json"]).await, Some(0));
    let good_health: serde_json::Value = serde_json::from_str(&bin.last().1).unwrap();
    assert_eq!(good_health[0]["kind"], "FirstPartyGenericError");
}

/// Every request each destination received (path, headers, body) holds none of the
/// canaries but its own: no KnowBe4 key, and no other destination's URL token, bearer or
/// HEC token.
fn assert_each_sink_gets_only_its_own(sinks: &[(&RecordingSink, &[&str])], canaries: &Canaries) {
    for (sink, own) in sinks {
        let others = Canaries {
            secrets: canaries
                .secrets
                .iter()
                .filter(|(what, _)| !own.contains(what))
                .cloned()
                .collect(),
        };
        for request in sink.requests() {
            others.assert_absent("the path of a forwarded request", &request.path);
            let headers = format!("{:?}", request.headers);
            others.assert_absent("the headers of a forwarded request", &headers);
            others.assert_absent("a forwarded body", &String::from_utf8_lossy(&request.body));
        }
    }
}

/// The three destinations of [`fixtures`] and the canaries each may receive.
fn each_sink_gets_only_its_own(
    sink: &RecordingSink,
    own_sink: &RecordingSink,
    hec_sink: &RecordingSink,
    canaries: &Canaries,
) {
    assert_each_sink_gets_only_its_own(
        &[
            (sink, &["deployment's destination URL token"]),
            (
                own_sink,
                &["source's destination URL token", "destination bearer token"],
            ),
            (hec_sink, &["HEC destination URL token", "HEC token"]),
        ],
        canaries,
    );
}

/// Both modes' shared setup: a simulator accepting the key, and three sinks (the
/// deployment's Sumo-style one, an NDJSON one with a bearer token and a Splunk HEC one
/// that sources name themselves).
async fn fixtures() -> (
    Canaries,
    Simulator,
    RecordingSink,
    RecordingSink,
    RecordingSink,
) {
    let key = canary("key");
    let sim = Simulator::spawn(SimConfig {
        api_key: key.clone(),
        events: 230,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let sink = RecordingSink::spawn().await.unwrap();
    let own_sink = RecordingSink::spawn().await.unwrap();
    let hec_sink = RecordingSink::spawn().await.unwrap();
    let canaries = Canaries {
        secrets: vec![
            ("API key", key),
            ("wrong API key", canary("wrong-key")),
            ("destination bearer token", canary("bearer")),
            (
                "deployment's destination URL token",
                sink.token().to_string(),
            ),
            (
                "source's destination URL token",
                own_sink.token().to_string(),
            ),
            ("HEC token", canary("hec")),
            ("HEC destination URL token", hec_sink.token().to_string()),
        ],
    };
    (canaries, sim, sink, own_sink, hec_sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_never_leaks_a_secret_outside_the_state_files_secrets() {
    let (canaries, sim, sink, own_sink, hec_sink) = fixtures().await;
    let mut bin = Binary::new(vec![("FORWARD_URL", sink.url())]);
    let state = bin.dir.path().join("state").join("state.json");
    bin.env
        .push(("STATE_FILE".into(), state.to_str().unwrap().into()));
    drive(&mut bin, &sim, &sink, &own_sink, &hec_sink, &canaries).await;
    bin.assert_no_leak(&canaries, "local mode");

    // The state file keeps the secrets in its `secrets` section, and only there.
    let document: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let stored = document["secrets"].to_string();
    assert!(stored.contains(&canaries.secrets[0].1), "the key is stored");
    for (section, value) in document.as_object().unwrap() {
        if section != "secrets" {
            canaries.assert_absent(
                &format!("the state file's `{section}` section"),
                &value.to_string(),
            );
        }
    }
    assert_no_other_file_holds_secrets(bin.dir.path(), &state, &canaries);
    each_sink_gets_only_its_own(&sink, &own_sink, &hec_sink, &canaries);
}

/// Files next to the state file (lock, leftovers of atomic writes) and the source files
/// the test wrote aside, nothing in the directory holds a canary.
fn assert_no_other_file_holds_secrets(dir: &Path, state: &Path, canaries: &Canaries) {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path != state && path.extension().is_none_or(|e| e != "json") {
                let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
                canaries.assert_absent(&path.display().to_string(), &text);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_mode_never_leaks_a_secret_outside_secrets_manager() {
    let (canaries, sim, sink, own_sink, hec_sink) = fixtures().await;
    let config = aws_config().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&config);
    let secrets = aws_sdk_secretsmanager::Client::new(&config);
    let table = unique("knowbe4-secrets");
    DynamoStore::create_table(&dynamo, &table).await.unwrap();
    let prefix = format!("{}/", unique("canary"));
    let mut bin = Binary::new(vec![
        ("FORWARD_URL", sink.url()),
        ("STATE_TABLE", table.clone()),
        ("SECRET_PREFIX", prefix.clone()),
        ("AWS_ENDPOINT_URL", aws_endpoint()),
        ("LOG_FORMAT", "json".into()),
    ]);
    drive(&mut bin, &sim, &sink, &own_sink, &hec_sink, &canaries).await;
    bin.assert_no_leak(&canaries, "AWS mode, JSON logs");
    // The same commands with human-readable logs, against the same state.
    bin.env.retain(|(k, _)| k != "LOG_FORMAT");
    for args in [
        &["collect"][..],
        &["status", "good"],
        &["health", "wrong"],
        &["sources", "list"],
    ] {
        bin.run(args).await;
    }
    bin.assert_no_leak(&canaries, "AWS mode, text logs");

    let items = dynamo
        .scan()
        .table_name(&table)
        .send()
        .await
        .unwrap()
        .items()
        .iter()
        .map(|item| format!("{item:?}"))
        .collect::<Vec<_>>();
    assert!(items.len() >= 6, "{items:?}");
    for item in &items {
        canaries.assert_absent("a DynamoDB item", item);
    }
    // Each source's secret is where its key lives.
    let stored = secrets
        .get_secret_value()
        .secret_id(format!("{prefix}good"))
        .send()
        .await
        .unwrap();
    assert!(
        stored
            .secret_string()
            .unwrap()
            .contains(&canaries.secrets[0].1)
    );
    assert_no_other_file_holds_secrets(bin.dir.path(), Path::new("/nonexistent"), &canaries);
    each_sink_gets_only_its_own(&sink, &own_sink, &hec_sink, &canaries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_errors_and_reports_hold_no_secret() {
    let key = canary("key");
    let bearer = canary("bearer");
    let h = harness(SimConfig {
        api_key: key.clone(),
        events: 120,
        ..SimConfig::default()
    })
    .await;
    let own_sink = RecordingSink::spawn().await.unwrap();
    let canaries = Canaries {
        secrets: vec![
            ("API key", key.clone()),
            ("deployment's destination URL token", h.sink.token().into()),
            ("source's destination URL token", own_sink.token().into()),
            ("destination bearer token", bearer.clone()),
        ],
    };
    let id = h
        .app
        .create(
            source_json(
                &h.sim.base_url(),
                &key,
                serde_json::json!({"destination": {
                    "format": "ndjson", "url": own_sink.url(), "token": bearer}}),
            ),
            Some("debug".into()),
        )
        .await
        .unwrap();
    let report = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    let record = h.app.store.get_source(&id).await.unwrap().unwrap();
    let secrets = h.app.source_secrets(&record, false).await.unwrap();
    let destination = h.app.destination_for(&record, &secrets).unwrap();
    let status = h.app.status(Some(&id)).await.unwrap();
    for (what, text) in [
        ("SourceRecord", format!("{record:?}")),
        ("SourceSecrets", format!("{secrets:?}")),
        ("Destination", format!("{destination:?}")),
        (
            "the default DestinationConfig",
            format!("{:?}", h.app.default_destination),
        ),
        ("Settings", format!("{:?}", h.app.settings)),
        ("RunReport", format!("{report:?}")),
        ("RunReport JSON", serde_json::to_string(&report).unwrap()),
        ("SourceStatus", format!("{status:?}")),
        ("the Collect Action", {
            let payload = serde_json::json!({"action": "collect", "sourceId": id});
            format!("{:?}", Action::from_payload(payload).unwrap())
        }),
    ] {
        canaries.assert_absent(&format!("the Debug of {what}"), &text);
    }

    // Failures: a refused key, a rejected config carrying the key, a destination outage.
    h.sim.set_api_key("another-key");
    let refused = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(refused.outcome, Outcome::Failed, "{refused:?}");
    canaries.assert_absent("a refused run's report", &format!("{refused:?}"));
    let health = h.app.health(&id).await.unwrap();
    assert!(!health.is_empty());
    canaries.assert_absent("health events", &format!("{health:?}"));
    canaries.assert_absent(
        "health events (JSON)",
        &serde_json::to_string(&health).unwrap(),
    );

    for bad in [
        serde_json::json!({"baseURL": "http://10.0.0.1"}),
        serde_json::json!({"apiKey": format!("{key} with spaces")}),
        serde_json::json!({"apiKey": [key]}),
        serde_json::json!({"quotaShare": key}),
        serde_json::json!({"destination": {"format": "sumo", "url": format!("ftp://{}", own_sink.token())}}),
        serde_json::json!({"destination": {"format": "splunk-hec", "url": own_sink.url(), "token": format!("{bearer}\nX-Injected: 1")}}),
    ] {
        let err = h
            .app
            .create(source_json(&h.sim.base_url(), &key, bad.clone()), None)
            .await
            .expect_err("invalid");
        canaries.assert_absent(&format!("the error for {bad}"), &format!("{err} {err:?}"));
    }
    let err = h
        .app
        .update("missing", source_json("x", &key, serde_json::json!({})));
    let err = err.await.expect_err("no such source");
    canaries.assert_absent("a not-found error", &format!("{err} {err:?}"));
}

/// `Debug` of a create payload must not print the key it carries: anything that logs the
/// action (`?action`) would leak it.
#[test]
fn the_debug_of_a_create_action_hides_the_key() {
    let key = canary("key");
    let payload = serde_json::json!({
        "action": "create",
        "source": source_json("https://training.knowbe4.com", &key, serde_json::json!({})),
    });
    let action = Action::from_payload(payload).unwrap();
    let shown = format!("{action:?}");
    assert!(
        !shown.contains(&key),
        "the key is in the Debug output: {shown}"
    );
}

/// A key reset in KnowBe4's console and then in Secrets Manager: the app has the old key
/// cached, gets one 401, re-reads the secret once and collects with the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_costs_one_401_and_one_secret_read() {
    let (k1, k2) = (canary("k1"), canary("k2"));
    let h = harness(SimConfig {
        api_key: k1.clone(),
        events: 120,
        ..SimConfig::default()
    })
    .await;
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), &k1, serde_json::json!({})),
            Some("rotating".into()),
        )
        .await
        .unwrap();
    let first = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(first.outcome, Outcome::Collected, "{first:?}");
    let requests_before = h.sim.requests().len();

    h.sim.set_api_key(&k2);
    h.secrets
        .put_secret_value()
        .secret_id(format!("{}{id}", h.prefix))
        .secret_string(serde_json::json!({"apiKey": k2}).to_string())
        .send()
        .await
        .unwrap();
    h.sim.add_events(30, 0);
    let second = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(second.outcome, Outcome::Collected, "{second:?}");
    assert!(second.health.is_none(), "{second:?}");
    assert!(h.app.health(&id).await.unwrap().is_empty());
    let log = h.sim.requests();
    let statuses: Vec<u16> = log[requests_before..].iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses[0], 401,
        "the cached key is tried first: {statuses:?}"
    );
    assert!(statuses[1..].iter().all(|s| *s == 200), "{statuses:?}");
    let ids = h.sink.event_ids();
    assert_eq!(ids.len(), 150);
    assert!(duplicates(&ids).is_empty());
    for item in table_dump(&h).await {
        assert!(!item.contains(&k1) && !item.contains(&k2), "{item}");
    }
}

/// Changing only the destination on update while keeping the stored key (`apiKey`
/// omitted or `****`): the new destination URL is a secret too, and must be stored.
/// (Regression: it used to be dropped, and every run then failed for want of a URL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_keeping_the_key_still_stores_the_new_destination() {
    let key = canary("key");
    let h = harness(SimConfig {
        api_key: key.clone(),
        events: 120,
        ..SimConfig::default()
    })
    .await;
    let own_sink = RecordingSink::spawn().await.unwrap();
    let id = h
        .app
        .create(
            source_json(&h.sim.base_url(), &key, serde_json::json!({})),
            Some("moving".into()),
        )
        .await
        .unwrap();
    h.app
        .update(
            &id,
            source_json(
                &h.sim.base_url(),
                "****",
                serde_json::json!({"destination": {"format": "ndjson", "url": own_sink.url()}}),
            ),
        )
        .await
        .unwrap();
    let report = collect_source(h.app.run_context(), &id, deadline(30)).await;
    assert_eq!(report.outcome, Outcome::Collected, "{report:?}");
    assert_eq!(own_sink.event_ids().len(), 120);
    assert!(h.sink.event_ids().is_empty());
    for item in table_dump(&h).await {
        assert!(!item.contains(&key), "{item}");
        assert!(!item.contains(own_sink.token()), "{item}");
    }
}
