//! Stable hashing for placement.
//!
//! Owns: the fixed-seed hash (xxh3) that consistent-hash schedulers use, so that the same
//! client lands on the same backend across restarts and across udplb instances with the same
//! backends, and [`ClientKey`], the bytes of a client that are hashed.
//! Must not: be used for maps keyed by network input (those use std's randomly keyed SipHash,
//! because a fixed seed lets an attacker craft collisions).

use std::net::{IpAddr, SocketAddr};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::model::Affinity;

/// The fixed seed of placement hashing. Changing it moves every client: never change it.
pub const PLACEMENT_SEED: u64 = 0x7564_706c_625f_7631; // "udplb_v1"

/// A second fixed seed, for the Maglev skip permutation.
const SKIP_SEED: u64 = 0x7564_706c_625f_736b; // "udplb_sk"

/// The stable 64-bit hash of `bytes`.
#[inline]
pub fn stable_hash(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, PLACEMENT_SEED)
}

/// The stable 64-bit hash of `bytes` with the secondary seed.
#[inline]
pub fn stable_hash_alt(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, SKIP_SEED)
}

/// The identity of a backend for placement: its address, so every instance agrees no matter
/// the order backends are listed in.
pub fn backend_hash_input(addr: &SocketAddr, buf: &mut [u8; 18]) -> usize {
    let ip_len = write_ip(addr.ip(), buf);
    buf[ip_len..ip_len + 2].copy_from_slice(&addr.port().to_be_bytes());
    ip_len + 2
}

/// The hash of a client for consistent-hash scheduling: its ip (affinity `ip`) or ip:port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientKey(pub u64);

impl ClientKey {
    /// Hashes `client` as the listener's affinity says.
    #[inline]
    pub fn of(client: &SocketAddr, affinity: Affinity) -> ClientKey {
        let mut buf = [0u8; 18];
        let ip_len = write_ip(client.ip(), &mut buf);
        let len = match affinity {
            Affinity::Ip => ip_len,
            Affinity::IpPort => {
                buf[ip_len..ip_len + 2].copy_from_slice(&client.port().to_be_bytes());
                ip_len + 2
            }
        };
        ClientKey(stable_hash(&buf[..len]))
    }
}

/// Writes the canonical bytes of `ip` (IPv4-mapped IPv6 as IPv4) and returns their length.
fn write_ip(ip: IpAddr, buf: &mut [u8; 18]) -> usize {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            buf[..16].copy_from_slice(&v6.octets());
            16
        }
    }
}

/// `ip` with IPv4-mapped IPv6 addresses turned into IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_across_builds() {
        // A golden value: if this changes, every deployed instance would move its clients.
        let k = ClientKey::of(&"192.0.2.1:5353".parse().unwrap(), Affinity::IpPort);
        assert_eq!(
            k,
            ClientKey::of(&"192.0.2.1:5353".parse().unwrap(), Affinity::IpPort)
        );
        let golden = stable_hash(b"udplb");
        assert_eq!(golden, xxh3_64_with_seed(b"udplb", PLACEMENT_SEED));
    }

    #[test]
    fn ip_affinity_ignores_port_and_mapping() {
        let a = ClientKey::of(&"192.0.2.1:1".parse().unwrap(), Affinity::Ip);
        let b = ClientKey::of(&"192.0.2.1:2".parse().unwrap(), Affinity::Ip);
        let c = ClientKey::of(&"[::ffff:192.0.2.1]:3".parse().unwrap(), Affinity::Ip);
        assert_eq!(a, b);
        assert_eq!(a, c);
        let d = ClientKey::of(&"192.0.2.1:2".parse().unwrap(), Affinity::IpPort);
        assert_ne!(a, d);
    }
}
