//! The live flows of the kernel flow tables, counted per listener and backend, and one
//! client's flow found.
//!
//! Owns: reading one flow slot as the program lays it out (`struct flow_slot` and
//! `struct flow6_slot`), judging whether it holds a live flow of a kernel listener, adding
//! the live ones up, the program's seeded bucket hash mirrored (which bucket a flow's key
//! is in), and reading a new flow the program tells for the peers (`struct new_flow`).
//! Must not: map or read the tables' memory (the loaded program's side hands each slot's bytes
//! here, read consistently), nor change a slot: the program alone writes them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `FLOW_TIME_SHIFT`: a slot's `last` is the monotonic clock's nanoseconds shifted by this.
pub const FLOW_TIME_SHIFT: u32 = 20;
/// Bytes of one IPv4 and one IPv6 slot (`FLOW_BUCKET_BYTES` / `FLOW_WAYS`).
pub const SLOT_BYTES: (usize, usize) = (32, 68);
/// Where a slot's `word` (its version and its backend's port) is, in each family's slot.
pub const WORD_AT: (usize, usize) = (12, 36);
/// A slot's version, in its word: odd while a CPU writes the slot.
pub const VERSION_ONE: u32 = 1 << 16;

/// A kernel listener as the census matches slots to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    /// The listener's address: a slot names it as its service.
    pub addr: SocketAddr,
    /// Its idle timeout in flow time units (`idle_ns >> FLOW_TIME_SHIFT`).
    pub idle: u32,
    /// Datagram mode: its slots only mark local clients, they are no flows.
    pub datagram: bool,
}

/// The live flows found, per listener (by its place in the listeners counted) and backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCensus {
    pub per_listener: Vec<HashMap<SocketAddr, u64>>,
    /// The slots of the IPv4 and of the IPv6 table (buckets × ways).
    pub slots: (u64, u64),
}

impl FlowCensus {
    /// An empty census of `listeners` listeners, over tables of `slots`.
    pub fn new(listeners: usize, slots: (u64, u64)) -> FlowCensus {
        FlowCensus {
            per_listener: vec![HashMap::new(); listeners],
            slots,
        }
    }

    /// Live flows of listener `id`, over its backends.
    pub fn of_listener(&self, id: usize) -> u64 {
        self.per_listener.get(id).map_or(0, |m| m.values().sum())
    }

    /// Counts `slot` (one slot's bytes, read while its version stayed even) if it holds a live
    /// flow of one of `listeners` at flow time `now`.
    pub fn count(&mut self, listeners: &Matcher, slot: &[u8], now: u32) {
        if let Some((id, backend)) = listeners.live_flow(slot, now)
            && let Some(m) = self.per_listener.get_mut(id)
        {
            *m.entry(backend).or_default() += 1;
        }
    }
}

/// The listeners by the service address a slot names.
pub struct Matcher {
    by_service: HashMap<SocketAddr, (usize, Counted)>,
}

impl Matcher {
    /// The listeners counted, each with its place in the census.
    pub fn new(listeners: impl IntoIterator<Item = (usize, Counted)>) -> Matcher {
        Matcher {
            by_service: listeners
                .into_iter()
                .map(|(id, l)| (l.addr, (id, l)))
                .collect(),
        }
    }

    /// The listener (its place) and backend of the flow in `slot`, if the slot holds a live
    /// flow of a listener counted: an empty slot names no service port, a slot of a listener
    /// gone names none counted, and a flow idle beyond its listener's timeout is gone.
    fn live_flow(&self, slot: &[u8], now: u32) -> Option<(usize, SocketAddr)> {
        self.live_client_flow(slot, now)
            .map(|(id, _, backend)| (id, backend))
    }

    /// The listener (its place), client and backend of the flow in `slot`, if the slot holds
    /// a live flow of a listener counted (as the count judges it).
    pub fn live_client_flow(
        &self,
        slot: &[u8],
        now: u32,
    ) -> Option<(usize, SocketAddr, SocketAddr)> {
        let s = Slot::parse(slot)?;
        if s.service.port() == 0 {
            return None;
        }
        // A flow of a wildcard listener keeps the address its client sent to.
        let wildcard = || {
            let any = match s.service {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            self.by_service.get(&SocketAddr::new(any, s.service.port()))
        };
        let (id, l) = self.by_service.get(&s.service).or_else(wildcard)?;
        if l.datagram || !live(s.last, now, l.idle) {
            return None;
        }
        Some((*id, s.client, s.backend))
    }
}

/// Bytes of a new flow the program tells for the peers (`struct new_flow`).
pub const NEW_FLOW_BYTES: usize = 44;

/// A new flow as the program tells it (`struct new_flow`): its listener's id, client and
/// backend. `None` for anything else.
pub fn parse_new_flow(bytes: &[u8]) -> Option<(usize, SocketAddr, SocketAddr)> {
    if bytes.len() != NEW_FLOW_BYTES {
        return None;
    }
    let id = u32::from_ne_bytes(bytes[0..4].try_into().ok()?) as usize;
    let client_port = u16::from_be_bytes(bytes[4..6].try_into().ok()?);
    let backend_port = u16::from_be_bytes(bytes[6..8].try_into().ok()?);
    let family = u32::from_ne_bytes(bytes[8..12].try_into().ok()?);
    let addr = |at: usize| -> Option<IpAddr> {
        match family {
            4 => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&bytes[at..at + 4]).ok()?,
            ))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&bytes[at..at + 16]).ok()?,
            ))),
            _ => None,
        }
    };
    Some((
        id,
        SocketAddr::new(addr(12)?, client_port),
        SocketAddr::new(addr(28)?, backend_port),
    ))
}

/// Whether a flow last seen at flow time `last` is live at `now` with `idle` units of idle
/// timeout, as the program's `flow_live`. A slot written after `now` was read (its `last`
/// ahead of it) is live.
pub fn live(last: u32, now: u32, idle: u32) -> bool {
    let age = now.wrapping_sub(last) as i32;
    age <= idle as i32
}

/// murmur3's 64-bit finalizer (the program's `flow_mix`).
fn flow_mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A flow's key as the program keeps it in a slot (its first bytes), and the bucket the
/// program's seeded hash puts it in (`flow_bucket`, `flow6_bucket`): `client` and `service`
/// of one family (IPv4-mapped IPv6 addresses as IPv4).
pub fn flow_key(client: SocketAddr, service: SocketAddr, seed: u64, mask: u32) -> (Vec<u8>, u32) {
    // Addresses as the packet holds them, read as the program reads them (native words).
    let word = |b: &[u8]| u64::from(u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    let wire_port = |p: u16| u64::from(u16::from_ne_bytes(p.to_be_bytes()));
    let ports = (wire_port(client.port()) << 16) | wire_port(service.port());
    let mut key = Vec::with_capacity(36);
    let h = match (client.ip().to_canonical(), service.ip().to_canonical()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => {
            let (c, s) = (c.octets(), s.octets());
            key.extend(c);
            key.extend(s);
            flow_mix(((word(&c) << 32) | word(&s)) ^ seed)
        }
        (c, s) => {
            let octets = |a: IpAddr| match a {
                IpAddr::V6(v6) => v6.octets(),
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            };
            let (c, s) = (octets(c), octets(s));
            key.extend(c);
            key.extend(s);
            let half = |a: &[u8; 16], i: usize| {
                (word(&a[8 * i..8 * i + 4]) << 32) | word(&a[8 * i + 4..8 * i + 8])
            };
            let h = flow_mix(half(&c, 0) ^ seed);
            let h = flow_mix(h ^ half(&c, 1));
            let h = flow_mix(h ^ half(&s, 0));
            flow_mix(h ^ half(&s, 1))
        }
    };
    key.extend(client.port().to_be_bytes());
    key.extend(service.port().to_be_bytes());
    let h = flow_mix(h ^ ports);
    (key, h as u32 & mask)
}

/// The backend of the flow whose key is `key` in `slot` (one slot's bytes, read
/// consistently), and its `last` (flow time): `None` when the slot holds another flow. A key
/// with service address 0 (a wildcard listener's) matches the client's flow to any address.
pub fn flow_in(slot: &[u8], key: &[u8]) -> Option<(SocketAddr, u32)> {
    // The key: client address, service address (each 4 or 16 bytes), the two ports.
    let addr_len = (key.len().checked_sub(4)?) / 2;
    let (client, rest) = key.split_at(addr_len);
    let (service, ports) = rest.split_at(addr_len);
    let wildcard = service.iter().all(|&b| b == 0);
    let same = slot.get(..addr_len)? == client
        && (wildcard || slot.get(addr_len..2 * addr_len)? == service)
        && slot.get(2 * addr_len..2 * addr_len + 4)? == ports;
    if !same {
        return None;
    }
    let s = Slot::parse(slot)?;
    Some((s.backend, s.last))
}

/// The fields of a slot the census reads.
struct Slot {
    client: SocketAddr,
    service: SocketAddr,
    backend: SocketAddr,
    last: u32,
}

impl Slot {
    /// `bytes`: one IPv4 slot ([`SLOT_BYTES`].0 bytes) or one IPv6 slot (.1), as in memory.
    fn parse(bytes: &[u8]) -> Option<Slot> {
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        };
        let port_at = |at: usize| -> Option<u16> {
            Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
        };
        let v4_at = |at: usize| -> Option<IpAddr> {
            let o: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(o)))
        };
        let v6_at = |at: usize| -> Option<IpAddr> {
            let o: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        };
        // The word's low half is the backend's port as the packet holds it (network order
        // in memory), its high half the version.
        let backend_port =
            |word_at: usize| port_at(word_at + if cfg!(target_endian = "little") { 0 } else { 2 });
        if bytes.len() == SLOT_BYTES.0 {
            // client addr, service addr, client port, service port, word, backend addr, last
            Some(Slot {
                client: SocketAddr::new(v4_at(0)?, port_at(8)?),
                service: SocketAddr::new(v4_at(4)?, port_at(10)?),
                backend: SocketAddr::new(v4_at(16)?, backend_port(WORD_AT.0)?),
                last: u32_at(20)?,
            })
        } else if bytes.len() == SLOT_BYTES.1 {
            Some(Slot {
                client: SocketAddr::new(v6_at(0)?, port_at(32)?),
                service: SocketAddr::new(v6_at(16)?, port_at(34)?),
                backend: SocketAddr::new(v6_at(40)?, backend_port(WORD_AT.1)?),
                last: u32_at(56)?,
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot as the program writes it (IPv4 or IPv6, as the addresses are).
    fn slot(client: &str, service: &str, backend: &str, version: u16, last: u32) -> Vec<u8> {
        let [c, s, b]: [SocketAddr; 3] = [client, service, backend].map(|a| a.parse().unwrap());
        let octets = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let mut out = Vec::new();
        out.extend(octets(c));
        out.extend(octets(s));
        out.extend(c.port().to_be_bytes());
        out.extend(s.port().to_be_bytes());
        let wire_port = u16::from_ne_bytes(b.port().to_be_bytes());
        out.extend(((u32::from(version) << 16) | u32::from(wire_port)).to_ne_bytes());
        out.extend(octets(b));
        out.extend(last.to_ne_bytes());
        out.extend([0u8; 8]);
        out
    }

    fn listeners() -> Vec<Counted> {
        vec![
            Counted {
                addr: "10.0.0.1:53".parse().unwrap(),
                idle: 100,
                datagram: false,
            },
            Counted {
                addr: "[fd00::1]:53".parse().unwrap(),
                idle: 100,
                datagram: false,
            },
            Counted {
                addr: "10.0.0.1:514".parse().unwrap(),
                idle: 100,
                datagram: true,
            },
        ]
    }

    /// A live flow is read with its client (what `[sync]` renews); an idle one is not.
    #[test]
    fn a_live_flow_is_read_with_its_client() {
        let m = Matcher::new(listeners().into_iter().enumerate());
        let now = 1_000;
        for (client, service, backend, id) in [
            ("192.0.2.1:4000", "10.0.0.1:53", "10.1.0.1:5353", 0),
            ("[2001:db8::1]:4001", "[fd00::1]:53", "[fd00::b]:53", 1),
        ] {
            let live = slot(client, service, backend, 2, now - 1);
            assert_eq!(
                m.live_client_flow(&live, now),
                Some((id, client.parse().unwrap(), backend.parse().unwrap()))
            );
            let idle = slot(client, service, backend, 2, now - 101);
            assert_eq!(m.live_client_flow(&idle, now), None);
        }
    }

    /// A new flow as the program tells it (`struct new_flow`), IPv4 and IPv6; anything else is
    /// not one.
    #[test]
    fn new_flows_are_read_as_the_program_tells_them() {
        let event = |family: u32, client: &[u8], backend: &[u8]| {
            let mut e = Vec::new();
            e.extend(7u32.to_ne_bytes());
            e.extend(4000u16.to_be_bytes());
            e.extend(53u16.to_be_bytes());
            e.extend(family.to_ne_bytes());
            let mut addr = [0u8; 16];
            addr[..client.len()].copy_from_slice(client);
            e.extend(addr);
            let mut addr = [0u8; 16];
            addr[..backend.len()].copy_from_slice(backend);
            e.extend(addr);
            e
        };
        let v4 = event(4, &[192, 0, 2, 1], &[10, 1, 0, 1]);
        assert_eq!(v4.len(), NEW_FLOW_BYTES);
        assert_eq!(
            parse_new_flow(&v4),
            Some((
                7,
                "192.0.2.1:4000".parse().unwrap(),
                "10.1.0.1:53".parse().unwrap()
            ))
        );
        let (c, b): (Ipv6Addr, Ipv6Addr) =
            ("2001:db8::1".parse().unwrap(), "fd00::b".parse().unwrap());
        assert_eq!(
            parse_new_flow(&event(6, &c.octets(), &b.octets())),
            Some((
                7,
                "[2001:db8::1]:4000".parse().unwrap(),
                "[fd00::b]:53".parse().unwrap()
            ))
        );
        assert_eq!(parse_new_flow(&event(5, &[1; 16], &[2; 16])), None);
        assert_eq!(parse_new_flow(&v4[..40]), None);
    }

    #[test]
    fn live_flows_are_counted_per_listener_and_backend() {
        let m = Matcher::new(listeners().into_iter().enumerate());
        let mut c = FlowCensus::new(3, (8, 8));
        let now = 1_000;
        for (client, backend) in [
            ("192.0.2.1:4000", "10.1.0.1:5353"),
            ("192.0.2.2:4000", "10.1.0.1:5353"),
            ("192.0.2.3:4000", "10.1.0.2:5353"),
        ] {
            c.count(&m, &slot(client, "10.0.0.1:53", backend, 2, now - 10), now);
        }
        c.count(
            &m,
            &slot(
                "[2001:db8::1]:4000",
                "[fd00::1]:53",
                "[fd00::b]:53",
                2,
                now - 100,
            ),
            now,
        );
        let b1: SocketAddr = "10.1.0.1:5353".parse().unwrap();
        let b2: SocketAddr = "10.1.0.2:5353".parse().unwrap();
        assert_eq!(c.per_listener[0].get(&b1), Some(&2));
        assert_eq!(c.per_listener[0].get(&b2), Some(&1));
        assert_eq!(c.of_listener(0), 3);
        assert_eq!(c.of_listener(1), 1, "IPv6, idle exactly its timeout: live");
        assert_eq!(
            c.per_listener[1].get(&"[fd00::b]:53".parse().unwrap()),
            Some(&1)
        );
    }

    #[test]
    fn idle_empty_foreign_and_datagram_slots_are_not_flows() {
        let m = Matcher::new(listeners().into_iter().enumerate());
        let mut c = FlowCensus::new(3, (8, 8));
        let now = 1_000;
        // Idle one unit beyond the timeout.
        c.count(
            &m,
            &slot("192.0.2.1:1", "10.0.0.1:53", "10.1.0.1:53", 2, now - 101),
            now,
        );
        // Never written.
        c.count(&m, &[0u8; SLOT_BYTES.0], now);
        c.count(&m, &[0u8; SLOT_BYTES.1], now);
        // A listener not counted (removed).
        c.count(
            &m,
            &slot("192.0.2.1:1", "10.0.0.9:53", "10.1.0.1:53", 2, now),
            now,
        );
        // A datagram-mode listener's mark of a local client.
        c.count(
            &m,
            &slot("127.0.0.1:1", "10.0.0.1:514", "10.1.0.1:514", 2, now),
            now,
        );
        // Bytes of no slot's size.
        c.count(&m, &[0u8; 7], now);
        assert_eq!((0..3).map(|i| c.of_listener(i)).sum::<u64>(), 0, "{c:?}");
    }

    #[test]
    fn a_flow_is_found_by_the_key_its_slot_holds() {
        for (client, service, backend) in [
            ("192.0.2.1:4000", "10.0.0.1:53", "10.1.0.1:5353"),
            ("[2001:db8::1]:4000", "[fd00::1]:53", "[fd00::b]:53"),
        ] {
            let held = slot(client, service, backend, 2, 77);
            let c: SocketAddr = client.parse().unwrap();
            let s: SocketAddr = service.parse().unwrap();
            let (key, bucket) = flow_key(c, s, 0x1234_5678_9abc_def0, 1023);
            assert!(bucket <= 1023);
            assert_eq!(
                flow_in(&held, &key),
                Some((backend.parse().unwrap(), 77)),
                "{client}"
            );
            let other = SocketAddr::new(c.ip(), 4001);
            assert_eq!(flow_in(&held, &flow_key(other, s, 1, 1023).0), None);
        }
    }

    /// A wildcard listener's flow keeps the address its client sent to: the wildcard key
    /// (service address 0) finds it, and the census counts it for the wildcard listener; a
    /// specific key still wants its own address.
    #[test]
    fn a_wildcard_listeners_flow_is_found_and_counted_whatever_address_it_came_to() {
        for (client, sent_to, any, other, backend, elsewhere) in [
            (
                "192.0.2.1:4000",
                "10.0.0.7:5300",
                "0.0.0.0:5300",
                "10.0.0.8:5300",
                "10.1.0.1:53",
                "10.0.0.7:53",
            ),
            (
                "[2001:db8::1]:4000",
                "[fd00::7]:5300",
                "[::]:5300",
                "[fd00::8]:5300",
                "[fd00::b]:53",
                "[fd00::7]:53",
            ),
        ] {
            let held = slot(client, sent_to, backend, 2, 77);
            let c: SocketAddr = client.parse().unwrap();
            let any: SocketAddr = any.parse().unwrap();
            let (key, _) = flow_key(c, any, 1, 1023);
            assert_eq!(flow_in(&held, &key), Some((backend.parse().unwrap(), 77)));
            let (key, _) = flow_key(c, other.parse().unwrap(), 1, 1023);
            assert_eq!(flow_in(&held, &key), None, "another specific address");
            let m = Matcher::new(
                [Counted {
                    addr: any,
                    idle: 100,
                    datagram: false,
                }]
                .into_iter()
                .enumerate(),
            );
            assert_eq!(
                m.live_client_flow(&held, 100),
                Some((0, c, backend.parse().unwrap()))
            );
            // Another port is another listener's.
            let elsewhere = slot(client, elsewhere, backend, 2, 77);
            assert_eq!(m.live_client_flow(&elsewhere, 100), None);
        }
    }

    #[test]
    fn a_slot_written_after_the_clock_was_read_is_live_and_time_wraps() {
        assert!(live(1_005, 1_000, 100), "ahead of now");
        assert!(live(u32::MAX - 5, 10, 100), "across the wrap");
        assert!(!live(u32::MAX - 200, 10, 100), "idle across the wrap");
        assert!(live(900, 1_000, 100));
        assert!(!live(899, 1_000, 100));
    }
}
