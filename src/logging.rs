//! Logging: on the command line, human-readable lines on stderr (stdout carries events in
//! stdout mode), JSON with `LOG_FORMAT=json`, level from `RUST_LOG` (default `info`); in
//! Lambda, lines on stdout, JSON with `AWS_LAMBDA_LOG_FORMAT=JSON`, level from
//! `AWS_LAMBDA_LOG_LEVEL` (else `RUST_LOG`, default `INFO`).
//!
//! Whatever the level, the Lambda runtime's own crates log at most at `debug`: at `trace`
//! `lambda_runtime` logs every raw event payload, and a `create` or `update` payload
//! carries the API key and destination token.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Directives added after the configured level, so that no setting makes the Lambda
/// runtime log payloads.
pub const LAMBDA_RUNTIME_CAPS: &[&str] =
    &["lambda_runtime=debug", "lambda_runtime_api_client=debug"];

/// Installs the command-line subscriber.
pub fn init_cli() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.with_target(false).try_init()
    };
}

/// The Lambda filter: one level for everything (`AWS_LAMBDA_LOG_LEVEL`, else `RUST_LOG`
/// read as a level; `INFO` when unset or not a level), with [`LAMBDA_RUNTIME_CAPS`] on
/// top. Per-target directives from the environment are not read: they could lift the
/// caps.
pub fn lambda_filter(level: Option<&str>) -> EnvFilter {
    let level = level
        .and_then(|l| LevelFilter::from_str(l.trim()).ok())
        .unwrap_or(LevelFilter::INFO);
    LAMBDA_RUNTIME_CAPS.iter().fold(
        EnvFilter::default().add_directive(level.into()),
        |filter, cap| filter.add_directive(cap.parse().expect("a valid directive")),
    )
}

/// Installs the Lambda subscriber (in place of `lambda_runtime`'s default one, which
/// lets `AWS_LAMBDA_LOG_LEVEL=TRACE` log payloads).
pub fn init_lambda() {
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok();
    let builder = tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .with_env_filter(lambda_filter(level.as_deref()))
        .with_writer(std::io::stdout);
    let json = std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_capped_at_debug_whatever_the_level() {
        for level in [
            Some("TRACE"),
            Some("trace"),
            Some("DEBUG"),
            None,
            Some("bogus"),
        ] {
            let filter = lambda_filter(level).to_string();
            for cap in LAMBDA_RUNTIME_CAPS {
                assert!(filter.contains(cap), "{level:?}: {filter}");
            }
        }
        assert!(lambda_filter(Some("TRACE")).to_string().contains("trace"));
    }
}
