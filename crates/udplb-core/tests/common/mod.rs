//! What the core's integration tests share: a seedable random source and a plain listener.

#![allow(dead_code)] // each test binary uses its part

use std::net::SocketAddr;
use std::time::Duration;

use udplb_core::acl::{Acl, CidrSet};
use udplb_core::snapshot::ListenerSpec;
use udplb_core::{Affinity, SessionMode};

/// xorshift64*: small, seedable, good enough to drive a simulation.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A listener on `address` in `mode` serving pool 0 with no policy: 30 s idle timeout, 1 s
/// reply timeout, 1,000 flows, datagrams up to 1,500 bytes, no access lists or limits.
pub fn listener(name: &str, address: SocketAddr, mode: SessionMode) -> ListenerSpec {
    ListenerSpec {
        name: name.into(),
        address,
        pool: 0,
        mode,
        affinity: Affinity::IpPort,
        idle_timeout: Duration::from_secs(30),
        reply_timeout: Duration::from_secs(1),
        max_flows: 1_000,
        max_datagram_size: 1_500,
        acl: Acl::default(),
        limits: None,
        persistence: None,
        proxy_ingress: false,
        proxy_from: CidrSet::default(),
        abuse_pool: None,
        gro: false,
        socket_buffer: 1 << 20,
        shared_upstream: false,
        tcp: None,
    }
}
