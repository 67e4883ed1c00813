//! Payload keys: the conversation a datagram belongs to, read from its bytes, so that one
//! client's many conversations (a NAS's RADIUS exchanges, a SIP proxy's calls) each stay on
//! one backend.
//!
//! Owns: [`KeySpec`] (what a pool reads: RADIUS, SIP, bytes at an offset, a delimited
//! token), [`PayloadKey`], a pool's reader with, for RADIUS, the table of which backend issued
//! each `State` (learned from its Access-Challenges, shared by the workers, bounded, swept),
//! and the counters of datagrams that had no readable key. A key is either hashed (with the
//! fixed placement seed, so that every worker and every udplb instance agrees) for the pool's
//! consistent-hash scheduler, or, for a RADIUS `State`, looked up.
//! Must not: be consulted for pools without a key, read past a packet's own framing, or drop
//! anything: a datagram with no key, or a malformed one, is scheduled as usual.

pub mod quic;
pub mod radius;
pub mod sip;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::hash::stable_hash;
use crate::sharded::{SHARDS, Sharded};
use crate::snapshot::BackendId;
use crate::time::Time;

/// What a pool reads from datagrams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySpec {
    /// RADIUS: an Access-Request carrying a `State` goes to the backend whose
    /// Access-Challenge issued it; other packets are hashed on `attributes` (types, in
    /// order; none present, or none configured: the scheduler).
    Radius {
        /// Attribute types hashed for packets without a known `State`.
        attributes: Vec<u8>,
        /// How long a `State` is remembered after its challenge.
        state_timeout: Duration,
        /// `State`s remembered at most.
        max_states: usize,
    },
    /// SIP: the `Call-ID` header, hashed.
    Sip,
    /// `length` bytes at `offset`, hashed.
    Bytes {
        /// Where the key starts.
        offset: usize,
        /// Its length.
        length: usize,
    },
    /// The bytes after the first occurrence of `after`, up to (not including) any byte of
    /// `until` or the end, hashed.
    Token {
        /// What precedes the key.
        after: Vec<u8>,
        /// Bytes that end it.
        until: Vec<u8>,
    },
    /// QUIC-LB: a packet whose destination connection ID carries the server ID of one of
    /// `servers` goes to that server; others (a client's first packets, IDs of another
    /// configuration) by a hash of the connection ID.
    QuicLb {
        /// The configuration the servers encode their IDs with.
        config: quic::LbConfig,
        /// Each backend's server ID (`config.server_id_length` bytes).
        servers: Vec<(SocketAddr, Vec<u8>)>,
    },
}

impl KeySpec {
    /// The name of its kind, as configured.
    pub fn kind(&self) -> &'static str {
        match self {
            KeySpec::Radius { .. } => "radius",
            KeySpec::Sip => "sip",
            KeySpec::Bytes { .. } => "bytes",
            KeySpec::Token { .. } => "token",
            KeySpec::QuicLb { .. } => "quic-lb",
        }
    }

    /// Whether it may place a flow's first datagram only (flow mode): a QUIC connection's
    /// datagrams from one address all carry its IDs, and a new address is a new flow.
    pub fn fits_flows(&self) -> bool {
        matches!(self, KeySpec::QuicLb { .. })
    }

    /// Whether it places datagrams by a hash (which needs a consistent-hash scheduler).
    pub fn hashes(&self) -> bool {
        !matches!(self, KeySpec::Radius { attributes, .. } if attributes.is_empty())
    }
}

/// What a datagram's key says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keyed {
    /// Place it by this hash.
    Hash(u64),
    /// A RADIUS `State`: to the backend that issued it, if known (its keyed hash).
    State(u64),
    /// A QUIC connection ID issued by the server at `addr`; by `hash` if it cannot take it.
    Server {
        /// The server that issued it.
        addr: SocketAddr,
        /// The connection ID's hash.
        hash: u64,
    },
    /// A well-formed datagram with no key (a SIP keep-alive, a RADIUS packet without the
    /// attributes): the scheduler places it.
    Unkeyed,
    /// Not what the pool expects: the scheduler places it, and it is counted.
    Malformed,
}

/// A pool's payload key: the reader and, for RADIUS, the `State`s it learned.
#[derive(Debug)]
pub struct PayloadKey {
    spec: KeySpec,
    states: Sharded<States>,
    malformed: AtomicU64,
}

/// What [`PayloadKey::counts`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Datagrams whose key could not be read (scheduled as usual).
    pub malformed: u64,
    /// RADIUS `State`s remembered now (possibly some whose time is up, not yet swept).
    pub states: u64,
    /// Access-Requests sent to the backend that issued their `State`.
    pub state_returns: u64,
    /// `State`s not remembered because the table was full.
    pub states_full: u64,
}

#[derive(Debug, Default)]
struct States {
    /// By the keyed hash of the `State`: its backend and when it was issued.
    entries: HashMap<u64, (BackendId, Time)>,
    returns: u64,
    full: u64,
}

impl PayloadKey {
    /// A reader of `spec` with nothing learned.
    pub fn new(spec: KeySpec) -> Self {
        PayloadKey {
            spec,
            states: Sharded::default(),
            malformed: AtomicU64::new(0),
        }
    }

    /// What it reads.
    pub fn spec(&self) -> &KeySpec {
        &self.spec
    }

    /// Reads the key of client datagram `data` (counting a malformed one).
    pub fn classify(&self, data: &[u8]) -> Keyed {
        let keyed = match &self.spec {
            KeySpec::Radius { attributes, .. } => self.radius_key(data, attributes),
            KeySpec::Sip => match sip::call_id(data) {
                Ok(sip::Message::CallId(id)) => Keyed::Hash(stable_hash(id)),
                Ok(sip::Message::KeepAlive) => Keyed::Unkeyed,
                Err(_) => Keyed::Malformed,
            },
            KeySpec::Bytes { offset, length } => offset
                .checked_add(*length)
                .and_then(|end| data.get(*offset..end))
                .map_or(Keyed::Malformed, |k| Keyed::Hash(stable_hash(k))),
            KeySpec::Token { after, until } => {
                token(data, after, until).map_or(Keyed::Malformed, |k| Keyed::Hash(stable_hash(k)))
            }
            KeySpec::QuicLb { config, servers } => quic_key(data, *config, servers),
        };
        if keyed == Keyed::Malformed {
            self.malformed.fetch_add(1, Ordering::Relaxed);
        }
        keyed
    }

    fn radius_key(&self, data: &[u8], attributes: &[u8]) -> Keyed {
        let Ok(packet) = radius::Packet::parse(data) else {
            return Keyed::Malformed;
        };
        if packet.code == radius::ACCESS_REQUEST
            && let Some(state) = packet.attribute(radius::STATE)
        {
            return Keyed::State(self.states.hash(&state));
        }
        // The chosen attributes, each as type, length, value, in the configured order.
        let mut buf = [0u8; 1024];
        let mut len = 0;
        for &t in attributes {
            if let Some(v) = packet.attribute(t) {
                let end = len + 2 + v.len();
                let Some(slot) = buf.get_mut(len..end) else {
                    break;
                };
                slot[0] = t;
                slot[1] = v.len() as u8;
                slot[2..].copy_from_slice(v);
                len = end;
            }
        }
        if len == 0 {
            Keyed::Unkeyed
        } else {
            Keyed::Hash(stable_hash(&buf[..len]))
        }
    }

    /// The backend that issued the `State` of hash `state`, if it is remembered at `now` and
    /// `usable` says it may take the datagram (counted as a return).
    pub fn state_backend(
        &self,
        state: u64,
        now: Time,
        usable: impl FnOnce(BackendId) -> bool,
    ) -> Option<BackendId> {
        let KeySpec::Radius { state_timeout, .. } = self.spec else {
            return None;
        };
        let mut shard = self.states.of(&state);
        let &(backend, issued) = shard.entries.get(&state)?;
        if issued.after(state_timeout) <= now || !usable(backend) {
            return None;
        }
        shard.returns += 1;
        Some(backend)
    }

    /// Learns from a reply `data` of `backend` at `now`: a RADIUS Access-Challenge's `State`
    /// is remembered as that backend's. A full shard forgets `State`s whose time is up
    /// first; if it is still full, the `State` is not remembered (counted).
    pub fn learn(&self, data: &[u8], backend: BackendId, now: Time) {
        let KeySpec::Radius {
            state_timeout,
            max_states,
            ..
        } = self.spec
        else {
            return;
        };
        let Ok(packet) = radius::Packet::parse(data) else {
            return;
        };
        if packet.code != radius::ACCESS_CHALLENGE {
            return;
        }
        let Some(state) = packet.attribute(radius::STATE) else {
            return;
        };
        let h = self.states.hash(&state);
        let cap = max_states.div_ceil(SHARDS).max(1);
        let mut shard = self.states.of(&h);
        if shard.entries.len() >= cap && !shard.entries.contains_key(&h) {
            shard.expire(now, state_timeout);
            if shard.entries.len() >= cap {
                shard.full += 1;
                return;
            }
        }
        shard.entries.insert(h, (backend, now));
    }

    /// Forgets, in the next shard in turn, the `State`s whose time is up at `now`.
    pub fn sweep(&self, now: Time) {
        if let KeySpec::Radius { state_timeout, .. } = self.spec {
            self.states.next().expire(now, state_timeout);
        }
    }

    /// Its counters.
    pub fn counts(&self) -> KeyCounts {
        let mut c = self.states.fold(KeyCounts::default(), |mut c, s| {
            c.states += s.entries.len() as u64;
            c.state_returns += s.returns;
            c.states_full += s.full;
            c
        });
        c.malformed = self.malformed.load(Ordering::Relaxed);
        c
    }
}

/// The key of QUIC packet `data`: the server its destination connection ID names, else the
/// ID's hash.
fn quic_key(data: &[u8], cfg: quic::LbConfig, servers: &[(SocketAddr, Vec<u8>)]) -> Keyed {
    let Ok(cid) = quic::destination_cid(data, cfg) else {
        return Keyed::Malformed;
    };
    let hash = stable_hash(cid);
    quic::server_id(cid, cfg)
        .and_then(|id| servers.iter().find(|(_, s)| s.as_slice() == id))
        .map_or(Keyed::Hash(hash), |&(addr, _)| Keyed::Server { addr, hash })
}

/// Readers are equal when they read the same way (what a snapshot comparison asks).
impl PartialEq for PayloadKey {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for PayloadKey {}

impl States {
    fn expire(&mut self, now: Time, timeout: Duration) {
        self.entries
            .retain(|_, &mut (_, issued)| issued.after(timeout) > now);
    }
}

/// The bytes after the first `after` in `data`, up to any byte of `until` or the end; `None`
/// when `after` is missing or the token empty.
fn token<'a>(data: &'a [u8], after: &[u8], until: &[u8]) -> Option<&'a [u8]> {
    let start = memchr::memmem::find(data, after)? + after.len();
    let rest = &data[start..];
    let end = rest
        .iter()
        .position(|b| until.contains(b))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn radius(attributes: &[u8]) -> PayloadKey {
        PayloadKey::new(KeySpec::Radius {
            attributes: attributes.to_vec(),
            state_timeout: Duration::from_secs(60),
            max_states: 1_000,
        })
    }

    fn any(_: BackendId) -> bool {
        true
    }

    #[test]
    fn radius_states_go_back_to_their_issuer_until_they_expire() {
        let key = radius(&[]);
        let request = radius::build(radius::ACCESS_REQUEST, &[(1, b"bob")]);
        assert_eq!(key.classify(&request), Keyed::Unkeyed);
        let challenge = radius::build(radius::ACCESS_CHALLENGE, &[(radius::STATE, b"s1")]);
        key.learn(&challenge, BackendId(2), Time(1_000));
        let round2 = radius::build(radius::ACCESS_REQUEST, &[(1, b"bob"), (24, b"s1")]);
        let Keyed::State(h) = key.classify(&round2) else {
            panic!("a State is a State key");
        };
        assert_eq!(key.state_backend(h, Time(2_000), any), Some(BackendId(2)));
        assert_eq!(
            key.state_backend(h, Time(2_000), |b| b != BackendId(2)),
            None
        );
        assert_eq!(key.state_backend(h, Time(61_000), any), None, "expired");
        // An Access-Accept's State, or a request's, teaches nothing.
        let other = radius::build(radius::ACCESS_REQUEST, &[(24, b"s9")]);
        key.learn(&radius::build(2, &[(24, b"s9")]), BackendId(1), Time(0));
        key.learn(&other, BackendId(1), Time(0));
        let Keyed::State(h9) = key.classify(&other) else {
            panic!()
        };
        assert_eq!(key.state_backend(h9, Time(1), any), None);
        let c = key.counts();
        assert_eq!((c.states, c.state_returns, c.malformed), (1, 1, 0));
        for _ in 0..SHARDS {
            key.sweep(Time(61_000));
        }
        assert_eq!(key.counts().states, 0);
    }

    #[test]
    fn radius_attributes_hash_in_order_and_malformed_packets_count() {
        let key = radius(&[1, 31]);
        let a = radius::build(radius::ACCESS_REQUEST, &[(31, b"00-11"), (1, b"bob")]);
        let b = radius::build(4, &[(1, b"bob"), (5, b"\0\0\0\x07"), (31, b"00-11")]);
        let c = radius::build(radius::ACCESS_REQUEST, &[(1, b"alice"), (31, b"00-11")]);
        assert!(matches!(key.classify(&a), Keyed::Hash(_)));
        assert_eq!(
            key.classify(&a),
            key.classify(&b),
            "same attributes, same key"
        );
        assert_ne!(key.classify(&a), key.classify(&c));
        assert_eq!(key.classify(b"\x01\x02"), Keyed::Malformed);
        assert_eq!(key.counts().malformed, 1);
    }

    #[test]
    fn states_are_bounded() {
        let key = PayloadKey::new(KeySpec::Radius {
            attributes: vec![],
            state_timeout: Duration::from_secs(60),
            max_states: SHARDS,
        });
        for i in 0..200u32 {
            let challenge = radius::build(
                radius::ACCESS_CHALLENGE,
                &[(radius::STATE, &i.to_be_bytes())],
            );
            key.learn(&challenge, BackendId(0), Time(0));
        }
        let c = key.counts();
        assert!(c.states <= SHARDS as u64, "{c:?}");
        assert_eq!(c.states + c.states_full, 200);
    }

    #[test]
    fn sip_bytes_and_tokens() {
        let sip = PayloadKey::new(KeySpec::Sip);
        let a = sip.classify(b"INVITE sip:a SIP/2.0\r\nCall-ID: x1\r\n\r\n");
        let b = sip.classify(b"SIP/2.0 180 Ringing\r\ni: x1\r\n\r\n");
        assert!(matches!(a, Keyed::Hash(_)));
        assert_eq!(a, b, "a call's requests and responses share a key");
        assert_eq!(sip.classify(b"\r\n\r\n"), Keyed::Unkeyed);
        assert_eq!(sip.classify(b"hello"), Keyed::Malformed);

        let bytes = PayloadKey::new(KeySpec::Bytes {
            offset: 2,
            length: 3,
        });
        assert_eq!(bytes.classify(b"..abc.."), bytes.classify(b"xxabcyy"));
        assert_eq!(bytes.classify(b"..ab"), Keyed::Malformed);

        let token = PayloadKey::new(KeySpec::Token {
            after: b"session=".to_vec(),
            until: b"; \r\n".to_vec(),
        });
        assert_eq!(
            token.classify(b"op=1;session=42;x"),
            token.classify(b"session=42")
        );
        assert_ne!(token.classify(b"session=42"), token.classify(b"session=43"));
        assert_eq!(token.classify(b"session=;"), Keyed::Malformed);
        assert_eq!(token.classify(b"nothing"), Keyed::Malformed);
        assert_eq!(token.counts().malformed, 2);
    }
}
