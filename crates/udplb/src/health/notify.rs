//! Notify hooks: the pool's `notify` command, run on every state change with the event in its
//! environment (the built-in replacement for keepalived's notify_up/notify_down scripts).
//!
//! Owns: starting the command and reaping it. Must not: block the health monitor (the command
//! is started on a blocking thread and waited for in its own task, killed after
//! [`NOTIFY_TIMEOUT`]).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

/// How long a notify command may run.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// A state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    BackendUp(SocketAddr),
    BackendDown(SocketAddr),
    QuorumLost,
    QuorumRegained,
}

impl Event {
    /// The value of `UDPLB_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            Event::BackendUp(_) => "backend-up",
            Event::BackendDown(_) => "backend-down",
            Event::QuorumLost => "quorum-lost",
            Event::QuorumRegained => "quorum-regained",
        }
    }
}

/// Runs `command` for `event` of `pool` (`up` of `total` backends now up), without waiting.
pub fn fire(command: &[String], event: Event, pool: &str, up: usize, total: usize) {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("UDPLB_EVENT", event.name())
        .env("UDPLB_POOL", pool)
        .env("UDPLB_BACKENDS_UP", up.to_string())
        .env("UDPLB_BACKENDS_TOTAL", total.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Event::BackendUp(addr) | Event::BackendDown(addr) = event {
        cmd.env("UDPLB_BACKEND", addr.to_string());
    }
    let program = command[0].clone();
    // Starting a program waits until it is executed, which can wait on the file system: on a
    // blocking thread, never on the monitor's.
    tokio::task::spawn_blocking(move || match cmd.spawn() {
        Ok(mut child) => {
            tokio::spawn(async move {
                match tokio::time::timeout(NOTIFY_TIMEOUT, child.wait()).await {
                    Ok(Ok(status)) if status.success() => {}
                    Ok(Ok(status)) => {
                        tracing::warn!(command = %program, %status, "notify command failed")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(command = %program, error = %e, "notify command failed")
                    }
                    Err(_) => {
                        tracing::warn!(command = %program, "notify command timed out; killed")
                    }
                }
            });
        }
        Err(e) => tracing::warn!(command = %program, error = %e, "cannot run the notify command"),
    });
}
