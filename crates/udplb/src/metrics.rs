//! Prometheus `/metrics`: every counter udplb keeps, in the text exposition format, with the
//! `udplb_` prefix, `_total` counters and base units.
//!
//! Owns: metric names, help texts and labels (listed in docs/metrics.md), but for the
//! per-listener and per-backend counters, named once with their fields in
//! [`udplb_dataplane::stats`] and exported here as they are defined there. Values are read at
//! scrape time: the workers' single-writer counters are summed here, so the data path never
//! touches a shared atomic for metrics. Must not: keep state of its own or lock anything the
//! data plane takes (the health status mutex belongs to the control plane).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use udplb_core::latency::Histogram;
use udplb_core::payload::KeySpec;
use udplb_dataplane::stats::{Kind, Unit as CountUnit};
use udplb_dataplane::{
    BACKEND_COUNTERS, BackendTotals, CounterDef, LISTENER_COUNTERS, ListenerTotals, Total,
};

use crate::admin::State;

/// Renders the metrics of `state`.
pub fn render(state: &Arc<State>) -> Result<String, fmt::Error> {
    // udplb's own metrics under `udplb_`; the process's under the standard `process_` names
    // every exporter uses (so dashboards and alerts made for them work).
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Process));
    registry
        .sub_registry_with_prefix("udplb")
        .register_collector(Box::new(Udplb(Arc::clone(state))));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

struct Udplb(Arc<State>);

impl fmt::Debug for Udplb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("udplb metrics")
    }
}

type Labels<'a> = Vec<(&'static str, Cow<'a, str>)>;

/// One metric family: name, help, unit, type, and its labelled values.
struct Family<'a> {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    values: Vec<(Labels<'a>, f64)>,
}

impl<'a> Family<'a> {
    fn counter(name: &'static str, help: &'static str) -> Self {
        Family {
            name,
            help,
            unit: None,
            kind: MetricType::Counter,
            values: Vec::new(),
        }
    }

    fn gauge(name: &'static str, help: &'static str) -> Self {
        Family {
            name,
            help,
            unit: None,
            kind: MetricType::Gauge,
            values: Vec::new(),
        }
    }

    fn bytes(mut self) -> Self {
        self.unit = Some(Unit::Bytes);
        self
    }

    fn seconds(mut self) -> Self {
        self.unit = Some(Unit::Seconds);
        self
    }

    fn add(&mut self, labels: Labels<'a>, value: impl Into<f64>) {
        self.values.push((labels, value.into()));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for (labels, value) in &self.values {
            if labels.is_empty() {
                encode_value(&mut metric, self.kind, *value)?;
            } else {
                encode_value(&mut metric.encode_family(labels)?, self.kind, *value)?;
            }
        }
        Ok(())
    }
}

fn encode_value(m: &mut MetricEncoder, kind: MetricType, value: f64) -> fmt::Result {
    match kind {
        MetricType::Counter => m.encode_counter::<NoLabelSet, _, f64>(&value, None),
        _ => m.encode_gauge(&value),
    }
}

/// One histogram family (seconds): name, help, and its labelled histograms.
struct HistogramFamily<'a> {
    name: &'static str,
    help: &'static str,
    values: Vec<(Labels<'a>, Histogram)>,
}

impl<'a> HistogramFamily<'a> {
    fn new(name: &'static str, help: &'static str) -> Self {
        HistogramFamily {
            name,
            help,
            values: Vec::new(),
        }
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut metric = encoder.encode_descriptor(
            self.name,
            self.help,
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (labels, h) in &self.values {
            // prometheus-client writes `le="+Inf"` for f64::MAX and accumulates the cells.
            let cells: Vec<(f64, u64)> = h
                .cells_seconds()
                .map(|(le, n)| (if le.is_finite() { le } else { f64::MAX }, n))
                .collect();
            metric
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(h.sum_us as f64 / 1e6, h.count(), &cells, None)?;
        }
        Ok(())
    }
}

impl Collector for Udplb {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let (per_backend, histograms) = backend_families(&self.0);
        let families = listener_families(&self.0)
            .into_iter()
            .chain(per_backend)
            .chain(pool_families(&self.0))
            .chain(announce_families(&self.0))
            .chain(sync_families(&self.0))
            .chain(kernel_families(&self.0))
            .chain(payload_key_families(&self.0))
            .chain(tcp_families(&self.0))
            .chain(reload_families(&self.0));
        for f in families {
            f.encode(&mut encoder)?;
        }
        for h in histograms {
            h.encode(&mut encoder)?;
        }
        let mut info =
            encoder.encode_descriptor("build", "udplb's version", None, MetricType::Info)?;
        info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        Ok(())
    }
}

/// The family of counter `def`, without values: its exported name split as prometheus-client
/// composes it (prefix, name, unit, `_total`).
fn family_of(def: &'static CounterDef) -> Family<'static> {
    let name = def.metric.strip_prefix("udplb_").unwrap_or(def.metric);
    let name = match def.kind {
        Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
        Kind::Gauge => name,
    };
    let name = match def.unit {
        CountUnit::Bytes => name.strip_suffix("_bytes").unwrap_or(name),
        CountUnit::Count => name,
    };
    let family = match def.kind {
        Kind::Counter => Family::counter(name, def.help),
        Kind::Gauge => Family::gauge(name, def.help),
    };
    match def.unit {
        CountUnit::Bytes => family.bytes(),
        CountUnit::Count => family,
    }
}

/// Adds `totals`, one per family of `families` (made by [`family_of`] from the same table, in
/// the same order), with `labels`.
fn add_totals<'a>(
    families: &mut [Family<'a>],
    totals: Vec<(&'static CounterDef, Total)>,
    labels: impl Fn() -> Labels<'a>,
) {
    for (family, (def, total)) in families.iter_mut().zip(totals) {
        match total {
            Total::One(n) => family.add(labels(), n as f64),
            Total::PerReason(values) => {
                for (reason, n) in values {
                    let mut l = labels();
                    l.push((def.label.unwrap_or("reason"), Cow::Borrowed(reason)));
                    family.add(l, n as f64);
                }
            }
        }
    }
}

/// Per-listener families: every counter of [`LISTENER_COUNTERS`], and each listener's flow cap.
fn listener_families(state: &State) -> Vec<Family<'static>> {
    let snap = state.shared.load();
    let mut counters: Vec<Family> = LISTENER_COUNTERS.iter().map(family_of).collect();
    let mut capacity = Family::gauge("flow_capacity", "Flow cap of the listener over all workers");
    let mut remembered = Family::gauge(
        "persistence_clients",
        "Clients the listener remembers the backend of (persistence)",
    );
    let mut returned = Family::counter(
        "persistence_returns",
        "New flows sent to the backend their client last used",
    );
    let mut full = Family::counter(
        "persistence_full",
        "Clients not remembered because the persistence table was full",
    );
    for (i, l) in snap.listeners.iter().enumerate() {
        let name = || vec![("listener", Cow::Owned(l.name.clone()))];
        add_totals(
            &mut counters,
            ListenerTotals::sum(&state.stats, i).values(),
            name,
        );
        capacity.add(name(), l.max_flows);
        if let Some(p) = &l.persistence {
            let c = p.counts();
            remembered.add(name(), c.clients as f64);
            returned.add(name(), c.returned as f64);
            full.add(name(), c.full as f64);
        }
    }
    // Next to the live flows it caps.
    let at = LISTENER_COUNTERS
        .iter()
        .position(|d| d.field == "flows_live")
        .map_or(counters.len(), |i| i + 1);
    counters.insert(at, capacity);
    if !remembered.values.is_empty() {
        counters.extend([remembered, returned, full]);
    }
    counters
}

/// Per-pool families: whether each pool holds its quorum (once every backend reported).
fn pool_families(state: &State) -> Vec<Family<'static>> {
    let snap = state.shared.load();
    let quorum = state.quorum.lock().unwrap_or_else(|p| p.into_inner());
    let mut held = Family::gauge(
        "pool_quorum_held",
        "1 while the pool holds its quorum (always 1 without a quorum rule)",
    );
    for (pool, q) in snap.pools.iter().zip(quorum.iter()) {
        if let Some(q) = q {
            held.add(vec![("pool", Cow::Owned(pool.name.clone()))], u8::from(*q));
        }
    }
    if held.values.is_empty() {
        Vec::new()
    } else {
        vec![held]
    }
}

/// The announcement through a routing daemon, with `[announce]` (none otherwise).
fn announce_families(state: &State) -> Vec<Family<'static>> {
    let Some(status) = &state.announce else {
        return Vec::new();
    };
    let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut announced = Family::gauge(
        "announced",
        "1 while the routing daemon was last told to announce the listeners' addresses",
    );
    announced.add(vec![], u8::from(s.announced == Some(true)));
    let mut wanted = Family::gauge(
        "announce_wanted",
        "1 while udplb serves and every listener's pool holds its quorum",
    );
    wanted.add(vec![], u8::from(s.wanted));
    let mut changes = Family::counter(
        "announce_changes",
        "Announce and withdraw commands that succeeded",
    );
    changes.add(vec![], s.changes as f64);
    let mut failures = Family::counter(
        "announce_failures",
        "Announce and withdraw commands that failed (they are retried)",
    );
    failures.add(vec![], s.failures as f64);
    vec![announced, wanted, changes, failures]
}

/// The kernel data plane's traffic and drops, when a listener uses it (none otherwise).
fn kernel_families(state: &State) -> Vec<Family<'static>> {
    let Some(plane) = &state.kernel else {
        return Vec::new();
    };
    let snap = state.shared.load();
    let mut datagrams = Family::counter(
        "kernel_datagrams",
        "Datagrams the kernel data plane forwarded to the backend",
    );
    let mut bytes = Family::counter(
        "kernel_forwarded",
        "Bytes the kernel data plane forwarded to the backend",
    )
    .bytes();
    let mut replies = Family::counter(
        "kernel_replies",
        "Replies of the backend the kernel data plane sent on to clients",
    );
    let mut reply_bytes = Family::counter(
        "kernel_replied",
        "Bytes of the backend's replies the kernel data plane sent on to clients",
    )
    .bytes();
    let mut errors = Family::counter(
        "kernel_icmp_errors",
        "ICMP errors about datagrams to the backend (a closed port, say), sent on to clients \
         and counted as passive health failures",
    );
    let mut flows = Family::counter(
        "kernel_flows_created",
        "Flows the kernel data plane placed on the backend (flow mode)",
    );
    let mut persisted = Family::counter(
        "kernel_persistence_returns",
        "New flows (in datagram mode, datagrams) the kernel data plane's persistence sent back \
         to the backend their client last used",
    );
    let (census, ..) = plane.flows();
    let mut live = Family::gauge(
        "kernel_flows",
        "Live flows in the kernel flow table on the backend (flow mode; counted at most once \
         a second by reading the table)",
    );
    for (id, &li) in plane.listeners.iter().enumerate() {
        let listener = snap
            .listeners
            .get(li)
            .map_or_else(String::new, |l| l.name.clone());
        let live_on = census.per_listener.get(id);
        for (addr, t) in plane.traffic(id) {
            let labels = || {
                vec![
                    ("listener", Cow::Owned(listener.clone())),
                    ("backend", Cow::Owned(addr.to_string())),
                ]
            };
            datagrams.add(labels(), t.packets as f64);
            bytes.add(labels(), t.bytes as f64);
            replies.add(labels(), t.reply_packets as f64);
            reply_bytes.add(labels(), t.reply_bytes as f64);
            errors.add(labels(), t.icmp_errors as f64);
            persisted.add(labels(), t.persisted as f64);
            flows.add(labels(), t.flows as f64);
            let n = live_on.and_then(|m| m.get(&addr)).copied().unwrap_or(0);
            live.add(labels(), n as f64);
        }
    }
    let mut slots = Family::gauge(
        "kernel_flow_table_slots",
        "Flows the kernel flow table of each IP family holds at most (buckets of 4 flows)",
    );
    slots.add(vec![("family", "ipv4".into())], census.slots.0 as f64);
    slots.add(vec![("family", "ipv6".into())], census.slots.1 as f64);
    let d = plane.drops();
    let mut dropped = Family::counter(
        "kernel_dropped",
        "Datagrams the kernel data plane dropped, by reason",
    );
    for (reason, n) in [
        ("no_backend", d.no_backend),
        ("ttl", d.ttl),
        ("no_route", d.no_route),
        ("rewrite", d.rewrite),
        ("denied", d.denied),
        ("no_port", d.no_port),
        ("too_big", d.too_big),
        ("rate_limited", d.rate_limited),
        ("flow_rate_limited", d.flow_rate_limited),
        ("amplification", d.amplification),
        ("flow_gone", d.flow_gone),
    ] {
        dropped.add(vec![("reason", reason.into())], n as f64);
    }
    let mut passed = Family::counter(
        "kernel_fragments_passed",
        "Later IP fragments whose first fragment the kernel data plane had not seen, left to \
         the stack",
    );
    passed.add(vec![], d.fragments_passed as f64);
    let mut forged = Family::counter(
        "kernel_forged_passed",
        "Packets with a backend's source address that came from the clients' side: not \
         rewritten to the listener's address, left to the stack",
    );
    forged.add(vec![], d.forged as f64);
    let mut oversize = Family::counter(
        "kernel_oversize_passed",
        "IPv4 datagrams too big for the route onward and without DF: rewritten, then forwarded \
         by the stack, which fragments them",
    );
    oversize.add(vec![], d.oversize_passed as f64);
    let mut cut = Family::counter(
        "kernel_cut_for_tunnel",
        "dsr: IPv4 datagrams without DF too big once encapsulated, cut into IP fragments that \
         fit before encapsulation (once per cut)",
    );
    cut.add(vec![], d.cut_for_tunnel as f64);
    let mut replaced = Family::counter(
        "kernel_flows_replaced",
        "New flows that took the place of a flow not idle in the kernel flow table (its bucket \
         full): the table is too small for the flows (max_flows)",
    );
    replaced.add(vec![], d.flows_replaced as f64);
    vec![
        datagrams,
        bytes,
        replies,
        reply_bytes,
        errors,
        flows,
        live,
        slots,
        persisted,
        dropped,
        passed,
        forged,
        oversize,
        cut,
        replaced,
    ]
}

/// Flow-state sync with other instances, with `[sync]` (none otherwise).
fn sync_families(state: &State) -> Vec<Family<'static>> {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(sync) = &state.sync else {
        return Vec::new();
    };
    let s = &sync.stats;
    let counter = |name, help, value: u64| {
        let mut f = Family::counter(name, help);
        f.add(vec![], value as f64);
        f
    };
    let mut refused = Family::counter(
        "sync_refused",
        "Sync datagrams refused, by reason (not from a peer's address, malformed, not \
         authenticated with the shared key, or replayed)",
    );
    for (reason, n) in crate::sync::REFUSED.iter().zip(&s.refused) {
        refused.add(vec![("reason", (*reason).into())], n.load(Relaxed) as f64);
    }
    let mut entries = Family::gauge(
        "sync_placements",
        "Placements learned from the peers and held (consulted when a flow opens)",
    );
    entries.add(vec![], sync.synced.len() as f64);
    let dropped = sync.not_sent();
    vec![
        counter(
            "sync_messages_sent",
            "Sync datagrams sent to the peers (each to one peer)",
            s.messages_sent.load(Relaxed),
        ),
        counter(
            "sync_placements_sent",
            "Placements sent to the peers (a flow opened or renewed, once per peer)",
            s.placements_sent.load(Relaxed),
        ),
        counter(
            "sync_send_errors",
            "Sync datagrams the system refused to send",
            s.send_errors.load(Relaxed),
        ),
        counter(
            "sync_placements_not_sent",
            "Placements dropped before sending: a worker's outbox (or the kernel program's queue) \
             was full",
            dropped,
        ),
        counter(
            "sync_messages_received",
            "Authenticated sync datagrams received from the peers",
            s.messages_received.load(Relaxed),
        ),
        counter(
            "sync_placements_received",
            "Placements received from the peers",
            s.placements_received.load(Relaxed),
        ),
        counter(
            "sync_placements_unknown_listener",
            "Placements received for a listener name this instance does not have",
            s.unknown_listener.load(Relaxed),
        ),
        counter(
            "sync_placements_table_full",
            "Placements received but not stored: sync.max_entries are held",
            s.table_full.load(Relaxed),
        ),
        counter(
            "sync_placements_used",
            "Flows opened to the backend a peer said the client's flow was on",
            sync.used(),
        ),
        refused,
        entries,
    ]
}

/// Per-listener families of the listeners that take TCP (none otherwise).
fn tcp_families(state: &State) -> Vec<Family<'static>> {
    let snap = state.shared.load();
    let mut connections =
        Family::counter("tcp_connections", "TCP connections proxied to a backend");
    let mut active = Family::gauge("tcp_connections_active", "TCP connections open");
    let mut capacity = Family::gauge(
        "tcp_connection_capacity",
        "TCP connections the listener holds open at most",
    );
    let mut refused = Family::counter("tcp_refused", "TCP connections closed at once, by reason");
    let mut failures = Family::counter(
        "tcp_backend_connect_failures",
        "TCP connects to a backend that failed (the next backend is tried)",
    );
    let mut idle = Family::counter(
        "tcp_idle_closed",
        "TCP connections closed after the idle timeout without traffic",
    );
    let mut forwarded =
        Family::counter("tcp_forwarded", "TCP bytes from clients to backends").bytes();
    let mut replied = Family::counter("tcp_replied", "TCP bytes from backends to clients").bytes();
    for (i, l) in snap.listeners.iter().enumerate() {
        let (Some(cap), Some(t)) = (l.tcp, state.tcp.get(i)) else {
            continue;
        };
        let n =
            |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
        let name = || vec![("listener", Cow::Owned(l.name.clone()))];
        connections.add(name(), n(&t.connections));
        active.add(name(), n(&t.active));
        capacity.add(name(), cap);
        for (reason, v) in t.refused() {
            let mut labels = name();
            labels.push(("reason", Cow::Borrowed(reason)));
            refused.add(labels, v as f64);
        }
        failures.add(name(), n(&t.backend_connect_failures));
        idle.add(name(), n(&t.idle_closed));
        forwarded.add(name(), n(&t.bytes_forwarded));
        replied.add(name(), n(&t.bytes_replied));
    }
    [
        connections,
        active,
        capacity,
        refused,
        failures,
        idle,
        forwarded,
        replied,
    ]
    .into_iter()
    .filter(|f| !f.values.is_empty())
    .collect()
}

/// Per-pool families of the pools that read payload keys (none otherwise).
fn payload_key_families(state: &State) -> Vec<Family<'static>> {
    let snap = state.shared.load();
    let mut malformed = Family::counter(
        "payload_key_malformed",
        "Datagrams whose payload key could not be read (scheduled as usual)",
    );
    let mut states = Family::gauge(
        "payload_key_states",
        "RADIUS States the pool remembers the issuing backend of",
    );
    let mut returns = Family::counter(
        "payload_key_state_returns",
        "Access-Requests sent to the backend that issued their State",
    );
    let mut full = Family::counter(
        "payload_key_states_full",
        "RADIUS States not remembered because the table was full",
    );
    for pool in &snap.pools {
        let Some(k) = &pool.payload_key else {
            continue;
        };
        let c = k.counts();
        let name = || vec![("pool", Cow::Owned(pool.name.clone()))];
        malformed.add(name(), c.malformed as f64);
        if matches!(k.spec(), KeySpec::Radius { .. }) {
            states.add(name(), c.states as f64);
            returns.add(name(), c.state_returns as f64);
            full.add(name(), c.states_full as f64);
        }
    }
    [malformed, states, returns, full]
        .into_iter()
        .filter(|f| !f.values.is_empty())
        .collect()
}

/// Per-backend families: gauges and counters, and the histograms of reply latency
/// (request-response listeners) and health-check duration.
fn backend_families(state: &State) -> (Vec<Family<'static>>, [HistogramFamily<'static>; 2]) {
    let snap = state.shared.load();
    let health = state
        .health
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut up = Family::gauge(
        "backend_up",
        "1 if the backend passes its health checks (or has none)",
    );
    let mut rotation = Family::gauge(
        "backend_in_rotation",
        "1 if new flows may go to the backend",
    );
    let mut admin = Family::gauge(
        "backend_admin_state",
        "The backend's admin state (1 for the current one)",
    );
    let mut weight = Family::gauge("backend_weight", "The backend's weight");
    let mut checks = Family::counter("health_checks", "Active health checks, by result");
    let mut passive = Family::counter(
        "health_passive_failures",
        "Passive failure signals of the backend",
    );
    let mut last = Family::gauge(
        "health_check_duration_last",
        "Duration of the last active check",
    )
    .seconds();
    let mut traffic: Vec<Family> = BACKEND_COUNTERS.iter().map(family_of).collect();
    let mut reply_latency = HistogramFamily::new(
        "backend_reply_latency",
        "Request-response mode: time from a flow's first request to its first reply",
    );
    let mut check_duration =
        HistogramFamily::new("health_check_duration", "Duration of active checks");
    for (pi, pool) in snap.pools.iter().enumerate() {
        for (bi, b) in pool.backends.iter().enumerate() {
            let labels = || {
                vec![
                    ("pool", Cow::Owned(pool.name.clone())),
                    ("backend", Cow::Owned(b.spec.addr.to_string())),
                ]
            };
            let status = health.get(pi).and_then(|p| p.get(bi));
            up.add(labels(), u8::from(status.is_none_or(|s| s.healthy)));
            rotation.add(labels(), u8::from(pool.tier.contains(bi)));
            for (state_name, st) in [
                ("enabled", udplb_core::snapshot::AdminState::Enabled),
                ("draining", udplb_core::snapshot::AdminState::Draining),
                ("disabled", udplb_core::snapshot::AdminState::Disabled),
            ] {
                let mut l = labels();
                l.push(("state", Cow::Borrowed(state_name)));
                admin.add(l, u8::from(b.admin == st));
            }
            weight.add(labels(), b.spec.weight);
            add_totals(
                &mut traffic,
                BackendTotals::sum(&state.stats, b.id.index()).values(),
                labels,
            );
            if let Some(h) = udplb_dataplane::backend_reply_latency(&state.stats, b.id.index()) {
                reply_latency.values.push((labels(), h));
            }
            if let Some(s) = status.filter(|s| s.check_latency.count() > 0) {
                check_duration
                    .values
                    .push((labels(), s.check_latency.clone()));
            }
            if let Some(s) = status {
                for (result, n) in [
                    ("ok", s.checks_ok),
                    ("failed", s.checks_failed),
                    ("unknown", s.checks_unknown),
                ] {
                    let mut l = labels();
                    l.push(("result", Cow::Borrowed(result)));
                    checks.add(l, n as f64);
                }
                passive.add(labels(), s.passive_failures as f64);
                if let Some(us) = s.last_check_us {
                    last.add(labels(), us as f64 / 1e6);
                }
            }
        }
    }
    let families = [up, rotation, admin, weight, checks, passive, last]
        .into_iter()
        .chain(traffic)
        .collect();
    (families, [reply_latency, check_duration])
}

fn reload_families(state: &State) -> Vec<Family<'static>> {
    let r = state
        .reload
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut reloads = Family::counter("reloads", "Configuration reloads (SIGHUP), by result");
    reloads.add(
        vec![("result", Cow::Borrowed("success"))],
        r.succeeded as f64,
    );
    reloads.add(vec![("result", Cow::Borrowed("failure"))], r.failed as f64);
    let mut last = Family::gauge(
        "reload_last_success_timestamp",
        "Unix time of the last successful (re)load",
    )
    .seconds();
    last.add(Vec::new(), r.last_success_unix);
    vec![reloads, last]
}

/// CPU, memory and descriptors of the process, from /proc/self.
/// The process: CPU time, memory, descriptors, start time.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        process_families()
            .iter()
            .try_for_each(|f| f.encode(&mut encoder))
    }
}

fn process_families() -> Vec<Family<'static>> {
    let mut out = Vec::new();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(vec![], |(_, rest)| rest.split(' ').collect());
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = 100.0; // USER_HZ on Linux
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let mut f =
            Family::counter("process_cpu", "Total user and system CPU time spent").seconds();
        f.add(Vec::new(), (utime + stime) / ticks);
        out.push(f);
    }
    // Field 22: start time in ticks after boot.
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(start), Some(boot)) = (field(22), boot) {
        let mut f = Family::gauge(
            "process_start_time",
            "Start time of the process since the Unix epoch",
        )
        .seconds();
        f.add(Vec::new(), boot + start / ticks);
        out.push(f);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
        });
    if let Some(kib) = rss_kib {
        let mut f = Family::gauge("process_resident_memory", "Resident memory of udplb").bytes();
        f.add(Vec::new(), kib * 1024.0);
        out.push(f);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let mut f = Family::gauge("process_open_fds", "Open file descriptors of udplb");
        f.add(Vec::new(), fds.count() as f64);
        out.push(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Families for tests, encoded like the real collector's.
    struct Families(Vec<Family<'static>>);

    impl fmt::Debug for Families {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("test families")
        }
    }

    impl Collector for Families {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            self.0.iter().try_for_each(|f| f.encode(&mut encoder))
        }
    }

    fn tables() -> impl Iterator<Item = &'static CounterDef> {
        LISTENER_COUNTERS.iter().chain(BACKEND_COUNTERS)
    }

    /// Every counter of the tables comes out under the metric name its definition gives
    /// (prefix, unit and `_total` as prometheus-client composes them), with its kind and help.
    #[test]
    fn every_counter_is_exported_under_its_defined_name() {
        let mut families: Vec<Family> = tables().map(family_of).collect();
        for (family, def) in families.iter_mut().zip(tables()) {
            let mut labels = vec![("listener", Cow::Borrowed("l"))];
            if let Some(label) = def.label {
                labels.push((label, Cow::Borrowed("r")));
            }
            family.add(labels, 1.0);
        }
        let mut registry = Registry::with_prefix("udplb");
        registry.register_collector(Box::new(Families(families)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for def in tables() {
            let (family, kind) = match def.kind {
                Kind::Counter => (def.metric.strip_suffix("_total").unwrap(), "counter"),
                Kind::Gauge => (def.metric, "gauge"),
            };
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{}: no {kind} {family} in\n{text}",
                def.field
            );
            assert!(
                text.contains(&format!("# HELP {family} {}\n", def.help)),
                "{}: help\n{text}",
                def.field
            );
            assert!(
                text.contains(&format!("\n{}{{listener=\"l\"", def.metric)),
                "{}: no sample of {} in\n{text}",
                def.field,
                def.metric
            );
        }
    }

    /// The rows of docs/metrics.md's tables: metric name (first column) to the section it is
    /// in, its type and its meaning.
    fn documented() -> std::collections::HashMap<String, (String, String, String)> {
        let docs = include_str!("../../../docs/metrics.md");
        let mut section = String::new();
        let mut rows = std::collections::HashMap::new();
        for line in docs.lines() {
            if let Some(title) = line.strip_prefix("## ") {
                section = title.to_string();
                continue;
            }
            let cells: Vec<&str> = line
                .strip_prefix('|')
                .map(|l| l.split('|').map(str::trim).collect())
                .unwrap_or_default();
            if let [name, kind, meaning, ..] = cells[..] {
                let name = name.trim_matches('`');
                if name.starts_with("udplb_") {
                    let row = (section.clone(), kind.to_string(), meaning.to_string());
                    rows.insert(name.to_string(), row);
                }
            }
        }
        rows
    }

    /// docs/metrics.md has a row for every counter the tables define, in the section of its
    /// labels, with its type and the label that tells its values apart: the docs cannot drift
    /// from what is exported.
    #[test]
    fn docs_have_a_row_for_every_counter() {
        let rows = documented();
        for (table, section) in [
            (LISTENER_COUNTERS, "Per listener"),
            (BACKEND_COUNTERS, "Per backend"),
        ] {
            for def in table {
                let Some((in_section, kind, meaning)) = rows.get(def.metric) else {
                    panic!(
                        "docs/metrics.md has no row for {} ({})",
                        def.metric, def.field
                    );
                };
                assert!(
                    in_section.starts_with(section),
                    "{} is documented under {in_section:?}, not {section:?}",
                    def.metric
                );
                let expected = match def.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                };
                assert_eq!(kind, expected, "docs/metrics.md: type of {}", def.metric);
                if let Some(label) = def.label {
                    assert!(
                        meaning.contains(&format!("label `{label}`")),
                        "docs/metrics.md: {} does not name its label {label}",
                        def.metric
                    );
                }
            }
        }
    }
}
