//! The per-datagram system calls, made directly with `syscall(2)` instead of through glibc's
//! wrappers.
//!
//! glibc's `send`, `sendto`, `sendmsg`, `recvmmsg` and `sendmmsg` are cancellation points: in a
//! multi-threaded process every call switches asynchronous cancellation on and off around the
//! system call (`__pthread_enable_asynccancel`, `__pthread_disable_asynccancel`). udplb never
//! cancels a thread, so the bare system call does the same work without that.
//!
//! Integer arguments are widened to `long` here: `syscall(2)` reads every argument as a
//! `long` through C varargs, where a narrower integer leaves the register's upper half
//! unspecified.
//!
//! Owns: nothing but the calls. Must not: retry, interpret errors or allocate. Each returns
//! what the kernel returned, `-1` with `errno` set on failure, exactly as the wrappers do.
//! Callers uphold the same pointer contracts as for the libc functions of the same names.

use std::os::fd::RawFd;

use libc::c_long;

/// `sendto(2)`: `addr` may be null (then `addr_len` is 0) for a connected socket.
///
/// # Safety
/// `buf` must be valid for reads of `len` bytes; `addr`, when not null, for reads of
/// `addr_len` bytes.
#[inline]
pub(crate) unsafe fn sendto(
    fd: RawFd,
    buf: *const libc::c_void,
    len: usize,
    flags: libc::c_int,
    addr: *const libc::sockaddr,
    addr_len: libc::socklen_t,
) -> isize {
    // SAFETY: the caller guarantees the buffers; the arguments are those of sendto(2).
    unsafe {
        libc::syscall(
            libc::SYS_sendto,
            c_long::from(fd),
            buf,
            len,
            c_long::from(flags),
            addr,
            c_long::from(addr_len),
        ) as isize
    }
}

/// `sendmsg(2)`.
///
/// # Safety
/// `msg` must point at a valid `msghdr` whose buffers are valid for reads of their lengths.
#[inline]
pub(crate) unsafe fn sendmsg(fd: RawFd, msg: *const libc::msghdr, flags: libc::c_int) -> isize {
    // SAFETY: the caller guarantees `msg`; the arguments are those of sendmsg(2).
    unsafe {
        libc::syscall(
            libc::SYS_sendmsg,
            c_long::from(fd),
            msg,
            c_long::from(flags),
        ) as isize
    }
}

/// `recvmmsg(2)` without a timeout.
///
/// # Safety
/// `msgs` must point at `len` valid `mmsghdr`s whose buffers are valid for writes of their
/// lengths.
#[inline]
pub(crate) unsafe fn recvmmsg(
    fd: RawFd,
    msgs: *mut libc::mmsghdr,
    len: libc::c_uint,
    flags: libc::c_int,
) -> libc::c_int {
    let no_timeout: *mut libc::timespec = std::ptr::null_mut();
    // SAFETY: the caller guarantees `msgs`; a null timeout is allowed.
    unsafe {
        libc::syscall(
            libc::SYS_recvmmsg,
            c_long::from(fd),
            msgs,
            c_long::from(len),
            c_long::from(flags),
            no_timeout,
        ) as libc::c_int
    }
}

/// `sendmmsg(2)`.
///
/// # Safety
/// `msgs` must point at `len` valid `mmsghdr`s whose buffers are valid for reads of their
/// lengths.
#[inline]
pub(crate) unsafe fn sendmmsg(
    fd: RawFd,
    msgs: *mut libc::mmsghdr,
    len: libc::c_uint,
    flags: libc::c_int,
) -> libc::c_int {
    // SAFETY: the caller guarantees `msgs`; the arguments are those of sendmmsg(2).
    unsafe {
        libc::syscall(
            libc::SYS_sendmmsg,
            c_long::from(fd),
            msgs,
            c_long::from(len),
            c_long::from(flags),
        ) as libc::c_int
    }
}
