//! The request payload: the header every request carries so that its reply (an unchanged echo)
//! can be matched to the request and timed. The rest of the payload is filler.
//!
//! Layout, little endian: slot `u32`, generation `u32`, send time `u64` (nanoseconds since the
//! run's epoch). Slot and generation together are the request's sequence number.

/// Bytes of header; payloads must be at least this long.
pub const HEADER: usize = 16;

/// What a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Which outstanding request of the flow this is.
    pub slot: u32,
    /// Bumped every time the slot sends, so a late reply does not match a newer request.
    pub generation: u32,
    /// Send time, nanoseconds since the run's epoch.
    pub sent_ns: u64,
}

impl Stamp {
    /// Writes the header into the start of `payload` (at least [`HEADER`] bytes).
    pub fn write(&self, payload: &mut [u8]) {
        payload[..4].copy_from_slice(&self.slot.to_le_bytes());
        payload[4..8].copy_from_slice(&self.generation.to_le_bytes());
        payload[8..16].copy_from_slice(&self.sent_ns.to_le_bytes());
    }

    /// Reads the header of a reply; `None` if it is too short to carry one.
    pub fn read(reply: &[u8]) -> Option<Stamp> {
        let head: &[u8; HEADER] = reply.get(..HEADER)?.try_into().ok()?;
        let (slot, rest) = head.split_at(4);
        let (generation, sent_ns) = rest.split_at(4);
        Some(Stamp {
            slot: u32::from_le_bytes(slot.try_into().ok()?),
            generation: u32::from_le_bytes(generation.try_into().ok()?),
            sent_ns: u64::from_le_bytes(sent_ns.try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let stamp = Stamp {
            slot: 7,
            generation: 0xdead_beef,
            sent_ns: 1 << 40,
        };
        let mut payload = vec![0x55; 64];
        stamp.write(&mut payload);
        assert_eq!(Stamp::read(&payload), Some(stamp));
        assert_eq!(payload[HEADER], 0x55);
    }

    #[test]
    fn short_replies_are_rejected() {
        assert_eq!(Stamp::read(&[0; HEADER - 1]), None);
    }
}
