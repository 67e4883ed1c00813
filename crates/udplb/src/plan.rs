//! From a validated configuration to the snapshot the workers read.
//!
//! Owns: [`snapshot_of`], the one function that turns a [`Config`] into a [`Snapshot`] (used at
//! startup, and by every later change, so they cannot disagree).
//! Must not: touch sockets or threads.

use std::sync::Arc;

use udplb_config::{Config, ListenerConfig};
use udplb_core::Affinity;
use udplb_core::acl::{Acl, CidrSet};
use udplb_core::affinity::{Persistence, PersistenceSettings};
use udplb_core::payload::{KeySpec, PayloadKey};
use udplb_core::ratelimit::{LimitSettings, Limits};
use udplb_core::snapshot::{BackendInput, ListenerSpec, PoolInput, Snapshot};
use udplb_core::source::SourceGuard;

use crate::host::Addresses;

/// Health of every backend, by pool and backend index in the config.
pub trait HealthView {
    /// Whether backend `backend` of pool `pool` is up.
    fn is_up(&self, pool: usize, backend: usize) -> bool;

    /// Slow start: the share (0 to 1) of its weight backend `backend` of pool `pool` gets now.
    fn ramp(&self, _pool: usize, _backend: usize) -> f64 {
        1.0
    }
}

/// While a slow start lasts, every weight of the pool is multiplied by this, so that a
/// ramping backend of weight 1 gets a share finer than all or nothing.
const RAMP_SCALE: u32 = 100;

/// Builds generation `generation` of the snapshot for `cfg` with backend health from `health`,
/// keeping backend ids of `previous`. This host's addresses are read for the snapshot's
/// [`SourceGuard`]; a backend that is one of udplb's own listeners (a local address on a
/// wildcard listener's port) or a broadcast address never takes traffic.
pub fn snapshot_of(
    cfg: &Config,
    generation: u64,
    previous: Option<&Snapshot>,
    health: &dyn HealthView,
) -> Snapshot {
    let host = Addresses::read();
    let guard = SourceGuard::new(
        cfg.listeners.iter().map(|l| l.address),
        cfg.pools
            .iter()
            .flat_map(|p| p.backends.iter().map(|b| b.spec.addr)),
        host.local.iter().copied(),
    );
    let listeners = cfg
        .listeners
        .iter()
        .map(|l| ListenerSpec {
            name: l.name.clone(),
            address: l.address,
            pool: cfg
                .pools
                .iter()
                .position(|p| p.name == l.pool)
                .expect("validated config: listener names an existing pool"),
            mode: l.mode,
            affinity: l.affinity,
            idle_timeout: l.idle_timeout,
            reply_timeout: l.reply_timeout,
            max_flows: l.max_flows,
            max_datagram_size: l.max_datagram_size,
            acl: Acl::new(&l.allow, &l.deny),
            limits: l
                .limits
                .map(|settings| limits_for(&l.name, settings, previous)),
            persistence: persistence_settings(l)
                .map(|settings| persistence_for(&l.name, settings, previous)),
            proxy_ingress: l.proxy_protocol,
            proxy_from: CidrSet::new(&l.proxy_from),
            abuse_pool: l
                .abuse_pool
                .as_ref()
                .and_then(|name| cfg.pools.iter().position(|p| &p.name == name)),
            gro: l.gro,
            socket_buffer: l.socket_buffer,
            shared_upstream: l.shared_upstream,
            tcp: cfg.takes_tcp(l).then_some(l.tcp_max_connections),
        })
        .collect();
    let pools = cfg
        .pools
        .iter()
        .enumerate()
        .map(|(pi, p)| PoolInput {
            name: p.name.clone(),
            scheduler: p.scheduler,
            backends: {
                let weights = weights_of(p, pi, health);
                p.backends
                    .iter()
                    .enumerate()
                    .map(|(bi, b)| BackendInput {
                        spec: b.spec,
                        admin: b.state,
                        healthy: health.is_up(pi, bi)
                            && usable(&p.name, b.spec.addr, &guard, &host),
                        weight: weights[bi],
                    })
                    .collect()
            },
            on_down: p.on_down,
            all_down: p.all_down,
            proxy_header: p.proxy_protocol,
            strip_reply_proxy: p.strip_reply_proxy,
            transparent: p.transparent,
            rebalance: p.rebalance,
            payload_key: p
                .payload_key
                .as_ref()
                .map(|spec| payload_key_for(&p.name, spec, previous)),
        })
        .collect();
    let mut snapshot = Snapshot::build(generation, listeners, pools, previous);
    snapshot.guard = Arc::new(guard);
    snapshot
}

/// The weights the schedulers of pool `p` (index `pi`) use: the configured ones, or while a
/// backend's slow start lasts, all of them times [`RAMP_SCALE`] and the ramping ones times
/// their share (at least 1).
fn weights_of(p: &udplb_config::PoolConfig, pi: usize, health: &dyn HealthView) -> Vec<u32> {
    let ramps: Vec<f64> = (0..p.backends.len())
        .map(|bi| health.ramp(pi, bi))
        .collect();
    if ramps.iter().all(|&r| r >= 1.0) {
        return p.backends.iter().map(|b| b.spec.weight).collect();
    }
    p.backends
        .iter()
        .zip(ramps)
        .map(|(b, ramp)| {
            let full = b.spec.weight.saturating_mul(RAMP_SCALE);
            ((f64::from(full) * ramp) as u32).clamp(1, full)
        })
        .collect()
}

/// Whether udplb may send to backend `addr` of pool `pool`: not when it is udplb's own
/// listener (each datagram would come back as a new client's, without end) or a broadcast
/// address. The configuration rules refuse the cases they can see (a listener's address, a
/// loopback address on a wildcard listener's port); this catches the ones only the host's
/// interfaces tell.
fn usable(pool: &str, addr: std::net::SocketAddr, guard: &SourceGuard, host: &Addresses) -> bool {
    let why = if guard.is_listener(addr) {
        "it is one of udplb's own listener addresses"
    } else if host.is_broadcast(addr.ip()) {
        "it is a broadcast address"
    } else {
        return true;
    };
    tracing::warn!(pool, backend = %addr, "backend never takes traffic: {why}");
    false
}

/// What listener `l` remembers clients by, and for how long: with `persistence`, by its
/// affinity (ip:port or ip) for that long; with IP affinity alone, by ip for the idle timeout;
/// else nothing. At most `max_flows` clients.
fn persistence_settings(l: &ListenerConfig) -> Option<PersistenceSettings> {
    let timeout = match (l.persistence, l.affinity) {
        (Some(d), _) => d,
        (None, Affinity::Ip) => l.idle_timeout,
        (None, Affinity::IpPort) => return None,
    };
    Some(PersistenceSettings {
        by_port: l.affinity == Affinity::IpPort,
        timeout,
        cap: l.max_flows as usize,
    })
}

/// The persistence table of listener `name`: the running one when a reload keeps its settings
/// (clients keep their backends), else a new one.
fn persistence_for(
    name: &str,
    settings: PersistenceSettings,
    previous: Option<&Snapshot>,
) -> Arc<Persistence> {
    previous
        .and_then(|p| p.listeners.iter().find(|l| l.name == name))
        .and_then(|l| l.persistence.as_ref())
        .filter(|p| p.settings() == settings)
        .map_or_else(|| Arc::new(Persistence::new(settings)), Arc::clone)
}

/// The payload key of pool `name`: the running one when a reload keeps its settings (RADIUS
/// conversations keep the `State`s learned), else a new one.
fn payload_key_for(name: &str, spec: &KeySpec, previous: Option<&Snapshot>) -> Arc<PayloadKey> {
    previous
        .and_then(|p| p.pools.iter().find(|p| p.name == name))
        .and_then(|p| p.payload_key.as_ref())
        .filter(|k| k.spec() == spec)
        .map_or_else(|| Arc::new(PayloadKey::new(spec.clone())), Arc::clone)
}

/// The limiters of listener `name`: the running ones when a reload keeps their settings (so
/// a reload does not hand abusers fresh budgets), else new ones.
fn limits_for(name: &str, settings: LimitSettings, previous: Option<&Snapshot>) -> Arc<Limits> {
    previous
        .and_then(|p| p.listeners.iter().find(|l| l.name == name))
        .and_then(|l| l.limits.as_ref())
        .filter(|l| l.settings() == settings)
        .map_or_else(|| Arc::new(Limits::new(settings)), Arc::clone)
}
