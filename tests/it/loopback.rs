//! Loopback fixtures for the issue-10 tests: an HTTP server that answers every request
//! the same way and records what it got (destinations that redirect, bomb or drip;
//! hosts that must receive nothing), and the binary run as a command-line tool in local
//! mode.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use knowbe4_source::testkit::sim::{SimConfig, Simulator};

use crate::helpers::source_json;

/// One request a [`Server`] received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Every header.
    pub headers: HeaderMap,
    /// The body as received.
    pub body: Vec<u8>,
}

/// A loopback HTTP server answering every request with `answer`, recording what it got.
pub struct Server {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// What it received, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    /// Starts a server whose replies `answer` makes.
    pub async fn spawn(answer: impl Fn() -> Response + Clone + Send + Sync + 'static) -> Server {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = Arc::clone(&seen);
        let app = axum::Router::new().fallback(move |request: Request| {
            let record = Arc::clone(&record);
            let answer = answer.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                record.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    headers: parts.headers,
                    body: body.to_vec(),
                });
                answer()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server { base, seen }
    }

    /// A server that answers `200 {}`.
    pub async fn ok() -> Server {
        Server::spawn(|| (StatusCode::OK, "{}").into_response()).await
    }

    /// A server that redirects every request to `location` with `status`.
    pub async fn redirecting(status: u16, location: String) -> Server {
        Server::spawn(move || {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("location", HeaderValue::from_str(&location).unwrap());
            response
        })
        .await
    }

    /// What it received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The release-mode binary as a command-line tool, in local mode in a temporary
/// directory.
pub struct Cli {
    /// Working directory; the state file is `state/state.json` inside.
    pub dir: tempfile::TempDir,
    /// Extra environment.
    env: Vec<(String, String)>,
}

/// What one run printed and returned.
pub struct Ran {
    /// Exit code.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error (the log).
    pub stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Cli {
    /// With `KNOWBE4_ALLOW_CUSTOM_BASE_URL=1` when `allow`, as in tests and the simulator;
    /// without it, as a deployment.
    pub fn new(allow: bool, env: &[(&str, &str)]) -> Cli {
        let mut all: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if allow {
            all.push(("KNOWBE4_ALLOW_CUSTOM_BASE_URL".into(), "1".into()));
        }
        Cli {
            dir: tempfile::tempdir().unwrap(),
            env: all,
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("state").join("state.json")
    }

    /// Runs the binary; returns what it did.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_knowbe4-source"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("STATE_TABLE")
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .env_remove("KNOWBE4_ALLOW_CUSTOM_BASE_URL")
            .env_remove("FORWARD_URL")
            .env_remove("FORWARD_TOKEN")
            .env_remove("FORWARD_FORMAT")
            .env("STATE_FILE", self.state_path())
            .env("RUST_LOG", "debug")
            .env("KNOWBE4_REQUEST_TIMEOUT_SECS", "5")
            .env("DEADLINE_MARGIN_SECS", "1")
            .env("RUN_TIMEOUT_SECS", "20");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }

    pub async fn run(&self, args: &[&str]) -> Ran {
        let output = tokio::process::Command::from(self.command(args))
            .output()
            .await
            .expect("the binary runs");
        Ran {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Writes the hosted JSON of a source and creates it with `id`.
    pub async fn create(&self, id: &str, source: &serde_json::Value) -> Ran {
        let file = self.dir.path().join(format!("{id}.json"));
        std::fs::write(&file, source.to_string()).unwrap();
        self.run(&[
            "sources",
            "create",
            "--file",
            file.to_str().unwrap(),
            "--id",
            id,
        ])
        .await
    }

    /// Creates source `id` from [`source_json`]`(base, key, extra)`; it must succeed.
    pub async fn create_ok(&self, id: &str, base: &str, key: &str, extra: serde_json::Value) {
        let created = self.create(id, &source_json(base, key, extra)).await;
        assert_eq!(created.code, Some(0), "{created:?}");
    }

    /// The source's status (`status ID --json`).
    pub async fn status(&self, id: &str) -> serde_json::Value {
        let ran = self.run(&["status", id, "--json"]).await;
        assert_eq!(ran.code, Some(0), "{ran:?}");
        let value: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
        value.as_array().map_or(value.clone(), |a| a[0].clone())
    }

    /// Edits the state file's JSON in place.
    pub fn edit_state(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.state_path();
        let mut doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut doc);
        std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
    }
}

/// A simulator with `events` events, accepting `key`.
pub async fn sim(key: &str, events: usize) -> Simulator {
    Simulator::spawn(SimConfig {
        api_key: key.to_string(),
        events,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// Asserts a collect run failed without moving anything: exit 1, nothing forwarded, no
/// checkpoint, and a health event of `kind`.
pub async fn assert_failed_and_unmoved(cli: &Cli, id: &str, ran: &Ran, kind: &str) {
    assert_eq!(ran.code, Some(1), "{ran:?}");
    let status = cli.status(id).await;
    assert_eq!(status["forwarded_total"], 0, "{status}");
    assert!(status["checkpoint"].is_null(), "{status}");
    assert_eq!(status["health"][0]["kind"], kind, "{status}");
}
