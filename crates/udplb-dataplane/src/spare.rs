//! Spare upstream sockets of completed request-response flows, kept for the next flow to the
//! same backend.
//!
//! Owns: a bounded, per-backend FIFO of idle sockets and when each was parked. In
//! request-response mode a flow ends with its last expected reply, and a busy client opens the
//! next one moments later: taking a spare connected to the chosen backend saves the socket,
//! connect, epoll registration and close of a fresh one (and the kernel's socket allocation and
//! ephemeral port search). A spare serves another flow only once its quarantine is over (the
//! listener's reply timeout), oldest first: a backend's late or duplicate answer to the
//! finished exchange arrives while the socket serves no client, and is discarded, never relayed
//! to the next one.
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

/// Idle sockets connected to a backend, oldest first, with when each may serve again.
pub(crate) struct Spares<S> {
    by_backend: HashMap<SocketAddr, VecDeque<(Time, S)>>,
    total: usize,
}

impl<S> Spares<S> {
    pub(crate) fn new() -> Spares<S> {
        Spares {
            by_backend: HashMap::new(),
            total: 0,
        }
    }

    /// Keeps `socket`, connected to `backend`, for a flow from `ready` on (the end of its
    /// quarantine). Returns it back when the backend's or the worker's share is full (the
    /// caller closes it).
    pub(crate) fn park(&mut self, backend: SocketAddr, socket: S, ready: Time) -> Option<S> {
        if self.total >= SPARES_PER_WORKER {
            return Some(socket);
        }
        let queue = self.by_backend.entry(backend).or_default();
        if queue.len() >= SPARES_PER_BACKEND {
            return Some(socket);
        }
        queue.push_back((ready, socket));
        self.total += 1;
        None
    }

    /// The oldest spare connected to `backend` whose quarantine is over at `now`, if any.
    pub(crate) fn take(&mut self, backend: SocketAddr, now: Time) -> Option<S> {
        let queue = self.by_backend.get_mut(&backend)?;
        if queue.front().is_none_or(|(ready, _)| *ready > now) {
            return None;
        }
        let (_, socket) = queue.pop_front()?;
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
                .is_some_and(|(ready, _)| now.0.saturating_sub(ready.0) >= SPARE_IDLE_MS)
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

    #[test]
    fn hands_out_the_oldest_spare_of_the_right_backend() {
        let mut s = Spares::new();
        assert!(s.park(addr(1), "a1", Time(0)).is_none());
        assert!(s.park(addr(2), "b1", Time(1)).is_none());
        assert!(s.park(addr(1), "a2", Time(2)).is_none());
        assert_eq!(s.take(addr(1), Time(2)), Some("a1"));
        assert_eq!(s.take(addr(1), Time(2)), Some("a2"));
        assert_eq!(s.take(addr(1), Time(2)), None);
        assert_eq!(s.take(addr(3), Time(2)), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_spare_serves_no_flow_before_its_quarantine_is_over() {
        let mut s = Spares::new();
        assert!(s.park(addr(1), "a", Time(2_000)).is_none());
        assert_eq!(s.take(addr(1), Time(1_999)), None);
        assert_eq!(s.take(addr(1), Time(2_000)), Some("a"));
    }

    #[test]
    fn refuses_past_the_per_backend_share() {
        let mut s = Spares::new();
        for i in 0..SPARES_PER_BACKEND {
            assert!(s.park(addr(1), i, Time(0)).is_none());
        }
        assert_eq!(s.park(addr(1), 999, Time(0)), Some(999));
        assert!(s.park(addr(2), 7, Time(0)).is_none());
        assert_eq!(s.len(), SPARES_PER_BACKEND + 1);
    }

    #[test]
    fn refuses_past_the_worker_share() {
        let mut s = Spares::new();
        let mut port = 0;
        while s.len() < SPARES_PER_WORKER {
            port += 1;
            for _ in 0..SPARES_PER_BACKEND {
                let _ = s.park(addr(port), port, Time(0));
            }
        }
        assert_eq!(s.park(addr(port + 1), 0, Time(0)), Some(0));
    }

    #[test]
    fn expires_spares_idle_for_too_long() {
        let mut s = Spares::new();
        let _ = s.park(addr(1), "old", Time(0));
        let _ = s.park(addr(1), "new", Time(SPARE_IDLE_MS / 2));
        let _ = s.park(addr(2), "other", Time(10));
        s.expire(Time(SPARE_IDLE_MS));
        assert_eq!(s.len(), 2);
        assert_eq!(s.take(addr(1), Time(SPARE_IDLE_MS)), Some("new"));
        s.expire(Time(SPARE_IDLE_MS + 10));
        assert_eq!(s.len(), 0);
        assert_eq!(s.take(addr(2), Time(SPARE_IDLE_MS + 10)), None);
    }
}
