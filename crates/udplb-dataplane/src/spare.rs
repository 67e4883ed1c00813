//! Spare upstream sockets of completed request-response flows, kept for the next flow to the
//! same backend.
//!
//! Owns: a bounded, per-backend FIFO of idle sockets and when each was parked. In
//! request-response mode a flow ends with its last expected reply, and a busy client opens the
//! next one moments later: taking a spare connected to the chosen backend saves the socket,
//! connect, epoll registration and close of a fresh one (and the kernel's socket allocation and
//! ephemeral port search). A spare serves the flow of another client only once its quarantine
//! is over (the listener's reply timeout), oldest first: a backend's late or duplicate answer
//! to the finished exchange arrives while the socket serves no client, and is discarded, never
//! relayed to someone else. The same client (a resolver or RADIUS client asking again from the
//! same port) takes its own spare back at once: a late answer to its own earlier request is
//! what it would get from the backend directly.
//!
//! Must not: do I/O. The worker discards what a spare received while parked and re-registers
//! it; spares still unused [`SPARE_IDLE_MS`] after their quarantine are dropped (closing their
//! descriptors).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use udplb_core::Time;

/// Spares kept per backend address.
pub(crate) const SPARES_PER_BACKEND: usize = 64;
/// Spares kept by one worker over all backends (each holds a descriptor and an ephemeral port).
pub(crate) const SPARES_PER_WORKER: usize = 1024;
/// How long a spare may wait for a new flow, once its quarantine is over, before it is closed.
pub(crate) const SPARE_IDLE_MS: u64 = 1000;

/// Who a flow served: the client's address, and behind another balancer the client its PROXY
/// header named.
pub(crate) type Owner = (SocketAddr, Option<SocketAddr>);

/// Spares searched for the new flow's own client, newest first, before the oldest one.
const OWN_SPARE_SCAN: usize = 8;

/// Idle sockets connected to a backend, oldest first, with when each may serve another
/// client, and whose it was.
pub(crate) struct Spares<S> {
    by_backend: HashMap<SocketAddr, VecDeque<(Time, Owner, S)>>,
    total: usize,
}

impl<S> Spares<S> {
    pub(crate) fn new() -> Spares<S> {
        Spares {
            by_backend: HashMap::new(),
            total: 0,
        }
    }

    /// Keeps `socket`, connected to `backend`, which served `owner`, for another client's flow
    /// from `ready` on (the end of its quarantine). Returns it back when the backend's or the
    /// worker's share is full (the caller closes it).
    pub(crate) fn park(
        &mut self,
        backend: SocketAddr,
        owner: Owner,
        socket: S,
        ready: Time,
    ) -> Option<S> {
        if self.total >= SPARES_PER_WORKER {
            return Some(socket);
        }
        let queue = self.by_backend.entry(backend).or_default();
        if queue.len() >= SPARES_PER_BACKEND {
            return Some(socket);
        }
        queue.push_back((ready, owner, socket));
        self.total += 1;
        None
    }

    /// A spare connected to `backend` for a flow of `owner`: one that served `owner` before
    /// (among the newest few), else the oldest whose quarantine is over at `now`, if any.
    pub(crate) fn take(&mut self, backend: SocketAddr, owner: Owner, now: Time) -> Option<S> {
        let queue = self.by_backend.get_mut(&backend)?;
        let own = (0..queue.len())
            .rev()
            .take(OWN_SPARE_SCAN)
            .find(|&i| queue[i].1 == owner);
        let (_, _, socket) = match own {
            Some(i) => queue.remove(i)?,
            None if queue.front().is_some_and(|(ready, _, _)| *ready <= now) => {
                queue.pop_front()?
            }
            None => return None,
        };
        self.total -= 1;
        Some(socket)
    }

    /// Drops the spares unused for [`SPARE_IDLE_MS`] after their quarantine, at `now`.
    pub(crate) fn expire(&mut self, now: Time) {
        if self.total == 0 {
            return;
        }
        let mut dropped = 0;
        self.by_backend.retain(|_, queue| {
            while queue
                .front()
                .is_some_and(|(ready, _, _)| now.0.saturating_sub(ready.0) >= SPARE_IDLE_MS)
            {
                queue.pop_front();
                dropped += 1;
            }
            !queue.is_empty()
        });
        self.total -= dropped;
    }

    /// Spares held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn who(port: u16) -> Owner {
        (SocketAddr::from(([192, 0, 2, 1], port)), None)
    }

    #[test]
    fn hands_out_the_oldest_spare_of_the_right_backend() {
        let mut s = Spares::new();
        assert!(s.park(addr(1), who(1), "a1", Time(0)).is_none());
        assert!(s.park(addr(2), who(9), "b1", Time(1)).is_none());
        assert!(s.park(addr(1), who(9), "a2", Time(2)).is_none());
        assert_eq!(s.take(addr(1), who(0), Time(2)), Some("a1"));
        assert_eq!(s.take(addr(1), who(0), Time(2)), Some("a2"));
        assert_eq!(s.take(addr(1), who(0), Time(2)), None);
        assert_eq!(s.take(addr(3), who(0), Time(2)), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_spare_serves_another_client_only_after_its_quarantine() {
        let mut s = Spares::new();
        assert!(s.park(addr(1), who(9), "a", Time(2_000)).is_none());
        assert_eq!(s.take(addr(1), who(0), Time(1_999)), None);
        assert_eq!(s.take(addr(1), who(0), Time(2_000)), Some("a"));
    }

    #[test]
    fn a_client_takes_its_own_spare_back_at_once() {
        let mut s = Spares::new();
        assert!(s.park(addr(1), who(1), "one", Time(2_000)).is_none());
        assert!(s.park(addr(1), who(2), "two", Time(2_000)).is_none());
        assert_eq!(s.take(addr(1), who(2), Time(0)), Some("two"));
        assert_eq!(
            s.take(addr(1), who(3), Time(0)),
            None,
            "another client waits"
        );
        assert_eq!(s.take(addr(1), who(1), Time(0)), Some("one"));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn refuses_past_the_per_backend_share() {
        let mut s = Spares::new();
        for i in 0..SPARES_PER_BACKEND {
            assert!(s.park(addr(1), who(9), i, Time(0)).is_none());
        }
        assert_eq!(s.park(addr(1), who(9), 999, Time(0)), Some(999));
        assert!(s.park(addr(2), who(9), 7, Time(0)).is_none());
        assert_eq!(s.len(), SPARES_PER_BACKEND + 1);
    }

    #[test]
    fn refuses_past_the_worker_share() {
        let mut s = Spares::new();
        let mut port = 0;
        while s.len() < SPARES_PER_WORKER {
            port += 1;
            for _ in 0..SPARES_PER_BACKEND {
                let _ = s.park(addr(port), who(9), port, Time(0));
            }
        }
        assert_eq!(s.park(addr(port + 1), who(9), 0, Time(0)), Some(0));
    }

    #[test]
    fn expires_spares_idle_for_too_long() {
        let mut s = Spares::new();
        let _ = s.park(addr(1), who(9), "old", Time(0));
        let _ = s.park(addr(1), who(9), "new", Time(SPARE_IDLE_MS / 2));
        let _ = s.park(addr(2), who(9), "other", Time(10));
        s.expire(Time(SPARE_IDLE_MS));
        assert_eq!(s.len(), 2);
        assert_eq!(s.take(addr(1), who(0), Time(SPARE_IDLE_MS)), Some("new"));
        s.expire(Time(SPARE_IDLE_MS + 10));
        assert_eq!(s.len(), 0);
        assert_eq!(s.take(addr(2), who(0), Time(SPARE_IDLE_MS + 10)), None);
    }
}
