//! Running udplb: publish the first snapshot, start the workers, serve the admin endpoint,
//! wait for a signal, stop.
//!
//! Owns: the process lifecycle and the threads of the control plane, each with its own tokio
//! runtime so that none can stall another: `udplb-health` (the health monitor, its checkers and
//! notify hooks, and the only publisher of snapshots: [`control::run`]), `udplb-admin` (the
//! admin endpoint) and the main thread (signals and reloads, whose file reads run on a blocking
//! thread with a timeout). The data plane runs on its own plain threads and never waits for
//! any of them.
//! Must not: touch datagrams.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use udplb_config::Config;
use udplb_dataplane::{Dataplane, DataplaneOptions};

use crate::plan::snapshot_of;
use crate::{
    admin, announce, control, health, kernel, privileges, reload, sync, systemd, tcp, upgrade,
};

/// Runs until SIGINT or SIGTERM; SIGHUP reloads `source` when udplb runs from a file; SIGUSR2
/// starts the program file udplb was started from and hands over to it ([`upgrade`]).
pub fn run(cfg: Config, source: Option<PathBuf>) -> anyhow::Result<()> {
    // Read first: after a package upgrade replaced the file, this path is the new program.
    let program = std::env::current_exe().context("locating the udplb program")?;
    let mut inheritance = upgrade::Inheritance::receive().context("upgrade: taking over")?;
    let workers = cfg
        .runtime
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let nofile = match udplb_sys::socket::raise_nofile_limit() {
        Ok(limit) => {
            warn_if_flows_exceed(&cfg, limit);
            limit
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open file limit");
            udplb_sys::socket::nofile_limit().unwrap_or(1024)
        }
    };
    // Checked backends start in their configured state (down until the first check passes, by
    // default), so no datagram goes to a backend never seen healthy.
    let mut trackers = health::Trackers::initial(&cfg);
    if let Some(from) = &inheritance {
        trackers.inherit(&cfg, from.health());
    }
    let snapshot = snapshot_of(&cfg, 1, None, &trackers);
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    // Everything privileged first (sockets), then drop privileges, then start threads.
    let descriptor_reserve = admin::descriptor_reserve(nofile, &cfg);
    let options = DataplaneOptions {
        workers,
        descriptor_reserve,
    };
    let inherited_udp = inheritance
        .as_mut()
        .map_or_else(Vec::new, |from| from.udp_sockets(&cfg.listeners));
    if let Some(n) = inherited_udp.iter().map(Vec::len).find(|&n| n > 0)
        && n != workers
    {
        tracing::info!(
            workers = n,
            configured = workers,
            "upgrade: as many workers as the predecessor (a change of workers needs a restart)"
        );
    }
    let mut bound = Dataplane::bind_inheriting(Arc::clone(&shared), &options, inherited_udp)?;
    let workers = bound.sockets().len();
    let tcp_bound = tcp::bind(&shared.load(), bound.listener_addrs(), |i, addr| {
        let from = inheritance.as_mut()?;
        from.tcp_socket(&cfg.listeners[i].name, addr)
    })?;
    let admin_listener = match &cfg.admin {
        Some(a) => match inheritance
            .as_mut()
            .and_then(|from| from.admin_socket(a.listen))
        {
            Some(socket) => {
                socket.set_nonblocking(true)?;
                Some(socket)
            }
            None => Some(bind_admin(a.listen)?),
        },
        None => None,
    };
    let sync_socket = match &cfg.sync {
        Some(s) => {
            let inherited = inheritance
                .as_mut()
                .and_then(|from| from.sync_socket(s.listen));
            Some(sync::bind(s, inherited)?)
        }
        None => None,
    };
    // Loaded and attached while udplb may still (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN).
    let inherited_lock = inheritance.as_mut().and_then(|from| from.bpf_dir_lock());
    let kernel_plane = kernel::start(&cfg, &shared.load(), inherited_lock)?;
    let offer = upgrade::offer(
        program,
        &cfg,
        &bound,
        &tcp_bound,
        admin_listener.as_ref(),
        sync_socket.as_ref().map(|(socket, _)| socket),
        kernel_plane.as_ref().and_then(|k| k.pin_lock()),
    )
    .context("keeping the sockets for an upgrade")?;
    // Read while udplb may still read what only root can.
    let token = match cfg.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
        Some(path) => {
            Some(crate::token::read(path).map_err(|e| anyhow::anyhow!("admin.token_file: {e}"))?)
        }
        None => None,
    };
    if let Some(a) = cfg
        .admin
        .as_ref()
        .filter(|a| a.allow_changes && token.is_none())
    {
        tracing::warn!(
            address = %a.listen,
            "the admin API allows changes without a token: any local user or process that \
             can reach the address can drain, remove and add backends and reload; set \
             admin.token_file (--admin-token-file)"
        );
    }
    announce::warn_if_placement_differs_across_instances(&cfg);
    let keep = privileges::needed_capabilities(&cfg, kernel_plane.is_some());
    match privileges::drop_privileges(&cfg.runtime, &keep)? {
        privileges::Outcome::Switched {
            user,
            uid,
            gid,
            default,
        } => tracing::info!(
            user = %user,
            uid,
            gid,
            reason = if default {
                "the default when started as root without runtime.user (--user) or allow_root \
                 (--allow-root)"
            } else {
                "runtime.user (--user)"
            },
            capabilities = privileges::names(&keep),
            "switched user after binding"
        ),
        privileges::Outcome::StayedRoot | privileges::Outcome::NotRoot => {}
    }
    let successor = match inheritance {
        Some(from) => {
            let takeover = from.bound(&cfg).context("upgrade: taking over")?;
            bound.inherit(takeover.placements, takeover.flows);
            upgrade::remember(&shared.load(), &takeover.remembered);
            Some(takeover.successor)
        }
        None => None,
    };
    let sync_status = cfg.sync.as_ref().map(|s| {
        let synced = Arc::new(udplb_core::sync::Synced::new(s.max_entries));
        sync::Status {
            listen: s.listen,
            peers: s.peers.clone(),
            outboxes: bound.share(Arc::clone(&synced)),
            synced,
            kernel: kernel_plane.clone(),
            stats: Arc::new(sync::Stats::new(s.peers.len())),
        }
    });
    let dataplane = bound.start()?;
    if let Some(plane) = kernel_plane.clone() {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("udplb-kernel".into())
            .spawn(move || plane.follow(shared))
            .context("starting the udplb-kernel thread")?;
    }
    if let Some(plane) = kernel_plane.clone() {
        std::thread::Builder::new()
            .name("udplb-flow-count".into())
            .spawn(move || plane.count_flows())
            .context("starting the udplb-flow-count thread")?;
    }
    for (l, addr) in cfg.listeners.iter().zip(dataplane.listener_addrs()) {
        let pool = cfg
            .pools
            .iter()
            .find(|p| p.name == l.pool)
            .expect("validated");
        tracing::info!(
            listener = %l.name,
            address = %addr,
            pool = %pool.name,
            mode = l.mode.name(),
            tcp = cfg.takes_tcp(l),
            scheduler = %pool.scheduler,
            backends = pool.backends.len(),
            workers,
            "listening"
        );
    }
    let cfg = Arc::new(cfg);
    let (configs, running_config) = tokio::sync::watch::channel(Arc::clone(&cfg));
    let monitor = health::Monitor::new(Arc::clone(&cfg), trackers, dataplane.stats().to_vec())
        .with_kernel(kernel_plane.clone());
    let control = control::Publisher::new(Arc::clone(&cfg), Arc::clone(&shared), configs);
    let reload_status = reload::started();
    let (publisher, commands) = tokio::sync::mpsc::channel(4);
    let reloader = Arc::new(tokio::sync::Mutex::new(reload::Reloader::new(
        source,
        Arc::clone(&cfg),
        publisher.clone(),
        Arc::clone(&reload_status),
    )));
    let tcp_stats: Arc<[tcp::TcpStats]> =
        cfg.listeners.iter().map(|_| Default::default()).collect();
    let state = Arc::new(admin::State {
        tcp: Arc::clone(&tcp_stats),
        rates: Default::default(),
        started_unix: crate::health::unix_now(),
        quorum: monitor.quorum_status(),
        announce: cfg.announce.as_ref().map(|_| Default::default()),
        sync: sync_status.clone(),
        kernel: kernel_plane.clone(),
        shared: Arc::clone(&shared),
        stats: dataplane.stats().to_vec(),
        epoch: dataplane.epoch(),
        workers,
        health: monitor.status(),
        reload: reload_status,
        publisher: publisher.clone(),
        allow_changes: cfg.admin.as_ref().is_some_and(|a| a.allow_changes),
        token,
        reloader: Arc::clone(&reloader),
        connections: Arc::new(admin::Connections::new(admin::MIN_CONNECTIONS)),
    });
    // A control thread that ends (a panic) ends udplb, rather than leaving it serving without
    // health checks or without its admin endpoint.
    let (ended, mut thread_ended) = tokio::sync::mpsc::unbounded_channel();
    let (handed_over, handed) = tokio::sync::watch::channel(false);
    spawn_control_thread("udplb-health", ended.clone(), move || {
        control::run(control, monitor, commands)
    })?;
    if !tcp_bound.is_empty() {
        spawn_control_thread("udplb-tcp", ended.clone(), move || {
            tcp::serve(tcp_bound, shared, tcp_stats, handed)
        })?;
    }
    let upgrader = upgrade::Upgrader {
        offer: Arc::new(offer),
        listening: dataplane.listening(),
        busy: Arc::default(),
        state: Arc::clone(&state),
        configs: running_config.clone(),
        handed_over: Arc::new(handed_over),
    };
    if let (Some(s), Some(socket), Some(status)) = (&cfg.sync, sync_socket, sync_status) {
        let task = sync::Sync::new(
            &cfg,
            s,
            socket,
            status.synced,
            status.outboxes,
            status.kernel,
            status.stats,
        );
        let handed = upgrader.handed_over.subscribe();
        spawn_control_thread("udplb-sync", ended.clone(), move || task.run(handed))?;
    }
    if let Some(listener) = admin_listener {
        let state = Arc::clone(&state);
        let handed = upgrader.handed_over.subscribe();
        spawn_control_thread("udplb-admin", ended, move || {
            admin::serve(listener, state, descriptor_reserve, running_config, handed)
        })?;
    }
    if let Some(successor) = successor {
        successor.started();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("udplb-control")
        .build()
        .context("starting the control plane")?;
    let result = runtime.block_on(async {
        let mut signals = Signals::install()?;
        systemd::ready(&format!(
            "serving {} listener(s) with {workers} worker(s)",
            cfg.listeners.len()
        ));
        systemd::spawn_watchdog(state.stats.clone());
        let (stopping, stop_announcing) = tokio::sync::watch::channel(false);
        if let (Some(a), Some(status)) = (&cfg.announce, &state.announce) {
            tokio::spawn(announce::run(
                a.clone(),
                Arc::clone(&state),
                stop_announcing,
                Arc::clone(status),
            ));
        }
        let (upgraded, mut successor) = tokio::sync::mpsc::unbounded_channel();
        let end = tokio::select! {
            _ = signals.reload_until_stop(&reloader, &upgrader, &upgraded) => End::Stop,
            Some(name) = thread_ended.recv() => End::Failed(name),
            Some(pid) = successor.recv() => End::HandedOver(pid),
        };
        match end {
            // Graceful stop: no new flows, established ones served until they end or the
            // grace period is over (a second signal stops at once).
            End::Stop => {
                systemd::stopping();
                if let (Some(a), Some(status)) = (&cfg.announce, &state.announce) {
                    withdraw_first(a, status, &stopping, &mut signals).await;
                }
                let _ = publisher.send(control::Command::StopAdmitting).await;
            }
            End::Failed(name) => {
                systemd::stopping();
                let _ = publisher.send(control::Command::StopAdmitting).await;
                anyhow::bail!("the {name} thread stopped");
            }
            // The successor reads the listeners now: only established flows are left here.
            End::HandedOver(pid) => tracing::info!(successor = pid, "handed over"),
        }
        let grace = cfg
            .runtime
            .shutdown_grace
            .unwrap_or(udplb_config::defaults::SHUTDOWN_GRACE);
        drain(&state, grace, &mut signals).await;
        Ok(())
    });
    tracing::info!("stopping");
    dataplane.stop();
    result
}

/// Runs `task` on a thread of its own with its own single-threaded runtime; `ended` hears the
/// thread's name if it ever stops (the tasks run for as long as udplb does).
fn spawn_control_thread<F, T>(
    name: &'static str,
    ended: tokio::sync::mpsc::UnboundedSender<&'static str>,
    task: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> T + Send + 'static,
    T: std::future::Future<Output = ()>,
{
    /// Says the thread ended, also when it unwinds.
    struct Ended(
        &'static str,
        tokio::sync::mpsc::UnboundedSender<&'static str>,
    );
    impl Drop for Ended {
        fn drop(&mut self) {
            tracing::error!(thread = self.0, "control thread stopped");
            let _ = self.1.send(self.0);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(name)
        .build()
        .with_context(|| format!("starting the {name} runtime"))?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ended = Ended(name, ended);
            runtime.block_on(task());
        })
        .with_context(|| format!("starting the {name} thread"))?;
    Ok(())
}

/// At shutdown with `[announce]`: withdraws, then serves as before for `withdraw_delay` so the
/// routers move the traffic away before admission stops (a second signal cuts it short).
async fn withdraw_first(
    announce: &udplb_config::Announce,
    status: &announce::Status,
    stopping: &tokio::sync::watch::Sender<bool>,
    signals: &mut Signals,
) {
    stopping.send_replace(true);
    tracing::info!("stopping: withdrawing the announcement first");
    tokio::select! {
        done = announce::withdrawn(status, std::time::Duration::from_secs(15)) => {
            if !done {
                tracing::warn!("the announcement could not be withdrawn: stopping anyway");
            }
            tokio::select! {
                _ = tokio::time::sleep(announce.withdraw_delay) => {}
                _ = signals.stop() => tracing::info!("second stop signal: stopping now"),
            }
        }
        _ = signals.stop() => tracing::info!("second stop signal: stopping now"),
    }
}

/// Why the daemon stops.
enum End {
    /// SIGTERM or SIGINT.
    Stop,
    /// A control thread ended.
    Failed(&'static str),
    /// An upgrade's successor (this process id) serves.
    HandedOver(u32),
}

/// Binds the admin endpoint's TCP socket (before privileges are dropped).
fn bind_admin(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind the admin endpoint {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Every flow holds one descriptor (its upstream socket): say so when the flow caps cannot all
/// be reached, since new flows are then shed as `upstream_socket` before the cap.
fn warn_if_flows_exceed(cfg: &Config, limit: u64) {
    /// Descriptors for listeners, epoll, the admin endpoint and the like.
    const RESERVE: u64 = 64;
    let flows: u64 = cfg.listeners.iter().map(|l| u64::from(l.max_flows)).sum();
    if flows + RESERVE > limit {
        tracing::warn!(
            open_file_limit = limit,
            max_flows = flows,
            "the open file limit is below the flow caps: once descriptors run out, new flows are \
             dropped and counted as upstream_socket (raise LimitNOFILE or lower max_flows)"
        );
    } else {
        tracing::debug!(open_file_limit = limit, "open file limit");
    }
}

/// The signals the daemon reacts to.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            usr2: signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?,
        })
    }

    /// Reloads on SIGHUP, upgrades on SIGUSR2; returns on SIGTERM or SIGINT, also while a
    /// reload is under way (each reload is a task of its own, one at a time in signal order).
    async fn reload_until_stop(
        &mut self,
        reloader: &Arc<tokio::sync::Mutex<reload::Reloader>>,
        upgrader: &upgrade::Upgrader,
        upgraded: &tokio::sync::mpsc::UnboundedSender<u32>,
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.usr2.recv() => upgrader.start(upgraded),
                _ = self.hup.recv() => {
                    let reloader = Arc::clone(reloader);
                    tokio::spawn(async move {
                        let mut reloader = reloader.lock().await;
                        systemd::reloading();
                        // Failures are logged and counted by the reloader; the old
                        // configuration keeps serving either way.
                        let status = match reloader.reload().await {
                            Ok(()) => "serving: configuration reloaded".to_string(),
                            Err(e) => format!(
                                "serving the previous configuration: reload failed: {}",
                                e.lines().next().unwrap_or("")
                            ),
                        };
                        systemd::ready(&status);
                    });
                }
            }
        }
    }

    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Waits until no flow or TCP connection is live, `grace` has passed, or a second stop signal
/// comes.
async fn drain(state: &admin::State, grace: std::time::Duration, signals: &mut Signals) {
    let stats = &state.stats;
    let live = || -> u64 {
        let listeners = stats.first().map_or(0, |w| w.listeners.len());
        let flows: u64 = (0..listeners)
            .map(|i| udplb_dataplane::ListenerTotals::sum(stats, i).flows_live)
            .sum();
        let connections: u64 = state
            .tcp
            .iter()
            .map(|t| t.active.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        flows + connections
    };
    tracing::info!(live = live(), grace = %humantime::format_duration(grace), "stopping: no new flows or connections, serving established ones");
    let deadline = tokio::time::Instant::now() + grace;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let live = live();
                if live == 0 {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::info!(live, "grace period over");
                    return;
                }
            }
            _ = signals.stop() => {
                tracing::info!("second stop signal: stopping now");
                return;
            }
        }
    }
}
