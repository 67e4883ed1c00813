//! Default values and accepted ranges of every tunable (documented in docs/config.md).

use std::ops::RangeInclusive;
use std::time::Duration;

use udplb_core::health::Thresholds;

/// A flow closes after this long without a datagram in either direction.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Accepted idle timeouts.
pub const IDLE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(86_400);
/// Accepted persistence timeouts (`persistence`; off by default).
pub const PERSISTENCE_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(86_400);
/// RADIUS payload keys: how long a `State` is remembered after its challenge (freeradius
/// forgets an EAP session after 60 s: `timer_expire`).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Accepted `State` timeouts.
pub const STATE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// RADIUS payload keys: `State`s remembered at most.
pub const MAX_STATES: usize = 65_536;
/// Accepted `max_states`.
pub const MAX_STATES_RANGE: RangeInclusive<usize> = 16..=16_777_216;
/// Accepted key offsets and lengths (`bytes` payload keys), and token lengths.
pub const KEY_BYTES_RANGE: RangeInclusive<usize> = 1..=65_507;
/// TCP connections a listener with `tcp` holds open at most.
pub const TCP_MAX_CONNECTIONS: u32 = 1024;
/// Accepted `tcp_max_connections`.
pub const TCP_MAX_CONNECTIONS_RANGE: RangeInclusive<u32> = 1..=1_000_000;
/// How long connecting to a backend over TCP may take before the next backend is tried.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Flow cap of a listener (over all workers).
pub const MAX_FLOWS: u32 = 65_536;
/// Accepted flow caps.
pub const MAX_FLOWS_RANGE: RangeInclusive<u32> = 1..=16_777_216;
/// Largest datagram forwarded: the largest UDP payload over IPv4.
pub const MAX_DATAGRAM_SIZE: usize = 65_507;
/// Accepted datagram size limits.
pub const MAX_DATAGRAM_SIZE_RANGE: RangeInclusive<usize> = 1..=65_507;
/// Receive and send buffer of each listener socket, in bytes: a burst or a stall of the
/// worker this large is queued rather than dropped (about 10,000 datagrams of 64 bytes).
pub const SOCKET_BUFFER: usize = 4 << 20;
/// Accepted listener buffer sizes (the kernel doubles the value it is given, into an `int`).
pub const SOCKET_BUFFER_RANGE: RangeInclusive<usize> = 4096..=(1 << 30);
/// Request-response mode: a request its backend leaves unanswered this long is a passive
/// failure of that backend (dnsdist's `udpTimeout`).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Accepted reply timeouts.
pub const REPLY_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);
/// Replies per request in request-response mode (DNS: 1).
pub const RESPONSES: u32 = 1;
/// Accepted replies per request.
pub const RESPONSES_RANGE: RangeInclusive<u32> = 1..=1000;
/// Accepted worker counts.
pub const WORKERS_RANGE: RangeInclusive<usize> = 1..=1024;
/// Time between two health checks of a backend.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long one health check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Accepted check intervals.
pub const CHECK_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(3600);
/// Consecutive successes that bring a backend up.
pub const RISE: u32 = 2;
/// Consecutive failures that take a backend down.
pub const FALL: u32 = 3;
/// Passive failures in a row (refused datagrams, unanswered requests) that take a backend down
/// between checks.
pub const PASSIVE_FALL: u32 = 3;
/// Thresholds of backends without a `[pools.NAME.health]` table (watched passively only).
pub const THRESHOLDS: Thresholds = Thresholds {
    rise: RISE,
    fall: FALL,
    passive_fall: PASSIVE_FALL,
};
/// Accepted rise and fall.
pub const RISE_FALL_RANGE: RangeInclusive<u32> = 1..=100;
/// A flow displaced by a failure goes back into balance at its first datagram after a pause
/// this long, once its pool is whole again (`rebalance`).
pub const REBALANCE: Duration = Duration::from_secs(1);
/// How long established flows are served after SIGTERM before udplb exits.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Accepted grace periods.
pub const SHUTDOWN_GRACE_RANGE: RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(3600);

/// At shutdown, how long udplb serves on once it has withdrawn its announcement.
pub const WITHDRAW_DELAY: Duration = Duration::from_secs(2);
/// Accepted withdraw delays.
pub const WITHDRAW_DELAY_RANGE: RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(300);

/// `[sync]`: how often new flows are sent to the peers.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Accepted sync intervals.
pub const SYNC_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(10);
/// `[sync]`: placements learned from peers kept at most.
pub const SYNC_MAX_ENTRIES: usize = 1_048_576;
/// Accepted `max_entries`.
pub const SYNC_MAX_ENTRIES_RANGE: RangeInclusive<usize> = 1024..=16_777_216;

/// `[listeners.NAME.limits]`: rates per second (datagrams or new flows).
pub const RATE_RANGE: RangeInclusive<u32> = 1..=100_000_000;
/// `ipv4_prefix`.
pub const IPV4_PREFIX_RANGE: RangeInclusive<u8> = 1..=32;
/// `ipv6_prefix`.
pub const IPV6_PREFIX_RANGE: RangeInclusive<u8> = 1..=128;
/// `table_size`: counters per row of each limiter (memory: 16 bytes each).
pub const LIMIT_CELLS_RANGE: RangeInclusive<usize> = 64..=16_777_216;
/// `reply_ratio`: reply bytes per request byte a flow may send back.
pub const REPLY_RATIO_RANGE: RangeInclusive<u32> = 1..=1000;

/// Listeners with `dataplane = "kernel"` or `"auto"` at most (the kernel data plane's
/// listener map).
pub const KERNEL_LISTENERS_MAX: usize = 16;
/// Backends in a pool of such a listener at most (the kernel data plane's backend array).
pub const KERNEL_POOL_BACKENDS_MAX: usize = 256;
/// The balancer's source ports for `forwarding = "masquerade"` (`masquerade_ports`): above
/// Linux's default ephemeral range (32768-60999), so that the host's own sockets (udplb's
/// health checks among them) do not draw a port whose replies the kernel data plane takes.
pub const MASQUERADE_PORTS: crate::model::PortRange = crate::model::PortRange {
    first: 61_000,
    last: 65_535,
};
/// The backends' UDP port for `encapsulation = "gue"` (`gue_port`): katran's.
pub const GUE_PORT: u16 = 6080;
/// Longest interface name (`IFNAMSIZ` less the terminating NUL).
pub const INTERFACE_NAME_MAX: usize = 15;

/// Where the kernel data plane pins its flow map, so that the next udplb process (a restart,
/// an upgrade) continues every flow.
pub const BPF_DIR: &str = "/sys/fs/bpf/udplb";
