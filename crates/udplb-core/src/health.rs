//! Health as state machines: a backend's stream of check results becomes up or down with
//! rise/fall hysteresis ([`Tracker`]); a pool's number of up backends becomes quorum held or
//! lost with hysteresis ([`QuorumState`]).
//!
//! Owns: when a backend or a pool changes state. Must not: run checks, read clocks or log; the
//! control plane feeds results in and acts on the returned transitions (publish a snapshot, run
//! notify hooks, log the flip).

/// How many consecutive results flip a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive successes that bring a down backend up (≥ 1).
    pub rise: u32,
    /// Consecutive failures that take an up backend down (≥ 1).
    pub fall: u32,
    /// Consecutive passive failures (ICMP unreachable, reply timeouts) that take an up backend
    /// down between active checks; 0 disables passive ejection.
    pub passive_fall: u32,
}

/// A backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Receives traffic.
    Up,
    /// Receives nothing.
    Down,
}

/// The state a backend starts in, before any check has run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Initial {
    /// Down until the first check passes; that first result decides at once (keepalived's
    /// `alpha`): no datagram goes to a backend that was never seen healthy, and none waits
    /// `rise` intervals for one that is.
    #[default]
    Down,
    /// Up until `fall` checks fail.
    Up,
}

/// One backend's health, fed with check results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    state: Health,
    /// Consecutive active results that disagree with `state`.
    streak: u32,
    /// Consecutive passive failures since the last active success.
    passive: u32,
    /// No result recorded yet.
    fresh: bool,
}

impl Tracker {
    /// A tracker in its initial state.
    pub fn new(initial: Initial) -> Tracker {
        let (state, fresh) = match initial {
            Initial::Down => (Health::Down, true),
            Initial::Up => (Health::Up, false),
        };
        Tracker {
            state,
            streak: 0,
            passive: 0,
            fresh,
        }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one active check result; returns the new state when it flipped.
    pub fn record(&mut self, success: bool, t: Thresholds) -> Option<Health> {
        if success {
            self.passive = 0;
        }
        if std::mem::take(&mut self.fresh) {
            return success.then(|| self.flip(Health::Up));
        }
        let agrees = (self.state == Health::Up) == success;
        if agrees {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if success { t.rise } else { t.fall };
        (self.streak >= needed.max(1))
            .then(|| self.flip(if success { Health::Up } else { Health::Down }))
    }

    /// Records a passive failure signal; returns `Some(Down)` when it ejects the backend.
    pub fn record_passive_failure(&mut self, t: Thresholds) -> Option<Health> {
        if t.passive_fall == 0 || self.state == Health::Down {
            return None;
        }
        self.passive += 1;
        (self.passive >= t.passive_fall).then(|| self.flip(Health::Down))
    }

    fn flip(&mut self, to: Health) -> Health {
        self.state = to;
        self.streak = 0;
        self.passive = 0;
        to
    }
}

/// A pool's quorum rule: it holds while at least `min_up` backends are up, is lost below that,
/// and is regained only at `min_up + hysteresis`, so a backend flapping at the edge does not
/// flap the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quorum {
    /// Up backends needed to hold quorum (0: always held).
    pub min_up: u32,
    /// Extra up backends needed to regain it once lost.
    pub hysteresis: u32,
}

/// Whether a pool has quorum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuorumState {
    held: bool,
}

impl Default for QuorumState {
    fn default() -> Self {
        QuorumState { held: true }
    }
}

impl QuorumState {
    /// The state for `up` backends when nothing was known before (at startup): no transition.
    pub fn settle(up: u32, q: Quorum) -> QuorumState {
        QuorumState {
            held: up >= q.min_up,
        }
    }

    /// Whether quorum is held.
    pub fn held(&self) -> bool {
        self.held
    }

    /// Updates with the number of up backends; returns the new value when it changed.
    pub fn update(&mut self, up: u32, q: Quorum) -> Option<bool> {
        let held = if self.held {
            up >= q.min_up
        } else {
            up >= q.min_up.saturating_add(q.hysteresis)
        };
        (held != self.held).then(|| {
            self.held = held;
            held
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 3,
        passive_fall: 2,
    };

    /// Feeds `results` and returns the index of each flip with its new state.
    fn flips(tracker: &mut Tracker, results: &[bool], t: Thresholds) -> Vec<(usize, Health)> {
        results
            .iter()
            .enumerate()
            .filter_map(|(i, &ok)| tracker.record(ok, t).map(|h| (i, h)))
            .collect()
    }

    #[test]
    fn down_after_exactly_fall_failures_up_after_exactly_rise_successes() {
        for rise in 1..5 {
            for fall in 1..5 {
                let t = Thresholds {
                    rise,
                    fall,
                    passive_fall: 0,
                };
                let mut tr = Tracker::new(Initial::Up);
                let mut results = vec![false; fall as usize];
                results.extend(vec![true; rise as usize]);
                assert_eq!(
                    flips(&mut tr, &results, t),
                    [
                        (fall as usize - 1, Health::Down),
                        ((fall + rise) as usize - 1, Health::Up)
                    ],
                    "rise {rise} fall {fall}"
                );
            }
        }
    }

    #[test]
    fn an_interrupted_streak_starts_over() {
        let mut tr = Tracker::new(Initial::Up);
        // fail, fail, ok, fail, fail, fail -> down only at the last one
        assert_eq!(
            flips(&mut tr, &[false, false, true, false, false, false], T),
            [(5, Health::Down)]
        );
        // ok, fail, ok, ok -> up at the last one
        assert_eq!(
            flips(&mut tr, &[true, false, true, true], T),
            [(3, Health::Up)]
        );
    }

    #[test]
    fn starting_down_the_first_result_decides() {
        let mut tr = Tracker::new(Initial::Down);
        assert_eq!(tr.state(), Health::Down);
        assert_eq!(tr.record(true, T), Some(Health::Up));

        let mut tr = Tracker::new(Initial::Down);
        assert_eq!(tr.record(false, T), None);
        // After a first failure, the usual rise applies.
        assert_eq!(flips(&mut tr, &[true, true], T), [(1, Health::Up)]);
    }

    #[test]
    fn passive_failures_eject_between_checks_and_reset_on_success() {
        let mut tr = Tracker::new(Initial::Up);
        assert_eq!(tr.record_passive_failure(T), None);
        assert_eq!(tr.record(true, T), None); // an active success clears the passive count
        assert_eq!(tr.record_passive_failure(T), None);
        assert_eq!(tr.record_passive_failure(T), Some(Health::Down));
        assert_eq!(tr.record_passive_failure(T), None, "already down");
        let off = Thresholds {
            passive_fall: 0,
            ..T
        };
        let mut tr = Tracker::new(Initial::Up);
        assert!((0..10).all(|_| tr.record_passive_failure(off).is_none()));
    }

    #[test]
    fn quorum_is_lost_below_min_and_regained_with_hysteresis() {
        let q = Quorum {
            min_up: 2,
            hysteresis: 1,
        };
        let mut s = QuorumState::default();
        let seq = [3, 2, 1, 2, 2, 3, 2, 1];
        let changes: Vec<(usize, bool)> = seq
            .iter()
            .enumerate()
            .filter_map(|(i, &up)| s.update(up, q).map(|h| (i, h)))
            .collect();
        assert_eq!(changes, [(2, false), (5, true), (7, false)]);
        let mut always = QuorumState::default();
        assert_eq!(
            always.update(
                0,
                Quorum {
                    min_up: 0,
                    hysteresis: 0
                }
            ),
            None
        );
    }
}
