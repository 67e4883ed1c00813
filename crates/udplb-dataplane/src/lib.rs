//! udplb's data plane: worker threads that move datagrams between clients and backends.
//!
//! Owns: the worker threads ([`Dataplane`]), their sockets (one `SO_REUSEPORT` listener socket
//! per listener per worker, one upstream socket per flow or, with `shared_upstream`, sockets shared
//! by port), their flow tables, and the per-worker
//! counters ([`stats`]). Each worker is an independent event loop (mio/epoll) that reads the
//! current [`Snapshot`] once per turn and shares nothing mutable with the others on the
//! per-datagram path: the kernel spreads clients over workers by `SO_REUSEPORT` hashing, and
//! replies come back on the flow's upstream socket, owned by the same worker.
//! Must not: parse configuration, run health checks, serve the admin API or block on locks per
//! datagram (the only lock is the client-IP affinity table, taken when a flow opens or closes
//! on a listener with `affinity = "ip"`).
#![forbid(unsafe_code)]

pub mod handover;
mod listener;
mod log;
mod ports;
mod spare;
pub mod stats;
mod upstream;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use udplb_core::handover::Inherited;
use udplb_core::snapshot::{ListenerSpec, Snapshot};
use udplb_core::sync::{Outbox, Synced};
use udplb_sys::socket::{ListenerOptions, bind_listener, udp_port_taken};

pub use stats::{
    BACKEND_COUNTERS, BackendStats, BackendTotals, CounterDef, LISTENER_COUNTERS, ListenerTotals,
    Total, WorkerStats, backend_reply_latency, passive_failures_by_backend, replies_by_backend,
};

/// How the data plane is run.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Number of worker threads (at least 1).
    pub workers: usize,
    /// Descriptors the workers leave to the control plane (health checks, the admin endpoint):
    /// no flow opens a socket whose number is within this many of the open-file limit.
    pub descriptor_reserve: u64,
}

/// The running worker threads.
pub struct Dataplane {
    /// The workers' clock starts here: the core's [`udplb_core::time::Time`] is the
    /// milliseconds since.
    epoch: std::time::Instant,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wakers: Vec<Arc<mio::Waker>>,
    stats: Vec<Arc<WorkerStats>>,
    listener_addrs: Vec<SocketAddr>,
    listening: Arc<handover::Shared>,
}

/// Listener sockets bound for every worker, before any worker runs (privileges can be dropped
/// in between).
pub struct Bound {
    descriptor_reserve: u64,
    shared: Arc<ArcSwap<Snapshot>>,
    sockets_per_worker: Vec<Vec<std::net::UdpSocket>>,
    listener_addrs: Vec<SocketAddr>,
    inherited: Option<Arc<Inherited>>,
    adopted: Vec<handover::HandedFlow>,
    sync: Option<(Arc<Synced>, Vec<Arc<Outbox>>)>,
}

/// Placements a worker queues for the peers between two sends, at most.
const OUTBOX_CAP: usize = 65_536;

impl Bound {
    /// The addresses the listeners are bound to, in snapshot order.
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listener_addrs
    }

    /// The workers' sockets: one per listener per worker (what a later process inherits).
    pub fn sockets(&self) -> &[Vec<std::net::UdpSocket>] {
        &self.sockets_per_worker
    }

    /// The workers open each client's next flow where `table` says a previous process had it,
    /// and continue `flows` on their sockets (each on the worker of its `worker` index, which
    /// reads the same listener socket the previous one did).
    pub fn inherit(&mut self, table: Arc<Inherited>, flows: Vec<handover::HandedFlow>) {
        self.inherited = Some(table);
        self.adopted = flows;
    }

    /// The workers open a client's flow where `synced` says a peer instance has it, and tell
    /// the returned outboxes (one per worker) of the flows they open and renew.
    pub fn share(&mut self, synced: Arc<Synced>) -> Vec<Arc<Outbox>> {
        let outboxes: Vec<Arc<Outbox>> = (0..self.sockets_per_worker.len())
            .map(|_| Arc::new(Outbox::new(OUTBOX_CAP)))
            .collect();
        self.sync = Some((synced, outboxes.clone()));
        outboxes
    }

    /// Starts one worker thread per set of sockets.
    pub fn start(self) -> io::Result<Dataplane> {
        let Bound {
            descriptor_reserve,
            shared,
            sockets_per_worker,
            listener_addrs,
            inherited,
            mut adopted,
            sync,
        } = self;
        let listening = Arc::new(handover::Shared::default());
        let workers = sockets_per_worker.len();
        let epoch = std::time::Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(workers);
        let mut wakers = Vec::with_capacity(workers);
        let mut stats = Vec::with_capacity(workers);
        for (id, sockets) in sockets_per_worker.into_iter().enumerate() {
            let mine;
            (mine, adopted) = adopted.into_iter().partition(|f| f.worker == id);
            let worker_stats = Arc::new(WorkerStats::new(sockets.len()));
            let worker = worker::Worker::new(worker::WorkerSetup {
                id,
                workers,
                listeners: sockets,
                shared: Arc::clone(&shared),
                stats: Arc::clone(&worker_stats),
                stop: Arc::clone(&stop),
                epoch,
                descriptor_reserve,
                listening: Arc::clone(&listening),
                inherited: inherited.clone(),
                adopted: mine,
                sync: sync
                    .as_ref()
                    .map(|(synced, outboxes)| (Arc::clone(synced), Arc::clone(&outboxes[id]))),
            })?;
            wakers.push(worker.waker());
            stats.push(worker_stats);
            let thread = std::thread::Builder::new()
                .name(format!("udplb-worker-{id}"))
                .spawn(move || worker.run())?;
            threads.push(thread);
        }
        Ok(Dataplane {
            epoch,
            threads,
            stop,
            wakers,
            stats,
            listener_addrs,
            listening,
        })
    }
}

/// Logs a listener whose socket got smaller buffers than `socket_buffer` asked for (not root,
/// and the system maximum below it): bursts it cannot queue are dropped sooner.
fn warn_if_buffers_short(spec: &ListenerSpec, socket: &std::net::UdpSocket) {
    let Ok((receive, send)) = udplb_sys::socket::buffer_sizes(socket) else {
        return;
    };
    if receive < spec.socket_buffer || send < spec.socket_buffer {
        tracing::warn!(
            listener = %spec.name,
            asked = spec.socket_buffer,
            receive,
            send,
            "listener socket buffers are smaller than socket_buffer asks (raise \
             net.core.rmem_max and net.core.wmem_max, or start udplb as root)"
        );
    }
}

impl Dataplane {
    /// Where the workers' clock starts: the core's [`udplb_core::time::Time`] they stamp
    /// their tables with (persistence's) is the milliseconds since.
    pub fn epoch(&self) -> std::time::Instant {
        self.epoch
    }

    /// Binds every listener of the current snapshot once per worker and starts the workers.
    /// Binding errors are returned before any worker starts.
    pub fn start(shared: Arc<ArcSwap<Snapshot>>, opts: &DataplaneOptions) -> io::Result<Dataplane> {
        Self::bind(shared, opts)?.start()
    }

    /// Binds every listener of the current snapshot once per worker; [`Bound::start`] starts
    /// the workers.
    pub fn bind(shared: Arc<ArcSwap<Snapshot>>, opts: &DataplaneOptions) -> io::Result<Bound> {
        Self::bind_inheriting(shared, opts, Vec::new())
    }

    /// As [`Dataplane::bind`], but listener `i` uses the sockets `inherited[i]` (handed over by
    /// a previous process, one per worker) where there are some. The workers are then as many
    /// as the inherited sockets of a listener: each socket of a `SO_REUSEPORT` group gets a
    /// share of the clients, so none may be left unread, and no socket can join the group
    /// once privileges are dropped.
    pub fn bind_inheriting(
        shared: Arc<ArcSwap<Snapshot>>,
        opts: &DataplaneOptions,
        inherited: Vec<Vec<std::net::UdpSocket>>,
    ) -> io::Result<Bound> {
        let snapshot = shared.load_full();
        let workers = inherited
            .iter()
            .map(Vec::len)
            .find(|&n| n > 0)
            .unwrap_or(opts.workers)
            .max(1);
        if inherited
            .iter()
            .any(|s| !s.is_empty() && s.len() != workers)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inherited listeners have different numbers of sockets",
            ));
        }
        let mut inherited: Vec<_> = inherited.into_iter().map(Vec::into_iter).collect();
        inherited.resize_with(snapshot.listeners.len(), || Vec::new().into_iter());
        // The buffers are asked for (forced past the system maximum when privileged); a
        // smaller grant is reported once per listener, not refused.
        let listener_opts = |spec: &ListenerSpec| ListenerOptions {
            reuse_port: true,
            recv_buffer: Some(spec.socket_buffer),
            send_buffer: Some(spec.socket_buffer),
            gro: spec.gro,
        };
        // Worker 0 binds first; the others bind the address it got (so port 0 works).
        let mut listener_addrs: Vec<SocketAddr> =
            snapshot.listeners.iter().map(|l| l.address).collect();
        let mut sockets_per_worker = Vec::with_capacity(workers);
        for worker in 0..workers {
            let mut sockets = Vec::with_capacity(listener_addrs.len());
            for ((addr, spec), handed) in listener_addrs
                .iter_mut()
                .zip(&snapshot.listeners)
                .zip(&mut inherited)
            {
                if let Some(socket) = handed.next() {
                    udplb_sys::socket::adopt_listener(&socket, &listener_opts(spec))?;
                    *addr = socket.local_addr()?;
                    sockets.push(socket);
                    continue;
                }
                if worker == 0 && addr.port() != 0 && udp_port_taken(*addr).unwrap_or(false) {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "cannot bind listener {addr}: another process already receives on \
                             it (another udplb? two would split its traffic between them: stop \
                             the other first)"
                        ),
                    ));
                }
                let socket = bind_listener(*addr, &listener_opts(spec)).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot bind listener {addr}: {e}"))
                })?;
                *addr = socket.local_addr()?;
                if worker == 0 {
                    warn_if_buffers_short(spec, &socket);
                }
                sockets.push(socket);
            }
            sockets_per_worker.push(sockets);
        }
        Ok(Bound {
            descriptor_reserve: opts.descriptor_reserve,
            shared,
            sockets_per_worker,
            listener_addrs,
            inherited: None,
            adopted: Vec::new(),
            sync: None,
        })
    }

    /// The switch that stops the workers reading their listener sockets (handed to another
    /// process) and resumes it.
    pub fn listening(&self) -> handover::Listening {
        handover::Listening::new(Arc::clone(&self.listening), self.wakers.clone())
    }

    /// The addresses the listeners are bound to, in snapshot order.
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listener_addrs
    }

    /// Every worker's counters.
    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        &self.stats
    }

    /// Wakes every worker so it notices a new snapshot at once rather than at its next turn.
    pub fn notify_snapshot(&self) {
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// Stops the workers (their flows are closed) and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for w in &self.wakers {
            let _ = w.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
