//! Access control: which client addresses a listener serves.
//!
//! Owns: [`Cidr`] (parsed from `"10.0.0.0/8"`, `"2001:db8::/32"` or a bare address),
//! [`CidrSet`] (sorted, merged ranges searched in O(log n)) and [`Acl`] (allow and deny
//! lists: deny wins, an empty allow list allows everything not denied). IPv4 addresses live in
//! the IPv4-mapped IPv6 range (`::ffff:0:0/96`), so one search covers both families and a
//! dual-stack listener's mapped clients match IPv4 rules.
//! Must not: allocate per lookup (the data plane checks every datagram).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// A network: an address and a prefix length, stored in the unified IPv6 space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// First address of the network (host bits zero), in the unified space.
    first: u128,
    /// Prefix length in the unified space (an IPv4 /n is n + 96).
    prefix: u8,
}

impl Cidr {
    /// The inclusive range of unified addresses the network covers.
    fn range(self) -> (u128, u128) {
        (self.first, self.first | host_mask(self.prefix))
    }

    /// Whether `ip` is in the network.
    pub fn contains(self, ip: IpAddr) -> bool {
        let (lo, hi) = self.range();
        (lo..=hi).contains(&unified(ip))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = Ipv6Addr::from(self.first);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.prefix >= 96 => write!(f, "{v4}/{}", self.prefix - 96),
            _ => write!(f, "{v6}/{}", self.prefix),
        }
    }
}

/// Why a string is not a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrError(String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| CidrError(format!("{addr:?} is not an IP address")))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            None => max,
            Some(l) => l
                .parse()
                .map_err(|_| CidrError(format!("{l:?} is not a prefix length")))?,
        };
        if len > max {
            return Err(CidrError(format!("prefix length {len} is above {max}")));
        }
        let prefix = if ip.is_ipv4() { len + 96 } else { len };
        let first = unified(ip);
        let network = Cidr {
            first: first & !host_mask(prefix),
            prefix,
        };
        if network.first != first {
            return Err(CidrError(format!(
                "host bits set beyond the prefix, did you mean {network}?"
            )));
        }
        Ok(network)
    }
}

/// The address in the unified space: IPv4 (and IPv4-mapped IPv6) as `::ffff:a.b.c.d`.
#[inline]
pub fn unified(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address `ip` stands for: IPv4-mapped IPv6 addresses as IPv4.
#[inline]
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn host_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)
}

/// A set of networks as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrSet {
    ranges: Vec<(u128, u128)>,
}

impl CidrSet {
    /// The union of `networks`.
    pub fn new(networks: &[Cidr]) -> CidrSet {
        let mut all: Vec<(u128, u128)> = networks.iter().map(|c| c.range()).collect();
        all.sort_unstable();
        let mut ranges: Vec<(u128, u128)> = Vec::with_capacity(all.len());
        for (lo, hi) in all {
            match ranges.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => ranges.push((lo, hi)),
            }
        }
        CidrSet { ranges }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The IPv4 part of the set as the fewest networks (address, prefix length) that cover
    /// exactly it: what a longest-prefix-match table needs.
    pub fn ipv4_networks(&self) -> Vec<(std::net::Ipv4Addr, u8)> {
        const MAPPED: u128 = 0xffff_0000_0000;
        let (v4_lo, v4_hi) = (MAPPED, MAPPED | 0xffff_ffff);
        let mut out = Vec::new();
        for &(lo, hi) in &self.ranges {
            if hi < v4_lo || lo > v4_hi {
                continue;
            }
            let mut lo = (lo.max(v4_lo) - MAPPED) as u64;
            let hi = (hi.min(v4_hi) - MAPPED) as u64;
            while lo <= hi {
                // The largest aligned block at `lo` that stays within `hi`.
                let mut size = if lo == 0 {
                    1u64 << 32
                } else {
                    1u64 << lo.trailing_zeros()
                };
                while lo + size - 1 > hi {
                    size >>= 1;
                }
                out.push((
                    std::net::Ipv4Addr::from(lo as u32),
                    32 - size.trailing_zeros() as u8,
                ));
                lo += size;
            }
        }
        out
    }

    /// The IPv6 part of the set (IPv4-mapped addresses are IPv4's) as the fewest networks that
    /// cover exactly it.
    pub fn ipv6_networks(&self) -> Vec<(std::net::Ipv6Addr, u8)> {
        const MAPPED: u128 = 0xffff_0000_0000;
        let (v4_lo, v4_hi) = (MAPPED, MAPPED | 0xffff_ffff);
        let mut out = Vec::new();
        for &(lo, hi) in &self.ranges {
            // Each range less the IPv4-mapped block: at most two pieces.
            let below = (lo < v4_lo).then(|| (lo, hi.min(v4_lo - 1)));
            let above = (hi > v4_hi).then(|| (lo.max(v4_hi + 1), hi));
            for (lo, hi) in below.into_iter().chain(above) {
                cover(lo, hi, &mut out);
            }
        }
        out
    }

    /// Whether `ip` is in one of the networks (binary search, no allocation).
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let x = unified(ip);
        let i = self.ranges.partition_point(|&(lo, _)| lo <= x);
        i > 0 && x <= self.ranges[i - 1].1
    }
}

/// Adds to `out` the fewest IPv6 networks that cover exactly `lo..=hi`.
fn cover(mut lo: u128, hi: u128, out: &mut Vec<(std::net::Ipv6Addr, u8)>) {
    loop {
        // The largest aligned block at `lo` (2^bits addresses) that stays within `hi`.
        let mut bits = lo.trailing_zeros().min(128);
        while bits > 0 && (bits == 128 || lo + ((1u128 << bits) - 1) > hi) {
            if bits == 128 && hi == u128::MAX {
                break;
            }
            bits -= 1;
        }
        out.push((std::net::Ipv6Addr::from(lo), (128 - bits) as u8));
        if bits == 128 {
            return;
        }
        match lo.checked_add(1u128 << bits) {
            Some(next) if next <= hi => lo = next,
            _ => return,
        }
    }
}

/// A listener's allow and deny lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    allow: CidrSet,
    deny: CidrSet,
}

impl Acl {
    /// Deny wins over allow; an empty `allow` allows every address `deny` does not name.
    pub fn new(allow: &[Cidr], deny: &[Cidr]) -> Acl {
        Acl {
            allow: CidrSet::new(allow),
            deny: CidrSet::new(deny),
        }
    }

    /// The allow list (empty: every address not denied is allowed).
    pub fn allow(&self) -> &CidrSet {
        &self.allow
    }

    /// The deny list.
    pub fn deny(&self) -> &CidrSet {
        &self.deny
    }

    /// No rule at all: every client is served (the caller may skip the check).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a client at `ip` is served.
    #[inline]
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ipv6_networks_cover_exactly_the_ipv6_part() {
        let nets = |list: &[&str]| -> Vec<String> {
            CidrSet::new(&cidrs(list))
                .ipv6_networks()
                .iter()
                .map(|(a, p)| format!("{a}/{p}"))
                .collect()
        };
        assert_eq!(
            nets(&["10.0.0.0/8", "2001:db8::/32", "2001:db8:1::1"]),
            ["2001:db8::/32"]
        );
        // Below ::ffff:0:0/96, 16 blocks (2^32 .. 2^47); above it, 80 (2^48 .. 2^127).
        assert_eq!(nets(&["::/0"]).len(), 16 + 80);
        assert!(nets(&["::/0"]).contains(&"8000::/1".to_string()));
        assert!(!nets(&["::/0"]).iter().any(|n| n.starts_with("::ffff:")));
        assert_eq!(
            nets(&["fe80::1", "fe80::2", "fe80::3"]),
            ["fe80::1/128", "fe80::2/127"]
        );
        assert!(nets(&["192.0.2.0/24"]).is_empty());
    }

    #[test]
    fn ipv4_networks_cover_exactly_the_ipv4_part() {
        let set = CidrSet::new(&cidrs(&[
            "10.0.0.0/8",
            "192.0.2.1",
            "192.0.2.2",
            "2001:db8::/32",
        ]));
        let nets: Vec<String> = set
            .ipv4_networks()
            .iter()
            .map(|(a, p)| format!("{a}/{p}"))
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.1/32", "192.0.2.2/32"]);
        // An IPv6 network that holds the IPv4-mapped range covers every IPv4 address.
        let all = CidrSet::new(&cidrs(&["::/0"]));
        assert_eq!(all.ipv4_networks(), [(Ipv4Addr::UNSPECIFIED, 0)]);
        // Ranges that do not align split into blocks.
        let odd = CidrSet::new(&cidrs(&["10.0.0.1", "10.0.0.2/31", "10.0.0.4/30"]));
        let nets: Vec<String> = odd
            .ipv4_networks()
            .iter()
            .map(|(a, p)| format!("{a}/{p}"))
            .collect();
        assert_eq!(nets, ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/30"]);
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn parses_networks_and_bare_addresses() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            "2001:db8::/32".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!("::/0".parse::<Cidr>().unwrap().to_string(), "::/0");
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        // IPv4-mapped rules are IPv4 rules.
        assert_eq!(
            "::ffff:10.0.0.0/104".parse::<Cidr>().unwrap(),
            "10.0.0.0/8".parse::<Cidr>().unwrap()
        );
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Cidr>().unwrap_err().to_string();
        assert_eq!(err("10.0.0.0/33"), "prefix length 33 is above 32");
        assert_eq!(err("::/129"), "prefix length 129 is above 128");
        assert_eq!(err("10.0.0/8"), "\"10.0.0\" is not an IP address");
        assert_eq!(err("10.0.0.0/x"), "\"x\" is not a prefix length");
        assert_eq!(
            err("10.1.2.3/8"),
            "host bits set beyond the prefix, did you mean 10.0.0.0/8?"
        );
        assert_eq!(
            err("2001:db8::1/32"),
            "host bits set beyond the prefix, did you mean 2001:db8::/32?"
        );
    }

    #[test]
    fn deny_wins_and_empty_allow_allows_the_rest() {
        let acl = Acl::new(
            &cidrs(&["10.0.0.0/8", "2001:db8::/32"]),
            &cidrs(&["10.9.0.0/16"]),
        );
        assert!(acl.permits(ip("10.1.2.3")));
        assert!(!acl.permits(ip("10.9.1.1")));
        assert!(!acl.permits(ip("192.0.2.1")));
        assert!(acl.permits(ip("2001:db8::5")));
        assert!(!acl.permits(ip("2001:db9::5")));
        let deny_only = Acl::new(&[], &cidrs(&["192.0.2.0/24"]));
        assert!(deny_only.permits(ip("198.51.100.1")));
        assert!(!deny_only.permits(ip("192.0.2.200")));
        assert!(Acl::default().is_open());
        assert!(Acl::default().permits(ip("::1")));
        assert!(!deny_only.is_open());
    }

    #[test]
    fn mapped_clients_match_ipv4_rules_and_not_ipv6_ones() {
        let acl = Acl::new(&cidrs(&["127.0.0.0/8"]), &[]);
        assert!(acl.permits(ip("::ffff:127.0.0.1")));
        assert!(!acl.permits(ip("::ffff:10.0.0.1")));
        assert!(!acl.permits(ip("::1")));
        let v6_all = Acl::new(&cidrs(&["2000::/3"]), &[]);
        assert!(!v6_all.permits(ip("::ffff:8.8.8.8")));
        let deny_mapped = Acl::new(&[], &cidrs(&["::ffff:192.0.2.0/120"]));
        assert!(!deny_mapped.permits(ip("192.0.2.9")));
        assert_eq!(canonical(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
    }

    #[test]
    fn ranges_merge_when_overlapping_or_adjacent() {
        let set = CidrSet::new(&cidrs(&[
            "10.0.1.0/24",
            "10.0.0.0/24",
            "10.0.0.0/16",
            "192.0.2.0/25",
            "192.0.2.128/25",
            "::/128",
        ]));
        assert_eq!(set.ranges.len(), 3, "{set:?}");
        assert!(set.contains(ip("192.0.2.255")));
        assert!(set.contains(ip("::")));
        assert!(!set.contains(ip("::1")));
        assert!(!set.contains(ip("10.1.0.0")));
        let everything = CidrSet::new(&cidrs(&["::/0", "10.0.0.0/8"]));
        assert_eq!(everything.ranges, vec![(0, u128::MAX)]);
    }

    /// The binary search agrees with a linear scan over random sets and addresses.
    #[test]
    fn search_matches_a_linear_scan() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let networks: Vec<Cidr> = (0..next() % 20)
                .map(|_| {
                    let r = next();
                    let a = v4(10, (r >> 8) as u8 % 4, (r >> 16) as u8, (r >> 24) as u8);
                    let len = 8 + (r % 25) as u8;
                    let first = unified(a) & !host_mask(len + 96);
                    Cidr {
                        first,
                        prefix: len + 96,
                    }
                })
                .collect();
            let set = CidrSet::new(&networks);
            for _ in 0..200 {
                let r = next();
                let a = v4(10, (r >> 8) as u8 % 4, (r >> 16) as u8, (r >> 24) as u8);
                let linear = networks.iter().any(|c| c.contains(a));
                assert_eq!(set.contains(a), linear, "{a} in {networks:?}");
            }
        }
    }
}
