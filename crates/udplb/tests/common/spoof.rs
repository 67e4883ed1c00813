//! Datagrams from forged sources on loopback: a raw socket (`IPPROTO_RAW`, so the test writes
//! the IP header itself) sending UDP from any IPv4 or IPv6 address. Needs CAP_NET_RAW.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `a`, which must be an IPv4 address (a forger's source or destination).
pub fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("{a} is not IPv4"),
    }
}

/// `a`, which must be an IPv6 address.
pub fn v6(a: SocketAddr) -> SocketAddrV6 {
    match a {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(_) => panic!("{a} is not IPv6"),
    }
}

/// A raw IPv4 socket that writes its own headers.
pub struct Spoofer {
    socket: Socket,
    packet: Vec<u8>,
}

/// The `i`-th forged source: 127.1.0.0 + i (never 127.0.0.1, where the legitimate clients
/// live), port 1024 + i % 60000.
pub fn source(i: u32) -> SocketAddrV4 {
    let ip = u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i;
    SocketAddrV4::new(Ipv4Addr::from(ip), 1024 + (i % 60_000) as u16)
}

impl Spoofer {
    /// `None` without CAP_NET_RAW.
    pub fn new() -> Option<Spoofer> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255))).ok()?;
        socket.set_send_buffer_size(4 << 20).ok()?;
        Some(Spoofer {
            socket,
            packet: Vec::with_capacity(128),
        })
    }

    /// Sends `payload` from `from` to `to` (both IPv4).
    pub fn send(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        build(&mut self.packet, from, to, payload);
        // A full send buffer (ENOBUFS) loses this one datagram: a flood does not retry.
        let _ = self
            .socket
            .send_to(&self.packet, &SockAddr::from(SocketAddr::V4(to)));
    }

    /// Sends one datagram from each of `sources` (in order) to `to`, at about `rate` per
    /// second; returns how long it took.
    pub fn flood(
        &mut self,
        sources: std::ops::Range<u32>,
        to: SocketAddrV4,
        payload: &[u8],
        rate: u32,
    ) -> Duration {
        let start = Instant::now();
        for (n, i) in sources.enumerate() {
            self.send(source(i), to, payload);
            if n % 256 == 255 {
                let due = Duration::from_secs_f64((n + 1) as f64 / f64::from(rate));
                if let Some(ahead) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        start.elapsed()
    }
}

/// IPv4 header (the kernel fills in the checksum, id and total length) + UDP header
/// (checksum 0: none, allowed over IPv4) + payload.
fn build(out: &mut Vec<u8>, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
    let udp_len = 8 + payload.len() as u16;
    out.clear();
    out.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    out.extend_from_slice(&from.ip().octets());
    out.extend_from_slice(&to.ip().octets());
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(&to.port().to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let total = out.len() as u16;
    out[2..4].copy_from_slice(&total.to_be_bytes());
}

/// A raw IPv6 socket that writes its own headers (`IPPROTO_RAW` implies `IPV6_HDRINCL`).
pub struct Spoofer6 {
    socket: Socket,
    packet: Vec<u8>,
}

impl Spoofer6 {
    /// `None` without CAP_NET_RAW.
    pub fn new() -> Option<Spoofer6> {
        let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255))).ok()?;
        Some(Spoofer6 {
            socket,
            packet: Vec::with_capacity(128),
        })
    }

    /// Sends `payload` from `from` to `to` (both IPv6; `from` may be IPv4-mapped).
    pub fn send(&mut self, from: SocketAddrV6, to: SocketAddrV6, payload: &[u8]) {
        build6(&mut self.packet, from, to, payload);
        // A raw IPv6 socket takes no port in its destination (EINVAL otherwise).
        let dest = SocketAddrV6::new(*to.ip(), 0, 0, to.scope_id());
        self.socket
            .send_to(&self.packet, &SockAddr::from(SocketAddr::V6(dest)))
            .expect("send a forged IPv6 datagram");
    }
}

/// IPv6 header + UDP header (with its checksum, mandatory over IPv6) + payload.
fn build6(out: &mut Vec<u8>, from: SocketAddrV6, to: SocketAddrV6, payload: &[u8]) {
    let udp_len = 8 + payload.len() as u16;
    out.clear();
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[17, 64]);
    out.extend_from_slice(&from.ip().octets());
    out.extend_from_slice(&to.ip().octets());
    let udp_at = out.len();
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(&to.port().to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    // Checksum over the pseudo-header (addresses, length, next header) and the UDP datagram.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&from.ip().octets());
    add(&to.ip().octets());
    add(&u32::from(udp_len).to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(&out[udp_at..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    out[udp_at + 6..udp_at + 8].copy_from_slice(&checksum.to_be_bytes());
}
