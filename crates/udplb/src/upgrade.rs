//! Binary upgrades and restarts without losing a datagram: the running process (the
//! predecessor) starts the program file it was started from as its successor and hands it its
//! open sockets; both read the same sockets until the successor runs, then the predecessor
//! stops reading them and serves only the replies of its established flows until they end.
//!
//! The steps, over a [`Channel`] the predecessor opens and the successor inherits
//! ([`ENV`] names its descriptor):
//! 1. successor: `Hello` once its configuration is read and checked;
//! 2. predecessor: `Sockets`, with every listener's UDP sockets (one per worker: each holds a
//!    share of the clients in the kernel's `SO_REUSEPORT` group), their TCP sockets and the
//!    admin endpoint's, and the health of every backend;
//! 3. successor: `Bound` once it has bound what it did not inherit and dropped privileges;
//! 4. predecessor: stops reading its listener sockets (datagrams queue in them meanwhile) and
//!    sends `Flows`: the flows with connected sockets of their own, with those sockets (the
//!    successor continues them: same backend, same source port, nothing to open; replies
//!    wait in the sockets meanwhile), and where each other flow goes, so that its client's
//!    next flow opens to the same backend (whatever the scheduler);
//! 5. successor: `Started` once its workers read the sockets;
//! 6. predecessor: stops accepting TCP and admin connections, tells systemd the successor is
//!    the main process, and says `Released`; it then serves its established flows' replies and
//!    connections until they end (or `shutdown_grace`) and exits.
//!
//! Any failure before 6 leaves the predecessor serving as before (reading its sockets again if
//! it had stopped) and ends the successor.
//!
//! Owns: the messages, both sides of the steps, and [`Upgrader`] (SIGUSR2 starts one upgrade at
//! a time, on a thread of its own: the steps block). Must not: touch datagrams (the workers'
//! [`udplb_dataplane::handover::Listening`] switch does), or run without being asked (a second
//! udplb that was not started this way is refused at bind).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use udplb_config::{Config, ListenerConfig};
use udplb_core::flow::FlowKey;
use udplb_core::handover::{Inherited, Placement};
use udplb_dataplane::handover::{HandedFlow, Listening};
use udplb_sys::handover::Channel;

/// The environment variable that gives a successor the descriptor of its channel.
pub const ENV: &str = "UDPLB_HANDOVER_FD";

/// How long the successor may take to read and check its configuration.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each later step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the predecessor's workers may take to stop reading their listener sockets.
const STOP_READING_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
enum Message {
    Hello {
        version: String,
        pid: u32,
    },
    Sockets(Manifest),
    Bound,
    Flows {
        flows: Vec<Flow>,
        continued: Vec<Continued>,
        remembered: Vec<Remembered>,
    },
    Started,
    Released,
}

/// What comes with the descriptors, in their order: every listener's UDP sockets, then the
/// TCP sockets, then the admin endpoint's, then the flow-state sync's, then the lock on
/// `runtime.bpf_dir`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    listeners: Vec<ListenerSockets>,
    tcp: Vec<Named>,
    admin: Option<SocketAddr>,
    #[serde(default)]
    sync: Option<SocketAddr>,
    /// The directory of the kernel data plane's pinned maps, whose lock comes last.
    #[serde(default)]
    bpf_dir: Option<PathBuf>,
    health: Vec<Health>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ListenerSockets {
    name: String,
    address: SocketAddr,
    sockets: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Named {
    listener: String,
    address: SocketAddr,
}

/// A backend's health in the predecessor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub pool: String,
    pub backend: SocketAddr,
    pub up: bool,
}

/// A client a listener's persistence table remembers (its key there) and its backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Remembered {
    pub listener: String,
    pub client: SocketAddr,
    pub backend: SocketAddr,
}

/// A flow handed over with its socket (the descriptors of a `Flows` message, in order).
#[derive(Debug, Serialize, Deserialize)]
struct Continued {
    worker: usize,
    listener: String,
    client: SocketAddr,
    local: Option<std::net::IpAddr>,
    backend: SocketAddr,
    requested: u32,
    replied: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Flow {
    listener: String,
    client: SocketAddr,
    backend: SocketAddr,
}

fn send(channel: &Channel, message: &Message, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(message).context("encoding a handover message")?;
    channel
        .send(&bytes, fds)
        .context("writing to the handover channel")
}

fn recv(channel: &Channel, timeout: Duration) -> anyhow::Result<(Message, Vec<OwnedFd>)> {
    channel.set_timeout(Some(timeout))?;
    let (bytes, fds) = channel.recv().map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => anyhow::anyhow!("the other process ended"),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow::anyhow!("no answer within {}", humantime::format_duration(timeout))
        }
        _ => anyhow::Error::new(e).context("reading the handover channel"),
    })?;
    let message = serde_json::from_slice(&bytes).context("a handover message udplb cannot read")?;
    Ok((message, fds))
}

/// What a running udplb can hand to its successor: copies of its sockets, taken before its
/// threads own them.
pub struct Offer {
    exe: PathBuf,
    args: Vec<OsString>,
    listeners: Vec<(String, SocketAddr, Vec<UdpSocket>)>,
    tcp: Vec<(String, SocketAddr, TcpListener)>,
    admin: Option<(SocketAddr, TcpListener)>,
    sync: Option<(SocketAddr, UdpSocket)>,
    bpf_dir: Option<(PathBuf, OwnedFd)>,
}

impl Offer {
    /// The program to start (the file this process was started from: after a package
    /// upgrade, the new binary) with this process's arguments.
    pub fn new(exe: PathBuf, args: Vec<OsString>) -> Offer {
        Offer {
            exe,
            args,
            listeners: Vec::new(),
            tcp: Vec::new(),
            admin: None,
            sync: None,
            bpf_dir: None,
        }
    }

    /// Listener `name` on `address`, read by `sockets` (one per worker).
    pub fn listener(&mut self, name: &str, address: SocketAddr, sockets: Vec<UdpSocket>) {
        self.listeners.push((name.to_string(), address, sockets));
    }

    /// Listener `name`'s TCP socket.
    pub fn tcp(&mut self, name: &str, socket: TcpListener) -> std::io::Result<()> {
        let address = socket.local_addr()?;
        self.tcp.push((name.to_string(), address, socket));
        Ok(())
    }

    /// The admin endpoint's socket.
    pub fn admin(&mut self, socket: TcpListener) -> std::io::Result<()> {
        self.admin = Some((socket.local_addr()?, socket));
        Ok(())
    }

    /// The flow-state sync's socket.
    pub fn sync(&mut self, socket: UdpSocket) -> std::io::Result<()> {
        self.sync = Some((socket.local_addr()?, socket));
        Ok(())
    }

    /// The lock on `runtime.bpf_dir` (`dir`): the successor shares it, and keeps it once this
    /// process exits.
    pub fn bpf_dir_lock(&mut self, dir: &Path, lock: OwnedFd) {
        self.bpf_dir = Some((dir.to_path_buf(), lock));
    }

    /// Starts the successor and hands over to it (steps 2 to 6 above, blocking). `health` is
    /// read when the successor asks, `remembered` (the persistence tables) once the workers
    /// stopped; `release` runs in step 6 before the successor hears `Released` (it stops this
    /// process accepting connections). Returns the successor's process id; on error this
    /// process serves as before and the successor was ended.
    pub fn hand_over(
        &self,
        listening: &Listening,
        health: impl FnOnce() -> Vec<Health>,
        remembered: impl FnOnce() -> Vec<Remembered>,
        release: impl FnOnce(u32),
    ) -> anyhow::Result<u32> {
        let (ours, theirs) = Channel::pair().context("creating the handover channel")?;
        theirs.inheritable()?;
        let mut command = std::process::Command::new(&self.exe);
        command
            .args(&self.args)
            .env(ENV, theirs.raw().to_string())
            // systemd's watchdog names this process; the successor pets it once it is the main
            // process (its own pid is not known before it starts).
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null());
        let mut child = spawn_when_not_busy(&mut command)
            .with_context(|| format!("starting {}", self.exe.display()))?;
        drop(theirs);
        let pid = child.id();
        tracing::info!(pid, program = %self.exe.display(), "upgrade: successor started");
        let outcome = self.steps(&ours, pid, listening, health, remembered, release);
        if let Err(e) = &outcome {
            // Whatever it got, it does not serve: it must not hold sockets this process reads.
            let _ = child.kill();
            let status = child.wait();
            tracing::error!(
                pid,
                error = format!("{e:#}"),
                successor = ?status.ok(),
                "upgrade failed: still serving"
            );
        } else {
            // Reaped by whoever adopts it once this process exits.
            drop(child);
        }
        outcome.map(|()| pid)
    }

    fn steps(
        &self,
        channel: &Channel,
        pid: u32,
        listening: &Listening,
        health: impl FnOnce() -> Vec<Health>,
        remembered: impl FnOnce() -> Vec<Remembered>,
        release: impl FnOnce(u32),
    ) -> anyhow::Result<()> {
        match recv(channel, HELLO_TIMEOUT).context("waiting for the successor to start")? {
            (Message::Hello { version, pid: said }, _) if said == pid => {
                tracing::info!(pid, version, "upgrade: successor ready to take over");
            }
            (m, _) => bail!("the successor said {m:?} first"),
        }
        let manifest = Manifest {
            listeners: self
                .listeners
                .iter()
                .map(|(name, address, sockets)| ListenerSockets {
                    name: name.clone(),
                    address: *address,
                    sockets: sockets.len(),
                })
                .collect(),
            tcp: self
                .tcp
                .iter()
                .map(|(listener, address, _)| Named {
                    listener: listener.clone(),
                    address: *address,
                })
                .collect(),
            admin: self.admin.as_ref().map(|(a, _)| *a),
            sync: self.sync.as_ref().map(|(a, _)| *a),
            bpf_dir: self.bpf_dir.as_ref().map(|(dir, _)| dir.clone()),
            health: health(),
        };
        let fds: Vec<BorrowedFd<'_>> = self
            .listeners
            .iter()
            .flat_map(|(_, _, sockets)| sockets.iter().map(|s| s.as_fd()))
            .chain(self.tcp.iter().map(|(_, _, s)| s.as_fd()))
            .chain(self.admin.iter().map(|(_, s)| s.as_fd()))
            .chain(self.sync.iter().map(|(_, s)| s.as_fd()))
            .chain(self.bpf_dir.iter().map(|(_, lock)| lock.as_fd()))
            .collect();
        send(channel, &Message::Sockets(manifest), &fds)?;
        match recv(channel, HELLO_TIMEOUT).context("waiting for the successor to bind")? {
            (Message::Bound, _) => {}
            (m, _) => bail!("the successor said {m:?} instead of Bound"),
        }
        // From here on the listener sockets queue for the successor.
        let Some(stopped) = listening.stop(STOP_READING_TIMEOUT) else {
            bail!("a worker did not stop reading its listener sockets in time");
        };
        let names: Vec<&str> = self.listeners.iter().map(|(n, _, _)| n.as_str()).collect();
        let name = |li: u16| names.get(usize::from(li)).map(|n| n.to_string());
        let flows = stopped
            .placements
            .iter()
            .filter_map(|p| {
                Some(Flow {
                    listener: name(p.listener)?,
                    client: p.client,
                    backend: p.backend,
                })
            })
            .collect::<Vec<_>>();
        let (continued, fds): (Vec<Continued>, Vec<BorrowedFd<'_>>) = stopped
            .flows
            .iter()
            .filter_map(|f| {
                let c = Continued {
                    worker: f.worker,
                    listener: name(f.key.listener)?,
                    client: f.key.client,
                    local: f.key.local,
                    backend: f.backend,
                    requested: f.requested,
                    replied: f.replied,
                };
                Some((c, f.socket.as_fd()))
            })
            .unzip();
        let (placed, kept) = (flows.len(), continued.len());
        let remembered = remembered();
        let message = Message::Flows {
            flows,
            continued,
            remembered,
        };
        let started = send(channel, &message, &fds)
            .and_then(|()| recv(channel, STEP_TIMEOUT).context("waiting for the successor to run"));
        drop(fds);
        match started {
            Ok((Message::Started, _)) => {}
            Ok((m, _)) => {
                listening.resume(stopped.flows);
                bail!("the successor said {m:?} instead of Started");
            }
            Err(e) => {
                listening.resume(stopped.flows);
                return Err(e);
            }
        }
        // The successor has its own descriptors of these sockets.
        drop(stopped);
        release(pid);
        crate::systemd::main_pid(pid);
        // The successor runs whether or not it hears this.
        let _ = send(channel, &Message::Released, &[]);
        tracing::info!(
            pid,
            continued = kept,
            placed,
            "upgrade: the successor serves; serving established flows until they end"
        );
        Ok(())
    }
}

/// Starts `command`, retrying for a while when its program file is busy (`ETXTBSY`: a
/// package manager, or a process it forked, still has the new file open for writing).
fn spawn_when_not_busy(
    command: &mut std::process::Command,
) -> std::io::Result<std::process::Child> {
    const BUSY_FOR: Duration = Duration::from_secs(2);
    let started = std::time::Instant::now();
    loop {
        match command.spawn() {
            Err(e)
                if e.raw_os_error() == Some(nix::libc::ETXTBSY) && started.elapsed() < BUSY_FOR =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            spawned => return spawned,
        }
    }
}

/// What a successor inherits from its predecessor.
pub struct Inheritance {
    channel: Channel,
    listeners: Vec<(ListenerSockets, Vec<UdpSocket>)>,
    tcp: Vec<(Named, TcpListener)>,
    admin: Option<(SocketAddr, TcpListener)>,
    sync: Option<(SocketAddr, UdpSocket)>,
    bpf_dir: Option<(PathBuf, std::fs::File)>,
    health: Vec<Health>,
}

impl Inheritance {
    /// When this process was started as a successor ([`ENV`] is set): says `Hello` and
    /// receives the sockets.
    pub fn receive() -> anyhow::Result<Option<Inheritance>> {
        let Some(fd) = std::env::var_os(ENV) else {
            return Ok(None);
        };
        let fd: i32 = fd
            .to_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{ENV}: not a descriptor number"))?;
        let channel = Channel::inherited(fd).context(ENV)?;
        let hello = Message::Hello {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
        };
        send(&channel, &hello, &[])?;
        let (manifest, fds) = match recv(&channel, STEP_TIMEOUT)? {
            (Message::Sockets(m), fds) => (m, fds),
            (m, _) => bail!("the predecessor said {m:?} instead of Sockets"),
        };
        let expected = manifest.listeners.iter().map(|l| l.sockets).sum::<usize>()
            + manifest.tcp.len()
            + usize::from(manifest.admin.is_some())
            + usize::from(manifest.sync.is_some())
            + usize::from(manifest.bpf_dir.is_some());
        if fds.len() != expected {
            bail!(
                "the predecessor sent {} descriptors for {expected} sockets",
                fds.len()
            );
        }
        let mut fds = fds.into_iter();
        let listeners = manifest
            .listeners
            .into_iter()
            .map(|l| {
                let sockets = fds.by_ref().take(l.sockets).map(UdpSocket::from).collect();
                (l, sockets)
            })
            .collect();
        let tcp = manifest
            .tcp
            .into_iter()
            .map(|n| (n, TcpListener::from(fds.next().expect("counted"))))
            .collect();
        let admin = manifest
            .admin
            .map(|a| (a, TcpListener::from(fds.next().expect("counted"))));
        let sync = manifest
            .sync
            .map(|a| (a, UdpSocket::from(fds.next().expect("counted"))));
        let bpf_dir = manifest
            .bpf_dir
            .map(|d| (d, std::fs::File::from(fds.next().expect("counted"))));
        Ok(Some(Inheritance {
            channel,
            listeners,
            tcp,
            admin,
            sync,
            bpf_dir,
            health: manifest.health,
        }))
    }

    /// The inherited UDP sockets of each of `listeners` (empty where none is inherited): those
    /// of the listener of the same name, if it is bound to the address the configuration asks
    /// for (port 0: any port), else those bound to exactly that address. Sockets of listeners
    /// the configuration no longer has are closed.
    pub fn udp_sockets(&mut self, listeners: &[ListenerConfig]) -> Vec<Vec<UdpSocket>> {
        let fits = |want: SocketAddr, got: SocketAddr| {
            want.ip() == got.ip() && (want.port() == 0 || want.port() == got.port())
        };
        let out = listeners
            .iter()
            .map(|l| {
                let by_name = self.listeners.iter().position(|(i, s)| {
                    i.name == l.name && fits(l.address, i.address) && !s.is_empty()
                });
                let found = by_name.or_else(|| {
                    self.listeners
                        .iter()
                        .position(|(i, s)| i.address == l.address && !s.is_empty())
                });
                found.map_or_else(Vec::new, |i| std::mem::take(&mut self.listeners[i].1))
            })
            .collect();
        for (l, sockets) in &self.listeners {
            if !sockets.is_empty() {
                tracing::info!(listener = %l.name, address = %l.address, "upgrade: listener no longer configured: closed");
            }
        }
        self.listeners.clear();
        out
    }

    /// The inherited TCP socket of listener `name`, bound to `address`.
    pub fn tcp_socket(&mut self, name: &str, address: SocketAddr) -> Option<TcpListener> {
        let i = self
            .tcp
            .iter()
            .position(|(n, _)| n.listener == name && n.address == address)?;
        Some(self.tcp.swap_remove(i).1)
    }

    /// The inherited admin endpoint socket, if it is bound to `address`.
    pub fn admin_socket(&mut self, address: SocketAddr) -> Option<TcpListener> {
        match self.admin.take() {
            Some((a, socket)) if a == address => Some(socket),
            _ => None,
        }
    }

    /// The inherited flow-state sync socket, if it is bound to `address`.
    pub fn sync_socket(&mut self, address: SocketAddr) -> Option<UdpSocket> {
        match self.sync.take() {
            Some((a, socket)) if a == address => Some(socket),
            _ => None,
        }
    }

    /// The predecessor's descriptor of the lock on `runtime.bpf_dir` (the directory is
    /// checked by [`crate::bpf_dir::Lock::take`]).
    pub fn bpf_dir_lock(&mut self) -> Option<std::fs::File> {
        self.bpf_dir.take().map(|(_, lock)| lock)
    }

    /// The backends' health in the predecessor.
    pub fn health(&self) -> &[Health] {
        &self.health
    }

    /// Step 3: tells the predecessor everything is bound and privileges are dropped, and
    /// receives its flows (those to continue, with their sockets, and where the others go),
    /// placed by index in `cfg`'s listeners, and the clients its persistence tables remember.
    pub fn bound(self, cfg: &Config) -> anyhow::Result<Takeover> {
        send(&self.channel, &Message::Bound, &[])?;
        let (flows, continued, remembered, fds) = match recv(&self.channel, STEP_TIMEOUT)? {
            (
                Message::Flows {
                    flows,
                    continued,
                    remembered,
                },
                fds,
            ) => (flows, continued, remembered, fds),
            (m, _) => bail!("the predecessor said {m:?} instead of Flows"),
        };
        if fds.len() != continued.len() {
            bail!(
                "the predecessor sent {} descriptors for {} flows",
                fds.len(),
                continued.len()
            );
        }
        let index: HashMap<&str, u16> = cfg
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (l.name.as_str(), i as u16))
            .collect();
        let handed: Vec<HandedFlow> = continued
            .into_iter()
            .zip(fds)
            .filter_map(|(c, fd)| {
                Some(HandedFlow {
                    worker: c.worker,
                    key: FlowKey {
                        listener: *index.get(c.listener.as_str())?,
                        client: c.client,
                        local: c.local,
                        origin: None,
                    },
                    backend: c.backend,
                    requested: c.requested,
                    replied: c.replied,
                    socket: UdpSocket::from(fd),
                })
            })
            .collect();
        let placed = flows.len();
        let table = Inherited::new(flows.into_iter().filter_map(|f| {
            Some(Placement {
                listener: *index.get(f.listener.as_str())?,
                client: f.client,
                backend: f.backend,
            })
        }));
        tracing::info!(
            remembered = remembered.len(),
            continued = handed.len(),
            placed,
            "upgrade: flows inherited"
        );
        Ok(Takeover {
            placements: Arc::new(table),
            flows: handed,
            remembered,
            successor: Successor {
                channel: self.channel,
            },
        })
    }
}

/// What a successor takes over in step 4.
pub struct Takeover {
    /// Where the flows left to the predecessor go.
    pub placements: Arc<Inherited>,
    /// The flows it continues on their sockets.
    pub flows: Vec<HandedFlow>,
    /// What the predecessor's persistence tables remembered.
    pub remembered: Vec<Remembered>,
    pub successor: Successor,
}

/// A successor whose workers are about to run.
pub struct Successor {
    channel: Channel,
}

impl Successor {
    /// Step 5: the workers read the sockets; waits for the predecessor's `Released`.
    pub fn started(self) {
        let released = send(&self.channel, &Message::Started, &[])
            .and_then(|()| recv(&self.channel, STEP_TIMEOUT));
        match released {
            Ok((Message::Released, _)) => tracing::info!("upgrade: took over"),
            Ok((m, _)) => tracing::warn!(message = ?m, "upgrade: unexpected answer; serving"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "upgrade: predecessor silent; serving"
            ),
        }
    }
}

/// Copies of every socket a successor would inherit, kept from before the threads own them.
pub fn offer(
    program: PathBuf,
    cfg: &Config,
    bound: &udplb_dataplane::Bound,
    tcp: &[crate::tcp::Bound],
    admin: Option<&std::net::TcpListener>,
    sync: Option<&UdpSocket>,
    bpf_dir_lock: Option<&crate::bpf_dir::Lock>,
) -> std::io::Result<Offer> {
    let mut offer = Offer::new(program, std::env::args_os().skip(1).collect());
    for (i, l) in cfg.listeners.iter().enumerate() {
        let sockets = bound
            .sockets()
            .iter()
            .map(|worker| worker[i].try_clone())
            .collect::<std::io::Result<_>>()?;
        offer.listener(&l.name, bound.listener_addrs()[i], sockets);
    }
    for b in tcp {
        offer.tcp(&cfg.listeners[b.listener()].name, b.socket().try_clone()?)?;
    }
    if let Some(socket) = admin {
        offer.admin(socket.try_clone()?)?;
    }
    if let Some(socket) = sync {
        offer.sync(socket.try_clone()?)?;
    }
    if let Some(lock) = bpf_dir_lock {
        offer.bpf_dir_lock(lock.dir(), lock.share()?);
    }
    Ok(offer)
}

/// Upgrades on SIGUSR2, one at a time, each on a thread of its own (the steps block).
pub struct Upgrader {
    pub offer: Arc<Offer>,
    pub listening: udplb_dataplane::handover::Listening,
    pub busy: Arc<std::sync::atomic::AtomicBool>,
    pub state: Arc<crate::admin::State>,
    pub configs: tokio::sync::watch::Receiver<Arc<Config>>,
    /// Turned on when the successor runs: this process stops accepting connections.
    pub handed_over: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Upgrader {
    /// Starts an upgrade unless one is under way; `done` hears the successor's process id
    /// once it serves.
    pub fn start(&self, done: &tokio::sync::mpsc::UnboundedSender<u32>) {
        use std::sync::atomic::Ordering;
        if self.busy.swap(true, Ordering::AcqRel) {
            tracing::info!("upgrade: one is under way already");
            return;
        }
        let offer = Arc::clone(&self.offer);
        let listening = self.listening.clone();
        let busy = Arc::clone(&self.busy);
        let state = Arc::clone(&self.state);
        let cfg = Arc::clone(&self.configs.borrow());
        let handed_over = Arc::clone(&self.handed_over);
        let done = done.clone();
        let spawned = std::thread::Builder::new()
            .name("udplb-upgrade".into())
            .spawn(move || {
                // Root: the successor is root too. Otherwise it starts with what this process
                // kept (CAP_NET_ADMIN for transparent pools), and nothing more.
                if let Err(e) = crate::privileges::pass_to_next_program() {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "upgrade: capabilities not passed on"
                    );
                }
                let health = || health_of(&cfg, &state);
                let remembered = || remembered_by(&state.shared.load());
                let release = |_| {
                    handed_over.send_replace(true);
                };
                match offer.hand_over(&listening, health, remembered, release) {
                    Ok(pid) => {
                        let _ = done.send(pid);
                    }
                    Err(_) => busy.store(false, Ordering::Release),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "upgrade: cannot start its thread");
            self.busy.store(false, Ordering::Release);
        }
    }
}

/// Every backend's health as the monitor has it, for a successor.
fn health_of(cfg: &Config, state: &crate::admin::State) -> Vec<Health> {
    let status = state.health.lock().unwrap_or_else(|p| p.into_inner());
    cfg.pools
        .iter()
        .zip(status.iter())
        .flat_map(|(pool, backends)| {
            pool.backends.iter().zip(backends).map(|(b, s)| Health {
                pool: pool.name.clone(),
                backend: b.spec.addr,
                up: s.healthy,
            })
        })
        .collect()
}

/// Every client the listeners' persistence tables remember, for a successor.
fn remembered_by(snap: &udplb_core::snapshot::Snapshot) -> Vec<Remembered> {
    let mut all = Vec::new();
    for spec in &snap.listeners {
        let Some(table) = &spec.persistence else {
            continue;
        };
        let pool = &snap.pools[spec.pool];
        for (client, id) in table.entries() {
            if let Some(i) = pool.position_of_id(id) {
                all.push(Remembered {
                    listener: spec.name.clone(),
                    client,
                    backend: pool.backends[i].spec.addr,
                });
            }
        }
    }
    all
}

/// Seeds the persistence tables of `snap` with what a predecessor remembered (as of now: the
/// workers' clock starts at 0 when they start, right after).
pub fn remember(snap: &udplb_core::snapshot::Snapshot, remembered: &[Remembered]) {
    for r in remembered {
        let Some(spec) = snap.listeners.iter().find(|l| l.name == r.listener) else {
            continue;
        };
        let (Some(table), pool) = (&spec.persistence, &snap.pools[spec.pool]) else {
            continue;
        };
        if let Some(i) = pool.position(&r.backend) {
            table.remember(r.client, pool.backends[i].id, udplb_core::Time(0));
        }
    }
}
