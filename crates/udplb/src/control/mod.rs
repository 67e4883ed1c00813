//! The control plane's publisher: the running configuration, its changes, and the snapshots
//! the workers read.
//!
//! Owns: the running [`udplb_config::Config`] and every change to it (reloads and API edits,
//! which reach it as [`Command`]s over a channel), whether new flows are admitted, and the
//! publication of snapshots ([`Publisher`], the only writer of the `ArcSwap<Snapshot>`, with
//! [`crate::plan::snapshot_of`]), including the republications that follow time rather than
//! events: slow-start ramps step by step, and this host's addresses when they change. [`run`]
//! is the loop of the `udplb-health` thread, which drives it and the health monitor together,
//! so a reload, an API change and a health flip are published one after the other, never at
//! once. Owns too what a request to the control plane comes to when it is not done
//! ([`Error`]), and the one place where each outcome becomes an HTTP status.
//!
//! Health state stays with [`crate::health`]: its trackers, quorum and status are read and
//! written by every check result, passive signal and recovery probe, and re-keyed by backend
//! on every configuration change, all in health's own terms; the publisher only needs to read
//! it when it builds a snapshot. So the health monitor keeps them, reports each flip to the
//! publisher ([`crate::health::Publish`]) with a read-only view of them
//! ([`crate::plan::HealthView`]), and is told when the configuration changes
//! ([`crate::health::Monitor::reconfigure`]); the publisher never judges a backend, and health
//! never sees a command or stores a snapshot.
//!
//! Must not: run checks or judge backends, touch datagrams, or block (configuration files are
//! read by the reloader, on blocking threads, before they get here).

pub mod audit;
mod error;
mod publisher;

use std::sync::Arc;

use tokio::sync::mpsc;
use udplb_config::Config;

pub use error::Error;
pub use publisher::Publisher;

use crate::health;

/// What the rest of the control plane asks of the publisher.
pub enum Command {
    /// Switch to this (validated, compatible) configuration.
    Reload(Arc<Config>, tokio::sync::oneshot::Sender<()>),
    /// Shutting down: publish a snapshot that admits no new flow.
    StopAdmitting,
    /// A change from the admin API (asked by `Origin`): applied to the running configuration,
    /// validated like a file, published and logged; the reply says whether anything changed,
    /// or why not.
    Change(
        Change,
        audit::Origin,
        tokio::sync::oneshot::Sender<Result<bool, Error>>,
    ),
}

/// Edits a configuration; `Ok(false)` when there is nothing to change, an error (an
/// [`Error::Conflict`]) when it cannot be made.
pub type Change = Box<dyn FnOnce(&mut Config) -> Result<bool, Error> + Send>;

/// Runs the publisher and the health monitor until the runtime stops: starts the checkers,
/// then applies check results, polls passive signals (and with them slow starts and this
/// host's addresses) every [`health::POLL`], and carries out commands.
pub async fn run(
    mut publisher: Publisher,
    mut health: health::Monitor,
    mut commands: mpsc::Receiver<Command>,
) {
    health.start_checkers();
    let mut poll = tokio::time::interval(health::POLL);
    loop {
        tokio::select! {
            Some(result) = health.next_result() => health.apply(result, &publisher),
            _ = poll.tick() => {
                health.poll(&publisher);
                publisher.advance_slow_starts(&health.view());
                publisher.follow_host_addresses(&health.view());
            }
            Some(command) = commands.recv() => publisher.handle(command, &mut health),
        }
    }
}
