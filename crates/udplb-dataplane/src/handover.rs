//! Handing the listener sockets to another udplb process (a binary upgrade) and back.
//!
//! Owns: [`Listening`], the switch the workers read once per turn: while it is off they leave
//! their listener sockets unread (the process they were handed to reads them), keep relaying
//! replies of their established flows through those sockets, and say where each flow goes.
//! Must not: send the sockets anywhere (the caller does) or stop the workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use udplb_core::handover::Placement;

/// Whether the workers read their listener sockets. Cloned freely; every clone is the same
/// switch.
#[derive(Clone)]
pub struct Listening {
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
}

pub(crate) struct Shared {
    reading: AtomicBool,
    /// Workers that stopped reading since the switch was last turned off, and the placements
    /// of their flows.
    stopped: Mutex<(usize, Vec<Placement>)>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            reading: AtomicBool::new(true),
            stopped: Mutex::new((0, Vec::new())),
        }
    }
}

impl Shared {
    /// Whether workers should read their listeners (once per turn, not per datagram).
    #[inline]
    pub(crate) fn reading(&self) -> bool {
        self.reading.load(Ordering::Acquire)
    }

    /// A worker stopped reading; `placements` are its flows.
    pub(crate) fn stopped(&self, placements: impl Iterator<Item = Placement>) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        stopped.0 += 1;
        stopped.1.extend(placements);
    }
}

impl Listening {
    pub(crate) fn new(shared: Arc<Shared>, wakers: Vec<Arc<mio::Waker>>) -> Listening {
        Listening { shared, wakers }
    }

    /// Stops every worker reading its listener sockets and returns where their flows go, once
    /// all of them stopped; `None` if one did not within `timeout` (the switch stays off).
    pub fn stop(&self, timeout: Duration) -> Option<Vec<Placement>> {
        *self.lock() = (0, Vec::new());
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
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The workers read their listener sockets again (a handover that failed).
    pub fn resume(&self) {
        self.shared.reading.store(true, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Vec<Placement>)> {
        self.shared
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}
