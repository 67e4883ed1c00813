//! Entry points for the fuzz targets in `fuzz/` and for the tests that replay their corpora.
//!
//! Owns: turning arbitrary bytes into a sequence of operations on the core's state machines
//! and checking the invariants after each. Must not: be used by udplb itself (it exists so
//! that `cargo fuzz` and the ordinary test suite run exactly the same code).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::flow::{FlowKey, FlowTable, Timeouts};
use crate::snapshot::BackendId;
use crate::time::Time;
use crate::verdict::CloseReason;

/// Interprets `data` as operations on a [`FlowTable`] with two listeners (caps 8 and 3):
/// each step takes two bytes, an opcode and an argument, and the table's invariants are
/// checked after every step. Panics (the fuzzer's finding) if an invariant breaks.
pub fn flow_table(data: &[u8]) {
    let mut table: FlowTable<u8> = FlowTable::new();
    table.set_caps(&[8, 3]);
    let mut now = Time(0);
    let mut handles = Vec::new();
    for step in data.chunks_exact(2) {
        let (op, arg) = (step[0], step[1]);
        let key = key_of(arg);
        match op % 8 {
            0 | 1 => {
                if table.find(&key).is_none() && table.has_room(key.listener) {
                    let backend = BackendId(u32::from(arg % 5));
                    let idle = Duration::from_millis(u64::from(op / 8) * 10 + 1);
                    let timeouts = Timeouts {
                        idle,
                        reply: Duration::from_millis(u64::from(arg % 7) * 5 + 1),
                    };
                    handles.push(table.insert(key, (backend, addr(1)), 0, now, timeouts, arg));
                }
            }
            2 => {
                if let Some(h) = table.find(&key) {
                    table.on_request(h, now, u32::from(arg % 3));
                }
            }
            3 => {
                if let Some(h) = table.find(&key) {
                    table.on_reply(h, now, arg % 2 == 0);
                }
            }
            4 => {
                if let Some(&h) = handles.get(usize::from(arg) % handles.len().max(1)) {
                    table.close(h, CloseReason::Error);
                }
            }
            5 => {
                if let Some(h) = table.find(&key) {
                    table.rebind(h, (BackendId(u32::from(op / 8)), addr(2)), 1);
                }
            }
            6 => {
                now = Time(now.0 + u64::from(arg));
                table.expire(now, |_| {});
            }
            _ => table.set_caps(&[u32::from(arg % 9), u32::from(op / 8 % 4)]),
        }
        table.check_invariants();
    }
}

/// Parses `data` as a PROXY v2 header; a parsed header must fit in `data`, and re-encoding
/// its addresses must parse back to the same addresses.
pub fn proxy(data: &[u8]) {
    let Ok(h) = crate::proxy::parse(data) else {
        return;
    };
    assert!(
        h.len <= data.len(),
        "header length {} beyond {}",
        h.len,
        data.len()
    );
    if let Some((source, destination)) = h.addresses {
        let mut out = [0u8; crate::proxy::MAX_HEADER_V6];
        let n = crate::proxy::encode(&mut out, source, destination).expect("fits");
        let again = crate::proxy::parse(&out[..n]).expect("re-encoded header parses");
        let canonical = |a: SocketAddr| match a.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
            IpAddr::V4(_) => a,
        };
        let (s, d) = again.addresses.expect("addresses");
        assert_eq!(
            (canonical(s), canonical(d)),
            (canonical(source), canonical(destination))
        );
    }
}

/// The payload-key readers (RADIUS, SIP, bytes, token, QUIC-LB) on any bytes: each reads a key or
/// says there is none, never a panic; a RADIUS packet that parses has attributes that lie
/// within it and fill it; what the RADIUS reader learns from a challenge it finds again.
pub fn payload(data: &[u8]) {
    use crate::payload::{KeySpec, Keyed, PayloadKey, radius, sip};
    if let Ok(p) = radius::Packet::parse(data) {
        let walked: usize = p.attributes().map(|(_, v)| v.len() + 2).sum();
        let length = usize::from(u16::from_be_bytes([data[2], data[3]]));
        assert_eq!(walked + 20, length, "attributes fill the packet");
    }
    let cfg = crate::payload::quic::LbConfig {
        config_id: 1,
        server_id_length: 2,
    };
    if let Ok(cid) = crate::payload::quic::destination_cid(data, cfg) {
        assert!(
            cid.len() < data.len(),
            "a connection ID lies within its packet"
        );
        if let Some(id) = crate::payload::quic::server_id(cid, cfg) {
            assert_eq!(id.len(), 2);
        }
    }
    if let Ok(sip::Message::CallId(id)) = sip::call_id(data) {
        assert!(!id.is_empty());
        assert!(id.len() <= data.len());
    }
    let specs = [
        KeySpec::Radius {
            attributes: vec![1, 31, 24],
            state_timeout: Duration::from_secs(60),
            max_states: 64,
        },
        KeySpec::Sip,
        KeySpec::Bytes {
            offset: usize::from(data.first().copied().unwrap_or(0)),
            length: 4,
        },
        KeySpec::Token {
            after: b"=".to_vec(),
            until: b";".to_vec(),
        },
        KeySpec::QuicLb {
            config: crate::payload::quic::LbConfig {
                config_id: 1,
                server_id_length: 2,
            },
            servers: vec![(SocketAddr::from(([127, 0, 0, 1], 4433)), vec![0x0a, 0x01])],
        },
    ];
    for spec in specs {
        let key = PayloadKey::new(spec);
        let keyed = key.classify(data);
        key.learn(data, BackendId(3), Time(0));
        assert_eq!(key.classify(data), keyed, "reading is deterministic");
        assert_eq!(
            key.counts().malformed,
            2 * u64::from(keyed == Keyed::Malformed)
        );
        if let Ok(p) = radius::Packet::parse(data)
            && p.code == radius::ACCESS_CHALLENGE
            && matches!(key.spec(), KeySpec::Radius { .. })
            && let Some(state) = p.attribute(radius::STATE)
        {
            // The next round carries the State back: it finds its issuer.
            let request = radius::build(radius::ACCESS_REQUEST, &[(radius::STATE, state)]);
            let Keyed::State(h) = key.classify(&request) else {
                panic!("a request with a State is keyed by it");
            };
            assert_eq!(key.state_backend(h, Time(1), |_| true), Some(BackendId(3)));
        }
    }
}

/// One of 64 keys on two listeners.
fn key_of(arg: u8) -> FlowKey {
    FlowKey {
        listener: u16::from(arg & 1),
        client: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, arg >> 2)), 1000),
        local: None,
        origin: None,
    }
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), 53)
}

#[cfg(test)]
mod tests {
    #[test]
    fn interprets_any_bytes() {
        super::flow_table(&[]);
        super::flow_table(&[0, 1, 0, 2, 2, 1, 3, 1, 6, 200, 4, 0, 7, 0, 0, 3]);
        let all: Vec<u8> = (0..=255u8).flat_map(|a| [a, a.wrapping_mul(7)]).collect();
        super::flow_table(&all);
    }
}
