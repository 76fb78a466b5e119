//! Logging outside Lambda: human-readable lines on stderr (stdout carries events in
//! stdout mode), JSON with `LOG_FORMAT=json`; level from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

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
