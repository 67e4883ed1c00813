//! Logging: `tracing` to stderr, human or JSON, with a filter that can be changed while udplb
//! runs (`PUT /api/v1/log-level`). Filters are checked strictly ([`check_filter`]) at start and
//! on every change. Colour only on a terminal, and not with `NO_COLOR`.
//!
//! Owns: the subscriber and the handle to its filter. Must not: be called per datagram (the
//! data plane logs only rate-limited warnings).

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::cli::{LogArgs, LogFormat};

static FILTER: OnceLock<(reload::Handle<EnvFilter, Registry>, Mutex<String>)> = OnceLock::new();

/// Installs the subscriber with `--log-level` (checked by [`check_filter`] when parsed).
pub fn init(args: &LogArgs) -> Result<(), String> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| format!("--log-level {:?}: {e}", args.log_level))?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    match args.log_format {
        LogFormat::Human => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    let _ = FILTER.set((handle, Mutex::new(args.log_level.clone())));
    Ok(())
}

/// A warning logged at most once per interval, with the number of those left out since the
/// last one (for errors that may repeat many times a second: accept failures, checks that
/// cannot run).
pub struct RateLimited {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub fn new(every: std::time::Duration) -> RateLimited {
        RateLimited {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `what` with `error`, unless one was logged less than the interval ago.
    pub fn warn(&mut self, what: &str, error: &dyn std::fmt::Display) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < self.every)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(error = %error, suppressed = self.suppressed, "{what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Whether human logs get colour escapes: only on a terminal, and never when `NO_COLOR` is set
/// to anything but the empty string (no-color.org). Files, pipes and the journal get plain text.
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The levels a directive may name.
const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Checks a log filter strictly and returns it normalised (directives trimmed, levels in
/// lower case): comma-separated directives, each a level (`info`) or `TARGET=LEVEL`
/// (`udplb=debug`, `udplb_dataplane::worker=trace`). `tracing`'s own parser takes a bare word
/// such as `verbose` for a target name and then logs nothing; this refuses it.
pub fn check_filter(spec: &str) -> Result<String, String> {
    let levels = LEVELS.join(", ");
    let mut out = Vec::new();
    for (i, directive) in spec.split(',').enumerate() {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(format!(
                "{spec:?}: directive {} is empty (write e.g. \"info\" or \"udplb=debug,info\")",
                i + 1
            ));
        }
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if let Some(target) = target.filter(|t| !is_rust_path(t)) {
            return Err(format!(
                "{directive:?}: {target:?} is not a target such as udplb or udplb_dataplane::worker"
            ));
        }
        let level = level.to_ascii_lowercase();
        if !LEVELS.contains(&level.as_str()) {
            return Err(match target {
                Some(_) => format!("{directive:?}: {level:?} is not a level ({levels})"),
                None => format!(
                    "{directive:?} is neither a level ({levels}) nor TARGET=LEVEL (e.g. udplb=debug)"
                ),
            });
        }
        out.push(match target {
            Some(target) => format!("{target}={level}"),
            None => level,
        });
    }
    Ok(out.join(","))
}

/// `udplb`, `udplb_dataplane::worker`: identifiers joined by `::`.
fn is_rust_path(s: &str) -> bool {
    s.split("::").all(|segment| {
        let mut chars = segment.chars();
        chars
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
    })
}

/// The filter in force, as text.
pub fn level() -> String {
    FILTER.get().map_or_else(
        || "info".into(),
        |(_, text)| text.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    )
}

/// Replaces the filter (e.g. `debug`, `udplb=debug,info`), checked by [`check_filter`]; an
/// invalid one changes nothing.
pub fn set_level(spec: &str) -> Result<(), String> {
    let spec = check_filter(spec)?;
    let filter = EnvFilter::try_new(&spec).map_err(|e| format!("{spec:?}: {e}"))?;
    let (handle, text) = FILTER.get().ok_or("logging is not initialised")?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    *text.lock().unwrap_or_else(|p| p.into_inner()) = spec.clone();
    tracing::info!(level = spec, "log level changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn filters_are_levels_or_target_level_directives() {
        for (spec, normal) in [
            ("info", "info"),
            ("OFF", "off"),
            ("udplb=debug,info", "udplb=debug,info"),
            (
                " udplb_dataplane::worker = Trace , warn",
                "udplb_dataplane::worker=trace,warn",
            ),
        ] {
            assert_eq!(check_filter(spec).as_deref(), Ok(normal), "{spec:?}");
            assert!(EnvFilter::try_new(normal).is_ok(), "{normal:?}");
        }
        for spec in [
            "verbose",
            "trace,,",
            ",info",
            "",
            "udplb=",
            "=debug",
            "udplb=loud",
            "udplb::=debug",
            "1udplb=debug",
            "udplb-config=debug",
            "udplb[span]=debug",
            "udplb=debug=info",
        ] {
            assert!(check_filter(spec).is_err(), "{spec:?} was accepted");
        }
    }
}
