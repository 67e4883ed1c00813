//! One worker: an event loop over its listener sockets and its flows' upstream sockets.
//!
//! Owns: a flow table, the upstream socket of each of its flows (or, with `shared_upstream`,
//! each listener's shared upstream sockets: [`crate::ports`]), per-pool scheduler cursors, a
//! receive batch and one reply batch per listener.
//!
//! A turn: wait for readiness (at most until the next flow deadline); load the snapshot if it
//! changed; forward client datagrams from each readable listener (`recvmmsg`, at most
//! [`LISTENER_BATCHES_PER_TURN`] batches so one busy listener cannot starve replies or timers);
//! relay replies from each readable upstream socket into the listener's reply batch (at most
//! [`REPLY_BATCHES_PER_FLOW_PER_TURN`] `recvmmsg` batches per flow); send the reply batches (`sendmmsg`); expire idle
//! flows. Work left over by a budget is resumed next turn without sleeping.
//!
//! Must not: allocate, lock or log per datagram. Errors on the data path are counted as
//! [`DropReason`]s; logs are rate-limited.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Cache};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use udplb_core::affinity::StickyTable;
use udplb_core::flow::{Expired, FlowHandle, FlowKey, FlowTable, ReplyOutcome, Timeouts};
use udplb_core::hash::ClientKey;
use udplb_core::sched::{PickInput, pick};
use udplb_core::snapshot::{BackendId, ListenerSpec, Pool, Snapshot};
use udplb_core::verdict::CloseReason;
use udplb_core::{DropReason, ProxyHeader, SessionMode, Time};
use udplb_sys::batch::{RecvBatch, RecvMeta, SendBatch};

use crate::ports::{Port, PortPool};
use crate::spare::{Owner, Spares};
use crate::stats::{KERNEL_DROPS_REFRESH, WorkerStats};

/// Datagrams per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Receive batches per listener per turn.
const LISTENER_BATCHES_PER_TURN: usize = 8;
/// A listener is overloaded when a turn ends with its receive queue more than this fraction
/// (1 / N) of its buffer: new flows are then rationed.
const OVERLOAD_FILL: u32 = 2;
/// While rationed, new flows admitted per received batch; the rest are dropped as `overload`.
/// Opening a flow (socket, connect, epoll registration) costs tens of times more than
/// forwarding on one, so a flood of new sources would otherwise starve established flows.
const NEW_FLOWS_PER_BATCH_UNDER_BACKLOG: u32 = 8;
/// Replies read from an upstream socket with one `recvmmsg`.
const REPLY_BATCH: usize = 16;
/// Reply batches ([`BATCH`] each) read from one shared upstream socket per turn.
const REPLY_BATCHES_PER_PORT_PER_TURN: usize = 8;
/// Buffer size asked for shared upstream sockets (each carries the replies of one flow per
/// backend).
const SHARED_SOCKET_BUFFER: usize = 1 << 20;
/// Listeners (by index) whose flows may use shared upstream sockets: the epoll tokens of those
/// sockets encode the listener index in 10 bits. Flows of later listeners get a socket each.
const SHARED_LISTENERS: usize = 1 << 10;
/// Reply batches read from one upstream socket per turn.
const REPLY_BATCHES_PER_FLOW_PER_TURN: usize = 2;
/// Datagrams a spare socket may hold when it is taken: more means a backend keeps answering
/// a finished exchange, and the socket is closed rather than emptied.
const SPARE_DISCARD_LIMIT: usize = 16;
/// Receive buffer size on listeners with `gro`: a GRO train is at most 64 KiB.
const GRO_BUFFER: usize = 65_536;
/// Longest sleep when no timer is due (bounds how late a stop or snapshot is noticed).
const MAX_SLEEP: Duration = Duration::from_millis(250);
/// Minimum interval between two log lines about the same kind of I/O trouble.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Token of the waker. Listener tokens count down from just below it; flow tokens are
/// [`FlowHandle::to_u64`], whose slot half never comes near these values.
const WAKER: Token = Token(usize::MAX);

fn listener_token(i: usize) -> Token {
    Token(usize::MAX - 1 - i)
}

fn listener_of_token(t: Token, listeners: usize) -> Option<usize> {
    let i = usize::MAX.checked_sub(t.0)?.checked_sub(1)?;
    (i < listeners).then_some(i)
}

/// Below the listener tokens: one token per shared upstream socket, (listener, family, port)
/// packed into 31 bits. The slot half of these tokens is above 2^31, which no flow slot
/// reaches (flows are capped at 2^24).
const PORT_TOKENS: usize = usize::MAX - (1 << 17);
const PORT_BITS: u32 = 20;
const _: () = assert!(crate::ports::MAX_SOCKETS == 1 << PORT_BITS);

/// A shared upstream socket: listener index, IPv6 or not, port index.
type PortRef = (usize, bool, Port);

fn port_token((li, v6, port): PortRef) -> Token {
    Token(PORT_TOKENS - ((li << (PORT_BITS + 1)) | (usize::from(v6) << PORT_BITS) | port as usize))
}

fn port_of_token(t: Token) -> Option<PortRef> {
    let x = PORT_TOKENS.checked_sub(t.0)?;
    if x >= SHARED_LISTENERS << (PORT_BITS + 1) {
        return None;
    }
    let port = (x & ((1 << PORT_BITS) - 1)) as Port;
    Some((x >> (PORT_BITS + 1), (x >> PORT_BITS) & 1 == 1, port))
}

/// What a worker is built from.
pub(crate) struct WorkerSetup {
    pub id: usize,
    pub workers: usize,
    pub listeners: Vec<UdpSocket>,
    pub shared: Arc<ArcSwap<Snapshot>>,
    pub stats: Arc<WorkerStats>,
    pub stop: Arc<AtomicBool>,
    pub sticky: Vec<Option<Arc<Mutex<StickyTable>>>>,
    /// The data plane's clock origin, shared by every worker so that state they share (rate
    /// limiters) sees one time.
    pub epoch: Instant,
    /// Descriptors left to the control plane ([`crate::DataplaneOptions::descriptor_reserve`]).
    pub descriptor_reserve: u64,
}

/// What [`Worker::queue_replies`] did with a batch of replies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relayed {
    Queued,
    /// The flow got its last expected reply and is closed.
    FlowCompleted,
}

/// A listener socket of this worker and its queue of replies.
struct ListenerIo {
    socket: UdpSocket,
    /// The address the socket is bound to (port resolved), for PROXY headers.
    bound: SocketAddr,
    replies: SendBatch,
    /// Bound to 0.0.0.0 or [::]: replies need an explicit source address.
    wildcard: bool,
    /// Not yet drained since the last readiness event.
    readable: bool,
    /// The last turn ended with the socket's receive queue more than [`OVERLOAD_FILL`] full:
    /// new flows are admitted at a bounded rate so that the datagrams of established flows
    /// keep being read before the kernel has to drop them.
    overloaded: bool,
    /// Upstream sockets its flows share (`shared_upstream`), per address family.
    shared: SharedPorts,
    /// Behind another balancer (`proxy_protocol`): per sender, the client its last PROXY
    /// header named, for its datagrams without one. One entry per sender with a live flow.
    senders: std::collections::HashMap<SocketAddr, SocketAddr>,
}

/// A listener's shared upstream sockets: one pool per address family (a socket sends to
/// backends of its own family).
struct SharedPorts {
    v4: PortPool<UdpSocket>,
    v6: PortPool<UdpSocket>,
}

impl SharedPorts {
    #[inline]
    fn family(&self, v6: bool) -> &PortPool<UdpSocket> {
        if v6 { &self.v6 } else { &self.v4 }
    }

    #[inline]
    fn family_mut(&mut self, v6: bool) -> &mut PortPool<UdpSocket> {
        if v6 { &mut self.v6 } else { &mut self.v4 }
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// Where a flow's datagrams to its backend go out.
#[derive(Debug)]
enum UpstreamSocket {
    /// A socket of its own (connected to the backend, except in datagram mode).
    Own(UdpSocket),
    /// The listener's shared socket with this port index (of the backend's address family),
    /// which carries no other flow to this backend.
    Shared(Port),
}

/// The I/O half of a flow: its upstream socket (connected to the backend, except in datagram
/// mode where each datagram may go to another backend), or its share of a shared one.
#[derive(Debug)]
pub(crate) struct Upstream {
    socket: UpstreamSocket,
    /// Request-response mode: when the flow's first request was sent (µs since the worker's
    /// epoch), until its first reply turns it into a latency sample.
    request_sent_us: Option<u64>,
    /// The current backend answered since it got the flow's PROXY header: with
    /// `proxy_protocol = "first"` the header is sent again on every datagram until then, since
    /// the first datagram (and its header) may have been lost.
    header_acked: bool,
    /// Behind another balancer (a listener with `proxy_protocol`): the client and target
    /// its PROXY header named. `None`: the sender is the client.
    origin: Option<Box<Origin>>,
    /// Anti-amplification (`reply_ratio`): payload bytes from the client and back to it.
    requested: u32,
    replied: u32,
    /// The client was refused (access list or rate limit) and this flow goes to the
    /// listener's abuse pool.
    abuse: bool,
    /// The socket may serve another client once the flow completes: it is connected to the
    /// backend and bound to no client's address (not a transparent pool).
    reusable: bool,
    /// The own socket is connected to the backend (not in datagram mode): the kernel reports
    /// its refusals directly, and sends name no destination.
    connected: bool,
    /// Placed or moved while its pool was missing backends: once the pool is whole, the flow
    /// may go back into balance (the pool's `rebalance`).
    displaced: bool,
}

/// Who a flow really serves when its datagrams arrive through another balancer.
#[derive(Clone, Copy, Debug)]
struct Origin {
    /// The client's address (for policy, hashing and the header udplb forwards).
    client: SocketAddr,
    /// The address the client sent to.
    target: SocketAddr,
}

impl Upstream {
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

    /// The address the flow acts for: the PROXY header's client, else `key.client`.
    #[inline]
    fn client(&self, key: &FlowKey) -> SocketAddr {
        self.origin.as_ref().map_or(key.client, |o| o.client)
    }
}

/// A worker thread's state.
pub(crate) struct Worker {
    id: usize,
    workers: usize,
    poll: Poll,
    waker: Arc<Waker>,
    listeners: Vec<ListenerIo>,
    table: FlowTable<Upstream>,
    /// Sockets of completed request-response flows, for the next flows to their backends.
    spares: Spares<UdpSocket>,
    /// The published snapshot, checked once per turn (a relaxed load and a pointer compare).
    published: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
    /// The snapshot this worker applied.
    snap: Arc<Snapshot>,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
    sticky: Vec<Option<Arc<Mutex<StickyTable>>>>,
    epoch: Instant,
    /// Upstream sockets with a descriptor number at or above this are closed at once and the
    /// flow shed: the spare descriptors belong to the control plane.
    fd_ceiling: i64,
    /// When the listener sockets' kernel drop counters were last read.
    drops_read: Time,
    /// New flows the current listener batch may still open (see [`OVERLOAD_FILL`]).
    new_flow_allowance: u32,
    /// Scratch space for the PROXY v2 header of the datagram being sent.
    header: [u8; udplb_core::proxy::MAX_HEADER_V6],
    rng: u64,
    log: RateLimitedLog,
}

impl Worker {
    pub(crate) fn new(setup: WorkerSetup) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let snap = setup.shared.load_full();
        let mut listeners = Vec::with_capacity(setup.listeners.len());
        for (i, socket) in setup.listeners.into_iter().enumerate() {
            let fd = socket.as_raw_fd();
            poll.registry()
                .register(&mut SourceFd(&fd), listener_token(i), Interest::READABLE)?;
            let spec = &snap.listeners[i];
            listeners.push(ListenerIo {
                bound: socket.local_addr()?,
                socket,
                replies: SendBatch::new(BATCH, spec.max_datagram_size + 1),
                wildcard: spec.address.ip().is_unspecified(),
                readable: true,
                overloaded: false,
                shared: SharedPorts {
                    v4: PortPool::new(),
                    v6: PortPool::new(),
                },
                senders: std::collections::HashMap::new(),
            });
        }
        let mut worker = Worker {
            id: setup.id,
            workers: setup.workers,
            poll,
            waker,
            listeners,
            table: FlowTable::new(),
            spares: Spares::new(),
            published: Cache::new(setup.shared),
            snap,
            stats: setup.stats,
            stop: setup.stop,
            sticky: setup.sticky,
            epoch: setup.epoch,
            fd_ceiling: fd_ceiling(setup.descriptor_reserve),
            new_flow_allowance: u32::MAX,
            drops_read: Time(0),
            header: [0; udplb_core::proxy::MAX_HEADER_V6],
            rng: seed(setup.id),
            log: RateLimitedLog::default(),
        };
        worker.apply_snapshot();
        Ok(worker)
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    pub(crate) fn run(mut self) {
        let max_datagram = self
            .snap
            .listeners
            .iter()
            .map(|l| {
                if l.gro {
                    GRO_BUFFER - 1
                } else {
                    l.max_datagram_size
                }
            })
            .max()
            .unwrap_or(0);
        let mut recv = RecvBatch::new(BATCH, max_datagram + 1);
        let mut inbox = RecvBatch::new(REPLY_BATCH, max_datagram + 1);
        let mut events = Events::with_capacity(1024);
        let mut ready: Vec<FlowHandle> = Vec::with_capacity(1024);
        let mut again: Vec<FlowHandle> = Vec::with_capacity(1024);
        let mut ready_ports: Vec<PortRef> = Vec::with_capacity(64);
        let mut again_ports: Vec<PortRef> = Vec::with_capacity(64);
        // One clock read per turn: the turn's work and the next sleep both use it.
        let mut now = self.now();
        while !self.stop.load(Ordering::Acquire) {
            let busy = !ready.is_empty()
                || !ready_ports.is_empty()
                || self.listeners.iter().any(|l| l.readable);
            let timeout = if busy {
                Duration::ZERO
            } else {
                self.sleep_budget(now)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.log.warn("poll", &e);
                }
                continue;
            }
            self.stats.turns.add(1);
            self.refresh_snapshot();
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    continue;
                }
                if let Some(i) = listener_of_token(t, self.listeners.len()) {
                    self.listeners[i].readable = true;
                } else if let Some(port) = port_of_token(t) {
                    ready_ports.push(port);
                } else {
                    ready.push(FlowHandle::from_u64(t.0 as u64));
                }
            }
            now = self.now();
            // One reference count per turn, not per datagram: the count is shared by all
            // workers, and touching it per datagram would bounce its cache line between cores.
            let snap = Arc::clone(&self.snap);
            for li in 0..self.listeners.len() {
                if self.listeners[li].readable {
                    self.forward_from_listener(li, &snap, &mut recv, now);
                }
            }
            again.clear();
            for &h in &ready {
                if !self.relay_replies(&snap, h, &mut inbox, now) {
                    again.push(h);
                }
            }
            std::mem::swap(&mut ready, &mut again);
            again_ports.clear();
            for &port in &ready_ports {
                if !self.relay_port_replies(&snap, port, &mut recv, now) {
                    again_ports.push(port);
                }
            }
            std::mem::swap(&mut ready_ports, &mut again_ports);
            self.flush_all_replies();
            self.expire_idle(now);
            self.publish_gauges();
            self.refresh_kernel_drops(now);
        }
        self.shutdown();
    }

    /// Milliseconds since this worker started: the core's clock.
    #[inline]
    fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_millis() as u64)
    }

    /// Microseconds since this worker started, for latency samples (one clock read; taken
    /// per request-response exchange, not per datagram).
    #[inline]
    fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// How long the loop may sleep: until the next flow deadline, at most [`MAX_SLEEP`]. `now`
    /// is the last turn's time (a deadline is then met up to one turn late, never early).
    fn sleep_budget(&self, now: Time) -> Duration {
        match self.table.next_deadline() {
            Some(deadline) => deadline
                .since(now)
                .clamp(Duration::from_millis(1), MAX_SLEEP),
            None => MAX_SLEEP,
        }
    }

    /// Picks up a newly published snapshot (one relaxed atomic load per turn).
    fn refresh_snapshot(&mut self) {
        let published = self.published.load();
        if published.generation != self.snap.generation {
            self.snap = Arc::clone(published);
            self.apply_snapshot();
        }
    }

    fn apply_snapshot(&mut self) {
        // Listeners are bound when the data plane starts; a snapshot with another listener set
        // is applied only to the listeners this worker has.
        let workers = self.workers as u32;
        let caps: Vec<u32> = self
            .snap
            .listeners
            .iter()
            .take(self.listeners.len())
            .map(|l| l.max_flows.div_ceil(workers))
            .collect();
        self.table.set_caps(&caps);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Reads up to [`LISTENER_BATCHES_PER_TURN`] batches from listener `li` and forwards them.
    fn forward_from_listener(
        &mut self,
        li: usize,
        snap: &Snapshot,
        recv: &mut RecvBatch,
        now: Time,
    ) {
        let overloaded = self.listeners[li].overloaded;
        for _ in 0..LISTENER_BATCHES_PER_TURN {
            match recv.recv(self.listeners[li].socket.as_fd()) {
                Ok(n) => {
                    self.new_flow_allowance = if overloaded {
                        NEW_FLOWS_PER_BATCH_UNDER_BACKLOG
                    } else {
                        u32::MAX
                    };
                    for i in 0..n {
                        let d = recv.get(i);
                        if d.segment_size.is_none() {
                            self.forward_one(li, snap, d, now);
                            continue;
                        }
                        self.stats.listeners[li].gro_trains.add(1);
                        if passes_trains(&snap.listeners[li], snap) {
                            self.forward_one(li, snap, d, now);
                            continue;
                        }
                        // A per-datagram policy applies: take the train apart.
                        for data in d.datagrams() {
                            let single = RecvMeta {
                                data,
                                segment_size: None,
                                ..d
                            };
                            self.forward_one(li, snap, single, now);
                        }
                    }
                    // A short batch means the socket is empty; a later datagram raises a new
                    // edge, so no extra call just to see EAGAIN.
                    if n < recv.capacity() {
                        self.listeners[li].readable = false;
                        break;
                    }
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.log.warn("listener receive", &e);
                    }
                    self.listeners[li].readable = false;
                    break;
                }
            }
        }
        // A turn that used its whole budget left datagrams queued: how many (one syscall per
        // such turn, never per datagram).
        let lio = &mut self.listeners[li];
        lio.overloaded = lio.readable
            && udplb_sys::socket::receive_queue(&lio.socket)
                .is_ok_and(|(queued, buffer)| queued > buffer / OVERLOAD_FILL);
    }

    /// Forwards `d`, received on listener `li`, or counts why not. `d` is one datagram, or a
    /// GRO train of a flow-mode listener that passes trains whole ([`passes_trains`]): the
    /// same decisions hold for all its datagrams, which are counted one by one.
    #[inline]
    fn forward_one(&mut self, li: usize, snap: &Snapshot, d: RecvMeta<'_>, now: Time) {
        let spec = &snap.listeners[li];
        let stats = &self.stats.listeners[li];
        let count = d.datagram_count() as u64;
        stats.datagrams_in.add(count);
        stats.bytes_in.add(d.data.len() as u64);
        if d.data.is_empty() {
            return stats.drop(DropReason::Empty);
        }
        let largest = d.segment_size.map_or(d.data.len(), usize::from);
        if d.truncated || largest > spec.max_datagram_size {
            return stats.drop_n(DropReason::Oversize, count);
        }
        let local = if self.listeners[li].wildcard {
            d.local
        } else {
            None
        };
        let mut key = FlowKey {
            listener: li as u16,
            client: d.source,
            local,
            origin: None,
        };
        let (data, origin) = if spec.proxy_ingress {
            match self.ingress(li, spec, &mut key, d.data) {
                Ok(x) => x,
                Err(reason) => return stats.drop_n(reason, count),
            }
        } else {
            (d.data, None)
        };
        let found = self.table.find(&key);
        // Policy applies to the client a flow serves: the PROXY header's, when there is one.
        let client = match (origin, found.and_then(|h| self.table.get(h))) {
            (Some(o), _) => o.client,
            (None, Some(flow)) => flow.io.client(&flow.key),
            (None, None) => d.source,
        };
        let abuse_flow = found
            .and_then(|h| self.table.get(h))
            .is_some_and(|f| f.io.abuse);
        let mut divert = false;
        if !abuse_flow && let Err(reason) = admission(spec, client, now) {
            // A refused client without a flow goes to the abuse pool, if there is one.
            if spec.abuse_pool.is_none() || found.is_some() {
                return stats.drop_n(reason, count);
            }
            divert = true;
        }
        let (h, fresh) = match found {
            Some(h) => (h, false),
            None => match self.admit(key, origin, divert, spec, snap, now) {
                Ok(h) => (h, true),
                Err(reason) => return self.stats.listeners[li].drop_n(reason, count),
            },
        };
        if let Some(o) = origin {
            // The sender's datagrams without a header belong to the client it named last.
            self.listeners[li].senders.insert(key.client, o.client);
        }
        let sent = match spec.mode {
            SessionMode::Datagram => self.send_scheduled(h, spec, snap, data, fresh),
            SessionMode::Flow | SessionMode::RequestResponse { .. } => {
                self.send_on_flow(h, li, snap, data, d.segment_size, now)
            }
        };
        let stats = &self.stats.listeners[li];
        match sent {
            Ok(backend) => {
                if self.table.get(h).is_some_and(|f| f.io.abuse) {
                    stats.abuse_diverted.add(count);
                }
                stats.forwarded.add(count);
                stats.bytes_forwarded.add(data.len() as u64);
                if let Some(b) = self.stats.backends.get(backend.index()) {
                    b.forwarded.add(count);
                    b.bytes_forwarded.add(data.len() as u64);
                }
                let responses = match spec.mode {
                    SessionMode::RequestResponse { responses } => responses,
                    _ => 0,
                };
                if spec
                    .limits
                    .as_ref()
                    .is_some_and(|l| l.reply_ratio().is_some())
                    && let Some(flow) = self.table.get_mut(h)
                {
                    let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    flow.io.requested = flow.io.requested.saturating_add(n);
                }
                if self.table.on_request(h, now, responses) && responses > 0 {
                    let sent = self.micros();
                    if let Some(flow) = self.table.get_mut(h) {
                        flow.io.request_sent_us = Some(sent);
                    }
                }
            }
            Err(reason) => stats.drop_n(reason, count),
        }
    }

    /// A listener behind another balancer (`proxy_protocol`): checks the sender, strips the
    /// PROXY v2 header and returns the payload with the client the header names, which joins
    /// `key` (each client a sender forwards is a flow of its own). A new flow needs a header (a
    /// LOCAL one means the sender itself is the client); later datagrams may come without one,
    /// and belong to the client the sender's last header named.
    fn ingress<'d>(
        &self,
        li: usize,
        spec: &ListenerSpec,
        key: &mut FlowKey,
        data: &'d [u8],
    ) -> Result<(&'d [u8], Option<Origin>), DropReason> {
        if !spec.proxy_from.is_empty() && !spec.proxy_from.contains(key.client.ip()) {
            return Err(DropReason::ProxyHeader);
        }
        if !udplb_core::proxy::has_signature(data) {
            key.origin = self.listeners[li].senders.get(&key.client).copied();
            return match self.table.find(key) {
                Some(_) => Ok((data, None)),
                None => Err(DropReason::ProxyHeader),
            };
        }
        let header = udplb_core::proxy::parse(data).map_err(|_| DropReason::ProxyHeader)?;
        let payload = &data[header.len..];
        if payload.is_empty() {
            return Err(DropReason::Empty);
        }
        let origin = header
            .addresses
            .map(|(client, target)| Origin { client, target });
        key.origin = origin.map(|o| o.client);
        Ok((payload, origin))
    }

    /// Creates a flow for `key`: cap, backend choice, upstream socket, registration.
    fn admit(
        &mut self,
        key: FlowKey,
        origin: Option<Origin>,
        mut abuse: bool,
        spec: &ListenerSpec,
        snap: &Snapshot,
        now: Time,
    ) -> Result<FlowHandle, DropReason> {
        // The network peer, whatever a PROXY header says: replies go back to it.
        if snap.guard.refuses(key.client) {
            return Err(DropReason::BadSource);
        }
        if !snap.admitting {
            return Err(DropReason::ShuttingDown);
        }
        if !self.table.has_room(key.listener) {
            return Err(DropReason::FlowCap);
        }
        let client = origin.map_or(key.client, |o| o.client);
        if !abuse
            && let Some(limits) = &spec.limits
            && !limits.new_flow(client.ip(), now.0)
        {
            if spec.abuse_pool.is_none() {
                return Err(DropReason::FlowRateLimited);
            }
            abuse = true;
        }
        if self.new_flow_allowance == 0 {
            return Err(DropReason::Overload);
        }
        self.new_flow_allowance -= 1;
        let li = key.listener as usize;
        let pi = if abuse {
            spec.abuse_pool.ok_or(DropReason::Denied)?
        } else {
            spec.pool
        };
        let pool = &snap.pools[pi];
        let idx = self
            .choose_backend(li, spec, pi, pool, &client)
            .ok_or(DropReason::NoBackend)?;
        let backend = &pool.backends[idx];
        let connect = spec.mode != SessionMode::Datagram;
        let shared = spec.shared_upstream && connect && !pool.transparent && li < SHARED_LISTENERS;
        let reusable = connect && !pool.transparent && !shared;
        let spare = if reusable {
            self.take_spare(li, backend.spec.addr, owner_of(&key), now)
        } else {
            None
        };
        let reused = spare.is_some();
        let socket = match spare {
            Some(s) => UpstreamSocket::Own(s),
            None if shared => UpstreamSocket::Shared(self.reserve_port(
                li,
                backend.spec.addr,
                owner_of(&key),
                now,
            )?),
            None => UpstreamSocket::Own(self.open_upstream(
                pool.transparent,
                backend.spec.addr,
                client,
                connect,
            )?),
        };
        let own_fd = match &socket {
            UpstreamSocket::Own(s) => Some(s.as_raw_fd()),
            UpstreamSocket::Shared(_) => None,
        };
        let backend_addr = backend.spec.addr;
        let timeouts = Timeouts {
            idle: spec.idle_timeout,
            reply: spec.reply_timeout,
        };
        let h = self.table.insert(
            key,
            (backend.id, backend.spec.addr),
            snap.generation,
            now,
            timeouts,
            Upstream {
                socket,
                request_sent_us: None,
                header_acked: false,
                origin: origin.map(Box::new),
                requested: 0,
                replied: 0,
                abuse,
                reusable,
                connected: connect,
                displaced: pool.degraded,
            },
        );
        match own_fd {
            Some(fd) => self.register_own(h, fd, reused, now)?,
            None => {
                if let Some(UpstreamSocket::Shared(port)) = self.table.get(h).map(|f| &f.io.socket)
                {
                    let port = *port;
                    self.listeners[li]
                        .shared
                        .family_mut(backend_addr.is_ipv6())
                        .assign(port, backend_addr, h);
                }
            }
        }
        if reused {
            self.stats.listeners[li].sockets_reused.add(1);
        }
        self.stats.listeners[li].flows_created.add(1);
        if let Some(sticky) = self.sticky[li].as_ref().filter(|_| !abuse) {
            let mut table = sticky.lock().unwrap_or_else(|p| p.into_inner());
            table.acquire(client.ip(), backend.id, now);
        }
        Ok(h)
    }

    /// Registers flow `h`'s own socket `fd` for readiness under the flow's token (`reused`: a
    /// spare, still registered under its previous flow's token). On failure the flow is closed.
    fn register_own(
        &mut self,
        h: FlowHandle,
        fd: std::os::fd::RawFd,
        reused: bool,
        now: Time,
    ) -> Result<(), DropReason> {
        let token = Token(h.to_u64() as usize);
        let registry = self.poll.registry();
        let registered = if reused {
            registry.reregister(&mut SourceFd(&fd), token, Interest::READABLE)
        } else {
            registry.register(&mut SourceFd(&fd), token, Interest::READABLE)
        };
        if let Err(e) = registered {
            self.log
                .warn("registering an upstream socket (new flows are shed)", &e);
            self.close_flow(h, CloseReason::Error, now);
            return Err(DropReason::UpstreamSocket);
        }
        Ok(())
    }

    /// A (shared socket, `backend`) pair of listener `li` for a flow of `owner`: one it gave
    /// back itself, a free one out of quarantine, else on a newly opened socket.
    fn reserve_port(
        &mut self,
        li: usize,
        backend: SocketAddr,
        owner: Owner,
        now: Time,
    ) -> Result<Port, DropReason> {
        let v6 = backend.is_ipv6();
        if let Some(port) = self.listeners[li]
            .shared
            .family_mut(v6)
            .reserve(backend, owner, now)
        {
            return Ok(port);
        }
        let opened = self.open_shared(li, backend);
        let pool = self.listeners[li].shared.family_mut(v6);
        // No socket could be opened: the flow is shed rather than given a pair still in
        // quarantine (a late answer to that pair's last flow would reach this client).
        opened.and_then(|()| {
            pool.reserve(backend, owner, now)
                .ok_or(DropReason::UpstreamSocket)
        })
    }

    /// Opens one more shared upstream socket for listener `li`, of `backend`'s family, and
    /// registers it for readiness.
    fn open_shared(&mut self, li: usize, backend: SocketAddr) -> Result<(), DropReason> {
        let v6 = backend.is_ipv6();
        let pool = self.listeners[li].shared.family(v6);
        if pool.len() >= crate::ports::MAX_SOCKETS {
            return Err(DropReason::UpstreamSocket);
        }
        let token = port_token((li, v6, pool.next_port()));
        let opened =
            udplb_sys::socket::upstream_socket(backend, false, None, Some(SHARED_SOCKET_BUFFER))
                .and_then(reporting_errors);
        let socket = self.below_fd_ceiling(opened)?;
        let fd = socket.as_raw_fd();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            self.log
                .warn("registering an upstream socket (new flows are shed)", &e);
            return Err(DropReason::UpstreamSocket);
        }
        // Cannot be full: checked above.
        let _ = self.listeners[li].shared.family_mut(v6).add(socket);
        Ok(())
    }

    /// A new upstream socket for a flow of `client` to `backend` (connected unless in datagram
    /// mode), refused when descriptors run short.
    fn open_upstream(
        &mut self,
        transparent: bool,
        backend: SocketAddr,
        client: SocketAddr,
        connect: bool,
    ) -> Result<UdpSocket, DropReason> {
        let opened = if transparent {
            udplb_sys::socket::transparent_upstream_socket(backend, client, connect)
        } else {
            udplb_sys::socket::upstream_socket(backend, connect, None, None)
        };
        // An unconnected socket hears of refusals only through its error queue.
        let opened = if connect {
            opened
        } else {
            opened.and_then(reporting_errors)
        };
        self.below_fd_ceiling(opened)
    }

    /// The socket just opened (or why not), refused when its descriptor number says the
    /// descriptors are nearly exhausted.
    fn below_fd_ceiling(&mut self, opened: io::Result<UdpSocket>) -> Result<UdpSocket, DropReason> {
        let socket = match opened {
            Ok(s) => s,
            Err(e) => {
                self.log
                    .warn("opening an upstream socket (new flows are shed)", &e);
                return Err(DropReason::UpstreamSocket);
            }
        };
        if i64::from(socket.as_raw_fd()) >= self.fd_ceiling {
            // Descriptors are allocated lowest first, so a number this high means the spare
            // ones are nearly gone: keep them for the admin endpoint and health checks.
            drop(socket);
            self.log.warn(
                "opening an upstream socket (new flows are shed)",
                &io::Error::other("descriptors are nearly exhausted (RLIMIT_NOFILE)"),
            );
            return Err(DropReason::UpstreamSocket);
        }
        Ok(socket)
    }

    /// The oldest spare socket connected to `backend` out of quarantine at `now`, emptied of
    /// what it received while parked (counted as late replies on listener `li`). A spare that
    /// cannot be emptied is closed and the next one tried.
    fn take_spare(
        &mut self,
        li: usize,
        backend: SocketAddr,
        owner: Owner,
        now: Time,
    ) -> Option<UdpSocket> {
        while let Some(socket) = self.spares.take(backend, owner, now) {
            match udplb_sys::socket::discard_queued(&socket, SPARE_DISCARD_LIMIT) {
                Ok(Some(late)) => {
                    self.stats.listeners[li].late_replies.add(late as u64);
                    return Some(socket);
                }
                Ok(None) => {
                    let late = SPARE_DISCARD_LIMIT as u64;
                    self.stats.listeners[li].late_replies.add(late);
                }
                Err(e) => self.log.warn("emptying a spare upstream socket", &e),
            }
        }
        None
    }

    /// The backend index in `pool` for a new flow of `client` on listener `li`.
    fn choose_backend(
        &mut self,
        li: usize,
        spec: &ListenerSpec,
        pi: usize,
        pool: &Pool,
        client: &SocketAddr,
    ) -> Option<usize> {
        // IP affinity is the listener's pool's; the abuse pool only schedules.
        if let Some(sticky) = self.sticky[li].as_ref().filter(|_| pi == spec.pool) {
            let stuck = sticky
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .backend_of(client.ip());
            if let Some(i) = stuck.and_then(|id| pool.position_of_id(id))
                && pool.tier.contains(i)
            {
                return Some(i);
            }
        }
        let key = if pool.scheduler.is_consistent_hash() {
            ClientKey::of(client, spec.affinity)
        } else {
            ClientKey(0)
        };
        let random = self.next_random();
        let input = PickInput {
            key,
            random,
            load: self.table.load(),
        };
        pick(pool, input)
    }

    /// Flow and request-response modes: sends on the flow's connected socket, moving the flow
    /// first if its backend no longer keeps flows. `segment_size`: `data` is a GRO train, sent
    /// on as one (UDP GSO).
    #[inline]
    fn send_on_flow(
        &mut self,
        h: FlowHandle,
        li: usize,
        snap: &Snapshot,
        data: &[u8],
        segment_size: Option<u16>,
        now: Time,
    ) -> Result<BackendId, DropReason> {
        let flow = self.table.get(h).ok_or(DropReason::SendError)?;
        // (A flow that revalidation moves is displaced, and not rebalanced at once.)
        let displaced = flow.io.displaced;
        if flow.checked_generation != snap.generation {
            self.revalidate(h, li, snap)?;
        }
        if displaced {
            self.rebalance(h, li, snap, now)?;
        }
        let flow = self.table.get(h).ok_or(DropReason::SendError)?;
        let pi = flow
            .io
            .pool(&snap.listeners[li])
            .ok_or(DropReason::NoBackend)?;
        let with_header = match snap.pools[pi].proxy_header {
            ProxyHeader::Off => false,
            ProxyHeader::First => !flow.io.header_acked,
            ProxyHeader::Every => true,
        };
        // A shared socket is not connected (nor is a datagram-mode flow's socket, after a
        // reload changed the mode): it names the backend on every send.
        let (fd, dest) = match &flow.io.socket {
            UpstreamSocket::Own(s) => {
                (s.as_fd(), (!flow.io.connected).then_some(flow.backend_addr))
            }
            UpstreamSocket::Shared(port) => {
                let pool = self.listeners[li]
                    .shared
                    .family(flow.backend_addr.is_ipv6());
                let s = pool.socket(*port).ok_or(DropReason::SendError)?;
                (s.as_fd(), Some(flow.backend_addr))
            }
        };
        let header = if with_header {
            write_proxy_header(&mut self.header, self.listeners[li].bound, flow)
        } else {
            0
        };
        let mut sent = if header == 0 && segment_size.is_none() && dest.is_none() {
            // The common case: a flow's own connected socket, nothing to add.
            udplb_sys::batch::send(fd, data)
        } else {
            send_datagram(fd, &self.header[..header], data, segment_size, dest)
        };
        if dest.is_some() && sent.as_ref().is_err_and(refused) {
            // An unconnected socket fails its next send once after any refusal it was told of,
            // whichever backend refused: account for what is queued, and send again.
            let _ = self.account_refusals(fd, li, snap);
            sent = send_datagram(fd, &self.header[..header], data, segment_size, dest);
        }
        match sent {
            Ok(_) => Ok(flow.backend),
            Err(e) => Err(self.on_send_error(h, li, &e)),
        }
    }

    /// Datagram mode: schedules this datagram on its own and sends it from the client's
    /// (unconnected) upstream socket. The datagram that opened the flow (`fresh`) goes where
    /// admission scheduled it: one pick per datagram, so round robin stays exact across
    /// clients that send a single datagram each.
    ///
    /// (A connected socket per backend would save the kernel's route lookup of each `sendto`,
    /// about 300 ns, but costs one `recvmmsg` per backend for the replies: measured slower.)
    #[inline]
    fn send_scheduled(
        &mut self,
        h: FlowHandle,
        spec: &ListenerSpec,
        snap: &Snapshot,
        data: &[u8],
        fresh: bool,
    ) -> Result<BackendId, DropReason> {
        let flow = self.table.get(h).ok_or(DropReason::SendError)?;
        let li = flow.key.listener as usize;
        let client = flow.io.client(&flow.key);
        let pi = flow.io.pool(spec).ok_or(DropReason::NoBackend)?;
        let pool = &snap.pools[pi];
        let (dest, backend) = if fresh {
            (flow.backend_addr, flow.backend)
        } else {
            let idx = self
                .choose_backend(li, spec, pi, pool, &client)
                .ok_or(DropReason::NoBackend)?;
            (pool.backends[idx].spec.addr, pool.backends[idx].id)
        };
        let flow = self.table.get(h).ok_or(DropReason::SendError)?;
        // Datagram mode never shares sockets (a client's socket serves every backend).
        let UpstreamSocket::Own(socket) = &flow.io.socket else {
            return Err(DropReason::SendError);
        };
        // Every datagram is scheduled on its own, so `first` means every datagram here.
        let header = if pool.proxy_header == ProxyHeader::Off {
            0
        } else {
            write_proxy_header(&mut self.header, self.listeners[li].bound, flow)
        };
        let fd = socket.as_fd();
        let mut sent = send_datagram(fd, &self.header[..header], data, None, Some(dest));
        if sent.as_ref().is_err_and(refused) {
            // A refusal of an earlier datagram (to this or another backend) failed this send:
            // account for it, and send again.
            let _ = self.account_refusals(fd, li, snap);
            sent = send_datagram(fd, &self.header[..header], data, None, Some(dest));
        }
        match sent {
            Ok(_) => Ok(backend),
            Err(e) => Err(self.on_send_error(h, li, &e)),
        }
    }

    /// After a snapshot change: keeps the flow on its backend if that backend still keeps
    /// flows, else moves it to a new pick (its socket is re-connected).
    fn revalidate(&mut self, h: FlowHandle, li: usize, snap: &Snapshot) -> Result<(), DropReason> {
        let spec = &snap.listeners[li];
        let flow = self.table.get(h).ok_or(DropReason::SendError)?;
        let pi = flow.io.pool(spec).ok_or(DropReason::NoBackend)?;
        let pool = &snap.pools[pi];
        let (backend, client) = (flow.backend, flow.io.client(&flow.key));
        if pool
            .position_of_id(backend)
            .is_some_and(|i| pool.keeps_flows(i))
        {
            if let Some(f) = self.table.get_mut(h) {
                f.checked_generation = snap.generation;
            }
            return Ok(());
        }
        let idx = self
            .choose_backend(li, spec, pi, pool, &client)
            .ok_or(DropReason::NoBackend)?;
        self.move_flow(h, li, &pool.backends[idx], snap)?;
        if let Some(f) = self.table.get_mut(h) {
            f.io.displaced = true;
        }
        Ok(())
    }

    /// A flow displaced by a failure, once its pool is whole again: at its first datagram
    /// after a pause of the pool's `rebalance`, if its backend holds more than its share of
    /// the worker's flows, it moves to the scheduler's pick when that one holds fewer. Flows
    /// placed while the pool was whole never move.
    fn rebalance(
        &mut self,
        h: FlowHandle,
        li: usize,
        snap: &Snapshot,
        now: Time,
    ) -> Result<(), DropReason> {
        let spec = &snap.listeners[li];
        let flow = self.table.get(h).ok_or(DropReason::SendError)?;
        let pi = flow.io.pool(spec).ok_or(DropReason::NoBackend)?;
        let pool = &snap.pools[pi];
        let Some(pause) = pool.rebalance else {
            return Ok(());
        };
        if pool.degraded || now.since(flow.last_seen) < pause {
            return Ok(());
        }
        let (backend, client) = (flow.backend, flow.io.client(&flow.key));
        let current = pool.position_of_id(backend);
        let load = self.table.load();
        if current.is_some_and(|i| pool.overloaded(i, load)) {
            let pick = self.choose_backend(li, spec, pi, pool, &client);
            let flows = |i: usize| {
                let load = self.table.load();
                load.get(pool.backends[i].id.index()).copied().unwrap_or(0)
            };
            if let (Some(to), Some(from)) = (pick, current)
                && flows(to) + 1 < flows(from)
            {
                self.move_flow(h, li, &pool.backends[to], snap)?;
                self.stats.listeners[li].flows_rebalanced.add(1);
            }
        }
        if let Some(f) = self.table.get_mut(h) {
            f.io.displaced = false;
        }
        Ok(())
    }

    /// Moves flow `h` of listener `li` to backend `b`: its own socket re-connected, or a pair
    /// with `b` taken and the old pair given back.
    fn move_flow(
        &mut self,
        h: FlowHandle,
        li: usize,
        b: &udplb_core::snapshot::Backend,
        snap: &Snapshot,
    ) -> Result<(), DropReason> {
        let flow = self.table.get(h).ok_or(DropReason::SendError)?;
        let (old, quarantine, owner) = (flow.backend_addr, flow.reply_timeout, owner_of(&flow.key));
        match &flow.io.socket {
            UpstreamSocket::Own(s) => {
                if let Err(e) = s.connect(b.spec.addr) {
                    self.log.warn("re-connecting a moved flow", &e);
                    return Err(DropReason::SendError);
                }
            }
            &UpstreamSocket::Shared(port) => {
                // A pair with the new backend, then the old pair back.
                let now = self.now();
                let new = self.reserve_port(li, b.spec.addr, owner, now)?;
                let shared = &mut self.listeners[li].shared;
                shared
                    .family_mut(old.is_ipv6())
                    .release(port, old, owner, now.after(quarantine));
                shared
                    .family_mut(b.spec.addr.is_ipv6())
                    .assign(new, b.spec.addr, h);
                if let Some(f) = self.table.get_mut(h) {
                    f.io.socket = UpstreamSocket::Shared(new);
                }
            }
        }
        self.table.rebind(h, (b.id, b.spec.addr), snap.generation);
        if let Some(f) = self.table.get_mut(h) {
            f.io.header_acked = false; // the new backend has not seen it
        }
        Ok(())
    }

    /// Counts an ICMP port unreachable on flow `h`'s upstream socket, per listener and per
    /// backend (the health monitor reads the latter as a passive failure signal).
    fn count_refused(&self, h: FlowHandle, li: usize) {
        self.stats.listeners[li].backend_refused.add(1);
        if let Some(f) = self.table.get(h) {
            self.count_passive_failure(f.backend);
        }
    }

    fn count_passive_failure(&self, backend: BackendId) {
        if let Some(c) = self.stats.passive_failures.get(backend.index()) {
            c.add(1);
        }
    }

    /// Counts a failed send; one refused on a flow's connected socket (ICMP port or host
    /// unreachable) closes the flow so its next datagram is scheduled afresh.
    fn on_send_error(&mut self, h: FlowHandle, li: usize, e: &io::Error) -> DropReason {
        let connected = self
            .table
            .get(h)
            .is_some_and(|f| matches!(f.io.socket, UpstreamSocket::Own(_)) && f.io.connected);
        if connected && refused(e) {
            self.count_refused(h, li);
            let now = self.now();
            self.close_flow(h, CloseReason::Error, now);
        }
        DropReason::SendError
    }

    /// Reads the error queue of an unconnected upstream socket of listener `li` and counts
    /// each refusal (ICMP port, host or network unreachable) as a passive failure of the
    /// backend it was sent to. Returns the refused destinations.
    fn account_refusals(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        li: usize,
        snap: &Snapshot,
    ) -> Refusals {
        let mut found = Refusals::default();
        // Reading a socket's own error queue fails only with EAGAIN (handled: empty), so an
        // error leaves nothing to account for.
        let _ = udplb_sys::batch::read_errors(fd, Refusals::CAPACITY, |e| {
            if is_refusal(e.errno) {
                found.push(e.destination);
            }
        });
        let spec = &snap.listeners[li];
        for dest in found.iter() {
            self.stats.listeners[li].backend_refused.add(1);
            let backend = [Some(spec.pool), spec.abuse_pool]
                .into_iter()
                .flatten()
                .find_map(|pi| {
                    let pool = &snap.pools[pi];
                    pool.position(&dest).map(|i| pool.backends[i].id)
                });
            if let Some(id) = backend {
                self.count_passive_failure(id);
            }
        }
        found
    }

    /// Reads replies from flow `h`'s upstream socket (`recvmmsg`) and queues them on its
    /// listener's reply batch. Returns whether the socket was drained (false: the budget or the
    /// reply queue ran out; resume next turn).
    fn relay_replies(
        &mut self,
        snap: &Snapshot,
        h: FlowHandle,
        inbox: &mut RecvBatch,
        now: Time,
    ) -> bool {
        let Some(flow) = self.table.get(h) else {
            return true;
        };
        let li = flow.key.listener as usize;
        for _ in 0..REPLY_BATCHES_PER_FLOW_PER_TURN {
            if !self.reply_room(li, inbox.capacity()) {
                return false;
            }
            let Some(flow) = self.table.get(h) else {
                return true;
            };
            // Only a flow's own socket raises readiness under the flow's token.
            let UpstreamSocket::Own(socket) = &flow.io.socket else {
                return true;
            };
            match inbox.recv(socket.as_fd()) {
                Ok(n) => {
                    if self.queue_replies(snap, h, inbox, now) == Relayed::FlowCompleted {
                        return true;
                    }
                    // Fewer than asked for: the socket is empty (a later datagram raises a new
                    // edge), so no extra call just to see EAGAIN.
                    if n < inbox.capacity() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if refused(&e) && !flow.io.connected => {
                    // Datagram mode: one of the backends refused a datagram; the flow serves
                    // the others, and replies may still be queued behind the error.
                    let fd = socket.as_fd();
                    let _ = self.account_refusals(fd, li, snap);
                }
                Err(e) => {
                    if refused(&e) {
                        self.count_refused(h, li);
                    } else {
                        self.log.warn("upstream receive", &e);
                    }
                    self.close_flow(h, CloseReason::Error, now);
                    return true;
                }
            }
        }
        false
    }

    /// Whether listener `li`'s reply batch has room for `n` more replies, flushing it first
    /// if not (false: the send buffer is full; resume next turn).
    fn reply_room(&mut self, li: usize, n: usize) -> bool {
        let lio = &mut self.listeners[li];
        if lio.replies.room() < n {
            flush_replies(lio, &self.stats, li, &mut self.log);
        }
        lio.replies.room() >= n
    }

    /// Queues the replies in `inbox`, all from flow `h`'s own socket ([`Worker::queue_reply`]).
    fn queue_replies(
        &mut self,
        snap: &Snapshot,
        h: FlowHandle,
        inbox: &RecvBatch,
        now: Time,
    ) -> Relayed {
        for i in 0..inbox.len() {
            if self.queue_reply(snap, h, &inbox.get(i), now) == Relayed::FlowCompleted {
                // Replies after the last expected one are discarded, as late replies.
                let late = (inbox.len() - i - 1) as u64;
                if late > 0
                    && let Some(li) = self.table.get(h).map(|f| f.key.listener as usize)
                {
                    self.stats.listeners[li].late_replies.add(late);
                }
                return Relayed::FlowCompleted;
            }
        }
        Relayed::Queued
    }

    /// Reads replies from shared upstream socket `port` (`recvmmsg`) and queues each for the
    /// flow that owns (socket, its source). Returns whether the socket was drained (false: the
    /// budget or the reply queue ran out; resume next turn).
    fn relay_port_replies(
        &mut self,
        snap: &Snapshot,
        (li, v6, port): PortRef,
        inbox: &mut RecvBatch,
        now: Time,
    ) -> bool {
        if li >= self.listeners.len() {
            return true;
        }
        for _ in 0..REPLY_BATCHES_PER_PORT_PER_TURN {
            if !self.reply_room(li, inbox.capacity()) {
                return false;
            }
            let Some(socket) = self.listeners[li].shared.family(v6).socket(port) else {
                return true;
            };
            match inbox.recv(socket.as_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let reply = inbox.get(i);
                        let owner = self.listeners[li]
                            .shared
                            .family(v6)
                            .owner(port, reply.source);
                        match owner {
                            Some(h) => {
                                self.queue_reply(snap, h, &reply, now);
                            }
                            None => self.count_ownerless_reply(snap, li, reply.source),
                        }
                    }
                    if n < inbox.capacity() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if refused(&e) => {
                    // A backend refused a flow's datagram: that flow closes, so its next
                    // datagram is scheduled afresh (as with a socket of its own).
                    let refusals = self.account_refusals(socket.as_fd(), li, snap);
                    let now = self.now();
                    for dest in refusals.iter() {
                        let owner = self.listeners[li].shared.family(v6).owner(port, dest);
                        if let Some(h) = owner {
                            self.close_flow(h, CloseReason::Error, now);
                        }
                    }
                }
                Err(e) => {
                    self.log.warn("shared upstream receive", &e);
                    return true;
                }
            }
        }
        false
    }

    /// A datagram on a shared socket of listener `li` that no flow owns: a backend's late
    /// answer to a closed flow (counted as a late reply), or a stranger's (dropped as from an
    /// unknown source). Either way it is not relayed.
    fn count_ownerless_reply(&self, snap: &Snapshot, li: usize, source: SocketAddr) {
        let spec = &snap.listeners[li];
        let from_backend = [Some(spec.pool), spec.abuse_pool]
            .into_iter()
            .flatten()
            .any(|pi| snap.pools[pi].position(&source).is_some());
        let stats = &self.stats.listeners[li];
        if from_backend {
            stats.late_replies.add(1);
        } else {
            stats.drop(DropReason::UnknownSource);
        }
    }

    /// Checks `reply`, received for flow `h` (size; in datagram mode, that a backend of the pool
    /// sent it) and queues it for the flow's client, from the address the client sent to.
    fn queue_reply(
        &mut self,
        snap: &Snapshot,
        h: FlowHandle,
        reply: &RecvMeta<'_>,
        now: Time,
    ) -> Relayed {
        let Some(flow) = self.table.get(h) else {
            return Relayed::FlowCompleted;
        };
        // The reply's destination and source, not the whole key (which carries more).
        let (client, local, flow_backend) = (flow.key.client, flow.key.local, flow.backend);
        let li = flow.key.listener as usize;
        let spec = &snap.listeners[li];
        let Some(pi) = flow.io.pool(spec) else {
            return Relayed::Queued;
        };
        let pool = &snap.pools[pi];
        let counted = matches!(spec.mode, SessionMode::RequestResponse { .. });
        if counted {
            self.sample_reply_latency(h, flow_backend);
        }
        let stats = &self.stats.listeners[li];
        stats.replies_in.add(1);
        // Datagram mode: the reply's source says which backend answered (and must be one).
        let backend = if spec.mode == SessionMode::Datagram {
            match pool.position(&reply.source) {
                Some(i) => pool.backends[i].id,
                None => {
                    stats.drop(DropReason::UnknownSource);
                    return Relayed::Queued;
                }
            }
        } else {
            flow_backend
        };
        if let Some(b) = self.stats.backends.get(backend.index()) {
            b.replies.add(1);
            b.bytes_replied.add(reply.data.len() as u64);
        }
        if reply.truncated || reply.data.len() > spec.max_datagram_size {
            stats.drop(DropReason::ReplyOversize);
            return Relayed::Queued;
        }
        let Some(payload) = strip_proxy_header(pool, reply.data) else {
            stats.drop(DropReason::ProxyHeader);
            return Relayed::Queued;
        };
        if let Some(ratio) = spec.limits.as_ref().and_then(|l| l.reply_ratio())
            && !self.within_reply_budget(h, payload.len(), ratio)
        {
            self.stats.listeners[li].drop(DropReason::Amplification);
            return Relayed::Queued;
        }
        if pool.proxy_header == ProxyHeader::First
            && let Some(flow) = self.table.get_mut(h)
        {
            // The backend answered: it has the flow's header.
            flow.io.header_acked = true;
        }
        self.listeners[li]
            .replies
            .push(payload, client, local);
        self.stats.listeners[li].bytes_out.add(payload.len() as u64);
        if self.table.on_reply(h, now, counted) == ReplyOutcome::ForwardAndComplete {
            self.close_flow(h, CloseReason::Completed, now);
            return Relayed::FlowCompleted;
        }
        Relayed::Queued
    }

    /// Anti-amplification: whether flow `h` may send `len` more reply bytes, and if so counts
    /// them.
    fn within_reply_budget(&mut self, h: FlowHandle, len: usize, ratio: u32) -> bool {
        let Some(flow) = self.table.get_mut(h) else {
            return false;
        };
        let io = &mut flow.io;
        if !udplb_core::ratelimit::reply_fits(
            u64::from(io.requested),
            u64::from(io.replied),
            len,
            ratio,
        ) {
            return false;
        }
        io.replied = io
            .replied
            .saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
        true
    }

    /// The first reply of a request-response exchange: records the time since its request.
    fn sample_reply_latency(&mut self, h: FlowHandle, backend: BackendId) {
        let Some(sent) = self
            .table
            .get_mut(h)
            .and_then(|f| f.io.request_sent_us.take())
        else {
            return;
        };
        let elapsed = self.micros().saturating_sub(sent);
        if let Some(b) = self.stats.backends.get(backend.index()) {
            b.record_reply_latency(elapsed);
        }
    }

    fn flush_all_replies(&mut self) {
        for (li, lio) in self.listeners.iter_mut().enumerate() {
            if !lio.replies.is_empty() {
                flush_replies(lio, &self.stats, li, &mut self.log);
            }
        }
    }

    /// The one path by which a flow ends: counters, affinity, and its socket closed (closing
    /// the descriptor also removes it from epoll), or kept as a spare when the flow completed.
    /// A socket or shared pair serves another flow only after the flow's reply timeout
    /// (quarantine): a backend's late answer to this flow then reaches no other client.
    fn close_flow(&mut self, h: FlowHandle, reason: CloseReason, now: Time) {
        if let Some(flow) = self.table.close(h, reason) {
            self.on_closed(&flow.key, flow.io.client(&flow.key), reason, now);
            let ready = now.after(flow.reply_timeout);
            let owner = owner_of(&flow.key);
            match flow.io.socket {
                UpstreamSocket::Own(socket) => {
                    if reason == CloseReason::Completed && flow.io.reusable {
                        // The epoll registration stays, under a token no live flow has.
                        drop(self.spares.park(flow.backend_addr, owner, socket, ready));
                    }
                }
                UpstreamSocket::Shared(port) => {
                    self.release_port(&flow.key, port, flow.backend_addr, ready);
                }
            }
        }
    }

    /// Gives back the (shared socket, backend) pair of the closed flow `key`, to serve another
    /// client from `ready` on.
    fn release_port(&mut self, key: &FlowKey, port: Port, backend: SocketAddr, ready: Time) {
        if let Some(lio) = self.listeners.get_mut(key.listener as usize) {
            lio.shared
                .family_mut(backend.is_ipv6())
                .release(port, backend, owner_of(key), ready);
        }
    }

    fn on_closed(&mut self, key: &FlowKey, client: SocketAddr, reason: CloseReason, now: Time) {
        let li = key.listener as usize;
        self.stats.listeners[li].flows_closed[reason.index()].add(1);
        if let (Some(origin), Some(lio)) = (key.origin, self.listeners.get_mut(li))
            && lio.senders.get(&key.client) == Some(&origin)
        {
            lio.senders.remove(&key.client);
        }
        if let Some(sticky) = &self.sticky[li] {
            sticky
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(client.ip(), now);
        }
    }

    fn expire_idle(&mut self, now: Time) {
        self.spares.expire(now);
        let mut closed: Vec<(FlowKey, SocketAddr)> = Vec::new();
        let mut ports: Vec<(FlowKey, Port, SocketAddr, Time)> = Vec::new();
        let mut unanswered: Vec<(u16, BackendId)> = Vec::new();
        self.table.expire(now, |expired| match expired {
            Expired::Unanswered(_, flow) => unanswered.push((flow.key.listener, flow.backend)),
            Expired::Idle(_, flow) => {
                if flow.pending_replies > 0 && flow.reply_due.is_some() {
                    // Closed before its reply deadline (reply_timeout above idle_timeout).
                    unanswered.push((flow.key.listener, flow.backend));
                }
                if let UpstreamSocket::Shared(port) = flow.io.socket {
                    let ready = now.after(flow.reply_timeout);
                    ports.push((flow.key, port, flow.backend_addr, ready));
                }
                closed.push((flow.key, flow.io.client(&flow.key)));
            }
        });
        for (key, port, backend, ready) in ports {
            self.release_port(&key, port, backend, ready);
        }
        for (listener, backend) in unanswered {
            // The backend left a request unanswered: a passive failure signal.
            self.stats.listeners[listener as usize]
                .reply_timeouts
                .add(1);
            self.count_passive_failure(backend);
        }
        for (key, client) in &closed {
            self.on_closed(key, *client, CloseReason::Idle, now);
        }
        if !closed.is_empty() {
            for sticky in self.sticky.iter().flatten() {
                sticky.lock().unwrap_or_else(|p| p.into_inner()).expire(now);
            }
        }
    }

    /// Copies each listener socket's kernel drop count into its counter, every
    /// [`KERNEL_DROPS_REFRESH`] (one `getsockopt` per socket, whether datagrams arrive or not).
    fn refresh_kernel_drops(&mut self, now: Time) {
        if now.since(self.drops_read) < KERNEL_DROPS_REFRESH {
            return;
        }
        self.drops_read = now;
        for (lio, stats) in self.listeners.iter().zip(&self.stats.listeners) {
            if let Ok(drops) = udplb_sys::socket::receive_drops(&lio.socket) {
                stats.kernel_drops.set(u64::from(drops));
            }
        }
    }

    fn publish_gauges(&self) {
        for (li, stats) in self.stats.listeners.iter().enumerate() {
            stats
                .flows_live
                .set(u64::from(self.table.live_of(li as u16)));
            stats
                .shared_sockets
                .set(self.listeners[li].shared.len() as u64);
        }
    }

    fn shutdown(mut self) {
        self.flush_all_replies();
        let now = self.now();
        let mut closed = Vec::new();
        self.table.drain_all(CloseReason::Shutdown, |_, flow| {
            closed.push((flow.key, flow.io.client(&flow.key)))
        });
        for (key, client) in &closed {
            self.on_closed(key, *client, CloseReason::Shutdown, now);
        }
        self.publish_gauges();
        tracing::debug!(worker = self.id, "worker stopped");
    }
}

/// Sends a listener's queued replies and counts the outcome.
fn flush_replies(lio: &mut ListenerIo, stats: &WorkerStats, li: usize, log: &mut RateLimitedLog) {
    let outcome = lio.replies.flush(lio.socket.as_fd());
    let s = &stats.listeners[li];
    s.replies_out.add(outcome.sent as u64);
    if outcome.failed > 0 {
        s.drops[DropReason::ReplySendError.index()].add(outcome.failed as u64);
    }
    if outcome.blocked {
        // The socket's send buffer is full: drop what is queued rather than stall the loop.
        s.drops[DropReason::ReplySendError.index()].add(lio.replies.len() as u64);
        lio.replies.clear();
    }
    if let Some(e) = outcome.last_error {
        log.warn("sending replies", &e);
    }
}

/// Whether GRO trains received on listener `spec` are forwarded whole: in flow mode, where a
/// train's datagrams share one flow and one backend, and when nothing is decided or written
/// per datagram (rate limits, PROXY headers in either direction). Otherwise they are taken
/// apart and forwarded one by one.
#[inline]
fn passes_trains(spec: &ListenerSpec, snap: &Snapshot) -> bool {
    let plain = |pool: usize| snap.pools[pool].proxy_header == ProxyHeader::Off;
    spec.mode == SessionMode::Flow
        && spec.limits.is_none()
        && !spec.proxy_ingress
        && plain(spec.pool)
        && spec.abuse_pool.is_none_or(plain)
}

/// Sends a GRO train on a connected socket as one GSO train, or datagram by datagram when
/// the path refuses segmentation offload (`EINVAL`, `EIO`, `EMSGSIZE`: e.g. a segment larger
/// than the route's MTU allows). Returns the bytes sent.
fn send_train(
    fd: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    size: u16,
    dest: Option<SocketAddr>,
) -> io::Result<usize> {
    if let Some(dest) = dest {
        // An unconnected (shared) socket: `gro` and `shared_upstream` do not go together, so
        // this is not the fast path; datagram by datagram.
        let mut sent = 0;
        for datagram in data.chunks(usize::from(size)) {
            sent += udplb_sys::batch::send_to(fd, datagram, dest)?;
        }
        return Ok(sent);
    }
    match udplb_sys::batch::send_segments(fd, data, size) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EIO | libc::EMSGSIZE)
            ) =>
        {
            let mut sent = 0;
            for datagram in data.chunks(usize::from(size)) {
                sent += udplb_sys::batch::send(fd, datagram)?;
            }
            Ok(sent)
        }
        other => other,
    }
}

/// Sends `head` (a PROXY header, or empty) and `data` as one datagram, or `data` as a GRO train
/// of `segment_size` segments, to `dest` (`None`: the connected peer).
#[inline]
fn send_datagram(
    fd: std::os::fd::BorrowedFd<'_>,
    head: &[u8],
    data: &[u8],
    segment_size: Option<u16>,
    dest: Option<SocketAddr>,
) -> io::Result<usize> {
    if !head.is_empty() {
        udplb_sys::batch::send_two(fd, head, data, dest)
    } else if let Some(size) = segment_size {
        send_train(fd, data, size, dest)
    } else if let Some(dest) = dest {
        udplb_sys::batch::send_to(fd, data, dest)
    } else {
        udplb_sys::batch::send(fd, data)
    }
}

/// Who flow `key` serves, for handing its socket back to the same client.
#[inline]
fn owner_of(key: &FlowKey) -> Owner {
    (key.client, key.origin)
}

/// Turns on error reporting for an unconnected upstream socket.
fn reporting_errors(socket: UdpSocket) -> io::Result<UdpSocket> {
    udplb_sys::socket::report_errors(&socket)?;
    Ok(socket)
}

/// Whether an `errno` says a backend (or the way to it) refused a datagram: ICMP port, host
/// or network unreachable.
fn is_refusal(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN
    )
}

/// Whether a failed send or receive on an upstream socket is a refusal ([`is_refusal`]).
fn refused(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(is_refusal)
}

/// The destinations an upstream socket's error queue reported refused, read in one go.
#[derive(Default)]
struct Refusals {
    addrs: [Option<SocketAddr>; Refusals::CAPACITY],
    len: usize,
}

impl Refusals {
    /// Errors read from one socket's queue per call (a later call reads the rest).
    const CAPACITY: usize = 16;

    fn push(&mut self, addr: SocketAddr) {
        if let Some(slot) = self.addrs.get_mut(self.len) {
            *slot = Some(addr);
            self.len += 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addrs[..self.len].iter().flatten().copied()
    }
}

/// Whether the listener serves `client` now: its access lists, then its datagram rate
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

/// Writes the PROXY v2 header for `flow` on a listener bound to `bound` into `out`: the
/// client's address and the address it sent to (those of the header the flow arrived with,
/// behind another balancer). Returns its length.
fn write_proxy_header(
    out: &mut [u8; udplb_core::proxy::MAX_HEADER_V6],
    bound: SocketAddr,
    flow: &udplb_core::flow::Flow<Upstream>,
) -> usize {
    let (client, target) = match &flow.io.origin {
        Some(o) => (o.client, o.target),
        None => (
            flow.key.client,
            SocketAddr::new(flow.key.local.unwrap_or(bound.ip()), bound.port()),
        ),
    };
    udplb_core::proxy::encode(out, client, target).expect("the buffer holds the largest header")
}

/// A backend reply without its PROXY v2 header when the pool strips them (`None`: the header
/// is malformed). Replies without a header pass unchanged.
#[inline]
fn strip_proxy_header<'a>(pool: &Pool, reply: &'a [u8]) -> Option<&'a [u8]> {
    if !pool.strip_reply_proxy || !udplb_core::proxy::has_signature(reply) {
        return Some(reply);
    }
    let header = udplb_core::proxy::parse(reply).ok()?;
    Some(&reply[header.len..])
}

/// The descriptor number above which flows are shed: the soft `RLIMIT_NOFILE` less `reserve`
/// for the admin endpoint and health checks.
fn fd_ceiling(reserve: u64) -> i64 {
    let limit =
        udplb_sys::socket::nofile_limit().map_or(i64::MAX, |l| l.min(i64::MAX as u64) as i64);
    limit.saturating_sub(reserve.min(i64::MAX as u64) as i64)
}

/// A per-worker seed for the scheduler's random numbers (not security-relevant).
fn seed(id: usize) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(id) | 1
}

/// Logs a warning at most once per [`LOG_INTERVAL`] per kind, with the count of suppressed ones.
#[derive(Default)]
struct RateLimitedLog {
    last: Vec<(&'static str, Instant, u64)>,
}

impl RateLimitedLog {
    fn warn(&mut self, what: &'static str, e: &io::Error) {
        let now = Instant::now();
        match self.last.iter_mut().find(|(w, _, _)| *w == what) {
            Some((_, at, suppressed)) if now.duration_since(*at) < LOG_INTERVAL => *suppressed += 1,
            Some((_, at, suppressed)) => {
                tracing::warn!(error = %e, suppressed = *suppressed, "{what}");
                *at = now;
                *suppressed = 0;
            }
            None => {
                tracing::warn!(error = %e, "{what}");
                self.last.push((what, now, 0));
            }
        }
    }
}
