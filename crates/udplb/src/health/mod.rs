//! Health checking: active checks per backend, passive signals from the data plane, and the
//! resulting up/down state, which the publisher ([`crate::control::Publisher`]) puts in the
//! snapshots the workers read.
//!
//! Every backend is watched passively (refused datagrams, unanswered requests, replies), with
//! or without an active check: a backend that fails real traffic `passive_fall` times in a row
//! is taken out for a hold-down that doubles with each ejection in a row. An active check, if
//! there is one, brings it back after the hold-down; without one, a recovery probe does (an
//! empty datagram that must not be refused).
//!
//! Owns: one checker task per actively checked backend and their schedule across reloads
//! ([`schedule`]; the checks themselves in [`probe`], [`dns`], [`http`]), the recovery probes,
//! the [`Monitor`] that turns results and passive signals into state with
//! [`udplb_core::health::Tracker`] and pool quorum ([`state`]: it keeps the trackers, as every
//! result reads and writes them), the notify hooks ([`notify`]) and the per-backend check
//! counters the admin endpoint shows. Each flip is reported at once to the publisher
//! ([`Publish`]) with a read-only view of the state ([`HealthAt`]).
//! Must not: touch datagrams or block the data plane; publish snapshots or change the
//! configuration (it is handed each new one, [`Monitor::reconfigure`]); logs only on state
//! flips.

mod dns;
mod http;
mod notify;
mod probe;
mod schedule;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use udplb_config::Config;
use udplb_core::Time;
use udplb_core::health::{Health, Passive, QuorumState, Tracker};
use udplb_core::snapshot::Snapshot;
use udplb_dataplane::WorkerStats;

use crate::plan::HealthView;
use notify::Event;
pub use schedule::CheckResult;
use schedule::{Checker, Judged, Kind, Running, plan_checkers};
pub use state::{BackendStatus, HealthAt, Status, Trackers, unix_now};
use state::{fresh_status, unchecked_as_reported};

/// Each pool's quorum, held or not (`None` until every backend of the pool reported).
pub type QuorumStatus = Arc<Mutex<Vec<Option<bool>>>>;

/// How often passive signals (refused datagrams, unanswered requests, replies) are collected
/// from the workers, and recovery probes started ([`Monitor::poll`]).
pub const POLL: Duration = Duration::from_millis(100);

/// Where health reports a flip: the publisher, which publishes a snapshot with the view it is
/// given at once (before the notify hook runs), and whose snapshot tells backend ids.
pub trait Publish {
    /// Publishes a snapshot with `health`.
    fn publish(&self, health: &dyn HealthView);

    /// The snapshot published last.
    fn published(&self) -> Arc<Snapshot>;
}

/// Every backend's health: turns check results, passive signals and recovery probes into
/// state, and reports flips to the publisher.
pub struct Monitor {
    /// The id of the next checker or recovery probe started.
    next_id: u64,
    /// Every checker and recovery probe task (aborted with the monitor).
    tasks: tokio::task::JoinSet<()>,
    /// Checkers and recovery probes running, by id.
    running: std::collections::HashMap<u64, Running>,
    results: (mpsc::Sender<CheckResult>, mpsc::Receiver<CheckResult>),
    /// The running configuration, as the publisher last handed it.
    cfg: Arc<Config>,
    trackers: Trackers,
    quorum: Vec<QuorumState>,
    status: Status,
    /// Each pool's quorum as the admin endpoint shows it: held or not, once known.
    quorum_status: QuorumStatus,
    workers: Vec<Arc<WorkerStats>>,
    /// Passive failures and replies per backend id already accounted for.
    passive_seen: Vec<(u64, u64)>,
    /// The kernel data plane, whose passive signals are read too.
    kernel: Option<Arc<crate::kernel::KernelPlane>>,
    /// Per backend address, the kernel's (ICMP errors, replies) at the last read.
    kernel_seen: std::collections::HashMap<std::net::SocketAddr, (u64, u64)>,
    /// The origin of the monitor's [`Time`].
    clock: Instant,
    /// Backends with at least one check result, per pool; a pool's quorum is known (and its
    /// changes notified) only once all of them reported, so startup fires no quorum event.
    reported: Vec<Vec<bool>>,
    quorum_known: Vec<bool>,
    /// Checks udplb could not make, logged at most every 10 s.
    unknown_log: crate::logging::RateLimited,
}

impl Monitor {
    /// A monitor for `cfg`, whose initial state `trackers` the first snapshot was built with,
    /// reading passive signals from `workers`.
    pub fn new(cfg: Arc<Config>, trackers: Trackers, workers: Vec<Arc<WorkerStats>>) -> Monitor {
        let status = fresh_status(&cfg, &trackers);
        let quorum = vec![QuorumState::default(); cfg.pools.len()];
        let reported = unchecked_as_reported(&cfg);
        Monitor {
            next_id: 0,
            tasks: tokio::task::JoinSet::new(),
            running: std::collections::HashMap::new(),
            results: mpsc::channel(1024),
            quorum_known: vec![false; cfg.pools.len()],
            cfg,
            trackers,
            quorum,
            status: Arc::new(Mutex::new(status)),
            quorum_status: QuorumStatus::default(),
            workers,
            passive_seen: Vec::new(),
            kernel: None,
            kernel_seen: std::collections::HashMap::new(),
            clock: Instant::now(),
            reported,
            unknown_log: crate::logging::RateLimited::new(Duration::from_secs(10)),
        }
    }

    /// Also reads the kernel data plane's passive signals (ICMP errors about datagrams to a
    /// backend, replies), as the workers' are read.
    pub fn with_kernel(mut self, kernel: Option<Arc<crate::kernel::KernelPlane>>) -> Monitor {
        self.kernel = kernel;
        self
    }

    /// The kernel data plane's passive signals of `addr` since the last call: (failures,
    /// answered).
    fn kernel_passive(
        &mut self,
        seen: &std::collections::HashMap<std::net::SocketAddr, (u64, u64)>,
        addr: std::net::SocketAddr,
    ) -> (u64, bool) {
        let addr = std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let Some(&(failed, answered)) = seen.get(&addr) else {
            return (0, false);
        };
        let (failed_before, answered_before) = self
            .kernel_seen
            .insert(addr, (failed, answered))
            .unwrap_or_default();
        (
            failed.saturating_sub(failed_before),
            answered > answered_before,
        )
    }

    /// The monitor's clock, as the core's [`Time`].
    fn now(&self) -> Time {
        Time(self.clock.elapsed().as_millis() as u64)
    }

    /// The status the admin endpoint reads.
    pub fn status(&self) -> Status {
        Arc::clone(&self.status)
    }

    /// Each pool's quorum (held or not; `None` until every backend reported).
    pub fn quorum_status(&self) -> QuorumStatus {
        Arc::clone(&self.quorum_status)
    }

    /// Copies the pools' quorum into what the admin endpoint reads.
    fn publish_quorum(&self) {
        let now: Vec<Option<bool>> = self
            .quorum
            .iter()
            .zip(&self.quorum_known)
            .map(|(q, &known)| known.then(|| q.held()))
            .collect();
        *self.quorum_status.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }

    /// Health and slow starts now, for a snapshot.
    pub fn view(&self) -> HealthAt<'_> {
        HealthAt {
            trackers: &self.trackers,
            cfg: &self.cfg,
            now: self.now(),
        }
    }

    /// The next check result (never `None`: the monitor holds a sender of its own).
    pub async fn next_result(&mut self) -> Option<CheckResult> {
        self.results.1.recv().await
    }

    /// Every [`POLL`]: collects passive signals, starts due recovery probes.
    pub fn poll(&mut self, publisher: &dyn Publish) {
        // Finished recovery probes leave their output in the set until joined.
        while self.tasks.try_join_next().is_some() {}
        self.collect_passive(publisher);
        self.start_recovery_probes();
    }

    /// Starts a checker for every checked backend that has none running with its check, keeps
    /// the others where they are (their schedule, their place in the results' queue), and
    /// stops those of backends that are gone or whose check changed.
    pub fn start_checkers(&mut self) {
        let plan = plan_checkers(&self.running, &self.cfg);
        let keep: std::collections::HashMap<u64, (usize, usize)> = plan.keep.into_iter().collect();
        self.running.retain(|id, r| {
            if matches!(r.kind, Kind::Recovery(_)) {
                return true; // see keep_recovery_probes
            }
            match keep.get(id) {
                Some(&(pi, bi)) => {
                    (r.pool, r.backend) = (pi, bi);
                    true
                }
                None => {
                    r.task.abort();
                    false
                }
            }
        });
        for (pi, bi) in plan.start {
            self.start_checker(pi, bi);
        }
    }

    fn start_checker(&mut self, pi: usize, bi: usize) {
        let pool = &self.cfg.pools[pi];
        let b = &pool.backends[bi];
        let Some(check) = b.active_check(pool) else {
            return;
        };
        let ready = match probe::Ready::new(&check.probe) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::error!(pool = %pool.name, backend = %b.spec.addr, error = %e, "health check not started");
                return;
            }
        };
        let target = SocketAddr::new(b.spec.addr.ip(), check.port.unwrap_or(b.spec.addr.port()));
        let id = self.next_id;
        self.next_id += 1;
        let checker = Checker {
            id,
            addr: b.spec.addr,
            target,
            check: check.clone(),
        };
        let task = self.tasks.spawn(checker.run(ready, self.results.0.clone()));
        self.running.insert(
            id,
            Running {
                pool_name: pool.name.clone(),
                addr: b.spec.addr,
                kind: Kind::Check(check.clone()),
                pool: pi,
                backend: bi,
                task,
            },
        );
    }

    /// After a reload: recovery probes of backends that are still there with the same health
    /// settings (so their tracker, in hold-down, was kept) and still without an active check go
    /// on, at the backend's new place; the others are stopped.
    fn keep_recovery_probes(&mut self) {
        let cfg = Arc::clone(&self.cfg);
        self.running.retain(|_, r| {
            let Kind::Recovery(settings) = &r.kind else {
                return true;
            };
            let place = cfg
                .pools
                .iter()
                .enumerate()
                .find(|(_, p)| p.name == r.pool_name)
                .and_then(|(pi, p)| {
                    let bi = p.backends.iter().position(|b| b.spec.addr == r.addr)?;
                    Some((pi, bi))
                });
            let kept = |&(pi, bi): &(usize, usize)| {
                let pool = &cfg.pools[pi];
                pool.backends[bi].check(pool) == settings.as_ref()
            };
            match place.filter(kept) {
                Some((pi, bi)) => {
                    (r.pool, r.backend) = (pi, bi);
                    true
                }
                _ => {
                    r.task.abort();
                    false
                }
            }
        });
    }

    /// Switches to `cfg`, the configuration the publisher now runs: backends whose pool,
    /// address and check are unchanged keep their health, counters and checker (or recovery
    /// probe); the others start fresh.
    pub fn reconfigure(&mut self, cfg: Arc<Config>) {
        let old_cfg = std::mem::replace(&mut self.cfg, cfg);
        let old_trackers = std::mem::replace(&mut self.trackers, Trackers::initial(&self.cfg));
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let old_status = std::mem::take(&mut *status);
        let mut new_status = fresh_status(&self.cfg, &self.trackers);
        let mut reported = unchecked_as_reported(&self.cfg);
        let mut quorum = vec![QuorumState::default(); self.cfg.pools.len()];
        let mut quorum_known = vec![false; self.cfg.pools.len()];
        for (pi, pool) in self.cfg.pools.iter().enumerate() {
            let Some(opi) = old_cfg.pools.iter().position(|p| p.name == pool.name) else {
                continue;
            };
            let old_pool = &old_cfg.pools[opi];
            quorum[pi] = self.quorum[opi];
            quorum_known[pi] = self.quorum_known[opi];
            for (bi, b) in pool.backends.iter().enumerate() {
                let Some(obi) = old_pool
                    .backends
                    .iter()
                    .position(|ob| ob.spec.addr == b.spec.addr)
                else {
                    continue;
                };
                if b.check(pool) != old_pool.backends[obi].check(old_pool) {
                    continue;
                }
                self.trackers.0[pi][bi] = old_trackers.0[opi][obi];
                new_status[pi][bi] = old_status[opi][obi].clone();
                reported[pi][bi] = self.reported[opi][obi];
            }
        }
        *status = new_status;
        drop(status);
        (self.reported, self.quorum, self.quorum_known) = (reported, quorum, quorum_known);
        self.publish_quorum();
        self.start_checkers();
        self.keep_recovery_probes();
    }

    /// Applies a check result; a flip is reported to `publisher`.
    pub fn apply(&mut self, r: CheckResult, publisher: &dyn Publish) {
        // A result of a checker stopped since (its backend removed, or checked otherwise now)
        // is dropped; the others go to their backend wherever a reload put it.
        let Some(running) = self.running.get(&r.id) else {
            return;
        };
        let (pi, bi) = (running.pool, running.backend);
        let recovery = r.recovery;
        if recovery {
            self.running.remove(&r.id);
        }
        // udplb could not make the check (out of descriptors, say): the backend is neither
        // better nor worse for it. A recovery probe is tried again at the next tick.
        if let Err(probe::Failure::Local(why)) = &r.outcome {
            let backend = self.cfg.pools[pi].backends[bi].spec.addr;
            self.unknown_log.warn(
                "a health check could not be made, udplb's own trouble: counted as unknown",
                &format!("{backend}: {why}"),
            );
            let why = why.clone();
            return self.update_status(pi, bi, |s| {
                s.checks_unknown += 1;
                s.last_unknown = Some(why);
            });
        }
        let outcome = r.outcome.map_err(|f| match f {
            probe::Failure::Backend(why) | probe::Failure::Local(why) => why,
        });
        let r = Judged {
            latency: r.latency,
            outcome,
        };
        if recovery {
            return self.apply_recovery(pi, bi, r, publisher);
        }
        let pool = &self.cfg.pools[pi];
        let Some(check) = pool.backends[bi].active_check(pool) else {
            return;
        };
        let thresholds = check.thresholds;
        let now = self.now();
        self.update_status(pi, bi, |s| {
            match &r.outcome {
                Ok(()) => s.checks_ok += 1,
                Err(e) => {
                    s.checks_failed += 1;
                    s.last_error = Some(e.clone());
                }
            }
            let us = r.latency.as_micros() as u64;
            s.last_check_us = Some(us);
            s.check_latency.record(us);
        });
        let flip = self
            .trackers
            .get_mut(pi, bi)
            .and_then(|t| t.record(r.outcome.is_ok(), now, thresholds));
        if let Some(state) = flip {
            self.on_flip(pi, bi, state, r.outcome.err().as_deref(), publisher);
        }
        self.reported[pi][bi] = true;
        if !self.quorum_known[pi] && self.reported[pi].iter().all(|&r| r) {
            self.settle_quorum(pi);
        }
    }

    /// Every backend of pool `pi` has reported: its quorum state is now known.
    fn settle_quorum(&mut self, pi: usize) {
        let pool = &self.cfg.pools[pi];
        let up = self.trackers.up_count(pi, pool.backends.len());
        self.quorum[pi] = QuorumState::settle(up as u32, pool.quorum);
        self.quorum_known[pi] = true;
        self.publish_quorum();
        if pool.quorum.min_up > 0 {
            tracing::info!(pool = %pool.name, up, min_up = pool.quorum.min_up, held = self.quorum[pi].held(), "quorum");
        }
    }

    /// A recovery probe's result: a backend without an active check, passively ejected, comes
    /// back when its port is no longer refused.
    fn apply_recovery(&mut self, pi: usize, bi: usize, r: Judged, publisher: &dyn Publish) {
        let now = self.now();
        self.update_status(pi, bi, |s| {
            let us = r.latency.as_micros() as u64;
            s.last_check_us = Some(us);
            if let Err(e) = &r.outcome {
                s.last_error = Some(format!("recovery probe: {e}"));
            }
        });
        let flip = self
            .trackers
            .get_mut(pi, bi)
            .and_then(|t| t.record_recovery(r.outcome.is_ok(), now));
        self.show_ejections(pi, bi);
        if let Some(state) = flip {
            self.on_flip(pi, bi, state, None, publisher);
        }
    }

    /// Starts a recovery probe of every backend without an active check whose passive
    /// hold-down is over.
    fn start_recovery_probes(&mut self) {
        let now = self.now();
        let cfg = Arc::clone(&self.cfg);
        for (pi, pool) in cfg.pools.iter().enumerate() {
            for (bi, b) in pool.backends.iter().enumerate() {
                let due = self
                    .trackers
                    .get(pi, bi)
                    .is_some_and(|t| t.recovery_due(now));
                if !due || b.active_check(pool).is_some() || self.probing(pi, bi) {
                    continue;
                }
                let id = self.next_id;
                self.next_id += 1;
                let timeout = b.recovery_timeout(pool);
                let target = b.spec.addr;
                let results = self.results.0.clone();
                let task = self.tasks.spawn(async move {
                    let started = Instant::now();
                    let outcome = probe::reachable(target, timeout).await;
                    let latency = started.elapsed();
                    let _ = results
                        .send(CheckResult {
                            id,
                            recovery: true,
                            latency,
                            outcome,
                        })
                        .await;
                });
                self.running.insert(
                    id,
                    Running {
                        pool_name: pool.name.clone(),
                        addr: b.spec.addr,
                        kind: Kind::Recovery(b.check(pool).cloned()),
                        pool: pi,
                        backend: bi,
                        task,
                    },
                );
            }
        }
    }

    /// Whether backend `bi` of pool `pi` has a recovery probe under way.
    fn probing(&self, pi: usize, bi: usize) -> bool {
        self.running
            .values()
            .any(|r| matches!(r.kind, Kind::Recovery(_)) && (r.pool, r.backend) == (pi, bi))
    }

    /// Feeds what the workers saw of each backend since the last call (passive failures:
    /// refused datagrams and unanswered requests; replies) to its tracker.
    fn collect_passive(&mut self, publisher: &dyn Publish) {
        let snap = publisher.published();
        let failures = udplb_dataplane::passive_failures_by_backend(&self.workers);
        let replies = udplb_dataplane::replies_by_backend(&self.workers);
        let kernel = self
            .kernel
            .as_ref()
            .map(|k| k.passive())
            .unwrap_or_default();
        self.passive_seen.resize(failures.len(), (0, 0));
        let now = self.now();
        let cfg = Arc::clone(&self.cfg);
        for (pi, pool) in snap.pools.iter().enumerate() {
            let Some(cfg_pool) = cfg.pools.get(pi) else {
                continue;
            };
            for (bi, b) in pool.backends.iter().enumerate() {
                let Some(cfg_backend) = cfg_pool.backends.get(bi) else {
                    continue;
                };
                let id = b.id.index();
                let (Some(&failed), Some(&answered)) = (failures.get(id), replies.get(id)) else {
                    continue;
                };
                let (failed_before, answered_before) =
                    std::mem::replace(&mut self.passive_seen[id], (failed, answered));
                let (kernel_failures, kernel_answered) = self.kernel_passive(&kernel, b.spec.addr);
                let seen = Passive {
                    failures: failed.saturating_sub(failed_before) + kernel_failures,
                    answered: answered > answered_before || kernel_answered,
                };
                if seen.failures > 0 {
                    self.update_status(pi, bi, |s| s.passive_failures += seen.failures);
                }
                let mut thresholds = cfg_backend.thresholds(cfg_pool);
                if self.is_last_up(pi, bi) {
                    // Its traffic would have nowhere else to go: passive signals never take the
                    // last up backend of a pool out (an active check still can).
                    thresholds.passive_fall = 0;
                }
                let flip = self
                    .trackers
                    .get_mut(pi, bi)
                    .and_then(|t| t.record_passive(seen, now, thresholds));
                self.show_ejections(pi, bi);
                if let Some(state) = flip {
                    let reason = format!(
                        "passive: {} refused datagrams or unanswered requests in a row",
                        thresholds.passive_fall
                    );
                    self.on_flip(pi, bi, state, Some(&reason), publisher);
                }
            }
        }
    }

    fn on_flip(
        &mut self,
        pi: usize,
        bi: usize,
        state: Health,
        reason: Option<&str>,
        publisher: &dyn Publish,
    ) {
        let pool = &self.cfg.pools[pi];
        let addr = pool.backends[bi].spec.addr;
        let up = self.trackers.up_count(pi, pool.backends.len());
        let total = pool.backends.len();
        match state {
            Health::Up => {
                tracing::info!(pool = %pool.name, backend = %addr, up, total, "backend up")
            }
            Health::Down => {
                tracing::warn!(pool = %pool.name, backend = %addr, reason = reason.unwrap_or(""), up, total, "backend down")
            }
        }
        self.update_status(pi, bi, |s| {
            s.healthy = state == Health::Up;
            s.healthy_since_unix = Some(state::unix_now());
        });
        publisher.publish(&self.view());
        let event = if state == Health::Up {
            Event::BackendUp(addr)
        } else {
            Event::BackendDown(addr)
        };
        self.notify(pi, event, up, total);
        if !self.quorum_known[pi] {
            return;
        }
        let changed = self.quorum[pi].update(up as u32, pool.quorum);
        self.publish_quorum();
        if let Some(held) = changed {
            let event = if held {
                Event::QuorumRegained
            } else {
                Event::QuorumLost
            };
            tracing::warn!(pool = %pool.name, up, total, min_up = pool.quorum.min_up, "{}", event.name());
            self.notify(pi, event, up, total);
        }
    }

    fn notify(&self, pi: usize, event: Event, up: usize, total: usize) {
        let pool = &self.cfg.pools[pi];
        if let Some(command) = &pool.notify {
            notify::fire(command, event, &pool.name, up, total);
        }
    }

    /// Whether backend `bi` is the only one of pool `pi` that is up.
    fn is_last_up(&self, pi: usize, bi: usize) -> bool {
        let total = self.cfg.pools[pi].backends.len();
        self.trackers.is_up(pi, bi) && self.trackers.up_count(pi, total) == 1
    }

    /// Copies a backend's run of passive ejections into its status.
    fn show_ejections(&self, pi: usize, bi: usize) {
        let ejections = self.trackers.get(pi, bi).map_or(0, Tracker::ejections);
        self.update_status(pi, bi, |s| s.passive_ejections = u64::from(ejections));
    }

    fn update_status(&self, pi: usize, bi: usize, f: impl FnOnce(&mut BackendStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.get_mut(pi).and_then(|p| p.get_mut(bi)) {
            f(s);
        }
    }
}
