//! The admin endpoint (read-only for now): `GET /stats` returns every listener's counters as
//! JSON, summed over the workers at request time.
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
}

/// Serves the admin endpoint on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    let app = Router::new().route("/stats", get(stats)).with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

async fn stats(AxumState(state): AxumState<Arc<State>>) -> axum::Json<Value> {
    axum::Json(stats_json(&state))
}

fn stats_json(state: &State) -> Value {
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
                "drops": drops,
                "flows": { "live": t.flows_live, "created": t.flows_created, "closed": closed },
            })
        })
        .collect();
    let rxq_overflow: u64 = state.stats.iter().map(|w| w.rxq_overflow.get()).sum();
    json!({
        "generation": snap.generation,
        "workers": state.workers,
        "rxq_overflow": rxq_overflow,
        "listeners": listeners,
    })
}
