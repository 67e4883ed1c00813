//! Handing the listener sockets to another udplb process (a binary upgrade) and back.
//!
//! Owns: [`Listening`], the switch the workers read once per turn: while it is off they leave
//! their listener sockets unread (the process they were handed to reads them), hand over their
//! flows that have connected sockets of their own ([`HandedFlow`]: the next process continues
//! them on the same sockets), keep relaying replies of the others through the listener
//! sockets, and say where each of those goes. Turned on again (a handover that failed), they
//! read again and take their handed flows back.
//! Must not: send the sockets anywhere (the caller does) or stop the workers.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use udplb_core::flow::FlowKey;
use udplb_core::handover::Placement;

/// A flow handed over with its upstream socket.
#[derive(Debug)]
pub struct HandedFlow {
    /// The worker that had it: the one reading the same listener socket in the next process
    /// (the kernel keeps hashing the client to that socket).
    pub worker: usize,
    pub key: FlowKey,
    pub backend: SocketAddr,
    /// Bytes counted for reply-ratio limits.
    pub requested: u32,
    pub replied: u32,
    /// Its socket, connected to the backend.
    pub socket: UdpSocket,
}

/// What the workers handed over when they stopped reading.
#[derive(Debug, Default)]
pub struct Stopped {
    /// Flows that continue on their sockets.
    pub flows: Vec<HandedFlow>,
    /// Where the flows left here go.
    pub placements: Vec<Placement>,
}

/// Whether the workers read their listener sockets. Cloned freely; every clone is the same
/// switch.
#[derive(Clone)]
pub struct Listening {
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
}

pub(crate) struct Shared {
    reading: AtomicBool,
    /// Workers that stopped reading since the switch was last turned off, and what they
    /// handed over.
    stopped: Mutex<(usize, Stopped)>,
    /// Flows given back (a handover that failed), taken by their workers when they resume.
    returned: Mutex<Vec<HandedFlow>>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            reading: AtomicBool::new(true),
            stopped: Mutex::new((0, Stopped::default())),
            returned: Mutex::new(Vec::new()),
        }
    }
}

impl Shared {
    /// Whether workers should read their listeners (once per turn, not per datagram).
    #[inline]
    pub(crate) fn reading(&self) -> bool {
        self.reading.load(Ordering::Acquire)
    }

    /// A worker stopped reading, handing over `flows` and saying where the others go.
    pub(crate) fn stopped(
        &self,
        flows: Vec<HandedFlow>,
        placements: impl Iterator<Item = Placement>,
    ) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        stopped.0 += 1;
        stopped.1.flows.extend(flows);
        stopped.1.placements.extend(placements);
    }

    /// The flows given back to worker `worker`.
    pub(crate) fn take_returned(&self, worker: usize) -> Vec<HandedFlow> {
        let mut returned = self.returned.lock().unwrap_or_else(|p| p.into_inner());
        let (mine, others) = std::mem::take(&mut *returned)
            .into_iter()
            .partition(|f| f.worker == worker);
        *returned = others;
        mine
    }
}

impl Listening {
    pub(crate) fn new(shared: Arc<Shared>, wakers: Vec<Arc<mio::Waker>>) -> Listening {
        Listening { shared, wakers }
    }

    /// Stops every worker reading its listener sockets and returns what they handed over, once
    /// all of them stopped; `None` if one did not within `timeout` (they read again).
    pub fn stop(&self, timeout: Duration) -> Option<Stopped> {
        *self.lock() = (0, Stopped::default());
        self.shared.reading.store(false, Ordering::Release);
        self.wake();
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut stopped = self.lock();
                if stopped.0 >= self.wakers.len() {
                    return Some(std::mem::take(&mut stopped.1));
                }
            }
            if Instant::now() >= deadline {
                let stopped = std::mem::take(&mut self.lock().1);
                self.resume(stopped.flows);
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The workers read their listener sockets again and take back `flows` (a handover that
    /// failed).
    pub fn resume(&self, flows: Vec<HandedFlow>) {
        self.shared
            .returned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(flows);
        self.shared.reading.store(true, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Stopped)> {
        self.shared
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}
