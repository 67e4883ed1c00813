//! What a configuration change changed, in words, for the log: every API change and every
//! reload says what it did (and, from the API, who asked), not only that it happened.
//!
//! Owns: comparing two configurations into lines an operator reads ("pool dns: backend
//! 10.0.0.2:53 state enabled -> draining"). Must not: decide anything (the publisher applies
//! the change; this only describes it).

use std::fmt::Debug;

use udplb_config::{BackendConfig, Config, ListenerConfig, PoolConfig};

/// Who asked for an API change, and how.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The admin client's address, when known.
    pub peer: Option<std::net::SocketAddr>,
    /// The request: method and path.
    pub request: String,
}

/// What differs from `old` to `new`, a line per change: pools and backends added or removed,
/// a backend's state, weight or backup flag, and, for anything else of a pool or a listener,
/// which setting changed.
pub fn differences(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for p in &new.pools {
        match old.pools.iter().find(|o| o.name == p.name) {
            None => out.push(format!("pool {}: added", p.name)),
            Some(o) => pool_differences(o, p, &mut out),
        }
    }
    for o in old
        .pools
        .iter()
        .filter(|o| !new.pools.iter().any(|p| p.name == o.name))
    {
        out.push(format!("pool {}: removed", o.name));
    }
    for l in &new.listeners {
        if let Some(o) = old.listeners.iter().find(|o| o.name == l.name) {
            listener_differences(o, l, &mut out);
        }
    }
    out
}

fn pool_differences(old: &PoolConfig, new: &PoolConfig, out: &mut Vec<String>) {
    let name = &new.name;
    for b in &new.backends {
        let addr = b.spec.addr;
        match old.backends.iter().find(|o| o.spec.addr == addr) {
            None => out.push(format!(
                "pool {name}: backend {addr} added (weight {}, {}{})",
                b.spec.weight,
                state_name(b),
                if b.spec.backup { ", backup" } else { "" }
            )),
            Some(o) => {
                if o.state != b.state {
                    out.push(format!(
                        "pool {name}: backend {addr} state {} -> {}",
                        state_name(o),
                        state_name(b)
                    ));
                }
                if o.spec.weight != b.spec.weight {
                    out.push(format!(
                        "pool {name}: backend {addr} weight {} -> {}",
                        o.spec.weight, b.spec.weight
                    ));
                }
                if o.spec.backup != b.spec.backup {
                    out.push(format!(
                        "pool {name}: backend {addr} backup {} -> {}",
                        o.spec.backup, b.spec.backup
                    ));
                }
                if o.health != b.health {
                    out.push(format!("pool {name}: backend {addr} health check changed"));
                }
            }
        }
    }
    for o in &old.backends {
        if !new.backends.iter().any(|b| b.spec.addr == o.spec.addr) {
            out.push(format!("pool {name}: backend {} removed", o.spec.addr));
        }
    }
    let settings = [
        setting("scheduler", &old.scheduler, &new.scheduler),
        setting("on_backend_down", &old.on_down, &new.on_down),
        setting("all_down", &old.all_down, &new.all_down),
        setting("quorum", &old.quorum, &new.quorum),
        setting("notify", &old.notify, &new.notify),
        setting("health", &old.health, &new.health),
        setting("proxy_protocol", &old.proxy_protocol, &new.proxy_protocol),
        setting(
            "strip_reply_proxy",
            &old.strip_reply_proxy,
            &new.strip_reply_proxy,
        ),
        setting("transparent", &old.transparent, &new.transparent),
        setting("rebalance", &old.rebalance, &new.rebalance),
        setting("slow_start", &old.slow_start, &new.slow_start),
        setting("payload_key", &old.payload_key, &new.payload_key),
    ];
    for s in settings.into_iter().flatten() {
        out.push(format!("pool {name}: {s}"));
    }
}

fn listener_differences(old: &ListenerConfig, new: &ListenerConfig, out: &mut Vec<String>) {
    let settings = [
        setting("pool", &old.pool, &new.pool),
        setting("mode", &old.mode, &new.mode),
        setting("affinity", &old.affinity, &new.affinity),
        setting("idle_timeout", &old.idle_timeout, &new.idle_timeout),
        setting("persistence", &old.persistence, &new.persistence),
        setting("reply_timeout", &old.reply_timeout, &new.reply_timeout),
        setting("max_flows", &old.max_flows, &new.max_flows),
        setting(
            "max_datagram_size",
            &old.max_datagram_size,
            &new.max_datagram_size,
        ),
        setting("allow", &old.allow, &new.allow),
        setting("deny", &old.deny, &new.deny),
        setting("limits", &old.limits, &new.limits),
        setting("proxy_protocol", &old.proxy_protocol, &new.proxy_protocol),
        setting("proxy_from", &old.proxy_from, &new.proxy_from),
        setting("abuse_pool", &old.abuse_pool, &new.abuse_pool),
        setting(
            "shared_upstream",
            &old.shared_upstream,
            &new.shared_upstream,
        ),
        setting(
            "tcp_max_connections",
            &old.tcp_max_connections,
            &new.tcp_max_connections,
        ),
    ];
    for s in settings.into_iter().flatten() {
        out.push(format!("listener {}: {s}", new.name));
    }
}

/// `name old -> new` when they differ (values as the program shows them).
fn setting<T: PartialEq + Debug>(name: &str, old: &T, new: &T) -> Option<String> {
    (old != new).then(|| format!("{name} {old:?} -> {new:?}"))
}

fn state_name(b: &BackendConfig) -> String {
    format!("{:?}", b.state).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_pool: &str) -> Config {
        udplb_config::parse(
            &format!(
                "[listeners.l]\naddress = \"127.0.0.1:5300\"\npool = \"dns\"\n\
                 [pools.dns]\nbackends = [\"10.0.0.1:53\", {{ address = \"10.0.0.2:53\", weight = 2 }}{extra_pool}]\n"
            ),
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn says_what_changed_backend_by_backend() {
        let old = config("");
        assert!(differences(&old, &old).is_empty());
        let mut new = old.clone();
        new.pools[0].backends[1].state = udplb_core::snapshot::AdminState::Draining;
        new.pools[0].backends[1].spec.weight = 5;
        new.pools[0].backends.remove(0);
        new.listeners[0].idle_timeout = std::time::Duration::from_secs(5);
        assert_eq!(
            differences(&old, &new),
            [
                "pool dns: backend 10.0.0.2:53 state enabled -> draining",
                "pool dns: backend 10.0.0.2:53 weight 2 -> 5",
                "pool dns: backend 10.0.0.1:53 removed",
                "listener l: idle_timeout 30s -> 5s",
            ]
        );
        let added = config(", { address = \"10.0.0.3:53\", backup = true }");
        assert_eq!(
            differences(&old, &added),
            ["pool dns: backend 10.0.0.3:53 added (weight 1, enabled, backup)"]
        );
    }
}
