//! Client-IP affinity: every flow of one client IP goes to the same backend.
//!
//! Owns: [`StickyTable`], which remembers the backend of each client IP while that IP has live
//! flows and for an idle timeout after its last flow closed (LVS's persistence). Workers share
//! one table per listener (behind a lock in the data plane) because the kernel spreads a
//! client's ports over workers; it is consulted only when a flow is created or closed, never
//! per datagram.
//! Must not: grow without bound (it holds at most `cap` IPs; beyond that, new IPs are scheduled
//! without stickiness), or read clocks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::hash::canonical_ip;
use crate::snapshot::BackendId;
use crate::time::Time;

#[derive(Clone, Copy, Debug)]
struct Entry {
    backend: BackendId,
    flows: u32,
    released: Time,
}

/// Backend per client IP.
#[derive(Debug)]
pub struct StickyTable {
    entries: HashMap<IpAddr, Entry>,
    cap: usize,
    idle_timeout: Duration,
}

impl StickyTable {
    /// A table holding at most `cap` client IPs, forgetting an IP `idle_timeout` after its last
    /// flow closed.
    pub fn new(cap: usize, idle_timeout: Duration) -> Self {
        StickyTable {
            entries: HashMap::new(),
            cap,
            idle_timeout,
        }
    }

    /// The backend `ip` is stuck to, if any.
    pub fn backend_of(&self, ip: IpAddr) -> Option<BackendId> {
        self.entries.get(&canonical_ip(ip)).map(|e| e.backend)
    }

    /// Records a new flow of `ip` on `backend` (re-sticking the IP if it moved, e.g. because its
    /// old backend went away). Returns false when the table is full and `ip` is not in it.
    pub fn acquire(&mut self, ip: IpAddr, backend: BackendId, now: Time) -> bool {
        let ip = canonical_ip(ip);
        if let Some(e) = self.entries.get_mut(&ip) {
            e.backend = backend;
            e.flows += 1;
            return true;
        }
        if self.entries.len() >= self.cap {
            self.expire(now);
            if self.entries.len() >= self.cap {
                return false;
            }
        }
        self.entries.insert(
            ip,
            Entry {
                backend,
                flows: 1,
                released: now,
            },
        );
        true
    }

    /// Records that a flow of `ip` closed.
    pub fn release(&mut self, ip: IpAddr, now: Time) {
        if let Some(e) = self.entries.get_mut(&canonical_ip(ip)) {
            e.flows = e.flows.saturating_sub(1);
            e.released = now;
        }
    }

    /// Forgets IPs with no flows whose idle timeout has passed.
    pub fn expire(&mut self, now: Time) {
        let idle = self.idle_timeout;
        self.entries
            .retain(|_, e| e.flows > 0 || e.released.after(idle) > now);
    }

    /// Client IPs remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no IP is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticks_while_flows_live_and_for_the_timeout_after() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut t = StickyTable::new(10, Duration::from_secs(5));
        assert!(t.acquire(ip, BackendId(3), Time(0)));
        assert!(t.acquire(ip, BackendId(3), Time(1)));
        assert_eq!(
            t.backend_of("::ffff:192.0.2.7".parse().unwrap()),
            Some(BackendId(3))
        );
        t.release(ip, Time(100));
        t.expire(Time(10_000));
        assert_eq!(t.backend_of(ip), Some(BackendId(3)), "one flow still live");
        t.release(ip, Time(10_000));
        t.expire(Time(14_999));
        assert_eq!(t.backend_of(ip), Some(BackendId(3)));
        t.expire(Time(15_000));
        assert_eq!(t.backend_of(ip), None);
    }

    #[test]
    fn bounded() {
        let mut t = StickyTable::new(2, Duration::from_secs(5));
        assert!(t.acquire("192.0.2.1".parse().unwrap(), BackendId(0), Time(0)));
        assert!(t.acquire("192.0.2.2".parse().unwrap(), BackendId(0), Time(0)));
        assert!(!t.acquire("192.0.2.3".parse().unwrap(), BackendId(0), Time(0)));
        assert_eq!(t.len(), 2);
    }
}
