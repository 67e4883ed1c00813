//! Time as the core sees it: a number the caller passes in.
//!
//! Owns: [`Time`], milliseconds on a monotonic clock whose epoch the caller chooses.
//! Must not: read a clock. The data plane converts `Instant`s; tests and the simulation use
//! a virtual clock.

use std::time::Duration;

/// A point in time, in milliseconds since an epoch chosen by the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub u64);

impl Time {
    /// This time plus `d`, saturating.
    pub fn after(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(d.as_millis().min(u64::MAX as u128) as u64),
        )
    }

    /// How long since `earlier` (zero if `earlier` is later).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}
