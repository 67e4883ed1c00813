//! Whole Ethernet frames out of one interface, for load generators that must make each
//! datagram differ (a new client per datagram) faster than the UDP stack can send them.
//!
//! Owns: an `AF_PACKET` socket bound to one interface with `PACKET_QDISC_BYPASS` (frames go
//! straight to the driver), and `sendmmsg` over borrowed frames. Must not: build or check
//! frames (the caller's), or receive: the socket's protocol is 0, so the kernel hands it no
//! incoming frame.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::raw;

/// Frames per `sendmmsg` at most; [`FrameSender::send`] sends the rest in further calls.
pub const MAX_BATCH: usize = 64;

/// An `AF_PACKET` socket that sends frames out of one interface.
pub struct FrameSender {
    fd: OwnedFd,
}

impl FrameSender {
    /// Binds to `interface` (needs `CAP_NET_RAW`).
    pub fn bind(interface: &str) -> io::Result<FrameSender> {
        let name = CString::new(interface)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has NUL"))?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw_fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw_fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw_fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the length given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        let on: libc::c_int = 1;
        // SAFETY: `on` is a valid c_int of the length given.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&on as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FrameSender { fd })
    }

    /// Sends `frames` (each a whole Ethernet frame) with as few `sendmmsg` calls as it takes;
    /// returns how many the kernel took before the first error, or that error if it took none.
    pub fn send(&self, frames: &[&[u8]]) -> io::Result<usize> {
        let mut sent = 0;
        for chunk in frames.chunks(MAX_BATCH) {
            // SAFETY: iovec and mmsghdr are plain old data; all-zero (null pointers, zero
            // lengths) is valid.
            let mut iovecs: [libc::iovec; MAX_BATCH] = unsafe { mem::zeroed() };
            // SAFETY: as above.
            let mut headers: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
            for (i, frame) in chunk.iter().enumerate() {
                iovecs[i].iov_base = frame.as_ptr() as *mut libc::c_void;
                iovecs[i].iov_len = frame.len();
                headers[i].msg_hdr.msg_iov = &mut iovecs[i];
                headers[i].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: the first `chunk.len()` headers point at one iovec each, which points at
            // a frame borrowed for this call; sendmmsg only reads them.
            let n = unsafe {
                raw::sendmmsg(
                    self.fd.as_raw_fd(),
                    headers.as_mut_ptr(),
                    chunk.len() as u32,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return if sent == 0 { Err(err) } else { Ok(sent) };
            }
            sent += n as usize;
            if (n as usize) < chunk.len() {
                break;
            }
        }
        Ok(sent)
    }
}
