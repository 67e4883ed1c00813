//! Announcing the listeners' addresses through a routing daemon (`[announce]`): udplb runs the
//! `up` command once it serves and every listener's pool holds its quorum, and the `down`
//! command when a quorum is lost and at shutdown, before it stops admitting (the routers move
//! the traffic first). The daemon does the routing: with bird, `birdc enable vip` /
//! `birdc disable vip` on a static protocol its BGP exports (docs/ha.md).
//!
//! Owns: the announcement's wanted and actual state, the commands' runs (one at a time, each
//! bounded in time, retried every [`RETRY`] while the state differs from the wanted one) and
//! what the admin endpoint shows of it ([`Status`]). Must not: block the control thread it runs
//! on, or change an announcement at an upgrade (the successor announces; nothing is withdrawn).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use udplb_config::Announce;
use udplb_core::snapshot::Snapshot;

use crate::health::unix_now;

/// How often the wanted state is computed.
const TICK: Duration = Duration::from_millis(100);
/// How long a command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a failed command is run again.
const RETRY: Duration = Duration::from_secs(1);

/// What the admin endpoint shows.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AnnounceStatus {
    /// Whether the addresses should be announced now.
    pub wanted: bool,
    /// Whether the last command that succeeded announced (`None`: none ran yet).
    pub announced: Option<bool>,
    /// Why not wanted, when not.
    pub reason: String,
    /// Since when `announced` holds (Unix seconds).
    pub since_unix: Option<f64>,
    /// Commands that succeeded, and that failed.
    pub changes: u64,
    pub failures: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

/// Shared with the admin endpoint.
pub type Status = Arc<Mutex<AnnounceStatus>>;

/// Whether udplb should get traffic: every listener's pool holds its quorum and has a backend
/// up (without a quorum rule, one is the least). What `[announce]` announces on and
/// `GET /api/v1/ready` (`udplb ctl ready`, keepalived's `track_script`) answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Why not.
    NotReady(String),
    /// A pool's quorum is not known yet (its backends have not all reported once).
    Unknown(String),
}

/// The readiness of `snap`'s listeners, given each pool's quorum and backends up (by pool).
pub fn readiness(snap: &Snapshot, quorum: &[Option<bool>], up: &[usize]) -> Readiness {
    let mut unknown = None;
    for l in &snap.listeners {
        let name = &snap.pools[l.pool].name;
        match quorum.get(l.pool).copied().flatten() {
            Some(true) if up.get(l.pool).is_some_and(|&n| n > 0) => {}
            Some(_) => {
                return Readiness::NotReady(format!("pool {name} below its quorum (or none up)"));
            }
            None => unknown = Some(format!("pool {name} not checked yet")),
        }
    }
    unknown.map_or(Readiness::Ready, Readiness::Unknown)
}

/// The readiness of what `state` serves now (not ready once udplb stops admitting).
pub fn readiness_of(state: &crate::admin::State) -> Readiness {
    let snap = state.shared.load();
    if !snap.admitting {
        return Readiness::NotReady("stopping".into());
    }
    let quorum = state
        .quorum
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let up: Vec<usize> = state
        .health
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|pool| pool.iter().filter(|b| b.healthy).count())
        .collect();
    readiness(&snap, &quorum, &up)
}

/// Runs the announcement until udplb exits: announced while [`readiness_of`] says ready,
/// withdrawn when not and once `stopping` turns true (shutdown, before admission stops).
pub async fn run(
    announce: Announce,
    state: Arc<crate::admin::State>,
    stopping: watch::Receiver<bool>,
    status: Status,
) {
    let mut tick = tokio::time::interval(TICK);
    let mut next_try = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let (wanted, reason) = if *stopping.borrow() {
            (Some(false), "stopping".to_string())
        } else {
            match readiness_of(&state) {
                Readiness::Ready => (Some(true), String::new()),
                Readiness::NotReady(why) => (Some(false), why),
                Readiness::Unknown(why) => (None, why),
            }
        };
        let announced = {
            let mut s = lock(&status);
            s.wanted = wanted == Some(true);
            s.reason = reason;
            s.announced
        };
        // Unknown (health not known yet): the announcement stays as it is, so a successor
        // does not withdraw what its predecessor announced.
        let Some(wanted) = wanted else { continue };
        if announced == Some(wanted) || tokio::time::Instant::now() < next_try {
            continue;
        }
        let command = if wanted { &announce.up } else { &announce.down };
        match run_command(command).await {
            Ok(()) => {
                tracing::info!(
                    announced = wanted,
                    command = command.join(" "),
                    "announcement"
                );
                let mut s = lock(&status);
                s.announced = Some(wanted);
                s.since_unix = Some(unix_now());
                s.changes += 1;
            }
            Err(e) => {
                tracing::warn!(announce = wanted, command = command.join(" "), error = %e, "announcement command failed (retried)");
                let mut s = lock(&status);
                s.failures += 1;
                s.last_error = Some(e);
                next_try = tokio::time::Instant::now() + RETRY;
            }
        }
    }
}

/// Runs `command` (program and arguments) to its end, within [`COMMAND_TIMEOUT`].
async fn run_command(command: &[String]) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("empty command")?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} ran longer than {COMMAND_TIMEOUT:?}"))?
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let said = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{program} exited with {}: {}",
            out.status,
            said.trim()
        ))
    }
}

fn lock(status: &Status) -> std::sync::MutexGuard<'_, AnnounceStatus> {
    status.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until the announcement is withdrawn (the `down` command succeeded) or `limit` passed.
pub async fn withdrawn(status: &Status, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if lock(status).announced != Some(true) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// With `[announce]` udplb is one of several instances behind a router: a client the router
/// moves to another instance keeps its backend only when every instance places it alike.
pub fn warn_if_placement_differs_across_instances(cfg: &udplb_config::Config) {
    if cfg.announce.is_none() {
        return;
    }
    for l in &cfg.listeners {
        if let Some(p) = cfg
            .pools
            .iter()
            .find(|p| p.name == l.pool && !p.scheduler.is_consistent_hash())
        {
            tracing::warn!(
                listener = %l.name,
                pool = %p.name,
                scheduler = %p.scheduler,
                "with [announce], clients a router moves between udplb instances change \
                 backends unless every instance places them alike: use scheduler = \"maglev\" \
                 (or \"rendezvous\")"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let toml = "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n\
                    [pools.p]\nbackends = [\"127.0.0.1:5301\"]\n\
                    [pools.unused]\nbackends = [\"127.0.0.1:5302\"]\n";
        let cfg = udplb_config::parse(toml, "udplb.toml").unwrap();
        crate::plan::snapshot_of(&cfg, 1, None, &crate::health::Trackers::initial(&cfg))
    }

    #[test]
    fn ready_only_while_every_listeners_pool_holds_its_quorum_with_a_backend_up() {
        let snap = snapshot();
        let ready = |q: &[Option<bool>], up: &[usize]| readiness(&snap, q, up);
        assert_eq!(ready(&[Some(true), Some(false)], &[1, 0]), Readiness::Ready);
        assert_eq!(
            ready(&[Some(false), Some(true)], &[1, 1]),
            Readiness::NotReady("pool p below its quorum (or none up)".into())
        );
        // Without a quorum rule the quorum holds: one backend up is the least.
        assert!(matches!(
            ready(&[Some(true), Some(true)], &[0, 1]),
            Readiness::NotReady(_)
        ));
        assert_eq!(
            ready(&[None, Some(true)], &[1, 1]),
            Readiness::Unknown("pool p not checked yet".into())
        );
    }
}
