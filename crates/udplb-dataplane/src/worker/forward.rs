//! Client to backend: reading a listener, carrying out the engine's verdict on each datagram
//! (open or move a flow's socket first when told to), sending, and counting.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use udplb_core::engine::{Datagram, Engine, Move, Open, Send, Verdict};
use udplb_core::flow::FlowHandle;
use udplb_core::snapshot::Snapshot;
use udplb_core::verdict::CloseReason;
use udplb_core::{DropReason, Time};
use udplb_sys::batch::{RecvBatch, RecvMeta, Transmit};

use super::{LISTENER_BATCHES_PER_TURN, Worker, flow_token, port_token};
use crate::upstream::{Io, UpstreamSocket, account_refusals, owner_of, refused, socket_of};

impl Worker {
    /// Reads up to [`LISTENER_BATCHES_PER_TURN`] batches from listener `li` and forwards them.
    pub(super) fn forward_from_listener(
        &mut self,
        li: usize,
        snap: &Snapshot,
        recv: &mut RecvBatch,
        now: Time,
    ) {
        let overloaded = self.listeners[li].overloaded;
        let trains = Engine::<Io>::passes_trains(snap, li);
        for _ in 0..LISTENER_BATCHES_PER_TURN {
            match recv.recv(self.listeners[li].socket.as_fd()) {
                Ok(n) => {
                    self.engine.begin_batch(overloaded);
                    for i in 0..n {
                        let d = recv.get(i);
                        if d.segment_size.is_none() {
                            self.forward_one(li, snap, d, now);
                            continue;
                        }
                        self.stats.listeners[li].gro_trains.add(1);
                        if trains {
                            self.forward_one(li, snap, d, now);
                            continue;
                        }
                        // A per-datagram policy applies: take the train apart.
                        for data in d.datagrams() {
                            let single = RecvMeta {
                                data,
                                segment_size: None,
                                ..d
                            };
                            self.forward_one(li, snap, single, now);
                        }
                    }
                    // A short batch means the socket is empty; a later datagram raises a new
                    // edge, so no extra call just to see EAGAIN.
                    if n < recv.capacity() {
                        self.listeners[li].readable = false;
                        break;
                    }
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.log.warn("listener receive", &e);
                    }
                    self.listeners[li].readable = false;
                    break;
                }
            }
        }
        self.listeners[li].measure_backlog();
    }

    /// Forwards `d`, received on listener `li`, as the engine decides, or counts why not. `d`
    /// is one datagram, or a GRO train the engine lets pass whole: the same decisions hold for
    /// all its datagrams, which are counted one by one.
    #[inline]
    fn forward_one(&mut self, li: usize, snap: &Snapshot, d: RecvMeta<'_>, now: Time) {
        let count = d.datagram_count() as u64;
        let stats = &self.stats.listeners[li];
        stats.datagrams_in.add(count);
        stats.bytes_in.add(d.data.len() as u64);
        let datagram = Datagram {
            listener: li as u16,
            source: d.source,
            local: if self.listeners[li].wildcard {
                d.local
            } else {
                None
            },
            data: d.data,
            truncated: d.truncated,
            segment_size: d.segment_size,
        };
        let verdict = self.engine.on_client(snap, now, &datagram);
        // By reference: an `Open` is a few hundred bytes, not worth a copy.
        let send = match verdict {
            Verdict::Send(s) => s,
            Verdict::Drop(reason) => return self.stats.listeners[li].drop_n(reason, count),
            Verdict::Open(ref open) => match self.open_flow(open, now) {
                Ok(s) => s,
                Err(reason) => return self.stats.listeners[li].drop_n(reason, count),
            },
            Verdict::Move(ref m) => match self.move_flow(m, now) {
                Ok(s) => s,
                Err(reason) => return self.stats.listeners[li].drop_n(reason, count),
            },
        };
        let payload = &d.data[send.skip..];
        match self.transmit(li, snap, &send, payload, d.segment_size, now) {
            Ok(()) => self.count_forwarded(li, snap, &send, payload.len(), count, now),
            Err(reason) => self.stats.listeners[li].drop_n(reason, count),
        }
    }

    /// Sends `payload` as `s` says: on the flow's socket, with a PROXY header in front when
    /// asked, to the backend named when the socket is not connected to it.
    #[inline]
    fn transmit(
        &mut self,
        li: usize,
        snap: &Snapshot,
        s: &Send,
        payload: &[u8],
        segment_size: Option<u16>,
        now: Time,
    ) -> Result<(), DropReason> {
        let io = self.engine.io(s.flow).ok_or(DropReason::SendError)?;
        let fd = socket_of(io, &self.upstreams, li, s.to).ok_or(DropReason::SendError)?;
        let head = if s.header {
            let bound = self.listeners[li].bound;
            self.engine.write_header(s.flow, bound, &mut self.header)
        } else {
            0
        };
        let t = Transmit {
            destination: s.name_destination.then_some(s.to),
            head: &self.header[..head],
            contents: payload,
            segment_size,
        };
        let mut sent = udplb_sys::batch::transmit(fd, &t);
        if s.name_destination && sent.as_ref().is_err_and(refused) {
            // An unconnected socket fails its next send once after any refusal it was told of,
            // whichever backend refused: account for what is queued, and send again.
            let _ = account_refusals(fd, li, snap, &self.stats);
            sent = udplb_sys::batch::transmit(fd, &t);
        }
        match sent {
            Ok(_) => Ok(()),
            Err(e) => Err(self.on_send_error(s.flow, li, &e, now)),
        }
    }

    /// Counts a datagram (or train of `count`) of `len` bytes sent as `s`, and tells the engine.
    #[inline]
    fn count_forwarded(
        &mut self,
        li: usize,
        snap: &Snapshot,
        s: &Send,
        len: usize,
        count: u64,
        now: Time,
    ) {
        let stats = &self.stats.listeners[li];
        if s.abuse {
            stats.abuse_diverted.add(count);
        }
        stats.forwarded.add(count);
        stats.bytes_forwarded.add(len as u64);
        if let Some(b) = self.stats.backends.get(s.backend.index()) {
            b.forwarded.add(count);
            b.bytes_forwarded.add(len as u64);
        }
        if self.engine.sent(snap, s, now, len) {
            let sent = self.micros();
            if let Some(io) = self.engine.io_mut(s.flow) {
                io.request_sent_us = Some(sent);
            }
        }
    }

    /// Counts a failed send; one refused on a flow's connected socket (ICMP port or host
    /// unreachable) is a passive failure of its backend and closes the flow, so its next
    /// datagram is scheduled afresh.
    // Off the per-datagram path: kept out of line so the hot path's frame stays small.
    #[inline(never)]
    fn on_send_error(&mut self, h: FlowHandle, li: usize, e: &io::Error, now: Time) -> DropReason {
        if let Some(backend) = self.engine.socket_failed(h, refused(e)) {
            self.stats.listeners[li].backend_refused.add(1);
            self.stats.passive_failure(backend);
            self.close_flow(h, CloseReason::Error, now);
        }
        DropReason::SendError
    }

    /// Gets the flow `open` describes its upstream socket (a spare, a shared pair or a new
    /// one), records it with the engine and registers the socket for readiness. Returns the
    /// send of its first datagram.
    // Off the per-datagram path: kept out of line so the hot path's frame stays small.
    #[inline(never)]
    fn open_flow(&mut self, open: &Open, now: Time) -> Result<Send, DropReason> {
        let li = usize::from(open.key.listener);
        let (socket, reused) = self.upstreams.for_flow(
            open,
            now,
            self.poll.registry(),
            |v6, port| port_token((li, v6, port)),
            &self.stats,
            &mut self.log,
        )?;
        let registration = match &socket {
            UpstreamSocket::Own(s) => Ok(s.as_raw_fd()),
            UpstreamSocket::Shared(port) => Err(*port),
        };
        let io = Io {
            socket,
            request_sent_us: None,
        };
        let send = self.engine.opened(open, io, now);
        match registration {
            Ok(fd) => self.register_own(send.flow, fd, reused, now)?,
            Err(port) => self.upstreams.assign(li, port, open.to, send.flow),
        }
        let stats = &self.stats.listeners[li];
        if reused {
            stats.sockets_reused.add(1);
        }
        stats.flows_created.add(1);
        Ok(send)
    }

    /// Registers flow `h`'s own socket `fd` for readiness under the flow's token (`reused`: a
    /// spare, still registered under its previous flow's token). On failure the flow is closed.
    pub(super) fn register_own(
        &mut self,
        h: FlowHandle,
        fd: RawFd,
        reused: bool,
        now: Time,
    ) -> Result<(), DropReason> {
        let token: Token = flow_token(h);
        let registry = self.poll.registry();
        let registered = if reused {
            registry.reregister(&mut SourceFd(&fd), token, Interest::READABLE)
        } else {
            registry.register(&mut SourceFd(&fd), token, Interest::READABLE)
        };
        if let Err(e) = registered {
            self.log
                .warn("registering an upstream socket (new flows are shed)", &e);
            self.close_flow(h, CloseReason::Error, now);
            return Err(DropReason::UpstreamSocket);
        }
        Ok(())
    }

    /// Moves a flow as `m` says: its own socket re-connected, or a pair with the new backend
    /// taken and the old pair given back. Returns the send that follows.
    // Off the per-datagram path: kept out of line so the hot path's frame stays small.
    #[inline(never)]
    fn move_flow(&mut self, m: &Move, now: Time) -> Result<Send, DropReason> {
        let (key, _) = self.engine.key(m.flow).ok_or(DropReason::SendError)?;
        let (li, owner) = (usize::from(key.listener), owner_of(key));
        let io = self.engine.io(m.flow).ok_or(DropReason::SendError)?;
        match &io.socket {
            UpstreamSocket::Own(s) => {
                if let Err(e) = s.connect(m.to) {
                    self.log.warn("re-connecting a moved flow", &e);
                    return Err(DropReason::SendError);
                }
            }
            &UpstreamSocket::Shared(old) => {
                let new = self.upstreams.reserve_port(
                    li,
                    m.to,
                    owner,
                    now,
                    self.poll.registry(),
                    |v6, port| port_token((li, v6, port)),
                    &mut self.log,
                )?;
                self.upstreams
                    .release(li, old, m.from, owner, m.quarantine_end);
                self.upstreams.assign(li, new, m.to, m.flow);
                if let Some(io) = self.engine.io_mut(m.flow) {
                    io.socket = UpstreamSocket::Shared(new);
                }
            }
        }
        if m.rebalance {
            self.stats.listeners[li].flows_rebalanced.add(1);
        }
        Ok(self.engine.moved(m))
    }
}
