//! Health as state machines: a backend's stream of check results and passive signals (refused
//! datagrams, unanswered requests, replies) becomes up or down with rise/fall hysteresis and a
//! back-off after passive ejections ([`Tracker`]); a pool's number of up backends becomes
//! quorum held or lost with hysteresis ([`QuorumState`]).
//!
//! Owns: when a backend or a pool changes state. Must not: run checks, read clocks or log; the
//! control plane feeds results in and acts on the returned transitions (publish a snapshot, run
//! notify hooks, log the flip).

use std::time::Duration;

use crate::time::Time;

/// How many consecutive results flip a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive successes that bring a down backend up (≥ 1).
    pub rise: u32,
    /// Consecutive failures that take an up backend down (≥ 1).
    pub fall: u32,
    /// Passive failures in a row (refused datagrams, unanswered requests, with no reply from
    /// the backend in between) that take an up backend down between active checks; 0 disables
    /// passive ejection.
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

/// How long a passively ejected backend stays out before it may come back: the first time,
/// then doubled for every ejection in a row, at most [`HOLD_DOWN_MAX`].
pub const HOLD_DOWN_BASE: Duration = Duration::from_secs(1);
/// The longest hold-down.
pub const HOLD_DOWN_MAX: Duration = Duration::from_secs(60);
/// Passive failures further apart than this do not add up: the count starts over.
pub const PASSIVE_WINDOW: Duration = Duration::from_secs(30);

/// What the data plane saw of one backend since the last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Passive {
    /// Passive failure signals: refused datagrams, requests left unanswered.
    pub failures: u64,
    /// Whether the backend sent any reply.
    pub answered: bool,
}

/// One backend's health, fed with active check results and passive signals.
///
/// Passive ejection holds the backend down for a while (exponential back-off over ejections
/// in a row): an active check cannot bring it back before the hold-down ends, so a backend
/// that passes checks but drops real traffic does not flap at the check rate. A backend without
/// an active check comes back through a recovery probe once the hold-down is over
/// ([`Tracker::recovery_due`], [`Tracker::record_recovery`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    state: Health,
    /// Consecutive active results that disagree with `state`.
    streak: u32,
    /// Passive failures in a row.
    passive: u32,
    /// When the last passive failure was counted.
    last_passive: Time,
    /// No result recorded yet.
    fresh: bool,
    /// Passive ejections in a row (the back-off exponent); cleared once the backend answers
    /// real traffic, or stays up for [`HOLD_DOWN_MAX`].
    ejections: u32,
    /// Passively ejected: no return before this.
    hold_until: Option<Time>,
    /// When it last came up.
    up_since: Time,
    /// When it last came back after being down (not its first result at startup): the start
    /// of its slow start.
    recovered_at: Option<Time>,
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
            last_passive: Time(0),
            fresh,
            ejections: 0,
            hold_until: None,
            up_since: Time(0),
            recovered_at: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Passive ejections in a row (cleared once the backend answers real traffic).
    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// When a passive ejection's hold-down ends (`None`: not held down).
    pub fn hold_until(&self) -> Option<Time> {
        self.hold_until
    }

    /// Records one active check result at `now`; returns the new state when it flipped. While a
    /// passive hold-down lasts, successes count but do not bring the backend back: the first
    /// success after it does, if `rise` were reached.
    pub fn record(&mut self, success: bool, now: Time, t: Thresholds) -> Option<Health> {
        if std::mem::take(&mut self.fresh) {
            // The first result at startup: no slow start (nothing was sent elsewhere for it).
            let flipped = success.then(|| self.flip(Health::Up, now));
            self.recovered_at = None;
            return flipped;
        }
        let agrees = (self.state == Health::Up) == success;
        if agrees {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if success { t.rise } else { t.fall }.max(1);
        if success && self.held(now) {
            self.streak = self.streak.min(needed - 1);
            return None;
        }
        (self.streak >= needed)
            .then(|| self.flip(if success { Health::Up } else { Health::Down }, now))
    }

    /// Records what the data plane saw of the backend since the last call; returns
    /// `Some(Down)` when it ejects the backend. A reply from the backend ends the run of
    /// failures (and proves a backend back from an ejection); failures seen in the same report
    /// as a reply are not counted, since their order is unknown.
    pub fn record_passive(&mut self, seen: Passive, now: Time, t: Thresholds) -> Option<Health> {
        if self.state == Health::Down {
            return None;
        }
        if seen.answered {
            self.passive = 0;
            self.ejections = 0;
            return None;
        }
        if seen.failures == 0 {
            if now.since(self.up_since) >= HOLD_DOWN_MAX {
                self.ejections = 0;
            }
            return None;
        }
        if t.passive_fall == 0 {
            return None;
        }
        if now.since(self.last_passive) > PASSIVE_WINDOW {
            self.passive = 0;
        }
        self.last_passive = now;
        self.passive = self
            .passive
            .saturating_add(u32::try_from(seen.failures).unwrap_or(u32::MAX));
        if self.passive < t.passive_fall {
            return None;
        }
        self.ejections = self.ejections.saturating_add(1);
        self.hold_until = Some(now.after(hold_down(self.ejections)));
        Some(self.flip(Health::Down, now))
    }

    /// Whether a backend without an active check should be probed now: it was ejected
    /// passively and its hold-down is over.
    pub fn recovery_due(&self, now: Time) -> bool {
        self.state == Health::Down && self.hold_until.is_some_and(|h| h <= now)
    }

    /// Records the recovery probe of a backend without an active check: success brings it
    /// back; failure holds it down for the next, longer, hold-down.
    pub fn record_recovery(&mut self, success: bool, now: Time) -> Option<Health> {
        if self.state == Health::Up {
            return None;
        }
        if success {
            return Some(self.flip(Health::Up, now));
        }
        self.ejections = self.ejections.saturating_add(1);
        self.hold_until = Some(now.after(hold_down(self.ejections)));
        None
    }

    /// Slow start: the share of its weight the backend gets at `now`, ramping from 0 to 1 over
    /// `window` after it came back up (1 when not ramping, or without a window).
    pub fn ramp(&self, now: Time, window: Duration) -> f64 {
        match self.recovered_at {
            Some(at) if self.state == Health::Up && !window.is_zero() => {
                (now.since(at).as_secs_f64() / window.as_secs_f64()).min(1.0)
            }
            _ => 1.0,
        }
    }

    fn held(&self, now: Time) -> bool {
        self.hold_until.is_some_and(|h| now < h)
    }

    fn flip(&mut self, to: Health, now: Time) -> Health {
        self.state = to;
        self.streak = 0;
        self.passive = 0;
        if to == Health::Up {
            self.up_since = now;
            self.hold_until = None;
            self.recovered_at = Some(now);
        }
        to
    }
}

/// The hold-down after the `ejections`-th passive ejection in a row.
pub fn hold_down(ejections: u32) -> Duration {
    let doublings = ejections.saturating_sub(1).min(16);
    (HOLD_DOWN_BASE * (1u32 << doublings)).min(HOLD_DOWN_MAX)
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

    /// Feeds `results` (one per second) and returns the index of each flip with its new state.
    fn flips(tracker: &mut Tracker, results: &[bool], t: Thresholds) -> Vec<(usize, Health)> {
        results
            .iter()
            .enumerate()
            .filter_map(|(i, &ok)| tracker.record(ok, Time(i as u64 * 1000), t).map(|h| (i, h)))
            .collect()
    }

    fn failures(n: u64) -> Passive {
        Passive {
            failures: n,
            answered: false,
        }
    }

    const ANSWERED: Passive = Passive {
        failures: 0,
        answered: true,
    };

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
        assert_eq!(tr.record(true, Time(0), T), Some(Health::Up));

        let mut tr = Tracker::new(Initial::Down);
        assert_eq!(tr.record(false, Time(0), T), None);
        // After a first failure, the usual rise applies.
        assert_eq!(flips(&mut tr, &[true, true], T), [(1, Health::Up)]);
    }

    #[test]
    fn passive_failures_in_a_row_eject_and_a_reply_ends_the_row() {
        let mut tr = Tracker::new(Initial::Up);
        assert_eq!(tr.record_passive(failures(1), Time(100), T), None);
        assert_eq!(tr.record_passive(ANSWERED, Time(200), T), None);
        assert_eq!(tr.record_passive(failures(1), Time(300), T), None);
        // An active success does not end the row: the backend passes checks but not traffic.
        assert_eq!(tr.record(true, Time(350), T), None);
        assert_eq!(
            tr.record_passive(failures(1), Time(400), T),
            Some(Health::Down)
        );
        assert_eq!(tr.record_passive(failures(5), Time(500), T), None, "down");
        // Several failures in one report count as several.
        let mut tr = Tracker::new(Initial::Up);
        assert_eq!(
            tr.record_passive(failures(2), Time(100), T),
            Some(Health::Down)
        );
        // Failures reported with a reply are not counted (their order is unknown).
        let mut tr = Tracker::new(Initial::Up);
        let mixed = Passive {
            failures: 5,
            answered: true,
        };
        assert_eq!(tr.record_passive(mixed, Time(100), T), None);
        assert_eq!(tr.record_passive(failures(1), Time(200), T), None);
        let off = Thresholds {
            passive_fall: 0,
            ..T
        };
        let mut tr = Tracker::new(Initial::Up);
        assert!((0..10).all(|i| tr.record_passive(failures(9), Time(i), off).is_none()));
    }

    #[test]
    fn failures_far_apart_do_not_add_up() {
        let mut tr = Tracker::new(Initial::Up);
        let window = PASSIVE_WINDOW.as_millis() as u64;
        assert_eq!(tr.record_passive(failures(1), Time(1_000), T), None);
        assert_eq!(
            tr.record_passive(failures(1), Time(2_000 + window), T),
            None,
            "the first one is too old to count"
        );
        assert_eq!(
            tr.record_passive(failures(1), Time(3_000 + window), T),
            Some(Health::Down)
        );
    }

    #[test]
    fn a_passive_ejection_holds_the_backend_down_against_passing_checks() {
        let t = Thresholds { rise: 1, ..T };
        let mut tr = Tracker::new(Initial::Up);
        assert_eq!(
            tr.record_passive(failures(2), Time(10_000), t),
            Some(Health::Down)
        );
        assert_eq!(tr.hold_until(), Some(Time(11_000)));
        assert_eq!(tr.record(true, Time(10_500), t), None, "held down");
        assert_eq!(tr.record(true, Time(11_000), t), Some(Health::Up));
        assert_eq!(tr.hold_until(), None);
        // Ejected again at once: the hold-down doubles.
        assert_eq!(
            tr.record_passive(failures(2), Time(12_000), t),
            Some(Health::Down)
        );
        assert_eq!(tr.hold_until(), Some(Time(14_000)));
        // With rise 2, successes during the hold-down count up to rise - 1.
        let t2 = Thresholds { rise: 2, ..T };
        assert_eq!(tr.record(true, Time(12_500), t2), None);
        assert_eq!(tr.record(true, Time(13_000), t2), None);
        assert_eq!(tr.record(true, Time(14_000), t2), Some(Health::Up));
    }

    #[test]
    fn without_checks_a_recovery_probe_brings_it_back_after_a_growing_hold_down() {
        let mut tr = Tracker::new(Initial::Up);
        assert_eq!(
            tr.record_passive(failures(3), Time(0), T),
            Some(Health::Down)
        );
        assert!(!tr.recovery_due(Time(999)));
        assert!(tr.recovery_due(Time(1_000)));
        // Still refused: held down twice as long.
        assert_eq!(tr.record_recovery(false, Time(1_000)), None);
        assert!(!tr.recovery_due(Time(2_999)));
        assert!(tr.recovery_due(Time(3_000)));
        assert_eq!(tr.record_recovery(true, Time(3_000)), Some(Health::Up));
        assert!(!tr.recovery_due(Time(3_000)));
        // Not proven yet: the next ejection holds it down longer (the third in a row).
        assert_eq!(
            tr.record_passive(failures(3), Time(4_000), T),
            Some(Health::Down)
        );
        assert_eq!(tr.hold_until(), Some(Time(8_000)));
        // A reply after it came back resets the back-off.
        assert_eq!(tr.record_recovery(true, Time(8_000)), Some(Health::Up));
        assert_eq!(tr.record_passive(ANSWERED, Time(8_100), T), None);
        assert_eq!(
            tr.record_passive(failures(3), Time(9_000), T),
            Some(Health::Down)
        );
        assert_eq!(tr.hold_until(), Some(Time(10_000)));
        // So does staying up for the longest hold-down.
        assert_eq!(tr.record_recovery(true, Time(10_000)), Some(Health::Up));
        assert_eq!(
            tr.record_passive(failures(3), Time(10_500), T),
            Some(Health::Down)
        );
        assert_eq!(tr.hold_until(), Some(Time(12_500)));
        assert_eq!(tr.record_recovery(true, Time(12_500)), Some(Health::Up));
        let quiet = Time(12_500 + HOLD_DOWN_MAX.as_millis() as u64);
        assert_eq!(tr.record_passive(Passive::default(), quiet, T), None);
        assert_eq!(tr.record_passive(failures(3), quiet, T), Some(Health::Down));
        assert_eq!(tr.hold_until(), Some(quiet.after(HOLD_DOWN_BASE)));
    }

    #[test]
    fn slow_start_ramps_after_a_recovery_but_not_at_startup() {
        let window = Duration::from_secs(10);
        let mut tr = Tracker::new(Initial::Down);
        assert_eq!(tr.record(true, Time(1_000), T), Some(Health::Up));
        assert_eq!(tr.ramp(Time(1_000), window), 1.0, "first result: no ramp");
        let t1 = Thresholds {
            rise: 1,
            fall: 1,
            ..T
        };
        assert_eq!(tr.record(false, Time(2_000), t1), Some(Health::Down));
        assert_eq!(tr.ramp(Time(2_500), window), 1.0, "down: not ramping");
        assert_eq!(tr.record(true, Time(3_000), t1), Some(Health::Up));
        assert_eq!(tr.ramp(Time(3_000), window), 0.0);
        assert_eq!(tr.ramp(Time(8_000), window), 0.5);
        assert_eq!(tr.ramp(Time(13_000), window), 1.0);
        assert_eq!(tr.ramp(Time(3_000), Duration::ZERO), 1.0, "no window");
    }

    #[test]
    fn hold_down_doubles_up_to_its_maximum() {
        let seq: Vec<u64> = (1..10).map(|e| hold_down(e).as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(hold_down(u32::MAX), HOLD_DOWN_MAX);
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
