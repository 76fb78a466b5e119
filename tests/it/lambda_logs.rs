//! Issue 10, finding 6: the real binary in Lambda mode, driven through a fake Lambda
//! Runtime API on loopback, at the most verbose log level the template allows (and at
//! `TRACE`, which a console edit could still set): no payload's API key, destination URL
//! token or bearer token appears in any log line.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use knowbe4_source::testkit::recording_sink::RecordingSink;
use knowbe4_source::testkit::sim::{SimConfig, Simulator};

use crate::helpers::source_json;

/// The fake Runtime API's state: invocations still to hand out, and the answers.
#[derive(Default)]
struct Runtime {
    /// Payloads not yet handed to the function, with their request ids.
    pending: Mutex<VecDeque<(String, serde_json::Value)>>,
    /// `(request id, "response" or "error", body)` in arrival order.
    answers: Mutex<Vec<(String, &'static str, String)>>,
}

async fn next(State(runtime): State<Arc<Runtime>>) -> impl IntoResponse {
    let popped = runtime.pending.lock().unwrap().pop_front();
    let Some((id, payload)) = popped else {
        // No more work: the function waits, as it would in Lambda, until it is stopped.
        std::future::pending::<()>().await;
        unreachable!()
    };
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    let mut headers = HeaderMap::new();
    headers.insert("lambda-runtime-aws-request-id", id.parse().unwrap());
    headers.insert(
        "lambda-runtime-deadline-ms",
        deadline.to_string().parse().unwrap(),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:123456789012:function:knowbe4-source"
            .parse()
            .unwrap(),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
            .parse()
            .unwrap(),
    );
    (headers, payload.to_string())
}

async fn answer(
    State(runtime): State<Arc<Runtime>>,
    UrlPath((id, kind)): UrlPath<(String, String)>,
    body: String,
) -> &'static str {
    let kind = if kind == "response" {
        "response"
    } else {
        "error"
    };
    runtime.answers.lock().unwrap().push((id, kind, body));
    "{}"
}

async fn init_error(State(runtime): State<Arc<Runtime>>, body: String) -> &'static str {
    runtime
        .answers
        .lock()
        .unwrap()
        .push(("init".into(), "error", body));
    "{}"
}

/// The most verbose `LogLevel` the template allows.
fn most_verbose_allowed_level() -> String {
    let template =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/template.yaml"))
            .unwrap();
    let after = &template[template
        .find("\n  LogLevel:")
        .expect("a LogLevel parameter")..];
    let line = after
        .lines()
        .find(|l| l.trim_start().starts_with("AllowedValues:"))
        .expect("LogLevel.AllowedValues");
    let allowed: Vec<&str> = line
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(str::trim)
        .collect();
    ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]
        .into_iter()
        .find(|level| allowed.contains(level))
        .expect("a known level")
        .to_string()
}

/// Runs the binary in Lambda mode at `level` through `payloads`; returns its output (the
/// function's log) and the answers it posted.
async fn run_lambda(
    level: &str,
    env: &[(&str, String)],
    payloads: Vec<serde_json::Value>,
) -> (String, Vec<(String, &'static str, String)>) {
    let runtime = Arc::new(Runtime::default());
    let count = payloads.len();
    runtime.pending.lock().unwrap().extend(
        payloads
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("request-{i}"), p)),
    );
    let app = axum::Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/invocation/{id}/{kind}", post(answer))
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .with_state(Arc::clone(&runtime));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("function.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_knowbe4-source"));
    command
        .current_dir(dir.path())
        .env_remove("STATE_TABLE")
        .env_remove("RUST_LOG")
        .env_remove("FORWARD_URL")
        .env_remove("FORWARD_TOKEN")
        .env("AWS_LAMBDA_RUNTIME_API", address.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "knowbe4-source")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
        .env("AWS_LAMBDA_LOG_LEVEL", level)
        .env("STATE_FILE", dir.path().join("state.json"))
        .env("KNOWBE4_ALLOW_CUSTOM_BASE_URL", "1")
        .env("KNOWBE4_REQUEST_TIMEOUT_SECS", "5")
        .env("DEADLINE_MARGIN_SECS", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("the binary starts");
    let waited = tokio::time::timeout(Duration::from_secs(90), async {
        while runtime.answers.lock().unwrap().len() < count {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the function exited early ({status})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    child.kill().await.ok();
    server.abort();
    let output = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        waited.is_ok(),
        "the function did not answer every invocation:\n{output}"
    );
    let answers = runtime.answers.lock().unwrap().clone();
    (output, answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_logs_never_hold_a_payloads_secrets() {
    let key = format!("canary-key-{}", uuid::Uuid::new_v4().simple());
    let bearer = format!("canary-bearer-{}", uuid::Uuid::new_v4().simple());
    let sim = Simulator::spawn(SimConfig {
        api_key: key.clone(),
        events: 40,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let sink = RecordingSink::spawn().await.unwrap();
    let own_sink = RecordingSink::spawn().await.unwrap();
    let canaries = [
        ("API key", key.clone()),
        ("bearer token", bearer.clone()),
        ("deployment's Sumo URL token", sink.token().to_string()),
        (
            "source's destination URL token",
            own_sink.token().to_string(),
        ),
    ];
    let payloads = || {
        vec![
            serde_json::json!({"action": "create", "id": "plain",
                "source": source_json(&sim.base_url(), &key, serde_json::json!({}))}),
            serde_json::json!({"action": "create", "id": "own",
                "source": source_json(&sim.base_url(), &key, serde_json::json!({"destination": {
                    "format": "ndjson", "url": own_sink.url(), "token": bearer}}))}),
            serde_json::json!({"action": "collect", "sourceId": "plain"}),
            serde_json::json!({"action": "collect", "sourceId": "own"}),
            serde_json::json!({"action": "update", "sourceId": "own",
                "source": source_json(&sim.base_url(), &key, serde_json::json!({"destination": {
                    "format": "ndjson", "url": own_sink.url(), "token": bearer}}))}),
            // Refused payloads are logged as errors: still without the secrets.
            serde_json::json!({"action": "create", "id": "bad",
                "source": source_json(&sim.base_url(), &format!("{key} x"), serde_json::json!({}))}),
            serde_json::json!({"action": "status"}),
        ]
    };
    let env = [
        ("FORWARD_FORMAT", "sumo".to_string()),
        ("FORWARD_URL", sink.url()),
    ];
    let template_level = most_verbose_allowed_level();
    for level in [template_level.as_str(), "TRACE"] {
        let (log, answers) = run_lambda(level, &env, payloads()).await;
        assert_eq!(answers.len(), 7, "{answers:?}\n{log}");
        assert_eq!(
            answers[5].1, "error",
            "the bad create is refused: {answers:?}"
        );
        assert!(
            log.contains(r#""level":"DEBUG""#),
            "{level}: nothing was logged at debug level:\n{log}"
        );
        for (what, value) in &canaries {
            if let Some(at) = log.find(value.as_str()) {
                let start = log[..at].rfind('\n').map_or(0, |n| n + 1);
                let end = log[at..].find('\n').map_or(log.len(), |n| at + n);
                panic!(
                    "at {level}, the {what} is in the log:\n{}",
                    &log[start..end]
                );
            }
            for (id, kind, body) in &answers {
                assert!(
                    !body.contains(value.as_str()),
                    "the {what} is in the {kind} of {id}"
                );
            }
        }
    }
    assert!(!sink.event_ids().is_empty(), "the runs forwarded events");
    assert!(!own_sink.event_ids().is_empty());
}
