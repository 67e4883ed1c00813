//! Why a datagram was not forwarded, and why a flow ended.
//!
//! Owns: [`DropReason`] and [`CloseReason`], the closed sets of outcomes that the data plane
//! counts (one counter per variant) and that metrics export by name.
//! Must not: count anything itself; counters live with their single writer (a worker).

/// Why a datagram was dropped. Every drop has exactly one reason and is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// A zero-length datagram from a client (nothing to forward).
    Empty = 0,
    /// A datagram larger than the listener's `max_datagram_size` (never truncated).
    Oversize,
    /// A new flow was refused because the flow table is at its cap.
    FlowCap,
    /// The pool has no available backend.
    NoBackend,
    /// No upstream socket could be opened for a new flow (e.g. out of file descriptors).
    UpstreamSocket,
    /// The send towards a backend failed.
    SendError,
    /// A reply could not be sent back to the client.
    ReplySendError,
    /// A reply larger than the listener's `max_datagram_size`.
    ReplyOversize,
    /// A datagram on an upstream socket whose source is not a backend of the pool.
    UnknownSource,
    /// A new flow while udplb is shutting down (established flows are still served).
    ShuttingDown,
    /// The client is not served by the listener (`allow` / `deny`).
    Denied,
    /// The client (or its prefix) is over the listener's datagram rate limit.
    RateLimited,
    /// A new flow over the listener's new-flow rate limit for the client (or its prefix).
    FlowRateLimited,
    /// A reply beyond the flow's anti-amplification budget (`reply_ratio`).
    Amplification,
    /// A malformed PROXY v2 header: on a reply from a pool that strips them, or on a client
    /// datagram of a listener that expects them (or one from a sender it does not trust).
    ProxyHeader,
    /// A new flow shed because the listener is overloaded (a turn ended with its receive
    /// queue filling up): new flows are rationed so that established ones keep being served.
    Overload,
    /// A source that can never be a client: port 0, one of udplb's own listener addresses, a
    /// backend's address, an IPv4-mapped address on an IPv6 listener, or an address no host
    /// sends from (see [`crate::source::SourceGuard`]). Answering it would loop or be forged.
    BadSource,
}

impl DropReason {
    /// Number of variants (size of per-reason counter arrays).
    pub const COUNT: usize = 17;

    /// Every reason, in counter order.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Empty,
        DropReason::Oversize,
        DropReason::FlowCap,
        DropReason::NoBackend,
        DropReason::UpstreamSocket,
        DropReason::SendError,
        DropReason::ReplySendError,
        DropReason::ReplyOversize,
        DropReason::UnknownSource,
        DropReason::ShuttingDown,
        DropReason::Denied,
        DropReason::RateLimited,
        DropReason::FlowRateLimited,
        DropReason::Amplification,
        DropReason::ProxyHeader,
        DropReason::Overload,
        DropReason::BadSource,
    ];

    /// The label used in metrics and status output.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::Oversize => "oversize",
            DropReason::FlowCap => "flow_cap",
            DropReason::NoBackend => "no_backend",
            DropReason::UpstreamSocket => "upstream_socket",
            DropReason::SendError => "send_error",
            DropReason::ReplySendError => "reply_send_error",
            DropReason::ReplyOversize => "reply_oversize",
            DropReason::UnknownSource => "unknown_source",
            DropReason::ShuttingDown => "shutting_down",
            DropReason::Denied => "denied",
            DropReason::RateLimited => "rate_limited",
            DropReason::FlowRateLimited => "flow_rate_limited",
            DropReason::Amplification => "amplification",
            DropReason::ProxyHeader => "proxy_header",
            DropReason::Overload => "overload",
            DropReason::BadSource => "bad_source",
        }
    }

    /// Index into a per-reason counter array.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a flow left the flow table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// No datagram in either direction for the idle timeout.
    Idle = 0,
    /// Request-response mode: every request got its replies.
    Completed,
    /// Its backend is no longer in the pool or no longer accepts traffic.
    BackendGone,
    /// Its upstream socket failed.
    Error,
    /// The worker is shutting down.
    Shutdown,
}

impl CloseReason {
    /// Number of variants.
    pub const COUNT: usize = 5;

    /// Every reason, in counter order.
    pub const ALL: [CloseReason; Self::COUNT] = [
        CloseReason::Idle,
        CloseReason::Completed,
        CloseReason::BackendGone,
        CloseReason::Error,
        CloseReason::Shutdown,
    ];

    /// The label used in metrics and status output.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Completed => "completed",
            CloseReason::BackendGone => "backend_gone",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// Index into a per-reason counter array.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_counter_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
