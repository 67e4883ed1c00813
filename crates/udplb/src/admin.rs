//! The admin endpoint: `GET /stats` returns every listener's counters as JSON, summed over the
//! workers at request time; `GET /metrics` the same in Prometheus form; the API under
//! `/api/v1` ([`crate::api`]).
//!
//! Owns: the HTTP surface of the control plane and what it may cost: at most
//! [`Connections::cap`] connections at once (the others are closed as soon as accepted), fitted
//! with the health checks into the descriptors the data plane leaves free
//! ([`connection_cap`]); a request header must arrive within [`HEADER_TIMEOUT`] (which also
//! closes a connection idle that long after its last response), a request is answered within
//! [`REQUEST_TIMEOUT`], and no connection lives longer than [`CONNECTION_LIFETIME`].
//! Must not: hold a lock the data plane takes, or be reachable beyond the address the operator
//! configured.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State as AxumState;
use axum::routing::get;
use serde_json::{Map, Value, json};
use udplb_core::snapshot::Snapshot;
use udplb_dataplane::{BackendTotals, CounterDef, ListenerTotals, Total, WorkerStats};

/// What the admin handlers read.
pub struct State {
    /// The published snapshot.
    pub shared: Arc<ArcSwap<Snapshot>>,
    /// Every worker's counters.
    pub stats: Vec<Arc<WorkerStats>>,
    /// Where the workers' clock starts (their core `Time` is the milliseconds since).
    pub epoch: std::time::Instant,
    /// Number of workers.
    pub workers: usize,
    /// Backend health and check counters, by pool and backend.
    pub health: crate::health::Status,
    /// Outcome of configuration reloads.
    pub reload: crate::reload::Status,
    /// Where API changes go.
    pub publisher: tokio::sync::mpsc::Sender<crate::control::Command>,
    /// Whether the API may change anything.
    pub allow_changes: bool,
    /// The token changes must present, if any.
    pub token: Option<crate::token::Token>,
    /// Reloads asked for by the API (the same one SIGHUP uses).
    pub reloader: Arc<tokio::sync::Mutex<crate::reload::Reloader>>,
    /// Admin connections open, and how many may be.
    pub connections: Arc<Connections>,
    /// The TCP side of each listener (by snapshot index; untouched for UDP-only listeners).
    pub tcp: Arc<[crate::tcp::TcpStats]>,
    /// Each backend's rates, sampled by the admin thread.
    pub rates: crate::rates::Rates,
    /// When udplb started (Unix seconds).
    pub started_unix: f64,
    /// Each pool's quorum, held or not.
    pub quorum: crate::health::QuorumStatus,
    /// The announcement through a routing daemon, when `[announce]` is configured.
    pub announce: Option<crate::announce::Status>,
    /// Flow-state sync with other instances, when `[sync]` is configured.
    pub sync: Option<crate::sync::Status>,
    /// The kernel data plane, when a listener uses it.
    pub kernel: Option<Arc<crate::kernel::KernelPlane>>,
}

/// Most admin connections open at once, whatever the descriptors allow.
pub const MAX_CONNECTIONS: usize = 256;
/// Fewest admin connections allowed, even when the descriptor reserve is too small for them.
pub const MIN_CONNECTIONS: usize = 4;
/// How long a request's header may take to arrive, counted from the connection's start or the
/// end of its previous response: slow headers and idle connections are closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request (its body included) may take to be answered; a reload through the API
/// may wait for a reload under way (5 s at most) and then read the file (5 s at most).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a connection may stay open at all, however busy (a reader too slow for its
/// responses).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Descriptors the control plane may open besides health checks and admin connections: a
/// configuration read, the connection accepted over the cap before it is closed, `/proc` reads
/// for `/metrics`, and a margin.
const CONTROL_DESCRIPTORS: u64 = 8;

/// The descriptors the data plane leaves free at open-file limit `limit` (its workers open no
/// flow socket whose number is within this many of the limit), so that they stay for the
/// control plane however many flows there are: 1/16 of the limit (8 to 128), or what `cfg`'s
/// health checks, the control plane and [`MIN_CONNECTIONS`] admin connections need if that is
/// more (at most half the limit). Fixed at start: a reload that adds checks may find it short
/// (then said in the log, and checks that find no descriptor count as unknown).
pub fn descriptor_reserve(limit: u64, cfg: &udplb_config::Config) -> u64 {
    let needed = check_descriptors(cfg) + CONTROL_DESCRIPTORS + MIN_CONNECTIONS as u64;
    (limit / 16).clamp(8, 128).max(needed).min(limit / 2)
}

/// Descriptors health checking may hold at once under `cfg`: each actively checked backend's
/// check (a socket; an exec check, the pipes, `/dev/null` and process descriptor of starting a
/// program), the recovery probe of each backend without an active check, and each pool's
/// notify command being started.
pub fn check_descriptors(cfg: &udplb_config::Config) -> u64 {
    /// Descriptors of starting a program (stdio, the exec-error pipe, a pidfd).
    const PROGRAM: u64 = 6;
    cfg.pools
        .iter()
        .map(|pool| {
            let backends: u64 = pool
                .backends
                .iter()
                .map(|b| match b.active_check(pool).map(|c| &c.probe) {
                    Some(udplb_config::Probe::Exec { .. }) => PROGRAM,
                    _ => 1,
                })
                .sum();
            backends + if pool.notify.is_some() { PROGRAM } else { 0 }
        })
        .sum()
}

/// How many admin connections fit, with `cfg`'s health checks, in the descriptor reserve
/// `reserve` the data plane leaves: between [`MIN_CONNECTIONS`] and [`MAX_CONNECTIONS`]. Below
/// the minimum the reserve is too small, and the caller says so.
pub fn connection_cap(reserve: u64, cfg: &udplb_config::Config) -> (usize, bool) {
    let room = reserve.saturating_sub(check_descriptors(cfg) + CONTROL_DESCRIPTORS);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    (
        room.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS),
        room >= MIN_CONNECTIONS,
    )
}

/// Admin connections: how many are open, how many may be, how many were turned away.
#[derive(Debug, Default)]
pub struct Connections {
    live: AtomicUsize,
    cap: AtomicUsize,
    refused: AtomicU64,
}

impl Connections {
    pub fn new(cap: usize) -> Connections {
        Connections {
            cap: AtomicUsize::new(cap),
            ..Default::default()
        }
    }

    /// The cap in force.
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// A place for one more connection, or `None` at the cap (counted as refused).
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let admitted = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap()).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            Some(Slot(Arc::clone(self)))
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// One admitted connection; its place is freed when dropped.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves the admin endpoint on `listener` until the runtime stops. `limit` is the open-file
/// limit and `configs` the running configuration, from which the connection cap is worked out
/// (again after each reload).
pub async fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    reserve: u64,
    mut configs: tokio::sync::watch::Receiver<Arc<udplb_config::Config>>,
    mut handed_over: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the admin endpoint");
            return;
        }
    };
    let sampled = Arc::clone(&state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::rates::INTERVAL);
        loop {
            tick.tick().await;
            let snap = sampled.shared.load();
            sampled
                .rates
                .sample(&snap, &sampled.stats, std::time::Instant::now());
        }
    });
    let set_cap = |cfg: &udplb_config::Config, log: bool| {
        let (cap, fits) = connection_cap(reserve, cfg);
        state.connections.cap.store(cap, Ordering::Relaxed);
        if !fits {
            tracing::warn!(
                reserve,
                health_checks = check_descriptors(cfg),
                admin_connections = cap,
                "the descriptors kept from flows cannot hold the health checks and the admin \
                 endpoint: once flows take the others, checks may find none (they are then \
                 counted as unknown); raise the open file limit (LimitNOFILE)"
            );
        }
        if log && let Ok(address) = listener.local_addr() {
            tracing::info!(%address, max_connections = cap, "admin endpoint");
        }
    };
    set_cap(&configs.borrow_and_update(), true);
    let app = Router::new()
        .route("/", get(status_page))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .merge(crate::api::routes())
        .layer(axum::middleware::from_fn(within_request_timeout))
        .with_state(Arc::clone(&state));
    let mut accept_errors = crate::logging::RateLimited::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = handed_over.wait_for(|h| *h) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: the connection waits in the backlog meanwhile.
                accept_errors.warn("admin endpoint: cannot accept a connection", &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if configs.has_changed().unwrap_or(false) {
            set_cap(&configs.borrow_and_update(), false);
        }
        let Some(slot) = state.connections.admit() else {
            drop(stream); // over the cap: closed at once
            continue;
        };
        tokio::spawn(serve_connection(stream, app.clone(), slot));
    }
    // Handed over: the successor accepts; connections open here are served to their end.
    drop(listener);
    std::future::pending::<()>().await;
}

/// Serves one connection within the endpoint's bounds.
async fn serve_connection(stream: tokio::net::TcpStream, app: Router, _slot: Slot) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    // Handlers see the peer (the log of API changes names it).
    let app = match stream.peer_addr() {
        Ok(peer) => app.layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        Err(_) => app,
    };
    let service = hyper_util::service::TowerToHyperService::new(app);
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let deadline = Instant::now() + CONNECTION_LIFETIME;
    if tokio::time::timeout_at(deadline.into(), connection.as_mut())
        .await
        .is_err()
    {
        // Past its lifetime: finish the request under way, if any, then close.
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, connection).await;
    }
}

/// Answers 408 when a request (reading its body included) takes over [`REQUEST_TIMEOUT`].
async fn within_request_timeout(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => crate::control::Error::RequestTimeout(format!(
            "the request was not complete and answered within {}",
            humantime::format_duration(REQUEST_TIMEOUT)
        ))
        .into_response(),
    }
}

async fn metrics(AxumState(state): AxumState<Arc<State>>) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    match crate::metrics::render(&state) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The status page: static HTML that polls `/api/v1/status` every 2 s (no external resources).
async fn status_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("status.html"))
}

async fn stats(AxumState(state): AxumState<Arc<State>>) -> axum::Json<Value> {
    axum::Json(stats_json(&state))
}

pub(crate) fn stats_json(state: &State) -> Value {
    let snap = state.shared.load();
    let listeners: Vec<Value> = snap
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut listener = json!({
                "name": l.name,
                "address": l.address.to_string(),
                "pool": snap.pools[l.pool].name,
                "mode": l.mode.name(),
            });
            if let Value::Object(m) = &mut listener {
                put_counters(m, ListenerTotals::sum(&state.stats, i).values());
                let kernel = state
                    .kernel
                    .as_ref()
                    .is_some_and(|k| k.listeners.contains(&i));
                m.insert(
                    "dataplane".into(),
                    json!(if kernel { "kernel" } else { "socket" }),
                );
                if let (Some(cap), Some(t)) = (l.tcp, state.tcp.get(i)) {
                    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                    let refused: serde_json::Map<String, Value> = t
                        .refused()
                        .into_iter()
                        .map(|(reason, v)| (reason.to_string(), json!(v)))
                        .collect();
                    m.insert(
                        "tcp".into(),
                        json!({
                            "max_connections": cap,
                            "connections": n(&t.connections),
                            "active": n(&t.active),
                            "refused": refused,
                            "backend_connect_failures": n(&t.backend_connect_failures),
                            "idle_closed": n(&t.idle_closed),
                            "bytes_forwarded": n(&t.bytes_forwarded),
                            "bytes_replied": n(&t.bytes_replied),
                        }),
                    );
                }
                if let Some(p) = &l.persistence {
                    let c = p.counts();
                    m.insert(
                        "persistence".into(),
                        json!({
                            "clients": c.clients,
                            "returned": c.returned,
                            "full": c.full,
                        }),
                    );
                }
            }
            listener
        })
        .collect();
    let rxq_overflow: u64 = (0..snap.listeners.len())
        .map(|i| ListenerTotals::sum(&state.stats, i).kernel_drops)
        .sum();
    // One count of the kernel's flows for the whole answer (pools and kernel agree).
    let flows = state.kernel.as_ref().map(|k| k.flows());
    let pools = pools_json(state, &snap, flows.as_ref().map(|f| &*f.0));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_unix": state.started_unix,
        "generation": snap.generation,
        "workers": state.workers,
        "rxq_overflow": rxq_overflow,
        "listeners": listeners,
        "pools": pools,
        "reload": json!(*state.reload.lock().unwrap_or_else(|p| p.into_inner())),
        "announce": state
            .announce
            .as_ref()
            .map(|a| json!(*a.lock().unwrap_or_else(|p| p.into_inner()))),
        "sync": state.sync.as_ref().map(crate::sync::Status::json),
        "kernel": state.kernel.as_ref().zip(flows.as_ref()).map(|(k, f)| k.json(&snap, f)),
        "admin": {
            "allow_changes": state.allow_changes,
            "token_required": state.token.is_some(),
            "connections": state.connections.live.load(Ordering::Relaxed),
            "connection_cap": state.connections.cap(),
            "connections_refused": state.connections.refused.load(Ordering::Relaxed),
        },
    })
}

/// Puts each counter at its place ([`udplb_dataplane::CounterDef::json`]) in `object`: a
/// number, or an object of one number per reason.
fn put_counters(object: &mut Map<String, Value>, totals: Vec<(&'static CounterDef, Total)>) {
    for (def, total) in totals {
        let value = match total {
            Total::One(n) => json!(n),
            Total::PerReason(values) => Value::Object(
                values
                    .into_iter()
                    .map(|(reason, n)| (reason.to_string(), json!(n)))
                    .collect(),
            ),
        };
        put(object, def.json, value);
    }
}

/// Puts `value` at `path` in `object`: a key, or `outer.key` for a key of the object `outer`
/// (made if missing).
fn put(object: &mut Map<String, Value>, path: &str, value: Value) {
    match path.split_once('.') {
        Some((outer, rest)) => {
            if let Value::Object(inner) = object
                .entry(outer)
                .or_insert_with(|| Value::Object(Map::new()))
            {
                put(inner, rest, value);
            }
        }
        None => {
            object.insert(path.to_string(), value);
        }
    }
}

/// Each pool's backends: health, check counters, and whether new flows may go there.
pub(crate) fn pools_json(
    state: &State,
    snap: &Snapshot,
    census: Option<&udplb_kernel::census::FlowCensus>,
) -> Vec<Value> {
    let kernel_flows = kernel_flows_by_pool(state, snap, census);
    let health = state.health.lock().unwrap_or_else(|p| p.into_inner());
    snap.pools
        .iter()
        .enumerate()
        .map(|(pi, pool)| {
            let backends: Vec<Value> = pool
                .backends
                .iter()
                .enumerate()
                .map(|(bi, b)| {
                    let mut v = health
                        .get(pi)
                        .and_then(|p| p.get(bi))
                        .map_or(Value::Null, |s| json!(s));
                    if let Value::Object(m) = &mut v {
                        m.insert("weight".into(), json!(b.spec.weight));
                        // Scaled while a slow start lasts (every weight of the pool, then).
                        m.insert("effective_weight".into(), json!(b.weight));
                        m.insert("backup".into(), json!(b.spec.backup));
                        m.insert(
                            "admin".into(),
                            json!(format!("{:?}", b.admin).to_lowercase()),
                        );
                        m.insert("in_rotation".into(), json!(pool.tier.contains(bi)));
                        let traffic = BackendTotals::sum(&state.stats, b.id.index());
                        put_counters(m, traffic.values());
                        if let Some(live) = kernel_flows.get(&pi) {
                            let n = live.get(&b.spec.addr).copied().unwrap_or(0);
                            m.insert("kernel_flows".into(), json!(n));
                        }
                        if let Some(r) = state.rates.of(b.id.index()) {
                            m.insert(
                                "rates".into(),
                                json!({
                                    "forwarded_per_s": r.forwarded,
                                    "replies_per_s": r.replies,
                                    "bytes_forwarded_per_s": r.bytes_forwarded,
                                    "bytes_replied_per_s": r.bytes_replied,
                                }),
                            );
                        }
                        let latency =
                            udplb_dataplane::backend_reply_latency(&state.stats, b.id.index());
                        if let Some(h) = latency.filter(|h| h.count() > 0) {
                            let ms = |q| h.quantile(q).map(|s| s * 1e3);
                            m.insert(
                                "reply_latency".into(),
                                json!({
                                    "samples": h.count(),
                                    "p50_ms_at_most": ms(0.5),
                                    "p99_ms_at_most": ms(0.99),
                                }),
                            );
                        }
                    }
                    v
                })
                .collect();
            let held = state
                .quorum
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(pi)
                .copied()
                .flatten();
            let mut v = json!({
                "name": pool.name,
                "scheduler": pool.scheduler.name(),
                "quorum_held": held,
                "backup_active": pool.tier.is_backup(),
                "fail_open": pool.tier.is_fail_open(),
                "backends": backends,
            });
            if let (Some(k), Value::Object(m)) = (&pool.payload_key, &mut v) {
                let c = k.counts();
                m.insert(
                    "payload_key".into(),
                    json!({
                        "kind": k.spec().kind(),
                        "malformed": c.malformed,
                        "states": c.states,
                        "state_returns": c.state_returns,
                        "states_full": c.states_full,
                    }),
                );
            }
            v
        })
        .collect()
}

/// Per pool of a kernel listener (by index), the live flows of each backend in the kernel's
/// flow table (kernel listeners share no pool).
fn kernel_flows_by_pool(
    state: &State,
    snap: &Snapshot,
    census: Option<&udplb_kernel::census::FlowCensus>,
) -> std::collections::HashMap<usize, std::collections::HashMap<std::net::SocketAddr, u64>> {
    let (Some(plane), Some(census)) = (&state.kernel, census) else {
        return Default::default();
    };
    plane
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(id, &li)| {
            let pool = snap.listeners.get(li)?.pool;
            Some((pool, census.per_listener.get(id)?.clone()))
        })
        .collect()
}

/// Where a new flow of `client` on listener `li` would go, and why. Flows already established
/// keep their backend; this answers for a new one. `peer`: the backend a peer instance has
/// the client's flow on (`[sync]`; it wins while it keeps flows, in a mode with flows);
/// `remembered`: the backend persistence remembers for the client, if any (it wins next,
/// while it takes new clients).
pub(crate) fn explain_json(
    snap: &Snapshot,
    li: usize,
    client: std::net::SocketAddr,
    peer: Option<std::net::SocketAddr>,
    remembered: Option<std::net::SocketAddr>,
) -> Value {
    use udplb_core::SchedulerKind;
    use udplb_core::hash::ClientKey;
    use udplb_core::sched::{PickInput, pick};
    let l = &snap.listeners[li];
    let pool = &snap.pools[l.pool];
    let candidates: Vec<String> = pool
        .tier
        .members()
        .map(|i| pool.backends[i].spec.addr.to_string())
        .collect();
    let tier = if pool.tier.is_fail_open() {
        "fail-open: no backend is up, every enabled primary"
    } else if pool.tier.is_backup() {
        "backups: no primary is up"
    } else {
        "primaries that are up and enabled"
    };
    let key = ClientKey::of(&client, l.affinity);
    let (backend, reason) = if !l.acl.permits(client.ip()) {
        (
            None,
            "the listener's allow/deny lists refuse this client: dropped as denied".to_string(),
        )
    } else if candidates.is_empty() {
        (
            None,
            "no backend can take new flows: the datagram is dropped as no_backend".to_string(),
        )
    } else if pool.scheduler.is_consistent_hash() {
        let input = PickInput {
            key,
            random: 0,
            load: &[],
        };
        let b = pick(pool, input).map(|i| pool.backends[i].spec.addr.to_string());
        (
            b,
            format!(
                "{} on the hash of the client's {}: the same on every worker and every udplb instance with these backends",
                pool.scheduler,
                l.affinity.name()
            ),
        )
    } else {
        (
            None,
            match pool.scheduler {
                SchedulerKind::RoundRobin => "round-robin: the pool's next turn, in weighted \
                     order over the candidates (one sequence shared by every worker)"
                    .to_string(),
                kind => format!(
                    "{kind} depends on a random draw or on each worker's load: any of the \
                     candidates"
                ),
            },
        )
    };
    // Persistence, for a client the lists admit: its backend while that takes new clients.
    let persisted = remembered.filter(|_| l.acl.permits(client.ip()));
    let (backend, reason, table_backend) = match persisted {
        Some(r) if candidates.contains(&r.to_string()) => (
            Some(r.to_string()),
            format!(
                "persistence: the client (by its {}) last used this backend and is remembered \
                 on it, which takes new clients",
                l.affinity.name()
            ),
            backend,
        ),
        Some(r) => (
            backend,
            format!(
                "{reason} (persistence remembers the client on {r}, which takes no new clients \
                 now)"
            ),
            None,
        ),
        None => (backend, reason, None),
    };
    // A peer's flow of this client (flow-state sync), ahead of persistence and the table.
    let peer =
        peer.filter(|_| l.acl.permits(client.ip()) && l.mode != udplb_core::SessionMode::Datagram);
    let keeps = |p: std::net::SocketAddr| pool.position(&p).is_some_and(|i| pool.keeps_flows(i));
    let (backend, reason, table_backend) = match peer {
        Some(p) if keeps(p) => (
            Some(p.to_string()),
            "flow-state sync: a peer instance has this client's flow on this backend, which \
             keeps flows here: the flow continues there"
                .to_string(),
            table_backend.or(backend),
        ),
        Some(p) => (
            backend,
            format!(
                "{reason} (a peer instance has the client's flow on {p}, which keeps no flows here)"
            ),
            table_backend,
        ),
        None => (backend, reason, table_backend),
    };
    json!({
        "listener": l.name,
        "client": client.to_string(),
        "pool": pool.name,
        "peer": peer.map(|p| p.to_string()),
        "remembered": persisted.map(|r| r.to_string()),
        "table_backend": table_backend,
        "scheduler": pool.scheduler.name(),
        "affinity": l.affinity.name(),
        "mode": l.mode.name(),
        "admitting": snap.admitting,
        "tier": tier,
        "candidates": candidates,
        "backend": backend,
        "reason": reason,
    })
}

#[cfg(test)]
mod reserve_tests {
    use super::*;

    fn pool_of(backends: usize, checked: bool) -> udplb_config::Config {
        let toml = format!(
            "[listeners.l]\naddress = \"127.0.0.1:5300\"\npool = \"p\"\n[pools.p]\nbackends = [{}]\n{}",
            (0..backends)
                .map(|i| format!("\"127.0.0.1:{}\"", 10_000 + i))
                .collect::<Vec<_>>()
                .join(", "),
            if checked {
                "[pools.p.health]\ncheck = \"tcp\"\n"
            } else {
                ""
            }
        );
        udplb_config::parse(&toml, "t.toml").unwrap()
    }

    /// The reserve holds every check, the control plane and the minimum of admin connections,
    /// however many backends are checked (it used to stop at 128 descriptors).
    #[test]
    fn the_reserve_grows_with_the_checks_it_must_hold() {
        let few = pool_of(3, true);
        assert_eq!(descriptor_reserve(1024, &few), 64, "1/16 of the limit");
        assert_eq!(
            descriptor_reserve(1 << 20, &few),
            128,
            "at most 128 by default"
        );
        let many = pool_of(300, true);
        let reserve = descriptor_reserve(1 << 20, &many);
        assert!(reserve >= 300 + CONTROL_DESCRIPTORS + MIN_CONNECTIONS as u64);
        assert!(connection_cap(reserve, &many).1, "the checks and admin fit");
        // A limit too small for them: at most half of it is kept.
        assert_eq!(descriptor_reserve(256, &many), 128);
        assert!(!connection_cap(128, &many).1);
    }
}

#[cfg(test)]
mod counter_json_tests {
    use super::*;

    /// A listener's counters in `/stats`: every key where it has always been, the flow
    /// figures under `flows`, the per-reason ones as objects.
    #[test]
    fn listener_counters_keep_their_keys_and_shape() {
        let mut t = ListenerTotals {
            flows_live: 3,
            sockets_reused: 4,
            ..Default::default()
        };
        t.drops[udplb_core::DropReason::Denied.index()] = 5;
        let mut m = Map::new();
        put_counters(&mut m, t.values());
        let drops: Map<String, Value> = udplb_core::DropReason::ALL
            .iter()
            .map(|r| {
                (
                    r.name().to_string(),
                    json!(u64::from(r.name() == "denied") * 5),
                )
            })
            .collect();
        assert_eq!(
            Value::Object(m),
            json!({
                "datagrams_in": 0,
                "bytes_in": 0,
                "forwarded": 0,
                "bytes_forwarded": 0,
                "replies_in": 0,
                "replies_out": 0,
                "bytes_out": 0,
                "backend_refused": 0,
                "reply_timeouts": 0,
                "abuse_diverted": 0,
                "drops": drops,
                "late_replies": 0,
                "gro_trains": 0,
                "kernel_drops": 0,
                "flows": {
                    "live": 3,
                    "created": 0,
                    "closed": {
                        "idle": 0,
                        "completed": 0,
                        "backend_gone": 0,
                        "error": 0,
                        "shutdown": 0,
                    },
                    "sockets_reused": 4,
                    "rebalanced": 0,
                    "shared_sockets": 0,
                },
            })
        );
    }

    /// A backend's traffic counters in `/stats`, next to its health.
    #[test]
    fn backend_counters_keep_their_keys() {
        let t = BackendTotals {
            forwarded: 1,
            bytes_forwarded: 2,
            replies: 3,
            bytes_replied: 4,
            flows: 5,
        };
        let mut m = Map::new();
        put_counters(&mut m, t.values());
        assert_eq!(
            Value::Object(m),
            json!({
                "forwarded": 1,
                "bytes_forwarded": 2,
                "replies": 3,
                "bytes_replied": 4,
                "flows": 5
            })
        );
    }
}
