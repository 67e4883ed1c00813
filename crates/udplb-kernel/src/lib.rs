//! udplb's kernel data plane: the eBPF program of `bpf/udplb.bpf.c`, attached at tc ingress of
//! the balancer's interfaces, forwards the datagrams of the kernel listeners to their
//! backends in the kernel (LVS-NAT: the destination rewritten, the client's address kept;
//! masquerade: the source rewritten too, to a balancer address and port; or direct server
//! return: encapsulated IP in IP, untouched) and rewrites the backends' replies to come from
//! the listener's address. [`Decap`] is the backends' side of direct server return.
//!
//! Owns: loading and attaching the program (aya), the layout of its maps (mirrored here), and
//! turning udplb's view of each kernel listener ([`Service`]: its backends, which keep flows,
//! the pool's Maglev table) into map updates that move no established flow: each backend keeps
//! the slot it got first for as long as it is in the pool, and only table entries that changed
//! are written.
//! Must not: decide placement or health (udplb's core does; the program indexes the table
//! the core built), or touch datagrams in user space.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub mod census;
#[cfg(test)]
mod placement_constant;

/// Kernel listeners at most.
pub const MAX_SERVICES: usize = 16;
/// Backends per kernel listener at most.
pub const MAX_BACKENDS: usize = 256;
/// The Maglev table's size (udplb_core::maglev::MIN_TABLE_SIZE, the size for ≤ 655 backends).
pub const RING_SIZE: usize = 65_537;
/// Datagram mode's round-robin schedule, at most.
pub const SCHEDULE_MAX: usize = 16_384;

/// Entries of a per-client map no kernel listener uses (the IPv6 maps without an IPv6
/// listener, the masquerade maps without masquerade): kept small, they cost little locked
/// memory.
pub const UNUSED_MAP_ENTRIES: u32 = 1024;

/// Flows per bucket of the program's flow tables (`FLOW_WAYS` in bpf/udplb.bpf.c).
pub const FLOW_WAYS: u32 = 4;
/// Bytes per bucket of the IPv4 and the IPv6 flow table.
pub const FLOW_BUCKET_BYTES: (u32, u32) = (128, 272);

/// The entries of the program's per-client maps (preallocated, so locked memory): the flow
/// tables (in buckets of [`FLOW_WAYS`] flows, a power of two of them), the masquerade maps and
/// the persistence maps, per IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub flows: u32,
    pub flows6: u32,
    pub masq: u32,
    pub masq6: u32,
    pub persist: u32,
    pub persist6: u32,
}

/// What a kernel listener keeps per client, which decides the maps it needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerClient {
    /// An IPv6 listener (its maps are the IPv6 ones).
    pub ipv6: bool,
    /// It masquerades: a masquerade port per client and backend.
    pub masquerade: bool,
    /// It remembers each client's backend (persistence, or IP affinity).
    pub remembers: bool,
    /// Its `max_flows`.
    pub max_flows: u32,
}

impl MapSizes {
    /// Per IP family, the `max_flows` of the listeners of that family summed, in each map
    /// they use; [`UNUSED_MAP_ENTRIES`] in the others. A flow table gets a bucket per flow
    /// (rounded up to a power of two), so that it is at most a quarter full with that many
    /// flows and a flow finds its bucket of [`FLOW_WAYS`] full (and takes the slot idle
    /// longest) rarely. The masquerade and persistence maps count only the listeners that
    /// masquerade or remember clients.
    pub fn for_listeners(listeners: impl IntoIterator<Item = PerClient>) -> Self {
        // Per family: flows, masquerade entries, persistence entries (0: unused).
        let mut sums = [[0u32; 3]; 2];
        for l in listeners {
            let sum = &mut sums[usize::from(l.ipv6)];
            let add = |n: &mut u32| *n = n.saturating_add(l.max_flows.max(1));
            add(&mut sum[0]);
            if l.masquerade {
                add(&mut sum[1]);
            }
            if l.remembers {
                add(&mut sum[2]);
            }
        }
        let entries = |n: u32| n.max(UNUSED_MAP_ENTRIES);
        let buckets = |n: u32| entries(n).checked_next_power_of_two().unwrap_or(1 << 31);
        let [v4, v6] = sums;
        MapSizes {
            flows: buckets(v4[0]),
            flows6: buckets(v6[0]),
            masq: entries(v4[1]),
            masq6: entries(v6[1]),
            persist: entries(v4[2]),
            persist6: entries(v6[2]),
        }
    }

    /// The flow tables' bytes (IPv4 and IPv6; locked memory).
    pub fn flow_table_bytes(&self) -> u64 {
        u64::from(self.flows) * u64::from(FLOW_BUCKET_BYTES.0)
            + u64::from(self.flows6) * u64::from(FLOW_BUCKET_BYTES.1)
    }

    /// Each map's name in the program and its entries.
    pub fn by_name(&self) -> [(&'static str, u32); 6] {
        [
            ("flows", self.flows),
            ("flows6", self.flows6),
            ("masq", self.masq),
            ("masq6", self.masq6),
            ("persist", self.persist),
            ("persist6", self.persist6),
        ]
    }
}

/// Why the kernel data plane cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not built into this udplb (clang was missing when it was built)")]
    NotBuilt,
    #[error("loading the eBPF program: {0}")]
    Load(String),
    #[error("attaching to interface {interface}: {why}")]
    Attach { interface: String, why: String },
    #[error("updating the eBPF maps: {0}")]
    Update(String),
    #[error("{0}")]
    Limit(String),
}

/// One kernel listener as udplb sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The listener's address (IPv4 or IPv6; its backends are of the same family).
    pub addr: SocketAddr,
    /// Datagram mode: every datagram placed anew (by `schedule`), no flow state.
    pub datagram: bool,
    /// Affinity `ip`: the client's address alone is hashed.
    pub by_ip: bool,
    /// A flow idle this long is placed anew.
    pub idle: Duration,
    /// Persistence: a client returns to the backend it last used (while that takes new
    /// clients) for this long after the idle timeout; `None`: off.
    pub persistence: Option<Duration>,
    /// The pool's backends, in pool order.
    pub backends: Vec<Backend>,
    /// The pool's Maglev table as positions in `backends` (empty: none takes new flows).
    pub ring: Vec<u32>,
    /// The round-robin schedule (datagram mode) as positions in `backends`.
    pub schedule: Vec<u32>,
    /// Clients served (networks; empty: every client `deny` does not name).
    pub allow: Vec<(IpAddr, u8)>,
    /// Clients refused (deny wins over allow).
    pub deny: Vec<(IpAddr, u8)>,
    /// How the datagrams reach the backends.
    pub method: Method,
    /// Rate limits per client address and prefix (`None`: none).
    pub limits: Option<Limits>,
    /// Replied payload bytes per byte a flow's client sent, at most (`None`: unlimited).
    pub reply_ratio: Option<u32>,
    /// `[sync]` (flow mode): its new flows are told to udplb for the peers
    /// ([`NewFlows`]), and a new flow opens where a peer had it if udplb learned that
    /// ([`Kernel::learn`]) at most this long ago; `None`: off.
    pub sync: Option<Duration>,
}

impl Service {
    /// Per backend, whether new clients may be placed on it: it is in the Maglev table (in
    /// datagram mode, the schedule).
    pub fn takers(&self) -> Vec<bool> {
        let mut takes = vec![false; self.backends.len()];
        let placed = if self.datagram {
            &self.schedule
        } else {
            &self.ring
        };
        for &at in placed {
            if let Some(t) = takes.get_mut(at as usize) {
                *t = true;
            }
        }
        takes
    }
}

/// A kernel listener's rate limits (udplb's `[listeners.NAME.limits]`): per second, 0 is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub datagrams_per_source: u32,
    pub datagrams_per_prefix: u32,
    pub new_flows_per_source: u32,
    pub new_flows_per_prefix: u32,
    /// The prefix length of the per-prefix limits, for IPv4 and IPv6 clients.
    pub prefix_len: u8,
    pub prefix6_len: u8,
    /// Where the listener's cells start in the program's table (from [`limit_cells`] of the
    /// listeners before it), and how many per row (a power of two).
    pub first_cell: u32,
    pub cells: u32,
}

/// The cells per row of one limiter for `cells` configured (rounded up to a power of two, at
/// least 64, as the socket path's limiters).
pub fn cells_per_row(cells: usize) -> u32 {
    cells.clamp(64, 1 << 24).next_power_of_two() as u32
}

/// The cells one listener's limits take in the program's table, for `cells` configured.
pub fn limit_cells(cells: usize) -> u32 {
    LIMITERS * 2 * cells_per_row(cells)
}

/// Limiters per listener: datagrams and new flows, per source and per prefix.
pub const LIMITERS: u32 = 4;

/// How a kernel listener's datagrams reach its backends (the pool's `forwarding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// LVS-NAT: the destination rewritten, the client's address kept.
    #[default]
    Nat,
    /// The source rewritten too, to a balancer address and a port of `first..=last`.
    Masquerade { first: u16, last: u16 },
    /// Direct server return: the datagram untouched, encapsulated IP in IP, or in UDP to
    /// `gue_port` (GUE) when there is one.
    Dsr { gue_port: Option<u16> },
}

impl Method {
    /// The name udplb's configuration gives it (`forwarding`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Nat => "nat",
            Method::Masquerade { .. } => "masquerade",
            Method::Dsr { .. } => "dsr",
        }
    }

    /// How dsr encapsulates, as udplb's configuration says it (`encapsulation`, with the port
    /// for GUE); `None` for the other methods.
    pub fn encapsulation(self) -> Option<String> {
        match self {
            Method::Dsr { gue_port: None } => Some("ipip".to_string()),
            Method::Dsr {
                gue_port: Some(port),
            } => Some(format!("gue {port}")),
            _ => None,
        }
    }
}

/// A backend of a kernel listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    /// An established flow stays on it (up, or draining).
    pub keeps_flows: bool,
    /// On this host (one of its addresses): masquerade reaches it through loopback.
    pub local: bool,
}

/// Traffic of one backend through the kernel data plane, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// ICMP errors about datagrams sent to the backend (a closed port, say): passive failures.
    pub icmp_errors: u64,
    /// New flows (in datagram mode, datagrams) persistence sent back to the backend.
    pub persisted: u64,
    /// Flows placed on the backend (flow mode).
    pub flows: u64,
}

/// What the program did not forward, by reason, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// No backend takes new flows.
    pub no_backend: u64,
    /// The TTL ran out.
    pub ttl: u64,
    /// No route to the backend or the client.
    pub no_route: u64,
    /// The datagram could not be rewritten.
    pub rewrite: u64,
    /// IP fragments, left to the stack (udplb's sockets).
    pub fragments_passed: u64,
    /// Refused by the listener's allow and deny lists.
    pub denied: u64,
    /// Claimed a backend's address but came from the clients' side: not rewritten (left to
    /// the stack).
    pub forged: u64,
    /// Masquerade: every port tried for a new client was another's.
    pub no_port: u64,
    /// Direct server return: encapsulated, the datagram would exceed the route's MTU.
    pub too_big: u64,
    /// Over a per-source or per-prefix datagram limit.
    pub rate_limited: u64,
    /// Over a per-source or per-prefix new-flow limit.
    pub flow_rate_limited: u64,
    /// Too big for the route onward, without DF: rewritten and handed to the stack, which
    /// forwards it fragmented (IPv4).
    pub oversize_passed: u64,
    /// Direct server return: without DF, too big once encapsulated, so cut into IP fragments
    /// that fit before encapsulation (IPv4; once per cut).
    pub cut_for_tunnel: u64,
    /// Replies beyond their flow's reply ratio, or to no flow, on a listener with one.
    pub amplification: u64,
    /// Not a drop: new flows that took the place of a flow not idle (their bucket of the flow
    /// table full, the table too small for the flows).
    pub flows_replaced: u64,
    /// Not a drop: new flows opened on the backend a peer instance had them on (`[sync]`).
    pub sync_used: u64,
    /// Not a drop: new flows not told to udplb for the peers (the program's queue was full).
    pub sync_not_queued: u64,
    /// Replies (`nat`) to a wildcard listener's client whose flow is gone: the address the
    /// client sent to, which the reply must come from, is no longer known.
    pub flow_gone: u64,
}

/// Whether this udplb was built with the program.
pub fn built() -> bool {
    cfg!(udplb_bpf)
}

#[cfg(udplb_bpf)]
mod loaded;
#[cfg(udplb_bpf)]
pub use loaded::{Decap, FlowCount, Kernel, NewFlows};

/// Without the program, a kernel data plane that never loads.
#[cfg(not(udplb_bpf))]
pub struct Kernel(());

#[cfg(not(udplb_bpf))]
impl Kernel {
    pub fn load(
        _sizes: MapSizes,
        _limit_cells: u32,
        _peer_flows: (u32, u32),
        _pin_dir: Option<&std::path::Path>,
    ) -> Result<Kernel, Error> {
        Err(Error::NotBuilt)
    }
    pub fn take_new_flows(&mut self) -> Option<NewFlows> {
        None
    }
    pub fn learn(&mut self, _id: usize, _client: SocketAddr, _backend: SocketAddr) -> bool {
        false
    }
    pub fn peer_flow(&self, _id: usize, _client: SocketAddr) -> Option<SocketAddr> {
        None
    }
    pub fn attach(&mut self, _interfaces: &[String]) -> Result<(), Error> {
        Err(Error::NotBuilt)
    }
    pub fn update(&mut self, _services: &[Service]) -> Result<(), Error> {
        Err(Error::NotBuilt)
    }
    pub fn set_locals(&mut self, _addrs: &[IpAddr]) -> Result<(), Error> {
        Err(Error::NotBuilt)
    }
    pub fn traffic(&self, _service: usize) -> Vec<(SocketAddr, Traffic)> {
        Vec::new()
    }
    pub fn drops(&self) -> Drops {
        Drops::default()
    }
    pub fn attached(&self) -> Vec<String> {
        Vec::new()
    }
    pub fn flow_count(&self) -> FlowCount {
        FlowCount(())
    }
    pub fn remembered(&self, _id: usize, _client: SocketAddr) -> Option<SocketAddr> {
        None
    }
    pub fn flow_of(&self, _id: usize, _client: SocketAddr) -> Option<(SocketAddr, Duration)> {
        None
    }
}

/// Without the program, a count of no flows.
#[cfg(not(udplb_bpf))]
pub struct FlowCount(());

/// Without the program, no new flows.
#[cfg(not(udplb_bpf))]
pub struct NewFlows(());

#[cfg(not(udplb_bpf))]
impl NewFlows {
    pub fn drain(&mut self, _out: &mut Vec<(usize, SocketAddr, SocketAddr)>) {}
}

#[cfg(not(udplb_bpf))]
impl FlowCount {
    pub fn run(&self) -> census::FlowCensus {
        census::FlowCensus::new(MAX_SERVICES, (0, 0))
    }
    pub fn synced_flows(
        &self,
        _part: usize,
        _parts: usize,
        _out: &mut Vec<(usize, SocketAddr, SocketAddr)>,
    ) {
    }
}

/// Without the program, a decapsulation that never loads.
#[cfg(not(udplb_bpf))]
pub struct Decap(());

#[cfg(not(udplb_bpf))]
impl Decap {
    pub fn attach(
        _interfaces: &[String],
        _balancers: &[IpAddr],
        _gue_ports: &[u16],
    ) -> Result<Decap, Error> {
        Err(Error::NotBuilt)
    }
    pub fn counts(&self) -> (u64, u64, u64) {
        (0, 0, 0)
    }
}

/// Per service, the slot each backend address holds (kept while the address is in the pool,
/// so that a flow's backend index keeps naming the same backend across updates).
/// (Without the program, only its unit tests use it.)
#[derive(Debug, Default)]
#[cfg_attr(not(udplb_bpf), allow(dead_code))]
struct Slots {
    by_addr: HashMap<SocketAddr, u32>,
}

#[cfg_attr(not(udplb_bpf), allow(dead_code))]
impl Slots {
    /// The slot of every backend of `backends` (a new address takes the lowest free slot; an
    /// address no longer there frees its slot). `None` when more than [`MAX_BACKENDS`].
    fn assign(&mut self, backends: &[Backend]) -> Option<Vec<u32>> {
        self.by_addr
            .retain(|addr, _| backends.iter().any(|b| b.addr == *addr));
        let mut used: Vec<bool> = vec![false; MAX_BACKENDS];
        for &s in self.by_addr.values() {
            used[s as usize] = true;
        }
        let mut out = Vec::with_capacity(backends.len());
        for b in backends {
            let slot = match self.by_addr.get(&b.addr) {
                Some(&s) => s,
                None => {
                    let s = used.iter().position(|u| !u)? as u32;
                    used[s as usize] = true;
                    self.by_addr.insert(b.addr, s);
                    s
                }
            };
            out.push(slot);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
    use udplb_core::hash::ClientKey;
    use udplb_core::model::Affinity;

    /// The program's placement hash (bpf/udplb.bpf.c `placement_hash`), in Rust.
    fn program_hash(first: u32, last: u32, len: u64) -> u64 {
        let bitflip = placement_constant::bitflip(udplb_core::hash::PLACEMENT_SEED);
        let mut h = (u64::from(last) + (u64::from(first) << 32)) ^ bitflip;
        h ^= h.rotate_left(49) ^ h.rotate_left(24);
        h = h.wrapping_mul(0x9FB2_1C65_1E98_DF25);
        h ^= (h >> 35) + len;
        h = h.wrapping_mul(0x9FB2_1C65_1E98_DF25);
        h ^ (h >> 28)
    }

    /// The program's slot of a hash (`slot_of`), in Rust.
    fn program_slot(h: u64, n: u64) -> u64 {
        let lo = (h & 0xffff_ffff) * n;
        let hi = (h >> 32) * n;
        (hi + (lo >> 32)) >> 32
    }

    #[test]
    fn the_program_hashes_a_client_as_udplb_does() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ip = Ipv4Addr::from((x >> 16) as u32);
            let port = x as u16;
            let client = SocketAddr::new(IpAddr::V4(ip), port);
            // As the program reads them: the address and the port in network order, loaded
            // little-endian.
            let addr = u32::from_le_bytes(ip.octets());
            let port_raw = u16::from_le_bytes(port.to_be_bytes());
            let by_port = program_hash(addr, (addr >> 16) | (u32::from(port_raw) << 16), 6);
            assert_eq!(
                by_port,
                ClientKey::of(&client, Affinity::IpPort).0,
                "{client}"
            );
            let by_ip = program_hash(addr, addr, 4);
            assert_eq!(by_ip, ClientKey::of(&client, Affinity::Ip).0, "{client}");
            let n = RING_SIZE as u64;
            assert_eq!(
                program_slot(by_port, n),
                ((u128::from(by_port) * u128::from(n)) >> 64) as u64
            );
        }
    }

    /// xxh3's mul128_fold64 as the program computes it (from 32-bit products).
    fn program_fold(a: u64, b: u64) -> u64 {
        let (a_lo, a_hi, b_lo, b_hi) = (a & 0xffff_ffff, a >> 32, b & 0xffff_ffff, b >> 32);
        let (ll, lh, hl, hh) = (a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi);
        let cross = (ll >> 32) + (lh & 0xffff_ffff) + hl;
        let high = hh + (lh >> 32) + (cross >> 32);
        let low = (cross << 32) | (ll & 0xffff_ffff);
        low ^ high
    }

    fn program_avalanche(mut h: u64) -> u64 {
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }

    /// The program's `placement_hash6` and `placement_hash6_port` (bpf/ipv6.h), in Rust: `w`
    /// the address's words as the program loads them (little-endian), `port` the port's.
    fn program_hash6(w: [u32; 4], port: Option<u16>) -> u64 {
        let seed = udplb_core::hash::PLACEMENT_SEED;
        let w0 = (u64::from(w[1]) << 32) | u64::from(w[0]);
        let w1 = (u64::from(w[3]) << 32) | u64::from(w[2]);
        match port {
            None => {
                let [f1, f2] = placement_constant::flips_9to16(seed);
                let (lo, hi) = (w0 ^ f1, w1 ^ f2);
                program_avalanche(
                    16u64
                        .wrapping_add(lo.swap_bytes())
                        .wrapping_add(hi)
                        .wrapping_add(program_fold(lo, hi)),
                )
            }
            Some(port) => {
                let [m0, m1, m2, m3] = placement_constant::mixes_17to32(seed);
                let x0 = (w0 >> 16) | (w1 << 48);
                let x1 = (w1 >> 16) | (u64::from(port) << 48);
                let acc = 18u64
                    .wrapping_mul(0x9E37_79B1_85EB_CA87)
                    .wrapping_add(program_fold(w0 ^ m0, w1 ^ m1))
                    .wrapping_add(program_fold(x0 ^ m2, x1 ^ m3));
                program_avalanche(acc)
            }
        }
    }

    #[test]
    fn only_the_maps_a_listener_uses_take_max_flows() {
        let none = UNUSED_MAP_ENTRIES;
        let ipv4 = PerClient {
            max_flows: 100_000,
            ..PerClient::default()
        };
        let ipv6 = PerClient { ipv6: true, ..ipv4 };
        let masquerade = |l: PerClient| PerClient {
            masquerade: true,
            ..l
        };
        let remembers = |l: PerClient| PerClient {
            remembers: true,
            ..l
        };
        assert_eq!(
            MapSizes::for_listeners([ipv4]),
            MapSizes {
                flows: 131_072,
                flows6: none,
                masq: none,
                masq6: none,
                persist: none,
                persist6: none,
            }
        );
        assert_eq!(
            MapSizes::for_listeners([masquerade(ipv4), remembers(ipv6)]),
            MapSizes {
                flows: 131_072,
                flows6: 131_072,
                masq: 100_000,
                masq6: none,
                persist: none,
                persist6: 100_000,
            }
        );
        assert_eq!(
            MapSizes::for_listeners([remembers(masquerade(PerClient {
                max_flows: 10,
                ..ipv6
            }))]),
            MapSizes {
                flows: none,
                flows6: none,
                masq: none,
                masq6: none,
                persist: none,
                persist6: none,
            }
        );
    }

    #[test]
    fn each_family_sums_only_its_own_listeners() {
        let listener = |ipv6, masquerade, max_flows| PerClient {
            ipv6,
            masquerade,
            remembers: false,
            max_flows,
        };
        // Two IPv4 listeners (one masquerading) and one IPv6 listener of a million flows.
        let sizes = MapSizes::for_listeners([
            listener(false, true, 300_000),
            listener(false, false, 300_000),
            listener(true, false, 1_000_000),
        ]);
        assert_eq!(
            (sizes.flows, sizes.flows6, sizes.masq, sizes.masq6),
            (1 << 20, 1 << 20, 300_000, UNUSED_MAP_ENTRIES)
        );
        let huge = MapSizes::for_listeners([listener(false, false, u32::MAX)]);
        assert_eq!(huge.flows, 1 << 31, "at most 2^31 buckets, no overflow");
    }

    #[test]
    fn the_program_hashes_an_ipv6_client_as_udplb_does() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..10_000 {
            let (a, b) = (next(), next());
            let ip = Ipv6Addr::from((u128::from(a) << 64) | u128::from(b));
            if ip.to_ipv4_mapped().is_some() {
                continue;
            }
            let port = next() as u16;
            let client = SocketAddr::new(IpAddr::V6(ip), port);
            let o = ip.octets();
            let w: [u32; 4] = std::array::from_fn(|i| {
                u32::from_le_bytes(o[4 * i..4 * i + 4].try_into().unwrap())
            });
            let port_raw = u16::from_le_bytes(port.to_be_bytes());
            assert_eq!(
                program_hash6(w, Some(port_raw)),
                ClientKey::of(&client, Affinity::IpPort).0,
                "{client}"
            );
            assert_eq!(
                program_hash6(w, None),
                ClientKey::of(&client, Affinity::Ip).0,
                "{client}"
            );
        }
        // The 128-bit fold, against u128.
        for _ in 0..10_000 {
            let (a, b) = (next(), next());
            let p = u128::from(a) * u128::from(b);
            assert_eq!(program_fold(a, b), (p as u64) ^ ((p >> 64) as u64));
        }
    }

    fn backend(last: u8) -> Backend {
        Backend {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 53).into(),
            keeps_flows: true,
            local: false,
        }
    }

    #[test]
    fn a_backend_keeps_its_slot_while_it_stays_in_the_pool() {
        let mut slots = Slots::default();
        assert_eq!(
            slots.assign(&[backend(1), backend(2), backend(3)]),
            Some(vec![0, 1, 2])
        );
        // 1 removed, 4 added before 2: 2 and 3 keep theirs, 4 takes the freed slot.
        assert_eq!(
            slots.assign(&[backend(4), backend(2), backend(3)]),
            Some(vec![0, 1, 2])
        );
        assert_eq!(slots.assign(&[backend(3), backend(2)]), Some(vec![2, 1]));
        let many: Vec<Backend> = (0..=255u8)
            .flat_map(|a| (0..2u16).map(move |p| (a, p)))
            .map(|(a, p)| Backend {
                addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, a), p).into(),
                keeps_flows: true,
                local: false,
            })
            .collect();
        assert_eq!(slots.assign(&many), None);
    }
}
