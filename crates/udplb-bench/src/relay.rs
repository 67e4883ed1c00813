//! `udplb-bench relay`: the minimal reference relay of `scripts/compare.sh`, to show the socket
//! path's ceiling in the same run. The same primitives as udplb (udplb-sys `recvmmsg` batches on
//! the listener, one connected socket per client, replies gathered into `sendmmsg` on the
//! listener, mio/epoll) and no policy at all: no scheduler (backends in turn per new client),
//! no health, no idle expiry, no caps, no counters, one thread.
//!
//! With `--per-datagram` each client's socket is left unconnected and every datagram goes to
//! the next backend with `sendto`: the socket path of udplb's datagram mode, as its ceiling.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use anyhow::Context;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use udplb_sys::batch::{RecvBatch, SendBatch, send, send_to};
use udplb_sys::socket::{ListenerOptions, bind_listener, upstream_socket};

const LISTENER: Token = Token(usize::MAX);
const BATCH: usize = 64;
const MAX_DATAGRAM: usize = 65_536;

/// Relays between clients on `listen` and `backends` until killed.
pub fn run(listen: SocketAddr, backends: &[SocketAddr], per_datagram: bool) -> anyhow::Result<()> {
    let opts = ListenerOptions {
        reuse_port: false,
        recv_buffer: Some(4 << 20),
        send_buffer: Some(4 << 20),
        gro: false,
    };
    let listener = bind_listener(listen, &opts).with_context(|| format!("binding {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    let mut poll = Poll::new()?;
    poll.registry().register(
        &mut SourceFd(&listener.as_raw_fd()),
        LISTENER,
        Interest::READABLE,
    )?;
    let mut relay = Relay {
        listener,
        backends: backends.to_vec(),
        per_datagram,
        next: 0,
        flows: HashMap::new(),
        upstreams: Vec::new(),
        inbox: RecvBatch::new(BATCH, MAX_DATAGRAM),
        replies: SendBatch::new(BATCH, MAX_DATAGRAM),
    };
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                relay.forward_from_clients(&poll)?;
            } else {
                relay.relay_from_backend(ev.token().0);
            }
        }
        relay.replies.flush(relay.listener.as_fd());
    }
}

struct Relay {
    listener: UdpSocket,
    backends: Vec<SocketAddr>,
    /// Schedule every datagram (else every new client).
    per_datagram: bool,
    /// The backend of the next datagram, per datagram.
    next: usize,
    flows: HashMap<SocketAddr, usize>,
    upstreams: Vec<(UdpSocket, SocketAddr)>,
    inbox: RecvBatch,
    replies: SendBatch,
}

impl Relay {
    fn forward_from_clients(&mut self, poll: &Poll) -> anyhow::Result<()> {
        while let Ok(n) = self.inbox.recv(self.listener.as_fd()) {
            for i in 0..n {
                let d = self.inbox.get(i);
                let index = match self.flows.get(&d.source) {
                    Some(&i) => i,
                    None => {
                        let backend = self.backends[self.upstreams.len() % self.backends.len()];
                        let socket = upstream_socket(backend, !self.per_datagram, None, None)?;
                        let index = self.upstreams.len();
                        poll.registry().register(
                            &mut SourceFd(&socket.as_raw_fd()),
                            Token(index),
                            Interest::READABLE,
                        )?;
                        self.upstreams.push((socket, d.source));
                        self.flows.insert(d.source, index);
                        index
                    }
                };
                let socket = self.upstreams[index].0.as_fd();
                if self.per_datagram {
                    let backend = self.backends[self.next];
                    self.next = (self.next + 1) % self.backends.len();
                    let _ = send_to(socket, d.data, backend);
                } else {
                    let _ = send(socket, d.data);
                }
            }
            if n < BATCH {
                break;
            }
        }
        Ok(())
    }

    fn relay_from_backend(&mut self, index: usize) {
        let Some((socket, client)) = self.upstreams.get(index) else {
            return;
        };
        while let Ok(n) = self.inbox.recv(socket.as_fd()) {
            for i in 0..n {
                if self.replies.room() == 0 {
                    self.replies.flush(self.listener.as_fd());
                }
                self.replies.push(self.inbox.get(i).data, *client, None);
            }
            if n < BATCH {
                break;
            }
        }
    }
}
