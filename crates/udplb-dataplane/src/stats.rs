//! Counters written by one worker and read by anyone.
//!
//! Owns: [`WorkerStats`], one per worker, with per-listener datagram, byte and drop counters
//! and flow-table figures. Each counter has exactly one writer (its worker), which updates it
//! with a relaxed load and store, a plain `mov` on x86: no locked instruction and no shared
//! cache line per datagram. Readers (metrics, status, tests) sum the workers at scrape time.
//! Owns too the tables that name every per-listener and per-backend counter once
//! ([`LISTENER_COUNTERS`], [`BACKEND_COUNTERS`]): field, `/stats` place, metric name, kind and
//! help; the structs, their sums, `/stats` and `/metrics` are made from them.
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

/// How a counter is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up: a metric ending in `_total`.
    Counter,
    /// A current figure, up and down.
    Gauge,
}

/// What a counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Things: datagrams, flows, sockets.
    Count,
    /// Payload bytes: the metric's name carries `_bytes`.
    Bytes,
}

/// One counter of a table ([`LISTENER_COUNTERS`], [`BACKEND_COUNTERS`]): the one place that
/// names it, from which the per-worker field, the totals, `/stats` and `/metrics` all follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterDef {
    /// Its field, the same in the per-worker struct and in the totals.
    pub field: &'static str,
    /// Where it is in the `/stats` JSON object of its listener or backend: a key, or
    /// `outer.key` for a key of the object `outer` (`flows.live`).
    pub json: &'static str,
    /// Its metric, as exported: `udplb_` prefix, `_bytes` when it counts bytes, `_total` when
    /// it is a counter (docs/metrics.md has a row for it).
    pub metric: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// What it counts.
    pub unit: Unit,
    /// The label that tells its values apart when it has one per reason (`reason`).
    pub label: Option<&'static str>,
    /// The metric's help text.
    pub help: &'static str,
}

/// One counter summed over the workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Total {
    /// A single value.
    One(u64),
    /// One value per reason, in the reasons' counter order: (the reason's name, its value).
    PerReason(Vec<(&'static str, u64)>),
}

/// Defines a table of single-writer counters once: each counter's field (a [`Counter`], or
/// one per reason of a reason type with `COUNT`, `ALL`, `name()` and `index()`, like
/// [`DropReason`]), its `/stats` place, its metric, kind, unit and help. From it come the
/// per-worker struct, the struct of totals with its summing ([`ListenerTotals::add`]), the
/// table of [`CounterDef`]s and each total's value by definition (`values`).
macro_rules! counters {
    (@stats_ty Counter) => { Counter };
    (@stats_ty PerReason $reason:ident) => { [Counter; $reason::COUNT] };
    (@total_ty Counter) => { u64 };
    (@total_ty PerReason $reason:ident) => { [u64; $reason::COUNT] };
    (@label Counter) => { None };
    (@label PerReason $reason:ident) => { Some("reason") };
    (@add Counter, $sum:expr, $counter:expr) => {
        $sum += $counter.get()
    };
    (@add PerReason $reason:ident, $sum:expr, $counters:expr) => {
        for (sum, c) in $sum.iter_mut().zip(&$counters) {
            *sum += c.get();
        }
    };
    (@total Counter, $sum:expr) => { Total::One($sum) };
    (@total PerReason $reason:ident, $sum:expr) => {
        Total::PerReason($reason::ALL.iter().map(|r| (r.name(), $sum[r.index()])).collect())
    };
    (
        $(#[$stats_meta:meta])*
        pub struct $stats:ident;
        $(#[$totals_meta:meta])*
        pub struct $totals:ident;
        $(#[$table_meta:meta])*
        pub const $table:ident;
        counters {
            $(
                $(#[$field_meta:meta])*
                $field:ident: $shape:ident $(<$reason:ident>)? {
                    json: $json:literal,
                    metric: $metric:literal,
                    kind: $kind:ident,
                    unit: $unit:ident,
                    help: $help:expr $(,)?
                }
            ),* $(,)?
        }
        $(
            others {
                $($(#[$other_meta:meta])* $other:ident: $other_ty:ty),* $(,)?
            }
        )?
    ) => {
        $(#[$stats_meta])*
        #[derive(Debug, Default)]
        pub struct $stats {
            $(
                $(#[$field_meta])*
                pub $field: counters!(@stats_ty $shape $($reason)?),
            )*
            $($(
                $(#[$other_meta])*
                pub $other: $other_ty,
            )*)?
        }

        $(#[$totals_meta])*
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct $totals {
            $(
                #[doc = concat!("See [`", stringify!($stats), "::", stringify!($field), "`].")]
                pub $field: counters!(@total_ty $shape $($reason)?),
            )*
        }

        $(#[$table_meta])*
        pub const $table: &[CounterDef] = &[
            $(CounterDef {
                field: stringify!($field),
                json: $json,
                metric: $metric,
                kind: Kind::$kind,
                unit: Unit::$unit,
                label: counters!(@label $shape $($reason)?),
                help: $help,
            },)*
        ];

        impl $totals {
            /// Adds the current values of one worker's counters.
            pub fn add(&mut self, s: &$stats) {
                $(counters!(@add $shape $($reason)?, self.$field, s.$field);)*
            }

            /// Every total with its definition, in table order.
            pub fn values(&self) -> Vec<(&'static CounterDef, Total)> {
                let totals = [$(counters!(@total $shape $($reason)?, self.$field)),*];
                $table.iter().zip(totals).collect()
            }
        }
    };
}

counters! {
    /// Counters of one listener on one worker.
    pub struct ListenerStats;
    /// A plain sum of the counters of one listener over every worker.
    pub struct ListenerTotals;
    /// Every per-listener counter: `/stats` shows them under each listener, `/metrics` with
    /// the label `listener`.
    pub const LISTENER_COUNTERS;
    counters {
        /// Datagrams received from clients.
        datagrams_in: Counter {
            json: "datagrams_in",
            metric: "udplb_datagrams_received_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams received from clients",
        },
        /// Bytes received from clients.
        bytes_in: Counter {
            json: "bytes_in",
            metric: "udplb_received_bytes_total",
            kind: Counter,
            unit: Bytes,
            help: "Payload bytes received from clients",
        },
        /// Datagrams sent to backends.
        forwarded: Counter {
            json: "forwarded",
            metric: "udplb_datagrams_forwarded_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams sent to backends",
        },
        /// Bytes sent to backends.
        bytes_forwarded: Counter {
            json: "bytes_forwarded",
            metric: "udplb_forwarded_bytes_total",
            kind: Counter,
            unit: Bytes,
            help: "Payload bytes sent to backends",
        },
        /// Replies received from backends.
        replies_in: Counter {
            json: "replies_in",
            metric: "udplb_replies_received_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams received from backends",
        },
        /// Replies sent to clients.
        replies_out: Counter {
            json: "replies_out",
            metric: "udplb_replies_sent_total",
            kind: Counter,
            unit: Count,
            help: "Replies sent to clients",
        },
        /// Bytes of replies sent to clients.
        bytes_out: Counter {
            json: "bytes_out",
            metric: "udplb_replied_bytes_total",
            kind: Counter,
            unit: Bytes,
            help: "Payload bytes of replies sent to clients",
        },
        /// Dropped datagrams, by [`DropReason`].
        drops: PerReason<DropReason> {
            json: "drops",
            metric: "udplb_drops_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams dropped, by reason",
        },
        /// Live flows (gauge).
        flows_live: Counter {
            json: "flows.live",
            metric: "udplb_flows_active",
            kind: Gauge,
            unit: Count,
            help: "Live flows",
        },
        /// Flows created.
        flows_created: Counter {
            json: "flows.created",
            metric: "udplb_flows_created_total",
            kind: Counter,
            unit: Count,
            help: "Flows created",
        },
        /// Flows closed, by [`CloseReason`].
        flows_closed: PerReason<CloseReason> {
            json: "flows.closed",
            metric: "udplb_flows_closed_total",
            kind: Counter,
            unit: Count,
            help: "Flows closed, by reason",
        },
        /// Datagrams refused by a backend (ICMP port, host or network unreachable).
        backend_refused: Counter {
            json: "backend_refused",
            metric: "udplb_backend_refused_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams refused by backends (ICMP port, host or network unreachable)",
        },
        /// Request-response mode: requests a backend left unanswered for the reply timeout.
        reply_timeouts: Counter {
            json: "reply_timeouts",
            metric: "udplb_reply_timeouts_total",
            kind: Counter,
            unit: Count,
            help: concat!(
                "Requests a backend left unanswered for the reply timeout ",
                "(request-response mode)"
            ),
        },
        /// Datagrams sent to the listener's abuse pool instead of being dropped.
        abuse_diverted: Counter {
            json: "abuse_diverted",
            metric: "udplb_abuse_diverted_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams of refused clients sent to the listener's abuse pool",
        },
        /// Request-response flows opened on a spare socket of a completed flow (no new socket).
        sockets_reused: Counter {
            json: "flows.sockets_reused",
            metric: "udplb_upstream_sockets_reused_total",
            kind: Counter,
            unit: Count,
            help: "Request-response flows opened on the spare socket of a completed flow",
        },
        /// Replies that arrived for a flow no longer there (after a request-response flow had
        /// all the replies it expected, or on a shared socket after its flow closed); discarded.
        late_replies: Counter {
            json: "late_replies",
            metric: "udplb_late_replies_total",
            kind: Counter,
            unit: Count,
            help: "Replies that came for a flow no longer there (completed or closed), discarded",
        },
        /// GRO trains received (each counted as its datagrams in `datagrams_in`).
        gro_trains: Counter {
            json: "gro_trains",
            metric: "udplb_gro_trains_total",
            kind: Counter,
            unit: Count,
            help: "Trains of datagrams received as one (listeners with gro)",
        },
        /// Shared upstream sockets open (gauge; `shared_upstream`).
        shared_sockets: Counter {
            json: "flows.shared_sockets",
            metric: "udplb_upstream_shared_sockets",
            kind: Gauge,
            unit: Count,
            help: "Upstream sockets shared by flows (listeners with shared_upstream)",
        },
        /// Datagrams the kernel dropped on this worker's socket of the listener (full receive
        /// buffer): the socket's running total, read every [`KERNEL_DROPS_REFRESH`].
        kernel_drops: Counter {
            json: "kernel_drops",
            metric: "udplb_kernel_receive_queue_drops_total",
            kind: Counter,
            unit: Count,
            help: concat!(
                "Datagrams the kernel dropped on full listener sockets, ",
                "summed over the workers' sockets"
            ),
        },
        /// Flows displaced by a failure moved back into balance once their pool was whole.
        flows_rebalanced: Counter {
            json: "flows.rebalanced",
            metric: "udplb_flows_rebalanced_total",
            kind: Counter,
            unit: Count,
            help: "Flows displaced by a failure moved back into balance once their pool was whole",
        },
    }
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

counters! {
    /// One backend's traffic on one worker (single writer: the worker).
    pub struct BackendStats;
    /// A plain sum of one backend's traffic over every worker.
    pub struct BackendTotals;
    /// Every per-backend traffic counter: `/stats` shows them with each backend of a pool,
    /// `/metrics` with the labels `pool` and `backend`.
    pub const BACKEND_COUNTERS;
    counters {
        /// Datagrams sent to the backend.
        forwarded: Counter {
            json: "forwarded",
            metric: "udplb_backend_datagrams_forwarded_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams sent to the backend",
        },
        /// Their payload bytes.
        bytes_forwarded: Counter {
            json: "bytes_forwarded",
            metric: "udplb_backend_forwarded_bytes_total",
            kind: Counter,
            unit: Bytes,
            help: "Payload bytes sent to the backend",
        },
        /// Datagrams received from the backend (before size checks).
        replies: Counter {
            json: "replies",
            metric: "udplb_backend_replies_received_total",
            kind: Counter,
            unit: Count,
            help: "Datagrams received from the backend",
        },
        /// Their payload bytes.
        bytes_replied: Counter {
            json: "bytes_replied",
            metric: "udplb_backend_replied_bytes_total",
            kind: Counter,
            unit: Bytes,
            help: "Payload bytes received from the backend",
        },
        /// Live flows on the backend (gauge, refreshed every second or so).
        flows: Counter {
            json: "flows",
            metric: "udplb_backend_flows",
            kind: Gauge,
            unit: Count,
            help: "Live flows on the backend",
        },
    }
    others {
        /// Request-response mode: time from a flow's first request to its first reply.
        /// Allocated at the first sample, so backends of other modes cost nothing.
        reply_latency: OnceLock<Box<LatencyCells>>,
    }
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

impl BackendTotals {
    /// Sums backend id `id` over `workers` (zero for an id beyond [`TRACKED_BACKENDS`]).
    pub fn sum(workers: &[Arc<WorkerStats>], id: usize) -> Self {
        let mut t = BackendTotals::default();
        for b in workers.iter().filter_map(|w| w.backends.get(id)) {
            t.add(b);
        }
        t
    }
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
    /// Counts a passive failure signal against backend `id` (ids past [`TRACKED_BACKENDS`]
    /// are not tracked).
    #[inline]
    pub fn passive_failure(&self, id: udplb_core::snapshot::BackendId) {
        if let Some(c) = self.passive_failures.get(id.index()) {
            c.add(1);
        }
    }

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

impl ListenerTotals {
    /// Sums listener `listener` over `workers`.
    pub fn sum(workers: &[Arc<WorkerStats>], listener: usize) -> Self {
        let mut t = ListenerTotals::default();
        for l in workers.iter().filter_map(|w| w.listeners.get(listener)) {
            t.add(l);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No two counters share a field, a `/stats` place or a metric.
    #[test]
    fn every_counter_is_named_once() {
        for table in [LISTENER_COUNTERS, BACKEND_COUNTERS] {
            let mut fields: Vec<_> = table.iter().map(|d| d.field).collect();
            let mut places: Vec<_> = table.iter().map(|d| d.json).collect();
            fields.sort_unstable();
            places.sort_unstable();
            assert!(fields.windows(2).all(|w| w[0] != w[1]), "{fields:?}");
            assert!(places.windows(2).all(|w| w[0] != w[1]), "{places:?}");
        }
        let mut metrics: Vec<_> = LISTENER_COUNTERS
            .iter()
            .chain(BACKEND_COUNTERS)
            .map(|d| d.metric)
            .collect();
        metrics.sort_unstable();
        assert!(metrics.windows(2).all(|w| w[0] != w[1]), "{metrics:?}");
    }

    /// Totals add every worker's counters, and each comes out with its own definition.
    #[test]
    fn totals_sum_every_worker() {
        let workers: Vec<Arc<WorkerStats>> =
            (0..2).map(|_| Arc::new(WorkerStats::new(1))).collect();
        for (n, w) in (1..).zip(&workers) {
            let l = &w.listeners[0];
            l.forwarded.add(n);
            l.flows_live.set(10 * n);
            l.drop(DropReason::Denied);
            l.flows_closed[CloseReason::Idle.index()].add(n);
            w.backends[7].bytes_replied.add(100 * n);
        }
        let t = ListenerTotals::sum(&workers, 0);
        assert_eq!((t.forwarded, t.flows_live), (3, 30));
        assert_eq!(t.drops[DropReason::Denied.index()], 2);
        assert_eq!(ListenerTotals::sum(&workers, 1), ListenerTotals::default());
        let values = t.values();
        assert_eq!(values.len(), LISTENER_COUNTERS.len());
        let of = |field: &str| {
            values
                .iter()
                .find(|(d, _)| d.field == field)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(of("forwarded"), Total::One(3));
        assert_eq!(of("flows_live"), Total::One(30));
        let Total::PerReason(closed) = of("flows_closed") else {
            panic!("flows_closed has one value per reason");
        };
        assert_eq!(closed.len(), CloseReason::COUNT);
        assert_eq!(closed[CloseReason::Idle.index()], ("idle", 3));
        let b = BackendTotals::sum(&workers, 7);
        assert_eq!(b.bytes_replied, 300);
        assert_eq!(
            BackendTotals::sum(&workers, TRACKED_BACKENDS),
            BackendTotals::default()
        );
    }
}
