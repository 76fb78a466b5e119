//! Logging. On the command line: human-readable lines on stderr (stdout carries events
//! in stdout mode), or one JSON object per line with `LOG_FORMAT=json`; level from
//! `RUST_LOG` (default `info`, with the AWS SDK's own messages at `error`); colour only
//! when stderr is a terminal and `NO_COLOR` is unset (or empty), so files and pipes never
//! receive ANSI codes. In Lambda: lines on stdout, JSON with `AWS_LAMBDA_LOG_FORMAT=JSON`,
//! level from `AWS_LAMBDA_LOG_LEVEL` (else `RUST_LOG`, default `INFO`).
//!
//! Whatever the level, the Lambda runtime's own crates log at most at `debug`: at `trace`
//! `lambda_runtime` logs every raw event payload, and a `create` or `update` payload
//! carries the API key and destination token.

use std::io::{IsTerminal, Write};
use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::run::progress;

/// Directives added after the configured level, so that no setting makes the Lambda
/// runtime log payloads.
pub const LAMBDA_RUNTIME_CAPS: &[&str] =
    &["lambda_runtime=debug", "lambda_runtime_api_client=debug"];

/// The filter used when `RUST_LOG` is unset: the SDK's credential-chain warnings would
/// bury the one error that says what is missing.
const DEFAULT_FILTER: &str = "info,aws_config=error,aws_smithy_runtime=error,aws_runtime=error";

/// Whether logs are JSON lines: `LOG_FORMAT=json` (the command line) or
/// `AWS_LAMBDA_LOG_FORMAT=JSON` (Lambda).
pub fn json_logs() -> bool {
    ["LOG_FORMAT", "AWS_LAMBDA_LOG_FORMAT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|f| f.eq_ignore_ascii_case("json")))
}

/// Whether output for people on a stream that `is_terminal` may use colour: only on a
/// terminal, and never with `NO_COLOR` set to a non-empty value (<https://no-color.org>).
pub fn colour(is_terminal: bool, no_color: Option<&str>) -> bool {
    is_terminal && no_color.is_none_or(str::is_empty)
}

/// Installs the command-line subscriber and picks how progress is shown.
pub fn init_cli() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = json_logs();
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var("NO_COLOR").ok().as_deref(),
    );
    progress::set_mode(progress::Mode::detect(json));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| Stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.with_target(false).try_init()
    };
}

/// stderr, erasing a progress line before a log line takes its place.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        progress::erase_line(&mut err);
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
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
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("")), "an empty NO_COLOR does not count");
        assert!(!colour(true, Some("1")));
        assert!(!colour(false, None));
    }

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
