//! Rate limits in fixed memory, shared by the workers.
//!
//! Owns: [`RateLimiter`], a count-min sketch of per-key counters in one-second windows, and
//! [`prefix_key`], which maps a client address (or its /24, /56 ... prefix) to a key. The
//! table never grows: an attacker who forges a million sources fills the same cells as one who
//! forges ten.
//!
//! How it decides: each key hashes (two fixed seeds) to one cell in each of two rows. A cell is
//! one `AtomicU64` packing the second it counts (upper 32 bits) and the count (lower 32). A
//! datagram is allowed when the smaller of its two counts for the current second is below the
//! limit; the allowed datagram then increments the cells holding that minimum (conservative
//! update). Counts only ever over-estimate a key's rate (other keys may share its cells), so:
//! - a key never gets more than `limit` per second, however its traffic is spread over
//!   threads (each increment is a compare-and-swap on the cell);
//! - an innocent key is refused only if both of its cells are shared with keys that together
//!   are over the limit in the same second; with `c` cells per row and `h` heavy keys, about
//!   `(h / c)^2` of the innocent keys (below 0.01 % for 100 heavy keys in 2 x 65,536 cells).
//!
//! Windows are whole seconds, so a key may send up to `limit` at the end of one second and
//! `limit` again at the start of the next.
//! Must not: allocate or lock after construction (the data plane calls it per datagram).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size, thread-safe rate limiter: at most `limit` events per key per second.
#[derive(Debug)]
pub struct RateLimiter {
    limit: u32,
    mask: usize,
    /// Two rows of `mask + 1` cells.
    rows: [Box<[AtomicU64]>; 2],
}

const SEEDS: [u64; 2] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F];

impl RateLimiter {
    /// A limiter allowing `limit` events per key per second, with `cells` counters per row
    /// (rounded up to a power of two, at least 64).
    pub fn new(limit: u32, cells: usize) -> RateLimiter {
        let n = cells.max(64).next_power_of_two();
        let row = || (0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        RateLimiter {
            limit,
            mask: n - 1,
            rows: [row(), row()],
        }
    }

    /// The limit per key per second.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Memory held by the counters.
    pub fn memory_bytes(&self) -> usize {
        2 * (self.mask + 1) * std::mem::size_of::<AtomicU64>()
    }

    /// Counts one event of `key` at `now_ms` (milliseconds on a clock shared by every caller)
    /// and says whether it is within the limit.
    #[inline]
    pub fn check(&self, key: u128, now_ms: u64) -> bool {
        let second = (now_ms / 1000) as u32;
        let cells = [
            &self.rows[0][self.index(key, SEEDS[0])],
            &self.rows[1][self.index(key, SEEDS[1])],
        ];
        loop {
            let seen = [
                cells[0].load(Ordering::Relaxed),
                cells[1].load(Ordering::Relaxed),
            ];
            let counts = seen.map(|c| count_in(c, second));
            let min = counts[0].min(counts[1]);
            if min >= self.limit {
                return false;
            }
            // Conservative update: raise only the cells at the minimum. A lost race retries
            // with fresh values, so concurrent callers never exceed the limit together.
            let mut raced = false;
            for i in 0..2 {
                if counts[i] == min {
                    let next = pack(second, min + 1);
                    if cells[i]
                        .compare_exchange(seen[i], next, Ordering::Relaxed, Ordering::Relaxed)
                        .is_err()
                    {
                        raced = true;
                        break;
                    }
                }
            }
            if !raced {
                return true;
            }
        }
    }

    #[inline]
    fn index(&self, key: u128, seed: u64) -> usize {
        (mix(key, seed) as usize) & self.mask
    }
}

/// The count a cell holds for `second` (0 when it counts an older second).
#[inline]
fn count_in(cell: u64, second: u32) -> u32 {
    if (cell >> 32) as u32 == second {
        cell as u32
    } else {
        0
    }
}

#[inline]
fn pack(second: u32, count: u32) -> u64 {
    (u64::from(second) << 32) | u64::from(count)
}

/// A fixed-seed 128-to-64-bit mixer (multiply and xor-shift; not cryptographic: the attacker
/// does not see which cells collide, and the sketch's guarantee holds regardless).
#[inline]
fn mix(key: u128, seed: u64) -> u64 {
    let mut h = (key as u64) ^ seed;
    h = (h ^ (h >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= (key >> 64) as u64;
    h = (h ^ (h >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^ (h >> 32)
}

/// The key of `ip`'s network: IPv4 (and IPv4-mapped IPv6) addresses masked to `v4_prefix`
/// bits in the IPv4-mapped range, IPv6 ones to `v6_prefix` bits. `(32, 128)` keys single
/// sources; `(24, 56)` their usual allocation units.
#[inline]
pub fn prefix_key(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> u128 {
    let unified = crate::acl::unified(ip);
    let prefix = if crate::acl::canonical(ip).is_ipv4() {
        96 + v4_prefix.min(32)
    } else {
        v6_prefix.min(128)
    };
    unified & !(u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_steady_key_under_its_limit_is_never_refused() {
        let l = RateLimiter::new(100, 1024);
        let key = prefix_key(ip("192.0.2.1"), 32, 128);
        // 50 per second for 10 seconds, evenly spread.
        for ms in (0..10_000).step_by(20) {
            assert!(l.check(key, ms), "refused at {ms} ms");
        }
    }

    #[test]
    fn a_key_at_ten_times_its_limit_gets_exactly_the_limit() {
        let l = RateLimiter::new(100, 1024);
        let key = prefix_key(ip("192.0.2.66"), 32, 128);
        let allowed = (0..10_000u64).filter(|&ms| l.check(key, ms)).count();
        assert_eq!(allowed, 1000, "10 s at 1000/s against 100/s");
    }

    #[test]
    fn concurrent_callers_never_exceed_the_limit_together() {
        let l = RateLimiter::new(1000, 64);
        let key = 42u128;
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..20_000).filter(|i| l.check(key, 5_000 + i % 3)).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        // Never above the limit; a lost race may count an event twice (over-estimates only).
        assert!((950..=1000).contains(&allowed), "{allowed}");
    }

    #[test]
    fn an_abusive_key_among_many_innocent_ones() {
        let l = RateLimiter::new(50, 65_536);
        let abuser = prefix_key(ip("198.51.100.1"), 32, 128);
        let innocents: Vec<u128> = (0..10_000u32)
            .map(|i| prefix_key(IpAddr::from((0x0A00_0000 + i).to_be_bytes()), 32, 128))
            .collect();
        let (mut abuser_allowed, mut refused_innocent) = (0, 0);
        for ms in 0..5_000u64 {
            // The abuser: 20 per millisecond (20,000/s). Innocents: 2 per second each.
            for _ in 0..20 {
                abuser_allowed += usize::from(l.check(abuser, ms));
            }
            for k in innocents.iter().skip((ms % 500) as usize).step_by(500) {
                refused_innocent += usize::from(!l.check(*k, ms));
            }
        }
        assert_eq!(abuser_allowed, 5 * 50);
        assert_eq!(refused_innocent, 0);
        assert_eq!(l.memory_bytes(), 2 * 65_536 * 8);
    }

    #[test]
    fn replies_fit_the_ratio_of_what_was_requested() {
        assert!(reply_fits(10, 0, 30, 3));
        assert!(!reply_fits(10, 0, 31, 3));
        assert!(!reply_fits(10, 25, 10, 3));
        assert!(reply_fits(60, 0, 153, 3));
        assert!(!reply_fits(0, 0, 1, 100));
    }

    #[test]
    fn prefix_keys_mask_the_host_part() {
        let k = |s: &str, v4: u8, v6: u8| prefix_key(ip(s), v4, v6);
        assert_eq!(k("192.0.2.1", 24, 56), k("192.0.2.200", 24, 56));
        assert_ne!(k("192.0.2.1", 24, 56), k("192.0.3.1", 24, 56));
        assert_eq!(k("::ffff:192.0.2.1", 24, 56), k("192.0.2.9", 24, 56));
        assert_eq!(
            k("2001:db8:0:1::1", 24, 56),
            k("2001:db8:0:1:ffff::", 24, 56)
        );
        assert_ne!(
            k("2001:db8:0:100::1", 24, 56),
            k("2001:db8:0:200::1", 24, 56)
        );
        assert_ne!(k("192.0.2.1", 32, 128), k("192.0.2.2", 32, 128));
        assert_ne!(
            k("0.0.0.0", 0, 0),
            k("::", 0, 0),
            "families never share a key"
        );
    }
}

/// A listener's rate limits as configured (`[listeners.NAME.limits]`); `None` turns one off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// Datagrams per second from one client address.
    pub datagrams_per_source: Option<u32>,
    /// Datagrams per second from one client prefix.
    pub datagrams_per_prefix: Option<u32>,
    /// New flows per second from one client address.
    pub new_flows_per_source: Option<u32>,
    /// New flows per second from one client prefix.
    pub new_flows_per_prefix: Option<u32>,
    /// Prefix length of an IPv4 "prefix".
    pub ipv4_prefix: u8,
    /// Prefix length of an IPv6 "prefix".
    pub ipv6_prefix: u8,
    /// Counters per row of each limiter.
    pub cells: usize,
    /// Anti-amplification: a flow's reply bytes may not exceed this many times its request
    /// bytes.
    pub reply_ratio: Option<u32>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            datagrams_per_source: None,
            datagrams_per_prefix: None,
            new_flows_per_source: None,
            new_flows_per_prefix: None,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            cells: 65_536,
            reply_ratio: None,
        }
    }
}

/// The limiters of one listener, shared by its workers.
#[derive(Debug)]
pub struct Limits {
    settings: LimitSettings,
    datagrams_per_source: Option<RateLimiter>,
    datagrams_per_prefix: Option<RateLimiter>,
    new_flows_per_source: Option<RateLimiter>,
    new_flows_per_prefix: Option<RateLimiter>,
}

impl Limits {
    /// Fresh limiters for `settings`.
    pub fn new(settings: LimitSettings) -> Limits {
        let make = |limit: Option<u32>| limit.map(|l| RateLimiter::new(l, settings.cells));
        Limits {
            settings,
            datagrams_per_source: make(settings.datagrams_per_source),
            datagrams_per_prefix: make(settings.datagrams_per_prefix),
            new_flows_per_source: make(settings.new_flows_per_source),
            new_flows_per_prefix: make(settings.new_flows_per_prefix),
        }
    }

    /// The anti-amplification ratio, if any.
    #[inline]
    pub fn reply_ratio(&self) -> Option<u32> {
        self.settings.reply_ratio
    }

    /// What these limiters were built from.
    pub fn settings(&self) -> LimitSettings {
        self.settings
    }

    /// Counts a datagram from `ip`; false when it is over a datagram limit.
    #[inline]
    pub fn datagram(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.pass(
            &self.datagrams_per_source,
            &self.datagrams_per_prefix,
            ip,
            now_ms,
        )
    }

    /// Counts a new flow from `ip`; false when it is over a new-flow limit.
    #[inline]
    pub fn new_flow(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.pass(
            &self.new_flows_per_source,
            &self.new_flows_per_prefix,
            ip,
            now_ms,
        )
    }

    /// Memory held by every limiter.
    pub fn memory_bytes(&self) -> usize {
        [
            &self.datagrams_per_source,
            &self.datagrams_per_prefix,
            &self.new_flows_per_source,
            &self.new_flows_per_prefix,
        ]
        .iter()
        .filter_map(|l| l.as_ref())
        .map(RateLimiter::memory_bytes)
        .sum()
    }

    #[inline]
    fn pass(
        &self,
        source: &Option<RateLimiter>,
        prefix: &Option<RateLimiter>,
        ip: IpAddr,
        now_ms: u64,
    ) -> bool {
        let s = &self.settings;
        source
            .as_ref()
            .is_none_or(|l| l.check(prefix_key(ip, 32, 128), now_ms))
            && prefix
                .as_ref()
                .is_none_or(|l| l.check(prefix_key(ip, s.ipv4_prefix, s.ipv6_prefix), now_ms))
    }
}

/// Limiters are equal when built from the same settings (their counters are runtime state).
impl PartialEq for Limits {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl Eq for Limits {}

/// Whether a reply of `len` bytes fits a flow's anti-amplification budget: the flow has sent
/// `replied` bytes back for `requested` bytes from the client, and may send at most `ratio`
/// times as much.
#[inline]
pub fn reply_fits(requested: u64, replied: u64, len: usize, ratio: u32) -> bool {
    replied.saturating_add(len as u64) <= requested.saturating_mul(u64::from(ratio))
}
