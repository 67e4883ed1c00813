//! The validated configuration: what udplb runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use udplb_core::acl::Cidr;
use udplb_core::health::{Initial, Quorum, Thresholds};
use udplb_core::model::UnknownName;
use udplb_core::payload::KeySpec;
use udplb_core::ratelimit::LimitSettings;
use udplb_core::snapshot::AdminState;
use udplb_core::{
    Affinity, AllDownPolicy, BackendSpec, FailurePolicy, ProxyHeader, SchedulerKind, SessionMode,
};

use crate::defaults;

/// A whole configuration.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Config {
    /// Process-wide settings.
    pub runtime: Runtime,
    /// The admin endpoint, when enabled.
    pub admin: Option<Admin>,
    /// Listeners (virtual services), in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Pools of backends, in file order.
    pub pools: Vec<PoolConfig>,
    /// Announcing the listeners' addresses through a routing daemon, when configured.
    pub announce: Option<Announce>,
    /// Sharing where flows go with other udplb instances, when configured.
    pub sync: Option<FlowSync>,
}

/// `[announce]`: the commands that make a routing daemon (bird, FRR) announce or withdraw the
/// listeners' addresses, e.g. `birdc enable vip` / `birdc disable vip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announce {
    /// Run (program and arguments) to announce: once udplb serves and every listener's pool
    /// holds its quorum.
    pub up: Vec<String>,
    /// Run to withdraw: on a lost quorum, and at shutdown before udplb stops admitting.
    pub down: Vec<String>,
    /// At shutdown, how long udplb goes on serving as before once withdrawn (the routers
    /// move the traffic away meanwhile).
    pub withdraw_delay: Duration,
}

/// `[sync]`: flow-state sync between udplb instances that serve the same addresses (ECMP or
/// VRRP): each tells its peers where its flows go, so a flow a router moves to another
/// instance stays on its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowSync {
    /// Address to receive the peers' messages on (and to send from).
    pub listen: SocketAddr,
    /// The other instances' `listen` addresses.
    pub peers: Vec<SocketAddr>,
    /// A file holding the key shared by every instance (at least 16 bytes; messages are
    /// authenticated with it); read once at start.
    pub key_file: PathBuf,
    /// How often new flows are sent to the peers.
    pub interval: Duration,
    /// Most placements learned from peers kept at once.
    pub max_entries: usize,
}

/// `[runtime]`
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Runtime {
    /// Worker threads; `None`: one per CPU.
    pub workers: Option<usize>,
    /// On SIGTERM/SIGINT, how long established flows are still served (no new ones) before
    /// udplb exits; `None`: [`crate::defaults::SHUTDOWN_GRACE`].
    pub shutdown_grace: Option<Duration>,
    /// Started as root: the user to switch to once every socket is bound.
    pub user: Option<String>,
    /// Started as root: the group to switch to (default: the user's primary group).
    pub group: Option<String>,
    /// Started as root without `user`: keep running as root instead of refusing to start.
    pub allow_root: bool,
    /// Where the kernel data plane keeps its flow map between udplb processes (a directory on
    /// a bpf file system); `None`: [`crate::defaults::BPF_DIR`].
    pub bpf_dir: Option<std::path::PathBuf>,
}

/// `[admin]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    /// Address of the HTTP admin endpoint (status, counters, metrics, API).
    pub listen: SocketAddr,
    /// Whether the API may change anything (backends, weights, states, reload); read-only
    /// otherwise.
    pub allow_changes: bool,
    /// A file holding the token changes must present (`Authorization: Bearer TOKEN`); read
    /// once at start. Required for changes on an address other than loopback.
    pub token_file: Option<std::path::PathBuf>,
}

/// `[listeners.NAME]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The table name.
    pub name: String,
    /// Address to receive client datagrams on (may be a wildcard).
    pub address: SocketAddr,
    /// Name of the pool that serves it.
    pub pool: String,
    /// Session mode.
    pub mode: SessionMode,
    /// What makes a client sticky.
    pub affinity: Affinity,
    /// Idle time after which a flow closes.
    pub idle_timeout: Duration,
    /// How long a client returns to the backend it last used after its last flow closed
    /// (`persistence`); `None`: off.
    pub persistence: Option<Duration>,
    /// Request-response mode: how long a backend may leave a request unanswered before it
    /// counts as a passive failure (`reply_timeout`).
    pub reply_timeout: Duration,
    /// Flow cap over all workers.
    pub max_flows: u32,
    /// Largest datagram forwarded in either direction.
    pub max_datagram_size: usize,
    /// `SO_RCVBUF` and `SO_SNDBUF` of the listener's sockets, in bytes (`socket_buffer`).
    pub socket_buffer: usize,
    /// Clients served (`allow`); empty: every client not denied.
    pub allow: Vec<Cidr>,
    /// Clients refused (`deny`); wins over `allow`.
    pub deny: Vec<Cidr>,
    /// Rate limits (`[listeners.NAME.limits]`); `None`: no limits.
    pub limits: Option<LimitSettings>,
    /// Expect PROXY v2 headers from another balancer in front (`proxy_protocol`).
    pub proxy_protocol: bool,
    /// Senders trusted to send them (`proxy_from`); empty: any.
    pub proxy_from: Vec<Cidr>,
    /// Pool for clients refused by `allow`/`deny` or over a rate limit (`abuse_pool`).
    pub abuse_pool: Option<String>,
    /// Receive trains of same-sized datagrams as one (`UDP_GRO`) and forward them as one
    /// (`UDP_SEGMENT`) (`gro`); flow mode only.
    pub gro: bool,
    /// Flows share upstream sockets by local port, one flow per backend on each
    /// (`shared_upstream`), instead of a socket each.
    pub shared_upstream: bool,
    /// Also accept TCP on the same address and port and proxy each connection to a backend
    /// of the pool (`tcp`: DNS over TCP); `None`: when the listener serves DNS (see
    /// [`Config::takes_tcp`]).
    pub tcp: Option<bool>,
    /// TCP connections open at most (`tcp_max_connections`).
    pub tcp_max_connections: u32,
    /// Which data plane forwards this listener's datagrams (`dataplane`).
    pub dataplane: Dataplane,
    /// The interfaces the kernel data plane's programs attach to (`interfaces`); empty: every
    /// interface that is up at start, except loopback.
    pub interfaces: Vec<String>,
}

/// Which data plane forwards a listener's datagrams (per listener, `dataplane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Dataplane {
    /// udplb's workers relay through sockets (default).
    #[default]
    Socket,
    /// eBPF programs at tc forward in the kernel; udplb's workers still serve what arrives on
    /// interfaces without the programs.
    Kernel,
    /// [`Dataplane::Kernel`] when the programs load, [`Dataplane::Socket`] otherwise.
    Auto,
}

impl Dataplane {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Dataplane::Socket => "socket",
            Dataplane::Kernel => "kernel",
            Dataplane::Auto => "auto",
        }
    }

    /// Whether the kernel data plane may serve the listener (`kernel` or `auto`): the
    /// configuration must be one it can serve.
    pub fn may_use_kernel(self) -> bool {
        matches!(self, Dataplane::Kernel | Dataplane::Auto)
    }
}

impl FromStr for Dataplane {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "socket" => Ok(Dataplane::Socket),
            "kernel" => Ok(Dataplane::Kernel),
            "auto" => Ok(Dataplane::Auto),
            _ => Err(UnknownName {
                expected: "socket, kernel, auto",
            }),
        }
    }
}

/// How the kernel data plane sends a pool's datagrams to its backends (per pool,
/// `forwarding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Forwarding {
    /// The destination is rewritten to the backend's, the client's address kept (LVS-NAT):
    /// the backends' replies must route back through the balancer (default).
    #[default]
    Nat,
    /// The source is rewritten to the balancer's as well.
    Masquerade,
    /// Encapsulated: the backends answer the clients directly (direct server return).
    Dsr,
}

impl Forwarding {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Nat => "nat",
            Forwarding::Masquerade => "masquerade",
            Forwarding::Dsr => "dsr",
        }
    }
}

/// How `forwarding = "dsr"` carries a datagram to its backend (per pool, `encapsulation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encapsulation {
    /// Inside an IP header of the listener's family (IP in IP, IPv6 in IPv6), as LVS-TUN
    /// (default).
    #[default]
    Ipip,
    /// Inside an IP and a UDP header to the pool's `gue_port` (GUE variant 1, as katran and
    /// the kernel's fou take it): through networks that pass only UDP and TCP, and spread
    /// over a backend NIC's queues by the client (RSS).
    Gue,
}

impl Encapsulation {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Encapsulation::Ipip => "ipip",
            Encapsulation::Gue => "gue",
        }
    }
}

impl FromStr for Encapsulation {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "ipip" => Ok(Encapsulation::Ipip),
            "gue" => Ok(Encapsulation::Gue),
            _ => Err(UnknownName {
                expected: "ipip, gue",
            }),
        }
    }
}

/// A range of UDP ports, `"FIRST-LAST"` (`masquerade_ports`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// How many ports.
    pub fn count(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Whether `other` shares a port with this range.
    pub fn overlaps(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const FORM: &str = "write FIRST-LAST, such as \"61000-65535\"";
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("not a range ({FORM})"))?;
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a port from 1 to 65535 ({FORM})")),
            Ok(n) => Ok(n),
        };
        let (first, last) = (port(a)?, port(b)?);
        if first > last {
            return Err(format!("{first} is above {last} ({FORM})"));
        }
        Ok(PortRange { first, last })
    }
}

impl FromStr for Forwarding {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "nat" => Ok(Forwarding::Nat),
            "masquerade" => Ok(Forwarding::Masquerade),
            "dsr" => Ok(Forwarding::Dsr),
            _ => Err(UnknownName {
                expected: "nat, masquerade, dsr",
            }),
        }
    }
}

impl ListenerConfig {
    /// A listener with every optional setting at its default.
    pub fn new(name: String, address: SocketAddr, pool: String) -> Self {
        ListenerConfig {
            name,
            address,
            pool,
            mode: SessionMode::Flow,
            affinity: Affinity::IpPort,
            idle_timeout: defaults::IDLE_TIMEOUT,
            persistence: None,
            reply_timeout: defaults::REPLY_TIMEOUT,
            max_flows: defaults::MAX_FLOWS,
            max_datagram_size: defaults::MAX_DATAGRAM_SIZE,
            socket_buffer: defaults::SOCKET_BUFFER,
            allow: Vec::new(),
            deny: Vec::new(),
            limits: None,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            abuse_pool: None,
            gro: false,
            shared_upstream: false,
            tcp: None,
            tcp_max_connections: defaults::TCP_MAX_CONNECTIONS,
            dataplane: Dataplane::Socket,
            interfaces: Vec::new(),
        }
    }
}

impl Config {
    /// Whether listener `l` also takes TCP: as its `tcp` says, or, without one, when it serves
    /// DNS (port 53, or a pool checked by DNS queries) through a pool that TCP can reach
    /// (not `transparent`, no PROXY header towards the backends).
    pub fn takes_tcp(&self, l: &ListenerConfig) -> bool {
        let pool = self.pools.iter().find(|p| p.name == l.pool);
        l.tcp.unwrap_or_else(|| {
            let dns_checked = pool
                .and_then(|p| p.health.as_ref())
                .is_some_and(|h| matches!(h.probe, Probe::Dns { .. }));
            let reachable =
                pool.is_some_and(|p| !p.transparent && p.proxy_protocol == ProxyHeader::Off);
            (l.address.port() == 53 || dns_checked) && reachable
        })
    }
}

/// `[pools.NAME]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// The table name.
    pub name: String,
    /// Scheduling algorithm.
    pub scheduler: SchedulerKind,
    /// Backends in file order.
    pub backends: Vec<BackendConfig>,
    /// What happens to flows whose backend goes down (`on_backend_down`).
    pub on_down: FailurePolicy,
    /// Where new flows go when no primary is up (`all_down`).
    pub all_down: AllDownPolicy,
    /// Quorum rule (`quorum`, `quorum_hysteresis`); `min_up` 0 disables it.
    pub quorum: Quorum,
    /// Command run on every state change (`notify`), without a shell.
    pub notify: Option<Vec<String>>,
    /// Health checking (`[pools.NAME.health]`); without one, backends are watched passively
    /// only (as with `check = "none"` and the default thresholds).
    pub health: Option<HealthCheck>,
    /// PROXY protocol v2 header towards the backends (`proxy_protocol`).
    pub proxy_protocol: ProxyHeader,
    /// Remove a PROXY v2 header from the start of backend replies (`strip_reply_proxy`).
    pub strip_reply_proxy: bool,
    /// Send to backends from the client's own address (`transparent`).
    pub transparent: bool,
    /// Flows placed or moved while the pool was missing backends go back into balance at
    /// their first datagram after a pause this long, once the pool is whole (`rebalance`);
    /// `None`: never.
    pub rebalance: Option<Duration>,
    /// A backend back up after being down gets a share of its weight that grows from 0 to all
    /// of it over this long (`slow_start`); zero: all of it at once.
    pub slow_start: Duration,
    /// What datagrams are placed by, read from their bytes (`[pools.NAME.payload_key]`);
    /// `None`: nothing is read.
    pub payload_key: Option<KeySpec>,
    /// How the kernel data plane sends to the backends (`forwarding`); the socket data plane
    /// always sends from udplb's own address.
    pub forwarding: Forwarding,
    /// The balancer's source ports for `forwarding = "masquerade"` (`masquerade_ports`);
    /// `None`: [`defaults::MASQUERADE_PORTS`].
    pub masquerade_ports: Option<PortRange>,
    /// How `forwarding = "dsr"` encapsulates (`encapsulation`); `None`: IP in IP.
    pub encapsulation: Option<Encapsulation>,
    /// The backends' port for `encapsulation = "gue"` (`gue_port`); `None`:
    /// [`defaults::GUE_PORT`].
    pub gue_port: Option<u16>,
}

impl PoolConfig {
    /// A pool with default policies and no health check.
    pub fn new(name: String, scheduler: SchedulerKind, backends: Vec<BackendConfig>) -> Self {
        PoolConfig {
            name,
            scheduler,
            backends,
            on_down: FailurePolicy::default(),
            all_down: AllDownPolicy::default(),
            quorum: Quorum {
                min_up: 0,
                hysteresis: 0,
            },
            notify: None,
            health: None,
            proxy_protocol: ProxyHeader::Off,
            strip_reply_proxy: false,
            transparent: false,
            rebalance: Some(defaults::REBALANCE),
            slow_start: Duration::ZERO,
            payload_key: None,
            forwarding: Forwarding::Nat,
            masquerade_ports: None,
            encapsulation: None,
            gue_port: None,
        }
    }

    /// The balancer's source ports when the pool masquerades.
    pub fn masquerade_ports(&self) -> PortRange {
        self.masquerade_ports.unwrap_or(defaults::MASQUERADE_PORTS)
    }

    /// The UDP port `forwarding = "dsr"` sends to when it encapsulates in GUE; `None` for IP
    /// in IP (and for the other forwarding methods).
    pub fn gue_port(&self) -> Option<u16> {
        (self.forwarding == Forwarding::Dsr && self.encapsulation == Some(Encapsulation::Gue))
            .then(|| self.gue_port.unwrap_or(defaults::GUE_PORT))
    }
}

/// `[pools.NAME.health]`: how a pool's backends are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// What one check does.
    pub probe: Probe,
    /// Time between two checks of a backend.
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    pub timeout: Duration,
    /// Each interval is lengthened by a random amount up to this, so checks spread out.
    pub jitter: Duration,
    /// rise, fall and passive_fall.
    pub thresholds: Thresholds,
    /// State before the first check.
    pub initial: Initial,
    /// Check this port on the backend's address instead of the backend's own port.
    pub port: Option<u16>,
}

/// The kinds of check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// No active check (`check = "none"`): the backend is watched passively only, and after a
    /// passive ejection comes back through a [`Probe::Reachable`] probe.
    None,
    /// Send an empty datagram; healthy unless the backend refuses it (ICMP port unreachable)
    /// within the timeout (`check = "udp"` without `send`): the port is open, whatever the
    /// service answers.
    Reachable,
    /// Send a datagram; expect a reply (matching `expect`).
    Udp {
        /// Payload sent.
        send: Vec<u8>,
        /// What the reply must look like.
        expect: Expect,
    },
    /// A DNS query.
    Dns {
        /// Name asked for.
        name: String,
        /// Record type, e.g. "A".
        qtype: String,
        /// Expected response code, e.g. "NOERROR".
        rcode: String,
        /// An answer that must be present (its text form, e.g. "192.0.2.1").
        answer: Option<String>,
    },
    /// A TCP connect.
    Tcp,
    /// An HTTP GET.
    Http {
        /// Path requested.
        path: String,
        /// Host header (default: the backend's address).
        host: Option<String>,
        /// Accepted status codes, inclusive.
        status: (u16, u16),
        /// A string the body must contain.
        body_contains: Option<String>,
    },
    /// A command; exit status 0 is healthy.
    Exec {
        /// Program and arguments (no shell).
        command: Vec<String>,
    },
}

/// What a UDP check's reply must look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Any reply.
    Anything,
    /// A reply starting with these bytes.
    Prefix(Vec<u8>),
    /// A reply matching this regular expression (on its bytes).
    Regex(String),
}

/// One entry of a pool's `backends`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Address, weight, backup flag.
    pub spec: BackendSpec,
    /// Operator state at startup.
    pub state: AdminState,
    /// This backend's own check (`health = { ... }` in its table: the pool's check with these
    /// keys overridden); `None`: the pool's check, if any.
    pub health: Option<HealthCheck>,
}

impl BackendConfig {
    /// The health settings that apply to this backend in `pool` (`None`: the defaults, passive
    /// only).
    pub fn check<'a>(&'a self, pool: &'a PoolConfig) -> Option<&'a HealthCheck> {
        self.health.as_ref().or(pool.health.as_ref())
    }

    /// The active check that runs against this backend in `pool`, if any.
    pub fn active_check<'a>(&'a self, pool: &'a PoolConfig) -> Option<&'a HealthCheck> {
        self.check(pool).filter(|h| h.probe != Probe::None)
    }

    /// This backend's rise, fall and passive thresholds in `pool`.
    pub fn thresholds(&self, pool: &PoolConfig) -> Thresholds {
        self.check(pool)
            .map_or(defaults::THRESHOLDS, |h| h.thresholds)
    }

    /// How long the recovery probe of a passively ejected backend without an active check
    /// waits for a refusal.
    pub fn recovery_timeout(&self, pool: &PoolConfig) -> Duration {
        self.check(pool)
            .map_or(defaults::CHECK_TIMEOUT, |h| h.timeout)
    }
}

impl From<BackendSpec> for BackendConfig {
    fn from(spec: BackendSpec) -> Self {
        BackendConfig {
            spec,
            state: AdminState::Enabled,
            health: None,
        }
    }
}

impl Config {
    /// Checks every rule a configuration must follow; each error reads `key.path: message`.
    /// [`crate::parse`] applies the same rules and adds file and line.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let problems = crate::rules::check(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems
                .into_iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect())
        }
    }
}
