//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Owns: building the lookup table from a list of backends and weights, and looking a key up.
//! The table is built when a snapshot is published, never per datagram; a lookup is one
//! multiply-shift and one array read.
//! Must not: depend on the order backends are listed in: each backend's permutation comes from
//! the stable hash of its address, so two instances with the same backends build the same table.

use std::net::SocketAddr;

use crate::hash::{backend_hash_input, stable_hash, stable_hash_alt};

/// The smallest table: big enough that small pools balance and move few keys on change.
pub const MIN_TABLE_SIZE: usize = 65_537;

/// A prebuilt Maglev table: `entries[h % len]` is the index of the chosen member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    entries: Vec<u32>,
}

impl MaglevTable {
    /// Builds the table for members `(address, weight)`; indices in the table refer to positions
    /// in `members`. The size is the smallest prime ≥ max(100 × members, [`MIN_TABLE_SIZE`]).
    /// Returns `None` when `members` is empty or every weight is zero.
    pub fn build(members: &[(SocketAddr, u32)]) -> Option<MaglevTable> {
        let size = next_prime(MIN_TABLE_SIZE.max(100 * members.len()));
        Self::build_with_size(members, size)
    }

    /// Builds a table of exactly `size` entries (`size` must be prime for full permutations).
    pub fn build_with_size(members: &[(SocketAddr, u32)], size: usize) -> Option<MaglevTable> {
        let max_weight = members.iter().map(|m| m.1).max().filter(|w| *w > 0)?;
        let m = size as u64;
        // Members take turns in address order, not in the order given, so that contested slots
        // go to the same member on every instance.
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by_key(|&i| members[i].0);
        let perms: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| members[i].0)
            .map(|addr| {
                let mut buf = [0u8; 18];
                let len = backend_hash_input(&addr, &mut buf);
                let offset = stable_hash(&buf[..len]) % m;
                let skip = stable_hash_alt(&buf[..len]) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; members.len()];
        // Weighted population: each round a member may claim a slot when its credit reaches the
        // largest weight, so members claim slots in proportion to their weights.
        let mut credit = vec![0u64; members.len()];
        let mut entries = vec![u32::MAX; size];
        let mut filled = 0usize;
        while filled < size {
            for (i, &member) in order.iter().enumerate() {
                credit[i] += u64::from(members[member].1);
                if credit[i] < u64::from(max_weight) {
                    continue;
                }
                credit[i] -= u64::from(max_weight);
                let (offset, skip) = perms[i];
                let slot = loop {
                    let candidate = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if entries[candidate] == u32::MAX {
                        break candidate;
                    }
                };
                entries[slot] = member as u32;
                filled += 1;
                if filled == size {
                    break;
                }
            }
        }
        Some(MaglevTable { entries })
    }

    /// The member index for a key hash.
    #[inline]
    pub fn lookup(&self, key: u64) -> usize {
        // Multiply-shift maps the 64-bit hash onto the table without a division.
        let idx = ((u128::from(key) * self.entries.len() as u128) >> 64) as usize;
        self.entries[idx] as usize
    }

    /// The entries: member indices, slot by slot.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entries (never true for a built table).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many entries each member owns.
    pub fn entry_counts(&self, members: usize) -> Vec<usize> {
        let mut counts = vec![0usize; members];
        for &e in &self.entries {
            counts[e as usize] += 1;
        }
        counts
    }
}

/// The smallest prime ≥ `n`.
pub fn next_prime(n: usize) -> usize {
    let mut c = n.max(2);
    while !is_prime(c) {
        c += 1;
    }
    c
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn backends(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                (
                    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 53)),
                    1,
                )
            })
            .collect()
    }

    #[test]
    fn primes() {
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(100), 101);
        assert!(is_prime(65_537));
        assert!(!is_prime(65_535));
    }

    #[test]
    fn order_of_members_does_not_matter() {
        let a = backends(5);
        let mut b = a.clone();
        b.reverse();
        let ta = MaglevTable::build(&a).unwrap();
        let tb = MaglevTable::build(&b).unwrap();
        for key in (0..10_000u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            assert_eq!(a[ta.lookup(key)].0, b[tb.lookup(key)].0);
        }
    }

    #[test]
    fn weights_are_proportional() {
        let mut m = backends(3);
        m[0].1 = 1;
        m[1].1 = 2;
        m[2].1 = 3;
        let t = MaglevTable::build(&m).unwrap();
        let c = t.entry_counts(3);
        let total = t.len() as f64;
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let share = c[i] as f64 / total;
            assert!((share - w / 6.0).abs() < 0.01, "member {i}: share {share}");
        }
    }

    #[test]
    fn empty_or_zero_weight_has_no_table() {
        assert!(MaglevTable::build(&[]).is_none());
        assert!(MaglevTable::build(&[(SocketAddr::from(([127, 0, 0, 1], 1)), 0)]).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Equal weights: the most and least loaded members differ by at most 1% of a fair share.
        #[test]
        fn balance(n in 1usize..40) {
            let t = MaglevTable::build(&backends(n)).unwrap();
            let c = t.entry_counts(n);
            let fair = t.len() as f64 / n as f64;
            let spread = (*c.iter().max().unwrap() - *c.iter().min().unwrap()) as f64;
            prop_assert!(spread <= (fair * 0.01).max(1.0), "spread {spread} fair {fair}");
        }

        /// Removing one of N members remaps at most 1/N + 2% of keys.
        #[test]
        fn disruption(n in 2usize..40, removed_seed in any::<usize>()) {
            let all = backends(n);
            let removed = removed_seed % n;
            let rest: Vec<_> = all.iter().enumerate().filter(|(i, _)| *i != removed)
                .map(|(_, m)| *m).collect();
            let before = MaglevTable::build(&all).unwrap();
            let after = MaglevTable::build(&rest).unwrap();
            let keys = 20_000u64;
            let moved = (0..keys)
                .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555)
                .filter(|&k| all[before.lookup(k)].0 != rest[after.lookup(k)].0)
                .count();
            let bound = keys as f64 * (1.0 / n as f64 + 0.02);
            prop_assert!((moved as f64) <= bound, "moved {moved} of {keys}, bound {bound}");
        }
    }
}
