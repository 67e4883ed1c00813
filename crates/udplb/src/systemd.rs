//! systemd integration: `Type=notify` readiness, reload and stop notifications, and a watchdog
//! that only pets when every worker is still turning (a hung data plane gets udplb restarted).
//!
//! Owns: what udplb tells the service manager. Must not: fail udplb when there is no service
//! manager (every call is a no-op without `NOTIFY_SOCKET`).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use udplb_dataplane::WorkerStats;

/// Startup is complete: listeners bound, workers running, admin endpoint serving.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts (with the monotonic timestamp `Type=notify-reload` wants).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown starts.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: serving established flows"),
    ]);
}

/// Another process of the service (an upgrade's successor) is its main process from now on.
pub fn main_pid(pid: u32) {
    send(&[
        NotifyState::MainPid(pid),
        NotifyState::Status("upgraded: serving established flows until they end"),
    ]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "systemd notification failed");
    }
}

/// When systemd asks for a watchdog (`WatchdogSec=`), pets it at half the interval, but only
/// while every worker has made progress since the last pet.
pub fn spawn_watchdog(workers: Vec<Arc<WorkerStats>>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut last: Vec<u64> = workers.iter().map(|w| w.turns.get()).collect();
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let now: Vec<u64> = workers.iter().map(|w| w.turns.get()).collect();
            if now.iter().zip(&last).all(|(n, l)| n > l) {
                send(&[NotifyState::Watchdog]);
            } else {
                tracing::warn!("a worker made no progress: not petting the systemd watchdog");
            }
            last = now;
        }
    });
}
