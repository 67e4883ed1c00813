//! Batched datagram I/O: `recvmmsg` into a [`RecvBatch`], `sendmmsg` out of a [`SendBatch`],
//! plus single-datagram helpers for upstream sockets.
//!
//! Owns: the message headers, buffers and control-message space of each batch, allocated once
//! when the batch is made; receiving and sending never allocate.
//!
//! Must not: interpret datagrams or decide anything about them.
//!
//! Local addresses: a listener bound to a wildcard address learns the address each datagram was
//! sent to from `IP_PKTINFO`/`IPV6_PKTINFO` ([`RecvMeta::local`]); a reply committed with that
//! address as `source` carries the same control message back, so the kernel sends it from
//! exactly that address.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use crate::{raw, sockaddr};

/// Control-message space per datagram: room for a v6 packet-info and a
/// GRO segment size, with headroom. Aligned like `cmsghdr`.
const CONTROL_LEN: usize = 128;

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// One received datagram, borrowed from a [`RecvBatch`].
#[derive(Clone, Copy, Debug)]
pub struct RecvMeta<'a> {
    /// The payload (at most the batch's buffer size).
    pub data: &'a [u8],
    /// The datagram was larger than the buffer; `data` holds only its start.
    pub truncated: bool,
    /// The sender.
    pub source: SocketAddr,
    /// The address the datagram was sent to, when the socket reports packet info.
    pub local: Option<IpAddr>,
    /// On a socket with `UDP_GRO`: `data` is a train of datagrams of this size (the last one
    /// may be shorter) that the kernel coalesced; `None` for a single datagram.
    pub segment_size: Option<u16>,
}

impl<'a> RecvMeta<'a> {
    /// The datagrams in `data`: one, or each segment of a GRO train.
    pub fn datagrams(&self) -> std::slice::Chunks<'a, u8> {
        let size = self.segment_size.map_or(self.data.len(), usize::from);
        self.data.chunks(size.max(1))
    }

    /// How many datagrams `data` holds.
    pub fn datagram_count(&self) -> usize {
        match self.segment_size {
            Some(size) => self.data.len().div_ceil(usize::from(size).max(1)),
            None => 1,
        }
    }
}

#[derive(Clone, Copy)]
struct Received {
    len: usize,
    truncated: bool,
    source: SocketAddr,
    local: Option<IpAddr>,
    segment_size: Option<u16>,
}

const UNKNOWN_SOURCE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// The kernel-facing arrays of a batch: `capacity` buffers of `buf_size` bytes, their socket
/// addresses and control-message space, and the `mmsghdr`s pointing at them. Allocated once;
/// the pointers stay valid because boxed slices never move their contents.
struct Messages {
    buf_size: usize,
    bufs: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    controls: Box<[Control]>,
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
}

// SAFETY: the raw pointers inside `iovecs` and `headers` point only into this value's own heap
// allocations (`bufs`, `names`, `controls`, `iovecs`), which move with it and are never shared.
unsafe impl Send for Messages {}

impl Messages {
    fn new(capacity: usize, buf_size: usize) -> Self {
        let capacity = capacity.max(1);
        let buf_size = buf_size.max(1);
        let null_iovec = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        let mut m = Messages {
            buf_size,
            bufs: vec![0u8; capacity * buf_size].into_boxed_slice(),
            names: vec![sockaddr::zeroed(); capacity].into_boxed_slice(),
            controls: vec![Control([0; CONTROL_LEN]); capacity].into_boxed_slice(),
            iovecs: vec![null_iovec; capacity].into_boxed_slice(),
            headers: (0..capacity).map(|_| empty_mmsghdr()).collect(),
        };
        for i in 0..capacity {
            m.iovecs[i] = libc::iovec {
                iov_base: m.bufs[i * buf_size..].as_mut_ptr().cast(),
                iov_len: buf_size,
            };
            let h = &mut m.headers[i].msg_hdr;
            h.msg_name = (&mut m.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut m.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = m.controls[i].0.as_mut_ptr().cast();
        }
        m
    }

    fn capacity(&self) -> usize {
        self.headers.len()
    }

    fn buf(&self, i: usize, len: usize) -> &[u8] {
        let start = i * self.buf_size;
        &self.bufs[start..start + len]
    }

    fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        let start = i * self.buf_size;
        &mut self.bufs[start..start + self.buf_size]
    }
}

/// Buffers and headers for receiving up to `capacity` datagrams with one `recvmmsg`.
pub struct RecvBatch {
    m: Messages,
    received: Box<[Received]>,
    count: usize,
    /// Headers the kernel may have written since they were last reset: those of the datagrams
    /// the last call received, and the one after (a call that stops on an error leaves the
    /// header it failed on as it was, but this does not rely on it).
    dirty: usize,
}

impl RecvBatch {
    /// A batch of `capacity` buffers of `buf_size` bytes each. A datagram longer than
    /// `buf_size` is reported as truncated, so size buffers one byte above the largest
    /// datagram you accept to tell "exactly the limit" from "too long".
    pub fn new(capacity: usize, buf_size: usize) -> Self {
        let m = Messages::new(capacity, buf_size);
        let nothing = Received {
            len: 0,
            truncated: false,
            source: UNKNOWN_SOURCE,
            local: None,
            segment_size: None,
        };
        RecvBatch {
            received: vec![nothing; m.capacity()].into_boxed_slice(),
            dirty: m.capacity(),
            m,
            count: 0,
        }
    }

    /// How many datagrams one call can receive.
    pub fn capacity(&self) -> usize {
        self.m.capacity()
    }

    /// Receives as many datagrams as are queued, up to the capacity, without blocking.
    /// Returns how many; `WouldBlock` when none was queued. `EINTR` is retried.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.count = 0;
        // Only the headers of the last call's datagrams changed: short batches (most replies
        // arrive a few at a time) reset a few headers, not the whole batch.
        for h in self.m.headers[..self.dirty].iter_mut() {
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_controllen = CONTROL_LEN as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        let n = loop {
            // SAFETY: `headers` holds `capacity` initialised mmsghdrs whose pointers (set by
            // `link`) reference live buffers of the lengths they declare; the kernel writes at
            // most those lengths. A null timeout is allowed.
            let n = unsafe {
                raw::recvmmsg(
                    fd.as_raw_fd(),
                    self.m.headers.as_mut_ptr(),
                    self.m.headers.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                self.dirty = 1;
                return Err(e);
            }
        };
        self.dirty = (n + 1).min(self.m.capacity());
        for i in 0..n {
            self.received[i] = self.parse(i);
        }
        self.count = n;
        Ok(n)
    }

    fn parse(&mut self, i: usize) -> Received {
        let h = &self.m.headers[i];
        let source =
            sockaddr::read(&self.m.names[i], h.msg_hdr.msg_namelen).unwrap_or(UNKNOWN_SOURCE);
        let mut local = None;
        let mut segment_size = None;
        for_each_cmsg(&h.msg_hdr, |level, kind, data| match (level, kind) {
            (libc::SOL_UDP, libc::UDP_GRO) => {
                segment_size = read_payload::<libc::c_int>(data)
                    .and_then(|size| u16::try_from(size).ok())
                    .filter(|&size| size > 0);
            }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                if let Some(info) = read_payload::<libc::in_pktinfo>(data) {
                    local = Some(IpAddr::V4(Ipv4Addr::from(
                        info.ipi_addr.s_addr.to_ne_bytes(),
                    )));
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                if let Some(info) = read_payload::<libc::in6_pktinfo>(data) {
                    local = Some(IpAddr::from(info.ipi6_addr.s6_addr));
                }
            }
            _ => {}
        });
        let len = (h.msg_len as usize).min(self.m.buf_size);
        Received {
            len,
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            source,
            local,
            // A "train" of one datagram is just a datagram.
            segment_size: segment_size.filter(|&size| len > usize::from(size)),
        }
    }

    /// How many datagrams the last [`recv`](Self::recv) returned.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last receive returned nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i` of the last receive. Panics if `i >= len()`.
    #[inline]
    pub fn get(&self, i: usize) -> RecvMeta<'_> {
        assert!(i < self.count, "datagram {i} of a batch of {}", self.count);
        let r = &self.received[i];
        RecvMeta {
            data: self.m.buf(i, r.len),
            truncated: r.truncated,
            source: r.source,
            local: r.local,
            segment_size: r.segment_size,
        }
    }
}

/// What one [`SendBatch::flush`] did.
#[derive(Debug, Default)]
pub struct FlushOutcome {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Datagrams the kernel refused (dropped from the batch).
    pub failed: usize,
    /// The socket's send buffer was full; the unsent datagrams are still queued.
    pub blocked: bool,
    /// The last error other than "would block", for logging.
    pub last_error: Option<io::Error>,
}

/// Outgoing datagrams, each with its destination and optional source address, sent with one
/// `sendmmsg` per flush.
pub struct SendBatch {
    m: Messages,
    /// First queued datagram not yet sent.
    first: usize,
    /// One past the last queued datagram.
    end: usize,
}

impl SendBatch {
    /// Room for `capacity` datagrams of up to `buf_size` bytes.
    pub fn new(capacity: usize, buf_size: usize) -> Self {
        SendBatch {
            m: Messages::new(capacity, buf_size),
            first: 0,
            end: 0,
        }
    }

    /// Datagrams queued and not yet sent.
    pub fn len(&self) -> usize {
        self.end - self.first
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.end == self.first
    }

    /// How many more datagrams can be queued before a flush.
    pub fn room(&self) -> usize {
        self.m.headers.len() - self.end
    }

    /// Whether no more datagram can be queued before a flush.
    pub fn is_full(&self) -> bool {
        self.end == self.m.headers.len()
    }

    /// Forgets every queued datagram.
    pub fn clear(&mut self) {
        self.first = 0;
        self.end = 0;
    }

    /// The buffer of the next datagram, to fill in place and then [`commit`](Self::commit).
    /// `None` when full.
    #[inline]
    pub fn next_slot(&mut self) -> Option<&mut [u8]> {
        if self.is_full() {
            return None;
        }
        Some(self.m.buf_mut(self.end))
    }

    /// Queues the first `len` bytes of the slot from [`next_slot`](Self::next_slot) for `dest`,
    /// sent from local address `source` when given (else the kernel chooses).
    /// Panics when full or when `len` exceeds the buffer size.
    #[inline]
    pub fn commit(&mut self, len: usize, dest: SocketAddr, source: Option<IpAddr>) {
        assert!(
            !self.is_full() && len <= self.m.buf_size,
            "commit beyond the batch"
        );
        let i = self.end;
        let namelen = sockaddr::write(&dest, &mut self.m.names[i]);
        self.m.iovecs[i].iov_len = len;
        let control_len = match source {
            Some(ip) => write_pktinfo(&mut self.m.controls[i], ip),
            None => 0,
        };
        let h = &mut self.m.headers[i].msg_hdr;
        h.msg_namelen = namelen;
        h.msg_control = if control_len == 0 {
            ptr::null_mut()
        } else {
            self.m.controls[i].0.as_mut_ptr().cast()
        };
        h.msg_controllen = control_len as _;
        h.msg_flags = 0;
        self.end += 1;
    }

    /// Copies `data` into the batch (see [`commit`](Self::commit)). Returns false, queuing
    /// nothing, when full or when `data` is larger than the buffer size.
    pub fn push(&mut self, data: &[u8], dest: SocketAddr, source: Option<IpAddr>) -> bool {
        match self.next_slot() {
            Some(slot) if data.len() <= slot.len() => {
                slot[..data.len()].copy_from_slice(data);
                self.commit(data.len(), dest, source);
                true
            }
            _ => false,
        }
    }

    /// Sends every queued datagram without blocking. Refused datagrams are counted and
    /// skipped; on a full send buffer the rest stay queued (`blocked`). Empties the batch
    /// unless blocked.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> FlushOutcome {
        let mut outcome = FlushOutcome::default();
        while self.first < self.end {
            // SAFETY: headers[first..end] were filled by `commit`: each points at a live
            // buffer, destination and (optional) control message of the declared lengths.
            let n = unsafe {
                raw::sendmmsg(
                    fd.as_raw_fd(),
                    self.m.headers[self.first..].as_mut_ptr(),
                    (self.end - self.first) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                outcome.sent += n as usize;
                self.first += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    outcome.blocked = true;
                    return outcome;
                }
                _ => {
                    outcome.failed += 1;
                    self.first += 1;
                    outcome.last_error = Some(e);
                }
            }
        }
        self.clear();
        outcome
    }
}

/// Writes an `IP_PKTINFO`/`IPV6_PKTINFO` control message asking the kernel to send from `ip`;
/// returns its length.
fn write_pktinfo(control: &mut Control, ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            write_cmsg(control, libc::IPPROTO_IP, libc::IP_PKTINFO, info)
        }
        IpAddr::V6(v6) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                ipi6_ifindex: 0,
            };
            write_cmsg(control, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)
        }
    }
}

/// Writes one control message with payload `value` at the start of `control`; returns the
/// space it takes (`CMSG_SPACE`).
fn write_cmsg<T: Copy>(
    control: &mut Control,
    level: libc::c_int,
    kind: libc::c_int,
    value: T,
) -> usize {
    let payload = mem::size_of::<T>() as libc::c_uint;
    // SAFETY: CMSG_SPACE is arithmetic on its argument only.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    assert!(
        space <= CONTROL_LEN,
        "control message larger than its space"
    );
    control.0[..space].fill(0);
    let mut h = empty_mmsghdr().msg_hdr;
    h.msg_control = control.0.as_mut_ptr().cast();
    h.msg_controllen = space as _;
    // SAFETY: `h` describes `control`, which is aligned for cmsghdr and at least `space`
    // bytes long, so CMSG_FIRSTHDR returns a non-null pointer to a whole cmsghdr followed by
    // room for `payload` bytes; the payload is written unaligned.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&h);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<T>(), value);
    }
    space
}

/// Calls `f(level, type, payload)` for each control message the kernel wrote into `h`.
fn for_each_cmsg(h: &libc::msghdr, mut f: impl FnMut(libc::c_int, libc::c_int, &[u8])) {
    if h.msg_control.is_null() || h.msg_controllen < mem::size_of::<libc::cmsghdr>() {
        return;
    }
    // SAFETY: `h` points at a control buffer of `msg_controllen` bytes that the kernel filled;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay within it and return null at its end. Each payload slice
    // is bounded by the message's own cmsg_len, itself checked against the buffer's end.
    unsafe {
        let end = (h.msg_control as *const u8).add(h.msg_controllen);
        let mut cmsg = libc::CMSG_FIRSTHDR(h);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            let header_len = data.offset_from(cmsg as *const u8) as usize;
            let total = (*cmsg).cmsg_len as usize;
            if total < header_len || (cmsg as *const u8).add(total) > end {
                break;
            }
            f(
                (*cmsg).cmsg_level,
                (*cmsg).cmsg_type,
                std::slice::from_raw_parts(data, total - header_len),
            );
            cmsg = libc::CMSG_NXTHDR(h, cmsg);
        }
    }
}

/// Reads a `T` from a control-message payload if it is long enough.
fn read_payload<T: Copy>(data: &[u8]) -> Option<T> {
    // SAFETY: the slice holds at least size_of::<T>() bytes and T is a plain C struct or
    // integer for which any bit pattern is valid; the read is unaligned-safe.
    (data.len() >= mem::size_of::<T>())
        .then(|| unsafe { ptr::read_unaligned(data.as_ptr().cast::<T>()) })
}

fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
    unsafe { mem::zeroed() }
}

/// One datagram, or a train of them, to send (quinn-udp's `Transmit`): the one description of
/// a send, whichever system call it takes.
#[derive(Clone, Copy, Debug)]
pub struct Transmit<'a> {
    /// Where to; `None`: the socket's connected peer.
    pub destination: Option<SocketAddr>,
    /// Bytes that go in front of `contents` in the same datagram (a PROXY header), or none;
    /// only with a single datagram (no `segment_size`).
    pub head: &'a [u8],
    /// The payload.
    pub contents: &'a [u8],
    /// `contents` is a train of datagrams of this size (the last may be shorter), sent with
    /// UDP GSO where the path takes it.
    pub segment_size: Option<u16>,
}

/// Sends `t` without blocking: `send` on a connected socket, `sendto` to a destination, one
/// `sendmsg` joining a head and a payload, or a GSO train (`UDP_SEGMENT`), datagram by datagram
/// when the path refuses segmentation offload (`EINVAL`, `EIO`, `EMSGSIZE`: a segment larger
/// than the route's MTU allows, a device without it) or the socket is not connected. Returns
/// the bytes sent. `EINTR` is retried.
#[inline]
pub fn transmit(fd: BorrowedFd<'_>, t: &Transmit<'_>) -> io::Result<usize> {
    debug_assert!(
        t.head.is_empty() || t.segment_size.is_none(),
        "a head goes in front of one datagram, not a train"
    );
    match (t.head.is_empty(), t.segment_size, t.destination) {
        (true, None, None) => send(fd, t.contents),
        (true, None, Some(dest)) => send_to(fd, t.contents, dest),
        (false, _, dest) => send_two(fd, t.head, t.contents, dest),
        (true, Some(size), None) => match send_segments(fd, t.contents, size) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EIO | libc::EMSGSIZE)
                ) =>
            {
                send_each(fd, t.contents, size, None)
            }
            other => other,
        },
        (true, Some(size), Some(dest)) => send_each(fd, t.contents, size, Some(dest)),
    }
}

/// A train sent datagram by datagram.
fn send_each(
    fd: BorrowedFd<'_>,
    data: &[u8],
    size: u16,
    dest: Option<SocketAddr>,
) -> io::Result<usize> {
    let mut sent = 0;
    for datagram in data.chunks(usize::from(size.max(1))) {
        sent += match dest {
            Some(dest) => send_to(fd, datagram, dest)?,
            None => send(fd, datagram)?,
        };
    }
    Ok(sent)
}

/// Sends `data` on a connected socket without blocking. `EINTR` is retried.
pub fn send(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `data` is a live slice of `data.len()` bytes.
        unsafe {
            raw::sendto(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT,
                ptr::null(),
                0,
            )
        }
    })
}

/// Sends `data` to `dest` without blocking. `EINTR` is retried.
pub fn send_to(fd: BorrowedFd<'_>, data: &[u8], dest: SocketAddr) -> io::Result<usize> {
    let mut storage = sockaddr::zeroed();
    let len = sockaddr::write(&dest, &mut storage);
    retry(|| {
        // SAFETY: `data` is a live slice; `storage` holds a valid address of `len` bytes.
        unsafe {
            raw::sendto(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT,
                (&storage as *const libc::sockaddr_storage).cast(),
                len,
            )
        }
    })
}

/// Sends `head` followed by `body` as **one** datagram (a PROXY protocol header in front of a
/// client's payload, without copying either), to `dest` or, with `None`, to the connected
/// peer. `EINTR` is retried.
pub fn send_two(
    fd: BorrowedFd<'_>,
    head: &[u8],
    body: &[u8],
    dest: Option<SocketAddr>,
) -> io::Result<usize> {
    let mut storage = sockaddr::zeroed();
    let name_len = dest.map_or(0, |d| sockaddr::write(&d, &mut storage));
    let mut iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut libc::c_void,
            iov_len: body.len(),
        },
    ];
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control data).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    if name_len > 0 {
        msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = name_len;
    }
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    retry(|| {
        // SAFETY: `msg` points at `iov` (two live, read-only slices the kernel only reads) and,
        // when set, at `storage` holding a valid address of `name_len` bytes; all outlive the
        // call.
        unsafe { raw::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) }
    })
}

/// Sends `data` on a connected socket as a train of datagrams of `segment_size` bytes (the
/// last may be shorter) with one call: UDP GSO (`UDP_SEGMENT`), the kernel splits it. `EINTR`
/// is retried.
pub fn send_segments(fd: BorrowedFd<'_>, data: &[u8], segment_size: u16) -> io::Result<usize> {
    const SPACE: usize = 32;
    #[repr(C, align(8))]
    struct Space([u8; SPACE]);
    let mut control = Space([0; SPACE]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control data).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as _;
    debug_assert!(msg.msg_controllen as usize <= SPACE);
    // SAFETY: `msg` points at `control`, aligned and large enough for one cmsg carrying a u16
    // (checked above), so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside `control`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment_size);
    }
    retry(|| {
        // SAFETY: `msg` points at `iov` (one live, read-only slice) and at `control`, both
        // outliving the call.
        unsafe { raw::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) }
    })
}

/// An error the kernel queued on a socket with [`crate::socket::report_errors`] set: what went
/// wrong with a datagram sent earlier, and where that datagram was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuedError {
    /// The datagram's destination.
    pub destination: SocketAddr,
    /// The error, as an `errno` value (`ECONNREFUSED` for ICMP port unreachable,
    /// `EHOSTUNREACH`, `ENETUNREACH`, `EMSGSIZE`, ...).
    pub errno: i32,
    /// Whether an ICMP message from the network reported it (rather than the local stack).
    pub from_icmp: bool,
}

/// Reads up to `limit` errors from a socket's error queue (`MSG_ERRQUEUE`) without blocking
/// and hands each to `on_error`. Returns how many were read (fewer than `limit`: the queue is
/// empty). Only called when the kernel said a send failed, never per datagram.
pub fn read_errors(
    fd: BorrowedFd<'_>,
    limit: usize,
    mut on_error: impl FnMut(QueuedError),
) -> io::Result<usize> {
    const SPACE: usize = 256;
    #[repr(C, align(8))]
    struct Space([u8; SPACE]);
    let mut read = 0;
    while read < limit {
        let mut control = Space([0; SPACE]);
        let mut storage = sockaddr::zeroed();
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: byte.len(),
        };
        // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control data).
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = SPACE as _;
        let got = retry(|| {
            // SAFETY: `msg` points at `storage`, `iov` (one writable byte) and `control`, all
            // live and writable for the lengths given, outliving the call.
            unsafe {
                libc::recvmsg(
                    fd.as_raw_fd(),
                    &mut msg,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            }
        });
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(read),
            Err(e) => return Err(e),
        }
        read += 1;
        let Some(destination) = sockaddr::read(&storage, msg.msg_namelen) else {
            continue;
        };
        if let Some(err) = extended_error(&msg) {
            on_error(QueuedError {
                destination,
                errno: err.ee_errno as i32,
                from_icmp: matches!(
                    err.ee_origin,
                    libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6
                ),
            });
        }
    }
    Ok(read)
}

/// The `sock_extended_err` of an error-queue message.
fn extended_error(msg: &libc::msghdr) -> Option<libc::sock_extended_err> {
    // SAFETY: `msg` was filled by recvmsg: its control pointer and length describe the control
    // messages the kernel wrote, which CMSG_FIRSTHDR/CMSG_NXTHDR walk within bounds; a
    // matching message carries a sock_extended_err at CMSG_DATA, read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let recverr = (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_RECVERR)
                || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
            let len = libc::CMSG_LEN(mem::size_of::<libc::sock_extended_err>() as u32) as usize;
            if recverr && c.cmsg_len as usize >= len {
                return Some(ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>(),
                ));
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

/// Receives one datagram into `buf` without blocking. Returns the datagram's **real** length
/// (`MSG_TRUNC`), which exceeds `buf.len()` when it did not fit, and its sender.
pub fn recv_from(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    let mut storage = sockaddr::zeroed();
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let n = retry(|| {
        len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes; `storage`/`len`
        // describe a writable sockaddr_storage.
        unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut storage as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        }
    })?;
    Ok((n, sockaddr::read(&storage, len).unwrap_or(UNKNOWN_SOURCE)))
}

fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
