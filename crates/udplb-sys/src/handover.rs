//! A channel between two udplb processes that carries messages and open descriptors
//! (`SCM_RIGHTS` over a `SOCK_SEQPACKET` socket pair): how a process being upgraded hands its
//! sockets to its successor.
//!
//! Owns: [`Channel`] and its framing: a message of any size is sent as packets of at most
//! [`PIECE`] bytes, each starting with a byte that says whether more follow, with at most
//! [`FDS_PER_PIECE`] descriptors attached to each. Must not: know what the messages mean.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, setsockopt, socketpair, sockopt,
};
use nix::sys::time::TimeVal;

/// Bytes of a message per packet.
pub const PIECE: usize = 32 * 1024;
/// Descriptors per packet (the kernel takes at most 253).
pub const FDS_PER_PIECE: usize = 200;
/// Messages larger than this are refused (a confused or hostile peer cannot make the
/// receiver allocate without bound).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// Descriptors per message at most.
pub const MAX_FDS: usize = 65_536;

const MORE: u8 = 1;
const LAST: u8 = 0;

/// One end of a channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// Both ends of a new channel (closed on exec: see [`Channel::inheritable`]).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Lets a program this process executes next inherit this end, as descriptor
    /// [`Channel::raw`].
    pub fn inheritable(&self) -> io::Result<()> {
        fcntl(&self.fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
        Ok(())
    }

    /// The descriptor number of this end.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The end a parent process left open for this one as descriptor `fd`: refused unless it
    /// is a `SOCK_SEQPACKET` Unix socket. Closed on exec from now on.
    pub fn inherited(fd: RawFd) -> io::Result<Channel> {
        let not_ours = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {fd}: {why}"),
            )
        };
        if fd < 3 {
            return Err(not_ours("not a handover channel"));
        }
        // SAFETY: `fcntl(F_GETFD)` only reads the descriptor's flags; any number is safe to
        // ask about (EBADF if it is not open).
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(not_ours("not open"));
        }
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `ty` and `len` are valid for writes of the sizes given; the kernel writes at
        // most `len` bytes.
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&raw mut ty).cast(),
                &raw mut len,
            )
        };
        let mut domain: libc::c_int = 0;
        let mut dlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as above.
        let got_domain = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&raw mut domain).cast(),
                &raw mut dlen,
            )
        };
        if got != 0 || got_domain != 0 || ty != libc::SOCK_SEQPACKET || domain != libc::AF_UNIX {
            return Err(not_ours("not a handover channel"));
        }
        // SAFETY: the descriptor is open, is a Unix SOCK_SEQPACKET socket, and was left to
        // this process by its parent for this use only: nothing else in the process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        Ok(Channel { fd })
    }

    /// Waits at most `timeout` for each packet of a message (`None`: without limit).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = timeout.map_or(TimeVal::new(0, 0), |t| {
            TimeVal::new(t.as_secs() as _, t.subsec_micros().max(1) as _)
        });
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        setsockopt(&self.fd, sockopt::SendTimeout, &tv)?;
        Ok(())
    }

    /// Sends `message` with `fds` (duplicated into the peer when it receives them).
    pub fn send(&self, message: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let pieces = message
            .len()
            .div_ceil(PIECE)
            .max(raw.len().div_ceil(FDS_PER_PIECE))
            .max(1);
        let mut bytes = message.chunks(PIECE);
        let mut fds = raw.chunks(FDS_PER_PIECE);
        for i in 0..pieces {
            let flag = [if i + 1 < pieces { MORE } else { LAST }];
            let body = bytes.next().unwrap_or(&[]);
            let iov = [IoSlice::new(&flag), IoSlice::new(body)];
            let attached = fds.next().unwrap_or(&[]);
            let rights = [ControlMessage::ScmRights(attached)];
            let cmsgs: &[ControlMessage] = if attached.is_empty() { &[] } else { &rights };
            let sent = sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )?;
            if sent != 1 + body.len() {
                return Err(io::Error::other("short send on a packet socket"));
            }
        }
        Ok(())
    }

    /// Receives a message and the descriptors sent with it. The peer closing the channel is
    /// `UnexpectedEof`; a timeout is `WouldBlock`/`TimedOut`.
    pub fn recv(&self) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut message = Vec::new();
        let mut fds = Vec::new();
        let mut piece = vec![0u8; PIECE + 1];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_PIECE]);
        loop {
            let mut iov = [IoSliceMut::new(&mut piece)];
            let msg = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let n = msg.bytes;
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            for cmsg in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    for fd in received {
                        // SAFETY: the kernel installed this descriptor in this process for
                        // this message just now; nothing else knows its number.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if truncated {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a packet larger than the framing allows",
                ));
            }
            message.extend_from_slice(&piece[1..n]);
            if message.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a message larger than the framing allows",
                ));
            }
            if piece[0] != MORE {
                return Ok((message, fds));
            }
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_messages_and_many_descriptors_arrive_whole_and_in_order() {
        let (a, b) = Channel::pair().unwrap();
        let message: Vec<u8> = (0..3 * PIECE + 17).map(|i| (i % 251) as u8).collect();
        let sockets: Vec<std::net::UdpSocket> = (0..FDS_PER_PIECE + 5)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
        let (got, got_fds) = std::thread::scope(|s| {
            s.spawn(|| a.send(&message, &fds).unwrap());
            b.recv().unwrap()
        });
        assert_eq!(got, message);
        assert_eq!(got_fds.len(), sockets.len());
        for (s, fd) in sockets.iter().zip(got_fds) {
            let received = std::net::UdpSocket::from(fd);
            assert_eq!(received.local_addr().unwrap(), s.local_addr().unwrap());
        }
    }

    #[test]
    fn a_closed_peer_is_end_of_file_and_a_silent_one_times_out() {
        let (a, b) = Channel::pair().unwrap();
        b.set_timeout(Some(Duration::from_millis(50))).unwrap();
        let err = b.recv().unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        drop(a);
        assert_eq!(b.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn only_a_packet_socket_is_taken_as_an_inherited_channel() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(Channel::inherited(udp.as_raw_fd()).is_err());
        assert!(Channel::inherited(1_000_000).is_err());
        let (a, _b) = Channel::pair().unwrap();
        let raw = a.raw();
        std::mem::forget(a.fd);
        let again = Channel::inherited(raw).unwrap();
        assert_eq!(again.raw(), raw);
    }
}
