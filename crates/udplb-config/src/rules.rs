//! The rules a configuration must follow beyond its syntax: ranges, references between
//! sections, and conflicts. Shared by the file parser and the one-liner.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use udplb_core::payload::KeySpec;
use udplb_core::{BackendSpec, ProxyHeader, SchedulerKind, SessionMode};

use crate::defaults;
use crate::model::{
    Config, Encapsulation, FlowSync, Forwarding, HealthCheck, ListenerConfig, PoolConfig,
};

/// A broken rule, located by key path.
#[derive(Debug)]
pub(crate) struct Problem {
    pub key: String,
    pub message: String,
    /// The table (`pools.NAME`) the rule is about when it is not the key's own.
    pub refers_to: Option<String>,
}

fn problem(key: String, message: impl Into<String>) -> Problem {
    Problem {
        key,
        message: message.into(),
        refers_to: None,
    }
}

/// Every broken rule of `cfg`.
pub(crate) fn check(cfg: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(g) = cfg.runtime.shutdown_grace {
        check_duration(
            &mut out,
            "runtime.shutdown_grace".into(),
            g,
            defaults::SHUTDOWN_GRACE_RANGE,
        );
    }
    if let Some(a) = &cfg.announce {
        check_duration(
            &mut out,
            "announce.withdraw_delay".into(),
            a.withdraw_delay,
            defaults::WITHDRAW_DELAY_RANGE,
        );
    }
    if let Some(s) = &cfg.sync {
        check_sync(&mut out, s, &cfg.listeners);
    }
    if let Some(w) = cfg.runtime.workers {
        check_range(
            &mut out,
            "runtime.workers".into(),
            w,
            defaults::WORKERS_RANGE,
        );
    }
    if let Some(admin) = &cfg.admin {
        check_port(&mut out, "admin.listen".into(), admin.listen);
        if admin.allow_changes
            && admin.token_file.is_none()
            && !admin.listen.ip().to_canonical().is_loopback()
        {
            out.push(problem(
                "admin.allow_changes".into(),
                format!(
                    "changes on an admin endpoint other than loopback ({}) need a token, or \
                     anyone who reaches it could change the backends: set admin.token_file \
                     (--admin-token-file) to a file only udplb's user can read",
                    admin.listen
                ),
            ));
        }
    }
    if cfg.listeners.is_empty() {
        out.push(problem(
            "listeners".into(),
            "no listener configured: add a [listeners.NAME] table",
        ));
    }
    for (i, l) in cfg.listeners.iter().enumerate() {
        check_listener(&mut out, cfg, l, &cfg.listeners[..i]);
    }
    for p in &cfg.pools {
        check_pool(&mut out, p, &cfg.listeners);
    }
    check_kernel(&mut out, cfg);
    out
}

/// Why the kernel data plane cannot do it yet: done in user space.
const USER_SPACE: &str = "not built in the kernel data plane yet";

/// Listeners the kernel data plane may serve (`dataplane = "kernel"` or `"auto"`) and their
/// pools ask only for what it does (docs/kernel.md): it forwards one address (or this host's,
/// a wildcard) to backends of the same IP family placed by Maglev, and tells replies
/// apart by their backend's address. `auto` is held to the same rules as `kernel`, so that a configuration means the
/// same whichever data plane ends up serving it.
fn check_kernel(out: &mut Vec<Problem>, cfg: &Config) {
    let mut count = 0;
    // Pool name -> the kernel listener it serves; backend address -> (listener, pool).
    let mut pools: HashMap<&str, &str> = HashMap::new();
    let mut backends: HashMap<SocketAddr, (&str, &str)> = HashMap::new();
    for l in &cfg.listeners {
        let key = |k: &str| format!("listeners.{}.{k}", l.name);
        if !l.dataplane.may_use_kernel() {
            if !l.interfaces.is_empty() {
                out.push(problem(
                    key("interfaces"),
                    "only with dataplane = \"kernel\" or \"auto\" (the interfaces the kernel \
                     data plane's programs attach to)",
                ));
            }
            continue;
        }
        count += 1;
        if count > defaults::KERNEL_LISTENERS_MAX {
            out.push(problem(
                key("dataplane"),
                format!(
                    "listener {count} with dataplane = \"kernel\" or \"auto\": the kernel data \
                     plane serves at most {}",
                    defaults::KERNEL_LISTENERS_MAX
                ),
            ));
        }
        let dataplane = format!("dataplane = {:?}", l.dataplane.name());
        check_kernel_listener(out, l, &dataplane);
        let Some(p) = cfg.pools.iter().find(|p| p.name == l.pool) else {
            continue;
        };
        if let Some(first) = pools.insert(&p.name, &l.name) {
            out.push(problem(
                key("pool"),
                format!(
                    "pool {:?} also serves listeners.{first}, and both may use the kernel data \
                     plane: it maps replies back to their listener by the backend's address \
                     (give each listener its own backends)",
                    p.name
                ),
            ));
            continue;
        }
        check_kernel_pool(out, p, l, &dataplane);
        for (i, b) in p.backends.iter().enumerate() {
            let addr = b.spec.addr;
            match backends.get(&addr) {
                Some((other, pool)) if *other != l.name => out.push(problem(
                    format!("pools.{}.backends[{i}].address", p.name),
                    format!(
                        "{addr} is also a backend of listeners.{other} (pool {pool:?}), and both \
                         may use the kernel data plane: it maps replies back to their listener \
                         by the backend's address"
                    ),
                )),
                Some(_) => {}
                None => {
                    backends.insert(addr, (&l.name, &p.name));
                }
            }
        }
    }
}

/// What a listener of the kernel data plane cannot have.
fn check_kernel_listener(out: &mut Vec<Problem>, l: &ListenerConfig, dataplane: &str) {
    let key = |k: &str| format!("listeners.{}.{k}", l.name);
    let mut refuse = |k: &str, why: &str| {
        out.push(problem(key(k), format!("not with {dataplane} ({why})")));
    };
    if matches!(l.mode, SessionMode::RequestResponse { .. }) {
        refuse(
            "mode",
            "replies are counted per request in user space; use \"flow\" or \"datagram\"",
        );
    }
    if l.proxy_protocol {
        refuse(
            "proxy_protocol",
            &format!("PROXY headers are read in user space; {USER_SPACE}"),
        );
    }
    if let Some(limits) = &l.limits {
        if limits.reply_ratio.is_some() && l.mode == SessionMode::Datagram {
            refuse(
                "limits.reply_ratio",
                "in datagram mode the kernel data plane keeps no flows to count replied bytes by",
            );
        }
        if l.mode == SessionMode::Datagram {
            for (k, set) in [
                ("new_flows_per_source", limits.new_flows_per_source),
                ("new_flows_per_prefix", limits.new_flows_per_prefix),
            ] {
                if set.is_some() {
                    refuse(
                        &format!("limits.{k}"),
                        "in datagram mode the kernel data plane keeps no flows to count new \
                         ones by; limit datagrams_per_source or datagrams_per_prefix",
                    );
                }
            }
        }
    }
    if l.abuse_pool.is_some() {
        refuse(
            "abuse_pool",
            &format!("clients are diverted in user space; {USER_SPACE}"),
        );
    }
    if l.shared_upstream {
        refuse(
            "shared_upstream",
            "upstream sockets are shared in user space; the kernel data plane forwards without \
             sockets",
        );
    }
    let mut seen = HashSet::new();
    for (i, name) in l.interfaces.iter().enumerate() {
        if !seen.insert(name) {
            out.push(problem(
                key(&format!("interfaces[{i}]")),
                format!("{name:?} is listed twice"),
            ));
        }
    }
}

/// What the pool of listener `l` of the kernel data plane cannot have.
fn check_kernel_pool(out: &mut Vec<Problem>, p: &PoolConfig, l: &ListenerConfig, dataplane: &str) {
    let key = |k: &str| format!("pools.{}.{k}", p.name);
    let serves = format!("listeners.{} ({dataplane})", l.name);
    if p.scheduler != SchedulerKind::Maglev {
        out.push(problem(
            key("scheduler"),
            format!(
                "{:?} cannot serve {serves}: the kernel data plane places with \"maglev\"",
                p.scheduler.name()
            ),
        ));
    }
    if l.address.ip().is_unspecified()
        && l.mode == SessionMode::Datagram
        && p.forwarding == Forwarding::Nat
    {
        out.push(problem(
            format!("listeners.{}.address", l.name),
            format!(
                "a wildcard address not with mode = \"datagram\" and forwarding = \"nat\" \
                 (pool {:?}) on the kernel data plane: a reply must come from the address its \
                 client sent to, and in datagram mode the program keeps no flow to know it by \
                 (give a specific address, or use flow mode, or forwarding = \"masquerade\" or \
                 \"dsr\")",
                p.name
            ),
        ));
    }
    let mut refuse = |k: &str, why: &str| {
        out.push(problem(key(k), format!("not for {serves}: {why}")));
    };
    if p.proxy_protocol != ProxyHeader::Off {
        refuse(
            "proxy_protocol",
            &format!("PROXY headers are written in user space; {USER_SPACE}"),
        );
    }
    if p.strip_reply_proxy {
        refuse(
            "strip_reply_proxy",
            &format!("PROXY headers are removed in user space; {USER_SPACE}"),
        );
    }
    if p.transparent {
        refuse(
            "transparent",
            "it makes sockets send from the client's address; the kernel data plane needs no \
             sockets, and with forwarding = \"nat\" keeps the client's address already",
        );
    }
    if p.payload_key.is_some() {
        refuse(
            "payload_key",
            &format!("keys are read from datagrams in user space; {USER_SPACE}"),
        );
    }
    if p.backends.len() > defaults::KERNEL_POOL_BACKENDS_MAX {
        out.push(problem(
            key("backends"),
            format!(
                "{} backends, but a pool of {serves} has at most {}",
                p.backends.len(),
                defaults::KERNEL_POOL_BACKENDS_MAX
            ),
        ));
    }
    let ipv6 = !l.address.ip().to_canonical().is_ipv4();
    for (i, b) in p.backends.iter().enumerate() {
        if b.spec.addr.ip().to_canonical().is_ipv4() == ipv6 {
            out.push(problem(
                key(&format!("backends[{i}].address")),
                format!(
                    "{} is not for {serves}: the kernel data plane forwards to backends of the \
                     listener's IP family ({}); it does not translate between IPv4 and IPv6",
                    b.spec.addr,
                    if ipv6 { "IPv6" } else { "IPv4" }
                ),
            ));
        }
    }
}

/// `[sync]`: a bounded interval and table, a port of its own, and peers that are other hosts'
/// addresses of the same family as `listen`, each once.
fn check_sync(out: &mut Vec<Problem>, s: &FlowSync, listeners: &[ListenerConfig]) {
    check_duration(
        out,
        "sync.interval".into(),
        s.interval,
        defaults::SYNC_INTERVAL_RANGE,
    );
    check_range(
        out,
        "sync.max_entries".into(),
        s.max_entries,
        defaults::SYNC_MAX_ENTRIES_RANGE,
    );
    check_port(out, "sync.listen".into(), s.listen);
    if let Some(l) = listeners
        .iter()
        .find(|l| addresses_conflict(l.address, s.listen))
    {
        out.push(problem(
            "sync.listen".into(),
            format!(
                "{} conflicts with listener {:?} on {}",
                s.listen, l.name, l.address
            ),
        ));
    }
    if s.peers.is_empty() {
        out.push(problem("sync.peers".into(), "give at least one peer"));
    }
    let family = |a: &SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut seen = HashSet::new();
    for (i, &peer) in s.peers.iter().enumerate() {
        let key = format!("sync.peers[{i}]");
        check_port(out, key.clone(), peer);
        if peer.ip().is_unspecified() {
            out.push(problem(
                key.clone(),
                format!("{peer}: a peer needs a concrete address, not a wildcard"),
            ));
        } else if is_own_sync_address(peer, s.listen) {
            out.push(problem(
                key.clone(),
                format!("is this instance's own sync.listen ({})", s.listen),
            ));
        }
        if peer.is_ipv4() != s.listen.is_ipv4() {
            out.push(problem(
                key.clone(),
                format!(
                    "an {} address, but sync.listen is {} ({})",
                    family(&peer),
                    family(&s.listen),
                    s.listen
                ),
            ));
        }
        if !seen.insert(peer) {
            out.push(problem(key, format!("{peer} is listed twice")));
        }
    }
}

/// Whether a message sent to `peer` would come back to this instance's `listen`: the same
/// address, or loopback on the port of a wildcard `listen`.
fn is_own_sync_address(peer: SocketAddr, listen: SocketAddr) -> bool {
    peer == listen
        || (listen.ip().is_unspecified()
            && listen.is_ipv4() == peer.is_ipv4()
            && listen.port() == peer.port()
            && peer.ip().is_loopback())
}

/// `shared_upstream`: a socket shared by flows sends from udplb's own address to whichever
/// backend a flow has, and carries no train.
fn check_shared_upstream(out: &mut Vec<Problem>, cfg: &Config, l: &ListenerConfig, key: String) {
    let why = if l.mode == SessionMode::Datagram {
        Some("not with mode = \"datagram\" (each client needs a socket for all backends)")
    } else if l.gro {
        Some("not with gro = true")
    } else {
        None
    };
    if let Some(why) = why {
        out.push(problem(key.clone(), why.to_string()));
    }
    let transparent = cfg
        .pools
        .iter()
        .filter(|p| p.transparent)
        .find(|p| p.name == l.pool || l.abuse_pool.as_ref() == Some(&p.name));
    if let Some(p) = transparent {
        out.push(problem(
            key,
            format!(
                "not with the transparent pool {:?} (its sockets are bound to the client's address)",
                p.name
            ),
        ));
    }
}

/// TCP beside a listener is proxied connection by connection, from udplb's address, with no
/// header: pools that send from the client's address or put a PROXY header in front are
/// for datagrams only.
fn check_tcp(out: &mut Vec<Problem>, cfg: &Config, l: &ListenerConfig, key: String) {
    let Some(pool) = cfg.pools.iter().find(|p| p.name == l.pool) else {
        return;
    };
    let why = if pool.transparent {
        Some("transparent = true")
    } else if pool.proxy_protocol != udplb_core::ProxyHeader::Off {
        Some("proxy_protocol")
    } else {
        None
    };
    if let Some(why) = why {
        out.push(problem(
            key,
            format!(
                "not with pool {:?}'s {why}: TCP connections are proxied from udplb's own \
                 address, without a PROXY header",
                pool.name
            ),
        ));
    }
}

fn check_listener(
    out: &mut Vec<Problem>,
    cfg: &Config,
    l: &ListenerConfig,
    earlier: &[ListenerConfig],
) {
    let key = |k: &str| format!("listeners.{}.{k}", l.name);
    check_port(out, key("address"), l.address);
    if let Some(other) = earlier
        .iter()
        .find(|o| addresses_conflict(o.address, l.address))
    {
        out.push(problem(
            key("address"),
            format!(
                "{} conflicts with listener {:?} on {}",
                l.address, other.name, other.address
            ),
        ));
    }
    if !cfg.pools.iter().any(|p| p.name == l.pool) {
        let known: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
        let mut p = problem(
            key("pool"),
            format!("no pool named {:?} (pools: {})", l.pool, list(&known)),
        );
        p.refers_to = Some(format!("pools.{}", l.pool));
        out.push(p);
    }
    if let Some(abuse) = &l.abuse_pool {
        if !cfg.pools.iter().any(|p| &p.name == abuse) {
            let known: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
            out.push(problem(
                key("abuse_pool"),
                format!("no pool named {abuse:?} (pools: {})", list(&known)),
            ));
        } else if abuse == &l.pool {
            out.push(problem(
                key("abuse_pool"),
                "must differ from the listener's own pool".to_string(),
            ));
        }
    }
    if let SessionMode::RequestResponse { responses } = l.mode {
        check_range(out, key("responses"), responses, defaults::RESPONSES_RANGE);
        check_duration(
            out,
            key("reply_timeout"),
            l.reply_timeout,
            defaults::REPLY_TIMEOUT_RANGE,
        );
    }
    if l.gro && l.mode != SessionMode::Flow {
        out.push(problem(
            key("gro"),
            format!(
                "only with mode = \"flow\" (this listener's mode is {:?}): a train of datagrams \
                 goes to one backend",
                l.mode.name()
            ),
        ));
    }
    if l.shared_upstream {
        check_shared_upstream(out, cfg, l, key("shared_upstream"));
    }
    if l.tcp == Some(true) {
        check_tcp(out, cfg, l, key("tcp"));
    }
    check_duration(
        out,
        key("idle_timeout"),
        l.idle_timeout,
        defaults::IDLE_TIMEOUT_RANGE,
    );
    if let Some(d) = l.persistence {
        check_duration(out, key("persistence"), d, defaults::PERSISTENCE_RANGE);
    }
    check_range(
        out,
        key("max_flows"),
        l.max_flows,
        defaults::MAX_FLOWS_RANGE,
    );
    check_range(
        out,
        key("max_datagram_size"),
        l.max_datagram_size,
        defaults::MAX_DATAGRAM_SIZE_RANGE,
    );
    check_range(
        out,
        key("socket_buffer"),
        l.socket_buffer,
        defaults::SOCKET_BUFFER_RANGE,
    );
}

/// A pool's payload key: a hashed key needs a consistent-hash scheduler (a hash that the
/// scheduler ignores places nothing), and every listener served by the pool must place each
/// datagram on its own (in flow modes a key would place only a flow's first datagram).
fn check_payload_key(
    out: &mut Vec<Problem>,
    p: &PoolConfig,
    k: &KeySpec,
    listeners: &[ListenerConfig],
) {
    let key = format!("pools.{}.payload_key", p.name);
    if k.hashes() && !p.scheduler.is_consistent_hash() {
        out.push(problem(
            format!("{key}.kind"),
            format!(
                "kind {:?} places datagrams by a hash of their key: the pool needs scheduler = \
                 \"maglev\" or \"rendezvous\" (it has {:?})",
                k.kind(),
                p.scheduler.name()
            ),
        ));
    }
    if let KeySpec::Radius { state_timeout, .. } = k {
        check_duration(
            out,
            format!("{key}.state_timeout"),
            *state_timeout,
            defaults::STATE_TIMEOUT_RANGE,
        );
    }
    if let KeySpec::QuicLb { config, servers } = k {
        check_server_ids(out, p, &key, usize::from(config.server_id_length), servers);
    }
    for l in listeners {
        let serves = l.pool == p.name || l.abuse_pool.as_deref() == Some(p.name.as_str());
        let fits = match l.mode {
            SessionMode::Datagram => true,
            SessionMode::Flow => k.fits_flows(),
            SessionMode::RequestResponse { .. } => false,
        };
        if serves && !fits {
            let needs = if k.fits_flows() {
                "mode = \"flow\" or \"datagram\""
            } else {
                "mode = \"datagram\" (a key places each datagram on its own)"
            };
            out.push(problem(
                key.clone(),
                format!(
                    "listener {:?} (mode {:?}) uses this pool: kind {:?} needs {needs}",
                    l.name,
                    l.mode.name(),
                    k.kind()
                ),
            ));
        }
    }
}

/// QUIC-LB server IDs: one per backend of the pool, each of the configured length, no two
/// alike (a backend without one accepts connections no balancer could route after the client
/// moves).
fn check_server_ids(
    out: &mut Vec<Problem>,
    p: &PoolConfig,
    key: &str,
    length: usize,
    servers: &[(SocketAddr, Vec<u8>)],
) {
    let ids = format!("{key}.server_ids");
    for (addr, id) in servers {
        if !p.backends.iter().any(|b| b.spec.addr == *addr) {
            out.push(problem(
                format!("{ids}.{addr}"),
                format!("{addr} is not a backend of pool {:?}", p.name),
            ));
        }
        if id.len() != length {
            out.push(problem(
                format!("{ids}.{addr}"),
                format!("{} bytes, but server_id_length = {length}", id.len()),
            ));
        }
        if servers.iter().filter(|(_, other)| other == id).count() > 1 {
            out.push(problem(
                format!("{ids}.{addr}"),
                "the same server ID as another backend".to_string(),
            ));
        }
    }
    for b in &p.backends {
        if !servers.iter().any(|(a, _)| *a == b.spec.addr) {
            out.push(problem(
                ids.clone(),
                format!(
                    "backend {} has no server ID: the connections it accepts could not be \
                     routed back to it once a client changes address",
                    b.spec.addr
                ),
            ));
        }
    }
}

/// Two listeners conflict on the same port when their addresses are equal or one is the
/// wildcard of the other's family.
fn addresses_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn check_pool(out: &mut Vec<Problem>, p: &PoolConfig, listeners: &[ListenerConfig]) {
    if !p.slow_start.is_zero() && p.scheduler.is_consistent_hash() {
        let kernel = listeners
            .iter()
            .find(|l| l.pool == p.name && l.dataplane.may_use_kernel())
            .map(|l| format!(" (the kernel data plane's, for listeners.{})", l.name))
            .unwrap_or_default();
        out.push(problem(
            format!("pools.{}.slow_start", p.name),
            format!(
                "not with scheduler {:?}{kernel}: a consistent hash places a client by the \
                 backends alone, the same on every worker and every udplb instance; a weight \
                 that ramps would move clients while it lasts",
                p.scheduler.name()
            ),
        ));
    }
    if p.forwarding == Forwarding::Dsr {
        check_dsr_ports(out, p, listeners);
        check_dsr_reply_ratio(out, p, listeners);
    }
    if p.encapsulation.is_some() && p.forwarding != Forwarding::Dsr {
        out.push(problem(
            format!("pools.{}.encapsulation", p.name),
            format!(
                "only with forwarding = \"dsr\" (this pool forwards with {:?})",
                p.forwarding.name()
            ),
        ));
    }
    if let Some(port) = p.gue_port() {
        check_gue_port(out, p, port, listeners);
    }
    if p.gue_port.is_some() && p.encapsulation != Some(Encapsulation::Gue) {
        out.push(problem(
            format!("pools.{}.gue_port", p.name),
            "only with encapsulation = \"gue\" (and forwarding = \"dsr\")",
        ));
    }
    if p.masquerade_ports.is_some() && p.forwarding != Forwarding::Masquerade {
        out.push(problem(
            format!("pools.{}.masquerade_ports", p.name),
            format!(
                "only with forwarding = \"masquerade\" (this pool forwards with {:?})",
                p.forwarding.name()
            ),
        ));
    }
    check_duration(
        out,
        format!("pools.{}.slow_start", p.name),
        p.slow_start,
        Duration::ZERO..=Duration::from_secs(3600),
    );
    if let Some(h) = &p.health {
        check_health(out, &format!("pools.{}.health", p.name), h);
    }
    if let Some(k) = &p.payload_key {
        check_payload_key(out, p, k, listeners);
    }
    let key = format!("pools.{}.backends", p.name);
    if p.backends.is_empty() {
        out.push(problem(key, "a pool needs at least one backend"));
        return;
    }
    if p.backends.iter().all(|b| b.spec.backup) {
        out.push(problem(
            key.clone(),
            "every backend is a backup: at least one must be a primary",
        ));
    }
    let mut seen = HashSet::new();
    for (i, b) in p.backends.iter().enumerate() {
        let bkey = format!("{key}[{i}]");
        check_port(out, format!("{bkey}.address"), b.spec.addr);
        if b.spec.addr.ip().is_unspecified() {
            out.push(problem(
                format!("{bkey}.address"),
                "a backend needs a concrete address, not a wildcard",
            ));
        }
        if let Some(why) = unreachable_backend(b.spec.addr, listeners) {
            out.push(problem(format!("{bkey}.address"), why));
        }
        if !seen.insert(b.spec.addr) {
            out.push(problem(
                format!("{bkey}.address"),
                format!("{} is listed twice in this pool", b.spec.addr),
            ));
        }
        check_range(
            out,
            format!("{bkey}.weight"),
            b.spec.weight,
            1..=BackendSpec::MAX_WEIGHT,
        );
    }
}

/// GUE arrives at the backends on `port`, where `udplb decap` takes whatever the balancers send
/// that looks like an IP packet: not a port they also serve clients or health checks on (a
/// query or probe from the balancer's address starting with byte 0x4_ or 0x6_ would be taken
/// apart as GUE).
fn check_gue_port(out: &mut Vec<Problem>, p: &PoolConfig, port: u16, listeners: &[ListenerConfig]) {
    let key = if p.gue_port.is_some() {
        format!("pools.{}.gue_port", p.name)
    } else {
        format!("pools.{}.encapsulation", p.name)
    };
    if let Some(l) = listeners
        .iter()
        .find(|l| l.pool == p.name && l.address.port() == port)
    {
        out.push(problem(
            key,
            format!(
                "GUE port {port} is listeners.{}'s port, which the backends serve with dsr: \
                 choose another gue_port",
                l.name
            ),
        ));
        return;
    }
    let checked = p
        .backends
        .iter()
        .filter_map(|b| b.check(p))
        .filter_map(|h| h.port)
        .find(|&checked| checked == port);
    if checked.is_some() {
        out.push(problem(
            key,
            format!(
                "GUE port {port} is the health check's port on the backends: choose another \
                 gue_port"
            ),
        ));
    }
}

/// Direct server return leaves the datagram as the client sent it: each backend answers on the
/// port of every listener the pool serves.
/// With direct server return the replies never pass the balancer: a reply ratio could not be
/// held.
fn check_dsr_reply_ratio(out: &mut Vec<Problem>, p: &PoolConfig, listeners: &[ListenerConfig]) {
    for l in listeners.iter().filter(|l| l.pool == p.name) {
        if l.limits.as_ref().is_some_and(|x| x.reply_ratio.is_some()) {
            out.push(problem(
                format!("listeners.{}.limits.reply_ratio", l.name),
                format!(
                    "not with forwarding = \"dsr\" (pools.{}): the backends answer the clients \
                     directly, so the balancer never sees the replies it would count",
                    p.name
                ),
            ));
        }
    }
}

fn check_dsr_ports(out: &mut Vec<Problem>, p: &PoolConfig, listeners: &[ListenerConfig]) {
    for l in listeners.iter().filter(|l| l.pool == p.name) {
        for (i, b) in p.backends.iter().enumerate() {
            if b.spec.addr.port() != l.address.port() {
                out.push(problem(
                    format!("pools.{}.backends[{i}].address", p.name),
                    format!(
                        "{}: with forwarding = \"dsr\" a backend serves the listener's own port \
                         ({} of listeners.{}): the datagram reaches it unchanged",
                        b.spec.addr,
                        l.address.port(),
                        l.name
                    ),
                ));
            }
        }
    }
}

/// Why udplb must never send to backend `addr`: it is one of its own listeners (every datagram
/// would come back as a new client's, without end), or a multicast or broadcast address.
/// (A local address of another interface on a wildcard listener's port is only known on the
/// host: `udplb` refuses it there.)
fn unreachable_backend(addr: SocketAddr, listeners: &[ListenerConfig]) -> Option<String> {
    let ip = addr.ip();
    if ip.is_multicast() || matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
        return Some(format!(
            "{addr} is a multicast or broadcast address: a backend is one host"
        ));
    }
    let own = listeners.iter().find(|l| {
        l.address == addr
            || (l.address.ip().is_unspecified()
                && l.address.is_ipv4() == addr.is_ipv4()
                && l.address.port() == addr.port()
                && ip.is_loopback())
    })?;
    Some(format!(
        "{addr} is listener {:?} ({}): udplb would send its datagrams to itself",
        own.name, own.address
    ))
}

fn check_health(out: &mut Vec<Problem>, key: &str, h: &HealthCheck) {
    check_duration(
        out,
        format!("{key}.interval"),
        h.interval,
        defaults::CHECK_INTERVAL_RANGE,
    );
    if h.timeout.is_zero() || h.timeout > h.interval {
        out.push(problem(
            format!("{key}.timeout"),
            format!(
                "{} must be above 0 and at most the interval ({})",
                humantime::format_duration(h.timeout),
                humantime::format_duration(h.interval)
            ),
        ));
    }
    if h.jitter >= h.interval {
        out.push(problem(
            format!("{key}.jitter"),
            "must be below the interval",
        ));
    }
}

fn check_port(out: &mut Vec<Problem>, key: String, addr: SocketAddr) {
    if addr.port() == 0 {
        out.push(problem(key, format!("{addr}: port 0 is not allowed")));
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    out: &mut Vec<Problem>,
    key: String,
    v: T,
    r: RangeInclusive<T>,
) {
    if !r.contains(&v) {
        out.push(problem(
            key,
            format!("{v} is out of range {}..={}", r.start(), r.end()),
        ));
    }
}

fn check_duration(out: &mut Vec<Problem>, key: String, v: Duration, r: RangeInclusive<Duration>) {
    if !r.contains(&v) {
        let show = |d: &Duration| humantime::format_duration(*d).to_string();
        out.push(problem(
            key,
            format!(
                "{} is out of range {}..={}",
                show(&v),
                show(r.start()),
                show(r.end())
            ),
        ));
    }
}

pub(crate) fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BackendConfig;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn config() -> Config {
        Config {
            listeners: vec![ListenerConfig::new(
                "l".into(),
                addr("127.0.0.1:53"),
                "p".into(),
            )],
            pools: vec![PoolConfig::new(
                "p".into(),
                Default::default(),
                vec![BackendSpec::new(addr("127.0.0.1:5301")).into()],
            )],
            ..Config::default()
        }
    }

    #[test]
    fn a_minimal_config_is_valid() {
        assert!(config().validate().is_ok());
    }

    #[test]
    fn every_broken_rule_is_reported_with_its_key() {
        let mut cfg = config();
        cfg.runtime.workers = Some(0);
        cfg.listeners.push(ListenerConfig::new(
            "m".into(),
            addr("0.0.0.0:53"),
            "nope".into(),
        ));
        cfg.listeners[0].max_flows = 0;
        cfg.pools[0]
            .backends
            .push(BackendConfig::from(BackendSpec::new(addr(
                "127.0.0.1:5301",
            ))));
        cfg.pools
            .push(PoolConfig::new("empty".into(), Default::default(), vec![]));
        let errors = cfg.validate().unwrap_err();
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "runtime.workers",
                "listeners.l.max_flows",
                "listeners.m.address",
                "listeners.m.pool",
                "pools.p.backends[1].address",
                "pools.empty.backends"
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn wildcards_conflict_within_a_family_only() {
        assert!(addresses_conflict(addr("0.0.0.0:53"), addr("127.0.0.1:53")));
        assert!(addresses_conflict(addr("[::]:53"), addr("[::1]:53")));
        assert!(!addresses_conflict(addr("0.0.0.0:53"), addr("[::]:53")));
        assert!(!addresses_conflict(
            addr("127.0.0.1:53"),
            addr("127.0.0.2:53")
        ));
        assert!(!addresses_conflict(
            addr("127.0.0.1:53"),
            addr("127.0.0.1:54")
        ));
    }

    #[test]
    fn sync_rules_apply_without_the_parser() {
        let mut cfg = config();
        cfg.sync = Some(crate::model::FlowSync {
            listen: addr("10.0.0.1:7946"),
            peers: vec![addr("10.0.0.2:7946")],
            key_file: "/etc/udplb/sync.key".into(),
            interval: defaults::SYNC_INTERVAL,
            max_entries: defaults::SYNC_MAX_ENTRIES,
        });
        assert!(cfg.validate().is_ok());
        let s = cfg.sync.as_mut().unwrap();
        s.peers.clear();
        s.max_entries = 1;
        assert_eq!(
            cfg.validate().unwrap_err(),
            [
                "sync.max_entries: 1 is out of range 1024..=16777216",
                "sync.peers: give at least one peer"
            ]
        );
    }

    #[test]
    fn an_all_backup_pool_is_rejected() {
        let mut cfg = config();
        cfg.pools[0].backends[0].spec.backup = true;
        assert!(cfg.validate().unwrap_err()[0].contains("backup"));
    }
}
