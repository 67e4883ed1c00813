//! Flows shared between udplb instances that serve the same addresses (flow-state sync, as
//! IPVS's sync daemon does): each instance tells its peers where its flows go, so that when a
//! router moves a client to another instance (a balancer died, ECMP re-hashed), that instance
//! opens the client's flow to the backend it was on, even where its own scheduler would now
//! choose another (the backend set changed since the flow began).
//!
//! Owns: [`Outbox`], a worker's flows to tell the peers about (written when a flow opens and
//! when an active flow's idle timer is renewed, never per datagram), and [`Synced`], the
//! placements learned from the peers, bounded, consulted only when a flow opens, and aged out
//! by generations: an entry lives for one to two periods of [`Synced::rotate`] unless renewed.
//! Must not: do I/O, read clocks (the caller rotates), or decide whether a backend may still
//! take the flow (the engine does, as for a handed-over flow).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::handover::Placement;
use crate::sharded::{SHARDS, Sharded};

/// One worker's placements not yet sent to the peers, bounded: when the sender falls behind,
/// the newest are dropped and counted (a peer then learns the flow at its next renewal).
#[derive(Debug)]
pub struct Outbox {
    pending: Mutex<Vec<Placement>>,
    cap: usize,
    dropped: AtomicU64,
}

impl Outbox {
    /// An outbox holding at most `cap` placements between two sends.
    pub fn new(cap: usize) -> Outbox {
        Outbox {
            pending: Mutex::new(Vec::new()),
            cap,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues `p` for the peers.
    pub fn push(&self, p: Placement) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() < self.cap {
            pending.push(p);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Moves every queued placement into `out` (the sender's buffer, reused).
    pub fn drain_into(&self, out: &mut Vec<Placement>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        out.append(&mut pending);
    }

    /// Placements dropped because the outbox was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What [`Synced::record`] did with a placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Stored (new, or renewing an entry).
    Stored,
    /// The table is full: not stored.
    Full,
}

/// The two generations of one shard: entries recorded since the last rotation, and before.
#[derive(Debug, Default)]
struct Generations {
    current: HashMap<(u16, SocketAddr), SocketAddr>,
    previous: HashMap<(u16, SocketAddr), SocketAddr>,
}

/// Placements learned from the peers, by listener (index in this instance's snapshot) and
/// client.
#[derive(Debug)]
pub struct Synced {
    shards: Sharded<Generations>,
    cap_per_shard: usize,
    hits: AtomicU64,
}

impl Synced {
    /// A table of at most `max_entries` placements (spread over the shards).
    pub fn new(max_entries: usize) -> Synced {
        Synced {
            shards: Sharded::default(),
            cap_per_shard: max_entries.div_ceil(SHARDS).max(1),
            hits: AtomicU64::new(0),
        }
    }

    /// Records that a peer has `client`'s flow on `listener` going to `backend`.
    pub fn record(&self, p: Placement) -> Recorded {
        let key = (p.listener, p.client);
        let mut shard = self.shards.of(&key);
        let shard = &mut *shard;
        if let Some(b) = shard.current.get_mut(&key) {
            *b = p.backend;
            return Recorded::Stored;
        }
        shard.previous.remove(&key);
        if shard.current.len() + shard.previous.len() >= self.cap_per_shard {
            return Recorded::Full;
        }
        shard.current.insert(key, p.backend);
        Recorded::Stored
    }

    /// Where a peer had `client`'s flow on `listener` go, if it told this instance within the
    /// last one or two rotation periods.
    pub fn lookup(&self, listener: u16, client: SocketAddr) -> Option<SocketAddr> {
        let key = (listener, client);
        let shard = self.shards.of(&key);
        shard
            .current
            .get(&key)
            .or_else(|| shard.previous.get(&key))
            .copied()
    }

    /// Counts a flow opened where a peer said its client's flow went.
    pub fn used(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets what was not renewed since the previous rotation (the caller rotates every
    /// hold period, so an entry lives one to two of them).
    pub fn rotate(&self) {
        for _ in 0..SHARDS {
            let mut shard = self.shards.next();
            let shard = &mut *shard;
            shard.previous = std::mem::take(&mut shard.current);
        }
    }

    /// Placements held.
    pub fn len(&self) -> usize {
        self.shards
            .fold(0, |n, s| n + s.current.len() + s.previous.len())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows opened where a peer said the client's flow went.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(client: &str, backend: &str) -> Placement {
        Placement {
            listener: 0,
            client: client.parse().unwrap(),
            backend: backend.parse().unwrap(),
        }
    }

    #[test]
    fn an_entry_lives_one_to_two_rotations_unless_renewed() {
        let t = Synced::new(1024);
        let c = "192.0.2.1:5000".parse().unwrap();
        t.record(placement("192.0.2.1:5000", "10.0.0.1:53"));
        t.rotate();
        assert_eq!(t.lookup(0, c), Some("10.0.0.1:53".parse().unwrap()));
        assert_eq!(t.lookup(1, c), None, "another listener");
        t.record(placement("192.0.2.1:5000", "10.0.0.2:53"));
        t.rotate();
        assert_eq!(t.lookup(0, c), Some("10.0.0.2:53".parse().unwrap()));
        t.rotate();
        assert_eq!(t.lookup(0, c), None);
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_table_stores_nothing_new_but_renews() {
        let t = Synced::new(SHARDS);
        let mut full = 0;
        for port in 1..=200u16 {
            let client = format!("192.0.2.1:{port}");
            if t.record(placement(&client, "10.0.0.1:53")) == Recorded::Full {
                full += 1;
            }
        }
        assert!(t.len() <= SHARDS, "{} entries", t.len());
        assert_eq!(full, 200 - t.len());
        let kept = (1..=200u16)
            .map(|p| format!("192.0.2.1:{p}"))
            .find(|c| t.lookup(0, c.parse().unwrap()).is_some())
            .unwrap();
        assert_eq!(t.record(placement(&kept, "10.0.0.9:53")), Recorded::Stored);
    }

    #[test]
    fn a_full_outbox_counts_what_it_drops() {
        let o = Outbox::new(2);
        for _ in 0..3 {
            o.push(placement("192.0.2.1:5000", "10.0.0.1:53"));
        }
        let mut out = Vec::new();
        o.drain_into(&mut out);
        assert_eq!((out.len(), o.dropped()), (2, 1));
        o.drain_into(&mut out);
        assert_eq!(out.len(), 2);
    }
}
