//! What this host's network interfaces say: its own addresses and their broadcast addresses.
//!
//! Owns: reading them (`getifaddrs`) for the snapshot's [`udplb_core::source::SourceGuard`]
//! and for refusing backends that would be udplb itself.
//! Must not: change anything, or be read per datagram (once per published snapshot).

use std::net::IpAddr;

/// This host's addresses and the broadcast addresses of its IPv4 networks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addresses {
    /// Every address of every interface (loopback included).
    pub local: Vec<IpAddr>,
    /// The broadcast address of every IPv4 network an interface is on.
    pub broadcast: Vec<IpAddr>,
}

impl Addresses {
    /// Reads them now; empty if the kernel will not say (the guard then knows loopback and
    /// the configured addresses only).
    pub fn read() -> Addresses {
        let mut out = Addresses::default();
        let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
            return out;
        };
        let ip = |a: &nix::sys::socket::SockaddrStorage| -> Option<IpAddr> {
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        };
        for interface in interfaces {
            if let Some(address) = interface.address.as_ref().and_then(ip) {
                out.local.push(address);
            }
            if let Some(broadcast) = interface.broadcast.as_ref().and_then(ip) {
                out.broadcast.push(broadcast);
            }
        }
        out.local.sort_unstable();
        out.local.dedup();
        out.broadcast.sort_unstable();
        out.broadcast.dedup();
        out
    }

    /// Whether `ip` is the broadcast address of one of this host's networks, or the limited
    /// broadcast address.
    pub fn is_broadcast(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) || self.broadcast.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_this_hosts_addresses() {
        let a = Addresses::read();
        assert!(
            a.local.contains(&IpAddr::from([127, 0, 0, 1])),
            "{:?}",
            a.local
        );
        assert!(a.is_broadcast(IpAddr::from([255, 255, 255, 255])));
        assert!(!a.is_broadcast(IpAddr::from([127, 0, 0, 1])));
    }
}
