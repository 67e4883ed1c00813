//! RADIUS packets (RFC 2865, 2866): just enough to read a packet's code and attributes.
//!
//! Owns: checking a packet's framing (its length field and every attribute's length) and
//! walking its attributes. Must not: check authenticators (udplb holds no shared secret) or
//! read more than the packet's own length says.

/// Access-Request.
pub const ACCESS_REQUEST: u8 = 1;
/// Access-Challenge: carries the `State` the next round must send back.
pub const ACCESS_CHALLENGE: u8 = 11;
/// The `State` attribute.
pub const STATE: u8 = 24;

/// Code, identifier, length and the 16-byte authenticator.
const HEADER: usize = 20;
/// RFC 2865: the largest packet.
const MAX_LENGTH: usize = 4096;

/// Attributes a pool may hash on, by name (any other attribute by its number).
pub const ATTRIBUTE_NAMES: &[(&str, u8)] = &[
    ("User-Name", 1),
    ("NAS-IP-Address", 4),
    ("NAS-Port", 5),
    ("Framed-IP-Address", 8),
    ("Called-Station-Id", 30),
    ("Calling-Station-Id", 31),
    ("NAS-Identifier", 32),
    ("Acct-Session-Id", 44),
    ("Acct-Multi-Session-Id", 50),
    ("NAS-Port-Id", 87),
    ("NAS-IPv6-Address", 95),
];

/// The type of attribute `name` (a name of [`ATTRIBUTE_NAMES`], case-insensitive, or a
/// number 1-255).
pub fn attribute_type(name: &str) -> Option<u8> {
    ATTRIBUTE_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, t)| t)
        .or_else(|| name.parse().ok().filter(|&t| t != 0))
}

/// A well-framed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Its code (Access-Request, Access-Challenge, ...).
    pub code: u8,
    attributes: &'a [u8],
}

/// Why bytes are not a RADIUS packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

impl<'a> Packet<'a> {
    /// Reads `data` as a packet: a length field between 20 and 4096 that the datagram holds
    /// (bytes past it are padding, ignored), and attributes that exactly fill it.
    pub fn parse(data: &'a [u8]) -> Result<Packet<'a>, Malformed> {
        if data.len() < HEADER {
            return Err(Malformed);
        }
        let length = usize::from(u16::from_be_bytes([data[2], data[3]]));
        if !(HEADER..=MAX_LENGTH).contains(&length) || length > data.len() {
            return Err(Malformed);
        }
        let packet = Packet {
            code: data[0],
            attributes: &data[HEADER..length],
        };
        let mut rest = packet.attributes;
        while !rest.is_empty() {
            let len = usize::from(*rest.get(1).ok_or(Malformed)?);
            if len < 2 || len > rest.len() {
                return Err(Malformed);
            }
            rest = &rest[len..];
        }
        Ok(packet)
    }

    /// Its attributes, as (type, value), in order.
    pub fn attributes(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let mut rest = self.attributes;
        std::iter::from_fn(move || {
            // Framing was checked by `parse`.
            let (&t, tail) = rest.split_first()?;
            let len = usize::from(*tail.first()?);
            let value = rest.get(2..len)?;
            rest = &rest[len..];
            Some((t, value))
        })
    }

    /// The value of the first attribute of type `t`.
    pub fn attribute(&self, t: u8) -> Option<&'a [u8]> {
        self.attributes().find(|&(at, _)| at == t).map(|(_, v)| v)
    }
}

/// A packet of `code` (identifier 7, a zero authenticator) with `attributes` (values of at
/// most 253 bytes), as the tests and the fuzz target need them: udplb itself never writes
/// RADIUS.
pub fn build(code: u8, attributes: &[(u8, &[u8])]) -> Vec<u8> {
    let mut p = vec![code, 7, 0, 0];
    p.extend([0u8; 16]);
    for (t, v) in attributes {
        p.push(*t);
        p.push((v.len().min(253) + 2) as u8);
        p.extend_from_slice(&v[..v.len().min(253)]);
    }
    let len = (p.len().min(usize::from(u16::MAX)) as u16).to_be_bytes();
    p[2..4].copy_from_slice(&len);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_attributes_in_order() {
        let attrs: [(u8, &[u8]); 3] = [(18, b"hi"), (STATE, b"\x01\x02"), (1, b"")];
        let data = build(ACCESS_CHALLENGE, &attrs);
        let p = Packet::parse(&data).unwrap();
        assert_eq!(p.code, ACCESS_CHALLENGE);
        assert_eq!(p.attribute(STATE), Some(&b"\x01\x02"[..]));
        assert_eq!(p.attribute(1), Some(&b""[..]));
        assert_eq!(p.attributes().count(), 3);
    }

    #[test]
    fn padding_past_the_length_is_ignored_and_bad_framing_refused() {
        let mut data = build(ACCESS_REQUEST, &[(1, b"bob")]);
        data.extend([0xff; 5]);
        assert_eq!(Packet::parse(&data).unwrap().attributes().count(), 1);
        let good = build(ACCESS_REQUEST, &[(1, b"bob")]);
        for bad in [
            good[..19].to_vec(),
            {
                let mut d = good.clone();
                d[3] += 1; // longer than the datagram
                d
            },
            {
                let mut d = good.clone();
                d[21] = 1; // an attribute shorter than its own header
                d
            },
            {
                let mut d = good.clone();
                d[21] = 9; // an attribute past the packet's end
                d
            },
            {
                let mut d = good.clone();
                d[2] = 0x10;
                d[3] = 0x01; // 4097
                d
            },
        ] {
            assert_eq!(Packet::parse(&bad), Err(Malformed), "{bad:?}");
        }
    }

    #[test]
    fn attribute_names() {
        assert_eq!(attribute_type("user-name"), Some(1));
        assert_eq!(attribute_type("Calling-Station-Id"), Some(31));
        assert_eq!(attribute_type("26"), Some(26));
        assert_eq!(attribute_type("0"), None);
        assert_eq!(attribute_type("Nope"), None);
    }
}
