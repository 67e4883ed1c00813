//! One worker: the I/O shell around an [`Engine`], an event loop over its listener sockets and
//! its flows' upstream sockets.
//!
//! Owns: the readiness poll and its tokens, the worker's listener sockets ([`ListenerIo`]), its
//! upstream sockets ([`Upstreams`]), the engine that decides for it, and the receive batches.
//!
//! A turn: wait for readiness (at most until the next flow deadline); load the snapshot if it
//! changed; forward client datagrams from each readable listener (`recvmmsg`, at most
//! [`LISTENER_BATCHES_PER_TURN`] batches so one busy listener cannot starve replies or timers:
//! [`forward`]); relay replies from each readable upstream socket into the listener's reply
//! batch ([`replies`]); send the reply batches (`sendmmsg`); expire idle flows. Work left over
//! by a budget is resumed next turn without sleeping.
//!
//! Must not: decide anything about a datagram (which backend, whether to drop it, whether a
//! flow ends: the engine does), allocate, lock or log per datagram. Errors on the data path are
//! counted as [`DropReason`](udplb_core::DropReason)s; logs are rate-limited.

mod forward;
mod replies;

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Cache};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use udplb_core::Time;
use udplb_core::engine::{Closed, Engine, Expiry, Handed, SHARED_LISTENERS};
use udplb_core::flow::FlowHandle;
use udplb_core::handover::Inherited;
use udplb_core::snapshot::Snapshot;
use udplb_core::sync::{Outbox, Synced};
use udplb_core::verdict::CloseReason;
use udplb_sys::batch::RecvBatch;

use crate::handover::HandedFlow;
use crate::listener::ListenerIo;
use crate::log::RateLimitedLog;
use crate::ports::Port;
use crate::stats::{KERNEL_DROPS_REFRESH, WorkerStats};
use crate::upstream::{Io, UpstreamSocket, Upstreams, owner_of};

/// Datagrams per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Receive batches per listener per turn.
const LISTENER_BATCHES_PER_TURN: usize = 8;
/// Replies read from an upstream socket with one `recvmmsg`.
const REPLY_BATCH: usize = 16;
/// Receive buffer size on listeners with `gro`: a GRO train is at most 64 KiB.
const GRO_BUFFER: usize = 65_536;
/// Longest sleep when no timer is due (bounds how late a stop or snapshot is noticed).
const MAX_SLEEP: Duration = Duration::from_millis(250);

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

/// The readiness token of a flow's own upstream socket.
fn flow_token(h: FlowHandle) -> Token {
    Token(h.to_u64() as usize)
}

/// What a worker is built from.
pub(crate) struct WorkerSetup {
    pub id: usize,
    pub workers: usize,
    pub listeners: Vec<UdpSocket>,
    pub shared: Arc<ArcSwap<Snapshot>>,
    pub stats: Arc<WorkerStats>,
    pub stop: Arc<AtomicBool>,
    /// The data plane's clock origin, shared by every worker so that state they share (rate
    /// limiters) sees one time.
    pub epoch: Instant,
    /// Descriptors left to the control plane ([`crate::DataplaneOptions::descriptor_reserve`]).
    pub descriptor_reserve: u64,
    /// Whether to read the listener sockets (off once they are handed to another process).
    pub listening: Arc<crate::handover::Shared>,
    /// Where a previous process's flows went.
    pub inherited: Option<Arc<Inherited>>,
    /// The flows of this worker's sockets a previous process handed over with their sockets.
    pub adopted: Vec<HandedFlow>,
    /// Flow-state sync: what the peers said and this worker's outbox to them.
    pub sync: Option<(Arc<Synced>, Arc<Outbox>)>,
}

/// A worker thread's state.
pub(crate) struct Worker {
    id: usize,
    poll: Poll,
    waker: Arc<Waker>,
    listeners: Vec<ListenerIo>,
    engine: Engine<Io>,
    upstreams: Upstreams,
    /// The published snapshot, checked once per turn (a relaxed load and a pointer compare).
    published: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
    /// The snapshot this worker applied.
    snap: Arc<Snapshot>,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
    /// When the listener sockets' kernel drop counters were last read.
    drops_read: Time,
    /// Scratch space for the PROXY v2 header of the datagram being sent.
    header: [u8; udplb_core::proxy::MAX_HEADER_V6],
    log: RateLimitedLog,
    listening: Arc<crate::handover::Shared>,
    /// The listener sockets are registered for reading.
    reading: bool,
    /// Handed-over flows to continue once running.
    adopted: Vec<HandedFlow>,
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
            listeners.push(ListenerIo::new(socket, &snap.listeners[i], BATCH)?);
        }
        let mut engine = Engine::new(setup.workers, seed(setup.id));
        engine.apply(&snap);
        if let Some(table) = setup.inherited {
            // Handed-over flows idle out in the old process after the listener's idle timeout:
            // a client silent for longer starts afresh there too. (Time 0 is this start.)
            let longest = snap.listeners.iter().map(|l| l.idle_timeout).max();
            let until = Time(longest.unwrap_or_default().as_millis() as u64);
            engine.inherit(table, until);
        }
        if let Some((synced, outbox)) = setup.sync {
            engine.share(synced, outbox);
        }
        Ok(Worker {
            id: setup.id,
            poll,
            waker,
            upstreams: Upstreams::new(listeners.len(), setup.descriptor_reserve),
            listeners,
            engine,
            published: Cache::new(setup.shared),
            snap,
            stats: setup.stats,
            stop: setup.stop,
            epoch: setup.epoch,
            drops_read: Time(0),
            header: [0; udplb_core::proxy::MAX_HEADER_V6],
            log: RateLimitedLog::default(),
            listening: setup.listening,
            reading: true,
            adopted: setup.adopted,
        })
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    // Out of line: scripts/instructions.sh counts from its entry.
    #[inline(never)]
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
        let adopted = std::mem::take(&mut self.adopted);
        if !adopted.is_empty() {
            let (n, of) = (self.adopt(adopted, now), self.engine.table().live());
            tracing::debug!(
                worker = self.id,
                adopted = n,
                live = of,
                "handed-over flows"
            );
        }
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
            // After the readiness events: stopped, a listener must stay unread this turn.
            if self.listening.reading() != self.reading {
                self.switch_reading();
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
            self.expire(now);
            self.publish_gauges();
            self.refresh_slow_gauges(now);
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
        match self.engine.next_deadline() {
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
            self.engine.apply(&self.snap);
        }
    }

    /// Stops or resumes reading the listener sockets as the switch says. Stopped: their
    /// readiness no longer wakes this worker (replies still go out through them), and the
    /// switch hears where this worker's flows go.
    #[inline(never)]
    fn switch_reading(&mut self) {
        self.reading = !self.reading;
        let now = self.now();
        for (i, lio) in self.listeners.iter_mut().enumerate() {
            let fd = lio.socket.as_raw_fd();
            let registry = self.poll.registry();
            let done = if self.reading {
                registry.register(&mut SourceFd(&fd), listener_token(i), Interest::READABLE)
            } else {
                registry.deregister(&mut SourceFd(&fd))
            };
            if let Err(e) = done {
                self.log.warn("listener readiness", &e);
            }
            // Resumed: read at once whatever queued meanwhile.
            lio.readable = self.reading;
        }
        if self.reading {
            let returned = self.listening.take_returned(self.id);
            self.adopt(returned, now);
        } else {
            let flows = self.hand_over(now);
            self.listening.stopped(flows, self.engine.placements());
        }
        tracing::debug!(worker = self.id, reading = self.reading, "listener sockets");
    }

    /// Closes the flows the engine hands over and gives up their sockets (no longer read here:
    /// whatever arrives on them waits for the next process).
    fn hand_over(&mut self, now: Time) -> Vec<HandedFlow> {
        let mut handed = Vec::new();
        self.engine.hand_over(now, |h| handed.push(h));
        let mut flows = Vec::with_capacity(handed.len());
        for h in handed {
            let li = usize::from(h.key.listener);
            self.stats.listeners[li].flows_closed[CloseReason::Shutdown.index()].add(1);
            let UpstreamSocket::Own(socket) = h.io.socket else {
                continue;
            };
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&socket.as_raw_fd()));
            flows.push(HandedFlow {
                worker: self.id,
                key: h.key,
                backend: h.backend,
                requested: h.requested,
                replied: h.replied,
                socket,
            });
        }
        flows
    }

    /// Continues `flows` (handed over with their sockets) as flows of this worker, where the
    /// engine says it can; the others' sockets are closed (their clients' next datagrams open
    /// flows anew). Returns how many it continued.
    fn adopt(&mut self, flows: Vec<HandedFlow>, now: Time) -> usize {
        let mut adopted = 0;
        for f in flows {
            let bare = Handed {
                key: f.key,
                backend: f.backend,
                requested: f.requested,
                replied: f.replied,
                io: (),
            };
            // A socket must be the flow's own: connected to its backend.
            if f.socket.peer_addr().ok() != Some(f.backend) {
                tracing::warn!(
                    worker = self.id,
                    client = %f.key.client,
                    backend = %f.backend,
                    peer = ?f.socket.peer_addr().ok(),
                    "a handed-over flow's socket is not connected to its backend: not continued"
                );
                continue;
            }
            let Some(open) = self.engine.adoption(&self.snap, &bare) else {
                continue;
            };
            let fd = f.socket.as_raw_fd();
            let io = Io {
                socket: UpstreamSocket::Own(f.socket),
                request_sent_us: None,
            };
            let flow = self.engine.opened(&open, io, now).flow;
            self.engine.resume_counts(flow, f.requested, f.replied);
            if self.register_own(flow, fd, false, now).is_ok() {
                adopted += 1;
            }
        }
        adopted
    }

    fn flush_all_replies(&mut self) {
        for (lio, stats) in self.listeners.iter_mut().zip(&self.stats.listeners) {
            lio.flush(stats, &mut self.log);
        }
    }

    /// The one way a flow ends: the engine closes it, and its socket is released.
    // Off the per-datagram path: kept out of line so the hot path's frame stays small.
    #[inline(never)]
    fn close_flow(&mut self, h: FlowHandle, reason: CloseReason, now: Time) {
        if let Some(closed) = self.engine.close(h, reason, now) {
            self.release(closed);
        }
    }

    /// Counts a closed flow and releases its socket: closed (closing the descriptor also
    /// removes it from epoll), kept as a spare when the engine says it may serve another flow,
    /// or its shared pair given back. Either serves another client only from the engine's
    /// quarantine end on.
    #[inline]
    fn release(&mut self, closed: Closed<Io>) {
        let li = usize::from(closed.key.listener);
        self.stats.listeners[li].flows_closed[closed.reason.index()].add(1);
        let owner = owner_of(&closed.key);
        match closed.io.socket {
            UpstreamSocket::Own(socket) => {
                if closed.reusable {
                    let ready = closed.quarantine_end;
                    self.upstreams
                        .park(closed.backend_addr, owner, socket, ready);
                }
            }
            UpstreamSocket::Shared(port) => {
                let ready = closed.quarantine_end;
                self.upstreams
                    .release(li, port, closed.backend_addr, owner, ready);
            }
        }
    }

    /// Handles the deadlines due at `now`: unanswered requests (a passive failure signal of
    /// the backend) and idle flows; closes spares unused for too long.
    fn expire(&mut self, now: Time) {
        self.upstreams.expire(now);
        let stats = &self.stats;
        let mut closed = Vec::new();
        self.engine.expire(now, |e| match e {
            Expiry::Unanswered { listener, backend } => {
                stats.listeners[usize::from(listener)].reply_timeouts.add(1);
                stats.passive_failure(backend);
            }
            Expiry::Closed(c) => closed.push(c),
        });
        for c in closed {
            self.release(c);
        }
    }

    /// Every [`KERNEL_DROPS_REFRESH`]: copies each listener socket's kernel drop count into its
    /// counter (one `getsockopt` per socket, whether datagrams arrive or not), and each
    /// backend's live flows on this worker into its gauge.
    fn refresh_slow_gauges(&mut self, now: Time) {
        if now.since(self.drops_read) < KERNEL_DROPS_REFRESH {
            return;
        }
        self.drops_read = now;
        for (lio, stats) in self.listeners.iter().zip(&self.stats.listeners) {
            lio.read_kernel_drops(stats);
        }
        self.publish_backend_flows();
    }

    fn publish_backend_flows(&self) {
        let load = self.engine.table().load();
        for (id, b) in self.stats.backends.iter().enumerate() {
            b.flows.set(u64::from(load.get(id).copied().unwrap_or(0)));
        }
    }

    fn publish_gauges(&self) {
        for (li, stats) in self.stats.listeners.iter().enumerate() {
            stats
                .flows_live
                .set(u64::from(self.engine.live_of(li as u16)));
            stats
                .shared_sockets
                .set(self.upstreams.shared_len(li) as u64);
        }
    }

    fn shutdown(mut self) {
        self.flush_all_replies();
        let now = self.now();
        let mut closed = Vec::new();
        self.engine.drain_all(now, |c| closed.push(c));
        for c in closed {
            self.release(c);
        }
        self.publish_gauges();
        self.publish_backend_flows();
        tracing::debug!(worker = self.id, "worker stopped");
    }
}

/// A per-worker seed for the scheduler's random numbers (not security-relevant).
fn seed(id: usize) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(id) | 1
}
