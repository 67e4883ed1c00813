//! The admin endpoint (read-only for now): `GET /stats` returns every listener's counters as
//! JSON, summed over the workers at request time; `GET /metrics` the same in Prometheus form.
//!
//! Owns: the HTTP surface of the control plane.
//! Must not: hold a lock the data plane takes, or be reachable beyond the address the operator
//! configured.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State as AxumState;
use axum::routing::get;
use serde_json::{Map, Value, json};
use udplb_core::DropReason;
use udplb_core::snapshot::Snapshot;
use udplb_core::verdict::CloseReason;
use udplb_dataplane::{ListenerTotals, WorkerStats};

/// What the admin handlers read.
pub struct State {
    /// The published snapshot.
    pub shared: Arc<ArcSwap<Snapshot>>,
    /// Every worker's counters.
    pub stats: Vec<Arc<WorkerStats>>,
    /// Number of workers.
    pub workers: usize,
    /// Backend health and check counters, by pool and backend.
    pub health: crate::health::Status,
    /// Outcome of configuration reloads.
    pub reload: crate::reload::Status,
    /// Where API changes go.
    pub publisher: tokio::sync::mpsc::Sender<crate::health::Command>,
    /// Whether the API may change anything.
    pub allow_changes: bool,
    /// Reloads asked for by the API (the same one SIGHUP uses).
    pub reloader: Arc<tokio::sync::Mutex<crate::reload::Reloader>>,
}

/// Serves the admin endpoint on `listener` until the runtime stops.
pub async fn serve(listener: std::net::TcpListener, state: Arc<State>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the admin endpoint");
            return;
        }
    };
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "admin endpoint");
    }
    let app = Router::new()
        .route("/", get(status_page))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .merge(crate::api::routes())
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin endpoint failed");
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
            let t = ListenerTotals::sum(&state.stats, i);
            let drops: Map<String, Value> = DropReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), json!(t.drops[r.index()])))
                .collect();
            let closed: Map<String, Value> = CloseReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), json!(t.flows_closed[r.index()])))
                .collect();
            json!({
                "name": l.name,
                "address": l.address.to_string(),
                "pool": snap.pools[l.pool].name,
                "mode": l.mode.name(),
                "datagrams_in": t.datagrams_in,
                "bytes_in": t.bytes_in,
                "forwarded": t.forwarded,
                "bytes_forwarded": t.bytes_forwarded,
                "replies_in": t.replies_in,
                "replies_out": t.replies_out,
                "bytes_out": t.bytes_out,
                "backend_refused": t.backend_refused,
                "reply_timeouts": t.reply_timeouts,
                "abuse_diverted": t.abuse_diverted,
                "drops": drops,
                "late_replies": t.late_replies,
                "gro_trains": t.gro_trains,
                "kernel_drops": t.kernel_drops,
                "flows": {
                    "live": t.flows_live,
                    "created": t.flows_created,
                    "closed": closed,
                    "sockets_reused": t.sockets_reused,
                    "shared_sockets": t.shared_sockets,
                },
            })
        })
        .collect();
    let rxq_overflow: u64 = (0..snap.listeners.len())
        .map(|i| ListenerTotals::sum(&state.stats, i).kernel_drops)
        .sum();
    let pools = pools_json(state, &snap);
    json!({
        "generation": snap.generation,
        "workers": state.workers,
        "rxq_overflow": rxq_overflow,
        "listeners": listeners,
        "pools": pools,
        "reload": json!(*state.reload.lock().unwrap_or_else(|p| p.into_inner())),
    })
}

/// Each pool's backends: health, check counters, and whether new flows may go there.
pub(crate) fn pools_json(state: &State, snap: &Snapshot) -> Vec<Value> {
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
                        m.insert("backup".into(), json!(b.spec.backup));
                        m.insert(
                            "admin".into(),
                            json!(format!("{:?}", b.admin).to_lowercase()),
                        );
                        m.insert("in_rotation".into(), json!(pool.tier.contains(bi)));
                        let (f, fb, r, rb) =
                            udplb_dataplane::backend_traffic(&state.stats, b.id.index());
                        m.insert("forwarded".into(), json!(f));
                        m.insert("bytes_forwarded".into(), json!(fb));
                        m.insert("replies".into(), json!(r));
                        m.insert("bytes_replied".into(), json!(rb));
                    }
                    v
                })
                .collect();
            json!({
                "name": pool.name,
                "scheduler": pool.scheduler.name(),
                "backup_active": pool.tier.is_backup(),
                "fail_open": pool.tier.is_fail_open(),
                "backends": backends,
            })
        })
        .collect()
}

/// Where a new flow of `client` on listener `li` would go, and why. Flows already established
/// keep their backend; this answers for a new one.
pub(crate) fn explain_json(snap: &Snapshot, li: usize, client: std::net::SocketAddr) -> Value {
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
    json!({
        "listener": l.name,
        "client": client.to_string(),
        "pool": pool.name,
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
