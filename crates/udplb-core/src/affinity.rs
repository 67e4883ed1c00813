//! Persistence: a client returns to the backend it last used (LVS's `persistence_timeout`).
//!
//! Owns: [`Persistence`], one listener's memory of which backend each client (its ip, or its
//! ip:port) used, while the client has live flows and for a timeout after its last flow
//! closed, and its counters. The workers share it (the kernel spreads a client's ports over
//! workers), split into shards behind their own locks; it is consulted when a flow opens and
//! released when one closes, never per datagram of an established flow. Reloads that keep a
//! listener's settings keep its table (the snapshot carries the same `Arc`).
//! Must not: grow without bound (a shard holds at most its share of `cap` clients; beyond
//! that, new clients are scheduled without being remembered, and counted), read clocks, or
//! decide whether a backend may take a client (the caller says).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::hash::canonical_ip;
use crate::sharded::{SHARDS, Sharded};
use crate::snapshot::BackendId;
use crate::time::Time;

/// What a listener remembers clients by, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PersistenceSettings {
    /// Clients are told apart by ip:port (else by ip alone).
    pub by_port: bool,
    /// How long a client is remembered after its last flow closed.
    pub timeout: Duration,
    /// Clients remembered at most.
    pub cap: usize,
}

/// One listener's persistence table.
#[derive(Debug)]
pub struct Persistence {
    settings: PersistenceSettings,
    shards: Sharded<Shard>,
}

/// What [`Persistence::counts`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistenceCounts {
    /// Clients remembered now.
    pub clients: u64,
    /// New flows (and datagrams, in datagram mode) sent to the backend their client used.
    pub returned: u64,
    /// Clients not remembered because the table was full.
    pub full: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    backend: BackendId,
    flows: u32,
    released: Time,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<SocketAddr, Entry>,
    returned: u64,
    full: u64,
}

impl Persistence {
    /// An empty table.
    pub fn new(settings: PersistenceSettings) -> Self {
        Persistence {
            settings,
            shards: Sharded::default(),
        }
    }

    /// Its settings.
    pub fn settings(&self) -> PersistenceSettings {
        self.settings
    }

    /// The backend `client` last used, if it is remembered at `now` and `usable` says that
    /// backend may take it (counted as a return).
    pub fn backend_of(
        &self,
        client: SocketAddr,
        now: Time,
        usable: impl FnOnce(BackendId) -> bool,
    ) -> Option<BackendId> {
        let key = self.key(client);
        let mut shard = self.shards.of(&key);
        let e = *shard.entries.get(&key)?;
        if !self.still_remembered(&e, now) || !usable(e.backend) {
            return None;
        }
        shard.returned += 1;
        Some(e.backend)
    }

    /// The backend `client` last used, if it is remembered at `now`, whether or not that
    /// backend may take it: what a new flow would consult (`explain`), not counted.
    pub fn remembered(&self, client: SocketAddr, now: Time) -> Option<BackendId> {
        let key = self.key(client);
        let e = *self.shards.of(&key).entries.get(&key)?;
        self.still_remembered(&e, now).then_some(e.backend)
    }

    /// Whether `e`'s client is remembered at `now`: it has flows, or its last one closed
    /// within the timeout.
    fn still_remembered(&self, e: &Entry, now: Time) -> bool {
        e.flows > 0 || e.released.after(self.settings.timeout) > now
    }

    /// Records a new flow of `client` on `backend` at `now` (moving the client if it was on
    /// another backend). A full shard forgets clients whose time is up first; if it is still
    /// full, `client` is not remembered (counted).
    pub fn acquire(&self, client: SocketAddr, backend: BackendId, now: Time) {
        let key = self.key(client);
        let cap = self.settings.cap.div_ceil(SHARDS).max(1);
        let timeout = self.settings.timeout;
        let mut shard = self.shards.of(&key);
        if let Some(e) = shard.entries.get_mut(&key) {
            e.backend = backend;
            e.flows += 1;
            return;
        }
        if shard.entries.len() >= cap {
            shard.expire(now, timeout);
            if shard.entries.len() >= cap {
                shard.full += 1;
                return;
            }
        }
        shard.entries.insert(
            key,
            Entry {
                backend,
                flows: 1,
                released: now,
            },
        );
    }

    /// A flow of `client` moved to backend `to`: the client follows it.
    pub fn moved(&self, client: SocketAddr, to: BackendId) {
        let key = self.key(client);
        if let Some(e) = self.shards.of(&key).entries.get_mut(&key) {
            e.backend = to;
        }
    }

    /// Records that a flow of `client` closed at `now`: the client is remembered for the
    /// timeout from then (or while it has other flows).
    pub fn release(&self, client: SocketAddr, now: Time) {
        let key = self.key(client);
        if let Some(e) = self.shards.of(&key).entries.get_mut(&key) {
            e.flows = e.flows.saturating_sub(1);
            e.released = now;
        }
    }

    /// Every client remembered: its key (what [`Persistence::remember`] takes) and backend.
    pub fn entries(&self) -> Vec<(SocketAddr, BackendId)> {
        self.shards.fold(Vec::new(), |mut all, s| {
            all.extend(s.entries.iter().map(|(k, e)| (*k, e.backend)));
            all
        })
    }

    /// Remembers the client of `key` on `backend` as if its last flow closed at `now` (what
    /// a predecessor remembered, at an upgrade); a client already remembered, or a full shard,
    /// keeps what it has.
    pub fn remember(&self, key: SocketAddr, backend: BackendId, now: Time) {
        let key = self.key(key);
        let cap = self.settings.cap.div_ceil(SHARDS).max(1);
        let mut shard = self.shards.of(&key);
        if shard.entries.len() < cap {
            shard.entries.entry(key).or_insert(Entry {
                backend,
                flows: 0,
                released: now,
            });
        }
    }

    /// Forgets, in the next shard in turn, the clients whose time is up at `now`. Called
    /// periodically by every worker, it bounds what forgotten clients hold; a client whose
    /// time is up is never returned, swept or not.
    pub fn sweep(&self, now: Time) {
        self.shards.next().expire(now, self.settings.timeout);
    }

    /// Clients remembered (possibly some whose time is up but not yet swept) and counters.
    pub fn counts(&self) -> PersistenceCounts {
        self.shards.fold(PersistenceCounts::default(), |mut c, s| {
            c.clients += s.entries.len() as u64;
            c.returned += s.returned;
            c.full += s.full;
            c
        })
    }

    fn key(&self, client: SocketAddr) -> SocketAddr {
        let port = if self.settings.by_port {
            client.port()
        } else {
            0
        };
        SocketAddr::new(canonical_ip(client.ip()), port)
    }
}

/// Tables are equal when their settings are (what a snapshot comparison asks).
impl PartialEq for Persistence {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl Eq for Persistence {}

impl Shard {
    fn expire(&mut self, now: Time, timeout: Duration) {
        self.entries
            .retain(|_, e| e.flows > 0 || e.released.after(timeout) > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_entries_come_back_as_they_went_and_are_forgotten_after_the_timeout() {
        let old = table(false, 100);
        let client: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        old.acquire(client, BackendId(3), Time(0));
        let entries = old.entries();
        assert_eq!(
            entries,
            vec![("192.0.2.7:0".parse().unwrap(), BackendId(3))]
        );
        let new = table(false, 100);
        for (key, backend) in entries {
            new.remember(key, backend, Time(1_000));
        }
        let other_port: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert_eq!(
            new.backend_of(other_port, Time(5_999), |_| true),
            Some(BackendId(3))
        );
        assert_eq!(new.backend_of(other_port, Time(6_001), |_| true), None);
    }

    fn table(by_port: bool, cap: usize) -> Persistence {
        Persistence::new(PersistenceSettings {
            by_port,
            timeout: Duration::from_secs(5),
            cap,
        })
    }

    fn any(_: BackendId) -> bool {
        true
    }

    #[test]
    fn remembers_while_flows_live_and_for_the_timeout_after() {
        let client: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let t = table(false, 100);
        t.acquire(client, BackendId(3), Time(0));
        t.acquire(client, BackendId(3), Time(1));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:6000".parse().unwrap();
        assert_eq!(t.backend_of(mapped, Time(1), any), Some(BackendId(3)));
        t.release(client, Time(100));
        assert_eq!(
            t.backend_of(client, Time(10_000), any),
            Some(BackendId(3)),
            "one flow still live"
        );
        t.release(client, Time(10_000));
        assert_eq!(t.backend_of(client, Time(14_999), any), Some(BackendId(3)));
        assert_eq!(t.backend_of(client, Time(15_000), any), None);
        for _ in 0..SHARDS {
            t.sweep(Time(15_000));
        }
        assert_eq!(t.counts().clients, 0);
        assert_eq!(t.counts().returned, 3);
    }

    #[test]
    fn remembered_answers_as_a_new_flow_would_without_counting() {
        let client: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let t = table(false, 100);
        assert_eq!(t.remembered(client, Time(0)), None);
        t.acquire(client, BackendId(2), Time(0));
        t.release(client, Time(1_000));
        assert_eq!(t.remembered(client, Time(5_999)), Some(BackendId(2)));
        assert_eq!(t.remembered(client, Time(6_000)), None, "its time is up");
        assert_eq!(t.counts().returned, 0, "asking is not a return");
    }

    #[test]
    fn by_port_tells_ports_apart() {
        let t = table(true, 100);
        let a: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.7:5001".parse().unwrap();
        t.acquire(a, BackendId(1), Time(0));
        assert_eq!(t.backend_of(a, Time(0), any), Some(BackendId(1)));
        assert_eq!(t.backend_of(b, Time(0), any), None);
    }

    #[test]
    fn an_unusable_backend_is_not_returned_and_a_move_is_followed() {
        let t = table(false, 100);
        let c: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        t.acquire(c, BackendId(1), Time(0));
        assert_eq!(t.backend_of(c, Time(0), |b| b != BackendId(1)), None);
        t.moved(c, BackendId(2));
        assert_eq!(t.backend_of(c, Time(0), any), Some(BackendId(2)));
        assert_eq!(t.counts().returned, 1);
    }

    #[test]
    fn bounded_and_counted() {
        let t = table(true, SHARDS);
        for port in 0..1000u16 {
            t.acquire(
                SocketAddr::new("192.0.2.1".parse().unwrap(), port),
                BackendId(0),
                Time(0),
            );
        }
        let c = t.counts();
        assert!(c.clients <= SHARDS as u64, "{c:?}");
        assert_eq!(c.clients + c.full, 1000);
    }
}
