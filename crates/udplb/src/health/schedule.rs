//! The checks and their schedule: one [`Checker`] task per actively checked backend at a
//! fixed rate, the results they (and recovery probes) send, and which checkers a new
//! configuration keeps ([`plan_checkers`]), so that reloads never reset a backend's schedule.
//!
//! Owns: the checker tasks' loop and the bookkeeping of what runs ([`Running`]). Must not:
//! judge a result (the [`super::Monitor`] does).

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use udplb_config::{Config, HealthCheck};

use super::probe;

/// One check's outcome.
pub struct CheckResult {
    /// The checker (or recovery probe) that made it. Indices of backends change with reloads,
    /// ids do not: the monitor maps the id to the backend's current place, and drops results
    /// of checkers it has stopped.
    pub(super) id: u64,
    /// A recovery probe of a backend without an active check (else an active check).
    pub(super) recovery: bool,
    pub(super) latency: Duration,
    pub(super) outcome: probe::Outcome,
}

/// A check's outcome that says something about the backend (passed, or failed and why).
pub(super) struct Judged {
    pub(super) latency: Duration,
    pub(super) outcome: Result<(), String>,
}

/// A backend's checker or recovery probe while it runs: what it checks, where that backend is
/// in the running configuration, and how to stop it.
pub(super) struct Running {
    /// The backend's pool, by name: with its address, what identifies it across reloads.
    pub(super) pool_name: String,
    pub(super) addr: SocketAddr,
    pub(super) kind: Kind,
    pub(super) pool: usize,
    pub(super) backend: usize,
    pub(super) task: tokio::task::AbortHandle,
}

/// What a [`Running`] task is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// The checker of the backend's effective active check.
    Check(HealthCheck),
    /// A recovery probe of a passively ejected backend without an active check, started with
    /// these health settings (its thresholds and timeout; `None`: the defaults).
    Recovery(Option<HealthCheck>),
}

/// Which running checkers a configuration keeps: `keep` pairs the id of each checker whose
/// backend (same pool name, same address) still has the same effective check with the
/// backend's new place; `start` lists the backends (pool, backend index) that need a new one.
/// The other running checkers are to be stopped.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct CheckerPlan {
    pub(super) keep: Vec<(u64, (usize, usize))>,
    pub(super) start: Vec<(usize, usize)>,
}

pub(super) fn plan_checkers(
    running: &std::collections::HashMap<u64, Running>,
    cfg: &Config,
) -> CheckerPlan {
    let by_backend: std::collections::HashMap<(&str, SocketAddr), (u64, &HealthCheck)> = running
        .iter()
        .filter_map(|(&id, r)| match &r.kind {
            Kind::Check(check) => Some(((r.pool_name.as_str(), r.addr), (id, check))),
            Kind::Recovery(_) => None,
        })
        .collect();
    let mut plan = CheckerPlan::default();
    for (pi, pool) in cfg.pools.iter().enumerate() {
        for (bi, b) in pool.backends.iter().enumerate() {
            let Some(check) = b.active_check(pool) else {
                continue;
            };
            match by_backend.get(&(pool.name.as_str(), b.spec.addr)) {
                Some(&(id, running)) if running == check => plan.keep.push((id, (pi, bi))),
                _ => plan.start.push((pi, bi)),
            }
        }
    }
    plan
}

/// Checks one backend forever: now, then every interval plus jitter.
pub(super) struct Checker {
    /// Names the results (see [`CheckResult::id`]).
    pub(super) id: u64,
    pub(super) addr: SocketAddr,
    pub(super) target: SocketAddr,
    pub(super) check: HealthCheck,
}

impl Checker {
    /// Checks start at a fixed rate (every interval plus jitter, whatever the checks take;
    /// `timeout` ≤ `interval`), so a backend that stops answering is down within
    /// interval × fall + timeout.
    pub(super) async fn run(self, probe: Arc<probe::Ready>, results: mpsc::Sender<CheckResult>) {
        let random = RandomState::new();
        let mut next = tokio::time::Instant::now();
        for round in 0u64.. {
            let started = Instant::now();
            let outcome = probe.run(self.target, self.addr, self.check.timeout).await;
            let result = CheckResult {
                id: self.id,
                recovery: false,
                latency: started.elapsed(),
                outcome,
            };
            if results.send(result).await.is_err() {
                return;
            }
            let jitter_ms = self.check.jitter.as_millis() as u64;
            let jitter = if jitter_ms == 0 {
                0
            } else {
                random.hash_one(round) % (jitter_ms + 1)
            };
            next = (next + self.check.interval + Duration::from_millis(jitter))
                .max(tokio::time::Instant::now());
            tokio::time::sleep_until(next).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(backends: &str) -> Config {
        udplb_config::parse(
            &format!(
                "[listeners.l]\naddress = \"127.0.0.1:5300\"\npool = \"p\"\n[pools.p]\n\
                 backends = [{backends}]\n[pools.p.health]\ncheck = \"udp\"\ninterval = \"1s\"\n"
            ),
            "test.toml",
        )
        .unwrap()
    }

    /// What `cfg` runs, as the monitor records it: ids 0.. in configuration order.
    fn running_for(cfg: &Config) -> std::collections::HashMap<u64, Running> {
        let pool = &cfg.pools[0];
        pool.backends
            .iter()
            .enumerate()
            .map(|(bi, b)| {
                let running = Running {
                    pool_name: pool.name.clone(),
                    addr: b.spec.addr,
                    kind: Kind::Check(b.active_check(pool).unwrap().clone()),
                    pool: 0,
                    backend: bi,
                    task: tokio::spawn(async {}).abort_handle(),
                };
                (bi as u64, running)
            })
            .collect()
    }

    /// A reload keeps the checker of every backend whose pool, address and effective check
    /// are the same, at its new place (reordered, other weight); it starts checkers for new
    /// backends and for those whose check changed; removed backends' checkers are not kept.
    #[tokio::test]
    async fn a_reload_keeps_the_checkers_of_unchanged_backends() {
        let before = config("\"10.0.0.1:53\", \"10.0.0.2:53\", \"10.0.0.3:53\"");
        let running = running_for(&before);
        let after = config(
            "{ address = \"10.0.0.3:53\", weight = 5 }, \"10.0.0.1:53\", \
             { address = \"10.0.0.2:53\", health = { port = 5353 } }, \"10.0.0.4:53\"",
        );
        assert_eq!(
            plan_checkers(&running, &after),
            CheckerPlan {
                keep: vec![(2, (0, 0)), (0, (0, 1))],
                start: vec![(0, 2), (0, 3)],
            }
        );
        // Another pool name: other backends, whatever their addresses.
        let renamed = udplb_config::parse(
            "[listeners.l]\naddress = \"127.0.0.1:5300\"\npool = \"q\"\n[pools.q]\n\
             backends = [\"10.0.0.1:53\"]\n[pools.q.health]\ncheck = \"udp\"\ninterval = \"1s\"\n",
            "test.toml",
        )
        .unwrap();
        assert_eq!(
            plan_checkers(&running, &renamed),
            CheckerPlan {
                keep: vec![],
                start: vec![(0, 0)],
            }
        );
        // The same configuration again keeps everything where it is.
        assert_eq!(
            plan_checkers(&running, &before).keep,
            vec![(0, (0, 0)), (1, (0, 1)), (2, (0, 2))]
        );
    }
}
