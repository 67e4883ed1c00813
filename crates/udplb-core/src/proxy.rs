//! The PROXY protocol, version 2 (binary), as used over UDP: a header in front of a datagram
//! that carries the original client's address and the address it sent to.
//!
//! Owns: [`encode`] (what udplb puts in front of datagrams to backends: command PROXY,
//! transport DGRAM, no TLVs) and [`parse`] (headers udplb accepts on listeners behind another
//! balancer, and strips from backend replies). The layout follows section 2.2 of the
//! specification (haproxy.org, `proxy-protocol.txt`): a 12-byte signature, version/command,
//! family/transport, a big-endian length, then the addresses and ports (big-endian), then
//! optional TLVs covered by the length.
//! Must not: allocate or do I/O; encoding writes into a caller's buffer.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Length of a header udplb writes for two IPv4 addresses.
pub const MAX_HEADER_V4: usize = FIXED + INET_BLOCK;
/// Length of a header udplb writes when an IPv6 address is involved (the largest it writes).
pub const MAX_HEADER_V6: usize = FIXED + INET6_BLOCK;

const FIXED: usize = 16;
const INET_BLOCK: usize = 12;
const INET6_BLOCK: usize = 36;
const UNIX_BLOCK: usize = 216;
const VERSION_2: u8 = 0x20;
const CMD_LOCAL: u8 = 0x00;
const CMD_PROXY: u8 = 0x01;
const AF_UNSPEC: u8 = 0x00;
const AF_INET: u8 = 0x10;
const AF_INET6: u8 = 0x20;
const AF_UNIX: u8 = 0x30;
const DGRAM: u8 = 0x02;

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header takes at the start of the datagram (strip these).
    pub len: usize,
    /// `(source, destination)` for a PROXY command over INET or INET6; `None` for LOCAL (a
    /// health check of the proxy itself) and for UNSPEC or UNIX addresses.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Why a datagram does not start with a valid v2 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the 16-byte fixed part.
    TooShort,
    /// The 12-byte signature is not there.
    BadSignature,
    /// A version other than 2.
    BadVersion,
    /// A command other than LOCAL or PROXY.
    BadCommand,
    /// An unknown address family or transport.
    BadFamily,
    /// The declared length runs past the end of the datagram.
    Truncated,
    /// The declared length is shorter than the family's address block.
    AddressBlockTooShort,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::TooShort => "shorter than a proxy v2 header",
            ParseError::BadSignature => "no proxy v2 signature",
            ParseError::BadVersion => "not proxy protocol version 2",
            ParseError::BadCommand => "unknown proxy command",
            ParseError::BadFamily => "unknown address family or transport",
            ParseError::Truncated => "header length beyond the datagram",
            ParseError::AddressBlockTooShort => "header too short for its addresses",
        })
    }
}

impl std::error::Error for ParseError {}

/// `out` is too short for the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferTooShort;

impl fmt::Display for BufferTooShort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("buffer too short for a proxy v2 header")
    }
}

impl std::error::Error for BufferTooShort {}

/// Whether `data` starts with the v2 signature (cheap test before [`parse`]).
#[inline]
pub fn has_signature(data: &[u8]) -> bool {
    data.starts_with(&SIGNATURE)
}

/// The length [`encode`] writes for these addresses.
pub fn encoded_len(source: SocketAddr, destination: SocketAddr) -> usize {
    match (v4(source.ip()), v4(destination.ip())) {
        (Some(_), Some(_)) => MAX_HEADER_V4,
        _ => MAX_HEADER_V6,
    }
}

/// Writes a PROXY/DGRAM header for `source` -> `destination` into `out` and returns its
/// length. IPv4-mapped IPv6 addresses count as IPv4; two IPv4 addresses give an INET header,
/// anything else an INET6 one (an IPv4 address then written as `::ffff:a.b.c.d`).
pub fn encode(
    out: &mut [u8],
    source: SocketAddr,
    destination: SocketAddr,
) -> Result<usize, BufferTooShort> {
    let len = encoded_len(source, destination);
    let out = out.get_mut(..len).ok_or(BufferTooShort)?;
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = VERSION_2 | CMD_PROXY;
    let block = len - FIXED;
    out[14..16].copy_from_slice(&(block as u16).to_be_bytes());
    match (v4(source.ip()), v4(destination.ip())) {
        (Some(s), Some(d)) => {
            out[13] = AF_INET | DGRAM;
            out[16..20].copy_from_slice(&s.octets());
            out[20..24].copy_from_slice(&d.octets());
        }
        _ => {
            out[13] = AF_INET6 | DGRAM;
            out[16..32].copy_from_slice(&v6(source.ip()).octets());
            out[32..48].copy_from_slice(&v6(destination.ip()).octets());
        }
    }
    out[len - 4..len - 2].copy_from_slice(&source.port().to_be_bytes());
    out[len - 2..].copy_from_slice(&destination.port().to_be_bytes());
    Ok(len)
}

/// Parses the v2 header at the start of `datagram`.
pub fn parse(datagram: &[u8]) -> Result<Header, ParseError> {
    if datagram.len() < FIXED {
        return Err(if SIGNATURE.starts_with(datagram) {
            ParseError::TooShort
        } else {
            ParseError::BadSignature
        });
    }
    if !has_signature(datagram) {
        return Err(ParseError::BadSignature);
    }
    if datagram[12] & 0xF0 != VERSION_2 {
        return Err(ParseError::BadVersion);
    }
    let command = datagram[12] & 0x0F;
    if command != CMD_LOCAL && command != CMD_PROXY {
        return Err(ParseError::BadCommand);
    }
    let block = usize::from(u16::from_be_bytes([datagram[14], datagram[15]]));
    let len = FIXED + block;
    let body = datagram.get(FIXED..len).ok_or(ParseError::Truncated)?;
    let (family, transport) = (datagram[13] & 0xF0, datagram[13] & 0x0F);
    if transport > 2 || (transport == 0) != (family == AF_UNSPEC) {
        return Err(ParseError::BadFamily);
    }
    let needed = match family {
        AF_UNSPEC => 0,
        AF_INET => INET_BLOCK,
        AF_INET6 => INET6_BLOCK,
        AF_UNIX => UNIX_BLOCK,
        _ => return Err(ParseError::BadFamily),
    };
    if block < needed {
        return Err(ParseError::AddressBlockTooShort);
    }
    let addresses = match (command, family) {
        (CMD_PROXY, AF_INET) => Some(inet(body)),
        (CMD_PROXY, AF_INET6) => Some(inet6(body)),
        _ => None,
    };
    Ok(Header { len, addresses })
}

fn inet(b: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]));
    let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    (
        SocketAddr::new(ip(0), port(8)),
        SocketAddr::new(ip(4), port(10)),
    )
}

fn inet6(b: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |at: usize| {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    (
        SocketAddr::new(ip(0), port(32)),
        SocketAddr::new(ip(16), port(34)),
    )
}

/// The IPv4 form of `ip`, if it has one (IPv4 or IPv4-mapped IPv6).
fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

/// The IPv6 form of `ip` (IPv4 mapped).
fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// 192.0.2.1:56324 -> 198.51.100.7:53, written out from the specification's layout.
    const V4_VECTOR: [u8; 28] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, PROXY
        0x12, // AF_INET, DGRAM
        0x00, 0x0C, // 12 bytes of addresses
        192, 0, 2, 1, // source address
        198, 51, 100, 7, // destination address
        0xDC, 0x04, // source port 56324
        0x00, 0x35, // destination port 53
    ];

    /// [2001:db8::1]:1234 -> [2001:db8::53]:53.
    const V6_VECTOR: [u8; 52] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, PROXY
        0x22, // AF_INET6, DGRAM
        0x00, 0x24, // 36 bytes of addresses
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // source
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53, // destination
        0x04, 0xD2, // source port 1234
        0x00, 0x35, // destination port 53
    ];

    #[test]
    fn encodes_the_ipv4_test_vector_byte_for_byte() {
        let mut out = [0u8; 64];
        let n = encode(&mut out, sa("192.0.2.1:56324"), sa("198.51.100.7:53")).unwrap();
        assert_eq!(&out[..n], &V4_VECTOR);
        assert_eq!(
            parse(&V4_VECTOR).unwrap(),
            Header {
                len: 28,
                addresses: Some((sa("192.0.2.1:56324"), sa("198.51.100.7:53")))
            }
        );
    }

    #[test]
    fn encodes_the_ipv6_test_vector_byte_for_byte() {
        let mut out = [0u8; 64];
        let n = encode(&mut out, sa("[2001:db8::1]:1234"), sa("[2001:db8::53]:53")).unwrap();
        assert_eq!(&out[..n], &V6_VECTOR);
        let h = parse(&V6_VECTOR).unwrap();
        assert_eq!(h.len, 52);
        assert_eq!(
            h.addresses,
            Some((sa("[2001:db8::1]:1234"), sa("[2001:db8::53]:53")))
        );
    }

    #[test]
    fn mapped_addresses_are_written_as_ipv4_and_mixed_ones_as_ipv6() {
        let mut out = [0u8; 64];
        let n = encode(
            &mut out,
            sa("[::ffff:192.0.2.1]:56324"),
            sa("198.51.100.7:53"),
        )
        .unwrap();
        assert_eq!(&out[..n], &V4_VECTOR);
        let n = encode(&mut out, sa("192.0.2.1:5"), sa("[2001:db8::53]:53")).unwrap();
        assert_eq!(n, MAX_HEADER_V6);
        assert_eq!(out[13], 0x22);
        assert_eq!(
            parse(&out[..n]).unwrap().addresses,
            Some((sa("[::ffff:192.0.2.1]:5"), sa("[2001:db8::53]:53")))
        );
    }

    #[test]
    fn payload_after_the_header_is_left_alone() {
        let mut d = V4_VECTOR.to_vec();
        d.extend_from_slice(b"query");
        let h = parse(&d).unwrap();
        assert_eq!(&d[h.len..], b"query");
    }

    #[test]
    fn local_command_and_tlvs_are_skipped_by_length() {
        // LOCAL over UNSPEC: no addresses, nothing else.
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            parse(&local).unwrap(),
            Header {
                len: 16,
                addresses: None
            }
        );
        // PROXY over INET with a PP2_TYPE_NOOP TLV of 3 bytes after the addresses.
        let mut tlv = V4_VECTOR.to_vec();
        tlv[15] = 12 + 6;
        tlv.extend_from_slice(&[0x04, 0x00, 0x03, 1, 2, 3]);
        tlv.extend_from_slice(b"data");
        let h = parse(&tlv).unwrap();
        assert_eq!(h.len, 34);
        assert_eq!(&tlv[h.len..], b"data");
        assert_eq!(
            h.addresses,
            Some((sa("192.0.2.1:56324"), sa("198.51.100.7:53")))
        );
    }

    #[test]
    fn every_kind_of_malformed_header_is_named() {
        assert_eq!(parse(&SIGNATURE[..8]), Err(ParseError::TooShort));
        assert_eq!(parse(b"hello, world, hello"), Err(ParseError::BadSignature));
        assert_eq!(parse(b"hi"), Err(ParseError::BadSignature));
        let with = |at: usize, v: u8| {
            let mut d = V4_VECTOR.to_vec();
            d[at] = v;
            parse(&d)
        };
        assert_eq!(with(12, 0x11), Err(ParseError::BadVersion));
        assert_eq!(with(12, 0x22), Err(ParseError::BadCommand));
        assert_eq!(with(13, 0x42), Err(ParseError::BadFamily));
        assert_eq!(with(13, 0x13), Err(ParseError::BadFamily));
        assert_eq!(with(15, 13), Err(ParseError::Truncated));
        assert_eq!(with(15, 11), Err(ParseError::AddressBlockTooShort));
        assert_eq!(with(13, 0x22), Err(ParseError::AddressBlockTooShort));
        let mut out = [0u8; 27];
        assert_eq!(
            encode(&mut out, sa("192.0.2.1:1"), sa("192.0.2.2:2")),
            Err(BufferTooShort)
        );
    }

    /// Round trips over many generated addresses; every prefix and every single-byte change
    /// of a valid header parses or fails without panicking.
    #[test]
    fn round_trips_and_never_panics() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = [0u8; MAX_HEADER_V6 + 4];
        for i in 0..2_000 {
            let r = next();
            let ip = |r: u64, six: bool| -> IpAddr {
                if six {
                    IpAddr::V6(Ipv6Addr::from(u128::from(r) << 64 | u128::from(r ^ 0xABCD)))
                } else {
                    IpAddr::V4(Ipv4Addr::from(r as u32))
                }
            };
            let six = i % 2 == 0;
            let src = SocketAddr::new(ip(r, six && r & 1 == 0), (r >> 16) as u16);
            let dst = SocketAddr::new(ip(r >> 8, six), (r >> 32) as u16);
            let n = encode(&mut out, src, dst).unwrap();
            let h = parse(&out[..n]).unwrap();
            assert_eq!(h.len, n);
            let (s, d) = h.addresses.unwrap();
            assert_eq!(s.port(), src.port());
            assert_eq!(d.port(), dst.port());
            assert_eq!(
                v4(s.ip()).map(IpAddr::V4).unwrap_or(s.ip()),
                canonical(src.ip())
            );
            assert_eq!(
                v4(d.ip()).map(IpAddr::V4).unwrap_or(d.ip()),
                canonical(dst.ip())
            );
            for cut in 0..n {
                let _ = parse(&out[..cut]);
            }
            for at in 0..n {
                let saved = out[at];
                out[at] = saved ^ (next() as u8 | 1);
                let _ = parse(&out[..n]);
                out[at] = saved;
            }
        }
    }

    fn canonical(ip: IpAddr) -> IpAddr {
        v4(ip).map(IpAddr::V4).unwrap_or(ip)
    }
}
