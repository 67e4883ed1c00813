//! TCP beside a UDP listener (`tcp = true`): DNS over TCP, so that truncated answers, large
//! answers and zone transfers work through udplb.
//!
//! Owns: the TCP listening sockets (bound with the UDP ones, before privileges are dropped,
//! on the very address and port the UDP listener got), accepting connections, choosing each a
//! backend of the listener's pool from the current snapshot (its serving tier: health, drain
//! and weights as for datagrams; a backend that refuses the connection makes way for the
//! next), relaying bytes both ways until either side closes or the connection idles for the
//! listener's `idle_timeout`, the per-listener connection cap, and the counters of all that.
//! A connection is proxied whole (RFC 7766's several queries per connection, pipelined,
//! answered out of order, pass through untouched: the backend sees one client connection).
//! Must not: block the UDP data plane (it runs on a thread of its own), read the bytes it
//! relays, or hold more than the cap of connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use udplb_config::defaults::TCP_CONNECT_TIMEOUT;
use udplb_core::hash::ClientKey;
use udplb_core::sched::{PickInput, pick};
use udplb_core::snapshot::{BackendId, Snapshot};

/// Bytes read at once in each direction of a connection.
const BUFFER: usize = 16 * 1024;
/// Backends tried for one connection before it is given up.
const ATTEMPTS: usize = 3;
/// How long accepting pauses after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl TcpStats {
    /// Connections closed at once, by reason (as `/stats` and `/metrics` name them).
    pub fn refused(&self) -> [(&'static str, u64); 4] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("cap", n(&self.refused_cap)),
            ("denied", n(&self.refused_denied)),
            ("no_backend", n(&self.refused_no_backend)),
            ("shutting_down", n(&self.refused_shutting_down)),
        ]
    }
}

/// Counters of one listener's TCP side.
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Connections proxied to a backend.
    pub connections: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections closed at once: the cap was reached.
    pub refused_cap: AtomicU64,
    /// Connections closed at once: `allow`/`deny` refused the client.
    pub refused_denied: AtomicU64,
    /// Connections closed at once: no backend could take them (none in rotation, or every one
    /// tried refused or did not answer the connect).
    pub refused_no_backend: AtomicU64,
    /// Connections closed at once: udplb is shutting down.
    pub refused_shutting_down: AtomicU64,
    /// Connects to a backend that failed (each then tries the next backend).
    pub backend_connect_failures: AtomicU64,
    /// Connections closed because neither side sent anything for the idle timeout.
    pub idle_closed: AtomicU64,
    /// Bytes from clients to backends.
    pub bytes_forwarded: AtomicU64,
    /// Bytes from backends to clients.
    pub bytes_replied: AtomicU64,
}

/// A listener's TCP socket: its index in the snapshot and the socket.
pub struct Bound {
    listener: usize,
    socket: std::net::TcpListener,
}

/// Binds a TCP socket for every listener with `tcp`, on the address its UDP sockets got
/// (`addrs`, in snapshot order: a port 0 in the file is the UDP listener's port).
/// `inherited` gives the socket a previous process handed over for a listener (by index and
/// address), if there is one.
pub fn bind(
    snap: &Snapshot,
    addrs: &[SocketAddr],
    mut inherited: impl FnMut(usize, SocketAddr) -> Option<std::net::TcpListener>,
) -> anyhow::Result<Vec<Bound>> {
    snap.listeners
        .iter()
        .zip(addrs)
        .enumerate()
        .filter(|(_, (spec, _))| spec.tcp.is_some())
        .map(|(listener, (spec, &addr))| {
            if let Some(socket) = inherited(listener, addr) {
                socket.set_nonblocking(true)?;
                return Ok(Bound { listener, socket });
            }
            let socket = udplb_sys::socket::tcp_listener(addr).with_context(|| {
                format!("cannot bind TCP for listener {:?} on {addr}", spec.name)
            })?;
            Ok(Bound { listener, socket })
        })
        .collect()
}

impl Bound {
    /// The listener's index in the snapshot.
    pub fn listener(&self) -> usize {
        self.listener
    }

    /// The socket.
    pub fn socket(&self) -> &std::net::TcpListener {
        &self.socket
    }
}

/// Serves every bound socket until udplb stops; `stats` has an entry per listener.
/// Accepting stops once `handed_over` turns true (an upgrade's successor accepts from then
/// on); open connections are served to their end.
pub async fn serve(
    bound: Vec<Bound>,
    shared: Arc<ArcSwap<Snapshot>>,
    stats: Arc<[TcpStats]>,
    handed_over: tokio::sync::watch::Receiver<bool>,
) {
    let load = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for b in bound {
        let socket = match TcpListener::from_std(b.socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve TCP");
                continue;
            }
        };
        let ctx = Listener {
            listener: b.listener,
            shared: Arc::clone(&shared),
            stats: Arc::clone(&stats),
            load: Arc::clone(&load),
        };
        tasks.spawn(accept_loop(socket, ctx, handed_over.clone()));
    }
    while tasks.join_next().await.is_some() {}
    // No TCP listener: nothing to do, for as long as udplb runs.
    std::future::pending::<()>().await;
}

/// What a listener's connections share.
#[derive(Clone)]
struct Listener {
    listener: usize,
    shared: Arc<ArcSwap<Snapshot>>,
    stats: Arc<[TcpStats]>,
    /// Open connections per backend id (for least-loaded schedulers).
    load: Arc<Mutex<Vec<u32>>>,
}

impl Listener {
    fn stats(&self) -> &TcpStats {
        &self.stats[self.listener]
    }
}

async fn accept_loop(
    socket: TcpListener,
    ctx: Listener,
    mut handed_over: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = Rng::seeded();
    loop {
        let accepted = tokio::select! {
            a = socket.accept() => a,
            _ = handed_over.wait_for(|h| *h) => return,
        };
        let (client, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors (or another transient failure): pause rather than spin.
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match admit(&ctx, peer) {
            Some(refusal) => {
                refusal.fetch_add(1, Ordering::Relaxed);
                drop(client);
            }
            None => {
                let ctx = ctx.clone();
                let random = rng.next();
                ctx.stats().active.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    proxy(&ctx, client, peer, random).await;
                    ctx.stats().active.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }
}

/// Whether a connection from `peer` may be served now: `None` if so, else the counter of the
/// reason it is closed at once.
fn admit(ctx: &Listener, peer: SocketAddr) -> Option<&AtomicU64> {
    let snap = ctx.shared.load();
    let spec = &snap.listeners[ctx.listener];
    let stats = ctx.stats();
    if !snap.admitting {
        return Some(&stats.refused_shutting_down);
    }
    if !spec.acl.is_open() && !spec.acl.permits(peer.ip()) {
        return Some(&stats.refused_denied);
    }
    let cap = u64::from(spec.tcp.unwrap_or(0));
    if stats.active.load(Ordering::Relaxed) >= cap {
        return Some(&stats.refused_cap);
    }
    None
}

/// Connects `client` to a backend and relays until the connection ends.
async fn proxy(ctx: &Listener, client: TcpStream, peer: SocketAddr, random: u64) {
    let mut tried: Vec<BackendId> = Vec::with_capacity(ATTEMPTS);
    let (backend, upstream) = loop {
        let Some((id, addr)) = choose(ctx, peer, random, &tried) else {
            ctx.stats()
                .refused_no_backend
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        tried.push(id);
        match tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => break (id, s),
            Ok(Err(e)) => tracing::debug!(backend = %addr, error = %e, "TCP connect failed"),
            Err(_) => tracing::debug!(backend = %addr, "TCP connect timed out"),
        }
        ctx.stats()
            .backend_connect_failures
            .fetch_add(1, Ordering::Relaxed);
        if tried.len() == ATTEMPTS {
            ctx.stats()
                .refused_no_backend
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    ctx.stats().connections.fetch_add(1, Ordering::Relaxed);
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    let idle = ctx.shared.load().listeners[ctx.listener].idle_timeout;
    count_load(ctx, backend, true);
    let ended = relay(client, upstream, idle, ctx.stats()).await;
    count_load(ctx, backend, false);
    if ended == Ended::Idle {
        ctx.stats().idle_closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A backend of the listener's pool for a connection of `peer`, not one of `tried`: the
/// scheduler's pick from the serving tier, else (the pick was tried already) the next member
/// of the tier not tried.
fn choose(
    ctx: &Listener,
    peer: SocketAddr,
    random: u64,
    tried: &[BackendId],
) -> Option<(BackendId, SocketAddr)> {
    let snap = ctx.shared.load();
    let spec = &snap.listeners[ctx.listener];
    let pool = &snap.pools[spec.pool];
    let load = ctx.load.lock().unwrap_or_else(|p| p.into_inner());
    let key = ClientKey::of(&peer, spec.affinity);
    let picked = pick(
        pool,
        PickInput {
            key,
            random: random.wrapping_add(tried.len() as u64),
            load: &load,
        },
    );
    let untried = |i: &usize| !tried.contains(&pool.backends[*i].id);
    let index = picked.filter(untried).or_else(|| {
        (0..pool.backends.len())
            .filter(|&i| pool.tier.contains(i))
            .find(untried)
    })?;
    let b = &pool.backends[index];
    Some((b.id, b.spec.addr))
}

fn count_load(ctx: &Listener, backend: BackendId, open: bool) {
    let mut load = ctx.load.lock().unwrap_or_else(|p| p.into_inner());
    let i = backend.index();
    if load.len() <= i {
        load.resize(i + 1, 0);
    }
    load[i] = if open {
        load[i].saturating_add(1)
    } else {
        load[i].saturating_sub(1)
    };
}

/// How a relayed connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Both sides closed, or one failed.
    Closed,
    /// Nothing moved for the idle timeout (a stalled write counts as nothing moving).
    Idle,
}

/// Relays bytes between `client` and `backend` until both have closed their side, either
/// fails, or nothing moves for `idle`. A side that closes has its close passed on (the other
/// may still answer, as a server does after a client's last query).
async fn relay(client: TcpStream, backend: TcpStream, idle: Duration, stats: &TcpStats) -> Ended {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut backend_rx, mut backend_tx) = backend.into_split();
    let mut up = vec![0u8; BUFFER];
    let mut down = vec![0u8; BUFFER];
    let (mut client_open, mut backend_open) = (true, true);
    while client_open || backend_open {
        let read = tokio::time::timeout(idle, async {
            tokio::select! {
                r = client_rx.read(&mut up), if client_open => (true, r),
                r = backend_rx.read(&mut down), if backend_open => (false, r),
            }
        })
        .await;
        let Ok((from_client, read)) = read else {
            return Ended::Idle;
        };
        let (buf, to, counter, open) = if from_client {
            (
                &up,
                &mut backend_tx,
                &stats.bytes_forwarded,
                &mut client_open,
            )
        } else {
            (
                &down,
                &mut client_tx,
                &stats.bytes_replied,
                &mut backend_open,
            )
        };
        match read {
            Ok(0) => {
                *open = false;
                let _ = to.shutdown().await;
            }
            Ok(n) => match tokio::time::timeout(idle, to.write_all(&buf[..n])).await {
                Ok(Ok(())) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(Err(_)) => return Ended::Closed,
                Err(_) => return Ended::Idle,
            },
            Err(_) => return Ended::Closed,
        }
    }
    Ended::Closed
}

/// xorshift64* for the random schedulers, seeded from std's per-process random keys.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        use std::hash::BuildHasher;
        Rng(std::collections::hash_map::RandomState::new().hash_one(0u8) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
