//! A worker's listener sockets: where client datagrams arrive and replies leave.
//!
//! Owns: one worker's socket of a listener, its queue of replies (sent with `sendmmsg`), and
//! what the worker measures of it (readable since the last drain, backlog, kernel drops).
//! Must not: decide anything about a datagram (the engine does) or touch upstream sockets.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use udplb_core::DropReason;
use udplb_core::snapshot::ListenerSpec;
use udplb_sys::batch::SendBatch;

use crate::log::RateLimitedLog;
use crate::stats::ListenerStats;

/// A listener is overloaded when a turn ends with its receive queue more than this fraction
/// (1 / N) of its buffer: new flows are then rationed.
const OVERLOAD_FILL: u32 = 2;

/// A listener socket of a worker and its queue of replies.
pub(crate) struct ListenerIo {
    pub socket: UdpSocket,
    /// The address the socket is bound to (port resolved), for PROXY headers.
    pub bound: SocketAddr,
    pub replies: SendBatch,
    /// Bound to 0.0.0.0 or [::]: replies need an explicit source address.
    pub wildcard: bool,
    /// Not yet drained since the last readiness event.
    pub readable: bool,
    /// The last turn ended with the socket's receive queue more than [`OVERLOAD_FILL`] full:
    /// new flows are admitted at a bounded rate so that the datagrams of established flows
    /// keep being read before the kernel has to drop them.
    pub overloaded: bool,
}

impl ListenerIo {
    /// Listener `spec`'s socket, with a reply queue of `batch` replies.
    pub(crate) fn new(socket: UdpSocket, spec: &ListenerSpec, batch: usize) -> io::Result<Self> {
        Ok(ListenerIo {
            bound: socket.local_addr()?,
            socket,
            replies: SendBatch::new(batch, spec.max_datagram_size + 1),
            wildcard: spec.address.ip().is_unspecified(),
            readable: true,
            overloaded: false,
        })
    }

    /// Whether the reply queue has room for `n` more replies, flushing it first if not
    /// (false: the send buffer is full; resume next turn).
    #[inline]
    pub(crate) fn reply_room(
        &mut self,
        n: usize,
        stats: &ListenerStats,
        log: &mut RateLimitedLog,
    ) -> bool {
        if self.replies.room() < n {
            self.flush(stats, log);
        }
        self.replies.room() >= n
    }

    /// Sends the queued replies and counts the outcome.
    pub(crate) fn flush(&mut self, stats: &ListenerStats, log: &mut RateLimitedLog) {
        if self.replies.is_empty() {
            return;
        }
        let outcome = self.replies.flush(self.socket.as_fd());
        stats.replies_out.add(outcome.sent as u64);
        if outcome.failed > 0 {
            stats.drop_n(DropReason::ReplySendError, outcome.failed as u64);
        }
        if outcome.blocked {
            // The socket's send buffer is full: drop what is queued rather than stall the loop.
            stats.drop_n(DropReason::ReplySendError, self.replies.len() as u64);
            self.replies.clear();
        }
        if let Some(e) = outcome.last_error {
            log.warn("sending replies", &e);
        }
    }

    /// At the end of a turn's reading: the socket is overloaded when the turn used its whole
    /// budget and left more than [`OVERLOAD_FILL`] of the buffer queued (one syscall per such
    /// turn, never per datagram).
    pub(crate) fn measure_backlog(&mut self) {
        self.overloaded = self.readable
            && udplb_sys::socket::receive_queue(&self.socket)
                .is_ok_and(|(queued, buffer)| queued > buffer / OVERLOAD_FILL);
    }

    /// Copies the socket's kernel drop count into `stats`.
    pub(crate) fn read_kernel_drops(&self, stats: &ListenerStats) {
        if let Ok(drops) = udplb_sys::socket::receive_drops(&self.socket) {
            stats.kernel_drops.set(u64::from(drops));
        }
    }
}
