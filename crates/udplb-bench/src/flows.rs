//! `udplb-bench flows`: how a balancer scales with concurrent flows.
//!
//! One socket, bound to the wildcard address, stands for N clients: each flow sends from its
//! own loopback address (127.x.y.z, chosen per datagram with `IP_PKTINFO`), so the balancer sees
//! N distinct sources while the generator holds one descriptor. Three phases:
//!
//! 1. **open**: the first datagram of every flow, at most `--window` awaiting their replies; a
//!    flow is open when its reply is back (lost ones are sent again after `--timeout`). The
//!    rate is new flows per second, end to end.
//! 2. **memory**: with every flow open, the growth of the watched processes' resident memory
//!    (`VmRSS`) and of the kernel's slab (`Slab` in /proc/meminfo: sockets, files, epoll
//!    items) since before the open phase, per flow.
//! 3. **traffic**: a closed loop over all flows in turn, `--window` datagrams in flight, for
//!    `--duration`: replies per second with N flows live, and (with `--cpu`) the CPU time per
//!    exchange on established flows.
//!
//! Prints one JSON object. Only loopback is used: every source is in 127.0.0.0/8.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use clap::Args;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use udplb_sys::batch::{RecvBatch, SendBatch};
use udplb_sys::socket::{ListenerOptions, bind_listener};

use crate::cpustat::CpuTimes;
use crate::parse_duration;

/// Datagrams per `sendmmsg` / `recvmmsg`.
const BATCH: usize = 64;
/// Payload: the flow's number (4 bytes) and padding.
const PAYLOAD: usize = 32;
/// Flow `i` sends from 127.0.0.0 + FIRST_SOURCE + i (127.1.0.0 and up: clear of 127.0.0.1).
const FIRST_SOURCE: u32 = 1 << 16;

/// Options of `udplb-bench flows`.
#[derive(Args, Debug, Clone)]
pub struct FlowsArgs {
    /// The balancer's listener (an IPv4 loopback address).
    #[arg(long)]
    pub target: SocketAddr,
    /// Flows to open (distinct source addresses).
    #[arg(long, default_value_t = 10_000)]
    pub flows: u32,
    /// Datagrams in flight at once.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// A datagram without a reply after this long is sent again.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Give up opening flows after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub open_limit: Duration,
    /// Length of the traffic phase (0s: skip it).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Processes whose resident memory counts (the balancer's; repeat for several).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// The CPU the balancer is pinned to: its busy time during the open phase (from
    /// /proc/stat, so softirq work counts; steal does not) gives the CPU cost of a new flow.
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// Where the flows stand: per flow, when its datagram left (None: not in flight).
struct Flows {
    sent: Vec<Option<Instant>>,
    open: Vec<bool>,
    opened: u32,
    in_flight: usize,
    resent: u64,
}

pub fn run(args: &FlowsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.target.ip().is_loopback() && args.target.is_ipv4(),
        "--target must be an IPv4 loopback address"
    );
    anyhow::ensure!(
        args.flows >= 1 && args.flows < (1 << 24) - FIRST_SOURCE,
        "--flows must be between 1 and {}",
        (1 << 24) - FIRST_SOURCE - 1
    );
    anyhow::ensure!(args.window >= 1, "--window must be positive");
    let opts = ListenerOptions {
        reuse_port: false,
        recv_buffer: Some(8 << 20),
        send_buffer: Some(8 << 20),
        gro: false,
    };
    let socket = bind_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), &opts)?;
    let poll = Poll::new()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    poll.registry()
        .register(&mut SourceFd(&fd), Token(0), Interest::READABLE)?;
    let mut io = Io {
        poll,
        events: Events::with_capacity(4),
        socket,
        out: SendBatch::new(BATCH, PAYLOAD),
        inbox: RecvBatch::new(BATCH, PAYLOAD),
        target: args.target,
    };

    let before = Memory::sample(&args.pids)?;
    let mut flows = Flows {
        sent: vec![None; args.flows as usize],
        open: vec![false; args.flows as usize],
        opened: 0,
        in_flight: 0,
        resent: 0,
    };
    let open_before = args.cpu.map(CpuTimes::read).transpose()?;
    let started = Instant::now();
    open_all(&mut io, &mut flows, args)?;
    let open_secs = started.elapsed().as_secs_f64();
    let open_cpu = match (args.cpu, open_before) {
        (Some(cpu), Some(before)) => Some(CpuTimes::read(cpu)?.since(before)),
        _ => None,
    };
    let busy = open_cpu.map(|t| t.busy);
    // CPU time per new flow, and what one core fully busy would open per second.
    let cpu_ns_per_flow = busy.map(|b| round(b * 1e9 / f64::from(flows.opened.max(1)), 0));
    // Let the balancer finish its turn (gauges, batches) before reading memory.
    std::thread::sleep(Duration::from_millis(200));
    let after = Memory::sample(&args.pids)?;
    let traffic_before = args.cpu.map(CpuTimes::read).transpose()?;
    let (replies, lost) = traffic(&mut io, args)?;
    // CPU time per exchange (request and reply) on established flows, to set against the cost
    // of a new flow.
    let cpu_ns_per_reply = match (args.cpu, traffic_before) {
        (Some(cpu), Some(before)) if replies > 0 => Some(round(
            CpuTimes::read(cpu)?.since(before).busy * 1e9 / replies as f64,
            0,
        )),
        _ => None,
    };

    let n = f64::from(flows.opened.max(1));
    let rss = after.rss_kib as f64 - before.rss_kib as f64;
    let slab = after.slab_kib as f64 - before.slab_kib as f64;
    println!(
        "{}",
        serde_json::json!({
            "flows": args.flows,
            "opened": flows.opened,
            "open_seconds": round(open_secs, 3),
            "new_flows_per_s": round(f64::from(flows.opened) / open_secs, 0),
            "resent": flows.resent,
            "cpu_busy": busy.map(|b| round(b / open_secs, 3)),
            "cpu_steal": open_cpu.map(|t| round(t.steal / open_secs, 3)),
            "cpu_ns_per_new_flow": cpu_ns_per_flow,
            "new_flows_per_cpu_s": cpu_ns_per_flow.map(|ns| round(1e9 / ns.max(1.0), 0)),
            "rss_kib_per_flow": round(rss / n, 3),
            "slab_kib_per_flow": round(slab / n, 3),
            "kib_per_flow": round((rss + slab) / n, 3),
            "rss_growth_kib": rss,
            "slab_growth_kib": slab,
            "replies_per_s": round(replies as f64 / args.duration.as_secs_f64().max(1e-9), 0),
            "traffic_lost": lost,
            "cpu_ns_per_reply": cpu_ns_per_reply,
        })
    );
    Ok(())
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The generator's one socket and its batches.
struct Io {
    poll: Poll,
    events: Events,
    socket: std::net::UdpSocket,
    out: SendBatch,
    inbox: RecvBatch,
    target: SocketAddr,
}

impl Io {
    /// Queues one datagram of flow `i` (sent by [`Io::flush`] or when the batch fills).
    fn queue(&mut self, i: u32) -> io::Result<()> {
        if self.out.is_full() {
            self.flush()?;
        }
        let mut payload = [0u8; PAYLOAD];
        payload[..4].copy_from_slice(&i.to_le_bytes());
        self.out.push(&payload, self.target, Some(source_of(i)));
        Ok(())
    }

    /// Sends what is queued, waiting while the send buffer is full.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let outcome = self.out.flush(self.socket.as_fd());
            if outcome.blocked {
                std::thread::sleep(Duration::from_micros(50));
            } else if let Some(e) = outcome.last_error.filter(|_| outcome.failed > 0) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits up to `wait` for replies and calls `on_reply` with each one's flow number.
    fn receive(&mut self, wait: Duration, mut on_reply: impl FnMut(u32)) -> io::Result<()> {
        self.poll.poll(&mut self.events, Some(wait))?;
        loop {
            let n = match self.inbox.recv(self.socket.as_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            for k in 0..n {
                let d = self.inbox.get(k);
                if let Some(b) = d.data.get(..4) {
                    on_reply(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
            if n < self.inbox.capacity() {
                return Ok(());
            }
        }
    }
}

/// Flow `i`'s source address.
fn source_of(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(127, 0, 0, 0)) + FIRST_SOURCE + i,
    ))
}

/// Phase 1: every flow's first datagram, a window at a time, until each has its reply.
fn open_all(io: &mut Io, flows: &mut Flows, args: &FlowsArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.open_limit;
    let mut next = 0u32;
    let mut last_sweep = Instant::now();
    while flows.opened < args.flows {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} flows opened within {:?}",
            flows.opened,
            args.flows,
            args.open_limit
        );
        let now = Instant::now();
        while flows.in_flight < args.window && next < args.flows {
            io.queue(next)?;
            flows.sent[next as usize] = Some(now);
            flows.in_flight += 1;
            next += 1;
        }
        io.flush()?;
        io.receive(Duration::from_millis(5), |i| {
            let i = i as usize;
            if i < flows.open.len() && !flows.open[i] && flows.sent[i].is_some() {
                flows.open[i] = true;
                flows.sent[i] = None;
                flows.opened += 1;
                flows.in_flight -= 1;
            }
        })?;
        if last_sweep.elapsed() >= args.timeout / 2 {
            last_sweep = Instant::now();
            resend_overdue(io, flows, next, args.timeout)?;
        }
    }
    Ok(())
}

/// Sends again the datagrams of flows still waiting after `timeout`.
fn resend_overdue(io: &mut Io, flows: &mut Flows, upto: u32, timeout: Duration) -> io::Result<()> {
    let now = Instant::now();
    for i in 0..upto {
        let sent = &mut flows.sent[i as usize];
        if sent.is_some_and(|t| now.duration_since(t) >= timeout) {
            *sent = Some(now);
            flows.resent += 1;
            io.queue(i)?;
        }
    }
    io.flush()
}

/// Phase 3: a closed loop over all flows in turn. Returns replies counted and datagrams
/// given up on (no reply within the run).
fn traffic(io: &mut Io, args: &FlowsArgs) -> io::Result<(u64, u64)> {
    if args.duration.is_zero() {
        return Ok((0, 0));
    }
    let until = Instant::now() + args.duration;
    let (mut next, mut in_flight, mut replies) = (0u32, 0usize, 0u64);
    let mut sent = 0u64;
    let mut last_reply = Instant::now();
    while Instant::now() < until {
        while in_flight < args.window {
            io.queue(next)?;
            next = (next + 1) % args.flows;
            in_flight += 1;
            sent += 1;
        }
        io.flush()?;
        let before = replies;
        io.receive(Duration::from_millis(5), |_| replies += 1)?;
        in_flight -= (replies - before) as usize;
        if replies > before {
            last_reply = Instant::now();
        } else if last_reply.elapsed() >= args.timeout {
            // Nothing came back for a whole timeout: the window is lost; start over.
            in_flight = 0;
            last_reply = Instant::now();
        }
    }
    // The last window was still in flight when the run ended: not lost.
    Ok((replies, sent.saturating_sub(replies + in_flight as u64)))
}

/// Memory of the watched processes and of the kernel's slab, in KiB.
struct Memory {
    rss_kib: u64,
    slab_kib: u64,
}

impl Memory {
    fn sample(pids: &[u32]) -> anyhow::Result<Memory> {
        let mut rss_kib = 0;
        for pid in pids {
            let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
            rss_kib += field_kib(&status, "VmRSS:")
                .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?;
        }
        let meminfo = fs::read_to_string("/proc/meminfo")?;
        let slab_kib =
            field_kib(&meminfo, "Slab:").ok_or_else(|| anyhow::anyhow!("no Slab in meminfo"))?;
        Ok(Memory { rss_kib, slab_kib })
    }
}

/// The value of a `Name:   1234 kB` line.
fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        assert_eq!(source_of(0), "127.1.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(source_of(65_536), "127.2.0.0".parse::<IpAddr>().unwrap());
        assert!(source_of((1 << 24) - FIRST_SOURCE - 1).is_loopback());
    }

    #[test]
    fn proc_fields_parse() {
        let text = "Name:\tudplb\nVmRSS:\t   10240 kB\n";
        assert_eq!(field_kib(text, "VmRSS:"), Some(10_240));
        assert_eq!(field_kib(text, "Slab:"), None);
    }
}
