//! One generator thread: its flows (connected nonblocking sockets polled with mio/epoll), the
//! requests each flow keeps in flight, and the event loop that completes, times out and
//! replaces them — a closed loop, so every flow always has its full window outstanding — or,
//! with a rate ([`Pace`]), an open loop: requests leave on a fixed schedule whatever the replies
//! do, and a flow's window only bounds how many may be in flight.
//!
//! A flow's window is a set of slots. A request carries its slot, the slot's generation and its
//! send time (see [`crate::wire`]). A reply completes the slot only if the generation still
//! matches; one that arrives after its request timed out (and the slot moved on) is late.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Registry, Token};

use crate::report::Tally;
use crate::wire::Stamp;

/// Slack between opening the sockets and the first request, so every thread starts together.
const START_DELAY: Duration = Duration::from_millis(20);
/// Longest single wait in `epoll_wait`, so timeouts and the end are noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(10);

/// One flow to open: where it sends and how many requests it keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct FlowSpec {
    pub target: SocketAddr,
    pub outstanding: usize,
}

/// The run's clock: requests start at `start`; counting covers `[measure_from, until)`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    epoch: Instant,
    start: Instant,
    measure_from: Instant,
    until: Instant,
}

impl Window {
    /// A window whose warmup begins shortly after `now`.
    pub fn starting(now: Instant, warmup: Duration, duration: Duration) -> Window {
        let start = now + START_DELAY;
        Window {
            epoch: now,
            start,
            measure_from: start + warmup,
            until: start + warmup + duration,
        }
    }

    fn measuring(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.until
    }

    /// Nanoseconds since the epoch: the send time a request carries.
    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One request slot of a flow's window.
#[derive(Clone, Copy)]
struct Slot {
    generation: u32,
    sent_at: Instant,
    /// A request is in flight on it (always, in a closed loop).
    busy: bool,
}

/// An open loop's schedule: one request every `interval`, on the next free slot.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub interval: Duration,
}

/// Open-loop state: when the next request is due and the slots free to carry it (oldest
/// freed first, so requests rotate over the flows).
struct Schedule {
    interval: Duration,
    next_due: Instant,
    free: VecDeque<(usize, usize)>,
}

struct Flow {
    socket: UdpSocket,
    slots: Vec<Slot>,
}

impl Flow {
    /// Binds an ephemeral port (so each flow has its own source port) and connects it.
    fn open(spec: &FlowSpec, token: Token, registry: &Registry) -> io::Result<Flow> {
        let local = match spec.target {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let mut socket = UdpSocket::bind(local)?;
        socket.connect(spec.target)?;
        registry.register(&mut socket, token, Interest::READABLE)?;
        let idle = Slot {
            generation: 0,
            sent_at: Instant::now(),
            busy: false,
        };
        Ok(Flow {
            socket,
            slots: vec![idle; spec.outstanding],
        })
    }
}

/// A generator thread's state.
pub struct Generator {
    poll: Poll,
    flows: Vec<Flow>,
    payload: Vec<u8>,
    timeout: Duration,
    buf: Vec<u8>,
    tally: Tally,
    schedule: Option<Schedule>,
}

impl Generator {
    /// Opens the flows; nothing is sent before [`Generator::run`]. With `pace`, an open loop.
    pub fn new(
        specs: &[FlowSpec],
        size: usize,
        timeout: Duration,
        pace: Option<Pace>,
    ) -> io::Result<Generator> {
        let poll = Poll::new()?;
        let flows = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| Flow::open(spec, Token(i), poll.registry()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Generator {
            poll,
            flows,
            payload: vec![0x55; size],
            timeout,
            buf: vec![0; 65_536],
            tally: Tally::default(),
            schedule: pace.map(|p| Schedule {
                interval: p.interval,
                next_due: Instant::now(),
                free: VecDeque::new(),
            }),
        })
    }

    /// Runs the closed loop over `window` and returns what the measured part counted.
    pub fn run(mut self, window: Window) -> io::Result<Tally> {
        std::thread::sleep(window.start.saturating_duration_since(Instant::now()));
        self.fill(window);
        let scan_every = (self.timeout / 10).clamp(Duration::from_millis(1), MAX_WAIT * 10);
        let mut next_scan = Instant::now() + scan_every;
        let mut events = Events::with_capacity(1024);
        while let Some(left) = window.until.checked_duration_since(Instant::now()) {
            let wait = match &self.schedule {
                Some(s) => s.next_due.saturating_duration_since(Instant::now()),
                None => MAX_WAIT,
            };
            match self
                .poll
                .poll(&mut events, Some(left.min(wait).min(MAX_WAIT)))
            {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            }
            for event in &events {
                self.receive_all(event.token().0, window);
            }
            let now = Instant::now();
            if now >= next_scan {
                self.expire(now, window);
                next_scan = now + scan_every;
            }
            self.send_due(window);
        }
        Ok(self.tally)
    }

    /// Closed loop: sends the first request of every slot. Open loop: frees them all, and the
    /// schedule starts now.
    fn fill(&mut self, window: Window) {
        for f in 0..self.flows.len() {
            for s in 0..self.flows[f].slots.len() {
                match &mut self.schedule {
                    Some(schedule) => schedule.free.push_back((f, s)),
                    None => self.send(f, s, window),
                }
            }
        }
        if let Some(schedule) = &mut self.schedule {
            schedule.next_due = Instant::now();
        }
    }

    /// Open loop: sends every request due by now, each on the oldest free slot. A request
    /// due while every slot is busy is not sent and counted as `window_full`.
    fn send_due(&mut self, window: Window) {
        let now = Instant::now();
        loop {
            let Some(schedule) = &mut self.schedule else {
                return;
            };
            if schedule.next_due > now {
                return;
            }
            schedule.next_due += schedule.interval;
            match schedule.free.pop_front() {
                Some((f, s)) => self.send(f, s, window),
                None => self.tally.window_full += u64::from(window.measuring(now)),
            }
        }
    }

    /// A slot whose request completed or timed out: refilled at once in a closed loop, given
    /// back to the schedule in an open one.
    fn next_request(&mut self, f: usize, s: usize, window: Window) {
        match &mut self.schedule {
            Some(schedule) => {
                self.flows[f].slots[s].busy = false;
                schedule.free.push_back((f, s));
            }
            None => self.send(f, s, window),
        }
    }

    /// Sends the next request of slot `s` of flow `f`.
    fn send(&mut self, f: usize, s: usize, window: Window) {
        let flow = &mut self.flows[f];
        let slot = &mut flow.slots[s];
        let now = Instant::now();
        slot.generation = slot.generation.wrapping_add(1);
        slot.sent_at = now;
        slot.busy = true;
        let stamp = Stamp {
            slot: s as u32, // fits: outstanding was checked against u32
            generation: slot.generation,
            sent_ns: window.ns(now),
        };
        stamp.write(&mut self.payload);
        let measuring = window.measuring(now);
        match flow.socket.send(&self.payload) {
            Ok(_) => self.tally.sent += u64::from(measuring),
            // Not sent: the slot times out and is replaced like a lost request.
            Err(_) => self.tally.send_errors += u64::from(measuring),
        }
    }

    /// Reads every queued reply of flow `f`, completing and refilling slots.
    fn receive_all(&mut self, f: usize, window: Window) {
        loop {
            let n = match self.flows[f].socket.recv(&mut self.buf) {
                Ok(n) => n,
                // A refused target (ICMP) reports once; the next read goes on.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(_) => return, // WouldBlock: drained
            };
            if let Some(stamp) = Stamp::read(&self.buf[..n]) {
                self.on_reply(f, stamp, window);
            }
        }
    }

    /// Completes the slot `stamp` names if it is still waiting for this reply.
    fn on_reply(&mut self, f: usize, stamp: Stamp, window: Window) {
        let s = stamp.slot as usize;
        let Some(slot) = self.flows[f].slots.get(s) else {
            return; // not ours
        };
        let now = Instant::now();
        let measuring = window.measuring(now);
        if !slot.busy || slot.generation != stamp.generation {
            self.tally.late += u64::from(measuring);
            return;
        }
        if measuring {
            let ns = window.ns(now).saturating_sub(stamp.sent_ns);
            self.tally.complete(ns / 1_000);
        }
        self.next_request(f, s, window);
    }

    /// Replaces requests that have waited longer than the timeout, counting them lost.
    fn expire(&mut self, now: Instant, window: Window) {
        let measuring = window.measuring(now);
        for f in 0..self.flows.len() {
            for s in 0..self.flows[f].slots.len() {
                let slot = &self.flows[f].slots[s];
                if slot.busy && now.duration_since(slot.sent_at) >= self.timeout {
                    self.tally.lost += u64::from(measuring);
                    self.next_request(f, s, window);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_measures_after_warmup_only() {
        let now = Instant::now();
        let w = Window::starting(now, Duration::from_secs(1), Duration::from_secs(2));
        assert!(!w.measuring(now + START_DELAY));
        assert!(w.measuring(now + START_DELAY + Duration::from_secs(1)));
        assert!(!w.measuring(now + START_DELAY + Duration::from_secs(3)));
        assert_eq!(w.ns(now + Duration::from_micros(5)), 5_000);
    }
}
