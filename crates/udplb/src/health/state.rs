//! Health state: each backend's [`Tracker`] ([`Trackers`]), the view of it a snapshot is built
//! with ([`HealthAt`]), and what the admin endpoint shows of it ([`Status`]).
//!
//! Owns: the shapes of that state and its initial values. Must not: change it (the
//! [`super::Monitor`] does, from check results and passive signals).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use udplb_config::Config;
use udplb_core::Time;
use udplb_core::health::{Health, Initial, Tracker};

use crate::plan::HealthView;

/// What the admin endpoint shows of one backend's health.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub healthy: bool,
    /// When `healthy` last changed (Unix seconds), or when udplb started tracking the
    /// backend in that state (start, reload, added).
    pub healthy_since_unix: Option<f64>,
    pub checks_ok: u64,
    pub checks_failed: u64,
    /// Checks (and recovery probes) udplb could not make for lack of descriptors, buffers or
    /// memory: neither passed nor failed, they change nothing.
    pub checks_unknown: u64,
    pub passive_failures: u64,
    /// Passive ejections in a row; the backend is held down for 1 s, 2 s, 4 s, ... (at most
    /// 60 s) after each.
    pub passive_ejections: u64,
    pub last_check_us: Option<u64>,
    pub last_error: Option<String>,
    /// Why the last check counted as unknown could not be made.
    pub last_unknown: Option<String>,
    /// Durations of every active check (exported in /metrics, not in the JSON status).
    #[serde(skip)]
    pub check_latency: udplb_core::latency::Histogram,
}

/// Health of every pool's backends, for the admin endpoint.
pub type Status = Arc<Mutex<Vec<Vec<BackendStatus>>>>;

/// Backend state by pool and backend index, for every backend (actively checked or not).
pub struct Trackers(pub(super) Vec<Vec<Tracker>>);

impl Trackers {
    /// Every backend in its initial state: actively checked ones as configured (down until
    /// the first check passes, by default), the others up.
    pub fn initial(cfg: &Config) -> Trackers {
        Trackers(
            cfg.pools
                .iter()
                .map(|p| {
                    p.backends
                        .iter()
                        .map(|b| Tracker::new(b.active_check(p).map_or(Initial::Up, |h| h.initial)))
                        .collect()
                })
                .collect(),
        )
    }

    /// Backends a predecessor tracked (an upgrade) start as it had them: up until `fall`
    /// checks fail, or down until one passes.
    pub fn inherit(&mut self, cfg: &Config, health: &[crate::upgrade::Health]) {
        for h in health {
            let Some(pi) = cfg.pools.iter().position(|p| p.name == h.pool) else {
                continue;
            };
            let pool = &cfg.pools[pi];
            let Some(bi) = pool.backends.iter().position(|b| b.spec.addr == h.backend) else {
                continue;
            };
            self.0[pi][bi] = Tracker::new(if h.up { Initial::Up } else { Initial::Down });
        }
    }

    pub(super) fn up_count(&self, pool: usize, total: usize) -> usize {
        (0..total).filter(|&b| self.is_up(pool, b)).count()
    }

    pub(super) fn get(&self, pool: usize, backend: usize) -> Option<&Tracker> {
        self.0.get(pool)?.get(backend)
    }

    pub(super) fn get_mut(&mut self, pool: usize, backend: usize) -> Option<&mut Tracker> {
        self.0.get_mut(pool)?.get_mut(backend)
    }
}

impl HealthView for Trackers {
    fn is_up(&self, pool: usize, backend: usize) -> bool {
        self.get(pool, backend)
            .is_none_or(|t| t.state() == Health::Up)
    }
}

/// Health and slow starts at one instant, for a snapshot ([`super::Monitor::view`]).
pub struct HealthAt<'a> {
    pub(super) trackers: &'a Trackers,
    pub(super) cfg: &'a Config,
    pub(super) now: Time,
}

impl HealthView for HealthAt<'_> {
    fn is_up(&self, pool: usize, backend: usize) -> bool {
        self.trackers.is_up(pool, backend)
    }

    fn ramp(&self, pool: usize, backend: usize) -> f64 {
        let window = self
            .cfg
            .pools
            .get(pool)
            .map_or(Duration::ZERO, |p| p.slow_start);
        self.trackers
            .get(pool, backend)
            .map_or(1.0, |t| t.ramp(self.now, window))
    }
}

/// What the admin endpoint shows before any check ran.
pub(super) fn fresh_status(cfg: &Config, trackers: &Trackers) -> Vec<Vec<BackendStatus>> {
    cfg.pools
        .iter()
        .enumerate()
        .map(|(pi, p)| {
            p.backends
                .iter()
                .enumerate()
                .map(|(bi, b)| BackendStatus {
                    address: b.spec.addr.to_string(),
                    healthy: trackers.is_up(pi, bi),
                    healthy_since_unix: Some(unix_now()),
                    ..Default::default()
                })
                .collect()
        })
        .collect()
}

/// Backends without an active check never report; they count as reported for quorum.
pub(super) fn unchecked_as_reported(cfg: &Config) -> Vec<Vec<bool>> {
    cfg.pools
        .iter()
        .map(|p| {
            p.backends
                .iter()
                .map(|b| b.active_check(p).is_none())
                .collect()
        })
        .collect()
}

/// Now, in Unix seconds (for the times the status shows).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
