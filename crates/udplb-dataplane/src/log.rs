//! Rate-limited warnings for trouble on the data path.
//!
//! Owns: when a worker last logged each kind of I/O trouble, and how many lines it held back.
//! Must not: be called per datagram on a path that works (only when something fails).

use std::io;
use std::time::{Duration, Instant};

/// Minimum interval between two log lines about the same kind of I/O trouble.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs a warning at most once per [`LOG_INTERVAL`] per kind, with the count of suppressed ones.
#[derive(Default)]
pub(crate) struct RateLimitedLog {
    last: Vec<(&'static str, Instant, u64)>,
}

impl RateLimitedLog {
    pub(crate) fn warn(&mut self, what: &'static str, e: &io::Error) {
        let now = Instant::now();
        match self.last.iter_mut().find(|(w, _, _)| *w == what) {
            Some((_, at, suppressed)) if now.duration_since(*at) < LOG_INTERVAL => *suppressed += 1,
            Some((_, at, suppressed)) => {
                tracing::warn!(error = %e, suppressed = *suppressed, "{what}");
                *at = now;
                *suppressed = 0;
            }
            None => {
                tracing::warn!(error = %e, "{what}");
                self.last.push((what, now, 0));
            }
        }
    }
}
