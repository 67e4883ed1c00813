//! `udplb-bench echo`: UDP echo backends. Each address gets a thread with a blocking socket
//! that receives a batch (`recvmmsg`, returning as soon as one datagram is there) and sends the
//! whole batch back to its senders with `sendmmsg` — few syscalls per datagram, so the
//! backends are not what a benchmark measures.

use std::io::{IoSlice, IoSliceMut, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use anyhow::Context;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, setsockopt,
    sockopt,
};

/// Datagrams per syscall.
const BATCH: usize = 64;
/// Largest datagram echoed whole.
const MAX_DATAGRAM: usize = 65_535;
/// Socket buffers asked for (the kernel caps them at `net.core.[rw]mem_max`).
const BUFFER: usize = 4 << 20;

/// Binds every address, reports them on stdout, and echoes until killed.
pub fn run(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let mut sockets = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let socket = bind(*addr).with_context(|| format!("binding {addr}"))?;
        println!("listening {}", socket.local_addr()?);
        sockets.push(socket);
    }
    std::io::stdout().flush()?;
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|s| std::thread::spawn(move || serve(&s)))
        .collect();
    for t in threads {
        t.join().expect("echo thread panicked")?;
    }
    Ok(())
}

/// A blocking UDP socket with large buffers, so the backends are not where datagrams drop.
fn bind(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    // Best effort: a smaller buffer still works.
    let _ = setsockopt(&socket, sockopt::RcvBuf, &BUFFER);
    let _ = setsockopt(&socket, sockopt::SndBuf, &BUFFER);
    Ok(socket)
}

fn serve(socket: &UdpSocket) -> anyhow::Result<()> {
    let fd = socket.as_raw_fd();
    let mut batch = Batch::new();
    loop {
        match batch.receive(fd) {
            Ok(_) => batch.echo(fd),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("recvmmsg"),
        }
    }
}

/// Buffers and headers for one batch, reused across batches.
struct Batch {
    bufs: Vec<Vec<u8>>,
    /// Length and sender of each datagram of the current batch.
    received: Vec<(usize, Option<SockaddrStorage>)>,
    recv_headers: MultiHeaders<SockaddrStorage>,
    send_headers: MultiHeaders<SockaddrStorage>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            bufs: vec![vec![0; MAX_DATAGRAM]; BATCH],
            received: Vec::with_capacity(BATCH),
            recv_headers: MultiHeaders::preallocate(BATCH, None),
            send_headers: MultiHeaders::preallocate(BATCH, None),
        }
    }

    /// Blocks until at least one datagram arrives; takes up to [`BATCH`] of them.
    fn receive(&mut self, fd: RawFd) -> nix::Result<usize> {
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
            self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let results = recvmmsg(
            fd,
            &mut self.recv_headers,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )?;
        self.received.clear();
        self.received.extend(results.map(|m| (m.bytes, m.address)));
        Ok(self.received.len())
    }

    /// Sends the current batch back, each datagram to its sender. A datagram the kernel
    /// refuses is dropped, as a real server would drop it.
    fn echo(&mut self, fd: RawFd) {
        let iovs: Vec<[IoSlice<'_>; 1]> = self
            .bufs
            .iter()
            .zip(&self.received)
            .map(|(b, &(len, _))| [IoSlice::new(&b[..len])])
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> = self.received.iter().map(|r| r.1).collect();
        let mut from = 0;
        while from < iovs.len() {
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            let sent = sendmmsg(
                fd,
                &mut self.send_headers,
                &iovs[from..],
                &addrs[from..],
                no_cmsgs,
                MsgFlags::empty(),
            );
            // On a blocking socket the batch goes out whole unless a datagram fails; the
            // results are not iterated (nix would read address slots a send never fills), so
            // a batch that fails part-way loses its tail, and one failing at its first
            // datagram skips just that one.
            from = if sent.is_ok() { iovs.len() } else { from + 1 };
        }
    }
}
