//! One active check of one backend: UDP request/expect, DNS query, TCP connect, HTTP GET or a
//! command. Each returns `Ok(())` when healthy or a short reason, within its timeout.
//!
//! Owns: the network (or process) side of a check. Must not: keep state between checks or
//! decide up/down (that is [`udplb_core::health::Tracker`]'s job).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::{TcpStream, UdpSocket};
use udplb_config::{Expect, Probe};

/// A probe ready to run: the config's check with its parsed parts.
pub enum Ready {
    /// `check = "udp"` without `send`, and the recovery probe of backends without an active
    /// check ([`reachable`]).
    Reachable,
    Udp {
        send: Vec<u8>,
        expect: Matcher,
    },
    Dns(super::dns::DnsCheck),
    Tcp,
    Http(super::http::HttpCheck),
    Exec {
        command: Vec<String>,
    },
}

/// How a UDP reply is judged.
pub enum Matcher {
    Anything,
    Prefix(Vec<u8>),
    Regex(regex::bytes::Regex),
}

impl Matcher {
    fn matches(&self, reply: &[u8]) -> bool {
        match self {
            Matcher::Anything => true,
            Matcher::Prefix(p) => reply.starts_with(p),
            Matcher::Regex(r) => r.is_match(reply),
        }
    }
}

impl Ready {
    /// Prepares a configured probe (the config was validated, so parsing cannot fail here
    /// unless the two disagree; then the error says so).
    pub fn new(probe: &Probe) -> Result<Ready, String> {
        Ok(match probe {
            Probe::None | Probe::Reachable => Ready::Reachable,
            Probe::Udp { send, expect } => Ready::Udp {
                send: send.clone(),
                expect: match expect {
                    Expect::Anything => Matcher::Anything,
                    Expect::Prefix(p) => Matcher::Prefix(p.clone()),
                    Expect::Regex(r) => {
                        Matcher::Regex(regex::bytes::Regex::new(r).map_err(|e| e.to_string())?)
                    }
                },
            },
            Probe::Dns {
                name,
                qtype,
                rcode,
                answer,
            } => Ready::Dns(super::dns::DnsCheck {
                name: name.clone(),
                qtype: super::dns::parse_type(qtype)?,
                rcode: super::dns::parse_rcode(rcode)?,
                answer: answer.clone(),
            }),
            Probe::Tcp => Ready::Tcp,
            Probe::Http {
                path,
                host,
                status,
                body_contains,
            } => Ready::Http(super::http::HttpCheck {
                path: path.clone(),
                host: host.clone(),
                status: status.0..=status.1,
                body_contains: body_contains.clone(),
            }),
            Probe::Exec { command } => Ready::Exec {
                command: command.clone(),
            },
        })
    }

    /// Runs one check against `target` (the backend's address, or its check port).
    pub async fn run(
        &self,
        target: SocketAddr,
        backend: SocketAddr,
        timeout: Duration,
    ) -> Result<(), String> {
        match self {
            Ready::Reachable => reachable(target, timeout).await,
            Ready::Udp { send, expect } => within(timeout, udp(target, send, expect)).await,
            Ready::Dns(check) => super::dns::probe(target, check, timeout).await,
            Ready::Tcp => within(timeout, tcp(target)).await,
            Ready::Http(check) => super::http::probe(target, check, timeout).await,
            Ready::Exec { command } => exec(command, backend, target, timeout).await,
        }
    }
}

async fn within(
    timeout: Duration,
    check: impl Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "timeout after {}",
                humantime::format_duration(timeout)
            ))
        })
}

/// Sends `payload` and waits for a matching reply; non-matching replies are ignored until the
/// timeout (a stale reply of an earlier check must not count).
async fn udp(target: SocketAddr, payload: &[u8], expect: &Matcher) -> Result<(), String> {
    let socket = connected_udp(target).await?;
    socket
        .send(payload)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| describe(&e))?;
        if expect.matches(&buf[..n]) {
            return Ok(());
        }
    }
}

/// Sends an empty datagram to `target`: healthy unless it is refused (ICMP port, host or
/// network unreachable) within `timeout`. Says the port is open, not that the service works:
/// what keepalived's `UDP_CHECK` without `require_reply` does. An empty datagram is what
/// services that cannot parse it ignore (DNS, RADIUS, SNMP, QUIC drop it unanswered).
pub async fn reachable(target: SocketAddr, timeout: Duration) -> Result<(), String> {
    let socket = connected_udp(target).await?;
    socket.send(&[]).await.map_err(|e| describe(&e))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
        // No refusal in time, or an answer: the port is open.
        Err(_) | Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(describe(&e)),
    }
}

/// A UDP socket on an ephemeral port of `target`'s family, connected to it (so only its
/// replies arrive, and ICMP port unreachable is reported).
pub(super) async fn connected_udp(target: SocketAddr) -> Result<UdpSocket, String> {
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("socket: {e}"))?;
    socket
        .connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    Ok(socket)
}

async fn tcp(target: SocketAddr) -> Result<(), String> {
    TcpStream::connect(target)
        .await
        .map(drop)
        .map_err(|e| format!("connect: {}", describe(&e)))
}

/// Runs `command` (no shell) with the backend in its environment and arguments; exit 0 is
/// healthy. On
/// timeout the whole process group is killed, so a hung script cannot pile up.
async fn exec(
    command: &[String],
    backend: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let args = command[1..].iter().map(|a| expand(a, backend, target));
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(args)
        .env("UDPLB_BACKEND", backend.to_string())
        .env("UDPLB_BACKEND_IP", backend.ip().to_string())
        .env("UDPLB_BACKEND_PORT", backend.port().to_string())
        .env("UDPLB_CHECK_PORT", target.port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    // Starting a program waits until it is executed, which can wait on the file system (its
    // binary, its interpreter): on a blocking thread, not on the checks' own.
    let spawned = tokio::task::spawn_blocking(move || cmd.spawn());
    let mut child = match tokio::time::timeout_at(deadline, spawned).await {
        Ok(Ok(Ok(child))) => child,
        Ok(Ok(Err(e))) => return Err(format!("cannot run {:?}: {e}", command[0])),
        Ok(Err(e)) => return Err(format!("cannot run {:?}: {e}", command[0])),
        Err(_) => {
            return Err(format!(
                "{:?} could not be started within {}",
                command[0],
                humantime::format_duration(timeout)
            ));
        }
    };
    match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{:?} exited with {status}", command[0])),
        Ok(Err(e)) => Err(format!("waiting for {:?}: {e}", command[0])),
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.wait().await;
            Err(format!(
                "{:?} timed out after {}",
                command[0],
                humantime::format_duration(timeout)
            ))
        }
    }
}

/// Replaces `{address}`, `{ip}`, `{port}` and `{check_port}` in a command argument.
fn expand(arg: &str, backend: SocketAddr, target: SocketAddr) -> String {
    if !arg.contains('{') {
        return arg.to_string();
    }
    arg.replace("{address}", &backend.to_string())
        .replace("{ip}", &backend.ip().to_string())
        .replace("{port}", &backend.port().to_string())
        .replace("{check_port}", &target.port().to_string())
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused (nothing listens)".into(),
        _ => e.to_string(),
    }
}
