//! The validated configuration: what udplb runs.

use std::net::SocketAddr;
use std::time::Duration;

use udplb_core::snapshot::AdminState;
use udplb_core::{Affinity, BackendSpec, SchedulerKind, SessionMode};

use crate::defaults;

/// A whole configuration.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Config {
    /// Process-wide settings.
    pub runtime: Runtime,
    /// The admin endpoint, when enabled.
    pub admin: Option<Admin>,
    /// Listeners (virtual services), in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Pools of backends, in file order.
    pub pools: Vec<PoolConfig>,
}

/// `[runtime]`
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Runtime {
    /// Worker threads; `None`: one per CPU.
    pub workers: Option<usize>,
}

/// `[admin]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    /// Address of the HTTP admin endpoint (status and counters).
    pub listen: SocketAddr,
}

/// `[listeners.NAME]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The table name.
    pub name: String,
    /// Address to receive client datagrams on (may be a wildcard).
    pub address: SocketAddr,
    /// Name of the pool that serves it.
    pub pool: String,
    /// Session mode.
    pub mode: SessionMode,
    /// What makes a client sticky.
    pub affinity: Affinity,
    /// Idle time after which a flow closes.
    pub idle_timeout: Duration,
    /// Flow cap over all workers.
    pub max_flows: u32,
    /// Largest datagram forwarded in either direction.
    pub max_datagram_size: usize,
}

impl ListenerConfig {
    /// A listener with every optional setting at its default.
    pub fn new(name: String, address: SocketAddr, pool: String) -> Self {
        ListenerConfig {
            name,
            address,
            pool,
            mode: SessionMode::Flow,
            affinity: Affinity::IpPort,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_flows: defaults::MAX_FLOWS,
            max_datagram_size: defaults::MAX_DATAGRAM_SIZE,
        }
    }
}

/// `[pools.NAME]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// The table name.
    pub name: String,
    /// Scheduling algorithm.
    pub scheduler: SchedulerKind,
    /// Backends in file order.
    pub backends: Vec<BackendConfig>,
}

/// One entry of a pool's `backends`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Address, weight, backup flag.
    pub spec: BackendSpec,
    /// Operator state at startup.
    pub state: AdminState,
}

impl From<BackendSpec> for BackendConfig {
    fn from(spec: BackendSpec) -> Self {
        BackendConfig {
            spec,
            state: AdminState::Enabled,
        }
    }
}

impl Config {
    /// Checks every rule a configuration must follow; each error reads `key.path: message`.
    /// [`crate::parse`] applies the same rules and adds file and line.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let problems = crate::rules::check(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems
                .into_iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect())
        }
    }
}
