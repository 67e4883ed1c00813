//! `udplb-bench load`: its options, their checks, and the run as a whole — splitting the flows
//! over generator threads, starting them on a common clock, and merging what they counted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;

use crate::generator::{FlowSpec, Generator, Window};
use crate::parse_duration;
use crate::report::{Report, Shape, Tally};
use crate::wire;

/// Options of `udplb-bench load`.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Where to send (repeat for several; flows are spread round robin).
    #[arg(long = "target", required = true, value_name = "ADDR")]
    pub targets: Vec<SocketAddr>,
    /// Concurrent flows (each its own connected socket, so its own source port).
    #[arg(long, default_value_t = 64)]
    pub flows: usize,
    /// Requests kept in flight per flow.
    #[arg(long, default_value_t = 8)]
    pub outstanding: usize,
    /// Payload bytes per request (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measured duration (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured warmup before it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// A request without a reply after this long is lost (and replaced).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Generator threads (flows are split over them).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print one JSON object line instead of text.
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.size >= wire::HEADER,
            "--size must be at least {} (sequence number and send time)",
            wire::HEADER
        );
        anyhow::ensure!(self.size <= 65_507, "--size must fit one UDP datagram");
        anyhow::ensure!(
            self.flows >= 1 && self.outstanding >= 1 && self.threads >= 1,
            "--flows, --outstanding and --threads must be positive"
        );
        anyhow::ensure!(
            u32::try_from(self.outstanding).is_ok(),
            "--outstanding too large"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        anyhow::ensure!(!self.timeout.is_zero(), "--timeout must be positive");
        Ok(())
    }

    fn shape(&self) -> Shape {
        Shape {
            flows: self.flows,
            outstanding: self.outstanding,
            size: self.size,
            duration: self.duration,
        }
    }

    /// The flows of generator thread `t` of `threads`: every `threads`-th flow from `t`.
    fn flows_of(&self, t: usize, threads: usize) -> Vec<FlowSpec> {
        (t..self.flows)
            .step_by(threads)
            .map(|id| FlowSpec {
                target: self.targets[id % self.targets.len()],
                outstanding: self.outstanding,
            })
            .collect()
    }
}

/// Runs the load and reports.
pub fn run(args: &LoadArgs) -> anyhow::Result<Report> {
    args.check()?;
    let threads = args.threads.min(args.flows);
    // Sockets are opened before the clock starts, so setup does not eat into the warmup.
    let generators = (0..threads)
        .map(|t| Generator::new(&args.flows_of(t, threads), args.size, args.timeout))
        .collect::<std::io::Result<Vec<_>>>()?;
    let window = Window::starting(Instant::now(), args.warmup, args.duration);
    let handles: Vec<_> = generators
        .into_iter()
        .map(|g| std::thread::spawn(move || g.run(window)))
        .collect();
    let mut tally = Tally::default();
    for h in handles {
        tally.merge(&h.join().expect("generator thread panicked")?);
    }
    Ok(Report {
        shape: args.shape(),
        tally,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn parse(extra: &[&str]) -> LoadArgs {
        let mut argv = vec!["x", "--target", "127.0.0.1:1", "--target", "127.0.0.1:2"];
        argv.extend_from_slice(extra);
        Wrap::parse_from(argv).load
    }

    #[test]
    fn defaults_and_durations() {
        let a = parse(&["--duration", "500ms"]);
        assert_eq!((a.flows, a.outstanding, a.size, a.threads), (64, 8, 64, 1));
        assert_eq!(a.duration, Duration::from_millis(500));
        assert_eq!(a.warmup, Duration::from_secs(1));
        assert_eq!(a.timeout, Duration::from_secs(1));
        a.check().unwrap();
    }

    #[test]
    fn small_payloads_are_refused() {
        assert!(parse(&["--size", "15"]).check().is_err());
        assert!(parse(&["--size", "16"]).check().is_ok());
    }

    #[test]
    fn flows_spread_over_threads_and_targets() {
        let a = parse(&["--flows", "5"]);
        let t0: Vec<u16> = a.flows_of(0, 2).iter().map(|f| f.target.port()).collect();
        let t1: Vec<u16> = a.flows_of(1, 2).iter().map(|f| f.target.port()).collect();
        assert_eq!(t0, [1, 1, 1]); // flows 0, 2, 4
        assert_eq!(t1, [2, 2]); // flows 1, 3
    }
}
