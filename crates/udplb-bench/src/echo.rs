//! Echo backends: each address gets a thread that receives batches (`recvmmsg`) and sends
//! them back to their senders in one `sendmmsg`.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::Context;
use mio::net::UdpSocket as MioUdpSocket;
use mio::{Events, Interest, Poll, Token};
use udplb_sys::batch::{RecvBatch, SendBatch};
use udplb_sys::socket::{ListenerOptions, bind_listener};

const BATCH: usize = 64;
const MAX_DATAGRAM: usize = 65_535;
const BUFFER: usize = 4 << 20;

/// Binds every address, reports them on stdout, and echoes until killed.
pub fn run(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for addr in addrs {
        // Large buffers: the backends must not be where a benchmark loses datagrams.
        let opts = ListenerOptions {
            reuse_port: false,
            recv_buffer: Some(BUFFER),
            send_buffer: Some(BUFFER),
        };
        let socket = bind_listener(*addr, &opts).with_context(|| format!("binding {addr}"))?;
        println!("listening {}", socket.local_addr()?);
        threads.push(std::thread::spawn(move || serve(socket)));
    }
    std::io::stdout().flush()?;
    for t in threads {
        t.join().expect("echo thread panicked")?;
    }
    Ok(())
}

fn serve(socket: UdpSocket) -> anyhow::Result<()> {
    let mut poll = Poll::new()?;
    let mut socket = MioUdpSocket::from_std(socket);
    poll.registry()
        .register(&mut socket, Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(4);
    let mut recv = RecvBatch::new(BATCH, MAX_DATAGRAM);
    let mut send = SendBatch::new(BATCH, MAX_DATAGRAM);
    loop {
        poll.poll(&mut events, Some(Duration::from_secs(1)))?;
        while let Ok(n) = recv.recv(socket.as_fd()) {
            for i in 0..n {
                let d = recv.get(i);
                send.push(d.data, d.source, None);
            }
            // A full send buffer drops the rest, as a real server would.
            send.flush(socket.as_fd());
            send.clear();
        }
    }
}
