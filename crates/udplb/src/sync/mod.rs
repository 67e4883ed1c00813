//! Flow-state sync with the other udplb instances of `[sync]` (as IPVS's sync daemon): every
//! `interval`, the flows this instance's workers opened or renewed go to every peer, batched
//! in authenticated datagrams ([`wire`]); what the peers send goes into the table the workers
//! consult when a flow opens ([`Synced`]). A router that moves a client to this instance (its
//! balancer died) then finds its flow continued on the backend it had, even when the backend
//! set changed since the flow began, where consistent hashing alone would move it.
//!
//! Owns: the sync socket, the peers' sequence windows, the table's rotation (an entry lives
//! one to two hold periods, a hold being twice the longest idle timeout, and active flows are
//! renewed once per idle timeout) and the counters.
//! Must not: block a worker (workers only push to their outboxes), or trust a datagram that
//! does not come from a peer's address with the shared key.

pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use udplb_config::{Config, FlowSync};
use udplb_core::SessionMode;
use udplb_core::handover::Placement;
use udplb_core::sync::{Outbox, Recorded, Synced};

use crate::kernel::KernelPlane;
use wire::{ENTRIES_PER_MESSAGE, Entry, Key, MAX_MESSAGE, Refused, Window};

/// Senders whose sequence windows are kept at most (a peer that restarts is a new sender).
const MAX_SENDERS: usize = 1024;
/// The shortest hold period.
const MIN_HOLD: Duration = Duration::from_secs(1);

/// What the sync has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub messages_sent: AtomicU64,
    pub placements_sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub messages_received: AtomicU64,
    pub placements_received: AtomicU64,
    /// Placements for a listener this instance does not have.
    pub unknown_listener: AtomicU64,
    /// Placements not stored: the table was full.
    pub table_full: AtomicU64,
    /// Datagrams refused, by reason: not from a peer, malformed, forged, replayed.
    pub refused: [AtomicU64; 4],
    /// Per peer (in `[sync] peers` order): when an authenticated message last came from it,
    /// in Unix milliseconds (0: never).
    pub heard: Vec<AtomicU64>,
}

impl Stats {
    /// The counters of a sync with `peers` peers.
    pub fn new(peers: usize) -> Stats {
        Stats {
            heard: (0..peers).map(|_| AtomicU64::new(0)).collect(),
            ..Stats::default()
        }
    }
}

/// The reasons of [`Stats::refused`], in order.
pub const REFUSED: [&str; 4] = ["not_a_peer", "malformed", "forged", "replayed"];

/// The sync of one process: its socket, bound before privileges are dropped.
pub struct Sync {
    socket: std::net::UdpSocket,
    key: Key,
    peers: Vec<SocketAddr>,
    interval: Duration,
    hold: Duration,
    synced: Arc<Synced>,
    outboxes: Vec<Arc<Outbox>>,
    /// The kernel data plane, whose listeners' flows are shared too: its new flows and, a
    /// part of its tables per interval (`renew_part` of `renew_parts`), its live ones.
    kernel: Option<Arc<KernelPlane>>,
    renew_part: usize,
    renew_parts: usize,
    /// Listener index (snapshot order) → its id between instances, and back.
    ids: Vec<u64>,
    indexes: HashMap<u64, u16>,
    sender: u64,
    sequence: u64,
    windows: HashMap<u64, Window>,
    stats: Arc<Stats>,
    /// When a refused datagram was last logged (at most one a minute).
    warned: Option<std::time::Instant>,
}

/// How long a learned placement is held at least (at most twice this): twice the longest idle
/// timeout of the listeners with flows, and at least a second.
pub fn hold(cfg: &Config) -> Duration {
    let longest = cfg
        .listeners
        .iter()
        .filter(|l| l.mode != SessionMode::Datagram)
        .map(|l| l.idle_timeout)
        .max()
        .unwrap_or_default();
    (2 * longest).max(MIN_HOLD)
}

/// Reads the key and binds `sync.listen`, unless a predecessor handed over its socket
/// (`inherited`: an upgrade; the peers' messages then keep reaching this address).
pub fn bind(
    sync: &FlowSync,
    inherited: Option<std::net::UdpSocket>,
) -> anyhow::Result<(std::net::UdpSocket, Key)> {
    let secret = crate::token::read_key(&sync.key_file)
        .map_err(|why| anyhow::anyhow!("sync.key_file: {why}"))?;
    let socket = match inherited {
        Some(s) => s,
        None => std::net::UdpSocket::bind(sync.listen)
            .with_context(|| format!("sync.listen: binding {}", sync.listen))?,
    };
    socket.set_nonblocking(true)?;
    Ok((socket, Key::new(secret.secret())))
}

/// The sync's state for `/metrics` and the status.
#[derive(Clone)]
pub struct Status {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub stats: Arc<Stats>,
    pub synced: Arc<Synced>,
    pub outboxes: Vec<Arc<Outbox>>,
    /// The kernel data plane, if it serves listeners (its flows are shared too).
    pub kernel: Option<Arc<KernelPlane>>,
}

impl Status {
    /// Flows opened where a peer said their client's flow was: by the workers and by the
    /// kernel's program.
    pub fn used(&self) -> u64 {
        self.synced.hits() + self.kernel.as_ref().map_or(0, |k| k.drops().sync_used)
    }

    /// Placements dropped before sending: a worker's outbox, or the program's queue, was full.
    pub fn not_sent(&self) -> u64 {
        self.outboxes.iter().map(|o| o.dropped()).sum::<u64>()
            + self
                .kernel
                .as_ref()
                .map_or(0, |k| k.drops().sync_not_queued)
    }

    /// The `sync` object of `/stats`.
    pub fn json(&self) -> serde_json::Value {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let peers: Vec<serde_json::Value> = self
            .peers
            .iter()
            .zip(&s.heard)
            .map(|(addr, heard)| {
                let ms = n(heard);
                serde_json::json!({
                    "address": addr.to_string(),
                    "heard_unix": (ms > 0).then(|| ms as f64 / 1000.0),
                })
            })
            .collect();
        let refused: serde_json::Map<String, serde_json::Value> = REFUSED
            .iter()
            .zip(&s.refused)
            .map(|(reason, c)| (reason.to_string(), n(c).into()))
            .collect();
        serde_json::json!({
            "listen": self.listen.to_string(),
            "peers": peers,
            "placements": self.synced.len(),
            "used": self.used(),
            "sent": n(&s.placements_sent),
            "received": n(&s.placements_received),
            "not_sent": self.not_sent(),
            "table_full": n(&s.table_full),
            "refused": refused,
        })
    }
}

impl Sync {
    /// The sync of `cfg`'s `[sync]` over `socket`, sharing `synced` and the workers' outboxes.
    pub fn new(
        cfg: &Config,
        sync: &FlowSync,
        (socket, key): (std::net::UdpSocket, Key),
        synced: Arc<Synced>,
        outboxes: Vec<Arc<Outbox>>,
        kernel: Option<Arc<KernelPlane>>,
        stats: Arc<Stats>,
    ) -> Sync {
        let ids: Vec<u64> = cfg
            .listeners
            .iter()
            .map(|l| wire::listener_id(&l.name))
            .collect();
        let indexes = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u16))
            .collect();
        if cfg
            .listeners
            .iter()
            .all(|l| l.mode == SessionMode::Datagram)
        {
            tracing::warn!(
                "sync: every listener is in datagram mode, which keeps no flows: nothing to share"
            );
        }
        let hold = hold(cfg);
        // The kernel's live flows are read a part per interval: each is renewed once per
        // hold period's half (the longest idle timeout), as the workers renew theirs.
        let renew_parts = ((hold / 2).as_millis() / sync.interval.as_millis().max(1)).max(1);
        Sync {
            socket,
            key,
            peers: sync.peers.clone(),
            interval: sync.interval,
            hold,
            synced,
            outboxes,
            kernel,
            renew_part: 0,
            renew_parts: renew_parts as usize,
            ids,
            indexes,
            sender: random_u64(),
            sequence: 0,
            windows: HashMap::new(),
            stats,
            warned: None,
        }
    }

    /// Sends and receives until the process hands its listeners to a successor (`handed`
    /// turns true): the socket is closed then, so the peers' messages reach the successor.
    pub async fn run(mut self, mut handed: tokio::sync::watch::Receiver<bool>) {
        let socket = match tokio::net::UdpSocket::from_std(self.socket.try_clone().expect("dup")) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "sync: the socket cannot be used");
                return;
            }
        };
        tracing::info!(
            listen = %socket.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            peers = self.peers.len(),
            hold = ?self.hold,
            "sync: sharing flows with the peers"
        );
        let mut send = tokio::time::interval(self.interval);
        send.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rotate = tokio::time::interval(self.hold);
        rotate.tick().await;
        let mut buf = vec![0u8; 65_536];
        let mut pending = Vec::new();
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        loop {
            tokio::select! {
                _ = send.tick() => self.send(&socket, &mut pending, &mut out).await,
                _ = rotate.tick() => self.synced.rotate(),
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.receive(&buf[..n], from),
                    Err(e) => tracing::debug!(error = %e, "sync: receive"),
                },
                _ = handed.wait_for(|h| *h) => break,
            }
        }
        drop(socket);
        drop(self.socket);
        tracing::info!("sync: socket closed, the successor takes the peers' messages");
        std::future::pending::<()>().await;
    }

    /// Sends every queued placement to every peer.
    async fn send(
        &mut self,
        socket: &tokio::net::UdpSocket,
        pending: &mut Vec<Placement>,
        out: &mut Vec<u8>,
    ) {
        pending.clear();
        for o in &self.outboxes {
            o.drain_into(pending);
        }
        if let Some(kernel) = &self.kernel {
            kernel.synced_flows(self.renew_part, self.renew_parts, pending);
            self.renew_part = (self.renew_part + 1) % self.renew_parts;
        }
        let entries: Vec<Entry> = pending
            .iter()
            .filter_map(|p| {
                Some(Entry {
                    listener: *self.ids.get(usize::from(p.listener))?,
                    client: p.client,
                    backend: p.backend,
                })
            })
            .collect();
        for chunk in entries.chunks(ENTRIES_PER_MESSAGE) {
            self.sequence += 1;
            wire::encode(&self.key, self.sender, self.sequence, chunk, out);
            for peer in &self.peers {
                match socket.send_to(out, peer).await {
                    Ok(_) => {
                        self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .placements_sent
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %peer, error = %e, "sync: send");
                    }
                }
            }
        }
    }

    /// Records what an authenticated, new message from a peer says.
    fn receive(&mut self, datagram: &[u8], from: SocketAddr) {
        let Some(peer) = self.peers.iter().position(|p| same_ip(p.ip(), from.ip())) else {
            return self.refuse(0, from);
        };
        let m = match wire::decode(&self.key, datagram) {
            Ok(m) => m,
            Err(Refused::Malformed) => return self.refuse(1, from),
            Err(Refused::Forged) => return self.refuse(2, from),
        };
        if self.windows.len() >= MAX_SENDERS && !self.windows.contains_key(&m.sender) {
            self.windows.clear();
        }
        if !self.windows.entry(m.sender).or_default().accept(m.sequence) {
            return self.refuse(3, from);
        }
        let stats = &self.stats;
        if stats.heard[peer].swap(unix_ms(), Ordering::Relaxed) == 0 {
            tracing::info!(peer = %self.peers[peer], "sync: heard from the peer");
        }
        stats.messages_received.fetch_add(1, Ordering::Relaxed);
        stats
            .placements_received
            .fetch_add(m.entries.len() as u64, Ordering::Relaxed);
        for e in m.entries {
            let Some(&listener) = self.indexes.get(&e.listener) else {
                stats.unknown_listener.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let p = Placement {
                listener,
                client: e.client,
                backend: e.backend,
            };
            if let Some(kernel) = &self.kernel {
                kernel.learn(&p);
            }
            if self.synced.record(p) == Recorded::Full {
                stats.table_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Sync {
    /// Counts a refused datagram and logs it, at most once a minute.
    fn refuse(&mut self, reason: usize, from: SocketAddr) {
        let n = self.stats.refused[reason].fetch_add(1, Ordering::Relaxed) + 1;
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            self.warned = Some(std::time::Instant::now());
            tracing::warn!(
                from = %from,
                reason = REFUSED[reason],
                refused = n,
                "sync: datagram refused (not a peer's, or not with the shared key: check \
                 sync.peers and sync.key_file on both sides)"
            );
        }
    }
}

/// Whether `a` and `b` are one address (an IPv4 peer may be seen as IPv4-mapped IPv6).
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A number no other process is likely to draw (std's hasher keys are random per process).
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
}
