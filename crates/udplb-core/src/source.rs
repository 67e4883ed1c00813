//! Sources that can never be a client: where a reply would come back to udplb itself (one of
//! its own listener addresses, or a backend's), or that no real host sends from.
//!
//! Owns: [`SourceGuard`], built with each snapshot from the listeners, every pool's backends
//! and this host's addresses (which the control plane reads: the core reads nothing), and
//! asked once per **new** flow. A datagram forged with udplb's own listener address as its
//! source would otherwise be answered to that listener, which takes the answer for a new
//! client's datagram: a forwarding loop through a backend that only a restart stops. One
//! forged with a backend's address makes that backend answer udplb's "reply" (an echo service
//! answers anything), the same loop one step longer.
//! Must not: allocate per lookup, or decide anything but "never a client".

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

/// The addresses a new flow's client must not have.
#[derive(Clone, Debug, Default)]
pub struct SourceGuard {
    /// Listeners bound to one address.
    listeners: HashSet<SocketAddr>,
    /// Ports of listeners bound to a wildcard address: any of this host's addresses of the
    /// family, with such a port, is the listener's.
    wildcard_ports_v4: Vec<u16>,
    wildcard_ports_v6: Vec<u16>,
    /// This host's addresses (loopback ranges count without being listed).
    local: HashSet<IpAddr>,
    /// Every backend of every pool.
    backends: HashSet<SocketAddr>,
}

impl SourceGuard {
    /// The guard for `listeners` (as bound), `backends` and this host's addresses `local`.
    pub fn new(
        listeners: impl IntoIterator<Item = SocketAddr>,
        backends: impl IntoIterator<Item = SocketAddr>,
        local: impl IntoIterator<Item = IpAddr>,
    ) -> SourceGuard {
        let mut guard = SourceGuard {
            local: local.into_iter().map(canonical).collect(),
            backends: backends.into_iter().collect(),
            ..SourceGuard::default()
        };
        for l in listeners {
            match (l.ip().is_unspecified(), l.is_ipv4()) {
                (true, true) => guard.wildcard_ports_v4.push(l.port()),
                (true, false) => guard.wildcard_ports_v6.push(l.port()),
                (false, _) => {
                    guard.listeners.insert(l);
                }
            }
        }
        guard
    }

    /// Whether `addr` is one of udplb's own listener addresses (a datagram sent there comes
    /// back to udplb).
    pub fn is_listener(&self, addr: SocketAddr) -> bool {
        if self.listeners.contains(&addr) {
            return true;
        }
        let ports = if addr.is_ipv4() {
            &self.wildcard_ports_v4
        } else {
            &self.wildcard_ports_v6
        };
        ports.contains(&addr.port()) && self.is_local(addr.ip())
    }

    /// Whether a datagram from `source` can never be a client's: port 0, an address no host
    /// sends from (unspecified, multicast, broadcast), an IPv4-mapped IPv6 address (udplb's
    /// IPv6 listeners are IPv6-only: an IPv4 client never arrives in that form, so one that
    /// does is forged to slip past IPv4 access rules), one of udplb's own listener addresses,
    /// or a backend's address.
    #[inline]
    pub fn refuses(&self, source: SocketAddr) -> bool {
        let ip = source.ip();
        source.port() == 0
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
            || matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
            || self.backends.contains(&source)
            || self.is_listener(source)
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.contains(&canonical(ip))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn guard() -> SourceGuard {
        SourceGuard::new(
            [a("127.0.0.1:5300"), a("0.0.0.0:53"), a("[::]:53")],
            [a("10.0.0.1:53"), a("[2001:db8::1]:53")],
            ["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()],
        )
    }

    #[test]
    fn own_listener_addresses_are_refused_as_sources() {
        let g = guard();
        for own in [
            "127.0.0.1:5300",
            "192.0.2.7:53",
            "127.0.0.1:53",
            "127.9.9.9:53",
            "[2001:db8::7]:53",
            "[::1]:53",
        ] {
            assert!(g.refuses(a(own)), "{own}");
            assert!(g.is_listener(a(own)), "{own}");
        }
        // Another host with the listener's port, or this host with another port, is a client.
        for client in [
            "192.0.2.8:53",
            "127.0.0.2:5300",
            "192.0.2.7:5300",
            "[2001:db8::8]:53",
            "127.0.0.1:40000",
        ] {
            assert!(!g.refuses(a(client)), "{client}");
        }
    }

    #[test]
    fn backends_port_zero_and_impossible_addresses_are_refused() {
        let g = guard();
        for bad in [
            "10.0.0.1:53",
            "[2001:db8::1]:53",
            "198.51.100.1:0",
            "0.0.0.0:1234",
            "[::]:1234",
            "224.0.0.1:1234",
            "[ff02::1]:1234",
            "255.255.255.255:1234",
            "[::ffff:10.1.2.3]:1234",
        ] {
            assert!(g.refuses(a(bad)), "{bad}");
        }
        // The backend's address with another port is someone else (a client on that host).
        assert!(!g.refuses(a("10.0.0.1:40000")));
        assert!(!g.is_listener(a("10.0.0.1:53")));
    }
}
