//! Logging: `tracing` to stderr, human or JSON, with a filter that can be changed while udplb
//! runs (`PUT /api/v1/log-level`).
//!
//! Owns: the subscriber and the handle to its filter. Must not: be called per datagram (the
//! data plane logs only rate-limited warnings).

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::cli::{LogArgs, LogFormat};

static FILTER: OnceLock<(reload::Handle<EnvFilter, Registry>, Mutex<String>)> = OnceLock::new();

/// Installs the subscriber; an invalid `--log-level` falls back to `info` with a warning.
pub fn init(args: &LogArgs) {
    let (filter, text, bad) = match EnvFilter::try_new(&args.log_level) {
        Ok(f) => (f, args.log_level.clone(), None),
        Err(e) => (EnvFilter::new("info"), "info".to_string(), Some(e)),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match args.log_format {
        LogFormat::Human => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    let _ = FILTER.set((handle, Mutex::new(text)));
    if let Some(e) = bad {
        tracing::warn!(error = %e, level = %args.log_level, "invalid --log-level; using info");
    }
}

/// The filter in force, as text.
pub fn level() -> String {
    FILTER.get().map_or_else(
        || "info".into(),
        |(_, text)| text.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    )
}

/// Replaces the filter (e.g. `debug`, `udplb=debug,info`).
pub fn set_level(spec: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("{spec:?}: {e}"))?;
    let (handle, text) = FILTER.get().ok_or("logging is not initialised")?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    *text.lock().unwrap_or_else(|p| p.into_inner()) = spec.to_string();
    tracing::info!(level = spec, "log level changed");
    Ok(())
}
