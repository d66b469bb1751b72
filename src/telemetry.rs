//! Logging set-up: structured `tracing` output on stderr.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides `default_level`;
/// `json` switches to one JSON object per line for log shippers.
pub fn init(default_level: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
