//! [`Publisher`]: the running configuration and the one writer of the published snapshot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use udplb_config::Config;
use udplb_core::snapshot::Snapshot;

use super::{Change, Command, Error};
use crate::health;
use crate::plan::{HealthView, snapshot_of};

/// How often this host's addresses are read.
const HOST_POLL: Duration = Duration::from_secs(2);

/// Steps of a slow start: the weight a ramping backend gets is republished this many times
/// over the pool's `slow_start`.
const RAMP_STEPS: f64 = 10.0;

/// Owns the running configuration and publishes every snapshot: after a reload, an API change,
/// a health flip, a step of a slow start, a change of this host's addresses, and when udplb
/// stops admitting new flows.
pub struct Publisher {
    cfg: Arc<Config>,
    /// False once shutting down.
    admitting: bool,
    /// Where snapshots are published (the workers and the admin endpoint read it).
    shared: Arc<ArcSwap<Snapshot>>,
    /// Where every configuration put in force goes (the admin endpoint sizes itself by it).
    configs: tokio::sync::watch::Sender<Arc<Config>>,
    /// Backends in a slow start, with the step of their ramp last published.
    ramps: HashMap<(usize, usize), u8>,
    /// This host's addresses when last read, and when that was: a change (a VRRP address
    /// moving in) publishes a snapshot, whose source guard and backends follow it.
    host: (crate::host::Addresses, Instant),
}

impl Publisher {
    /// A publisher of `cfg`, whose first snapshot is already in `shared`.
    pub fn new(
        cfg: Arc<Config>,
        shared: Arc<ArcSwap<Snapshot>>,
        configs: tokio::sync::watch::Sender<Arc<Config>>,
    ) -> Publisher {
        Publisher {
            cfg,
            admitting: true,
            shared,
            configs,
            ramps: HashMap::new(),
            host: (crate::host::Addresses::read(), Instant::now()),
        }
    }

    /// Publishes a snapshot with the current configuration and `health` (backend ids kept).
    pub fn publish(&self, health: &dyn HealthView) {
        let previous = self.shared.load_full();
        let mut next = snapshot_of(&self.cfg, previous.generation + 1, Some(&previous), health);
        next.admitting = self.admitting;
        self.shared.store(Arc::new(next));
    }

    /// Carries out `command`; `health` is told of a new configuration before it is published.
    pub fn handle(&mut self, command: Command, health: &mut health::Monitor) {
        match command {
            Command::Reload(cfg, applied) => {
                self.reload(cfg, health, None);
                let _ = applied.send(());
            }
            Command::StopAdmitting => {
                self.admitting = false;
                self.publish(&health.view());
            }
            Command::Change(change, origin, reply) => {
                let outcome = edited(&self.cfg, change).map(|cfg| {
                    let changed = cfg.is_some();
                    if let Some(cfg) = cfg {
                        self.reload(Arc::new(cfg), health, Some(&origin));
                    }
                    changed
                });
                if let Err(e) = &outcome {
                    tracing::warn!(
                        peer = ?origin.peer,
                        request = %origin.request,
                        error = %e,
                        "admin API change refused"
                    );
                }
                let _ = reply.send(outcome);
            }
        }
    }

    /// Switches to `cfg` (asked through the admin API by `origin`, or a reload): `health`
    /// keeps the state of backends whose pool, address and check are unchanged and starts the
    /// others fresh; one snapshot is published; every difference is logged.
    fn reload(
        &mut self,
        cfg: Arc<Config>,
        health: &mut health::Monitor,
        origin: Option<&super::audit::Origin>,
    ) {
        for change in super::audit::differences(&self.cfg, &cfg) {
            match origin {
                Some(o) => tracing::info!(
                    peer = ?o.peer,
                    request = %o.request,
                    %change,
                    "admin API change"
                ),
                None => tracing::info!(%change, "configuration reload"),
            }
        }
        // Backend indices may mean others now; the next tick finds the ramps again.
        self.ramps.clear();
        self.cfg = cfg;
        health.reconfigure(Arc::clone(&self.cfg));
        self.publish(&health.view());
        self.configs.send_replace(Arc::clone(&self.cfg));
        tracing::info!(
            generation = self.shared.load().generation,
            "configuration reloaded"
        );
    }

    /// Republishes the weights of backends in a slow start at each of its [`RAMP_STEPS`] steps,
    /// and once more when it is over.
    pub fn advance_slow_starts(&mut self, health: &dyn HealthView) {
        if ramp_steps(&self.cfg, health, &mut self.ramps) {
            self.publish(health);
        }
    }

    /// Reads this host's addresses every [`HOST_POLL`] and publishes a snapshot when they
    /// changed: its source guard and the backends that would be udplb itself follow them.
    pub fn follow_host_addresses(&mut self, health: &dyn HealthView) {
        let now = Instant::now();
        if now.duration_since(self.host.1) < HOST_POLL {
            return;
        }
        let addresses = crate::host::Addresses::read();
        let changed = addresses != self.host.0;
        self.host = (addresses, now);
        if changed {
            tracing::info!("this host's addresses changed");
            self.publish(health);
        }
    }
}

impl health::Publish for Publisher {
    fn publish(&self, health: &dyn HealthView) {
        Publisher::publish(self, health);
    }

    fn published(&self) -> Arc<Snapshot> {
        self.shared.load_full()
    }
}

/// `change` made to a copy of `running` and validated like a file: the configuration to put
/// in force, `None` when nothing needed changing, or why the change cannot be made.
fn edited(running: &Config, change: Change) -> Result<Option<Config>, Error> {
    let mut cfg = running.clone();
    if !change(&mut cfg)? {
        return Ok(None);
    }
    cfg.validate()
        .map_err(|errors| Error::Conflict(errors.join("; ")))?;
    Ok(Some(cfg))
}

/// Records in `ramps` the step each backend of `cfg` in a slow start has reached under
/// `health` (and forgets those whose slow start is over); whether any step changed.
fn ramp_steps(
    cfg: &Config,
    health: &dyn HealthView,
    ramps: &mut HashMap<(usize, usize), u8>,
) -> bool {
    let mut changed = false;
    for (pi, pool) in cfg.pools.iter().enumerate() {
        if pool.slow_start.is_zero() {
            continue;
        }
        for bi in 0..pool.backends.len() {
            let ramp = health.ramp(pi, bi);
            if ramp >= 1.0 {
                changed |= ramps.remove(&(pi, bi)).is_some();
                continue;
            }
            let step = (ramp * RAMP_STEPS) as u8;
            changed |= ramps.insert((pi, bi), step) != Some(step);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn config(backends: &str, pool_extra: &str) -> Config {
        udplb_config::parse(
            &format!(
                "[listeners.l]\naddress = \"127.0.0.1:5300\"\npool = \"p\"\n[pools.p]\n\
                 backends = [{backends}]\n{pool_extra}"
            ),
            "test.toml",
        )
        .unwrap()
    }

    fn set_weight(weight: u32) -> Change {
        Box::new(move |cfg: &mut Config| {
            let b = &mut cfg.pools[0].backends[0];
            Ok(std::mem::replace(&mut b.spec.weight, weight) != weight)
        })
    }

    /// A change is made to a copy and validated like a file; the running configuration is
    /// never touched here.
    #[test]
    fn a_change_is_validated_like_a_file() {
        let running = config("\"10.0.0.1:53\"", "");
        assert_eq!(edited(&running, set_weight(1)).unwrap(), None, "no-op");
        let cfg = edited(&running, set_weight(3)).unwrap().unwrap();
        assert_eq!(cfg.pools[0].backends[0].spec.weight, 3);
        let Err(Error::Conflict(refused)) = edited(&running, set_weight(0)) else {
            panic!("a weight of 0 is a conflict");
        };
        assert!(refused.contains("weight"), "{refused}");
        let missing = || Error::Conflict("no pool named \"q\"".into());
        let refused = edited(&running, Box::new(move |_| Err(missing())));
        assert_eq!(refused.unwrap_err(), missing());
        assert_eq!(running.pools[0].backends[0].spec.weight, 1);
    }

    /// Every backend of the pool ramping as this says.
    struct Ramping(Cell<f64>);

    impl HealthView for Ramping {
        fn is_up(&self, _: usize, _: usize) -> bool {
            true
        }

        fn ramp(&self, _: usize, _: usize) -> f64 {
            self.0.get()
        }
    }

    /// A slow start is republished at each of its steps and once when it is over, not at
    /// every poll; pools without one never are.
    #[test]
    fn slow_starts_are_republished_once_per_step() {
        let cfg = config("\"10.0.0.1:53\"", "slow_start = \"10s\"\n");
        let health = Ramping(Cell::new(0.05));
        let mut ramps = HashMap::new();
        assert!(ramp_steps(&cfg, &health, &mut ramps), "a new ramp");
        assert!(!ramp_steps(&cfg, &health, &mut ramps), "the same step");
        health.0.set(0.09);
        assert!(!ramp_steps(&cfg, &health, &mut ramps), "still step 0");
        health.0.set(0.31);
        assert!(ramp_steps(&cfg, &health, &mut ramps), "step 3");
        assert_eq!(ramps.get(&(0, 0)), Some(&3));
        health.0.set(1.0);
        assert!(ramp_steps(&cfg, &health, &mut ramps), "over");
        assert!(ramps.is_empty());
        assert!(!ramp_steps(&cfg, &health, &mut ramps), "over already");
        let plain = config("\"10.0.0.1:53\"", "");
        health.0.set(0.5);
        assert!(!ramp_steps(&plain, &health, &mut ramps));
    }

    /// Each command that changes something publishes one snapshot (a change that changes
    /// nothing, or is refused, none); stopping admits no new flow from then on, reloads
    /// included; the admin endpoint hears of every configuration put in force.
    #[test]
    fn commands_publish_one_snapshot_each() {
        let cfg = Arc::new(config("\"10.0.0.1:53\"", ""));
        let trackers = health::Trackers::initial(&cfg);
        let shared = Arc::new(ArcSwap::from_pointee(snapshot_of(&cfg, 1, None, &trackers)));
        let (configs, mut running) = tokio::sync::watch::channel(Arc::clone(&cfg));
        let mut monitor = health::Monitor::new(Arc::clone(&cfg), trackers, Vec::new());
        let mut publisher = Publisher::new(cfg, Arc::clone(&shared), configs);
        let change = |publisher: &mut Publisher, monitor: &mut health::Monitor, c| {
            let (reply, mut outcome) = tokio::sync::oneshot::channel();
            let origin = super::super::audit::Origin {
                peer: None,
                request: "test".into(),
            };
            publisher.handle(Command::Change(c, origin, reply), monitor);
            outcome.try_recv().unwrap()
        };

        assert_eq!(
            change(&mut publisher, &mut monitor, set_weight(1)),
            Ok(false)
        );
        assert!(change(&mut publisher, &mut monitor, set_weight(0)).is_err());
        assert_eq!(shared.load().generation, 1);
        assert!(!running.has_changed().unwrap());

        assert_eq!(
            change(&mut publisher, &mut monitor, set_weight(3)),
            Ok(true)
        );
        let snap = shared.load();
        assert_eq!(snap.generation, 2);
        assert_eq!(snap.pools[0].backends[0].spec.weight, 3);
        assert!(snap.admitting);
        assert_eq!(
            running.borrow_and_update().pools[0].backends[0].spec.weight,
            3
        );

        publisher.handle(Command::StopAdmitting, &mut monitor);
        assert_eq!(shared.load().generation, 3);
        assert!(!shared.load().admitting);

        let two = Arc::new(config("\"10.0.0.1:53\", \"10.0.0.2:53\"", ""));
        let (applied, mut done) = tokio::sync::oneshot::channel();
        publisher.handle(Command::Reload(Arc::clone(&two), applied), &mut monitor);
        assert_eq!(done.try_recv(), Ok(()));
        let snap = shared.load();
        assert_eq!((snap.generation, snap.pools[0].backends.len()), (4, 2));
        assert!(!snap.admitting, "still stopping");
        assert!(Arc::ptr_eq(&running.borrow_and_update(), &two));
        let status = monitor.status();
        assert_eq!(status.lock().unwrap()[0].len(), 2, "health follows");
    }
}
