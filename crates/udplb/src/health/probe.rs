//! One active check of one backend: UDP request/expect, DNS query, TCP connect, HTTP GET or a
//! command. Each returns `Ok(())` when healthy or a short reason, within its timeout; the
//! reason says whether the backend failed the check or udplb could not make it
//! ([`Failure::Local`]: out of descriptors, buffers or memory).
//!
//! Owns: the network (or process) side of a check, and telling the backend's failures from
//! udplb's own. Must not: keep state between checks or decide up/down (that is
//! [`udplb_core::health::Tracker`]'s job).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::{TcpStream, UdpSocket};
use udplb_config::{Expect, Probe};

/// Why a check did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The backend failed it: no answer in time, refused, a wrong answer, a failing command.
    Backend(String),
    /// udplb could not make it (no descriptor, buffer or memory left: `EMFILE`, `ENFILE`,
    /// `ENOBUFS`, `ENOMEM`): its own trouble, which says nothing about the backend.
    Local(String),
}

impl From<String> for Failure {
    fn from(reason: String) -> Failure {
        Failure::Backend(reason)
    }
}

impl From<&str> for Failure {
    fn from(reason: &str) -> Failure {
        Failure::Backend(reason.into())
    }
}

/// A check's outcome.
pub type Outcome = Result<(), Failure>;

/// Whether `e` is udplb's own shortage rather than anything the backend did.
pub fn is_local(e: &std::io::Error) -> bool {
    use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// An I/O error of a check while doing `what`: [`Failure::Local`] when it is udplb's own
/// shortage, else the backend's.
pub fn io_failure(what: &str, e: &std::io::Error) -> Failure {
    if is_local(e) {
        Failure::Local(format!("{what}: {e}"))
    } else {
        Failure::Backend(format!("{what}: {}", describe(e)))
    }
}

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
    pub async fn run(&self, target: SocketAddr, backend: SocketAddr, timeout: Duration) -> Outcome {
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

async fn within(timeout: Duration, check: impl Future<Output = Outcome>) -> Outcome {
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or_else(|_| Err(timed_out(timeout)))
}

/// The failure of a check not done within `timeout`.
pub fn timed_out(timeout: Duration) -> Failure {
    Failure::Backend(format!(
        "timeout after {}",
        humantime::format_duration(timeout)
    ))
}

/// Sends `payload` and waits for a matching reply; non-matching replies are ignored until the
/// timeout (a stale reply of an earlier check must not count).
async fn udp(target: SocketAddr, payload: &[u8], expect: &Matcher) -> Outcome {
    let socket = connected_udp(target).await?;
    socket
        .send(payload)
        .await
        .map_err(|e| io_failure("send", &e))?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = socket
            .recv(&mut buf)
            .await
            .map_err(|e| io_failure("receive", &e))?;
        if expect.matches(&buf[..n]) {
            return Ok(());
        }
    }
}

/// Sends an empty datagram to `target`: healthy unless it is refused (ICMP port, host or
/// network unreachable) within `timeout`. Says the port is open, not that the service works:
/// what keepalived's `UDP_CHECK` without `require_reply` does. An empty datagram is what
/// services that cannot parse it ignore (DNS, RADIUS, SNMP, QUIC drop it unanswered).
pub async fn reachable(target: SocketAddr, timeout: Duration) -> Outcome {
    let socket = connected_udp(target).await?;
    socket.send(&[]).await.map_err(|e| io_failure("send", &e))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
        // No refusal in time, or an answer: the port is open.
        Err(_) | Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(io_failure("receive", &e)),
    }
}

/// A UDP socket on an ephemeral port of `target`'s family, connected to it (so only its
/// replies arrive, and ICMP port unreachable is reported).
pub(super) async fn connected_udp(target: SocketAddr) -> Result<UdpSocket, Failure> {
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| io_failure("socket", &e))?;
    socket
        .connect(target)
        .await
        .map_err(|e| io_failure("connect", &e))?;
    Ok(socket)
}

async fn tcp(target: SocketAddr) -> Outcome {
    TcpStream::connect(target)
        .await
        .map(drop)
        .map_err(|e| io_failure("connect", &e))
}

/// Runs `command` (no shell) with the backend in its environment and arguments; exit 0 is
/// healthy. On
/// timeout the whole process group is killed, so a hung script cannot pile up.
async fn exec(
    command: &[String],
    backend: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Outcome {
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
        Ok(Ok(Err(e))) => return Err(io_failure(&format!("cannot run {:?}", command[0]), &e)),
        Ok(Err(e)) => return Err(format!("cannot run {:?}: {e}", command[0]).into()),
        Err(_) => {
            return Err(format!(
                "{:?} could not be started within {}",
                command[0],
                humantime::format_duration(timeout)
            )
            .into());
        }
    };
    match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{:?} exited with {status}", command[0]).into()),
        Ok(Err(e)) => Err(io_failure(&format!("waiting for {:?}", command[0]), &e)),
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.wait().await;
            Err(format!(
                "{:?} timed out after {}",
                command[0],
                humantime::format_duration(timeout)
            )
            .into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc;

    /// Running out of descriptors, buffers or memory is udplb's trouble; anything else that
    /// goes wrong on the way to the backend is the backend's.
    #[test]
    fn local_shortages_are_told_from_backend_failures() {
        let local = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM];
        for errno in local {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(io_failure("socket", &e), Failure::Local(why) if why.starts_with("socket: ")),
                "{e}"
            );
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::EACCES,
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(io_failure("receive", &e), Failure::Backend(_)),
                "{e}"
            );
        }
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(
            io_failure("connect", &refused),
            Failure::Backend("connect: refused (nothing listens)".into())
        );
    }
}
