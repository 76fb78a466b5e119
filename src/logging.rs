//! Logging outside Lambda: human-readable lines on stderr (stdout carries events in
//! stdout mode), or one JSON object per line with `LOG_FORMAT=json`; level from `RUST_LOG`
//! (default `info`, with the AWS SDK's own messages at `error`).
//!
//! Colour only when stderr is a terminal and `NO_COLOR` is unset (or empty), so files and
//! pipes never receive ANSI codes.

use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;

use crate::progress;

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
}
