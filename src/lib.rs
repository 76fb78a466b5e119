//! knowbe4-source: a self-hosted collector that pulls KnowBe4 user events into a SIEM.
//!
//! Layout, from the outside in:
//! - Entry points: [`lambda`], [`cli`], [`demo`] (with the `testkit` feature), [`logging`];
//!   [`app`] builds the clients once and runs every action; [`settings`] are its tunables.
//! - Orchestration: [`run`], one collection run for one source, in a crash-safe order
//!   (lease → budget → walk → forward → checkpoint → lifecycle and health); [`fanout`],
//!   dispatch of due sources over an SQS work queue, its message handling and local worker.
//! - Pure logic: [`domain`] (checkpoint walk, quota planning, lifecycle records, status
//!   views, account ids) and [`config`] (the hosted source's JSON, validated into a
//!   stored spec and its secrets).
//! - Adapters to the outside: [`knowbe4`] (the KnowBe4 clients), [`sink`] (destinations:
//!   Sumo Logic HTTP source, Splunk HEC, NDJSON over HTTP, stdout), [`store`] (the state
//!   store trait with DynamoDB and local-file implementations, Secrets Manager, the AWS
//!   environment), [`metrics`] (CloudWatch Embedded Metric Format lines).
//! - Cross-cutting: [`error`] (the error type and the health event type of each error),
//!   [`failpoint`] (crash-test hooks, armed only with the `testkit` feature).
//! - Test support: `testkit` (the simulator and the recording sink), compiled only with the
//!   `testkit` feature, which the Lambda build does not enable.

pub mod app;
pub mod cli;
pub mod config;
#[cfg(feature = "testkit")]
pub mod demo;
pub mod domain;
pub mod error;
pub mod failpoint;
pub mod fanout;
pub mod knowbe4;
pub mod lambda;
pub mod logging;
pub mod metrics;
pub mod run;
pub mod settings;
pub mod sink;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use domain::event::{EventTime, RawEvent};
pub use error::{Error, HealthKind, Result};
