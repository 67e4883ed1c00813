//! Backend to client: reading upstream sockets, carrying out the engine's verdict on each reply
//! (queued on the listener's reply batch, from the address the client sent to), and reading
//! what upstream sockets report of refusals.

use std::io;
use std::os::fd::AsFd;

use udplb_core::engine::{Engine, Ownerless, ReplyVerdict};
use udplb_core::flow::FlowHandle;
use udplb_core::snapshot::{BackendId, Snapshot};
use udplb_core::verdict::CloseReason;
use udplb_core::{DropReason, SessionMode, Time};
use udplb_sys::batch::{RecvBatch, RecvMeta};

use super::{PortRef, Worker};
use crate::upstream::{Io, UpstreamSocket, account_refusals, refused};

/// Reply batches read from one upstream socket per turn.
const REPLY_BATCHES_PER_FLOW_PER_TURN: usize = 2;
/// Reply batches (a listener batch each) read from one shared upstream socket per turn.
const REPLY_BATCHES_PER_PORT_PER_TURN: usize = 8;

/// What [`Worker::queue_reply`] did with a reply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relayed {
    Queued,
    /// The flow is gone, or got its last expected reply and is closed.
    FlowEnded,
}

impl Worker {
    /// Reads replies from flow `h`'s own upstream socket (`recvmmsg`) and queues them on its
    /// listener's reply batch. Returns whether the socket was drained (false: the budget or the
    /// reply queue ran out; resume next turn).
    pub(super) fn relay_replies(
        &mut self,
        snap: &Snapshot,
        h: FlowHandle,
        inbox: &mut RecvBatch,
        now: Time,
    ) -> bool {
        let Some((key, _)) = self.engine.key(h) else {
            return true;
        };
        let li = usize::from(key.listener);
        for _ in 0..REPLY_BATCHES_PER_FLOW_PER_TURN {
            if !self.listeners[li].reply_room(
                inbox.capacity(),
                &self.stats.listeners[li],
                &mut self.log,
            ) {
                return false;
            }
            // Only a flow's own socket raises readiness under the flow's token.
            let Some(Io {
                socket: UpstreamSocket::Own(socket),
                ..
            }) = self.engine.io(h)
            else {
                return true;
            };
            match inbox.recv(socket.as_fd()) {
                Ok(n) => {
                    if self.queue_replies(snap, li, h, inbox, now) == Relayed::FlowEnded {
                        return true;
                    }
                    // Fewer than asked for: the socket is empty (a later datagram raises a new
                    // edge), so no extra call just to see EAGAIN.
                    if n < inbox.capacity() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    if !self.on_receive_error(snap, li, h, &e, now) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// A failed receive on flow `h`'s own socket. A refusal on a connected socket is a
    /// passive failure of its backend; on an unconnected one (datagram mode), one of the
    /// backends refused a datagram and the error queue says which: the flow serves the
    /// others, and replies may still be queued behind the error. Returns whether the flow
    /// lives on (else it was closed).
    fn on_receive_error(
        &mut self,
        snap: &Snapshot,
        li: usize,
        h: FlowHandle,
        e: &io::Error,
        now: Time,
    ) -> bool {
        let is_refusal = refused(e);
        if let Some(backend) = self.engine.socket_failed(h, is_refusal) {
            self.stats.listeners[li].backend_refused.add(1);
            self.stats.passive_failure(backend);
        } else if is_refusal {
            if let Some(Io {
                socket: UpstreamSocket::Own(socket),
                ..
            }) = self.engine.io(h)
            {
                let _ = account_refusals(socket.as_fd(), li, snap, &self.stats);
            }
            return true;
        } else {
            self.log.warn("upstream receive", e);
        }
        self.close_flow(h, CloseReason::Error, now);
        false
    }

    /// Queues the replies in `inbox`, all from flow `h`'s own socket ([`Worker::queue_reply`]).
    /// Replies after the last one the flow expected are discarded, as late replies.
    fn queue_replies(
        &mut self,
        snap: &Snapshot,
        li: usize,
        h: FlowHandle,
        inbox: &RecvBatch,
        now: Time,
    ) -> Relayed {
        for i in 0..inbox.len() {
            if self.queue_reply(snap, li, h, &inbox.get(i), now) == Relayed::FlowEnded {
                let late = (inbox.len() - i - 1) as u64;
                if late > 0 {
                    self.stats.listeners[li].late_replies.add(late);
                }
                return Relayed::FlowEnded;
            }
        }
        Relayed::Queued
    }

    /// Reads replies from shared upstream socket `port` (`recvmmsg`) and queues each for the
    /// flow that owns (socket, its source). Returns whether the socket was drained (false: the
    /// budget or the reply queue ran out; resume next turn).
    pub(super) fn relay_port_replies(
        &mut self,
        snap: &Snapshot,
        (li, v6, port): PortRef,
        inbox: &mut RecvBatch,
        now: Time,
    ) -> bool {
        if li >= self.listeners.len() {
            return true;
        }
        for _ in 0..REPLY_BATCHES_PER_PORT_PER_TURN {
            if !self.listeners[li].reply_room(
                inbox.capacity(),
                &self.stats.listeners[li],
                &mut self.log,
            ) {
                return false;
            }
            let Some(socket) = self.upstreams.shared_socket(li, v6, port) else {
                return true;
            };
            match inbox.recv(socket.as_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let reply = inbox.get(i);
                        match self.upstreams.owner(li, v6, port, reply.source) {
                            Some(h) => {
                                self.queue_reply(snap, li, h, &reply, now);
                            }
                            None => self.count_ownerless(snap, li, reply.source),
                        }
                    }
                    if n < inbox.capacity() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if refused(&e) => {
                    // A backend refused a flow's datagram: that flow closes, so its next
                    // datagram is scheduled afresh (as with a socket of its own).
                    let refusals = account_refusals(socket.as_fd(), li, snap, &self.stats);
                    for dest in refusals.iter() {
                        if let Some(h) = self.upstreams.owner(li, v6, port, dest) {
                            self.close_flow(h, CloseReason::Error, now);
                        }
                    }
                }
                Err(e) => {
                    self.log.warn("shared upstream receive", &e);
                    return true;
                }
            }
        }
        false
    }

    /// Counts a datagram on a shared socket of listener `li` that no flow owns: a backend's
    /// late answer to a closed flow, or a stranger's (dropped as from an unknown source).
    fn count_ownerless(&self, snap: &Snapshot, li: usize, source: std::net::SocketAddr) {
        let stats = &self.stats.listeners[li];
        match Engine::<Io>::ownerless(snap, li, source) {
            Ownerless::LateReply => stats.late_replies.add(1),
            Ownerless::UnknownSource => stats.drop(DropReason::UnknownSource),
        }
    }

    /// Carries out the engine's verdict on `reply`, received for flow `h` of listener `li`:
    /// queued for the flow's client, from the address the client sent to, or counted as
    /// dropped. The first reply of a request-response exchange is a latency sample.
    fn queue_reply(
        &mut self,
        snap: &Snapshot,
        li: usize,
        h: FlowHandle,
        reply: &RecvMeta<'_>,
        now: Time,
    ) -> Relayed {
        let verdict =
            self.engine
                .on_reply(snap, now, h, &reply.source, reply.data, reply.truncated);
        match verdict {
            ReplyVerdict::Gone => Relayed::FlowEnded,
            ReplyVerdict::Drop { reason, backend } => {
                let stats = &self.stats.listeners[li];
                stats.replies_in.add(1);
                stats.drop(reason);
                if let Some(backend) = backend {
                    self.count_backend_reply(snap, li, h, backend, reply.data.len());
                }
                Relayed::Queued
            }
            ReplyVerdict::Forward {
                to,
                from,
                skip,
                backend,
                completes,
            } => {
                let payload = &reply.data[skip..];
                self.listeners[li].replies.push(payload, *to, *from);
                let stats = &self.stats.listeners[li];
                stats.replies_in.add(1);
                stats.bytes_out.add(payload.len() as u64);
                self.count_backend_reply(snap, li, h, backend, reply.data.len());
                if completes {
                    self.close_flow(h, CloseReason::Completed, now);
                    return Relayed::FlowEnded;
                }
                Relayed::Queued
            }
        }
    }

    /// Counts a reply of `len` bytes from `backend` on flow `h` of listener `li`.
    #[inline]
    fn count_backend_reply(
        &mut self,
        snap: &Snapshot,
        li: usize,
        h: FlowHandle,
        backend: BackendId,
        len: usize,
    ) {
        let Some(b) = self.stats.backends.get(backend.index()) else {
            return;
        };
        b.replies.add(1);
        b.bytes_replied.add(len as u64);
        if matches!(snap.listeners[li].mode, SessionMode::RequestResponse { .. }) {
            self.sample_reply_latency(h, backend);
        }
    }

    /// Request-response mode: the first reply of an exchange records the time since its
    /// request.
    #[inline(never)]
    fn sample_reply_latency(&mut self, h: FlowHandle, backend: BackendId) {
        let Some(sent) = self
            .engine
            .io_mut(h)
            .and_then(|io| io.request_sent_us.take())
        else {
            return;
        };
        let elapsed = self.micros().saturating_sub(sent);
        if let Some(b) = self.stats.backends.get(backend.index()) {
            b.record_reply_latency(elapsed);
        }
    }
}
