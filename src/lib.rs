//! knowbe4-source: a self-hosted collector that pulls KnowBe4 user events into a SIEM.
//!
//! Layout:
//! - [`app`]: clients built once, and every action behind one entry point.
//! - [`collector`]: one collection run for one source, in a crash-safe order.
//! - [`lambda`], [`cli`], [`demo`], [`logging`]: the thin entry points.
//! - [`fanout`]: dispatch over an SQS work queue, its message handling and local worker.
//! - [`config`]: the hosted source's JSON, validated into a stored spec and its secrets.
//! - [`checkpoint`]: what was delivered, and the walk that loses nothing (design inside).
//! - [`state`]: per-source records: lifecycle, retry streak, counters, lease, health.
//! - [`status`]: what `status` and `health` show: RFC 3339 times, resolved events, backlog.
//! - [`secrets`]: a source's secrets and their stored form.
//! - [`knowbe4`]: the User Event API client, paced at 4 requests per second.
//! - [`metrics`]: CloudWatch Embedded Metric Format lines for runs and health events.
//! - [`account`]: the account id (API host + key) that the quota, pacing and sharing key on.
//! - [`planner`]: how a run spends its share of the quota: head reads and window re-reads.
//! - [`progress`]: signs of life during long runs: a terminal line, or periodic records.
//! - [`quota`]: how much of the daily quota a run may spend.
//! - [`store`]: the state store trait, with DynamoDB and local-file implementations.
//! - [`aws_env`]: deployed mode's AWS region and credentials, checked before first use.
//! - [`failpoint`]: crash-test hooks (`KNOWBE4_SOURCE_FAILPOINT`).
//! - [`event`]: one KnowBe4 event, parsed just enough to order and dedupe it.
//! - [`error`]: the error type and the health event type of each error.
//! - [`sink`]: destinations (Sumo Logic HTTP source, Splunk HEC, NDJSON over HTTP, stdout).
//! - [`sim`]: a KnowBe4 User Event API simulator on loopback (tests, benchmarks, demo).
//! - [`recording_sink`]: an HTTP destination on loopback that records what it receives.

pub mod account;
pub mod app;
pub mod aws_env;
pub mod checkpoint;
pub mod cli;
pub mod collector;
pub mod config;
pub mod demo;
pub mod error;
pub mod event;
pub mod failpoint;
pub mod fanout;
pub mod knowbe4;
pub mod lambda;
pub mod logging;
pub mod metrics;
pub mod planner;
pub mod progress;
pub mod quota;
pub mod recording_sink;
pub mod secrets;
pub mod sim;
pub mod sink;
pub mod state;
pub mod status;
pub mod store;

pub use error::{Error, HealthKind, Result};
pub use event::{EventTime, RawEvent};
