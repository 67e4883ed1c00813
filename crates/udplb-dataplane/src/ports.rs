//! Upstream sockets shared by local port (`shared_upstream = true`): one socket carries one
//! flow per backend, instead of one socket per flow.
//!
//! Owns: a listener's unconnected upstream sockets of one address family (each bound to its
//! own ephemeral port), which (socket, backend) pairs are taken and by which flow, and the
//! released pairs in the order they were released.
//!
//! A backend tells flows apart by the balancer's source port, so two flows to one backend need
//! two sockets, while flows to different backends can share one: replies are told apart by
//! (socket, source address). A new flow takes a free pair, which costs no syscall once the
//! sockets exist; a socket is opened only when every existing one already carries a flow to the
//! chosen backend. Released pairs are handed out again to another client oldest first and
//! only once their quarantine is over (the listener's reply timeout), so that a backend's late
//! or duplicate answers to a closed flow arrive while no flow owns the pair (they are dropped
//! and counted, never relayed to another client); the same client takes its own pair back at
//! once. A quarantined pair is never handed out early to another client: when no socket can be
//! opened, the new flow is shed instead.
//!
//! Must not: do I/O. The worker opens, registers and reads the sockets; sockets stay open for
//! the worker's life (their number is the high-water mark of flows per backend).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use udplb_core::Time;
use udplb_core::flow::FlowHandle;

use crate::spare::Owner;

/// Released pairs searched for the new flow's own client, newest first.
const OWN_PAIR_SCAN: usize = 8;

/// Sockets per pool at most (the worker's epoll tokens leave room for this many).
pub(crate) const MAX_SOCKETS: usize = 1 << 20;

/// Index of a socket in its pool.
pub(crate) type Port = u32;

/// Per backend: the pairs it released, oldest first, with when each may serve again, and how
/// far into the socket list it has ever reached (sockets from `untouched` on never carried one
/// of its flows).
#[derive(Default)]
struct BackendPorts {
    released: VecDeque<(Time, Owner, Port)>,
    untouched: Port,
}

/// The shared upstream sockets of one listener and address family, and who owns which pair.
pub(crate) struct PortPool<S> {
    sockets: Vec<S>,
    owners: HashMap<(Port, SocketAddr), FlowHandle>,
    backends: HashMap<SocketAddr, BackendPorts>,
}

impl<S> PortPool<S> {
    pub(crate) fn new() -> PortPool<S> {
        PortPool {
            sockets: Vec::new(),
            owners: HashMap::new(),
            backends: HashMap::new(),
        }
    }

    /// A pair with `backend` for a new flow of `owner` at `now`, without opening a socket: one
    /// it released itself (among the newest few), a released pair past its quarantine, else a
    /// socket that never carried a flow to `backend`. `None`: open a socket
    /// ([`PortPool::add`]).
    pub(crate) fn reserve(&mut self, backend: SocketAddr, owner: Owner, now: Time) -> Option<Port> {
        let total = self.sockets.len() as Port;
        let b = self.backends.entry(backend).or_default();
        let own = (0..b.released.len())
            .rev()
            .take(OWN_PAIR_SCAN)
            .find(|&i| b.released[i].1 == owner);
        if let Some(i) = own {
            return b.released.remove(i).map(|(_, _, port)| port);
        }
        if let Some(&(ready, _, port)) = b.released.front()
            && ready <= now
        {
            b.released.pop_front();
            return Some(port);
        }
        if b.untouched < total {
            b.untouched += 1;
            return Some(b.untouched - 1);
        }
        None
    }

    /// Records that `flow` owns the reserved pair (`port`, `backend`).
    pub(crate) fn assign(&mut self, port: Port, backend: SocketAddr, flow: FlowHandle) {
        self.owners.insert((port, backend), flow);
    }

    /// Gives back the pair (`port`, `backend`), which served `owner`, to serve another client
    /// from `ready` on (the end of its quarantine).
    pub(crate) fn release(&mut self, port: Port, backend: SocketAddr, owner: Owner, ready: Time) {
        self.owners.remove(&(port, backend));
        self.backends
            .entry(backend)
            .or_default()
            .released
            .push_back((ready, owner, port));
    }

    /// The flow a datagram from `source` on socket `port` belongs to.
    #[inline]
    pub(crate) fn owner(&self, port: Port, source: SocketAddr) -> Option<FlowHandle> {
        self.owners.get(&(port, source)).copied()
    }

    /// Adds a newly opened socket and returns its port index, or gives the socket back (to
    /// be closed) once the pool holds [`MAX_SOCKETS`].
    pub(crate) fn add(&mut self, socket: S) -> Result<Port, S> {
        if self.sockets.len() >= MAX_SOCKETS {
            return Err(socket);
        }
        self.sockets.push(socket);
        Ok((self.sockets.len() - 1) as Port)
    }

    /// The socket of `port`.
    #[inline]
    pub(crate) fn socket(&self, port: Port) -> Option<&S> {
        self.sockets.get(port as usize)
    }

    /// Sockets open.
    pub(crate) fn len(&self) -> usize {
        self.sockets.len()
    }

    /// The next port index [`PortPool::add`] will return.
    pub(crate) fn next_port(&self) -> Port {
        self.sockets.len() as Port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn flow(n: u64) -> FlowHandle {
        FlowHandle::from_u64(n)
    }

    /// The client of flow `n`.
    fn who(n: u64) -> Owner {
        (SocketAddr::from(([192, 0, 2, 1], n as u16)), None)
    }

    /// Opens sockets until `backend` gets a pair for flow `f`, like the worker does.
    fn take(p: &mut PortPool<&'static str>, b: SocketAddr, f: u64, now: Time) -> Port {
        let port = match p.reserve(b, who(f), now) {
            Some(port) => port,
            None => {
                p.add("s").unwrap();
                p.reserve(b, who(f), now).unwrap()
            }
        };
        p.assign(port, b, flow(f));
        port
    }

    #[test]
    fn one_socket_carries_one_flow_per_backend() {
        let mut p = PortPool::new();
        let now = Time(0);
        assert_eq!(take(&mut p, backend(1), 1, now), 0);
        assert_eq!(take(&mut p, backend(2), 2, now), 0);
        assert_eq!(take(&mut p, backend(3), 3, now), 0);
        assert_eq!(p.len(), 1);
        // A second flow to backend 1 needs a port of its own.
        assert_eq!(take(&mut p, backend(1), 4, now), 1);
        assert_eq!(p.len(), 2);
        assert_eq!(p.owner(0, backend(1)), Some(flow(1)));
        assert_eq!(p.owner(0, backend(2)), Some(flow(2)));
        assert_eq!(p.owner(1, backend(1)), Some(flow(4)));
        assert_eq!(p.owner(1, backend(2)), None);
        // Backend 2 now has an untouched socket: no new one.
        assert_eq!(take(&mut p, backend(2), 5, now), 1);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn released_pairs_wait_out_their_quarantine() {
        let mut p = PortPool::new();
        assert_eq!(take(&mut p, backend(1), 1, Time(0)), 0);
        // Released at 10 ms, quarantined for 2 s.
        p.release(0, backend(1), who(1), Time(2_010));
        assert_eq!(p.owner(0, backend(1)), None, "a released pair has no owner");
        // Too early for another client: another socket rather than the pair just released.
        assert_eq!(take(&mut p, backend(1), 2, Time(2_009)), 1);
        assert_eq!(take(&mut p, backend(1), 3, Time(2_010)), 0);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_client_takes_its_own_pair_back_during_the_quarantine() {
        let mut p = PortPool::new();
        assert_eq!(take(&mut p, backend(1), 1, Time(0)), 0);
        p.release(0, backend(1), who(1), Time(2_000));
        assert_eq!(p.reserve(backend(1), who(2), Time(10)), None);
        assert_eq!(p.reserve(backend(1), who(1), Time(10)), Some(0));
    }

    #[test]
    fn released_pairs_go_out_oldest_first() {
        let mut p = PortPool::new();
        for f in 0..3 {
            take(&mut p, backend(1), f, Time(0));
        }
        p.release(2, backend(1), who(2), Time(1));
        p.release(0, backend(1), who(0), Time(2));
        let later = Time(1000);
        assert_eq!(p.reserve(backend(1), who(9), later), Some(2));
        assert_eq!(p.reserve(backend(1), who(9), later), Some(0));
        assert_eq!(p.reserve(backend(1), who(9), later), None);
    }
}
