//! Per-backend rates for operators (`udplb ctl backends`, the API, the status page): datagrams
//! and bytes per second each way, over the last sampling interval, as `ipvsadm --rate` shows.
//!
//! Owns: the last sample of every backend's traffic totals and the rates computed from the
//! two last samples. Sampled by the admin thread every [`INTERVAL`]; read by the API.
//! Must not: touch the workers' counters other than reading them (`/metrics` exports the
//! totals, and Prometheus computes its own rates).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use udplb_core::snapshot::Snapshot;
use udplb_dataplane::{BackendTotals, WorkerStats};

/// How often the rates are computed.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Per second: datagrams to the backend, datagrams from it, bytes to it, bytes from it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    /// Datagrams sent to the backend per second.
    pub forwarded: f64,
    /// Datagrams received from it per second.
    pub replies: f64,
    /// Payload bytes sent to it per second.
    pub bytes_forwarded: f64,
    /// Payload bytes received from it per second.
    pub bytes_replied: f64,
}

/// Every backend's rate, by backend id.
#[derive(Debug, Default)]
pub struct Rates(Mutex<Inner>);

#[derive(Debug, Default)]
struct Inner {
    last: Option<(Instant, HashMap<usize, [u64; 4]>)>,
    rates: HashMap<usize, Rate>,
}

impl Rates {
    /// Samples the totals of the backends of `snap` at `now` and computes the rates since the
    /// last sample.
    pub fn sample(&self, snap: &Snapshot, stats: &[Arc<WorkerStats>], now: Instant) {
        let totals: HashMap<usize, [u64; 4]> = snap
            .pools
            .iter()
            .flat_map(|p| &p.backends)
            .map(|b| {
                let t = BackendTotals::sum(stats, b.id.index());
                (
                    b.id.index(),
                    [t.forwarded, t.replies, t.bytes_forwarded, t.bytes_replied],
                )
            })
            .collect();
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((then, before)) = &inner.last {
            let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
            let per_s = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
            inner.rates = totals
                .iter()
                .map(|(&id, t)| {
                    let b = before.get(&id).copied().unwrap_or(*t);
                    let rate = Rate {
                        forwarded: per_s(t[0], b[0]),
                        replies: per_s(t[1], b[1]),
                        bytes_forwarded: per_s(t[2], b[2]),
                        bytes_replied: per_s(t[3], b[3]),
                    };
                    (id, rate)
                })
                .collect();
        }
        inner.last = Some((now, totals));
    }

    /// Backend id `id`'s rate over the last interval (none before two samples).
    pub fn of(&self, id: usize) -> Option<Rate> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rates
            .get(&id)
            .copied()
    }
}
