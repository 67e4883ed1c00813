//! The balancer's vocabulary: session modes, schedulers, backends.
//!
//! Owns: the small value types shared by the config, the core and the data plane.
//! Must not: hold state; every type here is a plain value.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// How datagrams of one client are tied to a backend (per listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionMode {
    /// Sticky on the client's address until the flow is idle for the idle timeout.
    Flow,
    /// Every datagram is scheduled on its own (LVS `--ops`); replies still reach the client.
    Datagram,
    /// Like `Flow`, but the flow closes once every request got `responses` replies
    /// (nginx's `proxy_responses`; DNS is 1).
    RequestResponse {
        /// Replies expected per request datagram.
        responses: u32,
    },
}

impl SessionMode {
    /// The name used in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SessionMode::Flow => "flow",
            SessionMode::Datagram => "datagram",
            SessionMode::RequestResponse { .. } => "request-response",
        }
    }
}

/// What identifies a client for stickiness (per listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Affinity {
    /// The client's ip:port (default).
    #[default]
    IpPort,
    /// The client's ip alone: all of a client's ports go to the same backend.
    Ip,
}

impl Affinity {
    /// The name used in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Affinity::IpPort => "ip-port",
            Affinity::Ip => "ip",
        }
    }
}

impl FromStr for Affinity {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "ip-port" | "ip:port" => Ok(Affinity::IpPort),
            "ip" => Ok(Affinity::Ip),
            _ => Err(UnknownName {
                expected: "ip-port, ip",
            }),
        }
    }
}

/// The scheduling algorithm of a pool. Every scheduler honours backend weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SchedulerKind {
    /// Smooth weighted round robin (nginx's algorithm): exact proportions, interleaved, over
    /// one sequence per pool shared by every worker (so a few clients spread over every
    /// backend whatever the worker count). Equal weights: plain round robin.
    #[default]
    RoundRobin,
    /// Random in proportion to weight.
    Random,
    /// The backend with the fewest live flows on this worker (weighted: flows / weight); ties
    /// go round robin.
    LeastFlows,
    /// Power of two choices: the less loaded of two random backends (flows / weight).
    PowerOfTwo,
    /// Weighted Maglev consistent hashing on the client key.
    Maglev,
    /// Weighted rendezvous (highest random weight) hashing on the client key.
    Rendezvous,
}

impl SchedulerKind {
    /// Every scheduler, in documentation order.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::RoundRobin,
        SchedulerKind::Random,
        SchedulerKind::LeastFlows,
        SchedulerKind::PowerOfTwo,
        SchedulerKind::Maglev,
        SchedulerKind::Rendezvous,
    ];

    /// The canonical name used in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::RoundRobin => "round-robin",
            SchedulerKind::Random => "random",
            SchedulerKind::LeastFlows => "least-flows",
            SchedulerKind::PowerOfTwo => "power-of-two",
            SchedulerKind::Maglev => "maglev",
            SchedulerKind::Rendezvous => "rendezvous",
        }
    }

    /// Whether the choice depends only on the client key (same client, same backend, on every
    /// worker and every udplb instance with the same backends).
    pub fn is_consistent_hash(self) -> bool {
        matches!(self, SchedulerKind::Maglev | SchedulerKind::Rendezvous)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        let kind = match s {
            // Round robin and random honour weights: the weighted names are the same.
            "round-robin" | "rr" | "weighted-round-robin" | "wrr" => SchedulerKind::RoundRobin,
            "random" | "weighted-random" | "wrandom" => SchedulerKind::Random,
            "least-flows" | "lf" => SchedulerKind::LeastFlows,
            "power-of-two" | "p2c" => SchedulerKind::PowerOfTwo,
            "maglev" => SchedulerKind::Maglev,
            "rendezvous" | "hrw" => SchedulerKind::Rendezvous,
            _ => {
                return Err(UnknownName {
                    expected: "round-robin (rr, wrr), random, least-flows (lf), \
                               power-of-two (p2c), maglev, rendezvous (hrw)",
                });
            }
        };
        Ok(kind)
    }
}

/// A name that is not one of the accepted spellings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownName {
    /// The accepted spellings, for the error message.
    pub expected: &'static str,
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected one of: {}", self.expected)
    }
}

impl std::error::Error for UnknownName {}

/// A backend as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where datagrams are sent.
    pub addr: SocketAddr,
    /// Relative share for weighted schedulers, 1..=10000. Weight 0 is not accepted: drain or
    /// disable a backend instead.
    pub weight: u32,
    /// A backup receives traffic only while no primary backend of its pool is available.
    pub backup: bool,
}

impl BackendSpec {
    /// The largest accepted weight (keeps weighted tables and sums small).
    pub const MAX_WEIGHT: u32 = 10_000;

    /// A primary backend of weight 1.
    pub fn new(addr: SocketAddr) -> Self {
        BackendSpec {
            addr,
            weight: 1,
            backup: false,
        }
    }
}

/// What happens to established flows whose backend goes down (per pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Move them to another backend at their next datagram (default).
    #[default]
    Reschedule,
    /// Keep them on their backend until they are idle (a disabled backend still loses them).
    Keep,
}

impl FromStr for FailurePolicy {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "reschedule" => Ok(FailurePolicy::Reschedule),
            "keep" => Ok(FailurePolicy::Keep),
            _ => Err(UnknownName {
                expected: "reschedule, keep",
            }),
        }
    }
}

/// Where new flows go when no primary backend of a pool is up (per pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AllDownPolicy {
    /// To the pool's backup backends that are up; dropped (`no_backend`) when there are none.
    #[default]
    Backup,
    /// To backups that are up, else to every enabled primary regardless of health: a pool
    /// whose checks all fail (or are wrong) keeps serving.
    FailOpen,
    /// Nowhere: dropped and counted as `no_backend`, even when backups are up.
    Drop,
}

impl FromStr for AllDownPolicy {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "backup" => Ok(AllDownPolicy::Backup),
            "fail-open" => Ok(AllDownPolicy::FailOpen),
            "drop" => Ok(AllDownPolicy::Drop),
            _ => Err(UnknownName {
                expected: "backup, fail-open, drop",
            }),
        }
    }
}

/// Whether and when a pool's backends get a PROXY protocol v2 header in front of the client's
/// datagram (per pool, `proxy_protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProxyHeader {
    /// No header (default).
    #[default]
    Off,
    /// On the first datagram of each flow (in datagram mode, where every datagram is
    /// scheduled on its own, on every datagram).
    First,
    /// On every datagram.
    Every,
}

impl FromStr for ProxyHeader {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "off" => Ok(ProxyHeader::Off),
            "first" => Ok(ProxyHeader::First),
            "every" => Ok(ProxyHeader::Every),
            _ => Err(UnknownName {
                expected: "off, first, every",
            }),
        }
    }
}
