//! The closed-loop load generator.
//!
//! Each flow is a connected socket with `outstanding` slots. A slot holds one request in
//! flight: its payload carries (slot, generation), and a reply completes the slot only if the
//! generation still matches — a reply arriving after its request timed out is counted as late,
//! not as a completion. A completed or timed-out slot immediately sends its next request, so
//! the window stays full. Threads split the flows; counts and latencies are merged at the end.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

use crate::parse_duration;

/// Options of `udplb-bench load`.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Where to send (repeat for several; flows are spread round robin).
    #[arg(long = "target", required = true)]
    pub targets: Vec<SocketAddr>,
    /// Concurrent flows (each its own socket and source port).
    #[arg(long, default_value_t = 64)]
    pub flows: usize,
    /// Requests kept in flight per flow.
    #[arg(long, default_value_t = 8)]
    pub outstanding: usize,
    /// Payload bytes per request (at least 8).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured warmup before it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// A request without a reply after this long is lost (and replaced).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Generator threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
pub struct Report {
    args: LoadArgs,
    tally: Tally,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    completed: u64,
    lost: u64,
    late: u64,
    send_errors: u64,
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.completed += other.completed;
        self.lost += other.lost;
        self.late += other.late;
        self.send_errors += other.send_errors;
        match (&mut self.latency, other.latency) {
            (Some(h), Some(o)) => h.add(o).expect("same histogram bounds"),
            (None, o) => self.latency = o,
            _ => {}
        }
    }
}

impl Report {
    fn replies_per_sec(&self) -> f64 {
        self.tally.completed as f64 / self.args.duration.as_secs_f64()
    }

    fn quantile_us(&self, q: f64) -> u64 {
        self.tally
            .latency
            .as_ref()
            .map_or(0, |h| h.value_at_quantile(q))
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "replies_per_sec": self.replies_per_sec().round(),
            "sent": self.tally.sent,
            "completed": self.tally.completed,
            "lost": self.tally.lost,
            "late": self.tally.late,
            "send_errors": self.tally.send_errors,
            "p50_us": self.quantile_us(0.5),
            "p99_us": self.quantile_us(0.99),
            "p999_us": self.quantile_us(0.999),
            "duration_s": self.args.duration.as_secs_f64(),
            "flows": self.args.flows,
            "outstanding": self.args.outstanding,
            "size": self.args.size,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.tally;
        writeln!(
            f,
            "{} flows x {} outstanding x {} bytes for {:?}",
            self.args.flows, self.args.outstanding, self.args.size, self.args.duration
        )?;
        writeln!(f, "replies/s  {:.0}", self.replies_per_sec())?;
        writeln!(
            f,
            "sent {}  completed {}  lost {}  late {}  send errors {}",
            t.sent, t.completed, t.lost, t.late, t.send_errors
        )?;
        write!(
            f,
            "latency us  p50 {}  p99 {}  p99.9 {}",
            self.quantile_us(0.5),
            self.quantile_us(0.99),
            self.quantile_us(0.999)
        )
    }
}

/// Runs the load and reports.
pub fn run(args: &LoadArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.size >= 8,
        "--size must be at least 8 (slot and generation)"
    );
    anyhow::ensure!(
        args.flows >= 1 && args.outstanding >= 1 && args.threads >= 1,
        "flows, outstanding and threads must be positive"
    );
    anyhow::ensure!(
        args.outstanding <= u32::MAX as usize,
        "--outstanding too large"
    );
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + args.warmup;
    let until = measure_from + args.duration;
    let threads = args.threads.min(args.flows);
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let flows: Vec<usize> = (t..args.flows).step_by(threads).collect();
        let args = args.clone();
        handles.push(std::thread::spawn(move || {
            Generator::new(&args, &flows)?.run(start, measure_from, until)
        }));
    }
    let mut tally = Tally::default();
    for h in handles {
        tally.merge(h.join().expect("generator thread panicked")?);
    }
    Ok(Report {
        args: args.clone(),
        tally,
    })
}

/// One request in flight.
#[derive(Clone, Copy)]
struct Slot {
    generation: u32,
    sent_at: Instant,
}

struct Flow {
    socket: UdpSocket,
    slots: Vec<Slot>,
}

struct Generator {
    poll: Poll,
    flows: Vec<Flow>,
    payload: Vec<u8>,
    timeout: Duration,
    tally: Tally,
    buf: Vec<u8>,
}

impl Generator {
    fn new(args: &LoadArgs, flow_ids: &[usize]) -> io::Result<Generator> {
        let poll = Poll::new()?;
        let mut flows = Vec::with_capacity(flow_ids.len());
        for (i, &id) in flow_ids.iter().enumerate() {
            let target = args.targets[id % args.targets.len()];
            let local: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .expect("literal");
            let mut socket = UdpSocket::bind(local)?;
            socket.connect(target)?;
            poll.registry()
                .register(&mut socket, Token(i), Interest::READABLE)?;
            let now = Instant::now();
            flows.push(Flow {
                socket,
                slots: vec![
                    Slot {
                        generation: 0,
                        sent_at: now
                    };
                    args.outstanding
                ],
            });
        }
        Ok(Generator {
            poll,
            flows,
            payload: vec![0x55; args.size],
            timeout: args.timeout,
            tally: Tally::default(),
            buf: vec![0; 65_536],
        })
    }

    fn run(mut self, start: Instant, measure_from: Instant, until: Instant) -> io::Result<Tally> {
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        let mut latency =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        for f in 0..self.flows.len() {
            for s in 0..self.flows[f].slots.len() {
                self.send(f, s, false);
            }
        }
        let mut events = Events::with_capacity(1024);
        let mut next_timeout_scan = Instant::now() + self.timeout / 4;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            self.poll
                .poll(&mut events, Some(Duration::from_millis(10)))?;
            for ev in events.iter() {
                let now = Instant::now();
                let measuring = now >= measure_from && now < until;
                self.receive_all(ev.token().0, now, measuring, &mut latency);
            }
            let now = Instant::now();
            if now >= next_timeout_scan {
                self.expire(now, now >= measure_from);
                next_timeout_scan = now + self.timeout / 4;
            }
        }
        self.tally.latency = Some(latency);
        Ok(self.tally)
    }

    /// Sends the next request of slot `s` of flow `f`.
    fn send(&mut self, f: usize, s: usize, measuring: bool) {
        let flow = &mut self.flows[f];
        let slot = &mut flow.slots[s];
        slot.generation = slot.generation.wrapping_add(1);
        slot.sent_at = Instant::now();
        self.payload[..4].copy_from_slice(&(s as u32).to_le_bytes());
        self.payload[4..8].copy_from_slice(&slot.generation.to_le_bytes());
        match flow.socket.send(&self.payload) {
            Ok(_) if measuring => self.tally.sent += 1,
            Ok(_) => {}
            Err(_) => self.tally.send_errors += 1,
        }
    }

    /// Reads every queued reply of flow `f`, completing and refilling slots.
    fn receive_all(
        &mut self,
        f: usize,
        now: Instant,
        measuring: bool,
        latency: &mut Histogram<u64>,
    ) {
        loop {
            let n = match self.flows[f].socket.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue, // e.g. ECONNREFUSED while a target restarts; keep going
            };
            let Some((s, generation)) = decode(&self.buf[..n]) else {
                continue;
            };
            let Some(slot) = self.flows[f].slots.get(s).copied() else {
                continue;
            };
            if slot.generation != generation {
                self.tally.late += u64::from(measuring);
                continue;
            }
            if measuring {
                self.tally.completed += 1;
                let us = now.duration_since(slot.sent_at).as_micros() as u64;
                latency.saturating_record(us.max(1));
            }
            self.send(f, s, measuring);
        }
    }

    /// Replaces requests that have waited longer than the timeout, counting them lost.
    fn expire(&mut self, now: Instant, measuring: bool) {
        for f in 0..self.flows.len() {
            for s in 0..self.flows[f].slots.len() {
                if now.duration_since(self.flows[f].slots[s].sent_at) >= self.timeout {
                    self.tally.lost += u64::from(measuring);
                    self.send(f, s, measuring);
                }
            }
        }
    }
}

/// (slot, generation) from a reply: echo backends return the request unchanged.
fn decode(reply: &[u8]) -> Option<(usize, u32)> {
    let head = reply.get(..8)?;
    let slot = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let generation = u32::from_le_bytes(head[4..8].try_into().ok()?);
    Some((slot, generation))
}
