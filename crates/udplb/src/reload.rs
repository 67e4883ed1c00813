//! Reloading the configuration file (SIGHUP): read, validate, check it can be applied to the
//! running process, and hand it to the publisher ([`crate::control::Publisher`]), which swaps the
//! snapshot. A file that fails keeps the running configuration and is reported.
//!
//! Owns: the reload outcome counters shown in `/stats` and `/metrics`. Must not: publish
//! snapshots itself (one publisher, so reloads and health flips cannot race).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use udplb_config::{Admin, Config, ListenerConfig};

use crate::control::Command;
use crate::{config_file, preflight};

/// How long the publisher may take to put a reloaded configuration in force.
const APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    source: Option<PathBuf>,
    running: Arc<Config>,
    publisher: mpsc::Sender<Command>,
    status: Status,
    /// Reads of the file, off the async threads and bounded in time.
    reads: config_file::Reads,
}

impl Reloader {
    pub fn new(
        source: Option<PathBuf>,
        running: Arc<Config>,
        publisher: mpsc::Sender<Command>,
        status: Status,
    ) -> Reloader {
        Reloader {
            source,
            running,
            publisher,
            status,
            reads: config_file::Reads::new(config_file::READ_TIMEOUT),
        }
    }

    /// Reloads the file; on success the publisher has applied it when this returns. `Err` says
    /// why not. The file is read and checked (with the user database and the programs it
    /// names) on a blocking thread, given up after [`config_file::READ_TIMEOUT`].
    pub async fn reload(&mut self) -> Result<(), String> {
        let Some(path) = self.source.clone() else {
            let why = "udplb runs from the command line: there is no file to reload".to_string();
            tracing::warn!("reload ignored: {why}");
            return Err(why);
        };
        let running = Arc::clone(&self.running);
        let file = path.clone();
        let loaded = self
            .reads
            .run(&path, move || load_compatible(&file, &running))
            .await;
        match loaded {
            Ok(cfg) => {
                let cfg = Arc::new(cfg);
                let (applied, done) = tokio::sync::oneshot::channel();
                if self
                    .publisher
                    .send(Command::Reload(Arc::clone(&cfg), applied))
                    .await
                    .is_err()
                {
                    return Err(self.failed("the publisher has stopped".into()));
                }
                self.running = cfg;
                // Done once the publisher has put it in force (it runs on its own thread): a
                // reload answered through the API is then visible in the next request.
                match tokio::time::timeout(APPLY_TIMEOUT, done).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(self.failed("the publisher has stopped".into())),
                    Err(_) => {
                        return Err(self.failed(format!(
                            "the new configuration was handed over but not put in force within {}",
                            humantime::format_duration(APPLY_TIMEOUT)
                        )));
                    }
                }
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
/// backends, policies, checks and listener settings, but not the set of listeners (names,
/// addresses, order) nor their `gro` or `socket_buffer` (their sockets are bound, with their
/// options, at start), nor the admin endpoint or the flow-state sync.
fn load_compatible(path: &Path, running: &Config) -> Result<Config, String> {
    let (mut cfg, positions) =
        udplb_config::load_with_positions(path).map_err(|e| e.to_string())?;
    let mut changes = listener_changes(&running.listeners, &cfg.listeners);
    changes.extend(tcp_changes(running, &cfg));
    changes.extend(kernel_forwarding_changes(running, &cfg));
    if !changes.is_empty() {
        return Err(format!(
            "{}: listeners: needs a restart: {}",
            path.display(),
            changes.join("; ")
        ));
    }
    let changes = admin_changes(&running.admin, &cfg.admin);
    if !changes.is_empty() {
        return Err(format!(
            "{}: admin: needs a restart: {}",
            path.display(),
            changes.join("; ")
        ));
    }
    if cfg.sync != running.sync {
        return Err(format!(
            "{}: sync: needs a restart: [sync] {}",
            path.display(),
            match (&running.sync, &cfg.sync) {
                (None, _) => "added",
                (_, None) => "removed",
                _ => "changed",
            }
        ));
    }
    // Threads are started once: the running count stays.
    cfg.runtime = running.runtime.clone();
    let problems = preflight::problems(&cfg, preflight::Stage::Reload);
    if !problems.is_empty() {
        return Err(preflight::describe(&problems, Some(&positions), &[]).join("\n"));
    }
    Ok(cfg)
}

/// Listeners of `running` that take TCP in `new` or stop taking it (their TCP sockets are bound
/// at start), in words.
fn tcp_changes(running: &Config, new: &Config) -> Vec<String> {
    running
        .listeners
        .iter()
        .filter_map(|old| {
            let l = new.listeners.iter().find(|l| l.name == old.name)?;
            let (was, is) = (running.takes_tcp(old), new.takes_tcp(l));
            (was != is).then(|| format!("listener {:?}: tcp {was} -> {is}", l.name))
        })
        .collect()
}

/// Kernel listeners whose forwarding (`forwarding`, `masquerade_ports`, `encapsulation` and
/// `gue_port` of their pool) or whose rate limits' table (limits or none, `table_size`) `new`
/// changes: the kernel data plane sets them up, attaches to loopback for masquerade and sizes
/// its cells, at start.
fn kernel_forwarding_changes(running: &Config, new: &Config) -> Vec<String> {
    let forwarding = |cfg: &Config, l: &ListenerConfig| {
        cfg.pools
            .iter()
            .find(|p| p.name == l.pool)
            .map(|p| (p.forwarding, p.masquerade_ports(), p.gue_port()))
    };
    let describe = |f: Option<(
        udplb_config::Forwarding,
        udplb_config::PortRange,
        Option<u16>,
    )>| {
        match f {
            Some((udplb_config::Forwarding::Masquerade, ports, _)) => {
                format!("masquerade {ports}")
            }
            Some((udplb_config::Forwarding::Dsr, _, Some(port))) => format!("dsr gue {port}"),
            Some((f, _, _)) => f.name().to_string(),
            None => "none".to_string(),
        }
    };
    let table = |l: &ListenerConfig| match l.limits {
        Some(limits) => format!("{} cells", udplb_kernel::cells_per_row(limits.cells)),
        None => "none".to_string(),
    };
    let mut out = Vec::new();
    for old in running
        .listeners
        .iter()
        .filter(|l| l.dataplane.may_use_kernel())
    {
        let Some(l) = new.listeners.iter().find(|l| l.name == old.name) else {
            continue;
        };
        let (was, is) = (forwarding(running, old), forwarding(new, l));
        if was != is {
            out.push(format!(
                "listener {:?}: forwarding {} -> {} (the kernel data plane's, set at start)",
                l.name,
                describe(was),
                describe(is)
            ));
        }
        // Rates change live; the cells they are counted in are the program's, sized at start.
        if table(old) != table(l) {
            out.push(format!(
                "listener {:?}: limits {} -> {} (the kernel data plane's cells are set at start)",
                l.name,
                table(old),
                table(l)
            ));
        }
    }
    out
}

/// What differs, in words, between the running listeners and `new` in what only a restart
/// can change; empty when nothing does.
fn listener_changes(running: &[ListenerConfig], new: &[ListenerConfig]) -> Vec<String> {
    let mut out = Vec::new();
    for old in running {
        let Some(l) = new.iter().find(|l| l.name == old.name) else {
            out.push(format!("listener {:?} removed ({})", old.name, old.address));
            continue;
        };
        let name = &l.name;
        if l.address != old.address {
            out.push(format!(
                "listener {name:?}: address {} -> {}",
                old.address, l.address
            ));
        }
        if l.gro != old.gro {
            out.push(format!("listener {name:?}: gro {} -> {}", old.gro, l.gro));
        }
        if l.socket_buffer != old.socket_buffer {
            out.push(format!(
                "listener {name:?}: socket_buffer {} -> {}",
                old.socket_buffer, l.socket_buffer
            ));
        }
        // The kernel data plane is loaded, sized and attached at start.
        if l.dataplane != old.dataplane {
            out.push(format!(
                "listener {name:?}: dataplane {} -> {}",
                old.dataplane.name(),
                l.dataplane.name()
            ));
        }
        if l.interfaces != old.interfaces {
            out.push(format!(
                "listener {name:?}: interfaces [{}] -> [{}]",
                old.interfaces.join(", "),
                l.interfaces.join(", ")
            ));
        }
        if l.dataplane.may_use_kernel()
            && crate::kernel::remembers_clients(l)
            && !crate::kernel::remembers_clients(old)
        {
            out.push(format!(
                "listener {name:?}: clients remembered (persistence or affinity \"ip\") where \
                 they were not (the kernel's persistence map is sized at start)"
            ));
        }
        if l.dataplane.may_use_kernel() && l.max_flows != old.max_flows {
            out.push(format!(
                "listener {name:?}: max_flows {} -> {} (the kernel's flow map is sized at start)",
                old.max_flows, l.max_flows
            ));
        }
    }
    for l in new
        .iter()
        .filter(|l| !running.iter().any(|o| o.name == l.name))
    {
        out.push(format!("listener {:?} added ({})", l.name, l.address));
    }
    // The same listeners in another order: the workers' sockets are bound in file order.
    let names = |ls: &[ListenerConfig]| {
        ls.iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if out.is_empty() && names(running) != names(new) {
        out.push(format!(
            "listeners reordered: {} -> {}",
            names(running),
            names(new)
        ));
    }
    out
}

/// What differs, in words, between the running admin endpoint and `new`'s.
fn admin_changes(running: &Option<Admin>, new: &Option<Admin>) -> Vec<String> {
    match (running, new) {
        (None, None) => Vec::new(),
        (None, Some(a)) => vec![format!("[admin] added ({})", a.listen)],
        (Some(_), None) => vec!["[admin] removed".to_string()],
        (Some(old), Some(a)) => {
            let mut out = Vec::new();
            if a.listen != old.listen {
                out.push(format!("listen {} -> {}", old.listen, a.listen));
            }
            if a.allow_changes != old.allow_changes {
                out.push(format!(
                    "allow_changes {} -> {}",
                    old.allow_changes, a.allow_changes
                ));
            }
            if a.token_file != old.token_file {
                let path = |p: &Option<PathBuf>| {
                    p.as_ref()
                        .map_or("none".to_string(), |p| p.display().to_string())
                };
                out.push(format!(
                    "token_file {} -> {}",
                    path(&old.token_file),
                    path(&a.token_file)
                ));
            }
            out
        }
    }
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

    fn listener(name: &str, address: &str) -> ListenerConfig {
        ListenerConfig::new(name.into(), address.parse().unwrap(), "p".into())
    }

    #[test]
    fn listener_changes_are_said_in_words() {
        let running = [listener("a", "127.0.0.1:53"), listener("b", "127.0.0.1:54")];
        assert!(listener_changes(&running, &running).is_empty());
        let mut moved = running.clone();
        moved[0].address = "127.0.0.1:55".parse().unwrap();
        moved[1].socket_buffer = 65536;
        assert_eq!(
            listener_changes(&running, &moved),
            [
                "listener \"a\": address 127.0.0.1:53 -> 127.0.0.1:55",
                "listener \"b\": socket_buffer 4194304 -> 65536",
            ]
        );
        let renamed = [listener("a", "127.0.0.1:53"), listener("c", "127.0.0.1:54")];
        assert_eq!(
            listener_changes(&running, &renamed),
            [
                "listener \"b\" removed (127.0.0.1:54)",
                "listener \"c\" added (127.0.0.1:54)",
            ]
        );
        let swapped = [running[1].clone(), running[0].clone()];
        assert_eq!(
            listener_changes(&running, &swapped),
            ["listeners reordered: a, b -> b, a"]
        );
    }

    #[test]
    fn admin_changes_are_said_in_words() {
        let admin = |listen: &str, allow_changes| {
            Some(udplb_config::Admin {
                listen: listen.parse().unwrap(),
                allow_changes,
                token_file: None,
            })
        };
        assert_eq!(
            admin_changes(
                &admin("127.0.0.1:9190", false),
                &admin("127.0.0.1:9191", true)
            ),
            [
                "listen 127.0.0.1:9190 -> 127.0.0.1:9191",
                "allow_changes false -> true"
            ]
        );
        assert_eq!(
            admin_changes(&None, &admin("127.0.0.1:9190", false)),
            ["[admin] added (127.0.0.1:9190)"]
        );
        assert_eq!(
            admin_changes(&admin("127.0.0.1:9190", false), &None),
            ["[admin] removed"]
        );
    }

    #[test]
    fn a_kernel_listeners_forwarding_needs_a_restart() {
        let kernel = |pool_extra: &str| {
            let path = std::env::temp_dir().join(format!(
                "udplb-reload-{}-kernel{}.toml",
                std::process::id(),
                pool_extra.len()
            ));
            let toml = format!(
                "[listeners.dns]\naddress = \"127.0.0.1:5353\"\npool = \"p\"\n\
                 dataplane = \"auto\"\n[pools.p]\nbackends = [\"127.0.0.1:5301\"]\n{pool_extra}\n"
            );
            std::fs::write(&path, toml).unwrap();
            path
        };
        let path = kernel("");
        let running = udplb_config::load(&path).unwrap();
        let _ = std::fs::remove_file(path);
        for (extra, change) in [
            (
                "forwarding = \"masquerade\"",
                "listener \"dns\": forwarding nat -> masquerade 61000-65535",
            ),
            (
                "forwarding = \"masquerade\"\nmasquerade_ports = \"20000-20099\"",
                "forwarding nat -> masquerade 20000-20099",
            ),
        ] {
            let path = kernel(extra);
            let error = load_compatible(&path, &running).unwrap_err();
            let _ = std::fs::remove_file(&path);
            assert!(error.contains("needs a restart"), "{extra}: {error}");
            assert!(error.contains(change), "{extra}: {error}");
        }
        assert!(kernel_forwarding_changes(&running, &running).is_empty());
        // dsr's encapsulation and GUE port are set at start too.
        let mut dsr = running.clone();
        dsr.pools[0].forwarding = udplb_config::Forwarding::Dsr;
        let mut gue = dsr.clone();
        gue.pools[0].encapsulation = Some(udplb_config::Encapsulation::Gue);
        let mut other_port = gue.clone();
        other_port.pools[0].gue_port = Some(5555);
        for (was, is, change) in [
            (&dsr, &gue, "dsr -> dsr gue 6080"),
            (&gue, &other_port, "dsr gue 6080 -> dsr gue 5555"),
        ] {
            assert_eq!(
                kernel_forwarding_changes(was, is),
                [format!(
                    "listener \"dns\": forwarding {change} (the kernel data plane's, set at start)"
                )]
            );
        }
        // Limits' rates change live; their table does not.
        let mut limited = running.clone();
        limited.listeners[0].limits = Some(udplb_core::ratelimit::LimitSettings::default());
        assert_eq!(
            kernel_forwarding_changes(&running, &limited),
            [
                "listener \"dns\": limits none -> 65536 cells (the kernel data plane's cells are \
              set at start)"
            ]
        );
        let mut faster = limited.clone();
        faster.listeners[0].limits = Some(udplb_core::ratelimit::LimitSettings {
            datagrams_per_source: Some(10),
            ..udplb_core::ratelimit::LimitSettings::default()
        });
        assert!(kernel_forwarding_changes(&limited, &faster).is_empty());
        // Persistence turned on needs the map sized at start; its length changes live.
        let mut remembering = running.clone();
        remembering.listeners[0].persistence = Some(std::time::Duration::from_secs(60));
        assert_eq!(
            listener_changes(&running.listeners, &remembering.listeners),
            [
                "listener \"dns\": clients remembered (persistence or affinity \"ip\") where \
                 they were not (the kernel's persistence map is sized at start)"
            ]
        );
        let mut longer = remembering.clone();
        longer.listeners[0].persistence = Some(std::time::Duration::from_secs(600));
        assert!(listener_changes(&remembering.listeners, &longer.listeners).is_empty());
        assert!(listener_changes(&remembering.listeners, &running.listeners).is_empty());
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
        // What the bound sockets were made with is not, and the refusal says what changed.
        for (name, extra, change) in [
            (
                "buffer",
                "socket_buffer = 65536",
                "listener \"dns\": socket_buffer 4194304 -> 65536",
            ),
            ("gro", "gro = true", "listener \"dns\": gro false -> true"),
            (
                "dataplane",
                "dataplane = \"auto\"",
                "listener \"dns\": dataplane socket -> auto",
            ),
            (
                "address",
                "[listeners.dns2]\naddress = \"127.0.0.1:5354\"\npool = \"p\"",
                "listener \"dns2\" added (127.0.0.1:5354)",
            ),
        ] {
            let path = config_file(name, extra);
            let error = load_compatible(&path, &running).unwrap_err();
            let _ = std::fs::remove_file(&path);
            assert!(error.contains("needs a restart"), "{name}: {error}");
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(error.contains(change), "{name}: {error}");
            assert!(!error.contains("(name,"), "{name}: {error}");
        }
    }
}
