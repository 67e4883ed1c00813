//! Latency histograms with fixed bucket bounds.
//!
//! Owns: the bucket bounds udplb uses for every latency it reports (reply latency per backend,
//! health-check duration) and [`Histogram`], a plain value type that records microseconds and
//! merges. Writers that need single-writer atomics (the data plane) keep their own cells and
//! convert to a [`Histogram`] when read. Must not: read clocks (callers pass durations).

/// Upper bounds of the buckets in microseconds, ascending: 100 µs to 5 s. A sample goes to the
/// first bucket whose bound is at least the sample; larger samples only count in `+Inf`.
pub const BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// Number of cells a histogram keeps: one per bound plus the overflow (`+Inf`) cell.
pub const CELLS: usize = BOUNDS_US.len() + 1;

/// The cell a sample of `us` microseconds falls in.
#[inline]
pub fn cell_of(us: u64) -> usize {
    BOUNDS_US.partition_point(|&bound| bound < us)
}

/// Non-cumulative counts per cell and the sum of all samples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Samples per cell (not cumulative); the last cell is `+Inf`.
    pub cells: [u64; CELLS],
    /// Sum of all samples, in microseconds.
    pub sum_us: u64,
}

impl Histogram {
    /// Records one sample.
    pub fn record(&mut self, us: u64) {
        self.cells[cell_of(us)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Adds `other`'s samples to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.cells.iter_mut().zip(&other.cells) {
            *a += b;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.cells.iter().sum()
    }

    /// The bound (seconds) of the bucket the `q` quantile (0-1) falls in: at least that share
    /// of the samples took at most this long (`f64::INFINITY` beyond the last bound); `None`
    /// without samples.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bound, n) in self.cells_seconds() {
            seen += n;
            if seen >= rank {
                return Some(bound);
            }
        }
        Some(f64::INFINITY)
    }

    /// Each cell's upper bound in seconds (`f64::INFINITY` for the last) with its count, not
    /// cumulative.
    pub fn cells_seconds(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        BOUNDS_US
            .iter()
            .map(|&bound| bound as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(self.cells.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in [
            90, 200, 300, 400, 2_000, 2_000, 2_000, 2_000, 40_000, 9_000_000,
        ] {
            h.record(us);
        }
        assert_eq!(h.quantile(0.1), Some(0.0001));
        assert_eq!(h.quantile(0.5), Some(0.0025));
        assert_eq!(h.quantile(0.9), Some(0.05));
        assert_eq!(h.quantile(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn samples_fall_in_the_first_bucket_at_least_as_large() {
        assert_eq!(cell_of(0), 0);
        assert_eq!(cell_of(100), 0);
        assert_eq!(cell_of(101), 1);
        assert_eq!(cell_of(5_000_000), BOUNDS_US.len() - 1);
        assert_eq!(cell_of(5_000_001), BOUNDS_US.len());
        assert_eq!(cell_of(u64::MAX), BOUNDS_US.len());
    }

    #[test]
    fn every_sample_is_counted_once() {
        let mut h = Histogram::default();
        for us in [50, 300, 300, 7_000, 9_000_000] {
            h.record(us);
        }
        let c: Vec<(f64, u64)> = h.cells_seconds().collect();
        assert_eq!(c.len(), CELLS);
        assert_eq!(c[0], (0.0001, 1));
        assert_eq!(c[2], (0.0005, 2));
        assert_eq!(c[6], (0.01, 1));
        assert_eq!(c[CELLS - 1], (f64::INFINITY, 1));
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum_us, 50 + 600 + 7_000 + 9_000_000);
        let mut m = h.clone();
        m.merge(&h);
        assert_eq!(m.count(), 10);
        assert_eq!(m.sum_us, 2 * h.sum_us);
    }
}
