//! Flows handed from one udplb process to the next (a binary upgrade): where each of the old
//! process's flows was going, so that the new process opens the client's next flow to the
//! same backend instead of scheduling it afresh.
//!
//! Owns: [`Placement`] (one handed-over flow) and [`Inherited`], the new process's table of
//! them, shared by its workers and consulted only when a flow opens. Each entry is taken by
//! the first flow of its client and is gone after that (the flow itself then keeps the
//! backend); entries never used are dropped with the table once the listeners' idle timeouts
//! have passed (the engine lets go of it).
//! Must not: decide whether the backend may still take the flow (the engine does: only a
//! backend that keeps flows, as an established flow would stay on it), or read clocks.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::sharded::Sharded;

/// One flow of the old process: its listener (by index in the new process's snapshot), the
/// client it serves and the backend it went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub listener: u16,
    pub client: SocketAddr,
    pub backend: SocketAddr,
}

/// The handed-over placements, by listener and client.
#[derive(Debug, Default)]
pub struct Inherited {
    shards: Sharded<HashMap<(u16, SocketAddr), SocketAddr>>,
}

impl Inherited {
    /// A table of `placements` (a client seen twice on one listener keeps its last backend).
    pub fn new(placements: impl IntoIterator<Item = Placement>) -> Inherited {
        let table = Inherited::default();
        for p in placements {
            let key = (p.listener, p.client);
            table.shards.of(&key).insert(key, p.backend);
        }
        table
    }

    /// The backend `client`'s flow on `listener` went to, taken out of the table.
    pub fn take(&self, listener: u16, client: SocketAddr) -> Option<SocketAddr> {
        let key = (listener, client);
        self.shards.of(&key).remove(&key)
    }

    /// Placements not taken yet.
    pub fn len(&self) -> usize {
        self.shards.fold(0, |n, s| n + s.len())
    }

    /// Whether every placement was taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_placement_is_taken_once_by_its_own_listener_and_client() {
        let table = Inherited::new([
            Placement {
                listener: 0,
                client: addr("192.0.2.1:5000"),
                backend: addr("10.0.0.1:53"),
            },
            Placement {
                listener: 1,
                client: addr("192.0.2.1:5000"),
                backend: addr("10.0.0.2:53"),
            },
        ]);
        assert_eq!(table.len(), 2);
        assert_eq!(table.take(0, addr("192.0.2.1:5001")), None);
        assert_eq!(
            table.take(0, addr("192.0.2.1:5000")),
            Some(addr("10.0.0.1:53"))
        );
        assert_eq!(table.take(0, addr("192.0.2.1:5000")), None);
        assert_eq!(
            table.take(1, addr("192.0.2.1:5000")),
            Some(addr("10.0.0.2:53"))
        );
        assert!(table.is_empty());
    }
}
