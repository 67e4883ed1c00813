//! Reloading the configuration file (SIGHUP): read, validate, check it can be applied to the
//! running process, and hand it to the publisher ([`crate::health::Monitor`]), which swaps the
//! snapshot. A file that fails keeps the running configuration and is reported.
//!
//! Owns: the reload outcome counters shown in `/stats` and `/metrics`. Must not: publish
//! snapshots itself (one publisher, so reloads and health flips cannot race).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use udplb_config::Config;

use crate::health::Command;

/// What the last reloads did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub succeeded: u64,
    pub failed: u64,
    /// Unix time of the last successful (re)load, the start counting as one.
    pub last_success_unix: f64,
    /// Errors of the last failed reload, one per line (`file:line:col: key: message`).
    pub last_error: Option<String>,
}

/// Shared with the admin endpoint.
pub type Status = Arc<Mutex<ReloadStatus>>;

/// A status that counts the start as the first success.
pub fn started() -> Status {
    Arc::new(Mutex::new(ReloadStatus {
        last_success_unix: now_unix(),
        ..Default::default()
    }))
}

/// Re-reads configurations for the publisher.
pub struct Reloader {
    /// The file the daemon runs from; `None` for the one-liner (nothing to reload).
    pub source: Option<PathBuf>,
    pub running: Arc<Config>,
    pub publisher: mpsc::Sender<Command>,
    pub status: Status,
}

impl Reloader {
    /// Reloads the file; on success the publisher applies it. `Err` says why not.
    pub async fn reload(&mut self) -> Result<(), String> {
        let Some(path) = self.source.clone() else {
            let why = "udplb runs from the command line: there is no file to reload".to_string();
            tracing::warn!("reload ignored: {why}");
            return Err(why);
        };
        match load_compatible(&path, &self.running) {
            Ok(cfg) => {
                let cfg = Arc::new(cfg);
                if self
                    .publisher
                    .send(Command::Reload(Arc::clone(&cfg)))
                    .await
                    .is_err()
                {
                    return Err(self.failed("the publisher has stopped".into()));
                }
                self.running = cfg;
                let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                s.succeeded += 1;
                s.last_success_unix = now_unix();
                s.last_error = None;
                Ok(())
            }
            Err(errors) => Err(self.failed(errors)),
        }
    }

    fn failed(&self, errors: String) -> String {
        for line in errors.lines() {
            tracing::error!("reload failed, the running configuration stays: {line}");
        }
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.failed += 1;
        s.last_error = Some(errors.clone());
        errors
    }
}

/// Loads `path` and checks it only changes what a running process can change: pools,
/// backends, policies, checks and listener settings, but not the set of listener addresses
/// nor their `gro` or `socket_buffer` (their sockets are bound, with their options, at start).
fn load_compatible(path: &Path, running: &Config) -> Result<Config, String> {
    let mut cfg = udplb_config::load(path).map_err(|e| e.to_string())?;
    let addresses = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| (l.name.clone(), l.address, l.gro, l.socket_buffer))
            .collect::<Vec<_>>()
    };
    if addresses(&cfg) != addresses(running) {
        return Err(format!(
            "{}: listeners: adding, removing, renaming, re-addressing listeners or changing their \
             gro or socket_buffer needs a restart (running (name, address, gro, socket_buffer): \
             {:?})",
            path.display(),
            addresses(running)
        ));
    }
    if cfg.admin != running.admin {
        return Err(format!(
            "{}: admin: changing the admin endpoint needs a restart",
            path.display()
        ));
    }
    // Threads are started once: the running count stays.
    cfg.runtime = running.runtime.clone();
    Ok(cfg)
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_file(name: &str, listener_extra: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("udplb-reload-{}-{name}.toml", std::process::id()));
        let toml = format!(
            "[listeners.dns]\naddress = \"127.0.0.1:5353\"\npool = \"p\"\n{listener_extra}\n\
             [pools.p]\nbackends = [\"127.0.0.1:5301\"]\n"
        );
        std::fs::write(&path, toml).unwrap();
        path
    }

    #[test]
    fn listener_socket_options_need_a_restart() {
        let running_path = config_file("running", "");
        let running = udplb_config::load(&running_path).unwrap();
        let _ = std::fs::remove_file(running_path);
        // Listener settings that apply to new flows are taken live.
        let flows = config_file("flows", "max_flows = 10");
        assert!(load_compatible(&flows, &running).is_ok());
        let _ = std::fs::remove_file(flows);
        // What the bound sockets were made with is not.
        for (name, extra) in [("buffer", "socket_buffer = 65536"), ("gro", "gro = true")] {
            let path = config_file(name, extra);
            let error = load_compatible(&path, &running).unwrap_err();
            let _ = std::fs::remove_file(&path);
            assert!(error.contains("needs a restart"), "{name}: {error}");
            assert!(error.contains(&path.display().to_string()), "{error}");
        }
    }
}
