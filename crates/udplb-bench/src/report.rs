//! Counting and reporting: the per-thread [`Tally`], merged into a [`Report`] that prints as
//! text or as one JSON object.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest latency the histogram holds, in µs (larger values are clamped to it).
const MAX_LATENCY_US: u64 = 60_000_000;

/// What one generator thread counted during the measured window.
pub struct Tally {
    /// Requests sent.
    pub sent: u64,
    /// Replies that completed their request in time.
    pub completed: u64,
    /// Requests that timed out (and were replaced).
    pub lost: u64,
    /// Replies that arrived after their request had timed out.
    pub late: u64,
    /// Sends the kernel refused (e.g. a refused connection while a target is down).
    pub send_errors: u64,
    /// Open loop: requests due while every slot of the window was busy, so not sent.
    pub window_full: u64,
    /// Round-trip latency of completed requests, µs.
    pub latency: Histogram<u64>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            sent: 0,
            completed: 0,
            lost: 0,
            late: 0,
            send_errors: 0,
            window_full: 0,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds"),
        }
    }
}

impl Tally {
    /// Records one completion that took `us` microseconds.
    pub fn complete(&mut self, us: u64) {
        self.completed += 1;
        self.latency.saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// Adds another thread's counts to these.
    pub fn merge(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.completed += other.completed;
        self.lost += other.lost;
        self.late += other.late;
        self.send_errors += other.send_errors;
        self.window_full += other.window_full;
        self.latency
            .add(&other.latency)
            .expect("histograms share bounds");
    }
}

/// The shape of a run, echoed in the report.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub flows: usize,
    pub outstanding: usize,
    pub size: usize,
    pub duration: Duration,
    /// A request unanswered this long is lost.
    pub timeout: Duration,
    /// Open loop: requests per second offered (closed loop: `None`).
    pub rate: Option<f64>,
}

/// What a run measured.
pub struct Report {
    pub shape: Shape,
    pub tally: Tally,
}

impl Report {
    /// Completions per second of the measured window.
    pub fn replies_per_sec(&self) -> f64 {
        self.tally.completed as f64 / self.shape.duration.as_secs_f64()
    }

    /// The latency at quantile `q` in µs (0 when nothing completed).
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.tally.latency.is_empty() {
            return 0;
        }
        self.tally.latency.value_at_quantile(q)
    }

    /// The latency at quantile `q` in µs over every request that was due, a lost one counted
    /// as taking the whole timeout (and, in an open loop, one not sent for a full window too):
    /// what a client sees, where [`Report::quantile_us`] shows only the answered requests.
    pub fn quantile_with_lost_us(&self, q: f64) -> u64 {
        let t = &self.tally;
        let unanswered = t.lost + t.window_full;
        if unanswered == 0 {
            return self.quantile_us(q);
        }
        let mut all = t.latency.clone();
        let timeout_us = u64::try_from(self.shape.timeout.as_micros()).unwrap_or(u64::MAX);
        all.saturating_record_n(timeout_us.clamp(1, MAX_LATENCY_US), unanswered);
        all.value_at_quantile(q)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.tally;
        serde_json::json!({
            "replies_per_sec": self.replies_per_sec().round(),
            "sent": t.sent,
            "completed": t.completed,
            "lost": t.lost,
            "late": t.late,
            "send_errors": t.send_errors,
            "window_full": t.window_full,
            "p50_us": self.quantile_us(0.5),
            "p99_us": self.quantile_us(0.99),
            "p999_us": self.quantile_us(0.999),
            "p99_with_lost_us": self.quantile_with_lost_us(0.99),
            "rate": self.shape.rate,
            "duration_s": self.shape.duration.as_secs_f64(),
            "flows": self.shape.flows,
            "outstanding": self.shape.outstanding,
            "size": self.shape.size,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, t) = (&self.shape, &self.tally);
        writeln!(
            f,
            "{} flows x {} outstanding x {} bytes for {:?}",
            s.flows, s.outstanding, s.size, s.duration
        )?;
        if let Some(rate) = s.rate {
            writeln!(
                f,
                "open loop at {rate:.0} requests/s ({} not sent: window full)",
                t.window_full
            )?;
        }
        writeln!(f, "replies/s   {:.0}", self.replies_per_sec())?;
        writeln!(
            f,
            "sent {}  completed {}  lost {}  late {}  send errors {}",
            t.sent, t.completed, t.lost, t.late, t.send_errors
        )?;
        write!(
            f,
            "latency µs  p50 {}  p99 {}  p99.9 {}  p99 with lost requests {}",
            self.quantile_us(0.5),
            self.quantile_us(0.99),
            self.quantile_us(0.999),
            self.quantile_with_lost_us(0.99)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(tally: Tally) -> Report {
        Report {
            shape: Shape {
                flows: 2,
                outstanding: 3,
                size: 64,
                duration: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rate: None,
            },
            tally,
        }
    }

    #[test]
    fn merges_and_reports() {
        let mut a = Tally {
            sent: 5,
            ..Tally::default()
        };
        a.complete(100);
        a.complete(200);
        let mut b = Tally {
            lost: 1,
            late: 2,
            ..Tally::default()
        };
        b.complete(300);
        a.merge(&b);
        let json = report(a).to_json();
        assert_eq!(json["completed"], 3);
        assert_eq!(json["replies_per_sec"], 2.0); // 3 / 2 s, rounded
        assert_eq!(json["lost"], 1);
        assert_eq!(json["late"], 2);
        assert_eq!(json["p50_us"], 200);
        for key in [
            "p99_us",
            "p999_us",
            "sent",
            "duration_s",
            "flows",
            "outstanding",
            "size",
        ] {
            assert!(json.get(key).is_some(), "{key} missing");
        }
    }

    #[test]
    fn lost_requests_count_as_the_timeout_in_the_tail() {
        let mut t = Tally {
            lost: 2,
            ..Tally::default()
        };
        for _ in 0..98 {
            t.complete(100);
        }
        let r = report(t);
        assert_eq!(r.quantile_us(0.99), 100, "answered requests only");
        // 2 of 100 requests took the whole timeout (1 s): the p99 is one of them.
        let p99 = r.quantile_with_lost_us(0.99);
        assert!((999_000..=1_001_000).contains(&p99), "{p99}");
        assert_eq!(r.to_json()["p99_with_lost_us"], p99);
    }

    #[test]
    fn without_losses_the_tail_is_the_answered_one() {
        let mut t = Tally::default();
        t.complete(100);
        t.complete(300);
        let r = report(t);
        assert_eq!(r.quantile_with_lost_us(0.99), r.quantile_us(0.99));
    }

    #[test]
    fn empty_run_reports_zero_latency() {
        let r = report(Tally::default());
        assert_eq!(r.quantile_us(0.99), 0);
        assert!(r.to_string().contains("replies/s   0"));
    }
}
