//! Shared harness of the black-box tests: start the real udplb binary, real backends on
//! loopback, wait on conditions with deadlines, read the admin endpoint. Every test file
//! takes what it shares with another from here: free addresses, scratch directories and
//! configuration files, udplb processes (one-liner or file, `ctl`, exit codes, signals), echo
//! backends, clients and steady load, readers of `/stats`; `netns` builds network namespaces
//! and `spoof` forges sources.
#![allow(dead_code)]

pub mod netns;
pub mod spoof;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long any condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A free UDP port on `ip` (bound then released; the tests bind it again at once).
pub fn free_udp_port(ip: &str) -> u16 {
    let s = UdpSocket::bind((ip, 0)).expect("bind an ephemeral port");
    s.local_addr().unwrap().port()
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A free address for an admin endpoint on loopback.
pub fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_tcp_port()))
}

/// A free UDP address on `ip` for a listener (or for a backend that is not there).
pub fn listen_addr(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), free_udp_port(ip))
}

/// A fresh, empty directory for this test process's `name` (emptied if an earlier test of the
/// same name left it; names must differ between the tests of one file). Under the system's
/// temporary directory; tests that care remove it at the end.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("udplb-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `toml` to a fresh file of its own and returns the path.
pub fn write_config(toml: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let path =
        scratch_dir(&format!("config-{}", N.fetch_add(1, Ordering::Relaxed))).join("udplb.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Replaces the file at `path` with `text` as a config manager would: written beside it, then
/// renamed over it, so that a reload never reads half a file.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The configuration most tests need: the admin endpoint on `admin`, one listener `l` on
/// `listen` with the pool `p` of `backends` (TOML array items, e.g. [`quoted`] addresses).
/// `listener` lines go under `[listeners.l]` and `pool` lines under `[pools.p]`; either may go
/// on with tables of their own (`[listeners.l.limits]`, `[pools.p.health]`, another pool).
pub fn one_pool_toml(
    admin: SocketAddr,
    listen: SocketAddr,
    listener: &str,
    backends: &[String],
    pool: &str,
) -> String {
    format!(
        "[admin]\nlisten = \"{admin}\"\n[listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n{listener}\n\
         [pools.p]\nbackends = [{}]\n{pool}\n",
        backends.join(", ")
    )
}

/// Starts `udplb run` on a [`one_pool_toml`] file with a free admin endpoint and the listener
/// on a free port of `ip`; returns it and the listener's address.
pub fn run_one_pool(
    ip: &str,
    listener: &str,
    backends: &[String],
    pool: &str,
) -> (Udplb, SocketAddr) {
    let (admin, listen) = (admin_addr(), listen_addr(ip));
    let lb = run_toml(
        admin,
        &one_pool_toml(admin, listen, listener, backends, pool),
    );
    (lb, listen)
}

/// The lines of a `[pools.p.health]` table for a UDP check that sends "ping" and expects the
/// echo backends' answer (`TAG:ping`), every `interval_ms` with no jitter.
pub fn udp_check(interval_ms: u64, timeout_ms: u64, rise: u64, fall: u64) -> String {
    format!(
        "check = \"udp\"\nsend = \"ping\"\nexpect_regex = \":ping$\"\ninterval = \"{interval_ms}ms\"\n\
         timeout = \"{timeout_ms}ms\"\njitter = \"0s\"\nrise = {rise}\nfall = {fall}"
    )
}

/// `addr` as a TOML string, for a list of backends.
pub fn quoted(addr: impl std::fmt::Display) -> String {
    format!("\"{addr}\"")
}

/// Starts `udplb run -c` on `toml`, a whole configuration whose admin endpoint is `admin`.
pub fn run_toml(admin: SocketAddr, toml: &str) -> Udplb {
    Udplb::run_config(&write_config(toml), admin)
}

/// A command that runs the udplb binary under test.
pub fn udplb_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_udplb"))
}

/// `udplb check -c` on `toml`: its exit code and standard error.
pub fn check_toml(toml: &str) -> (Option<i32>, String) {
    let out = udplb_command()
        .arg("check")
        .arg("-c")
        .arg(write_config(toml))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs udplb with `args` and returns its exit code and standard error; a udplb that is still
/// running after 5 s (it wrongly started) is killed, and the code is `None`.
pub fn exit_of(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = udplb_command()
        .envs(env.iter().copied())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status.and_then(|s| s.code()), stderr)
}

/// `--admin ADMIN ARGS...`: a one-liner's arguments with its admin endpoint.
fn with_admin(admin: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut full = vec!["--admin".to_string(), admin.to_string()];
    full.extend(args.iter().map(|s| s.to_string()));
    full
}

/// A running udplb process, killed when dropped.
pub struct Udplb {
    pub child: Child,
    pub admin: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
}

impl Udplb {
    /// Starts `udplb --admin 127.0.0.1:<free> ARGS...` and waits until its admin endpoint answers.
    pub fn start(args: &[&str]) -> Udplb {
        Self::start_with_env(args, &[])
    }

    /// Starts the one-liner `udplb OPTIONS... LISTEN BACKEND...` as [`Udplb::start`] does, its
    /// listener on a free port of 127.0.0.1; returns it and the listener's address.
    pub fn serve(options: &[&str], backends: &[impl std::fmt::Display]) -> (Udplb, SocketAddr) {
        let listen = listen_addr("127.0.0.1");
        let mut args: Vec<String> = options.iter().map(|s| s.to_string()).collect();
        args.push(listen.to_string());
        args.extend(backends.iter().map(|b| b.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (Self::start(&args), listen)
    }

    /// Like [`Udplb::start`], with extra environment variables (they override the harness's
    /// `UDPLB_ALLOW_ROOT=1`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Udplb {
        let admin = admin_addr();
        Self::spawn(udplb_command(), &with_admin(admin, args), admin, env)
    }

    /// Like [`Udplb::start`], with the open-file limit (soft and hard) set to `limit`.
    pub fn start_with_fd_limit(limit: u32, args: &[&str]) -> Udplb {
        let admin = admin_addr();
        let mut prlimit = Command::new("prlimit");
        prlimit
            .arg(format!("--nofile={limit}:{limit}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_udplb"));
        Self::spawn(prlimit, &with_admin(admin, args), admin, &[])
    }

    /// Starts `udplb run -c FILE` where the file's admin endpoint is `admin`.
    pub fn run_config(path: &Path, admin: SocketAddr) -> Udplb {
        Self::run_config_with_env(path, admin, &[])
    }

    /// Starts `udplb run -c FILE` with extra environment variables.
    pub fn run_config_with_env(path: &Path, admin: SocketAddr, env: &[(&str, &str)]) -> Udplb {
        let args = ["run".to_string(), "-c".into(), path.display().to_string()];
        Self::spawn(udplb_command(), &args, admin, env)
    }

    /// Starts `PROGRAM run -c FILE` (a copy of the udplb binary, say).
    pub fn run_program(program: &Path, path: &Path, admin: SocketAddr) -> Udplb {
        let args = ["run".to_string(), "-c".into(), path.display().to_string()];
        Self::spawn(Command::new(program), &args, admin, &[])
    }

    /// Runs `command` with `args` and `env`, collects its standard error, and waits until the
    /// admin endpoint at `admin` answers (a udplb that exits first fails the test).
    pub fn spawn(
        mut command: Command,
        args: &[String],
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Udplb {
        command
            .args(args)
            // Tests run as root in CI; privilege dropping has its own test.
            .env("UDPLB_ALLOW_ROOT", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A program file just written (a test's copy of udplb) is busy while a process another
        // test forked meanwhile still holds it open for writing, until that process execs.
        let started = Instant::now();
        let mut child = loop {
            match command.spawn() {
                Err(e) if e.raw_os_error() == Some(26) && started.elapsed() < DEADLINE => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                spawned => break spawned.expect("start udplb"),
            }
        };
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lb = Udplb {
            child,
            admin,
            stderr,
        };
        let up = wait_for(DEADLINE, || {
            if let Ok(Some(status)) = lb.child.try_wait() {
                panic!(
                    "udplb exited early ({status}): {}",
                    lb.stderr.lock().unwrap()
                );
            }
            lb.try_stats().is_some()
        });
        assert!(
            up,
            "udplb admin endpoint never answered: {}",
            lb.stderr.lock().unwrap()
        );
        lb
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `METHOD path` with a JSON `body` on the admin endpoint: status code and parsed body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        self.call_as(method, path, Some("application/json"), body)
    }

    /// Like [`Udplb::call`] with another `Content-Type` (`None`: no such header). A body that
    /// is not JSON comes back as a JSON string.
    pub fn call_as(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))
            .expect("connect to admin");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = body.unwrap_or("");
        let content_type = content_type
            .map(|t| format!("Content-Type: {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: udplb\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            code,
            serde_json::from_str(payload).unwrap_or(serde_json::Value::String(payload.to_string())),
        )
    }

    /// The body of `GET path` on the admin endpoint, with its content type.
    pub fn get(&self, path: &str) -> (String, String) {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))
            .expect("connect to admin");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: udplb\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let content_type = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            })
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        (content_type, body.to_string())
    }

    /// The admin endpoint's `/stats`, or `None` when it does not answer within 2 s.
    pub fn try_stats(&self) -> Option<serde_json::Value> {
        stats_at(self.admin, Duration::from_millis(200))
    }

    /// The admin endpoint's `/stats`.
    pub fn stats(&self) -> serde_json::Value {
        self.try_stats().expect("GET /stats")
    }

    /// Like [`Udplb::counter`], but `None` while the admin endpoint does not answer.
    pub fn try_counter(&self, pointer: &str) -> Option<u64> {
        self.try_stats()?["listeners"][0].pointer(pointer)?.as_u64()
    }

    /// A counter of listener 0, by JSON pointer below the listener (e.g. "/drops/oversize").
    pub fn counter(&self, pointer: &str) -> u64 {
        let stats = self.stats();
        stats["listeners"][0]
            .pointer(pointer)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("no counter {pointer} in {stats}"))
    }

    /// The status of backend `which` of the first pool (`Null` when there is none).
    pub fn backend(&self, which: impl BackendRef) -> serde_json::Value {
        backend_status(&self.stats(), which).unwrap_or_default()
    }

    /// Whether backend `which` of the first pool is healthy (`None`: no such backend).
    pub fn healthy(&self, which: impl BackendRef) -> Option<bool> {
        self.backend(which)["healthy"].as_bool()
    }

    /// Like [`Udplb::healthy`], but `None` while the admin endpoint does not answer.
    pub fn try_healthy(&self, which: impl BackendRef) -> Option<bool> {
        backend_status(&self.try_stats()?, which)?["healthy"].as_bool()
    }

    /// The last check error of backend `which` of the first pool ("" when there is none).
    pub fn last_error(&self, which: impl BackendRef) -> String {
        self.backend(which)["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Number of UDP sockets the process holds open (listeners plus one upstream socket per
    /// flow). Counted from its descriptors against /proc/net/udp{,6}, so the admin endpoint's
    /// short-lived TCP connections do not disturb the count.
    pub fn open_udp_sockets(&self) -> usize {
        // Each table is read twice and the inodes joined: a read of a long table is several
        // passes of the kernel over its hash, which can miss a socket while other processes
        // open and close theirs.
        let udp_inodes: HashSet<String> = ["/proc/net/udp", "/proc/net/udp6"]
            .iter()
            .flat_map(|table| [table, table])
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .flat_map(|text| {
                text.lines()
                    .skip(1)
                    .filter_map(|line| line.split_whitespace().nth(9).map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect();
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return 0;
        };
        fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|link| {
                let link = link.to_string_lossy().into_owned();
                Some(
                    link.strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_string(),
                )
            })
            .filter(|inode| udp_inodes.contains(inode))
            .count()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Udplb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An echo backend on loopback that counts what it receives and from whom. It can be muted:
/// it keeps its port open (no ICMP refusal) but stops answering, as a hung service does.
pub struct Backend {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU64>,
    pub sources: Arc<Mutex<Vec<SocketAddr>>>,
    mute: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts an echo backend on `ip`:0. Each reply is the payload prefixed with `tag` and ':'.
    pub fn start(ip: &str, tag: &str) -> Backend {
        Self::start_at(SocketAddr::new(ip.parse().unwrap(), 0), tag)
    }

    /// Like [`Backend::start`] on a given address (e.g. to bring a stopped backend back).
    pub fn start_at(addr: SocketAddr, tag: &str) -> Backend {
        let socket = UdpSocket::bind(addr).expect("bind backend");
        // Room for bursts (a flood of new flows reaches the backend as a burst).
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let sources = Arc::new(Mutex::new(Vec::new()));
        let mute = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, m, st) = (
            Arc::clone(&received),
            Arc::clone(&sources),
            Arc::clone(&mute),
            Arc::clone(&stop),
        );
        let prefix = format!("{tag}:").into_bytes();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut out = Vec::with_capacity(65_600);
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                r.fetch_add(1, Ordering::Relaxed);
                s.lock().unwrap().push(from);
                if m.load(Ordering::Relaxed) {
                    continue;
                }
                out.clear();
                out.extend_from_slice(&prefix);
                out.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&out, from);
            }
        });
        Backend {
            addr,
            received,
            sources,
            mute,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far (answered or not).
    pub fn count(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops (`true`) or resumes (`false`) answering.
    pub fn mute(&self, on: bool) {
        self.mute.store(on, Ordering::Relaxed);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client socket bound to `bind` ("127.0.0.1:0"), with a short read timeout.
pub fn client(bind: &str) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s
}

/// Sends `payload` to `to` until a reply arrives (udplb may still be starting); returns the
/// reply and its source.
pub fn request(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 65_536];
    let start = Instant::now();
    loop {
        c.send_to(payload, to).unwrap();
        if let Ok((n, from)) = c.recv_from(&mut buf) {
            return (buf[..n].to_vec(), from);
        }
        assert!(start.elapsed() < DEADLINE, "no reply from {to}");
    }
}

/// The tag of the echo backend that sent `reply` (what precedes the first ':').
pub fn tag(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply)
        .split(':')
        .next()
        .unwrap_or("")
        .to_string()
}

/// Receives one datagram within the deadline.
pub fn recv(c: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 65_536];
    let start = Instant::now();
    loop {
        if let Ok((n, from)) = c.recv_from(&mut buf) {
            return (buf[..n].to_vec(), from);
        }
        assert!(start.elapsed() < DEADLINE, "no datagram");
    }
}

/// Steady load: every flow sends a numbered datagram every 10 ms and counts the replies, and
/// which backend answered each.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<FlowLog>>>,
}

#[derive(Default, Clone)]
pub struct FlowLog {
    pub sent: u64,
    pub received: u64,
    /// Backend tag of each reply, in order.
    pub tags: Vec<String>,
}

impl FlowLog {
    /// Datagrams sent that got no reply.
    pub fn lost(&self) -> u64 {
        self.sent - self.received
    }

    /// Whether every reply came from the backend of the first.
    pub fn stayed(&self) -> bool {
        self.tags.iter().all(|t| t == &self.tags[0])
    }
}

/// Datagrams sent and lost by all the flows of a [`Load`].
pub fn totals(logs: &[FlowLog]) -> (u64, u64) {
    let sent = logs.iter().map(|l| l.sent).sum();
    let lost = logs.iter().map(FlowLog::lost).sum();
    (sent, lost)
}

impl Load {
    pub fn start(listen: SocketAddr, flows: usize) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let sockets: Vec<_> = (0..flows).map(|_| client("127.0.0.1:0")).collect();
            for s in &sockets {
                s.set_nonblocking(true).unwrap();
            }
            let mut logs = vec![FlowLog::default(); flows];
            let mut buf = [0u8; 256];
            let drain = |logs: &mut Vec<FlowLog>, buf: &mut [u8]| {
                for (s, log) in sockets.iter().zip(logs.iter_mut()) {
                    while let Ok(n) = s.recv(buf) {
                        log.received += 1;
                        log.tags.push(tag(&buf[..n]));
                    }
                }
            };
            while !flag.load(Ordering::Relaxed) {
                for (s, log) in sockets.iter().zip(logs.iter_mut()) {
                    if s.send_to(format!("{}", log.sent).as_bytes(), listen)
                        .is_ok()
                    {
                        log.sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
                drain(&mut logs, &mut buf);
            }
            // Let the last replies arrive: drain until 200 ms pass without one (at most 2 s).
            let total = |logs: &Vec<FlowLog>| logs.iter().map(|l| l.received).sum::<u64>();
            let (mut quiet, mut last) = (0, total(&logs));
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(50));
                drain(&mut logs, &mut buf);
                let now = total(&logs);
                quiet = if now == last { quiet + 1 } else { 0 };
                last = now;
                if quiet >= 4 {
                    break;
                }
            }
            logs
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Vec<FlowLog> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Whether the tests run as root (the tests that need it are skipped otherwise).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The uid and gid of the user `nobody`.
pub fn nobody() -> (u32, u32) {
    let u = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a user named nobody");
    (u.uid.as_raw(), u.gid.as_raw())
}

/// The values of a `/proc/PID/status` line, e.g. `Uid` -> ["65534", "65534", ...].
pub fn status_field(pid: u32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Sends `signal` (`"HUP"`, `"TERM"`, ...) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// `GET /stats` on the admin endpoint at `admin`, or `None` when it does not accept the
/// connection within `connect_timeout` or does not answer within 2 s.
pub fn stats_at(admin: SocketAddr, connect_timeout: Duration) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&admin, connect_timeout).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /stats HTTP/1.0\r\nHost: udplb\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let json = body.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(json).ok()
}

/// The backends of the first pool of `stats`, in the order `/stats` lists them.
pub fn backends_of(stats: &serde_json::Value) -> Vec<serde_json::Value> {
    stats["pools"][0]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A backend of a pool in `/stats`: by its position (`usize`), or by its address
/// (`SocketAddr`: found wherever a reload put it).
pub trait BackendRef {
    fn find(self, backends: Vec<serde_json::Value>) -> Option<serde_json::Value>;
}

impl BackendRef for usize {
    fn find(self, backends: Vec<serde_json::Value>) -> Option<serde_json::Value> {
        backends.into_iter().nth(self)
    }
}

impl BackendRef for SocketAddr {
    fn find(self, backends: Vec<serde_json::Value>) -> Option<serde_json::Value> {
        backends
            .into_iter()
            .find(|b| b["address"] == self.to_string())
    }
}

/// The status of backend `which` in the first pool of `stats`.
pub fn backend_status(
    stats: &serde_json::Value,
    which: impl BackendRef,
) -> Option<serde_json::Value> {
    which.find(backends_of(stats))
}

/// `udplb ctl --admin ADMIN ARGS...` with extra environment variables: whether it succeeded,
/// its standard output and its standard error.
pub fn ctl(admin: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = udplb_command()
        .args(["ctl", "--admin", &admin.to_string()])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits up to `limit` for the process to exit; its exit code (`None` for a signal) and how
/// long it took, or `None` when it is still running.
pub fn wait_exit(lb: &mut Udplb, limit: Duration) -> Option<(Option<i32>, Duration)> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = lb.child.try_wait() {
            return Some((status.code(), start.elapsed()));
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The path of Debian program `bin` (from `packages`, which the failure names:
/// `scripts/test.sh` installs them as root).
#[allow(dead_code)] // Not every test file runs Debian's servers.
pub fn need(bin: &str, packages: &str) -> std::path::PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(bin))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{bin} not found: install Debian's {packages} (scripts/test.sh does as root)")
        })
}

/// A process that is not the test's child (an upgrade's successor), killed when dropped.
pub struct Adopted(pub u32);

impl Drop for Adopted {
    fn drop(&mut self) {
        signal(self.0, "KILL");
    }
}

/// The process id the admin endpoint of `lb` reports (after an upgrade: the successor's).
pub fn pid_at(lb: &Udplb) -> Option<u32> {
    lb.try_stats()?.get("pid")?.as_u64().map(|p| p as u32)
}

/// The command line of process `pid` (empty once it is gone).
pub fn cmdline(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// Signals `lb`'s serving process `old` to upgrade (SIGUSR2) and waits for its successor: the
/// process that answers on `lb`'s admin endpoint, is not `old`, and runs with `old`'s command
/// line (the admin port was a free one when the test began; another test's udplb could bind it
/// while it changes hands).
pub fn upgrade_to_successor(lb: &Udplb, old: u32) -> Option<u32> {
    let command = cmdline(old);
    signal(old, "USR2");
    let mut found = None;
    wait_for(DEADLINE, || {
        found = pid_at(lb).filter(|&p| p != old && cmdline(p) == command);
        found.is_some()
    });
    found
}
