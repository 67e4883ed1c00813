//! QUIC packets (RFC 8999's version-independent invariants) and QUIC-LB connection IDs
//! (draft-ietf-quic-load-balancers, the plaintext algorithm): just enough to read a packet's
//! destination connection ID and the server ID a QUIC-LB server encoded in it.
//!
//! Owns: finding the destination connection ID of long- and short-header packets, and
//! reading a plaintext server ID: the first octet's top three bits are the configuration
//! (0-6; 7 marks an ID no balancer can route), the server ID follows it. Must not: decrypt or
//! read anything past the connection ID.

/// What a pool's QUIC-LB configuration says about connection IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbConfig {
    /// The config rotation bits (0-6) the servers put in the first octet.
    pub config_id: u8,
    /// Bytes of server ID after the first octet (1-15).
    pub server_id_length: u8,
}

/// Why bytes are not a QUIC packet udplb can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// A packet's destination connection ID as far as it is known: all of it in a long header,
/// and in a short header (whose length only the servers know) the first octet and the server
/// ID's bytes.
pub fn destination_cid(data: &[u8], cfg: LbConfig) -> Result<&[u8], Malformed> {
    let first = *data.first().ok_or(Malformed)?;
    if first & 0x80 != 0 {
        // Long header: version (4), DCID length (1), DCID.
        let version = data.get(1..5).ok_or(Malformed)?;
        if version == [0, 0, 0, 0] {
            // Version negotiation comes from servers, never from clients.
            return Err(Malformed);
        }
        let len = usize::from(*data.get(5).ok_or(Malformed)?);
        return data.get(6..6 + len).ok_or(Malformed);
    }
    let known = 1 + usize::from(cfg.server_id_length);
    data.get(1..1 + known).ok_or(Malformed)
}

/// The server ID in connection ID `cid`, if a server of configuration `cfg` issued it.
pub fn server_id(cid: &[u8], cfg: LbConfig) -> Option<&[u8]> {
    let first = *cid.first()?;
    if first >> 5 != cfg.config_id {
        return None;
    }
    cid.get(1..1 + usize::from(cfg.server_id_length))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: LbConfig = LbConfig {
        config_id: 1,
        server_id_length: 2,
    };

    #[test]
    fn long_and_short_headers() {
        // Initial, version 1, DCID of 8 bytes (a client's random one), SCID of 0.
        let initial = [0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x44, 0x44];
        assert_eq!(destination_cid(&initial, CFG), Ok(&initial[6..14]));
        assert_eq!(server_id(&initial[6..14], CFG), None, "config 0, not 1");
        // Short header to a CID issued by server 0x0a0b under config 1.
        let short = [0x40, 0x20 | 0x07, 0x0a, 0x0b, 9, 9, 9, 9, 9, 0xee];
        let cid = destination_cid(&short, CFG).unwrap();
        assert_eq!(cid, &short[1..4]);
        assert_eq!(server_id(cid, CFG), Some(&[0x0a, 0x0b][..]));
        // Config 7: unroutable.
        assert_eq!(server_id(&[0xe0, 0x0a, 0x0b], CFG), None);
    }

    #[test]
    fn short_or_odd_packets_are_malformed() {
        assert_eq!(destination_cid(&[], CFG), Err(Malformed));
        assert_eq!(destination_cid(&[0x40, 0x20, 0x0a], CFG), Err(Malformed));
        assert_eq!(
            destination_cid(&[0xc0, 0, 0, 0, 1, 9, 1, 2], CFG),
            Err(Malformed)
        );
        assert_eq!(
            destination_cid(&[0x80, 0, 0, 0, 0, 1, 1], CFG),
            Err(Malformed)
        );
        assert_eq!(server_id(&[0x20, 0x0a], CFG), None);
    }
}
