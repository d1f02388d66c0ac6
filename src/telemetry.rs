//! Logging: `tracing` with structured fields, to stderr. `RUST_LOG` sets the filter;
//! `log.format = "json"` in the settings (or `DRIFTLESS_LOG_FORMAT=json`, which also covers
//! errors before the settings are read) writes one JSON object per line for log collectors.

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Installs the global subscriber once; later calls do nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json =
        format == LogFormat::Json || std::env::var("DRIFTLESS_LOG_FORMAT").as_deref() == Ok("json");
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
