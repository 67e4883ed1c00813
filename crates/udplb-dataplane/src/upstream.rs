//! Upstream sockets: the sockets a worker sends to backends on, and the pools they are kept in.
//!
//! Owns: each flow's I/O part ([`Io`]: its own socket or its share of a shared one), the spare
//! sockets of completed request-response flows ([`crate::spare::Spares`]), each listener's
//! shared sockets ([`crate::ports::PortPool`], per address family), the descriptor ceiling above
//! which no socket is kept, and reading the error queue of unconnected sockets
//! ([`account_refusals`]).
//! Must not: decide anything about a datagram (the engine does: which socket kind a flow gets,
//! when a socket may serve another client, whom a refusal is charged to).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use udplb_core::DropReason;
use udplb_core::Time;
use udplb_core::engine::{Engine, Open, SocketKind};
use udplb_core::flow::{FlowHandle, FlowKey};
use udplb_core::snapshot::Snapshot;

use crate::log::RateLimitedLog;
use crate::ports::{Port, PortPool};
use crate::spare::{Owner, Spares};
use crate::stats::WorkerStats;

/// Buffer size asked for shared upstream sockets (each carries the replies of one flow per
/// backend).
const SHARED_SOCKET_BUFFER: usize = 1 << 20;
/// Datagrams a spare socket may hold when it is taken: more means a backend keeps answering
/// a finished exchange, and the socket is closed rather than emptied.
const SPARE_DISCARD_LIMIT: usize = 16;

/// Where a flow's datagrams to its backend go out.
#[derive(Debug)]
pub(crate) enum UpstreamSocket {
    /// A socket of its own (connected to the backend, except in datagram mode).
    Own(UdpSocket),
    /// The listener's shared socket with this port index (of the backend's address family),
    /// which carries no other flow to this backend.
    Shared(Port),
}

/// The I/O half of a flow.
#[derive(Debug)]
pub(crate) struct Io {
    pub socket: UpstreamSocket,
    /// Request-response mode: when the flow's first request was sent (µs since the worker's
    /// epoch), until its first reply turns it into a latency sample.
    pub request_sent_us: Option<u64>,
}

/// Who a flow serves, for handing its socket back to the same client.
#[inline]
pub(crate) fn owner_of(key: &FlowKey) -> Owner {
    (key.client, key.origin)
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
}

/// A worker's upstream sockets beyond those its flows hold: spares and shared sockets.
pub(crate) struct Upstreams {
    spares: Spares<UdpSocket>,
    /// Per listener.
    shared: Vec<SharedPorts>,
    /// Sockets with a descriptor number at or above this are closed at once and the flow
    /// shed: the spare descriptors belong to the control plane.
    fd_ceiling: i64,
}

impl Upstreams {
    /// The pools of a worker with `listeners` listeners, keeping `reserve` descriptors free.
    pub(crate) fn new(listeners: usize, reserve: u64) -> Upstreams {
        Upstreams {
            spares: Spares::new(),
            shared: (0..listeners)
                .map(|_| SharedPorts {
                    v4: PortPool::new(),
                    v6: PortPool::new(),
                })
                .collect(),
            fd_ceiling: fd_ceiling(reserve),
        }
    }

    /// The socket of the flow `open` describes: a spare of the same backend (counted as reused,
    /// its queue counted as late replies), a pair of the listener's shared sockets (whose token
    /// `token` makes), or a new socket. Returns it with whether it was a spare.
    pub(crate) fn for_flow(
        &mut self,
        open: &Open,
        now: Time,
        registry: &Registry,
        token: impl Fn(bool, Port) -> Token,
        stats: &WorkerStats,
        log: &mut RateLimitedLog,
    ) -> Result<(UpstreamSocket, bool), DropReason> {
        let li = usize::from(open.key.listener);
        let owner = owner_of(&open.key);
        if open.reusable
            && let Some(s) = self.take_spare(open.to, owner, now, stats, li, log)
        {
            return Ok((UpstreamSocket::Own(s), true));
        }
        if open.kind == SocketKind::Shared {
            let port = self.reserve_port(li, open.to, owner, now, registry, token, log)?;
            return Ok((UpstreamSocket::Shared(port), false));
        }
        let connect = open.kind == SocketKind::Connected;
        let opened = if open.transparent {
            udplb_sys::socket::transparent_upstream_socket(open.to, open.client, connect)
        } else {
            udplb_sys::socket::upstream_socket(open.to, connect, None, None)
        };
        // An unconnected socket hears of refusals only through its error queue.
        let opened = if connect {
            opened
        } else {
            opened.and_then(reporting_errors)
        };
        let socket = self.below_fd_ceiling(opened, log)?;
        Ok((UpstreamSocket::Own(socket), false))
    }

    /// The oldest spare socket connected to `backend` that `owner` may take at `now`, emptied
    /// of what it received while parked (counted as late replies on listener `li`). A spare
    /// that cannot be emptied is closed and the next one tried.
    fn take_spare(
        &mut self,
        backend: SocketAddr,
        owner: Owner,
        now: Time,
        stats: &WorkerStats,
        li: usize,
        log: &mut RateLimitedLog,
    ) -> Option<UdpSocket> {
        while let Some(socket) = self.spares.take(backend, owner, now) {
            match udplb_sys::socket::discard_queued(&socket, SPARE_DISCARD_LIMIT) {
                Ok(Some(late)) => {
                    stats.listeners[li].late_replies.add(late as u64);
                    return Some(socket);
                }
                Ok(None) => {
                    let late = SPARE_DISCARD_LIMIT as u64;
                    stats.listeners[li].late_replies.add(late);
                }
                Err(e) => log.warn("emptying a spare upstream socket", &e),
            }
        }
        None
    }

    /// A (shared socket, `backend`) pair of listener `li` for a flow of `owner`: one it gave
    /// back itself, a free one out of quarantine, else on a newly opened socket (registered
    /// under `token`). No socket opens: the flow is shed rather than given a pair still in
    /// quarantine (a late answer to that pair's last flow would reach this client).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reserve_port(
        &mut self,
        li: usize,
        backend: SocketAddr,
        owner: Owner,
        now: Time,
        registry: &Registry,
        token: impl Fn(bool, Port) -> Token,
        log: &mut RateLimitedLog,
    ) -> Result<Port, DropReason> {
        let v6 = backend.is_ipv6();
        if let Some(port) = self.shared[li].family_mut(v6).reserve(backend, owner, now) {
            return Ok(port);
        }
        self.open_shared(li, backend, registry, token, log)?;
        self.shared[li]
            .family_mut(v6)
            .reserve(backend, owner, now)
            .ok_or(DropReason::UpstreamSocket)
    }

    /// Opens one more shared upstream socket for listener `li`, of `backend`'s family, and
    /// registers it for readiness.
    fn open_shared(
        &mut self,
        li: usize,
        backend: SocketAddr,
        registry: &Registry,
        token: impl Fn(bool, Port) -> Token,
        log: &mut RateLimitedLog,
    ) -> Result<(), DropReason> {
        let v6 = backend.is_ipv6();
        let pool = self.shared[li].family(v6);
        if pool.len() >= crate::ports::MAX_SOCKETS {
            return Err(DropReason::UpstreamSocket);
        }
        let next = pool.next_port();
        let opened =
            udplb_sys::socket::upstream_socket(backend, false, None, Some(SHARED_SOCKET_BUFFER))
                .and_then(reporting_errors);
        let socket = self.below_fd_ceiling(opened, log)?;
        let fd = socket.as_raw_fd();
        if let Err(e) = registry.register(&mut SourceFd(&fd), token(v6, next), Interest::READABLE) {
            log.warn("registering an upstream socket (new flows are shed)", &e);
            return Err(DropReason::UpstreamSocket);
        }
        // Cannot be full: checked above.
        let _ = self.shared[li].family_mut(v6).add(socket);
        Ok(())
    }

    /// The socket just opened (or why not), refused when its descriptor number says the
    /// descriptors are nearly exhausted.
    fn below_fd_ceiling(
        &self,
        opened: io::Result<UdpSocket>,
        log: &mut RateLimitedLog,
    ) -> Result<UdpSocket, DropReason> {
        let socket = match opened {
            Ok(s) => s,
            Err(e) => {
                log.warn("opening an upstream socket (new flows are shed)", &e);
                return Err(DropReason::UpstreamSocket);
            }
        };
        if i64::from(socket.as_raw_fd()) >= self.fd_ceiling {
            // Descriptors are allocated lowest first, so a number this high means the spare
            // ones are nearly gone: keep them for the admin endpoint and health checks.
            drop(socket);
            log.warn(
                "opening an upstream socket (new flows are shed)",
                &io::Error::other("descriptors are nearly exhausted (RLIMIT_NOFILE)"),
            );
            return Err(DropReason::UpstreamSocket);
        }
        Ok(socket)
    }

    /// Records that flow `h` owns the pair (`port`, `backend`) of listener `li`.
    pub(crate) fn assign(&mut self, li: usize, port: Port, backend: SocketAddr, h: FlowHandle) {
        self.shared[li]
            .family_mut(backend.is_ipv6())
            .assign(port, backend, h);
    }

    /// Gives back the pair (`port`, `backend`) of listener `li`, which served `owner`, to
    /// serve another client from `ready` on.
    pub(crate) fn release(
        &mut self,
        li: usize,
        port: Port,
        backend: SocketAddr,
        owner: Owner,
        ready: Time,
    ) {
        if let Some(shared) = self.shared.get_mut(li) {
            shared
                .family_mut(backend.is_ipv6())
                .release(port, backend, owner, ready);
        }
    }

    /// Keeps a completed flow's socket, connected to `backend`, for the next flow to it
    /// (another client's from `ready` on); its readiness registration stays, under a token no
    /// live flow has. Closed when the pools are full.
    pub(crate) fn park(
        &mut self,
        backend: SocketAddr,
        owner: Owner,
        socket: UdpSocket,
        ready: Time,
    ) {
        drop(self.spares.park(backend, owner, socket, ready));
    }

    /// Listener `li`'s shared socket `port` of a family.
    #[inline]
    pub(crate) fn shared_socket(&self, li: usize, v6: bool, port: Port) -> Option<&UdpSocket> {
        self.shared.get(li)?.family(v6).socket(port)
    }

    /// The flow owning (`port`, `source`) on listener `li`'s shared sockets of a family.
    #[inline]
    pub(crate) fn owner(
        &self,
        li: usize,
        v6: bool,
        port: Port,
        source: SocketAddr,
    ) -> Option<FlowHandle> {
        self.shared.get(li)?.family(v6).owner(port, source)
    }

    /// Listener `li`'s shared sockets, both families.
    pub(crate) fn shared_len(&self, li: usize) -> usize {
        self.shared.get(li).map_or(0, |s| s.v4.len() + s.v6.len())
    }

    /// Closes spares unused for too long.
    pub(crate) fn expire(&mut self, now: Time) {
        self.spares.expire(now);
    }
}

/// The socket flow `io` sends on (listener `li`'s shared one, for a pair).
#[inline]
pub(crate) fn socket_of<'a>(
    io: &'a Io,
    upstreams: &'a Upstreams,
    li: usize,
    backend: SocketAddr,
) -> Option<BorrowedFd<'a>> {
    match &io.socket {
        UpstreamSocket::Own(s) => Some(s.as_fd()),
        UpstreamSocket::Shared(port) => upstreams
            .shared_socket(li, backend.is_ipv6(), *port)
            .map(|s| s.as_fd()),
    }
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
#[inline]
pub(crate) fn refused(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(is_refusal)
}

/// The destinations an upstream socket's error queue reported refused, read in one go.
#[derive(Default)]
pub(crate) struct Refusals {
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

    pub(crate) fn iter(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addrs[..self.len].iter().flatten().copied()
    }
}

/// Reads the error queue of an unconnected upstream socket of listener `li` and counts each
/// refusal (ICMP port, host or network unreachable) as a passive failure of the backend it was
/// sent to. Returns the refused destinations.
pub(crate) fn account_refusals(
    fd: BorrowedFd<'_>,
    li: usize,
    snap: &Snapshot,
    stats: &WorkerStats,
) -> Refusals {
    let mut found = Refusals::default();
    // Reading a socket's own error queue fails only with EAGAIN (handled: empty), so an
    // error leaves nothing to account for.
    let _ = udplb_sys::batch::read_errors(fd, Refusals::CAPACITY, |e| {
        if is_refusal(e.errno) {
            found.push(e.destination);
        }
    });
    for dest in found.iter() {
        stats.listeners[li].backend_refused.add(1);
        if let Some(id) = Engine::<Io>::refused_backend(snap, li, dest) {
            stats.passive_failure(id);
        }
    }
    found
}

/// The descriptor number above which flows are shed: the soft `RLIMIT_NOFILE` less `reserve`
/// for the admin endpoint and health checks.
fn fd_ceiling(reserve: u64) -> i64 {
    let limit =
        udplb_sys::socket::nofile_limit().map_or(i64::MAX, |l| l.min(i64::MAX as u64) as i64);
    limit.saturating_sub(reserve.min(i64::MAX as u64) as i64)
}
