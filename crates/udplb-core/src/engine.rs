//! The engine: every decision a worker makes about a datagram, as a function of its inputs.
//!
//! Owns: one worker's flow table, what it knows of each flow (the client a PROXY header named,
//! abuse diversion, anti-amplification budget, PROXY delivery, displacement by a failure, the
//! kind of upstream socket it was given), the per-listener map of senders behind another
//! balancer, the per-batch new-flow allowance of an overloaded listener, the random numbers
//! of the schedulers, and its use of the persistence tables it shares with the other workers
//! (which backend each client last used).
//!
//! Inputs in, small verdicts out, in the manner of quinn-proto's `Endpoint::handle`: a client
//! datagram ([`Engine::on_client`]) becomes a [`Verdict`]: drop it with a reason, send it on a
//! flow ([`Send`]), open a flow first ([`Open`], the worker then reports the socket it got with
//! [`Engine::opened`]), or move a flow first ([`Move`], reported with [`Engine::moved`]). A reply
//! ([`Engine::on_reply`]) becomes a [`ReplyVerdict`]. What the kernel said comes back as
//! [`Engine::sent`], [`Engine::socket_failed`] and [`Engine::close`]; time passes with
//! [`Engine::expire`]. Each flow carries an opaque `Io` of the data plane's (its upstream
//! socket) that the engine never looks into.
//!
//! Must not: do I/O, read clocks (time is an argument), draw randomness it was not seeded
//! with, or allocate per datagram (a PROXY client's address is boxed once per flow; the
//! persistence tables are locked when a flow opens, moves or closes, never per datagram of an
//! established flow).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::affinity::Persistence;
use crate::flow::{Expired, FlowHandle, FlowKey, FlowTable, ReplyOutcome, Timeouts};
use crate::handover::{Inherited, Placement};
use crate::hash::ClientKey;
use crate::model::{ProxyHeader, SessionMode};
use crate::payload::{KeySpec, Keyed, PayloadKey};
use crate::sched::{PickInput, pick};
use crate::snapshot::{Backend, BackendId, ListenerSpec, Pool, Snapshot};
use crate::sync::{Outbox, Synced};
use crate::time::Time;
use crate::verdict::{CloseReason, DropReason};

/// While a listener is overloaded, new flows admitted per received batch; the rest are dropped
/// as `overload`. Opening a flow (socket, connect, registration) costs tens of times more than
/// forwarding on one, so a flood of new sources would otherwise starve established flows.
pub const NEW_FLOWS_PER_BATCH_UNDER_BACKLOG: u32 = 8;

/// Listeners (by index) whose flows may share upstream sockets: the data plane's readiness
/// tokens for those sockets encode the listener index in 10 bits. Flows of later listeners get
/// a socket each.
pub const SHARED_LISTENERS: usize = 1 << 10;

/// A datagram from a client, as received.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    /// The listener it arrived on.
    pub listener: u16,
    /// Its sender.
    pub source: SocketAddr,
    /// The address it was sent to, on a wildcard listener (`None` on one bound to an address).
    pub local: Option<IpAddr>,
    /// Its bytes: one datagram, or a GRO train of `segment_size` segments.
    pub data: &'a [u8],
    /// It did not fit the receive buffer.
    pub truncated: bool,
    /// A GRO train's segment size.
    pub segment_size: Option<u16>,
}

/// Who a flow really serves when its datagrams arrive through another balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The client's address (for policy, hashing and the header udplb forwards).
    pub client: SocketAddr,
    /// The address the client sent to.
    pub target: SocketAddr,
}

/// The upstream socket a flow sends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// A socket of its own, connected to the backend: the kernel reports its refusals on the
    /// next call, and sends name no destination.
    Connected,
    /// A socket of its own, not connected (datagram mode: each datagram may go to another
    /// backend); sends name their destination.
    Unconnected,
    /// A (socket, backend) pair of the listener's shared sockets; sends name their destination.
    Shared,
}

/// What to do with a client datagram.
#[derive(Clone, Copy, Debug)]
pub enum Verdict {
    /// Drop it, counted under this reason.
    Drop(DropReason),
    /// Send it on an established flow.
    Send(Send),
    /// Open a flow for it first: get it an upstream socket of the kind asked, then report it
    /// with [`Engine::opened`], which gives the [`Send`].
    Open(Open),
    /// Move its flow to another backend first (re-connect its socket, or take a pair with the
    /// new backend and give the old one back), then report it with [`Engine::moved`], which
    /// gives the [`Send`].
    Move(Move),
}

/// Send a datagram (from byte `skip` on: a PROXY header it arrived with is not forwarded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Send {
    /// The flow.
    pub flow: FlowHandle,
    /// Its listener.
    pub listener: u16,
    /// Where it goes.
    pub backend: BackendId,
    /// That backend's address.
    pub to: SocketAddr,
    /// Bytes at the start of the datagram not to forward (an ingress PROXY header).
    pub skip: usize,
    /// Put a PROXY v2 header in front ([`Engine::write_header`]).
    pub header: bool,
    /// The socket is not connected to `to`: the send names it.
    pub name_destination: bool,
    /// The flow goes to the listener's abuse pool.
    pub abuse: bool,
}

/// A new flow: the upstream socket it needs, and what it will be.
#[derive(Clone, Copy, Debug)]
pub struct Open {
    /// Its key in the flow table.
    pub key: FlowKey,
    /// The backend chosen.
    pub backend: BackendId,
    /// That backend's address.
    pub to: SocketAddr,
    /// The socket it needs.
    pub kind: SocketKind,
    /// Send from the client's own address (`IP_TRANSPARENT`).
    pub transparent: bool,
    /// The client it serves (the PROXY header's, if any): a transparent socket binds it.
    pub client: SocketAddr,
    /// A completed flow's socket may serve another flow to the same backend.
    pub reusable: bool,
    /// Bytes at the start of the datagram not to forward.
    skip: usize,
    origin: Option<Origin>,
    abuse: bool,
    displaced: bool,
    header: bool,
    generation: u64,
    timeouts: Timeouts,
}

/// Move a flow to another backend before sending.
#[derive(Clone, Copy, Debug)]
pub struct Move {
    /// The flow.
    pub flow: FlowHandle,
    /// Its socket.
    pub kind: SocketKind,
    /// The backend it leaves.
    pub from: SocketAddr,
    /// The backend it goes to, and its address.
    pub backend: BackendId,
    /// Its address.
    pub to: SocketAddr,
    /// A shared pair given back serves another client only from then on (the reply timeout).
    pub quarantine_end: Time,
    /// Back into balance after an outage (else: off a backend that went down or was disabled).
    pub rebalance: bool,
    /// The send that follows.
    then: Send,
    generation: u64,
}

/// What to do with a datagram a backend sent on a flow's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyVerdict<'a> {
    /// The flow is no longer there: nothing to relay (a late reply).
    Gone,
    /// Drop it, counted under this reason; `backend`: the backend that sent it, when known.
    Drop {
        /// Why.
        reason: DropReason,
        /// Who sent it (for its traffic counters).
        backend: Option<BackendId>,
    },
    /// Relay it (from byte `skip` on) to the client, from the address it sent to. The
    /// addresses are the flow's own (read where they are, not copied on the way).
    Forward {
        /// The client.
        to: &'a SocketAddr,
        /// The address the client sent to (wildcard listeners).
        from: &'a Option<IpAddr>,
        /// Bytes at the start of the reply not to relay (a PROXY header the pool strips).
        skip: usize,
        /// The backend that sent it.
        backend: BackendId,
        /// The flow had every reply it expected: close it ([`Engine::close`]).
        completes: bool,
    },
}

/// A datagram on a shared socket that no flow owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ownerless {
    /// A backend's late answer to a flow that closed.
    LateReply,
    /// From somebody else: dropped as `unknown_source`.
    UnknownSource,
}

/// A flow handed to the next process at an upgrade, with its socket (`io`).
#[derive(Debug)]
pub struct Handed<Io> {
    /// Its key (the listener's index is this process's).
    pub key: FlowKey,
    /// Its backend.
    pub backend: SocketAddr,
    /// Request and reply bytes counted for reply-ratio limits.
    pub requested: u32,
    pub replied: u32,
    pub io: Io,
}

/// A flow that ended: its `Io` back, and what the data plane needs to release it.
#[derive(Debug)]
pub struct Closed<Io> {
    /// The data plane's part.
    pub io: Io,
    /// Its key.
    pub key: FlowKey,
    /// Its backend's address.
    pub backend_addr: SocketAddr,
    /// Why it ended.
    pub reason: CloseReason,
    /// Its socket (or shared pair) serves another client only from then on (the listener's
    /// reply timeout): a backend's late answer to this flow then reaches no other client.
    pub quarantine_end: Time,
    /// Its socket may serve another flow to the same backend (a completed exchange on a
    /// connected socket bound to no client's address).
    pub reusable: bool,
}

/// What [`Engine::expire`] found.
#[derive(Debug)]
pub enum Expiry<Io> {
    /// The backend left a request unanswered for the reply timeout (a passive failure).
    Unanswered {
        /// The listener.
        listener: u16,
        /// The backend.
        backend: BackendId,
    },
    /// A flow idle for its timeout, closed.
    Closed(Closed<Io>),
}

/// A flow: the engine's knowledge and the data plane's `Io`.
#[derive(Debug)]
pub struct Entry<Io> {
    /// The data plane's part (its upstream socket).
    pub io: Io,
    /// Behind another balancer: the address the client sent to, as its PROXY header said (the
    /// client itself is the key's `origin`).
    target: Option<SocketAddr>,
    state: FlowState,
}

/// Whom flow `f` serves: the client a PROXY header named, else its sender.
#[inline]
fn client_of<T>(f: &crate::flow::Flow<T>) -> SocketAddr {
    f.key.origin.unwrap_or(f.key.client)
}

#[derive(Clone, Copy, Debug)]
struct FlowState {
    kind: SocketKind,
    reusable: bool,
    /// The client was refused (access list or rate limit): the flow goes to the abuse pool.
    abuse: bool,
    /// Placed or moved while its pool was missing backends.
    displaced: bool,
    /// The current backend answered since it got the flow's PROXY header.
    header_acked: bool,
    /// Anti-amplification (`reply_ratio`): payload bytes from the client and back to it.
    requested: u32,
    replied: u32,
}

impl FlowState {
    /// The pool serving the flow: the listener's, or its abuse pool for refused clients
    /// (`None` once a reload removed that pool).
    #[inline]
    fn pool(&self, spec: &ListenerSpec) -> Option<usize> {
        if self.abuse {
            spec.abuse_pool
        } else {
            Some(spec.pool)
        }
    }
}

/// How often a worker sweeps a shard of each persistence table.
const PERSISTENCE_SWEEP: Duration = Duration::from_secs(1);

/// Per listener: senders behind another balancer, and the persistence table of the current
/// snapshot.
#[derive(Debug, Default)]
struct ListenerState {
    /// Per sender, the client its last PROXY header named (one entry per sender with a live
    /// flow), for its datagrams without one.
    senders: HashMap<SocketAddr, SocketAddr>,
    persistence: Option<Arc<Persistence>>,
}

/// One worker's decisions.
#[derive(Debug)]
pub struct Engine<Io> {
    table: FlowTable<Entry<Io>>,
    listeners: Vec<ListenerState>,
    workers: u32,
    /// New flows the current batch may still open.
    allowance: u32,
    rng: u64,
    /// When the persistence tables and learned payload keys are swept next.
    next_sweep: Time,
    /// The pools' payload keys that learn from replies (swept with the persistence tables).
    learning: Vec<Arc<PayloadKey>>,
    /// The flows a previous process handed over, consulted when a flow opens until the time
    /// given with them.
    inherited: Option<(Arc<Inherited>, Time)>,
    /// Flow-state sync with other instances: where their flows go (consulted when a flow
    /// opens) and this worker's flows to tell them about.
    sync: Option<(Arc<Synced>, Arc<Outbox>)>,
}

impl<Io> Engine<Io> {
    /// The engine of one of `workers` workers, seeded with `seed` (not 0). It serves once
    /// given a snapshot ([`Engine::apply`]).
    pub fn new(workers: usize, seed: u64) -> Self {
        Engine {
            table: FlowTable::new(),
            listeners: Vec::new(),
            workers: workers.max(1) as u32,
            allowance: u32::MAX,
            rng: seed | 1,
            next_sweep: Time(0),
            learning: Vec::new(),
            inherited: None,
            sync: None,
        }
    }

    /// Shares flows with other instances: opens a client's flow where `synced` says a peer
    /// has it (while that backend keeps flows), and tells `outbox` of every flow this worker
    /// opens and, once per idle timeout, of every one still active.
    pub fn share(&mut self, synced: Arc<Synced>, outbox: Arc<Outbox>) {
        self.sync = Some((synced, outbox));
    }

    /// Opens each client's next flow to the backend `table` says its flow went to in the
    /// previous process (while that backend keeps flows), until `until`.
    pub fn inherit(&mut self, table: Arc<Inherited>, until: Time) {
        self.inherited = Some((table, until));
    }

    /// Closes every flow of a listener's own pool that has a connected socket of its own (flow
    /// modes) and came without a PROXY header, giving each to `out`: at an upgrade the next
    /// process continues it on the same socket ([`Engine::adoption`]). Other flows stay.
    pub fn hand_over(&mut self, now: Time, mut out: impl FnMut(Handed<Io>)) {
        let handles: Vec<FlowHandle> = self.table.handles().collect();
        for h in handles {
            let Some(f) = self.table.get(h) else { continue };
            let state = f.io.state;
            if state.kind != SocketKind::Connected || state.abuse || f.key.origin.is_some() {
                continue;
            }
            if let Some(c) = self.close(h, CloseReason::Shutdown, now) {
                out(Handed {
                    key: c.key,
                    backend: c.backend_addr,
                    requested: state.requested,
                    replied: state.replied,
                    io: c.io,
                });
            }
        }
    }

    /// The flow a previous process handed over (`h`, without its `Io`), as a flow to record
    /// with [`Engine::opened`] and then [`Engine::resume_counts`]: `None` when this process
    /// cannot continue it (no such listener in a flow mode, no such backend in its pool, one
    /// that keeps no flows, or no room).
    pub fn adoption(&self, snap: &Snapshot, h: &Handed<()>) -> Option<Open> {
        let li = usize::from(h.key.listener);
        let spec = snap.listeners.get(li)?;
        let pool = &snap.pools[spec.pool];
        let i = pool.position(&h.backend)?;
        if spec.mode == SessionMode::Datagram
            || h.key.origin.is_some()
            || !pool.keeps_flows(i)
            || !self.table.has_room(h.key.listener)
        {
            return None;
        }
        Some(Open {
            key: h.key,
            backend: pool.backends[i].id,
            to: h.backend,
            kind: SocketKind::Connected,
            transparent: pool.transparent,
            client: h.key.client,
            reusable: !pool.transparent,
            skip: 0,
            origin: None,
            abuse: false,
            displaced: pool.degraded,
            header: pool.proxy_header != ProxyHeader::Off,
            generation: snap.generation,
            timeouts: Timeouts {
                idle: spec.idle_timeout,
                reply: spec.reply_timeout,
            },
        })
    }

    /// An adopted flow `flow` goes on counting the bytes it had (for reply-ratio limits).
    pub fn resume_counts(&mut self, flow: FlowHandle, requested: u32, replied: u32) {
        if let Some(f) = self.table.get_mut(flow) {
            f.io.state.requested = requested;
            f.io.state.replied = replied;
        }
    }

    /// Where every flow of a listener's own pool goes, in flow modes (what the next process
    /// inherits at an upgrade; datagram mode places each datagram anew).
    pub fn placements(&self) -> impl Iterator<Item = Placement> + '_ {
        self.table
            .handles()
            .filter_map(|h| self.table.get(h))
            .filter(|f| !f.io.state.abuse && f.io.state.kind != SocketKind::Unconnected)
            .map(|f| Placement {
                listener: f.key.listener,
                client: client_of(f),
                backend: f.backend_addr,
            })
    }

    /// Applies a new snapshot: its flow caps (a listener's cap is split evenly over the
    /// workers) and persistence tables.
    pub fn apply(&mut self, snap: &Snapshot) {
        self.listeners
            .resize_with(snap.listeners.len(), ListenerState::default);
        for (state, spec) in self.listeners.iter_mut().zip(&snap.listeners) {
            state.persistence.clone_from(&spec.persistence);
        }
        self.learning = snap
            .pools
            .iter()
            .filter_map(|p| p.payload_key.clone())
            .filter(|k| matches!(k.spec(), KeySpec::Radius { .. }))
            .collect();
        let caps: Vec<u32> = snap
            .listeners
            .iter()
            .take(self.listeners.len())
            .map(|l| l.max_flows.div_ceil(self.workers))
            .collect();
        self.table.set_caps(&caps);
    }

    /// A batch of client datagrams begins; `overloaded`: the listener's receive queue was more
    /// than half full at the end of the last turn, so new flows are rationed.
    #[inline]
    pub fn begin_batch(&mut self, overloaded: bool) {
        self.allowance = if overloaded {
            NEW_FLOWS_PER_BATCH_UNDER_BACKLOG
        } else {
            u32::MAX
        };
    }

    /// Whether GRO trains received on listener `li` are forwarded whole: in flow mode, where a
    /// train's datagrams share one flow and one backend, and when nothing is decided or
    /// written per datagram (rate limits, PROXY headers in either direction). Otherwise the
    /// data plane takes them apart and hands them in one by one.
    #[inline]
    pub fn passes_trains(snap: &Snapshot, li: usize) -> bool {
        let spec = &snap.listeners[li];
        let plain = |pool: usize| snap.pools[pool].proxy_header == ProxyHeader::Off;
        spec.mode == SessionMode::Flow
            && spec.limits.is_none()
            && !spec.proxy_ingress
            && plain(spec.pool)
            && spec.abuse_pool.is_none_or(plain)
    }

    /// Decides what to do with client datagram `d` at `now`.
    #[inline]
    pub fn on_client(&mut self, snap: &Snapshot, now: Time, d: &Datagram<'_>) -> Verdict {
        let li = usize::from(d.listener);
        let spec = &snap.listeners[li];
        if d.data.is_empty() {
            return Verdict::Drop(DropReason::Empty);
        }
        let largest = d.segment_size.map_or(d.data.len(), usize::from);
        if d.truncated || largest > spec.max_datagram_size {
            return Verdict::Drop(DropReason::Oversize);
        }
        let mut key = FlowKey {
            listener: d.listener,
            client: d.source,
            local: d.local,
            origin: None,
        };
        let (skip, origin) = if spec.proxy_ingress {
            match self.ingress(li, spec, &mut key, d.data) {
                Ok(x) => x,
                Err(reason) => return Verdict::Drop(reason),
            }
        } else {
            (0, None)
        };
        let (found, flow) = match self.table.lookup(&key) {
            Some((h, f)) => (Some(h), Some(f)),
            None => (None, None),
        };
        // Policy applies to the client a flow serves: the PROXY header's, when there is one.
        let client = || match (origin, flow) {
            (Some(o), _) => o.client,
            (None, Some(f)) => client_of(f),
            (None, None) => d.source,
        };
        let abuse_flow = flow.is_some_and(|f| f.io.state.abuse);
        let mut divert = false;
        if !abuse_flow
            && admission_applies(spec)
            && let Err(reason) = admission(spec, client(), now)
        {
            // A refused client without a flow goes to the abuse pool, if there is one.
            if spec.abuse_pool.is_none() || found.is_some() {
                return Verdict::Drop(reason);
            }
            divert = true;
        }
        match found {
            None => self.admit(key, origin, divert, client(), skip, d.data, snap, now),
            Some(h) => {
                if let Some(o) = origin {
                    // The sender's datagrams without a header belong to the client it named last.
                    self.listeners[li].senders.insert(key.client, o.client);
                }
                self.on_flow(h, li, snap, now, skip, d.data)
            }
        }
    }

    /// A listener behind another balancer: checks the sender and the PROXY v2 header, whose
    /// client joins `key` (each client a sender forwards is a flow of its own). A new flow
    /// needs a header (a LOCAL one means the sender itself is the client); later datagrams may
    /// come without one, and belong to the client the sender's last header named. Returns the
    /// header's length and the client it named.
    fn ingress(
        &self,
        li: usize,
        spec: &ListenerSpec,
        key: &mut FlowKey,
        data: &[u8],
    ) -> Result<(usize, Option<Origin>), DropReason> {
        if !spec.proxy_from.is_empty() && !spec.proxy_from.contains(key.client.ip()) {
            return Err(DropReason::ProxyHeader);
        }
        if !crate::proxy::has_signature(data) {
            key.origin = self.listeners[li].senders.get(&key.client).copied();
            return match self.table.find(key) {
                Some(_) => Ok((0, None)),
                None => Err(DropReason::ProxyHeader),
            };
        }
        let header = crate::proxy::parse(data).map_err(|_| DropReason::ProxyHeader)?;
        if data.len() == header.len {
            return Err(DropReason::Empty);
        }
        let origin = header
            .addresses
            .map(|(client, target)| Origin { client, target });
        key.origin = origin.map(|o| o.client);
        Ok((header.len, origin))
    }

    /// A new flow for `key`: the source, the cap, new-flow limits, overload, the backend and
    /// the socket it needs. Nothing is recorded until [`Engine::opened`].
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn admit(
        &mut self,
        key: FlowKey,
        origin: Option<Origin>,
        mut abuse: bool,
        client: SocketAddr,
        skip: usize,
        data: &[u8],
        snap: &Snapshot,
        now: Time,
    ) -> Verdict {
        // The network peer, whatever a PROXY header says: replies go back to it.
        if snap.guard.refuses(key.client) {
            return Verdict::Drop(DropReason::BadSource);
        }
        if !snap.admitting {
            return Verdict::Drop(DropReason::ShuttingDown);
        }
        if !self.table.has_room(key.listener) {
            return Verdict::Drop(DropReason::FlowCap);
        }
        let li = usize::from(key.listener);
        let spec = &snap.listeners[li];
        if !abuse
            && let Some(limits) = &spec.limits
            && !limits.new_flow(client.ip(), now.0)
        {
            if spec.abuse_pool.is_none() {
                return Verdict::Drop(DropReason::FlowRateLimited);
            }
            abuse = true;
        }
        if self.allowance == 0 {
            return Verdict::Drop(DropReason::Overload);
        }
        self.allowance -= 1;
        let pi = match (abuse, spec.abuse_pool) {
            (false, _) => spec.pool,
            (true, Some(pool)) => pool,
            (true, None) => return Verdict::Drop(DropReason::Denied),
        };
        let pool = &snap.pools[pi];
        let at = Placing {
            li,
            spec,
            pi,
            pool,
            client,
            now,
            payload: payload_of(data, skip),
        };
        let elsewhere = self.inherited.is_some() || self.sync.is_some();
        let inherited = if !elsewhere || abuse || spec.mode == SessionMode::Datagram {
            None
        } else {
            self.inherited_backend(&at)
                .or_else(|| self.synced_backend(&at))
        };
        let Some(idx) = inherited.or_else(|| self.choose(&at)) else {
            return Verdict::Drop(DropReason::NoBackend);
        };
        let backend = &pool.backends[idx];
        let connect = spec.mode != SessionMode::Datagram;
        let shared = spec.shared_upstream && connect && !pool.transparent && li < SHARED_LISTENERS;
        let kind = match (connect, shared) {
            (_, true) => SocketKind::Shared,
            (true, false) => SocketKind::Connected,
            (false, false) => SocketKind::Unconnected,
        };
        // Built in place: an `Open` is a few hundred bytes, not worth a copy.
        Verdict::Open(Open {
            key,
            backend: backend.id,
            to: backend.spec.addr,
            kind,
            transparent: pool.transparent,
            client,
            reusable: kind == SocketKind::Connected && !pool.transparent,
            skip,
            origin,
            abuse,
            displaced: pool.degraded,
            // Every datagram of datagram mode is scheduled on its own: `first` is every one.
            header: pool.proxy_header != ProxyHeader::Off,
            generation: snap.generation,
            timeouts: Timeouts {
                idle: spec.idle_timeout,
                reply: spec.reply_timeout,
            },
        })
    }

    /// Records the flow of `open`, whose upstream socket the data plane got (`io`), at `now`;
    /// returns the send of its first datagram.
    pub fn opened(&mut self, open: &Open, io: Io, now: Time) -> Send {
        let state = FlowState {
            kind: open.kind,
            reusable: open.reusable,
            abuse: open.abuse,
            displaced: open.displaced,
            header_acked: false,
            requested: 0,
            replied: 0,
        };
        let h = self.table.insert(
            open.key,
            (open.backend, open.to),
            open.generation,
            now,
            open.timeouts,
            Entry {
                io,
                target: open.origin.map(|o| o.target),
                state,
            },
        );
        let li = usize::from(open.key.listener);
        if let Some(o) = open.origin {
            self.listeners[li].senders.insert(open.key.client, o.client);
        }
        if let Some(p) = self.listeners[li]
            .persistence
            .as_ref()
            .filter(|_| !open.abuse)
        {
            p.acquire(open.client, open.backend, now);
        }
        if let Some((_, outbox)) = &self.sync
            && !open.abuse
            && open.kind != SocketKind::Unconnected
        {
            outbox.push(Placement {
                listener: open.key.listener,
                client: open.client,
                backend: open.to,
            });
        }
        Send {
            flow: h,
            listener: open.key.listener,
            backend: open.backend,
            to: open.to,
            skip: open.skip,
            header: open.header,
            name_destination: open.kind != SocketKind::Connected,
            abuse: open.abuse,
        }
    }

    /// A datagram on established flow `h`: a move first if its backend no longer keeps flows
    /// (or, displaced by an outage, it may go back into balance), else the send; in datagram
    /// mode each datagram is scheduled on its own.
    #[inline]
    fn on_flow(
        &mut self,
        h: FlowHandle,
        li: usize,
        snap: &Snapshot,
        now: Time,
        skip: usize,
        data: &[u8],
    ) -> Verdict {
        let spec = &snap.listeners[li];
        // `h` was found by the caller this instant: the branch is never taken. (Passing the
        // flow's fields along instead measured 14 instructions more per datagram.)
        let Some(flow) = self.table.get(h) else {
            return Verdict::Drop(DropReason::SendError);
        };
        let state = flow.io.state;
        let Some(pi) = state.pool(spec) else {
            return Verdict::Drop(DropReason::NoBackend);
        };
        let pool = &snap.pools[pi];
        let (backend, backend_addr, checked) =
            (flow.backend, flow.backend_addr, flow.checked_generation);
        // Where the datagram goes when a backend must be chosen for it (built only then).
        let placing = |client| Placing {
            li,
            spec,
            pi,
            pool,
            client,
            now,
            payload: payload_of(data, skip),
        };
        if state.kind == SocketKind::Unconnected && spec.mode == SessionMode::Datagram {
            let at = placing(client_of(flow));
            let placed =
                if spec.persistence.is_some() && pool.payload_key.is_none() && pi == spec.pool {
                    self.persistent_datagram(h, backend, &at)
                } else {
                    self.choose(&at).map(|i| &pool.backends[i])
                };
            let Some(b) = placed else {
                return Verdict::Drop(DropReason::NoBackend);
            };
            return Verdict::Send(Send {
                flow: h,
                listener: li as u16,
                backend: b.id,
                to: b.spec.addr,
                skip,
                header: pool.proxy_header != ProxyHeader::Off,
                name_destination: true,
                abuse: state.abuse,
            });
        }
        if checked != snap.generation {
            let keeps = pool
                .position_of_id(backend)
                .is_some_and(|i| pool.keeps_flows(i));
            if !keeps {
                let at = placing(client_of(flow));
                let Some(idx) = self.choose(&at) else {
                    return Verdict::Drop(DropReason::NoBackend);
                };
                let to = &pool.backends[idx];
                return Verdict::Move(self.move_to(h, to, false, skip, pool, snap, now));
            }
            if let Some(f) = self.table.get_mut(h) {
                f.checked_generation = snap.generation;
            }
        } else if state.displaced
            && let Some(to) = self.rebalanced(h, &placing(client_of(flow)))
        {
            let to = &pool.backends[to];
            return Verdict::Move(self.move_to(h, to, true, skip, pool, snap, now));
        }
        Verdict::Send(Send {
            flow: h,
            listener: li as u16,
            backend,
            to: backend_addr,
            skip,
            header: match pool.proxy_header {
                ProxyHeader::Off => false,
                ProxyHeader::First => !state.header_acked,
                ProxyHeader::Every => true,
            },
            name_destination: state.kind != SocketKind::Connected,
            abuse: state.abuse,
        })
    }

    /// A flow displaced by a failure, once its pool is whole again: at its first datagram after
    /// a pause of the pool's `rebalance`, if its backend holds more than its share of the
    /// worker's flows, the scheduler's pick when that one holds fewer. Either way the flow is
    /// no longer displaced once the pool is whole and the pause over. Flows placed while the
    /// pool was whole never move.
    fn rebalanced(&mut self, h: FlowHandle, at: &Placing<'_>) -> Option<usize> {
        let (pool, now) = (at.pool, at.now);
        let pause = pool.rebalance?;
        let flow = self.table.get(h)?;
        if pool.degraded || now.since(flow.last_seen) < pause {
            return None;
        }
        let current = pool.position_of_id(flow.backend);
        if let Some(f) = self.table.get_mut(h) {
            f.io.state.displaced = false;
        }
        let from = current.filter(|&i| pool.overloaded(i, self.table.load()))?;
        let to = self.choose(at)?;
        let flows = |i: usize| {
            let load = self.table.load();
            load.get(pool.backends[i].id.index()).copied().unwrap_or(0)
        };
        (flows(to) + 1 < flows(from)).then_some(to)
    }

    /// The move of live flow `h` (of `pool`) to backend `b` at `now`.
    #[allow(clippy::too_many_arguments)]
    fn move_to(
        &self,
        h: FlowHandle,
        b: &Backend,
        rebalance: bool,
        skip: usize,
        pool: &Pool,
        snap: &Snapshot,
        now: Time,
    ) -> Move {
        let (listener, from, reply_timeout, state) =
            self.table
                .get(h)
                .map_or((0, b.spec.addr, std::time::Duration::ZERO, None), |f| {
                    (
                        f.key.listener,
                        f.backend_addr,
                        f.reply_timeout,
                        Some(f.io.state),
                    )
                });
        let kind = state.map_or(SocketKind::Connected, |s| s.kind);
        Move {
            flow: h,
            kind,
            from,
            backend: b.id,
            to: b.spec.addr,
            quarantine_end: now.after(reply_timeout),
            rebalance,
            then: Send {
                flow: h,
                listener,
                backend: b.id,
                to: b.spec.addr,
                skip,
                // The new backend has not seen the header.
                header: pool.proxy_header != ProxyHeader::Off,
                name_destination: kind != SocketKind::Connected,
                abuse: state.is_some_and(|s| s.abuse),
            },
            generation: snap.generation,
        }
    }

    /// The data plane moved flow `m.flow` as asked; returns the send that follows.
    pub fn moved(&mut self, m: &Move) -> Send {
        self.table.rebind(m.flow, (m.backend, m.to), m.generation);
        if let Some(f) = self.table.get_mut(m.flow) {
            f.io.state.header_acked = false;
            // Moved off a failure: displaced (a rebalance puts it back in balance).
            f.io.state.displaced = !m.rebalance;
            let abuse = f.io.state.abuse;
            let client = client_of(f);
            let li = usize::from(f.key.listener);
            if let Some(p) = self.persistence(li).filter(|_| !abuse) {
                p.moved(client, m.backend);
            }
        }
        m.then
    }

    /// The backend of a datagram (`at`) on datagram-mode flow `h`, now on `backend`, of a
    /// listener that remembers clients: the flow's backend while it may take clients, else the
    /// pick of [`Engine::choose`], which the flow (and the client) follow.
    #[inline(never)]
    fn persistent_datagram<'s>(
        &mut self,
        h: FlowHandle,
        backend: BackendId,
        at: &Placing<'s>,
    ) -> Option<&'s Backend> {
        let pool = at.pool;
        if let Some(i) = pool.position_of_id(backend)
            && pool.tier.contains(i)
        {
            return Some(&pool.backends[i]);
        }
        let b = &pool.backends[self.choose(at)?];
        let generation = self.table.get(h)?.checked_generation;
        self.table.rebind(h, (b.id, b.spec.addr), generation);
        if let Some(p) = self.persistence(at.li) {
            p.moved(at.client, b.id);
        }
        Some(b)
    }

    /// The backend index in `at.pool` a previous process had the client's flow on, if it was
    /// handed over and that backend keeps flows (the flow continues as it would have there).
    #[inline(never)]
    fn inherited_backend(&mut self, at: &Placing<'_>) -> Option<usize> {
        let (table, until) = self.inherited.as_ref()?;
        if at.now > *until {
            self.inherited = None;
            return None;
        }
        let addr = table.take(at.li as u16, at.client)?;
        let i = at.pool.position(&addr)?;
        at.pool.keeps_flows(i).then_some(i)
    }

    /// The backend index in `at.pool` a peer instance said the client's flow is on, if that
    /// backend keeps flows (the flow continues as it would have on the peer).
    #[inline(never)]
    fn synced_backend(&self, at: &Placing<'_>) -> Option<usize> {
        let (synced, _) = self.sync.as_ref()?;
        let addr = synced.lookup(at.li as u16, at.client)?;
        let i = at.pool.position(&addr)?;
        let keeps = at.pool.keeps_flows(i);
        if keeps {
            synced.used();
        }
        keeps.then_some(i)
    }

    /// Listener `li`'s persistence table, if it remembers clients.
    #[inline]
    fn persistence(&self, li: usize) -> Option<&Persistence> {
        self.listeners.get(li)?.persistence.as_deref()
    }

    /// The backend index in `at.pool` for a new flow (or a datagram): where the datagram's key
    /// says, in a pool that reads one; else the backend the client last used if the listener
    /// remembers clients; else the scheduler's pick. A remembered backend must take new
    /// clients.
    fn choose(&mut self, at: &Placing<'_>) -> Option<usize> {
        let (spec, pool) = (at.spec, at.pool);
        let mut key = None;
        // The snapshot's table is the one `apply` gave this engine.
        if pool.payload_key.is_some() || spec.persistence.is_some() {
            match self.recall(at) {
                Recall::Backend(i) => return Some(i),
                Recall::Key(k) => key = Some(k),
                Recall::Nothing => {}
            }
        }
        let key = match key {
            Some(k) => k,
            None if pool.scheduler.is_consistent_hash() => ClientKey::of(&at.client, spec.affinity),
            None => ClientKey(0),
        };
        let random = self.next_random();
        pick(
            pool,
            PickInput {
                key,
                random,
                load: self.table.load(),
            },
        )
    }

    /// What is known of where a datagram (`payload`) of `client` goes, before the scheduler:
    /// its payload key's backend or hash, else the backend the client last used (persistence
    /// is the listener's pool's; the abuse pool only schedules).
    #[inline(never)]
    fn recall(&self, at: &Placing<'_>) -> Recall {
        let Placing {
            li,
            spec,
            pi,
            pool,
            client,
            now,
            payload,
        } = *at;
        let usable = |id| {
            pool.position_of_id(id)
                .is_some_and(|i| pool.tier.contains(i))
        };
        let found = |id| {
            pool.position_of_id(id)
                .map_or(Recall::Nothing, Recall::Backend)
        };
        if let Some(k) = pool.payload_key.as_deref() {
            match k.classify(payload) {
                Keyed::State(state) => {
                    if let Some(id) = k.state_backend(state, now, usable) {
                        return found(id);
                    }
                }
                Keyed::Hash(h) => return Recall::Key(ClientKey(h)),
                Keyed::Server { addr, hash } => {
                    return match pool.position(&addr) {
                        Some(i) if pool.tier.contains(i) => Recall::Backend(i),
                        // Its server cannot take it: the connection is lost there anyway.
                        _ => Recall::Key(ClientKey(hash)),
                    };
                }
                Keyed::Unkeyed | Keyed::Malformed => {}
            }
        }
        self.persistence(li)
            .filter(|_| pi == spec.pool)
            .and_then(|p| p.backend_of(client, now, usable))
            .map_or(Recall::Nothing, found)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Writes the PROXY v2 header of flow `h` on a listener bound to `bound` into `out`: the
    /// client's address and the address it sent to (those of the header the flow arrived with,
    /// behind another balancer). Returns its length (0: no such flow).
    pub fn write_header(
        &self,
        h: FlowHandle,
        bound: SocketAddr,
        out: &mut [u8; crate::proxy::MAX_HEADER_V6],
    ) -> usize {
        let Some(flow) = self.table.get(h) else {
            return 0;
        };
        let (client, target) = match flow.io.target {
            Some(target) => (client_of(flow), target),
            None => (
                flow.key.client,
                SocketAddr::new(flow.key.local.unwrap_or(bound.ip()), bound.port()),
            ),
        };
        crate::proxy::encode(out, client, target).unwrap_or(0)
    }

    /// Send `s` of a datagram of `len` payload bytes went out at `now`. Returns whether a
    /// request-response exchange starts (the flow owed no reply before: the data plane may time
    /// its first reply).
    #[inline]
    pub fn sent(&mut self, snap: &Snapshot, s: &Send, now: Time, len: usize) -> bool {
        let spec = &snap.listeners[usize::from(s.listener)];
        if spec
            .limits
            .as_ref()
            .is_some_and(|l| l.reply_ratio().is_some())
            && let Some(f) = self.table.get_mut(s.flow)
        {
            let n = u32::try_from(len).unwrap_or(u32::MAX);
            f.io.state.requested = f.io.state.requested.saturating_add(n);
        }
        let responses = match spec.mode {
            SessionMode::RequestResponse { responses } => responses,
            _ => 0,
        };
        self.table.on_request(s.flow, now, responses) && responses > 0
    }

    /// A send or receive on flow `h`'s socket failed; `refused`: with ICMP port, host or
    /// network unreachable. Returns the backend to charge a passive failure to when the flow's
    /// own connected socket was refused: the flow is then closed ([`Engine::close`]) so its
    /// next datagram is scheduled afresh. (Unconnected sockets learn whom a refusal was for
    /// from their error queue instead: [`Engine::refused_backend`].)
    pub fn socket_failed(&self, h: FlowHandle, refused: bool) -> Option<BackendId> {
        let flow = self.table.get(h)?;
        (refused && flow.io.state.kind == SocketKind::Connected).then_some(flow.backend)
    }

    /// The backend of listener `li`'s pools (or its abuse pool's) at `dest`: whom a refusal
    /// read from an unconnected socket's error queue is charged to.
    pub fn refused_backend(snap: &Snapshot, li: usize, dest: SocketAddr) -> Option<BackendId> {
        let spec = &snap.listeners[li];
        [Some(spec.pool), spec.abuse_pool]
            .into_iter()
            .flatten()
            .find_map(|pi| {
                let pool = &snap.pools[pi];
                pool.position(&dest).map(|i| pool.backends[i].id)
            })
    }

    /// A datagram from `source` on a shared socket of listener `li` that no flow owns.
    pub fn ownerless(snap: &Snapshot, li: usize, source: SocketAddr) -> Ownerless {
        if Self::refused_backend(snap, li, source).is_some() {
            Ownerless::LateReply
        } else {
            Ownerless::UnknownSource
        }
    }

    /// Whether flow `h` is live.
    #[inline]
    pub fn is_live(&self, h: FlowHandle) -> bool {
        self.table.get(h).is_some()
    }

    /// Decides what to do with a datagram from `source` (`data`, `truncated`) on flow `h`'s
    /// socket at `now`. `source` matters on an unconnected socket (datagram mode), where it
    /// says which backend answered and must be one; a connected socket receives only from
    /// its peer, and the data plane finds a shared socket's flow by the source.
    #[inline]
    pub fn on_reply(
        &mut self,
        snap: &Snapshot,
        now: Time,
        h: FlowHandle,
        source: &SocketAddr,
        data: &[u8],
        truncated: bool,
    ) -> ReplyVerdict<'_> {
        // One lookup: the flow is updated in place (in request-response mode the table also
        // counts the reply against the exchange).
        let Some(flow) = self.table.get_mut(h) else {
            return ReplyVerdict::Gone;
        };
        let spec = &snap.listeners[usize::from(flow.key.listener)];
        let state = flow.io.state;
        let Some(pi) = state.pool(spec) else {
            return ReplyVerdict::Drop {
                reason: DropReason::NoBackend,
                backend: None,
            };
        };
        let pool = &snap.pools[pi];
        // Datagram mode: the reply's source says which backend answered (and must be one).
        let backend = if state.kind == SocketKind::Unconnected {
            match pool.position(source) {
                Some(i) => pool.backends[i].id,
                None => {
                    return ReplyVerdict::Drop {
                        reason: DropReason::UnknownSource,
                        backend: None,
                    };
                }
            }
        } else {
            flow.backend
        };
        let drop = |reason| ReplyVerdict::Drop {
            reason,
            backend: Some(backend),
        };
        if truncated || data.len() > spec.max_datagram_size {
            return drop(DropReason::ReplyOversize);
        }
        let Some(skip) = strip_proxy_header(pool, data) else {
            return drop(DropReason::ProxyHeader);
        };
        let len = data.len() - skip;
        if let Some(ratio) = spec.limits.as_ref().and_then(|l| l.reply_ratio()) {
            if !crate::ratelimit::reply_fits(
                u64::from(state.requested),
                u64::from(state.replied),
                len,
                ratio,
            ) {
                return drop(DropReason::Amplification);
            }
            let replied = &mut flow.io.state.replied;
            *replied = replied.saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
        }
        if let Some(k) = &pool.payload_key {
            k.learn(&data[skip..], backend, now);
        }
        if pool.proxy_header == ProxyHeader::First {
            // The backend answered: it has the flow's header.
            flow.io.state.header_acked = true;
        }
        let counted = matches!(spec.mode, SessionMode::RequestResponse { .. });
        if !counted {
            flow.last_seen = now;
        }
        let completes =
            counted && self.table.on_reply(h, now, true) == ReplyOutcome::ForwardAndComplete;
        match self.table.get(h) {
            Some(flow) => ReplyVerdict::Forward {
                to: &flow.key.client,
                from: &flow.key.local,
                skip,
                backend,
                completes,
            },
            None => ReplyVerdict::Gone,
        }
    }

    /// Closes flow `h` for `reason` at `now` (affinity and sender maps released); returns it.
    /// Closing a flow no longer live returns `None` and changes nothing.
    pub fn close(&mut self, h: FlowHandle, reason: CloseReason, now: Time) -> Option<Closed<Io>> {
        let flow = self.table.close(h, reason)?;
        Some(self.closed(flow, reason, now))
    }

    fn closed(
        &mut self,
        flow: crate::flow::Flow<Entry<Io>>,
        reason: CloseReason,
        now: Time,
    ) -> Closed<Io> {
        let li = usize::from(flow.key.listener);
        let state = flow.io.state;
        if let Some(l) = self.listeners.get_mut(li) {
            if let Some(origin) = flow.key.origin
                && l.senders.get(&flow.key.client) == Some(&origin)
            {
                l.senders.remove(&flow.key.client);
            }
            if let Some(p) = l.persistence.as_ref().filter(|_| !state.abuse) {
                p.release(client_of(&flow), now);
            }
        }
        Closed {
            key: flow.key,
            backend_addr: flow.backend_addr,
            reason,
            quarantine_end: now.after(flow.reply_timeout),
            reusable: reason == CloseReason::Completed && state.reusable,
            io: flow.io.io,
        }
    }

    /// Handles every deadline due at `now`: requests left unanswered for the reply timeout,
    /// and flows idle for their timeout (closed).
    pub fn expire(&mut self, now: Time, mut on: impl FnMut(Expiry<Io>)) {
        let mut closed = Vec::new();
        self.table.expire(now, |e| match e {
            Expired::Unanswered(_, flow) => on(Expiry::Unanswered {
                listener: flow.key.listener,
                backend: flow.backend,
            }),
            Expired::Renewed(_, flow) => {
                if let Some((_, outbox)) = &self.sync
                    && !flow.io.state.abuse
                    && flow.io.state.kind != SocketKind::Unconnected
                {
                    outbox.push(Placement {
                        listener: flow.key.listener,
                        client: client_of(flow),
                        backend: flow.backend_addr,
                    });
                }
            }
            Expired::Idle(_, flow) => {
                if flow.pending_replies > 0 && flow.reply_due.is_some() {
                    // Closed before its reply deadline (reply_timeout above idle_timeout).
                    on(Expiry::Unanswered {
                        listener: flow.key.listener,
                        backend: flow.backend,
                    });
                }
                closed.push(flow);
            }
        });
        for flow in closed {
            let c = self.closed(flow, CloseReason::Idle, now);
            on(Expiry::Closed(c));
        }
        if now >= self.next_sweep {
            self.next_sweep = now.after(PERSISTENCE_SWEEP);
            for p in self.listeners.iter().filter_map(|l| l.persistence.as_ref()) {
                p.sweep(now);
            }
            for k in &self.learning {
                k.sweep(now);
            }
        }
    }

    /// Closes every flow (shutdown).
    pub fn drain_all(&mut self, now: Time, mut on: impl FnMut(Closed<Io>)) {
        let mut closed = Vec::new();
        self.table
            .drain_all(CloseReason::Shutdown, |_, flow| closed.push(flow));
        for flow in closed {
            let c = self.closed(flow, CloseReason::Shutdown, now);
            on(c);
        }
    }

    /// The data plane's part of flow `h`.
    #[inline]
    pub fn io(&self, h: FlowHandle) -> Option<&Io> {
        self.table.get(h).map(|f| &f.io.io)
    }

    /// The data plane's part of flow `h`, mutably.
    #[inline]
    pub fn io_mut(&mut self, h: FlowHandle) -> Option<&mut Io> {
        self.table.get_mut(h).map(|f| &mut f.io.io)
    }

    /// Flow `h`'s listener, key and backend address.
    #[inline]
    pub fn key(&self, h: FlowHandle) -> Option<(&FlowKey, SocketAddr)> {
        self.table.get(h).map(|f| (&f.key, f.backend_addr))
    }

    /// Live flows of listener `li` on this worker.
    pub fn live_of(&self, li: u16) -> u32 {
        self.table.live_of(li)
    }

    /// When the next flow deadline is due.
    pub fn next_deadline(&self) -> Option<Time> {
        self.table.next_deadline()
    }

    /// The flow table (for invariant checks in tests and simulations).
    pub fn table(&self) -> &FlowTable<Entry<Io>> {
        &self.table
    }
}

/// Where a backend is being chosen: the listener (`li`, `spec`), the pool (`pi`, `pool`: the
/// listener's, or its abuse pool), the client a flow serves, the time, and the datagram's
/// bytes (after an ingress PROXY header).
#[derive(Clone, Copy)]
struct Placing<'s> {
    li: usize,
    spec: &'s ListenerSpec,
    pi: usize,
    pool: &'s Pool,
    client: SocketAddr,
    now: Time,
    payload: &'s [u8],
}

/// The bytes of datagram `data` after the first `skip` (an ingress PROXY header).
#[inline]
fn payload_of(data: &[u8], skip: usize) -> &[u8] {
    data.get(skip..).unwrap_or_default()
}

/// What [`Engine::recall`] knows before the scheduler.
enum Recall {
    /// This backend (by index in the pool).
    Backend(usize),
    /// Schedule by this hash.
    Key(ClientKey),
    /// Nothing: the scheduler decides.
    Nothing,
}

/// Whether listener `spec` checks its clients on every datagram (access lists or rate limits).
#[inline]
fn admission_applies(spec: &ListenerSpec) -> bool {
    !spec.acl.is_open() || spec.limits.is_some()
}

/// Whether listener `spec` serves `client` now: its access lists, then its datagram rate
/// limits (which count the datagram).
#[inline]
fn admission(spec: &ListenerSpec, client: SocketAddr, now: Time) -> Result<(), DropReason> {
    if !spec.acl.is_open() && !spec.acl.permits(client.ip()) {
        return Err(DropReason::Denied);
    }
    if let Some(limits) = &spec.limits
        && !limits.datagram(client.ip(), now.0)
    {
        return Err(DropReason::RateLimited);
    }
    Ok(())
}

/// How many bytes of a backend reply to strip when the pool strips PROXY headers: 0 without
/// one, `None` when it is malformed.
#[inline]
fn strip_proxy_header(pool: &Pool, reply: &[u8]) -> Option<usize> {
    if !pool.strip_reply_proxy || !crate::proxy::has_signature(reply) {
        return Some(0);
    }
    crate::proxy::parse(reply).ok().map(|h| h.len)
}
