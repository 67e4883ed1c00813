//! Datagrams from forged IPv4 sources on loopback: a raw socket (`IPPROTO_RAW`, so the test
//! writes the IP header itself) sending UDP from 127.x.y.z addresses. Needs CAP_NET_RAW.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

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
