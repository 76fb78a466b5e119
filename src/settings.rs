//! Tunables read from the environment once per process: what the actions and the runs
//! are allowed to spend (time, concurrency, requests in flight) and where they report.

use std::time::Duration;

use crate::config::ValidationOptions;

/// The per-source secret prefix when `SECRET_PREFIX` is unset: what the stack sets for
/// its documented name `knowbe4-source` (`<stack>/sources/`).
pub const DEFAULT_SECRET_PREFIX: &str = "knowbe4-source/sources/";

/// Tunables read from the environment once per process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Stop this long before the invocation deadline (`DEADLINE_MARGIN_SECS`, default 20).
    pub deadline_margin: Duration,
    /// How often the schedule runs (`SCHEDULE_INTERVAL_SECS`, default 300), for quota
    /// planning.
    pub schedule_interval_secs: u64,
    /// Sources collected at once by a scheduled run (`COLLECT_CONCURRENCY`, default 4).
    pub concurrency: usize,
    /// Longest run outside Lambda (`RUN_TIMEOUT_SECS`, default 840, like a 15-minute
    /// Lambda minus margin).
    pub cli_run_timeout: Duration,
    /// Timeout of one KnowBe4 request (`KNOWBE4_REQUEST_TIMEOUT_SECS`, default 30).
    pub request_timeout: Duration,
    /// Validation switches (`KNOWBE4_ALLOW_CUSTOM_BASE_URL`).
    pub validation: ValidationOptions,
    /// Prefix of per-source Secrets Manager secrets (`SECRET_PREFIX`, default
    /// [`DEFAULT_SECRET_PREFIX`]); the stack sets `<stack>/sources/`, which no other
    /// secret of the stack or of another stack shares.
    pub secret_prefix: String,
    /// Requests kept in flight while draining (`KNOWBE4_MAX_IN_FLIGHT`, default 6; 1
    /// turns pipelining off, for comparison).
    pub max_in_flight: usize,
    /// A run's lease lasts this long unless renewed (`LEASE_TTL_SECS`, default 120): how
    /// long a crashed run blocks its source. Runs renew it as they go.
    pub lease_ttl: Duration,
    /// Where EMF metric lines go (`EMF_METRICS`).
    pub metrics: crate::metrics::MetricsOutput,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Settings {
    /// From the environment, with the documented defaults.
    pub fn from_env() -> Self {
        Settings {
            deadline_margin: Duration::from_secs(env_u64("DEADLINE_MARGIN_SECS", 20)),
            schedule_interval_secs: env_u64("SCHEDULE_INTERVAL_SECS", 300).max(1),
            concurrency: env_u64("COLLECT_CONCURRENCY", 4).clamp(1, 64) as usize,
            cli_run_timeout: Duration::from_secs(env_u64("RUN_TIMEOUT_SECS", 840)),
            request_timeout: Duration::from_secs(
                env_u64("KNOWBE4_REQUEST_TIMEOUT_SECS", 30).max(1),
            ),
            validation: ValidationOptions::from_env(),
            secret_prefix: std::env::var("SECRET_PREFIX")
                .ok()
                .filter(|p| !p.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_SECRET_PREFIX.into()),
            max_in_flight: env_u64("KNOWBE4_MAX_IN_FLIGHT", 6).clamp(1, 16) as usize,
            lease_ttl: Duration::from_secs(env_u64("LEASE_TTL_SECS", 120).max(1)),
            metrics: crate::metrics::MetricsOutput::from_env(),
        }
    }
}
