//! Sockets as udplb needs them: listeners that report the local address of every datagram,
//! upstream sockets towards backends, and the open-file limit.
//!
//! Owns: which socket options are set and why. Must not: do datagram I/O (see [`crate::batch`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Options of a listener socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenerOptions {
    /// `SO_REUSEPORT`: several sockets (one per worker) share the address; the kernel spreads
    /// clients over them by hashing the 4-tuple.
    pub reuse_port: bool,
    /// `SO_RCVBUF` in bytes (`SO_RCVBUFFORCE` first, which works above `rmem_max` as root).
    pub recv_buffer: Option<usize>,
    /// `SO_SNDBUF` in bytes (`SO_SNDBUFFORCE` first).
    pub send_buffer: Option<usize>,
    /// `UDP_GRO`: the kernel may hand over a train of same-sized datagrams from one sender as
    /// one buffer ([`crate::batch::RecvMeta::segment_size`]); receive buffers must then hold
    /// 64 KiB.
    pub gro: bool,
}

/// Binds a non-blocking UDP listener on `addr`.
///
/// On a wildcard address (`0.0.0.0`, `[::]`) sets `IP_PKTINFO` (or `IPV6_RECVPKTINFO`) so every
/// datagram reports the address it was sent to ([`crate::batch::RecvMeta::local`]); a listener
/// bound to one address knows it, and skips the control message (about 50 ns of kernel work
/// per datagram received). Sets `IPV6_V6ONLY` so `[::]` and `0.0.0.0` are separate listeners,
/// and `IP_FREEBIND` so a virtual address that is not (yet) configured, as with a VRRP address
/// on a backup balancer, can be bound.
pub fn bind_listener(addr: SocketAddr, opts: &ListenerOptions) -> io::Result<UdpSocket> {
    let socket = nonblocking_udp(addr)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    let wildcard = addr.ip().is_unspecified();
    match addr {
        SocketAddr::V4(_) => {
            if wildcard {
                setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
            }
            socket.set_freebind_v4(true)?;
        }
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            if wildcard {
                setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
            }
            socket.set_freebind_v6(true)?;
        }
    }
    if opts.gro {
        setsockopt(&socket, sockopt::UdpGroSegment, &true)?;
    }
    set_buffers(&socket, opts.recv_buffer, opts.send_buffer);
    socket.bind(&SockAddr::from(addr))?;
    Ok(socket.into())
}

/// Gives a listener socket another process bound (an upgrade's predecessor) the options
/// `opts` asks for now: `UDP_GRO` on or off (receive buffers are sized by it) and the buffer
/// sizes. The address and `SO_REUSEPORT` are the socket's already.
pub fn adopt_listener(socket: &UdpSocket, opts: &ListenerOptions) -> io::Result<()> {
    setsockopt(socket, sockopt::UdpGroSegment, &opts.gro)?;
    set_buffers(
        &socket2::SockRef::from(socket),
        opts.recv_buffer,
        opts.send_buffer,
    );
    Ok(())
}

/// Whether some socket already receives on UDP `addr` (another process's, `SO_REUSEPORT` or
/// not): a socket without `SO_REUSEPORT` cannot bind it then. Listener sockets share their
/// port through `SO_REUSEPORT` among a udplb's workers, which would let a second udplb (same
/// user) join the group silently and take part of the traffic. `IP_FREEBIND` as for a
/// listener, so an address not configured yet is not mistaken for a taken one.
pub fn udp_port_taken(addr: SocketAddr) -> io::Result<bool> {
    let probe = nonblocking_udp(addr)?;
    match addr {
        SocketAddr::V4(_) => probe.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            probe.set_only_v6(true)?;
            probe.set_freebind_v6(true)?;
        }
    }
    match probe.bind(&SockAddr::from(addr)) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(e),
    }
}

/// A non-blocking TCP listening socket on `addr` (backlog 1024), bound as a UDP listener is:
/// IPv6 only on an IPv6 address, `IP_FREEBIND` (the address may not be configured yet), and
/// `SO_REUSEADDR` so that a restart binds while old connections linger in `TIME_WAIT`.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A non-blocking UDP socket towards `backend`: bound to `local` (default: any address of the
/// backend's family, ephemeral port) and, with `connect`, connected to it so that only the
/// backend's datagrams arrive and ICMP errors are reported (`ECONNREFUSED`).
pub fn upstream_socket(
    backend: SocketAddr,
    connect: bool,
    local: Option<SocketAddr>,
    buffers: Option<usize>,
) -> io::Result<UdpSocket> {
    let socket = nonblocking_udp(backend)?;
    set_buffers(&socket, buffers, buffers);
    // `connect` picks an ephemeral port itself: an explicit bind only when it matters.
    if let Some(local) = local.or((!connect).then(|| unspecified_like(backend))) {
        socket.bind(&SockAddr::from(local))?;
    }
    if connect {
        socket.connect(&SockAddr::from(backend))?;
    }
    Ok(socket.into())
}

/// Like [`upstream_socket`], but sending from the client's own address (transparent
/// proxying): `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (needs `CAP_NET_ADMIN`), bound to `client`
/// (not a local address) and, with `connect`, connected to `backend`. The backend's replies
/// reach this socket only if the routing delivers them locally (docs/transparent.md).
pub fn transparent_upstream_socket(
    backend: SocketAddr,
    client: SocketAddr,
    connect: bool,
) -> io::Result<UdpSocket> {
    if backend.is_ipv4() != client.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("client {client} and backend {backend} are of different families"),
        ));
    }
    let socket = nonblocking_udp(backend)?;
    if backend.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    // Several flows may reuse a client's address towards different backends.
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(client))?;
    if connect {
        socket.connect(&SockAddr::from(backend))?;
    }
    Ok(socket.into())
}

/// A non-blocking, close-on-exec UDP socket of `addr`'s family, made so by `socket(2)` itself
/// (one syscall: a new flow opens one of these).
fn nonblocking_udp(addr: SocketAddr) -> io::Result<Socket> {
    let ty = Type::DGRAM.nonblocking().cloexec();
    Socket::new_raw(Domain::for_address(addr), ty, Some(Protocol::UDP))
}

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    let ip = match addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Asks the kernel to report errors of datagrams sent on an unconnected socket (`IP_RECVERR`
/// / `IPV6_RECVERR`): an ICMP port unreachable for any destination then fails the socket's next
/// receive or send once (`ECONNREFUSED`) and queues the details, destination included, for
/// [`crate::batch::read_errors`]. Without it an unconnected socket never hears of them.
pub fn report_errors(socket: &UdpSocket) -> io::Result<()> {
    if socket.local_addr()?.is_ipv4() {
        setsockopt(socket, sockopt::Ipv4RecvErr, &true)?;
    } else {
        setsockopt(socket, sockopt::Ipv6RecvErr, &true)?;
    }
    Ok(())
}

/// The receive and send buffer sizes a socket has, in the unit `SO_RCVBUF`/`SO_SNDBUF` are set
/// in: Linux doubles the value it is given (the other half pays for its bookkeeping) and
/// reports the doubled one, so this halves it back.
pub fn buffer_sizes(socket: &UdpSocket) -> io::Result<(usize, usize)> {
    let s = socket2::SockRef::from(socket);
    Ok((s.recv_buffer_size()? / 2, s.send_buffer_size()? / 2))
}

/// Sets buffer sizes, forcing past the system maximum when privileged. Best effort: a buffer
/// the kernel will not grow is not a reason to refuse to run.
fn set_buffers(socket: &Socket, recv: Option<usize>, send: Option<usize>) {
    if let Some(size) = recv {
        let forced = setsockopt(socket, sockopt::RcvBufForce, &size).is_ok();
        if !forced {
            let _ = socket.set_recv_buffer_size(size);
        }
    }
    if let Some(size) = send {
        let forced = setsockopt(socket, sockopt::SndBufForce, &size).is_ok();
        if !forced {
            let _ = socket.set_send_buffer_size(size);
        }
    }
}

/// Raises the soft open-file limit to the hard limit (each flow holds one descriptor).
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// How full a socket's receive queue is: `(bytes queued, receive buffer size)`, from
/// `SO_MEMINFO` (both in the kernel's accounting, which counts each datagram's whole buffer).
pub fn receive_queue(socket: &UdpSocket) -> io::Result<(u32, u32)> {
    let info = meminfo(socket)?;
    Ok((
        info[libc::SK_MEMINFO_RMEM_ALLOC as usize],
        info[libc::SK_MEMINFO_RCVBUF as usize],
    ))
}

/// Datagrams the kernel dropped on this socket since it was opened (its receive buffer was
/// full, or the datagram was malformed): the socket's own running total, the `drops` column
/// of `/proc/net/udp`. One system call, whatever arrived meanwhile.
pub fn receive_drops(socket: &UdpSocket) -> io::Result<u32> {
    Ok(meminfo(socket)?[libc::SK_MEMINFO_DROPS as usize])
}

/// The socket's memory counters (`SO_MEMINFO`), indexed by `SK_MEMINFO_*`.
fn meminfo(socket: &UdpSocket) -> io::Result<[u32; 16]> {
    let mut info = [0u32; 16];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is a live, writable buffer of `len` bytes; the kernel writes at most `len`
    // bytes and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Empties the receive queue of a non-blocking UDP socket, reading at most `limit` datagrams
/// or errors (a pending ICMP error is consumed too). Returns how many datagrams it discarded,
/// or `None` when `limit` reads did not empty it.
pub fn discard_queued(socket: &UdpSocket, limit: usize) -> io::Result<Option<usize>> {
    let mut byte = [0u8; 1];
    let mut discarded = 0;
    for _ in 0..limit {
        // One byte is enough: the rest of a UDP datagram is dropped with it.
        match socket.recv(&mut byte) {
            Ok(_) => discarded += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(discarded)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The soft `RLIMIT_NOFILE`: the highest descriptor number the process can open, plus one.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn an_adopted_listener_takes_the_gro_setting_asked_for_now() {
        let on = ListenerOptions {
            gro: true,
            ..Default::default()
        };
        let socket = bind_listener("127.0.0.1:0".parse().unwrap(), &on).unwrap();
        let gro = |s: &UdpSocket| nix::sys::socket::getsockopt(s, sockopt::UdpGroSegment).unwrap();
        assert!(gro(&socket));
        adopt_listener(&socket, &ListenerOptions::default()).unwrap();
        assert!(!gro(&socket));
        adopt_listener(&socket, &on).unwrap();
        assert!(gro(&socket));
    }
    use crate::batch::{RecvBatch, SendBatch, recv_from, send};

    fn recv_some(batch: &mut RecvBatch, socket: &UdpSocket) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match batch.recv(socket.as_fd()) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
    }

    /// A listener bound to one address already knows it: no packet info is asked for.
    #[test]
    fn a_listener_bound_to_one_address_gets_no_packet_info() {
        for (bind, client_bind) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let Ok(listener) = bind_listener(bind.parse().unwrap(), &ListenerOptions::default())
            else {
                continue; // no IPv6 loopback here
            };
            let client = UdpSocket::bind(client_bind).unwrap();
            client
                .send_to(b"ping", listener.local_addr().unwrap())
                .unwrap();
            let mut batch = RecvBatch::new(8, 16);
            assert_eq!(recv_some(&mut batch, &listener), 1);
            let d = batch.get(0);
            assert_eq!(
                (d.data, d.source),
                (&b"ping"[..], client.local_addr().unwrap())
            );
            assert_eq!(d.local, None, "{bind}");
        }
    }

    /// A wildcard listener learns the address each datagram was sent to and replies from it.
    #[test]
    fn wildcard_listener_replies_from_the_address_the_client_sent_to() {
        let listener =
            bind_listener("0.0.0.0:0".parse().unwrap(), &ListenerOptions::default()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let target: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
        client.send_to(b"ping", target).unwrap();

        let mut batch = RecvBatch::new(8, 16);
        assert_eq!(recv_some(&mut batch, &listener), 1);
        let d = batch.get(0);
        assert_eq!(d.data, b"ping");
        assert!(!d.truncated);
        assert_eq!(d.source, client.local_addr().unwrap());
        assert_eq!(d.local, Some("127.0.0.3".parse().unwrap()));

        let mut replies = SendBatch::new(8, 16);
        assert!(replies.push(b"pong", d.source, d.local));
        let outcome = replies.flush(listener.as_fd());
        assert_eq!(
            (outcome.sent, outcome.failed, outcome.blocked),
            (1, 0, false)
        );
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"pong"[..], target));
    }

    /// A batch reused across calls of different sizes and address families reports every
    /// datagram's own sender and length: the headers a call used are reset before the next
    /// one (an IPv6 sender after IPv4 ones needs the full name length back).
    #[test]
    fn a_reused_batch_reads_each_call_afresh() {
        let dual = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        dual.set_only_v6(false).unwrap();
        dual.set_nonblocking(true).unwrap();
        dual.bind(&"[::]:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let listener: UdpSocket = dual.into();
        let port = listener.local_addr().unwrap().port();
        let mut batch = RecvBatch::new(8, 64);
        let rounds = [("127.0.0.1", 3), ("::1", 5), ("127.0.0.1", 1), ("::1", 8)];
        for (round, (ip, count)) in rounds.into_iter().enumerate() {
            let client = UdpSocket::bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
            for i in 0..count {
                client
                    .send_to(
                        &vec![round as u8; i + 1],
                        (client.local_addr().unwrap().ip(), port),
                    )
                    .unwrap();
            }
            let want = client.local_addr().unwrap();
            let mut seen = 0;
            while seen < count {
                let n = recv_some(&mut batch, &listener);
                for j in 0..n {
                    let d = batch.get(j);
                    let source = match d.source {
                        SocketAddr::V6(v6) => v6
                            .ip()
                            .to_ipv4_mapped()
                            .map_or(d.source, |v4| SocketAddr::from((v4, v6.port()))),
                        v4 => v4,
                    };
                    assert_eq!(source, want, "round {round}");
                    assert_eq!(d.data, vec![round as u8; seen + j + 1], "round {round}");
                }
                seen += n;
            }
            assert_eq!(seen, count);
        }
    }

    /// A GSO train (`send_segments`) reaches a `gro` listener as one buffer with its segment
    /// size, and `datagrams()` gives back the datagrams as sent.
    #[test]
    fn gso_train_arrives_as_one_gro_buffer_and_splits_back() {
        let opts = ListenerOptions {
            gro: true,
            ..ListenerOptions::default()
        };
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(listener.local_addr().unwrap()).unwrap();
        // Three datagrams of 10 bytes and a last one of 4.
        let train: Vec<u8> = (0..34u8).collect();
        assert_eq!(
            crate::batch::send_segments(sender.as_fd(), &train, 10).unwrap(),
            34
        );

        let mut batch = RecvBatch::new(8, 65_536);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut trains = 0;
        while got.len() < 4 {
            let n = recv_some(&mut batch, &listener);
            for i in 0..n {
                let d = batch.get(i);
                trains += usize::from(d.segment_size.is_some());
                assert_eq!(d.datagram_count(), d.datagrams().count());
                got.extend(d.datagrams().map(<[u8]>::to_vec));
            }
        }
        assert_eq!(
            trains, 1,
            "loopback delivers a GSO train whole to a GRO socket"
        );
        let want: Vec<Vec<u8>> = train.chunks(10).map(<[u8]>::to_vec).collect();
        assert_eq!(got, want);
    }

    /// The receive queue's fill follows what is queued.
    #[test]
    fn buffer_sizes_read_back_what_was_asked_for() {
        // Below the kernel's default maximum, so no privilege is needed.
        let opts = ListenerOptions {
            recv_buffer: Some(65_536),
            send_buffer: Some(49_152),
            ..ListenerOptions::default()
        };
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        assert_eq!(buffer_sizes(&listener).unwrap(), (65_536, 49_152));
    }

    #[test]
    fn receive_queue_reports_queued_bytes() {
        let listener =
            bind_listener("127.0.0.1:0".parse().unwrap(), &ListenerOptions::default()).unwrap();
        let (empty, buffer) = receive_queue(&listener).unwrap();
        assert_eq!(empty, 0);
        assert!(buffer > 0);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..10 {
            client
                .send_to(&[0u8; 100], listener.local_addr().unwrap())
                .unwrap();
        }
        let (queued, _) = receive_queue(&listener).unwrap();
        assert!(queued >= 10 * 100, "{queued}");
    }

    /// Two slices leave as one datagram, on a connected socket and to an explicit address.
    #[test]
    fn send_two_joins_head_and_body_into_one_datagram() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = peer.local_addr().unwrap();
        let connected = upstream_socket(to, true, None, None).unwrap();
        let unconnected = upstream_socket(to, false, None, None).unwrap();
        let mut buf = [0u8; 64];
        crate::batch::send_two(connected.as_fd(), b"head:", b"body", None).unwrap();
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"head:body");
        crate::batch::send_two(unconnected.as_fd(), b"", b"only", Some(to)).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"only");
        assert_eq!(from.port(), unconnected.local_addr().unwrap().port());
    }

    #[test]
    fn ipv6_wildcard_listener_reports_the_local_address() {
        let Ok(listener) = bind_listener("[::]:0".parse().unwrap(), &ListenerOptions::default())
        else {
            eprintln!("skipped: no IPv6 on this host");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let client = UdpSocket::bind("[::1]:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let target: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        client.send_to(b"ping6", target).unwrap();
        let mut batch = RecvBatch::new(4, 16);
        assert_eq!(recv_some(&mut batch, &listener), 1);
        let d = batch.get(0);
        assert_eq!(d.local, Some("::1".parse().unwrap()));
        let mut replies = SendBatch::new(4, 16);
        assert!(replies.push(b"pong6", d.source, d.local));
        assert_eq!(replies.flush(listener.as_fd()).sent, 1);
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"pong6"[..], target));
    }

    /// Datagrams larger than the buffer are flagged, never silently cut.
    #[test]
    fn oversize_datagrams_are_flagged_truncated() {
        let listener =
            bind_listener("127.0.0.1:0".parse().unwrap(), &ListenerOptions::default()).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        client.send_to(&[7u8; 9], to).unwrap();
        client.send_to(&[7u8; 8], to).unwrap();
        let mut batch = RecvBatch::new(4, 8);
        let mut got = Vec::new();
        while got.len() < 2 {
            let n = recv_some(&mut batch, &listener);
            got.extend((0..n).map(|i| (batch.get(i).data.len(), batch.get(i).truncated)));
        }
        assert_eq!(got, vec![(8, true), (8, false)]);
    }

    /// A connected upstream socket reports the real length of a reply and ECONNREFUSED when
    /// nothing listens.
    #[test]
    fn upstream_socket_reports_real_length_and_refusal() {
        let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
        let up = upstream_socket(backend.local_addr().unwrap(), true, None, None).unwrap();
        send(up.as_fd(), b"hello").unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = backend.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        backend.send_to(&[1u8; 12], from).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut small = [0u8; 4];
        let (len, source) = loop {
            match recv_from(up.as_fd(), &mut small) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!((len, source), (12, backend.local_addr().unwrap()));

        let gone = backend.local_addr().unwrap();
        drop(backend);
        let up = upstream_socket(gone, true, None, None).unwrap();
        send(up.as_fd(), b"anyone?").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match recv_from(up.as_fd(), &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                other => panic!("expected ECONNREFUSED, got {other:?}"),
            }
        }
    }

    /// An unconnected socket hears of a refusal only with `report_errors`: the next call fails
    /// once, and the error queue names the refused destination, so a refusal is attributed to
    /// the right backend; once the queue is read, sends to other destinations go out again.
    #[test]
    fn unconnected_socket_reports_which_destination_refused() {
        for ip in ["127.0.0.1", "::1"] {
            let Ok(open) = UdpSocket::bind((ip, 0)) else {
                continue; // no IPv6 loopback here
            };
            open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let closed = UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap();
            let up = upstream_socket(closed, false, None, None).unwrap();
            report_errors(&up).unwrap();
            crate::batch::send_to(up.as_fd(), b"anyone?", closed).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 16];
            loop {
                match recv_from(up.as_fd(), &mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    other => panic!("{ip}: expected ECONNREFUSED, got {other:?}"),
                }
            }
            let mut seen = Vec::new();
            let n = crate::batch::read_errors(up.as_fd(), 8, |e| seen.push(e)).unwrap();
            assert_eq!(n, 1, "{ip}");
            assert_eq!(
                seen,
                [crate::batch::QueuedError {
                    destination: closed,
                    errno: libc::ECONNREFUSED,
                    from_icmp: true,
                }]
            );
            // The queue is empty now, and a datagram to a live destination goes out.
            assert_eq!(crate::batch::read_errors(up.as_fd(), 8, |_| {}).unwrap(), 0);
            crate::batch::send_to(up.as_fd(), b"hello", open.local_addr().unwrap()).unwrap();
            let (n, _) = open.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"hello");
        }
    }

    #[test]
    fn batch_flush_sends_in_order_and_reports_refusals() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let sender =
            bind_listener("127.0.0.1:0".parse().unwrap(), &ListenerOptions::default()).unwrap();
        let mut batch = SendBatch::new(4, 8);
        for i in 0..4u8 {
            assert!(batch.push(&[i; 3], sink.local_addr().unwrap(), None));
        }
        assert!(batch.is_full() && batch.next_slot().is_none());
        assert!(!batch.push(b"x", sink.local_addr().unwrap(), None));
        assert_eq!(batch.flush(sender.as_fd()).sent, 4);
        assert!(batch.is_empty());
        let mut buf = [0u8; 8];
        for i in 0..4u8 {
            let n = sink.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 3]);
        }
        // A v6 destination on a v4 socket is refused by the kernel: counted, not fatal.
        assert!(batch.push(b"bad", "[::1]:9".parse().unwrap(), None));
        assert!(batch.push(b"ok", sink.local_addr().unwrap(), None));
        let outcome = batch.flush(sender.as_fd());
        assert_eq!((outcome.sent, outcome.failed), (1, 1));
        assert!(outcome.last_error.is_some());
    }

    #[test]
    fn nofile_limit_is_at_least_the_old_soft_limit() {
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(raise_nofile_limit().unwrap() >= soft);
    }
}
