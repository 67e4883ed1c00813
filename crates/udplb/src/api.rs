//! The admin API under `/api/v1`: reads (status, pools, explain) always; changes (add, remove,
//! weight, drain/enable/disable, reload) only by POST/PUT/DELETE and only when the config says
//! `[admin] allow_changes = true`. Documented in docs/api.md.
//!
//! Owns: the HTTP shape of each call, and which [`Error`] each refusal is (their statuses are
//! [`Error::status`]'s alone). Must not: change state itself; every change goes to the
//! publisher ([`crate::control::Publisher`]) as an edit of the running configuration,
//! validated like a file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State as AxumState,
};
use axum::http::request::Parts;
use axum::http::{Method, Uri};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use udplb_config::{BackendConfig, Config};
use udplb_core::BackendSpec;
use udplb_core::snapshot::AdminState;

use crate::admin::State;
use crate::control::{Change, Command, Error};

/// Largest request body accepted.
const BODY_LIMIT: usize = 16 * 1024;
/// How long a change may take to be applied.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `/api/v1` routes.
pub fn routes() -> axum::Router<Arc<State>> {
    axum::Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/ready", get(ready))
        .route("/api/v1/pools", get(pools))
        .route("/api/v1/explain", get(explain))
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/log-level", get(log_level).put(set_log_level))
        .route("/api/v1/pools/{pool}/backends", post(add_backend))
        .route(
            "/api/v1/pools/{pool}/backends/{address}",
            delete(remove_backend),
        )
        .route(
            "/api/v1/pools/{pool}/backends/{address}/weight",
            put(set_weight),
        )
        .route("/api/v1/pools/{pool}/backends/{address}/drain", post(drain))
        .route(
            "/api/v1/pools/{pool}/backends/{address}/enable",
            post(enable),
        )
        .route(
            "/api/v1/pools/{pool}/backends/{address}/disable",
            post(disable),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Set on the routes above: a known path with another method.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
}

async fn not_found(uri: Uri) -> Error {
    Error::NotFound(format!("no such path: {} (see docs/api.md)", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Error {
    Error::MethodNotAllowed(format!(
        "{method} is not allowed on {} (see the Allow header)",
        uri.path()
    ))
}

/// [`Json`], rejecting with a JSON error (413, 415, 400, 422) instead of axum's text.
struct ApiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(r) => Err(Error::Unreadable {
                status: r.status(),
                message: r.body_text(),
            }),
        }
    }
}

/// [`Path`], rejecting with a JSON error.
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(r) => Err(Error::Unreadable {
                status: r.status(),
                message: r.body_text(),
            }),
        }
    }
}

/// [`Query`], rejecting with a JSON error.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(r) => Err(Error::Unreadable {
                status: r.status(),
                message: r.body_text(),
            }),
        }
    }
}

type ApiResult = Result<Json<Value>, Error>;

async fn status(AxumState(state): AxumState<Arc<State>>) -> Json<Value> {
    Json(crate::admin::stats_json(&state))
}

async fn pools(AxumState(state): AxumState<Arc<State>>) -> Json<Value> {
    let flows = state.kernel.as_ref().map(|k| k.flows());
    Json(json!(crate::admin::pools_json(
        &state,
        &state.shared.load(),
        flows.as_ref().map(|f| &*f.0)
    )))
}

#[derive(Deserialize)]
struct ExplainQuery {
    listener: Option<String>,
    client: SocketAddr,
}

async fn explain(
    AxumState(state): AxumState<Arc<State>>,
    ApiQuery(q): ApiQuery<ExplainQuery>,
) -> ApiResult {
    let snap = state.shared.load();
    let li = match &q.listener {
        Some(name) => snap.listeners.iter().position(|l| &l.name == name),
        None => (snap.listeners.len() == 1).then_some(0),
    }
    .ok_or_else(|| Error::NotFound("no such listener (name it with ?listener=)".into()))?;
    // The kernel data plane places a client where udplb would (the same hash and table), and
    // keeps its own persistence table.
    let kernel = state.kernel.as_ref().filter(|k| k.listeners.contains(&li));
    let remembered = match kernel {
        Some(k) => k.remembered(li, q.client),
        None => {
            let now = udplb_core::time::Time(state.epoch.elapsed().as_millis() as u64);
            let pool = &snap.pools[snap.listeners[li].pool];
            snap.listeners[li]
                .persistence
                .as_ref()
                .and_then(|p| p.remembered(q.client, now))
                .and_then(|id| pool.backends.iter().find(|b| b.id == id))
                .map(|b| b.spec.addr)
        }
    };
    // The kernel's flow table is one for all CPUs: whether this client ip:port has a live
    // flow, and where (the workers' flow tables are their own, not asked).
    let flow = kernel.and_then(|k| k.flow_of(li, q.client));
    // A peer instance's flow of this client (`[sync]`): the program's map, or the workers'.
    let peer = match kernel {
        Some(k) => k.peer_flow(li, q.client),
        None => state
            .sync
            .as_ref()
            .and_then(|s| s.synced.lookup(u16::try_from(li).ok()?, q.client)),
    };
    let mut explained = crate::admin::explain_json(&snap, li, q.client, peer, remembered);
    if let (Some((backend, idle)), serde_json::Value::Object(m)) = (flow, &mut explained) {
        m.insert(
            "flow".into(),
            serde_json::json!({
                "backend": backend.to_string(),
                "idle_ms": idle.as_millis() as u64,
            }),
        );
    }
    let kernel = kernel.is_some();
    if let serde_json::Value::Object(m) = &mut explained {
        m.insert(
            "dataplane".into(),
            serde_json::json!(if kernel { "kernel" } else { "socket" }),
        );
    }
    Ok(Json(explained))
}

/// 200 while udplb should get traffic (every listener's pool holds its quorum with a backend
/// up), 503 with the reason otherwise: for keepalived's `track_script` (`udplb ctl ready`),
/// load balancers in front and orchestrators.
async fn ready(AxumState(state): AxumState<Arc<State>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match crate::announce::readiness_of(&state) {
        crate::announce::Readiness::Ready => Json(json!({ "ready": true })).into_response(),
        crate::announce::Readiness::NotReady(why) | crate::announce::Readiness::Unknown(why) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": why, "error": format!("not ready: {why}") })),
        )
            .into_response(),
    }
}

async fn reload(w: Writable, AxumState(state): AxumState<Arc<State>>) -> ApiResult {
    tracing::info!(peer = ?w.origin.peer, request = %w.origin.request, "reload asked through the admin API");
    let mut reloader = state.reloader.lock().await;
    reloader.reload().await.map_err(Error::ReloadFailed)?;
    Ok(Json(
        json!({ "reloaded": true, "generation": state.shared.load().generation }),
    ))
}

async fn log_level() -> Json<Value> {
    Json(json!({ "level": crate::logging::level() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogLevel {
    level: String,
}

async fn set_log_level(w: Writable, ApiJson(l): ApiJson<LogLevel>) -> ApiResult {
    tracing::info!(
        peer = ?w.origin.peer,
        request = %w.origin.request,
        level = %l.level,
        "log level set through the admin API"
    );
    crate::logging::set_level(&l.level).map_err(Error::Invalid)?;
    Ok(Json(json!({ "level": crate::logging::level() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackend {
    address: SocketAddr,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    state: Option<String>,
}

fn one() -> u32 {
    1
}

async fn add_backend(
    allowed: Writable,
    AxumState(state): AxumState<Arc<State>>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(b): ApiJson<NewBackend>,
) -> ApiResult {
    let admin = match b.state.as_deref() {
        None | Some("enabled") => AdminState::Enabled,
        Some("draining") => AdminState::Draining,
        Some("disabled") => AdminState::Disabled,
        Some(other) => {
            return Err(Error::Invalid(format!(
                "state {other:?}: enabled, draining or disabled"
            )));
        }
    };
    let spec = BackendSpec {
        addr: b.address,
        weight: b.weight,
        backup: b.backup,
    };
    change(
        &state,
        allowed,
        Box::new(move |cfg: &mut Config| {
            let pool = pool_mut(cfg, &pool)?;
            if pool.backends.iter().any(|x| x.spec.addr == spec.addr) {
                return Err(Error::Conflict(format!(
                    "{} is already in pool {}",
                    spec.addr, pool.name
                )));
            }
            pool.backends.push(BackendConfig {
                spec,
                state: admin,
                health: None,
            });
            Ok(true)
        }),
    )
    .await
}

async fn remove_backend(
    allowed: Writable,
    AxumState(state): AxumState<Arc<State>>,
    ApiPath((pool, address)): ApiPath<(String, String)>,
) -> ApiResult {
    let addr = parse_addr(&address)?;
    change(
        &state,
        allowed,
        Box::new(move |cfg: &mut Config| {
            let pool = pool_mut(cfg, &pool)?;
            let before = pool.backends.len();
            pool.backends.retain(|b| b.spec.addr != addr);
            Ok(pool.backends.len() != before) // absent: a no-op success
        }),
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Weight {
    weight: u32,
}

async fn set_weight(
    allowed: Writable,
    AxumState(state): AxumState<Arc<State>>,
    ApiPath((pool, address)): ApiPath<(String, String)>,
    ApiJson(w): ApiJson<Weight>,
) -> ApiResult {
    let addr = parse_addr(&address)?;
    edit_backend(&state, allowed, pool, addr, move |b| {
        std::mem::replace(&mut b.spec.weight, w.weight) != w.weight
    })
    .await
}

async fn drain(w: Writable, s: AxumState<Arc<State>>, p: ApiPath<(String, String)>) -> ApiResult {
    set_state(w, s, p, AdminState::Draining).await
}

async fn enable(w: Writable, s: AxumState<Arc<State>>, p: ApiPath<(String, String)>) -> ApiResult {
    set_state(w, s, p, AdminState::Enabled).await
}

async fn disable(w: Writable, s: AxumState<Arc<State>>, p: ApiPath<(String, String)>) -> ApiResult {
    set_state(w, s, p, AdminState::Disabled).await
}

async fn set_state(
    allowed: Writable,
    AxumState(state): AxumState<Arc<State>>,
    ApiPath((pool, address)): ApiPath<(String, String)>,
    to: AdminState,
) -> ApiResult {
    let addr = parse_addr(&address)?;
    edit_backend(&state, allowed, pool, addr, move |b| {
        std::mem::replace(&mut b.state, to) != to
    })
    .await
}

/// Applies `edit` to backend `addr` of `pool`; `edit` says whether it changed anything.
async fn edit_backend(
    state: &State,
    allowed: Writable,
    pool: String,
    addr: SocketAddr,
    edit: impl FnOnce(&mut BackendConfig) -> bool + Send + 'static,
) -> ApiResult {
    change(
        state,
        allowed,
        Box::new(move |cfg: &mut Config| {
            let pool = pool_mut(cfg, &pool)?;
            let name = pool.name.clone();
            let b = pool
                .backends
                .iter_mut()
                .find(|b| b.spec.addr == addr)
                .ok_or_else(|| Error::Conflict(format!("no backend {addr} in pool {name}")))?;
            Ok(edit(b))
        }),
    )
    .await
}

/// Sends a change to the publisher and waits (bounded) for its outcome; only with the
/// permission to change ([`Writable`]).
async fn change(state: &State, allowed: Writable, change: Change) -> ApiResult {
    let (reply, outcome) = tokio::sync::oneshot::channel();
    state
        .publisher
        .send(Command::Change(change, allowed.origin, reply))
        .await
        .map_err(|_| Error::Stopping)?;
    let changed = match tokio::time::timeout(CHANGE_TIMEOUT, outcome).await {
        Ok(Ok(outcome)) => outcome?,
        _ => return Err(Error::Timeout),
    };
    Ok(Json(
        json!({ "changed": changed, "generation": state.shared.load().generation }),
    ))
}

/// The permission to change: every change handler takes it as its first extractor, so it is
/// checked before anything else of the request is looked at (its path, its body): a change that
/// is not allowed answers 403 whatever its body, and one without the right token (when
/// `[admin] token_file` is set) 401.
struct Writable {
    /// Who asks, and how (for the log of what the change did).
    origin: crate::control::audit::Origin,
}

impl FromRequestParts<Arc<State>> for Writable {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<State>) -> Result<Self, Error> {
        if !state.allow_changes {
            return Err(Error::Forbidden(
                "the admin API is read-only: set allow_changes = true in [admin] (or --admin-allow-changes)".into(),
            ));
        }
        // A browser sends Origin with every cross-origin POST, PUT or DELETE, and sends
        // bodiless POSTs (a drain) without asking first: a page on another site must not be
        // able to change udplb through its visitor's browser. Clients that are not browsers
        // (udplb ctl, curl) send no Origin; the status page sends its own.
        if let Some(origin) = parts.headers.get(axum::http::header::ORIGIN) {
            let host = parts
                .headers
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok());
            let origin_host = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .map(|(_, rest)| rest.trim_end_matches('/'));
            if host.is_none() || origin_host != host {
                return Err(Error::Forbidden(format!(
                    "a change from another site ({}) is refused",
                    origin.to_str().unwrap_or("?")
                )));
            }
        }
        let allowed = Writable {
            origin: crate::control::audit::Origin {
                peer: parts
                    .extensions
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                    .map(|c| c.0),
                request: format!("{} {}", parts.method, parts.uri.path()),
            },
        };
        let Some(token) = &state.token else {
            return Ok(allowed);
        };
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| crate::token::bearer(v.as_bytes()));
        match given {
            Some(given) if token.matches(given) => Ok(allowed),
            Some(_) => Err(Error::Unauthorized(
                "wrong token in the Authorization header".into(),
            )),
            None => Err(Error::Unauthorized(
                "changes need the admin token: Authorization: Bearer TOKEN (udplb ctl --token-file)".into(),
            )),
        }
    }
}

/// Pool `name` of `cfg`; one that is not there is a conflict with the running configuration,
/// like any change it cannot take.
fn pool_mut<'a>(
    cfg: &'a mut Config,
    name: &str,
) -> Result<&'a mut udplb_config::PoolConfig, Error> {
    cfg.pools
        .iter_mut()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::Conflict(format!("no pool named {name:?}")))
}

fn parse_addr(s: &str) -> Result<SocketAddr, Error> {
    s.parse()
        .map_err(|_| Error::Invalid(format!("{s:?} is not an ip:port address")))
}
