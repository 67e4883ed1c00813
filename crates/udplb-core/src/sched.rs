//! Scheduling: which backend a new flow (or, in datagram mode, a datagram) goes to.
//!
//! Owns: [`Tier`], the prebuilt scheduling state of a pool (built with the snapshot: member
//! list, cumulative weights, the round-robin schedule, the Maglev table, rendezvous hashes),
//! [`Sequence`], the one counter of a pool's round robin that every worker advances, and
//! [`pick`], the per-decision function.
//! Must not: allocate or build tables in [`pick`] (it runs per new flow, and per datagram in
//! datagram mode), or draw randomness (the caller passes a random `u64`). The only state
//! workers share is a pool's [`Sequence`], one relaxed atomic add per round-robin decision: a
//! cursor per worker would hand a few clients to the same backends on every worker.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::{ClientKey, backend_hash_input, stable_hash};
use crate::maglev::MaglevTable;
use crate::model::{AllDownPolicy, SchedulerKind};
use crate::snapshot::{AdminState, Backend, Pool};

/// The backends eligible for new flows in a pool, with the tables of its scheduler.
///
/// Eligible means: primaries that take new flows; if there are none, backups that do.
#[derive(Clone, Debug, Default)]
pub struct Tier {
    /// Indices into [`Pool::backends`].
    members: Vec<u32>,
    /// Weight of each member.
    weights: Vec<u32>,
    /// Running sum of weights (weighted random).
    cumulative: Vec<u64>,
    /// The round-robin schedule: member indices in smooth weighted order, one period
    /// (round robin only).
    schedule: Vec<u32>,
    /// Sum of weights.
    total_weight: u64,
    /// Stable hash of each member's address (rendezvous).
    member_hashes: Vec<u64>,
    /// Prebuilt Maglev table (maglev only).
    maglev: Option<MaglevTable>,
    /// Whether the members are backups (no primary is available).
    backup: bool,
    /// Whether the members are primaries taken regardless of health (`fail-open`).
    fail_open: bool,
}

impl Tier {
    /// Builds the tier of `backends` for scheduler `kind`: the primaries that take new flows;
    /// when there are none, what `all_down` says.
    pub fn build(kind: SchedulerKind, backends: &[Backend], all_down: AllDownPolicy) -> Tier {
        let eligible = |keep: &dyn Fn(&Backend) -> bool| -> Vec<u32> {
            backends
                .iter()
                .enumerate()
                .filter(|(_, b)| keep(b))
                .map(|(i, _)| i as u32)
                .collect()
        };
        let mut members = eligible(&|b| !b.spec.backup && b.takes_new_flows());
        let mut backup = false;
        let mut fail_open = false;
        if members.is_empty() && all_down != AllDownPolicy::Drop {
            members = eligible(&|b| b.spec.backup && b.takes_new_flows());
            backup = !members.is_empty();
        }
        if members.is_empty() && all_down == AllDownPolicy::FailOpen {
            members = eligible(&|b| !b.spec.backup && b.admin == AdminState::Enabled);
            fail_open = !members.is_empty();
        }
        let weights: Vec<u32> = members
            .iter()
            .map(|&i| backends[i as usize].weight.max(1))
            .collect();
        let cumulative: Vec<u64> = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        let total_weight = cumulative.last().copied().unwrap_or(0);
        let member_hashes = members
            .iter()
            .map(|&i| {
                let mut buf = [0u8; 18];
                let len = backend_hash_input(&backends[i as usize].spec.addr, &mut buf);
                stable_hash(&buf[..len])
            })
            .collect();
        let schedule = if kind == SchedulerKind::RoundRobin {
            smooth_schedule(&weights)
        } else {
            Vec::new()
        };
        let maglev = if kind == SchedulerKind::Maglev {
            let m: Vec<_> = members
                .iter()
                .zip(&weights)
                .map(|(&i, &w)| (backends[i as usize].spec.addr, w))
                .collect();
            MaglevTable::build(&m)
        } else {
            None
        };
        Tier {
            members,
            weights,
            cumulative,
            schedule,
            total_weight,
            member_hashes,
            maglev,
            backup,
            fail_open,
        }
    }

    /// Whether no backend is eligible.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Number of eligible backends.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the eligible backends are backups.
    pub fn is_backup(&self) -> bool {
        self.backup
    }

    /// Whether no backend was up and `fail-open` put every enabled primary in the tier.
    pub fn is_fail_open(&self) -> bool {
        self.fail_open
    }

    /// Whether backend `index` of the pool is a member (may receive new flows).
    #[inline]
    pub fn contains(&self, index: usize) -> bool {
        self.members.contains(&(index as u32))
    }

    /// The Maglev table (maglev only) as backend positions in the pool: entry `i` is the
    /// backend of the clients whose key maps to slot `i` (what a data plane outside this
    /// process indexes to place a client as this one does).
    pub fn maglev_backends(&self) -> Option<Vec<u32>> {
        let table = self.maglev.as_ref()?;
        Some(
            table
                .entries()
                .iter()
                .map(|&m| self.members[m as usize])
                .collect(),
        )
    }

    /// The round-robin schedule (round robin only) as backend positions in the pool: one
    /// period, each backend as often as its weight (scaled) says.
    pub fn schedule_backends(&self) -> Vec<u32> {
        self.schedule
            .iter()
            .map(|&m| self.members[m as usize])
            .collect()
    }

    /// Indices into [`Pool::backends`] of the eligible backends.
    pub fn members(&self) -> impl Iterator<Item = usize> + '_ {
        self.members.iter().map(|&i| i as usize)
    }
}

/// A pool's round-robin position, shared by every worker and carried from snapshot to
/// snapshot (so a health flip or reload does not send the next clients to the first backend
/// again).
#[derive(Debug, Default)]
pub struct Sequence(AtomicU64);

impl Sequence {
    /// The next position (relaxed: only the spread matters, not an order between workers).
    #[inline]
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// What a decision may depend on besides the pool.
#[derive(Clone, Copy, Debug)]
pub struct PickInput<'a> {
    /// Stable hash of the client (consistent-hash schedulers).
    pub key: ClientKey,
    /// A fresh random number (random schedulers).
    pub random: u64,
    /// Live flows per backend on this worker, indexed by [`crate::snapshot::BackendId`]
    /// (least-flows, power-of-two); missing entries count as zero.
    pub load: &'a [u32],
}

/// Picks a backend of `pool` for a new flow (or a datagram). Returns its index in
/// [`Pool::backends`], or `None` when no backend is eligible.
#[inline]
pub fn pick(pool: &Pool, input: PickInput<'_>) -> Option<usize> {
    let tier = &pool.tier;
    let n = tier.members.len();
    if n == 0 {
        return None;
    }
    let member = match pool.scheduler {
        SchedulerKind::RoundRobin => {
            let at = pool.sequence.next() % tier.schedule.len() as u64;
            tier.schedule[at as usize] as usize
        }
        SchedulerKind::Random => {
            let r = scale(input.random, tier.total_weight);
            tier.cumulative.partition_point(|&c| c <= r)
        }
        SchedulerKind::LeastFlows => least_loaded(pool, input.load),
        SchedulerKind::PowerOfTwo => power_of_two(pool, input),
        SchedulerKind::Maglev => match &tier.maglev {
            Some(table) => table.lookup(input.key.0),
            None => return None,
        },
        SchedulerKind::Rendezvous => rendezvous(tier, input.key),
    };
    Some(tier.members[member] as usize)
}

/// The longest round-robin schedule: weights whose sum (divided by their greatest common
/// divisor) is larger are scaled down to it, which keeps the proportions to within 1 / this.
const SCHEDULE_MAX: u64 = 1 << 14;

/// One period of nginx's smooth weighted round robin over members of `weights`: every member
/// gains its weight, the richest is picked and pays the total. Exact proportions over the
/// period, interleaved. Built with the snapshot, never per decision.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut weights: Vec<u64> = weights.iter().map(|&w| u64::from(w / divisor)).collect();
    let total: u64 = weights.iter().sum();
    if total > SCHEDULE_MAX.max(weights.len() as u64) {
        let cap = SCHEDULE_MAX.max(weights.len() as u64);
        for w in &mut weights {
            *w = (*w * cap / total).max(1);
        }
    }
    let total: u64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Maps a uniform 64-bit number onto `0..n` without a division.
#[inline]
fn scale(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

/// Live flows of member `m` on this worker.
#[inline]
fn load_of(pool: &Pool, m: usize, load: &[u32]) -> u64 {
    let backend = &pool.backends[pool.tier.members[m] as usize];
    u64::from(load.get(backend.id.index()).copied().unwrap_or(0))
}

/// Whether member `a` is less loaded than `b` relative to their weights.
#[inline]
fn lighter(pool: &Pool, a: usize, b: usize, load: &[u32]) -> bool {
    let w = &pool.tier.weights;
    load_of(pool, a, load) * u64::from(w[b]) < load_of(pool, b, load) * u64::from(w[a])
}

/// The member with the fewest flows per weight; ties go round robin (the pool's sequence).
fn least_loaded(pool: &Pool, load: &[u32]) -> usize {
    let n = pool.tier.members.len();
    let start = (pool.sequence.next() % n as u64) as usize;
    let mut best = start;
    for step in 1..n {
        let m = (start + step) % n;
        if lighter(pool, m, best, load) {
            best = m;
        }
    }
    best
}

/// The lighter of two distinct random members.
fn power_of_two(pool: &Pool, input: PickInput<'_>) -> usize {
    let n = pool.tier.members.len() as u64;
    if n == 1 {
        return 0;
    }
    let a = scale(input.random, n);
    let b = (a + 1 + scale(input.random.rotate_left(32), n - 1)) % n;
    let (a, b) = (a as usize, b as usize);
    if lighter(pool, b, a, input.load) {
        b
    } else {
        a
    }
}

/// Weighted rendezvous: the member with the highest `weight / -ln(u)`, where `u` is a uniform
/// number drawn from the hash of (client, member).
fn rendezvous(tier: &Tier, key: ClientKey) -> usize {
    let mut best = 0;
    let mut best_score = f64::NEG_INFINITY;
    for (i, (&h, &w)) in tier.member_hashes.iter().zip(&tier.weights).enumerate() {
        let mixed = splitmix64(key.0 ^ h);
        // (mixed + 0.5) / 2^64 lies strictly inside (0, 1).
        let u = ((mixed >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(w) / -u.ln();
        if score > best_score {
            best_score = score;
            best = i;
        }
    }
    best
}

/// A fast, well-mixing bijection on 64-bit numbers.
#[inline]
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::model::BackendSpec;
    use crate::snapshot::{AdminState, BackendInput, PoolInput, Snapshot};

    fn snapshot(kind: SchedulerKind, backends: &[(u16, u32, bool)]) -> Snapshot {
        let backends = backends
            .iter()
            .map(|&(port, weight, backup)| BackendInput {
                spec: BackendSpec {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    weight,
                    backup,
                },
                admin: AdminState::Enabled,
                healthy: true,
                weight,
            })
            .collect();
        Snapshot::build(
            1,
            vec![],
            vec![PoolInput::new("p".into(), kind, backends)],
            None,
        )
    }

    fn counts(kind: SchedulerKind, backends: &[(u16, u32, bool)], picks: usize) -> Vec<usize> {
        let s = snapshot(kind, backends);
        let mut out = vec![0; backends.len()];
        let mut rng = 1u64;
        for i in 0..picks {
            rng = splitmix64(rng);
            let input = PickInput {
                key: ClientKey(splitmix64(i as u64)),
                random: rng,
                load: &[],
            };
            out[pick(&s.pools[0], input).unwrap()] += 1;
        }
        out
    }

    const ANY: PickInput<'static> = PickInput {
        key: ClientKey(0),
        random: 0,
        load: &[],
    };

    #[test]
    fn round_robin_is_exact_and_honours_weights() {
        assert_eq!(
            counts(
                SchedulerKind::RoundRobin,
                &[(1, 1, false), (2, 1, false), (3, 1, false)],
                12
            ),
            [4, 4, 4]
        );
        assert_eq!(
            counts(
                SchedulerKind::RoundRobin,
                &[(1, 1, false), (2, 2, false)],
                9
            ),
            [3, 6]
        );
        let s = snapshot(
            SchedulerKind::RoundRobin,
            &[(1, 5, false), (2, 1, false), (3, 1, false)],
        );
        let seq: Vec<usize> = (0..7).map(|_| pick(&s.pools[0], ANY).unwrap()).collect();
        // nginx's documented sequence for weights 5,1,1.
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    /// Workers share one sequence per pool, and a new snapshot of the pool keeps it: a few
    /// clients arriving on different workers, or across a health flip, still spread over
    /// every backend.
    #[test]
    fn round_robin_spreads_across_workers_and_snapshots() {
        let s = snapshot(
            SchedulerKind::RoundRobin,
            &[(1, 1, false), (2, 1, false), (3, 1, false)],
        );
        let pool = &s.pools[0];
        // Worker 0 takes two clients, worker 1 one: three backends.
        let (w0, w1) = (pool.clone(), pool.clone());
        let mut got = vec![
            pick(&w0, ANY).unwrap(),
            pick(&w1, ANY).unwrap(),
            pick(&w0, ANY).unwrap(),
        ];
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
        let next = Snapshot::build(
            2,
            vec![],
            vec![PoolInput::new(
                "p".into(),
                SchedulerKind::RoundRobin,
                s.pools[0]
                    .backends
                    .iter()
                    .map(|b| BackendInput::from(b.spec))
                    .collect(),
            )],
            Some(&s),
        );
        assert_eq!(pick(&next.pools[0], ANY), Some(0), "the sequence went on");
        assert_eq!(pick(&next.pools[0], ANY), Some(1));
    }

    #[test]
    fn large_weights_keep_their_proportions_in_a_bounded_schedule() {
        let weights = [10_000, 1, 9_999, 7];
        let schedule = smooth_schedule(&weights);
        assert!(schedule.len() as u64 <= SCHEDULE_MAX, "{}", schedule.len());
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let share = schedule.iter().filter(|&&m| m as usize == i).count() as f64
                / schedule.len() as f64;
            let want = f64::from(w) / f64::from(total);
            assert!((share - want).abs() < 1e-3, "member {i}: {share} vs {want}");
            assert!(share > 0.0, "member {i} is never picked");
        }
        // A common divisor keeps the period short.
        assert_eq!(smooth_schedule(&[300, 600]), [1, 0, 1]);
    }

    #[test]
    fn random_follows_weights() {
        let c = counts(
            SchedulerKind::Random,
            &[(1, 1, false), (2, 3, false)],
            40_000,
        );
        let share = c[1] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "{c:?}");
    }

    #[test]
    fn random_and_rendezvous_spread() {
        for kind in [
            SchedulerKind::Random,
            SchedulerKind::Rendezvous,
            SchedulerKind::Maglev,
        ] {
            let c = counts(kind, &[(1, 1, false), (2, 1, false), (3, 1, false)], 30_000);
            for x in &c {
                assert!((*x as f64 - 10_000.0).abs() < 800.0, "{kind}: {c:?}");
            }
        }
    }

    #[test]
    fn weighted_rendezvous_follows_weights() {
        let c = counts(
            SchedulerKind::Rendezvous,
            &[(1, 1, false), (2, 3, false)],
            40_000,
        );
        let share = c[1] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "{c:?}");
    }

    #[test]
    fn least_flows_prefers_the_least_loaded_per_weight() {
        let s = snapshot(
            SchedulerKind::LeastFlows,
            &[(1, 1, false), (2, 2, false), (3, 1, false)],
        );
        let load = [4, 6, 5];
        let input = PickInput {
            key: ClientKey(0),
            random: 0,
            load: &load,
        };
        // flows/weight: 4, 3, 5
        assert_eq!(pick(&s.pools[0], input), Some(1));
    }

    #[test]
    fn power_of_two_never_picks_the_heavier_of_two() {
        let s = snapshot(SchedulerKind::PowerOfTwo, &[(1, 1, false), (2, 1, false)]);
        let load = [100, 0];
        for r in 0..100u64 {
            let input = PickInput {
                key: ClientKey(0),
                random: splitmix64(r),
                load: &load,
            };
            assert_eq!(pick(&s.pools[0], input), Some(1));
        }
    }

    #[test]
    fn backups_only_when_no_primary() {
        let c = counts(
            SchedulerKind::RoundRobin,
            &[(1, 1, false), (2, 1, true)],
            10,
        );
        assert_eq!(c, [10, 0]);
        let mut s = snapshot(SchedulerKind::RoundRobin, &[(1, 1, false), (2, 1, true)]);
        s.pools[0].backends[0].healthy = false;
        s.pools[0].tier = Tier::build(
            SchedulerKind::RoundRobin,
            &s.pools[0].backends,
            AllDownPolicy::Backup,
        );
        assert!(s.pools[0].tier.is_backup());
        let input = PickInput {
            key: ClientKey(0),
            random: 0,
            load: &[],
        };
        assert_eq!(pick(&s.pools[0], input), Some(1));
    }

    #[test]
    fn all_down_policy_decides_where_new_flows_go() {
        let backends = [(1, 1, false), (2, 1, false), (3, 1, true)];
        let members = |policy, backup_up: bool| {
            let mut s = snapshot(SchedulerKind::RoundRobin, &backends);
            s.pools[0].backends[0].healthy = false;
            s.pools[0].backends[1].healthy = false;
            s.pools[0].backends[2].healthy = backup_up;
            let tier = Tier::build(SchedulerKind::RoundRobin, &s.pools[0].backends, policy);
            (
                (0..3).filter(|&i| tier.contains(i)).collect::<Vec<_>>(),
                tier.is_backup(),
                tier.is_fail_open(),
            )
        };
        assert_eq!(members(AllDownPolicy::Backup, true), (vec![2], true, false));
        assert_eq!(
            members(AllDownPolicy::Backup, false),
            (vec![], false, false)
        );
        assert_eq!(
            members(AllDownPolicy::FailOpen, true),
            (vec![2], true, false)
        );
        assert_eq!(
            members(AllDownPolicy::FailOpen, false),
            (vec![0, 1], false, true)
        );
        assert_eq!(members(AllDownPolicy::Drop, true), (vec![], false, false));
    }

    #[test]
    fn nothing_eligible_picks_nothing() {
        for kind in SchedulerKind::ALL {
            let mut s = snapshot(kind, &[(1, 1, false)]);
            s.pools[0].backends[0].admin = AdminState::Draining;
            s.pools[0].tier = Tier::build(kind, &s.pools[0].backends, AllDownPolicy::Backup);
            let input = PickInput {
                key: ClientKey(0),
                random: 0,
                load: &[],
            };
            assert_eq!(pick(&s.pools[0], input), None, "{kind}");
        }
    }

    #[test]
    fn consistent_schedulers_agree_whatever_the_random_input() {
        for kind in [SchedulerKind::Maglev, SchedulerKind::Rendezvous] {
            let s = snapshot(kind, &[(1, 1, false), (2, 1, false), (3, 1, false)]);
            for k in 0..1000 {
                let input = PickInput {
                    key: ClientKey(splitmix64(k)),
                    random: k,
                    load: &[],
                };
                let a = pick(&s.pools[0], input);
                let b = pick(
                    &s.pools[0],
                    PickInput {
                        random: !k,
                        ..input
                    },
                );
                assert_eq!(a, b);
            }
        }
    }
}
