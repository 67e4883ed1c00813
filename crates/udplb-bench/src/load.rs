//! `udplb-bench load`: its options, their checks, and the run as a whole — splitting the flows
//! over generator threads, starting them on a common clock, and merging what they counted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;

use crate::generator::{FlowSpec, Generator, Pace, Window};
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
    /// Open loop: offer this many requests per second in all, on a fixed schedule whatever
    /// the replies do (`--outstanding` then bounds the requests in flight per flow; one due
    /// while every slot is busy is not sent and counted as `window_full`). Without it, a
    /// closed loop: each reply sends the flow's next request at once.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
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
        if let Some(rate) = self.rate {
            anyhow::ensure!(
                rate.is_finite() && (1.0..=100e6).contains(&rate),
                "--rate must be between 1 and 100000000 requests per second"
            );
        }
        Ok(())
    }

    fn shape(&self) -> Shape {
        Shape {
            flows: self.flows,
            outstanding: self.outstanding,
            size: self.size,
            duration: self.duration,
            timeout: self.timeout,
            rate: self.rate,
        }
    }

    /// Open loop: the schedule of each of `threads` generator threads (the rate split evenly).
    fn pace(&self, threads: usize) -> Option<Pace> {
        self.rate.map(|rate| Pace {
            interval: Duration::from_secs_f64(threads as f64 / rate),
        })
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
        .map(|t| {
            Generator::new(
                &args.flows_of(t, threads),
                args.size,
                args.timeout,
                args.pace(threads),
            )
        })
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

    fn load_on(target: SocketAddr, extra: &[&str]) -> LoadArgs {
        let target = target.to_string();
        let mut argv = vec!["x", "--target", &target, "--warmup", "0s"];
        argv.extend_from_slice(extra);
        Wrap::parse_from(argv).load
    }

    /// A loopback socket that echoes every datagram (its thread ends after 2 s of silence).
    fn echo() -> SocketAddr {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let addr = s.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        });
        addr
    }

    #[test]
    fn an_open_loop_sends_on_its_schedule_and_gets_answers() {
        // 256 slots: the window fills only if the echo thread stalls for 128 ms (tests run in
        // parallel on a busy machine; 32 slots, 16 ms, were seen to fill).
        let args = load_on(
            echo(),
            &[
                "--flows",
                "4",
                "--outstanding",
                "64",
                "--rate",
                "2000",
                "--duration",
                "500ms",
            ],
        );
        let r = run(&args).unwrap();
        // 2000/s for 0.5 s: 1000 requests due. A closed loop on loopback would send far more.
        assert!((700..=1100).contains(&r.tally.sent), "{}", r);
        assert_eq!(r.tally.window_full, 0, "{}", r);
        assert!(r.tally.completed + 8 >= r.tally.sent, "{}", r);
        assert_eq!(r.to_json()["rate"], 2000.0);
    }

    #[test]
    fn an_open_loop_does_not_wait_for_a_silent_target() {
        // Nobody answers: every slot's request is lost, and what falls due while all slots
        // are busy is counted, not sent.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let args = load_on(
            silent.local_addr().unwrap(),
            &[
                "--flows",
                "2",
                "--outstanding",
                "2",
                "--rate",
                "2000",
                "--duration",
                "500ms",
                "--timeout",
                "100ms",
            ],
        );
        let r = run(&args).unwrap();
        assert_eq!(r.tally.completed, 0);
        assert!(r.tally.lost > 0, "{}", r);
        assert!(r.tally.window_full > r.tally.sent, "{}", r);
        assert!(
            (700..=1100).contains(&(r.tally.sent + r.tally.window_full)),
            "{}",
            r
        );
        // Every request it counted took the whole timeout (3 significant digits kept).
        let p99 = r.quantile_with_lost_us(0.99);
        assert!((99_900..=100_100).contains(&p99), "{}", r);
    }

    #[test]
    fn a_rate_is_split_over_the_threads() {
        let a = parse(&["--rate", "1000", "--threads", "2"]);
        a.check().unwrap();
        assert_eq!(a.pace(2).unwrap().interval, Duration::from_millis(2));
        assert!(parse(&[]).pace(1).is_none());
        assert!(parse(&["--rate", "0"]).check().is_err());
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
