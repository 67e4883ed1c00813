//! Prometheus `/metrics`: every counter udplb keeps, in the text exposition format, with the
//! `udplb_` prefix, `_total` counters and base units.
//!
//! Owns: metric names, help texts and labels (listed in docs/metrics.md). Values are read at
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
use udplb_core::DropReason;
use udplb_core::latency::Histogram;
use udplb_core::verdict::CloseReason;
use udplb_dataplane::ListenerTotals;

use crate::admin::State;

/// Renders the metrics of `state`.
pub fn render(state: &Arc<State>) -> Result<String, fmt::Error> {
    let mut registry = Registry::with_prefix("udplb");
    registry.register_collector(Box::new(Udplb(Arc::clone(state))));
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
            .chain(reload_families(&self.0))
            .chain(process_families());
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

fn listener_families(state: &State) -> Vec<Family<'static>> {
    let snap = state.shared.load();
    let mut f_in = Family::counter("datagrams_received", "Datagrams received from clients");
    let mut f_in_bytes = Family::counter("received", "Payload bytes received from clients").bytes();
    let mut f_fwd = Family::counter("datagrams_forwarded", "Datagrams sent to backends");
    let mut f_fwd_bytes = Family::counter("forwarded", "Payload bytes sent to backends").bytes();
    let mut f_rep_in = Family::counter("replies_received", "Datagrams received from backends");
    let mut f_rep_out = Family::counter("replies_sent", "Replies sent to clients");
    let mut f_rep_bytes =
        Family::counter("replied", "Payload bytes of replies sent to clients").bytes();
    let mut f_drops = Family::counter("drops", "Datagrams dropped, by reason");
    let mut f_active = Family::gauge("flows_active", "Live flows");
    let mut f_cap = Family::gauge("flow_capacity", "Flow cap of the listener over all workers");
    let mut f_created = Family::counter("flows_created", "Flows created");
    let mut f_closed = Family::counter("flows_closed", "Flows closed, by reason");
    let mut f_refused = Family::counter(
        "backend_refused",
        "Datagrams refused by backends (ICMP port, host or network unreachable)",
    );
    let mut f_timeouts = Family::counter(
        "reply_timeouts",
        "Requests a backend left unanswered for the reply timeout (request-response mode)",
    );
    let mut f_abuse = Family::counter(
        "abuse_diverted",
        "Datagrams of refused clients sent to the listener's abuse pool",
    );
    let mut f_reused = Family::counter(
        "upstream_sockets_reused",
        "Request-response flows opened on the spare socket of a completed flow",
    );
    let mut f_late = Family::counter(
        "late_replies",
        "Replies that came for a flow no longer there (completed or closed), discarded",
    );
    let mut f_shared = Family::gauge(
        "upstream_shared_sockets",
        "Upstream sockets shared by flows (listeners with shared_upstream)",
    );
    let mut f_trains = Family::counter(
        "gro_trains",
        "Trains of datagrams received as one (listeners with gro)",
    );
    let mut f_rebalanced = Family::counter(
        "flows_rebalanced",
        "Flows displaced by a failure moved back into balance once their pool was whole",
    );
    let mut f_kernel_drops = Family::counter(
        "kernel_receive_queue_drops",
        "Datagrams the kernel dropped on full listener sockets, summed over the workers' sockets",
    );
    for (i, l) in snap.listeners.iter().enumerate() {
        let t = ListenerTotals::sum(&state.stats, i);
        let name = || vec![("listener", Cow::Owned(l.name.clone()))];
        f_in.add(name(), t.datagrams_in as f64);
        f_in_bytes.add(name(), t.bytes_in as f64);
        f_fwd.add(name(), t.forwarded as f64);
        f_fwd_bytes.add(name(), t.bytes_forwarded as f64);
        f_rep_in.add(name(), t.replies_in as f64);
        f_rep_out.add(name(), t.replies_out as f64);
        f_rep_bytes.add(name(), t.bytes_out as f64);
        for r in DropReason::ALL {
            let mut labels = name();
            labels.push(("reason", Cow::Borrowed(r.name())));
            f_drops.add(labels, t.drops[r.index()] as f64);
        }
        f_active.add(name(), t.flows_live as f64);
        f_cap.add(name(), l.max_flows);
        f_created.add(name(), t.flows_created as f64);
        for r in CloseReason::ALL {
            let mut labels = name();
            labels.push(("reason", Cow::Borrowed(r.name())));
            f_closed.add(labels, t.flows_closed[r.index()] as f64);
        }
        f_refused.add(name(), t.backend_refused as f64);
        f_timeouts.add(name(), t.reply_timeouts as f64);
        f_abuse.add(name(), t.abuse_diverted as f64);
        f_reused.add(name(), t.sockets_reused as f64);
        f_late.add(name(), t.late_replies as f64);
        f_shared.add(name(), t.shared_sockets as f64);
        f_trains.add(name(), t.gro_trains as f64);
        f_kernel_drops.add(name(), t.kernel_drops as f64);
        f_rebalanced.add(name(), t.flows_rebalanced as f64);
    }
    vec![
        f_in,
        f_in_bytes,
        f_fwd,
        f_fwd_bytes,
        f_rep_in,
        f_rep_out,
        f_rep_bytes,
        f_drops,
        f_active,
        f_cap,
        f_created,
        f_closed,
        f_refused,
        f_timeouts,
        f_abuse,
        f_reused,
        f_late,
        f_trains,
        f_shared,
        f_kernel_drops,
        f_rebalanced,
    ]
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
    let mut fwd = Family::counter(
        "backend_datagrams_forwarded",
        "Datagrams sent to the backend",
    );
    let mut fwd_bytes =
        Family::counter("backend_forwarded", "Payload bytes sent to the backend").bytes();
    let mut rep = Family::counter(
        "backend_replies_received",
        "Datagrams received from the backend",
    );
    let mut rep_bytes =
        Family::counter("backend_replied", "Payload bytes received from the backend").bytes();
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
            let (f, fb, r, rb) = udplb_dataplane::backend_traffic(&state.stats, b.id.index());
            fwd.add(labels(), f as f64);
            fwd_bytes.add(labels(), fb as f64);
            rep.add(labels(), r as f64);
            rep_bytes.add(labels(), rb as f64);
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
    (
        vec![
            up, rotation, admin, weight, checks, passive, last, fwd, fwd_bytes, rep, rep_bytes,
        ],
        [reply_latency, check_duration],
    )
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
        let mut f = Family::counter("process_cpu", "CPU time used by udplb").seconds();
        f.add(Vec::new(), (utime + stime) / ticks);
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
