//! QUIC-LB connection IDs for quinn servers behind udplb.
//!
//! A QUIC connection survives its client changing address (a phone moving from Wi-Fi to
//! mobile data, a NAT rebinding), but a balancer that places datagrams by the client's
//! address sends the new path to any server. With QUIC-LB
//! (draft-ietf-quic-load-balancers, the plaintext algorithm), every connection ID a server
//! issues carries that server's ID, and udplb (`[pools.NAME.payload_key]`,
//! `kind = "quic-lb"`) reads it from each packet's destination connection ID and sends the
//! packet to the server that issued it, from whatever address it comes.
//!
//! Owns: generating such IDs for one server ([`QuicLbGenerator`], a quinn
//! `ConnectionIdGenerator`) and recognising them. Each ID is: one octet whose top three bits
//! are the configuration (`config_id`, 0-6) and whose low five bits are the ID's length minus
//! one; the server ID; then random bytes (`nonce_length`, at least 4). Must not: reveal more
//! than the server ID (the nonce is drawn from the operating system's random source).
//!
//! ```
//! use udplb_quic_lb::{QuicLbConfig, QuicLbGenerator};
//!
//! // The same values as udplb's pool: config_id = 0, server_id_length = 2, and this server's
//! // server ID, "0a01".
//! let config = QuicLbConfig::new(0, vec![0x0a, 0x01], 6).unwrap();
//! let mut endpoint = quinn_proto::EndpointConfig::default();
//! endpoint.cid_generator(move || Box::new(QuicLbGenerator::new(config.clone())));
//! // quinn::Endpoint::new(endpoint, Some(server_config), socket, runtime) ...
//! ```

use std::fmt;
use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::{Rng, RngExt};

/// The longest connection ID QUIC v1 allows.
const MAX_CID: usize = 20;
/// The fewest random bytes an ID carries (draft-ietf-quic-load-balancers).
pub const MIN_NONCE: usize = 4;

/// One server's QUIC-LB configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicLbConfig {
    config_id: u8,
    server_id: Vec<u8>,
    nonce_length: usize,
}

/// Why a configuration cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl QuicLbConfig {
    /// Configuration `config_id` (0-6), this server's `server_id` (1-15 bytes, the length the
    /// balancer's `server_id_length` says) and `nonce_length` random bytes (at least 4; the
    /// whole ID, 1 + server ID + nonce, at most 20 bytes).
    pub fn new(
        config_id: u8,
        server_id: Vec<u8>,
        nonce_length: usize,
    ) -> Result<Self, ConfigError> {
        if config_id > 6 {
            return Err(ConfigError(format!(
                "config_id {config_id}: 0-6 (7 marks IDs no balancer routes)"
            )));
        }
        if server_id.is_empty() || server_id.len() > 15 {
            return Err(ConfigError(format!(
                "a server ID of {} bytes: 1-15",
                server_id.len()
            )));
        }
        if nonce_length < MIN_NONCE {
            return Err(ConfigError(format!(
                "nonce_length {nonce_length}: at least {MIN_NONCE}"
            )));
        }
        let len = 1 + server_id.len() + nonce_length;
        if len > MAX_CID {
            return Err(ConfigError(format!(
                "a connection ID of {len} bytes: at most {MAX_CID}"
            )));
        }
        Ok(QuicLbConfig {
            config_id,
            server_id,
            nonce_length,
        })
    }

    /// The length of the IDs it makes.
    pub fn cid_len(&self) -> usize {
        1 + self.server_id.len() + self.nonce_length
    }

    /// The server ID in `cid`, if an ID of this configuration (of this server or another).
    pub fn server_id_of<'c>(&self, cid: &'c [u8]) -> Option<&'c [u8]> {
        let first = *cid.first()?;
        (first >> 5 == self.config_id)
            .then(|| cid.get(1..1 + self.server_id.len()))
            .flatten()
    }

    /// A new ID of this server, its nonce from `rng`.
    pub fn generate(&self, rng: &mut impl Rng) -> Vec<u8> {
        let len = self.cid_len();
        let mut cid = Vec::with_capacity(len);
        cid.push((self.config_id << 5) | ((len - 1) as u8 & 0x1f));
        cid.extend_from_slice(&self.server_id);
        let start = cid.len();
        cid.resize(start + self.nonce_length, 0);
        rng.fill(&mut cid[start..]);
        cid
    }
}

/// A quinn `ConnectionIdGenerator` issuing QUIC-LB IDs of one server.
#[derive(Clone, Debug)]
pub struct QuicLbGenerator {
    config: QuicLbConfig,
    lifetime: Option<Duration>,
}

impl QuicLbGenerator {
    /// A generator for `config`.
    pub fn new(config: QuicLbConfig) -> Self {
        QuicLbGenerator {
            config,
            lifetime: None,
        }
    }

    /// Retires its IDs after `d` (quinn then issues new ones).
    pub fn set_lifetime(&mut self, d: Duration) -> &mut Self {
        self.lifetime = Some(d);
        self
    }
}

impl ConnectionIdGenerator for QuicLbGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        ConnectionId::new(&self.config.generate(&mut rand::rng()))
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match self.config.server_id_of(cid) {
            Some(id) if cid.len() == self.config.cid_len() && id == self.config.server_id => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.config.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_configuration_length_and_server_id() {
        let config = QuicLbConfig::new(3, vec![0x0a, 0x01], 6).unwrap();
        let mut g = QuicLbGenerator::new(config.clone());
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!(a.len(), 9);
        assert_eq!(a[0] >> 5, 3);
        assert_eq!(usize::from(a[0] & 0x1f), 8, "length minus one");
        assert_eq!(&a[1..3], &[0x0a, 0x01]);
        assert_ne!(a[3..], b[3..], "random nonces");
        assert!(g.validate(&a).is_ok());
        let other = QuicLbConfig::new(3, vec![0x0a, 0x02], 6).unwrap();
        let theirs = QuicLbGenerator::new(other).generate_cid();
        assert!(g.validate(&theirs).is_err(), "another server's ID");
        assert_eq!(config.server_id_of(&theirs), Some(&[0x0a, 0x02][..]));
    }

    #[test]
    fn bad_configurations_say_why() {
        assert!(QuicLbConfig::new(7, vec![1], 6).is_err());
        assert!(QuicLbConfig::new(0, vec![], 6).is_err());
        assert!(QuicLbConfig::new(0, vec![1], 3).is_err());
        let e = QuicLbConfig::new(0, vec![1; 15], 6).unwrap_err();
        assert_eq!(e.to_string(), "a connection ID of 22 bytes: at most 20");
    }
}
