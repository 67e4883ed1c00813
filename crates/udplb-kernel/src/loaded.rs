//! The loaded program and its maps (only when this udplb was built with the program).

use std::net::{IpAddr, SocketAddr};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

use std::time::Duration;

use crate::census::{
    self, Counted, FLOW_TIME_SHIFT, FlowCensus, Matcher, SLOT_BYTES, VERSION_ONE, WORD_AT,
};
use crate::{
    Drops, Error, FLOW_BUCKET_BYTES, FLOW_WAYS, MAX_BACKENDS, MAX_SERVICES, MapSizes, Method,
    RING_SIZE, SCHEDULE_MAX, Service, Slots, Traffic,
};

/// The program, compiled by build.rs.
/// (Aligned: the ELF parser reads it in place.)
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udplb.bpf.o"));
/// The same with the flow map pinned by name.
static PROGRAM_PINNED: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udplb-pinned.bpf.o"));
/// The backends' side of direct server return.
static DECAP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap.bpf.o"));

/// The flow map's layout: a pinned map of another layout is not reused (the directory under
/// the pin directory is named after it).
const FLOW_LAYOUT: &str = "flows-v4";

// The maps' keys and values: the layouts of bpf/udplb.bpf.c.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct ServiceKey {
    addr: u32,
    port: u16,
    pad: u16,
}

const SERVICE_DATAGRAM: u32 = 1;
const SERVICE_BY_IP: u32 = 2;
const SERVICE_ALLOW_LIST: u32 = 4;
const SERVICE_MASQUERADE: u32 = 8;
const SERVICE_DSR: u32 = 16;
const SERVICE_GUE: u32 = 32;
const SERVICE_PERSIST: u32 = 64;
const SERVICE_REPLY_RATIO: u32 = 128;
const SERVICE_SYNCED: u32 = 256;
const SERVICE_WILDCARD: u32 = 512;
const SERVICE_DENY_LIST: u32 = 1024;

/// The entries of `ports`: 64 ports' bits each.
const PORT_WORDS: usize = 65536 / 64;

/// Which of 64 ports a listener is on and a backend answers from (`struct port_bits`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PortBits {
    services: u64,
    backends: u64,
}

/// This host's addresses the program knows at most, per family (`LOCALS_MAX`).
const LOCALS_MAX: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ServiceValue {
    id: u32,
    flags: u32,
    idle_ns: u64,
    ring_size: u32,
    schedule_len: u32,
    port_base: u16,
    port_count: u16,
    sync_ms: u32,
    limit: [u32; 4],
    limit_base: u32,
    limit_mask: u32,
    prefix_mask: u32,
    pad2: u32,
    prefix6_mask: [u32; 4],
    persist_ns: u64,
}

const BACKEND_KEEPS_FLOWS: u16 = 1;
const BACKEND_MASQUERADE: u16 = 2;
const BACKEND_LOCAL: u16 = 4;
const BACKEND_TAKES_NEW: u16 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BackendValue {
    addr: u32,
    port: u16,
    flags: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReplyKey {
    addr: u32,
    port: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReplyValue {
    service_addr: u32,
    service_port: u16,
    flags: u16,
    backend: u32,
    reply_ratio: u32,
}

// The IPv6 maps' (bpf/ipv6.h): addresses as the packet holds them.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Service6Key {
    addr: [u8; 16],
    port: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Backend6Value {
    addr: [u8; 16],
    port: u16,
    flags: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Reply6Key {
    addr: [u8; 16],
    port: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Reply6Value {
    service_addr: [u8; 16],
    service_port: u16,
    flags: u16,
    backend: u32,
    reply_ratio: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CountersValue {
    packets: u64,
    bytes: u64,
    reply_packets: u64,
    reply_bytes: u64,
    icmp_errors: u64,
    persisted: u64,
    flows: u64,
}

/// A persistence entry's key (`struct flow_key`: the client, its port 0 with IP affinity,
/// and the listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FlowKey {
    client_addr: u32,
    service_addr: u32,
    client_port: u16,
    service_port: u16,
}

/// A persistence entry (`struct flow`): the backend the client last used, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FlowValue {
    backend_addr: u32,
    backend_port: u16,
    pad: u16,
    last_ns: u64,
    sent: u32,
    replied: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Flow6Key {
    client_addr: [u8; 16],
    service_addr: [u8; 16],
    client_port: u16,
    service_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Flow6Value {
    backend_addr: [u8; 16],
    backend_port: u16,
    pad: u16,
    pad2: u32,
    last_ns: u64,
    sent: u32,
    replied: u32,
}

/// How the program hashes flows into its flow tables (`struct flow_params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FlowParams {
    seed: u64,
    mask: u32,
    mask6: u32,
}

// SAFETY: each is `repr(C)`, `Copy`, made of integers only, with every padding byte an explicit
// field: any bytes are a valid value and no byte is uninitialized.
unsafe impl Pod for ServiceKey {}
// SAFETY: as above.
unsafe impl Pod for ServiceValue {}
// SAFETY: as above.
unsafe impl Pod for BackendValue {}
// SAFETY: as above.
unsafe impl Pod for ReplyKey {}
// SAFETY: as above.
unsafe impl Pod for ReplyValue {}
// SAFETY: as above.
unsafe impl Pod for CountersValue {}
// SAFETY: as above.
unsafe impl Pod for Service6Key {}
// SAFETY: as above.
unsafe impl Pod for Backend6Value {}
// SAFETY: as above.
unsafe impl Pod for Reply6Key {}
// SAFETY: as above.
unsafe impl Pod for Reply6Value {}
// SAFETY: as above.
unsafe impl Pod for FlowParams {}
// SAFETY: as above.
unsafe impl Pod for PortBits {}
// SAFETY: as above.
unsafe impl Pod for FlowKey {}
// SAFETY: as above.
unsafe impl Pod for FlowValue {}
// SAFETY: as above.
unsafe impl Pod for Flow6Key {}
// SAFETY: as above.
unsafe impl Pod for Flow6Value {}

/// The backend and time (`last_ns`) of the entry of `client` (its port `client_port` as the
/// map keys it, network order) on `service` in a map of `struct flow` entries (a persistence
/// or peer-flows map), the IPv4 or the IPv6 one of `maps` by the addresses' family.
fn flow_entry<T4, T6>(
    maps: (
        &BpfHashMap<T4, FlowKey, FlowValue>,
        &BpfHashMap<T6, Flow6Key, Flow6Value>,
    ),
    client: IpAddr,
    client_port: u16,
    service: SocketAddr,
) -> Option<(SocketAddr, u64)>
where
    T4: std::borrow::Borrow<MapData>,
    T6: std::borrow::Borrow<MapData>,
{
    let service_port = wire_port(service.port());
    let (addr, port, last_ns) = match (wire(client), wire(service.ip())) {
        (Wire::V4(client_addr), Wire::V4(service_addr)) => {
            let key = FlowKey {
                client_addr,
                service_addr,
                client_port,
                service_port,
            };
            let e = maps.0.get(&key, 0).ok()?;
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(e.backend_addr.to_ne_bytes()));
            (addr, e.backend_port, e.last_ns)
        }
        (Wire::V6(client_addr), Wire::V6(service_addr)) => {
            let key = Flow6Key {
                client_addr,
                service_addr,
                client_port,
                service_port,
            };
            let e = maps.1.get(&key, 0).ok()?;
            (IpAddr::V6(e.backend_addr.into()), e.backend_port, e.last_ns)
        }
        _ => return None,
    };
    Some((
        SocketAddr::new(addr, u16::from_be_bytes(port.to_ne_bytes())),
        last_ns,
    ))
}

/// A port as the program reads it from a packet (network order in memory).
fn wire_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// An address as the program's maps hold it: IPv4 (network order in memory), or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    V4(u32),
    V6([u8; 16]),
}

fn wire(ip: IpAddr) -> Wire {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Wire::V4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => Wire::V6(v6.octets()),
    }
}

/// What was last written for a service (only differences are written next).
#[derive(Default)]
struct Written {
    addr: Option<SocketAddr>,
    slots: Slots,
    /// Slot per backend position, as last written.
    ring: Vec<u32>,
    schedule: Vec<u32>,
    /// Per slot, the backend and its flags, as last written.
    backends: Vec<Option<(SocketAddr, u16)>>,
    value: Option<ServiceValue>,
    allow: Vec<(IpAddr, u8)>,
    deny: Vec<(IpAddr, u8)>,
}

/// The new flows the program tells udplb of for the peers (`[sync]` listeners): its ring
/// buffer, read on its own so that reading it holds up no other map's reader or writer.
pub struct NewFlows(RingBuf<MapData>);

impl NewFlows {
    /// Moves the new flows told since the last call into `out`: service id, client, backend.
    /// Reads what is queued without waiting, at most a full ring's worth.
    pub fn drain(&mut self, out: &mut Vec<(usize, SocketAddr, SocketAddr)>) {
        for _ in 0..NEW_FLOWS_PER_DRAIN {
            let Some(item) = self.0.next() else { break };
            if let Some(flow) = census::parse_new_flow(&item) {
                out.push(flow);
            }
        }
    }
}

/// The most new flows one [`NewFlows::drain`] reads: more than the ring holds (1 MiB, 56
/// bytes a record with its header), so that a flood of new flows never keeps the reader in
/// one call.
const NEW_FLOWS_PER_DRAIN: usize = 24_000;

/// The loaded program, attached to interfaces, and its maps.
pub struct Kernel {
    ebpf: Ebpf,
    links: Vec<(String, SchedClassifierLinkId)>,
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    ring: Array<MapData, u32>,
    schedule: Array<MapData, u32>,
    backends: Array<MapData, BackendValue>,
    replies: BpfHashMap<MapData, ReplyKey, ReplyValue>,
    counters: PerCpuArray<MapData, CountersValue>,
    drops: PerCpuArray<MapData, u64>,
    acl_allow: LpmTrie<MapData, [u8; 8], u8>,
    acl_deny: LpmTrie<MapData, [u8; 8], u8>,
    services6: BpfHashMap<MapData, Service6Key, ServiceValue>,
    backends6: Array<MapData, Backend6Value>,
    replies6: BpfHashMap<MapData, Reply6Key, Reply6Value>,
    acl6_allow: LpmTrie<MapData, [u8; 20], u8>,
    acl6_deny: LpmTrie<MapData, [u8; 20], u8>,
    /// The listeners' and backends' ports, as last written (bits are only ever added).
    ports: Array<MapData, PortBits>,
    port_bits: Vec<PortBits>,
    /// The flow tables, mapped for counting their live flows.
    tables: std::sync::Arc<[MappedTable; 2]>,
    /// `[sync]`: the peers' flows as learned, and the new flows to tell them.
    peer_flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    peer_flows6: BpfHashMap<MapData, Flow6Key, Flow6Value>,
    /// Until [`Kernel::take_new_flows`].
    new_flows: Option<NewFlows>,
    /// This host's addresses, for the wildcard listeners, as last written.
    locals: BpfHashMap<MapData, u32, u8>,
    locals6: BpfHashMap<MapData, [u8; 16], u8>,
    written_locals: std::collections::BTreeSet<IpAddr>,
    written: Vec<Written>,
}

fn update_error(e: impl std::fmt::Display) -> Error {
    Error::Update(e.to_string())
}

impl Kernel {
    /// Loads the program with its per-client maps of `sizes` and `limit_cells` rate-limit
    /// cells (the listeners' [`crate::limit_cells`] summed; needs CAP_BPF, CAP_PERFMON and
    /// CAP_NET_ADMIN, or root). With `pin_dir` (a directory on a bpf file system) the flow,
    /// persistence, masquerade and peers' flow maps are kept there and reused: flows continue
    /// across udplb processes, and so does what udplb learned of its peers' (a pinned map of
    /// another size starts afresh, said in the log). `peer_flows`: the entries of the IPv4
    /// and the IPv6 map of the peers' flows (at most `[sync]`'s `max_entries` for a family
    /// with synced listeners; 1 otherwise).
    pub fn load(
        sizes: MapSizes,
        limit_cells: u32,
        peer_flows: (u32, u32),
        pin_dir: Option<&std::path::Path>,
    ) -> Result<Kernel, Error> {
        let mut loader = EbpfLoader::new();
        loader.set_max_entries("limits", limit_cells.max(1));
        loader.set_max_entries("peer_flows", peer_flows.0.max(1));
        loader.set_max_entries("peer_flows6", peer_flows.1.max(1));
        for (name, entries) in sizes.by_name() {
            loader.set_max_entries(name, entries);
        }
        let object = match pin_dir {
            Some(dir) => {
                unpin_other_layouts(dir);
                let dir = dir.join(FLOW_LAYOUT);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::Load(format!("{}: {e}", dir.display())))?;
                unpin_resized(&dir, &sizes, peer_flows);
                loader.map_pin_path(dir);
                PROGRAM_PINNED
            }
            None => PROGRAM,
        };
        let mut ebpf = loader
            .load(object)
            .map_err(|e| Error::Load(e.to_string()))?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Load(format!("the program has no map {name}")))
        };
        let services = BpfHashMap::try_from(take("services")?).map_err(update_error)?;
        let ring = Array::try_from(take("ring")?).map_err(update_error)?;
        let schedule = Array::try_from(take("schedule")?).map_err(update_error)?;
        let backends = Array::try_from(take("backends")?).map_err(update_error)?;
        let replies = BpfHashMap::try_from(take("replies")?).map_err(update_error)?;
        let counters = PerCpuArray::try_from(take("counters")?).map_err(update_error)?;
        let drops = PerCpuArray::try_from(take("drops")?).map_err(update_error)?;
        let acl_allow = LpmTrie::try_from(take("acl_allow")?).map_err(update_error)?;
        let acl_deny = LpmTrie::try_from(take("acl_deny")?).map_err(update_error)?;
        let services6 = BpfHashMap::try_from(take("services6")?).map_err(update_error)?;
        let backends6 = Array::try_from(take("backends6")?).map_err(update_error)?;
        let replies6 = BpfHashMap::try_from(take("replies6")?).map_err(update_error)?;
        let acl6_allow = LpmTrie::try_from(take("acl6_allow")?).map_err(update_error)?;
        let acl6_deny = LpmTrie::try_from(take("acl6_deny")?).map_err(update_error)?;
        let peer_flows = BpfHashMap::try_from(take("peer_flows")?).map_err(update_error)?;
        let peer_flows6 = BpfHashMap::try_from(take("peer_flows6")?).map_err(update_error)?;
        let new_flows = RingBuf::try_from(take("new_flows")?).map_err(update_error)?;
        let locals = BpfHashMap::try_from(take("locals")?).map_err(update_error)?;
        let locals6 = BpfHashMap::try_from(take("locals6")?).map_err(update_error)?;
        let ports = Array::try_from(take("ports")?).map_err(update_error)?;
        set_flow_params(&mut ebpf, &sizes)?;
        let tables = std::sync::Arc::new([
            MappedTable::of(&ebpf, "flows", sizes.flows, 0)?,
            MappedTable::of(&ebpf, "flows6", sizes.flows6, 1)?,
        ]);
        program(&mut ebpf)?
            .load()
            .map_err(|e| Error::Load(verifier_error(&e)))?;
        Ok(Kernel {
            ebpf,
            links: Vec::new(),
            services,
            ring,
            schedule,
            backends,
            replies,
            counters,
            drops,
            acl_allow,
            acl_deny,
            services6,
            backends6,
            replies6,
            acl6_allow,
            acl6_deny,
            ports,
            port_bits: vec![PortBits::default(); PORT_WORDS],
            tables,
            peer_flows,
            peer_flows6,
            new_flows: Some(NewFlows(new_flows)),
            locals,
            locals6,
            written_locals: Default::default(),
            written: (0..MAX_SERVICES).map(|_| Written::default()).collect(),
        })
    }

    /// Tells the program this host's addresses (`addrs`: all of them, as they are now): a
    /// wildcard listener takes the datagrams to any of them on its port, and no other. Only
    /// what changed since the last call is written; beyond 4,096 of a family (`LOCALS_MAX`) the
    /// rest are left out (an error says so, the others written).
    pub fn set_locals(&mut self, addrs: &[IpAddr]) -> Result<(), Error> {
        let wanted: std::collections::BTreeSet<IpAddr> =
            addrs.iter().map(|a| a.to_canonical()).collect();
        let gone: Vec<IpAddr> = self.written_locals.difference(&wanted).copied().collect();
        for addr in gone {
            // (Already absent is as good as removed.)
            let _ = match addr {
                IpAddr::V4(v4) => self.locals.remove(&u32::from_ne_bytes(v4.octets())),
                IpAddr::V6(v6) => self.locals6.remove(&v6.octets()),
            };
            self.written_locals.remove(&addr);
        }
        let new: Vec<IpAddr> = wanted.difference(&self.written_locals).copied().collect();
        let mut held = [4, 6].map(|family| {
            self.written_locals
                .iter()
                .filter(|a| a.is_ipv4() == (family == 4))
                .count()
        });
        let mut full = None;
        for addr in new {
            let held = &mut held[usize::from(addr.is_ipv6())];
            if *held >= LOCALS_MAX {
                full = Some(addr);
                continue;
            }
            match addr {
                IpAddr::V4(v4) => self
                    .locals
                    .insert(u32::from_ne_bytes(v4.octets()), 1, 0)
                    .map_err(update_error)?,
                IpAddr::V6(v6) => self
                    .locals6
                    .insert(v6.octets(), 1, 0)
                    .map_err(update_error)?,
            }
            self.written_locals.insert(addr);
            *held += 1;
        }
        match full {
            Some(addr) => Err(Error::Update(format!(
                "this host has more than {LOCALS_MAX} addresses of one family: {addr} and \
                 others not written (wildcard listeners do not take datagrams to them)"
            ))),
            None => Ok(()),
        }
    }

    /// Attaches the program at ingress of each of `interfaces` (tcx on Linux 6.6 and later,
    /// a clsact qdisc before). Attached programs are detached when this is dropped.
    pub fn attach(&mut self, interfaces: &[String]) -> Result<(), Error> {
        for interface in interfaces {
            if self.links.iter().any(|(i, _)| i == interface) {
                continue;
            }
            // Older kernels need the clsact qdisc; it may exist already.
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
            let link = program(&mut self.ebpf)?
                .attach(interface, TcAttachType::Ingress)
                .map_err(|e| Error::Attach {
                    interface: interface.clone(),
                    why: e.to_string(),
                })?;
            self.links.push((interface.clone(), link));
        }
        Ok(())
    }

    /// The interfaces the program is attached to.
    pub fn attached(&self) -> Vec<String> {
        self.links.iter().map(|(i, _)| i.clone()).collect()
    }

    /// Makes the maps say what `services` (by id: their index) say, writing only what
    /// changed: new backends first, then the table entries that point at them, then the
    /// service, then the reply mappings; a backend that left is cleared last.
    pub fn update(&mut self, services: &[Service]) -> Result<(), Error> {
        if services.len() > MAX_SERVICES {
            return Err(Error::Limit(format!(
                "{} kernel listeners; at most {MAX_SERVICES}",
                services.len()
            )));
        }
        for (id, s) in services.iter().enumerate() {
            self.update_service(id as u32, s)?;
        }
        Ok(())
    }

    fn update_service(&mut self, id: u32, s: &Service) -> Result<(), Error> {
        let mut w = std::mem::take(&mut self.written[id as usize]);
        let result = self.write_service(id, s, &mut w);
        self.written[id as usize] = w;
        result
    }

    fn write_service(&mut self, id: u32, s: &Service, w: &mut Written) -> Result<(), Error> {
        if s.ring.len() > RING_SIZE || s.schedule.len() > SCHEDULE_MAX {
            return Err(Error::Limit(format!(
                "listener {}: a table of {} entries and a schedule of {}; at most {RING_SIZE} \
                 and {SCHEDULE_MAX}",
                s.addr,
                s.ring.len(),
                s.schedule.len()
            )));
        }
        let slots = w.slots.assign(&s.backends).ok_or_else(|| {
            Error::Limit(format!(
                "listener {}: more than {MAX_BACKENDS} backends",
                s.addr
            ))
        })?;
        // The ports first: the program looks up no listener or backend whose port's bit is
        // clear.
        self.mark_ports(s.addr.port(), s.backends.iter().map(|b| b.addr.port()))?;
        let base = id * MAX_BACKENDS as u32;
        w.backends.resize(MAX_BACKENDS, None);
        let takers = s.takers();
        // Backends first: a table entry never names a slot not written yet.
        for (i, (b, &slot)) in s.backends.iter().zip(&slots).enumerate() {
            let flags = backend_flags(b, s.method, takers[i]);
            let now = Some((b.addr, flags));
            if w.backends[slot as usize] != now {
                self.set_backend(base + slot, Some((b.addr, flags)))?;
                w.backends[slot as usize] = now;
            }
        }
        let slot_of = |p: &u32| {
            slots.get(*p as usize).copied().ok_or_else(|| {
                Error::Update(format!("listener {}: no backend at position {p}", s.addr))
            })
        };
        let ring: Vec<u32> = s.ring.iter().map(slot_of).collect::<Result<_, _>>()?;
        write_array(&mut self.ring, id * RING_SIZE as u32, &w.ring, &ring)?;
        w.ring = ring;
        let schedule: Vec<u32> = s.schedule.iter().map(slot_of).collect::<Result<_, _>>()?;
        write_array(
            &mut self.schedule,
            id * SCHEDULE_MAX as u32,
            &w.schedule,
            &schedule,
        )?;
        w.schedule = schedule;
        // The lists before the flag that makes the allow list count.
        write_acl(
            &mut self.acl_allow,
            &mut self.acl6_allow,
            id,
            &w.allow,
            &s.allow,
        )?;
        w.allow.clone_from(&s.allow);
        write_acl(
            &mut self.acl_deny,
            &mut self.acl6_deny,
            id,
            &w.deny,
            &s.deny,
        )?;
        w.deny.clone_from(&s.deny);
        let value = ServiceValue {
            id,
            flags: if s.datagram { SERVICE_DATAGRAM } else { 0 }
                | if s.by_ip { SERVICE_BY_IP } else { 0 }
                | if s.allow.is_empty() {
                    0
                } else {
                    SERVICE_ALLOW_LIST
                }
                | if s.deny.is_empty() {
                    0
                } else {
                    SERVICE_DENY_LIST
                }
                | if s.persistence.is_some() {
                    SERVICE_PERSIST
                } else {
                    0
                }
                | if s.reply_ratio.is_some() {
                    SERVICE_REPLY_RATIO
                } else {
                    0
                }
                | if s.sync.is_some() && !s.datagram {
                    SERVICE_SYNCED
                } else {
                    0
                }
                | if s.addr.ip().is_unspecified() {
                    SERVICE_WILDCARD
                } else {
                    0
                }
                | match s.method {
                    Method::Nat => 0,
                    Method::Masquerade { .. } => SERVICE_MASQUERADE,
                    Method::Dsr { gue_port: None } => SERVICE_DSR,
                    Method::Dsr { gue_port: Some(_) } => SERVICE_DSR | SERVICE_GUE,
                },
            idle_ns: s.idle.as_nanos().min(u128::from(u64::MAX / 2)) as u64,
            ring_size: w.ring.len() as u32,
            schedule_len: w.schedule.len() as u32,
            port_base: match s.method {
                Method::Masquerade { first, .. } => first,
                Method::Dsr {
                    gue_port: Some(port),
                } => port,
                _ => 0,
            },
            // At most 65535 (ports 1-65535).
            port_count: match s.method {
                Method::Masquerade { first, last } => last.saturating_sub(first).saturating_add(1),
                _ => 0,
            },
            sync_ms: s
                .sync
                .map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32),
            limit: s.limits.map_or([0; 4], |l| {
                [
                    l.datagrams_per_source,
                    l.datagrams_per_prefix,
                    l.new_flows_per_source,
                    l.new_flows_per_prefix,
                ]
            }),
            limit_base: s.limits.map_or(0, |l| l.first_cell),
            limit_mask: s.limits.map_or(0, |l| l.cells.saturating_sub(1)),
            prefix_mask: s.limits.map_or(0, |l| {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(l.prefix_len.min(32)))
                    .unwrap_or(0);
                u32::from_ne_bytes(mask.to_be_bytes())
            }),
            pad2: 0,
            prefix6_mask: s.limits.map_or([0; 4], |l| {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(l.prefix6_len.min(128)))
                    .unwrap_or(0)
                    .to_be_bytes();
                std::array::from_fn(|i| {
                    u32::from_ne_bytes(mask[4 * i..4 * i + 4].try_into().unwrap())
                })
            }),
            persist_ns: s
                .persistence
                .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX / 2)) as u64),
        };
        if w.value != Some(value) {
            self.set_service(s.addr, value)?;
            w.value = Some(value);
            w.addr = Some(s.addr);
        }
        for (i, (b, &slot)) in s.backends.iter().zip(&slots).enumerate() {
            let flags = backend_flags(b, s.method, takers[i]);
            self.set_reply(b.addr, s.addr, flags, base + slot, s.reply_ratio)?;
        }
        // Backends that left: no table entry names them any more.
        for slot in 0..MAX_BACKENDS {
            if let Some((addr, _)) = w.backends[slot]
                && !s.backends.iter().any(|b| b.addr == addr)
            {
                self.set_backend(base + slot as u32, None)?;
                self.remove_reply(addr);
                w.backends[slot] = None;
            }
        }
        Ok(())
    }

    /// Writes backend `at` of the table of its family (`None`: clears it in both).
    fn set_backend(&mut self, at: u32, backend: Option<(SocketAddr, u16)>) -> Result<(), Error> {
        let Some((addr, flags)) = backend else {
            self.backends
                .set(at, BackendValue::default(), 0)
                .map_err(update_error)?;
            return self
                .backends6
                .set(at, Backend6Value::default(), 0)
                .map_err(update_error);
        };
        let port = wire_port(addr.port());
        match wire(addr.ip()) {
            Wire::V4(addr) => self.backends.set(at, BackendValue { addr, port, flags }, 0),
            Wire::V6(addr) => self
                .backends6
                .set(at, Backend6Value { addr, port, flags }, 0),
        }
        .map_err(update_error)
    }

    /// Writes the listener at `addr` into the services of its family.
    /// Sets the bits of listener port `service` and of `backends`' ports in `ports`, writing
    /// only the entries that change. A bit is never cleared: a port no longer used costs
    /// only a lookup that finds nothing, where a port's bit missing would hide its datagrams.
    fn mark_ports(
        &mut self,
        service: u16,
        backends: impl Iterator<Item = u16>,
    ) -> Result<(), Error> {
        let ports = std::iter::once((service, true)).chain(backends.map(|port| (port, false)));
        for (port, of_service) in ports {
            let (at, bit) = (usize::from(port) / 64, 1u64 << (port % 64));
            let mut bits = self.port_bits[at];
            if of_service {
                bits.services |= bit;
            } else {
                bits.backends |= bit;
            }
            if bits != self.port_bits[at] {
                self.ports.set(at as u32, bits, 0).map_err(update_error)?;
                self.port_bits[at] = bits;
            }
        }
        Ok(())
    }

    fn set_service(&mut self, addr: SocketAddr, value: ServiceValue) -> Result<(), Error> {
        let port = wire_port(addr.port());
        match wire(addr.ip()) {
            Wire::V4(addr) => self
                .services
                .insert(ServiceKey { addr, port, pad: 0 }, value, 0),
            Wire::V6(addr) => self
                .services6
                .insert(Service6Key { addr, port, pad: 0 }, value, 0),
        }
        .map_err(update_error)
    }

    /// Maps the replies of `backend` to `service` (and to the counters' slot `at`), unless
    /// they are already. A backend of the other family than its listener's is refused.
    fn set_reply(
        &mut self,
        backend: SocketAddr,
        service: SocketAddr,
        flags: u16,
        at: u32,
        reply_ratio: Option<u32>,
    ) -> Result<(), Error> {
        let reply_ratio = reply_ratio.unwrap_or(0);
        let (port, service_port) = (wire_port(backend.port()), wire_port(service.port()));
        match (wire(backend.ip()), wire(service.ip())) {
            (Wire::V4(addr), Wire::V4(service_addr)) => {
                let key = ReplyKey { addr, port, pad: 0 };
                let reply = ReplyValue {
                    service_addr,
                    service_port,
                    flags,
                    backend: at,
                    reply_ratio,
                };
                if self.replies.get(&key, 0).ok() != Some(reply) {
                    self.replies.insert(key, reply, 0).map_err(update_error)?;
                }
            }
            (Wire::V6(addr), Wire::V6(service_addr)) => {
                let key = Reply6Key { addr, port, pad: 0 };
                let reply = Reply6Value {
                    service_addr,
                    service_port,
                    flags,
                    backend: at,
                    reply_ratio,
                };
                if self.replies6.get(&key, 0).ok() != Some(reply) {
                    self.replies6.insert(key, reply, 0).map_err(update_error)?;
                }
            }
            _ => {
                return Err(Error::Limit(format!(
                    "listener {service}: backend {backend} is of the other IP family (the \
                     kernel data plane does not translate between IPv4 and IPv6)"
                )));
            }
        }
        Ok(())
    }

    fn remove_reply(&mut self, backend: SocketAddr) {
        let port = wire_port(backend.port());
        let _ = match wire(backend.ip()) {
            Wire::V4(addr) => self.replies.remove(&ReplyKey { addr, port, pad: 0 }),
            Wire::V6(addr) => self.replies6.remove(&Reply6Key { addr, port, pad: 0 }),
        };
    }

    /// Each backend's traffic through service `id`, summed over the CPUs.
    pub fn traffic(&self, id: usize) -> Vec<(SocketAddr, Traffic)> {
        let Some(w) = self.written.get(id) else {
            return Vec::new();
        };
        let base = (id * MAX_BACKENDS) as u32;
        w.slots
            .by_addr
            .iter()
            .filter_map(|(&addr, &slot)| {
                let per_cpu = self.counters.get(&(base + slot), 0).ok()?;
                let t = per_cpu.iter().fold(Traffic::default(), |t, c| Traffic {
                    packets: t.packets + c.packets,
                    bytes: t.bytes + c.bytes,
                    reply_packets: t.reply_packets + c.reply_packets,
                    reply_bytes: t.reply_bytes + c.reply_bytes,
                    icmp_errors: t.icmp_errors + c.icmp_errors,
                    persisted: t.persisted + c.persisted,
                    flows: t.flows + c.flows,
                });
                Some((addr, t))
            })
            .collect()
    }

    /// What counting the live flows needs, taken from the listeners as last written: the
    /// count itself ([`FlowCount::run`]) reads the tables without this (or a lock on it).
    pub fn flow_count(&self) -> FlowCount {
        let listeners = self
            .written
            .iter()
            .enumerate()
            .filter_map(|(id, w)| {
                let (addr, v) = (w.addr?, w.value?);
                let counted = Counted {
                    addr,
                    idle: (v.idle_ns >> FLOW_TIME_SHIFT) as u32,
                    datagram: v.flags & SERVICE_DATAGRAM != 0,
                };
                Some((id, counted))
            })
            .collect();
        let synced = self
            .written
            .iter()
            .enumerate()
            .filter(|(_, w)| w.value.is_some_and(|v| v.flags & SERVICE_SYNCED != 0))
            .map(|(id, _)| id)
            .collect();
        FlowCount {
            tables: self.tables.clone(),
            listeners,
            synced,
        }
    }

    /// The backend the program's persistence would send a new flow of `client` to on
    /// service `id`, if it remembers one within the listener's idle timeout and persistence
    /// together (whether that backend still takes new clients is the caller's to judge, as the
    /// program does by the backend's flags).
    pub fn remembered(&self, id: usize, client: SocketAddr) -> Option<SocketAddr> {
        let w = self.written.get(id)?;
        let (service, v) = (w.addr?, w.value?);
        if v.flags & SERVICE_PERSIST == 0 {
            return None;
        }
        let client_port = if v.flags & SERVICE_BY_IP != 0 {
            0
        } else {
            wire_port(client.port())
        };
        let persist = BpfHashMap::try_from(self.ebpf.map("persist")?).ok()?;
        let persist6 = BpfHashMap::try_from(self.ebpf.map("persist6")?).ok()?;
        let (backend, last_ns) =
            flow_entry((&persist, &persist6), client.ip(), client_port, service)?;
        let age = monotonic_ns().saturating_sub(last_ns);
        (age <= v.idle_ns.saturating_add(v.persist_ns)).then_some(backend)
    }

    /// The live flow of `client` on service `id` in the flow table, if it has one: its
    /// backend and how long it has been idle (flow mode; looked up as the program does).
    pub fn flow_of(&self, id: usize, client: SocketAddr) -> Option<(SocketAddr, Duration)> {
        let w = self.written.get(id)?;
        let (service, v) = (w.addr?, w.value?);
        if v.flags & SERVICE_DATAGRAM != 0 {
            return None;
        }
        let params: Array<_, FlowParams> = Array::try_from(self.ebpf.map("flow_params")?).ok()?;
        let params = params.get(&0, 0).ok()?;
        let family = usize::from(!service.ip().to_canonical().is_ipv4());
        let mask = [params.mask, params.mask6][family];
        let (key, bucket) = census::flow_key(client, service, params.seed, mask);
        let table = &self.tables[family];
        let slot_bytes = [SLOT_BYTES.0, SLOT_BYTES.1][family];
        let word_at = [WORD_AT.0, WORD_AT.1][family];
        let now = (monotonic_ns() >> FLOW_TIME_SHIFT) as u32;
        let idle = (v.idle_ns >> FLOW_TIME_SHIFT) as u32;
        let mut slot = [0u8; SLOT_BYTES.1];
        let slot = &mut slot[..slot_bytes];
        (0..FLOW_WAYS as usize).find_map(|way| {
            let at = (bucket as usize * FLOW_WAYS as usize + way) * slot_bytes;
            if (bucket as usize) >= table.buckets || !table.read_slot(at, word_at, slot) {
                return None;
            }
            let (backend, last) = census::flow_in(slot, &key)?;
            // (A slot written after `now` was read: idle 0.)
            let age = u32::try_from(now.wrapping_sub(last) as i32).unwrap_or(0);
            census::live(last, now, idle).then(|| {
                (
                    backend,
                    Duration::from_nanos(u64::from(age) << FLOW_TIME_SHIFT),
                )
            })
        })
    }

    /// The queue of new flows the program tells (`[sync]` listeners), read apart from the
    /// other maps; `None` once taken.
    pub fn take_new_flows(&mut self) -> Option<NewFlows> {
        self.new_flows.take()
    }

    /// Records that a peer instance has `client`'s flow on service `id` on `backend`: a new
    /// flow of that client opens there while the backend keeps flows, for the service's
    /// `sync` window from now. `false` when the service is not synced, the addresses are not
    /// of its family, or the map refused the entry.
    pub fn learn(&mut self, id: usize, client: SocketAddr, backend: SocketAddr) -> bool {
        let Some(w) = self.written.get(id) else {
            return false;
        };
        let (Some(service), Some(v)) = (w.addr, w.value) else {
            return false;
        };
        if v.flags & SERVICE_SYNCED == 0 {
            return false;
        }
        let client_port = wire_port(client.port());
        let service_port = wire_port(service.port());
        let backend_port = wire_port(backend.port());
        let last_ns = monotonic_ns();
        match (wire(client.ip()), wire(service.ip()), wire(backend.ip())) {
            (Wire::V4(client_addr), Wire::V4(service_addr), Wire::V4(backend_addr)) => {
                let key = FlowKey {
                    client_addr,
                    service_addr,
                    client_port,
                    service_port,
                };
                let value = FlowValue {
                    backend_addr,
                    backend_port,
                    last_ns,
                    ..FlowValue::default()
                };
                self.peer_flows.insert(key, value, 0).is_ok()
            }
            (Wire::V6(client_addr), Wire::V6(service_addr), Wire::V6(backend_addr)) => {
                let key = Flow6Key {
                    client_addr,
                    service_addr,
                    client_port,
                    service_port,
                };
                let value = Flow6Value {
                    backend_addr,
                    backend_port,
                    last_ns,
                    ..Flow6Value::default()
                };
                self.peer_flows6.insert(key, value, 0).is_ok()
            }
            _ => false,
        }
    }

    /// The backend a peer instance has `client`'s flow on, on service `id`, if udplb learned
    /// it within the service's `sync` window (whether that backend keeps flows is the
    /// caller's to judge, as the program does by the backend's flags).
    pub fn peer_flow(&self, id: usize, client: SocketAddr) -> Option<SocketAddr> {
        let w = self.written.get(id)?;
        let (service, v) = (w.addr?, w.value?);
        if v.flags & SERVICE_SYNCED == 0 {
            return None;
        }
        let (backend, last_ns) = flow_entry(
            (&self.peer_flows, &self.peer_flows6),
            client.ip(),
            wire_port(client.port()),
            service,
        )?;
        let age = monotonic_ns().saturating_sub(last_ns);
        (age <= u64::from(v.sync_ms) * 1_000_000).then_some(backend)
    }

    /// What the program did not forward, by reason.
    pub fn drops(&self) -> Drops {
        let n = |reason: u32| {
            self.drops
                .get(&reason, 0)
                .map_or(0, |v| v.iter().copied().sum::<u64>())
        };
        Drops {
            no_backend: n(0),
            ttl: n(1),
            no_route: n(2),
            rewrite: n(3),
            fragments_passed: n(4),
            denied: n(5),
            forged: n(6),
            no_port: n(7),
            too_big: n(8),
            rate_limited: n(9),
            flow_rate_limited: n(10),
            oversize_passed: n(11),
            cut_for_tunnel: n(12),
            amplification: n(13),
            flows_replaced: n(14),
            sync_used: n(15),
            sync_not_queued: n(16),
            flow_gone: n(17),
        }
    }
}

/// A flow table (`flows`, `flows6`) mapped read-only into this process: the program writes
/// it, udplb only counts what it holds.
struct MappedTable {
    at: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
    buckets: usize,
    /// 0: IPv4, 1: IPv6 (the slot's layout).
    family: usize,
}

// SAFETY: the mapping is read-only here and lives until `drop`; reads go through atomics.
unsafe impl Send for MappedTable {}
// SAFETY: as above: shared references only read, atomically.
unsafe impl Sync for MappedTable {}

impl MappedTable {
    /// Maps the array `name` of `buckets` buckets of family `family` (its layout).
    fn of(ebpf: &Ebpf, name: &str, buckets: u32, family: usize) -> Result<MappedTable, Error> {
        use std::os::fd::AsFd;
        let Some(aya::maps::Map::Array(data)) = ebpf.map(name) else {
            return Err(Error::Load(format!("the program has no array {name}")));
        };
        let bucket_bytes = [FLOW_BUCKET_BYTES.0, FLOW_BUCKET_BYTES.1][family] as usize;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as usize);
        let len = (buckets as usize * bucket_bytes).div_ceil(page) * page;
        let size = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| Error::Load(format!("{name}: no buckets")))?;
        // SAFETY: a new shared read-only mapping of the map's values (an mmapable array maps
        // them from offset 0, `len` within its pages); nothing else in this process maps it.
        let at = unsafe {
            nix::sys::mman::mmap(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                data.fd().as_fd(),
                0,
            )
        }
        .map_err(|e| Error::Load(format!("mapping {name} to count its flows: {e}")))?;
        Ok(MappedTable {
            at,
            len,
            buckets: buckets as usize,
            family,
        })
    }

    /// Counts the live flows in the table at flow time `now` into `census`.
    fn count_into(&self, census: &mut FlowCensus, matcher: &Matcher, now: u32) {
        let slot_bytes = [SLOT_BYTES.0, SLOT_BYTES.1][self.family];
        let word_at = [WORD_AT.0, WORD_AT.1][self.family];
        let mut slot = [0u8; SLOT_BYTES.1];
        let slot = &mut slot[..slot_bytes];
        for index in 0..self.buckets * FLOW_WAYS as usize {
            let at = index * slot_bytes;
            // A slot never written (its version still 0) holds nothing: one load.
            if self
                .word(at + word_at)
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            {
                continue;
            }
            // A slot being written as it is read is read again; one still changing after a
            // few tries is left out of this count (its flow is busy, not lost).
            if (0..4).any(|_| self.read_slot(at, word_at, slot)) {
                census.count(matcher, slot, now);
            }
        }
    }

    /// Each live flow of the listeners `matcher` names in buckets `buckets`, at flow time
    /// `now`: listener id, client, backend.
    fn each_live(
        &self,
        buckets: std::ops::Range<usize>,
        matcher: &Matcher,
        now: u32,
        mut f: impl FnMut((usize, SocketAddr, SocketAddr)),
    ) {
        let slot_bytes = [SLOT_BYTES.0, SLOT_BYTES.1][self.family];
        let word_at = [WORD_AT.0, WORD_AT.1][self.family];
        let mut slot = [0u8; SLOT_BYTES.1];
        let slot = &mut slot[..slot_bytes];
        let ways = FLOW_WAYS as usize;
        for index in buckets.start.min(self.buckets) * ways..buckets.end.min(self.buckets) * ways {
            let at = index * slot_bytes;
            if self
                .word(at + word_at)
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            {
                continue;
            }
            if (0..4).any(|_| self.read_slot(at, word_at, slot))
                && let Some(flow) = matcher.live_client_flow(slot, now)
            {
                f(flow);
            }
        }
    }

    /// Reads the slot at byte `at` into `out` as the program's readers do: kept only if its
    /// version was even and unchanged around the read.
    fn read_slot(&self, at: usize, word_at: usize, out: &mut [u8]) -> bool {
        use std::sync::atomic::{Ordering, fence};
        let word = |offset: usize| self.word(at + offset);
        let seen = word(word_at).load(Ordering::Acquire);
        if seen & VERSION_ONE != 0 {
            return false;
        }
        for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&word(4 * i).load(Ordering::Relaxed).to_ne_bytes());
        }
        fence(Ordering::Acquire);
        word(word_at).load(Ordering::Relaxed) == seen
    }
}

impl MappedTable {
    /// The 4-byte word at byte `at` of the table (`at` 4-aligned, within a slot).
    fn word(&self, at: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(
            at.is_multiple_of(4) && at + 4 <= self.len,
            "word {at} of {}",
            self.len
        );
        // SAFETY: `at` is within the mapping and 4-aligned (checked; the mapping starts on a
        // page), the mapping lives as long as `self`, and the program writes these words too,
        // so they are only read, atomically.
        unsafe {
            std::sync::atomic::AtomicU32::from_ptr(self.at.as_ptr().cast::<u8>().add(at).cast())
        }
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: the mapping `of` made, unmapped once; no reference into it outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.at, self.len) };
    }
}

/// Counting the live flows of the kernel listeners: the mapped tables and the listeners as
/// last written. Runs without the [`Kernel`]: a count of a large table takes tens of
/// milliseconds, and updates need not wait for it.
pub struct FlowCount {
    tables: std::sync::Arc<[MappedTable; 2]>,
    listeners: Vec<(usize, Counted)>,
    /// The ids of the `[sync]` listeners.
    synced: Vec<usize>,
}

impl FlowCount {
    /// Reads every slot of both tables: the live flows per listener (by id) and backend.
    pub fn run(&self) -> FlowCensus {
        let ways = u64::from(FLOW_WAYS);
        let [v4, v6] = &*self.tables;
        let mut census = FlowCensus::new(
            MAX_SERVICES,
            (v4.buckets as u64 * ways, v6.buckets as u64 * ways),
        );
        let matcher = Matcher::new(self.listeners.iter().copied());
        let now = monotonic_ns() >> FLOW_TIME_SHIFT;
        for table in [v4, v6] {
            table.count_into(&mut census, &matcher, now as u32);
        }
        census
    }

    /// The live flows of the `[sync]` listeners in part `part` of `parts` of each table (by
    /// buckets), for renewing them with the peers: listener id, client, backend, into `out`.
    /// Reading every part in turn reads every slot once.
    pub fn synced_flows(
        &self,
        part: usize,
        parts: usize,
        out: &mut Vec<(usize, SocketAddr, SocketAddr)>,
    ) {
        if self.synced.is_empty() {
            return;
        }
        let matcher = Matcher::new(
            self.listeners
                .iter()
                .copied()
                .filter(|(id, _)| self.synced.contains(id)),
        );
        let now = (monotonic_ns() >> FLOW_TIME_SHIFT) as u32;
        let parts = parts.max(1);
        for table in self.tables.iter() {
            let from = table.buckets * (part % parts) / parts;
            let to = table.buckets * (part % parts + 1) / parts;
            table.each_live(from..to, &matcher, now, |flow| out.push(flow));
        }
    }
}

/// The monotonic clock in nanoseconds: the program's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// A backend's flags (in `backends` and `replies`); `takes_new`: new clients may be placed on
/// it (persistence sends a client back to it only then).
fn backend_flags(b: &crate::Backend, method: Method, takes_new: bool) -> u16 {
    (if b.keeps_flows {
        BACKEND_KEEPS_FLOWS
    } else {
        0
    }) | if b.local { BACKEND_LOCAL } else { 0 }
        | if takes_new { BACKEND_TAKES_NEW } else { 0 }
        | if matches!(method, Method::Masquerade { .. }) {
            BACKEND_MASQUERADE
        } else {
            0
        }
}

/// The backends' side of direct server return: the decapsulating program, attached at
/// ingress of a backend's interfaces, taking IP in IP (and GUE to the given ports) from the
/// given balancers only. Detached when dropped.
pub struct Decap {
    ebpf: Ebpf,
    links: Vec<SchedClassifierLinkId>,
    counts: PerCpuArray<MapData, u64>,
}

impl Decap {
    /// Loads the program, admits `balancers` and GUE on `gue_ports`, attaches it to
    /// `interfaces`.
    pub fn attach(
        interfaces: &[String],
        balancers: &[IpAddr],
        gue_ports: &[u16],
    ) -> Result<Decap, Error> {
        let mut ebpf = EbpfLoader::new()
            .load(DECAP)
            .map_err(|e| Error::Load(e.to_string()))?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Load(format!("the program has no map {name}")))
        };
        let mut admitted: BpfHashMap<MapData, u32, u8> =
            BpfHashMap::try_from(take("balancers")?).map_err(update_error)?;
        let mut admitted6: BpfHashMap<MapData, [u8; 16], u8> =
            BpfHashMap::try_from(take("balancers6")?).map_err(update_error)?;
        for &b in balancers {
            match wire(b) {
                Wire::V4(addr) => admitted.insert(addr, 1, 0),
                Wire::V6(addr) => admitted6.insert(addr, 1, 0),
            }
            .map_err(update_error)?;
        }
        let mut ports: BpfHashMap<MapData, u16, u8> =
            BpfHashMap::try_from(take("gue_ports")?).map_err(update_error)?;
        for &port in gue_ports {
            ports.insert(port.to_be(), 1, 0).map_err(update_error)?;
        }
        let counts = PerCpuArray::try_from(
            ebpf.take_map("decap_counts")
                .ok_or_else(|| Error::Load("the program has no map decap_counts".into()))?,
        )
        .map_err(update_error)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut("udplb_decap")
            .ok_or_else(|| Error::Load("the program is missing".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| Error::Load(e.to_string()))?;
        program
            .load()
            .map_err(|e| Error::Load(verifier_error(&e)))?;
        let mut links = Vec::new();
        for interface in interfaces {
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
            links.push(
                program
                    .attach(interface, TcAttachType::Ingress)
                    .map_err(|e| Error::Attach {
                        interface: interface.clone(),
                        why: e.to_string(),
                    })?,
            );
        }
        // (The admitted balancers' maps live as long as the program.)
        drop((admitted, admitted6, ports));
        Ok(Decap {
            ebpf,
            links,
            counts,
        })
    }

    /// Datagrams decapsulated, encapsulated ones from others (left to the stack), and of the
    /// first those that came in GUE, summed over the CPUs.
    pub fn counts(&self) -> (u64, u64, u64) {
        let n = |i: u32| {
            self.counts
                .get(&i, 0)
                .map_or(0, |v| v.iter().copied().sum::<u64>())
        };
        let _ = (&self.ebpf, &self.links);
        (n(0), n(1), n(2))
    }
}

/// Removes the maps an earlier udplb kept in `dir` in another layout than [`FLOW_LAYOUT`]
/// (their directories `flows-v*`): this program cannot read them, and pinned they would hold
/// their locked memory until the next boot. Their flows are placed anew, once.
fn unpin_other_layouts(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("flows-v") || name == FLOW_LAYOUT {
            continue;
        }
        let old = entry.path();
        let removed = std::fs::read_dir(&old)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .try_for_each(|pin| std::fs::remove_file(pin.path()))
            .and_then(|()| std::fs::remove_dir(&old));
        match removed {
            Ok(()) => tracing::info!(
                layout = %name,
                "kernel data plane: the maps kept in an earlier layout are removed (their \
                 flows are placed anew, once)"
            ),
            Err(e) => tracing::warn!(
                dir = %old.display(),
                error = %e,
                "kernel data plane: cannot remove the maps kept in an earlier layout"
            ),
        }
    }
}

/// Gives the flow tables their hash: the seed they were made with (kept with them), or a new
/// random one for new tables, and each table's size. Before the program is attached.
fn set_flow_params(ebpf: &mut Ebpf, sizes: &MapSizes) -> Result<(), Error> {
    let map = ebpf
        .map_mut("flow_params")
        .ok_or_else(|| Error::Load("the program has no map flow_params".into()))?;
    let mut params: Array<_, FlowParams> = Array::try_from(map).map_err(update_error)?;
    let kept = params.get(&0, 0).map_err(update_error)?;
    let seed = if kept.seed != 0 {
        kept.seed
    } else {
        random_seed()?
    };
    let new = FlowParams {
        seed,
        mask: sizes.flows - 1,
        mask6: sizes.flows6 - 1,
    };
    params.set(0, new, 0).map_err(update_error)
}

/// A random, non-zero seed.
fn random_seed() -> Result<u64, Error> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| Error::Load(format!("/dev/urandom: {e}")))?;
    Ok(u64::from_ne_bytes(bytes).max(1))
}

/// Removes the pins in `dir` of the maps whose size is no longer `sizes`' or, for the peers'
/// flows, `peer_flows`' (a pinned map is reused as it is, whatever this process asks: the
/// next load makes it anew, at its size). A flow table made anew gets a new hash seed
/// (`flow_params` too is made anew): an earlier process still running keeps its own.
fn unpin_resized(dir: &std::path::Path, sizes: &MapSizes, peer_flows: (u32, u32)) {
    let mut resized_flows = false;
    let peers = [
        ("peer_flows", peer_flows.0.max(1)),
        ("peer_flows6", peer_flows.1.max(1)),
    ];
    for (name, entries) in sizes.by_name().into_iter().chain(peers) {
        let pin = dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        if info.max_entries() != entries {
            resized_flows |= name.starts_with("flows");
            tracing::info!(
                map = name,
                was = info.max_entries(),
                now = entries,
                "kernel data plane: the kept map is resized: it starts afresh (its flows are \
                 placed anew)"
            );
            if let Err(e) = std::fs::remove_file(&pin) {
                tracing::warn!(map = name, error = %e, "kernel data plane: cannot remove the kept map");
            }
        }
    }
    if resized_flows {
        let _ = std::fs::remove_file(dir.join("flow_params"));
    }
}

/// Writes the entries of `new` that differ from `old` at `base`..; entries past the end of
/// `new` are left as they are (the program reads only `len` of them).
fn write_array(
    map: &mut Array<MapData, u32>,
    base: u32,
    old: &[u32],
    new: &[u32],
) -> Result<(), Error> {
    for (i, &v) in new.iter().enumerate() {
        if old.get(i) != Some(&v) {
            map.set(base + i as u32, v, 0).map_err(update_error)?;
        }
    }
    Ok(())
}

/// Makes service `id`'s entries of an allow or deny list `new` (they were `old`), each
/// network in the table of its family: the networks gone removed, the new ones added.
fn write_acl(
    map: &mut LpmTrie<MapData, [u8; 8], u8>,
    map6: &mut LpmTrie<MapData, [u8; 20], u8>,
    id: u32,
    old: &[(IpAddr, u8)],
    new: &[(IpAddr, u8)],
) -> Result<(), Error> {
    let key = |addr: &[u8], len: u8| {
        let mut data = [0u8; 20];
        data[..4].copy_from_slice(&id.to_be_bytes());
        data[4..4 + addr.len()].copy_from_slice(addr);
        (32 + u32::from(len), data)
    };
    let key4 = |addr: std::net::Ipv4Addr, len: u8| {
        let (bits, data) = key(&addr.octets(), len);
        LpmKey::new(bits, <[u8; 8]>::try_from(&data[..8]).expect("8 bytes"))
    };
    let key6 = |addr: std::net::Ipv6Addr, len: u8| {
        let (bits, data) = key(&addr.octets(), len);
        LpmKey::new(bits, data)
    };
    for &(addr, len) in old.iter().filter(|n| !new.contains(n)) {
        let _ = match addr {
            IpAddr::V4(a) => map.remove(&key4(a, len)),
            IpAddr::V6(a) => map6.remove(&key6(a, len)),
        };
    }
    for &(addr, len) in new.iter().filter(|n| !old.contains(n)) {
        match addr {
            IpAddr::V4(a) => map.insert(&key4(a, len), 1, 0),
            IpAddr::V6(a) => map6.insert(&key6(a, len), 1, 0),
        }
        .map_err(update_error)?;
    }
    Ok(())
}

/// The program in `ebpf` (aya keeps programs, and their links, in the `Ebpf`).
fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, Error> {
    ebpf.program_mut("udplb_ingress")
        .ok_or_else(|| Error::Load("the program is missing".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| Error::Load(e.to_string()))
}

/// The verifier's log, when it refused the program.
fn verifier_error(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError { verifier_log, .. } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            format!(
                "{e}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
        _ => e.to_string(),
    }
}
