//! From a validated configuration to the snapshot the workers read.
//!
//! Owns: [`snapshot_of`], the one function that turns a [`Config`] into a [`Snapshot`] (used at
//! startup, and by every later change, so they cannot disagree).
//! Must not: touch sockets or threads.

use udplb_config::Config;
use udplb_core::snapshot::{BackendInput, ListenerSpec, PoolInput, Snapshot};

/// Builds generation `generation` of the snapshot for `cfg`, keeping backend ids of `previous`.
pub fn snapshot_of(cfg: &Config, generation: u64, previous: Option<&Snapshot>) -> Snapshot {
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
            max_flows: l.max_flows,
            max_datagram_size: l.max_datagram_size,
        })
        .collect();
    let pools = cfg
        .pools
        .iter()
        .map(|p| PoolInput {
            name: p.name.clone(),
            scheduler: p.scheduler,
            backends: p
                .backends
                .iter()
                .map(|b| BackendInput {
                    spec: b.spec,
                    admin: b.state,
                    healthy: true,
                })
                .collect(),
        })
        .collect();
    Snapshot::build(generation, listeners, pools, previous)
}
