//! Counters written by one worker and read by anyone.
//!
//! Owns: [`WorkerStats`], one per worker, with per-listener datagram, byte and drop counters
//! and flow-table figures. Each counter has exactly one writer (its worker), which updates it
//! with a relaxed load and store, a plain `mov` on x86: no locked instruction and no shared
//! cache line per datagram. Readers (metrics, status, tests) sum the workers at scrape time.
//! Must not: be written by two threads (the single-writer rule is what makes the cheap update
//! correct).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use udplb_core::DropReason;
use udplb_core::latency::{self, Histogram};
use udplb_core::verdict::CloseReason;

/// A counter with a single writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Sets the value (gauges). Only the owning worker may call this.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of one listener on one worker.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Datagrams received from clients.
    pub datagrams_in: Counter,
    /// Bytes received from clients.
    pub bytes_in: Counter,
    /// Datagrams sent to backends.
    pub forwarded: Counter,
    /// Bytes sent to backends.
    pub bytes_forwarded: Counter,
    /// Replies received from backends.
    pub replies_in: Counter,
    /// Replies sent to clients.
    pub replies_out: Counter,
    /// Bytes of replies sent to clients.
    pub bytes_out: Counter,
    /// Dropped datagrams, by [`DropReason`].
    pub drops: [Counter; DropReason::COUNT],
    /// Flows created.
    pub flows_created: Counter,
    /// Flows closed, by [`CloseReason`].
    pub flows_closed: [Counter; CloseReason::COUNT],
    /// Live flows (gauge).
    pub flows_live: Counter,
    /// Datagrams refused by a backend (ICMP port, host or network unreachable).
    pub backend_refused: Counter,
    /// Request-response mode: requests a backend left unanswered for the reply timeout.
    pub reply_timeouts: Counter,
    /// Datagrams sent to the listener's abuse pool instead of being dropped.
    pub abuse_diverted: Counter,
    /// Request-response flows opened on a spare socket of a completed flow (no new socket).
    pub sockets_reused: Counter,
    /// Flows displaced by a failure moved back into balance once their pool was whole.
    pub flows_rebalanced: Counter,
    /// Replies that arrived for a flow no longer there (after a request-response flow had all
    /// the replies it expected, or on a shared socket after its flow closed); discarded.
    pub late_replies: Counter,
    /// Shared upstream sockets open (gauge; `shared_upstream`).
    pub shared_sockets: Counter,
    /// GRO trains received (each counted as its datagrams in `datagrams_in`).
    pub gro_trains: Counter,
    /// Datagrams the kernel dropped on this worker's socket of the listener (full receive
    /// buffer): the socket's running total, read every [`KERNEL_DROPS_REFRESH`].
    pub kernel_drops: Counter,
}

/// How often workers read their listener sockets' kernel drop counters.
pub const KERNEL_DROPS_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

impl ListenerStats {
    /// Counts a dropped datagram.
    #[inline]
    pub fn drop(&self, reason: DropReason) {
        self.drops[reason.index()].add(1);
    }

    /// Counts `n` dropped datagrams (a GRO train).
    #[inline]
    pub fn drop_n(&self, reason: DropReason, n: u64) {
        self.drops[reason.index()].add(n);
    }
}

/// Counters of one worker.
#[derive(Debug)]
pub struct WorkerStats {
    /// Per listener, indexed like the snapshot's listeners.
    pub listeners: Vec<ListenerStats>,
    /// Event-loop turns.
    pub turns: Counter,
    /// Passive failure signals per backend id (ICMP port, host or network unreachable for a
    /// datagram sent to it; in request-response mode a request it left unanswered for the
    /// listener's `reply_timeout`), for the first
    /// [`TRACKED_BACKENDS`] ids.
    pub passive_failures: Box<[Counter]>,
    /// Traffic per backend id, for the first [`TRACKED_BACKENDS`] ids.
    pub backends: Box<[BackendStats]>,
}

/// One backend's traffic on one worker (single writer: the worker).
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Datagrams sent to the backend.
    pub forwarded: Counter,
    /// Their payload bytes.
    pub bytes_forwarded: Counter,
    /// Datagrams received from the backend (before size checks).
    pub replies: Counter,
    /// Their payload bytes.
    pub bytes_replied: Counter,
    /// Request-response mode: time from a flow's first request to its first reply. Allocated
    /// at the first sample, so backends of other modes cost nothing.
    pub reply_latency: OnceLock<Box<LatencyCells>>,
}

impl BackendStats {
    /// Records a reply-latency sample of `us` microseconds.
    #[inline]
    pub fn record_reply_latency(&self, us: u64) {
        self.reply_latency.get_or_init(Box::default).record(us);
    }
}

/// A latency histogram with a single writer (see [`Counter`]).
#[derive(Debug, Default)]
pub struct LatencyCells {
    cells: [Counter; latency::CELLS],
    sum_us: Counter,
}

impl LatencyCells {
    /// Records a sample of `us` microseconds. Only the owning worker may call this.
    #[inline]
    pub fn record(&self, us: u64) {
        self.cells[latency::cell_of(us)].add(1);
        self.sum_us.add(us);
    }

    /// Adds the current values to `h`.
    pub fn add_to(&self, h: &mut Histogram) {
        for (sum, c) in h.cells.iter_mut().zip(&self.cells) {
            *sum += c.get();
        }
        h.sum_us = h.sum_us.wrapping_add(self.sum_us.get());
    }
}

/// One backend's reply latency summed over workers (`None`: no sample yet).
pub fn backend_reply_latency(workers: &[Arc<WorkerStats>], id: usize) -> Option<Histogram> {
    let mut sum = None;
    for cells in workers
        .iter()
        .filter_map(|w| w.backends.get(id)?.reply_latency.get())
    {
        cells.add_to(sum.get_or_insert_with(Histogram::default));
    }
    sum
}

/// One backend's traffic summed over workers: (forwarded, bytes forwarded, replies, bytes replied).
pub fn backend_traffic(workers: &[Arc<WorkerStats>], id: usize) -> (u64, u64, u64, u64) {
    workers
        .iter()
        .filter_map(|w| w.backends.get(id))
        .fold((0, 0, 0, 0), |t, b| {
            (
                t.0 + b.forwarded.get(),
                t.1 + b.bytes_forwarded.get(),
                t.2 + b.replies.get(),
                t.3 + b.bytes_replied.get(),
            )
        })
}

/// Backend ids with their own refused counter (passive health signals).
pub const TRACKED_BACKENDS: usize = 4096;

/// Passive failure signals per backend id, summed over `workers`.
pub fn passive_failures_by_backend(workers: &[Arc<WorkerStats>]) -> Vec<u64> {
    let mut sum = vec![0u64; TRACKED_BACKENDS];
    for w in workers {
        for (s, c) in sum.iter_mut().zip(w.passive_failures.iter()) {
            *s += c.get();
        }
    }
    sum
}

/// Datagrams received from each backend id, summed over `workers` (the passive success signal).
pub fn replies_by_backend(workers: &[Arc<WorkerStats>]) -> Vec<u64> {
    let mut sum = vec![0u64; TRACKED_BACKENDS];
    for w in workers {
        for (s, b) in sum.iter_mut().zip(w.backends.iter()) {
            *s += b.replies.get();
        }
    }
    sum
}

impl WorkerStats {
    /// Zeroed counters for `listeners` listeners.
    pub fn new(listeners: usize) -> Self {
        WorkerStats {
            listeners: (0..listeners).map(|_| ListenerStats::default()).collect(),
            turns: Counter::default(),
            passive_failures: (0..TRACKED_BACKENDS).map(|_| Counter::default()).collect(),
            backends: (0..TRACKED_BACKENDS)
                .map(|_| BackendStats::default())
                .collect(),
        }
    }
}

/// A plain sum of the counters of one listener over every worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerTotals {
    /// See [`ListenerStats::datagrams_in`].
    pub datagrams_in: u64,
    /// See [`ListenerStats::bytes_in`].
    pub bytes_in: u64,
    /// See [`ListenerStats::forwarded`].
    pub forwarded: u64,
    /// See [`ListenerStats::bytes_forwarded`].
    pub bytes_forwarded: u64,
    /// See [`ListenerStats::replies_in`].
    pub replies_in: u64,
    /// See [`ListenerStats::replies_out`].
    pub replies_out: u64,
    /// See [`ListenerStats::bytes_out`].
    pub bytes_out: u64,
    /// See [`ListenerStats::drops`].
    pub drops: [u64; DropReason::COUNT],
    /// See [`ListenerStats::flows_created`].
    pub flows_created: u64,
    /// See [`ListenerStats::flows_closed`].
    pub flows_closed: [u64; CloseReason::COUNT],
    /// See [`ListenerStats::flows_live`].
    pub flows_live: u64,
    /// See [`ListenerStats::backend_refused`].
    pub backend_refused: u64,
    /// See [`ListenerStats::reply_timeouts`].
    pub reply_timeouts: u64,
    /// See [`ListenerStats::abuse_diverted`].
    pub abuse_diverted: u64,
    /// See [`ListenerStats::sockets_reused`].
    pub sockets_reused: u64,
    /// See [`ListenerStats::flows_rebalanced`].
    pub flows_rebalanced: u64,
    /// See [`ListenerStats::late_replies`].
    pub late_replies: u64,
    /// See [`ListenerStats::shared_sockets`].
    pub shared_sockets: u64,
    /// See [`ListenerStats::gro_trains`].
    pub gro_trains: u64,
    /// See [`ListenerStats::kernel_drops`].
    pub kernel_drops: u64,
}

impl ListenerTotals {
    /// Sums listener `listener` over `workers`.
    pub fn sum(workers: &[std::sync::Arc<WorkerStats>], listener: usize) -> Self {
        let mut t = ListenerTotals::default();
        for w in workers {
            let Some(l) = w.listeners.get(listener) else {
                continue;
            };
            t.datagrams_in += l.datagrams_in.get();
            t.bytes_in += l.bytes_in.get();
            t.forwarded += l.forwarded.get();
            t.bytes_forwarded += l.bytes_forwarded.get();
            t.replies_in += l.replies_in.get();
            t.replies_out += l.replies_out.get();
            t.bytes_out += l.bytes_out.get();
            for (sum, c) in t.drops.iter_mut().zip(&l.drops) {
                *sum += c.get();
            }
            t.flows_created += l.flows_created.get();
            for (sum, c) in t.flows_closed.iter_mut().zip(&l.flows_closed) {
                *sum += c.get();
            }
            t.flows_live += l.flows_live.get();
            t.backend_refused += l.backend_refused.get();
            t.reply_timeouts += l.reply_timeouts.get();
            t.abuse_diverted += l.abuse_diverted.get();
            t.sockets_reused += l.sockets_reused.get();
            t.flows_rebalanced += l.flows_rebalanced.get();
            t.late_replies += l.late_replies.get();
            t.shared_sockets += l.shared_sockets.get();
            t.gro_trains += l.gro_trains.get();
            t.kernel_drops += l.kernel_drops.get();
        }
        t
    }
}
