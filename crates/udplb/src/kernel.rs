//! The kernel data plane under udplb's control: which listeners it serves, loading and
//! attaching its program at start (before privileges are dropped), and a thread that turns
//! every published snapshot (health, drain, weights, reload) into map updates.
//!
//! Owns: the choice per listener (`dataplane = "kernel"` fails the start when the program
//! cannot load; `"auto"` falls back to the sockets with one log line), the interfaces the
//! program attaches to, each listener's forwarding (set at start: a reload that changes it is
//! refused), and the translation of a snapshot's pool into a [`udplb_kernel::Service`].
//! Must not: place or check anything itself (the snapshot says which backend takes what; the
//! program indexes the Maglev table the core built).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use udplb_config::{Config, Dataplane, Forwarding, PortRange};
use udplb_core::SchedulerKind;
use udplb_core::SessionMode;
use udplb_core::handover::Placement;
use udplb_core::model::Affinity;
use udplb_core::sched::Tier;
use udplb_core::snapshot::Snapshot;
use udplb_kernel::census::FlowCensus;

/// How much longer than its own `shutdown_grace` udplb waits for another process to let go of
/// `runtime.bpf_dir` (a process restarted by hand while the old one still serves its flows).
const LOCK_WAIT_BEYOND_GRACE: Duration = Duration::from_secs(5);

/// How often the published snapshot is checked for a change.
const FOLLOW_EVERY: Duration = Duration::from_millis(20);

/// The fewest entries a family's map of the peers' flows gets (`[sync]` beside kernel
/// listeners of that family).
const PEER_FLOWS_MIN: usize = 1024;

/// How often this host's addresses are read again for the wildcard listeners (until then, a
/// datagram to an address just added is served by the socket path's wildcard socket).
const LOCALS_EVERY: Duration = Duration::from_secs(1);

/// The kernel data plane of a running udplb: the loaded program and the listeners it serves
/// (by snapshot index).
pub struct KernelPlane {
    kernel: Mutex<udplb_kernel::Kernel>,
    /// Snapshot indexes of the listeners the program serves, in service-id order.
    pub listeners: Vec<usize>,
    /// Whether one of them has a wildcard address (the program is kept told of this host's
    /// addresses).
    wildcard: bool,
    /// The interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// Per listener (as `listeners`), how its pool's backends are reached.
    methods: Vec<udplb_kernel::Method>,
    /// Per listener (as `listeners`), where its rate limits' cells are in the program's table
    /// (first cell, cells per row), set at start.
    limit_cells: Vec<Option<(u32, u32)>>,
    /// `[sync]`: how long the program follows a peer's flow after udplb learned it.
    sync: Option<Duration>,
    /// The snapshot generation the maps say.
    applied: AtomicU64,
    /// The live flows, as last counted ([`KernelPlane::count_flows`]).
    flows: Mutex<FlowCount>,
    /// Wakes the counting thread when someone asks after a quiet while.
    flows_wanted: std::sync::Condvar,
    /// Wakes readers waiting for a count anew.
    flows_counted: std::sync::Condvar,
    /// The lock on `runtime.bpf_dir` while the maps are pinned there.
    pin_lock: Option<crate::bpf_dir::Lock>,
    /// The new flows the program tells for the peers (`[sync]`), read apart from `kernel`.
    new_flows: Mutex<Option<udplb_kernel::NewFlows>>,
}

/// The last count of the live kernel flows.
struct FlowCount {
    census: Arc<FlowCensus>,
    /// When it was made, and how long reading the tables took.
    at: Instant,
    took: Duration,
    /// When someone last asked for it.
    asked: Instant,
}

impl FlowCount {
    /// When the next count may start: the pause after this one.
    fn due(&self) -> Instant {
        self.at + (self.took * FLOW_COUNT_PAUSE_FACTOR).max(FLOW_COUNT_EVERY)
    }
}

/// A reader waits for a count anew at most this long (see [`KernelPlane::flows`]).
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Counting the live flows reads every slot of the flow tables (about 100 ms per 400 MiB of
/// tables here): each count waits this many times its own duration, at least
/// [`FLOW_COUNT_EVERY`], so that counting takes at most 2 % of a CPU.
const FLOW_COUNT_PAUSE_FACTOR: u32 = 50;
const FLOW_COUNT_EVERY: Duration = Duration::from_secs(1);
/// Counts stop when nobody asked for this long (no scrapes, no `/stats`), and resume when
/// someone does.
const FLOW_COUNT_WANTED_FOR: Duration = Duration::from_secs(60);

/// Loads and attaches the program for the listeners that ask for it (none: `None`). A listener
/// with `dataplane = "kernel"` that cannot have it is an error; `"auto"` ones fall back to
/// the sockets, said once in the log. `inherited_lock`: an upgrade's predecessor's descriptor
/// of the lock on `runtime.bpf_dir` ([`crate::bpf_dir::Lock`]).
pub fn start(
    cfg: &Config,
    snap: &Snapshot,
    inherited_lock: Option<std::fs::File>,
) -> anyhow::Result<Option<Arc<KernelPlane>>> {
    let wanted: Vec<usize> = cfg
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.dataplane != Dataplane::Socket)
        .map(|(i, _)| i)
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    let required = wanted
        .iter()
        .any(|&i| cfg.listeners[i].dataplane == Dataplane::Kernel);
    match load(cfg, snap, &wanted, inherited_lock) {
        Ok(plane) => {
            for &i in &wanted {
                tracing::info!(
                    listener = %cfg.listeners[i].name,
                    interfaces = %plane.interfaces.join(","),
                    "kernel data plane: forwarding in the kernel (udplb's sockets serve what \
                     arrives on other interfaces)"
                );
            }
            Ok(Some(Arc::new(plane)))
        }
        Err(e) if required => Err(anyhow::anyhow!(
            "kernel data plane (listeners with dataplane = \"kernel\"): {e}"
        )),
        Err(e) => {
            for &i in &wanted {
                tracing::warn!(
                    listener = %cfg.listeners[i].name,
                    reason = %e,
                    "kernel data plane unavailable: dataplane = \"auto\" serves with sockets"
                );
            }
            Ok(None)
        }
    }
}

fn load(
    cfg: &Config,
    snap: &Snapshot,
    wanted: &[usize],
    inherited_lock: Option<std::fs::File>,
) -> anyhow::Result<KernelPlane> {
    let max_flows: u32 = wanted
        .iter()
        .map(|&i| cfg.listeners[i].max_flows)
        .fold(0u32, u32::saturating_add);
    let on_ipv4 = |&i: &usize| cfg.listeners[i].address.ip().to_canonical().is_ipv4();
    let pin = crate::bpf_dir::pin_dir(cfg);
    let limit_cells = limit_layout(cfg, wanted);
    let cells: u32 = limit_cells
        .iter()
        .flatten()
        .map(|&(_, per_row)| udplb_kernel::LIMITERS * 2 * per_row)
        .sum();
    let methods = methods(cfg, wanted);
    let sizes =
        udplb_kernel::MapSizes::for_listeners(wanted.iter().zip(&methods).map(|(&i, m)| {
            udplb_kernel::PerClient {
                ipv6: !on_ipv4(&i),
                masquerade: matches!(m, udplb_kernel::Method::Masquerade { .. }),
                remembers: remembers_clients(&cfg.listeners[i]),
                max_flows: cfg.listeners[i].max_flows,
            }
        }));
    if !crate::preflight::can_load_bpf() {
        // Said plainly, rather than as the first map the kernel refuses to create.
        anyhow::bail!(
            "this process has neither root nor CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, which \
             loading the program needs"
        );
    }
    let sync = cfg.sync.as_ref().map(|_| 2 * crate::sync::hold(cfg));
    let peer_flows = (
        peer_flows(cfg, wanted, true),
        peer_flows(cfg, wanted, false),
    );
    // Before anything there is opened, resized or unpinned: the directory is this process's.
    let grace = cfg
        .runtime
        .shutdown_grace
        .unwrap_or(udplb_config::defaults::SHUTDOWN_GRACE);
    let pin_lock = match &pin {
        Ok(dir) => Some(crate::bpf_dir::Lock::take(
            dir,
            inherited_lock,
            grace + LOCK_WAIT_BEYOND_GRACE,
        )?),
        Err(_) => None,
    };
    let pin_dir = pin_lock.as_ref().map(crate::bpf_dir::Lock::dir);
    let mut kernel = udplb_kernel::Kernel::load(sizes, cells, peer_flows, pin_dir)?;
    tracing::info!(
        max_flows,
        buckets = sizes.flows,
        buckets6 = sizes.flows6,
        mib = sizes.flow_table_bytes() >> 20,
        "kernel data plane: flow tables loaded"
    );
    // Said only now that the program loaded: where it cannot, `auto` falls back with one line.
    warn_if_not_forwarding(cfg, wanted);
    match &pin {
        Ok(dir) => {
            crate::bpf_dir::hand_to_runtime_user(cfg, dir);
            tracing::info!(
                directory = %dir.display(),
                "kernel data plane: the flow map is kept there (flows continue across \
                 restarts and upgrades)"
            );
        }
        Err((dir, why)) => tracing::warn!(
            directory = %dir.display(),
            "kernel data plane: the flow map is not kept across restarts and upgrades: {why}"
        ),
    }
    let mut interfaces: Vec<String> = wanted
        .iter()
        .flat_map(|&i| cfg.listeners[i].interfaces.iter().cloned())
        .collect();
    if interfaces.is_empty() {
        interfaces = up_interfaces();
    }
    warn_of_local_nat_backends(cfg, wanted, &methods);
    if interfaces.is_empty() {
        anyhow::bail!("no interface is up but loopback (set the listener's interfaces)");
    }
    if methods
        .iter()
        .any(|m| matches!(m, udplb_kernel::Method::Masquerade { .. }))
    {
        // Backends on this host answer a masquerade address through loopback.
        interfaces.push("lo".into());
        warn_of_ephemeral_ports(cfg, wanted);
    }
    let_loopback_take_local_backends(cfg, wanted);
    interfaces.sort();
    interfaces.dedup();
    kernel.update(&services(snap, wanted, &methods, &limit_cells, sync))?;
    let wildcard = wanted
        .iter()
        .any(|&i| cfg.listeners[i].address.ip().is_unspecified());
    if wildcard && let Err(e) = kernel.set_locals(&crate::host::Addresses::read().local) {
        tracing::error!(error = %e, "kernel data plane: this host's addresses");
    }
    kernel.attach(&interfaces)?;
    // The first count (flows kept from an earlier process, if any), before anyone asks.
    let started = Instant::now();
    let census = kernel.flow_count().run();
    let counted = started.elapsed();
    Ok(KernelPlane {
        pin_lock,
        new_flows: Mutex::new(kernel.take_new_flows()),
        kernel: Mutex::new(kernel),
        listeners: wanted.to_vec(),
        wildcard,
        interfaces,
        methods,
        limit_cells,
        sync,
        applied: AtomicU64::new(snap.generation),
        flows: Mutex::new(FlowCount {
            census: Arc::new(census),
            at: Instant::now(),
            took: counted,
            // Nobody has asked yet: no counting until someone does.
            asked: Instant::now()
                .checked_sub(FLOW_COUNT_WANTED_FOR)
                .unwrap_or_else(Instant::now),
        }),
        flows_wanted: std::sync::Condvar::new(),
        flows_counted: std::sync::Condvar::new(),
    })
}

/// The entries of the map of the peers' flows (`[sync]`) of one family (`v4`) of the `wanted`
/// listeners: as many as the peers can hold for its synced listeners (each peer at most their
/// `max_flows`), at least [`PEER_FLOWS_MIN`] and at most `[sync]`'s `max_entries`; 1 without
/// such listeners (the map must exist).
fn peer_flows(cfg: &Config, wanted: &[usize], v4: bool) -> u32 {
    let Some(s) = &cfg.sync else { return 1 };
    let peers_hold = wanted
        .iter()
        .map(|&i| &cfg.listeners[i])
        .filter(|l| {
            l.mode != SessionMode::Datagram && l.address.ip().to_canonical().is_ipv4() == v4
        })
        .map(|l| l.max_flows as usize)
        .sum::<usize>()
        .saturating_mul(s.peers.len());
    if peers_hold == 0 {
        return 1;
    }
    let entries = peers_hold.min(s.max_entries).max(PEER_FLOWS_MIN);
    u32::try_from(entries).unwrap_or(u32::MAX)
}

/// Warns when the program's route lookups will find no forwarding (per family of the kernel
/// listeners).
fn warn_if_not_forwarding(cfg: &Config, wanted: &[usize]) {
    let forwarding_off = |family: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/{family}/conf/all/forwarding"))
            .is_ok_and(|f| f.trim() == "0")
    };
    let on_ipv4 = |&i: &usize| cfg.listeners[i].address.ip().to_canonical().is_ipv4();
    let (ipv4, ipv6) = (wanted.iter().any(on_ipv4), !wanted.iter().all(on_ipv4));
    if ipv4 && forwarding_off("ipv4") {
        tracing::warn!(
            "kernel data plane: net.ipv4.ip_forward is 0, so only backends on this host are \
             reached (the program's route lookups need forwarding on, with nat and masquerade \
             alike: datagrams for other hosts are dropped as no_route); set \
             net.ipv4.ip_forward=1"
        );
    }
    if ipv6 && forwarding_off("ipv6") {
        tracing::warn!(
            "kernel data plane: net.ipv6.conf.all.forwarding is 0, so an IPv6 listener reaches \
             only backends on this host (datagrams for other hosts are dropped as no_route); \
             set net.ipv6.conf.all.forwarding=1"
        );
    }
}

/// Says so for each backend of a `nat` kernel listener that is on this host: its replies to
/// clients on other hosts leave from its own address, by the stack, and never meet the
/// program that would give them the listener's (`masquerade` reaches such a backend).
fn warn_of_local_nat_backends(cfg: &Config, wanted: &[usize], methods: &[udplb_kernel::Method]) {
    for (&i, method) in wanted.iter().zip(methods) {
        if *method != udplb_kernel::Method::Nat {
            continue;
        }
        let l = &cfg.listeners[i];
        let Some(pool) = cfg.pools.iter().find(|p| p.name == l.pool) else {
            continue;
        };
        for b in &pool.backends {
            let ip = b.spec.addr.ip();
            if on_this_host(ip) {
                tracing::warn!(
                    listener = %l.name,
                    backend = %b.spec.addr,
                    "kernel data plane: this backend is on this host: with forwarding = \"nat\" \
                     only clients on this host get its replies from the listener's address \
                     (use forwarding = \"masquerade\" for clients elsewhere)"
                );
            }
        }
    }
}

/// Per listener of `wanted` with rate limits, where their cells go in the program's table:
/// (first cell, cells per row), one listener after the other.
fn limit_layout(cfg: &Config, wanted: &[usize]) -> Vec<Option<(u32, u32)>> {
    let mut next = 0u32;
    wanted
        .iter()
        .map(|&i| {
            let limits = cfg.listeners[i].limits?;
            let first = next;
            next += udplb_kernel::limit_cells(limits.cells);
            Some((first, udplb_kernel::cells_per_row(limits.cells)))
        })
        .collect()
}

/// Per listener of `wanted`, how its pool's backends are reached (its `forwarding`).
fn methods(cfg: &Config, wanted: &[usize]) -> Vec<udplb_kernel::Method> {
    wanted
        .iter()
        .map(|&i| {
            let pool = cfg.pools.iter().find(|p| p.name == cfg.listeners[i].pool);
            match pool.map(|p| (p.forwarding, p.masquerade_ports(), p.gue_port())) {
                Some((Forwarding::Masquerade, r, _)) => udplb_kernel::Method::Masquerade {
                    first: r.first,
                    last: r.last,
                },
                Some((Forwarding::Dsr, _, gue_port)) => udplb_kernel::Method::Dsr { gue_port },
                _ => udplb_kernel::Method::Nat,
            }
        })
        .collect()
}

/// The program hands some rewritten datagrams to the stack through loopback from one of this
/// host's addresses: with masquerade, those for a backend on this host (and for a backend on
/// 127.0.0.0/8, to one); with every method, replies too big for the route onward without DF,
/// for the stack to fragment. Loopback must accept such a packet that did not leave this
/// host's own stack (`accept_local`, and `route_localnet` for 127.0.0.0/8). Set on `lo` only,
/// said in the log, and left set (an upgrade's successor relies on it).
fn let_loopback_take_local_backends(cfg: &Config, wanted: &[usize]) {
    let loopback_backend = wanted.iter().any(|&i| {
        cfg.pools
            .iter()
            .filter(|p| p.name == cfg.listeners[i].pool && p.forwarding == Forwarding::Masquerade)
            .flat_map(|p| &p.backends)
            .any(|b| b.spec.addr.ip().is_loopback())
    });
    let mut settings = vec!["accept_local"];
    if loopback_backend {
        settings.push("route_localnet");
    }
    for setting in settings {
        let path = format!("/proc/sys/net/ipv4/conf/lo/{setting}");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        match std::fs::write(&path, "1") {
            Ok(()) => tracing::info!(
                "kernel data plane: set net.ipv4.conf.lo.{setting}=1 (the program hands \
                 datagrams from this host's addresses to the stack through loopback)"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "kernel data plane: cannot set net.ipv4.conf.lo.{setting}=1: masquerade will \
                 not reach backends on this host, nor will replies without DF be fragmented"
            ),
        }
    }
}

/// Says so when a masquerade range shares ports with the host's ephemeral ports: a socket of
/// this host (udplb's health checks among them) could draw one, and its replies from the
/// backend would be taken for a client's.
fn warn_of_ephemeral_ports(cfg: &Config, wanted: &[usize]) {
    let Some(ephemeral) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some(PortRange {
                first: it.next()??,
                last: it.next()??,
            })
        })
    else {
        return;
    };
    for &i in wanted {
        let l = &cfg.listeners[i];
        let Some(pool) = cfg.pools.iter().find(|p| p.name == l.pool) else {
            continue;
        };
        let ports = pool.masquerade_ports();
        if pool.forwarding == Forwarding::Masquerade && ports.overlaps(ephemeral) {
            tracing::warn!(
                pool = %pool.name,
                masquerade_ports = %ports,
                ephemeral = %ephemeral,
                "kernel data plane: the masquerade ports overlap net.ipv4.ip_local_port_range: \
                 replies to this host's own sockets on those ports could be taken for clients' \
                 (reserve them in net.ipv4.ip_local_reserved_ports, or move either range)"
            );
        }
    }
}

/// Whether a kernel listener remembers its clients' backends (persistence, or IP affinity,
/// which the socket path remembers for the idle timeout): its program needs the persistence
/// map, sized at start.
pub fn remembers_clients(l: &udplb_config::ListenerConfig) -> bool {
    l.persistence.is_some() || l.affinity == Affinity::Ip
}

/// Every interface that is up, but loopback.
fn up_interfaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let flags = std::fs::read_to_string(e.path().join("flags")).ok()?;
            let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()?;
            let (up, loopback) = (
                flags & libc::IFF_UP as u32,
                flags & libc::IFF_LOOPBACK as u32,
            );
            (up != 0 && loopback == 0).then_some(name)
        })
        .collect()
}

/// What the program must know of the `wanted` listeners in `snap` (with their `methods` and
/// `limit_cells`, as `wanted`; `sync`: how long a peer's flow is followed, with `[sync]`).
pub fn services(
    snap: &Snapshot,
    wanted: &[usize],
    methods: &[udplb_kernel::Method],
    limit_cells: &[Option<(u32, u32)>],
    sync: Option<Duration>,
) -> Vec<udplb_kernel::Service> {
    wanted
        .iter()
        .zip(methods)
        .zip(limit_cells)
        .filter_map(|((&i, &method), &cells)| {
            let spec = snap.listeners.get(i)?;
            let pool = &snap.pools[spec.pool];
            let addr = SocketAddr::new(spec.address.ip().to_canonical(), spec.address.port());
            let backends = pool
                .backends
                .iter()
                .enumerate()
                .filter_map(|(j, b)| {
                    Some(udplb_kernel::Backend {
                        addr: specific(b.spec.addr)?,
                        keeps_flows: pool.keeps_flows(j),
                        local: on_this_host(b.spec.addr.ip()),
                    })
                })
                .collect::<Vec<_>>();
            let ring = pool.tier.maglev_backends().unwrap_or_default();
            let schedule = Tier::build(SchedulerKind::RoundRobin, &pool.backends, pool.all_down)
                .schedule_backends();
            Some(udplb_kernel::Service {
                allow: networks(spec.acl.allow()),
                deny: networks(spec.acl.deny()),
                addr,
                datagram: spec.mode == SessionMode::Datagram,
                by_ip: spec.affinity == Affinity::Ip,
                idle: spec.idle_timeout,
                persistence: spec.persistence.as_ref().map(|p| p.settings().timeout),
                backends,
                ring,
                schedule,
                method,
                limits: kernel_limits(spec.limits.as_ref().map(|l| l.settings()), cells),
                reply_ratio: spec.limits.as_ref().and_then(|l| l.reply_ratio()),
                sync: sync.filter(|_| spec.mode != SessionMode::Datagram),
            })
        })
        .collect()
}

/// A listener's rate limits as the program takes them (rates from the snapshot, so that a
/// reload changes them live; the cells where they were put at start).
fn kernel_limits(
    settings: Option<udplb_core::ratelimit::LimitSettings>,
    cells: Option<(u32, u32)>,
) -> Option<udplb_kernel::Limits> {
    let (s, (first_cell, cells)) = (settings?, cells?);
    Some(udplb_kernel::Limits {
        datagrams_per_source: s.datagrams_per_source.unwrap_or(0),
        datagrams_per_prefix: s.datagrams_per_prefix.unwrap_or(0),
        new_flows_per_source: s.new_flows_per_source.unwrap_or(0),
        new_flows_per_prefix: s.new_flows_per_prefix.unwrap_or(0),
        prefix_len: s.ipv4_prefix,
        prefix6_len: s.ipv6_prefix,
        first_cell,
        cells,
    })
}

/// Whether `ip` is one of this host's addresses (one it can bind).
fn on_this_host(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// `addr` as the kernel data plane takes it (IPv4-mapped IPv6 as IPv4), if it is a specific
/// address.
fn specific(addr: SocketAddr) -> Option<SocketAddr> {
    let ip = addr.ip().to_canonical();
    (!ip.is_unspecified()).then_some(SocketAddr::new(ip, addr.port()))
}

/// The networks of an allow or deny list, IPv4's and IPv6's, as the program's tables take them.
fn networks(set: &udplb_core::acl::CidrSet) -> Vec<(IpAddr, u8)> {
    let v4 = set
        .ipv4_networks()
        .into_iter()
        .map(|(a, l)| (IpAddr::V4(a), l));
    let v6 = set
        .ipv6_networks()
        .into_iter()
        .map(|(a, l)| (IpAddr::V6(a), l));
    v4.chain(v6).collect()
}

/// `udplb decap`: the decapsulating program on `interfaces`, for `balancers` (and GUE on
/// `gue_ports`), until SIGTERM or SIGINT (the program is detached when this returns).
pub fn decap(
    interfaces: &[String],
    balancers: &[IpAddr],
    gue_ports: &[u16],
) -> std::process::ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    if let Err(e) = stop.thread_block() {
        eprintln!("udplb decap: blocking signals: {e}");
        return std::process::ExitCode::FAILURE;
    }
    if gue_ports.len() > 16 {
        eprintln!(
            "udplb decap: at most 16 GUE ports ({} given)",
            gue_ports.len()
        );
        return std::process::ExitCode::FAILURE;
    }
    if !crate::preflight::can_load_bpf() {
        // Said plainly, rather than as the first map the kernel refuses to create.
        eprintln!(
            "udplb decap: this process has neither root nor CAP_BPF, CAP_PERFMON and \
             CAP_NET_ADMIN, which loading the program needs"
        );
        return std::process::ExitCode::FAILURE;
    }
    let decap = match udplb_kernel::Decap::attach(interfaces, balancers, gue_ports) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("udplb decap: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for &port in gue_ports {
        if udp_port_in_use(port) {
            eprintln!(
                "udplb decap: a socket on this host is bound to UDP port {port}: what the \
                 balancers send to it that starts like an IP packet is taken as GUE, not \
                 delivered (give the pool another gue_port)"
            );
        }
    }
    let from: Vec<String> = balancers.iter().map(ToString::to_string).collect();
    let gue: Vec<String> = gue_ports.iter().map(ToString::to_string).collect();
    eprintln!(
        "udplb decap: taking IP in IP{} from {} on {}",
        if gue.is_empty() {
            String::new()
        } else {
            format!(" and GUE to port {}", gue.join(","))
        },
        from.join(","),
        interfaces.join(",")
    );
    let signal = stop.wait();
    let (taken, others, gue) = decap.counts();
    eprintln!(
        "udplb decap: stopped ({}): {taken} decapsulated ({gue} in GUE), {others} from other \
         sources left to the stack",
        signal.map_or_else(|e| e.to_string(), |s| s.as_str().to_string())
    );
    std::process::ExitCode::SUCCESS
}

/// Whether a UDP socket of this network namespace is bound to `port` (/proc/net/udp and udp6:
/// `sl local_address:PORT ...`, the port in hex).
fn udp_port_in_use(port: u16) -> bool {
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                line.split_whitespace()
                    .nth(1)
                    .and_then(|local| local.rsplit_once(':'))
                    .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
                    == Some(port)
            })
        })
    })
}

/// Keeps the program told of this host's addresses (for the wildcard listeners).
struct LocalsFollower {
    wanted: bool,
    read_at: Instant,
    last: Vec<IpAddr>,
    failing: bool,
}

impl LocalsFollower {
    fn new(wanted: bool) -> LocalsFollower {
        LocalsFollower {
            wanted,
            read_at: Instant::now(),
            last: crate::host::Addresses::read().local,
            failing: false,
        }
    }

    /// Reads the addresses again when due, and writes what changed.
    fn follow(&mut self, kernel: &Mutex<udplb_kernel::Kernel>) {
        if !self.wanted || self.read_at.elapsed() < LOCALS_EVERY {
            return;
        }
        self.read_at = Instant::now();
        let now = crate::host::Addresses::read().local;
        if now == self.last && !self.failing {
            return;
        }
        let result = kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_locals(&now);
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    tracing::error!(error = %e, "kernel data plane: this host's addresses");
                }
                self.failing = true;
            }
        }
        self.last = now;
    }
}

impl KernelPlane {
    /// The lock on `runtime.bpf_dir`, when the maps are pinned there (an upgrade's successor
    /// gets a descriptor of it).
    pub fn pin_lock(&self) -> Option<&crate::bpf_dir::Lock> {
        self.pin_lock.as_ref()
    }

    /// Follows the published snapshots for as long as udplb runs: each new generation's
    /// health, drain, weights and backends go to the maps.
    pub fn follow(self: Arc<Self>, shared: Arc<ArcSwap<Snapshot>>) {
        let mut applied = shared.load().generation;
        let mut failing = false;
        let mut locals = LocalsFollower::new(self.wildcard);
        loop {
            std::thread::sleep(FOLLOW_EVERY);
            locals.follow(&self.kernel);
            let snap = shared.load_full();
            if snap.generation == applied {
                continue;
            }
            let result = self
                .kernel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .update(&services(
                    &snap,
                    &self.listeners,
                    &self.methods,
                    &self.limit_cells,
                    self.sync,
                ));
            match result {
                Ok(()) => {
                    applied = snap.generation;
                    self.applied.store(applied, Ordering::Relaxed);
                    if failing {
                        tracing::info!("kernel data plane: maps updated again");
                        failing = false;
                    }
                }
                Err(e) if !failing => {
                    tracing::error!(error = %e, "kernel data plane: updating the maps failed (retried)");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Each backend's traffic through listener `service` (by its place in `listeners`).
    pub fn traffic(&self, service: usize) -> Vec<(SocketAddr, udplb_kernel::Traffic)> {
        self.kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .traffic(service)
    }

    /// Per backend address, what the kernel saw of it, summed over the kernel listeners:
    /// ICMP errors about datagrams sent to it (passive failures) and replies (passive
    /// successes).
    pub fn passive(&self) -> std::collections::HashMap<SocketAddr, (u64, u64)> {
        let mut out = std::collections::HashMap::new();
        for id in 0..self.listeners.len() {
            for (addr, t) in self.traffic(id) {
                let e: &mut (u64, u64) = out.entry(addr).or_default();
                e.0 += t.icmp_errors;
                e.1 += t.reply_packets;
            }
        }
        out
    }

    /// The `kernel` object of `/stats`: the interfaces, per listener each backend's traffic
    /// through the kernel and the live flows (`flows`, as [`KernelPlane::flows`] gave them),
    /// and what the program did not forward.
    pub fn json(
        &self,
        snap: &Snapshot,
        (flows, age, took): &(Arc<FlowCensus>, Duration, Duration),
    ) -> serde_json::Value {
        let listeners: Vec<serde_json::Value> = self
            .listeners
            .iter()
            .enumerate()
            .map(|(id, &li)| {
                let live = flows.per_listener.get(id);
                let backends: Vec<serde_json::Value> = self
                    .traffic(id)
                    .into_iter()
                    .map(|(addr, t)| {
                        serde_json::json!({
                            "address": addr.to_string(),
                            "datagrams": t.packets,
                            "bytes": t.bytes,
                            "replies": t.reply_packets,
                            "reply_bytes": t.reply_bytes,
                            "icmp_errors": t.icmp_errors,
                            "persistence_returns": t.persisted,
                            "flows_created": t.flows,
                            "flows": live.and_then(|m| m.get(&addr)).copied().unwrap_or(0),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "listener": snap.listeners.get(li).map(|l| l.name.as_str()),
                    "forwarding": self.methods.get(id).map(|m| m.name()),
                    "encapsulation": self.methods.get(id).and_then(|m| m.encapsulation()),
                    "flows": flows.of_listener(id),
                    "backends": backends,
                })
            })
            .collect();
        let d = self.drops();
        serde_json::json!({
            "generation": self.applied.load(Ordering::Relaxed),
            "interfaces": self.interfaces,
            "listeners": listeners,
            "drops": {
                "no_backend": d.no_backend,
                "ttl": d.ttl,
                "no_route": d.no_route,
                "rewrite": d.rewrite,
                "denied": d.denied,
                "no_port": d.no_port,
                "too_big": d.too_big,
                "rate_limited": d.rate_limited,
                "flow_rate_limited": d.flow_rate_limited,
                "amplification": d.amplification,
                "flow_gone": d.flow_gone,
            },
            "fragments_passed": d.fragments_passed,
            "forged_passed": d.forged,
            "oversize_passed": d.oversize_passed,
            "cut_for_tunnel": d.cut_for_tunnel,
            "flows_replaced": d.flows_replaced,
            "flow_table_slots": {"ipv4": flows.slots.0, "ipv6": flows.slots.1},
            "flow_count": {"age_ms": age.as_millis() as u64, "took_ms": took.as_millis() as u64},
        })
    }

    /// The live flows in the kernel flow tables, per listener (as `listeners`) and backend,
    /// as last counted, how old that count is and how long it took. Asking wakes the counting
    /// thread if it had stopped for want of readers; a count older than the pause after it
    /// (counting had stopped) is waited for anew, for at most twice as long as the last one
    /// took and a second, so that a first `ctl status` after a quiet while is not stale.
    pub fn flows(&self) -> (Arc<FlowCensus>, Duration, Duration) {
        let mut last = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        let asked = Instant::now();
        last.asked = asked;
        self.flows_wanted.notify_one();
        if asked >= last.due() {
            let deadline = asked + (last.took * 2 + Duration::from_millis(100)).min(MAX_WAIT);
            let made = last.at;
            while last.at == made {
                let Some(wait) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                last = self
                    .flows_counted
                    .wait_timeout(last, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        (last.census.clone(), last.at.elapsed(), last.took)
    }

    /// Counts the live flows for as long as udplb runs, while someone asks for them: each
    /// count reads every slot of the tables without holding the maps from updates, then
    /// waits [`FLOW_COUNT_PAUSE_FACTOR`] times as long as it took.
    pub fn count_flows(self: Arc<Self>) {
        loop {
            let mut last = self.flows.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.due();
            loop {
                let now = Instant::now();
                let wanted = now.duration_since(last.asked) < FLOW_COUNT_WANTED_FOR;
                if now >= due && wanted {
                    break;
                }
                let wait = if now < due {
                    due - now
                } else {
                    FLOW_COUNT_WANTED_FOR
                };
                last = self
                    .flows_wanted
                    .wait_timeout(last, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            drop(last);
            let count = self
                .kernel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .flow_count();
            let started = Instant::now();
            let census = Arc::new(count.run());
            let took = started.elapsed();
            let mut last = self.flows.lock().unwrap_or_else(|p| p.into_inner());
            last.census = census;
            last.at = Instant::now();
            last.took = took;
            self.flows_counted.notify_all();
        }
    }

    /// The backend the program's persistence would send a new flow of `client` on listener
    /// `li` (a snapshot index) to, if it remembers one.
    pub fn remembered(&self, li: usize, client: SocketAddr) -> Option<SocketAddr> {
        self.on_listener(li, |k, id| k.remembered(id, client))
    }

    /// `ask` of the loaded program, with listener `li`'s service id (`None` for a listener
    /// the program does not serve).
    fn on_listener<T>(
        &self,
        li: usize,
        ask: impl FnOnce(&mut udplb_kernel::Kernel, usize) -> Option<T>,
    ) -> Option<T> {
        let id = self.listeners.iter().position(|&l| l == li)?;
        ask(
            &mut self.kernel.lock().unwrap_or_else(|p| p.into_inner()),
            id,
        )
    }

    /// The live flow of `client` on listener `li` (a snapshot index) in the kernel's flow
    /// table: its backend and how long it has been idle.
    pub fn flow_of(&self, li: usize, client: SocketAddr) -> Option<(SocketAddr, Duration)> {
        self.on_listener(li, |k, id| k.flow_of(id, client))
    }

    /// `[sync]`: the flows to tell the peers about into `out`: the new flows the program
    /// told since the last call, and the live flows of part `part` of `parts` of the flow
    /// tables (reading every part in turn renews every live flow once).
    pub fn synced_flows(&self, part: usize, parts: usize, out: &mut Vec<Placement>) {
        let mut flows = Vec::new();
        if let Some(new_flows) = self
            .new_flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            new_flows.drain(&mut flows);
        }
        let count = self
            .kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flow_count();
        count.synced_flows(part, parts, &mut flows);
        out.extend(flows.into_iter().filter_map(|(id, client, backend)| {
            Some(Placement {
                listener: u16::try_from(*self.listeners.get(id)?).ok()?,
                client,
                backend,
            })
        }));
    }

    /// `[sync]`: the backend a peer instance has `client`'s flow on, on listener `li` (a
    /// snapshot index), as the program would follow it (learned within the listener's window).
    pub fn peer_flow(&self, li: usize, client: SocketAddr) -> Option<SocketAddr> {
        self.on_listener(li, |k, id| k.peer_flow(id, client))
    }

    /// `[sync]`: a peer has `p.client`'s flow on `p.backend`; a new flow of that client on
    /// this kernel listener opens there (while the backend keeps flows). `false` for a
    /// listener the program does not serve or sync.
    pub fn learn(&self, p: &Placement) -> bool {
        self.on_listener(usize::from(p.listener), |k, id| {
            k.learn(id, p.client, p.backend).then_some(())
        })
        .is_some()
    }

    /// What the program did not forward, by reason.
    pub fn drops(&self) -> udplb_kernel::Drops {
        self.kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drops()
    }
}

#[cfg(test)]
mod tests {
    use super::{PEER_FLOWS_MIN, peer_flows, udp_port_in_use};

    /// The map of the peers' flows holds what the peers can hold for each family's synced
    /// kernel listeners (datagram mode syncs nothing), within `[sync]`'s bounds.
    #[test]
    fn the_peers_flows_map_is_sized_by_what_the_peers_hold() {
        let listener = |name: &str, address: &str, pool: &str, extra: &str| {
            format!(
                "[listeners.{name}]\naddress = \"{address}\"\npool = \"{pool}\"\n\
                 dataplane = \"kernel\"\n{extra}\n"
            )
        };
        let config = |sync: &str| {
            let mut toml = String::new();
            toml += &listener("a", "10.0.0.1:53", "pa", "max_flows = 1000");
            toml += &listener("b", "10.0.0.2:53", "pb", "max_flows = 2000");
            toml += &listener("c", "10.0.0.3:53", "pc", "mode = \"datagram\"");
            toml += &listener("d", "[fd00::1]:53", "pd", "max_flows = 100");
            for (pool, backend) in [
                ("pa", "10.1.0.1:53"),
                ("pb", "10.1.0.2:53"),
                ("pc", "10.1.0.3:53"),
                ("pd", "[fd00::b]:53"),
            ] {
                toml += &format!("[pools.{pool}]\nbackends = [\"{backend}\"]\n");
            }
            toml += sync;
            udplb_config::parse(&toml, "t.toml").unwrap()
        };
        let synced = config(
            "[sync]\nlisten = \"10.0.0.1:7946\"\npeers = [\"10.0.0.8:7946\", \
             \"10.0.0.9:7946\"]\nkey_file = \"/k\"\nmax_entries = 5000\n",
        );
        let all = [0, 1, 2, 3];
        // IPv4: (1,000 + 2,000) x 2 peers, capped at max_entries; IPv6: 100 x 2, raised.
        assert_eq!(peer_flows(&synced, &all, true), 5000);
        assert_eq!(peer_flows(&synced, &[0], true), 2000);
        assert_eq!(peer_flows(&synced, &all, false) as usize, PEER_FLOWS_MIN);
        // No synced listener of the family (datagram mode only), or no [sync]: one entry.
        assert_eq!(peer_flows(&synced, &[2, 3], true), 1);
        assert_eq!(peer_flows(&config(""), &all, true), 1);
    }

    #[test]
    fn a_bound_udp_port_is_seen_in_use_and_then_free() {
        for ip in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(socket) = std::net::UdpSocket::bind(ip) else {
                continue; // no IPv6 here
            };
            let port = socket.local_addr().unwrap().port();
            assert!(udp_port_in_use(port), "{ip}");
            drop(socket);
            assert!(!udp_port_in_use(port), "{ip}: freed");
        }
    }
}
