//! `udplb-bench bulk`: one bulk flow of same-sized datagrams, sent as UDP GSO trains (or one
//! by one), to a sink that reads with UDP GRO (`scripts/gso.sh`).
//!
//! The sender sends from one connected socket as fast as its socket buffer drains; the sink,
//! bound at `--sink`, counts the datagrams it receives (a GRO buffer holds several). Reports
//! datagrams and bytes per second received over the measured window, after a warmup.

use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, setsockopt, sockopt};

#[derive(Args)]
pub struct BulkArgs {
    /// Where to send (a balancer, or the sink itself for the direct baseline).
    #[arg(long)]
    target: SocketAddr,
    /// Address the sink binds (the balancer's backend).
    #[arg(long)]
    sink: SocketAddr,
    /// Payload bytes per datagram.
    #[arg(long, default_value_t = 1400)]
    segment: u16,
    /// Datagrams per send: more than 1 sends GSO trains (`UDP_SEGMENT`), 1 sends them one by one.
    #[arg(long, default_value_t = 32)]
    train: usize,
    /// Measured time, after the warmup.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

/// Runs the flow and prints one JSON line.
pub fn run(args: &BulkArgs) -> anyhow::Result<()> {
    let sink = UdpSocket::bind(args.sink).with_context(|| format!("binding {}", args.sink))?;
    setsockopt(&sink, sockopt::UdpGroSegment, &true).context("UDP_GRO on the sink")?;
    setsockopt(&sink, sockopt::RcvBuf, &(8 << 20))?;
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
        std::thread::spawn(move || drain(&sink, &stop, &received))
    };
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(args.target)?;
    let sent = Arc::new(AtomicU64::new(0));
    let sending = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        let (segment, train) = (args.segment, args.train.max(1));
        std::thread::spawn(move || flood(&sender, segment, train, &stop, &sent))
    };
    std::thread::sleep(args.warmup);
    let (sent0, received0, start) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(args.duration);
    let secs = start.elapsed().as_secs_f64();
    let (sent1, received1) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    sending.join().expect("sender thread")?;
    receiver.join().expect("sink thread")?;
    let got = received1 - received0;
    println!(
        "{}",
        serde_json::json!({
            "datagrams_per_sec": got as f64 / secs,
            "mbit_per_sec": got as f64 * f64::from(args.segment) * 8.0 / secs / 1e6,
            "sent_per_sec": (sent1 - sent0) as f64 / secs,
            "received": got,
        })
    );
    Ok(())
}

/// Sends trains of `train` datagrams of `segment` bytes until `stop`.
fn flood(
    socket: &UdpSocket,
    segment: u16,
    train: usize,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> anyhow::Result<()> {
    let payload = vec![0x5a_u8; usize::from(segment) * train];
    let gso = [ControlMessage::UdpGsoSegments(&segment)];
    let cmsgs: &[ControlMessage<'_>] = if train > 1 { &gso } else { &[] };
    while !stop.load(Ordering::Relaxed) {
        let iov = [IoSlice::new(&payload)];
        match nix::sys::socket::sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::empty(),
            None,
        ) {
            Ok(_) => {
                sent.fetch_add(train as u64, Ordering::Relaxed);
            }
            // The balancer's or the sink's port is not open yet (ICMP), or a full queue.
            Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOBUFS) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("sending"),
        }
    }
    Ok(())
}

/// Counts received datagrams (each GRO buffer's segments) until `stop`.
fn drain(socket: &UdpSocket, stop: &AtomicBool, received: &AtomicU64) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65_536];
    let mut space = nix::cmsg_space!(i32);
    while !stop.load(Ordering::Relaxed) {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match nix::sys::socket::recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("receiving"),
        };
        let mut segment = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::UdpGroSegments(size) = c {
                segment = usize::try_from(size).ok().filter(|&s| s > 0);
            }
        }
        let n = msg.bytes;
        let datagrams = segment.map_or(1, |s| n.div_ceil(s));
        received.fetch_add(datagrams as u64, Ordering::Relaxed);
    }
    Ok(())
}
