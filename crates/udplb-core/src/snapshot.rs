//! The immutable view of the configuration that workers read.
//!
//! Owns: [`Snapshot`] (listeners, pools, backends with their admin and health state) and the
//! scheduling tables prebuilt for each pool's active tier. A snapshot is built once by the
//! control plane, published atomically, and never changed: a change is a new snapshot.
//! Must not: contain anything that changes per datagram (that lives in the worker: cursors,
//! flow counts), or anything that needs I/O to build.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::acl::{Acl, CidrSet};
use crate::affinity::Persistence;
use crate::model::{
    Affinity, AllDownPolicy, BackendSpec, FailurePolicy, ProxyHeader, SchedulerKind, SessionMode,
};
use crate::payload::PayloadKey;
use crate::ratelimit::Limits;
use crate::sched::{Sequence, Tier};
use crate::source::SourceGuard;

/// A backend's identity across snapshots: the same (pool, address) keeps the same id when a
/// new snapshot is built from a previous one, so flows and per-backend counters survive reloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

impl BackendId {
    /// The id as an index into per-backend arrays.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What the operator asked of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdminState {
    /// Takes new flows.
    #[default]
    Enabled,
    /// Takes no new flows; existing flows continue until idle.
    Draining,
    /// Takes nothing; existing flows move at their next datagram.
    Disabled,
}

/// A backend as the workers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Stable identity (see [`BackendId`]).
    pub id: BackendId,
    /// Address, weight, backup flag.
    pub spec: BackendSpec,
    /// Operator state.
    pub admin: AdminState,
    /// Health as last reported by the health checker (true when unchecked).
    pub healthy: bool,
    /// The weight schedulers use: the configured one, scaled while a slow start lasts.
    pub weight: u32,
}

impl Backend {
    /// Whether the backend may receive new flows.
    pub fn takes_new_flows(&self) -> bool {
        self.admin == AdminState::Enabled && self.healthy
    }
}

/// A pool: its backends and the scheduling tables for whichever tier is active.
#[derive(Clone, Debug)]
pub struct Pool {
    /// Name from the config.
    pub name: String,
    /// Scheduling algorithm.
    pub scheduler: SchedulerKind,
    /// What happens to flows whose backend goes down.
    pub on_down: FailurePolicy,
    /// Where new flows go when no primary is up.
    pub all_down: AllDownPolicy,
    /// All backends, primaries and backups, in config order.
    pub backends: Vec<Backend>,
    /// The backends new flows go to: available primaries, or available backups when no
    /// primary is available, with the prebuilt tables of the pool's scheduler.
    pub tier: Tier,
    /// The pool's round-robin position, shared by every worker and kept by later snapshots
    /// of the pool.
    pub sequence: Arc<Sequence>,
    /// PROXY protocol v2 header towards the backends.
    pub proxy_header: ProxyHeader,
    /// Remove a PROXY v2 header from the start of backend replies.
    pub strip_reply_proxy: bool,
    /// Send to backends from the client's own address.
    pub transparent: bool,
    /// Flows placed or moved while the pool was missing backends go back into balance at
    /// their first datagram after a pause this long, once the pool is whole; `None`: never.
    pub rebalance: Option<Duration>,
    /// What datagrams are placed by, read from their bytes (and, for RADIUS, what was learned
    /// from replies, shared by the workers); `None`: nothing is read.
    pub payload_key: Option<Arc<PayloadKey>>,
    /// Some enabled primary is down: flows placed now are displaced ones.
    pub degraded: bool,
}

impl Pool {
    /// Position in `backends` of the backend with address `addr`.
    #[inline]
    pub fn position(&self, addr: &SocketAddr) -> Option<usize> {
        self.backends.iter().position(|b| b.spec.addr == *addr)
    }

    /// Whether an established flow on backend `index` stays there: not while the backend is
    /// disabled; while it is down only under [`FailurePolicy::Keep`] or when `fail-open` made it a
    /// member again.
    #[inline]
    pub fn keeps_flows(&self, index: usize) -> bool {
        let b = &self.backends[index];
        b.admin != AdminState::Disabled
            && (b.healthy || self.on_down == FailurePolicy::Keep || self.tier.contains(index))
    }

    /// Position in `backends` of the backend with id `id`.
    #[inline]
    pub fn position_of_id(&self, id: BackendId) -> Option<usize> {
        self.backends.iter().position(|b| b.id == id)
    }

    /// Whether backend `index` holds more than its share of the flows on the pool's members
    /// (`load`: live flows per backend id), by weight, with one flow of slack.
    pub fn overloaded(&self, index: usize, load: &[u32]) -> bool {
        let flows =
            |i: usize| u64::from(load.get(self.backends[i].id.index()).copied().unwrap_or(0));
        let weight = |i: usize| u64::from(self.backends[i].weight.max(1));
        let (total, weights) = self
            .tier
            .members()
            .fold((0, 0), |(f, w), i| (f + flows(i), w + weight(i)));
        if !self.tier.contains(index) || weights == 0 {
            return false;
        }
        // flows(index) > total * weight(index) / weights + 1, without division.
        flows(index) * weights > total * weight(index) + weights
    }
}

/// A listener (virtual service).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Name from the config.
    pub name: String,
    /// Address the listener binds (may be a wildcard).
    pub address: SocketAddr,
    /// Index into [`Snapshot::pools`].
    pub pool: usize,
    /// Session mode.
    pub mode: SessionMode,
    /// What makes a client sticky.
    pub affinity: Affinity,
    /// A flow closes after this long without a datagram in either direction.
    pub idle_timeout: Duration,
    /// Request-response mode: a request left unanswered this long is a passive failure of its
    /// backend.
    pub reply_timeout: Duration,
    /// Flow cap for the whole listener (each of W workers holds at most ceil(max_flows / W)).
    pub max_flows: u32,
    /// Largest datagram forwarded in either direction; larger ones are dropped and counted.
    pub max_datagram_size: usize,
    /// Which clients are served (checked on every datagram, before any flow state).
    pub acl: Acl,
    /// Rate limiters shared by the workers (carried over by reloads that keep the settings).
    pub limits: Option<Arc<Limits>>,
    /// Which backend each client last used, shared by the workers (carried over by reloads
    /// that keep the settings); `None`: clients are not remembered.
    pub persistence: Option<Arc<Persistence>>,
    /// Datagrams arrive through another balancer with PROXY v2 headers naming the client.
    pub proxy_ingress: bool,
    /// With `proxy_ingress`: the only senders trusted to send them (empty: any sender).
    pub proxy_from: CidrSet,
    /// Index into [`Snapshot::pools`] of the pool that serves refused clients instead of
    /// dropping their datagrams.
    pub abuse_pool: Option<usize>,
    /// The listener's sockets receive GRO trains (`UDP_GRO`), passed on whole (`UDP_SEGMENT`)
    /// where no per-datagram policy applies.
    pub gro: bool,
    /// Receive and send buffer of each of the listener's sockets, in bytes (applied when the
    /// sockets are bound).
    pub socket_buffer: usize,
    /// New flows take a (socket, backend) pair from the worker's shared upstream sockets
    /// instead of a socket of their own.
    pub shared_upstream: bool,
    /// The listener also takes TCP connections (proxied to the pool's backends), at most this
    /// many at once; `None`: UDP only.
    pub tcp: Option<u32>,
}

/// A pool as given to [`Snapshot::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInput {
    /// Name.
    pub name: String,
    /// Scheduling algorithm.
    pub scheduler: SchedulerKind,
    /// Backends with their states.
    pub backends: Vec<BackendInput>,
    /// What happens to flows whose backend goes down.
    pub on_down: FailurePolicy,
    /// Where new flows go when no primary is up.
    pub all_down: AllDownPolicy,
    /// PROXY protocol v2 header towards the backends.
    pub proxy_header: ProxyHeader,
    /// Remove a PROXY v2 header from the start of backend replies.
    pub strip_reply_proxy: bool,
    /// Send to backends from the client's own address.
    pub transparent: bool,
    /// See [`Pool::rebalance`].
    pub rebalance: Option<Duration>,
    /// See [`Pool::payload_key`].
    pub payload_key: Option<Arc<PayloadKey>>,
}

impl PoolInput {
    /// A pool with the default policies.
    pub fn new(name: String, scheduler: SchedulerKind, backends: Vec<BackendInput>) -> Self {
        PoolInput {
            name,
            scheduler,
            backends,
            on_down: FailurePolicy::default(),
            all_down: AllDownPolicy::default(),
            proxy_header: ProxyHeader::Off,
            strip_reply_proxy: false,
            transparent: false,
            rebalance: None,
            payload_key: None,
        }
    }
}

/// A backend as given to [`Snapshot::build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInput {
    /// Address, weight, backup flag.
    pub spec: BackendSpec,
    /// Operator state.
    pub admin: AdminState,
    /// Health.
    pub healthy: bool,
    /// The weight schedulers use ([`Backend::weight`]).
    pub weight: u32,
}

impl From<BackendSpec> for BackendInput {
    fn from(spec: BackendSpec) -> Self {
        BackendInput {
            spec,
            admin: AdminState::Enabled,
            healthy: true,
            weight: spec.weight,
        }
    }
}

/// Everything the workers need, immutable. Published as a whole; never mutated.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Increases with every published snapshot; workers notice changes by comparing it.
    pub generation: u64,
    /// Listeners in config order.
    pub listeners: Vec<ListenerSpec>,
    /// Pools in config order.
    pub pools: Vec<Pool>,
    /// One more than the largest [`BackendId`] in use (size for per-backend arrays).
    pub backend_id_limit: u32,
    /// Whether new flows are admitted (false while shutting down: established flows are served
    /// until they end or the grace period is over).
    pub admitting: bool,
    /// Sources no new flow may have (udplb's own addresses, backends, port 0, ...).
    pub guard: Arc<SourceGuard>,
}

impl Snapshot {
    /// Builds a snapshot, prebuilding every pool's scheduling tables. Backend ids are reused
    /// from `previous` for the same (pool name, address); new backends get fresh ids.
    pub fn build(
        generation: u64,
        listeners: Vec<ListenerSpec>,
        pools: Vec<PoolInput>,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let mut next_id = previous.map_or(0, |p| p.backend_id_limit);
        let pools = pools
            .into_iter()
            .map(|input| {
                let old = previous.and_then(|p| p.pools.iter().find(|op| op.name == input.name));
                let backends: Vec<Backend> = input
                    .backends
                    .iter()
                    .map(|b| {
                        let reused = old.and_then(|op| {
                            op.backends.iter().find(|ob| ob.spec.addr == b.spec.addr)
                        });
                        let id = reused.map(|ob| ob.id).unwrap_or_else(|| {
                            next_id += 1;
                            BackendId(next_id - 1)
                        });
                        Backend {
                            id,
                            spec: b.spec,
                            admin: b.admin,
                            healthy: b.healthy,
                            weight: b.weight,
                        }
                    })
                    .collect();
                let tier = Tier::build(input.scheduler, &backends, input.all_down);
                let sequence = old.map_or_else(Arc::default, |op| Arc::clone(&op.sequence));
                let degraded = backends
                    .iter()
                    .any(|b| !b.spec.backup && b.admin == AdminState::Enabled && !b.healthy);
                Pool {
                    name: input.name,
                    scheduler: input.scheduler,
                    on_down: input.on_down,
                    all_down: input.all_down,
                    backends,
                    tier,
                    sequence,
                    proxy_header: input.proxy_header,
                    strip_reply_proxy: input.strip_reply_proxy,
                    transparent: input.transparent,
                    rebalance: input.rebalance,
                    payload_key: input.payload_key,
                    degraded,
                }
            })
            .collect();
        Snapshot {
            generation,
            listeners,
            pools,
            backend_id_limit: next_id,
            admitting: true,
            guard: Arc::default(),
        }
    }

    /// The pool of listener `listener`.
    #[inline]
    pub fn pool_of(&self, listener: usize) -> &Pool {
        &self.pools[self.listeners[listener].pool]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16) -> BackendSpec {
        BackendSpec::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn pool(name: &str, ports: &[u16]) -> PoolInput {
        PoolInput::new(
            name.into(),
            SchedulerKind::RoundRobin,
            ports.iter().map(|p| spec(*p).into()).collect(),
        )
    }

    #[test]
    fn ids_survive_rebuilds() {
        let a = Snapshot::build(1, vec![], vec![pool("p", &[1, 2, 3])], None);
        let b = Snapshot::build(2, vec![], vec![pool("p", &[3, 4, 1])], Some(&a));
        let id = |s: &Snapshot, port| {
            s.pools[0]
                .backends
                .iter()
                .find(|b| b.spec.addr.port() == port)
                .unwrap()
                .id
        };
        assert_eq!(id(&a, 1), id(&b, 1));
        assert_eq!(id(&a, 3), id(&b, 3));
        assert_eq!(id(&b, 4), BackendId(3));
        assert_eq!(b.backend_id_limit, 4);
    }

    #[test]
    fn flows_stay_on_a_down_backend_only_when_the_policy_says_so() {
        let build = |on_down, all_down| {
            let mut input = pool("p", &[1, 2]);
            input.on_down = on_down;
            input.all_down = all_down;
            input.backends[0].healthy = false;
            Snapshot::build(1, vec![], vec![input], None)
        };
        let s = build(FailurePolicy::Reschedule, AllDownPolicy::Backup);
        assert!(!s.pools[0].keeps_flows(0) && s.pools[0].keeps_flows(1));
        let s = build(FailurePolicy::Keep, AllDownPolicy::Backup);
        assert!(s.pools[0].keeps_flows(0));
        let mut input = pool("p", &[1]);
        input.backends[0].admin = AdminState::Disabled;
        input.on_down = FailurePolicy::Keep;
        let s = Snapshot::build(1, vec![], vec![input], None);
        assert!(
            !s.pools[0].keeps_flows(0),
            "disabled always moves its flows"
        );
        let mut input = pool("p", &[1]);
        input.backends[0].healthy = false;
        input.all_down = AllDownPolicy::FailOpen;
        let s = Snapshot::build(1, vec![], vec![input], None);
        assert!(
            s.pools[0].keeps_flows(0),
            "fail-open keeps serving from the down primary"
        );
    }
}
