//! The payload-key readers on generated input: arbitrary bytes, and well-formed RADIUS and
//! SIP messages cut short or with a byte changed (what the fuzz target does, in every run of
//! the test suite).

use proptest::prelude::*;

fn radius_packet(code: u8, attrs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let attrs: Vec<(u8, &[u8])> = attrs.iter().map(|(t, v)| (*t, v.as_slice())).collect();
    udplb_core::payload::radius::build(code, &attrs)
}

fn attrs() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![1u8, 24, 31, 79, 80]),
            prop::collection::vec(any::<u8>(), 0..40),
        ),
        0..8,
    )
}

proptest! {
    #[test]
    fn any_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        udplb_core::fuzzing::payload(&data);
    }

    #[test]
    fn radius_packets_damaged(
        code in prop::sample::select(vec![1u8, 2, 3, 4, 11]),
        attrs in attrs(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let p = radius_packet(code, &attrs);
        udplb_core::fuzzing::payload(&p);
        udplb_core::fuzzing::payload(&p[..cut.index(p.len() + 1)]);
        let mut q = p.clone();
        let i = flip.index(q.len());
        q[i] = byte;
        udplb_core::fuzzing::payload(&q);
    }

    #[test]
    fn sip_messages_damaged(
        id in "[a-z0-9@.]{1,30}",
        compact in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let name = if compact { "i" } else { "Call-ID" };
        let m = format!("OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n{name}: {id}\r\n\r\n");
        udplb_core::fuzzing::payload(m.as_bytes());
        let got = udplb_core::payload::sip::call_id(m.as_bytes());
        prop_assert_eq!(got, Ok(udplb_core::payload::sip::Message::CallId(id.as_bytes())));
        udplb_core::fuzzing::payload(&m.as_bytes()[..cut.index(m.len() + 1)]);
    }
}
