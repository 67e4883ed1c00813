//! The flow-state sync messages between udplb instances, as bytes.
//!
//! A message is one UDP datagram of at most [`MAX_MESSAGE`] bytes (no IP fragments on a
//! 1500-byte path), all integers big-endian:
//!
//! ```text
//! 0      4   "ULBS"
//! 4      1   version (1)
//! 5      3   zero
//! 8      8   sender: a random number of the sending process
//! 16     8   sequence: 1, 2, ... per sender (replays and old messages are refused)
//! 24     2   entries (n)
//! 26     2   zero
//! 28     n × 44 entries: listener (8: a hash of its name), client (16 + 2), backend (16 + 2)
//!            (IPv4 as IPv4-mapped IPv6 addresses)
//! end-16 16  HMAC-SHA256 of everything before it with the shared key, first 16 bytes
//! ```
//!
//! Owns: encoding, decoding and authenticating messages, and the listener identity the
//! instances agree on ([`listener_id`]: the listener's name, not its place in a file).
//! Must not: do I/O or keep state (the receiver keeps the sequences it saw).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"ULBS";
const VERSION: u8 = 1;
const HEADER: usize = 28;
const ENTRY: usize = 44;
const TAG: usize = 16;
/// The largest message.
pub const MAX_MESSAGE: usize = 1400;
/// Entries in one message at most.
pub const ENTRIES_PER_MESSAGE: usize = (MAX_MESSAGE - HEADER - TAG) / ENTRY;

/// One flow: on the listener named by `listener` ([`listener_id`]), `client` goes to `backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub listener: u64,
    pub client: SocketAddr,
    pub backend: SocketAddr,
}

/// A decoded, authenticated message.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub sender: u64,
    pub sequence: u64,
    pub entries: Vec<Entry>,
}

/// Why a datagram is not a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a sync message of this version, or its length does not match its count.
    Malformed,
    /// Not authenticated with the shared key (another key, or altered).
    Forged,
}

/// The shared key, ready to authenticate.
#[derive(Clone)]
pub struct Key(Hmac<Sha256>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key of `secret` (any length; the key file asks for at least 16 characters).
    pub fn new(secret: &[u8]) -> Key {
        Key(Hmac::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }
}

/// A listener's identity between instances: a hash (FNV-1a, 64 bits) of its name.
pub fn listener_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Writes the message of `entries` (at most [`ENTRIES_PER_MESSAGE`]) into `out`.
pub fn encode(key: &Key, sender: u64, sequence: u64, entries: &[Entry], out: &mut Vec<u8>) {
    assert!(entries.len() <= ENTRIES_PER_MESSAGE);
    out.clear();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&sender.to_be_bytes());
    out.extend_from_slice(&sequence.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    for e in entries {
        out.extend_from_slice(&e.listener.to_be_bytes());
        put_addr(out, e.client);
        put_addr(out, e.backend);
    }
    let mut mac = key.0.clone();
    mac.update(out);
    out.extend_from_slice(&mac.finalize().into_bytes()[..TAG]);
}

/// The message in `datagram`, if it is one and the shared key authenticates it.
pub fn decode(key: &Key, datagram: &[u8]) -> Result<Message, Refused> {
    if datagram.len() < HEADER + TAG || &datagram[..4] != MAGIC || datagram[4] != VERSION {
        return Err(Refused::Malformed);
    }
    let n = usize::from(u16::from_be_bytes([datagram[24], datagram[25]]));
    if datagram.len() != HEADER + n * ENTRY + TAG {
        return Err(Refused::Malformed);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG);
    let mut mac = key.0.clone();
    mac.update(signed);
    mac.verify_truncated_left(tag)
        .map_err(|_| Refused::Forged)?;
    let u64_at = |at: usize| u64::from_be_bytes(signed[at..at + 8].try_into().expect("8 bytes"));
    let entries = signed[HEADER..]
        .chunks_exact(ENTRY)
        .map(|e| Entry {
            listener: u64::from_be_bytes(e[..8].try_into().expect("8 bytes")),
            client: addr_at(&e[8..26]),
            backend: addr_at(&e[26..44]),
        })
        .collect();
    Ok(Message {
        sender: u64_at(8),
        sequence: u64_at(16),
        entries,
    })
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn addr_at(b: &[u8]) -> SocketAddr {
    let octets: [u8; 16] = b[..16].try_into().expect("16 bytes");
    let ip = Ipv6Addr::from(octets);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

/// The sequences a receiver accepts from one sender: each once, and none older than the 64
/// before the newest (as IPsec's anti-replay window; sync datagrams may be reordered).
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    newest: u64,
    /// Bit i: sequence `newest - i` was seen.
    seen: u64,
}

impl Window {
    /// Whether `sequence` is new (and then records it).
    pub fn accept(&mut self, sequence: u64) -> bool {
        if sequence > self.newest {
            let shift = sequence - self.newest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.newest = sequence;
            return true;
        }
        let age = self.newest - sequence;
        if age >= 64 || self.seen & (1 << age) != 0 {
            return false;
        }
        self.seen |= 1 << age;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<Entry> {
        vec![
            Entry {
                listener: listener_id("dns"),
                client: "192.0.2.1:5353".parse().unwrap(),
                backend: "10.0.0.1:53".parse().unwrap(),
            },
            Entry {
                listener: listener_id("dns6"),
                client: "[2001:db8::1]:40000".parse().unwrap(),
                backend: "[fd00::2]:53".parse().unwrap(),
            },
        ]
    }

    #[test]
    fn a_message_round_trips_and_fits_a_datagram() {
        let key = Key::new(b"0123456789abcdef");
        let mut out = Vec::new();
        encode(&key, 7, 42, &entries(), &mut out);
        let m = decode(&key, &out).unwrap();
        assert_eq!((m.sender, m.sequence, m.entries), (7, 42, entries()));
        let full = vec![entries()[1]; ENTRIES_PER_MESSAGE];
        encode(&key, 7, 43, &full, &mut out);
        assert!(out.len() <= MAX_MESSAGE, "{}", out.len());
        assert_eq!(
            decode(&key, &out).unwrap().entries.len(),
            ENTRIES_PER_MESSAGE
        );
    }

    #[test]
    fn another_key_a_changed_byte_or_a_wrong_length_is_refused() {
        let key = Key::new(b"0123456789abcdef");
        let mut out = Vec::new();
        encode(&key, 7, 42, &entries(), &mut out);
        assert_eq!(
            decode(&Key::new(b"0123456789abcdeF"), &out),
            Err(Refused::Forged)
        );
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 1;
            assert!(decode(&key, &bad).is_err(), "byte {i} changed");
        }
        assert_eq!(decode(&key, &out[..out.len() - 1]), Err(Refused::Malformed));
        assert_eq!(decode(&key, b"ULBS"), Err(Refused::Malformed));
        assert_eq!(decode(&key, &[]), Err(Refused::Malformed));
    }

    #[test]
    fn the_window_takes_each_sequence_once_and_nothing_too_old() {
        let mut w = Window::default();
        assert!(w.accept(1));
        assert!(!w.accept(1));
        assert!(w.accept(3));
        assert!(w.accept(2), "reordered");
        assert!(!w.accept(2));
        assert!(w.accept(100));
        assert!(!w.accept(36), "older than the window");
        assert!(w.accept(37));
        assert!(!w.accept(0));
    }

    #[test]
    fn listener_ids_depend_on_the_name_only() {
        assert_eq!(listener_id("dns"), listener_id("dns"));
        assert_ne!(listener_id("dns"), listener_id("dns6"));
    }
}
