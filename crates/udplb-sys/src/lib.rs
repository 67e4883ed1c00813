//! udplb's system interface: batched UDP syscalls, control messages and socket options.
//!
//! Owns: the only `unsafe` code of udplb. [`batch`] wraps `recvmmsg`/`sendmmsg` with the
//! `IP_PKTINFO`/`IPV6_PKTINFO` control messages that let replies leave from exactly the address
//! a client sent to; [`socket`] creates listener and upstream sockets with the options udplb
//! relies on, and raises the open-file limit; [`handover`] passes open sockets to another
//! udplb process; `raw` makes the per-datagram system calls
//! without glibc's cancellation-point wrappers; [`packet`] sends whole Ethernet frames (for
//! udplb-bench's generator of new flows).
//!
//! Must not: make decisions. Everything here is a thin, allocation-free (after construction)
//! translation between Rust types and the kernel's; policy lives in `udplb-core`, the event
//! loop in `udplb-dataplane`. Every `unsafe` block carries a `// SAFETY:` comment.

pub mod batch;
pub mod handover;
pub mod packet;
mod raw;
mod sockaddr;
pub mod socket;
